//! Routes: what a flow must look like to take a route, validated when written and compiled once
//! into a table that decisions read.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::flow::{Flow, ModuleType, Protocol};
use super::pattern::{path_without_query, AddrPattern, HeaderPattern, PathPattern};
use crate::quote::echo;

/// A route as stored (JSON) and as the RPCs carry it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Unique in the table: 1..=128 characters of `[A-Za-z0-9._-]`.
    pub route_id: String,
    /// What the flow must carry (see [`protocol_matches`]).
    pub protocol: Protocol,
    /// "" or "*": any; an IP address, a CIDR block or a domain glob (`*.example.com`).
    #[serde(default)]
    pub source_pattern: String,
    /// As `source_pattern`, matched against the flow's destination.
    #[serde(default)]
    pub destination_pattern: String,
    /// 0: any.
    #[serde(default)]
    pub source_port: u16,
    /// 0: any.
    #[serde(default)]
    pub destination_port: u16,
    /// "": any; otherwise a glob (`*`, `?`) starting with `/` or `*`, matched against the path.
    #[serde(default)]
    pub path_pattern: String,
    /// Header name (case-insensitive) → value glob; every one must match.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Higher first; equal priorities in `route_id` order.
    #[serde(default)]
    pub priority: i32,
    /// The kind of module that serves the route.
    pub target: ModuleType,
}

/// The longest `route_id`.
pub const MAX_ROUTE_ID_LEN: usize = 128;

/// Whether `path` (its query ignored) ends in one of `exts` (ASCII case ignored).
fn path_has_extension(path: &str, exts: &[&str]) -> bool {
    let path = path_without_query(path).as_bytes();
    exts.iter().any(|ext| {
        let ext = ext.as_bytes();
        path.len() >= ext.len() && path[path.len() - ext.len()..].eq_ignore_ascii_case(ext)
    })
}

/// Whether a route naming `route` takes a flow carrying `flow`:
///
/// | route                | flows it takes                                                  |
/// |----------------------|-----------------------------------------------------------------|
/// | `tcp`                | every protocol carried over TCP: all but `udp` and `http3`      |
/// | `udp`                | `udp`, `http3`                                                  |
/// | `http`               | `http`, `websocket`, `hls`, `dash` (all HTTP/1)                 |
/// | `http2`, `grpc`      | `http2`, `grpc` (the data plane cannot tell gRPC from other cleartext HTTP/2) |
/// | `hls`                | `hls`; `http` whose path (query ignored) ends in `.m3u8` or `.ts` |
/// | `dash`               | `dash`; `http` whose path (query ignored) ends in `.mpd` or `.m4s` |
/// | `websocket`          | `websocket`                                                     |
/// | `https`              | `https`                                                         |
/// | any other            | the same protocol                                               |
///
/// Path extensions are compared ignoring ASCII case (`/LIVE.M3U8` is HLS).
pub fn protocol_matches(route: Protocol, flow: &Flow) -> bool {
    use Protocol::*;
    let f = flow.protocol;
    match route {
        Tcp => !matches!(f, Udp | Http3),
        Udp => matches!(f, Udp | Http3),
        Http => matches!(f, Http | Websocket | Hls | Dash),
        Http2 | Grpc => matches!(f, Http2 | Grpc),
        Hls => f == Hls || (f == Http && path_has_extension(&flow.path, &[".m3u8", ".ts"])),
        Dash => f == Dash || (f == Http && path_has_extension(&flow.path, &[".mpd", ".m4s"])),
        _ => route == f,
    }
}

/// Checks the `route_id` rule: 1..=128 characters of `[A-Za-z0-9._-]`.
pub fn validate_route_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("empty; use 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', '-'".into());
    }
    if let Some(c) = id
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{} has invalid character {c:?}; use only A-Z, a-z, 0-9, '.', '_', '-'",
            echo(id)
        ));
    }
    // ASCII only from here on.
    if id.len() > MAX_ROUTE_ID_LEN {
        return Err(format!(
            "{} characters; the limit is {MAX_ROUTE_ID_LEN}",
            id.len()
        ));
    }
    Ok(())
}

