//! The balancer's operations, as the gRPC adapter and the data plane call them.
//!
//! Reads and decisions use the published [`View`]. Writes go to the replicated store with a
//! compare on the record's revision (so two nodes changing the same record never lose either
//! change: the loser reads again and reapplies), then wait until this node has applied them, so
//! an acknowledged write is visible to the next call here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::decide::{capabilities, Ask, Decider, Decision, CAN_HANDLE_TIMEOUT};
use super::flow::{Flow, ModuleType, Protocol};
use super::hook::DeployHook;
use super::instance::{Capability, Instance};
use super::metrics::{BalancerMetrics, ScalingLabels};
use super::model::{
    decode, encode, BalancerSettings, ControlToken, DecisionRecord, HealthCheckSpec, Instructions,
    Key, LimitTarget, LimitsRecord, LoadReport, MetricPoint, ModuleRecord, RateLimitSpec,
    ReportedHealth, RoutesRecord, ScalingRecord, Stats,
};
use super::module::{Drain, Drained};
use super::probe::ModuleProbe;
use super::route::{validate_route_id, CompiledRoute, Route, RoutingTable};
use super::scaler::{self, Direction, InstanceLoad, ScalingConfig};
use super::score::{balance_score, shed_plan};
use super::state::{BalancerState, WaitFor};
use super::traffic::{TrafficError, TrafficRecord};
use super::view::{Published, Versioned, View};
use super::{now_ms, BalancerError};
use crate::cluster::kv::{Cmp, Compare, KeyValue, Op, Target};
use crate::cluster::store::Store;
use crate::envelope::{ActorRef, SendError};
use crate::quote::echo;

/// Times a compare-and-swap is retried against concurrent writers before giving up.
const CAS_ATTEMPTS: usize = 8;
/// Instructions kept for an instance that does not heartbeat.
const MAX_INSTRUCTIONS: usize = 16;
/// Metric points kept per instance.
const MAX_POINTS: usize = 256;
/// How long a node avoids an instance whose data address refused a connection.
pub const AVOID_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// A registration request, decoded.
#[derive(Clone, Debug, Default)]
pub struct RegisterModule {
    pub instance_id: String,
    pub module_type: Option<ModuleType>,
    pub version: String,
    pub control_address: String,
    pub data_address: String,
    pub protocols: Vec<Protocol>,
    pub max_connections: u32,
    pub metadata: BTreeMap<String, String>,
    pub health_check: Option<HealthCheckSpec>,
    /// The module's control secret (empty: an older module, called without one).
    pub control_token: ControlToken,
}

/// A registration written.
#[derive(Clone, Debug)]
pub struct Registered {
    pub instance_id: String,
    pub interval_ms: u32,
    pub max_missed: u32,
    pub replaced: bool,
}

/// The answer to a heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BeatAnswer {
    pub re_register: bool,
    pub should_reload: bool,
    /// The instance count wanted for the module's type, when a decision is new to it.
    pub desired_instances: Option<u32>,
    pub instructions: Vec<String>,
    pub interval_ms: u32,
}

/// An instance's load as reported to callers.
#[derive(Clone, Debug)]
pub struct LoadInfo {
    pub instance: Instance,
    pub load_score: u32,
    pub active_connections: u64,
    pub full: bool,
}

/// A routing-table change.
#[derive(Clone, Debug, Default)]
pub struct RoutingUpdate {
    pub routes: Vec<Route>,
    pub replace_all: bool,
    pub validate_only: bool,
    pub delete: Vec<String>,
    pub expected_revision: i64,
}

/// Partial settings: `None` keeps a value.
#[derive(Clone, Debug, Default)]
pub struct SettingsUpdate {
    pub heartbeat_interval_ms: Option<u32>,
    pub max_missed_heartbeats: Option<u32>,
    pub drain_timeout_ms: Option<u32>,
    pub can_handle_ttl_ms: Option<u32>,
    pub autoscale_interval_ms: Option<u32>,
    pub rebalance_threshold: Option<u32>,
    pub validate_only: bool,
}

/// The balancer's operations on one node; clones share everything.
#[derive(Clone)]
pub struct BalancerHandle {
    store: Arc<dyn Store>,
    published: Published,
    state: ActorRef<BalancerState>,
    decider: Arc<Decider>,
    probe: Arc<dyn ModuleProbe>,
    metrics: Arc<BalancerMetrics>,
    hook: Option<Arc<DeployHook>>,
    member: u64,
}

fn invalid(m: impl Into<String>) -> BalancerError {
    BalancerError::Invalid(m.into())
}

/// An identifier: 1..=128 characters of `[A-Za-z0-9._-]` (it names an actor and a store key).
pub fn check_id(field: &str, id: &str) -> Result<(), BalancerError> {
    validate_route_id(id).map_err(|e| invalid(format!("{field}: {e}")))
}

