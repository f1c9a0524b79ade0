//! A request message over the size limit is refused with RESOURCE_EXHAUSTED naming the limit.
//!
//! tonic checks a message's length prefix against the service's decoding limit before reading
//! the message (so a 64 MiB request is refused after its first five bytes, never buffered), and
//! answers OUT_OF_RANGE "decoded message length too large". That code says "a value outside its
//! range" and names no setting; this layer rewrites that one answer into RESOURCE_EXHAUSTED
//! naming `server.max_message_bytes` and counts it under
//! `lodge_limit_rejections_total{limit="message_bytes"}`. tonic produces it before the handler
//! runs, as a trailers-only response carrying the `Status` in its extensions, which is what is
//! looked for: a handler's own OUT_OF_RANGE (a compacted watch revision) is left alone. A
//! message too large in the middle of a client stream reaches the handler as an error item
//! instead; [`rewrite`] serves those.

use std::task::{Context, Poll};

use lodge_actors::registry::RegistryMetrics;
use tonic::{Code, Status};

/// How tonic's message begins (tonic 0.14, `codec/decode.rs`); a test pins it.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large: found ";

/// The `limit` label of these refusals.
pub const LABEL: &str = "message_bytes";

/// RESOURCE_EXHAUSTED naming the limit, if `s` is tonic's "decoded message too large"; the
/// limit is named `server.max_message_bytes` when it is `max_message_bytes`, else (the raft
/// service's own limit) by its size only.
pub fn rewrite(s: &Status, max_message_bytes: usize) -> Option<Status> {
    if s.code() != Code::OutOfRange {
        return None;
    }
    let rest = s.message().strip_prefix(TONIC_TOO_LARGE)?;
    let number = |t: &str| -> Option<usize> {
        t.trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let found = number(rest)?;
    let limit = rest.split_once("limit is:").and_then(|(_, l)| number(l))?;
    let name = if limit == max_message_bytes {
        format!("server.max_message_bytes ({limit})")
    } else {
        format!("this service's message limit ({limit})")
    };
    Some(Status::resource_exhausted(format!(
        "request: a message of {found} bytes is over {name}"
    )))
}

/// Tower layer applying [`rewrite`] to every call's answer.
#[derive(Clone)]
pub struct MessageLimitLayer {
    pub max_message_bytes: usize,
    pub metrics: RegistryMetrics,
}

impl<S> tower::Layer<S> for MessageLimitLayer {
    type Service = MessageLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MessageLimitService {
            inner,
            limits: self.clone(),
        }
    }
}

/// See [`MessageLimitLayer`].
#[derive(Clone)]
pub struct MessageLimitService<S> {
    inner: S,
    limits: MessageLimitLayer,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for MessageLimitService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = crate::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let fut = self.inner.call(req);
        let limits = self.limits.clone();
        Box::pin(async move {
            let mut resp = fut.await?;
            let refused = resp
                .extensions()
                .get::<Status>()
                .and_then(|s| rewrite(s, limits.max_message_bytes));
            if let Some(status) = refused {
                limits.metrics.rejected(LABEL);
                // The headers are the whole answer (trailers-only): replace the status in them.
                let headers = resp.headers_mut();
                headers.remove(Status::GRPC_MESSAGE);
                headers.remove(Status::GRPC_STATUS_DETAILS);
                if status.add_header(headers).is_ok() {
                    resp.extensions_mut().insert(status);
                }
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Service, ServiceExt};

    /// tonic's own message, as its decoder writes it.
    fn tonic_refusal(found: usize, limit: usize) -> Status {
        Status::out_of_range(format!(
            "Error, decoded message length too large: found {found} bytes, the limit is: {limit} bytes"
        ))
    }

    #[test]
    fn tonic_s_refusal_becomes_resource_exhausted_naming_the_limit() {
        let s = rewrite(&tonic_refusal(67_108_869, 4_194_304), 4_194_304).unwrap();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(
            s.message(),
            "request: a message of 67108869 bytes is over server.max_message_bytes (4194304)"
        );
        let raft = rewrite(&tonic_refusal(70 << 20, 64 << 20), 4_194_304).unwrap();
        assert!(raft
            .message()
            .contains("this service's message limit (67108864)"));
        // Anything else is left alone.
        assert!(rewrite(&Status::out_of_range("start_revision: 3 is compacted"), 1).is_none());
        assert!(rewrite(&Status::internal(TONIC_TOO_LARGE), 1).is_none());
    }

    #[tokio::test]
    async fn the_layer_rewrites_the_trailers_only_answer_and_counts_it() {
        let metrics = RegistryMetrics::default();
        let inner = tower::service_fn(|req: http::Request<()>| async move {
            let status = if req.uri().path() == "/big" {
                tonic_refusal(9000, 4096)
            } else {
                Status::out_of_range("start_revision: compacted")
            };
            Ok::<_, std::convert::Infallible>(status.into_http::<()>())
        });
        let layer = MessageLimitLayer {
            max_message_bytes: 4096,
            metrics: metrics.clone(),
        };
        let mut svc = tower::Layer::layer(&layer, inner);
        let call = |path: &str| http::Request::builder().uri(path).body(()).unwrap();
        let big = svc.ready().await.unwrap().call(call("/big")).await.unwrap();
        let from_headers = Status::from_header_map(big.headers()).unwrap();
        assert_eq!(from_headers.code(), Code::ResourceExhausted);
        assert!(from_headers
            .message()
            .contains("9000 bytes is over server.max_message_bytes (4096)"));
        let other = svc
            .ready()
            .await
            .unwrap()
            .call(call("/other"))
            .await
            .unwrap();
        let kept = Status::from_header_map(other.headers()).unwrap();
        assert_eq!(kept.code(), Code::OutOfRange);
        let counted = metrics
            .rejections
            .get_or_create(&lodge_actors::registry::metrics::LimitLabels {
                limit: LABEL.into(),
            })
            .get();
        assert_eq!(counted, 1);
    }
}