/// A validated route, ready to match.
#[derive(Clone, Debug)]
pub struct CompiledRoute {
    pub route: Route,
    source: AddrPattern,
    destination: AddrPattern,
    path: PathPattern,
    /// In name order, names in lower case.
    headers: Vec<HeaderPattern>,
}

impl CompiledRoute {
    /// Validates `route`; errors name the field as `{field}.<name>` (e.g. `routes[2].path_pattern`).
    ///
    /// Errors look like `{field}.source_pattern: "10.0.0.0/33" is not an IP, CIDR or domain glob:
    /// prefix length 33 exceeds 32 for IPv4` or `{field}.headers["X Bad"]: invalid character ' '
    /// in the name (names are RFC 7230 tokens)`. Header names given twice in different case
    /// (`X-A` and `x-a`) are an error. Whether `target` serves `protocol` is not checked (a
    /// module may serve other protocols than its type's defaults).
    pub fn compile(route: Route, field: &str) -> Result<Self, String> {
        validate_route_id(&route.route_id).map_err(|e| format!("{field}.route_id: {e}"))?;
        let addr = |name: &str, s: &str| {
            AddrPattern::parse(s).map_err(|e| {
                format!(
                    "{field}.{name}: {} is not an IP, CIDR or domain glob: {e}",
                    echo(s)
                )
            })
        };
        let source = addr("source_pattern", &route.source_pattern)?;
        let destination = addr("destination_pattern", &route.destination_pattern)?;
        let path = PathPattern::parse(&route.path_pattern).map_err(|e| {
            format!(
                "{field}.path_pattern: {} is not a path glob: {e}",
                echo(&route.path_pattern)
            )
        })?;
        let mut headers: Vec<HeaderPattern> = Vec::with_capacity(route.headers.len());
        let mut given: HashMap<String, &str> = HashMap::new();
        for (name, value) in &route.headers {
            let shown = echo(name);
            let h = HeaderPattern::parse(name, value)
                .map_err(|e| format!("{field}.headers[{shown}]: {e}"))?;
            if let Some(other) = given.insert(h.name().to_owned(), name) {
                return Err(format!(
                    "{field}.headers[{shown}]: the same header as {} (names ignore case)",
                    echo(other)
                ));
            }
            headers.push(h);
        }
        headers.sort_by(|a, b| a.name().cmp(b.name()));
        Ok(Self {
            route,
            source,
            destination,
            path,
            headers,
        })
    }

    /// The compiled `source_pattern`.
    pub fn source_pattern(&self) -> &AddrPattern {
        &self.source
    }

    /// The compiled `destination_pattern`.
    pub fn destination_pattern(&self) -> &AddrPattern {
        &self.destination
    }

    /// The compiled `path_pattern`.
    pub fn path_pattern(&self) -> &PathPattern {
        &self.path
    }

    /// The compiled header rules, by lower-case name.
    pub fn header_patterns(&self) -> &[HeaderPattern] {
        &self.headers
    }

    /// Whether `flow` takes this route: its protocol (see [`protocol_matches`]), source and
    /// destination (see [`AddrPattern::matches`]), ports (a route port of 0 takes any port; any
    /// other takes only that port, so never a flow port of 0, "not known"), path (see
    /// [`PathPattern::matches`]) and every header rule (see [`HeaderPattern::matches`]; a
    /// missing header never matches).
    pub fn matches(&self, flow: &Flow) -> bool {
        let port = |route: u16, flow: u16| route == 0 || route == flow;
        protocol_matches(self.route.protocol, flow)
            && port(self.route.source_port, flow.source_port)
            && port(self.route.destination_port, flow.destination_port)
            && self.source.matches(&flow.source)
            && self.destination.matches(&flow.destination)
            && self.path.matches(&flow.path)
            && self.headers.iter().all(|h| h.matches(&flow.headers))
    }
}

