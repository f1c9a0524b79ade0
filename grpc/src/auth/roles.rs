//! The role table: which role each RPC needs, in one place. The authentication layer applies it
//! to every call before any handler runs; `docs/security.md` prints it (a test keeps the two the
//! same), and a test checks that every method the node serves has its row.
//!
//! Some rows are refined by the handler, which alone sees the request: KV calls check the key
//! (a token's `prefixes`, and `/lodge/` being the node's own), `Tunnel.User` the operation, and
//! the registry and the balancer the caller's own registrations.

/// What a caller may be allowed to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Read-only: admin reads, topology, status, lists.
    Observer,
    /// KV reads and watches, within the token's key prefixes.
    KvRead,
    /// KV writes and leases, within the token's key prefixes.
    KvWrite,
    /// Cluster membership: add, remove, promote members.
    ClusterOperator,
    /// A registry client: register, heartbeat and unregister its own registrations; translate.
    RegistryClient,
    /// A balancer module: register, heartbeat and report for its own instance.
    Module,
    /// The balancer's routes, weights, limits, versions and scaling.
    BalancerOperator,
    /// Every role above and the router's, plus actor mutations and fault injection. Not the
    /// node's own rights: `/lodge/` stays the node's.
    Admin,
    /// The router: open an exec session.
    Exec,
    /// The router: open a port-forward session.
    PortForward,
    /// The router: open an rsync session.
    Rsync,
    /// The router: listen for sessions and join them as the agent.
    Agent,
    /// Workflows: read runs, their steps and the types.
    WorkflowRead,
    /// Workflows: start (not runbooks: those need admin), cancel and signal runs.
    WorkflowWrite,
    /// Workflows: serve types as an external worker.
    WorkflowWorker,
}

impl Role {
    /// Every role, in the order the docs list them.
    pub const ALL: [Role; 15] = [
        Role::Observer,
        Role::KvRead,
        Role::KvWrite,
        Role::ClusterOperator,
        Role::RegistryClient,
        Role::Module,
        Role::BalancerOperator,
        Role::Admin,
        Role::Exec,
        Role::PortForward,
        Role::Rsync,
        Role::Agent,
        Role::WorkflowRead,
        Role::WorkflowWrite,
        Role::WorkflowWorker,
    ];

    /// The role's name in tokens and in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Observer => "observer",
            Self::KvRead => "kv-read",
            Self::KvWrite => "kv-write",
            Self::ClusterOperator => "cluster-operator",
            Self::RegistryClient => "registry-client",
            Self::Module => "module",
            Self::BalancerOperator => "balancer-operator",
            Self::Admin => "admin",
            Self::Exec => "exec",
            Self::PortForward => "port-forward",
            Self::Rsync => "rsync",
            Self::Agent => "agent",
            Self::WorkflowRead => "workflow-read",
            Self::WorkflowWrite => "workflow-write",
            Self::WorkflowWorker => "workflow-worker",
        }
    }

    /// The role named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// A set of roles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Roles(u16);

impl Roles {
    /// No role.
    pub const NONE: Roles = Roles(0);

    /// Adds `role`.
    pub fn insert(&mut self, role: Role) {
        self.0 |= role.bit();
    }

    /// Whether the set grants `role` (admin grants every role).
    pub fn grants(self, role: Role) -> bool {
        self.0 & (role.bit() | Role::Admin.bit()) != 0
    }

    /// The roles' names, for messages.
    pub fn names(self) -> Vec<&'static str> {
        Role::ALL
            .into_iter()
            .filter(|r| self.0 & r.bit() != 0)
            .map(Role::as_str)
            .collect()
    }
}

impl FromIterator<Role> for Roles {
    fn from_iter<I: IntoIterator<Item = Role>>(iter: I) -> Self {
        let mut r = Roles::NONE;
        iter.into_iter().for_each(|role| r.insert(role));
        r
    }
}

/// Who may make a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without credentials: health checks and reflection (the API is public; the data
    /// is not).
    Public,
    /// A caller with any of these roles.
    AnyOf(&'static [Role]),
    /// Only another member of the cluster, on the peer port (raft, member heartbeats).
    Members,
}

/// One row of the table.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    /// `/package.Service/Method`.
    pub method: &'static str,
    pub access: Access,
    /// Whether the call changes anything (it goes to the audit log).
    pub mutates: bool,
    /// What the handler checks beyond the role, for the docs.
    pub refined: &'static str,
}

