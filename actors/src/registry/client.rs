//! One actor per registration, under `/node/registry/clients/<client_id>`: what this member sees
//! of a client (its heartbeats here, translation jobs running here) and the per-client limits.
//!
//! The registration itself is replicated; this actor is a view of it plus local live state, and
//! every member runs one per registration, so a client may heartbeat any member. A heartbeat
//! renews the registration's lease through the leader, at most once per half interval: a client
//! that beats more often than asked is answered from memory, which keeps heartbeats cheap without
//! letting the lease run short (it lasts `max_misses` intervals).

use std::collections::VecDeque;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

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

/// Asks for a translation job slot: granted now, after a wait in the bounded queue, or refused.
#[derive(Message)]
#[rtype(result = "Result<JobPermit, RegistryError>")]
pub struct AcquireJob;

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
    record: Registration,
    settings: Arc<RegistrySettings>,
    keeper: Arc<dyn LeaseKeeper>,
    metrics: RegistryMetrics,
    last_beat: Option<(Instant, SystemTime)>,
    beats: u64,
    /// When the lease was last renewed by this actor (or granted, for a registration made here).
    renewed_at: Option<Instant>,
    /// Heartbeats waiting for the renewal under way.
    renewing: Option<Vec<oneshot::Sender<Result<(), RaftError>>>>,
    running: usize,
    queue: VecDeque<oneshot::Sender<JobPermit>>,
    /// Created on the first job: most clients never send one.
    limiter: Option<DefaultDirectRateLimiter>,
}

impl ClientActor {
    /// The actor of `record`; `fresh` when its lease was just granted here.
    pub fn new(
        record: Registration,
        fresh: bool,
        settings: Arc<RegistrySettings>,
        keeper: Arc<dyn LeaseKeeper>,
        metrics: RegistryMetrics,
    ) -> Self {
        Self {
            record,
            settings,
            keeper,
            metrics,
            last_beat: None,
            beats: 0,
            renewed_at: fresh.then(Instant::now),
            renewing: None,
            running: 0,
            queue: VecDeque::new(),
            limiter: None,
        }
    }

    /// The interval to hand out: the configured one, unless it is longer than the registration's
    /// lease allows (the lease was sized for the interval granted at registration).
    fn interval(&self) -> Duration {
        self.settings.interval.min(self.record.interval())
    }

    fn view(&self) -> ClientView {
        let interval = self.interval();
        let missed = self.last_beat.map_or(0, |(at, _)| {
            (at.elapsed().as_millis() / interval.as_millis().max(1)) as u32
        });
        ClientView {
            record: self.record.clone(),
            last_heartbeat: self.last_beat.map(|(_, t)| t),
            missed,
            jobs_in_flight: self.running,
            jobs_queued: self.queue.len(),
            beats: self.beats,
            interval,
        }
    }

    fn renew(&mut self, ctx: &mut Context<Self>) -> oneshot::Receiver<Result<(), RaftError>> {
        let (tx, rx) = oneshot::channel();
        if let Some(waiters) = &mut self.renewing {
            waiters.push(tx);
            return rx;
        }
        self.renewing = Some(vec![tx]);
        let started = Instant::now();
        let fut = self
            .keeper
            .renew(self.record.lease, self.settings.request_timeout);
        ctx.spawn(fut.into_actor(self).map(move |res, act, _| {
            if res.is_ok() {
                act.renewed_at = Some(started);
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
        serde_json::json!({
            "client_id": v.record.client_id,
            "client_name": v.record.client_name,
            "namespace": v.record.namespace,
            "version": v.record.client_version,
            "instance_id": v.record.instance_id,
            "lease": v.record.lease,
            "interval_ms": v.interval.as_millis() as u64,
            "beats_here": v.beats,
            "last_heartbeat_ms_ago": self.last_beat.map(|(at, _)| at.elapsed().as_millis() as u64),
            "missed": v.missed,
            "lease_renewed_ms_ago": self.renewed_at.map(|at| at.elapsed().as_millis() as u64),
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
                "client_name: {:?} does not match the registration ({:?}); register again",
                msg.client_name, self.record.client_name
            );
            return Box::pin(async move { Ok(BeatAnswer::ReRegister(why)) });
        }
        self.last_beat = Some((Instant::now(), SystemTime::now()));
        self.beats += 1;
        let interval = self.interval();
        if self
            .renewed_at
            .is_some_and(|at| at.elapsed() < interval / 2)
        {
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
    type Result = ResponseFuture<Result<JobPermit, RegistryError>>;

    fn handle(&mut self, _: AcquireJob, ctx: &mut Context<Self>) -> Self::Result {
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
            return Box::pin(async move { Err(RegistryError::Exhausted(msg)) });
        }
        if self.running < s.max_jobs {
            let permit = self.grant(ctx);
            return Box::pin(async move { Ok(permit) });
        }
        if self.queue.len() >= s.queue {
            self.metrics.rejected("client_concurrency");
            let msg = format!(
                "client {}: {} translation jobs running and {} queued, the most allowed; retry later",
                self.record.client_id, self.running, self.queue.len()
            );
            return Box::pin(async move { Err(RegistryError::Exhausted(msg)) });
        }
        let (tx, rx) = oneshot::channel();
        self.queue.push_back(tx);
        Box::pin(async move {
            rx.await.map_err(|_| {
                RegistryError::Unavailable(
                    "the client's actor restarted while the job was queued; retry".into(),
                )
            })
        })
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
