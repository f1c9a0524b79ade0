//! The actor tree, one function per area in the order the tree starts them. Each builds what its
//! area's actors are made from (and what the servers reach them by) and returns it; the next area
//! takes what it needs from the ones before, as later children of `/node` depend on earlier ones.
//!
//! ```text
//! /node                        rest_for_one
//! ├── /node/admin              introspection (own arbiter)
//! ├── /node/cluster            rest_for_one
//! │   ├── /node/cluster/raft         the raft member (own arbiter)
//! │   ├── /node/cluster/members      one_for_one; /node/cluster/members/<id>, one per member
//! │   └── /node/cluster/membership   keeps members/ equal to the topology, sends heartbeats
//! ├── /node/registry           one_for_all
//! │   ├── /node/registry/clients     one_for_one; /node/registry/clients/<client_id>
//! │   └── /node/registry/index       loads and watches registrations, writes them
//! ├── /node/translation        the translation gateway (backend probe, jobs)
//! ├── /node/router             one_for_all
//! │   ├── /node/router/sessions      one_for_one; /node/router/sessions/<key>, one per session
//! │   └── /node/router/hub           session table, owner records, agents' listen streams
//! ├── /node/balancer           one_for_all
//! │   ├── /node/balancer/modules     one_for_one; /node/balancer/modules/<instance_id>
//! │   ├── /node/balancer/state       loads and watches the balancer's keys; publishes the view
//! │   ├── /node/balancer/scaler      the autoscaler (acts on the leader)
//! │   └── /node/balancer/listeners   one_for_one; /node/balancer/listeners/<n>, the data plane
//! ├── /node/workflows          one_for_one; /node/workflows/<id>, one per run this member owns
//! ├── /node/workflow-table     watches the runs, starts and stops the owned ones' actors,
//! │                            places starts, moves failed members' runs (on the leader)
//! └── /node/workers            one_for_one; /node/workers/<id>, one per connected external worker
//! ```

use std::sync::{Arc, OnceLock};

use lodge_actors::admin::{AdminActor, NodeFacts};
use lodge_actors::balancer::autoscale::Leads;
use lodge_actors::balancer::dataplane::{DataPlaneSettings, ListenerSpec};
use lodge_actors::balancer::hook::DeployHook;
use lodge_actors::balancer::metrics::BalancerMetrics;
use lodge_actors::balancer::{BalancerParts, DataPlane};
use lodge_actors::cluster::client::Client;
use lodge_actors::cluster::disk::Disk;
use lodge_actors::cluster::fault::Faults;
use lodge_actors::cluster::members::{
    HeartbeatSender, Membership, MembershipSettings, ResourceProbe, Resources,
};
use lodge_actors::cluster::raft::{RaftNode, RaftSettings};
use lodge_actors::cluster::topology::Directory;
use lodge_actors::cluster::transport::Transport;
use lodge_actors::registry::index::ClientTable;
use lodge_actors::registry::{RegistryHandle, RegistryIndex, RegistryMetrics, RegistrySettings};
use lodge_actors::router::hub::SessionTable;
use lodge_actors::router::owner_store::StoredOwners;
use lodge_actors::router::{OwnerStore, RouterHub, RouterMetrics, RouterSettings};
use lodge_actors::translate::gateway::{GatewaySettings, TranslationGateway};
use lodge_actors::workflow::records::Records;
use lodge_actors::workflow::run::RetrySettings;
use lodge_actors::workflow::{
    runbook, TableSettings, Types, WorkflowHandle, WorkflowMetrics, WorkflowTable,
};
use lodge_actors::{ActorRef, ChildSpec, Placement, Strategy, SupervisorSpec};
use lodge_grpc::balancer::probe::GrpcModuleProbe;
use lodge_grpc::cluster::GrpcHeartbeats;
use lodge_grpc::leader_link::PeerLeaderLink;
use lodge_grpc::members::Members;
use lodge_grpc::pb::router::Frame;
use lodge_grpc::raft::GrpcTransport;
use slog::Logger;

use super::cluster::ClusterPlan;
use crate::config::NodeConfig;

/// The node's table of live actors, set once the runtime runs.
pub type ActorTableSlot = Arc<OnceLock<lodge_actors::ActorTable>>;

/// `/node/admin`.
pub struct AdminArea {
    pub admin: ActorRef<AdminActor>,
    actors: ActorTableSlot,
    facts: Arc<NodeFacts>,
    allow_mutations: bool,
    faults: Faults,
}

