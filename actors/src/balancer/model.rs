//! What the balancer keeps in the replicated store, and under which keys.
//!
//! ```text
//! /lodge/balancer/modules/<instance_id>       ModuleRecord, under the instance's lease
//! /lodge/balancer/load/<instance_id>          LoadReport (last heartbeat), same lease
//! /lodge/balancer/instructions/<instance_id>  Instructions waiting for its next heartbeat, same lease
//! /lodge/balancer/routes                      RoutesRecord (the whole table: one revision)
//! /lodge/balancer/limits                      LimitsRecord
//! /lodge/balancer/traffic/<type>              TrafficRecord (blue/green)
//! /lodge/balancer/scaling/<type>              ScalingRecord (settings and the scaler's memory)
//! /lodge/balancer/settings                    BalancerSettings
//! ```
//!
//! Everything an instance leaves behind shares its lease, so an eviction (the lease running out)
//! removes all of it in one revision. Records are JSON.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::flow::{ModuleType, Protocol};
use super::route::Route;
use super::scaler::{ScalingConfig, ScalingMemory};

/// Prefix of everything the balancer stores.
pub const PREFIX: &str = "/lodge/balancer/";

/// What a key under [`PREFIX`] holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    Module(String),
    Load(String),
    Instructions(String),
    Routes,
    Limits,
    Traffic(ModuleType),
    Scaling(ModuleType),
    Settings,
}

impl Key {
    /// The store key.
    pub fn bytes(&self) -> Vec<u8> {
        let tail = match self {
            Self::Module(id) => format!("modules/{id}"),
            Self::Load(id) => format!("load/{id}"),
            Self::Instructions(id) => format!("instructions/{id}"),
            Self::Routes => "routes".into(),
            Self::Limits => "limits".into(),
            Self::Traffic(t) => format!("traffic/{t}"),
            Self::Scaling(t) => format!("scaling/{t}"),
            Self::Settings => "settings".into(),
        };
        format!("{PREFIX}{tail}").into_bytes()
    }

    /// The key `raw` names, if it is one of the balancer's.
    pub fn parse(raw: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(raw).ok()?.strip_prefix(PREFIX)?;
        let (kind, rest) = s.split_once('/').unwrap_or((s, ""));
        Some(match (kind, rest) {
            ("modules", id) if !id.is_empty() => Self::Module(id.into()),
            ("load", id) if !id.is_empty() => Self::Load(id.into()),
            ("instructions", id) if !id.is_empty() => Self::Instructions(id.into()),
            ("routes", "") => Self::Routes,
            ("limits", "") => Self::Limits,
            ("traffic", t) => Self::Traffic(ModuleType::parse(t)?),
            ("scaling", t) => Self::Scaling(ModuleType::parse(t)?),
            ("settings", "") => Self::Settings,
            _ => return None,
        })
    }
}

/// JSON, as stored.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records always encode")
}

/// A stored record; `None` if the bytes are not one (a newer or foreign writer).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    serde_json::from_slice(bytes).ok()
}

/// How the balancer actively checks an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// The module's HealthCheck RPC.
    Grpc,
    /// A TCP connect to its data address.
    Tcp,
}

/// Active health checks of an instance, run by every node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheckSpec {
    pub kind: CheckKind,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    #[serde(default)]
    pub deep: bool,
}

