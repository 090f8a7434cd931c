use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll};

use tower_service::Service;

use std::sync::Arc;

use super::future::{Admission, FallbackFuture, ResponseFuture};
use crate::{CircuitBreaker, CircuitOpen, Error, Fallback, Hedge, Pipeline, Retry, Timeout};

/// A service guarded by a [`CircuitBreaker`]; built by
/// [`CircuitBreakerLayer`](super::CircuitBreakerLayer).
///
/// While the circuit refuses calls, `poll_ready` answers ready at once without asking the
/// inner service, and the next `call` fails with [`CircuitOpen`](crate::CircuitOpen): callers
/// of a tripped breaker never wait on the backpressure of what it guards (a concurrency limit,
/// a buffer). Past its open duration the circuit goes on refusing callers the inner service is
/// not ready for, until one it is ready for makes the probe: calls admitted before the circuit
/// opened may hold its capacity for good. A half-open phase whose probes have outlived
/// `half_open_max_wait` is reopened by `poll_ready` itself, since stuck probes may hold the
/// very capacity it would wait on. A caller already waiting on the inner service when the
/// circuit opens is refused when that wait ends.
pub struct CircuitBreakerService<S, E> {
    inner: S,
    breaker: CircuitBreaker<E>,
    /// The refusal `poll_ready` saw; the next `call` returns it.
    refused: Option<CircuitOpen>,
    /// While waiting on the inner service in a half-open phase with probes running: fires
    /// when the phase would count as stalled, so that the wait is looked at again.
    stall_timer: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
}

impl<S, E> CircuitBreakerService<S, E> {
    /// Guards `inner` with `breaker`.
    pub fn new(inner: S, breaker: CircuitBreaker<E>) -> Self {
        Self {
            inner,
            breaker,
            refused: None,
            stall_timer: None,
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
        loop {
            let shared = self.breaker.shared();
            self.refused = shared.refusal();
            if self.refused.is_some() {
                self.stall_timer = None;
                return Poll::Ready(Ok(()));
            }
            if let Poll::Ready(ready) = self.inner.poll_ready(cx) {
                self.stall_timer = None;
                return Poll::Ready(ready.map_err(Error::Inner));
            }
            // Past its open duration the circuit admits a probe at the next call, but nothing
            // guarantees the inner service ever gets ready for it: calls admitted before the
            // circuit opened may hold its capacity for good. Until then it still refuses.
            self.refused = shared.open_refusal();
            if self.refused.is_some() {
                self.stall_timer = None;
                return Poll::Ready(Ok(()));
            }
            // Stuck probes may hold the capacity this waits on: look again when they would
            // count as stalled, or the wait could outlast them for good.
            let Some(left) = shared.until_stalled() else {
                self.stall_timer = None;
                return Poll::Pending;
            };
            let timer = self.stall_timer.get_or_insert_with(|| {
                let clock = shared.clock();
                Box::pin(async move { clock.sleep(left).await })
            });
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.stall_timer = None;
        }
    }

    fn call(&mut self, request: Req) -> Self::Future {
        if let Some(open) = self.refused.take() {
            self.breaker.shared().count_rejection();
            return ResponseFuture::rejected(open);
        }
        // The inner service is ready; a circuit that opened since is still honoured here.
        match self.breaker.shared().acquire() {
            Ok(ticket) => {
                // Taken before the inner call, to be cancelled if that panics.
                let admission = Admission::new(self.breaker.clone(), ticket);
                ResponseFuture::admitted(self.inner.call(request), admission)
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
        // Made when first polled: under a layer further out (a `RetryLayer`), the request is
        // read as recorded in its budget, then marked as recorded in this pipeline's for a
        // `HedgeLayer` below sharing it.
        Box::pin(async move {
            pipeline
                .call_marked(move || attempt(&service, &request))
                .await
        })
    }
}

/// One attempt: a clone of the service, once ready, called with a clone of the request.
fn attempt<S, Req>(
    service: &S,
    request: &Req,
) -> impl Future<Output = Result<S::Response, S::Error>> + use<S, Req>
where
    S: Service<Req> + Clone,
    Req: Clone,
{
    let mut service = service.clone();
    let request = request.clone();
    async move {
        poll_fn(|cx| service.poll_ready(cx)).await?;
        service.call(request).await
    }
}

/// A service whose failed requests are retried by a [`Retry`]; built by
/// [`RetryLayer`](super::RetryLayer).
pub struct RetryService<S, E> {
    inner: S,
    retry: Retry<E>,
}

impl<S, E> RetryService<S, E> {
    /// Retries requests to `inner` with `retry`.
    pub fn new(inner: S, retry: Retry<E>) -> Self {
        Self { inner, retry }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone, E> Clone for RetryService<S, E> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone(), self.retry.clone())
    }
}

impl<S: fmt::Debug, E> fmt::Debug for RetryService<S, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryService")
            .field("inner", &self.inner)
            .field("retry", &self.retry)
            .finish()
    }
}

