//! A bulkhead's permit accounting: who may run, who waits, and how released permits reach the
//! waiters without a lock on the uncontended path.

use super::sync::{AtomicU64, AtomicUsize, Handoff, Mutex, Ordering};
#[cfg(doc)]
use crate::limits::MAX_LIMIT;

/// The most waiters the state word holds (permits are bounded by [`MAX_LIMIT`]).
const MAX_WAITING: usize = u32::MAX as usize;

/// One waiter in the upper half of the state word.
const ONE_WAITING: u64 = 1 << 32;

/// The lower half of the state word counts free permits up from `OWES_NOTHING` and what a
/// shrink still owes down from it, so that a permit coming back pays the debt in the same
/// atomic step that decides where it goes.
const OWES_NOTHING: u64 = 1 << 31;

const LOWER_HALF: u64 = u32::MAX as u64;

#[inline]
fn free(state: u64) -> usize {
    (state & LOWER_HALF).saturating_sub(OWES_NOTHING) as usize
}

/// `free(state) > 0`, in one comparison.
#[inline]
fn has_free(state: u64) -> bool {
    state & LOWER_HALF > OWES_NOTHING
}

#[inline]
fn owed(state: u64) -> usize {
    OWES_NOTHING.saturating_sub(state & LOWER_HALF) as usize
}

fn waiting(state: u64) -> usize {
    (state >> 32) as usize
}

/// Keeps the state word, written on every acquire and release, off the cache line of what
/// every caller only reads.
#[repr(align(128))]
struct CacheLine<T>(T);

/// Every permit is free, held, in the hand-off on its way to a waiter, or owed back after a
/// shrink.
///
/// Free permits, what a shrink still owes and registered waiters share one word, so that
/// taking a permit, starting to wait, shrinking and giving a permit back each decide on one
/// consistent view with one atomic operation: a permit given back pays what a shrink owes
/// first, and while anyone waits goes to the hand-off, never to `free`, so no waiter sleeps
/// while a permit is free and none is free while one is owed. Handing over and taking back
/// what nobody is left to take are serialised by `handoff_lock`: whoever makes the waiters
/// zero takes the hand-off back under it, so no permit is stranded there, and a shrink or a
/// waiter that leaves while one is owed pays it from what no waiter has taken. The model checks
/// in this module explore every interleaving of these steps under loom.
pub(super) struct Permits {
    /// Free permits (or, below `OWES_NOTHING`, permits owed) in the lower half, registered
    /// waiters in the upper half.
    state: CacheLine<AtomicU64>,
    handoff: Handoff,
    handoff_lock: Mutex<()>,
    limit: AtomicUsize,
    resize: Mutex<()>,
}

/// What a caller got from [`Permits::take_or_wait`].
pub(super) enum Entry<'a> {
    /// A free permit.
    Taken,
    /// A place among the waiters.
    Waiting(Waiter<'a>),
    /// Neither: no permit free and no room to wait.
    Full,
}

impl Permits {
    /// `limit` free permits.
    pub(super) fn new(limit: usize) -> Self {
        Self {
            state: CacheLine(AtomicU64::new(OWES_NOTHING + limit as u64)),
            handoff: Handoff::new(),
            handoff_lock: Mutex::new(()),
            limit: AtomicUsize::new(limit),
            resize: Mutex::new(()),
        }
    }

