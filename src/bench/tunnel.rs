//! `lodge bench tunnel`: one TCP stream through `lodge port-forward` → node → `lodge agent` →
//! a local server, beside the same transfer through one `socat` relay (with its default 8 KiB
//! blocks, and with 128 KiB blocks) and direct, in the same run; then the session set-up time
//! (connect → first byte echoed) beside socat's; then the node's memory with many idle sessions.
//!
//! The servers at the far end (a sink that counts what it reads and answers the count, and an
//! echo server) and the clients are in this process: the servers on one current-thread tokio
//! runtime, the clients plain blocking sockets, so the bench itself uses as little CPU as the
//! transfer allows. The node, the agent and the port-forward are child processes of this same
//! binary; socat is the system's.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use super::kv::{start_lodge_with, Proc};
use super::net::{
    connect, cpu_of, exchange, field, mb, quantile, raise_nofile, start, start_servers,
    start_socat, transfer, Helper,
};
use super::{median, rss_of, Outcome};

/// The source's write size.
const WRITE: usize = 128 * 1024;
const WORKFLOW: &str = "bench-tunnel";

/// What the bench measures, from the command line.
pub struct Options {
    pub bytes: u64,
    pub rounds: usize,
    pub setups: usize,
    pub sessions: usize,
    /// Tiny sizes: settle times shortened too.
    pub smoke: bool,
}

/// A node (auth off), an agent and a port-forward to `target` on the loopback.
struct Tunnel {
    node: Proc,
    agent: Helper,
    forward: Helper,
    /// Where the port-forward listens.
    listen: SocketAddr,
    _logs: tempfile::TempDir,
}

impl Tunnel {
    fn start(target: u16, node_env: &[(&str, &str)]) -> Outcome<Self> {
        // The default configuration: auth off, loopback only.
        let node = start_lodge_with(1, node_env)?.remove(0);
        let logs = tempfile::tempdir().map_err(|e| e.to_string())?;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut agent = Command::new(&exe);
        agent.args([
            "agent",
            "--endpoint",
            &node.client,
            "--workflow-id",
            WORKFLOW,
        ]);
        let (agent, _) = start(
            agent,
            "lodge agent",
            "lodge agent ready",
            &logs.path().join("agent.log"),
        )?;
        let mut forward = Command::new(&exe);
        forward.args([
            "port-forward",
            "--endpoint",
            &node.client,
            "--workflow-id",
            WORKFLOW,
            &format!("0:{target}"),
        ]);
        let (forward, line) = start(
            forward,
            "lodge port-forward",
            "lodge port-forward ready",
            &logs.path().join("port-forward.log"),
        )?;
        let listen = field(&line, "listen=")?;
        let listen = listen
            .parse()
            .map_err(|e| format!("port-forward's listen={listen}: {e}"))?;
        Ok(Self {
            node,
            agent,
            forward,
            listen,
            _logs: logs,
        })
    }

    fn node_pid(&self) -> String {
        self.node.child.id().to_string()
    }

