//! Client for an OpenAI-compatible chat-completions server (vLLM, llama.cpp server, Ollama).
//!
//! Only the two calls the gateway needs: `GET {url}/models` to tell whether the server is up, and a
//! non-streaming `POST {url}/chat/completions`. Connections are pooled and reused, since every job
//! goes to the same host and a TCP handshake per chunk would be wasted time.
//!
//! Plain `http://` only: an `https://` URL is refused by [`Backend::new`]. These servers usually
//! run next to the gateway or behind a local proxy, and a TLS stack is a heavy dependency for that;
//! https support can come later without changing this interface.
//!
//! The API key is sent as a bearer token and kept out of every `Debug` output and error message.
//! Credentials in the URL (`http://user:password@host/v1`) are sent as HTTP Basic authentication
//! instead, and the password is hidden wherever the URL is shown.

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::{json, Value};
use std::fmt;
use std::time::{Duration, Instant};

/// Answers larger than this are refused: a translation of one chunk is a few KiB, and a runaway
/// server must not make the gateway buffer without bound.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;
/// How much of an error body is kept: enough to show the server's reason, short enough for a log line.
const ERROR_BODY_CHARS: usize = 300;
/// Idle pooled connections are closed after this, before servers' own keep-alive limits usually hit.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// Where the backend is and how long to wait for it.
#[derive(Clone)]
pub struct BackendConfig {
    /// Base URL including the API prefix, e.g. `http://127.0.0.1:8000/v1`; paths are appended to it.
    pub url: String,
    /// Model name sent with every completion; the server decides what it means.
    pub model: String,
    /// Sent as `Authorization: Bearer ...` when set; never logged or shown by `Debug`.
    pub api_key: Option<String>,
    /// Upper bound for one whole completion request (connect, send, generate, read).
    pub timeout: Duration,
    /// Upper bound for one probe, kept short so an absent backend is noticed quickly.
    pub probe_timeout: Duration,
}

impl fmt::Debug for BackendConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendConfig")
            .field("url", &crate::redact::url_credentials(&self.url))
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("probe_timeout", &self.probe_timeout)
            .finish()
    }
}

/// A handle on one backend server; cheap to clone, clones share the connection pool.
#[derive(Clone)]
pub struct Backend {
    client: Client<HttpConnector, Full<Bytes>>,
    models_uri: Uri,
    completions_uri: Uri,
    model: String,
    auth: Option<HeaderValue>,
    timeout: Duration,
    probe_timeout: Duration,
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("completions_uri", &self.completions_uri)
            .field("model", &self.model)
            .field("api_key", &self.auth.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("probe_timeout", &self.probe_timeout)
            .finish()
    }
}

/// One successful completion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// `choices[0].message.content` as the server returned it.
    pub text: String,
    /// Token counts from the answer's `usage`; 0 when the server did not report them.
    pub prompt_tokens: u64,
    /// See `prompt_tokens`.
    pub completion_tokens: u64,
    /// See `prompt_tokens`; the server's own total, not a sum computed here.
    pub total_tokens: u64,
    /// Wall time of the whole request as seen by the client.
    pub elapsed: Duration,
}

/// Why a request to the backend failed; the variants separate "try later" from "fix the config".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendError {
    /// No HTTP answer at all: connection refused or reset, DNS failure, broken body.
    Unreachable(String),
    /// No complete answer within this limit.
    Timeout(Duration),
    /// The server answered with a non-success status; `body` is truncated to a few hundred chars.
    Status {
        /// The HTTP status code.
        code: u16,
        /// The start of the answer's body, for the operator to see the server's reason.
        body: String,
    },
    /// A success status but an answer this client cannot use.
    BadAnswer(String),
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::Unreachable(why) => write!(f, "translation backend unreachable: {why}"),
            BackendError::Timeout(limit) => {
                write!(f, "translation backend did not answer within {limit:?}")
            }
            BackendError::Status { code, body } if body.is_empty() => {
                write!(f, "translation backend answered HTTP {code}")
            }
            BackendError::Status { code, body } => {
                write!(f, "translation backend answered HTTP {code}: {body}")
            }
            BackendError::BadAnswer(why) => {
                write!(f, "translation backend gave an unusable answer: {why}")
            }
        }
    }
}

impl std::error::Error for BackendError {}

