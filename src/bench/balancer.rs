//! `lodge bench balancer`: one node with a data-plane listener, one `lodge module --type alb`
//! forwarding to a backend in this process, and a route (protocol TCP → ALB). Measured, each
//! beside its baseline in the same run:
//!
//! 1. `RouteRequest` decisions per second (not dry runs) beside `GetNLBConfig` (which does no
//!    work: the floor of one RPC on the same node), same channels, same concurrency;
//! 2. one TCP stream (an HTTP POST head, then the body) through the data plane → module → sink,
//!    beside one socat relay (its default 8 KiB blocks, and 128 KiB blocks) and direct;
//! 3. sequential new connections (connect → a small HTTP request → its echo → close) through the
//!    data plane, beside socat (a process forked per connection) and direct.
//!
//! The traffic is HTTP because an ALB instance serves the HTTP family only: the route (protocol
//! TCP) matches any flow, but a flow the sniffer cannot name (TCP) finds no ALB candidate ("does
//! not serve tcp"). The decisions asked for are HTTP flows for the same reason.
//!
//! The node and the module are child processes of this same binary, socat is the system's; the
//! backend (a sink for a connection that starts with `POST `, answering the byte count; an echo
//! server for any other) and the clients are in this process (see `net`).

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lodge_grpc::client::Channel;
use lodge_grpc::client::{self, ClientTls};
use lodge_grpc::pb::balancer as pb;
use lodge_grpc::pb::balancer::balancer_client::BalancerClient;
use serde_json::json;

use super::kv::{start_lodge_args, Proc};
use super::net::{
    cpu_of, exchange, mb, quantile, raise_nofile, start, start_servers, start_socat, sys_of,
    transfer, Helper,
};
use super::{median, Failures, Outcome};

/// The source's write size. The first write is a whole one too (the request head, then body),
/// so the data plane's sniffer sees a complete head at once and never waits for its timeout.
const WRITE: usize = 128 * 1024;
/// The small request of the new-connection figure, which the sniffer recognises at once and the
/// backend echoes.
const GET: &[u8] = b"GET /bench HTTP/1.1\r\nHost: bench\r\n\r\n";
/// The module's registration id.
const INSTANCE: &str = "alb-bench";

/// What the bench measures, from the command line.
pub struct Options {
    pub bytes: u64,
    pub rounds: usize,
    pub connections: usize,
    pub decisions: u64,
    pub concurrency: usize,
    pub json: bool,
    /// `[balancer] buffer_bytes` of the node (None: its default).
    pub buffer_bytes: Option<usize>,
}

/// The readable report: stdout, or stderr when stdout is for the JSON document.
macro_rules! say {
    ($o:expr) => { if $o.json { eprintln!() } else { println!() } };
    ($o:expr, $($t:tt)*) => { if $o.json { eprintln!($($t)*) } else { println!($($t)*) } };
}

/// A node with a data-plane listener and the route, and one module forwarding to `backend`.
struct Balancer {
    node: Proc,
    module: Helper,
    /// The data plane's listening address.
    data: SocketAddr,
    _scratch: tempfile::TempDir,
}

