//! How raft messages travel between members.
//!
//! The raft actor hands every outgoing batch to a [`Transport`]. Delivery is best effort: raft
//! retries what is lost. The gRPC transport carries batches over one long-lived stream per peer;
//! [`MemNetwork`] delivers in-process and can cut links, for deterministic tests of partitions.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use raft::eraftpb::Message;

use super::raft::{RaftNode, Step};
use crate::envelope::ActorRef;

/// What became of the messages to one peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Handed over (a snapshot among them counts as delivered).
    Delivered,
    /// Queued, with a snapshot whose transfer is still going on: the transport sends the raft
    /// actor `SnapshotSent` when it ends.
    InFlight,
    /// Not sent: the peer is unknown, not connected, or its queue is full.
    Unreachable,
}

/// Sends raft messages to other members.
pub trait Transport: Send + Sync + 'static {
    /// Queues `msgs` for delivery and says, per destination, what became of them.
    fn send(&self, msgs: Vec<Message>) -> Vec<(u64, Delivery)>;
}

#[derive(Default)]
struct Net {
    nodes: HashMap<u64, ActorRef<RaftNode>>,
    /// Directed links that drop everything.
    cut: HashSet<(u64, u64)>,
}

/// An in-process network of raft actors with links that can be cut.
#[derive(Clone, Default)]
pub struct MemNetwork {
    net: Arc<RwLock<Net>>,
}

impl MemNetwork {
    /// Makes `node` reachable as member `id`.
    pub fn register(&self, id: u64, node: ActorRef<RaftNode>) {
        self.net.write().unwrap().nodes.insert(id, node);
    }

    /// Cuts every link between the two groups, both ways.
    pub fn partition(&self, a: &[u64], b: &[u64]) {
        let mut net = self.net.write().unwrap();
        for x in a {
            for y in b {
                net.cut.insert((*x, *y));
                net.cut.insert((*y, *x));
            }
        }
    }

    /// Cuts `id` off from every other registered member.
    pub fn isolate(&self, id: u64) {
        let others: Vec<u64> = self
            .net
            .read()
            .unwrap()
            .nodes
            .keys()
            .copied()
            .filter(|o| *o != id)
            .collect();
        self.partition(&[id], &others);
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.net.write().unwrap().cut.clear();
    }
}

impl Transport for MemNetwork {
    fn send(&self, msgs: Vec<Message>) -> Vec<(u64, Delivery)> {
        let mut by_peer: HashMap<u64, Vec<Message>> = HashMap::new();
        for m in msgs {
            by_peer.entry(m.to).or_default().push(m);
        }
        let net = self.net.read().unwrap();
        let mut out = Vec::new();
        for (to, batch) in by_peer {
            let from = batch[0].from;
            let delivery = match net.nodes.get(&to) {
                // A cut link loses messages silently, like a real partition.
                Some(_) if net.cut.contains(&(from, to)) => Delivery::Delivered,
                Some(node) if node.try_send(Step(batch)).is_ok() => Delivery::Delivered,
                _ => Delivery::Unreachable,
            };
            out.push((to, delivery));
        }
        out
    }
}
