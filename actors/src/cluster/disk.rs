//! The raft log on disk: entries, hard state, conf state and the latest snapshot in one redb file,
//! written by a storage thread so that no fsync ever runs on an actor thread.
//!
//! The raft actor sends one [`WriteBatch`] per raft `Ready`; the thread drains every batch waiting
//! in its channel, writes them in one transaction, commits once (one fsync for the lot: group
//! commit), and then answers each batch in order. Nothing that depends on a batch — a vote, an
//! append acknowledgement, a client's reply — is released before its commit returned.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use redb::{Database, ReadableDatabase, TableDefinition};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const HARD_STATE: &str = "hard_state";
const CONF_STATE: &str = "conf_state";
const SNAPSHOT: &str = "snapshot";

/// What a node finds on disk when it starts.
#[derive(Default, Debug)]
pub struct Recovered {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    /// The latest snapshot (metadata and application data); empty if none was taken.
    pub snapshot: Snapshot,
    /// Entries after the snapshot, contiguous.
    pub entries: Vec<Entry>,
}

/// Everything one raft `Ready` needs on disk.
#[derive(Default)]
pub struct WriteBatch {
    /// The Ready's number, echoed back when the batch is durable.
    pub number: u64,
    /// New entries; they replace any stored entries from the first one's index on.
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    pub conf_state: Option<ConfState>,
    /// A snapshot to keep (received from the leader, or taken locally).
    pub snapshot: Option<Snapshot>,
    /// Drop entries below this index (they are covered by the snapshot).
    pub compact_below: Option<u64>,
    /// Drop every stored entry before appending (a snapshot from the leader replaces the log).
    pub clear_entries: bool,
}

impl WriteBatch {
    /// Whether the batch writes nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
            && self.hard_state.is_none()
            && self.conf_state.is_none()
            && self.snapshot.is_none()
            && self.compact_below.is_none()
            && !self.clear_entries
    }
}

/// A storage failure: what and where. The node cannot go on safely after one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskError(pub String);

impl std::fmt::Display for DiskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err(path: &Path, what: &str, e: impl std::fmt::Display) -> DiskError {
    DiskError(format!("raft storage {}: {what}: {e}", path.display()))
}

/// Called on the storage thread when a batch is durable (or failed).
pub type Done = Box<dyn FnOnce(Result<u64, DiskError>) + Send>;

enum Request {
    Write(Box<WriteBatch>, Done),
    /// Finish queued writes, close the file, then answer.
    Close(std::sync::mpsc::Sender<()>),
    /// Read back everything durable (after the writes queued before it).
    Load(std::sync::mpsc::Sender<Result<Recovered, DiskError>>),
}

/// Handle to the storage thread. Dropping every handle ends the thread.
#[derive(Clone)]
pub struct Disk {
    tx: Sender<Request>,
    /// Injected delay before each commit, in ms (fault injection: a slow disk).
    fsync_delay_ms: Arc<AtomicU64>,
}

impl Disk {
    /// Opens (or creates) `<dir>/raft.redb`, reads what it holds, and starts the storage thread.
    pub fn open(dir: &Path) -> Result<(Disk, Recovered), DiskError> {
        std::fs::create_dir_all(dir).map_err(|e| err(dir, "cannot create directory", e))?;
        let path = dir.join("raft.redb");
        let db = Database::create(&path).map_err(|e| err(&path, "cannot open", e))?;
        let recovered = recover(&db, &path)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let fsync_delay_ms = Arc::new(AtomicU64::new(0));
        let delay = fsync_delay_ms.clone();
        std::thread::Builder::new()
            .name("lodge-storage".into())
            .spawn(move || writer(db, path, rx, delay))
            .map_err(|e| err(dir, "cannot start the storage thread", e))?;
        Ok((Disk { tx, fsync_delay_ms }, recovered))
    }

