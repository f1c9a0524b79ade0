//! `/node/router/hub`: the member's session table, its owner records and the agents' listen
//! streams.
//!
//! A side names a session key; the hub answers where the session runs ([`Route`]): here (creating
//! the session actor after claiming the key in the replicated store), or on the member that
//! claimed it first, to which the adapter relays the call. Agents listen for the sessions of their
//! workflow: sessions created here are offered at once, sessions created on other members when
//! their owner record arrives through the store's watch.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::{
    Actor, ActorFutureExt, AsyncContext, Context, Handler, Message, ResponseFuture, StreamHandler,
    WrapFuture,
};
use slog::{debug, info, warn};
use tokio::sync::{mpsc, oneshot};

use super::metrics::RouterMetrics;
use super::owner::{Claim, OwnerEvent, OwnerRecord, OwnerStore};
use super::session::{EventSink, SessionActor, SessionEvent};
use super::{actor_name, handles_generic, OpKind, Operation, Payload, RouterError, RouterSettings};
use crate::supervision::{AddChild, ChildSpec, Managed, Restart, StopChild, Supervisor};
use crate::ActorRef;

/// The sessions running on this member, by key; adapters read it without a hop to the hub.
pub type SessionTable<T> = Arc<RwLock<HashMap<String, ActorRef<SessionActor<T>>>>>;

/// Where a session runs.
pub enum Route<T: Payload> {
    /// On this member.
    Local(ActorRef<SessionActor<T>>),
    /// On another member, which claimed the key first.
    Remote { owner: u64 },
}

/// Finds or creates the session a side asks for.
#[derive(Message)]
#[rtype(result = "Result<Route<T>, RouterError>")]
pub struct Locate<T: Payload> {
    pub session_key: String,
    pub workflow_id: String,
    /// The user's request (users only): recorded, and offered to agents.
    pub operation: Option<Operation>,
    /// The call was relayed here by another member: never send it elsewhere again.
    pub relayed: bool,
    pub _frames: PhantomData<fn() -> T>,
}

/// A session an agent should join.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    pub session_key: String,
    pub workflow_id: String,
    pub operation: OpKind,
}

/// Registers an agent's listen stream.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Listen {
    pub workflow_id: String,
    pub tx: mpsc::Sender<Offer>,
}

/// Where an existing session is.
#[derive(Message)]
#[rtype(result = "Result<Found<T>, RouterError>")]
pub struct Lookup<T: Payload> {
    pub session_key: String,
    pub _frames: PhantomData<fn() -> T>,
}

/// What [`Lookup`] answers.
pub enum Found<T: Payload> {
    Local(ActorRef<SessionActor<T>>),
    Remote(OwnerRecord),
    Missing,
}

/// Sessions of a workflow (all if empty): those running here, and the records of the others.
#[derive(Message)]
#[rtype(result = "Result<Listing<T>, RouterError>")]
pub struct List<T: Payload> {
    pub workflow_id: String,
    pub _frames: PhantomData<fn() -> T>,
}

/// What [`List`] answers.
pub struct Listing<T: Payload> {
    pub local: Vec<ActorRef<SessionActor<T>>>,
    pub remote: Vec<OwnerRecord>,
}

/// A session's event, tagged with the session's generation so that a late event of an earlier
/// session of the same key changes nothing.
#[derive(Message)]
#[rtype(result = "()")]
struct Changed {
    generation: u64,
    event: SessionEvent,
}

type Waiter<T> = oneshot::Sender<Result<Route<T>, RouterError>>;

/// Bound on offers queued for one agent's listen stream.
pub const OFFER_QUEUE: usize = 256;

/// The hub of one member.
pub struct RouterHub<T: Payload> {
    settings: Arc<RouterSettings>,
    store: Arc<dyn OwnerStore>,
    sessions: ActorRef<Supervisor>,
    table: SessionTable<T>,
    /// The generation of each running session.
    generations: HashMap<String, u64>,
    next_generation: u64,
    /// Owner records of the sessions running here.
    records: HashMap<String, OwnerRecord>,
    /// Locates waiting for a claim under way, by key.
    /// (Each waiter with whether its call was relayed here.)
    claiming: HashMap<String, Vec<(Waiter<T>, bool)>>,
    /// Locates waiting for the owner lease.
    parked: Vec<(Locate<T>, Waiter<T>)>,
    lease: Option<i64>,
    listeners: HashMap<String, Vec<mpsc::Sender<Offer>>>,
    /// Sessions here a user waits in, not yet joined by an agent.
    open_offers: HashMap<String, Offer>,
    metrics: RouterMetrics,
    log: slog::Logger,
}