    /// (name, pid) of the three lodge processes.
    fn pids(&self) -> [(&'static str, String); 3] {
        [
            ("node", self.node_pid()),
            (self.agent.name, self.agent.pid()),
            (self.forward.name, self.forward.pid()),
        ]
    }
}

pub fn run(o: &Options) -> Outcome {
    let nofile = raise_nofile();
    let servers = start_servers();
    println!(
        "lodge bench tunnel: {} MB per transfer in {} KiB writes, {} rounds; {} set-ups; {} idle \
         sessions; 2 CPUs shared by the bench, node, agent, port-forward and socat; open-file \
         limit {nofile}",
        mb(o.bytes),
        WRITE / 1024,
        o.rounds,
        o.setups,
        o.sessions
    );
    let chunk: Vec<u8> = (0..WRITE).map(|i| (i % 251) as u8).collect();

    // 1. Throughput: the four paths in turn, the order rotated every round. socat runs as it
    // usually is (8 KiB blocks), and with blocks the size of the source's writes and of the
    // tunnel's frames.
    let sink = SocketAddr::from(([127, 0, 0, 1], servers.sink));
    let (socat, socat_addr) = start_socat(servers.sink, None)?;
    let (socat_big, socat_big_addr) = start_socat(servers.sink, Some(WRITE))?;
    let tunnel = Tunnel::start(servers.sink, &[])?;
    let paths = [sink, socat_addr, socat_big_addr, tunnel.listen];
    const LODGE: usize = 3;
    // Warm-up: connections, sessions, allocator pools.
    for to in paths {
        transfer(to, o.bytes.min(64 << 20), b"", &chunk)?;
    }
    let mut rates: [Vec<f64>; 4] = Default::default();
    // CPU seconds per GB: each lodge process and this one over the lodge transfers, and each
    // socat (with its per-connection children) over its own.
    let mut cpu: [Vec<f64>; 4] = Default::default();
    let mut socat_cpu: [Vec<f64>; 2] = Default::default();
    let gb = o.bytes as f64 / 1e9;
    println!();
    println!(
        "| round | direct MB/s | socat MB/s | socat -b 128 KiB MB/s | lodge MB/s | lodge ÷ socat \
         | lodge ÷ socat -b 128 KiB | lodge ÷ direct |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let row = |label: &str, r: [f64; 4]| {
        let [d, s, b, l] = r;
        println!(
            "| {label} | {d:.0} | {s:.0} | {b:.0} | {l:.0} | {:.2} | {:.2} | {:.3} |",
            l / s,
            l / b,
            l / d
        );
    };
    for round in 0..o.rounds {
        let mut order = [0, 1, 2, 3];
        order.rotate_left(round % 4);
        for p in order {
            let pids = tunnel.pids();
            let before: Vec<f64> = pids.iter().map(|(_, pid)| cpu_of(pid, false)).collect();
            let me = cpu_of("self", false);
            let relays = [&socat, &socat_big];
            let socat_before = relays.map(|h| cpu_of(&h.pid(), true));
            let rate = transfer(paths[p], o.bytes, b"", &chunk)?;
            match p {
                LODGE => {
                    for (i, (_, pid)) in pids.iter().enumerate() {
                        cpu[i].push((cpu_of(pid, false) - before[i]) / gb);
                    }
                    cpu[3].push((cpu_of("self", false) - me) / gb);
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
    let m = rates.map(median);
    row("**median**", m);
    println!(
        "target: lodge ≥ 0.50 × socat: {} ({:.2}); against socat -b 128 KiB: {:.2}",
        if m[LODGE] / m[1] >= 0.5 {
            "met"
        } else {
            "NOT met"
        },
        m[LODGE] / m[1],
        m[LODGE] / m[2]
    );
    println!();
    println!(
        "CPU seconds per GB moved (median of rounds; the bench's own is its source and sink):"
    );
    println!();
    println!(
        "| node | agent | port-forward | lodge's three | bench, lodge path | socat | socat -b 128 KiB |"
    );
    println!("|---|---|---|---|---|---|---|");
    let c = cpu.map(median);
    let [sc, sb] = socat_cpu.map(median);
    println!(
        "| {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {sc:.2} | {sb:.2} |",
        c[0],
        c[1],
        c[2],
        c[0] + c[1] + c[2],
        c[3],
    );
    drop((socat, socat_big, tunnel));

    // 2. Set-up time: the same echo server through lodge, socat and directly, sample by sample
    // in turn.
    let echo = SocketAddr::from(([127, 0, 0, 1], servers.echo));
    let (socat, socat_addr) = start_socat(servers.echo, None)?;
    let tunnel = Tunnel::start(servers.echo, &[])?;
    let paths = [
        ("direct", echo),
        ("socat", socat_addr),
        ("lodge", tunnel.listen),
    ];
    for (_, to) in paths {
        for _ in 0..10 {
            exchange(to, b"x")?;
        }
    }
    let mut samples: [Vec<f64>; 3] = Default::default();
    for i in 0..o.setups {
        let mut order = [0, 1, 2];
        order.rotate_left(i % 3);
        for p in order {
            samples[p].push(exchange(paths[p].1, b"x")?);
        }
    }
    println!();
    println!(
        "Set-up, connect → first byte echoed, {} sequential connections per path (µs):",
        o.setups
    );
    println!();
    println!("| path | p50 | p99 | max |");
    println!("|---|---|---|---|");
    let mut q = Vec::new();
    for (p, (name, _)) in paths.iter().enumerate() {
        let s = &mut samples[p];
        s.sort_by(f64::total_cmp);
        let (p50, p99) = (quantile(s, 0.5), quantile(s, 0.99));
        println!("| {name} | {p50:.0} | {p99:.0} | {:.0} |", s[s.len() - 1]);
        q.push((p50, p99));
    }
    println!(
        "lodge ÷ socat: p50 {:.2}, p99 {:.2}",
        q[2].0 / q[1].0,
        q[2].1 / q[1].1
    );
    drop(socat);
    drop(tunnel);

    // 3. Memory with idle sessions, on fresh processes. One connection (one HTTP/2 stream to the
    // node) per session from the port-forward and from the agent: the node's per-connection
    // stream limit (2048 by default) is raised if needed to hold them all.
    if o.sessions == 0 {
        return Ok(());
    }
    // What a session's opening left in flight settles for this long before memory is read.
    let settle = Duration::from_millis(if o.smoke { 200 } else { 2000 });
    let streams = (o.sessions + 16).to_string();
    let tunnel = Tunnel::start(
        servers.echo,
        &[("LODGE_SERVER__MAX_CONCURRENT_STREAMS", &streams)],
    )?;
    // A few sessions opened and closed first, so that what every session's first use sets up
    // (connections, pools) is in the baseline.
    for _ in 0..20 {
        exchange(tunnel.listen, b"x")?;
    }
    std::thread::sleep(settle / 2);
    let pids = tunnel.pids();
    let before: Vec<u64> = pids.iter().map(|(_, p)| rss_of(p)).collect();
    let t = Instant::now();
    let mut open = Vec::with_capacity(o.sessions);
    for _ in 0..o.sessions {
        let mut s = connect(tunnel.listen)?;
        let mut b = [0u8; 1];
        s.write_all(b"x")
            .and_then(|()| s.read_exact(&mut b))
            .map_err(|e| format!("the echo of idle session {}: {e}", open.len() + 1))?;
        open.push(s);
    }
    let opened = t.elapsed();
    // Let whatever the opening left in flight settle.
    std::thread::sleep(settle);
    let after: Vec<u64> = pids.iter().map(|(_, p)| rss_of(p)).collect();
    let node_sessions = count_sessions(&tunnel.node.client);
    // Then closed again: what stays is not per session (allocator pages kept, the store's
    // history of the owner records).
    drop(open);
    let deadline = Instant::now() + Duration::from_secs(30);
    while count_sessions(&tunnel.node.client) != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(settle / 2);
    let closed: Vec<u64> = pids.iter().map(|(_, p)| rss_of(p)).collect();
    println!();
    println!(
        "Memory with {} idle sessions (each paired, one byte echoed, held open; opened one after \
         another in {:.1} s; the node lists {node_sessions} sessions):",
        o.sessions,
        opened.as_secs_f64()
    );
    println!();
    println!("| process | RSS before | with the sessions | per session | all closed again |");
    println!("|---|---|---|---|---|");
    for (i, (name, _)) in pids.iter().enumerate() {
        println!(
            "| {name} | {:.1} MB | {:.1} MB | {:.1} KB | {:.1} MB |",
            mb(before[i]),
            mb(after[i]),
            after[i].saturating_sub(before[i]) as f64 / o.sessions as f64 / 1024.0,
            mb(closed[i])
        );
    }
    Ok(())
}

/// Sessions the node lists (through `RouterControl.ListSessions`), or -1 if it cannot say.
fn count_sessions(endpoint: &str) -> i64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ch = match lodge_grpc::client::connect(endpoint, &Default::default()).await {
            Ok(c) => c,
            Err(_) => return -1,
        };
        let client = match lodge_grpc::router_client::RouterClient::new(ch, None) {
            Ok(c) => c,
            Err(_) => return -1,
        };
        client
            .list("", Duration::from_secs(30))
            .await
            .map_or(-1, |s| s.len() as i64)
    })
}
