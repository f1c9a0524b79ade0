//! The balancer's actors and operations in a real runtime, over the in-memory store and a
//! scripted probe standing in for the module instances.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::handle::{BalancerHandle, RegisterModule, RoutingUpdate};
use super::metrics::BalancerMetrics;
use super::model::{CheckKind, HealthCheckSpec, RateLimitSpec, ReportedHealth, Stats};
use super::probe::{CanHandle, ModuleProbe, ProbeFuture, Target};
use super::*;
use crate::cluster::store::{MemoryStore, Store};
use crate::introspect::EventKind;
use crate::{Backoff, ChildSpec, Runtime, RuntimeConfig, Strategy, SupervisorSpec};

/// Module instances as the tests script them.
#[derive(Default)]
struct Script {
    /// (instance, route) pairs that answer CanHandle with no.
    refuse: HashSet<(String, String)>,
    /// Instances whose health checks fail.
    sick: HashSet<String>,
    /// Active connections each instance answers, one value per call (the last repeats).
    connections: HashMap<String, VecDeque<u64>>,
    can_handle_calls: u64,
}

#[derive(Clone, Default)]
struct FakeProbe(Arc<Mutex<Script>>);

impl ModuleProbe for FakeProbe {
    fn can_handle(&self, t: &Target, route: &Route, _: Duration) -> ProbeFuture<CanHandle> {
        let mut s = self.0.lock().unwrap();
        s.can_handle_calls += 1;
        let no = s
            .refuse
            .contains(&(t.instance_id.clone(), route.route_id.clone()));
        Box::pin(std::future::ready(Ok(CanHandle {
            can_handle: !no,
            priority: 0,
            reason: if no { "not mine".into() } else { String::new() },
        })))
    }

    fn health_check(&self, t: &Target, _: CheckKind, _: bool, _: Duration) -> ProbeFuture<()> {
        let sick = self.0.lock().unwrap().sick.contains(&t.instance_id);
        Box::pin(std::future::ready(if sick {
            Err("connection refused".into())
        } else {
            Ok(())
        }))
    }

    fn active_connections(&self, t: &Target, _: Duration) -> ProbeFuture<u64> {
        let mut s = self.0.lock().unwrap();
        let q = s.connections.entry(t.instance_id.clone()).or_default();
        let n = if q.len() > 1 {
            q.pop_front()
        } else {
            q.front().copied()
        };
        Box::pin(std::future::ready(Ok(n.unwrap_or(0))))
    }
}

struct Balancer {
    _rt: Runtime,
    handle: BalancerHandle,
    store: MemoryStore,
    probe: FakeProbe,
    metrics: Arc<BalancerMetrics>,
}

async fn balancer() -> Balancer {
    balancer_with(None, false).await
}

async fn balancer_with(hook: Option<Arc<super::hook::DeployHook>>, leads: bool) -> Balancer {
    let store = MemoryStore::new();
    let probe = FakeProbe::default();
    let metrics = Arc::new(BalancerMetrics::default());
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let shared: Arc<dyn Store> = Arc::new(store.clone());
    let parts = Arc::new(BalancerParts::new(
        shared,
        Arc::new(probe.clone()),
        metrics.clone(),
        hook,
        1,
        Arc::new(move || leads),
        &log,
    ));
    let handle = parts.handle.clone();
    let spec = BalancerParts::supervisor(parts);
    let root = SupervisorSpec::new(Strategy::OneForOne, move || {
        vec![ChildSpec::supervisor("balancer", spec.clone()).0]
    });
    let config = RuntimeConfig {
        worker_arbiters: 2,
        backoff: Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(10),
            jitter: 0.5,
        },
        ..RuntimeConfig::default()
    };
    let rt = Runtime::start(config, log, root);
    let mut events = rt.actor_table().subscribe();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let e = events.recv().await.unwrap();
            if &*e.path == "/node/balancer/state" && e.event == EventKind::Started {
                return;
            }
        }
    })
    .await
    .expect("the state actor started");
    // Loaded: the first write waits for the state actor to apply it.
    let b = Balancer {
        _rt: rt,
        handle,
        store,
        probe,
        metrics,
    };
    b.handle
        .update_settings(Default::default())
        .await
        .expect("settings");
    b
}

