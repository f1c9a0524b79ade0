//! The built-in `runbook` type: a JSON list of shell commands and HTTP requests, each one a
//! recorded step, so that operators get durable execution without writing code.
//!
//! ```json
//! {"name": "rotate", "steps": [
//!   {"name": "drain", "run": "systemctl stop app", "idempotent": false},
//!   {"name": "notify", "http": {"method": "POST", "url": "http://hooks/x", "body": "done"},
//!    "idempotent": true},
//!   {"name": "cool-down", "sleep_secs": 300},
//!   {"name": "approve", "wait_signal": "go"}]}
//! ```
//!
//! A `sleep_secs` step is a durable timer (it fires once, on whichever member owns the run when
//! it is due); a `wait_signal` step waits for `lodge workflow signal ID go`.
//!
//! An idempotent step whose owner died while it ran is run again on the new owner; one that is
//! not stops the run in `needs-attention`. A shell step runs `sh -c` on the owner as the node's
//! user and dies with its node (so a `kill -9` of the owner cannot leave it running beside its
//! re-run); its output (stdout then stderr, interleaved) is kept in the step, its last 16 KiB.

use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use super::ctx::{Ctx, Repeat, Types, WorkflowError};
use super::record::check_name;

/// The type's name.
pub const RUNBOOK: &str = "runbook";

/// Output kept of a step: its last bytes.
pub const MAX_OUTPUT_BYTES: usize = 16 * 1024;

/// How long a step may run unless it says otherwise.
const DEFAULT_STEP_TIMEOUT_SECS: u64 = 3600;

/// A runbook file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Runbook {
    pub name: String,
    pub steps: Vec<RunbookStep>,
}

/// One step: exactly one of `run` (a shell command), `http`, `sleep_secs` and `wait_signal`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunbookStep {
    pub name: String,
    #[serde(default)]
    pub run: Option<String>,
    #[serde(default)]
    pub http: Option<HttpStep>,
    /// A durable timer of this many seconds.
    #[serde(default)]
    pub sleep_secs: Option<u64>,
    /// Waits for the signal of this name.
    #[serde(default)]
    pub wait_signal: Option<String>,
    /// Whether running it twice does no harm.
    #[serde(default)]
    pub idempotent: bool,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// An HTTP request step.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpStep {
    #[serde(default = "default_method")]
    pub method: String,
    pub url: String,
    #[serde(default)]
    pub body: String,
}

fn default_method() -> String {
    "GET".into()
}

/// What a shell step left.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ShellOutcome {
    /// Its exit code; -1 when a signal ended it.
    pub exit: i32,
    pub output: String,
}

/// What an HTTP step got.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct HttpOutcome {
    pub status: u16,
    pub body: String,
}

