//! The replicated store as services inside the node use it: reads, transactions, leases and
//! watches behind one object-safe trait.
//!
//! The node's store client ([`Client`]) implements it for the KV group, reaching the leader
//! wherever it is, so a service written against [`Store`] works the same on every member.
//! [`MemoryStore`] runs the real state machine ([`KvState`]) and watch history ([`WatchHub`]) in
//! memory, for unit tests.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::client::{Client, ClientError, Route, KV_GROUP};
use super::kv::{ApplyResult, Command, Compare, KeyValue, KvState, Op, OpResult};
use super::raft::RaftError;
use super::watch::{WatchHub, WatchSpec, WatchUpdate};

/// Why a store request failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// Not served now (no leader, a member unreachable, a deadline passed before an answer);
    /// nothing was written, or a read failed. Safe to retry.
    Unavailable(String),
    /// A write whose outcome is unknown (leadership changed while it was in flight): read before
    /// retrying.
    Unknown(String),
    /// The lease does not exist (any more).
    LeaseNotFound(i64),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unavailable(m) | Self::Unknown(m) => f.write_str(m),
            Self::LeaseNotFound(id) => write!(f, "lease {id} not found (expired or revoked)"),
        }
    }
}

/// A boxed future of the object-safe [`Store`].
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// Keys under a prefix and the revision they reflect.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub kvs: Vec<KeyValue>,
    pub revision: i64,
}

/// The outcome of a transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxnOutcome {
    /// Whether the compares held (the success branch ran).
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: i64,
    /// The answers of the branch's `Get` operations, in order.
    pub gets: Vec<Option<KeyValue>>,
}

/// The replicated store.
pub trait Store: Send + Sync + 'static {
    /// The keys under `prefix`, read linearizably (through the leader).
    fn range(&self, prefix: Vec<u8>) -> StoreFuture<Listing>;
    /// The keys under `prefix` as this member has applied them (no leader needed; may lag):
    /// what a follower loads before watching its own changes from the next revision.
    fn range_local(&self, prefix: Vec<u8>) -> StoreFuture<Listing>;
    /// Runs `success` if every compare holds, else `failure`, atomically.
    fn txn(
        &self,
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> StoreFuture<TxnOutcome>;
    /// A new lease of `ttl_secs` (at least 1).
    fn grant(&self, ttl_secs: i64) -> StoreFuture<i64>;
    /// Ends a lease and deletes its keys; a lease already gone is not an error. Answers the
    /// store's revision after it.
    fn revoke(&self, lease: i64) -> StoreFuture<i64>;
    /// Renews a lease for its full TTL.
    fn keep_alive(&self, lease: i64) -> StoreFuture<()>;
    /// Changes under `prefix` from `start_revision` on, on this member, until the receiver is
    /// dropped or the watch is cancelled (a `Cancelled` update says from where to resume).
    fn watch(
        &self,
        prefix: Vec<u8>,
        start_revision: i64,
    ) -> StoreFuture<mpsc::Receiver<WatchUpdate>>;
}

/// Updates a watcher of the [`Client`]'s store may fall behind by before it is cancelled (and
/// reloads).
const WATCH_BUFFER: usize = 1024;

fn store_error(e: ClientError) -> StoreError {
    if e.outcome_unknown() {
        return StoreError::Unknown(format!("store: {e}"));
    }
    StoreError::Unavailable(format!("store: {e}"))
}

/// What a transaction answered, its reads in order.
fn txn_outcome(applied: ApplyResult) -> Result<TxnOutcome, StoreError> {
    if let Some(e) = applied.error {
        return Err(StoreError::Unavailable(format!("store: {e}")));
    }
    let gets = applied
        .ops
        .into_iter()
        .filter_map(|o| match o {
            OpResult::Get(kv) => Some(kv),
            _ => None,
        })
        .collect();
    Ok(TxnOutcome {
        succeeded: applied.succeeded,
        revision: applied.revision,
        gets,
    })
}

impl Client {
    async fn propose_kv(&self, cmd: Command) -> Result<ApplyResult, StoreError> {
        self.propose(KV_GROUP, cmd, self.timeout(), Route::Leader)
            .await
            .map(|a| a.value)
            .map_err(store_error)
    }

