//! The raft actor: owns the raft-rs `RawNode`, the log mirror and the state machine.
//!
//! The loop follows raft-rs's asynchronous-persistence contract: for each `Ready` it sends the
//! plain messages at once, applies committed entries (raft only hands out entries that are both
//! committed and locally persisted), appends new entries and hard state to the log mirror, queues
//! the same to the storage thread, and calls `advance_append_async`. When the storage thread says a
//! ready is durable, the actor sends that ready's persisted messages (votes, append answers) and
//! calls `on_persist_ready`. Every Ready is finished, whatever the role (see the PreCandidate trap
//! in the runtime notes), and the loop runs after every step, proposal, read and tick.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, AsyncContext, Context, Handler, Message, ResponseFuture};
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeV2, ConfState, Entry, EntryType, HardState, Message as RaftMessage,
    MessageType, Snapshot,
};
use raft::{RawNode, SnapshotStatus, StateRole, Storage};
use serde::{Deserialize, Serialize};
use slog::{error, info, warn, Logger};
use tokio::sync::{mpsc, oneshot};

use super::disk::{Disk, DiskError, WriteBatch};
use super::force::ForceNewCluster;
use super::kv::{ApplyResult, Command, KeyValue, KvState};
use super::lease::LeaseClock;
use super::log::LogStore;
use super::topology::{Directory, MemberRequest, PlanError, RaftFigures, Topology};
use super::transport::{Delivery, Transport};
use super::watch::{WatchError, WatchHub, WatchSpec, WatchUpdate};
use crate::supervision::Managed;

/// How a raft member runs.
#[derive(Clone, Debug)]
pub struct RaftSettings {
    /// This member's id (1..).
    pub id: u64,
    /// Voters (id and gRPC address) to bootstrap a brand-new log with; empty for a node that
    /// joins an existing cluster (it waits for the leader's snapshot).
    pub initial_members: Vec<(u64, String)>,
    /// One raft tick.
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Take a snapshot (and compact the log) every this many applied entries.
    pub snapshot_interval: u64,
    /// Reads waiting for a ReadIndex answer fail after this long (raft-rs drops read requests
    /// silently when there is no leader).
    pub read_timeout: Duration,
    /// Revisions of key changes kept in memory for watches that start in the past.
    pub watch_history: usize,
    /// `--force-new-cluster`: make this member the only one before raft reads the log.
    pub force_new_cluster: Option<ForceNewCluster>,
}

impl Default for RaftSettings {
    fn default() -> Self {
        Self {
            id: 1,
            initial_members: vec![(1, String::new())],
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 3,
            snapshot_interval: 10_000,
            read_timeout: Duration::from_secs(5),
            watch_history: 10_000,
            force_new_cluster: None,
        }
    }
}

/// Why a request to the raft member failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftError {
    /// This member is not the leader, and did nothing with the request; `leader` is the one it
    /// knows of, if any. Safe to send the request to the leader.
    NotLeader { leader: Option<u64> },
    /// Leadership changed while the write was in the log: it may still commit, or not. Not safe
    /// to resend blindly (a resent compare-and-swap could apply twice).
    Unknown { leader: Option<u64> },
    /// raft refused the proposal (e.g. a configuration change already pending).
    Rejected(String),
    /// No answer in time (no leader reachable for a linearizable read).
    Timeout,
    /// The request is malformed.
    Invalid(String),
    /// An id or address is taken.
    Conflict(String),
    /// No such member, lease or key.
    NotFound(String),
    /// Not possible in the group's current state.
    Precondition(String),
    /// Cannot be done right now (another membership change, a leadership transfer); retry.
    Busy(String),
    /// A watch asked for history that is no longer kept.
    Compacted(String),
}

impl std::fmt::Display for RaftError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotLeader { leader: Some(l) } => {
                write!(f, "not the leader; the leader is member {l}")
            }
            Self::NotLeader { leader: None } => write!(f, "not the leader, and no leader is known"),
            Self::Unknown { .. } => f.write_str(
                "leadership changed while the write was in flight; its outcome is unknown",
            ),
            Self::Rejected(m)
            | Self::Invalid(m)
            | Self::Conflict(m)
            | Self::NotFound(m)
            | Self::Precondition(m)
            | Self::Busy(m)
            | Self::Compacted(m) => f.write_str(m),
            Self::Timeout => f.write_str("no answer in time"),
        }
    }
}

/// How often a member without a leader says so.
const LEADERLESS_WARNING: Duration = Duration::from_secs(10);

/// Tags a proposal or read so that its answer finds its caller. `epoch` is drawn at random per
/// actor instance: a restarted member replays entries proposed by its previous instance, whose
/// ids must not answer the new instance's callers.
#[derive(Serialize, Deserialize)]
struct Tag {
    node: u64,
    epoch: u64,
    id: u64,
}

/// Raft messages from another member.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Step(pub Vec<RaftMessage>);

/// A write through the log; answered once applied here.
#[derive(Message)]
#[rtype(result = "Result<ApplyResult, RaftError>")]
pub struct Propose(pub Command);

/// What a read asks.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Query {
    Get(Vec<u8>),
    /// One page of the keys with a prefix (see [`KvState::page`]): those after `after` if set,
    /// at most `limit` of them (0 = all), within `max_bytes` of answer (0 = no budget).
    Range {
        prefix: Vec<u8>,
        after: Option<Vec<u8>>,
        limit: usize,
        max_bytes: usize,
    },
    /// Renews a lease (leader only, once its leadership is confirmed).
    KeepAlive(i64),
    /// A lease's time left and keys (leader only).
    TimeToLive(i64),
}

/// A lease as the leader sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub id: i64,
    /// The TTL it was granted with.
    pub ttl_secs: i64,
    /// Time left before the leader expires it.
    pub remaining: Duration,
    pub keys: Vec<Vec<u8>>,
}

/// A read's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadAnswer {
    pub kvs: Vec<KeyValue>,
    /// Keys matching, whether in `kvs` or not.
    pub count: usize,
    /// Matching keys were left out of `kvs` (a range cut by its limit or byte budget).
    pub more: bool,
    /// Revision the answer reflects.
    pub revision: i64,
    /// For lease queries.
    pub lease: Option<LeaseInfo>,
}

/// A read: linearizable (ReadIndex through the leader) or serializable (this member's state).
#[derive(Message)]
#[rtype(result = "Result<ReadAnswer, RaftError>")]
pub struct Read {
    pub query: Query,
    pub linearizable: bool,
}

/// A membership change (joint consensus when it has several changes); answered once applied.
#[derive(Message)]
#[rtype(result = "Result<ConfState, RaftError>")]
pub struct ChangeMembership(pub ConfChangeV2);

/// Adds, removes or promotes a member, checked against the topology and, unless forced, against
/// the quorum guard ([`Topology::check_quorum`]); answers the topology once the change is applied
/// (at once if it already is as asked).
#[derive(Message)]
#[rtype(result = "Result<Topology, RaftError>")]
pub struct ChangeMember {
    pub request: MemberRequest,
    /// Skip the quorum guard.
    pub force: bool,
    /// A member the request adds answered at its address (a probe made by the caller): it counts
    /// as live for the guard. Members already in the group count when the leader heard from them
    /// within an election timeout.
    pub answers: bool,
}

