//! Routes: what a flow must look like to take a route, validated when written and compiled once
//! into a table that decisions read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::flow::{Flow, ModuleType, Protocol};

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

/// Whether a route naming `route` takes a flow carrying `flow`.
pub fn protocol_matches(route: Protocol, flow: &Flow) -> bool {
    let _ = (route, flow);
    unimplemented!("helper")
}

/// A validated route, ready to match.
#[derive(Clone, Debug)]
pub struct CompiledRoute {
    pub route: Route,
}

impl CompiledRoute {
    /// Validates `route`; errors name the field as `{field}.<name>` (e.g. `routes[2].path_pattern`).
    pub fn compile(route: Route, field: &str) -> Result<Self, String> {
        let _ = field;
        Ok(Self { route })
    }

    /// Whether `flow` takes this route.
    pub fn matches(&self, flow: &Flow) -> bool {
        let _ = flow;
        unimplemented!("helper")
    }
}

/// The routes in the order they are tried: higher priority first, then by `route_id`.
#[derive(Clone, Debug, Default)]
pub struct RoutingTable {
    routes: Vec<CompiledRoute>,
}

impl RoutingTable {
    /// Validates and orders `routes`; errors name the field (`routes[i].<name>`), and a
    /// `route_id` used twice.
    pub fn compile(routes: Vec<Route>) -> Result<Self, String> {
        let mut compiled = Vec::new();
        for (i, r) in routes.into_iter().enumerate() {
            compiled.push(CompiledRoute::compile(r, &format!("routes[{i}]"))?);
        }
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
