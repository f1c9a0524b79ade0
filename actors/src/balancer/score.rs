//! How loaded an instance is (its load score), how evenly a set of instances is loaded (the
//! balance score), and which instances should shed connections to even it out.

use serde::{Deserialize, Serialize};

/// The connection count taken as saturation for an instance without a connection limit.
pub const UNLIMITED_SATURATION_CONNECTIONS: f64 = 1000.0;

/// What is known of one instance's load.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadSample {
    #[serde(default)]
    pub active_connections: u64,
    /// 0 = no limit.
    #[serde(default)]
    pub max_connections: u32,
    #[serde(default)]
    pub cpu_percent: f64,
    #[serde(default)]
    pub latency_ms: f64,
    #[serde(default)]
    pub queue_depth: u64,
}

/// A measured figure as a fraction of its saturation point, in 0..=1. NaN and negative figures
/// (a broken or missing report) count as 0 rather than poisoning the score.
fn fraction(value: f64, saturation: f64) -> f64 {
    let f = value / saturation;
    if f.is_nan() || f <= 0.0 {
        0.0
    } else {
        f.min(1.0)
    }
}

/// How loaded an instance is: 0 (idle) ..= 100 (saturated).
///
/// `score = round(100 × (0.4·c + 0.3·u + 0.2·l + 0.1·q))`, clamped to 0..=100, where
///
/// - `c` = active connections / `max_connections` (with no limit: / 1000), capped at 1;
/// - `u` = `cpu_percent` / 100, capped to 0..=1;
/// - `l` = `latency_ms` / 1000 (a second or more is saturated), capped at 1;
/// - `q` = `queue_depth` / 100, capped at 1.
///
/// NaN and negative inputs count as 0.
///
/// Why these weights: connections dominate because an L4 balancer places connections, and an
/// instance near its connection limit is about to refuse work whatever its CPU says; CPU comes
/// next as the usual bottleneck of the work those connections carry; latency and queue depth
/// weigh least because they are early signs of trouble, noisy on their own, that move before
/// the other two do.
pub fn load_score(s: &LoadSample) -> u32 {
    let limit = if s.max_connections == 0 {
        UNLIMITED_SATURATION_CONNECTIONS
    } else {
        f64::from(s.max_connections)
    };
    let c = fraction(s.active_connections as f64, limit);
    let u = fraction(s.cpu_percent, 100.0);
    let l = fraction(s.latency_ms, 1000.0);
    let q = fraction(s.queue_depth as f64, 100.0);
    let score = (40.0 * c + 30.0 * u + 20.0 * l + 10.0 * q).round();
    score.clamp(0.0, 100.0) as u32
}

/// Whether the instance must not get a new connection: it has a limit (`max_connections` > 0)
/// and has reached it.
pub fn is_full(s: &LoadSample) -> bool {
    s.max_connections > 0 && s.active_connections >= u64::from(s.max_connections)
}

/// How evenly a set of instances is loaded, 0..=100 (100 = perfectly even), from their load
/// scores.
///
/// `round(100 × (1 − min(1, σ/μ)))`, with σ the population standard deviation and μ the mean
/// of the scores: one minus their coefficient of variation. Dividing by the mean makes the
/// figure independent of the load level (scores of 10 and 30 are as uneven as 40 and 120 would
/// be); a spread as large as the mean or larger is as bad as it gets (0).
///
/// 100 when there are fewer than two instances (nothing to be uneven), all scores are equal,
/// or all are 0 (an idle set is not unbalanced).
pub fn balance_score(scores: &[u32]) -> u32 {
    if scores.len() < 2 {
        return 100;
    }
    let n = scores.len() as f64;
    let mean = scores.iter().map(|&s| f64::from(s)).sum::<f64>() / n;
    if mean == 0.0 {
        return 100;
    }
    let variance = scores
        .iter()
        .map(|&s| (f64::from(s) - mean).powi(2))
        .sum::<f64>()
        / n;
    let cv = (variance.sqrt() / mean).min(1.0);
    (100.0 * (1.0 - cv)).round().clamp(0.0, 100.0) as u32
}

