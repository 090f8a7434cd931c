//! An injection point for calls returning `Result<T, E>`: the strategies that need the
//! caller's types (the fault's error, the substituted response, the hook) around any future, a
//! pipeline's operation or a tower service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use crate::experiment::BoxFuture;
use crate::{Experiment, Injection, Strategies};

type Make<V> = Arc<dyn Fn() -> V + Send + Sync>;

/// Injects an [`Experiment`]'s strategies into calls returning `Result<T, E>`.
///
/// Latency and abort apply to every call; fault, outcome and behavior only once their hook is
/// given ([`Chaos::fault`], [`Chaos::outcome`], [`Chaos::behavior`]). Wrap a future with
/// [`Chaos::call`], a [`Pipeline`](https://docs.rs/headroom-breaker)'s operation with
/// [`Chaos::wrap`] (the pipeline's retry, breaker and timeout then see the injected faults, as
/// they would real ones), or a tower service with `ChaosLayer` (feature `tower`).
///
/// ```
/// use std::time::Duration;
/// use headroom_chaos::{Chaos, Experiment, ExperimentConfig};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let experiment = Experiment::builder("inventory-down").seed(7).build()?;
/// let inventory = Chaos::<u32, String>::new(experiment.clone())
///     .fault(|| "inventory unavailable (injected)".to_owned());
///
/// assert_eq!(inventory.call(async { Ok(12) }).await, Ok(12)); // off: the real call
/// experiment.start(ExperimentConfig::new(Duration::from_secs(60)).fault(1.0))?;
/// assert!(inventory.call(async { Ok(12) }).await.is_err());
/// # Ok(()) }
/// ```
pub struct Chaos<T, E> {
    experiment: Experiment,
    strategies: Strategies,
    fault: Option<Make<E>>,
    outcome: Option<Make<T>>,
    behavior: Option<Make<BoxFuture<()>>>,
}

impl<T, E> Chaos<T, E> {
    /// Injects `experiment`'s latency and abort; add hooks for the other strategies.
    pub fn new(experiment: Experiment) -> Self {
        Self {
            experiment,
            strategies: Strategies::LATENCY.with(Strategies::ABORT),
            fault: None,
            outcome: None,
            behavior: None,
        }
    }

    /// The error an injected fault returns.
    #[must_use]
    pub fn fault(mut self, make: impl Fn() -> E + Send + Sync + 'static) -> Self {
        self.fault = Some(Arc::new(make));
        self.strategies = self.strategies.with(Strategies::FAULT);
        self
    }

    /// The response an injected outcome returns, e.g. a 503.
    #[must_use]
    pub fn outcome(mut self, make: impl Fn() -> T + Send + Sync + 'static) -> Self {
        self.outcome = Some(Arc::new(make));
        self.strategies = self.strategies.with(Strategies::OUTCOME);
        self
    }

    /// A hook awaited before an affected call, e.g. one that drops a pooled connection.
    #[must_use]
    pub fn behavior<F>(mut self, hook: impl Fn() -> F + Send + Sync + 'static) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.behavior = Some(Arc::new(move || Box::pin(hook()) as BoxFuture<()>));
        self.strategies = self.strategies.with(Strategies::BEHAVIOR);
        self
    }

    /// The experiment injected.
    pub fn experiment(&self) -> &Experiment {
        &self.experiment
    }

    /// Runs `call` with what the experiment draws for it. Off, the future is `call` itself
    /// behind one relaxed load, with no allocation.
    #[inline]
    pub fn call<F>(&self, call: F) -> ChaosFuture<F, T, E>
    where
        F: Future<Output = Result<T, E>>,
    {
        match self.experiment.draw(self.strategies) {
            None => ChaosFuture::passthrough(call),
            Some(injection) => {
                let (prelude, answer) = self.prelude(injection);
                ChaosFuture::injected(prelude, answer, Built(call))
            }
        }
    }

    /// [`Chaos::call`], building the call only when it runs: not for an injected fault or
    /// outcome (unless the run ends before it is answered).
    #[inline]
    pub fn call_with<F, M>(&self, make: M) -> ChaosFuture<F, T, E, Later<M>>
    where
        F: Future<Output = Result<T, E>>,
        M: FnOnce() -> F,
    {
        match self.experiment.draw(self.strategies) {
            None => ChaosFuture::passthrough(make()),
            Some(injection) => {
                let (prelude, answer) = self.prelude(injection);
                ChaosFuture::injected(prelude, answer, Later(make))
            }
        }
    }

    /// What an injected call runs before its real call (the hook, then the delay or hold),
    /// answering whether the drawn answer still replaces the call, and that answer, if any.
    #[cold]
    #[inline(never)]
    pub(crate) fn prelude(&self, injection: Injection) -> (BoxFuture<bool>, Option<Result<T, E>>) {
        let hook = injection
            .behavior()
            .then(|| self.behavior.as_ref().map(|hook| hook()))
            .flatten();
        let answer = if injection.fault().is_some() {
            self.fault.as_ref().map(|make| Err(make()))
        } else if injection.outcome() {
            self.outcome.as_ref().map(|make| Ok(make()))
        } else {
            None
        };
        let prelude: BoxFuture<bool> = Box::pin(async move {
            if let Some(hook) = hook {
                hook.await;
            }
            injection.wait().await;
            injection.answers()
        });
        (prelude, answer)
    }

