//! The accept loop: every connection to the gRPC port is admitted here or refused with a reason.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::conn::{LimitedConn, Prefixed};
use super::lifecycle::{ConnState, Ending, OpenConnections, Watched};
use super::per_ip::{IpLimit, IpTable, Networks, PerIpLimits};
use super::proxy_header;
use super::refusal::{Answering, Refusal, RefusedConn};
use crate::metrics::ServerMetrics;
use crate::tls::{ReloadingTls, Secured};

/// How the listener admits connections (the `[server]` settings it enforces).
#[derive(Clone)]
pub struct Admission {
    /// Open connections at most (`server.max_connections`).
    pub max_connections: usize,
    /// Limits per client address.
    pub per_ip: PerIpLimits,
    /// Client addresses the per-IP limits do not apply to (`server.per_ip_exempt`).
    pub exempt: Networks,
    /// Proxies whose connections start with a PROXY protocol header naming the client
    /// (`server.proxy_protocol_from`).
    pub proxies: Networks,
    /// How long a connection may take to send its PROXY header and make its first call
    /// (`server.handshake_timeout_ms`).
    pub handshake_timeout: Duration,
    /// How long a connection may stay with no call in flight (`server.idle_timeout_ms`);
    /// `None`: for ever.
    pub idle_timeout: Option<Duration>,
}

/// Where the accept loop sends connections.
#[derive(Clone)]
pub struct Outlets {
    /// Admitted: to the node's gRPC server.
    pub admitted: mpsc::Sender<io::Result<Secured<LimitedConn>>>,
    /// Refused with a reason: to the [refusal server](super::refusal::serve).
    pub refused: mpsc::Sender<io::Result<Secured<RefusedConn>>>,
    /// TLS the listener terminates (with the certificate current at each handshake); `None`:
    /// plaintext.
    pub tls: Option<Arc<ReloadingTls>>,
}

impl Outlets {
    /// Sends `conn` on `to` as it is, or after a TLS handshake (off the accept loop: a slow
    /// client must not hold up the others). A failed handshake closes the connection.
    async fn send<T>(&self, conn: T, to: &mpsc::Sender<io::Result<Secured<T>>>, wait: bool)
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        match &self.tls {
            None if wait => {
                let _ = to.send(Ok(Secured::Plain(conn))).await;
            }
            None => {
                let _ = to.try_send(Ok(Secured::Plain(conn)));
            }
            Some(tls) => {
                let (acceptor, to) = (tls.acceptor(), to.clone());
                // The handshake is bounded by the connection's own timers (a refused
                // connection's linger, an admitted one's handshake timeout).
                tokio::spawn(async move {
                    if let Ok(s) = acceptor.accept(conn).await {
                        let _ = to.send(Ok(Secured::Tls(Box::new(s)))).await;
                    }
                });
            }
        }
    }
}

/// How long to wait after a failed accept (out of file descriptors, say) before trying again,
/// rather than spinning on the error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts connections until the server stops taking them (then the listener is closed).
pub async fn accept_loop(
    listener: TcpListener,
    admission: Admission,
    metrics: Arc<ServerMetrics>,
    out: Outlets,
) {
    let gate = Arc::new(Gate {
        admission,
        metrics,
        active: AtomicUsize::new(0),
        ips: Mutex::new(IpTable::default()),
        answering: Answering::default(),
        open: OpenConnections::default(),
    });
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(_) => {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = out.admitted.closed() => return,
        };
        // tonic's own listener sets this; ours must too, or small answers wait for the peer's
        // delayed ACK (Nagle's algorithm), some 40 ms each.
        let _ = stream.set_nodelay(true);
        if gate.admission.proxies.contains(peer.ip()) {
            // The header may be slow to come: read it off the loop.
            let (gate, out) = (gate.clone(), out.clone());
            tokio::spawn(async move { gate.admit_proxied(stream, peer, &out).await });
        } else {
            let io = Prefixed::new(stream, peer, BytesMut::new());
            gate.admit(io, tokio::time::Instant::now(), &out).await;
        }
    }
}

