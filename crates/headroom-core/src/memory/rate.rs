use std::sync::Arc;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use parking_lot::Mutex;

use crate::rate::{Gcra, RateDecision, RateStore};
use crate::{BackendError, BackendErrorKind, Clock, Key};

/// How many cells a full store looks at to make room for a new one.
const EVICTION_SAMPLE: usize = 8;

/// What a cell costs besides its key's bytes: its map entry, index slot and the key's
/// allocation, rounded up. Counted, so that short keys cannot hold unbounded memory either.
const CELL_OVERHEAD: usize = 128;

/// An in-memory [`RateStore`]: one map of GCRA cells, bounded in cells and in bytes (each
/// cell's key plus 128 bytes of bookkeeping).
///
/// A cell that is full again (its theoretical arrival time has passed) is the same as no cell,
/// so dropping it loses nothing. A store at a bound makes room for a new key by looking at
/// the next 8 cells in a sweep that goes round the store: it drops those
/// that are full again, and if none is, it evicts the one closest to full, which gives that key
/// a fresh burst: the documented price of a hard memory cap under attacker-chosen keys. Each
/// insert into a full store costs the same however many cells it holds (a long key may make
/// room for itself in a few such steps, as many as its length allows).
#[derive(Clone, Debug)]
pub struct MemoryRateStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cells: Mutex<Cells>,
    clock: Clock,
    max_cells: usize,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct Cells {
    tats: IndexMap<Key, Instant>,
    /// Key bytes held, with `CELL_OVERHEAD` for each cell.
    bytes: usize,
    /// Where the eviction sweep goes on from.
    hand: usize,
    #[cfg(test)]
    examined: usize,
}

impl Cells {
    /// Frees at least one place, looking at no more than `EVICTION_SAMPLE` cells.
    fn make_room(&mut self, now: Instant) {
        let mut closest_to_full: Option<(usize, Instant)> = None;
        let mut freed = false;
        for _ in 0..EVICTION_SAMPLE.min(self.tats.len()) {
            if self.hand >= self.tats.len() {
                self.hand = 0;
            }
            let Some((_, &tat)) = self.tats.get_index(self.hand) else {
                break;
            };
            #[cfg(test)]
            {
                self.examined += 1;
            }
            if tat <= now {
                // The last cell moves into this place: the sweep looks at it next.
                self.remove(self.hand);
                freed = true;
                continue;
            }
            if closest_to_full.is_none_or(|(_, closest)| tat < closest) {
                closest_to_full = Some((self.hand, tat));
            }
            self.hand += 1;
        }
        if !freed && let Some((index, _)) = closest_to_full {
            self.remove(index);
        }
    }

    fn remove(&mut self, index: usize) {
        if let Some((key, _)) = self.tats.swap_remove_index(index) {
            self.bytes -= cell_bytes(&key);
        }
    }

    fn insert(&mut self, key: Key, tat: Instant) {
        self.bytes += cell_bytes(&key);
        self.tats.insert(key, tat);
    }
}

fn cell_bytes(key: &Key) -> usize {
    key.as_bytes().len() + CELL_OVERHEAD
}

/// Builds a [`MemoryRateStore`].
#[derive(Debug)]
pub struct MemoryRateStoreBuilder {
    clock: Clock,
    max_cells: usize,
    max_bytes: usize,
}

impl MemoryRateStoreBuilder {
    /// The clock that decides the cells' times (default: [`Clock::system`]).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The most cells held at once (default 1,000,000).
    pub fn max_cells(mut self, max_cells: usize) -> Self {
        self.max_cells = max_cells.max(1);
        self
    }

    /// The most bytes held at once (default 256 MiB): keys, and 128 bytes for each cell's
    /// bookkeeping. A cell larger than this is still kept, alone.
    pub fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes.max(1);
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryRateStore {
        MemoryRateStore {
            inner: Arc::new(Inner {
                cells: Mutex::new(Cells::default()),
                clock: self.clock,
                max_cells: self.max_cells,
                max_bytes: self.max_bytes,
            }),
        }
    }
}

impl MemoryRateStore {
    /// A store on the system clock with the default bounds (1,000,000 cells, 256 MiB).
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Starts building a store.
    pub fn builder() -> MemoryRateStoreBuilder {
        MemoryRateStoreBuilder {
            clock: Clock::system(),
            max_cells: 1_000_000,
            max_bytes: 256 << 20,
        }
    }

    /// A store on `clock` holding up to `max_cells` cells (and the default 256 MiB).
    pub fn with_limits(clock: Clock, max_cells: usize) -> Self {
        Self::builder().clock(clock).max_cells(max_cells).build()
    }

    /// The number of cells held.
    pub fn len(&self) -> usize {
        self.inner.cells.lock().tats.len()
    }

    /// The bytes held: keys, and 128 for each cell.
    pub fn bytes(&self) -> usize {
        self.inner.cells.lock().bytes
    }

