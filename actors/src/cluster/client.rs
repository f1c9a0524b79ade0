//! The store client: the one way everything inside the node reaches the replicated store.
//!
//! The KV adapter, the registry, the router's owner records and the balancer's state all call
//! [`Client`]; none of them talks to a raft actor or to another member on its own. The client
//! knows which raft group a call is for (a [`GroupId`] on every call, though today there is
//! only [`KV_GROUP`]), asks this member's raft actor of that group first, and when only the
//! group's leader can answer (lease renewals and lookups, or a proposal raft itself dropped)
//! sends the call once to the leader over a [`LeaderLink`]. Proposals from a follower normally
//! need no link: raft forwards them to the leader on the member streams (as etcd does).
//!
//! Errors say whether a write may have been applied ([`ClientError::outcome_unknown`]): such a
//! write must not be retried blindly, and the client never retries one. Nothing else is
//! retried either; callers that loop (the registry's reload, the router's renewals) decide
//! their own pace.
//!
//! The node implements [`LeaderLink`] with its peer port's gRPC client; tests use the in-memory
//! cluster.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::kv::{ApplyResult, Command, KeyValue};
use super::raft::{CancelWatch, Propose, Query, RaftError, RaftNode, Read, ReadAnswer, Watch};
use super::store::Listing;
use super::watch::{WatchSpec, WatchUpdate};
use crate::envelope::{ActorRef, SendError};

/// A raft group: one replicated log and the state it drives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GroupId(pub u64);

/// The group holding the node's key-value store (and every record kept in it).
pub const KV_GROUP: GroupId = GroupId(0);

impl std::fmt::Display for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "group {}", self.0)
    }
}

/// Where a call may be served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// This member, or the group's leader if only it can answer.
    Leader,
    /// This member only: the call was sent here by another member's client, and is not sent on
    /// again (no loops while members disagree about who leads).
    Here,
}

/// An answer and the member that produced it (what a KV answer's header names).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer<T> {
    pub value: T,
    pub member: u64,
}

/// Why a call to the store failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientError {
    /// The raft member `member` refused the call or could not serve it.
    Raft { error: RaftError, member: u64 },
    /// The raft actor of `member` did not take or answer the call (`Closed` after it took a
    /// write: the write may have gone out).
    Member { error: SendError, member: u64 },
    /// No raft group of that id runs on `member`.
    NoGroup { group: GroupId, member: u64 },
    /// The leader could not be asked, or did not answer.
    Link(LinkError),
}

/// How a call to the leader failed on its way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkError {
    /// The call did not leave this member (no connection, or the leader refused the caller).
    NotSent(String),
    /// The call may have reached the leader, and no answer came back.
    NoAnswer(String),
    /// The leader did not answer within the call's budget.
    Deadline(String),
}

impl ClientError {
    /// Whether a write that failed so may have been applied anyway.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            Self::Raft {
                error: RaftError::Unknown { .. },
                ..
            } | Self::Member {
                error: SendError::Closed,
                ..
            } | Self::Link(LinkError::NoAnswer(_))
        )
    }

    /// The error as a raft error, for callers that only tell "not found" and "timed out" apart
    /// from "retry later".
    pub fn into_raft(self) -> RaftError {
        match self {
            Self::Raft { error, .. } => error,
            Self::Member {
                error: SendError::Timeout,
                ..
            }
            | Self::Link(LinkError::Deadline(_)) => RaftError::Timeout,
            e => RaftError::Busy(e.to_string()),
        }
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Raft { error, .. } => write!(f, "{error}"),
            Self::Member { error, .. } => write!(f, "raft member: {error}"),
            Self::NoGroup { group, member } => {
                write!(f, "{group}: no such raft group on member {member}")
            }
            Self::Link(LinkError::NotSent(m) | LinkError::NoAnswer(m) | LinkError::Deadline(m)) => {
                f.write_str(m)
            }
        }
    }
}

/// What a call to the leader answers.
pub type LinkFuture<T> = Pin<Box<dyn Future<Output = Result<Answer<T>, ClientError>> + Send>>;

