//! Assembling and running the gRPC server: TLS, connection limit, HTTP/2 settings, health,
//! reflection, metrics and graceful drain.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use lodge_actors::admin::AdminActor;
use lodge_actors::ActorRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::service::Routes;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::admin::AdminService;
use crate::metrics::{MetricsLayer, ServerMetrics};
use crate::pb;

/// PEM material for the listener.
#[derive(Clone)]
pub struct TlsMaterial {
    /// Server certificate chain.
    pub cert_pem: Vec<u8>,
    /// Server private key.
    pub key_pem: Vec<u8>,
    /// CA that client certificates must chain to; `Some` turns on mutual TLS.
    pub client_ca_pem: Option<Vec<u8>>,
}

/// How the server runs (the `[server]` configuration section).
#[derive(Clone)]
pub struct ServerSettings {
    pub tls: Option<TlsMaterial>,
    pub max_connections: usize,
    pub max_concurrent_streams: u32,
    pub max_message_bytes: usize,
    pub request_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub drain_timeout: Duration,
    /// Per-source-IP connection limits.
    pub per_ip: PerIpLimits,
    /// HTTP/2 receive window of one stream and of a connection.
    pub stream_window: u32,
    pub connection_window: u32,
}

/// Limits on the connections of one source IP address (0 turns a limit off).
#[derive(Clone)]
pub struct PerIpLimits {
    /// New connections allowed within `window`.
    pub rate: u32,
    pub window: Duration,
    /// Connections open at once.
    pub max_open: u32,
    /// Where refusals are counted.
    pub metrics: lodge_actors::registry::RegistryMetrics,
}

/// Builds the rustls configuration; an error here is a fatal configuration error, never a reason
/// to fall back to plaintext.
pub fn tls_config(tls: &TlsMaterial) -> Result<ServerTlsConfig, String> {
    let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
    if let Some(ca) = &tls.client_ca_pem {
        cfg = cfg
            .client_ca_root(Certificate::from_pem(ca))
            .client_auth_optional(false);
    }
    // tonic parses the PEM when the config is applied; do it now to surface errors early.
    Server::builder().tls_config(cfg.clone()).map_err(|e| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg = format!("{msg}: {s}");
            src = s.source();
        }
        msg
    })?;
    Ok(cfg)
}

/// The node's services, with their health entries.
pub struct NodeServices {
    pub routes: Routes,
    pub health: HealthReporter,
}

/// What the node's services talk to.
pub struct Backends {
    pub admin: ActorRef<AdminActor>,
    pub raft: ActorRef<lodge_actors::cluster::raft::RaftNode>,
    pub member_id: u64,
    /// The replicated topology (members' addresses, for forwarding to the leader).
    pub directory: lodge_actors::cluster::topology::Directory,
    /// The membership actor (heartbeats, topology with liveness).
    pub membership: ActorRef<lodge_actors::cluster::members::Membership>,
    /// How often members send heartbeats.
    pub heartbeat_interval: Duration,
    /// How this node connects to other members.
    pub peer_tls: crate::client::ClientTls,
    /// Injected faults (the Raft service drops traffic from cut-off peers).
    pub faults: lodge_actors::cluster::fault::Faults,
    /// The client registry.
    pub registry: lodge_actors::registry::RegistryHandle,
    pub registry_metrics: lodge_actors::registry::RegistryMetrics,
    /// The translation gateway.
    pub translation: ActorRef<lodge_actors::translate::gateway::TranslationGateway>,
    /// The session router.
    pub router: RouterBackend,
    /// The balancer.
    pub balancer: crate::balancer::service::BalancerBackend,
}

/// What the router's services talk to.
pub struct RouterBackend {
    pub hub: ActorRef<lodge_actors::router::RouterHub<pb::router::Frame>>,
    pub table: lodge_actors::router::hub::SessionTable<pb::router::Frame>,
    pub settings: Arc<lodge_actors::router::RouterSettings>,
    pub auth: Arc<crate::auth::Authenticator>,
}

