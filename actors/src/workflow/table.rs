//! `/node/workflow-table`: this member's view of every workflow run, kept by a watch on the
//! records. From it the member starts an actor under `/node/workflows/<id>` for each running
//! run it owns (and stops those it no longer owns), places new runs, and, while it is the raft
//! leader, moves the runs of members that membership declares failed to live ones. It also knows
//! this member's external workers: the types it publishes are its code's and theirs, and a run
//! no code here runs is activated on the least busy worker of its type.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::{
    Actor, ActorFutureExt, AsyncContext, Context, Handler, Message, ResponseActFuture,
    StreamHandler, WrapFuture,
};
use serde_json::Value;
use slog::{debug, info, warn, Logger};
use tokio_stream::wrappers::ReceiverStream;

use super::ctx::Types;
use super::metrics::WorkflowMetrics;
use super::record::{
    all_signals_prefix, check_name, check_value, id_of, runs_prefix, Run, Status, TypeInfo, ROOT,
};
use super::records::{ReadRun, RecordError, Records};
use super::run::{Drain, RetrySettings, RunChanged, SignalArrived, WorkflowRun};
use super::worker::{ToWorker, WorkflowWorker};
use crate::clock::precise_ms;
use crate::cluster::members::{GetTopologyView, Membership};
use crate::cluster::store::Store;
use crate::cluster::topology::Directory;
use crate::cluster::watch::WatchUpdate;
use crate::envelope::ActorRef;
use crate::supervision::{AddChild, ChildSpec, Managed, Restart, StopChild, Supervisor};

/// How the workflow table runs.
#[derive(Clone, Debug)]
pub struct TableSettings {
    /// This member.
    pub node: u64,
    /// Silence after which membership declares a member failed (`cluster.heartbeat_timeout_ms`).
    /// Every member times the others' beats all along, so a new leader judges at once.
    pub failure_timeout: Duration,
    /// How often the leader looks for runs of failed members.
    pub check_every: Duration,
    /// How a run is retried.
    pub retry: RetrySettings,
    /// How long an ended run is kept (`workflow.retention_ms`); `None`: for ever.
    pub retention: Option<Duration>,
}

/// Most ended runs one sweep deletes, so that a backlog is cleared over several sweeps rather
/// than in one burst of raft writes.
const SWEEP_BATCH: usize = 1000;

/// Starts a workflow run: placed on a live member that runs its type, least loaded first.
#[derive(Message)]
#[rtype(result = "Result<Started, RecordError>")]
pub struct StartWorkflow {
    /// Chosen by the caller for an idempotent start; `None`: a fresh id.
    pub id: Option<String>,
    pub type_name: String,
    /// `None`: the highest version a live member runs.
    pub version: Option<u32>,
    pub input: Value,
}

/// What a start answered.
#[derive(Clone, Debug)]
pub struct Started {
    pub run: Run,
    /// False when a run with this id existed already (and is what `run` shows).
    pub created: bool,
}

/// The member is shutting down: let the steps under way end (up to `wait`), then move every run
/// it owns to another live member that runs the type, so that none waits out the failure
/// timeout. Answers how many runs were moved.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct HandOff {
    pub wait: Duration,
}

/// Starts the actor of a worker that connected: `/node/workers/<id>`, serving `types`; what it
/// is sent goes to `out`. Refused when a worker of that id is connected to this member already.
#[derive(Message)]
#[rtype(result = "Result<ActorRef<WorkflowWorker>, RecordError>")]
pub struct ConnectWorker {
    pub id: String,
    pub types: Vec<TypeInfo>,
    pub out: tokio::sync::mpsc::Sender<ToWorker>,
}

/// Worker `id`, serving `types`, connected to this member.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WorkerJoined {
    pub id: String,
    pub types: Vec<TypeInfo>,
    pub worker: ActorRef<WorkflowWorker>,
}

