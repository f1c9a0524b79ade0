//! `/node/workers/<id>`: one external worker, written in any language and connected over a
//! stream. It declares the types it serves; a run of such a type that this member owns, and that
//! no code on the member runs, is activated on it: the worker gets the run and its recorded
//! steps, replays them, and records each new step and the run's end through the stream. Every
//! step is recorded by the run's actor through its [`Ctx`], so the epoch fence, the bounds and
//! the metrics are those of code on the member.
//!
//! The stream is the worker's lease (kept alive by the server's HTTP/2 keepalive): when it ends
//! the actor stops, each activation it held ends as "worker gone" without counting against the
//! run's retries, and the run is activated on another worker of its type, here or, failing
//! that, on another member.

use std::collections::HashMap;

use actix::{Actor, ActorContext, AsyncContext, Context, Handler, Message, WrapFuture};
use serde_json::Value;
use slog::{info, warn, Logger};
use tokio::sync::mpsc;

use super::ctx::{Ctx, WorkflowError};
use super::record::{Run, StepRecord, TypeInfo};
use super::table::{PickWorker, WorkerJoined, WorkerLeft, WorkflowTable};
use crate::envelope::ActorRef;
use crate::supervision::Managed;

/// Tasks queued for one worker before it counts as not keeping up and is dropped.
pub const WORKER_QUEUE: usize = 256;

/// What the member sends a worker.
#[derive(Clone, Debug, PartialEq)]
pub enum ToWorker {
    /// Run this: the run (input, epoch) and the steps recorded so far, to replay in order.
    Activate { run: Run, steps: Vec<StepRecord> },
    /// The answer to a step: recorded, or refused with the reason (then the worker drops the run).
    Recorded {
        run_id: String,
        index: u32,
        error: Option<String>,
    },
    /// Stop working on this run: cancelled, moved, or its activation ended here.
    Stop { run_id: String },
}

/// What a worker sends about one of its activations.
#[derive(Clone, Debug, PartialEq)]
pub enum FromWorker {
    /// Record step `index` (the next one) of the run.
    Step {
        run_id: String,
        epoch: u64,
        index: u32,
        name: String,
        result: Value,
    },
    /// The activation ended: `Ok` with the run's result, or an error that is tried again from
    /// the record (`retry`) or fails the run.
    Finish {
        run_id: String,
        epoch: u64,
        outcome: Result<Value, (String, bool)>,
    },
}

impl FromWorker {
    fn run_id(&self) -> &str {
        match self {
            Self::Step { run_id, .. } | Self::Finish { run_id, .. } => run_id,
        }
    }
}

/// A message from the worker's stream.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Report(pub FromWorker);

/// The worker's stream ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect;

/// Activates `run` on this worker; answers the activation's inbox (the worker's reports about
/// it) and where to answer them.
#[derive(Message)]
#[rtype(result = "Result<Activation, String>")]
pub struct Activate {
    pub run: Run,
    pub steps: Vec<StepRecord>,
}

/// A run activated on a worker, from the run actor's side.
pub struct Activation {
    pub inbox: mpsc::Receiver<FromWorker>,
    pub replies: mpsc::Sender<ToWorker>,
}

/// The activation of `run_id` ended on the member's side (`finished`: the worker ended it).
#[derive(Message)]
#[rtype(result = "()")]
struct Released {
    run_id: String,
    finished: bool,
}

crate::handles!(WorkflowWorker: Report, Disconnect, Activate, Released);

/// One connected external worker.
pub struct WorkflowWorker {
    id: String,
    types: Vec<TypeInfo>,
    me: ActorRef<WorkflowWorker>,
    table: ActorRef<WorkflowTable>,
    out: mpsc::Sender<ToWorker>,
    /// The inbox of each run activated here.
    active: HashMap<String, mpsc::Sender<FromWorker>>,
    activations: u64,
    log: Logger,
}

impl WorkflowWorker {
    /// Worker `id` serving `types`; what it is sent goes to `out`, which the adapter writes to
    /// its stream. `me` is the reference it was started under, told to `table`.
    pub fn new(
        id: String,
        types: Vec<TypeInfo>,
        me: ActorRef<WorkflowWorker>,
        table: ActorRef<WorkflowTable>,
        out: mpsc::Sender<ToWorker>,
        log: &Logger,
    ) -> Self {
        let log = log.new(slog::o!("worker" => id.clone()));
        Self {
            id,
            types,
            me,
            table,
            out,
            active: HashMap::new(),
            activations: 0,
            log,
        }
    }

    /// Queues `task` for the worker; one that does not read its stream is dropped, so that its
    /// runs go to a worker that does.
    fn tell(&mut self, task: ToWorker, ctx: &mut Context<Self>) {
        if self.out.try_send(task).is_err() {
            warn!(self.log, "worker does not keep up with its stream (or is gone); dropping it";
                "queued" => WORKER_QUEUE);
            ctx.stop();
        }
    }
}

impl Actor for WorkflowWorker {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        info!(self.log, "worker connected"; "types" => ?self.types);
        let (table, joined) = (
            self.table.clone(),
            WorkerJoined {
                id: self.id.clone(),
                types: self.types.clone(),
                worker: self.me.clone(),
            },
        );
        // Waits for room in the table's mailbox rather than losing the join.
        ctx.spawn(
            async move {
                let _ = table.send(joined).await;
            }
            .into_actor(self),
        );
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        info!(self.log, "worker gone"; "active" => self.active.len());
        // Dropping the inboxes ends each activation as "worker gone".
        self.active.clear();
        // The table also drops workers whose actor stopped on its regular check, so a full
        // mailbox here costs a moment, not a worker that is never forgotten.
        let _ = self.table.try_send(WorkerLeft {
            id: self.id.clone(),
        });
    }
}

