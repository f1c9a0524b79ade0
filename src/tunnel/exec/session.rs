//! The user's end of a command session, shared by `lodge exec` and rsync's remote shell: local
//! input goes out as `data` frames (its end half-closes the tunnel), the command's output comes
//! back to local stdout and stderr, and the session ends with the command's exit status.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use bytes::Bytes;
use lodge_grpc::pb::router::{exit_status, frame, Channel, ExitStatus, Frame, TerminalSize};
use lodge_grpc::router_client::{control, data, MAX_CHUNK};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::tunnel::{FrameRx, Link};

/// How long, after the exit status, to wait for the router to end the call. Leaving at once
/// would break the connection under our own half-close, which the router would count as a
/// failure; normally the end comes right away.
const LINGER: Duration = Duration::from_secs(5);

/// The local ends of a session.
pub(crate) struct UserIo<O, E> {
    /// Input chunks (at most `MAX_CHUNK` each); its end is the end of input.
    pub input: mpsc::Receiver<Bytes>,
    /// Terminal sizes to announce (with a terminal only).
    pub resizes: Option<mpsc::Receiver<TerminalSize>>,
    /// Where the command's stdout goes.
    pub stdout: O,
    /// Where the command's stderr goes.
    pub stderr: E,
}

/// How a session ended.
#[derive(Debug, PartialEq)]
pub(crate) enum Outcome {
    /// The command finished; the code to exit with (a signal N is 128+N, as shells give it).
    Exited(i32),
    /// The session failed; one line for people.
    Failed(String),
}

impl Outcome {
    /// The process exit code, printing a failure as `who: message` (255 then, as ssh does).
    pub(crate) fn finish(self, who: &str) -> i32 {
        match self {
            Outcome::Exited(code) => code,
            Outcome::Failed(why) => {
                eprintln!("{who}: {why}");
                255
            }
        }
    }
}

/// Runs a session over `link` until the command's exit status has arrived, or the session fails.
pub(crate) async fn run<O, E>(link: Link, io: UserIo<O, E>) -> Outcome
where
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    let Link { tx, mut rx } = link;
    let UserIo {
        input,
        resizes,
        mut stdout,
        mut stderr,
    } = io;
    let outcome = {
        // Sending and receiving run side by side: waiting to send input must never stop output
        // from being read, or a command echoing its input would deadlock with us.
        let mut sending = std::pin::pin!(send_input(tx, input, resizes));
        let mut receiving = std::pin::pin!(receive(&mut rx, &mut stdout, &mut stderr));
        let mut input_done = false;
        loop {
            tokio::select! {
                outcome = &mut receiving => break outcome,
                () = &mut sending, if !input_done => input_done = true,
            }
        }
        // Dropping `sending` here half-closes our side if input had not ended yet.
    };
    if matches!(outcome, Outcome::Exited(_)) {
        // The agent sends nothing after the exit status; should output still come, it is
        // written, not dropped.
        let rest = async {
            while let Some(Ok(frame)) = rx.next().await {
                if write_frame(&frame, &mut stdout, &mut stderr).await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, rest).await;
    }
    outcome
}

/// Sends input chunks and terminal sizes until input ends; then drops `tx`, which tells the
/// agent (`eof`) that no more input comes.
async fn send_input(
    tx: mpsc::Sender<Frame>,
    mut input: mpsc::Receiver<Bytes>,
    mut resizes: Option<mpsc::Receiver<TerminalSize>>,
) {
    loop {
        tokio::select! {
            chunk = input.recv() => {
                let Some(chunk) = chunk else { return };
                // A failed send means the session is over; `receive` learns why.
                if tx.send(data(chunk)).await.is_err() {
                    return;
                }
            }
            size = next_size(&mut resizes) => match size {
                Some(size) => {
                    if tx.send(control(frame::Control::Resize(size))).await.is_err() {
                        return;
                    }
                }
                None => resizes = None,
            },
        }
    }
}

