//! One actor per registration, under `/node/registry/clients/<client_id>`: what this member sees
//! of a client (its heartbeats here, translation jobs running here) and the per-client limits.
//!
//! The registration itself is replicated; this actor is a view of it plus local live state, and
//! every member runs one per registration, so a client may heartbeat any member. A heartbeat
//! renews the registration's lease through the leader, at most once per half interval: a client
//! that beats more often than asked is answered from memory, which keeps heartbeats cheap without
//! letting the lease run short (it lasts `max_misses` intervals).
//!
//! The heartbeat figures live in [`ClientShared`], atomics shared by the actor and the registry's
//! table: a heartbeat that needs no renewal is recorded and answered on the caller's thread
//! ([`ClientShared::beat_if_fresh`]) without a round trip to the actor's thread; one that needs a
//! renewal goes to the actor, which runs (and coalesces) renewals.

use std::collections::VecDeque;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::{
    Actor, ActorFutureExt, Addr, AsyncContext, Context, Handler, Message, ResponseFuture,
    WrapFuture,
};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Serialize;
use tokio::sync::oneshot;

use super::metrics::RegistryMetrics;
use super::record::Registration;
use super::RegistryError;
use crate::cluster::raft::RaftError;
use crate::supervision::Managed;

/// Renews a lease through the leader, wherever it is. The node implements it with its raft
/// member and, on a follower, a call to the leader.
pub trait LeaseKeeper: Send + Sync + 'static {
    /// Renews `lease`; `NotFound` when it expired or was revoked.
    fn renew(
        &self,
        lease: i64,
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<(), RaftError>> + Send>>;
}

/// The store client renews on the KV group's leader, wherever it is.
impl LeaseKeeper for crate::cluster::client::Client {
    fn renew(
        &self,
        lease: i64,
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<(), RaftError>> + Send>> {
        let client = self.clone();
        Box::pin(async move {
            client
                .keep_alive(crate::cluster::client::KV_GROUP, lease, timeout)
                .await
                .map(drop)
                .map_err(|e| e.into_raft())
        })
    }
}

/// What every client actor of a node shares.
#[derive(Clone, Debug)]
pub struct RegistrySettings {
    /// This member's raft id.
    pub member_id: u64,
    /// The heartbeat interval handed to clients.
    pub interval: Duration,
    /// Intervals without a heartbeat before a registration expires.
    pub max_misses: u32,
    /// Translation jobs one client may run at once on this member.
    pub max_jobs: usize,
    /// Jobs of one client that may wait for a slot; more are refused.
    pub queue: usize,
    /// Translation requests one client may start per second, and in a burst.
    pub rate_per_second: u32,
    pub rate_burst: u32,
    /// Bound on a lease renewal or a replicated write.
    pub request_timeout: Duration,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            member_id: 1,
            interval: Duration::from_secs(60),
            max_misses: 3,
            max_jobs: 4,
            queue: 16,
            rate_per_second: 10,
            rate_burst: 20,
            request_timeout: Duration::from_secs(5),
        }
    }
}

impl RegistrySettings {
    /// The lease TTL of a registration granted `interval`: `max_misses` intervals, rounded up to
    /// whole seconds (leases count seconds).
    pub fn lease_ttl_secs(&self, interval: Duration) -> i64 {
        let ms = interval.as_millis() as u64 * u64::from(self.max_misses.max(1));
        (ms.div_ceil(1000)).max(1) as i64
    }
}

/// The answer to a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BeatAnswer {
    /// Accepted; beat again after `interval`.
    Alive { interval: Duration },
    /// Not accepted: register again (the reason says why).
    ReRegister(String),
}

/// Milliseconds on a monotonic clock local to the process, from 1 (0 means "never").
fn mono_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// The live figures of one registration on this member, shared by its actor and the registry's
/// table so that most heartbeats are answered without a message to the actor.
#[derive(Debug)]
pub struct ClientShared {
    client_name: String,
    /// Who made the registration (see `Registration::owner`).
    owner: String,
    /// The interval handed out (fixed for the registration's life on this member).
    interval_ms: u64,
    /// When this member last renewed the lease ([`mono_ms`]; 0: not since it knows the client).
    renewed_at: AtomicU64,
    /// Its last heartbeat here ([`mono_ms`] and Unix milliseconds; 0: none yet).
    last_beat: AtomicU64,
    last_beat_unix_ms: AtomicU64,
    beats: AtomicU64,
}

