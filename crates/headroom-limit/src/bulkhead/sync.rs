//! What the permit accounting runs on: std's atomics and a tokio FIFO semaphore for the
//! hand-off normally; loom's, and a model of the hand-off, under `--cfg headroom_loom`, so that
//! the accounting can be model-checked.

#[cfg(not(headroom_loom))]
pub(super) use parking_lot::Mutex;
#[cfg(not(headroom_loom))]
pub(super) use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

#[cfg(headroom_loom)]
pub(super) use loom::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Permits on their way to waiting callers, first come first served.
#[cfg(not(headroom_loom))]
pub(super) struct Handoff(tokio::sync::Semaphore);

#[cfg(not(headroom_loom))]
impl Handoff {
    pub(super) fn new() -> Self {
        Self(tokio::sync::Semaphore::new(0))
    }

    pub(super) fn add(&self, n: usize) {
        self.0.add_permits(n);
    }

    /// Takes back up to `most` of the permits not yet assigned to a waiter.
    pub(super) fn take_back(&self, most: usize) -> usize {
        self.0.forget_permits(most)
    }

    pub(super) fn available(&self) -> usize {
        self.0.available_permits()
    }

    /// Waits for a permit; false if the hand-off is closed (it never is).
    pub(super) async fn take(&self) -> bool {
        self.0.acquire().await.map(|permit| permit.forget()).is_ok()
    }
}

/// The model of the hand-off under loom, with the orderings of tokio's semaphore: the count
/// of permits is an atomic that giving adds to (Release) and taking back updates (AcqRel), so
/// the two synchronise with each other only through the count itself; waiters' wakers sit
/// behind a lock.
#[cfg(headroom_loom)]
pub(super) struct Handoff {
    permits: AtomicUsize,
    wakers: loom::sync::Mutex<Vec<std::task::Waker>>,
}

#[cfg(headroom_loom)]
impl Handoff {
    pub(super) fn new() -> Self {
        Self {
            permits: AtomicUsize::new(0),
            wakers: loom::sync::Mutex::new(Vec::new()),
        }
    }

    pub(super) fn add(&self, n: usize) {
        let mut wakers = self.wakers.lock().unwrap();
        self.permits.fetch_add(n, Ordering::Release);
        for waker in wakers.drain(..) {
            waker.wake();
        }
    }

    pub(super) fn take_back(&self, most: usize) -> usize {
        let before = self
            .permits
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |permits| {
                Some(permits - permits.min(most))
            })
            .unwrap_or_else(|permits| permits);
        before.min(most)
    }

    pub(super) fn available(&self) -> usize {
        self.permits.load(Ordering::Acquire)
    }

    fn try_take(&self) -> bool {
        self.permits
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |permits| {
                permits.checked_sub(1)
            })
            .is_ok()
    }

    pub(super) async fn take(&self) -> bool {
        std::future::poll_fn(|cx| {
            if self.try_take() {
                return std::task::Poll::Ready(true);
            }
            let mut wakers = self.wakers.lock().unwrap();
            // Looked again under the lock that giving takes, so that no wake is missed.
            if self.try_take() {
                return std::task::Poll::Ready(true);
            }
            wakers.push(cx.waker().clone());
            std::task::Poll::Pending
        })
        .await
    }
}

/// loom's mutex behind parking_lot's interface.
#[cfg(headroom_loom)]
pub(super) struct Mutex<T>(loom::sync::Mutex<T>);

#[cfg(headroom_loom)]
impl<T> Mutex<T> {
    pub(super) fn new(value: T) -> Self {
        Self(loom::sync::Mutex::new(value))
    }

    pub(super) fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
        self.0.lock().unwrap()
    }
}
