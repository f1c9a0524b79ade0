//! `/node/admin`: answers the admin RPC from the actor table and relays mutating requests to the
//! supervisor of the target actor.

use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Context, Handler, Message, ResponseFuture};
use tokio::sync::broadcast;

use crate::envelope::ActorRef;
use crate::introspect::{ActorEvent, ActorSnapshot, ActorTable, ListQuery, TreeNode};
use crate::quote::echo;
use crate::supervision::{ChildError, Managed, RestartChild, StopChild, Supervisor};

impl From<ChildError> for AdminError {
    fn from(e: ChildError) -> Self {
        match e {
            ChildError::NotFound(m) => Self::NotFound(m),
            ChildError::Busy(m) => Self::Aborted(m),
            ChildError::Stopping(m) => Self::Unavailable(m),
            ChildError::Failed(m) => Self::Internal(m),
        }
    }
}

/// How long `GetActor` waits for an actor's state dump: a busy or stuck actor must not hang the
/// admin RPC, so its figures are returned without the dump.
const DUMP_TIMEOUT: Duration = Duration::from_secs(1);

/// Errors of admin requests, mapped one-to-one onto gRPC codes by the adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminError {
    /// No actor at that path.
    NotFound(String),
    /// Mutations are disabled (`admin.allow_mutations = false`).
    PermissionDenied(String),
    /// The request cannot apply to that actor (the root, say).
    FailedPrecondition(String),
    /// The supervisor could not do it now.
    Unavailable(String),
    /// A conflicting change was under way; the caller may try again.
    Aborted(String),
    /// The actor did not come back up after a restart.
    Internal(String),
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotFound(m)
            | Self::PermissionDenied(m)
            | Self::FailedPrecondition(m)
            | Self::Unavailable(m)
            | Self::Aborted(m)
            | Self::Internal(m) => f.write_str(m),
        }
    }
}

/// Static facts about the node for `NodeInfo`.
#[derive(Clone, Debug)]
pub struct NodeFacts {
    pub node_id: u64,
    pub version: String,
    pub started_at_ms: u64,
    /// Effective configuration with secrets removed, as JSON.
    pub config_json: String,
}

/// The admin actor.
pub struct AdminActor {
    actors: ActorTable,
    facts: Arc<NodeFacts>,
    allow_mutations: bool,
    faults: Option<crate::cluster::fault::Faults>,
}

impl AdminActor {
    /// An admin actor over `actors`.
    pub fn new(actors: ActorTable, facts: Arc<NodeFacts>, allow_mutations: bool) -> Self {
        Self {
            actors,
            facts,
            allow_mutations,
            faults: None,
        }
    }

    /// Lets the admin RPC set injected faults on this member's raft traffic and storage.
    pub fn with_faults(mut self, faults: crate::cluster::fault::Faults) -> Self {
        self.faults = Some(faults);
        self
    }

    fn check_allowed(&self) -> Result<(), AdminError> {
        if self.allow_mutations {
            Ok(())
        } else {
            Err(AdminError::PermissionDenied(
                "mutating admin calls are disabled; set admin.allow_mutations = true to enable them".into(),
            ))
        }
    }

    /// The supervisor of `path` and the child's name there, if mutations are allowed.
    fn mutation_target(&self, path: &str) -> Result<(ActorRef<Supervisor>, String), AdminError> {
        let (parent, name) = self.check_mutation(path)?;
        let sup = self.actors.supervisor(&parent).ok_or_else(|| {
            AdminError::Unavailable(format!("supervisor {parent} is not running"))
        })?;
        Ok((sup, name))
    }

    fn check_mutation(&self, path: &str) -> Result<(String, String), AdminError> {
        self.check_allowed()?;
        let cell = self
            .actors
            .get(path)
            .ok_or_else(|| AdminError::NotFound(format!("no actor at path {}", echo(path))))?;
        let parent = cell.parent().ok_or_else(|| {
            AdminError::FailedPrecondition(format!(
                "{path} is the root supervisor; restart or stop the node process instead"
            ))
        })?;
        let name = path[parent.len() + 1..].to_string();
        Ok((parent.to_string(), name))
    }
}

impl Actor for AdminActor {
    type Context = Context<Self>;
}

impl Managed for AdminActor {
    const KIND: &'static str = "admin";

    fn dump_state(&self) -> serde_json::Value {
        serde_json::json!({
            "allow_mutations": self.allow_mutations,
            "actors": self.actors.len(),
        })
    }
}

/// `ListActors`.
#[derive(Message)]
#[rtype(result = "Result<ListReply, AdminError>")]
pub struct ListActors(pub ListQuery);

/// Rows of a `ListActors` answer.
pub struct ListReply {
    pub actors: Vec<ActorSnapshot>,
    /// Matches before the limit was applied.
    pub matched: usize,
}

/// `GetActor`.
#[derive(Message)]
#[rtype(result = "Result<ActorDetail, AdminError>")]
pub struct GetActor {
    pub path: String,
}

/// One actor in full.
pub struct ActorDetail {
    pub snapshot: ActorSnapshot,
    pub children: Vec<Arc<str>>,
    /// The actor's state dump; `None` if it is not running or did not answer in time.
    pub state: Option<serde_json::Value>,
}

/// `Tree`.
#[derive(Message)]
#[rtype(result = "Result<TreeNode, AdminError>")]
pub struct Tree {
    pub root: String,
    /// Levels below the root; 0 = all.
    pub depth: usize,
}

