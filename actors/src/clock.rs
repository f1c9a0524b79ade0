//! A coarse wall clock for hot paths.
//!
//! Stamping "last activity" on every message with `SystemTime::now()` would cost about as much as
//! handling a small message, so a background thread refreshes a millisecond stamp instead. The
//! stamp is at most a few milliseconds old, which is plenty for an operator reading it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

static NOW_MS: AtomicU64 = AtomicU64::new(0);
static TICKER: Once = Once::new();
const RESOLUTION: Duration = Duration::from_millis(5);

/// Milliseconds since the Unix epoch, refreshed every few milliseconds.
pub fn now_ms() -> u64 {
    if !TICKER.is_completed() {
        start_ticker();
    }
    NOW_MS.load(Ordering::Relaxed)
}

/// Milliseconds since the Unix epoch, read from the system clock now.
pub fn precise_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn start_ticker() {
    TICKER.call_once(|| {
        NOW_MS.store(precise_ms(), Ordering::Relaxed);
        std::thread::Builder::new()
            .name("lodge-clock".into())
            .spawn(|| loop {
                std::thread::sleep(RESOLUTION);
                NOW_MS.store(precise_ms(), Ordering::Relaxed);
            })
            .expect("spawning the clock thread");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_clock_tracks_the_system_clock() {
        let before = precise_ms();
        let coarse = now_ms();
        assert!(coarse + 1_000 >= before && coarse <= precise_ms() + 1_000);
    }
}
