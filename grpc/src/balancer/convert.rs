//! Between the wire types of `lodge.balancer.v1` and the balancer's own. Decoding checks what the
//! wire cannot (enums left unspecified, ports beyond 65535) and names the field in the error; the
//! route's own rules are checked when it is compiled.

use lodge_actors::balancer::{ModuleType, Protocol, Route};
use tonic::Status;

use crate::pb::balancer as pb;

/// The wire protocol of `p`.
pub fn protocol_to_pb(p: Protocol) -> pb::Protocol {
    match p {
        Protocol::Tcp => pb::Protocol::Tcp,
        Protocol::Udp => pb::Protocol::Udp,
        Protocol::Http => pb::Protocol::Http,
        Protocol::Https => pb::Protocol::Https,
        Protocol::Http2 => pb::Protocol::Http2,
        Protocol::Http3 => pb::Protocol::Http3,
        Protocol::Grpc => pb::Protocol::Grpc,
        Protocol::Websocket => pb::Protocol::Websocket,
        Protocol::Mysql => pb::Protocol::Mysql,
        Protocol::Postgres => pb::Protocol::Postgres,
        Protocol::Mongodb => pb::Protocol::Mongodb,
        Protocol::Redis => pb::Protocol::Redis,
        Protocol::Rtmp => pb::Protocol::Rtmp,
        Protocol::Rtmps => pb::Protocol::Rtmps,
        Protocol::Hls => pb::Protocol::Hls,
        Protocol::Dash => pb::Protocol::Dash,
    }
}

/// The protocol of wire value `v`; `None` for UNSPECIFIED or a value this build does not know.
pub fn protocol_from_pb(v: i32) -> Option<Protocol> {
    let p = pb::Protocol::try_from(v).ok()?;
    Protocol::ALL.into_iter().find(|q| protocol_to_pb(*q) == p)
}

/// The wire module type of `t`.
pub fn module_type_to_pb(t: ModuleType) -> pb::ModuleType {
    match t {
        ModuleType::Alb => pb::ModuleType::Alb,
        ModuleType::Dblb => pb::ModuleType::Dblb,
        ModuleType::Ailb => pb::ModuleType::Ailb,
        ModuleType::Rtmp => pb::ModuleType::Rtmp,
        ModuleType::Nlb => pb::ModuleType::Nlb,
    }
}

/// The module type of wire value `v`; `None` for UNSPECIFIED or an unknown value.
pub fn module_type_from_pb(v: i32) -> Option<ModuleType> {
    let t = pb::ModuleType::try_from(v).ok()?;
    ModuleType::ALL
        .into_iter()
        .find(|u| module_type_to_pb(*u) == t)
}

/// A required module type: INVALID_ARGUMENT naming `field` when unspecified or unknown.
pub fn required_module_type(v: i32, field: &str) -> Result<ModuleType, Status> {
    module_type_from_pb(v).ok_or_else(|| {
        Status::invalid_argument(format!(
            "{field}: required: one of alb, dblb, ailb, rtmp, nlb (got {v})"
        ))
    })
}

/// A port field: INVALID_ARGUMENT naming `field` beyond 65535.
pub fn port(v: u32, field: &str) -> Result<u16, Status> {
    u16::try_from(v)
        .map_err(|_| Status::invalid_argument(format!("{field}: {v} is not a port (0 to 65535)")))
}

/// A wire route as the balancer's; `field` prefixes the names in errors (`routes[2]`).
pub fn route_from_pb(r: pb::Route, field: &str) -> Result<Route, Status> {
    let protocol = protocol_from_pb(r.protocol).ok_or_else(|| {
        Status::invalid_argument(format!(
            "{field}.protocol: required: tcp, http, redis, ... (got {})",
            r.protocol
        ))
    })?;
    Ok(Route {
        route_id: r.route_id,
        protocol,
        source_pattern: r.source_pattern,
        destination_pattern: r.destination_pattern,
        source_port: port(r.source_port, &format!("{field}.source_port"))?,
        destination_port: port(r.destination_port, &format!("{field}.destination_port"))?,
        path_pattern: r.path_pattern,
        headers: r.headers.into_iter().collect(),
        priority: r.priority,
        target: required_module_type(r.target, &format!("{field}.target"))?,
    })
}

/// The wire form of `r`.
pub fn route_to_pb(r: &Route) -> pb::Route {
    pb::Route {
        route_id: r.route_id.clone(),
        protocol: protocol_to_pb(r.protocol) as i32,
        source_pattern: r.source_pattern.clone(),
        destination_pattern: r.destination_pattern.clone(),
        source_port: r.source_port.into(),
        destination_port: r.destination_port.into(),
        path_pattern: r.path_pattern.clone(),
        headers: r
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        priority: r.priority,
        target: module_type_to_pb(r.target) as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn every_protocol_and_type_survives_the_wire() {
        for p in Protocol::ALL {
            assert_eq!(protocol_from_pb(protocol_to_pb(p) as i32), Some(p));
        }
        for t in ModuleType::ALL {
            assert_eq!(module_type_from_pb(module_type_to_pb(t) as i32), Some(t));
        }
        assert_eq!(protocol_from_pb(0), None);
        assert_eq!(module_type_from_pb(0), None);
        assert_eq!(protocol_from_pb(999), None);
    }

    #[test]
    fn routes_round_trip_and_bad_fields_are_named() {
        let wire = pb::Route {
            route_id: "web".into(),
            protocol: pb::Protocol::Http as i32,
            destination_port: 8080,
            path_pattern: "/api/*".into(),
            headers: [("x-tenant".to_string(), "a*".to_string())].into(),
            priority: 7,
            target: pb::ModuleType::Alb as i32,
            ..Default::default()
        };
        let r = route_from_pb(wire.clone(), "routes[0]").unwrap();
        assert_eq!(r.destination_port, 8080);
        assert_eq!(route_to_pb(&r), wire);

        let e = route_from_pb(
            pb::Route {
                protocol: 0,
                ..wire.clone()
            },
            "routes[1]",
        )
        .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message().starts_with("routes[1].protocol: required"),
            "{}",
            e.message()
        );

        let e = route_from_pb(
            pb::Route {
                source_port: 70000,
                ..wire.clone()
            },
            "routes[2]",
        )
        .unwrap_err();
        assert!(
            e.message().starts_with("routes[2].source_port: 70000"),
            "{}",
            e.message()
        );

        let e = route_from_pb(pb::Route { target: 0, ..wire }, "route").unwrap_err();
        assert!(
            e.message().starts_with("route.target: required"),
            "{}",
            e.message()
        );
    }
}
