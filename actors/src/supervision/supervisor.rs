//! The supervisor actor.
//!
//! Children start one at a time in order: the next starts once the previous acknowledges that its
//! `started()` ran (or fails, or times out). Failures and requests that take children down run as a
//! *stop job*: children stop one at a time in reverse start order, each within its shutdown
//! timeout, and when the last is down the job's follow-up runs (restart some children, answer an
//! operator, stop the supervisor itself, or escalate). One job runs at a time; failures arriving
//! meanwhile wait for it.
//!
//! Children are kept in a map keyed by a growing id, so start order is key order and lookups,
//! inserts and removals stay logarithmic with a hundred thousand per-entity children.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{
    Actor, ActorContext, AsyncContext, Context, Handler, Message, ResponseFuture, Running,
    SpawnHandle,
};
use slog::{debug, error, info, warn};
use tokio::sync::oneshot;

use super::control::{Exit, ExitNotify};
use super::policy::{Backoff, Restart, RestartHistory, RestartLimit, Strategy};
use super::spec::{ChildSpec, ChildrenFactory, Managed, Placement, StartArgs, SupervisorSpec};
use crate::introspect::{ActorCell, EventKind, Lifecycle};
use crate::runtime::RuntimeShared;

/// Sent by a child's control item when an incarnation ends.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct ChildExited {
    pub child: u64,
    pub incarnation: u64,
    pub exit: Exit,
}

/// Sent by a child's control item once its `started()` has run.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct ChildStarted {
    pub child: u64,
    pub incarnation: u64,
}

/// Adds and starts a child at run time (per-entity actors such as sessions). Answers its path once
/// it runs, or why its start failed.
#[derive(Message)]
#[rtype(result = "Result<String, String>")]
pub struct AddChild(pub ChildSpec);

/// Why an operator's request about a child was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildError {
    /// No child of that name.
    NotFound(String),
    /// Another change to the children is under way; try again.
    Busy(String),
    /// The supervisor is stopping.
    Stopping(String),
    /// The child did not come back up.
    Failed(String),
}

impl std::fmt::Display for ChildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotFound(m) | Self::Busy(m) | Self::Stopping(m) | Self::Failed(m) => {
                f.write_str(m)
            }
        }
    }
}

/// Stops and starts one child again, whatever the strategy. Answers its new restart count.
#[derive(Message)]
#[rtype(result = "Result<u32, ChildError>")]
pub struct RestartChild {
    /// The child's name (its path below the supervisor).
    pub name: String,
}

/// Stops one child for good; a child added at run time is removed.
#[derive(Message)]
#[rtype(result = "Result<(), ChildError>")]
pub struct StopChild {
    /// The child's name (its path below the supervisor).
    pub name: String,
}

crate::handles!(Supervisor: AddChild, RestartChild, StopChild);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Running,
    /// Asked to stop; its exit is expected.
    Stopping,
    /// Waiting for its (re)start: in the start queue or out its backoff.
    Waiting,
    /// Exited during a stop job; its failure is handled when the job ends.
    Down,
    /// Not running and not to be restarted.
    Stopped,
    /// Did not stop within its timeout; forgotten.
    Abandoned,
}

struct Child {
    spec: ChildSpec,
    cell: Arc<ActorCell>,
    incarnation: u64,
    status: Status,
    /// Added at run time: removed instead of kept when it stops for good.
    dynamic: bool,
    /// Stopped by an operator: strategies leave it down.
    held: bool,
    consecutive_failures: u32,
    last_start: Instant,
}

enum Then {
    Restart {
        ids: Vec<u64>,
        delay: Duration,
    },
    ManualRestart {
        id: u64,
        reply: oneshot::Sender<Result<u32, ChildError>>,
    },
    ManualStop {
        id: u64,
        reply: oneshot::Sender<Result<(), ChildError>>,
    },
    Shutdown,
    Escalate(String),
}

