//! A lock-free log2 histogram of handler latencies.
//!
//! 32 buckets of powers of two from 64 ns to about 2 minutes: coarse, but enough to tell a 1 µs
//! handler from a 1 ms one, and small enough (128 bytes) to give every busy actor one.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const BUCKETS: usize = 32;
const FIRST_POW: u32 = 6; // bucket 0 holds everything below 2^7 ns

/// Handler latency distribution of one actor.
pub struct LatencyHistogram {
    buckets: [AtomicU32; BUCKETS],
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }
}

impl LatencyHistogram {
    /// Records one observation.
    pub fn record(&self, elapsed: Duration) {
        let ns = elapsed.as_nanos().min(u64::MAX as u128) as u64;
        let pow = 63 - ns.max(1).leading_zeros();
        let idx = pow.saturating_sub(FIRST_POW).min(BUCKETS as u32 - 1) as usize;
        self.buckets[idx].fetch_add(1, Ordering::Relaxed);
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed) as u64)
            .sum()
    }

    /// The `q` quantile (0..=1) in microseconds: the upper bound of the bucket holding it, so the
    /// answer over-estimates by at most a factor of two. `None` without observations.
    pub fn quantile_us(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed) as u64)
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let upper_ns = 2f64.powi((i as u32 + FIRST_POW + 1) as i32);
                return Some(upper_ns / 1_000.0);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_land_in_the_right_power_of_two() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile_us(0.5), None);
        for _ in 0..98 {
            h.record(Duration::from_micros(3)); // 3000 ns -> bucket up to 4096 ns
        }
        h.record(Duration::from_millis(5));
        h.record(Duration::from_millis(5));
        let p50 = h.quantile_us(0.5).unwrap();
        assert!((3.0..=4.1).contains(&p50), "p50 {p50}");
        let p99 = h.quantile_us(0.99).unwrap();
        assert!((5_000.0..=8_400.0).contains(&p99), "p99 {p99}");
        assert_eq!(h.count(), 100);
    }
}
