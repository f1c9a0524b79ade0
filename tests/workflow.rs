//! End-to-end: replicated workflows (issue 18, first slice) through `lodge workflow`.
//!
//! A runbook on one node (steps run once, a second start answers the same run, failures name
//! their step), cancel and signal, and above all kills: the owner of a running workflow is
//! `kill -9`ed before, during and after its steps, and the workflow must finish on a survivor
//! with every side effect done exactly once, or, for a step that may not run twice, stop in
//! `needs-attention` without running it again. Kills are the point of this file.
//!
//! Around them: an owner cut off by injected faults (`lodge ctl faults --drop`, on members
//! started with `--allow-mutations`) records nothing once the majority has moved its run; a
//! `kill -9` of the whole cluster and a restart on the same data resumes a run from its record;
//! a durable timer armed by an owner that dies fires once, when due, on the survivor; a signal
//! releases a step waiting for it.
//!
//! The side effects are runbook shell steps appending lines to a file the test reads; the
//! idempotent ones append under an idempotency key (`grep -qx LINE || echo LINE`), as a real
//! side effect that may be repeated must. Every node runs with a 1.5 s failure-detection
//! timeout. Kills are timed by polling `lodge workflow get ID --json`
//! and the side-effect file, never by sleeping.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// The environment of every node in this file.
const ENV: &[(&str, &str)] = &[("LODGE_CLUSTER__HEARTBEAT_TIMEOUT_MS", "1500")];

/// Upper bound for a workflow to settle after a kill: an election, the failure detection and the
/// rest of its steps. Only turns a hang into a failure.
const AFTER_KILL: Duration = Duration::from_secs(60);

