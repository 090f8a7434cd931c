//! The pipeline: the strategies composed in one fixed, documented order.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use headroom_core::{Classify, Clock};
use tracing::Instrument;

use crate::breaker::{CircuitBreaker, Permit};
use crate::budget::RetryBudget;
use crate::config::PipelineConfig;
use crate::error::{ConfigError, Error};
use crate::fallback::Fallback;
use crate::hedge::Hedge;
use crate::retry::{Next, Retry};
use crate::timeout::Timeout;

/// Borrowed strategies, run in the pipeline order. Every entry point of the crate that makes
/// attempts goes through [`Parts::call`], so the order is defined in one place.
pub(crate) struct Parts<'a, E> {
    pub(crate) retry: Option<&'a Retry<E>>,
    pub(crate) breaker: Option<&'a CircuitBreaker<E>>,
    pub(crate) timeout: Option<&'a Timeout>,
    pub(crate) hedge: Option<&'a Hedge>,
}

impl<E> Default for Parts<'_, E> {
    fn default() -> Self {
        Self {
            retry: None,
            breaker: None,
            timeout: None,
            hedge: None,
        }
    }
}

impl<E> Parts<'_, E> {
    pub(crate) fn call<T, F, Fut>(self, op: F) -> impl Future<Output = Result<T, Error<E>>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        // Read at the call, before this request's own retry marks its budget as recorded: a
        // hedge further out that shares a budget has recorded the request in it already.
        let recorded = RetryBudget::recorded();
        self.run(op, recorded)
    }

    async fn run<T, F, Fut>(self, mut op: F, recorded: usize) -> Result<T, Error<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.deposit(recorded);
        let error = match self.attempt(&mut op).await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        match self.retry {
            // Boxed: the retries' state (a wait that gives its budget unit back if dropped)
            // does not weigh on the first attempt, which mostly succeeds.
            Some(retry) => Box::pin(self.retry(retry, op, error)).await,
            None => Err(error),
        }
    }

    /// Retries after the first attempt failed with `error`.
    async fn retry<T, F, Fut>(
        &self,
        retry: &Retry<E>,
        mut op: F,
        mut error: Error<E>,
    ) -> Result<T, Error<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut attempt = 1;
        loop {
            let permit = match retry.next(&error, attempt) {
                Next::Stop => return Err(error),
                Next::Exhausted => {
                    return Err(Error::BudgetExhausted {
                        last: Box::new(error),
                    });
                }
                Next::After(waiting) => {
                    retry.clock().sleep(waiting.wait).await;
                    let permit = match self.breaker {
                        Some(breaker) => match breaker.try_acquire() {
                            Ok(permit) => Some(permit),
                            // The circuit opened during the wait: the retry would never reach
                            // the dependency, so, as for a caller gone during the wait, its
                            // unit goes back with `waiting` and it is not counted. The last
                            // attempt made ended the request: its error says why.
                            Err(_) => return Err(error),
                        },
                        None => None,
                    };
                    waiting.start();
                    attempt += 1;
                    permit
                }
            };
            error = match self.retried(&mut op, permit).await {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
        }
    }

    /// One request deposits once in each distinct budget, and not in the one it was
    /// `recorded` in further out.
    fn deposit(&self, recorded: usize) {
        let retry_budget = self.retry.and_then(Retry::budget);
        if let Some(budget) = retry_budget
            && !budget.recorded_in(recorded)
        {
            budget.deposit();
        }
        if let Some(budget) = self.hedge.and_then(Hedge::budget)
            && !retry_budget.is_some_and(|other| RetryBudget::same(budget, other))
            && !budget.recorded_in(recorded)
        {
            budget.deposit();
        }
    }

    async fn attempt<T, F, Fut>(&self, op: &mut F) -> Result<T, Error<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let permit = match self.breaker {
            Some(breaker) => Some(breaker.try_acquire().map_err(Error::CircuitOpen)?),
            None => None,
        };
        // A probe is one call: hedged, it would let more than `half_open_probes` through.
        let hedge = self
            .hedge
            .filter(|_| !permit.as_ref().is_some_and(Permit::is_probe));
        let result = match (self.timeout, hedge) {
            (Some(timeout), Some(hedge)) => flatten(timeout.call(hedge.run(op)).await),
            (Some(timeout), None) => flatten(timeout.call(op()).await),
            (None, Some(hedge)) => hedge.run(op).await.map_err(Error::Inner),
            (None, None) => op().await.map_err(Error::Inner),
        };
        if let (Some(breaker), Some(permit)) = (self.breaker, permit) {
            breaker.record(permit, &result);
        }
        result
    }

    /// A retry's attempt, which the breaker admitted with `permit` before its budget unit
    /// was spent: the steps of [`attempt`](Self::attempt) after its permit, written out
    /// again, since awaiting them from `attempt` costs the first attempt, the pipeline's
    /// common path, some 2 % more instructions.
    async fn retried<T, F, Fut>(
        &self,
        op: &mut F,
        permit: Option<Permit<'_>>,
    ) -> Result<T, Error<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        // A probe is one call: hedged, it would let more than `half_open_probes` through.
        let hedge = self
            .hedge
            .filter(|_| !permit.as_ref().is_some_and(Permit::is_probe));
        let result = match (self.timeout, hedge) {
            (Some(timeout), Some(hedge)) => flatten(timeout.call(hedge.run(op)).await),
            (Some(timeout), None) => flatten(timeout.call(op()).await),
            (None, Some(hedge)) => hedge.run(op).await.map_err(Error::Inner),
            (None, None) => op().await.map_err(Error::Inner),
        };
        if let (Some(breaker), Some(permit)) = (self.breaker, permit) {
            breaker.record(permit, &result);
        }
        result
    }
}

