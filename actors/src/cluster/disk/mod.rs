//! A raft member's storage: a write-ahead log of entries, hard state and conf state under
//! `<dir>/wal/` (see [`wal`]), the latest snapshot in `<dir>/snapshot` (see [`snapshot_file`]),
//! and the state machine's keys in an embedded engine under `<dir>/state/` (see [`state`]); all
//! fsyncs run on a storage thread, never on an actor thread.
//!
//! The raft actor sends one [`WriteBatch`] per raft `Ready`; the thread drains every batch waiting
//! in its channel, appends them as one frame and calls `fdatasync` once (group commit), and then
//! answers each batch in order. Nothing that depends on a batch — a vote, an append
//! acknowledgement, a client's reply — is released before its fsync returned.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};

mod snapshot_file;
pub mod state;
mod wal;

use state::StateEngine;
use wal::{Replay, Wal};

/// What a node finds on disk when it starts.
#[derive(Default, Debug)]
pub struct Recovered {
    /// The latest hard state written (term, vote, commit).
    pub hard_state: HardState,
    /// The latest conf state written.
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
    /// A new hard state to keep.
    pub hard_state: Option<HardState>,
    /// A new conf state to keep.
    pub conf_state: Option<ConfState>,
    /// A snapshot to keep (received from the leader, or taken locally).
    pub snapshot: Option<Snapshot>,
    /// Drop entries below this index (they are covered by the snapshot).
    pub compact_below: Option<u64>,
    /// Drop every stored entry before appending (a snapshot from the leader replaces the log).
    pub clear_entries: bool,
    /// The batch only moves the commit index (no entries, term or vote change): it is answered
    /// at once and written with the next batch that needs an `fdatasync`, as etcd's `MustSync`
    /// does. A crash may lose it; raft learns the commit index from the leader again.
    pub lazy: bool,
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

/// Makes a directory's entries (a created, renamed or removed file) durable.
fn fsync_dir(dir: &Path) -> Result<(), DiskError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| err(dir, "fsync directory", e))
}

/// Called on the storage thread when a batch is durable (or failed).
pub type Done = Box<dyn FnOnce(Result<u64, DiskError>) + Send>;

enum Request {
    Write(Box<WriteBatch>, Done),
    /// Finish queued writes, close the files, then answer.
    Close(std::sync::mpsc::Sender<()>),
    /// Read back everything durable (after the writes queued before it).
    Load(std::sync::mpsc::Sender<Result<Recovered, DiskError>>),
}

/// Handle to the storage thread. Dropping every handle ends the thread.
#[derive(Clone)]
pub struct Disk {
    tx: Sender<Request>,
    /// Injected delay before each fsync, in ms (fault injection: a slow disk).
    fsync_delay_ms: Arc<AtomicU64>,
    state: StateEngine,
}

impl Disk {
    /// Opens (or creates) the log in `dir`, reads what it holds (cutting away a write a crash left
    /// unfinished), and starts the storage thread.
    pub fn open(dir: &Path) -> Result<(Disk, Recovered), DiskError> {
        Self::open_with(dir, wal::SEGMENT_SIZE)
    }

