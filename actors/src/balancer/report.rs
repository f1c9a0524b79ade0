//! What the balancer reports about itself: its figures on this node, the routing table with the
//! instances able to take each route, and a health check of every instance.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::flow::ModuleType;
use super::handle::BalancerHandle;
use super::instance::{Health, Instance};
use super::metrics::OUTCOMES;
use super::model::CheckKind;
use super::route::Route;
use super::{now_ms, BalancerError};

/// One instance's data-plane traffic through this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub instance_id: String,
    pub active: u64,
    pub total: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Traffic {
    /// `i`'s traffic through this node.
    pub fn of(i: &Instance) -> Self {
        let l = &i.live;
        Self {
            instance_id: i.record.instance_id.clone(),
            active: l.connections.load(Ordering::Relaxed),
            total: l.connections_total.load(Ordering::Relaxed),
            bytes_in: l.bytes_in.load(Ordering::Relaxed),
            bytes_out: l.bytes_out.load(Ordering::Relaxed),
        }
    }
}

/// The balancer's figures on this node.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub member: u64,
    pub at_ms: i64,
    /// Decisions by outcome (every outcome, zeros included).
    pub decisions: Vec<(&'static str, u64)>,
    /// This node's data-plane traffic, per instance and in total.
    pub traffic: Vec<Traffic>,
    pub total: Traffic,
    pub evictions: u64,
    pub drains: u64,
    pub rate_limited: u64,
    /// Scaling decisions delivered, cluster-wide (the records' sequence numbers).
    pub scaling_decisions: u64,
    /// Instances by health.
    pub by_health: BTreeMap<&'static str, u32>,
}

/// A route with the instances able to take it now.
#[derive(Clone, Debug)]
pub struct RoutingEntry {
    pub route: Route,
    /// Routable instances that said yes to CanHandle (as cached on this node).
    pub instances: Vec<String>,
    /// Decisions made for it on this node.
    pub decisions: u64,
}

/// One instance in a health check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceHealth {
    pub instance_id: String,
    pub health: Health,
    pub reason: String,
}

/// The balancer's health on this node.
#[derive(Clone, Debug)]
pub struct HealthReport {
    /// Starting until the state is loaded; degraded while an instance is unhealthy.
    pub status: Health,
    pub message: String,
    pub instances: Vec<InstanceHealth>,
}

/// How long a deep health check waits for one instance.
const DEEP_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

impl BalancerHandle {
    /// The figures on this node.
    pub fn figures(&self) -> Figures {
        let m = self.metrics();
        let view = self.view();
        let now = now_ms();
        let mut f = Figures {
            member: self.member(),
            at_ms: now,
            decisions: OUTCOMES.iter().map(|o| (*o, m.decisions_of(o))).collect(),
            evictions: m.evictions.get(),
            drains: m.drains.get(),
            rate_limited: m.rate_limited.get(),
            // Families cannot be iterated: the records count the decisions instead.
            scaling_decisions: view
                .scaling
                .values()
                .map(|s| s.value.last.as_ref().map_or(0, |d| d.seq))
                .sum(),
            ..Default::default()
        };
        for i in view.instances.values() {
            *f.by_health.entry(i.health(now).0.as_str()).or_default() += 1;
            let t = Traffic::of(i);
            f.total.active += t.active;
            f.total.total += t.total;
            f.total.bytes_in += t.bytes_in;
            f.total.bytes_out += t.bytes_out;
            f.traffic.push(t);
        }
        f
    }

    /// The routes in the order they are tried (of target `t`, or all), with the revision.
    pub fn routing_entries(
        &self,
        t: Option<ModuleType>,
    ) -> Result<(Vec<RoutingEntry>, i64), BalancerError> {
        let view = self.loaded_view()?;
        let now = now_ms();
        let entries = view
            .routes
            .value
            .routes()
            .iter()
            .filter(|c| t.is_none_or(|t| c.route.target == t))
            .map(|c| {
                let id = &c.route.route_id;
                let instances = view
                    .of_type(c.route.target)
                    .filter(|i| i.health(now).0.routable())
                    .filter(|i| {
                        i.live
                            .capabilities()
                            .iter()
                            .any(|(r, cap)| r == id && cap.can_handle)
                    })
                    .map(|i| i.record.instance_id.clone())
                    .collect();
                RoutingEntry {
                    route: c.route.clone(),
                    instances,
                    decisions: self.decisions_for(id),
                }
            })
            .collect();
        Ok((entries, view.routes.revision))
    }

    /// Every instance's health; `deep` also asks each routable one for a deep health check (at
    /// most `timeout`, 2 s each, all at once).
    pub async fn check_health(&self, deep: bool, timeout: Duration) -> HealthReport {
        let view = self.view();
        let now = now_ms();
        let mut instances = Vec::new();
        let mut asks = tokio::task::JoinSet::new();
        for i in view.instances.values() {
            let (health, reason) = i.health(now);
            let instance_id = i.record.instance_id.clone();
            if !(deep && health.routable()) {
                instances.push(InstanceHealth {
                    instance_id,
                    health,
                    reason,
                });
                continue;
            }
            let probe = self.probe().clone();
            let target = i.target();
            let timeout = timeout.min(DEEP_CHECK_TIMEOUT);
            asks.spawn(async move {
                let r = probe
                    .health_check(&target, CheckKind::Grpc, true, timeout)
                    .await;
                let (health, reason) = match r {
                    Ok(()) => (health, String::new()),
                    Err(e) => (Health::Unhealthy, format!("deep health check: {e}")),
                };
                InstanceHealth {
                    instance_id: target.instance_id,
                    health,
                    reason,
                }
            });
        }
        while let Some(Ok(h)) = asks.join_next().await {
            instances.push(h);
        }
        instances.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        let unhealthy = instances
            .iter()
            .filter(|i| i.health == Health::Unhealthy)
            .count();
        let (status, message) = if !view.loaded {
            (
                Health::Starting,
                "the balancer has not loaded its state yet".to_string(),
            )
        } else if unhealthy > 0 {
            (
                Health::Degraded,
                format!("{unhealthy} of {} instances unhealthy", instances.len()),
            )
        } else {
            (Health::Healthy, "serving".to_string())
        };
        HealthReport {
            status,
            message,
            instances,
        }
    }
}
