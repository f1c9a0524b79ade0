//! The module's own rate limits on the connections it takes.
//!
//! Only target `*` is enforced here: it applies to every new connection. Other targets (for
//! instance `route:web`, which only the balancer can tell apart) are kept and listed, so an
//! operator sees what was set, but a module that cannot attribute a connection to them does not
//! pretend to enforce them.
//!
//! Each window is a token bucket (`governor`'s GCRA): per second with `requests_per_second +
//! burst` tokens (the proto's "extra requests at once"), per minute and per hour with their whole
//! allowance as the bucket. A connection must pass every window that is set.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Mutex;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tonic::Status;

use crate::pb::balancer::RateLimit;

/// The target whose limit applies to every new connection.
pub const ALL_CONNECTIONS: &str = "*";

/// The longest target accepted.
const MAX_TARGET_LEN: usize = 256;

/// Checks a limit as `SetRateLimit` receives it; errors name the field (`limit.<name>`).
pub fn validate(limit: Option<&RateLimit>) -> Result<&RateLimit, Status> {
    let l = limit.ok_or_else(|| Status::invalid_argument("limit: required"))?;
    if l.target.trim().is_empty() {
        return Err(Status::invalid_argument(
            "limit.target: required (\"*\" limits every connection)",
        ));
    }
    if l.target.len() > MAX_TARGET_LEN || l.target.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "limit.target: at most {MAX_TARGET_LEN} bytes without control characters"
        )));
    }
    if l.requests_per_second == 0 && l.requests_per_minute == 0 && l.requests_per_hour == 0 {
        return Err(Status::invalid_argument(
            "limit.requests_per_second: at least one of requests_per_second, requests_per_minute \
             and requests_per_hour must be set (a limit of all zeros limits nothing; remove it \
             instead)",
        ));
    }
    if l.burst > 0 && l.requests_per_second == 0 {
        return Err(Status::invalid_argument(
            "limit.burst: needs limit.requests_per_second (the burst is extra room in the \
             per-second window)",
        ));
    }
    if l.requests_per_second.checked_add(l.burst).is_none() {
        return Err(Status::invalid_argument(
            "limit.burst: requests_per_second + burst exceeds 4294967295",
        ));
    }
    Ok(l)
}