    fn open_with(dir: &Path, segment_size: u64) -> Result<(Disk, Recovered), DiskError> {
        std::fs::create_dir_all(dir).map_err(|e| err(dir, "cannot create directory", e))?;
        // Two processes appending to one log would interleave frames: the second is refused.
        let lock_path = dir.join("LOCK");
        let lock = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| err(&lock_path, "cannot open", e))?;
        lock.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => err(
                dir,
                "in use",
                "another process holds its lock (another node on the same data directory?)",
            ),
            std::fs::TryLockError::Error(e) => err(&lock_path, "cannot lock", e),
        })?;
        let wal_dir = dir.join("wal");
        let old = dir.join("raft.redb");
        if old.exists() && !wal_dir.exists() {
            // Starting empty here would silently forget an acknowledged log.
            return Err(err(
                &old,
                "a log in the former redb format",
                "this version keeps the log in wal/ and cannot read it",
            ));
        }
        let (wal, replay) = Wal::open(&wal_dir, segment_size)?;
        let recovered = recover(dir, replay, true)?;
        let state = StateEngine::open(&dir.join("state"))?;
        let engine = state.clone();
        let (tx, rx) = crossbeam_channel::unbounded();
        let fsync_delay_ms = Arc::new(AtomicU64::new(0));
        let delay = fsync_delay_ms.clone();
        let dir = dir.to_path_buf();
        std::thread::Builder::new()
            .name("lodge-storage".into())
            .spawn(move || writer(wal, engine, lock, dir, rx, delay))
            .map_err(|e| DiskError(format!("cannot start the storage thread: {e}")))?;
        let disk = Disk {
            tx,
            fsync_delay_ms,
            state,
        };
        Ok((disk, recovered))
    }

    /// The state machine's engine.
    pub fn state(&self) -> &StateEngine {
        &self.state
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

    /// Writes what is queued, closes the log's files and waits for that: once this handle and every
    /// state machine over its engine are dropped too, the directory can be opened again. Blocks;
    /// call it from a plain thread, not an actor.
    pub fn close(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(Request::Close(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Makes every fsync wait `delay` first (fault injection).
    pub fn set_fsync_delay(&self, delay: Duration) {
        self.fsync_delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }
}

/// Turns a replay into what raft starts from, after the checks that refuse a damaged log.
fn recover(dir: &Path, replay: Replay, repair: bool) -> Result<Recovered, DiskError> {
    let Replay { state, entries, .. } = replay;
    let path = dir.join("wal");
    let mut out = Recovered {
        hard_state: state.hard_state,
        conf_state: state.conf_state,
        snapshot: snapshot_file::load(dir, state.snapshot, repair)?,
        entries: Vec::new(),
    };
    let first = out.snapshot.get_metadata().index + 1;
    let mut expect = first;
    for (index, e) in entries.into_iter().filter(|(i, _)| *i >= first) {
        if index != expect {
            return Err(err(
                &path,
                "log has a gap",
                format!(
                    "expected entry {expect}, found {index}; refusing to start on a damaged log"
                ),
            ));
        }
        out.entries.push(e);
        expect += 1;
    }
    if out.hard_state.commit > expect - 1 {
        return Err(err(
            &path,
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

/// The storage thread; it holds the directory's lock until it ends.
fn writer(
    mut wal: Wal,
    engine: StateEngine,
    lock: std::fs::File,
    dir: PathBuf,
    rx: Receiver<Request>,
    delay_ms: Arc<AtomicU64>,
) {
    let mut closing = None;
    // The latest hard state of lazy batches, not written yet: it goes first in the next frame,
    // where any hard state of that group supersedes it.
    let mut deferred: Option<WriteBatch> = None;
    // After one failed write nothing later may be written: it could leave a hole in the log.
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
        for (b, _) in writes.iter().filter(|(b, _)| b.lazy) {
            deferred = Some(WriteBatch {
                hard_state: b.hard_state.clone(),
                ..Default::default()
            });
        }
        let needs_sync = writes.iter().any(|(b, _)| !b.lazy && !b.is_empty())
            || (closing.is_some() && deferred.is_some());
        let batches: Vec<&WriteBatch> = if needs_sync {
            deferred
                .iter()
                .chain(writes.iter().map(|(b, _)| b).filter(|b| !b.lazy))
                .filter(|b| !b.is_empty())
                .collect()
        } else {
            Vec::new()
        };
        let result = if let Some(e) = &broken {
            Err(e.clone())
        } else if batches.is_empty() {
            Ok(())
        } else {
            let delay = delay_ms.load(Ordering::Relaxed);
            if delay > 0 {
                std::thread::sleep(Duration::from_millis(delay));
            }
            commit(&mut wal, &engine, &dir, &batches)
        };
        drop(batches);
        if needs_sync && result.is_ok() {
            deferred = None;
        }
        if let Err(e) = &result {
            broken.get_or_insert_with(|| e.clone());
        }
        for (b, done) in writes {
            done(result.clone().map(|()| b.number));
        }
        for reply in loads {
            let _ = reply.send(wal.load().and_then(|r| recover(&dir, r, false)));
        }
        if closing.is_some() {
            break;
        }
    }
    drop(wal);
    drop(engine);
    drop(lock);
    if let Some(ack) = closing {
        let _ = ack.send(());
    }
}

/// Writes one group: the engine's fsync if the log is to drop entries, the snapshot's first phase,
/// the log frame (the commit point), the snapshot's rename, then deletes segments the group
/// compacted away.
fn commit(
    wal: &mut Wal,
    engine: &StateEngine,
    dir: &Path,
    batches: &[&WriteBatch],
) -> Result<(), DiskError> {
    // The log may drop an entry only once the state it led to is durable in the engine.
    if batches
        .iter()
        .any(|b| b.snapshot.is_some() || b.compact_below.is_some() || b.clear_entries)
    {
        engine.persist()?;
    }
    // Only the group's last snapshot needs the file: the log records every one in order.
    let snapshot = batches.iter().rev().find_map(|b| b.snapshot.as_ref());
    if let Some(s) = snapshot {
        snapshot_file::prepare(dir, s)?;
    }
    wal.append(batches)?;
    if snapshot.is_some() {
        snapshot_file::install(dir)?;
    }
    wal.compact()
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
    fn a_second_process_on_the_same_directory_is_refused_until_the_first_closes() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = Disk::open(dir.path()).unwrap();
        let e = Disk::open(dir.path()).err().expect("must refuse");
        assert!(e.0.contains("in use"), "{e}");
        disk.close();
        drop(disk);
        assert!(Disk::open(dir.path()).is_ok());
    }

    #[test]
    fn a_commit_only_hard_state_waits_for_the_next_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let hs = |commit| HardState {
            term: 1,
            vote: 1,
            commit,
            ..Default::default()
        };
        {
            let (disk, _) = Disk::open(dir.path()).unwrap();
            let b = WriteBatch {
                number: 1,
                entries: (1..=3).map(|i| entry(i, 1, "x")).collect(),
                hard_state: Some(hs(1)),
                ..Default::default()
            };
            write_sync(&disk, b).unwrap();
            let lazy = WriteBatch {
                number: 2,
                hard_state: Some(hs(3)),
                lazy: true,
                ..Default::default()
            };
            assert_eq!(write_sync(&disk, lazy), Ok(2));
            // Not written by itself: what a crash now would leave.
            assert_eq!(disk.load().unwrap().hard_state.commit, 1);
            // The next batch that is synced carries it.
            let b = WriteBatch {
                number: 3,
                entries: vec![entry(4, 1, "y")],
                ..Default::default()
            };
            write_sync(&disk, b).unwrap();
            assert_eq!(disk.load().unwrap().hard_state.commit, 3);
            let lazy = WriteBatch {
                number: 4,
                hard_state: Some(hs(4)),
                lazy: true,
                ..Default::default()
            };
            write_sync(&disk, lazy).unwrap();
            // Closing writes what is deferred.
            disk.close();
        }
        let (_, rec) = Disk::open(dir.path()).unwrap();
        assert_eq!(rec.hard_state, hs(4));
        assert_eq!(rec.entries.len(), 4);
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

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("wal"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    /// Offsets of the frames in a segment, its initial state frame first.
    fn frames(path: &Path) -> Vec<usize> {
        let d = std::fs::read(path).unwrap();
        let mut out = Vec::new();
        let mut at = 16;
        while at + 8 <= d.len() {
            let len = u32::from_le_bytes(d[at..at + 4].try_into().unwrap()) as usize;
            if len == 0 {
                break;
            }
            out.push(at);
            at += 8 + len;
        }
        out
    }

    fn flip_byte(path: &Path, at: usize) {
        let mut d = std::fs::read(path).unwrap();
        d[at] ^= 0x55;
        std::fs::write(path, d).unwrap();
    }

    fn indexes(rec: &Recovered) -> Vec<u64> {
        rec.entries.iter().map(|e| e.index).collect()
    }

    fn append(disk: &Disk, number: u64, range: std::ops::RangeInclusive<u64>, term: u64) {
        let b = WriteBatch {
            number,
            entries: range.map(|i| entry(i, term, "some payload")).collect(),
            ..Default::default()
        };
        write_sync(disk, b).unwrap();
    }

    fn snapshot(index: u64, term: u64) -> Snapshot {
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = index;
        snap.mut_metadata().term = term;
        snap.data = format!("state at {index}").into_bytes().into();
        snap
    }

    #[test]
    fn a_garbage_segment_is_reported_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("wal")).unwrap();
        let name = "0000000000000001-0000000000000001.wal";
        std::fs::write(dir.path().join("wal").join(name), b"this is not a log").unwrap();
        let e = Disk::open(dir.path()).err().expect("must refuse");
        assert!(e.0.contains(name), "{e}");
    }

    #[test]
    fn a_garbage_snapshot_file_is_reported_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (disk, _) = Disk::open(dir.path()).unwrap();
            let b = WriteBatch {
                number: 1,
                snapshot: Some(snapshot(1, 1)),
                ..Default::default()
            };
            write_sync(&disk, b).unwrap();
            disk.close();
        }
        std::fs::write(dir.path().join("snapshot"), b"this is not a snapshot").unwrap();
        let e = Disk::open(dir.path()).err().expect("must refuse");
        assert!(e.0.contains("snapshot"), "{e}");
    }

    #[test]
    fn a_log_in_the_former_redb_format_is_refused_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("raft.redb"), b"an old log").unwrap();
        let e = Disk::open(dir.path()).err().expect("must refuse");
        assert!(e.0.contains("raft.redb"), "{e}");
    }

    #[test]
    fn a_torn_tail_is_cut_and_appends_go_on_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (disk, _) = Disk::open(dir.path()).unwrap();
            append(&disk, 1, 1..=3, 1);
            append(&disk, 2, 4..=6, 1);
            append(&disk, 3, 7..=9, 1);
            disk.close();
        }
        let seg = segments(dir.path()).pop().unwrap();
        let last = *frames(&seg).last().unwrap();
        // The last write reached the disk only in part: a checksum mismatch with zeroes after.
        flip_byte(&seg, last + 20);
        {
            let (disk, rec) = Disk::open(dir.path()).unwrap();
            assert_eq!(indexes(&rec), (1..=6).collect::<Vec<_>>());
            append(&disk, 4, 7..=8, 2);
            disk.close();
        }
        // A frame header promising more bytes than the crash left.
        let end = {
            let f = frames(&seg);
            let d = std::fs::read(&seg).unwrap();
            let at = *f.last().unwrap();
            at + 8 + u32::from_le_bytes(d[at..at + 4].try_into().unwrap()) as usize
        };
        let mut d = std::fs::read(&seg).unwrap();
        d[end..end + 4].copy_from_slice(&5000u32.to_le_bytes());
        d[end + 4..end + 12].copy_from_slice(b"partial!");
        std::fs::write(&seg, d).unwrap();
        {
            let (disk, rec) = Disk::open(dir.path()).unwrap();
            assert_eq!(indexes(&rec), (1..=8).collect::<Vec<_>>());
            assert_eq!(rec.entries[7].term, 2);
            append(&disk, 5, 9..=10, 2);
            disk.close();
        }
        let (_, rec) = Disk::open(dir.path()).unwrap();
        assert_eq!(indexes(&rec), (1..=10).collect::<Vec<_>>());
    }

    #[test]
    fn a_damaged_record_in_the_middle_is_an_error_naming_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (disk, _) = Disk::open(dir.path()).unwrap();
            append(&disk, 1, 1..=3, 1);
            append(&disk, 2, 4..=6, 1);
            append(&disk, 3, 7..=9, 1);
            disk.close();
        }
        let seg = segments(dir.path()).pop().unwrap();
        let second = frames(&seg)[2];
        flip_byte(&seg, second + 30);
        let e = Disk::open(dir.path()).err().expect("must refuse");
        let name = seg.file_name().unwrap().to_str().unwrap();
        assert!(e.0.contains(name), "{e}");
        assert!(e.0.contains(&format!("offset {second}")), "{e}");
    }

    #[test]
    fn segments_roll_over_and_compaction_deletes_whole_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (disk, _) = Disk::open_with(dir.path(), 512).unwrap();
            let hs = HardState {
                term: 7,
                vote: 2,
                commit: 1,
                ..Default::default()
            };
            let b = WriteBatch {
                number: 1,
                entries: vec![entry(1, 7, "x")],
                hard_state: Some(hs),
                ..Default::default()
            };
            write_sync(&disk, b).unwrap();
            for i in 2..=100 {
                append(&disk, i, i..=i, 7);
            }
            assert!(segments(dir.path()).len() > 4);
            let b = WriteBatch {
                number: 101,
                snapshot: Some(snapshot(80, 7)),
                compact_below: Some(81),
                ..Default::default()
            };
            write_sync(&disk, b).unwrap();
            disk.close();
        }
        let left = segments(dir.path());
        assert!(left.len() <= 3, "{left:?}");
        assert!(!left[0].ends_with("0000000000000001-0000000000000001.wal"));
        let (_, rec) = Disk::open_with(dir.path(), 512).unwrap();
        // The hard state was written in a deleted segment: each segment starts with the state.
        assert_eq!((rec.hard_state.term, rec.hard_state.vote), (7, 2));
        assert_eq!(rec.snapshot.get_metadata().index, 80);
        assert_eq!(indexes(&rec), (81..=100).collect::<Vec<_>>());
    }

    #[test]
    fn a_damaged_frame_in_an_older_segment_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (disk, _) = Disk::open_with(dir.path(), 512).unwrap();
            for i in 1..=60 {
                append(&disk, i, i..=i, 1);
            }
            disk.close();
        }
        let seg = segments(dir.path()).remove(0);
        let last = *frames(&seg).last().unwrap();
        flip_byte(&seg, last + 12);
        let e = Disk::open_with(dir.path(), 512).err().expect("must refuse");
        assert!(
            e.0.contains(seg.file_name().unwrap().to_str().unwrap()),
            "{e}"
        );
        assert!(e.0.contains(&format!("offset {last}")), "{e}");
    }

    #[test]
    fn many_reopen_cycles_keep_every_acknowledged_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut last = 0;
        for cycle in 1..=30u64 {
            let (disk, rec) = Disk::open_with(dir.path(), 2048).unwrap();
            assert_eq!(rec.hard_state.commit, last, "cycle {cycle}");
            assert_eq!(rec.entries.last().map_or(last, |e| e.index), last);
            let first = rec.snapshot.get_metadata().index + 1;
            assert_eq!(indexes(&rec), (first..=last).collect::<Vec<_>>());
            let b = WriteBatch {
                number: cycle,
                entries: (last + 1..=last + 5)
                    .map(|i| entry(i, cycle, "y"))
                    .collect(),
                hard_state: Some(HardState {
                    term: cycle,
                    commit: last + 5,
                    ..Default::default()
                }),
                ..Default::default()
            };
            write_sync(&disk, b).unwrap();
            last += 5;
            if cycle % 7 == 0 {
                let b = WriteBatch {
                    number: cycle,
                    snapshot: Some(snapshot(last - 2, cycle)),
                    compact_below: Some(last - 1),
                    ..Default::default()
                };
                write_sync(&disk, b).unwrap();
            }
            disk.close();
        }
        assert!(segments(dir.path()).len() < 10);
    }

    #[test]
    fn a_leaders_snapshot_clears_entries_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (disk, _) = Disk::open_with(dir.path(), 2048).unwrap();
            for i in 1..=40 {
                append(&disk, i, i..=i, 1);
            }
            let b = WriteBatch {
                number: 41,
                snapshot: Some(snapshot(10, 2)),
                compact_below: Some(11),
                clear_entries: true,
                entries: vec![entry(11, 2, "new"), entry(12, 2, "new")],
                ..Default::default()
            };
            write_sync(&disk, b).unwrap();
            // Read back while the thread runs.
            let rec = disk.load().unwrap();
            assert_eq!(indexes(&rec), [11, 12]);
            disk.close();
        }
        assert_eq!(segments(dir.path()).len(), 1);
        {
            let (disk, rec) = Disk::open_with(dir.path(), 2048).unwrap();
            assert_eq!(rec.snapshot.get_metadata().index, 10);
            assert_eq!(
                rec.entries
                    .iter()
                    .map(|e| (e.index, e.term))
                    .collect::<Vec<_>>(),
                [(11, 2), (12, 2)]
            );
            append(&disk, 1, 13..=13, 2);
            disk.close();
        }
        let (_, rec) = Disk::open_with(dir.path(), 2048).unwrap();
        assert_eq!(indexes(&rec), [11, 12, 13]);
    }

    #[test]
    fn load_sees_every_write_queued_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = Disk::open_with(dir.path(), 2048).unwrap();
        for i in 1..=50 {
            let b = WriteBatch {
                number: i,
                entries: vec![entry(i, 1, "z")],
                ..Default::default()
            };
            disk.write(b, Box::new(|r| assert!(r.is_ok())));
        }
        let rec = disk.load().unwrap();
        assert_eq!(indexes(&rec), (1..=50).collect::<Vec<_>>());
        disk.close();
    }

    #[test]
    fn a_snapshot_install_cut_short_by_a_crash_is_finished_or_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let snap_path = dir.path().join("snapshot");
        let tmp_path = dir.path().join("snapshot.tmp");
        let old;
        {
            let (disk, _) = Disk::open(dir.path()).unwrap();
            let b = WriteBatch {
                number: 1,
                snapshot: Some(snapshot(3, 1)),
                ..Default::default()
            };
            write_sync(&disk, b).unwrap();
            old = std::fs::read(&snap_path).unwrap();
            let b = WriteBatch {
                number: 2,
                snapshot: Some(snapshot(5, 1)),
                compact_below: Some(6),
                ..Default::default()
            };
            write_sync(&disk, b).unwrap();
            disk.close();
        }
        // The log recorded snapshot 5 but the rename did not happen: the start finishes it.
        std::fs::rename(&snap_path, &tmp_path).unwrap();
        std::fs::write(&snap_path, &old).unwrap();
        {
            let (disk, rec) = Disk::open(dir.path()).unwrap();
            assert_eq!(rec.snapshot.get_metadata().index, 5);
            assert!(!tmp_path.exists());
            disk.close();
        }
        // A first phase the log never recorded is dropped.
        std::fs::write(&tmp_path, &old).unwrap();
        let (_, rec) = Disk::open(dir.path()).unwrap();
        assert_eq!(rec.snapshot.get_metadata().index, 5);
        assert!(!tmp_path.exists());
    }
}