impl Balancer {
    fn start(
        rt: &tokio::runtime::Runtime,
        backend: u16,
        buffer_bytes: Option<usize>,
    ) -> Outcome<Self> {
        let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
        let config = scratch.path().join("node.toml");
        let mut toml = "[balancer]\nlisten = [\"127.0.0.1:0\"]\n".to_string();
        if let Some(b) = buffer_bytes {
            toml.push_str(&format!("buffer_bytes = {b}\n"));
        }
        std::fs::write(&config, toml).map_err(|e| e.to_string())?;
        let node =
            start_lodge_args(1, &[], &["--config".into(), config.display().to_string()])?.remove(0);
        let data = rt.block_on(async {
            let mut c = balancer_client(&node.client).await?;
            // The listener is there once the balancer has loaded its state.
            let data = retry("the data-plane listener", || {
                let mut c = c.clone();
                async move {
                    let s = c.get_nlb_status(pb::GetNlbStatusRequest {}).await;
                    let s = s.map_err(|e| e.to_string())?.into_inner();
                    s.listeners
                        .first()
                        .cloned()
                        .ok_or_else(|| "none yet".into())
                }
            })
            .await?;
            c.update_routing(pb::UpdateRoutingRequest {
                routes: vec![pb::Route {
                    route_id: "bench".into(),
                    protocol: pb::Protocol::Tcp as i32,
                    priority: 1,
                    target: pb::ModuleType::Alb as i32,
                    ..Default::default()
                }],
                replace_all: true,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("setting the route: {:?}: {}", e.code(), e.message()))?;
            Ok::<_, String>(data)
        })?;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut module = Command::new(&exe);
        module.args([
            "module",
            "--type",
            "alb",
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &format!("127.0.0.1:{backend}"),
            "--endpoint",
            &node.client,
            "--instance-id",
            INSTANCE,
            "--log-level",
            "warning",
        ]);
        let (module, _) = start(
            module,
            "lodge module",
            "module ",
            &scratch.path().join("module.log"),
        )?;
        // Routable: registered, healthy, and its CanHandle answer in.
        rt.block_on(async {
            let c = balancer_client(&node.client).await?;
            retry("a decision for the module", || {
                let mut c = c.clone();
                async move {
                    let mut q = query();
                    q.dry_run = true;
                    let d = c.route_request(q).await.map_err(|e| e.to_string())?;
                    let d = d.into_inner();
                    (d.instance_id == INSTANCE)
                        .then_some(())
                        .ok_or_else(|| format!("decided {}", d.instance_id))
                }
            })
            .await
        })?;
        Ok(Self {
            node,
            module,
            data: data
                .parse()
                .map_err(|e| format!("the data-plane address {data:?}: {e}"))?,
            _scratch: scratch,
        })
    }

    /// (name, pid) of the two lodge processes.
    fn pids(&self) -> [(&'static str, String); 2] {
        [
            ("node", self.node.child.id().to_string()),
            (self.module.name, self.module.pid()),
        ]
    }
}

async fn balancer_client(endpoint: &str) -> Outcome<BalancerClient<Channel>> {
    Ok(BalancerClient::new(channel(endpoint).await?))
}

async fn channel(endpoint: &str) -> Outcome<Channel> {
    client::connect(endpoint, &ClientTls::default())
        .await
        .map_err(|e| format!("connecting to {endpoint}: {e}"))
}

/// Calls `f` until it answers Ok (30 s at most).
async fn retry<T, F, Fut>(what: &str, mut f: F) -> Outcome<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(format!("{what}: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The decision asked for: an HTTP flow like the connection figure's, not a dry run.
fn query() -> pb::RouteQuery {
    pb::RouteQuery {
        protocol: pb::Protocol::Http as i32,
        source: "127.0.0.1".into(),
        source_port: 40000,
        destination: "bench".into(),
        destination_port: 8080,
        path: "/bench".into(),
        dry_run: false,
        ..Default::default()
    }
}

/// The head of a transfer of `bytes` in all (head included).
fn post_head(bytes: u64) -> Vec<u8> {
    let head = |body: u64| {
        format!("POST /sink HTTP/1.1\r\nHost: bench\r\nContent-Length: {body}\r\n\r\n").into_bytes()
    };
    // The length's digits count in the head: settle them.
    let mut body = bytes;
    for _ in 0..3 {
        body = bytes.saturating_sub(head(body).len() as u64);
    }
    head(body)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Rpc {
    /// `GetNLBConfig`: answers the settings it holds; the floor of one call.
    Floor,
    /// `RouteRequest`, not a dry run.
    Decide,
}

/// One run of `total` calls with `concurrency` in flight over `channels`.
struct Calls {
    per_s: f64,
    failures: Failures,
}

async fn calls(channels: &[Channel], rpc: Rpc, total: u64, concurrency: usize) -> Calls {
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None));
    let t = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            let mut c = BalancerClient::new(channels[i % channels.len()].clone());
            let (next, errors, first_error) = (next.clone(), errors.clone(), first_error.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    let r = match rpc {
                        Rpc::Floor => c.get_nlb_config(pb::GetNlbConfigRequest {}).await.map(drop),
                        Rpc::Decide => c.route_request(query()).await.map(drop),
                    };
                    if let Err(e) = r {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error
                            .lock()
                            .unwrap()
                            .get_or_insert_with(|| e.to_string());
                    }
                }
            })
        })
        .collect();
    let mut failures = Failures::default();
    for task in tasks {
        if let Err(e) = task.await {
            failures.add(format!("a calling task: {e}"));
        }
    }
    let took = t.elapsed();
    failures.count += errors.load(Ordering::Relaxed);
    if failures.first.is_none() {
        failures.first = first_error.lock().unwrap().take();
    }
    Calls {
        per_s: total as f64 / took.as_secs_f64(),
        failures,
    }
}

