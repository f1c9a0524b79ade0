//! Owner records: which member holds a session, in the replicated store, so that a side reaching
//! another member is relayed to the owner (no sticky load balancing needed).
//!
//! `/lodge/router/sessions/<key>` holds an [`OwnerRecord`] as JSON, under the owner's lease: a
//! member that dies takes its records with it within one lease TTL. The first member to see a key
//! claims it with a transaction that only succeeds if the key was never written.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{Operation, RouterError};

/// Prefix of the owner records.
pub const PREFIX: &str = "/lodge/router/sessions/";

/// The store key of session `key`.
pub fn record_key(key: &str) -> Vec<u8> {
    format!("{PREFIX}{key}").into_bytes()
}

/// Who owns a session and what it is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    pub session_key: String,
    pub workflow_id: String,
    /// The member running the session's actor.
    pub owner: u64,
    /// The user's request; `None` while only an agent waits.
    pub operation: Option<Operation>,
    pub created_at_ms: u64,
}

impl OwnerRecord {
    /// JSON, as stored.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a record always encodes")
    }

    /// A stored record; `None` if it is not one.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

/// The outcome of a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The record is ours now.
    Won,
    /// Someone holds it (perhaps this member, from a session that just ended).
    Held(OwnerRecord),
}

/// A change seen on the owner records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnerEvent {
    Put(OwnerRecord),
    Deleted(String),
}

/// A boxed future, for the object-safe [`OwnerStore`].
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, RouterError>> + Send>>;

/// The replicated store as the router uses it. The node implements it on its KV service, which
/// sends writes to the leader wherever it is.
pub trait OwnerStore: Send + Sync + 'static {
    /// Writes `record` under `lease` if the key was never written; otherwise answers the holder.
    fn claim(&self, record: OwnerRecord, lease: i64, timeout: Duration) -> StoreFuture<Claim>;
    /// Replaces `held` (still this member's, from an earlier session or lease) with `record`
    /// under `lease`, only if the stored record is still exactly `held`; otherwise answers the
    /// holder. A member never overwrites another's claim.
    fn take_over(
        &self,
        record: OwnerRecord,
        held: OwnerRecord,
        lease: i64,
        timeout: Duration,
    ) -> StoreFuture<Claim>;
    /// Deletes `record` if the stored record is still exactly it (a late delete must not remove
    /// a newer claim of the same key).
    fn release(&self, record: OwnerRecord, timeout: Duration) -> StoreFuture<()>;
    /// A new lease.
    fn grant(&self, ttl: Duration, timeout: Duration) -> StoreFuture<i64>;
    /// Renews `lease`; `false` when it no longer exists.
    fn renew(&self, lease: i64, timeout: Duration) -> StoreFuture<bool>;
    /// One session's record, read through the leader.
    fn get(&self, key: String, timeout: Duration) -> StoreFuture<Option<OwnerRecord>>;
    /// Every record, as this member has applied them.
    fn list(&self) -> StoreFuture<Vec<OwnerRecord>>;
    /// Changes from now on, until `tx` closes; the future ends when the watch is set up.
    fn watch(&self, tx: mpsc::Sender<OwnerEvent>) -> StoreFuture<()>;
}

/// An in-memory store for tests: one member's view, leases never expire.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<MemoryState>,
}

#[derive(Default)]
struct MemoryState {
    records: HashMap<String, OwnerRecord>,
    leases: Vec<i64>,
    watchers: Vec<mpsc::Sender<OwnerEvent>>,
    /// Claims made so far (tests assert on them).
    claims: usize,
}

impl MemoryStore {
    fn notify(state: &mut MemoryState, ev: OwnerEvent) {
        state.watchers.retain(|w| w.try_send(ev.clone()).is_ok());
    }

    /// Claims made so far.
    pub fn claims(&self) -> usize {
        self.state.lock().unwrap().claims
    }

    /// The record of `key`, if any.
    pub fn record(&self, key: &str) -> Option<OwnerRecord> {
        self.state.lock().unwrap().records.get(key).cloned()
    }

    /// Writes a record as another member would.
    pub fn insert(&self, record: OwnerRecord) {
        let mut s = self.state.lock().unwrap();
        s.records.insert(record.session_key.clone(), record.clone());
        Self::notify(&mut s, OwnerEvent::Put(record));
    }
}

fn ready<T: Send + 'static>(v: Result<T, RouterError>) -> StoreFuture<T> {
    Box::pin(std::future::ready(v))
}

impl OwnerStore for MemoryStore {
    fn claim(&self, record: OwnerRecord, _lease: i64, _timeout: Duration) -> StoreFuture<Claim> {
        let mut s = self.state.lock().unwrap();
        s.claims += 1;
        if let Some(held) = s.records.get(&record.session_key) {
            return ready(Ok(Claim::Held(held.clone())));
        }
        s.records.insert(record.session_key.clone(), record.clone());
        Self::notify(&mut s, OwnerEvent::Put(record));
        ready(Ok(Claim::Won))
    }

    fn take_over(
        &self,
        record: OwnerRecord,
        held: OwnerRecord,
        _lease: i64,
        _timeout: Duration,
    ) -> StoreFuture<Claim> {
        let mut s = self.state.lock().unwrap();
        match s.records.get(&record.session_key) {
            Some(current) if *current != held => return ready(Ok(Claim::Held(current.clone()))),
            _ => {}
        }
        s.records.insert(record.session_key.clone(), record.clone());
        Self::notify(&mut s, OwnerEvent::Put(record));
        ready(Ok(Claim::Won))
    }

    fn release(&self, record: OwnerRecord, _timeout: Duration) -> StoreFuture<()> {
        let mut s = self.state.lock().unwrap();
        if s.records.get(&record.session_key) == Some(&record) {
            s.records.remove(&record.session_key);
            Self::notify(&mut s, OwnerEvent::Deleted(record.session_key));
        }
        ready(Ok(()))
    }

    fn grant(&self, _ttl: Duration, _timeout: Duration) -> StoreFuture<i64> {
        let mut s = self.state.lock().unwrap();
        let id = s.leases.len() as i64 + 1;
        s.leases.push(id);
        ready(Ok(id))
    }

    fn renew(&self, lease: i64, _timeout: Duration) -> StoreFuture<bool> {
        ready(Ok(self.state.lock().unwrap().leases.contains(&lease)))
    }

    fn get(&self, key: String, _timeout: Duration) -> StoreFuture<Option<OwnerRecord>> {
        ready(Ok(self.record(&key)))
    }

    fn list(&self) -> StoreFuture<Vec<OwnerRecord>> {
        ready(Ok(self
            .state
            .lock()
            .unwrap()
            .records
            .values()
            .cloned()
            .collect()))
    }

    fn watch(&self, tx: mpsc::Sender<OwnerEvent>) -> StoreFuture<()> {
        self.state.lock().unwrap().watchers.push(tx);
        ready(Ok(()))
    }
}
