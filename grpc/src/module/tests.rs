//! The SDK against a stub balancer, with real TCP connections spliced to an echo backend.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::client::Channel;
use lodge_actors::balancer::{ModuleType, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::Code;

use super::stub::{Seen, StubBalancer};
use super::*;
use crate::balancer::convert::protocol_to_pb;
use crate::pb::balancer as pb;
use crate::pb::balancer::module_client::ModuleClient;

/// Bound on every wait; only turns a hang into a failure.
const WAIT: Duration = Duration::from_secs(20);

/// An echo server: every connection gets its bytes back, and its end of stream back as a
/// half-close.
async fn echo_backend() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// An address with nothing listening (bound, then released).
async fn dead_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().to_string()
}

/// A module under test: its handle, its data address (forwarding to an echo backend) and a
/// client of its Module service.
struct Fixture {
    module: ModuleHandle,
    data: String,
    client: ModuleClient<InterceptedService<Channel, control::Bearer>>,
    stop_server: Option<oneshot::Sender<()>>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.module.stop();
        if let Some(s) = self.stop_server.take() {
            let _ = s.send(());
        }
    }
}

async fn module_with(
    endpoints: Vec<String>,
    edit: impl FnOnce(&mut ModuleOptions),
    hooks: ModuleHooks,
) -> Fixture {
    let backend = echo_backend().await;
    let data_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ctl_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let data = data_l.local_addr().unwrap().to_string();
    let control = ctl_l.local_addr().unwrap().to_string();
    let mut opts = ModuleOptions::new(ModuleType::Alb, endpoints, &control, &data);
    opts.instance_id = "alb-test-1".into();
    opts.backoff_initial = Duration::from_millis(20);
    opts.backoff_max = Duration::from_millis(200);
    opts.call_timeout = Duration::from_secs(3);
    edit(&mut opts);
    let module = ModuleHandle::start(opts, hooks);
    let m = module.clone();
    tokio::spawn(async move {
        while let Ok((c, _)) = data_l.accept().await {
            if let Ok(g) = m.admit() {
                let b = backend.clone();
                tokio::spawn(async move {
                    let _ = splice::splice(g, c, &b, Duration::from_secs(5)).await;
                });
            }
        }
    });
    let svc = module.service();
    let (stop_server, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(TcpListenerStream::new(ctl_l), async {
                let _ = stopped.await;
            })
            .await;
    });
    let ch = crate::client::connect(&control, &Default::default())
        .await
        .unwrap();
    let bearer = control::Bearer::new(module.control_token());
    Fixture {
        module,
        data,
        client: ModuleClient::with_interceptor(ch, bearer),
        stop_server: Some(stop_server),
    }
}

async fn module(stub: &StubBalancer) -> Fixture {
    module_with(vec![stub.addr.clone()], |_| {}, ModuleHooks::default()).await
}

/// A connection through the module, proven established by one echoed round trip.
async fn connect(f: &Fixture) -> TcpStream {
    let mut s = TcpStream::connect(&f.data).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .expect("no echo")
        .unwrap();
    assert_eq!(&buf, b"ping");
    s
}

/// Whether the connection still carries bytes both ways.
async fn still_echoes(s: &mut TcpStream) -> bool {
    if s.write_all(b"x").await.is_err() {
        return false;
    }
    let mut b = [0u8; 1];
    matches!(tokio::time::timeout(WAIT, s.read(&mut b)).await, Ok(Ok(1)))
}

/// A heartbeat whose stats satisfy `f`. Heartbeats keep coming, so tests name the state they
/// wait for completely enough that an earlier beat cannot match.
fn beat_where(f: impl Fn(&pb::ModuleStats) -> bool) -> impl Fn(&Seen) -> bool {
    move |e| matches!(e, Seen::Heartbeat(h) if h.stats.as_ref().is_some_and(&f))
}

fn is_register(e: &Seen) -> bool {
    matches!(e, Seen::Register(_))
}

async fn wait_status(m: &ModuleHandle, what: &str, f: impl Fn(&LinkStatus) -> bool) {
    let mut rx = m.subscribe();
    tokio::time::timeout(WAIT, rx.wait_for(|s| f(s)))
        .await
        .unwrap_or_else(|_| panic!("{what}: not reached; status {:?}", m.link_status()))
        .unwrap();
}

