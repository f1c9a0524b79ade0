//! The L4 data plane: `/node/balancer/listeners/<n>` accept connections on the configured
//! addresses, tell each one's protocol from its first bytes, route it with the same decision as
//! `RouteRequest`, and proxy bytes both ways (with half-close) to the chosen instance's data
//! address.
//!
//! The bytes never pass through a mailbox: each connection is a task on the node's I/O runtime.
//! The listener actor owns the accept loop (a restarted actor starts a new loop on the same
//! socket, bound once by the node before it serves anything).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, ActorContext, Context};
use serde::Serialize;
use slog::{debug, warn, Logger};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::flow::{Flow, Protocol};
use super::handle::BalancerHandle;
use super::instance::Instance;
use super::metered::{Activity, Metered, Tally};
use super::metrics::{BytesLabels, InstanceLabels};
use super::sniff::{sniff, Sniff, MAX_SNIFF};
use super::BalancerError;
use crate::supervision::Managed;

/// How the data plane behaves.
#[derive(Clone, Debug)]
pub struct DataPlaneSettings {
    /// How long a connection may take to send enough to tell its protocol.
    pub sniff_timeout: Duration,
    pub connect_timeout: Duration,
    /// Instances tried for one connection before giving up.
    pub connect_attempts: usize,
    /// Copy buffer per direction.
    pub buffer_bytes: usize,
    /// Connections this node proxies at once, over all listeners; more are closed at once.
    pub max_connections: usize,
    /// A connection that carries nothing either way for this long is closed (`None`: never).
    pub idle_timeout: Option<Duration>,
}

/// One listening address.
#[derive(Clone)]
pub struct ListenerSpec {
    /// Bound by the node before the actors start.
    pub socket: Arc<std::net::TcpListener>,
    /// The protocol to assume when a client sends nothing first (MySQL's clients wait for the
    /// server) or sends what the sniffer does not know.
    pub protocol: Option<Protocol>,
}

/// The actor of one listener.
pub struct ListenerActor {
    spec: ListenerSpec,
    handle: BalancerHandle,
    settings: Arc<DataPlaneSettings>,
    io: tokio::runtime::Handle,
    log: Logger,
    accept: Option<tokio::task::JoinHandle<()>>,
    address: String,
    /// Shared by every listener of the node: each proxied connection holds a permit.
    slots: Arc<tokio::sync::Semaphore>,
}

impl ListenerActor {
    /// The actor serving `spec` on `io`.
    pub fn new(
        spec: ListenerSpec,
        handle: BalancerHandle,
        settings: Arc<DataPlaneSettings>,
        slots: Arc<tokio::sync::Semaphore>,
        io: tokio::runtime::Handle,
        log: &Logger,
    ) -> Self {
        let address = spec
            .socket
            .local_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string());
        Self {
            log: log.new(slog::o!("listener" => address.clone())),
            spec,
            handle,
            settings,
            io,
            accept: None,
            address,
            slots,
        }
    }
}

