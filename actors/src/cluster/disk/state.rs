//! The state machine on disk: the replicated keys, and the records that say which log index
//! they reflect, in an embedded storage engine (fjall, an LSM tree; see docs/dependencies.md
//! for why that one). Keys and records share one fjall keyspace, told apart by a first byte: a
//! keyspace of its own for the small records, written by every commit, would never fill its
//! memtable and so would pin every journal file until fjall's journal limit forces a flush.
//!
//! The raft log is the write-ahead log. The raft actor applies a `Ready`'s committed entries and
//! commits their writes here as one atomic batch together with the applied index, without an
//! fsync or even a write to the operating system: a crash leaves the engine at some applied index,
//! consistent with its keys, and raft replays the log from there. Before the log drops entries (a compaction, or a leader's snapshot
//! replacing it), the storage thread makes the engine durable ([`StateEngine::persist`]), so the
//! log never loses an entry the durable engine has not absorbed.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::{Deserialize, Serialize};

use super::{err, DiskError};
use crate::cluster::keys::{scan_start, KeySpace};
use crate::cluster::kv::KeyValue;

/// Most engine files kept open at once.
const MAX_OPEN_FILES: usize = 256;
/// Most journal bytes before fjall flushes memtables to free journal files: bounds the journal's
/// disk and what a start replays (fjall's smallest setting).
const MAX_JOURNAL_BYTES: u64 = 64 << 20;

/// The first byte of a replicated key's engine key.
const KEY: u8 = b'k';
/// The first byte of a bookkeeping record's engine key.
const META: u8 = b'm';

fn tagged(tag: u8, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(tag);
    k.extend_from_slice(key);
    k
}

/// The engine's files, shared by the raft actor (its reads and writes) and the storage thread
/// (its fsyncs).
#[derive(Clone)]
pub struct StateEngine {
    db: Database,
    space: Keyspace,
}

impl StateEngine {
    /// Opens (or creates) the engine in `dir`.
    pub fn open(dir: &Path) -> Result<Self, DiskError> {
        let open = || -> Result<Self, fjall::Error> {
            // The engine's file cache stays well below the node's descriptor limit, which its
            // connections share (fjall's default would keep up to 900 files open).
            // The journal is written out only when the storage thread persists it (or its buffer
            // fills), not at every commit: a commit is then no system call, and what a crash
            // loses the raft log replays.
            let db = Database::builder(dir)
                .max_cached_files(Some(MAX_OPEN_FILES))
                .max_journaling_size(MAX_JOURNAL_BYTES)
                .manual_journal_persist(true)
                .open()?;
            let space = db.keyspace("state", KeyspaceCreateOptions::default)?;
            Ok(Self { db, space })
        };
        open().map_err(|e| err(dir, "cannot open the state engine", e))
    }

    /// Makes every committed write durable (an fsync of the engine's journal). Called on the
    /// storage thread only.
    pub fn persist(&self) -> Result<(), DiskError> {
        self.db
            .persist(PersistMode::SyncAll)
            .map_err(|e| DiskError(format!("state engine: fsync failed: {e}")))
    }

    /// The keys, for a state machine.
    pub fn key_space(&self) -> DiskKeys {
        DiskKeys {
            engine: self.clone(),
            pending: BTreeMap::new(),
            pending_meta: BTreeMap::new(),
            cleared: false,
        }
    }
}

/// A stored key's value: the key itself is the engine's key. Borrowed when written, so that a
/// commit does not copy each value once more.
#[derive(Serialize, Deserialize)]
struct Stored<'a> {
    value: Cow<'a, [u8]>,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    lease: i64,
}

fn encode(kv: &KeyValue) -> Vec<u8> {
    postcard::to_stdvec(&Stored {
        value: Cow::Borrowed(&kv.value),
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
    })
    .expect("a key serialises")
}

fn decode(key: &[u8], bytes: &[u8]) -> KeyValue {
    // The engine holds only what `encode` wrote: anything else is damage the member must not
    // answer from (the supervisor restarts it, and it fails again, loudly).
    let s: Stored = postcard::from_bytes(bytes)
        .unwrap_or_else(|e| panic!("state engine: key {key:?} does not decode: {e}"));
    KeyValue {
        key: key.to_vec(),
        value: s.value.into_owned(),
        create_revision: s.create_revision,
        mod_revision: s.mod_revision,
        version: s.version,
        lease: s.lease,
    }
}