/// Records how a pipeline call ended on its span.
fn record_outcome<T, E>(span: &tracing::Span, result: &Result<T, Error<E>>) {
    span.record(
        "outcome",
        match result {
            Ok(_) => "ok",
            Err(err) => err.kind().as_str(),
        },
    );
}

fn flatten<T, E>(result: Result<Result<T, E>, crate::Elapsed>) -> Result<T, Error<E>> {
    match result {
        Ok(inner) => inner.map_err(Error::Inner),
        Err(elapsed) => Err(Error::Elapsed(elapsed)),
    }
}

/// Strategies composed in a fixed order, outermost first:
///
/// 1. **fallback** ([`call_with_fallback`](Self::call_with_fallback)): replaces the final error;
/// 2. **retry**: repeats failed attempts, within its budget;
/// 3. **circuit breaker**: each attempt needs a permit, and its outcome is recorded (a timed-out
///    attempt is a failure);
/// 4. **timeout**: bounds each attempt, hedges included, and cancels it when reached;
/// 5. **hedge**: inside an attempt, starts extra calls when the first is slow; an attempt
///    admitted as a half-open probe is not hedged, so the breaker's probes stay single calls.
///
/// So a retry never waits on an open circuit's attempt, a breaker sees every attempt rather
/// than every request, and a timeout cancels all the hedged calls of its attempt at once.
/// Each strategy is optional. The operation is a closure returning a new future per call.
///
/// ```
/// use std::time::Duration;
/// use headroom_breaker::{CircuitBreaker, Pipeline, Retry, RetryBudget};
/// use headroom_core::BackendError;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let budget = RetryBudget::builder().ratio(0.2).build()?;
/// let pipeline = Pipeline::<BackendError>::builder()
///     .retry(Retry::builder().max_attempts(3).budget(budget).build()?)
///     .breaker(CircuitBreaker::builder().name("inventory").build()?)
///     .timeout(Duration::from_millis(250))
///     .build();
/// let stock = pipeline.call(|| async { Ok::<_, BackendError>(12) }).await?;
/// assert_eq!(stock, 12);
/// # Ok(())
/// # }
/// ```
pub struct Pipeline<E> {
    retry: Option<Retry<E>>,
    breaker: Option<CircuitBreaker<E>>,
    timeout: Option<Timeout>,
    hedge: Option<Hedge>,
    /// The `name` of its `pipeline.call` spans.
    name: Arc<str>,
}