struct StopJob {
    /// Children still to stop; popped from the end, so the latest started goes first.
    queue: Vec<u64>,
    current: Option<(u64, SpawnHandle)>,
    then: Then,
}

/// Children to start one after the other.
#[derive(Default)]
struct StartQueue {
    pending: VecDeque<(u64, bool)>,
    /// (child, incarnation, is_restart, timeout timer) of the start in progress.
    current: Option<(u64, u64, bool, SpawnHandle)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    ShuttingDown,
    Done,
}

/// A supervising actor; see the module docs.
pub struct Supervisor {
    rt: Arc<RuntimeShared>,
    cell: Arc<ActorCell>,
    /// This supervisor's own incarnation (its cell outlives it).
    incarnation: u64,
    strategy: Strategy,
    limit: RestartLimit,
    backoff: Backoff,
    factory: ChildrenFactory,
    /// Boxed: sequential inserts leave B-tree leaves half full, and a child record is large.
    children: BTreeMap<u64, Box<Child>>,
    next_id: u64,
    history: RestartHistory,
    job: Option<StopJob>,
    starts: StartQueue,
    /// Children whose failure arrived during a job.
    deferred: Vec<u64>,
    /// Pending restart timers by key, removed as they fire.
    timers: HashMap<u64, SpawnHandle>,
    next_timer: u64,
    /// Callers waiting for a requested (re)start or an added child's start to be acknowledged
    /// (or to fail).
    restart_replies: Vec<(u64, oneshot::Sender<Result<u32, ChildError>>)>,
    phase: Phase,
}

impl Managed for Supervisor {
    const KIND: &'static str = "supervisor";
    const DEFERS_READY: bool = true;

    fn dump_state(&self) -> serde_json::Value {
        serde_json::json!({
            "strategy": self.strategy,
            "restart_limit": {
                "max_restarts": self.limit.max_restarts,
                "within_ms": self.limit.within.as_millis() as u64,
            },
            "restarts_in_window": self.history.len(),
            "backoff": {
                "initial_ms": self.backoff.initial.as_millis() as u64,
                "max_ms": self.backoff.max.as_millis() as u64,
                "jitter": self.backoff.jitter,
            },
            "phase": format!("{:?}", self.phase).to_lowercase(),
            "children": self.children.len(),
            // Per-child rows only for small supervisors; big ones are listed by ListActors.
            "child_states": (self.children.len() <= 64).then(|| self.children.values().map(|c| serde_json::json!({
                "name": c.spec.name,
                "kind": c.spec.kind,
                "restart": c.spec.restart,
                "status": format!("{:?}", c.status).to_lowercase(),
                "incarnation": c.incarnation,
                "held": c.held,
            })).collect::<Vec<_>>()),
        })
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let mut ids = Vec::new();
        for spec in (self.factory)() {
            match self.add(spec, false) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    // A subtree missing a child is not "started": fail, and let the parent retry.
                    error!(self.rt.log, "child not added"; "supervisor" => &*self.path(), "error" => &e);
                    let all: Vec<u64> = self.children.keys().copied().collect();
                    self.begin_job(all, Then::Escalate(format!("cannot add child: {e}")), ctx);
                    return;
                }
            }
        }
        self.start_now(&ids, false, ctx);
    }

    fn stopping(&mut self, ctx: &mut Context<Self>) -> Running {
        if std::thread::panicking() || tokio::runtime::Handle::try_current().is_err() {
            // Our own code panicked, or the runtime is being torn down without a shutdown: no
            // ordered stop is possible any more, but the children must not outlive us unsupervised.
            for c in self.children.values() {
                c.cell.request_stop();
                self.rt.actors.deregister(&c.cell);
            }
            return Running::Stop;
        }
        if self.phase == Phase::Running {
            self.phase = Phase::ShuttingDown;
            for (_, t) in self.timers.drain() {
                ctx.cancel_future(t);
            }
            let live = self.live_ids(0);
            match self.job.as_mut() {
                Some(job) => {
                    Self::abandon_then(std::mem::replace(&mut job.then, Then::Shutdown));
                    let current = job.current.map(|(id, _)| id);
                    job.queue = live.into_iter().filter(|id| Some(*id) != current).collect();
                }
                None => self.begin_job(live, Then::Shutdown, ctx),
            }
        }
        if self.phase == Phase::Done {
            Running::Stop
        } else {
            Running::Continue
        }
    }
}

