//! The bulkhead as tower middleware.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tower_layer::Layer;
use tower_service::Service;

use super::BoxError;
use crate::adaptive::Outcome;
use crate::{Bulkhead, Overloaded, OwnedPermit};

/// Wraps services in a [`BulkheadService`] sharing one [`Bulkhead`].
///
/// ```
/// use headroom_limit::Bulkhead;
/// use headroom_limit::tower::BulkheadLayer;
/// use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let bulkhead = Bulkhead::builder("inventory").max_concurrent(32).build()?;
/// let mut service = ServiceBuilder::new()
///     .layer(BulkheadLayer::new(bulkhead))
///     .service(service_fn(|n: u32| async move { Ok::<_, std::io::Error>(n * 2) }));
/// assert_eq!(service.ready().await?.call(21).await?, 42);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct BulkheadLayer {
    bulkhead: Bulkhead,
}

impl BulkheadLayer {
    /// A layer admitting requests through `bulkhead`.
    pub fn new(bulkhead: Bulkhead) -> Self {
        Self { bulkhead }
    }
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = BulkheadService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BulkheadService {
            inner,
            bulkhead: self.bulkhead.clone(),
        }
    }
}

/// Runs each request while holding an [`OwnedPermit`] of a [`Bulkhead`].
///
/// The permit is taken in `call` (see the [module docs](super)) and held until the response
/// future completes or is dropped. A request that must wait for a permit takes the ready inner
/// service with it (leaving a clone behind, hence `S: Clone`) and calls it once admitted.
/// A refusal carries the priority a [`LoadShedLayer`](super::LoadShedLayer) above gave the
/// request, or [`Priority::Default`](crate::Priority::Default) without one.
///
/// With an adaptive limit, an `Ok` response reports [`Outcome::Success`]; an `Err`, and a
/// request whose future is dropped while it runs (its caller timed out or went away), report
/// [`Outcome::Dropped`]; a request whose service panics reports [`Outcome::Ignored`].
#[derive(Clone, Debug)]
pub struct BulkheadService<S> {
    inner: S,
    bulkhead: Bulkhead,
}

impl<S, Req> Service<Req> for BulkheadService<S>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BulkheadFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    // Inline, as tower's own services are: the admitted path is a few instructions, and
    // without the hint whether it inlines depends on how the caller's crate is partitioned.
    #[inline]
    fn call(&mut self, request: Req) -> Self::Future {
        if let Some(permit) = self.bulkhead.try_admit_owned() {
            return BulkheadFuture::running(self.inner.call(request), permit);
        }
        // Refused or queued as the priority a load shedder above gave the request.
        let priority = super::calling_priority();
        if self.bulkhead.max_queued() == 0 {
            return BulkheadFuture::rejected(self.bulkhead.reject_full(priority));
        }
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let bulkhead = self.bulkhead.clone();
        BulkheadFuture::waiting(Box::pin(async move {
            let permit = bulkhead.acquire_as(priority).await?.into_owned();
            Ok((permit, ready.call(request)))
        }))
    }
}

type Admission<F> = Pin<Box<dyn Future<Output = Result<(OwnedPermit, F), Overloaded>> + Send>>;

pin_project_lite::pin_project! {
    /// The response future of [`BulkheadService`].
    pub struct BulkheadFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        Waiting { admission: Admission<F> },
        Running { #[pin] future: F, permit: Option<OwnedPermit> },
        Rejected { error: Option<Overloaded> },
    }
}

impl<F> BulkheadFuture<F> {
    fn running(future: F, permit: OwnedPermit) -> Self {
        Self {
            state: State::running(future, permit),
        }
    }

    fn waiting(admission: Admission<F>) -> Self {
        Self {
            state: State::Waiting { admission },
        }
    }

    fn rejected(error: Overloaded) -> Self {
        Self {
            state: State::Rejected { error: Some(error) },
        }
    }
}

impl<F> State<F> {
    /// A request that held a permit and never finished was cancelled, most often by its
    /// caller's timeout: it counts as a drop until its response says otherwise.
    fn running(future: F, mut permit: OwnedPermit) -> Self {
        permit.set_outcome(Outcome::Dropped);
        State::Running {
            future,
            permit: Some(permit),
        }
    }
}

fn set_outcome(permit: &mut Option<OwnedPermit>, outcome: Outcome) {
    if let Some(permit) = permit {
        permit.set_outcome(outcome);
    }
}

impl<F, T, E> Future for BulkheadFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project().state.project() {
                StateProj::Waiting { admission } => match ready!(admission.as_mut().poll(cx)) {
                    Ok((permit, future)) => {
                        self.as_mut()
                            .project()
                            .state
                            .set(State::running(future, permit));
                    }
                    Err(error) => return Poll::Ready(Err(error.into())),
                },
                StateProj::Running { future, permit } => {
                    // Ignored while the service polls: a panic leaves it so, whoever catches
                    // the panic and drops the permit later; a cancellation between polls
                    // leaves Dropped.
                    set_outcome(permit, Outcome::Ignored);
                    let Poll::Ready(result) = future.poll(cx) else {
                        set_outcome(permit, Outcome::Dropped);
                        return Poll::Pending;
                    };
                    if let Some(mut permit) = permit.take() {
                        let outcome = match &result {
                            Ok(_) => Outcome::Success,
                            Err(_) => Outcome::Dropped,
                        };
                        permit.set_outcome(outcome);
                    }
                    return Poll::Ready(result.map_err(Into::into));
                }
                StateProj::Rejected { error } => {
                    let error = error.take().map_or_else(
                        || "bulkhead future polled after completion".into(),
                        BoxError::from,
                    );
                    return Poll::Ready(Err(error));
                }
            }
        }
    }
}
