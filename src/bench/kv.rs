//! `lodge bench kv`: a 3-member Lodge cluster and a 3-member etcd 3.4 cluster on this machine,
//! driven with the same load in the same run: 256-byte puts from 1, 16 and 64 concurrent clients,
//! then linearizable gets from 64 clients, then (Lodge) the time from `kill -9` of the leader to
//! the first acknowledged write. Both systems fsync every commit (their defaults); each client has
//! its own connection to every member and uses them in turn, so both systems serve a third of
//! the requests at the leader and forward the rest from followers, wherever their leader is.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lodge_grpc::auth::Role;
use lodge_grpc::client::Channel;
use lodge_grpc::client::{self, ClientTls};
use lodge_grpc::pb::etcd::{self as epb, kv_client::KvClient as EtcdClient};
use lodge_grpc::pb::kv::{self as lpb, kv_client::KvClient as LodgeClient};

use super::{Failures, Outcome};

/// What `lodge bench kv` measures, from the command line.
pub struct Options {
    /// Concurrent clients of each put run.
    pub clients: Vec<usize>,
    /// Measured time per run (after a warm-up).
    pub run_for: Duration,
    pub value_bytes: usize,
    /// Measure etcd too, if it is installed.
    pub etcd: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum System {
    Lodge,
    /// Lodge with `[auth]` on: every call carries a JWT (kv-read and kv-write on the bench's
    /// prefix), checked by the node.
    LodgeAuth,
    Etcd,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            Self::Lodge => "Lodge",
            Self::LodgeAuth => "Lodge, auth on (JWT)",
            Self::Etcd => "etcd",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Put,
    Get,
}

/// A child process killed and reaped on drop.
pub(super) struct Proc {
    pub(super) child: Child,
    /// Its gRPC address.
    pub(super) client: String,
    /// Its metrics address (a Lodge node's; empty for etcd).
    pub(super) metrics: String,
    _dir: tempfile::TempDir,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port free right now, never the same twice in this process. Taken below the
/// kernel's ephemeral range (32768 on): a port the kernel chose for us is as likely to be chosen
/// again for an outgoing connection before the member binds it (seen: "address in use").
pub(super) fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Each process starts at its own place, so that two benches at once rarely meet.
    let start = 20_000 + (std::process::id() % 1_200) as u16 * 10;
    let _ = NEXT.compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(port < 32_768, "no free port left below the ephemeral range");
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
}

/// `n` Lodge members on free loopback ports, with `LODGE_*` environment overrides.
pub(super) fn start_lodge_with(n: usize, env: &[(&str, &str)]) -> Outcome<Vec<Proc>> {
    start_lodge_args(n, env, &[])
}

/// `n` Lodge members on free loopback ports, with `LODGE_*` environment overrides and more
/// `lodge node` arguments (`--config FILE`, say), on the default configuration but for the log
/// level (warning). Loopback is exempt from the per-IP connection limits by default, so the
/// bench's load, all from one address, is not refused.
pub(super) fn start_lodge_args(
    n: usize,
    env: &[(&str, &str)],
    extra: &[String],
) -> Outcome<Vec<Proc>> {
    let mut all: Vec<(&str, &str)> = vec![("LODGE_LOG__LEVEL", "warning")];
    all.extend_from_slice(env);
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let peer_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let initial = (0..n)
        .map(|i| format!("{}=127.0.0.1:{}", i + 1, peer_ports[i]))
        .collect::<Vec<_>>()
        .join(",");
    (0..n)
        .map(|i| {
            let dir = tempfile::tempdir().unwrap();
            let client = format!("127.0.0.1:{}", ports[i]);
            let mut args = vec![
                "--node-id".to_string(),
                (i + 1).to_string(),
                "--listen".to_string(),
                client.clone(),
                "--peer-listen".to_string(),
                format!("127.0.0.1:{}", peer_ports[i]),
                "--initial-cluster".to_string(),
                initial.clone(),
            ];
            args.extend_from_slice(extra);
            let (child, metrics) = launch_with_metrics(&args, dir.path(), &all)?;
            Ok(Proc {
                child,
                client,
                metrics,
                _dir: dir,
            })
        })
        .collect()
}

/// Starts `lodge node ARGS` keeping its data in `dir`, and waits until it is ready.
pub(super) fn launch(args: &[String], dir: &Path, env: &[(&str, &str)]) -> Outcome<Child> {
    launch_with_metrics(args, dir, env).map(|(child, _)| child)
}

/// [`launch`], answering the node's metrics address (from its ready line) too.
pub(super) fn launch_with_metrics(
    args: &[String],
    dir: &Path,
    env: &[(&str, &str)],
) -> Outcome<(Child, String)> {
    let exe = std::env::current_exe().expect("own path");
    let mut child = super::net::die_with_bench(&mut Command::new(&exe))
        .arg("node")
        .args(args)
        .args(["--metrics-listen", "127.0.0.1:0", "--log-level", "warning"])
        .arg("--data-dir")
        .arg(dir)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("stderr.log")).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("starting a lodge node: {e}"))?;
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.starts_with("lodge node ready") => {
                let metrics = line
                    .split_whitespace()
                    .find_map(|f| f.strip_prefix("metrics="))
                    .unwrap_or_default()
                    .to_string();
                return Ok((child, metrics));
            }
            Ok(_) => continue,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
                let last = log
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("");
                return Err(format!(
                    "a lodge node did not get ready within 60 s; its last log line: {last}"
                ));
            }
        }
    }
}

