//! `lodge.kv.v1.KV` → the raft member.
//!
//! Writes, linearizable reads and lease calls that reach a follower are forwarded once to the
//! leader (see [`crate::forward`]). Watches are served by the member the caller reached: every
//! member applies the same changes in the same order.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use lodge_actors::cluster::kv::{
    ApplyResult, Cmp, Command, Compare, Event, KeyValue, KvError, Op, OpResult, Target,
    MAX_LEASE_TTL,
};
use lodge_actors::cluster::raft::{
    CancelWatch, Propose, Query, RaftError, RaftNode, Read, ReadAnswer, Watch,
};
use lodge_actors::cluster::watch::{lagged, WatchSpec, WatchUpdate};
use lodge_actors::{ActorRef, SendError};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::deadline;
use crate::forward::{self, forwarded, Forwarder};
use crate::pb::kv::{self as pb, kv_client::KvClient, kv_server};

/// Updates a watch may have queued before the member drops it as too slow.
const WATCH_BUFFER: usize = 1024;

/// The KV adapter.
#[derive(Clone)]
pub struct KvService {
    raft: ActorRef<RaftNode>,
    forward: Arc<Forwarder>,
    timeout: Duration,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl KvService {
    /// Streams (watches, keep-alives) end when `shutdown` turns true.
    pub fn new(
        raft: ActorRef<RaftNode>,
        forward: Arc<Forwarder>,
        timeout: Duration,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            raft,
            forward,
            timeout,
            shutdown,
        }
    }

    fn header(&self, revision: i64) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader {
            revision,
            member_id: self.forward.member_id(),
        })
    }

    async fn propose<T>(&self, req: &Request<T>, cmd: Command) -> Result<ApplyResult, Failure> {
        let res = self
            .raft
            .send_timeout(Propose(cmd), deadline::of(req, self.timeout))
            .await
            .map_err(|e| {
                Failure::Status(match e {
                    // Delivered, then the member stopped: the write may have gone out.
                    SendError::Closed => forward::outcome_unknown_status(
                        "the raft member stopped while the write was in flight; it may or may not have been applied: read before retrying",
                    ),
                    e => deadline::send_status(e, "raft member"),
                })
            })?
            .map_err(Failure::Raft)?;
        match &res.error {
            Some(e) => Err(Failure::Status(kv_error(e))),
            None => Ok(res),
        }
    }

    async fn read<T>(
        &self,
        req: &Request<T>,
        query: Query,
        linearizable: bool,
    ) -> Result<ReadAnswer, Failure> {
        self.raft
            .send_timeout(
                Read {
                    query,
                    linearizable,
                },
                deadline::of(req, self.timeout),
            )
            .await
            .map_err(|e| Failure::Status(deadline::send_status(e, "raft member")))?
            .map_err(Failure::Raft)
    }

    /// A client to the leader, if this request may be forwarded and the leader is known.
    async fn leader_client<T>(
        &self,
        req: &Request<T>,
        err: &RaftError,
    ) -> Result<KvClient<tonic::transport::Channel>, Status> {
        Ok(KvClient::new(self.forward.leader(req, err).await?))
    }

    /// One keep-alive: here if this member leads, else on the leader (once: `forwarded` says
    /// the stream itself came from a member).
    async fn keep_alive_once(
        &self,
        id: i64,
        forwarded_here: bool,
    ) -> Result<pb::LeaseKeepAliveResponse, Status> {
        let mut req = Request::new(());
        if forwarded_here {
            req.metadata_mut()
                .insert(crate::forward::FORWARDED, "1".parse().expect("static"));
        }
        match self.read(&req, Query::KeepAlive(id), true).await {
            Ok(a) => {
                let l = a.lease.expect("keep-alive answers carry the lease");
                Ok(pb::LeaseKeepAliveResponse {
                    header: self.header(a.revision),
                    id,
                    ttl: l.ttl_secs,
                })
            }
            Err(Failure::Status(s)) => Err(s),
            Err(Failure::Raft(e)) => {
                let mut leader = self.leader_client(&req, &e).await?;
                let one = tokio_stream::iter([pb::LeaseKeepAliveRequest { id }]);
                let mut answers = leader
                    .lease_keep_alive(forwarded(one, self.timeout))
                    .await?
                    .into_inner();
                answers
                    .message()
                    .await?
                    .ok_or_else(|| Status::unavailable("the leader ended the keep-alive stream"))
            }
        }
    }
}

enum Failure {
    Raft(RaftError),
    Status(Status),
}

