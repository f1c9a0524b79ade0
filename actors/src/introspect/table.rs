//! The node's directory of actors: path → cell, plus the lifecycle event stream.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use crate::envelope::ActorRef;
use tokio::sync::broadcast;
use wildmatch::WildMatch;

use super::cell::{ActorCell, Failure, Lifecycle};
use crate::clock;
use crate::supervision::Supervisor;

/// What happened to an actor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Started for the first time.
    Started,
    /// Stopped on request or at shutdown.
    Stopped,
    /// Panicked, failed or exited unexpectedly.
    Failed,
    /// Started again by its supervisor.
    Restarted,
}

/// A lifecycle event, as streamed by `WatchEvents`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ActorEvent {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Actor path.
    pub path: Arc<str>,
    /// Actor kind.
    pub kind: &'static str,
    /// What happened.
    pub event: EventKind,
    /// Failure reason or stop cause, when there is one.
    pub reason: Option<String>,
    /// The actor's restart count after the event.
    pub restarts: u32,
}

/// A point-in-time copy of an actor's figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ActorSnapshot {
    pub path: Arc<str>,
    pub kind: &'static str,
    pub parent: Option<Arc<str>>,
    pub state: Lifecycle,
    pub queue_len: u64,
    pub messages_handled: u64,
    pub message_rate: f64,
    pub restarts: u32,
    pub last_failure: Option<Failure>,
    pub started_at_ms: u64,
    pub last_activity_ms: u64,
    pub latency_p50_us: Option<f64>,
    pub latency_p99_us: Option<f64>,
}

/// How `list` orders its answer. Numeric keys sort descending (the busiest first).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortKey {
    /// By path, ascending.
    #[default]
    Path,
    /// Longest mailbox first.
    QueueLen,
    /// Most restarted first.
    Restarts,
    /// Highest message rate first.
    MessageRate,
}

/// A `ListActors` query.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    /// Glob over paths (`*` and `?`); empty matches all.
    pub path_glob: String,
    /// Exact kind; empty matches all.
    pub kind: String,
    /// Ordering.
    pub sort: SortKey,
    /// Maximum number of rows; 0 means no limit.
    pub limit: usize,
}

/// One node of a `Tree` answer.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TreeNode {
    pub path: Arc<str>,
    pub kind: &'static str,
    pub state: Lifecycle,
    pub restarts: u32,
    pub children: Vec<TreeNode>,
}

/// Per-kind totals that outlive the actors they count (so the exported counters never go down).
#[derive(Clone, Copy, Debug, Default)]
pub struct KindTotals {
    /// Live actors of the kind.
    pub live: u64,
    /// Messages handled by live and removed actors.
    pub messages: u64,
    /// Messages waiting in live actors' mailboxes.
    pub queued: u64,
    /// Failures seen.
    pub failures: u64,
    /// Restarts done.
    pub restarts: u64,
}

struct Inner {
    actors: RwLock<BTreeMap<Arc<str>, Arc<ActorCell>>>,
    supervisors: RwLock<HashMap<Arc<str>, ActorRef<Supervisor>>>,
    events: broadcast::Sender<ActorEvent>,
    totals: Mutex<HashMap<&'static str, KindTotals>>,
}

/// Shared handle to the node's actor table: every live actor's cell by path, the supervisors
/// by path, lifecycle events and totals per kind. (Not the client registry,
/// [`crate::registry`], which holds the registrations of applications.)
#[derive(Clone)]
pub struct ActorTable {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ActorTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActorTable")
            .field("actors", &self.len())
            .finish()
    }
}

impl Default for ActorTable {
    fn default() -> Self {
        Self::new()
    }
}

/// Events kept for slow watchers before they are told they lagged.
const EVENT_BUFFER: usize = 4096;

impl ActorTable {
    /// An empty table.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                actors: RwLock::new(BTreeMap::new()),
                supervisors: RwLock::new(HashMap::new()),
                events: broadcast::channel(EVENT_BUFFER).0,
                totals: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Adds a cell; fails if its path is taken.
    pub fn register(&self, cell: Arc<ActorCell>) -> Result<(), String> {
        let mut map = self.inner.actors.write().unwrap();
        if map.contains_key(cell.path()) {
            return Err(format!("an actor is already registered at {}", cell.path()));
        }
        map.insert(cell.path().clone(), cell);
        Ok(())
    }