impl ChangeMember {
    /// `request`, guarded, with no probe of a new member.
    pub fn guarded(request: MemberRequest) -> Self {
        Self {
            request,
            force: false,
            answers: false,
        }
    }
}

/// Starts a watch; its updates arrive on `tx`. Answers the watch id and the revision it starts
/// after.
#[derive(Message)]
#[rtype(result = "Result<(u64, i64), RaftError>")]
pub struct Watch {
    pub spec: WatchSpec,
    pub tx: mpsc::Sender<WatchUpdate>,
}

/// Ends a watch.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CancelWatch(pub u64);

/// This member's view of the group.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct RaftStatus {
    pub id: u64,
    pub role: String,
    pub term: u64,
    pub leader: Option<u64>,
    pub commit: u64,
    pub applied: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Voters of the outgoing configuration while a joint change is in progress.
    pub voters_outgoing: Vec<u64>,
    pub revision: i64,
    pub snapshot_index: u64,
}

/// From the transport: a snapshot sent to `to` arrived (`ok`) or failed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SnapshotSent {
    pub to: u64,
    pub ok: bool,
}

/// Asks for [`RaftStatus`].
#[derive(Message)]
#[rtype(result = "Result<RaftStatus, RaftError>")]
pub struct GetStatus;

/// The storage thread finished a ready's batch.
#[derive(Message)]
#[rtype(result = "()")]
struct Persisted {
    result: Result<u64, DiskError>,
    messages: Vec<RaftMessage>,
}

crate::handles!(RaftNode: Step, Propose, Read, ChangeMembership, ChangeMember, Watch, CancelWatch, GetStatus, SnapshotSent);

/// What a membership change's waiter gets once it is applied.
type ConfOutcome = Result<(ConfState, Topology), RaftError>;
type ConfReply = oneshot::Sender<ConfOutcome>;

struct PendingRead {
    query: Query,
    reply: oneshot::Sender<Result<ReadAnswer, RaftError>>,
    /// The commit index to wait for, once the ReadIndex answer came.
    index: Option<u64>,
    since: Instant,
}

/// One ReadIndex request answering every read that arrived before it was issued (as etcd does):
/// a single heartbeat round confirms leadership for all of them.
struct ReadBatch {
    /// The tag the request carries; asked again with the same tag while unanswered, since raft-rs
    /// drops read requests silently while there is no leader or the new leader has not committed
    /// in its term yet.
    tag: Vec<u8>,
    id: u64,
    asked: Instant,
    reads: Vec<u64>,
}

/// The raft member actor.
pub struct RaftNode {
    settings: RaftSettings,
    node: RawNode<LogStore>,
    store: LogStore,
    disk: Disk,
    transport: Arc<dyn Transport>,
    kv: KvState,
    applied: u64,
    epoch: u64,
    next_tag: u64,
    /// Waiters of this member's proposals, with when they were proposed.
    proposals: HashMap<u64, (Instant, oneshot::Sender<Result<ApplyResult, RaftError>>)>,
    /// Pending membership changes by tag, with the log index raft gave them: raft turns a change
    /// it refuses into an empty entry at that index, which must fail the waiter.
    conf_changes: HashMap<u64, (u64, ConfReply)>,
    reads: HashMap<u64, PendingRead>,
    /// Reads that arrived after the ReadIndex request in flight was issued: they wait for the next.
    unbatched: Vec<u64>,
    read_batch: Option<ReadBatch>,
    /// Ready batches handed to the storage thread and not yet reported durable.
    writes_in_flight: u64,
    /// Reports for raft that must wait until the current Ready is advanced.
    reports: Vec<(u64, Delivery, bool)>,
    last_tick: Instant,
    /// The replicated membership, applied along with the KV store.
    topology: Topology,
    /// The hard state last handed to the storage thread.
    last_hard_state: HardState,
    /// The log index at start: once applied, the topology knows every member (hints go).
    replayed_at: Option<u64>,
    /// When a raft message last arrived from each peer: who is live, for the quorum guard and
    /// the no-leader warning.
    last_heard: HashMap<u64, Instant>,
    /// Since when no leader is known, and when that was last logged.
    leaderless: Option<(Instant, Instant)>,
    directory: Directory,
    leases: LeaseClock,
    watches: WatchHub,
    log: Logger,
}

/// The state machine as a snapshot holds it.
#[derive(Serialize)]
struct StateRef<'a> {
    kv: &'a KvState,
    topology: &'a Topology,
}

#[derive(Deserialize)]
struct State {
    kv: KvState,
    topology: Topology,
}

fn encode_state(kv: &KvState, topology: &Topology) -> Vec<u8> {
    postcard::to_stdvec(&StateRef { kv, topology }).expect("the state serialises")
}

/// Restores the state machine from snapshot bytes (empty bytes: the empty state).
fn decode_state(b: &[u8]) -> Result<(KvState, Topology), String> {
    if b.is_empty() {
        return Ok(Default::default());
    }
    postcard::from_bytes::<State>(b)
        .map(|s| (s.kv, s.topology))
        .map_err(|e| format!("corrupt state snapshot: {e}"))
}

