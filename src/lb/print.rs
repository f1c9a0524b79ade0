//! Answers as people read them (tables and `key  value` lists) and as scripts read them (JSON
//! with the proto's field names, enums as lower-case names: "alb", "http", "healthy").
//!
//! Everything here builds strings, so that the exact output is tested without a node.

use std::collections::HashMap;
use std::fmt::Write as _;

use lodge_actors::balancer::{ModuleType, Protocol};
use lodge_grpc::balancer::convert::{module_type_from_pb, protocol_from_pb};
use lodge_grpc::pb::balancer as pb;
use serde_json::{json, Value};

use super::Answer;
use crate::ctl;
use crate::tunnel::sessions::{bytes, duration_words};

// --- Enum names -----------------------------------------------------------------------------

/// An enum's name for wire value `v`; `None` for a value this build does not know.
type Namer = fn(i32) -> Option<&'static str>;

fn type_str(v: i32) -> Option<&'static str> {
    if v == 0 {
        return Some("unspecified");
    }
    module_type_from_pb(v).map(ModuleType::as_str)
}

fn protocol_str(v: i32) -> Option<&'static str> {
    if v == 0 {
        return Some("unspecified");
    }
    protocol_from_pb(v).map(Protocol::as_str)
}

fn health_str(v: i32) -> Option<&'static str> {
    use pb::HealthStatus as H;
    Some(match H::try_from(v).ok()? {
        H::Unspecified => "unspecified",
        H::Healthy => "healthy",
        H::Degraded => "degraded",
        H::Unhealthy => "unhealthy",
        H::Starting => "starting",
        H::Stopping => "stopping",
        H::Stopped => "stopped",
    })
}

fn direction_str(v: i32) -> Option<&'static str> {
    use pb::ScalingDirection as D;
    Some(match D::try_from(v).ok()? {
        D::Unspecified => "unspecified",
        D::Up => "up",
        D::Down => "down",
        D::Auto => "auto",
        D::None => "none",
    })
}

fn check_kind_str(v: i32) -> Option<&'static str> {
    use pb::HealthCheckKind as K;
    Some(match K::try_from(v).ok()? {
        K::Unspecified => "unspecified",
        K::Grpc => "grpc",
        K::Tcp => "tcp",
    })
}

/// An enum in JSON: its name, or the number when this build does not know it.
fn enum_json(namer: Namer, v: i32) -> Value {
    namer(v).map_or_else(|| json!(v), |n| json!(n))
}

/// An enum for people: its name, or `?N`.
fn enum_text(namer: Namer, v: i32) -> String {
    namer(v).map_or_else(|| format!("?{v}"), String::from)
}

// --- JSON -----------------------------------------------------------------------------------

/// The answer as one JSON document: the response with the proto's field names.
pub fn json(answer: &Answer) -> Value {
    match answer {
        Answer::Modules(r) => {
            json!({ "modules": r.modules.iter().map(instance_json).collect::<Vec<_>>() })
        }
        Answer::Module(r) => json!({
            "module": r.module.as_ref().map(instance_json),
            "capabilities": r.capabilities.iter().map(capability_json).collect::<Vec<_>>(),
            "metrics": r.metrics.iter().map(point_json).collect::<Vec<_>>(),
        }),
        Answer::Unregistered(_, r) => json!({
            "drained_connections": r.drained_connections,
            "remaining_connections": r.remaining_connections,
            "drain_ms": r.drain_ms,
        }),
        Answer::Routes(r) => json!({
            "entries": r.entries.iter().map(|e| json!({
                "route": e.route.as_ref().map(route_json),
                "instances": e.instances,
                "decisions": e.decisions,
            })).collect::<Vec<_>>(),
            "revision": r.revision,
        }),
        Answer::RoutingUpdated(r) => json!({
            "routes": r.routes.iter().map(route_json).collect::<Vec<_>>(),
            "revision": r.revision,
            "applied": r.applied,
        }),
        Answer::Decision(d) => json!({
            "instance_id": d.instance_id,
            "address": d.address,
            "route_id": d.route_id,
            "priority": d.priority,
            "module_type": enum_json(type_str, d.module_type),
            "version": d.version,
            "load_score": d.load_score,
            "dry_run": d.dry_run,
        }),
        Answer::Validation(r) => json!({
            "valid": r.valid,
            "capable": r.capable.iter().map(capability_json).collect::<Vec<_>>(),
        }),
        Answer::Traffic(t) => traffic_json(t),
        Answer::Limits(r) => {
            json!({ "limits": r.limits.iter().map(limit_json).collect::<Vec<_>>() })
        }
        Answer::Limit(l) => limit_json(l),
        Answer::LimitRemoved(_, r) => json!({ "removed": r.removed }),
        Answer::Load(r) => json!({
            "instances": r.instances.iter().map(load_json).collect::<Vec<_>>(),
            "balance_score": r.balance_score,
        }),
        Answer::Rebalanced(r) => json!({
            "balance_score_before": r.balance_score_before,
            "shed": r.shed.iter().map(|s| json!({
                "instance_id": s.instance_id,
                "connections": s.connections,
            })).collect::<Vec<_>>(),
            "dry_run": r.dry_run,
        }),
        Answer::Scaling(c) => scaling_json(c),
        Answer::ScalingDecision(d) => json!({
            "module_type": enum_json(type_str, d.module_type),
            "direction": enum_json(direction_str, d.direction),
            "current_instances": d.current_instances,
            "desired_instances": d.desired_instances,
            "pressure": d.pressure,
            "reason": d.reason,
            "decided_at_ms": d.decided_at_ms,
            "cooldown_until_ms": d.cooldown_until_ms,
            "delivered": d.delivered,
        }),
        Answer::Status(s) => json!({
            "member_id": s.member_id,
            "leader_id": s.leader_id,
            "uptime_ms": s.uptime_ms,
            "modules_total": s.modules_total,
            "modules_healthy": s.modules_healthy,
            "routes": s.routes,
            "routing_revision": s.routing_revision,
            "listeners": s.listeners,
            "active_connections": s.active_connections,
            "decisions_total": s.decisions_total,
            "version": s.version,
        }),
        Answer::Health(r) => json!({
            "status": enum_json(health_str, r.status),
            "message": r.message,
            "modules": r.modules.iter().map(|m| json!({
                "instance_id": m.instance_id,
                "health": enum_json(health_str, m.health),
                "reason": m.reason,
            })).collect::<Vec<_>>(),
        }),
        Answer::Config(c, _) => json!({
            "heartbeat_interval_ms": c.heartbeat_interval_ms,
            "max_missed_heartbeats": c.max_missed_heartbeats,
            "drain_timeout_ms": c.drain_timeout_ms,
            "can_handle_ttl_ms": c.can_handle_ttl_ms,
            "autoscale_interval_ms": c.autoscale_interval_ms,
            "rebalance_threshold": c.rebalance_threshold,
            "revision": c.revision,
        }),
        Answer::Metrics(m) => metrics_json(m),
    }
}

