//! The last guard on status messages: no `grpc-message` leaving the server is longer than
//! [`MAX_MESSAGE_BYTES`].
//!
//! Error messages repeat client values through `lodge_actors::quote::echo`, which keeps them
//! short; this layer catches whatever still grows (a message joining many reasons, an error text
//! from a library). Clients refuse response headers past a few KiB (HTTP/2 header list limits,
//! 8 to 16 KiB) and report RESOURCE_EXHAUSTED or INTERNAL instead of the call's own status; a cut
//! message keeps the status code and the beginning of the explanation.
//!
//! The message is percent-encoded on the wire (tonic's `Status::add_header`); it is decoded, cut
//! on a character boundary, and encoded again the same way, so that the client decodes valid
//! UTF-8 (cutting the encoded form could split a character and turn the status into UNKNOWN).

use crate::watched_body::{Watch, Watched};
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame};

/// The longest status message the server sends, in bytes before percent-encoding (at most three
/// times that on the wire).
pub const MAX_MESSAGE_BYTES: usize = 1024;

const GRPC_MESSAGE: &str = "grpc-message";

/// Caps status messages in response headers (trailers-only answers) and trailers.
#[derive(Clone, Copy, Default)]
pub struct StatusLimitLayer;

impl<S> tower::Layer<S> for StatusLimitLayer {
    type Service = StatusLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        StatusLimit { inner }
    }
}

/// See [`StatusLimitLayer`].
#[derive(Clone)]
pub struct StatusLimit<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for StatusLimit<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Unpin,
{
    type Response = http::Response<LimitedBody<ResBody>>;
    type Error = S::Error;
    type Future = crate::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let (mut parts, body) = fut.await?.into_parts();
            cap(&mut parts.headers);
            Ok(http::Response::from_parts(
                parts,
                Watched::new(body, CapTrailers),
            ))
        })
    }
}

/// A response body whose trailers get their status message capped.
pub type LimitedBody<B> = Watched<B, CapTrailers>;

/// Caps the status message in the trailers that pass.
pub struct CapTrailers;

impl Watch for CapTrailers {
    fn frame<D>(&mut self, frame: &mut Frame<D>) {
        if let Some(trailers) = frame.trailers_mut() {
            cap(trailers);
        }
    }
}

/// Shortens `grpc-message` in `headers` if its decoded text is over [`MAX_MESSAGE_BYTES`].
fn cap(headers: &mut HeaderMap) {
    let Some(v) = headers.get(GRPC_MESSAGE) else {
        return;
    };
    // Encoded, each byte takes 1 to 3; only a value this long can decode to too much.
    if v.len() <= MAX_MESSAGE_BYTES {
        return;
    }
    let text = String::from_utf8_lossy(&percent_decode(v.as_bytes())).into_owned();
    if text.len() <= MAX_MESSAGE_BYTES {
        return;
    }
    let shortened = shorten(&text);
    if let Ok(v) = HeaderValue::from_str(&percent_encode(&shortened)) {
        headers.insert(GRPC_MESSAGE, v);
    }
}

/// `text` cut to at most [`MAX_MESSAGE_BYTES`] bytes on a character boundary, with a note saying
/// how long it was.
fn shorten(text: &str) -> String {
    let note = format!("… (message cut: {} bytes)", text.len());
    let mut end = MAX_MESSAGE_BYTES - note.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{note}", &text[..end])
}

fn percent_decode(b: &[u8]) -> Vec<u8> {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Percent-encodes as the gRPC spec asks and tonic does: bytes outside printable ASCII, and
/// tonic's few extra characters (space, `"`, `#`, `%`, `<`, `>`, `` ` ``, `?`, `{`, `}`).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        if (0x20..0x7f).contains(&b) && !b" \"#%<>`?{}".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Service, ServiceExt};

    fn answer(status: tonic::Status) -> http::Response<http_body_util::Empty<bytes::Bytes>> {
        status.into_http()
    }

    async fn through_layer(status: tonic::Status) -> tonic::Status {
        let inner = tower::service_fn(move |_req: http::Request<()>| {
            let status = status.clone();
            async move { Ok::<_, std::convert::Infallible>(answer(status)) }
        });
        let mut svc = tower::Layer::layer(&StatusLimitLayer, inner);
        let req = http::Request::builder().uri("/x.Y/Z").body(()).unwrap();
        let resp = svc.ready().await.unwrap().call(req).await.unwrap();
        tonic::Status::from_header_map(resp.headers()).expect("a status")
    }

    #[tokio::test]
    async fn a_long_message_is_cut_keeping_its_code_and_a_short_one_is_untouched() {
        let short = tonic::Status::not_found("no route matches http path \"/a b\" ✓");
        let same = through_layer(short.clone()).await;
        assert_eq!(
            (same.code(), same.message()),
            (short.code(), short.message())
        );
        // Multi-byte characters around the cut, and characters tonic escapes.
        let long = format!("no route: {}", "é% ?".repeat(10_000));
        let cut = through_layer(tonic::Status::not_found(long.clone())).await;
        assert_eq!(cut.code(), tonic::Code::NotFound);
        assert!(
            cut.message().len() <= MAX_MESSAGE_BYTES,
            "{}",
            cut.message().len()
        );
        assert!(
            cut.message()
                .ends_with(&format!("… (message cut: {} bytes)", long.len())),
            "{}",
            cut.message()
        );
        let kept = cut.message().split('…').next().unwrap();
        assert!(long.starts_with(kept) && kept.len() > 900, "{kept}");
    }

    #[test]
    fn percent_coding_round_trips() {
        let text = "a b%c\"é\n{}?#<>`~";
        let encoded = percent_encode(text);
        assert!(encoded.is_ascii() && !encoded.contains(' '), "{encoded}");
        assert_eq!(percent_decode(encoded.as_bytes()), text.as_bytes());
        assert_eq!(percent_decode(b"50%"), b"50%");
        assert_eq!(percent_decode(b"%4"), b"%4");
        assert_eq!(percent_decode(b"%zz"), b"%zz");
    }
}
