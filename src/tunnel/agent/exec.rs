//! The agent's side of exec and rsync: runs the command with pipes or under a pseudo-terminal
//! and carries its input, output and exit status over the link.
//!
//! What the frames mean here:
//! - from the user: `data` is the command's input, `resize` the terminal's new size, `eof` the
//!   end of input (the command's stdin is closed; see [`pty`] for why a terminal gets nothing);
//! - to the user: the command's output as `data` (`channel` says stdout or stderr; a terminal has
//!   one stream, sent as stdout), then, once it has exited and all of its output is sent, one
//!   `exit` frame, after which the agent finishes sending.
//!
//! The command never outlives its session: it leads a process group of its own, and if the link
//! fails before the command has finished (the stream ends or errs, or a send fails) the whole
//! group is killed.

mod pipes;
mod pty;
mod rsync;
#[cfg(test)]
mod tests;

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus as ProcessStatus;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lodge_grpc::pb::router::{exit_status, frame, Channel, Exec, ExitStatus, Frame, Rsync};
use lodge_grpc::router_client::control;
use rustix::process::{kill_process_group, Pid, Signal};
use tokio::io::unix::AsyncFd;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::tunnel::{FrameRx, Link};

/// How long the agent waits, after its `exit` frame, for the user to finish too. The router ends
/// the call once both sides have; leaving earlier would cancel the stream under a frame that may
/// still be on its way, and the user would see an error instead of the exit status.
const LINGER: Duration = Duration::from_secs(10);

/// The agent's own credential, if it came from the environment: commands run from a session
/// must not inherit it by accident (a command that logs its environment would leak it). This is
/// hygiene, not a boundary: a command runs as the agent's user and could read the agent's files.
const TOKEN_VAR: &str = "LODGE_TOKEN";

/// Said when the link goes away under a running command.
const LINK_CLOSED: &str = "the link closed before the command finished";

/// Serves an exec session until the command has exited and its output is sent.
pub async fn serve_exec(link: Link, exec: Exec) -> Result<(), String> {
    if exec.command.is_empty() {
        return refuse(
            link,
            exec.tty,
            127,
            "lodge agent: exec: the command is empty",
        )
        .await;
    }
    let started = if exec.tty {
        pty::spawn(&exec)
    } else {
        pipes::spawn(&exec.command)
    };
    match started {
        Ok(started) => drive(link, started).await,
        Err(e) => {
            let (code, why) = cannot_start(&exec.command[0], &e);
            refuse(link, exec.tty, code, &why).await
        }
    }
}

/// Serves an rsync session: runs `rsync --server ...` as the user's rsync asked, with pipes
/// exactly like exec without a terminal. Any other command gets exit status 1 and a message: an
/// rsync session must not be a way to run what only an exec session may.
pub async fn serve_rsync(link: Link, rsync: Rsync) -> Result<(), String> {
    let command = match rsync::server_command(&rsync.command) {
        Ok(c) => c,
        Err(why) => return refuse(link, false, 1, &why).await,
    };
    match pipes::spawn(&command) {
        Ok(started) => drive(link, started).await,
        Err(e) => {
            let (code, why) = cannot_start(&command[0], &e);
            refuse(link, false, code, &why).await
        }
    }
}

/// The exit code and message for a command that could not start, as a shell gives them: 127
/// when it is not found, 126 when it is there but cannot run.
fn cannot_start(program: &str, e: &io::Error) -> (i32, String) {
    if e.kind() == io::ErrorKind::NotFound {
        (127, format!("lodge agent: {program}: command not found"))
    } else {
        (126, format!("lodge agent: {program}: {e}"))
    }
}

/// A started command, as a session drives it.
struct Started {
    child: Child,
    /// Kills the command's process group if the session is dropped midway.
    group: GroupGuard,
    input: Input,
    output: Output,
}

/// Where the user's input goes.
enum Input {
    /// The command's stdin; `None` once closed (by `eof`, or by the command).
    Pipe(Option<ChildStdin>),
    /// The terminal's master side; `open` is false once writing failed (the command is gone).
    Terminal {
        master: Arc<AsyncFd<std::os::fd::OwnedFd>>,
        open: bool,
    },
}

/// Where the command's output comes from.
enum Output {
    Pipes(ChildStdout, ChildStderr),
    Terminal(Arc<AsyncFd<std::os::fd::OwnedFd>>),
}

/// How a link's incoming side ended.
enum LinkEnd {
    /// Cleanly: both sides have finished.
    Closed,
    /// With an error status.
    Failed(String),
}

