//! Messaging throughput: Lodge's instrumented, bounded paths against plain actix.

use std::time::{Duration, Instant};

use actix::{Actor, Arbiter, Context, Handler, Message};
use lodge_actors::{
    handles, ActorRef, ChildSpec, Managed, Placement, Runtime, RuntimeConfig, SendError, Strategy,
    SupervisorSpec,
};
use tokio::sync::oneshot;

use super::{median, Outcome};

const CAPACITY: usize = 1024;
const CALLERS: u64 = 64;

#[derive(Message)]
#[rtype(result = "()")]
struct Hit;

#[derive(Message)]
#[rtype(result = "u64")]
struct Ping;

/// Counts hits and answers pings; signals when an expected number of hits arrived.
#[derive(Default)]
struct Sink {
    hits: u64,
    expect: u64,
    done: Option<oneshot::Sender<()>>,
}

impl Actor for Sink {
    type Context = Context<Self>;
}

impl Managed for Sink {
    const KIND: &'static str = "bench-sink";
}

impl Handler<Hit> for Sink {
    type Result = ();
    fn handle(&mut self, _: Hit, _: &mut Context<Self>) {
        self.hits += 1;
        if self.hits == self.expect {
            if let Some(d) = self.done.take() {
                let _ = d.send(());
            }
        }
    }
}

