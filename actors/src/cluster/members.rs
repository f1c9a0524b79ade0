//! Members as actors: one [`MemberActor`] per member under `/node/cluster/members/<id>`, holding
//! what this node observes of it (heartbeats, the status and resources it reports), and the
//! [`Membership`] actor that keeps that set equal to the replicated topology, sends this node's
//! own heartbeats to every peer, and answers topology questions.
//!
//! Liveness is not replicated: each node judges reachability from the heartbeats that reach it,
//! which is what a caller asking that node can act on.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{
    Actor, ActorFutureExt, AsyncContext, Context, Handler, Message, ResponseFuture, WrapFuture,
};
use serde::Serialize;
use slog::{debug, warn, Logger};
use tokio::sync::watch;

use super::fault::Faults;
use super::raft::{GetStatus, RaftNode};
use super::topology::{Directory, Published, Role, Topology};
use crate::envelope::ActorRef;
use crate::supervision::{AddChild, ChildSpec, Managed, StopChild, Supervisor};

/// What a node reports of itself in a heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Resources {
    pub memory_bytes: u64,
    pub cpu_seconds: f64,
    pub actors: u64,
    pub applied_index: u64,
}

/// The status a member beats while it has a leader.
pub const SERVING: &str = "serving";

/// One heartbeat.
#[derive(Clone, Debug, Message)]
#[rtype(result = "()")]
pub struct Beat {
    pub status: String,
    pub resources: Resources,
    /// The sending process's incarnation (random per process start).
    pub incarnation: u64,
}

/// What this node knows of a member's liveness.
#[derive(Clone, Debug, Default, PartialEq, Serialize, actix::MessageResponse)]
pub struct Liveness {
    /// Time since its last heartbeat reached this node; `None`: never.
    pub since_last_beat: Option<Duration>,
    pub reachable: bool,
    pub status: String,
    /// How long its beats have said it is not serving (no leader, raft down); `None`: serving,
    /// or not heard from.
    pub not_serving_for: Option<Duration>,
    /// How long this node has been listening for it: silence means something only once this
    /// is past the timeout.
    pub watched_for: Duration,
    pub resources: Resources,
}

/// Asks a member actor for its [`Liveness`].
#[derive(Message)]
#[rtype(result = "Liveness")]
pub struct GetLiveness;

crate::handles!(MemberActor: Beat, GetLiveness);

/// The live state of one member, as this node sees it.
pub struct MemberActor {
    id: u64,
    timeout: Duration,
    last_beat: Option<Instant>,
    beats: u64,
    status: String,
    /// Since when its beats say it is not serving.
    not_serving_since: Option<Instant>,
    /// When this node began listening for it.
    watched_since: Instant,
    resources: Resources,
}

impl Liveness {
    /// Whether the member is to be treated as failed after `timeout`: heard from and silent
    /// since, or never heard from in a whole timeout of listening, or saying for as long that it
    /// has no leader (it can write nothing: a one-way partition lets its beats out and nothing
    /// in). A node that has only just begun listening judges nobody yet.
    pub fn failed(&self, timeout: Duration) -> bool {
        let silent = match self.since_last_beat {
            Some(since) => since > timeout,
            None => self.watched_for > timeout,
        };
        silent || self.not_serving_for.is_some_and(|d| d >= timeout)
    }
}

impl MemberActor {
    /// A member not heard from yet; silent past `timeout` means unreachable.
    pub fn new(id: u64, timeout: Duration) -> Self {
        Self {
            id,
            timeout,
            last_beat: None,
            beats: 0,
            status: String::new(),
            not_serving_since: None,
            watched_since: Instant::now(),
            resources: Resources::default(),
        }
    }

    fn liveness(&self) -> Liveness {
        let since = self.last_beat.map(|t| t.elapsed());
        Liveness {
            since_last_beat: since,
            reachable: since.is_some_and(|s| s <= self.timeout),
            status: self.status.clone(),
            not_serving_for: self.not_serving_since.map(|t| t.elapsed()),
            watched_for: self.watched_since.elapsed(),
            resources: self.resources.clone(),
        }
    }
}

impl Actor for MemberActor {
    type Context = Context<Self>;
}

impl Managed for MemberActor {
    const KIND: &'static str = "member";

    fn dump_state(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self.liveness()).unwrap_or_default();
        v["id"] = self.id.into();
        v["beats"] = self.beats.into();
        v
    }
}

impl Handler<Beat> for MemberActor {
    type Result = ();

