//! What the module's handle, its service and its link to the balancer share: options, hooks,
//! health, routes, settings, recorded metrics, and the stats built from the tracker and `/proc`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lodge_actors::balancer::RoutingTable;
use slog::Logger;
use tokio::sync::watch;
use tokio::time::Instant;

use super::limits::RateLimits;
use super::link::LinkStatus;
use super::stats::{self, ProcessSample};
use super::tracker::{ConnectionTracker, Counters};
use super::{DrainReport, ModuleHooks, ModuleOptions};
use crate::pb::balancer::{HealthStatus, ModuleStats};
use crate::reconnect::Conn;

/// Locks a std mutex, ignoring poisoning: every critical section here leaves the data whole.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Now, as Unix milliseconds.
pub(crate) fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A metric the module recorded: name and labels.
pub(crate) type MetricKey = (String, BTreeMap<String, String>);

/// The module's state; see the module documentation of `super`.
pub(crate) struct Shared {
    pub opts: ModuleOptions,
    pub hooks: ModuleHooks,
    pub log: Logger,
    pub tracker: ConnectionTracker,
    pub limits: Arc<RateLimits>,
    pub started: Instant,
    /// The secret control calls must carry (made at start, given at registration).
    pub control_token: String,
    /// What the module says of itself, with a reason.
    pub health: Mutex<(HealthStatus, String)>,
    pub draining: AtomicBool,
    pub stopped: AtomicBool,
    /// The module's own routes, compiled (empty: it takes any route it has the protocol for).
    pub routes: Mutex<RoutingTable>,
    pub settings: Mutex<BTreeMap<String, String>>,
    pub metrics: Mutex<BTreeMap<MetricKey, (f64, i64)>>,
    pub link: watch::Sender<LinkStatus>,
    pub conn: Mutex<Option<Conn>>,
    /// The window of `GetStats` and `GetMetrics` (their callers share one).
    pub on_demand: Mutex<Sampler>,
    /// Set when the link must register again (the registration's fields changed).
    pub reregister: AtomicBool,
    /// Stops the link's task.
    pub stop_link: watch::Sender<bool>,
    /// Set when the process should exit (after a Shutdown call).
    pub exit: watch::Sender<bool>,
    /// Held by the drain under way; keeps its report for later callers.
    pub drain: tokio::sync::Mutex<Option<DrainReport>>,
}

impl Shared {
    /// The health the module reports: stopped after a drain, stopping during one, otherwise
    /// what the module says of itself.
    pub fn health(&self) -> (HealthStatus, String) {
        if self.stopped.load(Ordering::SeqCst) {
            return (HealthStatus::Stopped, "drained".into());
        }
        if self.draining.load(Ordering::SeqCst) {
            return (HealthStatus::Stopping, "draining".into());
        }
        lock(&self.health).clone()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The instance id in use: the registered one once there is one.
    pub fn instance_id(&self) -> String {
        self.link
            .borrow()
            .instance_id
            .clone()
            .unwrap_or_else(|| self.opts.instance_id.clone())
    }

    pub fn uptime_ms(&self) -> i64 {
        self.started.elapsed().as_millis() as i64
    }

    /// A stats sample ending now, over `sampler`'s window.
    pub fn stats(&self, sampler: &mut Sampler) -> ModuleStats {
        let now = Snapshot::take(&self.tracker);
        sampler.sample(now, self.uptime_ms())
    }

    /// Stats over the shared on-demand window (see [`Sampler::min_window`]).
    pub fn stats_on_demand(&self) -> ModuleStats {
        let now = Snapshot::take(&self.tracker);
        lock(&self.on_demand).sample(now, self.uptime_ms())
    }
}

/// The counters and process figures at one instant.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Snapshot {
    pub at: Instant,
    pub counters: Counters,
    pub process: ProcessSample,
}

impl Snapshot {
    pub fn take(tracker: &ConnectionTracker) -> Self {
        Snapshot {
            at: Instant::now(),
            counters: tracker.counters(),
            process: ProcessSample::read(),
        }
    }
}

/// The rates of one window: between a base snapshot and a later one.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Rates {
    pub requests_per_second: f64,
    pub cpu_percent: f64,
    pub latency_ms: f64,
}

/// Turns snapshots into stats. Rates (requests per second, CPU, latency) are over the window
/// since the previous sample; counters and gauges are as of now.
///
/// Latency is the mean of the samples recorded in the window (for `lodge module`: the time to
/// connect to the backend); a window without samples keeps the previous window's mean, since
/// "no new connections" says nothing about how fast the next one will be served.
pub(crate) struct Sampler {
    base: Snapshot,
    last: Rates,
    /// Windows shorter than this do not move the base: their rates would be noise (a CPU tick
    /// is 10 ms). Used by the on-demand sampler, whose callers may ask at any rate.
    min_window: Duration,
    computed: bool,
}

