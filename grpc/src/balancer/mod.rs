//! The balancer's adapters: the `lodge.balancer.v1.Balancer` service and its store.

pub mod convert;