    /// Takes a free permit, if any; never waits.
    #[inline]
    pub(super) fn try_take(&self) -> bool {
        self.state
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
                has_free(state).then(|| state - 1)
            })
            .is_ok()
    }

    /// Takes a free permit, or else a place among the waiters if fewer than `max_waiting`
    /// wait.
    pub(super) fn take_or_wait(&self, max_waiting: usize) -> Entry<'_> {
        let max_waiting = max_waiting.min(MAX_WAITING);
        let before = self
            .state
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
                if has_free(state) {
                    Some(state - 1)
                } else if waiting(state) < max_waiting {
                    Some(state + ONE_WAITING)
                } else {
                    None
                }
            });
        match before {
            Ok(state) if has_free(state) => Entry::Taken,
            Ok(_) => Entry::Waiting(Waiter(self)),
            Err(_) => Entry::Full,
        }
    }

    /// Gives a held permit back: to the debt of a shrink if any is owed, else to a waiter or
    /// the free permits.
    #[inline]
    pub(super) fn release(&self) {
        // Paying what a shrink owes and freeing a permit are both one more in the lower half;
        // only with nothing owed and someone waiting does the permit go to the hand-off.
        let to_waiter = self
            .state
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
                (waiting(state) == 0 || owed(state) > 0).then(|| state + 1)
            })
            .is_err();
        if to_waiter {
            self.hand_over(1);
        }
    }

    /// Makes `n` permits available: first to what a shrink owes, then one to each registered
    /// waiter, the rest free.
    #[inline]
    fn give(&self, n: usize) {
        let mut handed = 0;
        // A failed update is a decision too: every permit goes to the waiters seen.
        let _ = self
            .state
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
                let paid = owed(state).min(n);
                handed = (n - paid).min(waiting(state));
                (handed < n).then(|| state + (n - handed) as u64)
            });
        if handed > 0 {
            self.hand_over(handed);
        }
    }

    /// Puts `n` permits in the hand-off for the waiters seen, out of line so that a release
    /// stays small enough to inline.
    #[inline(never)]
    fn hand_over(&self, n: usize) {
        let _serialised = self.handoff_lock.lock();
        self.handoff.add(n);
        // The waiters seen may all have left meanwhile.
        self.take_back_stranded();
    }

    /// Takes back what is in the hand-off for nobody: while anyone waits, only what a shrink
    /// owes (a permit no waiter has taken yet, or one a waiter gave up); once nobody waits,
    /// everything, which is free once the debt is paid. Called with `handoff_lock` held.
    fn take_back_stranded(&self) {
        let state = self.state.0.load(Ordering::Acquire);
        let most = if waiting(state) > 0 {
            owed(state)
        } else {
            usize::MAX
        };
        if most == 0 {
            return;
        }
        let stranded = self.handoff.take_back(most);
        if stranded == 0 {
            return;
        }
        let mut kept = stranded;
        let _ = self
            .state
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
                let returned = if waiting(state) == 0 {
                    stranded
                } else {
                    owed(state).min(stranded)
                };
                kept = stranded - returned;
                (returned > 0).then(|| state + returned as u64)
            });
        if kept > 0 {
            // Someone started waiting meanwhile (or the debt was paid): the permits are the
            // waiters', and whoever of them leaves last takes back what is left.
            self.handoff.add(kept);
        }
    }

    /// Sets the limit: growing makes permits available at once (after paying what a shrink
    /// still owes), shrinking retires free permits at once (and those in the hand-off that no
    /// waiter has taken) and the rest as their holders release them. Returns the old limit if
    /// it changed.
    pub(super) fn resize(&self, new: usize) -> Option<usize> {
        let _serialised = self.resize.lock();
        let old = self.limit.swap(new, Ordering::AcqRel);
        if new > old {
            self.give(new - old);
        } else if new < old {
            // Free permits go at once; below them, the rest is owed.
            self.state.0.fetch_sub((old - new) as u64, Ordering::AcqRel);
            let _serialised = self.handoff_lock.lock();
            self.take_back_stranded();
        }
        (new != old).then_some(old)
    }

    pub(super) fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Held permits: derived from the others, a snapshot under concurrent change.
    pub(super) fn in_use(&self) -> usize {
        let state = self.state.0.load(Ordering::Relaxed);
        let total = self.limit.load(Ordering::Relaxed) + owed(state);
        let idle = free(state) + self.handoff.available();
        total.saturating_sub(idle)
    }

    pub(super) fn waiting(&self) -> usize {
        waiting(self.state.0.load(Ordering::Relaxed))
    }
}

/// A place among the waiters, given up however the wait ends.
pub(super) struct Waiter<'a>(&'a Permits);

impl Waiter<'_> {
    /// Waits until a permit is handed over; false if that can no longer happen.
    pub(super) async fn handed_over(&self) -> bool {
        self.0.handoff.take().await
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let before = self.0.state.0.fetch_sub(ONE_WAITING, Ordering::AcqRel);
        // A permit this waiter was handed and gave up is back in the hand-off.
        if waiting(before) == 1 || owed(before) > 0 {
            let _serialised = self.0.handoff_lock.lock();
            self.0.take_back_stranded();
        }
    }
}

