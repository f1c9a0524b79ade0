//! Figures of the session router, registered on the node's Prometheus registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels naming an operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub operation: String,
}

/// Labels of the byte counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub operation: String,
    /// `user_to_agent` or `agent_to_user`.
    pub direction: String,
}

/// Labels of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub operation: String,
    pub code: String,
}

/// Every router figure; clones share the counters.
#[derive(Clone)]
pub struct RouterMetrics {
    /// Paired sessions running on this member.
    pub sessions_active: Family<OpLabels, Gauge>,
    /// From the first side's arrival to pairing.
    pub rendezvous_seconds: Family<OpLabels, Histogram, fn() -> Histogram>,
    /// Payload bytes forwarded.
    pub bytes: Family<BytesLabels, Counter>,
    /// Sessions and joins that ended in an error, by gRPC code.
    pub errors: Family<ErrorLabels, Counter>,
    /// Sessions ended because a reader stopped reading.
    pub flow_control_timeouts: Counter,
    /// Sessions ended by the idle timeout or the rendezvous timeout.
    pub sessions_expired: Counter,
}

fn rendezvous_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

impl Default for RouterMetrics {
    fn default() -> Self {
        Self {
            sessions_active: Family::default(),
            rendezvous_seconds: Family::new_with_constructor(rendezvous_histogram),
            bytes: Family::default(),
            errors: Family::default(),
            flow_control_timeouts: Counter::default(),
            sessions_expired: Counter::default(),
        }
    }
}

impl RouterMetrics {
    /// Registers the figures as `lodge_router_*`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("lodge_router");
        r.register(
            "sessions_active",
            "Paired sessions on this member",
            self.sessions_active.clone(),
        );
        r.register(
            "rendezvous_duration_seconds",
            "Time from a session's first side arriving to both being paired",
            self.rendezvous_seconds.clone(),
        );
        r.register(
            "bytes",
            "Payload bytes forwarded between users and agents",
            self.bytes.clone(),
        );
        r.register(
            "errors",
            "Sessions and joins ended by an error, by gRPC code",
            self.errors.clone(),
        );
        r.register(
            "flow_control_timeouts",
            "Sessions ended because a reader stopped reading past the stall timeout",
            self.flow_control_timeouts.clone(),
        );
        r.register(
            "sessions_expired",
            "Sessions ended by the rendezvous or idle timeout",
            self.sessions_expired.clone(),
        );
    }

    /// The byte counter of one direction.
    pub fn bytes_of(&self, operation: &str, direction: &str) -> Counter {
        self.bytes
            .get_or_create(&BytesLabels {
                operation: operation.to_string(),
                direction: direction.to_string(),
            })
            .clone()
    }

    /// Counts an error.
    pub fn error(&self, operation: &str, code: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                operation: operation.to_string(),
                code: code.to_string(),
            })
            .inc();
    }

    fn op(operation: &str) -> OpLabels {
        OpLabels {
            operation: operation.to_string(),
        }
    }

    /// A session was paired after `waited`.
    pub fn paired(&self, operation: &str, waited: std::time::Duration) {
        self.sessions_active
            .get_or_create(&Self::op(operation))
            .inc();
        self.rendezvous_seconds
            .get_or_create(&Self::op(operation))
            .observe(waited.as_secs_f64());
    }

    /// A paired session ended.
    pub fn unpaired(&self, operation: &str) {
        self.sessions_active
            .get_or_create(&Self::op(operation))
            .dec();
    }
}
