//! The client side of the session router (`lodge.router.v1`): opening a user's or an agent's
//! tunnel, an agent's listen stream, and the control calls, with the bearer token on every call.
//!
//! A [`Tunnel`] is the two halves of one stream: `tx` sends frames (dropping it half-closes the
//! sending direction) and `rx` receives them. The router's `eof` frame says the other side
//! finished sending; the stream's end (`None`) says the session is over.

use std::time::Duration;

use crate::client::Channel;
use bytes::Bytes;
use tokio::sync::mpsc;
use tonic::metadata::{Ascii, MetadataMap, MetadataValue};
use tonic::{Request, Status, Streaming};

use crate::pb::router::router_control_client::RouterControlClient;
use crate::pb::router::tunnel_client::TunnelClient;
use crate::pb::router::{
    frame, AgentInit, Frame, GetSessionInfoRequest, ListSessionsRequest, ListenRequest,
    SessionInfo, SessionOffer, TerminateSessionRequest, UserInit,
};
pub use crate::router::RENDEZVOUS_TIMEOUT;

/// Frames a sender may queue before `send` waits: small, so that a slow network slows the
/// producer instead of growing memory.
pub const SEND_QUEUE: usize = 8;

/// Largest payload a client puts in one frame. Big frames amortise per-message costs; the
/// server's `max_message_bytes` (4 MiB by default) is far above it.
pub const MAX_CHUNK: usize = 128 * 1024;

/// A connection to a router, with the token sent on every call.
#[derive(Clone)]
pub struct RouterClient {
    channel: Channel,
    token: Option<MetadataValue<Ascii>>,
}

/// One open tunnel.
pub struct Tunnel {
    /// Frames to the other side; drop it to half-close (the other side gets `eof`).
    pub tx: mpsc::Sender<Frame>,
    /// Frames from the router; `Ok(None)` once the session has ended cleanly.
    pub rx: Streaming<Frame>,
}

impl RouterClient {
    /// A client over `channel`. `token` is the JWT (without "Bearer"); `None` when the node runs
    /// with auth disabled.
    pub fn new(channel: Channel, token: Option<&str>) -> Result<Self, String> {
        let token = match token {
            None => None,
            Some(t) => Some(
                format!("Bearer {}", t.trim())
                    .parse::<MetadataValue<Ascii>>()
                    // The token itself is never echoed: it may be a valid credential.
                    .map_err(|_| "token: not a valid HTTP header value".to_string())?,
            ),
        };
        Ok(Self { channel, token })
    }

    /// Whether calls carry a token.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// The same connection with another token (a renewed one).
    pub fn with_token(&self, token: Option<&str>) -> Result<Self, String> {
        Self::new(self.channel.clone(), token)
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        if let Some(t) = &self.token {
            req.metadata_mut().insert("authorization", t.clone());
        }
        req
    }

    /// Opens a user tunnel and waits until an agent has joined (the router's `paired` frame).
    pub async fn open_user(&self, init: UserInit) -> Result<Tunnel, Status> {
        self.start_user(init).await?.paired().await
    }

    /// Opens a user tunnel: answers once the router has accepted it, before an agent has
    /// joined, so that a caller can say it is waiting (see [`Rendezvous`]).
    pub async fn start_user(&self, init: UserInit) -> Result<Rendezvous, Status> {
        let (tx, rx, headers) = self.start(frame::Control::UserInit(init)).await?;
        let timeout = headers
            .get(RENDEZVOUS_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis);
        Ok(Rendezvous { tx, rx, timeout })
    }

    /// Opens an agent tunnel and waits for the user; answers the tunnel and the user's request.
    pub async fn open_agent(&self, init: AgentInit) -> Result<(Tunnel, UserInit), Status> {
        let (tx, mut rx, _) = self.start(frame::Control::AgentInit(init)).await?;
        let first = rx
            .message()
            .await?
            .ok_or_else(|| Status::unavailable("the router ended the tunnel before pairing"))?;
        match first.control {
            Some(frame::Control::Paired(p)) => {
                let user = p
                    .init
                    .ok_or_else(|| Status::internal("paired frame without the user's request"))?;
                Ok((Tunnel { tx, rx }, user))
            }
            other => Err(Status::internal(format!(
                "expected a paired frame first, got {other:?}"
            ))),
        }
    }

