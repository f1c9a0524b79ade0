//! The session router's command-line ends: `lodge agent` (the workload side) and the user
//! commands `lodge exec`, `lodge port-forward`, `lodge rsync` and `lodge sessions`.
//!
//! Every command reaches the router through [`TunnelConn`]: the node's address, TLS, and the
//! bearer token (`--token-file`, or `LODGE_TOKEN`; never a plain argument that `ps` would show).

pub mod agent;
pub mod bridge;
pub mod exec;
pub mod forward;
pub mod rsync;
pub mod sessions;
pub mod shutdown;
pub mod token;

use std::path::PathBuf;
use std::pin::Pin;

use clap::Args;
use lodge_grpc::client;
use lodge_grpc::pb::router::Frame;
use lodge_grpc::router_client::{RouterClient, Tunnel};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::Status;

use crate::ctl::Connection;

/// How a tunnel command reaches the router.
#[derive(Args, Clone, Debug)]
pub struct TunnelConn {
    #[command(flatten)]
    pub conn: Connection,
    /// File holding the JWT to present (the first line is used).
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
}

impl TunnelConn {
    /// The token from `--token-file` or `LODGE_TOKEN`; `None` when neither is set (a node with
    /// auth disabled).
    pub fn token(&self) -> Result<Option<String>, String> {
        if let Some(p) = &self.token_file {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("--token-file {}: {e}", p.display()))?;
            let t = text.lines().next().unwrap_or("").trim().to_string();
            if t.is_empty() {
                return Err(format!("--token-file {}: empty", p.display()));
            }
            return Ok(Some(t));
        }
        Ok(std::env::var("LODGE_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty()))
    }

    /// Connects to the first endpoint that answers.
    pub async fn connect(&self) -> Result<RouterClient, String> {
        let token = self.token()?;
        let tls = crate::failover::tls(&self.conn);
        let mut last = String::from("--endpoint: no endpoint given");
        for ep in crate::failover::endpoints(&self.conn) {
            match client::connect(&ep, &tls).await {
                Ok(ch) => return RouterClient::new(ch, token.as_deref()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// Frames arriving from the router.
pub type FrameRx = Pin<Box<dyn Stream<Item = Result<Frame, Status>> + Send>>;

/// One side's view of a paired session, as the operations use it: frames to send (drop `tx` to
/// finish sending; the other side then gets an `eof` frame) and frames received. `rx` ends once
/// both directions have finished, or with the status that ended the session.
pub struct Link {
    pub tx: mpsc::Sender<Frame>,
    pub rx: FrameRx,
}

impl From<Tunnel> for Link {
    fn from(t: Tunnel) -> Self {
        Link {
            tx: t.tx,
            rx: Box::pin(t.rx),
        }
    }
}

/// Two links joined back to back in memory with the router's stream rules (`eof` when the other
/// side finishes sending, the end once both have), for testing an operation's two ends without
/// a node.
#[cfg(test)]
pub fn link_pair() -> (Link, Link) {
    use lodge_grpc::pb::router::{frame, Eof};
    use lodge_grpc::router_client::SEND_QUEUE;
    use std::sync::Arc;
    let (a_tx, a_out) = mpsc::channel(SEND_QUEUE);
    let (b_tx, b_out) = mpsc::channel(SEND_QUEUE);
    let (to_a, a_in) = mpsc::channel(SEND_QUEUE);
    let (to_b, b_in) = mpsc::channel(SEND_QUEUE);
    let both_done = Arc::new(tokio::sync::Barrier::new(2));
    for (mut from, to) in [(a_out, to_b), (b_out, to_a)] {
        let both_done = both_done.clone();
        tokio::spawn(async move {
            while let Some(f) = from.recv().await {
                if to.send(Ok(f)).await.is_err() {
                    break;
                }
            }
            let eof = Frame {
                control: Some(frame::Control::Eof(Eof {})),
                ..Default::default()
            };
            let _ = to.send(Ok(eof)).await;
            both_done.wait().await;
        });
    }
    let rx = |r| -> FrameRx { Box::pin(tokio_stream::wrappers::ReceiverStream::new(r)) };
    (
        Link {
            tx: a_tx,
            rx: rx(a_in),
        },
        Link {
            tx: b_tx,
            rx: rx(b_in),
        },
    )
}