impl Supervisor {
    pub(crate) fn new(
        rt: Arc<RuntimeShared>,
        cell: Arc<ActorCell>,
        incarnation: u64,
        spec: SupervisorSpec,
    ) -> Self {
        Self {
            limit: spec.limit.unwrap_or(rt.config.restart_limit),
            backoff: spec.backoff.unwrap_or(rt.config.backoff),
            strategy: spec.strategy,
            factory: spec.children,
            rt,
            cell,
            incarnation,
            children: BTreeMap::new(),
            next_id: 0,
            history: RestartHistory::default(),
            job: None,
            starts: StartQueue::default(),
            deferred: Vec::new(),
            timers: HashMap::new(),
            next_timer: 0,
            restart_replies: Vec::new(),
            phase: Phase::Running,
        }
    }

    fn path(&self) -> Arc<str> {
        self.cell.path().clone()
    }

    /// The child called `name` (operator requests; linear, and rare).
    fn id_by_name(&self, name: &str) -> Option<u64> {
        self.children
            .iter()
            .find(|(_, c)| c.spec.name == name)
            .map(|(id, _)| *id)
    }

    /// Ids of running or waiting children from id `from` on, in start order.
    fn live_ids(&self, from: u64) -> Vec<u64> {
        self.children
            .range(from..)
            .filter(|(_, c)| {
                matches!(
                    c.status,
                    Status::Running | Status::Waiting | Status::Stopping
                )
            })
            .map(|(id, _)| *id)
            .collect()
    }

    fn timeout_of(&self, c: &Child) -> Duration {
        c.spec
            .shutdown_timeout
            .unwrap_or(self.rt.config.shutdown_timeout)
    }

    fn add(&mut self, spec: ChildSpec, dynamic: bool) -> Result<u64, String> {
        if spec.name.is_empty() || spec.name.starts_with('/') || spec.name.ends_with('/') {
            return Err(format!("invalid child name {:?}", spec.name));
        }
        let path: Arc<str> = format!("{}/{}", self.path(), spec.name).into();
        let cell = Arc::new(ActorCell::new(path.clone(), spec.kind, Some(self.path())));
        // The table refuses a taken path: that is the duplicate-name check, in O(log n).
        self.rt.actors.register(cell.clone())?;
        if let Some(r) = &spec.supervisor_ref {
            self.rt.actors.set_supervisor(path, r.clone());
        }
        self.next_id += 1;
        self.children.insert(
            self.next_id,
            Box::new(Child {
                spec,
                cell,
                incarnation: 0,
                status: Status::Waiting,
                dynamic,
                held: false,
                consecutive_failures: 0,
                last_start: Instant::now(),
            }),
        );
        Ok(self.next_id)
    }

    fn remove(&mut self, id: u64) {
        if let Some(c) = self.children.remove(&id) {
            self.rt.actors.deregister(&c.cell);
        }
        // Whoever waits for its start will not see one.
        self.answer_restart(
            id,
            Err(ChildError::Failed("removed before it started".into())),
        );
    }

    /// Queues the given waiting children for starting, in order.
    fn start_now(&mut self, ids: &[u64], is_restart: bool, ctx: &mut Context<Self>) {
        self.starts
            .pending
            .extend(ids.iter().map(|id| (*id, is_restart)));
        self.pump_starts(ctx);
    }

