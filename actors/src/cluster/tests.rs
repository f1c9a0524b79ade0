//! In-process raft groups on the in-memory network: elections, replication, leader loss,
//! partitions, recovery from disk, joint consensus and snapshot catch-up.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2};

use super::disk::Disk;
use super::kv::Command;
use super::raft::*;
use super::transport::MemNetwork;
use crate::envelope::ActorRef;
use crate::runtime::{Runtime, RuntimeConfig};
use crate::supervision::{AddChild, ChildSpec, RestartChild, Strategy, Supervisor, SupervisorSpec};

const WAIT: Duration = Duration::from_secs(20);

fn quiet() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

struct Cluster {
    rt: Runtime,
    net: MemNetwork,
    members: BTreeMap<u64, ActorRef<RaftNode>>,
    _dirs: Vec<tempfile::TempDir>,
    snapshot_interval: u64,
}

impl Cluster {
    async fn start(voters: &[u64], snapshot_interval: u64) -> Self {
        let rt = Runtime::start(
            RuntimeConfig::default(),
            quiet(),
            SupervisorSpec::new(Strategy::OneForOne, Vec::new),
        );
        let mut c = Cluster {
            rt,
            net: MemNetwork::default(),
            members: BTreeMap::new(),
            _dirs: Vec::new(),
            snapshot_interval,
        };
        for id in voters {
            c.add_member(*id, voters.to_vec()).await;
        }
        c
    }

    fn root(&self) -> ActorRef<Supervisor> {
        self.rt.actor_table().supervisor("/node").unwrap()
    }

    /// Starts member `id`; `voters` empty means it joins an existing group.
    async fn add_member(&mut self, id: u64, voters: Vec<u64>) {
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = Disk::open(dir.path()).unwrap();
        self._dirs.push(dir);
        let settings = RaftSettings {
            id,
            initial_members: voters.iter().map(|v| (*v, format!("mem:{v}"))).collect(),
            // Elections after 200-400 ms of silence: short enough for quick tests, long enough
            // that a busy machine (the suite runs nodes in parallel) does not depose leaders.
            tick: Duration::from_millis(20),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_interval: self.snapshot_interval,
            read_timeout: Duration::from_secs(1),
            watch_history: 1000,
            force_new_cluster: None,
        };
        let member: ActorRef<RaftNode> = ActorRef::default();
        let net = self.net.clone();
        let spec = ChildSpec::actor_for(format!("raft-{id}"), &member, move || {
            RaftNode::new(
                settings.clone(),
                disk.clone(),
                Arc::new(net.clone()),
                super::topology::Directory::default(),
                &quiet(),
            )
            .unwrap()
        });
        self.net.register(id, member.clone());
        self.root().send(AddChild(spec)).await.unwrap().unwrap();
        self.members.insert(id, member);
    }

    async fn status(&self, id: u64) -> RaftStatus {
        self.members[&id].send(GetStatus).await.unwrap().unwrap()
    }

    /// The leader that every member of `among` agrees on (and that is one of them).
    async fn leader(&self, among: &[u64]) -> u64 {
        eventually(|| async {
            let mut leaders = Vec::new();
            for id in among {
                let s = self.members[id].send(GetStatus).await.ok()?.ok()?;
                leaders.push(s.leader?);
            }
            let l = leaders[0];
            (leaders.iter().all(|x| *x == l) && among.contains(&l)).then_some(l)
        })
        .await
    }

    async fn put(&self, id: u64, k: &str, v: &str) -> Result<i64, RaftError> {
        let cmd = Command::Put {
            key: k.into(),
            value: v.into(),
            lease: 0,
        };
        match self.members[&id]
            .send_timeout(Propose(cmd), Duration::from_secs(5))
            .await
        {
            Ok(r) => r.map(|a| a.revision),
            Err(_) => Err(RaftError::Timeout),
        }
    }

    async fn read(
        &self,
        id: u64,
        k: &str,
        linearizable: bool,
    ) -> Result<Option<String>, RaftError> {
        let q = Read {
            query: Query::Get(k.into()),
            linearizable,
        };
        let a = self.members[&id]
            .send(q)
            .await
            .map_err(|_| RaftError::Timeout)??;
        Ok(a.kvs
            .first()
            .map(|kv| String::from_utf8(kv.value.clone()).unwrap()))
    }

