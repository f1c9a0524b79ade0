//! A module instance as this node sees it: its registration and last heartbeat (replicated), and
//! what only this node knows (live connections through its data plane, health checks, CanHandle
//! answers). Decisions read it without going through an actor.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::envelope::ActorRef;

use super::model::{LoadReport, ModuleRecord, ReportedHealth};
use super::module::ModuleActor;
use super::probe::Target;
use super::score::{is_full, load_score, LoadSample};

/// Health as the balancer judges it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    /// Late heartbeats or a module that says so; still routed to.
    Degraded,
    Unhealthy,
    /// Registered, not ready (the module says it is starting).
    Starting,
    /// Draining or stopping: no new traffic.
    Stopping,
}

impl Health {
    /// Whether new traffic may go to an instance in this state.
    pub fn routable(self) -> bool {
        matches!(self, Self::Healthy | Self::Degraded)
    }

    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Degraded => "degraded",
            Self::Unhealthy => "unhealthy",
            Self::Starting => "starting",
            Self::Stopping => "stopping",
        }
    }
}

/// A CanHandle answer, kept for `can_handle_ttl_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Capability {
    pub can_handle: bool,
    pub priority: i32,
    pub reason: String,
    /// The routing table revision it answered for: a newer table asks again.
    pub routes_revision: i64,
    /// Until when it is good (failures are kept briefly, answers for the configured TTL).
    #[serde(skip)]
    pub expires: Option<Instant>,
}

/// Consecutive results of the active health checks.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckState {
    pub successes: u32,
    pub failures: u32,
    /// Failed `unhealthy_threshold` times in a row, and not yet recovered.
    pub down: bool,
    pub last_error: Option<String>,
}

#[derive(Default)]
struct LiveState {
    checks: CheckState,
    /// A connection to the data address failed: avoided until then.
    avoid_until: Option<Instant>,
    avoid_reason: String,
    capabilities: HashMap<String, Capability>,
    /// When this node last renewed the instance's lease.
    renewed_at: Option<Instant>,
}

/// What this node knows of an instance beyond the store; kept across re-registrations of the
/// same id only while the registration lives.
#[derive(Default)]
pub struct Live {
    /// Connections through this node's data plane now.
    pub connections: AtomicU64,
    pub connections_total: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Decisions that chose it here.
    pub decisions: AtomicU64,
    state: Mutex<LiveState>,
}

impl Live {
    /// Records a health check's result against the thresholds; answers whether `down` changed.
    pub fn check_result(&self, ok: Result<(), String>, healthy: u32, unhealthy: u32) -> bool {
        let mut s = self.state.lock().expect("live lock");
        let was = s.checks.down;
        match ok {
            Ok(()) => {
                s.checks.successes += 1;
                s.checks.failures = 0;
                if s.checks.successes >= healthy {
                    s.checks.down = false;
                    s.checks.last_error = None;
                }
            }
            Err(e) => {
                s.checks.failures += 1;
                s.checks.successes = 0;
                s.checks.last_error = Some(e);
                if s.checks.failures >= unhealthy {
                    s.checks.down = true;
                }
            }
        }
        was != s.checks.down
    }

    /// The health checks' state.
    pub fn checks(&self) -> CheckState {
        self.state.lock().expect("live lock").checks.clone()
    }

    /// A connection to the instance failed: it gets no new traffic for `for_` (passive health
    /// checking: the next connection should not find out the same way).
    pub fn avoid(&self, for_: Duration, reason: String) {
        let mut s = self.state.lock().expect("live lock");
        s.avoid_until = Some(Instant::now() + for_);
        s.avoid_reason = reason;
    }

    /// The cached CanHandle answer for `route_id`, if still good for `routes_revision`.
    pub fn capability(&self, route_id: &str, routes_revision: i64) -> Option<Capability> {
        let s = self.state.lock().expect("live lock");
        let c = s.capabilities.get(route_id)?;
        let fresh = c.expires.is_some_and(|e| e > Instant::now());
        (fresh && c.routes_revision == routes_revision).then(|| c.clone())
    }

    /// Keeps a CanHandle answer.
    pub fn remember(&self, route_id: &str, c: Capability) {
        let mut s = self.state.lock().expect("live lock");
        s.capabilities.insert(route_id.to_string(), c);
    }

