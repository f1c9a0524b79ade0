//! `lodge.cluster.v1.Cluster` → the raft member (membership changes, status) and the membership
//! actor (heartbeats, topology with liveness). Membership changes reaching a follower are
//! forwarded to the leader.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lodge_actors::cluster::members::{
    Beat, BeatRefused, GetTopologyView, HeartbeatSender, Membership, ReceiveBeat, Resources,
    TopologyView,
};
use lodge_actors::cluster::raft::{ChangeMember, GetStatus, RaftNode};
use lodge_actors::cluster::topology::{Directory, MemberRequest, Role, Topology};
use lodge_actors::ActorRef;
use slog::{info, warn, Logger};
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

use crate::deadline;
use crate::kv::stream_until_shutdown;
use crate::members::{forwarded, Members};
use crate::pb::cluster::{self as pb, cluster_client::ClusterClient, cluster_server};
use crate::peer::{FromPeer, PeerChannel, PeerLink};

type Client = ClusterClient<PeerChannel>;
type Forwarded<R> = Pin<Box<dyn std::future::Future<Output = Result<Response<R>, Status>> + Send>>;

/// The cluster adapter.
pub struct ClusterService {
    raft: ActorRef<RaftNode>,
    membership: ActorRef<Membership>,
    directory: Directory,
    members: Arc<Members>,
    heartbeat_interval: Duration,
    timeout: Duration,
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// This process's incarnation (answered by Status).
    incarnation: u64,
    /// How this node reaches other members (the quorum guard's probe of a new member).
    peer: PeerLink,
}

/// The longest a probe of a new member's address may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

impl ClusterService {
    /// A service answering for `raft` and `membership`; streams end when `shutdown` turns true.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        raft: ActorRef<RaftNode>,
        membership: ActorRef<Membership>,
        directory: Directory,
        members: Arc<Members>,
        heartbeat_interval: Duration,
        timeout: Duration,
        shutdown: tokio::sync::watch::Receiver<bool>,
        incarnation: u64,
        peer: PeerLink,
    ) -> Self {
        Self {
            raft,
            membership,
            directory,
            members,
            heartbeat_interval,
            timeout,
            shutdown,
            incarnation,
            peer,
        }
    }

    /// Carries out a membership request here if this member leads, else on the leader (`then`
    /// makes the same call there).
    async fn change<T: Clone + Send + 'static, R>(
        &self,
        req: Request<T>,
        change: ChangeMember,
        then: impl FnOnce(Client, Request<T>) -> Forwarded<R>,
        answer: impl FnOnce(pb::Topology, u64) -> R,
    ) -> Result<Response<R>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let result = self
            .raft
            .send_timeout(change, budget)
            .await
            .map_err(|e| deadline::send_status(e, "raft member"))?;
        match result {
            Ok(topology) => {
                let commit = self
                    .raft
                    .send_timeout(GetStatus, budget)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map_or(0, |s| s.commit);
                let view = self
                    .view(budget)
                    .await
                    .unwrap_or_else(|_| bare(&topology, &self.directory));
                Ok(Response::new(answer(view, commit)))
            }
            Err(e) => {
                let channel = self.members.leader(&req, &e).await?;
                let body = req.get_ref().clone();
                then(ClusterClient::new(channel), forwarded(body, budget)).await
            }
        }
    }

    async fn view(&self, budget: Duration) -> Result<pb::Topology, Status> {
        let v = self
            .membership
            .send_timeout(GetTopologyView, budget)
            .await
            .map_err(|e| deadline::send_status(e, "membership"))?;
        Ok(topology(v, &self.directory))
    }
}

fn role(r: Role) -> i32 {
    match r {
        Role::Voter => pb::Role::Voter as i32,
        Role::Learner => pb::Role::Learner as i32,
    }
}

fn resources(r: &Resources) -> pb::Resources {
    pb::Resources {
        memory_bytes: r.memory_bytes,
        cpu_seconds: r.cpu_seconds,
        actors: r.actors,
        applied_index: r.applied_index,
    }
}

