//! The balancer: a registry of module instances, a routing table, rate limits, blue/green traffic
//! weights and an autoscaler, kept in the replicated store, and the decision code shared by the
//! `RouteRequest` RPC and the node's L4 data plane.

pub mod autoscale;
pub mod dataplane;
pub mod decide;
pub mod flow;
pub mod handle;
pub mod hook;
pub mod instance;
pub mod limits;
pub mod metered;
pub mod metrics;
pub mod model;
pub mod module;
pub mod pattern;
pub mod probe;
pub mod report;
pub mod route;
pub mod scaler;
pub mod score;
pub mod sniff;
pub mod state;
pub mod traffic;
pub mod view;

#[cfg(test)]
mod tests;

pub use flow::{Flow, ModuleType, Protocol};
pub use route::{Route, RoutingTable};

/// Why a balancer request failed; one variant per gRPC code the adapter answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BalancerError {
    /// A field is missing or malformed (the message names it).
    Invalid(String),
    /// No such instance, route or limit; or no route matches a flow.
    NotFound(String),
    /// No instance can take the flow now, or the store cannot be reached; retry.
    Unavailable(String),
    /// A rate limit refused the request.
    Exhausted(String),
    /// Not possible in the current state (a rollback with nothing to return to; a stale
    /// expected revision).
    Precondition(String),
    /// Concurrent writers kept changing the record; retry.
    Aborted(String),
    /// A write whose outcome is unknown (leadership changed while it was in flight).
    Unknown(String),
}

impl std::fmt::Display for BalancerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(m)
            | Self::NotFound(m)
            | Self::Unavailable(m)
            | Self::Exhausted(m)
            | Self::Precondition(m)
            | Self::Aborted(m)
            | Self::Unknown(m) => f.write_str(m),
        }
    }
}

impl From<crate::cluster::store::StoreError> for BalancerError {
    fn from(e: crate::cluster::store::StoreError) -> Self {
        use crate::cluster::store::StoreError;
        match e {
            StoreError::Unknown(m) => Self::Unknown(m),
            e => Self::Unavailable(e.to_string()),
        }
    }
}

/// Wall-clock milliseconds, as the balancer's records and decisions count time.
pub fn now_ms() -> i64 {
    crate::clock::precise_ms() as i64
}

/// What a node's balancer is made of: the shared state every part reads, and the actor
/// references the supervision tree fills in.
pub struct BalancerParts {
    pub store: std::sync::Arc<dyn crate::cluster::store::Store>,
    pub published: view::Published,
    pub state: crate::ActorRef<state::BalancerState>,
    pub scaler: crate::ActorRef<autoscale::Autoscaler>,
    pub deps: module::ModuleDeps,
    pub handle: handle::BalancerHandle,
    pub leads: autoscale::Leads,
    /// The data plane's listeners, if this node has any.
    pub dataplane: Option<DataPlane>,
    pub log: slog::Logger,
}

/// A node's data plane.
pub struct DataPlane {
    pub listeners: Vec<dataplane::ListenerSpec>,
    pub settings: std::sync::Arc<dataplane::DataPlaneSettings>,
    /// Where connections run (not on an actor's thread).
    pub io: tokio::runtime::Handle,
    /// One permit per proxied connection, shared by the listeners (`max_connections`).
    pub slots: std::sync::Arc<tokio::sync::Semaphore>,
}

impl DataPlane {
    /// The data plane of `listeners` with `settings`, running connections on `io`.
    pub fn new(
        listeners: Vec<dataplane::ListenerSpec>,
        settings: dataplane::DataPlaneSettings,
        io: tokio::runtime::Handle,
    ) -> Self {
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(settings.max_connections));
        Self {
            listeners,
            settings: std::sync::Arc::new(settings),
            io,
            slots,
        }
    }
}

impl BalancerParts {
    /// The balancer of member `member` over `store`, asking instances through `probe`.
    pub fn new(
        store: std::sync::Arc<dyn crate::cluster::store::Store>,
        probe: std::sync::Arc<dyn probe::ModuleProbe>,
        metrics: std::sync::Arc<metrics::BalancerMetrics>,
        hook: Option<std::sync::Arc<hook::DeployHook>>,
        member: u64,
        leads: autoscale::Leads,
        log: &slog::Logger,
    ) -> Self {
        let published = view::Published::default();
        let state = crate::ActorRef::default();
        let handle = handle::BalancerHandle::new(
            store.clone(),
            published.clone(),
            state.clone(),
            probe.clone(),
            metrics.clone(),
            hook,
            member,
        );
        Self {
            store,
            published: published.clone(),
            state,
            scaler: crate::ActorRef::default(),
            deps: module::ModuleDeps {
                published,
                probe,
                metrics,
                log: log.clone(),
            },
            handle,
            leads,
            dataplane: None,
            log: log.clone(),
        }
    }

    /// Adds a data plane.
    pub fn with_dataplane(mut self, d: DataPlane) -> Self {
        self.dataplane = Some(d);
        self
    }

    /// `/node/balancer`, one_for_all (the state actor rebuilds the module actors after a
    /// failure):
    ///
    /// ```text
    /// /node/balancer
    /// ├── /node/balancer/modules   one_for_one; /node/balancer/modules/<instance_id>
    /// ├── /node/balancer/state     loads and watches the balancer's keys; publishes the view
    /// ├── /node/balancer/scaler    the autoscaler (acts on the leader)
    /// └── /node/balancer/listeners one_for_one; /node/balancer/listeners/<n>, the data plane
    /// ```
    pub fn supervisor(parts: std::sync::Arc<Self>) -> crate::SupervisorSpec {
        use crate::{ChildSpec, Strategy, SupervisorSpec};
        SupervisorSpec::new(Strategy::OneForAll, move || {
            let (modules, modules_ref) = ChildSpec::supervisor(
                "modules",
                SupervisorSpec::new(Strategy::OneForOne, Vec::new),
            );
            let p = parts.clone();
            let state = ChildSpec::actor_for("state", &parts.state, move || {
                state::BalancerState::new(
                    p.store.clone(),
                    p.published.clone(),
                    modules_ref.clone(),
                    p.deps.clone(),
                    &p.log,
                )
            });
            let p = parts.clone();
            let scaler = ChildSpec::actor_for("scaler", &parts.scaler, move || {
                autoscale::Autoscaler::new(p.handle.clone(), p.leads.clone(), &p.log)
            });
            let p = parts.clone();
            let (listeners, _) = ChildSpec::supervisor(
                "listeners",
                SupervisorSpec::new(Strategy::OneForOne, move || {
                    let Some(d) = &p.dataplane else {
                        return Vec::new();
                    };
                    d.listeners
                        .iter()
                        .enumerate()
                        .map(|(n, spec)| {
                            let (spec, p) = (spec.clone(), p.clone());
                            let r = crate::ActorRef::default();
                            ChildSpec::actor_for(n.to_string(), &r, move || {
                                let d = p.dataplane.as_ref().expect("checked above");
                                dataplane::ListenerActor::new(
                                    spec.clone(),
                                    p.handle.clone(),
                                    d.settings.clone(),
                                    d.slots.clone(),
                                    d.io.clone(),
                                    &p.log,
                                )
                            })
                        })
                        .collect()
                }),
            );
            vec![modules, state, scaler, listeners]
        })
    }
}
