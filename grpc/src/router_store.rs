//! The router's owner records on the replicated store: the KV service's own handlers called in
//! process (so writes reach the leader wherever it is, exactly as a client's would), leases
//! renewed through the registry's keeper, and the raft member's watch for changes.

use std::sync::Arc;
use std::time::Duration;

use lodge_actors::cluster::raft::{RaftError, RaftNode, Watch};
use lodge_actors::cluster::watch::{WatchSpec, WatchUpdate};
use lodge_actors::registry::LeaseKeeper;
use lodge_actors::router::owner::{
    record_key, Claim, OwnerEvent, OwnerRecord, OwnerStore, StoreFuture, PREFIX,
};
use lodge_actors::router::RouterError;
use lodge_actors::ActorRef;
use tokio::sync::mpsc;
use tonic::{Request, Status};

use crate::kv::KvService;
use crate::pb::kv::kv_server::Kv;
use crate::pb::kv::{
    compare, request_op, response_op, Compare, DeleteRangeRequest, LeaseGrantRequest, PutRequest,
    RangeRequest, RequestOp, TxnRequest,
};

/// Owner records kept through this member's KV service.
pub struct KvOwnerStore {
    kv: KvService,
    keeper: Arc<dyn LeaseKeeper>,
    raft: ActorRef<RaftNode>,
}

impl KvOwnerStore {
    /// A store over `kv` (which forwards to the leader), renewing leases with `keeper`.
    pub fn new(kv: KvService, keeper: Arc<dyn LeaseKeeper>, raft: ActorRef<RaftNode>) -> Self {
        Self { kv, keeper, raft }
    }
}

fn unavailable(s: Status) -> RouterError {
    RouterError::Unavailable(format!("router store: {}", s.message()))
}

fn timed<T>(msg: T, timeout: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(timeout);
    r
}

fn put_op(record: &OwnerRecord, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::Put(PutRequest {
            key: record_key(&record.session_key),
            value: record.encode(),
            prev_kv: false,
            lease,
        })),
    }
}

/// The stored record is exactly `record` (records encode deterministically).
fn value_is(key: &[u8], record: &OwnerRecord) -> Compare {
    Compare {
        result: compare::Result::Equal as i32,
        key: key.to_vec(),
        target: Some(compare::Target::Value(record.encode())),
    }
}

fn get_op(key: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::Get(RangeRequest {
            key,
            ..Default::default()
        })),
    }
}

/// Runs a claim-like transaction: `Won` if it applied, else the record that holds the key.
async fn settle(
    kv: &KvService,
    txn: TxnRequest,
    timeout: Duration,
    session_key: &str,
) -> Result<Claim, RouterError> {
    let answer = kv
        .txn(timed(txn, timeout))
        .await
        .map_err(unavailable)?
        .into_inner();
    if answer.succeeded {
        return Ok(Claim::Won);
    }
    let held = answer
        .responses
        .into_iter()
        .find_map(|r| match r.response {
            Some(response_op::Response::Get(g)) => g.kvs.into_iter().next(),
            _ => None,
        })
        .and_then(|kv| OwnerRecord::decode(&kv.value));
    match held {
        Some(h) => Ok(Claim::Held(h)),
        // Deleted between the compare and the read: a retry will win or see the holder.
        None => Err(RouterError::Unavailable(format!(
            "session {session_key}: its owner changed while claiming; retry"
        ))),
    }
}

impl OwnerStore for KvOwnerStore {
    fn claim(&self, record: OwnerRecord, lease: i64, timeout: Duration) -> StoreFuture<Claim> {
        let kv = self.kv.clone();
        Box::pin(async move {
            let key = record_key(&record.session_key);
            let txn = TxnRequest {
                // Never written (or deleted since): create_revision is 0.
                compare: vec![Compare {
                    result: compare::Result::Equal as i32,
                    key: key.clone(),
                    target: Some(compare::Target::CreateRevision(0)),
                }],
                success: vec![put_op(&record, lease)],
                failure: vec![get_op(key)],
            };
            settle(&kv, txn, timeout, &record.session_key).await
        })
    }

