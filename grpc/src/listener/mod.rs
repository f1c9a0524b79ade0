//! From the listening socket to tonic: one accept loop applies the node's connection limits,
//! reads the PROXY protocol header of trusted proxies (so the limits see the real client, not
//! the proxy), and hands refused connections to a small server that answers their calls with
//! RESOURCE_EXHAUSTED naming the limit, instead of a reset the client cannot tell from a crash.
//!
//! Clients on loopback (and any network in `server.per_ip_exempt`) are not held to the per-IP
//! limits: they are the node's own CLI, scripts and co-located services. `server.max_connections`
//! holds for everyone.

mod accept;
mod conn;
mod lifecycle;
mod per_ip;
mod proxy_header;
mod refusal;

pub use accept::{accept_loop, Admission, Outlets};
pub use conn::{ConnInfo, LimitedConn};
pub use lifecycle::{ConnState, Ending, OpenConnections, Watched};
pub use per_ip::{Networks, PerIpLimits};
pub use refusal::{serve as serve_refusals, RefusedConn};
