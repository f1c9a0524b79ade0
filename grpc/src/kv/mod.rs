//! `lodge.kv.v1.KV` → the raft member.
//!
//! Writes, linearizable reads and lease calls that reach a follower are forwarded once to the
//! leader (see [`crate::forward`]). Watches are served by the member the caller reached: every
//! member applies the same changes in the same order.
//!
//! Requests are checked against the node's limits before anything is proposed ([`check`]);
//! answers that carry many values keep to a byte budget ([`answer`]).

pub mod answer;
pub mod check;
pub mod scope;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use lodge_actors::cluster::kv::{ApplyResult, Command, KvError};
use lodge_actors::cluster::raft::{
    CancelWatch, Propose, Query, RaftError, RaftNode, Read, ReadAnswer, Watch,
};
use lodge_actors::cluster::watch::{lagged, WatchUpdate};
use lodge_actors::registry::RegistryMetrics;
use lodge_actors::{quote, ActorRef, SendError};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{audit, Caller, Role};
use crate::deadline;
use crate::forward::{self, forwarded, Forwarder};
use crate::pb::kv::{self as pb, kv_client::KvClient, kv_server};
use answer::kv;
pub use check::KvLimits;
use check::Refusal;

/// Updates a watch may have queued before the member drops it as too slow.
const WATCH_BUFFER: usize = 1024;

/// How far a KV answer may go past `server.max_message_bytes`: the fields around one stored
/// value that was accepted in a request of up to that size (before the `[kv]` limits, or under
/// larger ones), which a range page or a watch message always carries whole.
pub const ANSWER_HEADROOM: usize = 64 << 10;

/// The KV adapter.
#[derive(Clone)]
pub struct KvService {
    raft: ActorRef<RaftNode>,
    forward: Arc<Forwarder>,
    timeout: Duration,
    shutdown: tokio::sync::watch::Receiver<bool>,
    limits: Arc<KvLimits>,
    /// Where refusals by a limit are counted (`lodge_limit_rejections_total`).
    metrics: RegistryMetrics,
    /// `server.max_message_bytes`, to name it when a keep-alive message is over it.
    max_message_bytes: usize,
}

