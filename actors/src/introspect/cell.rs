//! The per-actor record behind introspection and control.

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::Waker;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::histogram::LatencyHistogram;
use crate::clock;

/// Where an actor is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Lifecycle {
    /// Being constructed or started.
    Starting = 0,
    /// Handling messages.
    Running = 1,
    /// Failed and waiting out its backoff before the supervisor starts it again.
    Restarting = 2,
    /// Asked to stop; not yet gone.
    Stopping = 3,
    /// Stopped on purpose and not coming back unless restarted by hand.
    Stopped = 4,
    /// Failed and not restarted (restart policy or an escalation).
    Failed = 5,
}

impl Lifecycle {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Starting,
            1 => Self::Running,
            2 => Self::Restarting,
            3 => Self::Stopping,
            4 => Self::Stopped,
            _ => Self::Failed,
        }
    }

    /// Lower-case name, as shown by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Restarting => "restarting",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }
}

/// Why an actor last failed, and when.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Failure {
    /// Panic message or failure reason.
    pub reason: String,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// Requests for the running incarnation, served by its control item on the actor's own thread.
#[derive(Default)]
pub(crate) struct Control {
    pub incarnation: u64,
    pub waker: Option<Waker>,
    pub stop: bool,
    pub dumps: Vec<oneshot::Sender<serde_json::Value>>,
    /// Set by an actor that stops because it failed (supervisors escalating), read at exit.
    pub failure: Option<String>,
    /// Set by an actor that defers its start acknowledgement, once it is ready.
    pub ready: bool,
}

/// Live statistics and control of one actor path. Survives restarts of the actor at that path, so
/// counters such as `restarts` and `messages_handled` accumulate over incarnations.
pub struct ActorCell {
    path: Arc<str>,
    kind: &'static str,
    parent: Option<Arc<str>>,
    state: AtomicU8,
    queued: AtomicI64,
    handled: AtomicU64,
    restarts: AtomicU32,
    started_at_ms: AtomicU64,
    last_activity_ms: AtomicU64,
    latency: OnceLock<Box<LatencyHistogram>>,
    last_failure: Mutex<Option<Box<Failure>>>,
    pub(crate) control: Mutex<Control>,
    rate: Mutex<RateSample>,
}

#[derive(Default)]
struct RateSample {
    handled: u64,
    at: Option<Instant>,
    per_sec: f64,
}

/// One message in eight is timed: reading the clock twice per message would cost more than the
/// small handlers being measured, and a 1-in-8 sample gives the same quantiles.
const LATENCY_SAMPLE_MASK: u64 = 7;
/// A message rate is recomputed at most this often, from the counts seen by the previous query.
const RATE_WINDOW: Duration = Duration::from_secs(1);

impl ActorCell {
    /// A new cell in the `Starting` state.
    pub fn new(path: Arc<str>, kind: &'static str, parent: Option<Arc<str>>) -> Self {
        Self {
            path,
            kind,
            parent,
            state: AtomicU8::new(Lifecycle::Starting as u8),
            queued: AtomicI64::new(0),
            handled: AtomicU64::new(0),
            restarts: AtomicU32::new(0),
            started_at_ms: AtomicU64::new(0),
            last_activity_ms: AtomicU64::new(0),
            latency: OnceLock::new(),
            last_failure: Mutex::new(None),
            control: Mutex::new(Control::default()),
            rate: Mutex::new(RateSample::default()),
        }
    }

    /// The actor's path, e.g. `/node/admin`.
    pub fn path(&self) -> &Arc<str> {
        &self.path
    }

    /// The actor's kind, e.g. `supervisor`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Path of the supervising actor; `None` for the root.
    pub fn parent(&self) -> Option<&Arc<str>> {
        self.parent.as_ref()
    }