/// Worker `id` is gone.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WorkerLeft {
    pub id: String,
}

/// The worker that runs `run_id` (of type `info`): the one of this member's workers serving the
/// type that holds the fewest runs; `None` when none does.
#[derive(Message)]
#[rtype(result = "Option<(String, ActorRef<WorkflowWorker>)>")]
pub struct PickWorker {
    pub run_id: String,
    pub info: TypeInfo,
}

/// Run `id` cannot run here (no code or worker serves its type any more): move it to another
/// live member that serves the type, if there is one.
#[derive(Message)]
#[rtype(result = "()")]
pub struct MoveRun {
    pub id: String,
}

crate::handles!(
    WorkflowTable: StartWorkflow,
    HandOff,
    ConnectWorker,
    WorkerJoined,
    WorkerLeft,
    PickWorker,
    MoveRun
);

/// A worker connected to this member.
struct Worker {
    types: Vec<TypeInfo>,
    actor: ActorRef<WorkflowWorker>,
}

/// This member's view of the workflow runs, and the actors of those it owns.
pub struct WorkflowTable {
    settings: TableSettings,
    records: Records,
    store: Arc<dyn Store>,
    types: Arc<Types>,
    me: ActorRef<WorkflowTable>,
    runs_supervisor: ActorRef<Supervisor>,
    workers_supervisor: ActorRef<Supervisor>,
    membership: ActorRef<Membership>,
    directory: Directory,
    metrics: WorkflowMetrics,
    runs: BTreeMap<String, ReadRun>,
    actors: HashMap<String, (u64, ActorRef<WorkflowRun>)>,
    revision: i64,
    loaded: bool,
    /// What `types/<node>` holds (`None`: not written yet), and whether a write is under way.
    published: Option<Vec<TypeInfo>>,
    publishing: bool,
    moving: HashSet<String>,
    sweeping: bool,
    workers: BTreeMap<String, Worker>,
    /// The worker each run activated on a worker went to (while the run is this member's).
    picked: HashMap<String, String>,
    log: Logger,
}