fn read_failed(e: fjall::Error) -> ! {
    // A read error leaves the state machine unable to apply or answer: failing the actor is the
    // only safe course (its supervisor restarts it from the log and the engine).
    panic!("state engine: read failed: {e}")
}

/// The state machine's keys on disk, with the writes of the `Ready` being applied held in
/// memory until [`KeySpace::commit`].
pub struct DiskKeys {
    engine: StateEngine,
    /// Writes since the last commit: a key's new value, or `None` for a removal.
    pending: BTreeMap<Vec<u8>, Option<KeyValue>>,
    pending_meta: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Everything on disk is to go at the next commit (a leader's snapshot replaces it).
    cleared: bool,
}

/// A key found by a merged scan, its value still encoded if it came from disk.
enum Found<'a> {
    Disk(&'a [u8], &'a [u8]),
    Pending(&'a KeyValue),
}

impl DiskKeys {
    /// The replicated keys on disk from `start` on, in order, without their tag.
    fn disk_scan(&self, start: Bound<Vec<u8>>) -> impl Iterator<Item = (Vec<u8>, Vec<u8>)> + '_ {
        let start = match start {
            Bound::Included(k) => Bound::Included(tagged(KEY, &k)),
            Bound::Excluded(k) => Bound::Excluded(tagged(KEY, &k)),
            Bound::Unbounded => Bound::Included(vec![KEY]),
        };
        let end = Bound::Excluded(vec![KEY + 1]);
        let disk = (!self.cleared).then(|| self.engine.space.range((start, end)));
        disk.into_iter()
            .flatten()
            .map(|guard| match guard.into_inner() {
                Ok((k, v)) => (k[1..].to_vec(), v.to_vec()),
                Err(e) => read_failed(e),
            })
    }

    /// Visits the keys under `prefix` after `after` on disk and in the pending writes, merged in
    /// key order (a pending write hides the key on disk), until `visit` answers false.
    fn merged(&self, prefix: &[u8], after: Option<&[u8]>, visit: &mut dyn FnMut(Found) -> bool) {
        let start = scan_start(prefix, after);
        let mut disk = self
            .disk_scan(start.clone())
            .take_while(|(k, _)| k.starts_with(prefix))
            .peekable();
        let mut pending = self
            .pending
            .range((start, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .peekable();
        loop {
            let order = match (disk.peek(), pending.peek()) {
                (None, None) => return,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((dk, _)), Some((pk, _))) => dk.as_slice().cmp(pk.as_slice()),
            };
            if order == Ordering::Equal {
                disk.next();
            }
            let go_on = if order == Ordering::Less {
                let (k, v) = disk.next().expect("peeked");
                visit(Found::Disk(&k, &v))
            } else {
                match pending.next().expect("peeked") {
                    (_, Some(kv)) => visit(Found::Pending(kv)),
                    (_, None) => true,
                }
            };
            if !go_on {
                return;
            }
        }
    }
}

impl KeySpace for DiskKeys {
    fn get(&self, key: &[u8]) -> Option<KeyValue> {
        if let Some(pending) = self.pending.get(key) {
            return pending.clone();
        }
        if self.cleared {
            return None;
        }
        match self.engine.space.get(tagged(KEY, key)) {
            Ok(v) => v.map(|v| decode(key, &v)),
            Err(e) => read_failed(e),
        }
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, visit: &mut dyn FnMut(KeyValue) -> bool) {
        self.merged(prefix, after, &mut |found| match found {
            Found::Disk(k, v) => visit(decode(k, v)),
            Found::Pending(kv) => visit(kv.clone()),
        });
    }

    fn count(&self, prefix: &[u8], after: Option<&[u8]>) -> usize {
        let mut n = 0;
        self.merged(prefix, after, &mut |_| {
            n += 1;
            true
        });
        n
    }

    fn put(&mut self, kv: KeyValue) {
        self.pending.insert(kv.key.clone(), Some(kv));
    }

    fn remove(&mut self, key: &[u8]) -> Option<KeyValue> {
        let prev = self.get(key);
        if prev.is_some() {
            self.pending.insert(key.to_vec(), None);
        }
        prev
    }

    fn put_meta(&mut self, name: &[u8], value: Option<Vec<u8>>) {
        self.pending_meta.insert(name.to_vec(), value);
    }

