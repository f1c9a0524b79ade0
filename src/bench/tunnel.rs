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

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::kv::{free_port, start_lodge_with, Proc};
use super::{median, rss_of};

/// The source's write size.
const WRITE: usize = 128 * 1024;
/// Longest any single socket operation of the bench may block before the bench fails.
const STEP: Duration = Duration::from_secs(120);
const WORKFLOW: &str = "bench-tunnel";

/// What the bench measures, from the command line.
pub struct Options {
    pub bytes: u64,
    pub rounds: usize,
    pub setups: usize,
    pub sessions: usize,
}

/// A child process (not a node) killed and reaped on drop; its stderr goes to a file.
struct Helper {
    child: Child,
    name: &'static str,
}

impl Helper {
    fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` (stdout piped, stderr to `log`) and waits for a stdout line starting with
/// `ready`; answers the helper and that line. Later stdout lines are read and dropped.
fn start(mut cmd: Command, name: &'static str, ready: &str, log: &Path) -> (Helper, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let helper = Helper { child, name };
    loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.starts_with(ready) => return (helper, line),
            Ok(_) => continue,
            Err(_) => panic!("{name} did not start (see {})", log.display()),
        }
    }
}

/// The value of `key=` in a ready line.
fn field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        .to_string()
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
    fn start(target: u16, node_env: &[(&str, &str)]) -> Self {
        let mut env = vec![
            ("LODGE_ROUTER__AUTH__ENABLED", "false"),
            ("LODGE_LOG__LEVEL", "warning"),
        ];
        env.extend_from_slice(node_env);
        let node = start_lodge_with(1, &env).pop().unwrap();
        let logs = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().expect("own path");
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
        );
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
        );
        let listen = field(&line, "listen=").parse().expect("listen address");
        Self {
            node,
            agent,
            forward,
            listen,
            _logs: logs,
        }
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

/// `socat [-b BLOCK] TCP-LISTEN:P,fork,reuseaddr TCP:127.0.0.1:TARGET` (one process per
/// connection; socat's default transfer block is 8 KiB); answers it and where it listens once it
/// accepts connections.
fn start_socat(target: u16, block: Option<usize>) -> (Helper, SocketAddr) {
    let port = free_port();
    let mut socat = Command::new("socat");
    if let Some(b) = block {
        socat.args(["-b", &b.to_string()]);
    }
    let child = socat
        .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"))
        .arg(format!("TCP:127.0.0.1:{target}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting socat (scripts/bench-deps installs it)");
    let helper = Helper {
        child,
        name: "socat",
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // Listening shows in /proc/net/tcp; connecting to find out would make a relayed connection.
    let hex = format!(":{port:04X} ");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        // State 0A is LISTEN.
        if table
            .lines()
            .any(|l| l.contains(&hex) && l.split_whitespace().nth(3) == Some("0A"))
        {
            return (helper, addr);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("socat did not listen on {addr}");
}

/// The far-end servers, on a current-thread runtime of their own thread.
struct Servers {
    /// Reads to end-of-file, then answers the byte count (8 bytes, little-endian) and closes.
    sink: u16,
    /// Echoes what it reads; closes its side after end-of-file.
    echo: u16,
}

fn start_servers() -> Servers {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(Servers {
                sink: sink.local_addr().unwrap().port(),
                echo: echo.local_addr().unwrap().port(),
            })
            .unwrap();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = sink.accept().await {
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 256 * 1024];
                        let mut n = 0u64;
                        loop {
                            match s.read(&mut buf).await {
                                Ok(0) => break,
                                Ok(k) => n += k as u64,
                                Err(_) => return,
                            }
                        }
                        let _ = s.write_all(&n.to_le_bytes()).await;
                        let _ = s.shutdown().await;
                    });
                }
            });
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let _ = s.set_nodelay(true);
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
    });
    rx.recv().unwrap()
}

fn connect(to: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(to).unwrap_or_else(|e| panic!("connecting to {to}: {e}"));
    s.set_read_timeout(Some(STEP)).unwrap();
    s.set_write_timeout(Some(STEP)).unwrap();
    s
}

/// Sends `bytes` to the sink through `to` in [`WRITE`]-byte writes, half-closes, and waits for
/// the sink's count: answers MB/s (10^6 bytes) over the whole exchange.
fn transfer(to: SocketAddr, bytes: u64, chunk: &[u8]) -> f64 {
    let t = Instant::now();
    let mut s = connect(to);
    let mut left = bytes;
    while left > 0 {
        let k = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..k])
            .unwrap_or_else(|e| panic!("writing to {to}: {e}"));
        left -= k as u64;
    }
    s.shutdown(Shutdown::Write).unwrap();
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack)
        .unwrap_or_else(|e| panic!("reading the sink's count through {to}: {e}"));
    let took = t.elapsed();
    let got = u64::from_le_bytes(ack);
    assert_eq!(
        got, bytes,
        "the sink got {got} bytes of {bytes} through {to}"
    );
    bytes as f64 / 1e6 / took.as_secs_f64()
}

/// Connect, one byte out, the same byte back: the time to the echoed byte, in µs. The
/// connection is then closed.
fn setup_once(to: SocketAddr) -> f64 {
    let t = Instant::now();
    let mut s = connect(to);
    s.set_nodelay(true).unwrap();
    s.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
        .unwrap_or_else(|e| panic!("reading the echo through {to}: {e}"));
    let took = t.elapsed();
    assert_eq!(&b, b"x");
    took.as_secs_f64() * 1e6
}

/// CPU time (user + system) process `pid` used so far, in seconds, from `/proc/PID/stat`; with
/// `children`, also that of its children it has waited for (socat's, one per connection).
fn cpu_of(pid: &str, children: bool) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses; utime and stime are
    // fields 14 and 15 of the line, 12 and 13 after it.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // USER_HZ, 100 on every Linux target Lodge builds for.
    let fields = if children { 11..15 } else { 11..13 };
    f.get(fields)
        .map_or(0.0, |v| v.iter().sum::<u64>() as f64 / 100.0)
}

/// Quantile `q` of sorted samples.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Raises this process's soft open-file limit to its hard limit (the children inherit it):
/// the memory part holds a few descriptors per session in this process and the helpers.
fn raise_nofile() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current != l.maximum {
        l.current = l.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, l) {
            eprintln!("raising the open-file limit: {e}");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

pub fn run(o: Options) {
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
    let (socat, socat_addr) = start_socat(servers.sink, None);
    let (socat_big, socat_big_addr) = start_socat(servers.sink, Some(WRITE));
    let tunnel = Tunnel::start(servers.sink, &[]);
    let paths = [sink, socat_addr, socat_big_addr, tunnel.listen];
    const LODGE: usize = 3;
    // Warm-up: connections, sessions, allocator pools.
    for to in paths {
        transfer(to, o.bytes.min(64 << 20), &chunk);
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
            let rate = transfer(paths[p], o.bytes, &chunk);
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
    let (socat, socat_addr) = start_socat(servers.echo, None);
    let tunnel = Tunnel::start(servers.echo, &[]);
    let paths = [
        ("direct", echo),
        ("socat", socat_addr),
        ("lodge", tunnel.listen),
    ];
    for (_, to) in paths {
        for _ in 0..10 {
            setup_once(to);
        }
    }
    let mut samples: [Vec<f64>; 3] = Default::default();
    for i in 0..o.setups {
        let mut order = [0, 1, 2];
        order.rotate_left(i % 3);
        for p in order {
            samples[p].push(setup_once(paths[p].1));
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
        return;
    }
    let streams = (o.sessions + 16).to_string();
    let tunnel = Tunnel::start(
        servers.echo,
        &[("LODGE_SERVER__MAX_CONCURRENT_STREAMS", &streams)],
    );
    // A few sessions opened and closed first, so that what every session's first use sets up
    // (connections, pools) is in the baseline.
    for _ in 0..20 {
        setup_once(tunnel.listen);
    }
    std::thread::sleep(Duration::from_secs(1));
    let pids = tunnel.pids();
    let before: Vec<u64> = pids.iter().map(|(_, p)| rss_of(p)).collect();
    let t = Instant::now();
    let mut open = Vec::with_capacity(o.sessions);
    for _ in 0..o.sessions {
        let mut s = connect(tunnel.listen);
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .expect("reading the echo of an idle session");
        open.push(s);
    }
    let opened = t.elapsed();
    // Let whatever the opening left in flight settle.
    std::thread::sleep(Duration::from_secs(2));
    let after: Vec<u64> = pids.iter().map(|(_, p)| rss_of(p)).collect();
    let node_sessions = count_sessions(&tunnel.node.client);
    // Then closed again: what stays is not per session (allocator pages kept, the store's
    // history of the owner records).
    drop(open);
    let deadline = Instant::now() + Duration::from_secs(30);
    while count_sessions(&tunnel.node.client) != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
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
