//! Blue/green traffic between the versions of one module type: which version is active, which
//! one is a canary or being promoted and with what share, and the deterministic split that
//! follows those shares.
//!
//! Everything here is a pure function of a stored [`TrafficRecord`] and the time passed in. A
//! gradual promotion is never driven step by step by anyone: its share is computed from the time
//! it started, so every node that reads the same record at the same time agrees on the weights,
//! and a node that was down during the promotion needs no catching up.
//!
//! Rollback returns to the version that was serving before: during a canary or an unfinished
//! promotion it drops the candidate (the active version gets 100 % again). The original system
//! (MarchProxy) sent all traffic to the *new* version on a rollback during a canary; the tests
//! below keep that defect out.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::quote::echo;

/// The longest version name.
pub const MAX_VERSION_LEN: usize = 128;

/// The step of a gradual promotion when the caller gives 0, in percent per interval.
pub const DEFAULT_STEP_PERCENT: u32 = 10;

/// The interval of a gradual promotion when the caller gives 0: two minutes, long enough to see
/// errors from one step before the next.
pub const DEFAULT_INTERVAL_MS: u64 = 120_000;

/// The shortest interval of a gradual promotion; shorter would be an immediate promotion in all
/// but name.
pub const MIN_INTERVAL_MS: u64 = 100;

/// The traffic state of one module type, as stored (JSON) in the replicated store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficRecord {
    /// The version serving the traffic not given to the candidate; "" = none set yet (then every
    /// version gets traffic, split evenly — see [`TrafficRecord::weights_at`]).
    #[serde(default)]
    pub active: String,
    /// What [`TrafficRecord::rollback`] returns to once a promotion completed; "" = none.
    #[serde(default)]
    pub previous: String,
    /// A canary/candidate version and its share, set by [`TrafficRecord::set_weight`] or a
    /// gradual [`TrafficRecord::promote`].
    #[serde(default)]
    pub candidate: Option<Candidate>,
}

/// A version getting part of the traffic next to the active one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub version: String,
    /// Its share in percent (0..=100). While a promotion runs this is the share the promotion
    /// started from; the share in force is [`Candidate::weight_at`].
    pub weight: u32,
    /// A gradual promotion in progress, if any.
    #[serde(default)]
    pub promotion: Option<Promotion>,
}

/// A gradual promotion: the candidate's share grows by `step_percent` every `interval_ms` from
/// `from_weight` at `started_at_ms` until it reaches 100.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promotion {
    /// 1..=100.
    pub step_percent: u32,
    /// At least [`MIN_INTERVAL_MS`].
    pub interval_ms: u64,
    pub started_at_ms: i64,
    /// The candidate's share when the promotion started.
    pub from_weight: u32,
}

/// Why a traffic change was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrafficError {
    /// A bad argument; the message starts with the field's name (`weight: 120 is over 100`).
    Invalid(String),
    /// The change does not apply to the current state; the message starts with the operation
    /// (`rollback: no previous version to return to`).
    Precondition(String),
}

