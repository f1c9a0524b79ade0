//! End-to-end: the client registry against real `lodge` processes.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{eventually, json_of, stderr, Node, Trio, LODGE};
use serde_json::Value;

/// Heartbeats every 500 ms; a registration lasts two intervals (its lease: 1 s).
const FAST: [(&str, &str); 2] = [
    ("LODGE_REGISTRY__HEARTBEAT_INTERVAL_MS", "500"),
    ("LODGE_REGISTRY__MAX_MISSED_HEARTBEATS", "2"),
];

fn client(endpoint: &str, args: &[&str]) -> Output {
    Command::new(LODGE)
        .arg("client")
        .args(args)
        .args(["--endpoint", endpoint, "--json"])
        .env_remove("LODGE_ENDPOINT")
        .output()
        .expect("running lodge client")
}

/// The JSON a command printed, whatever its exit status.
fn json_any(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("not JSON: {}", stderr(out)))
}

fn register(endpoint: &str, name: &str, instance: &str) -> Value {
    let out = client(
        endpoint,
        &[
            "register",
            "--name",
            name,
            "--namespace",
            "wiki",
            "--instance",
            instance,
        ],
    );
    json_of(out).expect("register answers JSON")
}

#[test]
fn registry_register_heartbeat_replace_and_expire() {
    // Registrations here live a minute: nothing expires while the checks run.
    let node = Node::start(&[]);
    let ep = node.grpc.as_str();

    let first = register(ep, "glooscap", "pod-a");
    assert_eq!(first["success"], true);
    assert_eq!(first["heartbeat_interval_ms"], 60_000);
    let id = first["client_id"].as_str().unwrap().to_string();

    let beat = json_of(client(ep, &["heartbeat", &id])).unwrap();
    assert_eq!(beat["success"], true, "{beat}");
    assert_eq!(beat["heartbeat_interval_ms"], 60_000);

    // Same identity again: the old registration is replaced, not left as a ghost.
    let second = register(ep, "glooscap", "pod-a");
    let id2 = second["client_id"].as_str().unwrap().to_string();
    assert_ne!(id, id2);
    assert_eq!(second["replaced_client_id"], id.as_str());
    let stale = client(ep, &["heartbeat", &id]);
    assert!(
        !stale.status.success(),
        "a refused heartbeat exits non-zero"
    );
    let stale = json_any(&stale);
    assert_eq!(stale["success"], false);
    assert_eq!(stale["re_register_required"], true);
    // A different instance is a different client.
    let other = register(ep, "glooscap", "pod-b");
    let listed = json_of(client(ep, &["list", "--namespace", "wiki"])).unwrap();
    let ids: Vec<&str> = listed["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["client_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{listed}");
    assert!(ids.contains(&id2.as_str()) && ids.contains(&other["client_id"].as_str().unwrap()));

    // The client's actor exists on the node, with its live state.
    let actor = node.ctl(&["actor", &format!("/node/registry/clients/{id2}"), "--json"]);
    let actor = json_of(actor).expect("client actor");
    assert_eq!(actor["state_dump"]["client_name"], "glooscap");

    // On a node whose registrations live 1 s: without heartbeats one expires (GetClient does
    // not renew it).
    let node = Node::start_env(&[], &FAST);
    let ep = node.grpc.as_str();
    let short = register(ep, "glooscap", "pod-c");
    assert_eq!(short["heartbeat_interval_ms"], 500);
    let id3 = short["client_id"].as_str().unwrap().to_string();
    eventually("registration expires", || {
        let out = client(ep, &["get", &id3]);
        (!out.status.success() && stderr(&out).contains("NotFound")).then_some(())
    });
    let late = json_any(&client(ep, &["heartbeat", &id3]));
    assert_eq!(late["re_register_required"], true);
    let metrics = node.scrape();
    let expired = metrics
        .lines()
        .find_map(|l| l.strip_prefix("lodge_registry_expirations_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("expirations metric");
    assert!(expired >= 1.0, "{expired}");
    assert!(
        metrics.contains("lodge_registry_heartbeats_total{outcome=\"re_register\"}"),
        "heartbeat outcomes are counted"
    );
}

#[test]
fn registry_rebuilds_client_actors_from_the_store_after_a_restart() {
    let node = Node::start(&[]);
    let listen = node.grpc.clone();
    let first = register(&listen, "restarts", "one");
    let id = first["client_id"].as_str().unwrap().to_string();
    let dir = node.kill9();
    let node = Node::start_in(dir, &listen, &[]);
    let ep = node.grpc.as_str();
    let actor = eventually("client actor rebuilt", || {
        json_of(node.ctl(&["actor", &format!("/node/registry/clients/{id}"), "--json"]))
    });
    assert_eq!(actor["state_dump"]["client_name"], "restarts");
    let beat = json_of(client(ep, &["heartbeat", &id])).expect("heartbeat after restart");
    assert_eq!(beat["success"], true);
    let got = json_of(client(ep, &["get", &id])).unwrap();
    assert_eq!(got["instance_id"], "one");
}

#[test]
fn registry_refuses_bad_input_naming_the_field() {
    let node = Node::start(&[]);
    let ep = node.grpc.as_str();
    let out = client(ep, &["register", "--name", "", "--namespace", "x"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("InvalidArgument: client_name: required"),
        "{}",
        stderr(&out)
    );
    let out = client(ep, &["register", "--name", "n", "--namespace", " "]);
    assert!(
        stderr(&out).contains("InvalidArgument: namespace: required"),
        "{}",
        stderr(&out)
    );
    let out = client(ep, &["heartbeat", ""]);
    assert!(
        stderr(&out).contains("InvalidArgument: client_id: required"),
        "{}",
        stderr(&out)
    );
    let out = client(ep, &["get", "c-nothere"]);
    assert!(
        stderr(&out).contains("NotFound: client_id: \"c-nothere\" is not registered"),
        "{}",
        stderr(&out)
    );
    let beat = json_any(&client(ep, &["heartbeat", "c-nothere"]));
    assert_eq!(beat["success"], false);
    assert_eq!(beat["re_register_required"], true);
}

/// `lodge client run`, read line by line.
struct Running {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl Running {
    fn start(endpoints: &str, name: &str) -> Running {
        let mut child = Command::new(LODGE)
            .args(["client", "run", "--name", name, "--namespace", "wiki"])
            .args(["--endpoint", endpoints, "--json"])
            .env_remove("LODGE_ENDPOINT")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("lodge client run");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&l) {
                    let _ = tx.send(v);
                }
            }
        });
        Running { child, lines }
    }

    /// The first status line satisfying `f` (the bound only turns a hang into a failure).
    fn until(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if f(&v) => return v,
                Ok(_) => continue,
                Err(_) => panic!("{what}: no such status line"),
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn registry_client_keeps_its_registration_when_its_member_dies() {
    // Beats every 500 ms; the lease (10 s) outlives the failover and the election with room.
    let toml = "[registry]\nheartbeat_interval_ms = 500\nmax_missed_heartbeats = 20\n";
    let trio = Trio::new(toml, &[]);
    let nodes: Vec<Node> = (0..3)
        .map(|i| trio.start(i, tempfile::tempdir().unwrap()))
        .collect();
    let endpoints = (0..3).map(|i| trio.addr(i)).collect::<Vec<_>>().join(",");
    let run = Running::start(&endpoints, "survivor");
    let first = run.until("registered on member 1", |v| {
        v["client_id"].is_string() && v["connected"] == true
    });
    let id = first["client_id"].as_str().unwrap().to_string();
    let used = first["endpoint"].as_str().unwrap().to_string();
    // Every member knows the registration (it is replicated).
    for n in &nodes {
        eventually("registration replicated", || {
            let out = client(&n.grpc, &["get", &id]);
            out.status.success().then_some(())
        });
    }

    // Kill the member the client talks to.
    let (gone, rest): (Vec<Node>, Vec<Node>) = nodes.into_iter().partition(|n| n.grpc == used);
    for n in gone {
        drop(n.kill9());
    }
    let moved = run.until("reconnected elsewhere", |v| {
        v["connected"] == true && v["endpoint"] != used.as_str()
    });
    assert_eq!(
        moved["client_id"],
        id.as_str(),
        "same registration after failover"
    );
    // Heartbeats go on with the same id on the surviving members (the client may move once
    // more while the election settles, so count them all).
    let ep = moved["endpoint"].as_str().unwrap().to_string();
    let beats = || -> u64 {
        rest.iter()
            .filter_map(|n| {
                let actor = n.ctl(&["actor", &format!("/node/registry/clients/{id}"), "--json"]);
                json_of(actor)?["state_dump"]["beats_here"].as_u64()
            })
            .sum()
    };
    let before = beats();
    eventually("heartbeats go on after the failover", || {
        (beats() >= before + 6).then_some(())
    });
    let info = json_of(client(&ep, &["get", &id])).unwrap();
    assert_eq!(info["client_name"], "survivor");
    assert_eq!(moved["registrations"], 1, "no re-registration was needed");
}
