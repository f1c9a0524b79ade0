//! Autoscaler decisions: from the load of a module type's healthy instances, its scaling
//! configuration and what the scaler remembers of its last actions, how many instances there
//! should be. Pure: the caller measures, passes the time, delivers the decision and stores
//! [`remember`]'s result.

use serde::{Deserialize, Serialize};

/// The most instances a configuration may ask for; more is a typo, not a plan.
pub const MAX_INSTANCES_LIMIT: u32 = 1000;

/// A module type's autoscaling configuration, as stored (JSON). Missing fields take the
/// defaults (the original system's figures).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScalingConfig {
    /// Off by default: scaling starts and stops real instances, so it must be asked for.
    pub enabled: bool,
    pub min_instances: u32,
    /// At most [`MAX_INSTANCES_LIMIT`].
    pub max_instances: u32,
    /// The mean CPU use (percent) one instance should run at.
    pub target_cpu_percent: f64,
    /// The mean memory use (percent) one instance should run at.
    pub target_memory_percent: f64,
    /// The active connections one instance should carry.
    pub target_connections_per_instance: u32,
    /// Scale up when the pressure (see [`decide`]) reaches this.
    pub scale_up_threshold: f64,
    /// Scale down when the pressure falls to this; below `scale_up_threshold`, so that the gap
    /// between them keeps the scaler from flapping.
    pub scale_down_threshold: f64,
    /// The least time between two scale-ups, so that new instances get to take load before the
    /// next decision counts it.
    pub scale_up_cooldown_ms: u64,
    /// The least time after any scaling before a scale-down; longer than the up cooldown
    /// because removing capacity too early costs more than keeping it a little longer.
    pub scale_down_cooldown_ms: u64,
}

impl Default for ScalingConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            min_instances: 1,
            max_instances: 10,
            target_cpu_percent: 70.0,
            target_memory_percent: 80.0,
            target_connections_per_instance: 1000,
            scale_up_threshold: 0.8,
            scale_down_threshold: 0.3,
            scale_up_cooldown_ms: 180_000,
            scale_down_cooldown_ms: 300_000,
        }
    }
}

/// Whether `x` is a usable positive figure (NaN and infinity are not).
fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

impl ScalingConfig {
    /// Checks the configuration; the error names the field (`config.max_instances: 0 is below
    /// min_instances 1`). Rules: `min_instances ≤ max_instances`, `1 ≤ max_instances ≤ 1000`,
    /// every target above 0, and `0 < scale_down_threshold < scale_up_threshold` (finite).
    pub fn validate(&self) -> Result<(), String> {
        if self.max_instances < self.min_instances {
            return Err(format!(
                "config.max_instances: {} is below min_instances {}",
                self.max_instances, self.min_instances
            ));
        }
        if self.max_instances == 0 {
            return Err("config.max_instances: 0 must be at least 1".into());
        }
        if self.max_instances > MAX_INSTANCES_LIMIT {
            return Err(format!(
                "config.max_instances: {} is over the limit {MAX_INSTANCES_LIMIT}",
                self.max_instances
            ));
        }
        for (name, value) in [
            ("target_cpu_percent", self.target_cpu_percent),
            ("target_memory_percent", self.target_memory_percent),
            ("scale_down_threshold", self.scale_down_threshold),
            ("scale_up_threshold", self.scale_up_threshold),
        ] {
            if !positive(value) {
                return Err(format!(
                    "config.{name}: {value} must be a finite number above 0"
                ));
            }
        }
        if self.target_connections_per_instance == 0 {
            return Err("config.target_connections_per_instance: 0 must be above 0".into());
        }
        if self.scale_up_threshold <= self.scale_down_threshold {
            return Err(format!(
                "config.scale_up_threshold: {} must be above scale_down_threshold {}",
                self.scale_up_threshold, self.scale_down_threshold
            ));
        }
        Ok(())
    }
}

