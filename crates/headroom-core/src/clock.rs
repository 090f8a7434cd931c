use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

/// The source of time for every headroom component.
///
/// Three kinds exist:
///
/// - [`Clock::system`] reads the CPU's invariant time-stamp counter, calibrated against the
///   operating system's monotonic clock once per process (through `quanta`), or the monotonic
///   clock itself where no such counter exists. A read costs about half of `Instant::now`, which
///   matters on the paths that read it per call: rate checks, the breaker's time window, the
///   cache's L1 deadlines. The first system clock of a process calibrates the counter once,
///   busy-waiting while it does (quanta's calibration: at least 500 rounds of 1 µs, at most
///   200 ms).
/// - With the `test-util` feature, [`Clock::system`] reads tokio's clock instead: real time, or
///   the paused, auto-advancing clock inside `#[tokio::test(start_paused = true)]`. Enable it in
///   `[dev-dependencies]` of tests that pause time; it costs a runtime lookup per read.
/// - [`ManualClock`] only moves when a test calls [`ManualClock::advance`]; [`Clock::sleep`] on
///   it completes once the clock has been advanced past the deadline.
///
/// Wall time ([`Clock::unix_time`]) is anchored once per process and then advances with tokio's
/// clock (the operating system's monotonic clock, or paused time), so it never jumps backwards
/// and agrees across processes as well as their wall clocks do.
///
/// Cloning is cheap; clones of a manual clock share its time.
#[derive(Clone)]
pub struct Clock {
    source: Source,
}

#[derive(Clone)]
enum Source {
    Counter(&'static Counter),
    Tokio,
    Manual(Arc<ManualState>),
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

/// The calibrated CPU counter, and the `Instant` its first reading stands for.
struct Counter {
    clock: quanta::Clock,
    origin_ticks: u64,
    origin: Instant,
}

impl Counter {
    fn get() -> &'static Counter {
        static COUNTER: OnceLock<Counter> = OnceLock::new();
        COUNTER.get_or_init(|| {
            let clock = quanta::Clock::new();
            Counter {
                origin_ticks: clock.raw(),
                origin: Instant::now(),
                clock,
            }
        })
    }

    #[inline]
    fn ticks(&self) -> u64 {
        self.clock.raw()
    }

    #[inline]
    fn nanos_since(&self, ticks: u64) -> u64 {
        self.clock.delta_as_nanos(ticks, self.clock.raw())
    }
}

struct ManualState {
    origin: Instant,
    unix_origin: Duration,
    elapsed_nanos: AtomicU64,
    advanced: Notify,
}

/// Tokio's clock, out of line: the counter's read is the one worth inlining into hot paths.
#[inline(never)]
fn tokio_now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl ManualState {
    #[inline(never)]
    fn now(&self) -> Instant {
        self.origin + self.elapsed()
    }

    fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.elapsed_nanos())
    }

    fn elapsed_nanos(&self) -> u64 {
        self.elapsed_nanos.load(Ordering::Acquire)
    }
}

/// Wall time anchored to the real monotonic clock at first use. Anchoring to tokio's clock
/// instead would pin it to whichever runtime read it first: a paused one that had run ahead
/// would freeze the wall time of every later runtime until real time caught up.
struct Anchor {
    instant: Instant,
    unix: Duration,
}

