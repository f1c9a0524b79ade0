//! Describing children: what to start, where, and how to treat its exits.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, ArbiterHandle, AsyncContext, Context};

use super::control::{ControlItem, ExitNotify};
use super::policy::{Backoff, Restart, RestartLimit, Strategy};
use super::supervisor::Supervisor;
use crate::envelope::ActorRef;
use crate::introspect::ActorCell;
use crate::runtime::RuntimeShared;

/// An actor Lodge can supervise and inspect.
pub trait Managed: Actor<Context = Context<Self>> + Send + 'static {
    /// Kind shown by the admin RPC and used as a metrics label, e.g. `"admin"`.
    const KIND: &'static str;

    /// Whether the actor tells its supervisor itself when it is ready (see `ActorCell::mark_ready`)
    /// instead of as soon as `started()` has run. Supervisors do, so that a subtree counts as
    /// started only when all of it has.
    const DEFERS_READY: bool = false;

    /// A structured view of the actor's state for `GetActor`. Keep it cheap and free of secrets.
    fn dump_state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// Which arbiter (thread) a child runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// The runtime's control arbiter, shared by supervisors and light control actors.
    Control,
    /// One of the worker arbiters, chosen round-robin.
    Worker,
    /// An arbiter of its own, created on first use and shared by children naming the same one
    /// (the raft actor gets one so that client traffic cannot starve its ticks).
    Dedicated(&'static str),
}

/// What a supervisor hands a child's starter.
pub(crate) struct StartArgs<'a> {
    pub cell: &'a Arc<ActorCell>,
    pub incarnation: u64,
    pub notify: ExitNotify,
    pub arbiter: ArbiterHandle,
    pub runtime: &'a Arc<RuntimeShared>,
}

