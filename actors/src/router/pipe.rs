//! The data plane of a session: one pump per direction and the stream each side reads.
//!
//! A pump reads frames from one side's request stream and queues them for the other side in a
//! bounded channel (`queue_frames` deep). When the reader is slow, its HTTP/2 window fills, its
//! [`Delivery`] stops being polled, the queue fills, the pump stops reading, and the writer's own
//! window fills: the writer slows down end to end, and the router holds at most the queue plus the
//! HTTP/2 windows per direction. A frame that cannot be queued within `stall_timeout` ends the
//! session with RESOURCE_EXHAUSTED.
//!
//! Half-close is per direction: when a side finishes sending, its pump queues an `eof` frame for
//! the other side and stops; the other direction keeps flowing. Both calls end (OK) only once both
//! directions have finished, because a gRPC call whose response ends is over for both directions.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::WatchStream;
use tokio_stream::{Stream, StreamExt};

use super::{RouterError, Side};

/// What the router needs of the transport's frame type.
pub trait Payload: Send + Unpin + 'static {
    /// Payload bytes carried (for the byte counters).
    fn payload_len(&self) -> usize;
    /// The frame telling a side that the other finished sending.
    fn eof() -> Self;
    /// The reason, if this frame says its sender gives up on the session (a local error: the
    /// session must fail for both sides, not look finished).
    fn abort_reason(&self) -> Option<String>;
}

/// How a side's call stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// Running (waiting for a peer, or paired).
    Open,
    /// Both directions finished: the call ends with OK once its queue is drained.
    Finished,
    /// The session failed: the call ends with this error at once, queued frames dropped.
    Failed(RouterError),
}

/// A side's call, as the router holds it: where to queue frames for it, and how to end it.
pub struct SideHandle<T> {
    pub outbound: mpsc::Sender<T>,
    pub end: watch::Sender<End>,
}

impl<T: Payload> SideHandle<T> {
    /// A new call's handle and the stream its response reads.
    pub fn new(queue_frames: usize) -> (Self, Delivery<T>) {
        let (outbound, rx) = mpsc::channel(queue_frames.max(1));
        let (end, end_rx) = watch::channel(End::Open);
        let delivery = Delivery {
            rx,
            rx_done: false,
            end: WatchStream::from_changes(end_rx),
            end_closed: false,
            state: End::Open,
            reported: false,
        };
        (Self { outbound, end }, delivery)
    }
}

impl<T> SideHandle<T> {
    /// Ends the call with `e` (before pairing; afterwards the link ends both).
    pub fn fail(&self, e: RouterError) {
        self.end.send_if_modified(|s| {
            let open = *s == End::Open;
            if open {
                *s = End::Failed(e);
            }
            open
        });
    }

    /// Whether the caller has gone (its response stream was dropped).
    pub fn is_gone(&self) -> bool {
        self.outbound.is_closed()
    }
}

/// What a paired session's two pumps and its actor share.
pub struct SessionLink {
    /// Payload bytes sent by the user (index 0) and by the agent (index 1).
    bytes: [AtomicU64; 2],
    last_activity_ms: AtomicU64,
    directions_done: AtomicU8,
    /// Which sides have finished sending (index as `bytes`).
    finished: [AtomicBool; 2],
    /// Set by whoever ends the session first; only that one writes the ends, so both sides
    /// always see the same end.
    decided: AtomicBool,
    ends: [watch::Sender<End>; 2],
}

fn index(side: Side) -> usize {
    match side {
        Side::User => 0,
        Side::Agent => 1,
    }
}

impl SessionLink {
    /// A link over the two calls' end signals.
    pub fn new(user_end: watch::Sender<End>, agent_end: watch::Sender<End>) -> Arc<Self> {
        Arc::new(Self {
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            last_activity_ms: AtomicU64::new(crate::clock::now_ms()),
            directions_done: AtomicU8::new(0),
            finished: [AtomicBool::new(false), AtomicBool::new(false)],
            decided: AtomicBool::new(false),
            ends: [user_end, agent_end],
        })
    }

    /// Ends both calls with `e`, unless the session already ended. Answers whether it did.
    pub fn fail(&self, e: RouterError) -> bool {
        self.set(End::Failed(e))
    }

    fn set(&self, end: End) -> bool {
        if self.decided.swap(true, Ordering::AcqRel) {
            return false;
        }
        for tx in &self.ends {
            tx.send_replace(end.clone());
        }
        true
    }

    fn direction_done(&self, from: Side) {
        if self.finished[index(from)].swap(true, Ordering::AcqRel) {
            return;
        }
        if self.directions_done.fetch_add(1, Ordering::AcqRel) + 1 == 2 {
            self.set(End::Finished);
        }
    }