impl Backend {
    /// Checks the configuration and sets up the connection pool; connects to nothing yet.
    pub fn new(cfg: BackendConfig) -> Result<Self, String> {
        let url = cfg.url.trim();
        // Every message below shows the URL without its password.
        let shown = crate::redact::url_credentials(url);
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("https://") {
            return Err(format!(
                "translation.backend_url {shown:?}: https is not supported yet; \
                 use a plain http:// URL (for example through a local TLS-terminating proxy)"
            ));
        }
        if !lower.starts_with("http://") {
            return Err(format!(
                "translation.backend_url {shown:?}: expected an http:// URL such as http://127.0.0.1:8000/v1"
            ));
        }
        let (url, userinfo) = split_userinfo(url);
        let base = url.trim_end_matches('/');
        let parse = |path: &str| -> Result<Uri, String> {
            let uri: Uri = format!("{base}{path}")
                .parse()
                .map_err(|e| format!("translation.backend_url {shown:?}: {e}"))?;
            if uri.host().is_none_or(str::is_empty) {
                return Err(format!("translation.backend_url {shown:?}: no host"));
            }
            Ok(uri)
        };
        let models_uri = parse("/models")?;
        let completions_uri = parse("/chat/completions")?;
        let header = match (cfg.api_key.as_deref().map(str::trim), userinfo) {
            (None | Some(""), None) => None,
            (Some(key), None) => Some(format!("Bearer {key}")),
            // hyper sends nothing of a URL's user part, so credentials there become HTTP Basic
            // authentication (a server behind a proxy that asks for it), rather than being
            // silently dropped.
            (None | Some(""), Some(userinfo)) => Some(format!(
                "Basic {}",
                crate::base64::encode(&percent_decode(userinfo))
            )),
            (Some(_), Some(_)) => {
                let why = "carries credentials and translation.api_key is set; use one of them";
                return Err(format!("translation.backend_url {shown:?}: {why}"));
            }
        };
        let auth = match header {
            None => None,
            Some(h) => {
                let mut value = HeaderValue::from_str(&h).map_err(|_| {
                    "translation credentials contain characters not allowed in an HTTP header"
                        .to_string()
                })?;
                // Keeps the credentials out of hyper's own debug output as well.
                value.set_sensitive(true);
                Some(value)
            }
        };
        let mut connector = HttpConnector::new();
        // Requests are small and latency matters more than packet count.
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Ok(Backend {
            client,
            models_uri,
            completions_uri,
            model: cfg.model,
            auth,
            timeout: cfg.timeout,
            probe_timeout: cfg.probe_timeout,
        })
    }

    /// Asks `GET {url}/models`; Ok with the listed model ids when the server answers 200 with JSON.
    ///
    /// A JSON answer without a `data` list still counts as up (some servers answer `{}`), with no ids.
    pub async fn probe(&self) -> Result<Vec<String>, BackendError> {
        let req = self.request(Method::GET, &self.models_uri, Bytes::new());
        let (status, body) = self.send(req, self.probe_timeout).await?;
        if status != StatusCode::OK {
            return Err(status_error(status, &body));
        }
        let answer: Value = serde_json::from_slice(&body)
            .map_err(|e| BadAnswerFor::Models.error(format!("not JSON ({e})"), &body))?;
        let ids = answer
            .get("data")
            .and_then(Value::as_array)
            .map(|models| {
                models
                    .iter()
                    .filter_map(|m| m.get("id").and_then(Value::as_str).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Ok(ids)
    }

    /// Sends one system + user message pair and returns the model's reply.
    ///
    /// Temperature 0 so that a retried chunk translates the same way. The request is abandoned
    /// after the smaller of `deadline` and the configured timeout.
    pub async fn complete(
        &self,
        system: &str,
        user: &str,
        deadline: Duration,
    ) -> Result<Completion, BackendError> {
        let started = Instant::now();
        let body = json!({
            "model": self.model,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
            ],
            "temperature": 0,
            "stream": false,
        });
        let req = self.request(
            Method::POST,
            &self.completions_uri,
            Bytes::from(body.to_string()),
        );
        let (status, body) = self.send(req, deadline.min(self.timeout)).await?;
        if !status.is_success() {
            return Err(status_error(status, &body));
        }
        let answer: Value = serde_json::from_slice(&body)
            .map_err(|e| BadAnswerFor::Completion.error(format!("not JSON ({e})"), &body))?;
        let text = answer
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                BadAnswerFor::Completion.error("no choices[0].message.content".into(), &body)
            })?
            .to_string();
        let usage = |field: &str| {
            answer
                .get("usage")
                .and_then(|u| u.get(field))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        Ok(Completion {
            text,
            prompt_tokens: usage("prompt_tokens"),
            completion_tokens: usage("completion_tokens"),
            total_tokens: usage("total_tokens"),
            elapsed: started.elapsed(),
        })
    }

    fn request(&self, method: Method, uri: &Uri, body: Bytes) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri.clone();
        let headers = req.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(auth) = &self.auth {
            headers.insert(AUTHORIZATION, auth.clone());
        }
        req
    }

