//! `lodge.registry.v1.Registry`: decodes a request, hands it to the registry (the index or the
//! client's actor) with the caller's deadline, and maps the answer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lodge_actors::cluster::raft::RaftError;
use lodge_actors::quote::echo;
use lodge_actors::registry::metrics::OutcomeLabels;
use lodge_actors::registry::{
    BeatAnswer, ClientView, RegisterRequest, RegistryError, RegistryHandle, RegistryMetrics,
};
use prometheus_client::metrics::counter::Counter;
use prost_types::Timestamp;
use tonic::{Request, Response, Status};

use crate::auth::{audit, Caller, Role};
use crate::deadline;
use crate::members::Members;
use crate::pb::registry as pb;

/// Maps a registry error to the caller's status.
pub fn status(members: &Members, e: RegistryError) -> Status {
    match e {
        RegistryError::Invalid(m) => Status::invalid_argument(m),
        RegistryError::NotFound(m) => Status::not_found(m),
        RegistryError::Exhausted(m) => Status::resource_exhausted(m),
        RegistryError::Unavailable(m) => Status::unavailable(m),
        RegistryError::Denied(m) => Status::permission_denied(m),
        RegistryError::Raft(RaftError::Timeout) => {
            Status::deadline_exceeded("the cluster did not confirm the request before the deadline")
        }
        RegistryError::Raft(e) => members.status(&e),
    }
}

/// Refuses a registry client acting on registration `id` when another identity made it. A
/// registration this member does not know passes: the call itself answers that it is not
/// registered.
pub(crate) async fn require_owner(
    registry: &RegistryHandle,
    caller: &Caller,
    id: &str,
    budget: Duration,
) -> Result<(), Status> {
    if !restricted(caller) {
        return Ok(());
    }
    match registry.owner_of(id, budget).await {
        Ok(Some(owner)) if !owner.is_empty() && owner != caller.subject => Err(Status::permission_denied(format!(
            "client_id: {} was registered by another identity; a registry client may act only on its own registrations",
            echo(id)
        ))),
        _ => Ok(()),
    }
}

/// Whether `caller` is held to its own registrations (not the node, an admin, or auth off).
fn restricted(caller: &Caller) -> bool {
    !caller.is_unrestricted() && !caller.has(Role::Admin)
}

/// A field that must not be empty (INVALID_ARGUMENT naming it), whatever its content.
pub(crate) fn present(field: &str, value: &str) -> Result<(), Status> {
    if value.trim().is_empty() {
        return Err(Status::invalid_argument(format!("{field}: required")));
    }
    Ok(())
}

/// A required identifier-like field: present, bounded, no control characters.
fn required(field: &str, value: &str) -> Result<(), Status> {
    lodge_actors::registry::record::required(field, value).map_err(Status::invalid_argument)
}

fn timestamp_ms(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

fn ms_of(t: &Timestamp) -> Result<i64, Status> {
    t.seconds
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(i64::from(t.nanos) / 1_000_000))
        .ok_or_else(|| Status::invalid_argument("registered_at: out of range"))
}

/// Whole seconds for the original `heartbeat_interval_seconds` field (at least 1).
fn whole_seconds(d: Duration) -> i32 {
    d.as_millis().div_ceil(1000).clamp(1, i32::MAX as u128) as i32
}

fn info(v: ClientView, member: u64) -> pb::ClientInfo {
    let r = v.record;
    pb::ClientInfo {
        client_id: r.client_id,
        client_name: r.client_name,
        client_version: r.client_version,
        namespace: r.namespace,
        instance_id: r.instance_id,
        metadata: r.metadata.into_iter().collect(),
        registered_at: Some(timestamp_ms(r.registered_at_ms)),
        heartbeat_interval_seconds: whole_seconds(v.interval),
        heartbeat_interval_ms: v.interval.as_millis() as i64,
        lease_id: r.lease,
        last_heartbeat: v.last_heartbeat.map(Timestamp::from),
        missed_heartbeats: v.missed,
        jobs_in_flight: v.jobs_in_flight as u32,
        answered_by: member,
    }
}

/// The Registry service.
pub struct RegistryService {
    registry: RegistryHandle,
    members: Arc<Members>,
    /// Heartbeat outcomes, resolved once: a heartbeat is the hottest call of the service.
    beats: [Counter; 3],
    timeout: Duration,
}

impl RegistryService {
    /// Serves `registry`; `timeout` bounds a call without its own deadline.
    pub fn new(
        registry: RegistryHandle,
        members: Arc<Members>,
        metrics: RegistryMetrics,
        timeout: Duration,
    ) -> Self {
        let beats = ["ok", "re_register", "error"].map(|outcome| {
            metrics
                .heartbeats
                .get_or_create(&OutcomeLabels {
                    outcome: outcome.to_string(),
                })
                .clone()
        });
        Self {
            registry,
            members,
            beats,
            timeout,
        }
    }

    fn status(&self, e: RegistryError) -> Status {
        status(&self.members, e)
    }