impl WorkflowTable {
    /// The table of member `settings.node`, started as `me`; run actors go under
    /// `runs_supervisor` (`/node/workflows`), workers' under `workers_supervisor`
    /// (`/node/workers`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: TableSettings,
        store: Arc<dyn Store>,
        types: Arc<Types>,
        me: ActorRef<WorkflowTable>,
        runs_supervisor: ActorRef<Supervisor>,
        workers_supervisor: ActorRef<Supervisor>,
        membership: ActorRef<Membership>,
        directory: Directory,
        metrics: WorkflowMetrics,
        log: &Logger,
    ) -> Self {
        Self {
            settings,
            records: Records::new(store.clone()),
            store,
            types,
            me,
            runs_supervisor,
            workers_supervisor,
            membership,
            directory,
            metrics,
            runs: BTreeMap::new(),
            actors: HashMap::new(),
            revision: 0,
            loaded: false,
            published: None,
            publishing: false,
            moving: HashSet::new(),
            sweeping: false,
            workers: BTreeMap::new(),
            picked: HashMap::new(),
            log: log.new(slog::o!("actor" => "workflow-table")),
        }
    }

    /// Loads this member's copy of the runs (no leader needed), then follows its changes.
    fn load(&mut self, ctx: &mut Context<Self>) {
        let records = self.records.clone();
        let read = async move { records.runs(true).await };
        ctx.spawn(read.into_actor(self).map(|res, act, ctx| match res {
            Ok((runs, revision)) => {
                act.runs = runs
                    .into_iter()
                    .filter(|r| r.run.status == Status::Running)
                    .map(|r| (r.run.id.clone(), r))
                    .collect();
                act.revision = revision;
                act.loaded = true;
                act.reconcile(ctx);
                act.watch(ctx);
            }
            Err(e) => {
                debug!(act.log, "cannot load the workflow runs yet"; "error" => %e);
                ctx.run_later(Duration::from_millis(200), |act, ctx| act.load(ctx));
            }
        }));
    }

    fn watch(&mut self, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let from = self.revision + 1;
        let start = async move { store.watch(ROOT.as_bytes().to_vec(), from).await };
        ctx.spawn(start.into_actor(self).map(|res, act, ctx| match res {
            Ok(rx) => {
                ctx.add_stream(ReceiverStream::new(rx));
            }
            Err(e) => {
                debug!(act.log, "cannot watch the workflow runs; loading again"; "error" => %e);
                ctx.run_later(Duration::from_millis(200), |act, ctx| act.load(ctx));
            }
        }));
    }

    /// The types this member runs: its code's and its workers'.
    fn served(&self) -> Vec<TypeInfo> {
        let mut served: BTreeSet<TypeInfo> = self.types.list().into_iter().collect();
        for w in self.workers.values() {
            served.extend(w.types.iter().cloned());
        }
        served.into_iter().collect()
    }

    /// Tells the other members which types this one runs, whenever that changes; one write at a
    /// time, so that the last one written is the latest.
    fn publish_types(&mut self, ctx: &mut Context<Self>) {
        let types = self.served();
        if self.publishing || self.published.as_ref() == Some(&types) {
            return;
        }
        self.publishing = true;
        let (records, node) = (self.records.clone(), self.settings.node);
        let written = types.clone();
        let write = async move { records.publish_types(node, &types).await };
        ctx.spawn(write.into_actor(self).map(move |res, act, ctx| {
            act.publishing = false;
            match res {
                Ok(()) => {
                    act.published = Some(written);
                    // Changed while it was written: write the latest.
                    act.publish_types(ctx);
                }
                Err(e) => {
                    debug!(act.log, "cannot publish the workflow types yet"; "error" => %e);
                    ctx.run_later(Duration::from_millis(500), |act, ctx| {
                        act.publish_types(ctx)
                    });
                }
            }
        }));
    }

    /// Starts an actor for every running run this member owns, stops those of runs it does not
    /// own (any more), and passes a cancel on.
    fn reconcile(&mut self, ctx: &mut Context<Self>) {
        let me = self.settings.node;
        let gone: Vec<String> = self
            .actors
            .iter()
            .filter(|(id, (epoch, _))| {
                self.runs.get(*id).is_none_or(|r| {
                    r.run.owner != me || r.run.epoch != *epoch || r.run.status != Status::Running
                })
            })
            .map(|(id, _)| id.clone())
            .collect();
        self.picked.retain(|id, _| {
            self.runs
                .get(id)
                .is_some_and(|r| r.run.owner == me && r.run.status == Status::Running)
        });
        for id in gone {
            self.actors.remove(&id);
            let sup = self.runs_supervisor.clone();
            // An actor that ended its run stopped already; this stops one that lost its run.
            ctx.spawn(
                async move {
                    let _ = sup.send(StopChild { name: id }).await;
                }
                .into_actor(self),
            );
        }
        let mine: Vec<ReadRun> = self
            .runs
            .values()
            .filter(|r| r.run.owner == me && r.run.status == Status::Running)
            .cloned()
            .collect();
        for read in mine {
            match self.actors.get(&read.run.id) {
                Some((_, actor)) if read.run.cancel_requested => {
                    let _ = actor.try_send(RunChanged(read.run.clone()));
                }
                Some(_) => {}
                None => self.start_actor(read.run, ctx),
            }
        }
    }

    fn start_actor(&mut self, run: Run, ctx: &mut Context<Self>) {
        let id = run.id.clone();
        let actor: ActorRef<WorkflowRun> = ActorRef::default();
        self.actors.insert(id.clone(), (run.epoch, actor.clone()));
        let spec = {
            let (node, records, types, table) = (
                self.settings.node,
                self.records.clone(),
                self.types.clone(),
                self.me.clone(),
            );
            let (retry, metrics, log) = (
                self.settings.retry.clone(),
                self.metrics.clone(),
                self.log.clone(),
            );
            ChildSpec::actor_for(id.clone(), &actor, move || {
                WorkflowRun::new(
                    run.clone(),
                    node,
                    records.clone(),
                    types.clone(),
                    table.clone(),
                    retry.clone(),
                    metrics.clone(),
                    &log,
                )
            })
            // A panic restarts it from the record; a run it ended is removed.
            .restart(Restart::Transient)
        };
        let sup = self.runs_supervisor.clone();
        let add = async move { sup.send(AddChild(spec)).await };
        ctx.spawn(add.into_actor(self).map(move |res, act, _| {
            if !matches!(res, Ok(Ok(_))) {
                // A stop of the same name still under way: the next check starts it again.
                debug!(act.log, "workflow actor not started yet"; "workflow" => &id);
                act.actors.remove(&id);
            }
        }));
    }

    /// On the raft leader: moves the running runs of failed members to live ones.
    fn take_over(&mut self, ctx: &mut Context<Self>) {
        let me = self.settings.node;
        if self.directory.current().leader != Some(me) {
            return;
        }
        let orphans: Vec<ReadRun> = self
            .runs
            .values()
            .filter(|r| {
                r.run.status == Status::Running
                    && r.run.owner != me
                    && !self.moving.contains(&r.run.id)
            })
            .cloned()
            .collect();
        if orphans.is_empty() {
            return;
        }
        let (membership, records) = (self.membership.clone(), self.records.clone());
        let (loads, timeout) = (self.loads(), self.settings.failure_timeout);
        let check = async move {
            let live = live_members(&membership, me, timeout).await;
            let types = records.types().await.unwrap_or_default();
            let mut moves = Vec::new();
            for read in orphans {
                if live.contains(&read.run.owner) {
                    continue;
                }
                let info = TypeInfo {
                    name: read.run.type_name.clone(),
                    version: read.run.version,
                };
                if let Some(to) = place(&info, &live, &types, &loads) {
                    moves.push((read, to));
                }
            }
            moves
        };
        ctx.spawn(check.into_actor(self).map(|moves, act, ctx| {
            for (read, to) in moves {
                act.move_run(read, to, ctx);
            }
        }));
    }

    fn move_run(&mut self, read: ReadRun, to: u64, ctx: &mut Context<Self>) {
        let id = read.run.id.clone();
        self.moving.insert(id.clone());
        let records = self.records.clone();
        let from = read.run.owner;
        let change = async move { records.change_owner(&read, to).await };
        ctx.spawn(change.into_actor(self).map(move |res, act, _| {
            act.moving.remove(&id);
            match res {
                Ok(moved) => {
                    info!(act.log, "workflow moved";
                        "workflow" => &id, "from" => from, "to" => to, "epoch" => moved.run.epoch);
                    act.metrics.takeovers.inc();
                }
                // Changed since read (the watch brings the news): looked at again next time.
                Err(e) => debug!(act.log, "workflow not moved"; "workflow" => &id, "error" => %e),
            }
        }));
    }

    /// On the raft leader: deletes the runs that ended more than the retention ago.
    fn sweep(&mut self, ctx: &mut Context<Self>) {
        let Some(keep) = self.settings.retention else {
            return;
        };
        if self.sweeping || self.directory.current().leader != Some(self.settings.node) {
            return;
        }
        self.sweeping = true;
        let records = self.records.clone();
        let sweep = async move {
            // This member's copy, with no read through the leader's quorum: a run that changed
            // since is left alone by the delete's compare, so a stale read costs nothing.
            let (runs, _) = records.runs(true).await?;
            let cutoff = precise_ms().saturating_sub(keep.as_millis() as u64);
            let expired = runs.into_iter().filter(|r| {
                r.run.status != Status::Running && r.run.ended_ms.is_some_and(|at| at < cutoff)
            });
            let mut forgotten = 0;
            for read in expired.take(SWEEP_BATCH) {
                if records.forget(&read).await? {
                    forgotten += 1;
                }
            }
            Ok::<u64, RecordError>(forgotten)
        };
        ctx.spawn(sweep.into_actor(self).map(|res, act, _| {
            act.sweeping = false;
            match res {
                Ok(0) => {}
                Ok(n) => {
                    info!(act.log, "ended workflow runs deleted past their retention"; "runs" => n);
                    act.metrics.forgotten.inc_by(n);
                }
                Err(e) => debug!(act.log, "retention sweep stopped; next time"; "error" => %e),
            }
        }));
    }

    /// Drops the workers whose actor has stopped (its `WorkerLeft` may not have reached here).
    fn forget_gone_workers(&mut self, ctx: &mut Context<Self>) {
        let gone: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| w.actor.addr().is_none_or(|a| !a.connected()))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.forget_worker(&id, ctx);
        }
    }

    fn forget_worker(&mut self, id: &str, ctx: &mut Context<Self>) {
        if self.workers.remove(id).is_some() {
            self.picked.retain(|_, worker| worker != id);
            self.publish_types(ctx);
        }
    }

    /// Running runs per owner.
    fn loads(&self) -> HashMap<u64, usize> {
        let mut loads = HashMap::new();
        for r in self
            .runs
            .values()
            .filter(|r| r.run.status == Status::Running)
        {
            *loads.entry(r.run.owner).or_default() += 1;
        }
        loads
    }

    fn apply(&mut self, update: &crate::cluster::kv::Event) {
        let key = &update.kv.key;
        let runs = runs_prefix();
        if let Some(id) = id_of(key, &runs) {
            match serde_json::from_slice::<Run>(&update.kv.value) {
                // Only running runs are kept: ended ones are read from the store when asked for,
                // so the table's memory follows the work under way, not the history.
                Ok(run) if !update.deleted && run.status == Status::Running => {
                    let read = ReadRun {
                        run,
                        revision: update.kv.mod_revision,
                    };
                    self.runs.insert(id, read);
                }
                _ => {
                    self.runs.remove(&id);
                }
            }
        } else if let Some(id) = id_of(key, &all_signals_prefix()) {
            if let Some((_, actor)) = self.actors.get(&id) {
                let _ = actor.try_send(SignalArrived);
            }
        }
    }
}

