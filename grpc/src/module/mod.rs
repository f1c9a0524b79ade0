//! The module SDK: what a module process (an ALB, DBLB, AILB, RTMP or nested NLB) needs to take
//! part in a Lodge balancer.
//!
//! [`ModuleHandle::start`] registers the module with the balancer and keeps heartbeating with
//! real stats (see [`link`]); [`ModuleHandle::service`] is the `lodge.balancer.v1.Module`
//! service the nodes call (CanHandle, HealthCheck, GetStats, ...); the data path admits each
//! connection with [`ModuleHandle::admit`] and holds the [`ConnectionGuard`] while it serves it;
//! [`ModuleHandle::drain`] ends the module gracefully.
//!
//! ```no_run
//! # async fn example(listener: tokio::net::TcpListener) {
//! use lodge_actors::balancer::ModuleType;
//! use lodge_grpc::module::{ModuleHandle, ModuleHooks, ModuleOptions};
//!
//! let opts = ModuleOptions::new(
//!     ModuleType::Alb,
//!     vec!["10.0.0.1:7400".into(), "10.0.0.2:7400".into()],
//!     "10.0.0.9:9100", // where this process serves the Module service
//!     "10.0.0.9:9000", // where it takes the connections the balancer forwards
//! );
//! let module = ModuleHandle::start(opts, ModuleHooks::default());
//! // ... serve module.service() on 10.0.0.9:9100 ...
//! loop {
//!     let (client, _) = listener.accept().await.unwrap();
//!     let Ok(guard) = module.admit() else { continue }; // over a limit: closed at once
//!     tokio::spawn(async move {
//!         let _guard = guard; // counted active until dropped
//!         // ... serve `client` ...
//!         drop(client);
//!     });
//! }
//! # }
//! ```

pub mod control;
pub mod limits;
pub mod link;
mod service;
pub mod splice;
mod state;
pub mod stats;
pub mod stub;
#[cfg(test)]
mod tests;
pub mod tracker;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lodge_actors::balancer::{ModuleType, Protocol, RoutingTable};
use slog::{info, o, warn, Logger};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::client::ClientTls;
use crate::pb::balancer::module_server::ModuleServer;
use crate::pb::balancer::{
    Check, HealthCheckConfig, HealthStatus, ModuleStats, UnregisterModuleRequest,
    UnregisterModuleResponse,
};
use crate::registry_client::timed;
use tonic::service::interceptor::InterceptedService;

pub use limits::{RateLimits, ALL_CONNECTIONS};
pub use link::{Instruction, LinkStatus, DEFAULT_HEARTBEAT_INTERVAL};
pub use service::{can_handle, serves, ModuleService};
pub use tracker::{ConnectionGuard, ConnectionTracker, Counted, Counters, Refused};

use state::{lock, Sampler, Shared, Snapshot};

/// How long a drain waits when the caller gives no timeout (a Shutdown call with 0).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What the module tells the balancer about itself, and how to reach the balancer.
#[derive(Clone, Debug)]
pub struct ModuleOptions {
    /// Balancer nodes as `HOST:PORT`, tried in order (and round again) with jittered backoff.
    pub endpoints: Vec<String>,
    /// TLS to the balancer; all empty means plaintext.
    pub tls: ClientTls,
    /// The registration's id; registering the same id again replaces the registration. Empty:
    /// the balancer picks one.
    pub instance_id: String,
    pub module_type: ModuleType,
    pub version: String,
    /// `HOST:PORT` of this process's Module service.
    pub control_address: String,
    /// `HOST:PORT` where this process takes the connections the balancer forwards.
    pub data_address: String,
    /// The protocols served; empty: the type's (see [`ModuleType::protocols`]).
    pub protocols: Vec<Protocol>,
    /// At most this many connections at once (0: no limit); more are refused by
    /// [`ModuleHandle::admit`] and the balancer does not send more.
    pub max_connections: u32,
    pub metadata: HashMap<String, String>,
    /// Active health checks the nodes should run against this instance.
    pub health_check: Option<HealthCheckConfig>,
    /// Bound on each call to the balancer (a graceful unregister gets its drain time on top).
    pub call_timeout: Duration,
    /// First pause after a failure; it doubles per consecutive failure.
    pub backoff_initial: Duration,
    /// Ceiling of the doubling pause, so that a long outage is still probed regularly.
    pub backoff_max: Duration,
    /// Where the SDK logs registrations, instructions and failures.
    pub log: Logger,
}

