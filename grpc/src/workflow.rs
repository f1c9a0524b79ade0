//! `lodge.workflow.v1.Workflow` → the workflow handle (starts and workers' streams through this
//! member's workflow table, the rest through the store client; a watch follows the records on
//! this member).
//! Decodes, checks what the role table cannot see (a runbook runs shell commands on the owner,
//! so starting one needs `admin`), bounds each call by the caller's deadline, and maps the
//! answer to a status.

use std::pin::Pin;
use std::time::Duration;

use lodge_actors::cluster::store::StoreError;
use lodge_actors::cluster::watch::WatchUpdate;
use lodge_actors::envelope::ActorRef;
use lodge_actors::workflow::handle::{RunDetail, RunFollow, WorkflowHandle};
use lodge_actors::workflow::record::{
    run_key, steps_prefix, Run, Status as RunStatus, StepRecord, StepState, TypeInfo,
};
use lodge_actors::workflow::records::RecordError;
use lodge_actors::workflow::runbook::RUNBOOK;
use lodge_actors::workflow::worker::{Disconnect, FromWorker, Report, ToWorker, WorkflowWorker};
use lodge_actors::workflow::StartWorkflow;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::caller::Caller;
use crate::auth::roles::Role;
use crate::deadline;
use crate::kv::stream_until_shutdown;
use crate::pb::workflow::{self as pb, workflow_server};

/// The workflow adapter.
pub struct WorkflowService {
    handle: WorkflowHandle,
    timeout: Duration,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl WorkflowService {
    /// A service over `handle`; calls without a deadline get `timeout`; watches end when
    /// `shutdown` turns true.
    pub fn new(
        handle: WorkflowHandle,
        timeout: Duration,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            handle,
            timeout,
            shutdown,
        }
    }
}

/// Passes a followed run's changes on as events, in the order they were applied, until it
/// ends (its last event shows the end).
async fn follow(
    id: String,
    mut changes: mpsc::Receiver<WatchUpdate>,
    steps_revision: i64,
    tx: mpsc::Sender<Result<pb::WatchEvent, Status>>,
) {
    let (run, steps) = (run_key(&id), steps_prefix(&id));
    while let Some(update) = changes.recv().await {
        let (revision, events) = match update {
            WatchUpdate::Events { revision, events } => (revision, events),
            WatchUpdate::Cancelled { reason, .. } => {
                let _ = tx
                    .send(Err(Status::unavailable(format!(
                        "watch of workflow {id} ended ({reason}); watch again"
                    ))))
                    .await;
                return;
            }
        };
        for e in events.into_iter().filter(|e| !e.deleted) {
            let (event, ended) = if e.kv.key == run {
                let Ok(r) = serde_json::from_slice::<Run>(&e.kv.value) else {
                    continue;
                };
                let ended = r.status != RunStatus::Running;
                let event = pb::WatchEvent {
                    run: Some(run_pb(r)),
                    step: None,
                };
                (event, ended)
            } else if let Some(index) = e.kv.key.strip_prefix(&steps[..]) {
                if revision <= steps_revision {
                    continue;
                }
                let index = std::str::from_utf8(index)
                    .ok()
                    .and_then(|i| i.parse::<usize>().ok());
                let step = serde_json::from_slice::<StepRecord>(&e.kv.value).ok();
                let (Some(index), Some(step)) = (index, step) else {
                    continue;
                };
                let event = pb::WatchEvent {
                    run: None,
                    step: Some(step_pb(index, step)),
                };
                (event, false)
            } else {
                continue;
            };
            if tx.send(Ok(event)).await.is_err() || ended {
                return;
            }
        }
    }
}

/// The status a record error answers.
fn status(e: RecordError) -> Status {
    match e {
        RecordError::NotFound(_) => Status::not_found(e.to_string()),
        RecordError::Invalid(m) => Status::invalid_argument(m),
        RecordError::Refused(m) => Status::failed_precondition(m),
        RecordError::Fenced { .. } => Status::aborted(e.to_string()),
        RecordError::Store(StoreError::Unknown(m)) => Status::unknown(format!(
            "{m}; the change may or may not have been made: read before trying again"
        )),
        RecordError::Store(e) => Status::unavailable(e.to_string()),
    }
}

/// `work`'s answer, or DEADLINE_EXCEEDED once the caller's `budget` is spent.
async fn within<T>(
    budget: Duration,
    work: impl std::future::Future<Output = Result<T, RecordError>>,
) -> Result<T, Status> {
    match tokio::time::timeout(budget, work).await {
        Ok(answer) => answer.map_err(status),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no answer within the call's deadline ({} ms)",
            budget.as_millis()
        ))),
    }
}

/// `field`'s JSON text; empty is null.
fn json_field(field: &str, text: &str) -> Result<Value, Status> {
    if text.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(text)
        .map_err(|e| Status::invalid_argument(format!("{field}: not JSON: {e}")))
}

