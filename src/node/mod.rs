//! `lodge node`: wires configuration, the actor tree, the gRPC servers and the metrics page, and
//! runs the shutdown sequence. [`run`] reads in the order a node comes up:
//!
//! 1. [`preflight`]: the open-file limit; nothing open beyond loopback without protection;
//! 2. [`tls`]: certificates and the metrics token, followed for the node's whole life;
//! 3. [`listen`]: every socket, so that a taken port fails the start;
//! 4. [`cluster`]: the data directory and raft log, this member's addresses, ids and settings;
//! 5. [`tree`]: one function per area (cluster, admin, registry, translation, router,
//!    balancer), each returning what the next needs, and the supervision tree over them;
//! 6. [`lifecycle`]: the servers ([`serve`]), the start-up checks, "ready", and the drain.
//!
//! Threads: the main thread runs the actix system (supervisors and control actors), worker
//! arbiters run ordinary actors, and a multi-thread tokio runtime serves gRPC and /metrics.

mod cluster;
mod lifecycle;
mod listen;
mod preflight;
mod serve;
mod settings;
mod tls;
mod tree;

use std::sync::Arc;

use lodge_actors::balancer::metrics::BalancerMetrics;
use lodge_actors::registry::RegistryMetrics;
use lodge_actors::router::RouterMetrics;
use lodge_actors::translate::gateway::TranslationGateway;
use lodge_grpc::server::ServerSettings;

use crate::config::NodeConfig;

/// A start refused: the process's exit code, and what to tell the operator.
pub struct Refusal {
    code: i32,
    message: String,
}

impl Refusal {
    /// The configuration or the data directory does not allow a start (exit 2).
    fn config(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }

    /// Something the node needs failed (exit 1): a port taken, a log unreadable.
    fn failed(message: impl Into<String>) -> Self {
        Self {
            code: 1,
            message: message.into(),
        }
    }
}

/// Runs a node until SIGTERM/SIGINT (exit 0) or until the actor tree gives up (exit 1); a node
/// refused at start (configuration, identity) exits 2. `force_new_cluster`: make this member the
/// only member of its cluster first (`--force-new-cluster`, see `lodge_actors::cluster::force`).
pub fn run(cfg: NodeConfig, force_new_cluster: bool) -> i32 {
    let (log, _log_guard) = crate::logging::build(&cfg.log.level, &cfg.log.format, cfg.node.id);
    match start(cfg, force_new_cluster, log) {
        Ok(code) => code,
        Err(r) => {
            eprintln!("lodge: {}", r.message);
            r.code
        }
    }
}

fn start(cfg: NodeConfig, force_new_cluster: bool, log: slog::Logger) -> Result<i32, Refusal> {
    preflight::check(&cfg, &log)?;
    let tls = tls::NodeTls::load(&cfg, &log)?;
    let registry_metrics = RegistryMetrics::default();
    let (gate, _audit_guard) =
        serve::gatekeeper(&cfg, &registry_metrics).map_err(Refusal::config)?;
    let gateway_settings = Arc::new(settings::gateway(&cfg));
    TranslationGateway::new(gateway_settings.clone())
        .map_err(|e| Refusal::config(format!("configuration error: {e}")))?;
    let server_settings =
        settings::server(&cfg, tls.server.clone(), registry_metrics.clone(), gate);
    let io_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("lodge-io")
        .enable_all()
        .build()
        .expect("building the I/O runtime");
    tls.follow(&io_rt);
    let mut listeners = listen::bind(&cfg, &io_rt)?;
    let plan = cluster::plan(
        &cfg,
        force_new_cluster,
        listeners.grpc_local,
        listeners.peer_local,
    )?;

    let io = io_rt.handle().clone();
    let system = actix_rt::System::new();
    let code = system.block_on(async move {
        let actors: tree::ActorTableSlot = Default::default();
        let cluster = tree::cluster(&cfg, &plan, &actors, &io, &log);
        let admin = tree::admin(&cfg, &cluster, &actors);
        let registry = tree::registry(&cfg, &cluster, registry_metrics, &log);
        let translation = tree::translation(gateway_settings);
        let router = tree::router(&cfg, &cluster, RouterMetrics::default(), &log);
        let balancer_metrics = Arc::new(BalancerMetrics::default());
        let data = std::mem::take(&mut listeners.data);
        let balancer = tree::balancer(&cfg, &cluster, data, balancer_metrics.clone(), &io, &log);
        let workflows = tree::workflows(&cfg, &cluster, &log);
        let areas = serve::Areas {
            admin,
            cluster,
            registry,
            translation,
            router,
            balancer,
            workflows,
        };
        let root = tree::root_spec(
            areas.admin.clone(),
            areas.cluster.clone(),
            areas.registry.clone(),
            areas.translation.clone(),
            areas.router.clone(),
            areas.balancer.clone(),
            areas.workflows.clone(),
        );
        let peer_settings = ServerSettings {
            tls: tls.peer.clone(),
            ..server_settings.clone()
        };
        lifecycle::Node {
            cfg,
            plan,
            areas,
            actors,
            balancer_metrics,
            tls,
            server_settings,
            peer_settings,
            io,
            log,
        }
        .live(root, listeners)
        .await
    });
    io_rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(code)
}
