//! End-to-end: raft members as separate `lodge` processes on loopback.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

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
    // Compactions every 16 entries: the killed member restarts from its state engine over a
    // compacted log, and may need a snapshot read from a survivor's engine.
    let trio = Trio::new("[cluster]\ntick_ms = 20\nsnapshot_interval = 16\n", &[]);
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

    // Kill the leader under a steady write load; a new leader takes over and nothing
    // acknowledged is lost.
    let leader = eventually("a leader", || leader_of(nodes[0].as_ref().unwrap())) as usize;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (all, stop) = (all.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut acked = vec!["k0".to_string()];
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let key = format!("w{n}");
                if kv(&all, &["put", &key, "v"]).status.success() {
                    acked.push(key);
                }
            }
            acked
        })
    };
    // Some writes before the kill, whatever the machine's speed.
    eventually("writes under way", || get(&all, "w5", true).map(|_| ()));
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
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = writer.join().unwrap();
    acked.push("after".into());
    eprintln!("{} writes acknowledged around the kill", acked.len());
    // Every acknowledged write, on every surviving member, from its own state once it has
    // applied the last one.
    for ep in &alive {
        eventually("caught up", || get(ep, "after", true));
        let out = kv(ep, &["get", "", "--prefix", "--serializable", "--json"]);
        let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
        let keys: std::collections::HashSet<&str> = v["kvs"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|kv| kv["key"].as_str())
            .collect();
        for k in &acked {
            assert!(keys.contains(k.as_str()), "{k} missing on {ep}");
        }
    }

    // The killed member restarts from its data directory and catches up.
    let back = trio.start(leader - 1, dead_dir);
    let seen = eventually("the restarted member catches up", || {
        get(&back.grpc, "after", true)
    });
    assert_eq!(seen, "kill");
    // Its state is the survivors', revision for revision: nothing was applied twice or lost.
    eventually("a last write", || {
        kv(&alive_eps, &["put", "last", "x"])
            .status
            .success()
            .then_some(())
    });
    let listing = |ep: &str| {
        let out = kv(ep, &["get", "", "--prefix", "--serializable", "--json"]);
        let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
        let kvs = v["kvs"].as_array().unwrap().clone();
        kvs.iter()
            .map(|kv| (kv["key"].clone(), kv["mod_revision"].clone()))
            .collect::<Vec<_>>()
    };
    // Equal once both applied the same entries (members write records of their own now and
    // then, so one pair of listings may straddle such a write).
    eventually("the same keys at the same revisions", || {
        let here = listing(&back.grpc);
        (here.iter().any(|(k, _)| k == "last") && here == listing(&alive[0])).then_some(())
    });
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

/// Puts `k = v`, again if an election made the outcome unknown (the same put twice is harmless
/// here; what these tests check is elsewhere).
fn put_eventually(endpoints: &str, k: &str, v: &str) {
    eventually(&format!("put {k}"), || {
        kv(endpoints, &["put", k, v]).status.success().then_some(())
    });
}

fn members(endpoints: &str) -> Option<Value> {
    json_of(cluster(endpoints, &["members", "--json"]))
}