pub fn run(o: &Options) -> Outcome {
    super::on_io_runtime(|rt| measure(o, rt))
}

fn measure(o: &Options, rt: &tokio::runtime::Runtime) -> Outcome {
    let nofile = raise_nofile();
    let servers = start_servers();
    say!(
        o,
        "lodge bench balancer: {} decisions at {} in flight; {} MB per transfer in {} KiB writes; \
         {} sequential connections per path; {} rounds; node buffer_bytes {}; 2 CPUs shared by \
         the bench, node, module and socat; open-file limit {nofile}",
        o.decisions,
        o.concurrency,
        mb(o.bytes),
        WRITE / 1024,
        o.connections,
        o.rounds,
        o.buffer_bytes
            .map_or_else(|| "default (65536)".to_string(), |b| b.to_string()),
    );
    let lb = Balancer::start(rt, servers.either, o.buffer_bytes)?;
    let (decisions, failures) = decisions(o, rt, &lb)?;
    let throughput = throughput(o, &lb, servers.either)?;
    let connections = connections(o, &lb, servers.either)?;
    drop(lb);
    if o.json {
        let doc = json!({
            "options": {
                "bytes": o.bytes,
                "rounds": o.rounds,
                "connections": o.connections,
                "decisions": o.decisions,
                "concurrency": o.concurrency,
                "buffer_bytes": o.buffer_bytes,
                "write_bytes": WRITE,
            },
            "decisions": decisions,
            "throughput": throughput,
            "connections": connections,
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap());
    }
    failures.check("RouteRequest or GetNLBConfig calls")
}

/// 1. RouteRequest decisions per second beside GetNLBConfig calls per second.
///
/// Answers the figures and the calls that failed.
fn decisions(
    o: &Options,
    rt: &tokio::runtime::Runtime,
    lb: &Balancer,
) -> Outcome<(serde_json::Value, Failures)> {
    let n_channels = o.concurrency.clamp(1, 4);
    let channels: Vec<Channel> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..n_channels {
            v.push(channel(&lb.node.client).await?);
        }
        Ok::<_, String>(v)
    })?;
    let concurrency = o.concurrency.max(1);
    // Warm-up: connections, the CanHandle cache, allocator pools.
    let warm = (o.decisions / 10).max(100);
    let mut failures = Failures::default();
    for rpc in [Rpc::Floor, Rpc::Decide] {
        failures.merge(
            rt.block_on(calls(&channels, rpc, warm, concurrency))
                .failures,
        );
    }
    let node = lb.pids()[0].1.clone();
    say!(o);
    say!(
        o,
        "RouteRequest decisions (HTTP flows, not dry runs) beside GetNLBConfig calls, {} each \
         per round, {concurrency} in flight over {n_channels} channels:",
        o.decisions
    );
    say!(o);
    say!(
        o,
        "| round | GetNLBConfig calls/s | RouteRequest decisions/s | decisions ÷ calls | node CPU \
         µs per call | node CPU µs per decision |"
    );
    say!(o, "|---|---|---|---|---|---|");
    // Per Rpc (Floor, Decide): rates, node CPU per call, bench CPU per call.
    let mut rates: [Vec<f64>; 2] = Default::default();
    let mut node_us: [Vec<f64>; 2] = Default::default();
    let mut bench_us: [Vec<f64>; 2] = Default::default();
    let mut errors = [0u64; 2];
    let mut rounds = Vec::new();
    for round in 0..o.rounds {
        let order = if round % 2 == 0 {
            [Rpc::Floor, Rpc::Decide]
        } else {
            [Rpc::Decide, Rpc::Floor]
        };
        for rpc in order {
            let i = (rpc == Rpc::Decide) as usize;
            let (node0, me0) = (cpu_of(&node, false), cpu_of("self", false));
            let r = rt.block_on(calls(&channels, rpc, o.decisions, concurrency));
            let per_call = |s: f64| s * 1e6 / o.decisions as f64;
            node_us[i].push(per_call(cpu_of(&node, false) - node0));
            bench_us[i].push(per_call(cpu_of("self", false) - me0));
            rates[i].push(r.per_s);
            errors[i] += r.failures.count;
            failures.merge(r.failures);
        }
        let (f, d) = (rates[0][round], rates[1][round]);
        say!(
            o,
            "| {} | {f:.0} | {d:.0} | {:.2} | {:.0} | {:.0} |",
            round + 1,
            d / f,
            node_us[0][round],
            node_us[1][round]
        );
        rounds.push(json!({
            "get_nlb_config_per_s": f,
            "decisions_per_s": d,
            "ratio": d / f,
            "node_cpu_us_per_call": node_us[0][round],
            "node_cpu_us_per_decision": node_us[1][round],
        }));
    }
    let paired = median((0..o.rounds).map(|r| rates[1][r] / rates[0][r]).collect());
    let [f, d] = rates.map(median);
    let [nf, nd] = node_us.map(median);
    let [bf, bd] = bench_us.map(median);
    say!(
        o,
        "| **median** | {f:.0} | {d:.0} | {:.2} | {nf:.0} | {nd:.0} |",
        d / f
    );
    say!(
        o,
        "decisions ÷ calls: {:.2} of the medians, {paired:.2} the median of the rounds' ratios",
        d / f
    );
    say!(
        o,
        "the bench's own CPU (the gRPC clients): {bf:.0} µs per GetNLBConfig call, {bd:.0} µs per \
         RouteRequest; errors: {} GetNLBConfig, {} RouteRequest{}",
        errors[0],
        errors[1],
        failures
            .first
            .as_deref()
            .map_or_else(String::new, |e| format!(" (first: {e})"))
    );
    let doc = json!({
        "channels": n_channels,
        "concurrency": concurrency,
        "rounds": rounds,
        "median": {
            "get_nlb_config_per_s": f,
            "decisions_per_s": d,
            "ratio": d / f,
            "ratio_median_of_rounds": paired,
            "node_cpu_us_per_call": nf,
            "node_cpu_us_per_decision": nd,
            "bench_cpu_us_per_call": bf,
            "bench_cpu_us_per_decision": bd,
        },
        "errors": { "get_nlb_config": errors[0], "route_request": errors[1] },
        "first_error": failures.first,
    });
    Ok((doc, failures))
}

