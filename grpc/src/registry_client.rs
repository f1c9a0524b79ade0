//! The registry client library: registers an application with a Lodge cluster, keeps the
//! registration alive with heartbeats, fails over between members, and offers the translation
//! calls with the registration's client id filled in.
//!
//! It replaces a Go client whose defects shaped this design:
//! - reconnecting is the normal path of one loop (connect, session, back off, next endpoint), not
//!   a branch guarded by a flag that something else can clear first (the loop is
//!   [`crate::reconnect`], shared with the module SDK's link to the balancer);
//! - the heartbeat interval is a value the loop reads for every beat, so a changed interval from
//!   any answer is used for the very next beat;
//! - translations run on their own RPCs over a cloned channel; registering again only swaps the
//!   client id, it never cancels or replaces what is in flight;
//! - the status callback is called by the background task with no lock held, so it may call
//!   back into the client.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::client::Channel;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Status};

use crate::client::ClientTls;
use crate::pb::registry::registry_client::RegistryClient as RegistryGrpc;
use crate::pb::registry::translation_client::TranslationClient as TranslationGrpc;
use crate::pb::registry::{
    HeartbeatRequest, HeartbeatResponse, RegisterClientRequest, RegisterClientResponse,
    TitleCheckRequest, TitleCheckResponse, TranslateChunk, TranslateRequest, TranslateResponse,
    UnregisterClientRequest,
};
use crate::reconnect::{
    connect_bounded, connect_owned, member_failed, note_endpoint, Backoff, Beat, Conn, Failure,
    Reconnector, Session,
};

/// What the client needs to find the cluster and to identify itself.
///
/// `client_name`, `namespace` and `instance_id` together are the identity: registering the same
/// identity again replaces the previous registration server-side, which is what lets the client
/// re-register after a failover without leaving a stale registration behind.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Cluster members as `HOST:PORT`, tried in order and then round again.
    pub endpoints: Vec<String>,
    /// TLS settings; all empty means plaintext.
    pub tls: ClientTls,
    /// The application's name (part of the identity).
    pub client_name: String,
    /// The application's version, for operators listing clients.
    pub client_version: String,
    /// The namespace the client belongs to (part of the identity).
    pub namespace: String,
    /// Which running copy this is (part of the identity); defaults to `hostname-pid`.
    pub instance_id: String,
    /// Free-form labels sent with the registration.
    pub metadata: HashMap<String, String>,
    /// Bound on each registry call and on waiting for a registration before a translation.
    pub call_timeout: Duration,
    /// First delay after a failure; it doubles per consecutive failure.
    pub backoff_initial: Duration,
    /// Ceiling of the doubling delay, so a long outage is still probed regularly.
    pub backoff_max: Duration,
}

impl ClientOptions {
    /// Options with the defaults (5 s calls, backoff from 1 s to 30 s, `hostname-pid` instance),
    /// so that a caller only states what is specific to it.
    pub fn new(endpoints: Vec<String>, name: &str, namespace: &str) -> Self {
        ClientOptions {
            endpoints,
            tls: ClientTls::default(),
            client_name: name.to_string(),
            client_version: String::new(),
            namespace: namespace.to_string(),
            instance_id: default_instance_id(),
            metadata: HashMap::new(),
            call_timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// `hostname-pid`: stable for the life of the process, distinct between copies on one host.
fn default_instance_id() -> String {
    format!("{}-{}", hostname(), std::process::id())
}

/// This machine's host name ("unknown" when neither the kernel nor `HOSTNAME` gives one).
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "unknown".to_string())
}

/// How current the registration is, from the heartbeats missed in a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// No heartbeat missed.
    Healthy,
    /// One or two heartbeats missed: the registration is probably still alive.
    Warning,
    /// Three or more missed: the registration may have expired.
    Error,
}

impl Health {
    fn of(missed: u32) -> Health {
        match missed {
            0 => Health::Healthy,
            1 | 2 => Health::Warning,
            _ => Health::Error,
        }
    }
}

/// A snapshot of the client, as given to the status callback and by [`RegistryClient::status`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientStatus {
    /// Derived from `missed`.
    pub health: Health,
    /// The id of the current registration; `None` until the first one succeeds.
    pub client_id: Option<String>,
    /// The member the client talks to (or last tried).
    pub endpoint: Option<String>,
    /// Whether the last call to `endpoint` got an answer.
    pub connected: bool,
    /// The heartbeat interval the server last asked for; zero until the first answer, and while
    /// it is zero nothing counts as missed (there is nothing to measure against yet).
    pub interval: Duration,
    /// Whole intervals without a successful heartbeat beyond the first, counted only once more
    /// than two intervals have passed (one interval of slack absorbs a slow answer).
    pub missed: u32,
    /// How many times the client registered (re-registrations included).
    pub registrations: u64,
    /// Why the last attempt to connect, register or heartbeat failed; `None` once one succeeds.
    /// Before the first registration this tells "still trying" from "trying again".
    pub last_error: Option<String>,
}

