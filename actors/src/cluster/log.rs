//! The raft log as raft-rs reads it: an in-memory mirror of what the storage thread persists.
//!
//! raft-rs reads its log synchronously through [`raft::Storage`], so the raft actor appends here
//! first (raft may read the entries at once) and hands the same entries to the storage thread;
//! raft only counts them as persisted when the thread says so (`on_persist_ready`). The mirror
//! holds the entries since the last snapshot, which snapshots keep bounded.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

use super::disk::Recovered;

#[derive(Default)]
struct Inner {
    hard_state: HardState,
    conf_state: ConfState,
    /// The latest snapshot, data included: what a lagging follower is sent.
    snapshot: Snapshot,
    /// Entries after `snapshot.metadata.index`, contiguous.
    entries: VecDeque<Entry>,
}

impl Inner {
    fn snap_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    fn last_index(&self) -> u64 {
        self.snap_index() + self.entries.len() as u64
    }
}

/// Shared handle to the log mirror.
#[derive(Clone, Default)]
pub struct LogStore {
    inner: Arc<RwLock<Inner>>,
    /// Set when raft asked for a snapshot the stored one cannot serve.
    wants_snapshot: Arc<AtomicBool>,
}

impl LogStore {
    /// A log rebuilt from what was on disk.
    pub fn from_recovered(r: Recovered) -> Self {
        // The configuration as of the snapshot: raft replays the entries after it, membership
        // changes included, and must not find them applied already.
        let inner = Inner {
            hard_state: r.hard_state,
            conf_state: r.snapshot.get_metadata().get_conf_state().clone(),
            snapshot: r.snapshot,
            entries: r.entries.into(),
        };
        Self {
            inner: Arc::new(RwLock::new(inner)),
            wants_snapshot: Arc::default(),
        }
    }

    /// Whether raft needed a fresher snapshot than the stored one (clears the request).
    pub fn take_snapshot_request(&self) -> bool {
        self.wants_snapshot.swap(false, Ordering::Relaxed)
    }

    /// Whether the log has ever been initialised (bootstrapped, or joined through a snapshot).
    pub fn is_initialized(&self) -> bool {
        self.inner.read().unwrap().conf_state != ConfState::default()
    }

    /// Appends entries, replacing any conflicting suffix.
    pub fn append(&self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        let mut w = self.inner.write().unwrap();
        let offset = w.snap_index() + 1;
        assert!(
            first.index >= offset,
            "append below the snapshot: {} < {offset}",
            first.index
        );
        let keep = (first.index - offset) as usize;
        w.entries.truncate(keep);
        assert_eq!(w.last_index() + 1, first.index, "append would leave a gap");
        w.entries.extend(entries.iter().cloned());
    }

    pub fn set_hard_state(&self, hs: HardState) {
        self.inner.write().unwrap().hard_state = hs;
    }

    pub fn set_conf_state(&self, cs: ConfState) {
        self.inner.write().unwrap().conf_state = cs;
    }

    pub fn conf_state(&self) -> ConfState {
        self.inner.read().unwrap().conf_state.clone()
    }

    /// Replaces the log with a snapshot received from the leader.
    pub fn apply_snapshot(&self, snap: Snapshot) {
        let mut w = self.inner.write().unwrap();
        let meta = snap.get_metadata();
        w.hard_state.commit = w.hard_state.commit.max(meta.index);
        w.hard_state.term = w.hard_state.term.max(meta.term);
        w.conf_state = meta.get_conf_state().clone();
        w.entries.clear();
        w.snapshot = snap;
    }

    /// Records a snapshot taken locally at or below the applied index and drops the entries it
    /// covers. Its data is kept in memory only with `keep_data` (a peer is waiting for it): the
    /// state machine has the same state, the file on disk has the bytes, and a large store would
    /// otherwise be held twice.
    pub fn compact_to(&self, mut snap: Snapshot, keep_data: bool) {
        if !keep_data {
            snap.data = Default::default();
        }
        let mut w = self.inner.write().unwrap();
        let index = snap.get_metadata().index;
        let drop = index.saturating_sub(w.snap_index()) as usize;
        for _ in 0..drop.min(w.entries.len()) {
            w.entries.pop_front();
        }
        w.snapshot = snap;
    }

