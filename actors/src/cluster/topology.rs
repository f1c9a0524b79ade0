//! Cluster topology: who the members are, their addresses and roles, and a version that rises on
//! every membership change and only then.
//!
//! The topology is part of the replicated state: it changes only when a raft configuration change
//! is applied, identically on every member, and travels in snapshots. A change carries the new
//! member's address in its context, so a node that applies it (or catches up from a snapshot)
//! learns where to reach every member without any side channel.
//!
//! [`Directory`] publishes the applied topology to readers outside the raft actor (the gRPC
//! transport, forwarding to the leader, topology watches); it is the only shared view, and only
//! the raft actor writes it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// A member's part in the raft group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Votes and counts toward the quorum.
    Voter,
    /// Receives the log but does not vote (a new member catching up).
    Learner,
}

/// One member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: u64,
    /// Its peer address, `HOST:PORT` (`peer.advertise`): raft and node-to-node calls go there.
    /// Where clients reach it is not replicated (see [`Directory::client_address`]).
    pub addr: String,
    pub role: Role,
}

/// The replicated topology.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Rises by one with every applied membership change.
    pub version: u64,
    pub members: BTreeMap<u64, Member>,
}

/// What a caller asks of the membership.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberRequest {
    /// Adds member `id` at `addr` as a voter or a learner. Asking again for a member already
    /// there with the same address and role changes nothing; a learner asked as a voter is
    /// promoted.
    Add { id: u64, addr: String, role: Role },
    /// Removes member `id`.
    Remove { id: u64 },
    /// Makes learner `id` a voter.
    Promote { id: u64 },
}

/// Why a membership request cannot be carried out as asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanError {
    /// The id or address is taken by another member.
    Conflict(String),
    /// No such member.
    NotFound(String),
    /// The request is malformed.
    Invalid(String),
    /// Not in this state of the group (e.g. removing the last voter).
    Precondition(String),
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Conflict(m) | Self::NotFound(m) | Self::Invalid(m) | Self::Precondition(m) => {
                f.write_str(m)
            }
        }
    }
}

/// Addresses carried in a configuration change's context.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Addresses(Vec<(u64, String)>);

impl Topology {
    /// The topology a brand-new cluster starts with (version 1).
    pub fn bootstrap(members: &[(u64, String)]) -> Self {
        Topology {
            version: 1,
            members: members
                .iter()
                .map(|(id, addr)| {
                    let m = Member {
                        id: *id,
                        addr: addr.clone(),
                        role: Role::Voter,
                    };
                    (*id, m)
                })
                .collect(),
        }
    }

    /// The configuration change that carries out `req`, or `None` when the topology already is
    /// what is asked (an idempotent repeat).
    pub fn plan(&self, req: &MemberRequest) -> Result<Option<ConfChangeV2>, PlanError> {
        let single = |change_type, node_id| ConfChangeSingle {
            change_type,
            node_id,
            ..Default::default()
        };
        match req {
            MemberRequest::Add { id, addr, role } => {
                if *id == 0 {
                    return Err(PlanError::Invalid("id: member ids start at 1".into()));
                }
                check_address(addr)?;
                if let Some(other) = self
                    .members
                    .values()
                    .find(|m| m.addr == *addr && m.id != *id)
                {
                    return Err(PlanError::Conflict(format!(
                        "address: {} is already member {}'s",
                        crate::quote::echo(addr),
                        other.id
                    )));
                }
                let change = match (self.members.get(id), role) {
                    (Some(m), _) if m.addr != *addr => {
                        return Err(PlanError::Conflict(format!(
                            "id: member {id} already exists with address {}",
                            m.addr
                        )))
                    }
                    // Already there as asked, or a voter asked as a learner (no demotion).
                    (Some(_), Role::Learner) => return Ok(None),
                    (Some(m), Role::Voter) if m.role == Role::Voter => return Ok(None),
                    (_, Role::Voter) => ConfChangeType::AddNode,
                    (None, Role::Learner) => ConfChangeType::AddLearnerNode,
                };
                let context = postcard::to_stdvec(&Addresses(vec![(*id, addr.clone())]))
                    .expect("addresses encode");
                Ok(Some(ConfChangeV2 {
                    changes: vec![single(change, *id)].into(),
                    context: context.into(),
                    ..Default::default()
                }))
            }
            MemberRequest::Remove { id } => {
                let Some(m) = self.members.get(id) else {
                    return Err(PlanError::NotFound(format!("id: no member {id}")));
                };
                let voters = self
                    .members
                    .values()
                    .filter(|m| m.role == Role::Voter)
                    .count();
                if m.role == Role::Voter && voters == 1 {
                    return Err(PlanError::Precondition(format!(
                        "member {id} is the last voter; a cluster cannot remove its last voter"
                    )));
                }
                Ok(Some(ConfChangeV2 {
                    changes: vec![single(ConfChangeType::RemoveNode, *id)].into(),
                    ..Default::default()
                }))
            }
            MemberRequest::Promote { id } => match self.members.get(id) {
                None => Err(PlanError::NotFound(format!("id: no member {id}"))),
                Some(m) if m.role == Role::Voter => Ok(None),
                Some(_) => Ok(Some(ConfChangeV2 {
                    changes: vec![single(ConfChangeType::AddNode, *id)].into(),
                    ..Default::default()
                })),
            },
        }
    }

