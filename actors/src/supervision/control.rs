//! The control item every supervised actor carries in its context.
//!
//! actix kills an actor silently when a handler panics: tokio drops the actor's context while
//! unwinding and nothing else is told. The control item lives in that context, so its `Drop` runs
//! then too; `std::thread::panicking()` tells a panic from a clean stop, and the panic hook has left
//! the message in a thread-local. The same item serves stop and state-dump requests on the actor's
//! own thread, so no actor needs extra handlers for them.

use std::cell::RefCell;
use std::pin::Pin;
use std::sync::{Arc, Once};
use std::task::Poll;

use actix::{ActorContext, ActorFuture, Addr, Context};
use tokio::sync::oneshot;

use super::spec::Managed;
use super::supervisor::{ChildExited, ChildStarted, Supervisor};
use crate::introspect::ActorCell;

/// How an actor incarnation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It stopped (asked to, or by itself) without reporting a failure.
    Normal,
    /// It stopped and reported a failure (a supervisor past its restart limit does this).
    Failed(String),
    /// A handler (or `started`) panicked with this message.
    Panicked(String),
}

impl Exit {
    /// Whether this exit is a failure.
    pub fn is_failure(&self) -> bool {
        !matches!(self, Exit::Normal)
    }
}

thread_local! {
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Records panic messages per thread, then defers to the previous hook (which prints them).
pub(crate) fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_string());
            let msg = match info.location() {
                Some(l) => format!("{msg} (at {}:{})", l.file(), l.line()),
                None => msg,
            };
            LAST_PANIC.with(|p| *p.borrow_mut() = Some(msg));
            previous(info);
        }));
    });
}

fn take_panic_message() -> String {
    LAST_PANIC
        .with(|p| p.borrow_mut().take())
        .unwrap_or_else(|| "panicked".to_string())
}

/// Who hears about an incarnation's end.
pub(crate) enum ExitNotify {
    /// The supervising actor.
    Supervisor { addr: Addr<Supervisor>, child: u64 },
    /// The runtime, for the root supervisor: told when the whole tree has started, and how the
    /// root ended.
    Root {
        started: Option<oneshot::Sender<()>>,
        exit: oneshot::Sender<Exit>,
    },
}

/// Lives in a supervised actor's context for as long as the incarnation does.
pub(crate) struct ControlItem {
    cell: Arc<ActorCell>,
    incarnation: u64,
    notify: Option<ExitNotify>,
    /// Whether the supervisor was told that `started()` has run.
    acked: bool,
}

impl ControlItem {
    pub fn new(cell: Arc<ActorCell>, incarnation: u64, notify: ExitNotify) -> Self {
        Self {
            cell,
            incarnation,
            notify: Some(notify),
            acked: false,
        }
    }
}

impl<A: Managed> ActorFuture<A> for ControlItem {
    type Output = ();

    fn poll(
        mut self: Pin<&mut Self>,
        act: &mut A,
        ctx: &mut Context<A>,
        task: &mut std::task::Context<'_>,
    ) -> Poll<()> {
        let (stop, dumps, ready) = {
            let mut c = self.cell.lock_control();
            if c.incarnation != self.incarnation {
                // A newer incarnation runs at this path (this one was abandoned, e.g. stuck in
                // `started()` past its timeout): this one must go, not linger unsupervised.
                drop(c);
                ctx.stop();
                return Poll::Pending;
            }
            let ready = !A::DEFERS_READY || c.ready;
            if !c.waker.as_ref().is_some_and(|w| w.will_wake(task.waker())) {
                c.waker = Some(task.waker().clone());
            }
            (
                std::mem::take(&mut c.stop),
                std::mem::take(&mut c.dumps),
                ready,
            )
        };
        // actix polls context items only after `started()` has returned (and any future it
        // `wait`ed on): the first poll is the moment the actor is up.
        if ready && !self.acked {
            self.acked = true;
            let incarnation = self.incarnation;
            match &mut self.notify {
                Some(ExitNotify::Supervisor { addr, child }) => addr.do_send(ChildStarted {
                    child: *child,
                    incarnation,
                }),
                Some(ExitNotify::Root { started, .. }) => {
                    if let Some(tx) = started.take() {
                        let _ = tx.send(());
                    }
                }
                None => {}
            }
        }
        if !dumps.is_empty() {
            let state = act.dump_state();
            for d in dumps {
                let _ = d.send(state.clone());
            }
        }
        if stop {
            ctx.stop();
        }
        Poll::Pending
    }
}

impl Drop for ControlItem {
    fn drop(&mut self) {
        let exit = if std::thread::panicking() {
            Exit::Panicked(take_panic_message())
        } else {
            let mut c = self.cell.lock_control();
            // Only this incarnation's own failure report; a newer one's is not ours to take.
            match (c.incarnation == self.incarnation)
                .then(|| c.failure.take())
                .flatten()
            {
                Some(reason) => Exit::Failed(reason),
                None => Exit::Normal,
            }
        };
        match self.notify.take() {
            Some(ExitNotify::Supervisor { addr, child }) => addr.do_send(ChildExited {
                child,
                incarnation: self.incarnation,
                exit,
            }),
            Some(ExitNotify::Root { exit: tx, .. }) => {
                let _ = tx.send(exit);
            }
            None => {}
        }
    }
}
