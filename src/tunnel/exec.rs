//! `lodge exec`: runs a command on a workflow's agent through the router, with local stdin,
//! stdout and stderr relayed, and exits with the command's status (a signal N as 128+N; a failed
//! session as 255 with `lodge exec: <why>` on stderr, as ssh does).
//!
//! With `--tty` the command runs under a pseudo-terminal on the agent, and the local terminal is
//! put in raw mode for the session (restored on every way out), its size sent at the start and
//! again on every SIGWINCH. `--tty` needs stdin to be a terminal; if it is not, that is an error
//! (exit 2), not a quiet fall-back to pipes: the two modes differ in what a script gets (one
//! merged stream with CR LF line ends, against separate stdout and stderr), so a caller gets the
//! mode it asked for or a clear no.

pub(crate) mod session;
mod terminal;

use lodge_grpc::pb::router::{user_init, Exec, TerminalSize, UserInit};
use lodge_grpc::router_client::new_session_key;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;

use self::session::Outcome;
use self::terminal::RawMode;
use super::TunnelConn;

/// Arguments of `lodge exec`.
#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// Workflow whose agent runs the command.
    #[arg(long)]
    pub workflow_id: String,
    /// Run the command under a pseudo-terminal (stdout and stderr merged); stdin must be a
    /// terminal.
    #[arg(long, short = 't')]
    pub tty: bool,
    /// Session key to open (default: a fresh random one).
    #[arg(long)]
    pub session_key: Option<String>,
    /// Command and arguments.
    #[arg(trailing_var_arg = true, required = true)]
    pub command: Vec<String>,
}

/// Runs `lodge exec`; answers the process exit code.
pub async fn run(conn: TunnelConn, args: ExecArgs) -> i32 {
    if args.tty && !terminal::stdin_is_terminal() {
        eprintln!("lodge exec: --tty: stdin is not a terminal");
        return 2;
    }
    // Listening before the size is first read: no resize falls between the two.
    let resizes = if args.tty {
        match watch_window_size() {
            Ok(r) => Some(r),
            Err(e) => return fail(&e),
        }
    } else {
        None
    };
    let size = if args.tty { terminal::size() } else { None };
    let init = UserInit {
        session_key: args.session_key.unwrap_or_else(new_session_key),
        workflow_id: args.workflow_id,
        operation: Some(user_init::Operation::Exec(Exec {
            command: args.command,
            tty: args.tty,
            size,
            term: if args.tty {
                std::env::var("TERM").unwrap_or_default()
            } else {
                String::new()
            },
        })),
    };
    let (link, io) = match session::open(&conn, init, resizes, "lodge exec").await {
        Ok(opened) => opened,
        Err(e) => return fail(&e),
    };
    if !args.tty {
        return session::run(link, io).await.finish("lodge exec");
    }
    // Raw only once the agent is there: while waiting, ^C still interrupts `lodge exec`.
    let raw = match RawMode::enable() {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    // In raw mode ^C is a byte for the remote side; a signal from elsewhere (kill, a closed
    // window) must still restore the terminal before we go.
    let outcome = tokio::select! {
        outcome = session::run(link, io) => outcome,
        signal = stop_signal() => {
            drop(raw);
            eprintln!("lodge exec: stopped by signal {signal}");
            return 128 + signal;
        }
    };
    drop(raw);
    outcome.finish("lodge exec")
}

fn fail(why: &str) -> i32 {
    Outcome::Failed(why.to_string()).finish("lodge exec")
}

/// The terminal's size at every SIGWINCH, including those that come while the session is being
/// opened (the signal is noted from now on, and the size read when the session runs).
fn watch_window_size() -> Result<mpsc::Receiver<TerminalSize>, String> {
    let mut winch =
        signal(SignalKind::window_change()).map_err(|e| format!("--tty: SIGWINCH: {e}"))?;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        while winch.recv().await.is_some() {
            if let Some(size) = terminal::size() {
                if tx.send(size).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(rx)
}

/// The first of SIGTERM, SIGHUP and SIGINT to arrive, as its number.
async fn stop_signal() -> i32 {
    let kinds = [
        SignalKind::terminate(),
        SignalKind::hangup(),
        SignalKind::interrupt(),
    ];
    let [mut term, mut hup, mut int] = kinds.map(|k| signal(k).ok());
    tokio::select! {
        () = next(&mut term) => kinds[0].as_raw_value(),
        () = next(&mut hup) => kinds[1].as_raw_value(),
        () = next(&mut int) => kinds[2].as_raw_value(),
    }
}

async fn next(signal: &mut Option<Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}
