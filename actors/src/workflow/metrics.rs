//! Figures of the workflows: runs started and ended by type and status, takeovers, and how long
//! recording a step takes (the raft round trip a workflow pays per step).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::record::Status;

/// Labels of a run count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    pub workflow_type: String,
    pub status: String,
}

/// The workflow type label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub workflow_type: String,
}

/// Every workflow figure. Cloning shares the underlying counters.
#[derive(Clone)]
pub struct WorkflowMetrics {
    /// Runs this member started (a second start of an id is not counted).
    pub started: Family<TypeLabel, Counter>,
    /// Runs this member ended as their owner, by type and status.
    pub ended: Family<RunLabels, Counter>,
    /// Owner changes this member made as the raft leader.
    pub takeovers: Counter,
    /// Ended runs this member deleted as the raft leader, past `workflow.retention_ms`.
    pub forgotten: Counter,
    /// Time to record one step through raft.
    pub step_seconds: Histogram,
}

impl Default for WorkflowMetrics {
    fn default() -> Self {
        Self {
            started: Family::default(),
            ended: Family::default(),
            takeovers: Counter::default(),
            forgotten: Counter::default(),
            step_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
        }
    }
}

impl WorkflowMetrics {
    /// Counts a run started.
    pub fn started(&self, type_name: &str) {
        self.started
            .get_or_create(&TypeLabel {
                workflow_type: type_name.to_string(),
            })
            .inc();
    }

    /// Counts a run ended with `status`.
    pub fn ended(&self, type_name: &str, status: Status) {
        self.ended
            .get_or_create(&RunLabels {
                workflow_type: type_name.to_string(),
                status: status.as_str().to_string(),
            })
            .inc();
    }

    /// Records the time one step record took.
    pub fn step_recorded(&self, took: Duration) {
        self.step_seconds.observe(took.as_secs_f64());
    }

    /// Registers every figure under `lodge_workflow_*`.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "lodge_workflow_started",
            "Workflow runs started through this member, by type",
            self.started.clone(),
        );
        r.register(
            "lodge_workflow_ended",
            "Workflow runs this member ended as their owner, by type and status",
            self.ended.clone(),
        );
        r.register(
            "lodge_workflow_takeovers",
            "Workflow runs moved to a new owner by this member as the raft leader",
            self.takeovers.clone(),
        );
        r.register(
            "lodge_workflow_forgotten",
            "Ended workflow runs deleted by this member as the raft leader, past their retention",
            self.forgotten.clone(),
        );
        r.register(
            "lodge_workflow_step_record_seconds",
            "Time to record one workflow step through raft",
            self.step_seconds.clone(),
        );
    }
}