impl RaftNode {
    /// Builds a member from what `disk` holds (bootstrapping a brand-new log with the initial
    /// voters). Reads the log synchronously: called by the supervisor when it (re)starts the actor.
    /// The applied topology is published to `directory`.
    pub fn new(
        settings: RaftSettings,
        disk: Disk,
        transport: Arc<dyn Transport>,
        directory: Directory,
        log: &Logger,
    ) -> Result<Self, String> {
        let recovered = disk.load().map_err(|e| e.to_string())?;
        let store = LogStore::from_recovered(recovered);
        // raft-rs tags its own records with raft_id; ours get the same key.
        let log = log.new(slog::o!());
        if !store.is_initialized() && !settings.initial_members.is_empty() {
            bootstrap(&store, &disk, &settings.initial_members);
        }
        let (kv, topology) = restore(&store, &disk, &log)?;
        if let Some(force) = &settings.force_new_cluster {
            super::force::apply(force, settings.id, &store, &disk, &log)?;
        }
        store.release_snapshot_data();
        directory.publish(&topology);
        // Members added in entries after the snapshot are in the topology only once those are
        // applied again, which may need them: their addresses are known from the log already.
        directory.hint(store.conf_change_addresses());
        let applied_from = store.snapshot_index();
        let watch_history = settings.watch_history;
        let replayed_at = store.last_index().unwrap_or(0);
        let last_hard_state = store
            .initial_state()
            .map(|s| s.hard_state)
            .unwrap_or_default();
        let cfg = raft::Config {
            id: settings.id,
            election_tick: settings.election_ticks,
            heartbeat_tick: settings.heartbeat_ticks,
            applied: applied_from,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        cfg.validate()
            .map_err(|e| format!("raft configuration: {e}"))?;
        let node = RawNode::new(&cfg, store.clone(), &log).map_err(|e| format!("raft: {e}"))?;
        info!(log, "raft member starting"; "raft_id" => settings.id, "applied" => applied_from, "voters" => ?store.conf_state().voters);
        Ok(Self {
            settings,
            node,
            store,
            disk,
            transport,
            applied: applied_from,
            epoch: fastrand::u64(..),
            next_tag: 0,
            proposals: HashMap::new(),
            conf_changes: HashMap::new(),
            reads: HashMap::new(),
            unbatched: Vec::new(),
            read_batch: None,
            writes_in_flight: 0,
            reports: Vec::new(),
            last_tick: Instant::now(),
            watches: WatchHub::new(kv.revision(), watch_history),
            leases: LeaseClock::default(),
            replayed_at: Some(replayed_at),
            last_heard: HashMap::new(),
            leaderless: None,
            last_hard_state,
            topology,
            directory,
            log,
            kv,
        })
    }

    fn tag(&mut self) -> (u64, Vec<u8>) {
        self.next_tag += 1;
        let tag = Tag {
            node: self.settings.id,
            epoch: self.epoch,
            id: self.next_tag,
        };
        let bytes = postcard::to_stdvec(&tag).expect("tag encodes");
        (self.next_tag, bytes)
    }

    fn own_tag(&self, ctx: &[u8]) -> Option<u64> {
        let t: Tag = postcard::from_bytes(ctx).ok()?;
        (t.node == self.settings.id && t.epoch == self.epoch).then_some(t.id)
    }

    fn leader(&self) -> Option<u64> {
        let l = self.node.raft.leader_id;
        (l != raft::INVALID_ID).then_some(l)
    }

    fn not_leader(&self) -> RaftError {
        RaftError::NotLeader {
            leader: self.leader(),
        }
    }

    fn status(&self) -> RaftStatus {
        let cs = self.store.conf_state();
        RaftStatus {
            id: self.settings.id,
            role: format!("{:?}", self.node.raft.state).to_lowercase(),
            term: self.node.raft.term,
            leader: self.leader(),
            commit: self.node.raft.raft_log.committed,
            applied: self.applied,
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
            voters_outgoing: cs.voters_outgoing.clone(),
            revision: self.kv.revision(),
            snapshot_index: self.store.snapshot_index(),
        }
    }

    /// Runs every pending Ready through to persistence.
    fn drive(&mut self, ctx: &mut Context<Self>) {
        while self.node.has_ready() {
            let mut rd = self.node.ready();
            if let Some(ss) = rd.ss() {
                let leader = (ss.leader_id != raft::INVALID_ID).then_some(ss.leader_id);
                self.directory.set_leader(leader);
                if ss.raft_state == StateRole::Leader {
                    self.leases.lead(&self.kv, Instant::now());
                } else {
                    self.lost_leadership();
                }
            }
            let msgs = rd.take_messages();
            self.send(msgs);
            let mut batch = WriteBatch {
                number: rd.number(),
                ..Default::default()
            };
            if !rd.snapshot().is_empty() {
                let mut snap = rd.snapshot().clone();
                match decode_state(&snap.data) {
                    Ok((kv, topology)) => {
                        self.kv.replace_with(kv);
                        self.topology = topology;
                        self.directory.publish(&self.topology);
                        self.watches.reset(self.kv.revision());
                    }
                    Err(e) => panic!("leader sent a snapshot that does not decode: {e}"),
                }
                let meta = snap.get_metadata();
                let index = meta.index;
                self.applied = index;
                record_applied(&mut self.kv, index, meta.term);
                record_membership(&mut self.kv, &self.topology, meta.get_conf_state());
                commit_state(&mut self.kv);
                // The engine holds the state now (the storage thread makes it durable before it
                // writes this batch): the log's snapshot needs only its metadata.
                snap.data = Default::default();
                self.store.apply_snapshot(snap.clone());
                batch.conf_state = Some(snap.get_metadata().get_conf_state().clone());
                batch.compact_below = Some(index + 1);
                // raft installs a leader's snapshot when our log conflicts with it: every stored
                // entry goes, not only those up to its index.
                batch.clear_entries = true;
                batch.snapshot = Some(snap);
                info!(self.log, "installed snapshot"; "index" => index);
            }
            let committed = rd.take_committed_entries();
            if let Some(last) = committed.last() {
                let (index, term) = (last.index, last.term);
                self.apply(committed, &mut batch);
                record_applied(&mut self.kv, index, term);
                commit_state(&mut self.kv);
            }
            if !rd.entries().is_empty() {
                self.store.append(rd.entries());
                batch.entries = rd.take_entries();
            }
            if let Some(hs) = rd.hs() {
                self.store.set_hard_state(hs.clone());
                batch.hard_state = Some(hs.clone());
            }
            batch.lazy = self.commit_only(&batch);
            if let Some(hs) = &batch.hard_state {
                self.last_hard_state = hs.clone();
            }
            for rs in rd.take_read_states() {
                let answered = self.own_tag(&rs.request_ctx);
                if answered.is_some() && answered == self.read_batch.as_ref().map(|b| b.id) {
                    let batch = self.read_batch.take().expect("checked");
                    for id in batch.reads {
                        if let Some(r) = self.reads.get_mut(&id) {
                            r.index = Some(rs.index);
                        }
                    }
                }
            }
            let persisted = rd.take_persisted_messages();
            let number = rd.number();
            self.node.advance_append_async(rd);
            self.advance_apply();
            if (batch.is_empty() || batch.lazy) && self.writes_in_flight == 0 {
                // Nothing to make durable and nothing being written: the ready is as durable as
                // it needs to be. Skipping the wait spares followers' heartbeat and ReadIndex
                // answers, and the leader's next append, a thread round trip and an fsync each.
                if batch.lazy {
                    // Kept by the storage thread for its next fsync; it answers nothing.
                    self.disk.write(batch, Box::new(|_| {}));
                }
                self.send(persisted);
                self.node.on_persist_ready(number);
                self.advance_apply();
            } else {
                self.write(batch, persisted, ctx);
            }
            self.flush_reports();
        }
        self.maybe_snapshot(ctx);
        if self.read_batch.is_none() && !self.unbatched.is_empty() {
            self.issue_read_batch();
            // A lone voter answers a ReadIndex at once, in the next Ready.
            return self.drive(ctx);
        }
        self.serve_reads();
    }

    /// Sends one ReadIndex request for every read waiting for one, unless one is in flight.
    fn issue_read_batch(&mut self) {
        if self.read_batch.is_some() || self.unbatched.is_empty() {
            return;
        }
        let (id, tag) = self.tag();
        self.node.read_index(tag.clone());
        self.read_batch = Some(ReadBatch {
            tag,
            id,
            asked: Instant::now(),
            reads: std::mem::take(&mut self.unbatched),
        });
    }

    /// Hands a batch to the storage thread; `then_send` goes out once it is durable.
    fn write(&mut self, batch: WriteBatch, then_send: Vec<RaftMessage>, ctx: &mut Context<Self>) {
        self.writes_in_flight += 1;
        let addr = ctx.address();
        self.disk.write(
            batch,
            Box::new(move |result| {
                addr.do_send(Persisted {
                    result,
                    messages: then_send,
                })
            }),
        );
    }

    /// Tells raft what is applied, as far as it allows: a snapshot installed from the leader is
    /// applied here at once but counts for raft only once it is persisted.
    fn advance_apply(&mut self) {
        let log = &self.node.raft.raft_log;
        let to = self.applied.min(log.persisted).min(log.committed);
        if to > log.applied {
            self.node.advance_apply_to(to);
        }
    }

    fn send(&mut self, msgs: Vec<RaftMessage>) {
        if msgs.is_empty() {
            return;
        }
        let snapshots: Vec<u64> = msgs
            .iter()
            .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
            .map(|m| m.to)
            .collect();
        // This member's proposals forwarded to the leader, by destination: if the transport
        // could not even queue them, they surely never applied, and the caller may retry.
        let forwarded: Vec<(u64, Vec<u64>)> = msgs
            .iter()
            .filter(|m| m.get_msg_type() == MessageType::MsgPropose)
            .map(|m| {
                let ids = m.entries.iter().filter_map(|e| self.own_tag(&e.context));
                (m.to, ids.collect())
            })
            .collect();
        for (to, delivery) in self.transport.send(msgs) {
            if delivery == Delivery::Unreachable {
                for (_, ids) in forwarded.iter().filter(|(t, _)| *t == to) {
                    for id in ids {
                        if let Some((_, tx)) = self.proposals.remove(id) {
                            let _ = tx.send(Err(RaftError::NotLeader { leader: Some(to) }));
                        }
                    }
                }
            }
            self.reports.push((to, delivery, snapshots.contains(&to)));
        }
    }

    /// Tells raft about unreachable peers and snapshot sends; only allowed outside a Ready.
    fn flush_reports(&mut self) {
        for (to, delivery, snapshot) in std::mem::take(&mut self.reports) {
            if delivery == Delivery::Unreachable {
                self.node.report_unreachable(to);
            }
            if snapshot {
                match delivery {
                    Delivery::Delivered => self.node.report_snapshot(to, SnapshotStatus::Finish),
                    Delivery::Unreachable => self.node.report_snapshot(to, SnapshotStatus::Failure),
                    // The transport sends `SnapshotSent` when the transfer ends.
                    Delivery::InFlight => {}
                }
            }
        }
    }

    fn apply(&mut self, entries: Vec<Entry>, batch: &mut WriteBatch) {
        for e in entries {
            // Dispatch by type first: a joint change is left through an EntryConfChangeV2 whose
            // data is empty, and skipping it would leave the group stuck in the joint config.
            match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => {}
                EntryType::EntryNormal => {
                    let result = postcard::from_bytes::<Command>(&e.data)
                        .map(|cmd| self.apply_command(&cmd))
                        .map_err(|err| {
                            RaftError::Invalid(format!("entry {} does not decode: {err}", e.index))
                        });
                    if let Err(err) = &result {
                        // Every member skips the same bytes the same way, so they stay equal.
                        error!(self.log, "skipping undecodable entry"; "index" => e.index, "error" => %err);
                    }
                    if let Some(id) = self.own_tag(&e.context) {
                        if let Some((_, tx)) = self.proposals.remove(&id) {
                            let _ = tx.send(result);
                        }
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    let applied = if e.get_entry_type() == EntryType::EntryConfChange {
                        ConfChange::parse_from_bytes(&e.data)
                            .map_err(|err| err.to_string())
                            .and_then(|cc| {
                                let cs = self
                                    .node
                                    .apply_conf_change(&cc)
                                    .map_err(|err| err.to_string())?;
                                Ok((ConfChangeV2::default(), cs))
                            })
                    } else {
                        ConfChangeV2::parse_from_bytes(&e.data)
                            .map_err(|err| err.to_string())
                            .and_then(|cc| {
                                let cs = self
                                    .node
                                    .apply_conf_change(&cc)
                                    .map_err(|err| err.to_string())?;
                                Ok((cc, cs))
                            })
                    };
                    let reply = match applied {
                        Ok((cc, cs)) => {
                            let was_member = self.topology.members.contains_key(&self.settings.id);
                            self.topology.apply(&cc, &cs);
                            self.directory.publish(&self.topology);
                            if was_member && !self.topology.members.contains_key(&self.settings.id)
                            {
                                warn!(self.log, "this member was removed from the cluster: it takes no part any more and can be stopped; its data directory must not be reused for a new member");
                            }
                            info!(self.log, "membership changed"; "index" => e.index, "voters" => ?cs.voters, "learners" => ?cs.learners, "outgoing" => ?cs.voters_outgoing, "topology_version" => self.topology.version);
                            self.store.set_conf_state(cs.clone());
                            record_membership(&mut self.kv, &self.topology, &cs);
                            batch.conf_state = Some(cs.clone());
                            Ok((cs, self.topology.clone()))
                        }
                        Err(err) => {
                            warn!(self.log, "membership change refused"; "index" => e.index, "error" => &err);
                            Err(RaftError::Rejected(err))
                        }
                    };
                    if let Some(id) = self.own_tag(&e.context) {
                        if let Some((_, tx)) = self.conf_changes.remove(&id) {
                            let _ = tx.send(reply);
                        }
                    }
                }
            }
            self.applied = e.index;
            self.fail_refused_conf_changes(e.index);
            if self.replayed_at.is_some_and(|at| e.index >= at) {
                self.replayed_at = None;
                self.directory.clear_hints();
            }
        }
    }

    /// A membership change whose log index was applied without answering it was refused by raft
    /// (it replaces such a proposal with an empty entry).
    fn fail_refused_conf_changes(&mut self, index: u64) {
        if self.conf_changes.is_empty() {
            return;
        }
        let refused: Vec<u64> = self
            .conf_changes
            .iter()
            .filter(|(_, (i, _))| *i <= index)
            .map(|(id, _)| *id)
            .collect();
        for id in refused {
            if let Some((_, tx)) = self.conf_changes.remove(&id) {
                let _ = tx.send(Err(RaftError::Rejected(
                    "raft refused the membership change".into(),
                )));
            }
        }
    }

    /// Every `snapshot_interval` applied entries, or when raft needs a fresher snapshot for a
    /// peer: snapshot the state machine and compact the log. Written as a batch of its own,
    /// queued after every ready before it.
    fn maybe_snapshot(&mut self, ctx: &mut Context<Self>) {
        let requested = self.store.take_snapshot_request();
        let due = self.applied >= self.store.snapshot_index() + self.settings.snapshot_interval;
        let covered = self.applied <= self.store.snapshot_index();
        // The stored snapshot's data was released from memory: a peer's request is served by a
        // fresh snapshot even at the same index.
        let released = requested && !self.store.has_snapshot_data();
        if (covered && !released) || !(due || requested) {
            return;
        }
        let term = match self.store.term(self.applied) {
            Ok(t) => t,
            Err(_) => return,
        };
        // The engine is the state: a compaction records only where the log starts; a peer's
        // request is answered with the whole state, read from the engine now.
        let data = if requested {
            encode_state(&self.kv, &self.topology)
        } else {
            Vec::new()
        };
        let mut snap = Snapshot {
            data: data.into(),
            ..Default::default()
        };
        let meta = snap.mut_metadata();
        meta.index = self.applied;
        meta.term = term;
        meta.set_conf_state(self.store.conf_state());
        self.store.compact_to(snap.clone(), requested);
        let batch = WriteBatch {
            number: 0,
            snapshot: Some(snap),
            compact_below: Some(self.applied + 1),
            ..Default::default()
        };
        // Counted and reported like a ready's batch: later readies must not skip the storage
        // thread while it is writing, and a failed write must fail the member.
        self.write(batch, Vec::new(), ctx);
    }

    fn lost_leadership(&mut self) {
        self.leases.follow();
        let err = RaftError::Unknown {
            leader: self.leader(),
        };
        for (_, (_, tx)) in self.proposals.drain() {
            let _ = tx.send(Err(err.clone()));
        }
        for (_, (_, tx)) in self.conf_changes.drain() {
            let _ = tx.send(Err(err.clone()));
        }
    }

    /// Answers a read whose index is applied. Lease queries need this member to lead still.
    fn answer(&mut self, query: &Query) -> Result<ReadAnswer, RaftError> {
        let mut lease = None;
        let mut more = false;
        let (kvs, count) = match query {
            Query::Get(k) => {
                let kvs: Vec<KeyValue> = self.kv.get(k).into_iter().collect();
                let n = kvs.len();
                (kvs, n)
            }
            Query::Range {
                prefix,
                after,
                limit,
                max_bytes,
            } => {
                let page = self.kv.page(prefix, after.as_deref(), *limit, *max_bytes);
                more = page.more;
                (page.kvs, page.count)
            }
            Query::KeepAlive(id) | Query::TimeToLive(id) => {
                if self.node.raft.state != StateRole::Leader {
                    return Err(self.not_leader());
                }
                let l = self
                    .kv
                    .lease(*id)
                    .ok_or_else(|| RaftError::NotFound(format!("lease: {id} not found")))?;
                let now = Instant::now();
                if self.leases.ending(l.id, now) {
                    // Its revocation is decided: renewing it now would promise a TTL that the
                    // revocation about to apply breaks.
                    return Err(RaftError::NotFound(format!("lease: {id} expired")));
                }
                if matches!(query, Query::KeepAlive(_)) {
                    self.leases.refresh(l.id, l.ttl_secs, now);
                }
                lease = Some(LeaseInfo {
                    id: l.id,
                    ttl_secs: l.ttl_secs,
                    remaining: self.leases.remaining(l.id, now).unwrap_or_default(),
                    keys: l.keys.iter().cloned().collect(),
                });
                (Vec::new(), 0)
            }
        };
        Ok(ReadAnswer {
            kvs,
            count,
            more,
            revision: self.kv.revision(),
            lease,
        })
    }

    /// Applies one command to the KV store, and feeds watchers and the lease clock.
    fn apply_command(&mut self, cmd: &Command) -> ApplyResult {
        let mut res = self.kv.apply(cmd);
        if res.error.is_none() {
            let leading = self.node.raft.state == StateRole::Leader;
            match cmd {
                Command::LeaseGrant { ttl_secs, .. }
                | Command::LeaseGrantLowestFree { ttl_secs }
                    if leading =>
                {
                    self.leases.refresh(res.lease, *ttl_secs, Instant::now());
                }
                Command::LeaseRevoke { id, expired } => {
                    self.leases.forget(*id);
                    if *expired {
                        self.leases.expired_total += 1;
                        info!(self.log, "lease expired"; "lease" => id, "keys_deleted" => res.deleted);
                    }
                }
                _ => {}
            }
        } else if let Command::LeaseRevoke { id, .. } = cmd {
            self.leases.forget(*id);
        }
        let events = std::mem::take(&mut res.events);
        self.watches.record(res.revision, events);
        res
    }

    /// A proposal forwarded to a leader that dropped it (a leadership transfer, a partition)
    /// is never applied and no leader change may follow to fail it: give it up after the read
    /// timeout, as "outcome unknown" (it may still commit later).
    fn forget_stale_proposals(&mut self) {
        let limit = self.settings.read_timeout;
        let leader = self.leader();
        let stale: Vec<u64> = self
            .proposals
            .iter()
            .filter(|(_, (at, _))| at.elapsed() > limit)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some((_, tx)) = self.proposals.remove(&id) {
                let _ = tx.send(Err(RaftError::Unknown { leader }));
            }
        }
    }

