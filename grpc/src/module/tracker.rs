//! The connections a module is serving: admission (rate limits and `max_connections`), the
//! counters its stats are made of, and closing the oldest ones when the balancer asks it to shed
//! load.
//!
//! The data path holds one [`ConnectionGuard`] per connection. Ids grow in admission order, so
//! "the oldest N" is the first N of an ordered map. Each guard can be told to close through its
//! own `watch` channel; the forwarder waits on [`ConnectionGuard::shed`] next to its copy loop.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use super::limits::RateLimits;

/// Why a new connection was refused; it is closed at once and counted in `errors_total`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Over the module's `*` rate limit (the message says which window).
    RateLimited(String),
    /// `max_connections` are open already.
    AtCapacity { max: u32 },
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::RateLimited(m) => f.write_str(m),
            Refused::AtCapacity { max } => write!(f, "at max_connections ({max})"),
        }
    }
}

/// One open connection as the tracker sees it.
struct Open {
    shed: watch::Sender<bool>,
    shedding: bool,
}

/// Cumulative counters, read together for a stats sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub active: u64,
    pub total: u64,
    pub closed: u64,
    pub requests: u64,
    pub queued: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub errors: u64,
    pub latency_us_sum: u64,
    pub latency_samples: u64,
    pub shed: u64,
}

struct Inner {
    next_id: AtomicU64,
    // A std mutex: held to add, remove or pick entries, never across an await.
    open: Mutex<BTreeMap<u64, Open>>,
    /// The number of open connections, so that a drain can wait for zero.
    active: watch::Sender<u64>,
    total: AtomicU64,
    closed: AtomicU64,
    requests: AtomicU64,
    queued: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    errors: AtomicU64,
    latency_us_sum: AtomicU64,
    latency_samples: AtomicU64,
    shed: AtomicU64,
    max_connections: AtomicU32,
    limits: Arc<RateLimits>,
}

/// The module's connections; cheap to clone (all clones are the same tracker).
#[derive(Clone)]
pub struct ConnectionTracker {
    inner: Arc<Inner>,
}

