//! End-to-end: calls that would break a cluster's membership or identity are refused (or undone
//! with a documented command), and the cluster serves afterwards (issue 15).

mod common;

use std::process::{Command, Output};

use common::*;
use serde_json::Value;

/// Fast elections and liveness: a member is "not live" for the quorum guard 200 ms after its last
/// message, and shown unreachable 1 s after its last heartbeat.
const FAST: &str = "[cluster]\ntick_ms = 20\nheartbeat_interval_ms = 200\nheartbeat_timeout_ms = 1000\n[server]\nrequest_timeout_ms = 2000\n";

/// Writes a configuration file that lives as long as the returned directory.
fn config(toml: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(&path, toml).unwrap();
    let p = path.display().to_string();
    (dir, p)
}

fn members(endpoints: &str) -> Option<Value> {
    json_of(cluster(endpoints, &["members", "--json"]))
}

fn ids(topology: &Value) -> Vec<u64> {
    topology["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["id"].as_u64())
        .collect()
}

fn client(endpoint: &str, args: &[&str]) -> Output {
    Command::new(LODGE)
        .arg("client")
        .args(args)
        .args(["--endpoint", endpoint, "--json"])
        .env_remove("LODGE_ENDPOINT")
        .output()
        .expect("running lodge client")
}

/// The cluster behind `endpoints` takes a write, serves it back by a linearizable read, grants
/// a lease and registers a client.
fn serves(endpoints: &str, key: &str) {
    eventually(&format!("put {key}"), || {
        kv(endpoints, &["put", key, "v"])
            .status
            .success()
            .then_some(())
    });
    assert_eq!(
        eventually("a linearizable read", || get(endpoints, key, false)),
        "v"
    );
    let lease = eventually("a lease", || {
        json_of(kv(endpoints, &["lease", "grant", "30", "--json"]))
    });
    assert!(lease["lease"].as_i64().unwrap_or(0) != 0, "{lease}");
    let registered = eventually("a client registration", || {
        json_of(client(endpoints, &["register", "--name", key]))
    });
    assert_eq!(registered["success"], true, "{registered}");
}

/// Asserts that a node start was refused with exit 2, and answers its stderr.
fn refused(started: Result<Node, StartFailure>) -> String {
    match started {
        Ok(n) => panic!("the node started (ready on {}): {}", n.grpc, n.stderr()),
        Err(f) => {
            assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
            assert!(!f.stderr.contains("node ready"), "{}", f.stderr);
            f.stderr
        }
    }
}

#[test]
fn a_voter_that_is_not_running_is_refused_and_a_forced_one_is_undone_by_force_new_cluster() {
    let (_cfg, cfg) = config(FAST);
    let listen = format!("127.0.0.1:{}", free_port());
    let node = Node::start_in(tempfile::tempdir().unwrap(), &listen, &["--config", &cfg]);
    serves(&node.grpc, "before");
    let v0 = members(&node.grpc).unwrap()["version"].clone();

    // Nothing listens at the new voter's address: with it, 1 of 2 voters would be live.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let out = cluster(&node.grpc, &["add", "2", &nowhere]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("FailedPrecondition"), "{err}");
    assert!(
        err.contains("--force") && err.contains("not live: 2"),
        "{err}"
    );
    let t = members(&node.grpc).unwrap();
    assert_eq!((ids(&t), t["version"].clone()), (vec![1], v0));
    serves(&node.grpc, "after-refusal");
    // As a learner it does no harm.
    let out = cluster(&node.grpc, &["add", "2", &nowhere, "--learner"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serves(&node.grpc, "with-a-learner");
    let out = cluster(&node.grpc, &["remove", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Forced, the one-member cluster loses its quorum: nothing commits any more.
    let out = cluster(&node.grpc, &["add", "2", &nowhere, "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!kv(&node.grpc, &["put", "lost", "x"]).status.success());

    // The documented way back: restart the surviving member with --force-new-cluster.
    let dir = node.kill9();
    let node = Node::start_in(dir, &listen, &["--config", &cfg, "--force-new-cluster"]);
    let t = eventually("member 2 gone", || {
        let t = members(&node.grpc)?;
        (ids(&t) == [1]).then_some(t)
    });
    assert_eq!(t["members"][0]["role"], "voter");
    assert!(node.stderr().contains("only member"), "{}", node.stderr());
    serves(&node.grpc, "recovered");
    assert_eq!(get(&node.grpc, "before", false).as_deref(), Some("v"));

    // Durable: a start without the flag finds the same one-member cluster.
    let dir = node.kill9();
    let node = Node::start_in(dir, &listen, &["--config", &cfg]);
    assert_eq!(
        eventually("the data", || get(&node.grpc, "recovered", false)),
        "v"
    );
    assert_eq!(ids(&members(&node.grpc).unwrap()), [1]);
    serves(&node.grpc, "restarted");
}

#[test]
fn removing_a_live_voter_below_quorum_is_refused_and_removing_the_dead_one_is_not() {
    let trio = Trio::new(FAST, &[]);
    let mut nodes: Vec<Option<Node>> = (0..3)
        .map(|i| Some(trio.start(i, tempfile::tempdir().unwrap())))
        .collect();
    let alive = [trio.addr(0), trio.addr(1)].join(",");
    serves(&alive, "before");
    drop(nodes[2].take());
    // Once the others notice (membership heartbeats time out after the raft window has passed).
    eventually("member 3 unreachable", || {
        let t = members(&trio.addr(0))?;
        let m3 = t["members"]
            .as_array()?
            .iter()
            .find(|m| m["id"] == 3)?
            .clone();
        (m3["reachable"] == false).then_some(())
    });
    for id in ["1", "2"] {
        let out = cluster(&alive, &["remove", id]);
        let err = stderr(&out);
        assert!(
            err.contains("FailedPrecondition")
                && err.contains("--force")
                && err.contains("not live: 3"),
            "remove {id}: {err}"
        );
    }
    assert_eq!(ids(&members(&alive).unwrap()), [1, 2, 3]);
    serves(&alive, "after-refusal");

    // Removing the member that is down leaves two live voters of two.
    let out = cluster(&alive, &["remove", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    eventually("member 3 gone", || {
        (ids(&members(&alive)?) == [1, 2]).then_some(())
    });
    serves(&alive, "after-removal");
    drop(nodes);
}

#[test]
fn a_second_process_with_a_members_id_exits_2_before_ready_and_the_member_is_untouched() {
    let trio = Trio::new(FAST, &[]);
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| trio.start(i, tempfile::tempdir().unwrap()))
        .collect();
    let all = (0..3).map(|i| trio.addr(i)).collect::<Vec<_>>().join(",");
    serves(&all, "before");
    let real = trio.addr(2);

    // Its own configuration consistent (member 3 at the address it listens on), but the cluster
    // has a live member 3 elsewhere.
    let own = format!("127.0.0.1:{}", free_port());
    let initial = format!("1={},2={},3={own}", trio.addr(0), trio.addr(1));
    let err = refused(Node::try_start_at(
        &own,
        &[
            "--node-id",
            "3",
            "--config",
            &trio.config,
            "--initial-cluster",
            &initial,
        ],
    ));
    assert!(
        err.contains("member 3 already runs at") && err.contains(&real),
        "{err}"
    );

    // Claiming the real member's address as its own.
    let err = refused(Node::try_start(&[
        "--node-id",
        "3",
        "--config",
        &trio.config,
        "--initial-cluster",
        &trio.initial,
        "--advertise",
        &real,
    ]));
    assert!(
        err.contains("member 3 already runs at") && err.contains(&real),
        "{err}"
    );

    // Joining with a live member's id.
    let err = refused(Node::try_start(&[
        "--node-id",
        "2",
        "--config",
        &trio.config,
        "--join",
        &trio.addr(0),
    ]));
    assert!(
        err.contains("member 2 already runs at") && err.contains(&trio.addr(1)),
        "{err}"
    );

    // A heartbeat from another process as member 3 is refused and changes nothing.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refusal = rt.block_on(async {
        use lodge_grpc::pb::cluster::{self as pb, cluster_client::ClusterClient};
        let channel = lodge_grpc::client::connect(&trio.addr(0), &Default::default())
            .await
            .unwrap();
        ClusterClient::new(channel)
            .heartbeat(pb::HeartbeatRequest {
                node_id: 3,
                status: "impostor".into(),
                incarnation: 42,
                ..Default::default()
            })
            .await
            .unwrap_err()
    });
    assert_eq!(refusal.code(), tonic::Code::AlreadyExists, "{refusal:?}");
    assert!(refusal.message().contains("member 3"), "{refusal:?}");
    let t = members(&trio.addr(0)).unwrap();
    let m3 = t["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == 3)
        .unwrap()
        .clone();
    assert_eq!(
        (m3["status"].as_str(), m3["reachable"].as_bool()),
        (Some("serving"), Some(true)),
        "{t}"
    );
    assert_eq!(ids(&t), [1, 2, 3]);

    // The real member serves through itself, and a restarted member (its previous process just
    // killed, its heartbeats still fresh) is not taken for a duplicate.
    serves(&real, "through-member-3");
    let dir = nodes.pop().unwrap().kill9();
    nodes.push(trio.start(2, dir));
    serves(&real, "after-restart");
    eventually("member 3's new process heard", || {
        let t = members(&trio.addr(0))?;
        let m3 = t["members"]
            .as_array()?
            .iter()
            .find(|m| m["id"] == 3)?
            .clone();
        (m3["status"] == "serving" && m3["reachable"] == true).then_some(())
    });
}

#[test]
fn a_node_whose_initial_cluster_entry_is_not_its_address_exits_2() {
    let (a, b) = (free_port(), free_port());
    let initial = format!("1=127.0.0.1:{a},2=127.0.0.1:{b}");
    // Listens on a port of its own choosing: not the 127.0.0.1:{a} its entry says.
    let err = refused(Node::try_start(&[
        "--node-id",
        "1",
        "--initial-cluster",
        &initial,
    ]));
    assert!(
        err.contains("cluster.initial_cluster")
            && err.contains(&format!("1=127.0.0.1:{a}"))
            && err.contains("listens on 127.0.0.1:"),
        "{err}"
    );
    // A wildcard listener advertising the entry's address is right.
    let port = free_port();
    let entry = format!("127.0.0.1:{port}");
    let node = Node::try_start_at(
        &format!("0.0.0.0:{port}"),
        &[
            "--node-id",
            "1",
            "--initial-cluster",
            &format!("1={entry}"),
            "--advertise",
            &entry,
            // Without TLS and auth a wildcard listener needs it (docs/security.md).
            "--insecure",
        ],
    )
    .unwrap_or_else(|f| panic!("{f:?}"));
    serves(&entry, "advertised");
    drop(node);
}

#[test]
fn a_member_without_a_leader_says_so_naming_the_members_it_does_not_hear_from() {
    let trio = Trio::new(FAST, &[]);
    // Alone of three: it can never win an election.
    let node = trio.start(0, tempfile::tempdir().unwrap());
    let warned = eventually("a no-leader warning", || {
        let e = node.stderr();
        e.contains("no leader for").then_some(e)
    });
    assert!(
        warned.contains(&format!("2 at {}", trio.addr(1)))
            && warned.contains(&format!("3 at {}", trio.addr(2))),
        "{warned}"
    );
}
