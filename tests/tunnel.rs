//! End-to-end: the router's command-line ends, as users run them. A real node, a real
//! `lodge agent`, and `lodge exec`, `lodge port-forward` and `lodge rsync` carrying real tools
//! (curl, rsync) through the tunnels. `scripts/test` installs the tools.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{stderr, stdout, wait_child, Node, LODGE};

const SECRET: &str = "tunnel-tests-secret-0123456789abcdef";

/// A node with auth on, a token file with every role, and an agent for workflow "w".
struct Setup {
    node: Node,
    token: std::path::PathBuf,
    _agent: Proc,
    _dir: tempfile::TempDir,
}

/// A child process killed and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn require(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{tool} is not installed: run the suite with `bash scripts/test`, which installs it"
    );
}

/// Starts `cmd` and waits for its stdout line starting with `prefix`; answers the line.
fn start_until(mut cmd: Command, prefix: &str) -> (Proc, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    let prefix = prefix.to_string();
    std::thread::spawn(move || {
        for line in lines.by_ref().map_while(Result::ok) {
            if line.starts_with(&prefix) {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the process printed its ready line");
    (Proc(child), line)
}

fn setup() -> Setup {
    let (node, token, dir) = node_and_token(&[], "exec,port-forward,rsync,agent,admin");
    let mut agent = Command::new(LODGE);
    agent
        .args(["agent", "--workflow-id", "w", "--endpoint", &node.grpc])
        .arg("--token-file")
        .arg(&token)
        .env_remove("LODGE_TOKEN");
    let (agent, _) = start_until(agent, "lodge agent ready");
    Setup {
        node,
        token,
        _agent: agent,
        _dir: dir,
    }
}

/// A node with auth on (and `env` on top), and a token file with `roles`.
fn node_and_token(
    env: &[(&str, &str)],
    roles: &str,
) -> (Node, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let mut env = env.to_vec();
    env.push(("LODGE_AUTH__ENABLED", "true"));
    env.push(("LODGE_AUTH__HS256_SECRET_FILE", secret.to_str().unwrap()));
    let node = Node::start_env(&[], &env);
    let minted = Command::new(LODGE)
        .args(["token", "--secret-file", secret.to_str().unwrap()])
        .args(["--roles", roles])
        .output()
        .unwrap();
    assert!(minted.status.success(), "{}", stderr(&minted));
    let token = dir.path().join("token");
    std::fs::write(&token, stdout(&minted)).unwrap();
    (node, token, dir)
}

impl Setup {
    fn lodge(&self, sub: &str) -> Command {
        let mut c = Command::new(LODGE);
        c.arg(sub)
            .args(["--endpoint", &self.node.grpc])
            .arg("--token-file")
            .arg(&self.token)
            .env_remove("LODGE_TOKEN");
        c
    }

    fn exec(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut c = self.lodge("exec");
        c.args(["--workflow-id", "w"]).args(args);
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    }

    /// `lodge port-forward` to remote `port`; answers the process and its local address.
    fn forward(&self, port: u16, extra: &[&str]) -> (Proc, String) {
        let mut c = self.lodge("port-forward");
        c.args(["--workflow-id", "w"])
            .args(extra)
            .arg(format!("0:{port}"));
        let (p, line) = start_until(c, "lodge port-forward ready");
        let addr = line.split("listen=").nth(1).unwrap().trim().to_string();
        (p, addr)
    }
}

#[test]
fn tunnel_exec_carries_stdin_output_and_the_exit_code() {
    let s = setup();
    let out = s.exec(
        &["--", "sh", "-c", "cat; echo oops >&2; exit 3"],
        b"hello through the router\n",
    );
    assert_eq!(stdout(&out), "hello through the router\n");
    assert!(stderr(&out).contains("oops"), "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(3));
    let missing = s.exec(&["--", "no-such-command-here"], b"");
    assert_eq!(missing.status.code(), Some(127));
}

#[test]
fn tunnel_exec_with_a_tty_shows_the_window_size() {
    require("script");
    let s = setup();
    // `script` gives the CLI a terminal of a known size, as a user's would be.
    let token = s.token.display().to_string();
    let inner = format!(
        "stty rows 33 cols 99; {LODGE} exec --endpoint {} --token-file {token} --workflow-id w --tty -- stty size",
        s.node.grpc
    );
    let out = Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{} {}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("33 99"), "{:?}", stdout(&out));
}

/// A tiny HTTP server answering GET with `body`; returns its port.
fn http_server(body: Vec<u8>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let body = std::sync::Arc::new(body);
    std::thread::spawn(move || {
        for conn in l.incoming().map_while(Result::ok) {
            let body = body.clone();
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes());
                let _ = conn.write_all(&body);
            });
        }
    });
    port
}

fn pattern(n: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn tunnel_tcp_forward_carries_http_and_100_mb_intact() {
    require("curl");
    let s = setup();
    let body = pattern(100 << 20);
    let port = http_server(body.clone());
    let (_pf, local) = s.forward(port, &[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("download");
    let out = Command::new("curl")
        .args(["-sS", "--fail", "-o"])
        .arg(&file)
        .arg(format!("http://{local}/big"))
        .output()
        .unwrap();
    assert!(out.status.success(), "curl: {}", stderr(&out));
    let got = std::fs::read(&file).unwrap();
    assert_eq!(got.len(), body.len());
    assert!(got == body, "the 100 MB arrived changed");
}

#[test]
fn tunnel_tcp_half_close_lets_the_remote_side_answer_after_the_user_finished() {
    let s = setup();
    // Reads to EOF, then answers with what it counted: only works if the EOF arrives while the
    // way back stays open.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut all = Vec::new();
        c.read_to_end(&mut all).unwrap();
        c.write_all(format!("got {} bytes", all.len()).as_bytes())
            .unwrap();
    });
    let (_pf, local) = s.forward(port, &[]);
    let mut c = TcpStream::connect(&local).unwrap();
    c.write_all(&vec![1u8; 300_000]).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "got 300000 bytes");
}

fn udp_echo() -> u16 {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sock.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    });
    port
}

