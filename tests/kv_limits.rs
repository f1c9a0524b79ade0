//! End-to-end: no single KV call breaks a node or the cluster. A lease id at the top of the id
//! space, an oversized key, value, transaction or request message are refused naming what
//! refused them; a prefix of values up to the limit is read and watched to the end, page by page
//! and message by message, by clients at gRPC's default 4 MiB message limit. After each, the
//! cluster serves reads and writes and grants leases.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{eventually, json_of, kv, leader_of, stderr, stdout, Node, Trio, LODGE};
use lodge_grpc::pb::kv::kv_client::KvClient;
use lodge_grpc::pb::kv::{
    request_op, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, WatchRequest,
    WatchResponse,
};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// `kv.max_value_bytes` by default.
const MAX_VALUE: usize = 1 << 20;

/// The value of a series on a metrics page (0 when absent).
fn series(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn rejections(node: &Node, limit: &str) -> f64 {
    series(
        &node.scrape(),
        &format!("lodge_limit_rejections_total{{limit=\"{limit}\"}}"),
    )
}

async fn channel(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap()
}

/// The cluster still serves: a write, a linearizable read of it, a lease the store picks the id
/// of, and a key put with that lease.
fn serves(endpoints: &str) {
    let out = kv(endpoints, &["put", "after/check", "ok"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        common::get(endpoints, "after/check", false).as_deref(),
        Some("ok")
    );
    let grant =
        json_of(kv(endpoints, &["lease", "grant", "30", "--json"])).expect("a lease is granted");
    let id = grant["lease"].as_i64().expect("a lease id");
    assert!(id > 0, "{grant}");
    let out = kv(
        endpoints,
        &["put", "after/leased", "v", "--lease", &id.to_string()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_lease_id_at_the_top_is_refused_and_leases_keep_being_granted() {
    let node = Node::start(&[]);
    let ep = node.grpc.as_str();
    let out = kv(ep, &["lease", "grant", "10", "--id", "9223372036854775807"]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("InvalidArgument: id: 9223372036854775807 is outside 1..=4611686018427387904"),
        "{e}"
    );
    // The largest id a client may ask for is granted, and the store picks the ids after it.
    let top = json_of(kv(
        ep,
        &[
            "lease",
            "grant",
            "10",
            "--id",
            "4611686018427387904",
            "--json",
        ],
    ))
    .expect("the top client id is granted");
    assert_eq!(top["lease"], 4_611_686_018_427_387_904_i64);
    let next = json_of(kv(ep, &["lease", "grant", "10", "--json"])).expect("granted");
    assert_eq!(next["lease"], 4_611_686_018_427_387_905_i64);
    // The registry, which takes a lease per registration, still registers.
    let out = Command::new(LODGE)
        .args([
            "client",
            "register",
            "--name",
            "after",
            "--namespace",
            "wiki",
        ])
        .args(["--instance", "pod-a", "--endpoint", ep, "--json"])
        .env_remove("LODGE_ENDPOINT")
        .output()
        .unwrap();
    let reg = json_of(out).expect("register answers");
    assert_eq!(reg["success"], true, "{reg}");
    serves(ep);
}

/// Puts `key` exactly once as the test's counts of events need, on a loaded machine where an
/// election may come in between: an UNAVAILABLE put is tried again unless the key already holds
/// the value (a put whose outcome was unknown and that had been applied). Every value the test
/// writes differs from the key's previous one.
async fn put_until_done(c: &mut KvClient<Channel>, key: Vec<u8>, value: Vec<u8>) {
    for _ in 0..100 {
        match c.put(put_req(key.clone(), value.clone())).await {
            Ok(_) => return,
            Err(s) if s.code() == Code::Unavailable => {
                // Whether it was applied, once the cluster answers reads again.
                let mut holds = None;
                for _ in 0..100 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let read = RangeRequest {
                        key: key.clone(),
                        ..Default::default()
                    };
                    if let Ok(r) = c.range(read).await {
                        holds = Some(
                            r.into_inner()
                                .kvs
                                .first()
                                .is_some_and(|kv| kv.value == value),
                        );
                        break;
                    }
                }
                if holds.expect("the cluster answers reads again") {
                    return;
                }
            }
            Err(s) => panic!("put: {s:?}"),
        }
    }
    panic!("put: still unavailable after 100 tries");
}

fn put_req(key: Vec<u8>, value: Vec<u8>) -> PutRequest {
    PutRequest {
        key,
        value,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_keys_values_transactions_and_messages_are_refused_naming_their_limit() {
    let node = Node::start(&[]);
    let ep = node.grpc.clone();
    let mut c = KvClient::new(channel(&ep).await).max_encoding_message_size(usize::MAX);

    let s = c
        .put(put_req(vec![b'k'; 1 << 20], b"v".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert_eq!(
        s.message(),
        "key: 1048576 bytes is over kv.max_key_bytes (4096)"
    );
    let s = c
        .put(put_req(b"big".to_vec(), vec![b'v'; MAX_VALUE + 1]))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert_eq!(
        s.message(),
        "value: 1048577 bytes is over kv.max_value_bytes (1048576)"
    );
    // Over the message limit: refused by the transport after the length prefix, and named.
    let s = c
        .put(put_req(b"huge".to_vec(), vec![b'v'; 64 << 20]))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(
        s.message().starts_with("request: a message of 67108")
            && s.message()
                .ends_with("bytes is over server.max_message_bytes (4194304)"),
        "{s:?}"
    );
    let many = TxnRequest {
        success: (0..129)
            .map(|i| RequestOp {
                request: Some(request_op::Request::Put(put_req(
                    format!("t/{i}").into_bytes(),
                    b"v".to_vec(),
                ))),
            })
            .collect(),
        ..Default::default()
    };
    let s = c.txn(many).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert_eq!(
        s.message(),
        "success: 129 operations is over kv.max_txn_ops (128)"
    );
    // A value at the limit is stored and read back whole.
    c.put(put_req(b"max".to_vec(), vec![b'm'; MAX_VALUE]))
        .await
        .unwrap();
    let r = c
        .range(RangeRequest {
            key: b"max".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.kvs[0].value.len(), MAX_VALUE);
    // The CLI says the same.
    let long = "k".repeat(5000);
    let out = kv(&ep, &["put", &long, "v"]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("ResourceExhausted: key: 5000 bytes is over kv.max_key_bytes (4096)"),
        "{e}"
    );
    // Each refusal is counted under its limit.
    assert_eq!(rejections(&node, "kv_key_bytes"), 2.0);
    assert_eq!(rejections(&node, "kv_value_bytes"), 1.0);
    assert_eq!(rejections(&node, "message_bytes"), 1.0);
    assert_eq!(rejections(&node, "kv_txn_ops"), 1.0);
    serves(&ep);
}

/// The messages of a watch on `big/` from `start`, up to the last one of revision `until`.
async fn watch_until(addr: &str, start: i64, until: i64) -> Vec<WatchResponse> {
    // gRPC's default 4 MiB message limit: every message fits in it.
    let mut stream = KvClient::new(channel(addr).await)
        .watch(WatchRequest {
            key: b"big/".to_vec(),
            prefix: true,
            start_revision: start,
            prev_kv: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("the watch goes on (bound only turns a hang into a failure)")
            .unwrap_or_else(|s| panic!("the watch failed: {s:?}"))
            .expect("the watch is open");
        assert!(!m.canceled, "{}", m.cancel_reason);
        if m.created {
            continue;
        }
        let done = m.header.unwrap().revision == until && !m.fragment;
        out.push(m);
        if done {
            return out;
        }
    }
}

fn key(i: usize) -> Vec<u8> {
    format!("big/{i:02}").into_bytes()
}

/// Values up to the limit, printable (the CLI prints them).
fn value(i: usize, round: u8) -> Vec<u8> {
    let len = if i % 3 == 2 { 100 } else { MAX_VALUE - i };
    vec![b'a' + round * 10 + i as u8; len]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_of_values_up_to_the_limit_is_ranged_and_watched_to_the_end_page_by_page() {
    const N: usize = 7;
    let trio = Trio::new("", &[]);
    let nodes: Vec<Node> = (0..3)
        .map(|i| trio.start(i, tempfile::tempdir().unwrap()))
        .collect();
    let all = (0..3).map(|i| trio.addr(i)).collect::<Vec<_>>().join(",");
    let leader = eventually("a leader", || leader_of(&nodes[0]));
    // A follower: writes and linearizable reads through it are forwarded to the leader.
    let f = trio.addr(if leader == 1 { 1 } else { 0 });
    let mut c = KvClient::new(channel(&f).await);
    for i in 0..N {
        put_until_done(&mut c, key(i), value(i, 0)).await;
    }

    // Page by page to the end.
    let mut after = Vec::new();
    let mut pages = 0;
    let mut read = Vec::new();
    loop {
        let page = c
            .range(RangeRequest {
                key: b"big/".to_vec(),
                prefix: true,
                after: after.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(!page.kvs.is_empty());
        if pages == 1 {
            assert_eq!(page.count, N as i64);
        }
        after = page.kvs.last().unwrap().key.clone();
        read.extend(page.kvs);
        if !page.more {
            break;
        }
    }
    assert!(pages >= 3, "{pages} pages of 3 MiB for ~5 MiB");
    assert_eq!(read.len(), N);
    for (i, kv) in read.iter().enumerate() {
        assert_eq!((kv.key.clone(), kv.value.clone()), (key(i), value(i, 0)));
    }
    // The CLI reads every page; --limit still limits.
    let every = json_of(kv(&f, &["get", "big/", "--prefix", "--json"])).expect("CLI range");
    let kvs = every["kvs"].as_array().unwrap();
    assert_eq!((kvs.len(), every["count"].as_i64()), (N, Some(N as i64)));
    assert_eq!(
        kvs[N - 1]["value"].as_str().unwrap().len(),
        value(N - 1, 0).len()
    );
    let three = json_of(kv(
        &f,
        &["get", "big/", "--prefix", "--limit", "3", "--json"],
    ))
    .expect("CLI range with a limit");
    assert_eq!(three["kvs"].as_array().unwrap().len(), 3);

    // Every value again (events with previous values of up to 1 MiB), then the whole prefix
    // deleted at one revision (N events with their previous values).
    for i in 0..N {
        put_until_done(&mut c, key(i), value(i, 1)).await;
    }
    let del = c
        .delete_range(DeleteRangeRequest {
            key: b"big/".to_vec(),
            prefix: true,
            prev_kv: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(del.deleted, N as i64);
    assert!(
        del.prev_kvs_truncated && !del.prev_kvs.is_empty() && del.prev_kvs.len() < N,
        "{} previous values",
        del.prev_kvs.len()
    );
    let del_rev = del.header.unwrap().revision;

    // Watched from the start with previous values: every event, the delete in fragments.
    let messages = watch_until(&f, 1, del_rev).await;
    let events: Vec<_> = messages.iter().flat_map(|m| &m.events).collect();
    assert_eq!(events.len(), 3 * N);
    for (i, e) in events[N..2 * N].iter().enumerate() {
        let prev = e
            .prev_kv
            .as_ref()
            .expect("a put over a value has its previous value");
        assert_eq!(prev.value, value(i, 0));
        assert_eq!(e.kv.as_ref().unwrap().value, value(i, 1));
    }
    let of_delete: Vec<_> = messages
        .iter()
        .filter(|m| m.header.unwrap().revision == del_rev)
        .collect();
    assert!(of_delete.len() >= 2, "the delete's events are split");
    assert!(of_delete[..of_delete.len() - 1].iter().all(|m| m.fragment));
    assert!(events[2 * N..].iter().enumerate().all(|(i, e)| e
        .prev_kv
        .as_ref()
        .map(|p| p.value.clone())
        == Some(value(i, 1))));
    // Resumed at the delete's revision: all of it again.
    let again = watch_until(&f, del_rev, del_rev).await;
    assert_eq!(again.iter().map(|m| m.events.len()).sum::<usize>(), N);
    // The CLI watches to the end too.
    let out = Command::new(LODGE)
        .args([
            "kv",
            "--endpoint",
            &f,
            "watch",
            "big/",
            "--prefix",
            "--rev",
            "1",
        ])
        .args(["--prev-kv", "--count", &(3 * N).to_string(), "--json"])
        .env_remove("LODGE_ENDPOINT")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 3 * N);
    serves(&all);
}
