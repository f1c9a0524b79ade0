//! Lodge's actor layer: OTP-style supervision and per-actor introspection on top of actix.
//!
//! actix gives mailboxes and arbiters but restarts nothing when a handler panics, has no restart
//! strategies or limits, and cannot say how long a mailbox is. This crate adds those:
//!
//! - [`supervision`]: supervisors with one_for_one / one_for_all / rest_for_one strategies, restart
//!   limits that escalate to the parent, exponential backoff with jitter, ordered start and
//!   reverse-ordered stop with a timeout per child. A panic counts as a failure.
//! - [`introspect`]: every actor has an [`ActorCell`] in an [`ActorTable`] keyed by its path
//!   (`/node/...`) with lifecycle state, queue length, message counts, restarts, last failure and
//!   handler latency, plus a JSON state dump on request.
//! - [`ActorRef`] and [`Envelope`]: how messages reach a Lodge actor. The reference survives restarts
//!   and the envelope does the bookkeeping, so business handlers stay plain actix handlers.
//! - [`runtime`]: arbiters, the root supervisor and orderly shutdown; [`admin`]: the actor behind
//!   the admin RPC.

pub mod admin;
pub mod balancer;
pub mod base64;
pub mod clock;
pub mod cluster;
pub mod envelope;
pub mod introspect;
pub mod quote;
pub mod redact;
pub mod registry;
pub mod router;
pub mod runtime;
pub mod supervision;
pub mod translate;
pub mod workflow;

pub use actix;
pub use envelope::{ActorRef, Envelope, SendError};
pub use introspect::{ActorCell, ActorEvent, ActorSnapshot, ActorTable, EventKind, Lifecycle};
pub use runtime::{Runtime, RuntimeConfig};
pub use supervision::{
    Backoff, ChildSpec, Managed, Placement, Restart, RestartLimit, Strategy, Supervisor,
    SupervisorSpec,
};
