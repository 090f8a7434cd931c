use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

/// The source of time for every headroom component.
///
/// Two kinds exist:
///
/// - [`Clock::system`] reads tokio's clock, which is the operating system's monotonic clock in
///   production and the paused, auto-advancing clock inside `#[tokio::test(start_paused = true)]`.
///   Its wall time ([`Clock::unix_time`]) is anchored once per process and then advances with the
///   monotonic clock, so it never jumps backwards and follows paused time too.
/// - [`ManualClock`] only moves when a test calls [`ManualClock::advance`]; [`Clock::sleep`] on
///   it completes once the clock has been advanced past the deadline.
///
/// Cloning is cheap; clones of a manual clock share its time.
#[derive(Clone, Default)]
pub struct Clock {
    manual: Option<Arc<ManualState>>,
}

struct ManualState {
    origin: Instant,
    unix_origin: Duration,
    elapsed_nanos: AtomicU64,
    advanced: Notify,
}

impl ManualState {
    fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.elapsed_nanos.load(Ordering::Acquire))
    }
}

/// Wall time anchored to the monotonic clock at first use.
struct Anchor {
    instant: tokio::time::Instant,
    unix: Duration,
}

fn anchor() -> &'static Anchor {
    static ANCHOR: OnceLock<Anchor> = OnceLock::new();
    ANCHOR.get_or_init(|| Anchor {
        instant: tokio::time::Instant::now(),
        unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default(),
    })
}

impl Clock {
    /// The system clock (tokio's clock: real time, or paused time in tests).
    pub fn system() -> Self {
        Self { manual: None }
    }

    /// Whether this clock is driven by hand.
    pub fn is_manual(&self) -> bool {
        self.manual.is_some()
    }

    /// The current monotonic instant.
    #[inline]
    pub fn now(&self) -> Instant {
        match &self.manual {
            None => tokio::time::Instant::now().into_std(),
            Some(state) => state.origin + state.elapsed(),
        }
    }

    /// The current wall time as a duration since the Unix epoch.
    ///
    /// Used for timestamps that cross process boundaries (cache envelopes, invalidation
    /// messages). Millisecond precision is what those consumers need.
    pub fn unix_time(&self) -> Duration {
        match &self.manual {
            None => {
                let anchor = anchor();
                anchor.unix + tokio::time::Instant::now().saturating_duration_since(anchor.instant)
            }
            Some(state) => state.unix_origin + state.elapsed(),
        }
    }

    /// The wall time in whole milliseconds since the Unix epoch.
    pub fn unix_millis(&self) -> u64 {
        u64::try_from(self.unix_time().as_millis()).unwrap_or(u64::MAX)
    }

    /// Waits until `duration` has passed on this clock.
    pub async fn sleep(&self, duration: Duration) {
        match &self.manual {
            None => tokio::time::sleep(duration).await,
            Some(state) => {
                let deadline = state.elapsed().saturating_add(duration);
                loop {
                    let advanced = state.advanced.notified();
                    if state.elapsed() >= deadline {
                        return;
                    }
                    advanced.await;
                }
            }
        }
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.manual {
            None => f.write_str("Clock::System"),
            Some(state) => f
                .debug_struct("Clock::Manual")
                .field("elapsed", &state.elapsed())
                .finish(),
        }
    }
}

/// A clock that moves only when told to: the time source of deterministic tests.
///
/// ```
/// use std::time::Duration;
/// use headroom_core::ManualClock;
///
/// let manual = ManualClock::new();
/// let clock = manual.clock();
/// let start = clock.now();
/// manual.advance(Duration::from_secs(5));
/// assert_eq!(clock.now() - start, Duration::from_secs(5));
/// ```
#[derive(Clone, Debug)]
pub struct ManualClock {
    clock: Clock,
}

impl ManualClock {
    /// A manual clock starting at the current real time.
    pub fn new() -> Self {
        let unix_origin = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self::starting_at(unix_origin)
    }

    /// A manual clock whose wall time starts at `unix_time` since the Unix epoch.
    pub fn starting_at(unix_time: Duration) -> Self {
        Self {
            clock: Clock {
                manual: Some(Arc::new(ManualState {
                    origin: Instant::now(),
                    unix_origin: unix_time,
                    elapsed_nanos: AtomicU64::new(0),
                    advanced: Notify::new(),
                })),
            },
        }
    }

    /// The [`Clock`] to hand to components under test.
    pub fn clock(&self) -> Clock {
        self.clock.clone()
    }

    /// Moves time forward and wakes sleepers whose deadline has passed.
    pub fn advance(&self, by: Duration) {
        let state = self.state();
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        state.elapsed_nanos.fetch_add(nanos, Ordering::AcqRel);
        state.advanced.notify_waiters();
    }

    /// Time elapsed on this clock since it was created.
    pub fn elapsed(&self) -> Duration {
        self.state().elapsed()
    }

    fn state(&self) -> &ManualState {
        self.clock
            .manual
            .as_deref()
            .expect("a ManualClock always holds manual state")
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl From<ManualClock> for Clock {
    fn from(manual: ManualClock) -> Self {
        manual.clock
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let manual = ManualClock::starting_at(Duration::from_secs(1_000));
        let clock = manual.clock();
        let t0 = clock.now();
        assert_eq!(clock.now(), t0);
        assert_eq!(clock.unix_millis(), 1_000_000);
        manual.advance(Duration::from_millis(1_500));
        assert_eq!(clock.now() - t0, Duration::from_millis(1_500));
        assert_eq!(clock.unix_millis(), 1_001_500);
    }

    #[tokio::test]
    async fn manual_sleep_completes_only_after_advance_past_deadline() {
        let manual = ManualClock::new();
        let clock = manual.clock();
        let sleeper = tokio::spawn(async move { clock.sleep(Duration::from_secs(10)).await });
        tokio::task::yield_now().await;
        manual.advance(Duration::from_secs(9));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        manual.advance(Duration::from_secs(1));
        sleeper.await.expect("sleeper task");
    }

    #[tokio::test(start_paused = true)]
    async fn system_clock_follows_tokio_paused_time() {
        let clock = Clock::system();
        let t0 = clock.now();
        let wall0 = clock.unix_time();
        tokio::time::advance(Duration::from_secs(3_600)).await;
        assert!(clock.now() - t0 >= Duration::from_secs(3_600));
        assert!(clock.unix_time() - wall0 >= Duration::from_secs(3_600));
    }
}