impl<E> Clone for Pipeline<E> {
    fn clone(&self) -> Self {
        Self {
            retry: self.retry.clone(),
            breaker: self.breaker.clone(),
            timeout: self.timeout.clone(),
            hedge: self.hedge.clone(),
            name: Arc::clone(&self.name),
        }
    }
}

impl<E> fmt::Debug for Pipeline<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("retry", &self.retry)
            .field("breaker", &self.breaker)
            .field("timeout", &self.timeout.as_ref().map(Timeout::duration))
            .field("hedge", &self.hedge)
            .finish()
    }
}

impl<E> Pipeline<E> {
    /// An empty pipeline builder.
    pub fn builder() -> PipelineBuilder<E> {
        PipelineBuilder {
            pipeline: Pipeline {
                retry: None,
                breaker: None,
                timeout: None,
                hedge: None,
                name: Arc::from("default"),
            },
            timeout: None,
            clock: Clock::system(),
            name: None,
        }
    }

    fn parts(&self) -> Parts<'_, E> {
        Parts {
            retry: self.retry.as_ref(),
            breaker: self.breaker.as_ref(),
            timeout: self.timeout.as_ref(),
            hedge: self.hedge.as_ref(),
        }
    }

    /// Runs `op` through every strategy. Each attempt and each hedge is a new call of `op`.
    ///
    /// The request is recorded once in each budget of the pipeline's retry and hedge, and
    /// not again by a retry or hedge sharing the budget around the call. To hedge, give the
    /// pipeline its [`hedge`](PipelineBuilder::hedge): a [`Hedge::call`] made inside `op` that
    /// shares the retry's budget records each attempt as a request of its own, so retries
    /// would pay for themselves. (A `HedgeLayer` under a `PipelineLayer` is accounted for.)
    pub async fn call<T, F, Fut>(&self, op: F) -> Result<T, Error<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            // Without a span the call's future is not wrapped, so not moved.
            return self.parts().call(op).await;
        }
        let span = tracing::debug_span!("pipeline.call", name = %self.name, outcome = tracing::field::Empty);
        let result = self.parts().call(op).instrument(span.clone()).await;
        record_outcome(&span, &result);
        result
    }

    /// [`call`](Self::call), with the request marked as recorded in the pipeline's budget
    /// while its attempts run, so that a `HedgeLayer` below sharing it does not record it
    /// again. The budget a layer further out recorded it in is read first, when this is
    /// called.
    #[cfg(feature = "tower")]
    pub(crate) async fn call_marked<T, F, Fut>(&self, op: F) -> Result<T, Error<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let budget = self
            .retry
            .as_ref()
            .and_then(Retry::budget)
            .or_else(|| self.hedge.as_ref().and_then(Hedge::budget));
        let attempts = RetryBudget::deposited(budget, self.parts().call(op));
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return attempts.await;
        }
        let span = tracing::debug_span!("pipeline.call", name = %self.name, outcome = tracing::field::Empty);
        let result = attempts.instrument(span.clone()).await;
        record_outcome(&span, &result);
        result
    }

    /// Runs `op` and falls back as `fallback` says when it fails for good.
    pub async fn call_with_fallback<T, F, Fut>(
        &self,
        fallback: &Fallback<T, E>,
        op: F,
    ) -> Result<T, Error<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        fallback.call(self.call(op)).await
    }

    /// The circuit breaker, if there is one (to subscribe to its transitions, for example).
    pub fn breaker(&self) -> Option<&CircuitBreaker<E>> {
        self.breaker.as_ref()
    }
}

