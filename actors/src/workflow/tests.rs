//! The workflow engine on the real KV state machine in memory: replay, fencing, the determinism
//! guard, run-once steps, timers, signals, and retries of failing or panicking code.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::Notify;

use super::ctx::{Ctx, Types, WorkflowError};
use super::metrics::WorkflowMetrics;
use super::record::{Run, Status, StepRecord, StepState};
use super::records::{RecordError, Records};
use super::run::{RetrySettings, WorkflowRun};
use super::worker::{self, Activate, Disconnect, FromWorker, Report, ToWorker, WorkflowWorker};
use crate::cluster::store::MemoryStore;
use crate::envelope::ActorRef;

fn records() -> Records {
    Records::new(Arc::new(MemoryStore::new()))
}

fn run(id: &str, owner: u64) -> Run {
    Run::new(id.into(), "t".into(), 1, json!({"n": 3}), owner)
}

/// A context for `run` as its owner sees it now, replaying what is recorded.
async fn ctx_of(records: &Records, run: &Run) -> Ctx {
    let steps = records.steps(&run.id).await.unwrap();
    Ctx::new(
        &run.id,
        run.owner,
        run.epoch,
        records.clone(),
        steps,
        Arc::new(Notify::new()),
    )
}

/// Asks for `names` in order, each step counting its runs in `ran`.
async fn steps(ctx: &Ctx, names: &[&str], ran: &AtomicUsize) -> Result<Vec<usize>, WorkflowError> {
    let mut out = Vec::new();
    for name in names {
        let v = ctx
            .step(name, || async {
                Ok::<_, String>(ran.fetch_add(1, Ordering::SeqCst))
            })
            .await?;
        out.push(v);
    }
    Ok(out)
}

fn names(steps: &[StepRecord]) -> Vec<&str> {
    steps.iter().map(|s| s.name.as_str()).collect()
}

#[actix_rt::test]
async fn recorded_steps_are_replayed_without_running_them_again() {
    let records = records();
    let r = run("w", 1);
    records.start(&r).await.unwrap();
    let ran = AtomicUsize::new(0);
    let first = steps(&ctx_of(&records, &r).await, &["a", "b", "c"], &ran)
        .await
        .unwrap();
    assert_eq!(first, [0, 1, 2]);
    let recorded = records.steps("w").await.unwrap();
    assert_eq!(names(&recorded), ["a", "b", "c"]);
    assert!(recorded
        .iter()
        .all(|s| s.state == StepState::Done && s.epoch == 1));

    // A restart (or a takeover) replays: the same answers, nothing run.
    let again = steps(&ctx_of(&records, &r).await, &["a", "b", "c"], &ran)
        .await
        .unwrap();
    assert_eq!(again, first);
    assert_eq!(ran.load(Ordering::SeqCst), 3);
}

#[actix_rt::test]
async fn a_start_is_idempotent_by_id() {
    let records = records();
    let (first, created) = records.start(&run("w", 1)).await.unwrap();
    assert!(created);
    let mut other = run("w", 2);
    other.input = json!("something else");
    let (second, created) = records.start(&other).await.unwrap();
    assert!(!created);
    assert_eq!(
        second.run, first.run,
        "the existing run, not the second request"
    );
}