fn start_etcd(n: usize, etcd: &Path) -> Outcome<Vec<Proc>> {
    let client: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let peer: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let initial = (0..n)
        .map(|i| format!("n{i}=http://127.0.0.1:{}", peer[i]))
        .collect::<Vec<_>>()
        .join(",");
    (0..n)
        .map(|i| {
            let dir = tempfile::tempdir().unwrap();
            let c = format!("http://127.0.0.1:{}", client[i]);
            let p = format!("http://127.0.0.1:{}", peer[i]);
            let child = super::net::die_with_bench(&mut Command::new(etcd))
                .args([
                    "--name",
                    &format!("n{i}"),
                    "--listen-client-urls",
                    &c,
                    "--advertise-client-urls",
                    &c,
                ])
                .args([
                    "--listen-peer-urls",
                    &p,
                    "--initial-advertise-peer-urls",
                    &p,
                ])
                .args([
                    "--initial-cluster",
                    &initial,
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    "lodge-bench",
                ])
                .arg("--data-dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(
                    std::fs::File::create(dir.path().join("stderr.log"))
                        .map_err(|e| e.to_string())?,
                )
                .spawn()
                .map_err(|e| format!("starting {}: {e}", etcd.display()))?;
            Ok(Proc {
                child,
                client: format!("127.0.0.1:{}", client[i]),
                metrics: String::new(),
                _dir: dir,
            })
        })
        .collect()
}

enum Conn {
    Lodge(LodgeClient<Channel>),
    Etcd(EtcdClient<Channel>),
}

impl Conn {
    async fn open(system: System, endpoint: &str, token: Option<&str>) -> Result<Self, String> {
        let tls = ClientTls {
            bearer: token.map(String::from),
            ..Default::default()
        };
        let ch = client::connect(endpoint, &tls).await?;
        Ok(match system {
            System::Lodge | System::LodgeAuth => Conn::Lodge(LodgeClient::new(ch)),
            System::Etcd => Conn::Etcd(EtcdClient::new(ch)),
        })
    }

    async fn call(&mut self, op: Op, key: Vec<u8>, value: &[u8]) -> Result<(), tonic::Status> {
        match (self, op) {
            (Conn::Lodge(c), Op::Put) => c
                .put(lpb::PutRequest {
                    key,
                    value: value.to_vec(),
                    prev_kv: false,
                    lease: 0,
                })
                .await
                .map(drop),
            (Conn::Lodge(c), Op::Get) => c
                .range(lpb::RangeRequest {
                    key,
                    prefix: false,
                    limit: 0,
                    serializable: false,
                    after: Vec::new(),
                })
                .await
                .map(drop),
            (Conn::Etcd(c), Op::Put) => c
                .put(epb::PutRequest {
                    key,
                    value: value.to_vec(),
                    lease: 0,
                    prev_kv: false,
                })
                .await
                .map(drop),
            (Conn::Etcd(c), Op::Get) => c
                .range(epb::RangeRequest {
                    key,
                    range_end: vec![],
                    limit: 0,
                    revision: 0,
                    serializable: false,
                })
                .await
                .map(drop),
        }
    }
}

/// Throughput and latency of one load run.
pub(super) struct Load {
    pub(super) ops_per_s: f64,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) failures: Failures,
}

