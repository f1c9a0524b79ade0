//! `lodge bench workflows`: replicated workflows on a 3-member cluster of real `lodge node`
//! processes (the default configuration), each figure beside a KV put measured on the same
//! cluster in the same run:
//!
//! 1. runbooks of 3 steps (`true`, idempotent: a step that does no work but spawn its shell, as
//!    every runbook step does) started and completed per second at 1, 16 and 64 in flight, beside
//!    256-byte KV puts from as many clients (`bench kv`'s load);
//! 2. the time to record one step, beside the time of one KV put, both taken server-side from
//!    the members' own histograms over the same runs;
//! 3. the time from `kill -9` of a workflow's owner to its next step recorded by a survivor,
//!    beside the bar the issue sets (the election timeout plus the failure-detection timeout, as
//!    the configuration states them) and the first KV write after the same kill.
//!
//! Workflows are started with the Workflow service's Start, each on the members in turn, under
//! ids the bench chooses; their ends are seen on one KV watch on the run records (`/lodge/wf/run/`,
//! readable with auth off, the default), so that finding out costs the cluster one stream rather
//! than a Get per workflow every few milliseconds.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lodge_actors::workflow::record::{runs_prefix, Run, Status};
use lodge_grpc::client::{self, Channel, ClientTls};
use lodge_grpc::pb::kv::{self as kvpb, kv_client::KvClient};
use lodge_grpc::pb::workflow::{self as pb, workflow_client::WorkflowClient};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use super::kv::{self, Op, Proc, System};
use super::{median, Failures, Outcome};

/// What `lodge bench workflows` measures, from the command line.
pub struct Options {
    /// Workflows in flight at once (and KV put clients beside them), per run.
    pub clients: Vec<usize>,
    /// Measured time per run (after a warm-up).
    pub run_for: Duration,
    /// Runs of each load (the median is reported).
    pub rounds: usize,
    /// Owner kills, each on a fresh cluster but the first.
    pub failovers: usize,
}

/// Steps per workflow of the throughput runs.
const STEPS: usize = 3;
/// Raft writes one such workflow makes: its start, one per step, its end.
const WRITES_PER_WORKFLOW: usize = STEPS + 2;
/// Before the measured time of a workflow run, so that it starts in its steady state.
const WARM_UP: Duration = Duration::from_secs(1);
/// Longest wait for one workflow to end; only turns a hang into a failure.
const WAIT_END: Duration = Duration::from_secs(60);
/// How often the failover's Get polls a survivor.
const POLL: Duration = Duration::from_millis(20);
/// The histograms compared.
const STEP_HISTOGRAM: &str = "lodge_workflow_step_record_seconds";
const CALL_HISTOGRAM: &str = "lodge_grpc_server_handling_seconds";
const PUT_METHOD: &str = r#"grpc_method="/lodge.kv.v1.KV/Put""#;

pub fn run(o: &Options) -> Outcome {
    super::on_io_runtime(|io| measure(io, o))
}

/// The runbook of `steps` steps, each running `command` (idempotent), as Start's input.
fn runbook(steps: usize, command: &str) -> String {
    let steps: Vec<_> = (1..=steps)
        .map(|i| json!({"name": format!("s{i}"), "run": command, "idempotent": true}))
        .collect();
    json!({"name": "bench", "steps": steps}).to_string()
}

fn status_text(e: &tonic::Status) -> String {
    format!("{:?}: {}", e.code(), e.message())
}

async fn workflow_client(ep: &str) -> Outcome<WorkflowClient<Channel>> {
    let ch = client::connect(ep, &ClientTls::default())
        .await
        .map_err(|e| format!("connecting to {ep}: {e}"))?;
    Ok(WorkflowClient::new(ch))
}

fn start_request(id: &str, input: &str) -> pb::StartRequest {
    pb::StartRequest {
        id: id.to_string(),
        r#type: "runbook".into(),
        version: 0,
        input_json: input.to_string(),
    }
}

/// Waits until every member has published the runbook type (so that placement can choose any).
async fn runbook_everywhere(eps: &[String]) -> Outcome {
    let mut c = workflow_client(&eps[0]).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        match c.list_types(pb::ListTypesRequest {}).await {
            Ok(r) => {
                let types = r.into_inner().types;
                if types
                    .iter()
                    .any(|t| t.name == "runbook" && t.nodes.len() == eps.len())
                {
                    return Ok(());
                }
                last = format!("{types:?}");
            }
            Err(e) => last = status_text(&e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "the members did not all publish the runbook type within 30 s (last: {last})"
    ))
}