fn json_text(v: &Option<Value>) -> String {
    v.as_ref().map(Value::to_string).unwrap_or_default()
}

fn run_pb(r: Run) -> pb::Run {
    pb::Run {
        id: r.id,
        r#type: r.type_name,
        version: r.version,
        status: r.status.as_str().into(),
        owner: r.owner,
        epoch: r.epoch,
        input_json: r.input.to_string(),
        result_json: json_text(&r.result),
        error: r.error.unwrap_or_default(),
        cancel_requested: r.cancel_requested,
        created_ms: r.created_ms,
        ended_ms: r.ended_ms.unwrap_or(0),
    }
}

/// Recorded steps, numbered from 0.
fn steps_pb(steps: Vec<StepRecord>) -> Vec<pb::Step> {
    steps
        .into_iter()
        .enumerate()
        .map(|(i, s)| step_pb(i, s))
        .collect()
}

fn step_pb(index: usize, s: StepRecord) -> pb::Step {
    pb::Step {
        index: index as u32,
        name: s.name,
        state: match s.state {
            StepState::Started => "started",
            StepState::Done => "done",
        }
        .into(),
        result_json: s.result.to_string(),
        at_ms: s.at_ms,
        epoch: s.epoch,
    }
}

type Events = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;
type Tasks = Pin<Box<dyn Stream<Item = Result<pb::WorkerTask, Status>> + Send>>;

