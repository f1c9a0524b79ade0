//! The replicated key-value state machine, with revisions in the style of etcd: every write
//! command that changes something takes the next revision; each key remembers the revision that
//! created it, the one that last changed it, and how many times it changed.
//!
//! Leases live here too: a key written with a lease is deleted when the lease is revoked, which
//! is how expiry takes effect (the leader decides that a lease expired and proposes its
//! revocation; see the raft actor).
//!
//! Commands arrive through the raft log in the same order on every member, so applying them is
//! deterministic: no clocks, no randomness, no iteration over hash maps.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::keys::{KeySpace, MemoryKeys};

/// A write, as replicated through the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Sets `key` to `value`, attached to `lease` (0: none).
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
    },
    /// Deletes `key`, or every key starting with it when `prefix` is set.
    Delete { key: Vec<u8>, prefix: bool },
    /// Applies `success` if every compare holds, else `failure`, atomically.
    Txn {
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    },
    /// Creates a lease of `ttl_secs`; `id` 0 lets the store pick the next unused id.
    LeaseGrant { id: i64, ttl_secs: i64 },
    /// Ends a lease and deletes its keys; `expired` when the leader found it timed out.
    LeaseRevoke { id: i64, expired: bool },
    /// Creates a lease of `ttl_secs` under the lowest id no lease holds. Proposed instead of a
    /// grant of id 0 once the ids after the highest granted are used up (see
    /// [`KvState::lease_ids_exhausted`]). A command of its own, last in the enum: entries written
    /// before it existed keep their encoding, and a grant of id 0 that was refused then is
    /// refused again on every replay, so members that replay different stretches of the log
    /// still agree.
    LeaseGrantLowestFree { ttl_secs: i64 },
}

/// One operation inside a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
    },
    Delete {
        key: Vec<u8>,
        prefix: bool,
    },
    Get {
        key: Vec<u8>,
    },
}

/// What a compare looks at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// The value (an absent key has none, and compares unequal to any value).
    Value(Vec<u8>),
    /// Times the key was written since it was created (0 when absent).
    Version(i64),
    /// Revision of its creation (0 when absent).
    CreateRevision(i64),
    /// Revision of its last change (0 when absent).
    ModRevision(i64),
}

/// Comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cmp {
    Equal,
    NotEqual,
    Greater,
    Less,
}

/// `key`'s `target` compared with `cmp`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    pub key: Vec<u8>,
    pub cmp: Cmp,
    pub target: Target,
}

/// A stored key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

/// The keys of a lease: a sorted vector rather than a `BTreeSet`, whose smallest node holds room
/// for eleven keys; most leases (a registration's, a session's) carry one to a few keys, and
/// there can be a hundred thousand of them. Serialised as a sequence, like the set it replaces.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeySet(Vec<Vec<u8>>);

impl KeySet {
    /// Adds `key` (once).
    pub fn insert(&mut self, key: &[u8]) {
        if let Err(at) = self.0.binary_search_by(|k| k.as_slice().cmp(key)) {
            self.0.insert(at, key.to_vec());
        }
    }

    /// Removes `key` if present.
    pub fn remove(&mut self, key: &[u8]) {
        if let Ok(at) = self.0.binary_search_by(|k| k.as_slice().cmp(key)) {
            self.0.remove(at);
        }
    }

    /// The keys, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Vec<u8>> {
        self.0.iter()
    }
}

impl IntoIterator for KeySet {
    type Item = Vec<u8>;
    type IntoIter = std::vec::IntoIter<Vec<u8>>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// A lease: a time-to-live that the leader tracks, and the keys that go with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: i64,
    pub ttl_secs: i64,
    pub keys: KeySet,
}

impl KeyValue {
    /// At most the bytes it takes in an answer (see [`KV_OVERHEAD`]).
    pub fn answer_bytes(&self) -> usize {
        self.key.len() + self.value.len() + KV_OVERHEAD
    }
}

/// One page of a range: the keys it holds, how many matched, and whether some were left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    pub kvs: Vec<KeyValue>,
    /// Keys matching (after the cursor), whether in the page or not.
    pub count: usize,
    /// Matching keys were left out (by the limit or the byte budget): the next page starts after
    /// the last key of this one.
    pub more: bool,
}

/// A change to one key, as watchers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// False for a put, true for a delete.
    pub deleted: bool,
    /// The key after the change; for a delete, only the key and the deleting revision.
    pub kv: KeyValue,
    /// The key before the change, if it existed.
    pub prev: Option<KeyValue>,
    /// A delete made because the leader found the key's lease timed out (not a client's request).
    pub expired: bool,
}

