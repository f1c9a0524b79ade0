//! `/node/balancer/state`: follows the balancer's keys in the store and publishes them as a
//! [`View`]; starts and stops one actor per module instance.
//!
//! It loads the prefix, then watches from the next revision, so it misses no change; a watch
//! that ends (a snapshot was installed, the watcher fell behind) is replaced by a fresh load.
//! Writers (the [`super::handle::BalancerHandle`]) write to the store and wait for this actor to
//! apply their revision, so a write is visible here as soon as it is acknowledged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::{
    Actor, ActorFutureExt, AsyncContext, Context, Handler, Message, StreamHandler, WrapFuture,
};
use serde::Serialize;
use slog::{debug, info, Logger};
use tokio::sync::oneshot;
use tokio_stream::wrappers::ReceiverStream;

use super::instance::{Instance, Live};
use super::limits::LimitSet;
use super::metrics::BalancerMetrics;
use super::model::{
    decode, BalancerSettings, Instructions, Key, LimitsRecord, LoadReport, ModuleRecord,
    RoutesRecord, ScalingRecord, PREFIX,
};
use super::module::{ModuleActor, ModuleDeps};
use super::route::RoutingTable;
use super::traffic::TrafficRecord;
use super::view::{Published, Versioned, View};
use super::ModuleType;
use crate::cluster::kv::{Event, KeyValue};
use crate::cluster::store::Store;
use crate::cluster::watch::WatchUpdate;
use crate::envelope::ActorRef;
use crate::supervision::{
    AddChild, ChildError, ChildSpec, Managed, Restart, StopChild, Supervisor,
};

/// How often module actors refused a start or stop are tried again.
const RECONCILE: Duration = Duration::from_millis(500);

/// Answers once this member has applied `revision` (at once if it has).
#[derive(Message)]
#[rtype(result = "()")]
pub struct WaitFor(pub i64);

crate::handles!(BalancerState: WaitFor);

/// Loads and watches again after the watch ended.
#[derive(Message)]
#[rtype(result = "()")]
struct Reload;

/// A registration as applied.
struct Registered {
    record: Arc<ModuleRecord>,
    lease: i64,
    created: i64,
}

/// The records as applied, by key.
#[derive(Default)]
struct Model {
    modules: BTreeMap<String, Registered>,
    loads: BTreeMap<String, Arc<LoadReport>>,
    instructions: BTreeMap<String, Versioned<Instructions>>,
    routes: Versioned<RoutesRecord>,
    limits: Versioned<LimitsRecord>,
    traffic: BTreeMap<ModuleType, Versioned<TrafficRecord>>,
    scaling: BTreeMap<ModuleType, Versioned<ScalingRecord>>,
    settings: Versioned<BalancerSettings>,
}

/// The state actor.
pub struct BalancerState {
    store: Arc<dyn Store>,
    published: Published,
    modules: ActorRef<Supervisor>,
    deps: ModuleDeps,
    metrics: Arc<BalancerMetrics>,
    log: Logger,
    model: Model,
    /// This member's live state of each instance, by id, and the lease it goes with.
    live: HashMap<String, (i64, Arc<Live>)>,
    /// The actor reference of each id, kept while its actor may run (a re-registered id gets
    /// the same one).
    actors: HashMap<String, ActorRef<ModuleActor>>,
    /// Ids whose actor runs; ids with a start or stop under way.
    running: HashSet<String>,
    pending: HashSet<String>,
    /// The type of every id seen, for forgetting its metric series once it is gone.
    types: HashMap<String, ModuleType>,
    compiled: Versioned<Arc<RoutingTable>>,
    limiters: Arc<LimitSet>,
    waiters: Vec<(i64, oneshot::Sender<()>)>,
    revision: i64,
    loaded: bool,
    reloads: u64,
    evictions: u64,
}

