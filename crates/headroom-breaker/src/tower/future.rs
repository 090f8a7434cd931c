use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;

use std::sync::Arc;

use crate::breaker::{Outcome, Ticket};
use crate::{CircuitBreaker, CircuitOpen, Error, Fallback};

/// A call the breaker admitted. Dropped before [`finish`](Self::finish) ends, it records a
/// cancelled call, as a dropped [`Permit`](crate::Permit) does: also when the inner service's
/// `call` or the breaker's `failure_if` panics, so that a panic never keeps a half-open probe
/// slot.
pub(super) struct Admission<E> {
    breaker: CircuitBreaker<E>,
    ticket: Option<Ticket>,
}

impl<E> Admission<E> {
    pub(super) fn new(breaker: CircuitBreaker<E>, ticket: Ticket) -> Self {
        Self {
            breaker,
            ticket: Some(ticket),
        }
    }

    /// Records how the call ended.
    fn finish<T>(mut self, result: &Result<T, Error<E>>) {
        // The classifier runs while the ticket is still held, to be cancelled if it panics.
        let outcome = self.breaker.outcome(result);
        if let Some(ticket) = self.ticket.take() {
            self.breaker.shared().finish(ticket, outcome);
        }
    }
}

impl<E> Drop for Admission<E> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.breaker.shared().finish(ticket, Outcome::Cancelled);
        }
    }
}

pin_project! {
    /// The response future of [`CircuitBreakerService`](super::CircuitBreakerService).
    ///
    /// Dropping it before it completes records a cancelled call.
    pub struct ResponseFuture<F, E> {
        #[pin]
        inner: Option<F>,
        admission: Option<Admission<E>>,
        open: CircuitOpen,
    }
}

impl<F, E> ResponseFuture<F, E> {
    pub(super) fn admitted(inner: F, admission: Admission<E>) -> Self {
        Self {
            inner: Some(inner),
            admission: Some(admission),
            // Read only by a rejected future.
            open: CircuitOpen {
                state: crate::State::Closed,
                retry_after: None,
            },
        }
    }

    pub(super) fn rejected(open: CircuitOpen) -> Self {
        Self {
            inner: None,
            admission: None,
            open,
        }
    }
}

impl<F, E> fmt::Debug for ResponseFuture<F, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("admitted", &self.inner.is_some())
            .finish()
    }
}

impl<F, T, E> Future for ResponseFuture<F, E>
where
    F: Future<Output = Result<T, E>>,
{
    type Output = Result<T, Error<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(Err(Error::CircuitOpen(*this.open)));
        };
        let result = ready!(inner.poll(cx)).map_err(Error::Inner);
        if let Some(admission) = this.admission.take() {
            admission.finish(&result);
        }
        Poll::Ready(result)
    }
}

pin_project! {
    /// The response future of [`FallbackService`](super::FallbackService).
    pub struct FallbackFuture<F, T, E> {
        #[pin]
        inner: F,
        fallback: Arc<Fallback<T, E>>,
    }
}

impl<F, T, E> FallbackFuture<F, T, E> {
    pub(super) fn new(inner: F, fallback: Arc<Fallback<T, E>>) -> Self {
        Self { inner, fallback }
    }
}

impl<F, T, E> fmt::Debug for FallbackFuture<F, T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackFuture").finish_non_exhaustive()
    }
}

impl<F, T, E> Future for FallbackFuture<F, T, E>
where
    F: Future<Output = Result<T, Error<E>>>,
{
    type Output = Result<T, Error<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        Poll::Ready(this.fallback.recover(result))
    }
}
