//! Refused connections get an answer: a small server completes their handshake and answers
//! every call on them with RESOURCE_EXHAUSTED naming the limit, then closes them.
//!
//! A bare reset reaches a gRPC client as "transport error" or "operation was canceled", which
//! reads like a crashed node. Answering costs a handshake, so it is bounded: at most
//! [`MAX_ANSWERING`] refused connections are answered at once, each for at most [`LINGER`];
//! past that, refused connections are closed at once as before.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tonic::service::Routes;
use tonic::transport::server::Connected;
use tonic::transport::Server;

use super::conn::{delegate_write, Prefixed};
use crate::tls::stream::{PeerCerts, WithPeerCerts};
use crate::tls::Secured;

/// Refused connections answered at once; more are closed without an answer.
pub const MAX_ANSWERING: usize = 64;
/// How long a refused connection stays open for its calls to be answered.
pub const LINGER: Duration = Duration::from_secs(2);

/// Why a connection was refused, as its calls' status message says it.
#[derive(Clone, Debug)]
pub struct Refusal(pub Arc<str>);

/// A refused connection on its way to being answered.
pub struct RefusedConn {
    io: Prefixed,
    why: Refusal,
    /// After this the connection reads as closed, so the server lets it go.
    linger: Pin<Box<tokio::time::Sleep>>,
    _permit: OwnedSemaphorePermit,
}

/// Places for refused connections to be answered.
#[derive(Clone)]
pub struct Answering(Arc<Semaphore>);

impl Default for Answering {
    fn default() -> Self {
        Self(Arc::new(Semaphore::new(MAX_ANSWERING)))
    }
}

impl Answering {
    /// `io` with its reason, if a place is free; `None` means close it unanswered.
    pub fn take(&self, io: Prefixed, why: Refusal) -> Option<RefusedConn> {
        let permit = self.0.clone().try_acquire_owned().ok()?;
        Some(RefusedConn {
            io,
            why,
            linger: Box::pin(tokio::time::sleep(LINGER)),
            _permit: permit,
        })
    }
}

impl Connected for RefusedConn {
    type ConnectInfo = Refusal;

    fn connect_info(&self) -> Refusal {
        self.why.clone()
    }
}

impl AsyncRead for RefusedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.linger.as_mut().poll(cx).is_ready() {
            // End of stream: the HTTP/2 connection ends and the socket is closed.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

delegate_write!(RefusedConn);

impl WithPeerCerts for Refusal {
    fn with_peer_certs(self, _: Option<PeerCerts>) -> Self {
        self
    }
}

/// Serves `refused` connections (their TLS, if any, terminated by the listener) until the
/// channel closes.
pub async fn serve(
    refused: mpsc::Receiver<io::Result<Secured<RefusedConn>>>,
) -> Result<(), tonic::transport::Error> {
    Server::builder()
        .layer(tower::layer::layer_fn(|_inner| Refuse))
        .add_routes(Routes::default())
        .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(refused))
        .await
}

/// Answers every call with the connection's refusal.
#[derive(Clone)]
struct Refuse;

impl<B> tower::Service<http::Request<B>> for Refuse {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let ext = req.extensions();
        let why = ext
            .get::<Refusal>()
            .map_or("refused by the node's connection limit", |r| &r.0);
        std::future::ready(Ok(tonic::Status::resource_exhausted(why).into_http()))
    }
}