/// 2. One TCP stream: direct, socat, socat -b 128 KiB, lodge.
fn throughput(o: &Options, lb: &Balancer, backend: u16) -> Outcome<serde_json::Value> {
    let chunk: Vec<u8> = (0..WRITE).map(|i| (i % 251) as u8).collect();
    let direct = SocketAddr::from(([127, 0, 0, 1], backend));
    let (socat, socat_addr) = start_socat(backend, None)?;
    let (socat_big, socat_big_addr) = start_socat(backend, Some(WRITE))?;
    let paths = [direct, socat_addr, socat_big_addr, lb.data];
    const LODGE: usize = 3;
    let warm = o.bytes.min(64 << 20);
    for to in paths {
        transfer(to, warm, &post_head(warm), &chunk)?;
    }
    let head = post_head(o.bytes);
    let mut rates: [Vec<f64>; 4] = Default::default();
    // CPU seconds per GB: node, module, this process over the lodge transfers; each socat
    // (with its per-connection children) over its own.
    let mut cpu: [Vec<f64>; 3] = Default::default();
    let mut socat_cpu: [Vec<f64>; 2] = Default::default();
    // The kernel's part of node + module CPU over the lodge transfers.
    let mut sys_share = Vec::new();
    let gb = o.bytes as f64 / 1e9;
    say!(o);
    say!(
        o,
        "One TCP stream, {} MB in {} KiB writes (an HTTP POST head, then the body), then a \
         half-close and the sink's count:",
        mb(o.bytes),
        WRITE / 1024
    );
    say!(o);
    say!(
        o,
        "| round | direct MB/s | socat MB/s | socat -b 128 KiB MB/s | lodge MB/s | lodge ÷ socat \
         | lodge ÷ socat -b 128 KiB | lodge ÷ direct |"
    );
    say!(o, "|---|---|---|---|---|---|---|---|");
    let row = |label: &str, r: [f64; 4]| {
        let [d, s, b, l] = r;
        say!(
            o,
            "| {label} | {d:.0} | {s:.0} | {b:.0} | {l:.0} | {:.2} | {:.2} | {:.3} |",
            l / s,
            l / b,
            l / d
        );
    };
    let relays = [&socat, &socat_big];
    let pids = lb.pids();
    for round in 0..o.rounds {
        let mut order = [0, 1, 2, 3];
        order.rotate_left(round % 4);
        for p in order {
            let before: Vec<f64> = pids.iter().map(|(_, pid)| cpu_of(pid, false)).collect();
            let sys_before: f64 = pids.iter().map(|(_, pid)| sys_of(pid)).sum();
            let me = cpu_of("self", false);
            let socat_before = relays.map(|h| cpu_of(&h.pid(), true));
            let rate = transfer(paths[p], o.bytes, &head, &chunk)?;
            match p {
                LODGE => {
                    let mut all = 0.0;
                    for (i, (_, pid)) in pids.iter().enumerate() {
                        let used = cpu_of(pid, false) - before[i];
                        all += used;
                        cpu[i].push(used / gb);
                    }
                    cpu[2].push((cpu_of("self", false) - me) / gb);
                    let sys: f64 = pids.iter().map(|(_, pid)| sys_of(pid)).sum();
                    sys_share.push((sys - sys_before) / all.max(0.01));
                }
                1 | 2 => {
                    // The connection's child is counted once socat has reaped it.
                    std::thread::sleep(Duration::from_millis(300));
                    let i = p - 1;
                    socat_cpu[i].push((cpu_of(&relays[i].pid(), true) - socat_before[i]) / gb);
                }
                _ => {}
            }
            rates[p].push(rate);
        }
        row(
            &(round + 1).to_string(),
            [0, 1, 2, 3].map(|p| rates[p][round]),
        );
    }
    let m = rates.clone().map(median);
    row("**median**", m);
    let per_round: Vec<f64> = (0..o.rounds)
        .map(|r| rates[LODGE][r] / rates[1][r])
        .collect();
    let worst = per_round.iter().copied().fold(f64::INFINITY, f64::min);
    let ratio = m[LODGE] / m[1];
    say!(
        o,
        "target: lodge ≥ 0.70 × socat: {} ({ratio:.2}; worst round {worst:.2}); against socat -b \
         128 KiB: {:.2}; worst lodge round {:.0} MB/s",
        if ratio >= 0.7 { "met" } else { "NOT met" },
        m[LODGE] / m[2],
        rates[LODGE].iter().copied().fold(f64::INFINITY, f64::min)
    );
    let c = cpu.map(median);
    let [sc, sb] = socat_cpu.map(median);
    say!(o);
    say!(
        o,
        "CPU seconds per GB moved (median of rounds; the bench's own is its source and sink):"
    );
    say!(o);
    say!(
        o,
        "| node | module | lodge's two | bench, lodge path | socat | socat -b 128 KiB |"
    );
    say!(o, "|---|---|---|---|---|---|");
    say!(
        o,
        "| {:.2} | {:.2} | {:.2} | {:.2} | {sc:.2} | {sb:.2} |",
        c[0],
        c[1],
        c[0] + c[1],
        c[2]
    );
    let sys_share = median(sys_share);
    say!(
        o,
        "of node + module's CPU, {:.0} % is system time (the kernel: socket copies, loopback TCP)",
        sys_share * 100.0
    );
    let names = ["direct", "socat", "socat_b128k", "lodge"];
    Ok(json!({
        "rounds_mb_per_s": names.iter().enumerate()
            .map(|(p, n)| (n.to_string(), json!(rates[p])))
            .collect::<serde_json::Map<_, _>>(),
        "median_mb_per_s": names.iter().enumerate()
            .map(|(p, n)| (n.to_string(), json!(m[p])))
            .collect::<serde_json::Map<_, _>>(),
        "lodge_over_socat": ratio,
        "lodge_over_socat_worst_round": worst,
        "lodge_over_socat_b128k": m[LODGE] / m[2],
        "lodge_over_direct": m[LODGE] / m[0],
        "target_met": ratio >= 0.7,
        "cpu_s_per_gb": {
            "node": c[0], "module": c[1], "bench_lodge_path": c[2],
            "socat": sc, "socat_b128k": sb,
            "lodge_system_share": sys_share,
        },
    }))
}

