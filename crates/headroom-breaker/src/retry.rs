//! Retries with exponential backoff, full jitter, retry-after and a budget.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use headroom_core::metrics::Counter;
use headroom_core::{Classify, Clock};

use crate::budget::RetryBudget;
use crate::config::RetryConfig;
use crate::error::{ConfigError, Error, Predicate};
use crate::pipeline::Parts;

/// What to do after a failed attempt.
pub(crate) enum Next<'a> {
    /// Wait, then try again.
    After(Waiting<'a>),
    /// Give up with the attempt's error.
    Stop,
    /// A retry was due but the budget is spent.
    Exhausted,
}

/// A retry decided on, waiting to start: dropped before [`start`](Self::start) (its caller
/// went away during the wait), it never ran, so the budget unit it took goes back and it is
/// not counted.
pub(crate) struct Waiting<'a> {
    pub(crate) wait: Duration,
    /// The budget and the time slice it took a unit from.
    unit: Option<(&'a RetryBudget, u64)>,
    retries: &'a Counter,
}

impl Waiting<'_> {
    /// The retry starts: it is counted, and its budget unit spent.
    pub(crate) fn start(mut self) {
        self.unit = None;
        self.retries.increment(1);
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some((budget, slice)) = self.unit.take() {
            budget.give_back(slice);
        }
    }
}

/// Retries of operations failing with `E`.
///
/// A failed attempt is retried when the classifier calls its error retryable (by default
/// [`Classify::is_retryable`]; timeouts are retried unless told otherwise), attempts remain,
/// and the [`RetryBudget`], if any, grants it. The wait before retry *n* is drawn uniformly
/// from zero to `min(max_delay, base_delay × 2ⁿ⁻¹)` ("full jitter"), so that clients that failed
/// together do not retry together. When the error carries a server's retry-after, the wait
/// is at least that long, and a retry-after beyond `max_retry_after` is not retried at all.
///
/// ```
/// use std::time::Duration;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use headroom_breaker::Retry;
/// use headroom_core::{BackendError, BackendErrorKind};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let retry = Retry::<BackendError>::builder()
///     .max_attempts(3)
///     .base_delay(Duration::from_millis(10))
///     .build()?;
/// let attempts = AtomicU32::new(0);
/// let value = retry
///     .call(|| async {
///         if attempts.fetch_add(1, Ordering::Relaxed) == 0 {
///             Err(BackendError::new(BackendErrorKind::Connection))
///         } else {
///             Ok("second time lucky")
///         }
///     })
///     .await?;
/// assert_eq!(value, "second time lucky");
/// # Ok(())
/// # }
/// ```
pub struct Retry<E> {
    inner: Arc<Inner<E>>,
    /// Outside `inner`, so that a pipeline can label a clone with its own name.
    metrics: Arc<Metrics>,
}

/// The counters of a retry, labelled with the name of its pipeline.
struct Metrics {
    pipeline: Arc<str>,
    retries: Counter,
    exhausted: Counter,
}

impl Metrics {
    fn new(pipeline: Arc<str>) -> Self {
        Self {
            retries: headroom_core::counter!("headroom_breaker_retries_total", "pipeline" => pipeline.to_string()),
            exhausted: headroom_core::counter!("headroom_breaker_budget_exhausted_total", "pipeline" => pipeline.to_string(), "strategy" => "retry"),
            pipeline,
        }
    }
}

type RetryAfterFn<E> = Box<dyn Fn(&E) -> Option<Duration> + Send + Sync>;

struct Inner<E> {
    config: RetryConfig,
    retryable: Predicate<E>,
    /// Tells an attempt that timed out below this retry (an `Elapsed` inside `E`, from a
    /// timeout layer under a retry layer), so that `retry_timeouts` applies to it too.
    timed_out: Option<fn(&E) -> bool>,
    retry_after: Option<RetryAfterFn<E>>,
    budget: Option<RetryBudget>,
    clock: Clock,
}

impl<E> Clone for Retry<E> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

impl<E> fmt::Debug for Retry<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("config", &self.inner.config)
            .field("budget", &self.inner.budget)
            .field("pipeline", &self.metrics.pipeline)
            .finish_non_exhaustive()
    }
}

impl<E: Classify + 'static> Retry<E> {
    /// A builder retrying the errors that [`Classify::is_retryable`] calls retryable.
    pub fn builder() -> RetryBuilder<E> {
        let mut builder = Self::builder_when(E::is_retryable);
        builder.timed_out = Some(E::is_timeout);
        builder
    }
}

impl<E> Retry<E> {
    /// A builder retrying the errors for which `retryable` returns `true`.
    pub fn builder_when(retryable: impl Fn(&E) -> bool + Send + Sync + 'static) -> RetryBuilder<E> {
        RetryBuilder {
            config: RetryConfig::default(),
            retryable: Box::new(retryable),
            timed_out: None,
            retry_after: None,
            budget: None,
            clock: Clock::system(),
            name: Arc::from("default"),
        }
    }