impl HealthCheckSpec {
    /// Fills zeros with defaults (every 5 s, 2 s timeout, 2 to recover, 3 to fail) and checks the
    /// rest; errors name the field under `field`.
    pub fn normalised(mut self, field: &str) -> Result<Self, String> {
        if self.interval_ms == 0 {
            self.interval_ms = 5_000;
        }
        if self.timeout_ms == 0 {
            self.timeout_ms = 2_000.min(self.interval_ms);
        }
        if self.healthy_threshold == 0 {
            self.healthy_threshold = 2;
        }
        if self.unhealthy_threshold == 0 {
            self.unhealthy_threshold = 3;
        }
        if self.interval_ms < 100 {
            return Err(format!(
                "{field}.interval_ms: {} is under the 100 ms minimum",
                self.interval_ms
            ));
        }
        if self.timeout_ms > self.interval_ms {
            return Err(format!(
                "{field}.timeout_ms: {} is longer than interval_ms {}",
                self.timeout_ms, self.interval_ms
            ));
        }
        for (name, v) in [
            ("healthy_threshold", self.healthy_threshold),
            ("unhealthy_threshold", self.unhealthy_threshold),
        ] {
            if v > 100 {
                return Err(format!("{field}.{name}: {v} is over 100"));
            }
        }
        Ok(self)
    }
}

/// A drain under way: no new traffic since `since_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    pub since_ms: i64,
    pub deadline_ms: i64,
}

/// A registered module instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRecord {
    pub instance_id: String,
    pub module_type: ModuleType,
    pub version: String,
    /// host:port of its Module service.
    pub control_address: String,
    /// host:port taking the connections the data plane forwards.
    pub data_address: String,
    /// Empty: its type's.
    #[serde(default)]
    pub protocols: Vec<Protocol>,
    /// 0: no limit.
    #[serde(default)]
    pub max_connections: u32,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub health_check: Option<HealthCheckSpec>,
    pub registered_at_ms: i64,
    /// The heartbeat interval granted.
    pub interval_ms: u32,
    /// Heartbeats missed before eviction (the lease lasts this many intervals).
    pub max_missed: u32,
    /// The member that took the registration.
    pub registered_by: u64,
    #[serde(default)]
    pub draining: Option<Drain>,
    /// The secret the module asks the nodes to call it with (see [`ControlToken`]).
    #[serde(default)]
    pub control_token: ControlToken,
}

/// The bearer secret a module accepts control calls with, made by the module and given at
/// registration. Replicated in the module's record (`/lodge/balancer/modules/<id>`) so that every
/// member can call the module; never shown (its `Debug` hides it, and the admin state dumps
/// redact the `control_token` key).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ControlToken(pub String);

impl std::fmt::Debug for ControlToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            f.write_str("ControlToken(none)")
        } else {
            f.write_str("ControlToken(<redacted>)")
        }
    }
}

impl ModuleRecord {
    /// The protocols it serves.
    pub fn serves(&self) -> &[Protocol] {
        if self.protocols.is_empty() {
            self.module_type.protocols()
        } else {
            &self.protocols
        }
    }
}

/// What a module says of its own health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportedHealth {
    #[default]
    Healthy,
    Degraded,
    Unhealthy,
    Starting,
    Stopping,
}

/// A module's figures, as its heartbeats carry them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub active_connections: u64,
    pub total_connections: u64,
    pub requests_per_second: f64,
    pub cpu_percent: f64,
    pub memory_percent: f64,
    pub memory_bytes: u64,
    pub latency_ms: f64,
    pub queue_depth: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub errors_total: u64,
    pub uptime_ms: i64,
}

/// A named figure a module reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    pub name: String,
    pub value: f64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub timestamp_ms: i64,
}

/// The last heartbeat of an instance, whichever member took it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub stats: Stats,
    pub health: ReportedHealth,
    pub at_ms: i64,
    /// The member that took the heartbeat.
    pub member: u64,
    /// Points from ReportMetrics (the latest per name and labels).
    #[serde(default)]
    pub metrics: Vec<MetricPoint>,
    /// Instructions delivered up to this sequence number.
    #[serde(default)]
    pub instructions_seen: u64,
    /// The scaling decision of its type delivered last (its sequence number).
    #[serde(default)]
    pub scaling_seen: u64,
    /// The routing table revision it was told about (a newer one: should_reload).
    #[serde(default)]
    pub routes_seen: i64,
}

/// Instructions for an instance's next heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instructions {
    /// (sequence number, instruction), oldest first.
    pub items: Vec<(u64, String)>,
}

