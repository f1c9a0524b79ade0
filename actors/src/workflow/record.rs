//! What a workflow leaves in the replicated store, and where.
//!
//! Everything lives under `/lodge/wf/`, the node-only part of the KV group, one key per fact so
//! that each change is one small transaction:
//!
//! | key | value | written by |
//! |---|---|---|
//! | `run/<id>` | [`Run`]: type, version, input, owner, epoch, status, outcome | start, owner change, cancel, end |
//! | `owner/<id>` | `"<node>/<epoch>"`, the fence | start, owner change |
//! | `step/<id>/<index>` | [`StepRecord`] | the owner, fenced by `owner/<id>` |
//! | `signal/<id>/<name>` | the signal's JSON value | Signal |
//! | `types/<node>` | the [`TypeInfo`]s a member runs | each member at start |
//!
//! The fence is its own key so that a cancel (which rewrites the run) does not fence out the
//! owner, while an owner change does: every owner write compares `owner/<id>` with the owner
//! and epoch it was given, so a write from an ex-owner is refused by the state machine on every
//! member alike.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The prefix of every workflow key.
pub const ROOT: &str = "/lodge/wf/";

/// Longest workflow id, type name, step or signal name.
pub const MAX_NAME_BYTES: usize = 128;
/// Most steps one run may record (Temporal bounds a history too); past it the run fails.
pub const MAX_STEPS: usize = 10_000;
/// Largest encoded input, step result or signal value.
pub const MAX_VALUE_BYTES: usize = 256 * 1024;

/// Where a run is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Running,
    Completed,
    Failed,
    /// A step that must not run twice was running when its owner died: an operator decides.
    NeedsAttention,
    Cancelled,
}

impl Status {
    /// The name used in the API, the CLI and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::NeedsAttention => "needs-attention",
            Self::Cancelled => "cancelled",
        }
    }

    /// The status named `s`, as the API spells it.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Running,
            Self::Completed,
            Self::Failed,
            Self::NeedsAttention,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

/// One workflow run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub id: String,
    #[serde(rename = "type")]
    pub type_name: String,
    pub version: u32,
    pub input: Value,
    /// The member that runs it.
    pub owner: u64,
    /// Raised by every owner change; the owner's writes carry it.
    pub epoch: u64,
    pub status: Status,
    #[serde(default)]
    pub result: Option<Value>,
    #[serde(default)]
    pub error: Option<String>,
    /// Set by Cancel; the owner ends the run `cancelled` at once.
    #[serde(default)]
    pub cancel_requested: bool,
    pub created_ms: u64,
    #[serde(default)]
    pub ended_ms: Option<u64>,
}

impl Run {
    /// A run just started: owned by `owner` at epoch 1, running.
    pub fn new(id: String, type_name: String, version: u32, input: Value, owner: u64) -> Self {
        Self {
            id,
            type_name,
            version,
            input,
            owner,
            epoch: 1,
            status: Status::Running,
            result: None,
            error: None,
            cancel_requested: false,
            created_ms: crate::clock::precise_ms(),
            ended_ms: None,
        }
    }
}

/// Whether a recorded step finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepState {
    /// Recorded before a run-once step or a timer began; the step's effect may have happened.
    Started,
    Done,
}

/// One recorded step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub name: String,
    pub state: StepState,
    #[serde(default)]
    pub result: Value,
    /// A durable timer's deadline (wall clock, ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<u64>,
    /// When it was written, and by which owner epoch.
    pub at_ms: u64,
    pub epoch: u64,
}

/// A workflow type a member runs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TypeInfo {
    pub name: String,
    pub version: u32,
}

/// `run/<id>`.
pub fn run_key(id: &str) -> Vec<u8> {
    format!("{ROOT}run/{id}").into_bytes()
}

/// Every run.
pub fn runs_prefix() -> Vec<u8> {
    format!("{ROOT}run/").into_bytes()
}

/// `owner/<id>`.
pub fn owner_key(id: &str) -> Vec<u8> {
    format!("{ROOT}owner/{id}").into_bytes()
}

/// The fence's value.
pub fn owner_value(node: u64, epoch: u64) -> Vec<u8> {
    format!("{node}/{epoch}").into_bytes()
}

/// `step/<id>/<index>`, the index zero-padded so that keys sort in step order.
pub fn step_key(id: &str, index: usize) -> Vec<u8> {
    format!("{ROOT}step/{id}/{index:06}").into_bytes()
}

/// A run's steps.
pub fn steps_prefix(id: &str) -> Vec<u8> {
    format!("{ROOT}step/{id}/").into_bytes()
}

/// `signal/<id>/<name>`.
pub fn signal_key(id: &str, name: &str) -> Vec<u8> {
    format!("{ROOT}signal/{id}/{name}").into_bytes()
}

/// A run's signals.
pub fn signals_prefix(id: &str) -> Vec<u8> {
    format!("{ROOT}signal/{id}/").into_bytes()
}

/// Every signal.
pub fn all_signals_prefix() -> Vec<u8> {
    format!("{ROOT}signal/").into_bytes()
}

/// `types/<node>`.
pub fn types_key(node: u64) -> Vec<u8> {
    format!("{ROOT}types/{node}").into_bytes()
}

/// Every member's types.
pub fn types_prefix() -> Vec<u8> {
    format!("{ROOT}types/").into_bytes()
}

/// The run id a `run/`, `step/` or `signal/` key belongs to.
pub fn id_of(key: &[u8], prefix: &[u8]) -> Option<String> {
    let rest = key.strip_prefix(prefix)?;
    let id = rest.split(|b| *b == b'/').next()?;
    String::from_utf8(id.to_vec()).ok()
}

/// Checks a workflow id, type, step or signal name: it becomes part of a key and an actor path,
/// so it is 1 to 128 bytes of letters, digits, `.`, `_` and `-`.
pub fn check_name(field: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "{field}: must be 1 to {MAX_NAME_BYTES} bytes, got {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{field}: {name:?} holds {c:?}; only letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    Ok(())
}

/// Checks that a value fits the bound on inputs, results and signals.
pub fn check_value(field: &str, value: &Value) -> Result<Vec<u8>, String> {
    let bytes = serde_json::to_vec(value).map_err(|e| format!("{field}: {e}"))?;
    if bytes.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "{field}: {} bytes, over the limit of {MAX_VALUE_BYTES}",
            bytes.len()
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_in_step_order_and_name_their_run() {
        assert!(step_key("a", 9) < step_key("a", 10));
        assert_eq!(
            id_of(&step_key("w-1", 3), &steps_prefix("")[..ROOT.len() + 5]),
            Some("w-1".into())
        );
        assert_eq!(id_of(&run_key("w.2"), &runs_prefix()), Some("w.2".into()));
    }

    #[test]
    fn names_are_checked_for_paths_and_keys() {
        assert!(check_name("id", "deploy-2026.12_07").is_ok());
        assert!(check_name("id", "").unwrap_err().contains("1 to 128"));
        assert!(check_name("id", "a/b").unwrap_err().contains("'/'"));
        assert!(check_name("id", &"x".repeat(129)).is_err());
    }

    #[test]
    fn statuses_round_trip_by_their_api_names() {
        for s in [
            "running",
            "completed",
            "failed",
            "needs-attention",
            "cancelled",
        ] {
            assert_eq!(Status::parse(s).unwrap().as_str(), s);
        }
        assert_eq!(
            serde_json::to_value(Status::NeedsAttention).unwrap(),
            "needs-attention"
        );
    }
}
