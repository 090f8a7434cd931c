//! Lock-free sliding-window counters shared by the breaker and the retry budget.
//!
//! Time windows are striped: each thread adds to its own stripe (its own cache lines), and
//! readers sum every stripe. Counts are statistics, not ledgers: an add racing the rollover of
//! its bucket may be lost, which moves a ratio by one call at most.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering};

/// The most stripes a time window has.
const MAX_STRIPES: usize = 8;

/// Stripes per time window: one per core, up to [`MAX_STRIPES`], a power of two.
fn stripe_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(MAX_STRIPES)
            .next_power_of_two()
    })
}

/// This thread's stripe, assigned round-robin on first use.
#[inline]
fn stripe_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        // Const-initialised, so that a read is a plain thread-local load with no lazy-init check.
        static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    INDEX.with(|index| match index.get() {
        usize::MAX => {
            let assigned = NEXT.fetch_add(1, Ordering::Relaxed) % MAX_STRIPES;
            index.set(assigned);
            assigned
        }
        assigned => assigned,
    })
}

const EMPTY: u64 = u64::MAX;

/// A cache line of its own, so that threads writing to different stripes never share one.
#[repr(align(64))]
struct Bucket<const K: usize> {
    epoch: AtomicU64,
    counts: [AtomicI64; K],
}

/// One thread's buckets: a ring of a power-of-two length, at least the window's bucket count,
/// so that an epoch finds its bucket with a mask rather than a division.
struct Stripe<const K: usize> {
    buckets: Box<[Bucket<K>]>,
}

/// `K` counters over a sliding time window of `buckets` slices.
pub(crate) struct TimeBuckets<const K: usize> {
    stripes: Box<[Stripe<K>]>,
    bucket_nanos: u64,
    /// Epochs in the window.
    buckets: u64,
}

impl<const K: usize> TimeBuckets<K> {
    pub(crate) fn new(length_nanos: u64, buckets: u32) -> Self {
        let buckets = buckets.max(1);
        let stripes = (0..stripe_count())
            .map(|_| Stripe {
                buckets: (0..buckets.next_power_of_two())
                    .map(|_| Bucket {
                        epoch: AtomicU64::new(EMPTY),
                        counts: std::array::from_fn(|_| AtomicI64::new(0)),
                    })
                    .collect(),
            })
            .collect();
        Self {
            stripes,
            bucket_nanos: (length_nanos / u64::from(buckets)).max(1),
            buckets: u64::from(buckets),
        }
    }

    /// The bucket epoch of a time given in nanoseconds since the owner's origin.
    pub(crate) fn epoch(&self, now_nanos: u64) -> u64 {
        now_nanos / self.bucket_nanos
    }

