//! `lodge workflow`: start, inspect, cancel and signal replicated workflows from a terminal.
//! Calls fail over across the `--endpoint` list; a start carries an id chosen here, so that a
//! retried start answers the run the first attempt made instead of making a second one.

use std::path::PathBuf;

use clap::Subcommand;
use lodge_grpc::pb::workflow::{self as pb, workflow_client::WorkflowClient};
use serde_json::{json, Value};

use crate::ctl::{print_table, Connection};
use crate::failover;

#[derive(Subcommand, Debug)]
pub enum Workflow {
    /// Run a runbook file (JSON: a name and steps, each a shell command or an HTTP request);
    /// prints the workflow's id as the last line.
    Run {
        file: PathBuf,
        /// The run's id (default: a fresh one); a second run with the same id answers the first.
        #[arg(long)]
        id: Option<String>,
    },
    /// Start a run of a type; prints its id as the last line.
    Start {
        #[arg(value_name = "TYPE")]
        type_name: String,
        /// The type's version (default: the highest a live member runs).
        #[arg(long)]
        version: Option<u32>,
        /// The run's id (default: a fresh one); a second start with the same id answers the first.
        #[arg(long)]
        id: Option<String>,
        /// The input, as JSON.
        #[arg(long)]
        input: Option<String>,
    },
    /// A run: status, owner, epoch and recorded steps.
    Get { id: String },
    /// Runs, in id order.
    List {
        #[arg(long = "type", value_name = "TYPE")]
        type_name: Option<String>,
        /// running, completed, failed, needs-attention or cancelled.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Where to continue (a previous page's next_page_token).
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Ask the owner to end a running run as cancelled.
    Cancel { id: String },
    /// Send a named signal, with a JSON value, to a running run.
    Signal {
        id: String,
        name: String,
        #[arg(long)]
        value: Option<String>,
    },
    /// Follow a run: its record, then each step as it is recorded and each change of the run,
    /// one line each, until it ends.
    Watch { id: String },
    /// The types the members run.
    Types,
}

/// An id for a start that did not name one: time, then randomness.
fn fresh_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("wf-{ms:x}-{:08x}", fastrand::u32(..))
}

/// Runs a workflow subcommand; returns the exit code.
pub async fn run(conn: Connection, cmd: Workflow) -> i32 {
    if let Workflow::Watch { id } = &cmd {
        return match watch(&conn, id).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("lodge: {e}");
                1
            }
        };
    }
    let request = match prepare(cmd) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lodge: {e}");
            return 2;
        }
    };
    let result = failover::call(&conn, |ch| call(WorkflowClient::new(ch), &request)).await;
    match result {
        Ok(doc) => {
            print(&request, &doc, conn.json);
            0
        }
        Err(e) => {
            eprintln!("lodge: {e}");
            1
        }
    }
}

/// A subcommand with its files read and its id chosen, ready to send (and to send again).
#[derive(Debug)]
enum Prepared {
    Start(pb::StartRequest),
    Other(Workflow),
}

fn prepare(cmd: Workflow) -> Result<Prepared, String> {
    Ok(match cmd {
        Workflow::Run { file, id } => {
            let text =
                std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let book: Value = serde_json::from_str(&text)
                .map_err(|e| format!("{}: not JSON: {e}", file.display()))?;
            Prepared::Start(pb::StartRequest {
                id: id.unwrap_or_else(fresh_id),
                r#type: "runbook".into(),
                version: 0,
                input_json: book.to_string(),
            })
        }
        Workflow::Start {
            type_name,
            version,
            id,
            input,
        } => {
            if let Some(i) = &input {
                serde_json::from_str::<Value>(i).map_err(|e| format!("--input: not JSON: {e}"))?;
            }
            Prepared::Start(pb::StartRequest {
                id: id.unwrap_or_else(fresh_id),
                r#type: type_name,
                version: version.unwrap_or(0),
                input_json: input.unwrap_or_default(),
            })
        }
        Workflow::Signal { value: Some(v), .. } if serde_json::from_str::<Value>(&v).is_err() => {
            return Err(format!("--value: not JSON: {v}"));
        }
        other => Prepared::Other(other),
    })
}

/// Prints a run's events as they come, one line each, until the run ends (a stream is not
/// retried on another endpoint once open: watch again to resume).
async fn watch(conn: &Connection, id: &str) -> Result<(), String> {
    let (_, channel) = failover::first_channel(conn).await?;
    let status_line = |s: tonic::Status| lodge_grpc::client::status_line(&s);
    let mut events = WorkflowClient::new(channel)
        .watch(pb::WatchRequest { id: id.to_string() })
        .await
        .map_err(status_line)?
        .into_inner();
    while let Some(e) = events.message().await.map_err(status_line)? {
        let doc = match (&e.run, &e.step) {
            (Some(r), _) => json!({"run": run_json(r)}),
            (None, Some(st)) => json!({"step": step_json(st)}),
            (None, None) => continue,
        };
        if conn.json {
            println!("{doc}");
        } else if let Some(r) = e.run {
            let error = if r.error.is_empty() {
                String::new()
            } else {
                format!(": {}", r.error)
            };
            println!(
                "run {} {} (owner {}, epoch {}){error}",
                r.id, r.status, r.owner, r.epoch
            );
        } else if let Some(st) = e.step {
            println!(
                "step {} {} {} (epoch {})",
                st.index, st.name, st.state, st.epoch
            );
        }
    }
    Ok(())
}

fn step_json(s: &pb::Step) -> Value {
    json!({
        "index": s.index,
        "name": s.name,
        "state": s.state,
        "result": serde_json::from_str::<Value>(&s.result_json).unwrap_or(Value::Null),
        "at_ms": s.at_ms,
        "epoch": s.epoch,
    })
}