impl Runbook {
    /// Checks the file: step names usable as step names, unique, each with one action.
    pub fn check(&self) -> Result<(), String> {
        if self.steps.is_empty() {
            return Err("steps: a runbook needs at least one step".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, s) in self.steps.iter().enumerate() {
            check_name(&format!("steps[{i}].name"), &s.name)?;
            if !seen.insert(&s.name) {
                return Err(format!("steps[{i}].name: {:?} is used twice", s.name));
            }
            let actions = [
                s.run.is_some(),
                s.http.is_some(),
                s.sleep_secs.is_some(),
                s.wait_signal.is_some(),
            ];
            if actions.iter().filter(|a| **a).count() != 1 {
                return Err(format!(
                    "steps[{i}]: needs exactly one of \"run\" (a shell command), \"http\", \"sleep_secs\" and \"wait_signal\""
                ));
            }
            if let Some(signal) = &s.wait_signal {
                check_name(&format!("steps[{i}].wait_signal"), signal)?;
            }
            if let Some(h) = &s.http {
                h.url
                    .parse::<Uri>()
                    .map_err(|e| format!("steps[{i}].http.url: {e}"))?;
                Method::from_bytes(h.method.as_bytes()).map_err(|_| {
                    format!("steps[{i}].http.method: {:?} is not a method", h.method)
                })?;
            }
        }
        Ok(())
    }
}

/// Adds the runbook type (version 1) to `types`.
pub fn register(types: Types) -> Types {
    types.register(RUNBOOK, 1, run)
}

async fn run(ctx: Ctx, book: Runbook) -> Result<serde_json::Value, WorkflowError> {
    book.check().map_err(WorkflowError::Failed)?;
    for step in &book.steps {
        let repeat = if step.idempotent {
            Repeat::AtLeastOnce
        } else {
            Repeat::AtMostOnce
        };
        let limit = Duration::from_secs(step.timeout_secs.unwrap_or(DEFAULT_STEP_TIMEOUT_SECS));
        if let Some(command) = &step.run {
            let out: ShellOutcome = ctx
                .run_step(&step.name, repeat, || shell(command, limit))
                .await?;
            if out.exit != 0 {
                return Err(WorkflowError::Failed(format!(
                    "step {:?}: exited {}: {}",
                    step.name,
                    out.exit,
                    tail(&out.output, 512)
                )));
            }
        } else if let Some(secs) = step.sleep_secs {
            ctx.sleep(&step.name, Duration::from_secs(secs)).await?;
        } else if let Some(signal) = &step.wait_signal {
            let _: serde_json::Value = ctx.wait_signal(&step.name, signal).await?;
        } else if let Some(req) = &step.http {
            let out: HttpOutcome = ctx
                .run_step(&step.name, repeat, || http(req, limit))
                .await?;
            if out.status >= 400 {
                return Err(WorkflowError::Failed(format!(
                    "step {:?}: {} {} answered {}",
                    step.name, req.method, req.url, out.status
                )));
            }
        }
    }
    Ok(serde_json::json!({"name": book.name, "steps": book.steps.len()}))
}

/// Runs `command` with `sh -c`, its process set to die with this one (`setpriv --pdeathsig`),
/// killed if the step is dropped (a cancel) or runs past `limit`.
async fn shell(command: &str, limit: Duration) -> Result<ShellOutcome, String> {
    let mut child = tokio::process::Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--", "sh", "-c"])
        // One stream for both, in the order written.
        .arg(format!("exec 2>&1\n{command}"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            format!("cannot start `setpriv ... sh -c` (util-linux's setpriv is needed): {e}")
        })?;
    let mut stdout = child.stdout.take().expect("stdout piped");
    let collect = async {
        let mut kept: Vec<u8> = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = stdout.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            kept.extend_from_slice(&buf[..n]);
            if kept.len() > 2 * MAX_OUTPUT_BYTES {
                kept.drain(..kept.len() - MAX_OUTPUT_BYTES);
            }
        }
        let status = child.wait().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((status, kept))
    };
    let (status, kept) = tokio::time::timeout(limit, collect)
        .await
        .map_err(|_| format!("ran past its limit of {} s and was killed", limit.as_secs()))??;
    let output = String::from_utf8_lossy(&kept);
    Ok(ShellOutcome {
        exit: status.code().unwrap_or(-1),
        output: tail(&output, MAX_OUTPUT_BYTES).to_string(),
    })
}

async fn http(step: &HttpStep, limit: Duration) -> Result<HttpOutcome, String> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let mut req = Request::new(Full::new(Bytes::from(step.body.clone())));
    *req.method_mut() =
        Method::from_bytes(step.method.as_bytes()).map_err(|e| format!("method: {e}"))?;
    *req.uri_mut() = step.url.parse().map_err(|e| format!("url: {e}"))?;
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), 4 * MAX_OUTPUT_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok::<_, String>(HttpOutcome {
            status,
            body: tail(&String::from_utf8_lossy(&body), MAX_OUTPUT_BYTES).to_string(),
        })
    };
    tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| format!("no answer within {} s", limit.as_secs()))?
}

/// The last `max` bytes of `s`, cut at a character boundary.
fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book(json: serde_json::Value) -> Result<(), String> {
        let b: Runbook = serde_json::from_value(json).map_err(|e| e.to_string())?;
        b.check()
    }

    #[test]
    fn a_runbook_is_checked_before_it_runs() {
        let ok = serde_json::json!({"name": "r", "steps": [
            {"name": "s1", "run": "true"},
            {"name": "s2", "http": {"method": "POST", "url": "http://127.0.0.1:1/x", "body": "b"}, "idempotent": true}]});
        assert_eq!(book(ok), Ok(()));
        let cases = [
            (
                serde_json::json!({"name": "r", "steps": []}),
                "at least one step",
            ),
            (
                serde_json::json!({"name": "r", "steps": [{"name": "a"}]}),
                "exactly one of",
            ),
            (
                serde_json::json!({"name": "r", "steps": [{"name": "a", "run": "x"}, {"name": "a", "run": "y"}]}),
                "used twice",
            ),
            (
                serde_json::json!({"name": "r", "steps": [{"name": "a b", "run": "x"}]}),
                "steps[0].name",
            ),
            (
                serde_json::json!({"name": "r", "steps": [{"name": "a", "run": "x", "retries": 3}]}),
                "unknown field",
            ),
        ];
        for (json, want) in cases {
            let got = book(json.clone()).unwrap_err();
            assert!(got.contains(want), "{json}: {got}");
        }
    }

    #[test]
    fn output_is_kept_by_its_last_bytes_at_a_character_boundary() {
        assert_eq!(tail("héllo", 4), "llo");
        assert_eq!(tail("abc", 10), "abc");
    }

    #[actix_rt::test]
    async fn a_shell_step_keeps_its_exit_code_and_both_streams() {
        let out = shell("echo out; echo err >&2; exit 3", Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(out.exit, 3);
        assert_eq!(out.output, "out\nerr\n");
    }
}