    /// Waits until member `id` has applied `k = v`.
    async fn sees(&self, id: u64, k: &str, v: &str) {
        eventually(|| async {
            (self.read(id, k, false).await.ok()?.as_deref() == Some(v)).then_some(())
        })
        .await
    }
}

/// Polls `f` until it answers; the bound only turns a hang into a failure.
async fn eventually<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn change(changes: &[(ConfChangeType, u64)]) -> ConfChangeV2 {
    let mut cc = ConfChangeV2::default();
    let singles: Vec<ConfChangeSingle> = changes
        .iter()
        .map(|(t, id)| {
            let mut c = ConfChangeSingle::default();
            c.set_change_type(*t);
            c.node_id = *id;
            c
        })
        .collect();
    cc.set_changes(singles.into());
    cc
}

#[actix_rt::test]
async fn three_members_elect_one_leader_and_replicate_writes_to_all() {
    let c = Cluster::start(&[1, 2, 3], 10_000).await;
    let leader = c.leader(&[1, 2, 3]).await;
    assert_eq!(c.put(leader, "k", "v1").await, Ok(1));
    assert_eq!(c.put(leader, "k", "v2").await, Ok(2));
    for id in [1, 2, 3] {
        c.sees(id, "k", "v2").await;
    }
    let follower = [1, 2, 3].into_iter().find(|i| *i != leader).unwrap();
    assert_eq!(
        c.read(follower, "k", true).await,
        Ok(Some("v2".into())),
        "a follower serves linearizable reads via ReadIndex"
    );
}

#[actix_rt::test]
async fn a_cut_off_leader_is_replaced_cannot_serve_linearizable_reads_and_catches_up_after_healing()
{
    let c = Cluster::start(&[1, 2, 3], 10_000).await;
    let old = c.leader(&[1, 2, 3]).await;
    c.put(old, "k", "before").await.unwrap();
    c.net.isolate(old);
    let rest: Vec<u64> = [1, 2, 3].into_iter().filter(|i| *i != old).collect();
    let new = c.leader(&rest).await;
    assert_ne!(new, old);
    assert!(c.put(new, "k", "after").await.is_ok());
    // The stale leader can neither commit nor prove it is still the leader.
    assert!(c.put(old, "k", "lost").await.is_err());
    assert!(c.read(old, "k", true).await.is_err());
    c.net.heal();
    c.sees(old, "k", "after").await;
    assert_eq!(c.read(old, "k", true).await, Ok(Some("after".into())));
}

#[actix_rt::test]
async fn a_minority_cannot_commit_and_healing_converges_on_the_majority() {
    let c = Cluster::start(&[1, 2, 3, 4, 5], 10_000).await;
    let leader = c.leader(&[1, 2, 3, 4, 5]).await;
    let other = [1, 2, 3, 4, 5].into_iter().find(|i| *i != leader).unwrap();
    let minority = [leader, other];
    let majority: Vec<u64> = [1, 2, 3, 4, 5]
        .into_iter()
        .filter(|i| !minority.contains(i))
        .collect();
    c.net.partition(&minority, &majority);
    assert!(c.put(leader, "k", "minority").await.is_err());
    let new = c.leader(&majority).await;
    c.put(new, "k", "majority").await.unwrap();
    c.net.heal();
    for id in [1, 2, 3, 4, 5] {
        c.sees(id, "k", "majority").await;
    }
}

#[actix_rt::test]
async fn a_restarted_member_recovers_its_log_from_disk_and_catches_up() {
    let c = Cluster::start(&[1, 2, 3], 10_000).await;
    let leader = c.leader(&[1, 2, 3]).await;
    c.put(leader, "a", "1").await.unwrap();
    // A commit index alone is not fsynced (as in etcd): the member's next append carries the
    // commit of "a" to its disk.
    c.put(leader, "a2", "x").await.unwrap();
    let victim = [1, 2, 3].into_iter().find(|i| *i != leader).unwrap();
    c.sees(victim, "a2", "x").await;
    // Cut off and restarted, the member can only get "a" back from its own disk.
    c.net.isolate(victim);
    c.put(leader, "b", "2").await.unwrap();
    let root = c.root();
    root.send(RestartChild {
        name: format!("raft-{victim}"),
    })
    .await
    .unwrap()
    .unwrap();
    c.sees(victim, "a", "1").await;
    assert_eq!(c.read(victim, "b", false).await, Ok(None));
    c.net.heal();
    c.sees(victim, "b", "2").await;
}

