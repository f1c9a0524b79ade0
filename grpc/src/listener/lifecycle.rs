//! How long a connection may stay without calls: until its first call, `server.handshake_timeout_ms`
//! (a socket that never speaks, or stops half-way through its TLS or HTTP/2 handshake, is closed);
//! after a call, `server.idle_timeout_ms` with none in flight. And when the node is at
//! `server.max_connections`, the connection that has waited longest without a call is closed to
//! make room for a new one, so idle sockets cannot shut out a client with work to do.
//!
//! A connection is closed by ending its byte stream (its reads see end of file): the HTTP/2
//! server then drops it. The calls in flight are what the [calls layer](crate::calls) counts.

use std::collections::VecDeque;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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
    /// How the stream was ended, if it was (an [`Ending`] + 1; 0: not ended).
    ended: AtomicU8,
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
        Self::opened_at(Instant::now())
    }

    /// A connection accepted at `opened` (its handshake time counts from there).
    pub fn opened_at(opened: Instant) -> Self {
        Self {
            opened,
            calls: AtomicUsize::new(0),
            spoke: AtomicBool::new(false),
            quiet_since_ms: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            ended: AtomicU8::new(0),
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
    fn quiet_since(&self) -> Option<Instant> {
        if self.calls.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let ms = self.quiet_since_ms.load(Ordering::Relaxed);
        Some(self.opened + Duration::from_millis(ms))
    }

    /// Whether a call ever arrived.
    fn spoke(&self) -> bool {
        self.spoke.load(Ordering::Relaxed)
    }

    /// How the connection's stream was ended by its timers or by shedding, if it was.
    pub fn ending(&self) -> Option<Ending> {
        match self.ended.load(Ordering::SeqCst) {
            1 => Some(Ending::Handshake),
            2 => Some(Ending::Idle),
            3 => Some(Ending::Shed),
            _ => None,
        }
    }

    fn set_ending(&self, how: Ending) {
        let code = match how {
            Ending::Handshake => 1,
            Ending::Idle => 2,
            Ending::Shed => 3,
        };
        self.ended.store(code, Ordering::SeqCst);
    }

    /// Closes the connection at its next read (now, if it is waiting to read).
    fn close(&self) {
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
struct Lifecycle {
    state: Arc<ConnState>,
    handshake_timeout: Duration,
    /// `None`: idle connections are kept.
    idle_timeout: Option<Duration>,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Lifecycle {
    fn new(
        state: Arc<ConnState>,
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
    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<Ending> {
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

/// A byte stream that ends (reads see end of file) when its connection has been without calls
/// for too long, or is shed.
pub struct Watched<IO> {
    io: IO,
    life: Lifecycle,
    ended: Option<Ending>,
}

impl<IO> Watched<IO> {
    /// `io`, whose calls are counted in `state`: it must make its first call within
    /// `handshake_timeout` and, after that, never be without one for `idle_timeout` (`None`:
    /// no limit).
    pub fn new(
        io: IO,
        state: Arc<ConnState>,
        handshake_timeout: Duration,
        idle_timeout: Option<Duration>,
    ) -> Self {
        Self {
            io,
            life: Lifecycle::new(state, handshake_timeout, idle_timeout),
            ended: None,
        }
    }

    /// The connection's state.
    pub fn state(&self) -> &Arc<ConnState> {
        &self.life.state
    }

    /// The stream inside.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Why the stream was ended, if it was.
    pub fn ending(&self) -> Option<Ending> {
        self.ended
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.ended.is_some() {
            return Poll::Ready(Ok(()));
        }
        if let Poll::Ready(ending) = self.life.poll_end(cx) {
            self.ended = Some(ending);
            self.life.state.set_ending(ending);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The open connections of a listener, oldest first, to shed one when the listener is full.
#[derive(Default)]
pub struct OpenConnections {
    list: Mutex<VecDeque<Weak<ConnState>>>,
    /// The list's length after its last clean-up: it is cleaned again at twice that.
    cleaned_at: AtomicUsize,
}

impl OpenConnections {
    /// Adds a connection just accepted.
    pub fn track(&self, state: &Arc<ConnState>) {
        let mut list = self.list.lock().unwrap();
        // Closed connections leave the list now and then, not one by one.
        if list.len() >= 2 * self.cleaned_at.load(Ordering::Relaxed).max(64) {
            list.retain(|w| w.strong_count() > 0);
            self.cleaned_at.store(list.len(), Ordering::Relaxed);
        }
        list.push_back(Arc::downgrade(state));
    }

    /// Closes the connection that has gone longest without a call in flight (one that never
    /// made a call first); answers whether there was one. Its place comes back once its reader
    /// sees the end, so a listener's count may pass its limit by the connections being closed at
    /// that moment.
    pub fn shed_one(&self) -> bool {
        let mut list = self.list.lock().unwrap();
        list.retain(|w| w.strong_count() > 0);
        self.cleaned_at.store(list.len(), Ordering::Relaxed);
        let quietest = |silent: bool| {
            list.iter()
                .filter_map(Weak::upgrade)
                .filter(|c| c.spoke() != silent && !c.closing.load(Ordering::SeqCst))
                .filter_map(|c| Some((c.quiet_since()?, c)))
                .min_by_key(|(since, _)| *since)
                .map(|(_, c)| c)
        };
        match quietest(true).or_else(|| quietest(false)) {
            Some(c) => {
                c.close();
                true
            }
            None => false,
        }
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
