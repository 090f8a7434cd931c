//! The retry budget: retries (and hedges) as a bounded share of recent requests.

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use headroom_core::{Clock, Stopwatch};

use crate::config::BudgetConfig;
use crate::error::ConfigError;
use crate::window::TimeBuckets;

const BUCKETS: u32 = 10;

/// A budget of retries shared by every caller of a dependency, as in tower and Envoy.
///
/// Each request deposits one unit; each retry or hedge withdraws one. Over the last `window`,
/// withdrawals may not exceed `ratio` × requests plus `min_per_second` × the window's seconds.
/// During an outage, load on the dependency therefore stays under `1 + ratio` times the
/// request rate instead of multiplying by the number of attempts. Clones share the budget.
///
/// ```
/// use std::time::Duration;
/// use headroom_breaker::RetryBudget;
///
/// let budget = RetryBudget::builder()
///     .ratio(0.1)
///     .min_per_second(0)
///     .window(Duration::from_secs(10))
///     .build()?;
/// for _ in 0..20 {
///     budget.deposit();
/// }
/// assert!(budget.try_withdraw());
/// assert!(budget.try_withdraw());
/// assert!(!budget.try_withdraw());
/// # Ok::<(), headroom_breaker::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct RetryBudget {
    inner: Arc<Inner>,
}

struct Inner {
    buckets: TimeBuckets<2>,
    ratio: f64,
    reserve: f64,
    /// Nanoseconds since the budget was built, on its clock.
    time: Stopwatch,
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ratio", &self.inner.ratio)
            .field("reserve", &self.inner.reserve)
            .finish_non_exhaustive()
    }
}

thread_local! {
    /// The budget the request being polled was recorded in by its retry (0: none). Set around
    /// each poll: a few instructions on the retry's path, where a task-local costs hundreds.
    static DEPOSITED: Cell<usize> = const { Cell::new(0) };
}

pin_project_lite::pin_project! {
    /// A request's attempts, polled as recorded in a budget (see [`RetryBudget::deposited`]).
    pub(crate) struct Deposited<F> {
        budget: usize,
        #[pin]
        attempts: F,
    }
}

impl<F: Future> Future for Deposited<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if *this.budget == 0 {
            // No budget of its own: a budget recorded further out stays in force.
            return this.attempts.poll(cx);
        }
        let _entered = Entered(DEPOSITED.replace(*this.budget));
        this.attempts.poll(cx)
    }
}

/// Restores the budget recorded before a poll, also when the poll panics.
struct Entered(usize);

impl Drop for Entered {
    fn drop(&mut self) {
        DEPOSITED.set(self.0);
    }
}

impl RetryBudget {
    /// A builder starting from [`BudgetConfig::default`].
    pub fn builder() -> RetryBudgetBuilder {
        RetryBudgetBuilder {
            config: BudgetConfig::default(),
            clock: Clock::system(),
        }
    }

    /// Whether both handles share one budget.
    pub(crate) fn same(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(&a.inner, &b.inner)
    }

    fn id(&self) -> usize {
        Arc::as_ptr(&self.inner).addr()
    }

    /// Runs a request's `attempts`, recorded in `budget`: a hedge or retry within them (a
    /// `HedgeLayer` under a `RetryLayer`, or a `RetryLayer` under a `HedgeLayer`) that shares
    /// the budget does not record the request again, or each retry or hedge would pay for
    /// itself.
    pub(crate) fn deposited<F: Future>(budget: Option<&Self>, attempts: F) -> Deposited<F> {
        Deposited {
            budget: budget.map_or(0, Self::id),
            attempts,
        }
    }

    /// Records one request, unless a retry or hedge running it recorded it already (see
    /// [`deposited`](Self::deposited)).
    pub(crate) fn deposit_once(&self) {
        if !self.recorded_in(DEPOSITED.get()) {
            self.deposit();
        }
    }

    /// The budget the request being polled is recorded in (see [`deposited`](Self::deposited)),
    /// as [`recorded_in`](Self::recorded_in) takes it.
    pub(crate) fn recorded() -> usize {
        DEPOSITED.get()
    }