fn route_json(r: &pb::Route) -> Value {
    json!({
        "route_id": r.route_id,
        "protocol": enum_json(protocol_str, r.protocol),
        "source_pattern": r.source_pattern,
        "destination_pattern": r.destination_pattern,
        "source_port": r.source_port,
        "destination_port": r.destination_port,
        "path_pattern": r.path_pattern,
        "headers": r.headers,
        "priority": r.priority,
        "target": enum_json(type_str, r.target),
    })
}

fn instance_json(m: &pb::ModuleInstance) -> Value {
    json!({
        "instance_id": m.instance_id,
        "module_type": enum_json(type_str, m.module_type),
        "version": m.version,
        "control_address": m.control_address,
        "data_address": m.data_address,
        "protocols": m.protocols.iter().map(|p| enum_json(protocol_str, *p)).collect::<Vec<_>>(),
        "max_connections": m.max_connections,
        "metadata": m.metadata,
        "health": enum_json(health_str, m.health),
        "registered_at_ms": m.registered_at_ms,
        "last_heartbeat_ms": m.last_heartbeat_ms,
        "load": m.load.as_ref().map(load_json),
        "draining": m.draining,
        "heartbeat_interval_ms": m.heartbeat_interval_ms,
        "health_check": m.health_check.as_ref().map(|h| json!({
            "kind": enum_json(check_kind_str, h.kind),
            "interval_ms": h.interval_ms,
            "timeout_ms": h.timeout_ms,
            "healthy_threshold": h.healthy_threshold,
            "unhealthy_threshold": h.unhealthy_threshold,
            "deep": h.deep,
        })),
        "health_reason": m.health_reason,
    })
}

fn load_json(l: &pb::LoadInfo) -> Value {
    json!({
        "instance_id": l.instance_id,
        "module_type": enum_json(type_str, l.module_type),
        "version": l.version,
        "active_connections": l.active_connections,
        "max_connections": l.max_connections,
        "cpu_percent": l.cpu_percent,
        "memory_percent": l.memory_percent,
        "requests_per_second": l.requests_per_second,
        "latency_ms": l.latency_ms,
        "queue_depth": l.queue_depth,
        "load_score": l.load_score,
        "health": enum_json(health_str, l.health),
        "full": l.full,
        "local_connections": l.local_connections,
    })
}

fn capability_json(c: &pb::Capability) -> Value {
    json!({
        "instance_id": c.instance_id,
        "route_id": c.route_id,
        "can_handle": c.can_handle,
        "priority": c.priority,
        "reason": c.reason,
    })
}

fn point_json(p: &pb::MetricPoint) -> Value {
    json!({
        "name": p.name,
        "value": p.value,
        "labels": p.labels,
        "timestamp_ms": p.timestamp_ms,
    })
}

fn traffic_json(t: &pb::TrafficState) -> Value {
    json!({
        "module_type": enum_json(type_str, t.module_type),
        "active_version": t.active_version,
        "previous_version": t.previous_version,
        "weights": t.weights.iter().map(|w| json!({"version": w.version, "weight": w.weight})).collect::<Vec<_>>(),
        "promotion": t.promotion.as_ref().map(|p| json!({
            "version": p.version,
            "from_weight": p.from_weight,
            "step_percent": p.step_percent,
            "interval_ms": p.interval_ms,
            "started_at_ms": p.started_at_ms,
        })),
        "canary_percent": t.canary_percent,
        "revision": t.revision,
    })
}

fn limit_json(l: &pb::RateLimit) -> Value {
    json!({
        "target": l.target,
        "requests_per_second": l.requests_per_second,
        "requests_per_minute": l.requests_per_minute,
        "requests_per_hour": l.requests_per_hour,
        "burst": l.burst,
    })
}

