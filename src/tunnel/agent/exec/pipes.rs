//! A command with pipes: stdin, stdout and stderr kept apart, as exec without a terminal and
//! rsync's server need them.

use std::io;
use std::process::{ExitStatus, Stdio};

use bytes::{BufMut, BytesMut};
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
    let ((), (), status) = tokio::try_join!(
        forward(stdout, Channel::Stdout, tx),
        forward(stderr, Channel::Stderr, tx),
        wait
    )?;
    Ok(status)
}

/// Sends one output stream as `data` frames of at most `MAX_CHUNK` bytes, until it ends.
async fn forward(
    mut from: impl AsyncRead + Unpin,
    channel: Channel,
    tx: &mpsc::Sender<Frame>,
) -> Result<(), String> {
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(MAX_CHUNK);
        match from.read_buf(&mut (&mut buf).limit(MAX_CHUNK)).await {
            Ok(0) => return Ok(()),
            Ok(_) => {
                let frame = Frame {
                    data: buf.split().freeze(),
                    channel: channel as i32,
                    ..Default::default()
                };
                tx.send(frame).await.map_err(|_| LINK_CLOSED.to_string())?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A pipe that cannot be read has nothing more to give; the exit status still comes.
            Err(_) => return Ok(()),
        }
    }
}
