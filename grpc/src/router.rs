//! The router's adapters: `lodge.router.v1.Tunnel` (user and agent streams, agents' listen
//! streams) and `lodge.router.v1.RouterControl`.
//!
//! A tunnel call is authenticated, its init frame checked, and the hub asked where the session
//! runs. Here: the call joins the session actor, and once paired its request stream is pumped into
//! the other side's queue while its response reads its own ([`lodge_actors::router::pipe`]).
//! Elsewhere: the call is relayed to the owner over the internal gRPC, frames passing through
//! unchanged, so any member can take any side.

use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use lodge_actors::router::hub::{Found, List, Listen, Locate, Lookup, SessionTable};
use lodge_actors::router::pipe::{gone, SideHandle};
use lodge_actors::router::session::{Inspect, Join, Joiner, SessionView, Terminate};
use lodge_actors::router::{
    check_id, OpKind, Operation, OwnerRecord, Payload, RouterError, RouterHub, RouterSettings, Side,
};
use lodge_actors::{ActorRef, SendError};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Caller, Role};
use crate::members::Members;
use crate::pb::router::router_control_client::RouterControlClient;
use crate::pb::router::tunnel_client::TunnelClient;
use crate::pb::router::{
    frame, user_init, Eof, Frame, GetSessionInfoRequest, ListSessionsRequest, ListSessionsResponse,
    ListenRequest, Paired, Protocol, SessionInfo, SessionOffer, TerminateSessionRequest,
    TerminateSessionResponse, UserInit,
};

/// Metadata key marking a call relayed by another member (holding its id): never relayed again.
pub const RELAYED: &str = "lodge-relayed";

/// Response header of a user's tunnel: how long, in milliseconds, the session's owner waits for an
/// agent (`router.rendezvous_timeout_ms`), so that the user's end can say so while it waits.
pub const RENDEZVOUS_TIMEOUT: &str = "lodge-rendezvous-timeout-ms";

impl Payload for Frame {
    fn payload_len(&self) -> usize {
        self.data.len()
    }

    fn eof() -> Self {
        Frame {
            control: Some(frame::Control::Eof(Eof {})),
            ..Default::default()
        }
    }

    fn abort_reason(&self) -> Option<String> {
        match &self.control {
            Some(frame::Control::Abort(a)) => Some(if a.reason.is_empty() {
                "no reason given".to_string()
            } else {
                a.reason.clone()
            }),
            _ => None,
        }
    }
}

/// The gRPC status of a router error.
pub fn status(e: RouterError) -> Status {
    match e {
        RouterError::Invalid(m) => Status::invalid_argument(m),
        RouterError::WrongWorkflow(m) => Status::permission_denied(m),
        RouterError::Duplicate(m) => Status::already_exists(m),
        RouterError::NotFound(m) => Status::not_found(m),
        RouterError::TimedOut(m) => Status::deadline_exceeded(m),
        RouterError::Terminated(m) => Status::aborted(m),
        RouterError::Stalled(m) => Status::resource_exhausted(m),
        RouterError::Unavailable(m) => Status::unavailable(m),
        RouterError::Internal(m) => Status::internal(m),
    }
}

/// Checks a user's init frame; answers the operation it asks for.
pub fn check_user_init(init: &UserInit) -> Result<Operation, RouterError> {
    check_id("session_key", &init.session_key)?;
    check_id("workflow_id", &init.workflow_id)?;
    let invalid = |m: &str| Err(RouterError::Invalid(m.to_string()));
    match &init.operation {
        None => invalid("operation: required (exec, port_forward or rsync)"),
        Some(user_init::Operation::Exec(e)) => {
            if e.command.is_empty() || e.command[0].is_empty() {
                return invalid("exec.command: required");
            }
            Ok(Operation {
                kind: OpKind::Exec,
                detail: shorten(&e.command.join(" ")),
            })
        }
        Some(user_init::Operation::PortForward(p)) => {
            let proto = match Protocol::try_from(p.protocol) {
                Ok(Protocol::Tcp) => "tcp",
                Ok(Protocol::Udp) => "udp",
                _ => return invalid("port_forward.protocol: required (TCP or UDP)"),
            };
            if !(1..=65535).contains(&p.port) {
                return Err(RouterError::Invalid(format!(
                    "port_forward.port: {} is out of range 1..65535",
                    p.port
                )));
            }
            Ok(Operation {
                kind: OpKind::PortForward,
                detail: format!("{proto}:{}", p.port),
            })
        }
        Some(user_init::Operation::Rsync(r)) => {
            if r.command.len() < 2 || r.command[0] != "rsync" || r.command[1] != "--server" {
                return invalid("rsync.command: must start with \"rsync\" \"--server\"");
            }
            Ok(Operation {
                kind: OpKind::Rsync,
                detail: shorten(&r.command.join(" ")),
            })
        }
    }
}

