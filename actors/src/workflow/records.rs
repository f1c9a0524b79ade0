//! The workflow records' reads and writes, each one transaction through the store client, with
//! the checks that make them safe to race: start only where no run is, an owner write only while
//! the fence names that owner, a run rewritten only from the version that was read.

use std::sync::Arc;

use serde_json::Value;

use super::record::{
    owner_key, owner_value, run_key, runs_prefix, signal_key, signals_prefix, step_key,
    steps_prefix, types_key, types_prefix, Run, Status, StepRecord, TypeInfo,
};
use crate::cluster::kv::{Cmp, Compare, Op, Target};
use crate::cluster::store::{Store, StoreError};

/// Why a record was not written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// The store did not answer (nothing was written), or could not say (outcome unknown).
    Store(StoreError),
    /// The fence names another owner or epoch: this writer is no longer the owner.
    Fenced { id: String, fence: String },
    /// No run has this id.
    NotFound(String),
    /// The change does not apply to the run as it is (named in the message).
    Refused(String),
    /// The request is malformed (the message names the field).
    Invalid(String),
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Store(e) => write!(f, "{e}"),
            Self::Fenced { id, fence } => write!(
                f,
                "workflow {id}: owned by {fence} (member/epoch) now; a write from a previous owner is refused"
            ),
            Self::NotFound(id) => write!(f, "workflow {id:?} not found"),
            Self::Refused(m) | Self::Invalid(m) => f.write_str(m),
        }
    }
}

impl From<StoreError> for RecordError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// A run as read, with the revision it was last written at (what a rewrite compares with).
#[derive(Clone, Debug, PartialEq)]
pub struct ReadRun {
    pub run: Run,
    pub revision: i64,
}

/// How many times a rewrite is tried again after a concurrent change to the same run.
const REWRITE_ATTEMPTS: usize = 8;

/// The workflow records in the store.
#[derive(Clone)]
pub struct Records {
    store: Arc<dyn Store>,
}

fn put(key: Vec<u8>, value: Vec<u8>) -> Op {
    Op::Put {
        key,
        value,
        lease: 0,
    }
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("workflow records serialise")
}

/// Run `id` is unchanged since it was read at `revision`.
fn unchanged(id: &str, revision: i64) -> Compare {
    Compare {
        key: run_key(id),
        cmp: Cmp::Equal,
        target: Target::ModRevision(revision),
    }
}

fn fence_holds(id: &str, owner: u64, epoch: u64) -> Compare {
    Compare {
        key: owner_key(id),
        cmp: Cmp::Equal,
        target: Target::Value(owner_value(owner, epoch)),
    }
}

impl Records {
    /// Records kept in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// Changes to the keys under `prefix` from `from` on, on this member.
    pub async fn watch(
        &self,
        prefix: Vec<u8>,
        from: i64,
    ) -> Result<tokio::sync::mpsc::Receiver<crate::cluster::watch::WatchUpdate>, RecordError> {
        Ok(self.store.watch(prefix, from).await?)
    }

    /// Starts `run` unless a run with its id exists; answers the run that is there afterwards and
    /// whether this call created it (a second start answers the existing run).
    pub async fn start(&self, run: &Run) -> Result<(ReadRun, bool), RecordError> {
        let key = run_key(&run.id);
        let outcome = self
            .store
            .txn(
                vec![Compare {
                    key: key.clone(),
                    cmp: Cmp::Equal,
                    target: Target::CreateRevision(0),
                }],
                vec![
                    put(key.clone(), json(run)),
                    put(owner_key(&run.id), owner_value(run.owner, run.epoch)),
                ],
                vec![Op::Get { key }],
            )
            .await?;
        if outcome.succeeded {
            let read = ReadRun {
                run: run.clone(),
                revision: outcome.revision,
            };
            return Ok((read, true));
        }
        let kv = outcome.gets.into_iter().flatten().next();
        let kv = kv.ok_or_else(|| RecordError::NotFound(run.id.clone()))?;
        Ok((decode_run(&kv.value, kv.mod_revision)?, false))
    }