/// A command the store refused; nothing of it was applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvError {
    /// A put names a lease that does not exist (any more).
    LeaseNotFound(i64),
    /// A grant asks for an id in use.
    LeaseExists(i64),
    /// A grant with a time-to-live under one second or over [`MAX_LEASE_TTL`].
    BadTtl(i64),
}

/// The longest lease, in seconds (etcd's limit too): deadlines stay far from clock overflow.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// The largest lease id a client may ask for (2^62). The ids above it are left to the store's
/// own picks: however high a client goes, more than 2^62 grants are left before the ids run out
/// (see [`Command::LeaseGrantLowestFree`]). The KV service refuses larger ids; the state machine
/// itself applies whatever its log holds, as it always did.
pub const MAX_CLIENT_LEASE_ID: i64 = 1 << 62;

/// What a stored key costs in an answer besides its key and value bytes, at most: the field
/// tags, lengths and the four revision and lease numbers (53 bytes), and the repeated field's own
/// tag and length. Used to cut answers to a byte budget before they are built.
pub const KV_OVERHEAD: usize = 64;

impl std::fmt::Display for KvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::LeaseNotFound(id) => write!(f, "lease: {id} not found (expired or revoked)"),
            Self::LeaseExists(id) => write!(
                f,
                "id: lease {id} exists or existed (ids are never reused); ask for 0 to get a new one"
            ),
            Self::BadTtl(t) => write!(
                f,
                "ttl: {t} s; a lease lives at least 1 s and at most {MAX_LEASE_TTL} s"
            ),
        }
    }
}

/// The answer to an applied command. It travels to the member that asked (see
/// [`super::client`]) without its events, which only this member's watchers need.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResult {
    /// The store's revision after the command.
    pub revision: i64,
    /// Previous values of the keys a put or delete touched.
    pub prev: Vec<KeyValue>,
    /// Keys deleted.
    pub deleted: u64,
    /// For a txn: whether the compares held.
    pub succeeded: bool,
    /// For a txn: one result per operation of the branch taken, in order.
    pub ops: Vec<OpResult>,
    /// Every key change, in order, for watchers.
    #[serde(skip)]
    pub events: Vec<Event>,
    /// For a lease grant: the lease's id.
    pub lease: i64,
    /// Set when the command was refused as a whole.
    pub error: Option<KvError>,
}

/// The result of one operation inside a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    Put { prev: Option<KeyValue> },
    Delete { deleted: u64, prev: Vec<KeyValue> },
    Get(Option<KeyValue>),
}

/// The state machine.
pub struct KvState {
    keys: Box<dyn KeySpace>,
    revision: i64,
    leases: BTreeMap<i64, Lease>,
    /// The highest lease id ever granted: ids are not reused (unless they run out, see
    /// [`Command::LeaseGrantLowestFree`]), so a client holding a revoked lease's id can never
    /// keep someone else's lease alive.
    last_lease: i64,
    /// Leases granted or revoked since the last commit: their records are written with it.
    dirty_leases: BTreeSet<i64>,
    /// The revision and last lease id as last committed (their record is written on a change;
    /// `None`: not written yet).
    committed_counters: Option<(i64, i64)>,
}

impl Default for KvState {
    fn default() -> Self {
        Self::over(Box::new(MemoryKeys::default()))
    }
}

impl std::fmt::Debug for KvState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvState")
            .field("revision", &self.revision)
            .field("leases", &self.leases.len())
            .field("last_lease", &self.last_lease)
            .finish_non_exhaustive()
    }
}

/// Bookkeeping records kept beside the keys (see [`KeySpace::put_meta`]).
/// The revision, then the highest lease id granted (8 bytes each, big-endian).
const META_COUNTERS: &[u8] = b"kv/counters";
/// A lease's time to live, by id. Its keys are records of their own, one per key, so that
/// attaching a key to a lease that holds many writes one small record, not the whole set.
const META_LEASE: &[u8] = b"kv/lease/";
/// One key of a lease: the lease id, then the key; empty value.
const META_LEASE_KEY: &[u8] = b"kv/lease-key/";

fn lease_record(id: i64) -> Vec<u8> {
    let mut name = META_LEASE.to_vec();
    name.extend_from_slice(&id.to_be_bytes());
    name
}

fn lease_key_record(id: i64, key: &[u8]) -> Vec<u8> {
    let mut name = META_LEASE_KEY.to_vec();
    name.extend_from_slice(&id.to_be_bytes());
    name.extend_from_slice(key);
    name
}

fn decode_i64(b: Option<Vec<u8>>) -> Result<i64, String> {
    match b {
        None => Ok(0),
        Some(b) => b
            .try_into()
            .map(i64::from_be_bytes)
            .map_err(|_| "a counter record is not 8 bytes".to_string()),
    }
}