/// The raft and failure-detection settings the failover's bar is made of, as the node states
/// its effective configuration.
struct Bar {
    tick_ms: u64,
    election_ticks: u64,
    heartbeat_timeout_ms: u64,
}

impl Bar {
    /// The election timeout, randomised by raft between 1× and 2× `tick_ms × election_ticks`.
    fn election_ms(&self) -> (u64, u64) {
        let e = self.tick_ms * self.election_ticks;
        (e, 2 * e)
    }

    /// The bar: the longest election timeout plus the failure-detection timeout.
    fn ms(&self) -> u64 {
        self.election_ms().1 + self.heartbeat_timeout_ms
    }
}

async fn bar_of(ep: &str) -> Outcome<Bar> {
    use lodge_grpc::pb::admin::{admin_client::AdminClient, NodeInfoRequest};
    let ch = client::connect(ep, &ClientTls::default()).await?;
    let info = AdminClient::new(ch)
        .node_info(NodeInfoRequest {})
        .await
        .map_err(|e| format!("NodeInfo: {}", status_text(&e)))?
        .into_inner();
    let cfg: serde_json::Value = serde_json::from_str(&info.config_json)
        .map_err(|e| format!("the node's configuration: {e}"))?;
    let get = |key: &str| {
        cfg["cluster"][key]
            .as_u64()
            .ok_or_else(|| format!("the node's configuration has no cluster.{key}"))
    };
    Ok(Bar {
        tick_ms: get("tick_ms")?,
        election_ticks: get("election_ticks")?,
        heartbeat_timeout_ms: get("heartbeat_timeout_ms")?,
    })
}

// ---- the ends of workflows, seen on one watch ----

/// How a workflow ended, as the watch saw it.
struct Ended {
    status: Status,
    error: Option<String>,
    owner: u64,
    at: Instant,
}

/// Those waiting for a workflow's end, by id; and why the watch ended, once it has.
#[derive(Clone, Default)]
struct Ends {
    waiters: Arc<Mutex<HashMap<String, oneshot::Sender<Ended>>>>,
    gone: Arc<Mutex<Option<String>>>,
}

impl Ends {
    fn expect(&self, id: &str) -> oneshot::Receiver<Ended> {
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap().insert(id.to_string(), tx);
        rx
    }

    fn forget(&self, id: &str) {
        self.waiters.lock().unwrap().remove(id);
    }

    fn why_gone(&self) -> String {
        self.gone
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| "(no reason)".into())
    }

    /// Tells the waiter of each run this message shows ended.
    fn dispatch(&self, m: &kvpb::WatchResponse) {
        let at = Instant::now();
        for e in &m.events {
            let Some(kv) = &e.kv else { continue };
            if e.r#type != kvpb::event::EventType::Put as i32 {
                continue;
            }
            let Ok(run) = serde_json::from_slice::<Run>(&kv.value) else {
                continue;
            };
            if run.status == Status::Running {
                continue;
            }
            if let Some(tx) = self.waiters.lock().unwrap().remove(&run.id) {
                let _ = tx.send(Ended {
                    status: run.status,
                    error: run.error,
                    owner: run.owner,
                    at,
                });
            }
        }
    }
}

/// A watch on every run record through `ep`, from `from` (0: changes after now), once set up.
async fn open_watch(
    ep: &str,
    from: i64,
    ends: &Ends,
) -> Outcome<tonic::Streaming<kvpb::WatchResponse>> {
    let ch = client::connect(ep, &ClientTls::default()).await?;
    let mut stream = KvClient::new(ch)
        .watch(kvpb::WatchRequest {
            key: runs_prefix(),
            prefix: true,
            start_revision: from,
            prev_kv: false,
        })
        .await
        .map_err(|e| format!("watching the run records: {}", status_text(&e)))?
        .into_inner();
    match stream.message().await {
        Ok(Some(m)) if m.created => {
            ends.dispatch(&m);
            Ok(stream)
        }
        Ok(other) => Err(format!(
            "watching the run records: the first answer was not `created`: {other:?}"
        )),
        Err(e) => Err(format!("watching the run records: {}", status_text(&e))),
    }
}

