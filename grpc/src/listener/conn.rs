//! The connections the accept loop hands to tonic: a TCP stream, with the bytes read past a PROXY
//! header put back in front, and the client's address as the limits saw it.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::lifecycle::{ConnState, Watched};
use crate::tls::stream::{PeerCerts, WithPeerCerts};

/// Forwards writes of a wrapper to its `io` field (reads differ: a refused connection ends them).
macro_rules! delegate_write {
    ($t:ty) => {
        impl tokio::io::AsyncWrite for $t {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.io).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.io.is_write_vectored()
            }
        }
    };
}

pub(super) use delegate_write;

/// A TCP stream whose first bytes (`prefix`) were already read off the socket.
pub struct Prefixed {
    prefix: BytesMut,
    io: TcpStream,
    /// Reported to tonic as the remote address: the proxied client's, or the socket's peer.
    client: SocketAddr,
}

impl Prefixed {
    /// `inner` from `client`, with `prefix` to be read before the socket's bytes.
    pub fn new(inner: TcpStream, client: SocketAddr, prefix: BytesMut) -> Self {
        Self {
            prefix,
            io: inner,
            client,
        }
    }

    /// The client's address (after the PROXY header, if there was one).
    pub fn client(&self) -> SocketAddr {
        self.client
    }

    /// The connection as tonic's requests see it (`Request::remote_addr` is the client).
    pub fn tcp_info(&self) -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: self.io.local_addr().ok(),
            remote_addr: Some(self.client),
        }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

delegate_write!(Prefixed);

/// What every call on an admitted connection finds in its request's extensions: the client as
/// the limits saw it, the connection's state, and the client's certificates (mutual TLS).
///
/// TLS is terminated by the listener (see [`crate::tls`]), so this is the connection information
/// of plaintext and TLS connections alike: `request.extensions().get::<ConnInfo>()`, or
/// [`ConnInfo::of`].
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// Addresses; `remote_addr` is the client named by a PROXY header, if there was one.
    pub tcp: TcpConnectInfo,
    /// Calls in flight and timers of the connection.
    pub state: Arc<ConnState>,
    /// The client's certificate chain, its own certificate first, as verified against the
    /// client CA (`server.tls.client_ca_file`); `None` without TLS or without mutual TLS.
    pub peer_certs: Option<PeerCerts>,
}

impl ConnInfo {
    /// The connection of a request.
    pub fn of(ext: &http::Extensions) -> Option<&ConnInfo> {
        ext.get::<ConnInfo>()
    }

    /// The verified client certificate chain of a request's connection (mutual TLS), its own
    /// certificate first.
    pub fn peer_certs_of(ext: &http::Extensions) -> Option<&PeerCerts> {
        Self::of(ext)?.peer_certs.as_ref()
    }
}

impl WithPeerCerts for ConnInfo {
    fn with_peer_certs(mut self, certs: Option<PeerCerts>) -> Self {
        self.peer_certs = certs;
        self
    }
}

/// An admitted connection: counted against the limits until it is dropped, and ended when it
/// stays without calls for too long (see [`super::lifecycle`]).
pub struct LimitedConn {
    pub(super) io: Watched<Prefixed>,
    /// Gives the connection's places back when dropped; counts how it ended.
    pub(super) slot: super::accept::Slot,
}

impl Connected for LimitedConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnInfo {
            tcp: self.io.get_ref().tcp_info(),
            state: self.io.state().clone(),
            peer_certs: None,
        }
    }
}

impl AsyncRead for LimitedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

delegate_write!(LimitedConn);

impl Drop for LimitedConn {
    fn drop(&mut self) {
        if let Some(how) = self.io.ending() {
            self.slot.ended(how);
        }
    }
}
