//! The keyed bulkhead as tower middleware.

use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tower_layer::Layer;
use tower_service::Service;

use super::BoxError;
use crate::{KeyedBulkhead, Overloaded, OwnedKeyedPermit, TenantClass};

/// Tells which tenant a request belongs to, and its class.
///
/// Implemented for every `Fn(&Req) -> K` with `K: Hash`, whose tenants are of the default
/// class. Implement it on a type of your own to put tenants in named classes:
///
/// ```
/// use headroom_limit::tower::Identify;
/// use headroom_limit::{KeyedBulkhead, TenantClass};
///
/// struct ByPlan {
///     enterprise: TenantClass,
/// }
///
/// impl Identify<(String, bool)> for ByPlan {
///     type Tenant = String;
///
///     fn tenant(&self, (customer, _): &(String, bool)) -> String {
///         customer.clone()
///     }
///
///     fn class(&self, &(_, enterprise): &(String, bool)) -> TenantClass {
///         if enterprise { self.enterprise } else { TenantClass::DEFAULT }
///     }
/// }
///
/// # fn main() -> Result<(), headroom_limit::ConfigError> {
/// let bulkhead = KeyedBulkhead::builder("api").class("enterprise", 4).build()?;
/// let by_plan = ByPlan { enterprise: bulkhead.class("enterprise").unwrap() };
/// assert_eq!(by_plan.class(&("acme".to_owned(), true)).weight(), 4);
/// # Ok(()) }
/// ```
pub trait Identify<Req> {
    /// The tenant's name: only its hash is kept.
    type Tenant: Hash;

    /// The tenant `request` belongs to.
    fn tenant(&self, request: &Req) -> Self::Tenant;

    /// The class of that tenant ([`TenantClass::DEFAULT`] unless overridden).
    fn class(&self, request: &Req) -> TenantClass {
        let _ = request;
        TenantClass::DEFAULT
    }
}

impl<Req, F, K> Identify<Req> for F
where
    F: Fn(&Req) -> K,
    K: Hash,
{
    type Tenant = K;

    fn tenant(&self, request: &Req) -> K {
        self(request)
    }
}

/// Wraps services in a [`KeyedBulkheadService`] sharing one [`KeyedBulkhead`], charging each
/// request to the tenant its [`Identify`] names.
///
/// ```
/// use headroom_limit::KeyedBulkhead;
/// use headroom_limit::tower::KeyedBulkheadLayer;
/// use http::Request;
/// use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let bulkhead = KeyedBulkhead::builder("api").max_concurrent(32).build()?;
/// let mut service = ServiceBuilder::new()
///     .layer(KeyedBulkheadLayer::new(bulkhead, |request: &Request<()>| {
///         // Cloning a header value copies no bytes; requests without one share a tenant.
///         request.headers().get("x-tenant").cloned()
///     }))
///     .service(service_fn(|_: Request<()>| async { Ok::<_, std::io::Error>("done") }));
/// let request = Request::builder().header("x-tenant", "acme").body(())?;
/// assert_eq!(service.ready().await?.call(request).await?, "done");
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct KeyedBulkheadLayer<I> {
    bulkhead: KeyedBulkhead,
    identify: I,
}

impl<I> KeyedBulkheadLayer<I> {
    /// A layer admitting requests through `bulkhead`, each for the tenant `identify` names.
    pub fn new(bulkhead: KeyedBulkhead, identify: I) -> Self {
        Self { bulkhead, identify }
    }
}

impl<S, I: Clone> Layer<S> for KeyedBulkheadLayer<I> {
    type Service = KeyedBulkheadService<S, I>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedBulkheadService {
            inner,
            bulkhead: self.bulkhead.clone(),
            identify: self.identify.clone(),
        }
    }
}

/// Runs each request while holding an [`OwnedKeyedPermit`] of a [`KeyedBulkhead`] for the
/// request's tenant.
///
/// As with [`BulkheadService`](super::BulkheadService), the permit is taken in `call` (see
/// the [module docs](super)) and held until the response future completes or is dropped; a
/// request that must wait takes the ready inner service with it and leaves a clone behind
/// (hence `S: Clone`).
#[derive(Clone, Debug)]
pub struct KeyedBulkheadService<S, I> {
    inner: S,
    bulkhead: KeyedBulkhead,
    identify: I,
}

impl<S, I, Req> Service<Req> for KeyedBulkheadService<S, I>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    I: Identify<Req>,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = KeyedBulkheadFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let class = self.identify.class(&request);
        let hash = self.bulkhead.tenant_hash(&self.identify.tenant(&request));
        if let Some(permit) = self.bulkhead.try_admit_owned(hash, class) {
            return KeyedBulkheadFuture::running(self.inner.call(request), permit);
        }
        if self.bulkhead.max_queued() == 0 {
            return KeyedBulkheadFuture::rejected(self.bulkhead.reject_full());
        }
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let bulkhead = self.bulkhead.clone();
        KeyedBulkheadFuture::waiting(Box::pin(async move {
            let permit = bulkhead.acquire_hashed(hash, class).await?.into_owned();
            Ok((permit, ready.call(request)))
        }))
    }
}

type Admission<F> = Pin<Box<dyn Future<Output = Result<(OwnedKeyedPermit, F), Overloaded>> + Send>>;

pin_project_lite::pin_project! {
    /// The response future of [`KeyedBulkheadService`].
    pub struct KeyedBulkheadFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        Waiting { admission: Admission<F> },
        Running { #[pin] future: F, permit: Option<OwnedKeyedPermit> },
        Rejected { error: Option<Overloaded> },
    }
}

impl<F> KeyedBulkheadFuture<F> {
    fn running(future: F, permit: OwnedKeyedPermit) -> Self {
        Self {
            state: State::Running {
                future,
                permit: Some(permit),
            },
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

impl<F, T, E> Future for KeyedBulkheadFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project().state.project() {
                StateProj::Waiting { admission } => match ready!(admission.as_mut().poll(cx)) {
                    Ok((permit, future)) => {
                        self.as_mut().project().state.set(State::Running {
                            future,
                            permit: Some(permit),
                        });
                    }
                    Err(error) => return Poll::Ready(Err(error.into())),
                },
                StateProj::Running { future, permit } => {
                    let result = ready!(future.poll(cx));
                    // Given back as soon as the response is ready, not when the future is.
                    drop(permit.take());
                    return Poll::Ready(result.map_err(Into::into));
                }
                StateProj::Rejected { error } => {
                    let error = error.take().map_or_else(
                        || "keyed bulkhead future polled after completion".into(),
                        BoxError::from,
                    );
                    return Poll::Ready(Err(error));
                }
            }
        }
    }
}
