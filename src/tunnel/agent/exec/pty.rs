//! A command under a pseudo-terminal, for exec with `tty`.
//!
//! The master side is non-blocking and driven through tokio's [`AsyncFd`], so a session costs no
//! thread of its own and every wait on the terminal can be cancelled (a blocking reader thread
//! could not be stopped while it sits in `read`).
//!
//! The user's `eof` is not turned into the terminal's EOF character. `lodge exec --tty` needs a
//! local terminal and puts it in raw mode, so a ^D the user types already arrives as a byte and
//! the remote line discipline treats it as the terminal would; an `eof` frame then means the
//! user's side stopped sending (its terminal went away), not "end of input". A ^D made up at
//! that point would be a keystroke the user never typed: an EOF only at the start of a line in
//! canonical mode, and in raw-mode programs (editors, shells' line editors) a command of its own.
//! So the command keeps running until it exits or the link fails, which kills it.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lodge_grpc::pb::router::{Channel, Exec, Frame, TerminalSize};
use lodge_grpc::router_client::MAX_CHUNK;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::pty::OpenptFlags;
use rustix::termios::Winsize;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::{GroupGuard, Input, Output, Started, LINK_CLOSED, TOKEN_VAR};

/// The size a terminal gets when the user sent none (or a zero one).
const DEFAULT_SIZE: Winsize = Winsize {
    ws_row: 24,
    ws_col: 80,
    ws_xpixel: 0,
    ws_ypixel: 0,
};

/// After the command has exited, how long reading the terminal may find nothing before the
/// session ends. The command's own output is read until the terminal reports its end (EIO, once
/// no process holds it); this bound is for a background process that keeps the terminal open,
/// which would otherwise hold the session forever.
const DRAIN_IDLE: Duration = Duration::from_millis(250);

/// Starts `exec.command` under a new pseudo-terminal of `exec.size`, as the leader of a session
/// whose controlling terminal it is, with TERM from `exec.term` (xterm if empty).
pub(super) fn spawn(exec: &Exec) -> io::Result<Started> {
    let (program, args) = exec
        .command
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
    let (master, terminal) = open().map_err(|e| io::Error::other(format!("a terminal: {e}")))?;
    resize_fd(master.as_fd(), exec.size)?;
    let term = if exec.term.is_empty() {
        "xterm"
    } else {
        &exec.term
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .env_remove(TOKEN_VAR)
        .env("TERM", term)
        .stdin(Stdio::from(terminal.try_clone()?))
        .stdout(Stdio::from(terminal.try_clone()?))
        .stderr(Stdio::from(terminal))
        .kill_on_drop(true);
    // SAFETY: runs in the child between fork and exec, where only async-signal-safe calls are
    // allowed; setsid and ioctl are plain system calls, and fd 0 is the terminal by then.
    unsafe {
        command.pre_exec(|| {
            rustix::process::setsid()?;
            rustix::process::ioctl_tiocsctty(BorrowedFd::borrow_raw(0))?;
            Ok(())
        });
    }
    let child = command.spawn()?;
    // Our copies of the terminal's side must go: reading the master ends (EIO) only once no
    // process has the terminal open.
    drop(command);
    let group = GroupGuard::of(&child);
    rustix::io::ioctl_fionbio(&master, true)?;
    // SAFETY: an OwnedFd is open for as long as it lives and always answers the same fd.
    let master = unsafe {
        AsyncFd::register_with_interest(master, Interest::READABLE | Interest::WRITABLE)
    }?;
    let master = Arc::new(master);
    Ok(Started {
        child,
        group,
        input: Input::Terminal {
            master: master.clone(),
            open: true,
        },
        output: Output::Terminal(master),
    })
}

/// A new pseudo-terminal: its master side and the terminal the command gets.
fn open() -> io::Result<(OwnedFd, OwnedFd)> {
    let master =
        rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let name = rustix::pty::ptsname(&master, Vec::new())?;
    let terminal = rustix::fs::open(
        name.as_c_str(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok((master, terminal))
}

/// Sets the terminal's size; the kernel tells the foreground process (SIGWINCH).
pub(super) fn resize(master: &AsyncFd<OwnedFd>, size: Option<TerminalSize>) -> io::Result<()> {
    resize_fd(master.get_ref().as_fd(), size)
}

fn resize_fd(master: BorrowedFd<'_>, size: Option<TerminalSize>) -> io::Result<()> {
    let clamp = |n: u32| u16::try_from(n).unwrap_or(u16::MAX);
    let size = match size {
        Some(s) if s.rows > 0 && s.cols > 0 => Winsize {
            ws_row: clamp(s.rows),
            ws_col: clamp(s.cols),
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
        _ => DEFAULT_SIZE,
    };
    Ok(rustix::termios::tcsetwinsize(master, size)?)
}

/// Writes all of `bytes` to the terminal, waiting while its input queue is full.
pub(super) async fn write_all(master: &AsyncFd<OwnedFd>, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        let n = master
            .async_io(Interest::WRITABLE, |fd| Ok(rustix::io::write(fd, bytes)?))
            .await?;
        bytes = &bytes[n..];
    }
    Ok(())
}

/// Sends the terminal's output until the command has exited and the terminal is drained.
pub(super) async fn relay(
    child: &mut Child,
    master: &AsyncFd<OwnedFd>,
    tx: &mpsc::Sender<Frame>,
) -> Result<ExitStatus, String> {
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut status = None;
    loop {
        let read = master.async_io(Interest::READABLE, |fd| {
            Ok(rustix::io::read(fd, &mut buf[..])?)
        });
        let read = match status {
            None => tokio::select! {
                r = read => r,
                s = child.wait() => {
                    status = Some(s.map_err(|e| format!("waiting for the command: {e}"))?);
                    continue;
                }
            },
            Some(_) => match tokio::time::timeout(DRAIN_IDLE, read).await {
                Ok(r) => r,
                Err(_) => break,
            },
        };
        let n = match read {
            Ok(0) => break,
            Ok(n) => n,
            // EIO: no process has the terminal open any more; all it wrote has been read.
            Err(e) if e.raw_os_error() == Some(Errno::IO.raw_os_error()) => break,
            Err(e) => return Err(format!("reading the terminal: {e}")),
        };
        let frame = Frame {
            data: Bytes::copy_from_slice(&buf[..n]),
            channel: Channel::Stdout as i32,
            ..Default::default()
        };
        tx.send(frame).await.map_err(|_| LINK_CLOSED.to_string())?;
    }
    match status {
        Some(s) => Ok(s),
        None => child
            .wait()
            .await
            .map_err(|e| format!("waiting for the command: {e}")),
    }
}
