//! End-to-end: raft members as separate `lodge` processes on loopback.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Retries `f` until it succeeds; the bound only turns a hang into a failure.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not reached in 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn get(endpoints: &str, key: &str, serializable: bool) -> Option<String> {
    let mut args = vec!["get", key, "--json"];
    if serializable {
        args.push("--serializable");
    }
    let out = kv(endpoints, &args);
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_str(&stdout(&out)).ok()?;
    v["kvs"][0]["value"].as_str().map(String::from)
}

fn leader_of(node: &Node) -> Option<u64> {
    let out = node.ctl(&["actor", "/node/cluster/raft", "--json"]);
    let v: Value = serde_json::from_str(&stdout(&out)).ok()?;
    v["state_dump"]["leader"].as_u64()
}

/// Three members on loopback ports chosen now, sharing one configuration file.
struct Trio {
    ports: Vec<u16>,
    initial: String,
    config: String,
    extra: Vec<&'static str>,
    _dir: tempfile::TempDir,
}

impl Trio {
    /// `toml` configures every member; `extra` flags go to every member too.
    fn new(toml: &str, extra: &[&'static str]) -> Self {
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let initial = (0..3)
            .map(|i| format!("{}=127.0.0.1:{}", i + 1, ports[i]))
            .collect::<Vec<_>>()
            .join(",");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("cluster.toml");
        std::fs::write(&config, toml).unwrap();
        Self {
            ports,
            initial,
            config: config.display().to_string(),
            extra: extra.to_vec(),
            _dir: dir,
        }
    }

    /// The gRPC address of member index `i` (0-based; its id is `i + 1`).
    fn addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.ports[i])
    }

    /// Starts member index `i` keeping its data in `dir` (reused across restarts).
    fn start(&self, i: usize, dir: tempfile::TempDir) -> Node {
        let id = (i + 1).to_string();
        let mut args = vec!["--node-id", id.as_str(), "--config", self.config.as_str()];
        args.extend(["--initial-cluster", self.initial.as_str()]);
        args.extend(self.extra.iter().copied());
        Node::start_in(dir, &self.addr(i), &args)
    }
}

#[test]
fn a_single_node_keeps_acknowledged_writes_across_a_restart() {
    let node = Node::start(&[]);
    assert!(kv(&node.grpc, &["put", "k", "v"]).status.success());
    let listen = node.grpc.clone();
    let dir = node.kill9();
    let node = Node::start_in(dir, &listen, &[]);
    let seen = eventually("the restarted node answers", || get(&node.grpc, "k", false));
    assert_eq!(seen, "v");
    let bad = kv(&node.grpc, &["put", "", "x"]);
    assert!(
        stderr(&bad).contains("InvalidArgument") && stderr(&bad).contains("key"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn three_members_replicate_survive_a_kill_9_of_the_leader_and_the_killed_member_catches_up() {
    let trio = Trio::new("[cluster]\ntick_ms = 20\n", &[]);
    let addr = |i: usize| trio.addr(i);
    let mut nodes: Vec<Option<Node>> = (0..3)
        .map(|i| Some(trio.start(i, tempfile::tempdir().unwrap())))
        .collect();
    let all = (0..3).map(addr).collect::<Vec<_>>().join(",");

    // Writes may reach any member: followers forward them to the leader.
    eventually("a first write", || {
        kv(&addr(1), &["put", "k0", "v0"])
            .status
            .success()
            .then_some(())
    });
    for i in 0..3 {
        // A linearizable read on every member: followers ask the leader for the read index.
        assert_eq!(
            eventually("replicated", || get(&addr(i), "k0", false)),
            "v0"
        );
    }

    // Kill the leader with writes going on; a new leader takes over and nothing acknowledged is lost.
    let leader = eventually("a leader", || leader_of(nodes[0].as_ref().unwrap())) as usize;
    let mut acked = vec!["k0".to_string()];
    for n in 1..=5 {
        assert!(kv(&all, &["put", &format!("k{n}"), &format!("v{n}")])
            .status
            .success());
        acked.push(format!("k{n}"));
    }
    let dead_dir = nodes[leader - 1].take().unwrap().kill9();
    let alive: Vec<String> = (0..3).filter(|i| *i != leader - 1).map(addr).collect();
    let alive_eps = alive.join(",");
    let killed_at = Instant::now();
    eventually("a write after the leader died", || {
        kv(&alive_eps, &["put", "after", "kill"])
            .status
            .success()
            .then_some(())
    });
    eprintln!(
        "first write after kill -9 of the leader: {:?}",
        killed_at.elapsed()
    );
    acked.push("after".into());
    for ep in &alive {
        for k in &acked {
            assert!(get(ep, k, false).is_some(), "{k} missing on {ep}");
        }
    }

    // The killed member restarts from its data directory and catches up.
    let back = trio.start(leader - 1, dead_dir);
    let seen = eventually("the restarted member catches up", || {
        get(&back.grpc, "after", true)
    });
    assert_eq!(seen, "kill");
    nodes[leader - 1] = Some(back);
}

#[test]
fn a_stale_leader_cut_off_by_injected_faults_serves_no_linearizable_read_and_catches_up_after() {
    // Short request timeout: a read the stale leader cannot confirm fails within the test.
    let trio = Trio::new(
        "[cluster]\ntick_ms = 20\n[server]\nrequest_timeout_ms = 1500\n",
        &["--allow-mutations"],
    );
    let addr = |i: usize| trio.addr(i);
    let nodes: Vec<Node> = (0..3)
        .map(|i| trio.start(i, tempfile::tempdir().unwrap()))
        .collect();
    eventually("a first write", || {
        kv(&addr(0), &["put", "k", "before"])
            .status
            .success()
            .then_some(())
    });
    let old = eventually("a leader", || leader_of(&nodes[0])) as usize;
    let others: Vec<usize> = (1..=3).filter(|i| *i != old).collect();

    // Cut the leader off from both others, at the leader itself (drops both ways).
    let drop = others
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let out = nodes[old - 1].ctl(&["faults", "--drop", &drop]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("drop_peers"), "{}", stdout(&out));

    // The majority elects a new leader and takes writes.
    let majority = others
        .iter()
        .map(|i| addr(i - 1))
        .collect::<Vec<_>>()
        .join(",");
    let new = eventually("a new leader", || {
        leader_of(&nodes[others[0] - 1]).filter(|l| *l as usize != old)
    }) as usize;
    assert!(others.contains(&new));
    eventually("a write on the majority", || {
        kv(&majority, &["put", "k", "after"])
            .status
            .success()
            .then_some(())
    });

    // The stale leader can confirm nothing: no linearizable read, no write.
    assert!(
        get(&addr(old - 1), "k", false).is_none(),
        "a stale leader served a linearizable read"
    );
    assert!(!kv(&addr(old - 1), &["put", "k", "stale"]).status.success());
    // Its own state still says "before" (serializable reads are allowed to be stale).
    assert_eq!(get(&addr(old - 1), "k", true).as_deref(), Some("before"));

    // Healed, it catches up.
    assert!(nodes[old - 1].ctl(&["faults"]).status.success());
    assert_eq!(
        eventually("the old leader catches up", || get(
            &addr(old - 1),
            "k",
            false
        )),
        "after"
    );
    let refused = Node::start(&[]).ctl(&["faults", "--drop", "2"]);
    assert!(
        stderr(&refused).contains("PermissionDenied"),
        "{}",
        stderr(&refused)
    );
}
