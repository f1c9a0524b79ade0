//! `lodge.kv.v1.KV` → the store client.
//!
//! Each call is decoded, checked (the caller's key scope, then the node's limits, [`check`]),
//! handed to the node's store client ([`lodge_actors::cluster::client`]), which reaches the
//! leader wherever it is, and its answer is shaped within a byte budget ([`answer`]). Watches
//! are served by the member the caller reached: every member applies the same changes in the
//! same order.

pub mod answer;
pub mod check;
pub mod scope;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use lodge_actors::cluster::client::{Answer, Client, Route, KV_GROUP};
use lodge_actors::cluster::kv::{ApplyResult, Command, KvError};
use lodge_actors::cluster::raft::{Query, ReadAnswer};
use lodge_actors::cluster::watch::{lagged, WatchUpdate};
use lodge_actors::quote;
use lodge_actors::registry::RegistryMetrics;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{audit, Caller, Role};
use crate::deadline;
use crate::members::Members;
use crate::pb::kv::{self as pb, kv_server};
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
    store: Client,
    members: Arc<Members>,
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
        store: Client,
        members: Arc<Members>,
        timeout: Duration,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            store,
            members,
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

    /// The header of an answer that member `member` produced at `revision`.
    fn header(member: u64, revision: i64) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader {
            revision,
            member_id: member,
        })
    }

    /// Writes `cmd` within the caller's deadline; a command the store refused is an error.
    async fn propose<T>(
        &self,
        req: &Request<T>,
        cmd: Command,
    ) -> Result<Answer<ApplyResult>, Status> {
        let budget = deadline::of(req, self.timeout);
        let a = self
            .store
            .propose(KV_GROUP, cmd, budget, Route::Leader)
            .await
            .map_err(|e| self.members.client_status(&e, true))?;
        match &a.value.error {
            Some(e) => Err(kv_error(e)),
            None => Ok(a),
        }
    }

    async fn read<T>(
        &self,
        req: &Request<T>,
        query: Query,
        linearizable: bool,
    ) -> Result<Answer<ReadAnswer>, Status> {
        let budget = deadline::of(req, self.timeout);
        self.store
            .read(KV_GROUP, query, linearizable, budget, Route::Leader)
            .await
            .map_err(|e| self.members.client_status(&e, false))
    }

    /// A revoke deletes every key attached to the lease, so (as in etcd) it needs kv-write on
    /// each of them: a client cannot revoke the lease the node's own records hang on (the
    /// router's owner lease, a registration's), nor one holding keys outside its prefixes. The
    /// keys are the leader's answer; a lease it does not know is left to the revoke to answer.
    async fn may_revoke<T>(&self, req: &Request<T>, id: i64) -> Result<(), Status> {
        let caller = Caller::of(req.extensions());
        if caller.is_unrestricted() {
            return Ok(());
        }
        let a = match self.read(req, Query::TimeToLive(id), true).await {
            Ok(a) => a,
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(()),
            Err(s) => return Err(s),
        };
        for key in a.value.lease.iter().flat_map(|l| &l.keys) {
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

    /// One keep-alive, on the leader wherever it is.
    async fn keep_alive_once(&self, id: i64) -> Result<pb::LeaseKeepAliveResponse, Status> {
        let a = self
            .store
            .keep_alive(KV_GROUP, id, self.timeout)
            .await
            .map_err(|e| self.members.client_status(&e, false))?;
        let l = a.value.lease.expect("keep-alive answers carry the lease");
        Ok(pb::LeaseKeepAliveResponse {
            header: Self::header(a.member, a.value.revision),
            id,
            ttl: l.ttl_secs,
        })
    }
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
        let a = self.propose(&req, cmd).await?;
        Ok(Response::new(pb::PutResponse {
            header: Self::header(a.member, a.value.revision),
            // One value: it fits whatever the page size (see `check`).
            prev_kv: if r.prev_kv {
                a.value.prev.into_iter().next().map(kv)
            } else {
                None
            },
            prev_kv_omitted: false,
        }))
    }

    async fn range(
        &self,
        req: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let r = req.get_ref();
        scope::range(&Caller::of(req.extensions()), r)?;
        let query = check::range(r, &self.limits).map_err(|e| self.refuse(e))?;
        let a = self.read(&req, query, !r.serializable).await?;
        Ok(Response::new(pb::RangeResponse {
            header: Self::header(a.member, a.value.revision),
            count: a.value.count as i64,
            more: a.value.more,
            kvs: a.value.kvs.into_iter().map(kv).collect(),
        }))
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
        let a = self.propose(&req, cmd).await?;
        let (prev_kvs, truncated) =
            answer::delete_prevs(a.value.prev, r.prev_kv, self.limits.range_page_bytes);
        Ok(Response::new(pb::DeleteRangeResponse {
            header: Self::header(a.member, a.value.revision),
            deleted: a.value.deleted as i64,
            prev_kvs,
            prev_kvs_truncated: truncated,
        }))
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let r = req.get_ref();
        scope::txn(&Caller::of(req.extensions()), r)?;
        let cmd = check::txn(r, &self.limits).map_err(|e| self.refuse(e))?;
        let a = self.propose(&req, cmd).await?;
        let header = Self::header(a.member, a.value.revision);
        let succeeded = a.value.succeeded;
        let branch = if succeeded { &r.success } else { &r.failure };
        let responses = answer::txn_results(a.value, branch, header, self.limits.range_page_bytes);
        Ok(Response::new(pb::TxnResponse {
            header,
            succeeded,
            responses,
        }))
    }

    async fn lease_grant(
        &self,
        req: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let r = req.get_ref();
        let cmd = check::lease_grant(r).map_err(|e| self.refuse(e))?;
        let a = self.propose(&req, cmd).await?;
        Ok(Response::new(pb::LeaseGrantResponse {
            header: Self::header(a.member, a.value.revision),
            id: a.value.lease,
            ttl: r.ttl,
        }))
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
        let a = self.propose(&req, cmd).await?;
        Ok(Response::new(pb::LeaseRevokeResponse {
            header: Self::header(a.member, a.value.revision),
            deleted: a.value.deleted as i64,
        }))
    }

    type LeaseKeepAliveStream =
        Pin<Box<dyn Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send>>;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut incoming = req.into_inner();
        let this = self.clone();
        let stream = stream_until_shutdown(self.shutdown.clone(), move |tx| async move {
            while let Some(next) = incoming.next().await {
                let answer = match next.map(|r| check::lease_id(r.id)) {
                    Ok(Ok(id)) => this.keep_alive_once(id).await,
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
        let a = self.read(&req, Query::TimeToLive(id), true).await?;
        let l = a.value.lease.expect("lease queries answer a lease");
        let (keys, keys_truncated) = if r.keys {
            answer::lease_keys(l.keys, self.limits.range_page_bytes)
        } else {
            (Vec::new(), false)
        };
        Ok(Response::new(pb::LeaseTimeToLiveResponse {
            header: Self::header(a.member, a.value.revision),
            id: l.id,
            // Rounded up: a lease with 300 ms left still has "1 s", not 0.
            ttl: l.remaining.as_millis().div_ceil(1000) as i64,
            granted_ttl: l.ttl_secs,
            keys,
            keys_truncated,
        }))
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
            .store
            .watch(KV_GROUP, spec, tx, deadline::of(&req, self.timeout))
            .await
            .map_err(|e| self.members.client_status(&e, false))?;
        let member_id = self.store.member_id();
        let header = move |revision| Self::header(member_id, revision);
        let store = self.store.clone();
        let batch_bytes = self.limits.watch_batch_bytes;
        let stream = stream_until_shutdown(self.shutdown.clone(), move |out| async move {
            let created = pb::WatchResponse {
                header: header(revision),
                created: true,
                ..Default::default()
            };
            if out.send(Ok(created)).await.is_err() {
                store.cancel_watch(KV_GROUP, id).await;
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
                                store.cancel_watch(KV_GROUP, id).await;
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
