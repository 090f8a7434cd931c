//! Hedged requests: when an attempt is slow, start another and take whichever answers first.

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use headroom_core::Clock;
use headroom_core::metrics::Counter;

use crate::budget::RetryBudget;
use crate::config::HedgeConfig;
use crate::error::ConfigError;

/// Latency buckets: four per power of two of microseconds (about 19 % wide).
const LATENCY_BUCKETS: usize = 256;
/// Latencies observed before the percentile replaces the configured delay.
const MIN_SAMPLES: u64 = 50;
/// The percentile is recomputed every this many samples.
const RECOMPUTE_EVERY: u64 = 16;
/// Past this many samples, every count is halved so that old latencies fade.
const DECAY_AT: u64 = 4_096;

fn bucket_of(micros: u64) -> usize {
    if micros < 4 {
        return micros as usize;
    }
    let msb = 63 - u64::from(micros.leading_zeros());
    let sub = (micros >> (msb - 2)) & 3;
    ((msb - 1) * 4 + sub) as usize
}

fn upper_bound_of(bucket: usize) -> u64 {
    let next = bucket as u64 + 1;
    if next < 4 {
        return next;
    }
    let msb = next / 4 + 1;
    (4 + next % 4) << (msb - 2)
}

/// A lock-free, decaying latency histogram giving a cached percentile.
struct Latencies {
    counts: Box<[AtomicU64]>,
    total: AtomicU64,
    percentile: f64,
    /// The percentile in microseconds; 0 until enough samples were seen.
    cached_micros: AtomicU64,
}

impl Latencies {
    fn new(percentile: f64) -> Self {
        Self {
            counts: (0..LATENCY_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            total: AtomicU64::new(0),
            percentile,
            cached_micros: AtomicU64::new(0),
        }
    }

    fn record(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.counts[bucket_of(micros)].fetch_add(1, Ordering::Relaxed);
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        if total >= DECAY_AT {
            for count in &self.counts {
                let _ = count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| Some(c / 2));
            }
            self.total.store(total / 2, Ordering::Relaxed);
        }
        if total >= MIN_SAMPLES && total.is_multiple_of(RECOMPUTE_EVERY) {
            self.recompute();
        }
    }

    fn recompute(&self) {
        // Two passes over the live counts: concurrent records may shift the result by a
        // sample, which a percentile estimate tolerates.
        let total: u64 = self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        let target = (self.percentile * total as f64).ceil() as u64;
        let mut seen = 0;
        for (bucket, count) in self.counts.iter().enumerate() {
            seen += count.load(Ordering::Relaxed);
            if seen >= target.max(1) {
                self.cached_micros
                    .store(upper_bound_of(bucket), Ordering::Relaxed);
                return;
            }
        }
    }

    fn current(&self) -> Option<Duration> {
        match self.cached_micros.load(Ordering::Relaxed) {
            0 => None,
            micros => Some(Duration::from_micros(micros)),
        }
    }
}

/// Hedging: after a delay without an answer, start another attempt of the same operation, and
/// keep the first success. The attempts still running are then dropped, which cancels them.
///
/// The delay is fixed, or follows a percentile of recently observed latencies (so that only
/// the slowest calls are hedged). Each hedge withdraws from the [`RetryBudget`] if one is
/// given, so hedging cannot multiply load when the dependency slows down for everyone.
/// Observed latencies are those seen by callers, which hedging itself shortens; the budget
/// bounds the extra hedging this bias could cause.
///
/// Hedge only idempotent operations: two attempts may both reach the dependency.
///
/// ```
/// use std::time::Duration;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use headroom_breaker::Hedge;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), headroom_breaker::ConfigError> {
/// let hedge = Hedge::builder().delay(Duration::from_millis(50)).build()?;
/// let calls = AtomicU32::new(0);
/// let answer = hedge
///     .call(|| async {
///         // The first attempt hangs; the hedge answers at once.
///         if calls.fetch_add(1, Ordering::Relaxed) == 0 {
///             tokio::time::sleep(Duration::from_secs(10)).await;
///         }
///         Ok::<_, std::io::Error>("fast")
///     })
///     .await;
/// assert_eq!(answer.unwrap(), "fast");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Hedge {
    inner: Arc<Inner>,
    /// Outside `inner`, so that a pipeline can label a clone with its own name.
    metrics: Arc<Metrics>,
}

