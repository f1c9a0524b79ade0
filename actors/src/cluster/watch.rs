//! Watches: a stream of key changes from a revision on, for a key or a prefix.
//!
//! Every member keeps the events of its last `history` revisions in memory, in apply order (the
//! same order on every member), so a watch can start in the recent past and any member can serve
//! it. A watch asking for a revision older than what is kept gets [`WatchError::Compacted`] with
//! the oldest revision it may ask for: it is never silently resumed with a gap. A watcher that
//! does not keep up (its bounded channel is full) is cancelled with the revision to resume from,
//! rather than buffered without bound.

use std::collections::{HashMap, VecDeque};

use tokio::sync::mpsc;

use super::kv::Event;

/// What a watch follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchSpec {
    pub key: Vec<u8>,
    /// `key` is a prefix.
    pub prefix: bool,
    /// First revision to report; 0: from the next change on.
    pub start_revision: i64,
    /// Include each key's previous value.
    pub prev_kv: bool,
}

impl WatchSpec {
    fn matches(&self, key: &[u8]) -> bool {
        if self.prefix {
            key.starts_with(&self.key)
        } else {
            key == self.key.as_slice()
        }
    }
}

/// Events of one revision, or the end of the watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchUpdate {
    /// The matching changes made at `revision`.
    Events { revision: i64, events: Vec<Event> },
    /// The watch ended; `resume_from` is the first revision it did not deliver.
    Cancelled { reason: String, resume_from: i64 },
}

/// Why a watch cannot start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchError {
    /// The start revision's events are no longer kept; `oldest` is the oldest revision that is.
    Compacted { requested: i64, oldest: i64 },
}

impl std::fmt::Display for WatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Compacted { requested, oldest } => write!(
                f,
                "start_revision: {requested} is compacted; the oldest revision still watchable is {oldest}"
            ),
        }
    }
}

struct Watcher {
    spec: WatchSpec,
    tx: mpsc::Sender<WatchUpdate>,
    /// The first revision not delivered yet: where the watch resumes if it ends.
    next: i64,
}

/// The history and the watchers of one member.
pub struct WatchHub {
    /// Events by revision, oldest first; only revisions that changed something.
    history: VecDeque<(i64, Vec<Event>)>,
    /// Revisions kept at most.
    capacity: usize,
    /// Every revision up to this one is gone from the history.
    compacted: i64,
    watchers: HashMap<u64, Watcher>,
    next_id: u64,
}

impl WatchHub {
    /// A hub that starts at `revision` (nothing before it is kept) and keeps `capacity` revisions.
    pub fn new(revision: i64, capacity: usize) -> Self {
        Self {
            history: VecDeque::new(),
            capacity: capacity.max(1),
            compacted: revision,
            watchers: HashMap::new(),
            next_id: 0,
        }
    }

    /// Live watchers.
    pub fn watchers(&self) -> usize {
        self.watchers.len()
    }

    /// The oldest revision a watch may start from.
    pub fn oldest(&self) -> i64 {
        self.compacted + 1
    }

    /// The state machine jumped to `revision` (a snapshot from the leader): history before it is
    /// gone, and watchers cannot be continued without a gap, so they are cancelled.
    pub fn reset(&mut self, revision: i64) {
        self.history.clear();
        self.compacted = revision;
        for (_, w) in self.watchers.drain() {
            // Resuming where it stopped, not after the snapshot: the revisions in between were
            // never delivered, and another member may still have them.
            let _ = w.tx.try_send(WatchUpdate::Cancelled {
                reason: "this member installed a snapshot; watch again from the revision given"
                    .into(),
                resume_from: w.next,
            });
        }
    }

    /// Starts a watch: sends what the history holds from its start revision, then follows.
    /// `current` is the state machine's revision now.
    pub fn watch(
        &mut self,
        mut spec: WatchSpec,
        current: i64,
        tx: mpsc::Sender<WatchUpdate>,
    ) -> Result<u64, WatchError> {
        if spec.start_revision <= 0 {
            spec.start_revision = current + 1;
        }
        if spec.start_revision <= self.compacted {
            return Err(WatchError::Compacted {
                requested: spec.start_revision,
                oldest: self.oldest(),
            });
        }
        self.next_id += 1;
        let id = self.next_id;
        let next = spec.start_revision;
        let mut w = Watcher { spec, tx, next };
        for (rev, events) in &self.history {
            if *rev >= w.spec.start_revision && !deliver(&mut w, *rev, events) {
                return Ok(id);
            }
        }
        self.watchers.insert(id, w);
        Ok(id)
    }

    /// Ends a watch.
    pub fn cancel(&mut self, id: u64) {
        self.watchers.remove(&id);
    }

    /// Records the events of `revision` and hands them to the watchers that want them.
    pub fn record(&mut self, revision: i64, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        self.watchers
            .retain(|_, w| w.spec.start_revision > revision || deliver(w, revision, &events));
        self.history.push_back((revision, events));
        while self.history.len() > self.capacity {
            if let Some((rev, _)) = self.history.pop_front() {
                self.compacted = rev;
            }
        }
    }