/// The admission state shared by the loop and the tasks reading PROXY headers.
struct Gate {
    admission: Admission,
    metrics: Arc<ServerMetrics>,
    active: AtomicUsize,
    ips: Mutex<IpTable>,
    answering: Answering,
    /// The open connections, to shed one at `max_connections`.
    open: OpenConnections,
}

impl Gate {
    async fn admit_proxied(
        self: Arc<Self>,
        mut stream: TcpStream,
        proxy: SocketAddr,
        out: &Outlets,
    ) {
        let accepted = tokio::time::Instant::now();
        let read = proxy_header::read(&mut stream);
        match tokio::time::timeout(self.admission.handshake_timeout, read).await {
            Ok(Ok(header)) => {
                let client = header.source.unwrap_or(proxy);
                let io = Prefixed::new(stream, client, header.rest);
                self.admit(io, accepted, out).await;
            }
            Ok(Err(_)) => self.admission.per_ip.metrics.rejected("proxy_header"),
            Err(_) => self.admission.per_ip.metrics.rejected("handshake_timeout"),
        }
    }

    /// Hands `io`, accepted at `accepted`, to the server, or to the refusal server with the limit
    /// that refused it.
    async fn admit(self: &Arc<Self>, io: Prefixed, accepted: tokio::time::Instant, out: &Outlets) {
        let client = io.client().ip();
        match self.take_place(client) {
            Ok(()) => {
                self.metrics.connections_accepted.inc();
                self.metrics.connections_active.inc();
                let state = Arc::new(ConnState::opened_at(accepted));
                self.open.track(&state);
                let a = &self.admission;
                let io = Watched::new(io, state, a.handshake_timeout, a.idle_timeout);
                let slot = Slot {
                    gate: self.clone(),
                    ip: (!a.exempt.contains(client)).then_some(client),
                };
                let conn = LimitedConn { io, slot };
                out.send(conn, &out.admitted, true).await;
            }
            // Answered if there is room to answer; otherwise dropped here, closing it.
            Err(why) => {
                if let Some(conn) = self.answering.take(io, why) {
                    out.send(conn, &out.refused, false).await;
                }
            }
        }
    }

    /// Counts a new connection from `client` against the limits, or says which one refuses it.
    fn take_place(&self, client: IpAddr) -> Result<(), Refusal> {
        let a = &self.admission;
        // The client's own limits first: a connection they refuse must not shed another.
        let per_ip = !a.exempt.contains(client);
        if per_ip {
            let admitted = self
                .ips
                .lock()
                .unwrap()
                .admit(client, &a.per_ip, Instant::now());
            if let Err(limit) = admitted {
                a.per_ip.metrics.rejected(limit.label());
                let detail = match limit {
                    IpLimit::Rate => format!(
                        "server.per_ip_connection_rate: {} new connections per {} ms from {client}",
                        a.per_ip.rate,
                        a.per_ip.window.as_millis()
                    ),
                    IpLimit::Concurrency => format!(
                        "server.per_ip_max_connections: {} open connections from {client}",
                        a.per_ip.max_open
                    ),
                };
                return Err(refusal(detail));
            }
        }
        if self.active.fetch_add(1, Ordering::Relaxed) >= a.max_connections && !self.open.shed_one()
        {
            self.active.fetch_sub(1, Ordering::Relaxed);
            if per_ip {
                self.ips.lock().unwrap().release(client);
            }
            self.metrics.connections_rejected.inc();
            return Err(refusal(format!(
                "server.max_connections: {} open connections",
                a.max_connections
            )));
        }
        Ok(())
    }
}

fn refusal(detail: String) -> Refusal {
    Refusal(format!("refused by the node's connection limit ({detail})").into())
}

/// An admitted connection's places in the limits, given back when it closes.
pub(super) struct Slot {
    gate: Arc<Gate>,
    /// The address counted in the per-IP table (none for exempt clients).
    ip: Option<IpAddr>,
}

impl Slot {
    /// Counts a connection its lifecycle ended.
    pub(super) fn ended(&self, how: Ending) {
        self.gate.admission.per_ip.metrics.rejected(how.label());
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gate.active.fetch_sub(1, Ordering::Relaxed);
        self.gate.metrics.connections_active.dec();
        if let Some(ip) = self.ip {
            self.gate.ips.lock().unwrap().release(ip);
        }
    }
}
