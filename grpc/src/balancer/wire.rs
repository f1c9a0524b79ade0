//! The balancer's records and answers in their wire form, and back.

use lodge_actors::balancer::handle::LoadInfo as Load;
use lodge_actors::balancer::instance::{Health, Instance};
use lodge_actors::balancer::model::{
    BalancerSettings, CheckKind, DecisionRecord, HealthCheckSpec, MetricPoint, RateLimitSpec,
    ReportedHealth, Stats,
};
use lodge_actors::balancer::report::Traffic;
use lodge_actors::balancer::scaler::ScalingConfig;
use lodge_actors::balancer::traffic::TrafficRecord;
use lodge_actors::balancer::view::Versioned;
use lodge_actors::balancer::{now_ms, BalancerError, ModuleType};
use tonic::Status;

use super::convert::{module_type_to_pb, protocol_to_pb};
use crate::pb::balancer as pb;

/// The caller's status for a balancer error.
pub fn status(e: BalancerError) -> Status {
    match e {
        BalancerError::Invalid(m) => Status::invalid_argument(m),
        BalancerError::NotFound(m) => Status::not_found(m),
        BalancerError::Unavailable(m) => Status::unavailable(m),
        BalancerError::Exhausted(m) => Status::resource_exhausted(m),
        BalancerError::Precondition(m) => Status::failed_precondition(m),
        BalancerError::Aborted(m) => Status::aborted(m),
        BalancerError::Unknown(m) => crate::outcome::outcome_unknown_status(&m),
    }
}

/// The wire health of `h`.
pub fn health_to_pb(h: Health) -> pb::HealthStatus {
    match h {
        Health::Healthy => pb::HealthStatus::Healthy,
        Health::Degraded => pb::HealthStatus::Degraded,
        Health::Unhealthy => pb::HealthStatus::Unhealthy,
        Health::Starting => pb::HealthStatus::Starting,
        Health::Stopping => pb::HealthStatus::Stopping,
    }
}

/// What a module says of itself; UNSPECIFIED (an SDK that does not say) is healthy.
pub fn reported_health(v: i32) -> ReportedHealth {
    match pb::HealthStatus::try_from(v).unwrap_or(pb::HealthStatus::Unspecified) {
        pb::HealthStatus::Degraded => ReportedHealth::Degraded,
        pb::HealthStatus::Unhealthy => ReportedHealth::Unhealthy,
        pb::HealthStatus::Starting => ReportedHealth::Starting,
        pb::HealthStatus::Stopping | pb::HealthStatus::Stopped => ReportedHealth::Stopping,
        pb::HealthStatus::Healthy | pb::HealthStatus::Unspecified => ReportedHealth::Healthy,
    }
}

/// A module's stats from the wire (non-finite figures count as 0).
pub fn stats_from_pb(s: Option<pb::ModuleStats>) -> Stats {
    let s = s.unwrap_or_default();
    let f = |x: f64| if x.is_finite() && x >= 0.0 { x } else { 0.0 };
    Stats {
        active_connections: s.active_connections,
        total_connections: s.total_connections,
        requests_per_second: f(s.requests_per_second),
        cpu_percent: f(s.cpu_percent),
        memory_percent: f(s.memory_percent),
        memory_bytes: s.memory_bytes,
        latency_ms: f(s.latency_ms),
        queue_depth: s.queue_depth,
        bytes_in: s.bytes_in,
        bytes_out: s.bytes_out,
        errors_total: s.errors_total,
        uptime_ms: s.uptime_ms,
    }
}

/// The wire form of `s`.
pub fn stats_to_pb(s: &Stats) -> pb::ModuleStats {
    pb::ModuleStats {
        active_connections: s.active_connections,
        total_connections: s.total_connections,
        requests_per_second: s.requests_per_second,
        cpu_percent: s.cpu_percent,
        memory_percent: s.memory_percent,
        memory_bytes: s.memory_bytes,
        latency_ms: s.latency_ms,
        queue_depth: s.queue_depth,
        bytes_in: s.bytes_in,
        bytes_out: s.bytes_out,
        errors_total: s.errors_total,
        uptime_ms: s.uptime_ms,
    }
}

