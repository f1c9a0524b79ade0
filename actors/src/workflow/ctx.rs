//! What a workflow's code sees: [`Ctx`], whose steps, timers and signals are recorded through
//! raft before the code goes on, and replayed from the record after a restart or a takeover.
//!
//! Replay is by position: the n-th step the code asks for is the n-th step recorded, and its
//! name must be the recorded one. Code that asks for another sequence than the record holds is
//! stopped as nondeterministic with both sequences, never left to diverge.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Notify;

use super::metrics::WorkflowMetrics;
use super::record::{check_name, check_value, StepRecord, StepState, TypeInfo, MAX_STEPS};
use super::records::{RecordError, Records};
use crate::clock::precise_ms;

/// How a run (or one attempt of it) ended other than with a result.
#[derive(Clone, Debug, PartialEq)]
pub enum WorkflowError {
    /// The workflow failed for good (a step's command exited non-zero, bad input).
    Failed(String),
    /// This attempt failed; the run is tried again from its record, up to the retry limit.
    Retry(String),
    /// The store did not answer: tried again from the record, with no limit (an election or a
    /// lost quorum must not fail the runs that were waiting on it).
    Unavailable(String),
    /// A step that must not run twice may have run: stop in `needs-attention`.
    NeedsAttention(String),
    /// The code asked for other steps than the record holds.
    Nondeterministic {
        recorded: Vec<String>,
        replayed: Vec<String>,
    },
    /// This member no longer owns the run: stop without writing anything.
    Fenced(String),
    /// Neither code nor a worker on this member runs the run's type (its last worker left): the
    /// run is moved to a member that does, and waits here until one does.
    Unserved(String),
    /// The run was cancelled.
    Cancelled,
}

impl std::fmt::Display for WorkflowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Failed(m)
            | Self::Retry(m)
            | Self::Unavailable(m)
            | Self::NeedsAttention(m)
            | Self::Fenced(m)
            | Self::Unserved(m) => f.write_str(m),
            Self::Cancelled => f.write_str("cancelled"),
            Self::Nondeterministic { recorded, replayed } => write!(
                f,
                "nondeterministic: the record holds steps {recorded:?}, the code asked for {replayed:?}"
            ),
        }
    }
}

impl From<RecordError> for WorkflowError {
    fn from(e: RecordError) -> Self {
        match e {
            RecordError::Fenced { .. } => Self::Fenced(e.to_string()),
            RecordError::Store(_) => Self::Unavailable(e.to_string()),
            other => Self::Retry(other.to_string()),
        }
    }
}

/// The future a handler returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, WorkflowError>>>>;

/// A workflow type's code: `(ctx, input) -> result`.
pub type Handler = Arc<dyn Fn(Ctx, Value) -> HandlerFuture + Send + Sync>;

/// The workflow types this member runs, by name and version.
#[derive(Clone, Default)]
pub struct Types {
    handlers: BTreeMap<TypeInfo, Handler>,
}

impl Types {
    /// No types.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds type `name` at `version`: `handler` takes the run's input decoded as `I` and answers
    /// its result as `O`. A running workflow stays on the version it started with, so a new
    /// version is registered beside the old one until no run of the old one is left.
    pub fn register<I, O, F, Fut>(mut self, name: &str, version: u32, handler: F) -> Self
    where
        I: DeserializeOwned + 'static,
        O: Serialize + 'static,
        F: Fn(Ctx, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, WorkflowError>> + 'static,
    {
        let handler = Arc::new(handler);
        let erased: Handler = Arc::new(move |ctx: Ctx, input: Value| {
            let handler = handler.clone();
            Box::pin(async move {
                let input: I = serde_json::from_value(input)
                    .map_err(|e| WorkflowError::Failed(format!("input: {e}")))?;
                let output = handler(ctx, input).await?;
                serde_json::to_value(output)
                    .map_err(|e| WorkflowError::Failed(format!("result: {e}")))
            })
        });
        let info = TypeInfo {
            name: name.to_string(),
            version,
        };
        self.handlers.insert(info, erased);
        self
    }

    /// The code of `name` at `version`.
    pub fn get(&self, name: &str, version: u32) -> Option<Handler> {
        let info = TypeInfo {
            name: name.to_string(),
            version,
        };
        self.handlers.get(&info).cloned()
    }

    /// Every type and version, in order.
    pub fn list(&self) -> Vec<TypeInfo> {
        self.handlers.keys().cloned().collect()
    }
}

/// Whether a step may run again when its owner died while it ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repeat {
    /// Run it again (it is idempotent: a second run does no harm).
    AtLeastOnce,
    /// Never run it twice: its start is recorded first, and a start without an end stops the
    /// run in `needs-attention`.
    AtMostOnce,
}