/// 3. Sequential new connections: direct, socat, lodge.
fn connections(o: &Options, lb: &Balancer, backend: u16) -> Outcome<serde_json::Value> {
    let direct = SocketAddr::from(([127, 0, 0, 1], backend));
    let (socat, socat_addr) = start_socat(backend, None)?;
    let paths = [
        ("direct", direct),
        ("socat", socat_addr),
        ("lodge", lb.data),
    ];
    for (_, to) in paths {
        for _ in 0..o.connections.min(50) {
            exchange(to, GET)?;
        }
    }
    let n = o.connections.max(1);
    let mut rates: [Vec<f64>; 3] = Default::default();
    let mut samples: [Vec<f64>; 3] = Default::default();
    // CPU ms per 1,000 connections: node, module (lodge path); socat with its children.
    let mut cpu: [Vec<f64>; 3] = Default::default();
    let mut sys_share = Vec::new();
    let pids = lb.pids();
    for round in 0..o.rounds {
        let mut order = [0, 1, 2];
        order.rotate_left(round % 3);
        for p in order {
            let before: Vec<f64> = pids.iter().map(|(_, pid)| cpu_of(pid, false)).collect();
            let sys_before: f64 = pids.iter().map(|(_, pid)| sys_of(pid)).sum();
            let socat_before = cpu_of(&socat.pid(), true);
            let t = Instant::now();
            for _ in 0..n {
                samples[p].push(exchange(paths[p].1, GET)?);
            }
            rates[p].push(n as f64 / t.elapsed().as_secs_f64());
            let per_k = |s: f64| s * 1e3 / n as f64 * 1e3;
            match p {
                2 => {
                    let mut all = 0.0;
                    for (i, (_, pid)) in pids.iter().enumerate() {
                        let used = cpu_of(pid, false) - before[i];
                        all += used;
                        cpu[i].push(per_k(used));
                    }
                    let sys: f64 = pids.iter().map(|(_, pid)| sys_of(pid)).sum();
                    sys_share.push((sys - sys_before) / f64::max(all, 0.01));
                }
                1 => {
                    std::thread::sleep(Duration::from_millis(300));
                    cpu[2].push(per_k(cpu_of(&socat.pid(), true) - socat_before));
                }
                _ => {}
            }
        }
    }
    drop(socat);
    say!(o);
    say!(
        o,
        "New connections: connect → a {}-byte HTTP GET → its echo → close, {n} sequential per \
         path per round (the time to the answer's first byte; connections per second over each \
         round's batch, closing included):",
        GET.len()
    );
    say!(o);
    say!(
        o,
        "| path | connections/s (median of rounds) | worst round | p50 µs | p99 µs | max µs |"
    );
    say!(o, "|---|---|---|---|---|---|");
    let mut q = Vec::new();
    let mut out = serde_json::Map::new();
    for (p, (name, _)) in paths.iter().enumerate() {
        let s = &mut samples[p];
        s.sort_by(f64::total_cmp);
        let (p50, p99, max) = (quantile(s, 0.5), quantile(s, 0.99), s[s.len() - 1]);
        let rate = median(rates[p].clone());
        let worst = rates[p].iter().copied().fold(f64::INFINITY, f64::min);
        say!(
            o,
            "| {name} | {rate:.0} | {worst:.0} | {p50:.0} | {p99:.0} | {max:.0} |"
        );
        q.push((rate, p50, p99));
        out.insert(
            name.to_string(),
            json!({
                "per_s": rate, "per_s_rounds": rates[p], "p50_us": p50, "p99_us": p99,
                "max_us": max,
            }),
        );
    }
    let c = cpu.map(median);
    say!(
        o,
        "lodge ÷ socat: {:.2} × the connections/s, p50 {:.2} ×, p99 {:.2} ×; lodge ÷ direct: \
         {:.2} × the connections/s",
        q[2].0 / q[1].0,
        q[2].1 / q[1].1,
        q[2].2 / q[1].2,
        q[2].0 / q[0].0
    );
    say!(
        o,
        "CPU ms per 1,000 connections (median of rounds): node {:.0}, module {:.0}, lodge's two \
         {:.0} ({:.0} % system time); socat (with its forked children) {:.0}",
        c[0],
        c[1],
        c[0] + c[1],
        median(sys_share.clone()) * 100.0,
        c[2]
    );
    out.insert(
        "lodge_over_socat".into(),
        json!({ "per_s": q[2].0 / q[1].0, "p50": q[2].1 / q[1].1, "p99": q[2].2 / q[1].2 }),
    );
    out.insert("lodge_over_direct_per_s".into(), json!(q[2].0 / q[0].0));
    out.insert(
        "cpu_ms_per_1000".into(),
        json!({
            "node": c[0], "module": c[1], "socat": c[2],
            "lodge_system_share": median(sys_share),
        }),
    );
    out.insert("per_round".into(), json!(n));
    Ok(serde_json::Value::Object(out))
}
