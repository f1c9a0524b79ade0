//! Exec and rsync, the agent's side against the user's, over links joined in memory.

use std::os::fd::OwnedFd;
use std::time::Duration;

use bytes::Bytes;
use lodge_grpc::pb::router::{
    exit_status, frame, Channel, Exec, ExitStatus, Frame, Rsync, TerminalSize,
};
use lodge_grpc::router_client::{control, data};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::Status;

use super::rsync::shell_unescape;
use super::{serve_exec, serve_rsync};
use crate::tunnel::exec::session::{self, Outcome, UserIo};
use crate::tunnel::{link_pair, Link};

/// Bound on every wait in these tests: a failure shows as a timeout, not a hung test.
const LIMIT: Duration = Duration::from_secs(5);

fn words(w: &[&str]) -> Vec<String> {
    w.iter().map(|s| s.to_string()).collect()
}

fn pipes(command: &[&str]) -> Exec {
    Exec {
        command: words(command),
        ..Default::default()
    }
}

fn tty(command: &[&str], rows: u32, cols: u32) -> Exec {
    Exec {
        command: words(command),
        tty: true,
        size: Some(TerminalSize { rows, cols }),
        term: String::new(),
    }
}

/// Runs `exec` on the agent's side and the user's session on the other, with `stdin` as the
/// user's whole input; answers the outcome, stdout and stderr.
async fn exec_session(exec: Exec, stdin: &[u8]) -> (Outcome, Vec<u8>, Vec<u8>) {
    let (user, agent) = link_pair();
    let server = tokio::spawn(serve_exec(agent, exec));
    let (input_tx, input) = mpsc::channel(1);
    input_tx.send(Bytes::copy_from_slice(stdin)).await.unwrap();
    drop(input_tx);
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let io = UserIo {
        input,
        resizes: None,
        stdout: &mut stdout,
        stderr: &mut stderr,
    };
    let outcome = tokio::time::timeout(LIMIT, session::run(user, io))
        .await
        .expect("the session did not end");
    let served = tokio::time::timeout(LIMIT, server).await.unwrap().unwrap();
    assert_eq!(served, Ok(()));
    (outcome, stdout, stderr)
}

/// Frames from the agent until its exit frame: the output and the exit status.
async fn until_exit(rx: &mut crate::tunnel::FrameRx) -> (Vec<u8>, ExitStatus) {
    let mut out = Vec::new();
    loop {
        let f = tokio::time::timeout(LIMIT, rx.next())
            .await
            .expect("no exit frame")
            .expect("the link ended before the exit frame")
            .expect("the link failed");
        out.extend_from_slice(&f.data);
        if let Some(frame::Control::Exit(status)) = f.control {
            return (out, status);
        }
    }
}