    /// Sends and reads the whole answer, everything under one deadline so a server that trickles
    /// its body cannot hold a job past it.
    async fn send(
        &self,
        req: Request<Full<Bytes>>,
        limit: Duration,
    ) -> Result<(StatusCode, Bytes), BackendError> {
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| BackendError::Unreachable(error_chain(&e)))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    BackendError::Unreachable(format!("reading the answer: {}", error_chain(&*e)))
                })?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| BackendError::Timeout(limit))?
    }
}

/// Which call an unusable answer came from, so the message says what was expected.
enum BadAnswerFor {
    Models,
    Completion,
}

impl BadAnswerFor {
    fn error(self, why: String, body: &[u8]) -> BackendError {
        let call = match self {
            BadAnswerFor::Models => "GET /models",
            BadAnswerFor::Completion => "POST /chat/completions",
        };
        BackendError::BadAnswer(format!("{call}: {why}; answer began {:?}", excerpt(body)))
    }
}

fn status_error(status: StatusCode, body: &[u8]) -> BackendError {
    BackendError::Status {
        code: status.as_u16(),
        body: excerpt(body),
    }
}

/// The start of a body as text, cut on a char boundary.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(ERROR_BODY_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

/// hyper's errors say little at the top ("client error (Connect)"); the cause is further down.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// `url` without the user part of its authority, and that user part (`user:password`) if any.
fn split_userinfo(url: &str) -> (String, Option<&str>) {
    let Some(i) = url.find("://") else {
        return (url.to_string(), None);
    };
    let tail = &url[i + 3..];
    let end = tail.find(['/', '?', '#']).unwrap_or(tail.len());
    match tail[..end].rfind('@') {
        Some(at) => (
            format!("{}{}", &url[..i + 3], &tail[at + 1..]),
            Some(&tail[..at]),
        ),
        None => (url.to_string(), None),
    }
}