#[tonic::async_trait]
impl workflow_server::Workflow for WorkflowService {
    async fn start(
        &self,
        req: Request<pb::StartRequest>,
    ) -> Result<Response<pb::StartResponse>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let caller = Caller::of(req.extensions());
        let r = req.into_inner();
        if r.r#type.is_empty() {
            return Err(Status::invalid_argument("type: required"));
        }
        if r.r#type == RUNBOOK && !caller.has(Role::Admin) {
            return Err(Status::permission_denied(
                "type: a runbook runs shell commands on the node as the node's user; starting one needs the admin role",
            ));
        }
        let start = StartWorkflow {
            id: (!r.id.is_empty()).then_some(r.id),
            type_name: r.r#type,
            version: (r.version != 0).then_some(r.version),
            input: json_field("input_json", &r.input_json)?,
        };
        let started = self.handle.start(start, budget).await.map_err(status)?;
        Ok(Response::new(pb::StartResponse {
            run: Some(run_pb(started.run)),
            created: started.created,
        }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let RunDetail { run, steps } = within(budget, self.handle.get(&req.get_ref().id)).await?;
        Ok(Response::new(pb::GetResponse {
            run: Some(run_pb(run)),
            steps: steps_pb(steps),
        }))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let r = req.into_inner();
        let wanted = match r.status.as_str() {
            "" => None,
            s => Some(RunStatus::parse(s).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "status: {s:?} is none of running, completed, failed, needs-attention, cancelled"
                ))
            })?),
        };
        let kind = (!r.r#type.is_empty()).then_some(r.r#type.as_str());
        let page = within(
            budget,
            self.handle
                .list(kind, wanted, &r.page_token, r.limit as usize),
        )
        .await?;
        Ok(Response::new(pb::ListResponse {
            runs: page.runs.into_iter().map(run_pb).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn cancel(
        &self,
        req: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let run = self
            .handle
            .cancel(&req.get_ref().id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::CancelResponse {
            run: Some(run_pb(run)),
        }))
    }

    async fn signal(
        &self,
        req: Request<pb::SignalRequest>,
    ) -> Result<Response<pb::SignalResponse>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let r = req.into_inner();
        let value = json_field("value_json", &r.value_json)?;
        within(budget, self.handle.signal(&r.id, &r.name, &value)).await?;
        Ok(Response::new(pb::SignalResponse {}))
    }

    async fn list_types(
        &self,
        req: Request<pb::ListTypesRequest>,
    ) -> Result<Response<pb::ListTypesResponse>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let types = within(budget, self.handle.types()).await?;
        Ok(Response::new(pb::ListTypesResponse {
            types: types
                .into_iter()
                .map(|t| pb::WorkflowType {
                    name: t.name,
                    version: t.version,
                    nodes: t.nodes,
                })
                .collect(),
        }))
    }

    type WatchStream = Events;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<Events>, Status> {
        // The deadline bounds the start of the watch, not the stream.
        let budget = deadline::of(&req, self.timeout);
        let id = req.into_inner().id;
        let RunFollow {
            detail,
            changes,
            steps_revision,
        } = within(budget, self.handle.follow(&id)).await?;
        let ended = detail.run.status != RunStatus::Running;
        let first = pb::WatchEvent {
            run: Some(run_pb(detail.run)),
            step: None,
        };
        let recorded: Vec<pb::WatchEvent> = detail
            .steps
            .into_iter()
            .enumerate()
            .map(|(i, s)| pb::WatchEvent {
                run: None,
                step: Some(step_pb(i, s)),
            })
            .collect();
        let stream = stream_until_shutdown(self.shutdown.clone(), move |tx| async move {
            for event in std::iter::once(first).chain(recorded) {
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            if !ended {
                follow(id, changes, steps_revision, tx).await;
            }
        });
        Ok(Response::new(stream))
    }

    type WorkStream = Tasks;

    async fn work(
        &self,
        req: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Tasks>, Status> {
        // The deadline bounds the hello, not the stream.
        let budget = deadline::of(&req, self.timeout);
        let mut reports = req.into_inner();
        let hello = match tokio::time::timeout(budget, reports.message()).await {
            Ok(Ok(Some(pb::WorkerMessage {
                kind: Some(pb::worker_message::Kind::Hello(hello)),
            }))) => hello,
            Ok(Ok(_)) => {
                return Err(Status::invalid_argument(
                    "hello: a worker's first message says who it is and the types it serves",
                ))
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(Status::deadline_exceeded(
                    "hello: none within the call's deadline",
                ))
            }
        };
        let types = hello
            .types
            .into_iter()
            .map(|t| TypeInfo {
                name: t.name,
                version: t.version,
            })
            .collect();
        let (worker, tasks) =
            within(budget, self.handle.connect_worker(&hello.worker_id, types)).await?;
        let stream = stream_until_shutdown(self.shutdown.clone(), move |tx| {
            relay(worker, reports, tasks, tx)
        });
        Ok(Response::new(stream))
    }
}

/// Passes a worker's messages to its actor and the actor's tasks to the worker until either
/// side ends; the actor is stopped however it ends (its runs then go to another worker).
async fn relay(
    worker: ActorRef<WorkflowWorker>,
    mut reports: Streaming<pb::WorkerMessage>,
    mut tasks: mpsc::Receiver<ToWorker>,
    tx: mpsc::Sender<Result<pb::WorkerTask, Status>>,
) {
    let _disconnect = Disconnects(worker.clone());
    loop {
        tokio::select! {
            task = tasks.recv() => {
                let Some(task) = task else {
                    let _ = tx.send(Err(Status::unavailable(
                        "the worker's actor stopped (it fell behind, or the member restarted its workflows or shuts down): connect again",
                    ))).await;
                    return;
                };
                if tx.send(Ok(task_pb(task))).await.is_err() {
                    return;
                }
            }
            message = reports.message() => {
                let Ok(Some(message)) = message else { return };
                match report(message) {
                    Ok(r) => {
                        if worker.send(Report(r)).await.is_err() {
                            return;
                        }
                    }
                    Err(refused) => {
                        let _ = tx.send(Err(refused)).await;
                        return;
                    }
                }
            }
        }
    }
}

/// Stops a worker's actor when its stream's relay ends, however it ends.
struct Disconnects(ActorRef<WorkflowWorker>);

impl Drop for Disconnects {
    fn drop(&mut self) {
        let _ = self.0.try_send(Disconnect);
    }
}

/// A worker's message as its actor takes it; a malformed one ends the stream with the field.
fn report(m: pb::WorkerMessage) -> Result<FromWorker, Status> {
    use pb::worker_message::Kind;
    match m.kind {
        Some(Kind::Step(s)) => Ok(FromWorker::Step {
            result: json_field("step.result_json", &s.result_json)?,
            run_id: s.run_id,
            epoch: s.epoch,
            index: s.index,
            name: s.name,
        }),
        Some(Kind::Finish(f)) => {
            let outcome = if f.error.is_empty() {
                Ok(json_field("finish.result_json", &f.result_json)?)
            } else {
                Err((f.error, f.retry))
            };
            Ok(FromWorker::Finish {
                run_id: f.run_id,
                epoch: f.epoch,
                outcome,
            })
        }
        Some(Kind::Hello(_)) => Err(Status::invalid_argument(
            "hello: sent once, as the stream's first message",
        )),
        None => Err(Status::invalid_argument(
            "kind: a worker message is a hello, a step or a finish",
        )),
    }
}

fn task_pb(t: ToWorker) -> pb::WorkerTask {
    use pb::worker_task::Kind;
    let kind = match t {
        ToWorker::Activate { run, steps } => Kind::Activation(pb::Activation {
            run: Some(run_pb(run)),
            steps: steps_pb(steps),
        }),
        ToWorker::Recorded {
            run_id,
            index,
            error,
        } => Kind::Recorded(pb::StepRecorded {
            run_id,
            index,
            error: error.unwrap_or_default(),
        }),
        ToWorker::Stop { run_id } => Kind::StopRunId(run_id),
    };
    pb::WorkerTask { kind: Some(kind) }
}