#[test]
fn a_runbook_runs_its_steps_once_and_a_second_start_answers_the_same_run() {
    let node = Node::start_env(&[], ENV);
    let ep = node.grpc.as_str();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.txt");
    let runbook = json!({
        "name": "two lines",
        "steps": [
            {
                "name": "first",
                "run": format!("echo one >> '{}'; echo hello-from-first", out.display()),
                "idempotent": false
            },
            {
                "name": "second",
                "run": format!("echo two >> '{}'", out.display()),
                "idempotent": true
            }
        ]
    });
    let file = write_json(dir.path(), "runbook.json", &runbook);

    // The first run (again if the node was not quite ready: a start is idempotent by id).
    let id = within(Duration::from_secs(30), "the runbook starts", || {
        let o = workflow(ep, &["run", &file, "--id", "rb-1"]);
        o.status.success().then(|| last_line(&o))
    });
    assert_eq!(id, "rb-1");
    let v = settled(ep, "rb-1", Duration::from_secs(30)).expect("rb-1 settles");
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["id"], "rb-1", "{v}");
    assert_eq!(v["type"], "runbook", "{v}");
    assert_eq!(v["version"], 1, "{v}");
    assert_eq!(v["input"], runbook, "the file's JSON is the input: {v}");
    assert!(v["owner"].as_u64().is_some(), "{v}");
    assert_eq!(read(&out), "one\ntwo\n", "each step ran once");
    let steps = v["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2, "{v}");
    for (i, (step, name)) in steps.iter().zip(["first", "second"]).enumerate() {
        assert_eq!(step["index"], i as u64, "{v}");
        assert_eq!(step["name"], name, "{v}");
        assert_eq!(step["state"], "done", "{v}");
        assert_eq!(step["result"]["exit"], 0, "{v}");
    }
    let output = steps[0]["result"]["output"].as_str().unwrap_or("");
    assert!(output.contains("hello-from-first"), "step output kept: {v}");

    // A second run with the same id answers the same run and runs nothing.
    let again = workflow(ep, &["run", &file, "--id", "rb-1"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(last_line(&again), "rb-1");
    assert!(
        stderr(&again).contains("existing run"),
        "{}",
        stderr(&again)
    );
    let v2 = get_workflow(ep, "rb-1").expect("rb-1");
    assert_eq!(v2["status"], "completed", "{v2}");
    assert_eq!(v2["steps"], v["steps"], "the second start recorded nothing");
    assert_eq!(read(&out), "one\ntwo\n", "the second start ran nothing");

    // A step that exits 3 fails the workflow, naming the step and the exit code.
    let failing = json!({
        "name": "fails",
        "steps": [{"name": "boom", "run": "exit 3", "idempotent": true}]
    });
    let failing = write_json(dir.path(), "failing.json", &failing);
    let o = workflow(ep, &["run", &failing, "--id", "rb-fail"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(last_line(&o), "rb-fail");
    let f = settled(ep, "rb-fail", Duration::from_secs(30)).expect("rb-fail settles");
    assert_eq!(f["status"], "failed", "{f}");
    let error = f["error"].as_str().unwrap_or("");
    assert!(error.contains("boom") && error.contains('3'), "{f}");

    // Listings, with and without filters.
    let all = json_of(workflow(ep, &["list", "--json"])).expect("list");
    let rb1 = ids(&all)
        .into_iter()
        .position(|i| i == "rb-1")
        .map(|n| all["workflows"][n].clone())
        .unwrap_or_else(|| panic!("rb-1 not listed: {all}"));
    assert_eq!(rb1["type"], "runbook", "{all}");
    assert_eq!(rb1["status"], "completed", "{all}");
    assert_eq!(rb1["owner"], v["owner"], "{all}");
    let failed = json_of(workflow(ep, &["list", "--status", "failed", "--json"])).expect("list");
    assert_eq!(ids(&failed), ["rb-fail"], "{failed}");

    let types = json_of(workflow(ep, &["types", "--json"])).expect("types");
    let names: Vec<&str> = types["types"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["runbook"], "{types}");

    // An unknown id is NOT_FOUND, naming it.
    let nope = workflow(ep, &["get", "nope", "--json"]);
    assert!(!nope.status.success());
    assert!(
        stderr(&nope).contains("nope") && stderr(&nope).contains("NotFound"),
        "{}",
        stderr(&nope)
    );

    // A watch of a run that ended shows the run, then its recorded steps, and ends.
    let (status, out, err) =
        workflow_bounded(ep, &["watch", "rb-1", "--json"], Duration::from_secs(30));
    let status = status.expect("the watch of an ended run ends");
    assert!(status.success(), "{err}");
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3, "{out}");
    assert_eq!(events[0]["run"]["status"], "completed", "{out}");
    assert_eq!(events[1]["step"]["name"], "first", "{out}");
    assert_eq!(events[2]["step"]["name"], "second", "{out}");
}

#[test]
fn a_workflow_whose_owner_is_killed_at_each_step_position_completes_on_a_survivor_with_every_step_done_once(
) {
    // Every step index once, every position at least once. The last step is killed before,
    // not after: once step 4 is recorded the workflow completes at once, so a kill "after
    // step 4" would land after the end and test no takeover.
    for (step, at) in [
        (0, At::During),
        (1, At::After),
        (2, At::Before),
        (3, At::During),
        (4, At::Before),
    ] {
        kill_the_owner_and_finish_on_a_survivor(step, at);
    }
}

#[test]
fn a_non_idempotent_runbook_step_interrupted_by_a_kill_9_stops_in_needs_attention_and_never_runs_twice(
) {
    let mut three = Cluster::start();
    let all = three.all();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("effects.txt");
    let marker = dir.path().join("s1-running");
    let runbook = json!({
        "name": "not twice",
        "steps": [
            {
                "name": "s0",
                "run": format!("echo s0 >> '{}'", out.display()),
                "idempotent": true
            },
            {
                "name": "s1",
                "run": format!(
                    "echo started >> '{}'; sleep 2; echo s1 >> '{}'",
                    marker.display(),
                    out.display()
                ),
                "idempotent": false
            }
        ]
    });
    let file = write_json(dir.path(), "runbook.json", &runbook);
    let id = within(Duration::from_secs(30), "the runbook starts", || {
        let o = workflow(&all, &["run", &file, "--id", "na-1"]);
        o.status.success().then(|| last_line(&o))
    });
    assert_eq!(id, "na-1");

    // The marker is s1's shell's first act: once it exists, s1 is running on the owner (for 2 s).
    let (owner, epoch) = within(Duration::from_secs(30), "s1 running", || {
        if !marker.exists() {
            return None;
        }
        let v = get_workflow(&all, "na-1")?;
        assert_eq!(v["status"], "running", "s1 ended before the kill: {v}");
        Some((owner_of(&v), epoch_of(&v)))
    });
    three.kill9(owner);
    let survivors = three.survivors();
    let v = settled(&survivors, "na-1", AFTER_KILL).unwrap_or_else(|| {
        panic!(
            "na-1 still running {AFTER_KILL:?} after the kill: {:?}\n{}",
            get_workflow(&survivors, "na-1"),
            three.logs()
        )
    });
    assert_eq!(v["status"], "needs-attention", "{v}\n{}", three.logs());
    assert_ne!(v["owner"].as_u64(), Some(owner), "taken over: {v}");
    assert!(epoch_of(&v) > epoch, "{v}");
    let s1_done = v["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|s| s["name"] == "s1" && s["state"] == "done");
    assert!(!s1_done, "s1 cannot have completed: {v}");
    assert_eq!(lines(&out), ["s0"], "s1 died with its node");

    // An absence can only be observed over a window: 3 s covers the killed shell's own `sleep 2`
    // (had it outlived its node) and a re-run on the new owner, which would write `s1` within
    // 2 s of starting. Polled, so a violation fails as soon as it shows.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        assert_eq!(lines(&out), ["s0"], "s1 ran after the kill");
        std::thread::sleep(Duration::from_millis(100));
    }
    let still = get_workflow(&survivors, "na-1").expect("na-1");
    assert_eq!(still["status"], "needs-attention", "{still}");
}

#[test]
fn cancel_and_signal_reach_a_running_workflow() {
    let node = Node::start_env(&[], ENV);
    let ep = node.grpc.as_str();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("steps.txt");
    let book = write_json(dir.path(), "steps.json", &steps_runbook(&file, 50, "0.2"));
    let id = within(Duration::from_secs(30), "c1 starts", || {
        let o = workflow(ep, &["run", &book, "--id", "c1"]);
        o.status.success().then(|| last_line(&o))
    });
    assert_eq!(id, "c1");
    within(Duration::from_secs(30), "a first step recorded", || {
        let v = get_workflow(ep, "c1")?;
        (done_steps(&v) >= 1).then_some(())
    });

    let o = workflow(ep, &["cancel", "c1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v = settled(ep, "c1", Duration::from_secs(30)).expect("c1 settles");
    assert_eq!(v["status"], "cancelled", "{v}");
    let done = done_steps(&v);
    assert!(done < 50, "cancelled before the end: {v}");

    // The file stops growing: at most the step in flight when it was cancelled adds its line.
    // Observed over a window (each step takes 400 ms, so 1.5 s would show several more lines).
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        let n = lines(&file).len();
        assert!(n <= done + 1, "{n} lines after {done} steps were recorded");
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = get_workflow(ep, "c1").expect("c1");
    assert_eq!(after["status"], "cancelled", "{after}");
    assert_eq!(
        done_steps(&after),
        done,
        "nothing recorded after the cancel"
    );

    // A signal to a finished workflow is an error naming it.
    let o = workflow(ep, &["signal", "c1", "go", "--value", "1"]);
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(stderr(&o).contains("c1"), "{}", stderr(&o));
}

#[test]
fn ended_runs_are_deleted_past_their_retention_and_running_ones_are_kept() {
    let env = [
        ("LODGE_CLUSTER__HEARTBEAT_TIMEOUT_MS", "1500"),
        ("LODGE_WORKFLOW__RETENTION_MS", "2000"),
    ];
    let node = Node::start_env(&[], &env);
    let ep = node.grpc.as_str();
    let dir = tempfile::tempdir().unwrap();
    let quick =
        json!({"name": "quick", "steps": [{"name": "s", "run": "true", "idempotent": true}]});
    let quick = write_json(dir.path(), "quick.json", &quick);
    let waits = json!({"name": "waits", "steps": [{"name": "w", "wait_signal": "go"}]});
    let waits = write_json(dir.path(), "waits.json", &waits);
    within(Duration::from_secs(30), "both start", || {
        let a = workflow(ep, &["run", &quick, "--id", "kept-short"]);
        let b = workflow(ep, &["run", &waits, "--id", "kept-waiting"]);
        (a.status.success() && b.status.success()).then_some(())
    });
    let v = settled(ep, "kept-short", Duration::from_secs(30)).expect("kept-short settles");
    assert_eq!(v["status"], "completed", "{v}");

    // Past its retention the ended run is gone, with all that was recorded of it.
    let gone = within(Duration::from_secs(30), "the ended run is deleted", || {
        let o = workflow(ep, &["get", "kept-short"]);
        (!o.status.success()).then(|| stderr(&o))
    });
    assert!(
        gone.contains("NotFound") && gone.contains("kept-short"),
        "{gone}"
    );
    let left = kv(ep, &["get", "/lodge/wf/", "--prefix"]);
    assert!(left.status.success(), "{}", stderr(&left));
    assert!(!stdout(&left).contains("kept-short"), "{}", stdout(&left));
    assert!(stdout(&left).contains("kept-waiting"), "{}", stdout(&left));

    // A running run is kept whatever its age; a deleted run's id may be started again.
    let w = get_workflow(ep, "kept-waiting").expect("kept-waiting");
    assert_eq!(w["status"], "running", "{w}");
    let again = workflow(ep, &["run", &quick, "--id", "kept-short"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        !stderr(&again).contains("existing run"),
        "{}",
        stderr(&again)
    );
    let scraped = node.scrape();
    let forgotten = scraped
        .lines()
        .find_map(|l| l.strip_prefix("lodge_workflow_forgotten_total "))
        .and_then(|n| n.trim().parse::<u64>().ok());
    // At least the first; the second start may have ended and been deleted since.
    assert!(forgotten.is_some_and(|n| n >= 1), "{scraped}");
}

#[test]
fn an_owner_cut_off_by_a_partition_cannot_record_a_step_after_the_takeover() {
    let three = Cluster::start_with(&["--allow-mutations"]);
    let all = three.all();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("side-effects.txt");
    let book = write_json(dir.path(), "steps.json", &steps_runbook(&file, 6, "0.2"));
    let id = within(Duration::from_secs(30), "the start", || {
        let o = workflow(&all, &["run", &book, "--id", "cut-1"]);
        o.status.success().then(|| last_line(&o))
    });
    assert_eq!(id, "cut-1");

    // A first step recorded: the owner is at work (on the next step, or about to start it).
    let (owner, epoch) = within(Duration::from_secs(30), "a first step recorded", || {
        let v = get_workflow(&all, "cut-1")?;
        assert_eq!(
            v["status"], "running",
            "the run ended before the partition: {v}"
        );
        (done_steps(&v) >= 1).then(|| (owner_of(&v), epoch_of(&v)))
    });

    // The partition: the owner loses its raft traffic (and membership heartbeats) with both
    // others, and they lose theirs with it (on each side, so that neither end hears the other
    // whoever sends).
    let others: Vec<u64> = (1..=3).filter(|m| *m != owner).collect();
    three.faults(owner, &others);
    for other in &others {
        three.faults(*other, &[owner]);
    }
    let cut = Instant::now();

    // The majority side (a new raft leader there if the owner led) moves the run to one of its
    // members at a higher epoch. The first answer showing it is read after the owner change,
    // so it holds every step the old owner managed to record.
    let majority = three.endpoints(&others);
    let at_takeover = poll(Duration::from_secs(30), || {
        get_workflow(&majority, "cut-1").filter(|v| epoch_of(v) > epoch)
    })
    .unwrap_or_else(|| {
        panic!(
            "no takeover 30 s after member {owner} was cut off: {:?}\nmembers as the majority \
             sees them: {:?}\n{}",
            get_workflow(&majority, "cut-1"),
            json_of(cluster(&majority, &["members", "--json"])),
            three.logs()
        )
    });
    let (new_owner, new_epoch) = (owner_of(&at_takeover), epoch_of(&at_takeover));
    eprintln!(
        "owner {owner} (epoch {epoch}) cut off; taken over by {new_owner} at epoch {new_epoch} \
         in {:?}, with {} steps recorded",
        cut.elapsed(),
        done_steps(&at_takeover)
    );
    assert!(others.contains(&new_owner), "{at_takeover}");
    // (index, at_ms) of the steps the old owner recorded: nothing else may carry its epoch.
    let by_old = |v: &Value| -> Vec<(u64, u64)> {
        steps_of(v)
            .iter()
            .filter(|s| s["epoch"] == epoch)
            .map(|s| (s["index"].as_u64().unwrap(), s["at_ms"].as_u64().unwrap()))
            .collect()
    };
    let old_steps = by_old(&at_takeover);
    assert!(!old_steps.is_empty(), "{at_takeover}");

    // Healed: the old owner hears the others again, and whatever it still had to write is
    // fenced out; the new owner finishes the run.
    for m in 1..=3 {
        three.faults(m, &[]);
    }
    let v = settled(&all, "cut-1", AFTER_KILL).unwrap_or_else(|| {
        panic!(
            "cut-1 still running {AFTER_KILL:?} after the heal: {:?}\n{}",
            get_workflow(&all, "cut-1"),
            three.logs()
        )
    });
    assert_eq!(v["status"], "completed", "{v}\n{}", three.logs());
    assert_eq!((owner_of(&v), epoch_of(&v)), (new_owner, new_epoch), "{v}");
    assert_eq!(v["result"], json!({"name": "steps", "steps": 6}), "{v}");
    let expected: Vec<String> = (0..6).map(|i| format!("step-{i}")).collect();
    let steps = steps_of(&v);
    let names: Vec<&str> = steps.iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(names, expected, "{v}");
    let epochs: Vec<u64> = steps.iter().map(|s| s["epoch"].as_u64().unwrap()).collect();
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["index"], i as u64, "{v}");
        assert_eq!(s["state"], "done", "{v}");
    }
    assert!(
        epochs.windows(2).all(|w| w[0] <= w[1]),
        "epochs decrease along the record: {epochs:?}\n{v}"
    );
    assert_eq!(
        by_old(&v),
        old_steps,
        "the old owner recorded (or rewrote) a step after the takeover: {v}"
    );
    assert!(
        epochs.iter().all(|e| *e == epoch || *e == new_epoch),
        "{epochs:?}"
    );
    assert_eq!(lines(&file), expected, "each side effect exactly once");
}

#[test]
fn a_whole_cluster_restart_resumes_running_workflows_from_their_records() {
    let mut three = Cluster::start();
    let all = three.all();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("side-effects.txt");
    let attempts = dir.path().join("attempts.txt");
    let book = write_json(
        dir.path(),
        "steps.json",
        &counted_steps_runbook(&file, &attempts, 6, "0.15"),
    );
    let id = within(Duration::from_secs(30), "the start", || {
        let o = workflow(&all, &["run", &book, "--id", "restart-1"]);
        o.status.success().then(|| last_line(&o))
    });
    assert_eq!(id, "restart-1");
    let before = within(Duration::from_secs(30), "two steps recorded", || {
        let v = get_workflow(&all, "restart-1")?;
        assert_eq!(v["status"], "running", "the run ended before the kill: {v}");
        (done_steps(&v) >= 2).then_some(v)
    });

    // Every member at once: nothing survives but the data directories.
    for m in 1..=3 {
        three.kill9(m);
    }
    let killed = Instant::now();
    for m in 1..=3 {
        three.restart(m);
    }
    let v = settled(&all, "restart-1", AFTER_KILL).unwrap_or_else(|| {
        panic!(
            "restart-1 still running {AFTER_KILL:?} after the restart: {:?}\n{}",
            get_workflow(&all, "restart-1"),
            three.logs()
        )
    });
    eprintln!(
        "{} steps recorded before the kill (owner {}, epoch {}); settled on {} at epoch {} \
         {:?} after the kill; steps run: {:?}",
        done_steps(&before),
        before["owner"],
        before["epoch"],
        v["owner"],
        v["epoch"],
        killed.elapsed(),
        lines(&attempts)
    );
    assert_eq!(v["status"], "completed", "{v}\n{}", three.logs());
    assert_eq!(v["result"], json!({"name": "steps", "steps": 6}), "{v}");
    let expected: Vec<String> = (0..6).map(|i| format!("step-{i}")).collect();
    let steps = steps_of(&v);
    let names: Vec<&str> = steps.iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(names, expected, "{v}");
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["index"], i as u64, "{v}");
        assert_eq!(s["state"], "done", "{v}");
    }
    // The steps recorded before the kill are kept as they were (same time, same epoch) and
    // were not run again: one attempt each. At most one step was under way at the kill, and
    // only it may have run twice.
    let ran = lines(&attempts);
    let runs_of = |name: &str| ran.iter().filter(|l| *l == name).count();
    for old in steps_of(&before).iter().filter(|s| s["state"] == "done") {
        let i = old["index"].as_u64().unwrap() as usize;
        assert_eq!(
            &steps[i], old,
            "a step recorded before the kill changed: {v}"
        );
        let name = old["name"].as_str().unwrap();
        assert_eq!(runs_of(name), 1, "{name} ran again: {ran:?}");
    }
    for name in &expected {
        assert!(runs_of(name) >= 1, "{name} never ran: {ran:?}");
    }
    assert!(ran.len() <= 7, "more than one step ran twice: {ran:?}");
    assert_eq!(lines(&file), expected, "each side effect exactly once");
}

#[test]
fn a_durable_timer_fires_once_after_a_takeover() {
    const TIMER_MS: u64 = 4000;
    let mut three = Cluster::start();
    let all = three.all();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("side-effects.txt");
    let f = file.display();
    let runbook = json!({
        "name": "timer",
        "steps": [
            {"name": "a", "run": format!("grep -qx a '{f}' || echo a >> '{f}'"), "idempotent": true},
            {"name": "wait", "sleep_secs": TIMER_MS / 1000},
            {"name": "b", "run": format!("grep -qx b '{f}' || echo b >> '{f}'"), "idempotent": true}
        ]
    });
    let book = write_json(dir.path(), "timer.json", &runbook);
    let id = within(Duration::from_secs(30), "the start", || {
        let o = workflow(&all, &["run", &book, "--id", "timer-1"]);
        o.status.success().then(|| last_line(&o))
    });
    assert_eq!(id, "timer-1");

    // The timer armed: `wait` recorded `started` (its `done` record will replace it, so its
    // time is taken now).
    let (owner, epoch, armed_ms) = within(Duration::from_secs(30), "the timer armed", || {
        let v = get_workflow(&all, "timer-1")?;
        let wait = &v["steps"][1];
        assert!(
            v["status"] == "running" && wait["state"] != "done",
            "the timer fired before the kill: {v}"
        );
        (wait["name"] == "wait" && wait["state"] == "started")
            .then(|| (owner_of(&v), epoch_of(&v), wait["at_ms"].as_u64().unwrap()))
    });
    // The kill comes a second into the timer (polled on the wall clock the records use), so
    // that a timer restarted from zero by the new owner would fire at least that second late,
    // well apart from one that fires when due.
    within(Duration::from_secs(5), "a second into the timer", || {
        let v = get_workflow(&all, "timer-1")?;
        assert_eq!(v["steps"][1]["state"], "started", "{v}");
        (now_ms() >= armed_ms + 1000).then_some(())
    });
    three.kill9(owner);
    let killed_ms = now_ms();
    let survivors = three.survivors();
    // When the takeover was first seen (wall clock, ms): an upper bound of when the new owner
    // began waiting out the rest of the timer.
    let taken_ms = poll(AFTER_KILL, || {
        get_workflow(&survivors, "timer-1")
            .filter(|v| epoch_of(v) > epoch)
            .map(|_| now_ms())
    })
    .unwrap_or_else(|| panic!("no takeover after the kill\n{}", three.logs()));
    let v = settled(&survivors, "timer-1", AFTER_KILL).unwrap_or_else(|| {
        panic!(
            "timer-1 still running {AFTER_KILL:?} after the kill: {:?}\n{}",
            get_workflow(&survivors, "timer-1"),
            three.logs()
        )
    });
    assert_eq!(v["status"], "completed", "{v}\n{}", three.logs());
    assert_ne!(owner_of(&v), owner, "{v}");
    let new_epoch = epoch_of(&v);
    assert!(new_epoch > epoch, "{v}");
    let steps = steps_of(&v);
    let names: Vec<&str> = steps.iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(names, ["a", "wait", "b"], "one record per step: {v}");
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["index"], i as u64, "{v}");
        assert_eq!(s["state"], "done", "{v}");
    }
    let wait = &steps[1];
    assert_eq!(wait["epoch"], new_epoch, "fired by the new owner: {v}");
    let fired_ms = wait["at_ms"].as_u64().unwrap();
    let b_ms = steps[2]["at_ms"].as_u64().unwrap();
    let due_ms = armed_ms + TIMER_MS;
    eprintln!(
        "armed at {armed_ms}, owner {owner} killed +{} ms, takeover seen +{} ms, fired +{} ms, \
         b recorded +{} ms",
        killed_ms - armed_ms,
        taken_ms - armed_ms,
        fired_ms - armed_ms,
        b_ms - armed_ms
    );
    // Not skipped: b comes after the whole timer, counted from when it was armed.
    assert!(b_ms >= due_ms, "b recorded before the timer was due: {v}");
    // Not restarted from zero: fired when due, or at once if the takeover came later. Restarted
    // by the new owner, it would fire a whole timer after the takeover, which comes after the
    // kill, itself a second into the timer: at least a second after it was due.
    assert!(
        fired_ms <= due_ms.max(taken_ms) + 500,
        "the timer fired {} ms after it was due (takeover seen {} ms after the arming): {v}",
        fired_ms as i64 - due_ms as i64,
        taken_ms - armed_ms
    );
    assert_eq!(lines(&file), ["a", "b"], "each side effect exactly once");
}