    /// Runs `op`, retrying as configured. Each attempt is a new call of `op`.
    pub async fn call<T, F, Fut>(&self, op: F) -> Result<T, Error<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let attempts = Parts {
            retry: Some(self),
            ..Parts::default()
        }
        .call(op);
        // A hedge within an attempt (a `HedgeLayer` under a `RetryLayer`) that shares this
        // budget must not record the request again. A pipeline's own hedge needs no such care.
        RetryBudget::deposited(self.budget(), attempts).await
    }

    pub(crate) fn budget(&self) -> Option<&RetryBudget> {
        self.inner.budget.as_ref()
    }

    pub(crate) fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// This retry, its metrics labelled `pipeline` (the same retry, sharing its settings and
    /// budget, when they are already).
    pub(crate) fn labelled(self, pipeline: &Arc<str>) -> Self {
        if self.metrics.pipeline == *pipeline {
            return self;
        }
        Self {
            inner: self.inner,
            metrics: Arc::new(Metrics::new(Arc::clone(pipeline))),
        }
    }

    /// Decides what follows failed attempt number `attempt` (counted from 1).
    pub(crate) fn next(&self, error: &Error<E>, attempt: u32) -> Next<'_> {
        let inner = &*self.inner;
        let retryable = match error {
            // A timeout below this retry is retried only when timeouts are, and only if
            // retryable at all (one that spent a budget below is not).
            Error::Inner(error) => {
                (inner.retryable)(error)
                    && (inner.config.retry_timeouts
                        || !inner.timed_out.is_some_and(|timed_out| timed_out(error)))
            }
            Error::Elapsed(_) => inner.config.retry_timeouts,
            _ => false,
        };
        if !retryable || attempt >= inner.config.max_attempts {
            return Next::Stop;
        }
        let server_wait = match (error, &inner.retry_after) {
            (Error::Inner(error), Some(retry_after)) => retry_after(error),
            _ => None,
        };
        if server_wait.is_some_and(|wait| wait > inner.config.max_retry_after) {
            return Next::Stop;
        }
        let unit = match &inner.budget {
            Some(budget) => match budget.withdraw() {
                Some(slice) => Some((budget, slice)),
                None => {
                    self.metrics.exhausted.increment(1);
                    tracing::debug!(attempt, "retry denied: retry budget spent");
                    return Next::Exhausted;
                }
            },
            None => None,
        };
        let cap = inner
            .config
            .base_delay
            .saturating_mul(1 << (attempt - 1).min(31))
            .min(inner.config.max_delay);
        let cap_nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        let jittered = Duration::from_nanos(fastrand::u64(0..=cap_nanos));
        let wait = server_wait.map_or(jittered, |wait| wait.max(jittered));
        tracing::debug!(attempt, ?wait, "retrying");
        Next::After(Waiting {
            wait,
            unit,
            retries: &self.metrics.retries,
        })
    }
}

/// Builds a [`Retry`].
#[must_use]
pub struct RetryBuilder<E> {
    config: RetryConfig,
    retryable: Predicate<E>,
    timed_out: Option<fn(&E) -> bool>,
    retry_after: Option<RetryAfterFn<E>>,
    budget: Option<RetryBudget>,
    clock: Clock,
    name: Arc<str>,
}

impl<E> fmt::Debug for RetryBuilder<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<E> RetryBuilder<E> {
    /// Replaces every setting with `config`.
    pub fn config(mut self, config: RetryConfig) -> Self {
        self.config = config;
        self
    }

    /// Attempts in all, the first included.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.config.max_attempts = attempts;
        self
    }

    /// Backoff cap of the first retry.
    pub fn base_delay(mut self, delay: Duration) -> Self {
        self.config.base_delay = delay;
        self
    }

    /// Largest backoff cap.
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.config.max_delay = delay;
        self
    }

    /// Whether timed-out attempts are retried.
    pub fn retry_timeouts(mut self, retry: bool) -> Self {
        self.config.retry_timeouts = retry;
        self
    }

    /// Reads a server's retry-after from an error (for example, an HTTP 429 or 503 header).
    pub fn retry_after(
        mut self,
        retry_after: impl Fn(&E) -> Option<Duration> + Send + Sync + 'static,
    ) -> Self {
        self.retry_after = Some(Box::new(retry_after));
        self
    }

    /// The longest retry-after honoured; beyond it the error is returned.
    pub fn max_retry_after(mut self, wait: Duration) -> Self {
        self.config.max_retry_after = wait;
        self
    }

    /// The budget each retry withdraws from.
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// The clock of the backoff waits. Default: the system clock.
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

    /// Validates the settings and builds the retry.
    pub fn build(self) -> Result<Retry<E>, ConfigError> {
        self.config.validate()?;
        Ok(Retry {
            inner: Arc::new(Inner {
                config: self.config,
                retryable: self.retryable,
                timed_out: self.timed_out,
                retry_after: self.retry_after,
                budget: self.budget,
                clock: self.clock,
            }),
            metrics: Arc::new(Metrics::new(self.name)),
        })
    }
}
