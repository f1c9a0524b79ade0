//! `lodge node --force-new-cluster`: makes this member the only member of its group, for a
//! cluster that lost its quorum for good (a voter added by force that never came up, members
//! whose machines are gone). etcd's `--force-new-cluster` is the model.
//!
//! Carried out once per process, when the raft actor first reads the log and before raft does:
//! the entries past the commit index are dropped (never committed, they may hold a membership
//! change that would undo this one), then configuration changes are appended — leave a joint
//! configuration if one is in force, make this member a voter if it is not, remove every other
//! member, one simple change each — and the commit index moves past them. Raft applies them like
//! any committed entry, so the topology, the directory and the log agree, and a later start
//! without the flag replays the same. The other members' copies of the log are no longer part
//! of the group: they must not be started again on their old data directories (they join anew).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType};
use raft::{GetEntriesContext, RawNode, Storage};
use slog::{warn, Logger};

use super::disk::{Disk, WriteBatch};
use super::log::LogStore;
use super::topology::Topology;

/// A request to force a new cluster. Cloned with the raft settings; only the first raft actor of
/// the process carries it out, so a supervisor's restart of the actor does not shrink again a
/// cluster that grew since.
#[derive(Clone, Debug)]
pub struct ForceNewCluster {
    /// This member's address, recorded if the configuration did not hold it.
    addr: String,
    pending: Arc<AtomicBool>,
}

impl ForceNewCluster {
    /// A request for the member reachable at `addr`.
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            pending: Arc::new(AtomicBool::new(true)),
        }
    }

    /// True the first time only.
    fn take(&self) -> bool {
        self.pending.swap(false, Ordering::SeqCst)
    }
}

