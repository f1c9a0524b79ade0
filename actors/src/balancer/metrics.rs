//! Figures of the balancer, registered on the node's Prometheus registry as `lodge_balancer_*`.

use std::collections::BTreeMap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::flow::ModuleType;

/// Every decision outcome counted.
pub const OUTCOMES: [&str; 8] = [
    "routed",
    "dry_run",
    "no_route",
    "no_instance",
    "rate_limited",
    "unrecognised",
    "connect_failed",
    "over_capacity",
];

/// A decision's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// routed, dry_run, no_route, no_instance, rate_limited, unrecognised, connect_failed.
    pub outcome: String,
}

/// One module instance.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    pub module_type: String,
    pub instance: String,
}

/// Bytes of one instance in one direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub module_type: String,
    pub instance: String,
    /// `in` (client to module) or `out`.
    pub direction: String,
}

/// A module type.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    pub module_type: String,
}

/// A scaling decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScalingLabels {
    pub module_type: String,
    pub direction: String,
}

/// Every balancer figure; clones share the counters.
#[derive(Clone, Default)]
pub struct BalancerMetrics {
    pub decisions: Family<OutcomeLabels, Counter>,
    /// Data-plane connections open now, per instance.
    pub connections_active: Family<InstanceLabels, Gauge>,
    pub connections: Family<InstanceLabels, Counter>,
    pub bytes: Family<BytesLabels, Counter>,
    pub evictions: Counter,
    pub drains: Counter,
    pub rate_limited: Counter,
    /// Data-plane connections closed by the idle timeout.
    pub idle_closed: Counter,
    pub scaling_decisions: Family<ScalingLabels, Counter>,
    /// Registered instances per type.
    pub instances: Family<TypeLabels, Gauge>,
}

impl BalancerMetrics {
    /// Counts one decision outcome.
    pub fn decided(&self, outcome: &str) {
        self.decisions
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// The decisions counted with `outcome`.
    pub fn decisions_of(&self, outcome: &str) -> u64 {
        self.decisions
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .get()
    }

    /// Sets the instance counts (types with none are shown as 0, not dropped).
    pub fn set_instances(&self, counts: &BTreeMap<ModuleType, i64>) {
        for t in ModuleType::ALL {
            self.instances
                .get_or_create(&TypeLabels {
                    module_type: t.to_string(),
                })
                .set(counts.get(&t).copied().unwrap_or(0));
        }
    }

    /// Forgets an instance's series once it is gone, so that the page does not grow forever.
    pub fn forget(&self, module_type: ModuleType, instance: &str) {
        let labels = InstanceLabels {
            module_type: module_type.to_string(),
            instance: instance.to_string(),
        };
        self.connections_active.remove(&labels);
        self.connections.remove(&labels);
        for direction in ["in", "out"] {
            self.bytes.remove(&BytesLabels {
                module_type: module_type.to_string(),
                instance: instance.to_string(),
                direction: direction.to_string(),
            });
        }
    }

    /// Registers the figures as `lodge_balancer_*`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("lodge_balancer");
        r.register(
            "decisions",
            "Routing decisions (RouteRequest and data-plane connections) by outcome",
            self.decisions.clone(),
        );
        r.register(
            "connections_active",
            "Data-plane connections open now, per module instance",
            self.connections_active.clone(),
        );
        r.register(
            "connections",
            "Data-plane connections forwarded, per module instance",
            self.connections.clone(),
        );
        r.register(
            "bytes",
            "Data-plane bytes forwarded, per module instance and direction",
            self.bytes.clone(),
        );
        r.register(
            "evictions",
            "Module instances evicted after missing their heartbeats",
            self.evictions.clone(),
        );
        r.register(
            "drains",
            "Graceful unregistrations (drains) completed",
            self.drains.clone(),
        );
        r.register(
            "idle_closed",
            "Data-plane connections closed after carrying nothing for balancer.idle_timeout_ms",
            self.idle_closed.clone(),
        );
        r.register(
            "rate_limited",
            "Requests and connections refused by a rate limit",
            self.rate_limited.clone(),
        );
        r.register(
            "scaling_decisions",
            "Scaling decisions delivered, by type and direction",
            self.scaling_decisions.clone(),
        );
        r.register(
            "instances",
            "Registered module instances per type",
            self.instances.clone(),
        );
    }
}
