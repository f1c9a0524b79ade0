//! Where the key-value state machine keeps its keys.
//!
//! A raft member keeps them in the storage engine on disk ([`super::disk::state::DiskKeys`]),
//! so that the store may hold more than memory; [`MemoryKeys`] keeps them in a map, for the
//! in-memory store of tests and for a snapshot being decoded. Both behave alike: the state
//! machine's tests run on the map, and the disk's tests compare the two.
//!
//! Writes made while a raft `Ready` is applied are one atomic unit on disk, together with the
//! index they bring the state to (see [`KeySpace::commit`]): a crash leaves the engine at some
//! applied index, and raft replays the log from there.

use std::collections::BTreeMap;
use std::ops::Bound;

use super::kv::KeyValue;

/// The keys of the state machine, and the bookkeeping records written with them.
pub trait KeySpace: Send + 'static {
    /// One key.
    fn get(&self, key: &[u8]) -> Option<KeyValue>;

    /// Visits the keys starting with `prefix`, in key order, from the first one after `after`
    /// (when `after` is at or past `prefix`), until `visit` answers false.
    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, visit: &mut dyn FnMut(KeyValue) -> bool);

    /// How many keys [`KeySpace::scan`] would visit, without reading their values.
    fn count(&self, prefix: &[u8], after: Option<&[u8]>) -> usize;

    /// Sets a key.
    fn put(&mut self, kv: KeyValue);

    /// Removes a key, answering what it held.
    fn remove(&mut self, key: &[u8]) -> Option<KeyValue>;

    /// Sets (or, with `None`, deletes) a bookkeeping record: a lease, the revision, where the log
    /// was applied to. Kept apart from the keys; a store in memory has no use for them.
    fn put_meta(&mut self, name: &[u8], value: Option<Vec<u8>>);

    /// One bookkeeping record.
    fn meta(&self, name: &[u8]) -> Option<Vec<u8>>;

    /// Every bookkeeping record whose name starts with `prefix`, in order.
    fn meta_scan(&self, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)>;

    /// Writes everything set since the last commit as one atomic unit (not fsynced: the raft log
    /// is the write-ahead log). Reads see uncommitted writes already.
    fn commit(&mut self) -> Result<(), String>;

    /// Removes every key and record (before a leader's snapshot replaces the state).
    fn clear(&mut self);
}

/// The start of a scan over `prefix` after `after`.
pub fn scan_start(prefix: &[u8], after: Option<&[u8]>) -> Bound<Vec<u8>> {
    match after {
        Some(a) if a >= prefix => Bound::Excluded(a.to_vec()),
        _ => Bound::Included(prefix.to_vec()),
    }
}

/// Keys in a map in memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryKeys {
    keys: BTreeMap<Vec<u8>, KeyValue>,
    meta: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl MemoryKeys {
    /// Keys from a snapshot.
    pub fn from_map(keys: BTreeMap<Vec<u8>, KeyValue>) -> Self {
        Self {
            keys,
            meta: BTreeMap::new(),
        }
    }
}

impl KeySpace for MemoryKeys {
    fn get(&self, key: &[u8]) -> Option<KeyValue> {
        self.keys.get(key).cloned()
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, visit: &mut dyn FnMut(KeyValue) -> bool) {
        let range = self
            .keys
            .range((scan_start(prefix, after), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix));
        for (_, kv) in range {
            if !visit(kv.clone()) {
                return;
            }
        }
    }

    fn count(&self, prefix: &[u8], after: Option<&[u8]>) -> usize {
        self.keys
            .range((scan_start(prefix, after), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .count()
    }

    fn put(&mut self, kv: KeyValue) {
        self.keys.insert(kv.key.clone(), kv);
    }

    fn remove(&mut self, key: &[u8]) -> Option<KeyValue> {
        self.keys.remove(key)
    }

    fn put_meta(&mut self, name: &[u8], value: Option<Vec<u8>>) {
        match value {
            Some(v) => self.meta.insert(name.to_vec(), v),
            None => self.meta.remove(name),
        };
    }

    fn meta(&self, name: &[u8]) -> Option<Vec<u8>> {
        self.meta.get(name).cloned()
    }

    fn meta_scan(&self, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.meta
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn commit(&mut self) -> Result<(), String> {
        Ok(())
    }

    fn clear(&mut self) {
        self.keys.clear();
        self.meta.clear();
    }
}
