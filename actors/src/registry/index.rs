//! The registry's index, `/node/registry/index`: the registrations this member has applied, the
//! client actors that mirror them, and the writes (register, unregister) that change them.
//!
//! It loads the registrations from the store, then follows them with a watch from the next
//! revision, so it misses no change; a watch that ends (a snapshot was installed, say) is
//! replaced by a fresh load and a reconciliation. Writes go through raft; the client actors are
//! created from what was applied, the same way for registrations made here or elsewhere.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::{
    Actor, ActorFutureExt, AsyncContext, Context, Handler, Message, ResponseActFuture,
    StreamHandler, WrapFuture,
};
use serde::Serialize;
use slog::{debug, warn, Logger};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use super::client::{
    AcquireJob, Beat, BeatAnswer, ClientActor, ClientShared, ClientView, GetView, JobPermit,
    LeaseKeeper, RegistrySettings,
};
use super::metrics::{ClientLabels, RegistryMetrics};
use super::record::{
    client_id_of, client_key, new_client_id, RegisterRequest, Registration, CLIENTS_PREFIX,
};
use super::RegistryError;
use crate::cluster::client::{Client, Route, KV_GROUP};
use crate::cluster::kv::{ApplyResult, Cmp, Command, Compare, KeyValue, Op, Target};
use crate::cluster::raft::Query;
use crate::cluster::watch::{WatchSpec, WatchUpdate};
use crate::envelope::ActorRef;
use crate::quote::echo;
use crate::supervision::{AddChild, ChildSpec, Managed, StopChild, Supervisor};

/// The client actors by id, read by callers without going through the index.
pub type ClientTable = Arc<RwLock<HashMap<String, ClientEntry>>>;

/// A running client actor and its live figures.
#[derive(Clone)]
pub struct ClientEntry {
    pub actor: ActorRef<ClientActor>,
    pub shared: Arc<ClientShared>,
}

/// A registration written.
#[derive(Clone, Debug)]
pub struct Registered {
    pub record: Registration,
    /// The client id whose registration (same identity) this one replaced.
    pub replaced: Option<String>,
    /// The heartbeat interval granted.
    pub interval: Duration,
    /// The lease's time to live.
    pub ttl: Duration,
    /// The store's revision of the write.
    pub revision: i64,
}

/// Registers a client.
#[derive(Message)]
#[rtype(result = "Result<Registered, RegistryError>")]
pub struct Register(pub RegisterRequest);

/// Ends a registration; answers whether there was one.
#[derive(Message)]
#[rtype(result = "Result<bool, RegistryError>")]
pub struct Unregister(pub String);

/// The registrations matching a filter (empty: any), with their actors where running.
#[derive(Message)]
#[rtype(result = "Vec<(Arc<Registration>, Option<ClientEntry>)>")]
pub struct List {
    pub namespace: String,
    pub client_name: String,
}

/// A registration's actor, looked up in the store (linearizably) when this member has not
/// applied it yet: a client that registered through another member a moment ago is found.
#[derive(Message)]
#[rtype(result = "Result<Option<ClientEntry>, RegistryError>")]
pub struct Resolve(pub String);

crate::handles!(RegistryIndex: Register, Unregister, List, Resolve);

/// Replaces the index's watch after it ended.
#[derive(Message)]
#[rtype(result = "()")]
struct Reload;

/// The index actor.
pub struct RegistryIndex {
    settings: Arc<RegistrySettings>,
    store: Records,
    clients: ActorRef<Supervisor>,
    table: ClientTable,
    keeper: Arc<dyn LeaseKeeper>,
    metrics: Arc<RegistryMetrics>,
    log: Logger,
    /// Registrations as applied here (shared with their actors).
    records: BTreeMap<String, Arc<Registration>>,
    /// Actors being started, with callers waiting for them.
    starting: HashMap<String, Vec<oneshot::Sender<Option<ClientEntry>>>>,
    /// Revision of the last change seen (load or watch).
    revision: i64,
    loaded: bool,
    /// Watches replaced so far.
    reloads: u64,
}