    fn take_over(
        &self,
        record: OwnerRecord,
        held: OwnerRecord,
        lease: i64,
        timeout: Duration,
    ) -> StoreFuture<Claim> {
        let kv = self.kv.clone();
        Box::pin(async move {
            let key = record_key(&record.session_key);
            let txn = TxnRequest {
                compare: vec![value_is(&key, &held)],
                success: vec![put_op(&record, lease)],
                failure: vec![get_op(key)],
            };
            settle(&kv, txn, timeout, &record.session_key).await
        })
    }

    fn release(&self, record: OwnerRecord, timeout: Duration) -> StoreFuture<()> {
        let kv = self.kv.clone();
        Box::pin(async move {
            let key = record_key(&record.session_key);
            let txn = TxnRequest {
                compare: vec![value_is(&key, &record)],
                success: vec![RequestOp {
                    request: Some(request_op::Request::Delete(DeleteRangeRequest {
                        key,
                        ..Default::default()
                    })),
                }],
                failure: vec![],
            };
            kv.txn(timed(txn, timeout)).await.map_err(unavailable)?;
            Ok(())
        })
    }

    fn grant(&self, ttl: Duration, timeout: Duration) -> StoreFuture<i64> {
        let kv = self.kv.clone();
        Box::pin(async move {
            let req = LeaseGrantRequest {
                ttl: ttl.as_secs().max(1) as i64,
                id: 0,
            };
            Ok(kv
                .lease_grant(timed(req, timeout))
                .await
                .map_err(unavailable)?
                .into_inner()
                .id)
        })
    }

    fn renew(&self, lease: i64, timeout: Duration) -> StoreFuture<bool> {
        let renewing = self.keeper.renew(lease, timeout);
        Box::pin(async move {
            match renewing.await {
                Ok(()) => Ok(true),
                Err(RaftError::NotFound(_)) => Ok(false),
                Err(e) => Err(RouterError::Unavailable(format!("router store: {e}"))),
            }
        })
    }

    fn get(&self, key: String, timeout: Duration) -> StoreFuture<Option<OwnerRecord>> {
        let kv = self.kv.clone();
        Box::pin(async move {
            let req = RangeRequest {
                key: record_key(&key),
                ..Default::default()
            };
            Ok(kv
                .range(timed(req, timeout))
                .await
                .map_err(unavailable)?
                .into_inner()
                .kvs
                .into_iter()
                .next()
                .and_then(|kv| OwnerRecord::decode(&kv.value)))
        })
    }

    fn list(&self) -> StoreFuture<Vec<OwnerRecord>> {
        let kv = self.kv.clone();
        Box::pin(async move {
            let req = RangeRequest {
                key: PREFIX.as_bytes().to_vec(),
                prefix: true,
                serializable: true,
                ..Default::default()
            };
            Ok(kv
                .range_to_end(req, None)
                .await
                .map_err(unavailable)?
                .1
                .into_iter()
                .filter_map(|kv| OwnerRecord::decode(&kv.value))
                .collect())
        })
    }

    fn watch(&self, tx: mpsc::Sender<OwnerEvent>) -> StoreFuture<()> {
        let raft = self.raft.clone();
        Box::pin(async move {
            let (updates_tx, mut updates) = mpsc::channel(256);
            let spec = WatchSpec {
                key: PREFIX.as_bytes().to_vec(),
                prefix: true,
                start_revision: 0,
                prev_kv: false,
            };
            raft.send(Watch {
                spec,
                tx: updates_tx,
            })
            .await
            .map_err(|e| RouterError::Unavailable(format!("router store: {e}")))?
            .map_err(|e| RouterError::Unavailable(format!("router store: {e}")))?;
            tokio::spawn(async move {
                while let Some(u) = updates.recv().await {
                    let WatchUpdate::Events { events, .. } = u else {
                        break;
                    };
                    for e in events {
                        let ev = if e.deleted {
                            let key = String::from_utf8_lossy(&e.kv.key);
                            OwnerEvent::Deleted(key.trim_start_matches(PREFIX).to_string())
                        } else {
                            match OwnerRecord::decode(&e.kv.value) {
                                Some(r) => OwnerEvent::Put(r),
                                None => continue,
                            }
                        };
                        if tx.send(ev).await.is_err() {
                            return;
                        }
                    }
                }
            });
            Ok(())
        })
    }
}
