//! Pauses between the agent's attempts to listen again.

use std::time::Duration;

/// Exponential backoff with jitter: each pause is drawn between half of the current step and the
/// step, and the step doubles up to the cap. The jitter keeps a fleet of agents that lost the
/// same node from coming back in lockstep.
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    cap: Duration,
    step: Duration,
}

impl Backoff {
    /// A backoff starting at `initial`, never pausing longer than `cap`.
    pub fn new(initial: Duration, cap: Duration) -> Self {
        Self {
            initial,
            cap,
            step: initial,
        }
    }

    /// The next pause.
    pub fn next_pause(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(self.cap);
        let half = step / 2;
        half + half.mul_f64(fastrand::f64())
    }

    /// Back to the first step, after a stream that stayed up.
    pub fn reset(&mut self) {
        self.step = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_the_cap_with_jitter_and_reset() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(200), ms(10_000));
        let mut step = ms(200);
        for _ in 0..12 {
            let p = b.next_pause();
            assert!(
                p >= step / 2 && p <= step,
                "{p:?} outside {step:?}/2..={step:?}"
            );
            step = (step * 2).min(ms(10_000));
        }
        assert!(b.next_pause() >= ms(5_000));
        b.reset();
        assert!(b.next_pause() <= ms(200));
    }
}
