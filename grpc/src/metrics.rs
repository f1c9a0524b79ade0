//! RPC and connection metrics: a tower layer that sees every call, whatever the service.
//!
//! A gRPC call's status travels in the trailers (or, for an early error, in the response headers),
//! so the layer wraps the response body and records the call when the trailers go by.

use crate::watched_body::{Watch, Watched};
use std::collections::HashSet;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    grpc_method: String,
    grpc_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    grpc_method: String,
}

/// RPC and connection figures of the gRPC server.
pub struct ServerMetrics {
    handled: Family<CallLabels, Counter>,
    latency: Family<MethodLabels, Histogram>,
    /// Connections open now.
    pub connections_active: Gauge,
    /// Connections accepted since start.
    pub connections_accepted: Counter,
    /// Connections refused by `server.max_connections`.
    pub connections_rejected: Counter,
}

impl ServerMetrics {
    /// Creates the metrics and registers them under `lodge_grpc_*`.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Self {
            handled: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
            }),
            connections_active: Gauge::default(),
            connections_accepted: Counter::default(),
            connections_rejected: Counter::default(),
        };
        registry.register(
            "lodge_grpc_server_handled",
            "RPCs completed, by method and status code",
            m.handled.clone(),
        );
        registry.register(
            "lodge_grpc_server_handling_seconds",
            "RPC latency from request to status, by method",
            m.latency.clone(),
        );
        registry.register(
            "lodge_grpc_connections_active",
            "Open client connections",
            m.connections_active.clone(),
        );
        registry.register(
            "lodge_grpc_connections_accepted",
            "Client connections accepted",
            m.connections_accepted.clone(),
        );
        registry.register(
            "lodge_grpc_connections_rejected",
            "Client connections refused because server.max_connections was reached",
            m.connections_rejected.clone(),
        );
        Arc::new(m)
    }

    fn record(&self, method: &MethodMetrics, code: tonic::Code, started: Instant) {
        // Resolved once per method and code: the label sets (two strings each) would otherwise
        // be built and hashed on every call.
        let slot = (code as i32 as usize).min(method.handled.len() - 1);
        method.handled[slot]
            .get_or_init(|| {
                self.handled
                    .get_or_create(&CallLabels {
                        grpc_method: method.name.clone(),
                        grpc_code: format!("{code:?}"),
                    })
                    .clone()
            })
            .inc();
        method
            .latency
            .get_or_init(|| {
                self.latency
                    .get_or_create(&MethodLabels {
                        grpc_method: method.name.clone(),
                    })
                    .clone()
            })
            .observe(started.elapsed().as_secs_f64());
    }
}

/// One method's series, looked up in the families on first use.
struct MethodMetrics {
    name: String,
    /// By status code (0..=16).
    handled: [std::sync::OnceLock<Counter>; 17],
    latency: std::sync::OnceLock<Histogram>,
}

impl MethodMetrics {
    fn new(name: &str) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_string(),
            handled: std::array::from_fn(|_| std::sync::OnceLock::new()),
            latency: std::sync::OnceLock::new(),
        })
    }
}

/// Every known method's series, plus `unknown` for the rest.
struct Methods {
    known: std::collections::HashMap<String, Arc<MethodMetrics>>,
    unknown: Arc<MethodMetrics>,
}

impl Methods {
    fn of(&self, path: &str) -> Arc<MethodMetrics> {
        self.known.get(path).unwrap_or(&self.unknown).clone()
    }
}

/// The method paths of `services` (full names), from encoded descriptor sets that describe them:
/// anything else is labelled `unknown`, so a client cannot grow the metrics page with made-up
/// paths, and a service a set describes but the server does not serve gets no series.
pub fn known_methods(descriptor_sets: &[&[u8]], services: &[&str]) -> HashSet<String> {
    use prost::Message as _;
    let mut out = HashSet::new();
    for set in descriptor_sets {
        let Ok(fds) = prost_types::FileDescriptorSet::decode(*set) else {
            continue;
        };
        for file in fds.file {
            let package = file.package.unwrap_or_default();
            for svc in file.service {
                let full = format!("{package}.{}", svc.name.unwrap_or_default());
                if !services.contains(&full.as_str()) {
                    continue;
                }
                for m in svc.method {
                    out.insert(format!("/{full}/{}", m.name.unwrap_or_default()));
                }
            }
        }
    }
    out
}

/// Layer adding [`ServerMetrics`] recording to a service.
#[derive(Clone)]
pub struct MetricsLayer {
    metrics: Arc<ServerMetrics>,
    methods: Arc<Methods>,
}

