use std::fmt;

use tower_layer::Layer;

use super::service::{CircuitBreakerService, PipelineService};
use crate::{CircuitBreaker, Pipeline};

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
