//! A command with pipes: stdin, stdout and stderr kept apart, as exec without a terminal and
//! rsync's server need them.

use std::io;
use std::process::{ExitStatus, Stdio};

use bytes::{BufMut, Bytes, BytesMut};
use lodge_grpc::pb::router::{Channel, Frame};
use lodge_grpc::router_client::MAX_CHUNK;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio::sync::mpsc;

use super::{GroupGuard, Input, Output, Started, LINK_CLOSED, TOKEN_VAR};

/// Starts `command` (program and arguments) with piped stdio, leading a process group of its own
/// so that the session can kill everything it starts.
pub(super) fn spawn(command: &[String]) -> io::Result<Started> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
    let mut child = Command::new(program)
        .args(args)
        .env_remove(TOKEN_VAR)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    let group = GroupGuard::of(&child);
    let missing = || io::Error::other("the child's pipes were not set up");
    let stdin = child.stdin.take().ok_or_else(missing)?;
    let stdout = child.stdout.take().ok_or_else(missing)?;
    let stderr = child.stderr.take().ok_or_else(missing)?;
    Ok(Started {
        child,
        group,
        input: Input::Pipe(Some(stdin)),
        output: Output::Pipes(stdout, stderr),
    })
}

/// Sends stdout and stderr until both have ended, and waits for the command: the exit status
/// comes after the last byte of output.
pub(super) async fn relay(
    child: &mut Child,
    stdout: ChildStdout,
    stderr: ChildStderr,
    tx: &mpsc::Sender<Frame>,
) -> Result<ExitStatus, String> {
    let wait = async {
        child
            .wait()
            .await
            .map_err(|e| format!("waiting for the command: {e}"))
    };
    let ((), status) = tokio::try_join!(forward(stdout, stderr, tx), wait)?;
    Ok(status)
}

/// Most stderr read ahead of one piece of stdout: a pipe holds at most 1 MiB unless raised, and
/// a command writing stderr without pause must not hold its stdout back for ever.
const STDERR_AHEAD: usize = 1024 * 1024;

/// Sends stdout and stderr as `data` frames of at most `MAX_CHUNK` bytes, until both have ended.
///
/// The two pipes are read apart, so which of two writes was first is lost on the way, and the
/// order matters: rsync's server writes its error to stderr and then the code it exits with to
/// stdout, and the local rsync, once it reads that code, ends the remote shell (us, on the user's
/// side) at once; an error sent after it is never shown (issue 14). So stderr goes first: before a
/// piece of stdout is sent, whatever stderr holds at that moment is read and sent. A write to
/// stderr that ended before a write to stdout began is in the pipe by the time the stdout bytes
/// are read, so it always reaches the user first. (The other way round is not kept: stdout
/// written before stderr may arrive after it, as with ssh.)
async fn forward(
    stdout: ChildStdout,
    stderr: ChildStderr,
    tx: &mpsc::Sender<Frame>,
) -> Result<(), String> {
    let (mut stdout, mut stderr) = (Some(stdout), Some(stderr));
    let (mut out_buf, mut err_buf) = (BytesMut::new(), BytesMut::new());
    while stdout.is_some() || stderr.is_some() {
        // Both reads are cancel-safe: the one that loses the race has taken nothing.
        tokio::select! {
            biased;
            chunk = read_chunk(&mut stderr, &mut err_buf) => match chunk {
                Some(bytes) => send(tx, Channel::Stderr, bytes).await?,
                None => stderr = None,
            },
            chunk = read_chunk(&mut stdout, &mut out_buf) => match chunk {
                Some(bytes) => {
                    if let Some(pipe) = &stderr {
                        if drain(pipe, &mut err_buf, tx).await? {
                            stderr = None;
                        }
                    }
                    send(tx, Channel::Stdout, bytes).await?;
                }
                None => stdout = None,
            },
        }
    }
    Ok(())
}

/// The next chunk of a pipe; `None` once it has ended (or cannot be read: it has nothing more to
/// give, and the exit status still comes). Waits for ever on a pipe already ended.
async fn read_chunk(
    pipe: &mut Option<impl AsyncRead + Unpin>,
    buf: &mut BytesMut,
) -> Option<Bytes> {
    let Some(pipe) = pipe else {
        return std::future::pending().await;
    };
    loop {
        buf.reserve(MAX_CHUNK);
        match pipe.read_buf(&mut (&mut *buf).limit(MAX_CHUNK)).await {
            Ok(0) => return None,
            Ok(_) => return Some(buf.split().freeze()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// Sends what stderr holds right now, without waiting for more; answers whether it has ended.
/// The read goes to the descriptor itself: tokio's own read would wait for the reactor to have
/// seen the pipe turn readable, and the point is to take what is already there.
async fn drain(
    stderr: &ChildStderr,
    buf: &mut BytesMut,
    tx: &mpsc::Sender<Frame>,
) -> Result<bool, String> {
    let mut taken = 0;
    while taken < STDERR_AHEAD {
        buf.reserve(MAX_CHUNK);
        let spare = &mut buf.spare_capacity_mut()[..MAX_CHUNK];
        // The pipe is non-blocking (tokio made it so): an empty one answers EAGAIN.
        match rustix::io::read(stderr, spare) {
            Ok(([], _)) => return Ok(true),
            Ok((filled, _)) => {
                let n = filled.len();
                // SAFETY: `read` initialised the first `n` bytes of the spare capacity.
                unsafe { buf.set_len(buf.len() + n) };
                taken += n;
                send(tx, Channel::Stderr, buf.split().freeze()).await?;
            }
            Err(rustix::io::Errno::INTR) => {}
            // EAGAIN: nothing more there now. Another error: the select loop's read sees it.
            Err(_) => return Ok(false),
        }
    }
    Ok(false)
}

async fn send(tx: &mpsc::Sender<Frame>, channel: Channel, data: Bytes) -> Result<(), String> {
    let frame = Frame {
        data,
        channel: channel as i32,
        ..Default::default()
    };
    tx.send(frame).await.map_err(|_| LINK_CLOSED.to_string())
}