/// The buckets of one enforced limit, tried per second, then per minute, then per hour: a
/// connection refused by a short window spends nothing from the scarcer long ones.
struct Buckets(Vec<(&'static str, DefaultDirectRateLimiter)>);

impl Buckets {
    fn of(l: &RateLimit) -> Self {
        let mut v = Vec::new();
        if let Some(rps) = NonZeroU32::new(l.requests_per_second) {
            let cap = NonZeroU32::new(l.requests_per_second + l.burst).unwrap_or(rps);
            v.push((
                "second",
                RateLimiter::direct(Quota::per_second(rps).allow_burst(cap)),
            ));
        }
        if let Some(n) = NonZeroU32::new(l.requests_per_minute) {
            v.push(("minute", RateLimiter::direct(Quota::per_minute(n))));
        }
        if let Some(n) = NonZeroU32::new(l.requests_per_hour) {
            v.push(("hour", RateLimiter::direct(Quota::per_hour(n))));
        }
        Buckets(v)
    }

    /// The window that refuses one more connection now, if any.
    fn refuse(&self) -> Option<&'static str> {
        self.0
            .iter()
            .find(|(_, b)| b.check().is_err())
            .map(|(w, _)| *w)
    }
}

struct Entry {
    limit: RateLimit,
    /// Only for [`ALL_CONNECTIONS`].
    buckets: Option<Buckets>,
}

/// The module's limits, by target.
#[derive(Default)]
pub struct RateLimits {
    // A std mutex: held only to look up or replace an entry and to take a token, never across
    // an await.
    by_target: Mutex<BTreeMap<String, Entry>>,
}

impl RateLimits {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.by_target.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Validates and stores `limit` (replacing the target's earlier one, whose buckets start
    /// full again); answers what was stored.
    pub fn set(&self, limit: Option<&RateLimit>) -> Result<RateLimit, Status> {
        let l = validate(limit)?.clone();
        let buckets = (l.target == ALL_CONNECTIONS).then(|| Buckets::of(&l));
        self.lock().insert(
            l.target.clone(),
            Entry {
                limit: l.clone(),
                buckets,
            },
        );
        Ok(l)
    }

    /// Removes the target's limit; whether there was one.
    pub fn remove(&self, target: &str) -> bool {
        self.lock().remove(target).is_some()
    }

    /// Every limit, by target.
    pub fn list(&self) -> Vec<RateLimit> {
        self.lock().values().map(|e| e.limit.clone()).collect()
    }

    /// Takes a token for one new connection; the error says which limit refused it.
    pub fn admit(&self) -> Result<(), String> {
        let map = self.lock();
        let Some(Entry {
            limit,
            buckets: Some(b),
        }) = map.get(ALL_CONNECTIONS)
        else {
            return Ok(());
        };
        match b.refuse() {
            None => Ok(()),
            Some(window) => {
                let n = match window {
                    "second" => limit.requests_per_second,
                    "minute" => limit.requests_per_minute,
                    _ => limit.requests_per_hour,
                };
                Err(format!(
                    "over the module's rate limit \"*\": {n} new connections per {window}"
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn limit(target: &str, s: u32, m: u32, h: u32, burst: u32) -> RateLimit {
        RateLimit {
            target: target.into(),
            requests_per_second: s,
            requests_per_minute: m,
            requests_per_hour: h,
            burst,
        }
    }

    #[test]
    fn validation_names_the_field() {
        // (limit, the field the error starts with; None: valid)
        let cases = [
            (limit("*", 0, 0, 0, 0), Some("limit.requests_per_second: ")),
            (limit("*", 0, 0, 0, 5), Some("limit.requests_per_second: ")),
            (limit("*", 0, 10, 0, 5), Some("limit.burst: ")),
            (limit("", 10, 0, 0, 0), Some("limit.target: ")),
            (limit("a\nb", 10, 0, 0, 0), Some("limit.target: ")),
            (limit("*", u32::MAX, 0, 0, 1), Some("limit.burst: ")),
            (limit("*", 10, 0, 0, 0), None),
            (limit("*", 10, 0, 0, 5), None),
            (limit("route:web", 0, 60, 0, 0), None),
            (limit("*", 0, 0, 1, 0), None),
        ];
        for (l, want) in cases {
            match (validate(Some(&l)), want) {
                (Ok(_), None) => {}
                (Err(e), Some(prefix)) => {
                    assert_eq!(e.code(), Code::InvalidArgument);
                    assert!(e.message().starts_with(prefix), "{l:?}: {}", e.message());
                }
                (r, w) => panic!("{l:?}: got {r:?}, want {w:?}"),
            }
        }
        let e = validate(None).unwrap_err();
        assert!(e.message().starts_with("limit: required"));
    }

    #[test]
    fn star_limits_connections_and_others_are_only_kept() {
        let limits = RateLimits::default();
        limits.set(Some(&limit("route:web", 1, 0, 0, 0))).unwrap();
        // Not enforced: only "*" applies to the module's connections.
        for _ in 0..10 {
            limits.admit().unwrap();
        }
        // Per second 2, burst 1: three at once, then refused.
        limits.set(Some(&limit("*", 2, 0, 0, 1))).unwrap();
        for _ in 0..3 {
            limits.admit().unwrap();
        }
        let e = limits.admit().unwrap_err();
        assert!(e.contains("2 new connections per second"), "{e}");
        let targets: Vec<String> = limits.list().into_iter().map(|l| l.target).collect();
        assert_eq!(targets, ["*", "route:web"]);
        assert!(limits.remove("*"));
        assert!(!limits.remove("*"));
        limits.admit().unwrap();
    }

    #[test]
    fn every_window_must_pass() {
        let limits = RateLimits::default();
        // Plenty per second, but three per hour.
        limits.set(Some(&limit("*", 1000, 0, 3, 0))).unwrap();
        for _ in 0..3 {
            limits.admit().unwrap();
        }
        let e = limits.admit().unwrap_err();
        assert!(e.contains("3 new connections per hour"), "{e}");
        limits.set(Some(&limit("*", 0, 2, 0, 0))).unwrap();
        limits.admit().unwrap();
        limits.admit().unwrap();
        assert!(limits.admit().unwrap_err().contains("per minute"));
    }
}
