//! The raft actor: owns the raft-rs `RawNode`, the log mirror and the state machine.
//!
//! The loop follows raft-rs's asynchronous-persistence contract: for each `Ready` it sends the
//! plain messages at once, applies committed entries (raft only hands out entries that are both
//! committed and locally persisted), appends new entries and hard state to the log mirror, queues
//! the same to the storage thread, and calls `advance_append_async`. When the storage thread says a
//! ready is durable, the actor sends that ready's persisted messages (votes, append answers) and
//! calls `on_persist_ready`. Every Ready is finished, whatever the role (see the PreCandidate trap
//! in the runtime notes), and the loop runs after every step, proposal, read and tick.

use std::collections::HashMap;
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
use tokio::sync::oneshot;

use super::disk::{Disk, DiskError, WriteBatch};
use super::kv::{ApplyResult, Command, KeyValue, KvState};
use super::log::LogStore;
use super::transport::{Delivery, Transport};
use crate::supervision::Managed;

/// How a raft member runs.
#[derive(Clone, Debug)]
pub struct RaftSettings {
    /// This member's id (1..).
    pub id: u64,
    /// Voters to bootstrap a brand-new log with; empty for a node that joins an existing cluster
    /// (it waits for the leader's snapshot).
    pub initial_voters: Vec<u64>,
    /// One raft tick.
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Take a snapshot (and compact the log) every this many applied entries.
    pub snapshot_interval: u64,
    /// Reads waiting for a ReadIndex answer fail after this long (raft-rs drops read requests
    /// silently when there is no leader).
    pub read_timeout: Duration,
}

impl Default for RaftSettings {
    fn default() -> Self {
        Self {
            id: 1,
            initial_voters: vec![1],
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 3,
            snapshot_interval: 10_000,
            read_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a request to the raft member failed.
#[derive(Clone, Debug, PartialEq, Eq)]
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
            Self::Rejected(m) | Self::Invalid(m) => f.write_str(m),
            Self::Timeout => f.write_str("no answer in time"),
        }
    }
}

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
#[derive(Clone, Debug)]
pub enum Query {
    Get(Vec<u8>),
    /// Keys with a prefix, at most `limit` (0 = all).
    Range {
        prefix: Vec<u8>,
        limit: usize,
    },
}

/// A read's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadAnswer {
    pub kvs: Vec<KeyValue>,
    /// Keys matching before the limit.
    pub count: usize,
    /// Revision the answer reflects.
    pub revision: i64,
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

crate::handles!(RaftNode: Step, Propose, Read, ChangeMembership, GetStatus, SnapshotSent);

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
    proposals: HashMap<u64, oneshot::Sender<Result<ApplyResult, RaftError>>>,
    /// Pending membership changes by tag, with the log index raft gave them: raft turns a change
    /// it refuses into an empty entry at that index, which must fail the waiter.
    conf_changes: HashMap<u64, (u64, oneshot::Sender<Result<ConfState, RaftError>>)>,
    reads: HashMap<u64, PendingRead>,
    /// Reads that arrived after the ReadIndex request in flight was issued: they wait for the next.
    unbatched: Vec<u64>,
    read_batch: Option<ReadBatch>,
    /// Ready batches handed to the storage thread and not yet reported durable.
    writes_in_flight: u64,
    /// Reports for raft that must wait until the current Ready is advanced.
    reports: Vec<(u64, Delivery, bool)>,
    last_tick: Instant,
    log: Logger,
}

