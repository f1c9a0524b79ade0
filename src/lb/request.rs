//! From the command line to the balancer's requests: names of protocols and module types,
//! headers, routes (from flags or a JSON file), flow queries, settings and scaling changes.
//! Pure functions, so that the mapping is tested without a node.
//!
//! The CLI checks only what it must to build a request (names it has to turn into enum values,
//! the shape of `KEY=VALUE` arguments and of a routes file); the rules of a route, a limit or a
//! setting are the node's, and its INVALID_ARGUMENT answers name the field.

use std::collections::HashMap;

use lodge_actors::balancer::{ModuleType, Protocol};
use lodge_grpc::balancer::convert::{module_type_to_pb, protocol_to_pb};
use lodge_grpc::pb::balancer as pb;
use serde_json::Value;

use super::{RouteArgs, ScaleSettings, TestArgs, Trigger};

/// `--protocol`: a protocol's name, any case.
pub fn parse_protocol(s: &str) -> Result<Protocol, String> {
    Protocol::parse(s).ok_or_else(|| {
        let names: Vec<&str> = Protocol::ALL.iter().map(|p| p.as_str()).collect();
        format!("{s:?} is not a protocol (one of {})", names.join(", "))
    })
}

/// `--type`, `--target` and a TYPE argument: a module type's name, any case.
pub fn parse_module_type(s: &str) -> Result<ModuleType, String> {
    ModuleType::parse(s).ok_or_else(|| {
        let names: Vec<&str> = ModuleType::ALL.iter().map(|t| t.as_str()).collect();
        format!("{s:?} is not a module type (one of {})", names.join(", "))
    })
}

/// `--header NAME=GLOB` (or `NAME=VALUE` for a query). The value may itself contain `=`: only the
/// first one separates.
pub fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, _)) if name.trim().is_empty() => {
            Err(format!("{s:?} has no header name; write NAME=GLOB"))
        }
        Some((name, value)) => Ok((name.to_string(), value.to_string())),
        None => Err(format!("{s:?} is not NAME=GLOB")),
    }
}

/// The wire value of a module type, or UNSPECIFIED (0: "all types" in filters) for none.
pub fn type_filter(t: Option<ModuleType>) -> i32 {
    t.map_or(0, |t| module_type_to_pb(t) as i32)
}

/// The wire value of a module type.
pub fn module_type(t: ModuleType) -> i32 {
    module_type_to_pb(t) as i32
}

/// The route the flags of `route add` and `route validate` describe. A header named twice keeps
/// its last glob (a route has one glob per header).
pub fn route(a: &RouteArgs) -> pb::Route {
    pb::Route {
        route_id: a.id.clone(),
        protocol: protocol_to_pb(a.protocol) as i32,
        source_pattern: a.source.clone(),
        destination_pattern: a.destination.clone(),
        source_port: a.source_port.into(),
        destination_port: a.port.into(),
        path_pattern: a.path.clone(),
        headers: a.headers.iter().cloned().collect(),
        priority: a.priority,
        target: module_type(a.target),
    }
}

/// `route add`: an upsert of one route.
pub fn add_route(
    a: &RouteArgs,
    validate_only: bool,
    expect: Option<i64>,
) -> pb::UpdateRoutingRequest {
    pb::UpdateRoutingRequest {
        routes: vec![route(a)],
        validate_only,
        expected_revision: expect.unwrap_or(0),
        ..Default::default()
    }
}

/// `route delete`.
pub fn delete_routes(ids: &[String], expect: Option<i64>) -> pb::UpdateRoutingRequest {
    pb::UpdateRoutingRequest {
        delete_route_ids: ids.to_vec(),
        expected_revision: expect.unwrap_or(0),
        ..Default::default()
    }
}

/// `route replace`: the table becomes exactly `routes`.
pub fn replace_routes(
    routes: Vec<pb::Route>,
    validate_only: bool,
    expect: Option<i64>,
) -> pb::UpdateRoutingRequest {
    pb::UpdateRoutingRequest {
        routes,
        replace_all: true,
        validate_only,
        expected_revision: expect.unwrap_or(0),
        ..Default::default()
    }
}