/// Runs a started command's session to its end: input in, output out, then the exit status.
async fn drive(link: Link, started: Started) -> Result<(), String> {
    let Link { tx, mut rx } = link;
    let Started {
        mut child,
        group,
        input,
        output,
    } = started;
    let mut input_pump = std::pin::pin!(pump_input(&mut rx, input));
    let relayed = {
        let relay = output.relay(&mut child, &tx);
        tokio::select! {
            end = &mut input_pump => Err(match end {
                LinkEnd::Closed => LINK_CLOSED.to_string(),
                LinkEnd::Failed(why) => why,
            }),
            () = tx.closed() => Err(LINK_CLOSED.to_string()),
            result = relay => result,
        }
    };
    let status = match relayed {
        Ok(status) => status,
        Err(why) => {
            group.kill();
            // Reaped here so that nothing of the command is left when the session returns.
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(why);
        }
    };
    group.disarm();
    if tx.send(exit_frame(status)).await.is_err() {
        return Err("the link closed before the exit status was sent".into());
    }
    drop(tx);
    let _ = tokio::time::timeout(LINGER, input_pump).await;
    Ok(())
}

/// Ends a session whose command never ran: a message where the user will see it, then an exit
/// status, as a shell does for a command it cannot run.
async fn refuse(link: Link, tty: bool, code: i32, message: &str) -> Result<(), String> {
    let Link { tx, mut rx } = link;
    // A terminal has one stream, and the user's own terminal is raw: it needs the CR.
    let (channel, line) = if tty {
        (Channel::Stdout, format!("{message}\r\n"))
    } else {
        (Channel::Stderr, format!("{message}\n"))
    };
    let frames = [
        Frame {
            data: Bytes::from(line),
            channel: channel as i32,
            ..Default::default()
        },
        control(frame::Control::Exit(ExitStatus {
            status: Some(exit_status::Status::Code(code)),
        })),
    ];
    for f in frames {
        if tx.send(f).await.is_err() {
            return Err("the link closed before the exit status was sent".into());
        }
    }
    drop(tx);
    let no_input = Input::Pipe(None);
    let _ = tokio::time::timeout(LINGER, pump_input(&mut rx, no_input)).await;
    Ok(())
}

/// Carries the user's frames to the command's input until the link's incoming side ends.
async fn pump_input(rx: &mut FrameRx, mut input: Input) -> LinkEnd {
    loop {
        let frame = match rx.next().await {
            None => return LinkEnd::Closed,
            Some(Err(status)) => return LinkEnd::Failed(status.message().to_string()),
            Some(Ok(f)) => f,
        };
        if !frame.data.is_empty() {
            input.write(&frame.data).await;
        }
        match frame.control {
            Some(frame::Control::Resize(size)) => input.resize(size),
            Some(frame::Control::Eof(_)) => input.close(),
            _ => {}
        }
    }
}

impl Input {
    /// Writes the user's bytes. A command that stopped reading (it closed its stdin, or exited)
    /// just stops getting them, as with a local pipe; it is not a session error.
    async fn write(&mut self, bytes: &[u8]) {
        match self {
            Input::Pipe(stdin) => {
                if let Some(pipe) = stdin {
                    if pipe.write_all(bytes).await.is_err() {
                        *stdin = None;
                    }
                }
            }
            Input::Terminal { master, open } => {
                if *open && pty::write_all(master, bytes).await.is_err() {
                    *open = false;
                }
            }
        }
    }

    fn resize(&mut self, size: lodge_grpc::pb::router::TerminalSize) {
        if let Input::Terminal { master, .. } = self {
            // A failed resize (the terminal is gone) leaves nothing to do.
            let _ = pty::resize(master, Some(size));
        }
    }

    fn close(&mut self) {
        if let Input::Pipe(stdin) = self {
            *stdin = None;
        }
    }
}

impl Output {
    /// Sends the command's output until it has all been sent and the command has exited.
    async fn relay(
        self,
        child: &mut Child,
        tx: &mpsc::Sender<Frame>,
    ) -> Result<ProcessStatus, String> {
        match self {
            Output::Pipes(stdout, stderr) => pipes::relay(child, stdout, stderr, tx).await,
            Output::Terminal(master) => pty::relay(child, &master, tx).await,
        }
    }
}

/// The `exit` frame for a finished command.
fn exit_frame(status: ProcessStatus) -> Frame {
    let status = match (status.code(), status.signal()) {
        (Some(code), _) => exit_status::Status::Code(code),
        (None, Some(signal)) => exit_status::Status::Signal(signal),
        // Neither exited nor signalled cannot happen for a reaped child; say "failed".
        (None, None) => exit_status::Status::Code(1),
    };
    control(frame::Control::Exit(ExitStatus {
        status: Some(status),
    }))
}

/// The process group a command leads. Dropped while armed (the session future was cancelled,
/// or failed), it kills the whole group, so that nothing the command started is left behind.
struct GroupGuard(Option<Pid>);

impl GroupGuard {
    fn of(child: &Child) -> Self {
        GroupGuard(child.id().and_then(|id| Pid::from_raw(id as i32)))
    }

    fn kill(mut self) {
        self.kill_now();
    }

    /// The command finished on its own: what it left running is no longer the session's.
    fn disarm(mut self) {
        self.0 = None;
    }

    fn kill_now(&mut self) {
        if let Some(pgid) = self.0.take() {
            // ESRCH (the group is already gone) is what we wanted anyway.
            let _ = kill_process_group(pgid, Signal::KILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill_now();
    }
}
