//! `lodge kv`: the replicated key-value store from a terminal. Unary calls fail over across the
//! `--endpoint` list (see [`crate::failover`]); `watch` and `lease keep-alive` stream from the
//! first endpoint that answers.

use clap::Subcommand;
use lodge_actors::base64;
use lodge_grpc::pb::kv::{self as pb, kv_client::KvClient};
use serde_json::{json, Value};
use tokio_stream::StreamExt;

use crate::ctl::Connection;
use crate::failover;

#[derive(Subcommand, Debug)]
pub enum Kv {
    /// Set a key.
    Put {
        key: String,
        value: String,
        /// Attach the key to this lease: it goes when the lease does.
        #[arg(long, default_value_t = 0)]
        lease: i64,
    },
    /// Read a key (or every key with a prefix, page by page to the end).
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
    /// Every key starting with PREFIX, in key order (`get --prefix`). The node answers a page
    /// at a time (`kv.range_page_bytes`); every page is read, each at its own revision.
    Range {
        prefix: String,
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
    /// Compare, then write, atomically: `--if` conditions all hold → the `--then` operations,
    /// else the `--else` ones.
    ///
    /// A condition is `KEY value|version|create|mod =|!=|>|< TARGET`, e.g. `--if 'lock version = 0'`.
    /// An operation is `put KEY VALUE`, `del KEY`, `delprefix PREFIX` or `get KEY`.
    Txn {
        #[arg(long = "if")]
        conditions: Vec<String>,
        #[arg(long = "then")]
        then: Vec<String>,
        #[arg(long = "else")]
        otherwise: Vec<String>,
    },
    /// Print changes to a key (or prefix) as they happen, from a past revision if asked.
    Watch {
        key: String,
        #[arg(long)]
        prefix: bool,
        /// First revision to show (0: changes from now on).
        #[arg(long, default_value_t = 0)]
        rev: i64,
        /// Show each key's previous value.
        #[arg(long)]
        prev_kv: bool,
        /// Stop after this many events (0: until interrupted).
        #[arg(long, default_value_t = 0)]
        count: usize,
    },
    /// Leases: keys that vanish unless kept alive.
    Lease {
        #[command(subcommand)]
        cmd: Lease,
    },
}

#[derive(Subcommand, Debug)]
pub enum Lease {
    /// Create a lease of TTL seconds.
    Grant {
        ttl: i64,
        /// Ask for this id (0: the store picks one).
        #[arg(long, default_value_t = 0)]
        id: i64,
    },
    /// End a lease now, deleting its keys.
    Revoke { id: i64 },
    /// Renew a lease every third of its TTL until interrupted (or once with --once).
    KeepAlive {
        id: i64,
        #[arg(long)]
        once: bool,
    },
    /// Time left on a lease.
    Ttl {
        id: i64,
        /// List the keys attached to it.
        #[arg(long)]
        keys: bool,
    },
}

/// Sets `doc[field]` to `b` without losing a byte: the text when `b` is UTF-8, otherwise
/// `doc["<field>_base64"]` to its standard base64 (so a script tells the two apart by the name).
fn bytes_field(doc: &mut Value, field: &str, b: &[u8]) {
    match std::str::from_utf8(b) {
        Ok(s) => doc[field] = s.into(),
        Err(_) => doc[format!("{field}_base64")] = base64::encode(b).into(),
    }
}

/// A key in a list (`lease ttl --keys`): a string when it is UTF-8, else `{"key_base64": ...}`.
fn key_json(b: &[u8]) -> Value {
    match std::str::from_utf8(b) {
        Ok(s) => s.into(),
        Err(_) => json!({ "key_base64": base64::encode(b) }),
    }
}

fn kv_json(k: &pb::KeyValue) -> Value {
    let mut doc = json!({
        "create_revision": k.create_revision,
        "mod_revision": k.mod_revision,
        "version": k.version,
        "lease": k.lease,
    });
    bytes_field(&mut doc, "key", &k.key);
    bytes_field(&mut doc, "value", &k.value);
    doc
}

/// Bytes for a person: as they are when UTF-8, else with every byte outside printable ASCII
/// escaped (`\xff`), so that two different keys never print alike.
fn human(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => s.to_string(),
        Err(_) => b.escape_ascii().to_string(),
    }
}