fn scaling_json(c: &pb::ScalingConfig) -> Value {
    json!({
        "module_type": enum_json(type_str, c.module_type),
        "enabled": c.enabled,
        "min_instances": c.min_instances,
        "max_instances": c.max_instances,
        "target_cpu_percent": c.target_cpu_percent,
        "target_memory_percent": c.target_memory_percent,
        "target_connections_per_instance": c.target_connections_per_instance,
        "scale_up_threshold": c.scale_up_threshold,
        "scale_down_threshold": c.scale_down_threshold,
        "scale_up_cooldown_ms": c.scale_up_cooldown_ms,
        "scale_down_cooldown_ms": c.scale_down_cooldown_ms,
    })
}

fn metrics_json(m: &pb::NlbMetrics) -> Value {
    json!({
        "member_id": m.member_id,
        "timestamp_ms": m.timestamp_ms,
        "decisions": m.decisions,
        "active_connections": m.active_connections,
        "connections_total": m.connections_total,
        "bytes_in": m.bytes_in,
        "bytes_out": m.bytes_out,
        "evictions": m.evictions,
        "drains": m.drains,
        "rate_limited": m.rate_limited,
        "scaling_decisions": m.scaling_decisions,
        "modules": m.modules,
        "traffic": m.traffic.iter().map(|t| json!({
            "instance_id": t.instance_id,
            "active_connections": t.active_connections,
            "connections_total": t.connections_total,
            "bytes_in": t.bytes_in,
            "bytes_out": t.bytes_out,
        })).collect::<Vec<_>>(),
    })
}

// --- Text -----------------------------------------------------------------------------------

/// The answer as printed: one JSON document, or text for people; ends with a newline.
pub fn render(answer: &Answer, as_json: bool) -> String {
    if as_json {
        format!("{}\n", json(answer))
    } else {
        text(answer)
    }
}

/// The answer for people.
pub fn text(answer: &Answer) -> String {
    match answer {
        Answer::Modules(r) => modules_text(&r.modules),
        Answer::Module(r) => module_text(r),
        Answer::Unregistered(id, r) => {
            let mut out = format!("unregistered {id}");
            if r.drained_connections > 0 || r.remaining_connections > 0 || r.drain_ms > 0 {
                let _ = write!(
                    out,
                    ": drained {} in {} ms, {} still open",
                    count(r.drained_connections, "connection"),
                    r.drain_ms,
                    r.remaining_connections
                );
            }
            out + "\n"
        }
        Answer::Routes(r) => routes_text(r),
        Answer::RoutingUpdated(r) => routing_updated_text(r),
        Answer::Decision(d) => pairs(&[
            ("instance_id", d.instance_id.clone()),
            ("address", d.address.clone()),
            ("route_id", d.route_id.clone()),
            ("priority", d.priority.to_string()),
            ("module_type", enum_text(type_str, d.module_type)),
            ("version", or_dash(&d.version)),
            ("load_score", d.load_score.to_string()),
            (
                "dry_run",
                if d.dry_run {
                    "yes (no rate-limit tokens spent; the version split did not advance)".into()
                } else {
                    "no".into()
                },
            ),
        ]),
        Answer::Validation(r) => validation_text(r),
        Answer::Traffic(t) => traffic_text(t),
        Answer::Limits(r) => limits_text(&r.limits, true),
        Answer::Limit(l) => limits_text(std::slice::from_ref(l), false),
        Answer::LimitRemoved(target, r) if r.removed => format!("removed the limit of {target}\n"),
        Answer::LimitRemoved(target, _) => format!("{target} had no limit; nothing removed\n"),
        Answer::Load(r) => load_text(r),
        Answer::Rebalanced(r) => rebalanced_text(r),
        Answer::Scaling(c) => pairs(&[
            ("module_type", enum_text(type_str, c.module_type)),
            ("enabled", yes_no(c.enabled).into()),
            ("min_instances", c.min_instances.to_string()),
            ("max_instances", c.max_instances.to_string()),
            ("target_cpu_percent", c.target_cpu_percent.to_string()),
            ("target_memory_percent", c.target_memory_percent.to_string()),
            (
                "target_connections_per_instance",
                c.target_connections_per_instance.to_string(),
            ),
            ("scale_up_threshold", c.scale_up_threshold.to_string()),
            ("scale_down_threshold", c.scale_down_threshold.to_string()),
            ("scale_up_cooldown_ms", c.scale_up_cooldown_ms.to_string()),
            (
                "scale_down_cooldown_ms",
                c.scale_down_cooldown_ms.to_string(),
            ),
        ]),
        Answer::ScalingDecision(d) => pairs(&[
            ("module_type", enum_text(type_str, d.module_type)),
            ("direction", enum_text(direction_str, d.direction)),
            ("current_instances", d.current_instances.to_string()),
            ("desired_instances", d.desired_instances.to_string()),
            ("pressure", format!("{:.2}", d.pressure)),
            ("reason", or_dash(&d.reason)),
            ("decided_at", time(d.decided_at_ms)),
            ("cooldown_until", time(d.cooldown_until_ms)),
            ("delivered", yes_no(d.delivered).into()),
        ]),
        Answer::Status(s) => pairs(&[
            ("member_id", s.member_id.to_string()),
            ("leader_id", s.leader_id.to_string()),
            ("version", or_dash(&s.version)),
            ("uptime", duration_words(ms_u64(s.uptime_ms) / 1000)),
            (
                "modules",
                format!("{} ({} healthy)", s.modules_total, s.modules_healthy),
            ),
            (
                "routes",
                format!("{} (revision {})", s.routes, s.routing_revision),
            ),
            ("listeners", list_or_dash(&s.listeners)),
            ("active_connections", s.active_connections.to_string()),
            ("decisions_total", s.decisions_total.to_string()),
        ]),
        Answer::Health(r) => health_text(r),
        Answer::Config(c, validate_only) => {
            let mut out = pairs(&[
                ("heartbeat_interval_ms", c.heartbeat_interval_ms.to_string()),
                ("max_missed_heartbeats", c.max_missed_heartbeats.to_string()),
                ("drain_timeout_ms", c.drain_timeout_ms.to_string()),
                ("can_handle_ttl_ms", c.can_handle_ttl_ms.to_string()),
                ("autoscale_interval_ms", c.autoscale_interval_ms.to_string()),
                ("rebalance_threshold", c.rebalance_threshold.to_string()),
                ("revision", c.revision.to_string()),
            ]);
            if *validate_only {
                out.push_str("(valid; nothing written: --validate-only)\n");
            }
            out
        }
        Answer::Metrics(m) => metrics_text(m),
    }
}

