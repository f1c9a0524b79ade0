//! The balancer's adapters: the `lodge.balancer.v1.Balancer` service, the wire forms of its
//! records, and the probe that asks module instances over gRPC.

pub mod convert;
pub mod probe;
pub mod service;
pub mod wire;