    /// The quorum guard (etcd's `--strict-reconfig-check`): refuses a request after which the
    /// live voters would be fewer than a quorum of the voters, since such a group commits
    /// nothing (not even the change that would undo it) until the missing voters come up.
    /// `live` holds the members known to be running, the leader itself included; the member a
    /// request adds or promotes counts only if it is in `live` too. A request that changes no
    /// voter (a learner, an idempotent repeat) always passes.
    pub fn check_quorum(&self, req: &MemberRequest, live: &BTreeSet<u64>) -> Result<(), PlanError> {
        let voters: BTreeSet<u64> = self
            .members
            .values()
            .filter(|m| m.role == Role::Voter)
            .map(|m| m.id)
            .collect();
        let mut after = voters.clone();
        let what = match req {
            MemberRequest::Add {
                id,
                role: Role::Voter,
                ..
            } => {
                after.insert(*id);
                format!("adding member {id} as a voter")
            }
            MemberRequest::Promote { id } => {
                after.insert(*id);
                format!("promoting member {id} to voter")
            }
            MemberRequest::Remove { id } => {
                after.remove(id);
                format!("removing member {id}")
            }
            MemberRequest::Add { .. } => return Ok(()),
        };
        if after == voters || after.is_empty() {
            return Ok(());
        }
        let quorum = after.len() / 2 + 1;
        let up = after.iter().filter(|id| live.contains(id)).count();
        if up >= quorum {
            return Ok(());
        }
        let down: Vec<String> = after
            .iter()
            .filter(|id| !live.contains(id))
            .map(u64::to_string)
            .collect();
        let advice = match req {
            MemberRequest::Add { .. } => {
                "start the node first and add it as a learner (`lodge cluster add --learner`, then `promote`; `lodge node --join` does both)"
            }
            MemberRequest::Promote { .. } => "wait until it runs and hears from the leader",
            MemberRequest::Remove { .. } => "bring the members that are not live back first",
        };
        Err(PlanError::Precondition(format!(
            "{what} would leave {up} of {} voters live, fewer than the quorum of {quorum}: the cluster could commit nothing, not even the change undoing it (not live: {}); {advice}, or pass --force (request field force) to do it anyway; see docs/operations.md for recovering a cluster that lost its quorum",
            after.len(),
            down.join(", ")
        )))
    }

    /// Follows a configuration change raft applied, whose result is `cs`: the members are exactly
    /// the configuration's (a member leaving through a joint configuration stays until it is
    /// out), addresses come from the change's context or from before. Raises the version.
    pub fn apply(&mut self, cc: &ConfChangeV2, cs: &ConfState) {
        let mut addrs: BTreeMap<u64, String> = self
            .members
            .values()
            .map(|m| (m.id, m.addr.clone()))
            .collect();
        if let Ok(a) = postcard::from_bytes::<Addresses>(&cc.context) {
            addrs.extend(a.0);
        }
        let mut members = BTreeMap::new();
        let voters = cs.voters.iter().chain(&cs.voters_outgoing);
        let learners = cs.learners.iter().chain(&cs.learners_next);
        for (ids, role) in [
            (voters.collect::<Vec<_>>(), Role::Voter),
            (learners.collect(), Role::Learner),
        ] {
            for id in ids {
                members.entry(*id).or_insert_with(|| Member {
                    id: *id,
                    addr: addrs.get(id).cloned().unwrap_or_default(),
                    role,
                });
            }
        }
        self.members = members;
        self.version += 1;
    }