    /// Removes `cell` from its path, folding its message count into the per-kind totals. Does
    /// nothing if another cell has taken the path since (a newer incarnation of its supervisor).
    pub fn deregister(&self, cell: &Arc<ActorCell>) {
        let path = cell.path();
        {
            let mut map = self.inner.actors.write().unwrap();
            if !map.get(path).is_some_and(|c| Arc::ptr_eq(c, cell)) {
                return;
            }
            map.remove(path);
        }
        let mut totals = self.inner.totals.lock().unwrap();
        totals.entry(cell.kind()).or_default().messages += cell.messages_handled();
        drop(totals);
        self.inner.supervisors.write().unwrap().remove(path);
    }

    /// Publishes a lifecycle event.
    pub fn emit(&self, cell: &ActorCell, event: EventKind, reason: Option<String>) {
        if matches!(event, EventKind::Failed | EventKind::Restarted) {
            let mut totals = self.inner.totals.lock().unwrap();
            let t = totals.entry(cell.kind()).or_default();
            match event {
                EventKind::Failed => t.failures += 1,
                _ => t.restarts += 1,
            }
        }
        // An error only means nobody is watching.
        let _ = self.inner.events.send(ActorEvent {
            at_ms: clock::precise_ms(),
            path: cell.path().clone(),
            kind: cell.kind(),
            event,
            reason,
            restarts: cell.restarts(),
        });
    }