/// `clients` concurrent clients calling `op` for `duration` after a 0.5 s warm-up, each with a
/// connection to every member used in turn.
pub(super) async fn load(
    system: System,
    token: Option<String>,
    endpoints: &[String],
    clients: usize,
    op: Op,
    duration: Duration,
    value: &[u8],
) -> Load {
    let mut tasks = Vec::new();
    let start_at = Instant::now() + Duration::from_millis(500); // warm-up before this instant
    let end_at = start_at + duration;
    for c in 0..clients {
        let endpoints = endpoints.to_vec();
        let value = value.to_vec();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            // One connection per member, used in turn: every client sends a third of its
            // requests to the leader and two thirds through followers, whichever member leads,
            // so neither system is favoured by where its election happened to land.
            let mut conns = Vec::new();
            let mut failures = Failures::default();
            for ep in &endpoints {
                match Conn::open(system, ep, token.as_deref()).await {
                    Ok(c) => conns.push(c),
                    Err(e) => failures.add(format!("connecting to {ep}: {e}")),
                }
            }
            let mut lat = Vec::new();
            if conns.is_empty() {
                return (lat, failures);
            }
            let mut i = 0u64;
            loop {
                let now = Instant::now();
                if now >= end_at {
                    break;
                }
                let key = format!("bench/{c}/{}", i % 1000).into_bytes();
                i += 1;
                let n = conns.len();
                let conn = &mut conns[(c + i as usize) % n];
                let r = conn.call(op, key, &value).await;
                if now >= start_at {
                    match r {
                        Ok(()) => lat.push(now.elapsed().as_micros() as u32),
                        Err(e) => failures.add(format!("{:?}: {}", e.code(), e.message())),
                    }
                }
            }
            (lat, failures)
        }));
    }
    let mut all = Vec::new();
    let mut failures = Failures::default();
    for t in tasks {
        match t.await {
            Ok((l, f)) => {
                all.extend(l);
                failures.merge(f);
            }
            Err(e) => failures.add(format!("a client task: {e}")),
        }
    }
    all.sort_unstable();
    let q = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(f64::NAN, |v| *v as f64 / 1000.0)
    };
    Load {
        ops_per_s: all.len() as f64 / duration.as_secs_f64(),
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        failures,
    }
}

/// Waits until a put succeeds through `endpoint` (the cluster has a leader).
pub(super) async fn ready(system: System, token: Option<&str>, endpoint: &str) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        match Conn::open(system, endpoint, token).await {
            Ok(mut c) => match c.call(Op::Put, b"bench/ready".to_vec(), b"1").await {
                Ok(()) => return Ok(()),
                Err(e) => last = format!("{:?}: {}", e.code(), e.message()),
            },
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!(
        "the {system:?} cluster took no write within 30 s (last: {last})"
    ))
}

/// The leader's index in `nodes`, asked through the admin RPC of the first node.
pub(super) async fn lodge_leader(nodes: &[Proc]) -> Outcome<usize> {
    use lodge_grpc::pb::admin::{admin_client::AdminClient, GetActorRequest};
    let ch = client::connect(&nodes[0].client, &ClientTls::default()).await?;
    let r = AdminClient::new(ch)
        .get_actor(GetActorRequest {
            path: "/node/cluster/raft".into(),
        })
        .await
        .map_err(|e| format!("asking for the leader: {:?}: {}", e.code(), e.message()))?
        .into_inner();
    let state: serde_json::Value =
        serde_json::from_str(&r.state_json).map_err(|e| format!("the raft actor's state: {e}"))?;
    match state["leader"].as_u64() {
        Some(id) if (1..=nodes.len() as u64).contains(&id) => Ok(id as usize - 1),
        other => Err(format!("the raft actor names no leader ({other:?})")),
    }
}

pub fn run(o: &Options) -> Outcome {
    super::on_io_runtime(|io| measure(io, o))
}