    /// Current lifecycle state.
    pub fn state(&self) -> Lifecycle {
        Lifecycle::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub(crate) fn set_state(&self, s: Lifecycle) {
        self.state.store(s as u8, Ordering::Relaxed);
    }

    /// Messages sent to the actor and not yet handled (or dropped).
    pub fn queue_len(&self) -> u64 {
        self.queued.load(Ordering::Relaxed).max(0) as u64
    }

    /// Messages handled over all incarnations.
    pub fn messages_handled(&self) -> u64 {
        self.handled.load(Ordering::Relaxed)
    }

    /// Restarts by the supervisor, automatic or requested.
    pub fn restarts(&self) -> u32 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// When the current incarnation started (ms since the epoch; 0 if never).
    pub fn started_at_ms(&self) -> u64 {
        self.started_at_ms.load(Ordering::Relaxed)
    }

    /// When the actor last handled a message (ms since the epoch; 0 if never).
    pub fn last_activity_ms(&self) -> u64 {
        self.last_activity_ms.load(Ordering::Relaxed)
    }

    /// The latest failure, if any.
    pub fn last_failure(&self) -> Option<Failure> {
        lock(&self.last_failure).as_deref().cloned()
    }

    /// Handler latency quantile in microseconds.
    pub fn latency_us(&self, q: f64) -> Option<f64> {
        self.latency.get().and_then(|h| h.quantile_us(q))
    }

    /// Messages per second since the previous query (at most one window per second); the
    /// lifetime average on the first query.
    pub fn message_rate(&self) -> f64 {
        let handled = self.messages_handled();
        let now = Instant::now();
        let mut s = lock(&self.rate);
        match s.at {
            None => {
                let started = self.started_at_ms();
                let age_s = clock::now_ms().saturating_sub(started) as f64 / 1000.0;
                s.per_sec = if started > 0 && age_s > 0.0 {
                    handled as f64 / age_s
                } else {
                    0.0
                };
                s.at = Some(now);
                s.handled = handled;
            }
            Some(at) if now.duration_since(at) >= RATE_WINDOW => {
                let dt = now.duration_since(at).as_secs_f64();
                s.per_sec = handled.saturating_sub(s.handled) as f64 / dt;
                s.at = Some(now);
                s.handled = handled;
            }
            Some(_) => {}
        }
        s.per_sec
    }

    pub(crate) fn lock_control(&self) -> MutexGuard<'_, Control> {
        lock(&self.control)
    }

    pub(crate) fn enqueued(&self) {
        self.queued.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn dequeued(&self) {
        self.queued.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts a handled message; returns whether this one should be timed.
    #[inline]
    pub(crate) fn begin_handling(&self) -> bool {
        self.handled.fetch_add(1, Ordering::Relaxed) & LATENCY_SAMPLE_MASK == 0
    }

    #[inline]
    pub(crate) fn end_handling(&self, elapsed: Option<Duration>) {
        self.last_activity_ms
            .store(clock::now_ms(), Ordering::Relaxed);
        if let Some(e) = elapsed {
            self.latency.get_or_init(Default::default).record(e);
        }
    }

    pub(crate) fn record_failure(&self, reason: String) {
        *lock(&self.last_failure) = Some(Box::new(Failure {
            reason,
            at_ms: clock::precise_ms(),
        }));
    }

    pub(crate) fn count_restart(&self) -> u32 {
        self.restarts.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Prepares the control block for a new incarnation and marks it started.
    pub(crate) fn begin_incarnation(&self, incarnation: u64) {
        let mut c = self.lock_control();
        // Pending dump requests of the old incarnation are answered with "gone" by being dropped.
        *c = Control {
            incarnation,
            ..Control::default()
        };
        drop(c);
        self.started_at_ms
            .store(clock::precise_ms(), Ordering::Relaxed);
    }

    /// Asks the running incarnation to stop. actix serves a context's items after its mailbox, so
    /// the stop takes effect once the messages already queued have been handled (the supervisor's
    /// shutdown timeout bounds that wait).
    pub(crate) fn request_stop(&self) {
        let mut c = self.lock_control();
        c.stop = true;
        if let Some(w) = c.waker.take() {
            w.wake();
        }
    }

    /// Asks the live incarnation for its state dump; `None` when there is none (stopped, failed,
    /// or waiting out a restart backoff), since nobody would answer.
    pub fn request_dump(&self) -> Option<oneshot::Receiver<serde_json::Value>> {
        if matches!(
            self.state(),
            Lifecycle::Stopped | Lifecycle::Failed | Lifecycle::Restarting
        ) {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        let mut c = self.lock_control();
        c.dumps.push(tx);
        if let Some(w) = c.waker.take() {
            w.wake();
        }
        Some(rx)
    }

    /// Declares incarnation `incarnation` ready (for actors that defer their start acknowledgement);
    /// a no-op if a newer incarnation has begun.
    pub(crate) fn mark_ready(&self, incarnation: u64) {
        let mut c = self.lock_control();
        if c.incarnation != incarnation {
            return;
        }
        c.ready = true;
        if let Some(w) = c.waker.take() {
            w.wake();
        }
    }

    /// Marks incarnation `incarnation` as failing with `reason`; it is expected to stop next.
    pub(crate) fn set_exit_failure(&self, incarnation: u64, reason: String) {
        let mut c = self.lock_control();
        if c.incarnation == incarnation {
            c.failure = Some(reason);
        }
    }
}

/// Locks ignoring poison: these mutexes guard plain data that a panic cannot leave half-written,
/// and the panic path itself needs them.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
