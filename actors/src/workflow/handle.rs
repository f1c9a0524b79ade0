//! What the workflow service's adapter calls: starts go to this member's workflow table (which
//! places them), everything else reads or writes the records through the store client, so every
//! member answers every call.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use tokio::sync::mpsc;

use super::record::{check_name, check_value, Run, Status, StepRecord, TypeInfo, ROOT};
use super::records::{ReadRun, RecordError, Records};
use super::table::{ConnectWorker, StartWorkflow, Started, WorkflowTable};
use super::worker::{ToWorker, WorkflowWorker, WORKER_QUEUE};
use crate::cluster::watch::WatchUpdate;
use crate::envelope::ActorRef;

/// Most types one worker may declare (they are published in one record).
pub const MAX_WORKER_TYPES: usize = 256;

/// Most runs one List page holds.
pub const MAX_PAGE: usize = 1000;

/// A run with its recorded steps.
#[derive(Clone, Debug)]
pub struct RunDetail {
    pub run: Run,
    pub steps: Vec<StepRecord>,
}

/// One page of runs.
#[derive(Clone, Debug, Default)]
pub struct RunPage {
    pub runs: Vec<Run>,
    /// Where the next page starts (the last id of this one); empty on the last page.
    pub next_page_token: String,
}

/// What a watch of one run sees: the run as it was, then its changes in the order they were
/// applied.
pub struct RunFollow {
    /// The run and its steps when the watch began.
    pub detail: RunDetail,
    /// Every later change under the workflows' prefix: one feed, so that a step and the run's
    /// end arrive in the order they happened. Filter on the run's keys; skip step records at or
    /// below `steps_revision` (the snapshot holds them).
    pub changes: mpsc::Receiver<WatchUpdate>,
    pub steps_revision: i64,
}

/// A type and the members that run it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeServed {
    pub name: String,
    pub version: u32,
    pub nodes: Vec<u64>,
}

/// The workflows as the service reaches them.
#[derive(Clone)]
pub struct WorkflowHandle {
    table: ActorRef<WorkflowTable>,
    records: Records,
}

impl WorkflowHandle {
    /// Starts through `table`, reads and writes `records`.
    pub fn new(table: ActorRef<WorkflowTable>, records: Records) -> Self {
        Self { table, records }
    }

    /// Starts a run (or answers the run with `start.id`).
    pub async fn start(
        &self,
        start: StartWorkflow,
        deadline: Duration,
    ) -> Result<Started, RecordError> {
        self.table
            .send_timeout(start, deadline)
            .await
            .map_err(|e| {
                RecordError::Store(crate::cluster::store::StoreError::Unavailable(format!(
                    "the workflow table did not answer: {e:?}"
                )))
            })?
    }

    /// Connects worker `id`, serving `types`: answers its actor (what the worker sends goes
    /// there as [`Report`](super::worker::Report)s) and what it is sent.
    pub async fn connect_worker(
        &self,
        id: &str,
        types: Vec<TypeInfo>,
    ) -> Result<(ActorRef<WorkflowWorker>, mpsc::Receiver<ToWorker>), RecordError> {
        check_name("worker_id", id).map_err(RecordError::Invalid)?;
        if types.is_empty() || types.len() > MAX_WORKER_TYPES {
            return Err(RecordError::Invalid(format!(
                "types: a worker declares from 1 to {MAX_WORKER_TYPES} types it serves, not {}",
                types.len()
            )));
        }
        for t in &types {
            check_name("types.name", &t.name).map_err(RecordError::Invalid)?;
        }
        let (out, tasks) = mpsc::channel(WORKER_QUEUE);
        let connect = ConnectWorker {
            id: id.to_string(),
            types,
            out,
        };
        let worker = self.table.send(connect).await.map_err(|e| {
            RecordError::Store(crate::cluster::store::StoreError::Unavailable(format!(
                "the workflow table did not answer: {e:?}"
            )))
        })??;
        Ok((worker, tasks))
    }

    /// Run `id` with its steps.
    pub async fn get(&self, id: &str) -> Result<RunDetail, RecordError> {
        check_name("id", id).map_err(RecordError::Invalid)?;
        let ReadRun { run, .. } = self.records.get(id).await?;
        let steps = self.records.steps(id).await?;
        Ok(RunDetail { run, steps })
    }

    /// Run `id` now and every change after, with no gap between the two: the run is read
    /// before its steps, and the feed starts right after the run's read.
    pub async fn follow(&self, id: &str) -> Result<RunFollow, RecordError> {
        check_name("id", id).map_err(RecordError::Invalid)?;
        let (ReadRun { run, .. }, revision) = self.records.get_at(id).await?;
        let (steps, steps_revision) = self.records.steps_at(id).await?;
        let changes = self
            .records
            .watch(ROOT.as_bytes().to_vec(), revision + 1)
            .await?;
        Ok(RunFollow {
            detail: RunDetail { run, steps },
            changes,
            steps_revision,
        })
    }

    /// Runs in id order, of `type_name` and `status` when given, after `page_token`.
    pub async fn list(
        &self,
        type_name: Option<&str>,
        status: Option<Status>,
        page_token: &str,
        limit: usize,
    ) -> Result<RunPage, RecordError> {
        let limit = if limit == 0 { 100 } else { limit.min(MAX_PAGE) };
        let (runs, _) = self.records.runs(false).await?;
        let mut page: Vec<Run> = runs
            .into_iter()
            .map(|r| r.run)
            .filter(|r| page_token.is_empty() || r.id.as_str() > page_token)
            .filter(|r| type_name.is_none_or(|t| r.type_name == t))
            .filter(|r| status.is_none_or(|s| r.status == s))
            .take(limit + 1)
            .collect();
        let more = page.len() > limit;
        page.truncate(limit);
        let next_page_token = match page.last() {
            Some(last) if more => last.id.clone(),
            _ => String::new(),
        };
        Ok(RunPage {
            runs: page,
            next_page_token,
        })
    }

    /// Asks the owner to cancel run `id`; a run that ended already is refused, naming its status.
    pub async fn cancel(&self, id: &str) -> Result<Run, RecordError> {
        check_name("id", id).map_err(RecordError::Invalid)?;
        let id_owned = id.to_string();
        let read = self
            .records
            .rewrite(id, None, move |run| {
                if run.status != Status::Running {
                    return Err(format!(
                        "workflow {id_owned} is {} already; only a running workflow can be cancelled",
                        run.status.as_str()
                    ));
                }
                let changed = !run.cancel_requested;
                run.cancel_requested = true;
                Ok(changed)
            })
            .await?;
        Ok(read.run)
    }

    /// Sends signal `name` to run `id`.
    pub async fn signal(&self, id: &str, name: &str, value: &Value) -> Result<(), RecordError> {
        check_name("id", id).map_err(RecordError::Invalid)?;
        check_name("name", name).map_err(RecordError::Invalid)?;
        check_value("value", value).map_err(RecordError::Invalid)?;
        self.records.signal(id, name, value).await
    }

    /// Every type some member runs, with those members.
    pub async fn types(&self) -> Result<Vec<TypeServed>, RecordError> {
        let mut served: BTreeMap<(String, u32), Vec<u64>> = BTreeMap::new();
        for (node, types) in self.records.types().await? {
            for t in types {
                served.entry((t.name, t.version)).or_default().push(node);
            }
        }
        Ok(served
            .into_iter()
            .map(|((name, version), nodes)| TypeServed {
                name,
                version,
                nodes,
            })
            .collect())
    }
}