impl<T: Payload> RouterHub<T> {
    /// A hub creating sessions under `sessions` and listing them in `table`.
    pub fn new(
        settings: Arc<RouterSettings>,
        store: Arc<dyn OwnerStore>,
        sessions: ActorRef<Supervisor>,
        table: SessionTable<T>,
        metrics: RouterMetrics,
        log: &slog::Logger,
    ) -> Self {
        Self {
            settings,
            store,
            sessions,
            table,
            generations: HashMap::new(),
            next_generation: 0,
            records: HashMap::new(),
            claiming: HashMap::new(),
            parked: Vec::new(),
            lease: None,
            listeners: HashMap::new(),
            open_offers: HashMap::new(),
            metrics,
            log: log.new(slog::o!("actor" => "router-hub")),
        }
    }

    fn me(&self) -> u64 {
        self.settings.member_id
    }

    fn acquire_lease(&mut self, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let (ttl, timeout) = (self.settings.owner_lease_ttl, self.settings.request_timeout);
        ctx.spawn(
            async move { store.grant(ttl, timeout).await }
                .into_actor(self)
                .map(|granted, act, ctx| match granted {
                    Ok(lease) => {
                        debug!(act.log, "owner lease granted"; "lease" => lease);
                        act.lease = Some(lease);
                        act.rewrite_records(lease, ctx);
                        for (locate, waiter) in std::mem::take(&mut act.parked) {
                            act.locate(locate, waiter, ctx);
                        }
                        let every = act.settings.owner_lease_ttl / 3;
                        ctx.run_later(every, move |act, ctx| act.renew(lease, ctx));
                    }
                    Err(e) => {
                        debug!(act.log, "no owner lease yet"; "error" => %e);
                        ctx.run_later(Duration::from_millis(200), |act, ctx| {
                            act.acquire_lease(ctx)
                        });
                    }
                }),
        );
    }

    fn renew(&mut self, lease: i64, ctx: &mut Context<Self>) {
        if self.lease != Some(lease) {
            return;
        }
        let store = self.store.clone();
        let timeout = self.settings.request_timeout;
        ctx.spawn(
            async move { store.renew(lease, timeout).await }
                .into_actor(self)
                .map(move |renewed, act, ctx| match renewed {
                    Ok(true) => {
                        let every = act.settings.owner_lease_ttl / 3;
                        ctx.run_later(every, move |act, ctx| act.renew(lease, ctx));
                    }
                    Ok(false) => {
                        warn!(act.log, "the owner lease expired; taking a new one and rewriting the records"; "lease" => lease);
                        act.lease = None;
                        act.acquire_lease(ctx);
                    }
                    Err(e) => {
                        debug!(act.log, "owner lease renewal failed; retrying"; "error" => %e);
                        ctx.run_later(Duration::from_millis(500), move |act, ctx| {
                            act.renew(lease, ctx)
                        });
                    }
                }),
        );
    }

    /// Claims the running sessions' keys again under a new lease (the old one expired, taking
    /// the records with it). A key another member claimed meanwhile is theirs: the session here
    /// ends, rather than two members owning one key.
    fn rewrite_records(&mut self, lease: i64, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let records: Vec<OwnerRecord> = self.records.values().cloned().collect();
        let (me, timeout) = (self.me(), self.settings.request_timeout);
        ctx.spawn(
            async move {
                let mut lost = Vec::new();
                for r in records {
                    let claimed = match store.claim(r.clone(), lease, timeout).await {
                        Ok(Claim::Held(held)) if held.owner == me => {
                            store.take_over(r.clone(), held, lease, timeout).await
                        }
                        other => other,
                    };
                    match claimed {
                        Ok(Claim::Won) => {}
                        Ok(Claim::Held(held)) => lost.push((r.session_key, held.owner)),
                        // Tried again at the next renewal failure; the lease keeps the rest.
                        Err(_) => {}
                    }
                }
                lost
            }
            .into_actor(self)
            .map(|lost, act, _| {
                for (key, owner) in lost {
                    warn!(act.log, "a session's key was claimed by another member while this one's lease had lapsed; ending it here"; "session_key" => &key, "owner" => owner);
                    act.records.remove(&key);
                    if let Some(s) = act.table.read().unwrap().get(&key).cloned() {
                        actix::spawn(async move {
                            let _ = s
                                .send(super::session::Terminate {
                                    reason: format!(
                                        "member {owner} owns the session now (this member lost its lease)"
                                    ),
                                })
                                .await;
                        });
                    }
                }
            }),
        );
    }

