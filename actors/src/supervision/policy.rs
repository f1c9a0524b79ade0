//! Restart strategies, limits and backoff.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Which children a failure takes down with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Restart only the failed child.
    OneForOne,
    /// Stop all the other children, then restart them all.
    OneForAll,
    /// Stop the children started after the failed one, then restart it and them in order.
    RestForOne,
}

/// Whether a child that exits is started again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Restart {
    /// Always, whatever the exit.
    Permanent,
    /// Only after a failure (panic or reported failure), not after a clean exit.
    Transient,
    /// Never; the child is removed when it exits.
    Temporary,
}

/// At most `max_restarts` restarts within `within`; one more and the supervisor gives up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartLimit {
    /// Restarts allowed in the window.
    pub max_restarts: u32,
    /// Length of the sliding window.
    pub within: Duration,
}

impl Default for RestartLimit {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            within: Duration::from_secs(10),
        }
    }
}

/// Sliding-window record of restarts, checked against a [`RestartLimit`].
#[derive(Debug, Default)]
pub(crate) struct RestartHistory {
    at: VecDeque<Instant>,
}

impl RestartHistory {
    /// Records a restart at `now`; returns false when that exceeds the limit.
    pub fn allow(&mut self, limit: RestartLimit, now: Instant) -> bool {
        while self
            .at
            .front()
            .is_some_and(|t| now.duration_since(*t) > limit.within)
        {
            self.at.pop_front();
        }
        self.at.push_back(now);
        self.at.len() <= limit.max_restarts as usize
    }

    /// Restarts inside the window as of the last check.
    pub fn len(&self) -> usize {
        self.at.len()
    }
}

/// Exponential backoff with jitter between a failure and the restart.
///
/// The n-th consecutive failure waits `initial * 2^(n-1)`, capped at `max`, minus a random part of
/// up to `jitter` of it, so that many children failing together do not restart in lockstep.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Upper bound of the delay.
    pub max: Duration,
    /// Fraction (0..=1) of the delay that is randomised away.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(10),
            max: Duration::from_secs(5),
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// The delay's bounds before jitter is drawn: (lowest, highest).
    pub fn bounds(&self, attempt: u32) -> (Duration, Duration) {
        let shift = attempt.saturating_sub(1).min(30);
        let base = self.initial.saturating_mul(1u32 << shift).min(self.max);
        let low = base.mul_f64(1.0 - self.jitter.clamp(0.0, 1.0));
        (low, base)
    }

    /// The delay before restart number `attempt` (1-based) of a run of consecutive failures.
    pub fn delay(&self, attempt: u32) -> Duration {
        let (low, high) = self.bounds(attempt);
        low + (high - low).mul_f64(fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1_000),
            jitter: 0.25,
        };
        for attempt in 1..=8 {
            let expected_high = Duration::from_millis((100u64 << (attempt - 1)).min(1_000));
            let (low, high) = b.bounds(attempt);
            assert_eq!(high, expected_high);
            assert_eq!(low, expected_high.mul_f64(0.75));
            for _ in 0..50 {
                let d = b.delay(attempt);
                assert!(d >= low && d <= high, "attempt {attempt}: {d:?}");
            }
        }
    }

    #[test]
    fn history_allows_the_limit_then_refuses_and_forgets_old_restarts() {
        let limit = RestartLimit {
            max_restarts: 3,
            within: Duration::from_secs(10),
        };
        let mut h = RestartHistory::default();
        let t0 = Instant::now();
        assert!(h.allow(limit, t0));
        assert!(h.allow(limit, t0 + Duration::from_secs(1)));
        assert!(h.allow(limit, t0 + Duration::from_secs(2)));
        assert!(!h.allow(limit, t0 + Duration::from_secs(3)));
        // Eleven seconds on, the first restarts have left the window.
        let mut h = RestartHistory::default();
        for s in 0..3 {
            assert!(h.allow(limit, t0 + Duration::from_secs(s)));
        }
        assert!(h.allow(limit, t0 + Duration::from_secs(12)));
        assert_eq!(h.len(), 2);
    }
}
