//! `--join`: how a new node becomes a member of a running cluster.
//!
//! 1. Register as a learner through any of the given members (followers forward to the leader).
//!    A learner receives the log, or a snapshot when the log was compacted, without voting, so a
//!    node that is still empty never weakens the quorum.
//! 2. Wait until this node has applied the leader's commit index as of the registration.
//! 3. Ask to be promoted to voter (unless `join_as = "learner"`).
//!
//! Before step 1, the node learns the cluster's id from the member it joins through (every peer
//! answer names it) and stores it; a data directory of another cluster is refused, naming both.
//!
//! Each step is idempotent, so a node restarted in the middle simply runs it again. Transient
//! failures (no leader yet, another membership change under way, a member unreachable) are
//! retried with backoff for as long as it takes; refusals (an id or address taken by another
//! member, bad input) end the node with the reason. Step 1 runs before the node says it is
//! ready ([`Join::register`]): a node the cluster refuses exits 2 without ever being ready.

use std::time::Duration;

use lodge_actors::cluster::raft::{GetStatus, RaftNode};
use lodge_actors::cluster::topology::Directory;
use lodge_actors::ActorRef;
use lodge_grpc::pb::cluster::{self as pb, cluster_client::ClusterClient};
use lodge_grpc::peer::{format_id, id_in, PeerChannel, PeerLink};
use slog::{info, warn, Logger};
use tonic::Code;

/// A join in progress.
pub struct Join {
    pub id: u64,
    /// This node's peer address.
    pub advertise: String,
    /// Members' peer addresses.
    pub endpoints: Vec<String>,
    pub as_voter: bool,
    pub link: PeerLink,
    /// Where the cluster id learned is stored.
    pub data_dir: std::path::PathBuf,
    pub raft: ActorRef<RaftNode>,
    pub directory: Directory,
    pub log: Logger,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(3);

/// What is left of a join once registered: the commit index to catch up to.
pub struct Registered {
    commit_index: u64,
}

impl Join {
    /// Step 1: registers this node as a learner (unless it is a member already: `None`); an
    /// error is a refusal the node cannot get past.
    pub async fn register(&self) -> Result<Option<Registered>, String> {
        self.learn_cluster_id().await?;
        let status = self.raft.send(GetStatus).await.ok().and_then(Result::ok);
        let member = status
            .as_ref()
            .is_some_and(|s| s.voters.contains(&self.id) || s.learners.contains(&self.id));
        if member
            && status
                .as_ref()
                .is_some_and(|s| s.voters.contains(&self.id) || !self.as_voter)
        {
            info!(self.log, "already a member; nothing to join"; "node" => self.id);
            return Ok(None);
        }
        let registered = self
            .call("RegisterNode", |mut c, _| {
                let req = pb::RegisterNodeRequest {
                    id: self.id,
                    address: self.advertise.clone(),
                    role: pb::Role::Learner as i32,
                    force: false,
                };
                async move { c.register_node(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        let topology = registered.topology.unwrap_or_default();
        let voter = pb::Role::Voter as i32;
        if topology
            .members
            .iter()
            .any(|m| m.id == self.id && m.role == voter)
        {
            // A voter with an empty log has forgotten its votes: letting it vote again could
            // elect two leaders in one term. Its old membership must go first.
            return Err(format!(
                "member {} is already a voter, but this node's log is empty (was its data directory lost?): remove it first (lodge cluster remove {}), then join again",
                self.id, self.id
            ));
        }
        // Until the leader's snapshot arrives, this is how the node reaches the others.
        self.directory
            .hint(topology.members.iter().map(|m| (m.id, m.address.clone())));
        info!(self.log, "registered as a learner; catching up"; "topology_version" => topology.version, "commit_index" => registered.commit_index);
        Ok(Some(Registered {
            commit_index: registered.commit_index,
        }))
    }

    /// Asks the cluster for its id; stores it when this node has none, refuses to go on when it
    /// has another.
    async fn learn_cluster_id(&self) -> Result<(), String> {
        let (theirs, through) = self
            .call("Status", |mut c, ep| async move {
                let r = c.status(pb::StatusRequest {}).await?;
                Ok((id_in(r.metadata()), ep))
            })
            .await?;
        let Some(theirs) = theirs else {
            warn!(self.log, "the member joined through names no cluster id (an older version?); this node's is left as it is"; "endpoint" => &through);
            return Ok(());
        };
        match self.link.cluster.get() {
            Some(ours) if ours != theirs => Err(format!(
                "cluster id mismatch: this node's data directory ({}) belongs to cluster {}, the member at {through} to cluster {}; a node cannot join another cluster with its data. Start it with an empty data directory to join",
                self.data_dir.display(),
                format_id(ours),
                format_id(theirs)
            )),
            Some(_) => Ok(()),
            None => {
                crate::cluster_id::store(&self.data_dir, theirs)?;
                let _ = self.link.cluster.set(theirs);
                info!(self.log, "joining cluster"; "cluster_id" => format_id(theirs), "through" => &through);
                Ok(())
            }
        }
    }

    /// Steps 2 and 3: catches up, then asks for promotion; an error is a refusal the node cannot
    /// get past.
    pub async fn finish(self, registered: Registered) -> Result<(), String> {
        self.catch_up(registered.commit_index).await;
        if !self.as_voter {
            info!(self.log, "joined as a learner");
            return Ok(());
        }
        self.call("PromoteNode", |mut c, _| {
            let req = pb::PromoteNodeRequest {
                id: self.id,
                force: false,
            };
            async move { c.promote_node(req).await.map(|r| r.into_inner()) }
        })
        .await?;
        info!(self.log, "joined as a voter");
        Ok(())
    }

    /// Waits until this node applied `index`.
    async fn catch_up(&self, index: u64) {
        let mut every = tokio::time::interval(Duration::from_millis(100));
        loop {
            every.tick().await;
            if let Ok(Ok(s)) = self.raft.send(GetStatus).await {
                if s.applied >= index {
                    return;
                }
            }
        }
    }

    /// Calls a cluster RPC on the join endpoints in turn until one answers; retries what is
    /// transient, gives up on a refusal.
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, String>
    where
        F: Fn(ClusterClient<PeerChannel>, String) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mut backoff = BACKOFF_MIN;
        loop {
            for ep in &self.endpoints {
                let channel = match self.link.connect(ep).await {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(self.log, "join endpoint unreachable"; "endpoint" => ep, "error" => e);
                        continue;
                    }
                };
                match f(ClusterClient::new(channel), ep.clone()).await {
                    Ok(v) => return Ok(v),
                    Err(s)
                        if matches!(
                            s.code(),
                            Code::Unavailable
                                | Code::DeadlineExceeded
                                | Code::Aborted
                                | Code::Unknown
                        ) =>
                    {
                        warn!(self.log, "join call not answered; retrying"; "call" => what, "endpoint" => ep, "error" => s.message());
                    }
                    Err(s) => {
                        return Err(format!(
                            "{what} through {ep}: {:?}: {}",
                            s.code(),
                            s.message()
                        ))
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}