/// Output from the agent until it contains `wanted`.
async fn until_output(rx: &mut crate::tunnel::FrameRx, wanted: &str) -> String {
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains(wanted) {
        let f = tokio::time::timeout(LIMIT, rx.next())
            .await
            .unwrap_or_else(|_| panic!("no {wanted:?} in {:?}", String::from_utf8_lossy(&out)))
            .expect("the link ended")
            .expect("the link failed");
        out.extend_from_slice(&f.data);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first line of output, as a pid.
async fn first_pid(rx: &mut crate::tunnel::FrameRx) -> rustix::process::Pid {
    let out = until_output(rx, "\n").await;
    let pid: i32 = out.lines().next().unwrap().trim().parse().unwrap();
    rustix::process::Pid::from_raw(pid).unwrap()
}

/// Waits until process `pid` has ended (a pidfd turns readable then), bounded by `LIMIT`.
async fn ended(pidfd: OwnedFd) {
    // SAFETY: an OwnedFd is open for as long as it lives and always answers the same fd.
    let fd = unsafe { AsyncFd::register(pidfd) }.unwrap();
    tokio::time::timeout(LIMIT, fd.readable())
        .await
        .expect("the process is still running")
        .unwrap()
        .retain_ready();
}

fn code(c: i32) -> ExitStatus {
    ExitStatus {
        status: Some(exit_status::Status::Code(c)),
    }
}

#[tokio::test]
async fn exec_with_pipes_relays_stdin_stdout_stderr_and_the_exit_code() {
    let exec = pipes(&["sh", "-c", "cat; echo err >&2; exit 3"]);
    let (outcome, stdout, stderr) = exec_session(exec, b"hello\nworld\n").await;
    assert_eq!(outcome, Outcome::Exited(3));
    assert_eq!(stdout, b"hello\nworld\n");
    assert_eq!(stderr, b"err\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stderr_written_before_stdout_is_sent_before_it() {
    // rsync's server writes its error to stderr, then its exit code to stdout; the user must get
    // them in that order (issue 14). The two pipes are read apart, so this used to depend on
    // which one the agent happened to poll first.
    for run in 0..50 {
        let (user, agent) = link_pair();
        let exec = pipes(&["sh", "-c", "echo oops >&2; echo code; exit 11"]);
        let server = tokio::spawn(serve_exec(agent, exec));
        let Link { tx, mut rx } = user;
        let mut order = Vec::new();
        loop {
            let f = tokio::time::timeout(LIMIT, rx.next())
                .await
                .expect("no exit frame")
                .expect("the link ended")
                .expect("the link failed");
            if !f.data.is_empty() {
                order.push((f.channel(), f.data.clone()));
            }
            if let Some(frame::Control::Exit(status)) = f.control {
                assert_eq!(status, code(11));
                break;
            }
        }
        let expected = [
            (Channel::Stderr, Bytes::from_static(b"oops\n")),
            (Channel::Stdout, Bytes::from_static(b"code\n")),
        ];
        assert_eq!(order, expected, "run {run}");
        drop(tx);
        assert_eq!(
            tokio::time::timeout(LIMIT, server).await.unwrap().unwrap(),
            Ok(())
        );
    }
}

#[tokio::test]
async fn exec_sends_large_output_in_bounded_frames() {
    let (user, agent) = link_pair();
    let exec = pipes(&["head", "-c", "1000000", "/dev/zero"]);
    let server = tokio::spawn(serve_exec(agent, exec));
    let Link { tx, mut rx } = user;
    drop(tx);
    let mut total = 0;
    loop {
        let f = tokio::time::timeout(LIMIT, rx.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(f.data.len() <= lodge_grpc::router_client::MAX_CHUNK);
        total += f.data.len();
        if let Some(frame::Control::Exit(status)) = f.control {
            assert_eq!(status, code(0));
            break;
        }
    }
    assert_eq!(total, 1_000_000);
    assert_eq!(
        tokio::time::timeout(LIMIT, server).await.unwrap().unwrap(),
        Ok(())
    );
}

#[tokio::test]
async fn a_missing_command_exits_127_with_a_message() {
    let exec = pipes(&["lodge-test-no-such-command"]);
    let (outcome, stdout, stderr) = exec_session(exec, b"").await;
    assert_eq!(outcome, Outcome::Exited(127));
    assert!(stdout.is_empty());
    let stderr = String::from_utf8(stderr).unwrap();
    assert!(
        stderr.contains("lodge-test-no-such-command: command not found"),
        "{stderr}"
    );
    let (outcome, _, stderr) = exec_session(pipes(&[]), b"").await;
    assert_eq!(outcome, Outcome::Exited(127));
    assert_eq!(stderr, b"lodge agent: exec: the command is empty\n");
}

#[tokio::test]
async fn a_command_killed_by_a_signal_reports_the_signal() {
    let (user, agent) = link_pair();
    let server = tokio::spawn(serve_exec(agent, pipes(&["sh", "-c", "kill -TERM $$"])));
    let Link { tx, mut rx } = user;
    let (_, status) = until_exit(&mut rx).await;
    assert_eq!(
        status,
        ExitStatus {
            status: Some(exit_status::Status::Signal(15))
        }
    );
    drop(tx);
    assert_eq!(
        tokio::time::timeout(LIMIT, server).await.unwrap().unwrap(),
        Ok(())
    );
    // The user's side maps it as a shell does.
    let (outcome, _, _) = exec_session(pipes(&["sh", "-c", "kill -TERM $$"]), b"").await;
    assert_eq!(outcome, Outcome::Exited(128 + 15));
}

#[tokio::test]
async fn exec_with_a_tty_sets_the_size_and_applies_resizes() {
    let (user, agent) = link_pair();
    let script = "echo TERM=$TERM; stty size; read line; stty size";
    let server = tokio::spawn(serve_exec(agent, tty(&["sh", "-c", script], 24, 80)));
    let Link { tx, mut rx } = user;
    // The second size is asked for only once the first has been seen: no race with the resize.
    let first = until_output(&mut rx, "24 80\r\n").await;
    assert!(first.contains("TERM=xterm\r\n"), "{first:?}");
    let resize = TerminalSize {
        rows: 30,
        cols: 100,
    };
    tx.send(control(frame::Control::Resize(resize)))
        .await
        .unwrap();
    tx.send(data(Bytes::from_static(b"go\n"))).await.unwrap();
    let (rest, status) = until_exit(&mut rx).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("30 100\r\n"), "{rest:?}");
    assert_eq!(status, code(0));
    drop(tx);
    assert_eq!(
        tokio::time::timeout(LIMIT, server).await.unwrap().unwrap(),
        Ok(())
    );
}

#[tokio::test]
async fn exec_with_a_tty_merges_output_and_reports_the_exit_code() {
    let (user, agent) = link_pair();
    let exec = tty(&["sh", "-c", "echo out; echo err >&2; exit 7"], 24, 80);
    let server = tokio::spawn(serve_exec(agent, exec));
    let Link { tx, mut rx } = user;
    let (out, status) = until_exit(&mut rx).await;
    assert_eq!(String::from_utf8_lossy(&out), "out\r\nerr\r\n");
    assert_eq!(status, code(7));
    drop(tx);
    assert_eq!(
        tokio::time::timeout(LIMIT, server).await.unwrap().unwrap(),
        Ok(())
    );
}

#[tokio::test]
async fn the_command_is_killed_when_the_link_fails() {
    // A link whose incoming side the test controls, to end it with an error status.
    let (to_agent, from_user) = mpsc::channel::<Result<Frame, Status>>(4);
    let (agent_tx, agent_out) = mpsc::channel(4);
    let link = Link {
        tx: agent_tx,
        rx: Box::pin(tokio_stream::wrappers::ReceiverStream::new(from_user)),
    };
    // The background sleep is the shell's child, not the agent's: only killing the group
    // reaches it.
    let script = "sleep 30 & echo $!; wait";
    let server = tokio::spawn(serve_exec(link, pipes(&["sh", "-c", script])));
    let mut rx: crate::tunnel::FrameRx =
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(agent_out).map(Ok));
    let sleeper = first_pid(&mut rx).await;
    let pidfd = rustix::process::pidfd_open(sleeper, rustix::process::PidfdFlags::empty()).unwrap();
    to_agent
        .send(Err(Status::unavailable("the peer's connection broke")))
        .await
        .unwrap();
    let served = tokio::time::timeout(LIMIT, server).await.unwrap().unwrap();
    assert_eq!(served, Err("the peer's connection broke".to_string()));
    ended(pidfd).await;
}

#[tokio::test]
async fn the_command_is_killed_when_sending_its_output_fails() {
    let (user, agent) = link_pair();
    let server = tokio::spawn(serve_exec(agent, pipes(&["sh", "-c", "echo $$; exec yes"])));
    let Link { tx, mut rx } = user;
    let pid = first_pid(&mut rx).await;
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).unwrap();
    // The user's side vanishes: the agent's next send fails.
    drop((tx, rx));
    let served = tokio::time::timeout(LIMIT, server).await.unwrap().unwrap();
    assert!(served.is_err(), "{served:?}");
    ended(pidfd).await;
}

#[tokio::test]
async fn an_rsync_session_refuses_other_commands() {
    for command in [
        words(&["sh", "-c", "echo hi"]),
        words(&["rsync", "--version"]),
        words(&["/usr/bin/rsync", "--server", "."]),
        words(&["rsync", "--server", "--daemon", "."]),
        words(&["rsync", "--server", "\\-\\-daemon", "."]),
        Vec::new(),
    ] {
        let (user, agent) = link_pair();
        let server = tokio::spawn(serve_rsync(
            agent,
            Rsync {
                command: command.clone(),
            },
        ));
        let Link { tx, mut rx } = user;
        let (out, status) = until_exit(&mut rx).await;
        assert_eq!(status, code(1), "{command:?}");
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("lodge agent: an rsync session "), "{out}");
        drop(tx);
        assert_eq!(
            tokio::time::timeout(LIMIT, server).await.unwrap().unwrap(),
            Ok(())
        );
    }
}

#[test]
fn rsync_arguments_lose_the_backslashes_a_shell_would_remove() {
    assert_eq!(shell_unescape("dst\\ dir/\\$x*.txt"), "dst dir/$x*.txt");
    assert_eq!(shell_unescape("a\\\\b"), "a\\b");
    assert_eq!(shell_unescape("line\\\nnext"), "linenext");
    assert_eq!(shell_unescape("end\\"), "end\\");
    assert_eq!(
        shell_unescape("-vlogDtpre.iLsfxCIvu"),
        "-vlogDtpre.iLsfxCIvu"
    );
}

mod rsync_end_to_end;