async fn next_size(resizes: &mut Option<mpsc::Receiver<TerminalSize>>) -> Option<TerminalSize> {
    match resizes {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// Writes the command's output out until its exit status arrives.
async fn receive<O, E>(rx: &mut FrameRx, stdout: &mut O, stderr: &mut E) -> Outcome
where
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    loop {
        let frame = match rx.next().await {
            None => {
                return Outcome::Failed(
                    "the session ended without the command's exit status".into(),
                )
            }
            Some(Err(status)) if status.message().is_empty() => {
                return Outcome::Failed(format!("the session failed: {:?}", status.code()))
            }
            Some(Err(status)) => return Outcome::Failed(status.message().to_string()),
            Some(Ok(f)) => f,
        };
        if let Err((name, e)) = write_frame(&frame, stdout, stderr).await {
            return Outcome::Failed(format!("writing {name}: {e}"));
        }
        if let Some(frame::Control::Exit(status)) = frame.control {
            return exit_outcome(status);
        }
    }
}

/// Writes a frame's output where its channel says, flushed before the next frame is looked at:
/// stderr sent ahead of stdout (see the agent's pipes) is on the terminal before the stdout
/// reaches the reader, which may be a local rsync that ends us as soon as it has read the exit
/// code. Answers which stream failed.
async fn write_frame<O, E>(
    frame: &Frame,
    stdout: &mut O,
    stderr: &mut E,
) -> Result<(), (&'static str, std::io::Error)>
where
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    if frame.data.is_empty() {
        return Ok(());
    }
    if frame.channel() == Channel::Stderr {
        write_out(stderr, &frame.data)
            .await
            .map_err(|e| ("stderr", e))
    } else {
        write_out(stdout, &frame.data)
            .await
            .map_err(|e| ("stdout", e))
    }
}

/// The local standard streams as a session's user side, once its tunnel is open.
pub(crate) type StdIo = UserIo<tokio::io::Stdout, tokio::io::Stderr>;

/// Opens the user tunnel for `init` and takes over the standard streams: what `lodge exec` and
/// `lodge rsync-shell` share. The error is one line for people.
pub(crate) async fn open(
    conn: &crate::tunnel::TunnelConn,
    init: lodge_grpc::pb::router::UserInit,
    resizes: Option<mpsc::Receiver<TerminalSize>>,
    who: &str,
) -> Result<(crate::tunnel::Link, StdIo), String> {
    let client = conn.connect().await?;
    let tunnel = crate::tunnel::open_user(&client, init, who).await?;
    blocking_stdio();
    let io = UserIo {
        input: stdin_chunks()?,
        resizes,
        stdout: tokio::io::stdout(),
        stderr: tokio::io::stderr(),
    };
    Ok((crate::tunnel::Link::from(tunnel), io))
}

/// Makes stdin and stdout blocking. A parent may hand over non-blocking pipes (rsync does, for the
/// remote shell it runs); the standard streams are written with blocking calls, which would then
/// fail with EAGAIN whenever the pipe is full.
pub(crate) fn blocking_stdio() {
    use std::os::fd::AsFd;
    let set = |fd: std::os::fd::BorrowedFd<'_>| {
        if let Ok(flags) = rustix::fs::fcntl_getfl(fd) {
            if flags.contains(rustix::fs::OFlags::NONBLOCK) {
                let _ = rustix::fs::fcntl_setfl(fd, flags - rustix::fs::OFlags::NONBLOCK);
            }
        }
    };
    set(std::io::stdin().as_fd());
    set(std::io::stdout().as_fd());
}

async fn write_out<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// The local exit code for the command's exit status.
fn exit_outcome(status: ExitStatus) -> Outcome {
    match status.status {
        Some(exit_status::Status::Code(code)) => Outcome::Exited(code),
        Some(exit_status::Status::Signal(signal)) => Outcome::Exited(128 + signal),
        None => Outcome::Failed("the agent sent an exit frame without a status".into()),
    }
}

/// The exit code for a local child's status, by the same rule (a signal N is 128+N).
pub(crate) fn local_exit_code(status: std::process::ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// Local stdin in chunks of at most `MAX_CHUNK`, read on a thread of its own. Not tokio's stdin:
/// a read on a terminal cannot be cancelled, and tokio's runtime waits for its blocking reads on
/// shutdown, so `lodge exec` would hang after the command exited until a key was pressed. This
/// thread just ends with the process.
pub(crate) fn stdin_chunks() -> Result<mpsc::Receiver<Bytes>, String> {
    let (tx, rx) = mpsc::channel(2);
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; MAX_CHUNK];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx.blocking_send(Bytes::copy_from_slice(&buf[..n])).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    // Input that cannot be read has ended as far as the command is concerned.
                    Err(_) => break,
                }
            }
        })
        .map_err(|e| format!("starting the stdin reader: {e}"))?;
    Ok(rx)
}