    fn handle(&mut self, msg: Beat, _: &mut Context<Self>) {
        self.last_beat = Some(Instant::now());
        self.beats += 1;
        if msg.status == SERVING {
            self.not_serving_since = None;
        } else if self.not_serving_since.is_none() {
            self.not_serving_since = self.last_beat;
        }
        self.status = msg.status;
        self.resources = msg.resources;
    }
}

impl Handler<GetLiveness> for MemberActor {
    type Result = Liveness;

    fn handle(&mut self, _: GetLiveness, _: &mut Context<Self>) -> Liveness {
        self.liveness()
    }
}

/// Sends this node's heartbeat to a peer (the gRPC client side; fire and forget).
pub trait HeartbeatSender: Send + Sync + 'static {
    /// Sends `beat` from member `from` to the member at `addr`.
    fn send(&self, from: u64, addr: &str, beat: Beat);
}

/// This node's own figures (memory, CPU, actor count) for its heartbeats.
pub type ResourceProbe = Arc<dyn Fn() -> Resources + Send + Sync>;

/// How the membership actor runs.
#[derive(Clone)]
pub struct MembershipSettings {
    pub self_id: u64,
    /// This process's incarnation, drawn at random when it starts: its heartbeats carry it, so
    /// that a receiver tells two processes claiming one member id apart.
    pub incarnation: u64,
    pub heartbeat_interval: Duration,
    /// A member silent this long is shown unreachable.
    pub heartbeat_timeout: Duration,
}

/// A heartbeat received from member `from`; answers the topology version.
#[derive(Message)]
#[rtype(result = "Result<u64, BeatRefused>")]
pub struct ReceiveBeat {
    pub from: u64,
    pub beat: Beat,
}

/// Why a heartbeat was not recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BeatRefused {
    /// The sender is not a member.
    NotMember(String),
    /// Another process (another incarnation) keeps the member's row live: the sender is a second
    /// process with the same member id. Its beat leaves the row alone.
    Duplicate(String),
}

impl std::fmt::Display for BeatRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotMember(m) | Self::Duplicate(m) => f.write_str(m),
        }
    }
}

/// One member, with the replicated facts and the observed liveness.
#[derive(Clone, Debug, Serialize)]
pub struct MemberView {
    pub id: u64,
    pub addr: String,
    pub role: Role,
    pub liveness: Liveness,
}

/// The topology with liveness, as this node sees it.
#[derive(Clone, Debug, Serialize, actix::MessageResponse)]
pub struct TopologyView {
    pub version: u64,
    pub leader: Option<u64>,
    pub members: Vec<MemberView>,
}

/// Asks for the [`TopologyView`].
#[derive(Message)]
#[rtype(result = "TopologyView")]
pub struct GetTopologyView;

crate::handles!(Membership: ReceiveBeat, GetTopologyView);

/// Keeps one member actor per member, beats for this node, and answers topology questions.
pub struct Membership {
    settings: MembershipSettings,
    directory: Directory,
    supervisor: ActorRef<Supervisor>,
    raft: ActorRef<RaftNode>,
    sender: Arc<dyn HeartbeatSender>,
    probe: ResourceProbe,
    members: BTreeMap<u64, ActorRef<MemberActor>>,
    /// The incarnation each member's accepted beats come from, and when the last one came.
    incarnations: HashMap<u64, (u64, Instant)>,
    /// Topology version the member actors were last reconciled with.
    reconciled: Option<u64>,
    /// Injected faults: beats with a member whose raft traffic is dropped are lost too, so that
    /// a member cut off by injected faults is also silent, as a partition makes it.
    faults: Option<Faults>,
    log: Logger,
}

impl Membership {
    /// Member actors are added to and stopped in `supervisor` (`/node/cluster/members`).
    pub fn new(
        settings: MembershipSettings,
        directory: Directory,
        supervisor: ActorRef<Supervisor>,
        raft: ActorRef<RaftNode>,
        sender: Arc<dyn HeartbeatSender>,
        probe: ResourceProbe,
        log: &Logger,
    ) -> Self {
        Self {
            settings,
            directory,
            supervisor,
            raft,
            sender,
            probe,
            members: BTreeMap::new(),
            incarnations: HashMap::new(),
            reconciled: None,
            faults: None,
            log: log.new(slog::o!("actor" => "membership")),
        }
    }