/// `/node/cluster`: the raft member, the member actors, and the store client every later area
/// reaches the replicated store with.
pub struct ClusterArea {
    pub raft: ActorRef<RaftNode>,
    pub faults: Faults,
    pub membership: ActorRef<Membership>,
    pub directory: Directory,
    /// Channels to the other members.
    pub members: Arc<Members>,
    /// The one way to the replicated store.
    pub store: Client,
    raft_settings: RaftSettings,
    disk: Disk,
    transport: Arc<dyn Transport>,
    membership_settings: MembershipSettings,
    heartbeats: Arc<dyn HeartbeatSender>,
    probe: ResourceProbe,
    log: Logger,
}

/// `/node/registry`.
pub struct RegistryArea {
    pub index: ActorRef<RegistryIndex>,
    pub clients: ClientTable,
    pub metrics: RegistryMetrics,
    settings: Arc<RegistrySettings>,
    store: Client,
    log: Logger,
}

/// `/node/translation`.
pub struct TranslationArea {
    pub gateway: ActorRef<TranslationGateway>,
    settings: Arc<GatewaySettings>,
}

/// `/node/router`.
pub struct RouterArea {
    pub hub: ActorRef<RouterHub<Frame>>,
    pub table: SessionTable<Frame>,
    pub settings: Arc<RouterSettings>,
    pub metrics: RouterMetrics,
    owners: Arc<dyn OwnerStore>,
    log: Logger,
}

/// `/node/workflows`, `/node/workflow-table` and `/node/workers`.
pub struct WorkflowArea {
    pub table: ActorRef<WorkflowTable>,
    pub metrics: WorkflowMetrics,
    settings: TableSettings,
    store: Client,
    types: Arc<Types>,
    membership: ActorRef<Membership>,
    directory: Directory,
    log: Logger,
}

impl WorkflowArea {
    /// What the workflow service calls.
    pub fn handle(&self) -> WorkflowHandle {
        WorkflowHandle::new(
            self.table.clone(),
            Records::new(Arc::new(self.store.clone())),
        )
    }
}

/// The raft member and what reaches it: the transport to the other members, the membership
/// actor's heartbeats, and the store client (its link to a leader goes over the peer port).
pub fn cluster(
    cfg: &NodeConfig,
    plan: &ClusterPlan,
    actors: &ActorTableSlot,
    io: &tokio::runtime::Handle,
    log: &Logger,
) -> Arc<ClusterArea> {
    let raft: ActorRef<RaftNode> = ActorRef::default();
    let faults = Faults::new(Some(plan.disk.clone()));
    let transport: Arc<dyn Transport> = GrpcTransport::new(
        io.clone(),
        cfg.node.id,
        raft.clone(),
        faults.clone(),
        plan.directory.clone(),
        plan.peer_link.clone(),
        log.clone(),
    );
    let members = Arc::new(Members::new(
        cfg.node.id,
        plan.directory.clone(),
        plan.peer_link.clone(),
    ));
    let store = Client::new(
        cfg.node.id,
        raft.clone(),
        PeerLeaderLink::new(members.clone()),
        NodeConfig::duration(cfg.server.request_timeout_ms),
    );
    let probe: ResourceProbe = {
        let actors = actors.clone();
        Arc::new(move || {
            let (cpu_seconds, memory_bytes) = crate::metrics::cpu_and_rss();
            Resources {
                memory_bytes,
                cpu_seconds,
                actors: actors
                    .get()
                    .map_or(0, |r: &lodge_actors::ActorTable| r.len() as u64),
                applied_index: 0,
            }
        })
    };
    let heartbeats = Arc::new(GrpcHeartbeats::new(
        io.clone(),
        plan.peer_link.clone(),
        plan.advertise.clone(),
        plan.heartbeat_interval,
        log,
    ));
    Arc::new(ClusterArea {
        raft,
        faults,
        membership: ActorRef::default(),
        directory: plan.directory.clone(),
        members,
        store,
        raft_settings: plan.raft_settings.clone(),
        disk: plan.disk.clone(),
        transport,
        membership_settings: plan.membership_settings.clone(),
        heartbeats,
        probe,
        log: log.clone(),
    })
}

/// Introspection of every actor; fault injection into the cluster's transport and disk.
pub fn admin(cfg: &NodeConfig, cluster: &ClusterArea, actors: &ActorTableSlot) -> Arc<AdminArea> {
    Arc::new(AdminArea {
        admin: ActorRef::default(),
        actors: actors.clone(),
        facts: Arc::new(NodeFacts {
            node_id: cfg.node.id,
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at_ms: lodge_actors::clock::precise_ms(),
            config_json: cfg.redacted_json(),
        }),
        allow_mutations: cfg.admin.allow_mutations,
        faults: cluster.faults.clone(),
    })
}

/// Client registrations, kept in the store.
pub fn registry(
    cfg: &NodeConfig,
    cluster: &ClusterArea,
    metrics: RegistryMetrics,
    log: &Logger,
) -> Arc<RegistryArea> {
    Arc::new(RegistryArea {
        index: ActorRef::default(),
        clients: ClientTable::default(),
        metrics,
        settings: Arc::new(super::settings::registry(cfg)),
        store: cluster.store.clone(),
        log: log.clone(),
    })
}

