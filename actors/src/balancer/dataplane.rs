//! The L4 data plane: `/node/balancer/listeners/<n>` accept connections on the configured
//! addresses, tell each one's protocol from its first bytes, route it with the same decision as
//! `RouteRequest`, and proxy bytes both ways (with half-close) to the chosen instance's data
//! address.
//!
//! The bytes never pass through a mailbox: each connection is a task on the node's I/O runtime.
//! The listener actor owns the accept loop, and the loop owns the listening socket: when the
//! actor stops (shutdown, an operator's `StopActor`, a failure) the loop ends and the port is
//! released, so clients are refused rather than left waiting in a backlog nobody accepts from.
//! The node binds every socket once before anything starts (a taken port fails the start, exit
//! 1); an incarnation after the first binds the same address again, once the loop before it has
//! ended.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Actor, ActorFutureExt, AsyncContext, Context};
use serde::Serialize;
use slog::{debug, warn, Logger};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

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

/// One listening address. Every incarnation of its actor gets a clone; the clones share the
/// socket's hand-over.
#[derive(Clone)]
pub struct ListenerSpec {
    /// The address bound (a configured port 0 resolved), which later incarnations bind again.
    address: SocketAddr,
    /// The protocol to assume when a client sends nothing first (MySQL's clients wait for the
    /// server) or sends what the sniffer does not know.
    pub protocol: Option<Protocol>,
    slot: Arc<Mutex<SocketSlot>>,
}

/// What passes from one incarnation of a listener to the next.
#[derive(Default)]
struct SocketSlot {
    /// Bound by the node at start-up, until the first incarnation takes it.
    bound: Option<std::net::TcpListener>,
    /// The accept loop of the incarnation before, which holds the socket until it has ended.
    previous: Option<JoinHandle<()>>,
}

impl ListenerSpec {
    /// A listener on `socket`, which the node bound before starting anything.
    pub fn new(socket: std::net::TcpListener, protocol: Option<Protocol>) -> std::io::Result<Self> {
        Ok(Self {
            address: socket.local_addr()?,
            protocol,
            slot: Arc::new(Mutex::new(SocketSlot {
                bound: Some(socket),
                previous: None,
            })),
        })
    }

    /// The address it listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, SocketSlot> {
        // Plain data that a panic cannot leave half-written.
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The socket for a new incarnation: the node's for the first, a new one on the same
    /// address after that.
    fn socket(&self) -> std::io::Result<std::net::TcpListener> {
        let socket = match self.slot().bound.take() {
            Some(s) => s,
            None => std::net::TcpListener::bind(self.address)?,
        };
        socket.set_nonblocking(true)?;
        Ok(socket)
    }
}

/// How a listener that cannot be bound is reported, by the node for each of its listeners
/// (`cannot listen on 127.0.0.1:7400 (server.listen): address in use`) and by a listener actor
/// that cannot bind its address again: the address, and the configuration key that set it.
pub fn cannot_listen(address: SocketAddr, key: &str, e: &std::io::Error) -> String {
    let why = match e.kind() {
        std::io::ErrorKind::AddrInUse => "address in use".to_string(),
        std::io::ErrorKind::AddrNotAvailable => "no such address on this machine".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => e.to_string(),
    };
    format!("cannot listen on {address} ({key}): {why}")
}

/// A running accept loop. Dropping it (the actor stopped, or was dropped) ends the loop, which
/// closes the socket; the next incarnation waits for that before binding the address again.
struct AcceptLoop {
    task: Option<JoinHandle<()>>,
    spec: ListenerSpec,
}

impl Drop for AcceptLoop {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            self.spec.slot().previous = Some(task);
        }
    }
}

/// The actor of one listener.
pub struct ListenerActor {
    spec: ListenerSpec,
    handle: BalancerHandle,
    settings: Arc<DataPlaneSettings>,
    io: tokio::runtime::Handle,
    log: Logger,
    accept: Option<AcceptLoop>,
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
        let address = spec.address().to_string();
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

    /// Takes or binds the socket and starts the accept loop. A socket that cannot be had is the
    /// incarnation's failure: its supervisor restarts it with backoff, and escalates if the
    /// address stays taken.
    fn listen(&mut self) {
        let socket = match self.spec.socket() {
            Ok(s) => s,
            Err(e) => panic!(
                "{}",
                cannot_listen(self.spec.address, "balancer.listen", &e)
            ),
        };
        let (handle, settings, hint, log) = (
            self.handle.clone(),
            self.settings.clone(),
            self.spec.protocol,
            self.log.clone(),
        );
        let io = self.io.clone();
        let slots = self.slots.clone();
        let task = self.io.spawn(async move {
            // Registered with the I/O runtime's reactor, so made inside it.
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
        });
        self.accept = Some(AcceptLoop {
            task: Some(task),
            spec: self.spec.clone(),
        });
    }
}

impl Actor for ListenerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // The incarnation before may still be closing its socket (an aborted task is dropped on
        // its runtime's next turn); binding before that would find the port taken. `wait` holds
        // the actor's start until then, so the supervisor counts it as started once it listens.
        let previous = self.spec.slot().previous.take();
        let closed = async move {
            if let Some(p) = previous {
                let _ = p.await;
            }
        };
        ctx.wait(actix::fut::wrap_future::<_, Self>(closed).map(|(), act, _| act.listen()));
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        // Open connections keep running; only the socket goes, so new ones are refused.
        self.accept = None;
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
            accepting: self
                .accept
                .as_ref()
                .and_then(|a| a.task.as_ref())
                .is_some_and(|t| !t.is_finished()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_incarnation_takes_the_nodes_socket_and_later_ones_bind_the_address_again() {
        let spec =
            ListenerSpec::new(std::net::TcpListener::bind("127.0.0.1:0").unwrap(), None).unwrap();
        let first = spec.socket().unwrap();
        assert_eq!(first.local_addr().unwrap(), spec.address());
        // While the first socket is open the address is taken, and the error says where and why.
        let e = spec.socket().unwrap_err();
        assert_eq!(
            cannot_listen(spec.address(), "balancer.listen", &e),
            format!(
                "cannot listen on {} (balancer.listen): address in use",
                spec.address()
            )
        );
        drop(first);
        let again = spec.socket().unwrap();
        assert_eq!(again.local_addr().unwrap(), spec.address());
    }
}