    /// Opens a tunnel call with `init` as its first frame; answers its halves and the router's
    /// response headers.
    async fn start(
        &self,
        init: frame::Control,
    ) -> Result<(mpsc::Sender<Frame>, Streaming<Frame>, MetadataMap), Status> {
        let user = matches!(init, frame::Control::UserInit(_));
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        tx.send(Frame {
            control: Some(init),
            ..Default::default()
        })
        .await
        .map_err(|_| Status::internal("tunnel queue closed"))?;
        let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut grpc = TunnelClient::new(self.channel.clone())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let req = self.request(outbound);
        let response = if user {
            grpc.user(req).await?
        } else {
            grpc.agent(req).await?
        };
        let (headers, inbound, _) = response.into_parts();
        Ok((tx, inbound, headers))
    }

    /// The agent's stream of sessions opened for `workflow_id`.
    pub async fn listen(&self, workflow_id: &str) -> Result<Streaming<SessionOffer>, Status> {
        let req = self.request(ListenRequest {
            workflow_id: workflow_id.to_string(),
        });
        Ok(TunnelClient::new(self.channel.clone())
            .listen(req)
            .await?
            .into_inner())
    }

    /// One session's details.
    pub async fn info(&self, session_key: &str, timeout: Duration) -> Result<SessionInfo, Status> {
        let mut req = self.request(GetSessionInfoRequest {
            session_key: session_key.to_string(),
        });
        req.set_timeout(timeout);
        Ok(RouterControlClient::new(self.channel.clone())
            .get_session_info(req)
            .await?
            .into_inner())
    }

    /// Sessions across the cluster, of one workflow if `workflow_id` is not empty.
    pub async fn list(
        &self,
        workflow_id: &str,
        timeout: Duration,
    ) -> Result<Vec<SessionInfo>, Status> {
        let mut req = self.request(ListSessionsRequest {
            workflow_id: workflow_id.to_string(),
        });
        req.set_timeout(timeout);
        Ok(RouterControlClient::new(self.channel.clone())
            .list_sessions(req)
            .await?
            .into_inner()
            .sessions)
    }

    /// Ends a session; both sides get ABORTED with `reason`.
    pub async fn terminate(
        &self,
        session_key: &str,
        reason: &str,
        timeout: Duration,
    ) -> Result<bool, Status> {
        let mut req = self.request(TerminateSessionRequest {
            session_key: session_key.to_string(),
            reason: reason.to_string(),
        });
        req.set_timeout(timeout);
        Ok(RouterControlClient::new(self.channel.clone())
            .terminate_session(req)
            .await?
            .into_inner()
            .terminated)
    }
}

/// A user tunnel the router has accepted, waiting for an agent to join.
pub struct Rendezvous {
    tx: mpsc::Sender<Frame>,
    rx: Streaming<Frame>,
    /// How long the router waits for the agent (its `router.rendezvous_timeout_ms`), if it said.
    pub timeout: Option<Duration>,
}

impl Rendezvous {
    /// Waits for the agent (the router's `paired` frame); the router ends the wait with
    /// DEADLINE_EXCEEDED after its rendezvous timeout.
    pub async fn paired(self) -> Result<Tunnel, Status> {
        let Rendezvous { tx, mut rx, .. } = self;
        let first = rx
            .message()
            .await?
            .ok_or_else(|| Status::unavailable("the router ended the tunnel before pairing"))?;
        if !matches!(first.control, Some(frame::Control::Paired(_))) {
            return Err(Status::internal(format!(
                "expected a paired frame first, got {:?}",
                first.control
            )));
        }
        Ok(Tunnel { tx, rx })
    }
}

/// A payload frame.
pub fn data(bytes: Bytes) -> Frame {
    Frame {
        data: bytes,
        ..Default::default()
    }
}

/// The frame by which a side gives up on a session: both sides then get UNAVAILABLE with
/// `reason`, where a half-close (dropping `tx`) would look like a clean end.
pub fn abort(reason: impl Into<String>) -> Frame {
    control(frame::Control::Abort(crate::pb::router::Abort {
        reason: reason.into(),
    }))
}

/// A control frame.
pub fn control(c: frame::Control) -> Frame {
    Frame {
        control: Some(c),
        ..Default::default()
    }
}

/// A fresh random session key (`s-` and 32 hex digits).
pub fn new_session_key() -> String {
    format!("s-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}