/// For `RebalanceLoad`: the instances whose score exceeds the mean score by more than
/// `threshold` points, each with how many connections to shed to bring it down to the mean:
/// `ceil(active × (score − mean) / score)`, at least 1 — assuming the score falls in proportion
/// to the connections, which is what connections can do about it.
///
/// Input: `(instance id, score, active connections)`; output: `(instance id, connections to
/// shed)`, sorted by instance id. An instance with no active connection is left out (its load
/// is not connections, and there is nothing to shed). The arithmetic is exact (integers), so
/// the plan does not depend on floating-point rounding.
pub fn shed_plan(instances: &[(String, u32, u64)], threshold: u32) -> Vec<(String, u64)> {
    if instances.is_empty() {
        return Vec::new();
    }
    // Everything scaled by n, so the mean (sum / n) stays an integer: score − mean > threshold
    // ⇔ score·n − sum > threshold·n.
    let n = instances.len() as u128;
    let sum: u128 = instances.iter().map(|(_, s, _)| u128::from(*s)).sum();
    let mut plan: Vec<(String, u64)> = instances
        .iter()
        .filter_map(|(id, score, active)| {
            let scaled = u128::from(*score) * n;
            if *active == 0 || scaled <= sum || scaled - sum <= u128::from(threshold) * n {
                return None;
            }
            // ceil(active × (score·n − sum) / (score·n)); score > mean ≥ 0, so scaled > 0.
            let num = u128::from(*active) * (scaled - sum);
            let shed = num.div_ceil(scaled).max(1);
            Some((id.clone(), u64::try_from(shed).unwrap_or(u64::MAX)))
        })
        .collect();
    plan.sort_by(|a, b| a.0.cmp(&b.0));
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(conns: u64, max: u32, cpu: f64, latency: f64, queue: u64) -> LoadSample {
        LoadSample {
            active_connections: conns,
            max_connections: max,
            cpu_percent: cpu,
            latency_ms: latency,
            queue_depth: queue,
        }
    }

    #[test]
    fn load_score_idle_and_saturated() {
        assert_eq!(load_score(&LoadSample::default()), 0);
        assert_eq!(load_score(&sample(100, 100, 100.0, 1000.0, 100)), 100);
        // Over every saturation point it is still 100.
        assert_eq!(load_score(&sample(5000, 100, 250.0, 9000.0, 10_000)), 100);
    }

    #[test]
    fn load_score_each_term() {
        // Half the connection limit: 0.4 × 0.5 = 20.
        assert_eq!(load_score(&sample(50, 100, 0.0, 0.0, 0)), 20);
        // No limit: 250 / 1000 × 40 = 10.
        assert_eq!(load_score(&sample(250, 0, 0.0, 0.0, 0)), 10);
        // CPU 50 %: 15.
        assert_eq!(load_score(&sample(0, 0, 50.0, 0.0, 0)), 15);
        // Latency 250 ms: 5.
        assert_eq!(load_score(&sample(0, 0, 0.0, 250.0, 0)), 5);
        // Queue 30: 3.
        assert_eq!(load_score(&sample(0, 0, 0.0, 0.0, 30)), 3);
    }

    #[test]
    fn load_score_mixed_and_rounded() {
        // 0.4 × 0.75 + 0.3 × 0.6 + 0.2 × 0.12 + 0.1 × 0.05 = 0.3 + 0.18 + 0.024 + 0.005 = 50.9
        assert_eq!(load_score(&sample(75, 100, 60.0, 120.0, 5)), 51);
        // 0.4 × 0.1 + 0.3 × 0.21 = 4 + 6.3 = 10.3
        assert_eq!(load_score(&sample(100, 0, 21.0, 0.0, 0)), 10);
    }

    #[test]
    fn load_score_ignores_nan_and_negative() {
        assert_eq!(load_score(&sample(0, 0, f64::NAN, -5.0, 0)), 0);
        assert_eq!(load_score(&sample(0, 0, -20.0, f64::NAN, 50)), 5);
        assert_eq!(load_score(&sample(0, 0, f64::INFINITY, 0.0, 0)), 30);
    }

    #[test]
    fn full_only_with_a_limit() {
        assert!(!is_full(&sample(1_000_000, 0, 0.0, 0.0, 0)));
        assert!(!is_full(&sample(99, 100, 0.0, 0.0, 0)));
        assert!(is_full(&sample(100, 100, 0.0, 0.0, 0)));
        assert!(is_full(&sample(101, 100, 0.0, 0.0, 0)));
    }

    #[test]
    fn balance_score_trivial_cases() {
        assert_eq!(balance_score(&[]), 100);
        assert_eq!(balance_score(&[90]), 100);
        assert_eq!(balance_score(&[0, 0, 0]), 100);
        assert_eq!(balance_score(&[40, 40, 40]), 100);
    }

    #[test]
    fn balance_score_values() {
        // μ 20, σ 10: cv 0.5.
        assert_eq!(balance_score(&[10, 30]), 50);
        // μ 50, σ √(200/3) ≈ 8.165: cv 0.1633 → 83.67.
        assert_eq!(balance_score(&[40, 50, 60]), 84);
        // σ = μ: 0.
        assert_eq!(balance_score(&[0, 100]), 0);
        // σ > μ is capped: 0.
        assert_eq!(balance_score(&[0, 0, 100]), 0);
        // μ 52.5, σ = √((12.5² + 2.5² + 7.5² + 2.5²) / 4) = √56.25 = 7.5: cv 0.142857 → 85.71.
        assert_eq!(balance_score(&[40, 55, 60, 55]), 86);
    }

    #[test]
    fn shed_plan_values() {
        let inst = |id: &str, score: u32, active: u64| (id.to_string(), score, active);
        // Mean 50.
        let set = vec![inst("c", 30, 40), inst("a", 90, 100), inst("b", 30, 50)];
        // a exceeds by 40: ceil(100 × 40 / 90) = ceil(44.4) = 45.
        assert_eq!(shed_plan(&set, 20), vec![("a".to_string(), 45)]);
        assert_eq!(shed_plan(&set, 39), vec![("a".to_string(), 45)]);
        // "More than": exactly 40 over is not enough.
        assert_eq!(shed_plan(&set, 40), vec![]);
    }

    #[test]
    fn shed_plan_fractional_mean_sorted_and_at_least_one() {
        let inst = |id: &str, score: u32, active: u64| (id.to_string(), score, active);
        // Mean 35 + 1/3 = (80 + 81 + 10 + 10 + 10 + 21) / 6 = 212 / 6.
        let set = vec![
            inst("z", 80, 3),
            inst("m", 81, 1000),
            inst("x", 10, 5),
            inst("y", 10, 5),
            inst("w", 10, 5),
            inst("idle", 21, 0),
        ];
        // z: 3 × (80 − 35.33) / 80 = 1.675 → 2; m: 1000 × 45.67 / 81 = 563.79 → 564.
        assert_eq!(
            shed_plan(&set, 44),
            vec![("m".to_string(), 564), ("z".to_string(), 2)]
        );
        // z is 44.67 over: not more than 45, m (45.67) is.
        assert_eq!(shed_plan(&set, 45), vec![("m".to_string(), 564)]);
        // A tiny excess over a single connection still sheds one.
        let set = vec![inst("a", 51, 1), inst("b", 49, 1)];
        assert_eq!(shed_plan(&set, 0), vec![("a".to_string(), 1)]);
        assert_eq!(shed_plan(&[], 0), vec![]);
        // Nothing to shed from an instance with no connection.
        let set = vec![inst("a", 100, 0), inst("b", 0, 10)];
        assert_eq!(shed_plan(&set, 0), vec![]);
    }
}