impl RegistryIndex {
    /// The index of a member: client actors go under `clients`, and are published in `table`.
    pub fn new(
        settings: Arc<RegistrySettings>,
        store: Client,
        clients: ActorRef<Supervisor>,
        table: ClientTable,
        keeper: Arc<dyn LeaseKeeper>,
        metrics: RegistryMetrics,
        log: &Logger,
    ) -> Self {
        Self {
            store: Records {
                client: store,
                budget: settings.request_timeout,
            },
            settings,
            clients,
            table,
            keeper,
            metrics: Arc::new(metrics),
            log: log.new(slog::o!("actor" => "registry")),
            records: BTreeMap::new(),
            starting: HashMap::new(),
            revision: 0,
            loaded: false,
            reloads: 0,
        }
    }

    /// Counts a registration in or out of the gauge; a series that reaches zero is removed, so
    /// versions and namespaces that are gone do not stay on the metrics page.
    fn count(&self, r: &Registration, up: bool) {
        let labels = Self::labels(r);
        let before = {
            let gauge = self.metrics.clients.get_or_create(&labels);
            if up {
                gauge.inc()
            } else {
                gauge.dec()
            }
        };
        if !up && before <= 1 {
            self.metrics.clients.remove(&labels);
        }
    }

    fn labels(r: &Registration) -> ClientLabels {
        ClientLabels {
            namespace: r.namespace.clone(),
            version: r.client_version.clone(),
        }
    }

    /// Loads every registration, reconciles the actors with them, then watches from there.
    fn load(&mut self, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let read = async move {
            let query = Query::Range {
                prefix: CLIENTS_PREFIX.as_bytes().to_vec(),
                after: None,
                limit: 0,
                // This member's state, in process: nothing is encoded, so no page budget.
                max_bytes: 0,
            };
            store
                .client
                .read(KV_GROUP, query, false, store.budget, Route::Here)
                .await
                .map(|a| a.value)
        };
        ctx.spawn(read.into_actor(self).map(|res, act, ctx| match res {
            Ok(answer) => {
                act.reconcile(&answer.kvs, ctx);
                act.revision = answer.revision;
                act.loaded = true;
                act.watch(ctx);
            }
            other => {
                debug!(act.log, "cannot load registrations yet"; "result" => ?other.map(|a| a.revision));
                ctx.run_later(Duration::from_millis(200), |act, ctx| act.load(ctx));
            }
        }));
    }

    fn watch(&mut self, ctx: &mut Context<Self>) {
        let (tx, rx) = mpsc::channel(4096);
        let spec = WatchSpec {
            key: CLIENTS_PREFIX.as_bytes().to_vec(),
            prefix: true,
            start_revision: self.revision + 1,
            prev_kv: true,
        };
        let store = self.store.clone();
        ctx.spawn(
            async move {
                store
                    .client
                    .watch(KV_GROUP, spec, tx, store.budget)
                    .await
            }
            .into_actor(self)
            .map(move |res, act, ctx| match res {
                    Ok(_) => {
                        ctx.add_stream(ReceiverStream::new(rx));
                    }
                    other => {
                        debug!(act.log, "cannot watch registrations; loading again"; "result" => ?other.map(|(id, _)| id));
                        ctx.run_later(Duration::from_millis(200), |act, ctx| act.load(ctx));
                    }
                }),
        );
    }

    /// Makes the records and actors equal to `kvs` (the whole prefix).
    fn reconcile(&mut self, kvs: &[KeyValue], ctx: &mut Context<Self>) {
        let mut now: BTreeMap<String, Registration> = BTreeMap::new();
        for kv in kvs {
            if let Some(r) = Registration::decode(&kv.value, kv.lease) {
                now.insert(r.client_id.clone(), r);
            }
        }
        let gone: Vec<String> = self
            .records
            .keys()
            .filter(|id| !now.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            self.remove(&id, false);
        }
        for (_, r) in now {
            self.upsert(r, false, ctx);
        }
    }

    fn upsert(&mut self, record: Registration, fresh: bool, ctx: &mut Context<Self>) {
        let id = record.client_id.clone();
        if let Some(old) = self.records.get(&id) {
            if **old == record {
                return;
            }
            // Rewritten in place (not done by Lodge itself, but possible through the KV API):
            // the actor is restarted with the new record below.
            self.remove(&id, false);
        }
        self.count(&record, true);
        let record = Arc::new(record);
        self.records.insert(id.clone(), record.clone());
        self.start_actor(record, fresh, ctx);
    }

