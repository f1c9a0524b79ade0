//! End-to-end: real nodes serving the balancer, real `lodge module` processes, TCP backends on
//! the test's threads, and traffic through the node's data plane.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::backends::{http_backend, redis_backend};
use common::{eventually, signal, Lodge, Node, Trio};
use lodge_grpc::pb::balancer as pb;
use lodge_grpc::pb::balancer::balancer_client::BalancerClient;
use tonic::transport::Channel;
use tonic::Code;

/// Bound on every wait; only turns a hang into a failure.
const WAIT: Duration = Duration::from_secs(20);

/// A node's configuration with a data-plane listener on a free port.
fn dataplane_config() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(&path, "[balancer]\nlisten = [\"127.0.0.1:0\"]\n").unwrap();
    let p = path.display().to_string();
    (dir, p)
}

async fn client(addr: &str) -> BalancerClient<Channel> {
    BalancerClient::connect(format!("http://{addr}"))
        .await
        .expect("connecting to the node")
}

/// The node's data-plane address.
async fn data_address(c: &mut BalancerClient<Channel>) -> String {
    let s = c.get_nlb_status(pb::GetNlbStatusRequest {}).await.unwrap();
    s.into_inner().listeners[0].clone()
}

/// Heartbeats every 200 ms, eviction after 3 missed (a 1 s lease).
async fn fast_heartbeats(c: &mut BalancerClient<Channel>) {
    c.update_nlb_config(pb::UpdateNlbConfigRequest {
        heartbeat_interval_ms: Some(200),
        max_missed_heartbeats: Some(3),
        ..Default::default()
    })
    .await
    .unwrap();
}

fn module(node: &str, kind: &str, backend: &str, id: &str, version: &str) -> Lodge {
    Lodge::start(
        &[
            "module",
            "--type",
            kind,
            "--listen",
            "127.0.0.1:0",
            "--backend",
            backend,
            "--endpoint",
            node,
            "--instance-id",
            id,
            "--version",
            version,
        ],
        "module ",
    )
}

fn route(id: &str, protocol: pb::Protocol, target: pb::ModuleType, priority: i32) -> pb::Route {
    pb::Route {
        route_id: id.into(),
        protocol: protocol as i32,
        priority,
        target: target as i32,
        ..Default::default()
    }
}

async fn set_routes(c: &mut BalancerClient<Channel>, routes: Vec<pb::Route>) {
    c.update_routing(pb::UpdateRoutingRequest {
        routes,
        replace_all: true,
        ..Default::default()
    })
    .await
    .unwrap();
}

