//! The process's own CPU and memory, from `/proc` (Linux; zeros elsewhere), for the stats a
//! module reports.
//!
//! CPU is reported like `top` does: the share of one core used between two samples (so a busy
//! process on four cores can show up to 400%). Memory is the resident set, also as a percentage
//! of `MemTotal`.

use std::sync::OnceLock;
use std::time::Duration;

/// One reading of the process's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessSample {
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    /// Resident set size.
    pub rss_bytes: u64,
}

impl ProcessSample {
    /// Reads `/proc/self/stat` and `/proc/self/statm`; a file that cannot be read gives zero.
    pub fn read() -> Self {
        let cpu_ticks = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| parse_stat_cpu_ticks(&s))
            .unwrap_or(0);
        let rss_bytes = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| parse_statm_resident_pages(&s))
            .map_or(0, |pages| pages.saturating_mul(page_size()));
        ProcessSample {
            cpu_ticks,
            rss_bytes,
        }
    }
}

/// The kernel's clock ticks per second (`USER_HZ`, the unit of `/proc/self/stat` times).
fn ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second().max(1)
}

/// Read from the auxiliary vector rather than assumed: arm64 kernels use 16 or 64 KiB pages.
fn page_size() -> u64 {
    rustix::param::page_size() as u64
}

/// `utime + stime` (fields 14 and 15 of proc(5)) of a `/proc/<pid>/stat` line. The command name
/// (field 2) is in parentheses and may hold spaces or parentheses itself, so fields are counted
/// from the last `)`.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (the state).
    let mut fields = rest.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The resident pages (second field) of a `/proc/<pid>/statm` line.
pub fn parse_statm_resident_pages(statm: &str) -> Option<u64> {
    statm.split_whitespace().nth(1)?.parse().ok()
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
pub fn parse_meminfo_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    let scale = match words.next() {
        Some(u) if u.eq_ignore_ascii_case("kb") => 1024,
        None => 1,
        Some(_) => return None,
    };
    Some(value * scale)
}

/// The machine's memory (read once: it does not change under a running process); 0 if unknown.
pub fn memory_total_bytes() -> u64 {
    static TOTAL: OnceLock<u64> = OnceLock::new();
    *TOTAL.get_or_init(|| {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| parse_meminfo_total_bytes(&s))
            .unwrap_or(0)
    })
}

/// CPU use between two samples taken `wall` apart, in percent of one core.
pub fn cpu_percent(prev: &ProcessSample, now: &ProcessSample, wall: Duration) -> f64 {
    cpu_percent_with(prev, now, wall, ticks_per_second())
}

fn cpu_percent_with(prev: &ProcessSample, now: &ProcessSample, wall: Duration, hz: u64) -> f64 {
    let secs = wall.as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    let used = now.cpu_ticks.saturating_sub(prev.cpu_ticks) as f64 / hz as f64;
    used / secs * 100.0
}

/// `rss` as a percentage of `total` (0 when the total is unknown).
pub fn memory_percent(rss: u64, total: u64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    rss as f64 / total as f64 * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real line, with a command name that holds a space and a parenthesis.
    const STAT: &str = "4242 (lodge mod) ule) S 1 4242 4242 0 -1 4194560 1520 0 0 0 \
                        250 75 0 0 20 0 9 0 123456 987654321 2048 18446744073709551615 1 1 0 0 \
                        0 0 0 4096 17664 0 0 0 17 3 0 0 0 0 0";

    #[test]
    fn stat_gives_user_plus_system_ticks() {
        assert_eq!(parse_stat_cpu_ticks(STAT), Some(325));
        assert_eq!(parse_stat_cpu_ticks("1 (x) S 1 2"), None);
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn statm_gives_resident_pages() {
        assert_eq!(
            parse_statm_resident_pages("55000 2048 900 300 0 40000 0\n"),
            Some(2048)
        );
        assert_eq!(parse_statm_resident_pages("55000"), None);
    }

    #[test]
    fn meminfo_gives_the_total_in_bytes() {
        let text = "MemTotal:       16318460 kB\nMemFree:         1000000 kB\n";
        assert_eq!(parse_meminfo_total_bytes(text), Some(16318460 * 1024));
        assert_eq!(parse_meminfo_total_bytes("MemFree: 1 kB\n"), None);
        assert_eq!(parse_meminfo_total_bytes("MemTotal: 12 MB\n"), None);
    }

    #[test]
    fn cpu_is_the_tick_delta_over_wall_time() {
        let a = ProcessSample {
            cpu_ticks: 1000,
            rss_bytes: 0,
        };
        let b = ProcessSample {
            cpu_ticks: 1050,
            rss_bytes: 0,
        };
        // 50 ticks at 100 Hz = 0.5 s of CPU in 2 s of wall time.
        let p = cpu_percent_with(&a, &b, Duration::from_secs(2), 100);
        assert!((p - 25.0).abs() < 1e-9, "{p}");
        // Two busy cores for one second.
        let c = ProcessSample {
            cpu_ticks: 1200,
            rss_bytes: 0,
        };
        let p = cpu_percent_with(&a, &c, Duration::from_secs(1), 100);
        assert!((p - 200.0).abs() < 1e-9, "{p}");
        assert_eq!(cpu_percent_with(&a, &b, Duration::ZERO, 100), 0.0);
        // A counter that went backwards (never on Linux) is not a negative use.
        assert_eq!(cpu_percent_with(&b, &a, Duration::from_secs(1), 100), 0.0);
    }

    #[test]
    fn memory_percent_of_total() {
        assert!((memory_percent(512, 2048) - 25.0).abs() < 1e-9);
        assert_eq!(memory_percent(512, 0), 0.0);
    }

    #[test]
    fn this_process_has_real_figures() {
        let s = ProcessSample::read();
        assert!(s.rss_bytes > 0);
        assert!(memory_total_bytes() > s.rss_bytes);
        // Burn a little CPU and see the counter move.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while ProcessSample::read().cpu_ticks == s.cpu_ticks {
            for i in 0..100_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            assert!(start.elapsed() < Duration::from_secs(30), "{x}");
        }
    }
}