    /// Starts queued children until one is in progress.
    fn pump_starts(&mut self, ctx: &mut Context<Self>) {
        // A stop job decides what starts next; the queue resumes when it is done.
        while self.starts.current.is_none() && self.job.is_none() {
            let Some((id, is_restart)) = self.starts.pending.pop_front() else {
                // The queued children are up (or being retried): this subtree has started.
                self.cell.mark_ready(self.incarnation);
                return;
            };
            let waiting = self
                .children
                .get(&id)
                .is_some_and(|c| c.status == Status::Waiting);
            if !waiting || self.phase != Phase::Running {
                continue;
            }
            match self.start_child(id, is_restart, ctx) {
                Ok(()) => {
                    let child = &self.children[&id];
                    let (timeout, inc) = (self.timeout_of(child), child.incarnation);
                    let timer = ctx.run_later(timeout, move |act, ctx| {
                        act.start_timed_out(id, inc, timeout, ctx)
                    });
                    self.starts.current = Some((id, inc, is_restart, timer));
                }
                Err(reason) => self.on_failure(id, reason, true, ctx),
            }
        }
    }

    /// Clears the start in progress if it is this incarnation's; returns its `is_restart`.
    fn end_current_start(
        &mut self,
        id: u64,
        incarnation: u64,
        ctx: &mut Context<Self>,
    ) -> Option<bool> {
        match self.starts.current {
            Some((cur, inc, is_restart, timer)) if cur == id && inc == incarnation => {
                ctx.cancel_future(timer);
                self.starts.current = None;
                Some(is_restart)
            }
            _ => None,
        }
    }

    fn on_started(&mut self, msg: ChildStarted, ctx: &mut Context<Self>) {
        let Some(is_restart) = self.end_current_start(msg.child, msg.incarnation, ctx) else {
            return;
        };
        if let Some(child) = self.children.get(&msg.child) {
            if child.status == Status::Running {
                child.cell.set_state(Lifecycle::Running);
                let event = if is_restart {
                    EventKind::Restarted
                } else {
                    EventKind::Started
                };
                self.rt.actors.emit(&child.cell, event, None);
                let restarts = child.cell.restarts();
                self.answer_restart(msg.child, Ok(restarts));
            }
        }
        self.pump_starts(ctx);
    }

    fn answer_restart(&mut self, id: u64, result: Result<u32, ChildError>) {
        while let Some(pos) = self.restart_replies.iter().position(|(c, _)| *c == id) {
            let (_, reply) = self.restart_replies.swap_remove(pos);
            let _ = reply.send(result.clone());
        }
    }

    fn start_timed_out(
        &mut self,
        id: u64,
        incarnation: u64,
        timeout: Duration,
        ctx: &mut Context<Self>,
    ) {
        if self.end_current_start(id, incarnation, ctx).is_none() {
            return;
        }
        if let Some(child) = self
            .children
            .get(&id)
            .filter(|c| c.status == Status::Running)
        {
            // Stuck in `started()`: ask it to go, forget this incarnation, count it as a failure.
            child.cell.request_stop();
            (child.spec.detach)(child.incarnation);
            self.on_failure(
                id,
                format!("did not finish starting within {timeout:?}"),
                true,
                ctx,
            );
        }
        self.pump_starts(ctx);
    }

    /// Builds and launches one child; it counts as running once its `started()` acknowledges.
    fn start_child(
        &mut self,
        id: u64,
        is_restart: bool,
        ctx: &mut Context<Self>,
    ) -> Result<(), String> {
        let child = self
            .children
            .get_mut(&id)
            .expect("caller checked the child exists");
        let arbiter = match &child.spec.placement {
            Placement::Control => self.rt.control.clone(),
            Placement::Worker => self.rt.next_worker(),
            Placement::Dedicated(name) => self.rt.dedicated(name),
        };
        child.incarnation += 1;
        child.cell.begin_incarnation(child.incarnation);
        child.cell.set_state(Lifecycle::Starting);
        let args = StartArgs {
            cell: &child.cell,
            incarnation: child.incarnation,
            notify: ExitNotify::Supervisor {
                addr: ctx.address(),
                child: id,
            },
            arbiter,
            runtime: &self.rt,
        };
        (child.spec.starter)(args)?;
        child.status = Status::Running;
        child.last_start = Instant::now();
        if is_restart {
            child.cell.count_restart();
        }
        Ok(())
    }

