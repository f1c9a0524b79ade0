//! One running workflow on its owner: `/node/workflows/<id>`. It replays the record, runs the
//! code's next steps (or has a worker run them: [`super::worker`]), and writes the end; a failed
//! or panicking attempt is tried again from the record after a growing pause, up to a limit,
//! then the run ends `failed` with the reason.

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use actix::{
    Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, Message, SpawnHandle,
    WrapFuture,
};
use serde_json::Value;
use slog::{info, warn, Logger};
use tokio::sync::Notify;

use super::ctx::{Ctx, Types, WorkflowError};
use super::metrics::WorkflowMetrics;
use super::record::{Run, Status};
use super::records::{RecordError, Records};
use super::table::{MoveRun, WorkflowTable};
use super::worker;
use crate::clock::precise_ms;
use crate::envelope::ActorRef;
use crate::supervision::Managed;

/// How a run is retried.
#[derive(Clone, Debug)]
pub struct RetrySettings {
    /// Attempts before the run ends `failed` (at least 1).
    pub max_attempts: u32,
    /// The pause before the second attempt; doubled for each one after, up to `max_backoff`.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            first_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// The run was changed by someone else (a cancel); sent by the workflow table.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RunChanged(pub Run);

/// A signal for this run was sent; sent by the workflow table.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SignalArrived;

/// The member is shutting down: start no new step, and answer once the step under way (if any)
/// has ended and the actor stopped.
#[derive(Message)]
#[rtype(result = "Drained")]
pub struct Drain;

/// Ends when the drained actor has stopped.
#[derive(actix::MessageResponse)]
pub struct Drained(pub tokio::sync::oneshot::Receiver<()>);

crate::handles!(WorkflowRun: RunChanged, SignalArrived, Drain);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Running,
    Waiting,
    Ending,
}

/// The actor running one workflow on its owner.
pub struct WorkflowRun {
    run: Run,
    node: u64,
    records: Records,
    types: Arc<Types>,
    /// Picks the worker a run of a type no code here runs goes to, and moves it when none does.
    table: ActorRef<WorkflowTable>,
    retry: RetrySettings,
    metrics: WorkflowMetrics,
    signals: Arc<Notify>,
    attempts: u32,
    /// Attempts that ended because the store did not answer (not counted in `attempts`).
    unavailable: u32,
    phase: Phase,
    last_error: Option<String>,
    task: Option<SpawnHandle>,
    draining: Arc<AtomicBool>,
    /// Told when the actor stops (those draining it).
    stopped: Vec<tokio::sync::oneshot::Sender<()>>,
    log: Logger,
}

impl WorkflowRun {
    /// Runs `run`, which this member (`node`) owns at the run's epoch, with the code in `types`
    /// or, for a type none of it runs, on a worker `table` picks.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        run: Run,
        node: u64,
        records: Records,
        types: Arc<Types>,
        table: ActorRef<WorkflowTable>,
        retry: RetrySettings,
        metrics: WorkflowMetrics,
        log: &Logger,
    ) -> Self {
        let log = log.new(slog::o!("workflow" => run.id.clone(), "epoch" => run.epoch));
        Self {
            run,
            node,
            records,
            types,
            table,
            retry,
            metrics,
            signals: Arc::new(Notify::new()),
            attempts: 0,
            unavailable: 0,
            phase: Phase::Running,
            last_error: None,
            task: None,
            draining: Arc::default(),
            stopped: Vec::new(),
            log,
        }
    }

    fn attempt(&mut self, ctx: &mut Context<Self>) {
        if self.phase == Phase::Ending {
            // Cancelled while it waited to try again.
            return;
        }
        if self.draining.load(Ordering::SeqCst) {
            ctx.stop();
            return;
        }
        self.phase = Phase::Running;
        self.attempts += 1;
        let work = attempt(
            self.run.clone(),
            self.records.clone(),
            self.types.clone(),
            self.table.clone(),
            self.signals.clone(),
            self.metrics.clone(),
            self.draining.clone(),
        );
        let task = ctx.spawn(work.into_actor(self).map(|outcome, act, ctx| {
            act.task = None;
            act.finish(outcome, ctx);
        }));
        self.task = Some(task);
    }

    fn finish(&mut self, outcome: Result<Value, WorkflowError>, ctx: &mut Context<Self>) {
        let (status, result, error) = match outcome {
            Ok(v) => (Status::Completed, Some(v), None),
            Err(WorkflowError::Fenced(m)) => {
                info!(self.log, "no longer the owner; stopping"; "reason" => m);
                ctx.stop();
                return;
            }
            Err(WorkflowError::Retry(m)) if self.attempts < self.retry.max_attempts.max(1) => {
                self.again(m, ctx);
                return;
            }
            Err(WorkflowError::Unavailable(m)) => {
                // Not the code's failure: it does not count against the limit.
                self.attempts -= 1;
                self.unavailable += 1;
                self.again(m, ctx);
                return;
            }
            Err(WorkflowError::Unserved(m)) => {
                // Its last worker here left: another member that serves the type takes the run
                // (this actor is stopped when the move is seen); until one does, it waits here.
                self.attempts -= 1;
                self.unavailable += 1;
                let _ = self.table.try_send(MoveRun {
                    id: self.run.id.clone(),
                });
                self.again(m, ctx);
                return;
            }
            Err(WorkflowError::Retry(m)) => (
                Status::Failed,
                None,
                Some(format!("gave up after {} attempts: {m}", self.attempts)),
            ),
            Err(WorkflowError::Cancelled) => (Status::Cancelled, None, None),
            Err(e @ WorkflowError::NeedsAttention(_)) => {
                (Status::NeedsAttention, None, Some(e.to_string()))
            }
            Err(e) => (Status::Failed, None, Some(e.to_string())),
        };
        self.end(status, result, error, ctx);
    }

    fn again(&mut self, error: String, ctx: &mut Context<Self>) {
        let pause = self.backoff();
        warn!(self.log, "attempt failed; trying again from the record";
            "attempt" => self.attempts, "pause_ms" => pause.as_millis() as u64, "error" => &error);
        self.last_error = Some(error);
        self.phase = Phase::Waiting;
        ctx.run_later(pause, |act, ctx| act.attempt(ctx));
    }

    fn backoff(&self) -> Duration {
        let doublings = (self.attempts + self.unavailable).saturating_sub(1).min(16);
        (self.retry.first_backoff * 2u32.pow(doublings)).min(self.retry.max_backoff)
    }

    /// Writes the run's end (fenced by this owner's epoch), then stops; tried again while the
    /// store cannot take it.
    fn end(
        &mut self,
        status: Status,
        result: Option<Value>,
        error: Option<String>,
        ctx: &mut Context<Self>,
    ) {
        self.phase = Phase::Ending;
        let fence = (self.node, self.run.epoch);
        let records = self.records.clone();
        let id = self.run.id.clone();
        let (r, e) = (result.clone(), error.clone());
        let write = async move {
            records
                .rewrite(&id, Some(fence), move |run| {
                    if run.status != Status::Running {
                        return Ok(false);
                    }
                    run.status = status;
                    run.result = r.clone();
                    run.error = e.clone();
                    run.ended_ms = Some(precise_ms());
                    Ok(true)
                })
                .await
        };
        ctx.spawn(write.into_actor(self).map(move |res, act, ctx| match res {
            Ok(_) => {
                info!(act.log, "ended"; "status" => status.as_str(), "attempts" => act.attempts);
                act.metrics.ended(&act.run.type_name, status);
                ctx.stop();
            }
            Err(RecordError::Fenced { .. }) => ctx.stop(),
            Err(err) => {
                warn!(act.log, "cannot record the end yet"; "error" => %err);
                ctx.run_later(Duration::from_millis(500), move |act, ctx| {
                    act.end(status, result, error, ctx)
                });
            }
        }));
    }
}