impl ModuleOptions {
    /// Options with the defaults: instance id `<type>-<hostname>-<pid>`, the type's protocols,
    /// no connection limit, 5 s calls, backoff from 500 ms to 10 s, logs discarded.
    pub fn new(
        module_type: ModuleType,
        endpoints: Vec<String>,
        control_address: &str,
        data_address: &str,
    ) -> Self {
        ModuleOptions {
            endpoints,
            tls: ClientTls::default(),
            instance_id: default_instance_id(module_type),
            module_type,
            version: env!("CARGO_PKG_VERSION").to_string(),
            control_address: control_address.to_string(),
            data_address: data_address.to_string(),
            protocols: Vec::new(),
            max_connections: 0,
            metadata: HashMap::new(),
            health_check: None,
            call_timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(10),
            log: Logger::root(slog::Discard, o!()),
        }
    }

    /// The protocols the module serves: the ones set, or its type's.
    pub fn protocols(&self) -> &[Protocol] {
        if self.protocols.is_empty() {
            self.module_type.protocols()
        } else {
            &self.protocols
        }
    }
}

/// `<type>-<hostname>-<pid>`: stable for the life of the process, distinct between copies.
pub fn default_instance_id(module_type: ModuleType) -> String {
    format!(
        "{module_type}-{}-{}",
        crate::registry_client::hostname(),
        std::process::id()
    )
}

/// The future a hook answers with.
pub type HookFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Reloads the module's configuration (Reload calls and `should_reload` instructions): what it
/// did, or why it could not.
pub type ReloadHook = Arc<dyn Fn() -> HookFuture<Result<String, String>> + Send + Sync>;

/// The checks of a deep HealthCheck beyond the module's own health (e.g. that the backend
/// accepts connections); a check that is not `ok` makes the module unhealthy.
pub type DeepCheckHook = Arc<dyn Fn() -> HookFuture<Vec<Check>> + Send + Sync>;

/// Checks one setting's new value; the error says what is wrong with it (the SDK adds the
/// setting's name).
pub type SettingValidator = Arc<dyn Fn(&str, &str) -> Result<(), String> + Send + Sync>;

/// Called after settings changed, with all of them, with no lock held (it may call the handle).
pub type SettingsApplied = Arc<dyn Fn(&ModuleHandle, &BTreeMap<String, String>) + Send + Sync>;

/// The module's settings as GetConfig and UpdateConfig see them: string values by name. The
/// names given here are the only ones UpdateConfig accepts.
#[derive(Clone)]
pub struct Settings {
    pub values: BTreeMap<String, String>,
    pub validate: SettingValidator,
    pub on_change: Option<SettingsApplied>,
}

/// What the module process plugs into the SDK; all optional.
#[derive(Clone, Default)]
pub struct ModuleHooks {
    pub reload: Option<ReloadHook>,
    pub deep_check: Option<DeepCheckHook>,
    pub settings: Option<Settings>,
}

/// How a drain ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections that closed during the drain.
    pub drained: u64,
    /// Connections still open when it ended.
    pub remaining: u64,
    pub elapsed: Duration,
    /// The balancer's answer to UnregisterModule, or why there is none.
    pub balancer: Result<UnregisterModuleResponse, String>,
}

/// A running module: its link to the balancer, its connections and its Module service. Cheap
/// to clone (every clone is the same module).
///
/// The link runs until [`drain`](Self::drain), [`stop_now`](Self::stop_now) or
/// [`stop`](Self::stop); dropping handles does not stop it (the service holds the module too).
#[derive(Clone)]
pub struct ModuleHandle {
    shared: Arc<Shared>,
}

