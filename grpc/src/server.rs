//! Assembling and running the gRPC server: TLS, HTTP/2 settings, health, reflection, metrics and
//! the drain. Connections reach it through [`crate::listener`], which applies the limits.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lodge_actors::admin::AdminActor;
use lodge_actors::ActorRef;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::Server;
pub use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::admin::AdminService;
use crate::calls::{Calls, CallsLayer};
use crate::metrics::{MetricsLayer, ServerMetrics};
use crate::pb;

/// How the server runs (the `[server]` configuration section).
#[derive(Clone)]
pub struct ServerSettings {
    /// TLS the listener terminates, following its files (see [`crate::tls::reload`]).
    pub tls: Option<Arc<crate::tls::ReloadingTls>>,
    /// Which connections are taken: limits, exempt clients, trusted proxies.
    pub admission: crate::listener::Admission,
    pub max_concurrent_streams: u32,
    /// Calls in flight on the node at most (`server.max_concurrent_rpcs`).
    pub max_concurrent_rpcs: usize,
    pub max_message_bytes: usize,
    pub request_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub drain_timeout: Duration,
    /// HTTP/2 receive window of one stream and of a connection.
    pub stream_window: u32,
    pub connection_window: u32,
    /// Who may call what (every call passes it; see [`crate::auth`]).
    pub gate: Arc<crate::auth::Gatekeeper>,
}

/// The node's services, with their health entries.
pub struct NodeServices {
    /// The client port's ([`crate::served::NODE_SERVICES`]).
    pub routes: Routes,
    /// The peer port's ([`crate::served::PEER_SERVICES`]).
    pub peer_routes: Routes,
    pub health: HealthReporter,
}

/// What the node's services talk to.
pub struct Backends {
    pub admin: ActorRef<AdminActor>,
    pub raft: ActorRef<lodge_actors::cluster::raft::RaftNode>,
    /// The one way to the replicated store (reaching leaders through `members`).
    pub store: lodge_actors::cluster::client::Client,
    /// Channels to the other members, and the statuses naming them.
    pub members: Arc<crate::members::Members>,
    pub member_id: u64,
    /// This process's incarnation (random per start; tells two processes with one id apart).
    pub incarnation: u64,
    /// The replicated topology (members' addresses, for forwarding to the leader).
    pub directory: lodge_actors::cluster::topology::Directory,
    /// The membership actor (heartbeats, topology with liveness).
    pub membership: ActorRef<lodge_actors::cluster::members::Membership>,
    /// How often members send heartbeats.
    pub heartbeat_interval: Duration,
    /// How this node connects to other members (their peer ports).
    pub peer_link: crate::peer::PeerLink,
    /// Where snapshots from peers are spooled, and their cap.
    pub snapshot_spool: crate::raft::SnapshotSpool,
    /// Injected faults (the Raft service drops traffic from cut-off peers).
    pub faults: lodge_actors::cluster::fault::Faults,
    /// The client registry.
    pub registry: lodge_actors::registry::RegistryHandle,
    pub registry_metrics: lodge_actors::registry::RegistryMetrics,
    /// The KV service's limits (the `[kv]` section).
    pub kv_limits: crate::kv::KvLimits,
    /// The translation gateway.
    pub translation: ActorRef<lodge_actors::translate::gateway::TranslationGateway>,
    /// The session router.
    pub router: RouterBackend,
    /// The balancer.
    pub balancer: crate::balancer::service::BalancerBackend,
    /// The workflows.
    pub workflows: lodge_actors::workflow::WorkflowHandle,
}

/// What the router's services talk to.
pub struct RouterBackend {
    pub hub: ActorRef<lodge_actors::router::RouterHub<pb::router::Frame>>,
    pub table: lodge_actors::router::hub::SessionTable<pb::router::Frame>,
    pub settings: Arc<lodge_actors::router::RouterSettings>,
}

/// Every method the node serves on its client port, for bounded metric labels.
pub fn served_methods() -> std::collections::HashSet<String> {
    crate::served::node_methods()
}

/// Server reflection over both protocol versions, listing exactly the services the node serves.
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    let mut b = tonic_reflection::server::Builder::configure()
        // The reflection descriptors are among ours, so both versions describe both versions.
        .include_reflection_service(false);
    for set in crate::served::DESCRIPTOR_SETS {
        b = b.register_encoded_file_descriptor_set(set);
    }
    for name in crate::served::NODE_SERVICES {
        b = b.with_service_name(*name);
    }
    b
}

/// The full name a generated server answers under.
fn name_of<S: tonic::server::NamedService>(_: &S) -> &'static str {
    S::NAME
}