    /// The context of a configuration change that records member `id`'s address.
    pub fn address_context(id: u64, addr: &str) -> Vec<u8> {
        postcard::to_stdvec(&Addresses(vec![(id, addr.to_string())])).expect("addresses encode")
    }

    /// Addresses named by a configuration change not applied yet (a restarted member reads them
    /// from its log, to reach members added after its last snapshot).
    pub fn addresses_in(cc: &ConfChangeV2) -> Vec<(u64, String)> {
        postcard::from_bytes::<Addresses>(&cc.context)
            .map(|a| a.0)
            .unwrap_or_default()
    }
}

fn check_address(addr: &str) -> Result<(), PlanError> {
    let bad = || {
        PlanError::Invalid(format!(
            "address: {} is not HOST:PORT with a port in 1..65535",
            crate::quote::echo(addr)
        ))
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    if is_unspecified(host) {
        return Err(PlanError::Invalid(format!(
            "address: {} is a wildcard; members need an address others can dial",
            crate::quote::echo(addr)
        )));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 && !host.is_empty() => Ok(()),
        _ => Err(bad()),
    }
}

/// Whether `host` is a wildcard (0.0.0.0, ::): fine to listen on, useless to dial.
pub fn is_unspecified(host: &str) -> bool {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified())
}

/// What the directory publishes.
#[derive(Clone, Debug, Default)]
pub struct Published {
    /// The applied topology.
    pub topology: Arc<Topology>,
    /// Addresses known outside the applied topology: members added in entries not applied yet,
    /// or learned when joining. Used only to reach them, never shown as members.
    pub hints: BTreeMap<u64, String>,
    /// The member the raft actor last knew as leader.
    pub leader: Option<u64>,
}

/// The raft member's figures for the metrics page, refreshed every tick.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaftFigures {
    pub is_leader: bool,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub revision: i64,
    pub leases: u64,
    pub leases_expired: u64,
    pub watchers: u64,
}

/// The applied topology, published by the raft actor to whoever needs to read it.
#[derive(Clone)]
pub struct Directory {
    tx: Arc<watch::Sender<Published>>,
    /// Kept apart from the watched value: figures change every tick, and must not wake the
    /// readers of the topology.
    figures: Arc<std::sync::RwLock<RaftFigures>>,
    /// Members' client addresses, as each published it in its heartbeats (and this node's own).
    /// Not replicated: the topology's snapshot encoding stays as it was, and a member learns the
    /// others' within a heartbeat interval of hearing from them. Kept apart from the watched
    /// value for the same reason as the figures.
    clients: Arc<std::sync::RwLock<BTreeMap<u64, String>>>,
}

impl Default for Directory {
    fn default() -> Self {
        Self {
            tx: Arc::new(watch::channel(Published::default()).0),
            figures: Arc::default(),
            clients: Arc::default(),
        }
    }
}

impl Directory {
    /// The latest published view.
    pub fn current(&self) -> Published {
        self.tx.borrow().clone()
    }

    /// A receiver that wakes on every publication.
    pub fn subscribe(&self) -> watch::Receiver<Published> {
        self.tx.subscribe()
    }

    /// `id`'s address, from the topology or the hints.
    pub fn address(&self, id: u64) -> Option<String> {
        let p = self.tx.borrow();
        p.topology
            .members
            .get(&id)
            .map(|m| m.addr.clone())
            .or_else(|| p.hints.get(&id).cloned())
            .filter(|a| !a.is_empty())
    }

    /// Every known address by member id (topology first, then hints).
    pub fn addresses(&self) -> BTreeMap<u64, String> {
        let p = self.tx.borrow();
        let mut out = p.hints.clone();
        for m in p.topology.members.values() {
            out.insert(m.id, m.addr.clone());
        }
        out.retain(|_, a| !a.is_empty());
        out
    }