    /// See [`require_owner`].
    async fn own<T>(&self, req: &Request<T>, id: &str, budget: Duration) -> Result<(), Status> {
        require_owner(&self.registry, &Caller::of(req.extensions()), id, budget).await
    }
}

#[tonic::async_trait]
impl pb::registry_server::Registry for RegistryService {
    async fn register_client(
        &self,
        req: Request<pb::RegisterClientRequest>,
    ) -> Result<Response<pb::RegisterClientResponse>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let caller = Caller::of(req.extensions());
        let m = req.into_inner();
        let r = RegisterRequest {
            // Made with auth off (or by the node): nobody's, so any client may take it over
            // once auth is on.
            owner: if caller.is_unrestricted() {
                String::new()
            } else {
                caller.subject.clone()
            },
            replace_any: !restricted(&caller),
            client_name: m.client_name,
            client_version: m.client_version,
            namespace: m.namespace,
            instance_id: m.instance_id,
            metadata: m.metadata.into_iter().collect::<BTreeMap<_, _>>(),
            registered_at_ms: m.registered_at.as_ref().map(ms_of).transpose()?,
        };
        let done = self
            .registry
            .register(r, budget)
            .await
            .map_err(|e| self.status(e))?;
        let expires = SystemTime::now() + done.ttl;
        Ok(Response::new(pb::RegisterClientResponse {
            client_id: done.record.client_id.clone(),
            success: true,
            message: match &done.replaced {
                Some(old) => format!("registered; replaces {old} (same identity)"),
                None => "registered".into(),
            },
            heartbeat_interval_seconds: whole_seconds(done.interval),
            heartbeat_interval_ms: done.interval.as_millis() as i64,
            expires_at: Some(Timestamp::from(expires)),
            replaced_client_id: done.replaced.unwrap_or_default(),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let budget = deadline::of(&req, self.timeout);
        self.own(&req, &req.get_ref().client_id, budget).await?;
        let m = req.into_inner();
        required("client_id", &m.client_id)?;
        let answer = self
            .registry
            .heartbeat(&m.client_id, &m.client_name, budget)
            .await;
        let received_at = Some(Timestamp::from(SystemTime::now()));
        let outcome = match &answer {
            Ok(BeatAnswer::Alive { .. }) => 0,
            Ok(BeatAnswer::ReRegister(_)) => 1,
            Err(_) => 2,
        };
        self.beats[outcome].inc();
        match answer.map_err(|e| self.status(e))? {
            BeatAnswer::Alive { interval } => Ok(Response::new(pb::HeartbeatResponse {
                success: true,
                message: String::new(),
                received_at,
                heartbeat_interval_seconds: whole_seconds(interval),
                heartbeat_interval_ms: interval.as_millis() as i64,
                re_register_required: false,
            })),
            BeatAnswer::ReRegister(why) => Ok(Response::new(pb::HeartbeatResponse {
                success: false,
                message: why,
                received_at,
                heartbeat_interval_seconds: 0,
                heartbeat_interval_ms: 0,
                re_register_required: true,
            })),
        }
    }

    async fn unregister_client(
        &self,
        req: Request<pb::UnregisterClientRequest>,
    ) -> Result<Response<pb::UnregisterClientResponse>, Status> {
        let budget = deadline::of(&req, self.timeout);
        audit::note_target(&req, || echo(&req.get_ref().client_id));
        self.own(&req, &req.get_ref().client_id, budget).await?;
        let m = req.into_inner();
        required("client_id", &m.client_id)?;
        let existed = self
            .registry
            .unregister(&m.client_id, budget)
            .await
            .map_err(|e| self.status(e))?;
        Ok(Response::new(pb::UnregisterClientResponse {
            success: existed,
            message: if existed {
                "unregistered".into()
            } else {
                format!(
                    "client_id: {} was not registered",
                    lodge_actors::quote::echo(&m.client_id)
                )
            },
        }))
    }

    async fn list_clients(
        &self,
        req: Request<pb::ListClientsRequest>,
    ) -> Result<Response<pb::ListClientsResponse>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let m = req.into_inner();
        let views = self
            .registry
            .list(&m.namespace, &m.client_name, budget)
            .await
            .map_err(|e| self.status(e))?;
        let member = self.members.member_id();
        Ok(Response::new(pb::ListClientsResponse {
            clients: views.into_iter().map(|v| info(v, member)).collect(),
        }))
    }

    async fn get_client(
        &self,
        req: Request<pb::GetClientRequest>,
    ) -> Result<Response<pb::ClientInfo>, Status> {
        let budget = deadline::of(&req, self.timeout);
        if !Caller::of(req.extensions()).has(Role::Observer) {
            self.own(&req, &req.get_ref().client_id, budget).await?;
        }
        let m = req.into_inner();
        required("client_id", &m.client_id)?;
        let view = self
            .registry
            .get(&m.client_id, budget)
            .await
            .map_err(|e| self.status(e))?;
        Ok(Response::new(info(view, self.members.member_id())))
    }
}
