//! Timeouts that cancel the work they give up on.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use headroom_core::Clock;
use headroom_core::metrics::Counter;

use crate::error::Elapsed;

/// A time limit for a future. When it is reached the future is dropped, which cancels the
/// work it was doing (and runs its drop guards), and the caller gets [`Elapsed`].
///
/// ```
/// use std::time::Duration;
/// use headroom_breaker::Timeout;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let timeout = Timeout::new(Duration::from_millis(100));
/// let slow = timeout.call(tokio::time::sleep(Duration::from_secs(5))).await;
/// assert_eq!(slow.unwrap_err().after(), Duration::from_millis(100));
/// assert_eq!(timeout.call(async { 7 }).await, Ok(7));
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Timeout {
    after: Duration,
    clock: Clock,
    elapsed: Counter,
}

impl Timeout {
    /// A limit of `after` on the system clock.
    pub fn new(after: Duration) -> Self {
        Self::named(after, Clock::system(), &Arc::from("default"))
    }

    pub(crate) fn named(after: Duration, clock: Clock, name: &Arc<str>) -> Self {
        Self {
            after,
            clock,
            elapsed: headroom_core::counter!("headroom_breaker_timeouts_total", "pipeline" => name.to_string()),
        }
    }

    /// The same limit measured on `clock`.
    #[must_use]
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The time limit.
    pub fn duration(&self) -> Duration {
        self.after
    }

    /// Runs `fut` until it finishes or the limit is reached, whichever comes first.
    pub async fn call<F: Future>(&self, fut: F) -> Result<F::Output, Elapsed> {
        let mut fut = pin!(fut);
        let mut limit = pin!(self.clock.sleep(self.after));
        let result = poll_fn(|cx| {
            if let Poll::Ready(output) = fut.as_mut().poll(cx) {
                return Poll::Ready(Ok(output));
            }
            match limit.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(Elapsed { after: self.after })),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        if result.is_err() {
            self.elapsed.increment(1);
            tracing::debug!(after = ?self.after, "attempt timed out");
        }
        result
    }
}