fn modules_text(modules: &[pb::ModuleInstance]) -> String {
    let mut rows = header(&[
        "ID",
        "TYPE",
        "VERSION",
        "HEALTH",
        "CONNS",
        "LOAD",
        "DATA-ADDRESS",
    ]);
    for m in modules {
        let load = m.load.clone().unwrap_or_default();
        rows.push(vec![
            m.instance_id.clone(),
            enum_text(type_str, m.module_type),
            or_dash(&m.version),
            health_cell(m.health, m.draining),
            conns(load.active_connections, m.max_connections),
            load.load_score.to_string(),
            or_dash(&m.data_address),
        ]);
    }
    format!(
        "{}({})\n",
        ctl::format_table(&rows),
        count(modules.len() as u64, "instance")
    )
}

fn module_text(r: &pb::GetModuleInfoResponse) -> String {
    let mut out = String::new();
    if let Some(m) = &r.module {
        let load = m.load.clone().unwrap_or_default();
        out = pairs(&[
            ("instance_id", m.instance_id.clone()),
            ("module_type", enum_text(type_str, m.module_type)),
            ("version", or_dash(&m.version)),
            ("health", health_cell(m.health, m.draining)),
            ("health_reason", or_dash(&m.health_reason)),
            ("control_address", or_dash(&m.control_address)),
            ("data_address", or_dash(&m.data_address)),
            (
                "protocols",
                if m.protocols.is_empty() {
                    "its type's".into()
                } else {
                    m.protocols
                        .iter()
                        .map(|p| enum_text(protocol_str, *p))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            ),
            (
                "max_connections",
                if m.max_connections == 0 {
                    "no limit".into()
                } else {
                    m.max_connections.to_string()
                },
            ),
            ("metadata", map_or_dash(&m.metadata)),
            ("registered_at", time(m.registered_at_ms)),
            ("last_heartbeat", time(m.last_heartbeat_ms)),
            ("heartbeat_interval_ms", m.heartbeat_interval_ms.to_string()),
            (
                "health_check",
                m.health_check.as_ref().map_or("-".into(), check_text),
            ),
            (
                "connections",
                format!(
                    "{} ({} through this node)",
                    conns(load.active_connections, m.max_connections),
                    load.local_connections
                ),
            ),
            ("load_score", load.load_score.to_string()),
            ("full", yes_no(load.full).into()),
            ("cpu_percent", format!("{:.1}", load.cpu_percent)),
            ("memory_percent", format!("{:.1}", load.memory_percent)),
            (
                "requests_per_second",
                format!("{:.1}", load.requests_per_second),
            ),
            ("latency_ms", format!("{:.1}", load.latency_ms)),
            ("queue_depth", load.queue_depth.to_string()),
        ]);
    }
    out.push_str("\ncapabilities (CanHandle answers cached on this node):\n");
    if r.capabilities.is_empty() {
        out.push_str("  none\n");
    } else {
        let mut rows = header(&["ROUTE", "CAN-HANDLE", "PRIORITY", "REASON"]);
        for c in &r.capabilities {
            rows.push(vec![
                c.route_id.clone(),
                yes_no(c.can_handle).into(),
                c.priority.to_string(),
                or_dash(&c.reason),
            ]);
        }
        out.push_str(&ctl::format_table(&rows));
    }
    out.push_str("\nmetrics:\n");
    if r.metrics.is_empty() {
        out.push_str("  none\n");
    } else {
        let mut rows = header(&["NAME", "VALUE", "LABELS", "AT"]);
        for p in &r.metrics {
            rows.push(vec![
                p.name.clone(),
                p.value.to_string(),
                map_or_dash(&p.labels),
                time(p.timestamp_ms),
            ]);
        }
        out.push_str(&ctl::format_table(&rows));
    }
    out
}

fn check_text(h: &pb::HealthCheckConfig) -> String {
    format!(
        "{}{} every {} ms, timeout {} ms, healthy after {}, unhealthy after {}",
        enum_text(check_kind_str, h.kind),
        if h.deep { " (deep)" } else { "" },
        h.interval_ms,
        h.timeout_ms,
        h.healthy_threshold,
        h.unhealthy_threshold
    )
}

/// The columns of a route, shared by the table and the answers of updates.
fn route_cells(r: &pb::Route) -> Vec<String> {
    vec![
        r.route_id.clone(),
        r.priority.to_string(),
        enum_text(protocol_str, r.protocol),
        any(&r.source_pattern),
        any(&r.destination_pattern),
        ports(r.source_port, r.destination_port),
        any(&r.path_pattern),
        map_or_dash(&r.headers),
        enum_text(type_str, r.target),
    ]
}

const ROUTE_COLUMNS: [&str; 9] = [
    "ID",
    "PRIORITY",
    "PROTOCOL",
    "SOURCE",
    "DESTINATION",
    "PORTS",
    "PATH",
    "HEADERS",
    "TARGET",
];

fn routes_text(r: &pb::GetRoutingTableResponse) -> String {
    let mut rows = header(&ROUTE_COLUMNS);
    rows[0].extend(["INSTANCES".into(), "DECISIONS".into()]);
    for e in &r.entries {
        let mut row = route_cells(&e.route.clone().unwrap_or_default());
        row.push(list_or_dash(&e.instances));
        row.push(e.decisions.to_string());
        rows.push(row);
    }
    format!(
        "{}({}, revision {})\n",
        ctl::format_table(&rows),
        count(r.entries.len() as u64, "route"),
        r.revision
    )
}

fn routing_updated_text(r: &pb::UpdateRoutingResponse) -> String {
    let mut rows = header(&ROUTE_COLUMNS);
    rows.extend(r.routes.iter().map(route_cells));
    let outcome = if r.applied {
        format!(
            "applied: {} at revision {}",
            count(r.routes.len() as u64, "route"),
            r.revision
        )
    } else {
        format!(
            "valid; nothing written (--validate-only): the table would have {}",
            count(r.routes.len() as u64, "route")
        )
    };
    format!("{}{outcome}\n", ctl::format_table(&rows))
}

fn validation_text(r: &pb::ValidateRouteResponse) -> String {
    let mut out = if r.valid {
        String::from("the route is valid")
    } else {
        String::from("the route is not valid")
    };
    if r.capable.is_empty() {
        out.push_str("; no instance of its target type to ask\n");
        return out;
    }
    let able = r.capable.iter().filter(|c| c.can_handle).count();
    let _ = writeln!(
        out,
        "; {able} of {} can handle it:",
        count(r.capable.len() as u64, "instance")
    );
    let mut rows = header(&["INSTANCE", "CAN-HANDLE", "PRIORITY", "REASON"]);
    for c in &r.capable {
        rows.push(vec![
            c.instance_id.clone(),
            yes_no(c.can_handle).into(),
            c.priority.to_string(),
            or_dash(&c.reason),
        ]);
    }
    out + &ctl::format_table(&rows)
}

fn traffic_text(t: &pb::TrafficState) -> String {
    let weights = if t.weights.is_empty() {
        "-".to_string()
    } else {
        t.weights
            .iter()
            .map(|w| format!("{} {}%", w.version, w.weight))
            .collect::<Vec<_>>()
            .join(", ")
    };
    pairs(&[
        ("module_type", enum_text(type_str, t.module_type)),
        ("active_version", or_dash(&t.active_version)),
        ("previous_version", or_dash(&t.previous_version)),
        ("weights", weights),
        ("canary_percent", t.canary_percent.to_string()),
        (
            "promotion",
            t.promotion
                .as_ref()
                .map_or("-".into(), |p| promotion_text(p, &t.weights)),
        ),
        ("revision", t.revision.to_string()),
    ])
}

/// A gradual promotion and where it stands: the candidate's weight now and which step that is.
fn promotion_text(p: &pb::Promotion, weights: &[pb::VersionWeight]) -> String {
    // The node's defaults, should it answer the zeros it was given.
    let step = if p.step_percent == 0 {
        10
    } else {
        p.step_percent
    };
    let interval = if p.interval_ms == 0 {
        120_000
    } else {
        p.interval_ms
    };
    let now = weights
        .iter()
        .find(|w| w.version == p.version)
        .map_or(p.from_weight, |w| w.weight);
    let steps = (100u32.saturating_sub(p.from_weight)).div_ceil(step);
    let done = now.saturating_sub(p.from_weight).div_ceil(step).min(steps);
    format!(
        "{} from {}% by {}% every {} ms since {}; now {}% (step {} of {})",
        p.version,
        p.from_weight,
        step,
        interval,
        time(p.started_at_ms),
        now,
        done,
        steps
    )
}

fn limits_text(limits: &[pb::RateLimit], with_count: bool) -> String {
    let mut rows = header(&["TARGET", "PER-SECOND", "PER-MINUTE", "PER-HOUR", "BURST"]);
    for l in limits {
        rows.push(vec![
            l.target.clone(),
            zero_dash(l.requests_per_second.into()),
            zero_dash(l.requests_per_minute.into()),
            zero_dash(l.requests_per_hour.into()),
            zero_dash(l.burst.into()),
        ]);
    }
    let mut out = ctl::format_table(&rows);
    if with_count {
        let _ = writeln!(out, "({})", count(limits.len() as u64, "limit"));
    }
    out
}

fn load_text(r: &pb::LoadDistribution) -> String {
    let mut rows = header(&[
        "ID", "TYPE", "VERSION", "HEALTH", "CONNS", "LOCAL", "CPU%", "MEM%", "REQ/S", "LATENCY",
        "QUEUE", "LOAD", "FULL",
    ]);
    for l in &r.instances {
        rows.push(vec![
            l.instance_id.clone(),
            enum_text(type_str, l.module_type),
            or_dash(&l.version),
            enum_text(health_str, l.health),
            conns(l.active_connections, l.max_connections),
            l.local_connections.to_string(),
            format!("{:.1}", l.cpu_percent),
            format!("{:.1}", l.memory_percent),
            format!("{:.1}", l.requests_per_second),
            format!("{:.1}ms", l.latency_ms),
            l.queue_depth.to_string(),
            l.load_score.to_string(),
            yes_no(l.full).into(),
        ]);
    }
    format!(
        "{}({}; balance score {}/100)\n",
        ctl::format_table(&rows),
        count(r.instances.len() as u64, "instance"),
        r.balance_score
    )
}

fn rebalanced_text(r: &pb::RebalanceLoadResponse) -> String {
    let before = format!("balance score before: {}/100", r.balance_score_before);
    if r.shed.is_empty() {
        return format!("{before}; nothing to shed\n");
    }
    let mut rows = header(&["INSTANCE", "SHED"]);
    for s in &r.shed {
        rows.push(vec![s.instance_id.clone(), s.connections.to_string()]);
    }
    let total: u64 = r.shed.iter().map(|s| s.connections).sum();
    let what = if r.dry_run { "would ask" } else { "asked" };
    format!(
        "{}{before}; {what} {} to shed {}{}\n",
        ctl::format_table(&rows),
        count(r.shed.len() as u64, "instance"),
        count(total, "connection"),
        if r.dry_run { " (dry run)" } else { "" }
    )
}

fn health_text(r: &pb::CheckHealthResponse) -> String {
    let mut out = enum_text(health_str, r.status);
    if !r.message.is_empty() {
        let _ = write!(out, ": {}", r.message);
    }
    out.push('\n');
    if !r.modules.is_empty() {
        let mut rows = header(&["INSTANCE", "HEALTH", "REASON"]);
        for m in &r.modules {
            rows.push(vec![
                m.instance_id.clone(),
                enum_text(health_str, m.health),
                or_dash(&m.reason),
            ]);
        }
        out.push_str(&ctl::format_table(&rows));
    }
    out
}

fn metrics_text(m: &pb::NlbMetrics) -> String {
    let mut out = pairs(&[
        ("member_id", m.member_id.to_string()),
        ("at", time(m.timestamp_ms)),
        ("active_connections", m.active_connections.to_string()),
        ("connections_total", m.connections_total.to_string()),
        ("bytes_in", bytes(m.bytes_in)),
        ("bytes_out", bytes(m.bytes_out)),
        ("decisions", counts(&m.decisions)),
        ("modules", counts(&m.modules)),
        ("rate_limited", m.rate_limited.to_string()),
        ("evictions", m.evictions.to_string()),
        ("drains", m.drains.to_string()),
        ("scaling_decisions", m.scaling_decisions.to_string()),
    ]);
    if !m.traffic.is_empty() {
        out.push('\n');
        let mut rows = header(&["INSTANCE", "ACTIVE", "TOTAL", "IN", "OUT"]);
        for t in &m.traffic {
            rows.push(vec![
                t.instance_id.clone(),
                t.active_connections.to_string(),
                t.connections_total.to_string(),
                bytes(t.bytes_in),
                bytes(t.bytes_out),
            ]);
        }
        out.push_str(&ctl::format_table(&rows));
    }
    out
}

/// One update of `metrics --watch`: a line for people (counts that are still zero left out), or a
/// JSON document.
pub fn metrics_line(m: &pb::NlbMetrics, as_json: bool) -> String {
    if as_json {
        return metrics_json(m).to_string();
    }
    format!(
        "{} active={} total={} in={} out={} rate_limited={} decisions: {} modules: {}",
        time(m.timestamp_ms),
        m.active_connections,
        m.connections_total,
        bytes(m.bytes_in).replace(' ', ""),
        bytes(m.bytes_out).replace(' ', ""),
        m.rate_limited,
        nonzero_counts(&m.decisions),
        nonzero_counts(&m.modules)
    )
}

// --- Cells ----------------------------------------------------------------------------------

fn header(names: &[&str]) -> Vec<Vec<String>> {
    vec![names.iter().map(|n| n.to_string()).collect()]
}

/// `key  value` lines, the values aligned.
fn pairs(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect()
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.into()
    }
}