impl BalancerState {
    /// The state actor of a member: module actors go under `modules`.
    pub fn new(
        store: Arc<dyn Store>,
        published: Published,
        modules: ActorRef<Supervisor>,
        deps: ModuleDeps,
        log: &Logger,
    ) -> Self {
        let metrics = deps.metrics.clone();
        Self {
            store,
            published,
            modules,
            deps,
            metrics,
            log: log.new(slog::o!("actor" => "balancer")),
            model: Model::default(),
            live: HashMap::new(),
            actors: HashMap::new(),
            running: HashSet::new(),
            pending: HashSet::new(),
            types: HashMap::new(),
            compiled: Versioned::default(),
            limiters: Arc::new(LimitSet::default()),
            waiters: Vec::new(),
            revision: 0,
            loaded: false,
            reloads: 0,
            evictions: 0,
        }
    }

    fn load(&mut self, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        // This member's own state, then its own changes from the next revision: following needs
        // no leader (a member starting before the election, or cut off, still loads).
        let read = async move { store.range_local(PREFIX.as_bytes().to_vec()).await };
        ctx.spawn(read.into_actor(self).map(|res, act, ctx| match res {
            Ok(listing) => {
                act.model = Model::default();
                act.revision = listing.revision;
                for kv in &listing.kvs {
                    act.put(kv);
                }
                act.loaded = true;
                act.apply_changes(ctx);
                act.watch(ctx);
            }
            Err(e) => {
                debug!(act.log, "cannot load the balancer's state yet"; "error" => %e);
                ctx.run_later(Duration::from_millis(200), |act, ctx| act.load(ctx));
            }
        }));
    }

    fn watch(&mut self, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let from = self.revision + 1;
        let start = async move { store.watch(PREFIX.as_bytes().to_vec(), from).await };
        ctx.spawn(start.into_actor(self).map(|res, act, ctx| match res {
            Ok(rx) => {
                ctx.add_stream(ReceiverStream::new(rx));
            }
            Err(e) => {
                debug!(act.log, "cannot watch the balancer's state; loading again"; "error" => %e);
                ctx.run_later(Duration::from_millis(200), |act, ctx| act.load(ctx));
            }
        }));
    }

    fn put(&mut self, kv: &KeyValue) {
        let Some(key) = Key::parse(&kv.key) else {
            return;
        };
        let rev = kv.mod_revision;
        let m = &mut self.model;
        match key {
            Key::Module(id) => {
                if let Some(r) = decode::<ModuleRecord>(&kv.value) {
                    self.types.insert(id.clone(), r.module_type);
                    let reg = Registered {
                        record: Arc::new(r),
                        lease: kv.lease,
                        created: kv.create_revision,
                    };
                    m.modules.insert(id, reg);
                }
            }
            Key::Load(id) => {
                if let Some(r) = decode::<LoadReport>(&kv.value) {
                    m.loads.insert(id, Arc::new(r));
                }
            }
            Key::Instructions(id) => {
                if let Some(v) = decode(&kv.value) {
                    m.instructions.insert(
                        id,
                        Versioned {
                            value: v,
                            revision: rev,
                        },
                    );
                }
            }
            Key::Routes => {
                if let Some(v) = decode(&kv.value) {
                    m.routes = Versioned {
                        value: v,
                        revision: rev,
                    };
                }
            }
            Key::Limits => {
                if let Some(v) = decode(&kv.value) {
                    m.limits = Versioned {
                        value: v,
                        revision: rev,
                    };
                }
            }
            Key::Traffic(t) => {
                if let Some(v) = decode(&kv.value) {
                    m.traffic.insert(
                        t,
                        Versioned {
                            value: v,
                            revision: rev,
                        },
                    );
                }
            }
            Key::Scaling(t) => {
                if let Some(v) = decode(&kv.value) {
                    m.scaling.insert(
                        t,
                        Versioned {
                            value: v,
                            revision: rev,
                        },
                    );
                }
            }
            Key::Settings => {
                if let Some(v) = decode(&kv.value) {
                    m.settings = Versioned {
                        value: v,
                        revision: rev,
                    };
                }
            }
        }
    }