/// The state as a snapshot holds it: every key, then the counters and leases. The same bytes
/// as the in-memory state of earlier versions, so their snapshots still load.
#[derive(Serialize)]
struct ImageRef<'a> {
    data: KeysInOrder<'a>,
    revision: i64,
    leases: &'a BTreeMap<i64, Lease>,
    last_lease: i64,
}

struct KeysInOrder<'a>(&'a dyn KeySpace);

impl Serialize for KeysInOrder<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Collected first: a serde map needs its length up front.
        let mut all = Vec::new();
        self.0.scan(b"", None, &mut |kv| {
            all.push(kv);
            true
        });
        s.collect_map(all.iter().map(|kv| (&kv.key, kv)))
    }
}

#[derive(Deserialize)]
struct Image {
    data: BTreeMap<Vec<u8>, KeyValue>,
    revision: i64,
    leases: BTreeMap<i64, Lease>,
    last_lease: i64,
}

impl KvState {
    /// An empty state over `keys`.
    pub fn over(keys: Box<dyn KeySpace>) -> Self {
        Self {
            keys,
            revision: 0,
            leases: BTreeMap::new(),
            last_lease: 0,
            dirty_leases: BTreeSet::new(),
            committed_counters: None,
        }
    }

    /// The state `keys` hold, with the counters and leases recorded beside them.
    pub fn restore(keys: Box<dyn KeySpace>) -> Result<Self, String> {
        let mut state = Self::over(keys);
        if let Some(counters) = state.keys.meta(META_COUNTERS) {
            let (revision, last_lease) = counters
                .split_at_checked(8)
                .ok_or("corrupt counters record")?;
            state.revision = decode_i64(Some(revision.to_vec()))?;
            state.last_lease = decode_i64(Some(last_lease.to_vec()))?;
            state.committed_counters = Some((state.revision, state.last_lease));
        }
        for (name, ttl) in state.keys.meta_scan(META_LEASE) {
            let id = decode_i64(Some(name[META_LEASE.len()..].to_vec()))?;
            let ttl_secs = decode_i64(Some(ttl))?;
            let keys = KeySet::default();
            state.leases.insert(id, Lease { id, ttl_secs, keys });
        }
        for (name, _) in state.keys.meta_scan(META_LEASE_KEY) {
            let rest = &name[META_LEASE_KEY.len()..];
            let (id, key) = rest.split_at_checked(8).ok_or("corrupt lease key record")?;
            let id = i64::from_be_bytes(id.try_into().expect("8 bytes"));
            let lease = state
                .leases
                .get_mut(&id)
                .ok_or_else(|| format!("a key record of lease {id}, which has no record"))?;
            lease.keys.insert(key);
        }
        Ok(state)
    }

    /// Replaces everything with `image` (a leader's snapshot, decoded). Bookkeeping records of
    /// the owner (where the log was applied to) go too: the owner writes them again.
    pub fn replace_with(&mut self, image: KvState) {
        self.keys.clear();
        image.keys.scan(b"", None, &mut |kv| {
            self.keys.put(kv);
            true
        });
        self.revision = image.revision;
        self.last_lease = image.last_lease;
        self.committed_counters = None;
        self.leases = image.leases;
        self.dirty_leases = self.leases.keys().copied().collect();
        for lease in self.leases.values() {
            for key in lease.keys.iter() {
                self.keys
                    .put_meta(&lease_key_record(lease.id, key), Some(Vec::new()));
            }
        }
    }

    /// Sets a bookkeeping record of the state's owner, written with the next commit.
    pub fn put_meta(&mut self, name: &[u8], value: Option<Vec<u8>>) {
        self.keys.put_meta(name, value);
    }

    /// A bookkeeping record of the state's owner.
    pub fn meta(&self, name: &[u8]) -> Option<Vec<u8>> {
        self.keys.meta(name)
    }

    /// Writes what changed since the last commit as one atomic unit (see [`KeySpace::commit`]).
    pub fn commit(&mut self) -> Result<(), String> {
        for id in std::mem::take(&mut self.dirty_leases) {
            let record = self
                .leases
                .get(&id)
                .map(|l| l.ttl_secs.to_be_bytes().to_vec());
            self.keys.put_meta(&lease_record(id), record);
        }
        let counters = (self.revision, self.last_lease);
        if Some(counters) != self.committed_counters {
            let mut record = self.revision.to_be_bytes().to_vec();
            record.extend_from_slice(&self.last_lease.to_be_bytes());
            self.keys.put_meta(META_COUNTERS, Some(record));
        }
        self.keys.commit()?;
        self.committed_counters = Some(counters);
        Ok(())
    }