/// The translation gateway; its settings were checked before anything started.
pub fn translation(settings: Arc<GatewaySettings>) -> Arc<TranslationArea> {
    Arc::new(TranslationArea {
        gateway: ActorRef::default(),
        settings,
    })
}

/// The session router; its owner records live in the store.
pub fn router(
    cfg: &NodeConfig,
    cluster: &ClusterArea,
    metrics: RouterMetrics,
    log: &Logger,
) -> Arc<RouterArea> {
    Arc::new(RouterArea {
        hub: ActorRef::default(),
        table: SessionTable::default(),
        settings: Arc::new(super::settings::router(cfg)),
        metrics,
        owners: Arc::new(StoredOwners::new(cluster.store.clone())),
        log: log.clone(),
    })
}

/// The balancer: its records in the store, its modules probed over gRPC, its data plane on the
/// listeners bound at start.
pub fn balancer(
    cfg: &NodeConfig,
    cluster: &ClusterArea,
    listeners: Vec<ListenerSpec>,
    metrics: Arc<BalancerMetrics>,
    io: &tokio::runtime::Handle,
    log: &Logger,
) -> Arc<BalancerParts> {
    let leads: Leads = {
        let directory = cluster.directory.clone();
        Arc::new(move || directory.figures().is_leader)
    };
    let b = &cfg.balancer;
    Arc::new(
        BalancerParts::new(
            Arc::new(cluster.store.clone()),
            Arc::new(GrpcModuleProbe::new()),
            metrics,
            DeployHook::new(b.deploy_hook.clone(), log).map(Arc::new),
            cfg.node.id,
            leads,
            log,
        )
        .with_dataplane(DataPlane::new(
            listeners,
            DataPlaneSettings {
                sniff_timeout: NodeConfig::duration(b.sniff_timeout_ms),
                connect_timeout: NodeConfig::duration(b.connect_timeout_ms),
                connect_attempts: b.connect_attempts,
                buffer_bytes: b.buffer_bytes,
                max_connections: b.max_connections,
                idle_timeout: (b.idle_timeout_ms > 0)
                    .then(|| NodeConfig::duration(b.idle_timeout_ms)),
            },
            io.clone(),
        )),
    )
}

/// Replicated workflows: the types this member runs (the built-in runbook), their records in
/// the store, failures judged by membership's heartbeat timeout.
pub fn workflows(cfg: &NodeConfig, cluster: &ClusterArea, log: &Logger) -> Arc<WorkflowArea> {
    Arc::new(WorkflowArea {
        table: ActorRef::default(),
        metrics: WorkflowMetrics::default(),
        settings: TableSettings {
            node: cfg.node.id,
            failure_timeout: NodeConfig::duration(cfg.cluster.heartbeat_timeout_ms),
            check_every: std::time::Duration::from_millis(250),
            retry: RetrySettings::default(),
            retention: (cfg.workflow.retention_ms > 0)
                .then(|| NodeConfig::duration(cfg.workflow.retention_ms)),
        },
        store: cluster.store.clone(),
        types: Arc::new(runbook::register(Types::new())),
        membership: cluster.membership.clone(),
        directory: cluster.directory.clone(),
        log: log.clone(),
    })
}

/// The supervision tree of a node. `/node` is rest_for_one: a later child may depend on an
/// earlier one, never the reverse.
pub fn root_spec(
    admin: Arc<AdminArea>,
    cluster: Arc<ClusterArea>,
    registry: Arc<RegistryArea>,
    translation: Arc<TranslationArea>,
    router: Arc<RouterArea>,
    balancer: Arc<BalancerParts>,
    workflows: Arc<WorkflowArea>,
) -> SupervisorSpec {
    SupervisorSpec::new(Strategy::RestForOne, move || {
        let (runs, table, workers) = workflow_specs(&workflows);
        vec![
            admin_spec(&admin),
            ChildSpec::supervisor("cluster", cluster_spec(&cluster)).0,
            ChildSpec::supervisor("registry", registry_spec(&registry)).0,
            translation_spec(&translation),
            ChildSpec::supervisor("router", router_spec(&router)).0,
            ChildSpec::supervisor("balancer", BalancerParts::supervisor(balancer.clone())).0,
            runs,
            table,
            workers,
        ]
    })
}