impl Default for ClientStatus {
    fn default() -> Self {
        ClientStatus {
            health: Health::Healthy,
            client_id: None,
            endpoint: None,
            connected: false,
            interval: Duration::ZERO,
            missed: 0,
            registrations: 0,
            last_error: None,
        }
    }
}

/// Called on every change of health, client id, endpoint, connected state or last error. It is called from
/// the background task with no lock held, so it may call [`RegistryClient::status`]; it should
/// not block for long, since heartbeats wait for it.
pub type StatusCallback = Arc<dyn Fn(&ClientStatus) + Send + Sync>;

struct Shared {
    opts: ClientOptions,
    status: watch::Sender<ClientStatus>,
    /// The worker's connection, for the translation calls.
    conn: Mutex<Option<Conn>>,
}

/// A registered client of a Lodge cluster; see the module documentation.
///
/// Dropping it stops the background task without unregistering (the registration then expires
/// by itself); [`RegistryClient::shutdown`] unregisters at once.
pub struct RegistryClient {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl RegistryClient {
    /// Starts the background task that connects, registers and heartbeats. Must be called
    /// within a tokio runtime. Returns at once; use [`RegistryClient::wait_registered`] to wait
    /// for the registration.
    pub fn start(opts: ClientOptions, on_status: Option<StatusCallback>) -> RegistryClient {
        let (status, _) = watch::channel(ClientStatus::default());
        let shared = Arc::new(Shared {
            opts,
            status,
            conn: Mutex::new(None),
        });
        let (stop, stop_rx) = watch::channel(false);
        let worker = Worker {
            shared: shared.clone(),
            on_status,
            cur: ClientStatus::default(),
            last_success: Instant::now(),
        };
        let task = tokio::spawn(worker.run(stop_rx));
        RegistryClient {
            shared,
            stop,
            task: Some(task),
        }
    }

    /// The current status (a copy, so holding it blocks nothing).
    pub fn status(&self) -> ClientStatus {
        self.shared.status.borrow().clone()
    }

    /// A receiver of status changes, for callers that prefer awaiting to a callback.
    pub fn subscribe(&self) -> watch::Receiver<ClientStatus> {
        self.shared.status.subscribe()
    }

    /// The id of the current registration, if there is one yet.
    pub fn client_id(&self) -> Option<String> {
        self.shared.status.borrow().client_id.clone()
    }

    /// Waits until the client is registered and returns its id; an error after `timeout`.
    pub async fn wait_registered(&self, timeout: Duration) -> Result<String, String> {
        let mut rx = self.shared.status.subscribe();
        let wait = async {
            rx.wait_for(|s| s.client_id.is_some())
                .await
                .map(|s| s.client_id.clone().unwrap_or_default())
                .map_err(|_| "registry client stopped".to_string())
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(format!("not registered within {timeout:?}")),
        }
    }

    /// The client id and channel for a translation call, waiting up to the call timeout for
    /// the first registration.
    async fn ready(&self) -> Result<(String, Conn), Status> {
        let t = self.shared.opts.call_timeout;
        let id = self.wait_registered(t).await.map_err(Status::unavailable)?;
        let conn = self
            .shared
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| Status::unavailable("no connection to the registry"))?;
        Ok((id, conn))
    }

    /// A fresh channel to the endpoint after `conn`'s, for the one retry of a translation call.
    /// The background task's own connection is left alone: it fails over by its own rules.
    async fn next_channel(&self, conn: &Conn) -> Result<Channel, String> {
        let opts = &self.shared.opts;
        let ep = &opts.endpoints[(conn.idx + 1) % opts.endpoints.len()];
        connect_bounded(ep, &opts.tls, opts.call_timeout).await
    }

    /// Translates a title or document. `client_id` is filled in when empty. No deadline is set:
    /// a long document legitimately takes long. An UNAVAILABLE answer (typically the member is
    /// gone) is retried once on the next endpoint, which is safe since translating changes
    /// nothing.
    pub async fn translate(&self, mut req: TranslateRequest) -> Result<TranslateResponse, Status> {
        let (id, conn) = self.ready().await?;
        if req.client_id.is_empty() {
            req.client_id = id;
        }
        let first = TranslationGrpc::new(conn.channel.clone())
            .translate(req.clone())
            .await;
        match first {
            Err(s) if s.code() == Code::Unavailable => {
                let ch = self.next_channel(&conn).await.map_err(|_| s)?;
                TranslationGrpc::new(ch)
                    .translate(req)
                    .await
                    .map(|r| r.into_inner())
            }
            r => r.map(|r| r.into_inner()),
        }
    }