    fn on_exit(&mut self, msg: ChildExited, ctx: &mut Context<Self>) {
        if self
            .children
            .get(&msg.child)
            .is_none_or(|c| c.incarnation != msg.incarnation)
        {
            return;
        }
        let was_starting = self
            .end_current_start(msg.child, msg.incarnation, ctx)
            .is_some();
        let child = self.children.get_mut(&msg.child).expect("checked above");
        match child.status {
            Status::Stopping => {
                child.status = Status::Stopped;
                child.cell.set_state(Lifecycle::Stopped);
                (child.spec.detach)(child.incarnation);
                let reason = match msg.exit {
                    Exit::Normal => None,
                    Exit::Failed(r) | Exit::Panicked(r) => Some(r),
                };
                self.rt.actors.emit(&child.cell, EventKind::Stopped, reason);
                self.job_child_done(msg.child, ctx);
            }
            Status::Running => {
                (child.spec.detach)(child.incarnation);
                let (reason, failed) = match msg.exit {
                    Exit::Normal => ("exited without being asked to".to_string(), false),
                    Exit::Failed(r) => (r, true),
                    Exit::Panicked(r) => (format!("panicked: {r}"), true),
                };
                self.on_failure(msg.child, reason, failed, ctx);
            }
            _ => {}
        }
        if was_starting {
            self.pump_starts(ctx);
        }
    }

    /// A child went down on its own (or failed to start): record it and apply the policy.
    fn on_failure(&mut self, id: u64, reason: String, failed: bool, ctx: &mut Context<Self>) {
        self.answer_restart(
            id,
            Err(ChildError::Failed(format!("restart failed: {reason}"))),
        );
        let Some(child) = self.children.get_mut(&id) else {
            return;
        };
        // A temporary or transient child that ends cleanly has done its job (a finished session,
        // say): that is not a failure to record or to warn about.
        if !failed && child.spec.restart != Restart::Permanent {
            self.rt.actors.emit(&child.cell, EventKind::Stopped, None);
            debug!(self.rt.log, "child finished"; "path" => &**child.cell.path());
        } else {
            child.cell.record_failure(reason.clone());
            self.rt
                .actors
                .emit(&child.cell, EventKind::Failed, Some(reason.clone()));
            warn!(self.rt.log, "child exited"; "path" => &**child.cell.path(), "reason" => &reason);
        }
        let restart = match child.spec.restart {
            Restart::Permanent => true,
            Restart::Transient => failed,
            Restart::Temporary => false,
        };
        if !restart || self.phase != Phase::Running {
            child.status = Status::Stopped;
            child.cell.set_state(if failed {
                Lifecycle::Failed
            } else {
                Lifecycle::Stopped
            });
            if child.dynamic {
                self.remove(id);
            }
            return;
        }
        child.status = Status::Down;
        child.cell.set_state(Lifecycle::Restarting);
        if let Some(job) = self.job.as_mut() {
            // If the job was going to stop it anyway, its follow-up decides; otherwise wait.
            let before = job.queue.len();
            job.queue.retain(|q| *q != id);
            if job.queue.len() == before {
                self.deferred.push(id);
            }
            return;
        }
        self.apply_strategy(id, ctx);
    }