#[test]
fn a_signal_releases_a_waiting_runbook_step_and_is_recorded() {
    let node = Node::start_env(&[], ENV);
    let ep = node.grpc.as_str();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("after.txt");
    let runbook = json!({
        "name": "approval",
        "steps": [
            {"name": "approve", "wait_signal": "go"},
            {"name": "apply", "run": format!("echo applied >> '{}'", file.display()), "idempotent": false}
        ]
    });
    let book = write_json(dir.path(), "approval.json", &runbook);
    let id = within(Duration::from_secs(30), "the start", || {
        let o = workflow(ep, &["run", &book, "--id", "approve-1"]);
        o.status.success().then(|| last_line(&o))
    });
    assert_eq!(id, "approve-1");
    let waiting = within(Duration::from_secs(30), "the run waiting", || {
        get_workflow(ep, "approve-1").filter(|v| v["status"] == "running")
    });
    assert_eq!(
        done_steps(&waiting),
        0,
        "nothing done before the signal: {waiting}"
    );
    assert!(lines(&file).is_empty(), "apply ran before the signal");

    // A watcher from before the signal sees the rest of the run as it happens, then ends.
    let watch_dir = tempfile::tempdir().unwrap();
    let (watcher, watched, watch_err) =
        spawn_workflow(ep, &["watch", "approve-1", "--json"], watch_dir.path());
    within(Duration::from_secs(30), "the watch's first event", || {
        (!read(&watched).is_empty()).then_some(())
    });

    let o = workflow(
        ep,
        &["signal", "approve-1", "go", "--value", r#"{"by":"ops"}"#],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v = settled(ep, "approve-1", Duration::from_secs(30)).expect("approve-1 settles");
    assert_eq!(v["status"], "completed", "{v}\n{}", node.stderr());
    let steps = steps_of(&v);
    assert_eq!(steps.len(), 2, "{v}");
    assert_eq!(steps[0]["name"], "approve", "{v}");
    assert_eq!(steps[0]["state"], "done", "{v}");
    assert_eq!(steps[0]["result"], json!({"by": "ops"}), "{v}");
    assert_eq!(steps[1]["name"], "apply", "{v}");
    assert_eq!(steps[1]["state"], "done", "{v}");
    assert_eq!(
        lines(&file),
        ["applied"],
        "apply ran once, after the signal"
    );

    let ended = wait_child(watcher, Duration::from_secs(30));
    assert!(ended.is_some_and(|s| s.success()), "{}", read(&watch_err));
    let events: Vec<Value> = lines(&watched)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seen: Vec<String> = events
        .iter()
        .map(|e| match (&e["run"], &e["step"]) {
            (Value::Object(r), _) => format!("run {}", r["status"].as_str().unwrap_or("")),
            (_, Value::Object(st)) => format!(
                "step {} {}",
                st["name"].as_str().unwrap_or(""),
                st["state"].as_str().unwrap_or("")
            ),
            _ => panic!("an event with neither a run nor a step: {e}"),
        })
        .collect();
    assert_eq!(
        seen,
        [
            "run running",
            "step approve done",
            "step apply started",
            "step apply done",
            "run completed"
        ],
        "{events:?}"
    );
}

#[test]
fn a_member_stopped_gracefully_hands_its_workflows_over_at_once() {
    // Failures are judged after a minute here: a run that moves sooner was handed over by its
    // owner, not taken over by the leader.
    const SLOW_FAILURE: &[(&str, &str)] = &[("LODGE_CLUSTER__HEARTBEAT_TIMEOUT_MS", "60000")];
    let mut three = Cluster::start_env(&[], SLOW_FAILURE);
    let all = three.all();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("side-effects.txt");
    let book = write_json(dir.path(), "steps.json", &steps_runbook(&file, 6, "0.3"));
    let id = within(Duration::from_secs(30), "the start", || {
        let o = workflow(&all, &["run", &book, "--id", "handed"]);
        o.status.success().then(|| last_line(&o))
    });
    let (owner, epoch) = within(Duration::from_secs(30), "a first step recorded", || {
        let v = get_workflow(&all, &id)?;
        (done_steps(&v) >= 1).then(|| (owner_of(&v), epoch_of(&v)))
    });
    let exit = three.terminate(owner);
    assert!(
        exit.is_some_and(|s| s.success()),
        "{exit:?}\n{}",
        three.logs()
    );
    let survivors = three.survivors();
    let v = settled(&survivors, &id, Duration::from_secs(30)).unwrap_or_else(|| {
        panic!(
            "{id} did not finish without its owner: {:?}\n{}",
            get_workflow(&survivors, &id),
            three.logs()
        )
    });
    assert_eq!(v["status"], "completed", "{v}");
    assert_ne!(owner_of(&v), owner, "{v}");
    assert_eq!(epoch_of(&v), epoch + 1, "one owner change: {v}");
    let expected: Vec<String> = (0..6).map(|i| format!("step-{i}")).collect();
    assert_eq!(lines(&file), expected, "each side effect exactly once");
    let log = read(
        &three.dead[(owner - 1) as usize]
            .as_ref()
            .unwrap()
            .path()
            .join("stderr.log"),
    );
    assert!(log.contains("workflows handed off"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// Helpers.

/// Where the owner is killed, relative to one step of [`steps_runbook`].
#[derive(Clone, Copy, Debug)]
enum At {
    /// The step before is recorded; this step's line is not in the file yet.
    Before,
    /// This step's line is in the file; the step is not recorded yet.
    During,
    /// This step is recorded.
    After,
}

/// The example worker (examples/workflow-worker.py) serving `py-pipeline` on the node at
/// `endpoint`; killed with SIGKILL when dropped.
struct PyWorker {
    child: Child,
}

impl PyWorker {
    /// Starts worker `id`, its steps journaled to `journal` (its stderr beside it), `hold`
    /// (`STEP:FILE`) passed on, and waits until its actor runs on the node.
    fn start(endpoint: &str, id: &str, journal: &Path, hold: Option<&str>) -> PyWorker {
        let log = journal.with_file_name(format!("worker-{id}.log"));
        let mut cmd = Command::new(test_python());
        cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/workflow-worker.py"))
            .args(["--node", endpoint, "--id", id])
            .arg("--journal")
            .arg(journal)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("worker log"));
        if let Some(hold) = hold {
            cmd.args(["--hold", hold]);
        }
        let worker = PyWorker {
            child: cmd.spawn().expect("running the example worker"),
        };
        let path = format!("/node/workers/{id}");
        within(Duration::from_secs(30), "the worker connects", || {
            ctl(endpoint, &["actor", &path])
                .status
                .success()
                .then_some(())
        });
        worker
    }

    /// `kill -9`, and reaped.
    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PyWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a py-pipeline run `id` on `endpoints`; polls until a member places it (a worker's
/// types reach the store just after it connects).
fn start_pipeline(endpoints: &str, id: &str) {
    within(Duration::from_secs(30), "the run starts", || {
        let o = workflow(
            endpoints,
            &[
                "start",
                "py-pipeline",
                "--id",
                id,
                "--input",
                r#"{"items": ["a", "b"]}"#,
            ],
        );
        o.status.success().then_some(())
    });
}

/// Asserts run `id` completed with the pipeline's result, its three steps recorded once, and
/// each step's side effect done exactly once, by the workers `by` names (fetch, transform,
/// publish).
fn assert_pipeline_done(v: &Value, journal: &Path, id: &str, by: [&str; 3]) {
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(
        v["result"],
        json!({"items": ["A", "B"], "published": 2}),
        "{v}"
    );
    let names: Vec<String> = steps_of(v)
        .iter()
        .map(|s| s["name"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(names, ["fetch", "transform", "publish"], "{v}");
    let mine: Vec<String> = lines(journal)
        .into_iter()
        .filter(|l| l.starts_with(&format!("{id} ")))
        .collect();
    let want: Vec<String> = ["fetch", "transform", "publish"]
        .iter()
        .zip(by)
        .map(|(step, worker)| format!("{id} {step} {worker}"))
        .collect();
    assert_eq!(
        mine, want,
        "every step's side effect once, by the worker that recorded it"
    );
}

/// A hello declaring a type the node's own code runs (the runbook), or none, is refused with
/// INVALID_ARGUMENT naming `types`.
fn assert_hello_refused(endpoint: &str) {
    use lodge_grpc::pb::workflow::{self as pb, workflow_client::WorkflowClient};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel =
            lodge_grpc::client::connect(endpoint, &lodge_grpc::client::ClientTls::default())
                .await
                .unwrap();
        for types in [vec![("runbook", 1)], vec![]] {
            let hello = pb::WorkerMessage {
                kind: Some(pb::worker_message::Kind::Hello(pb::WorkerHello {
                    worker_id: "claims".into(),
                    types: types
                        .iter()
                        .map(|(name, version)| pb::WorkerType {
                            name: name.to_string(),
                            version: *version,
                        })
                        .collect(),
                })),
            };
            let refused = WorkflowClient::new(channel.clone())
                .work(tokio_stream::iter(vec![hello]))
                .await
                .expect_err("the hello is refused");
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
            assert!(refused.message().starts_with("types"), "{refused}");
        }
    });
}

#[test]
fn the_python_example_worker_runs_a_type_and_a_second_worker_finishes_it_when_the_first_is_killed()
{
    let node = Node::start_env(&[], ENV);
    let ep = node.grpc.as_str();
    let dir = tempfile::tempdir().unwrap();
    let (journal, gate) = (dir.path().join("journal"), dir.path().join("gate"));

    // A run of a type only an external worker serves, start to end.
    let solo = PyWorker::start(ep, "solo", &journal, None);
    start_pipeline(ep, "py-once");
    let v = settled(ep, "py-once", AFTER_KILL).expect("py-once settles");
    assert_pipeline_done(&v, &journal, "py-once", ["solo", "solo", "solo"]);
    assert_eq!(owner_of(&v), 1, "{v}");

    // A second worker with a connected worker's id is refused, naming the field.
    let twin = Command::new(test_python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/workflow-worker.py"))
        .args(["--node", ep, "--id", "solo"])
        .output()
        .expect("running the example worker");
    assert!(
        !twin.status.success(),
        "a second worker named solo is refused"
    );
    assert!(
        stderr(&twin).contains("worker_id") && stderr(&twin).contains("already"),
        "{}",
        stderr(&twin)
    );
    solo.kill9();
    assert_hello_refused(ep);

    // Worker A records `fetch`, then holds before `transform`; B connects; A is killed.
    let a = PyWorker::start(
        ep,
        "a",
        &journal,
        Some(&format!("transform:{}", gate.display())),
    );
    start_pipeline(ep, "py-moved");
    within(AFTER_KILL, "fetch recorded by worker a", || {
        get_workflow(ep, "py-moved").filter(|v| done_steps(v) == 1)
    });
    let _b = PyWorker::start(ep, "b", &journal, None);
    a.kill9();

    // B gets the run with its recorded step, replays it and runs the other two; nothing twice.
    let v = settled(ep, "py-moved", AFTER_KILL)
        .unwrap_or_else(|| panic!("py-moved settles: {}", node.stderr()));
    assert_pipeline_done(&v, &journal, "py-moved", ["a", "b", "b"]);
    assert!(!gate.exists(), "worker a never got past its hold");
    let b = ctl(ep, &["actor", "/node/workers/b"]);
    assert!(stdout(&b).contains("\"activations\": 1"), "{}", stdout(&b));
}

#[test]
fn when_the_last_worker_of_a_type_on_the_owner_dies_its_run_moves_to_a_member_with_one() {
    let three = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let (journal, gate) = (dir.path().join("journal"), dir.path().join("gate"));
    let (one, two) = (three.trio.addr(0), three.trio.addr(1));

    // Only member 1 serves the type, so the run is placed there.
    let a = PyWorker::start(
        &one,
        "a",
        &journal,
        Some(&format!("transform:{}", gate.display())),
    );
    start_pipeline(&three.all(), "py-across");
    let first = within(AFTER_KILL, "fetch recorded by worker a", || {
        get_workflow(&three.all(), "py-across").filter(|v| done_steps(v) == 1)
    });
    assert_eq!(owner_of(&first), 1, "{first}");

    // B serves it on member 2; A dies: member 1 has no worker for the type, so it moves the run.
    let _b = PyWorker::start(&two, "b", &journal, None);
    a.kill9();
    let v = settled(&three.all(), "py-across", AFTER_KILL)
        .unwrap_or_else(|| panic!("py-across settles:\n{}", three.logs()));
    assert_pipeline_done(&v, &journal, "py-across", ["a", "b", "b"]);
    assert_eq!(owner_of(&v), 2, "{v}");
    assert!(
        epoch_of(&v) > epoch_of(&first),
        "a move is a new epoch: {v}"
    );
}

/// Starts a 5-step [`steps_runbook`] on a fresh three-member cluster, kills its owner at `at`
/// step `step`, and checks that a survivor completes it with every line written once.
fn kill_the_owner_and_finish_on_a_survivor(step: usize, at: At) {
    let mut three = Cluster::start();
    let all = three.all();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("side-effects.txt");
    let id = format!("steps-{step}-{at:?}").to_lowercase();
    let book = write_json(dir.path(), "steps.json", &steps_runbook(&file, 5, "0.4"));
    let started = within(Duration::from_secs(30), "the start", || {
        let o = workflow(&all, &["run", &book, "--id", &id]);
        o.status.success().then(|| last_line(&o))
    });
    assert_eq!(started, id);

    let (owner, epoch) = wait_for_position(&all, &id, &file, step, at);
    three.kill9(owner);
    let killed = Instant::now();
    let survivors = three.survivors();
    let v = settled(&survivors, &id, AFTER_KILL).unwrap_or_else(|| {
        panic!(
            "{id} still running {AFTER_KILL:?} after the kill: {:?}\n{}",
            get_workflow(&survivors, &id),
            three.logs()
        )
    });
    eprintln!(
        "{at:?} step {step}: owner {owner} killed, settled on {} in {:?}",
        v["owner"],
        killed.elapsed()
    );
    assert_eq!(v["status"], "completed", "{v}\n{}", three.logs());
    let new_owner = v["owner"].as_u64().expect("owner");
    assert_ne!(new_owner, owner, "the owner changed: {v}");
    let new_epoch = epoch_of(&v);
    assert!(new_epoch > epoch && new_epoch >= 2, "epoch {epoch} -> {v}");
    assert_eq!(v["result"], json!({"name": "steps", "steps": 5}), "{v}");
    let expected: Vec<String> = (0..5).map(|i| format!("step-{i}")).collect();
    let steps = v["steps"].as_array().expect("steps");
    let names: Vec<&str> = steps.iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(names, expected, "{v}");
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["index"], i as u64, "{v}");
        assert_eq!(s["state"], "done", "{v}");
    }
    assert_eq!(lines(&file), expected, "each side effect exactly once");
}

/// Polls until the run reaches `at` step `step` and answers its owner and epoch at that moment.
/// Fails if the position went by between two polls (the windows are 400 ms wide).
fn wait_for_position(endpoints: &str, id: &str, file: &Path, step: usize, at: At) -> (u64, u64) {
    let line = format!("step-{step}");
    within(
        Duration::from_secs(30),
        &format!("{id}: {at:?} step {step}"),
        || {
            // The file is read on both sides of the get: a line there before it was there while
            // the get ran ("during"), a line missing after it was missing then ("before").
            let had_line = lines(file).contains(&line);
            let v = get_workflow(endpoints, id)?;
            let has_line = lines(file).contains(&line);
            let done = done_steps(&v);
            let (reached, passed) = match at {
                At::Before => (done == step && !has_line, done > step || has_line),
                At::During => (had_line && done == step, done > step),
                At::After => (done == step + 1, done > step + 1),
            };
            assert!(
                v["status"] == "running" && !passed,
                "{id}: missed the kill position {at:?} step {step}: {v}; file {:?}",
                lines(file)
            );
            reached.then(|| (owner_of(&v), epoch_of(&v)))
        },
    )
}

/// Three members on loopback, each with [`ENV`], ready for workflows.
struct Cluster {
    trio: Trio,
    /// The members' environment.
    env: &'static [(&'static str, &'static str)],
    /// By index (member id - 1); `None` once killed.
    nodes: Vec<Option<Node>>,
    /// The data directories of killed members, by index, kept for a restart (and their logs).
    dead: Vec<Option<tempfile::TempDir>>,
}

impl Cluster {
    /// Starts the members and waits until they are ready (see [`Cluster::ready`]).
    fn start() -> Cluster {
        Self::start_with(&[])
    }

    /// Like [`Cluster::start`], every member also started with `extra` flags
    /// (`--allow-mutations` lets [`Cluster::faults`] inject faults).
    fn start_with(extra: &[&'static str]) -> Cluster {
        Self::start_env(extra, ENV)
    }

    /// Like [`Cluster::start_with`], the members in `env` instead of [`ENV`].
    fn start_env(extra: &[&'static str], env: &'static [(&'static str, &'static str)]) -> Cluster {
        let trio = Trio::new("[cluster]\ntick_ms = 20\n", extra);
        let nodes: Vec<Option<Node>> = (0..3)
            .map(|i| {
                Some(start_member(
                    &trio,
                    i,
                    tempfile::tempdir().expect("temp dir"),
                    env,
                ))
            })
            .collect();
        let three = Cluster {
            trio,
            env,
            nodes,
            dead: (0..3).map(|_| None).collect(),
        };
        three.ready();
        three
    }

    /// Waits until the members take writes, all are live, and every one has published its
    /// types (so placement may choose any).
    fn ready(&self) {
        let all = self.all();
        eventually("a first write", || {
            kv(&all, &["put", "ready", "1"])
                .status
                .success()
                .then_some(())
        });
        eventually("every member live", || {
            let t = json_of(cluster(&all, &["members", "--json"]))?;
            let live = t["members"]
                .as_array()?
                .iter()
                .filter(|m| m["reachable"] == true)
                .count();
            (live == 3).then_some(())
        });
        eventually("the runbook type on every member", || {
            let t = json_of(workflow(&all, &["types", "--json"]))?;
            let n = t["types"]
                .as_array()?
                .iter()
                .find(|t| t["name"] == "runbook")?["nodes"]
                .as_array()?
                .len();
            (n == 3).then_some(())
        });
    }

    /// Every member's client address, comma-separated.
    fn all(&self) -> String {
        self.endpoints(&[1, 2, 3])
    }

    /// The client addresses of members `ids` (1-based), comma-separated.
    fn endpoints(&self, ids: &[u64]) -> String {
        ids.iter()
            .map(|id| self.trio.addr((id - 1) as usize))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client addresses of the members still running.
    fn survivors(&self) -> String {
        (0..3)
            .filter(|i| self.nodes[*i].is_some())
            .map(|i| self.trio.addr(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `kill -9` of member `id` (1-based, as `owner` gives it); its data directory is kept.
    fn kill9(&mut self, id: u64) {
        assert!((1..=3).contains(&id), "no member {id}");
        let i = (id - 1) as usize;
        let node = self.nodes[i]
            .take()
            .unwrap_or_else(|| panic!("member {id} already killed"));
        self.dead[i] = Some(node.kill9());
    }

    /// Starts killed member `id` again on its data directory and address.
    fn restart(&mut self, id: u64) {
        let i = (id - 1) as usize;
        let dir = self.dead[i]
            .take()
            .unwrap_or_else(|| panic!("member {id} is not killed"));
        self.nodes[i] = Some(start_member(&self.trio, i, dir, self.env));
    }

    /// Stops member `id` with SIGTERM and answers how it exited; its data directory is kept.
    fn terminate(&mut self, id: u64) -> Option<std::process::ExitStatus> {
        let i = (id - 1) as usize;
        let mut node = self.nodes[i]
            .take()
            .unwrap_or_else(|| panic!("member {id} is not running"));
        let status = node.terminate(Duration::from_secs(30));
        self.dead[i] = Some(node.kill9());
        status
    }

    /// Replaces member `id`'s injected faults: its raft traffic with `drop` is lost both ways
    /// (none: healed).
    fn faults(&self, id: u64, drop: &[u64]) {
        let mut args = vec!["faults".to_string()];
        if !drop.is_empty() {
            let ids: Vec<String> = drop.iter().map(u64::to_string).collect();
            args.extend(["--drop".to_string(), ids.join(",")]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = ctl(&self.trio.addr((id - 1) as usize), &args);
        assert!(out.status.success(), "faults on {id}: {}", stderr(&out));
    }

    /// The end of every member's log (a killed member's too), for failure messages.
    fn logs(&self) -> String {
        (0..3)
            .filter_map(|i| {
                let log = match (&self.nodes[i], &self.dead[i]) {
                    (Some(n), _) => n.stderr(),
                    (None, Some(dir)) => read(&dir.path().join("stderr.log")),
                    (None, None) => return None,
                };
                Some((i + 1, log))
            })
            .map(|(id, log)| {
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(40)..].join("\n");
                format!("--- member {id} (last 40 lines) ---\n{tail}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Starts member index `i` of `trio` keeping its data in `dir` (fresh, or a killed member's to
/// restart it), with `env`.
fn start_member(trio: &Trio, i: usize, dir: tempfile::TempDir, env: &[(&str, &str)]) -> Node {
    let args = trio.args(i);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Node::start_in_env(dir, &trio.addr(i), &args, env)
}

/// A runbook of `n` idempotent steps `step-<i>`, each holding `hold` seconds before and after
/// appending its name to `file` under an idempotency key (only if the line is not there yet):
/// whenever its owner dies, a re-run leaves the line in the file once.
fn steps_runbook(file: &Path, n: usize, hold: &str) -> Value {
    let f = file.display();
    let steps: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "name": format!("step-{i}"),
                "run": format!("sleep {hold}; grep -qx step-{i} '{f}' || echo step-{i} >> '{f}'; sleep {hold}"),
                "idempotent": true,
            })
        })
        .collect();
    json!({"name": "steps", "steps": steps})
}

/// Like [`steps_runbook`], each step first appending its name to `attempts` unconditionally: a
/// step that ran twice is there twice.
fn counted_steps_runbook(file: &Path, attempts: &Path, n: usize, hold: &str) -> Value {
    let (f, a) = (file.display(), attempts.display());
    let steps: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "name": format!("step-{i}"),
                "run": format!("echo step-{i} >> '{a}'; sleep {hold}; grep -qx step-{i} '{f}' || echo step-{i} >> '{f}'; sleep {hold}"),
                "idempotent": true,
            })
        })
        .collect();
    json!({"name": "steps", "steps": steps})
}

/// Runs `lodge workflow --endpoint ENDPOINTS ARGS`.
fn workflow(endpoints: &str, args: &[&str]) -> Output {
    Command::new(LODGE)
        .arg("workflow")
        .args(["--endpoint", endpoints])
        .args(args)
        .env_remove("LODGE_ENDPOINT")
        .output()
        .expect("running lodge workflow")
}

/// Like [`workflow`], for a command that might not end (a stream): killed past `limit`, then
/// `None`. Answers the exit, stdout and stderr.
fn workflow_bounded(
    endpoints: &str,
    args: &[&str],
    limit: Duration,
) -> (Option<std::process::ExitStatus>, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (child, out, err) = spawn_workflow(endpoints, args, dir.path());
    let status = wait_child(child, limit);
    (status, read(&out), read(&err))
}

/// Starts `lodge workflow --endpoint ENDPOINTS ARGS` with its stdout and stderr in files under
/// `dir`; answers the process and the two files.
fn spawn_workflow(endpoints: &str, args: &[&str], dir: &Path) -> (Child, PathBuf, PathBuf) {
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    let child = Command::new(LODGE)
        .arg("workflow")
        .args(["--endpoint", endpoints])
        .args(args)
        .env_remove("LODGE_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .expect("running lodge workflow");
    (child, out, err)
}

/// `lodge workflow get ID --json`; `None` if it failed.
fn get_workflow(endpoints: &str, id: &str) -> Option<Value> {
    json_of(workflow(endpoints, &["get", id, "--json"]))
}

/// Polls until the workflow is no longer running; its document then, or `None` past `limit`.
fn settled(endpoints: &str, id: &str, limit: Duration) -> Option<Value> {
    poll(limit, || {
        get_workflow(endpoints, id).filter(|v| v["status"] != "running")
    })
}

/// Retries `f` until it answers, at most for `limit`; `None` past that.
fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Like [`poll`], failing past `limit`: the bound only turns a hang into a failure.
fn within<T>(limit: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    poll(limit, f).unwrap_or_else(|| panic!("{what}: not reached in {limit:?}"))
}

/// How many of the workflow's steps are recorded as done.
fn done_steps(v: &Value) -> usize {
    v["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["state"] == "done")
        .count()
}

/// The recorded steps of a `get --json` answer, in order.
fn steps_of(v: &Value) -> Vec<Value> {
    v["steps"].as_array().cloned().unwrap_or_default()
}

/// The wall clock in ms since the Unix epoch (what step records' `at_ms` count).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn owner_of(v: &Value) -> u64 {
    v["owner"]
        .as_u64()
        .unwrap_or_else(|| panic!("no owner: {v}"))
}

fn epoch_of(v: &Value) -> u64 {
    v["epoch"]
        .as_u64()
        .unwrap_or_else(|| panic!("no epoch: {v}"))
}

/// The ids of a `list --json` answer, in order.
fn ids(list: &Value) -> Vec<&str> {
    list["workflows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["id"].as_str())
        .collect()
}

/// The last line of a command's stdout (where `run` and `start` print the id).
fn last_line(o: &Output) -> String {
    stdout(o).lines().last().unwrap_or("").trim().to_string()
}

/// Writes `value` as `dir/name`; answers the path.
fn write_json(dir: &Path, name: &str, value: &Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(value).unwrap()).unwrap();
    path.display().to_string()
}

/// A file's content; empty if it does not exist (yet).
fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A file's lines; none if it does not exist (yet).
fn lines(path: &Path) -> Vec<String> {
    read(path).lines().map(String::from).collect()
}