/// The members not judged failed by this one's membership (itself always; see
/// [`Liveness::failed`](crate::cluster::members::Liveness::failed)).
async fn live_members(
    membership: &ActorRef<Membership>,
    me: u64,
    failure_timeout: Duration,
) -> HashSet<u64> {
    let mut live: HashSet<u64> = HashSet::from([me]);
    if let Ok(view) = membership.send(GetTopologyView).await {
        live.extend(
            view.members
                .iter()
                .filter(|m| !m.liveness.failed(failure_timeout))
                .map(|m| m.id),
        );
    }
    live
}

/// The live member that runs `info` with the fewest running runs (ties broken at random, so
/// that starts spread).
fn place(
    info: &TypeInfo,
    live: &HashSet<u64>,
    types: &[(u64, Vec<TypeInfo>)],
    loads: &HashMap<u64, usize>,
) -> Option<u64> {
    types
        .iter()
        .filter(|(node, served)| live.contains(node) && served.contains(info))
        .map(|(node, _)| {
            (
                loads.get(node).copied().unwrap_or(0),
                fastrand::u32(..),
                *node,
            )
        })
        .min()
        .map(|(_, _, node)| node)
}

/// The version a start without one gets: the highest that a live member runs.
fn newest(name: &str, live: &HashSet<u64>, types: &[(u64, Vec<TypeInfo>)]) -> Option<u32> {
    types
        .iter()
        .filter(|(node, _)| live.contains(node))
        .flat_map(|(_, served)| served.iter())
        .filter(|t| t.name == name)
        .map(|t| t.version)
        .max()
}

