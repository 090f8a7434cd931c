//! A tower layer that injects into a service's calls, for the requests a predicate picks.

use std::fmt;
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use crate::inject::Deferred;
use crate::{Chaos, ChaosFuture};

/// Injects a [`Chaos`] point's strategies into the calls of the wrapped service whose request
/// the predicate picks (all of them by default): a route, a tenant, a header.
///
/// The hook, the delay and the hold run before the inner service is called: a held request is
/// never sent. An injected fault or outcome answers without calling the inner service. The
/// inner service must be `Clone` (the one made ready travels with the delayed request). For axum, whose services never
/// fail, inject outcomes (a 503 response) rather than faults.
///
/// ```
/// use std::time::Duration;
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
/// use headroom_chaos::{Chaos, ChaosLayer, Experiment, ExperimentConfig};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let experiment = Experiment::builder("checkout-errors").build()?;
/// let chaos = Chaos::new(experiment.clone()).outcome(|| "503 (injected)");
/// let service = ServiceBuilder::new()
///     .layer(ChaosLayer::new(chaos).when(|path: &&str| path.starts_with("/checkout")))
///     .service(service_fn(|_path: &str| async { Ok::<_, std::convert::Infallible>("200") }));
///
/// experiment.start(ExperimentConfig::new(Duration::from_secs(60)).outcome(1.0))?;
/// assert_eq!(service.clone().oneshot("/checkout/1").await?, "503 (injected)");
/// assert_eq!(service.oneshot("/catalog").await?, "200");
/// # Ok(()) }
/// ```
pub struct ChaosLayer<T, E, P = Everything> {
    chaos: Chaos<T, E>,
    when: P,
}

/// The default predicate: every request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Everything;

/// Picks the requests an experiment may touch.
pub trait Pick<Request> {
    /// Whether `request` may be injected into.
    fn picks(&self, request: &Request) -> bool;
}

impl<Request> Pick<Request> for Everything {
    #[inline]
    fn picks(&self, _: &Request) -> bool {
        true
    }
}

impl<Request, F: Fn(&Request) -> bool> Pick<Request> for F {
    #[inline]
    fn picks(&self, request: &Request) -> bool {
        self(request)
    }
}

impl<T, E> ChaosLayer<T, E> {
    /// Injects into every request.
    pub fn new(chaos: Chaos<T, E>) -> Self {
        Self {
            chaos,
            when: Everything,
        }
    }
}

impl<T, E, P> ChaosLayer<T, E, P> {
    /// Injects only into the requests `when` picks; the others are not seen by the experiment
    /// (they count neither in its rates nor in its blast radius).
    pub fn when<Q>(self, when: Q) -> ChaosLayer<T, E, Q> {
        ChaosLayer {
            chaos: self.chaos,
            when,
        }
    }
}

impl<T, E, P: Clone> Clone for ChaosLayer<T, E, P> {
    fn clone(&self) -> Self {
        Self {
            chaos: self.chaos.clone(),
            when: self.when.clone(),
        }
    }
}

impl<T, E, P> fmt::Debug for ChaosLayer<T, E, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChaosLayer")
            .field("chaos", &self.chaos)
            .finish_non_exhaustive()
    }
}

impl<S, T, E, P: Clone> Layer<S> for ChaosLayer<T, E, P> {
    type Service = ChaosService<S, T, E, P>;

    fn layer(&self, inner: S) -> Self::Service {
        ChaosService {
            inner,
            chaos: self.chaos.clone(),
            when: self.when.clone(),
        }
    }
}

/// The service [`ChaosLayer`] builds.
pub struct ChaosService<S, T, E, P = Everything> {
    inner: S,
    chaos: Chaos<T, E>,
    when: P,
}

impl<S: Clone, T, E, P: Clone> Clone for ChaosService<S, T, E, P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            chaos: self.chaos.clone(),
            when: self.when.clone(),
        }
    }
}

impl<S: fmt::Debug, T, E, P> fmt::Debug for ChaosService<S, T, E, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChaosService")
            .field("inner", &self.inner)
            .field("chaos", &self.chaos)
            .finish_non_exhaustive()
    }
}

impl<S, P, Request> Service<Request> for ChaosService<S, S::Response, S::Error, P>
where
    S: Service<Request> + Clone,
    P: Pick<Request>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ChaosFuture<S::Future, S::Response, S::Error, ServiceCall<S, Request>>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: Request) -> Self::Future {
        if !self.chaos.experiment().is_on() || !self.when.picks(&request) {
            return ChaosFuture::passthrough(self.inner.call(request));
        }
        match self.chaos.experiment().draw(self.chaos.strategies()) {
            None => ChaosFuture::passthrough(self.inner.call(request)),
            Some(injection) => {
                let (prelude, answer) = self.chaos.prelude(injection);
                // The service made ready goes with the call, made once the injection is over;
                // a clone takes its place here (tower's usual pattern).
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                ChaosFuture::injected(prelude, answer, ServiceCall(ready, request))
            }
        }
    }
}

/// A request for a service made ready, sent once the injected delay or hold is over.
pub struct ServiceCall<S, Request>(S, Request);

impl<S: Service<Request>, Request> Deferred for ServiceCall<S, Request> {
    type Future = S::Future;

    fn start(self) -> S::Future {
        let Self(mut service, request) = self;
        service.call(request)
    }
}

impl<S, Request> fmt::Debug for ServiceCall<S, Request> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceCall").finish_non_exhaustive()
    }
}
