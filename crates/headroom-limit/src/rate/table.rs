//! The sharded, bounded map of GCRA cells behind the keyed limiters.

use std::borrow::Borrow;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crossbeam_utils::CachePadded;
use hashbrown::HashTable;
use parking_lot::RwLock;

/// The GCRA state a table keeps per key.
pub(crate) trait Cell {
    /// The state of a key never seen: full.
    fn fresh() -> Self;

    /// When the cell is full again (nanoseconds since the limiter's origin), read with the
    /// shard's write lock held.
    fn full_at(&mut self) -> u64;
}

/// One quota's theoretical arrival time, changed by compare-and-swap.
impl Cell for AtomicU64 {
    fn fresh() -> Self {
        AtomicU64::new(0)
    }

    fn full_at(&mut self) -> u64 {
        *self.get_mut()
    }
}

/// The default number of shards: 4 per available core, at least 16.
pub(crate) fn default_shards() -> usize {
    let cores = std::thread::available_parallelism().map_or(4, usize::from);
    (cores * 4).max(16)
}

/// Cells by key, spread over independently locked shards by a randomly seeded hash, each shard
/// holding at most its share of `max_keys`; see [`KeyedLimiter`](super::KeyedLimiter) for
/// how the cap is kept. Each shard's lock has a cache line of its own, so that threads checking
/// keys of different shards never write to a shared line.
#[derive(Debug)]
pub(crate) struct Table<K, C> {
    shards: Box<[LockedShard<K, C>]>,
    mask: usize,
    shard_cap: usize,
    sweep_every: u64,
    hasher: RandomState,
}

type LockedShard<K, C> = CachePadded<RwLock<Shard<K, C>>>;

#[derive(Debug)]
struct Shard<K, C> {
    cells: HashTable<(K, C)>,
    next_sweep: u64,
}

impl<K, C> Table<K, C> {
    /// `shards` is rounded up to a power of two, `max_keys` to a multiple of it.
    pub(crate) fn new(max_keys: usize, shards: usize, idle_sweep: Duration) -> Self {
        let shards = shards.clamp(1, 1 << 16).next_power_of_two();
        let shard_cap = max_keys.div_ceil(shards).max(1);
        Self {
            shards: (0..shards)
                .map(|_| {
                    CachePadded::new(RwLock::new(Shard {
                        cells: HashTable::new(),
                        next_sweep: 0,
                    }))
                })
                .collect(),
            mask: shards - 1,
            shard_cap,
            sweep_every: u64::try_from(idle_sweep.as_nanos()).unwrap_or(u64::MAX),
            hasher: RandomState::new(),
        }
    }

    /// The most keys held at once.
    pub(crate) fn max_keys(&self) -> usize {
        self.shard_cap * self.shards.len()
    }

    /// The number of keys held.
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.read().cells.len())
            .sum()
    }
}

impl<K: Hash + Eq, C: Cell> Table<K, C> {
    /// Runs `step` on `key`'s cell. A key not held is stepped on a fresh cell, which is kept
    /// only if `step` succeeds: refused keys take no memory.
    #[inline]
    pub(crate) fn apply<Q, R, E>(
        &self,
        key: &Q,
        now: u64,
        step: impl Fn(&C) -> Result<R, E>,
    ) -> Result<R, E>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let hash = self.hasher.hash_one(key);
        // The table uses the low bits to place entries and the top seven as tags; pick
        // the shard from bits in between.
        let shard = &self.shards[(hash >> 32) as usize & self.mask];
        let eq = |(k, _): &(K, C)| k.borrow() == key;
        if let Some((_, cell)) = shard.read().cells.find(hash, eq) {
            return step(cell);
        }
        let mut shard = shard.write();
        if let Some((_, cell)) = shard.cells.find(hash, eq) {
            return step(cell);
        }
        let cell = C::fresh();
        let stepped = step(&cell)?;
        if now >= shard.next_sweep || shard.cells.len() >= self.shard_cap {
            shard.sweep(now, self.sweep_every, &self.hasher);
        }
        if shard.cells.len() >= self.shard_cap {
            shard.evict_nearest_full(self.shard_cap - self.shard_cap / 8 - 1);
        }
        shard
            .cells
            .insert_unique(hash, (key.to_owned(), cell), |(k, _)| {
                self.hasher.hash_one(k)
            });
        Ok(stepped)
    }

    /// Drops every key whose cell is full again and returns how many keys remain.
    pub(crate) fn sweep(&self, now: u64) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                let mut shard = shard.write();
                shard.sweep(now, self.sweep_every, &self.hasher);
                shard.cells.len()
            })
            .sum()
    }
}

impl<K: Hash, C: Cell> Shard<K, C> {
    /// Drops the cells that are full again: they hold nothing an absent key does not.
    /// Gives memory back once the shard is mostly empty.
    fn sweep(&mut self, now: u64, every: u64, hasher: &RandomState) {
        self.cells.retain(|(_, cell)| cell.full_at() > now);
        self.next_sweep = now.saturating_add(every);
        if self.cells.capacity() > 4 * self.cells.len().max(16) {
            self.cells
                .shrink_to(self.cells.len(), |(k, _)| hasher.hash_one(k));
        }
    }

    /// Evicts the cells nearest to full until at most `keep` remain.
    fn evict_nearest_full(&mut self, keep: usize) {
        let excess = self.cells.len().saturating_sub(keep);
        if excess == 0 {
            return;
        }
        let mut full_at: Vec<u64> = self
            .cells
            .iter_mut()
            .map(|(_, cell)| cell.full_at())
            .collect();
        let (below, &mut threshold, _) = full_at.select_nth_unstable(excess - 1);
        // Cells full again at the same instant as the threshold's are evicted only as far as
        // needed: keys checked together would otherwise all go at once.
        let mut ties = excess - below.iter().filter(|&&at| at < threshold).count();
        self.cells.retain(|(_, cell)| {
            let at = cell.full_at();
            if at == threshold && ties > 0 {
                ties -= 1;
                return false;
            }
            at >= threshold
        });
    }
}
