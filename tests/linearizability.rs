//! A history check: concurrent clients put, get and compare-and-swap a few keys on a 3-member
//! cluster of real `lodge` processes while members are partitioned (injected faults) and killed
//! with SIGKILL and restarted. The recorded history must be linearizable (checked with
//! `lodge_test_support::history`, a Wing & Gong / Lowe checker).
//!
//! A write whose answer did not come back (timeout, connection lost, leadership changed) is
//! recorded with an unknown outcome: it may have applied at any point after it was sent. A read
//! that failed is not recorded: it observed nothing.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use lodge_grpc::pb::kv::{self as pb, kv_client::KvClient};
use lodge_test_support::history::{check, Budget, History, Op, Outcome, Verdict};
use tonic::transport::{Channel, Endpoint};

const CLIENTS: u64 = 4;
const KEYS: usize = 3;

/// What one client learned: its operations go straight into the shared history.
struct Recorder {
    history: Mutex<History>,
    t0: Instant,
}

impl Recorder {
    fn now(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    fn record(&self, client: u64, op: Op, invoke: u64, outcome: Outcome) {
        let at = self.now();
        self.history
            .lock()
            .unwrap()
            .record(client, op, invoke, outcome, at)
            .expect("a well-formed record");
    }
}

fn request<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(Duration::from_secs(2));
    r
}

/// A write's outcome from its answer: an error other than a refusal of the request itself may
/// hide an applied write.
fn write_outcome<T>(r: &Result<T, tonic::Status>, ok: impl Fn(&T) -> Outcome) -> Outcome {
    match r {
        Ok(v) => ok(v),
        Err(s) => {
            assert_ne!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
            Outcome::Unknown
        }
    }
}

async fn client(id: u64, channels: Vec<Channel>, rec: Arc<Recorder>, until: Instant) -> usize {
    let mut rng = fastrand::Rng::with_seed(id);
    let mut last_seen: Vec<Option<String>> = vec![None; KEYS];
    let mut answered = 0;
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        let k = rng.usize(..KEYS);
        let key = format!("k{k}");
        let mut c = KvClient::new(channels[rng.usize(..channels.len())].clone());
        let invoke = rec.now();
        match rng.u8(..10) {
            0..=3 => {
                let value = format!("c{id}-{n}");
                let r = c
                    .put(request(pb::PutRequest {
                        key: key.clone().into_bytes(),
                        value: value.clone().into_bytes(),
                        ..Default::default()
                    }))
                    .await;
                answered += r.is_ok() as usize;
                let outcome = write_outcome(&r, |_| Outcome::Done);
                rec.record(id, Op::Put { key, value }, invoke, outcome);
            }
            4..=6 => {
                let r = c
                    .range(request(pb::RangeRequest {
                        key: key.clone().into_bytes(),
                        ..Default::default()
                    }))
                    .await;
                if let Ok(r) = r {
                    answered += 1;
                    let value = r
                        .into_inner()
                        .kvs
                        .first()
                        .map(|kv| String::from_utf8(kv.value.clone()).unwrap());
                    last_seen[k] = value.clone();
                    rec.record(id, Op::Get { key }, invoke, Outcome::Read(value));
                }
            }
            _ => {
                let expect = last_seen[k].clone();
                let new = format!("c{id}-{n}");
                let target = match &expect {
                    Some(v) => pb::compare::Target::Value(v.clone().into_bytes()),
                    None => pb::compare::Target::Version(0),
                };
                let txn = pb::TxnRequest {
                    compare: vec![pb::Compare {
                        result: pb::compare::Result::Equal as i32,
                        key: key.clone().into_bytes(),
                        target: Some(target),
                    }],
                    success: vec![pb::RequestOp {
                        request: Some(pb::request_op::Request::Put(pb::PutRequest {
                            key: key.clone().into_bytes(),
                            value: new.clone().into_bytes(),
                            ..Default::default()
                        })),
                    }],
                    failure: vec![],
                };
                let r = c.txn(request(txn)).await;
                answered += r.is_ok() as usize;
                let outcome = write_outcome(&r, |r| Outcome::Cas(r.get_ref().succeeded));
                rec.record(id, Op::Cas { key, expect, new }, invoke, outcome);
            }
        }
    }
    answered
}

#[test]
fn concurrent_clients_see_a_linearizable_history_through_partitions_and_kill_9() {
    let trio = Trio::new("[cluster]\ntick_ms = 20\n", &["--allow-mutations"]);
    let mut nodes: Vec<Option<Node>> = (0..3)
        .map(|i| Some(trio.start(i, tempfile::tempdir().unwrap())))
        .collect();
    let all = (0..3).map(|i| trio.addr(i)).collect::<Vec<_>>().join(",");
    eventually("a first write", || {
        kv(&all, &["put", "warmup", "1"])
            .status
            .success()
            .then_some(())
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let channels: Vec<Channel> = (0..3)
        .map(|i| {
            let _guard = rt.enter();
            Endpoint::from_shared(format!("http://{}", trio.addr(i)))
                .unwrap()
                .connect_timeout(Duration::from_secs(1))
                .connect_lazy()
        })
        .collect();
    let rec = Arc::new(Recorder {
        history: Mutex::new(History::new()),
        t0: Instant::now(),
    });
    // The workload runs for a fixed span while the faults below play out; nothing waits on it.
    let until = Instant::now() + Duration::from_secs(12);
    let workers: Vec<_> = (1..=CLIENTS)
        .map(|id| rt.spawn(client(id, channels.clone(), rec.clone(), until)))
        .collect();

    // The nemesis: partition the leader, heal, kill -9 a member, restart it; twice.
    let pause = |ms| std::thread::sleep(Duration::from_millis(ms));
    for round in 0..2usize {
        pause(1000);
        let alive = nodes.iter().flatten().next().unwrap();
        if let Some(leader) = leader_of(alive) {
            let others: Vec<String> = (1..=3u64)
                .filter(|i| *i != leader)
                .map(|i| i.to_string())
                .collect();
            let node = nodes[leader as usize - 1].as_ref().unwrap();
            assert!(node
                .ctl(&["faults", "--drop", &others.join(",")])
                .status
                .success());
            pause(1500);
            assert!(node.ctl(&["faults"]).status.success());
        }
        pause(1000);
        let victim = (round * 2) % 3;
        let dir = nodes[victim].take().unwrap().kill9();
        pause(1000);
        nodes[victim] = Some(trio.start(victim, dir));
    }
    let answered: usize = workers.into_iter().map(|w| rt.block_on(w).unwrap()).sum();
    let history = rec.history.lock().unwrap();
    eprintln!("{} operations recorded, {answered} answered", history.len());
    // Enough went through for the check to mean something.
    assert!(answered >= 100, "only {answered} operations were answered");
    let started = Instant::now();
    let verdict = check(&history, Budget::default());
    eprintln!("checked in {:?}", started.elapsed());
    assert!(
        matches!(verdict, Verdict::Linearizable),
        "not linearizable: {verdict:?}"
    );
}