/// Follows the watch (again from where the member left it, if it ends one), passing ends on;
/// when it cannot go on, fails every waiter with the reason.
async fn follow(ep: String, mut stream: tonic::Streaming<kvpb::WatchResponse>, ends: Ends) {
    let why = loop {
        match stream.message().await {
            Ok(Some(m)) => {
                ends.dispatch(&m);
                if m.canceled {
                    match open_watch(&ep, m.resume_revision, &ends).await {
                        Ok(s) => stream = s,
                        Err(e) => break e,
                    }
                }
            }
            Ok(None) => break "the member ended the watch".to_string(),
            Err(e) => break status_text(&e),
        }
    };
    *ends.gone.lock().unwrap() = Some(why);
    ends.waiters.lock().unwrap().clear();
}

// ---- throughput ----

/// One workflow run's figures.
struct WorkflowLoad {
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    owners: BTreeMap<u64, usize>,
    failures: Failures,
}

/// `concurrent` workflows in flight for `run_for` after [`WARM_UP`]: each client starts one
/// (through the members in turn), waits for its end, starts the next. Counts the completions
/// seen within the measured time; the latency is from Start's call to the end seen on the watch.
async fn workflow_load(
    eps: &[String],
    concurrent: usize,
    run_for: Duration,
    tag: &str,
    ends: &Ends,
) -> WorkflowLoad {
    let start_at = Instant::now() + WARM_UP;
    let end_at = start_at + run_for;
    let input = runbook(STEPS, "true");
    let mut tasks = Vec::new();
    for t in 0..concurrent {
        let (eps, input, ends, tag) = (eps.to_vec(), input.clone(), ends.clone(), tag.to_string());
        tasks.push(tokio::spawn(async move {
            let mut failures = Failures::default();
            let mut conns = Vec::new();
            for ep in &eps {
                match workflow_client(ep).await {
                    Ok(c) => conns.push(c),
                    Err(e) => failures.add(e),
                }
            }
            let (mut done, mut lat, mut owners) = (0usize, Vec::new(), BTreeMap::new());
            if conns.is_empty() {
                return (done, lat, owners, failures);
            }
            let mut i = 0usize;
            loop {
                let now = Instant::now();
                if now >= end_at {
                    break;
                }
                let id = format!("{tag}-{t}-{i}");
                i += 1;
                let ended = ends.expect(&id);
                let n = conns.len();
                let conn = &mut conns[(t + i) % n];
                if let Err(e) = conn.start(start_request(&id, &input)).await {
                    ends.forget(&id);
                    failures.add(format!("Start {id}: {}", status_text(&e)));
                    continue;
                }
                match tokio::time::timeout(WAIT_END, ended).await {
                    Ok(Ok(end)) if end.status == Status::Completed => {
                        if end.at >= start_at && end.at <= end_at {
                            done += 1;
                        }
                        if now >= start_at {
                            lat.push(end.at.duration_since(now).as_micros() as u64);
                        }
                        *owners.entry(end.owner).or_insert(0) += 1;
                    }
                    Ok(Ok(end)) => failures.add(format!(
                        "workflow {id} ended {}: {}",
                        end.status.as_str(),
                        end.error.unwrap_or_default()
                    )),
                    Ok(Err(_)) => failures.add(format!(
                        "workflow {id}: the watch on the run records ended: {}",
                        ends.why_gone()
                    )),
                    Err(_) => {
                        ends.forget(&id);
                        failures.add(format!("workflow {id} did not end within {WAIT_END:?}"));
                    }
                }
            }
            (done, lat, owners, failures)
        }));
    }
    let (mut done, mut lat, mut owners, mut failures) =
        (0, Vec::new(), BTreeMap::new(), Failures::default());
    for t in tasks {
        match t.await {
            Ok((d, l, o, f)) => {
                done += d;
                lat.extend(l);
                for (k, v) in o {
                    *owners.entry(k).or_insert(0) += v;
                }
                failures.merge(f);
            }
            Err(e) => failures.add(format!("a client task: {e}")),
        }
    }
    lat.sort_unstable();
    let q = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(f64::NAN, |v| *v as f64 / 1000.0)
    };
    WorkflowLoad {
        per_s: done as f64 / run_for.as_secs_f64(),
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        owners,
        failures,
    }
}

// ---- histograms from the metrics pages ----

