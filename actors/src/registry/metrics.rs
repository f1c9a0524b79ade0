//! Figures of the client registry and the translation gateway. Created before the actors (which
//! keep clones) and registered on the node's Prometheus registry once it exists.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of the registered-clients gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientLabels {
    pub namespace: String,
    pub version: String,
}

/// Labels of a heartbeat or job count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

/// Labels of a limit rejection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: String,
}

/// Every registry and translation figure. Cloning shares the underlying counters.
#[derive(Clone)]
pub struct RegistryMetrics {
    /// Registrations this member knows of, by namespace and client version.
    pub clients: Family<ClientLabels, Gauge>,
    /// Heartbeats answered here, by outcome (ok, re_register, error). Their latency is the RPC
    /// layer's `lodge_grpc_server_handling_seconds{grpc_method=".../Heartbeat"}`.
    pub heartbeats: Family<OutcomeLabels, Counter>,
    /// Registrations removed because their lease expired (seen by every member).
    pub expirations: Counter,
    /// Registrations made through this member.
    pub registrations: Counter,
    /// Translation jobs, by outcome (ok, backend_error, timeout, rejected).
    pub jobs: Family<OutcomeLabels, Counter>,
    /// Time a translation job took, queueing included.
    pub job_seconds: Histogram,
    /// Tokens the backend reported.
    pub tokens: Counter,
    /// Requests refused by a limit (client_concurrency, client_rate, ip_rate, ip_concurrency,
    /// message_bytes, kv_key_bytes, kv_value_bytes, kv_txn_ops, ...).
    pub rejections: Family<LimitLabels, Counter>,
}

impl Default for RegistryMetrics {
    fn default() -> Self {
        Self {
            clients: Family::default(),
            heartbeats: Family::default(),
            expirations: Counter::default(),
            registrations: Counter::default(),
            jobs: Family::default(),
            job_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            tokens: Counter::default(),
            rejections: Family::default(),
        }
    }
}

impl RegistryMetrics {
    /// Counts `n` more of a labelled outcome.
    pub fn outcome(family: &Family<OutcomeLabels, Counter>, outcome: &str) {
        family
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Counts a request refused by `limit`.
    pub fn rejected(&self, limit: &str) {
        self.rejections
            .get_or_create(&LimitLabels {
                limit: limit.to_string(),
            })
            .inc();
    }

    /// Registers every figure under `lodge_registry_*` and `lodge_translation_*`.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "lodge_registry_clients",
            "Registrations this member knows of, by namespace and client version",
            self.clients.clone(),
        );
        r.register(
            "lodge_registry_heartbeats",
            "Client heartbeats answered by this member, by outcome",
            self.heartbeats.clone(),
        );
        r.register(
            "lodge_registry_expirations",
            "Registrations removed because their heartbeats stopped",
            self.expirations.clone(),
        );
        r.register(
            "lodge_registry_registrations",
            "Registrations made through this member",
            self.registrations.clone(),
        );
        r.register(
            "lodge_translation_jobs",
            "Translation jobs, by outcome",
            self.jobs.clone(),
        );
        r.register(
            "lodge_translation_job_seconds",
            "Time a translation job took, queueing included",
            self.job_seconds.clone(),
        );
        r.register(
            "lodge_translation_tokens",
            "Tokens used, as the backend reported them",
            self.tokens.clone(),
        );
        r.register(
            "lodge_limit_rejections",
            "Requests or connections refused by a limit, by limit",
            self.rejections.clone(),
        );
    }
}
