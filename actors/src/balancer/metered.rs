//! A proxied connection's sockets, metered: the bytes each one reads are counted as they flow
//! (so an instance's figures move while a long connection lasts, not only at its end), and every
//! read stamps the connection's last activity, which the idle timeout watches.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::instance::Live;

/// When a connection last carried a byte, either way.
pub struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last_ms: AtomicU64,
}

impl Activity {
    /// A connection active now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long nothing has moved.
    pub fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// Which of an instance's byte counts a socket's reads go to.
pub type Tally = fn(&Live) -> &AtomicU64;

/// A socket whose reads are counted (into the instance's live figures and a metric) and stamp
/// the connection's activity.
pub struct Metered {
    inner: TcpStream,
    activity: Arc<Activity>,
    live: Arc<Live>,
    tally: Tally,
    counter: Counter,
}

impl Metered {
    /// `inner`, counting what it reads into `tally(live)` and `counter`.
    pub fn new(
        inner: TcpStream,
        activity: Arc<Activity>,
        live: Arc<Live>,
        tally: Tally,
        counter: Counter,
    ) -> Self {
        Self {
            inner,
            activity,
            live,
            tally,
            counter,
        }
    }
}

impl AsyncRead for Metered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            (self.tally)(&self.live).fetch_add(n, Ordering::Relaxed);
            self.counter.inc_by(n);
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Metered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn reads_are_counted_as_they_flow_and_stamp_the_activity() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let activity = Arc::new(Activity::new());
        let live = Arc::new(Live::default());
        let counter = Counter::default();
        let tally: Tally = |l| &l.bytes_in;
        let mut m = Metered::new(
            server,
            activity.clone(),
            live.clone(),
            tally,
            counter.clone(),
        );
        let bytes = || live.bytes_in.load(Ordering::Relaxed);
        client.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        m.read_exact(&mut buf).await.unwrap();
        assert_eq!((bytes(), counter.get()), (5, 5));
        assert!(activity.quiet_for() < Duration::from_secs(5));
        // Writes pass through, uncounted (the other socket's reads count that direction).
        m.write_all(b"back").await.unwrap();
        let mut back = [0u8; 4];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");
        assert_eq!((bytes(), live.bytes_out.load(Ordering::Relaxed)), (5, 0));
    }
}