/// `NodeInfo`.
#[derive(Message)]
#[rtype(result = "Result<Arc<NodeFacts>, AdminError>")]
pub struct GetNodeInfo;

/// `RestartActor`; answers the new restart count.
#[derive(Message)]
#[rtype(result = "Result<u32, AdminError>")]
pub struct RestartActor {
    pub path: String,
}

/// `StopActor`.
#[derive(Message)]
#[rtype(result = "Result<(), AdminError>")]
pub struct StopActor {
    pub path: String,
}

/// `WatchEvents`: a receiver of lifecycle events from now on.
#[derive(Message)]
#[rtype(result = "Result<broadcast::Receiver<ActorEvent>, AdminError>")]
pub struct Subscribe;

/// `InjectFaults`: replaces the faults in force; answers them.
#[derive(Message)]
#[rtype(result = "Result<crate::cluster::fault::FaultRules, AdminError>")]
pub struct InjectFaults(pub crate::cluster::fault::FaultRules);

impl Handler<InjectFaults> for AdminActor {
    type Result = Result<crate::cluster::fault::FaultRules, AdminError>;

    fn handle(&mut self, msg: InjectFaults, _: &mut Context<Self>) -> Self::Result {
        self.check_allowed()?;
        let faults = self.faults.as_ref().ok_or_else(|| {
            AdminError::FailedPrecondition(
                "this node has no raft member to inject faults into".into(),
            )
        })?;
        faults.set(msg.0);
        Ok(faults.rules())
    }
}

crate::handles!(AdminActor: InjectFaults);

crate::handles!(AdminActor: ListActors, GetActor, Tree, GetNodeInfo, RestartActor, StopActor, Subscribe);

impl Handler<ListActors> for AdminActor {
    type Result = Result<ListReply, AdminError>;

    fn handle(&mut self, msg: ListActors, _: &mut Context<Self>) -> Self::Result {
        let (actors, matched) = self.actors.list(&msg.0);
        Ok(ListReply { actors, matched })
    }
}

impl Handler<GetActor> for AdminActor {
    type Result = ResponseFuture<Result<ActorDetail, AdminError>>;

    fn handle(&mut self, msg: GetActor, _: &mut Context<Self>) -> Self::Result {
        let found = self.actors.get(&msg.path).map(|cell| {
            let snapshot = ActorTable::snapshot(&cell);
            let children = self.actors.children(&msg.path);
            let dump = cell.request_dump();
            (snapshot, children, dump)
        });
        Box::pin(async move {
            let (snapshot, children, dump) = found.ok_or_else(|| {
                AdminError::NotFound(format!("no actor at path {}", echo(&msg.path)))
            })?;
            // The dump comes from the actor's own thread; it never blocks this one.
            let state = match dump {
                Some(rx) => tokio::time::timeout(DUMP_TIMEOUT, rx)
                    .await
                    .ok()
                    .and_then(Result::ok),
                None => None,
            };
            Ok(ActorDetail {
                snapshot,
                children,
                state,
            })
        })
    }
}

impl Handler<Tree> for AdminActor {
    type Result = Result<TreeNode, AdminError>;

    fn handle(&mut self, msg: Tree, _: &mut Context<Self>) -> Self::Result {
        let root = if msg.root.is_empty() {
            crate::runtime::ROOT_PATH
        } else {
            &msg.root
        };
        self.actors
            .tree(root, msg.depth)
            .ok_or_else(|| AdminError::NotFound(format!("no actor at path {}", echo(root))))
    }
}

impl Handler<GetNodeInfo> for AdminActor {
    type Result = Result<Arc<NodeFacts>, AdminError>;

    fn handle(&mut self, _: GetNodeInfo, _: &mut Context<Self>) -> Self::Result {
        Ok(self.facts.clone())
    }
}

impl Handler<RestartActor> for AdminActor {
    type Result = ResponseFuture<Result<u32, AdminError>>;

    fn handle(&mut self, msg: RestartActor, _: &mut Context<Self>) -> Self::Result {
        ask_supervisor(self.mutation_target(&msg.path), |name| RestartChild {
            name,
        })
    }
}

impl Handler<StopActor> for AdminActor {
    type Result = ResponseFuture<Result<(), AdminError>>;

    fn handle(&mut self, msg: StopActor, _: &mut Context<Self>) -> Self::Result {
        ask_supervisor(self.mutation_target(&msg.path), |name| StopChild { name })
    }
}

/// Sends an operator request to the supervisor of the target. A plain future, not tied to the
/// admin actor: restarting /node/admin itself still answers.
fn ask_supervisor<M, T>(
    target: Result<(ActorRef<Supervisor>, String), AdminError>,
    request: impl FnOnce(String) -> M,
) -> ResponseFuture<Result<T, AdminError>>
where
    M: Message<Result = Result<T, ChildError>> + Send + 'static,
    T: Send + 'static,
    Supervisor: Handler<crate::Envelope<M>>,
{
    let sent = target.map(|(sup, name)| (sup, request(name)));
    Box::pin(async move {
        let (sup, msg) = sent?;
        sup.send(msg)
            .await
            .map_err(|e| AdminError::Unavailable(e.to_string()))?
            .map_err(AdminError::from)
    })
}

impl Handler<Subscribe> for AdminActor {
    type Result = Result<broadcast::Receiver<ActorEvent>, AdminError>;

    fn handle(&mut self, _: Subscribe, _: &mut Context<Self>) -> Self::Result {
        Ok(self.actors.subscribe())
    }
}
