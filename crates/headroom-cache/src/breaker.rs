//! A minimal circuit breaker in front of L2: after `threshold` failures in a row the cache stops
//! calling L2 for `cooldown`, then lets one probe through; the probe's outcome closes the
//! breaker or opens it again.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use headroom_core::Clock;

pub(crate) struct Breaker {
    clock: Clock,
    origin: Instant,
    threshold: u32,
    cooldown: Duration,
    failures: AtomicU32,
    /// Nanoseconds since `origin` at which the breaker opened, plus one; zero when closed.
    opened_at: AtomicU64,
    probing: AtomicBool,
}

/// What the breaker says about the next call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Permit {
    /// Closed: call.
    Call,
    /// Half-open: this call is the probe.
    Probe,
    /// Open: do not call.
    Refused,
}

impl Breaker {
    pub(crate) fn new(clock: Clock, threshold: u32, cooldown: Duration) -> Self {
        Self {
            origin: clock.now(),
            clock,
            threshold,
            cooldown,
            failures: AtomicU32::new(0),
            opened_at: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    fn since_origin(&self) -> u64 {
        let elapsed = self.clock.now().saturating_duration_since(self.origin);
        u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX - 1)
    }

    pub(crate) fn permit(&self) -> Permit {
        let opened_at = self.opened_at.load(Ordering::Acquire);
        if opened_at == 0 {
            return Permit::Call;
        }
        let cooldown = u64::try_from(self.cooldown.as_nanos()).unwrap_or(u64::MAX);
        if self.since_origin() + 1 < opened_at.saturating_add(cooldown) {
            return Permit::Refused;
        }
        match self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Permit::Probe,
            Err(_) => Permit::Refused,
        }
    }

    /// Records a successful call; returns whether this closed the breaker.
    pub(crate) fn succeeded(&self) -> bool {
        self.failures.store(0, Ordering::Release);
        if self.opened_at.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.opened_at.store(0, Ordering::Release);
        self.probing.store(false, Ordering::Release);
        true
    }

    /// Records a failed call; returns whether this opened the breaker.
    pub(crate) fn failed(&self, permit: Permit) -> bool {
        if permit == Permit::Probe {
            self.opened_at
                .store(self.since_origin() + 1, Ordering::Release);
            self.probing.store(false, Ordering::Release);
            return false;
        }
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures >= self.threshold
            && self
                .opened_at
                .compare_exchange(
                    0,
                    self.since_origin() + 1,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            return true;
        }
        false
    }

    /// A probe that ended without an answer (its caller was dropped) frees the probe slot.
    pub(crate) fn abandoned(&self, permit: Permit) {
        if permit == Permit::Probe {
            self.probing.store(false, Ordering::Release);
        }
    }

    pub(crate) fn cooldown(&self) -> Duration {
        self.cooldown
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use headroom_core::ManualClock;
    use proptest::prelude::*;

    #[test]
    fn opens_after_threshold_probes_after_cooldown_and_recovers() {
        let manual = ManualClock::new();
        let breaker = Breaker::new(manual.clock(), 3, Duration::from_secs(5));
        for _ in 0..2 {
            assert_eq!(breaker.permit(), Permit::Call);
            assert!(!breaker.failed(Permit::Call));
        }
        assert!(breaker.failed(Permit::Call), "third failure opens");
        assert_eq!(breaker.permit(), Permit::Refused);
        manual.advance(Duration::from_secs(5));
        assert_eq!(breaker.permit(), Permit::Probe);
        assert_eq!(breaker.permit(), Permit::Refused, "one probe at a time");
        breaker.failed(Permit::Probe);
        assert_eq!(breaker.permit(), Permit::Refused, "failed probe reopens");
        manual.advance(Duration::from_secs(5));
        assert_eq!(breaker.permit(), Permit::Probe);
        assert!(breaker.succeeded(), "successful probe closes");
        assert_eq!(breaker.permit(), Permit::Call);
    }

    #[derive(Clone, Debug)]
    enum Step {
        Advance(u64),
        Call { ok: bool },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u64..8).prop_map(Step::Advance),
            any::<bool>().prop_map(|ok| Step::Call { ok }),
        ]
    }

    /// The breaker as a plain state machine, one call at a time.
    #[derive(Debug)]
    enum Model {
        Closed { failures: u32 },
        Open { since: u64, probing: bool },
    }

    proptest! {
        #[test]
        fn follows_its_model(steps in proptest::collection::vec(step(), 1..200)) {
            const THRESHOLD: u32 = 3;
            const COOLDOWN: u64 = 5;
            let manual = ManualClock::new();
            let breaker = Breaker::new(manual.clock(), THRESHOLD, Duration::from_secs(COOLDOWN));
            let mut model = Model::Closed { failures: 0 };
            let mut now = 0;
            for step in steps {
                match step {
                    Step::Advance(secs) => {
                        manual.advance(Duration::from_secs(secs));
                        now += secs;
                    }
                    Step::Call { ok } => {
                        let expected = match &mut model {
                            Model::Closed { .. } => Permit::Call,
                            Model::Open { since, .. } if now < *since + COOLDOWN => Permit::Refused,
                            Model::Open { probing: true, .. } => Permit::Refused,
                            Model::Open { probing, .. } => {
                                *probing = true;
                                Permit::Probe
                            }
                        };
                        let permit = breaker.permit();
                        prop_assert_eq!(permit, expected, "model {:?} at {}", model, now);
                        if permit == Permit::Refused {
                            continue;
                        }
                        if ok {
                            breaker.succeeded();
                            model = Model::Closed { failures: 0 };
                        } else {
                            breaker.failed(permit);
                            model = match model {
                                Model::Closed { failures } if failures + 1 < THRESHOLD => {
                                    Model::Closed { failures: failures + 1 }
                                }
                                _ => Model::Open { since: now, probing: false },
                            };
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let breaker = Breaker::new(Clock::system(), 2, Duration::from_secs(1));
        breaker.failed(Permit::Call);
        breaker.succeeded();
        assert!(!breaker.failed(Permit::Call));
        assert_eq!(breaker.permit(), Permit::Call);
    }
}