/// The routes in the order they are tried: higher priority first, then by `route_id`.
#[derive(Clone, Debug, Default)]
pub struct RoutingTable {
    routes: Vec<CompiledRoute>,
}

impl RoutingTable {
    /// Validates and orders `routes`; errors name the field (`routes[i].<name>`), and a
    /// `route_id` used twice (`routes[3].route_id: "web" is used by routes[0]`; ids are
    /// case-sensitive). The first error in input order is returned.
    pub fn compile(routes: Vec<Route>) -> Result<Self, String> {
        let mut compiled = Vec::with_capacity(routes.len());
        let mut seen: HashMap<String, usize> = HashMap::with_capacity(routes.len());
        for (i, r) in routes.into_iter().enumerate() {
            let field = format!("routes[{i}]");
            let c = CompiledRoute::compile(r, &field)?;
            if let Some(first) = seen.insert(c.route.route_id.clone(), i) {
                return Err(format!(
                    "{field}.route_id: {} is used by routes[{first}]",
                    echo(&c.route.route_id)
                ));
            }
            compiled.push(c);
        }
        compiled.sort_by(|a, b| {
            b.route
                .priority
                .cmp(&a.route.priority)
                .then_with(|| a.route.route_id.cmp(&b.route.route_id))
        });
        Ok(Self { routes: compiled })
    }

    /// Every route, in the order they are tried.
    pub fn routes(&self) -> &[CompiledRoute] {
        &self.routes
    }

    /// The route with this id.
    pub fn get(&self, route_id: &str) -> Option<&CompiledRoute> {
        self.routes.iter().find(|r| r.route.route_id == route_id)
    }

    /// The routes `flow` takes, in the order they are tried.
    pub fn matching<'a>(&'a self, flow: &'a Flow) -> impl Iterator<Item = &'a CompiledRoute> + 'a {
        self.routes.iter().filter(move |r| r.matches(flow))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(id: &str, protocol: Protocol) -> Route {
        Route {
            route_id: id.to_owned(),
            protocol,
            source_pattern: String::new(),
            destination_pattern: String::new(),
            source_port: 0,
            destination_port: 0,
            path_pattern: String::new(),
            headers: BTreeMap::new(),
            priority: 0,
            target: ModuleType::Alb,
        }
    }

