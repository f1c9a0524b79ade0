//! The node's [`Store`]: the KV service's own handlers called in process, so that writes reach the
//! leader wherever it is exactly as a client's would; leases renewed through the registry's
//! keeper; watches on this member's raft actor.

use std::sync::Arc;
use std::time::Duration;

use lodge_actors::cluster::kv::{Cmp, Compare, KeyValue, Op, Target};
use lodge_actors::cluster::raft::{RaftError, RaftNode, Watch};
use lodge_actors::cluster::store::{Listing, Store, StoreError, StoreFuture, TxnOutcome};
use lodge_actors::cluster::watch::WatchSpec;
use lodge_actors::registry::LeaseKeeper;
use lodge_actors::ActorRef;
use tokio::sync::mpsc;
use tonic::{Code, Request, Status};

use crate::forward::outcome_unknown;
use crate::kv::KvService;
use crate::pb::kv::kv_server::Kv;
use crate::pb::kv::{
    compare, request_op, response_op, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest,
    PutRequest, RangeRequest, RequestOp, TxnRequest,
};

/// Updates a watcher may fall behind by before it is cancelled (and reloads).
const WATCH_BUFFER: usize = 1024;

/// The replicated store through this member's KV service.
#[derive(Clone)]
pub struct KvStore {
    kv: KvService,
    keeper: Arc<dyn LeaseKeeper>,
    raft: ActorRef<RaftNode>,
    timeout: Duration,
}

impl KvStore {
    /// A store over `kv` (which forwards to the leader); `timeout` bounds every request.
    pub fn new(
        kv: KvService,
        keeper: Arc<dyn LeaseKeeper>,
        raft: ActorRef<RaftNode>,
        timeout: Duration,
    ) -> Self {
        Self {
            kv,
            keeper,
            raft,
            timeout,
        }
    }

    fn timed<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.set_timeout(self.timeout);
        r
    }
}

fn store_error(s: Status) -> StoreError {
    if outcome_unknown(&s) {
        return StoreError::Unknown(format!("store: {}", s.message()));
    }
    StoreError::Unavailable(format!("store: {}", s.message()))
}

fn compare_to_pb(c: Compare) -> crate::pb::kv::Compare {
    let result = match c.cmp {
        Cmp::Equal => compare::Result::Equal,
        Cmp::NotEqual => compare::Result::NotEqual,
        Cmp::Greater => compare::Result::Greater,
        Cmp::Less => compare::Result::Less,
    };
    let target = match c.target {
        Target::Value(v) => compare::Target::Value(v),
        Target::Version(v) => compare::Target::Version(v),
        Target::CreateRevision(v) => compare::Target::CreateRevision(v),
        Target::ModRevision(v) => compare::Target::ModRevision(v),
    };
    crate::pb::kv::Compare {
        result: result as i32,
        key: c.key,
        target: Some(target),
    }
}

fn op_to_pb(op: Op) -> RequestOp {
    let request = match op {
        Op::Put { key, value, lease } => request_op::Request::Put(PutRequest {
            key,
            value,
            lease,
            prev_kv: false,
        }),
        Op::Delete { key, prefix } => request_op::Request::Delete(DeleteRangeRequest {
            key,
            prefix,
            prev_kv: false,
        }),
        Op::Get { key } => request_op::Request::Get(RangeRequest {
            key,
            ..Default::default()
        }),
    };
    RequestOp {
        request: Some(request),
    }
}

fn kv_from_pb(kv: crate::pb::kv::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key,
        value: kv.value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
    }
}

impl KvStore {
    /// Every page of a prefix; the revision is the first page's, so that a watch from the one
    /// after it misses nothing that changed while the later pages were read.
    fn listing(&self, prefix: Vec<u8>, serializable: bool) -> StoreFuture<Listing> {
        let kv = self.kv.clone();
        let req = RangeRequest {
            key: prefix,
            prefix: true,
            serializable,
            ..Default::default()
        };
        let timeout = self.timeout;
        Box::pin(async move {
            let (revision, kvs) = kv
                .range_to_end(req, Some(timeout))
                .await
                .map_err(store_error)?;
            Ok(Listing {
                revision,
                kvs: kvs.into_iter().map(kv_from_pb).collect(),
            })
        })
    }
}