/// A host:port with a port in 1..=65535.
fn check_address(field: &str, addr: &str) -> Result<(), BalancerError> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| invalid(format!("{field}: {} is not host:port", echo(addr))))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(format!(
            "{field}: {} has no valid host",
            echo(addr)
        )));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(invalid(format!(
            "{field}: {} is not a port (1 to 65535)",
            echo(port)
        ))),
    }
}

fn check_version(field: &str, v: &str) -> Result<(), BalancerError> {
    if v.is_empty() {
        return Err(invalid(format!("{field}: required")));
    }
    if v.len() > 128 || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(format!(
            "{field}: {} must be 1 to 128 characters without spaces",
            echo(v)
        )));
    }
    Ok(())
}

fn traffic_error(e: TrafficError) -> BalancerError {
    match e {
        TrafficError::Invalid(m) => BalancerError::Invalid(m),
        TrafficError::Precondition(m) => BalancerError::Precondition(m),
    }
}

fn revision_is(key: &Key, rev: i64) -> Compare {
    Compare {
        key: key.bytes(),
        cmp: Cmp::Equal,
        target: Target::ModRevision(rev),
    }
}

/// The registration of `id` is still the one created at `created` (a registration again gets a
/// creation revision of its own).
fn same_registration(id: &str, created: i64) -> Compare {
    Compare {
        key: Key::Module(id.to_string()).bytes(),
        cmp: Cmp::Equal,
        target: Target::CreateRevision(created),
    }
}

fn put(key: &Key, value: Vec<u8>, lease: i64) -> Op {
    Op::Put {
        key: key.bytes(),
        value,
        lease,
    }
}