    /// Whether the store holds no cell.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for MemoryRateStore {
    fn default() -> Self {
        Self::new()
    }
}

/// Refuses what no cell could ever admit: a zero interval or burst, a cost over a burst, no cell.
fn check(cells: &[(Key, Gcra)], cost: u32) -> Result<(), BackendError> {
    if cells.is_empty() {
        return Err(BackendError::with_detail(
            BackendErrorKind::Config,
            "a rate decision needs at least one cell",
        ));
    }
    for (_, gcra) in cells {
        if gcra.emission_interval.is_zero() || gcra.burst == 0 {
            return Err(BackendError::with_detail(
                BackendErrorKind::Config,
                "a rate needs a non-zero emission interval and a burst of at least 1",
            ));
        }
        if gcra
            .emission_interval
            .checked_mul(gcra.burst)
            .is_none_or(|time| time.as_nanos() > u128::from(u64::MAX))
        {
            return Err(BackendError::with_detail(
                BackendErrorKind::Config,
                "a burst's time (burst × emission interval) must be at most u64::MAX ns",
            ));
        }
        if cost > gcra.burst {
            return Err(BackendError::with_detail(
                BackendErrorKind::Config,
                format!("a cost of {cost} can never fit a burst of {}", gcra.burst),
            ));
        }
    }
    Ok(())
}

impl RateStore for MemoryRateStore {
    async fn apply_all(
        &self,
        cells: &[(Key, Gcra)],
        cost: u32,
    ) -> Result<RateDecision, BackendError> {
        check(cells, cost)?;
        let now = self.inner.clock.now();
        let mut held = self.inner.cells.lock();
        let ahead = |held: &Cells, key: &Key| {
            held.tats
                .get(key)
                .map_or(Duration::ZERO, |tat| tat.saturating_duration_since(now))
        };
        let decision = RateDecision::of_cells(
            cells.iter().map(|(key, gcra)| (*gcra, ahead(&held, key))),
            cost,
        );
        if decision.allowed {
            for (key, gcra) in cells {
                let charge = gcra.emission_interval.saturating_mul(cost);
                if let Some(tat) = held.tats.get_mut(key) {
                    *tat = super::after((*tat).max(now), charge);
                } else {
                    let tat = super::after(now, charge);
                    let (max_cells, max_bytes) = (self.inner.max_cells, self.inner.max_bytes);
                    while !held.tats.is_empty()
                        && (held.tats.len() >= max_cells
                            || held.bytes + cell_bytes(key) > max_bytes)
                    {
                        held.make_room(now);
                    }
                    held.insert(key.clone(), tat);
                }
            }
        }
        Ok(decision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ManualClock, Namespace};

    const TEN_PER_SECOND: Gcra = Gcra {
        emission_interval: Duration::from_millis(100),
        burst: 5,
    };

    /// A burst's time (burst × interval) past what nanoseconds count (about 584 years, the
    /// limiter's `MAX_BURST_TIME`) is a configuration error; the longest accepted is decided
    /// exactly, not a panic.
    #[tokio::test]
    async fn the_longest_bursts_are_decided_and_longer_ones_refused() {
        let clock = ManualClock::new();
        let store = MemoryRateStore::with_limits(clock.clock(), 100);
        let key = Namespace::new("t").unwrap().key("k").unwrap();
        let too_long = [
            Gcra {
                emission_interval: Duration::MAX,
                burst: 1,
            },
            Gcra {
                emission_interval: Duration::from_secs(u64::MAX / 2),
                burst: 2,
            },
            Gcra {
                emission_interval: Duration::from_nanos(u64::MAX / 2 + 1),
                burst: 2,
            },
        ];
        for gcra in too_long {
            let err = store.apply(&key, gcra, 1).await.unwrap_err();
            assert_eq!(err.kind(), BackendErrorKind::Config, "{gcra:?}");
        }
        let longest = Gcra {
            emission_interval: Duration::from_nanos(u64::MAX / 2),
            burst: 2,
        };
        assert!(store.apply(&key, longest, 2).await.unwrap().allowed);
        assert!(!store.apply(&key, longest, 1).await.unwrap().allowed);
    }

    #[tokio::test]
    async fn admits_exactly_the_burst_then_one_per_interval_with_an_exact_retry_after() {
        let clock = ManualClock::new();
        let store = MemoryRateStore::with_limits(clock.clock(), 100);
        let key = Namespace::new("t").unwrap().key("k").unwrap();
        for remaining in (0..5).rev() {
            let d = store.apply(&key, TEN_PER_SECOND, 1).await.unwrap();
            assert!(d.allowed);
            assert_eq!(d.remaining, remaining);
        }
        let rejected = store.apply(&key, TEN_PER_SECOND, 1).await.unwrap();
        assert!(!rejected.allowed);
        assert_eq!(rejected.retry_after, Duration::from_millis(100));
        assert_eq!(rejected.reset_after, Duration::from_millis(500));

        clock.advance(Duration::from_millis(99));
        let d = store.apply(&key, TEN_PER_SECOND, 1).await.unwrap();
        assert_eq!(
            (d.allowed, d.retry_after),
            (false, Duration::from_millis(1))
        );
        clock.advance(Duration::from_millis(1));
        assert!(store.apply(&key, TEN_PER_SECOND, 1).await.unwrap().allowed);

        // A cost of 3 waits for three intervals.
        let d = store.apply(&key, TEN_PER_SECOND, 3).await.unwrap();
        assert_eq!(
            (d.allowed, d.retry_after),
            (false, Duration::from_millis(300))
        );
        clock.advance(Duration::from_millis(300));
        assert!(store.apply(&key, TEN_PER_SECOND, 3).await.unwrap().allowed);
    }

    #[tokio::test]
    async fn impossible_costs_and_rates_are_configuration_errors() {
        let store = MemoryRateStore::new();
        let key = Namespace::new("t").unwrap().key("k").unwrap();
        let err = store.apply(&key, TEN_PER_SECOND, 6).await.unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::Config);
        let zero = Gcra {
            emission_interval: Duration::ZERO,
            burst: 1,
        };
        assert_eq!(
            store.apply(&key, zero, 1).await.unwrap_err().kind(),
            BackendErrorKind::Config
        );
    }