    fn watch(&mut self, ctx: &mut Context<Self>) {
        let (tx, rx) = mpsc::channel(1024);
        let store = self.store.clone();
        ctx.spawn(async move { store.watch(tx).await }.into_actor(self).map(
            move |started, act, ctx| match started {
                Ok(()) => {
                    ctx.add_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
                }
                Err(e) => {
                    debug!(act.log, "cannot watch owner records yet"; "error" => %e);
                    ctx.run_later(Duration::from_millis(500), |act, ctx| act.watch(ctx));
                }
            },
        ));
    }

    fn locate(&mut self, msg: Locate<T>, waiter: Waiter<T>, ctx: &mut Context<Self>) {
        if let Some(r) = self.table.read().unwrap().get(&msg.session_key) {
            let _ = waiter.send(Ok(Route::Local(r.clone())));
            return;
        }
        if let Some(w) = self.claiming.get_mut(&msg.session_key) {
            w.push((waiter, msg.relayed));
            return;
        }
        let Some(lease) = self.lease else {
            // Served once the lease is granted; the caller's deadline bounds the wait.
            self.parked.retain(|(_, w)| !w.is_closed());
            self.parked.push((msg, waiter));
            return;
        };
        let key = msg.session_key.clone();
        self.claiming
            .insert(key.clone(), vec![(waiter, msg.relayed)]);
        let record = OwnerRecord {
            session_key: key.clone(),
            workflow_id: msg.workflow_id,
            owner: self.me(),
            operation: msg.operation,
            created_at_ms: crate::clock::precise_ms(),
        };
        let store = self.store.clone();
        let timeout = self.settings.request_timeout;
        let me = self.me();
        let claim = {
            let record = record.clone();
            async move {
                match store.claim(record.clone(), lease, timeout).await? {
                    Claim::Won => Ok(None),
                    // Ours, left by a session that just ended here: take it again (unless
                    // someone else did first).
                    Claim::Held(held) if held.owner == me => {
                        match store
                            .take_over(record.clone(), held, lease, timeout)
                            .await?
                        {
                            Claim::Won => Ok(None),
                            Claim::Held(other) if other.owner == me => {
                                Err(RouterError::Unavailable(format!(
                                    "session {}: its record changed while claiming; retry",
                                    record.session_key
                                )))
                            }
                            Claim::Held(other) => Ok(Some(other)),
                        }
                    }
                    Claim::Held(held) => Ok(Some(held)),
                }
            }
        };
        ctx.spawn(
            claim
                .into_actor(self)
                .map(move |claimed, act, ctx| match claimed {
                    Ok(None) => act.start_session(record, ctx),
                    // Every waiter is sent to the owner, except those relayed here already.
                    Ok(Some(held)) => act.resolve_with(&key, |relayed| {
                        if relayed {
                            Err(RouterError::Unavailable(format!(
                                "session {key} is owned by member {} but was relayed here; retry",
                                held.owner
                            )))
                        } else {
                            Ok(Route::Remote { owner: held.owner })
                        }
                    }),
                    Err(e) => act.fail_waiters(&key, e),
                }),
        );
    }

    fn fail_waiters(&mut self, key: &str, e: RouterError) {
        self.resolve_with(key, |_| Err(e.clone()));
    }

    /// Answers every waiter of `key`; `answer` is given whether the waiter's call was relayed.
    fn resolve_with(&mut self, key: &str, answer: impl Fn(bool) -> Result<Route<T>, RouterError>) {
        for (w, relayed) in self.claiming.remove(key).unwrap_or_default() {
            let _ = w.send(answer(relayed));
        }
    }

