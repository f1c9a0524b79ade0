//! Lease deadlines, kept by the leader only.
//!
//! Leases and their keys are replicated; when each one runs out is not. Only the leader keeps
//! deadlines, from its own monotonic clock, and it expires a lease by proposing its revocation,
//! which every member then applies. A new leader knows nothing of its predecessor's clock, so it
//! gives every lease a full time-to-live from its election: a lease may outlive its deadline by up
//! to one TTL after a leader change, but never ends early.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::kv::KvState;

/// Deadlines of the leases, while this member leads.
#[derive(Default)]
pub struct LeaseClock {
    deadlines: HashMap<i64, Instant>,
    /// Leases whose revocation was proposed and not applied yet.
    revoking: HashSet<i64>,
    /// Leases this member expired since it started.
    pub expired_total: u64,
}

impl LeaseClock {
    /// This member became leader at `now`: every lease gets a full TTL from now.
    pub fn lead(&mut self, kv: &KvState, now: Instant) {
        self.deadlines = kv
            .leases()
            .map(|l| (l.id, deadline(now, l.ttl_secs)))
            .collect();
        self.revoking.clear();
    }

    /// This member no longer leads: it forgets every deadline.
    pub fn follow(&mut self) {
        self.deadlines.clear();
        self.revoking.clear();
    }

    /// A lease was granted (applied), or kept alive at `now`.
    pub fn refresh(&mut self, id: i64, ttl_secs: i64, now: Instant) {
        self.deadlines.insert(id, deadline(now, ttl_secs));
    }

    /// A lease's revocation was applied.
    pub fn forget(&mut self, id: i64) {
        self.deadlines.remove(&id);
        self.revoking.remove(&id);
    }

    /// Whether a lease is past its deadline or on its way out: it must not be renewed.
    pub fn ending(&self, id: i64, now: Instant) -> bool {
        self.revoking.contains(&id) || self.deadlines.get(&id).is_some_and(|d| *d <= now)
    }

    /// Time left on a lease, if this member tracks it.
    pub fn remaining(&self, id: i64, now: Instant) -> Option<Duration> {
        self.deadlines
            .get(&id)
            .map(|d| d.saturating_duration_since(now))
    }

    /// Leases past their deadline whose revocation is not proposed yet; they count as being
    /// revoked from now on (call [`retry`](Self::retry) if the proposal fails).
    pub fn due(&mut self, now: Instant) -> Vec<i64> {
        let mut due: Vec<i64> = self
            .deadlines
            .iter()
            .filter(|(id, d)| **d <= now && !self.revoking.contains(id))
            .map(|(id, _)| *id)
            .collect();
        due.sort_unstable();
        self.revoking.extend(&due);
        due
    }

    /// A revocation proposal was dropped: try again at the next check.
    pub fn retry(&mut self, id: i64) {
        self.revoking.remove(&id);
    }
}

fn ttl(secs: i64) -> Duration {
    Duration::from_secs(secs.clamp(1, super::kv::MAX_LEASE_TTL) as u64)
}

/// `now + ttl`, saturating far in the future rather than overflowing the clock.
fn deadline(now: Instant, secs: i64) -> Instant {
    now.checked_add(ttl(secs))
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::kv::Command;

    #[test]
    fn a_new_leader_extends_every_lease_and_expires_each_once() {
        let mut kv = KvState::default();
        kv.apply(&Command::LeaseGrant { id: 0, ttl_secs: 2 });
        kv.apply(&Command::LeaseGrant {
            id: 0,
            ttl_secs: 10,
        });
        let t0 = Instant::now();
        let mut clock = LeaseClock::default();
        clock.lead(&kv, t0);
        assert_eq!(clock.remaining(1, t0), Some(Duration::from_secs(2)));
        assert!(clock.due(t0 + Duration::from_secs(1)).is_empty());
        assert_eq!(clock.due(t0 + Duration::from_secs(3)), [1]);
        // Proposed once: not due again while the revocation is on its way.
        assert!(clock.due(t0 + Duration::from_secs(4)).is_empty());
        clock.retry(1);
        assert_eq!(clock.due(t0 + Duration::from_secs(4)), [1]);
        clock.forget(1);
        // Keeping lease 2 alive pushes its deadline.
        clock.refresh(2, 10, t0 + Duration::from_secs(9));
        assert!(clock.due(t0 + Duration::from_secs(12)).is_empty());
        clock.follow();
        assert_eq!(clock.remaining(2, t0), None);
    }
}
