//! `/node/balancer/modules/<instance_id>`: one actor per module instance on every member. It
//! asks the instance CanHandle for the routes of its type whenever the table changes (so that
//! decisions find the answers cached), runs the instance's active health checks against their
//! thresholds, and carries out a graceful unregistration's drain.
//!
//! Heartbeats do not go through it: they are the hottest call, and what they change (the lease,
//! the replicated report) needs no actor (see the handle).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, ActorFutureExt, AsyncContext, Context, Handler, Message, WrapFuture};
use serde::Serialize;
use slog::{info, Logger};

use super::decide::{capabilities, Ask, CAN_HANDLE_TIMEOUT};
use super::metrics::BalancerMetrics;
use super::probe::ModuleProbe;
use super::route::protocol_matches;
use super::view::Published;
use super::{BalancerError, Flow};
use crate::supervision::Managed;

/// How often the actor looks for a changed routing table.
const WARM_TICK: Duration = Duration::from_millis(500);
/// How often a drain looks at the instance's connections.
const DRAIN_POLL: Duration = Duration::from_millis(100);

/// What every module actor needs.
#[derive(Clone)]
pub struct ModuleDeps {
    pub published: Published,
    pub probe: Arc<dyn ModuleProbe>,
    pub metrics: Arc<BalancerMetrics>,
    pub log: Logger,
}

/// Waits until the instance's connections (its own count, and this member's) reach zero or
/// `deadline` passes. The instance must already be marked draining.
#[derive(Message)]
#[rtype(result = "Result<Drained, BalancerError>")]
pub struct Drain {
    pub deadline: Instant,
}

/// A drain's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drained {
    /// Connections open when the drain began that finished during it.
    pub drained: u64,
    /// Connections still open at the deadline.
    pub remaining: u64,
    pub took: Duration,
}

crate::handles!(ModuleActor: Drain);

/// The actor of one instance.
pub struct ModuleActor {
    id: String,
    deps: ModuleDeps,
    log: Logger,
    /// The routing table revision and the lease whose routes were asked about, and when.
    warmed: Option<(i64, i64, Instant)>,
    /// A health check is scheduled or running.
    checking: bool,
    checks: u64,
    drains: u64,
}

impl ModuleActor {
    /// The actor of instance `id`.
    pub fn new(id: String, deps: ModuleDeps) -> Self {
        let log = deps.log.new(slog::o!("instance_id" => id.clone()));
        Self {
            id,
            deps,
            log,
            warmed: None,
            checking: false,
            checks: 0,
            drains: 0,
        }
    }

    /// Asks CanHandle for every route of its type it serves: for each new table revision or
    /// registration, and again at half the answers' lifetime, so that decisions find them
    /// cached. Also starts the health checks of a registration that asks for them.
    fn warm(&mut self, ctx: &mut Context<Self>) {
        let view = self.deps.published.get();
        let Some(inst) = view.instances.get(&self.id).cloned() else {
            // Gone from the view: the state actor stops this actor (retrying while busy).
            return;
        };
        if !self.checking && inst.record.health_check.is_some() {
            self.checking = true;
            self.schedule_check(ctx, true);
        }
        let ttl = Duration::from_millis(view.settings.value.can_handle_ttl_ms.into());
        let current = (view.routes.revision, inst.lease);
        if let Some((rev, lease, at)) = self.warmed {
            if (rev, lease) == current && at.elapsed() < ttl / 2 {
                return;
            }
        }
        self.warmed = Some((current.0, current.1, Instant::now()));
        let probe = self.deps.probe.clone();
        let work = async move {
            for route in view.routes.value.routes() {
                let r = &route.route;
                let flow = Flow {
                    protocol: r.protocol,
                    ..Default::default()
                };
                let serves = inst
                    .record
                    .serves()
                    .iter()
                    .any(|p| protocol_matches(*p, &flow))
                    || r.protocol == super::Protocol::Tcp;
                if r.target == inst.record.module_type && serves {
                    let ask = Ask::Refresh;
                    capabilities(
                        &view,
                        route,
                        &[&inst],
                        probe.as_ref(),
                        CAN_HANDLE_TIMEOUT,
                        ask,
                    )
                    .await;
                }
            }
        };
        ctx.spawn(work.into_actor(self));
    }

    fn schedule_check(&mut self, ctx: &mut Context<Self>, at_once: bool) {
        let view = self.deps.published.get();
        let Some(spec) = view
            .instances
            .get(&self.id)
            .and_then(|i| i.record.health_check.clone())
        else {
            self.checking = false;
            return;
        };
        let wait = if at_once {
            Duration::ZERO
        } else {
            Duration::from_millis(spec.interval_ms.into())
        };
        ctx.run_later(wait, |act, ctx| act.check(ctx));
    }