#[actix_rt::test]
async fn an_ex_owner_cannot_record_a_step_after_the_takeover() {
    let records = records();
    let r = run("w", 1);
    records.start(&r).await.unwrap();
    let ran = AtomicUsize::new(0);
    let old = ctx_of(&records, &r).await;
    steps(&old, &["a"], &ran).await.unwrap();

    let read = records.get("w").await.unwrap();
    let moved = records.change_owner(&read, 2).await.unwrap();
    assert_eq!((moved.run.owner, moved.run.epoch), (2, 2));
    // A second takeover from the same read loses the compare-and-set.
    assert!(matches!(
        records.change_owner(&read, 3).await,
        Err(RecordError::Refused(_))
    ));

    let late = steps(&old, &["a", "b"], &ran).await;
    match late {
        Err(WorkflowError::Fenced(m)) => assert!(m.contains("2/2"), "{m}"),
        other => panic!("an ex-owner's write went through: {other:?}"),
    }
    assert_eq!(names(&records.steps("w").await.unwrap()), ["a"]);
    let end = records
        .rewrite("w", Some((1, 1)), |run| {
            run.status = Status::Completed;
            Ok(true)
        })
        .await;
    assert!(matches!(end, Err(RecordError::Fenced { .. })), "{end:?}");

    // The new owner replays `a` and records its own `b`. (The ex-owner, not knowing, ran its
    // `b` too, as a cut-off owner may: fencing refuses its record, not its side effect, which is
    // why a step that must not run twice is a run-once step.)
    let new = ctx_of(&records, &moved.run).await;
    assert_eq!(steps(&new, &["a", "b"], &ran).await.unwrap(), [0, 2]);
    let recorded = records.steps("w").await.unwrap();
    assert_eq!(recorded.iter().map(|s| s.epoch).collect::<Vec<_>>(), [1, 2]);
}

#[actix_rt::test]
async fn a_changed_step_sequence_is_stopped_as_nondeterministic_with_both_sequences() {
    let records = records();
    let r = run("w", 1);
    records.start(&r).await.unwrap();
    let ran = AtomicUsize::new(0);
    steps(&ctx_of(&records, &r).await, &["a", "b"], &ran)
        .await
        .unwrap();

    let changed = steps(&ctx_of(&records, &r).await, &["a", "c"], &ran).await;
    let e = changed.unwrap_err();
    assert_eq!(
        e,
        WorkflowError::Nondeterministic {
            recorded: vec!["a".into(), "b".into()],
            replayed: vec!["a".into(), "c".into()],
        }
    );
    assert!(e.to_string().starts_with("nondeterministic: "), "{e}");

    // Code that asks for fewer steps than were recorded is caught when it returns.
    let shorter = ctx_of(&records, &r).await;
    steps(&shorter, &["a"], &ran).await.unwrap();
    assert!(matches!(
        shorter.check_complete(),
        Err(WorkflowError::Nondeterministic { .. })
    ));
    assert_eq!(ran.load(Ordering::SeqCst), 2, "nothing ran again");
}

#[actix_rt::test]
async fn a_run_once_step_that_started_but_never_ended_needs_attention_and_is_not_run() {
    let records = records();
    let r = run("w", 1);
    records.start(&r).await.unwrap();
    // What an owner dying inside the step leaves: its start, no end.
    let started = StepRecord {
        name: "charge".into(),
        state: StepState::Started,
        result: Value::Null,
        until_ms: None,
        at_ms: 1,
        epoch: 1,
    };
    records.record_step("w", 1, 1, 0, &started).await.unwrap();
    let ran = AtomicUsize::new(0);
    let ctx = ctx_of(&records, &r).await;
    let once = ctx
        .step_once("charge", || async {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>(())
        })
        .await;
    assert!(
        matches!(once, Err(WorkflowError::NeedsAttention(_))),
        "{once:?}"
    );
    assert_eq!(ran.load(Ordering::SeqCst), 0);

    // The same record under an at-least-once step: run again, and recorded done.
    let ctx = ctx_of(&records, &r).await;
    ctx.step("charge", || async {
        ran.fetch_add(1, Ordering::SeqCst);
        Ok::<_, String>(())
    })
    .await
    .unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    assert_eq!(records.steps("w").await.unwrap()[0].state, StepState::Done);
}

