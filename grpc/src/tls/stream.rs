//! A connection as a listener hands it to its server: plaintext, or TLS the listener terminated.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

/// A client's certificate chain (its own certificate first), as mutual TLS verified it.
pub type PeerCerts = Arc<Vec<CertificateDer<'static>>>;

/// Connection information that can carry the client's verified certificates.
pub trait WithPeerCerts {
    /// `self` with the chain the TLS handshake verified (`None`: no TLS, or no client
    /// certificate asked for).
    fn with_peer_certs(self, certs: Option<PeerCerts>) -> Self;
}

/// `T` as it reaches the server: as accepted, or inside the TLS the listener terminated.
pub enum Secured<T> {
    Plain(T),
    Tls(Box<TlsStream<T>>),
}

impl<T> Secured<T> {
    /// The connection under the TLS, if any.
    pub fn get_ref(&self) -> &T {
        match self {
            Secured::Plain(t) => t,
            Secured::Tls(s) => s.get_ref().0,
        }
    }

    /// The client's verified certificate chain, with mutual TLS.
    pub fn peer_certs(&self) -> Option<PeerCerts> {
        match self {
            Secured::Plain(_) => None,
            Secured::Tls(s) => s
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect())),
        }
    }
}

impl<T> Connected for Secured<T>
where
    T: Connected,
    T::ConnectInfo: WithPeerCerts,
{
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.get_ref()
            .connect_info()
            .with_peer_certs(self.peer_certs())
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Secured<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Secured::Plain(t) => Pin::new(t).poll_read(cx, buf),
            Secured::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Secured<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Secured::Plain(t) => Pin::new(t).poll_write(cx, buf),
            Secured::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Secured::Plain(t) => Pin::new(t).poll_flush(cx),
            Secured::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Secured::Plain(t) => Pin::new(t).poll_shutdown(cx),
            Secured::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Secured::Plain(t) => Pin::new(t).poll_write_vectored(cx, bufs),
            Secured::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Secured::Plain(t) => t.is_write_vectored(),
            Secured::Tls(s) => s.is_write_vectored(),
        }
    }
}