impl RaftNode {
    /// Builds a member from what `disk` holds (bootstrapping a brand-new log with the initial
    /// voters). Reads the log synchronously: called by the supervisor when it (re)starts the actor.
    pub fn new(
        settings: RaftSettings,
        disk: Disk,
        transport: Arc<dyn Transport>,
        log: &Logger,
    ) -> Result<Self, String> {
        let recovered = disk.load().map_err(|e| e.to_string())?;
        let store = LogStore::from_recovered(recovered);
        let mut kv = KvState::default();
        // raft-rs tags its own records with raft_id; ours get the same key.
        let log = log.new(slog::o!());
        if !store.is_initialized() && !settings.initial_voters.is_empty() {
            bootstrap(&store, &disk, &settings.initial_voters);
        } else {
            kv = KvState::from_bytes(&store.latest_snapshot().data)?;
        }
        let applied_from = store.snapshot_index();
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
            kv,
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
            log,
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
                if ss.raft_state != StateRole::Leader {
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
                let snap = rd.snapshot().clone();
                match KvState::from_bytes(&snap.data) {
                    Ok(kv) => self.kv = kv,
                    Err(e) => panic!("leader sent a snapshot that does not decode: {e}"),
                }
                let index = snap.get_metadata().index;
                self.applied = index;
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
            self.apply(committed, &mut batch);
            if !rd.entries().is_empty() {
                self.store.append(rd.entries());
                batch.entries = rd.take_entries();
            }
            if let Some(hs) = rd.hs() {
                self.store.set_hard_state(hs.clone());
                batch.hard_state = Some(hs.clone());
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
            if batch.is_empty() && self.writes_in_flight == 0 {
                // Nothing to write and nothing being written: the ready is as durable as it gets.
                // Skipping the storage thread spares followers' heartbeat and ReadIndex answers
                // a thread round trip each.
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
        for (to, delivery) in self.transport.send(msgs) {
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
                        .map(|cmd| self.kv.apply(&cmd))
                        .map_err(|err| {
                            RaftError::Invalid(format!("entry {} does not decode: {err}", e.index))
                        });
                    if let Err(err) = &result {
                        // Every member skips the same bytes the same way, so they stay equal.
                        error!(self.log, "skipping undecodable entry"; "index" => e.index, "error" => %err);
                    }
                    if let Some(id) = self.own_tag(&e.context) {
                        if let Some(tx) = self.proposals.remove(&id) {
                            let _ = tx.send(result);
                        }
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    let applied = if e.get_entry_type() == EntryType::EntryConfChange {
                        ConfChange::parse_from_bytes(&e.data)
                            .map_err(|err| err.to_string())
                            .and_then(|cc| {
                                self.node
                                    .apply_conf_change(&cc)
                                    .map_err(|err| err.to_string())
                            })
                    } else {
                        ConfChangeV2::parse_from_bytes(&e.data)
                            .map_err(|err| err.to_string())
                            .and_then(|cc| {
                                self.node
                                    .apply_conf_change(&cc)
                                    .map_err(|err| err.to_string())
                            })
                    };
                    let reply = match applied {
                        Ok(cs) => {
                            info!(self.log, "membership changed"; "index" => e.index, "voters" => ?cs.voters, "learners" => ?cs.learners, "outgoing" => ?cs.voters_outgoing);
                            self.store.set_conf_state(cs.clone());
                            batch.conf_state = Some(cs.clone());
                            Ok(cs)
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
        if covered || !(due || requested) {
            return;
        }
        let term = match self.store.term(self.applied) {
            Ok(t) => t,
            Err(_) => return,
        };
        let mut snap = Snapshot {
            data: self.kv.to_bytes().into(),
            ..Default::default()
        };
        let meta = snap.mut_metadata();
        meta.index = self.applied;
        meta.term = term;
        meta.set_conf_state(self.store.conf_state());
        self.store.compact_to(snap.clone());
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
        let err = RaftError::Unknown {
            leader: self.leader(),
        };
        for (_, tx) in self.proposals.drain() {
            let _ = tx.send(Err(err.clone()));
        }
        for (_, (_, tx)) in self.conf_changes.drain() {
            let _ = tx.send(Err(err.clone()));
        }
    }

    fn answer(&self, query: &Query) -> ReadAnswer {
        let (kvs, count) = match query {
            Query::Get(k) => {
                let kvs: Vec<KeyValue> = self.kv.get(k).cloned().into_iter().collect();
                let n = kvs.len();
                (kvs, n)
            }
            Query::Range { prefix, limit } => self.kv.range(prefix, *limit),
        };
        ReadAnswer {
            kvs,
            count,
            revision: self.kv.revision(),
        }
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
                Ok(self.answer(&r.query))
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

/// Writes the initial configuration of a brand-new member: as raft-rs's own bootstrap does, the
/// log starts at a snapshot of index 1, term 1, holding the voters and an empty state.
fn bootstrap(store: &LogStore, disk: &Disk, voters: &[u64]) {
    let mut snap = Snapshot {
        data: KvState::default().to_bytes().into(),
        ..Default::default()
    };
    let meta = snap.mut_metadata();
    meta.index = 1;
    meta.term = 1;
    meta.mut_conf_state().voters = voters.to_vec();
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
                act.drive(ctx);
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
        v
    }
}

impl Handler<Step> for RaftNode {
    type Result = ();

    fn handle(&mut self, msg: Step, ctx: &mut Context<Self>) {
        for m in msg.0 {
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
        let result = if self.node.raft.state != StateRole::Leader {
            Err(self.not_leader())
        } else {
            let (id, tag) = self.tag();
            let data = postcard::to_stdvec(&msg.0).expect("commands encode");
            match self.node.propose(tag, data) {
                Ok(()) => {
                    let (tx, rx) = oneshot::channel();
                    self.proposals.insert(id, tx);
                    Ok(rx)
                }
                Err(e) => Err(RaftError::Rejected(format!("proposal dropped: {e}"))),
            }
        };
        self.drive(ctx);
        answer_later(result, self.not_leader())
    }
}

impl Handler<Read> for RaftNode {
    type Result = ResponseFuture<Result<ReadAnswer, RaftError>>;

    fn handle(&mut self, msg: Read, ctx: &mut Context<Self>) -> Self::Result {
        if !msg.linearizable {
            let answer = self.answer(&msg.query);
            return Box::pin(async move { Ok(answer) });
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
            let (id, tag) = self.tag();
            match self.node.propose_conf_change(tag, msg.0) {
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
        };
        self.drive(ctx);
        answer_later(result, self.not_leader())
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