/// A health check spec from the wire (zeros are filled with defaults when registering).
pub fn health_check_from_pb(h: pb::HealthCheckConfig) -> Result<HealthCheckSpec, Status> {
    let kind = match pb::HealthCheckKind::try_from(h.kind) {
        Ok(pb::HealthCheckKind::Tcp) => CheckKind::Tcp,
        Ok(pb::HealthCheckKind::Grpc) => CheckKind::Grpc,
        _ => {
            return Err(Status::invalid_argument(
                "health_check.kind: required: GRPC or TCP",
            ))
        }
    };
    Ok(HealthCheckSpec {
        kind,
        interval_ms: h.interval_ms,
        timeout_ms: h.timeout_ms,
        healthy_threshold: h.healthy_threshold,
        unhealthy_threshold: h.unhealthy_threshold,
        deep: h.deep,
    })
}

fn health_check_to_pb(h: &HealthCheckSpec) -> pb::HealthCheckConfig {
    pb::HealthCheckConfig {
        kind: match h.kind {
            CheckKind::Grpc => pb::HealthCheckKind::Grpc,
            CheckKind::Tcp => pb::HealthCheckKind::Tcp,
        } as i32,
        interval_ms: h.interval_ms,
        timeout_ms: h.timeout_ms,
        healthy_threshold: h.healthy_threshold,
        unhealthy_threshold: h.unhealthy_threshold,
        deep: h.deep,
    }
}

/// The load of `i` as the wire shows it.
pub fn load_to_pb(i: &Instance, now: i64) -> pb::LoadInfo {
    let sample = i.sample();
    let stats = i
        .report
        .as_ref()
        .map(|r| r.stats.clone())
        .unwrap_or_default();
    pb::LoadInfo {
        instance_id: i.record.instance_id.clone(),
        module_type: module_type_to_pb(i.record.module_type) as i32,
        version: i.record.version.clone(),
        active_connections: sample.active_connections,
        max_connections: i.record.max_connections,
        cpu_percent: stats.cpu_percent,
        memory_percent: stats.memory_percent,
        requests_per_second: stats.requests_per_second,
        latency_ms: stats.latency_ms,
        queue_depth: stats.queue_depth,
        load_score: i.load_score(),
        health: health_to_pb(i.health(now).0) as i32,
        full: i.full(),
        local_connections: i
            .live
            .connections
            .load(std::sync::atomic::Ordering::Relaxed),
    }
}

/// A load answer's wire form.
pub fn load_info_to_pb(l: &Load, now: i64) -> pb::LoadInfo {
    load_to_pb(&l.instance, now)
}

/// `i` as the wire shows it.
pub fn instance_to_pb(i: &Instance, now: i64) -> pb::ModuleInstance {
    let r = &i.record;
    let (health, reason) = i.health(now);
    pb::ModuleInstance {
        instance_id: r.instance_id.clone(),
        module_type: module_type_to_pb(r.module_type) as i32,
        version: r.version.clone(),
        control_address: r.control_address.clone(),
        data_address: r.data_address.clone(),
        protocols: r
            .protocols
            .iter()
            .map(|p| protocol_to_pb(*p) as i32)
            .collect(),
        max_connections: r.max_connections,
        metadata: r.metadata.clone().into_iter().collect(),
        health: health_to_pb(health) as i32,
        registered_at_ms: r.registered_at_ms,
        last_heartbeat_ms: i.report.as_ref().map_or(0, |l| l.at_ms),
        load: Some(load_to_pb(i, now)),
        draining: r.draining.is_some(),
        heartbeat_interval_ms: r.interval_ms,
        health_check: r.health_check.as_ref().map(health_check_to_pb),
        health_reason: reason,
    }
}

/// Metric points from the wire.
pub fn points_from_pb(points: Vec<pb::MetricPoint>) -> Vec<MetricPoint> {
    points
        .into_iter()
        .map(|p| MetricPoint {
            name: p.name,
            value: p.value,
            labels: p.labels.into_iter().collect(),
            timestamp_ms: p.timestamp_ms,
        })
        .collect()
}

/// Metric points in wire form.
pub fn points_to_pb(points: &[MetricPoint]) -> Vec<pb::MetricPoint> {
    points
        .iter()
        .map(|p| pb::MetricPoint {
            name: p.name.clone(),
            value: p.value,
            labels: p.labels.clone().into_iter().collect(),
            timestamp_ms: p.timestamp_ms,
        })
        .collect()
}