    /// Asks whether a title can be translated now. `client_id` is filled in when empty; the
    /// call is bounded by the call timeout and retried once on the next endpoint when
    /// UNAVAILABLE.
    pub async fn check_title(
        &self,
        mut req: TitleCheckRequest,
    ) -> Result<TitleCheckResponse, Status> {
        let (id, conn) = self.ready().await?;
        if req.client_id.is_empty() {
            req.client_id = id;
        }
        let t = self.shared.opts.call_timeout;
        let call = |ch: Channel, req: TitleCheckRequest| async move {
            bounded(t, TranslationGrpc::new(ch).check_title(timed(req, t))).await
        };
        match call(conn.channel.clone(), req.clone()).await {
            Err(s) if s.code() == Code::Unavailable => {
                let ch = self.next_channel(&conn).await.map_err(|_| s)?;
                call(ch, req).await
            }
            r => r,
        }
    }

    /// Translates chunks as they come. The first chunk's `client_id` is filled in when empty.
    /// Not retried: the chunks already sent are gone with the failed stream, and buffering a
    /// whole document to replay it would defeat streaming.
    pub async fn translate_stream(
        &self,
        chunks: impl Stream<Item = TranslateChunk> + Send + 'static,
    ) -> Result<tonic::Streaming<TranslateChunk>, Status> {
        let (id, conn) = self.ready().await?;
        let mut id = Some(id);
        let chunks = chunks.map(move |mut c| {
            if let Some(id) = id.take() {
                if c.client_id.is_empty() {
                    c.client_id = id;
                }
            }
            c
        });
        TranslationGrpc::new(conn.channel)
            .translate_stream(chunks)
            .await
            .map(|r| r.into_inner())
    }

    /// Stops heartbeating and unregisters the current id (best effort, bounded by the call
    /// timeout), so the registration ends now instead of when its lease runs out.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(mut task) = self.task.take() {
            // The task ends by itself after at most one bounded unregister call; the margin
            // only guards against a wedged connect.
            let limit = self.shared.opts.call_timeout * 2 + Duration::from_secs(1);
            if tokio::time::timeout(limit, &mut task).await.is_err() {
                task.abort();
            }
        }
    }
}

impl Drop for RegistryClient {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A request with a `grpc-timeout`, so the server can give up when the client has.
pub(crate) fn timed<T>(msg: T, t: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(t);
    r
}

/// Bounds a call on the client side too: `grpc-timeout` relies on the server, and a member that
/// stopped answering is exactly the case to guard against.
pub(crate) async fn bounded<T>(
    t: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(t, call).await {
        Ok(r) => r.map(|r| r.into_inner()),
        Err(_) => Err(Status::deadline_exceeded(format!("no answer within {t:?}"))),
    }
}

/// A failed call as the status shows it: what was tried, the code and the server's message.
fn failure(what: &str, s: &Status) -> String {
    if s.message().is_empty() {
        format!("{what}: {:?}", s.code())
    } else {
        format!("{what}: {:?}: {}", s.code(), s.message())
    }
}

/// The interval an answer asks for, preferring the finer field; `None` when it sets neither.
fn interval_of(ms: i64, secs: i32) -> Option<Duration> {
    if ms > 0 {
        Some(Duration::from_millis(ms as u64))
    } else if secs > 0 {
        Some(Duration::from_secs(secs as u64))
    } else {
        None
    }
}

/// The background task's session (see [`crate::reconnect`], which connects, backs off and
/// fails over). It owns the working copy of the status; the watch channel gets a copy of it
/// whenever it changes.
struct Worker {
    shared: Arc<Shared>,
    on_status: Option<StatusCallback>,
    cur: ClientStatus,
    last_success: Instant,
}

impl Worker {
    fn opts(&self) -> &ClientOptions {
        &self.shared.opts
    }

    /// Connects, registers and heartbeats until stopped; unregisters when shutdown was asked
    /// for (a dropped client leaves its registration to expire).
    async fn run(mut self, stop: watch::Receiver<bool>) {
        let o = self.opts();
        let backoff = Backoff::new(o.backoff_initial, o.backoff_max);
        let mut r = Reconnector::new(o.endpoints.clone(), backoff, stop);
        r.run(&mut self).await;
        if r.shutdown_asked() {
            self.unregister().await;
        }
    }

    /// Recomputes `missed` and health from the time since the last successful heartbeat.
    fn watchdog(&mut self) {
        let i = self.cur.interval;
        let e = self.last_success.elapsed();
        self.cur.missed = if !i.is_zero() && e > i * 2 {
            (e.as_nanos() / i.as_nanos()).saturating_sub(1) as u32
        } else {
            0
        };
        self.cur.health = Health::of(self.cur.missed);
        self.publish();
    }

