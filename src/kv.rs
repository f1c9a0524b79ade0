//! `lodge kv`: the replicated key-value store from a terminal.
//!
//! `--endpoint` takes a comma-separated list: a call that cannot reach a node, or that a node
//! answers UNAVAILABLE (no leader yet, an election under way, shutting down), is tried on the next
//! endpoint, going round the list with a short pause for up to `--retry-for`. Nodes forward writes
//! to the leader themselves. ABORTED (a write whose outcome is unknown) is never retried.

use clap::Subcommand;
use lodge_grpc::client::{self, ClientTls};
use lodge_grpc::pb::kv::{self as pb, kv_client::KvClient};
use serde_json::{json, Value};
use std::time::Duration;

use tonic::Code;

use crate::ctl::Connection;

#[derive(Subcommand, Debug)]
pub enum Kv {
    /// Set a key.
    Put { key: String, value: String },
    /// Read a key (or every key with a prefix).
    Get {
        key: String,
        #[arg(long)]
        prefix: bool,
        /// Rows at most (0 = all).
        #[arg(long, default_value_t = 0)]
        limit: i64,
        /// Answer from the contacted node's state without asking the leader (may be stale).
        #[arg(long)]
        serializable: bool,
    },
    /// Delete a key (or every key with a prefix).
    Del {
        key: String,
        #[arg(long)]
        prefix: bool,
    },
}

fn kv_json(k: &pb::KeyValue) -> Value {
    json!({
        "key": String::from_utf8_lossy(&k.key),
        "value": String::from_utf8_lossy(&k.value),
        "create_revision": k.create_revision,
        "mod_revision": k.mod_revision,
        "version": k.version,
    })
}

/// Runs a kv subcommand; returns the exit code.
pub async fn run(conn: Connection, cmd: Kv) -> i32 {
    let tls = ClientTls {
        ca: conn.tls_ca.clone(),
        cert: conn.tls_cert.clone(),
        key: conn.tls_key.clone(),
        domain: conn.tls_domain.clone(),
    };
    let endpoints: Vec<&str> = conn
        .endpoint
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    let mut last = String::from("no endpoint given");
    let deadline = tokio::time::Instant::now() + RETRY_FOR;
    let mut pause = Duration::from_millis(50);
    loop {
        for ep in &endpoints {
            let channel = match client::connect(ep, &tls).await {
                Ok(c) => c,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            match call(KvClient::new(channel), &cmd).await {
                Ok(doc) => {
                    print(&doc, conn.json);
                    return 0;
                }
                Err(s) if s.code() == Code::Unavailable => {
                    last = format!("{ep}: {:?}: {}", s.code(), s.message())
                }
                Err(s) => {
                    eprintln!("lodge: {:?}: {}", s.code(), s.message());
                    return 1;
                }
            }
        }
        if endpoints.is_empty() || tokio::time::Instant::now() + pause > deadline {
            eprintln!("lodge: {last}");
            return 1;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// How long `lodge kv` keeps trying endpoints that are unreachable or have no leader: about an
/// election or two.
const RETRY_FOR: Duration = Duration::from_secs(5);

async fn call(
    mut c: KvClient<tonic::transport::Channel>,
    cmd: &Kv,
) -> Result<Value, tonic::Status> {
    Ok(match cmd {
        Kv::Put { key, value } => {
            let r = c
                .put(pb::PutRequest {
                    key: key.clone().into_bytes(),
                    value: value.clone().into_bytes(),
                    prev_kv: true,
                })
                .await?
                .into_inner();
            json!({"revision": r.header.map(|h| h.revision), "prev": r.prev_kv.as_ref().map(kv_json)})
        }
        Kv::Get {
            key,
            prefix,
            limit,
            serializable,
        } => {
            let r = c
                .range(pb::RangeRequest {
                    key: key.clone().into_bytes(),
                    prefix: *prefix,
                    limit: *limit,
                    serializable: *serializable,
                })
                .await?
                .into_inner();
            json!({"revision": r.header.map(|h| h.revision), "count": r.count, "kvs": r.kvs.iter().map(kv_json).collect::<Vec<_>>()})
        }
        Kv::Del { key, prefix } => {
            let r = c
                .delete_range(pb::DeleteRangeRequest {
                    key: key.clone().into_bytes(),
                    prefix: *prefix,
                    prev_kv: false,
                })
                .await?
                .into_inner();
            json!({"revision": r.header.map(|h| h.revision), "deleted": r.deleted})
        }
    })
}

fn print(doc: &Value, as_json: bool) {
    if as_json {
        println!("{doc}");
        return;
    }
    if let Some(kvs) = doc["kvs"].as_array() {
        for kv in kvs {
            println!(
                "{}\t{}",
                kv["key"].as_str().unwrap_or(""),
                kv["value"].as_str().unwrap_or("")
            );
        }
    } else if let Some(n) = doc["deleted"].as_i64() {
        println!("deleted {n} (revision {})", doc["revision"]);
    } else {
        println!("OK (revision {})", doc["revision"]);
    }
}