impl Instructions {
    /// The next sequence number.
    pub fn next_seq(&self) -> u64 {
        self.items.last().map_or(1, |(s, _)| s + 1)
    }
}

/// The routing table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutesRecord {
    pub routes: Vec<Route>,
}

/// A rate limit on a route (`route:<id>`) or a module type (`module:<type>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimitSpec {
    pub target: String,
    /// 0: no limit for the window.
    pub per_second: u32,
    pub per_minute: u32,
    pub per_hour: u32,
    /// Requests the per-second window lets through at once (0: `per_second`).
    pub burst: u32,
}

/// What a rate-limit target names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LimitTarget {
    Route(String),
    Module(ModuleType),
}

impl LimitTarget {
    /// `route:<id>` or `module:<type>`; errors name `field`.
    pub fn parse(s: &str, field: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("route", id)) => {
                super::route::validate_route_id(id).map_err(|e| format!("{field}: {e}"))?;
                Ok(Self::Route(id.into()))
            }
            Some(("module", t)) => ModuleType::parse(t).map(Self::Module).ok_or_else(|| {
                format!(
                    "{field}: unknown module type {} (alb, dblb, ailb, rtmp, nlb)",
                    crate::quote::echo(t)
                )
            }),
            _ => Err(format!(
                "{field}: {} is not route:<route_id> or module:<type>",
                crate::quote::echo(s)
            )),
        }
    }
}

impl RateLimitSpec {
    /// Checks the spec; errors name the field under `field`.
    pub fn validate(&self, field: &str) -> Result<LimitTarget, String> {
        let target = LimitTarget::parse(&self.target, &format!("{field}.target"))?;
        if self.per_second == 0 && self.per_minute == 0 && self.per_hour == 0 {
            return Err(format!(
                "{field}.requests_per_second: every window is 0; set at least one limit"
            ));
        }
        if self.burst > 0 && self.per_second == 0 {
            return Err(format!(
                "{field}.burst: {} needs requests_per_second (a burst is of the per-second window)",
                self.burst
            ));
        }
        Ok(target)
    }
}

/// The rate limits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsRecord {
    pub limits: Vec<RateLimitSpec>,
}

/// A scaling decision as delivered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// Increases with every delivered decision of the type.
    pub seq: u64,
    pub direction: String,
    pub current: u32,
    pub desired: u32,
    pub pressure: f64,
    pub reason: String,
    pub decided_at_ms: i64,
    pub member: u64,
    /// When a cooldown held a change back: when it ends (0 otherwise).
    #[serde(default)]
    pub cooldown_until_ms: i64,
}

/// A module type's scaling settings and what the scaler remembers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ScalingRecord {
    pub config: ScalingConfig,
    #[serde(default)]
    pub memory: ScalingMemory,
    #[serde(default)]
    pub last: Option<DecisionRecord>,
}

/// The balancer's settings, shared by every node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalancerSettings {
    pub heartbeat_interval_ms: u32,
    pub max_missed_heartbeats: u32,
    pub drain_timeout_ms: u32,
    pub can_handle_ttl_ms: u32,
    pub autoscale_interval_ms: u32,
    pub rebalance_threshold: u32,
}

impl Default for BalancerSettings {
    /// The original's heartbeat (10 s) and autoscaler (30 s) periods.
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 10_000,
            max_missed_heartbeats: 3,
            drain_timeout_ms: 30_000,
            can_handle_ttl_ms: 60_000,
            autoscale_interval_ms: 30_000,
            rebalance_threshold: 20,
        }
    }
}

