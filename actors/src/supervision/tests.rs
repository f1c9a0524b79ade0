//! Supervisor behaviour, driven through a real runtime and observed through the event stream.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::{Actor, Context, Handler, Message, Running};
use tokio::sync::broadcast;

use super::*;
use crate::envelope::ActorRef;
use crate::introspect::{ActorEvent, EventKind, Lifecycle};
use crate::runtime::{Runtime, RuntimeConfig};

type Journal = Arc<Mutex<Vec<String>>>;

struct Worker {
    name: &'static str,
    journal: Journal,
    pings: u32,
    refuse_stop: bool,
}

impl Actor for Worker {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        self.journal
            .lock()
            .unwrap()
            .push(format!("start {}", self.name));
    }

    fn stopping(&mut self, _: &mut Context<Self>) -> Running {
        if self.refuse_stop {
            Running::Continue
        } else {
            Running::Stop
        }
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.journal
            .lock()
            .unwrap()
            .push(format!("stop {}", self.name));
    }
}

impl Managed for Worker {
    const KIND: &'static str = "test-worker";

    fn dump_state(&self) -> serde_json::Value {
        serde_json::json!({ "name": self.name, "pings": self.pings })
    }
}

#[derive(Message)]
#[rtype(result = "u32")]
struct Ping;

#[derive(Message)]
#[rtype(result = "()")]
struct Boom;

crate::handles!(Worker: Ping, Boom);

impl Handler<Ping> for Worker {
    type Result = u32;
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) -> u32 {
        self.pings += 1;
        self.pings
    }
}

impl Handler<Boom> for Worker {
    type Result = ();
    fn handle(&mut self, _: Boom, _: &mut Context<Self>) {
        panic!("boom in {}", self.name);
    }
}

/// A worker child; its constructor journals "new NAME", its `started` hook "start NAME" and its
/// `stopped` hook "stop NAME".
fn worker(name: &'static str, journal: &Journal) -> (ChildSpec, ActorRef<Worker>) {
    let journal = journal.clone();
    ChildSpec::actor(name, move || {
        journal.lock().unwrap().push(format!("new {name}"));
        Worker {
            name,
            journal: journal.clone(),
            pings: 0,
            refuse_stop: false,
        }
    })
}

fn quiet() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

fn config() -> RuntimeConfig {
    RuntimeConfig {
        worker_arbiters: 2,
        backoff: Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(10),
            jitter: 0.5,
        },
        ..RuntimeConfig::default()
    }
}

/// Waits for the first event matching `pred`; the timeout only turns a hang into a failure.
async fn wait_for(
    rx: &mut broadcast::Receiver<ActorEvent>,
    pred: impl Fn(&ActorEvent) -> bool,
) -> ActorEvent {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let e = rx.recv().await.expect("event stream open");
            if pred(&e) {
                return e;
            }
        }
    })
    .await
    .expect("expected event did not arrive")
}

fn is(path: &'static str, kind: EventKind) -> impl Fn(&ActorEvent) -> bool {
    move |e| &*e.path == path && e.event == kind
}

struct Trio {
    rt: Runtime,
    a: ActorRef<Worker>,
    b: ActorRef<Worker>,
    c: ActorRef<Worker>,
    events: broadcast::Receiver<ActorEvent>,
}

/// `/node/sup` with children a, b, c under `strategy`; waits until all three run.
async fn trio(strategy: Strategy, journal: &Journal) -> Trio {
    // Each child starts only after the previous one's `started()` ran, so the journal is ordered.
    let refs: Arc<Mutex<Vec<ActorRef<Worker>>>> = Arc::default();
    let (j, r) = (journal.clone(), refs.clone());
    let spec = SupervisorSpec::new(strategy, move || {
        let mut out = Vec::new();
        for name in ["a", "b", "c"] {
            let (s, w) = worker(name, &j);
            r.lock().unwrap().push(w);
            out.push(s);
        }
        out
    });
    let root = SupervisorSpec::new(Strategy::OneForOne, move || {
        vec![ChildSpec::supervisor("sup", spec.clone()).0]
    });
    let rt = Runtime::start(config(), quiet(), root);
    let mut events = rt.actor_table().subscribe();
    wait_for(&mut events, is("/node/sup/c", EventKind::Started)).await;
    let refs = refs.lock().unwrap().clone();
    assert_eq!(
        journal.lock().unwrap()[..6],
        ["new a", "start a", "new b", "start b", "new c", "start c"]
    );
    Trio {
        rt,
        a: refs[0].clone(),
        b: refs[1].clone(),
        c: refs[2].clone(),
        events,
    }
}

