//! Good and bad events counted by time in fixed memory.
//!
//! Events land in a ring of fine buckets (level 0), one atomic add each. A bucket leaves the
//! ring when its slot is needed for a bucket 256 slots newer, and its counts move to a ring of
//! buckets 8 times as wide (level 1), and so on up the levels; what leaves the last level
//! still counts in the totals but in no window. Every event is in exactly one bucket at any
//! time. A bucket moves up only when its slot is wanted for a newer one, so an event above
//! level 0 is at least that level's reach old (under sparse traffic, old events may also stay
//! low, in finer buckets): a window's sum is exact to the width of the coarsest bucket that
//! can hold events of its length (see [`Events::granularity`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

/// Buckets per level.
const SLOTS: u64 = 256;
/// How many times wider a level's buckets are than the level below.
const WIDER: u64 = 8;
/// The epoch of a slot that holds nothing yet.
const EMPTY: u64 = u64::MAX;

/// Good and bad events, added up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Every event.
    pub(crate) total: u64,
    /// The bad ones among them.
    pub(crate) bad: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.total += other.total;
        self.bad += other.bad;
    }
}

/// A level-0 bucket, written without a lock.
struct FineSlot {
    epoch: AtomicU64,
    total: AtomicU64,
    bad: AtomicU64,
}

/// A bucket of a coarser level, written under the lock.
#[derive(Clone, Copy)]
struct Slot {
    epoch: u64,
    counts: Counts,
}

struct Coarse {
    /// Levels 1 and up.
    levels: Vec<Box<[Slot]>>,
    /// What left the last level: in the totals, in no window.
    expired: Counts,
}

pub(crate) struct Events {
    /// Width of a level-0 bucket, in nanoseconds.
    resolution: u64,
    /// The newest level-0 bucket opened: most events land in it, found without a division.
    current: AtomicU64,
    fine: Box<[FineSlot]>,
    /// The coarser levels; also held while a fine bucket moves up, so that a reader never
    /// sees it in two places or in none.
    coarse: Mutex<Coarse>,
}

