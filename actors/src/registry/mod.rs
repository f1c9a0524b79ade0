//! The client registry: registrations kept in the replicated store under leases, one actor per
//! registration on every member, and the per-client limits of the translation gateway.
//!
//! ```text
//! /node/registry              one_for_all: the index rebuilds the client actors after a failure
//! ├── /node/registry/clients  one_for_one; /node/registry/clients/<client_id>
//! └── /node/registry/index    loads and watches the registrations, writes them, routes calls
//! ```

pub mod client;
pub mod index;
pub mod metrics;
pub mod record;

use crate::cluster::raft::RaftError;

pub use client::{BeatAnswer, ClientActor, ClientView, JobPermit, LeaseKeeper, RegistrySettings};
pub use index::{Registered, RegistryHandle, RegistryIndex};
pub use metrics::RegistryMetrics;
pub use record::{RegisterRequest, Registration};

/// Why a registry request failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryError {
    /// A field is missing or malformed (the message names it).
    Invalid(String),
    /// No such registration.
    NotFound(String),
    /// A limit refused the request.
    Exhausted(String),
    /// Cannot be served right now; retry.
    Unavailable(String),
    /// The caller may not touch this registration (another identity made it).
    Denied(String),
    /// The replicated store failed the request.
    Raft(RaftError),
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(m)
            | Self::NotFound(m)
            | Self::Exhausted(m)
            | Self::Unavailable(m)
            | Self::Denied(m) => f.write_str(m),
            Self::Raft(e) => write!(f, "{e}"),
        }
    }
}

impl From<RaftError> for RegistryError {
    fn from(e: RaftError) -> Self {
        Self::Raft(e)
    }
}

impl From<crate::cluster::client::ClientError> for RegistryError {
    fn from(e: crate::cluster::client::ClientError) -> Self {
        use crate::cluster::client::ClientError;
        match e {
            ClientError::Raft { error, .. } => Self::Raft(error),
            ClientError::Member { error, .. } => error.into(),
            e => Self::Unavailable(format!("registry: {e}; retry")),
        }
    }
}

impl From<crate::SendError> for RegistryError {
    fn from(e: crate::SendError) -> Self {
        match e {
            crate::SendError::Timeout => Self::Raft(RaftError::Timeout),
            e => Self::Unavailable(format!("registry: {e}; retry")),
        }
    }
}