/// A fresh workflow id: time then randomness, so that ids sort by start.
fn fresh_id() -> String {
    format!("wf-{:x}-{:08x}", precise_ms(), fastrand::u32(..))
}

impl Actor for WorkflowTable {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.publish_types(ctx);
        self.load(ctx);
        ctx.run_interval(self.settings.check_every, |act, ctx| {
            act.forget_gone_workers(ctx);
            if act.loaded {
                act.reconcile(ctx);
                act.take_over(ctx);
            }
        });
        if let Some(keep) = self.settings.retention {
            // Often enough that a run outlives its retention by at most about a quarter of it
            // (or ten minutes), seldom enough that the scan of every run, which the raft actor
            // answers, costs the cluster little.
            let every = (keep / 4).clamp(Duration::from_millis(250), Duration::from_secs(600));
            ctx.run_interval(every, |act, ctx| act.sweep(ctx));
        }
    }
}

impl Managed for WorkflowTable {
    const KIND: &'static str = "workflow-table";

    fn dump_state(&self) -> Value {
        serde_json::json!({
            "revision": self.revision,
            "loaded": self.loaded,
            "types_published": self.published,
            "running": self.runs.len(),
            "running_by_owner": self.loads(),
            "running_here": self.actors.len(),
            "types": self.types.list(),
            "workers": self.workers.iter().map(|(id, w)| (id.clone(), w.types.clone())).collect::<BTreeMap<_, _>>(),
            "leads": self.directory.current().leader == Some(self.settings.node),
        })
    }
}

