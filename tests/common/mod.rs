//! Starting real `lodge` processes for end-to-end tests.
//!
//! Nodes listen on port 0 and report the ports they got on stdout, so tests never race for ports.
//! Every process is killed and reaped when its handle drops, whatever the test's outcome.

#![allow(dead_code)]

pub mod backends;
pub mod fake_llm;

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const LODGE: &str = env!("CARGO_BIN_EXE_lodge");
/// Upper bound for a node to come up; only turns a hang into a failure.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running node.
pub struct Node {
    child: Option<Child>,
    pub grpc: String,
    pub metrics: String,
    /// Its peer address (raft, node-to-node calls).
    pub peer: String,
    pub dir: tempfile::TempDir,
    stderr: PathBuf,
}

/// How a node that failed to start ended.
#[derive(Debug)]
pub struct StartFailure {
    pub status: ExitStatus,
    pub stderr: String,
}

impl Node {
    /// Starts `lodge node` with `args` on free loopback ports and a fresh data dir.
    pub fn start(args: &[&str]) -> Node {
        Self::try_start(args).unwrap_or_else(|f| panic!("node did not start: {f:?}"))
    }

    pub fn try_start(args: &[&str]) -> Result<Node, StartFailure> {
        Self::try_start_in(
            tempfile::tempdir().expect("temp dir"),
            "127.0.0.1:0",
            args,
            &[],
        )
    }

    /// Like [`try_start`](Self::try_start), listening on `listen` (reused across restarts, or
    /// an address the test needs to know beforehand).
    pub fn try_start_at(listen: &str, args: &[&str]) -> Result<Node, StartFailure> {
        Self::try_start_in(tempfile::tempdir().expect("temp dir"), listen, args, &[])
    }