impl ConnectionTracker {
    /// A tracker admitting at most `max_connections` at once (0: no limit) under `limits`.
    pub fn new(max_connections: u32, limits: Arc<RateLimits>) -> Self {
        let (active, _) = watch::channel(0);
        ConnectionTracker {
            inner: Arc::new(Inner {
                next_id: AtomicU64::new(1),
                open: Mutex::new(BTreeMap::new()),
                active,
                total: AtomicU64::new(0),
                closed: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                queued: AtomicU64::new(0),
                bytes_in: AtomicU64::new(0),
                bytes_out: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                latency_us_sum: AtomicU64::new(0),
                latency_samples: AtomicU64::new(0),
                shed: AtomicU64::new(0),
                max_connections: AtomicU32::new(max_connections),
                limits,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Open>> {
        self.inner.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a new connection, or says why not (counted as an error). The rate limit is checked
    /// before the capacity, so a refused connection never holds a place.
    pub fn admit(&self) -> Result<ConnectionGuard, Refused> {
        if let Err(m) = self.inner.limits.admit() {
            self.record_error();
            return Err(Refused::RateLimited(m));
        }
        let mut open = self.lock();
        let max = self.inner.max_connections.load(Ordering::Relaxed);
        if max > 0 && open.len() as u64 >= u64::from(max) {
            drop(open);
            self.record_error();
            return Err(Refused::AtCapacity { max });
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (shed, shed_rx) = watch::channel(false);
        open.insert(
            id,
            Open {
                shed,
                shedding: false,
            },
        );
        self.inner.active.send_replace(open.len() as u64);
        drop(open);
        self.inner.total.fetch_add(1, Ordering::Relaxed);
        self.inner.requests.fetch_add(1, Ordering::Relaxed);
        self.inner.queued.fetch_add(1, Ordering::Relaxed);
        Ok(ConnectionGuard {
            id,
            tracker: self.clone(),
            opened: Instant::now(),
            established: false,
            shed: shed_rx,
        })
    }

    /// Asks the `n` oldest connections not already asked to close; answers how many were asked.
    pub fn shed_oldest(&self, n: u64) -> u64 {
        let mut asked = 0;
        let mut open = self.lock();
        for o in open.values_mut().filter(|o| !o.shedding) {
            if asked == n {
                break;
            }
            o.shedding = true;
            o.shed.send_replace(true);
            asked += 1;
        }
        drop(open);
        self.inner.shed.fetch_add(asked, Ordering::Relaxed);
        asked
    }

    /// The ids of the open connections, oldest first.
    pub fn open_ids(&self) -> Vec<u64> {
        self.lock().keys().copied().collect()
    }

    /// Open connections now.
    pub fn active(&self) -> u64 {
        *self.inner.active.borrow()
    }

    /// A receiver of the open-connection count, for waiting on it.
    pub fn watch_active(&self) -> watch::Receiver<u64> {
        self.inner.active.subscribe()
    }

    /// Waits until no connection is open, at most `timeout`; whether that happened.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let mut rx = self.inner.active.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The connection limit (0: none).
    pub fn max_connections(&self) -> u32 {
        self.inner.max_connections.load(Ordering::Relaxed)
    }

    /// Changes the connection limit; open connections above it are left alone.
    pub fn set_max_connections(&self, max: u32) {
        self.inner.max_connections.store(max, Ordering::Relaxed);
    }

    /// Counts a failure the module saw (a backend that refused, a broken stream...).
    pub fn record_error(&self) {
        self.inner.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `n` requests beyond the one each admitted connection counts for (for modules
    /// that serve several requests on one connection).
    pub fn record_requests(&self, n: u64) {
        self.inner.requests.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one latency sample (see [`ConnectionGuard::established`]).
    pub fn record_latency(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.inner.latency_us_sum.fetch_add(us, Ordering::Relaxed);
        self.inner.latency_samples.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn counters(&self) -> Counters {
        let i = &self.inner;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            active: self.active(),
            total: get(&i.total),
            closed: get(&i.closed),
            requests: get(&i.requests),
            queued: get(&i.queued),
            bytes_in: get(&i.bytes_in),
            bytes_out: get(&i.bytes_out),
            errors: get(&i.errors),
            latency_us_sum: get(&i.latency_us_sum),
            latency_samples: get(&i.latency_samples),
            shed: get(&i.shed),
        }
    }
}

/// One admitted connection: open (counted active) until dropped.
///
/// It starts *queued* (admitted, not yet serving: for a proxy, still connecting to its
/// backend); [`ConnectionGuard::established`] ends that and records the wait as the connection's
/// latency.
pub struct ConnectionGuard {
    id: u64,
    tracker: ConnectionTracker,
    opened: Instant,
    established: bool,
    shed: watch::Receiver<bool>,
}

impl ConnectionGuard {
    /// The connection's id: larger is newer.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// When it was admitted.
    pub fn opened(&self) -> Instant {
        self.opened
    }

    /// The connection is now served (for a proxy: the backend accepted). Records the time since
    /// admission as a latency sample; later calls do nothing.
    pub fn established(&mut self) {
        if self.established {
            return;
        }
        self.established = true;
        self.tracker.inner.queued.fetch_sub(1, Ordering::Relaxed);
        self.tracker.record_latency(self.opened.elapsed());
    }

    /// Counts a failure on this connection.
    pub fn record_error(&self) {
        self.tracker.record_error();
    }

    /// Counts bytes received from the client.
    pub fn add_bytes_in(&self, n: u64) {
        self.tracker.inner.bytes_in.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts bytes sent to the client.
    pub fn add_bytes_out(&self, n: u64) {
        self.tracker.inner.bytes_out.fetch_add(n, Ordering::Relaxed);
    }

    /// Whether the tracker asked this connection to close.
    pub fn is_shed(&self) -> bool {
        *self.shed.borrow()
    }

    /// Resolves once the tracker asks this connection to close (shedding load); the data path
    /// should then close it.
    pub fn shed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.shed.clone();
        async move {
            // An error means the tracker's entry is gone, which only happens when the guard
            // drops; then there is nothing left to close.
            if rx.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// `stream` with its traffic counted as this module's bytes in (read from it) and out
    /// (written to it) as it flows, so that stats are current for long connections too.
    pub fn counted<S>(&self, stream: S) -> Counted<S> {
        Counted {
            inner: stream,
            tracker: self.tracker.clone(),
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let t = &self.tracker.inner;
        if !self.established {
            t.queued.fetch_sub(1, Ordering::Relaxed);
        }
        let mut open = self.tracker.lock();
        open.remove(&self.id);
        t.closed.fetch_add(1, Ordering::Relaxed);
        t.active.send_replace(open.len() as u64);
    }
}

/// A client stream whose bytes are counted by the tracker (see [`ConnectionGuard::counted`]).
pub struct Counted<S> {
    inner: S,
    tracker: ConnectionTracker,
}

impl<S> Counted<S> {
    /// The stream itself.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let n = (buf.filled().len() - before) as u64;
            self.tracker.inner.bytes_in.fetch_add(n, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.tracker
                .inner
                .bytes_out
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::balancer::RateLimit;

    fn tracker(max: u32) -> ConnectionTracker {
        ConnectionTracker::new(max, Arc::new(RateLimits::default()))
    }

    #[test]
    fn guards_count_while_they_live() {
        let t = tracker(0);
        let a = t.admit().unwrap();
        let mut b = t.admit().unwrap();
        assert!(b.id() > a.id());
        let c = t.counters();
        assert_eq!((c.active, c.total, c.queued, c.requests), (2, 2, 2, 2));
        b.established();
        b.established();
        let c = t.counters();
        assert_eq!((c.queued, c.latency_samples), (1, 1));
        drop(a);
        drop(b);
        let c = t.counters();
        assert_eq!((c.active, c.total, c.closed, c.queued), (0, 2, 2, 0));
    }

    #[tokio::test]
    async fn shedding_closes_the_oldest_first() {
        let t = tracker(0);
        let guards: Vec<ConnectionGuard> = (0..4).map(|_| t.admit().unwrap()).collect();
        assert_eq!(t.shed_oldest(2), 2);
        let shed: Vec<bool> = guards.iter().map(|g| g.is_shed()).collect();
        assert_eq!(shed, [true, true, false, false]);
        // Those asked already are not asked again: the next two are.
        assert_eq!(t.shed_oldest(1), 1);
        assert!(guards[2].is_shed() && !guards[3].is_shed());
        // The future resolves for a shed guard.
        tokio::time::timeout(Duration::from_secs(5), guards[0].shed())
            .await
            .unwrap();
        // Asking for more than are left asks the rest.
        assert_eq!(t.shed_oldest(10), 1);
        assert_eq!(t.shed_oldest(10), 0);
        assert_eq!(t.counters().shed, 4);
    }

    #[test]
    fn capacity_and_rate_limits_refuse_and_count_errors() {
        let t = tracker(2);
        let a = t.admit().unwrap();
        let _b = t.admit().unwrap();
        assert_eq!(t.admit().err(), Some(Refused::AtCapacity { max: 2 }));
        drop(a);
        let _c = t.admit().unwrap();
        assert_eq!(t.counters().errors, 1);
        t.set_max_connections(0);
        let _d = t.admit().unwrap();

        let limits = Arc::new(RateLimits::default());
        limits
            .set(Some(&RateLimit {
                target: "*".into(),
                requests_per_second: 1,
                ..Default::default()
            }))
            .unwrap();
        let t = ConnectionTracker::new(0, limits);
        let _a = t.admit().unwrap();
        assert!(matches!(t.admit(), Err(Refused::RateLimited(_))));
        assert_eq!(t.counters().errors, 1);
        assert_eq!(t.active(), 1);
    }

    #[tokio::test]
    async fn wait_idle_waits_for_the_last_guard() {
        let t = tracker(0);
        let g = t.admit().unwrap();
        assert!(!t.wait_idle(Duration::from_millis(20)).await);
        let waiter = tokio::spawn({
            let t = t.clone();
            async move { t.wait_idle(Duration::from_secs(20)).await }
        });
        drop(g);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test]
    async fn counted_streams_count_both_ways() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let t = tracker(0);
        let g = t.admit().unwrap();
        let (a, mut b) = tokio::io::duplex(64);
        let mut a = g.counted(a);
        a.write_all(b"hello").await.unwrap();
        b.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        a.read_exact(&mut buf).await.unwrap();
        let c = t.counters();
        assert_eq!((c.bytes_in, c.bytes_out), (2, 5));
    }
}