/// Builds the routes: admin, health and reflection. Streams that never end by themselves (event
/// watches) end when `shutdown` turns true, so they do not hold up the drain.
pub async fn node_services(
    b: Backends,
    s: &ServerSettings,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<NodeServices, String> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::Serving).await;
    for name in crate::served::NODE_SERVICES {
        health
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    let reflection = reflection_builder()
        .build_v1()
        .map_err(|e| format!("reflection: {e}"))?;
    let reflection_v1alpha = reflection_builder()
        .build_v1alpha()
        .map_err(|e| format!("reflection: {e}"))?;
    let admin = pb::admin::admin_server::AdminServer::new(AdminService::new(
        b.admin,
        s.request_timeout,
        shutdown.clone(),
    ))
    .max_decoding_message_size(s.max_message_bytes)
    .max_encoding_message_size(s.max_message_bytes);
    // The router's relays get their own connections: relayed bulk streams must not take the
    // HTTP/2 window (or the stream slots) that forwarded KV writes and lease renewals need.
    let relay_peers = Arc::new(crate::members::Members::new(
        b.member_id,
        b.directory.clone(),
        b.peer_link.clone(),
    ));
    let members = b.members.clone();
    let kv = pb::kv::kv_server::KvServer::new(
        crate::kv::KvService::new(
            b.store.clone(),
            members.clone(),
            s.request_timeout,
            shutdown.clone(),
        )
        .with_limits(b.kv_limits, s.max_message_bytes, b.registry_metrics.clone()),
    )
    .max_decoding_message_size(s.max_message_bytes)
    // Answers keep well under the limit (pages, watch batches); the headroom is for one value
    // stored before today's limits, which a page always carries whole.
    .max_encoding_message_size(s.max_message_bytes + crate::kv::ANSWER_HEADROOM);
    let cluster =
        pb::cluster::cluster_server::ClusterServer::new(crate::cluster::ClusterService::new(
            b.raft.clone(),
            b.membership,
            b.directory,
            members.clone(),
            b.heartbeat_interval,
            s.request_timeout,
            shutdown.clone(),
            b.incarnation,
            b.peer_link.clone(),
        ))
        .max_decoding_message_size(s.max_message_bytes)
        .max_encoding_message_size(s.max_message_bytes);
    let translation = pb::registry::translation_server::TranslationServer::new(
        crate::translation::TranslationService::new(
            b.translation,
            b.registry.clone(),
            members.clone(),
            b.registry_metrics.clone(),
            s.request_timeout,
        ),
    )
    .max_decoding_message_size(s.max_message_bytes)
    .max_encoding_message_size(s.max_message_bytes);
    let registry =
        pb::registry::registry_server::RegistryServer::new(crate::registry::RegistryService::new(
            b.registry,
            members.clone(),
            b.registry_metrics.clone(),
            s.request_timeout,
        ))
        .max_decoding_message_size(s.max_message_bytes)
        .max_encoding_message_size(s.max_message_bytes);
    let router_cx = crate::router::RouterContext {
        hub: b.router.hub,
        table: b.router.table,
        settings: b.router.settings,
        peers: relay_peers,
        request_timeout: s.request_timeout,
        shutdown: shutdown.clone(),
    };
    // Tunnel frames are bounded by what clients send (the CLI sends at most 128 KiB); the message
    // limit still applies.
    let tunnel = pb::router::tunnel_server::TunnelServer::new(crate::router::TunnelService::new(
        router_cx.clone(),
    ))
    .max_decoding_message_size(s.max_message_bytes)
    .max_encoding_message_size(s.max_message_bytes);
    let router_control = pb::router::router_control_server::RouterControlServer::new(
        crate::router::ControlService::new(router_cx),
    );
    let balancer = pb::balancer::balancer_server::BalancerServer::new(
        crate::balancer::service::BalancerService::new(
            b.balancer,
            s.request_timeout,
            shutdown.clone(),
        ),
    )
    .max_decoding_message_size(s.max_message_bytes)
    .max_encoding_message_size(s.max_message_bytes);
    let workflow = pb::workflow::workflow_server::WorkflowServer::new(
        crate::workflow::WorkflowService::new(b.workflows, s.request_timeout, shutdown.clone()),
    )
    .max_decoding_message_size(s.max_message_bytes)
    .max_encoding_message_size(s.max_message_bytes);
    // Raft batches are bounded by the transport; snapshots arrive in chunks.
    let raft = pb::raft::raft_server::RaftServer::new(crate::raft::RaftService::new(
        b.raft,
        b.store,
        b.faults,
        b.snapshot_spool,
        b.registry_metrics.clone(),
    ))
    .max_decoding_message_size(crate::raft::MAX_DECODE);
    // Each service goes into the routes with its name beside it, so the check below sees what
    // is really routed. The peer port takes the node's services (not health or reflection) and
    // raft; the client port everything else.
    let (mut routed, mut peer_routed) = (Vec::new(), Vec::new());
    let (mut routes, mut peer_routes) = (Routes::default(), Routes::default());
    macro_rules! route {
        (client: $svc:expr) => {{
            let svc = $svc;
            routed.push(name_of(&svc));
            routes = routes.add_service(svc);
        }};
        (peer: $svc:expr) => {{
            let svc = $svc;
            peer_routed.push(name_of(&svc));
            peer_routes = peer_routes.add_service(svc);
        }};
        (both: $svc:expr) => {{
            let svc = $svc;
            route!(peer: svc.clone());
            route!(client: svc);
        }};
    }
    route!(client: health_service);
    route!(client: reflection);
    route!(client: reflection_v1alpha);
    route!(both: admin);
    route!(both: kv);
    route!(both: cluster);
    route!(both: registry);
    route!(both: translation);
    route!(both: tunnel);
    route!(both: router_control);
    route!(both: balancer);
    route!(client: workflow);
    route!(peer: raft);
    // Health, reflection and the metrics go by the lists: a service routed but not listed (or
    // listed but not routed) would be misreported by all three.
    for (port, routed, list) in [
        ("NODE_SERVICES", &mut routed, crate::served::NODE_SERVICES),
        (
            "PEER_SERVICES",
            &mut peer_routed,
            crate::served::PEER_SERVICES,
        ),
    ] {
        let mut listed = list.to_vec();
        listed.sort_unstable();
        routed.sort_unstable();
        if *routed != listed {
            return Err(format!(
                "internal: the routed services {routed:?} differ from served::{port} {listed:?}"
            ));
        }
    }
    Ok(NodeServices {
        routes,
        peer_routes,
        health,
    })
}