    /// Whether `side` has finished sending.
    fn has_finished(&self, side: Side) -> bool {
        self.finished[index(side)].load(Ordering::Acquire)
    }

    /// How the session stands.
    pub fn end(&self) -> End {
        self.ends[0].borrow().clone()
    }

    /// Follows the session's end.
    pub fn subscribe(&self) -> watch::Receiver<End> {
        self.ends[0].subscribe()
    }

    /// Payload bytes `from` has sent so far.
    pub fn bytes(&self, from: Side) -> u64 {
        self.bytes[index(from)].load(Ordering::Relaxed)
    }

    /// Milliseconds since the last frame either way.
    pub fn idle_ms(&self) -> u64 {
        crate::clock::now_ms().saturating_sub(self.last_activity_ms.load(Ordering::Relaxed))
    }
}

/// One direction of a paired session.
pub struct Pump<T> {
    /// The side whose frames this pump reads.
    pub from: Side,
    /// The other side's queue.
    pub peer: mpsc::Sender<T>,
    pub link: Arc<SessionLink>,
    pub stall_timeout: Duration,
    /// `lodge_router_bytes_total` of this direction.
    pub bytes: Counter,
}

impl<T: Payload> Pump<T> {
    /// Moves frames until `inbound` ends (then queues `eof`), an error, or the session's end.
    pub async fn run<S>(self, inbound: S)
    where
        S: Stream<Item = Result<T, RouterError>> + Unpin,
    {
        let mut ended = self.link.subscribe();
        let mut inbound = inbound;
        loop {
            let next = tokio::select! {
                biased;
                _ = ended.wait_for(|e| *e != End::Open) => return,
                // The other side's call ended while this one still runs.
                _ = self.peer.closed() => {
                    self.peer_left();
                    return;
                }
                f = inbound.next() => f,
            };
            let frame = match next {
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    self.link.fail(e);
                    return;
                }
                None => {
                    if self.queue(T::eof(), &mut ended).await {
                        drop(self.peer);
                        self.link.direction_done(self.from);
                    }
                    return;
                }
            };
            if let Some(reason) = frame.abort_reason() {
                self.link.fail(RouterError::Unavailable(format!(
                    "the {} gave up: {reason}",
                    self.from.as_str()
                )));
                return;
            }
            let n = frame.payload_len() as u64;
            self.link.bytes[index(self.from)].fetch_add(n, Ordering::Relaxed);
            self.link
                .last_activity_ms
                .store(crate::clock::now_ms(), Ordering::Relaxed);
            self.bytes.inc_by(n);
            if !self.queue(frame, &mut ended).await {
                return;
            }
        }
    }

    /// The other side's call is over. If it had finished sending, it simply left after its part
    /// (what it sent is still delivered; nothing more can reach it): this direction is done.
    /// Otherwise it broke off, and the session fails.
    fn peer_left(&self) {
        if self.link.has_finished(self.from.other()) {
            self.link.direction_done(self.from);
        } else {
            self.link.fail(gone(self.from.other()));
        }
    }

    /// Queues `frame` for the peer; false (having ended the session) if that failed.
    async fn queue(&self, frame: T, ended: &mut watch::Receiver<End>) -> bool {
        let frame = match self.peer.try_send(frame) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Full(f)) => f,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.peer_left();
                return false;
            }
        };
        tokio::select! {
            biased;
            _ = ended.wait_for(|e| *e != End::Open) => false,
            sent = tokio::time::timeout(self.stall_timeout, self.peer.send(frame)) => match sent {
                Ok(Ok(())) => true,
                Ok(Err(_)) => {
                    self.peer_left();
                    false
                }
                Err(_) => {
                    self.link.fail(RouterError::Stalled(format!(
                        "the {} stopped reading: a frame waited {} ms for room in its queue",
                        self.from.other().as_str(),
                        self.stall_timeout.as_millis()
                    )));
                    false
                }
            },
        }
    }
}

/// The error both sides get when `side`'s call went away.
pub fn gone(side: Side) -> RouterError {
    RouterError::Unavailable(format!("the {} disconnected", side.as_str()))
}

/// The stream a side's call answers with: its queued frames, then the end (OK once both
/// directions finished), or the session's error as soon as it fails.
pub struct Delivery<T> {
    rx: mpsc::Receiver<T>,
    rx_done: bool,
    end: WatchStream<End>,
    end_closed: bool,
    state: End,
    reported: bool,
}