impl KvService {
    /// Streams (watches, keep-alives) end when `shutdown` turns true. The limits are the
    /// defaults until [`with_limits`](Self::with_limits).
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
            limits: Arc::default(),
            metrics: RegistryMetrics::default(),
            max_message_bytes: 4 << 20,
        }
    }

    /// The node's limits, and where refusals are counted.
    pub fn with_limits(
        mut self,
        limits: KvLimits,
        max_message_bytes: usize,
        metrics: RegistryMetrics,
    ) -> Self {
        self.limits = Arc::new(limits);
        self.max_message_bytes = max_message_bytes;
        self.metrics = metrics;
        self
    }

    /// The status of a refused request, counted if a limit refused it.
    fn refuse(&self, r: Refusal) -> Status {
        if let Some(limit) = r.limit {
            self.metrics.rejected(limit);
        }
        r.status
    }

    /// Every key of a prefix, read page by page (see `RangeRequest.after`), and the revision of
    /// the first page. Pages are read one after the other, not as one snapshot: a caller that
    /// watches from the revision after the one answered sees again whatever changed while it
    /// read, and misses nothing.
    pub async fn range_to_end(
        &self,
        mut req: pb::RangeRequest,
        timeout: Option<Duration>,
    ) -> Result<(i64, Vec<pb::KeyValue>), Status> {
        use kv_server::Kv;
        let mut revision = None;
        let mut kvs = Vec::new();
        loop {
            let mut r = Request::new(req.clone());
            if let Some(t) = timeout {
                r.set_timeout(t);
            }
            let page = self.range(r).await?.into_inner();
            revision.get_or_insert(page.header.map_or(0, |h| h.revision));
            let more = page.more && !page.kvs.is_empty();
            if let Some(last) = page.kvs.last() {
                req.after = last.key.clone();
            }
            kvs.extend(page.kvs);
            if !more {
                return Ok((revision.unwrap_or_default(), kvs));
            }
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
    ) -> Result<KvClient<crate::peer::PeerChannel>, Status> {
        // The leader keeps its answers within its own limits; ours need not match them.
        Ok(KvClient::new(self.forward.leader(req, err).await?)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
    }

    /// One keep-alive: here if this member leads, else on the leader (once: `forwarded` says
    /// the stream itself came from a member).
    /// A revoke deletes every key attached to the lease, so (as in etcd) it needs kv-write on
    /// each of them: a client cannot revoke the lease the node's own records hang on (the
    /// router's owner lease, a registration's), nor one holding keys outside its prefixes. Read
    /// from this member's state; a lease unknown here is left to the revoke to answer.
    async fn may_revoke<T>(&self, req: &Request<T>, id: i64) -> Result<(), Status> {
        let caller = Caller::of(req.extensions());
        if caller.is_unrestricted() {
            return Ok(());
        }
        let Ok(a) = self.read(req, Query::TimeToLive(id), false).await else {
            return Ok(());
        };
        for key in a.lease.iter().flat_map(|l| &l.keys) {
            caller
                .require_keys(Role::KvWrite, key, false, "id")
                .map_err(|e| {
                    Status::permission_denied(format!(
                        "id: lease {id} holds a key this caller may not delete ({})",
                        e.message().trim_start_matches("id: ")
                    ))
                })?;
        }
        Ok(())
    }

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

#[tonic::async_trait]
impl kv_server::Kv for KvService {
    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let r = req.get_ref();
        audit::note_target(&req, || quote::echo(&String::from_utf8_lossy(&r.key)));
        scope::put(&Caller::of(req.extensions()), r)?;
        let cmd = check::put(r, &self.limits).map_err(|e| self.refuse(e))?;
        match self.propose(&req, cmd).await {
            Ok(a) => Ok(Response::new(pb::PutResponse {
                header: self.header(a.revision),
                // One value: it fits whatever the page size (see `check`).
                prev_kv: if r.prev_kv {
                    a.prev.into_iter().next().map(kv)
                } else {
                    None
                },
                prev_kv_omitted: false,
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
        scope::range(&Caller::of(req.extensions()), r)?;
        let query = check::range(r, &self.limits).map_err(|e| self.refuse(e))?;
        match self.read(&req, query, !r.serializable).await {
            Ok(a) => Ok(Response::new(pb::RangeResponse {
                header: self.header(a.revision),
                count: a.count as i64,
                more: a.more,
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
        audit::note_target(&req, || {
            let key = quote::echo(&String::from_utf8_lossy(&r.key));
            if r.prefix {
                format!("{key} (prefix)")
            } else {
                key
            }
        });
        scope::delete(&Caller::of(req.extensions()), r)?;
        let cmd = check::delete(r, &self.limits).map_err(|e| self.refuse(e))?;
        match self.propose(&req, cmd).await {
            Ok(a) => {
                let (prev_kvs, truncated) =
                    answer::delete_prevs(a.prev, r.prev_kv, self.limits.range_page_bytes);
                Ok(Response::new(pb::DeleteRangeResponse {
                    header: self.header(a.revision),
                    deleted: a.deleted as i64,
                    prev_kvs,
                    prev_kvs_truncated: truncated,
                }))
            }
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
        let r = req.get_ref();
        scope::txn(&Caller::of(req.extensions()), r)?;
        let cmd = check::txn(r, &self.limits).map_err(|e| self.refuse(e))?;
        match self.propose(&req, cmd).await {
            Ok(a) => {
                let header = self.header(a.revision);
                let succeeded = a.succeeded;
                let branch = if succeeded { &r.success } else { &r.failure };
                let responses =
                    answer::txn_results(a, branch, header, self.limits.range_page_bytes);
                Ok(Response::new(pb::TxnResponse {
                    header,
                    succeeded,
                    responses,
                }))
            }
            Err(Failure::Status(s)) => Err(s),
            Err(Failure::Raft(e)) => self
                .leader_client(&req, &e)
                .await?
                .txn(forwarded(r.clone(), deadline::of(&req, self.timeout)))
                .await
                .map_err(forward::write_error),
        }
    }

    async fn lease_grant(
        &self,
        req: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let r = req.get_ref();
        let cmd = check::lease_grant(r).map_err(|e| self.refuse(e))?;
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
        let id = check::lease_id(r.id).map_err(|e| self.refuse(e))?;
        audit::note_target(&req, || format!("lease {id}"));
        self.may_revoke(&req, id).await?;
        let cmd = Command::LeaseRevoke { id, expired: false };
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
                let answer = match next.map(|r| check::lease_id(r.id)) {
                    Ok(Ok(id)) => this.keep_alive_once(id, forwarded_here).await,
                    Ok(Err(e)) => Err(this.refuse(e)),
                    // A message over the limit mid-stream reaches here, not the server's layer.
                    Err(e) => Err(
                        match crate::message_limit::rewrite(&e, this.max_message_bytes) {
                            Some(s) => {
                                this.metrics.rejected(crate::message_limit::LABEL);
                                s
                            }
                            None => e,
                        },
                    ),
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
        let id = check::lease_id(r.id).map_err(|e| self.refuse(e))?;
        match self.read(&req, Query::TimeToLive(id), true).await {
            Ok(a) => {
                let l = a.lease.expect("lease queries answer a lease");
                let (keys, keys_truncated) = if r.keys {
                    answer::lease_keys(l.keys, self.limits.range_page_bytes)
                } else {
                    (Vec::new(), false)
                };
                Ok(Response::new(pb::LeaseTimeToLiveResponse {
                    header: self.header(a.revision),
                    id: l.id,
                    // Rounded up: a lease with 300 ms left still has "1 s", not 0.
                    ttl: l.remaining.as_millis().div_ceil(1000) as i64,
                    granted_ttl: l.ttl_secs,
                    keys,
                    keys_truncated,
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
        scope::watch(&Caller::of(req.extensions()), req.get_ref())?;
        let spec = check::watch(req.get_ref(), &self.limits).map_err(|e| self.refuse(e))?;
        let (tx, mut rx) = mpsc::channel(WATCH_BUFFER);
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
        let batch_bytes = self.limits.watch_batch_bytes;
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
            // The last revision whose events were all sent: a watch that ends resumes after it.
            let mut last = revision;
            loop {
                let update = rx.recv().await.unwrap_or_else(|| lagged(last));
                match update {
                    WatchUpdate::Events { revision, events } => {
                        for msg in answer::watch_messages(events, header(revision), batch_bytes) {
                            if out.send(Ok(msg)).await.is_err() {
                                let _ = raft.send(CancelWatch(id)).await;
                                return;
                            }
                        }
                        last = revision;
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
                }
            }
        });
        Ok(Response::new(stream))
    }
}