fn anchor() -> &'static Anchor {
    static ANCHOR: OnceLock<Anchor> = OnceLock::new();
    ANCHOR.get_or_init(|| Anchor {
        instant: Instant::now(),
        unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default(),
    })
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl Clock {
    /// The system clock: the calibrated CPU counter, or tokio's clock with the `test-util`
    /// feature (see the type's docs).
    pub fn system() -> Self {
        if cfg!(feature = "test-util") {
            Self::tokio()
        } else {
            Self::counter()
        }
    }

    fn counter() -> Self {
        Self {
            source: Source::Counter(Counter::get()),
        }
    }

    fn tokio() -> Self {
        Self {
            source: Source::Tokio,
        }
    }

    /// Whether this clock is driven by hand.
    pub fn is_manual(&self) -> bool {
        matches!(self.source, Source::Manual(_))
    }

    /// The current monotonic instant.
    #[inline]
    pub fn now(&self) -> Instant {
        match &self.source {
            Source::Counter(counter) => {
                counter.origin + Duration::from_nanos(counter.nanos_since(counter.origin_ticks))
            }
            Source::Tokio => tokio_now(),
            Source::Manual(state) => state.now(),
        }
    }

    /// A stopwatch started now on this clock: the cheapest way to count elapsed time on a hot
    /// path.
    pub fn stopwatch(&self) -> Stopwatch {
        let started_ticks = match &self.source {
            Source::Counter(counter) => counter.ticks(),
            Source::Tokio => 0,
            Source::Manual(state) => state.elapsed_nanos(),
        };
        Stopwatch {
            clock: self.clone(),
            started: self.now(),
            started_ticks,
        }
    }

    /// The current wall time as a duration since the Unix epoch.
    ///
    /// Used for timestamps that cross process boundaries (cache envelopes, invalidation
    /// messages). Millisecond precision is what those consumers need.
    pub fn unix_time(&self) -> Duration {
        match &self.source {
            Source::Counter(_) | Source::Tokio => {
                // Tokio's clock: the real one, or a paused runtime's, which may be ahead.
                let anchor = anchor();
                let now = tokio_now();
                match now.checked_duration_since(anchor.instant) {
                    Some(since) => anchor.unix + since,
                    None => anchor.unix.saturating_sub(anchor.instant - now),
                }
            }
            Source::Manual(state) => state.unix_origin + state.elapsed(),
        }
    }

    /// The wall time in whole milliseconds since the Unix epoch.
    pub fn unix_millis(&self) -> u64 {
        u64::try_from(self.unix_time().as_millis()).unwrap_or(u64::MAX)
    }

    /// The wall time in whole microseconds since the Unix epoch.
    pub fn unix_micros(&self) -> u64 {
        u64::try_from(self.unix_time().as_micros()).unwrap_or(u64::MAX)
    }

    /// Waits until `duration` has passed on this clock.
    pub async fn sleep(&self, duration: Duration) {
        match &self.source {
            Source::Counter(_) | Source::Tokio => tokio::time::sleep(duration).await,
            Source::Manual(state) => {
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

/// Time elapsed since a start, on a [`Clock`]: what rate limiters and rolling windows count in.
///
/// On the system clock, [`Stopwatch::elapsed_nanos`] is one counter read and one scaling
/// multiply, with no `Instant` arithmetic.
///
/// ```
/// use std::time::Duration;
/// use headroom_core::ManualClock;
///
/// let manual = ManualClock::new();
/// let stopwatch = manual.clock().stopwatch();
/// manual.advance(Duration::from_millis(3));
/// assert_eq!(stopwatch.elapsed_nanos(), 3_000_000);
/// ```
#[derive(Clone, Debug)]
pub struct Stopwatch {
    clock: Clock,
    started: Instant,
    /// The counter reading (system clock) or the manual clock's elapsed nanoseconds at the start.
    started_ticks: u64,
}

impl Stopwatch {
    /// Nanoseconds since the stopwatch started, saturating after 584 years.
    #[inline]
    pub fn elapsed_nanos(&self) -> u64 {
        match &self.clock.source {
            Source::Counter(counter) => counter.nanos_since(self.started_ticks),
            Source::Tokio => nanos(tokio_now().saturating_duration_since(self.started)),
            Source::Manual(state) => state.elapsed_nanos().saturating_sub(self.started_ticks),
        }
    }

    /// Time since the stopwatch started.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.elapsed_nanos())
    }

    /// The instant the stopwatch started, on its clock.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The clock the stopwatch reads.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Source::Counter(_) => f.write_str("Clock::Counter"),
            Source::Tokio => f.write_str("Clock::Tokio"),
            Source::Manual(state) => f
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
#[derive(Clone)]
pub struct ManualClock {
    state: Arc<ManualState>,
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
            state: Arc::new(ManualState {
                origin: Instant::now(),
                unix_origin: unix_time,
                elapsed_nanos: AtomicU64::new(0),
                advanced: Notify::new(),
            }),
        }
    }

    /// The [`Clock`] to hand to components under test.
    pub fn clock(&self) -> Clock {
        Clock {
            source: Source::Manual(self.state.clone()),
        }
    }

    /// Moves time forward and wakes sleepers whose deadline has passed.
    pub fn advance(&self, by: Duration) {
        // Saturating: time advanced past what it counts stays at its end, never wraps back.
        let _ =
            self.state
                .elapsed_nanos
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |elapsed| {
                    Some(elapsed.saturating_add(nanos(by)))
                });
        self.state.advanced.notify_waiters();
    }

    /// Time elapsed on this clock since it was created.
    pub fn elapsed(&self) -> Duration {
        self.state.elapsed()
    }
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.clock().fmt(f)
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl From<ManualClock> for Clock {
    fn from(manual: ManualClock) -> Self {
        manual.clock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_time_never_goes_back_however_far_it_is_advanced() {
        let manual = ManualClock::new();
        let clock = manual.clock();
        manual.advance(Duration::from_secs(1));
        let before = clock.now();
        manual.advance(Duration::MAX);
        assert!(clock.now() >= before);
        manual.advance(Duration::from_secs(1));
        assert!(clock.now() >= before);
    }

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
    async fn the_tokio_clock_follows_paused_time() {
        let clock = Clock::tokio();
        let t0 = clock.now();
        let wall0 = clock.unix_time();
        let stopwatch = clock.stopwatch();
        tokio::time::advance(Duration::from_secs(3_600)).await;
        assert!(clock.now() - t0 >= Duration::from_secs(3_600));
        assert!(clock.unix_time() - wall0 >= Duration::from_secs(3_600));
        assert!(stopwatch.elapsed() >= Duration::from_secs(3_600));
    }

    #[test]
    fn the_system_clock_is_tokios_with_test_util_and_the_counter_without() {
        let system = Clock::system();
        if cfg!(feature = "test-util") {
            assert!(matches!(system.source, Source::Tokio));
        } else {
            assert!(matches!(system.source, Source::Counter(_)));
        }
    }

    /// The counter agrees with the operating system's monotonic clock: an interval it measures
    /// lies within the interval `Instant::now` measures around it, give or take 1 % of
    /// calibration error.
    #[test]
    fn the_counter_clock_measures_what_the_monotonic_clock_measures() {
        let clock = Clock::counter();
        for pause in [Duration::from_millis(2), Duration::from_millis(20)] {
            let outer_start = Instant::now();
            let stopwatch = clock.stopwatch();
            let inner_start = clock.now();
            // Spins rather than sleeps: the interval is what is measured, not a wait for an event.
            let spin_start = Instant::now();
            while spin_start.elapsed() < pause {
                std::hint::spin_loop();
            }
            let inner = clock.now() - inner_start;
            let counted = stopwatch.elapsed();
            let outer = outer_start.elapsed();
            for measured in [inner, counted] {
                assert!(measured >= pause.mul_f64(0.99), "{measured:?} < {pause:?}");
                assert!(measured <= outer.mul_f64(1.01), "{measured:?} > {outer:?}");
            }
        }
    }

    #[test]
    fn the_counter_clock_never_goes_backwards() {
        let clock = Clock::counter();
        let stopwatch = clock.stopwatch();
        let mut last = (clock.now(), stopwatch.elapsed_nanos());
        for _ in 0..100_000 {
            let next = (clock.now(), stopwatch.elapsed_nanos());
            assert!(next.0 >= last.0 && next.1 >= last.1);
            last = next;
        }
    }

    #[test]
    fn a_stopwatch_on_a_manual_clock_counts_only_what_was_advanced_after_it_started() {
        let manual = ManualClock::new();
        manual.advance(Duration::from_secs(7));
        let stopwatch = manual.clock().stopwatch();
        assert_eq!(stopwatch.elapsed_nanos(), 0);
        manual.advance(Duration::from_millis(250));
        assert_eq!(stopwatch.elapsed(), Duration::from_millis(250));
        assert_eq!(
            stopwatch.clock().now() - stopwatch.started(),
            Duration::from_millis(250)
        );
    }
}