type Starter = Box<dyn FnMut(StartArgs<'_>) -> Result<(), String> + Send>;
type Detach = Box<dyn Fn(u64) + Send>;

/// A child of a supervisor.
pub struct ChildSpec {
    pub(crate) name: String,
    pub(crate) kind: &'static str,
    pub(crate) restart: Restart,
    pub(crate) shutdown_timeout: Option<Duration>,
    pub(crate) placement: Placement,
    pub(crate) starter: Starter,
    /// Forgets the address of a stopped incarnation (by number), so senders get `NotRunning`.
    pub(crate) detach: Detach,
    pub(crate) supervisor_ref: Option<ActorRef<Supervisor>>,
}

impl ChildSpec {
    /// A permanent child built by `factory` on every (re)start; returns the spec and a reference
    /// that stays valid across restarts.
    pub fn actor<A, F>(name: impl Into<String>, factory: F) -> (Self, ActorRef<A>)
    where
        A: Managed,
        F: FnMut() -> A + Send + 'static,
    {
        let actor_ref: ActorRef<A> = ActorRef::unbound();
        (Self::actor_for(name, &actor_ref, factory), actor_ref)
    }

    /// Like [`actor`](Self::actor), binding an existing reference: for a parent's children factory,
    /// which runs again at every restart of the parent while callers keep their reference.
    pub fn actor_for<A, F>(name: impl Into<String>, actor_ref: &ActorRef<A>, mut factory: F) -> Self
    where
        A: Managed,
        F: FnMut() -> A + Send + 'static,
    {
        let starter_ref = actor_ref.clone();
        let detach_ref = actor_ref.clone();
        let starter: Starter = Box::new(move |args: StartArgs<'_>| {
            // Built here, not on the target arbiter, so a panicking constructor is a start failure
            // the supervisor can see instead of a dead arbiter thread.
            let actor = std::panic::catch_unwind(AssertUnwindSafe(&mut factory)).map_err(|p| {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                format!("constructor panicked: {msg}")
            })?;
            starter_ref.bind(args.cell);
            let item = ControlItem::new(args.cell.clone(), args.incarnation, args.notify);
            let capacity = args.runtime.config.mailbox_capacity;
            let addr = A::start_in_arbiter(&args.arbiter, move |ctx: &mut Context<A>| {
                ctx.set_mailbox_capacity(capacity);
                ctx.spawn(item);
                actor
            });
            starter_ref.attach(addr, args.incarnation);
            Ok(())
        });
        Self {
            name: name.into(),
            kind: A::KIND,
            restart: Restart::Permanent,
            shutdown_timeout: None,
            placement: Placement::Worker,
            starter,
            detach: Box::new(move |incarnation| detach_ref.detach(incarnation)),
            supervisor_ref: None,
        }
    }

    /// A child that is itself a supervisor, running on the control arbiter.
    pub fn supervisor(
        name: impl Into<String>,
        spec: SupervisorSpec,
    ) -> (Self, ActorRef<Supervisor>) {
        let actor_ref: ActorRef<Supervisor> = ActorRef::unbound();
        let starter_ref = actor_ref.clone();
        let detach_ref = actor_ref.clone();
        let starter: Starter = Box::new(move |args: StartArgs<'_>| {
            starter_ref.bind(args.cell);
            let sup = Supervisor::new(
                args.runtime.clone(),
                args.cell.clone(),
                args.incarnation,
                spec.clone(),
            );
            let item = ControlItem::new(args.cell.clone(), args.incarnation, args.notify);
            let capacity = args.runtime.config.mailbox_capacity;
            let addr = Supervisor::start_in_arbiter(&args.arbiter, move |ctx| {
                ctx.set_mailbox_capacity(capacity);
                ctx.spawn(item);
                sup
            });
            starter_ref.attach(addr, args.incarnation);
            Ok(())
        });
        let spec = Self {
            name: name.into(),
            kind: Supervisor::KIND,
            restart: Restart::Permanent,
            // A supervisor starts and stops its children one by one, each within its own timeout,
            // so its own start and stop are bounded by theirs. Timing it out as a whole would
            // leave a live subtree behind a restarted supervisor (OTP uses `infinity` here too).
            shutdown_timeout: Some(SUPERVISOR_TIMEOUT),
            placement: Placement::Control,
            starter,
            detach: Box::new(move |incarnation| detach_ref.detach(incarnation)),
            supervisor_ref: Some(actor_ref.clone()),
        };
        (spec, actor_ref)
    }

    /// Sets the restart policy (default: permanent).
    pub fn restart(mut self, restart: Restart) -> Self {
        self.restart = restart;
        self
    }

    /// Sets how long a start or a stop may take before the child counts as failed or is abandoned
    /// (default: the runtime's `shutdown_timeout`; supervisors: unbounded).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = Some(timeout);
        self
    }

    /// Sets the arbiter the child runs on (default: a worker; supervisors: control).
    pub fn placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// The child's name, the last segment(s) of its path.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Start and stop timeout of a supervisor child: long enough to mean "as long as its children take".
const SUPERVISOR_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Builds a supervisor's static children; called again on every restart of the supervisor.
pub type ChildrenFactory = Arc<dyn Fn() -> Vec<ChildSpec> + Send + Sync>;

/// How a supervisor behaves.
#[derive(Clone)]
pub struct SupervisorSpec {
    /// Restart strategy.
    pub strategy: Strategy,
    /// Restart limit; `None` takes the runtime's default.
    pub limit: Option<RestartLimit>,
    /// Backoff; `None` takes the runtime's default.
    pub backoff: Option<Backoff>,
    /// The static children, in start order.
    pub children: ChildrenFactory,
}

impl SupervisorSpec {
    /// A supervisor with `strategy` and runtime defaults for limit and backoff.
    pub fn new(
        strategy: Strategy,
        children: impl Fn() -> Vec<ChildSpec> + Send + Sync + 'static,
    ) -> Self {
        Self {
            strategy,
            limit: None,
            backoff: None,
            children: Arc::new(children),
        }
    }

    /// Overrides the restart limit.
    pub fn limit(mut self, limit: RestartLimit) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Overrides the backoff.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = Some(backoff);
        self
    }
}