#[test]
fn tunnel_udp_forward_echoes_over_ipv4_and_ipv6() {
    let s = setup();
    let port = udp_echo();
    for bind in ["127.0.0.1", "::1"] {
        let (_pf, local) = s.forward(port, &["--udp", "--bind", bind]);
        let client = UdpSocket::bind(if bind == "::1" {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        })
        .unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        client.connect(&local).unwrap();
        for i in 0..3 {
            let msg = format!("datagram {i} via {bind}");
            client.send(msg.as_bytes()).unwrap();
            let mut buf = [0u8; 1500];
            let n = client.recv(&mut buf).expect("the echo comes back");
            assert_eq!(&buf[..n], msg.as_bytes());
        }
    }
}

fn write_tree(root: &Path) {
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::write(root.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(root.join("sub/b.bin"), pattern(300_000)).unwrap();
    std::fs::write(root.join("sub/deeper/c.txt"), "gamma\n").unwrap();
}

#[test]
fn tunnel_rsync_copies_a_tree_both_ways_then_only_the_delta() {
    require("rsync");
    let s = setup();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write_tree(&src);
    let remote = dir.path().join("remote");
    let rsync = |args: &[&str]| {
        let out = s.lodge("rsync").args(args).output().unwrap();
        assert!(out.status.success(), "rsync {args:?}: {}", stderr(&out));
        stdout(&out)
    };
    let push = format!("w:{}/", remote.display());
    rsync(&["-a", &format!("{}/", src.display()), &push]);
    assert_eq!(
        std::fs::read(remote.join("sub/b.bin")).unwrap(),
        pattern(300_000)
    );
    assert_eq!(
        std::fs::read_to_string(remote.join("sub/deeper/c.txt")).unwrap(),
        "gamma\n"
    );

    // Change one file: the second run sends that file only.
    std::fs::write(src.join("a.txt"), "alpha, changed\n").unwrap();
    let stats = rsync(&["-a", "--stats", &format!("{}/", src.display()), &push]);
    assert!(
        stats.contains("Number of regular files transferred: 1"),
        "{stats}"
    );
    assert_eq!(
        std::fs::read_to_string(remote.join("a.txt")).unwrap(),
        "alpha, changed\n"
    );

    let back = dir.path().join("back");
    rsync(&["-a", &push, &format!("{}/", back.display())]);
    assert_eq!(
        std::fs::read(back.join("sub/b.bin")).unwrap(),
        pattern(300_000)
    );
    assert_eq!(
        std::fs::read_to_string(back.join("a.txt")).unwrap(),
        "alpha, changed\n"
    );
}

#[test]
fn tunnel_sessions_cli_lists_and_terminates() {
    let s = setup();
    let mut held = s.lodge("exec");
    held.args(["--workflow-id", "w", "--", "sh", "-c", "echo started; cat"]);
    let mut child = held
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert_eq!(first, "started\n", "the session is paired and running");
    let list = s
        .lodge("sessions")
        .args(["list", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&list.stdout).unwrap_or_else(|_| panic!("{}", stderr(&list)));
    let key = v["sessions"][0]["session_key"]
        .as_str()
        .unwrap()
        .to_string();
    let t = s
        .lodge("sessions")
        .args(["terminate", &key, "--reason", "tests"])
        .output()
        .unwrap();
    assert!(t.status.success(), "{}", stderr(&t));
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(255),
        "a session ended by the router is an error for exec"
    );
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("tests"), "{err}");
}
#[test]
fn tunnel_tcp_reset_reaches_the_far_side_as_a_reset_not_an_end() {
    let s = setup();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    let (accepted_tx, accepted) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let _ = accepted_tx.send(());
        let mut buf = [0u8; 1024];
        let seen = loop {
            match c.read(&mut buf) {
                Ok(0) => break "a clean end",
                Ok(_) => continue,
                Err(_) => break "a reset",
            }
        };
        let _ = tx.send(seen);
    });
    let (_pf, local) = s.forward(port, &[]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use tokio::io::AsyncWriteExt;
        let mut c = tokio::net::TcpStream::connect(&local).await.unwrap();
        c.write_all(b"partial upload").await.unwrap();
        // Once the far side is connected (a reset before the session reached the agent would
        // have nothing to carry to it)...
        accepted
            .recv_timeout(Duration::from_secs(30))
            .expect("the agent connected to the server");
        // ...an abortive close: the user's side breaks off in the middle.
        c.set_zero_linger().unwrap();
        drop(c);
    });
    let seen = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the server saw the connection end");
    assert_eq!(seen, "a reset", "a broken upload must not look complete");
}