/// A Prometheus histogram as scraped: cumulative bucket counts by upper bound, sum and count.
#[derive(Clone, Debug, Default, PartialEq)]
struct Histogram {
    bounds: Vec<f64>,
    cumulative: Vec<f64>,
    sum: f64,
    count: f64,
}

/// One sample line: its metric name, its labels (without braces) and its value.
fn sample(line: &str) -> Option<(&str, &str, f64)> {
    if line.starts_with('#') {
        return None;
    }
    let (head, value) = line.trim_end().rsplit_once(' ')?;
    let value = number(value)?;
    match head.split_once('{') {
        Some((name, labels)) => Some((name, labels.strip_suffix('}')?, value)),
        None => Some((head, "", value)),
    }
}

fn number(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        _ => s.parse().ok(),
    }
}

impl Histogram {
    /// Histogram `name` of `page`, the series whose labels contain `labels` (empty: any).
    fn parse(page: &str, name: &str, labels: &str) -> Self {
        let (bucket, sum, count) = (
            format!("{name}_bucket"),
            format!("{name}_sum"),
            format!("{name}_count"),
        );
        let mut h = Self::default();
        for (metric, l, value) in page.lines().filter_map(sample) {
            if !l.contains(labels) {
                continue;
            }
            if metric == bucket {
                let le = l
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("le=\""))
                    .and_then(|v| number(v.trim_end_matches('"')));
                if let Some(le) = le {
                    h.bounds.push(le);
                    h.cumulative.push(value);
                }
            } else if metric == sum {
                h.sum = value;
            } else if metric == count {
                h.count = value;
            }
        }
        h
    }

    /// `self + other` (`sign` -1: minus), bucket by bucket; an empty side takes the other's
    /// buckets.
    fn add(&mut self, other: &Self, sign: f64) {
        if self.bounds.is_empty() {
            self.bounds = other.bounds.clone();
            self.cumulative = vec![0.0; other.bounds.len()];
        }
        if other.bounds == self.bounds {
            for (a, b) in self.cumulative.iter_mut().zip(&other.cumulative) {
                *a += sign * b;
            }
        }
        self.sum += sign * other.sum;
        self.count += sign * other.count;
    }

    /// The `q` quantile in ms, interpolated linearly within its bucket (as Prometheus'
    /// `histogram_quantile`); NaN when empty.
    fn quantile_ms(&self, q: f64) -> f64 {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        if total <= 0.0 {
            return f64::NAN;
        }
        let rank = q * total;
        for (i, (&upper, &c)) in self.bounds.iter().zip(&self.cumulative).enumerate() {
            if c < rank {
                continue;
            }
            let lower = if i == 0 { 0.0 } else { self.bounds[i - 1] };
            if upper.is_infinite() {
                return lower * 1000.0;
            }
            let below = if i == 0 { 0.0 } else { self.cumulative[i - 1] };
            let inside = c - below;
            let at = if inside > 0.0 {
                lower + (upper - lower) * (rank - below) / inside
            } else {
                upper
            };
            return at * 1000.0;
        }
        f64::NAN
    }

    /// The exact mean in ms (`_sum ÷ _count`).
    fn mean_ms(&self) -> f64 {
        if self.count > 0.0 {
            self.sum / self.count * 1000.0
        } else {
            f64::NAN
        }
    }
}

/// A minimal HTTP/1.0 GET of a node's metrics page.
async fn scrape(addr: &str) -> Outcome<String> {
    let fail = |e: std::io::Error| format!("scraping {addr}/metrics: {e}");
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(fail)?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .map_err(fail)?;
    let mut page = Vec::new();
    s.read_to_end(&mut page).await.map_err(fail)?;
    let page = String::from_utf8_lossy(&page);
    page.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .ok_or_else(|| format!("scraping {addr}/metrics: no HTTP answer"))
}

/// Histogram `name` (series with `labels`) summed over every member's metrics page.
async fn histogram(nodes: &[String], name: &str, labels: &str) -> Outcome<Histogram> {
    let mut total = Histogram::default();
    for addr in nodes {
        total.add(&Histogram::parse(&scrape(addr).await?, name, labels), 1.0);
    }
    Ok(total)
}

// ---- failover ----

