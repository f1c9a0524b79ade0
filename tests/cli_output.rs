//! End-to-end: what the CLI tells a person is true. No state it has not reached, no secret, and
//! times a person can read.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A `lodge` process whose stdout lines arrive on a channel; killed when dropped.
struct Lines {
    child: Child,
    rx: mpsc::Receiver<String>,
}

impl Lines {
    fn spawn(args: &[&str]) -> Lines {
        let mut child = Command::new(LODGE)
            .args(args)
            .env_remove("LODGE_ENDPOINT")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning lodge");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Lines { child, rx }
    }

    /// Lines up to and including the first that satisfies `f` (the bound only turns a hang into
    /// a failure).
    fn until(&self, what: &str, f: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => {
                    let done = f(&l);
                    seen.push(l);
                    if done {
                        return seen;
                    }
                }
                Err(_) => panic!("{what}: not seen; got {seen:#?}"),
            }
        }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn client_run_says_registering_and_retrying_until_it_is_registered() {
    // Nothing listens yet where the client is pointed.
    let addr = format!("127.0.0.1:{}", free_port());
    let run = Lines::spawn(&["client", "run", "--name", "early", "--endpoint", &addr]);
    let before = run.until("a retry after the first failure", |l| {
        l.starts_with("retrying")
    });
    assert!(
        before[0].starts_with("registering client_id=- "),
        "{before:#?}"
    );
    let retry = before.last().unwrap();
    assert!(retry.contains("client_id=-"), "{retry}");
    assert!(retry.contains(" error=\""), "the reason is shown: {retry}");

    // The member comes up; the client registers and only then says healthy.
    let _node = Node::start_in(tempfile::tempdir().unwrap(), &addr, &[]);
    let after = run.until("registered", |l| l.starts_with("healthy"));
    for l in &after[..after.len() - 1] {
        assert!(
            l.starts_with("retrying") || l.starts_with("registering"),
            "no other state before the registration: {after:#?}"
        );
    }
    let healthy = after.last().unwrap();
    assert!(healthy.contains("client_id=c-"), "{healthy}");
    assert!(healthy.contains("connected=true"), "{healthy}");
    assert!(!healthy.contains("error="), "{healthy}");
}

#[test]
fn ctl_info_and_the_translation_actor_show_secret_paths_but_no_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("hs256.key");
    std::fs::write(&secret_file, "the-hs256-secret-of-forty-bytes-0123456\n").unwrap();
    let secret_path = secret_file.display().to_string();
    // Nothing listens at the backend's port: only the configuration is looked at.
    let url = format!("http://bob:hunter2@127.0.0.1:{}/v1", free_port());
    let node = Node::start_env(
        &[],
        &[
            ("LODGE_AUTH__HS256_SECRET_FILE", &secret_path),
            ("LODGE_TRANSLATION__BACKEND_URL", &url),
            ("LODGE_TRANSLATION__MODEL", "m"),
        ],
    );
    let shown_url = url.replace("hunter2", "<redacted>");

    let out = node.ctl(&["info", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let info: Value = serde_json::from_str(&text).unwrap();
    let cfg = &info["config"];
    assert_eq!(cfg["auth"]["hs256_secret_file"], secret_path);
    // None set: shown as empty rather than as a hidden value.
    assert_eq!(cfg["auth"]["hs256_secret"], "");
    assert_eq!(cfg["translation"]["api_key"], "");
    assert_eq!(cfg["translation"]["backend_url"], shown_url.as_str());
    assert!(!text.contains("hunter2") && !text.contains("the-hs256-secret"));

    let out = node.ctl(&["actor", "/node/translation", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let actor: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        actor["state_dump"]["backend"]["url"],
        shown_url.as_str(),
        "{actor}"
    );
    assert!(!text.contains("hunter2"), "{text}");
    // The table form shows the same dump.
    let table = stdout(&node.ctl(&["actor", "/node/translation"]));
    assert!(
        table.contains("<redacted>") && !table.contains("hunter2"),
        "{table}"
    );
    assert!(
        !node.stderr().contains("hunter2"),
        "the log holds the password"
    );
}

/// `2024-05-01T12:00:00.123Z`: RFC 3339, UTC, milliseconds.
fn is_rfc3339_ms(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b[i].is_ascii_digit());
    b.len() == 24
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..23)
        && b[23] == b'Z'
}

#[test]
fn ctl_events_shows_times_as_rfc_3339_and_json_keeps_milliseconds() {
    let node = Node::start(&["--allow-mutations"]);
    let watch = |json: bool| {
        let mut args = vec!["ctl", "--endpoint", &node.grpc, "events"];
        args.extend(["--glob", "/node/admin"]);
        if json {
            args.push("--json");
        }
        Lines::spawn(&args)
    };
    let (table, json) = (watch(false), watch(true));
    // The watchers subscribe asynchronously: restart until both have reported something.
    let mut first = (None, None);
    for _ in 0..50 {
        assert!(node.ctl(&["restart", "/node/admin"]).status.success());
        if first.0.is_none() {
            first.0 = table.rx.recv_timeout(Duration::from_millis(500)).ok();
        }
        if first.1.is_none() {
            first.1 = json.rx.recv_timeout(Duration::from_millis(500)).ok();
        }
        if first.0.is_some() && first.1.is_some() {
            break;
        }
    }
    let (Some(line), Some(doc)) = first else {
        panic!("the watchers saw no event: {first:?}");
    };
    let (at, rest) = line.split_once(' ').unwrap();
    assert!(is_rfc3339_ms(at), "{line}");
    assert!(rest.contains("/node/admin"), "{line}");
    let doc: Value = serde_json::from_str(&doc).unwrap();
    assert!(
        doc["at_unix_ms"].as_i64().unwrap() > 1_600_000_000_000,
        "{doc}"
    );
}