    fn apply_strategy(&mut self, id: u64, ctx: &mut Context<Self>) {
        if !self.children.contains_key(&id) {
            return;
        }
        if !self.history.allow(self.limit, Instant::now()) {
            let reason = format!(
                "restart limit reached: more than {} restarts within {:?} (last: {})",
                self.limit.max_restarts,
                self.limit.within,
                self.children[&id].cell.path()
            );
            error!(self.rt.log, "supervisor giving up"; "path" => &*self.path(), "reason" => &reason);
            let all = self.live_ids(0);
            self.begin_job(all, Then::Escalate(reason), ctx);
            return;
        }
        let child = self.children.get_mut(&id).expect("checked above");
        child.consecutive_failures = if child.last_start.elapsed() > self.limit.within {
            1
        } else {
            child.consecutive_failures + 1
        };
        let delay = self.backoff.delay(child.consecutive_failures);
        match self.strategy {
            Strategy::OneForOne => self.schedule_restart(vec![id], delay, ctx),
            Strategy::OneForAll | Strategy::RestForOne => {
                let from = if self.strategy == Strategy::OneForAll {
                    0
                } else {
                    id
                };
                let to_stop: Vec<u64> = self
                    .live_ids(from)
                    .into_iter()
                    .filter(|c| *c != id)
                    .collect();
                let stopped: HashSet<u64> = to_stop.iter().copied().collect();
                // Temporary children are never restarted; held ones stay down.
                let ids = self
                    .children
                    .range(from..)
                    .filter(|(cid, _)| **cid == id || stopped.contains(cid))
                    .filter(|(_, c)| !c.held && c.spec.restart != Restart::Temporary)
                    .map(|(cid, _)| *cid)
                    .collect();
                self.begin_job(to_stop, Then::Restart { ids, delay }, ctx);
            }
        }
    }

    fn schedule_restart(&mut self, ids: Vec<u64>, delay: Duration, ctx: &mut Context<Self>) {
        self.unqueue(&ids);
        for id in &ids {
            if let Some(c) = self.children.get_mut(id) {
                c.status = Status::Waiting;
                c.cell.set_state(Lifecycle::Restarting);
            }
        }
        self.next_timer += 1;
        let key = self.next_timer;
        let handle = ctx.run_later(delay, move |act, ctx| {
            act.timers.remove(&key);
            act.start_now(&ids, true, ctx)
        });
        self.timers.insert(key, handle);
    }

    /// Drops queued starts of these children: whoever takes them over queues them again.
    fn unqueue(&mut self, ids: &[u64]) {
        if !self.starts.pending.is_empty() {
            let ids: HashSet<u64> = ids.iter().copied().collect();
            self.starts.pending.retain(|(id, _)| !ids.contains(id));
        }
    }

    fn begin_job(&mut self, queue: Vec<u64>, then: Then, ctx: &mut Context<Self>) {
        debug_assert!(self.job.is_none());
        self.unqueue(&queue);
        if matches!(then, Then::Escalate(_)) {
            self.phase = Phase::ShuttingDown;
        }
        self.job = Some(StopJob {
            queue,
            current: None,
            then,
        });
        self.advance_job(ctx);
    }

    fn advance_job(&mut self, ctx: &mut Context<Self>) {
        loop {
            let Some(job) = self.job.as_mut() else { return };
            if job.current.is_some() {
                return;
            }
            let Some(id) = job.queue.pop() else {
                let job = self.job.take().expect("job present");
                self.finish_job(job.then, ctx);
                return;
            };
            let Some(child) = self.children.get_mut(&id) else {
                continue;
            };
            match child.status {
                Status::Running => {
                    child.status = Status::Stopping;
                    child.cell.set_state(Lifecycle::Stopping);
                    child.cell.request_stop();
                    let timeout = child
                        .spec
                        .shutdown_timeout
                        .unwrap_or(self.rt.config.shutdown_timeout);
                    let inc = child.incarnation;
                    let h = ctx.run_later(timeout, move |act, ctx| {
                        act.stop_timed_out(id, inc, timeout, ctx)
                    });
                    job.current = Some((id, h));
                    return;
                }
                Status::Waiting | Status::Down => {
                    child.status = Status::Stopped;
                    child.cell.set_state(Lifecycle::Stopped);
                }
                _ => {}
            }
        }
    }

