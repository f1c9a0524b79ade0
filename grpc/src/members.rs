//! Calls to other members, and how the store's errors are told to callers.
//!
//! [`Members`] keeps one channel per member's peer address (addresses come from the replicated
//! topology, so members added at run time are reached like the first ones). The store client
//! reaches leaders through it ([`crate::leader_link`]); the cluster adapter forwards membership
//! calls, and the router relays sessions, over it.
//!
//! A membership call that reaches a follower is sent once to the leader that follower knows,
//! marked so that a second follower does not forward it again (no loops while views of the
//! leader differ); without a known leader the caller gets UNAVAILABLE naming what is missing.
//! What clients are told (`lodge-leader`, the messages) names the leader's client address.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use lodge_actors::cluster::client::{ClientError, LinkError};
use lodge_actors::cluster::raft::RaftError;
use lodge_actors::cluster::topology::Directory;
use lodge_actors::SendError;
use tonic::{Request, Status};

use crate::outcome::outcome_unknown_status;
use crate::peer::{PeerChannel, PeerLink};

/// Metadata key marking a request forwarded by a member.
pub const FORWARDED: &str = "lodge-forwarded";

/// Metadata key naming the member that produced a status (absent: the transport did).
pub const ANSWERED_BY: &str = "lodge-member";

/// Channels to the other members, and the statuses that name them.
pub struct Members {
    member_id: u64,
    directory: Directory,
    link: PeerLink,
    /// Channels by address: tonic channels reconnect by themselves.
    channels: Mutex<HashMap<String, PeerChannel>>,
}

impl Members {
    /// The members as member `member_id` reaches them, finding addresses in `directory`.
    pub fn new(member_id: u64, directory: Directory, link: PeerLink) -> Self {
        Self {
            member_id,
            directory,
            link,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// This member's id.
    pub fn member_id(&self) -> u64 {
        self.member_id
    }

    /// A channel to the leader named in `err`, if the request may be forwarded; otherwise the
    /// status to answer.
    pub async fn leader<T>(
        &self,
        req: &Request<T>,
        err: &RaftError,
    ) -> Result<PeerChannel, Status> {
        let RaftError::NotLeader {
            leader: Some(leader),
        } = err
        else {
            return Err(self.status(err));
        };
        if req.metadata().contains_key(FORWARDED) || *leader == self.member_id {
            return Err(self.status(err));
        }
        let addr = self
            .directory
            .address(*leader)
            .ok_or_else(|| self.status(err))?;
        self.channel(addr).await
    }

    /// A channel to member `id` (relaying a session to its owner, say).
    pub async fn member(&self, id: u64) -> Result<PeerChannel, Status> {
        let addr = self.directory.address(id).ok_or_else(|| {
            Status::unavailable(format!("member {id}'s address is not known here; retry"))
        })?;
        self.channel(addr).await
    }

    /// The cached channel to `addr`, or a new one (tonic channels reconnect by themselves).
    async fn channel(&self, addr: String) -> Result<PeerChannel, Status> {
        let cached = self.channels.lock().unwrap().get(&addr).cloned();
        match cached {
            Some(c) => Ok(c),
            None => {
                let c = self
                    .link
                    .connect(&addr)
                    .await
                    .map_err(Status::unavailable)?;
                self.channels.lock().unwrap().insert(addr, c.clone());
                Ok(c)
            }
        }
    }

    /// The status for a raft error of this member, with the leader's address when it is known.
    pub fn status(&self, e: &RaftError) -> Status {
        self.raft_status(e, self.member_id)
    }

    /// The status for a raft error that member `member` produced.
    fn raft_status(&self, e: &RaftError, member: u64) -> Status {
        let mut s = self.status_of(e);
        if let Ok(v) = member.to_string().parse() {
            s.metadata_mut().insert(ANSWERED_BY, v);
        }
        s
    }

    /// The status for a store client's error; `write` says whether the call was a write, whose
    /// outcome a lost answer leaves unknown.
    pub fn client_status(&self, e: &ClientError, write: bool) -> Status {
        match e {
            ClientError::Raft { error, member } => self.raft_status(error, *member),
            ClientError::Member { error, .. } if !write => {
                crate::deadline::send_status(*error, "raft member")
            }
            ClientError::Link(LinkError::NoAnswer(m)) if !write => Status::unavailable(m.clone()),
            // Delivered, then the member stopped: the write may have gone out.
            ClientError::Member {
                error: SendError::Closed,
                ..
            } => outcome_unknown_status(
                "the raft member stopped while the write was in flight; it may or may not have been applied: read before retrying",
            ),
            ClientError::Member { error, .. } => {
                crate::deadline::send_status(*error, "raft member")
            }
            ClientError::NoGroup { .. } => Status::not_found(e.to_string()),
            ClientError::Link(LinkError::NoAnswer(m)) => outcome_unknown_status(&format!(
                "the leader did not answer a write forwarded to it; it may or may not have been applied: read before retrying ({m})"
            )),
            ClientError::Link(LinkError::NotSent(m)) => Status::unavailable(m.clone()),
            ClientError::Link(LinkError::Deadline(m)) => Status::deadline_exceeded(m.clone()),
        }
    }

    fn status_of(&self, e: &RaftError) -> Status {
        match e {
            RaftError::NotLeader { leader: Some(l) } => {
                let addr = self.directory.client_address(*l);
                let mut s = Status::unavailable(format!(
                    "not the leader; the leader is member {l} at {}",
                    addr.as_deref().unwrap_or("an unknown address")
                ));
                if let Some(a) = addr.and_then(|a| a.parse().ok()) {
                    s.metadata_mut().insert("lodge-leader", a);
                }
                s
            }
            RaftError::NotLeader { leader: None } => {
                Status::unavailable("no leader is known; try again shortly")
            }
            // UNAVAILABLE with the leader, as the issue and etcd do; but this write may have
            // applied, so it is marked: a client must read before retrying it.
            RaftError::Unknown { leader } => {
                let addr = leader.and_then(|l| self.directory.client_address(l));
                let mut s = outcome_unknown_status(&format!(
                    "leadership changed while the write was in flight; it may or may not have been applied: read before retrying (leader: {})",
                    match (leader, &addr) {
                        (Some(l), Some(a)) => format!("member {l} at {a}"),
                        _ => "not known yet".to_string(),
                    }
                ));
                if let Some(a) = addr.and_then(|a| a.parse().ok()) {
                    s.metadata_mut().insert("lodge-leader", a);
                }
                s
            }
            RaftError::Timeout => {
                Status::unavailable("no leader could confirm the request in time")
            }
            RaftError::Rejected(m) | RaftError::Busy(m) => Status::unavailable(m.clone()),
            RaftError::Invalid(m) => Status::invalid_argument(m.clone()),
            RaftError::Conflict(m) => Status::already_exists(m.clone()),
            RaftError::NotFound(m) => Status::not_found(m.clone()),
            RaftError::Precondition(m) => Status::failed_precondition(m.clone()),
            RaftError::Compacted(m) => Status::out_of_range(m.clone()),
        }
    }
}

/// The request to send to the leader: marked as forwarded, with what is left of the caller's
/// budget as its deadline.
pub fn forwarded<T>(msg: T, budget: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert(FORWARDED, "1".parse().expect("static"));
    let ms = budget.as_millis().clamp(1, 99_999_999);
    r.metadata_mut().insert(
        "grpc-timeout",
        format!("{ms}m").parse().expect("digits and a unit"),
    );
    r
}