impl ClientShared {
    /// The figures of `record` with `settings`; `fresh` when its lease was just granted here.
    pub fn new(record: &Registration, settings: &RegistrySettings, fresh: bool) -> Self {
        // The configured interval, unless it is longer than the registration's lease allows
        // (the lease was sized for the interval granted at registration).
        let interval = settings.interval.min(record.interval());
        Self {
            client_name: record.client_name.clone(),
            owner: record.owner.clone(),
            interval_ms: (interval.as_millis() as u64).max(1),
            renewed_at: AtomicU64::new(if fresh { mono_ms() } else { 0 }),
            last_beat: AtomicU64::new(0),
            last_beat_unix_ms: AtomicU64::new(0),
            beats: AtomicU64::new(0),
        }
    }

    /// Who made the registration.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The interval handed to the client.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    fn record_beat(&self) {
        self.last_beat.store(mono_ms(), Ordering::Relaxed);
        // The coarse clock: reading the system clock on every heartbeat is not worth it for a
        // figure people read.
        self.last_beat_unix_ms
            .store(crate::clock::now_ms(), Ordering::Relaxed);
        self.beats.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the lease was renewed within the last half interval.
    fn fresh(&self) -> bool {
        let at = self.renewed_at.load(Ordering::Relaxed);
        at != 0 && mono_ms().saturating_sub(at) < self.interval_ms / 2
    }

    /// Records and accepts a heartbeat when no renewal is due and the name matches; `None`
    /// means the actor must handle it ([`Beat`]).
    pub fn beat_if_fresh(&self, client_name: &str) -> Option<BeatAnswer> {
        if !(client_name.is_empty() || client_name == self.client_name) || !self.fresh() {
            return None;
        }
        self.record_beat();
        Some(BeatAnswer::Alive {
            interval: self.interval(),
        })
    }
}

/// A heartbeat reaching this member.
#[derive(Message)]
#[rtype(result = "Result<BeatAnswer, RegistryError>")]
pub struct Beat {
    /// If not empty, must match the registration.
    pub client_name: String,
}

/// What this member knows of a registration.
#[derive(Clone, Debug, Serialize, actix::MessageResponse)]
pub struct ClientView {
    pub record: Registration,
    /// Its last heartbeat reaching this member.
    pub last_heartbeat: Option<SystemTime>,
    /// Whole intervals since then.
    pub missed: u32,
    pub jobs_in_flight: usize,
    pub jobs_queued: usize,
    /// Heartbeats received here.
    pub beats: u64,
    /// The interval this member hands the client now.
    pub interval: Duration,
}

/// Asks for the [`ClientView`].
#[derive(Message)]
#[rtype(result = "ClientView")]
pub struct GetView;

/// Asks for a translation job slot: granted now (`Some`), queued (`None`: the slot arrives on
/// `queued` later), or refused. The caller owns the receiving end, so a caller that gives up
/// closes it and its place in the queue is skipped.
#[derive(Message)]
#[rtype(result = "Result<Option<JobPermit>, RegistryError>")]
pub struct AcquireJob {
    pub queued: oneshot::Sender<JobPermit>,
}

/// A job slot; dropping it frees the slot (also when it was granted to a caller that gave up).
pub struct JobPermit {
    client: Option<Addr<ClientActor>>,
}

impl Drop for JobPermit {
    fn drop(&mut self) {
        if let Some(a) = self.client.take() {
            // Unbounded on purpose: a freed slot must never be lost to a full mailbox.
            a.do_send(JobDone);
        }
    }
}

/// A job finished (sent by [`JobPermit`]'s drop).
#[derive(Message)]
#[rtype(result = "()")]
struct JobDone;

crate::handles!(ClientActor: Beat, GetView, AcquireJob);

/// The live side of one registration.
pub struct ClientActor {
    record: Arc<Registration>,
    shared: Arc<ClientShared>,
    settings: Arc<RegistrySettings>,
    keeper: Arc<dyn LeaseKeeper>,
    metrics: Arc<RegistryMetrics>,
    /// Heartbeats waiting for the renewal under way.
    renewing: Option<Vec<oneshot::Sender<Result<(), RaftError>>>>,
    running: usize,
    queue: VecDeque<oneshot::Sender<JobPermit>>,
    /// Created on the first job: most clients never send one.
    limiter: Option<DefaultDirectRateLimiter>,
}

