//! Introspection: what the admin RPC shows about every actor.
//!
//! Each actor owns an [`ActorCell`] of atomics that its envelope updates as messages are handled;
//! the [`ActorTable`] maps paths to cells and answers list / get / tree queries by reading them. Nothing
//! is computed until somebody asks.

mod cell;
mod histogram;
mod table;

pub use cell::{ActorCell, Failure, Lifecycle};
pub use histogram::LatencyHistogram;
pub use table::{
    ActorEvent, ActorSnapshot, ActorTable, EventKind, KindTotals, ListQuery, SortKey, TreeNode,
};