    /// Drops watchers whose receiver went away.
    pub fn sweep(&mut self) {
        self.watchers.retain(|_, w| !w.tx.is_closed());
    }
}

/// Sends `w` its share of `events`; false when the watcher is gone or cancelled.
fn deliver(w: &mut Watcher, revision: i64, events: &[Event]) -> bool {
    w.next = revision + 1;
    let mine: Vec<Event> = events
        .iter()
        .filter(|e| w.spec.matches(&e.kv.key))
        .map(|e| {
            let mut e = e.clone();
            if !w.spec.prev_kv {
                e.prev = None;
            }
            e
        })
        .collect();
    if mine.is_empty() {
        return !w.tx.is_closed();
    }
    match w.tx.try_send(WatchUpdate::Events {
        revision,
        events: mine,
    }) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Closed(_)) => false,
        // A full channel has no room for a notice either: dropping the sender ends the
        // receiver's stream, which the adapter reports as `lagged`.
        Err(mpsc::error::TrySendError::Full(_)) => false,
    }
}

/// The update an adapter reports when its watch channel closed without a `Cancelled`: the
/// watcher fell behind (its buffer filled up) or the raft member restarted.
pub fn lagged(last_delivered: i64) -> WatchUpdate {
    WatchUpdate::Cancelled {
        reason: "the watch ended on this member (it fell behind, or the member restarted); watch again from the revision given".into(),
        resume_from: last_delivered + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::kv::KeyValue;

    fn put(key: &str, rev: i64) -> Event {
        Event {
            deleted: false,
            kv: KeyValue {
                key: key.into(),
                value: b"v".to_vec(),
                create_revision: rev,
                mod_revision: rev,
                version: 1,
                lease: 0,
            },
            prev: Some(KeyValue {
                key: key.into(),
                value: b"old".to_vec(),
                create_revision: 1,
                mod_revision: 1,
                version: 1,
                lease: 0,
            }),
            expired: false,
        }
    }

    fn spec(key: &str, prefix: bool, start: i64) -> WatchSpec {
        WatchSpec {
            key: key.into(),
            prefix,
            start_revision: start,
            prev_kv: false,
        }
    }

    #[test]
    fn a_watch_replays_history_from_its_revision_then_follows_its_prefix() {
        let mut hub = WatchHub::new(0, 100);
        hub.record(1, vec![put("a/1", 1)]);
        hub.record(2, vec![put("b/1", 2)]);
        hub.record(3, vec![put("a/2", 3)]);
        let (tx, mut rx) = mpsc::channel(16);
        hub.watch(spec("a/", true, 2), 3, tx).unwrap();
        hub.record(4, vec![put("a/3", 4), put("c", 4)]);
        let mut got = Vec::new();
        while let Ok(WatchUpdate::Events { revision, events }) = rx.try_recv() {
            assert!(events.iter().all(|e| e.prev.is_none()), "prev_kv not asked");
            got.push((revision, events.len()));
        }
        assert_eq!(got, [(3, 1), (4, 1)]);
    }

    #[test]
    fn a_compacted_start_revision_is_refused_with_the_oldest_available() {
        let mut hub = WatchHub::new(0, 2);
        for rev in 1..=5 {
            hub.record(rev, vec![put("k", rev)]);
        }
        let (tx, _rx) = mpsc::channel(16);
        assert_eq!(
            hub.watch(spec("k", false, 3), 5, tx.clone()),
            Err(WatchError::Compacted {
                requested: 3,
                oldest: 4
            })
        );
        assert!(hub.watch(spec("k", false, 4), 5, tx).is_ok());
    }

    #[test]
    fn a_slow_watcher_is_dropped_not_buffered() {
        let mut hub = WatchHub::new(0, 100);
        let (tx, mut rx) = mpsc::channel(1);
        hub.watch(spec("k", false, 0), 0, tx).unwrap();
        hub.record(1, vec![put("k", 1)]);
        hub.record(2, vec![put("k", 2)]);
        assert_eq!(hub.watchers(), 0);
        assert!(matches!(
            rx.try_recv(),
            Ok(WatchUpdate::Events { revision: 1, .. })
        ));
        // Then the channel ends: the adapter reports `lagged`.
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_snapshot_install_cancels_watchers_with_where_to_resume() {
        let mut hub = WatchHub::new(0, 100);
        let (tx, mut rx) = mpsc::channel(4);
        hub.watch(spec("k", false, 0), 0, tx).unwrap();
        hub.record(1, vec![put("k", 1)]);
        hub.reset(50);
        assert!(matches!(
            rx.try_recv(),
            Ok(WatchUpdate::Events { revision: 1, .. })
        ));
        // Revisions 2..=50 were never delivered: resume at 2, which this member refuses as
        // compacted rather than skipping them.
        assert_eq!(
            rx.try_recv(),
            Ok(WatchUpdate::Cancelled {
                reason: "this member installed a snapshot; watch again from the revision given"
                    .into(),
                resume_from: 2
            })
        );
        assert_eq!(hub.oldest(), 51);
    }
}