    fn check(&mut self, ctx: &mut Context<Self>) {
        let view = self.deps.published.get();
        let Some(inst) = view.instances.get(&self.id).cloned() else {
            self.checking = false;
            return;
        };
        let Some(spec) = inst.record.health_check.clone() else {
            self.checking = false;
            return;
        };
        self.checks += 1;
        let probe = self.deps.probe.health_check(
            &inst.target(),
            spec.kind,
            spec.deep,
            Duration::from_millis(spec.timeout_ms.into()),
        );
        ctx.spawn(probe.into_actor(self).map(move |res, act, ctx| {
            let failed = res.as_ref().err().cloned();
            let live = &inst.live;
            if live.check_result(res, spec.healthy_threshold, spec.unhealthy_threshold) {
                match failed {
                    Some(e) => {
                        info!(act.log, "module instance failed its health checks"; "error" => e)
                    }
                    None => info!(act.log, "module instance passes its health checks again"),
                }
            }
            act.schedule_check(ctx, false);
        }));
    }
}

impl Actor for ModuleActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.warm(ctx);
        ctx.run_interval(WARM_TICK, |act, ctx| act.warm(ctx));
    }
}

#[derive(Serialize)]
struct ModuleDump {
    instance_id: String,
    registered: bool,
    health: Option<String>,
    health_reason: Option<String>,
    missed_heartbeats: Option<u32>,
    local_connections: u64,
    decisions_here: u64,
    warmed_routes_revision: Option<i64>,
    health_checks_run: u64,
    checks: serde_json::Value,
    capabilities: serde_json::Value,
    drains: u64,
}

impl Managed for ModuleActor {
    const KIND: &'static str = "balancer-module";

    fn dump_state(&self) -> serde_json::Value {
        let view = self.deps.published.get();
        let inst = view.instances.get(&self.id);
        let now = super::now_ms();
        let health = inst.map(|i| i.health(now));
        serde_json::to_value(ModuleDump {
            instance_id: self.id.clone(),
            registered: inst.is_some(),
            health: health.as_ref().map(|h| h.0.as_str().to_string()),
            health_reason: health.map(|h| h.1),
            missed_heartbeats: inst.map(|i| i.missed(now)),
            local_connections: inst.map_or(0, |i| i.live.connections.load(Ordering::Relaxed)),
            decisions_here: inst.map_or(0, |i| i.live.decisions.load(Ordering::Relaxed)),
            warmed_routes_revision: self.warmed.map(|w| w.0),
            health_checks_run: self.checks,
            checks: inst
                .map(|i| serde_json::to_value(i.live.checks()).unwrap_or_default())
                .unwrap_or_default(),
            capabilities: inst
                .map(|i| serde_json::to_value(i.live.capabilities()).unwrap_or_default())
                .unwrap_or_default(),
            drains: self.drains,
        })
        .unwrap_or_default()
    }
}

impl Handler<Drain> for ModuleActor {
    type Result = actix::ResponseFuture<Result<Drained, BalancerError>>;

    fn handle(&mut self, msg: Drain, _: &mut Context<Self>) -> Self::Result {
        self.drains += 1;
        let view = self.deps.published.get();
        let probe = self.deps.probe.clone();
        let metrics = self.deps.metrics.clone();
        let Some(inst) = view.instances.get(&self.id).cloned() else {
            let id = self.id.clone();
            return Box::pin(async move {
                Err(BalancerError::NotFound(format!(
                    "instance_id: {id} is not registered"
                )))
            });
        };
        let reported = inst
            .report
            .as_ref()
            .map_or(0, |r| r.stats.active_connections);
        let target = inst.target();
        Box::pin(async move {
            let began = Instant::now();
            // The instance's own count covers every member's connections to it; an instance
            // that does not answer (it is shutting down, or gone) counts as drained.
            let open = |first: bool| {
                let probe = probe.clone();
                let target = target.clone();
                let live = inst.live.clone();
                async move {
                    let own = probe
                        .active_connections(&target, Duration::from_secs(1))
                        .await
                        .unwrap_or(if first { reported } else { 0 });
                    own.max(live.connections.load(Ordering::Relaxed))
                }
            };
            let initial = open(true).await;
            let mut remaining = initial;
            while remaining > 0 && Instant::now() < msg.deadline {
                let left = msg.deadline.saturating_duration_since(Instant::now());
                tokio::time::sleep(DRAIN_POLL.min(left)).await;
                remaining = open(false).await;
            }
            metrics.drains.inc();
            Ok(Drained {
                drained: initial.saturating_sub(remaining),
                remaining,
                took: began.elapsed(),
            })
        })
    }
}