    fn remove(&mut self, id: &str, expired: bool) {
        let Some(record) = self.records.remove(id) else {
            return;
        };
        self.count(&record, false);
        if expired {
            self.metrics.expirations.inc();
        }
        // An actor still starting is stopped when its start completes (its record is gone).
        if self.table.write().unwrap().remove(id).is_some() {
            let clients = self.clients.clone();
            let name = id.to_string();
            actix::spawn(async move {
                let _ = clients.send(StopChild { name }).await;
            });
        }
    }

    fn child_spec(
        &self,
        record: &Arc<Registration>,
        shared: &Arc<ClientShared>,
        r: &ActorRef<ClientActor>,
    ) -> ChildSpec {
        let (record, shared) = (record.clone(), shared.clone());
        let settings = self.settings.clone();
        let keeper = self.keeper.clone();
        let metrics = self.metrics.clone();
        ChildSpec::actor_for(record.client_id.clone(), r, move || {
            // A restarted actor keeps the figures (they live in `shared`), not its queue.
            ClientActor::new(
                record.clone(),
                shared.clone(),
                settings.clone(),
                keeper.clone(),
                metrics.clone(),
            )
        })
    }

    fn start_actor(&mut self, record: Arc<Registration>, fresh: bool, ctx: &mut Context<Self>) {
        let id = record.client_id.clone();
        if self.starting.contains_key(&id) || self.table.read().unwrap().contains_key(&id) {
            return;
        }
        self.starting.insert(id.clone(), Vec::new());
        let r: ActorRef<ClientActor> = ActorRef::default();
        let shared = Arc::new(ClientShared::new(&record, &self.settings, fresh));
        let first = self.child_spec(&record, &shared, &r);
        let again = self.child_spec(&record, &shared, &r);
        let clients = self.clients.clone();
        let name = id.clone();
        let start = async move {
            match clients.send(AddChild(first)).await {
                Ok(Ok(_)) => true,
                Ok(Err(_)) => {
                    // A leftover of the same name (a stop still under way): replace it.
                    let _ = clients.send(StopChild { name }).await;
                    matches!(clients.send(AddChild(again)).await, Ok(Ok(_)))
                }
                Err(_) => false,
            }
        };
        ctx.spawn(start.into_actor(self).map(move |started, act, _| {
            let waiters = act.starting.remove(&id).unwrap_or_default();
            let wanted = act.records.contains_key(&id);
            let result = if started && wanted {
                let entry = ClientEntry { actor: r, shared };
                act.table.write().unwrap().insert(id.clone(), entry.clone());
                Some(entry)
            } else {
                if started {
                    let clients = act.clients.clone();
                    actix::spawn(async move {
                        let _ = clients.send(StopChild { name: id }).await;
                    });
                } else {
                    warn!(act.log, "client actor did not start"; "client_id" => &id);
                }
                None
            };
            for w in waiters {
                let _ = w.send(result.clone());
            }
        }));
    }

    /// Whether registration `id`, read or written at `revision`, may still exist: false when the
    /// watch has passed that revision and the registration is gone (it was deleted since).
    fn current(&self, id: &str, revision: i64) -> bool {
        self.revision < revision || self.records.contains_key(id)
    }

    /// The actor of `record` once it runs (starting it if needed).
    fn ensure(
        &mut self,
        record: Registration,
        fresh: bool,
        ctx: &mut Context<Self>,
    ) -> oneshot::Receiver<Option<ClientEntry>> {
        let (tx, rx) = oneshot::channel();
        let id = record.client_id.clone();
        if let Some(r) = self.table.read().unwrap().get(&id) {
            let _ = tx.send(Some(r.clone()));
            return rx;
        }
        match self.records.get(&id) {
            None => self.upsert(record, fresh, ctx),
            // Known, but its actor is neither running nor starting (a start that failed):
            // try again rather than answer "not registered" for a live registration.
            Some(known) if !self.starting.contains_key(&id) => {
                let known = known.clone();
                self.start_actor(known, fresh, ctx);
            }
            Some(_) => {}
        }
        match self.starting.get_mut(&id) {
            Some(waiters) => waiters.push(tx),
            None => {
                let _ = tx.send(self.table.read().unwrap().get(&id).cloned());
            }
        }
        rx
    }
}

