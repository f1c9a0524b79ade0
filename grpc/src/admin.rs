//! `lodge.admin.v1.Admin` → `/node/admin`.

use std::pin::Pin;
use std::time::Duration;

use lodge_actors::admin::{self as actor, AdminActor, AdminError};
use lodge_actors::introspect::{ActorSnapshot, ListQuery, SortKey, TreeNode};
use lodge_actors::redact::url_credentials;
use lodge_actors::{clock, ActorRef, EventKind, Lifecycle};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use wildmatch::WildMatch;

use crate::deadline;
use crate::pb::admin as pb;

/// The admin service adapter.
pub struct AdminService {
    admin: ActorRef<AdminActor>,
    timeout: Duration,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl AdminService {
    /// An adapter sending to `admin`, with `timeout` as the longest deadline; event streams end
    /// when `shutdown` turns true.
    pub fn new(
        admin: ActorRef<AdminActor>,
        timeout: Duration,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            admin,
            timeout,
            shutdown,
        }
    }

    async fn call<M>(&self, req: &Request<impl Sized>, msg: M) -> Result<M::Result, Status>
    where
        M: actix::Message + Send + 'static,
        M::Result: Send,
        AdminActor: actix::Handler<lodge_actors::Envelope<M>>,
    {
        self.admin
            .send_timeout(msg, deadline::of(req, self.timeout))
            .await
            .map_err(|e| deadline::send_status(e, "/node/admin"))
    }
}

fn status(e: AdminError) -> Status {
    match e {
        AdminError::NotFound(m) => Status::not_found(m),
        AdminError::PermissionDenied(m) => Status::permission_denied(m),
        AdminError::FailedPrecondition(m) => Status::failed_precondition(m),
        AdminError::Unavailable(m) => Status::unavailable(m),
        AdminError::Aborted(m) => Status::aborted(m),
        AdminError::Internal(m) => Status::internal(m),
    }
}

fn lifecycle(s: Lifecycle) -> i32 {
    (match s {
        Lifecycle::Starting => pb::LifecycleState::Starting,
        Lifecycle::Running => pb::LifecycleState::Running,
        Lifecycle::Restarting => pb::LifecycleState::Restarting,
        Lifecycle::Stopping => pb::LifecycleState::Stopping,
        Lifecycle::Stopped => pb::LifecycleState::Stopped,
        Lifecycle::Failed => pb::LifecycleState::Failed,
    }) as i32
}

fn summary(s: ActorSnapshot) -> pb::ActorSummary {
    pb::ActorSummary {
        path: s.path.to_string(),
        kind: s.kind.to_string(),
        parent: s.parent.map(|p| p.to_string()).unwrap_or_default(),
        state: lifecycle(s.state),
        queue_len: s.queue_len,
        messages_handled: s.messages_handled,
        message_rate: s.message_rate,
        restarts: s.restarts,
        last_failure: s.last_failure.map(|f| pb::Failure {
            reason: url_credentials(&f.reason),
            at_unix_ms: f.at_ms as i64,
        }),
        started_at_unix_ms: s.started_at_ms as i64,
        last_activity_unix_ms: s.last_activity_ms as i64,
        latency_p50_us: s.latency_p50_us,
        latency_p99_us: s.latency_p99_us,
    }
}

fn tree(n: TreeNode) -> pb::TreeNode {
    pb::TreeNode {
        path: n.path.to_string(),
        kind: n.kind.to_string(),
        state: lifecycle(n.state),
        restarts: n.restarts,
        children: n.children.into_iter().map(tree).collect(),
    }
}

fn event_type(e: EventKind) -> i32 {
    (match e {
        EventKind::Started => pb::EventType::Started,
        EventKind::Stopped => pb::EventType::Stopped,
        EventKind::Failed => pb::EventType::Failed,
        EventKind::Restarted => pb::EventType::Restarted,
    }) as i32
}

fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else if !value.starts_with('/') {
        Err(Status::invalid_argument(format!(
            "{field} must be an absolute actor path such as /node/admin, got {}",
            lodge_actors::quote::echo(value)
        )))
    } else {
        Ok(value)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ActorEvent, Status>> + Send>>;

/// Ends a stream when the node starts shutting down.
struct UntilShutdown {
    inner: EventStream,
    shutdown: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

impl Stream for UntilShutdown {
    type Item = Result<pb::ActorEvent, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.shutdown.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(None);
        }
        self.inner.as_mut().poll_next(cx)
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn list_actors(
        &self,
        req: Request<pb::ListActorsRequest>,
    ) -> Result<Response<pb::ListActorsResponse>, Status> {
        let r = req.get_ref();
        let sort = match pb::SortBy::try_from(r.sort_by) {
            Ok(pb::SortBy::Path) => SortKey::Path,
            Ok(pb::SortBy::QueueLen) => SortKey::QueueLen,
            Ok(pb::SortBy::Restarts) => SortKey::Restarts,
            Ok(pb::SortBy::MessageRate) => SortKey::MessageRate,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "sort_by: unknown value {}",
                    r.sort_by
                )))
            }
        };
        let query = ListQuery {
            path_glob: r.path_glob.clone(),
            kind: r.kind.clone(),
            sort,
            limit: r.limit as usize,
        };
        let reply = self
            .call(&req, actor::ListActors(query))
            .await?
            .map_err(status)?;
        Ok(Response::new(pb::ListActorsResponse {
            actors: reply.actors.into_iter().map(summary).collect(),
            matched: reply.matched as u64,
        }))
    }

    async fn get_actor(
        &self,
        req: Request<pb::GetActorRequest>,
    ) -> Result<Response<pb::GetActorResponse>, Status> {
        let path = required("path", &req.get_ref().path)?.to_string();
        let d = self
            .call(&req, actor::GetActor { path })
            .await?
            .map_err(status)?;
        Ok(Response::new(pb::GetActorResponse {
            actor: Some(summary(d.snapshot)),
            children: d.children.iter().map(|c| c.to_string()).collect(),
            // An actor's state may hold configuration (a backend URL with its password): what
            // leaves the node is redacted here, whatever each actor remembered to hide.
            state_json: d
                .state
                .map(|mut s| {
                    lodge_actors::redact::json(&mut s);
                    s.to_string()
                })
                .unwrap_or_default(),
        }))
    }

    async fn tree(
        &self,
        req: Request<pb::TreeRequest>,
    ) -> Result<Response<pb::TreeResponse>, Status> {
        let r = req.get_ref();
        if !r.root.is_empty() {
            required("root", &r.root)?;
        }
        let msg = actor::Tree {
            root: r.root.clone(),
            depth: r.depth as usize,
        };
        let root = self.call(&req, msg).await?.map_err(status)?;
        Ok(Response::new(pb::TreeResponse {
            root: Some(tree(root)),
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let glob = req.get_ref().path_glob.clone();
        let rx = self.call(&req, actor::Subscribe).await?.map_err(status)?;
        let glob = (!glob.is_empty()).then(|| WildMatch::new(&glob));
        let stream = BroadcastStream::new(rx).filter_map(move |item| match item {
            Ok(e) if glob.as_ref().is_none_or(|g| g.matches(&e.path)) => Some(Ok(pb::ActorEvent {
                at_unix_ms: e.at_ms as i64,
                path: e.path.to_string(),
                kind: e.kind.to_string(),
                r#type: event_type(e.event),
                reason: e.reason.as_deref().map(url_credentials).unwrap_or_default(),
                restarts: e.restarts,
                missed: 0,
            })),
            Ok(_) => None,
            Err(BroadcastStreamRecvError::Lagged(n)) => Some(Ok(pb::ActorEvent {
                at_unix_ms: clock::precise_ms() as i64,
                missed: n,
                ..Default::default()
            })),
        });
        let mut shutdown = self.shutdown.clone();
        let until = Box::pin(async move {
            let _ = shutdown.wait_for(|stopping| *stopping).await;
        });
        Ok(Response::new(Box::pin(UntilShutdown {
            inner: Box::pin(stream),
            shutdown: until,
        })))
    }

    async fn node_info(
        &self,
        req: Request<pb::NodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfoResponse>, Status> {
        let f = self.call(&req, actor::GetNodeInfo).await?.map_err(status)?;
        Ok(Response::new(pb::NodeInfoResponse {
            node_id: f.node_id,
            version: f.version.clone(),
            started_at_unix_ms: f.started_at_ms as i64,
            uptime_ms: clock::precise_ms().saturating_sub(f.started_at_ms),
            config_json: f.config_json.clone(),
        }))
    }

    async fn restart_actor(
        &self,
        req: Request<pb::RestartActorRequest>,
    ) -> Result<Response<pb::RestartActorResponse>, Status> {
        let path = required("path", &req.get_ref().path)?.to_string();
        crate::auth::audit::note_target(&req, || path.clone());
        let restarts = self
            .call(&req, actor::RestartActor { path })
            .await?
            .map_err(status)?;
        Ok(Response::new(pb::RestartActorResponse { restarts }))
    }

    async fn stop_actor(
        &self,
        req: Request<pb::StopActorRequest>,
    ) -> Result<Response<pb::StopActorResponse>, Status> {
        let path = required("path", &req.get_ref().path)?.to_string();
        crate::auth::audit::note_target(&req, || path.clone());
        self.call(&req, actor::StopActor { path })
            .await?
            .map_err(status)?;
        Ok(Response::new(pb::StopActorResponse {}))
    }

    async fn inject_faults(
        &self,
        req: Request<pb::InjectFaultsRequest>,
    ) -> Result<Response<pb::InjectFaultsResponse>, Status> {
        let r = req.get_ref();
        let rules = lodge_actors::cluster::fault::FaultRules {
            drop_peers: r.drop_peers.iter().copied().collect(),
            delay_peers: r
                .delay_peers_ms
                .iter()
                .map(|(peer, ms)| (*peer, Duration::from_millis(*ms as u64)))
                .collect(),
            fsync_delay: Duration::from_millis(r.fsync_delay_ms as u64),
        };
        let now = self
            .call(&req, actor::InjectFaults(rules))
            .await?
            .map_err(status)?;
        Ok(Response::new(pb::InjectFaultsResponse {
            faults_json: serde_json::to_string(&now).unwrap_or_default(),
        }))
    }
}
