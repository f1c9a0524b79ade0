//! End-to-end: `lodge lb` against a real node (and a real `lodge module` process): what people
//! read, what scripts read (`--json`), exit codes, and the node's refusals in its own words.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::backends::http_backend;
use common::{json_of, stderr, stdout, Lodge, Node, LODGE};
use serde_json::{json, Value};

/// Bound on every wait; only turns a hang into a failure.
const WAIT: Duration = Duration::from_secs(20);

/// Runs `lodge lb --endpoint ENDPOINT ARGS`.
fn lb(endpoint: &str, args: &[&str]) -> Output {
    Command::new(LODGE)
        .arg("lb")
        .args(["--endpoint", endpoint])
        .args(args)
        .env_remove("LODGE_ENDPOINT")
        .output()
        .expect("running lodge lb")
}

/// `lb` that must succeed; answers its stdout.
fn ok(endpoint: &str, args: &[&str]) -> String {
    let out = lb(endpoint, args);
    assert!(
        out.status.success(),
        "lodge lb {args:?}: {:?}: {}{}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// `lb --json` that must succeed; answers the document.
fn doc(endpoint: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = ok(endpoint, &all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// `lb` that must fail with `code`; answers its stderr.
fn fails(endpoint: &str, args: &[&str], code: i32) -> String {
    let out = lb(endpoint, args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "lodge lb {args:?}: {}{}",
        stdout(&out),
        stderr(&out)
    );
    stderr(&out)
}

#[test]
fn routes_limits_weights_scaling_and_settings() {
    let node = Node::start(&[]);
    let ep = node.grpc.as_str();

    // An upsert with every flag, then the table for people and for scripts.
    let out = ok(
        ep,
        &[
            "route",
            "add",
            "--id",
            "web",
            "--protocol",
            "http",
            "--target",
            "alb",
            "--destination",
            "*.example.com",
            "--port",
            "80",
            "--path",
            "/api/*",
            "--header",
            "x-tenant=a=*",
            "--priority",
            "10",
        ],
    );
    assert!(out.contains("\napplied: 1 route at revision "), "{out}");
    let table = ok(ep, &["routes"]);
    let mut lines = table.lines();
    assert!(
        lines.next().unwrap().starts_with(
            "ID   PRIORITY  PROTOCOL  SOURCE  DESTINATION    PORTS  PATH    HEADERS       TARGET  INSTANCES  DECISIONS"
        ),
        "{table}"
    );
    assert!(
        lines.next().unwrap().starts_with(
            "web  10        http      *       *.example.com  80     /api/*  x-tenant=a=*  alb     -          0"
        ),
        "{table}"
    );
    let routes = doc(ep, &["routes"]);
    let revision = routes["revision"].as_i64().unwrap();
    assert_eq!(
        routes["entries"][0]["route"],
        json!({
            "route_id": "web", "protocol": "http", "source_pattern": "",
            "destination_pattern": "*.example.com", "source_port": 0, "destination_port": 80,
            "path_pattern": "/api/*", "headers": {"x-tenant": "a=*"}, "priority": 10,
            "target": "alb",
        })
    );

    // Validate only: nothing written.
    let out = ok(
        ep,
        &[
            "route",
            "add",
            "--id",
            "db",
            "--protocol",
            "redis",
            "--target",
            "dblb",
            "--validate-only",
        ],
    );
    assert!(
        out.contains("valid; nothing written (--validate-only): the table would have 2 routes"),
        "{out}"
    );
    assert_eq!(doc(ep, &["routes"])["entries"].as_array().unwrap().len(), 1);

    // The node's refusals, in its words, after `lodge lb: `; exit 1.
    let e = fails(
        ep,
        &[
            "route",
            "add",
            "--id",
            "bad id!",
            "--protocol",
            "http",
            "--target",
            "alb",
        ],
        1,
    );
    assert!(e.starts_with("lodge lb: routes[0].route_id"), "{e}");
    let stale = (revision + 100).to_string();
    let e = fails(
        ep,
        &[
            "route",
            "add",
            "--id",
            "x",
            "--protocol",
            "http",
            "--target",
            "alb",
            "--expect-revision",
            &stale,
        ],
        1,
    );
    assert!(
        e.starts_with("lodge lb: expected_revision: ") && e.contains(&stale),
        "{e}"
    );
    // Argument errors are clap's: exit 2.
    fails(
        ep,
        &[
            "route",
            "add",
            "--id",
            "x",
            "--protocol",
            "htp",
            "--target",
            "alb",
        ],
        2,
    );
    let e = fails(ep, &["config", "--set", "heartbeat=5"], 2);
    assert!(
        e.contains("unknown setting \"heartbeat\"; the settings are heartbeat_interval_ms"),
        "{e}"
    );

    // Replace from a file; a bad file is named by entry and field and sends nothing.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("routes.json");
    std::fs::write(
        &file,
        r#"[{"route_id": "web", "protocol": "http", "target": "alb", "priority": 5},
            {"route_id": "db", "protocol": "redis", "target": "dblb", "destination_port": 6379}]"#,
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let updated = doc(ep, &["route", "replace", "--file", f]);
    assert_eq!(updated["applied"], true);
    let ids: Vec<&str> = updated["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["route_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["web", "db"]);
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"[{"route_id": "a", "protocol": "http", "target": "alb"}, {"route_id": "b", "protocol": "http", "target": "alb", "prio": 1}]"#).unwrap();
    let e = fails(
        ep,
        &["route", "replace", "--file", bad.to_str().unwrap()],
        1,
    );
    assert!(e.contains("routes[1].prio: unknown field"), "{e}");
    assert_eq!(doc(ep, &["routes"])["entries"].as_array().unwrap().len(), 2);

    // Delete; then a flow no route matches is the node's NOT_FOUND, said verbatim.
    let deleted = doc(ep, &["route", "delete", "db"]);
    assert_eq!(deleted["routes"].as_array().unwrap().len(), 1);
    let e = fails(ep, &["route", "test", "--protocol", "postgres"], 1);
    assert!(
        e.starts_with("lodge lb: ") && !e.contains("NotFound"),
        "{e}"
    );
    // No instance for a matching route: UNAVAILABLE with the reason, at once (not retried).
    let began = Instant::now();
    let e = fails(
        ep,
        &[
            "route",
            "test",
            "--protocol",
            "http",
            "--destination",
            "a.example.com",
        ],
        1,
    );
    assert!(e.starts_with("lodge lb: "), "{e}");
    assert!(began.elapsed() < Duration::from_secs(4), "retried: {e}");

    // Limits.
    let out = ok(
        ep,
        &[
            "limits",
            "set",
            "route:web",
            "--per-second",
            "100",
            "--burst",
            "20",
        ],
    );
    assert_eq!(
        out,
        "TARGET     PER-SECOND  PER-MINUTE  PER-HOUR  BURST\nroute:web  100         -           -         20\n"
    );
    let limits = doc(ep, &["limits"]);
    assert_eq!(
        limits,
        json!({"limits": [{"target": "route:web", "requests_per_second": 100,
            "requests_per_minute": 0, "requests_per_hour": 0, "burst": 20}]})
    );
    let e = fails(ep, &["limits", "set", "web", "--per-second", "1"], 1);
    assert!(e.starts_with("lodge lb: limit.target"), "{e}");
    assert_eq!(
        ok(ep, &["limits", "remove", "route:web"]),
        "removed the limit of route:web\n"
    );
    let out = lb(ep, &["limits", "remove", "route:web"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout(&out), "route:web had no limit; nothing removed\n");

    // Blue/green.
    let t = doc(ep, &["promote", "alb", "v1"]);
    assert_eq!(t["active_version"], "v1");
    assert_eq!(t["module_type"], "alb");
    let t = doc(ep, &["weights", "alb", "--version", "v2", "--weight", "20"]);
    assert_eq!(t["canary_percent"], 20);
    let out = ok(ep, &["weights", "alb"]);
    assert!(out.contains("weights           v1 80%, v2 20%"), "{out}");
    let t = doc(ep, &["rollback", "alb"]);
    assert_eq!(t["weights"], json!([{"version": "v1", "weight": 100}]));
    let out = ok(
        ep,
        &[
            "promote",
            "alb",
            "v3",
            "--gradual",
            "--step",
            "25",
            "--interval-ms",
            "600000",
        ],
    );
    assert!(
        out.contains("promotion         v3 from 0% by 25% every 600000 ms since "),
        "{out}"
    );

    // Scaling: settings read, changed (the rest kept), and a forced decision.
    let before = doc(ep, &["scale", "alb"]);
    let after = doc(
        ep,
        &[
            "scale", "alb", "--set", "--enable", "--min", "2", "--max", "5",
        ],
    );
    assert_eq!(
        (
            after["enabled"].clone(),
            after["min_instances"].clone(),
            after["max_instances"].clone()
        ),
        (json!(true), json!(2), json!(5))
    );
    assert_eq!(after["target_cpu_percent"], before["target_cpu_percent"]);
    assert_eq!(doc(ep, &["scale", "alb"]), after);
    let d = doc(ep, &["scale", "alb", "--to", "3", "--reason", "drill"]);
    assert_eq!(
        (d["direction"].clone(), d["desired_instances"].clone()),
        (json!("up"), json!(3))
    );
    assert!(d["reason"].as_str().unwrap().starts_with("drill: "), "{d}");
    let e = fails(
        ep,
        &["scale", "alb", "--set", "--min", "9", "--max", "2"],
        1,
    );
    assert_eq!(
        e,
        "lodge lb: config.max_instances: 2 is below min_instances 9\n"
    );

    // Settings.
    let e = fails(ep, &["config", "--set", "heartbeat_interval_ms=5"], 1);
    assert!(e.starts_with("lodge lb: heartbeat_interval_ms: 5"), "{e}");
    let c = doc(
        ep,
        &[
            "config",
            "--set",
            "drain_timeout_ms=1234",
            "rebalance_threshold=30",
            "--validate-only",
        ],
    );
    assert_eq!(c["drain_timeout_ms"], 1234);
    assert_ne!(doc(ep, &["config"])["drain_timeout_ms"], 1234);
    ok(ep, &["config", "--set", "drain_timeout_ms=1234"]);
    let out = ok(ep, &["config"]);
    assert!(out.contains("drain_timeout_ms       1234\n"), "{out}");

    // Status, health, metrics; nothing registered.
    let s = doc(ep, &["status"]);
    assert_eq!(s["member_id"], 1);
    assert_eq!(s["routes"], 1);
    let out = ok(ep, &["modules"]);
    assert_eq!(
        out,
        "ID  TYPE  VERSION  HEALTH  CONNS  LOAD  DATA-ADDRESS\n(0 instances)\n"
    );
    let m = doc(ep, &["metrics"]);
    assert_eq!(m["member_id"], 1);
    assert!(m["decisions"].is_object(), "{m}");
    let e = fails(ep, &["module", "nope"], 1);
    assert!(e.starts_with("lodge lb: "), "{e}");
    let h = lb(ep, &["health", "--json"]);
    let status = json_of(h.clone()).expect("health JSON")["status"].clone();
    assert_eq!(
        h.status.code(),
        Some(i32::from(status != "healthy")),
        "{status}"
    );

    // Every call fails over: an endpoint that refuses connections is skipped.
    let dead = format!("127.0.0.1:{}", common::free_port());
    let s = doc(&format!("{dead},{ep}"), &["status"]);
    assert_eq!(s["member_id"], 1);
    let e = fails(&dead, &["status"], 1);
    assert!(e.starts_with("lodge lb: cannot connect to"), "{e}");
}

#[test]
fn modules_decisions_load_and_a_watch() {
    let node = Node::start(&[]);
    let ep = node.grpc.as_str();
    let _module = Lodge::start(
        &[
            "module",
            "--type",
            "alb",
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &http_backend("web"),
            "--endpoint",
            ep,
            "--instance-id",
            "alb-1",
            "--version",
            "v1",
        ],
        "module ",
    );
    ok(
        ep,
        &[
            "route",
            "add",
            "--id",
            "web",
            "--protocol",
            "http",
            "--target",
            "alb",
            "--priority",
            "3",
        ],
    );

    // Registered and healthy, seen by a table and by a script.
    let began = Instant::now();
    let m = loop {
        let d = doc(ep, &["modules", "--type", "alb", "--healthy"]);
        if let Some(m) = d["modules"].as_array().and_then(|m| m.first()) {
            break m.clone();
        }
        assert!(began.elapsed() < WAIT, "alb-1 not healthy: {d}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        (
            m["instance_id"].clone(),
            m["module_type"].clone(),
            m["health"].clone()
        ),
        (json!("alb-1"), json!("alb"), json!("healthy"))
    );
    let table = ok(ep, &["modules"]);
    let row = table.lines().nth(1).unwrap();
    assert!(row.starts_with("alb-1  alb   v1       healthy"), "{table}");
    assert!(table.ends_with("(1 instance)\n"), "{table}");
    assert_eq!(
        doc(ep, &["modules", "--type", "dblb"])["modules"],
        json!([])
    );

    // The decision for a flow (a dry run), and a route the instance is asked about.
    let d = doc(
        ep,
        &[
            "route",
            "test",
            "--protocol",
            "http",
            "--destination",
            "x.org",
            "--port",
            "80",
            "--header",
            "x-a=b=c",
        ],
    );
    assert_eq!(
        (
            d["instance_id"].clone(),
            d["route_id"].clone(),
            d["module_type"].clone(),
            d["dry_run"].clone()
        ),
        (json!("alb-1"), json!("web"), json!("alb"), json!(true))
    );
    let out = ok(ep, &["route", "test", "--protocol", "http", "--commit"]);
    assert!(
        out.starts_with("instance_id  alb-1\n") && out.contains("dry_run      no\n"),
        "{out}"
    );
    let v = doc(
        ep,
        &[
            "route",
            "validate",
            "--id",
            "v",
            "--protocol",
            "http",
            "--target",
            "alb",
        ],
    );
    assert_eq!(v["valid"], true);
    assert_eq!(v["capable"][0]["instance_id"], "alb-1");
    let out = ok(
        ep,
        &[
            "route",
            "validate",
            "--id",
            "v",
            "--protocol",
            "http",
            "--target",
            "alb",
        ],
    );
    assert!(out.starts_with("the route is valid; "), "{out}");
    assert!(
        out.contains("INSTANCE  CAN-HANDLE  PRIORITY  REASON\nalb-1  "),
        "{out}"
    );
    let e = fails(
        ep,
        &[
            "route",
            "validate",
            "--id",
            "v",
            "--protocol",
            "http",
            "--target",
            "alb",
            "--path",
            "api",
        ],
        1,
    );
    assert!(e.starts_with("lodge lb: route.path_pattern"), "{e}");

    // One instance in full.
    let out = ok(ep, &["module", "alb-1"]);
    assert!(out.starts_with("instance_id "), "{out}");
    assert!(
        out.contains("\nmodule_type ")
            && out.contains("\ncapabilities (CanHandle answers cached on this node):\n"),
        "{out}"
    );
    let info = doc(ep, &["module", "alb-1"]);
    assert_eq!(info["module"]["instance_id"], "alb-1");
    assert!(
        info["capabilities"].is_array() && info["metrics"].is_array(),
        "{info}"
    );

    // Load and rebalancing.
    let load = doc(ep, &["load"]);
    assert_eq!(load["instances"][0]["instance_id"], "alb-1");
    assert!(load["balance_score"].is_u64(), "{load}");
    let out = ok(ep, &["load", "--type", "alb"]);
    assert!(out.contains("(1 instance; balance score "), "{out}");
    let r = doc(ep, &["rebalance", "--dry-run"]);
    assert_eq!(r["dry_run"], true);

    // A deep health check asks the instance too.
    let h = lb(ep, &["health", "--deep", "--json"]);
    let health = json_of(h.clone()).expect("health JSON");
    assert_eq!(
        h.status.code(),
        Some(i32::from(health["status"] != "healthy")),
        "{health}"
    );

    // A watch: one JSON document per line, until interrupted.
    let mut watch = Command::new(LODGE)
        .args([
            "lb",
            "--endpoint",
            ep,
            "metrics",
            "--watch",
            "--interval-ms",
            "100",
            "--json",
        ])
        .env_remove("LODGE_ENDPOINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    for _ in 0..2 {
        let line = lines.next().expect("a line").unwrap();
        let m: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(m["member_id"], 1);
    }
    watch.kill().unwrap();
    watch.wait().unwrap();

    // Unregistered by an operator: how many connections it drained.
    let out = doc(
        ep,
        &[
            "unregister",
            "alb-1",
            "--graceful",
            "--drain-timeout-ms",
            "200",
        ],
    );
    assert_eq!(out["remaining_connections"], 0);
    assert!(out["drained_connections"].is_u64(), "{out}");
}
