//! One actor per session, at `/node/router/sessions/<key>`: who may join, pairing, the rendezvous
//! and idle timeouts, termination. Frames never pass through it (see [`super::pipe`]).
//!
//! A session is `temporary` under its supervisor: its calls belong to the connections that opened
//! them, so a restarted actor would have nothing to resume. If the actor fails, its `Drop` ends
//! both calls with INTERNAL instead of leaving them hanging.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{
    Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, Message, WrapFuture,
};
use serde::Serialize;
use tokio::sync::oneshot;

use super::metrics::RouterMetrics;
use super::pipe::{End, Pump, SessionLink, SideHandle};
use super::{handles_generic, Operation, Payload, RouterError, RouterSettings, Side};
use crate::supervision::Managed;

/// A side asking to join.
pub struct Joiner<T> {
    pub side: Side,
    pub workflow_id: String,
    /// The user's request (users only).
    pub operation: Option<Operation>,
    /// The side's call.
    pub handle: SideHandle<T>,
    /// The first frame the *other* side gets once paired (the agent's carries the user's request).
    pub greeting: T,
    /// Receives this side's pump once paired; the adapter runs it on the call's request stream.
    pub paired: oneshot::Sender<Pump<T>>,
}

/// Joins the session. `Ok` means accepted: the pump follows on `paired` once the other side is
/// there, and an error before that ends the call through its handle.
#[derive(Message)]
#[rtype(result = "Result<(), RouterError>")]
pub struct Join<T: Payload>(pub Joiner<T>);

/// Ends the session; both sides get ABORTED with the reason. Answers whether it was running.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Terminate {
    pub reason: String,
}

/// The session as an operator sees it (always `Some`; an `Option` so the envelope can carry it).
#[derive(Message)]
#[rtype(result = "Option<SessionView>")]
pub struct Inspect;

/// What [`Inspect`] answers.
#[derive(Clone, Debug, Serialize)]
pub struct SessionView {
    pub session_key: String,
    pub workflow_id: String,
    pub operation: Option<Operation>,
    pub created_at_ms: u64,
    pub user_connected: bool,
    pub agent_connected: bool,
    pub paired: bool,
    pub bytes_user_to_agent: u64,
    pub bytes_agent_to_user: u64,
}

/// What a session tells its hub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// Both sides are connected.
    Paired(String),
    /// The session is over; its actor is stopping.
    Ended(String),
}

/// Called with the session's events (by the hub's wiring).
pub type EventSink = Arc<dyn Fn(SessionEvent) + Send + Sync>;

/// A session between one user and one agent.
pub struct SessionActor<T> {
    key: String,
    workflow_id: String,
    operation: Option<Operation>,
    created_at_ms: u64,
    settings: Arc<RouterSettings>,
    metrics: RouterMetrics,
    events: EventSink,
    /// The first side, until the second arrives.
    waiting: Option<Joiner<T>>,
    arrived: Option<Instant>,
    link: Option<Arc<SessionLink>>,
    ended: bool,
}

impl<T: Payload> SessionActor<T> {
    /// A session for `workflow_id`, empty until a side joins.
    pub fn new(
        key: String,
        workflow_id: String,
        settings: Arc<RouterSettings>,
        metrics: RouterMetrics,
        events: EventSink,
    ) -> Self {
        Self {
            key,
            workflow_id,
            operation: None,
            created_at_ms: crate::clock::precise_ms(),
            settings,
            metrics,
            events,
            waiting: None,
            arrived: None,
            link: None,
            ended: false,
        }
    }

