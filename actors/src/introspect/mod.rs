//! Introspection: what the admin RPC shows about every actor.
//!
//! Each actor owns an [`ActorCell`] of atomics that its envelope updates as messages are handled;
//! the [`Registry`] maps paths to cells and answers list / get / tree queries by reading them. Nothing
//! is computed until somebody asks.

mod cell;
mod histogram;
mod registry;

pub use cell::{ActorCell, Failure, Lifecycle};
pub use histogram::LatencyHistogram;
pub use registry::{
    ActorEvent, ActorSnapshot, EventKind, KindTotals, ListQuery, Registry, SortKey, TreeNode,
};
