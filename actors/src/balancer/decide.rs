//! Where a flow goes: the one decision shared by `RouteRequest` and the data plane.
//!
//! 1. Routes are tried in order (priority, then id); the first route that has a candidate wins.
//! 2. Candidates: instances of the route's target type that are routable (healthy or degraded,
//!    not draining, not avoided after a failed connection), serve the flow's protocol, are not
//!    full, are not excluded by the caller (a retry after a failed connect), and said yes to
//!    CanHandle for the route (answers cached; missing ones asked at once, concurrently).
//! 3. Rate limits of the route and of the target type are checked (not for a dry run).
//! 4. The version follows the type's blue/green weights (smooth weighted round robin, so 10,000
//!    decisions split exactly as weighted); with no weights set, every version is one pool.
//! 5. The lowest load score wins; ties go round in turn.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::flow::{Flow, ModuleType};
use super::instance::{Capability, Instance};
use super::model::LimitTarget;
use super::probe::ModuleProbe;
use super::route::{protocol_matches, CompiledRoute};
use super::traffic::Split;
use super::view::View;
use super::BalancerError;
use crate::quote::echo;

/// How long a decision waits for instances to answer CanHandle.
pub const CAN_HANDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a failed CanHandle counts as "cannot".
pub const FAILED_ANSWER_TTL: Duration = Duration::from_secs(2);

/// Which CanHandle answers [`capabilities`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    /// Cached ones while good; the rest asked now and kept.
    Cached,
    /// All asked now and kept (the module actors refresh answers before they expire, so that
    /// decisions rarely wait for one).
    Refresh,
    /// All asked now, none kept: a route that is not in the table (ValidateRoute) must not
    /// stand in for the table's route of the same id.
    Hypothetical,
}

/// The outcome of a decision.
#[derive(Clone, Debug)]
pub struct Decision {
    pub instance: Instance,
    pub route: CompiledRoute,
    pub load_score: u32,
    pub dry_run: bool,
}

/// What decisions remember between calls: the version splits and the tie-breaking turn.
#[derive(Default)]
pub struct Decider {
    splits: Mutex<HashMap<ModuleType, Split>>,
    turn: AtomicU64,
    /// Decisions made per route on this node.
    per_route: Mutex<HashMap<String, u64>>,
}

/// Why one instance is not a candidate (for the error message).
fn refusal(i: &Instance, flow: &Flow, now_ms: i64, exclude: &[String]) -> Option<String> {
    let id = &i.record.instance_id;
    if exclude.contains(id) {
        return Some(format!("{id}: its connection just failed"));
    }
    let (health, why) = i.health(now_ms);
    if !health.routable() {
        return Some(format!("{id}: {} ({why})", health.as_str()));
    }
    if !i.record.serves().iter().any(|p| protocol_matches(*p, flow)) {
        return Some(format!("{id}: does not serve {}", flow.protocol));
    }
    if i.full() {
        return Some(format!(
            "{id}: full ({}/{} connections)",
            i.sample().active_connections,
            i.record.max_connections
        ));
    }
    None
}

/// The CanHandle answers of `instances` for `route`: cached ones, and the rest asked now.
pub async fn capabilities(
    view: &View,
    route: &CompiledRoute,
    instances: &[&Instance],
    probe: &dyn ModuleProbe,
    timeout: Duration,
    ask: Ask,
) -> Vec<Capability> {
    let refresh = ask != Ask::Cached;
    let ttl = Duration::from_millis(view.settings.value.can_handle_ttl_ms.into());
    let rev = view.routes.revision;
    let id = &route.route.route_id;
    let mut answers: Vec<Option<Capability>> = instances
        .iter()
        .map(|i| {
            if refresh {
                None
            } else {
                i.live.capability(id, rev)
            }
        })
        .collect();
    let mut asking = tokio::task::JoinSet::new();
    for (n, i) in instances.iter().enumerate() {
        if answers[n].is_none() {
            let ask = probe.can_handle(&i.target(), &route.route, timeout);
            asking.spawn(async move { (n, ask.await) });
        }
    }
    while let Some(Ok((n, answer))) = asking.join_next().await {
        let c = match answer {
            Ok(a) => Capability {
                can_handle: a.can_handle,
                priority: a.priority,
                reason: a.reason,
                routes_revision: rev,
                expires: Some(Instant::now() + ttl),
            },
            // Kept briefly, so that an unreachable instance is not asked on every decision,
            // but a module whose control server was not up yet is asked again soon.
            Err(e) => Capability {
                can_handle: false,
                priority: 0,
                reason: format!("CanHandle failed: {e}"),
                routes_revision: rev,
                expires: Some(Instant::now() + FAILED_ANSWER_TTL),
            },
        };
        if ask != Ask::Hypothetical {
            instances[n].live.remember(id, c.clone());
        }
        answers[n] = Some(c);
    }
    answers
        .into_iter()
        .map(|a| {
            a.unwrap_or(Capability {
                can_handle: false,
                priority: 0,
                reason: "CanHandle was not answered".into(),
                routes_revision: rev,
                expires: None,
            })
        })
        .collect()
}