    #[tokio::test]
    async fn memory_stays_capped_under_millions_of_distinct_keys() {
        let clock = ManualClock::new();
        let store = MemoryRateStore::with_limits(clock.clock(), 10_000);
        let ns = Namespace::new("t").unwrap();
        for i in 0..1_000_000u32 {
            let key = ns.key(i.to_be_bytes()).unwrap();
            assert!(store.apply(&key, TEN_PER_SECOND, 1).await.unwrap().allowed);
            if i % 1_000 == 0 {
                clock.advance(Duration::from_millis(10));
            }
        }
        assert!(store.len() <= 10_000, "{} cells", store.len());
    }

    /// Attacker-chosen keys of the longest length: the store stays within its bytes, however
    /// many cells its count would allow, and each insert still examines a bounded number of
    /// cells.
    #[tokio::test]
    async fn long_keys_keep_the_store_within_its_bytes() {
        const MAX_BYTES: usize = 64 * 1024;
        let clock = ManualClock::new();
        let store = MemoryRateStore::builder()
            .clock(clock.clock())
            .max_cells(10_000)
            .max_bytes(MAX_BYTES)
            .build();
        let ns = Namespace::new("t").unwrap();
        // Short keys first, then long ones that must make room among them.
        for i in 0..400u32 {
            let key = ns.key(i.to_be_bytes()).unwrap();
            assert!(store.apply(&key, TEN_PER_SECOND, 1).await.unwrap().allowed);
        }
        let before = store.inner.cells.lock().examined;
        for i in 0..1_000u32 {
            let key = ns.key(format!("{i:0>900}")).unwrap();
            assert!(store.apply(&key, TEN_PER_SECOND, 1).await.unwrap().allowed);
            assert!(store.bytes() <= MAX_BYTES, "{} bytes", store.bytes());
        }
        let per_insert = (store.inner.cells.lock().examined - before) / 1_000;
        assert!(
            per_insert <= 8 * 8,
            "{per_insert} cells examined per insert"
        );
        let long_cell = ns.key(format!("{:0>900}", 0)).unwrap().as_bytes().len() + 128;
        assert!(
            store.len() >= MAX_BYTES / long_cell - 1,
            "the bound is used, not emptied: {} cells",
            store.len()
        );
    }

    /// A full store of cells that are all still draining: each insert of a new key examines
    /// a bounded number of cells, however many the store holds.
    #[tokio::test]
    async fn an_insert_into_a_full_store_examines_a_bounded_number_of_cells() {
        const CELLS: usize = 100_000;
        let clock = ManualClock::new();
        let store = MemoryRateStore::with_limits(clock.clock(), CELLS);
        let ns = Namespace::new("t").unwrap();
        let hour = Gcra {
            emission_interval: Duration::from_secs(3_600),
            burst: 1,
        };
        for i in 0..CELLS as u32 {
            let key = ns.key(i.to_be_bytes()).unwrap();
            assert!(store.apply(&key, hour, 1).await.unwrap().allowed);
        }
        assert_eq!(store.len(), CELLS);
        let before = store.inner.cells.lock().examined;
        for i in CELLS as u32..CELLS as u32 + 1_000 {
            let key = ns.key(i.to_be_bytes()).unwrap();
            assert!(store.apply(&key, hour, 1).await.unwrap().allowed);
        }
        let per_insert = (store.inner.cells.lock().examined - before) / 1_000;
        assert!(per_insert <= 8, "{per_insert} cells examined per insert");
        assert_eq!(store.len(), CELLS);
    }
}