    /// Queues a batch; `done` runs on the storage thread once it is durable.
    pub fn write(&self, batch: WriteBatch, done: Done) {
        if let Err(crossbeam_channel::SendError(Request::Write(batch, done))) =
            self.tx.send(Request::Write(Box::new(batch), done))
        {
            done(Err(DiskError(format!(
                "storage thread is gone; batch {} not written",
                batch.number
            ))));
        }
    }

    /// Everything durable now, read on the storage thread after the writes queued before this
    /// call. Blocks the caller: a raft actor's (re)start uses it, once, on the supervisor's thread.
    pub fn load(&self) -> Result<Recovered, DiskError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx
            .send(Request::Load(tx))
            .map_err(|_| DiskError("storage thread is gone".into()))?;
        rx.recv()
            .map_err(|_| DiskError("storage thread is gone".into()))?
    }

    /// Writes what is queued, closes the file and waits for that: after this returns the directory
    /// can be opened again. Blocks; call it from a plain thread, not an actor.
    pub fn close(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(Request::Close(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Makes every commit wait `delay` first (fault injection).
    pub fn set_fsync_delay(&self, delay: Duration) {
        self.fsync_delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }
}

fn recover(db: &Database, path: &Path) -> Result<Recovered, DiskError> {
    let mut out = Recovered::default();
    let txn = db.begin_read().map_err(|e| err(path, "read", e))?;
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(out),
        Err(e) => return Err(err(path, "open meta table", e)),
    };
    let get = |key: &str| -> Result<Option<Vec<u8>>, DiskError> {
        Ok(meta
            .get(key)
            .map_err(|e| err(path, key, e))?
            .map(|v| v.value().to_vec()))
    };
    if let Some(b) = get(HARD_STATE)? {
        out.hard_state =
            HardState::parse_from_bytes(&b).map_err(|e| err(path, "corrupt hard state", e))?;
    }
    if let Some(b) = get(CONF_STATE)? {
        out.conf_state =
            ConfState::parse_from_bytes(&b).map_err(|e| err(path, "corrupt conf state", e))?;
    }
    if let Some(b) = get(SNAPSHOT)? {
        out.snapshot =
            Snapshot::parse_from_bytes(&b).map_err(|e| err(path, "corrupt snapshot", e))?;
    }
    let entries = txn
        .open_table(ENTRIES)
        .map_err(|e| err(path, "open entries table", e))?;
    let first = out.snapshot.get_metadata().index + 1;
    let mut expect = first;
    for item in entries
        .range(first..)
        .map_err(|e| err(path, "read entries", e))?
    {
        let (k, v) = item.map_err(|e| err(path, "read entry", e))?;
        let index = k.value();
        if index != expect {
            return Err(err(
                path,
                "log has a gap",
                format!(
                    "expected entry {expect}, found {index}; refusing to start on a damaged log"
                ),
            ));
        }
        let e = Entry::parse_from_bytes(v.value())
            .map_err(|e| err(path, &format!("corrupt entry {index}"), e))?;
        if e.index != index {
            return Err(err(
                path,
                "corrupt entry",
                format!("stored at {index} but says {}", e.index),
            ));
        }
        out.entries.push(e);
        expect += 1;
    }
    if out.hard_state.commit
        > out
            .entries
            .last()
            .map_or(out.snapshot.get_metadata().index, |e| e.index)
    {
        return Err(err(
            path,
            "log is shorter than its commit index",
            format!(
                "commit {} but last entry {}; acknowledged data would be lost",
                out.hard_state.commit,
                expect - 1
            ),
        ));
    }
    Ok(out)
}

fn writer(db: Database, path: PathBuf, rx: Receiver<Request>, delay_ms: Arc<AtomicU64>) {
    let mut closing = None;
    // After one failed commit nothing later may be written: it could leave a hole in the log.
    let mut broken: Option<DiskError> = None;
    while let Ok(first) = rx.recv() {
        let mut writes: Vec<(WriteBatch, Done)> = Vec::new();
        let mut loads = Vec::new();
        for req in std::iter::once(first).chain(rx.try_iter()) {
            match req {
                Request::Write(b, d) => writes.push((*b, d)),
                Request::Close(ack) => closing = Some(ack),
                Request::Load(reply) => loads.push(reply),
            }
        }
        let result = if let Some(e) = &broken {
            Err(e.clone())
        } else if writes.iter().all(|(b, _)| b.is_empty()) {
            Ok(())
        } else {
            let delay = delay_ms.load(Ordering::Relaxed);
            if delay > 0 {
                std::thread::sleep(Duration::from_millis(delay));
            }
            commit(&db, &path, writes.iter().map(|(b, _)| b))
        };
        if let Err(e) = &result {
            broken.get_or_insert_with(|| e.clone());
        }
        for (b, done) in writes {
            done(result.clone().map(|()| b.number));
        }
        for reply in loads {
            let _ = reply.send(recover(&db, &path));
        }
        if closing.is_some() {
            break;
        }
    }
    drop(db);
    if let Some(ack) = closing {
        let _ = ack.send(());
    }
}

fn commit<'a>(
    db: &Database,
    path: &Path,
    batches: impl Iterator<Item = &'a WriteBatch>,
) -> Result<(), DiskError> {
    let txn = db.begin_write().map_err(|e| err(path, "begin write", e))?;
    {
        let mut entries = txn
            .open_table(ENTRIES)
            .map_err(|e| err(path, "open entries", e))?;
        let mut meta = txn
            .open_table(META)
            .map_err(|e| err(path, "open meta", e))?;
        let enc =
            |m: &dyn protobuf::Message| m.write_to_bytes().map_err(|e| err(path, "encode", e));
        for b in batches {
            if let Some(s) = &b.snapshot {
                meta.insert(SNAPSHOT, enc(s)?.as_slice())
                    .map_err(|e| err(path, "write snapshot", e))?;
            }
            if b.clear_entries {
                entries
                    .retain_in(0u64.., |_, _| false)
                    .map_err(|e| err(path, "clear", e))?;
            }
            if let Some(first) = b.entries.first() {
                // A leader's entries overwrite a conflicting suffix of ours.
                entries
                    .retain_in(first.index.., |_, _| false)
                    .map_err(|e| err(path, "truncate", e))?;
                for e in &b.entries {
                    entries
                        .insert(e.index, enc(e)?.as_slice())
                        .map_err(|e| err(path, "append", e))?;
                }
            }
            if let Some(below) = b.compact_below {
                entries
                    .retain_in(..below, |_, _| false)
                    .map_err(|e| err(path, "compact", e))?;
            }
            if let Some(hs) = &b.hard_state {
                meta.insert(HARD_STATE, enc(hs)?.as_slice())
                    .map_err(|e| err(path, "write hard state", e))?;
            }
            if let Some(cs) = &b.conf_state {
                meta.insert(CONF_STATE, enc(cs)?.as_slice())
                    .map_err(|e| err(path, "write conf state", e))?;
            }
        }
    }
    txn.commit().map_err(|e| err(path, "commit (fsync)", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &str) -> Entry {
        Entry {
            index,
            term,
            data: data.as_bytes().to_vec().into(),
            ..Default::default()
        }
    }

    fn write_sync(disk: &Disk, batch: WriteBatch) -> Result<u64, DiskError> {
        let (tx, rx) = std::sync::mpsc::channel();
        disk.write(batch, Box::new(move |r| tx.send(r).unwrap()));
        rx.recv().unwrap()
    }

    #[test]
    fn entries_and_state_survive_a_reopen_and_conflicts_truncate() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (disk, rec) = Disk::open(dir.path()).unwrap();
            assert!(rec.entries.is_empty());
            let hs = HardState {
                term: 2,
                vote: 1,
                commit: 2,
                ..Default::default()
            };
            let b = WriteBatch {
                number: 1,
                entries: (1..=4).map(|i| entry(i, 1, "x")).collect(),
                hard_state: Some(hs),
                ..Default::default()
            };
            assert_eq!(write_sync(&disk, b), Ok(1));
            // A new leader overwrites entries 3.. with its own.
            let b = WriteBatch {
                number: 2,
                entries: vec![entry(3, 2, "y")],
                ..Default::default()
            };
            assert_eq!(write_sync(&disk, b), Ok(2));
            disk.close();
        }
        let (_, rec) = Disk::open(dir.path()).unwrap();
        assert_eq!(rec.hard_state.term, 2);
        assert_eq!(
            rec.entries
                .iter()
                .map(|e| (e.index, e.term))
                .collect::<Vec<_>>(),
            [(1, 1), (2, 1), (3, 2)]
        );
    }

    #[test]
    fn a_snapshot_and_compaction_leave_only_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (disk, _) = Disk::open(dir.path()).unwrap();
            let b = WriteBatch {
                number: 1,
                entries: (1..=10).map(|i| entry(i, 1, "x")).collect(),
                ..Default::default()
            };
            write_sync(&disk, b).unwrap();
            let mut snap = Snapshot::default();
            snap.mut_metadata().index = 6;
            snap.mut_metadata().term = 1;
            snap.data = b"state".to_vec().into();
            let b = WriteBatch {
                number: 2,
                snapshot: Some(snap),
                compact_below: Some(7),
                ..Default::default()
            };
            write_sync(&disk, b).unwrap();
            disk.close();
        }
        let (_, rec) = Disk::open(dir.path()).unwrap();
        assert_eq!(rec.snapshot.get_metadata().index, 6);
        assert_eq!(&rec.snapshot.data[..], b"state");
        assert_eq!(rec.entries.first().map(|e| e.index), Some(7));
        assert_eq!(rec.entries.len(), 4);
    }

    #[test]
    fn a_snapshot_from_the_leader_replaces_a_conflicting_tail_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (disk, _) = Disk::open(dir.path()).unwrap();
            let b = WriteBatch {
                number: 1,
                entries: (1..=8).map(|i| entry(i, 1, "old")).collect(),
                ..Default::default()
            };
            write_sync(&disk, b).unwrap();
            let mut snap = Snapshot::default();
            snap.mut_metadata().index = 5;
            snap.mut_metadata().term = 3;
            let b = WriteBatch {
                number: 2,
                snapshot: Some(snap),
                compact_below: Some(6),
                clear_entries: true,
                entries: vec![entry(6, 3, "new")],
                ..Default::default()
            };
            write_sync(&disk, b).unwrap();
            disk.close();
        }
        let (_, rec) = Disk::open(dir.path()).unwrap();
        // Entries 7 and 8 of the old term are gone; 6 is the leader's.
        assert_eq!(
            rec.entries
                .iter()
                .map(|e| (e.index, e.term))
                .collect::<Vec<_>>(),
            [(6, 3)]
        );
    }

    #[test]
    fn a_log_shorter_than_its_commit_index_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (disk, _) = Disk::open(dir.path()).unwrap();
            let hs = HardState {
                commit: 5,
                ..Default::default()
            };
            let b = WriteBatch {
                number: 1,
                entries: (1..=2).map(|i| entry(i, 1, "x")).collect(),
                hard_state: Some(hs),
                ..Default::default()
            };
            write_sync(&disk, b).unwrap();
            disk.close();
        }
        let e = Disk::open(dir.path()).err().expect("must refuse");
        assert!(e.0.contains("shorter than its commit index"), "{e}");
    }

    #[test]
    fn a_garbage_file_is_reported_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("raft.redb"), b"this is not a database").unwrap();
        let e = Disk::open(dir.path()).err().expect("must refuse");
        assert!(e.0.contains("raft.redb"), "{e}");
    }
}