/// One owner kill.
struct Trial {
    owner_was_leader: bool,
    /// Until a KV put through a survivor was acknowledged.
    kv_write: Duration,
    /// Until a survivor's Get showed the run with a higher epoch.
    owner_changed: Duration,
    /// Until a survivor's Get showed a step recorded at a higher epoch.
    next_step: Duration,
    /// That step's `at_ms` (stamped as its record began) minus the kill's wall-clock time.
    next_step_at_ms: i64,
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Get of `id` through `c`, given at most 500 ms (a survivor may be between leaders).
async fn get(c: &mut WorkflowClient<Channel>, id: &str) -> Result<pb::GetResponse, String> {
    let call = c.get(pb::GetRequest { id: id.to_string() });
    match tokio::time::timeout(Duration::from_millis(500), call).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(e)) => Err(status_text(&e)),
        Err(_) => Err("no answer within 500 ms".into()),
    }
}

/// Starts a long runbook (steps of `sleep 0.2`) whose owner is the raft leader or not, as
/// `want_leader` says (placement is least loaded with random ties: a run on the wrong kind of
/// member is cancelled and another started, 20 times at most), waits for its first step, kills
/// its owner with SIGKILL and times the takeover through the survivors.
async fn failover(nodes: &mut Vec<Proc>, want_leader: bool, tag: &str) -> Outcome<Trial> {
    let leader = kv::lodge_leader(nodes).await?;
    let eps: Vec<String> = nodes.iter().map(|n| n.client.clone()).collect();
    let mut c = workflow_client(&eps[0]).await?;
    let input = runbook(100, "sleep 0.2");
    let mut chosen = None;
    for attempt in 0..20 {
        let id = format!("{tag}-{attempt}");
        let run = c
            .start(start_request(&id, &input))
            .await
            .map_err(|e| format!("Start {id}: {}", status_text(&e)))?
            .into_inner()
            .run
            .ok_or("Start answered no run")?;
        let owner = run.owner as usize - 1;
        if (owner == leader) == want_leader || attempt == 19 {
            chosen = Some((id, owner));
            break;
        }
        c.cancel(pb::CancelRequest { id: id.clone() })
            .await
            .map_err(|e| format!("Cancel {id}: {}", status_text(&e)))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while get(&mut c, &id)
            .await?
            .run
            .is_some_and(|r| r.status == "running")
        {
            if Instant::now() > deadline {
                return Err(format!("workflow {id} still ran 30 s after its cancel"));
            }
            tokio::time::sleep(POLL).await;
        }
    }
    let (id, owner) = chosen.expect("a run was kept");
    // Its first step recorded: the run is under way on its owner.
    let deadline = Instant::now() + Duration::from_secs(30);
    let epoch = loop {
        let r = get(&mut c, &id).await?;
        if !r.steps.is_empty() {
            break r.run.map_or(0, |r| r.epoch);
        }
        if Instant::now() > deadline {
            return Err(format!("workflow {id} recorded no step within 30 s"));
        }
        tokio::time::sleep(POLL).await;
    };
    let killed = nodes.remove(owner);
    let alive: Vec<String> = nodes.iter().map(|n| n.client.clone()).collect();
    let (kill_wall, kill) = (wall_ms(), Instant::now());
    drop(killed); // SIGKILL, then reaped
    let takeover = async {
        let mut clients = Vec::new();
        for ep in &alive {
            clients.push(workflow_client(ep).await?);
        }
        let mut owner_changed = None;
        let mut last = String::new();
        let mut i = 0;
        loop {
            i += 1;
            if kill.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "no survivor recorded a step of {id} within 60 s of its owner's kill (last: {last})"
                ));
            }
            let n = clients.len();
            match get(&mut clients[i % n], &id).await {
                Ok(r) => {
                    let run = r.run.unwrap_or_default();
                    if run.epoch > epoch && owner_changed.is_none() {
                        owner_changed = Some(kill.elapsed());
                    }
                    if run.status != "running" {
                        return Err(format!(
                            "workflow {id} ended {} after its owner's kill: {}",
                            run.status, run.error
                        ));
                    }
                    if let Some(s) = r.steps.iter().find(|s| s.epoch > epoch) {
                        let seen = kill.elapsed();
                        return Ok((
                            owner_changed.unwrap_or(seen),
                            seen,
                            s.at_ms as i64 - kill_wall,
                        ));
                    }
                }
                Err(e) => last = e,
            }
            tokio::time::sleep(POLL).await;
        }
    };
    let (kv_write, steps) = tokio::join!(kv::first_write(&alive), takeover);
    let (owner_changed, next_step, next_step_at_ms) = steps?;
    Ok(Trial {
        owner_was_leader: owner == leader,
        kv_write: kv_write?,
        owner_changed,
        next_step,
        next_step_at_ms,
    })
}