    fn start_session(&mut self, record: OwnerRecord, ctx: &mut Context<Self>) {
        let key = record.session_key.clone();
        self.next_generation += 1;
        let generation = self.next_generation;
        let r: ActorRef<SessionActor<T>> = ActorRef::default();
        let addr = ctx.address();
        let events: EventSink = Arc::new(move |event| addr.do_send(Changed { generation, event }));
        let spec = || {
            let (key, workflow) = (key.clone(), record.workflow_id.clone());
            let (settings, metrics, events) =
                (self.settings.clone(), self.metrics.clone(), events.clone());
            ChildSpec::actor_for(actor_name(&key), &r, move || {
                SessionActor::new(
                    key.clone(),
                    workflow.clone(),
                    settings.clone(),
                    metrics.clone(),
                    events.clone(),
                )
            })
            .restart(Restart::Temporary)
        };
        let (first, again) = (spec(), spec());
        let sessions = self.sessions.clone();
        let name = actor_name(&key);
        // Bounded: a start that never answers must not leave the key claimed here for good.
        let timeout = self.settings.request_timeout;
        let start = async move {
            match sessions.send_timeout(AddChild(first), timeout).await {
                Ok(Ok(_)) => true,
                Ok(Err(_)) => {
                    // The previous session of this key is still stopping: replace it.
                    let _ = sessions.send_timeout(StopChild { name }, timeout).await;
                    matches!(
                        sessions.send_timeout(AddChild(again), timeout).await,
                        Ok(Ok(_))
                    )
                }
                Err(_) => false,
            }
        };
        ctx.spawn(start.into_actor(self).map(move |started, act, _| {
            if !started {
                warn!(act.log, "session actor did not start"; "session_key" => &key);
                act.records.insert(key.clone(), record);
                act.forget_record(&key);
                act.fail_waiters(
                    &key,
                    RouterError::Unavailable(format!(
                        "session {key}: its actor did not start; retry"
                    )),
                );
                return;
            }
            act.table.write().unwrap().insert(key.clone(), r.clone());
            act.generations.insert(key.clone(), generation);
            if let Some(op) = &record.operation {
                let offer = Offer {
                    session_key: key.clone(),
                    workflow_id: record.workflow_id.clone(),
                    operation: op.kind,
                };
                act.offer(&offer);
                act.open_offers.insert(key.clone(), offer);
            }
            act.records.insert(key.clone(), record);
            act.resolve_with(&key, |_| Ok(Route::Local(r.clone())));
        }));
    }

    fn forget_record(&mut self, key: &str) {
        let Some(record) = self.records.remove(key) else {
            return;
        };
        let store = self.store.clone();
        let (timeout, log) = (self.settings.request_timeout, self.log.clone());
        // Best effort: the lease removes it anyway if this fails. Only this exact record goes, so
        // a late release cannot remove a newer claim of the key.
        actix::spawn(async move {
            let key = record.session_key.clone();
            if let Err(e) = store.release(record, timeout).await {
                debug!(log, "cannot delete an owner record"; "session_key" => key, "error" => %e);
            }
        });
    }

    fn offer(&mut self, offer: &Offer) {
        let Some(listeners) = self.listeners.get_mut(&offer.workflow_id) else {
            return;
        };
        listeners.retain(|l| match l.try_send(offer.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!(self.log, "an agent's offer queue is full; offer dropped"; "session_key" => &offer.session_key);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        if listeners.is_empty() {
            self.listeners.remove(&offer.workflow_id);
        }
    }
}

impl<T: Payload> Actor for RouterHub<T> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // A restarted hub starts with no sessions: its supervisor restarted them all with it.
        self.table.write().unwrap().clear();
        self.acquire_lease(ctx);
        self.watch(ctx);
        info!(self.log, "router hub started"; "member" => self.me());
    }
}

impl<T: Payload> Managed for RouterHub<T> {
    const KIND: &'static str = "router-hub";

    fn dump_state(&self) -> serde_json::Value {
        let listeners: HashMap<&String, usize> =
            self.listeners.iter().map(|(w, l)| (w, l.len())).collect();
        serde_json::json!({
            "sessions": self.records.len(),
            "claims_in_flight": self.claiming.len(),
            "waiting_for_lease": self.parked.len(),
            "owner_lease": self.lease,
            "listeners": listeners,
            "open_offers": self.open_offers.len(),
        })
    }
}

impl<T: Payload> Handler<Locate<T>> for RouterHub<T> {
    type Result = ResponseFuture<Result<Route<T>, RouterError>>;