/// `route test`: the flow to decide for; a dry run unless `--commit`.
pub fn route_query(a: &TestArgs) -> pb::RouteQuery {
    pb::RouteQuery {
        protocol: protocol_to_pb(a.protocol) as i32,
        source: a.source.clone(),
        source_port: a.source_port.into(),
        destination: a.destination.clone(),
        destination_port: a.port.into(),
        path: a.path.clone(),
        headers: a.headers.iter().cloned().collect(),
        dry_run: !a.commit,
    }
}

/// The fields of a route in a routes file: the proto's names.
const ROUTE_FIELDS: [&str; 10] = [
    "route_id",
    "protocol",
    "source_pattern",
    "destination_pattern",
    "source_port",
    "destination_port",
    "path_pattern",
    "headers",
    "priority",
    "target",
];

/// A routes file (`route replace --file`): a JSON array of routes with the proto's field names,
/// `protocol` and `target` as names ("http", "alb"). Errors name the entry and the field as the
/// node does (`routes[2].protocol: ...`).
pub fn routes_from_json(text: &str) -> Result<Vec<pb::Route>, String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Array(items) = doc else {
        return Err(format!(
            "expected a JSON array of routes, got {}",
            json_kind(&doc)
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| route_from_json(item, &format!("routes[{i}]")))
        .collect()
}

fn route_from_json(v: &Value, at: &str) -> Result<pb::Route, String> {
    let Value::Object(fields) = v else {
        return Err(format!(
            "{at}: expected a route (an object), got {}",
            json_kind(v)
        ));
    };
    // Checked before the fields so that a route missing its protocol says so, rather than
    // being sent and refused for an unspecified one.
    for required in ["route_id", "protocol", "target"] {
        if !fields.contains_key(required) {
            return Err(format!("{at}.{required}: required"));
        }
    }
    let mut r = pb::Route::default();
    for (key, value) in fields {
        let field = format!("{at}.{key}");
        match key.as_str() {
            "route_id" => r.route_id = json_string(value, &field)?,
            "protocol" => {
                let name = json_string(value, &field)?;
                let p = parse_protocol(&name).map_err(|e| format!("{field}: {e}"))?;
                r.protocol = protocol_to_pb(p) as i32;
            }
            "target" => {
                let name = json_string(value, &field)?;
                r.target =
                    module_type(parse_module_type(&name).map_err(|e| format!("{field}: {e}"))?);
            }
            "source_pattern" => r.source_pattern = json_string(value, &field)?,
            "destination_pattern" => r.destination_pattern = json_string(value, &field)?,
            "path_pattern" => r.path_pattern = json_string(value, &field)?,
            "source_port" => r.source_port = json_port(value, &field)?,
            "destination_port" => r.destination_port = json_port(value, &field)?,
            "priority" => {
                r.priority = value
                    .as_i64()
                    .and_then(|n| i32::try_from(n).ok())
                    .ok_or_else(|| format!("{field}: expected a whole number, got {value}"))?;
            }
            "headers" => r.headers = json_headers(value, &field)?,
            _ => {
                return Err(format!(
                    "{field}: unknown field (a route has {})",
                    ROUTE_FIELDS.join(", ")
                ))
            }
        }
    }
    Ok(r)
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn json_string(v: &Value, field: &str) -> Result<String, String> {
    v.as_str()
        .map(String::from)
        .ok_or_else(|| format!("{field}: expected a string, got {}", json_kind(v)))
}

fn json_port(v: &Value, field: &str) -> Result<u32, String> {
    v.as_u64()
        .filter(|n| *n <= u64::from(u16::MAX))
        .map(|n| n as u32)
        .ok_or_else(|| format!("{field}: expected a port (0 to 65535), got {v}"))
}

fn json_headers(v: &Value, field: &str) -> Result<HashMap<String, String>, String> {
    let Value::Object(map) = v else {
        return Err(format!(
            "{field}: expected an object of header name to glob, got {}",
            json_kind(v)
        ));
    };
    map.iter()
        .map(|(name, glob)| Ok((name.clone(), json_string(glob, &format!("{field}.{name}"))?)))
        .collect()
}

/// The settings `config --set` takes: the fields of BalancerConfig (all but `revision`).
pub const CONFIG_KEYS: [&str; 6] = [
    "heartbeat_interval_ms",
    "max_missed_heartbeats",
    "drain_timeout_ms",
    "can_handle_ttl_ms",
    "autoscale_interval_ms",
    "rebalance_threshold",
];

/// One `config --set KEY=VALUE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    pub key: &'static str,
    pub value: u32,
}

/// `config --set KEY=VALUE`: the key must be a BalancerConfig field and the value a number.
pub fn parse_setting(s: &str) -> Result<Setting, String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    let key = CONFIG_KEYS
        .into_iter()
        .find(|k| *k == key.trim())
        .ok_or_else(|| {
            format!(
                "unknown setting {key:?}; the settings are {}",
                CONFIG_KEYS.join(", ")
            )
        })?;
    let value = value
        .trim()
        .parse()
        .map_err(|_| format!("{key}: {value:?} is not a whole number (0 to {})", u32::MAX))?;
    Ok(Setting { key, value })
}