/// Carries out `force` (if still pending) on the log in `store` and `disk`, before raft reads
/// it. Answers the changes appended (empty: nothing to do, this member is alone already).
pub fn apply(
    force: &ForceNewCluster,
    id: u64,
    store: &LogStore,
    disk: &Disk,
    log: &Logger,
) -> Result<Vec<ConfChangeV2>, String> {
    if !force.take() {
        return Ok(Vec::new());
    }
    if !store.is_initialized() {
        return Err(
            "--force-new-cluster: the data directory holds no log; it recovers a member's own data directory"
                .into(),
        );
    }
    let state = store.initial_state().map_err(|e| e.to_string())?;
    let mut hs = state.hard_state;
    let first = store.snapshot_index() + 1;
    let committed = if hs.commit >= first {
        store
            .entries(first, hs.commit + 1, None, GetEntriesContext::empty(false))
            .map_err(|e| format!("--force-new-cluster: reading the log: {e}"))?
    } else {
        Vec::new()
    };
    // A scratch raft node works out the configuration in force at the commit index, exactly as
    // raft will when it replays the log, and checks each change appended here.
    let scratch_store = raft::storage::MemStorage::new_with_conf_state(state.conf_state.clone());
    let cfg = raft::Config {
        id,
        ..Default::default()
    };
    let quiet = Logger::root(slog::Discard, slog::o!());
    let mut scratch = RawNode::new(&cfg, scratch_store, &quiet)
        .map_err(|e| format!("--force-new-cluster: {e}"))?;
    let mut cs = state.conf_state;
    for e in &committed {
        let applied = match e.get_entry_type() {
            EntryType::EntryConfChange => ConfChange::parse_from_bytes(&e.data)
                .ok()
                .and_then(|cc| scratch.apply_conf_change(&cc).ok()),
            EntryType::EntryConfChangeV2 => ConfChangeV2::parse_from_bytes(&e.data)
                .ok()
                .and_then(|cc| scratch.apply_conf_change(&cc).ok()),
            EntryType::EntryNormal => None,
        };
        // A change raft refuses is skipped when applied, here too.
        if let Some(next) = applied {
            cs = next;
        }
    }
    let single = |change_type, node_id| ConfChangeSingle {
        change_type,
        node_id,
        ..Default::default()
    };
    let mut changes = Vec::new();
    // Each step removes one difference from "this member alone"; the bound is a safety net.
    for _ in 0..10_000 {
        let mut cc = ConfChangeV2::default();
        if !cs.voters_outgoing.is_empty() {
            // An empty change leaves the joint configuration.
        } else if !cs.voters.contains(&id) {
            cc.changes = vec![single(ConfChangeType::AddNode, id)].into();
            cc.context = Topology::address_context(id, &force.addr).into();
        } else if let Some(other) = cs
            .voters
            .iter()
            .chain(&cs.learners)
            .chain(&cs.learners_next)
            .find(|m| **m != id)
        {
            cc.changes = vec![single(ConfChangeType::RemoveNode, *other)].into();
        } else {
            break;
        }
        cs = scratch
            .apply_conf_change(&cc)
            .map_err(|e| format!("--force-new-cluster: {e}"))?;
        changes.push(cc);
    }
    if changes.is_empty() {
        warn!(log, "--force-new-cluster: this member is the only member already; nothing to do"; "raft_id" => id);
        return Ok(changes);
    }
    let dropped = store.last_index().unwrap_or(hs.commit) - hs.commit;
    let entries: Vec<Entry> = changes
        .iter()
        .zip(hs.commit + 1..)
        .map(|(cc, index)| Entry {
            entry_type: EntryType::EntryConfChangeV2,
            term: hs.term,
            index,
            data: cc.write_to_bytes().expect("a conf change encodes").into(),
            ..Default::default()
        })
        .collect();
    hs.commit += entries.len() as u64;
    // Appending at the old commit index + 1 replaces the uncommitted tail, in memory and on disk.
    store.append(&entries);
    store.set_hard_state(hs.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    disk.write(
        WriteBatch {
            entries,
            hard_state: Some(hs),
            ..Default::default()
        },
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx.recv()
        .map_err(|_| "--force-new-cluster: the storage thread is gone".to_string())?
        .map_err(|e| format!("--force-new-cluster: {e}"))?;
    warn!(log, "--force-new-cluster: this member is now the only member of its cluster; the others must not be started on their old data directories (they join again with --join); start without the flag from now on";
        "raft_id" => id, "changes" => changes.len(), "uncommitted_entries_dropped" => dropped);
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::{HardState, Snapshot};

    fn quiet() -> Logger {
        Logger::root(slog::Discard, slog::o!())
    }

    /// A log of three voters at index 1 (term 2), with two entries past the commit index.
    fn three_voters(store: &LogStore, disk: &Disk) {
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 1;
        snap.mut_metadata().term = 1;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        let hs = HardState {
            term: 2,
            commit: 1,
            ..Default::default()
        };
        let tail: Vec<Entry> = (2..4)
            .map(|index| Entry {
                index,
                term: 2,
                data: b"uncommitted".to_vec().into(),
                ..Default::default()
            })
            .collect();
        store.apply_snapshot(snap.clone());
        store.append(&tail);
        store.set_hard_state(hs.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        disk.write(
            WriteBatch {
                snapshot: Some(snap.clone()),
                conf_state: Some(snap.get_metadata().get_conf_state().clone()),
                entries: tail,
                hard_state: Some(hs),
                ..Default::default()
            },
            Box::new(move |r| tx.send(r).unwrap()),
        );
        rx.recv().unwrap().unwrap();
    }

    #[test]
    fn others_are_removed_after_the_commit_index_once_per_process() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = Disk::open(dir.path()).unwrap();
        let store = LogStore::default();
        three_voters(&store, &disk);
        let force = ForceNewCluster::new("h:1");
        let changes = apply(&force, 1, &store, &disk, &quiet()).unwrap();
        let removed: Vec<u64> = changes.iter().map(|c| c.changes[0].node_id).collect();
        assert_eq!(removed, [2, 3]);
        // The uncommitted tail is replaced; the changes are committed.
        assert_eq!(store.last_index().unwrap(), 3);
        let hs = store.initial_state().unwrap().hard_state;
        assert_eq!((hs.commit, hs.term), (3, 2));
        // The clone a restarted raft actor gets does nothing again.
        assert!(apply(&force.clone(), 1, &store, &disk, &quiet())
            .unwrap()
            .is_empty());
        disk.close();
        drop(disk);
        let (_, rec) = Disk::open(dir.path()).unwrap();
        assert_eq!(rec.hard_state.commit, 3);
        let on_disk: Vec<u64> = rec.entries.iter().map(|e| e.index).collect();
        assert_eq!(on_disk, [2, 3]);
        assert!(rec
            .entries
            .iter()
            .all(|e| e.get_entry_type() == EntryType::EntryConfChangeV2));
    }

    #[test]
    fn an_empty_data_directory_is_refused_and_a_lone_member_needs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = Disk::open(dir.path()).unwrap();
        let store = LogStore::default();
        let e = apply(&ForceNewCluster::new("h:1"), 1, &store, &disk, &quiet()).unwrap_err();
        assert!(e.contains("holds no log"), "{e}");
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 1;
        snap.mut_metadata().term = 1;
        snap.mut_metadata().mut_conf_state().voters = vec![1];
        store.apply_snapshot(snap);
        let changes = apply(&ForceNewCluster::new("h:1"), 1, &store, &disk, &quiet()).unwrap();
        assert!(changes.is_empty());
    }
}
