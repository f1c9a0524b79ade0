//! Connecting to a node: plaintext or TLS, with an optional client certificate and an optional
//! bearer token that every call on the channel presents.

use std::path::PathBuf;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// HTTP/2 receive window of one stream (2 MiB).
pub const STREAM_WINDOW: u32 = 2 << 20;
/// HTTP/2 receive window of a whole connection (16 MiB).
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest HTTP/2 frame a node or a client accepts (256 KiB; the protocol's default is 16 KiB).
/// The HTTP/2 writer makes one system call per DATA frame, so with the default a 128 KiB tunnel
/// message ([`crate::router_client::MAX_CHUNK`]) left in eight writes and was read in eight
/// frames at every hop; now it is one. Other streams of the connection wait for at most one such
/// message, which is less than the socket's send buffer already queues ahead of them.
pub const MAX_FRAME: u32 = 256 << 10;

/// How a client reaches a node: TLS settings (all empty means plaintext) and the bearer token
/// its calls present.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// A JWT sent as `authorization: Bearer` on every call (`--token-file`, `LODGE_TOKEN`).
    pub bearer: Option<String>,
    /// CA certificate to verify the server with; setting it turns TLS on.
    pub ca: Option<PathBuf>,
    /// Client certificate, for mutual TLS.
    pub cert: Option<PathBuf>,
    /// Client key, for mutual TLS.
    pub key: Option<PathBuf>,
    /// Name expected in the server certificate (default: the endpoint's host).
    pub domain: Option<String>,
}

fn read(what: &str, p: &PathBuf) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("{what} {}: {e}", p.display()))
}

/// A connection to a node whose calls carry the client's bearer token, if it has one. Clients
/// of every service are built on it (`KvClient::new(channel)`), like on tonic's channel.
#[derive(Clone, Debug)]
pub struct Channel {
    inner: tonic::transport::Channel,
    bearer: Option<http::HeaderValue>,
    stamp: Option<Stamp>,
}

/// Headers a channel sets on every call besides the token, worked out at each call (a peer
/// channel's cluster id, which a joining node learns after it connected).
#[derive(Clone)]
pub struct Stamp(std::sync::Arc<dyn Fn(&mut http::HeaderMap) + Send + Sync>);

impl std::fmt::Debug for Stamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stamp")
    }
}

impl Channel {
    /// `inner`, its calls presenting no token.
    pub fn plain(inner: tonic::transport::Channel) -> Self {
        Self {
            inner,
            bearer: None,
            stamp: None,
        }
    }

    /// The same channel, `stamp` setting headers on each of its calls.
    pub fn stamped(self, stamp: impl Fn(&mut http::HeaderMap) + Send + Sync + 'static) -> Self {
        Self {
            stamp: Some(Stamp(std::sync::Arc::new(stamp))),
            ..self
        }
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Channel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::transport::channel::ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        if let Some(b) = &self.bearer {
            // A call that names its own credentials (a relayed call) keeps them.
            req.headers_mut()
                .entry(http::header::AUTHORIZATION)
                .or_insert_with(|| b.clone());
        }
        if let Some(Stamp(stamp)) = &self.stamp {
            stamp(req.headers_mut());
        }
        tower::Service::call(&mut self.inner, req)
    }
}

/// The header value presenting `token`; an error names the flag a token comes from.
fn bearer_header(token: &str) -> Result<http::HeaderValue, String> {
    let mut v = http::HeaderValue::from_str(&format!("Bearer {}", token.trim())).map_err(|_| {
        "the token (--token-file or LODGE_TOKEN) holds characters a header cannot carry".to_string()
    })?;
    v.set_sensitive(true);
    Ok(v)
}

/// Opens a channel to `endpoint` (`HOST:PORT`).
pub async fn connect(endpoint: &str, tls: &ClientTls) -> Result<Channel, String> {
    let bearer = tls.bearer.as_deref().map(bearer_header).transpose()?;
    let inner = connect_transport(endpoint, tls).await?;
    Ok(Channel {
        inner,
        bearer,
        stamp: None,
    })
}

async fn connect_transport(
    endpoint: &str,
    tls: &ClientTls,
) -> Result<tonic::transport::Channel, String> {
    let scheme = if tls.ca.is_some() { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{endpoint}"))
        .map_err(|e| format!("endpoint {endpoint:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        // A peer that vanishes without a reset (a partition, a dead host) is noticed in
        // seconds, not when TCP gives up.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        // Tunnels stream bulk data: hyper's 64 KiB default window stalls a stream every 64 KiB
        // for a round trip. These bound what one stream or connection can have in flight.
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME);
    if let Some(ca) = &tls.ca {
        let mut cfg =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?));
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            cfg = cfg.identity(Identity::from_pem(
                read("--tls-cert", cert)?,
                read("--tls-key", key)?,
            ));
        }
        if let Some(d) = &tls.domain {
            cfg = cfg.domain_name(d.clone());
        }
        ep = ep.tls_config(cfg).map_err(|e| format!("TLS: {e}"))?;
    }
    ep.connect().await.map_err(|e| {
        let mut msg = format!("cannot connect to {endpoint}: {e}");
        let mut closed = false;
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg = format!("{msg}: {s}");
            closed |= closed_by_peer(s);
            src = s.source();
        }
        if closed {
            msg.push_str(CLOSED_HINT);
        }
        msg
    })
}

/// Said of a connection the node closed before answering anything. A node answers the calls of a
/// connection its limits refuse (RESOURCE_EXHAUSTED naming the limit) while it has room to; past
/// that it closes them at accept, and this is all the client can tell.
const CLOSED_HINT: &str = " (the node closed the connection without answering: it may have been \
     refused by the node's connection limit, server.max_connections, \
     server.per_ip_connection_rate or server.per_ip_max_connections)";

/// A failed call as one line for people: `Code: message`, with a note when the connection closed
/// without an answer (the status was made by the client's transport, not sent by the node).
pub fn status_line(s: &tonic::Status) -> String {
    let mut line = format!("{:?}: {}", s.code(), s.message());
    let mut src = std::error::Error::source(s);
    let from_transport = src.is_some();
    let mut closed = false;
    while let Some(e) = src {
        closed |= closed_by_peer(e);
        src = e.source();
    }
    // hyper cancels the calls of a connection that closed under them.
    closed |= from_transport && s.code() == tonic::Code::Cancelled;
    if closed {
        line.push_str(CLOSED_HINT);
    }
    line
}

/// Whether `e` says the other end closed or reset the connection (rather than, say, nobody
/// listening).
fn closed_by_peer(e: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::*;
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        return matches!(
            io.kind(),
            ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
        );
    }
    // hyper reports an HTTP/2 handshake cut short by a close in its own words.
    let text = e.to_string();
    text.contains("connection closed") || text.contains("connection reset")
}
