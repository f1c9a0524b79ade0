//! Memory per idle actor and ListActors latency, each in a fresh process so that memory freed by
//! one measurement cannot flatter the next.

use std::process::Command;
use std::time::{Duration, Instant};

use actix::{Actor, Arbiter, Context};
use lodge_actors::admin::{AdminActor, ListActors, NodeFacts};
use lodge_actors::introspect::{ListQuery, SortKey};
use lodge_actors::supervision::AddChild;
use lodge_actors::{
    ActorRef, ChildSpec, EventKind, Managed, Restart, Runtime, RuntimeConfig, Strategy,
    SupervisorSpec,
};

use super::{median, Outcome};

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Mode {
    /// Supervised Lodge actors with introspection.
    Lodge,
    /// Plain actix actors (the baseline).
    Raw,
}

#[derive(Default)]
struct Idle;

impl Actor for Idle {
    type Context = Context<Self>;
}

impl Managed for Idle {
    const KIND: &'static str = "bench-idle";
}

/// ListActors latencies: (what was asked, milliseconds).
pub type ListFigures = Vec<(String, f64)>;

/// Runs both modes in child processes; returns (lodge bytes/actor, raw bytes/actor, ListActors figures).
pub fn measure(actors: usize) -> Outcome<(f64, f64, ListFigures)> {
    let exe = std::env::current_exe().map_err(|e| format!("the bench's own path: {e}"))?;
    let run = |mode: &str| -> Outcome<serde_json::Value> {
        let out = Command::new(&exe)
            .args([
                "bench",
                "memory",
                "--mode",
                mode,
                "--actors",
                &actors.to_string(),
            ])
            .output()
            .map_err(|e| format!("running the memory child: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "the memory child (--mode {mode}) failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("the memory child (--mode {mode}) printed no JSON: {e}"))
    };
    let lodge = run("lodge")?;
    let raw = run("raw")?;
    let list = lodge["list_ms"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(f64::NAN)))
                .collect()
        })
        .unwrap_or_default();
    Ok((
        lodge["bytes_per_actor"].as_f64().unwrap_or(f64::NAN),
        raw["bytes_per_actor"].as_f64().unwrap_or(f64::NAN),
        list,
    ))
}

pub fn run_child(mode: Mode, actors: usize) -> i32 {
    let system = actix_rt::System::new();
    let result = system.block_on(async move {
        match mode {
            Mode::Raw => {
                let arbiter = Arbiter::new();
                let before = super::rss_of("self") as f64;
                let addrs: Vec<_> = (0..actors)
                    .map(|_| Idle::start_in_arbiter(&arbiter.handle(), |_| Idle))
                    .collect();
                // Let the arbiter run every actor's start before measuring.
                let last = addrs.last().cloned();
                if let Some(a) = last {
                    while !a.connected() {
                        tokio::task::yield_now().await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                let per = ((super::rss_of("self") as f64) - before) / actors as f64;
                drop(addrs);
                serde_json::json!({ "bytes_per_actor": per })
            }
            Mode::Lodge => lodge_child(actors).await,
        }
    });
    println!("{result}");
    0
}

async fn lodge_child(actors: usize) -> serde_json::Value {
    let quiet = slog::Logger::root(slog::Discard, slog::o!());
    let admin_ref: ActorRef<AdminActor> = ActorRef::default();
    let registry_slot = std::sync::Arc::new(std::sync::OnceLock::new());
    let (a, reg) = (admin_ref.clone(), registry_slot.clone());
    let facts = std::sync::Arc::new(NodeFacts {
        node_id: 1,
        version: String::new(),
        started_at_ms: 0,
        config_json: String::new(),
    });
    let spec = SupervisorSpec::new(Strategy::OneForOne, move || {
        let (reg, facts) = (reg.clone(), facts.clone());
        vec![
            ChildSpec::actor_for("admin", &a, move || {
                AdminActor::new(reg.get().cloned().expect("registry"), facts.clone(), false)
            }),
            ChildSpec::supervisor("bench", SupervisorSpec::new(Strategy::OneForOne, Vec::new)).0,
        ]
    });
    let cfg = RuntimeConfig {
        worker_arbiters: 1,
        ..RuntimeConfig::default()
    };
    let runtime = Runtime::start(cfg, quiet, spec);
    let _ = registry_slot.set(runtime.actor_table().clone());
    let mut events = runtime.actor_table().subscribe();
    loop {
        let e = events.recv().await.expect("events");
        if &*e.path == "/node/bench" && e.event == EventKind::Started {
            break;
        }
    }
    let sup = runtime
        .actor_table()
        .supervisor("/node/bench")
        .expect("bench supervisor");
    let before = super::rss_of("self") as f64;
    let last = format!("/node/bench/a{}", actors - 1);
    for i in 0..actors {
        let (spec, _) = ChildSpec::actor(format!("a{i}"), Idle::default);
        sup.send(AddChild(spec.restart(Restart::Temporary)))
            .await
            .unwrap()
            .unwrap();
    }
    // Children start one after the other; the last one running means all are.
    let registry = runtime.actor_table().clone();
    while registry
        .get(&last)
        .is_none_or(|c| c.state() != lodge_actors::Lifecycle::Running)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let per = ((super::rss_of("self") as f64) - before) / actors as f64;
    let mut list_ms = serde_json::Map::new();
    for (name, sort, limit) in [
        ("sorted by queue length, limit 100", SortKey::QueueLen, 100),
        (
            "sorted by message rate, limit 100",
            SortKey::MessageRate,
            100,
        ),
        ("all rows by path", SortKey::Path, 0),
    ] {
        let mut samples = Vec::new();
        for _ in 0..9 {
            let q = ListQuery {
                sort,
                limit,
                ..ListQuery::default()
            };
            let t = Instant::now();
            let reply = admin_ref.send(ListActors(q)).await.unwrap().unwrap();
            samples.push(t.elapsed().as_secs_f64() * 1e3);
            assert!(reply.matched > actors);
        }
        list_ms.insert(name.to_string(), median(samples).into());
    }
    serde_json::json!({ "bytes_per_actor": per, "list_ms": list_ms })
}