    /// Publishes the working status if it changed, then calls the callback (for changes it
    /// cares about) from the local copy, so no lock is held during the call.
    fn publish(&mut self) {
        let prev = self.shared.status.borrow().clone();
        if prev == self.cur {
            return;
        }
        self.shared.status.send_replace(self.cur.clone());
        let c = &self.cur;
        let notable = prev.health != c.health
            || prev.client_id != c.client_id
            || prev.endpoint != c.endpoint
            || prev.connected != c.connected
            || prev.last_error != c.last_error;
        if notable {
            if let Some(cb) = &self.on_status {
                cb(&self.cur);
            }
        }
    }

    /// A heartbeat or registration succeeded: the registration is current again.
    fn succeeded(&mut self) {
        self.last_success = Instant::now();
        self.cur.connected = true;
        self.cur.last_error = None;
        self.watchdog();
    }

    /// Ends the registration at once; best effort, since it expires by itself anyway.
    async fn unregister(&mut self) {
        let Some(id) = self.cur.client_id.clone() else {
            return;
        };
        let conn = self
            .shared
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(conn) = conn {
            let t = self.opts().call_timeout;
            let req = UnregisterClientRequest { client_id: id };
            let _ = bounded(
                t,
                RegistryGrpc::new(conn.channel).unregister_client(timed(req, t)),
            )
            .await;
        }
    }
}

/// Registers when there is no id yet or the server asks for it. With an id already, the first
/// thing on a new member is a heartbeat with that id: registrations are replicated, so the
/// member usually knows it.
impl Session for Worker {
    type Conn = Channel;
    type Registered = Result<RegisterClientResponse, Status>;
    type Beaten = Result<HeartbeatResponse, Status>;

    fn connect(
        &self,
        endpoint: &str,
    ) -> impl Future<Output = Result<Channel, String>> + Send + 'static {
        connect_owned(endpoint, &self.opts().tls, self.opts().call_timeout)
    }

    fn on_endpoint(&mut self, endpoint: &str) {
        if note_endpoint(&mut self.cur.endpoint, endpoint) {
            self.publish();
        }
    }

    fn on_connected(&mut self, idx: usize, channel: &Channel) {
        Conn::store(&self.shared.conn, idx, channel);
    }

    fn needs_register(&mut self) -> bool {
        self.cur.client_id.is_none()
    }