/// Model checks: every interleaving of the steps above (up to loom's preemption bound), run
/// with `RUSTFLAGS="--cfg headroom_loom" cargo test -p headroom-limit --lib --release model`
/// (scripts/loom.sh). A caller that waits forever makes loom report a deadlock.
#[cfg(all(test, headroom_loom))]
mod model {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll};

    use loom::future::block_on;
    use loom::sync::Arc;
    use loom::thread;

    use super::{Entry, Permits};

    fn check(model: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(model);
    }

    /// Takes a permit, waiting for it as long as it takes.
    fn take(permits: &Permits) {
        match permits.take_or_wait(usize::MAX) {
            Entry::Taken => {}
            Entry::Waiting(waiter) => assert!(block_on(waiter.handed_over())),
            Entry::Full => panic!("refused with room to wait"),
        }
    }

    /// Exactly `limit` permits can be taken without waiting: none held, none stranded in the
    /// hand-off, none lost or made up.
    fn assert_all_free(permits: &Permits, limit: usize) {
        assert_eq!(permits.in_use(), 0, "permits still counted as held");
        assert_eq!(permits.waiting(), 0, "waiters still counted");
        for taken in 0..limit {
            assert!(permits.try_take(), "only {taken} of {limit} permits free");
        }
        assert!(!permits.try_take(), "more than {limit} permits free");
    }

    #[test]
    fn a_permit_released_as_a_caller_starts_waiting_reaches_it() {
        check(|| {
            let permits = Arc::new(Permits::new(1));
            assert!(permits.try_take());
            let waiter = {
                let permits = Arc::clone(&permits);
                thread::spawn(move || {
                    take(&permits);
                    permits.release();
                })
            };
            permits.release();
            waiter.join().unwrap();
            assert_all_free(&permits, 1);
        });
    }

    #[test]
    fn a_caller_that_gives_up_waiting_strands_no_permit() {
        check(|| {
            let permits = Arc::new(Permits::new(1));
            assert!(permits.try_take());
            let quitter = {
                let permits = Arc::clone(&permits);
                thread::spawn(move || wait_once_then_give_up(&permits))
            };
            permits.release();
            quitter.join().unwrap();
            assert_all_free(&permits, 1);
        });
    }

    /// Gives up after one poll; gives the permit back if it was handed one by then.
    fn wait_once_then_give_up(permits: &Permits) {
        match permits.take_or_wait(1) {
            Entry::Taken => permits.release(),
            Entry::Waiting(waiter) => {
                let handed_over = {
                    let wait = pin!(waiter.handed_over());
                    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
                    wait.poll(&mut cx)
                };
                drop(waiter);
                if handed_over == Poll::Ready(true) {
                    permits.release();
                }
            }
            Entry::Full => panic!("refused with room to wait"),
        }
    }

    #[test]
    fn a_permit_left_by_a_caller_that_gives_up_waiting_pays_a_shrink() {
        check(|| {
            let permits = Arc::new(Permits::new(2));
            assert!(permits.try_take());
            assert!(permits.try_take());
            let quitter = {
                let permits = Arc::clone(&permits);
                thread::spawn(move || wait_once_then_give_up(&permits))
            };
            permits.release();
            permits.resize(1);
            quitter.join().unwrap();
            assert!(!permits.try_take(), "a second permit under a limit of one");
            permits.release();
            assert_all_free(&permits, 1);
        });
    }

    #[test]
    fn two_waiters_each_get_one_of_two_released_permits() {
        check(|| {
            let permits = Arc::new(Permits::new(2));
            assert!(permits.try_take());
            assert!(permits.try_take());
            let waiters: Vec<_> = (0..2)
                .map(|_| {
                    let permits = Arc::clone(&permits);
                    thread::spawn(move || {
                        take(&permits);
                        permits.release();
                    })
                })
                .collect();
            permits.release();
            permits.release();
            for waiter in waiters {
                waiter.join().unwrap();
            }
            assert_all_free(&permits, 2);
        });
    }

    #[test]
    fn growing_the_limit_reaches_a_waiter() {
        check(|| {
            let permits = Arc::new(Permits::new(1));
            assert!(permits.try_take());
            let waiter = {
                let permits = Arc::clone(&permits);
                thread::spawn(move || {
                    take(&permits);
                    permits.release();
                })
            };
            permits.resize(2);
            waiter.join().unwrap();
            permits.release();
            assert_all_free(&permits, 2);
        });
    }

    #[test]
    fn shrinking_while_permits_are_released_retires_exactly_the_difference() {
        check(|| {
            let permits = Arc::new(Permits::new(2));
            assert!(permits.try_take());
            assert!(permits.try_take());
            let releaser = {
                let permits = Arc::clone(&permits);
                thread::spawn(move || permits.release())
            };
            permits.resize(1);
            releaser.join().unwrap();
            assert!(!permits.try_take(), "a second permit under a limit of one");
            permits.release();
            assert_all_free(&permits, 1);
        });
    }
}