fn restarts(r: &ActorRef<Worker>) -> u32 {
    r.cell().unwrap().restarts()
}

#[actix_rt::test]
async fn one_for_one_restarts_only_the_panicking_child_and_keeps_its_reference_working() {
    let journal = Journal::default();
    let mut t = trio(Strategy::OneForOne, &journal).await;
    assert_eq!(t.b.send(Ping).await, Ok(1));
    t.b.try_send(Boom).unwrap();
    let failed = wait_for(&mut t.events, is("/node/sup/b", EventKind::Failed)).await;
    assert!(failed.reason.unwrap().contains("boom in b"));
    wait_for(&mut t.events, is("/node/sup/b", EventKind::Restarted)).await;
    // Same reference, new incarnation with fresh state.
    assert_eq!(t.b.send(Ping).await, Ok(1));
    assert_eq!((restarts(&t.a), restarts(&t.b), restarts(&t.c)), (0, 1, 0));
    let cell = t.b.cell().unwrap();
    assert_eq!(cell.state(), Lifecycle::Running);
    assert!(cell.last_failure().unwrap().reason.contains("boom in b"));
    assert_eq!(t.a.send(Ping).await, Ok(1), "a kept its state");
    t.rt.shutdown();
    assert_eq!(t.rt.wait_exit().await, Exit::Normal);
}

#[actix_rt::test]
async fn one_for_all_restarts_every_child() {
    let journal = Journal::default();
    let mut t = trio(Strategy::OneForAll, &journal).await;
    t.a.send(Ping).await.unwrap();
    t.b.try_send(Boom).unwrap();
    for path in ["/node/sup/a", "/node/sup/b", "/node/sup/c"] {
        wait_for(&mut t.events, is(path, EventKind::Restarted)).await;
    }
    assert_eq!((restarts(&t.a), restarts(&t.b), restarts(&t.c)), (1, 1, 1));
    assert_eq!(
        t.a.send(Ping).await,
        Ok(1),
        "a was restarted with fresh state"
    );
    // The panicked child's own `stopped` runs as it unwinds; the survivors are then stopped
    // latest-first, and only then does everything start again, each after the previous is up.
    let j = journal.lock().unwrap().clone();
    let tail: Vec<&str> = j[6..].iter().map(String::as_str).collect();
    assert_eq!(
        tail,
        [
            "stop b", "stop c", "stop a", "new a", "start a", "new b", "start b", "new c",
            "start c"
        ]
    );
}

#[actix_rt::test]
async fn rest_for_one_restarts_the_failed_child_and_those_started_after_it() {
    let journal = Journal::default();
    let mut t = trio(Strategy::RestForOne, &journal).await;
    t.b.try_send(Boom).unwrap();
    wait_for(&mut t.events, is("/node/sup/c", EventKind::Restarted)).await;
    assert_eq!((restarts(&t.a), restarts(&t.b), restarts(&t.c)), (0, 1, 1));
    let j = journal.lock().unwrap().clone();
    let tail: Vec<&str> = j[6..].iter().map(String::as_str).collect();
    assert_eq!(
        tail,
        ["stop b", "stop c", "new b", "start b", "new c", "start c"]
    );
}

#[actix_rt::test]
async fn past_the_restart_limit_the_failure_escalates_to_the_root_and_the_runtime_exits_failed() {
    let journal = Journal::default();
    let j = journal.clone();
    let refs: Arc<Mutex<Option<ActorRef<Worker>>>> = Arc::default();
    let r = refs.clone();
    let inner = SupervisorSpec::new(Strategy::OneForOne, move || {
        let (s, w) = worker("flaky", &j);
        *r.lock().unwrap() = Some(w);
        vec![s]
    })
    .limit(RestartLimit {
        max_restarts: 2,
        within: Duration::from_secs(60),
    });
    // The root tolerates nothing, so the escalation reaches the runtime.
    let root = SupervisorSpec::new(Strategy::OneForOne, move || {
        vec![ChildSpec::supervisor("sup", inner.clone()).0]
    })
    .limit(RestartLimit {
        max_restarts: 0,
        within: Duration::from_secs(60),
    });
    let mut rt = Runtime::start(config(), quiet(), root);
    let mut events = rt.actor_table().subscribe();
    wait_for(&mut events, is("/node/sup/flaky", EventKind::Started)).await;
    let flaky = refs.lock().unwrap().clone().unwrap();
    for _ in 0..2 {
        flaky.try_send(Boom).unwrap();
        wait_for(&mut events, is("/node/sup/flaky", EventKind::Restarted)).await;
    }
    flaky.try_send(Boom).unwrap();
    let failed = wait_for(&mut events, is("/node/sup", EventKind::Failed)).await;
    assert!(failed.reason.unwrap().contains("restart limit reached"));
    match rt.wait_exit().await {
        Exit::Failed(reason) => assert!(reason.contains("restart limit reached"), "{reason}"),
        other => panic!("root should fail, got {other:?}"),
    }
}