    fn meta(&self, name: &[u8]) -> Option<Vec<u8>> {
        if let Some(pending) = self.pending_meta.get(name) {
            return pending.clone();
        }
        if self.cleared {
            return None;
        }
        match self.engine.space.get(tagged(META, name)) {
            Ok(v) => v.map(|v| v.to_vec()),
            Err(e) => read_failed(e),
        }
    }

    fn meta_scan(&self, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        if !self.cleared {
            for guard in self.engine.space.prefix(tagged(META, prefix)) {
                match guard.into_inner() {
                    Ok((k, v)) => out.insert(k[1..].to_vec(), v.to_vec()),
                    Err(e) => read_failed(e),
                };
            }
        }
        let pending = self
            .pending_meta
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix));
        for (k, v) in pending {
            match v {
                Some(v) => out.insert(k.clone(), v.clone()),
                None => out.remove(k),
            };
        }
        out.into_iter().collect()
    }

    fn commit(&mut self) -> Result<(), String> {
        if self.pending.is_empty() && self.pending_meta.is_empty() && !self.cleared {
            return Ok(());
        }
        let e = &self.engine;
        let mut batch = e.db.batch();
        if self.cleared {
            for guard in e.space.iter() {
                let key = guard
                    .key()
                    .map_err(|err| format!("state engine: reading: {err}"))?;
                batch.remove(&e.space, key);
            }
        }
        for (k, v) in std::mem::take(&mut self.pending) {
            match v {
                Some(kv) => batch.insert(&e.space, tagged(KEY, &k), encode(&kv)),
                None => batch.remove(&e.space, tagged(KEY, &k)),
            }
        }
        for (k, v) in std::mem::take(&mut self.pending_meta) {
            match v {
                Some(v) => batch.insert(&e.space, tagged(META, &k), v),
                None => batch.remove(&e.space, tagged(META, &k)),
            }
        }
        self.cleared = false;
        batch
            .commit()
            .map_err(|err| format!("state engine: write failed: {err}"))
    }

    fn clear(&mut self) {
        self.pending.clear();
        self.pending_meta.clear();
        self.cleared = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::keys::MemoryKeys;

    fn kv(key: &str, value: &str, rev: i64) -> KeyValue {
        KeyValue {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease: 0,
        }
    }

    fn keys_of(space: &dyn KeySpace, prefix: &str, after: Option<&str>) -> Vec<String> {
        let mut out = Vec::new();
        space.scan(prefix.as_bytes(), after.map(str::as_bytes), &mut |kv| {
            out.push(String::from_utf8(kv.key).unwrap());
            true
        });
        out
    }

    /// The same writes on disk and in memory, committed at random points, read back alike.
    #[test]
    fn disk_keys_read_like_memory_keys_before_and_after_commits() {
        let dir = tempfile::tempdir().unwrap();
        let engine = StateEngine::open(dir.path()).unwrap();
        let mut disk = engine.key_space();
        let mut mem = MemoryKeys::default();
        let mut rng = fastrand::Rng::with_seed(7);
        for step in 0..2_000 {
            let key = format!("k/{:02}", rng.u8(..40));
            if rng.u8(..3) == 0 {
                assert_eq!(disk.remove(key.as_bytes()), mem.remove(key.as_bytes()));
            } else {
                let v = kv(&key, &step.to_string(), step);
                disk.put(v.clone());
                mem.put(v);
            }
            if rng.u8(..5) == 0 {
                disk.commit().unwrap();
            }
            let probe = format!("k/{:02}", rng.u8(..40));
            assert_eq!(disk.get(probe.as_bytes()), mem.get(probe.as_bytes()));
            let after = format!("k/{:02}", rng.u8(..40));
            assert_eq!(
                keys_of(&disk, "k/", Some(&after)),
                keys_of(&mem, "k/", Some(&after))
            );
            assert_eq!(keys_of(&disk, "k/1", None), keys_of(&mem, "k/1", None));
            assert_eq!(
                disk.count(b"k/", Some(after.as_bytes())),
                mem.count(b"k/", Some(after.as_bytes()))
            );
        }
    }

    #[test]
    fn a_scan_stops_when_told_and_a_cleared_space_reads_empty_until_refilled() {
        let dir = tempfile::tempdir().unwrap();
        let engine = StateEngine::open(dir.path()).unwrap();
        let mut disk = engine.key_space();
        for i in 0..5 {
            disk.put(kv(&format!("a/{i}"), "x", i));
        }
        disk.put_meta(b"m", Some(b"1".to_vec()));
        disk.commit().unwrap();
        let mut seen = 0;
        disk.scan(b"a/", None, &mut |_| {
            seen += 1;
            seen < 2
        });
        assert_eq!(seen, 2);
        disk.clear();
        assert_eq!(keys_of(&disk, "", None), Vec::<String>::new());
        assert_eq!(disk.meta(b"m"), None);
        disk.put(kv("b", "y", 9));
        disk.commit().unwrap();
        assert_eq!(keys_of(&engine.key_space(), "", None), vec!["b"]);
        assert_eq!(engine.key_space().meta(b"m"), None);
    }

    #[test]
    fn keys_and_records_share_the_keyspace_without_mixing() {
        let dir = tempfile::tempdir().unwrap();
        let engine = StateEngine::open(dir.path()).unwrap();
        let mut disk = engine.key_space();
        disk.put(kv("m", "a key named like the record tag", 1));
        disk.put(kv("\u{0}", "the lowest key", 1));
        disk.put_meta(b"k", Some(b"a record named like the key tag".to_vec()));
        disk.commit().unwrap();
        let disk = engine.key_space();
        assert_eq!(keys_of(&disk, "", None), vec!["\u{0}", "m"]);
        assert_eq!(
            disk.meta_scan(b""),
            vec![(b"k".to_vec(), b"a record named like the key tag".to_vec())]
        );
        assert_eq!(disk.get(b"k"), None);
        assert_eq!(disk.meta(b"m"), None);
    }

    /// The state machine over the engine, restored from it, holds what it held, leases and
    /// their keys included, and what the same commands leave in memory.
    #[test]
    fn a_state_restored_from_the_engine_is_the_state_that_wrote_it() {
        use crate::cluster::kv::{Command, KvState};
        let put = |key: &str, lease: i64| Command::Put {
            key: key.as_bytes().to_vec(),
            value: b"v".to_vec(),
            lease,
        };
        let commands = [
            Command::LeaseGrant { id: 0, ttl_secs: 5 },
            Command::LeaseGrant { id: 0, ttl_secs: 9 },
            Command::LeaseGrant { id: 0, ttl_secs: 7 },
            put("a", 1),
            put("b", 1),
            put("c", 2),
            put("d", 0),
            put("b", 2),
            Command::Delete {
                key: b"a".to_vec(),
                prefix: false,
            },
            Command::LeaseRevoke {
                id: 3,
                expired: false,
            },
            Command::LeaseRevoke {
                id: 2,
                expired: true,
            },
            put("e", 1),
        ];
        let dir = tempfile::tempdir().unwrap();
        let engine = StateEngine::open(dir.path()).unwrap();
        let mut on_disk = KvState::over(Box::new(engine.key_space()));
        let mut in_memory = KvState::default();
        for (i, cmd) in commands.iter().enumerate() {
            on_disk.apply(cmd);
            in_memory.apply(cmd);
            if i % 3 == 0 {
                on_disk.commit().unwrap();
            }
        }
        on_disk.commit().unwrap();
        let restored = KvState::restore(Box::new(engine.key_space())).unwrap();
        assert_eq!(restored.to_bytes(), in_memory.to_bytes());
        assert_eq!(restored.to_bytes(), on_disk.to_bytes());
        let keys_of_lease_1: Vec<_> = restored.lease(1).unwrap().keys.iter().cloned().collect();
        assert_eq!(keys_of_lease_1, vec![b"e".to_vec()]);
        assert!(restored.lease(2).is_none() && restored.lease(3).is_none());
        assert_eq!(
            restored.get(b"c"),
            None,
            "revoking lease 2 deleted its keys"
        );
    }

    #[test]
    fn committed_writes_and_records_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let engine = StateEngine::open(dir.path()).unwrap();
            let mut disk = engine.key_space();
            disk.put(kv("a", "1", 1));
            disk.put_meta(b"applied", Some(vec![1, 2]));
            disk.commit().unwrap();
            disk.put(kv("b", "uncommitted", 2));
            engine.persist().unwrap();
        }
        let engine = StateEngine::open(dir.path()).unwrap();
        let disk = engine.key_space();
        assert_eq!(disk.get(b"a").unwrap().value, b"1");
        assert_eq!(disk.get(b"b"), None);
        assert_eq!(disk.meta(b"applied"), Some(vec![1, 2]));
        assert_eq!(
            disk.meta_scan(b"app"),
            vec![(b"applied".to_vec(), vec![1, 2])]
        );
    }
}