/// The load of one healthy instance (unhealthy instances are not passed in: they carry no load
/// the others could take over from them, and they are not capacity).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceLoad {
    #[serde(default)]
    pub cpu_percent: f64,
    #[serde(default)]
    pub memory_percent: f64,
    #[serde(default)]
    pub connections: u64,
}

/// What the scaler remembers between decisions, stored with the configuration. Times of 0 (or
/// less) mean "never".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScalingMemory {
    #[serde(default)]
    pub last_up_ms: i64,
    #[serde(default)]
    pub last_down_ms: i64,
    /// The instance count last decided; 0 = never decided.
    #[serde(default)]
    pub desired: u32,
}

/// Which way a decision scales.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Up,
    Down,
    #[default]
    None,
}

/// A scaling decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub direction: Direction,
    /// The healthy instances counted.
    pub current: u32,
    /// The instance count to reach; `current` when the direction is `None`.
    pub desired: u32,
    /// The load against the targets (see [`decide`]); 0 when not measured (no instance, or a
    /// forced decision).
    pub pressure: f64,
    /// A short sentence naming the driving figure.
    pub reason: String,
    /// When a cooldown held a scaling back: the time it ends. 0 otherwise.
    #[serde(default)]
    pub cooldown_until_ms: i64,
}

impl Decision {
    fn new(
        direction: Direction,
        current: u32,
        desired: u32,
        pressure: f64,
        reason: String,
    ) -> Self {
        Self {
            direction,
            current,
            desired,
            pressure,
            reason,
            cooldown_until_ms: 0,
        }
    }
}

/// A measured figure, with NaN and negative values (a broken report) counted as 0.
fn figure(x: f64) -> f64 {
    if x.is_nan() || x < 0.0 {
        0.0
    } else {
        x
    }
}

/// The pressure of `loads` (non-empty) against `cfg`'s targets and a sentence naming the
/// figure that drives it. On a tie the first of cpu, memory, connections is named.
fn pressure(cfg: &ScalingConfig, loads: &[InstanceLoad]) -> (f64, String) {
    let n = loads.len() as f64;
    let cpu = loads.iter().map(|l| figure(l.cpu_percent)).sum::<f64>() / n;
    let memory = loads.iter().map(|l| figure(l.memory_percent)).sum::<f64>() / n;
    let connections = loads.iter().map(|l| l.connections as f64).sum::<f64>() / n;
    let conn_target = cfg.target_connections_per_instance;
    let candidates = [
        (cpu / cfg.target_cpu_percent, "cpu"),
        (memory / cfg.target_memory_percent, "memory"),
        (connections / f64::from(conn_target), "connections"),
    ];
    let mut best = (0.0, "cpu");
    for (p, name) in candidates {
        // An invalid target (0) gives NaN or infinity; count NaN as no pressure.
        let p = figure(p);
        if p > best.0 {
            best = (p, name);
        }
    }
    let (p, name) = best;
    let reason = match name {
        "cpu" => format!(
            "cpu {cpu:.0}% against the {}% target (pressure {p:.2})",
            cfg.target_cpu_percent
        ),
        "memory" => format!(
            "memory {memory:.0}% against the {}% target (pressure {p:.2})",
            cfg.target_memory_percent
        ),
        _ => format!(
            "{connections:.0} connections per instance against the {conn_target} target \
             (pressure {p:.2})"
        ),
    };
    (p, reason)
}