impl<S, Req> Service<Req> for RetryService<S, S::Error>
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
        let retry = self.retry.clone();
        let service = self.inner.clone();
        Box::pin(async move { retry.call(move || attempt(&service, &request)).await })
    }
}

/// A service whose requests are bounded by a [`Timeout`]; built by
/// [`TimeoutLayer`](super::TimeoutLayer).
#[derive(Clone, Debug)]
pub struct TimeoutService<S> {
    inner: S,
    timeout: Timeout,
}

impl<S> TimeoutService<S> {
    /// Bounds requests to `inner` with `timeout`.
    pub fn new(inner: S, timeout: Timeout) -> Self {
        Self { inner, timeout }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, Req> Service<Req> for TimeoutService<S>
where
    S: Service<Req>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = Error<S::Error>;
    type Future = BoxFuture<Result<S::Response, Self::Error>>;

    /// The inner service's readiness: the limit bounds the response, not the wait to be served.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Error::Inner)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let response = self.inner.call(request);
        let timeout = self.timeout.clone();
        Box::pin(async move {
            match timeout.call(response).await {
                Ok(result) => result.map_err(Error::Inner),
                Err(elapsed) => Err(Error::Elapsed(elapsed)),
            }
        })
    }
}

/// A service whose slow requests are hedged by a [`Hedge`]; built by
/// [`HedgeLayer`](super::HedgeLayer).
///
/// Hedging adds no error of its own: the service's error comes back as it is.
#[derive(Clone, Debug)]
pub struct HedgeService<S> {
    inner: S,
    hedge: Hedge,
}

impl<S> HedgeService<S> {
    /// Hedges requests to `inner` with `hedge`.
    pub fn new(inner: S, hedge: Hedge) -> Self {
        Self { inner, hedge }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, Req> Service<Req> for HedgeService<S>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    Req: Clone + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    /// Always ready: each call waits for the readiness of its own clone of the service.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let hedge = self.hedge.clone();
        let service = self.inner.clone();
        Box::pin(async move { hedge.call(move || attempt(&service, &request)).await })
    }
}

/// A service answering with a [`Fallback`] when the service it wraps fails for good; built by
/// [`FallbackLayer`](super::FallbackLayer).
///
/// The wrapped service fails with [`Error`]: put the fallback outside the other layers of this
/// crate (a retry, a timeout, a breaker, a pipeline), as the pipeline order does.
pub struct FallbackService<S, T, E> {
    inner: S,
    fallback: Arc<Fallback<T, E>>,
}

impl<S, T, E> FallbackService<S, T, E> {
    /// Falls back on the errors of `inner` as `fallback` says.
    pub fn new(inner: S, fallback: Arc<Fallback<T, E>>) -> Self {
        Self { inner, fallback }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone, T, E> Clone for FallbackService<S, T, E> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone(), self.fallback.clone())
    }
}

impl<S: fmt::Debug, T, E> fmt::Debug for FallbackService<S, T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackService")
            .field("inner", &self.inner)
            .field("fallback", &self.fallback)
            .finish()
    }
}

impl<S, Req, T, E> Service<Req> for FallbackService<S, T, E>
where
    S: Service<Req, Response = T, Error = Error<E>>,
{
    type Response = T;
    type Error = Error<E>;
    type Future = FallbackFuture<S::Future, T, E>;

    /// The inner service's readiness; an error there is not the request's and is not replaced.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        FallbackFuture::new(self.inner.call(request), self.fallback.clone())
    }
}
