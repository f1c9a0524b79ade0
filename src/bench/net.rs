//! What the benches that move TCP bytes share (`bench tunnel`, `bench balancer`): helper
//! processes killed on drop, a socat relay, the far-end servers (a sink, an echo server, and one
//! that is either), blocking clients for one transfer and one request/answer exchange, and CPU
//! time read from `/proc`.
//!
//! The servers are in the bench process on one current-thread tokio runtime of their own thread,
//! the clients plain blocking sockets, so the bench itself uses as little CPU as the transfer
//! allows.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::kv::free_port;
use super::Outcome;

/// Longest any single socket operation of a bench may block before the bench fails.
pub(crate) const STEP: Duration = Duration::from_secs(120);

/// A child process (not a node) killed and reaped on drop; its stderr goes to a file.
pub(crate) struct Helper {
    pub(crate) child: Child,
    pub(crate) name: &'static str,
}

impl Helper {
    pub(crate) fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Has `cmd`'s process killed when the bench thread that starts it ends: the guards clean up on
/// the way out of an error, this when the bench is killed (a signal, where no guard runs).
pub(crate) fn die_with_bench(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: runs in the child between fork and exec, where only async-signal-safe calls are
    // allowed; prctl(PR_SET_PDEATHSIG) is a plain system call.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                .map_err(std::io::Error::from)
        })
    }
}

/// Starts `cmd` (stdout piped, stderr to `log`) and waits for a stdout line starting with
/// `ready`; answers the helper and that line. Later stdout lines are read and dropped. A helper
/// that does not get ready in 30 s is killed (by its guard) and the bench fails.
pub(crate) fn start(
    mut cmd: Command,
    name: &'static str,
    ready: &str,
    log: &Path,
) -> Outcome<(Helper, String)> {
    let mut child = die_with_bench(&mut cmd)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?)
        .spawn()
        .map_err(|e| format!("starting {name}: {e}"))?;
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let helper = Helper { child, name };
    loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.starts_with(ready) => return Ok((helper, line)),
            Ok(_) => continue,
            Err(_) => {
                let log = std::fs::read_to_string(log).unwrap_or_default();
                let last = log
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("");
                return Err(format!(
                    "{name} did not get ready within 30 s; its last log line: {last}"
                ));
            }
        }
    }
}

/// The value of `key=` in a ready line.
pub(crate) fn field(line: &str, key: &str) -> Outcome<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .map(str::to_string)
        .ok_or_else(|| format!("no {key} in {line:?}"))
}

/// `socat [-b BLOCK] TCP-LISTEN:P,fork,reuseaddr TCP:127.0.0.1:TARGET` (one process per
/// connection; socat's default transfer block is 8 KiB); answers it and where it listens once it
/// accepts connections.
pub(crate) fn start_socat(target: u16, block: Option<usize>) -> Outcome<(Helper, SocketAddr)> {
    let port = free_port();
    let mut socat = Command::new("socat");
    if let Some(b) = block {
        socat.args(["-b", &b.to_string()]);
    }
    let child = die_with_bench(&mut socat)
        .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"))
        .arg(format!("TCP:127.0.0.1:{target}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting socat (scripts/bench-deps installs it): {e}"))?;
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
            return Ok((helper, addr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("socat did not listen on {addr} within 10 s"))
}

/// The far-end servers, on a current-thread runtime of their own thread (which lives as long as
/// the bench process).
pub(crate) struct Servers {
    /// Reads to end-of-file, then answers the byte count (8 bytes, little-endian) and closes.
    pub(crate) sink: u16,
    /// Echoes what it reads; closes its side after end-of-file.
    pub(crate) echo: u16,
    /// The sink for a connection that starts with `POST ` (as `bench balancer`'s transfers do:
    /// an HTTP request head, then the body), the echo server for any other: one backend for a
    /// relay that forwards to one address only.
    pub(crate) either: u16,
}

async fn sink(mut s: tokio::net::TcpStream, mut n: u64) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(_) => return,
        }
    }
    let _ = s.write_all(&n.to_le_bytes()).await;
    let _ = s.shutdown().await;
}

async fn echo(mut s: tokio::net::TcpStream, first: &[u8]) {
    let _ = s.set_nodelay(true);
    if s.write_all(first).await.is_err() {
        return;
    }
    let (mut r, mut w) = s.split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

/// The first bytes decide: `POST ` makes a sink, anything else an echo.
async fn either(mut s: tokio::net::TcpStream) {
    let mut first = vec![0u8; 64 * 1024];
    let mut n = 0;
    while n < 5 {
        match s.read(&mut first[n..]).await {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(_) => return,
        }
    }
    if first[..n].starts_with(b"POST ") {
        sink(s, n as u64).await
    } else {
        echo(s, &first[..n]).await
    }
}

pub(crate) fn start_servers() -> Servers {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
            let (sink_l, echo_l, either_l) = (
                bind().await.unwrap(),
                bind().await.unwrap(),
                bind().await.unwrap(),
            );
            let port = |l: &tokio::net::TcpListener| l.local_addr().unwrap().port();
            tx.send(Servers {
                sink: port(&sink_l),
                echo: port(&echo_l),
                either: port(&either_l),
            })
            .unwrap();
            tokio::spawn(async move {
                while let Ok((s, _)) = sink_l.accept().await {
                    tokio::spawn(sink(s, 0));
                }
            });
            tokio::spawn(async move {
                while let Ok((s, _)) = either_l.accept().await {
                    tokio::spawn(either(s));
                }
            });
            while let Ok((s, _)) = echo_l.accept().await {
                tokio::spawn(echo(s, &[]));
            }
        });
    });
    rx.recv().unwrap()
}

