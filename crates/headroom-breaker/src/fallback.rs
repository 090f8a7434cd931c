//! Fallbacks: a value to answer with when the protected call gives up.

use std::fmt;
use std::future::Future;

use headroom_core::metrics::Counter;

use crate::error::Error;

type Produce<T, E> = Box<dyn Fn(&Error<E>) -> T + Send + Sync>;
type Applies<E> = Box<dyn Fn(&Error<E>) -> bool + Send + Sync>;

/// What to answer with when a call fails for good: the circuit is open, the attempts or the
/// retry budget are spent, or the last attempt failed.
///
/// By default every error is replaced; [`when`](Self::when) narrows that down.
///
/// ```
/// use headroom_breaker::{CircuitBreaker, Error, ErrorKind, Fallback};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let breaker = CircuitBreaker::<std::io::Error>::builder().build()?;
/// breaker.isolate();
/// let fallback = Fallback::value(vec![0])
///     .when(|error: &Error<std::io::Error>| error.kind() == ErrorKind::CircuitOpen);
/// let answer = fallback.call(breaker.call(async { Ok(vec![1, 2, 3]) })).await?;
/// assert_eq!(answer, vec![0]);
/// # Ok(())
/// # }
/// ```
pub struct Fallback<T, E> {
    produce: Produce<T, E>,
    applies: Applies<E>,
    used: Counter,
}

impl<T, E> fmt::Debug for Fallback<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fallback").finish_non_exhaustive()
    }
}

impl<T, E> Fallback<T, E> {
    /// Answers with a clone of `value`.
    pub fn value(value: T) -> Self
    where
        T: Clone + Send + Sync + 'static,
    {
        Self::with(move |_| value.clone())
    }

    /// Answers with what `produce` makes from the error.
    pub fn with(produce: impl Fn(&Error<E>) -> T + Send + Sync + 'static) -> Self {
        Self {
            produce: Box::new(produce),
            applies: Box::new(|_| true),
            used: headroom_core::counter!("headroom_breaker_fallbacks_total"),
        }
    }

    /// Falls back only on the errors for which `applies` returns `true`.
    #[must_use]
    pub fn when(mut self, applies: impl Fn(&Error<E>) -> bool + Send + Sync + 'static) -> Self {
        self.applies = Box::new(applies);
        self
    }

    /// Awaits `fut` (usually a [`Pipeline::call`](crate::Pipeline::call)) and falls back on
    /// its error.
    pub async fn call<F>(&self, fut: F) -> Result<T, Error<E>>
    where
        F: Future<Output = Result<T, Error<E>>>,
    {
        self.recover(fut.await)
    }

    /// Replaces `result`'s error with the fallback answer when it applies.
    pub(crate) fn recover(&self, result: Result<T, Error<E>>) -> Result<T, Error<E>> {
        match result {
            Err(error) if (self.applies)(&error) => {
                self.used.increment(1);
                tracing::debug!(kind = ?error.kind(), "falling back");
                Ok((self.produce)(&error))
            }
            other => other,
        }
    }
}