/// `at + ms`, saturating (a huge stored cooldown must not wrap into the past).
fn after(at: i64, ms: u64) -> i64 {
    at.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// "1 instance", "3 instances".
fn instances(n: u32) -> String {
    if n == 1 {
        "1 instance".into()
    } else {
        format!("{n} instances")
    }
}

/// A cooldown's remaining time for a reason: whole seconds, rounded up.
fn seconds_left(until_ms: i64, now_ms: i64) -> i64 {
    (until_ms.saturating_sub(now_ms) + 999) / 1000
}

/// Decides how many instances there should be, from the healthy instances' `loads`, at
/// `now_ms`. Assumes a validated configuration.
///
/// `pressure = max(mean cpu / target_cpu_percent, mean memory / target_memory_percent,
/// (total connections / instances) / target_connections_per_instance)` — the most loaded
/// resource decides, since any one of them running out hurts.
///
/// In order:
///
/// - disabled: `None` (pressure still reported);
/// - no instance: pressure 0 and desired `min_instances`; `Up` if that is above 0;
/// - below `min_instances`: `Up` to it, whatever the pressure or cooldowns;
/// - above `max_instances`: `Down` to it, likewise;
/// - pressure ≥ `scale_up_threshold`: `Up` to `clamp(ceil(current × pressure /
///   scale_up_threshold), current + 1, max_instances)` — proportional like Kubernetes' HPA, so
///   that a big spike is met in one step rather than one instance per cooldown. Held back
///   (`None`, `cooldown_until_ms` set, the reason says so) while `now < last_up +
///   scale_up_cooldown`; `None` at `max_instances`;
/// - pressure ≤ `scale_down_threshold`: `Down` by one to at least `min_instances` — one at a
///   time, since removing instances too fast drops their connections. Held back while `now <`
///   the later of `last_up` and `last_down` plus `scale_down_cooldown` (a scale-up also resets
///   it: the load that caused it may come back); `None` at `min_instances`;
/// - otherwise `None` with desired = current.
pub fn decide(
    cfg: &ScalingConfig,
    loads: &[InstanceLoad],
    memory: &ScalingMemory,
    now_ms: i64,
) -> Decision {
    use Direction::{Down, Up};
    let current = u32::try_from(loads.len()).unwrap_or(u32::MAX);
    let hold = |p: f64, reason: String| Decision::new(Direction::None, current, current, p, reason);
    if current == 0 {
        let min = cfg.min_instances;
        return if !cfg.enabled {
            hold(0.0, "autoscaling is disabled".into())
        } else if min > 0 {
            Decision::new(
                Up,
                0,
                min,
                0.0,
                format!("no healthy instance: 0 → {}", instances(min)),
            )
        } else {
            hold(0.0, "no healthy instance, and min_instances is 0".into())
        };
    }
    let (p, figure) = pressure(cfg, loads);
    if !cfg.enabled {
        return hold(p, format!("{figure}; autoscaling is disabled"));
    }
    let (min, max) = (cfg.min_instances, cfg.max_instances);
    if current < min {
        return Decision::new(
            Up,
            current,
            min,
            p,
            format!(
                "{}, below min_instances {min}: {current} → {}",
                instances(current),
                instances(min)
            ),
        );
    }
    if current > max {
        return Decision::new(
            Down,
            current,
            max,
            p,
            format!(
                "{}, above max_instances {max}: {current} → {}",
                instances(current),
                instances(max)
            ),
        );
    }
    if p >= cfg.scale_up_threshold {
        if current >= max {
            return hold(p, format!("{figure}; already at max_instances {max}"));
        }
        // The small epsilon keeps a product that is an integer but for float error (4.0000001)
        // from asking for one instance more.
        let wanted = (f64::from(current) * p / cfg.scale_up_threshold - 1e-9).ceil();
        let wanted = if wanted >= f64::from(max) {
            max
        } else {
            (wanted as u32).max(current + 1)
        };
        if memory.last_up_ms > 0 {
            let until = after(memory.last_up_ms, cfg.scale_up_cooldown_ms);
            if now_ms < until {
                let mut d = hold(
                    p,
                    format!(
                        "{figure}; scaling up to {wanted} held back by the scale-up cooldown \
                         ({} s left)",
                        seconds_left(until, now_ms)
                    ),
                );
                d.cooldown_until_ms = until;
                return d;
            }
        }
        return Decision::new(
            Up,
            current,
            wanted,
            p,
            format!("{figure}: {current} → {}", instances(wanted)),
        );
    }
    if p <= cfg.scale_down_threshold {
        if current <= min {
            return hold(p, format!("{figure}; already at min_instances {min}"));
        }
        let wanted = current - 1;
        let since = memory.last_up_ms.max(memory.last_down_ms);
        if since > 0 {
            let until = after(since, cfg.scale_down_cooldown_ms);
            if now_ms < until {
                let mut d = hold(
                    p,
                    format!(
                        "{figure}; scaling down to {wanted} held back by the scale-down cooldown \
                         ({} s left)",
                        seconds_left(until, now_ms)
                    ),
                );
                d.cooldown_until_ms = until;
                return d;
            }
        }
        return Decision::new(
            Down,
            current,
            wanted,
            p,
            format!("{figure}: {current} → {}", instances(wanted)),
        );
    }
    hold(
        p,
        format!(
            "{figure}; between the scale-down ({}) and scale-up ({}) thresholds",
            cfg.scale_down_threshold, cfg.scale_up_threshold
        ),
    )
}

/// A forced decision (`TriggerScaling`): to `desired` if it is non-zero, else one up or down
/// from `current` as `direction` says (`None`: stay), clamped to `min_instances..=max_instances`.
/// Cooldowns do not apply (an operator asked). The result's direction comes from comparing
/// the clamped count with `current`: `None` if already there. `now_ms` is not needed for a
/// forced decision; it is taken so that every decision function reads the same way.
pub fn force(
    cfg: &ScalingConfig,
    current: u32,
    direction: Direction,
    desired: u32,
    now_ms: i64,
) -> Decision {
    let _ = now_ms;
    let asked = if desired != 0 {
        desired
    } else {
        match direction {
            Direction::Up => current.saturating_add(1),
            Direction::Down => current.saturating_sub(1),
            Direction::None => current,
        }
    };
    // max before min: a configuration with min > max (not validated) ends at max.
    let target = asked.max(cfg.min_instances).min(cfg.max_instances);
    let bounds = if target == asked {
        String::new()
    } else if asked > target {
        format!(" (max_instances {})", cfg.max_instances)
    } else {
        format!(" (min_instances {})", cfg.min_instances)
    };
    let (dir, reason) = match target.cmp(&current) {
        std::cmp::Ordering::Greater => (
            Direction::Up,
            format!("forced: {current} → {}{bounds}", instances(target)),
        ),
        std::cmp::Ordering::Less => (
            Direction::Down,
            format!("forced: {current} → {}{bounds}", instances(target)),
        ),
        std::cmp::Ordering::Equal => (
            Direction::None,
            format!("forced: already at {}{bounds}", instances(current)),
        ),
    };
    Decision::new(dir, current, target, 0.0, reason)
}

/// The memory after decision `d` was delivered at `now_ms`: the time of the scale-up or
/// scale-down it made (for the cooldowns) and the count it decided.
pub fn remember(memory: &ScalingMemory, d: &Decision, now_ms: i64) -> ScalingMemory {
    let mut m = memory.clone();
    match d.direction {
        Direction::Up => m.last_up_ms = now_ms,
        Direction::Down => m.last_down_ms = now_ms,
        Direction::None => {}
    }
    m.desired = d.desired;
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    fn enabled() -> ScalingConfig {
        ScalingConfig {
            enabled: true,
            ..Default::default()
        }
    }

    fn cpu(n: usize, cpu_percent: f64) -> Vec<InstanceLoad> {
        vec![
            InstanceLoad {
                cpu_percent,
                memory_percent: 8.0,
                connections: 10,
            };
            n
        ]
    }

    fn never() -> ScalingMemory {
        ScalingMemory::default()
    }

    #[test]
    fn defaults_are_the_originals() {
        let c = ScalingConfig::default();
        assert!(!c.enabled);
        assert_eq!((c.min_instances, c.max_instances), (1, 10));
        assert_eq!(
            (c.target_cpu_percent, c.target_memory_percent),
            (70.0, 80.0)
        );
        assert_eq!(c.target_connections_per_instance, 1000);
        assert_eq!((c.scale_up_threshold, c.scale_down_threshold), (0.8, 0.3));
        assert_eq!(
            (c.scale_up_cooldown_ms, c.scale_down_cooldown_ms),
            (180_000, 300_000)
        );
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn config_json_takes_defaults() {
        let c: ScalingConfig =
            serde_json::from_str(r#"{"enabled":true,"max_instances":5}"#).unwrap();
        assert_eq!(
            c,
            ScalingConfig {
                enabled: true,
                max_instances: 5,
                ..Default::default()
            }
        );
        let m: ScalingMemory = serde_json::from_str("{}").unwrap();
        assert_eq!(m, never());
    }

    #[test]
    fn validation_messages() {
        let check = |f: fn(&mut ScalingConfig)| {
            let mut c = ScalingConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert_eq!(
            check(|c| c.max_instances = 0),
            "config.max_instances: 0 is below min_instances 1"
        );
        assert_eq!(
            check(|c| {
                c.min_instances = 0;
                c.max_instances = 0
            }),
            "config.max_instances: 0 must be at least 1"
        );
        assert_eq!(
            check(|c| c.max_instances = 1001),
            "config.max_instances: 1001 is over the limit 1000"
        );
        assert_eq!(
            check(|c| c.target_cpu_percent = 0.0),
            "config.target_cpu_percent: 0 must be a finite number above 0"
        );
        assert_eq!(
            check(|c| c.target_memory_percent = f64::NAN),
            "config.target_memory_percent: NaN must be a finite number above 0"
        );
        assert_eq!(
            check(|c| c.target_connections_per_instance = 0),
            "config.target_connections_per_instance: 0 must be above 0"
        );
        assert_eq!(
            check(|c| c.scale_down_threshold = -0.1),
            "config.scale_down_threshold: -0.1 must be a finite number above 0"
        );
        assert_eq!(
            check(|c| c.scale_up_threshold = 0.3),
            "config.scale_up_threshold: 0.3 must be above scale_down_threshold 0.3"
        );
        assert_eq!(
            check(|c| c.scale_up_threshold = f64::INFINITY),
            "config.scale_up_threshold: inf must be a finite number above 0"
        );
        // The edges that are allowed.
        let mut c = ScalingConfig {
            min_instances: 0,
            max_instances: 1000,
            ..Default::default()
        };
        assert_eq!(c.validate(), Ok(()));
        c.min_instances = 1000;
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn no_instance_scales_to_min() {
        let d = decide(&enabled(), &[], &never(), NOW);
        assert_eq!(
            d,
            Decision {
                direction: Direction::Up,
                current: 0,
                desired: 1,
                pressure: 0.0,
                reason: "no healthy instance: 0 → 1 instance".into(),
                cooldown_until_ms: 0
            }
        );
        let cfg = ScalingConfig {
            min_instances: 0,
            ..enabled()
        };
        let d = decide(&cfg, &[], &never(), NOW);
        assert_eq!((d.direction, d.desired), (Direction::None, 0));
        assert_eq!(d.reason, "no healthy instance, and min_instances is 0");
    }

    #[test]
    fn disabled_never_scales() {
        let d = decide(&ScalingConfig::default(), &cpu(2, 91.0), &never(), NOW);
        assert_eq!((d.direction, d.desired), (Direction::None, 2));
        assert_eq!(
            d.reason,
            "cpu 91% against the 70% target (pressure 1.30); autoscaling is disabled"
        );
        let d = decide(&ScalingConfig::default(), &[], &never(), NOW);
        assert_eq!((d.direction, d.desired), (Direction::None, 0));
    }

    #[test]
    fn up_proportionally() {
        // Pressure 91 / 70 = 1.3; 2 × 1.3 / 0.8 = 3.25 → 4.
        let d = decide(&enabled(), &cpu(2, 91.0), &never(), NOW);
        assert_eq!(d.direction, Direction::Up);
        assert_eq!((d.current, d.desired), (2, 4));
        assert!((d.pressure - 1.3).abs() < 1e-12, "{}", d.pressure);
        assert_eq!(
            d.reason,
            "cpu 91% against the 70% target (pressure 1.30): 2 → 4 instances"
        );
        assert_eq!(d.cooldown_until_ms, 0);
    }

    #[test]
    fn up_big_spike_in_one_step_clamped_to_max() {
        // 4000 connections per instance against 1000: pressure 4; 4 × 4 / 0.8 = 20 → max 10.
        let loads = vec![
            InstanceLoad {
                cpu_percent: 50.0,
                memory_percent: 50.0,
                connections: 4000,
            };
            4
        ];
        let d = decide(&enabled(), &loads, &never(), NOW);
        assert_eq!((d.direction, d.desired), (Direction::Up, 10));
        assert_eq!(
            d.reason,
            "4000 connections per instance against the 1000 target (pressure 4.00): 4 → 10 \
             instances"
        );
    }

    #[test]
    fn up_at_threshold_by_at_least_one() {
        // 56 / 70 = 0.8 exactly: at the threshold; 2 × 0.8 / 0.8 = 2 → at least 3.
        let d = decide(&enabled(), &cpu(2, 56.0), &never(), NOW);
        assert_eq!((d.direction, d.desired), (Direction::Up, 3));
        // Just under: within the band.
        let d = decide(&enabled(), &cpu(2, 55.0), &never(), NOW);
        assert_eq!((d.direction, d.desired), (Direction::None, 2));
        assert_eq!(
            d.reason,
            "cpu 55% against the 70% target (pressure 0.79); between the scale-down (0.3) and \
             scale-up (0.8) thresholds"
        );
    }

    #[test]
    fn memory_can_drive() {
        let loads = vec![
            InstanceLoad {
                cpu_percent: 20.0,
                memory_percent: 92.0,
                connections: 0,
            };
            3
        ];
        // 92 / 80 = 1.15; 3 × 1.15 / 0.8 = 4.3125 → 5.
        let d = decide(&enabled(), &loads, &never(), NOW);
        assert_eq!((d.direction, d.desired), (Direction::Up, 5));
        assert_eq!(
            d.reason,
            "memory 92% against the 80% target (pressure 1.15): 3 → 5 instances"
        );
    }

    #[test]
    fn up_held_by_cooldown() {
        let memory = ScalingMemory {
            last_up_ms: NOW - 60_000,
            last_down_ms: 0,
            desired: 2,
        };
        let d = decide(&enabled(), &cpu(2, 91.0), &memory, NOW);
        assert_eq!(
            d,
            Decision {
                direction: Direction::None,
                current: 2,
                desired: 2,
                pressure: d.pressure,
                reason: "cpu 91% against the 70% target (pressure 1.30); scaling up to 4 held \
                         back by the scale-up cooldown (120 s left)"
                    .into(),
                cooldown_until_ms: NOW + 120_000
            }
        );
        // The cooldown ends exactly at last_up + 180 s.
        let d = decide(&enabled(), &cpu(2, 91.0), &memory, NOW + 119_999);
        assert_eq!(
            (d.direction, d.cooldown_until_ms),
            (Direction::None, NOW + 120_000)
        );
        assert!(d.reason.ends_with("(1 s left)"), "{}", d.reason);
        let d = decide(&enabled(), &cpu(2, 91.0), &memory, NOW + 120_000);
        assert_eq!(
            (d.direction, d.desired, d.cooldown_until_ms),
            (Direction::Up, 4, 0)
        );
        // A recent scale-down does not hold a scale-up.
        let memory = ScalingMemory {
            last_up_ms: 0,
            last_down_ms: NOW - 1,
            desired: 2,
        };
        assert_eq!(
            decide(&enabled(), &cpu(2, 91.0), &memory, NOW).direction,
            Direction::Up
        );
    }

    #[test]
    fn up_at_max_stays() {
        let d = decide(&enabled(), &cpu(10, 99.0), &never(), NOW);
        assert_eq!((d.direction, d.desired), (Direction::None, 10));
        assert_eq!(
            d.reason,
            "cpu 99% against the 70% target (pressure 1.41); already at max_instances 10"
        );
    }

    #[test]
    fn down_one_at_a_time() {
        // 14 / 70 = 0.2.
        let d = decide(&enabled(), &cpu(5, 14.0), &never(), NOW);
        assert_eq!((d.direction, d.current, d.desired), (Direction::Down, 5, 4));
        assert_eq!(
            d.reason,
            "cpu 14% against the 70% target (pressure 0.20): 5 → 4 instances"
        );
        // At the threshold exactly (21 / 70 = 0.3) it still scales down.
        let d = decide(&enabled(), &cpu(5, 21.0), &never(), NOW);
        assert_eq!((d.direction, d.desired), (Direction::Down, 4));
    }

    #[test]
    fn down_held_by_cooldown_from_the_later_action() {
        // The scale-down was long ago, the scale-up 100 s ago: 200 s left.
        let memory = ScalingMemory {
            last_up_ms: NOW - 100_000,
            last_down_ms: NOW - 400_000,
            desired: 5,
        };
        let d = decide(&enabled(), &cpu(5, 14.0), &memory, NOW);
        assert_eq!((d.direction, d.desired), (Direction::None, 5));
        assert_eq!(d.cooldown_until_ms, NOW + 200_000);
        assert_eq!(
            d.reason,
            "cpu 14% against the 70% target (pressure 0.20); scaling down to 4 held back by the \
             scale-down cooldown (200 s left)"
        );
        // The other way round: counted from the scale-down.
        let memory = ScalingMemory {
            last_up_ms: NOW - 400_000,
            last_down_ms: NOW - 299_000,
            desired: 5,
        };
        let d = decide(&enabled(), &cpu(5, 14.0), &memory, NOW);
        assert_eq!(d.cooldown_until_ms, NOW + 1_000);
        let d = decide(&enabled(), &cpu(5, 14.0), &memory, NOW + 1_000);
        assert_eq!((d.direction, d.desired), (Direction::Down, 4));
    }

    #[test]
    fn down_at_min_stays() {
        let cfg = ScalingConfig {
            min_instances: 2,
            ..enabled()
        };
        let d = decide(&cfg, &cpu(2, 0.0), &never(), NOW);
        assert_eq!((d.direction, d.desired), (Direction::None, 2));
        assert_eq!(
            d.reason,
            "memory 8% against the 80% target (pressure 0.10); already at min_instances 2"
        );
    }

    #[test]
    fn below_min_and_above_max_ignore_pressure_and_cooldowns() {
        let cfg = ScalingConfig {
            min_instances: 3,
            max_instances: 4,
            ..enabled()
        };
        let busy = ScalingMemory {
            last_up_ms: NOW - 1,
            last_down_ms: NOW - 1,
            desired: 3,
        };
        // Idle, both cooldowns running: still up to the minimum.
        let d = decide(&cfg, &cpu(1, 0.0), &busy, NOW);
        assert_eq!(
            (d.direction, d.desired, d.cooldown_until_ms),
            (Direction::Up, 3, 0)
        );
        assert_eq!(
            d.reason,
            "1 instance, below min_instances 3: 1 → 3 instances"
        );
        // Overloaded: still down to the maximum.
        let d = decide(&cfg, &cpu(6, 100.0), &busy, NOW);
        assert_eq!((d.direction, d.desired), (Direction::Down, 4));
        assert_eq!(
            d.reason,
            "6 instances, above max_instances 4: 6 → 4 instances"
        );
    }

    #[test]
    fn broken_figures_count_as_zero() {
        let loads = vec![
            InstanceLoad {
                cpu_percent: f64::NAN,
                memory_percent: -5.0,
                connections: 0,
            },
            InstanceLoad {
                cpu_percent: 28.0,
                memory_percent: 0.0,
                connections: 0,
            },
        ];
        // Mean cpu (0 + 28) / 2 = 14: pressure 0.2.
        let d = decide(&enabled(), &loads, &never(), NOW);
        assert_eq!((d.direction, d.desired), (Direction::Down, 1));
        assert!((d.pressure - 0.2).abs() < 1e-12);
    }

    #[test]
    fn forced_decisions() {
        let cfg = ScalingConfig {
            min_instances: 2,
            max_instances: 6,
            ..enabled()
        };
        let f = |current, direction, desired| force(&cfg, current, direction, desired, NOW);
        let d = f(3, Direction::Up, 0);
        assert_eq!(
            d,
            Decision {
                direction: Direction::Up,
                current: 3,
                desired: 4,
                pressure: 0.0,
                reason: "forced: 3 → 4 instances".into(),
                cooldown_until_ms: 0
            }
        );
        assert_eq!(
            (
                f(3, Direction::Down, 0).direction,
                f(3, Direction::Down, 0).desired
            ),
            (Direction::Down, 2)
        );
        // To a count; the direction follows the counts.
        let d = f(3, Direction::Down, 5);
        assert_eq!((d.direction, d.desired), (Direction::Up, 5));
        // Clamped.
        let d = f(3, Direction::Up, 9);
        assert_eq!((d.direction, d.desired), (Direction::Up, 6));
        assert_eq!(d.reason, "forced: 3 → 6 instances (max_instances 6)");
        let d = f(2, Direction::Down, 0);
        assert_eq!((d.direction, d.desired), (Direction::None, 2));
        assert_eq!(d.reason, "forced: already at 2 instances (min_instances 2)");
        let d = f(6, Direction::Up, 0);
        assert_eq!((d.direction, d.desired), (Direction::None, 6));
        assert_eq!(d.reason, "forced: already at 6 instances (max_instances 6)");
        let d = f(4, Direction::None, 4);
        assert_eq!(
            (d.direction, d.reason.as_str()),
            (Direction::None, "forced: already at 4 instances")
        );
        // Out of bounds, a forced "stay" brings it back within them.
        assert_eq!(f(8, Direction::None, 0).desired, 6);
    }

    #[test]
    fn remember_records_the_action() {
        let m = ScalingMemory {
            last_up_ms: 5,
            last_down_ms: 6,
            desired: 3,
        };
        let up = force(&enabled(), 3, Direction::Up, 0, NOW);
        assert_eq!(
            remember(&m, &up, NOW),
            ScalingMemory {
                last_up_ms: NOW,
                last_down_ms: 6,
                desired: 4
            }
        );
        let down = force(&enabled(), 3, Direction::Down, 0, NOW);
        assert_eq!(
            remember(&m, &down, NOW),
            ScalingMemory {
                last_up_ms: 5,
                last_down_ms: NOW,
                desired: 2
            }
        );
        let none = force(&enabled(), 3, Direction::None, 0, NOW);
        assert_eq!(
            remember(&m, &none, NOW),
            ScalingMemory {
                last_up_ms: 5,
                last_down_ms: 6,
                desired: 3
            }
        );
        // A remembered scale-up then holds the next one.
        let m = remember(
            &never(),
            &decide(&enabled(), &cpu(2, 91.0), &never(), NOW),
            NOW,
        );
        let d = decide(&enabled(), &cpu(4, 91.0), &m, NOW + 1000);
        assert_eq!(
            (d.direction, d.cooldown_until_ms),
            (Direction::None, NOW + 180_000)
        );
    }
}
