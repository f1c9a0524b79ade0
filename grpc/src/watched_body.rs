//! One response body for the layers that watch a call's answer go by: the metrics, the audit
//! log, the call counts and the status-message cap. Each layer says what it does with a frame
//! (trailers carry the call's status) and what its watcher does when dropped; the body passes
//! everything through unchanged otherwise.

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};

/// What a layer does as the frames of a response pass.
pub trait Watch: Unpin {
    /// Sees, and may change, each frame on its way to the client.
    fn frame<D>(&mut self, frame: &mut Frame<D>);
}

/// A response body that shows each of its frames to `W` on the way.
#[derive(Default)]
pub struct Watched<B, W> {
    inner: B,
    watch: W,
}

impl<B, W> Watched<B, W> {
    /// `inner`, watched by `watch`.
    pub fn new(inner: B, watch: W) -> Self {
        Self { inner, watch }
    }
}

impl<B: Body + Unpin, W: Watch> Body for Watched<B, W> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let mut polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &mut polled {
            this.watch.frame(frame);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