    fn flow(protocol: Protocol) -> Flow {
        Flow {
            protocol,
            source: "192.0.2.10".into(),
            source_port: 40000,
            destination: "api.example.com".into(),
            destination_port: 443,
            path: "/v1/items?page=2".into(),
            headers: [("x-tenant".to_owned(), "acme".to_owned())].into(),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn ids(routes: &[&CompiledRoute]) -> Vec<String> {
        routes.iter().map(|r| r.route.route_id.clone()).collect()
    }

    #[test]
    fn compile_errors_name_the_field() {
        type Edit = fn(&mut Route);
        let cases: &[(Edit, &str)] = &[
            (
                |r| r.route_id = String::new(),
                "r.route_id: empty; use 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', '-'",
            ),
            (
                |r| r.route_id = "web app".into(),
                "r.route_id: \"web app\" has invalid character ' '; use only A-Z, a-z, 0-9, '.', '_', '-'",
            ),
            (
                |r| r.route_id = "wéb".into(),
                "r.route_id: \"wéb\" has invalid character 'é'; use only A-Z, a-z, 0-9, '.', '_', '-'",
            ),
            (
                |r| r.route_id = "a".repeat(129),
                "r.route_id: 129 characters; the limit is 128",
            ),
            (
                |r| r.source_pattern = "10.0.0.0/33".into(),
                "r.source_pattern: \"10.0.0.0/33\" is not an IP, CIDR or domain glob: prefix length 33 exceeds 32 for IPv4",
            ),
            (
                |r| r.destination_pattern = "a..example.com".into(),
                "r.destination_pattern: \"a..example.com\" is not an IP, CIDR or domain glob: empty label (leading, trailing or double dot)",
            ),
            (
                |r| r.destination_pattern = "example.com:443".into(),
                "r.destination_pattern: \"example.com:443\" is not an IP, CIDR or domain glob: ':' is not allowed (ports are set separately)",
            ),
            (
                |r| r.path_pattern = "api/*".into(),
                "r.path_pattern: \"api/*\" is not a path glob: must start with '/' or '*'",
            ),
            (
                |r| r.path_pattern = "/a b".into(),
                "r.path_pattern: \"/a b\" is not a path glob: invalid character ' '",
            ),
            (
                |r| r.headers = headers(&[("X Bad", "1")]),
                "r.headers[\"X Bad\"]: invalid character ' ' in the name (names are RFC 7230 tokens)",
            ),
            (
                |r| r.headers = headers(&[("x-a", "1\n")]),
                "r.headers[\"x-a\"]: invalid character '\\n' in the value glob",
            ),
            (
                |r| r.headers = headers(&[("X-A", "1"), ("x-a", "2")]),
                "r.headers[\"x-a\"]: the same header as \"X-A\" (names ignore case)",
            ),
        ];
        for (edit, want) in cases {
            let mut r = route("web", Protocol::Http);
            edit(&mut r);
            assert_eq!(
                CompiledRoute::compile(r, "r").map(|_| ()),
                Err((*want).to_owned())
            );
        }
    }

    #[test]
    fn compile_accepts_valid_routes() {
        let mut r = route(&format!("A-z_0.{}", "9".repeat(122)), Protocol::Grpc);
        assert_eq!(r.route_id.len(), 128);
        r.source_pattern = "10.1.2.3/8".into();
        r.destination_pattern = "*.Example.com".into();
        r.path_pattern = "/api/*".into();
        r.headers = headers(&[("X-Tenant", "acme-*"), ("accept", "*")]);
        let c = CompiledRoute::compile(r.clone(), "r").unwrap();
        assert_eq!(c.route, r);
        assert_eq!(c.source_pattern().to_string(), "10.0.0.0/8");
        assert_eq!(c.destination_pattern().to_string(), "*.example.com");
        assert_eq!(c.path_pattern().as_str(), "/api/*");
        let names: Vec<&str> = c.header_patterns().iter().map(|h| h.name()).collect();
        assert_eq!(names, ["accept", "x-tenant"]);
    }

    #[test]
    fn table_errors_name_the_route() {
        let mut bad = route("b", Protocol::Http);
        bad.path_pattern = "x".into();
        assert_eq!(
            RoutingTable::compile(vec![route("a", Protocol::Http), bad]).map(|_| ()),
            Err(
                "routes[1].path_pattern: \"x\" is not a path glob: must start with '/' or '*'"
                    .into()
            )
        );
        let dup = vec![
            route("web", Protocol::Http),
            route("db", Protocol::Mysql),
            route("Web", Protocol::Http), // ids are case-sensitive
            route("web", Protocol::Https),
            route("db", Protocol::Mysql),
        ];
        assert_eq!(
            RoutingTable::compile(dup).map(|_| ()),
            Err("routes[3].route_id: \"web\" is used by routes[0]".into())
        );
    }

    #[test]
    fn table_order_is_priority_then_id() {
        let mk = |id: &str, priority: i32, path: &str| {
            let mut r = route(id, Protocol::Http);
            r.priority = priority;
            r.path_pattern = path.into();
            r
        };
        let table = RoutingTable::compile(vec![
            mk("m", 0, "/v1/*"),
            mk("b", 10, "/v1/*"),
            mk("z", 10, ""),
            mk("a", 10, "/v2/*"),
            mk("neg", -5, ""),
            mk("c", 0, ""),
            mk("top", 100, "/admin/*"),
        ])
        .unwrap();
        let all: Vec<&CompiledRoute> = table.routes().iter().collect();
        assert_eq!(ids(&all), ["top", "a", "b", "z", "c", "m", "neg"]);
        let f = Flow {
            protocol: Protocol::Http,
            path: "/v1/x".into(),
            ..Flow::default()
        };
        let hits: Vec<&CompiledRoute> = table.matching(&f).collect();
        assert_eq!(ids(&hits), ["b", "z", "c", "m", "neg"]);
        assert_eq!(table.get("z").map(|r| r.route.priority), Some(10));
        assert!(table.get("Z").is_none());
        // The same routes in another input order give the same table.
        let mut reversed: Vec<Route> = table.routes().iter().map(|r| r.route.clone()).collect();
        reversed.reverse();
        let again = RoutingTable::compile(reversed).unwrap();
        let again: Vec<&CompiledRoute> = again.routes().iter().collect();
        assert_eq!(ids(&again), ["top", "a", "b", "z", "c", "m", "neg"]);
    }

    #[test]
    fn ports() {
        // (route source port, route destination port, flow source port, flow destination port, matches)
        let cases = [
            (0, 0, 0, 0, true),
            (0, 0, 1234, 443, true),
            (0, 443, 1234, 443, true),
            (0, 443, 1234, 80, false),
            (0, 443, 1234, 0, false), // a flow port not known never matches a specific port
            (1234, 0, 1234, 443, true),
            (1234, 0, 1235, 443, false),
            (1234, 0, 0, 443, false),
            (1234, 443, 1234, 443, true),
            (1234, 443, 443, 1234, false),
        ];
        for (rs, rd, fs, fd, want) in cases {
            let mut r = route("p", Protocol::Tcp);
            r.source_port = rs;
            r.destination_port = rd;
            let c = CompiledRoute::compile(r, "r").unwrap();
            let f = Flow {
                source_port: fs,
                destination_port: fd,
                ..Flow::default()
            };
            assert_eq!(c.matches(&f), want, "route {rs}/{rd}, flow {fs}/{fd}");
        }
    }

    #[test]
    fn header_rules() {
        // (route header rules, flow headers (lower-case names), matches)
        type Pairs = &'static [(&'static str, &'static str)];
        let cases: &[(Pairs, Pairs, bool)] = &[
            (&[], &[], true),
            (&[], &[("x-a", "1")], true),
            (&[("X-Tenant", "acme")], &[("x-tenant", "acme")], true),
            (&[("X-TENANT", "ac*")], &[("x-tenant", "acme")], true),
            (&[("x-tenant", "ACME")], &[("x-tenant", "acme")], false),
            (&[("x-tenant", "*")], &[], false),
            (&[("x-tenant", "*")], &[("x-tenant", "")], true),
            (
                &[("X-Tenant", "acme"), ("Accept", "application/*")],
                &[("x-tenant", "acme"), ("accept", "application/json")],
                true,
            ),
            (
                &[("X-Tenant", "acme"), ("Accept", "application/*")],
                &[("x-tenant", "acme"), ("accept", "text/html")],
                false,
            ),
            (
                &[("X-Tenant", "acme"), ("Accept", "application/*")],
                &[("x-tenant", "acme")],
                false,
            ),
        ];
        for (rules, have, want) in cases {
            let mut r = route("h", Protocol::Http);
            r.headers = headers(rules);
            let c = CompiledRoute::compile(r, "r").unwrap();
            let f = Flow {
                protocol: Protocol::Http,
                headers: headers(have),
                ..Flow::default()
            };
            assert_eq!(c.matches(&f), *want, "{rules:?} vs {have:?}");
        }
    }

    #[test]
    fn every_field_must_match() {
        type Edit = fn(&mut Route);
        // (edit of a route that matches `flow(Http)`, still matches)
        let cases: &[(Edit, bool)] = &[
            (|_| {}, true),
            (|r| r.source_pattern = "192.0.2.0/24".into(), true),
            (|r| r.source_pattern = "::ffff:192.0.2.10".into(), true),
            (|r| r.source_pattern = "198.51.100.0/24".into(), false),
            (|r| r.source_pattern = "*.example.com".into(), false),
            (|r| r.destination_pattern = "*.EXAMPLE.com".into(), true),
            (|r| r.destination_pattern = "api.example.com".into(), true),
            (|r| r.destination_pattern = "example.com".into(), false),
            (|r| r.destination_pattern = "0.0.0.0/0".into(), false),
            (|r| r.destination_port = 443, true),
            (|r| r.destination_port = 80, false),
            (|r| r.source_port = 40000, true),
            (|r| r.source_port = 40001, false),
            (|r| r.path_pattern = "/v1/*".into(), true),
            (|r| r.path_pattern = "/v1/items".into(), true), // the query is ignored
            (|r| r.path_pattern = "/v2/*".into(), false),
            (|r| r.headers = headers(&[("X-Tenant", "acme")]), true),
            (|r| r.headers = headers(&[("X-Tenant", "other")]), false),
            (|r| r.protocol = Protocol::Tcp, true),
            (|r| r.protocol = Protocol::Https, false),
        ];
        for (i, (edit, want)) in cases.iter().enumerate() {
            let mut r = route("all", Protocol::Http);
            edit(&mut r);
            let c = CompiledRoute::compile(r, "r").unwrap();
            assert_eq!(c.matches(&flow(Protocol::Http)), *want, "case {i}");
        }
    }

    #[test]
    fn protocol_matrix() {
        use Protocol::*;
        // Route protocol → the flow protocols it takes (flows with the path "/index.html").
        let table: [(Protocol, &[Protocol]); 16] = [
            (
                Tcp,
                &[
                    Tcp, Http, Https, Http2, Grpc, Websocket, Mysql, Postgres, Mongodb, Redis,
                    Rtmp, Rtmps, Hls, Dash,
                ],
            ),
            (Udp, &[Udp, Http3]),
            (Http, &[Http, Websocket, Hls, Dash]),
            (Https, &[Https]),
            (Http2, &[Http2, Grpc]),
            (Http3, &[Http3]),
            (Grpc, &[Http2, Grpc]),
            (Websocket, &[Websocket]),
            (Mysql, &[Mysql]),
            (Postgres, &[Postgres]),
            (Mongodb, &[Mongodb]),
            (Redis, &[Redis]),
            (Rtmp, &[Rtmp]),
            (Rtmps, &[Rtmps]),
            (Hls, &[Hls]),
            (Dash, &[Dash]),
        ];
        for (route, takes) in table {
            for f in Protocol::ALL {
                let fl = Flow {
                    protocol: f,
                    path: "/index.html".into(),
                    ..Flow::default()
                };
                assert_eq!(
                    protocol_matches(route, &fl),
                    takes.contains(&f),
                    "route {route}, flow {f}"
                );
            }
        }
        // HLS and DASH recognised by the path of a plain HTTP flow.
        // (route, flow protocol, path, matches)
        let paths = [
            (Hls, Http, "/live/index.m3u8", true),
            (Hls, Http, "/live/INDEX.M3U8?token=x", true),
            (Hls, Http, "/live/seg1.ts", true),
            (Hls, Http, "/live/seg1.ts/", false),
            (Hls, Http, "/live/index.m3u8x", false),
            (Hls, Http, "/m3u8", false),
            (Hls, Http, "/live?f=a.m3u8", false),
            (Hls, Https, "/live/index.m3u8", false),
            (Hls, Http2, "/live/index.m3u8", false),
            (Hls, Websocket, "/live/index.m3u8", false),
            (Hls, Http, "/manifest.mpd", false),
            (Dash, Http, "/manifest.mpd", true),
            (Dash, Http, "/chunk-1.m4s?x=1", true),
            (Dash, Http, "/manifest.MPD", true),
            (Dash, Http, "/live/index.m3u8", false),
            (Dash, Https, "/manifest.mpd", false),
            (Dash, Http, "", false),
            (Hls, Http, "", false),
        ];
        for (route, f, path, want) in paths {
            let fl = Flow {
                protocol: f,
                path: path.into(),
                ..Flow::default()
            };
            assert_eq!(
                protocol_matches(route, &fl),
                want,
                "route {route}, flow {f} {path:?}"
            );
        }
    }
}
