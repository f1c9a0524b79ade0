//! How messages reach a Lodge actor: [`ActorRef`] on the sending side, [`Envelope`] on the wire.
//!
//! The envelope carries the target's cell so the receiving side can count the message and time the
//! handler without the business handler knowing; [`handles!`](crate::handles) writes the small
//! `Handler<Envelope<M>>` impl that unwraps it. The reference resolves the current incarnation's
//! address on every send, so callers keep working across restarts.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use actix::dev::ToEnvelope;
use actix::{Actor, Addr, Handler, MailboxError, Message};

use crate::introspect::ActorCell;

/// A message on its way to a Lodge actor.
///
/// Dropping an unopened envelope (the actor died, the mailbox was full) still releases its place in
/// the queue count, so the count never drifts.
pub struct Envelope<M> {
    inner: Option<(M, Arc<ActorCell>)>,
}

impl<M: Message> Message for Envelope<M> {
    type Result = M::Result;
}

impl<M> Drop for Envelope<M> {
    fn drop(&mut self) {
        if let Some((_, cell)) = &self.inner {
            cell.dequeued();
        }
    }
}

/// Counts and (sometimes) times one handler run; finishes when dropped.
pub struct Probe {
    cell: Arc<ActorCell>,
    started: Option<Instant>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.cell.end_handling(self.started.map(|s| s.elapsed()));
    }
}

impl<M> Envelope<M> {
    fn new(msg: M, cell: &Arc<ActorCell>) -> Self {
        cell.enqueued();
        Self {
            inner: Some((msg, cell.clone())),
        }
    }

    /// The message, and the probe that accounts for handling it.
    pub fn open(mut self) -> (M, Probe) {
        let (msg, cell) = self.inner.take().expect("an envelope is opened once");
        cell.dequeued();
        let timed = cell.begin_handling();
        let probe = Probe {
            cell,
            started: timed.then(Instant::now),
        };
        (msg, probe)
    }
}

/// Declares which messages a Lodge actor accepts through its [`ActorRef`]: for each type, a
/// `Handler<Envelope<M>>` that opens the envelope and calls the actor's own `Handler<M>`.
///
/// ```ignore
/// lodge_actors::handles!(MyActor: Ping, GetState);
/// ```
///
/// The actor's `Handler<M>::Result` must answer `Envelope<M>` too: `()`, `Result`, `Option`,
/// `ResponseFuture` and `ResponseActFuture` do; `MessageResult<M>` does not.
#[macro_export]
macro_rules! handles {
    ($actor:ty : $($msg:ty),+ $(,)?) => {$(
        impl $crate::actix::Handler<$crate::Envelope<$msg>> for $actor {
            type Result = <$actor as $crate::actix::Handler<$msg>>::Result;
            fn handle(
                &mut self,
                envelope: $crate::Envelope<$msg>,
                ctx: &mut <$actor as $crate::actix::Actor>::Context,
            ) -> Self::Result {
                let (msg, _probe) = envelope.open();
                <$actor as $crate::actix::Handler<$msg>>::handle(self, msg, ctx)
            }
        }
    )+};
}

/// Why a message did not get an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SendError {
    /// The actor is not running (restarting, stopped, or not started yet).
    NotRunning,
    /// The mailbox is full (only from `try_send`; `send` waits instead).
    Full,
    /// The actor stopped before answering.
    Closed,
    /// No answer within the deadline.
    Timeout,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NotRunning => "actor is not running",
            Self::Full => "actor mailbox is full",
            Self::Closed => "actor stopped before answering",
            Self::Timeout => "actor did not answer in time",
        })
    }
}

impl std::error::Error for SendError {}

/// The current incarnation's address and the cell of the path it runs at. A parent supervisor's
/// restart creates new cells, so the cell is re-bound at every start along with the address.
struct Slot<A: Actor> {
    addr: Option<Addr<A>>,
    cell: Option<Arc<ActorCell>>,
    /// Which incarnation `addr` belongs to, so a late detach of an old one changes nothing.
    incarnation: u64,
}