#[tokio::test]
async fn module_registers_with_its_fields_and_heartbeats_real_connection_counts() {
    let mut stub = StubBalancer::start(50).await.unwrap();
    let f = module_with(
        vec![stub.addr.clone()],
        |o| {
            o.version = "1.2.3".into();
            o.max_connections = 10;
            o.metadata = HashMap::from([("zone".to_string(), "a".to_string())]);
            o.health_check = Some(pb::HealthCheckConfig {
                kind: pb::HealthCheckKind::Tcp as i32,
                interval_ms: 1000,
                ..Default::default()
            });
        },
        ModuleHooks::default(),
    )
    .await;
    let Some(Seen::Register(r)) = stub.next(WAIT, is_register).await else {
        panic!("no registration")
    };
    assert_eq!(r.instance_id, "alb-test-1");
    assert_eq!(r.module_type, pb::ModuleType::Alb as i32);
    assert_eq!(r.version, "1.2.3");
    assert_eq!(r.data_address, f.data);
    assert_eq!(r.control_address, f.module.options().control_address);
    assert_eq!(r.max_connections, 10);
    assert_eq!(r.metadata.get("zone").map(String::as_str), Some("a"));
    assert_eq!(r.health_check.map(|h| h.interval_ms), Some(1000));
    let alb: Vec<i32> = ModuleType::Alb
        .protocols()
        .iter()
        .map(|p| protocol_to_pb(*p) as i32)
        .collect();
    assert_eq!(r.protocols, alb);
    assert_eq!(f.module.wait_registered(WAIT).await.unwrap(), "alb-test-1");

    let mut a = connect(&f).await;
    let b = connect(&f).await;
    let Some(Seen::Heartbeat(h)) = stub
        .next(
            WAIT,
            beat_where(|s| s.active_connections == 2 && s.bytes_in == 8 && s.bytes_out == 8),
        )
        .await
    else {
        panic!("no heartbeat counting 2 connections and their bytes")
    };
    assert_eq!(h.instance_id, "alb-test-1");
    assert_eq!(h.health, pb::HealthStatus::Healthy as i32);
    let s = h.stats.unwrap();
    assert_eq!(s.total_connections, 2);
    assert_eq!((s.bytes_in, s.bytes_out), (8, 8));
    assert_eq!(s.queue_depth, 0);
    assert!(s.memory_bytes > 0 && s.memory_percent > 0.0, "{s:?}");
    assert!(s.uptime_ms > 0);
    assert!(s.latency_ms >= 0.0);

    drop(b);
    stub.next(
        WAIT,
        beat_where(|s| s.active_connections == 1 && s.total_connections == 2),
    )
    .await
    .expect("no heartbeat counting 1 connection");
    assert!(still_echoes(&mut a).await);
    let st = f.module.link_status();
    assert!(st.registered && st.connected);
    assert_eq!(st.interval, Duration::from_millis(50));
    assert_eq!(st.registrations, 1);
}

#[tokio::test]
async fn module_registers_again_when_told_and_follows_the_new_interval() {
    let mut stub = StubBalancer::start(50).await.unwrap();
    let f = module(&stub).await;
    stub.next(WAIT, is_register).await.expect("registration");
    stub.answer_next_heartbeat(pb::HeartbeatResponse {
        re_register_required: true,
        ..Default::default()
    });
    let Some(Seen::Register(r)) = stub.next(WAIT, is_register).await else {
        panic!("no second registration")
    };
    assert_eq!(r.instance_id, "alb-test-1");
    wait_status(&f.module, "two registrations", |s| {
        s.registrations == 2 && s.registered
    })
    .await;
    stub.set_interval(120);
    wait_status(&f.module, "the new interval", |s| {
        s.interval == Duration::from_millis(120)
    })
    .await;
}