    fn job_child_done(&mut self, id: u64, ctx: &mut Context<Self>) {
        let Some(job) = self.job.as_mut() else { return };
        if let Some((cur, h)) = job.current {
            if cur == id {
                ctx.cancel_future(h);
                job.current = None;
                self.advance_job(ctx);
            }
        }
    }

    fn stop_timed_out(
        &mut self,
        id: u64,
        incarnation: u64,
        timeout: Duration,
        ctx: &mut Context<Self>,
    ) {
        let Some(child) = self.children.get_mut(&id) else {
            return;
        };
        if child.incarnation != incarnation || child.status != Status::Stopping {
            return;
        }
        let reason = format!("did not stop within {timeout:?}; abandoned");
        error!(self.rt.log, "child stop timed out"; "path" => &**child.cell.path(), "timeout_ms" => timeout.as_millis() as u64);
        child.status = Status::Abandoned;
        child.cell.set_state(Lifecycle::Stopped);
        child.cell.record_failure(reason.clone());
        (child.spec.detach)(child.incarnation);
        self.rt
            .actors
            .emit(&child.cell, EventKind::Stopped, Some(reason));
        if let Some(job) = self.job.as_mut() {
            if job.current.map(|(c, _)| c) == Some(id) {
                job.current = None;
            }
        }
        self.advance_job(ctx);
    }

    fn finish_job(&mut self, then: Then, ctx: &mut Context<Self>) {
        match then {
            Then::Restart { ids, delay } => {
                // Temporary children the job stopped are done for; dynamic ones leave.
                let gone: Vec<u64> = self
                    .children
                    .iter()
                    .filter(|(_, c)| {
                        c.dynamic
                            && c.status == Status::Stopped
                            && c.spec.restart == Restart::Temporary
                    })
                    .map(|(id, _)| *id)
                    .collect();
                for id in gone {
                    self.remove(id);
                }
                self.schedule_restart(ids, delay, ctx)
            }
            Then::ManualRestart { id, reply } => match self.children.get_mut(&id) {
                Some(child) if self.phase == Phase::Running => {
                    child.held = false;
                    child.status = Status::Waiting;
                    // Answered when the new incarnation acknowledges its start, or fails.
                    self.restart_replies.push((id, reply));
                    self.start_now(&[id], true, ctx);
                }
                _ => {
                    let _ = reply.send(Err(ChildError::Stopping(format!(
                        "{} is stopping",
                        self.path()
                    ))));
                }
            },
            Then::ManualStop { id, reply } => {
                if let Some(child) = self.children.get_mut(&id) {
                    child.held = true;
                    if child.dynamic {
                        self.remove(id);
                    }
                }
                let _ = reply.send(Ok(()));
            }
            Then::Shutdown => return self.finish(ctx),
            Then::Escalate(reason) => {
                self.cell.set_exit_failure(self.incarnation, reason);
                return self.finish(ctx);
            }
        }
        for id in std::mem::take(&mut self.deferred) {
            if self.job.is_some() {
                self.deferred.push(id);
            } else if self
                .children
                .get(&id)
                .is_some_and(|c| c.status == Status::Down)
            {
                self.apply_strategy(id, ctx);
            }
        }
        self.pump_starts(ctx);
    }

    /// All children are down: forget them and stop.
    fn finish(&mut self, ctx: &mut Context<Self>) {
        self.phase = Phase::Done;
        for c in std::mem::take(&mut self.children).into_values() {
            self.rt.actors.deregister(&c.cell);
        }
        info!(self.rt.log, "supervisor stopped"; "path" => &*self.path());
        ctx.stop();
    }

    /// Fails the reply of a follow-up that a shutdown replaced.
    fn abandon_then(then: Then) {
        let stopping = || ChildError::Stopping("supervisor is stopping".into());
        match then {
            Then::ManualRestart { reply, .. } => {
                let _ = reply.send(Err(stopping()));
            }
            Then::ManualStop { reply, .. } => {
                let _ = reply.send(Err(stopping()));
            }
            _ => {}
        }
    }

