//! End-to-end: the real `lodge` binary as separate processes on loopback.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use lodge_grpc::client::{connect, ClientTls};
use lodge_grpc::pb::admin::{admin_client::AdminClient, NodeInfoRequest};
use serde_json::Value;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn json(o: &std::process::Output) -> Value {
    assert!(o.status.success(), "ctl failed: {}", stderr(o));
    serde_json::from_str(&stdout(o)).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

fn config_file(dir: &std::path::Path, toml: &str) -> String {
    let p = dir.join("node.toml");
    std::fs::write(&p, toml).unwrap();
    p.display().to_string()
}

#[tokio::test]
async fn a_node_serves_health_reflection_and_its_actor_tree() {
    let node = Node::start(&[]);
    let channel = connect(&node.grpc, &ClientTls::default()).await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "lodge.admin.v1.Admin"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "service {service:?}");
    }

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut refl = ServerReflectionClient::new(channel);
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let answer = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"lodge.admin.v1.Admin".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    let tree = json(&node.ctl(&["tree", "--json"]));
    assert_eq!(tree["path"], "/node");
    assert_eq!(tree["kind"], "supervisor");
    let kids: Vec<&str> = tree["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert!(kids.contains(&"/node/admin"), "{kids:?}");
}

#[test]
fn restart_needs_allow_mutations_and_raises_the_restart_count() {
    let locked = Node::start(&[]);
    let denied = locked.ctl(&["restart", "/node/admin"]);
    assert_eq!(denied.status.code(), Some(1));
    assert!(
        stderr(&denied).contains("PermissionDenied"),
        "{}",
        stderr(&denied)
    );
    let stop_denied = locked.ctl(&["stop", "/node/admin"]);
    assert!(stderr(&stop_denied).contains("PermissionDenied"));

    let open = Node::start(&["--allow-mutations"]);
    let restarts = |n: &Node| {
        json(&n.ctl(&["actor", "/node/admin", "--json"]))["restarts"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(restarts(&open), 0);
    let r = json(&open.ctl(&["restart", "/node/admin", "--json"]));
    assert_eq!(r["restarts"], 1);
    assert_eq!(restarts(&open), 1);
    let detail = json(&open.ctl(&["actor", "/node/admin", "--json"]));
    assert_eq!(detail["state"], "running");
    assert_eq!(detail["state_dump"]["allow_mutations"], true);

    let missing = open.ctl(&["restart", "/node/nope"]);
    assert!(
        stderr(&missing).contains("NotFound"),
        "{}",
        stderr(&missing)
    );
    let root = open.ctl(&["restart", "/node"]);
    assert!(
        stderr(&root).contains("FailedPrecondition"),
        "{}",
        stderr(&root)
    );
    let relative = open.ctl(&["actor", "node/admin"]);
    assert!(stderr(&relative).contains("InvalidArgument") && stderr(&relative).contains("path"));
}

/// Kills the watcher process when the test ends.
struct Reaper(std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn watch_events_streams_a_restart_as_json_lines() {
    let node = Node::start(&["--allow-mutations"]);
    let mut watcher = Reaper(
        Command::new(LODGE)
            .args([
                "ctl",
                "--endpoint",
                &node.grpc,
                "events",
                "--json",
                "--glob",
                "/node/admin",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let out = watcher.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The watcher subscribes asynchronously: restart until it reports something.
    let mut subscribed = false;
    for _ in 0..50 {
        assert!(node.ctl(&["restart", "/node/admin"]).status.success());
        if rx.recv_timeout(Duration::from_millis(500)).is_ok() {
            subscribed = true;
            break;
        }
    }
    assert!(subscribed, "the watcher saw no event");
    // Drain what is left of those restarts, then watch one restart from start to end.
    while rx.recv_timeout(Duration::from_millis(300)).is_ok() {}
    assert!(node.ctl(&["restart", "/node/admin"]).status.success());
    let mut events: Vec<Value> = Vec::new();
    while !events.iter().any(|e| e["type"] == "restarted") {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("events of the restart");
        events.push(serde_json::from_str(&line).unwrap());
    }
    assert!(
        events.iter().all(|e| e["path"] == "/node/admin"),
        "{events:?}"
    );
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["stopped", "restarted"],
        "a restart is reported as a stop, then a restart"
    );
    assert_eq!(
        events[1]["restarts"].as_u64(),
        events[0]["restarts"].as_u64().map(|n| n + 1)
    );
}

/// A grpc.health.v1 Watch on the node-wide status, after its first answer (SERVING).
async fn serving_health_watch(
    endpoint: &str,
) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    let channel = connect(endpoint, &ClientTls::default()).await.unwrap();
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    watch
}

#[tokio::test]
async fn sigterm_turns_health_not_serving_then_exits_zero_within_the_drain_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(dir.path(), "[server]\ndrain_timeout_ms = 3000\n");
    let mut node = Node::start(&["--config", &cfg]);
    let mut watch = serving_health_watch(&node.grpc).await;
    signal(node.pid(), "TERM");
    let update = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .unwrap();
    assert_eq!(update.unwrap().unwrap().status(), ServingStatus::NotServing);
    drop(watch);
    let status = node
        .wait_exit(Duration::from_secs(3 + 10))
        .expect("exited within the drain timeout");
    assert_eq!(status.code(), Some(0), "{}", node.stderr());
    assert!(node.stderr().contains("shutting down"));
}

#[test]
fn an_open_event_watch_does_not_hold_up_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    // A drain long enough that waiting it out would show.
    let cfg = config_file(dir.path(), "[server]\ndrain_timeout_ms = 120000\n");
    let mut node = Node::start(&["--config", &cfg]);
    let mut watcher = Reaper(
        Command::new(LODGE)
            .args(["ctl", "--endpoint", &node.grpc, "events"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Wait until the watcher's connection is open (the connection gauge counts it).
    let mut open = false;
    for _ in 0..200 {
        let page = node.scrape();
        if page
            .lines()
            .any(|l| l.starts_with("lodge_grpc_connections_active ") && !l.ends_with(" 0"))
        {
            open = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(open, "the watcher never connected");
    let status = node
        .terminate(Duration::from_secs(60))
        .expect("exit long before the 120 s drain");
    assert_eq!(status.code(), Some(0), "{}", node.stderr());
    assert!(
        node.stderr().contains("in-flight calls drained"),
        "{}",
        node.stderr()
    );
    let _ = watcher.0.wait();
}

#[test]
fn a_second_signal_cuts_the_drain_short() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(
        dir.path(),
        "[server]\ndrain_timeout_ms = 120000\n[router]\nrendezvous_timeout_ms = 120000\n",
    );
    let mut node = Node::start(&["--config", &cfg]);
    // A user waiting for an agent is a call in flight, so the first SIGTERM's drain would wait
    // for it (120 s).
    let mut user = Reaper(
        Command::new(LODGE)
            .args([
                "exec",
                "--endpoint",
                &node.grpc,
                "--workflow-id",
                "w",
                "true",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    common::eventually("the user's session is waiting", || {
        stdout(&node.ctl(&["actors", "--json"]))
            .contains("/node/router/sessions/")
            .then_some(())
    });
    signal(node.pid(), "TERM");
    common::eventually("the drain began", || {
        node.stderr().contains("shutting down").then_some(())
    });
    let status = node
        .terminate(Duration::from_secs(60))
        .expect("the second signal ends it");
    assert_eq!(status.code(), Some(1), "{}", node.stderr());
    assert!(node.stderr().contains("second signal"), "{}", node.stderr());
    let _ = user.0.kill();
}

#[test]
fn bad_configuration_exits_2_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let typo = config_file(dir.path(), "[server]\nlisen = \"127.0.0.1:1\"\n");
    let bad_tls = dir.path().join("tls.toml");
    std::fs::write(
        &bad_tls,
        format!(
            "[server.tls]\nenabled = true\ncert_file = \"{0}\"\nkey_file = \"{0}\"\n",
            garbage.display()
        ),
    )
    .unwrap();
    let bad_tls = bad_tls.display().to_string();
    // (flags, environment, what stderr must name)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (vec!["--listen", "nowhere"], vec![], "server.listen"),
        (
            vec!["--metrics-listen", "127.0.0.1:99999"],
            vec![],
            "metrics.listen",
        ),
        (vec!["--config", &typo], vec![], "server.lisen: unknown key"),
        (
            vec![],
            vec![("LODGE_SERVER__MAX_CONNECTIONS", "lots")],
            "server.max_connections",
        ),
        (
            vec![],
            vec![("LODGE_SERVER__TLS__ENABLED", "true")],
            "server.tls.cert_file",
        ),
        (vec!["--config", &bad_tls], vec![], "server.tls"),
        (vec!["--log-level", "loud"], vec![], "log.level"),
    ];
    for (args, env, key) in cases {
        let out = Command::new(LODGE)
            .arg("node")
            .args(&args)
            .envs(env.iter().copied())
            .args(["--data-dir", &dir.path().join("d").display().to_string()])
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(
            err.contains(key),
            "{args:?} {env:?} should name {key}: {err}"
        );
    }
}

#[test]
fn print_config_shows_the_effective_configuration() {
    let out = Command::new(LODGE)
        .args(["node", "--print-config", "--node-id", "7"])
        .env("LODGE_SERVER__MAX_CONNECTIONS", "11")
        .output()
        .unwrap();
    assert!(out.status.success());
    let cfg: toml::Value = toml::from_str(&stdout(&out)).unwrap();
    assert_eq!(cfg["node"]["id"].as_integer(), Some(7));
    assert_eq!(cfg["server"]["max_connections"].as_integer(), Some(11));
    assert_eq!(cfg["server"]["listen"].as_str(), Some("127.0.0.1:7400"));
}

#[test]
fn a_tls_node_refuses_plaintext_and_with_mtls_refuses_clients_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let tls = format!(
        "[server.tls]\nenabled = true\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        pki.server_cert.display(),
        pki.server_key.display()
    );
    let node = Node::start(&["--config", &config_file(dir.path(), &tls)]);
    let ca = pki.ca.display().to_string();
    assert!(
        !node.ctl(&["info"]).status.success(),
        "plaintext client accepted by a TLS node"
    );
    let ok = node.ctl(&["info", "--json", "--tls-ca", &ca]);
    assert!(ok.status.success(), "{}", stderr(&ok));

    let mtls_dir = tempfile::tempdir().unwrap();
    let mtls = format!("{tls}client_ca_file = \"{}\"\n", pki.ca.display());
    let node = Node::start(&["--config", &config_file(mtls_dir.path(), &mtls)]);
    let no_cert = node.ctl(&["info", "--tls-ca", &ca]);
    assert!(
        !no_cert.status.success(),
        "mTLS node accepted a client without a certificate"
    );
    let (cert, key) = (
        pki.client_cert.display().to_string(),
        pki.client_key.display().to_string(),
    );
    let with_cert = node.ctl(&[
        "info",
        "--tls-ca",
        &ca,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    assert!(with_cert.status.success(), "{}", stderr(&with_cert));
}

#[test]
fn the_metrics_page_passes_promtool_and_counts_rpcs_and_actors() {
    let node = Node::start(&[]);
    assert!(node.ctl(&["actors"]).status.success());
    // The raft figures are refreshed every tick: a lone voter shows itself leader once it did.
    let page = eventually("raft figures", || {
        let page = node.scrape();
        page.contains("lodge_raft_is_leader 1").then_some(page)
    });
    assert!(page.contains("lodge_cluster_voters 1"), "{page}");
    assert!(page.contains("lodge_cluster_topology_version 1"), "{page}");
    let page = node.scrape();
    assert!(
        page.contains(r#"lodge_grpc_server_handled_total{grpc_method="/lodge.admin.v1.Admin/ListActors",grpc_code="Ok"} 1"#),
        "{page}"
    );
    assert!(page.contains(r#"lodge_actors{kind="admin"} 1"#), "{page}");
    assert!(page.contains("process_resident_memory_bytes"), "{page}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is missing: run the suite through scripts/test, which installs it");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        stdout(&out),
        stderr(&out)
    );
}

#[tokio::test]
async fn connections_past_max_connections_are_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&[
        "--config",
        &config_file(dir.path(), "[server]\nmax_connections = 1\n"),
    ]);
    // The one place is taken by a connection with a call in flight (an idle one would be shed
    // to make room).
    let first = connect(&node.grpc, &ClientTls::default()).await.unwrap();
    let mut watch = HealthClient::new(first.clone())
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().unwrap();
    let second = async {
        let ch = connect(&node.grpc, &ClientTls::default()).await?;
        AdminClient::new(ch)
            .node_info(NodeInfoRequest {})
            .await
            .map_err(|s| s.to_string())
    }
    .await;
    let refusal = second.expect_err("a second connection was served past max_connections = 1");
    assert!(refusal.contains("server.max_connections"), "{refusal}");
    let page = node.scrape();
    let rejected = page
        .lines()
        .find_map(|l| l.strip_prefix("lodge_grpc_connections_rejected_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap();
    assert!(rejected >= 1.0, "{page}");
    // The first connection is still served.
    AdminClient::new(first)
        .node_info(NodeInfoRequest {})
        .await
        .unwrap();
}
