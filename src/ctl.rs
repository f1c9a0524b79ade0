//! `lodge ctl`: the admin RPC from a terminal. Tables for people, `--json` for scripts.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use lodge_grpc::client;
use lodge_grpc::pb::admin::{self as pb, admin_client::AdminClient};
use serde_json::{json, Value};
use tokio_stream::StreamExt;

/// Where and how to reach a node; shared by every client subcommand.
#[derive(Args, Clone, Debug)]
pub struct Connection {
    /// Node address HOST:PORT (for `kv`: a comma-separated list to fail over across).
    #[arg(
        long,
        global = true,
        env = "LODGE_ENDPOINT",
        default_value = "127.0.0.1:7400"
    )]
    pub endpoint: String,
    /// CA certificate (PEM) to verify a TLS node with; turns TLS on.
    #[arg(long, global = true)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, global = true)]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, global = true)]
    pub tls_key: Option<PathBuf>,
    /// Server name to expect in the node's certificate.
    #[arg(long, global = true)]
    pub tls_domain: Option<String>,
    /// Print JSON (one document; one per line for `events`).
    #[arg(long, global = true)]
    pub json: bool,
    /// File holding the bearer token (JWT) every call presents (its first line); or set
    /// LODGE_TOKEN. Never a plain argument, which `ps` would show.
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
}

impl Connection {
    /// The token from `--token-file` or `LODGE_TOKEN`; `None` when neither is set (a node with
    /// auth off).
    pub fn token(&self) -> Result<Option<String>, String> {
        if let Some(p) = &self.token_file {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("--token-file {}: {e}", p.display()))?;
            let t = text.lines().next().unwrap_or("").trim().to_string();
            if t.is_empty() {
                return Err(format!("--token-file {}: empty", p.display()));
            }
            return Ok(Some(t));
        }
        Ok(std::env::var("LODGE_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty()))
    }
}

#[derive(Subcommand, Debug)]
pub enum Ctl {
    /// List actors.
    Actors {
        /// Path glob (`*`, `?`).
        #[arg(long, default_value = "")]
        glob: String,
        /// Only this kind.
        #[arg(long, default_value = "")]
        kind: String,
        /// Sort order (numeric keys: largest first).
        #[arg(long, value_enum, default_value_t = Sort::Path)]
        sort: Sort,
        /// Rows at most (0 = all).
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// Show one actor with its state dump.
    Actor { path: String },
    /// Show the supervision tree.
    Tree {
        #[arg(long, default_value = "/node")]
        root: String,
        /// Levels (0 = all).
        #[arg(long, default_value_t = 0)]
        depth: u32,
    },
    /// Stream lifecycle events until interrupted.
    Events {
        #[arg(long, default_value = "")]
        glob: String,
    },
    /// Node version, uptime and effective configuration.
    Info,
    /// Restart an actor through its supervisor (needs admin.allow_mutations).
    Restart { path: String },
    /// Stop an actor (needs admin.allow_mutations).
    Stop { path: String },
    /// Replace this member's injected raft faults; no options clears them (needs
    /// admin.allow_mutations). For tests and drills.
    Faults {
        /// Members whose raft traffic with this one is lost, both ways (comma-separated ids).
        #[arg(long, value_delimiter = ',')]
        drop: Vec<u64>,
        /// Delay before each batch sent to a member: ID=MS, comma-separated.
        #[arg(long, value_delimiter = ',', value_parser = parse_delay)]
        delay: Vec<(u64, u32)>,
        /// Delay before each commit of the raft log, in ms.
        #[arg(long, default_value_t = 0)]
        fsync_delay_ms: u32,
    },
}

fn parse_delay(s: &str) -> Result<(u64, u32), String> {
    let (id, ms) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not ID=MS"))?;
    Ok((
        id.parse()
            .map_err(|_| format!("{id:?} is not a member id"))?,
        ms.parse()
            .map_err(|_| format!("{ms:?} is not a number of milliseconds"))?,
    ))
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Sort {
    Path,
    Queue,
    Restarts,
    Rate,
}

fn state_name(s: i32) -> &'static str {
    match pb::LifecycleState::try_from(s) {
        Ok(pb::LifecycleState::Starting) => "starting",
        Ok(pb::LifecycleState::Running) => "running",
        Ok(pb::LifecycleState::Restarting) => "restarting",
        Ok(pb::LifecycleState::Stopping) => "stopping",
        Ok(pb::LifecycleState::Stopped) => "stopped",
        Ok(pb::LifecycleState::Failed) => "failed",
        _ => "unknown",
    }
}

fn event_name(t: i32) -> &'static str {
    match pb::EventType::try_from(t) {
        Ok(pb::EventType::Started) => "started",
        Ok(pb::EventType::Stopped) => "stopped",
        Ok(pb::EventType::Failed) => "failed",
        Ok(pb::EventType::Restarted) => "restarted",
        _ => "unknown",
    }
}

fn summary_json(a: &pb::ActorSummary) -> Value {
    json!({
        "path": a.path, "kind": a.kind, "parent": a.parent, "state": state_name(a.state),
        "queue_len": a.queue_len, "messages_handled": a.messages_handled, "message_rate": a.message_rate,
        "restarts": a.restarts,
        "last_failure": a.last_failure.as_ref().map(|f| json!({"reason": f.reason, "at_unix_ms": f.at_unix_ms})),
        "started_at_unix_ms": a.started_at_unix_ms, "last_activity_unix_ms": a.last_activity_unix_ms,
        "latency_p50_us": a.latency_p50_us, "latency_p99_us": a.latency_p99_us,
    })
}

fn tree_json(n: &pb::TreeNode) -> Value {
    json!({
        "path": n.path, "kind": n.kind, "state": state_name(n.state), "restarts": n.restarts,
        "children": n.children.iter().map(tree_json).collect::<Vec<_>>(),
    })
}

fn print_tree(n: &pb::TreeNode, prefix: &str, last: bool, top: bool) {
    let (branch, next) = if top {
        ("", "")
    } else if last {
        ("└── ", "    ")
    } else {
        ("├── ", "│   ")
    };
    println!(
        "{prefix}{branch}{}  [{} {}, restarts {}]",
        n.path,
        n.kind,
        state_name(n.state),
        n.restarts
    );
    let child_prefix = format!("{prefix}{next}");
    for (i, c) in n.children.iter().enumerate() {
        print_tree(c, &child_prefix, i + 1 == n.children.len(), false);
    }
}

fn us(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}µs"))
}