#[actix_rt::test]
async fn restart_waits_at_least_the_backoff_lower_bound() {
    let journal = Journal::default();
    let j = journal.clone();
    let refs: Arc<Mutex<Option<ActorRef<Worker>>>> = Arc::default();
    let r = refs.clone();
    let backoff = Backoff {
        initial: Duration::from_millis(150),
        max: Duration::from_secs(1),
        jitter: 0.0,
    };
    let root = SupervisorSpec::new(Strategy::OneForOne, move || {
        let (s, w) = worker("slow", &j);
        *r.lock().unwrap() = Some(w);
        vec![s]
    })
    .backoff(backoff);
    let rt = Runtime::start(config(), quiet(), root);
    let mut events = rt.actor_table().subscribe();
    wait_for(&mut events, is("/node/slow", EventKind::Started)).await;
    let slow = refs.lock().unwrap().clone().unwrap();
    for attempt in 1..=2u32 {
        slow.try_send(Boom).unwrap();
        wait_for(&mut events, is("/node/slow", EventKind::Failed)).await;
        let failed_at = Instant::now();
        wait_for(&mut events, is("/node/slow", EventKind::Restarted)).await;
        let (low, _) = backoff.bounds(attempt);
        assert!(
            failed_at.elapsed() >= low.mul_f64(0.9),
            "attempt {attempt} restarted too early"
        );
    }
}

#[actix_rt::test]
async fn shutdown_stops_children_in_reverse_order_and_abandons_one_that_will_not_stop() {
    let journal = Journal::default();
    let j = journal.clone();
    let root = SupervisorSpec::new(Strategy::OneForOne, move || {
        let (a, _) = worker("a", &j);
        let j2 = j.clone();
        let (stuck, _) = ChildSpec::actor("stuck", move || Worker {
            name: "stuck",
            journal: j2.clone(),
            pings: 0,
            refuse_stop: true,
        });
        let (c, _) = worker("c", &j);
        vec![a, stuck.shutdown_timeout(Duration::from_millis(50)), c]
    });
    let mut rt = Runtime::start(config(), quiet(), root);
    let mut events = rt.actor_table().subscribe();
    wait_for(&mut events, is("/node/c", EventKind::Started)).await;
    rt.shutdown();
    let abandoned = wait_for(&mut events, is("/node/stuck", EventKind::Stopped)).await;
    assert!(abandoned.reason.unwrap().contains("did not stop within"));
    assert_eq!(rt.wait_exit().await, Exit::Normal);
    let j = journal.lock().unwrap().clone();
    let stops: Vec<&str> = j
        .iter()
        .filter(|l| l.starts_with("stop"))
        .map(String::as_str)
        .collect();
    assert_eq!(stops, ["stop c", "stop a"]);
    assert!(
        rt.actor_table().get("/node/a").is_none(),
        "stopped children leave the registry"
    );
}

#[actix_rt::test]
async fn operators_can_restart_and_stop_a_child_and_add_one_at_run_time() {
    let journal = Journal::default();
    let t = trio(Strategy::OneForAll, &journal).await;
    let sup = t.rt.actor_table().supervisor("/node/sup").unwrap();
    // A requested restart touches only that child, whatever the strategy.
    assert_eq!(
        sup.send(RestartChild { name: "b".into() }).await.unwrap(),
        Ok(1)
    );
    assert_eq!((restarts(&t.a), restarts(&t.b), restarts(&t.c)), (0, 1, 0));
    sup.send(StopChild { name: "c".into() })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.c.cell().unwrap().state(), Lifecycle::Stopped);
    assert_eq!(t.c.send(Ping).await, Err(crate::SendError::NotRunning));
    let err = sup
        .send(RestartChild { name: "zz".into() })
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, ChildError::NotFound(_)), "{err:?}");
    // Dynamic children get their own paths and state dumps.
    let (spec, d) = worker("sessions/d", &journal);
    let path = sup
        .send(AddChild(spec.restart(Restart::Temporary)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(path, "/node/sup/sessions/d");
    assert_eq!(d.send(Ping).await, Ok(1));
    let dump = d.cell().unwrap().request_dump().unwrap().await.unwrap();
    assert_eq!(dump["pings"], 1);
    let (dup, _) = worker("sessions/d", &journal);
    assert!(sup.send(AddChild(dup)).await.unwrap().is_err());
}

#[actix_rt::test]
async fn envelope_accounting_counts_messages_and_samples_latency() {
    let journal = Journal::default();
    let t = trio(Strategy::OneForOne, &journal).await;
    for _ in 0..100 {
        t.a.send(Ping).await.unwrap();
    }
    let cell = t.a.cell().unwrap();
    assert_eq!(cell.messages_handled(), 100);
    assert_eq!(cell.queue_len(), 0);
    assert!(cell.latency_us(0.99).is_some());
    assert!(cell.last_activity_ms() > 0);
}

struct StuckStarter;

impl Actor for StuckStarter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        use actix::AsyncContext;
        ctx.wait(actix::fut::wrap_future(std::future::pending::<()>()));
    }
}