/// `doc[field]` as written by [`bytes_field`] (or a bare string), for a person.
fn shown(doc: &Value, field: &str) -> String {
    if let Some(s) = doc.as_str().or_else(|| doc[field].as_str()) {
        return s.to_string();
    }
    doc[format!("{field}_base64")]
        .as_str()
        .and_then(base64::decode)
        .map(|b| human(&b))
        .unwrap_or_default()
}

fn revision(h: &Option<pb::ResponseHeader>) -> Option<i64> {
    h.as_ref().map(|h| h.revision)
}

/// A KV client that takes answers of any size: the node keeps them within its own limits
/// (`server.max_message_bytes`), which may be above the client library's 4 MiB default.
fn client(ch: lodge_grpc::client::Channel) -> KvClient<lodge_grpc::client::Channel> {
    KvClient::new(ch)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

/// Every page of a range, up to `limit` keys in all (0: every one): the first page's revision
/// and count, and the keys.
async fn range_pages(
    c: &mut KvClient<lodge_grpc::client::Channel>,
    mut req: pb::RangeRequest,
) -> Result<(Option<i64>, i64, Vec<pb::KeyValue>), tonic::Status> {
    let limit = req.limit;
    let mut first = None;
    let mut kvs = Vec::new();
    loop {
        let page = c.range(req.clone()).await?.into_inner();
        let (rev, count) = *first.get_or_insert((revision(&page.header), page.count));
        let more = page.more && !page.kvs.is_empty();
        if let Some(last) = page.kvs.last() {
            req.after = last.key.clone();
        }
        kvs.extend(page.kvs);
        let left = limit - kvs.len() as i64;
        if !more || (limit > 0 && left <= 0) {
            return Ok((rev, count, kvs));
        }
        if limit > 0 {
            req.limit = left;
        }
    }
}

/// Runs a kv subcommand; returns the exit code.
pub async fn run(conn: Connection, cmd: Kv) -> i32 {
    let result = match &cmd {
        Kv::Watch {
            key,
            prefix,
            rev,
            prev_kv,
            count,
        } => {
            let req = pb::WatchRequest {
                key: key.clone().into_bytes(),
                prefix: *prefix,
                start_revision: *rev,
                prev_kv: *prev_kv,
            };
            watch(&conn, req, *count).await
        }
        Kv::Lease {
            cmd: Lease::KeepAlive { id, once },
        } => keep_alive(&conn, *id, *once).await,
        _ => failover::call(&conn, |ch| unary(client(ch), &cmd))
            .await
            .map(|doc| print(&doc, conn.json)),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("lodge: {e}");
            1
        }
    }
}