impl StreamHandler<WatchUpdate> for WorkflowTable {
    fn handle(&mut self, update: WatchUpdate, ctx: &mut Context<Self>) {
        match update {
            WatchUpdate::Events { revision, events } => {
                self.revision = revision;
                for e in &events {
                    self.apply(e);
                }
                self.reconcile(ctx);
            }
            // The stream ends after it: `finished` loads again.
            WatchUpdate::Cancelled { reason, .. } => {
                warn!(self.log, "workflow watch ended; loading again"; "reason" => reason);
            }
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        // Loaded and watched again rather than stopped (actix's default).
        self.load(ctx);
    }
}

impl Handler<StartWorkflow> for WorkflowTable {
    type Result = ResponseActFuture<Self, Result<Started, RecordError>>;

    fn handle(&mut self, msg: StartWorkflow, _: &mut Context<Self>) -> Self::Result {
        let me = self.settings.node;
        let (membership, records, metrics) = (
            self.membership.clone(),
            self.records.clone(),
            self.metrics.clone(),
        );
        let (loads, timeout) = (self.loads(), self.settings.failure_timeout);
        let start = async move {
            let id = msg.id.unwrap_or_else(fresh_id);
            check_name("id", &id).map_err(RecordError::Invalid)?;
            check_name("type", &msg.type_name).map_err(RecordError::Invalid)?;
            check_value("input", &msg.input).map_err(RecordError::Invalid)?;
            // A second start of an id answers the run that exists, wherever it runs.
            if let Ok(existing) = records.get(&id).await {
                return Ok(Started {
                    run: existing.run,
                    created: false,
                });
            }
            let live = live_members(&membership, me, timeout).await;
            let types = records.types().await?;
            let version = match msg.version {
                Some(v) => v,
                None => newest(&msg.type_name, &live, &types).ok_or_else(|| {
                    RecordError::Refused(format!(
                        "type: no live member runs a workflow type named {:?}",
                        msg.type_name
                    ))
                })?,
            };
            let info = TypeInfo {
                name: msg.type_name.clone(),
                version,
            };
            let owner = place(&info, &live, &types, &loads).ok_or_else(|| {
                RecordError::Refused(format!(
                    "type: no live member runs {:?} version {version}",
                    msg.type_name
                ))
            })?;
            let run = Run::new(id, msg.type_name, version, msg.input, owner);
            let (read, created) = records.start(&run).await?;
            if created {
                metrics.started(&read.run.type_name);
            }
            Ok(Started {
                run: read.run,
                created,
            })
        };
        Box::pin(start.into_actor(self).map(|res, act, ctx| {
            if let Ok(s) = &res {
                // Known before the watch brings it, so that its actor starts at once.
                if s.created && !act.runs.contains_key(&s.run.id) {
                    let read = ReadRun {
                        run: s.run.clone(),
                        revision: 0,
                    };
                    act.runs.insert(s.run.id.clone(), read);
                    act.reconcile(ctx);
                }
            }
            res
        }))
    }
}

impl Handler<HandOff> for WorkflowTable {
    type Result = ResponseActFuture<Self, usize>;