/// `/node/workflows` (the runs' actors, added by the table), `/node/workflow-table` after it, so
/// that a restart of the runs restarts the table that started them (rest_for_one), and
/// `/node/workers` (the external workers' actors, added by the table) after the table, so that
/// a restart of the table drops the workers it no longer knows (they connect again).
fn workflow_specs(w: &Arc<WorkflowArea>) -> (ChildSpec, ChildSpec, ChildSpec) {
    let (runs, runs_ref) = ChildSpec::supervisor(
        "workflows",
        SupervisorSpec::new(Strategy::OneForOne, Vec::new),
    );
    let (workers, workers_ref) = ChildSpec::supervisor(
        "workers",
        SupervisorSpec::new(Strategy::OneForOne, Vec::new),
    );
    let w = w.clone();
    let table = ChildSpec::actor_for("workflow-table", &w.table.clone(), move || {
        WorkflowTable::new(
            w.settings.clone(),
            Arc::new(w.store.clone()),
            w.types.clone(),
            w.table.clone(),
            runs_ref.clone(),
            workers_ref.clone(),
            w.membership.clone(),
            w.directory.clone(),
            w.metrics.clone(),
            &w.log,
        )
    });
    (runs, table, workers)
}

fn admin_spec(a: &Arc<AdminArea>) -> ChildSpec {
    let a = a.clone();
    ChildSpec::actor_for("admin", &a.admin.clone(), move || {
        AdminActor::new(
            a.actors
                .get()
                .expect("actor table set before start")
                .clone(),
            a.facts.clone(),
            a.allow_mutations,
        )
        .with_faults(a.faults.clone())
    })
    // Its own thread: a ListActors scan over 100 k actors must not delay supervision.
    .placement(Placement::Dedicated("admin"))
}

fn cluster_spec(c: &Arc<ClusterArea>) -> SupervisorSpec {
    let c = c.clone();
    SupervisorSpec::new(Strategy::RestForOne, move || {
        let raft = {
            let c = c.clone();
            ChildSpec::actor_for("raft", &c.raft.clone(), move || {
                // A member that cannot read its log must not run; the supervisor retries.
                RaftNode::new(
                    c.raft_settings.clone(),
                    c.disk.clone(),
                    c.transport.clone(),
                    c.directory.clone(),
                    &c.log,
                )
                .unwrap_or_else(|e| panic!("{e}"))
            })
            // Its own thread, so that client traffic cannot starve its ticks.
            .placement(Placement::Dedicated("raft"))
        };
        // Member actors are added by the membership actor as the topology changes.
        let (members, members_ref) = ChildSpec::supervisor(
            "members",
            SupervisorSpec::new(Strategy::OneForOne, Vec::new),
        );
        let membership = {
            let c = c.clone();
            ChildSpec::actor_for("membership", &c.membership.clone(), move || {
                Membership::new(
                    c.membership_settings.clone(),
                    c.directory.clone(),
                    members_ref.clone(),
                    c.raft.clone(),
                    c.heartbeats.clone(),
                    c.probe.clone(),
                    &c.log,
                )
                .with_faults(c.faults.clone())
            })
        };
        vec![raft, members, membership]
    })
}

fn registry_spec(r: &Arc<RegistryArea>) -> SupervisorSpec {
    let r = r.clone();
    SupervisorSpec::new(Strategy::OneForAll, move || {
        let (clients, clients_ref) = ChildSpec::supervisor(
            "clients",
            SupervisorSpec::new(Strategy::OneForOne, Vec::new),
        );
        let r = r.clone();
        let index = ChildSpec::actor_for("index", &r.index.clone(), move || {
            // Its client actors died with the previous incarnation (one_for_all).
            r.clients.write().unwrap().clear();
            RegistryIndex::new(
                r.settings.clone(),
                r.store.clone(),
                clients_ref.clone(),
                r.clients.clone(),
                Arc::new(r.store.clone()),
                r.metrics.clone(),
                &r.log,
            )
        });
        vec![clients, index]
    })
}

fn translation_spec(t: &Arc<TranslationArea>) -> ChildSpec {
    let t = t.clone();
    ChildSpec::actor_for("translation", &t.gateway.clone(), move || {
        TranslationGateway::new(t.settings.clone())
            .expect("the backend configuration is checked before start")
    })
}

fn router_spec(r: &Arc<RouterArea>) -> SupervisorSpec {
    let r = r.clone();
    SupervisorSpec::new(Strategy::OneForAll, move || {
        let (sessions, sessions_ref) = ChildSpec::supervisor(
            "sessions",
            SupervisorSpec::new(Strategy::OneForOne, Vec::new),
        );
        let r = r.clone();
        let hub = ChildSpec::actor_for("hub", &r.hub.clone(), move || {
            RouterHub::new(
                r.settings.clone(),
                r.owners.clone(),
                sessions_ref.clone(),
                r.table.clone(),
                r.metrics.clone(),
                &r.log,
            )
        });
        vec![sessions, hub]
    })
}

impl RegistryArea {
    /// What the registry's adapters reach it by.
    pub fn handle(&self) -> RegistryHandle {
        RegistryHandle::new(self.index.clone(), self.clients.clone())
    }
}