async fn unary(
    mut c: KvClient<lodge_grpc::client::Channel>,
    cmd: &Kv,
) -> Result<Value, tonic::Status> {
    Ok(match cmd {
        Kv::Put { key, value, lease } => {
            let r = c
                .put(pb::PutRequest {
                    key: key.clone().into_bytes(),
                    value: value.clone().into_bytes(),
                    prev_kv: true,
                    lease: *lease,
                })
                .await?
                .into_inner();
            json!({"revision": revision(&r.header), "prev": r.prev_kv.as_ref().map(kv_json)})
        }
        Kv::Get {
            key,
            limit,
            serializable,
            ..
        }
        | Kv::Range {
            prefix: key,
            limit,
            serializable,
            ..
        } => {
            let prefix =
                matches!(cmd, Kv::Range { .. }) || matches!(cmd, Kv::Get { prefix: true, .. });
            let req = pb::RangeRequest {
                key: key.clone().into_bytes(),
                prefix,
                limit: *limit,
                serializable: *serializable,
                after: Vec::new(),
            };
            let (rev, count, kvs) = range_pages(&mut c, req).await?;
            json!({"revision": rev, "count": count, "kvs": kvs.iter().map(kv_json).collect::<Vec<_>>()})
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
            json!({"revision": revision(&r.header), "deleted": r.deleted})
        }
        Kv::Txn {
            conditions,
            then,
            otherwise,
        } => {
            let bad = tonic::Status::invalid_argument;
            let req = pb::TxnRequest {
                compare: conditions
                    .iter()
                    .map(|c| parse_compare(c))
                    .collect::<Result<_, _>>()
                    .map_err(bad)?,
                success: then
                    .iter()
                    .map(|o| parse_op(o))
                    .collect::<Result<_, _>>()
                    .map_err(bad)?,
                failure: otherwise
                    .iter()
                    .map(|o| parse_op(o))
                    .collect::<Result<_, _>>()
                    .map_err(bad)?,
            };
            let r = c.txn(req).await?.into_inner();
            let results: Vec<Value> = r
                .responses
                .iter()
                .map(|op| match &op.response {
                    Some(pb::response_op::Response::Get(g)) => {
                        json!({"get": g.kvs.iter().map(kv_json).collect::<Vec<_>>()})
                    }
                    Some(pb::response_op::Response::Put(p)) => {
                        json!({"put": {"prev": p.prev_kv.as_ref().map(kv_json)}})
                    }
                    Some(pb::response_op::Response::Delete(d)) => {
                        json!({"delete": {"deleted": d.deleted}})
                    }
                    None => Value::Null,
                })
                .collect();
            json!({"revision": revision(&r.header), "succeeded": r.succeeded, "responses": results})
        }
        Kv::Lease { cmd } => match cmd {
            Lease::Grant { ttl, id } => {
                let r = c
                    .lease_grant(pb::LeaseGrantRequest { ttl: *ttl, id: *id })
                    .await?
                    .into_inner();
                json!({"lease": r.id, "ttl": r.ttl, "revision": revision(&r.header)})
            }
            Lease::Revoke { id } => {
                let r = c
                    .lease_revoke(pb::LeaseRevokeRequest { id: *id })
                    .await?
                    .into_inner();
                json!({"revision": revision(&r.header), "deleted": r.deleted})
            }
            Lease::Ttl { id, keys } => {
                let r = c
                    .lease_time_to_live(pb::LeaseTimeToLiveRequest {
                        id: *id,
                        keys: *keys,
                    })
                    .await?
                    .into_inner();
                json!({"lease": r.id, "ttl": r.ttl, "granted_ttl": r.granted_ttl,
                       "keys": r.keys.iter().map(|k| key_json(k)).collect::<Vec<_>>(),
                       "keys_truncated": r.keys_truncated})
            }
            Lease::KeepAlive { .. } => unreachable!("streamed, not unary"),
        },
        Kv::Watch { .. } => unreachable!("streamed, not unary"),
    })
}

/// `KEY value|version|create|mod =|!=|>|< TARGET`.
fn parse_compare(s: &str) -> Result<pb::Compare, String> {
    let parts: Vec<&str> = s.splitn(4, ' ').collect();
    let [key, what, op, target] = parts[..] else {
        return Err(format!(
            "--if {s:?}: expected KEY value|version|create|mod =|!=|>|< TARGET"
        ));
    };
    let result = match op {
        "=" | "==" => pb::compare::Result::Equal,
        "!=" => pb::compare::Result::NotEqual,
        ">" => pb::compare::Result::Greater,
        "<" => pb::compare::Result::Less,
        _ => return Err(format!("--if {s:?}: {op:?} is not one of = != > <")),
    };
    let num = || {
        target
            .parse::<i64>()
            .map_err(|_| format!("--if {s:?}: {target:?} is not a number"))
    };
    use pb::compare::Target as T;
    let target = match what {
        "value" => T::Value(target.as_bytes().to_vec()),
        "version" => T::Version(num()?),
        "create" => T::CreateRevision(num()?),
        "mod" => T::ModRevision(num()?),
        _ => {
            return Err(format!(
                "--if {s:?}: {what:?} is not one of value, version, create, mod"
            ))
        }
    };
    Ok(pb::Compare {
        result: result as i32,
        key: key.as_bytes().to_vec(),
        target: Some(target),
    })
}

/// `put KEY VALUE`, `del KEY`, `delprefix PREFIX` or `get KEY`.
fn parse_op(s: &str) -> Result<pb::RequestOp, String> {
    use pb::request_op::Request as R;
    let parts: Vec<&str> = s.splitn(3, ' ').collect();
    let request = match parts[..] {
        ["put", key, value] => R::Put(pb::PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            prev_kv: true,
            lease: 0,
        }),
        ["del", key] | ["delprefix", key] => R::Delete(pb::DeleteRangeRequest {
            key: key.as_bytes().to_vec(),
            prefix: parts[0] == "delprefix",
            prev_kv: false,
        }),
        ["get", key] => R::Get(pb::RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        }),
        _ => {
            return Err(format!(
                "operation {s:?}: expected put KEY VALUE, del KEY, delprefix PREFIX or get KEY"
            ))
        }
    };
    Ok(pb::RequestOp {
        request: Some(request),
    })
}

