//! The node's TLS material (client port, peer port, metrics) and the metrics token, loaded at
//! start and followed for the node's whole life: files are re-read on change and on SIGHUP.

use std::sync::Arc;
use std::time::Duration;

use lodge_grpc::tls::{ReloadMetrics, ReloadingTls, TlsFiles};
use slog::Logger;

use super::Refusal;
use crate::config::{ConfigError, NodeConfig};

/// How often the TLS files are checked for a change (SIGHUP checks at once).
const TLS_POLL: Duration = Duration::from_secs(5);

/// What the node's listeners terminate TLS with.
pub struct NodeTls {
    pub server: Option<Arc<ReloadingTls>>,
    pub peer: Option<Arc<ReloadingTls>>,
    pub metrics: Option<Arc<ReloadingTls>>,
    /// The bearer token `/metrics` asks for, if any.
    pub metrics_token: Option<crate::exposure::MetricsToken>,
    /// Reloads, counted for `/metrics`.
    pub reloads: ReloadMetrics,
}

impl NodeTls {
    /// Loads every configured certificate and the metrics token; a broken one refuses the start.
    pub fn load(cfg: &NodeConfig, log: &Logger) -> Result<Self, Refusal> {
        let reloads = ReloadMetrics::default();
        let load = |files: Result<Option<TlsFiles>, ConfigError>, alpn: &[u8]| {
            let files = files.map_err(|e| Refusal::config(e.to_string()))?;
            files
                .map(|f| {
                    ReloadingTls::load(f, vec![alpn.to_vec()], reloads.clone(), log.clone())
                        .map_err(|e| Refusal::config(format!("configuration error: {e}")))
                })
                .transpose()
        };
        let server = load(cfg.tls_material(), b"h2")?;
        let metrics = load(cfg.metrics_tls(), b"http/1.1")?;
        let metrics_token = cfg
            .metrics_token()
            .map_err(|e| Refusal::config(e.to_string()))?;
        let peer = load(cfg.peer_tls_material(), b"h2")?;
        Ok(Self {
            server,
            peer,
            metrics,
            metrics_token,
            reloads,
        })
    }

    /// Follows the files on `rt` until the process ends. SIGHUP re-reads them (and no longer
    /// ends the process): called before the node says it is ready, so a SIGHUP after that is
    /// never fatal.
    pub fn follow(&self, rt: &tokio::runtime::Runtime) {
        let (hup_tx, hup_rx) = tokio::sync::watch::channel(0u64);
        let mut hup = rt
            .block_on(async {
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            })
            .expect("SIGHUP handler");
        rt.spawn(async move {
            while hup.recv().await.is_some() {
                hup_tx.send_modify(|n| *n += 1);
            }
        });
        for followed in [&self.server, &self.peer, &self.metrics]
            .into_iter()
            .flatten()
        {
            rt.spawn(followed.clone().follow(TLS_POLL, hup_rx.clone()));
        }
    }
}