    /// Current revision.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// One lease.
    pub fn lease(&self, id: i64) -> Option<&Lease> {
        self.leases.get(&id)
    }

    /// Every lease, by id.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// One key.
    pub fn get(&self, key: &[u8]) -> Option<KeyValue> {
        self.keys.get(key)
    }

    /// Keys starting with `prefix`, in key order, at most `limit` (0 = all); and how many matched.
    pub fn range(&self, prefix: &[u8], limit: usize) -> (Vec<KeyValue>, usize) {
        let page = self.page(prefix, None, limit, 0);
        (page.kvs, page.count)
    }

    /// One page of the keys starting with `prefix` and, when `after` is given, coming after it;
    /// in key order. It ends before `limit` keys (0: no limit) or before its keys' answer bytes
    /// would pass `max_bytes` (0: no budget), whichever comes first, but always holds at least
    /// one key when one matches, so that paging goes forward even past a key larger than the
    /// budget. Only the keys of the page are copied.
    pub fn page(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> Page {
        let mut page = Page::default();
        let mut bytes = 0;
        let mut full = false;
        self.keys.scan(prefix, after, &mut |kv| {
            let size = kv.answer_bytes();
            let over_limit = limit > 0 && page.kvs.len() >= limit;
            let over_budget = max_bytes > 0 && !page.kvs.is_empty() && bytes + size > max_bytes;
            if over_limit || over_budget {
                full = true;
                return false;
            }
            bytes += size;
            page.kvs.push(kv);
            true
        });
        page.count = page.kvs.len();
        if full {
            // The rest are only counted: their values are not read.
            let last = page.kvs.last().map(|kv| kv.key.clone());
            page.count += self.keys.count(prefix, last.as_deref().or(after));
        }
        page.more = page.count > page.kvs.len();
        page
    }

    /// Applies a command; it takes a new revision if it changed anything.
    pub fn apply(&mut self, cmd: &Command) -> ApplyResult {
        let next = self.revision + 1;
        let mut res = ApplyResult::default();
        if let Some(e) = self.refusal(cmd) {
            res.error = Some(e);
            res.revision = self.revision;
            return res;
        }
        let changed = match cmd {
            Command::Put { key, value, lease } => self.put(key, value, *lease, next, &mut res),
            Command::Delete { key, prefix } => self.delete(key, *prefix, next, &mut res),
            Command::Txn {
                compares,
                success,
                failure,
            } => {
                res.succeeded = compares.iter().all(|c| self.holds(c));
                let ops = if res.succeeded { success } else { failure };
                let mut changed = false;
                for op in ops {
                    // Each operation's own effects, then folded into the command's totals.
                    let mut one = ApplyResult::default();
                    match op {
                        Op::Put { key, value, lease } => {
                            changed |= self.put(key, value, *lease, next, &mut one);
                            res.ops.push(OpResult::Put {
                                prev: one.prev.first().cloned(),
                            });
                        }
                        Op::Delete { key, prefix } => {
                            changed |= self.delete(key, *prefix, next, &mut one);
                            res.ops.push(OpResult::Delete {
                                deleted: one.deleted,
                                prev: one.prev.clone(),
                            });
                        }
                        Op::Get { key } => res.ops.push(OpResult::Get(self.keys.get(key))),
                    }
                    res.deleted += one.deleted;
                    res.prev.extend(one.prev);
                    res.events.extend(one.events);
                }
                changed
            }
            Command::LeaseGrant { .. } | Command::LeaseGrantLowestFree { .. } => {
                let (id, ttl_secs) = match cmd {
                    Command::LeaseGrant { id: 0, ttl_secs } => (self.last_lease + 1, ttl_secs),
                    Command::LeaseGrant { id, ttl_secs } => (*id, ttl_secs),
                    Command::LeaseGrantLowestFree { ttl_secs } => {
                        (self.lowest_free_lease(), ttl_secs)
                    }
                    _ => unreachable!("matched above"),
                };
                self.last_lease = self.last_lease.max(id);
                self.dirty_leases.insert(id);
                self.leases.insert(
                    id,
                    Lease {
                        id,
                        ttl_secs: *ttl_secs,
                        keys: KeySet::default(),
                    },
                );
                res.lease = id;
                false
            }
            Command::LeaseRevoke { id, expired } => {
                res.lease = *id;
                self.dirty_leases.insert(*id);
                let keys = self.leases.remove(id).map(|l| l.keys).unwrap_or_default();
                for k in keys.iter() {
                    self.keys.put_meta(&lease_key_record(*id, k), None);
                }
                let mut changed = false;
                for k in keys {
                    changed |= self.delete(&k, false, next, &mut res);
                }
                for e in &mut res.events {
                    e.expired = *expired;
                }
                changed
            }
        };
        if changed {
            self.revision = next;
        }
        res.revision = self.revision;
        res
    }

    /// Why `cmd` must be refused as a whole, checked before anything is applied so that a
    /// transaction is all or nothing.
    fn refusal(&self, cmd: &Command) -> Option<KvError> {
        let lease_ok = |lease: i64| lease == 0 || self.leases.contains_key(&lease);
        match cmd {
            Command::Put { lease, .. } if !lease_ok(*lease) => Some(KvError::LeaseNotFound(*lease)),
            Command::Txn {
                compares,
                success,
                failure,
            } => {
                let ops = if compares.iter().all(|c| self.holds(c)) {
                    success
                } else {
                    failure
                };
                ops.iter().find_map(|op| match op {
                    Op::Put { lease, .. } if !lease_ok(*lease) => {
                        Some(KvError::LeaseNotFound(*lease))
                    }
                    _ => None,
                })
            }
            Command::LeaseGrant { ttl_secs, .. } | Command::LeaseGrantLowestFree { ttl_secs }
                if !(1..=MAX_LEASE_TTL).contains(ttl_secs) =>
            {
                Some(KvError::BadTtl(*ttl_secs))
            }
            // Ids only grow: an explicit id at or below the highest granted could be one that a
            // client still holds for a revoked lease.
            Command::LeaseGrant { id, .. } if *id < 0 || (*id != 0 && *id <= self.last_lease) => {
                Some(KvError::LeaseExists(*id))
            }
            Command::LeaseGrant { id: 0, .. } if self.lease_ids_exhausted() => {
                Some(KvError::LeaseExists(i64::MAX))
            }
            Command::LeaseRevoke { id, expired: false } if !self.leases.contains_key(id) => {
                Some(KvError::LeaseNotFound(*id))
            }
            _ => None,
        }
    }

    /// Whether a grant of id 0 has no id left after the highest granted: an id at the very top
    /// was granted (only an explicit id can get there, and clients may no longer ask for one
    /// above [`MAX_CLIENT_LEASE_ID`]). The raft member then proposes
    /// [`Command::LeaseGrantLowestFree`] instead.
    pub fn lease_ids_exhausted(&self) -> bool {
        self.last_lease == i64::MAX
    }

    /// The lowest lease id no lease holds now (it may be a revoked lease's).
    fn lowest_free_lease(&self) -> i64 {
        let mut free = 1;
        for id in self.leases.range(1..).map(|(id, _)| *id) {
            if id != free {
                break;
            }
            free += 1;
        }
        free
    }

    fn put(
        &mut self,
        key: &[u8],
        value: &[u8],
        lease: i64,
        rev: i64,
        res: &mut ApplyResult,
    ) -> bool {
        let prev = self.keys.get(key);
        let kv = KeyValue {
            key: key.to_vec(),
            value: value.to_vec(),
            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            lease,
        };
        if let Some(p) = &prev {
            if p.lease != lease {
                self.detach(p);
            }
        }
        if let Some(l) = self.leases.get_mut(&lease) {
            l.keys.insert(key);
            self.keys
                .put_meta(&lease_key_record(lease, key), Some(Vec::new()));
        }
        self.keys.put(kv.clone());
        res.events.push(Event {
            deleted: false,
            kv,
            prev: prev.clone(),
            expired: false,
        });
        res.prev.extend(prev);
        true
    }

    fn detach(&mut self, kv: &KeyValue) {
        if let Some(l) = self.leases.get_mut(&kv.lease) {
            l.keys.remove(&kv.key);
            self.keys
                .put_meta(&lease_key_record(kv.lease, &kv.key), None);
        }
    }

    fn delete(&mut self, key: &[u8], prefix: bool, rev: i64, res: &mut ApplyResult) -> bool {
        let keys: Vec<Vec<u8>> = if prefix {
            let mut keys = Vec::new();
            self.keys.scan(key, None, &mut |kv| {
                keys.push(kv.key);
                true
            });
            keys
        } else if self.keys.get(key).is_some() {
            vec![key.to_vec()]
        } else {
            Vec::new()
        };
        for k in &keys {
            if let Some(prev) = self.keys.remove(k) {
                self.detach(&prev);
                res.events.push(Event {
                    deleted: true,
                    kv: KeyValue {
                        key: k.clone(),
                        value: Vec::new(),
                        create_revision: 0,
                        mod_revision: rev,
                        version: 0,
                        lease: 0,
                    },
                    prev: Some(prev.clone()),
                    expired: false,
                });
                res.prev.push(prev);
            }
        }
        res.deleted += keys.len() as u64;
        !keys.is_empty()
    }

    fn holds(&self, c: &Compare) -> bool {
        use std::cmp::Ordering;
        let kv = self.keys.get(&c.key);
        let kv = kv.as_ref();
        let ord: Option<Ordering> = match &c.target {
            Target::Value(v) => kv.map(|kv| kv.value.as_slice().cmp(v.as_slice())),
            Target::Version(n) => Some(kv.map_or(0, |kv| kv.version).cmp(n)),
            Target::CreateRevision(n) => Some(kv.map_or(0, |kv| kv.create_revision).cmp(n)),
            Target::ModRevision(n) => Some(kv.map_or(0, |kv| kv.mod_revision).cmp(n)),
        };
        match (c.cmp, ord) {
            (Cmp::Equal, Some(o)) => o == Ordering::Equal,
            (Cmp::NotEqual, Some(o)) => o != Ordering::Equal,
            (Cmp::Greater, Some(o)) => o == Ordering::Greater,
            (Cmp::Less, Some(o)) => o == Ordering::Less,
            // An absent key has no value: only "not equal" holds.
            (Cmp::NotEqual, None) => true,
            (_, None) => false,
        }
    }

    /// The whole state, for a raft snapshot.
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("the KV state serialises")
    }