async fn watch(conn: &Connection, req: pb::WatchRequest, count: usize) -> Result<(), String> {
    let start = req.start_revision;
    let (ep, channel) = failover::first_channel(conn).await?;
    let mut stream = client(channel)
        .watch(req)
        .await
        .map_err(|s| format!("{ep}: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let mut seen = 0;
    while let Some(msg) = stream.next().await {
        let msg = msg.map_err(|s| format!("{ep}: {:?}: {}", s.code(), s.message()))?;
        if msg.created {
            if !conn.json {
                let now = revision(&msg.header).unwrap_or(0) + 1;
                let from = if start > 0 { start } else { now };
                eprintln!("watching from revision {from}");
            }
            continue;
        }
        if msg.canceled {
            return Err(format!(
                "watch ended: {}; resume with --rev {}",
                msg.cancel_reason, msg.resume_revision
            ));
        }
        for e in &msg.events {
            let kind = if e.r#type == pb::event::EventType::Delete as i32 {
                "DELETE"
            } else {
                "PUT"
            };
            let kv = e.kv.clone().unwrap_or_default();
            if conn.json {
                println!(
                    "{}",
                    json!({"type": kind, "kv": kv_json(&kv), "prev": e.prev_kv.as_ref().map(kv_json), "prev_omitted": e.prev_kv_omitted})
                );
            } else {
                println!(
                    "{kind}\t{}\t{}\t(revision {})",
                    human(&kv.key),
                    human(&kv.value),
                    kv.mod_revision
                );
            }
            seen += 1;
            if count > 0 && seen >= count {
                return Ok(());
            }
        }
    }
    Err("the node ended the watch (shutting down?)".into())
}

async fn keep_alive(conn: &Connection, id: i64, once: bool) -> Result<(), String> {
    let (ep, channel) = failover::first_channel(conn).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut answers = client(channel)
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("{ep}: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    loop {
        tx.send(pb::LeaseKeepAliveRequest { id })
            .await
            .map_err(|_| "the keep-alive stream closed".to_string())?;
        let r = answers
            .message()
            .await
            .map_err(|s| format!("{ep}: {:?}: {}", s.code(), s.message()))?
            .ok_or("the node ended the keep-alive stream")?;
        if conn.json {
            println!("{}", json!({"lease": r.id, "ttl": r.ttl}));
        } else {
            println!("lease {} kept alive, ttl {} s", r.id, r.ttl);
        }
        if once {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(
            (r.ttl.max(1) as u64) * 1000 / 3,
        ))
        .await;
    }
}

fn print(doc: &Value, as_json: bool) {
    if as_json {
        println!("{doc}");
        return;
    }
    if let Some(kvs) = doc["kvs"].as_array() {
        for kv in kvs {
            println!("{}\t{}", shown(kv, "key"), shown(kv, "value"));
        }
    } else if let Some(ok) = doc["succeeded"].as_bool() {
        println!(
            "{} (revision {})",
            if ok { "SUCCEEDED" } else { "FAILED" },
            doc["revision"]
        );
        for r in doc["responses"].as_array().into_iter().flatten() {
            if let Some(kvs) = r["get"].as_array() {
                for kv in kvs {
                    println!("{}\t{}", shown(kv, "key"), shown(kv, "value"));
                }
            }
        }
    } else if let Some(id) = doc["lease"].as_i64() {
        if doc.get("granted_ttl").is_some() {
            println!(
                "lease {id}: {} s left of {} s",
                doc["ttl"], doc["granted_ttl"]
            );
            for k in doc["keys"].as_array().into_iter().flatten() {
                println!("{}", shown(k, "key"));
            }
            if doc["keys_truncated"] == true {
                println!("(more keys: the answer stops at the node's kv.range_page_bytes)");
            }
        } else {
            println!("lease {id} granted, ttl {} s", doc["ttl"]);
        }
    } else if let Some(n) = doc["deleted"].as_i64() {
        println!("deleted {n} (revision {})", doc["revision"]);
    } else {
        println!("OK (revision {})", doc["revision"]);
    }
}