fn measure(io: &tokio::runtime::Runtime, o: &Options) -> Outcome {
    let value = vec![b'x'; o.value_bytes];
    let etcd_bin = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists());
    // Auth's cost is measured beside the default configuration, in the same run.
    let auth = super::auth::BenchAuth::new()?;
    let token = auth.token(&[Role::KvRead, Role::KvWrite], Some("bench/"))?;
    let mut systems = vec![System::Lodge, System::LodgeAuth];
    match (o.etcd, etcd_bin) {
        (true, Some(_)) => systems.push(System::Etcd),
        (true, None) => println!("etcd not found (scripts/bench-deps installs Debian's etcd-server): measuring Lodge alone"),
        (false, _) => println!("--no-etcd: measuring Lodge alone"),
    }
    // The linearizable gets run with the largest number of clients asked for.
    let get_clients = o.clients.iter().copied().max().unwrap_or(1);
    println!(
        "lodge bench kv: 3 members each, fsync on, {}-byte values, {:.1} s per run, 2 CPUs shared by servers and load",
        o.value_bytes,
        o.run_for.as_secs_f64()
    );
    println!();
    println!("| system | load | clients | ops/s | p50 ms | p99 ms | errors |");
    println!("|---|---|---|---|---|---|---|");
    let mut results = Vec::new();
    let mut failures = Failures::default();
    for system in &systems {
        let token = (*system == System::LodgeAuth).then(|| token.clone());
        let nodes = match (system, etcd_bin) {
            (System::Lodge, _) => start_lodge_with(3, &[])?,
            (System::LodgeAuth, _) => start_lodge_with(3, &auth.env())?,
            (System::Etcd, Some(bin)) => start_etcd(3, bin)?,
            (System::Etcd, None) => unreachable!("etcd is measured only when found"),
        };
        let eps: Vec<String> = nodes.iter().map(|n| n.client.clone()).collect();
        io.block_on(ready(*system, token.as_deref(), &eps[0]))?;
        let runs: Vec<(Op, usize)> = o
            .clients
            .iter()
            .map(|c| (Op::Put, *c))
            .chain([(Op::Get, get_clients)])
            .collect();
        for (op, c) in runs {
            let mut r = io.block_on(load(*system, token.clone(), &eps, c, op, o.run_for, &value));
            let name = if op == Op::Put {
                "put"
            } else {
                "linearizable get"
            };
            println!(
                "| {} | {name} | {c} | {:.0} | {:.2} | {:.2} | {} |",
                system.name(),
                r.ops_per_s,
                r.p50_ms,
                r.p99_ms,
                r.failures.count
            );
            failures.merge(std::mem::take(&mut r.failures));
            results.push((*system, op, c, r));
        }
        if *system == System::Lodge {
            let leader = io.block_on(lodge_leader(&nodes))?;
            let mut nodes = nodes;
            let killed = nodes.remove(leader);
            let alive: Vec<String> = nodes.iter().map(|n| n.client.clone()).collect();
            drop(killed); // SIGKILL
            let took = io.block_on(first_write(&alive))?;
            println!(
                "| Lodge | first write after kill -9 of the leader | - | {:.0} ms | | | |",
                took.as_secs_f64() * 1000.0
            );
        }
    }
    ratios(
        &results,
        (System::LodgeAuth, "auth on"),
        (System::Lodge, "auth off"),
    );
    if systems.contains(&System::Etcd) {
        ratios(&results, (System::Lodge, "Lodge"), (System::Etcd, "etcd"));
    }
    failures.check("requests")
}

/// Prints `over ÷ under` (ops/s and p99) for each run both systems made, each system with the
/// name its column heads use.
fn ratios(
    results: &[(System, Op, usize, Load)],
    (over, over_name): (System, &str),
    (under, under_name): (System, &str),
) {
    println!();
    println!(
        "| load | clients | {over_name} / {under_name} ops/s | {over_name} p99 / {under_name} p99 |"
    );
    println!("|---|---|---|---|");
    for (_, op, c, a) in results.iter().filter(|r| r.0 == over) {
        let Some((_, _, _, b)) = results
            .iter()
            .find(|r| r.0 == under && r.1 == *op && r.2 == *c)
        else {
            continue;
        };
        let name = if *op == Op::Put {
            "put"
        } else {
            "linearizable get"
        };
        println!(
            "| {name} | {c} | {:.2} | {:.2} |",
            a.ops_per_s / b.ops_per_s,
            a.p99_ms / b.p99_ms
        );
    }
}

/// The time until a put through one of the survivors is acknowledged (30 s at most).
pub(super) async fn first_write(alive: &[String]) -> Outcome<Duration> {
    let t = Instant::now();
    let mut last = String::new();
    while t.elapsed() < Duration::from_secs(30) {
        for ep in alive {
            match Conn::open(System::Lodge, ep, None).await {
                Ok(mut c) => {
                    let put = c.call(Op::Put, b"bench/after-kill".to_vec(), b"1");
                    match tokio::time::timeout(Duration::from_millis(500), put).await {
                        Ok(Ok(())) => return Ok(t.elapsed()),
                        Ok(Err(e)) => last = format!("{:?}: {}", e.code(), e.message()),
                        Err(_) => last = "no answer within 500 ms".into(),
                    }
                }
                Err(e) => last = e,
            }
        }
    }
    Err(format!(
        "no write acknowledged within 30 s of killing the leader (last: {last})"
    ))
}