    fn register(
        &mut self,
        channel: &Channel,
    ) -> impl Future<Output = Self::Registered> + Send + 'static {
        let o = self.opts();
        let req = RegisterClientRequest {
            client_name: o.client_name.clone(),
            client_version: o.client_version.clone(),
            namespace: o.namespace.clone(),
            metadata: o.metadata.clone(),
            registered_at: Some(std::time::SystemTime::now().into()),
            instance_id: o.instance_id.clone(),
        };
        let (mut g, t) = (RegistryGrpc::new(channel.clone()), o.call_timeout);
        async move { bounded(t, g.register_client(timed(req, t))).await }
    }

    fn registered(&mut self, answer: Self::Registered) -> Result<(), Failure> {
        match answer {
            Ok(r) if r.success && !r.client_id.is_empty() => {
                self.cur.client_id = Some(r.client_id);
                self.cur.registrations += 1;
                if let Some(i) = interval_of(r.heartbeat_interval_ms, r.heartbeat_interval_seconds)
                {
                    self.cur.interval = i;
                }
                self.succeeded();
                Ok(())
            }
            // Refused: the member answered, so it is not a reason to leave it; back off and try
            // again (the refusal may be transient, e.g. no quorum yet).
            Ok(r) => Err(Failure {
                switch: false,
                why: format!("registration refused: {}", r.message),
            }),
            Err(s) => Err(Failure {
                switch: member_failed(&s),
                why: failure("registering", &s),
            }),
        }
    }

    fn beat(&mut self, channel: &Channel) -> impl Future<Output = Self::Beaten> + Send + 'static {
        let req = HeartbeatRequest {
            client_id: self.cur.client_id.clone().unwrap_or_default(),
            client_name: self.opts().client_name.clone(),
            sent_at: Some(std::time::SystemTime::now().into()),
            metadata: HashMap::new(),
        };
        let (mut g, t) = (RegistryGrpc::new(channel.clone()), self.opts().call_timeout);
        async move { bounded(t, g.heartbeat(timed(req, t))).await }
    }

    fn beaten(&mut self, answer: Self::Beaten) -> Beat {
        match answer {
            Ok(r) => {
                // Any answer may change the interval, and the next beat uses it.
                if let Some(i) = interval_of(r.heartbeat_interval_ms, r.heartbeat_interval_seconds)
                {
                    self.cur.interval = i;
                }
                if r.re_register_required {
                    self.cur.connected = true;
                    self.publish();
                    return Beat::Register;
                }
                if r.success {
                    self.succeeded();
                    Beat::Ok
                } else {
                    self.cur.connected = true;
                    self.cur.last_error = Some(format!("heartbeat refused: {}", r.message));
                    self.watchdog();
                    Beat::Missed
                }
            }
            Err(s) if s.code() == Code::NotFound => Beat::Register,
            Err(s) if member_failed(&s) => Beat::Fail(Failure {
                switch: true,
                why: failure("heartbeat", &s),
            }),
            // Any other error counts as a missed beat; the member is up, so stay.
            Err(s) => {
                self.cur.last_error = Some(failure("heartbeat", &s));
                self.watchdog();
                Beat::Missed
            }
        }
    }

    fn interval(&self) -> Duration {
        self.cur.interval
    }

    fn on_failure(&mut self, why: String) {
        self.cur.connected = false;
        self.cur.last_error = Some(why);
        self.watchdog();
    }

    /// Every wait ticks the watchdog, so health degrades while a call hangs, not only after it
    /// fails.
    fn tick(&self) -> Option<Duration> {
        Some(if self.cur.interval.is_zero() {
            Duration::from_secs(1)
        } else {
            (self.cur.interval / 4).max(Duration::from_millis(5))
        })
    }

    fn on_tick(&mut self) {
        self.watchdog();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::registry::registry_server::{Registry, RegistryServer};
    use crate::pb::registry::translation_server::{Translation, TranslationServer};
    use crate::pb::registry::{
        ClientInfo, GetClientRequest, HeartbeatResponse, ListClientsRequest, ListClientsResponse,
        RegisterClientResponse, UnregisterClientResponse,
    };
    use std::pin::Pin;
    use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
    use tokio::sync::{mpsc, oneshot, Semaphore};
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::{Request, Response};

    /// What a mock server saw, in order; tests synchronise on these.
    #[derive(Debug, Clone, PartialEq)]
    enum Seen {
        Register {
            server: usize,
            id: String,
            instance: String,
        },
        Beat {
            server: usize,
            id: String,
        },
        Unregister {
            server: usize,
            id: String,
        },
        TranslateStarted {
            id: String,
        },
    }

    struct MockState {
        server: usize,
        interval_ms: AtomicI64,
        re_register_once: AtomicBool,
        // While true, heartbeats wait (until it turns false or the caller gives up).
        hold_beats: watch::Sender<bool>,
        next_id: Arc<AtomicU64>,
        release_translate: Semaphore,
        events: mpsc::UnboundedSender<Seen>,
    }

    #[derive(Clone)]
    struct Mock(Arc<MockState>);

    impl Mock {
        fn new(server: usize, interval_ms: i64, events: mpsc::UnboundedSender<Seen>) -> Mock {
            Mock(Arc::new(MockState {
                server,
                interval_ms: AtomicI64::new(interval_ms),
                re_register_once: AtomicBool::new(false),
                hold_beats: watch::channel(false).0,
                next_id: Arc::new(AtomicU64::new(server as u64 * 1000 + 1)),
                release_translate: Semaphore::new(0),
                events,
            }))
        }
    }

    #[tonic::async_trait]
    impl Registry for Mock {
        async fn register_client(
            &self,
            r: Request<RegisterClientRequest>,
        ) -> Result<Response<RegisterClientResponse>, Status> {
            let r = r.into_inner();
            let id = format!("c{}", self.0.next_id.fetch_add(1, Ordering::SeqCst));
            let _ = self.0.events.send(Seen::Register {
                server: self.0.server,
                id: id.clone(),
                instance: r.instance_id,
            });
            Ok(Response::new(RegisterClientResponse {
                client_id: id,
                success: true,
                heartbeat_interval_ms: self.0.interval_ms.load(Ordering::SeqCst),
                ..Default::default()
            }))
        }

        async fn heartbeat(
            &self,
            r: Request<HeartbeatRequest>,
        ) -> Result<Response<HeartbeatResponse>, Status> {
            let _ = self.0.events.send(Seen::Beat {
                server: self.0.server,
                id: r.into_inner().client_id,
            });
            let mut hold = self.0.hold_beats.subscribe();
            let _ = hold.wait_for(|h| !*h).await;
            let again = self.0.re_register_once.swap(false, Ordering::SeqCst);
            Ok(Response::new(HeartbeatResponse {
                success: !again,
                re_register_required: again,
                heartbeat_interval_ms: self.0.interval_ms.load(Ordering::SeqCst),
                ..Default::default()
            }))
        }

        async fn unregister_client(
            &self,
            r: Request<UnregisterClientRequest>,
        ) -> Result<Response<UnregisterClientResponse>, Status> {
            let _ = self.0.events.send(Seen::Unregister {
                server: self.0.server,
                id: r.into_inner().client_id,
            });
            Ok(Response::new(UnregisterClientResponse {
                success: true,
                message: String::new(),
            }))
        }

        async fn list_clients(
            &self,
            _: Request<ListClientsRequest>,
        ) -> Result<Response<ListClientsResponse>, Status> {
            Err(Status::unimplemented("mock"))
        }

        async fn get_client(
            &self,
            _: Request<GetClientRequest>,
        ) -> Result<Response<ClientInfo>, Status> {
            Err(Status::unimplemented("mock"))
        }
    }

    type ChunkStream = Pin<Box<dyn Stream<Item = Result<TranslateChunk, Status>> + Send>>;

    #[tonic::async_trait]
    impl Translation for Mock {
        async fn check_title(
            &self,
            r: Request<TitleCheckRequest>,
        ) -> Result<Response<TitleCheckResponse>, Status> {
            Ok(Response::new(TitleCheckResponse {
                ready: true,
                message: r.into_inner().client_id,
                estimated_time_seconds: 1,
            }))
        }

        async fn translate(
            &self,
            r: Request<TranslateRequest>,
        ) -> Result<Response<TranslateResponse>, Status> {
            let r = r.into_inner();
            let _ = self.0.events.send(Seen::TranslateStarted {
                id: r.client_id.clone(),
            });
            // Held until the test lets it finish, to be in flight across a re-registration.
            let _permit = self.0.release_translate.acquire().await;
            Ok(Response::new(TranslateResponse {
                job_id: r.client_id,
                success: true,
                translated_title: "titre".into(),
                ..Default::default()
            }))
        }

        type TranslateStreamStream = ChunkStream;

        async fn translate_stream(
            &self,
            r: Request<tonic::Streaming<TranslateChunk>>,
        ) -> Result<Response<ChunkStream>, Status> {
            // Echoes each chunk with the client_id it arrived with.
            let s = r.into_inner().map(|c| c);
            Ok(Response::new(Box::pin(s)))
        }
    }

    struct Server {
        addr: String,
        stop: Option<oneshot::Sender<()>>,
        task: JoinHandle<()>,
    }

    impl Server {
        async fn stop(mut self) {
            let _ = self.stop.take().unwrap().send(());
            let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
            self.task.abort();
        }
    }

    async fn serve(mock: Mock) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(RegistryServer::new(mock.clone()))
                .add_service(TranslationServer::new(mock))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = rx.await;
                })
                .await;
        });
        Server {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// An address with nothing listening (bound, then released).
    async fn dead_addr() -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().to_string()
    }

    fn opts(endpoints: Vec<String>) -> ClientOptions {
        let mut o = ClientOptions::new(endpoints, "glooscap", "wiki");
        o.instance_id = "test-1".into();
        o.call_timeout = Duration::from_secs(2);
        o.backoff_initial = Duration::from_millis(20);
        o.backoff_max = Duration::from_millis(200);
        o
    }

    /// The next event matching `want`, skipping others; fails after a generous bound.
    async fn next(rx: &mut mpsc::UnboundedReceiver<Seen>, want: impl Fn(&Seen) -> bool) -> Seen {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let e = rx.recv().await.expect("mock servers gone");
                if want(&e) {
                    return e;
                }
            }
        })
        .await
        .expect("expected event did not come")
    }

    fn is_register(e: &Seen) -> bool {
        matches!(e, Seen::Register { .. })
    }

    const WAIT: Duration = Duration::from_secs(20);

    #[tokio::test]
    async fn registry_client_registers_then_heartbeats_with_its_id() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let srv = serve(Mock::new(1, 50, tx)).await;
        let client = RegistryClient::start(opts(vec![srv.addr.clone()]), None);
        let Seen::Register { id, instance, .. } = next(&mut rx, is_register).await else {
            unreachable!()
        };
        assert_eq!(instance, "test-1");
        assert_eq!(client.wait_registered(WAIT).await.unwrap(), id);
        for _ in 0..3 {
            let e = next(&mut rx, |e| matches!(e, Seen::Beat { .. })).await;
            assert_eq!(
                e,
                Seen::Beat {
                    server: 1,
                    id: id.clone()
                }
            );
        }
        let s = client.status();
        assert_eq!(s.client_id.as_deref(), Some(id.as_str()));
        assert_eq!(s.endpoint.as_deref(), Some(srv.addr.as_str()));
        assert_eq!(s.interval, Duration::from_millis(50));
        assert_eq!(s.registrations, 1);
        assert!(s.connected);
        client.shutdown().await;
        srv.stop().await;
    }

    #[tokio::test]
    async fn registry_client_applies_interval_from_heartbeat_answer() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mock = Mock::new(1, 50, tx);
        let srv = serve(mock.clone()).await;
        let client = RegistryClient::start(opts(vec![srv.addr.clone()]), None);
        client.wait_registered(WAIT).await.unwrap();
        next(&mut rx, |e| matches!(e, Seen::Beat { .. })).await;
        mock.0.interval_ms.store(300, Ordering::SeqCst);
        let mut st = client.subscribe();
        tokio::time::timeout(
            WAIT,
            st.wait_for(|s| s.interval == Duration::from_millis(300)),
        )
        .await
        .unwrap()
        .unwrap();
        // The beat after the one that carried the change already waits the new interval.
        next(&mut rx, |e| matches!(e, Seen::Beat { .. })).await;
        let t0 = Instant::now();
        next(&mut rx, |e| matches!(e, Seen::Beat { .. })).await;
        assert!(
            t0.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t0.elapsed()
        );
        client.shutdown().await;
        srv.stop().await;
    }

    #[tokio::test]
    async fn registry_client_re_registers_without_breaking_translation_in_flight() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mock = Mock::new(1, 50, tx);
        let srv = serve(mock.clone()).await;
        let client = Arc::new(RegistryClient::start(opts(vec![srv.addr.clone()]), None));
        let id1 = client.wait_registered(WAIT).await.unwrap();
        let c = client.clone();
        let call = tokio::spawn(async move {
            c.translate(TranslateRequest {
                target_language: "fr".into(),
                ..Default::default()
            })
            .await
        });
        let started = next(&mut rx, |e| matches!(e, Seen::TranslateStarted { .. })).await;
        assert_eq!(started, Seen::TranslateStarted { id: id1.clone() });

        mock.0.re_register_once.store(true, Ordering::SeqCst);
        let Seen::Register { id: id2, .. } = next(&mut rx, is_register).await else {
            unreachable!()
        };
        assert_ne!(id1, id2);
        let mut st = client.subscribe();
        tokio::time::timeout(
            WAIT,
            st.wait_for(|s| s.client_id.as_deref() == Some(id2.as_str())),
        )
        .await
        .unwrap()
        .unwrap();
        // Heartbeats go on with the new id.
        let e = next(&mut rx, |e| matches!(e, Seen::Beat { .. })).await;
        assert_eq!(
            e,
            Seen::Beat {
                server: 1,
                id: id2.clone()
            }
        );
        assert_eq!(client.status().registrations, 2);

        mock.0.release_translate.add_permits(1);
        let r = tokio::time::timeout(WAIT, call)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(r.success);
        assert_eq!(r.job_id, id1);
        Arc::try_unwrap(client).ok().unwrap().shutdown().await;
        srv.stop().await;
    }

    #[tokio::test]
    async fn registry_client_skips_a_dead_first_endpoint() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let srv = serve(Mock::new(2, 50, tx)).await;
        let dead = dead_addr().await;
        let client = RegistryClient::start(opts(vec![dead, srv.addr.clone()]), None);
        let id = client.wait_registered(WAIT).await.unwrap();
        let e = next(&mut rx, |e| matches!(e, Seen::Beat { .. })).await;
        assert_eq!(e, Seen::Beat { server: 2, id });
        assert_eq!(client.status().endpoint.as_deref(), Some(srv.addr.as_str()));
        client.shutdown().await;
        srv.stop().await;
    }

    #[tokio::test]
    async fn registry_client_fails_over_keeping_its_id() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let a = serve(Mock::new(1, 50, tx.clone())).await;
        let b = serve(Mock::new(2, 50, tx)).await;
        let client = RegistryClient::start(opts(vec![a.addr.clone(), b.addr.clone()]), None);
        let id = client.wait_registered(WAIT).await.unwrap();
        next(&mut rx, |e| matches!(e, Seen::Beat { server: 1, .. })).await;
        a.stop().await;
        // The first thing on the new member is a heartbeat with the same id, no registration.
        let e = next(&mut rx, |e| {
            matches!(e, Seen::Beat { server: 2, .. } | Seen::Register { .. })
        })
        .await;
        assert_eq!(
            e,
            Seen::Beat {
                server: 2,
                id: id.clone()
            }
        );
        let s = client.status();
        assert_eq!(s.client_id, Some(id));
        assert_eq!(s.registrations, 1);
        assert_eq!(s.endpoint.as_deref(), Some(b.addr.as_str()));
        client.shutdown().await;
        b.stop().await;
    }

    #[tokio::test]
    async fn registry_client_re_registers_on_a_member_that_asks_for_it() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let a = serve(Mock::new(1, 50, tx.clone())).await;
        let b_mock = Mock::new(2, 50, tx);
        b_mock.0.re_register_once.store(true, Ordering::SeqCst);
        let b = serve(b_mock).await;
        let client = RegistryClient::start(opts(vec![a.addr.clone(), b.addr.clone()]), None);
        let id1 = client.wait_registered(WAIT).await.unwrap();
        a.stop().await;
        // Heartbeat with the old id first; the member does not know it, so register again with
        // the same identity and adopt the new id.
        let e = next(&mut rx, |e| matches!(e, Seen::Beat { server: 2, .. })).await;
        assert_eq!(
            e,
            Seen::Beat {
                server: 2,
                id: id1.clone()
            }
        );
        let Seen::Register {
            server,
            id: id2,
            instance,
        } = next(&mut rx, is_register).await
        else {
            unreachable!()
        };
        assert_eq!((server, instance.as_str()), (2, "test-1"));
        let e = next(&mut rx, |e| matches!(e, Seen::Beat { .. })).await;
        assert_eq!(
            e,
            Seen::Beat {
                server: 2,
                id: id2.clone()
            }
        );
        assert_eq!(client.client_id(), Some(id2));
        assert_eq!(client.status().registrations, 2);
        client.shutdown().await;
        b.stop().await;
    }

    #[tokio::test]
    async fn registry_client_reports_missed_beats_through_the_callback() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mock = Mock::new(1, 50, tx);
        let srv = serve(mock.clone()).await;
        let slot: Arc<std::sync::OnceLock<std::sync::Weak<RegistryClient>>> = Default::default();
        let (stx, mut srx) = mpsc::unbounded_channel::<(ClientStatus, ClientStatus)>();
        let cb_slot = slot.clone();
        let cb: StatusCallback = Arc::new(move |s: &ClientStatus| {
            // Calling back into the client from the callback must not deadlock.
            let inner = cb_slot
                .get()
                .and_then(|w| w.upgrade())
                .map(|c| c.status())
                .unwrap_or_else(|| s.clone());
            let _ = stx.send((s.clone(), inner));
        });
        let mut o = opts(vec![srv.addr.clone()]);
        o.call_timeout = Duration::from_secs(3);
        let client = Arc::new(RegistryClient::start(o, Some(cb)));
        let _ = slot.set(Arc::downgrade(&client));
        client.wait_registered(WAIT).await.unwrap();
        next(&mut rx, |e| matches!(e, Seen::Beat { .. })).await;

        mock.0.hold_beats.send_replace(true);
        let mut seen = Vec::new();
        tokio::time::timeout(WAIT, async {
            while let Some((s, inner)) = srx.recv().await {
                assert_eq!(
                    s, inner,
                    "status() inside the callback sees the reported status"
                );
                seen.push(s.health);
                if s.health == Health::Error {
                    break;
                }
            }
        })
        .await
        .expect("no Error reported");
        let w = seen
            .iter()
            .position(|h| *h == Health::Warning)
            .expect("Warning first");
        assert!(w < seen.len() - 1);

        // Answering again brings it back.
        mock.0.hold_beats.send_replace(false);
        tokio::time::timeout(WAIT, async {
            while let Some((s, _)) = srx.recv().await {
                if s.health == Health::Healthy && s.connected {
                    break;
                }
            }
        })
        .await
        .expect("never Healthy again");
        Arc::try_unwrap(client).ok().unwrap().shutdown().await;
        srv.stop().await;
    }

    #[tokio::test]
    async fn registry_client_shutdown_unregisters() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let srv = serve(Mock::new(1, 50, tx)).await;
        let client = RegistryClient::start(opts(vec![srv.addr.clone()]), None);
        let id = client.wait_registered(WAIT).await.unwrap();
        client.shutdown().await;
        let e = next(&mut rx, |e| matches!(e, Seen::Unregister { .. })).await;
        assert_eq!(e, Seen::Unregister { server: 1, id });
        srv.stop().await;
    }

    #[tokio::test]
    async fn registry_client_fills_client_id_in_translation_calls() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let srv = serve(Mock::new(1, 50, tx)).await;
        let client = RegistryClient::start(opts(vec![srv.addr.clone()]), None);
        // Not waiting for the registration: the calls wait for it themselves.
        let r = client
            .check_title(TitleCheckRequest {
                title: "Home".into(),
                language_tag: "fr".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let id = client.client_id().unwrap();
        assert_eq!(r.message, id);
        let chunks = tokio_stream::iter((0..3).map(|i| TranslateChunk {
            chunk_index: i,
            target_language: "fr".into(),
            ..Default::default()
        }));
        let mut out = client.translate_stream(chunks).await.unwrap();
        let mut ids = Vec::new();
        while let Some(c) = out.next().await {
            ids.push(c.unwrap().client_id);
        }
        assert_eq!(ids, vec![id, String::new(), String::new()]);
        client.shutdown().await;
        srv.stop().await;
    }
}