/// The traffic state of `t` as of now.
pub fn traffic_to_pb(t: ModuleType, v: &Versioned<TrafficRecord>) -> pb::TrafficState {
    let now = now_ms();
    let settled = v.value.settled(now);
    let weights = settled.weights_at(now);
    let candidate = settled.candidate.as_ref();
    pb::TrafficState {
        module_type: module_type_to_pb(t) as i32,
        active_version: settled.active.clone(),
        previous_version: settled.previous.clone(),
        weights: weights
            .iter()
            .map(|(version, weight)| pb::VersionWeight {
                version: version.clone(),
                weight: *weight,
            })
            .collect(),
        promotion: candidate.and_then(|c| {
            c.promotion.as_ref().map(|p| pb::Promotion {
                version: c.version.clone(),
                from_weight: p.from_weight,
                step_percent: p.step_percent,
                interval_ms: p.interval_ms.min(u64::from(u32::MAX)) as u32,
                started_at_ms: p.started_at_ms,
            })
        }),
        canary_percent: candidate.map_or(0, |c| c.weight_at(now)),
        revision: v.revision,
    }
}

/// Scaling settings from the wire (validated by the balancer).
pub fn scaling_from_pb(c: pb::ScalingConfig) -> ScalingConfig {
    ScalingConfig {
        enabled: c.enabled,
        min_instances: c.min_instances,
        max_instances: c.max_instances,
        target_cpu_percent: c.target_cpu_percent,
        target_memory_percent: c.target_memory_percent,
        target_connections_per_instance: c.target_connections_per_instance,
        scale_up_threshold: c.scale_up_threshold,
        scale_down_threshold: c.scale_down_threshold,
        scale_up_cooldown_ms: c.scale_up_cooldown_ms.into(),
        scale_down_cooldown_ms: c.scale_down_cooldown_ms.into(),
    }
}

/// The wire form of `c`.
pub fn scaling_to_pb(t: ModuleType, c: &ScalingConfig) -> pb::ScalingConfig {
    let ms = |v: u64| v.min(u64::from(u32::MAX)) as u32;
    pb::ScalingConfig {
        module_type: module_type_to_pb(t) as i32,
        enabled: c.enabled,
        min_instances: c.min_instances,
        max_instances: c.max_instances,
        target_cpu_percent: c.target_cpu_percent,
        target_memory_percent: c.target_memory_percent,
        target_connections_per_instance: c.target_connections_per_instance,
        scale_up_threshold: c.scale_up_threshold,
        scale_down_threshold: c.scale_down_threshold,
        scale_up_cooldown_ms: ms(c.scale_up_cooldown_ms),
        scale_down_cooldown_ms: ms(c.scale_down_cooldown_ms),
    }
}

/// A scaling decision in wire form.
pub fn decision_to_pb(t: ModuleType, d: &DecisionRecord, delivered: bool) -> pb::ScalingDecision {
    let direction = match d.direction.as_str() {
        "up" => pb::ScalingDirection::Up,
        "down" => pb::ScalingDirection::Down,
        _ => pb::ScalingDirection::None,
    };
    pb::ScalingDecision {
        module_type: module_type_to_pb(t) as i32,
        direction: direction as i32,
        current_instances: d.current,
        desired_instances: d.desired,
        pressure: d.pressure,
        reason: d.reason.clone(),
        decided_at_ms: d.decided_at_ms,
        cooldown_until_ms: d.cooldown_until_ms,
        delivered,
    }
}

/// The balancer settings in wire form.
pub fn settings_to_pb(s: &BalancerSettings, revision: i64) -> pb::BalancerConfig {
    pb::BalancerConfig {
        heartbeat_interval_ms: s.heartbeat_interval_ms,
        max_missed_heartbeats: s.max_missed_heartbeats,
        drain_timeout_ms: s.drain_timeout_ms,
        can_handle_ttl_ms: s.can_handle_ttl_ms,
        autoscale_interval_ms: s.autoscale_interval_ms,
        rebalance_threshold: s.rebalance_threshold,
        revision,
    }
}

/// A rate limit from the wire.
pub fn limit_from_pb(l: pb::RateLimit) -> RateLimitSpec {
    RateLimitSpec {
        target: l.target,
        per_second: l.requests_per_second,
        per_minute: l.requests_per_minute,
        per_hour: l.requests_per_hour,
        burst: l.burst,
    }
}

/// A rate limit in wire form.
pub fn limit_to_pb(l: &RateLimitSpec) -> pb::RateLimit {
    pb::RateLimit {
        target: l.target.clone(),
        requests_per_second: l.per_second,
        requests_per_minute: l.per_minute,
        requests_per_hour: l.per_hour,
        burst: l.burst,
    }
}

/// An instance's traffic through this node in wire form.
pub fn module_traffic_to_pb(t: &Traffic) -> pb::ModuleTraffic {
    pb::ModuleTraffic {
        instance_id: t.instance_id.clone(),
        active_connections: t.active,
        connections_total: t.total,
        bytes_in: t.bytes_in,
        bytes_out: t.bytes_out,
    }
}