/// The median time to spawn and wait for a runbook step's process doing nothing, as the node
/// starts it (`setpriv --pdeathsig KILL -- sh -c ...`), `n` times in a row.
fn spawn_ms(n: usize) -> Outcome<f64> {
    let mut took = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let status = std::process::Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--", "sh", "-c", "exec 2>&1\ntrue"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .output()
            .map_err(|e| format!("running setpriv: {e}"))?
            .status;
        if !status.success() {
            return Err(format!("`setpriv ... sh -c true` exited {status}"));
        }
        took.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(median(took))
}

/// A cluster of 3 that takes writes and on which every member runs the runbook type.
fn cluster(io: &tokio::runtime::Runtime) -> Outcome<Vec<Proc>> {
    let nodes = kv::start_lodge_with(3, &[])?;
    let eps: Vec<String> = nodes.iter().map(|n| n.client.clone()).collect();
    io.block_on(kv::ready(System::Lodge, None, &eps[0]))?;
    io.block_on(runbook_everywhere(&eps))?;
    Ok(nodes)
}

/// What the runs at one concurrency gathered, over the rounds.
#[derive(Default)]
struct Row {
    workflows: Vec<f64>,
    puts: Vec<f64>,
    /// Workflows/s ÷ puts/s, per round.
    ratios: Vec<f64>,
    /// Workflow p50 latency per round (ms).
    workflow_p50: Vec<f64>,
    /// Over the workflow runs: the step records' histogram.
    steps: Histogram,
    /// Over the put runs: the server-side KV Put histogram.
    put_calls: Histogram,
    /// Client-side put p50 and p99 per round.
    put_client: Vec<(f64, f64)>,
}