impl<E: Classify + 'static> Pipeline<E> {
    /// A pipeline from configuration, named `name` in metrics, classifying errors with
    /// [`Classify`]: every error counts as a breaker failure except rejections, and retryable
    /// errors are retried. One budget, if configured, bounds both retries and hedges.
    pub fn from_config(
        config: &PipelineConfig,
        name: &str,
        clock: Clock,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let budget = config
            .budget
            .clone()
            .map(|budget| {
                RetryBudget::builder()
                    .config(budget)
                    .clock(clock.clone())
                    .build()
            })
            .transpose()?;
        let mut builder = Self::builder().name(name).clock(clock.clone());
        if let Some(timeout) = config.timeout {
            builder = builder.timeout(timeout);
        }
        if let Some(breaker) = &config.breaker {
            builder = builder.breaker(
                CircuitBreaker::builder()
                    .config(breaker.clone())
                    .name(name)
                    .clock(clock.clone())
                    .failure_if(|error: &E| !error.is_rejected())
                    .build()?,
            );
        }
        if let Some(retry) = &config.retry {
            let mut retry = Retry::builder()
                .config(retry.clone())
                .name(name)
                .clock(clock.clone());
            if let Some(budget) = &budget {
                retry = retry.budget(budget.clone());
            }
            builder = builder.retry(retry.build()?);
        }
        if let Some(hedge) = &config.hedge {
            let mut hedge = Hedge::builder()
                .config(hedge.clone())
                .name(name)
                .clock(clock);
            if let Some(budget) = budget {
                hedge = hedge.budget(budget);
            }
            builder = builder.hedge(hedge.build()?);
        }
        Ok(builder.build())
    }
}

/// Builds a [`Pipeline`] from strategies built beforehand.
#[must_use]
pub struct PipelineBuilder<E> {
    pipeline: Pipeline<E>,
    timeout: Option<Duration>,
    clock: Clock,
    /// Unset, the retry and hedge keep the labels they were built with.
    name: Option<Arc<str>>,
}

impl<E> fmt::Debug for PipelineBuilder<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PipelineBuilder")
            .field("pipeline", &self.pipeline)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<E> PipelineBuilder<E> {
    /// Retries failed attempts.
    pub fn retry(mut self, retry: Retry<E>) -> Self {
        self.pipeline.retry = Some(retry);
        self
    }

    /// Guards every attempt with `breaker` (clones share its state).
    pub fn breaker(mut self, breaker: CircuitBreaker<E>) -> Self {
        self.pipeline.breaker = Some(breaker);
        self
    }

    /// Limits each attempt to `after`, measured on the pipeline's clock.
    ///
    /// Taken as it is, as [`Timeout::new`] takes it: a zero limit fails every attempt that
    /// waits at all with [`Elapsed`](crate::Elapsed). [`Pipeline::from_config`] checks the
    /// configured timeout and refuses zero.
    pub fn timeout(mut self, after: Duration) -> Self {
        self.timeout = Some(after);
        self
    }

    /// Hedges slow attempts.
    pub fn hedge(mut self, hedge: Hedge) -> Self {
        self.pipeline.hedge = Some(hedge);
        self
    }

    /// The clock of the timeout. Default: the system clock.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The `pipeline` label of the strategies' metrics and the `name` of the pipeline's spans.
    /// Default `"default"`.
    ///
    /// Set, it replaces the name the [`Retry`] and [`Hedge`] were built with: the pipeline's
    /// copies share their settings and budget and count under this label. Unset, they keep
    /// their own.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The pipeline.
    pub fn build(mut self) -> Pipeline<E> {
        if let Some(name) = self.name {
            self.pipeline.retry = self.pipeline.retry.map(|retry| retry.labelled(&name));
            self.pipeline.hedge = self.pipeline.hedge.map(|hedge| hedge.labelled(&name));
            self.pipeline.name = name;
        }
        self.pipeline.timeout = self
            .timeout
            .map(|after| Timeout::named(after, self.clock, &self.pipeline.name));
        self.pipeline
    }
}