impl Actor for ListenerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let socket = match self.spec.socket.try_clone().and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        }) {
            Ok(s) => s,
            Err(e) => {
                warn!(self.log, "cannot use the listening socket"; "error" => %e);
                ctx.stop();
                return;
            }
        };
        let (handle, settings, hint, log) = (
            self.handle.clone(),
            self.settings.clone(),
            self.spec.protocol,
            self.log.clone(),
        );
        let io = self.io.clone();
        let slots = self.slots.clone();
        self.accept = Some(self.io.spawn(async move {
            let listener = match TcpListener::from_std(socket) {
                Ok(l) => l,
                Err(e) => {
                    warn!(log, "cannot listen"; "error" => %e);
                    return;
                }
            };
            loop {
                match listener.accept().await {
                    Ok((conn, peer)) => {
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            // Over the node's connection limit: closed at once, counted.
                            handle.metrics().decided("over_capacity");
                            drop(conn);
                            continue;
                        };
                        let (handle, settings, log) =
                            (handle.clone(), settings.clone(), log.clone());
                        io.spawn(async move {
                            let _slot = slot;
                            if let Err(e) = serve(conn, peer, hint, &handle, &settings).await {
                                debug!(log, "connection closed"; "peer" => %peer, "why" => e);
                            }
                        });
                    }
                    // Out of descriptors, say: wait a moment rather than spin.
                    Err(e) => {
                        warn!(log, "accept failed"; "error" => %e);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        // Open connections keep running; only new ones stop being accepted.
        if let Some(a) = self.accept.take() {
            a.abort();
        }
    }
}

#[derive(Serialize)]
struct Dump {
    address: String,
    protocol: Option<Protocol>,
    accepting: bool,
}

impl Managed for ListenerActor {
    const KIND: &'static str = "balancer-listener";

    fn dump_state(&self) -> serde_json::Value {
        serde_json::to_value(Dump {
            address: self.address.clone(),
            protocol: self.spec.protocol,
            accepting: self.accept.as_ref().is_some_and(|a| !a.is_finished()),
        })
        .unwrap_or_default()
    }
}

/// Reads until the sniffer decides, `timeout` after the connection was accepted, or the client
/// closes.
async fn first_bytes(conn: &mut TcpStream, timeout: Duration) -> (Vec<u8>, Sniff) {
    let mut buf = Vec::with_capacity(4096);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let verdict = sniff(&buf);
        if !matches!(verdict, Sniff::NeedMore) || buf.len() >= MAX_SNIFF {
            return (buf, verdict);
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, conn.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return (buf, verdict),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Protocols whose clients send nothing before the server's greeting.
fn server_speaks_first(p: Protocol) -> bool {
    matches!(p, Protocol::Mysql)
}

/// What a connection is, for routing.
fn flow_of(
    verdict: Sniff,
    hint: Option<Protocol>,
    peer: SocketAddr,
    local: SocketAddr,
) -> (Flow, bool) {
    let mut flow = Flow {
        protocol: hint.unwrap_or(Protocol::Tcp),
        source: peer.ip().to_string(),
        source_port: peer.port(),
        destination: local.ip().to_string(),
        destination_port: local.port(),
        ..Default::default()
    };
    let recognised = match verdict {
        Sniff::Known(s) => {
            flow.protocol = s.protocol;
            if let Some(h) = s.host {
                flow.destination = h;
            }
            flow.path = s.path;
            flow.headers = s.headers;
            true
        }
        _ => hint.is_some(),
    };
    (flow, recognised)
}

/// One connection: sniff, decide, connect (trying other instances if one refuses), proxy.
async fn serve(
    mut conn: TcpStream,
    peer: SocketAddr,
    hint: Option<Protocol>,
    handle: &BalancerHandle,
    settings: &DataPlaneSettings,
) -> Result<(), String> {
    let _ = conn.set_nodelay(true);
    let local = conn.local_addr().map_err(|e| e.to_string())?;
    let (prefix, verdict) = if hint.is_some_and(server_speaks_first) {
        // Its clients wait for the server's greeting: there is nothing to sniff.
        (Vec::new(), Sniff::NeedMore)
    } else {
        first_bytes(&mut conn, settings.sniff_timeout).await
    };
    let (flow, recognised) = flow_of(verdict, hint, peer, local);
    let mut excluded = Vec::new();
    let (inst, mut upstream) = loop {
        let decided = if excluded.is_empty() {
            handle.decide(&flow, false, &excluded).await
        } else {
            handle.redecide(&flow, &excluded).await
        };
        let decision = match decided {
            Ok(d) => d,
            Err(e) => {
                if !recognised && matches!(e, BalancerError::NotFound(_)) {
                    handle.metrics().decided("unrecognised");
                }
                return Err(e.to_string());
            }
        };
        let inst = decision.instance;
        let addr = inst.record.data_address.clone();
        let connect = tokio::time::timeout(settings.connect_timeout, TcpStream::connect(&addr));
        match connect.await {
            Ok(Ok(s)) => break (inst, s),
            Ok(Err(e)) => handle.connect_failed(&inst, &e.to_string()),
            Err(_) => handle.connect_failed(&inst, "no answer in time"),
        }
        excluded.push(inst.record.instance_id.clone());
        if excluded.len() >= settings.connect_attempts {
            return Err(format!(
                "{} instance(s) did not accept the connection",
                excluded.len()
            ));
        }
    };
    let _ = upstream.set_nodelay(true);
    let open = Open::new(handle, &inst);
    upstream
        .write_all(&prefix)
        .await
        .map_err(|e| format!("writing to {}: {e}", inst.record.data_address))?;
    let activity = Arc::new(Activity::new());
    let (to_module, to_client): (Tally, Tally) = (|l| &l.bytes_in, |l| &l.bytes_out);
    open.bytes("in").inc_by(prefix.len() as u64);
    to_module(&inst.live).fetch_add(prefix.len() as u64, Ordering::Relaxed);
    let mut client = Metered::new(
        conn,
        activity.clone(),
        inst.live.clone(),
        to_module,
        open.bytes("in"),
    );
    let mut module = Metered::new(
        upstream,
        activity.clone(),
        inst.live.clone(),
        to_client,
        open.bytes("out"),
    );
    let size = settings.buffer_bytes;
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut module, size, size);
    let Some(limit) = settings.idle_timeout else {
        return copy.await.map(|_| ()).map_err(|e| e.to_string());
    };
    tokio::pin!(copy);
    loop {
        let quiet = activity.quiet_for();
        if quiet >= limit {
            // Dropping both sockets closes the connection both ways.
            handle.metrics().idle_closed.inc();
            return Err(format!("idle for {} ms", quiet.as_millis()));
        }
        tokio::select! {
            r = &mut copy => return r.map(|_| ()).map_err(|e| e.to_string()),
            _ = tokio::time::sleep(limit - quiet) => {}
        }
    }
}

/// A connection counted as open on its instance while it lives.
struct Open<'a> {
    handle: &'a BalancerHandle,
    inst: &'a Instance,
    labels: InstanceLabels,
    /// Kept, not looked up again at the end: the series may have been forgotten meanwhile (the
    /// instance left), and a lookup would bring it back below zero.
    active: prometheus_client::metrics::gauge::Gauge,
}

impl<'a> Open<'a> {
    fn new(handle: &'a BalancerHandle, inst: &'a Instance) -> Self {
        let labels = InstanceLabels {
            module_type: inst.record.module_type.to_string(),
            instance: inst.record.instance_id.clone(),
        };
        inst.live.connections.fetch_add(1, Ordering::Relaxed);
        inst.live.connections_total.fetch_add(1, Ordering::Relaxed);
        let m = handle.metrics();
        let active = m.connections_active.get_or_create(&labels).clone();
        active.inc();
        m.connections.get_or_create(&labels).inc();
        Self {
            handle,
            inst,
            labels,
            active,
        }
    }

    /// The byte counter of one direction (`in`: client to module).
    fn bytes(&self, direction: &str) -> prometheus_client::metrics::counter::Counter {
        self.handle
            .metrics()
            .bytes
            .get_or_create(&BytesLabels {
                module_type: self.labels.module_type.clone(),
                instance: self.labels.instance.clone(),
                direction: direction.into(),
            })
            .clone()
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.inst.live.connections.fetch_sub(1, Ordering::Relaxed);
        self.active.dec();
    }
}
