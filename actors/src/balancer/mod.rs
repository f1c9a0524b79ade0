//! The balancer: a registry of module instances, a routing table, rate limits, blue/green traffic
//! weights and an autoscaler, kept in the replicated store, and the decision code shared by the
//! `RouteRequest` RPC and the node's L4 data plane.

pub mod flow;
pub mod pattern;
pub mod route;
pub mod scaler;
pub mod score;
pub mod sniff;
pub mod traffic;

pub use flow::{Flow, ModuleType, Protocol};
pub use route::{Route, RoutingTable};