    /// Why an operator request about child `id` cannot run now, if it cannot.
    fn busy_or_stopping(&self, id: u64) -> Option<ChildError> {
        if self.phase != Phase::Running {
            Some(ChildError::Stopping(format!("{} is stopping", self.path())))
        } else if self.job.is_some() || self.restart_replies.iter().any(|(c, _)| *c == id) {
            Some(ChildError::Busy(format!(
                "{} is busy restarting or stopping children; try again",
                self.path()
            )))
        } else {
            None
        }
    }

    /// Starts a stop job for an operator request and answers when its follow-up has run.
    fn operator_job<T: Send + 'static>(
        &mut self,
        name: &str,
        ctx: &mut Context<Self>,
        make: impl FnOnce(u64, &Child, oneshot::Sender<Result<T, ChildError>>) -> (Vec<u64>, Then),
    ) -> ResponseFuture<Result<T, ChildError>> {
        let result = match self.id_by_name(name) {
            None => Err(ChildError::NotFound(format!(
                "{}/{name} not found",
                self.path()
            ))),
            Some(id) => match self.busy_or_stopping(id) {
                Some(e) => Err(e),
                None => {
                    let (tx, rx) = oneshot::channel();
                    let (to_stop, then) = make(id, &self.children[&id], tx);
                    self.begin_job(to_stop, then, ctx);
                    Ok(rx)
                }
            },
        };
        Box::pin(async move {
            match result {
                Ok(rx) => rx
                    .await
                    .unwrap_or_else(|_| Err(ChildError::Stopping("supervisor stopped".into()))),
                Err(e) => Err(e),
            }
        })
    }
}

impl Handler<ChildStarted> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: ChildStarted, ctx: &mut Context<Self>) {
        self.on_started(msg, ctx);
    }
}

impl Handler<ChildExited> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: ChildExited, ctx: &mut Context<Self>) {
        self.on_exit(msg, ctx);
    }
}

impl Handler<AddChild> for Supervisor {
    type Result = ResponseFuture<Result<String, String>>;

    fn handle(&mut self, msg: AddChild, ctx: &mut Context<Self>) -> Self::Result {
        if self.phase != Phase::Running {
            let e = format!("{} is stopping", self.path());
            return Box::pin(async move { Err(e) });
        }
        let id = match self.add(msg.0, true) {
            Ok(id) => id,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let path = self.children[&id].cell.path().to_string();
        // Answered once the child runs: a caller may message it as soon as it has the answer.
        let (tx, rx) = oneshot::channel();
        self.restart_replies.push((id, tx));
        self.start_now(&[id], false, ctx);
        Box::pin(async move {
            match rx.await {
                Ok(Ok(_)) => Ok(path),
                Ok(Err(e)) => Err(format!("{path}: {e}")),
                Err(_) => Err(format!("{path}: the supervisor stopped before it started")),
            }
        })
    }
}

impl Handler<RestartChild> for Supervisor {
    type Result = ResponseFuture<Result<u32, ChildError>>;

    fn handle(&mut self, msg: RestartChild, ctx: &mut Context<Self>) -> Self::Result {
        self.operator_job(&msg.name, ctx, |id, child, reply| {
            let to_stop = if child.status == Status::Running {
                vec![id]
            } else {
                vec![]
            };
            (to_stop, Then::ManualRestart { id, reply })
        })
    }
}

impl Handler<StopChild> for Supervisor {
    type Result = ResponseFuture<Result<(), ChildError>>;

    fn handle(&mut self, msg: StopChild, ctx: &mut Context<Self>) -> Self::Result {
        self.operator_job(&msg.name, ctx, |id, _, reply| {
            (vec![id], Then::ManualStop { id, reply })
        })
    }
}