impl MetricsLayer {
    /// Records into `metrics`; methods outside `known` are labelled `unknown`.
    pub fn new(metrics: Arc<ServerMetrics>, known: HashSet<String>) -> Self {
        let methods = Methods {
            known: known
                .iter()
                .map(|m| (m.clone(), MethodMetrics::new(m)))
                .collect(),
            unknown: MethodMetrics::new("unknown"),
        };
        Self {
            metrics,
            methods: Arc::new(methods),
        }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: self.metrics.clone(),
            methods: self.methods.clone(),
        }
    }
}

/// See [`MetricsLayer`].
#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Arc<ServerMetrics>,
    methods: Arc<Methods>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for MetricsService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Unpin,
{
    type Response = http::Response<MetricsBody<ResBody>>;
    type Error = S::Error;
    type Future = crate::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let path = req.uri().path();
        let recorder = Recorder {
            metrics: self.metrics.clone(),
            method: self.methods.of(path),
            started: Instant::now(),
            code: None,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let (parts, body) = resp.into_parts();
            let recorder = match status_of(&parts.headers) {
                // Trailers-only answer: the call is over already.
                Some(code) => {
                    recorder.finish(code);
                    None
                }
                None => Some(recorder),
            };
            Ok(http::Response::from_parts(
                parts,
                Watched::new(body, RecordOnTrailers(recorder)),
            ))
        })
    }
}

fn status_of(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32)
}

/// Records its call exactly once: with the status seen, or as CANCELLED if it is dropped first
/// (the client went away, or the call was cut before answering).
pub struct Recorder {
    metrics: Arc<ServerMetrics>,
    method: Arc<MethodMetrics>,
    started: Instant,
    code: Option<tonic::Code>,
}

impl Recorder {
    fn finish(mut self, code: tonic::Code) {
        self.code = Some(code);
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let code = self.code.unwrap_or(tonic::Code::Cancelled);
        self.metrics.record(&self.method, code, self.started);
    }
}

/// A response body that records its call when the status trailers pass.
pub type MetricsBody<B> = Watched<B, RecordOnTrailers>;

/// Records the call with the status its trailers carry (none left: recorded already).
pub struct RecordOnTrailers(Option<Recorder>);

impl Watch for RecordOnTrailers {
    fn frame<D>(&mut self, frame: &mut Frame<D>) {
        if let Some(code) = frame.trailers_ref().and_then(status_of) {
            if let Some(r) = self.0.take() {
                r.finish(code);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Service, ServiceExt};

    #[tokio::test]
    async fn calls_are_labelled_by_known_method_or_unknown_and_cancelled_calls_are_counted() {
        let mut registry = Registry::default();
        let metrics = ServerMetrics::register(&mut registry);
        let known = known_methods(&[crate::pb::FILE_DESCRIPTOR_SET], &["lodge.admin.v1.Admin"]);
        assert!(known.contains("/lodge.admin.v1.Admin/ListActors"));
        let inner = tower::service_fn(|_req: http::Request<()>| async {
            let resp = http::Response::builder()
                .header("grpc-status", "12")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            Ok::<_, std::convert::Infallible>(resp)
        });
        let mut svc = tower::Layer::layer(&MetricsLayer::new(metrics.clone(), known), inner);
        for path in [
            "/lodge.admin.v1.Admin/ListActors",
            "/made.up/Path1",
            "/made.up/Path2",
        ] {
            let req = http::Request::builder().uri(path).body(()).unwrap();
            svc.ready().await.unwrap().call(req).await.unwrap();
        }
        // A call whose future is dropped before it answers counts as cancelled.
        let req = http::Request::builder()
            .uri("/lodge.admin.v1.Admin/Tree")
            .body(())
            .unwrap();
        drop(svc.ready().await.unwrap().call(req));
        let mut page = String::new();
        prometheus_client::encoding::text::encode(&mut page, &registry).unwrap();
        assert!(
            page.contains(
                r#"grpc_method="/lodge.admin.v1.Admin/ListActors",grpc_code="Unimplemented"} 1"#
            ),
            "{page}"
        );
        assert!(
            page.contains(r#"grpc_method="unknown",grpc_code="Unimplemented"} 2"#),
            "{page}"
        );
        assert!(
            page.contains(r#"grpc_method="/lodge.admin.v1.Admin/Tree",grpc_code="Cancelled"} 1"#),
            "{page}"
        );
        assert!(!page.contains("made.up"), "{page}");
    }
}