    fn list_kv(&self, prefix: Vec<u8>, linearizable: bool) -> StoreFuture<Listing> {
        let c = self.clone();
        Box::pin(async move {
            c.list(KV_GROUP, prefix, linearizable, c.timeout())
                .await
                .map_err(store_error)
        })
    }
}

/// The KV group through the store client, each call within the client's timeout.
impl Store for Client {
    fn range(&self, prefix: Vec<u8>) -> StoreFuture<Listing> {
        self.list_kv(prefix, true)
    }

    fn range_local(&self, prefix: Vec<u8>) -> StoreFuture<Listing> {
        self.list_kv(prefix, false)
    }

    fn txn(
        &self,
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> StoreFuture<TxnOutcome> {
        let c = self.clone();
        Box::pin(async move {
            let cmd = Command::Txn {
                compares,
                success,
                failure,
            };
            txn_outcome(c.propose_kv(cmd).await?)
        })
    }

    fn grant(&self, ttl_secs: i64) -> StoreFuture<i64> {
        let c = self.clone();
        Box::pin(async move {
            let cmd = Command::LeaseGrant {
                id: 0,
                ttl_secs: ttl_secs.max(1),
            };
            let applied = c.propose_kv(cmd).await?;
            match applied.error {
                Some(e) => Err(StoreError::Unavailable(format!("store: {e}"))),
                None => Ok(applied.lease),
            }
        })
    }

    fn revoke(&self, lease: i64) -> StoreFuture<i64> {
        let c = self.clone();
        Box::pin(async move {
            let cmd = Command::LeaseRevoke {
                id: lease,
                expired: false,
            };
            let applied = c.propose_kv(cmd).await?;
            // Gone already: nothing newer to wait for.
            Ok(match applied.error {
                Some(_) => 0,
                None => applied.revision,
            })
        })
    }

    fn keep_alive(&self, lease: i64) -> StoreFuture<()> {
        let c = self.clone();
        Box::pin(async move {
            match c.keep_alive(KV_GROUP, lease, c.timeout()).await {
                Ok(_) => Ok(()),
                Err(ClientError::Raft {
                    error: RaftError::NotFound(_),
                    ..
                }) => Err(StoreError::LeaseNotFound(lease)),
                Err(e) => Err(StoreError::Unavailable(format!("store: {e}"))),
            }
        })
    }

    fn watch(
        &self,
        prefix: Vec<u8>,
        start_revision: i64,
    ) -> StoreFuture<mpsc::Receiver<WatchUpdate>> {
        let c = self.clone();
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(WATCH_BUFFER);
            let spec = WatchSpec {
                key: prefix,
                prefix: true,
                start_revision,
                prev_kv: true,
            };
            c.watch(KV_GROUP, spec, tx, c.timeout())
                .await
                .map_err(store_error)?;
            Ok(rx)
        })
    }
}

/// A store in memory: the real state machine and watch history, without raft. Leases never
/// expire on their own; tests revoke them (as the leader would) with [`MemoryStore::expire`].
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    kv: KvState,
    hub: WatchHub,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            kv: KvState::default(),
            hub: WatchHub::new(0, 10_000),
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies `cmd` as the log would, feeding the watchers.
    pub fn apply(&self, cmd: &Command) -> super::kv::ApplyResult {
        let mut inner = self.inner.lock().expect("store lock");
        let res = inner.kv.apply(cmd);
        let events = res.events.clone();
        inner.hub.record(res.revision, events);
        res
    }

    /// Revokes `lease` as an expiry (what the leader does when a lease times out).
    pub fn expire(&self, lease: i64) {
        self.apply(&Command::LeaseRevoke {
            id: lease,
            expired: true,
        });
    }

    /// The value of `key`, if any.
    pub fn get(&self, key: &[u8]) -> Option<KeyValue> {
        self.inner.lock().expect("store lock").kv.get(key)
    }

    fn ready<T: Send + 'static>(r: Result<T, StoreError>) -> StoreFuture<T> {
        Box::pin(std::future::ready(r))
    }
}