#[actix_rt::test]
async fn a_timer_keeps_its_first_deadline_and_fires_once() {
    let records = records();
    let r = run("w", 1);
    records.start(&r).await.unwrap();
    // Armed by an earlier owner, due already: the new owner fires it at once, not a full
    // duration later.
    let armed = StepRecord {
        name: "wait".into(),
        state: StepState::Started,
        result: Value::Null,
        until_ms: Some(crate::clock::precise_ms() - 1),
        at_ms: 1,
        epoch: 1,
    };
    records.record_step("w", 1, 1, 0, &armed).await.unwrap();
    let ctx = ctx_of(&records, &r).await;
    tokio::time::timeout(
        Duration::from_secs(5),
        ctx.sleep("wait", Duration::from_secs(3600)),
    )
    .await
    .expect("a due timer fires at once")
    .unwrap();
    let fired = records.steps("w").await.unwrap();
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].state, StepState::Done);
    assert_eq!(fired[0].until_ms, armed.until_ms);
}

#[actix_rt::test]
async fn a_signal_is_taken_once_and_its_value_replayed() {
    let records = records();
    let r = run("w", 1);
    records.start(&r).await.unwrap();
    records
        .signal("w", "go", &json!({"by": "ops"}))
        .await
        .unwrap();
    let v: Value = ctx_of(&records, &r).await.signal("go").await.unwrap();
    assert_eq!(v, json!({"by": "ops"}));
    // Replayed from the record, whatever the signal key holds now.
    let v: Value = ctx_of(&records, &r).await.signal("go").await.unwrap();
    assert_eq!(v, json!({"by": "ops"}));

    records
        .rewrite("w", Some((1, 1)), |run| {
            run.status = Status::Completed;
            Ok(true)
        })
        .await
        .unwrap();
    let late = records.signal("w", "go", &Value::Null).await;
    assert!(
        matches!(&late, Err(RecordError::Refused(m)) if m.contains("completed")),
        "{late:?}"
    );
}

