//! Every `lodge bench` with `--smoke` (tiny sizes, one round) on its default configuration: each
//! must run to its end, exit 0 and print its result lines, so that a bench cannot silently rot.
//! Figures are not checked: they mean nothing at these sizes. The baselines that need tools
//! (socat for `tunnel` and `balancer`, installed by scripts/test) run as in a real run; etcd runs
//! only if installed (`bench kv` says when it measures Lodge alone).
//!
//! The benches run one at a time (they share the machine's two cores with their own servers).

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const LODGE: &str = env!("CARGO_BIN_EXE_lodge");
/// Upper bound for one smoke run; only turns a hang into a failure (they take seconds).
const LIMIT: Duration = Duration::from_secs(180);

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Kills the bench's process group (the bench and whatever it started) when dropped.
struct Group(u32);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0)])
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs `lodge bench NAME --smoke` in a scratch directory; answers its stdout once it exited 0,
/// and fails with its output otherwise.
fn smoke(name: &str) -> String {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("a scratch directory");
    let out = dir.path().join("stdout");
    let err = dir.path().join("stderr");
    let mut child = Command::new(LODGE)
        .args(["bench", name, "--smoke"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .process_group(0)
        .spawn()
        .expect("running lodge bench");
    let _group = Group(child.id());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the bench") {
            break Some(status);
        }
        if started.elapsed() > LIMIT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(&out).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    match status {
        Some(s) if s.success() => stdout,
        Some(s) => panic!("lodge bench {name} --smoke: {s}\nstdout:\n{stdout}\nstderr:\n{stderr}"),
        None => panic!(
            "lodge bench {name} --smoke still ran after {LIMIT:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        ),
    }
}

/// Fails unless `out` has a line containing each of `lines`.
fn has_lines(name: &str, out: &str, lines: &[&str]) {
    for want in lines {
        assert!(
            out.lines().any(|l| l.contains(want)),
            "lodge bench {name} --smoke printed no line with {want:?}:\n{out}"
        );
    }
}

#[test]
fn bench_actors_runs_to_its_end() {
    let out = smoke("actors");
    has_lines(
        "actors",
        &out,
        &[
            "| fire-and-forget",
            "| request/response",
            "| memory per idle actor",
            "| ListActors over",
        ],
    );
}

#[test]
fn bench_kv_runs_to_its_end() {
    let out = smoke("kv");
    has_lines(
        "kv",
        &out,
        &[
            "| Lodge | put | 1 |",
            "| Lodge | linearizable get |",
            "| Lodge | first write after kill -9 of the leader |",
        ],
    );
}

#[test]
fn bench_disk_runs_to_its_end() {
    let out = smoke("disk");
    has_lines(
        "disk",
        &out,
        &["| WAL append", "| append + fdatasync", "ratio WAL / plain"],
    );
}

#[test]
fn bench_heartbeat_runs_to_its_end() {
    let out = smoke("heartbeat");
    has_lines(
        "heartbeat",
        &out,
        &[
            "| bare tonic unary",
            "| Lodge Heartbeat |",
            "failed heartbeats: 0",
            "| 200 |",
        ],
    );
}

#[test]
fn bench_tunnel_runs_to_its_end() {
    let out = smoke("tunnel");
    has_lines(
        "tunnel",
        &out,
        &["| **median** |", "| lodge |", "| node |", "lodge ÷ socat"],
    );
}

#[test]
fn bench_balancer_runs_to_its_end() {
    let out = smoke("balancer");
    has_lines(
        "balancer",
        &out,
        &[
            "errors: 0 GetNLBConfig, 0 RouteRequest",
            "| **median** |",
            "| lodge |",
            "CPU ms per 1,000 connections",
        ],
    );
}

#[test]
fn bench_workflows_runs_to_its_end() {
    let out = smoke("workflows");
    has_lines(
        "workflows",
        &out,
        &[
            "| 1 | 1 |",
            "workflows completed, by owner: member",
            "| 4 |",
            "step ÷ put p50",
            "median kill → next step",
        ],
    );
}