impl ClientActor {
    /// The actor of `record`, whose live figures are `shared`.
    pub fn new(
        record: Arc<Registration>,
        shared: Arc<ClientShared>,
        settings: Arc<RegistrySettings>,
        keeper: Arc<dyn LeaseKeeper>,
        metrics: Arc<RegistryMetrics>,
    ) -> Self {
        Self {
            record,
            shared,
            settings,
            keeper,
            metrics,
            renewing: None,
            running: 0,
            queue: VecDeque::new(),
            limiter: None,
        }
    }

    fn view(&self) -> ClientView {
        let s = &self.shared;
        let last = s.last_beat.load(Ordering::Relaxed);
        let missed = if last == 0 {
            0
        } else {
            (mono_ms().saturating_sub(last) / s.interval_ms) as u32
        };
        let unix = s.last_beat_unix_ms.load(Ordering::Relaxed);
        ClientView {
            record: (*self.record).clone(),
            last_heartbeat: (unix != 0).then(|| UNIX_EPOCH + Duration::from_millis(unix)),
            missed,
            jobs_in_flight: self.running,
            jobs_queued: self.queue.iter().filter(|w| !w.is_closed()).count(),
            beats: s.beats.load(Ordering::Relaxed),
            interval: s.interval(),
        }
    }

    fn renew(&mut self, ctx: &mut Context<Self>) -> oneshot::Receiver<Result<(), RaftError>> {
        let (tx, rx) = oneshot::channel();
        if let Some(waiters) = &mut self.renewing {
            waiters.push(tx);
            return rx;
        }
        self.renewing = Some(vec![tx]);
        let started = mono_ms();
        let fut = self
            .keeper
            .renew(self.record.lease, self.settings.request_timeout);
        ctx.spawn(fut.into_actor(self).map(move |res, act, _| {
            if res.is_ok() {
                act.shared.renewed_at.store(started, Ordering::Relaxed);
            }
            for w in act.renewing.take().unwrap_or_default() {
                let _ = w.send(res.clone());
            }
        }));
        rx
    }

    fn grant(&mut self, ctx: &mut Context<Self>) -> JobPermit {
        self.running += 1;
        JobPermit {
            client: Some(ctx.address()),
        }
    }
}

impl Actor for ClientActor {
    type Context = Context<Self>;
}

impl Managed for ClientActor {
    const KIND: &'static str = "registry-client";

    fn dump_state(&self) -> serde_json::Value {
        let v = self.view();
        let ago = |at: u64| (at != 0).then(|| mono_ms().saturating_sub(at));
        serde_json::json!({
            "client_id": v.record.client_id,
            "client_name": v.record.client_name,
            "namespace": v.record.namespace,
            "version": v.record.client_version,
            "instance_id": v.record.instance_id,
            "lease": v.record.lease,
            "interval_ms": v.interval.as_millis() as u64,
            "beats_here": v.beats,
            "last_heartbeat_ms_ago": ago(self.shared.last_beat.load(Ordering::Relaxed)),
            "missed": v.missed,
            "lease_renewed_ms_ago": ago(self.shared.renewed_at.load(Ordering::Relaxed)),
            "jobs_in_flight": v.jobs_in_flight,
            "jobs_queued": v.jobs_queued,
        })
    }
}

impl Handler<Beat> for ClientActor {
    type Result = ResponseFuture<Result<BeatAnswer, RegistryError>>;

    fn handle(&mut self, msg: Beat, ctx: &mut Context<Self>) -> Self::Result {
        if !msg.client_name.is_empty() && msg.client_name != self.record.client_name {
            let why = format!(
                "client_name: {} does not match the registration ({}); register again",
                crate::quote::echo(&msg.client_name),
                crate::quote::echo(&self.record.client_name)
            );
            return Box::pin(async move { Ok(BeatAnswer::ReRegister(why)) });
        }
        self.shared.record_beat();
        let interval = self.shared.interval();
        if self.shared.fresh() {
            return Box::pin(async move { Ok(BeatAnswer::Alive { interval }) });
        }
        let renewal = self.renew(ctx);
        Box::pin(async move {
            match renewal.await {
                Ok(Ok(())) => Ok(BeatAnswer::Alive { interval }),
                Ok(Err(RaftError::NotFound(_))) => Ok(BeatAnswer::ReRegister(
                    "the registration expired; register again".into(),
                )),
                Ok(Err(e)) => Err(RegistryError::Raft(e)),
                Err(_) => Err(RegistryError::Unavailable(
                    "the registration's actor restarted during the heartbeat; retry".into(),
                )),
            }
        })
    }
}