    /// Adds `deltas` to the counters of `epoch`.
    pub(crate) fn add(&self, epoch: u64, deltas: [i64; K]) {
        let stripe = &self.stripes[stripe_index() & (self.stripes.len() - 1)];
        let bucket = &stripe.buckets[epoch as usize & (stripe.buckets.len() - 1)];
        let seen = bucket.epoch.load(Ordering::Acquire);
        if seen != epoch {
            if seen != EMPTY && seen > epoch {
                return; // a stale time: the bucket already belongs to a later slice
            }
            if bucket
                .epoch
                .compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                for count in &bucket.counts {
                    count.store(0, Ordering::Relaxed);
                }
            }
        }
        for (count, delta) in bucket.counts.iter().zip(deltas) {
            if delta != 0 {
                count.fetch_add(delta, Ordering::Relaxed);
            }
        }
    }

    /// The counters summed over the window ending at `epoch`.
    pub(crate) fn sum(&self, epoch: u64) -> [i64; K] {
        let mut sums = [0; K];
        for stripe in &self.stripes {
            for bucket in &stripe.buckets {
                let at = bucket.epoch.load(Ordering::Acquire);
                if at != EMPTY && at <= epoch && epoch - at < self.buckets {
                    for (sum, count) in sums.iter_mut().zip(&bucket.counts) {
                        *sum += count.load(Ordering::Relaxed);
                    }
                }
            }
        }
        sums.map(|sum| sum.max(0))
    }

    pub(crate) fn reset(&self) {
        for bucket in self.stripes.iter().flat_map(|stripe| stripe.buckets.iter()) {
            bucket.epoch.store(EMPTY, Ordering::Release);
            for count in &bucket.counts {
                count.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// How one finished call is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sample {
    pub(crate) failure: bool,
    pub(crate) slow: bool,
}

/// Calls, failures and slow calls currently in a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) calls: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
}

const CALL: u8 = 1;
const FAILURE: u8 = 2;
const SLOW: u8 = 4;

/// The last `size` calls: a ring of outcomes and running failure and slow counts.
pub(crate) struct CountWindow {
    slots: Box<[AtomicU8]>,
    cursor: AtomicU64,
    failures: AtomicI64,
    slow: AtomicI64,
}

impl CountWindow {
    fn record(&self, sample: Sample) {
        let bits =
            CALL | if sample.failure { FAILURE } else { 0 } | if sample.slow { SLOW } else { 0 };
        let at = self.cursor.fetch_add(1, Ordering::Relaxed);
        let slot = &self.slots[(at % self.slots.len() as u64) as usize];
        // A call like the one it replaces changes nothing: only reading the slot keeps its cache
        // line shared between threads, so that a closed breaker's successes write one line.
        if slot.load(Ordering::Relaxed) == bits {
            return;
        }
        let old = slot.swap(bits, Ordering::AcqRel);
        let changed = old ^ bits;
        if changed & FAILURE != 0 {
            self.failures
                .fetch_add(if sample.failure { 1 } else { -1 }, Ordering::Relaxed);
        }
        if changed & SLOW != 0 {
            self.slow
                .fetch_add(if sample.slow { 1 } else { -1 }, Ordering::Relaxed);
        }
    }

    fn totals(&self) -> Totals {
        let calls = self
            .cursor
            .load(Ordering::Relaxed)
            .min(self.slots.len() as u64);
        Totals {
            calls,
            failures: self.failures.load(Ordering::Relaxed).max(0).unsigned_abs(),
            slow: self.slow.load(Ordering::Relaxed).max(0).unsigned_abs(),
        }
    }

    fn reset(&self) {
        for slot in &self.slots {
            slot.store(0, Ordering::Relaxed);
        }
        self.failures.store(0, Ordering::Relaxed);
        self.slow.store(0, Ordering::Relaxed);
        self.cursor.store(0, Ordering::Release);
    }
}

/// A breaker's sliding window, by count or by time.
pub(crate) enum Window {
    Count(CountWindow),
    Time(TimeBuckets<3>),
}

impl Window {
    pub(crate) fn count(size: u32) -> Self {
        Self::Count(CountWindow {
            slots: (0..size).map(|_| AtomicU8::new(0)).collect(),
            cursor: AtomicU64::new(0),
            failures: AtomicI64::new(0),
            slow: AtomicI64::new(0),
        })
    }

    pub(crate) fn time(length_nanos: u64, buckets: u32) -> Self {
        Self::Time(TimeBuckets::new(length_nanos, buckets))
    }

    /// Whether recording needs the current time.
    pub(crate) fn is_timed(&self) -> bool {
        matches!(self, Self::Time(_))
    }

    /// Records `sample` at `now_nanos`; returns the time window's bucket epoch it went into
    /// (`None` for a count window), which the caller reuses rather than dividing again.
    pub(crate) fn record(&self, sample: Sample, now_nanos: u64) -> Option<u64> {
        match self {
            Self::Count(window) => {
                window.record(sample);
                None
            }
            Self::Time(window) => {
                let epoch = window.epoch(now_nanos);
                window.add(
                    epoch,
                    [1, i64::from(sample.failure), i64::from(sample.slow)],
                );
                Some(epoch)
            }
        }
    }

    pub(crate) fn totals(&self, now_nanos: u64) -> Totals {
        match self {
            Self::Count(window) => window.totals(),
            Self::Time(window) => {
                let [calls, failures, slow] = window.sum(window.epoch(now_nanos));
                Totals {
                    calls: calls.unsigned_abs(),
                    failures: failures.unsigned_abs(),
                    slow: slow.unsigned_abs(),
                }
            }
        }
    }

    pub(crate) fn reset(&self) {
        match self {
            Self::Count(window) => window.reset(),
            Self::Time(window) => window.reset(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: Sample = Sample {
        failure: false,
        slow: false,
    };
    const FAILED: Sample = Sample {
        failure: true,
        slow: false,
    };

    #[test]
    fn count_window_keeps_only_the_last_calls() {
        let window = Window::count(4);
        for _ in 0..4 {
            window.record(FAILED, 0);
        }
        assert_eq!(window.totals(0).failures, 4);
        for _ in 0..3 {
            window.record(OK, 0);
        }
        let totals = window.totals(0);
        assert_eq!((totals.calls, totals.failures), (4, 1));
        window.reset();
        assert_eq!(window.totals(0).calls, 0);
    }

    #[test]
    fn time_window_forgets_expired_buckets() {
        // 10 buckets of 100 ns.
        let window = Window::time(1_000, 10);
        window.record(FAILED, 0);
        window.record(OK, 550);
        assert_eq!(window.totals(950).calls, 2);
        let later = window.totals(1_050);
        assert_eq!((later.calls, later.failures), (1, 0));
        assert_eq!(window.totals(1_600).calls, 0);
        window.record(OK, 2_000);
        assert_eq!(window.totals(2_000).calls, 1);
    }

    #[test]
    fn a_time_window_counts_exactly_its_last_buckets_as_time_goes_round() {
        // Bucket counts that are and are not powers of two: each window counts the calls of
        // its own last `buckets` slices of 100 ns, never an older one left in the ring.
        for buckets in [1_u32, 3, 4, 10] {
            let window = Window::time(100 * u64::from(buckets), buckets);
            for slice in 0..50_u64 {
                window.record(OK, slice * 100 + 50);
                let expected = (slice + 1).min(u64::from(buckets));
                assert_eq!(
                    window.totals(slice * 100 + 99).calls,
                    expected,
                    "{buckets} buckets"
                );
            }
        }
    }

    #[test]
    fn time_buckets_sum_across_threads() {
        let buckets = std::sync::Arc::new(TimeBuckets::<2>::new(1_000, 10));
        let started = std::sync::Arc::new(std::sync::Barrier::new(4));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let buckets = buckets.clone();
                let started = started.clone();
                std::thread::spawn(move || {
                    // Claim the bucket first: only additions after a rollover are exact.
                    buckets.add(3, [0, 0]);
                    started.wait();
                    for _ in 0..1_000 {
                        buckets.add(3, [1, 2]);
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().expect("thread");
        }
        assert_eq!(buckets.sum(3), [4_000, 8_000]);
    }
}