    fn handle(&mut self, msg: HandOff, _: &mut Context<Self>) -> Self::Result {
        let me = self.settings.node;
        let actors: Vec<ActorRef<WorkflowRun>> =
            self.actors.values().map(|(_, a)| a.clone()).collect();
        let ids: Vec<String> = self
            .runs
            .values()
            .filter(|r| r.run.owner == me && r.run.status == Status::Running)
            .map(|r| r.run.id.clone())
            .collect();
        let mut loads = self.loads();
        loads.remove(&me);
        let timeout = self.settings.failure_timeout;
        let (membership, records, metrics, log) = (
            self.membership.clone(),
            self.records.clone(),
            self.metrics.clone(),
            self.log.clone(),
        );
        let hand_off = async move {
            let drained = async {
                for actor in actors {
                    if let Ok(stopped) = actor.send(Drain).await {
                        let _ = stopped.0.await;
                    }
                }
            };
            // A step that outlasts the wait is cut when the tree stops; the new owner runs it
            // again if it is idempotent, else the run needs attention.
            let _ = tokio::time::timeout(msg.wait, drained).await;
            let mut live = live_members(&membership, me, timeout).await;
            live.remove(&me);
            let types = records.types().await.unwrap_or_default();
            let mut moved = 0;
            for id in ids {
                let Ok(read) = records.get(&id).await else {
                    continue;
                };
                if read.run.owner != me || read.run.status != Status::Running {
                    continue;
                }
                let info = TypeInfo {
                    name: read.run.type_name.clone(),
                    version: read.run.version,
                };
                let Some(to) = place(&info, &live, &types, &loads) else {
                    warn!(log, "no live member runs this workflow's type; it waits for this member or a takeover"; "workflow" => &id);
                    continue;
                };
                match records.change_owner(&read, to).await {
                    Ok(_) => {
                        info!(log, "workflow handed off"; "workflow" => &id, "to" => to);
                        *loads.entry(to).or_default() += 1;
                        metrics.takeovers.inc();
                        moved += 1;
                    }
                    Err(e) => {
                        warn!(log, "workflow not handed off"; "workflow" => &id, "error" => %e)
                    }
                }
            }
            moved
        };
        Box::pin(hand_off.into_actor(self))
    }
}

impl Handler<WorkerJoined> for WorkflowTable {
    type Result = ();

    fn handle(&mut self, msg: WorkerJoined, ctx: &mut Context<Self>) {
        let worker = Worker {
            types: msg.types,
            actor: msg.worker,
        };
        self.workers.insert(msg.id, worker);
        self.publish_types(ctx);
    }
}

impl Handler<WorkerLeft> for WorkflowTable {
    type Result = ();

    fn handle(&mut self, msg: WorkerLeft, ctx: &mut Context<Self>) {
        self.forget_worker(&msg.id, ctx);
    }
}

impl Handler<PickWorker> for WorkflowTable {
    type Result = Option<(String, ActorRef<WorkflowWorker>)>;