impl Actor for RegistryIndex {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.load(ctx);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        // The next incarnation counts them again as it loads them.
        for r in std::mem::take(&mut self.records).values() {
            self.count(r, false);
        }
    }
}

#[derive(Serialize)]
struct IndexState {
    registrations: usize,
    actors: usize,
    starting: usize,
    revision: i64,
    loaded: bool,
    reloads: u64,
}

impl Managed for RegistryIndex {
    const KIND: &'static str = "registry-index";

    fn dump_state(&self) -> serde_json::Value {
        serde_json::to_value(IndexState {
            registrations: self.records.len(),
            actors: self.table.read().unwrap().len(),
            starting: self.starting.len(),
            revision: self.revision,
            loaded: self.loaded,
            reloads: self.reloads,
        })
        .unwrap_or_default()
    }
}

impl StreamHandler<WatchUpdate> for RegistryIndex {
    fn handle(&mut self, update: WatchUpdate, ctx: &mut Context<Self>) {
        match update {
            WatchUpdate::Events { revision, events } => {
                self.revision = revision;
                for e in events {
                    let Some(id) = client_id_of(&e.kv.key).map(str::to_string) else {
                        continue;
                    };
                    if e.deleted {
                        self.remove(&id, e.expired);
                    } else if let Some(r) = Registration::decode(&e.kv.value, e.kv.lease) {
                        self.upsert(r, false, ctx);
                    }
                }
            }
            WatchUpdate::Cancelled { reason, .. } => {
                debug!(self.log, "registration watch ended; reloading"; "reason" => reason);
            }
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        // The watch ended (cancelled, or the raft member went away): load and watch again
        // rather than stopping, which is what actix does by default.
        self.reloads += 1;
        ctx.notify(Reload);
    }
}

impl Handler<Reload> for RegistryIndex {
    type Result = ();

    fn handle(&mut self, _: Reload, ctx: &mut Context<Self>) {
        self.load(ctx);
    }
}

/// The registrations in the replicated store, each call within the registry's request timeout.
#[derive(Clone)]
struct Records {
    client: Client,
    budget: Duration,
}

impl Records {
    /// Proposes `cmd`; a command the store refused is an error.
    async fn propose(&self, cmd: Command) -> Result<ApplyResult, RegistryError> {
        let r = self
            .client
            .propose(KV_GROUP, cmd, self.budget, Route::Leader)
            .await?
            .value;
        match r.error {
            Some(e) => Err(RegistryError::Unavailable(e.to_string())),
            None => Ok(r),
        }
    }

    /// The stored value of `key`, from this member's state or (`linearizable`) the leader's.
    async fn get(
        &self,
        key: Vec<u8>,
        linearizable: bool,
    ) -> Result<Option<KeyValue>, RegistryError> {
        let a = self
            .client
            .read(
                KV_GROUP,
                Query::Get(key),
                linearizable,
                self.budget,
                Route::Leader,
            )
            .await?;
        Ok(a.value.kvs.into_iter().next())
    }