fn kv_error(e: &KvError) -> Status {
    match e {
        KvError::LeaseNotFound(_) => Status::not_found(e.to_string()),
        KvError::LeaseExists(_) => Status::already_exists(e.to_string()),
        KvError::BadTtl(_) => Status::invalid_argument(e.to_string()),
    }
}

/// A response stream fed by `work`, which runs until it is done, the node shuts down, or the
/// caller goes away.
pub(crate) fn stream_until_shutdown<T, F>(
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    work: impl FnOnce(mpsc::Sender<Result<T, Status>>) -> F,
) -> Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>
where
    T: Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    let work = work(tx.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = work => {}
            _ = shutdown.wait_for(|s| *s) => {}
            _ = tx.closed() => {}
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

fn kv(k: KeyValue) -> pb::KeyValue {
    pb::KeyValue {
        key: k.key,
        value: k.value,
        create_revision: k.create_revision,
        mod_revision: k.mod_revision,
        version: k.version,
        lease: k.lease,
    }
}

fn event(e: Event) -> pb::Event {
    let kind = if e.deleted {
        pb::event::EventType::Delete
    } else {
        pb::event::EventType::Put
    };
    pb::Event {
        r#type: kind as i32,
        kv: Some(kv(e.kv)),
        prev_kv: e.prev.map(kv),
    }
}

fn require_key(key: &[u8], field: &str) -> Result<(), Status> {
    if key.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(())
    }
}

fn compare(c: pb::Compare, i: usize) -> Result<Compare, Status> {
    require_key(&c.key, &format!("compare[{i}].key"))?;
    let cmp = match pb::compare::Result::try_from(c.result) {
        Ok(pb::compare::Result::Equal) => Cmp::Equal,
        Ok(pb::compare::Result::Greater) => Cmp::Greater,
        Ok(pb::compare::Result::Less) => Cmp::Less,
        Ok(pb::compare::Result::NotEqual) => Cmp::NotEqual,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "compare[{i}].result: unknown value {}",
                c.result
            )))
        }
    };
    let target = match c.target {
        Some(pb::compare::Target::Value(v)) => Target::Value(v),
        Some(pb::compare::Target::Version(v)) => Target::Version(v),
        Some(pb::compare::Target::CreateRevision(v)) => Target::CreateRevision(v),
        Some(pb::compare::Target::ModRevision(v)) => Target::ModRevision(v),
        None => {
            return Err(Status::invalid_argument(format!(
                "compare[{i}].target is required"
            )))
        }
    };
    Ok(Compare {
        key: c.key,
        cmp,
        target,
    })
}

fn op(o: pb::RequestOp, field: &str) -> Result<Op, Status> {
    match o.request {
        Some(pb::request_op::Request::Put(p)) => {
            require_key(&p.key, &format!("{field}.put.key"))?;
            Ok(Op::Put {
                key: p.key,
                value: p.value,
                lease: p.lease,
            })
        }
        Some(pb::request_op::Request::Delete(d)) => {
            require_key(&d.key, &format!("{field}.delete.key"))?;
            Ok(Op::Delete {
                key: d.key,
                prefix: d.prefix,
            })
        }
        Some(pb::request_op::Request::Get(g)) => {
            require_key(&g.key, &format!("{field}.get.key"))?;
            if g.prefix {
                return Err(Status::invalid_argument(format!(
                    "{field}.get.prefix: only single-key reads are allowed in a transaction"
                )));
            }
            Ok(Op::Get { key: g.key })
        }
        None => Err(Status::invalid_argument(format!(
            "{field}.request is required"
        ))),
    }
}