fn measure(io: &tokio::runtime::Runtime, o: &Options) -> Outcome {
    println!(
        "lodge bench workflows: 3 members on the default configuration, runbooks of {STEPS} steps `true` (idempotent), beside 256-byte KV puts; {:.1} s per run after a warm-up, rounds: {}, 2 CPUs shared by servers and load",
        o.run_for.as_secs_f64(),
        o.rounds
    );
    let nodes = cluster(io)?;
    let eps: Vec<String> = nodes.iter().map(|n| n.client.clone()).collect();
    let metrics: Vec<String> = nodes.iter().map(|n| n.metrics.clone()).collect();
    let bar = io.block_on(bar_of(&eps[0]))?;
    let ends = Ends::default();
    let stream = io.block_on(open_watch(&eps[0], 0, &ends))?;
    io.spawn(follow(eps[0].clone(), stream, ends.clone()));

    let value = vec![b'x'; 256];
    let mut rows: BTreeMap<usize, Row> = BTreeMap::new();
    let mut owners: BTreeMap<u64, usize> = BTreeMap::new();
    let mut failures = Failures::default();
    println!();
    println!("| round | in flight / clients | workflows/s | workflow p50 ms | workflow p99 ms | KV puts/s | put p50 ms | put p99 ms | errors |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for round in 0..o.rounds {
        for (k, &c) in o.clients.iter().enumerate() {
            let row = rows.entry(c).or_default();
            let mut wf = None;
            let mut put = None;
            // Alternate which goes first, so that neither always runs on a warmer cluster.
            let order = if (round + k) % 2 == 0 { [0, 1] } else { [1, 0] };
            for which in order {
                if which == 0 {
                    let before = io.block_on(histogram(&metrics, STEP_HISTOGRAM, ""))?;
                    let tag = format!("r{round}-c{c}");
                    let r = io.block_on(workflow_load(&eps, c, o.run_for, &tag, &ends));
                    let after = io.block_on(histogram(&metrics, STEP_HISTOGRAM, ""))?;
                    row.steps.add(&after, 1.0);
                    row.steps.add(&before, -1.0);
                    wf = Some(r);
                } else {
                    let before = io.block_on(histogram(&metrics, CALL_HISTOGRAM, PUT_METHOD))?;
                    let r = io.block_on(kv::load(
                        System::Lodge,
                        None,
                        &eps,
                        c,
                        Op::Put,
                        o.run_for,
                        &value,
                    ));
                    let after = io.block_on(histogram(&metrics, CALL_HISTOGRAM, PUT_METHOD))?;
                    row.put_calls.add(&after, 1.0);
                    row.put_calls.add(&before, -1.0);
                    put = Some(r);
                }
            }
            let (mut wf, mut put) = (wf.expect("measured"), put.expect("measured"));
            println!(
                "| {} | {c} | {:.0} | {:.1} | {:.1} | {:.0} | {:.2} | {:.2} | {} |",
                round + 1,
                wf.per_s,
                wf.p50_ms,
                wf.p99_ms,
                put.ops_per_s,
                put.p50_ms,
                put.p99_ms,
                wf.failures.count + put.failures.count
            );
            row.workflows.push(wf.per_s);
            row.puts.push(put.ops_per_s);
            row.ratios.push(wf.per_s / put.ops_per_s);
            row.workflow_p50.push(wf.p50_ms);
            row.put_client.push((put.p50_ms, put.p99_ms));
            for (k, v) in std::mem::take(&mut wf.owners) {
                *owners.entry(k).or_insert(0) += v;
            }
            failures.merge(std::mem::take(&mut wf.failures));
            failures.merge(std::mem::take(&mut put.failures));
        }
    }
    let placed: Vec<String> = owners
        .iter()
        .map(|(k, v)| format!("member {k}: {v}"))
        .collect();
    println!("workflows completed, by owner: {}", placed.join(", "));

    println!();
    println!("Throughput (medians over the rounds):");
    println!();
    println!("| in flight / clients | workflows/s | workflow p50 ms | KV puts/s | workflows ÷ puts | raft writes in workflows ÷ puts |");
    println!("|---|---|---|---|---|---|");
    for (c, row) in &rows {
        let ratio = median(row.ratios.clone());
        println!(
            "| {c} | {:.0} | {:.1} | {:.0} | {ratio:.3} | {:.2} |",
            median(row.workflows.clone()),
            median(row.workflow_p50.clone()),
            median(row.puts.clone()),
            ratio * WRITES_PER_WORKFLOW as f64
        );
    }
    let spawns = 50;
    println!(
        "A workflow here is {WRITES_PER_WORKFLOW} raft writes (its start, {STEPS} steps, its end), some linearizable reads and {STEPS} shell processes; a put is one raft write. One step's process alone (`setpriv --pdeathsig KILL -- sh -c true`, spawned and waited for by the bench, {spawns} in a row, the cluster idle): p50 {:.2} ms.",
        spawn_ms(spawns)?
    );

    println!();
    println!("Step record against KV put, both server-side:");
    println!();
    println!("| in flight / clients | step records | step p50 ms | step p99 ms | step mean ms | KV Puts | put p50 ms | put p99 ms | put mean ms | step ÷ put p50 / p99 / mean | bar ≤ 1.2 (p50, p99) | put client-side p50 / p99 ms (median) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (c, row) in &rows {
        let (s, p) = (&row.steps, &row.put_calls);
        let ratio = |q: f64| s.quantile_ms(q) / p.quantile_ms(q);
        let (r50, r99, rmean) = (ratio(0.5), ratio(0.99), s.mean_ms() / p.mean_ms());
        let met = if r50 <= 1.2 && r99 <= 1.2 {
            "met"
        } else {
            "not met"
        };
        println!(
            "| {c} | {:.0} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} | {r50:.2} / {r99:.2} / {rmean:.2} | {met} | {:.2} / {:.2} |",
            s.count,
            s.quantile_ms(0.5),
            s.quantile_ms(0.99),
            s.mean_ms(),
            p.count,
            p.quantile_ms(0.5),
            p.quantile_ms(0.99),
            p.mean_ms(),
            median(row.put_client.iter().map(|x| x.0).collect()),
            median(row.put_client.iter().map(|x| x.1).collect()),
        );
    }
    println!(
        "Both from the members' own histograms, summed over the 3 and differenced around each run (warm-ups included): `{STEP_HISTOGRAM}` (the owner's fenced step transaction) and `{CALL_HISTOGRAM}{{{PUT_METHOD}}}` (the Put handler); so both cover the same path, store client → raft (forwarded from a follower) → fsync → apply, and neither a client's network hop. Their buckets double (step 0.5 ms × 2^k, put 0.05 ms × 2^k): p50/p99 are interpolated within a bucket and may be off by part of one; the means (_sum ÷ _count) are exact."
    );

    // Failover: the first kill on this cluster, the others each on a fresh one.
    let (e1, e2) = bar.election_ms();
    println!();
    println!(
        "Owner kill -9 → next step recorded on a survivor. Bar: election timeout {e1}–{e2} ms (cluster.tick_ms {} × election_ticks {}, randomised up to 2×) + failure detection {} ms (cluster.heartbeat_timeout_ms) = {} ms.",
        bar.tick_ms,
        bar.election_ticks,
        bar.heartbeat_timeout_ms,
        bar.ms()
    );
    println!();
    println!("| kill | owner killed | first KV write after it ms | owner changed ms | next step recorded ms (seen by Get) | same, from the step's at_ms | within the bar |");
    println!("|---|---|---|---|---|---|---|");
    let mut nodes = Some(nodes);
    let mut next = Vec::new();
    for k in 0..o.failovers {
        let mut members = match nodes.take() {
            Some(n) => n,
            None => cluster(io)?,
        };
        // Alternately an owner that is not the raft leader and one that is.
        let t = io.block_on(failover(&mut members, k % 2 == 1, &format!("failover-{k}")))?;
        drop(members);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {} | {} |",
            k + 1,
            if t.owner_was_leader {
                "the raft leader"
            } else {
                "a follower"
            },
            ms(t.kv_write),
            ms(t.owner_changed),
            ms(t.next_step),
            t.next_step_at_ms,
            if ms(t.next_step) <= bar.ms() as f64 {
                "yes"
            } else {
                "no"
            }
        );
        next.push(ms(t.next_step));
    }
    if !next.is_empty() {
        println!(
            "median kill → next step: {:.0} ms (bar {} ms). It includes the interrupted step run again (`sleep 0.2`, idempotent); Get polls a survivor every {} ms.",
            median(next),
            bar.ms(),
            POLL.as_millis()
        );
    }
    failures.check("workflows or puts")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP lodge_workflow_step_record_seconds Time to record one workflow step through raft.