fn topology(v: TopologyView, directory: &Directory) -> pb::Topology {
    pb::Topology {
        version: v.version,
        leader_id: v.leader.unwrap_or(0),
        members: v
            .members
            .into_iter()
            .map(|m| pb::Member {
                id: m.id,
                address: m.addr,
                role: role(m.role),
                reachable: m.liveness.reachable,
                last_heartbeat_ms_ago: m
                    .liveness
                    .since_last_beat
                    .map_or(-1, |d| d.as_millis() as i64),
                status: m.liveness.status,
                resources: Some(resources(&m.liveness.resources)),
                client_address: directory.client_address(m.id).unwrap_or_default(),
            })
            .collect(),
    }
}

/// The topology without liveness (when the membership actor cannot be asked).
fn bare(t: &Topology, directory: &Directory) -> pb::Topology {
    pb::Topology {
        version: t.version,
        leader_id: 0,
        members: t
            .members
            .values()
            .map(|m| pb::Member {
                id: m.id,
                address: m.addr.clone(),
                role: role(m.role),
                last_heartbeat_ms_ago: -1,
                client_address: directory.client_address(m.id).unwrap_or_default(),
                ..Default::default()
            })
            .collect(),
    }
}

/// Asks the node at the peer address `addr` for its raft status, within `within`: the member id
/// it runs as and its process incarnation, or `None` when nothing answered.
pub async fn probe(addr: &str, link: &PeerLink, within: Duration) -> Option<(u64, u64)> {
    let call = async {
        let channel = link.connect(addr).await.ok()?;
        let mut req = Request::new(pb::StatusRequest {});
        req.set_timeout(within);
        let s = ClusterClient::new(channel).status(req).await.ok()?;
        let s = s.into_inner();
        Some((s.id, s.incarnation))
    };
    tokio::time::timeout(within, call).await.ok().flatten()
}

fn require_id(id: u64) -> Result<(), Status> {
    if id == 0 {
        Err(Status::invalid_argument(
            "id is required (member ids start at 1)",
        ))
    } else {
        Ok(())
    }
}