/// Prints `rows` (the first is the header) as left-aligned columns two spaces apart.
pub fn print_table(rows: &[Vec<String>]) {
    print!("{}", format_table(rows));
}

/// `rows` (the first is the header) as left-aligned columns two spaces apart, a newline after
/// each row.
pub fn format_table(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Runs a ctl subcommand; returns the process exit code.
pub async fn run(conn: Connection, cmd: Ctl) -> i32 {
    match run_inner(&conn, cmd).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("lodge: {e}");
            1
        }
    }
}

fn rpc_error(s: tonic::Status) -> String {
    lodge_grpc::client::status_line(&s)
}

async fn run_inner(conn: &Connection, cmd: Ctl) -> Result<(), String> {
    let tls = crate::failover::tls(conn)?;
    let channel = client::connect(&conn.endpoint, &tls).await?;
    let mut c = AdminClient::new(channel);
    match cmd {
        Ctl::Actors {
            glob,
            kind,
            sort,
            limit,
        } => {
            let sort_by = match sort {
                Sort::Path => pb::SortBy::Path,
                Sort::Queue => pb::SortBy::QueueLen,
                Sort::Restarts => pb::SortBy::Restarts,
                Sort::Rate => pb::SortBy::MessageRate,
            } as i32;
            let r = c
                .list_actors(pb::ListActorsRequest {
                    path_glob: glob,
                    kind,
                    sort_by,
                    limit,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            if conn.json {
                println!(
                    "{}",
                    json!({"matched": r.matched, "actors": r.actors.iter().map(summary_json).collect::<Vec<_>>()})
                );
            } else {
                let mut rows = vec![[
                    "PATH",
                    "KIND",
                    "STATE",
                    "QUEUE",
                    "MSGS",
                    "RATE/S",
                    "RESTARTS",
                    "P50",
                    "P99",
                    "LAST FAILURE",
                ]
                .map(String::from)
                .to_vec()];
                for a in &r.actors {
                    rows.push(vec![
                        a.path.clone(),
                        a.kind.clone(),
                        state_name(a.state).into(),
                        a.queue_len.to_string(),
                        a.messages_handled.to_string(),
                        format!("{:.1}", a.message_rate),
                        a.restarts.to_string(),
                        us(a.latency_p50_us),
                        us(a.latency_p99_us),
                        a.last_failure
                            .as_ref()
                            .map_or("-".into(), |f| f.reason.clone()),
                    ]);
                }
                print_table(&rows);
                println!("({} shown of {} matching)", r.actors.len(), r.matched);
            }
        }
        Ctl::Actor { path } => {
            let r = c
                .get_actor(pb::GetActorRequest { path })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let state: Value = serde_json::from_str(&r.state_json).unwrap_or(Value::Null);
            let mut doc = r.actor.as_ref().map(summary_json).unwrap_or(Value::Null);
            doc["children"] = json!(r.children);
            doc["state_dump"] = state;
            if conn.json {
                println!("{doc}");
            } else {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&doc).expect("JSON value")
                );
            }
        }
        Ctl::Tree { root, depth } => {
            let r = c
                .tree(pb::TreeRequest { root, depth })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let root = r.root.ok_or("empty tree answer")?;
            if conn.json {
                println!("{}", tree_json(&root));
            } else {
                print_tree(&root, "", true, true);
            }
        }
        Ctl::Events { glob } => {
            // The subscription is served by /node/admin, which may be restarting right now: ride
            // that out for a few seconds rather than fail.
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            let mut stream = loop {
                match c
                    .watch_events(pb::WatchEventsRequest {
                        path_glob: glob.clone(),
                    })
                    .await
                {
                    Ok(r) => break r.into_inner(),
                    Err(s)
                        if s.code() == tonic::Code::Unavailable
                            && tokio::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                    Err(s) => return Err(rpc_error(s)),
                }
            };
            while let Some(e) = stream.next().await {
                let e = e.map_err(rpc_error)?;
                if conn.json {
                    println!(
                        "{}",
                        json!({"at_unix_ms": e.at_unix_ms, "path": e.path, "kind": e.kind, "type": event_name(e.r#type), "reason": e.reason, "restarts": e.restarts, "missed": e.missed})
                    );
                } else if e.missed > 0 {
                    println!("... {} events missed (reading too slowly)", e.missed);
                } else {
                    println!(
                        "{} {:<9} {} [{}] restarts={} {}",
                        crate::utc::rfc3339(e.at_unix_ms),
                        event_name(e.r#type),
                        e.path,
                        e.kind,
                        e.restarts,
                        e.reason
                    );
                }
            }
        }
        Ctl::Info => {
            let r = c
                .node_info(pb::NodeInfoRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner();
            let cfg: Value = serde_json::from_str(&r.config_json).unwrap_or(Value::Null);
            let doc = json!({"node_id": r.node_id, "version": r.version, "started_at_unix_ms": r.started_at_unix_ms, "uptime_ms": r.uptime_ms, "config": cfg});
            if conn.json {
                println!("{doc}");
            } else {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&doc).expect("JSON value")
                );
            }
        }
        Ctl::Restart { path } => {
            let r = c
                .restart_actor(pb::RestartActorRequest { path: path.clone() })
                .await
                .map_err(rpc_error)?
                .into_inner();
            if conn.json {
                println!("{}", json!({"path": path, "restarts": r.restarts}));
            } else {
                println!("restarted {path} (restarts: {})", r.restarts);
            }
        }
        Ctl::Faults {
            drop,
            delay,
            fsync_delay_ms,
        } => {
            let r = c
                .inject_faults(pb::InjectFaultsRequest {
                    drop_peers: drop,
                    delay_peers_ms: delay.into_iter().collect(),
                    fsync_delay_ms,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            println!("{}", r.faults_json);
        }
        Ctl::Stop { path } => {
            c.stop_actor(pb::StopActorRequest { path: path.clone() })
                .await
                .map_err(rpc_error)?;
            if conn.json {
                println!("{}", json!({"path": path, "stopped": true}));
            } else {
                println!("stopped {path}");
            }
        }
    }
    Ok(())
}