/// GETs `/` from the data plane with curl; answers the body.
fn curl(data: &str, host: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-H"])
        .arg(format!("Host: {host}"))
        .arg(format!("http://{data}/"))
        .output()
        .expect("running curl (installed by scripts/test)");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Sends a RESP PING through the data plane; answers the reply line.
fn ping(data: &str) -> String {
    let mut s = TcpStream::connect(data).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

async fn modules(c: &mut BalancerClient<Channel>) -> Vec<pb::ModuleInstance> {
    c.list_modules(pb::ListModulesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .modules
}

#[tokio::test(flavor = "multi_thread")]
async fn http_and_redis_traffic_reach_the_right_backends() {
    let (_cfg, config) = dataplane_config();
    let node = Node::start(&["--config", &config]);
    let mut c = client(&node.grpc).await;
    let data = data_address(&mut c).await;
    let _web = module(
        &node.grpc,
        "alb",
        &http_backend("web-backend"),
        "alb-1",
        "v1",
    );
    let _cache = module(&node.grpc, "dblb", &redis_backend("cache"), "dblb-1", "v1");
    let mut api_route = route("api", pb::Protocol::Http, pb::ModuleType::Alb, 10);
    api_route.destination_pattern = "*.example.com".into();
    set_routes(
        &mut c,
        vec![
            api_route,
            route("cache", pb::Protocol::Redis, pb::ModuleType::Dblb, 5),
        ],
    )
    .await;

    assert_eq!(curl(&data, "shop.example.com"), "web-backend");
    assert_eq!(ping(&data), "+PONG cache\r\n");

    // No route for that host: the connection is closed, and counted.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-H", "Host: other.org"])
        .arg(format!("http://{data}/"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "an unroutable request got an answer");

    let m = c
        .get_nlb_metrics(pb::GetNlbMetricsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.decisions["routed"], 2);
    assert_eq!(m.decisions["no_route"], 1);
    let traffic: Vec<_> = m
        .traffic
        .iter()
        .map(|t| (t.instance_id.as_str(), t.connections_total))
        .collect();
    assert!(
        traffic.contains(&("alb-1", 1)) && traffic.contains(&("dblb-1", 1)),
        "{traffic:?}"
    );

    // RouteRequest makes the same decision without a connection.
    let d = c
        .route_request(pb::RouteQuery {
            protocol: pb::Protocol::Http as i32,
            source: "10.1.2.3".into(),
            destination: "api.example.com".into(),
            destination_port: 80,
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (d.instance_id.as_str(), d.route_id.as_str()),
        ("alb-1", "api")
    );
    let none = c
        .route_request(pb::RouteQuery {
            protocol: pb::Protocol::Postgres as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::NotFound, "{none:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_module_is_evicted_and_new_connections_avoid_it() {
    let (_cfg, config) = dataplane_config();
    let node = Node::start(&["--config", &config]);
    let mut c = client(&node.grpc).await;
    fast_heartbeats(&mut c).await;
    let data = data_address(&mut c).await;
    let mut by_id = std::collections::BTreeMap::new();
    for (id, answer) in [("alb-a", "a"), ("alb-b", "b")] {
        let m = module(&node.grpc, "alb", &http_backend(answer), id, "v1");
        by_id.insert(id.to_string(), (m, answer));
    }
    set_routes(
        &mut c,
        vec![route("web", pb::Protocol::Http, pb::ModuleType::Alb, 1)],
    )
    .await;
    let body = curl(&data, "x");
    assert!(body == "a" || body == "b", "{body}");

    // The instance the next connection would go to is killed mid-traffic (no unregistration):
    // new connections avoid it at once (its refused connection is retried elsewhere)...
    let next = c
        .route_request(pb::RouteQuery {
            protocol: pb::Protocol::Http as i32,
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .instance_id;
    let (mut victim, _) = by_id.remove(&next).unwrap();
    let (survivor, (_kept, answer)) = by_id.into_iter().next().unwrap();
    signal(victim.pid(), "KILL");
    victim.wait_exit(WAIT);
    for _ in 0..6 {
        assert_eq!(curl(&data, "x"), answer);
    }
    // ...and its missed heartbeats evict it.
    let began = Instant::now();
    loop {
        let ids: Vec<String> = modules(&mut c)
            .await
            .into_iter()
            .map(|m| m.instance_id)
            .collect();
        if ids == [survivor.as_str()] {
            break;
        }
        assert!(began.elapsed() < WAIT, "{next} not evicted: {ids:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = c
        .get_nlb_metrics(pb::GetNlbMetricsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.evictions, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_shutting_down_drains_its_open_connection() {
    let (_cfg, config) = dataplane_config();
    let node = Node::start(&["--config", &config]);
    let mut c = client(&node.grpc).await;
    fast_heartbeats(&mut c).await;
    let data = data_address(&mut c).await;
    let mut cache = module(&node.grpc, "dblb", &redis_backend("cache"), "dblb-1", "v1");
    set_routes(
        &mut c,
        vec![route("cache", pb::Protocol::Redis, pb::ModuleType::Dblb, 1)],
    )
    .await;
    // A connection held open through the drain.
    let mut held = TcpStream::connect(&data).unwrap();
    held.set_read_timeout(Some(WAIT)).unwrap();
    held.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
    let mut reader = BufReader::new(held.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "+PONG cache\r\n");

    signal(cache.pid(), "TERM");
    let began = Instant::now();
    loop {
        let m = modules(&mut c).await;
        if m.first().is_some_and(|m| m.draining) {
            break;
        }
        assert!(began.elapsed() < WAIT, "not draining: {m:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Draining: no new connection gets it, the held one still works.
    let e = c
        .route_request(pb::RouteQuery {
            protocol: pb::Protocol::Redis as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.message().contains("draining"), "{}", e.message());
    held.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "+PONG cache\r\n");
    assert!(!cache.exited(), "the module waits for its connection");
    drop(reader);
    held.shutdown(Shutdown::Both).unwrap();
    let status = cache
        .wait_exit(WAIT)
        .expect("the module exits once drained");
    assert!(status.success(), "{status:?}: {}", cache.stderr());
    assert!(modules(&mut c).await.is_empty());
    let m = c
        .get_nlb_metrics(pb::GetNlbMetricsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((m.drains, m.evictions), (1, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_routes_and_settings_are_refused_naming_the_field() {
    let node = Node::start(&[]);
    let mut c = client(&node.grpc).await;
    let mut bad = route("db", pb::Protocol::Redis, pb::ModuleType::Dblb, 1);
    bad.source_pattern = "10.0.0.0/33".into();
    let cases = [
        (bad, "routes[1].source_pattern: \"10.0.0.0/33\""),
        (
            pb::Route {
                path_pattern: "api/*".into(),
                ..route("p", pb::Protocol::Http, pb::ModuleType::Alb, 1)
            },
            "routes[1].path_pattern",
        ),
        (
            route("q", pb::Protocol::Unspecified, pb::ModuleType::Alb, 1),
            "routes[1].protocol: required",
        ),
        (
            route("bad id!", pb::Protocol::Http, pb::ModuleType::Alb, 1),
            "routes[1].route_id",
        ),
        (
            pb::Route {
                headers: [("x bad".to_string(), "*".to_string())].into(),
                ..route("h", pb::Protocol::Http, pb::ModuleType::Alb, 1)
            },
            "routes[1].headers[\"x bad\"]",
        ),
    ];
    for (r, field) in cases {
        let e = c
            .update_routing(pb::UpdateRoutingRequest {
                routes: vec![route("ok", pb::Protocol::Http, pb::ModuleType::Alb, 1), r],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
    }
    let table = c
        .get_routing_table(pb::GetRoutingTableRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(table.entries.is_empty(), "a refused update wrote nothing");

    let e = c
        .update_nlb_config(pb::UpdateNlbConfigRequest {
            heartbeat_interval_ms: Some(5),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("heartbeat_interval_ms: 5"),
        "{}",
        e.message()
    );
    let e = c
        .set_rate_limit(pb::SetRateLimitRequest {
            limit: Some(pb::RateLimit {
                target: "web".into(),
                requests_per_second: 1,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("limit.target"), "{}", e.message());
}

#[test]
fn routes_weights_and_registrations_survive_a_leader_kill() {
    let trio = Trio::new("", &[]);
    let mut nodes: Vec<Option<Node>> = (0..3)
        .map(|i| Some(trio.start(i, tempfile::tempdir().unwrap())))
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let endpoints: Vec<String> = (0..3).map(|i| trio.addr(i)).collect();
    rt.block_on(async {
        let mut c = client(&endpoints[0]).await;
        fast_heartbeats(&mut c).await;
        set_routes(
            &mut c,
            vec![route("web", pb::Protocol::Http, pb::ModuleType::Alb, 3)],
        )
        .await;
        c.promote_version(pb::PromoteVersionRequest {
            module_type: pb::ModuleType::Alb as i32,
            version: "v1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        c.set_traffic_weight(pb::SetTrafficWeightRequest {
            module_type: pb::ModuleType::Alb as i32,
            version: "v2".into(),
            weight: 20,
        })
        .await
        .unwrap();
    });
    // A module heartbeating every 200 ms (a 1 s lease) through whichever member answers.
    let m = module(
        &endpoints.join(","),
        "alb",
        &http_backend("web"),
        "alb-1",
        "v1",
    );
    let leader = common::leader_of(nodes[0].as_ref().unwrap()).expect("a leader");
    nodes[(leader - 1) as usize].take().unwrap().kill9();
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let survivor = (0..3).find(|i| nodes[*i].is_some()).unwrap();
    eventually("a new leader", || {
        common::leader_of(nodes[survivor].as_ref().unwrap()).filter(|l| *l != leader)
    });
    rt.block_on(async {
        for i in (0..3).filter(|i| nodes[*i].is_some()) {
            let mut c = client(&endpoints[i]).await;
            // Each survivor serves what it has applied: wait for it to catch up, then compare.
            let began = Instant::now();
            let table = loop {
                let t = c
                    .get_routing_table(pb::GetRoutingTableRequest::default())
                    .await
                    .map(|t| t.into_inner());
                match t {
                    Ok(t) if t.entries.len() == 1 => break t,
                    other => assert!(began.elapsed() < WAIT, "member {}: {other:?}", i + 1),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            assert_eq!(table.entries[0].route.as_ref().unwrap().priority, 3);
            let t = c
                .get_active_version(pb::GetActiveVersionRequest {
                    module_type: pb::ModuleType::Alb as i32,
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!((t.active_version.as_str(), t.canary_percent), ("v1", 20));
            // The module was not evicted by the failover.
            let ids: Vec<String> = modules(&mut c)
                .await
                .into_iter()
                .map(|m| m.instance_id)
                .collect();
            assert_eq!(ids, ["alb-1"], "member {}", i + 1);
            let metrics = c
                .get_nlb_metrics(pb::GetNlbMetricsRequest {})
                .await
                .unwrap();
            assert_eq!(metrics.into_inner().evictions, 0, "member {}", i + 1);
        }
        // Its heartbeats go on after the failover (through a survivor)...
        let mut c = client(&endpoints[survivor]).await;
        let began = Instant::now();
        loop {
            let m = modules(&mut c).await;
            if m.first()
                .is_some_and(|m| m.last_heartbeat_ms > killed_at + 500)
            {
                break;
            }
            assert!(began.elapsed() < WAIT, "no heartbeat since the kill: {m:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // ...and it never had to register again: the failover changed nothing it saw.
        let registrations = m.stderr().matches("registered with the balancer").count();
        assert_eq!(registrations, 1, "{}", m.stderr());
        // And the survivors still take writes: a rollback during the canary goes back to v1.
        let mut c = client(&endpoints[survivor]).await;
        let t = c
            .rollback(pb::RollbackRequest {
                module_type: pb::ModuleType::Alb as i32,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(t.active_version, "v1");
        assert_eq!(
            t.weights,
            vec![pb::VersionWeight {
                version: "v1".into(),
                weight: 100
            }]
        );
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limit_holds_connections_under_a_burst() {
    let (_cfg, config) = dataplane_config();
    let node = Node::start(&["--config", &config]);
    let mut c = client(&node.grpc).await;
    let data = data_address(&mut c).await;
    let _cache = module(&node.grpc, "dblb", &redis_backend("cache"), "dblb-1", "v1");
    set_routes(
        &mut c,
        vec![route("cache", pb::Protocol::Redis, pb::ModuleType::Dblb, 1)],
    )
    .await;
    c.set_rate_limit(pb::SetRateLimitRequest {
        limit: Some(pb::RateLimit {
            target: "route:cache".into(),
            requests_per_second: 2,
            burst: 3,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let began = Instant::now();
    let mut answered = 0u64;
    for _ in 0..30 {
        let mut s = TcpStream::connect(&data).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
        let mut line = String::new();
        // A refused connection is closed without an answer.
        if BufReader::new(s).read_line(&mut line).is_ok_and(|n| n > 0) {
            assert_eq!(line, "+PONG cache\r\n");
            answered += 1;
        }
    }
    // The burst, plus what two per second refilled while the loop ran.
    let refilled = (began.elapsed().as_secs_f64() * 2.0).ceil() as u64;
    assert!(
        (3..=3 + refilled).contains(&answered),
        "{answered} of 30 connections got through"
    );
    let m = c
        .get_nlb_metrics(pb::GetNlbMetricsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.rate_limited, 30 - answered);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_connection_is_closed_and_bytes_count_while_it_lasts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        "[balancer]\nlisten = [\"127.0.0.1:0\"]\nidle_timeout_ms = 300\n",
    )
    .unwrap();
    let node = Node::start(&["--config", &path.display().to_string()]);
    let mut c = client(&node.grpc).await;
    let data = data_address(&mut c).await;
    let _cache = module(&node.grpc, "dblb", &redis_backend("cache"), "dblb-1", "v1");
    set_routes(
        &mut c,
        vec![route("cache", pb::Protocol::Redis, pb::ModuleType::Dblb, 1)],
    )
    .await;
    let mut s = TcpStream::connect(&data).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "+PONG cache\r\n");
    let quiet_from = Instant::now();
    // While the connection is open, its bytes are already counted.
    let m = c
        .get_nlb_metrics(pb::GetNlbMetricsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((m.bytes_in, m.bytes_out), (14, 13), "{:?}", m.traffic);
    assert_eq!(m.active_connections, 1);
    // Then it says nothing: the node closes it.
    line.clear();
    assert_eq!(r.read_line(&mut line).unwrap(), 0, "closed, not {line:?}");
    assert!(quiet_from.elapsed() >= Duration::from_millis(300));
    let began = Instant::now();
    loop {
        let m = c
            .get_nlb_metrics(pb::GetNlbMetricsRequest {})
            .await
            .unwrap()
            .into_inner();
        if m.active_connections == 0 {
            break;
        }
        assert!(began.elapsed() < WAIT, "{m:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = node.scrape();
    assert!(
        text.contains("lodge_balancer_idle_closed_total 1"),
        "{text}"
    );
}