impl Managed for StuckStarter {
    const KIND: &'static str = "test-stuck";
}

#[actix_rt::test]
async fn a_child_stuck_in_started_times_out_and_the_children_after_it_still_start() {
    let journal = Journal::default();
    let j = journal.clone();
    let root = SupervisorSpec::new(Strategy::OneForOne, move || {
        let (stuck, _) = ChildSpec::actor("stuck", || StuckStarter);
        vec![
            stuck.shutdown_timeout(Duration::from_millis(50)),
            worker("after", &j).0,
        ]
    });
    let rt = Runtime::start(config(), quiet(), root);
    let mut events = rt.actor_table().subscribe();
    let failed = wait_for(&mut events, is("/node/stuck", EventKind::Failed)).await;
    assert!(failed.reason.unwrap().contains("did not finish starting"));
    wait_for(&mut events, is("/node/after", EventKind::Started)).await;
}

/// Journals its start; incarnations listed in `slow` wait `delay` in `started()`; reports its
/// incarnation number when stopped.
struct Tagged {
    tag: u32,
    slow: bool,
    delay: Duration,
    journal: Journal,
    stopped: tokio::sync::mpsc::UnboundedSender<u32>,
}

impl Actor for Tagged {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        use actix::AsyncContext;
        if self.slow {
            ctx.wait(actix::fut::wrap_future(tokio::time::sleep(self.delay)));
        }
        self.journal
            .lock()
            .unwrap()
            .push(format!("start {}", self.tag));
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        let _ = self.stopped.send(self.tag);
    }
}

impl Managed for Tagged {
    const KIND: &'static str = "test-tagged";
}

#[actix_rt::test]
async fn an_incarnation_timed_out_in_started_is_stopped_when_it_wakes_up() {
    let (tx, mut stopped) = tokio::sync::mpsc::unbounded_channel();
    let journal = Journal::default();
    let j = journal.clone();
    let root = SupervisorSpec::new(Strategy::OneForOne, move || {
        let (j, tx) = (j.clone(), tx.clone());
        let mut n = 0;
        let (spec, _) = ChildSpec::actor("slow", move || {
            n += 1;
            Tagged {
                tag: n,
                slow: n == 1,
                delay: Duration::from_millis(300),
                journal: j.clone(),
                stopped: tx.clone(),
            }
        });
        vec![spec.shutdown_timeout(Duration::from_millis(50))]
    });
    let _rt = Runtime::start(config(), quiet(), root);
    // Incarnation 1 times out and is replaced by 2; when 1 finally leaves `started()` it must go.
    let first_stopped = tokio::time::timeout(Duration::from_secs(20), stopped.recv())
        .await
        .unwrap();
    assert_eq!(first_stopped, Some(1));
    assert!(journal.lock().unwrap().contains(&"start 2".to_string()));
}

#[actix_rt::test]
async fn after_a_failed_start_later_children_wait_for_the_restart_of_the_failed_one() {
    let journal = Journal::default();
    let j = journal.clone();
    let root = SupervisorSpec::new(Strategy::RestForOne, move || {
        let j1 = j.clone();
        let mut attempts = 0;
        let (first, _) = ChildSpec::actor("first", move || {
            attempts += 1;
            assert!(attempts > 1, "first construction fails");
            j1.lock().unwrap().push("new first".into());
            Worker {
                name: "first",
                journal: j1.clone(),
                pings: 0,
                refuse_stop: false,
            }
        });
        vec![first, worker("second", &j).0]
    });
    let rt = Runtime::start(config(), quiet(), root);
    let mut events = rt.actor_table().subscribe();
    wait_for(&mut events, |e| {
        &*e.path == "/node/second" && matches!(e.event, EventKind::Started | EventKind::Restarted)
    })
    .await;
    let j = journal.lock().unwrap().clone();
    let first = j
        .iter()
        .position(|l| l == "start first")
        .expect("first started");
    let second = j
        .iter()
        .position(|l| l == "new second")
        .expect("second built");
    assert!(
        first < second,
        "second was built before first was up: {j:?}"
    );
}