impl Handler<Ping> for Sink {
    type Result = u64;
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) -> u64 {
        self.hits += 1;
        self.hits
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Expect(u64, oneshot::Sender<()>);

impl Handler<Expect> for Sink {
    type Result = ();
    fn handle(&mut self, msg: Expect, _: &mut Context<Self>) {
        self.hits = 0;
        self.expect = msg.0;
        self.done = Some(msg.1);
    }
}

handles!(Sink: Hit, Ping, Expect);

fn quiet() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

/// Rounds of `n` fire-and-forget messages from a producer on the sink's own arbiter.
async fn fire_and_forget(rounds: usize, n: u64) -> (f64, f64, f64) {
    let arbiter = Arbiter::new();
    let raw = Sink::start_in_arbiter(&arbiter.handle(), |ctx| {
        ctx.set_mailbox_capacity(CAPACITY);
        Sink::default()
    });
    let cfg = RuntimeConfig {
        mailbox_capacity: CAPACITY,
        worker_arbiters: 1,
        ..RuntimeConfig::default()
    };
    let sink_ref: ActorRef<Sink> = ActorRef::default();
    let r = sink_ref.clone();
    let spec = SupervisorSpec::new(Strategy::OneForOne, move || {
        vec![ChildSpec::actor_for("sink", &r, Sink::default)
            .placement(Placement::Dedicated("bench"))]
    });
    let runtime = Runtime::start(cfg, quiet(), spec);
    let lodge_arbiter = runtime.dedicated_arbiter("bench");
    while sink_ref.send(Ping).await.is_err() {
        tokio::task::yield_now().await;
    }
    let (mut unbounded, mut bounded, mut lodge) = (vec![], vec![], vec![]);
    for _ in 0..rounds {
        // actix do_send: ignores the mailbox bound (the queue grows to n).
        let (tx, rx) = oneshot::channel();
        raw.send(Expect(n, tx)).await.unwrap();
        let addr = raw.clone();
        let t = Instant::now();
        arbiter.spawn(async move {
            for _ in 0..n {
                addr.do_send(Hit);
            }
        });
        rx.await.unwrap();
        unbounded.push(n as f64 / t.elapsed().as_secs_f64());

        // actix try_send into the bounded mailbox, yielding to the sink when it is full.
        let (tx, rx) = oneshot::channel();
        raw.send(Expect(n, tx)).await.unwrap();
        let addr = raw.clone();
        let t = Instant::now();
        arbiter.spawn(async move {
            let mut sent = 0;
            while sent < n {
                match addr.try_send(Hit) {
                    Ok(()) => sent += 1,
                    Err(_) => tokio::task::yield_now().await,
                }
            }
        });
        rx.await.unwrap();
        bounded.push(n as f64 / t.elapsed().as_secs_f64());

        // Lodge try_send: the same loop through ActorRef and the accounting envelope.
        let (tx, rx) = oneshot::channel();
        sink_ref.send(Expect(n, tx)).await.unwrap();
        let sink = sink_ref.clone();
        let t = Instant::now();
        lodge_arbiter.spawn(async move {
            let mut sent = 0;
            while sent < n {
                match sink.try_send(Hit) {
                    Ok(()) => sent += 1,
                    Err(SendError::Full) => tokio::task::yield_now().await,
                    Err(e) => panic!("bench sink: {e}"),
                }
            }
        });
        rx.await.unwrap();
        lodge.push(n as f64 / t.elapsed().as_secs_f64());
    }
    runtime.shutdown();
    arbiter.stop();
    (median(unbounded), median(bounded), median(lodge))
}

/// 64 tokio tasks on a 2-thread runtime sending requests to one actor and awaiting each answer.
async fn request_response(rounds: usize, per_task: u64) -> (f64, f64) {
    let arbiter = Arbiter::new();
    let raw = Sink::start_in_arbiter(&arbiter.handle(), |ctx| {
        ctx.set_mailbox_capacity(CAPACITY);
        Sink::default()
    });
    let sink_ref: ActorRef<Sink> = ActorRef::default();
    let r = sink_ref.clone();
    let spec = SupervisorSpec::new(Strategy::OneForOne, move || {
        vec![ChildSpec::actor_for("sink", &r, Sink::default)]
    });
    let cfg = RuntimeConfig {
        mailbox_capacity: CAPACITY,
        worker_arbiters: 1,
        ..RuntimeConfig::default()
    };
    let runtime = Runtime::start(cfg, quiet(), spec);
    while sink_ref.send(Ping).await.is_err() {
        tokio::task::yield_now().await;
    }
    let io = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let total = (CALLERS * per_task) as f64;
    let (mut raw_rates, mut lodge_rates) = (vec![], vec![]);
    for _ in 0..rounds {
        let addr = raw.clone();
        let elapsed = run_callers(&io, move || {
            let addr = addr.clone();
            async move {
                for _ in 0..per_task {
                    addr.send(Ping).await.unwrap();
                }
            }
        })
        .await;
        raw_rates.push(total / elapsed.as_secs_f64());
        let sink = sink_ref.clone();
        let elapsed = run_callers(&io, move || {
            let sink = sink.clone();
            async move {
                for _ in 0..per_task {
                    sink.send(Ping).await.unwrap();
                }
            }
        })
        .await;
        lodge_rates.push(total / elapsed.as_secs_f64());
    }
    runtime.shutdown();
    arbiter.stop();
    // Dropping a runtime inside this async context would block it; let it wind down on its own.
    io.shutdown_background();
    (median(raw_rates), median(lodge_rates))
}

async fn run_callers<F, Fut>(io: &tokio::runtime::Runtime, make: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let t = Instant::now();
    let tasks: Vec<_> = (0..CALLERS).map(|_| io.spawn(make())).collect();
    for task in tasks {
        task.await.unwrap();
    }
    t.elapsed()
}

pub fn run(rounds: usize, messages: u64, requests: u64, actors: usize) -> Outcome {
    println!(
        "lodge bench actors: {rounds} rounds, medians; machine: {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let system = actix_rt::System::new();
    let ((unbounded, bounded, lodge), (rr_raw, rr_lodge)) = system.block_on(async {
        let ff = fire_and_forget(rounds, messages).await;
        let rr = request_response(rounds, requests).await;
        (ff, rr)
    });
    let m = |v: f64| v / 1e6;
    println!();
    println!("| figure | Lodge | baseline (same run) | ratio | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| fire-and-forget, one arbiter, bounded mailbox ({CAPACITY}) | {:.2} M msg/s | actix try_send {:.2} M/s; actix do_send (unbounded) {:.2} M/s | {:.2} / {:.2} | ≥ 5 M/s |",
        m(lodge), m(bounded), m(unbounded), lodge / bounded, lodge / unbounded
    );
    println!(
        "| request/response, 64 tokio tasks → 1 actor | {:.2} M req/s | actix Addr::send {:.2} M/s | {:.2} | ≥ 1 M/s |",
        m(rr_lodge), m(rr_raw), rr_lodge / rr_raw
    );
    let (lodge_mem, raw_mem, list) = super::memory::measure(actors)?;
    println!(
        "| memory per idle actor ({actors} actors, introspection included) | {lodge_mem:.0} B | plain actix actor {raw_mem:.0} B | {:.2} | < 2048 B |",
        lodge_mem / raw_mem
    );
    for (what, ms) in list {
        println!("| ListActors over {actors} actors, {what} | {ms:.1} ms | — | — | < 100 ms |");
    }
    Ok(())
}