    /// Every cached CanHandle answer, by route id.
    pub fn capabilities(&self) -> Vec<(String, Capability)> {
        let s = self.state.lock().expect("live lock");
        let mut v: Vec<_> = s
            .capabilities
            .iter()
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Whether this node should renew the lease now (at most once per half interval), marking
    /// it renewed if so.
    pub fn renewal_due(&self, interval: Duration) -> bool {
        let mut s = self.state.lock().expect("live lock");
        let due = s.renewed_at.is_none_or(|at| at.elapsed() >= interval / 2);
        if due {
            s.renewed_at = Some(Instant::now());
        }
        due
    }

    /// Forgets the last renewal (it failed), so the next heartbeat tries again.
    pub fn renewal_failed(&self) {
        self.state.lock().expect("live lock").renewed_at = None;
    }

    fn avoided(&self) -> Option<String> {
        let s = self.state.lock().expect("live lock");
        s.avoid_until
            .filter(|u| *u > Instant::now())
            .map(|_| s.avoid_reason.clone())
    }

    fn checks_down(&self) -> Option<String> {
        let s = self.state.lock().expect("live lock");
        s.checks.down.then(|| {
            format!(
                "health check failing: {}",
                s.checks.last_error.as_deref().unwrap_or("?")
            )
        })
    }
}

/// A module instance: its registration, its last heartbeat, and this node's live state.
#[derive(Clone)]
pub struct Instance {
    pub record: Arc<ModuleRecord>,
    /// The lease its keys live under.
    pub lease: i64,
    /// The revision that created its registration (tells a re-registration from an update).
    pub created: i64,
    pub report: Option<Arc<LoadReport>>,
    pub live: Arc<Live>,
    /// Its actor on this member.
    pub actor: ActorRef<ModuleActor>,
}

impl Instance {
    /// Heartbeat intervals missed as of `now_ms` (a beat half an interval late is not missed).
    pub fn missed(&self, now_ms: i64) -> u32 {
        let last = self
            .report
            .as_ref()
            .map_or(self.record.registered_at_ms, |r| r.at_ms);
        let interval = i64::from(self.record.interval_ms.max(1));
        let late = (now_ms - last - interval / 2).max(0);
        (late / interval) as u32
    }

    /// Health as of `now_ms`, and why it is not healthy.
    pub fn health(&self, now_ms: i64) -> (Health, String) {
        if self.record.draining.is_some() {
            return (Health::Stopping, "draining".into());
        }
        if let Some(why) = self.live.avoided() {
            return (Health::Unhealthy, why);
        }
        if let Some(why) = self.live.checks_down() {
            return (Health::Unhealthy, why);
        }
        match self.report.as_ref().map(|r| r.health) {
            Some(ReportedHealth::Unhealthy) => {
                return (
                    Health::Unhealthy,
                    "the module reports itself unhealthy".into(),
                )
            }
            Some(ReportedHealth::Stopping) => {
                return (Health::Stopping, "the module reports it is stopping".into())
            }
            Some(ReportedHealth::Starting) => {
                return (Health::Starting, "the module reports it is starting".into())
            }
            _ => {}
        }
        let missed = self.missed(now_ms);
        if missed > 0 {
            return (
                Health::Degraded,
                format!(
                    "{missed} heartbeat(s) missed (evicted after {})",
                    self.record.max_missed
                ),
            );
        }
        if let Some(ReportedHealth::Degraded) = self.report.as_ref().map(|r| r.health) {
            return (
                Health::Degraded,
                "the module reports itself degraded".into(),
            );
        }
        (Health::Healthy, String::new())
    }

    /// Its load as the score sees it: the larger of the connections it reported and this node's
    /// live connections to it (the report lags; this node's count does not).
    pub fn sample(&self) -> LoadSample {
        let stats = self
            .report
            .as_ref()
            .map(|r| r.stats.clone())
            .unwrap_or_default();
        let local = self.live.connections.load(Ordering::Relaxed);
        LoadSample {
            active_connections: stats.active_connections.max(local),
            max_connections: self.record.max_connections,
            cpu_percent: stats.cpu_percent,
            latency_ms: stats.latency_ms,
            queue_depth: stats.queue_depth,
        }
    }

    /// Where the probe reaches it.
    pub fn target(&self) -> Target {
        Target {
            instance_id: self.record.instance_id.clone(),
            control: self.record.control_address.clone(),
            data: self.record.data_address.clone(),
            control_token: self.record.control_token.clone(),
        }
    }

    /// Its load score (0..=100).
    pub fn load_score(&self) -> u32 {
        load_score(&self.sample())
    }

    /// At `max_connections`: never chosen.
    pub fn full(&self) -> bool {
        is_full(&self.sample())
    }
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("record", &self.record)
            .field("lease", &self.lease)
            .field("created", &self.created)
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}