impl fmt::Display for TrafficError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid(m) | Self::Precondition(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for TrafficError {}

impl Promotion {
    /// The candidate's share at `now_ms`: `min(100, from_weight + step × floor((now −
    /// started) / interval))`. Before the start (a clock behind the writer's) it is
    /// `from_weight`, so a lagging node never gets ahead of the promotion.
    pub fn weight_at(&self, now_ms: i64) -> u32 {
        let from = u64::from(self.from_weight.min(100));
        let elapsed = now_ms.saturating_sub(self.started_at_ms);
        if elapsed <= 0 {
            return from as u32;
        }
        // A stored interval of 0 (never written by this code) must not divide by zero.
        let steps = elapsed as u64 / self.interval_ms.max(1);
        let grown = from.saturating_add(u64::from(self.step_percent).saturating_mul(steps));
        grown.min(100) as u32
    }
}

impl Candidate {
    /// The candidate's share at `now_ms`: its promotion's ([`Promotion::weight_at`]) if one
    /// runs, else `weight` (capped at 100).
    pub fn weight_at(&self, now_ms: i64) -> u32 {
        match &self.promotion {
            Some(p) => p.weight_at(now_ms),
            None => self.weight.min(100),
        }
    }

    /// Whether this candidate's promotion has reached 100 % at `now_ms`.
    fn promoted_at(&self, now_ms: i64) -> bool {
        self.promotion.is_some() && self.weight_at(now_ms) >= 100
    }
}

/// Checks a version name: 1..=128 characters, no whitespace or control character (it is shown
/// in logs and CLI tables, where those would be misleading).
fn validate_version(version: &str) -> Result<(), TrafficError> {
    if version.is_empty() {
        return Err(TrafficError::Invalid("version: required".into()));
    }
    let len = version.chars().count();
    if len > MAX_VERSION_LEN {
        return Err(TrafficError::Invalid(format!(
            "version: {len} characters; the limit is {MAX_VERSION_LEN}"
        )));
    }
    if let Some(c) = version
        .chars()
        .find(|c| c.is_whitespace() || c.is_control())
    {
        return Err(TrafficError::Invalid(format!(
            "version: {} contains {c:?}; whitespace and control characters are not allowed",
            echo(version)
        )));
    }
    Ok(())
}

/// Checks a share in percent.
fn validate_weight(weight: u32) -> Result<(), TrafficError> {
    if weight > 100 {
        return Err(TrafficError::Invalid(format!(
            "weight: {weight} is over 100"
        )));
    }
    Ok(())
}

impl TrafficRecord {
    /// The candidate, unless it names the active version (never written by this code, but a
    /// hand-edited record must not give one version two shares).
    fn live_candidate(&self) -> Option<&Candidate> {
        self.candidate
            .as_ref()
            .filter(|c| self.active.is_empty() || c.version != self.active)
    }

    /// The weights in force at `now_ms`, as `(version, percent)` pairs summing to 100, the
    /// active version first; versions with 0 % are left out.
    ///
    /// A gradual promotion's share is `min(100, from_weight + step × floor((now − started) /
    /// interval))`; one that reached 100 counts as complete (its version is the active one, the
    /// old active is previous). That is computed, not written, so every node agrees without
    /// anyone driving the steps.
    ///
    /// Empty when `active` is "": no preference, and the caller splits evenly among the versions
    /// it has instances of.
    pub fn weights_at(&self, now_ms: i64) -> Vec<(String, u32)> {
        let r = self.settled(now_ms);
        if r.active.is_empty() {
            return Vec::new();
        }
        let cand = r
            .live_candidate()
            .map(|c| (c.version.clone(), c.weight_at(now_ms)));
        let cand_weight = cand.as_ref().map_or(0, |c| c.1);
        let mut out = Vec::with_capacity(2);
        if cand_weight < 100 {
            out.push((r.active.clone(), 100 - cand_weight));
        }
        if let Some(c) = cand.filter(|c| c.1 > 0) {
            out.push(c);
        }
        out
    }

    /// The record with a completed gradual promotion folded in (the candidate becomes active,
    /// the old active becomes previous, the candidate is cleared), as of `now_ms`; otherwise an
    /// unchanged copy. Every change starts from this, so that it applies to what is in force
    /// rather than to what was last written.
    pub fn settled(&self, now_ms: i64) -> TrafficRecord {
        let mut r = self.clone();
        let done = r.live_candidate().is_some_and(|c| c.promoted_at(now_ms));
        if done {
            let c = r.candidate.take().expect("checked above");
            let old = std::mem::replace(&mut r.active, c.version);
            // Without an old active there is nothing to return to; keep what was there.
            if !old.is_empty() {
                r.previous = old;
            }
        }
        r
    }

    /// Sets the share of `version` at `now_ms`:
    ///
    /// - `version` is the active one (or `active` is "", and it becomes the active one): it gets
    ///   `weight` and the candidate gets `100 − weight`. Below 100 a candidate is required
    ///   (else `Precondition`); at 100 the candidate stays, with 0 %.
    /// - any other version becomes the candidate with `weight` (replacing any other candidate)
    ///   and the active one gets the rest. 100 is allowed: it is still the candidate, and what
    ///   rollback drops, until it is promoted.
    ///
    /// Either way a running promotion is cancelled: an explicit share overrides it.
    ///
    /// Errors: `Invalid` for a version that is empty, over 128 characters or contains whitespace
    /// or a control character, or a weight over 100.
    pub fn set_weight(
        &self,
        version: &str,
        weight: u32,
        now_ms: i64,
    ) -> Result<TrafficRecord, TrafficError> {
        validate_version(version)?;
        validate_weight(weight)?;
        let mut r = self.settled(now_ms);
        if r.active.is_empty() || r.active == version {
            if r.active.is_empty() {
                r.active = version.to_owned();
                // A candidate without an active version is not something this code writes;
                // drop it rather than guess its meaning.
                r.candidate = None;
            }
            match r.candidate.as_mut() {
                Some(c) => {
                    c.weight = 100 - weight;
                    c.promotion = None;
                }
                None if weight < 100 => {
                    return Err(TrafficError::Precondition(format!(
                        "set_weight: {} is the active version and there is no candidate to take \
                         the other {}%",
                        echo(version),
                        100 - weight
                    )));
                }
                None => {}
            }
        } else {
            r.candidate = Some(Candidate {
                version: version.to_owned(),
                weight,
                promotion: None,
            });
        }
        Ok(r)
    }

    /// Promotes `version` at `now_ms`.
    ///
    /// - Immediate (`gradual` false): `version` becomes active with 100 %, the old active (if
    ///   different) becomes previous, and the candidate is cleared.
    /// - Gradual: `version` becomes the candidate, keeping its current share if it already is
    ///   the candidate (a running promotion restarts from where it is), else from 0 %, and its
    ///   share grows by `step_percent` (0 = 10; 1..=100) every `interval_ms` (0 = 120 000; at
    ///   least 100). When no version is active yet there is nothing recorded to shift traffic
    ///   from, and the promotion is immediate.
    ///
    /// Promoting the active version clears any candidate (the active then gets 100 %); with no
    /// candidate it is a no-op success. `step_percent` and `interval_ms` are checked only for a
    /// gradual promotion (an immediate one ignores them).
    pub fn promote(
        &self,
        version: &str,
        gradual: bool,
        step_percent: u32,
        interval_ms: u64,
        now_ms: i64,
    ) -> Result<TrafficRecord, TrafficError> {
        validate_version(version)?;
        let step_percent = if step_percent == 0 {
            DEFAULT_STEP_PERCENT
        } else {
            step_percent
        };
        let interval_ms = if interval_ms == 0 {
            DEFAULT_INTERVAL_MS
        } else {
            interval_ms
        };
        if gradual {
            if step_percent > 100 {
                return Err(TrafficError::Invalid(format!(
                    "step_percent: {step_percent} is over 100"
                )));
            }
            if interval_ms < MIN_INTERVAL_MS {
                return Err(TrafficError::Invalid(format!(
                    "interval_ms: {interval_ms} is under the minimum {MIN_INTERVAL_MS}"
                )));
            }
        }
        let mut r = self.settled(now_ms);
        if r.active == version {
            r.candidate = None;
            return Ok(r);
        }
        if !gradual || r.active.is_empty() {
            let old = std::mem::replace(&mut r.active, version.to_owned());
            if !old.is_empty() {
                r.previous = old;
            }
            r.candidate = None;
            return Ok(r);
        }
        let from_weight = r
            .live_candidate()
            .filter(|c| c.version == version)
            .map_or(0, |c| c.weight_at(now_ms));
        r.candidate = Some(Candidate {
            version: version.to_owned(),
            weight: from_weight,
            promotion: Some(Promotion {
                step_percent,
                interval_ms,
                started_at_ms: now_ms,
                from_weight,
            }),
        });
        Ok(r)
    }

    /// Rolls back at `now_ms`, on the settled record:
    ///
    /// - a candidate in play (a canary, or a promotion that has not reached 100 %) is dropped and
    ///   the active version keeps 100 %: the version serving before the change gets everything;
    /// - else a previous version becomes active with 100 %, and the old active becomes previous
    ///   (so a second rollback undoes the first);
    /// - else `Precondition`.
    pub fn rollback(&self, now_ms: i64) -> Result<TrafficRecord, TrafficError> {
        let mut r = self.settled(now_ms);
        if r.candidate.is_some() {
            r.candidate = None;
            return Ok(r);
        }
        if r.previous.is_empty() || r.previous == r.active {
            return Err(TrafficError::Precondition(
                "rollback: no previous version to return to".into(),
            ));
        }
        std::mem::swap(&mut r.active, &mut r.previous);
        Ok(r)
    }
}

/// A deterministic choice of version that follows the weights: smooth weighted round robin
/// (nginx's algorithm). Each pick adds every weight to that version's current value, picks the
/// largest (the first on a tie) and subtracts the total from it. Over every run of `total`
/// picks each version is picked exactly `weight` times, and the picks are spread out (90/10
/// gives one minority pick in every ten, not ten in a row), so a small canary never starves and
/// never gets a burst.
#[derive(Clone, Debug, Default)]
pub struct Split {
    /// Current value by version.
    current: HashMap<String, i64>,
}

impl Split {
    /// A split with no history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Picks among `offered` — `(version, weight)` pairs, in a stable order — and returns the
    /// index picked. Entries with weight 0 take no part, and a version given twice counts
    /// only at its first entry. Versions may appear or disappear between calls: a vanished
    /// version's state is dropped (so it starts fresh if it comes back) and a new one starts at
    /// 0. `None` when `offered` is empty or every weight is 0.
    pub fn pick(&mut self, offered: &[(&str, u32)]) -> Option<usize> {
        let mut taking: Vec<usize> = Vec::with_capacity(offered.len());
        for (i, &(version, weight)) in offered.iter().enumerate() {
            if weight > 0 && !taking.iter().any(|&j| offered[j].0 == version) {
                taking.push(i);
            }
        }
        self.current
            .retain(|v, _| taking.iter().any(|&i| offered[i].0 == v));
        if taking.is_empty() {
            return None;
        }
        let mut total: i64 = 0;
        let mut best: Option<(usize, i64)> = None;
        for &i in &taking {
            let (version, weight) = offered[i];
            let weight = i64::from(weight);
            total += weight;
            let cur = self.current.entry(version.to_owned()).or_insert(0);
            *cur += weight;
            if best.is_none_or(|(_, b)| *cur > b) {
                best = Some((i, *cur));
            }
        }
        let (picked, _) = best?;
        if let Some(cur) = self.current.get_mut(offered[picked].0) {
            *cur -= total;
        }
        Some(picked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(pairs: &[(&str, u32)]) -> Vec<(String, u32)> {
        pairs.iter().map(|(v, w)| (v.to_string(), *w)).collect()
    }

    fn active(v: &str) -> TrafficRecord {
        TrafficRecord {
            active: v.into(),
            ..Default::default()
        }
    }

    /// v1 active with v2 as a 10 % canary.
    fn canary() -> TrafficRecord {
        active("v1").set_weight("v2", 10, 0).unwrap()
    }

    /// Counts of each index over `n` picks.
    fn counts(offered: &[(&str, u32)], n: usize) -> Vec<usize> {
        let mut split = Split::new();
        let mut c = vec![0; offered.len()];
        for _ in 0..n {
            c[split.pick(offered).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn no_active_means_no_preference() {
        let r = TrafficRecord::default();
        assert_eq!(r.weights_at(0), Vec::<(String, u32)>::new());
    }

    #[test]
    fn active_alone_gets_everything() {
        assert_eq!(active("v1").weights_at(5), w(&[("v1", 100)]));
    }

    #[test]
    fn canary_weights() {
        let r = canary();
        assert_eq!(r.active, "v1");
        assert_eq!(
            r.candidate,
            Some(Candidate {
                version: "v2".into(),
                weight: 10,
                promotion: None
            })
        );
        assert_eq!(r.weights_at(0), w(&[("v1", 90), ("v2", 10)]));
    }

    #[test]
    fn set_weight_of_active_gives_rest_to_candidate() {
        let r = canary().set_weight("v1", 70, 0).unwrap();
        assert_eq!(r.weights_at(0), w(&[("v1", 70), ("v2", 30)]));
        // 100 for the active keeps the candidate at 0 %, left out of the weights.
        let r = r.set_weight("v1", 100, 0).unwrap();
        assert_eq!(r.candidate.as_ref().unwrap().weight, 0);
        assert_eq!(r.weights_at(0), w(&[("v1", 100)]));
    }

    #[test]
    fn set_weight_of_active_below_100_needs_a_candidate() {
        assert_eq!(
            active("v1").set_weight("v1", 40, 0),
            Err(TrafficError::Precondition(
                "set_weight: \"v1\" is the active version and there is no candidate to take the \
                 other 60%"
                    .into()
            ))
        );
        assert_eq!(active("v1").set_weight("v1", 100, 0), Ok(active("v1")));
    }

    #[test]
    fn set_weight_with_no_active_makes_it_active() {
        let r = TrafficRecord::default().set_weight("v3", 100, 0).unwrap();
        assert_eq!(r, active("v3"));
        assert!(matches!(
            TrafficRecord::default().set_weight("v3", 50, 0),
            Err(TrafficError::Precondition(_))
        ));
    }

    #[test]
    fn set_weight_replaces_candidate_and_allows_100() {
        let r = canary().set_weight("v3", 100, 0).unwrap();
        assert_eq!(r.candidate.as_ref().unwrap().version, "v3");
        assert_eq!(r.weights_at(0), w(&[("v3", 100)]));
        // Still a candidate: the active and previous are unchanged, and rollback drops it.
        assert_eq!(r.active, "v1");
        assert_eq!(r.rollback(0).unwrap().weights_at(0), w(&[("v1", 100)]));
    }

    #[test]
    fn set_weight_cancels_promotion() {
        let r = active("v1")
            .promote("v2", true, 10, 1000, 0)
            .unwrap()
            .set_weight("v2", 25, 3500)
            .unwrap();
        assert_eq!(r.candidate.as_ref().unwrap().promotion, None);
        assert_eq!(r.weights_at(1_000_000), w(&[("v1", 75), ("v2", 25)]));
    }

    #[test]
    fn set_weight_validation_names_the_field() {
        let r = active("v1");
        let invalid = |e: Result<TrafficRecord, TrafficError>| match e {
            Err(TrafficError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        };
        assert_eq!(
            invalid(r.set_weight("v2", 120, 0)),
            "weight: 120 is over 100"
        );
        assert_eq!(invalid(r.set_weight("", 10, 0)), "version: required");
        assert_eq!(
            invalid(r.set_weight(&"x".repeat(129), 10, 0)),
            "version: 129 characters; the limit is 128"
        );
        assert_eq!(
            invalid(r.set_weight("v 2", 10, 0)),
            "version: \"v 2\" contains ' '; whitespace and control characters are not allowed"
        );
        assert_eq!(
            invalid(r.set_weight("v\u{1}", 10, 0)),
            "version: \"v\\u{1}\" contains '\\u{1}'; whitespace and control characters are not \
             allowed"
        );
        // 128 characters and a weight of exactly 100 are fine.
        assert!(r.set_weight(&"x".repeat(128), 100, 0).is_ok());
        assert_eq!(
            TrafficError::Invalid("weight: 120 is over 100".into()).to_string(),
            "weight: 120 is over 100"
        );
    }

    /// The MarchProxy defect: a rollback during a canary sent all traffic to the new version.
    #[test]
    fn rollback_during_canary_restores_the_active_version() {
        let r = canary().rollback(0).unwrap();
        assert_eq!(r.weights_at(0), w(&[("v1", 100)]));
        assert_eq!(r.active, "v1");
        assert_eq!(r.candidate, None);
        assert_eq!(r.previous, "");
    }

    /// The MarchProxy defect, mid-way through a gradual promotion (60 %).
    #[test]
    fn rollback_during_gradual_promotion_restores_the_active_version() {
        let r = active("v1").promote("v2", true, 10, 1000, 0).unwrap();
        assert_eq!(r.weights_at(6000), w(&[("v1", 40), ("v2", 60)]));
        let back = r.rollback(6000).unwrap();
        assert_eq!(back.weights_at(6000), w(&[("v1", 100)]));
        // And it stays there: the dropped promotion does not complete later.
        assert_eq!(back.weights_at(60_000), w(&[("v1", 100)]));
        assert_eq!(back.active, "v1");
    }

    #[test]
    fn rollback_after_immediate_promotion_returns_to_old_version() {
        let r = canary().promote("v2", false, 0, 0, 10).unwrap();
        assert_eq!(r.active, "v2");
        assert_eq!(r.previous, "v1");
        assert_eq!(r.candidate, None);
        assert_eq!(r.weights_at(10), w(&[("v2", 100)]));
        let back = r.rollback(20).unwrap();
        assert_eq!(back.weights_at(20), w(&[("v1", 100)]));
        assert_eq!(back.previous, "v2");
        // A second rollback undoes the first.
        assert_eq!(back.rollback(30).unwrap().weights_at(30), w(&[("v2", 100)]));
    }

    #[test]
    fn rollback_after_gradual_promotion_completed_by_time_returns_to_old_version() {
        let r = active("v1").promote("v2", true, 10, 1000, 0).unwrap();
        // Nobody wrote anything since: the stored record still has v2 as candidate.
        assert_eq!(r.active, "v1");
        let back = r.rollback(10_000).unwrap();
        assert_eq!(back.active, "v1");
        assert_eq!(back.previous, "v2");
        assert_eq!(back.weights_at(10_000), w(&[("v1", 100)]));
    }

    #[test]
    fn rollback_with_nothing_to_return_to() {
        let e = Err(TrafficError::Precondition(
            "rollback: no previous version to return to".into(),
        ));
        assert_eq!(active("v1").rollback(0), e);
        assert_eq!(TrafficRecord::default().rollback(0), e);
    }

    #[test]
    fn gradual_promotion_weights_over_time() {
        // From a 20 % canary, so from_weight is 20.
        let r = active("v1")
            .set_weight("v2", 20, 0)
            .unwrap()
            .promote("v2", true, 10, 1000, 1_000_000)
            .unwrap();
        assert_eq!(
            r.candidate.as_ref().unwrap().promotion,
            Some(Promotion {
                step_percent: 10,
                interval_ms: 1000,
                started_at_ms: 1_000_000,
                from_weight: 20
            })
        );
        assert_eq!(r.weights_at(1_000_000), w(&[("v1", 80), ("v2", 20)]));
        assert_eq!(r.weights_at(1_000_999), w(&[("v1", 80), ("v2", 20)]));
        assert_eq!(r.weights_at(1_002_500), w(&[("v1", 60), ("v2", 40)]));
        // A clock behind the writer's stays at the start.
        assert_eq!(r.weights_at(999_000), w(&[("v1", 80), ("v2", 20)]));
        // 20 + 8 × 10 = 100 at +8000: complete.
        assert_eq!(r.weights_at(1_007_999), w(&[("v1", 10), ("v2", 90)]));
        assert_eq!(r.weights_at(1_008_000), w(&[("v2", 100)]));
        let done = r.settled(1_008_000);
        assert_eq!(
            done,
            TrafficRecord {
                active: "v2".into(),
                previous: "v1".into(),
                candidate: None
            }
        );
        // Not yet complete: settled changes nothing.
        assert_eq!(r.settled(1_007_999), r);
    }

    #[test]
    fn gradual_promotion_of_a_new_version_starts_at_zero_with_defaults() {
        let r = active("v1").promote("v2", true, 0, 0, 0).unwrap();
        let c = r.candidate.clone().unwrap();
        assert_eq!(c.weight, 0);
        assert_eq!(
            c.promotion,
            Some(Promotion {
                step_percent: 10,
                interval_ms: 120_000,
                started_at_ms: 0,
                from_weight: 0
            })
        );
        assert_eq!(r.weights_at(119_999), w(&[("v1", 100)]));
        assert_eq!(r.weights_at(120_000), w(&[("v1", 90), ("v2", 10)]));
    }

    #[test]
    fn gradual_promotion_restarts_from_current_share() {
        let r = active("v1").promote("v2", true, 10, 1000, 0).unwrap();
        let again = r.promote("v2", true, 50, 1000, 3000).unwrap();
        let p = again.candidate.unwrap().promotion.unwrap();
        assert_eq!(
            (p.from_weight, p.step_percent, p.started_at_ms),
            (30, 50, 3000)
        );
    }

    #[test]
    fn change_after_completed_promotion_applies_to_what_is_in_force() {
        let r = active("v1").promote("v2", true, 50, 1000, 0).unwrap();
        // At 2000 the promotion is complete: v2 is the active one, and a canary of v3 takes
        // its share from v2.
        let r = r.set_weight("v3", 5, 2000).unwrap();
        assert_eq!(r.active, "v2");
        assert_eq!(r.previous, "v1");
        assert_eq!(r.weights_at(2000), w(&[("v2", 95), ("v3", 5)]));
    }

    #[test]
    fn promote_validation() {
        let r = active("v1");
        assert_eq!(
            r.promote("v2", true, 150, 1000, 0),
            Err(TrafficError::Invalid(
                "step_percent: 150 is over 100".into()
            ))
        );
        assert_eq!(
            r.promote("v2", true, 10, 99, 0),
            Err(TrafficError::Invalid(
                "interval_ms: 99 is under the minimum 100".into()
            ))
        );
        assert_eq!(
            r.promote("", false, 0, 0, 0),
            Err(TrafficError::Invalid("version: required".into()))
        );
        // An immediate promotion ignores the gradual parameters.
        assert!(r.promote("v2", false, 150, 99, 0).is_ok());
    }

    #[test]
    fn promote_active_is_noop_or_clears_candidate() {
        assert_eq!(active("v1").promote("v1", false, 0, 0, 0), Ok(active("v1")));
        assert_eq!(active("v1").promote("v1", true, 0, 0, 0), Ok(active("v1")));
        assert_eq!(canary().promote("v1", false, 0, 0, 0), Ok(active("v1")));
    }

    #[test]
    fn promote_with_no_active_is_immediate() {
        let r = TrafficRecord::default()
            .promote("v1", true, 10, 1000, 0)
            .unwrap();
        assert_eq!(r, active("v1"));
    }

    #[test]
    fn record_json_defaults() {
        let r: TrafficRecord = serde_json::from_str("{}").unwrap();
        assert_eq!(r, TrafficRecord::default());
        let r: TrafficRecord =
            serde_json::from_str(r#"{"active":"v1","candidate":{"version":"v2","weight":10}}"#)
                .unwrap();
        assert_eq!(r, canary());
        let back: TrafficRecord =
            serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn split_90_10_is_exact() {
        assert_eq!(counts(&[("v1", 90), ("v2", 10)], 10_000), vec![9000, 1000]);
    }

    #[test]
    fn split_follows_other_weights() {
        assert_eq!(counts(&[("a", 33), ("b", 67)], 10_000), vec![3300, 6700]);
        assert_eq!(
            counts(&[("a", 50), ("b", 30), ("c", 20)], 10_000),
            vec![5000, 3000, 2000]
        );
        // 1:2 does not divide 10 000 evenly; the odd pick is b's (it starts larger).
        assert_eq!(counts(&[("a", 1), ("b", 2)], 10_000), vec![3333, 6667]);
        // Over a count that is not a whole number of periods the shares stay within one pick.
        let c = counts(&[("a", 7), ("b", 93)], 9_999);
        assert!((699..=700).contains(&c[0]), "{c:?}");
        assert_eq!(c[0] + c[1], 9_999);
    }

    #[test]
    fn split_spreads_a_small_canary() {
        // 5 %: exactly one canary pick in every 20, never a gap longer than 20.
        let offered = [("v1", 95), ("v2", 5)];
        let mut split = Split::new();
        let mut last = None;
        let mut max_gap = 0;
        for i in 0..10_000usize {
            if split.pick(&offered) == Some(1) {
                if let Some(l) = last {
                    max_gap = max_gap.max(i - l);
                }
                last = Some(i);
            }
        }
        assert_eq!(max_gap, 20);
        assert_eq!(counts(&offered, 20), vec![19, 1]);
        // 90/10: one minority pick in every ten, not a burst.
        let mut split = Split::new();
        let first: Vec<usize> = (0..10)
            .map(|_| split.pick(&[("v1", 90), ("v2", 10)]).unwrap())
            .collect();
        assert_eq!(first, vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
    }

    #[test]
    fn split_handles_versions_coming_and_going() {
        let state = |pairs: &[(&str, i64)]| -> HashMap<String, i64> {
            pairs.iter().map(|(v, c)| (v.to_string(), *c)).collect()
        };
        let mut split = Split::new();
        let ab = [("a", 50), ("b", 50)];
        let picks: Vec<usize> = (0..3).map(|_| split.pick(&ab).unwrap()).collect();
        // a (first on the tie), b, a.
        assert_eq!(picks, vec![0, 1, 0]);
        assert_eq!(split.current, state(&[("a", -50), ("b", 50)]));
        // b vanishes and its state is dropped; c starts at 0: a = 0, c = 50 → c.
        assert_eq!(split.pick(&[("a", 50), ("c", 50)]), Some(1));
        assert_eq!(split.current, state(&[("a", 0), ("c", -50)]));
        // b comes back fresh: a = 50, b = 50, c = 0 → a on the tie (b's old +50 would have
        // made it b).
        assert_eq!(split.pick(&[("a", 50), ("b", 50), ("c", 50)]), Some(0));
        assert_eq!(split.current, state(&[("a", -100), ("b", 50), ("c", 0)]));
    }

    #[test]
    fn split_edge_cases() {
        let mut split = Split::new();
        assert_eq!(split.pick(&[]), None);
        assert_eq!(split.pick(&[("a", 0), ("b", 0)]), None);
        // Zero weights take no part; the index is into the slice given.
        assert_eq!(split.pick(&[("a", 0), ("b", 5)]), Some(1));
        assert_eq!(split.pick(&[("a", 0), ("b", 5)]), Some(1));
        // A repeated version counts at its first entry only.
        assert_eq!(
            counts(&[("a", 50), ("a", 50), ("b", 50)], 100),
            vec![50, 0, 50]
        );
        assert_eq!(counts(&[("a", 1), ("a", 1)], 3), vec![3, 0]);
    }

    #[test]
    fn split_follows_weights_at() {
        let r = canary();
        let weights = r.weights_at(0);
        let offered: Vec<(&str, u32)> = weights.iter().map(|(v, w)| (v.as_str(), *w)).collect();
        assert_eq!(counts(&offered, 1000), vec![900, 100]);
    }
}