const fn rule(method: &'static str, access: Access, mutates: bool, refined: &'static str) -> Rule {
    Rule {
        method,
        access,
        mutates,
        refined,
    }
}

use Access::{AnyOf, Members, Public};
use Role::*;

const READ: Access = AnyOf(&[Observer]);
const KEY_SCOPE: &str =
    "the key or range must lie within the token's prefixes; `/lodge/` is the node's";
const OWN_CLIENT: &str = "only registrations made by the same subject";
const OWN_MODULE: &str = "only the token's own instance (`sub`, or `instances`); data address within `auth.module_networks`";

/// The table. Methods not in it are refused to anonymous callers and answered UNIMPLEMENTED to
/// others (the node does not serve them).
pub const TABLE: &[Rule] = &[
    rule("/grpc.health.v1.Health/Check", Public, false, ""),
    rule("/grpc.health.v1.Health/Watch", Public, false, ""),
    rule("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", Public, false, ""),
    rule("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", Public, false, ""),
    rule("/lodge.admin.v1.Admin/ListActors", READ, false, ""),
    rule("/lodge.admin.v1.Admin/GetActor", READ, false, ""),
    rule("/lodge.admin.v1.Admin/Tree", READ, false, ""),
    rule("/lodge.admin.v1.Admin/WatchEvents", READ, false, ""),
    rule("/lodge.admin.v1.Admin/NodeInfo", READ, false, ""),
    rule("/lodge.admin.v1.Admin/RestartActor", AnyOf(&[Admin]), true, "and `admin.allow_mutations`"),
    rule("/lodge.admin.v1.Admin/StopActor", AnyOf(&[Admin]), true, "and `admin.allow_mutations`"),
    rule("/lodge.admin.v1.Admin/InjectFaults", AnyOf(&[Admin]), true, "and `admin.allow_mutations`"),
    rule("/lodge.kv.v1.KV/Range", AnyOf(&[KvRead]), false, KEY_SCOPE),
    rule("/lodge.kv.v1.KV/Watch", AnyOf(&[KvRead]), false, KEY_SCOPE),
    rule("/lodge.kv.v1.KV/Put", AnyOf(&[KvWrite]), true, KEY_SCOPE),
    rule("/lodge.kv.v1.KV/DeleteRange", AnyOf(&[KvWrite]), true, KEY_SCOPE),
    rule("/lodge.kv.v1.KV/Txn", AnyOf(&[KvRead, KvWrite]), true, "kv-read for each key compared or read, kv-write for each key written; within the token's prefixes"),
    rule("/lodge.kv.v1.KV/LeaseGrant", AnyOf(&[KvWrite]), true, ""),
    rule("/lodge.kv.v1.KV/LeaseRevoke", AnyOf(&[KvWrite]), true, "kv-write on every key attached to the lease (so never the node's own)"),
    rule("/lodge.kv.v1.KV/LeaseKeepAlive", AnyOf(&[KvWrite]), false, ""),
    rule("/lodge.kv.v1.KV/LeaseTimeToLive", AnyOf(&[KvRead]), false, ""),
    rule("/lodge.cluster.v1.Cluster/GetTopology", READ, false, ""),
    rule("/lodge.cluster.v1.Cluster/WatchTopology", READ, false, ""),
    rule("/lodge.cluster.v1.Cluster/Status", READ, false, ""),
    rule("/lodge.cluster.v1.Cluster/RegisterNode", AnyOf(&[ClusterOperator]), true, ""),
    rule("/lodge.cluster.v1.Cluster/DeregisterNode", AnyOf(&[ClusterOperator]), true, ""),
    rule("/lodge.cluster.v1.Cluster/PromoteNode", AnyOf(&[ClusterOperator]), true, ""),
    rule("/lodge.cluster.v1.Cluster/Heartbeat", Members, false, ""),
    rule("/lodge.raft.v1.Raft/Send", Members, false, ""),
    rule("/lodge.raft.v1.Raft/Snapshot", Members, false, ""),
    rule("/lodge.raft.v1.Raft/Propose", Members, false, ""),
    rule("/lodge.raft.v1.Raft/Read", Members, false, ""),
    rule("/lodge.registry.v1.Registry/RegisterClient", AnyOf(&[RegistryClient]), true, ""),
    rule("/lodge.registry.v1.Registry/Heartbeat", AnyOf(&[RegistryClient]), false, OWN_CLIENT),
    rule("/lodge.registry.v1.Registry/UnregisterClient", AnyOf(&[RegistryClient]), true, OWN_CLIENT),
    rule("/lodge.registry.v1.Registry/ListClients", READ, false, ""),
    rule("/lodge.registry.v1.Registry/GetClient", AnyOf(&[Observer, RegistryClient]), false, "a registry client: only its own"),
    rule("/lodge.registry.v1.Translation/CheckTitle", AnyOf(&[RegistryClient]), false, ""),
    rule("/lodge.registry.v1.Translation/Translate", AnyOf(&[RegistryClient]), false, OWN_CLIENT),
    rule("/lodge.registry.v1.Translation/TranslateStream", AnyOf(&[RegistryClient]), false, OWN_CLIENT),
    rule("/lodge.router.v1.Tunnel/User", AnyOf(&[Exec, PortForward, Rsync]), false, "the role of the session's operation; the token's `workflows`"),
    rule("/lodge.router.v1.Tunnel/Agent", AnyOf(&[Agent]), false, "the token's `workflows`"),
    rule("/lodge.router.v1.Tunnel/Listen", AnyOf(&[Agent]), false, "the token's `workflows`"),
    rule("/lodge.router.v1.RouterControl/GetSessionInfo", READ, false, "the token's `workflows`"),
    rule("/lodge.router.v1.RouterControl/ListSessions", READ, false, "the token's `workflows`"),
    rule("/lodge.router.v1.RouterControl/TerminateSession", AnyOf(&[Admin]), true, "the token's `workflows`"),
    rule("/lodge.balancer.v1.Balancer/RegisterModule", AnyOf(&[Module]), true, OWN_MODULE),
    rule("/lodge.balancer.v1.Balancer/UnregisterModule", AnyOf(&[Module, BalancerOperator]), true, "a module: only its own instance"),
    rule("/lodge.balancer.v1.Balancer/Heartbeat", AnyOf(&[Module]), false, "only the token's own instance"),
    rule("/lodge.balancer.v1.Balancer/ReportMetrics", AnyOf(&[Module]), false, "only the token's own instance"),
    rule("/lodge.balancer.v1.Balancer/RouteRequest", AnyOf(&[Module, Observer]), false, ""),
    rule("/lodge.balancer.v1.Balancer/ListModules", READ, false, ""),
    rule("/lodge.balancer.v1.Balancer/GetModuleInfo", READ, false, ""),
    rule("/lodge.balancer.v1.Balancer/GetRoutingTable", AnyOf(&[Observer, Module]), false, ""),
    rule("/lodge.balancer.v1.Balancer/ValidateRoute", AnyOf(&[Observer, BalancerOperator]), false, ""),
    rule("/lodge.balancer.v1.Balancer/GetNLBMetrics", READ, false, ""),
    rule("/lodge.balancer.v1.Balancer/GetModuleMetrics", READ, false, ""),
    rule("/lodge.balancer.v1.Balancer/StreamNLBMetrics", READ, false, ""),
    rule("/lodge.balancer.v1.Balancer/CheckHealth", READ, false, ""),
    rule("/lodge.balancer.v1.Balancer/GetNLBStatus", READ, false, ""),
    rule("/lodge.balancer.v1.Balancer/GetNLBConfig", AnyOf(&[Observer, Module]), false, ""),
    rule("/lodge.balancer.v1.Balancer/GetLoadDistribution", READ, false, ""),
    rule("/lodge.balancer.v1.Balancer/GetActiveVersion", AnyOf(&[Observer, Module]), false, ""),
    rule("/lodge.balancer.v1.Balancer/GetRateLimits", AnyOf(&[Observer, Module]), false, ""),
    rule("/lodge.balancer.v1.Balancer/GetScalingConfig", READ, false, ""),
    rule("/lodge.balancer.v1.Balancer/UpdateRouting", AnyOf(&[BalancerOperator]), true, ""),
    rule("/lodge.balancer.v1.Balancer/UpdateNLBConfig", AnyOf(&[BalancerOperator]), true, ""),
    rule("/lodge.balancer.v1.Balancer/RebalanceLoad", AnyOf(&[BalancerOperator]), true, ""),
    rule("/lodge.balancer.v1.Balancer/TriggerScaling", AnyOf(&[BalancerOperator]), true, ""),
    rule("/lodge.balancer.v1.Balancer/SetTrafficWeight", AnyOf(&[BalancerOperator]), true, ""),
    rule("/lodge.balancer.v1.Balancer/PromoteVersion", AnyOf(&[BalancerOperator]), true, ""),
    rule("/lodge.balancer.v1.Balancer/Rollback", AnyOf(&[BalancerOperator]), true, ""),
    rule("/lodge.balancer.v1.Balancer/SetRateLimit", AnyOf(&[BalancerOperator]), true, ""),
    rule("/lodge.balancer.v1.Balancer/RemoveRateLimit", AnyOf(&[BalancerOperator]), true, ""),
    rule("/lodge.balancer.v1.Balancer/SetScalingConfig", AnyOf(&[BalancerOperator]), true, ""),
    rule("/lodge.workflow.v1.Workflow/Start", AnyOf(&[WorkflowWrite]), true, "the `runbook` type (shell commands on the owner) needs admin"),
    rule("/lodge.workflow.v1.Workflow/Get", AnyOf(&[Observer, WorkflowRead]), false, ""),
    rule("/lodge.workflow.v1.Workflow/List", AnyOf(&[Observer, WorkflowRead]), false, ""),
    rule("/lodge.workflow.v1.Workflow/ListTypes", AnyOf(&[Observer, WorkflowRead]), false, ""),
    rule("/lodge.workflow.v1.Workflow/Watch", AnyOf(&[Observer, WorkflowRead]), false, ""),
    rule("/lodge.workflow.v1.Workflow/Cancel", AnyOf(&[WorkflowWrite]), true, ""),
    rule("/lodge.workflow.v1.Workflow/Signal", AnyOf(&[WorkflowWrite]), true, ""),
    rule("/lodge.workflow.v1.Workflow/Work", AnyOf(&[WorkflowWorker]), false, ""),
];

