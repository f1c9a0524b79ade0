//! What a status says about a write's outcome. An UNAVAILABLE answer usually means "nothing was
//! done, retry"; one marked here says the write may have been applied, so a client must read
//! before retrying it (etcd's rule for an ambiguous write). Clients (the CLI's failover, the
//! module SDK) look for the mark before retrying anywhere.

use tonic::Status;

/// Metadata key on an UNAVAILABLE answer whose write may have been applied anyway.
pub const OUTCOME: &str = "lodge-outcome";
/// Its value: the write's outcome is unknown; retrying it blindly may apply it twice.
pub const UNKNOWN_OUTCOME: &str = "unknown";

/// UNAVAILABLE marked as "this write may have been applied".
pub fn outcome_unknown_status(message: &str) -> Status {
    let mut s = Status::unavailable(message);
    s.metadata_mut()
        .insert(OUTCOME, UNKNOWN_OUTCOME.parse().expect("static"));
    s
}

/// Whether `s` says its write may have been applied (never retry such a write blindly).
pub fn outcome_unknown(s: &Status) -> bool {
    s.metadata()
        .get(OUTCOME)
        .is_some_and(|v| v.as_bytes() == UNKNOWN_OUTCOME.as_bytes())
}