    /// Whether `recorded` (from [`recorded`](Self::recorded)) is this budget.
    pub(crate) fn recorded_in(&self, recorded: usize) -> bool {
        recorded == self.id()
    }

    fn epoch(&self) -> u64 {
        self.inner.buckets.epoch(self.inner.time.elapsed_nanos())
    }

    /// Records one request (a first attempt).
    pub fn deposit(&self) {
        self.inner.buckets.add(self.epoch(), [1, 0]);
    }

    /// Takes leave for one retry or hedge; `false` when the budget is spent.
    pub fn try_withdraw(&self) -> bool {
        self.withdraw().is_some()
    }

    /// [`try_withdraw`](Self::try_withdraw), answering the time slice the unit was taken
    /// from, to [give it back](Self::give_back).
    pub(crate) fn withdraw(&self) -> Option<u64> {
        let epoch = self.epoch();
        self.inner.buckets.add(epoch, [0, 1]);
        let [deposits, withdrawals] = self.inner.buckets.sum(epoch);
        let allowed = self.inner.reserve + self.inner.ratio * deposits as f64;
        if withdrawals as f64 <= allowed {
            return Some(epoch);
        }
        self.give_back(epoch);
        None
    }

    /// Gives back a unit taken in time slice `epoch` for a retry that never ran (nothing,
    /// once that slice has left the window).
    pub(crate) fn give_back(&self, epoch: u64) {
        self.inner.buckets.add(epoch, [0, -1]);
    }
}

/// Builds a [`RetryBudget`].
#[derive(Debug)]
#[must_use]
pub struct RetryBudgetBuilder {
    config: BudgetConfig,
    clock: Clock,
}

impl RetryBudgetBuilder {
    /// Replaces every setting with `config`.
    pub fn config(mut self, config: BudgetConfig) -> Self {
        self.config = config;
        self
    }

    /// Retries allowed per request, in [0, 10].
    pub fn ratio(mut self, ratio: f64) -> Self {
        self.config.ratio = ratio;
        self
    }

    /// Retries allowed per second regardless of traffic.
    pub fn min_per_second(mut self, retries: u32) -> Self {
        self.config.min_per_second = retries;
        self
    }

    /// How far back requests and retries are counted.
    pub fn window(mut self, window: Duration) -> Self {
        self.config.window = window;
        self
    }

    /// The clock of the window. Default: the system clock.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Validates the settings and builds the budget.
    pub fn build(self) -> Result<RetryBudget, ConfigError> {
        self.config.validate()?;
        let window = self.config.window;
        Ok(RetryBudget {
            inner: Arc::new(Inner {
                buckets: TimeBuckets::new(
                    u64::try_from(window.as_nanos()).unwrap_or(u64::MAX),
                    BUCKETS,
                ),
                ratio: self.config.ratio,
                reserve: f64::from(self.config.min_per_second) * window.as_secs_f64(),
                time: self.clock.stopwatch(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use headroom_core::ManualClock;

    #[test]
    fn withdrawals_follow_deposits_and_expire_with_the_window() {
        let manual = ManualClock::new();
        let budget = RetryBudget::builder()
            .ratio(0.5)
            .min_per_second(0)
            .window(Duration::from_secs(1))
            .clock(manual.clock())
            .build()
            .expect("budget");
        assert!(!budget.try_withdraw(), "nothing deposited yet");
        for _ in 0..4 {
            budget.deposit();
        }
        assert!(budget.try_withdraw());
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw());
        manual.advance(Duration::from_millis(1_100));
        assert!(!budget.try_withdraw(), "old deposits expired");
        budget.deposit();
        budget.deposit();
        assert!(budget.try_withdraw());
    }

    #[test]
    fn reserve_allows_retries_without_traffic() {
        let manual = ManualClock::new();
        let budget = RetryBudget::builder()
            .ratio(0.0)
            .min_per_second(2)
            .window(Duration::from_secs(2))
            .clock(manual.clock())
            .build()
            .expect("budget");
        let granted = (0..10).filter(|_| budget.try_withdraw()).count();
        assert_eq!(granted, 4);
    }
}