    /// Like [`start`](Self::start), with `LODGE_*` environment overrides.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Node {
        Self::try_start_in(
            tempfile::tempdir().expect("temp dir"),
            "127.0.0.1:0",
            args,
            env,
        )
        .unwrap_or_else(|f| panic!("node did not start: {f:?}"))
    }

    /// Like [`start_in`](Self::start_in), with `LODGE_*` environment overrides.
    pub fn start_in_env(
        dir: tempfile::TempDir,
        listen: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Node {
        Self::try_start_in(dir, listen, args, env)
            .unwrap_or_else(|f| panic!("node did not start: {f:?}"))
    }

    /// Starts a node listening on `listen`, keeping its data in `dir` (reused across restarts).
    pub fn start_in(dir: tempfile::TempDir, listen: &str, args: &[&str]) -> Node {
        Self::try_start_in(dir, listen, args, &[])
            .unwrap_or_else(|f| panic!("node did not start: {f:?}"))
    }

    pub fn try_start_in(
        dir: tempfile::TempDir,
        listen: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Node, StartFailure> {
        let stderr = dir.path().join("stderr.log");
        let mut cmd = Command::new(LODGE);
        cmd.arg("node")
            .args(["--listen", listen, "--metrics-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(args)
            .env_remove("LODGE_ENDPOINT")
            // Tests open many short connections from one address; the per-IP limits are tested
            // on their own (tests/registry.rs), with values set through `Node::start_env`.
            .env("LODGE_SERVER__PER_IP_CONNECTION_RATE", "0")
            .env("LODGE_SERVER__PER_IP_MAX_CONNECTIONS", "0")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&stderr)
                    .expect("stderr file"),
            );
        let mut child = cmd.spawn().expect("spawning lodge");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("lodge node ready") => {
                    let field = |k: &str| {
                        line.split_whitespace()
                            .find_map(|w| w.strip_prefix(k))
                            .expect("ready line field")
                            .to_string()
                    };
                    return Ok(Node {
                        grpc: field("grpc="),
                        metrics: field("metrics="),
                        peer: field("peer="),
                        child: Some(child),
                        dir,
                        stderr,
                    });
                }
                Ok(_) => continue,
                Err(_) => {
                    // Ended (stdout closed) or timed out: collect the exit.
                    let status = match child.try_wait().expect("try_wait") {
                        Some(s) => s,
                        None => {
                            let _ = child.kill();
                            child.wait().expect("wait")
                        }
                    };
                    return Err(StartFailure {
                        status,
                        stderr: std::fs::read_to_string(&stderr).unwrap_or_default(),
                    });
                }
            }
        }
    }

    /// Kills the process (SIGKILL) and gives back its data directory.
    pub fn kill9(mut self) -> tempfile::TempDir {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let dir = tempfile::tempdir().expect("temp dir");
        std::mem::replace(&mut self.dir, dir)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Runs `lodge ctl --endpoint <this node> ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        ctl(&self.grpc, args)
    }

    /// Sends SIGTERM and waits (at most `limit`) for the exit.
    pub fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        signal(self.pid(), "TERM");
        self.wait_exit(limit)
    }

    /// Waits (at most `limit`) for the process to exit; kills it past that and answers `None`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        wait_child(self.child.take().expect("running"), limit)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The metrics page as the classic Prometheus text.
    pub fn scrape(&self) -> String {
        http_get(&self.metrics, "/metrics")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits (at most `limit`) for `child` to exit; kills it past that and answers `None`.
pub fn wait_child(mut child: Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return Some(s);
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// A `lodge` command other than a node (`lodge module`, ...), killed and reaped when dropped.
pub struct Lodge {
    child: Option<Child>,
    /// The line it printed when ready.
    pub ready: String,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Lodge {
    /// Runs `lodge ARGS` and waits for the stdout line starting with `ready`; panics with the
    /// process's stderr if it ends or takes too long first.
    pub fn start(args: &[&str], ready: &str) -> Lodge {
        let dir = tempfile::tempdir().expect("temp dir");
        let stderr = dir.path().join("stderr.log");
        let mut child = Command::new(LODGE)
            .args(args)
            .env_remove("LODGE_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawning lodge");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with(ready) => {
                    return Lodge {
                        child: Some(child),
                        ready: line,
                        stderr,
                        _dir: dir,
                    }
                }
                Ok(_) => continue,
                Err(_) => {
                    let status = wait_child(child, Duration::ZERO);
                    panic!(
                        "lodge {args:?} not ready ({status:?}): {}",
                        std::fs::read_to_string(&stderr).unwrap_or_default()
                    );
                }
            }
        }
    }

    /// The value of `key=` in the ready line.
    pub fn field(&self, key: &str) -> String {
        let k = format!("{key}=");
        self.ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k.as_str()))
            .unwrap_or_else(|| panic!("no {key}= in {:?}", self.ready))
            .to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Whether it has exited (without waiting).
    pub fn exited(&mut self) -> bool {
        let c = self.child.as_mut().expect("running");
        c.try_wait().expect("try_wait").is_some()
    }

    /// Waits (at most `limit`) for the exit; kills it past that and answers `None`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        wait_child(self.child.take().expect("running"), limit)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Lodge {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A loopback port free right now (for members that must know each other's addresses up front).
///
/// Taken below Linux's ephemeral range (32768-60999), never twice in one test process: a port the
/// kernel hands out for port 0 may be handed out again, for an outgoing connection or another
/// node's listener, before the member that was meant to have it binds it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Each test process starts at its own place in the range, so that two running at once
    // rarely try the same ports.
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 1_200) as u16 * 10,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(port < 32_768, "no free port left below the ephemeral range");
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
}

/// Runs `lodge kv --endpoint ENDPOINTS ARGS`.
pub fn kv(endpoints: &str, args: &[&str]) -> Output {
    Command::new(LODGE)
        .arg("kv")
        .args(["--endpoint", endpoints])
        .args(args)
        .env_remove("LODGE_ENDPOINT")
        .output()
        .expect("running lodge kv")
}

/// Runs `lodge cluster --endpoint ENDPOINTS ARGS`.
pub fn cluster(endpoints: &str, args: &[&str]) -> Output {
    Command::new(LODGE)
        .arg("cluster")
        .args(["--endpoint", endpoints])
        .args(args)
        .env_remove("LODGE_ENDPOINT")
        .output()
        .expect("running lodge cluster")
}

/// Runs a `lodge` client command and parses its `--json` output; `None` if it failed.
pub fn json_of(out: Output) -> Option<serde_json::Value> {
    if !out.status.success() {
        return None;
    }
    serde_json::from_str(&stdout(&out)).ok()
}

pub fn ctl(endpoint: &str, args: &[&str]) -> Output {
    Command::new(LODGE)
        .arg("ctl")
        .args(["--endpoint", endpoint])
        .args(args)
        .env_remove("LODGE_ENDPOINT")
        .output()
        .expect("running lodge ctl")
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// A minimal HTTP/1.0 GET (no client library needed for one page).
pub fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate, as PEM files.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

pub fn make_pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Lodge test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>, cn: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) =
        leaf(vec!["localhost".into(), "127.0.0.1".into()], "lodge node");
    let (client_cert, client_key) = leaf(vec!["client.lodge.test".into()], "lodge client");
    let write = |name: &str, content: &str| {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        p
    };
    Pki {
        ca: write("ca.pem", &ca_cert.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client.key", &client_key),
    }
}

/// Retries `f` until it succeeds; the bound only turns a hang into a failure.
pub fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not reached in 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn get(endpoints: &str, key: &str, serializable: bool) -> Option<String> {
    let mut args = vec!["get", key, "--json"];
    if serializable {
        args.push("--serializable");
    }
    let out = kv(endpoints, &args);
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_str(&stdout(&out)).ok()?;
    v["kvs"][0]["value"].as_str().map(String::from)
}

pub fn leader_of(node: &Node) -> Option<u64> {
    let out = node.ctl(&["actor", "/node/cluster/raft", "--json"]);
    let v: Value = serde_json::from_str(&stdout(&out)).ok()?;
    v["state_dump"]["leader"].as_u64()
}

/// Three members on loopback ports chosen now, sharing one configuration file.
pub struct Trio {
    /// Client ports.
    pub ports: Vec<u16>,
    /// Peer ports (what `initial` names).
    pub peer_ports: Vec<u16>,
    pub initial: String,
    pub config: String,
    extra: Vec<&'static str>,
    _dir: tempfile::TempDir,
}

impl Trio {
    /// `toml` configures every member; `extra` flags go to every member too.
    pub fn new(toml: &str, extra: &[&'static str]) -> Self {
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let peer_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let initial = (0..3)
            .map(|i| format!("{}=127.0.0.1:{}", i + 1, peer_ports[i]))
            .collect::<Vec<_>>()
            .join(",");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("cluster.toml");
        std::fs::write(&config, toml).unwrap();
        Self {
            ports,
            peer_ports,
            initial,
            config: config.display().to_string(),
            extra: extra.to_vec(),
            _dir: dir,
        }
    }

    /// The gRPC address of member index `i` (0-based; its id is `i + 1`).
    pub fn addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.ports[i])
    }

    /// The peer address of member index `i`.
    pub fn peer(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.peer_ports[i])
    }

    /// The flags member index `i` starts with (its id, configuration, peer port and the
    /// initial cluster), besides `--listen`.
    pub fn args(&self, i: usize) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--node-id".into(),
            (i + 1).to_string(),
            "--config".into(),
            self.config.clone(),
            "--peer-listen".into(),
            self.peer(i),
            "--initial-cluster".into(),
            self.initial.clone(),
        ];
        args.extend(self.extra.iter().map(|a| a.to_string()));
        args
    }

    /// Starts member index `i` keeping its data in `dir` (reused across restarts).
    pub fn start(&self, i: usize, dir: tempfile::TempDir) -> Node {
        let args = self.args(i);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Node::start_in(dir, &self.addr(i), &args)
    }
}

/// A token signed with the HS256 `secret`, for `subject` with `roles`, valid for an hour, its KV
/// roles limited to `prefixes` when given.
pub fn jwt(secret: &str, subject: &str, roles: &[&str], prefixes: Option<&[&str]>) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    lodge_grpc::auth::mint_hs256(
        secret.as_bytes(),
        &lodge_grpc::auth::Claims {
            sub: subject.into(),
            exp,
            aud: vec!["lodge".into()],
            iss: None,
            roles: roles.iter().map(|r| r.to_string()).collect(),
            workflows: None,
            prefixes: prefixes.map(|p| p.iter().map(|s| s.to_string()).collect()),
            instances: None,
        },
    )
    .unwrap()
}

/// The Python with grpcio, grpcio-reflection and protobuf that the tests run stock clients and
/// the example worker with: `LODGE_TEST_PYTHON`, else the venv that scripts/test makes. Missing
/// is a failure that says how to fix it, not a skip: these tests are the only check that code
/// the project did not write can use the node.
pub fn test_python() -> PathBuf {
    let py = std::env::var_os("LODGE_TEST_PYTHON").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/reflection-venv/bin/python3"),
        PathBuf::from,
    );
    let ready = Command::new(&py)
        .args(["-c", "import grpc, grpc_reflection, google.protobuf"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ready,
        "{} cannot import grpc, grpc_reflection and google.protobuf: run `bash scripts/test` once \
         (it installs tests/reflection/requirements.txt into target/reflection-venv), or point \
         LODGE_TEST_PYTHON at a Python that has them",
        py.display()
    );
    py
}