    fn delete(&mut self, e: &Event) {
        let Some(key) = Key::parse(&e.kv.key) else {
            return;
        };
        let m = &mut self.model;
        match key {
            Key::Module(id) => {
                if m.modules.remove(&id).is_some() {
                    if e.expired {
                        self.evictions += 1;
                        self.metrics.evictions.inc();
                        info!(self.log, "module instance evicted: its heartbeats stopped"; "instance_id" => &id);
                    } else {
                        info!(self.log, "module instance unregistered"; "instance_id" => &id);
                    }
                }
            }
            Key::Load(id) => {
                m.loads.remove(&id);
            }
            Key::Instructions(id) => {
                m.instructions.remove(&id);
            }
            Key::Routes => m.routes = Versioned::default(),
            Key::Limits => m.limits = Versioned::default(),
            Key::Traffic(t) => {
                m.traffic.remove(&t);
            }
            Key::Scaling(t) => {
                m.scaling.remove(&t);
            }
            Key::Settings => m.settings = Versioned::default(),
        }
    }

    /// Brings the actors, the compiled routes and the limiters in line with the model, then
    /// publishes the view and answers the writers waiting for this revision.
    fn apply_changes(&mut self, ctx: &mut Context<Self>) {
        self.sync_actors(ctx);
        if self.compiled.revision != self.model.routes.revision {
            // Routes are validated before they are written; a table that does not compile
            // (written by a newer node, or by hand through the KV API) routes nothing rather
            // than half of it.
            let table =
                RoutingTable::compile(self.model.routes.value.routes.clone()).unwrap_or_default();
            self.compiled = Versioned {
                value: Arc::new(table),
                revision: self.model.routes.revision,
            };
        }
        self.limiters = Arc::new(self.limiters.rebuilt(&self.model.limits.value.limits));
        self.publish();
        let rev = self.revision;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|(want, _)| *want <= rev);
        self.waiters = waiting;
        for (_, tx) in ready {
            let _ = tx.send(());
        }
    }

    fn publish(&self) {
        let m = &self.model;
        let instances = m
            .modules
            .iter()
            .filter_map(|(id, reg)| {
                let (_, live) = self.live.get(id)?;
                let actor = self.actors.get(id)?;
                Some((
                    id.clone(),
                    Instance {
                        record: reg.record.clone(),
                        lease: reg.lease,
                        created: reg.created,
                        report: m.loads.get(id).cloned(),
                        live: live.clone(),
                        actor: actor.clone(),
                    },
                ))
            })
            .collect();
        self.metrics.set_instances(&self.published_counts());
        self.published.set(View {
            revision: self.revision,
            loaded: self.loaded,
            routes: self.compiled.clone(),
            limits: Versioned {
                value: m.limits.value.limits.clone(),
                revision: m.limits.revision,
            },
            limiters: self.limiters.clone(),
            instances,
            instructions: m.instructions.clone(),
            traffic: m.traffic.clone(),
            scaling: m.scaling.clone(),
            settings: m.settings.clone(),
        });
    }

    fn published_counts(&self) -> BTreeMap<ModuleType, i64> {
        let mut counts = BTreeMap::new();
        for reg in self.model.modules.values() {
            *counts.entry(reg.record.module_type).or_insert(0) += 1;
        }
        counts
    }

    /// One actor per instance: started when it appears, stopped when it goes, retried on the
    /// next round when the supervisor is busy with another change (or the previous actor of a
    /// re-registered id is still stopping). A re-registration under a new lease keeps its actor
    /// but starts its live state afresh.
    fn sync_actors(&mut self, ctx: &mut Context<Self>) {
        let model = &self.model.modules;
        self.live.retain(|id, _| model.contains_key(id));
        for (id, reg) in model {
            match self.live.get_mut(id) {
                Some((lease, live)) if *lease != reg.lease => {
                    *lease = reg.lease;
                    *live = Arc::new(Live::default());
                }
                Some(_) => {}
                None => {
                    self.live
                        .insert(id.clone(), (reg.lease, Arc::new(Live::default())));
                }
            }
            self.actors.entry(id.clone()).or_default();
        }
        let start: Vec<String> = model
            .keys()
            .filter(|id| !self.running.contains(*id) && !self.pending.contains(*id))
            .cloned()
            .collect();
        let stop: Vec<String> = self
            .running
            .iter()
            .filter(|id| !model.contains_key(*id) && !self.pending.contains(*id))
            .cloned()
            .collect();
        for id in start {
            self.start_actor(id, ctx);
        }
        for id in stop {
            self.stop_actor(id, ctx);
        }
    }

    fn start_actor(&mut self, id: String, ctx: &mut Context<Self>) {
        let actor = self.actors.entry(id.clone()).or_default().clone();
        let deps = self.deps.clone();
        let name = id.clone();
        let spec = ChildSpec::actor_for(id.clone(), &actor, move || {
            ModuleActor::new(name.clone(), deps.clone())
        })
        .restart(Restart::Transient);
        let modules = self.modules.clone();
        self.pending.insert(id.clone());
        let start = async move { modules.send(AddChild(spec)).await };
        ctx.spawn(start.into_actor(self).map(move |res, act, _| {
            act.pending.remove(&id);
            match res {
                Ok(Ok(_)) => {
                    act.running.insert(id);
                }
                // Busy, or the name still taken by the previous actor of this id: next round.
                other => {
                    debug!(act.log, "module actor not started yet"; "instance_id" => &id, "why" => ?other)
                }
            }
        }));
    }

    fn stop_actor(&mut self, id: String, ctx: &mut Context<Self>) {
        let modules = self.modules.clone();
        self.pending.insert(id.clone());
        let name = id.clone();
        let stop = async move { modules.send(StopChild { name }).await };
        ctx.spawn(stop.into_actor(self).map(move |res, act, _| {
            act.pending.remove(&id);
            match res {
                Ok(Ok(())) | Ok(Err(ChildError::NotFound(_))) => {
                    act.running.remove(&id);
                    if !act.model.modules.contains_key(&id) {
                        act.actors.remove(&id);
                        act.deps.probe.forget(&id);
                        act.forget_series(&id);
                    }
                }
                other => {
                    debug!(act.log, "module actor not stopped yet"; "instance_id" => &id, "why" => ?other)
                }
            }
        }));
    }

    /// Drops a gone instance's metric series, so the page does not grow with every instance
    /// that ever existed.
    fn forget_series(&mut self, id: &str) {
        if let Some(t) = self.types.remove(id) {
            self.metrics.forget(t, id);
        }
    }
}