impl Store for MemoryStore {
    fn range(&self, prefix: Vec<u8>) -> StoreFuture<Listing> {
        let inner = self.inner.lock().expect("store lock");
        let (kvs, _) = inner.kv.range(&prefix, 0);
        Self::ready(Ok(Listing {
            kvs,
            revision: inner.kv.revision(),
        }))
    }

    fn range_local(&self, prefix: Vec<u8>) -> StoreFuture<Listing> {
        self.range(prefix)
    }

    fn txn(
        &self,
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> StoreFuture<TxnOutcome> {
        let res = self.apply(&Command::Txn {
            compares,
            success,
            failure,
        });
        Self::ready(txn_outcome(res))
    }

    fn grant(&self, ttl_secs: i64) -> StoreFuture<i64> {
        let res = self.apply(&Command::LeaseGrant { id: 0, ttl_secs });
        Self::ready(match res.error {
            Some(e) => Err(StoreError::Unavailable(e.to_string())),
            None => Ok(res.lease),
        })
    }

    fn revoke(&self, lease: i64) -> StoreFuture<i64> {
        let res = self.apply(&Command::LeaseRevoke {
            id: lease,
            expired: false,
        });
        Self::ready(Ok(res.revision))
    }

    fn keep_alive(&self, lease: i64) -> StoreFuture<()> {
        let known = self
            .inner
            .lock()
            .expect("store lock")
            .kv
            .lease(lease)
            .is_some();
        Self::ready(if known {
            Ok(())
        } else {
            Err(StoreError::LeaseNotFound(lease))
        })
    }

    fn watch(
        &self,
        prefix: Vec<u8>,
        start_revision: i64,
    ) -> StoreFuture<mpsc::Receiver<WatchUpdate>> {
        let (tx, rx) = mpsc::channel(1024);
        let mut inner = self.inner.lock().expect("store lock");
        let current = inner.kv.revision();
        let spec = WatchSpec {
            key: prefix,
            prefix: true,
            start_revision,
            prev_kv: true,
        };
        Self::ready(
            inner
                .hub
                .watch(spec, current, tx)
                .map(|_| rx)
                .map_err(|e| StoreError::Unavailable(e.to_string())),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::kv::{Cmp, Target};

    #[tokio::test]
    async fn a_watch_from_the_listed_revision_misses_nothing() {
        let s = MemoryStore::new();
        let put = |k: &str| Op::Put {
            key: k.as_bytes().to_vec(),
            value: b"v".to_vec(),
            lease: 0,
        };
        s.txn(vec![], vec![put("/p/a")], vec![]).await.unwrap();
        let listed = s.range(b"/p/".to_vec()).await.unwrap();
        assert_eq!(listed.kvs.len(), 1);
        s.txn(vec![], vec![put("/p/b")], vec![]).await.unwrap();
        let mut w = s.watch(b"/p/".to_vec(), listed.revision + 1).await.unwrap();
        match w.recv().await.unwrap() {
            WatchUpdate::Events { events, .. } => assert_eq!(events[0].kv.key, b"/p/b"),
            u => panic!("{u:?}"),
        }
    }

    #[tokio::test]
    async fn compares_guard_writes_and_leases_take_their_keys() {
        let s = MemoryStore::new();
        let lease = s.grant(5).await.unwrap();
        let create = |v: &str| Op::Put {
            key: b"/k".to_vec(),
            value: v.as_bytes().to_vec(),
            lease,
        };
        let absent = Compare {
            key: b"/k".to_vec(),
            cmp: Cmp::Equal,
            target: Target::CreateRevision(0),
        };
        let first = s.txn(vec![absent.clone()], vec![create("1")], vec![]);
        assert!(first.await.unwrap().succeeded);
        let get = Op::Get {
            key: b"/k".to_vec(),
        };
        let second = s
            .txn(vec![absent], vec![create("2")], vec![get])
            .await
            .unwrap();
        assert!(!second.succeeded);
        assert_eq!(second.gets[0].as_ref().unwrap().value, b"1");
        s.expire(lease);
        assert_eq!(s.get(b"/k"), None);
        assert_eq!(
            s.keep_alive(lease).await,
            Err(StoreError::LeaseNotFound(lease))
        );
    }
}