    /// Whether a batch only moves the commit index: no entries, no term or vote change, nothing
    /// else. Such a batch needs no fsync before the ready is acknowledged (raft recovers a lost
    /// commit index from the leader; a lost vote or entry it cannot).
    fn commit_only(&self, b: &WriteBatch) -> bool {
        b.entries.is_empty()
            && b.snapshot.is_none()
            && b.conf_state.is_none()
            && b.compact_below.is_none()
            && !b.clear_entries
            && b.hard_state.as_ref().is_some_and(|hs| {
                hs.term == self.last_hard_state.term && hs.vote == self.last_hard_state.vote
            })
    }

    fn publish_figures(&self) {
        self.directory.set_figures(RaftFigures {
            is_leader: self.node.raft.state == StateRole::Leader,
            term: self.node.raft.term,
            commit: self.node.raft.raft_log.committed,
            applied: self.applied,
            revision: self.kv.revision(),
            leases: self.kv.leases().count() as u64,
            leases_expired: self.leases.expired_total,
            watchers: self.watches.watchers() as u64,
        });
    }

    /// Leader: proposes the revocation of every lease past its deadline.
    fn expire_leases(&mut self) {
        if self.node.raft.state != StateRole::Leader {
            return;
        }
        for id in self.leases.due(Instant::now()) {
            let cmd = Command::LeaseRevoke { id, expired: true };
            let data = postcard::to_stdvec(&cmd).expect("commands encode");
            if self.node.propose(Vec::new(), data).is_err() {
                self.leases.retry(id);
            }
        }
    }