impl Store for KvStore {
    fn range(&self, prefix: Vec<u8>) -> StoreFuture<Listing> {
        self.listing(prefix, false)
    }

    fn range_local(&self, prefix: Vec<u8>) -> StoreFuture<Listing> {
        self.listing(prefix, true)
    }

    fn txn(
        &self,
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> StoreFuture<TxnOutcome> {
        let kv = self.kv.clone();
        let req = self.timed(TxnRequest {
            compare: compares.into_iter().map(compare_to_pb).collect(),
            success: success.into_iter().map(op_to_pb).collect(),
            failure: failure.into_iter().map(op_to_pb).collect(),
        });
        Box::pin(async move {
            let answer = kv.txn(req).await.map_err(store_error)?.into_inner();
            let gets = answer
                .responses
                .into_iter()
                .filter_map(|r| match r.response {
                    // A value left out of the answer (its budget) is not an absent key.
                    Some(response_op::Response::Get(g)) if g.more => Some(Err(StoreError::Unavailable(
                        "store: a transaction's read was left out of its answer (kv.range_page_bytes)".into(),
                    ))),
                    Some(response_op::Response::Get(g)) => {
                        Some(Ok(g.kvs.into_iter().next().map(kv_from_pb)))
                    }
                    _ => None,
                })
                .collect::<Result<_, _>>()?;
            Ok(TxnOutcome {
                succeeded: answer.succeeded,
                revision: answer.header.map(|h| h.revision).unwrap_or_default(),
                gets,
            })
        })
    }

    fn grant(&self, ttl_secs: i64) -> StoreFuture<i64> {
        let kv = self.kv.clone();
        let req = self.timed(LeaseGrantRequest {
            ttl: ttl_secs.max(1),
            id: 0,
        });
        Box::pin(async move {
            Ok(kv
                .lease_grant(req)
                .await
                .map_err(store_error)?
                .into_inner()
                .id)
        })
    }

    fn revoke(&self, lease: i64) -> StoreFuture<i64> {
        let kv = self.kv.clone();
        let req = self.timed(LeaseRevokeRequest { id: lease });
        Box::pin(async move {
            match kv.lease_revoke(req).await {
                Ok(r) => Ok(r
                    .into_inner()
                    .header
                    .map(|h| h.revision)
                    .unwrap_or_default()),
                // Gone already: nothing newer to wait for.
                Err(s) if s.code() == Code::NotFound => Ok(0),
                Err(s) => Err(store_error(s)),
            }
        })
    }

    fn keep_alive(&self, lease: i64) -> StoreFuture<()> {
        let renewing = self.keeper.renew(lease, self.timeout);
        Box::pin(async move {
            match renewing.await {
                Ok(()) => Ok(()),
                Err(RaftError::NotFound(_)) => Err(StoreError::LeaseNotFound(lease)),
                Err(e) => Err(StoreError::Unavailable(format!("store: {e}"))),
            }
        })
    }

    fn watch(
        &self,
        prefix: Vec<u8>,
        start_revision: i64,
    ) -> StoreFuture<mpsc::Receiver<lodge_actors::cluster::watch::WatchUpdate>> {
        let raft = self.raft.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(WATCH_BUFFER);
            let spec = WatchSpec {
                key: prefix,
                prefix: true,
                start_revision,
                prev_kv: true,
            };
            raft.send_timeout(Watch { spec, tx }, timeout)
                .await
                .map_err(|e| StoreError::Unavailable(format!("store: raft member: {e}")))?
                .map_err(|e| StoreError::Unavailable(format!("store: {e}")))?;
            Ok(rx)
        })
    }
}
