//! A tower layer recording the SLI of every call.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tower_layer::Layer;
use tower_service::Service;

use crate::{Objective, Started};

/// Judges a call's result: does it count as succeeded?
///
/// Implemented by [`SucceedsWhenOk`] and by every `Fn(&Result<R, E>) -> bool`, e.g. for HTTP,
/// `|result: &Result<Response, _>| matches!(result, Ok(response) if !response.status().is_server_error())`.
pub trait ClassifyOutcome<R, E> {
    /// Whether `result` counts as succeeded.
    fn succeeded(&self, result: &Result<R, E>) -> bool;
}

/// The default classifier: a call succeeded when its service returned `Ok`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SucceedsWhenOk;

impl<R, E> ClassifyOutcome<R, E> for SucceedsWhenOk {
    #[inline]
    fn succeeded(&self, result: &Result<R, E>) -> bool {
        result.is_ok()
    }
}

impl<R, E, F: Fn(&Result<R, E>) -> bool> ClassifyOutcome<R, E> for F {
    #[inline]
    fn succeeded(&self, result: &Result<R, E>) -> bool {
        self(result)
    }
}

/// Records every call of the wrapped service into an [`Objective`]: its outcome, and for a
/// latency objective its duration from the call to the response. A call whose future is
/// dropped before it completes (the client gave up, an outer timeout fired) has no outcome: it
/// is recorded only by a latency objective, as bad, once it has taken longer than the
/// threshold ([`Objective::abandon`]). A call whose service panics failed its caller: it is
/// recorded as bad as the panic unwinds.
///
/// Put the layer inside a load shedder or rate limit whose refusals should not count against
/// the objective, outside those whose refusals should.
///
/// ```
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
/// use headroom_slo::{Objective, ObjectiveConfig, SloLayer};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let checkout = Objective::new(ObjectiveConfig::availability("checkout", 0.999))?;
/// let service = ServiceBuilder::new()
///     .layer(SloLayer::new(checkout.clone()))
///     .service(service_fn(|order: u64| async move {
///         if order == 0 { Err("empty order") } else { Ok(order) }
///     }));
/// service.clone().oneshot(7).await?;
/// service.oneshot(0).await.unwrap_err();
/// let status = checkout.evaluate();
/// assert_eq!((status.events, status.bad), (2, 1));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct SloLayer<C = SucceedsWhenOk> {
    objective: Objective,
    classify: C,
}

impl SloLayer {
    /// Records into `objective`, counting `Ok` as succeeded.
    pub fn new(objective: Objective) -> Self {
        Self {
            objective,
            classify: SucceedsWhenOk,
        }
    }
}

impl<C> SloLayer<C> {
    /// Judges results with `classify` instead.
    pub fn classify<D>(self, classify: D) -> SloLayer<D> {
        SloLayer {
            objective: self.objective,
            classify,
        }
    }
}

impl<S, C: Clone> Layer<S> for SloLayer<C> {
    type Service = SloService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        SloService {
            inner,
            objective: self.objective.clone(),
            classify: self.classify.clone(),
        }
    }
}

/// The service [`SloLayer`] builds.
#[derive(Clone, Debug)]
pub struct SloService<S, C = SucceedsWhenOk> {
    inner: S,
    objective: Objective,
    classify: C,
}

impl<S, C, Request> Service<Request> for SloService<S, C>
where
    S: Service<Request>,
    C: ClassifyOutcome<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = SloFuture<S::Future, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: Request) -> Self::Future {
        let started = self.objective.start();
        // Armed around the inner call too: a service that panics in `call` failed its caller,
        // and no future exists yet to record it.
        let calling = Calling(&self.objective, started);
        let inner = self.inner.call(request);
        std::mem::forget(calling);
        SloFuture {
            started,
            inner,
            objective: self.objective.clone(),
            classify: self.classify.clone(),
            finished: false,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`SloService`].
    #[derive(Debug)]
    pub struct SloFuture<F, C> {
        #[pin]
        inner: F,
        objective: Objective,
        classify: C,
        started: Started,
        finished: bool,
    }

    impl<F, C> PinnedDrop for SloFuture<F, C> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !*this.finished {
                this.objective.abandon(*this.started);
            }
        }
    }
}

/// Records the call being made as bad when dropped, which only happens while the service's
/// `call` unwinds (a panic): the normal path forgets it.
struct Calling<'a>(&'a Objective, Started);

impl Drop for Calling<'_> {
    fn drop(&mut self) {
        self.0.finish(self.1, false);
    }
}

/// Records its call as bad when dropped, which only happens while the service's `poll`
/// unwinds (a panic): the normal path forgets it.
struct PanicGuard<'a> {
    objective: &'a Objective,
    started: Started,
    finished: &'a mut bool,
}

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        *self.finished = true;
        self.objective.finish(self.started, false);
    }
}

impl<F, C, R, E> Future for SloFuture<F, C>
where
    F: Future<Output = Result<R, E>>,
    C: ClassifyOutcome<R, E>,
{
    type Output = Result<R, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let panicking = PanicGuard {
            objective: this.objective,
            started: *this.started,
            finished: this.finished,
        };
        let polled = this.inner.poll(cx);
        std::mem::forget(panicking);
        let result = ready!(polled);
        *this.finished = true;
        this.objective
            .finish(*this.started, this.classify.succeeded(&result));
        Poll::Ready(result)
    }
}