    /// A follower left the only voter (`--force-new-cluster`, or every other voter removed while
    /// it followed) has nobody to wait for: it campaigns now rather than after a timeout.
    fn campaign_if_alone(&mut self) {
        if self.node.raft.state != StateRole::Follower {
            return;
        }
        let cs = self.store.conf_state();
        if cs.voters == [self.settings.id] && cs.voters_outgoing.is_empty() {
            let _ = self.node.campaign();
        }
    }

    /// Says so every [`LEADERLESS_WARNING`] while this member knows no leader, naming the voters
    /// it has not heard from: a member that cannot reach the others (a wrong address in the
    /// configuration, a partition) must not stay silent.
    fn warn_if_leaderless(&mut self) {
        if self.leader().is_some() {
            self.leaderless = None;
            return;
        }
        let now = Instant::now();
        let (since, warned) = *self.leaderless.get_or_insert((now, now));
        if warned.elapsed() < LEADERLESS_WARNING {
            return;
        }
        self.leaderless = Some((since, now));
        let secs = since.elapsed().as_secs();
        // A removed member has its own warning, once.
        let me = self.settings.id;
        if self.topology.version > 0 && !self.topology.members.contains_key(&me) {
            return;
        }
        let live = self.live_members();
        let silent: Vec<String> = self
            .topology
            .members
            .values()
            .filter(|m| m.id != me && !live.contains(&m.id))
            .map(|m| format!("{} at {}", m.id, m.addr))
            .collect();
        warn!(self.log, "no leader for {secs} s; members not heard from: {}", if silent.is_empty() { "none".to_string() } else { silent.join(", ") };
            "hint" => "check that the members run, and that the addresses in the topology (cluster.initial_cluster, cluster.advertise) are where they listen");
    }

    /// Repeats the ReadIndex request in flight if unanswered after a heartbeat interval.
    fn ask_reads_again(&mut self) {
        let every = self.settings.tick * self.settings.heartbeat_ticks as u32;
        if let Some(b) = self.read_batch.as_mut() {
            if b.asked.elapsed() >= every {
                b.asked = Instant::now();
                let tag = b.tag.clone();
                self.node.read_index(tag);
            }
        }
    }

