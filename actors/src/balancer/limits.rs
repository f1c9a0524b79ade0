//! Rate limits of routes and module types: per second (with a burst), per minute and per hour,
//! each a GCRA limiter from `governor`.
//!
//! Limits are enforced by every node on what it decides, like the per-instance limits of the load
//! balancers they replace: a cluster of N nodes admits up to N times a limit in total. Keeping
//! one shared count would put every decision through raft.
//!
//! The windows are checked shortest first: a burst is refused by the per-second window without
//! spending the scarce per-hour allowance, while a request the per-second window admits and a
//! longer window refuses spends only a per-second cell.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use super::model::{LimitTarget, RateLimitSpec};

type Window<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// One target's windows.
pub struct Limiter<C: Clock = DefaultClock> {
    spec: RateLimitSpec,
    windows: Vec<(&'static str, Window<C>)>,
}

impl<C: Clock + Clone> Limiter<C> {
    /// The limiter of `spec` (already validated), on `clock`.
    pub fn with_clock(spec: RateLimitSpec, clock: &C) -> Self {
        let mut windows = Vec::new();
        if let Some(n) = NonZeroU32::new(spec.per_second) {
            let burst = NonZeroU32::new(spec.burst).unwrap_or(n);
            let q = Quota::per_second(n).allow_burst(burst);
            windows.push(("second", RateLimiter::direct_with_clock(q, clock.clone())));
        }
        if let Some(n) = NonZeroU32::new(spec.per_minute) {
            let q = Quota::per_minute(n);
            windows.push(("minute", RateLimiter::direct_with_clock(q, clock.clone())));
        }
        if let Some(n) = NonZeroU32::new(spec.per_hour) {
            let q = Quota::per_hour(n);
            windows.push(("hour", RateLimiter::direct_with_clock(q, clock.clone())));
        }
        Self { spec, windows }
    }

    /// The spec it enforces.
    pub fn spec(&self) -> &RateLimitSpec {
        &self.spec
    }

    /// Admits one request, or names the window that refused it.
    pub fn check(&self) -> Result<(), &'static str> {
        for (name, w) in &self.windows {
            if w.check().is_err() {
                return Err(name);
            }
        }
        Ok(())
    }
}

/// The limiters of every target. Rebuilt from the stored limits on every change, keeping the
/// limiter (and so its count) of every spec that did not change.
pub struct LimitSet<C: Clock = DefaultClock> {
    clock: C,
    by_target: HashMap<LimitTarget, Arc<Limiter<C>>>,
}

impl Default for LimitSet<DefaultClock> {
    fn default() -> Self {
        Self::with_clock(DefaultClock::default())
    }
}

impl<C: Clock + Clone> LimitSet<C> {
    /// No limits, on `clock`.
    pub fn with_clock(clock: C) -> Self {
        Self {
            clock,
            by_target: HashMap::new(),
        }
    }

    /// The set for `specs`, reusing this set's limiters whose spec is unchanged. Specs that do not
    /// validate (written by a newer node, say) are skipped.
    pub fn rebuilt(&self, specs: &[RateLimitSpec]) -> Self {
        let mut by_target = HashMap::new();
        for spec in specs {
            let Ok(target) = spec.validate("limit") else {
                continue;
            };
            let limiter = match self.by_target.get(&target) {
                Some(l) if l.spec() == spec => l.clone(),
                _ => Arc::new(Limiter::with_clock(spec.clone(), &self.clock)),
            };
            by_target.insert(target, limiter);
        }
        Self {
            clock: self.clock.clone(),
            by_target,
        }
    }

    /// The limiter of `target`, if it has one.
    pub fn get(&self, target: &LimitTarget) -> Option<&Arc<Limiter<C>>> {
        self.by_target.get(target)
    }

    /// Admits one request through every limiter of `targets`, or says which refused it.
    pub fn check(&self, targets: &[LimitTarget]) -> Result<(), String> {
        for t in targets {
            if let Some(l) = self.by_target.get(t) {
                l.check().map_err(|window| {
                    let name = match t {
                        LimitTarget::Route(id) => format!("route:{id}"),
                        LimitTarget::Module(m) => format!("module:{m}"),
                    };
                    format!("rate limit of {name} reached (per {window})")
                })?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use governor::clock::FakeRelativeClock;

    use super::*;
    use crate::balancer::ModuleType;

    fn spec(target: &str, s: u32, m: u32, h: u32, burst: u32) -> RateLimitSpec {
        RateLimitSpec {
            target: target.into(),
            per_second: s,
            per_minute: m,
            per_hour: h,
            burst,
        }
    }

    fn admitted(set: &LimitSet<FakeRelativeClock>, t: &LimitTarget, n: usize) -> usize {
        (0..n)
            .filter(|_| set.check(std::slice::from_ref(t)).is_ok())
            .count()
    }

    #[test]
    fn a_burst_is_held_to_the_burst_then_to_the_rate() {
        let clock = FakeRelativeClock::default();
        let set = LimitSet::with_clock(clock.clone()).rebuilt(&[spec("route:web", 10, 0, 0, 5)]);
        let web = LimitTarget::Route("web".into());
        assert_eq!(admitted(&set, &web, 1000), 5);
        clock.advance(Duration::from_millis(1000));
        // A second replenishes 10 cells, capped by the burst of 5.
        assert_eq!(admitted(&set, &web, 1000), 5);
        clock.advance(Duration::from_millis(100));
        assert_eq!(admitted(&set, &web, 1000), 1);
        assert!(set.check(&[web]).unwrap_err().contains("route:web"));
    }

    #[test]
    fn longer_windows_cap_what_the_short_one_allows_and_refusals_spare_them() {
        let clock = FakeRelativeClock::default();
        let set = LimitSet::with_clock(clock.clone()).rebuilt(&[spec("module:alb", 10, 15, 0, 10)]);
        let alb = LimitTarget::Module(ModuleType::Alb);
        // A burst of 1000: the per-second window admits 10 and refuses the rest before the
        // per-minute window sees them.
        assert_eq!(admitted(&set, &alb, 1000), 10);
        clock.advance(Duration::from_secs(1));
        // Only 5 left in the minute.
        assert_eq!(admitted(&set, &alb, 1000), 5);
        let e = set.check(std::slice::from_ref(&alb)).unwrap_err();
        assert!(
            e.ends_with("(per second)") || e.ends_with("(per minute)"),
            "{e}"
        );
        clock.advance(Duration::from_secs(1));
        assert!(set.check(&[alb]).unwrap_err().ends_with("(per minute)"));
    }

    #[test]
    fn rebuilding_keeps_unchanged_counts_and_resets_changed_ones() {
        let clock = FakeRelativeClock::default();
        let a = spec("route:a", 1, 0, 0, 0);
        let b = spec("route:b", 1, 0, 0, 0);
        let set = LimitSet::with_clock(clock).rebuilt(&[a.clone(), b]);
        let (ta, tb) = (
            LimitTarget::Route("a".into()),
            LimitTarget::Route("b".into()),
        );
        assert_eq!(admitted(&set, &ta, 5), 1);
        assert_eq!(admitted(&set, &tb, 5), 1);
        let set = set.rebuilt(&[a, spec("route:b", 2, 0, 0, 0)]);
        assert_eq!(admitted(&set, &ta, 5), 0, "unchanged: still spent");
        assert_eq!(admitted(&set, &tb, 5), 2, "changed: a new limiter");
        let set = set.rebuilt(&[]);
        assert_eq!(admitted(&set, &ta, 5), 5, "removed: no limit");
    }
}