# TYPE lodge_workflow_step_record_seconds histogram
lodge_workflow_step_record_seconds_sum 0.03
lodge_workflow_step_record_seconds_count 10
lodge_workflow_step_record_seconds_bucket{le="0.001"} 0
lodge_workflow_step_record_seconds_bucket{le="0.002"} 4
lodge_workflow_step_record_seconds_bucket{le="0.004"} 10
lodge_workflow_step_record_seconds_bucket{le="+Inf"} 10
lodge_grpc_server_handling_seconds_bucket{grpc_method="/lodge.kv.v1.KV/Put",le="0.001"} 7
lodge_grpc_server_handling_seconds_bucket{grpc_method="/lodge.kv.v1.KV/Range",le="0.001"} 9
"#;

    #[test]
    fn a_histogram_is_read_from_a_page_and_its_quantiles_interpolated() {
        let h = Histogram::parse(PAGE, STEP_HISTOGRAM, "");
        assert_eq!(h.bounds, [0.001, 0.002, 0.004, f64::INFINITY]);
        assert_eq!(h.cumulative, [0.0, 4.0, 10.0, 10.0]);
        assert_eq!(h.count, 10.0);
        assert!((h.mean_ms() - 3.0).abs() < 1e-9);
        // Rank 5 is the first of the 6 in (2, 4] ms: 2 + 2 × 1/6.
        assert!((h.quantile_ms(0.5) - (2.0 + 2.0 / 6.0)).abs() < 1e-9);
        assert!((h.quantile_ms(0.2) - 1.5).abs() < 1e-9);
        let put = Histogram::parse(PAGE, CALL_HISTOGRAM, PUT_METHOD);
        assert_eq!(put.cumulative, [7.0]);
        assert!(Histogram::default().quantile_ms(0.5).is_nan());
    }

    #[test]
    fn histograms_are_summed_and_differenced_bucket_by_bucket() {
        let h = Histogram::parse(PAGE, STEP_HISTOGRAM, "");
        let mut total = Histogram::default();
        total.add(&h, 1.0);
        total.add(&h, 1.0);
        assert_eq!(total.cumulative, [0.0, 8.0, 20.0, 20.0]);
        total.add(&h, -1.0);
        assert_eq!(total, h);
    }
}
