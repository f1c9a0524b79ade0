//! Fault injection for tests and drills: lose or delay raft traffic to and from chosen peers, and
//! make every fsync slow. Set through the admin RPC, which refuses unless mutations are allowed.
//!
//! Dropping a peer's traffic at one member cuts that link both ways (outgoing messages are not
//! sent, incoming ones are discarded), which partitions a member without root privileges. The
//! membership heartbeats with that peer are lost as well, so that the other side judges a
//! cut-off member failed as it would behind a real partition.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::disk::Disk;

/// The faults in force on this member.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FaultRules {
    /// Peers whose raft traffic is lost, both ways.
    pub drop_peers: BTreeSet<u64>,
    /// Extra delay before each batch of raft messages sent to a peer.
    pub delay_peers: BTreeMap<u64, Duration>,
    /// Extra delay before each commit of the raft log.
    pub fsync_delay: Duration,
}

/// Shared handle: the transport reads the rules, the admin actor sets them.
#[derive(Clone)]
pub struct Faults {
    rules: Arc<RwLock<FaultRules>>,
    disk: Option<Disk>,
}

impl Faults {
    /// No faults; `disk` receives the fsync delay.
    pub fn new(disk: Option<Disk>) -> Self {
        Self {
            rules: Arc::default(),
            disk,
        }
    }

    /// Replaces every rule (all empty: no faults).
    pub fn set(&self, rules: FaultRules) {
        if let Some(d) = &self.disk {
            d.set_fsync_delay(rules.fsync_delay);
        }
        *self.rules.write().unwrap() = rules;
    }

    /// The rules in force.
    pub fn rules(&self) -> FaultRules {
        self.rules.read().unwrap().clone()
    }

    /// Whether traffic with `peer` is lost.
    pub fn drops(&self, peer: u64) -> bool {
        let r = self.rules.read().unwrap();
        !r.drop_peers.is_empty() && r.drop_peers.contains(&peer)
    }

    /// Delay before sending to `peer`, if any.
    pub fn delay(&self, peer: u64) -> Option<Duration> {
        self.rules.read().unwrap().delay_peers.get(&peer).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::disk::WriteBatch;
    use raft::eraftpb::Entry;
    use std::time::Instant;

    #[test]
    fn rules_answer_per_peer_and_slow_every_commit_until_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = Disk::open(dir.path()).unwrap();
        let faults = Faults::new(Some(disk.clone()));
        let delay = Duration::from_millis(80);
        faults.set(FaultRules {
            drop_peers: [2].into(),
            delay_peers: [(3, Duration::from_millis(10))].into(),
            fsync_delay: delay,
        });
        assert!(faults.drops(2) && !faults.drops(3));
        assert_eq!(faults.delay(3), Some(Duration::from_millis(10)));
        let commit = |n: u64| {
            let (tx, rx) = std::sync::mpsc::channel();
            let t = Instant::now();
            let batch = WriteBatch {
                number: n,
                entries: vec![Entry {
                    index: n,
                    term: 1,
                    ..Default::default()
                }],
                ..Default::default()
            };
            disk.write(batch, Box::new(move |r| tx.send(r).unwrap()));
            rx.recv().unwrap().unwrap();
            t.elapsed()
        };
        assert!(
            commit(1) >= delay,
            "the injected fsync delay was not applied"
        );
        faults.set(FaultRules::default());
        assert!(!faults.drops(2));
        assert_eq!(faults.delay(3), None);
        assert_eq!(faults.rules(), FaultRules::default());
        commit(2);
    }
}