#[tonic::async_trait]
impl kv_server::Kv for KvService {
    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let r = req.get_ref();
        require_key(&r.key, "key")?;
        let cmd = Command::Put {
            key: r.key.clone(),
            value: r.value.clone(),
            lease: r.lease,
        };
        match self.propose(&req, cmd).await {
            Ok(a) => Ok(Response::new(pb::PutResponse {
                header: self.header(a.revision),
                prev_kv: if r.prev_kv {
                    a.prev.into_iter().next().map(kv)
                } else {
                    None
                },
            })),
            Err(Failure::Status(s)) => Err(s),
            Err(Failure::Raft(e)) => self
                .leader_client(&req, &e)
                .await?
                .put(forwarded(r.clone(), deadline::of(&req, self.timeout)))
                .await
                .map_err(forward::write_error),
        }
    }

    async fn range(
        &self,
        req: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let r = req.get_ref();
        if r.limit < 0 {
            return Err(Status::invalid_argument("limit must not be negative"));
        }
        if !r.prefix {
            require_key(&r.key, "key")?;
        }
        let query = if r.prefix {
            Query::Range {
                prefix: r.key.clone(),
                limit: r.limit as usize,
            }
        } else {
            Query::Get(r.key.clone())
        };
        match self.read(&req, query, !r.serializable).await {
            Ok(a) => Ok(Response::new(pb::RangeResponse {
                header: self.header(a.revision),
                count: a.count as i64,
                kvs: a.kvs.into_iter().map(kv).collect(),
            })),
            Err(Failure::Status(s)) => Err(s),
            Err(Failure::Raft(e)) => {
                self.leader_client(&req, &e)
                    .await?
                    .range(forwarded(r.clone(), deadline::of(&req, self.timeout)))
                    .await
            }
        }
    }

    async fn delete_range(
        &self,
        req: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let r = req.get_ref();
        require_key(&r.key, "key")?;
        let cmd = Command::Delete {
            key: r.key.clone(),
            prefix: r.prefix,
        };
        match self.propose(&req, cmd).await {
            Ok(a) => Ok(Response::new(pb::DeleteRangeResponse {
                header: self.header(a.revision),
                deleted: a.deleted as i64,
                prev_kvs: if r.prev_kv {
                    a.prev.into_iter().map(kv).collect()
                } else {
                    Vec::new()
                },
            })),
            Err(Failure::Status(s)) => Err(s),
            Err(Failure::Raft(e)) => self
                .leader_client(&req, &e)
                .await?
                .delete_range(forwarded(r.clone(), deadline::of(&req, self.timeout)))
                .await
                .map_err(forward::write_error),
        }
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let r = req.get_ref().clone();
        let compares = r
            .compare
            .into_iter()
            .enumerate()
            .map(|(i, c)| compare(c, i))
            .collect::<Result<Vec<_>, _>>()?;
        let success = r
            .success
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, o)| op(o, &format!("success[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let failure = r
            .failure
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, o)| op(o, &format!("failure[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let cmd = Command::Txn {
            compares,
            success,
            failure,
        };
        match self.propose(&req, cmd).await {
            Ok(a) => {
                let responses = a
                    .ops
                    .into_iter()
                    .map(|o| pb::ResponseOp {
                        response: Some(match o {
                            OpResult::Put { prev } => {
                                pb::response_op::Response::Put(pb::PutResponse {
                                    header: self.header(a.revision),
                                    prev_kv: prev.map(kv),
                                })
                            }
                            OpResult::Delete { deleted, prev } => {
                                pb::response_op::Response::Delete(pb::DeleteRangeResponse {
                                    header: self.header(a.revision),
                                    deleted: deleted as i64,
                                    prev_kvs: prev.into_iter().map(kv).collect(),
                                })
                            }
                            OpResult::Get(found) => {
                                pb::response_op::Response::Get(pb::RangeResponse {
                                    header: self.header(a.revision),
                                    count: found.is_some() as i64,
                                    kvs: found.into_iter().map(kv).collect(),
                                })
                            }
                        }),
                    })
                    .collect();
                Ok(Response::new(pb::TxnResponse {
                    header: self.header(a.revision),
                    succeeded: a.succeeded,
                    responses,
                }))
            }
            Err(Failure::Status(s)) => Err(s),
            Err(Failure::Raft(e)) => {
                let original = req.get_ref().clone();
                self.leader_client(&req, &e)
                    .await?
                    .txn(forwarded(original, deadline::of(&req, self.timeout)))
                    .await
                    .map_err(forward::write_error)
            }
        }
    }

    async fn lease_grant(
        &self,
        req: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let r = req.get_ref();
        if !(1..=MAX_LEASE_TTL).contains(&r.ttl) {
            return Err(Status::invalid_argument(format!(
                "ttl: {} s; a lease lives at least 1 s and at most {MAX_LEASE_TTL} s",
                r.ttl
            )));
        }
        if r.id < 0 {
            return Err(Status::invalid_argument("id must not be negative"));
        }
        let cmd = Command::LeaseGrant {
            id: r.id,
            ttl_secs: r.ttl,
        };
        match self.propose(&req, cmd).await {
            Ok(a) => Ok(Response::new(pb::LeaseGrantResponse {
                header: self.header(a.revision),
                id: a.lease,
                ttl: r.ttl,
            })),
            Err(Failure::Status(s)) => Err(s),
            Err(Failure::Raft(e)) => self
                .leader_client(&req, &e)
                .await?
                .lease_grant(forwarded(*r, deadline::of(&req, self.timeout)))
                .await
                .map_err(forward::write_error),
        }
    }

    async fn lease_revoke(
        &self,
        req: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let r = req.get_ref();
        if r.id <= 0 {
            return Err(Status::invalid_argument(
                "id is required (a positive lease id)",
            ));
        }
        let cmd = Command::LeaseRevoke {
            id: r.id,
            expired: false,
        };
        match self.propose(&req, cmd).await {
            Ok(a) => Ok(Response::new(pb::LeaseRevokeResponse {
                header: self.header(a.revision),
                deleted: a.deleted as i64,
            })),
            Err(Failure::Status(s)) => Err(s),
            Err(Failure::Raft(e)) => self
                .leader_client(&req, &e)
                .await?
                .lease_revoke(forwarded(*r, deadline::of(&req, self.timeout)))
                .await
                .map_err(forward::write_error),
        }
    }

    type LeaseKeepAliveStream =
        Pin<Box<dyn Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send>>;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let forwarded_here = req.metadata().contains_key(crate::forward::FORWARDED);
        let mut incoming = req.into_inner();
        let this = self.clone();
        let stream = stream_until_shutdown(self.shutdown.clone(), move |tx| async move {
            while let Some(next) = incoming.next().await {
                let answer = match next {
                    Ok(r) if r.id <= 0 => Err(Status::invalid_argument(
                        "id is required (a positive lease id)",
                    )),
                    Ok(r) => this.keep_alive_once(r.id, forwarded_here).await,
                    Err(e) => Err(e),
                };
                let end = answer.is_err();
                if tx.send(answer).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let r = req.get_ref();
        if r.id <= 0 {
            return Err(Status::invalid_argument(
                "id is required (a positive lease id)",
            ));
        }
        match self.read(&req, Query::TimeToLive(r.id), true).await {
            Ok(a) => {
                let l = a.lease.expect("lease queries answer a lease");
                Ok(Response::new(pb::LeaseTimeToLiveResponse {
                    header: self.header(a.revision),
                    id: l.id,
                    // Rounded up: a lease with 300 ms left still has "1 s", not 0.
                    ttl: l.remaining.as_millis().div_ceil(1000) as i64,
                    granted_ttl: l.ttl_secs,
                    keys: if r.keys { l.keys } else { Vec::new() },
                }))
            }
            Err(Failure::Status(s)) => Err(s),
            Err(Failure::Raft(e)) => {
                self.leader_client(&req, &e)
                    .await?
                    .lease_time_to_live(forwarded(*r, deadline::of(&req, self.timeout)))
                    .await
            }
        }
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = req.get_ref().clone();
        if !r.prefix {
            require_key(&r.key, "key")?;
        }
        if r.start_revision < 0 {
            return Err(Status::invalid_argument(
                "start_revision must not be negative",
            ));
        }
        let (tx, mut rx) = mpsc::channel(WATCH_BUFFER);
        let spec = WatchSpec {
            key: r.key,
            prefix: r.prefix,
            start_revision: r.start_revision,
            prev_kv: r.prev_kv,
        };
        let (id, revision) = self
            .raft
            .send_timeout(Watch { spec, tx }, deadline::of(&req, self.timeout))
            .await
            .map_err(|e| deadline::send_status(e, "raft member"))?
            .map_err(|e| self.forward.status(&e))?;
        let member_id = self.forward.member_id();
        let header = move |revision| {
            Some(pb::ResponseHeader {
                revision,
                member_id,
            })
        };
        let raft = self.raft.clone();
        let stream = stream_until_shutdown(self.shutdown.clone(), move |out| async move {
            let created = pb::WatchResponse {
                header: header(revision),
                created: true,
                ..Default::default()
            };
            if out.send(Ok(created)).await.is_err() {
                let _ = raft.send(CancelWatch(id)).await;
                return;
            }
            let mut last = revision;
            loop {
                let update = rx.recv().await.unwrap_or_else(|| lagged(last));
                let msg = match update {
                    WatchUpdate::Events { revision, events } => {
                        last = revision;
                        pb::WatchResponse {
                            header: header(revision),
                            events: events.into_iter().map(event).collect(),
                            ..Default::default()
                        }
                    }
                    WatchUpdate::Cancelled {
                        reason,
                        resume_from,
                    } => {
                        let _ = out
                            .send(Ok(pb::WatchResponse {
                                header: header(resume_from - 1),
                                canceled: true,
                                cancel_reason: reason,
                                resume_revision: resume_from,
                                ..Default::default()
                            }))
                            .await;
                        return;
                    }
                };
                if out.send(Ok(msg)).await.is_err() {
                    let _ = raft.send(CancelWatch(id)).await;
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }
}