/// `config --set`: the given settings; the others keep their value.
pub fn config_update(settings: &[Setting], validate_only: bool) -> pb::UpdateNlbConfigRequest {
    let mut r = pb::UpdateNlbConfigRequest {
        validate_only,
        ..Default::default()
    };
    for s in settings {
        let slot = match s.key {
            "heartbeat_interval_ms" => &mut r.heartbeat_interval_ms,
            "max_missed_heartbeats" => &mut r.max_missed_heartbeats,
            "drain_timeout_ms" => &mut r.drain_timeout_ms,
            "can_handle_ttl_ms" => &mut r.can_handle_ttl_ms,
            "autoscale_interval_ms" => &mut r.autoscale_interval_ms,
            "rebalance_threshold" => &mut r.rebalance_threshold,
            other => unreachable!("parse_setting admits only CONFIG_KEYS, not {other}"),
        };
        *slot = Some(s.value);
    }
    r
}

/// `scale TYPE --up|--down|--auto|--to N`.
pub fn trigger_scaling(
    t: ModuleType,
    trigger: &Trigger,
    reason: &str,
) -> pb::TriggerScalingRequest {
    use pb::ScalingDirection as D;
    let (direction, desired) = match trigger {
        Trigger::Up => (D::Up, 0),
        Trigger::Down => (D::Down, 0),
        Trigger::Auto => (D::Auto, 0),
        // A count alone: the node forces it (the count says which way); AUTO would ask the
        // autoscaler instead.
        Trigger::To(n) => (D::Unspecified, *n),
    };
    pb::TriggerScalingRequest {
        module_type: module_type(t),
        direction: direction as i32,
        desired_instances: desired,
        reason: reason.to_string(),
    }
}