    fn op_name(&self) -> &'static str {
        self.operation
            .as_ref()
            .map_or("unknown", |o| o.kind.as_str())
    }

    fn pair(&mut self, first: Joiner<T>, second: Joiner<T>, ctx: &mut Context<Self>) {
        let (user, agent) = match first.side {
            Side::User => (first, second),
            Side::Agent => (second, first),
        };
        self.operation = user.operation.clone();
        let op = self.op_name();
        let link = SessionLink::new(user.handle.end.clone(), agent.handle.end.clone());
        // Fresh queues always have room for the greeting.
        let _ = agent.handle.outbound.try_send(user.greeting);
        let _ = user.handle.outbound.try_send(agent.greeting);
        let pump = |from: Side, peer: &SideHandle<T>, direction: &str| Pump {
            from,
            peer: peer.outbound.clone(),
            link: link.clone(),
            stall_timeout: self.settings.stall_timeout,
            bytes: self.metrics.bytes_of(op, direction),
        };
        let user_pump = pump(Side::User, &agent.handle, "user_to_agent");
        let agent_pump = pump(Side::Agent, &user.handle, "agent_to_user");
        if user.paired.send(user_pump).is_err() {
            link.fail(super::pipe::gone(Side::User));
        }
        if agent.paired.send(agent_pump).is_err() {
            link.fail(super::pipe::gone(Side::Agent));
        }
        self.metrics
            .paired(op, self.arrived.map_or(Duration::ZERO, |at| at.elapsed()));
        (self.events)(SessionEvent::Paired(self.key.clone()));
        let mut ended = link.subscribe();
        self.link = Some(link);
        ctx.spawn(
            async move {
                let _ = ended.wait_for(|e| *e != End::Open).await;
            }
            .into_actor(self)
            .map(|_, act, ctx| act.finish(ctx)),
        );
    }

    /// Accounts for the paired session's end and stops.
    fn finish(&mut self, ctx: &mut Context<Self>) {
        let op = self.op_name();
        self.metrics.unpaired(op);
        if let Some(End::Failed(e)) = self.link.as_ref().map(|l| l.end()) {
            self.metrics.error(op, e.code());
            match e {
                RouterError::Stalled(_) => {
                    self.metrics.flow_control_timeouts.inc();
                }
                RouterError::TimedOut(_) => {
                    self.metrics.sessions_expired.inc();
                }
                _ => {}
            }
        }
        self.stop(ctx);
    }

    fn stop(&mut self, ctx: &mut Context<Self>) {
        if !self.ended {
            self.ended = true;
            (self.events)(SessionEvent::Ended(self.key.clone()));
        }
        ctx.stop();
    }

    fn rendezvous_expired(&mut self, ctx: &mut Context<Self>) {
        if self.link.is_some() || self.ended {
            return;
        }
        if let Some(w) = self.waiting.take() {
            let e = RouterError::TimedOut(format!(
                "no {} joined session {} within {} ms",
                w.side.other().as_str(),
                self.key,
                self.settings.rendezvous_timeout.as_millis()
            ));
            self.metrics.error(self.op_name(), e.code());
            self.metrics.sessions_expired.inc();
            w.handle.fail(e);
        }
        self.stop(ctx);
    }

    fn check_idle(&mut self) {
        let idle = self.settings.idle_timeout;
        if let Some(link) = &self.link {
            if link.idle_ms() >= idle.as_millis() as u64 {
                link.fail(RouterError::TimedOut(format!(
                    "session {} idle for {} ms",
                    self.key,
                    idle.as_millis()
                )));
            }
        }
    }
}

impl<T: Payload> Actor for SessionActor<T> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_later(self.settings.rendezvous_timeout, |act, ctx| {
            act.rendezvous_expired(ctx)
        });
        // Checking four times per timeout keeps an idle session at most 25 % over it.
        let every = (self.settings.idle_timeout / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(30));
        ctx.run_interval(every, |act, _| act.check_idle());
    }
}

impl<T> Drop for SessionActor<T> {
    fn drop(&mut self) {
        // After a clean end these change nothing; after a failure they end both calls.
        let e = RouterError::Internal(format!("session {}: its actor stopped", self.key));
        if let Some(link) = &self.link {
            link.fail(e.clone());
        }
        if let Some(w) = &self.waiting {
            w.handle.fail(e);
        }
        if !self.ended {
            (self.events)(SessionEvent::Ended(self.key.clone()));
        }
    }
}

impl<T: Payload> Managed for SessionActor<T> {
    const KIND: &'static str = "router-session";

