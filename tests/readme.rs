//! README.md's examples, run top to bottom by `scripts/readme` against this build's `lodge`, so
//! that the README cannot drift from the binary. The script maps the README's ports to free ones,
//! bounds the run's time, and stops every process the examples start (they all stay in its
//! process group, which this test makes it lead).

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

const LODGE: &str = env!("CARGO_BIN_EXE_lodge");

/// Stops the script (its exit trap then stops what the examples started) if the test ends before
/// the script does.
struct Running(Option<u32>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{pid}")])
                .status();
        }
    }
}

#[test]
fn the_readme_runs_top_to_bottom() {
    let root = env!("CARGO_MANIFEST_DIR");
    // One file for both streams, so that commands and their output stay in order.
    let log = tempfile::NamedTempFile::new().expect("a log file");
    let mut child = Command::new("bash")
        .arg(format!("{root}/scripts/readme"))
        .arg(LODGE)
        .current_dir(root)
        .env_remove("LODGE_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(log.reopen().expect("the log for stdout"))
        .stderr(log.reopen().expect("the log for stderr"))
        .process_group(0)
        .spawn()
        .expect("running bash scripts/readme");
    let mut running = Running(Some(child.id()));
    let status = child.wait().expect("waiting for scripts/readme");
    running.0 = None;
    let out = std::fs::read_to_string(log.path()).unwrap_or_default();
    let lines: Vec<&str> = out.lines().collect();
    let tail = lines[lines.len().saturating_sub(300)..].join("\n");
    assert!(
        status.success(),
        "scripts/readme failed ({status}); the last lines of its output:\n{tail}"
    );
    assert!(
        out.contains("scripts/readme: every README example ran"),
        "scripts/readme ended without its closing line:\n{tail}"
    );
}
