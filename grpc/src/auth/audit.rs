//! The audit log: one structured record per mutating call (the rows of the role table marked
//! "audited"), with who made it, how they were identified, what it was, its target and its
//! outcome. Off by default; `[audit]` sends it to a file or to stdout as JSON lines, apart from
//! the node's own log so that it can be kept and shipped on its own terms. Tokens and secrets
//! are never in it: the subject is the token's `sub` or the certificate's name.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use slog::{info, Logger};

use super::caller::Caller;

/// Where audit records go; `Audit::off()` records nothing.
#[derive(Clone, Default)]
pub struct Audit {
    log: Option<Logger>,
}

impl Audit {
    /// No audit log.
    pub fn off() -> Self {
        Self { log: None }
    }

    /// Records to `log`.
    pub fn to(log: Logger) -> Self {
        Self { log: Some(log) }
    }

    /// Starts the record of a call to `method` from `peer`; `None` when the log is off.
    pub(super) fn begin(&self, method: &str, peer: Option<SocketAddr>) -> Option<Pending> {
        let log = self.log.clone()?;
        Some(Pending {
            log,
            method: method.trim_start_matches('/').to_string(),
            peer,
            who: "unauthenticated".into(),
            via: "-",
            target: TargetSlot::default(),
        })
    }
}

/// The target a handler names for the audit record (a key, a member id, a module id), shared
/// through the request's extensions.
#[derive(Clone, Default)]
pub struct TargetSlot(Arc<Mutex<Option<String>>>);

/// Names the target of the call `req` for the audit log (a no-op when the log is off).
pub fn note_target<T>(req: &tonic::Request<T>, target: impl FnOnce() -> String) {
    if let Some(slot) = req.extensions().get::<TargetSlot>() {
        *slot.0.lock().unwrap() = Some(target());
    }
}

/// A record waiting for its outcome.
pub(super) struct Pending {
    log: Logger,
    method: String,
    peer: Option<SocketAddr>,
    who: String,
    via: &'static str,
    target: TargetSlot,
}

/// How a call ended.
pub(super) struct AuditRecord {
    outcome: tonic::Code,
    reason: Option<String>,
}

impl AuditRecord {
    pub(super) fn ended(outcome: tonic::Code) -> Self {
        Self {
            outcome,
            reason: None,
        }
    }

    pub(super) fn refused(status: &tonic::Status) -> Self {
        Self {
            outcome: status.code(),
            reason: Some(status.message().to_string()),
        }
    }
}

impl Pending {
    pub(super) fn with_caller(mut self, caller: &Caller) -> Self {
        self.who = caller.subject.clone();
        self.via = match caller.via {
            super::Via::Open => "open",
            super::Via::Token => "token",
            super::Via::Certificate => "certificate",
            super::Via::Peer => "peer",
            super::Via::Node => "node",
        };
        self
    }

    pub(super) fn target_slot(&self) -> TargetSlot {
        self.target.clone()
    }

    pub(super) fn finish(self, r: AuditRecord) {
        let target = self.target.0.lock().unwrap().take().unwrap_or_default();
        let peer = self.peer.map(|p| p.to_string()).unwrap_or_default();
        info!(self.log, "audit";
            "who" => &self.who,
            "via" => self.via,
            "method" => &self.method,
            "target" => target,
            "outcome" => format!("{:?}", r.outcome),
            "reason" => r.reason.unwrap_or_default(),
            "peer" => peer);
    }
}