impl Events {
    /// Buckets `resolution` wide at level 0, and enough levels to hold `longest` in full.
    pub(crate) fn new(resolution: Duration, longest: Duration) -> Self {
        let resolution = u64::try_from(resolution.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        let fine = (0..SLOTS)
            .map(|_| FineSlot {
                epoch: AtomicU64::new(EMPTY),
                total: AtomicU64::new(0),
                bad: AtomicU64::new(0),
            })
            .collect();
        let mut events = Self {
            resolution,
            current: AtomicU64::new(0),
            fine,
            coarse: Mutex::new(Coarse {
                levels: Vec::new(),
                expired: Counts::default(),
            }),
        };
        let levels = (1..)
            .find(|&levels| events.reach(levels - 1) > longest)
            .unwrap_or(1);
        let empty = Slot {
            epoch: EMPTY,
            counts: Counts::default(),
        };
        events.coarse.get_mut().levels = (1..levels)
            .map(|_| vec![empty; SLOTS as usize].into_boxed_slice())
            .collect();
        events
    }

    /// The width of a bucket of `level`.
    fn width(&self, level: usize) -> Duration {
        let factor = u32::try_from(level)
            .ok()
            .and_then(|level| WIDER.checked_pow(level))
            .unwrap_or(u64::MAX);
        Duration::from_nanos(self.resolution.saturating_mul(factor))
    }

    /// The youngest an event can be once it has moved above `level`: one bucket short of the
    /// level's span, since a bucket leaves when the slot is wanted 256 buckets later.
    fn reach(&self, level: usize) -> Duration {
        self.width(level).saturating_mul(SLOTS as u32 - 1)
    }

    fn levels(&self) -> usize {
        self.coarse.lock().levels.len() + 1
    }

    /// The width of the coarsest bucket that can hold an event younger than `window`: a
    /// window's sum counts every event younger than `window - granularity` and none as old as
    /// `window` or older.
    pub(crate) fn granularity(&self, window: Duration) -> Duration {
        let last = self.levels() - 1;
        let level = (0..last)
            .find(|&level| self.reach(level) > window)
            .unwrap_or(last);
        self.width(level)
    }

    /// Counts one event at `now` (nanoseconds on the objective's clock). Returns whether it
    /// opened a new level-0 bucket.
    #[inline]
    pub(crate) fn record(&self, now: u64, bad: bool) -> bool {
        let current = self.current.load(Ordering::Relaxed);
        let epoch = if now.wrapping_sub(current.wrapping_mul(self.resolution)) < self.resolution {
            current
        } else {
            now / self.resolution
        };
        let slot = &self.fine[(epoch % SLOTS) as usize];
        let opened = slot.epoch.load(Ordering::Acquire) != epoch && self.open(slot, epoch);
        slot.total.fetch_add(1, Ordering::Relaxed);
        if bad {
            slot.bad.fetch_add(1, Ordering::Relaxed);
        }
        opened
    }

    /// Gives `slot` to `epoch`, moving what it held up a level. A caller whose clock reading
    /// is older than the slot's bucket (it read the clock a whole ring ago) counts into that
    /// newer bucket.
    #[cold]
    #[inline(never)]
    fn open(&self, slot: &FineSlot, epoch: u64) -> bool {
        let mut coarse = self.coarse.lock();
        let held = slot.epoch.load(Ordering::Acquire);
        // Opened meanwhile, or already holding a newer bucket (this caller read the clock long
        // before it got here): count into what is there.
        if held == epoch || (held != EMPTY && held > epoch) {
            return false;
        }
        if held != EMPTY {
            let counts = Counts {
                total: slot.total.swap(0, Ordering::Relaxed),
                bad: slot.bad.swap(0, Ordering::Relaxed),
            };
            coarse.insert(1, held / WIDER, counts);
        }
        slot.epoch.store(epoch, Ordering::Release);
        self.current.fetch_max(epoch, Ordering::Relaxed);
        true
    }

    /// Every window's counts at `now`, and the totals since the start.
    pub(crate) fn sums(&self, now: u64, windows: &[Duration]) -> (Vec<Counts>, Counts) {
        let mut sums = vec![Counts::default(); windows.len()];
        let mut all = Counts::default();
        let mut count = |start: u64, counts: Counts| {
            all.add(counts);
            let age = Duration::from_nanos(now.saturating_sub(start));
            for (window, sum) in windows.iter().zip(&mut sums) {
                // As Prometheus's `rate` over `[window]` counts the increases after the
                // sample `window` ago.
                if age < *window {
                    sum.add(counts);
                }
            }
        };
        let coarse = self.coarse.lock();
        for slot in self.fine.iter() {
            let epoch = slot.epoch.load(Ordering::Acquire);
            if epoch != EMPTY {
                // Read without ordering against the adds: a bad count may be ahead of its
                // total for an instant.
                let bad = slot.bad.load(Ordering::Relaxed);
                let total = slot.total.load(Ordering::Relaxed).max(bad);
                count(epoch.saturating_mul(self.resolution), Counts { total, bad });
            }
        }
        for (level, slots) in coarse.levels.iter().enumerate() {
            let width = u64::try_from(self.width(level + 1).as_nanos()).unwrap_or(u64::MAX);
            for slot in slots.iter().filter(|slot| slot.epoch != EMPTY) {
                count(slot.epoch.saturating_mul(width), slot.counts);
            }
        }
        all.add(coarse.expired);
        (sums, all)
    }
}

impl Coarse {
    /// Adds `counts` to the bucket `epoch` of `level` (1-based), moving an older bucket in its
    /// slot one level up, or passing the counts up if the slot already holds a newer bucket.
    fn insert(&mut self, mut level: usize, mut epoch: u64, mut counts: Counts) {
        while let Some(slots) = self.levels.get_mut(level - 1) {
            let slot = &mut slots[(epoch % SLOTS) as usize];
            if slot.epoch == epoch || slot.epoch == EMPTY {
                slot.epoch = epoch;
                slot.counts.add(counts);
                return;
            }
            if slot.epoch < epoch {
                let older = std::mem::replace(slot, Slot { epoch, counts });
                (epoch, counts) = (older.epoch, older.counts);
            }
            level += 1;
            epoch /= WIDER;
        }
        self.expired.add(counts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn levels_reach_the_longest_window() {
        let events = Events::new(Duration::from_secs(30), Duration::from_secs(30 * 86_400));
        // 30 s, 4 min, 32 min and 256 min buckets: the last level holds 45 days.
        assert_eq!(events.levels(), 4);
        assert_eq!(
            events.granularity(Duration::from_secs(300)),
            Duration::from_secs(30)
        );
        assert_eq!(
            events.granularity(Duration::from_secs(6 * 3600)),
            Duration::from_secs(240)
        );
        assert_eq!(
            events.granularity(Duration::from_secs(3 * 86_400)),
            Duration::from_secs(1920)
        );
    }

    #[test]
    fn an_event_moves_up_without_being_lost_or_counted_twice() {
        let events = Events::new(Duration::from_secs(1), Duration::from_secs(100_000));
        events.record(0, true);
        // 10,000 s later the first bucket has moved up twice; nothing was lost.
        for second in 1..10_000 {
            events.record(second * SECOND, false);
        }
        let (sums, all) = events.sums(10_000 * SECOND, &[Duration::from_secs(100_000)]);
        assert_eq!(
            all,
            Counts {
                total: 10_000,
                bad: 1
            }
        );
        assert_eq!(sums[0], all);
    }
}
