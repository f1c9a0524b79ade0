//! The deployment hook: a command the operator configures (`balancer.deploy_hook`) that receives
//! every scaling decision, to act on it (start or stop module processes, scale a deployment).
//!
//! The decision is in the environment (`LODGE_MODULE_TYPE`, `LODGE_DIRECTION`, `LODGE_CURRENT`,
//! `LODGE_DESIRED`, `LODGE_REASON`, `LODGE_SEQ`) and as one JSON document on standard input. The
//! hook runs on the node that made the decision, one at a time per node, bounded by a timeout; its
//! failure is logged, and the decision stays delivered to the modules' heartbeats regardless.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use slog::{info, warn, Logger};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::flow::ModuleType;
use super::model::DecisionRecord;

/// How long a hook may run.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// The configured hook.
pub struct DeployHook {
    /// Program and arguments.
    command: Vec<String>,
    log: Logger,
    /// One run at a time: decisions reach the hook in order.
    running: Arc<Mutex<()>>,
}

#[derive(Serialize)]
struct Event<'a> {
    module_type: ModuleType,
    #[serde(flatten)]
    decision: &'a DecisionRecord,
}

impl DeployHook {
    /// A hook running `command` (program first); `None` when empty.
    pub fn new(command: Vec<String>, log: &Logger) -> Option<Self> {
        if command.is_empty() {
            return None;
        }
        Some(Self {
            command,
            log: log.new(slog::o!("hook" => "deploy")),
            running: Arc::new(Mutex::new(())),
        })
    }

    /// Runs the hook for `decision` in the background.
    pub fn deliver(&self, t: ModuleType, decision: &DecisionRecord) {
        let command = self.command.clone();
        let log = self.log.clone();
        let running = self.running.clone();
        let input = serde_json::to_vec(&Event {
            module_type: t,
            decision,
        })
        .unwrap_or_default();
        let d = decision.clone();
        tokio::spawn(async move {
            let _one = running.lock().await;
            match tokio::time::timeout(HOOK_TIMEOUT, run(&command, t, &d, &input)).await {
                Ok(Ok(status)) if status.success() => {
                    info!(log, "deployment hook ran"; "module_type" => %t, "desired" => d.desired)
                }
                Ok(Ok(status)) => {
                    warn!(log, "deployment hook failed"; "module_type" => %t, "status" => %status)
                }
                Ok(Err(e)) => warn!(log, "deployment hook did not run"; "error" => %e),
                Err(_) => {
                    warn!(log, "deployment hook timed out"; "timeout_s" => HOOK_TIMEOUT.as_secs())
                }
            }
        });
    }
}

async fn run(
    command: &[String],
    t: ModuleType,
    d: &DecisionRecord,
    input: &[u8],
) -> std::io::Result<std::process::ExitStatus> {
    let mut child = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .env("LODGE_MODULE_TYPE", t.as_str())
        .env("LODGE_DIRECTION", &d.direction)
        .env("LODGE_CURRENT", d.current.to_string())
        .env("LODGE_DESIRED", d.desired.to_string())
        .env("LODGE_REASON", &d.reason)
        .env("LODGE_SEQ", d.seq.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that ignores its input must not fail the run.
        let _ = stdin.write_all(input).await;
    }
    child.wait().await
}