impl<T: Payload> Stream for Delivery<T> {
    type Item = Result<T, RouterError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            // Every change of the end first: a failure overtakes the frames still queued.
            if !this.end_closed {
                match Pin::new(&mut this.end).poll_next(cx) {
                    Poll::Ready(Some(e)) => {
                        this.state = e;
                        continue;
                    }
                    // Every holder of the end signal is gone without ending the call: the
                    // session's actor failed.
                    Poll::Ready(None) => {
                        this.end_closed = true;
                        if this.state == End::Open {
                            this.state = End::Failed(RouterError::Internal(
                                "the session ended unexpectedly (its actor failed)".into(),
                            ));
                        }
                    }
                    Poll::Pending => {}
                }
            }
            match &this.state {
                End::Failed(e) => {
                    if this.reported {
                        return Poll::Ready(None);
                    }
                    this.reported = true;
                    return Poll::Ready(Some(Err(e.clone())));
                }
                End::Finished if this.rx_done => return Poll::Ready(None),
                _ => {}
            }
            if this.rx_done {
                // Our frames are done; the other direction is not (or the end is on its way).
                return Poll::Pending;
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(f)) => return Poll::Ready(Some(Ok(f))),
                Poll::Ready(None) => this.rx_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct F(Vec<u8>);

    impl Payload for F {
        fn payload_len(&self) -> usize {
            self.0.len()
        }
        fn eof() -> Self {
            F(b"EOF".to_vec())
        }
        fn abort_reason(&self) -> Option<String> {
            self.0
                .strip_prefix(b"ABORT ")
                .map(|r| String::from_utf8_lossy(r).into_owned())
        }
    }

    fn pump(from: Side, peer: &SideHandle<F>, link: &Arc<SessionLink>, stall: Duration) -> Pump<F> {
        Pump {
            from,
            peer: peer.outbound.clone(),
            link: link.clone(),
            stall_timeout: stall,
            bytes: Counter::default(),
        }
    }

    type Source = tokio_stream::wrappers::ReceiverStream<Result<F, RouterError>>;

