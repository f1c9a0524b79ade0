//! Replicated workflows: code that survives the death of the member running it, each completed
//! step done once (`docs/workflows.md`).
//!
//! - [`record`]: what a run leaves in the store and where; [`records`]: its fenced reads and
//!   writes through the store client.
//! - [`ctx`]: what a workflow's code sees ([`Ctx`]: steps, durable timers, signals) and the
//!   registry of types ([`Types`]).
//! - [`table`]: `/node/workflow-table`, which places runs, starts the owner's actors and, on the
//!   raft leader, moves the runs of failed members; [`run`]: `/node/workflows/<id>`, one running
//!   workflow.
//! - [`worker`]: `/node/workers/<id>`, an external worker connected over a stream, which runs
//!   the types it declares.
//! - [`runbook`]: the built-in type operators use from a JSON file; [`handle`]: what the gRPC
//!   service calls.

pub mod ctx;
pub mod handle;
pub mod metrics;
pub mod record;
pub mod records;
pub mod run;
pub mod runbook;
pub mod table;
pub mod worker;

pub use ctx::{Ctx, Repeat, Types, WorkflowError};
pub use handle::WorkflowHandle;
pub use metrics::WorkflowMetrics;
pub use table::{HandOff, StartWorkflow, TableSettings, WorkflowTable};

#[cfg(test)]
mod tests;