/// One attempt: checks the run is still this owner's and not cancelled, replays its record and
/// runs its code to the end.
async fn attempt(
    run: Run,
    records: Records,
    types: Arc<Types>,
    table: ActorRef<WorkflowTable>,
    signals: Arc<Notify>,
    metrics: WorkflowMetrics,
    draining: Arc<AtomicBool>,
) -> Result<Value, WorkflowError> {
    let now = records.get(&run.id).await?.run;
    if now.owner != run.owner || now.epoch != run.epoch || now.status != Status::Running {
        return Err(WorkflowError::Fenced(format!(
            "the run is {} with owner {} at epoch {}",
            now.status.as_str(),
            now.owner,
            now.epoch
        )));
    }
    if now.cancel_requested {
        return Err(WorkflowError::Cancelled);
    }
    let steps = records.steps(&run.id).await?;
    let ctx = Ctx::new(&run.id, run.owner, run.epoch, records, steps, signals)
        .with_metrics(metrics)
        .with_drain(draining);
    let output = match types.get(&run.type_name, run.version) {
        Some(handler) => CatchUnwind(handler(ctx.clone(), run.input.clone()))
            .await
            .map_err(|panic| WorkflowError::Retry(format!("the code panicked: {panic}")))??,
        None => worker::attempt(&run, ctx.clone(), &table).await?,
    };
    ctx.check_complete()?;
    Ok(output)
}

/// Turns a panic while polling the code into an error, so that it is retried like a failure
/// and does not take the actor's thread down.
struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match catch_unwind(AssertUnwindSafe(|| Pin::new(inner).poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(panic) => Poll::Ready(Err(panic_message(panic))),
        }
    }
}

fn panic_message(panic: Box<dyn Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

impl Actor for WorkflowRun {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.attempt(ctx);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        for tx in self.stopped.drain(..) {
            let _ = tx.send(());
        }
    }
}

impl Managed for WorkflowRun {
    const KIND: &'static str = "workflow";

    fn dump_state(&self) -> Value {
        serde_json::json!({
            "id": self.run.id,
            "type": self.run.type_name,
            "version": self.run.version,
            "epoch": self.run.epoch,
            "attempts": self.attempts,
            "store_unavailable": self.unavailable,
            "phase": format!("{:?}", self.phase).to_lowercase(),
            "last_error": self.last_error,
        })
    }
}

impl Handler<RunChanged> for WorkflowRun {
    type Result = ();

    fn handle(&mut self, msg: RunChanged, ctx: &mut Context<Self>) {
        let run = msg.0;
        if run.cancel_requested && self.phase != Phase::Ending {
            if let Some(task) = self.task.take() {
                // Dropping the code's future ends its step (a shell step's process is killed).
                ctx.cancel_future(task);
            }
            self.end(Status::Cancelled, None, None, ctx);
        }
    }
}

impl Handler<SignalArrived> for WorkflowRun {
    type Result = ();

    fn handle(&mut self, _: SignalArrived, _: &mut Context<Self>) {
        self.signals.notify_one();
    }
}

impl Handler<Drain> for WorkflowRun {
    type Result = Drained;

    fn handle(&mut self, _: Drain, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.stopped.push(tx);
        self.draining.store(true, Ordering::SeqCst);
        if self.phase == Phase::Waiting {
            // Between attempts: nothing under way.
            ctx.stop();
        }
        Drained(rx)
    }
}
