//! A TLS server configuration that follows its files: re-read when they change (polled) or on
//! demand (SIGHUP), swapped for new connections only; connections already open keep the
//! certificate they shook hands with. A new file that does not load (unparsable PEM, a key that
//! is not the certificate's, a CA without certificates) is refused: the old configuration stays,
//! the error names the file and the reason, and `lodge_tls_reloads_total{outcome="rejected"}`
//! counts it.
//!
//! tonic's `ServerTlsConfig` is fixed when the server is built, so the listeners terminate TLS
//! themselves (tokio-rustls) with the configuration current at each accept.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use slog::{error, info, Logger};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// The files of one TLS listener, and the configuration section they come from (named in logs,
/// errors and the metric's `tls` label).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// `server.tls`, `metrics.tls`, ...
    pub section: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Clients must present a certificate this CA signed (mutual TLS); `None`: no client
    /// certificates are asked for.
    pub client_ca_file: Option<PathBuf>,
}

/// `lodge_tls_reloads_total{tls, outcome}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub tls: String,
    pub outcome: String,
}

/// Reloads of TLS files, shared by every listener's [`ReloadingTls`].
#[derive(Clone, Debug, Default)]
pub struct ReloadMetrics(pub Family<ReloadLabels, Counter>);

impl ReloadMetrics {
    /// Registers `lodge_tls_reloads_total`.
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "lodge_tls_reloads",
            "TLS files re-read after a change or SIGHUP, by listener (tls) and outcome (ok: \
             served to new connections; rejected: the old certificate kept)",
            self.0.clone(),
        );
    }

    fn count(&self, tls: &str, outcome: &str) {
        self.0
            .get_or_create(&ReloadLabels {
                tls: tls.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }
}

/// The files' bytes as last read: a reload that finds the same bytes does nothing.
#[derive(Clone, Default, PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Option<Vec<u8>>,
}

/// A TLS server configuration kept current with its files.
pub struct ReloadingTls {
    files: TlsFiles,
    alpn: Vec<Vec<u8>>,
    current: RwLock<Arc<ServerConfig>>,
    /// What was last read, accepted or refused: a broken file is reported once, not every poll.
    seen: Mutex<Contents>,
    /// New contents one poll found: a poll applies contents only when the next poll finds them
    /// again, so a certificate and key written one after the other are not taken half-written.
    pending: Mutex<Option<Contents>>,
    metrics: ReloadMetrics,
    log: Logger,
}

impl ReloadingTls {
    /// Loads `files`, offering `alpn` (e.g. `h2`). An error names the file and the reason; the
    /// caller treats it as a fatal configuration error (never a fallback to plaintext).
    pub fn load(
        files: TlsFiles,
        alpn: Vec<Vec<u8>>,
        metrics: ReloadMetrics,
        log: Logger,
    ) -> Result<Arc<Self>, String> {
        let contents = read(&files)?;
        let config = build(&files, &contents, &alpn)?;
        Ok(Arc::new(Self {
            files,
            alpn,
            current: RwLock::new(config),
            seen: Mutex::new(contents),
            pending: Mutex::new(None),
            metrics,
            log,
        }))
    }

    /// Checks that `files` load, without keeping anything (start-up validation).
    pub fn check(files: &TlsFiles) -> Result<(), String> {
        build(files, &read(files)?, &[]).map(drop)
    }

