use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll};

use tower_service::Service;

use super::future::ResponseFuture;
use crate::{CircuitBreaker, CircuitOpen, Error, Pipeline};

/// A service guarded by a [`CircuitBreaker`]; built by
/// [`CircuitBreakerLayer`](super::CircuitBreakerLayer).
///
/// While the circuit refuses calls, `poll_ready` answers ready at once without asking the
/// inner service, and the next `call` fails with [`CircuitOpen`](crate::CircuitOpen): callers
/// of a tripped breaker never wait on the backpressure of what it guards (a concurrency limit,
/// a buffer). A caller already waiting on the inner service when the circuit opens is refused
/// when that wait ends.
pub struct CircuitBreakerService<S, E> {
    inner: S,
    breaker: CircuitBreaker<E>,
    /// The refusal `poll_ready` saw; the next `call` returns it.
    refused: Option<CircuitOpen>,
}

impl<S, E> CircuitBreakerService<S, E> {
    /// Guards `inner` with `breaker`.
    pub fn new(inner: S, breaker: CircuitBreaker<E>) -> Self {
        Self {
            inner,
            breaker,
            refused: None,
        }
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
        self.refused = self.breaker.shared().refusal();
        if self.refused.is_some() {
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_ready(cx).map_err(Error::Inner)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        if let Some(open) = self.refused.take() {
            self.breaker.shared().count_rejection();
            return ResponseFuture::rejected(open);
        }
        // The inner service is ready; a circuit that opened since is still honoured here.
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
