//! Node configuration: embedded defaults < `--config FILE` < `LODGE_*` environment < flags.
//!
//! Every key lives in the embedded `config/node.toml`, so "unknown key" means "not in that file":
//! a typo is named instead of silently ignored. All checks run before any port is bound.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use config::{Config, File, FileFormat, Value, ValueKind};
use serde::{Deserialize, Serialize};

/// The longest duration any `*_ms` setting may hold: 365 days.
pub const MAX_DURATION_MS: u64 = 365 * 24 * 3600 * 1000;

/// The embedded default configuration.
pub const DEFAULT_TOML: &str = include_str!("../config/node.toml");

/// Effective node configuration.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct NodeConfig {
    pub node: NodeSection,
    pub server: ServerSection,
    pub peer: PeerSection,
    pub cluster: ClusterSection,
    pub kv: KvSection,
    pub metrics: MetricsSection,
    pub log: LogSection,
    pub admin: AdminSection,
    pub runtime: RuntimeSection,
    pub supervision: SupervisionSection,
    pub registry: RegistrySection,
    pub translation: TranslationSection,
    pub router: RouterSection,
    pub balancer: BalancerSection,
    pub auth: AuthSection,
    pub audit: AuditSection,
    pub workflow: WorkflowSection,
}

/// `[workflow]`: how long ended runs are kept (docs/workflows.md).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct WorkflowSection {
    pub retention_ms: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct BalancerSection {
    pub listen: Vec<String>,
    pub sniff_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub connect_attempts: usize,
    pub buffer_bytes: usize,
    pub max_connections: usize,
    pub idle_timeout_ms: u64,
    pub deploy_hook: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct RouterSection {
    pub rendezvous_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub stall_timeout_ms: u64,
    pub queue_frames: usize,
    pub stream_window_bytes: u32,
    pub connection_window_bytes: u32,
    pub owner_lease_ttl_ms: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct AuthSection {
    pub enabled: bool,
    pub hs256_secret: String,
    pub hs256_secret_file: String,
    pub public_key_file: String,
    pub audience: String,
    pub issuer: String,
    pub leeway_secs: u64,
    pub certificate_roles: Vec<String>,
    pub certificate_prefixes: Vec<String>,
    pub module_networks: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct AuditSection {
    pub enabled: bool,
    pub path: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct RegistrySection {
    pub heartbeat_interval_ms: u64,
    pub max_missed_heartbeats: u32,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct TranslationSection {
    pub backend_url: String,
    pub model: String,
    pub api_key: String,
    pub request_timeout_ms: u64,
    pub probe_interval_ms: u64,
    pub chunk_chars: usize,
    pub max_jobs_per_client: usize,
    pub queue_per_client: usize,
    pub requests_per_second: u32,
    pub burst: u32,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct NodeSection {
    pub id: u64,
    pub data_dir: PathBuf,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ServerSection {
    pub listen: String,
    pub max_connections: usize,
    pub max_concurrent_streams: u32,
    pub max_message_bytes: usize,
    pub request_timeout_ms: u64,
    pub keepalive_interval_ms: u64,
    pub keepalive_timeout_ms: u64,
    pub drain_timeout_ms: u64,
    pub per_ip_connection_rate: u32,
    pub per_ip_window_ms: u64,
    pub per_ip_max_connections: u32,
    pub per_ip_exempt: Vec<String>,
    pub proxy_protocol_from: Vec<String>,
    pub handshake_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub max_concurrent_rpcs: usize,
    /// Serve on a non-loopback address without TLS or auth (`--insecure`).
    pub insecure: bool,
    pub tls: TlsSection,
}

/// The `[peer]` section: the peer listener and its TLS.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct PeerSection {
    pub listen: String,
    pub advertise: String,
    pub max_snapshot_bytes: u64,
    pub tls: PeerTlsSection,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct PeerTlsSection {
    pub enabled: bool,
    pub cert_file: String,
    pub key_file: String,
    pub ca_file: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct TlsSection {
    pub enabled: bool,
    pub cert_file: String,
    pub key_file: String,
    pub client_ca_file: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ClusterSection {
    pub initial_cluster: String,
    pub initial_cluster_token: String,
    pub join: String,
    pub join_as: String,
    pub advertise: String,
    pub heartbeat_interval_ms: u64,
    pub heartbeat_timeout_ms: u64,
    pub watch_history: usize,
    pub tick_ms: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub snapshot_interval: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct KvSection {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    pub max_txn_ops: usize,
    pub range_page_bytes: usize,
    pub watch_batch_bytes: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct MetricsSection {
    pub listen: String,
    pub max_connections: usize,
    pub request_timeout_ms: u64,
    /// A file holding the bearer token every scrape must carry; empty: none.
    pub token_file: String,
    pub tls: MetricsTlsSection,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct MetricsTlsSection {
    pub enabled: bool,
    pub cert_file: String,
    pub key_file: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct LogSection {
    pub level: String,
    pub format: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct AdminSection {
    pub allow_mutations: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct RuntimeSection {
    pub worker_arbiters: usize,
    pub mailbox_capacity: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct SupervisionSection {
    pub max_restarts: u32,
    pub restart_window_ms: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    pub backoff_jitter: f64,
    pub shutdown_timeout_ms: u64,
}

/// Values given on the command line; `None` leaves the lower layers' value.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub config_file: Option<PathBuf>,
    pub node_id: Option<u64>,
    pub listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub log_level: Option<String>,
    pub allow_mutations: Option<bool>,
    pub initial_cluster: Option<String>,
    pub join: Option<String>,
    pub advertise: Option<String>,
    pub peer_listen: Option<String>,
    pub peer_advertise: Option<String>,
    /// `--insecure`: `Some(true)` sets `server.insecure`.
    pub insecure: Option<bool>,
}

/// A configuration problem: which key, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "configuration error: {}: {}", self.key, self.problem)
    }
}

fn err(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        problem: problem.into(),
    }
}

/// Environment variables that are configuration: `LODGE_SECTION__KEY`. Others with the `LODGE_`
/// prefix (`LODGE_ENDPOINT` for the CLI) are not.
fn env_overrides(vars: impl Iterator<Item = (String, String)>) -> Vec<(String, String)> {
    vars.filter_map(|(k, v)| {
        let rest = k.strip_prefix("LODGE_")?;
        rest.contains("__")
            .then(|| (rest.to_lowercase().replace("__", "."), v))
    })
    .collect()
}

impl NodeConfig {
    /// Loads the layers and validates the result.
    pub fn load(o: &Overrides) -> Result<Self, ConfigError> {
        Self::load_from(o, std::env::vars())
    }

    fn load_from(
        o: &Overrides,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut b = Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(path) = &o.config_file {
            if !path.is_file() {
                return Err(err(
                    "--config",
                    format!("{} is not a readable file", path.display()),
                ));
            }
            b = b.add_source(File::from(path.as_path()).format(FileFormat::Toml));
        }
        let set = |b: config::ConfigBuilder<config::builder::DefaultState>, k: &str, v: Value| {
            b.set_override(k, v).map_err(|e| err(k, e.to_string()))
        };
        let defaults = Config::builder()
            .add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml))
            .build()
            .expect("the embedded defaults parse");
        for (k, v) in env_overrides(env) {
            // A list key takes a comma-separated value (empty: an empty list).
            let value: Value = if defaults.get_array(&k).is_ok() {
                v.split(',')
                    .map(str::trim)
                    .filter(|e| !e.is_empty())
                    .map(|e| Value::from(e.to_string()))
                    .collect::<Vec<_>>()
                    .into()
            } else {
                v.into()
            };
            b = set(b, &k, value)?;
        }
        if let Some(v) = o.node_id {
            b = set(b, "node.id", v.into())?;
        }
        if let Some(v) = &o.listen {
            b = set(b, "server.listen", v.clone().into())?;
        }
        if let Some(v) = &o.metrics_listen {
            b = set(b, "metrics.listen", v.clone().into())?;
        }
        if let Some(v) = &o.data_dir {
            b = set(b, "node.data_dir", v.display().to_string().into())?;
        }
        if let Some(v) = &o.log_level {
            b = set(b, "log.level", v.clone().into())?;
        }
        if let Some(v) = o.allow_mutations {
            b = set(b, "admin.allow_mutations", v.into())?;
        }
        if let Some(v) = &o.initial_cluster {
            b = set(b, "cluster.initial_cluster", v.clone().into())?;
        }
        if let Some(v) = &o.join {
            b = set(b, "cluster.join", v.clone().into())?;
        }
        if let Some(v) = &o.advertise {
            b = set(b, "cluster.advertise", v.clone().into())?;
        }
        if let Some(v) = &o.peer_listen {
            b = set(b, "peer.listen", v.clone().into())?;
        }
        if let Some(v) = &o.peer_advertise {
            b = set(b, "peer.advertise", v.clone().into())?;
        }
        if let Some(v) = o.insecure {
            b = set(b, "server.insecure", v.into())?;
        }
        let merged = b.build().map_err(|e| {
            err(
                o.config_file.as_deref().map_or("config", |_| "--config"),
                e.to_string(),
            )
        })?;
        check_known_keys(&defaults.cache, &merged.cache, "")?;
        let cfg: NodeConfig = merged.try_deserialize().map_err(|e| match e {
            config::ConfigError::Type {
                key: Some(key),
                unexpected,
                expected,
                ..
            } => err(&key, format!("expected {expected}, got {unexpected}")),
            // serde's own messages end "for key `server.listen`": name that key.
            other => {
                let text = other.to_string();
                match text.rsplit_once(" for key `") {
                    Some((problem, key)) => err(key.trim_end_matches('`'), problem),
                    None => err("config", text),
                }
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.durations_in_range()?;
        let (grpc, metrics) = (self.grpc_addr()?, self.metrics_addr()?);
        if grpc == metrics && grpc.port() != 0 {
            return Err(err(
                "metrics.listen",
                format!("{metrics} is also server.listen; they need different ports"),
            ));
        }
        self.check_peer(grpc, metrics)?;
        if self.runtime.worker_arbiters > 256 {
            return Err(err(
                "runtime.worker_arbiters",
                "must be at most 256 (0 = one per CPU)",
            ));
        }
        if self.node.id == 0 {
            return Err(err("node.id", "must be 1 or more (raft ids start at 1)"));
        }
        if self.node.data_dir.as_os_str().is_empty() {
            return Err(err("node.data_dir", "must not be empty"));
        }
        if !["critical", "error", "warning", "info", "debug", "trace"]
            .contains(&self.log.level.as_str())
        {
            return Err(err(
                "log.level",
                format!(
                    "{:?} is not one of critical, error, warning, info, debug, trace",
                    self.log.level
                ),
            ));
        }
        if !["term", "json"].contains(&self.log.format.as_str()) {
            return Err(err(
                "log.format",
                format!("{:?} is not one of term, json", self.log.format),
            ));
        }
        let s = &self.server;
        for (key, v) in [
            ("server.max_connections", s.max_connections as u64),
            (
                "server.max_concurrent_streams",
                s.max_concurrent_streams as u64,
            ),
            ("server.max_message_bytes", s.max_message_bytes as u64),
            ("server.request_timeout_ms", s.request_timeout_ms),
            ("server.keepalive_interval_ms", s.keepalive_interval_ms),
            ("server.keepalive_timeout_ms", s.keepalive_timeout_ms),
            ("server.drain_timeout_ms", s.drain_timeout_ms),
            (
                "runtime.mailbox_capacity",
                self.runtime.mailbox_capacity as u64,
            ),
            (
                "supervision.restart_window_ms",
                self.supervision.restart_window_ms,
            ),
            (
                "supervision.shutdown_timeout_ms",
                self.supervision.shutdown_timeout_ms,
            ),
            ("server.per_ip_window_ms", s.per_ip_window_ms),
            ("server.handshake_timeout_ms", s.handshake_timeout_ms),
            ("server.max_concurrent_rpcs", s.max_concurrent_rpcs as u64),
            (
                "metrics.max_connections",
                self.metrics.max_connections as u64,
            ),
            (
                "metrics.request_timeout_ms",
                self.metrics.request_timeout_ms,
            ),
            (
                "registry.heartbeat_interval_ms",
                self.registry.heartbeat_interval_ms,
            ),
            (
                "registry.max_missed_heartbeats",
                u64::from(self.registry.max_missed_heartbeats),
            ),
            (
                "translation.request_timeout_ms",
                self.translation.request_timeout_ms,
            ),
            (
                "translation.probe_interval_ms",
                self.translation.probe_interval_ms,
            ),
            (
                "translation.chunk_chars",
                self.translation.chunk_chars as u64,
            ),
            (
                "translation.max_jobs_per_client",
                self.translation.max_jobs_per_client as u64,
            ),
            (
                "translation.requests_per_second",
                u64::from(self.translation.requests_per_second),
            ),
            ("translation.burst", u64::from(self.translation.burst)),
            (
                "router.rendezvous_timeout_ms",
                self.router.rendezvous_timeout_ms,
            ),
            ("router.idle_timeout_ms", self.router.idle_timeout_ms),
            ("router.stall_timeout_ms", self.router.stall_timeout_ms),
            ("router.queue_frames", self.router.queue_frames as u64),
            ("router.owner_lease_ttl_ms", self.router.owner_lease_ttl_ms),
            ("balancer.sniff_timeout_ms", self.balancer.sniff_timeout_ms),
            (
                "balancer.connect_timeout_ms",
                self.balancer.connect_timeout_ms,
            ),
        ] {
            if v == 0 {
                return Err(err(key, "must be greater than 0"));
            }
        }
        self.check_kv()?;
        self.per_ip_exempt()?;
        self.trusted_proxies()?;
        self.balancer_listeners()?;
        let b = &self.balancer;
        if !(1..=16).contains(&b.connect_attempts) {
            return Err(err("balancer.connect_attempts", "must be between 1 and 16"));
        }
        if !(4096..=4 << 20).contains(&b.buffer_bytes) {
            return Err(err(
                "balancer.buffer_bytes",
                "must be between 4096 and 4194304",
            ));
        }
        if !(1..=1_000_000).contains(&b.max_connections) {
            return Err(err(
                "balancer.max_connections",
                "must be between 1 and 1000000",
            ));
        }
        if b.deploy_hook.first().is_some_and(|p| p.trim().is_empty()) {
            return Err(err(
                "balancer.deploy_hook",
                "the program (first entry) is empty",
            ));
        }
        if !(0.0..=1.0).contains(&self.supervision.backoff_jitter) {
            return Err(err("supervision.backoff_jitter", "must be between 0 and 1"));
        }
        if self.supervision.backoff_initial_ms > self.supervision.backoff_max_ms {
            return Err(err(
                "supervision.backoff_initial_ms",
                "must not exceed supervision.backoff_max_ms",
            ));
        }
        let c = &self.cluster;
        if c.tick_ms == 0 || c.heartbeat_ticks == 0 || c.snapshot_interval == 0 {
            return Err(err(
                "cluster",
                "tick_ms, heartbeat_ticks and snapshot_interval must be greater than 0",
            ));
        }
        if c.election_ticks <= c.heartbeat_ticks {
            return Err(err(
                "cluster.election_ticks",
                "must be greater than cluster.heartbeat_ticks",
            ));
        }
        if c.heartbeat_interval_ms == 0 || c.heartbeat_timeout_ms <= c.heartbeat_interval_ms {
            return Err(err(
                "cluster.heartbeat_timeout_ms",
                "must be greater than cluster.heartbeat_interval_ms, itself greater than 0",
            ));
        }
        if c.watch_history == 0 {
            return Err(err("cluster.watch_history", "must be greater than 0"));
        }
        if !matches!(c.join_as.as_str(), "voter" | "learner") {
            return Err(err(
                "cluster.join_as",
                format!("{:?} is not one of voter, learner", c.join_as),
            ));
        }
        let r = &self.router;
        if r.owner_lease_ttl_ms < 1000 {
            return Err(err(
                "router.owner_lease_ttl_ms",
                "must be at least 1000 (leases count whole seconds)",
            ));
        }
        for (key, v) in [
            ("router.stream_window_bytes", r.stream_window_bytes),
            ("router.connection_window_bytes", r.connection_window_bytes),
        ] {
            if !(65_535..=(1 << 31) - 1).contains(&v) {
                return Err(err(
                    key,
                    "must be between 65535 and 2147483647 (HTTP/2 limits)",
                ));
            }
        }
        self.certificate_roles()?;
        self.module_networks()?;
        lodge_grpc::auth::Authenticator::new(&self.auth_settings()?).map_err(|e| {
            let key = e.split(':').next().unwrap_or("auth").to_string();
            err(
                &key,
                e.split_once(": ").map_or(e.clone(), |(_, m)| m.to_string()),
            )
        })?;
        let t = &self.translation;
        if t.backend_url.starts_with("https://") {
            return Err(err(
                "translation.backend_url",
                "https is not supported yet: use http:// (a local model server, or a local TLS-terminating proxy)",
            ));
        }
        if !t.backend_url.is_empty() && !t.backend_url.starts_with("http://") {
            return Err(err(
                "translation.backend_url",
                format!(
                    "{:?} is not an http:// URL",
                    lodge_actors::redact::url_credentials(&t.backend_url)
                ),
            ));
        }
        if !t.backend_url.is_empty() && t.model.trim().is_empty() {
            return Err(err(
                "translation.model",
                "required when translation.backend_url is set",
            ));
        }
        if !c.advertise.is_empty() {
            parse_host_port("cluster.advertise", &c.advertise)?;
        }
        let join = self.join_endpoints()?;
        if !join.is_empty() && !c.initial_cluster.trim().is_empty() {
            return Err(err(
                "cluster.join",
                "cannot be combined with cluster.initial_cluster: a node either founds the cluster or joins it",
            ));
        }
        self.members()?;
        self.tls_material()?;
        self.peer_tls_material()?;
        self.metrics_security()?;
        Ok(())
    }

    /// The `[kv]` limits fit together and in a message: any value accepted can be read back, in
    /// a range page and in a watch event with its previous value.
    fn check_kv(&self) -> Result<(), ConfigError> {
        let k = &self.kv;
        let message = self.server.max_message_bytes;
        // The fields around a key and its value in an answer (see `KV_OVERHEAD`), and around
        // the values of one answer message.
        let entry = k
            .max_key_bytes
            .saturating_add(k.max_value_bytes)
            .saturating_add(lodge_actors::cluster::kv::KV_OVERHEAD);
        let room = message.saturating_sub(1024);
        for (key, v) in [
            ("kv.max_key_bytes", k.max_key_bytes),
            ("kv.max_value_bytes", k.max_value_bytes),
            ("kv.max_txn_ops", k.max_txn_ops),
        ] {
            if v == 0 {
                return Err(err(key, "must be greater than 0"));
            }
        }
        for (key, v, least) in [
            ("kv.range_page_bytes", k.range_page_bytes, entry),
            (
                "kv.watch_batch_bytes",
                k.watch_batch_bytes,
                entry.saturating_mul(2),
            ),
        ] {
            if v < least {
                return Err(err(
                    key,
                    format!(
                        "{v} is too small to hold the largest key and value ({least} bytes with \
                         kv.max_key_bytes = {}, kv.max_value_bytes = {}{})",
                        k.max_key_bytes,
                        k.max_value_bytes,
                        if least > entry {
                            ", twice: an event and its previous value"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            if v > room {
                return Err(err(
                    key,
                    format!(
                        "{v} leaves no room in a message: at most server.max_message_bytes - 1024 = {room}"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The KV service's limits.
    pub fn kv_limits(&self) -> lodge_grpc::kv::KvLimits {
        let k = &self.kv;
        lodge_grpc::kv::KvLimits {
            max_key_bytes: k.max_key_bytes,
            max_value_bytes: k.max_value_bytes,
            max_txn_ops: k.max_txn_ops,
            range_page_bytes: k.range_page_bytes,
            watch_batch_bytes: k.watch_batch_bytes,
        }
    }

    /// The first members, id → peer address; this node alone when `initial_cluster` is empty.
    pub fn members(&self) -> Result<std::collections::BTreeMap<u64, String>, ConfigError> {
        let key = "cluster.initial_cluster";
        let mut out = std::collections::BTreeMap::new();
        let spec = self.cluster.initial_cluster.trim();
        if spec.is_empty() {
            out.insert(self.node.id, self.peer_addr()?.to_string());
            return Ok(out);
        }
        for part in spec.split(',').map(str::trim) {
            let (id, addr) = part
                .split_once('=')
                .ok_or_else(|| err(key, format!("{part:?} is not ID=HOST:PORT")))?;
            let id: u64 = id
                .parse()
                .ok()
                .filter(|i| *i > 0)
                .ok_or_else(|| err(key, format!("{id:?} is not a member id (1 or more)")))?;
            parse_addr(key, addr)?;
            if out.insert(id, addr.to_string()).is_some() {
                return Err(err(key, format!("member {id} is listed twice")));
            }
        }
        if !out.contains_key(&self.node.id) {
            return Err(err(
                key,
                format!("does not list this node (node.id = {})", self.node.id),
            ));
        }
        Ok(out)
    }

    /// Members to join through (`cluster.join`); empty when this node founds its cluster.
    pub fn join_endpoints(&self) -> Result<Vec<String>, ConfigError> {
        self.cluster
            .join
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| parse_host_port("cluster.join", e).map(|()| e.to_string()))
            .collect()
    }

    /// The gRPC listen address.
    pub fn grpc_addr(&self) -> Result<SocketAddr, ConfigError> {
        parse_addr("server.listen", &self.server.listen)
    }

    /// The metrics listen address.
    pub fn metrics_addr(&self) -> Result<SocketAddr, ConfigError> {
        parse_addr("metrics.listen", &self.metrics.listen)
    }

    /// The peer listen address: `peer.listen`, else server.listen's host with its port + 2 (port
    /// 0 stays 0: an ephemeral port, as the tests use).
    pub fn peer_addr(&self) -> Result<SocketAddr, ConfigError> {
        if !self.peer.listen.trim().is_empty() {
            return parse_addr("peer.listen", self.peer.listen.trim());
        }
        let mut addr = self.grpc_addr()?;
        if addr.port() != 0 {
            let port = addr.port().checked_add(2).ok_or_else(|| {
                err(
                    "peer.listen",
                    format!("server.listen's port + 2 is past 65535 ({addr}); set peer.listen"),
                )
            })?;
            addr.set_port(port);
        }
        Ok(addr)
    }

    /// Checks the peer listener: its own port and an advertised address that parses (secure by
    /// default is checked with the other listeners, in `crate::exposure`).
    fn check_peer(&self, grpc: SocketAddr, metrics: SocketAddr) -> Result<(), ConfigError> {
        let peer = self.peer_addr()?;
        for (other, key) in [(grpc, "server.listen"), (metrics, "metrics.listen")] {
            if peer == other && peer.port() != 0 {
                return Err(err(
                    "peer.listen",
                    format!("{peer} is also {key}; they need different ports"),
                ));
            }
        }
        if !self.peer.advertise.is_empty() {
            parse_host_port("peer.advertise", &self.peer.advertise)?;
        }
        if self.peer.max_snapshot_bytes == 0 {
            return Err(err("peer.max_snapshot_bytes", "must be greater than 0"));
        }
        Ok(())
    }

    /// The peer listener's TLS files, checked to load; `None` when peer TLS is off. Always
    /// mutual: the CA is required.
    pub fn peer_tls_material(&self) -> Result<Option<lodge_grpc::tls::TlsFiles>, ConfigError> {
        let t = &self.peer.tls;
        if t.enabled && t.ca_file.is_empty() {
            return Err(err(
                "peer.tls.ca_file",
                "is required when peer.tls.enabled = true",
            ));
        }
        tls_files(
            "peer.tls",
            t.enabled,
            &t.cert_file,
            &t.key_file,
            Some(t.ca_file.as_str()),
        )
    }

    /// How this node connects to other members' peer ports.
    pub fn peer_client_tls(&self) -> lodge_grpc::client::ClientTls {
        let t = &self.peer.tls;
        if !t.enabled {
            return Default::default();
        }
        lodge_grpc::client::ClientTls {
            bearer: None,
            ca: Some(t.ca_file.clone().into()),
            cert: Some(t.cert_file.clone().into()),
            key: Some(t.key_file.clone().into()),
            domain: None,
        }
    }

    /// The gRPC listener's TLS files, checked to load; `None` when TLS is off.
    pub fn tls_material(&self) -> Result<Option<lodge_grpc::tls::TlsFiles>, ConfigError> {
        let t = &self.server.tls;
        let ca = (!t.client_ca_file.is_empty()).then_some(t.client_ca_file.as_str());
        tls_files("server.tls", t.enabled, &t.cert_file, &t.key_file, ca)
    }

    /// Every `*_ms` key at most [`MAX_DURATION_MS`]: larger ones would overflow the clock
    /// arithmetic of timers (a deadline past the end of time).
    fn durations_in_range(&self) -> Result<(), ConfigError> {
        fn walk(prefix: &str, t: &toml::Table) -> Result<(), ConfigError> {
            for (k, v) in t {
                let key = format!("{prefix}{k}");
                match v {
                    toml::Value::Table(inner) => walk(&format!("{key}."), inner)?,
                    toml::Value::Integer(ms)
                        if k.ends_with("_ms") && *ms as u64 > MAX_DURATION_MS =>
                    {
                        return Err(err(
                            &key,
                            format!("{ms} is more than {MAX_DURATION_MS} (365 days)"),
                        ))
                    }
                    _ => {}
                }
            }
            Ok(())
        }
        let table = toml::Table::try_from(self).map_err(|e| err("config", e.to_string()))?;
        walk("", &table)
    }

    /// `server.per_ip_exempt`, parsed.
    pub fn per_ip_exempt(&self) -> Result<lodge_grpc::listener::Networks, ConfigError> {
        networks("server.per_ip_exempt", &self.server.per_ip_exempt)
    }

    /// `server.proxy_protocol_from`, parsed.
    pub fn trusted_proxies(&self) -> Result<lodge_grpc::listener::Networks, ConfigError> {
        networks(
            "server.proxy_protocol_from",
            &self.server.proxy_protocol_from,
        )
    }

    /// The data plane's listeners: each `balancer.listen` entry's address and protocol.
    pub fn balancer_listeners(
        &self,
    ) -> Result<Vec<(SocketAddr, Option<lodge_actors::balancer::Protocol>)>, ConfigError> {
        self.balancer
            .listen
            .iter()
            .enumerate()
            .map(|(n, entry)| {
                let key = format!("balancer.listen[{n}]");
                let (addr, protocol) = match entry.split_once('=') {
                    Some((a, p)) => (a, Some(p)),
                    None => (entry.as_str(), None),
                };
                let addr: SocketAddr = addr
                    .trim()
                    .parse()
                    .map_err(|_| err(&key, format!("{addr:?} is not an IP address and port")))?;
                let protocol = protocol
                    .map(|p| {
                        lodge_actors::balancer::Protocol::parse(p.trim()).ok_or_else(|| {
                            err(
                                &key,
                                format!("{p:?} is not a protocol (http, mysql, redis, ...)"),
                            )
                        })
                    })
                    .transpose()?;
                Ok((addr, protocol))
            })
            .collect()
    }

    /// The router's auth settings, with key files read.
    /// Roles of client certificates (`auth.certificate_roles`, `auth.certificate_prefixes`).
    pub fn certificate_roles(
        &self,
    ) -> Result<lodge_grpc::auth::certs::CertificateRoles, ConfigError> {
        let a = &self.auth;
        lodge_grpc::auth::certs::CertificateRoles::parse(
            &a.certificate_roles,
            &a.certificate_prefixes,
        )
        .map_err(|(key, why)| err(&key, why))
    }

    /// `auth.module_networks`, parsed; `None` when empty (modules' data addresses anywhere).
    pub fn module_networks(&self) -> Result<Option<lodge_grpc::listener::Networks>, ConfigError> {
        if self.auth.module_networks.is_empty() {
            return Ok(None);
        }
        networks("auth.module_networks", &self.auth.module_networks).map(Some)
    }

    /// How bearer tokens are checked (the `[auth]` section, secrets read from their files).
    pub fn auth_settings(&self) -> Result<lodge_grpc::auth::AuthSettings, ConfigError> {
        let a = &self.auth;
        let read = |key: &str, path: &str| {
            std::fs::read(path).map_err(|e| err(key, format!("cannot read {path}: {e}")))
        };
        let secret = match (a.hs256_secret.is_empty(), a.hs256_secret_file.is_empty()) {
            (false, false) => {
                return Err(err(
                    "auth.hs256_secret_file",
                    "set hs256_secret or hs256_secret_file, not both",
                ))
            }
            (false, true) => Some(a.hs256_secret.as_bytes().to_vec()),
            (true, false) => {
                let mut s = read("auth.hs256_secret_file", &a.hs256_secret_file)?;
                // A trailing newline from `echo secret > file` is not part of the secret.
                while s.last().is_some_and(|b| b.is_ascii_whitespace()) {
                    s.pop();
                }
                Some(s)
            }
            (true, true) => None,
        };
        let public_key_pem = if a.public_key_file.is_empty() {
            None
        } else {
            Some(read("auth.public_key_file", &a.public_key_file)?)
        };
        Ok(lodge_grpc::auth::AuthSettings {
            enabled: a.enabled,
            hs256_secret: secret,
            public_key_pem,
            audience: a.audience.clone(),
            issuer: (!a.issuer.is_empty()).then(|| a.issuer.clone()),
            leeway_secs: a.leeway_secs,
        })
    }

    /// The effective configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the configuration serialises")
    }

    /// The effective configuration as JSON, with secret values replaced.
    pub fn redacted_json(&self) -> String {
        let mut v = serde_json::to_value(self).expect("the configuration serialises");
        redact(&mut v);
        v.to_string()
    }

    pub fn duration(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }
}

fn parse_addr(key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse().map_err(|e| {
        err(
            key,
            format!("{v:?} is not a HOST:PORT socket address ({e})"),
        )
    })
}

/// A `HOST:PORT` where HOST may be a name (addresses other machines use).
fn parse_host_port(key: &str, v: &str) -> Result<(), ConfigError> {
    match v.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(())
        }
        _ => Err(err(
            key,
            format!("{v:?} is not HOST:PORT with a port in 1..65535"),
        )),
    }
}

/// Replaces secret values (by key name), and the passwords of URLs in any string
/// (`backend_url = "http://user:password@host/v1"`); see [`lodge_actors::redact::json`].
fn redact(v: &mut serde_json::Value) {
    lodge_actors::redact::json(v);
}

/// The TLS files of `section`, checked to load; `None` when it is off.
pub fn tls_files(
    section: &str,
    enabled: bool,
    cert_file: &str,
    key_file: &str,
    client_ca_file: Option<&str>,
) -> Result<Option<lodge_grpc::tls::TlsFiles>, ConfigError> {
    let all = [cert_file, key_file, client_ca_file.unwrap_or("")];
    if !enabled {
        if all.iter().any(|f| !f.is_empty()) {
            // Serving plaintext while certificates are configured would be a silent downgrade.
            return Err(err(
                &format!("{section}.enabled"),
                format!("TLS files are set but TLS is off; set {section}.enabled = true or remove the files"),
            ));
        }
        return Ok(None);
    }
    for (key, path) in [("cert_file", cert_file), ("key_file", key_file)] {
        if path.is_empty() {
            return Err(err(
                &format!("{section}.{key}"),
                format!("is required when {section}.enabled = true"),
            ));
        }
    }
    let files = lodge_grpc::tls::TlsFiles {
        section: section.to_string(),
        cert_file: cert_file.into(),
        key_file: key_file.into(),
        client_ca_file: client_ca_file.map(PathBuf::from),
    };
    lodge_grpc::tls::ReloadingTls::check(&files).map_err(|e| match e.split_once(": ") {
        // "server.tls.key_file /path: ..." names its key first.
        Some((what, why)) => match what.split_once(' ') {
            Some((key, path)) => err(key, format!("{path}: {why}")),
            None => err(what, why),
        },
        None => err(section, e),
    })?;
    Ok(Some(files))
}

/// Every key of `given` must exist in `known` (tables recursively).
fn check_known_keys(known: &Value, given: &Value, prefix: &str) -> Result<(), ConfigError> {
    let (ValueKind::Table(k), ValueKind::Table(g)) = (&known.kind, &given.kind) else {
        return Ok(());
    };
    let known_keys: BTreeMap<&String, &Value> = k.iter().collect();
    for (key, val) in g {
        let full = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match known_keys.get(key) {
            None => return Err(err(&full, "unknown key")),
            Some(kv) => check_known_keys(kv, val, &full)?,
        }
    }
    Ok(())
}

/// A list of addresses and CIDR blocks under `key`; the error names the entry (`key[i]`).
fn networks(key: &str, entries: &[String]) -> Result<lodge_grpc::listener::Networks, ConfigError> {
    lodge_grpc::listener::Networks::parse(entries)
        .map_err(|(i, why)| err(&format!("{key}[{i}]"), why))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(o: Overrides, env: &[(&str, &str)]) -> Result<NodeConfig, ConfigError> {
        NodeConfig::load_from(&o, env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn layers_apply_in_order_defaults_file_env_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("n.toml");
        std::fs::write(
            &file,
            "[server]\nlisten = \"127.0.0.1:9000\"\nmax_connections = 7\n[node]\nid = 4\n",
        )
        .unwrap();
        let base = Overrides {
            config_file: Some(file),
            ..Default::default()
        };
        let c = load(base.clone(), &[]).unwrap();
        assert_eq!(
            (
                c.server.listen.as_str(),
                c.server.max_connections,
                c.node.id
            ),
            ("127.0.0.1:9000", 7, 4)
        );
        assert_eq!(
            c.metrics.listen, "127.0.0.1:7401",
            "untouched keys keep their defaults"
        );
        let env = [
            ("LODGE_SERVER__MAX_CONNECTIONS", "9"),
            ("LODGE_NODE__ID", "5"),
            ("LODGE_ENDPOINT", "x:1"),
        ];
        let c = load(base.clone(), &env).unwrap();
        assert_eq!(
            (c.server.max_connections, c.node.id),
            (9, 5),
            "env beats the file; LODGE_ENDPOINT is not config"
        );
        let flags = Overrides {
            node_id: Some(6),
            ..base
        };
        assert_eq!(load(flags, &env).unwrap().node.id, 6, "flags beat env");
    }

    #[test]
    fn list_keys_from_the_environment_are_comma_separated() {
        let c = load(
            Overrides::default(),
            &[("LODGE_SERVER__PER_IP_EXEMPT", "10.0.0.0/8, ::1")],
        )
        .unwrap();
        assert_eq!(c.server.per_ip_exempt, ["10.0.0.0/8", "::1"]);
        assert!(c
            .per_ip_exempt()
            .unwrap()
            .contains("10.9.8.7".parse().unwrap()));
        let c = load(Overrides::default(), &[("LODGE_SERVER__PER_IP_EXEMPT", "")]).unwrap();
        assert!(c.server.per_ip_exempt.is_empty(), "empty: no exemptions");
        let defaults = load(Overrides::default(), &[]).unwrap();
        assert!(defaults
            .per_ip_exempt()
            .unwrap()
            .contains("127.0.0.1".parse().unwrap()));
        assert!(defaults
            .per_ip_exempt()
            .unwrap()
            .contains("::1".parse().unwrap()));
        let e = load(
            Overrides::default(),
            &[(
                "LODGE_SERVER__PROXY_PROTOCOL_FROM",
                "10.0.0.1,proxy.example",
            )],
        )
        .unwrap_err();
        assert_eq!(e.key, "server.proxy_protocol_from[1]", "{e:?}");
    }

    /// Every key of the embedded defaults, dotted, with its default value.
    fn default_keys() -> Vec<(String, toml::Value)> {
        fn walk(prefix: &str, t: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match v {
                    toml::Value::Table(inner) => walk(&key, inner, out),
                    other => out.push((key, other.clone())),
                }
            }
        }
        let mut out = Vec::new();
        walk("", &DEFAULT_TOML.parse::<toml::Table>().unwrap(), &mut out);
        out
    }

    /// A value within or far beyond what a key takes: numbers at and past the edges, strings,
    /// lists, booleans.
    fn random_value(rng: &mut fastrand::Rng, default: &toml::Value) -> toml::Value {
        use toml::Value as V;
        match rng.u8(0..10) {
            0 => V::Integer(0),
            1 => V::Integer(-1),
            2 => V::Integer(i64::MAX),
            3 => V::Integer(rng.i64(1..100_000)),
            4 => V::Float(rng.f64() * 1e12),
            5 => V::Boolean(rng.bool()),
            6 => V::String(String::new()),
            7 => V::String((0..rng.usize(1..40)).map(|_| rng.char(' '..'~')).collect()),
            8 => V::Array(vec![V::String("10.0.0.0/8".into()), V::Integer(7)]),
            _ => default.clone(),
        }
    }

    #[test]
    fn random_configurations_never_panic_and_every_refusal_names_a_key_set() {
        let keys = default_keys();
        assert!(keys.len() > 80, "{}", keys.len());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("random.toml");
        let mut rng = fastrand::Rng::with_seed(15);
        let (mut accepted, mut refused) = (0, 0);
        for round in 0..500 {
            let mut root = toml::Table::new();
            let mut chosen = Vec::new();
            for _ in 0..rng.usize(1..4) {
                let (key, default) = &keys[rng.usize(..keys.len())];
                let value = random_value(&mut rng, default);
                let mut table = &mut root;
                let parts: Vec<&str> = key.split('.').collect();
                for part in &parts[..parts.len() - 1] {
                    table = table
                        .entry(part.to_string())
                        .or_insert_with(|| toml::Value::Table(Default::default()))
                        .as_table_mut()
                        .unwrap();
                }
                table.insert(parts[parts.len() - 1].to_string(), value);
                chosen.push(key.clone());
            }
            std::fs::write(&file, toml::to_string(&root).unwrap()).unwrap();
            let loaded = load(
                Overrides {
                    config_file: Some(file.clone()),
                    ..Default::default()
                },
                &[],
            );
            match loaded {
                Ok(_) => accepted += 1,
                Err(e) => {
                    refused += 1;
                    // The key named is one that was set, or the section or list entry of one.
                    let section = |k: &str| k.rsplit_once('.').map_or("", |(s, _)| s).to_string();
                    let named = chosen.iter().any(|k| {
                        e.key == *k
                            || e.key.starts_with(&format!("{k}["))
                            || e.key == section(k)
                            || section(&e.key) == section(k)
                            // A limit refused for another key's sake names that key in its problem.
                            || e.problem.contains(k.as_str())
                    });
                    assert!(
                        named,
                        "round {round}: {chosen:?} refused as {e:?}\n{}",
                        std::fs::read_to_string(&file).unwrap()
                    );
                    assert!(!e.problem.is_empty());
                }
            }
        }
        assert!(accepted > 30 && refused > 30, "{accepted} / {refused}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = load(
            Overrides {
                listen: Some("nowhere".into()),
                ..Default::default()
            },
            &[],
        )
        .unwrap_err();
        assert_eq!(e.key, "server.listen");
        let e = load(
            Overrides::default(),
            &[("LODGE_SERVER__LISTN", "1.2.3.4:5")],
        )
        .unwrap_err();
        assert_eq!(
            (e.key.as_str(), e.problem.as_str()),
            ("server.listn", "unknown key")
        );
        let e = load(
            Overrides::default(),
            &[("LODGE_SERVER__MAX_CONNECTIONS", "many")],
        )
        .unwrap_err();
        assert_eq!(e.key, "server.max_connections");
        for (env, key) in [
            (
                (
                    "LODGE_TRANSLATION__BACKEND_URL",
                    "https://api.example.com/v1",
                ),
                "translation.backend_url",
            ),
            (
                ("LODGE_TRANSLATION__BACKEND_URL", "http://127.0.0.1:8000/v1"),
                "translation.model",
            ),
            (
                ("LODGE_REGISTRY__HEARTBEAT_INTERVAL_MS", "0"),
                "registry.heartbeat_interval_ms",
            ),
            (("LODGE_TRANSLATION__BURST", "0"), "translation.burst"),
        ] {
            let e = load(Overrides::default(), &[env]).unwrap_err();
            assert_eq!(e.key, key, "{env:?}");
        }
        let e = load(
            Overrides::default(),
            &[("LODGE_SERVER__TLS__ENABLED", "true")],
        )
        .unwrap_err();
        assert_eq!(e.key, "server.tls.cert_file");
        let e = load(Overrides::default(), &[("LODGE_LOG__LEVEL", "loud")]).unwrap_err();
        assert_eq!(e.key, "log.level");
        let e = load(
            Overrides::default(),
            &[("LODGE_SERVER__TLS__CERT_FILE", "/x.pem")],
        )
        .unwrap_err();
        assert_eq!(
            e.key, "server.tls.enabled",
            "certificates without TLS on must not serve plaintext"
        );
        let same = Overrides {
            listen: Some("127.0.0.1:7000".into()),
            metrics_listen: Some("127.0.0.1:7000".into()),
            ..Default::default()
        };
        assert_eq!(load(same, &[]).unwrap_err().key, "metrics.listen");
    }

    #[test]
    fn kv_limits_must_fit_together_and_in_a_message() {
        let c = load(Overrides::default(), &[]).unwrap();
        assert_eq!(c.kv_limits(), lodge_grpc::kv::KvLimits::default());
        for (env, key, says) in [
            (
                vec![("LODGE_KV__MAX_VALUE_BYTES", "3200000")],
                "kv.range_page_bytes",
                "too small to hold the largest key and value",
            ),
            (
                vec![("LODGE_KV__RANGE_PAGE_BYTES", "4194304")],
                "kv.range_page_bytes",
                "leaves no room in a message",
            ),
            (
                vec![("LODGE_KV__MAX_VALUE_BYTES", "1600000")],
                "kv.watch_batch_bytes",
                "an event and its previous value",
            ),
            (
                vec![("LODGE_KV__WATCH_BATCH_BYTES", "4194304")],
                "kv.watch_batch_bytes",
                "leaves no room in a message",
            ),
            (
                vec![("LODGE_KV__MAX_TXN_OPS", "0")],
                "kv.max_txn_ops",
                "greater than 0",
            ),
        ] {
            let e = load(Overrides::default(), &env).unwrap_err();
            assert_eq!(e.key, key, "{env:?}");
            assert!(e.problem.contains(says), "{env:?}: {}", e.problem);
        }
        // Larger values with a larger message limit.
        let c = load(
            Overrides::default(),
            &[
                ("LODGE_SERVER__MAX_MESSAGE_BYTES", "16777216"),
                ("LODGE_KV__MAX_VALUE_BYTES", "4194304"),
                ("LODGE_KV__RANGE_PAGE_BYTES", "8388608"),
                ("LODGE_KV__WATCH_BATCH_BYTES", "12582912"),
            ],
        )
        .unwrap();
        assert_eq!(c.kv_limits().max_value_bytes, 4 << 20);
    }

    #[test]
    fn secrets_are_redacted_but_file_paths_are_not() {
        let mut v = serde_json::json!({"a": {
            "api_key": "k", "key_file": "/x", "jwt_secret": "s",
            "hs256_secret": "", "hs256_secret_file": "/etc/lodge/hs256",
            "backend_url": "http://bob:hunter2@llm:8000/v1",
            "endpoints": ["http://tok@h:1", "10.0.0.1:7000"],
        }});
        redact(&mut v);
        assert_eq!(v["a"]["api_key"], "<redacted>");
        assert_eq!(v["a"]["jwt_secret"], "<redacted>");
        assert_eq!(
            v["a"]["hs256_secret"], "",
            "an empty secret says none is set"
        );
        assert_eq!(v["a"]["key_file"], "/x");
        assert_eq!(v["a"]["hs256_secret_file"], "/etc/lodge/hs256");
        assert_eq!(v["a"]["backend_url"], "http://bob:<redacted>@llm:8000/v1");
        assert_eq!(v["a"]["endpoints"][0], "http://<redacted>@h:1");
        assert_eq!(v["a"]["endpoints"][1], "10.0.0.1:7000");
    }
}