/// Every method the node serves, for bounded metric labels.
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
    let relay_peers = Arc::new(crate::forward::Forwarder::new(
        b.member_id,
        b.directory.clone(),
        b.peer_tls.clone(),
    ));
    let forward = Arc::new(crate::forward::Forwarder::new(
        b.member_id,
        b.directory.clone(),
        b.peer_tls,
    ));
    let kv = pb::kv::kv_server::KvServer::new(crate::kv::KvService::new(
        b.raft.clone(),
        forward.clone(),
        s.request_timeout,
        shutdown.clone(),
    ))
    .max_decoding_message_size(s.max_message_bytes)
    .max_encoding_message_size(s.max_message_bytes);
    let cluster =
        pb::cluster::cluster_server::ClusterServer::new(crate::cluster::ClusterService::new(
            b.raft.clone(),
            b.membership,
            b.directory,
            forward.clone(),
            b.heartbeat_interval,
            s.request_timeout,
            shutdown.clone(),
        ))
        .max_decoding_message_size(s.max_message_bytes)
        .max_encoding_message_size(s.max_message_bytes);
    let translation = pb::registry::translation_server::TranslationServer::new(
        crate::translation::TranslationService::new(
            b.translation,
            b.registry.clone(),
            forward.clone(),
            b.registry_metrics.clone(),
            s.request_timeout,
        ),
    )
    .max_decoding_message_size(s.max_message_bytes)
    .max_encoding_message_size(s.max_message_bytes);
    let registry =
        pb::registry::registry_server::RegistryServer::new(crate::registry::RegistryService::new(
            b.registry,
            forward.clone(),
            b.registry_metrics,
            s.request_timeout,
        ))
        .max_decoding_message_size(s.max_message_bytes)
        .max_encoding_message_size(s.max_message_bytes);
    let router_cx = crate::router::RouterContext {
        hub: b.router.hub,
        table: b.router.table,
        settings: b.router.settings,
        auth: b.router.auth,
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
    // Raft batches are bounded by the transport; snapshots arrive in chunks.
    let raft =
        pb::raft::raft_server::RaftServer::new(crate::raft::RaftService::new(b.raft, b.faults))
            .max_decoding_message_size(crate::raft::MAX_DECODE);
    // Each service goes into the routes with its name beside it, so the check below sees what
    // is really routed.
    let mut routed = Vec::new();
    macro_rules! route {
        ($routes:expr, $svc:expr) => {{
            let svc = $svc;
            routed.push(name_of(&svc));
            $routes.add_service(svc)
        }};
    }
    let routes = Routes::default();
    let routes = route!(routes, health_service);
    let routes = route!(routes, reflection);
    let routes = route!(routes, reflection_v1alpha);
    let routes = route!(routes, admin);
    let routes = route!(routes, kv);
    let routes = route!(routes, cluster);
    let routes = route!(routes, registry);
    let routes = route!(routes, translation);
    let routes = route!(routes, tunnel);
    let routes = route!(routes, router_control);
    let routes = route!(routes, balancer);
    let routes = route!(routes, raft);
    // Health, reflection and the metrics go by `NODE_SERVICES`: a service routed but not listed
    // (or listed but not routed) would be misreported by all three.
    let mut listed = crate::served::NODE_SERVICES.to_vec();
    listed.sort_unstable();
    routed.sort_unstable();
    if routed != listed {
        return Err(format!(
            "internal: the routed services {routed:?} differ from served::NODE_SERVICES {listed:?}"
        ));
    }
    Ok(NodeServices { routes, health })
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

/// Serves `routes` on `listener` until `shutdown` resolves, then drains in-flight calls for at most
/// `drain_timeout`. Returns whether the drain finished in time.
pub async fn serve(
    settings: &ServerSettings,
    listener: TcpListener,
    routes: Routes,
    metrics: Arc<ServerMetrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<bool, tonic::transport::Error> {
    let mut builder = Server::builder();
    if let Some(tls) = &settings.tls {
        builder =
            builder.tls_config(tls_config(tls).expect("TLS material is validated at start-up"))?;
    }
    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(accept_loop(
        listener,
        settings.max_connections,
        settings.per_ip.clone(),
        metrics.clone(),
        conn_tx,
    ));
    let incoming = tokio_stream::wrappers::ReceiverStream::new(conn_rx);
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let drain_timeout = settings.drain_timeout;
    let signal = async move {
        shutdown.await;
        let _ = drain_tx.send(());
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
        .layer(MetricsLayer::new(metrics, served_methods()))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => return r.map(|_| true),
        _ = drain_rx => {}
    }
    // Shutdown began: new connections are refused and open ones got GOAWAY; wait for in-flight calls.
    match tokio::time::timeout(drain_timeout, server).await {
        Ok(r) => r.map(|_| true),
        Err(_) => Ok(false),
    }
}

/// How long to wait after a failed accept (out of file descriptors, say) before trying again,
/// rather than spinning on the error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts connections up to `max` (and within the per-IP limits); extra ones are closed at once
/// and counted. Ends (closing the listener) when the server stops taking connections.
async fn accept_loop(
    listener: TcpListener,
    max: usize,
    per_ip: PerIpLimits,
    metrics: Arc<ServerMetrics>,
    tx: tokio::sync::mpsc::Sender<io::Result<LimitedConn>>,
) {
    let active = Arc::new(AtomicUsize::new(0));
    let ips = Arc::new(std::sync::Mutex::new(IpTable::default()));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => (stream, peer.ip()),
                Err(_) => {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = tx.closed() => return,
        };
        if active.load(Ordering::Relaxed) >= max {
            metrics.connections_rejected.inc();
            drop(stream);
            continue;
        }
        if let Err(limit) = ips
            .lock()
            .unwrap()
            .admit(peer, &per_ip, std::time::Instant::now())
        {
            per_ip.metrics.rejected(limit);
            drop(stream);
            continue;
        }
        // tonic's own listener sets this; ours must too, or small answers wait for the peer's
        // delayed ACK (Nagle's algorithm), some 40 ms each.
        let _ = stream.set_nodelay(true);
        active.fetch_add(1, Ordering::Relaxed);
        metrics.connections_accepted.inc();
        metrics.connections_active.inc();
        let conn = LimitedConn {
            inner: stream,
            slot: Slot {
                active: active.clone(),
                metrics: metrics.clone(),
                ip: peer,
                ips: ips.clone(),
            },
        };
        if tx.send(Ok(conn)).await.is_err() {
            return;
        }
    }
}

/// Connections per source IP: how many are open, and when recent ones arrived.
#[derive(Default)]
struct IpTable {
    by_ip: std::collections::HashMap<std::net::IpAddr, IpEntry>,
    admitted: u64,
}

#[derive(Default)]
struct IpEntry {
    open: u32,
    /// Arrival times within the window, oldest first.
    recent: std::collections::VecDeque<std::time::Instant>,
}

impl IpTable {
    /// Takes a connection from `ip`, or names the limit that refuses it.
    fn admit(
        &mut self,
        ip: std::net::IpAddr,
        limits: &PerIpLimits,
        now: std::time::Instant,
    ) -> Result<(), &'static str> {
        self.admitted += 1;
        if self.admitted.is_multiple_of(1024) {
            // Addresses that came once and left would otherwise stay forever.
            self.by_ip.retain(|_, e| {
                e.open > 0
                    || e.recent
                        .back()
                        .is_some_and(|t| now.duration_since(*t) < limits.window)
            });
        }
        let e = self.by_ip.entry(ip).or_default();
        while e
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= limits.window)
        {
            e.recent.pop_front();
        }
        if limits.max_open > 0 && e.open >= limits.max_open {
            return Err("ip_concurrency");
        }
        if limits.rate > 0 && e.recent.len() >= limits.rate as usize {
            return Err("ip_rate");
        }
        e.open += 1;
        if limits.rate > 0 {
            e.recent.push_back(now);
        }
        Ok(())
    }

    fn release(&mut self, ip: std::net::IpAddr) {
        if let Some(e) = self.by_ip.get_mut(&ip) {
            e.open = e.open.saturating_sub(1);
            // Forgotten once idle, so the table holds only addresses with open connections (or
            // recent arrivals, which the next connection from them prunes).
            if e.open == 0 && e.recent.is_empty() {
                self.by_ip.remove(&ip);
            }
        }
    }
}