#[tonic::async_trait]
impl cluster_server::Cluster for ClusterService {
    async fn register_node(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        let r = req.get_ref().clone();
        require_id(r.id)?;
        crate::auth::audit::note_target(&req, || format!("member {}", r.id));
        if r.address.is_empty() {
            return Err(Status::invalid_argument("address is required (HOST:PORT)"));
        }
        let role = match pb::Role::try_from(r.role) {
            Ok(pb::Role::Unspecified | pb::Role::Voter) => Role::Voter,
            Ok(pb::Role::Learner) => Role::Learner,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "role: unknown value {}",
                    r.role
                )))
            }
        };
        // A voter that is not a member yet counts as live for the quorum guard if it answers at
        // its address as that member. Asked only when the guard may need it.
        let is_new = !self
            .directory
            .current()
            .topology
            .members
            .contains_key(&r.id);
        let answers = if role == Role::Voter && !r.force && is_new {
            let within = PROBE_TIMEOUT.min(deadline::of(&req, self.timeout) / 3);
            probe(&r.address, &self.peer, within)
                .await
                .map(|(id, _)| id)
                == Some(r.id)
        } else {
            false
        };
        let change = ChangeMember {
            request: MemberRequest::Add {
                id: r.id,
                addr: r.address,
                role,
            },
            force: r.force,
            answers,
        };
        self.change(
            req,
            change,
            |mut c, r| Box::pin(async move { c.register_node(r).await }),
            |t, commit| pb::RegisterNodeResponse {
                topology: Some(t),
                commit_index: commit,
            },
        )
        .await
    }

    async fn deregister_node(
        &self,
        req: Request<pb::DeregisterNodeRequest>,
    ) -> Result<Response<pb::DeregisterNodeResponse>, Status> {
        let (id, force) = (req.get_ref().id, req.get_ref().force);
        require_id(id)?;
        crate::auth::audit::note_target(&req, || format!("member {id}"));
        self.change(
            req,
            ChangeMember {
                request: MemberRequest::Remove { id },
                force,
                answers: false,
            },
            |mut c, r| Box::pin(async move { c.deregister_node(r).await }),
            |t, _| pb::DeregisterNodeResponse { topology: Some(t) },
        )
        .await
    }

    async fn promote_node(
        &self,
        req: Request<pb::PromoteNodeRequest>,
    ) -> Result<Response<pb::PromoteNodeResponse>, Status> {
        let (id, force) = (req.get_ref().id, req.get_ref().force);
        require_id(id)?;
        crate::auth::audit::note_target(&req, || format!("member {id}"));
        self.change(
            req,
            ChangeMember {
                request: MemberRequest::Promote { id },
                force,
                answers: false,
            },
            |mut c, r| Box::pin(async move { c.promote_node(r).await }),
            |t, _| pb::PromoteNodeResponse { topology: Some(t) },
        )
        .await
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = req.get_ref();
        require_id(r.node_id)?;
        if let Some(FromPeer {
            member: Some(member),
        }) = req.extensions().get::<FromPeer>()
        {
            if *member != r.node_id {
                return Err(Status::permission_denied(format!(
                    "node_id: {} is not the member the peer certificate names ({member})",
                    r.node_id
                )));
            }
        }
        let res = r.resources.unwrap_or_default();
        let beat = Beat {
            status: r.status.clone(),
            resources: Resources {
                memory_bytes: res.memory_bytes,
                cpu_seconds: res.cpu_seconds,
                actors: res.actors,
                applied_index: res.applied_index,
            },
            incarnation: r.incarnation,
        };
        let version = self
            .membership
            .send_timeout(
                ReceiveBeat {
                    from: r.node_id,
                    beat,
                },
                deadline::of(&req, self.timeout),
            )
            .await
            .map_err(|e| deadline::send_status(e, "membership"))?
            .map_err(|e| match e {
                BeatRefused::NotMember(m) => Status::not_found(m),
                BeatRefused::Duplicate(m) => Status::already_exists(m),
            })?;
        // Accepted: this is how members learn where clients reach each other.
        self.directory
            .set_client_address(r.node_id, &r.client_address);
        Ok(Response::new(pb::HeartbeatResponse {
            topology_version: version,
            interval_ms: self.heartbeat_interval.as_millis() as i64,
        }))
    }

    async fn get_topology(
        &self,
        req: Request<pb::GetTopologyRequest>,
    ) -> Result<Response<pb::GetTopologyResponse>, Status> {
        let current = self.directory.current().topology.version;
        if current <= req.get_ref().min_version {
            return Ok(Response::new(pb::GetTopologyResponse {
                not_modified: true,
                version: current,
                topology: None,
            }));
        }
        let t = self.view(deadline::of(&req, self.timeout)).await?;
        Ok(Response::new(pb::GetTopologyResponse {
            not_modified: false,
            version: t.version,
            topology: Some(t),
        }))
    }

    type WatchTopologyStream = Pin<Box<dyn Stream<Item = Result<pb::Topology, Status>> + Send>>;

    async fn watch_topology(
        &self,
        _: Request<pb::WatchTopologyRequest>,
    ) -> Result<Response<Self::WatchTopologyStream>, Status> {
        let mut changes = self.directory.subscribe();
        let directory = self.directory.clone();
        let membership = self.membership.clone();
        let timeout = self.timeout;
        let stream = stream_until_shutdown(self.shutdown.clone(), move |out| async move {
            let mut sent = None;
            loop {
                let version = changes.borrow_and_update().topology.version;
                if sent != Some(version) {
                    let view = membership
                        .send_timeout(GetTopologyView, timeout)
                        .await
                        .map(|v| topology(v, &directory))
                        .map_err(|e| deadline::send_status(e, "membership"));
                    let failed = view.is_err();
                    if out.send(view).await.is_err() || failed {
                        return;
                    }
                    sent = Some(version);
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let s = self
            .raft
            .send_timeout(GetStatus, deadline::of(&req, self.timeout))
            .await
            .map_err(|e| deadline::send_status(e, "raft member"))?
            .map_err(|e| self.members.status(&e))?;
        Ok(Response::new(pb::StatusResponse {
            id: s.id,
            role: s.role,
            term: s.term,
            leader_id: s.leader.unwrap_or(0),
            commit: s.commit,
            applied: s.applied,
            voters: s.voters,
            learners: s.learners,
            voters_outgoing: s.voters_outgoing,
            revision: s.revision,
            snapshot_index: s.snapshot_index,
            topology_version: self.directory.current().topology.version,
            incarnation: self.incarnation,
        }))
    }
}

/// Sends heartbeats to peers over gRPC, one call at a time per peer: a beat to a peer still
/// busy with the previous one is skipped (the next one carries fresher figures anyway).
pub struct GrpcHeartbeats {
    io: tokio::runtime::Handle,
    link: PeerLink,
    /// Where clients reach this node, published in every beat.
    client_address: String,
    timeout: Duration,
    busy: Arc<Mutex<HashSet<String>>>,
    channels: Arc<Mutex<HashMap<String, PeerChannel>>>,
    /// Peers refusing this process's beats as a duplicate's: logged once per refusal spell.
    refused: Arc<Mutex<HashSet<String>>>,
    log: Logger,
}

impl GrpcHeartbeats {
    /// Beats run on `io`, each given up after `timeout`; they tell the others `client_address`.
    pub fn new(
        io: tokio::runtime::Handle,
        link: PeerLink,
        client_address: String,
        timeout: Duration,
        log: &Logger,
    ) -> Self {
        Self {
            io,
            link,
            client_address,
            timeout,
            busy: Default::default(),
            channels: Default::default(),
            refused: Default::default(),
            log: log.new(slog::o!("actor" => "heartbeats")),
        }
    }
}

impl HeartbeatSender for GrpcHeartbeats {
    fn send(&self, from: u64, addr: &str, beat: Beat) {
        if !self.busy.lock().unwrap().insert(addr.to_string()) {
            return;
        }
        let (busy, channels, link) = (self.busy.clone(), self.channels.clone(), self.link.clone());
        let client_address = self.client_address.clone();
        let (refused, log) = (self.refused.clone(), self.log.clone());
        let addr = addr.to_string();
        let timeout = self.timeout;
        self.io.spawn(async move {
            let call = async {
                let cached = channels.lock().unwrap().get(&addr).cloned();
                let channel = match cached {
                    Some(c) => c,
                    None => {
                        let c = link.connect(&addr).await?;
                        channels.lock().unwrap().insert(addr.clone(), c.clone());
                        c
                    }
                };
                let answer = ClusterClient::new(channel)
                    .heartbeat(pb::HeartbeatRequest {
                        node_id: from,
                        status: beat.status,
                        resources: Some(resources(&beat.resources)),
                        incarnation: beat.incarnation,
                        client_address,
                    })
                    .await;
                Ok::<_, String>(answer)
            };
            let answer = tokio::time::timeout(timeout, call).await;
            let mut refused = refused.lock().unwrap();
            match answer {
                Ok(Ok(Err(s)))
                    if s.code() == Code::AlreadyExists && refused.insert(addr.clone()) =>
                {
                    warn!(log, "a member refuses this process's heartbeats: another process runs as this member, or this one restarted and the previous one was heard from too recently"; "peer" => &addr, "reason" => s.message());
                }
                Ok(Ok(Ok(_))) if refused.remove(&addr) => {
                    info!(log, "heartbeats accepted again"; "peer" => &addr);
                }
                _ => {}
            }
            drop(refused);
            busy.lock().unwrap().remove(&addr);
        });
    }
}