    /// Revokes `lease`, best effort: a lease left behind expires by itself.
    async fn revoke(&self, lease: i64) {
        let _ = self
            .propose(Command::LeaseRevoke {
                id: lease,
                expired: false,
            })
            .await;
    }
}

/// Refuses to replace registration `id` unless `owner` made it (a replacement takes over the
/// identity and ends the old registration: only its owner may do that). One nobody owns (made
/// with auth off, or before owners were recorded) may be replaced by anyone.
async fn owned_by(store: &Records, id: &str, owner: &str) -> Result<(), RegistryError> {
    let theirs = store
        .get(client_key(id), false)
        .await?
        .and_then(|kv| Registration::decode(&kv.value, kv.lease))
        .map(|r| r.owner);
    match theirs {
        Some(theirs) if !theirs.is_empty() && theirs != owner => Err(RegistryError::Denied(format!(
            "client_name: this identity (namespace, client_name, instance_id) is registered as {} by another caller; only its owner may replace it",
            echo(id)
        ))),
        _ => Ok(()),
    }
}

/// Writes a registration: a lease, then the record and the identity under it in one
/// transaction that also deletes the registration it replaces; then the replaced one's lease is
/// revoked. On failure the new lease is revoked, taking with it whatever was written.
async fn write_registration(
    store: Records,
    settings: Arc<RegistrySettings>,
    req: RegisterRequest,
) -> Result<Registered, RegistryError> {
    let interval = settings.interval;
    let ttl = settings.lease_ttl_secs(interval);
    let lease = store
        .propose(Command::LeaseGrant {
            id: 0,
            ttl_secs: ttl,
        })
        .await?
        .lease;
    let written = async {
        for attempt in 0..5 {
            let record = Registration {
                client_id: new_client_id(),
                client_name: req.client_name.clone(),
                client_version: req.client_version.clone(),
                namespace: req.namespace.clone(),
                instance_id: req.instance_id.clone(),
                metadata: req.metadata.clone(),
                registered_at_ms: req
                    .registered_at_ms
                    .unwrap_or_else(|| crate::clock::precise_ms() as i64),
                interval_ms: interval.as_millis() as u64,
                lease,
                registered_by: settings.member_id,
                owner: req.owner.clone(),
            };
            let identity = record.identity_key();
            // Local first (cheap); the compare below catches a stale answer, and a retry reads
            // through the leader.
            let old = store.get(identity.clone(), attempt > 0).await?;
            let replaced = old
                .as_ref()
                .and_then(|o| String::from_utf8(o.value.clone()).ok());
            if let (Some(old_id), false) = (&replaced, req.replace_any) {
                owned_by(&store, old_id, &req.owner).await?;
            }
            let mut success = vec![
                Op::Put {
                    key: record.key(),
                    value: record.encode(),
                    lease,
                },
                Op::Put {
                    key: identity.clone(),
                    value: record.client_id.clone().into_bytes(),
                    lease,
                },
            ];
            if let Some(old_id) = &replaced {
                success.push(Op::Delete {
                    key: client_key(old_id),
                    prefix: false,
                });
            }
            let compares = vec![
                Compare {
                    key: identity,
                    cmp: Cmp::Equal,
                    target: Target::ModRevision(old.as_ref().map_or(0, |o| o.mod_revision)),
                },
                Compare {
                    key: record.key(),
                    cmp: Cmp::Equal,
                    target: Target::CreateRevision(0),
                },
            ];
            let r = store
                .propose(Command::Txn {
                    compares,
                    success,
                    failure: Vec::new(),
                })
                .await?;
            if !r.succeeded {
                continue;
            }
            if let Some(old_lease) = old.map(|o| o.lease).filter(|l| *l != 0 && *l != lease) {
                // Nothing of the old registration is left on it; revoking just ends it early.
                store.revoke(old_lease).await;
            }
            return Ok(Registered {
                record,
                replaced,
                interval,
                ttl: Duration::from_secs(ttl as u64),
                revision: r.revision,
            });
        }
        Err(RegistryError::Unavailable(
            "other registrations of the same identity kept racing this one; retry".into(),
        ))
    }
    .await;
    if written.is_err() {
        store.revoke(lease).await;
    }
    written
}

impl Handler<Register> for RegistryIndex {
    type Result = ResponseActFuture<Self, Result<Registered, RegistryError>>;

    fn handle(&mut self, msg: Register, _: &mut Context<Self>) -> Self::Result {
        if let Err(e) = msg.0.validate() {
            return Box::pin(actix::fut::ready(Err(RegistryError::Invalid(e))));
        }
        let write = write_registration(self.store.clone(), self.settings.clone(), msg.0);
        Box::pin(write.into_actor(self).then(|res, act, ctx| {
            let started = res.as_ref().ok().and_then(|reg| {
                act.metrics.registrations.inc();
                if let Some(old) = &reg.replaced {
                    act.remove(old, false);
                }
                // Answer once the actor runs, so the client's first heartbeat here finds it;
                // unless the watch already saw this registration come and go (replaced by a
                // retry through another member, say): it must not be brought back.
                act.current(&reg.record.client_id, reg.revision)
                    .then(|| act.ensure(reg.record.clone(), true, ctx))
            });
            async move {
                if let Some(rx) = started {
                    let _ = rx.await;
                }
                res
            }
            .into_actor(act)
        }))
    }
}

impl Handler<Unregister> for RegistryIndex {
    type Result = ResponseActFuture<Self, Result<bool, RegistryError>>;