    /// Answers reads whose index is applied; fails those that waited too long.
    fn serve_reads(&mut self) {
        if self.reads.is_empty() {
            return;
        }
        let applied = self.applied;
        let timeout = self.settings.read_timeout;
        let ready: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.index.is_some_and(|i| i <= applied) || r.since.elapsed() > timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            let r = self.reads.remove(&id).expect("listed above");
            let result = if r.index.is_some_and(|i| i <= applied) {
                self.answer(&r.query)
            } else {
                Err(RaftError::Timeout)
            };
            let _ = r.reply.send(result);
        }
    }
}

/// The caller's answer: now if the request failed at once, else when the entry is applied (or
/// `if_dropped` if the waiter goes away unanswered, as when the actor stops).
fn answer_later<T: Send + 'static>(
    result: Result<oneshot::Receiver<Result<T, RaftError>>, RaftError>,
    if_dropped: RaftError,
) -> ResponseFuture<Result<T, RaftError>> {
    Box::pin(async move {
        match result {
            Ok(rx) => rx.await.unwrap_or(Err(if_dropped)),
            Err(e) => Err(e),
        }
    })
}

/// Raft's records beside the state machine's keys, written in the same atomic commits.
const META_APPLIED: &[u8] = b"raft/applied";
const META_TOPOLOGY: &[u8] = b"raft/topology";
const META_CONF_STATE: &[u8] = b"raft/conf_state";

/// The log index (and its term) the engine's state reflects.
#[derive(Serialize, Deserialize)]
struct Applied {
    index: u64,
    term: u64,
}

fn record_applied(kv: &mut KvState, index: u64, term: u64) {
    let record = postcard::to_stdvec(&Applied { index, term }).expect("serialises");
    kv.put_meta(META_APPLIED, Some(record));
}

fn record_membership(kv: &mut KvState, topology: &Topology, cs: &ConfState) {
    let topology = postcard::to_stdvec(topology).expect("the topology serialises");
    kv.put_meta(META_TOPOLOGY, Some(topology));
    let cs = cs.write_to_bytes().expect("a conf state encodes");
    kv.put_meta(META_CONF_STATE, Some(cs));
}

fn commit_state(kv: &mut KvState) {
    // Nothing applied can be answered or built upon once the engine refuses a write: failing
    // the actor (its supervisor restarts it from the log and the engine) is the safe course.
    if let Err(e) = kv.commit() {
        panic!("{e}");
    }
}

/// The state machine a member starts from, and the log made to begin where it ends.
///
/// The engine holds the state as of some applied index; raft is started from there (its commit
/// index raised to it, the log mirror starting after it), so entries the engine has absorbed are
/// not applied twice. Two cases differ: an engine that was never written (a new member, or data of
/// a version that kept the state in memory) is filled from the log's snapshot; and an engine whose
/// applied entry the log does not hold, at that term, holds a leader's snapshot whose log record a
/// crash lost, so that install is finished here (the log's conflicting tail goes).
fn restore(store: &LogStore, disk: &Disk, log: &Logger) -> Result<(KvState, Topology), String> {
    let mut kv = KvState::restore(Box::new(disk.state().key_space()))?;
    let snap = store.latest_snapshot();
    let snap_meta = snap.get_metadata().clone();
    let Some(record) = kv.meta(META_APPLIED) else {
        if snap_meta.index > 0 && snap.data.is_empty() {
            return Err(format!(
                "the state engine is empty but the log starts after index {}: the member's state is lost; remove its data directory and join it again",
                snap_meta.index
            ));
        }
        let (image, topology) = decode_state(&snap.data)?;
        if snap_meta.index > 0 {
            kv.replace_with(image);
            record_applied(&mut kv, snap_meta.index, snap_meta.term);
            record_membership(&mut kv, &topology, snap_meta.get_conf_state());
            kv.commit()?;
        }
        return Ok((kv, topology));
    };
    let applied: Applied =
        postcard::from_bytes(&record).map_err(|e| format!("corrupt applied record: {e}"))?;
    let topology: Topology = kv
        .meta(META_TOPOLOGY)
        .map(|b| postcard::from_bytes(&b))
        .transpose()
        .map_err(|e| format!("corrupt topology record: {e}"))?
        .unwrap_or_default();
    let cs = kv
        .meta(META_CONF_STATE)
        .map(|b| ConfState::parse_from_bytes(&b))
        .transpose()
        .map_err(|e| format!("corrupt conf state record: {e}"))?
        .unwrap_or_default();
    if applied.index < snap_meta.index {
        return Err(format!(
            "the state engine is at index {} but the log starts after {}: the engine lost writes it had made durable",
            applied.index, snap_meta.index
        ));
    }
    let mut at = Snapshot::default();
    let meta = at.mut_metadata();
    meta.index = applied.index;
    meta.term = applied.term;
    meta.set_conf_state(cs.clone());
    if store.term(applied.index).ok() == Some(applied.term) {
        // The log holds what the engine applied: it now starts after it.
        store.compact_to(at, false);
        store.set_conf_state(cs);
        let mut hs = store.initial_state().map_err(|e| e.to_string())?.hard_state;
        hs.commit = hs.commit.max(applied.index);
        store.set_hard_state(hs);
    } else {
        warn!(log, "finishing the install of a leader's snapshot that a restart interrupted"; "index" => applied.index, "term" => applied.term);
        store.apply_snapshot(at.clone());
        let hs = store.initial_state().map_err(|e| e.to_string())?.hard_state;
        disk.write(
            WriteBatch {
                hard_state: Some(hs),
                conf_state: Some(cs),
                snapshot: Some(at),
                compact_below: Some(applied.index + 1),
                clear_entries: true,
                ..Default::default()
            },
            Box::new(|_| {}),
        );
    }
    Ok((kv, topology))
}

/// Writes the initial configuration of a brand-new member: as raft-rs's own bootstrap does, the
/// log starts at a snapshot of index 1, term 1, holding the voters and an empty state.
fn bootstrap(store: &LogStore, disk: &Disk, members: &[(u64, String)]) {
    let mut snap = Snapshot {
        data: encode_state(&KvState::default(), &Topology::bootstrap(members)).into(),
        ..Default::default()
    };
    let meta = snap.mut_metadata();
    meta.index = 1;
    meta.term = 1;
    meta.mut_conf_state().voters = members.iter().map(|(id, _)| *id).collect();
    let hs = HardState {
        term: 1,
        commit: 1,
        ..Default::default()
    };
    store.apply_snapshot(snap.clone());
    store.set_hard_state(hs.clone());
    let batch = WriteBatch {
        number: 0,
        hard_state: Some(hs),
        conf_state: Some(snap.get_metadata().get_conf_state().clone()),
        snapshot: Some(snap),
        ..Default::default()
    };
    // Queued before anything raft does, and batches are written in order.
    disk.write(batch, Box::new(|_| {}));
}

impl Actor for RaftNode {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Ticks are counted from elapsed time: a timer that fires late (a busy thread) or in a
        // burst (actix reschedules from the missed deadline) still ticks at most once per period.
        let period = self.settings.tick;
        ctx.run_interval(period / 2, move |act, ctx| {
            if act.last_tick.elapsed() >= period {
                act.last_tick = Instant::now();
                act.node.tick();
                act.ask_reads_again();
                act.expire_leases();
                act.forget_stale_proposals();
                act.watches.sweep();
                act.campaign_if_alone();
                act.warn_if_leaderless();
                act.drive(ctx);
                act.publish_figures();
            }
        });
        // A lone voter has nobody to wait for: campaign now rather than after a timeout.
        if self.store.conf_state().voters == [self.settings.id]
            && self.node.raft.state != StateRole::Leader
        {
            let _ = self.node.campaign();
        }
        self.drive(ctx);
    }
}