    /// The run `id`, read linearizably.
    pub async fn get(&self, id: &str) -> Result<ReadRun, RecordError> {
        Ok(self.get_at(id).await?.0)
    }

    /// The run `id`, read linearizably, and the store's revision at the read.
    pub async fn get_at(&self, id: &str) -> Result<(ReadRun, i64), RecordError> {
        let key = run_key(id);
        let listing = self.store.range(key.clone()).await?;
        let revision = listing.revision;
        let kv = listing.kvs.into_iter().find(|kv| kv.key == key);
        let kv = kv.ok_or_else(|| RecordError::NotFound(id.to_string()))?;
        Ok((decode_run(&kv.value, kv.mod_revision)?, revision))
    }

    /// Every run, in id order; `local` reads this member's copy (no leader needed, may lag).
    pub async fn runs(&self, local: bool) -> Result<(Vec<ReadRun>, i64), RecordError> {
        let listing = if local {
            self.store.range_local(runs_prefix()).await?
        } else {
            self.store.range(runs_prefix()).await?
        };
        let runs = listing
            .kvs
            .iter()
            .filter_map(|kv| decode_run(&kv.value, kv.mod_revision).ok())
            .collect();
        Ok((runs, listing.revision))
    }

    /// A run's recorded steps, in order.
    pub async fn steps(&self, id: &str) -> Result<Vec<StepRecord>, RecordError> {
        Ok(self.steps_at(id).await?.0)
    }

    /// A run's recorded steps, in order, and the revision they reflect.
    pub async fn steps_at(&self, id: &str) -> Result<(Vec<StepRecord>, i64), RecordError> {
        let listing = self.store.range(steps_prefix(id)).await?;
        let steps = listing
            .kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect();
        Ok((steps, listing.revision))
    }

    /// Records step `index` of run `id` if the fence still names `owner` at `epoch`.
    pub async fn record_step(
        &self,
        id: &str,
        owner: u64,
        epoch: u64,
        index: usize,
        step: &StepRecord,
    ) -> Result<(), RecordError> {
        let outcome = self
            .store
            .txn(
                vec![fence_holds(id, owner, epoch)],
                vec![put(step_key(id, index), json(step))],
                vec![Op::Get { key: owner_key(id) }],
            )
            .await?;
        if outcome.succeeded {
            return Ok(());
        }
        Err(fenced(id, outcome.gets))
    }

    /// Deletes run `read` and all that is recorded of it (fence, steps, signals), if the run is
    /// still as read; answers whether it was deleted.
    pub async fn forget(&self, read: &ReadRun) -> Result<bool, RecordError> {
        let id = &read.run.id;
        let delete = |key: Vec<u8>, prefix: bool| Op::Delete { key, prefix };
        let outcome = self
            .store
            .txn(
                vec![unchanged(id, read.revision)],
                vec![
                    delete(run_key(id), false),
                    delete(owner_key(id), false),
                    delete(steps_prefix(id), true),
                    delete(signals_prefix(id), true),
                ],
                Vec::new(),
            )
            .await?;
        Ok(outcome.succeeded)
    }

    /// Rewrites run `id` with `change`, from the version read, again if another writer got in
    /// between. With `fence`, only while the fence names that owner and epoch. `change` answers
    /// `Ok(false)` when there is nothing to write.
    pub async fn rewrite(
        &self,
        id: &str,
        fence: Option<(u64, u64)>,
        change: impl Fn(&mut Run) -> Result<bool, String>,
    ) -> Result<ReadRun, RecordError> {
        for _ in 0..REWRITE_ATTEMPTS {
            let mut read = self.get(id).await?;
            if !change(&mut read.run).map_err(RecordError::Refused)? {
                return Ok(read);
            }
            let key = run_key(id);
            let mut compares = vec![unchanged(id, read.revision)];
            if let Some((owner, epoch)) = fence {
                compares.push(fence_holds(id, owner, epoch));
            }
            let outcome = self
                .store
                .txn(
                    compares,
                    vec![put(key, json(&read.run))],
                    vec![Op::Get { key: owner_key(id) }],
                )
                .await?;
            if outcome.succeeded {
                read.revision = outcome.revision;
                return Ok(read);
            }
            if let Some((owner, epoch)) = fence {
                let now = outcome.gets.into_iter().flatten().next();
                if now.map(|kv| kv.value) != Some(owner_value(owner, epoch)) {
                    return Err(fenced(id, Vec::new()));
                }
            }
        }
        Err(RecordError::Store(StoreError::Unavailable(format!(
            "workflow {id}: changed by others {REWRITE_ATTEMPTS} times in a row; try again"
        ))))
    }