impl BalancerSettings {
    /// Checks the settings; errors name the field.
    pub fn validate(&self) -> Result<(), String> {
        let ranges: [(&str, u32, u32, u32); 6] = [
            (
                "heartbeat_interval_ms",
                self.heartbeat_interval_ms,
                100,
                3_600_000,
            ),
            ("max_missed_heartbeats", self.max_missed_heartbeats, 1, 100),
            ("drain_timeout_ms", self.drain_timeout_ms, 0, 3_600_000),
            ("can_handle_ttl_ms", self.can_handle_ttl_ms, 100, 86_400_000),
            (
                "autoscale_interval_ms",
                self.autoscale_interval_ms,
                100,
                86_400_000,
            ),
            ("rebalance_threshold", self.rebalance_threshold, 1, 100),
        ];
        for (name, v, lo, hi) in ranges {
            if v < lo || v > hi {
                return Err(format!("{name}: {v} is outside {lo}..={hi}"));
            }
        }
        Ok(())
    }

    /// The lease of an instance granted `interval_ms` and `max_missed`: whole seconds, rounded up.
    pub fn lease_ttl_secs(interval_ms: u32, max_missed: u32) -> i64 {
        (u64::from(interval_ms) * u64::from(max_missed.max(1)))
            .div_ceil(1000)
            .max(1) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for k in [
            Key::Module("alb-1".into()),
            Key::Load("a/b".into()),
            Key::Instructions("x".into()),
            Key::Routes,
            Key::Limits,
            Key::Traffic(ModuleType::Dblb),
            Key::Scaling(ModuleType::Rtmp),
            Key::Settings,
        ] {
            assert_eq!(Key::parse(&k.bytes()), Some(k));
        }
        assert_eq!(Key::parse(b"/lodge/balancer/modules/"), None);
        assert_eq!(Key::parse(b"/lodge/balancer/traffic/xyz"), None);
        assert_eq!(Key::parse(b"/lodge/router/sessions/a"), None);
    }

    #[test]
    fn limits_name_their_fields() {
        let ok = RateLimitSpec {
            target: "route:web".into(),
            per_second: 10,
            per_minute: 0,
            per_hour: 0,
            burst: 5,
        };
        assert_eq!(ok.validate("limit"), Ok(LimitTarget::Route("web".into())));
        let bad_target = RateLimitSpec {
            target: "web".into(),
            ..ok.clone()
        };
        assert!(bad_target
            .validate("limit")
            .unwrap_err()
            .starts_with("limit.target: \"web\" is not"));
        let no_window = RateLimitSpec {
            per_second: 0,
            burst: 0,
            ..ok.clone()
        };
        assert!(no_window
            .validate("limit")
            .unwrap_err()
            .starts_with("limit.requests_per_second"));
        let burst_alone = RateLimitSpec {
            per_second: 0,
            per_minute: 60,
            ..ok
        };
        assert!(burst_alone
            .validate("limit")
            .unwrap_err()
            .starts_with("limit.burst"));
    }

    #[test]
    fn settings_and_health_checks_are_bounded() {
        assert_eq!(BalancerSettings::default().validate(), Ok(()));
        let s = BalancerSettings {
            heartbeat_interval_ms: 50,
            ..Default::default()
        };
        assert!(s
            .validate()
            .unwrap_err()
            .starts_with("heartbeat_interval_ms: 50"));
        assert_eq!(BalancerSettings::lease_ttl_secs(10_000, 3), 30);
        assert_eq!(BalancerSettings::lease_ttl_secs(200, 3), 1);
        assert_eq!(BalancerSettings::lease_ttl_secs(700, 3), 3);
        let spec = HealthCheckSpec {
            kind: CheckKind::Tcp,
            interval_ms: 0,
            timeout_ms: 0,
            healthy_threshold: 0,
            unhealthy_threshold: 0,
            deep: false,
        };
        let n = spec.clone().normalised("health_check").unwrap();
        assert_eq!((n.interval_ms, n.timeout_ms), (5_000, 2_000));
        let slow = HealthCheckSpec {
            interval_ms: 1_000,
            timeout_ms: 2_000,
            ..spec
        };
        assert!(slow
            .normalised("health_check")
            .unwrap_err()
            .starts_with("health_check.timeout_ms"));
    }
}
