//! The calls in flight, as the server counts them: on each connection (a connection with none is
//! idle, see [`crate::listener`]), on the node (`server.max_concurrent_rpcs`: past it a call is
//! answered RESOURCE_EXHAUSTED at once), and those a shutdown's drain waits for.
//!
//! The drain waits for calls that someone is waiting on, and nothing else. Some streams never
//! end by themselves: raft peers' message streams, watches, lease keep-alives, agents listening
//! for sessions, the topology and event feeds, streams relayed from another member. Waiting for
//! them made every stop take the whole `server.drain_timeout_ms`. They are not counted for the
//! drain; they are cut when the counted calls are done (their clients reconnect to another
//! member, as they would after a crash).

use crate::watched_body::{Watch, Watched};
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
    "/lodge.workflow.v1.Workflow/Watch",
    "/lodge.workflow.v1.Workflow/Work",
    "/grpc.health.v1.Health/Watch",
];

/// Whether a call with these `path` and `headers` holds the drain.
pub fn holds_drain(path: &str, headers: &http::HeaderMap) -> bool {
    !LONG_LIVED.contains(&path) && !headers.contains_key(crate::router::RELAYED)
}

/// The calls the drain waits for.
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

/// One call the drain waits for.
struct Guard(Arc<InFlight>);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.zero.notify_waiters();
        }
    }
}

/// The node's calls in flight and its cap on them.
pub struct Calls {
    count: AtomicUsize,
    /// `server.max_concurrent_rpcs`.
    max: usize,
    /// The calls the drain waits for.
    pub drain: Arc<InFlight>,
    /// Where refusals are counted.
    rejections: lodge_actors::registry::RegistryMetrics,
}

impl Calls {
    /// At most `max` calls at once; refusals counted in `rejections`.
    pub fn new(max: usize, rejections: lodge_actors::registry::RegistryMetrics) -> Arc<Self> {
        Arc::new(Self {
            count: AtomicUsize::new(0),
            max,
            drain: Arc::new(InFlight::default()),
            rejections,
        })
    }
}

/// Tower layer counting every call in [`Calls`], on its connection, and for the drain.
#[derive(Clone)]
pub struct CallsLayer(pub Arc<Calls>);

impl<S> tower::Layer<S> for CallsLayer {
    type Service = CallsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallsService {
            inner,
            calls: self.0.clone(),
        }
    }
}

/// See [`CallsLayer`].
#[derive(Clone)]
pub struct CallsService<S> {
    inner: S,
    calls: Arc<Calls>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for CallsService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Default + Unpin,
{
    type Response = http::Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future = crate::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let calls = &self.calls;
        let connection = crate::listener::ConnInfo::of(req.extensions()).map(|c| {
            c.state.call_began();
            ConnectionGuard(c.state.clone())
        });
        if calls.count.fetch_add(1, Ordering::SeqCst) >= calls.max {
            calls.count.fetch_sub(1, Ordering::SeqCst);
            calls.rejections.rejected("concurrent_rpcs");
            let status = tonic::Status::resource_exhausted(format!(
                "the node has {} calls in flight (server.max_concurrent_rpcs); try again later",
                calls.max
            ));
            return Box::pin(async move {
                Ok(status
                    .into_http::<ResBody>()
                    .map(|inner| Watched::new(inner, Guards::default())))
            });
        }
        let guards = Guards {
            _node: Some(NodeGuard(calls.clone())),
            _connection: connection,
            _drain: holds_drain(req.uri().path(), req.headers()).then(|| calls.drain.enter()),
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|inner| Watched::new(inner, guards)))
        })
    }
}

/// A call's places in the counts, given back when its response body is dropped (the call is
/// over, or its client left). Held only for their `Drop`.
#[derive(Default)]
pub struct Guards {
    _node: Option<NodeGuard>,
    _connection: Option<ConnectionGuard>,
    _drain: Option<Guard>,
}

struct NodeGuard(Arc<Calls>);

impl Drop for NodeGuard {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
    }
}

struct ConnectionGuard(Arc<crate::listener::ConnState>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.call_ended();
    }
}

/// A response body holding its call's places in the counts until it is dropped.
pub type CountedBody<B> = Watched<B, Guards>;

impl Watch for Guards {
    fn frame<D>(&mut self, _: &mut Frame<D>) {}
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
            ("/lodge.workflow.v1.Workflow/Work", &plain, false),
        ] {
            assert_eq!(holds_drain(path, headers), holds, "{path}");
        }
    }

    #[tokio::test]
    async fn the_drain_waits_for_counted_calls_and_the_cap_refuses_the_excess() {
        let calls = Calls::new(2, Default::default());
        let inner = tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                bytes::Bytes,
            >::new()))
        });
        let mut svc = tower::Layer::layer(&CallsLayer(calls.clone()), inner);
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
        assert_eq!(
            calls.drain.count(),
            1,
            "the watch is not counted for the drain"
        );
        // Two in flight: a third is refused at once, naming the limit.
        let third = svc
            .ready()
            .await
            .unwrap()
            .call(call("/lodge.kv.v1.KV/Range"))
            .await;
        let status = tonic::Status::from_header_map(third.unwrap().headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("server.max_concurrent_rpcs"));
        let waiter = tokio::spawn({
            let calls = calls.clone();
            async move { calls.drain.idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(put);
        waiter.await.unwrap();
        drop(watch);
        assert_eq!(calls.drain.count(), 0);
        assert_eq!(calls.count.load(Ordering::SeqCst), 0);
        calls.drain.idle().await;
    }
}