    /// Publishes a new applied topology (the raft actor only). An older one than published is
    /// ignored: a restarted raft actor replays from its snapshot, behind what readers saw.
    pub fn publish(&self, topology: &Topology) {
        self.tx.send_if_modified(|p| {
            if topology.version < p.topology.version {
                return false;
            }
            p.topology = Arc::new(topology.clone());
            // A hint becomes the topology's business once the member is in it.
            p.hints.retain(|id, _| !topology.members.contains_key(id));
            true
        });
    }

    /// Forgets every hint: once the log is replayed, the applied topology knows every member,
    /// and a hint left over would name one that was removed.
    pub fn clear_hints(&self) {
        self.tx.send_if_modified(|p| {
            let had = !p.hints.is_empty();
            p.hints.clear();
            had
        });
    }

    /// Remembers addresses that the applied topology does not hold (yet).
    pub fn hint(&self, addrs: impl IntoIterator<Item = (u64, String)>) {
        let addrs: Vec<_> = addrs.into_iter().collect();
        self.tx.send_if_modified(|p| {
            let mut changed = false;
            for (id, addr) in addrs {
                if !p.topology.members.contains_key(&id) && p.hints.get(&id) != Some(&addr) {
                    p.hints.insert(id, addr);
                    changed = true;
                }
            }
            changed
        });
    }

    /// Where clients reach member `id`, if it said so (in a heartbeat, or this node of itself).
    pub fn client_address(&self, id: u64) -> Option<String> {
        self.clients.read().unwrap().get(&id).cloned()
    }

    /// Records where clients reach member `id`.
    pub fn set_client_address(&self, id: u64, addr: &str) {
        if addr.is_empty() || self.client_address(id).as_deref() == Some(addr) {
            return;
        }
        self.clients.write().unwrap().insert(id, addr.to_string());
    }

    /// The raft member's latest figures.
    pub fn figures(&self) -> RaftFigures {
        self.figures.read().unwrap().clone()
    }

    /// Records the raft member's figures (the raft actor only).
    pub fn set_figures(&self, f: RaftFigures) {
        *self.figures.write().unwrap() = f;
    }

