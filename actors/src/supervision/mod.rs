//! Supervision: what actix lacks and OTP taught.
//!
//! A [`Supervisor`] is an actor that starts its children in order, watches them, restarts them by a
//! [`Strategy`] with exponential [`Backoff`], gives up after a [`RestartLimit`] (failing to its own
//! parent; at the root the node exits non-zero), and stops them in reverse order with a timeout
//! each. Children are described by [`ChildSpec`]s; any actor implementing [`Managed`] can be one.

mod control;
mod policy;
mod spec;
mod supervisor;

pub use control::Exit;
pub(crate) use control::{install_panic_hook, ControlItem, ExitNotify};
pub use policy::{Backoff, Restart, RestartLimit, Strategy};
pub use spec::{ChildSpec, Managed, Placement, SupervisorSpec};
pub use supervisor::{AddChild, ChildError, RestartChild, StopChild, Supervisor};

#[cfg(test)]
mod tests;