/// A restart-proof, instrumented reference to a supervised actor.
pub struct ActorRef<A: Actor> {
    slot: Arc<RwLock<Slot<A>>>,
}

impl<A: Actor> Clone for ActorRef<A> {
    fn clone(&self) -> Self {
        Self {
            slot: self.slot.clone(),
        }
    }
}

impl<A: Actor> Default for ActorRef<A> {
    fn default() -> Self {
        Self::unbound()
    }
}

impl<A: Actor> ActorRef<A> {
    /// A reference to an actor not started yet; a supervisor binds it when it starts the actor.
    pub(crate) fn unbound() -> Self {
        Self {
            slot: Arc::new(RwLock::new(Slot {
                addr: None,
                cell: None,
                incarnation: 0,
            })),
        }
    }

    pub(crate) fn bind(&self, cell: &Arc<ActorCell>) {
        self.slot.write().unwrap().cell = Some(cell.clone());
    }

    pub(crate) fn attach(&self, addr: Addr<A>, incarnation: u64) {
        let mut slot = self.slot.write().unwrap();
        slot.addr = Some(addr);
        slot.incarnation = incarnation;
    }

    /// Forgets the address if it is still `incarnation`'s.
    pub(crate) fn detach(&self, incarnation: u64) {
        let mut slot = self.slot.write().unwrap();
        if slot.incarnation == incarnation {
            slot.addr = None;
        }
    }

    /// The actor's introspection cell (once started).
    pub fn cell(&self) -> Option<Arc<ActorCell>> {
        self.slot.read().unwrap().cell.clone()
    }

    /// The current incarnation's raw address, if running. Bypasses the accounting: meant for
    /// benchmarks and for wiring actix features that need an `Addr`.
    pub fn addr(&self) -> Option<Addr<A>> {
        self.slot.read().unwrap().addr.clone()
    }

    /// Sends `msg` and waits for the answer. A full mailbox makes the caller wait (backpressure).
    pub async fn send<M>(&self, msg: M) -> Result<M::Result, SendError>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        A: Handler<Envelope<M>>,
        A::Context: ToEnvelope<A, Envelope<M>>,
    {
        let request = {
            let guard = self.slot.read().unwrap();
            let (Some(addr), Some(cell)) = (&guard.addr, &guard.cell) else {
                return Err(SendError::NotRunning);
            };
            addr.send(Envelope::new(msg, cell))
        };
        request.await.map_err(|e| match e {
            MailboxError::Closed => SendError::Closed,
            MailboxError::Timeout => SendError::Timeout,
        })
    }

    /// Like [`send`](Self::send), giving up after `timeout` (the caller's gRPC deadline).
    pub async fn send_timeout<M>(&self, msg: M, timeout: Duration) -> Result<M::Result, SendError>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        A: Handler<Envelope<M>>,
        A::Context: ToEnvelope<A, Envelope<M>>,
    {
        match tokio::time::timeout(timeout, self.send(msg)).await {
            Ok(r) => r,
            Err(_) => Err(SendError::Timeout),
        }
    }

    /// Fire-and-forget into a bounded mailbox: fails with [`SendError::Full`] instead of growing it.
    pub fn try_send<M>(&self, msg: M) -> Result<(), SendError>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        A: Handler<Envelope<M>>,
        A::Context: ToEnvelope<A, Envelope<M>>,
    {
        let guard = self.slot.read().unwrap();
        let (Some(addr), Some(cell)) = (&guard.addr, &guard.cell) else {
            return Err(SendError::NotRunning);
        };
        addr.try_send(Envelope::new(msg, cell))
            .map_err(|e| match e {
                actix::dev::SendError::Full(_) => SendError::Full,
                actix::dev::SendError::Closed(_) => SendError::Closed,
            })
    }
}
