//! The store client's way to a group's leader on another member, both ends: [`PeerLeaderLink`]
//! sends `lodge.raft.v1.Raft/Propose` and `/Read` over the peer port, and [`serve_propose`] /
//! [`serve_read`] answer them on the leader with its own store client, never sending them on.
//!
//! The command or query and the whole outcome (answer or error) travel in the actors' own
//! encoding, so a follower tells its caller exactly what the leader said. A gRPC error means
//! the call went wrong on its way; whether it may have reached the leader decides whether a
//! write's outcome is unknown.

use std::sync::Arc;
use std::time::Duration;

use lodge_actors::cluster::client::{
    Answer, Client, ClientError, GroupId, LeaderLink, LinkError, LinkFuture, Route,
};
use lodge_actors::cluster::kv::{ApplyResult, Command};
use lodge_actors::cluster::raft::{Query, ReadAnswer};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Code, Request, Response, Status};

use crate::members::Members;
use crate::pb::raft::{raft_client::RaftClient, GroupAnswer, GroupCall};

/// Leaders reached on their members' peer addresses.
pub struct PeerLeaderLink {
    members: Arc<Members>,
}

impl PeerLeaderLink {
    /// A link over `members`' channels.
    pub fn new(members: Arc<Members>) -> Arc<Self> {
        Arc::new(Self { members })
    }

    async fn call<T: DeserializeOwned>(
        members: Arc<Members>,
        leader: u64,
        group: GroupId,
        body: Vec<u8>,
        budget: Duration,
        read: bool,
    ) -> Result<Answer<T>, ClientError> {
        let channel = members
            .member(leader)
            .await
            .map_err(|s| ClientError::Link(LinkError::NotSent(s.message().to_string())))?;
        // The leader keeps its answers within its own limits; ours need not match them.
        let mut client = RaftClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let mut req = Request::new(GroupCall {
            group: group.0,
            body,
        });
        req.set_timeout(budget.max(Duration::from_millis(1)));
        let answer = if read {
            client.read(req).await
        } else {
            client.propose(req).await
        };
        let body = answer
            .map_err(|s| link_error(leader, &s))?
            .into_inner()
            .body;
        postcard::from_bytes::<Result<Answer<T>, ClientError>>(&body).map_err(|e| {
            ClientError::Link(LinkError::NoAnswer(format!(
                "member {leader} answered with something this member cannot read ({e}): are both running the same version?"
            )))
        })?
    }
}

/// What a failed call to the leader means for its outcome.
fn link_error(leader: u64, s: &Status) -> ClientError {
    let m = format!("member {leader}: {}", s.message());
    ClientError::Link(match s.code() {
        Code::DeadlineExceeded => LinkError::Deadline(m),
        // The connection failed or broke: perhaps after the call went out.
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal => {
            LinkError::NoAnswer(m)
        }
        // Refused before the leader's store client saw it (identity, cluster id, limits).
        _ => LinkError::NotSent(m),
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("commands and queries encode")
}

impl LeaderLink for PeerLeaderLink {
    fn propose(
        &self,
        leader: u64,
        group: GroupId,
        cmd: Command,
        budget: Duration,
    ) -> LinkFuture<ApplyResult> {
        let members = self.members.clone();
        let body = encode(&cmd);
        Box::pin(Self::call(members, leader, group, body, budget, false))
    }

    fn read(
        &self,
        leader: u64,
        group: GroupId,
        query: Query,
        budget: Duration,
    ) -> LinkFuture<ReadAnswer> {
        let members = self.members.clone();
        let body = encode(&query);
        Box::pin(Self::call(members, leader, group, body, budget, true))
    }
}

fn decode<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, Status> {
    postcard::from_bytes(body).map_err(|e| {
        Status::invalid_argument(format!("body: not a {what} this member can read: {e}"))
    })
}

fn answered<T: Serialize>(outcome: Result<Answer<T>, ClientError>) -> Response<GroupAnswer> {
    Response::new(GroupAnswer {
        body: encode(&outcome),
    })
}

/// Serves another member's proposal on this member (the leader it knew), within `budget`.
pub async fn serve_propose(
    store: &Client,
    call: GroupCall,
    budget: Duration,
) -> Result<Response<GroupAnswer>, Status> {
    let cmd: Command = decode(&call.body, "command")?;
    let outcome = store
        .propose(GroupId(call.group), cmd, budget, Route::Here)
        .await;
    Ok(answered(outcome))
}

/// Serves another member's leader-only read on this member, within `budget`.
pub async fn serve_read(
    store: &Client,
    call: GroupCall,
    budget: Duration,
) -> Result<Response<GroupAnswer>, Status> {
    let query: Query = decode(&call.body, "query")?;
    let outcome = store
        .read(GroupId(call.group), query, true, budget, Route::Here)
        .await;
    Ok(answered(outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_connection_leaves_a_write_unknown_and_a_refusal_does_not() {
        let lost = link_error(2, &Status::unavailable("connection reset"));
        assert!(lost.outcome_unknown(), "{lost:?}");
        let refused = link_error(2, &Status::permission_denied("not a member"));
        assert!(!refused.outcome_unknown(), "{refused:?}");
        assert!(refused.to_string().starts_with("member 2: not a member"));
        let late = link_error(2, &Status::deadline_exceeded("too slow"));
        assert_eq!(
            late.into_raft(),
            lodge_actors::cluster::raft::RaftError::Timeout
        );
    }
}
