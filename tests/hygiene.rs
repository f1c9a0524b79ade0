//! Issue 15's smaller defects, end to end: echoed input in status messages, a stopped listener's
//! port, lossless keys in `--json`, a closed stdout pipe, and the address in a bind error.

mod common;

use std::io::ErrorKind;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{eventually, kv, stderr, stdout, Node, LODGE};
use lodge_grpc::pb::balancer as lb;
use lodge_grpc::pb::balancer::balancer_client::BalancerClient;
use lodge_grpc::pb::kv::{self as pb, kv_client::KvClient};
use tonic::Code;

/// Bound on a process expected to exit by itself; only turns a hang into a failure.
const EXIT: Duration = Duration::from_secs(20);

/// A node configuration file (kept in the returned directory).
fn config(toml: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(&path, toml).unwrap();
    let p = path.display().to_string();
    (dir, p)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_request_with_a_huge_path_is_not_found_with_a_short_message() {
    let node = Node::start(&[]);
    let mut c = BalancerClient::connect(format!("http://{}", node.grpc))
        .await
        .unwrap();
    let path = format!("/{}", "a".repeat(20_000));
    let e = c
        .route_request(lb::RouteQuery {
            protocol: lb::Protocol::Http as i32,
            destination: "h".repeat(5_000),
            path,
            ..Default::default()
        })
        .await
        .unwrap_err();
    // Before: the whole path went into grpc-message and the client refused the headers
    // (RESOURCE_EXHAUSTED). Now: the call's own NOT_FOUND, the path cut with its length.
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().len() < 400, "{}", e.message());
    assert!(
        e.message()
            .contains(&format!("path \"/{}\"… (20001 bytes)", "a".repeat(63))),
        "{}",
        e.message()
    );
    assert!(e.message().contains("… (5000 bytes)"), "{}", e.message());

    // Other echoed values are cut the same way (the admin RPC's unknown path).
    let out = node.ctl(&["actor", &format!("/node/{}", "x".repeat(20_000))]);
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains("(20006 bytes)") && err.len() < 400,
        "{err}"
    );
}

/// Whether a TCP connection to `addr` is refused now (`false`: it was accepted).
fn refused(addr: &str) -> bool {
    match TcpStream::connect(addr) {
        Ok(_) => false,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => true,
        Err(e) => panic!("connecting to {addr}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_listener_releases_its_port_and_a_restarted_one_binds_it_again() {
    let (_cfg, path) = config("[balancer]\nlisten = [\"127.0.0.1:0\"]\n");
    let node = Node::start(&["--config", &path, "--allow-mutations"]);
    let mut c = BalancerClient::connect(format!("http://{}", node.grpc))
        .await
        .unwrap();
    let status = c
        .get_nlb_status(lb::GetNlbStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let data = status.listeners[0].clone();
    assert!(!refused(&data), "the listener accepts before the stop");

    let listener = "/node/balancer/listeners/0";
    let out = node.ctl(&["stop", listener]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The port is closed, not merely left without anyone accepting: clients are refused at once
    // instead of hanging in the backlog.
    eventually("the stopped listener's port is released", || {
        refused(&data).then_some(())
    });

    // An operator's restart brings it back on the same address.
    let out = node.ctl(&["restart", listener]);
    assert!(out.status.success(), "{}", stderr(&out));
    eventually("the restarted listener accepts again", || {
        (!refused(&data)).then_some(())
    });
    let out = node.ctl(&["actor", listener, "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let state = &doc["state_dump"];
    assert_eq!(state["accepting"], true, "{doc}");
    assert_eq!(state["address"], data.as_str(), "{doc}");
}

#[tokio::test(flavor = "multi_thread")]
async fn json_output_keeps_keys_and_values_that_are_not_utf8() {
    let node = Node::start(&[]);
    // The CLI waits out the first election; the gRPC client then finds a leader.
    let out = kv(&node.grpc, &["put", "bin/text", "héllo"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let key = b"bin/\xff\x00k".to_vec();
    let value = b"\x80\x81v".to_vec();
    let mut c = KvClient::connect(format!("http://{}", node.grpc))
        .await
        .unwrap();
    c.put(pb::PutRequest {
        key: key.clone(),
        value: value.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    let decoded = |v: &serde_json::Value, field: &str| {
        lodge_actors::base64::decode(v[format!("{field}_base64")].as_str().unwrap()).unwrap()
    };
    let out = kv(&node.grpc, &["get", "bin/", "--prefix", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let kvs = doc["kvs"].as_array().unwrap();
    // Key order: "bin/t..." before "bin/\xff...".
    assert_eq!(kvs[0]["key"], "bin/text", "{doc}");
    assert_eq!(kvs[0]["value"], "héllo", "{doc}");
    assert!(kvs[0].get("key_base64").is_none(), "{doc}");
    assert_eq!(decoded(&kvs[1], "key"), key, "{doc}");
    assert_eq!(decoded(&kvs[1], "value"), value, "{doc}");
    assert!(
        kvs[1].get("key").is_none() && kvs[1].get("value").is_none(),
        "{doc}"
    );

    // The same in a watch, and escaped (not replaced) in text.
    let out = kv(
        &node.grpc,
        &[
            "watch", "bin/", "--prefix", "--rev", "1", "--count", "2", "--json",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let events: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0]["kv"]["key"], "bin/text");
    assert_eq!(decoded(&events[1]["kv"], "key"), key);
    assert_eq!(decoded(&events[1]["kv"], "value"), value);
    let out = kv(&node.grpc, &["get", "bin/", "--prefix"]);
    assert_eq!(
        stdout(&out),
        "bin/text\théllo\nbin/\\xff\\x00k\t\\x80\\x81v\n"
    );
}

#[test]
fn a_command_whose_reader_has_gone_exits_quietly() {
    let node = Node::start(&[]);
    // A pipe with no reader at all: the first write fails, whenever it comes.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let child = Command::new(LODGE)
        .args(["ctl", "--endpoint", &node.grpc, "info"])
        .env_remove("LODGE_ENDPOINT")
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    // Without a panic or a word, and with the status a shell shows for `ls | head` (141).
    assert_eq!(out.status.code(), Some(141), "{:?}", out.status);
    assert_eq!(stderr(&out), "");
}

/// Starts a node with `args` and expects it to fail at once; answers its stderr.
fn fails_to_start(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(LODGE)
        .arg("node")
        .args(args)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env_remove("LODGE_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let status = common::wait_child(child, EXIT).expect("the node exits by itself");
    let mut text = String::new();
    std::io::Read::read_to_string(&mut err, &mut text).unwrap();
    assert_eq!(status.code(), Some(1), "{text}");
    text
}

#[test]
fn a_port_in_use_is_named_with_its_address_and_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();

    let err = fails_to_start(&["--listen", &addr, "--metrics-listen", "127.0.0.1:0"]);
    let want = format!("lodge: cannot listen on {addr} (server.listen): address in use");
    assert!(err.lines().any(|l| l == want), "{err}");
    let err = fails_to_start(&["--listen", "127.0.0.1:0", "--metrics-listen", &addr]);
    let want = format!("lodge: cannot listen on {addr} (metrics.listen): address in use");
    assert!(err.lines().any(|l| l == want), "{err}");
    let (_cfg, path) = config(&format!("[balancer]\nlisten = [\"{addr}\"]\n"));
    let err = fails_to_start(&[
        "--config",
        &path,
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let want = format!("lodge: cannot listen on {addr} (balancer.listen): address in use");
    assert!(err.lines().any(|l| l == want), "{err}");
}
