//! The balancer: a registry of module instances, a routing table, rate limits, blue/green traffic
//! weights and an autoscaler, kept in the replicated store, and the decision code shared by the
//! `RouteRequest` RPC and the node's L4 data plane.

pub mod decide;
pub mod flow;
pub mod instance;
pub mod limits;
pub mod model;
pub mod pattern;
pub mod probe;
pub mod route;
pub mod scaler;
pub mod score;
pub mod sniff;
pub mod traffic;
pub mod view;

pub use flow::{Flow, ModuleType, Protocol};
pub use route::{Route, RoutingTable};

/// Why a balancer request failed; one variant per gRPC code the adapter answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BalancerError {
    /// A field is missing or malformed (the message names it).
    Invalid(String),
    /// No such instance, route or limit; or no route matches a flow.
    NotFound(String),
    /// No instance can take the flow now, or the store cannot be reached; retry.
    Unavailable(String),
    /// A rate limit refused the request.
    Exhausted(String),
    /// Not possible in the current state (a rollback with nothing to return to; a stale
    /// expected revision).
    Precondition(String),
    /// Concurrent writers kept changing the record; retry.
    Aborted(String),
    /// A write whose outcome is unknown (leadership changed while it was in flight).
    Unknown(String),
}

impl std::fmt::Display for BalancerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(m)
            | Self::NotFound(m)
            | Self::Unavailable(m)
            | Self::Exhausted(m)
            | Self::Precondition(m)
            | Self::Aborted(m)
            | Self::Unknown(m) => f.write_str(m),
        }
    }
}

impl From<crate::cluster::store::StoreError> for BalancerError {
    fn from(e: crate::cluster::store::StoreError) -> Self {
        use crate::cluster::store::StoreError;
        match e {
            StoreError::Unknown(m) => Self::Unknown(m),
            e => Self::Unavailable(e.to_string()),
        }
    }
}