    /// A receiver of every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ActorEvent> {
        self.inner.events.subscribe()
    }

    /// The cell at `path`.
    pub fn get(&self, path: &str) -> Option<Arc<ActorCell>> {
        self.inner.actors.read().unwrap().get(path).cloned()
    }

    /// Number of registered actors.
    pub fn len(&self) -> usize {
        self.inner.actors.read().unwrap().len()
    }

    /// Whether no actor is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn set_supervisor(&self, path: Arc<str>, addr: ActorRef<Supervisor>) {
        self.inner.supervisors.write().unwrap().insert(path, addr);
    }

    /// The supervisor at `path`, to add children to or restart them through.
    pub fn supervisor(&self, path: &str) -> Option<ActorRef<Supervisor>> {
        self.inner.supervisors.read().unwrap().get(path).cloned()
    }

    /// Figures of one actor.
    pub fn snapshot(cell: &ActorCell) -> ActorSnapshot {
        ActorSnapshot {
            path: cell.path().clone(),
            kind: cell.kind(),
            parent: cell.parent().cloned(),
            state: cell.state(),
            queue_len: cell.queue_len(),
            messages_handled: cell.messages_handled(),
            message_rate: cell.message_rate(),
            restarts: cell.restarts(),
            last_failure: cell.last_failure(),
            started_at_ms: cell.started_at_ms(),
            last_activity_ms: cell.last_activity_ms(),
            latency_p50_us: cell.latency_us(0.5),
            latency_p99_us: cell.latency_us(0.99),
        }
    }

    /// Actors matching `q`, ordered and limited, and how many matched before the limit.
    pub fn list(&self, q: &ListQuery) -> (Vec<ActorSnapshot>, usize) {
        let glob = (!q.path_glob.is_empty()).then(|| WildMatch::new(&q.path_glob));
        let mut rows: Vec<(f64, Arc<ActorCell>)> = {
            let map = self.inner.actors.read().unwrap();
            map.values()
                .filter(|c| q.kind.is_empty() || c.kind() == q.kind)
                .filter(|c| glob.as_ref().is_none_or(|g| g.matches(c.path())))
                .map(|c| (0.0, c.clone()))
                .collect()
        };
        let matched = rows.len();
        if q.sort != SortKey::Path {
            for (key, c) in rows.iter_mut() {
                *key = match q.sort {
                    SortKey::QueueLen => c.queue_len() as f64,
                    SortKey::Restarts => c.restarts() as f64,
                    SortKey::MessageRate => c.message_rate(),
                    SortKey::Path => 0.0,
                };
            }
            // Stable: ties keep path order.
            rows.sort_by(|a, b| b.0.total_cmp(&a.0));
        }
        if q.limit > 0 {
            rows.truncate(q.limit);
        }
        let snaps = rows.iter().map(|(_, c)| Self::snapshot(c)).collect();
        (snaps, matched)
    }

    /// Paths of the actors `path` supervises directly.
    pub fn children(&self, path: &str) -> Vec<Arc<str>> {
        let prefix = format!("{path}/");
        let map = self.inner.actors.read().unwrap();
        map.range::<str, _>((
            std::ops::Bound::Included(prefix.as_str()),
            std::ops::Bound::Unbounded,
        ))
        .take_while(|(k, _)| k.starts_with(&prefix))
        .filter(|(_, c)| c.parent().map(|p| &**p) == Some(path))
        .map(|(k, _)| k.clone())
        .collect()
    }

    /// The subtree at `root`, `depth` levels deep (0 = all).
    pub fn tree(&self, root: &str, depth: usize) -> Option<TreeNode> {
        let prefix = format!("{root}/");
        let map = self.inner.actors.read().unwrap();
        let root_cell = map.get(root)?.clone();
        let mut by_parent: HashMap<&str, Vec<&Arc<ActorCell>>> = HashMap::new();
        for (_, c) in map
            .range::<str, _>((
                std::ops::Bound::Included(prefix.as_str()),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(&prefix))
        {
            if let Some(p) = c.parent() {
                by_parent.entry(p).or_default().push(c);
            }
        }
        fn build(
            c: &ActorCell,
            by_parent: &HashMap<&str, Vec<&Arc<ActorCell>>>,
            depth_left: Option<usize>,
        ) -> TreeNode {
            let children = match depth_left {
                Some(0) => Vec::new(),
                _ => by_parent
                    .get(&**c.path())
                    .map(|kids| {
                        kids.iter()
                            .map(|k| build(k, by_parent, depth_left.map(|d| d - 1)))
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            TreeNode {
                path: c.path().clone(),
                kind: c.kind(),
                state: c.state(),
                restarts: c.restarts(),
                children,
            }
        }
        let depth_left = (depth > 0).then_some(depth);
        Some(build(&root_cell, &by_parent, depth_left))
    }

    /// Totals per actor kind, for the metrics page.
    pub fn kind_totals(&self) -> Vec<(&'static str, KindTotals)> {
        let mut out: HashMap<&'static str, KindTotals> = self.inner.totals.lock().unwrap().clone();
        for t in out.values_mut() {
            t.live = 0;
            t.queued = 0;
        }
        for c in self.inner.actors.read().unwrap().values() {
            let t = out.entry(c.kind()).or_default();
            t.live += 1;
            t.queued += c.queue_len();
            t.messages += c.messages_handled();
        }
        let mut v: Vec<_> = out.into_iter().collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(path: &str, kind: &'static str, parent: Option<&str>) -> Arc<ActorCell> {
        Arc::new(ActorCell::new(path.into(), kind, parent.map(Into::into)))
    }

    fn sample() -> ActorTable {
        let r = ActorTable::new();
        r.register(cell("/node", "supervisor", None)).unwrap();
        r.register(cell("/node/admin", "admin", Some("/node")))
            .unwrap();
        r.register(cell("/node/registry", "supervisor", Some("/node")))
            .unwrap();
        r.register(cell(
            "/node/registry/clients/a",
            "client",
            Some("/node/registry"),
        ))
        .unwrap();
        r.register(cell(
            "/node/registry/clients/b",
            "client",
            Some("/node/registry"),
        ))
        .unwrap();
        r
    }

    #[test]
    fn duplicate_paths_are_refused() {
        let r = sample();
        assert!(r
            .register(cell("/node/admin", "admin", Some("/node")))
            .is_err());
    }

    #[test]
    fn list_filters_by_glob_and_kind_and_sorts_by_restarts() {
        let r = sample();
        r.get("/node/registry/clients/b").unwrap().count_restart();
        let q = ListQuery {
            path_glob: "/node/registry/*".into(),
            kind: "client".into(),
            sort: SortKey::Restarts,
            limit: 1,
        };
        let (rows, matched) = r.list(&q);
        assert_eq!(matched, 2);
        assert_eq!(rows.len(), 1);
        assert_eq!(&*rows[0].path, "/node/registry/clients/b");
    }

    #[test]
    fn tree_groups_by_supervisor_and_honours_depth() {
        let r = sample();
        let t = r.tree("/node", 0).unwrap();
        assert_eq!(t.children.len(), 2);
        let reg = t
            .children
            .iter()
            .find(|c| &*c.path == "/node/registry")
            .unwrap();
        assert_eq!(reg.children.len(), 2);
        let shallow = r.tree("/node", 1).unwrap();
        assert!(shallow.children.iter().all(|c| c.children.is_empty()));
        assert_eq!(r.children("/node/registry").len(), 2);
        assert!(r.tree("/nope", 0).is_none());
    }

    #[test]
    fn kind_totals_keep_messages_of_removed_actors() {
        let r = sample();
        let c = r.get("/node/registry/clients/a").unwrap();
        c.begin_handling();
        c.begin_handling();
        // A stranger cell at the same path removes nothing.
        r.deregister(&cell(
            "/node/registry/clients/a",
            "client",
            Some("/node/registry"),
        ));
        assert!(r.get("/node/registry/clients/a").is_some());
        r.deregister(&c);
        let totals = r.kind_totals();
        let client = totals.iter().find(|(k, _)| *k == "client").unwrap().1;
        assert_eq!(client.live, 1);
        assert_eq!(client.messages, 2);
    }
}