/// `scale TYPE --set ...`: `current` with the given flags applied.
pub fn apply_scaling(mut c: pb::ScalingConfig, s: &ScaleSettings) -> pb::ScalingConfig {
    if s.enable {
        c.enabled = true;
    }
    if s.disable {
        c.enabled = false;
    }
    let u32s = [
        (&mut c.min_instances, s.min),
        (&mut c.max_instances, s.max),
        (&mut c.target_connections_per_instance, s.target_connections),
        (&mut c.scale_up_cooldown_ms, s.up_cooldown_ms),
        (&mut c.scale_down_cooldown_ms, s.down_cooldown_ms),
    ];
    for (field, value) in u32s {
        if let Some(v) = value {
            *field = v;
        }
    }
    let f64s = [
        (&mut c.target_cpu_percent, s.target_cpu),
        (&mut c.target_memory_percent, s.target_memory),
        (&mut c.scale_up_threshold, s.up_threshold),
        (&mut c.scale_down_threshold, s.down_threshold),
    ];
    for (field, value) in f64s {
        if let Some(v) = value {
            *field = v;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Lb, LimitsCmd, RouteCmd, ScaleArgs};
    use super::*;
    use crate::ctl::Connection;

    /// `lodge lb` as main declares it.
    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        cmd: Lb,
    }

    fn parse(args: &[&str]) -> Lb {
        let mut all = vec!["lodge-lb"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .cmd
    }

    fn parse_err(args: &[&str]) -> clap::Error {
        let mut all = vec!["lodge-lb"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all) {
            Ok(c) => panic!("{args:?} parsed: {:?}", c.cmd),
            Err(e) => e,
        }
    }

    #[test]
    fn every_flag_of_route_add_reaches_the_request() {
        let Lb::Route {
            cmd:
                RouteCmd::Add {
                    route: a,
                    validate_only,
                    expect_revision,
                },
        } = parse(&[
            "route",
            "add",
            "--id",
            "web.api",
            "--protocol",
            "HTTP",
            "--target",
            "alb",
            "--source",
            "10.0.0.0/8",
            "--destination",
            "*.example.com",
            "--source-port",
            "1234",
            "--port",
            "8080",
            "--path",
            "/api/*",
            "--header",
            "x-tenant=a*",
            "--header",
            "x-sig=k=v==",
            "--priority",
            "-5",
            "--validate-only",
            "--expect-revision",
            "7",
        ])
        else {
            panic!("not route add");
        };
        let req = add_route(&a, validate_only, expect_revision);
        assert_eq!(
            req,
            pb::UpdateRoutingRequest {
                routes: vec![pb::Route {
                    route_id: "web.api".into(),
                    protocol: pb::Protocol::Http as i32,
                    source_pattern: "10.0.0.0/8".into(),
                    destination_pattern: "*.example.com".into(),
                    source_port: 1234,
                    destination_port: 8080,
                    path_pattern: "/api/*".into(),
                    headers: [
                        ("x-tenant".to_string(), "a*".to_string()),
                        ("x-sig".to_string(), "k=v==".to_string()),
                    ]
                    .into(),
                    priority: -5,
                    target: pb::ModuleType::Alb as i32,
                }],
                replace_all: false,
                validate_only: true,
                delete_route_ids: vec![],
                expected_revision: 7,
            }
        );
    }

    #[test]
    fn route_add_defaults_to_any_and_a_plain_write() {
        let Lb::Route {
            cmd:
                RouteCmd::Add {
                    route: a,
                    validate_only,
                    expect_revision,
                },
        } = parse(&[
            "route",
            "add",
            "--id",
            "db",
            "--protocol",
            "redis",
            "--target",
            "dblb",
        ])
        else {
            panic!("not route add");
        };
        let req = add_route(&a, validate_only, expect_revision);
        assert_eq!(
            req.routes,
            vec![pb::Route {
                route_id: "db".into(),
                protocol: pb::Protocol::Redis as i32,
                target: pb::ModuleType::Dblb as i32,
                ..Default::default()
            }]
        );
        assert!(!req.validate_only && !req.replace_all);
        assert_eq!(req.expected_revision, 0);
    }

    #[test]
    fn bad_route_flags_are_argument_errors() {
        let e = parse_err(&[
            "route",
            "add",
            "--id",
            "a",
            "--protocol",
            "htp",
            "--target",
            "alb",
        ]);
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string()
                .contains("\"htp\" is not a protocol (one of tcp, udp, http"),
            "{e}"
        );
        let e = parse_err(&[
            "route",
            "add",
            "--id",
            "a",
            "--protocol",
            "http",
            "--target",
            "xlb",
        ]);
        assert!(
            e.to_string()
                .contains("\"xlb\" is not a module type (one of alb, dblb"),
            "{e}"
        );
        let e = parse_err(&[
            "route",
            "add",
            "--id",
            "a",
            "--protocol",
            "http",
            "--target",
            "alb",
            "--header",
            "x-a",
        ]);
        assert!(e.to_string().contains("\"x-a\" is not NAME=GLOB"), "{e}");
        let e = parse_err(&[
            "route",
            "add",
            "--id",
            "a",
            "--protocol",
            "http",
            "--target",
            "alb",
            "--port",
            "70000",
        ]);
        assert_eq!(e.exit_code(), 2);
        // --protocol and --target are required.
        parse_err(&["route", "add", "--id", "a", "--protocol", "http"]);
    }

    #[test]
    fn headers_split_at_the_first_equals_sign() {
        assert_eq!(parse_header("x-a=b").unwrap(), ("x-a".into(), "b".into()));
        assert_eq!(
            parse_header("x-a=b=c*").unwrap(),
            ("x-a".into(), "b=c*".into())
        );
        assert_eq!(parse_header("x-a=").unwrap(), ("x-a".into(), String::new()));
        assert_eq!(parse_header("x-a").unwrap_err(), "\"x-a\" is not NAME=GLOB");
        assert_eq!(
            parse_header("=v").unwrap_err(),
            "\"=v\" has no header name; write NAME=GLOB"
        );
    }

    #[test]
    fn route_test_is_a_dry_run_unless_committed() {
        let Lb::Route {
            cmd: RouteCmd::Test(a),
        } = parse(&[
            "route",
            "test",
            "--protocol",
            "grpc",
            "--source",
            "10.1.2.3",
            "--source-port",
            "40000",
            "--destination",
            "api.example.com",
            "--port",
            "443",
            "--path",
            "/pkg.Svc/Call",
            "--header",
            "authorization=Bearer a=b",
        ])
        else {
            panic!("not route test");
        };
        assert_eq!(
            route_query(&a),
            pb::RouteQuery {
                protocol: pb::Protocol::Grpc as i32,
                source: "10.1.2.3".into(),
                source_port: 40000,
                destination: "api.example.com".into(),
                destination_port: 443,
                path: "/pkg.Svc/Call".into(),
                headers: [("authorization".to_string(), "Bearer a=b".to_string())].into(),
                dry_run: true,
            }
        );
        let Lb::Route {
            cmd: RouteCmd::Test(a),
        } = parse(&["route", "test", "--protocol", "tcp", "--commit"])
        else {
            panic!("not route test");
        };
        assert!(!route_query(&a).dry_run);
    }

    #[test]
    fn route_delete_and_replace_requests() {
        let Lb::Route {
            cmd:
                RouteCmd::Delete {
                    ids,
                    expect_revision,
                },
        } = parse(&["route", "delete", "a", "b", "--expect-revision", "3"])
        else {
            panic!("not route delete");
        };
        let req = delete_routes(&ids, expect_revision);
        assert_eq!(req.delete_route_ids, ["a", "b"]);
        assert_eq!(req.expected_revision, 3);
        assert!(req.routes.is_empty() && !req.replace_all);
        // At least one id.
        parse_err(&["route", "delete"]);

        let req = replace_routes(vec![], true, None);
        assert!(req.replace_all && req.validate_only && req.routes.is_empty());
    }

    #[test]
    fn a_routes_file_parses_with_names() {
        let routes = routes_from_json(
            r#"[
                {"route_id": "web", "protocol": "http", "target": "alb", "priority": 10,
                 "destination_port": 80, "path_pattern": "/api/*",
                 "headers": {"x-tenant": "a=*"}},
                {"route_id": "db", "protocol": "POSTGRES", "target": "dblb",
                 "source_pattern": "10.0.0.0/8", "destination_pattern": "", "source_port": 0}
            ]"#,
        )
        .unwrap();
        assert_eq!(
            routes,
            vec![
                pb::Route {
                    route_id: "web".into(),
                    protocol: pb::Protocol::Http as i32,
                    destination_port: 80,
                    path_pattern: "/api/*".into(),
                    headers: [("x-tenant".to_string(), "a=*".to_string())].into(),
                    priority: 10,
                    target: pb::ModuleType::Alb as i32,
                    ..Default::default()
                },
                pb::Route {
                    route_id: "db".into(),
                    protocol: pb::Protocol::Postgres as i32,
                    source_pattern: "10.0.0.0/8".into(),
                    target: pb::ModuleType::Dblb as i32,
                    ..Default::default()
                },
            ]
        );
        assert_eq!(routes_from_json("[]").unwrap(), vec![]);
    }

    #[test]
    fn routes_file_errors_name_the_entry_and_the_field() {
        let ok = r#"{"route_id": "a", "protocol": "http", "target": "alb"}"#;
        let bad = |entry: &str| routes_from_json(&format!("[{ok}, {entry}]")).unwrap_err();
        assert_eq!(
            bad(r#"{"route_id": "b", "protocol": "htp", "target": "alb"}"#),
            "routes[1].protocol: \"htp\" is not a protocol (one of tcp, udp, http, https, http2, \
             http3, grpc, websocket, mysql, postgres, mongodb, redis, rtmp, rtmps, hls, dash)"
        );
        assert_eq!(
            bad(r#"{"route_id": "b", "protocol": 3, "target": "alb"}"#),
            "routes[1].protocol: expected a string, got a number"
        );
        assert_eq!(
            bad(r#"{"route_id": "b", "protocol": "http", "target": "xlb"}"#),
            "routes[1].target: \"xlb\" is not a module type (one of alb, dblb, ailb, rtmp, nlb)"
        );
        assert_eq!(
            bad(r#"{"route_id": "b", "protocol": "http"}"#),
            "routes[1].target: required"
        );
        assert_eq!(
            bad(r#"{"route_id": "b", "protocol": "http", "target": "alb", "port": 80}"#),
            "routes[1].port: unknown field (a route has route_id, protocol, source_pattern, \
             destination_pattern, source_port, destination_port, path_pattern, headers, \
             priority, target)"
        );
        assert_eq!(
            bad(
                r#"{"route_id": "b", "protocol": "http", "target": "alb", "destination_port": 70000}"#
            ),
            "routes[1].destination_port: expected a port (0 to 65535), got 70000"
        );
        assert_eq!(
            bad(r#"{"route_id": "b", "protocol": "http", "target": "alb", "priority": 1.5}"#),
            "routes[1].priority: expected a whole number, got 1.5"
        );
        assert_eq!(
            bad(r#"{"route_id": "b", "protocol": "http", "target": "alb", "headers": {"x": 1}}"#),
            "routes[1].headers.x: expected a string, got a number"
        );
        assert_eq!(
            bad("\"web\""),
            "routes[1]: expected a route (an object), got a string"
        );
        assert_eq!(
            routes_from_json(r#"{"routes": []}"#).unwrap_err(),
            "expected a JSON array of routes, got an object"
        );
        let e = routes_from_json("[{\"route_id\": }]").unwrap_err();
        assert!(
            e.starts_with("not JSON: expected value at line 1 column"),
            "{e}"
        );
    }

    #[test]
    fn config_settings_are_checked_by_name() {
        let Lb::Config { set, validate_only } = parse(&[
            "config",
            "--set",
            "heartbeat_interval_ms=5000",
            "rebalance_threshold=30",
            "--validate-only",
        ]) else {
            panic!("not config");
        };
        let req = config_update(&set, validate_only);
        assert_eq!(
            req,
            pb::UpdateNlbConfigRequest {
                heartbeat_interval_ms: Some(5000),
                rebalance_threshold: Some(30),
                validate_only: true,
                ..Default::default()
            }
        );
        // Repeated --set works as well.
        let Lb::Config { set, .. } = parse(&[
            "config",
            "--set",
            "drain_timeout_ms=0",
            "--set",
            "can_handle_ttl_ms=100",
        ]) else {
            panic!("not config");
        };
        assert_eq!(config_update(&set, false).drain_timeout_ms, Some(0));
        assert_eq!(config_update(&set, false).can_handle_ttl_ms, Some(100));

        assert_eq!(
            parse_setting("heartbeat_ms=5").unwrap_err(),
            "unknown setting \"heartbeat_ms\"; the settings are heartbeat_interval_ms, \
             max_missed_heartbeats, drain_timeout_ms, can_handle_ttl_ms, autoscale_interval_ms, \
             rebalance_threshold"
        );
        assert_eq!(
            parse_setting("drain_timeout_ms=soon").unwrap_err(),
            "drain_timeout_ms: \"soon\" is not a whole number (0 to 4294967295)"
        );
        assert_eq!(parse_setting("x").unwrap_err(), "\"x\" is not KEY=VALUE");
        let e = parse_err(&["config", "--set", "revision=3"]);
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string()
                .contains("unknown setting \"revision\"; the settings are"),
            "{e}"
        );
        // --validate-only needs --set.
        parse_err(&["config", "--validate-only"]);
    }

    #[test]
    fn scaling_flags() {
        let Lb::Scale(ScaleArgs {
            module_type,
            trigger,
            reason,
            ..
        }) = parse(&["scale", "alb", "--to", "4", "--reason", "load test"])
        else {
            panic!("not scale");
        };
        let req = trigger_scaling(
            module_type,
            &trigger.to_trigger().unwrap(),
            &reason.unwrap_or_default(),
        );
        assert_eq!(
            req,
            pb::TriggerScalingRequest {
                module_type: pb::ModuleType::Alb as i32,
                direction: pb::ScalingDirection::Unspecified as i32,
                desired_instances: 4,
                reason: "load test".into(),
            }
        );
        let Lb::Scale(a) = parse(&["scale", "dblb", "--down"]) else {
            panic!("not scale");
        };
        let req = trigger_scaling(a.module_type, &a.trigger.to_trigger().unwrap(), "");
        assert_eq!(req.direction, pb::ScalingDirection::Down as i32);
        assert_eq!(req.desired_instances, 0);
        let Lb::Scale(a) = parse(&["scale", "dblb"]) else {
            panic!("not scale");
        };
        assert!(a.trigger.to_trigger().is_none() && !a.settings.set);

        // One action at a time; settings only with --set; --reason only with a trigger.
        parse_err(&["scale", "alb", "--up", "--down"]);
        parse_err(&["scale", "alb", "--up", "--set"]);
        parse_err(&["scale", "alb", "--min", "2"]);
        parse_err(&["scale", "alb", "--reason", "why"]);
        parse_err(&["scale", "alb", "--set", "--enable", "--disable"]);

        let Lb::Scale(a) = parse(&[
            "scale",
            "alb",
            "--set",
            "--enable",
            "--min",
            "2",
            "--max",
            "8",
            "--target-cpu",
            "60.5",
            "--target-memory",
            "75",
            "--target-connections",
            "500",
            "--up-threshold",
            "0.9",
            "--down-threshold",
            "0.2",
            "--up-cooldown-ms",
            "1000",
            "--down-cooldown-ms",
            "2000",
        ]) else {
            panic!("not scale");
        };
        let current = pb::ScalingConfig {
            module_type: pb::ModuleType::Alb as i32,
            min_instances: 1,
            max_instances: 10,
            ..Default::default()
        };
        assert_eq!(
            apply_scaling(current, &a.settings),
            pb::ScalingConfig {
                module_type: pb::ModuleType::Alb as i32,
                enabled: true,
                min_instances: 2,
                max_instances: 8,
                target_cpu_percent: 60.5,
                target_memory_percent: 75.0,
                target_connections_per_instance: 500,
                scale_up_threshold: 0.9,
                scale_down_threshold: 0.2,
                scale_up_cooldown_ms: 1000,
                scale_down_cooldown_ms: 2000,
            }
        );
        // Flags not given keep the current values.
        let Lb::Scale(a) = parse(&["scale", "alb", "--set", "--disable"]) else {
            panic!("not scale");
        };
        let on = pb::ScalingConfig {
            enabled: true,
            ..current
        };
        assert_eq!(apply_scaling(on, &a.settings), current);
    }

    #[test]
    fn other_commands_parse() {
        assert!(matches!(
            parse(&["modules", "--type", "alb", "--version", "v2", "--healthy"]),
            Lb::Modules {
                module_type: Some(ModuleType::Alb),
                ref version,
                healthy: true,
            } if version == "v2"
        ));
        assert!(matches!(
            parse(&["limits", "remove", "route:web"]),
            Lb::Limits {
                cmd: Some(LimitsCmd::Remove { .. })
            }
        ));
        assert!(matches!(parse(&["limits"]), Lb::Limits { cmd: None }));
        // A weight needs a version and stays within 0..=100.
        parse_err(&["weights", "alb", "--weight", "10"]);
        parse_err(&["weights", "alb", "--version", "v2", "--weight", "101"]);
        // Promotion steps only for a gradual promotion.
        parse_err(&["promote", "alb", "v2", "--step", "5"]);
        // --interval-ms only with --watch; --drain-timeout-ms only with --graceful.
        parse_err(&["metrics", "--interval-ms", "100"]);
        parse_err(&["unregister", "x", "--drain-timeout-ms", "100"]);
        // The connection flags go anywhere, as for the other client commands.
        let cli =
            Cli::try_parse_from(["lodge-lb", "status", "--json", "--endpoint", "h:1"]).unwrap();
        assert!(cli.conn.json);
        assert_eq!(cli.conn.endpoint, "h:1");
    }
}