/// How a member reaches the leader of a group on another member. The leader serves the call
/// with its own client and [`Route::Here`], and its answer (or its error) comes back whole.
pub trait LeaderLink: Send + Sync + 'static {
    /// Proposes `cmd` on member `leader` of `group`, within `budget`.
    fn propose(
        &self,
        leader: u64,
        group: GroupId,
        cmd: Command,
        budget: Duration,
    ) -> LinkFuture<ApplyResult>;
    /// Reads `query` (linearizably) on member `leader` of `group`, within `budget`.
    fn read(
        &self,
        leader: u64,
        group: GroupId,
        query: Query,
        budget: Duration,
    ) -> LinkFuture<ReadAnswer>;
}

/// The largest page a listing asks for: pages from the leader travel in one gRPC message.
const LISTING_PAGE_BYTES: usize = 4 << 20;

/// The store client of one member. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    member_id: u64,
    /// This member's raft actor of each group it runs.
    groups: HashMap<GroupId, ActorRef<RaftNode>>,
    link: Arc<dyn LeaderLink>,
    /// The budget of calls made without one (the [`super::store::Store`] methods).
    timeout: Duration,
}

impl Client {
    /// The client of member `member_id`, whose raft actor of [`KV_GROUP`] is `kv`.
    pub fn new(
        member_id: u64,
        kv: ActorRef<RaftNode>,
        link: Arc<dyn LeaderLink>,
        timeout: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                member_id,
                groups: HashMap::from([(KV_GROUP, kv)]),
                link,
                timeout,
            }),
        }
    }

    /// This member's id.
    pub fn member_id(&self) -> u64 {
        self.inner.member_id
    }

    /// The budget of calls made without one.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    fn member(&self, group: GroupId) -> Result<&ActorRef<RaftNode>, ClientError> {
        self.inner.groups.get(&group).ok_or(ClientError::NoGroup {
            group,
            member: self.inner.member_id,
        })
    }

    fn raft_error(&self, error: RaftError) -> ClientError {
        ClientError::Raft {
            error,
            member: self.inner.member_id,
        }
    }

    fn answer<T>(&self, value: T) -> Answer<T> {
        Answer {
            value,
            member: self.inner.member_id,
        }
    }

    /// The leader to send a call to that this member could not serve, if it may be sent on.
    fn leader_for(&self, error: &RaftError, route: Route) -> Option<u64> {
        match (error, route) {
            (RaftError::NotLeader { leader: Some(l) }, Route::Leader)
                if *l != self.inner.member_id =>
            {
                Some(*l)
            }
            _ => None,
        }
    }

    /// Asks this member (`here`); when only the group's leader can answer and `route` allows,
    /// asks the leader once (`leader`), with what is left of `budget`.
    async fn here_then_leader<T>(
        &self,
        route: Route,
        budget: Duration,
        here: impl Future<Output = Result<Result<T, RaftError>, SendError>>,
        leader: impl FnOnce(u64, Duration) -> LinkFuture<T>,
    ) -> Result<Answer<T>, ClientError> {
        let started = Instant::now();
        let answered = here.await.map_err(|error| ClientError::Member {
            error,
            member: self.inner.member_id,
        })?;
        match answered {
            Ok(value) => Ok(self.answer(value)),
            Err(e) => match self.leader_for(&e, route) {
                Some(l) => leader(l, budget.saturating_sub(started.elapsed())).await,
                None => Err(self.raft_error(e)),
            },
        }
    }

    /// Writes `cmd` through `group`'s log; answered once it is applied on the member that
    /// answers. A command the store refused as a whole comes back in `ApplyResult::error`.
    pub async fn propose(
        &self,
        group: GroupId,
        cmd: Command,
        budget: Duration,
        route: Route,
    ) -> Result<Answer<ApplyResult>, ClientError> {
        let here = self
            .member(group)?
            .send_timeout(Propose(cmd.clone()), budget);
        let link = &self.inner.link;
        self.here_then_leader(route, budget, here, |leader, left| {
            link.propose(leader, group, cmd, left)
        })
        .await
    }

    /// Reads `query` from `group`: linearizably (the leader confirms it still leads) or from
    /// this member's state (no leader needed; may lag).
    pub async fn read(
        &self,
        group: GroupId,
        query: Query,
        linearizable: bool,
        budget: Duration,
        route: Route,
    ) -> Result<Answer<ReadAnswer>, ClientError> {
        let read = Read {
            query: query.clone(),
            linearizable,
        };
        let here = self.member(group)?.send_timeout(read, budget);
        let link = &self.inner.link;
        self.here_then_leader(route, budget, here, |leader, left| {
            link.read(leader, group, query, left)
        })
        .await
    }

    /// Every key under `prefix`, page by page, and the first page's revision: a watch from the
    /// revision after it misses nothing that changed while the later pages were read.
    pub async fn list(
        &self,
        group: GroupId,
        prefix: Vec<u8>,
        linearizable: bool,
        budget: Duration,
    ) -> Result<Listing, ClientError> {
        let mut listing = Listing::default();
        let mut after = None;
        let mut first = true;
        loop {
            let query = Query::Range {
                prefix: prefix.clone(),
                after: after.take(),
                limit: 0,
                max_bytes: LISTING_PAGE_BYTES,
            };
            let page = self
                .read(group, query, linearizable, budget, Route::Leader)
                .await?
                .value;
            if first {
                listing.revision = page.revision;
                first = false;
            }
            let more = page.more && !page.kvs.is_empty();
            after = page.kvs.last().map(|kv| kv.key.clone());
            listing.kvs.extend(page.kvs);
            if !more {
                return Ok(listing);
            }
        }
    }

    /// The value of `key`, read linearizably.
    pub async fn get(
        &self,
        group: GroupId,
        key: Vec<u8>,
        budget: Duration,
    ) -> Result<Option<KeyValue>, ClientError> {
        let a = self
            .read(group, Query::Get(key), true, budget, Route::Leader)
            .await?;
        Ok(a.value.kvs.into_iter().next())
    }

    /// Renews `lease` for its full time to live (on the leader, which alone keeps lease
    /// deadlines).
    pub async fn keep_alive(
        &self,
        group: GroupId,
        lease: i64,
        budget: Duration,
    ) -> Result<Answer<ReadAnswer>, ClientError> {
        self.read(group, Query::KeepAlive(lease), true, budget, Route::Leader)
            .await
    }

    /// Starts a watch on this member (every member applies the same changes in the same
    /// order); its updates arrive on `tx`. Answers the watch's id and the revision it starts
    /// after.
    pub async fn watch(
        &self,
        group: GroupId,
        spec: WatchSpec,
        tx: mpsc::Sender<WatchUpdate>,
        budget: Duration,
    ) -> Result<(u64, i64), ClientError> {
        self.member(group)?
            .send_timeout(Watch { spec, tx }, budget)
            .await
            .map_err(|error| ClientError::Member {
                error,
                member: self.inner.member_id,
            })?
            .map_err(|e| self.raft_error(e))
    }

    /// Ends watch `id` of `group` on this member.
    pub async fn cancel_watch(&self, group: GroupId, id: u64) {
        if let Ok(member) = self.member(group) {
            let _ = member.send(CancelWatch(id)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_after_a_write_may_have_gone_out_leave_its_outcome_unknown() {
        let unknown = [
            ClientError::Raft {
                error: RaftError::Unknown { leader: Some(2) },
                member: 1,
            },
            ClientError::Member {
                error: SendError::Closed,
                member: 1,
            },
            ClientError::Link(LinkError::NoAnswer("connection reset".into())),
        ];
        for e in unknown {
            assert!(e.outcome_unknown(), "{e:?}");
        }
        let known = [
            ClientError::Raft {
                error: RaftError::NotLeader { leader: Some(2) },
                member: 1,
            },
            ClientError::Member {
                error: SendError::NotRunning,
                member: 1,
            },
            ClientError::Member {
                error: SendError::Timeout,
                member: 1,
            },
            ClientError::Link(LinkError::NotSent("connection refused".into())),
            ClientError::Link(LinkError::Deadline("no answer in 5 s".into())),
            ClientError::NoGroup {
                group: GroupId(7),
                member: 1,
            },
        ];
        for e in known {
            assert!(!e.outcome_unknown(), "{e:?}");
        }
    }

    #[test]
    fn errors_cross_the_link_whole() {
        let e: Result<Answer<ApplyResult>, ClientError> = Err(ClientError::Raft {
            error: RaftError::NotFound("lease 7 not found".into()),
            member: 3,
        });
        let bytes = postcard::to_stdvec(&e).unwrap();
        let back: Result<Answer<ApplyResult>, ClientError> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, e);
    }
}