/// The row of `method`, if the node knows it (looked up on every call: a map, not a scan).
pub fn rule_of(method: &str) -> Option<&'static Rule> {
    static BY_METHOD: std::sync::OnceLock<std::collections::HashMap<&'static str, &'static Rule>> =
        std::sync::OnceLock::new();
    BY_METHOD
        .get_or_init(|| TABLE.iter().map(|r| (r.method, r)).collect())
        .get(method)
        .copied()
}

/// The table as Markdown, as `docs/security.md` prints it.
pub fn markdown() -> String {
    let mut out =
        String::from("| Method | Who may call | Audited | Also checked |\n|---|---|---|---|\n");
    for r in TABLE {
        let who = match r.access {
            Public => "anyone".to_string(),
            Members => "cluster members (peer port)".to_string(),
            AnyOf(roles) => roles
                .iter()
                .map(|r| format!("`{}`", r.as_str()))
                .collect::<Vec<_>>()
                .join(" or "),
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            r.method.trim_start_matches('/'),
            who,
            if r.mutates { "yes" } else { "" },
            r.refined
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_the_node_serves_has_a_row_and_every_row_is_served() {
        let served = crate::served::node_methods();
        for m in &served {
            assert!(rule_of(m).is_some(), "{m} has no row in auth::roles::TABLE");
        }
        for r in TABLE {
            let known = served.contains(r.method) || r.method.starts_with("/lodge.raft.v1.Raft/");
            assert!(known, "{} is in the table but not served", r.method);
        }
    }

    #[test]
    fn docs_security_prints_the_table() {
        let doc = include_str!("../../../docs/security.md");
        assert!(
            doc.contains(&markdown()),
            "docs/security.md's role table differs from auth::roles::TABLE; paste:\n{}",
            markdown()
        );
    }

    #[test]
    fn role_names_round_trip_and_admin_grants_all() {
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        let admin: Roles = [Role::Admin].into_iter().collect();
        assert!(Role::ALL.iter().all(|r| admin.grants(*r)));
        let kv: Roles = [Role::KvRead].into_iter().collect();
        assert!(kv.grants(Role::KvRead) && !kv.grants(Role::KvWrite));
        assert_eq!(
            Role::parse("node"),
            None,
            "the node's rights are not a token role"
        );
    }
}
