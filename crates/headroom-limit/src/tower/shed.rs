//! The load shedder as tower middleware.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::{BoxError, Prioritize};
use crate::{LoadShedder, Overloaded};

/// Wraps services in a [`LoadShedService`] sharing one [`LoadShedder`].
///
/// Put it outside a [`BulkheadLayer`](super::BulkheadLayer) of the same bulkhead: the
/// shedder refuses the less important requests first, the bulkhead bounds the rest, and
/// refuses (and counts) them as the priority the shedder gave them. The priority reaches the
/// bulkhead layer when its `call` runs within this one's, as in a plain stack; a layer between
/// them that calls later (a buffer) leaves the bulkhead's refusals at the default priority.
///
/// ```
/// use headroom_limit::tower::{BulkheadLayer, LoadShedLayer};
/// use headroom_limit::{Bulkhead, LoadShedder, Priority};
/// use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let bulkhead = Bulkhead::builder("api").max_concurrent(64).build()?;
/// let shedder = LoadShedder::builder(bulkhead.clone()).build()?;
/// let mut service = ServiceBuilder::new()
///     .layer(LoadShedLayer::new(shedder, |path: &&'static str| {
///         if path.starts_with("/batch") { Priority::Sheddable } else { Priority::Critical }
///     }))
///     .layer(BulkheadLayer::new(bulkhead))
///     .service(service_fn(|path: &'static str| async move { Ok::<_, std::io::Error>(path.len()) }));
/// assert_eq!(service.ready().await?.call("/checkout").await?, 9);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct LoadShedLayer<P> {
    shedder: LoadShedder,
    prioritize: P,
}

impl<P> LoadShedLayer<P> {
    /// A layer refusing requests through `shedder`, classifying them with `prioritize`.
    pub fn new(shedder: LoadShedder, prioritize: P) -> Self {
        Self {
            shedder,
            prioritize,
        }
    }
}

impl<S, P: Clone> Layer<S> for LoadShedLayer<P> {
    type Service = LoadShedService<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        LoadShedService {
            inner,
            shedder: self.shedder.clone(),
            prioritize: self.prioritize.clone(),
        }
    }
}

/// Refuses requests whose priority the [`LoadShedder`] sheds, and passes the others on.
///
/// `poll_ready` is the inner service's: unlike tower's `LoadShed`, a service that is not
/// ready applies backpressure instead of turning into refusals. The decision is made in
/// `call`, from the load at that moment.
#[derive(Clone, Debug)]
pub struct LoadShedService<S, P> {
    inner: S,
    shedder: LoadShedder,
    prioritize: P,
}

impl<S, P, Req> Service<Req> for LoadShedService<S, P>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    P: Prioritize<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = LoadShedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let priority = self.prioritize.priority(&request);
        match self.shedder.check(priority) {
            Ok(()) => LoadShedFuture {
                state: State::Called {
                    future: super::calling_with(priority, || self.inner.call(request)),
                },
            },
            Err(error) => LoadShedFuture {
                state: State::Shed { error: Some(error) },
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`LoadShedService`].
    pub struct LoadShedFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called { #[pin] future: F },
        Shed { error: Option<Overloaded> },
    }
}

impl<F, T, E> Future for LoadShedFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called { future } => future.poll(cx).map_err(Into::into),
            StateProj::Shed { error } => Poll::Ready(Err(error.take().map_or_else(
                || "load shed future polled after completion".into(),
                BoxError::from,
            ))),
        }
    }
}