impl Managed for RaftNode {
    const KIND: &'static str = "raft";

    fn dump_state(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self.status()).unwrap_or_default();
        v["pending_proposals"] = self.proposals.len().into();
        v["pending_reads"] = self.reads.len().into();
        v["watchers"] = self.watches.watchers().into();
        v["oldest_watchable_revision"] = self.watches.oldest().into();
        v["leases"] = self.kv.leases().count().into();
        v["leases_expired"] = self.leases.expired_total.into();
        v["topology_version"] = self.topology.version.into();
        v
    }
}

impl Handler<Step> for RaftNode {
    type Result = ();

    fn handle(&mut self, msg: Step, ctx: &mut Context<Self>) {
        let now = Instant::now();
        for m in msg.0 {
            self.last_heard.insert(m.from, now);
            if let Err(e) = self.node.step(m) {
                // Stale or foreign messages are normal around elections and membership changes.
                slog::debug!(self.log, "message not stepped"; "error" => %e);
            }
        }
        self.drive(ctx);
    }
}

impl Handler<Persisted> for RaftNode {
    type Result = ();

    fn handle(&mut self, msg: Persisted, ctx: &mut Context<Self>) {
        match msg.result {
            Ok(number) => {
                self.writes_in_flight = self.writes_in_flight.saturating_sub(1);
                self.send(msg.messages);
                if number > 0 {
                    self.node.on_persist_ready(number);
                }
                self.advance_apply();
                self.flush_reports();
                self.drive(ctx);
            }
            // Going on would acknowledge what is not on disk. Fail; the supervisor restarts the
            // member from what the disk does hold.
            Err(e) => panic!("raft storage failed: {e}"),
        }
    }
}

impl Handler<Propose> for RaftNode {
    type Result = ResponseFuture<Result<ApplyResult, RaftError>>;

    fn handle(&mut self, msg: Propose, ctx: &mut Context<Self>) -> Self::Result {
        // A follower that knows the leader proposes too: raft forwards the proposal to the
        // leader over the member streams already open (as etcd does), and this member answers
        // when it applies the entry, which carries its tag. Cheaper than a gRPC hop to the
        // leader and back. Without a known leader raft drops the proposal at once.
        let cmd = match msg.0 {
            // The ids after the highest granted are used up (a client took the very top before
            // client ids were bounded): the lowest free id rather than a refusal, forever.
            Command::LeaseGrant { id: 0, ttl_secs } if self.kv.lease_ids_exhausted() => {
                Command::LeaseGrantLowestFree { ttl_secs }
            }
            cmd => cmd,
        };
        let (id, tag) = self.tag();
        let data = postcard::to_stdvec(&cmd).expect("commands encode");
        let result = match self.node.propose(tag, data) {
            Ok(()) => {
                let (tx, rx) = oneshot::channel();
                self.proposals.insert(id, (Instant::now(), tx));
                Ok(rx)
            }
            Err(raft::Error::ProposalDropped) if self.node.raft.state != StateRole::Leader => {
                Err(self.not_leader())
            }
            Err(e) => Err(RaftError::Rejected(format!("proposal dropped: {e}"))),
        };
        self.drive(ctx);
        // A waiter dropped unanswered (the actor stopped) leaves the write's fate unknown: it
        // may have reached other members.
        answer_later(
            result,
            RaftError::Unknown {
                leader: self.leader(),
            },
        )
    }
}

impl Handler<Read> for RaftNode {
    type Result = ResponseFuture<Result<ReadAnswer, RaftError>>;

    fn handle(&mut self, msg: Read, ctx: &mut Context<Self>) -> Self::Result {
        let lease_query = matches!(msg.query, Query::KeepAlive(_) | Query::TimeToLive(_));
        if lease_query && self.node.raft.state != StateRole::Leader {
            let err = self.not_leader();
            return Box::pin(async move { Err(err) });
        }
        if !msg.linearizable && !lease_query {
            let answer = self.answer(&msg.query);
            return Box::pin(async move { answer });
        }
        self.next_tag += 1;
        let id = self.next_tag;
        let (tx, rx) = oneshot::channel();
        self.reads.insert(
            id,
            PendingRead {
                query: msg.query,
                reply: tx,
                index: None,
                since: Instant::now(),
            },
        );
        self.unbatched.push(id);
        self.drive(ctx);
        Box::pin(async move { rx.await.unwrap_or(Err(RaftError::Timeout)) })
    }
}

impl Handler<ChangeMembership> for RaftNode {
    type Result = ResponseFuture<Result<ConfState, RaftError>>;

    fn handle(&mut self, msg: ChangeMembership, ctx: &mut Context<Self>) -> Self::Result {
        let result = if self.node.raft.state != StateRole::Leader {
            Err(self.not_leader())
        } else if self.node.raft.has_pending_conf()
            || !self.store.conf_state().voters_outgoing.is_empty()
        {
            Err(RaftError::Rejected(
                "another membership change is still in progress; try again when it is applied"
                    .into(),
            ))
        } else {
            self.propose_conf_change(msg.0)
        };
        self.drive(ctx);
        let answer = answer_later(result, self.not_leader());
        Box::pin(async move { answer.await.map(|(cs, _)| cs) })
    }
}

impl RaftNode {
    fn propose_conf_change(
        &mut self,
        cc: ConfChangeV2,
    ) -> Result<oneshot::Receiver<ConfOutcome>, RaftError> {
        let (id, tag) = self.tag();
        match self.node.propose_conf_change(tag, cc) {
            Ok(()) => {
                let (tx, rx) = oneshot::channel();
                let index = self.node.raft.raft_log.last_index();
                self.conf_changes.insert(id, (index, tx));
                Ok(rx)
            }
            Err(e) => Err(RaftError::Rejected(format!(
                "membership change refused: {e}"
            ))),
        }
    }

    /// Members live as the quorum guard counts them: this member, and those it heard from within
    /// an election timeout (a leader hears from every live member each heartbeat interval).
    fn live_members(&self) -> BTreeSet<u64> {
        let window = self.settings.tick * self.settings.election_ticks as u32;
        let mut live: BTreeSet<u64> = self
            .last_heard
            .iter()
            .filter(|(_, at)| at.elapsed() <= window)
            .map(|(id, _)| *id)
            .collect();
        live.insert(self.settings.id);
        live
    }