impl Decider {
    /// Decides where `flow` goes. `exclude` lists instances a caller just failed to reach;
    /// `retry` marks such a second try, which the rate limits already admitted.
    #[allow(clippy::too_many_arguments)]
    pub async fn decide(
        &self,
        view: &View,
        flow: &Flow,
        dry_run: bool,
        exclude: &[String],
        retry: bool,
        probe: &dyn ModuleProbe,
        now_ms: i64,
    ) -> Result<Decision, BalancerError> {
        let mut reasons = Vec::new();
        for route in view.routes.value.matching(flow) {
            let r = &route.route;
            let mut possible = Vec::new();
            let mut refused = Vec::new();
            for i in view.of_type(r.target) {
                match refusal(i, flow, now_ms, exclude) {
                    Some(why) => refused.push(why),
                    None => possible.push(i),
                }
            }
            let answers = capabilities(
                view,
                route,
                &possible,
                probe,
                CAN_HANDLE_TIMEOUT,
                Ask::Cached,
            )
            .await;
            let mut candidates = Vec::new();
            for (i, c) in possible.into_iter().zip(answers) {
                if c.can_handle {
                    candidates.push(i);
                } else {
                    refused.push(format!(
                        "{}: cannot handle it ({})",
                        i.record.instance_id, c.reason
                    ));
                }
            }
            if candidates.is_empty() {
                let why = if refused.is_empty() {
                    format!("no {} instance is registered", r.target)
                } else {
                    refused.join("; ")
                };
                reasons.push(format!(
                    "route {} ({} instances): {why}",
                    r.route_id, r.target
                ));
                continue;
            }
            if !dry_run && !retry {
                let targets = [
                    LimitTarget::Route(r.route_id.clone()),
                    LimitTarget::Module(r.target),
                ];
                view.limiters
                    .check(&targets)
                    .map_err(BalancerError::Exhausted)?;
            }
            let pool = self.version_pool(view, r.target, candidates, dry_run, now_ms);
            let chosen = self.least_loaded(&pool, dry_run);
            let load_score = chosen.load_score();
            if !dry_run {
                chosen.live.decisions.fetch_add(1, Ordering::Relaxed);
                *self
                    .per_route
                    .lock()
                    .expect("route counts")
                    .entry(r.route_id.clone())
                    .or_default() += 1;
            }
            return Ok(Decision {
                instance: chosen.clone(),
                route: route.clone(),
                load_score,
                dry_run,
            });
        }
        if reasons.is_empty() {
            // The flow's strings are the caller's (RouteRequest): shown cut short.
            return Err(BalancerError::NotFound(format!(
                "no route matches {} from {} port {} to {} port {}{}",
                flow.protocol,
                echo(&flow.source),
                flow.source_port,
                echo(&flow.destination),
                flow.destination_port,
                if flow.path.is_empty() {
                    String::new()
                } else {
                    format!(" path {}", echo(&flow.path))
                }
            )));
        }
        Err(BalancerError::Unavailable(format!(
            "no instance can take the flow: {}",
            reasons.join(" | ")
        )))
    }

    /// Decisions made for `route_id` on this node.
    pub fn decisions_for(&self, route_id: &str) -> u64 {
        self.per_route
            .lock()
            .expect("route counts")
            .get(route_id)
            .copied()
            .unwrap_or(0)
    }

    /// The candidates of the version the weights pick (all of them when no weights are set, or
    /// when no weighted version has a candidate: traffic then goes where it can).
    fn version_pool<'a>(
        &self,
        view: &View,
        t: ModuleType,
        candidates: Vec<&'a Instance>,
        dry_run: bool,
        now_ms: i64,
    ) -> Vec<&'a Instance> {
        let weights = view.traffic_of(t).value.weights_at(now_ms);
        if weights.is_empty() {
            return candidates;
        }
        let mut by_version: BTreeMap<&str, Vec<&'a Instance>> = BTreeMap::new();
        for i in &candidates {
            by_version
                .entry(i.record.version.as_str())
                .or_default()
                .push(i);
        }
        let offered: Vec<(&str, u32)> = weights
            .iter()
            .filter(|(v, w)| *w > 0 && by_version.contains_key(v.as_str()))
            .map(|(v, w)| (v.as_str(), *w))
            .collect();
        let picked = {
            let mut splits = self.splits.lock().expect("split lock");
            let split = splits.entry(t).or_default();
            if dry_run {
                // A dry run must not move the split.
                split.clone().pick(&offered)
            } else {
                split.pick(&offered)
            }
        };
        match picked {
            Some(n) => by_version.remove(offered[n].0).unwrap_or(candidates),
            None => candidates,
        }
    }

    fn least_loaded<'a>(&self, pool: &[&'a Instance], dry_run: bool) -> &'a Instance {
        let scores: Vec<u32> = pool.iter().map(|i| i.load_score()).collect();
        let best = *scores.iter().min().expect("a pool is never empty");
        let tied: Vec<&Instance> = pool
            .iter()
            .zip(&scores)
            .filter(|(_, s)| **s == best)
            .map(|(i, _)| *i)
            .collect();
        let turn = if dry_run {
            self.turn.load(Ordering::Relaxed)
        } else {
            self.turn.fetch_add(1, Ordering::Relaxed)
        };
        tied[(turn % tied.len() as u64) as usize]
    }
}