    fn handle(&mut self, msg: Unregister, _: &mut Context<Self>) -> Self::Result {
        let id = msg.0;
        let known = self.records.get(&id).map(|r| r.lease);
        let store = self.store.clone();
        let key = client_key(&id);
        let work = async move {
            let lease = match known {
                Some(l) => l,
                None => match store.get(key, true).await? {
                    Some(kv) => kv.lease,
                    None => return Ok(false),
                },
            };
            let revoke = Command::LeaseRevoke {
                id: lease,
                expired: false,
            };
            let r = store
                .client
                .propose(KV_GROUP, revoke, store.budget, Route::Leader)
                .await?;
            Ok(r.value.error.is_none())
        };
        Box::pin(work.into_actor(self).map(move |res, act, _| {
            if matches!(res, Ok(true)) {
                act.remove(&id, false);
            }
            res
        }))
    }
}

impl Handler<List> for RegistryIndex {
    type Result = Vec<(Arc<Registration>, Option<ClientEntry>)>;

    fn handle(&mut self, msg: List, _: &mut Context<Self>) -> Self::Result {
        let table = self.table.read().unwrap();
        self.records
            .values()
            .filter(|r| msg.namespace.is_empty() || r.namespace == msg.namespace)
            .filter(|r| msg.client_name.is_empty() || r.client_name == msg.client_name)
            .map(|r| (r.clone(), table.get(&r.client_id).cloned()))
            .collect()
    }
}

impl Handler<Resolve> for RegistryIndex {
    type Result = ResponseActFuture<Self, Result<Option<ClientEntry>, RegistryError>>;

    fn handle(&mut self, msg: Resolve, ctx: &mut Context<Self>) -> Self::Result {
        let id = msg.0;
        if let Some(record) = self.records.get(&id) {
            let rx = self.ensure((**record).clone(), false, ctx);
            return Box::pin(async move { Ok(rx.await.ok().flatten()) }.into_actor(self));
        }
        let store = self.store.clone();
        let key = client_key(&id);
        let read = async move {
            let a = store
                .client
                .read(KV_GROUP, Query::Get(key), true, store.budget, Route::Leader)
                .await?;
            Ok::<_, RegistryError>(a.value)
        };
        Box::pin(read.into_actor(self).then(|res, act, ctx| {
            let found = res.map(|answer| {
                answer
                    .kvs
                    .first()
                    .and_then(|kv| Registration::decode(&kv.value, kv.lease))
                    .filter(|r| act.current(&r.client_id, answer.revision))
                    .map(|r| act.ensure(r, false, ctx))
            });
            async move {
                match found? {
                    Some(rx) => Ok(rx.await.ok().flatten()),
                    None => Ok(None),
                }
            }
            .into_actor(act)
        }))
    }
}

/// How callers (the gRPC adapters) reach the registry: the index for writes and lookups, and
/// the client actors directly for heartbeats and job slots.
#[derive(Clone)]
pub struct RegistryHandle {
    index: ActorRef<RegistryIndex>,
    table: ClientTable,
}

impl RegistryHandle {
    /// A handle on `index`, whose client actors are published in `table`.
    pub fn new(index: ActorRef<RegistryIndex>, table: ClientTable) -> Self {
        Self { index, table }
    }