fn module(id: &str, t: ModuleType, version: &str) -> RegisterModule {
    RegisterModule {
        instance_id: id.into(),
        module_type: Some(t),
        version: version.into(),
        control_address: "127.0.0.1:9000".into(),
        data_address: format!("127.0.0.1:{}", 10000 + id.len()),
        ..Default::default()
    }
}

fn route(id: &str, p: Protocol, target: ModuleType, priority: i32) -> Route {
    Route {
        route_id: id.into(),
        protocol: p,
        source_pattern: String::new(),
        destination_pattern: String::new(),
        source_port: 0,
        destination_port: 0,
        path_pattern: String::new(),
        headers: BTreeMap::new(),
        priority,
        target,
    }
}

fn http(path: &str) -> Flow {
    Flow {
        protocol: Protocol::Http,
        source: "10.0.0.7".into(),
        destination: "shop.example.com".into(),
        destination_port: 80,
        path: path.into(),
        ..Default::default()
    }
}

async fn set_routes(b: &Balancer, routes: Vec<Route>) {
    b.handle
        .update_routing(RoutingUpdate {
            routes,
            replace_all: true,
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn chosen(b: &Balancer, flow: &Flow) -> String {
    b.handle
        .decide(flow, false, &[])
        .await
        .unwrap()
        .instance
        .record
        .instance_id
        .clone()
}

/// Polls `cond` until it holds (the actors work in the background); fails after 10 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[actix_rt::test]
async fn registration_heartbeats_and_replacement() {
    let b = balancer().await;
    let r = b
        .handle
        .register(module("alb-1", ModuleType::Alb, "v1"))
        .await
        .unwrap();
    assert_eq!((r.instance_id.as_str(), r.replaced), ("alb-1", false));
    assert_eq!((r.interval_ms, r.max_missed), (10_000, 3));
    let lease = b.handle.view().instances["alb-1"].lease;

    let stats = Stats {
        active_connections: 4,
        cpu_percent: 12.5,
        ..Default::default()
    };
    let a = b
        .handle
        .heartbeat("alb-1", stats, ReportedHealth::Healthy)
        .await
        .unwrap();
    assert!(!a.re_register && !a.should_reload && a.instructions.is_empty());
    let report = b.handle.view().instances["alb-1"].report.clone().unwrap();
    assert_eq!(report.stats.active_connections, 4);

    let unknown = b
        .handle
        .heartbeat("nope", Stats::default(), ReportedHealth::Healthy);
    assert!(unknown.await.unwrap().re_register);

    // The same id again replaces the registration; the old lease is gone.
    let again = b
        .handle
        .register(module("alb-1", ModuleType::Alb, "v2"))
        .await
        .unwrap();
    assert!(again.replaced);
    let view = b.handle.view();
    assert_eq!(view.instances["alb-1"].record.version, "v2");
    assert_ne!(view.instances["alb-1"].lease, lease);
    assert!(b.store.keep_alive(lease).await.is_err());

    let e = b
        .handle
        .register(module("bad id", ModuleType::Alb, "v1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, BalancerError::Invalid(m) if m.starts_with("instance_id:")),
        "{e:?}"
    );
    let mut m = module("alb-2", ModuleType::Alb, "v1");
    m.data_address = "nowhere".into();
    let e = b.handle.register(m).await.unwrap_err();
    assert!(
        matches!(&e, BalancerError::Invalid(m) if m.starts_with("data_address:")),
        "{e:?}"
    );
}

#[actix_rt::test]
async fn an_expired_lease_evicts_the_instance_everywhere() {
    let b = balancer().await;
    b.handle
        .register(module("db-1", ModuleType::Dblb, "v1"))
        .await
        .unwrap();
    let lease = b.handle.view().instances["db-1"].lease;
    b.store.expire(lease);
    let h = b.handle.clone();
    eventually("the eviction applied", || {
        !h.view().instances.contains_key("db-1")
    })
    .await;
    assert_eq!(b.metrics.evictions.get(), 1);
    let beat = b
        .handle
        .heartbeat("db-1", Stats::default(), ReportedHealth::Healthy);
    assert!(beat.await.unwrap().re_register);
}

#[actix_rt::test]
async fn routes_are_tried_by_priority_and_refusals_are_explained() {
    let b = balancer().await;
    b.handle
        .register(module("alb-1", ModuleType::Alb, "v1"))
        .await
        .unwrap();
    b.handle
        .register(module("ai-1", ModuleType::Ailb, "v1"))
        .await
        .unwrap();
    let mut api = route("api", Protocol::Http, ModuleType::Ailb, 10);
    api.path_pattern = "/v1/*".into();
    set_routes(
        &b,
        vec![route("web", Protocol::Http, ModuleType::Alb, 1), api],
    )
    .await;
    assert_eq!(chosen(&b, &http("/v1/chat")).await, "ai-1");
    assert_eq!(chosen(&b, &http("/index.html")).await, "alb-1");

    // The AI instance refuses the route: the lower-priority route takes the flow.
    b.probe
        .0
        .lock()
        .unwrap()
        .refuse
        .insert(("ai-1".into(), "api".into()));
    // A new table revision asks again.
    let mut api = route("api", Protocol::Http, ModuleType::Ailb, 11);
    api.path_pattern = "/v1/*".into();
    b.handle
        .update_routing(RoutingUpdate {
            routes: vec![api],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(chosen(&b, &http("/v1/chat")).await, "alb-1");

    let redis = Flow {
        protocol: Protocol::Redis,
        ..http("")
    };
    let e = b.handle.decide(&redis, false, &[]).await.unwrap_err();
    assert!(
        matches!(&e, BalancerError::NotFound(m) if m.starts_with("no route matches redis")),
        "{e:?}"
    );

    set_routes(&b, vec![route("db", Protocol::Redis, ModuleType::Dblb, 1)]).await;
    let e = b.handle.decide(&redis, false, &[]).await.unwrap_err();
    assert!(
        matches!(&e, BalancerError::Unavailable(m) if m.contains("no dblb instance is registered")),
        "{e:?}"
    );
    assert_eq!(b.metrics.decisions_of("no_instance"), 1);
    assert_eq!(b.metrics.decisions_of("no_route"), 1);
}

#[actix_rt::test]
async fn the_least_loaded_instance_wins_and_a_full_one_is_never_chosen() {
    let b = balancer().await;
    let mut small = module("alb-small", ModuleType::Alb, "v1");
    small.max_connections = 2;
    b.handle.register(small).await.unwrap();
    b.handle
        .register(module("alb-big", ModuleType::Alb, "v1"))
        .await
        .unwrap();
    set_routes(&b, vec![route("web", Protocol::Http, ModuleType::Alb, 1)]).await;
    let busy = Stats {
        active_connections: 2,
        ..Default::default()
    };
    b.handle
        .heartbeat("alb-small", busy, ReportedHealth::Healthy)
        .await
        .unwrap();
    let idle = Stats {
        cpu_percent: 90.0,
        ..Default::default()
    };
    b.handle
        .heartbeat("alb-big", idle, ReportedHealth::Healthy)
        .await
        .unwrap();
    // alb-small has the lower score on nothing: it is full, so alb-big takes everything.
    for _ in 0..20 {
        assert_eq!(chosen(&b, &http("/")).await, "alb-big");
    }
    b.handle
        .heartbeat("alb-small", Stats::default(), ReportedHealth::Healthy)
        .await
        .unwrap();
    // Now alb-small is idle (score 0) and alb-big is at 90 % CPU.
    assert_eq!(chosen(&b, &http("/")).await, "alb-small");
}

#[actix_rt::test]
async fn the_version_split_follows_the_weights_and_rollback_restores_the_old_version() {
    let b = balancer().await;
    for (id, v) in [("a1", "v1"), ("a2", "v1"), ("b1", "v2")] {
        b.handle
            .register(module(id, ModuleType::Alb, v))
            .await
            .unwrap();
    }
    set_routes(&b, vec![route("web", Protocol::Http, ModuleType::Alb, 1)]).await;
    b.handle
        .promote(ModuleType::Alb, "v1", false, 0, 0)
        .await
        .unwrap();
    b.handle
        .set_weight(ModuleType::Alb, "v2", 10)
        .await
        .unwrap();
    let mut by_version: HashMap<String, u32> = HashMap::new();
    for _ in 0..10_000 {
        let d = b.handle.decide(&http("/"), false, &[]).await.unwrap();
        *by_version
            .entry(d.instance.record.version.clone())
            .or_default() += 1;
    }
    let v2 = by_version["v2"];
    assert!(
        (800..=1200).contains(&v2),
        "v2 got {v2} of 10,000 at a 10 % weight"
    );
    assert_eq!(by_version["v1"] + v2, 10_000);

    // Rollback during the canary: all of the traffic back on the old version (MarchProxy sent
    // it all to the new one).
    let t = b.handle.rollback(ModuleType::Alb).await.unwrap();
    assert_eq!(t.value.active, "v1");
    for _ in 0..100 {
        let d = b.handle.decide(&http("/"), false, &[]).await.unwrap();
        assert_eq!(d.instance.record.version, "v1");
    }
    let e = b.handle.rollback(ModuleType::Alb).await.unwrap_err();
    assert!(matches!(e, BalancerError::Precondition(_)), "{e:?}");
}

#[actix_rt::test]
async fn a_rate_limit_holds_under_a_burst() {
    let b = balancer().await;
    b.handle
        .register(module("alb-1", ModuleType::Alb, "v1"))
        .await
        .unwrap();
    set_routes(&b, vec![route("web", Protocol::Http, ModuleType::Alb, 1)]).await;
    b.handle
        .set_limit(RateLimitSpec {
            target: "route:web".into(),
            per_second: 5,
            per_minute: 0,
            per_hour: 0,
            burst: 5,
        })
        .await
        .unwrap();
    let began = Instant::now();
    let mut admitted = 0u64;
    for _ in 0..200 {
        match b.handle.decide(&http("/"), false, &[]).await {
            Ok(_) => admitted += 1,
            Err(BalancerError::Exhausted(m)) => assert!(m.contains("route:web"), "{m}"),
            Err(e) => panic!("{e:?}"),
        }
    }
    // The burst, plus what the rate refilled while the loop ran.
    let refilled = (began.elapsed().as_secs_f64() * 5.0).ceil() as u64;
    assert!(
        admitted >= 5 && admitted <= 5 + refilled,
        "admitted {admitted}"
    );
    assert_eq!(b.metrics.rate_limited.get(), 200 - admitted);
    // A dry run spends nothing and is not refused.
    assert!(b.handle.decide(&http("/"), true, &[]).await.is_ok());
    assert!(b.handle.remove_limit("route:web").await.unwrap());
    assert!(b.handle.decide(&http("/"), false, &[]).await.is_ok());
}

#[actix_rt::test]
async fn a_graceful_unregistration_drains_then_removes() {
    let b = balancer().await;
    b.handle
        .register(module("alb-1", ModuleType::Alb, "v1"))
        .await
        .unwrap();
    b.handle
        .register(module("alb-2", ModuleType::Alb, "v1"))
        .await
        .unwrap();
    set_routes(&b, vec![route("web", Protocol::Http, ModuleType::Alb, 1)]).await;
    b.probe
        .0
        .lock()
        .unwrap()
        .connections
        .insert("alb-1".into(), VecDeque::from([3, 2, 1, 0]));
    let h = b.handle.clone();
    let drain =
        tokio::spawn(async move { h.unregister("alb-1", true, Duration::from_secs(10)).await });
    // While it drains, nothing new goes to it.
    let h = b.handle.clone();
    eventually("draining applied", || {
        h.view()
            .instances
            .get("alb-1")
            .is_none_or(|i| i.record.draining.is_some())
    })
    .await;
    for _ in 0..10 {
        assert_eq!(chosen(&b, &http("/")).await, "alb-2");
    }
    let d = drain.await.unwrap().unwrap();
    assert_eq!((d.drained, d.remaining), (3, 0));
    let h = b.handle.clone();
    eventually("removed", || !h.view().instances.contains_key("alb-1")).await;
    assert_eq!(
        b.metrics.evictions.get(),
        0,
        "an unregistration is not an eviction"
    );

    // A drain that times out says how many connections it cut.
    b.probe
        .0
        .lock()
        .unwrap()
        .connections
        .insert("alb-2".into(), VecDeque::from([2]));
    let d = b
        .handle
        .unregister("alb-2", true, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!((d.drained, d.remaining), (0, 2));
    let e = b
        .handle
        .unregister("alb-2", false, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(e, BalancerError::NotFound(_)), "{e:?}");
}

#[actix_rt::test]
async fn failing_health_checks_take_an_instance_out_until_it_recovers() {
    let b = balancer().await;
    let mut m = module("alb-1", ModuleType::Alb, "v1");
    m.health_check = Some(HealthCheckSpec {
        kind: CheckKind::Tcp,
        interval_ms: 100,
        timeout_ms: 50,
        healthy_threshold: 1,
        unhealthy_threshold: 2,
        deep: false,
    });
    b.handle.register(m).await.unwrap();
    set_routes(&b, vec![route("web", Protocol::Http, ModuleType::Alb, 1)]).await;
    assert_eq!(chosen(&b, &http("/")).await, "alb-1");
    b.probe.0.lock().unwrap().sick.insert("alb-1".into());
    let h = b.handle.clone();
    eventually("the checks failed", || {
        h.view().instances["alb-1"].live.checks().down
    })
    .await;
    let e = b.handle.decide(&http("/"), false, &[]).await.unwrap_err();
    assert!(
        matches!(&e, BalancerError::Unavailable(m) if m.contains("health check failing: connection refused")),
        "{e:?}"
    );
    b.probe.0.lock().unwrap().sick.clear();
    eventually("recovered", || {
        !h.view().instances["alb-1"].live.checks().down
    })
    .await;
    assert_eq!(chosen(&b, &http("/")).await, "alb-1");
}

#[actix_rt::test]
async fn instructions_and_scaling_reach_the_next_heartbeat_once() {
    let b = balancer().await;
    b.handle
        .register(module("alb-1", ModuleType::Alb, "v1"))
        .await
        .unwrap();
    b.handle
        .register(module("alb-2", ModuleType::Alb, "v1"))
        .await
        .unwrap();
    let hot = Stats {
        active_connections: 900,
        cpu_percent: 95.0,
        ..Default::default()
    };
    b.handle
        .heartbeat("alb-1", hot, ReportedHealth::Healthy)
        .await
        .unwrap();
    let (_, plan) = b
        .handle
        .rebalance(Some(ModuleType::Alb), false)
        .await
        .unwrap();
    assert_eq!(plan.len(), 1);
    assert_eq!(plan[0].0, "alb-1");
    let beat = || {
        b.handle
            .heartbeat("alb-1", Stats::default(), ReportedHealth::Healthy)
    };
    let a = beat().await.unwrap();
    assert_eq!(
        a.instructions,
        vec![format!("shed-connections {}", plan[0].1)]
    );
    assert!(
        beat().await.unwrap().instructions.is_empty(),
        "delivered once"
    );

    let cfg = scaler::ScalingConfig {
        enabled: true,
        min_instances: 1,
        max_instances: 5,
        ..Default::default()
    };
    b.handle.set_scaling(ModuleType::Alb, cfg).await.unwrap();
    let (d, delivered) = b
        .handle
        .trigger_scaling(ModuleType::Alb, Some(scaler::Direction::Up), 0, "test")
        .await
        .unwrap();
    assert!(delivered);
    assert_eq!((d.current, d.desired, d.seq), (2, 3, 1));
    assert_eq!(beat().await.unwrap().desired_instances, Some(3));
    assert_eq!(
        beat().await.unwrap().desired_instances,
        None,
        "delivered once"
    );
}

#[actix_rt::test]
async fn routing_updates_are_validated_and_guarded() {
    let b = balancer().await;
    let mut bad = route("db", Protocol::Redis, ModuleType::Dblb, 1);
    bad.source_pattern = "10.0.0.0/33".into();
    let e = b
        .handle
        .update_routing(RoutingUpdate {
            routes: vec![route("web", Protocol::Http, ModuleType::Alb, 1), bad],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&e, BalancerError::Invalid(m) if m.starts_with("routes[1].source_pattern: \"10.0.0.0/33\"")),
        "{e:?}"
    );
    let (routes, _, applied) = b
        .handle
        .update_routing(RoutingUpdate {
            routes: vec![route("web", Protocol::Http, ModuleType::Alb, 1)],
            validate_only: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!applied && routes.len() == 1);
    assert_eq!(
        b.handle.view().routes.value.routes().len(),
        0,
        "validate_only wrote nothing"
    );
    set_routes(&b, vec![route("web", Protocol::Http, ModuleType::Alb, 1)]).await;
    let rev = b.handle.view().routes.revision;
    set_routes(&b, vec![route("web", Protocol::Http, ModuleType::Alb, 3)]).await;
    let stale = b
        .handle
        .update_routing(RoutingUpdate {
            routes: vec![route("api", Protocol::Http, ModuleType::Alb, 2)],
            expected_revision: rev,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(stale, BalancerError::Precondition(_)), "{stale:?}");
    let gone = b
        .handle
        .update_routing(RoutingUpdate {
            delete: vec!["nope".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&gone, BalancerError::NotFound(m) if m.starts_with("delete_route_ids[0]")),
        "{gone:?}"
    );
}

#[actix_rt::test]
async fn a_failed_connection_steers_new_flows_to_the_others() {
    let b = balancer().await;
    b.handle
        .register(module("alb-1", ModuleType::Alb, "v1"))
        .await
        .unwrap();
    b.handle
        .register(module("alb-2", ModuleType::Alb, "v1"))
        .await
        .unwrap();
    set_routes(&b, vec![route("web", Protocol::Http, ModuleType::Alb, 1)]).await;
    let first = b.handle.decide(&http("/"), false, &[]).await.unwrap();
    let failed = first.instance.record.instance_id.clone();
    // The data plane's retry excludes it, and later flows avoid it too.
    let retry = b
        .handle
        .decide(&http("/"), false, std::slice::from_ref(&failed))
        .await
        .unwrap();
    assert_ne!(retry.instance.record.instance_id, failed);
    b.handle
        .connect_failed(&first.instance, "connection refused");
    for _ in 0..10 {
        assert_ne!(chosen(&b, &http("/")).await, failed);
    }
}

#[actix_rt::test]
async fn the_autoscaler_on_the_leader_delivers_to_heartbeats_and_the_hook() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("decision");
    let script = format!(
        "cat > {0}.json; echo \"$LODGE_MODULE_TYPE $LODGE_DIRECTION $LODGE_CURRENT $LODGE_DESIRED\" > {0}.tmp; mv {0}.tmp {0}.env",
        out.display()
    );
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let hook = super::hook::DeployHook::new(vec!["sh".into(), "-c".into(), script], &log);
    let b = balancer_with(hook.map(Arc::new), true).await;
    b.handle
        .register(module("alb-1", ModuleType::Alb, "v1"))
        .await
        .unwrap();
    let hot = Stats {
        cpu_percent: 140.0,
        ..Default::default()
    };
    b.handle
        .heartbeat("alb-1", hot, ReportedHealth::Healthy)
        .await
        .unwrap();
    let cfg = scaler::ScalingConfig {
        enabled: true,
        min_instances: 1,
        max_instances: 4,
        ..Default::default()
    };
    b.handle.set_scaling(ModuleType::Alb, cfg).await.unwrap();
    b.handle
        .update_settings(super::handle::SettingsUpdate {
            autoscale_interval_ms: Some(100),
            ..Default::default()
        })
        .await
        .unwrap();
    let env = out.with_extension("env");
    eventually("the hook ran", || env.exists()).await;
    // CPU at 140 % against a 70 % target: pressure 2.0, so ceil(1 × 2.0 / 0.8) = 3 at once.
    assert_eq!(std::fs::read_to_string(&env).unwrap(), "alb up 1 3\n");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(
        (json["module_type"].as_str(), json["desired"].as_u64()),
        (Some("alb"), Some(3))
    );
    let beat = b
        .handle
        .heartbeat("alb-1", Stats::default(), ReportedHealth::Healthy);
    assert_eq!(beat.await.unwrap().desired_instances, Some(3));
    // Three more rounds: the up cooldown (3 min) holds them back, so still one decision.
    let rounds = || async {
        let cell = b._rt.actor_table().get("/node/balancer/scaler").unwrap();
        let dump = cell.request_dump().unwrap().await.unwrap();
        dump["rounds"].as_u64().unwrap()
    };
    let first = rounds().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while rounds().await < first + 3 {
        assert!(
            Instant::now() < deadline,
            "the autoscaler stopped running rounds"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last = b
        .handle
        .view()
        .scaling_of(ModuleType::Alb)
        .value
        .last
        .unwrap();
    assert_eq!(last.seq, 1, "{last:?}");
}

#[actix_rt::test]
async fn removed_and_re_registered_instances_get_their_actors() {
    let b = balancer().await;
    let ids = ["m-1", "m-2", "m-3"];
    for id in ids {
        b.handle
            .register(module(id, ModuleType::Alb, "v1"))
            .await
            .unwrap();
    }
    let running = |b: &Balancer, id: &str| {
        b._rt
            .actor_table()
            .get(&format!("/node/balancer/modules/{id}"))
            .is_some_and(|c| c.state() == crate::Lifecycle::Running)
    };
    eventually("three actors", || ids.iter().all(|id| running(&b, id))).await;
    // Two leases run out together: both actors go, although the supervisor takes one change at
    // a time.
    for id in &ids[..2] {
        let lease = b.handle.view().instances[*id].lease;
        b.store.expire(lease);
    }
    eventually("two actors stopped", || {
        !running(&b, "m-1") && !running(&b, "m-2") && running(&b, "m-3")
    })
    .await;
    // The same id again gets an actor (its old one is gone), and it works: a drain reaches it.
    b.handle
        .register(module("m-1", ModuleType::Alb, "v2"))
        .await
        .unwrap();
    eventually("m-1 again", || running(&b, "m-1")).await;
    let d = b
        .handle
        .unregister("m-1", true, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!((d.drained, d.remaining), (0, 0));
    assert_eq!(b.metrics.evictions.get(), 2);
}
