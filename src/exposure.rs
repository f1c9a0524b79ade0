//! Secure by default: what a node exposes beyond loopback without protection, and the metrics
//! endpoint's own protection (`[metrics.tls]`, `metrics.token_file`).
//!
//! A listener on a non-loopback address must have TLS and authentication (`server.tls.enabled`
//! and `auth.enabled`; for the peer port `peer.tls.enabled`, whose certificates are the members'
//! authentication; for metrics `metrics.tls.enabled` and `metrics.token_file`); otherwise the
//! node refuses to start (exit 2) unless `--insecure` (`server.insecure`) says the operator means
//! it, and then it warns at every start.

use std::net::SocketAddr;

use crate::config::{tls_files, ConfigError, NodeConfig};

/// A scrape's bearer token (`metrics.token_file`), never shown.
#[derive(Clone)]
pub struct MetricsToken(Vec<u8>);

impl MetricsToken {
    /// Whether an `Authorization` header value carries this token, compared in constant time.
    pub fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let Some(given) = authorization.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return false;
        };
        lodge_grpc::secret::constant_time_eq(given, &self.0)
    }
}

impl std::fmt::Debug for MetricsToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsToken(<redacted>)")
    }
}

impl NodeConfig {
    /// The listeners open beyond loopback without TLS and authentication, each naming its
    /// settings; empty when there are none.
    pub fn unprotected_listeners(&self) -> Vec<String> {
        let mut open = Vec::new();
        let on = |b: bool| if b { "true" } else { "false" };
        if let Ok(addr) = self.grpc_addr() {
            let (tls, auth) = (self.server.tls.enabled, self.auth.enabled);
            if exposed(addr) && !(tls && auth) {
                open.push(format!(
                    "server.listen = {addr} is not a loopback address, with server.tls.enabled = {} and auth.enabled = {}",
                    on(tls),
                    on(auth)
                ));
            }
        }
        if let Ok(addr) = self.peer_addr() {
            if exposed(addr) && !self.peer.tls.enabled {
                open.push(format!(
                    "peer.listen = {addr} is not a loopback address, with peer.tls.enabled = false (peer TLS is off: other hosts could speak raft to this node)"
                ));
            }
        }
        if let Ok(addr) = self.metrics_addr() {
            let m = &self.metrics;
            let (tls, token) = (m.tls.enabled, !m.token_file.is_empty());
            if exposed(addr) && !(tls && token) {
                open.push(format!(
                    "metrics.listen = {addr} is not a loopback address, with metrics.tls.enabled = {} and metrics.token_file {}",
                    on(tls),
                    if token { "set" } else { "unset" }
                ));
            }
        }
        open
    }

    /// Checks `[metrics.tls]` and `metrics.token_file` (at load, before any port is bound).
    pub(crate) fn metrics_security(&self) -> Result<(), ConfigError> {
        self.metrics_tls()?;
        self.metrics_token()?;
        Ok(())
    }

    /// The metrics endpoint's TLS files, checked to load; `None` when it is plaintext.
    pub fn metrics_tls(&self) -> Result<Option<lodge_grpc::tls::TlsFiles>, ConfigError> {
        let t = &self.metrics.tls;
        tls_files("metrics.tls", t.enabled, &t.cert_file, &t.key_file, None)
    }

    /// The token every scrape must carry, read from `metrics.token_file`; `None`: none needed.
    pub fn metrics_token(&self) -> Result<Option<MetricsToken>, ConfigError> {
        let path = &self.metrics.token_file;
        if path.is_empty() {
            return Ok(None);
        }
        let key = "metrics.token_file";
        let mut token = std::fs::read(path).map_err(|e| ConfigError {
            key: key.into(),
            problem: format!("cannot read {path}: {e}"),
        })?;
        // A trailing newline from `echo token > file` is not part of the token.
        while token.last().is_some_and(|b| b.is_ascii_whitespace()) {
            token.pop();
        }
        if token.is_empty() || token.iter().any(|b| !b.is_ascii_graphic()) {
            return Err(ConfigError {
                key: key.into(),
                problem: format!(
                    "{path} must hold one token of printable ASCII without spaces (it is sent as \
                     \"Authorization: Bearer <token>\")"
                ),
            });
        }
        Ok(Some(MetricsToken(token)))
    }
}

/// Reachable from other machines: not loopback (127.0.0.0/8, ::1). The wildcards 0.0.0.0 and ::
/// are every address, so exposed.
fn exposed(addr: SocketAddr) -> bool {
    !addr.ip().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_token_must_match_whole() {
        let t = MetricsToken(b"s3cret".to_vec());
        assert!(t.admits(Some(b"Bearer s3cret")));
        for bad in [
            None,
            Some(&b"Bearer s3cre"[..]),
            Some(b"Bearer s3cret "),
            Some(b"bearer s3cret"),
            Some(b"s3cret"),
            Some(b"Bearer "),
        ] {
            assert!(!t.admits(bad), "{bad:?}");
        }
        assert_eq!(format!("{t:?}"), "MetricsToken(<redacted>)");
    }
}
