//! The node's actor runtime: arbiters, the root supervisor, and orderly shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Actor, Arbiter, ArbiterHandle, AsyncContext};
use tokio::sync::oneshot;

use crate::envelope::ActorRef;
use crate::introspect::{ActorCell, ActorTable, EventKind, Lifecycle};
use crate::supervision::{
    install_panic_hook, Backoff, ControlItem, Exit, ExitNotify, Managed, RestartLimit, Supervisor,
    SupervisorSpec,
};

/// Path of the root supervisor.
pub const ROOT_PATH: &str = "/node";

/// Runtime settings (from the `[runtime]` and `[supervision]` configuration sections).
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Worker arbiters (threads) for ordinary actors.
    pub worker_arbiters: usize,
    /// Mailbox capacity of every supervised actor.
    pub mailbox_capacity: usize,
    /// Default restart limit of supervisors.
    pub restart_limit: RestartLimit,
    /// Default backoff of supervisors.
    pub backoff: Backoff,
    /// Default time a child gets to stop.
    pub shutdown_timeout: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            worker_arbiters: 2,
            mailbox_capacity: 256,
            restart_limit: RestartLimit::default(),
            backoff: Backoff::default(),
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}

/// What supervisors share.
pub(crate) struct RuntimeShared {
    pub actors: ActorTable,
    pub log: slog::Logger,
    pub config: RuntimeConfig,
    pub control: ArbiterHandle,
    workers: Vec<Arbiter>,
    dedicated: Mutex<HashMap<&'static str, Arbiter>>,
    next: AtomicUsize,
}

impl RuntimeShared {
    pub fn next_worker(&self) -> ArbiterHandle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        self.workers[i].handle()
    }

    pub fn dedicated(&self, name: &'static str) -> ArbiterHandle {
        let mut map = self.dedicated.lock().unwrap();
        map.entry(name).or_insert_with(Arbiter::new).handle()
    }

    fn stop_arbiters(&self) {
        for w in &self.workers {
            w.stop();
        }
        for a in self.dedicated.lock().unwrap().values() {
            a.stop();
        }
    }
}

/// A running actor tree.
pub struct Runtime {
    shared: Arc<RuntimeShared>,
    root: ActorRef<Supervisor>,
    exit: Option<oneshot::Receiver<Exit>>,
    started: Option<oneshot::Receiver<()>>,
}

impl Runtime {
    /// Starts the root supervisor `/node` with `root` as its spec. Must be called on an actix
    /// system thread; the root and other control actors run on that thread's arbiter.
    pub fn start(config: RuntimeConfig, log: slog::Logger, root: SupervisorSpec) -> Self {
        install_panic_hook();
        let workers = (0..config.worker_arbiters.max(1))
            .map(|_| Arbiter::new())
            .collect();
        let shared = Arc::new(RuntimeShared {
            actors: ActorTable::new(),
            log,
            config,
            control: Arbiter::current(),
            workers,
            dedicated: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(0),
        });
        let cell = Arc::new(ActorCell::new(ROOT_PATH.into(), Supervisor::KIND, None));
        shared
            .actors
            .register(cell.clone())
            .expect("a fresh table has no root");
        let root_ref: ActorRef<Supervisor> = ActorRef::unbound();
        root_ref.bind(&cell);
        shared
            .actors
            .set_supervisor(cell.path().clone(), root_ref.clone());
        let (tx, rx) = oneshot::channel();
        cell.begin_incarnation(1);
        let (started_tx, started_rx) = oneshot::channel();
        let item = ControlItem::new(
            cell.clone(),
            1,
            ExitNotify::Root {
                started: Some(started_tx),
                exit: tx,
            },
        );
        let sup = Supervisor::new(shared.clone(), cell.clone(), 1, root);
        let capacity = shared.config.mailbox_capacity;
        let addr = Supervisor::start_in_arbiter(&shared.control, move |ctx| {
            ctx.set_mailbox_capacity(capacity);
            ctx.spawn(item);
            sup
        });
        root_ref.attach(addr, 1);
        cell.set_state(Lifecycle::Running);
        shared.actors.emit(&cell, EventKind::Started, None);
        Self {
            shared,
            root: root_ref,
            exit: Some(rx),
            started: Some(started_rx),
        }
    }

    /// The table of live actors.
    pub fn actor_table(&self) -> &ActorTable {
        &self.shared.actors
    }

    /// The root supervisor.
    pub fn root(&self) -> &ActorRef<Supervisor> {
        &self.root
    }

    /// Resolves once every actor of the initial tree has started (supervisors count as started
    /// when their own children have), so that a node does not serve calls its actors cannot take
    /// yet. Stays pending if the tree fails before that: wait on it together with
    /// [`wait_exit`](Self::wait_exit).
    pub fn wait_started(&mut self) -> impl std::future::Future<Output = ()> + 'static {
        let rx = self.started.take();
        async move {
            let started = match rx {
                Some(rx) => rx.await.is_ok(),
                None => false,
            };
            if !started {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Resolves when the root supervisor has stopped: `Exit::Normal` after [`shutdown`], a
    /// failure when the tree gave up (the node should then exit non-zero).
    ///
    /// [`shutdown`]: Self::shutdown
    pub fn wait_exit(&mut self) -> impl std::future::Future<Output = Exit> + 'static {
        let rx = self.exit.take();
        async move {
            match rx {
                Some(rx) => rx.await.unwrap_or(Exit::Normal),
                None => std::future::pending().await,
            }
        }
    }

    /// Stops the whole tree in reverse start order; follow with [`wait_exit`](Self::wait_exit).
    pub fn shutdown(&self) {
        if let Some(cell) = self.root.cell() {
            cell.set_state(Lifecycle::Stopping);
            cell.request_stop();
        }
    }

    /// The arbiter of a [`Placement::Dedicated`](crate::Placement::Dedicated) name, created on
    /// first use: for code that must share a thread with such actors (benchmarks, tests).
    pub fn dedicated_arbiter(&self, name: &'static str) -> ArbiterHandle {
        self.shared.dedicated(name)
    }

    /// Stops the worker threads; call after the tree has exited.
    pub fn stop_arbiters(&self) {
        self.shared.stop_arbiters();
    }
}