/// The state machine lives in the engine: a member restarted after its log was compacted starts
/// from the engine's applied index, applies nothing twice (its revision stays the leader's), and
/// catches up on what it missed.
#[actix_rt::test]
async fn a_member_restarted_after_compactions_resumes_from_its_engine_without_applying_twice() {
    let c = Cluster::start(&[1, 2, 3], 8).await;
    let leader = c.leader(&[1, 2, 3]).await;
    for i in 0..30 {
        c.put(leader, &format!("k{i:02}"), "1").await.unwrap();
    }
    let victim = [1, 2, 3].into_iter().find(|i| *i != leader).unwrap();
    c.sees(victim, "k29", "1").await;
    assert!(c.status(victim).await.snapshot_index > 1, "compacted");
    c.net.isolate(victim);
    for i in 30..40 {
        c.put(leader, &format!("k{i:02}"), "2").await.unwrap();
    }
    c.root()
        .send(RestartChild {
            name: format!("raft-{victim}"),
        })
        .await
        .unwrap()
        .unwrap();
    c.sees(victim, "k29", "1").await;
    assert_eq!(c.read(victim, "k30", false).await, Ok(None));
    c.net.heal();
    c.sees(victim, "k39", "2").await;
    let revision = c.put(leader, "last", "x").await.unwrap();
    eventually(|| async { (c.status(victim).await.revision == revision).then_some(()) }).await;
}

#[actix_rt::test]
async fn joint_consensus_replaces_a_voter_and_leaves_the_joint_configuration() {
    let mut c = Cluster::start(&[1, 2, 3], 10_000).await;
    let leader = c.leader(&[1, 2, 3]).await;
    c.put(leader, "k", "v").await.unwrap();
    c.add_member(4, vec![]).await;
    let cs = c.members[&leader]
        .send(ChangeMembership(change(&[(
            ConfChangeType::AddLearnerNode,
            4,
        )])))
        .await
        .unwrap()
        .unwrap();
    assert!(cs.learners.contains(&4));
    c.sees(4, "k", "v").await;
    // Promote 4 and remove a follower in one joint change.
    let gone = [1, 2, 3].into_iter().find(|i| *i != leader).unwrap();
    let cc = change(&[
        (ConfChangeType::AddNode, 4),
        (ConfChangeType::RemoveNode, gone),
    ]);
    c.members[&leader]
        .send(ChangeMembership(cc))
        .await
        .unwrap()
        .unwrap();
    // raft leaves the joint configuration by itself through an empty EntryConfChangeV2.
    let final_voters = eventually(|| async {
        let s = c.status(leader).await;
        s.voters_outgoing.is_empty().then_some(s.voters)
    })
    .await;
    let mut expected: Vec<u64> = [1, 2, 3, 4].into_iter().filter(|i| *i != gone).collect();
    expected.sort();
    let mut got = final_voters;
    got.sort();
    assert_eq!(got, expected);
    c.put(leader, "k", "after").await.unwrap();
    c.sees(4, "k", "after").await;
}

#[actix_rt::test]
async fn a_new_member_catches_up_from_a_snapshot() {
    let mut c = Cluster::start(&[1, 2, 3], 16).await;
    let leader = c.leader(&[1, 2, 3]).await;
    for i in 0..40 {
        c.put(leader, &format!("key{i:02}"), &format!("v{i}"))
            .await
            .unwrap();
    }
    assert!(
        c.status(leader).await.snapshot_index > 1,
        "the leader compacted its log"
    );
    c.add_member(4, vec![]).await;
    c.members[&leader]
        .send(ChangeMembership(change(&[(
            ConfChangeType::AddLearnerNode,
            4,
        )])))
        .await
        .unwrap()
        .unwrap();
    for i in [0, 17, 39] {
        c.sees(4, &format!("key{i:02}"), &format!("v{i}")).await;
    }
    let s = c.status(4).await;
    assert!(
        s.snapshot_index > 1,
        "member 4 was brought up by a snapshot: {s:?}"
    );
}

