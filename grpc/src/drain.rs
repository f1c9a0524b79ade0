//! What a shutdown's drain waits for: calls that someone is waiting on to finish, and nothing
//! else.
//!
//! Some streams never end by themselves: raft peers' message streams, watches, lease keep-alives,
//! agents listening for sessions, the topology and event feeds, streams relayed from another
//! member. Waiting for them made every stop take the whole `server.drain_timeout_ms`. They are
//! not counted here; they are cut when the counted calls are done (their clients reconnect to
//! another member, as they would after a crash).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body, Frame};
use tokio::sync::Notify;

/// Methods whose calls last as long as their client wants.
const LONG_LIVED: &[&str] = &[
    "/lodge.raft.v1.Raft/Send",
    "/lodge.raft.v1.Raft/Snapshot",
    "/lodge.kv.v1.KV/Watch",
    "/lodge.kv.v1.KV/LeaseKeepAlive",
    "/lodge.admin.v1.Admin/WatchEvents",
    "/lodge.cluster.v1.Cluster/WatchTopology",
    "/lodge.balancer.v1.Balancer/StreamNLBMetrics",
    "/lodge.router.v1.Tunnel/Listen",
    "/grpc.health.v1.Health/Watch",
];

/// Whether a call with these `path` and `headers` holds the drain.
pub fn holds_drain(path: &str, headers: &http::HeaderMap) -> bool {
    !LONG_LIVED.contains(&path) && !headers.contains_key(crate::router::RELAYED)
}

/// The number of calls the drain waits for.
#[derive(Default)]
pub struct InFlight {
    count: AtomicUsize,
    zero: Notify,
}

impl InFlight {
    /// Calls in flight now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Resolves once no counted call is in flight.
    pub async fn idle(&self) {
        loop {
            let zero = self.zero.notified();
            tokio::pin!(zero);
            // Registered before the check, so a call ending between the two still wakes us.
            zero.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            zero.await;
        }
    }

    fn enter(self: &Arc<Self>) -> Guard {
        self.count.fetch_add(1, Ordering::SeqCst);
        Guard(self.clone())
    }
}

/// One counted call, until its response body is dropped.
struct Guard(Arc<InFlight>);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.zero.notify_waiters();
        }
    }
}

/// Tower layer counting the calls that hold the drain in an [`InFlight`].
#[derive(Clone)]
pub struct DrainLayer(pub Arc<InFlight>);

impl<S> tower::Layer<S> for DrainLayer {
    type Service = DrainService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DrainService {
            inner,
            in_flight: self.0.clone(),
        }
    }
}

/// See [`DrainLayer`].
#[derive(Clone)]
pub struct DrainService<S> {
    inner: S,
    in_flight: Arc<InFlight>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for DrainService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Unpin,
{
    type Response = http::Response<DrainBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let guard = holds_drain(req.uri().path(), req.headers()).then(|| self.in_flight.enter());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|inner| DrainBody {
                inner,
                _guard: guard,
            }))
        })
    }
}

/// A response body holding its call's place in the count until the body is done with.
pub struct DrainBody<B> {
    inner: B,
    _guard: Option<Guard>,
}

impl<B: Body + Unpin> Body for DrainBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Service, ServiceExt};

    #[test]
    fn watches_keepalives_raft_and_relays_do_not_hold_the_drain() {
        let plain = http::HeaderMap::new();
        let mut relayed = http::HeaderMap::new();
        relayed.insert(crate::router::RELAYED, "2".parse().unwrap());
        for (path, headers, holds) in [
            ("/lodge.kv.v1.KV/Put", &plain, true),
            (
                "/lodge.registry.v1.Translation/TranslateStream",
                &plain,
                true,
            ),
            ("/lodge.router.v1.Tunnel/User", &plain, true),
            ("/lodge.router.v1.Tunnel/User", &relayed, false),
            ("/lodge.kv.v1.KV/Watch", &plain, false),
            ("/lodge.raft.v1.Raft/Send", &plain, false),
            ("/lodge.router.v1.Tunnel/Listen", &plain, false),
        ] {
            assert_eq!(holds_drain(path, headers), holds, "{path}");
        }
    }

    #[tokio::test]
    async fn idle_waits_for_the_counted_bodies_to_be_dropped() {
        let in_flight = Arc::new(InFlight::default());
        let inner = tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                bytes::Bytes,
            >::new()))
        });
        let mut svc = tower::Layer::layer(&DrainLayer(in_flight.clone()), inner);
        let call = |path: &str| http::Request::builder().uri(path).body(()).unwrap();
        let put = svc
            .ready()
            .await
            .unwrap()
            .call(call("/lodge.kv.v1.KV/Put"))
            .await;
        let watch = svc
            .ready()
            .await
            .unwrap()
            .call(call("/lodge.kv.v1.KV/Watch"))
            .await;
        assert_eq!(in_flight.count(), 1, "the watch is not counted");
        let waiter = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(put);
        waiter.await.unwrap();
        drop(watch);
        assert_eq!(in_flight.count(), 0);
        in_flight.idle().await;
    }
}
