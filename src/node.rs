//! `lodge node`: wires configuration, the actor tree, the gRPC server and the metrics page, and
//! runs the shutdown sequence.
//!
//! Threads: the main thread runs the actix system (supervisors and control actors), worker
//! arbiters run ordinary actors, and a multi-thread tokio runtime serves gRPC and /metrics.

use std::sync::Arc;

use lodge_actors::admin::{AdminActor, NodeFacts};
use lodge_actors::balancer::autoscale::Leads;
use lodge_actors::balancer::dataplane::{cannot_listen, DataPlaneSettings, ListenerSpec};
use lodge_actors::balancer::hook::DeployHook;
use lodge_actors::balancer::metrics::BalancerMetrics;
use lodge_actors::balancer::{BalancerParts, DataPlane};
use lodge_actors::cluster::disk::Disk;
use lodge_actors::cluster::fault::Faults;
use lodge_actors::cluster::force::ForceNewCluster;
use lodge_actors::cluster::members::{
    HeartbeatSender, Membership, MembershipSettings, ResourceProbe, Resources,
};
use lodge_actors::cluster::raft::{RaftNode, RaftSettings};
use lodge_actors::cluster::store::Store;
use lodge_actors::cluster::topology::Directory;
use lodge_actors::cluster::transport::Transport;
use lodge_actors::registry::index::ClientTable;
use lodge_actors::registry::{
    LeaseKeeper, RegistryHandle, RegistryIndex, RegistryMetrics, RegistrySettings,
};
use lodge_actors::router::hub::SessionTable;
use lodge_actors::router::{OwnerStore, RouterHub, RouterMetrics, RouterSettings};
use lodge_actors::supervision::Exit;
use lodge_actors::translate::gateway::{GatewaySettings, TranslationGateway};
use lodge_actors::translate::BackendConfig;
use lodge_actors::{
    clock, ActorRef, Backoff, ChildSpec, Placement, RestartLimit, Runtime, RuntimeConfig, Strategy,
    SupervisorSpec,
};
use lodge_grpc::balancer::probe::GrpcModuleProbe;
use lodge_grpc::balancer::service::BalancerBackend;
use lodge_grpc::cluster::GrpcHeartbeats;
use lodge_grpc::forward::Forwarder;
use lodge_grpc::metrics::ServerMetrics;
use lodge_grpc::pb::router::Frame;
use lodge_grpc::peer::PeerLink;
use lodge_grpc::raft::GrpcTransport;
use lodge_grpc::registry::GrpcLeaseKeeper;
use lodge_grpc::server::{self, ServerSettings};
use lodge_grpc::store::KvStore;
use slog::{error, info, warn};

use crate::config::NodeConfig;
use crate::metrics::{ActorCollector, ClusterCollector, ProcessCollector};