    /// The latest snapshot (for this member's own state machine).
    pub fn latest_snapshot(&self) -> Snapshot {
        self.inner.read().unwrap().snapshot.clone()
    }

    /// Whether the latest snapshot's data is in memory (sendable to a peer as it is).
    pub fn has_snapshot_data(&self) -> bool {
        let r = self.inner.read().unwrap();
        r.snap_index() == 0 || !r.snapshot.data.is_empty()
    }

    /// Forgets the latest snapshot's data once the state machine holds it; a peer that needs a
    /// snapshot later gets a fresh one (see [`raft::Storage::snapshot`] below).
    pub fn release_snapshot_data(&self) {
        self.inner.write().unwrap().snapshot.data = Default::default();
    }

    /// Index of the latest snapshot.
    pub fn snapshot_index(&self) -> u64 {
        self.inner.read().unwrap().snap_index()
    }

    /// Member addresses named by the membership changes in the log after the snapshot.
    pub fn conf_change_addresses(&self) -> Vec<(u64, String)> {
        use protobuf::Message as _;
        let r = self.inner.read().unwrap();
        r.entries
            .iter()
            .filter(|e| e.get_entry_type() == raft::eraftpb::EntryType::EntryConfChangeV2)
            .filter_map(|e| raft::eraftpb::ConfChangeV2::parse_from_bytes(&e.data).ok())
            .flat_map(|cc| super::topology::Topology::addresses_in(&cc))
            .collect()
    }
}

impl raft::Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let r = self.inner.read().unwrap();
        Ok(RaftState {
            hard_state: r.hard_state.clone(),
            conf_state: r.conf_state.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let r = self.inner.read().unwrap();
        if low <= r.snap_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        assert!(
            high <= r.last_index() + 1,
            "entries({low}, {high}) past the last index {}",
            r.last_index()
        );
        let offset = r.snap_index() + 1;
        let mut out: Vec<Entry> = r
            .entries
            .range((low - offset) as usize..(high - offset) as usize)
            .cloned()
            .collect();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let r = self.inner.read().unwrap();
        let snap = r.snap_index();
        if idx == snap {
            return Ok(r.snapshot.get_metadata().term);
        }
        if idx < snap {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > r.last_index() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(r.entries[(idx - snap - 1) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.inner.read().unwrap().snap_index() + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.inner.read().unwrap().last_index())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let r = self.inner.read().unwrap();
        // raft-rs makes a member refuse a snapshot whose configuration leaves it out, so a member
        // added after the stored snapshot was taken needs a newer one: ask the actor for it and
        // let raft try again.
        let cs = r.snapshot.get_metadata().get_conf_state();
        let includes = [
            &cs.voters,
            &cs.learners,
            &cs.voters_outgoing,
            &cs.learners_next,
        ]
        .iter()
        .any(|ids| ids.contains(&to));
        // Data released from memory (see `compact_to`): a fresh snapshot is taken instead.
        let released = r.snap_index() > 0 && r.snapshot.data.is_empty();
        if r.snap_index() < request_index || !includes || released {
            self.wants_snapshot.store(true, Ordering::Relaxed);
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(r.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn e(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    #[test]
    fn append_truncates_conflicts_and_terms_answer_around_the_snapshot() {
        let log = LogStore::default();
        log.append(&[e(1, 1), e(2, 1), e(3, 1)]);
        log.append(&[e(2, 2)]);
        assert_eq!(log.last_index().unwrap(), 2);
        assert_eq!(log.term(2).unwrap(), 2);
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 1;
        snap.mut_metadata().term = 1;
        log.compact_to(snap, true);
        assert_eq!(log.first_index().unwrap(), 2);
        assert_eq!(log.term(1).unwrap(), 1);
        assert!(matches!(
            log.term(0),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        let got = log
            .entries(2, 3, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got.iter().map(|x| x.index).collect::<Vec<_>>(), [2]);
        assert!(log
            .entries(1, 3, None, GetEntriesContext::empty(false))
            .is_err());
    }
}
