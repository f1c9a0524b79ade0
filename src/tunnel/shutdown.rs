//! Waiting for SIGINT or SIGTERM in the long-lived tunnel commands.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// SIGINT and SIGTERM, caught from the moment this is made: a command makes it before it says
/// it is ready, so a signal sent right after that line is handled rather than fatal.
pub struct Shutdown {
    interrupt: Option<Signal>,
    terminate: Option<Signal>,
}

impl Shutdown {
    /// Starts catching both signals. One that cannot be caught (no signal driver) keeps its
    /// default action, which ends the process anyway.
    pub fn catch() -> Self {
        Self {
            interrupt: signal(SignalKind::interrupt()).ok(),
            terminate: signal(SignalKind::terminate()).ok(),
        }
    }

    /// Resolves at the first of the two signals.
    pub async fn signalled(&mut self) {
        async fn recv(s: &mut Option<Signal>) {
            if let Some(s) = s {
                if s.recv().await.is_some() {
                    return;
                }
            }
            // No stream, or it ended: this signal never resolves the wait.
            std::future::pending().await
        }
        tokio::select! {
            () = recv(&mut self.interrupt) => {}
            () = recv(&mut self.terminate) => {}
        }
    }
}