impl ModuleHandle {
    /// Starts the link (registration and heartbeats) in the background and returns at once;
    /// must be called within a tokio runtime. Serve [`ModuleHandle::service`] on
    /// `control_address` for the nodes to reach the module.
    pub fn start(opts: ModuleOptions, hooks: ModuleHooks) -> ModuleHandle {
        let limits = Arc::new(RateLimits::default());
        let tracker = ConnectionTracker::new(opts.max_connections, limits.clone());
        let settings = hooks
            .settings
            .as_ref()
            .map(|s| s.values.clone())
            .unwrap_or_default();
        let (stop_link, stop_rx) = watch::channel(false);
        let sampler = Sampler::new(Snapshot::take(&tracker), Duration::from_secs(1));
        let shared = Arc::new(Shared {
            log: opts.log.new(o!("module" => opts.instance_id.clone())),
            opts,
            hooks,
            tracker,
            limits,
            started: Instant::now(),
            control_token: crate::secret::random_token(),
            health: Mutex::new((HealthStatus::Healthy, String::new())),
            draining: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            routes: Mutex::new(RoutingTable::default()),
            settings: Mutex::new(settings),
            metrics: Mutex::new(BTreeMap::new()),
            link: watch::channel(LinkStatus::default()).0,
            conn: Mutex::new(None),
            on_demand: Mutex::new(sampler),
            reregister: AtomicBool::new(false),
            stop_link,
            exit: watch::channel(false).0,
            drain: tokio::sync::Mutex::new(None),
        });
        tokio::spawn(link::Worker::new(shared.clone()).run(stop_rx));
        ModuleHandle { shared }
    }

    fn from_shared(shared: Arc<Shared>) -> Self {
        ModuleHandle { shared }
    }

    /// The Module service, to add to a tonic server. It answers only calls carrying this
    /// module's control token (see [`control`]), which the balancer got at registration.
    pub fn service(&self) -> InterceptedService<ModuleServer<ModuleService>, control::ControlAuth> {
        InterceptedService::new(
            ModuleServer::new(ModuleService::new(self.shared.clone())),
            control::ControlAuth::new(&self.shared.control_token),
        )
    }

    /// The secret the Module service takes calls with (given to the balancer at registration);
    /// for a process that calls its own Module service.
    pub fn control_token(&self) -> &str {
        &self.shared.control_token
    }

    /// The options the module started with.
    pub fn options(&self) -> &ModuleOptions {
        &self.shared.opts
    }

    /// The instance id: the registered one once there is one, else the one asked for.
    pub fn instance_id(&self) -> String {
        self.shared.instance_id()
    }

    /// The module's connections.
    pub fn tracker(&self) -> &ConnectionTracker {
        &self.shared.tracker
    }

    /// The module's own rate limits (target `*` limits every new connection).
    pub fn rate_limits(&self) -> &RateLimits {
        &self.shared.limits
    }

    /// Admits a new connection: refused (and counted as an error) over the `*` rate limit or
    /// at `max_connections`. The caller closes a refused connection at once.
    pub fn admit(&self) -> Result<ConnectionGuard, Refused> {
        self.shared.tracker.admit()
    }

    /// The link's status now.
    pub fn link_status(&self) -> LinkStatus {
        self.shared.link.borrow().clone()
    }

    /// A receiver of link status changes.
    pub fn subscribe(&self) -> watch::Receiver<LinkStatus> {
        self.shared.link.subscribe()
    }

    /// Waits until the module is registered and answers its id; an error after `timeout`.
    pub async fn wait_registered(&self, timeout: Duration) -> Result<String, String> {
        let mut rx = self.subscribe();
        let wait = async {
            rx.wait_for(|s| s.registered)
                .await
                .map(|s| s.instance_id.clone().unwrap_or_default())
                .map_err(|_| "the module stopped".to_string())
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(format!("not registered within {timeout:?}")),
        }
    }

    /// Sets what the module says of its own health (reported in heartbeats and HealthCheck;
    /// a drain overrides it with STOPPING, then STOPPED).
    pub fn set_health(&self, health: HealthStatus, reason: &str) {
        *lock(&self.shared.health) = (health, reason.to_string());
    }

    /// The health the module reports now, with the reason.
    pub fn health(&self) -> (HealthStatus, String) {
        self.shared.health()
    }

    /// Whether a drain has begun.
    pub fn is_draining(&self) -> bool {
        self.shared.is_draining()
    }

    /// Changes the connection limit and registers again so that the balancer knows it.
    pub fn set_max_connections(&self, max: u32) {
        if self.shared.tracker.max_connections() != max {
            self.shared.tracker.set_max_connections(max);
            self.shared.reregister.store(true, Ordering::SeqCst);
        }
    }