    async fn client(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<Option<ClientEntry>, RegistryError> {
        if let Some(r) = self.table.read().unwrap().get(id).cloned() {
            return Ok(Some(r));
        }
        self.index
            .send_timeout(Resolve(id.to_string()), timeout)
            .await?
    }

    /// Registers a client.
    pub async fn register(
        &self,
        req: RegisterRequest,
        timeout: Duration,
    ) -> Result<Registered, RegistryError> {
        self.index.send_timeout(Register(req), timeout).await?
    }

    /// A heartbeat of `client_id`.
    pub async fn heartbeat(
        &self,
        client_id: &str,
        client_name: &str,
        timeout: Duration,
    ) -> Result<BeatAnswer, RegistryError> {
        let unknown = || {
            BeatAnswer::ReRegister(format!(
                "client_id: {} is not registered (unknown, expired or replaced); register again",
                echo(client_id)
            ))
        };
        let Some(client) = self.client(client_id, timeout).await? else {
            return Ok(unknown());
        };
        // Most heartbeats need no lease renewal: answered here, without the actor's thread.
        if let Some(answer) = client.shared.beat_if_fresh(client_name) {
            return Ok(answer);
        }
        let beat = Beat {
            client_name: client_name.to_string(),
        };
        match client.actor.send_timeout(beat, timeout).await {
            Ok(answer) => answer,
            // Stopped between the lookup and the call: the registration just ended.
            Err(crate::SendError::NotRunning | crate::SendError::Closed) => Ok(unknown()),
            Err(e) => Err(e.into()),
        }
    }

    /// Who made registration `client_id`, as this member knows it (`None`: not known here).
    pub async fn owner_of(
        &self,
        client_id: &str,
        timeout: Duration,
    ) -> Result<Option<String>, RegistryError> {
        Ok(self
            .client(client_id, timeout)
            .await?
            .map(|c| c.shared.owner().to_string()))
    }

    /// Ends a registration; whether there was one.
    pub async fn unregister(
        &self,
        client_id: &str,
        timeout: Duration,
    ) -> Result<bool, RegistryError> {
        self.index
            .send_timeout(Unregister(client_id.to_string()), timeout)
            .await?
    }

    /// One registration as this member sees it.
    pub async fn get(
        &self,
        client_id: &str,
        timeout: Duration,
    ) -> Result<ClientView, RegistryError> {
        let not_found =
            || RegistryError::NotFound(format!("client_id: {} is not registered", echo(client_id)));
        let client = self
            .client(client_id, timeout)
            .await?
            .ok_or_else(not_found)?;
        client
            .actor
            .send_timeout(GetView, timeout)
            .await
            .map_err(|e| match e {
                crate::SendError::NotRunning | crate::SendError::Closed => not_found(),
                e => e.into(),
            })
    }

    /// Registrations matching the filter (empty strings match all), as this member sees them.
    pub async fn list(
        &self,
        namespace: &str,
        client_name: &str,
        timeout: Duration,
    ) -> Result<Vec<ClientView>, RegistryError> {
        let found = self
            .index
            .send_timeout(
                List {
                    namespace: namespace.to_string(),
                    client_name: client_name.to_string(),
                },
                timeout,
            )
            .await?;
        let mut views = Vec::with_capacity(found.len());
        for (record, actor) in found {
            let live = match &actor {
                Some(a) => a.actor.send_timeout(GetView, timeout).await.ok(),
                None => None,
            };
            views.push(live.unwrap_or_else(|| ClientView {
                interval: record.interval(),
                record: (*record).clone(),
                last_heartbeat: None,
                missed: 0,
                jobs_in_flight: 0,
                jobs_queued: 0,
                beats: 0,
            }));
        }
        Ok(views)
    }

    /// A translation job slot of `client_id` (waiting in its queue if need be).
    pub async fn acquire_job(
        &self,
        client_id: &str,
        timeout: Duration,
    ) -> Result<JobPermit, RegistryError> {
        let not_found = || {
            RegistryError::NotFound(format!(
                "client_id: {} is not registered; register before translating",
                echo(client_id)
            ))
        };
        let client = self
            .client(client_id, timeout)
            .await?
            .ok_or_else(not_found)?;
        let started = std::time::Instant::now();
        let no_slot = || {
            RegistryError::Exhausted(format!(
                "client {}: no translation slot freed up before the deadline",
                echo(client_id)
            ))
        };
        let (queued, slot) = oneshot::channel();
        match client
            .actor
            .send_timeout(AcquireJob { queued }, timeout)
            .await
        {
            Ok(Ok(Some(permit))) => Ok(permit),
            // Queued: wait here, so that giving up (a dropped call) closes the receiver and
            // frees the place in the queue.
            Ok(Ok(None)) => {
                match tokio::time::timeout(timeout.saturating_sub(started.elapsed()), slot).await {
                    Ok(Ok(permit)) => Ok(permit),
                    Ok(Err(_)) => Err(RegistryError::Unavailable(
                        "the client's actor restarted while the job was queued; retry".into(),
                    )),
                    Err(_) => Err(no_slot()),
                }
            }
            Ok(Err(e)) => Err(e),
            Err(crate::SendError::NotRunning | crate::SendError::Closed) => Err(not_found()),
            Err(crate::SendError::Timeout) => Err(no_slot()),
            Err(e) => Err(e.into()),
        }
    }
}