/// How many times the tests below repeat a run that used to lose its error text now and then.
const RUNS: usize = 50;

#[test]
fn tunnel_rsync_error_text_reaches_the_user_every_time() {
    require("rsync");
    let s = setup();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write_tree(&src);
    let src = format!("{}/", src.display());
    // The documented mistake: a destination whose parent does not exist. rsync's server writes
    // "mkdir ... failed" to its stderr, then its exit code to the protocol stream (stdout).
    let dest = format!("w:{}/missing/deeper/", dir.path().display());
    let shell = format!(
        "{LODGE} rsync-shell --endpoint {} --token-file {}",
        s.node.grpc,
        s.token.display()
    );
    for run in 0..RUNS {
        // Both ways the issue names: `lodge rsync`, and rsync with lodge as its remote shell.
        let out = if run % 2 == 0 {
            s.lodge("rsync").args(["-a", &src, &dest]).output().unwrap()
        } else {
            Command::new("rsync")
                .args(["-e", &shell, "-a", &src, &dest])
                .env_remove("LODGE_TOKEN")
                .output()
                .unwrap()
        };
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(11), "run {run}: {err}");
        assert!(
            err.contains("rsync:") && err.contains("mkdir") && err.contains("failed"),
            "run {run} of {RUNS}: the remote error did not reach the user: {err:?}"
        );
    }
}