impl Actor for BalancerState {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.load(ctx);
        // Starts and stops refused earlier (a busy supervisor) are retried.
        ctx.run_interval(RECONCILE, |act, ctx| {
            if act.loaded {
                act.sync_actors(ctx);
            }
        });
    }
}

#[derive(Serialize)]
struct StateDump {
    revision: i64,
    loaded: bool,
    reloads: u64,
    instances: usize,
    routes: usize,
    routes_revision: i64,
    limits: usize,
    waiting_writers: usize,
    evictions: u64,
}

impl Managed for BalancerState {
    const KIND: &'static str = "balancer-state";

    fn dump_state(&self) -> serde_json::Value {
        serde_json::to_value(StateDump {
            revision: self.revision,
            loaded: self.loaded,
            reloads: self.reloads,
            instances: self.model.modules.len(),
            routes: self.model.routes.value.routes.len(),
            routes_revision: self.model.routes.revision,
            limits: self.model.limits.value.limits.len(),
            waiting_writers: self.waiters.len(),
            evictions: self.evictions,
        })
        .unwrap_or_default()
    }
}

impl StreamHandler<WatchUpdate> for BalancerState {
    fn handle(&mut self, update: WatchUpdate, ctx: &mut Context<Self>) {
        match update {
            WatchUpdate::Events { revision, events } => {
                self.revision = revision;
                for e in &events {
                    if e.deleted {
                        self.delete(e);
                    } else {
                        self.put(&e.kv);
                    }
                }
                self.apply_changes(ctx);
            }
            WatchUpdate::Cancelled { reason, .. } => {
                debug!(self.log, "balancer watch ended; reloading"; "reason" => reason);
            }
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        // The watch ended: load and watch again rather than stop (actix's default).
        self.reloads += 1;
        ctx.notify(Reload);
    }
}

impl Handler<Reload> for BalancerState {
    type Result = ();

    fn handle(&mut self, _: Reload, ctx: &mut Context<Self>) {
        self.load(ctx);
    }
}

impl Handler<WaitFor> for BalancerState {
    type Result = actix::ResponseFuture<()>;

    fn handle(&mut self, WaitFor(rev): WaitFor, _: &mut Context<Self>) -> Self::Result {
        if self.loaded && rev <= self.revision {
            return Box::pin(async {});
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.push((rev, tx));
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}
