//! A fake OpenAI-compatible chat-completions server for end-to-end translation tests.
//!
//! Its "translation" is deterministic: the user message upper-cased, which leaves `⟦n⟧`
//! placeholders alone, with `usage` counting words so token accounting can be checked exactly.
//! It runs on its own thread and tokio runtime because the tests are plain `#[test]` functions,
//! and stops when dropped.

#![allow(dead_code)]

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::sync::{oneshot, watch};

/// A running fake backend.
pub struct FakeLlm {
    /// Where it listens; the base URL is `http://{addr}/v1`.
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

struct State {
    down: AtomicBool,
    /// Completion requests wait while this is true; a watch so that releasing wakes them all.
    hold: watch::Sender<bool>,
    completions: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl FakeLlm {
    /// Starts listening on an ephemeral port of 127.0.0.1.
    pub fn start() -> FakeLlm {
        let state = Arc::new(State {
            down: AtomicBool::new(false),
            hold: watch::channel(false).0,
            completions: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let shared = state.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("fake LLM runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("fake LLM bind");
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let accept = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let state = shared.clone();
                        tokio::spawn(async move {
                            let svc = service_fn(move |req| handle(state.clone(), req));
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stop_rx => {}
                }
            });
            // Dropping the runtime here cancels connections still open, held requests included.
        });
        let addr = addr_rx.recv().expect("fake LLM did not start");
        FakeLlm {
            addr,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// The base URL to configure as the backend URL.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// While down, `/v1/models` and completions answer 503.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// While held, completion requests wait (counted in `in_flight`) until hold is turned off.
    pub fn set_hold(&self, hold: bool) {
        self.state.hold.send_replace(hold);
    }

    /// Completion requests received so far, answered or not.
    pub fn completions(&self) -> usize {
        self.state.completions.load(Ordering::SeqCst)
    }

    /// Completion requests currently being held or served.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// The most completion requests ever in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Counts a request in flight for as long as it lives, also when the client goes away mid-hold.
struct InFlight(Arc<State>);

impl InFlight {
    fn new(state: Arc<State>) -> InFlight {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn reply(status: StatusCode, body: Value) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

fn unavailable() -> Result<Response<Full<Bytes>>, Infallible> {
    reply(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": {"message": "fake LLM is down", "type": "unavailable"}}),
    )
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let post = req.method() == hyper::Method::POST;
    match (post, path.as_str()) {
        (false, "/v1/models") => {
            if state.down.load(Ordering::SeqCst) {
                return unavailable();
            }
            reply(
                StatusCode::OK,
                json!({"object": "list", "data": [{"id": "fake-model", "object": "model"}]}),
            )
        }
        (true, "/v1/chat/completions") => {
            state.completions.fetch_add(1, Ordering::SeqCst);
            let _in_flight = InFlight::new(state.clone());
            let Ok(body) = req.into_body().collect().await else {
                return reply(StatusCode::BAD_REQUEST, json!({"error": "unreadable body"}));
            };
            if state.down.load(Ordering::SeqCst) {
                return unavailable();
            }
            let mut hold = state.hold.subscribe();
            // Err only when the sender is gone, i.e. the server is shutting down.
            let _ = hold.wait_for(|held| !held).await;
            if state.down.load(Ordering::SeqCst) {
                return unavailable();
            }
            let Ok(request) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "body is not JSON"}),
                );
            };
            let user = request["messages"]
                .as_array()
                .and_then(|messages| messages.iter().rev().find(|m| m["role"] == "user"))
                .and_then(|m| m["content"].as_str())
                .unwrap_or("");
            let words = user.split_whitespace().count();
            reply(
                StatusCode::OK,
                json!({
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": 0,
                    "model": request["model"],
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": user.to_uppercase()},
                        "finish_reason": "stop",
                    }],
                    "usage": {
                        "prompt_tokens": words,
                        "completion_tokens": words,
                        "total_tokens": 2 * words,
                    },
                }),
            )
        }
        _ => reply(StatusCode::NOT_FOUND, json!({"error": "not found"})),
    }
}