#[test]
fn tunnel_exec_stderr_and_exit_code_arrive_every_time() {
    let s = setup();
    for run in 0..RUNS {
        let out = s.exec(&["--", "sh", "-c", "echo oops >&2; exit 3"], b"");
        assert_eq!(out.status.code(), Some(3), "run {run}: {}", stderr(&out));
        assert_eq!(stderr(&out), "oops\n", "run {run} of {RUNS}");
    }
}

#[test]
fn tunnel_exec_without_an_agent_says_it_is_waiting_and_for_how_long() {
    let (node, token, _dir) =
        node_and_token(&[("LODGE_ROUTER__RENDEZVOUS_TIMEOUT_MS", "3000")], "exec");
    let out = Command::new(LODGE)
        .args(["exec", "--endpoint", &node.grpc, "--token-file"])
        .arg(&token)
        .args(["--workflow-id", "nobody", "--", "true"])
        .env_remove("LODGE_TOKEN")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(255), "{err}");
    assert!(
        err.contains("lodge exec: waiting for an agent of workflow nobody (up to 3 s"),
        "{err}"
    );
    assert!(
        err.contains("is `lodge agent --workflow-id nobody` running"),
        "the timeout says what to check: {err}"
    );
}

#[test]
fn tunnel_agent_with_a_refused_token_stops_with_the_reason() {
    // A token without the agent role is refused with PERMISSION_DENIED, a forged one with
    // UNAUTHENTICATED: neither is retried.
    let (node, exec_only, dir) = node_and_token(&[], "exec");
    let forged = dir.path().join("forged");
    std::fs::write(&forged, "not.a.jwt\n").unwrap();
    for (token, reason) in [
        (&exec_only, "PermissionDenied"),
        (&forged, "Unauthenticated"),
    ] {
        let agent = Command::new(LODGE)
            .args(["agent", "--workflow-id", "w", "--endpoint", &node.grpc])
            .arg("--token-file")
            .arg(token)
            .env_remove("LODGE_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (status, err) = finish(agent);
        assert_eq!(status, Some(77), "{reason}: {err}");
        assert!(err.contains(reason), "{err}");
        assert!(err.contains("not retrying"), "{err}");
    }
}

#[test]
fn tunnel_commands_without_a_token_say_how_to_pass_one() {
    let (node, _token, _dir) = node_and_token(&[], "exec");
    let hint = |err: &str| {
        err.contains("authorization: Bearer <JWT>")
            && err.contains("--token-file FILE or LODGE_TOKEN")
    };
    let exec = Command::new(LODGE)
        .args([
            "exec",
            "--endpoint",
            &node.grpc,
            "--workflow-id",
            "w",
            "--",
            "true",
        ])
        .env_remove("LODGE_TOKEN")
        .output()
        .unwrap();
    assert_eq!(exec.status.code(), Some(255));
    assert!(hint(&stderr(&exec)), "{}", stderr(&exec));
    let list = Command::new(LODGE)
        .args(["sessions", "--endpoint", &node.grpc, "list"])
        .env_remove("LODGE_TOKEN")
        .output()
        .unwrap();
    assert!(!list.status.success());
    assert!(hint(&stderr(&list)), "{}", stderr(&list));
    let agent = Command::new(LODGE)
        .args(["agent", "--endpoint", &node.grpc, "--workflow-id", "w"])
        .env_remove("LODGE_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, err) = finish(agent);
    assert_eq!(status, Some(77), "{err}");
    assert!(hint(&err), "{err}");
}

/// Waits (30 s at most) for a child whose stderr is piped; answers its exit code and stderr.
fn finish(mut child: Child) -> (Option<i32>, String) {
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut err = String::new();
        let _ = pipe.read_to_string(&mut err);
        err
    });
    let status = wait_child(child, Duration::from_secs(30));
    (status.and_then(|s| s.code()), reader.join().unwrap())
}