struct Replay {
    recorded: Vec<StepRecord>,
    /// Names of the steps the code has asked for so far.
    asked: Vec<String>,
}

/// A running workflow's handle on its record. Cheap to clone; its steps are taken in order.
#[derive(Clone)]
pub struct Ctx {
    id: Arc<str>,
    owner: u64,
    epoch: u64,
    records: Records,
    replay: Arc<Mutex<Replay>>,
    signals: Arc<Notify>,
    metrics: Option<WorkflowMetrics>,
    /// Set when the member hands its runs off (a graceful shutdown): no new step starts.
    draining: Arc<AtomicBool>,
}

/// How often a waiting signal is looked for in the store even without a nudge from the watch.
const SIGNAL_POLL: Duration = Duration::from_secs(2);

impl Ctx {
    /// A context replaying `recorded`, writing as `owner` at `epoch`.
    pub(crate) fn new(
        id: &str,
        owner: u64,
        epoch: u64,
        records: Records,
        recorded: Vec<StepRecord>,
        signals: Arc<Notify>,
    ) -> Self {
        Self {
            id: id.into(),
            owner,
            epoch,
            records,
            replay: Arc::new(Mutex::new(Replay {
                recorded,
                asked: Vec::new(),
            })),
            signals,
            metrics: None,
            draining: Arc::default(),
        }
    }

    /// Stops taking steps once `draining` is set.
    pub(crate) fn with_drain(mut self, draining: Arc<AtomicBool>) -> Self {
        self.draining = draining;
        self
    }

    /// Times each step record into `metrics`.
    pub(crate) fn with_metrics(mut self, metrics: WorkflowMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The workflow's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The member running it.
    pub fn owner(&self) -> u64 {
        self.owner
    }

    /// Runs `f` once as step `name` (again if its owner died during it: see [`Ctx::step_once`]
    /// for steps that must not) and records its result before answering it; on replay answers
    /// the recorded result without running `f`. An error from `f` fails this attempt, which is
    /// retried from the record.
    pub async fn step<T, F, Fut>(&self, name: &str, f: F) -> Result<T, WorkflowError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        self.run_step(name, Repeat::AtLeastOnce, f).await
    }

