//! The servers: who may call what, the services on the client and peer ports over the areas of
//! the tree, and the metrics page.

use std::sync::Arc;

use lodge_actors::balancer::metrics::BalancerMetrics;
use lodge_actors::balancer::BalancerParts;
use lodge_actors::registry::RegistryMetrics;
use lodge_grpc::balancer::service::BalancerBackend;
use lodge_grpc::metrics::ServerMetrics;
use lodge_grpc::server::{self, Backends};

use std::net::SocketAddr;

use lodge_grpc::server::HealthReporter;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::cluster::ClusterPlan;
use super::lifecycle::Node;
use super::listen::Listeners;
use super::tree::{
    AdminArea, ClusterArea, RegistryArea, RouterArea, TranslationArea, WorkflowArea,
};
use crate::config::NodeConfig;
use crate::metrics::{ActorCollector, ClusterCollector, ProcessCollector};

/// Who may call what, from `[auth]`, and the audit log from `[audit]` (with the guard that
/// flushes it at exit).
pub fn gatekeeper(
    cfg: &NodeConfig,
    rejections: &RegistryMetrics,
) -> Result<
    (
        Arc<lodge_grpc::auth::Gatekeeper>,
        Option<crate::logging::Guard>,
    ),
    String,
> {
    let settings = cfg.auth_settings().map_err(|e| e.to_string())?;
    let tokens = lodge_grpc::auth::Authenticator::new(&settings)?;
    let certificates = cfg.certificate_roles().map_err(|e| e.to_string())?;
    let (audit, guard) = if cfg.audit.enabled {
        let (log, guard) = crate::logging::audit(&cfg.audit.path, cfg.node.id)?;
        (lodge_grpc::auth::audit::Audit::to(log), Some(guard))
    } else {
        (lodge_grpc::auth::audit::Audit::off(), None)
    };
    let gate = lodge_grpc::auth::Gatekeeper {
        tokens,
        certificates,
        audit,
        rejections: rejections.clone(),
    };
    Ok((Arc::new(gate), guard))
}

/// The areas of the tree the services answer from.
pub struct Areas {
    pub admin: Arc<AdminArea>,
    pub cluster: Arc<ClusterArea>,
    pub registry: Arc<RegistryArea>,
    pub translation: Arc<TranslationArea>,
    pub router: Arc<RouterArea>,
    pub balancer: Arc<BalancerParts>,
    pub workflows: Arc<WorkflowArea>,
}

/// What the services reach the tree by.
pub fn backends(
    cfg: &NodeConfig,
    plan: &ClusterPlan,
    areas: &Areas,
    data_addresses: Vec<String>,
) -> Backends {
    let cluster = &areas.cluster;
    Backends {
        admin: areas.admin.admin.clone(),
        raft: cluster.raft.clone(),
        store: cluster.store.clone(),
        members: cluster.members.clone(),
        member_id: cfg.node.id,
        incarnation: plan.incarnation,
        directory: cluster.directory.clone(),
        membership: cluster.membership.clone(),
        heartbeat_interval: plan.heartbeat_interval,
        peer_link: plan.peer_link.clone(),
        snapshot_spool: lodge_grpc::raft::SnapshotSpool {
            dir: plan.spool_dir.clone(),
            max_bytes: cfg.peer.max_snapshot_bytes,
        },
        faults: cluster.faults.clone(),
        registry: areas.registry.handle(),
        registry_metrics: areas.registry.metrics.clone(),
        kv_limits: cfg.kv_limits(),
        translation: areas.translation.gateway.clone(),
        router: server::RouterBackend {
            hub: areas.router.hub.clone(),
            table: areas.router.table.clone(),
            settings: areas.router.settings.clone(),
        },
        balancer: BalancerBackend {
            handle: areas.balancer.handle.clone(),
            raft: cluster.raft.clone(),
            listeners: Arc::new(std::sync::RwLock::new(data_addresses)),
            started: std::time::Instant::now(),
            module_networks: cfg
                .module_networks()
                .expect("validated at load")
                .map(Arc::new),
        },
        workflows: areas.workflows.handle(),
    }
}