/// (id, role) of every member, in id order.
fn roles(topology: &Value) -> Vec<(u64, String)> {
    topology["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["id"].as_u64().unwrap_or(0),
                m["role"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn a_fourth_node_joins_through_a_follower_catches_up_from_a_snapshot_and_a_member_is_removed() {
    // Snapshots every 20 entries: the log a joiner needs is compacted away, so it must be sent a
    // snapshot (LauraDB's InitialSync).
    let trio = Trio::new("[cluster]\ntick_ms = 20\nsnapshot_interval = 20\n", &[]);
    let nodes: Vec<Node> = (0..3)
        .map(|i| trio.start(i, tempfile::tempdir().unwrap()))
        .collect();
    let all = (0..3).map(|i| trio.addr(i)).collect::<Vec<_>>().join(",");
    for n in 0..60 {
        put_eventually(&all, &format!("k{n}"), &format!("v{n}"));
    }
    let before = members(&all).expect("topology");
    let v0 = before["version"].as_u64().unwrap();

    let leader = eventually("a leader", || leader_of(&nodes[0]));
    let follower = (1..=3).find(|i| *i != leader).unwrap() as usize;
    let joiner = Node::start(&[
        "--node-id",
        "4",
        "--join",
        &trio.peer(follower - 1),
        "--config",
        &trio.config,
    ]);
    // Four voters, the version up by two (added as a learner, then promoted).
    let after = eventually("node 4 is a voter", || {
        let t = members(&all)?;
        (roles(&t).contains(&(4, "voter".into()))).then_some(t)
    });
    assert_eq!(after["version"].as_u64(), Some(v0 + 2));
    assert_eq!(
        eventually("node 4 has the data", || get(&joiner.grpc, "k59", true)),
        "v59"
    );
    let status = json_of(cluster(&joiner.grpc, &["status", "--json"])).unwrap();
    assert!(
        status["snapshot_index"].as_u64().unwrap() > 1,
        "node 4 caught up from a snapshot: {status}"
    );
    // Its own member actor is there, and it hears from the others.
    eventually("an actor per member on node 4", || {
        let out = joiner.ctl(&["actors", "--kind", "member", "--json"]);
        (stdout(&out).matches("/node/cluster/members/").count() == 4).then_some(())
    });

    // Registering a taken id at another address changes nothing.
    let out = cluster(&all, &["add", "2", "127.0.0.1:1"]);
    assert!(stderr(&out).contains("AlreadyExists"), "{}", stderr(&out));
    assert_eq!(members(&all).unwrap()["version"], after["version"]);

    // Removing member 1 (perhaps the leader: leadership moves first) leaves three voters that
    // take writes, with node 4 among them.
    let out = cluster(&all, &["remove", "1", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rest = [trio.addr(1), trio.addr(2), joiner.grpc.clone()].join(",");
    let t = eventually("member 1 gone", || {
        let t = members(&rest)?;
        (roles(&t).len() == 3).then_some(t)
    });
    assert_eq!(t["version"].as_u64(), Some(v0 + 3));
    assert!(!roles(&t).iter().any(|(id, _)| *id == 1));
    put_eventually(&rest, "after-removal", "x");
    assert_eq!(
        eventually("replicated to node 4", || get(
            &joiner.grpc,
            "after-removal",
            false
        )),
        "x"
    );
}

#[test]
fn the_cluster_service_refuses_conflicts_reports_liveness_and_says_not_modified() {
    let node = Node::start(&[
        "--config",
        &write_config("[cluster]\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 500\n"),
    ]);
    let t = eventually("topology", || members(&node.grpc));
    assert_eq!(roles(&t), [(1, "voter".to_string())]);
    let v = t["version"].as_u64().unwrap();
    let own = &t["members"][0];
    assert_eq!(own["address"].as_str(), Some(node.peer.as_str()));
    assert_eq!(own["client_address"].as_str(), Some(node.grpc.as_str()));

    // A learner that never runs: shown, and unreachable.
    let out = cluster(
        &node.grpc,
        &["add", "2", "127.0.0.1:1", "--learner", "--json"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let t = eventually("member 2 listed", || {
        let t = members(&node.grpc)?;
        (roles(&t).len() == 2).then_some(t)
    });
    assert_eq!(t["version"].as_u64(), Some(v + 1));
    let m2 = &t["members"][1];
    assert_eq!(
        (m2["role"].as_str(), m2["reachable"].as_bool()),
        (Some("learner"), Some(false))
    );
    assert_eq!(m2["last_heartbeat_ms_ago"].as_i64(), Some(-1));
    // The node itself beats, so it is reachable.
    let me = eventually("own heartbeat", || {
        let t = members(&node.grpc)?;
        (t["members"][0]["reachable"].as_bool() == Some(true)).then_some(t)
    });
    assert!(me["members"][0]["memory_bytes"].as_u64().unwrap() > 0);

    // Same request again: no change, no new version. Conflicts: ALREADY_EXISTS, no change.
    assert!(
        cluster(&node.grpc, &["add", "2", "127.0.0.1:1", "--learner"])
            .status
            .success()
    );
    for args in [["add", "2", "127.0.0.1:2"], ["add", "3", "127.0.0.1:1"]] {
        let out = cluster(&node.grpc, &args);
        assert!(
            stderr(&out).contains("AlreadyExists"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let bad = cluster(&node.grpc, &["add", "3", "nohost"]);
    assert!(
        stderr(&bad).contains("InvalidArgument") && stderr(&bad).contains("address"),
        "{}",
        stderr(&bad)
    );
    let none = cluster(&node.grpc, &["remove", "9"]);
    assert!(stderr(&none).contains("NotFound"), "{}", stderr(&none));
    let last = cluster(&node.grpc, &["remove", "1"]);
    assert!(
        stderr(&last).contains("FailedPrecondition"),
        "{}",
        stderr(&last)
    );
    assert_eq!(
        members(&node.grpc).unwrap()["version"].as_u64(),
        Some(v + 1)
    );

    // A caller up to date is told so at once; one behind gets the topology.
    let current = (v + 1).to_string();
    let same = json_of(cluster(
        &node.grpc,
        &["members", "--min-version", &current, "--json"],
    ))
    .unwrap();
    assert_eq!(same["not_modified"], true);
    assert_eq!(same["version"].as_u64(), Some(v + 1));
    let behind = json_of(cluster(
        &node.grpc,
        &["members", "--min-version", &v.to_string(), "--json"],
    ))
    .unwrap();
    assert_eq!(roles(&behind).len(), 2);

    // Removing is a new version too, and a topology watcher is told of it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use lodge_grpc::pb::cluster::{self as pb, cluster_client::ClusterClient};
        let channel = lodge_grpc::client::connect(&node.grpc, &Default::default())
            .await
            .unwrap();
        let mut c = ClusterClient::new(channel);
        let mut watch = c
            .watch_topology(pb::WatchTopologyRequest {})
            .await
            .unwrap()
            .into_inner();
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.version, v + 1);
        c.deregister_node(pb::DeregisterNodeRequest {
            id: 2,
            ..Default::default()
        })
        .await
        .unwrap();
        let next = tokio::time::timeout(Duration::from_secs(30), watch.message())
            .await
            .expect("a topology update")
            .unwrap()
            .unwrap();
        assert_eq!(next.version, v + 2);
        assert_eq!(next.members.iter().map(|m| m.id).collect::<Vec<_>>(), [1]);
    });
    assert_eq!(
        members(&node.grpc).unwrap()["version"].as_u64(),
        Some(v + 2)
    );
}

/// Writes a configuration file that outlives the test's node (leaked on purpose: tiny).
fn write_config(toml: &str) -> String {
    let dir = tempfile::tempdir().unwrap().keep();
    let path = dir.join("node.toml");
    std::fs::write(&path, toml).unwrap();
    path.display().to_string()
}

#[test]
fn a_lease_expires_on_the_leader_its_keys_vanish_and_watchers_see_the_delete() {
    let node = Node::start(&["--config", &write_config("[cluster]\nwatch_history = 5\n")]);
    let ep = node.grpc.as_str();
    let grant = json_of(kv(ep, &["lease", "grant", "1", "--json"])).expect("grant");
    let lease = grant["lease"].as_i64().unwrap().to_string();
    let put = json_of(kv(
        ep,
        &["put", "session/a", "x", "--lease", &lease, "--json"],
    ))
    .unwrap();
    let rev = put["revision"].as_i64().unwrap();
    let missing = kv(ep, &["put", "session/b", "x", "--lease", "999"]);
    assert!(
        stderr(&missing).contains("NotFound") && stderr(&missing).contains("lease"),
        "{}",
        stderr(&missing)
    );

    // The key goes when the lease does, within its TTL plus the leader's check.
    eventually("the lease expired", || {
        get(ep, "session/a", false).is_none().then_some(())
    });
    // A watch from the put's revision replays the put, then the delete the expiry caused.
    let out = kv(
        ep,
        &[
            "watch",
            "session/",
            "--prefix",
            "--rev",
            &rev.to_string(),
            "--count",
            "2",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let events: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0]["type"], "PUT");
    assert_eq!(events[1]["type"], "DELETE");
    assert_eq!(events[1]["kv"]["key"], "session/a");
    let ttl = kv(ep, &["lease", "ttl", &lease]);
    assert!(stderr(&ttl).contains("NotFound"), "{}", stderr(&ttl));

    // History is kept for 5 revisions: an older start revision is refused, naming the oldest.
    for n in 0..8 {
        assert!(kv(ep, &["put", "h", &n.to_string()]).status.success());
    }
    let old = kv(ep, &["watch", "h", "--rev", "1", "--count", "1"]);
    assert!(
        stderr(&old).contains("OutOfRange") && stderr(&old).contains("oldest revision"),
        "{}",
        stderr(&old)
    );
}

#[test]
fn a_lease_kept_alive_outlives_its_ttl() {
    let node = Node::start(&[]);
    let ep = node.grpc.as_str();
    let grant = json_of(kv(ep, &["lease", "grant", "2", "--json"])).expect("grant");
    let lease = grant["lease"].as_i64().unwrap().to_string();
    assert!(kv(ep, &["put", "k", "v", "--lease", &lease])
        .status
        .success());
    // Renewed every 2/3 s by the client, the lease must still hold the key after three TTLs.
    let mut keeper = std::process::Command::new(LODGE)
        .args(["kv", "--endpoint", ep, "lease", "keep-alive", &lease])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(6));
    let alive = get(ep, "k", false);
    keeper.kill().unwrap();
    keeper.wait().unwrap();
    assert_eq!(alive.as_deref(), Some("v"), "a kept-alive lease expired");
    let ttl = json_of(kv(ep, &["lease", "ttl", &lease, "--keys", "--json"])).unwrap();
    assert_eq!(ttl["granted_ttl"], 2);
    assert_eq!(ttl["keys"][0], "k");
}

/// A `lodge kv watch` on one member, printing changes under `prefix`; killed when dropped.
struct Watcher {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Watcher {
    fn start(endpoint: &str, prefix: &str) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(LODGE)
            .args(["kv", "--endpoint", endpoint, "watch", prefix, "--prefix"])
            .env_remove("LODGE_ENDPOINT")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Self { child, lines }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn members_with_watches_and_a_module_stop_without_waiting_out_the_drain() {
    let trio = Trio::new("", &[]);
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| trio.start(i, tempfile::tempdir().unwrap()))
        .collect();
    let all = (0..3).map(|i| trio.addr(i)).collect::<Vec<_>>().join(",");
    // A watch open on every member, seen to deliver, so each holds a stream on its member.
    let watchers: Vec<Watcher> = (0..3)
        .map(|i| Watcher::start(&trio.addr(i), "w/"))
        .collect();
    let mut n = 0;
    for w in &watchers {
        eventually("the watch delivers", || {
            n += 1;
            assert!(kv(&all, &["put", &format!("w/{n}"), "v"]).status.success());
            w.lines.recv_timeout(Duration::from_millis(500)).ok()
        });
    }
    // A module heartbeating to the cluster.
    let _module = Lodge::start(
        &[
            "module",
            "--type",
            "alb",
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "127.0.0.1:9",
            "--endpoint",
            &all,
            "--instance-id",
            "m1",
        ],
        "module ",
    );
    eventually("the module is registered", || {
        let out = kv(&all, &["get", "/lodge/balancer/", "--prefix", "--json"]);
        let doc: Value = serde_json::from_str(&stdout(&out)).ok()?;
        (doc["count"].as_u64()? > 0).then_some(())
    });
    // Each member in turn: SIGTERM, then a restart on the same ports at once (so the next stop
    // happens in a whole cluster again). The drain (10 s by default) must not be waited out.
    for (i, node) in nodes.iter_mut().enumerate() {
        let started = Instant::now();
        let status = node
            .terminate(Duration::from_secs(30))
            .expect("the member exits");
        let took = started.elapsed();
        let err = node.stderr();
        assert_eq!(status.code(), Some(0), "{err}");
        assert!(err.contains("in-flight calls drained"), "{err}");
        assert!(
            took < Duration::from_secs(5),
            "member {} took {took:?} to stop: the drain was waited out",
            i + 1
        );
        eprintln!("member {} stopped in {took:?}", i + 1);
        let dir = std::mem::replace(&mut node.dir, tempfile::tempdir().unwrap());
        *node = trio.start(i, dir);
    }
    eventually("the restarted cluster serves writes", || {
        kv(&all, &["put", "after", "v"])
            .status
            .success()
            .then_some(())
    });
}

#[test]
fn lease_calls_through_a_follower_are_answered_by_the_leader_also_after_a_kill_9_of_it() {
    let trio = Trio::new("[cluster]\ntick_ms = 20\n", &[]);
    let mut nodes: Vec<Option<Node>> = (0..3)
        .map(|i| Some(trio.start(i, tempfile::tempdir().unwrap())))
        .collect();
    let leader = eventually("a leader", || leader_of(nodes[0].as_ref().unwrap())) as usize;
    let follower = trio.addr(if leader == 1 { 1 } else { 0 });
    // Only the leader keeps lease deadlines: a follower's store client asks it (Raft/Read on the
    // peer port) for a lease's time to live and keys.
    let lease_on = |ep: &str| {
        let grant = eventually("a lease", || {
            json_of(kv(ep, &["lease", "grant", "30", "--json"]))
        });
        let lease = grant["lease"].as_i64().unwrap().to_string();
        assert!(kv(ep, &["put", "held", "v", "--lease", &lease])
            .status
            .success());
        let ttl = json_of(kv(ep, &["lease", "ttl", &lease, "--keys", "--json"])).expect("ttl");
        assert_eq!(ttl["granted_ttl"], 30, "{ttl}");
        assert_eq!(ttl["keys"], serde_json::json!(["held"]), "{ttl}");
        lease
    };
    let lease = lease_on(&follower);
    assert!(kv(&follower, &["lease", "revoke", &lease]).status.success());
    assert!(get(&follower, "held", false).is_none());

    // The leader dies: the survivors elect another, and the follower's calls find it.
    nodes[leader - 1].take().unwrap().kill9();
    let survivor = (0..3).find(|i| *i != leader - 1).unwrap();
    let next = eventually("a new leader", || {
        leader_of(nodes[survivor].as_ref().unwrap()).filter(|l| *l as usize != leader)
    }) as usize;
    let follower = trio.addr((0..3).find(|i| *i != leader - 1 && *i != next - 1).unwrap());
    lease_on(&follower);
}