    fn source() -> (mpsc::Sender<Result<F, RouterError>>, Source) {
        let (tx, rx) = mpsc::channel(4);
        (tx, tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    #[tokio::test]
    async fn a_half_closed_direction_leaves_the_other_flowing() {
        let (user, mut user_sees) = SideHandle::<F>::new(4);
        let (agent, mut agent_sees) = SideHandle::<F>::new(4);
        let link = SessionLink::new(user.end.clone(), agent.end.clone());
        let (user_tx, user_in) = source();
        let (agent_tx, agent_in) = source();
        tokio::spawn(pump(Side::User, &agent, &link, Duration::from_secs(5)).run(user_in));
        tokio::spawn(pump(Side::Agent, &user, &link, Duration::from_secs(5)).run(agent_in));
        drop((user.outbound, agent.outbound));

        user_tx.send(Ok(F(b"ping".to_vec()))).await.unwrap();
        drop(user_tx); // the user finished sending
        assert_eq!(agent_sees.next().await, Some(Ok(F(b"ping".to_vec()))));
        assert_eq!(agent_sees.next().await, Some(Ok(F::eof())));
        // The agent still answers after the user's half-close.
        agent_tx.send(Ok(F(b"pong".to_vec()))).await.unwrap();
        assert_eq!(user_sees.next().await, Some(Ok(F(b"pong".to_vec()))));
        assert_eq!(link.end(), End::Open);
        drop(agent_tx);
        assert_eq!(user_sees.next().await, Some(Ok(F::eof())));
        assert_eq!(user_sees.next().await, None);
        assert_eq!(agent_sees.next().await, None);
        assert_eq!(link.end(), End::Finished);
        assert_eq!((link.bytes(Side::User), link.bytes(Side::Agent)), (4, 4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_stops_reading_ends_the_session_after_the_stall_timeout() {
        let (user, mut user_sees) = SideHandle::<F>::new(2);
        let (agent, _agent_never_reads) = SideHandle::<F>::new(2);
        let link = SessionLink::new(user.end.clone(), agent.end.clone());
        let (user_tx, user_in) = source();
        let running =
            tokio::spawn(pump(Side::User, &agent, &link, Duration::from_secs(30)).run(user_in));
        for _ in 0..3 {
            user_tx.send(Ok(F(vec![0; 10]))).await.unwrap();
        }
        running.await.unwrap();
        assert!(matches!(link.end(), End::Failed(RouterError::Stalled(_))));
        assert!(matches!(
            user_sees.next().await,
            Some(Err(RouterError::Stalled(_)))
        ));
        assert_eq!(user_sees.next().await, None);
    }

    #[tokio::test]
    async fn a_failure_reaches_a_reader_ahead_of_queued_frames() {
        let (user, mut user_sees) = SideHandle::<F>::new(4);
        let (agent, _) = SideHandle::<F>::new(4);
        user.outbound.send(F(b"queued".to_vec())).await.unwrap();
        let link = SessionLink::new(user.end.clone(), agent.end.clone());
        assert!(link.fail(RouterError::Terminated("operator".into())));
        assert!(
            !link.fail(RouterError::Stalled("later".into())),
            "the first end wins"
        );
        assert_eq!(
            user_sees.next().await,
            Some(Err(RouterError::Terminated("operator".into())))
        );
        assert_eq!(user_sees.next().await, None);
    }

    #[tokio::test]
    async fn a_broken_side_ends_the_session_for_both() {
        let (user, mut user_sees) = SideHandle::<F>::new(4);
        let (agent, mut agent_sees) = SideHandle::<F>::new(4);
        let link = SessionLink::new(user.end.clone(), agent.end.clone());
        let (user_tx, user_in) = source();
        let p = tokio::spawn(pump(Side::User, &agent, &link, Duration::from_secs(5)).run(user_in));
        user_tx.send(Err(gone(Side::User))).await.unwrap();
        p.await.unwrap();
        assert_eq!(agent_sees.next().await, Some(Err(gone(Side::User))));
        assert_eq!(user_sees.next().await, Some(Err(gone(Side::User))));
    }

    #[tokio::test]
    async fn an_abort_frame_fails_the_session_instead_of_finishing_it() {
        let (user, mut user_sees) = SideHandle::<F>::new(4);
        let (agent, mut agent_sees) = SideHandle::<F>::new(4);
        let link = SessionLink::new(user.end.clone(), agent.end.clone());
        let (user_tx, user_in) = source();
        let p = tokio::spawn(pump(Side::User, &agent, &link, Duration::from_secs(5)).run(user_in));
        user_tx
            .send(Ok(F(b"ABORT connection reset".to_vec())))
            .await
            .unwrap();
        p.await.unwrap();
        for sees in [&mut user_sees, &mut agent_sees] {
            assert!(
                matches!(sees.next().await, Some(Err(RouterError::Unavailable(m))) if m.contains("connection reset"))
            );
        }
    }

    #[tokio::test]
    async fn a_side_that_leaves_midway_fails_the_session_but_one_that_finished_may_go() {
        // The agent's call ends while it still had a direction open: an error for the user.
        let (user, mut user_sees) = SideHandle::<F>::new(4);
        let (agent, agent_sees) = SideHandle::<F>::new(4);
        let link = SessionLink::new(user.end.clone(), agent.end.clone());
        let (_user_tx, user_in) = source();
        let p = tokio::spawn(pump(Side::User, &agent, &link, Duration::from_secs(5)).run(user_in));
        drop(agent.outbound);
        drop(agent_sees);
        p.await.unwrap();
        assert_eq!(user_sees.next().await, Some(Err(gone(Side::Agent))));

        // The agent finished sending (its output queued for the user), then left: the user
        // still gets everything and an OK end.
        let (user, mut user_sees) = SideHandle::<F>::new(4);
        let (agent, agent_sees) = SideHandle::<F>::new(4);
        let link = SessionLink::new(user.end.clone(), agent.end.clone());
        let (user_tx, user_in) = source();
        let (agent_tx, agent_in) = source();
        let up = tokio::spawn(pump(Side::User, &agent, &link, Duration::from_secs(5)).run(user_in));
        let down =
            tokio::spawn(pump(Side::Agent, &user, &link, Duration::from_secs(5)).run(agent_in));
        drop((user.outbound, agent.outbound));
        agent_tx.send(Ok(F(b"last words".to_vec()))).await.unwrap();
        drop(agent_tx);
        down.await.unwrap();
        drop(agent_sees);
        up.await.unwrap();
        drop(user_tx);
        assert_eq!(user_sees.next().await, Some(Ok(F(b"last words".to_vec()))));
        assert_eq!(user_sees.next().await, Some(Ok(F::eof())));
        assert_eq!(user_sees.next().await, None);
        assert_eq!(link.end(), End::Finished);
    }

    #[tokio::test]
    async fn a_call_whose_session_vanished_fails_instead_of_hanging() {
        let (user, mut user_sees) = SideHandle::<F>::new(4);
        drop(user);
        assert!(matches!(
            user_sees.next().await,
            Some(Err(RouterError::Internal(_)))
        ));
    }
}