fn run_json(r: &pb::Run) -> Value {
    let parse = |s: &str| serde_json::from_str::<Value>(s).unwrap_or(Value::Null);
    json!({
        "id": r.id,
        "type": r.r#type,
        "version": r.version,
        "status": r.status,
        "owner": r.owner,
        "epoch": r.epoch,
        "input": parse(&r.input_json),
        "result": parse(&r.result_json),
        "error": (!r.error.is_empty()).then_some(&r.error),
        "cancel_requested": r.cancel_requested,
        "created_ms": r.created_ms,
        "ended_ms": (r.ended_ms != 0).then_some(r.ended_ms),
    })
}

async fn call(
    mut c: WorkflowClient<lodge_grpc::client::Channel>,
    req: &Prepared,
) -> Result<Value, tonic::Status> {
    let cmd = match req {
        Prepared::Start(start) => {
            let r = c.start(start.clone()).await?.into_inner();
            let mut doc = run_json(&r.run.unwrap_or_default());
            doc["created"] = r.created.into();
            return Ok(doc);
        }
        Prepared::Other(cmd) => cmd,
    };
    Ok(match cmd {
        Workflow::Get { id } => {
            let r = c.get(pb::GetRequest { id: id.clone() }).await?.into_inner();
            let mut doc = run_json(&r.run.unwrap_or_default());
            doc["steps"] = r.steps.iter().map(step_json).collect();
            doc
        }
        Workflow::List {
            type_name,
            status,
            limit,
            page_token,
        } => {
            let r = c
                .list(pb::ListRequest {
                    r#type: type_name.clone().unwrap_or_default(),
                    status: status.clone().unwrap_or_default(),
                    limit: *limit,
                    page_token: page_token.clone(),
                })
                .await?
                .into_inner();
            json!({
                "workflows": r.runs.iter().map(run_json).collect::<Vec<_>>(),
                "next_page_token": r.next_page_token,
            })
        }
        Workflow::Cancel { id } => {
            let r = c
                .cancel(pb::CancelRequest { id: id.clone() })
                .await?
                .into_inner();
            run_json(&r.run.unwrap_or_default())
        }
        Workflow::Signal { id, name, value } => {
            c.signal(pb::SignalRequest {
                id: id.clone(),
                name: name.clone(),
                value_json: value.clone().unwrap_or_default(),
            })
            .await?;
            json!({"id": id, "signal": name, "sent": true})
        }
        Workflow::Types => {
            let r = c.list_types(pb::ListTypesRequest {}).await?.into_inner();
            json!({"types": r.types.iter().map(|t| json!({
                "name": t.name, "version": t.version, "nodes": t.nodes,
            })).collect::<Vec<_>>()})
        }
        Workflow::Run { .. } | Workflow::Start { .. } | Workflow::Watch { .. } => {
            unreachable!("a start is prepared; a watch streams")
        }
    })
}

fn print(req: &Prepared, doc: &Value, as_json: bool) {
    if as_json {
        println!("{doc}");
        return;
    }
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    match req {
        Prepared::Start(_) => {
            if doc["created"] == false {
                eprintln!(
                    "existing run: {} is {} (owner {})",
                    s(&doc["id"]),
                    s(&doc["status"]),
                    s(&doc["owner"])
                );
            }
            // The id last, alone on its line, for scripts: `id=$(lodge workflow run f | tail -1)`.
            println!("{}", s(&doc["id"]));
        }
        Prepared::Other(Workflow::Get { .. }) => {
            println!(
                "{} {} v{}: {} (owner {}, epoch {})",
                s(&doc["id"]),
                s(&doc["type"]),
                s(&doc["version"]),
                s(&doc["status"]),
                s(&doc["owner"]),
                s(&doc["epoch"])
            );
            if let Some(e) = doc["error"].as_str() {
                println!("error: {e}");
            }
            if !doc["result"].is_null() {
                println!("result: {}", doc["result"]);
            }
            let mut rows = vec![vec![
                "#".into(),
                "STEP".into(),
                "STATE".into(),
                "EPOCH".into(),
            ]];
            for st in doc["steps"].as_array().into_iter().flatten() {
                rows.push(vec![
                    s(&st["index"]),
                    s(&st["name"]),
                    s(&st["state"]),
                    s(&st["epoch"]),
                ]);
            }
            print_table(&rows);
        }
        Prepared::Other(Workflow::List { .. }) => {
            let mut rows = vec![vec![
                "ID".into(),
                "TYPE".into(),
                "VERSION".into(),
                "STATUS".into(),
                "OWNER".into(),
            ]];
            for r in doc["workflows"].as_array().into_iter().flatten() {
                rows.push(vec![
                    s(&r["id"]),
                    s(&r["type"]),
                    s(&r["version"]),
                    s(&r["status"]),
                    s(&r["owner"]),
                ]);
            }
            print_table(&rows);
            if let Some(t) = doc["next_page_token"].as_str().filter(|t| !t.is_empty()) {
                println!("more: --page-token {t}");
            }
        }
        Prepared::Other(Workflow::Types) => {
            let mut rows = vec![vec!["TYPE".into(), "VERSION".into(), "MEMBERS".into()]];
            for t in doc["types"].as_array().into_iter().flatten() {
                let nodes: Vec<String> = t["nodes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|n| n.to_string())
                    .collect();
                rows.push(vec![s(&t["name"]), s(&t["version"]), nodes.join(",")]);
            }
            print_table(&rows);
        }
        Prepared::Other(Workflow::Cancel { .. }) => {
            println!("{}: cancel requested", s(&doc["id"]))
        }
        Prepared::Other(_) => println!("{doc}"),
    }
}