    /// Checks a member request against the topology and the quorum guard, and proposes its
    /// change.
    fn change_member(
        &mut self,
        msg: &ChangeMember,
    ) -> Result<Option<oneshot::Receiver<ConfOutcome>>, RaftError> {
        let req = &msg.request;
        if self.node.raft.state != StateRole::Leader {
            return Err(self.not_leader());
        }
        if self.node.raft.has_pending_conf() || !self.store.conf_state().voters_outgoing.is_empty()
        {
            return Err(RaftError::Busy(
                "another membership change is still in progress; retry once it is applied".into(),
            ));
        }
        let refused = |e| match e {
            PlanError::Conflict(m) => RaftError::Conflict(m),
            PlanError::NotFound(m) => RaftError::NotFound(m),
            PlanError::Invalid(m) => RaftError::Invalid(m),
            PlanError::Precondition(m) => RaftError::Precondition(m),
        };
        let Some(cc) = self.topology.plan(req).map_err(refused)? else {
            return Ok(None);
        };
        if !msg.force {
            let mut live = self.live_members();
            if let MemberRequest::Add { id, .. } = req {
                if msg.answers {
                    live.insert(*id);
                }
            }
            self.topology.check_quorum(req, &live).map_err(refused)?;
        }
        if let MemberRequest::Remove { id } = req {
            if *id == self.settings.id {
                // A leader that removes itself stops leading in the middle of the change; hand
                // leadership to another voter first, and let the caller retry there.
                let next = self
                    .topology
                    .members
                    .values()
                    .filter(|m| m.id != *id && m.role == super::topology::Role::Voter)
                    .max_by_key(|m| self.node.raft.prs().get(m.id).map_or(0, |p| p.matched))
                    .map(|m| m.id);
                if let Some(next) = next {
                    self.node.transfer_leader(next);
                }
                return Err(RaftError::Busy(format!(
                    "member {id} is the leader; leadership is moving to member {} first; retry",
                    next.unwrap_or_default()
                )));
            }
        }
        self.propose_conf_change(cc).map(Some)
    }
}

impl Handler<ChangeMember> for RaftNode {
    type Result = ResponseFuture<Result<Topology, RaftError>>;

    fn handle(&mut self, msg: ChangeMember, ctx: &mut Context<Self>) -> Self::Result {
        let result = self.change_member(&msg);
        self.drive(ctx);
        let current = self.topology.clone();
        let if_dropped = self.not_leader();
        Box::pin(async move {
            match result {
                Ok(None) => Ok(current),
                Ok(Some(rx)) => rx.await.unwrap_or(Err(if_dropped)).map(|(_, t)| t),
                Err(e) => Err(e),
            }
        })
    }
}

impl Handler<Watch> for RaftNode {
    type Result = Result<(u64, i64), RaftError>;

    fn handle(&mut self, msg: Watch, _: &mut Context<Self>) -> Self::Result {
        let current = self.kv.revision();
        self.watches
            .watch(msg.spec, current, msg.tx)
            .map(|id| (id, current))
            .map_err(|e| match e {
                WatchError::Compacted { .. } => RaftError::Compacted(e.to_string()),
            })
    }
}

impl Handler<CancelWatch> for RaftNode {
    type Result = ();

    fn handle(&mut self, msg: CancelWatch, _: &mut Context<Self>) {
        self.watches.cancel(msg.0);
    }
}

impl Handler<SnapshotSent> for RaftNode {
    type Result = ();

    fn handle(&mut self, msg: SnapshotSent, ctx: &mut Context<Self>) {
        let status = if msg.ok {
            SnapshotStatus::Finish
        } else {
            SnapshotStatus::Failure
        };
        self.node.report_snapshot(msg.to, status);
        self.drive(ctx);
    }
}

impl Handler<GetStatus> for RaftNode {
    type Result = Result<RaftStatus, RaftError>;

    fn handle(&mut self, _: GetStatus, _: &mut Context<Self>) -> Self::Result {
        Ok(self.status())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quiet() -> Logger {
        Logger::root(slog::Discard, slog::o!())
    }

    fn put(key: &str) -> Command {
        Command::Put {
            key: key.as_bytes().to_vec(),
            value: b"v".to_vec(),
            lease: 0,
        }
    }

    /// A member's storage with a bootstrapped log and entries 2..=4 (term 1) on disk.
    fn member_with_log(dir: &std::path::Path) -> Disk {
        let (disk, _) = Disk::open(dir).unwrap();
        let store = LogStore::from_recovered(disk.load().unwrap());
        bootstrap(&store, &disk, &[(1, "a:1".into())]);
        let entries: Vec<Entry> = (2..=4)
            .map(|index| Entry {
                index,
                term: 1,
                data: postcard::to_stdvec(&put(&format!("e{index}")))
                    .unwrap()
                    .into(),
                ..Default::default()
            })
            .collect();
        let (tx, rx) = std::sync::mpsc::channel();
        let batch = WriteBatch {
            entries,
            ..Default::default()
        };
        disk.write(batch, Box::new(move |r| tx.send(r).unwrap()));
        rx.recv().unwrap().unwrap();
        disk
    }

    /// What a restarting member reads: the log, then the state.
    fn reopen(disk: &Disk) -> (LogStore, KvState) {
        let store = LogStore::from_recovered(disk.load().unwrap());
        let (kv, _) = restore(&store, disk, &quiet()).unwrap();
        (store, kv)
    }

    #[test]
    fn a_restart_starts_raft_after_what_the_engine_applied() {
        let dir = tempfile::tempdir().unwrap();
        let disk = member_with_log(dir.path());
        let (store, mut kv) = reopen(&disk);
        // Filled from the bootstrap snapshot, raft goes on after it.
        assert_eq!(store.snapshot_index(), 1);
        assert_eq!(store.last_index().unwrap(), 4);
        kv.apply(&put("e2"));
        kv.apply(&put("e3"));
        record_applied(&mut kv, 3, 1);
        kv.commit().unwrap();
        drop(kv);

        let (store, kv) = reopen(&disk);
        assert_eq!(kv.revision(), 2, "entries 2 and 3 are applied once");
        assert_eq!(store.first_index().unwrap(), 4, "raft replays entry 4 only");
        assert_eq!(store.last_index().unwrap(), 4);
        assert!(store.initial_state().unwrap().hard_state.commit >= 3);
        assert_eq!(store.conf_state().voters, vec![1]);
    }

    #[test]
    fn an_engine_the_log_does_not_match_finishes_an_interrupted_snapshot_install() {
        let dir = tempfile::tempdir().unwrap();
        let disk = member_with_log(dir.path());
        let (_, mut kv) = reopen(&disk);
        // A leader's snapshot at index 9, term 2 reached the engine; its log record did not.
        kv.apply(&put("from-the-leader"));
        record_applied(&mut kv, 9, 2);
        kv.commit().unwrap();
        drop(kv);

        let (store, kv) = reopen(&disk);
        assert!(kv.get(b"from-the-leader").is_some());
        assert_eq!(store.snapshot_index(), 9);
        assert_eq!(
            store.last_index().unwrap(),
            9,
            "the conflicting tail is gone"
        );
        let hs = store.initial_state().unwrap().hard_state;
        assert!(hs.commit >= 9 && hs.term >= 2, "{hs:?}");
        // And on disk: the next start finds the install finished.
        let on_disk = disk.load().unwrap();
        assert_eq!(on_disk.snapshot.get_metadata().index, 9);
        assert!(on_disk.entries.is_empty());
    }

    #[test]
    fn an_empty_engine_under_a_compacted_log_is_refused_not_started_empty() {
        let dir = tempfile::tempdir().unwrap();
        let disk = member_with_log(dir.path());
        drop(reopen(&disk));
        let store = LogStore::from_recovered(disk.load().unwrap());
        // The engine's files are gone; the log's snapshot holds no data.
        let mut snap = store.latest_snapshot();
        snap.data = Default::default();
        store.compact_to(snap, false);
        let mut kv = KvState::restore(Box::new(disk.state().key_space())).unwrap();
        kv.put_meta(META_APPLIED, None);
        kv.commit().unwrap();
        let e = restore(&store, &disk, &quiet()).err().unwrap();
        assert!(e.contains("state is lost"), "{e}");
    }
}