impl BalancerHandle {
    /// The operations of a node whose state actor publishes to `published`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn Store>,
        published: Published,
        state: ActorRef<BalancerState>,
        probe: Arc<dyn ModuleProbe>,
        metrics: Arc<BalancerMetrics>,
        hook: Option<Arc<DeployHook>>,
        member: u64,
    ) -> Self {
        Self {
            store,
            published,
            state,
            decider: Arc::new(Decider::default()),
            probe,
            metrics,
            hook,
            member,
        }
    }

    /// The current view.
    pub fn view(&self) -> Arc<View> {
        self.published.get()
    }

    /// The figures.
    pub fn metrics(&self) -> &Arc<BalancerMetrics> {
        &self.metrics
    }

    /// Decisions made for `route_id` on this node.
    pub fn decisions_for(&self, route_id: &str) -> u64 {
        self.decider.decisions_for(route_id)
    }

    /// The probe the balancer asks instances with.
    pub fn probe(&self) -> &Arc<dyn ModuleProbe> {
        &self.probe
    }

    /// This node's member id.
    pub fn member(&self) -> u64 {
        self.member
    }

    /// Waits until this node has applied `revision` (before reading what it holds).
    async fn applied(&self, revision: i64) -> Result<(), BalancerError> {
        self.state
            .send(WaitFor(revision))
            .await
            .map_err(|e| BalancerError::Unavailable(format!("balancer state: {e}; retry")))
    }

    /// After a committed write: waits until this node shows it, so the caller's next call here
    /// sees it. The write stands whatever happens here: a state actor restarting meanwhile must
    /// not turn an applied change into a retryable error (a retried rollback would undo itself).
    async fn visible(&self, revision: i64) {
        let _ = self.state.send(WaitFor(revision)).await;
    }

    /// The view, once this node has loaded the balancer's state (before that its answers would
    /// be defaults, not the cluster's).
    pub fn loaded_view(&self) -> Result<Arc<View>, BalancerError> {
        let view = self.view();
        if !view.loaded {
            return Err(BalancerError::Unavailable(
                "the balancer has not loaded its state on this node yet; retry".into(),
            ));
        }
        Ok(view)
    }

    /// The stored value of `key`, read through the leader.
    async fn read(&self, key: &Key) -> Result<Option<KeyValue>, BalancerError> {
        let raw = key.bytes();
        let listing = self.store.range(raw.clone()).await?;
        Ok(listing.kvs.into_iter().find(|kv| kv.key == raw))
    }

    /// Reads `key`, applies `change` to its record (default when absent) and writes it back if
    /// it has not changed since; retried against concurrent writers. `change` answers the new
    /// record (`None`: nothing to write) and a result for the caller.
    async fn update<T, R>(
        &self,
        key: Key,
        lease: i64,
        change: impl FnMut(T, i64) -> Result<(Option<T>, R), BalancerError>,
    ) -> Result<(R, i64), BalancerError>
    where
        T: serde::Serialize + serde::de::DeserializeOwned + Default,
    {
        self.update_if(key, lease, Vec::new(), change).await
    }

    /// [`update`](Self::update), also only while `guards` hold (e.g. the registration it belongs
    /// to is still the same one). A guard that fails ends it with `NotFound`.
    async fn update_if<T, R>(
        &self,
        key: Key,
        lease: i64,
        guards: Vec<Compare>,
        mut change: impl FnMut(T, i64) -> Result<(Option<T>, R), BalancerError>,
    ) -> Result<(R, i64), BalancerError>
    where
        T: serde::Serialize + serde::de::DeserializeOwned + Default,
    {
        for _ in 0..CAS_ATTEMPTS {
            let stored = self.read(&key).await?;
            let rev = stored.as_ref().map_or(0, |kv| kv.mod_revision);
            let current = match stored {
                None => T::default(),
                // Never replace what this node cannot read (a newer node's record, or one written
                // by hand) with a default plus a change: that would erase the rest of it.
                Some(kv) => decode::<T>(&kv.value).ok_or_else(|| {
                    BalancerError::Precondition(format!(
                        "{}: the stored record cannot be read by this node (written by a newer version?)",
                        String::from_utf8_lossy(&kv.key)
                    ))
                })?,
            };
            let (next, answer) = change(current, rev)?;
            let Some(next) = next else {
                return Ok((answer, rev));
            };
            let mut compares = guards.clone();
            compares.push(revision_is(&key, rev));
            let outcome = self
                .store
                .txn(
                    compares,
                    vec![put(&key, encode(&next), lease)],
                    vec![Op::Get { key: key.bytes() }],
                )
                .await?;
            if outcome.succeeded {
                self.visible(outcome.revision).await;
                return Ok((answer, outcome.revision));
            }
            // The record moved: read it again. A guard that failed: the record's owner is gone.
            let moved = outcome
                .gets
                .first()
                .cloned()
                .flatten()
                .map(|kv| kv.mod_revision);
            if !guards.is_empty() && moved.unwrap_or(0) == rev {
                return Err(BalancerError::NotFound(
                    "the registration changed or ended meanwhile".into(),
                ));
            }
        }
        Err(BalancerError::Aborted(
            "the record kept changing under concurrent writers; retry".into(),
        ))
    }

    // --- Registration ---------------------------------------------------------------------

    /// Registers an instance (again: replaces its registration).
    pub async fn register(&self, req: RegisterModule) -> Result<Registered, BalancerError> {
        let module_type = req
            .module_type
            .ok_or_else(|| invalid("module_type: required: one of alb, dblb, ailb, rtmp, nlb"))?;
        let instance_id = if req.instance_id.is_empty() {
            format!("{module_type}-{:016x}", fastrand::u64(..))
        } else {
            req.instance_id.clone()
        };
        check_id("instance_id", &instance_id)?;
        check_version("version", &req.version)?;
        check_address("control_address", &req.control_address)?;
        check_address("data_address", &req.data_address)?;
        let token = &req.control_token.0;
        if !token.is_empty()
            && (!(32..=256).contains(&token.len()) || !token.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(invalid(
                "control_token: must be 32 to 256 printable ASCII characters without spaces (or empty)",
            ));
        }
        if req.metadata.len() > 64 {
            return Err(invalid(format!(
                "metadata: {} entries; at most 64",
                req.metadata.len()
            )));
        }
        let health_check = req
            .health_check
            .map(|h| h.normalised("health_check"))
            .transpose()
            .map_err(invalid)?;
        let view = self.loaded_view()?;
        let settings = view.settings.value.clone();
        let now = now_ms();
        let record = ModuleRecord {
            instance_id: instance_id.clone(),
            module_type,
            version: req.version,
            control_address: req.control_address,
            data_address: req.data_address,
            protocols: req.protocols,
            max_connections: req.max_connections,
            metadata: req.metadata,
            health_check,
            registered_at_ms: now,
            interval_ms: settings.heartbeat_interval_ms,
            max_missed: settings.max_missed_heartbeats,
            registered_by: self.member,
            draining: None,
            control_token: req.control_token,
        };
        // Registering counts as the first heartbeat, so the instance is routable at once; it is
        // told of what exists now, not of everything that happened before it.
        let report = LoadReport {
            at_ms: now,
            member: self.member,
            routes_seen: view.routes.revision,
            scaling_seen: view.scaling_of(module_type).value.last.map_or(0, |d| d.seq),
            ..Default::default()
        };
        let ttl = BalancerSettings::lease_ttl_secs(record.interval_ms, record.max_missed);
        let lease = self.store.grant(ttl).await?;
        let module_key = Key::Module(instance_id.clone());
        let written = self
            .store
            .txn(
                vec![],
                vec![
                    Op::Get {
                        key: module_key.bytes(),
                    },
                    // Deleted first, so the registration gets a creation revision of its own:
                    // calls guarded by the one they saw cannot touch its replacement.
                    Op::Delete {
                        key: module_key.bytes(),
                        prefix: false,
                    },
                    put(&module_key, encode(&record), lease),
                    put(&Key::Load(instance_id.clone()), encode(&report), lease),
                    Op::Delete {
                        key: Key::Instructions(instance_id.clone()).bytes(),
                        prefix: false,
                    },
                ],
                vec![],
            )
            .await;
        let outcome = match written {
            Ok(o) => o,
            Err(e) => {
                let _ = self.store.revoke(lease).await;
                return Err(e.into());
            }
        };
        let previous = outcome.gets.into_iter().next().flatten();
        if let Some(old) = &previous {
            if old.lease != 0 && old.lease != lease {
                // Its keys moved to the new lease; the old lease only holds the past now.
                let _ = self.store.revoke(old.lease).await;
            }
        }
        self.visible(outcome.revision).await;
        Ok(Registered {
            instance_id,
            interval_ms: record.interval_ms,
            max_missed: record.max_missed,
            replaced: previous.is_some(),
        })
    }

    /// The instance `id` as this node has applied it; an instance registered elsewhere a moment
    /// ago is waited for.
    pub async fn instance(&self, id: &str) -> Result<Option<Instance>, BalancerError> {
        check_id("instance_id", id)?;
        if let Some(i) = self.view().instances.get(id) {
            return Ok(Some(i.clone()));
        }
        match self.read(&Key::Module(id.to_string())).await? {
            None => Ok(None),
            Some(kv) => {
                self.applied(kv.mod_revision).await?;
                Ok(self.view().instances.get(id).cloned())
            }
        }
    }

    /// The instance `id`, or NOT_FOUND naming it.
    pub async fn registered(&self, id: &str) -> Result<Instance, BalancerError> {
        self.instance(id).await?.ok_or_else(|| {
            BalancerError::NotFound(format!("instance_id: {} is not registered", echo(id)))
        })
    }

    /// A heartbeat: renews the instance's lease (at most every half interval per node), records
    /// its report, and hands it what is waiting for it.
    pub async fn heartbeat(
        &self,
        id: &str,
        stats: Stats,
        health: ReportedHealth,
    ) -> Result<BeatAnswer, BalancerError> {
        let Some(inst) = self.instance(id).await? else {
            return Ok(BeatAnswer {
                re_register: true,
                ..Default::default()
            });
        };
        let interval = Duration::from_millis(inst.record.interval_ms.into());
        if inst.live.renewal_due(interval) {
            match self.store.keep_alive(inst.lease).await {
                Ok(()) => {}
                Err(crate::cluster::store::StoreError::LeaseNotFound(_)) => {
                    return Ok(BeatAnswer {
                        re_register: true,
                        ..Default::default()
                    })
                }
                // No leader right now (an election): a new leader gives every lease a full TTL,
                // so a renewal missed now costs nothing; the next heartbeat renews.
                Err(_) => inst.live.renewal_failed(),
            }
        }
        let view = self.view();
        let waiting = view
            .instructions
            .get(id)
            .map(|v| v.value.items.clone())
            .unwrap_or_default();
        let decision = view.scaling_of(inst.record.module_type).value.last;
        let interval_ms = inst.record.interval_ms;
        let member = self.member;
        // What is delivered is decided against the stored report, under its revision: two
        // heartbeats at once, or one failing over to a node that lags, never deliver twice.
        let written = self
            .update_if(
                Key::Load(id.to_string()),
                inst.lease,
                vec![same_registration(id, inst.created)],
                |before: LoadReport, _| {
                    let fresh: Vec<&(u64, String)> = waiting
                        .iter()
                        .filter(|(seq, _)| *seq > before.instructions_seen)
                        .collect();
                    let scaling = decision.as_ref().filter(|d| d.seq > before.scaling_seen);
                    let report = LoadReport {
                        stats: stats.clone(),
                        health,
                        at_ms: now_ms(),
                        member,
                        metrics: before.metrics.clone(),
                        instructions_seen: fresh
                            .last()
                            .map_or(before.instructions_seen, |(s, _)| *s),
                        scaling_seen: scaling.map_or(before.scaling_seen, |d| d.seq),
                        routes_seen: view.routes.revision,
                    };
                    let answer = BeatAnswer {
                        re_register: false,
                        should_reload: view.routes.revision > before.routes_seen,
                        desired_instances: scaling.map(|d| d.desired),
                        instructions: fresh.into_iter().map(|(_, i)| i.clone()).collect(),
                        interval_ms,
                    };
                    Ok((Some(report), answer))
                },
            )
            .await;
        match written {
            Ok((answer, _)) => Ok(answer),
            // Evicted or replaced since this node looked.
            Err(BalancerError::NotFound(_)) => Ok(BeatAnswer {
                re_register: true,
                ..Default::default()
            }),
            // The store cannot take the report now (an election): the heartbeat still counts
            // (the lease is safe, above); nothing was delivered, so the next one delivers it.
            Err(BalancerError::Unavailable(_)) => Ok(BeatAnswer {
                interval_ms,
                ..Default::default()
            }),
            Err(e) => Err(e),
        }
    }

    /// Ends a registration. Graceful: marks it draining (no node routes to it any more), waits
    /// for its connections to end or `drain_timeout` (0: the settings'), then removes it.
    ///
    /// It runs to the end even if the caller goes away: an instance must not stay draining (and
    /// unroutable) because the caller's deadline was shorter than the drain.
    pub async fn unregister(
        &self,
        id: &str,
        graceful: bool,
        drain_timeout: Duration,
    ) -> Result<Drained, BalancerError> {
        let (this, id) = (self.clone(), id.to_string());
        tokio::spawn(async move { this.unregister_now(&id, graceful, drain_timeout).await })
            .await
            .map_err(|e| BalancerError::Unavailable(format!("unregistering: {e}")))?
    }

    async fn unregister_now(
        &self,
        id: &str,
        graceful: bool,
        drain_timeout: Duration,
    ) -> Result<Drained, BalancerError> {
        let inst = self.registered(id).await?;
        let mut drained = Drained {
            drained: 0,
            remaining: 0,
            took: Duration::ZERO,
        };
        if graceful {
            let timeout = if drain_timeout.is_zero() {
                Duration::from_millis(self.view().settings.value.drain_timeout_ms.into())
            } else {
                drain_timeout
            };
            let now = now_ms();
            self.update_if(
                Key::Module(id.to_string()),
                inst.lease,
                vec![same_registration(id, inst.created)],
                |record: Option<ModuleRecord>, _| {
                    let mut record = record.ok_or_else(|| {
                        BalancerError::NotFound("the registration ended meanwhile".into())
                    })?;
                    record.draining = Some(super::model::Drain {
                        since_ms: now,
                        deadline_ms: now + timeout.as_millis() as i64,
                    });
                    Ok((Some(Some(record)), ()))
                },
            )
            .await
            .map_err(|e| match e {
                BalancerError::NotFound(_) => BalancerError::NotFound(format!(
                    "instance_id: {} was evicted or replaced meanwhile",
                    echo(id)
                )),
                e => e,
            })?;
            drained = self.drain(&inst, Instant::now() + timeout).await;
        }
        let revoked = self.store.revoke(inst.lease).await?;
        self.visible(revoked).await;
        Ok(drained)
    }

    /// The drain, by the instance's actor; if the actor cannot be reached (it is starting, or
    /// restarting), the instance is removed anyway: a drain is a courtesy, a stuck one is not.
    async fn drain(&self, inst: &Instance, deadline: Instant) -> Drained {
        let began = Instant::now();
        loop {
            match inst.actor.send(Drain { deadline }).await {
                Ok(Ok(d)) => return d,
                Err(SendError::NotRunning) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => {
                    let open = inst
                        .live
                        .connections
                        .load(std::sync::atomic::Ordering::Relaxed);
                    return Drained {
                        drained: 0,
                        remaining: open,
                        took: began.elapsed(),
                    };
                }
            }
        }
    }

    /// Keeps metric points an instance reported (the latest per name and labels).
    pub async fn report_metrics(
        &self,
        id: &str,
        points: Vec<MetricPoint>,
    ) -> Result<usize, BalancerError> {
        let inst = self.registered(id).await?;
        for (n, p) in points.iter().enumerate() {
            if p.name.is_empty() || p.name.len() > 128 {
                return Err(invalid(format!(
                    "metrics[{n}].name: required, at most 128 characters"
                )));
            }
            if !p.value.is_finite() {
                return Err(invalid(format!("metrics[{n}].value: not a finite number")));
            }
        }
        let accepted = points.len();
        let now = now_ms();
        self.update(
            Key::Load(id.to_string()),
            inst.lease,
            |mut report: LoadReport, _| {
                for mut p in points.clone() {
                    if p.timestamp_ms == 0 {
                        p.timestamp_ms = now;
                    }
                    report
                        .metrics
                        .retain(|q| !(q.name == p.name && q.labels == p.labels));
                    report.metrics.push(p);
                }
                let excess = report.metrics.len().saturating_sub(MAX_POINTS);
                report.metrics.drain(..excess);
                Ok((Some(report), ()))
            },
        )
        .await?;
        Ok(accepted)
    }

    // --- Routing ----------------------------------------------------------------------------

    /// Changes the routing table; answers the table as written (or as it would be).
    pub async fn update_routing(
        &self,
        u: RoutingUpdate,
    ) -> Result<(Vec<Route>, i64, bool), BalancerError> {
        // The request's own routes first, so that errors name the request's fields.
        RoutingTable::compile(u.routes.clone()).map_err(invalid)?;
        for (n, id) in u.delete.iter().enumerate() {
            validate_route_id(id).map_err(|e| invalid(format!("delete_route_ids[{n}]: {e}")))?;
        }
        let ((routes, applied), rev) = self
            .update(Key::Routes, 0, |current: RoutesRecord, rev| {
                if u.expected_revision != 0 && u.expected_revision != rev {
                    return Err(BalancerError::Precondition(format!(
                        "expected_revision: the table is at revision {rev}, not {}",
                        u.expected_revision
                    )));
                }
                let mut routes = if u.replace_all {
                    Vec::new()
                } else {
                    current.routes.clone()
                };
                for (n, id) in u.delete.iter().enumerate() {
                    let before = routes.len();
                    routes.retain(|r| &r.route_id != id);
                    if before == routes.len() && !u.replace_all {
                        return Err(BalancerError::NotFound(format!(
                            "delete_route_ids[{n}]: no route {}",
                            echo(id)
                        )));
                    }
                }
                for r in &u.routes {
                    match routes.iter_mut().find(|x| x.route_id == r.route_id) {
                        Some(x) => *x = r.clone(),
                        None => routes.push(r.clone()),
                    }
                }
                let table = RoutingTable::compile(routes).map_err(invalid)?;
                let ordered: Vec<Route> = table.routes().iter().map(|c| c.route.clone()).collect();
                if u.validate_only {
                    return Ok((None, (ordered, false)));
                }
                Ok((
                    Some(RoutesRecord {
                        routes: ordered.clone(),
                    }),
                    (ordered, true),
                ))
            })
            .await?;
        Ok((routes, rev, applied))
    }

    /// Decides where `flow` goes (see [`Decider`]), counting the outcome.
    pub async fn decide(
        &self,
        flow: &Flow,
        dry_run: bool,
        exclude: &[String],
    ) -> Result<Decision, BalancerError> {
        self.decide_once(flow, dry_run, exclude, false).await
    }

    /// Decides again for a connection whose chosen instance did not accept it: `exclude` lists
    /// the instances tried. Its rate-limit tokens were spent by the first decision, and the
    /// outcome is counted once.
    pub async fn redecide(
        &self,
        flow: &Flow,
        exclude: &[String],
    ) -> Result<Decision, BalancerError> {
        self.decide_once(flow, false, exclude, true).await
    }

    async fn decide_once(
        &self,
        flow: &Flow,
        dry_run: bool,
        exclude: &[String],
        retry: bool,
    ) -> Result<Decision, BalancerError> {
        let view = self.view();
        if !view.loaded {
            return Err(BalancerError::Unavailable(
                "the balancer has not loaded its state yet; retry".into(),
            ));
        }
        let r = self
            .decider
            .decide(
                &view,
                flow,
                dry_run,
                exclude,
                retry,
                self.probe.as_ref(),
                now_ms(),
            )
            .await;
        if retry {
            return r;
        }
        let outcome = match &r {
            Ok(_) if dry_run => "dry_run",
            Ok(_) => "routed",
            Err(BalancerError::NotFound(_)) => "no_route",
            Err(BalancerError::Exhausted(_)) => {
                self.metrics.rate_limited.inc();
                "rate_limited"
            }
            Err(_) => "no_instance",
        };
        self.metrics.decided(outcome);
        r
    }

    /// Validates `route` and asks every instance of its target type whether it takes it.
    pub async fn validate_route(
        &self,
        route: Route,
    ) -> Result<Vec<(String, Capability)>, BalancerError> {
        let compiled = CompiledRoute::compile(route, "route").map_err(invalid)?;
        let view = self.view();
        let instances: Vec<&Instance> = view.of_type(compiled.route.target).collect();
        let answers = capabilities(
            &view,
            &compiled,
            &instances,
            self.probe.as_ref(),
            CAN_HANDLE_TIMEOUT,
            Ask::Hypothetical,
        )
        .await;
        Ok(instances
            .iter()
            .map(|i| i.record.instance_id.clone())
            .zip(answers)
            .collect())
    }

    // --- Limits -----------------------------------------------------------------------------

    /// Sets (adds or replaces) the limit of a target.
    pub async fn set_limit(&self, spec: RateLimitSpec) -> Result<RateLimitSpec, BalancerError> {
        spec.validate("limit").map_err(invalid)?;
        let (_, _) = self
            .update(Key::Limits, 0, |mut current: LimitsRecord, _| {
                current.limits.retain(|l| l.target != spec.target);
                current.limits.push(spec.clone());
                current.limits.sort_by(|a, b| a.target.cmp(&b.target));
                Ok((Some(current), ()))
            })
            .await?;
        Ok(spec)
    }

    /// Removes the limit of `target`; answers whether there was one.
    pub async fn remove_limit(&self, target: &str) -> Result<bool, BalancerError> {
        LimitTarget::parse(target, "target").map_err(invalid)?;
        let (removed, _) = self
            .update(Key::Limits, 0, |mut current: LimitsRecord, _| {
                let before = current.limits.len();
                current.limits.retain(|l| l.target != target);
                let removed = before != current.limits.len();
                Ok((removed.then_some(current), removed))
            })
            .await?;
        Ok(removed)
    }

    // --- Blue/green -------------------------------------------------------------------------

    async fn traffic(
        &self,
        t: ModuleType,
        change: impl Fn(&TrafficRecord, i64) -> Result<TrafficRecord, TrafficError>,
    ) -> Result<Versioned<TrafficRecord>, BalancerError> {
        let now = now_ms();
        let (value, revision) = self
            .update(Key::Traffic(t), 0, |current: TrafficRecord, _| {
                let next = change(&current, now).map_err(traffic_error)?;
                Ok((Some(next.clone()), next))
            })
            .await?;
        Ok(Versioned { value, revision })
    }

    /// Gives `version` of type `t` a share of its traffic.
    pub async fn set_weight(
        &self,
        t: ModuleType,
        version: &str,
        weight: u32,
    ) -> Result<Versioned<TrafficRecord>, BalancerError> {
        self.traffic(t, |r, now| r.set_weight(version, weight, now))
            .await
    }

    /// Promotes `version` of type `t`, at once or by steps.
    pub async fn promote(
        &self,
        t: ModuleType,
        version: &str,
        gradual: bool,
        step_percent: u32,
        interval_ms: u64,
    ) -> Result<Versioned<TrafficRecord>, BalancerError> {
        self.traffic(t, |r, now| {
            r.promote(version, gradual, step_percent, interval_ms, now)
        })
        .await
    }

    /// Returns type `t` to the version that served before the latest change.
    pub async fn rollback(&self, t: ModuleType) -> Result<Versioned<TrafficRecord>, BalancerError> {
        self.traffic(t, |r, now| r.rollback(now)).await
    }

    // --- Scaling ----------------------------------------------------------------------------

    /// Sets the scaling settings of type `t`, keeping what the scaler remembers.
    pub async fn set_scaling(
        &self,
        t: ModuleType,
        config: ScalingConfig,
    ) -> Result<ScalingConfig, BalancerError> {
        config.validate().map_err(invalid)?;
        self.update(Key::Scaling(t), 0, |mut current: ScalingRecord, _| {
            current.config = config.clone();
            Ok((Some(current), ()))
        })
        .await?;
        Ok(config)
    }

    /// The load of every instance of `t` (every type: `None`), and their balance score.
    pub fn load(&self, t: Option<ModuleType>) -> (Vec<LoadInfo>, u32) {
        let view = self.view();
        let infos: Vec<LoadInfo> = view
            .instances
            .values()
            .filter(|i| t.is_none_or(|t| i.record.module_type == t))
            .map(|i| LoadInfo {
                instance: i.clone(),
                load_score: i.load_score(),
                active_connections: i.sample().active_connections,
                full: i.full(),
            })
            .collect();
        let scores: Vec<u32> = infos.iter().map(|l| l.load_score).collect();
        (infos, balance_score(&scores))
    }

    /// Asks instances well above their type's mean load to shed connections (delivered with their
    /// next heartbeat). Answers the balance score before and the plan.
    pub async fn rebalance(
        &self,
        t: Option<ModuleType>,
        dry_run: bool,
    ) -> Result<(u32, Vec<(String, u64)>), BalancerError> {
        let threshold = self.view().settings.value.rebalance_threshold;
        let types: Vec<ModuleType> = t.map_or(ModuleType::ALL.to_vec(), |t| vec![t]);
        let (_, before) = self.load(t);
        let mut plan = Vec::new();
        for t in types {
            let (infos, _) = self.load(Some(t));
            let input: Vec<(String, u32, u64)> = infos
                .iter()
                .filter(|l| l.instance.health(now_ms()).0.routable())
                .map(|l| {
                    (
                        l.instance.record.instance_id.clone(),
                        l.load_score,
                        l.active_connections,
                    )
                })
                .collect();
            plan.extend(shed_plan(&input, threshold));
        }
        if !dry_run {
            for (id, n) in &plan {
                self.instruct(id, format!("shed-connections {n}")).await?;
            }
        }
        Ok((before, plan))
    }

    /// Queues an instruction for an instance's next heartbeat.
    async fn instruct(&self, id: &str, instruction: String) -> Result<(), BalancerError> {
        let Some(inst) = self.instance(id).await? else {
            return Ok(());
        };
        let seen = inst.report.as_ref().map_or(0, |r| r.instructions_seen);
        self.update(
            Key::Instructions(id.to_string()),
            inst.lease,
            |mut current: Instructions, _| {
                current.items.retain(|(s, _)| *s > seen);
                let seq = current.next_seq().max(seen + 1);
                current.items.push((seq, instruction.clone()));
                let excess = current.items.len().saturating_sub(MAX_INSTRUCTIONS);
                current.items.drain(..excess);
                Ok((Some(current), ()))
            },
        )
        .await?;
        Ok(())
    }

    /// A scaling decision now: forced up or down (to `desired` if non-zero), or as the
    /// autoscaler would decide (`None`). Delivered (heartbeats, the deployment hook) when it
    /// changes something.
    ///
    /// The decision is taken inside the compare-and-swap of the type's scaling record, from the
    /// stored cooldowns: an operator's call and the autoscaler, or an old and a new leader, cannot
    /// both deliver on the same memory.
    pub async fn trigger_scaling(
        &self,
        t: ModuleType,
        direction: Option<Direction>,
        desired: u32,
        reason: &str,
    ) -> Result<(DecisionRecord, bool), BalancerError> {
        let view = self.loaded_view()?;
        let now = now_ms();
        // Every instance not draining counts, healthy or not: counting only the healthy ones
        // would ask for another instance every round while one is starting.
        let loads: Vec<InstanceLoad> = view
            .of_type(t)
            .filter(|i| i.record.draining.is_none())
            .map(|i| {
                let s = i
                    .report
                    .as_ref()
                    .map(|r| r.stats.clone())
                    .unwrap_or_default();
                InstanceLoad {
                    cpu_percent: s.cpu_percent,
                    memory_percent: s.memory_percent,
                    connections: i.sample().active_connections,
                }
            })
            .collect();
        let current = loads.len() as u32;
        let member = self.member;
        let ((decision, delivered), _) = self
            .update(Key::Scaling(t), 0, |mut rec: ScalingRecord, _| {
                let mut d = match direction {
                    Some(dir) => scaler::force(&rec.config, current, dir, desired, now),
                    None => scaler::decide(&rec.config, &loads, &rec.memory, now),
                };
                if !reason.is_empty() {
                    d.reason = format!("{reason}: {}", d.reason);
                }
                let name = match d.direction {
                    Direction::Up => "up",
                    Direction::Down => "down",
                    Direction::None => "none",
                };
                let last = rec.last.clone();
                let record = DecisionRecord {
                    seq: last.as_ref().map_or(0, |l| l.seq) + 1,
                    direction: name.into(),
                    current,
                    desired: d.desired,
                    pressure: d.pressure,
                    reason: d.reason.clone(),
                    decided_at_ms: now,
                    member,
                    cooldown_until_ms: d.cooldown_until_ms,
                };
                // The same count asked for again within its direction's cooldown (a type held
                // below its minimum, say) is not news: delivering it every round would run the
                // hook every round.
                let cooldown = match d.direction {
                    Direction::Up => rec.config.scale_up_cooldown_ms,
                    _ => rec.config.scale_down_cooldown_ms,
                } as i64;
                let repeated = direction.is_none()
                    && last.as_ref().is_some_and(|l| {
                        l.desired == d.desired
                            && l.direction == name
                            && now - l.decided_at_ms < cooldown
                    });
                if d.direction == Direction::None || repeated {
                    let seq = last.map_or(0, |l| l.seq);
                    return Ok((None, (DecisionRecord { seq, ..record }, false)));
                }
                rec.memory = scaler::remember(&rec.memory, &d, now);
                rec.last = Some(record.clone());
                Ok((Some(rec), (record, true)))
            })
            .await?;
        if delivered {
            self.metrics
                .scaling_decisions
                .get_or_create(&ScalingLabels {
                    module_type: t.to_string(),
                    direction: decision.direction.clone(),
                })
                .inc();
            if let Some(hook) = &self.hook {
                hook.deliver(t, &decision);
            }
        }
        Ok((decision, delivered))
    }

    /// One round of the autoscaler: every enabled type decided and delivered.
    pub async fn autoscale(
        &self,
    ) -> Vec<(ModuleType, Result<(DecisionRecord, bool), BalancerError>)> {
        let view = self.view();
        let mut out = Vec::new();
        for (t, rec) in &view.scaling {
            if rec.value.config.enabled {
                out.push((*t, self.trigger_scaling(*t, None, 0, "").await));
            }
        }
        out
    }

    // --- Settings ---------------------------------------------------------------------------

    /// Changes the settings; answers them as written (or as they would be) and the revision.
    pub async fn update_settings(
        &self,
        u: SettingsUpdate,
    ) -> Result<(BalancerSettings, i64), BalancerError> {
        self.update(Key::Settings, 0, |mut s: BalancerSettings, _| {
            let fields = [
                (&mut s.heartbeat_interval_ms, u.heartbeat_interval_ms),
                (&mut s.max_missed_heartbeats, u.max_missed_heartbeats),
                (&mut s.drain_timeout_ms, u.drain_timeout_ms),
                (&mut s.can_handle_ttl_ms, u.can_handle_ttl_ms),
                (&mut s.autoscale_interval_ms, u.autoscale_interval_ms),
                (&mut s.rebalance_threshold, u.rebalance_threshold),
            ];
            for (field, value) in fields {
                if let Some(v) = value {
                    *field = v;
                }
            }
            s.validate().map_err(invalid)?;
            if u.validate_only {
                return Ok((None, s));
            }
            Ok((Some(s.clone()), s))
        })
        .await
    }

    /// Records that a connection to `inst` failed: this node avoids it for a while.
    pub fn connect_failed(&self, inst: &Instance, error: &str) {
        inst.live.avoid(
            AVOID_AFTER_FAILURE,
            format!(
                "a connection to {} failed: {error}",
                inst.record.data_address
            ),
        );
        self.metrics.decided("connect_failed");
    }
}
