use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll};

use tower_service::Service;

use super::future::ResponseFuture;
use crate::{CircuitBreaker, Error, Pipeline};

/// A service guarded by a [`CircuitBreaker`]; built by
/// [`CircuitBreakerLayer`](super::CircuitBreakerLayer).
pub struct CircuitBreakerService<S, E> {
    inner: S,
    breaker: CircuitBreaker<E>,
}

impl<S, E> CircuitBreakerService<S, E> {
    /// Guards `inner` with `breaker`.
    pub fn new(inner: S, breaker: CircuitBreaker<E>) -> Self {
        Self { inner, breaker }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone, E> Clone for CircuitBreakerService<S, E> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone(), self.breaker.clone())
    }
}

impl<S: fmt::Debug, E> fmt::Debug for CircuitBreakerService<S, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerService")
            .field("inner", &self.inner)
            .field("breaker", &self.breaker)
            .finish()
    }
}

impl<S, Req> Service<Req> for CircuitBreakerService<S, S::Error>
where
    S: Service<Req>,
{
    type Response = S::Response;
    type Error = Error<S::Error>;
    type Future = ResponseFuture<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Error::Inner)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        match self.breaker.shared().acquire() {
            Ok(ticket) => {
                ResponseFuture::admitted(self.inner.call(request), self.breaker.clone(), ticket)
            }
            Err(open) => ResponseFuture::rejected(open),
        }
    }
}

/// A service whose requests run through a [`Pipeline`]; built by
/// [`PipelineLayer`](super::PipelineLayer).
pub struct PipelineService<S, E> {
    inner: S,
    pipeline: Pipeline<E>,
}

impl<S, E> PipelineService<S, E> {
    /// Runs requests to `inner` through `pipeline`.
    pub fn new(inner: S, pipeline: Pipeline<E>) -> Self {
        Self { inner, pipeline }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone, E> Clone for PipelineService<S, E> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone(), self.pipeline.clone())
    }
}

impl<S: fmt::Debug, E> fmt::Debug for PipelineService<S, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PipelineService")
            .field("inner", &self.inner)
            .field("pipeline", &self.pipeline)
            .finish()
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, Req> Service<Req> for PipelineService<S, S::Error>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    Req: Clone + Send + 'static,
{
    type Response = S::Response;
    type Error = Error<S::Error>;
    type Future = BoxFuture<Result<S::Response, Self::Error>>;

    /// Always ready: each attempt waits for the readiness of its own clone of the service.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let pipeline = self.pipeline.clone();
        let service = self.inner.clone();
        Box::pin(async move {
            pipeline
                .call(move || {
                    let mut service = service.clone();
                    let request = request.clone();
                    async move {
                        poll_fn(|cx| service.poll_ready(cx)).await?;
                        service.call(request).await
                    }
                })
                .await
        })
    }
}
