//! Waiting for a permit: the one loop behind every `acquire`.

use std::future::Future;
use std::time::Duration;

use headroom_core::Clock;

use super::{Admitted, RateError};

/// Runs `attempt` until it is admitted, sleeping on `clock` for the wait each refusal names
/// while the permit stays due within `max_wait` of the start; returns the refusal at once
/// otherwise, and any other error as it comes.
///
/// Nothing is held while sleeping, so dropping the future there gives up the wait and leaves
/// every limiter as it was.
pub(crate) async fn acquire<F, Fut>(
    clock: &Clock,
    max_wait: Duration,
    mut attempt: F,
) -> Result<Admitted, RateError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Admitted, RateError>>,
{
    // No deadline when `max_wait` runs past what an `Instant` holds: wait as long as it takes.
    let deadline = clock.now().checked_add(max_wait);
    loop {
        let error = match attempt().await {
            Ok(admitted) => return Ok(admitted),
            Err(error) => error,
        };
        let Some(retry_after) = error.limited().map(|limited| limited.retry_after()) else {
            return Err(error);
        };
        let due = clock.now().checked_add(retry_after);
        let within = match (due, deadline) {
            (_, None) => true,
            (Some(due), Some(deadline)) => due <= deadline,
            (None, Some(_)) => false,
        };
        if !within {
            return Err(error);
        }
        // A store that refuses with no wait still gets time to move on.
        clock.sleep(retry_after.max(Duration::from_nanos(1))).await;
    }
}
