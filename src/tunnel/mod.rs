//! The session router's command-line ends: `lodge agent` (the workload side) and the user
//! commands `lodge exec`, `lodge port-forward`, `lodge rsync` and `lodge sessions`.
//!
//! Every command reaches the router through [`TunnelConn`]: the node's address, TLS, and the
//! bearer token (`--token-file`, or `LODGE_TOKEN`; never a plain argument that `ps` would show).

pub mod agent;
pub mod bridge;
pub mod exec;
pub mod port_forward;
pub mod rsync;
pub mod sessions;
pub mod shutdown;

use std::pin::Pin;
use std::time::Duration;

use clap::Args;
use lodge_grpc::client;
use lodge_grpc::pb::router::{Frame, UserInit};
use lodge_grpc::router_client::{RouterClient, Tunnel};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Code, Status};

use crate::ctl::Connection;

/// How a tunnel command reaches the router.
#[derive(Args, Clone, Debug)]
pub struct TunnelConn {
    #[command(flatten)]
    pub conn: Connection,
}

impl TunnelConn {
    /// The token from `--token-file` or `LODGE_TOKEN`; `None` when neither is set (a node with
    /// auth disabled).
    pub fn token(&self) -> Result<Option<String>, String> {
        self.conn.token()
    }

    /// Connects to the first endpoint that answers.
    pub async fn connect(&self) -> Result<RouterClient, String> {
        let token = self.token()?;
        let tls = crate::failover::tls(&self.conn)?;
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

/// How long a user's end waits for its agent before saying on stderr that it is waiting. Pairing
/// with a running agent takes milliseconds; saying so every time would only be noise.
pub const WAIT_NOTICE: Duration = Duration::from_secs(1);

/// Opens a user tunnel on `client` and waits for an agent. If none has joined within
/// [`WAIT_NOTICE`], says so on stderr (as `who`), with how long the router will wait; an agent
/// that never comes ends it with the router's DEADLINE_EXCEEDED, worded with what to check. The
/// error is one line for people.
pub async fn open_user(client: &RouterClient, init: UserInit, who: &str) -> Result<Tunnel, String> {
    let workflow = init.workflow_id.clone();
    let rendezvous = client
        .start_user(init)
        .await
        .map_err(|s| explain(&s, client.has_token()))?;
    let limit = rendezvous.timeout;
    let paired = rendezvous.paired();
    tokio::pin!(paired);
    let paired = match tokio::time::timeout(WAIT_NOTICE, &mut paired).await {
        Ok(result) => result,
        Err(_) => {
            eprintln!("{who}: {}", waiting_line(&workflow, limit));
            paired.await
        }
    };
    paired.map_err(|s| {
        let why = explain(&s, client.has_token());
        if s.code() == Code::DeadlineExceeded {
            format!(
                "{why} (is `lodge agent --workflow-id {workflow}` running, with a token for \
                 this workflow?)"
            )
        } else {
            why
        }
    })
}

/// The line a user's end prints while it waits for an agent: how long the router waits if it
/// said (a node older than this line does not), else where that is set.
pub fn waiting_line(workflow: &str, limit: Option<Duration>) -> String {
    match limit {
        Some(limit) => format!(
            "waiting for an agent of workflow {workflow} (up to {}, router.rendezvous_timeout_ms)",
            seconds(limit)
        ),
        None => format!(
            "waiting for an agent of workflow {workflow} (for as long as the node's \
             router.rendezvous_timeout_ms, 60 s by default)"
        ),
    }
}

/// `d` for people: whole seconds when it is some, else milliseconds.
fn seconds(d: Duration) -> String {
    if d.as_millis().is_multiple_of(1000) {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// A failed router call as one line for people. A call refused for want of a token (none was
/// given) says how to give one.
pub fn explain(status: &Status, token_given: bool) -> String {
    let what = if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        status.message().to_string()
    };
    if status.code() == Code::Unauthenticated && !token_given {
        format!("{what}; no token was given: pass one with --token-file FILE or LODGE_TOKEN")
    } else {
        what
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_waiting_line_says_how_long_when_the_node_said() {
        assert_eq!(
            waiting_line("w", Some(Duration::from_secs(60))),
            "waiting for an agent of workflow w (up to 60 s, router.rendezvous_timeout_ms)"
        );
        assert!(waiting_line("w", Some(Duration::from_millis(1500))).contains("up to 1500 ms"));
        assert!(waiting_line("w", None).contains("60 s by default"));
    }

    #[test]
    fn a_refusal_without_a_token_says_how_to_pass_one() {
        let refused = Status::unauthenticated("authorization: missing");
        assert!(
            explain(&refused, false).ends_with("pass one with --token-file FILE or LODGE_TOKEN")
        );
        assert_eq!(explain(&refused, true), "authorization: missing");
        let denied = Status::permission_denied("no role");
        assert_eq!(explain(&denied, false), "no role");
        assert_eq!(explain(&Status::unavailable(""), false), "Unavailable");
    }
}