    /// Loses the beats to and from members that `faults` cut off.
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = Some(faults);
        self
    }

    /// Whether beats with `member` are lost (an injected partition).
    fn cut_off(&self, member: u64) -> bool {
        self.faults.as_ref().is_some_and(|f| f.drops(member))
    }

    /// Waits for the next directory change, then reconciles and waits again.
    fn listen(&self, mut rx: watch::Receiver<Published>, ctx: &mut Context<Self>) {
        let wait = async move {
            let r = rx.changed().await;
            (rx, r.is_ok())
        };
        ctx.spawn(wait.into_actor(self).map(|(rx, open), act, ctx| {
            act.reconcile(ctx);
            if open {
                act.listen(rx, ctx);
            }
        }));
    }

    /// Starts an actor for every member new in the topology and stops those of members gone.
    fn reconcile(&mut self, ctx: &mut Context<Self>) {
        let topology = self.directory.current().topology;
        if self.reconciled == Some(topology.version) {
            return;
        }
        self.reconciled = Some(topology.version);
        let gone: Vec<u64> = self
            .members
            .keys()
            .filter(|id| !topology.members.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            self.members.remove(&id);
            let sup = self.supervisor.clone();
            ctx.spawn(
                async move {
                    let _ = sup
                        .send(StopChild {
                            name: id.to_string(),
                        })
                        .await;
                }
                .into_actor(self),
            );
        }
        for id in topology.members.keys() {
            if self.members.contains_key(id) {
                continue;
            }
            let member: ActorRef<MemberActor> = ActorRef::default();
            self.members.insert(*id, member.clone());
            let sup = self.supervisor.clone();
            let timeout = self.settings.heartbeat_timeout;
            let id = *id;
            let log = self.log.clone();
            ctx.spawn(
                async move {
                    let added = sup.send(AddChild(member_spec(id, timeout, &member))).await;
                    if let Ok(Err(e)) = added {
                        // Left over from an earlier incarnation of this actor (or a removal
                        // still under way): replace it, so that the reference held here is the
                        // running one.
                        debug!(log, "replacing member actor"; "member" => id, "reason" => e);
                        let _ = sup.send(StopChild { name: id.to_string() }).await;
                        let again = sup.send(AddChild(member_spec(id, timeout, &member))).await;
                        if !matches!(again, Ok(Ok(_))) {
                            warn!(log, "member actor not started"; "member" => id, "result" => ?again);
                        }
                    }
                }
                .into_actor(self),
            );
        }
    }

    /// Sends this node's heartbeat to every other member, and records it for itself.
    fn beat(&mut self, ctx: &mut Context<Self>) {
        let raft = self.raft.clone();
        let probe = self.probe.clone();
        let me = self.settings.self_id;
        let incarnation = self.settings.incarnation;
        // Not in a topology it has (a joining node has none yet): it was removed.
        let topology = self.directory.current().topology;
        let removed = topology.version > 0 && !topology.members.contains_key(&me);
        ctx.spawn(
            async move {
                let status = raft.send(GetStatus).await;
                let mut resources = probe();
                let status = match status {
                    _ if removed => "removed".to_string(),
                    Ok(Ok(s)) => {
                        resources.applied_index = s.applied;
                        if s.leader.is_some() {
                            SERVING.to_string()
                        } else {
                            "no-leader".to_string()
                        }
                    }
                    _ => "raft-down".to_string(),
                };
                Beat {
                    status,
                    resources,
                    incarnation,
                }
            }
            .into_actor(self)
            .map(|beat, act, _| {
                let me = act.settings.self_id;
                if let Some(m) = act.members.get(&me) {
                    let _ = m.try_send(beat.clone());
                }
                for (id, addr) in act.directory.addresses() {
                    if id != me && !act.cut_off(id) {
                        act.sender.send(me, &addr, beat.clone());
                    }
                }
            }),
        );
    }
}

fn member_spec(id: u64, timeout: Duration, member: &ActorRef<MemberActor>) -> ChildSpec {
    ChildSpec::actor_for(id.to_string(), member, move || {
        MemberActor::new(id, timeout)
    })
}

impl Actor for Membership {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.reconcile(ctx);
        self.listen(self.directory.subscribe(), ctx);
        self.beat(ctx);
        ctx.run_interval(self.settings.heartbeat_interval, |act, ctx| act.beat(ctx));
    }
}

impl Managed for Membership {
    const KIND: &'static str = "membership";

    fn dump_state(&self) -> serde_json::Value {
        serde_json::json!({
            "self_id": self.settings.self_id,
            "members": self.members.keys().collect::<Vec<_>>(),
            "topology_version": self.reconciled,
            "heartbeat_interval_ms": self.settings.heartbeat_interval.as_millis() as u64,
            "heartbeat_timeout_ms": self.settings.heartbeat_timeout.as_millis() as u64,
        })
    }
}