/// The metrics page's registry: the servers', the actors', the process's, the cluster's and
/// every area's figures.
pub fn metrics_registry(
    areas: &Areas,
    actors: lodge_actors::ActorTable,
    balancer_metrics: &BalancerMetrics,
    tls_reloads: &lodge_grpc::tls::ReloadMetrics,
) -> (
    Arc<prometheus_client::registry::Registry>,
    Arc<ServerMetrics>,
) {
    let mut prom = prometheus_client::registry::Registry::default();
    let server_metrics = ServerMetrics::register(&mut prom);
    prom.register_collector(Box::new(ActorCollector(actors)));
    prom.register_collector(Box::new(ProcessCollector));
    prom.register_collector(Box::new(ClusterCollector(areas.cluster.directory.clone())));
    areas.registry.metrics.register(&mut prom);
    areas.router.metrics.register(&mut prom);
    balancer_metrics.register(&mut prom);
    areas.workflows.metrics.register(&mut prom);
    tls_reloads.register(&mut prom);
    (Arc::new(prom), server_metrics)
}

/// The running servers, and how to stop them.
pub struct Servers {
    /// The client port's server; answers whether its drain finished in time.
    pub client: JoinHandle<Result<bool, tonic::transport::Error>>,
    pub peer: JoinHandle<Result<bool, tonic::transport::Error>>,
    pub metrics: JoinHandle<()>,
    pub health: HealthReporter,
    /// Ends the streams that never end by themselves (watches, keep-alives).
    pub shutdown: watch::Sender<bool>,
    pub stop: oneshot::Sender<()>,
    pub peer_stop: oneshot::Sender<()>,
    /// Whether the peer port has TLS (then a member is known by its certificate).
    pub peer_tls: bool,
    /// The client, metrics and peer ports' addresses.
    pub local: (SocketAddr, SocketAddr, SocketAddr),
}

impl Node {
    /// Starts the client port, the peer port and the metrics page over the running tree.
    pub async fn serve(
        &self,
        actors: lodge_actors::ActorTable,
        listeners: Listeners,
    ) -> Result<Servers, String> {
        let (cfg, plan, areas, io) = (&self.cfg, &self.plan, &self.areas, &self.io);
        let (prom, server_metrics) =
            metrics_registry(areas, actors, &self.balancer_metrics, &self.tls.reloads);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let built = {
            let backends = backends(cfg, plan, areas, listeners.data_addresses);
            let settings = self.server_settings.clone();
            io.spawn(async move { server::node_services(backends, &settings, shutdown_rx).await })
                .await
        };
        let services = built.map_err(|e| e.to_string()).and_then(|r| r)?;
        let health = services.health.clone();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let (peer_stop, peer_stop_rx) = oneshot::channel::<()>();
        let client = {
            let settings = self.server_settings.clone();
            let metrics = server_metrics.clone();
            let grpc = listeners.grpc;
            io.spawn(async move {
                server::serve(&settings, grpc, services.routes, metrics, None, async {
                    let _ = stop_rx.await;
                })
                .await
            })
        };
        let peer_tls = self.peer_settings.tls.is_some();
        let gate = Arc::new(lodge_grpc::peer::PeerGate {
            cluster: plan.cluster.clone(),
            tls: peer_tls,
            rejections: areas.registry.metrics.clone(),
        });
        let peer = {
            let settings = self.peer_settings.clone();
            let metrics = server_metrics.clone();
            let peer = listeners.peer;
            io.spawn(async move {
                server::serve(
                    &settings,
                    peer,
                    services.peer_routes,
                    metrics,
                    Some(gate),
                    async {
                        let _ = peer_stop_rx.await;
                    },
                )
                .await
            })
        };
        let metrics_serving = crate::metrics::Serving {
            max_connections: cfg.metrics.max_connections,
            request_timeout: NodeConfig::duration(cfg.metrics.request_timeout_ms),
            rejections: areas.registry.metrics.clone(),
            tls: self.tls.metrics.clone(),
            token: self.tls.metrics_token.clone(),
        };
        let metrics = io.spawn(crate::metrics::serve(
            listeners.metrics,
            prom,
            metrics_serving,
        ));
        Ok(Servers {
            client,
            peer,
            metrics,
            health,
            shutdown,
            stop,
            peer_stop,
            peer_tls,
            local: (
                listeners.grpc_local,
                listeners.metrics_local,
                listeners.peer_local,
            ),
        })
    }
}
