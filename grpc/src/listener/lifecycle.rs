//! How long a connection may stay without calls: until its first call, `server.handshake_timeout_ms`
//! (a socket that never speaks, or stops half-way through its TLS or HTTP/2 handshake, is closed);
//! after a call, `server.idle_timeout_ms` with none in flight. And when the node is at
//! `server.max_connections`, the connection that has waited longest without a call is closed to
//! make room for a new one, so idle sockets cannot shut out a client with work to do.
//!
//! A connection is closed by ending its byte stream (its reads see end of file): the HTTP/2
//! server then drops it. The calls in flight are what the [calls layer](crate::calls) counts.

use std::future::Future as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

/// What the listener and the calls layer share about one connection.
#[derive(Debug)]
pub struct ConnState {
    opened: Instant,
    /// Calls in flight on the connection.
    calls: AtomicUsize,
    /// Whether a call ever arrived (the handshakes are done).
    spoke: AtomicBool,
    /// When the last call ended, in milliseconds after `opened`.
    quiet_since_ms: AtomicU64,
    /// Set to close the connection at its next read.
    closing: AtomicBool,
    /// The connection's reader, woken when the deadline moves or the connection is closed.
    reader: Mutex<Option<Waker>>,
}

/// Why a connection's stream was ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// No call within the handshake timeout.
    Handshake,
    /// No call in flight for the idle timeout.
    Idle,
    /// Closed to make room at `server.max_connections`.
    Shed,
}

impl Ending {
    /// The label in `lodge_limit_rejections_total{limit}`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Handshake => "handshake_timeout",
            Self::Idle => "idle_timeout",
            Self::Shed => "connection_shed",
        }
    }
}

impl ConnState {
    /// A connection accepted now.
    pub fn new() -> Self {
        Self {
            opened: Instant::now(),
            calls: AtomicUsize::new(0),
            spoke: AtomicBool::new(false),
            quiet_since_ms: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            reader: Mutex::new(None),
        }
    }

    /// A call began on the connection.
    pub fn call_began(&self) {
        self.spoke.store(true, Ordering::Relaxed);
        self.calls.fetch_add(1, Ordering::SeqCst);
    }

    /// A call ended; the idle clock starts when none is left.
    pub fn call_ended(&self) {
        if self.calls.fetch_sub(1, Ordering::SeqCst) == 1 {
            let ms = self.opened.elapsed().as_millis() as u64;
            self.quiet_since_ms.store(ms, Ordering::Relaxed);
            self.wake_reader();
        }
    }

    /// Whether the connection has no call in flight, and since when it has been so (its
    /// opening, if no call ever came).
    pub(super) fn quiet_since(&self) -> Option<Instant> {
        if self.calls.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let ms = self.quiet_since_ms.load(Ordering::Relaxed);
        Some(self.opened + Duration::from_millis(ms))
    }

    /// Whether a call ever arrived.
    pub(super) fn spoke(&self) -> bool {
        self.spoke.load(Ordering::Relaxed)
    }

    /// Closes the connection at its next read (now, if it is waiting to read).
    pub(super) fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.wake_reader();
    }

    fn wake_reader(&self) {
        if let Some(w) = self.reader.lock().unwrap().take() {
            w.wake();
        }
    }
}

impl Default for ConnState {
    fn default() -> Self {
        Self::new()
    }
}

/// The timer of one connection, checked by its reader.
pub(super) struct Lifecycle {
    pub state: std::sync::Arc<ConnState>,
    pub handshake_timeout: Duration,
    /// `None`: idle connections are kept.
    pub idle_timeout: Option<Duration>,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Lifecycle {
    pub fn new(
        state: std::sync::Arc<ConnState>,
        handshake_timeout: Duration,
        idle_timeout: Option<Duration>,
    ) -> Self {
        let first = state.opened + handshake_timeout;
        Self {
            state,
            handshake_timeout,
            idle_timeout,
            timer: Box::pin(tokio::time::sleep_until(first)),
        }
    }

    /// Before a read: `Ready(ending)` if the connection must end now; otherwise arranges to be
    /// woken when that may change.
    pub fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<Ending> {
        let s = &self.state;
        {
            let mut reader = s.reader.lock().unwrap();
            if !reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *reader = Some(cx.waker().clone());
            }
        }
        if s.closing.load(Ordering::SeqCst) {
            return Poll::Ready(Ending::Shed);
        }
        let Some(quiet) = s.quiet_since() else {
            // A call is in flight: nothing to time; `call_ended` wakes us.
            return Poll::Pending;
        };
        let (deadline, ending) = if !s.spoke() {
            (s.opened + self.handshake_timeout, Ending::Handshake)
        } else if let Some(idle) = self.idle_timeout {
            (quiet + idle, Ending::Idle)
        } else {
            return Poll::Pending;
        };
        if Instant::now() >= deadline {
            return Poll::Ready(ending);
        }
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        // Registers the timer's wake-up; it has not fired (checked above).
        let _ = self.timer.as_mut().poll(cx);
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn poll(l: &mut Lifecycle) -> Poll<Ending> {
        l.poll_end(&mut Context::from_waker(Waker::noop()))
    }

    #[tokio::test(start_paused = true)]
    async fn silent_then_idle_then_shed() {
        let state = Arc::new(ConnState::new());
        let mut l = Lifecycle::new(
            state.clone(),
            Duration::from_secs(10),
            Some(Duration::from_secs(60)),
        );
        assert!(poll(&mut l).is_pending());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            poll(&mut l),
            Poll::Ready(Ending::Handshake),
            "no call in 10 s"
        );

        let state = Arc::new(ConnState::new());
        let mut l = Lifecycle::new(
            state.clone(),
            Duration::from_secs(10),
            Some(Duration::from_secs(60)),
        );
        state.call_began();
        // A call in flight (a watch, say) keeps the connection however long it lasts.
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(poll(&mut l).is_pending());
        state.call_ended();
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(poll(&mut l).is_pending());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(poll(&mut l), Poll::Ready(Ending::Idle));

        let state = Arc::new(ConnState::new());
        let mut l = Lifecycle::new(state.clone(), Duration::from_secs(10), None);
        state.call_began();
        state.call_ended();
        tokio::time::advance(Duration::from_secs(100_000)).await;
        assert!(poll(&mut l).is_pending(), "no idle timeout: kept");
        state.close();
        assert_eq!(poll(&mut l), Poll::Ready(Ending::Shed));
    }
}