struct Slot {
    active: Arc<AtomicUsize>,
    metrics: Arc<ServerMetrics>,
    ip: std::net::IpAddr,
    ips: Arc<std::sync::Mutex<IpTable>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.metrics.connections_active.dec();
        self.ips.lock().unwrap().release(self.ip);
    }
}

/// A counted client connection.
pub struct LimitedConn {
    inner: TcpStream,
    #[allow(dead_code)] // held for its Drop
    slot: Slot,
}

impl Connected for LimitedConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for LimitedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Binds the listener (before any actor work, so a taken port fails fast).
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn limits(rate: u32, max_open: u32) -> PerIpLimits {
        PerIpLimits {
            rate,
            window: Duration::from_secs(10),
            max_open,
            metrics: Default::default(),
        }
    }

    #[test]
    fn per_ip_rate_refuses_the_excess_until_the_window_passes() {
        let mut t = IpTable::default();
        let l = limits(3, 0);
        let a: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let b: std::net::IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            t.admit(a, &l, t0).unwrap();
        }
        assert_eq!(t.admit(a, &l, t0), Err("ip_rate"));
        // Another address has its own budget.
        assert!(t.admit(b, &l, t0).is_ok());
        assert!(t.admit(a, &l, t0 + Duration::from_secs(10)).is_ok());
    }

    #[test]
    fn per_ip_concurrency_frees_a_slot_when_a_connection_closes() {
        let mut t = IpTable::default();
        let l = limits(0, 2);
        let a: std::net::IpAddr = "::1".parse().unwrap();
        let now = Instant::now();
        t.admit(a, &l, now).unwrap();
        t.admit(a, &l, now).unwrap();
        assert_eq!(t.admit(a, &l, now), Err("ip_concurrency"));
        t.release(a);
        assert!(t.admit(a, &l, now).is_ok());
        t.release(a);
        t.release(a);
        assert!(
            t.by_ip.is_empty(),
            "an address with nothing open is forgotten"
        );
    }
}