#[actix_rt::test]
async fn a_child_supervisor_is_not_timed_out_while_its_children_start_one_by_one() {
    let (tx, _stopped) = tokio::sync::mpsc::unbounded_channel();
    let journal = Journal::default();
    let j = journal.clone();
    let inner = SupervisorSpec::new(Strategy::OneForOne, move || {
        // Each grandchild needs 100 ms; together longer than the 150 ms child timeout.
        (1..=2)
            .map(|tag| {
                let (j, tx) = (j.clone(), tx.clone());
                ChildSpec::actor(format!("g{tag}"), move || Tagged {
                    tag,
                    slow: true,
                    delay: Duration::from_millis(100),
                    journal: j.clone(),
                    stopped: tx.clone(),
                })
                .0
            })
            .collect()
    });
    let root = SupervisorSpec::new(Strategy::OneForOne, move || {
        vec![ChildSpec::supervisor("sup", inner.clone()).0]
    });
    let cfg = RuntimeConfig {
        shutdown_timeout: Duration::from_millis(150),
        ..config()
    };
    let rt = Runtime::start(cfg, quiet(), root);
    let mut events = rt.actor_table().subscribe();
    let e = wait_for(&mut events, |e| {
        &*e.path == "/node/sup" && e.event != EventKind::Restarted
    })
    .await;
    assert_eq!(e.event, EventKind::Started, "{e:?}");
    assert_eq!(rt.actor_table().get("/node/sup").unwrap().restarts(), 0);
    assert_eq!(journal.lock().unwrap().len(), 2);
}

#[actix_rt::test]
async fn one_for_all_does_not_restart_temporary_children() {
    let journal = Journal::default();
    let j = journal.clone();
    let refs: Arc<Mutex<Option<ActorRef<Worker>>>> = Arc::default();
    let r = refs.clone();
    let root = SupervisorSpec::new(Strategy::OneForAll, move || {
        let (a, w) = worker("a", &j);
        *r.lock().unwrap() = Some(w);
        let (t, _) = worker("temp", &j);
        vec![a, t.restart(Restart::Temporary)]
    });
    let rt = Runtime::start(config(), quiet(), root);
    let mut events = rt.actor_table().subscribe();
    wait_for(&mut events, is("/node/temp", EventKind::Started)).await;
    let a = refs.lock().unwrap().clone().unwrap();
    a.try_send(Boom).unwrap();
    wait_for(&mut events, is("/node/a", EventKind::Restarted)).await;
    let temp = rt.actor_table().get("/node/temp").unwrap();
    assert_eq!(temp.state(), Lifecycle::Stopped);
    assert_eq!(temp.restarts(), 0);
    let starts = journal
        .lock()
        .unwrap()
        .iter()
        .filter(|l| *l == "start temp")
        .count();
    assert_eq!(starts, 1);
}

#[actix_rt::test]
async fn the_runtime_reports_started_only_once_the_whole_tree_is_up() {
    let journal = Journal::default();
    let j = journal.clone();
    let inner = SupervisorSpec::new(Strategy::OneForOne, move || {
        vec![worker("x", &j).0, worker("y", &j).0]
    });
    let j = journal.clone();
    let root = SupervisorSpec::new(Strategy::RestForOne, move || {
        vec![
            worker("a", &j).0,
            ChildSpec::supervisor("sup", inner.clone()).0,
        ]
    });
    let mut rt = Runtime::start(config(), quiet(), root);
    tokio::time::timeout(Duration::from_secs(20), rt.wait_started())
        .await
        .expect("tree started");
    for path in ["/node/a", "/node/sup", "/node/sup/x", "/node/sup/y"] {
        assert_eq!(
            rt.actor_table().get(path).unwrap().state(),
            Lifecycle::Running,
            "{path}"
        );
    }
    let started: Vec<String> = journal
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with("start"))
        .cloned()
        .collect();
    assert_eq!(started, ["start a", "start x", "start y"]);
}