    /// The files this configuration follows.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// An acceptor with the configuration current now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config())
    }

    /// The configuration current now.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.read().expect("tls config lock").clone()
    }

    /// Reads the files again; swaps the configuration if they changed and load. `Ok(true)`: a new
    /// configuration is served; `Ok(false)`: nothing changed (or the same broken files as last
    /// time); `Err`: the new files were refused and the old configuration stays.
    pub fn reload(&self) -> Result<bool, String> {
        self.apply(read(&self.files))
    }

    /// A poll: like [`reload`](Self::reload), but new contents are applied only when two polls
    /// in a row read them (files being written are left alone until they settle).
    pub fn poll(&self) -> Result<bool, String> {
        let contents = match read(&self.files) {
            // A file missing for a moment (replaced by a rename) is looked at again next time.
            Err(_) => return Ok(false),
            Ok(c) => c,
        };
        if *self.seen.lock().expect("tls seen lock") == contents {
            return Ok(false);
        }
        let mut pending = self.pending.lock().expect("tls pending lock");
        if pending.as_ref() != Some(&contents) {
            *pending = Some(contents);
            return Ok(false);
        }
        *pending = None;
        drop(pending);
        self.apply(Ok(contents))
    }

    fn apply(&self, read: Result<Contents, String>) -> Result<bool, String> {
        let outcome = read.and_then(|contents| {
            let mut seen = self.seen.lock().expect("tls seen lock");
            if *seen == contents {
                return Ok(None);
            }
            *seen = contents.clone();
            drop(seen);
            build(&self.files, &contents, &self.alpn).map(Some)
        });
        let section = &self.files.section;
        match outcome {
            Ok(None) => Ok(false),
            Ok(Some(config)) => {
                *self.current.write().expect("tls config lock") = config;
                self.metrics.count(section, "ok");
                info!(self.log, "TLS files reloaded: new connections get the new certificate";
                    "tls" => section.as_str(), "cert_file" => %self.files.cert_file.display());
                Ok(true)
            }
            Err(e) => {
                self.metrics.count(section, "rejected");
                error!(self.log, "TLS files refused: the old certificate is still served";
                    "tls" => section.as_str(), "error" => &e);
                Err(e)
            }
        }
    }

    /// Polls the files every `interval` (see [`poll`](Self::poll)) and re-reads them whenever
    /// `hup` ticks (SIGHUP), until the task is dropped or `hup` closes.
    pub async fn follow(
        self: Arc<Self>,
        interval: Duration,
        mut hup: tokio::sync::watch::Receiver<u64>,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let signalled = tokio::select! {
                _ = tick.tick() => false,
                changed = hup.changed() => if changed.is_err() { return } else { true },
            };
            // Blocking file reads, off the I/O threads.
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(
                move || {
                    if signalled {
                        me.reload()
                    } else {
                        me.poll()
                    }
                },
            )
            .await;
        }
    }
}

impl std::fmt::Debug for ReloadingTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

fn read(files: &TlsFiles) -> Result<Contents, String> {
    let s = &files.section;
    let one = |key: &str, path: &Path| {
        std::fs::read(path).map_err(|e| format!("{s}.{key}: cannot read {}: {e}", path.display()))
    };
    Ok(Contents {
        cert: one("cert_file", &files.cert_file)?,
        key: one("key_file", &files.key_file)?,
        ca: files
            .client_ca_file
            .as_deref()
            .map(|p| one("client_ca_file", p))
            .transpose()?,
    })
}

fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what}: not PEM certificates ({e})"))?;
    if certs.is_empty() {
        return Err(format!("{what}: no PEM certificate in it"));
    }
    Ok(certs)
}

/// The rustls configuration of `contents`; errors name the file and the reason.
fn build(files: &TlsFiles, c: &Contents, alpn: &[Vec<u8>]) -> Result<Arc<ServerConfig>, String> {
    let s = &files.section;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let cert_what = format!("{s}.cert_file {}", files.cert_file.display());
    let key_what = format!("{s}.key_file {}", files.key_file.display());
    let certs = certificates(&c.cert, &cert_what)?;
    let key = PrivateKeyDer::from_pem_slice(&c.key)
        .map_err(|e| format!("{key_what}: not a PEM private key ({e})"))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("{s}: {e}"))?;
    let builder = match (&c.ca, &files.client_ca_file) {
        (Some(ca), Some(path)) => {
            let what = format!("{s}.client_ca_file {}", path.display());
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca, &what)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{what}: not a usable CA certificate ({e})"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|e| format!("{what}: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "{cert_what} with {key_what}: the key does not load or is not the certificate's ({e})"
        )
    })?;
    config.alpn_protocols = alpn.to_vec();
    Ok(Arc::new(config))
}