    /// Moves `read`'s run to `to` with the next epoch, if neither the run nor its fence changed
    /// since it was read (the compare-and-set of a takeover). Answers the run as moved.
    pub async fn change_owner(&self, read: &ReadRun, to: u64) -> Result<ReadRun, RecordError> {
        let id = &read.run.id;
        let mut run = read.run.clone();
        run.owner = to;
        run.epoch += 1;
        let outcome = self
            .store
            .txn(
                vec![
                    unchanged(id, read.revision),
                    fence_holds(id, read.run.owner, read.run.epoch),
                ],
                vec![
                    put(run_key(id), json(&run)),
                    put(owner_key(id), owner_value(to, run.epoch)),
                ],
                vec![Op::Get { key: owner_key(id) }],
            )
            .await?;
        if !outcome.succeeded {
            return Err(RecordError::Refused(format!(
                "workflow {id}: changed since it was read; owner change not made"
            )));
        }
        Ok(ReadRun {
            run,
            revision: outcome.revision,
        })
    }

    /// Sends signal `name` with `value` to run `id`, which must be running.
    pub async fn signal(&self, id: &str, name: &str, value: &Value) -> Result<(), RecordError> {
        let read = self.get(id).await?;
        if read.run.status != Status::Running {
            return Err(RecordError::Refused(format!(
                "workflow {id} is {}; only a running workflow takes signals",
                read.run.status.as_str()
            )));
        }
        let outcome = self
            .store
            .txn(
                vec![unchanged(id, read.revision)],
                vec![put(signal_key(id, name), json(value))],
                Vec::new(),
            )
            .await?;
        if outcome.succeeded {
            return Ok(());
        }
        Err(RecordError::Refused(format!(
            "workflow {id}: changed while the signal was sent; read it and try again"
        )))
    }

    /// The value of signal `name` of run `id`, if it was sent.
    pub async fn signal_value(&self, id: &str, name: &str) -> Result<Option<Value>, RecordError> {
        let key = signal_key(id, name);
        let listing = self.store.range(signals_prefix(id)).await?;
        Ok(listing
            .kvs
            .into_iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| serde_json::from_slice(&kv.value).ok()))
    }

    /// Publishes the types member `node` runs.
    pub async fn publish_types(&self, node: u64, types: &[TypeInfo]) -> Result<(), RecordError> {
        self.store
            .txn(
                Vec::new(),
                vec![put(types_key(node), json(&types))],
                Vec::new(),
            )
            .await?;
        Ok(())
    }

    /// The types each member runs, as this member has them (may lag).
    pub async fn types(&self) -> Result<Vec<(u64, Vec<TypeInfo>)>, RecordError> {
        let prefix = types_prefix();
        let listing = self.store.range_local(prefix.clone()).await?;
        Ok(listing
            .kvs
            .iter()
            .filter_map(|kv| {
                let node = std::str::from_utf8(kv.key.strip_prefix(&prefix[..])?)
                    .ok()?
                    .parse()
                    .ok()?;
                Some((node, serde_json::from_slice(&kv.value).ok()?))
            })
            .collect())
    }
}

fn decode_run(value: &[u8], revision: i64) -> Result<ReadRun, RecordError> {
    let run = serde_json::from_slice(value)
        .map_err(|e| RecordError::Refused(format!("a workflow record does not decode: {e}")))?;
    Ok(ReadRun { run, revision })
}

fn fenced(id: &str, gets: Vec<Option<crate::cluster::kv::KeyValue>>) -> RecordError {
    let fence = gets
        .into_iter()
        .flatten()
        .next()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
        .unwrap_or_else(|| "nobody".into());
    RecordError::Fenced {
        id: id.to_string(),
        fence,
    }
}