    fn handle(&mut self, msg: Locate<T>, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.locate(msg, tx, ctx);
        Box::pin(async move {
            rx.await.unwrap_or_else(|_| {
                Err(RouterError::Unavailable(
                    "router hub restarted; retry".into(),
                ))
            })
        })
    }
}

impl<T: Payload> Handler<Listen> for RouterHub<T> {
    type Result = ();

    fn handle(&mut self, msg: Listen, ctx: &mut Context<Self>) {
        for offer in self.open_offers.values() {
            if offer.workflow_id == msg.workflow_id {
                let _ = msg.tx.try_send(offer.clone());
            }
        }
        // Sessions on other members that may still wait for an agent: an agent that was not
        // listening when they were created still gets them (a paired one answers ALREADY_EXISTS).
        let store = self.store.clone();
        let (me, workflow, tx) = (self.me(), msg.workflow_id.clone(), msg.tx.clone());
        ctx.spawn(
            async move {
                if let Ok(records) = store.list().await {
                    for r in records {
                        if let (true, Some(op)) =
                            (r.owner != me && r.workflow_id == workflow, &r.operation)
                        {
                            let _ = tx.try_send(Offer {
                                session_key: r.session_key.clone(),
                                workflow_id: r.workflow_id.clone(),
                                operation: op.kind,
                            });
                        }
                    }
                }
            }
            .into_actor(self),
        );
        self.listeners
            .entry(msg.workflow_id)
            .or_default()
            .push(msg.tx);
    }
}

impl<T: Payload> Handler<Lookup<T>> for RouterHub<T> {
    type Result = ResponseFuture<Result<Found<T>, RouterError>>;

    fn handle(&mut self, msg: Lookup<T>, _: &mut Context<Self>) -> Self::Result {
        if let Some(r) = self.table.read().unwrap().get(&msg.session_key) {
            let r = r.clone();
            return Box::pin(async move { Ok(Found::Local(r)) });
        }
        let store = self.store.clone();
        let (me, timeout) = (self.me(), self.settings.request_timeout);
        Box::pin(async move {
            Ok(match store.get(msg.session_key, timeout).await? {
                Some(r) if r.owner != me => Found::Remote(r),
                _ => Found::Missing,
            })
        })
    }
}

impl<T: Payload> Handler<List<T>> for RouterHub<T> {
    type Result = ResponseFuture<Result<Listing<T>, RouterError>>;

    fn handle(&mut self, msg: List<T>, _: &mut Context<Self>) -> Self::Result {
        let local: Vec<_> = {
            let table = self.table.read().unwrap();
            self.records
                .values()
                .filter(|r| msg.workflow_id.is_empty() || r.workflow_id == msg.workflow_id)
                .filter_map(|r| table.get(&r.session_key).cloned())
                .collect()
        };
        let store = self.store.clone();
        let me = self.me();
        Box::pin(async move {
            let remote = store
                .list()
                .await?
                .into_iter()
                .filter(|r| r.owner != me)
                .filter(|r| msg.workflow_id.is_empty() || r.workflow_id == msg.workflow_id)
                .collect();
            Ok(Listing { local, remote })
        })
    }
}

impl<T: Payload> Handler<Changed> for RouterHub<T> {
    type Result = ();

    fn handle(&mut self, msg: Changed, _: &mut Context<Self>) {
        match msg.event {
            SessionEvent::Paired(key) => {
                self.open_offers.remove(&key);
            }
            SessionEvent::Ended(key) => {
                if self.generations.get(&key) != Some(&msg.generation) {
                    return;
                }
                self.generations.remove(&key);
                self.open_offers.remove(&key);
                self.table.write().unwrap().remove(&key);
                self.forget_record(&key);
            }
        }
    }
}

impl<T: Payload> StreamHandler<OwnerEvent> for RouterHub<T> {
    fn handle(&mut self, ev: OwnerEvent, _: &mut Context<Self>) {
        if let OwnerEvent::Put(r) = ev {
            if let (true, Some(op)) = (r.owner != self.me(), &r.operation) {
                let offer = Offer {
                    session_key: r.session_key.clone(),
                    workflow_id: r.workflow_id.clone(),
                    operation: op.kind,
                };
                self.offer(&offer);
            }
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        // The store's watch ended (a restart of the raft member, say): watch again.
        ctx.run_later(Duration::from_millis(200), |act, ctx| act.watch(ctx));
    }
}

handles_generic!(RouterHub: Locate<T>, Listen, Lookup<T>, List<T>);
