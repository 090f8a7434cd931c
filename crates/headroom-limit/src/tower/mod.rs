//! tower middleware for the bulkheads, the work queue, the load shedder and HTTP rate limits
//! (feature `tower`).
//!
//! | layer | service | readiness | refusal |
//! |---|---|---|---|
//! | [`BulkheadLayer`] | [`BulkheadService`] | the inner service's | in `call`: [`Overloaded`] from the bulkhead |
//! | [`KeyedBulkheadLayer`] | [`KeyedBulkheadService`] | the inner service's | in `call`: [`Overloaded`] from the keyed bulkhead |
//! | [`QueueLayer`] | [`QueueService`] | always ready | in `call`: [`Overloaded`] from the queue |
//! | [`LoadShedLayer`] | [`LoadShedService`] | the inner service's | in `call`: [`Overloaded`] from the shedder |
//! | [`RateLimitLayer`] (HTTP) | [`RateLimitService`] | the inner service's | in `call`: a `429` response with `Retry-After` and the `RateLimit` headers |
//!
//! # Where permits are taken
//!
//! tower's `ConcurrencyLimit` takes its permit in `poll_ready`, so a connection that polled
//! ready and then sits idle holds a permit that no one else can use. These layers take their
//! permit (or queue slot) in `call`, in the response future: only requests hold permits.
//! `poll_ready` passes the inner service's backpressure through unchanged (the queue is
//! always ready: it is where excess work waits or is refused).
//!
//! # Errors
//!
//! Every service returns [`BoxError`], as tower's own middleware does, so layers stack. A
//! refusal is an [`Overloaded`] inside it; find it with `downcast_ref::<Overloaded>()`. Errors
//! of the inner service are passed through boxed.
//!
//! [`Overloaded`]: crate::Overloaded

mod bulkhead;
mod keyed_bulkhead;
mod queue;
mod rate;
mod shed;

pub use bulkhead::{BulkheadFuture, BulkheadLayer, BulkheadService};
pub use keyed_bulkhead::{Identify, KeyedBulkheadFuture, KeyedBulkheadLayer, KeyedBulkheadService};
pub use queue::{Panicked, QueueFuture, QueueLayer, QueueService};
pub use rate::{RATELIMIT, RATELIMIT_POLICY, RateLimitFuture, RateLimitLayer, RateLimitService};
pub use shed::{LoadShedFuture, LoadShedLayer, LoadShedService};

use std::cell::Cell;

use crate::Priority;

thread_local! {
    /// The priority a [`LoadShedService`] gave the request it is passing to the inner service's
    /// `call`, for a [`BulkheadService`] below it to refuse that request as.
    static CALLING: Cell<Option<Priority>> = const { Cell::new(None) };
}

/// Runs `call` (an inner service's `call`) with `priority` as the request's priority.
fn calling_with<R>(priority: Priority, call: impl FnOnce() -> R) -> R {
    struct Restore(Option<Priority>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CALLING.set(self.0);
        }
    }
    let _restore = Restore(CALLING.replace(Some(priority)));
    call()
}

/// The priority of the request being called: the one a [`LoadShedService`] above gave it, or
/// [`Priority::Default`].
fn calling_priority() -> Priority {
    CALLING.get().unwrap_or(Priority::Default)
}

/// The error type of these services: the inner service's error or an
/// [`Overloaded`](crate::Overloaded), boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Tells the priority of a request. Implemented for every `Fn(&Req) -> Priority`.
pub trait Prioritize<Req> {
    /// The priority class of `request`.
    fn priority(&self, request: &Req) -> Priority;
}

impl<Req, F> Prioritize<Req> for F
where
    F: Fn(&Req) -> Priority,
{
    fn priority(&self, request: &Req) -> Priority {
        self(request)
    }
}