    /// Like [`Ctx::step`] for a step that must never run twice.
    pub async fn step_once<T, F, Fut>(&self, name: &str, f: F) -> Result<T, WorkflowError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        self.run_step(name, Repeat::AtMostOnce, f).await
    }

    /// A step that may run again or not, as `repeat` says.
    pub async fn run_step<T, F, Fut>(
        &self,
        name: &str,
        repeat: Repeat,
        f: F,
    ) -> Result<T, WorkflowError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        check_name("step name", name).map_err(WorkflowError::Failed)?;
        let (index, recorded) = self.next(name)?;
        match recorded {
            Some(r) if r.state == StepState::Done => return decode(name, r.result),
            Some(_) if repeat == Repeat::AtMostOnce => {
                return Err(WorkflowError::NeedsAttention(format!(
                    "step {name:?} (#{index}) was running when its owner stopped and is not idempotent: \
                     it may or may not have taken effect, so it is not run again"
                )));
            }
            Some(_) => {}
            None if repeat == Repeat::AtMostOnce => {
                self.record(index, name, StepState::Started, Value::Null, None)
                    .await?;
            }
            None => {}
        }
        let output = f()
            .await
            .map_err(|e| WorkflowError::Retry(format!("step {name:?}: {e}")))?;
        let value = serde_json::to_value(&output)
            .map_err(|e| WorkflowError::Failed(format!("step {name:?}: result: {e}")))?;
        check_value(&format!("step {name:?}: result"), &value).map_err(WorkflowError::Failed)?;
        self.record(index, name, StepState::Done, value, None)
            .await?;
        Ok(output)
    }

    /// A durable timer, recorded as step `name`: waits `duration` from the first time the code
    /// got here, on whichever member owns the run then; firing is recorded, so it fires once.
    pub async fn sleep(&self, name: &str, duration: Duration) -> Result<(), WorkflowError> {
        check_name("step name", name).map_err(WorkflowError::Failed)?;
        let (index, recorded) = self.next(name)?;
        let until = match recorded {
            Some(r) if r.state == StepState::Done => return Ok(()),
            Some(r) => r.until_ms.unwrap_or(0),
            None => {
                let until = precise_ms() + duration.as_millis() as u64;
                self.record(index, name, StepState::Started, Value::Null, Some(until))
                    .await?;
                until
            }
        };
        let left = until.saturating_sub(precise_ms());
        tokio::time::sleep(Duration::from_millis(left)).await;
        self.record(index, name, StepState::Done, Value::Null, Some(until))
            .await
    }

    /// Waits for signal `name` (sent with `lodge workflow signal`) as the step of that name, and
    /// answers its value. The value is recorded, so replay answers the same one.
    pub async fn signal<T: DeserializeOwned>(&self, name: &str) -> Result<T, WorkflowError> {
        self.wait_signal(name, name).await
    }

    /// Like [`Ctx::signal`], recorded as step `step`.
    pub async fn wait_signal<T: DeserializeOwned>(
        &self,
        step: &str,
        signal: &str,
    ) -> Result<T, WorkflowError> {
        check_name("step name", step).map_err(WorkflowError::Failed)?;
        check_name("signal name", signal).map_err(WorkflowError::Failed)?;
        let (index, recorded) = self.next(step)?;
        if let Some(r) = recorded.filter(|r| r.state == StepState::Done) {
            return decode(step, r.result);
        }
        loop {
            if let Some(value) = self.records.signal_value(&self.id, signal).await? {
                self.record(index, step, StepState::Done, value.clone(), None)
                    .await?;
                return decode(step, value);
            }
            // Woken by the watch when a signal for this run arrives; the poll covers a nudge
            // that came between the read above and this wait.
            let _ = tokio::time::timeout(SIGNAL_POLL, self.signals.notified()).await;
        }
    }

    /// Takes the next position for step `name`: its index and its record, if any; refuses a
    /// name other than the recorded one, and a history past its bound.
    fn next(&self, name: &str) -> Result<(usize, Option<StepRecord>), WorkflowError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(WorkflowError::Fenced(
                "this member is shutting down and hands the run to another".into(),
            ));
        }
        let mut replay = self.replay.lock().unwrap();
        let index = replay.asked.len();
        replay.asked.push(name.to_string());
        let recorded = replay.recorded.get(index).cloned();
        if let Some(r) = &recorded {
            if r.name != name {
                return Err(nondeterministic(&replay));
            }
        }
        if index >= MAX_STEPS {
            return Err(WorkflowError::Failed(format!(
                "history: over the bound of {MAX_STEPS} steps per workflow"
            )));
        }
        Ok((index, recorded))
    }

    /// Takes every recorded step as replayed, for code that replays them itself (an external
    /// worker), and answers them.
    pub(crate) fn replay_all(&self) -> Vec<StepRecord> {
        let mut replay = self.replay.lock().unwrap();
        replay.asked = replay.recorded.iter().map(|r| r.name.clone()).collect();
        replay.recorded.clone()
    }

    /// The index the next step takes.
    pub(crate) fn next_index(&self) -> usize {
        self.replay.lock().unwrap().asked.len()
    }

    /// After the code returned: the record must hold no step it did not ask for.
    pub(crate) fn check_complete(&self) -> Result<(), WorkflowError> {
        let replay = self.replay.lock().unwrap();
        if replay.recorded.len() > replay.asked.len() {
            return Err(nondeterministic(&replay));
        }
        Ok(())
    }

    async fn record(
        &self,
        index: usize,
        name: &str,
        state: StepState,
        result: Value,
        until_ms: Option<u64>,
    ) -> Result<(), WorkflowError> {
        let step = StepRecord {
            name: name.to_string(),
            state,
            result,
            until_ms,
            at_ms: precise_ms(),
            epoch: self.epoch,
        };
        let began = std::time::Instant::now();
        self.records
            .record_step(&self.id, self.owner, self.epoch, index, &step)
            .await?;
        if let Some(m) = &self.metrics {
            m.step_recorded(began.elapsed());
        }
        let mut replay = self.replay.lock().unwrap();
        match replay.recorded.get_mut(index) {
            Some(r) => *r = step,
            None => replay.recorded.push(step),
        }
        Ok(())
    }
}

fn decode<T: DeserializeOwned>(name: &str, value: Value) -> Result<T, WorkflowError> {
    serde_json::from_value(value)
        .map_err(|e| WorkflowError::Failed(format!("step {name:?}: recorded result: {e}")))
}

fn nondeterministic(replay: &Replay) -> WorkflowError {
    WorkflowError::Nondeterministic {
        recorded: replay.recorded.iter().map(|r| r.name.clone()).collect(),
        replayed: replay.asked.clone(),
    }
}