struct Inner {
    config: HedgeConfig,
    budget: Option<RetryBudget>,
    latencies: Option<Latencies>,
    clock: Clock,
}

/// The counters of a hedge, labelled with the name of its pipeline.
struct Metrics {
    pipeline: Arc<str>,
    hedges: Counter,
    denied: Counter,
}

impl Metrics {
    fn new(pipeline: Arc<str>) -> Self {
        Self {
            hedges: headroom_core::counter!("headroom_breaker_hedges_total", "pipeline" => pipeline.to_string()),
            denied: headroom_core::counter!("headroom_breaker_budget_exhausted_total", "pipeline" => pipeline.to_string(), "strategy" => "hedge"),
            pipeline,
        }
    }
}

impl fmt::Debug for Hedge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hedge")
            .field("config", &self.inner.config)
            .field("delay", &self.delay())
            .field("pipeline", &self.metrics.pipeline)
            .finish_non_exhaustive()
    }
}

impl Hedge {
    /// A builder starting from [`HedgeConfig::default`].
    pub fn builder() -> HedgeBuilder {
        HedgeBuilder {
            config: HedgeConfig::default(),
            budget: None,
            clock: Clock::system(),
            name: Arc::from("default"),
        }
    }

    /// The wait before the next hedge: the observed percentile once known, else the
    /// configured delay.
    pub fn delay(&self) -> Duration {
        self.inner
            .latencies
            .as_ref()
            .and_then(Latencies::current)
            .unwrap_or(self.inner.config.delay)
    }

    pub(crate) fn budget(&self) -> Option<&RetryBudget> {
        self.inner.budget.as_ref()
    }

    /// This hedge, its metrics labelled `pipeline` (the same hedge, sharing its settings,
    /// budget and observed latencies, when they are already).
    pub(crate) fn labelled(self, pipeline: &Arc<str>) -> Self {
        if self.metrics.pipeline == *pipeline {
            return self;
        }
        Self {
            inner: self.inner,
            metrics: Arc::new(Metrics::new(Arc::clone(pipeline))),
        }
    }

    /// Runs `op`, hedged. Each hedge is a new call of `op`.
    pub async fn call<T, E, F, Fut>(&self, mut op: F) -> Result<T, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let Some(budget) = &self.inner.budget else {
            return self.run(&mut op).await;
        };
        budget.deposit_once();
        // A retry within a hedged copy (a `RetryLayer` under a `HedgeLayer`) that shares this
        // budget must not record the request again.
        RetryBudget::deposited(Some(budget), self.run(&mut op)).await
    }

    /// One hedged attempt; the caller has made the budget deposit for its request.
    pub(crate) async fn run<T, E, F, Fut>(&self, op: &mut F) -> Result<T, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let inner = &*self.inner;
        // Only a percentile delay needs the latency of this attempt.
        let start = inner.latencies.as_ref().map(|_| inner.clock.now());
        let delay = self.delay();
        let mut primary = pin!(Some(op()));
        let mut timer = pin!(inner.clock.sleep(delay));
        let mut hedges: Option<FuturesUnordered<Fut>> = None;
        let mut launched = 0;
        let mut hedging = true;
        let mut last_error = None;
        let result = poll_fn(|cx| {
            loop {
                if let Some(fut) = primary.as_mut().as_pin_mut()
                    && let Poll::Ready(result) = fut.poll(cx)
                {
                    primary.set(None);
                    match result {
                        Ok(value) => return Poll::Ready(Ok(value)),
                        Err(error) => last_error = Some(error),
                    }
                }
                if let Some(running) = hedges.as_mut() {
                    while let Poll::Ready(Some(result)) = running.poll_next_unpin(cx) {
                        match result {
                            Ok(value) => return Poll::Ready(Ok(value)),
                            Err(error) => last_error = Some(error),
                        }
                    }
                }
                let running = usize::from(primary.is_some())
                    + hedges.as_ref().map_or(0, FuturesUnordered::len);
                if running == 0
                    && let Some(error) = last_error.take()
                {
                    return Poll::Ready(Err(error));
                }
                if !hedging
                    || launched >= inner.config.max_hedges
                    || timer.as_mut().poll(cx).is_pending()
                {
                    return Poll::Pending;
                }
                if inner
                    .budget
                    .as_ref()
                    .is_some_and(|budget| !budget.try_withdraw())
                {
                    self.metrics.denied.increment(1);
                    tracing::debug!("hedge denied: retry budget spent");
                    hedging = false;
                    continue;
                }
                self.metrics.hedges.increment(1);
                launched += 1;
                tracing::debug!(attempt = launched + 1, ?delay, "hedging a slow attempt");
                hedges.get_or_insert_with(FuturesUnordered::new).push(op());
                timer.set(inner.clock.sleep(delay));
            }
        })
        .await;
        if result.is_ok()
            && let (Some(latencies), Some(start)) = (&inner.latencies, start)
        {
            latencies.record(inner.clock.now().saturating_duration_since(start));
        }
        result
    }
}