    fn handle(&mut self, msg: PickWorker, _: &mut Context<Self>) -> Self::Result {
        let mut held: HashMap<&str, usize> = HashMap::new();
        for (run, worker) in &self.picked {
            if *run != msg.run_id {
                *held.entry(worker.as_str()).or_default() += 1;
            }
        }
        let (id, worker) = self
            .workers
            .iter()
            .filter(|(_, w)| w.types.contains(&msg.info))
            .min_by_key(|(id, _)| {
                (
                    held.get(id.as_str()).copied().unwrap_or(0),
                    fastrand::u32(..),
                )
            })?;
        let picked = (id.clone(), worker.actor.clone());
        self.picked.insert(msg.run_id, id.clone());
        Some(picked)
    }
}

impl Handler<MoveRun> for WorkflowTable {
    type Result = ();

    fn handle(&mut self, msg: MoveRun, ctx: &mut Context<Self>) {
        let me = self.settings.node;
        let Some(read) = self.runs.get(&msg.id).cloned() else {
            return;
        };
        if read.run.owner != me || self.moving.contains(&msg.id) {
            return;
        }
        let (membership, records) = (self.membership.clone(), self.records.clone());
        let (mut loads, timeout) = (self.loads(), self.settings.failure_timeout);
        loads.remove(&me);
        let find = async move {
            let mut live = live_members(&membership, me, timeout).await;
            live.remove(&me);
            let types = records.types().await.unwrap_or_default();
            let info = TypeInfo {
                name: read.run.type_name.clone(),
                version: read.run.version,
            };
            place(&info, &live, &types, &loads).map(|to| (read, to))
        };
        ctx.spawn(find.into_actor(self).map(|found, act, ctx| {
            if let Some((read, to)) = found {
                act.move_run(read, to, ctx);
            }
        }));
    }
}

impl Handler<ConnectWorker> for WorkflowTable {
    type Result = ResponseActFuture<Self, Result<ActorRef<WorkflowWorker>, RecordError>>;

    fn handle(&mut self, msg: ConnectWorker, _: &mut Context<Self>) -> Self::Result {
        let actor: ActorRef<WorkflowWorker> = ActorRef::default();
        let spec_types = msg.types.clone();
        let spec = {
            let (me, table, log) = (actor.clone(), self.me.clone(), self.log.clone());
            let (id, types, out) = (msg.id.clone(), msg.types, msg.out);
            ChildSpec::actor_for(msg.id.clone(), &actor, move || {
                WorkflowWorker::new(
                    id.clone(),
                    types.clone(),
                    me.clone(),
                    table.clone(),
                    out.clone(),
                    &log,
                )
            })
            // Its stream cannot be opened again from here: the worker connects again.
            .restart(Restart::Temporary)
        };
        // The member's own code always runs its types: a worker declaring one would never get
        // a run of it (and must not, for the runbook type, whose start needs admin).
        let own = spec_types
            .iter()
            .find(|t| self.types.get(&t.name, t.version).is_some())
            .cloned();
        let (sup, id) = (self.workers_supervisor.clone(), msg.id);
        let connected = self.workers.contains_key(&id);
        let add = async move {
            if let Some(t) = own {
                return Err(RecordError::Invalid(format!(
                    "types: {} version {} is run by the node's own code, not by workers",
                    t.name, t.version
                )));
            }
            if connected {
                return Err(RecordError::Refused(format!(
                    "worker_id: a worker named {id:?} is connected to this member already"
                )));
            }
            match sup.send(AddChild(spec)).await {
                Ok(Ok(_)) => Ok(actor),
                Ok(Err(e)) => Err(RecordError::Refused(format!("worker_id {id:?}: {e}"))),
                Err(e) => Err(RecordError::Store(
                    crate::cluster::store::StoreError::Unavailable(format!(
                        "the workers' supervisor did not answer: {e:?}"
                    )),
                )),
            }
        };
        Box::pin(add.into_actor(self))
    }
}