/// Starts a run of `types`'s type `t` under a [`WorkflowRun`] and waits until it ends.
async fn run_to_the_end(types: Types, retry: RetrySettings) -> Run {
    use actix::Actor;
    let records = records();
    let r = run("w", 1);
    records.start(&r).await.unwrap();
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let _actor = WorkflowRun::new(
        r,
        1,
        records.clone(),
        Arc::new(types),
        ActorRef::default(),
        retry,
        WorkflowMetrics::default(),
        &log,
    )
    .start();
    for _ in 0..500 {
        let now = records.get("w").await.unwrap().run;
        if now.status != Status::Running {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the run did not end");
}

fn quick(max_attempts: u32) -> RetrySettings {
    RetrySettings {
        max_attempts,
        first_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
    }
}

#[actix_rt::test]
async fn code_that_panics_is_retried_from_the_record_then_failed_with_the_reason() {
    let attempts = Arc::new(AtomicUsize::new(0));
    let ran = Arc::new(AtomicUsize::new(0));
    let (a, r) = (attempts.clone(), ran.clone());
    let types = Types::new().register("t", 1, move |ctx: Ctx, _: Value| {
        let (a, r) = (a.clone(), r.clone());
        async move {
            ctx.step("first", || async {
                r.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>(())
            })
            .await?;
            if a.fetch_add(1, Ordering::SeqCst) < 2 {
                panic!("flaky");
            }
            Ok::<_, WorkflowError>(json!("done"))
        }
    });
    let ended = run_to_the_end(types, quick(5)).await;
    assert_eq!(ended.status, Status::Completed, "{ended:?}");
    assert_eq!(ended.result, Some(json!("done")));
    assert_eq!(
        ran.load(Ordering::SeqCst),
        1,
        "the recorded step was not run again"
    );

    let always = Types::new().register("t", 1, |_: Ctx, _: Value| async move {
        if true {
            panic!("always");
        }
        Ok::<Value, WorkflowError>(Value::Null)
    });
    let ended = run_to_the_end(always, quick(3)).await;
    assert_eq!(ended.status, Status::Failed);
    let error = ended.error.unwrap();
    assert!(
        error.contains("gave up after 3 attempts") && error.contains("always"),
        "{error}"
    );
}

#[actix_rt::test]
async fn a_final_failure_is_not_retried() {
    let attempts = Arc::new(AtomicUsize::new(0));
    let a = attempts.clone();
    let types = Types::new().register("t", 1, move |_: Ctx, _: Value| {
        let a = a.clone();
        async move {
            a.fetch_add(1, Ordering::SeqCst);
            Err::<Value, _>(WorkflowError::Failed("bad input".into()))
        }
    });
    let ended = run_to_the_end(types, quick(5)).await;
    assert_eq!(ended.status, Status::Failed);
    assert_eq!(ended.error.as_deref(), Some("bad input"));
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
}

#[actix_rt::test]
async fn a_workers_step_is_recorded_only_at_the_next_index_and_its_activations_epoch() {
    let records = records();
    let r = run("w", 1);
    records.start(&r).await.unwrap();
    let ctx = ctx_of(&records, &r).await;
    let ok = worker::record(&r, &ctx, 1, 0, "a", json!(1)).await;
    assert_eq!(ok, Ok(()));
    let skipped = worker::record(&r, &ctx, 1, 2, "c", json!(3)).await;
    assert!(
        matches!(&skipped, Err(WorkflowError::Retry(m)) if m.contains("step 2") && m.contains("next step is 1")),
        "{skipped:?}"
    );
    let stale = worker::record(&r, &ctx, 0, 1, "b", json!(2)).await;
    assert!(
        matches!(&stale, Err(WorkflowError::Fenced(m)) if m.contains("epoch 0")),
        "{stale:?}"
    );
    let recorded = records.steps("w").await.unwrap();
    assert_eq!(names(&recorded), ["a"]);
    assert_eq!(recorded[0].result, json!(1));

    // A later activation replays the record: the worker gets it, its next step is 1.
    let again = ctx_of(&records, &r).await;
    assert_eq!(names(&again.replay_all()), ["a"]);
    assert_eq!(again.next_index(), 1);
}

#[actix_rt::test]
async fn a_worker_actor_routes_reports_to_their_activation_and_ends_them_when_it_stops() {
    use actix::Actor;
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let (out, mut tasks) = tokio::sync::mpsc::channel(worker::WORKER_QUEUE);
    let info = super::record::TypeInfo {
        name: "t".into(),
        version: 1,
    };
    let addr = WorkflowWorker::new(
        "w1".into(),
        vec![info],
        ActorRef::default(),
        ActorRef::default(),
        out,
        &log,
    )
    .start();
    let r = run("w", 1);
    let mut activation = addr
        .send(Activate {
            run: r.clone(),
            steps: Vec::new(),
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        tasks.recv().await,
        Some(ToWorker::Activate {
            run: r.clone(),
            steps: Vec::new()
        })
    );

    let step = FromWorker::Step {
        run_id: "w".into(),
        epoch: 1,
        index: 0,
        name: "a".into(),
        result: json!(1),
    };
    addr.send(Report(step.clone())).await.unwrap();
    assert_eq!(activation.inbox.recv().await, Some(step));

    // A report about a run not active here is refused to the worker, naming the run.
    let stray = FromWorker::Step {
        run_id: "other".into(),
        epoch: 1,
        index: 0,
        name: "a".into(),
        result: json!(1),
    };
    addr.send(Report(stray)).await.unwrap();
    match tasks.recv().await {
        Some(ToWorker::Recorded {
            run_id,
            index: 0,
            error: Some(e),
        }) => assert!(run_id == "other" && e.contains("not active"), "{e}"),
        other => panic!("{other:?}"),
    }

    // The worker's stream ends: the activation sees its inbox close ("worker gone").
    addr.send(Disconnect).await.unwrap();
    assert_eq!(activation.inbox.recv().await, None);
}