impl Handler<GetView> for ClientActor {
    type Result = ClientView;

    fn handle(&mut self, _: GetView, _: &mut Context<Self>) -> ClientView {
        self.view()
    }
}

impl Handler<AcquireJob> for ClientActor {
    type Result = Result<Option<JobPermit>, RegistryError>;

    fn handle(&mut self, msg: AcquireJob, ctx: &mut Context<Self>) -> Self::Result {
        let s = &self.settings;
        let limiter = self.limiter.get_or_insert_with(|| {
            let rate = NonZeroU32::new(s.rate_per_second.max(1)).expect("at least 1");
            let burst = NonZeroU32::new(s.rate_burst.max(1)).expect("at least 1");
            RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
        });
        if limiter.check().is_err() {
            self.metrics.rejected("client_rate");
            let msg = format!(
                "client {}: more than {} translation requests per second (burst {}); slow down",
                self.record.client_id, s.rate_per_second, s.rate_burst
            );
            return Err(RegistryError::Exhausted(msg));
        }
        if self.running < s.max_jobs {
            return Ok(Some(self.grant(ctx)));
        }
        // Places of callers that gave up are free again.
        self.queue.retain(|waiting| !waiting.is_closed());
        if self.queue.len() >= s.queue {
            self.metrics.rejected("client_concurrency");
            let msg = format!(
                "client {}: {} translation jobs running and {} queued, the most allowed; retry later",
                self.record.client_id, self.running, self.queue.len()
            );
            return Err(RegistryError::Exhausted(msg));
        }
        self.queue.push_back(msg.queued);
        Ok(None)
    }
}

impl Handler<JobDone> for ClientActor {
    type Result = ();

    fn handle(&mut self, _: JobDone, ctx: &mut Context<Self>) {
        self.running = self.running.saturating_sub(1);
        while self.running < self.settings.max_jobs {
            let Some(next) = self.queue.pop_front() else {
                break;
            };
            if next.is_closed() {
                continue;
            }
            let permit = self.grant(ctx);
            // A caller that gave up in between hands the permit back through its drop.
            let _ = next.send(permit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(interval_ms: u64) -> Registration {
        Registration {
            client_id: "c-1".into(),
            client_name: "app".into(),
            client_version: "1".into(),
            namespace: "ns".into(),
            instance_id: String::new(),
            metadata: Default::default(),
            registered_at_ms: 0,
            interval_ms,
            lease: 7,
            registered_by: 1,
            owner: String::new(),
        }
    }

    #[test]
    fn a_heartbeat_is_answered_without_the_actor_only_while_the_lease_is_fresh() {
        let settings = RegistrySettings {
            interval: Duration::from_secs(60),
            ..Default::default()
        };
        let fresh = ClientShared::new(&record(60_000), &settings, true);
        assert_eq!(
            fresh.beat_if_fresh("app"),
            Some(BeatAnswer::Alive {
                interval: Duration::from_secs(60)
            })
        );
        assert!(fresh.beat_if_fresh("").is_some(), "the name is optional");
        assert_eq!(fresh.beats.load(Ordering::Relaxed), 2);
        // A different name goes to the actor, which asks the client to register again.
        assert_eq!(fresh.beat_if_fresh("other"), None);
        // Never renewed by this member (learned from the store): the actor renews first.
        let known = ClientShared::new(&record(60_000), &settings, false);
        assert_eq!(known.beat_if_fresh("app"), None);
        assert_eq!(known.beats.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_longer_configured_interval_waits_for_the_next_registration() {
        let settings = RegistrySettings {
            interval: Duration::from_secs(120),
            ..Default::default()
        };
        // The lease was sized for 30 s: the client keeps beating every 30 s.
        let shared = ClientShared::new(&record(30_000), &settings, true);
        assert_eq!(shared.interval(), Duration::from_secs(30));
        let shorter = RegistrySettings {
            interval: Duration::from_secs(10),
            ..Default::default()
        };
        assert_eq!(
            ClientShared::new(&record(30_000), &shorter, true).interval(),
            Duration::from_secs(10)
        );
        assert_eq!(settings.lease_ttl_secs(Duration::from_millis(500)), 2);
    }
}