/// Builds a [`Hedge`].
#[derive(Debug)]
#[must_use]
pub struct HedgeBuilder {
    config: HedgeConfig,
    budget: Option<RetryBudget>,
    clock: Clock,
    name: Arc<str>,
}

impl HedgeBuilder {
    /// Replaces every setting with `config`.
    pub fn config(mut self, config: HedgeConfig) -> Self {
        self.config = config;
        self
    }

    /// A fixed wait before each hedge (and the wait until a percentile is known).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.config.delay = delay;
        self
    }

    /// Waits for this percentile of observed latencies instead, in (0, 1).
    pub fn percentile(mut self, percentile: f64) -> Self {
        self.config.percentile = Some(percentile);
        self
    }

    /// Extra attempts at most (1 to 16).
    pub fn max_hedges(mut self, hedges: u32) -> Self {
        self.config.max_hedges = hedges;
        self
    }

    /// The budget each hedge withdraws from; share it with the [`Retry`](crate::Retry).
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// The clock of the delays. Default: the system clock.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The `pipeline` label of its metrics. Default `"default"`; a named
    /// [`Pipeline`](crate::Pipeline) it is given to counts it under the pipeline's name.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Validates the settings and builds the hedge.
    pub fn build(self) -> Result<Hedge, ConfigError> {
        self.config.validate()?;
        Ok(Hedge {
            inner: Arc::new(Inner {
                latencies: self.config.percentile.map(Latencies::new),
                config: self.config,
                budget: self.budget,
                clock: self.clock,
            }),
            metrics: Arc::new(Metrics::new(self.name)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_their_values() {
        for micros in [0, 1, 3, 4, 5, 7, 8, 100, 1_000, 123_456, 10_000_000] {
            let bucket = bucket_of(micros);
            assert!(upper_bound_of(bucket) > micros, "{micros}");
            assert!(
                upper_bound_of(bucket) <= micros + micros / 4 + 1,
                "{micros}"
            );
        }
        assert!(bucket_of(u64::MAX) < LATENCY_BUCKETS);
    }

    #[test]
    fn percentile_follows_observed_latencies() {
        let latencies = Latencies::new(0.9);
        assert_eq!(latencies.current(), None);
        for i in 0..96u64 {
            let millis = if i % 10 == 9 { 500 } else { 10 };
            latencies.record(Duration::from_millis(millis));
        }
        let p90 = latencies.current().expect("enough samples");
        assert!(
            p90 >= Duration::from_millis(10) && p90 < Duration::from_millis(13),
            "{p90:?}"
        );
    }
}