    fn dump_state(&self) -> serde_json::Value {
        serde_json::json!({
            "view": self.view(),
            "waiting_side": self.waiting.as_ref().map(|w| w.side.as_str()),
            "idle_ms": self.link.as_ref().map(|l| l.idle_ms()),
        })
    }
}

impl<T: Payload> SessionActor<T> {
    fn view(&self) -> SessionView {
        let waiting = self.waiting.as_ref().map(|w| w.side);
        let paired = self.link.is_some() && !self.ended;
        SessionView {
            session_key: self.key.clone(),
            workflow_id: self.workflow_id.clone(),
            operation: self
                .operation
                .clone()
                .or_else(|| self.waiting.as_ref().and_then(|w| w.operation.clone())),
            created_at_ms: self.created_at_ms,
            user_connected: paired || waiting == Some(Side::User),
            agent_connected: paired || waiting == Some(Side::Agent),
            paired,
            bytes_user_to_agent: self.link.as_ref().map_or(0, |l| l.bytes(Side::User)),
            bytes_agent_to_user: self.link.as_ref().map_or(0, |l| l.bytes(Side::Agent)),
        }
    }
}

impl<T: Payload> Handler<Join<T>> for SessionActor<T> {
    type Result = Result<(), RouterError>;

    fn handle(&mut self, Join(j): Join<T>, ctx: &mut Context<Self>) -> Self::Result {
        let refuse = |act: &Self, e: RouterError| {
            let op = j
                .operation
                .as_ref()
                .map_or(act.op_name(), |o| o.kind.as_str());
            act.metrics.error(op, e.code());
            Err(e)
        };
        if self.ended {
            return Err(RouterError::NotFound(format!(
                "session {} has ended",
                self.key
            )));
        }
        if j.workflow_id != self.workflow_id {
            return refuse(
                self,
                RouterError::WrongWorkflow(format!(
                    "workflow_id: session {} belongs to another workflow",
                    self.key
                )),
            );
        }
        if self.link.is_some() {
            return refuse(
                self,
                RouterError::Duplicate(format!(
                    "session {} already has its {}",
                    self.key,
                    j.side.as_str()
                )),
            );
        }
        match self.waiting.take() {
            // The first side's caller left before anyone joined: the newcomer takes its place.
            Some(w) if w.handle.is_gone() => {
                self.waiting = Some(j);
                self.arrived = Some(Instant::now());
                Ok(())
            }
            Some(w) if w.side == j.side => {
                let side = j.side;
                self.waiting = Some(w);
                refuse(
                    self,
                    RouterError::Duplicate(format!(
                        "session {} already has its {}",
                        self.key,
                        side.as_str()
                    )),
                )
            }
            Some(w) => {
                self.pair(w, j, ctx);
                Ok(())
            }
            None => {
                self.waiting = Some(j);
                self.arrived = Some(Instant::now());
                Ok(())
            }
        }
    }
}

impl<T: Payload> Handler<Terminate> for SessionActor<T> {
    type Result = bool;

    fn handle(&mut self, msg: Terminate, ctx: &mut Context<Self>) -> bool {
        if self.ended {
            return false;
        }
        let e = RouterError::Terminated(format!(
            "session {} terminated: {}",
            self.key,
            if msg.reason.is_empty() {
                "by an operator"
            } else {
                &msg.reason
            }
        ));
        match &self.link {
            // The end reaches `finish` through the link.
            Some(link) => link.fail(e),
            None => {
                if let Some(w) = self.waiting.take() {
                    self.metrics.error(self.op_name(), e.code());
                    w.handle.fail(e);
                }
                self.stop(ctx);
                true
            }
        }
    }
}

impl<T: Payload> Handler<Inspect> for SessionActor<T> {
    type Result = Option<SessionView>;

    fn handle(&mut self, _: Inspect, _: &mut Context<Self>) -> Self::Result {
        Some(self.view())
    }
}

handles_generic!(SessionActor: Join<T>, Terminate, Inspect);
