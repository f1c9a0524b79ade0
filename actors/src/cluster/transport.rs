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

/// Sends raft messages to other members.
pub trait Transport: Send + Sync + 'static {
    /// Queues `msgs` for delivery; answers, per destination, whether they could be queued (false:
    /// the peer is unknown or its queue is full, and raft should treat it as unreachable).
    fn send(&self, msgs: Vec<Message>) -> Vec<(u64, bool)>;
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
    fn send(&self, msgs: Vec<Message>) -> Vec<(u64, bool)> {
        let mut by_peer: HashMap<u64, Vec<Message>> = HashMap::new();
        for m in msgs {
            by_peer.entry(m.to).or_default().push(m);
        }
        let net = self.net.read().unwrap();
        let mut out = Vec::new();
        for (to, batch) in by_peer {
            let from = batch[0].from;
            let queued = match net.nodes.get(&to) {
                // A cut link loses messages silently, like a real partition.
                Some(_) if net.cut.contains(&(from, to)) => true,
                Some(node) => node.try_send(Step(batch)).is_ok(),
                None => false,
            };
            out.push((to, queued));
        }
        out
    }
}