impl Handler<ReceiveBeat> for Membership {
    type Result = Result<u64, BeatRefused>;

    fn handle(&mut self, msg: ReceiveBeat, ctx: &mut Context<Self>) -> Self::Result {
        // The topology may have moved on since the last reconcile.
        self.reconcile(ctx);
        let Some(member) = self.members.get(&msg.from) else {
            return Err(BeatRefused::NotMember(format!(
                "node_id: {} is not a member",
                msg.from
            )));
        };
        let (id, incarnation) = (msg.from, msg.beat.incarnation);
        if self.cut_off(id) {
            // Lost, as on a cut link: the member stays silent here.
            return Ok(self.directory.current().topology.version);
        }
        if id == self.settings.self_id && incarnation != self.settings.incarnation {
            return Err(BeatRefused::Duplicate(format!(
                "node_id: member {id} is the process answering this heartbeat; a second process with the same id is refused"
            )));
        }
        let timeout = self.settings.heartbeat_timeout;
        if let Some((current, at)) = self.incarnations.get(&id) {
            if *current != incarnation && at.elapsed() <= timeout {
                return Err(BeatRefused::Duplicate(format!(
                    "node_id: member {id} is live as another process (heard from {} ms ago); a second process with the same id is refused (a restarted member's beats are taken once the previous process is silent for {} ms)",
                    at.elapsed().as_millis(),
                    timeout.as_millis()
                )));
            }
        }
        self.incarnations.insert(id, (incarnation, Instant::now()));
        if let Err(e) = member.try_send(msg.beat) {
            warn!(self.log, "heartbeat not recorded"; "member" => msg.from, "error" => %e);
        }
        Ok(self.directory.current().topology.version)
    }
}

impl Handler<GetTopologyView> for Membership {
    type Result = ResponseFuture<TopologyView>;

    fn handle(&mut self, _: GetTopologyView, ctx: &mut Context<Self>) -> Self::Result {
        self.reconcile(ctx);
        let published = self.directory.current();
        let refs: Vec<Option<ActorRef<MemberActor>>> = published
            .topology
            .members
            .keys()
            .map(|id| self.members.get(id).cloned())
            .collect();
        Box::pin(async move { view(&published.topology, published.leader, refs).await })
    }
}

async fn view(
    topology: &Topology,
    leader: Option<u64>,
    refs: Vec<Option<ActorRef<MemberActor>>>,
) -> TopologyView {
    let mut members = Vec::with_capacity(refs.len());
    for (m, r) in topology.members.values().zip(refs) {
        let liveness = match r {
            Some(r) => r.send(GetLiveness).await.unwrap_or_default(),
            None => Liveness::default(),
        };
        members.push(MemberView {
            id: m.id,
            addr: m.addr.clone(),
            role: m.role,
            liveness,
        });
    }
    TopologyView {
        version: topology.version,
        leader,
        members,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn liveness(
        since_last_beat: Option<u64>,
        watched_for: u64,
        not_serving_for: Option<u64>,
    ) -> Liveness {
        let ms = Duration::from_millis;
        Liveness {
            since_last_beat: since_last_beat.map(ms),
            reachable: since_last_beat.is_some_and(|s| s <= 5000),
            watched_for: ms(watched_for),
            not_serving_for: not_serving_for.map(ms),
            ..Liveness::default()
        }
    }

    #[test]
    fn a_member_is_failed_when_silent_past_the_timeout_or_long_without_a_leader() {
        let timeout = Duration::from_millis(5000);
        // (last beat ms ago, listened for ms, no leader for ms) → failed
        let cases = [
            ((Some(100), 60_000, None), false),
            ((Some(5_001), 60_000, None), true),
            // Never heard: judged only after a whole timeout of listening (a new leader, a
            // restarted node, must not take its own deafness for the others' deaths).
            ((None, 1_000, None), false),
            ((None, 5_001, None), true),
            // Heard, but without a leader: an election is short, a one-way partition is not.
            ((Some(100), 60_000, Some(1_500)), false),
            ((Some(100), 60_000, Some(5_000)), true),
        ];
        for ((beat, watched, not_serving), failed) in cases {
            let l = liveness(beat, watched, not_serving);
            assert_eq!(l.failed(timeout), failed, "{l:?}");
        }
    }
}
