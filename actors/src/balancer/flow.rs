//! What a routing decision is about: a flow (a connection or a request) and its protocol, and the
//! kinds of modules that serve flows.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The protocols a route can name. The data plane detects the stream protocols it can tell from
/// a connection's first bytes; the others can still be named by `RouteRequest` callers.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// On a route: any protocol carried over TCP. As a flow's protocol: a TCP stream of unknown
    /// content.
    #[default]
    Tcp,
    Udp,
    Http,
    /// TLS (the data plane cannot see what TLS carries; the SNI names the destination).
    Https,
    /// HTTP/2 with prior knowledge (cleartext, as gRPC uses it).
    Http2,
    Http3,
    Grpc,
    Websocket,
    Mysql,
    Postgres,
    Mongodb,
    Redis,
    Rtmp,
    Rtmps,
    Hls,
    Dash,
}

impl Protocol {
    /// Every protocol, in declaration order.
    pub const ALL: [Protocol; 16] = [
        Self::Tcp,
        Self::Udp,
        Self::Http,
        Self::Https,
        Self::Http2,
        Self::Http3,
        Self::Grpc,
        Self::Websocket,
        Self::Mysql,
        Self::Postgres,
        Self::Mongodb,
        Self::Redis,
        Self::Rtmp,
        Self::Rtmps,
        Self::Hls,
        Self::Dash,
    ];

    /// The lower-case name used in configuration, the CLI and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Http => "http",
            Self::Https => "https",
            Self::Http2 => "http2",
            Self::Http3 => "http3",
            Self::Grpc => "grpc",
            Self::Websocket => "websocket",
            Self::Mysql => "mysql",
            Self::Postgres => "postgres",
            Self::Mongodb => "mongodb",
            Self::Redis => "redis",
            Self::Rtmp => "rtmp",
            Self::Rtmps => "rtmps",
            Self::Hls => "hls",
            Self::Dash => "dash",
        }
    }

    /// The protocol named `name` (case-insensitive).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(name))
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kinds of module a route sends traffic to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModuleType {
    /// Application load balancer: HTTP, HTTPS, HTTP/2, gRPC, WebSocket, HLS, DASH.
    Alb,
    /// Database load balancer: MySQL, PostgreSQL, MongoDB, Redis.
    Dblb,
    /// AI inference load balancer: HTTP, HTTPS, HTTP/2, gRPC.
    Ailb,
    /// Media streaming: RTMP, RTMPS.
    Rtmp,
    /// A nested network load balancer: anything over TCP or UDP.
    Nlb,
}

impl ModuleType {
    /// Every module type, in declaration order.
    pub const ALL: [ModuleType; 5] = [Self::Alb, Self::Dblb, Self::Ailb, Self::Rtmp, Self::Nlb];

    /// The lower-case name used in configuration, the CLI and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alb => "alb",
            Self::Dblb => "dblb",
            Self::Ailb => "ailb",
            Self::Rtmp => "rtmp",
            Self::Nlb => "nlb",
        }
    }

    /// The module type named `name` (case-insensitive).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(name))
    }

    /// The protocols a module of this type serves unless it says otherwise.
    pub fn protocols(self) -> &'static [Protocol] {
        use Protocol::*;
        match self {
            Self::Alb => &[Http, Https, Http2, Grpc, Websocket, Hls, Dash],
            Self::Dblb => &[Mysql, Postgres, Mongodb, Redis],
            Self::Ailb => &[Http, Https, Http2, Grpc],
            Self::Rtmp => &[Rtmp, Rtmps],
            Self::Nlb => &Protocol::ALL,
        }
    }
}

impl fmt::Display for ModuleType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A connection or request to route.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// `Tcp` when the content is not known.
    pub protocol: Protocol,
    /// The client: an IP address, or a host name when the caller gave one.
    pub source: String,
    /// 0 when not known.
    pub source_port: u16,
    /// Where the client wants to go: the TLS SNI or HTTP `Host` name when there is one, else the
    /// address it connected to.
    pub destination: String,
    pub destination_port: u16,
    /// The HTTP request path ("" for other protocols).
    pub path: String,
    /// Request headers, names in lower case ("" values allowed).
    pub headers: BTreeMap<String, String>,
}
