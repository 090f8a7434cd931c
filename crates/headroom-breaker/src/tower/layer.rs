use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use super::service::{
    CircuitBreakerService, FallbackService, HedgeService, PipelineService, RetryService,
    TimeoutService,
};
use crate::{CircuitBreaker, Fallback, Hedge, Pipeline, Retry, Timeout};

/// Wraps services in a [`CircuitBreaker`]; every wrapped service shares it.
pub struct CircuitBreakerLayer<E> {
    breaker: CircuitBreaker<E>,
}

impl<E> CircuitBreakerLayer<E> {
    /// A layer guarding services with `breaker`.
    pub fn new(breaker: CircuitBreaker<E>) -> Self {
        Self { breaker }
    }
}

impl<E> Clone for CircuitBreakerLayer<E> {
    fn clone(&self) -> Self {
        Self::new(self.breaker.clone())
    }
}

impl<E> fmt::Debug for CircuitBreakerLayer<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CircuitBreakerLayer")
            .field(&self.breaker)
            .finish()
    }
}

impl<S, E> Layer<S> for CircuitBreakerLayer<E> {
    type Service = CircuitBreakerService<S, E>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService::new(inner, self.breaker.clone())
    }
}

/// Runs requests through a [`Pipeline`]; every wrapped service shares its state.
pub struct PipelineLayer<E> {
    pipeline: Pipeline<E>,
}

impl<E> PipelineLayer<E> {
    /// A layer running requests through `pipeline`.
    pub fn new(pipeline: Pipeline<E>) -> Self {
        Self { pipeline }
    }
}

impl<E> Clone for PipelineLayer<E> {
    fn clone(&self) -> Self {
        Self::new(self.pipeline.clone())
    }
}

impl<E> fmt::Debug for PipelineLayer<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PipelineLayer")
            .field(&self.pipeline)
            .finish()
    }
}

impl<S, E> Layer<S> for PipelineLayer<E> {
    type Service = PipelineService<S, E>;

    fn layer(&self, inner: S) -> Self::Service {
        PipelineService::new(inner, self.pipeline.clone())
    }
}

/// Retries failed requests as a [`Retry`] says; every wrapped service shares its budget.
pub struct RetryLayer<E> {
    retry: Retry<E>,
}

impl<E> RetryLayer<E> {
    /// A layer retrying requests with `retry`.
    pub fn new(retry: Retry<E>) -> Self {
        Self { retry }
    }
}

impl<E> Clone for RetryLayer<E> {
    fn clone(&self) -> Self {
        Self::new(self.retry.clone())
    }
}

impl<E> fmt::Debug for RetryLayer<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RetryLayer").field(&self.retry).finish()
    }
}

impl<S, E> Layer<S> for RetryLayer<E> {
    type Service = RetryService<S, E>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryService::new(inner, self.retry.clone())
    }
}

/// Bounds each request by a [`Timeout`], cancelling the response future when it is reached.
#[derive(Clone, Debug)]
pub struct TimeoutLayer {
    timeout: Timeout,
}

impl TimeoutLayer {
    /// A layer bounding requests with `timeout`.
    pub fn new(timeout: Timeout) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = TimeoutService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TimeoutService::new(inner, self.timeout.clone())
    }
}

/// Hedges slow requests as a [`Hedge`] says; every wrapped service shares its latency
/// histogram and budget.
#[derive(Clone, Debug)]
pub struct HedgeLayer {
    hedge: Hedge,
}

impl HedgeLayer {
    /// A layer hedging requests with `hedge`.
    pub fn new(hedge: Hedge) -> Self {
        Self { hedge }
    }
}

impl<S> Layer<S> for HedgeLayer {
    type Service = HedgeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HedgeService::new(inner, self.hedge.clone())
    }
}

/// Answers with a [`Fallback`] when the wrapped service fails for good.
pub struct FallbackLayer<T, E> {
    fallback: Arc<Fallback<T, E>>,
}

impl<T, E> FallbackLayer<T, E> {
    /// A layer falling back as `fallback` says.
    pub fn new(fallback: Fallback<T, E>) -> Self {
        Self {
            fallback: Arc::new(fallback),
        }
    }
}

impl<T, E> Clone for FallbackLayer<T, E> {
    fn clone(&self) -> Self {
        Self {
            fallback: self.fallback.clone(),
        }
    }
}

impl<T, E> fmt::Debug for FallbackLayer<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("FallbackLayer")
            .field(&self.fallback)
            .finish()
    }
}

impl<S, T, E> Layer<S> for FallbackLayer<T, E> {
    type Service = FallbackService<S, T, E>;

    fn layer(&self, inner: S) -> Self::Service {
        FallbackService::new(inner, self.fallback.clone())
    }
}
