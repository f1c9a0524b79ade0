//! The session router: a user and an agent meet on a session key and the router forwards frames
//! between them (OSMO's rendezvous router, completed).
//!
//! ```text
//! /node/router             one_for_all
//! ├── /node/router/sessions   one_for_one; /node/router/sessions/<key>, one per session (temporary)
//! └── /node/router/hub        the session table, owner records, agents' listen streams
//! ```
//!
//! Actors hold the control plane: who may join, pairing, timeouts, termination. The data plane is
//! two pumps per session ([`pipe`]) running on the gRPC runtime, each moving one direction's frames
//! from a side's request stream into the other side's bounded queue; nothing on the data path
//! goes through a mailbox. The frame type is the transport's (a parameter, [`Payload`]), so the
//! router forwards a frame as it arrived.

pub mod hub;
pub mod metrics;
pub mod owner;
pub mod owner_store;
pub mod pipe;
pub mod session;
#[cfg(test)]
mod tests;

pub use hub::{Route, RouterHub};
pub use metrics::RouterMetrics;
pub use owner::{OwnerRecord, OwnerStore};
pub use pipe::{Delivery, Payload, SessionLink};
pub use session::SessionActor;

use std::time::Duration;

/// What the router does for a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpKind {
    Exec,
    PortForward,
    Rsync,
}

impl OpKind {
    /// The name used in metrics, offers and the control service.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exec => "exec",
            Self::PortForward => "port-forward",
            Self::Rsync => "rsync",
        }
    }
}

/// A user's request, as the router keeps it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Operation {
    pub kind: OpKind,
    /// For people: "tcp:8080", the command line.
    pub detail: String,
}

/// Which end of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    User,
    Agent,
}

impl Side {
    /// "user" or "agent".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Agent => "agent",
        }
    }

    /// The other end.
    pub fn other(self) -> Self {
        match self {
            Self::User => Self::Agent,
            Self::Agent => Self::User,
        }
    }
}

/// Why a session, or a request about one, failed. Each maps to one gRPC code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouterError {
    /// A field is missing or malformed (INVALID_ARGUMENT).
    Invalid(String),
    /// The joiner's workflow differs from the session's (PERMISSION_DENIED).
    WrongWorkflow(String),
    /// That side of the session is already connected (ALREADY_EXISTS).
    Duplicate(String),
    /// No such session (NOT_FOUND).
    NotFound(String),
    /// No peer within the rendezvous timeout, or the session idled out (DEADLINE_EXCEEDED).
    TimedOut(String),
    /// Ended by an operator (ABORTED).
    Terminated(String),
    /// A reader stopped reading past the stall timeout (RESOURCE_EXHAUSTED).
    Stalled(String),
    /// The other side's connection broke, or the router cannot serve now (UNAVAILABLE).
    Unavailable(String),
    /// A bug or an actor failure (INTERNAL).
    Internal(String),
}

impl RouterError {
    /// A short label for metrics: the gRPC code's name.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "invalid_argument",
            Self::WrongWorkflow(_) => "permission_denied",
            Self::Duplicate(_) => "already_exists",
            Self::NotFound(_) => "not_found",
            Self::TimedOut(_) => "deadline_exceeded",
            Self::Terminated(_) => "aborted",
            Self::Stalled(_) => "resource_exhausted",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }
}

impl std::fmt::Display for RouterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(m)
            | Self::WrongWorkflow(m)
            | Self::Duplicate(m)
            | Self::NotFound(m)
            | Self::TimedOut(m)
            | Self::Terminated(m)
            | Self::Stalled(m)
            | Self::Unavailable(m)
            | Self::Internal(m) => f.write_str(m),
        }
    }
}

impl From<crate::SendError> for RouterError {
    fn from(e: crate::SendError) -> Self {
        Self::Unavailable(format!("router: {e}; retry"))
    }
}

/// Longest session key or workflow id, in bytes (as in the original).
pub const MAX_ID_BYTES: usize = 256;

/// Checks a session key or workflow id: present and at most [`MAX_ID_BYTES`].
pub fn check_id(field: &str, value: &str) -> Result<(), RouterError> {
    if value.is_empty() {
        return Err(RouterError::Invalid(format!("{field}: required")));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(RouterError::Invalid(format!(
            "{field}: {} bytes, at most {MAX_ID_BYTES}",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(RouterError::Invalid(format!(
            "{field}: control characters are not allowed"
        )));
    }
    Ok(())
}

/// The actor name of a session: its key with `/` and `%` escaped, so that any key is one path
/// segment.
pub fn actor_name(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for c in key.chars() {
        match c {
            '/' => out.push_str("%2F"),
            '%' => out.push_str("%25"),
            c => out.push(c),
        }
    }
    out
}

/// The `[router]` settings.
#[derive(Clone, Debug)]
pub struct RouterSettings {
    /// This member's raft id.
    pub member_id: u64,
    /// How long the first side waits for the other.
    pub rendezvous_timeout: Duration,
    /// A paired session with no frame either way for this long ends.
    pub idle_timeout: Duration,
    /// A frame that cannot be queued to its reader for this long ends the session.
    pub stall_timeout: Duration,
    /// Frames queued per direction.
    pub queue_frames: usize,
    /// TTL of the lease under which this member's owner records live.
    pub owner_lease_ttl: Duration,
    /// Bound on a store write (claims, record deletes).
    pub request_timeout: Duration,
}

impl Default for RouterSettings {
    fn default() -> Self {
        Self {
            member_id: 1,
            rendezvous_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(30 * 60),
            stall_timeout: Duration::from_secs(30),
            queue_frames: 16,
            owner_lease_ttl: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// `handles!` for the router's actors, which are generic over the frame type.
macro_rules! handles_generic {
    ($actor:ident: $($msg:ty),+ $(,)?) => {$(
        impl<T: $crate::router::Payload> actix::Handler<$crate::Envelope<$msg>> for $actor<T> {
            type Result = <$actor<T> as actix::Handler<$msg>>::Result;
            fn handle(
                &mut self,
                envelope: $crate::Envelope<$msg>,
                ctx: &mut actix::Context<Self>,
            ) -> Self::Result {
                let (msg, _probe) = envelope.open();
                <$actor<T> as actix::Handler<$msg>>::handle(self, msg, ctx)
            }
        }
    )+};
}
pub(crate) use handles_generic;

#[cfg(test)]
mod check_tests {
    use super::*;

    #[test]
    fn ids_are_checked_by_length_and_presence() {
        assert!(check_id("session_key", "s-1").is_ok());
        assert_eq!(
            check_id("session_key", ""),
            Err(RouterError::Invalid("session_key: required".into()))
        );
        let long = "k".repeat(257);
        assert!(
            matches!(check_id("workflow_id", &long), Err(RouterError::Invalid(m)) if m.starts_with("workflow_id: 257 bytes"))
        );
        assert!(check_id("workflow_id", &"k".repeat(256)).is_ok());
    }

    #[test]
    fn any_key_is_one_path_segment() {
        assert_eq!(actor_name("a/b%c"), "a%2Fb%25c");
        assert_eq!(actor_name("plain-key"), "plain-key");
    }
}