fn shorten(s: &str) -> String {
    const MAX: usize = 200;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn role_of(kind: OpKind) -> Role {
    match kind {
        OpKind::Exec => Role::Exec,
        OpKind::PortForward => Role::PortForward,
        OpKind::Rsync => Role::Rsync,
    }
}

/// What both router services need.
#[derive(Clone)]
pub struct RouterContext {
    pub hub: ActorRef<RouterHub<Frame>>,
    pub table: SessionTable<Frame>,
    pub settings: Arc<RouterSettings>,
    pub peers: Arc<Members>,
    /// Bound on a control call and on the set-up steps of a tunnel.
    pub request_timeout: Duration,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

impl RouterContext {
    /// The caller the authentication layer found.
    fn caller<T>(&self, req: &Request<T>) -> Caller {
        Caller::of(req.extensions())
    }

    fn me(&self) -> u64 {
        self.settings.member_id
    }
}

/// A response stream of frames.
pub type FrameStream = Pin<Box<dyn Stream<Item = Result<Frame, Status>> + Send>>;

/// `lodge.router.v1.Tunnel`.
pub struct TunnelService {
    cx: RouterContext,
}

impl TunnelService {
    /// The service over `cx`.
    pub fn new(cx: RouterContext) -> Self {
        Self { cx }
    }
}

/// A side's call, as the adapter passes it along.
struct Arrival {
    side: Side,
    session_key: String,
    workflow_id: String,
    operation: Option<Operation>,
    /// The init frame as received (sent on unchanged when relayed).
    first: Frame,
    /// What the other side gets once paired.
    greeting: Frame,
    inbound: Streaming<Frame>,
    relayed: bool,
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl TunnelService {
    async fn first_frame(&self, inbound: &mut Streaming<Frame>) -> Result<Frame, Status> {
        match tokio::time::timeout(self.cx.request_timeout, inbound.message()).await {
            Err(_) => Err(Status::deadline_exceeded(
                "no init frame within the request timeout",
            )),
            Ok(Err(s)) => Err(s),
            Ok(Ok(None)) => Err(Status::invalid_argument(
                "the stream ended before its init frame",
            )),
            Ok(Ok(Some(f))) => Ok(f),
        }
    }

    async fn arrive(&self, a: Arrival) -> Result<Response<FrameStream>, Status> {
        let cx = &self.cx;
        // A session may end between the hub's answer and our join: ask again.
        for _ in 0..3 {
            let route = cx
                .hub
                .send_timeout(
                    Locate {
                        session_key: a.session_key.clone(),
                        workflow_id: a.workflow_id.clone(),
                        operation: a.operation.clone(),
                        relayed: a.relayed,
                        _frames: PhantomData,
                    },
                    cx.request_timeout,
                )
                .await
                .map_err(|e| status(e.into()))?
                .map_err(status)?;
            let session = match route {
                lodge_actors::router::Route::Local(s) => s,
                lodge_actors::router::Route::Remote { owner } => {
                    return self.relay(owner, a).await;
                }
            };
            let (handle, delivery) = SideHandle::new(cx.settings.queue_frames);
            let (paired_tx, paired_rx) = oneshot::channel();
            let joiner = Joiner {
                side: a.side,
                workflow_id: a.workflow_id.clone(),
                operation: a.operation.clone(),
                handle,
                greeting: a.greeting.clone(),
                paired: paired_tx,
            };
            match session.send_timeout(Join(joiner), cx.request_timeout).await {
                Ok(Ok(())) => {}
                Ok(Err(RouterError::NotFound(_)))
                | Err(lodge_actors::SendError::NotRunning)
                | Err(lodge_actors::SendError::Closed) => continue,
                Ok(Err(e)) => return Err(status(e)),
                Err(e) => return Err(status(e.into())),
            }
            let side = a.side;
            let inbound = a.inbound;
            tokio::spawn(async move {
                if let Ok(pump) = paired_rx.await {
                    pump.run(inbound.map(move |r| r.map_err(|_| gone(side))))
                        .await;
                }
            });
            let out: FrameStream = Box::pin(delivery.map(|r| r.map_err(status)));
            return Ok(Response::new(out));
        }
        Err(Status::unavailable(format!(
            "session {} kept ending while joining; retry",
            a.session_key
        )))
    }

    /// Sends the call on to the session's owner and passes frames both ways unchanged.
    async fn relay(&self, owner: u64, a: Arrival) -> Result<Response<FrameStream>, Status> {
        let channel = self.cx.peers.member(owner).await?;
        let (tx, rx) = mpsc::channel(self.cx.settings.queue_frames.max(1));
        tx.send(a.first)
            .await
            .map_err(|_| Status::internal("relay queue closed"))?;
        let mut req = Request::new(ReceiverStream::new(rx));
        let me = self.cx.me().to_string();
        req.metadata_mut()
            .insert(RELAYED, me.parse().expect("digits"));
        if let Some(auth) = a.authorization {
            req.metadata_mut().insert("authorization", auth);
        }
        let mut client = TunnelClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let opened = tokio::time::timeout(self.cx.request_timeout, async {
            match a.side {
                Side::User => client.user(req).await,
                Side::Agent => client.agent(req).await,
            }
        })
        .await
        .map_err(|_| {
            Status::unavailable(format!(
                "member {owner}, which owns session {}, did not answer in time",
                a.session_key
            ))
        })?;
        let opened = opened.map_err(|s| relay_error(owner, s))?;
        let rendezvous_timeout = opened.metadata().get(RENDEZVOUS_TIMEOUT).cloned();
        let upstream = opened
            .into_inner()
            .map(move |r| r.map_err(|s| relay_error(owner, s)));
        let mut inbound = a.inbound;
        let side = a.side;
        tokio::spawn(async move {
            // A clean end of the caller's stream half-closes upstream; a broken one is told to the
            // owner as an abort (a half-close would look like a finished direction).
            loop {
                let next = tokio::select! {
                    // The upstream call is over: nothing more to carry.
                    _ = tx.closed() => return,
                    f = inbound.next() => f,
                };
                match next {
                    Some(Ok(f)) => {
                        if tx.send(f).await.is_err() {
                            return;
                        }
                    }
                    Some(Err(s)) => {
                        let reason = format!(
                            "the {}'s connection to the relaying member broke ({})",
                            side.as_str(),
                            s.message()
                        );
                        let _ = tx.send(crate::router_client::abort(reason)).await;
                        return;
                    }
                    None => return,
                }
            }
        });
        let out: FrameStream = Box::pin(upstream);
        let mut response = Response::new(out);
        if let Some(ms) = rendezvous_timeout {
            response.metadata_mut().insert(RENDEZVOUS_TIMEOUT, ms);
        }
        Ok(response)
    }
}

/// A relayed call's error: a broken connection to the owner (which tonic reports as UNKNOWN,
/// INTERNAL or CANCELLED) is UNAVAILABLE, as documented; other codes pass unchanged.
fn relay_error(owner: u64, s: Status) -> Status {
    match s.code() {
        tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled
            if !s.metadata().contains_key(crate::members::ANSWERED_BY) =>
        {
            Status::unavailable(format!(
                "the connection to member {owner}, which owns the session, broke: {}",
                s.message()
            ))
        }
        _ => s,
    }
}

/// A tunnel call's opening: who calls, whether another member relayed it, its token (to relay
/// it on), and its first frame.
struct Opening {
    caller: Caller,
    relayed: bool,
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    inbound: Streaming<Frame>,
    first: Frame,
}

impl Opening {
    fn arrival(
        self,
        side: Side,
        session_key: String,
        workflow_id: String,
        operation: Option<Operation>,
        greeting: Paired,
    ) -> Arrival {
        Arrival {
            side,
            session_key,
            workflow_id,
            operation,
            first: self.first,
            greeting: Frame {
                control: Some(frame::Control::Paired(greeting)),
                ..Default::default()
            },
            inbound: self.inbound,
            relayed: self.relayed,
            authorization: self.authorization,
        }
    }
}

impl TunnelService {
    /// Takes a tunnel call's caller (found by the auth layer) and reads its first frame.
    async fn open(&self, req: Request<Streaming<Frame>>) -> Result<Opening, Status> {
        let caller = self.cx.caller(&req);
        let relayed = req.metadata().contains_key(RELAYED);
        let authorization = authorization(req.metadata());
        let mut inbound = req.into_inner();
        let first = self.first_frame(&mut inbound).await?;
        Ok(Opening {
            caller,
            relayed,
            authorization,
            inbound,
            first,
        })
    }
}

fn authorization(
    md: &MetadataMap,
) -> Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> {
    md.get("authorization").cloned()
}

#[tonic::async_trait]
impl crate::pb::router::tunnel_server::Tunnel for TunnelService {
    type UserStream = FrameStream;
    type AgentStream = FrameStream;
    type ListenStream = Pin<Box<dyn Stream<Item = Result<SessionOffer, Status>> + Send>>;

    async fn user(
        &self,
        req: Request<Streaming<Frame>>,
    ) -> Result<Response<Self::UserStream>, Status> {
        let o = self.open(req).await?;
        let Some(frame::Control::UserInit(init)) = &o.first.control else {
            return Err(Status::invalid_argument(
                "the first frame of a user must be user_init",
            ));
        };
        let operation = check_user_init(init).map_err(status)?;
        o.caller
            .require(role_of(operation.kind), Some(&init.workflow_id))?;
        let (key, workflow) = (init.session_key.clone(), init.workflow_id.clone());
        let greeting = Paired {
            init: Some(init.clone()),
        };
        let mut response = self
            .arrive(o.arrival(Side::User, key, workflow, Some(operation), greeting))
            .await?;
        // A relayed call already carries the owner's figure, which is the one that applies.
        let headers = response.metadata_mut();
        if !headers.contains_key(RENDEZVOUS_TIMEOUT) {
            let ms = self.cx.settings.rendezvous_timeout.as_millis().to_string();
            headers.insert(RENDEZVOUS_TIMEOUT, ms.parse().expect("digits"));
        }
        Ok(response)
    }

    async fn agent(
        &self,
        req: Request<Streaming<Frame>>,
    ) -> Result<Response<Self::AgentStream>, Status> {
        let o = self.open(req).await?;
        let Some(frame::Control::AgentInit(init)) = &o.first.control else {
            return Err(Status::invalid_argument(
                "the first frame of an agent must be agent_init",
            ));
        };
        check_id("session_key", &init.session_key).map_err(status)?;
        check_id("workflow_id", &init.workflow_id).map_err(status)?;
        o.caller.require(Role::Agent, Some(&init.workflow_id))?;
        let (key, workflow) = (init.session_key.clone(), init.workflow_id.clone());
        self.arrive(o.arrival(Side::Agent, key, workflow, None, Paired { init: None }))
            .await
    }

    async fn listen(
        &self,
        req: Request<ListenRequest>,
    ) -> Result<Response<Self::ListenStream>, Status> {
        let caller = self.cx.caller(&req);
        let workflow_id = req.into_inner().workflow_id;
        check_id("workflow_id", &workflow_id).map_err(status)?;
        caller.require(Role::Agent, Some(&workflow_id))?;
        let (tx, rx) = mpsc::channel(lodge_actors::router::hub::OFFER_QUEUE);
        self.cx
            .hub
            .send_timeout(Listen { workflow_id, tx }, self.cx.request_timeout)
            .await
            .map_err(|e| status(e.into()))?;
        // A listen stream never ends by itself; it must not hold up a drain.
        let offers = crate::kv::stream_until_shutdown(self.cx.shutdown.clone(), |out| async move {
            let mut rx = rx;
            while let Some(o) = rx.recv().await {
                let offer = SessionOffer {
                    session_key: o.session_key,
                    workflow_id: o.workflow_id,
                    operation: o.operation.as_str().to_string(),
                };
                if out.send(Ok(offer)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(offers))
    }
}

/// `lodge.router.v1.RouterControl`.
pub struct ControlService {
    cx: RouterContext,
}

impl ControlService {
    /// The service over `cx`.
    pub fn new(cx: RouterContext) -> Self {
        Self { cx }
    }

    async fn lookup(&self, key: &str) -> Result<Found<Frame>, Status> {
        self.cx
            .hub
            .send_timeout(
                Lookup {
                    session_key: key.to_string(),
                    _frames: PhantomData,
                },
                self.cx.request_timeout,
            )
            .await
            .map_err(|e| status(e.into()))?
            .map_err(status)
    }

    /// A control call for a session owned elsewhere, sent to its owner once.
    /// Checks that the caller of a control call about session `key` has `role`, and finds the
    /// session.
    async fn admin_lookup<T>(
        &self,
        req: &Request<T>,
        role: Role,
        key: &str,
    ) -> Result<(Caller, Found<Frame>), Status> {
        let caller = self.cx.caller(req);
        caller.require(role, None)?;
        check_id("session_key", key).map_err(status)?;
        Ok((caller, self.lookup(key).await?))
    }

    /// The owner's control client and the call to send it.
    async fn to_owner<T>(
        &self,
        owner: u64,
        md: &MetadataMap,
        msg: T,
    ) -> Result<(RouterControlClient<crate::peer::PeerChannel>, Request<T>), Status> {
        let onward = self.onward(md, msg)?;
        let channel = self.cx.peers.member(owner).await?;
        Ok((RouterControlClient::new(channel), onward))
    }

    fn onward<T>(&self, md: &MetadataMap, msg: T) -> Result<Request<T>, Status> {
        if md.contains_key(RELAYED) {
            return Err(Status::unavailable(
                "the session's owner changed while the call was relayed; retry",
            ));
        }
        let mut req = Request::new(msg);
        req.set_timeout(self.cx.request_timeout);
        req.metadata_mut()
            .insert(RELAYED, self.cx.me().to_string().parse().expect("digits"));
        if let Some(a) = authorization(md) {
            req.metadata_mut().insert("authorization", a);
        }
        Ok(req)
    }
}

impl ControlService {
    /// A local session's view; a session that just ended is NOT_FOUND, a busy one UNAVAILABLE.
    async fn inspect(
        &self,
        s: &ActorRef<lodge_actors::router::SessionActor<Frame>>,
        key: &str,
    ) -> Result<SessionView, Status> {
        match s.send_timeout(Inspect, self.cx.request_timeout).await {
            Ok(Some(v)) => Ok(v),
            Ok(None) | Err(SendError::NotRunning | SendError::Closed) => Err(not_found(key)),
            Err(e) => Err(status(e.into())),
        }
    }
}

fn not_found(key: &str) -> Status {
    Status::not_found(format!(
        "session_key: no session {}",
        lodge_actors::quote::echo(key)
    ))
}

fn info_of(v: SessionView, owner: u64) -> SessionInfo {
    SessionInfo {
        session_key: v.session_key,
        workflow_id: v.workflow_id,
        active: v.paired,
        created_at: Some(timestamp(v.created_at_ms)),
        operation_type: v
            .operation
            .as_ref()
            .map_or(String::new(), |o| o.kind.as_str().to_string()),
        owner,
        user_connected: v.user_connected,
        agent_connected: v.agent_connected,
        bytes_user_to_agent: v.bytes_user_to_agent,
        bytes_agent_to_user: v.bytes_agent_to_user,
        detail: v.operation.map_or(String::new(), |o| o.detail),
    }
}

/// What a record alone says of a session on another member (its live figures are the owner's:
/// ask GetSessionInfo).
fn info_of_record(r: OwnerRecord) -> SessionInfo {
    SessionInfo {
        session_key: r.session_key,
        workflow_id: r.workflow_id,
        active: false,
        created_at: Some(timestamp(r.created_at_ms)),
        operation_type: r
            .operation
            .as_ref()
            .map_or(String::new(), |o| o.kind.as_str().to_string()),
        owner: r.owner,
        detail: r.operation.map_or(String::new(), |o| o.detail),
        ..Default::default()
    }
}

fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

#[tonic::async_trait]
impl crate::pb::router::router_control_server::RouterControl for ControlService {
    async fn get_session_info(
        &self,
        req: Request<GetSessionInfoRequest>,
    ) -> Result<Response<SessionInfo>, Status> {
        let key = req.get_ref().session_key.clone();
        let (caller, found) = self.admin_lookup(&req, Role::Observer, &key).await?;
        match found {
            Found::Local(s) => {
                let v = self.inspect(&s, &key).await?;
                // A token limited to some workflows does not learn of the others' sessions.
                if !caller.may_use(&v.workflow_id) {
                    return Err(not_found(&key));
                }
                Ok(Response::new(info_of(v, self.cx.me())))
            }
            Found::Remote(r) if !caller.may_use(&r.workflow_id) => Err(not_found(&key)),
            Found::Remote(r) => {
                let (mut owner, onward) = self
                    .to_owner(r.owner, req.metadata(), req.get_ref().clone())
                    .await?;
                owner.get_session_info(onward).await
            }
            Found::Missing => Err(not_found(&key)),
        }
    }

    async fn list_sessions(
        &self,
        req: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        let caller = self.cx.caller(&req);
        caller.require(Role::Observer, None)?;
        let listing = self
            .cx
            .hub
            .send_timeout(
                List {
                    workflow_id: req.get_ref().workflow_id.clone(),
                    _frames: PhantomData,
                },
                self.cx.request_timeout,
            )
            .await
            .map_err(|e| status(e.into()))?
            .map_err(status)?;
        let mut sessions = Vec::new();
        for s in listing.local {
            if let Ok(v) = self.inspect(&s, "").await {
                sessions.push(info_of(v, self.cx.me()));
            }
        }
        sessions.extend(listing.remote.into_iter().map(info_of_record));
        sessions.retain(|s| caller.may_use(&s.workflow_id));
        sessions.sort_by(|a, b| a.session_key.cmp(&b.session_key));
        Ok(Response::new(ListSessionsResponse { sessions }))
    }

    async fn terminate_session(
        &self,
        req: Request<TerminateSessionRequest>,
    ) -> Result<Response<TerminateSessionResponse>, Status> {
        let key = req.get_ref().session_key.clone();
        let (caller, found) = self.admin_lookup(&req, Role::Admin, &key).await?;
        match found {
            Found::Local(s) => {
                if !caller.may_use(&self.inspect(&s, &key).await?.workflow_id) {
                    return Err(not_found(&key));
                }
                let reason = req.get_ref().reason.clone();
                match s
                    .send_timeout(Terminate { reason }, self.cx.request_timeout)
                    .await
                {
                    Ok(terminated) => Ok(Response::new(TerminateSessionResponse { terminated })),
                    Err(SendError::NotRunning | SendError::Closed) => Err(not_found(&key)),
                    // It may still be applied: not "not found".
                    Err(e) => Err(status(e.into())),
                }
            }
            Found::Remote(r) if !caller.may_use(&r.workflow_id) => Err(not_found(&key)),
            Found::Remote(r) => {
                let (mut owner, onward) = self
                    .to_owner(r.owner, req.metadata(), req.get_ref().clone())
                    .await?;
                owner.terminate_session(onward).await
            }
            Found::Missing => Err(not_found(&key)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::router::{Exec, PortForward, Rsync};

    fn init(op: Option<user_init::Operation>) -> UserInit {
        UserInit {
            session_key: "s-1".into(),
            workflow_id: "w".into(),
            operation: op,
        }
    }

    fn invalid(i: UserInit) -> String {
        match check_user_init(&i) {
            Err(RouterError::Invalid(m)) => m,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn init_frames_are_checked_field_by_field() {
        assert!(invalid(init(None)).starts_with("operation: required"));
        let mut i = init(Some(user_init::Operation::Exec(Exec::default())));
        assert_eq!(invalid(i.clone()), "exec.command: required");
        i.session_key.clear();
        assert_eq!(invalid(i), "session_key: required");
        let pf = |protocol, port| {
            init(Some(user_init::Operation::PortForward(PortForward {
                protocol,
                port,
            })))
        };
        assert!(invalid(pf(Protocol::Unspecified as i32, 80)).starts_with("port_forward.protocol"));
        assert!(invalid(pf(Protocol::Tcp as i32, 0)).starts_with("port_forward.port: 0"));
        assert!(invalid(pf(Protocol::Udp as i32, 70000)).contains("70000"));
        assert_eq!(
            check_user_init(&pf(Protocol::Udp as i32, 53))
                .unwrap()
                .detail,
            "udp:53"
        );
        let rsync = |cmd: &[&str]| {
            init(Some(user_init::Operation::Rsync(Rsync {
                command: cmd.iter().map(|s| s.to_string()).collect(),
            })))
        };
        assert!(invalid(rsync(&["sh", "-c", "id"])).starts_with("rsync.command"));
        assert_eq!(
            check_user_init(&rsync(&["rsync", "--server", "-r", "."]))
                .unwrap()
                .kind,
            OpKind::Rsync
        );
    }

    #[test]
    fn every_router_error_has_its_code() {
        use tonic::Code;
        let cases = [
            (RouterError::Invalid("x".into()), Code::InvalidArgument),
            (
                RouterError::WrongWorkflow("x".into()),
                Code::PermissionDenied,
            ),
            (RouterError::Duplicate("x".into()), Code::AlreadyExists),
            (RouterError::TimedOut("x".into()), Code::DeadlineExceeded),
            (RouterError::Terminated("x".into()), Code::Aborted),
            (RouterError::Stalled("x".into()), Code::ResourceExhausted),
            (RouterError::Unavailable("x".into()), Code::Unavailable),
        ];
        for (e, code) in cases {
            assert_eq!(status(e).code(), code);
        }
    }
}