    /// The strategies this point applies.
    #[cfg(feature = "tower")]
    pub(crate) fn strategies(&self) -> Strategies {
        self.strategies
    }

    /// `operation` with every call it makes going through [`Chaos::call_with`]: give the
    /// result to a pipeline, whose timeout ends held calls and whose breaker and retry see the
    /// faults. Each call builds its operation (from a clone of `operation`) only when it runs.
    pub fn wrap<F, Fut>(
        &self,
        operation: F,
    ) -> impl FnMut() -> ChaosFuture<Fut, T, E, Later<F>> + use<F, Fut, T, E>
    where
        F: FnOnce() -> Fut + Clone,
        Fut: Future<Output = Result<T, E>>,
    {
        let chaos = self.clone();
        move || chaos.call_with(operation.clone())
    }
}

impl<T, E> Clone for Chaos<T, E> {
    fn clone(&self) -> Self {
        Self {
            experiment: self.experiment.clone(),
            strategies: self.strategies,
            fault: self.fault.clone(),
            outcome: self.outcome.clone(),
            behavior: self.behavior.clone(),
        }
    }
}

impl<T, E> fmt::Debug for Chaos<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chaos")
            .field("experiment", &self.experiment)
            .field("strategies", &self.strategies)
            .finish_non_exhaustive()
    }
}

/// A real call not made yet: it is made once the injected prelude is over.
pub trait Deferred {
    /// The call's future.
    type Future;

    /// Makes the call.
    fn start(self) -> Self::Future;
}

/// A call already built (a future does nothing until polled).
#[derive(Debug)]
pub struct Built<F>(F);

impl<F> Deferred for Built<F> {
    type Future = F;

    fn start(self) -> F {
        self.0
    }
}

/// A call built when it is made, by the closure given to [`Chaos::call_with`].
#[derive(Debug)]
pub struct Later<M>(M);

impl<M: FnOnce() -> F, F> Deferred for Later<M> {
    type Future = F;

    fn start(self) -> F {
        (self.0)()
    }
}

pin_project_lite::pin_project! {
    /// The future of a call through [`Chaos`] or `ChaosLayer`: the call itself when nothing is
    /// injected; otherwise the injected prelude (hook, delay, hold), then the injected answer
    /// or the call, made only then.
    pub struct ChaosFuture<F, T, E, C = Built<F>> {
        #[pin]
        state: State<F, T, E, C>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProjection]
    enum State<F, T, E, C> {
        Passthrough {
            #[pin]
            inner: F,
        },
        // Boxed so that the passthrough future stays the size of the call's own.
        Injected {
            call: Pin<Box<InjectedCall<F, T, E, C>>>,
        },
    }
}

pin_project_lite::pin_project! {
    struct InjectedCall<F, T, E, C> {
        prelude: Option<BoxFuture<bool>>,
        answer: Option<Result<T, E>>,
        deferred: Option<C>,
        #[pin]
        inner: Option<F>,
    }
}

impl<F, T, E, C> ChaosFuture<F, T, E, C> {
    #[inline]
    pub(crate) fn passthrough(inner: F) -> Self {
        Self {
            state: State::Passthrough { inner },
        }
    }

    pub(crate) fn injected(
        prelude: BoxFuture<bool>,
        answer: Option<Result<T, E>>,
        deferred: C,
    ) -> Self {
        Self {
            state: State::Injected {
                call: Box::pin(InjectedCall {
                    prelude: Some(prelude),
                    answer,
                    deferred: Some(deferred),
                    inner: None,
                }),
            },
        }
    }
}

impl<F, T, E, C> Future for ChaosFuture<F, T, E, C>
where
    F: Future<Output = Result<T, E>>,
    C: Deferred<Future = F>,
{
    type Output = Result<T, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProjection::Passthrough { inner } => inner.poll(cx),
            StateProjection::Injected { call } => call.as_mut().poll(cx),
        }
    }
}

impl<F, T, E, C> Future for InjectedCall<F, T, E, C>
where
    F: Future<Output = Result<T, E>>,
    C: Deferred<Future = F>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(prelude) = this.prelude.as_mut() {
            let answers = ready!(prelude.as_mut().poll(cx));
            *this.prelude = None;
            if !answers {
                // Released by the run's end: the call is made as without the experiment.
                *this.answer = None;
            }
        }
        if let Some(answer) = this.answer.take() {
            return Poll::Ready(answer);
        }
        if let Some(deferred) = this.deferred.take() {
            this.inner.set(Some(deferred.start()));
        }
        match this.inner.as_mut().as_pin_mut() {
            Some(inner) => inner.poll(cx),
            None => panic!("ChaosFuture polled after completion"),
        }
    }
}

impl<F, T, E, C> fmt::Debug for ChaosFuture<F, T, E, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChaosFuture")
            .field("injected", &matches!(self.state, State::Injected { .. }))
            .finish_non_exhaustive()
    }
}