fn runtime_config(c: &NodeConfig) -> RuntimeConfig {
    let s = &c.supervision;
    let workers = match c.runtime.worker_arbiters {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    RuntimeConfig {
        worker_arbiters: workers,
        mailbox_capacity: c.runtime.mailbox_capacity,
        restart_limit: RestartLimit {
            max_restarts: s.max_restarts,
            within: NodeConfig::duration(s.restart_window_ms),
        },
        backoff: Backoff {
            initial: NodeConfig::duration(s.backoff_initial_ms),
            max: NodeConfig::duration(s.backoff_max_ms),
            jitter: s.backoff_jitter,
        },
        shutdown_timeout: NodeConfig::duration(s.shutdown_timeout_ms),
    }
}

/// Raises this process's soft limit on open files to its hard limit (1,024 is a common soft
/// default, below `server.max_connections` plus everything else a node opens), and answers the
/// limit in force.
fn raise_fd_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Who may call what, from `[auth]`, and the audit log from `[audit]` (with the guard that
/// flushes it at exit).
fn gatekeeper(
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
/// How often the TLS files are checked for a change (SIGHUP checks at once).
const TLS_POLL: std::time::Duration = std::time::Duration::from_secs(5);

fn server_settings(
    c: &NodeConfig,
    tls: Option<Arc<lodge_grpc::tls::ReloadingTls>>,
    registry_metrics: RegistryMetrics,
    gate: Arc<lodge_grpc::auth::Gatekeeper>,
) -> ServerSettings {
    let s = &c.server;
    ServerSettings {
        tls,
        admission: lodge_grpc::listener::Admission {
            max_connections: s.max_connections,
            per_ip: lodge_grpc::listener::PerIpLimits {
                rate: s.per_ip_connection_rate,
                window: NodeConfig::duration(s.per_ip_window_ms),
                max_open: s.per_ip_max_connections,
                metrics: registry_metrics,
            },
            exempt: c.per_ip_exempt().expect("validated at load"),
            proxies: c.trusted_proxies().expect("validated at load"),
            handshake_timeout: NodeConfig::duration(s.handshake_timeout_ms),
            idle_timeout: (s.idle_timeout_ms > 0).then(|| NodeConfig::duration(s.idle_timeout_ms)),
        },
        max_concurrent_rpcs: s.max_concurrent_rpcs,
        max_concurrent_streams: s.max_concurrent_streams,
        max_message_bytes: s.max_message_bytes,
        request_timeout: NodeConfig::duration(s.request_timeout_ms),
        keepalive_interval: NodeConfig::duration(s.keepalive_interval_ms),
        keepalive_timeout: NodeConfig::duration(s.keepalive_timeout_ms),
        drain_timeout: NodeConfig::duration(s.drain_timeout_ms),
        stream_window: c.router.stream_window_bytes,
        connection_window: c.router.connection_window_bytes,
        gate,
    }
}

fn router_settings(c: &NodeConfig) -> RouterSettings {
    let r = &c.router;
    RouterSettings {
        member_id: c.node.id,
        rendezvous_timeout: NodeConfig::duration(r.rendezvous_timeout_ms),
        idle_timeout: NodeConfig::duration(r.idle_timeout_ms),
        stall_timeout: NodeConfig::duration(r.stall_timeout_ms),
        queue_frames: r.queue_frames,
        owner_lease_ttl: NodeConfig::duration(r.owner_lease_ttl_ms),
        request_timeout: NodeConfig::duration(c.server.request_timeout_ms),
    }
}

fn gateway_settings(c: &NodeConfig) -> GatewaySettings {
    let t = &c.translation;
    let timeout = NodeConfig::duration(t.request_timeout_ms);
    GatewaySettings {
        backend: (!t.backend_url.is_empty()).then(|| BackendConfig {
            url: t.backend_url.clone(),
            model: t.model.clone(),
            api_key: (!t.api_key.is_empty()).then(|| t.api_key.clone()),
            timeout,
            // A probe is a quick GET; a backend that needs longer is not ready.
            probe_timeout: NodeConfig::duration(t.probe_interval_ms).min(timeout),
        }),
        probe_interval: NodeConfig::duration(t.probe_interval_ms),
        chunk_chars: t.chunk_chars,
    }
}

fn registry_settings(c: &NodeConfig) -> RegistrySettings {
    let t = &c.translation;
    RegistrySettings {
        member_id: c.node.id,
        interval: NodeConfig::duration(c.registry.heartbeat_interval_ms),
        max_misses: c.registry.max_missed_heartbeats,
        max_jobs: t.max_jobs_per_client,
        queue: t.queue_per_client,
        rate_per_second: t.requests_per_second,
        rate_burst: t.burst,
        request_timeout: NodeConfig::duration(c.server.request_timeout_ms),
    }
}

/// What the tree's actors are built from.
struct TreeParts {
    admin: ActorRef<AdminActor>,
    faults: Faults,
    raft: ActorRef<RaftNode>,
    registry: Arc<std::sync::OnceLock<lodge_actors::ActorTable>>,
    facts: Arc<NodeFacts>,
    allow_mutations: bool,
    raft_settings: RaftSettings,
    disk: Disk,
    transport: Arc<dyn Transport>,
    directory: Directory,
    membership: ActorRef<Membership>,
    membership_settings: MembershipSettings,
    heartbeats: Arc<dyn HeartbeatSender>,
    probe: ResourceProbe,
    registry_settings: Arc<RegistrySettings>,
    registry_index: ActorRef<RegistryIndex>,
    client_table: ClientTable,
    lease_keeper: Arc<dyn LeaseKeeper>,
    registry_metrics: RegistryMetrics,
    gateway: ActorRef<TranslationGateway>,
    gateway_settings: Arc<GatewaySettings>,
    router_hub: ActorRef<RouterHub<Frame>>,
    router_table: SessionTable<Frame>,
    router_settings: Arc<RouterSettings>,
    owner_store: Arc<dyn OwnerStore>,
    router_metrics: RouterMetrics,
    balancer: Arc<BalancerParts>,
    log: slog::Logger,
}

/// The supervision tree of a node. `/node` is rest_for_one: a later child may depend on an
/// earlier one, never the reverse.
///
/// ```text
/// /node                        rest_for_one
/// ├── /node/admin              introspection (own arbiter)
/// └── /node/cluster            rest_for_one
///     ├── /node/cluster/raft         the raft member (own arbiter)
///     ├── /node/cluster/members      one_for_one; /node/cluster/members/<id>, one per member
///     └── /node/cluster/membership   keeps members/ equal to the topology, sends heartbeats
/// ├── /node/registry           one_for_all
/// │   ├── /node/registry/clients     one_for_one; /node/registry/clients/<client_id>
/// │   └── /node/registry/index       loads and watches registrations, writes them
/// ├── /node/translation        the translation gateway (backend probe, jobs)
/// ├── /node/router             one_for_all
/// │   ├── /node/router/sessions      one_for_one; /node/router/sessions/<key>, one per session
/// │   └── /node/router/hub           session table, owner records, agents' listen streams
/// └── /node/balancer           one_for_all
///     ├── /node/balancer/modules     one_for_one; /node/balancer/modules/<instance_id>
///     ├── /node/balancer/state       loads and watches the balancer's keys; publishes the view
///     ├── /node/balancer/scaler      the autoscaler (acts on the leader)
///     └── /node/balancer/listeners   one_for_one; /node/balancer/listeners/<n>, the data plane
/// ```
fn root_spec(p: TreeParts) -> SupervisorSpec {
    let p = Arc::new(p);
    SupervisorSpec::new(Strategy::RestForOne, move || {
        let admin = {
            let p = p.clone();
            ChildSpec::actor_for("admin", &p.admin.clone(), move || {
                AdminActor::new(
                    p.registry.get().expect("registry set before start").clone(),
                    p.facts.clone(),
                    p.allow_mutations,
                )
                .with_faults(p.faults.clone())
            })
            // Its own thread: a ListActors scan over 100 k actors must not delay supervision.
            .placement(Placement::Dedicated("admin"))
        };
        let cluster = {
            let p = p.clone();
            SupervisorSpec::new(Strategy::RestForOne, move || {
                let raft = {
                    let p = p.clone();
                    ChildSpec::actor_for("raft", &p.raft.clone(), move || {
                        // A member that cannot read its log must not run; the supervisor retries.
                        RaftNode::new(
                            p.raft_settings.clone(),
                            p.disk.clone(),
                            p.transport.clone(),
                            p.directory.clone(),
                            &p.log,
                        )
                        .unwrap_or_else(|e| panic!("{e}"))
                    })
                    // Its own thread, so that client traffic cannot starve its ticks.
                    .placement(Placement::Dedicated("raft"))
                };
                // Member actors are added by the membership actor as the topology changes.
                let (members, members_ref) = ChildSpec::supervisor(
                    "members",
                    SupervisorSpec::new(Strategy::OneForOne, Vec::new),
                );
                let membership = {
                    let p = p.clone();
                    ChildSpec::actor_for("membership", &p.membership.clone(), move || {
                        Membership::new(
                            p.membership_settings.clone(),
                            p.directory.clone(),
                            members_ref.clone(),
                            p.raft.clone(),
                            p.heartbeats.clone(),
                            p.probe.clone(),
                            &p.log,
                        )
                    })
                };
                vec![raft, members, membership]
            })
        };
        let registry = {
            let p = p.clone();
            SupervisorSpec::new(Strategy::OneForAll, move || {
                let (clients, clients_ref) = ChildSpec::supervisor(
                    "clients",
                    SupervisorSpec::new(Strategy::OneForOne, Vec::new),
                );
                let index = {
                    let p = p.clone();
                    ChildSpec::actor_for("index", &p.registry_index.clone(), move || {
                        // Its client actors died with the previous incarnation (one_for_all).
                        p.client_table.write().unwrap().clear();
                        RegistryIndex::new(
                            p.registry_settings.clone(),
                            p.raft.clone(),
                            clients_ref.clone(),
                            p.client_table.clone(),
                            p.lease_keeper.clone(),
                            p.registry_metrics.clone(),
                            &p.log,
                        )
                    })
                };
                vec![clients, index]
            })
        };
        let translation = {
            let p = p.clone();
            ChildSpec::actor_for("translation", &p.gateway.clone(), move || {
                TranslationGateway::new(p.gateway_settings.clone())
                    .expect("the backend configuration is checked before start")
            })
        };
        let router = {
            let p = p.clone();
            SupervisorSpec::new(Strategy::OneForAll, move || {
                let (sessions, sessions_ref) = ChildSpec::supervisor(
                    "sessions",
                    SupervisorSpec::new(Strategy::OneForOne, Vec::new),
                );
                let p = p.clone();
                let hub = ChildSpec::actor_for("hub", &p.router_hub.clone(), move || {
                    RouterHub::new(
                        p.router_settings.clone(),
                        p.owner_store.clone(),
                        sessions_ref.clone(),
                        p.router_table.clone(),
                        p.router_metrics.clone(),
                        &p.log,
                    )
                });
                vec![sessions, hub]
            })
        };
        vec![
            admin,
            ChildSpec::supervisor("cluster", cluster).0,
            ChildSpec::supervisor("registry", registry).0,
            translation,
            ChildSpec::supervisor("router", router).0,
            ChildSpec::supervisor("balancer", BalancerParts::supervisor(p.balancer.clone())).0,
        ]
    })
}

/// This node's cluster id: the stored one; else, for a founding member, derived from the initial
/// members (or drawn for a one-member cluster) and stored; a joining node learns it in its join.
fn cluster_id(
    cfg: &NodeConfig,
    join: &[String],
    members: &std::collections::BTreeMap<u64, String>,
) -> Result<lodge_grpc::peer::ClusterId, String> {
    let dir = &cfg.node.data_dir;
    if let Some(id) = crate::cluster_id::load(dir)? {
        return Ok(lodge_grpc::peer::ClusterId::known(id));
    }
    if !join.is_empty() {
        return Ok(Default::default());
    }
    let id = if cfg.cluster.initial_cluster.trim().is_empty() {
        crate::cluster_id::random()
    } else {
        crate::cluster_id::derive(members, &cfg.cluster.initial_cluster_token)
    };
    crate::cluster_id::store(dir, id)?;
    Ok(lodge_grpc::peer::ClusterId::known(id))
}

/// Runs a node until SIGTERM/SIGINT (exit 0) or until the actor tree gives up (exit 1); a node
/// refused at start (configuration, identity) exits 2. `force_new_cluster`: make this member the
/// only member of its cluster first (`--force-new-cluster`, see `lodge_actors::cluster::force`).
pub fn run(cfg: NodeConfig, force_new_cluster: bool) -> i32 {
    let (log, _log_guard) = crate::logging::build(&cfg.log.level, &cfg.log.format, cfg.node.id);
    let fds = raise_fd_limit();
    let wanted = (cfg.server.max_connections)
        .saturating_add(cfg.metrics.max_connections)
        .saturating_add(256);
    if fds < wanted as u64 {
        warn!(log, "the open-file limit is below what the connection limits need: connections past it are refused at accept";
            "limit" => fds, "needed" => wanted);
    }
    // Secure by default: nothing beyond loopback without TLS and authentication, unless the
    // operator says so (docs/security.md, "Secure by default").
    let open = cfg.unprotected_listeners();
    if !open.is_empty() {
        if !cfg.server.insecure {
            eprintln!(
                "lodge: refusing to start: {}. Anyone who reaches it could use it: turn those on, \
                 listen on loopback, or start with --insecure (server.insecure = true) on a \
                 network you trust",
                open.join("; ")
            );
            return 2;
        }
        warn!(log, "starting insecure (--insecure): open beyond loopback without TLS or authentication";
            "open" => open.join("; "));
    }
    // TLS files are followed (re-read on change and on SIGHUP) for the node's whole life.
    let tls_reloads = lodge_grpc::tls::ReloadMetrics::default();
    let load_tls =
        |files: Result<Option<lodge_grpc::tls::TlsFiles>, crate::config::ConfigError>,
         alpn: &[u8]| {
            let files = files.map_err(|e| e.to_string())?;
            files
                .map(|f| {
                    lodge_grpc::tls::ReloadingTls::load(
                        f,
                        vec![alpn.to_vec()],
                        tls_reloads.clone(),
                        log.clone(),
                    )
                    .map_err(|e| format!("configuration error: {e}"))
                })
                .transpose()
        };
    let (tls, metrics_tls, metrics_token) = match (
        load_tls(cfg.tls_material(), b"h2"),
        load_tls(cfg.metrics_tls(), b"http/1.1"),
        cfg.metrics_token(),
    ) {
        (Ok(t), Ok(m), Ok(token)) => (t, m, token),
        (Err(e), _, _) | (_, Err(e), _) => {
            eprintln!("lodge: {e}");
            return 2;
        }
        (_, _, Err(e)) => {
            eprintln!("lodge: {e}");
            return 2;
        }
    };
    if cfg.auth.enabled && !cfg.peer.tls.enabled {
        warn!(log, "auth is on but peer TLS is off: every caller of the peer port is taken for a member, so local processes could go around auth there; turn on [peer.tls]";
            "peer.listen" => &cfg.peer.listen);
    }
    let registry_metrics = RegistryMetrics::default();
    let router_metrics = RouterMetrics::default();
    let (gate, _audit_guard) = match gatekeeper(&cfg, &registry_metrics) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("lodge: {e}");
            return 2;
        }
    };
    let gateway_settings = Arc::new(gateway_settings(&cfg));
    if let Err(e) = TranslationGateway::new(gateway_settings.clone()) {
        eprintln!("lodge: configuration error: {e}");
        return 2;
    }
    let peer_tls = match load_tls(cfg.peer_tls_material(), b"h2") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("lodge: {e}");
            return 2;
        }
    };
    let settings = server_settings(&cfg, tls.clone(), registry_metrics.clone(), gate);
    // The peer port: the same server settings, its own TLS (always mutual).
    let peer_settings = ServerSettings {
        tls: peer_tls.clone(),
        ..settings.clone()
    };
    let tokio_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("lodge-io")
        .enable_all()
        .build()
        .expect("building the I/O runtime");
    // SIGHUP re-reads the TLS files (and no longer ends the process). Installed before the node
    // says it is ready, so a SIGHUP after that is never fatal.
    let (hup_tx, hup_rx) = tokio::sync::watch::channel(0u64);
    let mut hup = tokio_rt
        .block_on(async { tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) })
        .expect("SIGHUP handler");
    tokio_rt.spawn(async move {
        while hup.recv().await.is_some() {
            hup_tx.send_modify(|n| *n += 1);
        }
    });
    for followed in [&tls, &peer_tls, &metrics_tls].into_iter().flatten() {
        tokio_rt.spawn(followed.clone().follow(TLS_POLL, hup_rx.clone()));
    }
    if let Err(e) = std::fs::create_dir_all(&cfg.node.data_dir) {
        eprintln!(
            "lodge: configuration error: node.data_dir: cannot create {}: {e}",
            cfg.node.data_dir.display()
        );
        return 2;
    }
    let grpc_addr = cfg.grpc_addr().expect("validated");
    let metrics_addr = cfg.metrics_addr().expect("validated");
    let peer_addr = cfg.peer_addr().expect("validated");
    let listeners = tokio_rt.block_on(async {
        let grpc = server::bind(grpc_addr)
            .await
            .map_err(|e| cannot_listen(grpc_addr, "server.listen", &e))?;
        let metrics = server::bind(metrics_addr)
            .await
            .map_err(|e| cannot_listen(metrics_addr, "metrics.listen", &e))?;
        let peer = server::bind(peer_addr)
            .await
            .map_err(|e| cannot_listen(peer_addr, "peer.listen", &e))?;
        Ok::<_, String>((grpc, metrics, peer))
    });
    let (grpc_listener, metrics_listener, peer_listener) = match listeners {
        Ok(l) => l,
        Err(e) => {
            eprintln!("lodge: {e}");
            return 1;
        }
    };
    let grpc_local = grpc_listener.local_addr().expect("bound socket");
    let metrics_local = metrics_listener.local_addr().expect("bound socket");
    let peer_local = peer_listener.local_addr().expect("bound socket");
    // The data plane's sockets are bound here, so that a taken port fails the start; a listener
    // actor's later incarnations bind their address again (see `dataplane`).
    let mut data_listeners = Vec::new();
    for (addr, protocol) in cfg.balancer_listeners().expect("validated") {
        match std::net::TcpListener::bind(addr).and_then(|s| ListenerSpec::new(s, protocol)) {
            Ok(spec) => data_listeners.push(spec),
            Err(e) => {
                eprintln!("lodge: {}", cannot_listen(addr, "balancer.listen", &e));
                return 1;
            }
        }
    }
    let data_addresses: Vec<String> = data_listeners
        .iter()
        .map(|l| l.address().to_string())
        .collect();

    let disk = match Disk::open(&cfg.node.data_dir.join("raft")) {
        Ok((disk, recovered)) => {
            if force_new_cluster
                && recovered
                    .snapshot
                    .get_metadata()
                    .get_conf_state()
                    .voters
                    .is_empty()
            {
                eprintln!(
                    "lodge: --force-new-cluster: {} holds no raft log; the flag recovers a member from its own data directory",
                    cfg.node.data_dir.display()
                );
                return 2;
            }
            disk
        }
        Err(e) => {
            eprintln!("lodge: {e}");
            return 1;
        }
    };
    let advertise = if cfg.cluster.advertise.is_empty() {
        grpc_local.to_string()
    } else {
        cfg.cluster.advertise.clone()
    };
    let peer_advertise = if cfg.peer.advertise.is_empty() {
        peer_local.to_string()
    } else {
        cfg.peer.advertise.clone()
    };
    let several =
        !cfg.cluster.initial_cluster.trim().is_empty() || !cfg.cluster.join.trim().is_empty();
    if several && peer_local.ip().is_unspecified() && cfg.peer.advertise.is_empty() {
        eprintln!(
            "lodge: configuration error: peer.advertise: required when peer.listen is a wildcard ({peer_local}) in a cluster: other members need an address they can dial"
        );
        return 2;
    }
    if let Err(e) = crate::identity::check_own_entry(&cfg, peer_local) {
        eprintln!("lodge: {e}");
        return 2;
    }
    // Tells this process apart from any other that runs (or ran) as the same member.
    let incarnation = fastrand::u64(1..);
    let join = cfg.join_endpoints().expect("validated");
    let mut members = cfg.members().expect("validated");
    if cfg.cluster.initial_cluster.trim().is_empty() {
        // A one-member cluster: this node at the peer address it really listens on.
        members.insert(cfg.node.id, peer_advertise.clone());
    }
    let cluster = match cluster_id(&cfg, &join, &members) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lodge: {e}");
            return 2;
        }
    };
    let peer_link = PeerLink {
        tls: cfg.peer_client_tls(),
        cluster: cluster.clone(),
    };
    let spool_dir = cfg.node.data_dir.join("snapshots-in");
    // What a previous process left half received is of no use.
    let _ = std::fs::remove_dir_all(&spool_dir);
    if let Err(e) = std::fs::create_dir_all(&spool_dir) {
        eprintln!(
            "lodge: node.data_dir: cannot create {}: {e}",
            spool_dir.display()
        );
        return 2;
    }
    let directory = Directory::default();
    directory.set_client_address(cfg.node.id, &advertise);
    // Reachable before the raft member publishes the topology from its log.
    directory.hint(members.clone());
    let raft_settings = RaftSettings {
        id: cfg.node.id,
        // A joining node starts empty and waits for the leader's snapshot.
        initial_members: if join.is_empty() {
            members.clone().into_iter().collect()
        } else {
            Vec::new()
        },
        tick: NodeConfig::duration(cfg.cluster.tick_ms),
        election_ticks: cfg.cluster.election_ticks,
        heartbeat_ticks: cfg.cluster.heartbeat_ticks,
        snapshot_interval: cfg.cluster.snapshot_interval,
        read_timeout: NodeConfig::duration(cfg.server.request_timeout_ms),
        watch_history: cfg.cluster.watch_history,
        force_new_cluster: force_new_cluster.then(|| ForceNewCluster::new(peer_advertise.clone())),
    };
    let heartbeat_interval = NodeConfig::duration(cfg.cluster.heartbeat_interval_ms);
    let membership_settings = MembershipSettings {
        self_id: cfg.node.id,
        incarnation,
        heartbeat_interval,
        heartbeat_timeout: NodeConfig::duration(cfg.cluster.heartbeat_timeout_ms),
    };
    let facts = Arc::new(NodeFacts {
        node_id: cfg.node.id,
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_at_ms: clock::precise_ms(),
        config_json: cfg.redacted_json(),
    });
    let io = tokio_rt.handle().clone();
    let system = actix_rt::System::new();
    let code = system.block_on(async move {
        let admin_ref: ActorRef<AdminActor> = ActorRef::default();
        let raft_ref: ActorRef<RaftNode> = ActorRef::default();
        let registry_slot = Arc::new(std::sync::OnceLock::new());
        let faults = Faults::new(Some(disk.clone()));
        let transport: Arc<dyn Transport> = GrpcTransport::new(
            io.clone(),
            cfg.node.id,
            raft_ref.clone(),
            faults.clone(),
            directory.clone(),
            peer_link.clone(),
            log.clone(),
        );
        let membership_ref: ActorRef<Membership> = ActorRef::default();
        let registry_index: ActorRef<RegistryIndex> = ActorRef::default();
        let gateway_ref: ActorRef<TranslationGateway> = ActorRef::default();
        let client_table: ClientTable = Default::default();
        let lease_keeper: Arc<dyn LeaseKeeper> = GrpcLeaseKeeper::new(
            raft_ref.clone(),
            Arc::new(Forwarder::new(cfg.node.id, directory.clone(), peer_link.clone())),
        );
        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        let router_hub: ActorRef<RouterHub<Frame>> = ActorRef::default();
        let router_table: SessionTable<Frame> = Default::default();
        let router_settings = Arc::new(router_settings(&cfg));
        let owner_store: Arc<dyn OwnerStore> = Arc::new(lodge_grpc::router_store::KvOwnerStore::new(
            lodge_grpc::kv::KvService::new(
                raft_ref.clone(),
                Arc::new(Forwarder::new(cfg.node.id, directory.clone(), peer_link.clone())),
                NodeConfig::duration(cfg.server.request_timeout_ms),
                shutdown_rx.clone(),
            )
            .with_limits(cfg.kv_limits(), cfg.server.max_message_bytes, registry_metrics.clone()),
            lease_keeper.clone(),
            raft_ref.clone(),
        ));
        let balancer_metrics = Arc::new(BalancerMetrics::default());
        let balancer_store: Arc<dyn Store> = Arc::new(KvStore::new(
            lodge_grpc::kv::KvService::new(
                raft_ref.clone(),
                Arc::new(Forwarder::new(cfg.node.id, directory.clone(), peer_link.clone())),
                NodeConfig::duration(cfg.server.request_timeout_ms),
                shutdown_rx.clone(),
            )
            .with_limits(cfg.kv_limits(), cfg.server.max_message_bytes, registry_metrics.clone()),
            lease_keeper.clone(),
            raft_ref.clone(),
            NodeConfig::duration(cfg.server.request_timeout_ms),
        ));
        let leads: Leads = {
            let directory = directory.clone();
            Arc::new(move || directory.figures().is_leader)
        };
        let balancer = Arc::new(
            BalancerParts::new(
                balancer_store,
                Arc::new(GrpcModuleProbe::new()),
                balancer_metrics.clone(),
                DeployHook::new(cfg.balancer.deploy_hook.clone(), &log).map(Arc::new),
                cfg.node.id,
                leads,
                &log,
            )
            .with_dataplane(DataPlane::new(
                data_listeners,
                DataPlaneSettings {
                    sniff_timeout: NodeConfig::duration(cfg.balancer.sniff_timeout_ms),
                    connect_timeout: NodeConfig::duration(cfg.balancer.connect_timeout_ms),
                    connect_attempts: cfg.balancer.connect_attempts,
                    buffer_bytes: cfg.balancer.buffer_bytes,
                    max_connections: cfg.balancer.max_connections,
                    idle_timeout: (cfg.balancer.idle_timeout_ms > 0)
                        .then(|| NodeConfig::duration(cfg.balancer.idle_timeout_ms)),
                },
                io.clone(),
            )),
        );
        let probe: ResourceProbe = {
            let registry_slot = registry_slot.clone();
            Arc::new(move || {
                let (cpu_seconds, memory_bytes) = crate::metrics::cpu_and_rss();
                Resources {
                    memory_bytes,
                    cpu_seconds,
                    actors: registry_slot.get().map_or(0, |r: &lodge_actors::ActorTable| r.len() as u64),
                    applied_index: 0,
                }
            })
        };
        let root = root_spec(TreeParts {
            admin: admin_ref.clone(),
            faults: faults.clone(),
            raft: raft_ref.clone(),
            registry: registry_slot.clone(),
            facts,
            allow_mutations: cfg.admin.allow_mutations,
            raft_settings,
            disk,
            transport,
            directory: directory.clone(),
            membership: membership_ref.clone(),
            membership_settings,
            heartbeats: Arc::new(GrpcHeartbeats::new(io.clone(), peer_link.clone(), advertise.clone(), heartbeat_interval, &log)),
            probe,
            registry_settings: Arc::new(registry_settings(&cfg)),
            registry_index: registry_index.clone(),
            client_table: client_table.clone(),
            lease_keeper,
            registry_metrics: registry_metrics.clone(),
            gateway: gateway_ref.clone(),
            gateway_settings,
            router_hub: router_hub.clone(),
            router_table: router_table.clone(),
            router_settings: router_settings.clone(),
            owner_store,
            router_metrics: router_metrics.clone(),
            balancer: balancer.clone(),
            log: log.clone(),
        });
        let mut runtime = Runtime::start(runtime_config(&cfg), log.clone(), root);
        let _ = registry_slot.set(runtime.actor_table().clone());
        let tree_exit = runtime.wait_exit();
        tokio::pin!(tree_exit);
        // Serve (and say "ready") only once every actor is up: a call arriving earlier would find
        // /node/admin or the raft member not running yet.
        let started = runtime.wait_started();
        let failed_early = tokio::select! {
            _ = started => None,
            exit = &mut tree_exit => Some(exit),
        };
        if let Some(exit) = failed_early {
            error!(log, "the actor tree failed while starting"; "exit" => ?exit);
            runtime.stop_arbiters();
            return 1;
        }

        let mut prom = prometheus_client::registry::Registry::default();
        let server_metrics = ServerMetrics::register(&mut prom);
        prom.register_collector(Box::new(ActorCollector(runtime.actor_table().clone())));
        prom.register_collector(Box::new(ProcessCollector));
        prom.register_collector(Box::new(ClusterCollector(directory.clone())));
        registry_metrics.register(&mut prom);
        router_metrics.register(&mut prom);
        balancer_metrics.register(&mut prom);
        tls_reloads.register(&mut prom);
        let prom = Arc::new(prom);

        let built = {
            let backends = server::Backends {
                admin: admin_ref.clone(),
                raft: raft_ref.clone(),
                member_id: cfg.node.id,
                incarnation,
                directory: directory.clone(),
                membership: membership_ref.clone(),
                heartbeat_interval,
                peer_link: peer_link.clone(),
                snapshot_spool: lodge_grpc::raft::SnapshotSpool {
                    dir: spool_dir.clone(),
                    max_bytes: cfg.peer.max_snapshot_bytes,
                },
                faults: faults.clone(),
                registry: RegistryHandle::new(registry_index.clone(), client_table.clone()),
                registry_metrics: registry_metrics.clone(),
                kv_limits: cfg.kv_limits(),
                translation: gateway_ref.clone(),
                router: server::RouterBackend {
                    hub: router_hub.clone(),
                    table: router_table.clone(),
                    settings: router_settings.clone(),
                },
                balancer: BalancerBackend {
                    handle: balancer.handle.clone(),
                    raft: raft_ref.clone(),
                    listeners: Arc::new(std::sync::RwLock::new(data_addresses.clone())),
                    started: std::time::Instant::now(),
                    module_networks: cfg
                        .module_networks()
                        .expect("validated at load")
                        .map(Arc::new),
                },
            };
            let settings = settings.clone();
            io.spawn(async move { server::node_services(backends, &settings, shutdown_rx).await }).await
        };
        let services = match built.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(s) => s,
            Err(e) => {
                error!(log, "cannot build services"; "error" => e);
                return 1;
            }
        };
        let health = services.health.clone();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (peer_stop_tx, peer_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut server_task = {
            let settings = settings.clone();
            let metrics = server_metrics.clone();
            io.spawn(async move {
                server::serve(&settings, grpc_listener, services.routes, metrics, None, async {
                    let _ = stop_rx.await;
                })
                .await
            })
        };
        let gate_tls = peer_settings.tls.is_some();
        let gate = Arc::new(lodge_grpc::peer::PeerGate {
            cluster: cluster.clone(),
            tls: gate_tls,
            rejections: registry_metrics.clone(),
        });
        let mut peer_task = {
            let metrics = server_metrics.clone();
            io.spawn(async move {
                server::serve(&peer_settings, peer_listener, services.peer_routes, metrics, Some(gate), async {
                    let _ = peer_stop_rx.await;
                })
                .await
            })
        };
        let metrics_serving = crate::metrics::Serving {
            max_connections: cfg.metrics.max_connections,
            request_timeout: NodeConfig::duration(cfg.metrics.request_timeout_ms),
            rejections: registry_metrics.clone(),
            tls: metrics_tls.clone(),
            token: metrics_token.clone(),
        };
        let metrics_task = io.spawn(crate::metrics::serve(metrics_listener, prom, metrics_serving));
        let (sig_tx, mut sig_rx) = tokio::sync::oneshot::channel::<&'static str>();
        io.spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).expect("SIGINT handler");
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            let _ = sig_tx.send(name);
            // A second signal means "now": skip the rest of the drain.
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            // Written directly: exit() skips the async logger's flush.
            eprintln!("lodge: second signal: exiting without finishing the drain");
            std::process::exit(1);
        });
        let (join_failed_tx, join_failed) = tokio::sync::oneshot::channel::<String>();
        let unique = crate::identity::Unique {
            id: cfg.node.id,
            incarnation,
            advertise: peer_advertise.clone(),
            directory: directory.clone(),
            join: join.clone(),
            // Asked of any node, whatever its cluster: a duplicate is refused either way.
            link: peer_link.anonymous(),
            log: log.clone(),
        };
        let joining = (!join.is_empty()).then(|| crate::join::Join {
            id: cfg.node.id,
            advertise: peer_advertise.clone(),
            endpoints: join.clone(),
            as_voter: cfg.cluster.join_as == "voter",
            link: peer_link.clone(),
            data_dir: cfg.node.data_dir.clone(),
            raft: raft_ref.clone(),
            directory: directory.clone(),
            log: log.clone(),
        });
        // Before "ready", while already serving (a probe of this node's own address must find
        // this process): no other process runs as this member, and a joining node is registered.
        let mut checks = io.spawn(async move {
            crate::identity::check_unique(&unique).await?;
            let Some(join) = joining else { return Ok(None) };
            Ok::<_, String>(join.register().await?.map(|r| (join, r)))
        });
        // A join waits for the cluster as long as it takes: a signal meanwhile stops the node.
        let mut early_signal = None;
        let checked = tokio::select! {
            c = &mut checks => c.unwrap_or_else(|e| Err(format!("startup checks failed: {e}"))),
            sig = &mut sig_rx => {
                checks.abort();
                early_signal = Some(sig.unwrap_or("signal"));
                Ok(None)
            }
        };
        let refused = match checked {
            Ok(Some((join, registered))) => {
                io.spawn(async move {
                    if let Err(e) = join.finish(registered).await {
                        let _ = join_failed_tx.send(e);
                    }
                });
                None
            }
            Ok(None) => None,
            Err(e) => Some(e),
        };
        if refused.is_none() && early_signal.is_none() {
            info!(log, "node ready"; "grpc" => %grpc_local, "metrics" => %metrics_local, "peer" => %peer_local, "tls" => settings.tls.is_some(), "peer_tls" => gate_tls, "cluster_id" => cluster.get().map(lodge_grpc::peer::format_id), "incarnation" => format!("{incarnation:016x}"));
            if !gate_tls && !peer_local.ip().is_loopback() {
                warn!(log, "the peer port is not loopback and peer TLS is off (--insecure): anyone who reaches it can speak raft to this node"; "peer" => %peer_local);
            }
            // One machine-readable line on stdout: scripts and tests read the bound ports from it.
            println!("lodge node ready grpc={grpc_local} metrics={metrics_local} peer={peer_local}");
        }

        // A node that stops serving must not linger: the server ending on its own is a failure.
        let (failure, server_ended, tree_done) = if let Some(reason) = &refused {
            error!(log, "refusing to start"; "reason" => reason);
            eprintln!("lodge: {reason}");
            (Some(Exit::Failed(reason.clone())), None, false)
        } else if let Some(sig) = early_signal {
            info!(log, "shutting down before ready"; "signal" => sig);
            (None, None, false)
        } else { tokio::select! {
            sig = &mut sig_rx => {
                info!(log, "shutting down"; "signal" => sig.unwrap_or("signal"));
                (None, None, false)
            }
            exit = &mut tree_exit => (Some(exit), None, true),
            Ok(e) = join_failed => {
                error!(log, "cannot join the cluster"; "error" => &e);
                (Some(Exit::Failed(format!("cannot join the cluster: {e}"))), None, false)
            }
            ended = &mut server_task => {
                let reason = format!("the gRPC server stopped on its own: {ended:?}");
                (Some(Exit::Failed(reason)), Some(ended), false)
            }
            ended = &mut peer_task => {
                let reason = format!("the peer server stopped on its own: {ended:?}");
                (Some(Exit::Failed(reason)), None, false)
            }
        }};
        // 1. Health goes NOT_SERVING, 2. the server refuses new calls and drains, 3. actors stop.
        let _ = io.spawn(async move { server::set_not_serving(&health).await }).await;
        let _ = shutdown_tx.send(true);
        let _ = stop_tx.send(());
        let _ = peer_stop_tx.send(());
        let drained = match server_ended {
            Some(ended) => ended,
            None => server_task.await,
        };
        match drained {
            Ok(Ok(true)) => info!(log, "in-flight calls drained"),
            Ok(Ok(false)) => warn!(log, "drain timeout reached; remaining calls cut"; "drain_timeout_ms" => settings.drain_timeout.as_millis() as u64),
            Ok(Err(e)) => error!(log, "gRPC server error"; "error" => %e),
            Err(e) => error!(log, "gRPC server task failed"; "error" => %e),
        }
        metrics_task.abort();
        if !peer_task.is_finished() {
            // Its streams (raft, relays) are cut with the process; nothing waits on them.
            let _ = tokio::time::timeout(settings.drain_timeout, &mut peer_task).await;
            peer_task.abort();
        }
        let exit = if tree_done {
            failure.expect("tree_done implies a failure")
        } else {
            runtime.shutdown();
            let stopped = tree_exit.await;
            // A server that stopped on its own still makes this a failed run.
            failure.unwrap_or(stopped)
        };
        runtime.stop_arbiters();
        match exit {
            Exit::Normal => {
                info!(log, "stopped");
                0
            }
            Exit::Failed(reason) | Exit::Panicked(reason) => {
                error!(log, "exiting on a failure"; "reason" => reason);
                if refused.is_some() {
                    2
                } else {
                    1
                }
            }
        }
    });
    tokio_rt.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}