/// A pattern: empty matches anything.
fn any(s: &str) -> String {
    if s.is_empty() {
        "*".into()
    } else {
        s.into()
    }
}

fn zero_dash(n: u64) -> String {
    if n == 0 {
        "-".into()
    } else {
        n.to_string()
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// "1 route", "3 routes".
fn count(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn health_cell(health: i32, draining: bool) -> String {
    let name = enum_text(health_str, health);
    if draining {
        format!("{name} (draining)")
    } else {
        name
    }
}

/// Connections, out of the maximum when there is one.
fn conns(active: u64, max: u32) -> String {
    if max == 0 {
        active.to_string()
    } else {
        format!("{active}/{max}")
    }
}

/// A route's ports: the destination port alone, or SOURCE->DESTINATION when the source port is
/// matched too; `*` for any.
fn ports(source: u32, destination: u32) -> String {
    let port = |p: u32| {
        if p == 0 {
            "*".to_string()
        } else {
            p.to_string()
        }
    };
    if source == 0 {
        port(destination)
    } else {
        format!("{}->{}", port(source), port(destination))
    }
}

fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

/// `k=v,k=v`, sorted by key (maps come in no order).
fn map_or_dash(m: &HashMap<String, String>) -> String {
    if m.is_empty() {
        return "-".into();
    }
    let mut items: Vec<_> = m.iter().collect();
    items.sort();
    items
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `name=count ...`, sorted by name.
fn counts<V: std::fmt::Display>(m: &HashMap<String, V>) -> String {
    counts_where(m, |_| true)
}

/// `name=count ...` of the counts that are not zero (a watch line stays short).
fn nonzero_counts<V: std::fmt::Display + Default + PartialEq>(m: &HashMap<String, V>) -> String {
    counts_where(m, |v| *v != V::default())
}

fn counts_where<V: std::fmt::Display>(m: &HashMap<String, V>, keep: impl Fn(&V) -> bool) -> String {
    let mut items: Vec<_> = m.iter().filter(|(_, v)| keep(v)).collect();
    if items.is_empty() {
        return "-".into();
    }
    items.sort_by(|a, b| a.0.cmp(b.0));
    items
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn ms_u64(ms: i64) -> u64 {
    u64::try_from(ms).unwrap_or(0)
}

/// Unix milliseconds as UTC, `2024-05-01 12:00:00.123Z`; `-` for 0 (not set).
fn time(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    crate::utc::format(ms, ' ')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(
        id: &str,
        health: pb::HealthStatus,
        conns: u64,
        max: u32,
        score: u32,
    ) -> pb::ModuleInstance {
        pb::ModuleInstance {
            instance_id: id.into(),
            module_type: pb::ModuleType::Alb as i32,
            version: "v1".into(),
            data_address: "127.0.0.1:9001".into(),
            max_connections: max,
            health: health as i32,
            load: Some(pb::LoadInfo {
                active_connections: conns,
                load_score: score,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn times_are_utc() {
        assert_eq!(time(0), "-");
        assert_eq!(time(1), "1970-01-01 00:00:00.001Z");
        assert_eq!(time(951_782_400_000), "2000-02-29 00:00:00.000Z");
        assert_eq!(time(1_714_564_800_123), "2024-05-01 12:00:00.123Z");
    }

    #[test]
    fn modules_table() {
        let mut draining = module("alb-2", pb::HealthStatus::Stopping, 0, 0, 0);
        draining.draining = true;
        draining.version = String::new();
        let r = pb::ListModulesResponse {
            modules: vec![
                module("alb-1", pb::HealthStatus::Healthy, 3, 100, 12),
                draining,
            ],
        };
        assert_eq!(
            text(&Answer::Modules(r)),
            "\
ID     TYPE  VERSION  HEALTH               CONNS  LOAD  DATA-ADDRESS
alb-1  alb   v1       healthy              3/100  12    127.0.0.1:9001
alb-2  alb   -        stopping (draining)  0      0     127.0.0.1:9001
(2 instances)
"
        );
    }

    #[test]
    fn routes_table() {
        let r = pb::GetRoutingTableResponse {
            entries: vec![
                pb::RoutingEntry {
                    route: Some(pb::Route {
                        route_id: "web".into(),
                        protocol: pb::Protocol::Http as i32,
                        destination_pattern: "*.example.com".into(),
                        destination_port: 80,
                        path_pattern: "/api/*".into(),
                        headers: [
                            ("x-tenant".to_string(), "a*".to_string()),
                            ("x-env".to_string(), "prod".to_string()),
                        ]
                        .into(),
                        priority: 10,
                        target: pb::ModuleType::Alb as i32,
                        ..Default::default()
                    }),
                    instances: vec!["alb-1".into(), "alb-2".into()],
                    decisions: 17,
                },
                pb::RoutingEntry {
                    route: Some(pb::Route {
                        route_id: "db".into(),
                        protocol: pb::Protocol::Redis as i32,
                        source_pattern: "10.0.0.0/8".into(),
                        source_port: 5000,
                        target: pb::ModuleType::Dblb as i32,
                        ..Default::default()
                    }),
                    instances: vec![],
                    decisions: 0,
                },
            ],
            revision: 4,
        };
        assert_eq!(
            text(&Answer::Routes(r)),
            "\
ID   PRIORITY  PROTOCOL  SOURCE      DESTINATION    PORTS    PATH    HEADERS                 TARGET  INSTANCES    DECISIONS
web  10        http      *           *.example.com  80       /api/*  x-env=prod,x-tenant=a*  alb     alb-1,alb-2  17
db   0         redis     10.0.0.0/8  *              5000->*  *       -                       dblb    -            0
(2 routes, revision 4)
"
        );
    }

    #[test]
    fn traffic_with_a_promotion_under_way() {
        let t = pb::TrafficState {
            module_type: pb::ModuleType::Alb as i32,
            active_version: "v1".into(),
            previous_version: String::new(),
            weights: vec![
                pb::VersionWeight {
                    version: "v1".into(),
                    weight: 70,
                },
                pb::VersionWeight {
                    version: "v2".into(),
                    weight: 30,
                },
            ],
            promotion: Some(pb::Promotion {
                version: "v2".into(),
                from_weight: 0,
                step_percent: 10,
                interval_ms: 60_000,
                started_at_ms: 1_714_564_800_000,
            }),
            canary_percent: 30,
            revision: 5,
        };
        assert_eq!(
            text(&Answer::Traffic(t)),
            "\
module_type       alb
active_version    v1
previous_version  -
weights           v1 70%, v2 30%
canary_percent    30
promotion         v2 from 0% by 10% every 60000 ms since 2024-05-01 12:00:00.000Z; now 30% (step 3 of 10)
revision          5
"
        );
    }

    #[test]
    fn limits_and_health() {
        let r = pb::GetRateLimitsResponse {
            limits: vec![pb::RateLimit {
                target: "route:web".into(),
                requests_per_second: 100,
                requests_per_minute: 0,
                requests_per_hour: 5000,
                burst: 20,
            }],
        };
        assert_eq!(
            text(&Answer::Limits(r)),
            "\
TARGET     PER-SECOND  PER-MINUTE  PER-HOUR  BURST
route:web  100         -           5000      20
(1 limit)
"
        );
        let removed = Answer::LimitRemoved(
            "route:x".into(),
            pb::RemoveRateLimitResponse { removed: false },
        );
        assert_eq!(text(&removed), "route:x had no limit; nothing removed\n");
        assert_eq!(removed.exit_code(), 1);

        let h = Answer::Health(pb::CheckHealthResponse {
            status: pb::HealthStatus::Degraded as i32,
            message: "1 of 2 instances unhealthy".into(),
            modules: vec![pb::ModuleHealth {
                instance_id: "alb-1".into(),
                health: pb::HealthStatus::Unhealthy as i32,
                reason: "missed 3 heartbeats".into(),
            }],
        });
        assert_eq!(
            text(&h),
            "\
degraded: 1 of 2 instances unhealthy
INSTANCE  HEALTH     REASON
alb-1     unhealthy  missed 3 heartbeats
"
        );
        assert_eq!(h.exit_code(), 1);
        let ok = Answer::Health(pb::CheckHealthResponse {
            status: pb::HealthStatus::Healthy as i32,
            ..Default::default()
        });
        assert_eq!((text(&ok).as_str(), ok.exit_code()), ("healthy\n", 0));
    }

    #[test]
    fn json_has_the_proto_names_and_enum_names() {
        let mut m = module("alb-1", pb::HealthStatus::Healthy, 3, 100, 12);
        m.protocols = vec![pb::Protocol::Http as i32, pb::Protocol::Grpc as i32];
        m.health_check = Some(pb::HealthCheckConfig {
            kind: pb::HealthCheckKind::Tcp as i32,
            interval_ms: 1000,
            ..Default::default()
        });
        let doc = json(&Answer::Modules(pb::ListModulesResponse {
            modules: vec![m],
        }));
        let m = &doc["modules"][0];
        assert_eq!(m["instance_id"], "alb-1");
        assert_eq!(m["module_type"], "alb");
        assert_eq!(m["health"], "healthy");
        assert_eq!(m["protocols"], json!(["http", "grpc"]));
        assert_eq!(m["health_check"]["kind"], "tcp");
        assert_eq!(m["load"]["active_connections"], 3);
        assert_eq!(m["load"]["health"], "unspecified");
        assert_eq!(m["max_connections"], 100);

        let doc = json(&Answer::RoutingUpdated(pb::UpdateRoutingResponse {
            routes: vec![pb::Route {
                route_id: "web".into(),
                protocol: pb::Protocol::Websocket as i32,
                headers: [("x".to_string(), "y=*".to_string())].into(),
                target: 99,
                ..Default::default()
            }],
            revision: 3,
            applied: true,
        }));
        assert_eq!(
            doc,
            json!({
                "routes": [{
                    "route_id": "web", "protocol": "websocket", "source_pattern": "",
                    "destination_pattern": "", "source_port": 0, "destination_port": 0,
                    "path_pattern": "", "headers": {"x": "y=*"}, "priority": 0,
                    // A value this build does not know stays a number.
                    "target": 99,
                }],
                "revision": 3,
                "applied": true,
            })
        );

        let doc = json(&Answer::ScalingDecision(pb::ScalingDecision {
            module_type: pb::ModuleType::Dblb as i32,
            direction: pb::ScalingDirection::None as i32,
            ..Default::default()
        }));
        assert_eq!(doc["module_type"], "dblb");
        assert_eq!(doc["direction"], "none");
        // One line.
        let out = render(&Answer::Limit(pb::RateLimit::default()), true);
        assert_eq!(
            out,
            "{\"burst\":0,\"requests_per_hour\":0,\"requests_per_minute\":0,\"requests_per_second\":0,\"target\":\"\"}\n"
        );
    }

    #[test]
    fn decision_and_metrics_line() {
        let d = pb::RouteDecision {
            instance_id: "alb-1".into(),
            address: "127.0.0.1:9001".into(),
            route_id: "web".into(),
            priority: 10,
            module_type: pb::ModuleType::Alb as i32,
            version: "v1".into(),
            load_score: 12,
            dry_run: true,
        };
        assert_eq!(
            text(&Answer::Decision(d)),
            "\
instance_id  alb-1
address      127.0.0.1:9001
route_id     web
priority     10
module_type  alb
version      v1
load_score   12
dry_run      yes (no rate-limit tokens spent; the version split did not advance)
"
        );
        let m = pb::NlbMetrics {
            member_id: 1,
            timestamp_ms: 1_714_564_800_000,
            decisions: [
                ("routed".to_string(), 5),
                ("no_route".to_string(), 1),
                ("rate_limited".to_string(), 0),
            ]
            .into(),
            active_connections: 2,
            connections_total: 9,
            bytes_in: 1536,
            bytes_out: 10,
            modules: [("healthy".to_string(), 2)].into(),
            ..Default::default()
        };
        assert_eq!(
            metrics_line(&m, false),
            "2024-05-01 12:00:00.000Z active=2 total=9 in=1.5KiB out=10B rate_limited=0 \
             decisions: no_route=1 routed=5 modules: healthy=2"
        );
        let line = metrics_line(&m, true);
        assert!(!line.contains('\n'));
        let doc: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(doc["decisions"]["routed"], 5);
    }
}
