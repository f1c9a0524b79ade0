//! What is checked before anything is started: the open-file limit, and that nothing is open
//! beyond loopback without protection (docs/security.md, "Secure by default").

use slog::{warn, Logger};

use super::Refusal;
use crate::config::NodeConfig;

/// Raises the open-file limit and refuses a start that would expose the node unprotected.
pub fn check(cfg: &NodeConfig, log: &Logger) -> Result<(), Refusal> {
    let fds = raise_fd_limit();
    let wanted = (cfg.server.max_connections)
        .saturating_add(cfg.metrics.max_connections)
        .saturating_add(256);
    if fds < wanted as u64 {
        warn!(log, "the open-file limit is below what the connection limits need: connections past it are refused at accept";
            "limit" => fds, "needed" => wanted);
    }
    // Secure by default: nothing beyond loopback without TLS and authentication, unless the
    // operator says so.
    let open = cfg.unprotected_listeners();
    if !open.is_empty() {
        if !cfg.server.insecure {
            return Err(Refusal::config(format!(
                "refusing to start: {}. Anyone who reaches it could use it: turn those on, \
                 listen on loopback, or start with --insecure (server.insecure = true) on a \
                 network you trust",
                open.join("; ")
            )));
        }
        warn!(log, "starting insecure (--insecure): open beyond loopback without TLS or authentication";
            "open" => open.join("; "));
    }
    if cfg.auth.enabled && !cfg.peer.tls.enabled {
        warn!(log, "auth is on but peer TLS is off: every caller of the peer port is taken for a member, so local processes could go around auth there; turn on [peer.tls]";
            "peer.listen" => &cfg.peer.listen);
    }
    Ok(())
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