#[actix_rt::test]
async fn a_second_membership_change_while_one_is_pending_is_refused_at_once() {
    let mut c = Cluster::start(&[1, 2, 3], 10_000).await;
    let leader = c.leader(&[1, 2, 3]).await;
    c.add_member(4, vec![]).await;
    c.add_member(5, vec![]).await;
    let first = c.members[&leader].send(ChangeMembership(change(&[(
        ConfChangeType::AddLearnerNode,
        4,
    )])));
    let second = c.members[&leader].send(ChangeMembership(change(&[(
        ConfChangeType::AddLearnerNode,
        5,
    )])));
    let (first, second) = tokio::join!(first, second);
    assert!(first.unwrap().is_ok());
    assert!(matches!(second.unwrap(), Err(RaftError::Rejected(_))));
    // Once the first is applied, the next one goes through.
    let cs = c.members[&leader]
        .send(ChangeMembership(change(&[(
            ConfChangeType::AddLearnerNode,
            5,
        )])))
        .await
        .unwrap()
        .unwrap();
    assert!(cs.learners.contains(&4) && cs.learners.contains(&5));
}

#[actix_rt::test]
async fn a_new_leader_extends_leases_and_then_expires_them_everywhere() {
    let c = Cluster::start(&[1, 2, 3], 10_000).await;
    let old = c.leader(&[1, 2, 3]).await;
    let propose = |id: u64, cmd: Command| c.members[&id].send(Propose(cmd));
    let grant = propose(old, Command::LeaseGrant { id: 0, ttl_secs: 3 })
        .await
        .unwrap()
        .unwrap();
    let put = Command::Put {
        key: "session".into(),
        value: "x".into(),
        lease: grant.lease,
    };
    propose(old, put).await.unwrap().unwrap();
    // Followers know nothing of deadlines: keep-alives go to the leader.
    let follower = [1, 2, 3].into_iter().find(|i| *i != old).unwrap();
    let keep = c.members[&follower]
        .send(Read {
            query: Query::KeepAlive(grant.lease),
            linearizable: true,
        })
        .await
        .unwrap();
    assert!(matches!(keep, Err(RaftError::NotLeader { .. })), "{keep:?}");

    // Cut the leader off; the majority elects another, which gives the lease a full TTL from its
    // election rather than expiring it on the old leader's clock.
    c.net.isolate(old);
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|i| *i != old).collect();
    let new = eventually(|| async {
        let l = c.leader(&others).await;
        (l != old).then_some(l)
    })
    .await;
    let ttl = c.members[&new]
        .send(Read {
            query: Query::TimeToLive(grant.lease),
            linearizable: true,
        })
        .await
        .unwrap()
        .expect("the new leader knows the lease")
        .lease
        .unwrap();
    assert!(ttl.remaining > Duration::from_millis(1500), "{ttl:?}");
    assert_eq!(ttl.keys, [b"session".to_vec()]);

    // Then it expires it, on every member, the isolated one included once healed.
    c.net.heal();
    for id in [1, 2, 3] {
        eventually(|| async {
            c.read(id, "session", false)
                .await
                .ok()?
                .is_none()
                .then_some(())
        })
        .await;
    }
}