#[tokio::test]
async fn module_sheds_its_oldest_connection_and_ignores_unknown_instructions() {
    let mut stub = StubBalancer::start(50).await.unwrap();
    let f = module(&stub).await;
    stub.next(WAIT, is_register).await.expect("registration");
    let mut oldest = connect(&f).await;
    let mut middle = connect(&f).await;
    let mut newest = connect(&f).await;
    stub.answer_next_heartbeat(pb::HeartbeatResponse {
        instructions: vec!["shed-connections 1".into(), "frobnicate 3".into()],
        ..Default::default()
    });
    // The oldest is closed: its read ends.
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(WAIT, oldest.read(&mut buf))
        .await
        .expect("the oldest connection was not closed");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(still_echoes(&mut middle).await);
    assert!(still_echoes(&mut newest).await);
    wait_status(&f.module, "instructions followed", |s| {
        s.shed_requested == 1 && s.ignored_instructions == 1
    })
    .await;
    stub.next(
        WAIT,
        beat_where(|s| s.active_connections == 2 && s.total_connections == 3),
    )
    .await
    .expect("a heartbeat counting the 2 left");
}

#[tokio::test]
async fn module_records_scaling_and_runs_the_reload_hook() {
    let mut stub = StubBalancer::start(50).await.unwrap();
    let reloads = Arc::new(AtomicU32::new(0));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let r = reloads.clone();
    let hooks = ModuleHooks {
        reload: Some(Arc::new(move || {
            let n = r.fetch_add(1, Ordering::SeqCst) + 1;
            let _ = tx.send(n);
            Box::pin(async move { Ok(format!("reload {n}")) })
        })),
        ..Default::default()
    };
    let mut f = module_with(vec![stub.addr.clone()], |_| {}, hooks).await;
    stub.next(WAIT, is_register).await.expect("registration");
    stub.answer_next_heartbeat(pb::HeartbeatResponse {
        should_reload: true,
        should_scale: true,
        desired_instances: 4,
        ..Default::default()
    });
    assert_eq!(
        tokio::time::timeout(WAIT, rx.recv()).await.unwrap(),
        Some(1)
    );
    wait_status(&f.module, "scaling recorded", |s| {
        s.desired_instances == Some(4) && s.reloads_requested == 1
    })
    .await;
    // The Reload call runs the same hook and says what it did.
    let r = f
        .client
        .reload(pb::ReloadRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(r.reloaded);
    assert_eq!(r.message, "reload 2");
}

#[tokio::test]
async fn module_drains_by_unregistering_gracefully_and_waiting_for_its_connections() {
    let mut stub = StubBalancer::start(50).await.unwrap();
    let mut f = module(&stub).await;
    stub.next(WAIT, is_register).await.expect("registration");
    let mut conn = connect(&f).await;
    let m = f.module.clone();
    let drain = tokio::spawn(async move { m.drain(WAIT).await });
    let Some(Seen::Unregister(u)) = stub.next(WAIT, |e| matches!(e, Seen::Unregister(_))).await
    else {
        panic!("no UnregisterModule")
    };
    assert_eq!(u.instance_id, "alb-test-1");
    assert!(u.graceful);
    assert_eq!(u.drain_timeout_ms, WAIT.as_millis() as u32);
    // The connection is still open, so the drain cannot have ended.
    assert!(!drain.is_finished());
    assert!(f.module.is_draining());
    // Draining: no new routes, STOPPING, and the connection still works.
    let route = pb::Route {
        route_id: "web".into(),
        protocol: pb::Protocol::Http as i32,
        target: pb::ModuleType::Alb as i32,
        ..Default::default()
    };
    let c = f
        .client
        .can_handle(pb::CanHandleRequest { route: Some(route) })
        .await
        .unwrap()
        .into_inner();
    assert!(!c.can_handle);
    assert!(c.reason.contains("draining"), "{}", c.reason);
    let h = f
        .client
        .health_check(pb::HealthCheckRequest { deep: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.health, pb::HealthStatus::Stopping as i32);
    assert!(still_echoes(&mut conn).await);

    drop(conn);
    let report = tokio::time::timeout(WAIT, drain).await.unwrap().unwrap();
    assert_eq!((report.drained, report.remaining), (1, 0));
    assert!(report.balancer.is_ok(), "{:?}", report.balancer);
    assert_eq!(f.module.health().0, pb::HealthStatus::Stopped);
    // A second drain gets the first one's report.
    assert_eq!(f.module.drain(WAIT).await, report);
}

#[tokio::test]
async fn module_forwards_type_wide_calls_with_its_type() {
    let mut stub = StubBalancer::start(50).await.unwrap();
    let mut f = module(&stub).await;
    stub.next(WAIT, is_register).await.expect("registration");
    let t = f
        .client
        .set_traffic_weight(pb::SetTrafficWeightRequest {
            module_type: 0,
            version: "v2".into(),
            weight: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.active_version, "v2");
    let Some(Seen::SetTrafficWeight(w)) = stub
        .next(WAIT, |e| matches!(e, Seen::SetTrafficWeight(_)))
        .await
    else {
        panic!("SetTrafficWeight did not reach the balancer")
    };
    assert_eq!(
        (w.module_type, w.version.as_str(), w.weight),
        (pb::ModuleType::Alb as i32, "v2", 10)
    );

    // Another type's weights are not this module's to change.
    let e = f
        .client
        .set_traffic_weight(pb::SetTrafficWeightRequest {
            module_type: pb::ModuleType::Dblb as i32,
            version: "v2".into(),
            weight: 10,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("module_type: "), "{}", e.message());

    // The balancer's refusal comes back as it is.
    stub.fail_next_forwarded(tonic::Status::failed_precondition(
        "nothing to roll back to",
    ));
    let e = f
        .client
        .rollback(pb::RollbackRequest { module_type: 0 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(e.message(), "nothing to roll back to");

    let s = f
        .client
        .scale(pb::ScaleRequest {
            config: Some(pb::ScalingConfig {
                min_instances: 2,
                max_instances: 5,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s.config.map(|c| (c.module_type, c.max_instances)),
        Some((pb::ModuleType::Alb as i32, 5))
    );
    let list = f
        .client
        .get_instances(pb::GetInstancesRequest {})
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = list
        .modules
        .iter()
        .map(|m| m.instance_id.as_str())
        .collect();
    assert_eq!(ids, ["alb-test-1"]);
    let Some(Seen::ListModules(l)) = stub.next(WAIT, |e| matches!(e, Seen::ListModules(_))).await
    else {
        panic!("no ListModules")
    };
    assert_eq!(l.module_type, pb::ModuleType::Alb as i32);
}

#[tokio::test]
async fn module_skips_a_dead_endpoint_and_fails_over_to_the_next() {
    let dead = dead_addr().await;
    let mut a = StubBalancer::start(50).await.unwrap();
    let mut b = StubBalancer::start(50).await.unwrap();
    let f = module_with(
        vec![dead, a.addr.clone(), b.addr.clone()],
        |_| {},
        ModuleHooks::default(),
    )
    .await;
    a.next(WAIT, is_register)
        .await
        .expect("registered on the live one");
    assert_eq!(f.module.link_status().endpoint, Some(a.addr.clone()));
    a.stop().await;
    // The next node does not know the instance: it says so, and the module registers there.
    let Some(Seen::Register(r)) = b.next(WAIT, is_register).await else {
        panic!("no registration on the second node")
    };
    assert_eq!(r.instance_id, "alb-test-1");
    b.next(WAIT, |e| matches!(e, Seen::Heartbeat(_)))
        .await
        .expect("heartbeats on the second node");
    assert_eq!(f.module.link_status().endpoint, Some(b.addr.clone()));
}

#[tokio::test]
async fn module_service_checks_what_it_is_given() {
    let stub = StubBalancer::start(50).await.unwrap();
    let settings = Settings {
        values: [("backend".to_string(), "127.0.0.1:1".to_string())].into(),
        validate: Arc::new(|_, v| {
            if v.contains(':') {
                Ok(())
            } else {
                Err(format!("{v:?} is not host:port"))
            }
        }),
        on_change: None,
    };
    let hooks = ModuleHooks {
        settings: Some(settings),
        deep_check: Some(Arc::new(|| {
            Box::pin(async {
                vec![pb::Check {
                    name: "backend".into(),
                    ok: false,
                    message: "connection refused".into(),
                    duration_ms: 1,
                }]
            })
        })),
        ..Default::default()
    };
    let mut f = module_with(vec![stub.addr.clone()], |_| {}, hooks).await;
    let c = &mut f.client;

    // Routes: bad ones are named; only local route ids are handled, at their priority.
    let web = pb::Route {
        route_id: "web".into(),
        protocol: pb::Protocol::Http as i32,
        priority: 9,
        target: pb::ModuleType::Alb as i32,
        ..Default::default()
    };
    let bad = pb::Route {
        route_id: "bad".into(),
        path_pattern: "nope".into(),
        ..web.clone()
    };
    let e = c
        .update_routes(pb::UpdateRoutesRequest {
            routes: vec![web.clone(), bad],
            replace_all: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("routes[1].path_pattern: "),
        "{}",
        e.message()
    );
    let r = c
        .update_routes(pb::UpdateRoutesRequest {
            routes: vec![web.clone()],
            replace_all: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.routes, vec![web.clone()]);
    let ask = |route: pb::Route| pb::CanHandleRequest { route: Some(route) };
    let a = c.can_handle(ask(web.clone())).await.unwrap().into_inner();
    assert_eq!((a.can_handle, a.priority), (true, 9));
    let other = pb::Route {
        route_id: "api".into(),
        ..web.clone()
    };
    let a = c.can_handle(ask(other)).await.unwrap().into_inner();
    assert!(!a.can_handle);
    let mysql = pb::Route {
        protocol: pb::Protocol::Mysql as i32,
        ..web.clone()
    };
    let a = c.can_handle(ask(mysql)).await.unwrap().into_inner();
    assert!(!a.can_handle && a.reason.contains("mysql"), "{}", a.reason);
    let e = c
        .can_handle(ask(pb::Route {
            source_pattern: "10.0.0.0/33".into(),
            ..web.clone()
        }))
        .await
        .unwrap_err();
    assert!(
        e.message().starts_with("route.source_pattern: "),
        "{}",
        e.message()
    );
    let e = c
        .delete_route(pb::DeleteRouteRequest {
            route_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(
        c.delete_route(pb::DeleteRouteRequest {
            route_id: "web".into()
        })
        .await
        .unwrap()
        .into_inner()
        .deleted
    );
    assert!(c
        .get_routes(pb::GetRoutesRequest {})
        .await
        .unwrap()
        .into_inner()
        .routes
        .is_empty());

    // Rate limits: validated, listed, enforced for "*".
    let e = c
        .set_rate_limit(pb::SetRateLimitRequest {
            limit: Some(pb::RateLimit {
                target: "*".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("limit.requests_per_second: "));
    c.set_rate_limit(pb::SetRateLimitRequest {
        limit: Some(pb::RateLimit {
            target: "*".into(),
            requests_per_hour: 1,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let _first = connect(&f).await;
    let mut second = TcpStream::connect(&f.data).await.unwrap();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(WAIT, second.read(&mut buf))
        .await
        .expect("a connection over the limit is closed at once");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let c = &mut f.client;
    let stats = c
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((stats.total_connections, stats.errors_total), (1, 1));
    let limits = c
        .get_rate_limits(pb::GetRateLimitsRequest {})
        .await
        .unwrap()
        .into_inner()
        .limits;
    assert_eq!(limits.len(), 1);
    assert!(
        c.remove_rate_limit(pb::RemoveRateLimitRequest { target: "*".into() })
            .await
            .unwrap()
            .into_inner()
            .removed
    );

    // Settings: unknown keys and bad values are named; validate_only writes nothing.
    let upd = |k: &str, v: &str, validate_only: bool| pb::UpdateConfigRequest {
        settings: [(k.to_string(), v.to_string())].into(),
        validate_only,
    };
    let e = c
        .update_config(upd("colour", "blue", false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("settings[\"colour\"]: unknown"),
        "{}",
        e.message()
    );
    let e = c
        .update_config(upd("backend", "nohost", false))
        .await
        .unwrap_err();
    assert!(
        e.message().starts_with("settings[\"backend\"]: "),
        "{}",
        e.message()
    );
    let r = c
        .update_config(upd("backend", "10.0.0.1:80", true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.settings["backend"], "10.0.0.1:80");
    let now = c
        .get_config(pb::GetConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(now.settings["backend"], "127.0.0.1:1");
    c.update_config(upd("backend", "10.0.0.1:80", false))
        .await
        .unwrap();
    assert_eq!(f.module.settings()["backend"], "10.0.0.1:80");

    // Health: shallow is the module's own; deep adds the hook's checks.
    let c = &mut f.client;
    let h = c
        .health_check(pb::HealthCheckRequest { deep: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.health, pb::HealthStatus::Healthy as i32);
    assert!(h.checks.is_empty());
    let h = c
        .health_check(pb::HealthCheckRequest { deep: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.health, pb::HealthStatus::Unhealthy as i32);
    assert_eq!(h.checks.len(), 1);
    assert!(h.message.contains("connection refused"), "{}", h.message);

    // Metrics: the stats by name plus the module's own.
    f.module
        .record_metric("cache_hits", 3.0, Default::default());
    let m = f
        .client
        .get_metrics(pb::GetMetricsRequest {
            names: vec!["cache_hits".into(), "module_active_connections".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .metrics;
    let named: Vec<(&str, f64)> = m.iter().map(|p| (p.name.as_str(), p.value)).collect();
    assert_eq!(
        named,
        [("module_active_connections", 1.0), ("cache_hits", 3.0)]
    );

    let st = f
        .client
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.active_connections, 1);
    assert_eq!(st.module_type, pb::ModuleType::Alb as i32);
    assert_eq!(st.data_address, f.data);
    let _ = Protocol::Tcp;
}

#[tokio::test]
async fn module_streams_stats_at_the_interval_asked() {
    let stub = StubBalancer::start(50).await.unwrap();
    let mut f = module(&stub).await;
    let _c = connect(&f).await;
    let mut s = f
        .client
        .stream_metrics(pb::StreamMetricsRequest { interval_ms: 1 })
        .await
        .unwrap()
        .into_inner();
    let t0 = tokio::time::Instant::now();
    for _ in 0..2 {
        let st = tokio::time::timeout(WAIT, s.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(st.active_connections, 1);
    }
    // Asked for 1 ms, given the floor of 100 ms.
    assert!(
        t0.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn module_shutdown_drains_then_asks_the_process_to_exit() {
    let mut stub = StubBalancer::start(50).await.unwrap();
    let mut f = module(&stub).await;
    stub.next(WAIT, is_register).await.expect("registration");
    let r = f
        .client
        .shutdown(pb::ShutdownRequest {
            graceful: true,
            drain_timeout_ms: 5000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.drained_connections, r.remaining_connections), (0, 0));
    tokio::time::timeout(WAIT, f.module.exit_requested())
        .await
        .expect("exit not requested");
    let Some(Seen::Unregister(u)) = stub.next(WAIT, |e| matches!(e, Seen::Unregister(_))).await
    else {
        panic!("no UnregisterModule")
    };
    assert!(u.graceful);
    assert_eq!(u.drain_timeout_ms, 5000);
}

#[tokio::test]
async fn control_calls_without_the_registered_token_are_refused_and_change_nothing() {
    let mut stub = StubBalancer::start(50).await.unwrap();
    let f = module(&stub).await;
    let Some(Seen::Register(r)) = stub.next(WAIT, is_register).await else {
        panic!("no registration")
    };
    assert_eq!(r.control_token, f.module.control_token());
    assert_eq!(r.control_token.len(), 64);
    let mut conn = connect(&f).await;

    let ch = crate::client::connect(&f.module.options().control_address, &Default::default())
        .await
        .unwrap();
    let mut anonymous = ModuleClient::new(ch.clone());
    let mut forged = ModuleClient::with_interceptor(ch, control::Bearer::new(&"0".repeat(64)));
    let shutdown = || pb::ShutdownRequest {
        graceful: false,
        drain_timeout_ms: 1,
    };
    let e = anonymous.shutdown(shutdown()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("authorization: Bearer"), "{e:?}");
    let e = forged.shutdown(shutdown()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(
        e.message().contains("not the one it registered with"),
        "{e:?}"
    );
    let e = anonymous
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    // Nothing happened: the module still serves, and its balancer's calls still work.
    assert!(still_echoes(&mut conn).await);
    let mut own = f.client.clone();
    let stats = own.get_stats(pb::GetStatsRequest {}).await.unwrap();
    assert_eq!(stats.into_inner().active_connections, 1);
    assert!(!f.module.shared.draining.load(Ordering::SeqCst));
}