pub(crate) fn connect(to: SocketAddr) -> Outcome<TcpStream> {
    let s = TcpStream::connect(to).map_err(|e| format!("connecting to {to}: {e}"))?;
    s.set_read_timeout(Some(STEP))
        .and_then(|()| s.set_write_timeout(Some(STEP)))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    Ok(s)
}

/// Sends `bytes` to a sink through `to` in `chunk`-sized writes, the first of them `head`
/// followed by the rest of a chunk; half-closes, and waits for the sink's count: answers MB/s
/// (10^6 bytes) over the whole exchange, connect included.
pub(crate) fn transfer(to: SocketAddr, bytes: u64, head: &[u8], chunk: &[u8]) -> Outcome<f64> {
    assert!(head.len() <= chunk.len());
    let first: Vec<u8> = head.iter().chain(&chunk[head.len()..]).copied().collect();
    let t = Instant::now();
    let mut s = connect(to)?;
    let mut left = bytes;
    let mut next = &first[..];
    while left > 0 {
        let k = left.min(next.len() as u64) as usize;
        s.write_all(&next[..k])
            .map_err(|e| format!("writing to {to}: {e}"))?;
        left -= k as u64;
        next = chunk;
    }
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("half-closing {to}: {e}"))?;
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack)
        .map_err(|e| format!("reading the sink's count through {to}: {e}"))?;
    let took = t.elapsed();
    let got = u64::from_le_bytes(ack);
    if got != bytes {
        return Err(format!("the sink got {got} bytes of {bytes} through {to}"));
    }
    Ok(bytes as f64 / 1e6 / took.as_secs_f64())
}

/// Connect, `request` out (TCP_NODELAY), the same bytes back from an echo server: answers the
/// time from before `connect` to the answer's first byte, in µs. The connection is then closed
/// (dropped) once the whole answer is in.
pub(crate) fn exchange(to: SocketAddr, request: &[u8]) -> Outcome<f64> {
    let t = Instant::now();
    let mut s = connect(to)?;
    let read = |e: std::io::Error| format!("reading the echo through {to}: {e}");
    s.set_nodelay(true)
        .and_then(|()| s.write_all(request))
        .map_err(|e| format!("writing to {to}: {e}"))?;
    let mut answer = vec![0u8; request.len()];
    s.read_exact(&mut answer[..1]).map_err(read)?;
    let took = t.elapsed();
    s.read_exact(&mut answer[1..]).map_err(read)?;
    if answer != request {
        return Err(format!("the echo through {to} differs from what was sent"));
    }
    Ok(took.as_secs_f64() * 1e6)
}

/// CPU time (user + system) process `pid` used so far, in seconds, from `/proc/PID/stat`; with
/// `children`, also that of its children it has waited for (socat's, one per connection).
pub(crate) fn cpu_of(pid: &str, children: bool) -> f64 {
    // utime, stime, cutime, cstime.
    let f = times_of(pid);
    if children {
        f.iter().sum()
    } else {
        f[0] + f[1]
    }
}

/// The system (kernel) part of [`cpu_of`] without children, in seconds.
pub(crate) fn sys_of(pid: &str) -> f64 {
    times_of(pid)[1]
}

/// utime, stime, cutime and cstime of process `pid`, in seconds (zeros if it is gone).
fn times_of(pid: &str) -> [f64; 4] {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses; utime, stime,
    // cutime and cstime are fields 14 to 17 of the line, 12 to 15 after it.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // USER_HZ, 100 on every Linux target Lodge builds for.
    let mut t = [0.0; 4];
    if let Some(v) = f.get(11..15) {
        for (t, v) in t.iter_mut().zip(v) {
            *t = *v as f64 / 100.0;
        }
    }
    t
}

/// Quantile `q` of sorted samples.
pub(crate) fn quantile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Raises this process's soft open-file limit to its hard limit (the children inherit it).
pub(crate) fn raise_nofile() -> u64 {
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

/// Bytes as MB (10^6).
pub(crate) fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_either_server_counts_posts_and_echoes_the_rest() {
        let s = start_servers();
        let either = SocketAddr::from(([127, 0, 0, 1], s.either));
        assert!(exchange(either, b"GET / HTTP/1.1\r\n\r\n").unwrap() > 0.0);
        let chunk = vec![7u8; 1000];
        assert!(transfer(either, 2500, b"POST / HTTP/1.1\r\n\r\n", &chunk).unwrap() > 0.0);
        assert!(exchange(SocketAddr::from(([127, 0, 0, 1], s.echo)), b"x").unwrap() > 0.0);
        let sink = SocketAddr::from(([127, 0, 0, 1], s.sink));
        assert!(transfer(sink, 10, b"", &chunk).unwrap() > 0.0);
    }

    #[test]
    fn quantiles_of_sorted_samples() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
    }
}