impl Managed for WorkflowWorker {
    const KIND: &'static str = "workflow-worker";

    fn dump_state(&self) -> Value {
        let mut active: Vec<&String> = self.active.keys().collect();
        active.sort();
        serde_json::json!({
            "id": self.id,
            "types": self.types,
            "active": active,
            "activations": self.activations,
        })
    }
}

impl Handler<Activate> for WorkflowWorker {
    type Result = Result<Activation, String>;

    fn handle(&mut self, msg: Activate, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, inbox) = mpsc::channel(16);
        let run_id = msg.run.id.clone();
        self.tell(
            ToWorker::Activate {
                run: msg.run,
                steps: msg.steps,
            },
            ctx,
        );
        if !matches!(ctx.state(), actix::ActorState::Running) {
            return Err(format!("worker {} is gone", self.id));
        }
        self.active.insert(run_id, tx);
        self.activations += 1;
        Ok(Activation {
            inbox,
            replies: self.out.clone(),
        })
    }
}

impl Handler<Report> for WorkflowWorker {
    type Result = ();

    fn handle(&mut self, msg: Report, ctx: &mut Context<Self>) {
        let report = msg.0;
        let run_id = report.run_id().to_string();
        let delivered = match self.active.get(&run_id) {
            Some(inbox) => inbox.try_send(report.clone()).is_ok(),
            None => false,
        };
        if !delivered {
            if let FromWorker::Step { index, .. } = report {
                let error = format!(
                    "run {run_id} is not active on worker {} (it ended, moved or was cancelled)",
                    self.id
                );
                self.tell(
                    ToWorker::Recorded {
                        run_id,
                        index,
                        error: Some(error),
                    },
                    ctx,
                );
            }
        }
    }
}

impl Handler<Released> for WorkflowWorker {
    type Result = ();

    fn handle(&mut self, msg: Released, ctx: &mut Context<Self>) {
        if self.active.remove(&msg.run_id).is_some() && !msg.finished {
            self.tell(ToWorker::Stop { run_id: msg.run_id }, ctx);
        }
    }
}

impl Handler<Disconnect> for WorkflowWorker {
    type Result = ();

    fn handle(&mut self, _: Disconnect, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// Tells the worker when the run actor's side of an activation ends, however it ends (a
/// cancel drops the attempt mid-way).
struct Release {
    worker: ActorRef<WorkflowWorker>,
    run_id: String,
    finished: bool,
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = self.worker.try_send(Released {
            run_id: std::mem::take(&mut self.run_id),
            finished: self.finished,
        });
    }
}

/// One attempt of `run` on a worker of this member: activates it with the recorded steps,
/// records the worker's steps through `ctx` in order, and answers its end.
pub(crate) async fn attempt(
    run: &Run,
    ctx: Ctx,
    table: &ActorRef<WorkflowTable>,
) -> Result<Value, WorkflowError> {
    let info = TypeInfo {
        name: run.type_name.clone(),
        version: run.version,
    };
    let (worker_id, worker) = table
        .send(PickWorker {
            run_id: run.id.clone(),
            info,
        })
        .await
        .map_err(|e| WorkflowError::Unavailable(format!("the workflow table: {e:?}")))?
        .ok_or_else(|| {
            WorkflowError::Unserved(format!(
                "type {} version {} is served by no code or worker on member {}",
                run.type_name, run.version, run.owner
            ))
        })?;
    let steps = ctx.replay_all();
    let gone = |e: String| WorkflowError::Unavailable(format!("worker: {e}"));
    let Activation { mut inbox, replies } = worker
        .send(Activate {
            run: run.clone(),
            steps,
        })
        .await
        .map_err(|e| gone(format!("{e:?}")))?
        .map_err(gone)?;
    let mut release = Release {
        worker,
        run_id: run.id.clone(),
        finished: false,
    };
    while let Some(report) = inbox.recv().await {
        match report {
            FromWorker::Step {
                epoch,
                index,
                name,
                result,
                ..
            } => {
                let recorded = record(run, &ctx, epoch, index, &name, result).await;
                let error = recorded.as_ref().err().map(|e| e.to_string());
                let answer = ToWorker::Recorded {
                    run_id: run.id.clone(),
                    index,
                    error,
                };
                if replies.send(answer).await.is_err() {
                    break;
                }
                recorded?;
            }
            FromWorker::Finish { epoch, outcome, .. } => {
                release.finished = true;
                if epoch != run.epoch {
                    return Err(WorkflowError::Retry(format!(
                        "the worker ended epoch {epoch} of the run, whose epoch here is {}",
                        run.epoch
                    )));
                }
                return outcome.map_err(|(error, retry)| match retry {
                    true => WorkflowError::Retry(error),
                    false => WorkflowError::Failed(error),
                });
            }
        }
    }
    Err(WorkflowError::Unavailable(format!(
        "worker {worker_id} went away during the run"
    )))
}

/// Records a worker's step through `ctx`, after checking it belongs to this activation and
/// comes next.
pub(crate) async fn record(
    run: &Run,
    ctx: &Ctx,
    epoch: u64,
    index: u32,
    name: &str,
    result: Value,
) -> Result<(), WorkflowError> {
    if epoch != run.epoch {
        return Err(WorkflowError::Fenced(format!(
            "step {index} is for epoch {epoch} of the run, whose epoch is {}",
            run.epoch
        )));
    }
    let next = ctx.next_index();
    if index as usize != next {
        return Err(WorkflowError::Retry(format!(
            "the worker sent step {index}; the record's next step is {next}"
        )));
    }
    ctx.step(name, || async { Ok::<Value, String>(result) })
        .await
        .map(|_| ())
}