#[actix_rt::test]
async fn member_requests_follow_the_topology_and_raise_its_version_only_on_change() {
    use super::topology::{MemberRequest, Role};
    let mut c = Cluster::start(&[1, 2, 3], 10_000).await;
    let leader = c.leader(&[1, 2, 3]).await;
    let leader_ref = c.members[&leader].clone();
    let ask = |req: MemberRequest| leader_ref.send(ChangeMember::guarded(req));
    let conflict = ask(MemberRequest::Add {
        id: 2,
        addr: "mem:99".into(),
        role: Role::Voter,
    })
    .await
    .unwrap();
    assert!(
        matches!(conflict, Err(RaftError::Conflict(_))),
        "{conflict:?}"
    );

    c.add_member(4, vec![]).await;
    let t = ask(MemberRequest::Add {
        id: 4,
        addr: "mem:4".into(),
        role: Role::Learner,
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!((t.version, t.members[&4].role), (2, Role::Learner));
    // Asked again: nothing to do, same version.
    let again = ask(MemberRequest::Add {
        id: 4,
        addr: "mem:4".into(),
        role: Role::Learner,
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(again.version, 2);
    c.put(leader, "k", "v").await.unwrap();
    c.sees(4, "k", "v").await;
    let t = ask(MemberRequest::Promote { id: 4 })
        .await
        .unwrap()
        .unwrap();
    assert_eq!((t.version, t.members[&4].role), (3, Role::Voter));
    // Answered once the leader applied it; member 4 applies it a moment later.
    eventually(|| async { c.status(4).await.voters.contains(&4).then_some(()) }).await;
}

#[actix_rt::test]
async fn a_follower_forwards_a_write_through_raft_and_answers_once_it_applied_it() {
    let c = Cluster::start(&[1, 2, 3], 10_000).await;
    let leader = c.leader(&[1, 2, 3]).await;
    let follower = [1, 2, 3].into_iter().find(|i| *i != leader).unwrap();
    assert_eq!(c.put(follower, "k", "via-follower").await, Ok(1));
    // Answered after applying: the follower's own state has it already.
    assert_eq!(
        c.read(follower, "k", false).await,
        Ok(Some("via-follower".into()))
    );
    c.sees(leader, "k", "via-follower").await;
    // A leader that is gone (its actor stopped): the proposal cannot even be queued for it, so
    // it surely did not apply, and the caller is told so (retryable), not "outcome unknown".
    c.root()
        .send(crate::supervision::StopChild {
            name: format!("raft-{leader}"),
        })
        .await
        .unwrap()
        .unwrap();
    let r = c.put(follower, "k", "to-a-dead-leader").await;
    assert!(matches!(r, Err(RaftError::NotLeader { .. })), "{r:?}");
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|i| *i != leader).collect();
    let new = c.leader(&others).await;
    let follower = others.into_iter().find(|i| *i != new).unwrap();
    // A member cut off from every other has no leader to forward to, once it noticed.
    c.net.isolate(follower);
    let refused = eventually(|| async {
        match c.put(follower, "k", "lost").await {
            Err(e @ RaftError::NotLeader { leader: None }) => Some(e),
            _ => None,
        }
    })
    .await;
    assert_eq!(refused, RaftError::NotLeader { leader: None });
}

#[actix_rt::test]
async fn a_store_whose_lease_ids_ran_out_still_grants_leases_and_expires_them() {
    let c = Cluster::start(&[1, 2, 3], 10_000).await;
    let leader = c.leader(&[1, 2, 3]).await;
    let follower = [1, 2, 3].into_iter().find(|i| *i != leader).unwrap();
    let propose = |id: u64, cmd: Command| c.members[&id].send(Propose(cmd));
    // As an entry written before client ids were bounded: the very top id.
    let top = propose(
        leader,
        Command::LeaseGrant {
            id: i64::MAX,
            ttl_secs: 600,
        },
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!((top.error, top.lease), (None, i64::MAX));
    // A linearizable read through the follower returns once it applied the top grant: the
    // follower decides the form of its grant from its own state.
    c.read(follower, "any", true).await.unwrap();
    // Grants of id 0 through either member get the lowest free ids, the same on every member.
    let first = propose(follower, Command::LeaseGrant { id: 0, ttl_secs: 1 })
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first.error, first.lease), (None, 1));
    let second = propose(
        leader,
        Command::LeaseGrant {
            id: 0,
            ttl_secs: 600,
        },
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!((second.error, second.lease), (None, 2));
    let put = Command::Put {
        key: "short".into(),
        value: "x".into(),
        lease: first.lease,
    };
    let put = propose(leader, put).await.unwrap().unwrap();
    assert_eq!(put.error, None, "the lease exists");
    // The leader keeps the deadline of a lease granted that way: it expires, everywhere.
    eventually(|| async {
        let ttl = c.members[&leader]
            .send(Read {
                query: Query::TimeToLive(first.lease),
                linearizable: true,
            })
            .await
            .ok()?;
        matches!(ttl, Err(RaftError::NotFound(_))).then_some(())
    })
    .await;
    for id in [1, 2, 3] {
        eventually(|| async {
            c.read(id, "short", false)
                .await
                .ok()?
                .is_none()
                .then_some(())
        })
        .await;
    }
}

/// The store client's link in memory: the leader's own client, called as the peer port would.
#[derive(Default)]
struct MemoryLink {
    clients: std::sync::Mutex<BTreeMap<u64, super::client::Client>>,
}

impl MemoryLink {
    fn client_of(&self, id: u64) -> Result<super::client::Client, super::client::ClientError> {
        self.clients
            .lock()
            .unwrap()
            .get(&id)
            .cloned()
            .ok_or_else(|| {
                super::client::ClientError::Link(super::client::LinkError::NotSent(format!(
                    "member {id} is not reachable"
                )))
            })
    }
}

impl super::client::LeaderLink for MemoryLink {
    fn propose(
        &self,
        leader: u64,
        group: super::client::GroupId,
        cmd: Command,
        budget: Duration,
    ) -> super::client::LinkFuture<super::kv::ApplyResult> {
        let client = self.client_of(leader);
        Box::pin(async move {
            client?
                .propose(group, cmd, budget, super::client::Route::Here)
                .await
        })
    }

    fn read(
        &self,
        leader: u64,
        group: super::client::GroupId,
        query: Query,
        budget: Duration,
    ) -> super::client::LinkFuture<ReadAnswer> {
        let client = self.client_of(leader);
        Box::pin(async move {
            client?
                .read(group, query, true, budget, super::client::Route::Here)
                .await
        })
    }
}

#[actix_rt::test]
async fn a_followers_store_client_reaches_the_leader_for_what_only_the_leader_serves() {
    use super::client::{Client, ClientError, GroupId, Route, KV_GROUP};
    use super::store::Store;
    let c = Cluster::start(&[1, 2, 3], 10_000).await;
    let leader = c.leader(&[1, 2, 3]).await;
    let follower = [1, 2, 3].into_iter().find(|i| *i != leader).unwrap();
    let link = Arc::new(MemoryLink::default());
    for (id, member) in &c.members {
        let client = Client::new(*id, member.clone(), link.clone(), Duration::from_secs(5));
        link.clients.lock().unwrap().insert(*id, client);
    }
    let client = link.client_of(follower).unwrap();

    // A write through a follower: raft forwards the proposal, the follower answers once applied.
    let lease = client.grant(30).await.unwrap();
    let put = super::kv::Op::Put {
        key: b"/app/k".to_vec(),
        value: b"v".to_vec(),
        lease,
    };
    assert!(
        client
            .txn(vec![], vec![put], vec![])
            .await
            .unwrap()
            .succeeded
    );

    // Lease renewals and lookups are the leader's: the follower's client sends them there.
    let renewed = client.keep_alive(KV_GROUP, lease, WAIT).await.unwrap();
    assert_eq!(renewed.member, leader);
    let ttl = client
        .read(
            KV_GROUP,
            Query::TimeToLive(lease),
            true,
            WAIT,
            Route::Leader,
        )
        .await
        .unwrap();
    assert_eq!(ttl.member, leader);
    assert_eq!(ttl.value.lease.unwrap().keys, vec![b"/app/k".to_vec()]);

    // A call sent here by another member is never sent on.
    let here = client
        .read(KV_GROUP, Query::TimeToLive(lease), true, WAIT, Route::Here)
        .await;
    assert_eq!(
        here,
        Err(ClientError::Raft {
            error: RaftError::NotLeader {
                leader: Some(leader)
            },
            member: follower,
        })
    );

    // The same client as the services' `Store`: a listing, then a watch from after it.
    let listed = client.range(b"/app/".to_vec()).await.unwrap();
    assert_eq!(listed.kvs.len(), 1);
    let mut changes = Store::watch(&client, b"/app/".to_vec(), listed.revision + 1)
        .await
        .unwrap();
    assert_eq!(
        client.revoke(lease).await.map(|r| r > listed.revision),
        Ok(true)
    );
    match changes.recv().await.unwrap() {
        super::watch::WatchUpdate::Events { events, .. } => assert!(events[0].deleted),
        u => panic!("{u:?}"),
    }

    // A group this member does not run is named.
    let none = client
        .read(
            GroupId(9),
            Query::Get(b"k".to_vec()),
            false,
            WAIT,
            Route::Leader,
        )
        .await;
    assert_eq!(
        none.unwrap_err().to_string(),
        format!("group 9: no such raft group on member {follower}")
    );
}