    /// Records a metric of the module's own (kept until replaced), listed by GetMetrics next to
    /// the stats.
    pub fn record_metric(&self, name: &str, value: f64, labels: BTreeMap<String, String>) {
        lock(&self.shared.metrics).insert((name.to_string(), labels), (value, state::unix_ms()));
    }

    /// The settings now.
    pub fn settings(&self) -> BTreeMap<String, String> {
        lock(&self.shared.settings).clone()
    }

    /// The stats now (rates over the last second or more; see GetStats).
    pub fn stats(&self) -> ModuleStats {
        self.shared.stats_on_demand()
    }

    /// Drains the module: from now on it reports STOPPING and answers CanHandle with false; it
    /// unregisters gracefully (the balancer stops sending new traffic and answers once the
    /// instance's connections reached zero or `timeout` passed) while it waits, for the same
    /// `timeout`, for its own connections to close. Heartbeats go on during the drain and stop
    /// after it. A second call waits for the first drain and gets its report.
    pub async fn drain(&self, timeout: Duration) -> DrainReport {
        let mut done = self.shared.drain.lock().await;
        if let Some(r) = done.as_ref() {
            return r.clone();
        }
        let s = &self.shared;
        s.draining.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let before = s.tracker.counters();
        info!(s.log, "draining"; "active" => before.active, "timeout_ms" => timeout.as_millis());
        let (balancer, _idle) =
            tokio::join!(self.unregister(true, timeout), s.tracker.wait_idle(timeout));
        let _ = s.stop_link.send(true);
        s.stopped.store(true, Ordering::SeqCst);
        let after = s.tracker.counters();
        let report = DrainReport {
            drained: after.closed - before.closed,
            remaining: after.active,
            elapsed: started.elapsed(),
            balancer,
        };
        match &report.balancer {
            Ok(r) => info!(s.log, "drained";
                "drained" => report.drained, "remaining" => report.remaining,
                "balancer_drained" => r.drained_connections,
                "balancer_remaining" => r.remaining_connections),
            Err(e) => warn!(s.log, "drained without the balancer's answer";
                "drained" => report.drained, "remaining" => report.remaining, "error" => e),
        }
        *done = Some(report.clone());
        report
    }

    /// Stops at once: unregisters without draining (best effort) and stops the link. Open
    /// connections are left to the caller.
    pub async fn stop_now(&self) -> DrainReport {
        let mut done = self.shared.drain.lock().await;
        if let Some(r) = done.as_ref() {
            return r.clone();
        }
        let s = &self.shared;
        s.draining.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let balancer = self.unregister(false, Duration::ZERO).await;
        let _ = s.stop_link.send(true);
        s.stopped.store(true, Ordering::SeqCst);
        let report = DrainReport {
            drained: 0,
            remaining: s.tracker.active(),
            elapsed: started.elapsed(),
            balancer,
        };
        *done = Some(report.clone());
        report
    }

    /// Ends the registration; `timeout` is the drain's, so the call waits that long on top of
    /// the usual call bound.
    async fn unregister(
        &self,
        graceful: bool,
        timeout: Duration,
    ) -> Result<UnregisterModuleResponse, String> {
        let s = &self.shared;
        let Some(id) = s.link.borrow().instance_id.clone() else {
            return Err("never registered".into());
        };
        let req = UnregisterModuleRequest {
            instance_id: id,
            graceful,
            drain_timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
        };
        let t = timeout + s.opts.call_timeout;
        link::call_balancer(s, t, move |mut c| {
            let req = req.clone();
            async move { c.unregister_module(timed(req, t)).await }
        })
        .await
        .map_err(|e| format!("UnregisterModule: {:?}: {}", e.code(), e.message()))
    }

    /// Asks the process to exit (what a Shutdown call does after draining).
    pub fn request_exit(&self) {
        self.shared.exit.send_replace(true);
    }

    /// Resolves once the process was asked to exit.
    pub async fn exit_requested(&self) {
        let mut rx = self.shared.exit.subscribe();
        // The sender lives in `shared`, which `self` keeps alive: the wait cannot fail.
        let _ = rx.wait_for(|e| *e).await;
    }

    /// Stops the link without unregistering (the registration then expires by itself).
    pub fn stop(&self) {
        let _ = self.shared.stop_link.send(true);
    }
}