    /// Records the leader the raft actor knows of.
    pub fn set_leader(&self, leader: Option<u64>) {
        self.tx.send_if_modified(|p| {
            let changed = p.leader != leader;
            p.leader = leader;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Topology {
        Topology::bootstrap(&[(1, "h:1".into()), (2, "h:2".into()), (3, "h:3".into())])
    }

    fn add(id: u64, addr: &str, role: Role) -> MemberRequest {
        MemberRequest::Add {
            id,
            addr: addr.into(),
            role,
        }
    }

    #[test]
    fn a_taken_id_or_address_is_a_conflict_and_a_repeat_is_a_no_op() {
        let t = three();
        assert!(matches!(
            t.plan(&add(2, "h:9", Role::Voter)),
            Err(PlanError::Conflict(m)) if m.contains("member 2 already exists")
        ));
        assert!(matches!(
            t.plan(&add(9, "h:2", Role::Voter)),
            Err(PlanError::Conflict(m)) if m.contains("h:2")
        ));
        assert_eq!(t.plan(&add(2, "h:2", Role::Voter)), Ok(None));
        assert!(matches!(
            t.plan(&add(4, "nohost", Role::Voter)),
            Err(PlanError::Invalid(m)) if m.starts_with("address")
        ));
        assert!(matches!(
            t.plan(&MemberRequest::Remove { id: 7 }),
            Err(PlanError::NotFound(_))
        ));
        for wildcard in ["0.0.0.0:7400", "[::]:7400"] {
            assert!(matches!(
                t.plan(&add(4, wildcard, Role::Voter)),
                Err(PlanError::Invalid(m)) if m.contains("wildcard")
            ));
        }
    }

    #[test]
    fn an_older_topology_never_replaces_a_newer_one_and_hints_can_be_cleared() {
        let d = Directory::default();
        let mut t = three();
        t.version = 5;
        d.publish(&t);
        d.publish(&three());
        assert_eq!(d.current().topology.version, 5);
        d.hint([(9, "h:9".to_string())]);
        d.clear_hints();
        assert_eq!(d.address(9), None);
    }

    #[test]
    fn applying_a_change_follows_the_conf_state_and_raises_the_version() {
        let mut t = three();
        let cc = t.plan(&add(4, "h:4", Role::Learner)).unwrap().unwrap();
        let cs = ConfState {
            voters: vec![1, 2, 3],
            learners: vec![4],
            ..Default::default()
        };
        t.apply(&cc, &cs);
        assert_eq!(t.version, 2);
        assert_eq!(t.members[&4].addr, "h:4");
        assert_eq!(t.members[&4].role, Role::Learner);
        // Promotion carries no address: the known one stays.
        let cc = t.plan(&MemberRequest::Promote { id: 4 }).unwrap().unwrap();
        let cs = ConfState {
            voters: vec![1, 2, 3, 4],
            ..Default::default()
        };
        t.apply(&cc, &cs);
        assert_eq!((t.version, t.members[&4].role), (3, Role::Voter));
        assert_eq!(t.members[&4].addr, "h:4");
        let cc = t.plan(&MemberRequest::Remove { id: 1 }).unwrap().unwrap();
        let cs = ConfState {
            voters: vec![2, 3, 4],
            ..Default::default()
        };
        t.apply(&cc, &cs);
        assert_eq!(t.members.keys().copied().collect::<Vec<_>>(), [2, 3, 4]);
        assert_eq!(t.version, 4);
    }

    #[test]
    fn the_quorum_guard_counts_live_voters_after_the_change() {
        let one = Topology::bootstrap(&[(1, "h:1".into())]);
        let live: BTreeSet<u64> = [1].into();
        // A second voter that is not running: 1 of 2 live, below the quorum of 2.
        let refused = one.check_quorum(&add(2, "h:2", Role::Voter), &live);
        assert!(
            matches!(&refused, Err(PlanError::Precondition(m)) if m.contains("--force") && m.contains("not live: 2")),
            "{refused:?}"
        );
        // As a learner, or once it answers: allowed.
        assert_eq!(
            one.check_quorum(&add(2, "h:2", Role::Learner), &live),
            Ok(())
        );
        assert_eq!(
            one.check_quorum(&add(2, "h:2", Role::Voter), &[1, 2].into()),
            Ok(())
        );
        // Three voters, all live: a fourth that is down still leaves 3 of 4 (quorum 3).
        let t = three();
        assert_eq!(
            t.check_quorum(&add(4, "h:4", Role::Voter), &[1, 2, 3].into()),
            Ok(())
        );
        // Member 3 down: removing it is fine, removing a live one is not.
        let live: BTreeSet<u64> = [1, 2].into();
        assert_eq!(
            t.check_quorum(&MemberRequest::Remove { id: 3 }, &live),
            Ok(())
        );
        assert!(matches!(
            t.check_quorum(&MemberRequest::Remove { id: 2 }, &live),
            Err(PlanError::Precondition(m)) if m.contains("removing member 2")
        ));
        // A repeat changes no voter.
        assert_eq!(
            t.check_quorum(&add(2, "h:2", Role::Voter), &[1].into()),
            Ok(())
        );
    }

    #[test]
    fn the_last_voter_cannot_be_removed() {
        let t = Topology::bootstrap(&[(1, "h:1".into())]);
        assert!(matches!(
            t.plan(&MemberRequest::Remove { id: 1 }),
            Err(PlanError::Precondition(_))
        ));
    }

    #[test]
    fn the_directory_prefers_the_topology_over_hints() {
        let d = Directory::default();
        d.hint([(4, "h:4".to_string())]);
        assert_eq!(d.address(4).as_deref(), Some("h:4"));
        let mut t = three();
        t.members.insert(
            4,
            Member {
                id: 4,
                addr: "h:44".into(),
                role: Role::Learner,
            },
        );
        d.publish(&t);
        assert_eq!(d.address(4).as_deref(), Some("h:44"));
        assert!(d.current().hints.is_empty());
        assert_eq!(d.addresses().len(), 4);
    }
}