/// Marks every service NOT_SERVING (the first step of a shutdown).
pub async fn set_not_serving(health: &HealthReporter) {
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    for name in crate::served::NODE_SERVICES {
        health
            .set_service_status(*name, ServingStatus::NotServing)
            .await;
    }
}

/// Serves `routes` on `listener` until `shutdown` resolves, then drains: waits at most
/// `drain_timeout` for the calls someone is waiting on (see [`crate::calls`]). Returns whether
/// the drain finished in time. `peer`: this is the peer port, whose calls the gate checks.
pub async fn serve(
    settings: &ServerSettings,
    listener: TcpListener,
    routes: Routes,
    metrics: Arc<ServerMetrics>,
    peer: Option<Arc<crate::peer::PeerGate>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<bool, tonic::transport::Error> {
    // TLS is terminated by the listener, with the certificate current at each handshake: the
    // server itself speaks HTTP/2 over whatever stream it is given.
    let builder = Server::builder();
    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(64);
    let (refused_tx, refused_rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(crate::listener::accept_loop(
        listener,
        settings.admission.clone(),
        metrics.clone(),
        crate::listener::Outlets {
            admitted: conn_tx,
            refused: refused_tx,
            tls: settings.tls.clone(),
        },
    ));
    tokio::spawn(crate::listener::serve_refusals(refused_rx));
    let incoming = tokio_stream::wrappers::ReceiverStream::new(conn_rx);
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let drain_timeout = settings.drain_timeout;
    let signal = async move {
        shutdown.await;
        let _ = drain_tx.send(());
    };
    let calls = Calls::new(
        settings.max_concurrent_rpcs,
        settings.admission.per_ip.metrics.clone(),
    );
    let port = if peer.is_some() {
        crate::auth::Port::Peer
    } else {
        crate::auth::Port::Client
    };
    let server = builder
        .timeout(settings.request_timeout)
        .http2_keepalive_interval(Some(settings.keepalive_interval))
        .http2_keepalive_timeout(Some(settings.keepalive_timeout))
        .max_concurrent_streams(settings.max_concurrent_streams)
        .initial_stream_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .tcp_nodelay(true)
        .max_frame_size(crate::client::MAX_FRAME)
        // Outermost: caps the status message of every answer, the layers' own included.
        .layer(crate::status_limit::StatusLimitLayer)
        .layer(MetricsLayer::new(
            metrics,
            if peer.is_some() {
                crate::served::peer_methods()
            } else {
                served_methods()
            },
        ))
        .layer(CallsLayer(calls.clone()))
        .layer(crate::peer::PeerLayer(peer))
        .layer(crate::message_limit::MessageLimitLayer {
            max_message_bytes: settings.max_message_bytes,
            metrics: settings.admission.per_ip.metrics.clone(),
        })
        // Innermost: the caller is identified and checked just before its handler.
        .layer(crate::auth::AuthLayer::new(settings.gate.clone(), port))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => return r.map(|_| true),
        _ = drain_rx => {}
    }
    // Shutdown began: the listener is closed and open connections got GOAWAY. The server's own
    // wait would also wait for the long-lived streams; wait for the counted calls only.
    let drained = async {
        tokio::select! {
            r = &mut server => r,
            _ = calls.drain.idle() => Ok(()),
        }
    };
    match tokio::time::timeout(drain_timeout, drained).await {
        Ok(r) => r.map(|_| true),
        Err(_) => Ok(false),
    }
}

/// Binds the listener (before any actor work, so a taken port fails fast).
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