    /// Every key, in order (for tests and tools).
    pub fn all(&self) -> Vec<KeyValue> {
        let mut all = Vec::new();
        self.keys.scan(b"", None, &mut |kv| {
            all.push(kv);
            true
        });
        all
    }

    /// Restores a state from snapshot bytes (empty bytes: the empty state).
    pub fn from_bytes(b: &[u8]) -> Result<Self, String> {
        if b.is_empty() {
            return Ok(Self::default());
        }
        postcard::from_bytes(b).map_err(|e| format!("corrupt KV snapshot: {e}"))
    }
}

impl Serialize for KvState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ImageRef {
            data: KeysInOrder(self.keys.as_ref()),
            revision: self.revision,
            leases: &self.leases,
            last_lease: self.last_lease,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for KvState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let image = Image::deserialize(d)?;
        Ok(Self {
            keys: Box::new(MemoryKeys::from_map(image.data)),
            revision: image.revision,
            dirty_leases: image.leases.keys().copied().collect(),
            leases: image.leases,
            last_lease: image.last_lease,
            committed_counters: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str, v: &str) -> Command {
        Command::Put {
            key: k.into(),
            value: v.into(),
            lease: 0,
        }
    }

    #[test]
    fn revisions_versions_and_prev_values_follow_etcd() {
        let mut s = KvState::default();
        assert_eq!(s.apply(&put("a", "1")).revision, 1);
        let r = s.apply(&put("a", "2"));
        assert_eq!(r.revision, 2);
        assert_eq!(r.prev[0].value, b"1");
        let a = s.get(b"a").unwrap();
        assert_eq!((a.create_revision, a.mod_revision, a.version), (1, 2, 2));
        // Deleting nothing changes nothing, so no new revision.
        assert_eq!(
            s.apply(&Command::Delete {
                key: "zz".into(),
                prefix: false
            })
            .revision,
            2
        );
        s.apply(&put("ab", "x"));
        s.apply(&put("b", "y"));
        let (rows, count) = s.range(b"a", 1);
        assert_eq!((rows.len(), count), (1, 2));
        let r = s.apply(&Command::Delete {
            key: "a".into(),
            prefix: true,
        });
        assert_eq!(r.deleted, 2);
        assert_eq!(s.range(b"", 0).1, 1);
    }

    #[test]
    fn txn_compare_and_swap_is_atomic() {
        let mut s = KvState::default();
        s.apply(&put("k", "old"));
        let cas = |expect: &str, new: &str| Command::Txn {
            compares: vec![Compare {
                key: "k".into(),
                cmp: Cmp::Equal,
                target: Target::Value(expect.into()),
            }],
            success: vec![Op::Put {
                key: "k".into(),
                value: new.into(),
                lease: 0,
            }],
            failure: vec![Op::Get { key: "k".into() }],
        };
        let r = s.apply(&cas("nope", "x"));
        assert!(!r.succeeded);
        let OpResult::Get(Some(got)) = &r.ops[0] else {
            panic!("{r:?}")
        };
        assert_eq!(got.value, b"old");
        assert_eq!(r.revision, 1, "a failed compare writes nothing");
        let r = s.apply(&cas("old", "new"));
        assert!(r.succeeded);
        assert_eq!(s.get(b"k").unwrap().value, b"new");
        // An absent key: version 0, create revision 0.
        let absent = Compare {
            key: "none".into(),
            cmp: Cmp::Equal,
            target: Target::Version(0),
        };
        assert!(
            s.apply(&Command::Txn {
                compares: vec![absent],
                success: vec![],
                failure: vec![]
            })
            .succeeded
        );
    }

    #[test]
    fn revoking_a_lease_deletes_its_keys_and_ids_are_never_reused() {
        let mut s = KvState::default();
        let r = s.apply(&Command::LeaseGrant { id: 0, ttl_secs: 5 });
        assert_eq!(r.lease, 1);
        let with = |k: &str, lease| Command::Put {
            key: k.into(),
            value: "v".into(),
            lease,
        };
        s.apply(&with("a", 1));
        s.apply(&with("b", 1));
        // Re-put without the lease: "b" no longer goes with it.
        s.apply(&with("b", 0));
        assert_eq!(
            s.apply(&with("c", 9)).error,
            Some(KvError::LeaseNotFound(9)),
            "a put on a missing lease is refused"
        );
        assert!(s.get(b"c").is_none());
        let r = s.apply(&Command::LeaseRevoke {
            id: 1,
            expired: true,
        });
        assert_eq!(r.deleted, 1);
        assert_eq!(r.events.len(), 1);
        assert!(r.events[0].deleted);
        assert!(s.get(b"a").is_none() && s.get(b"b").is_some());
        assert_eq!(
            s.apply(&Command::LeaseGrant { id: 0, ttl_secs: 5 }).lease,
            2
        );
        assert_eq!(
            s.apply(&Command::LeaseGrant { id: 2, ttl_secs: 5 }).error,
            Some(KvError::LeaseExists(2))
        );
        // Revoked lease 1's id is not handed out again, even when asked for.
        assert_eq!(
            s.apply(&Command::LeaseGrant { id: 1, ttl_secs: 5 }).error,
            Some(KvError::LeaseExists(1))
        );
        assert_eq!(
            s.apply(&Command::LeaseRevoke {
                id: 1,
                expired: false
            })
            .error,
            Some(KvError::LeaseNotFound(1))
        );
        assert_eq!(
            s.apply(&Command::LeaseGrant {
                id: 0,
                ttl_secs: MAX_LEASE_TTL + 1
            })
            .error,
            Some(KvError::BadTtl(MAX_LEASE_TTL + 1))
        );
        assert_eq!(
            s.apply(&Command::LeaseGrant { id: 0, ttl_secs: 0 }).error,
            Some(KvError::BadTtl(0))
        );
    }

    #[test]
    fn a_page_ends_at_its_limit_or_budget_and_the_next_starts_after_its_last_key() {
        let mut s = KvState::default();
        for (k, n) in [
            ("a/1", 10),
            ("a/2", 500),
            ("a/3", 10),
            ("a/4", 10),
            ("b/1", 10),
        ] {
            s.apply(&Command::Put {
                key: k.into(),
                value: vec![b'v'; n],
                lease: 0,
            });
        }
        let keys = |p: &Page| p.kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>();
        let p = s.page(b"a/", None, 2, 0);
        assert_eq!(
            (keys(&p), p.count, p.more),
            (vec![b"a/1".to_vec(), b"a/2".to_vec()], 4, true)
        );
        let p = s.page(b"a/", Some(b"a/2"), 0, 0);
        assert_eq!(
            (keys(&p), p.count, p.more),
            (vec![b"a/3".to_vec(), b"a/4".to_vec()], 2, false)
        );
        // The budget: a/1 (10 + 3 + 64 bytes) fits, a/2 (567) does not join it.
        let p = s.page(b"a/", None, 0, 300);
        assert_eq!((keys(&p), p.more), (vec![b"a/1".to_vec()], true));
        // A key larger than the budget still makes a page of its own: paging goes on.
        let p = s.page(b"a/", Some(b"a/1"), 0, 300);
        assert_eq!((keys(&p), p.more), (vec![b"a/2".to_vec()], true));
        // A cursor before the prefix reads it from the start; past it, nothing.
        assert_eq!(s.page(b"a/", Some(b"0"), 0, 0).count, 4);
        let p = s.page(b"a/", Some(b"a/9"), 0, 0);
        assert_eq!((p.kvs.len(), p.count, p.more), (0, 0, false));
        assert_eq!(s.range(b"", 0).1, 5);
    }

    #[test]
    fn a_lease_granted_at_the_top_of_the_id_space_does_not_stop_the_store_picking_ids() {
        let mut s = KvState::default();
        let grant = |s: &mut KvState, id| s.apply(&Command::LeaseGrant { id, ttl_secs: 5 });
        assert_eq!(grant(&mut s, 0).lease, 1);
        assert_eq!(grant(&mut s, 0).lease, 2);
        // The state machine applies what its log holds (an entry written before the service
        // refused such ids): the highest id there is.
        assert_eq!(grant(&mut s, i64::MAX).lease, i64::MAX);
        assert!(s.lease_ids_exhausted());
        s.apply(&Command::LeaseRevoke {
            id: 1,
            expired: false,
        });
        // A grant of id 0 is refused as it always was (replays agree with what was applied)...
        assert_eq!(grant(&mut s, 0).error, Some(KvError::LeaseExists(i64::MAX)));
        // ...and the command proposed in its place takes the lowest id no lease holds.
        let lowest = |s: &mut KvState| s.apply(&Command::LeaseGrantLowestFree { ttl_secs: 5 });
        let r = lowest(&mut s);
        assert_eq!((r.error, r.lease), (None, 1));
        assert_eq!(lowest(&mut s).lease, 3);
        assert_eq!(lowest(&mut s).lease, 4);
        assert_eq!(
            s.apply(&Command::LeaseGrantLowestFree { ttl_secs: 0 })
                .error,
            Some(KvError::BadTtl(0))
        );
        // Explicit ids still only grow.
        assert_eq!(grant(&mut s, 7).error, Some(KvError::LeaseExists(7)));
        // Below the top, ids follow the highest granted, never reused.
        let mut s = KvState::default();
        assert_eq!(
            grant(&mut s, MAX_CLIENT_LEASE_ID).lease,
            MAX_CLIENT_LEASE_ID
        );
        s.apply(&Command::LeaseRevoke {
            id: MAX_CLIENT_LEASE_ID,
            expired: false,
        });
        assert_eq!(grant(&mut s, 0).lease, MAX_CLIENT_LEASE_ID + 1);
    }

    #[test]
    fn a_txn_on_a_missing_lease_applies_nothing() {
        let mut s = KvState::default();
        let r = s.apply(&Command::Txn {
            compares: vec![],
            success: vec![
                Op::Put {
                    key: "x".into(),
                    value: "1".into(),
                    lease: 0,
                },
                Op::Put {
                    key: "y".into(),
                    value: "1".into(),
                    lease: 42,
                },
            ],
            failure: vec![],
        });
        assert_eq!(r.error, Some(KvError::LeaseNotFound(42)));
        assert!(s.get(b"x").is_none());
        assert_eq!(s.revision(), 0);
    }

    #[test]
    fn snapshots_round_trip_in_the_format_of_the_former_in_memory_state() {
        let mut s = KvState::default();
        s.apply(&put("a", "1"));
        s.apply(&Command::LeaseGrant { id: 0, ttl_secs: 5 });
        s.apply(&Command::Put {
            key: b"b".to_vec(),
            value: b"2".to_vec(),
            lease: 1,
        });
        let back = KvState::from_bytes(&s.to_bytes()).unwrap();
        assert_eq!(back.all(), s.all());
        assert_eq!(back.revision(), s.revision());
        assert_eq!(back.to_bytes(), s.to_bytes());
        // Earlier versions serialised a struct over a map: their snapshots must still load.
        #[derive(Serialize)]
        struct Former {
            data: BTreeMap<Vec<u8>, KeyValue>,
            revision: i64,
            leases: BTreeMap<i64, Lease>,
            last_lease: i64,
        }
        let former = Former {
            data: s.all().into_iter().map(|kv| (kv.key.clone(), kv)).collect(),
            revision: s.revision(),
            leases: s.leases().map(|l| (l.id, l.clone())).collect(),
            last_lease: 1,
        };
        assert_eq!(postcard::to_stdvec(&former).unwrap(), s.to_bytes());
        assert!(KvState::from_bytes(b"\xff\xff").is_err());
    }

    #[test]
    fn a_lease_key_set_holds_each_key_once_in_order_and_encodes_like_a_set() {
        let mut k = KeySet::default();
        for key in [b"b".as_slice(), b"a", b"b", b"c"] {
            k.insert(key);
        }
        k.remove(b"c");
        k.remove(b"zz");
        assert_eq!(
            k.iter().cloned().collect::<Vec<_>>(),
            vec![b"a".to_vec(), b"b".to_vec()]
        );
        // Snapshots written before the switch (a BTreeSet) decode unchanged.
        let set: std::collections::BTreeSet<Vec<u8>> = [b"a".to_vec(), b"b".to_vec()].into();
        let old = postcard::to_stdvec(&set).unwrap();
        assert_eq!(postcard::to_stdvec(&k).unwrap(), old);
        assert_eq!(postcard::from_bytes::<KeySet>(&old).unwrap(), k);
    }
}