/// `%XX` escapes turned back into bytes (a password may hold `@`, `:` or `/` only escaped).
fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::body::Incoming;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper::Response;
    use hyper_util::rt::TokioIo;
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use tokio::net::TcpListener;

    /// How the test server answers.
    #[derive(Clone, Copy)]
    enum Mode {
        Ok,
        NoUsage,
        Fail500,
        /// Never answers a completion: the handler waits on a future that never resolves.
        Hang,
    }

    async fn handle(
        mode: Mode,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let path = req.uri().path().to_string();
        let auth = req
            .headers()
            .get(AUTHORIZATION)
            .map(|v| v.to_str().unwrap().to_string());
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let reply = |code: u16, body: String| {
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            *resp.status_mut() = StatusCode::from_u16(code).unwrap();
            Ok(resp)
        };
        if let Mode::Fail500 = mode {
            return reply(500, format!("{{\"error\":\"{}\"}}", "x".repeat(1000)));
        }
        match path.as_str() {
            "/v1/models" => reply(
                200,
                json!({"object": "list", "data": [{"id": "m1"}, {"id": "m2"}]}).to_string(),
            ),
            "/v1/chat/completions" => {
                if let Mode::Hang = mode {
                    std::future::pending::<()>().await;
                }
                let req: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(req["model"], "test-model");
                assert_eq!(req["stream"], false);
                assert_eq!(req["temperature"], 0);
                assert_eq!(req["messages"][0]["role"], "system");
                let user = req["messages"][1]["content"].as_str().unwrap();
                let text = format!("{} [{}]", user.to_uppercase(), auth.unwrap_or_default());
                let mut answer = json!({
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
                });
                if let Mode::Ok = mode {
                    answer["usage"] =
                        json!({"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12});
                }
                reply(200, answer.to_string())
            }
            _ => reply(404, "not found".into()),
        }
    }

    async fn server(mode: Mode) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(mode, req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        addr
    }

    fn backend(url: String, api_key: Option<&str>) -> Backend {
        Backend::new(BackendConfig {
            url,
            model: "test-model".into(),
            api_key: api_key.map(str::to_string),
            timeout: Duration::from_secs(60),
            probe_timeout: Duration::from_secs(60),
        })
        .unwrap()
    }

    #[tokio::test]
    async fn completion_returns_text_and_usage() {
        let addr = server(Mode::Ok).await;
        let b = backend(format!("http://{addr}/v1/"), Some("sekrit"));
        assert_eq!(b.probe().await.unwrap(), vec!["m1", "m2"]);
        let done = b
            .complete("be a translator", "hello ⟦0⟧", Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(done.text, "HELLO ⟦0⟧ [Bearer sekrit]");
        assert_eq!(
            (
                done.prompt_tokens,
                done.completion_tokens,
                done.total_tokens
            ),
            (7, 5, 12)
        );
        // A second request over the pooled connection works as well.
        let again = b.complete("s", "x", Duration::from_secs(60)).await.unwrap();
        assert_eq!(again.text, "X [Bearer sekrit]");
    }

    #[tokio::test]
    async fn missing_usage_counts_zero_tokens() {
        let addr = server(Mode::NoUsage).await;
        let b = backend(format!("http://{addr}/v1"), None);
        let done = b
            .complete("s", "abc", Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(done.text, "ABC []");
        assert_eq!(
            (
                done.prompt_tokens,
                done.completion_tokens,
                done.total_tokens
            ),
            (0, 0, 0)
        );
    }

    #[tokio::test]
    async fn error_status_is_reported_with_truncated_body() {
        let addr = server(Mode::Fail500).await;
        let b = backend(format!("http://{addr}/v1"), None);
        match b.complete("s", "u", Duration::from_secs(60)).await {
            Err(BackendError::Status { code: 500, body }) => {
                assert!(body.starts_with("{\"error\":\"xxx"));
                assert!(body.chars().count() <= ERROR_BODY_CHARS + 1);
            }
            other => panic!("expected a 500, got {other:?}"),
        }
        assert!(matches!(
            b.probe().await,
            Err(BackendError::Status { code: 500, .. })
        ));
    }

    #[tokio::test]
    async fn closed_port_is_unreachable() {
        // Bind then drop: the port was free a moment ago and nothing listens on it now.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let b = backend(format!("http://{addr}/v1"), None);
        let err = b.probe().await.unwrap_err();
        assert!(matches!(err, BackendError::Unreachable(_)), "{err:?}");
        let err = b
            .complete("s", "u", Duration::from_secs(60))
            .await
            .unwrap_err();
        assert!(matches!(err, BackendError::Unreachable(_)), "{err:?}");
        assert!(err.to_string().contains("unreachable"), "{err}");
    }

    #[tokio::test]
    async fn hanging_server_hits_the_deadline() {
        let addr = server(Mode::Hang).await;
        let b = backend(format!("http://{addr}/v1"), None);
        let deadline = Duration::from_millis(200);
        let err = b.complete("s", "u", deadline).await.unwrap_err();
        assert_eq!(err, BackendError::Timeout(deadline));
        // The configured timeout wins when it is the smaller one.
        let short = Backend::new(BackendConfig {
            timeout: Duration::from_millis(100),
            ..config(format!("http://{addr}/v1"))
        })
        .unwrap();
        let err = short
            .complete("s", "u", Duration::from_secs(3600))
            .await
            .unwrap_err();
        assert_eq!(err, BackendError::Timeout(Duration::from_millis(100)));
    }

    fn config(url: String) -> BackendConfig {
        BackendConfig {
            url,
            model: "test-model".into(),
            api_key: Some("sekrit".into()),
            timeout: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn https_and_bad_urls_are_refused() {
        let err = Backend::new(config("https://llm.example/v1".into())).unwrap_err();
        assert!(err.contains("translation.backend_url"), "{err}");
        assert!(err.contains("https is not supported yet"), "{err}");
        assert!(Backend::new(config("ftp://x/v1".into())).is_err());
        assert!(Backend::new(config("http:///v1".into())).is_err());
        assert!(Backend::new(config("http://127.0.0.1:8000/v1".into())).is_ok());
    }

    #[tokio::test]
    async fn url_credentials_become_basic_auth_and_stay_out_of_messages() {
        let addr = server(Mode::Ok).await;
        // p@ss:/ escaped, as a URL must carry it.
        let b = backend(format!("http://bob:p%40ss%3A%2F@{addr}/v1"), None);
        assert!(!format!("{b:?}").contains("p%40ss"), "{b:?}");
        let done = b
            .complete("s", "hi", Duration::from_secs(60))
            .await
            .unwrap();
        // base64("bob:p@ss:/")
        assert_eq!(done.text, "HI [Basic Ym9iOnBAc3M6Lw==]");
        let mut both = config(format!("http://bob:hunter2@{addr}/v1"));
        let err = Backend::new(both.clone()).unwrap_err();
        assert!(err.contains("use one of them"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        both.url = "https://bob:hunter2@llm.example/v1".into();
        let err = Backend::new(both).unwrap_err();
        assert!(err.contains("bob:<redacted>@llm.example"), "{err}");
    }

    #[test]
    fn percent_escapes_decode_and_malformed_ones_stay() {
        assert_eq!(percent_decode("a%40b%zz%4"), b"a@b%zz%4");
    }

    #[test]
    fn api_key_stays_out_of_debug_output() {
        let cfg = config("http://127.0.0.1:1/v1".into());
        assert!(!format!("{cfg:?}").contains("sekrit"));
        let b = Backend::new(cfg).unwrap();
        assert!(!format!("{b:?}").contains("sekrit"));
    }
}