impl Sampler {
    pub fn new(base: Snapshot, min_window: Duration) -> Self {
        Sampler {
            base,
            last: Rates::default(),
            min_window,
            computed: false,
        }
    }

    fn rates(&self, now: &Snapshot) -> Rates {
        let wall = now.at.saturating_duration_since(self.base.at);
        let secs = wall.as_secs_f64();
        let (b, n) = (&self.base.counters, &now.counters);
        let requests_per_second = if secs > 0.0 {
            n.requests.saturating_sub(b.requests) as f64 / secs
        } else {
            0.0
        };
        let samples = n.latency_samples.saturating_sub(b.latency_samples);
        let latency_ms = if samples > 0 {
            n.latency_us_sum.saturating_sub(b.latency_us_sum) as f64 / samples as f64 / 1000.0
        } else {
            self.last.latency_ms
        };
        Rates {
            requests_per_second,
            cpu_percent: stats::cpu_percent(&self.base.process, &now.process, wall),
            latency_ms,
        }
    }

    /// The stats as of `now`, moving the window's base to `now` when the window is long enough.
    pub fn sample(&mut self, now: Snapshot, uptime_ms: i64) -> ModuleStats {
        let long_enough = now.at.saturating_duration_since(self.base.at) >= self.min_window;
        let rates = if long_enough || !self.computed {
            self.rates(&now)
        } else {
            self.last
        };
        if long_enough {
            self.last = rates;
            self.computed = true;
            self.base = now;
        }
        let c = &now.counters;
        let total = stats::memory_total_bytes();
        ModuleStats {
            active_connections: c.active,
            total_connections: c.total,
            requests_per_second: rates.requests_per_second,
            cpu_percent: rates.cpu_percent,
            memory_percent: stats::memory_percent(now.process.rss_bytes, total),
            memory_bytes: now.process.rss_bytes,
            latency_ms: rates.latency_ms,
            queue_depth: c.queued,
            bytes_in: c.bytes_in,
            bytes_out: c.bytes_out,
            errors_total: c.errors,
            uptime_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(at: Instant, requests: u64, lat_sum_us: u64, lat_n: u64) -> Snapshot {
        Snapshot {
            at,
            counters: Counters {
                requests,
                latency_us_sum: lat_sum_us,
                latency_samples: lat_n,
                ..Counters::default()
            },
            process: ProcessSample::default(),
        }
    }

    #[test]
    fn rates_are_over_the_window_and_latency_is_kept_when_idle() {
        let t0 = Instant::now();
        let mut s = Sampler::new(snap(t0, 0, 0, 0), Duration::ZERO);
        let st = s.sample(snap(t0 + Duration::from_secs(2), 10, 6000, 2), 5);
        assert!((st.requests_per_second - 5.0).abs() < 1e-9);
        assert!((st.latency_ms - 3.0).abs() < 1e-9);
        assert_eq!(st.uptime_ms, 5);
        // No new connection: no requests, and the latency of the last window stays.
        let st = s.sample(snap(t0 + Duration::from_secs(3), 10, 6000, 2), 6);
        assert_eq!(st.requests_per_second, 0.0);
        assert!((st.latency_ms - 3.0).abs() < 1e-9);
        // A new sample replaces it.
        let st = s.sample(snap(t0 + Duration::from_secs(4), 11, 7000, 3), 7);
        assert!((st.latency_ms - 1.0).abs() < 1e-9);
    }

    #[test]
    fn short_windows_do_not_move_the_on_demand_base() {
        let t0 = Instant::now();
        let mut s = Sampler::new(snap(t0, 0, 0, 0), Duration::from_secs(1));
        // Before any long-enough window, the rates are computed against the base anyway.
        let st = s.sample(snap(t0 + Duration::from_millis(500), 5, 0, 0), 0);
        assert!((st.requests_per_second - 10.0).abs() < 1e-9);
        let st = s.sample(snap(t0 + Duration::from_secs(2), 20, 0, 0), 0);
        assert!((st.requests_per_second - 10.0).abs() < 1e-9);
        // 100 ms later: too short, the last window's rates are repeated.
        let st = s.sample(snap(t0 + Duration::from_millis(2100), 1000, 0, 0), 0);
        assert!((st.requests_per_second - 10.0).abs() < 1e-9);
    }
}
