use std::sync::atomic::{AtomicU64, Ordering};

use crate::ShardId;
use crate::error::{ConfigError, ConfigErrorKind};
use crate::hash::ShardKey;
use crate::hash::key_hash;

use super::RingRouter;

/// Consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018).
///
/// A ring of virtual nodes where every shard accepts at most `⌈c × (load + 1) / n⌉` assignments
/// at once, `c > 1` being the balance factor: a key goes to the first shard clockwise from its
/// hash that is under the cap. Use it for live, short-lived assignments (connections, in-flight
/// requests, leases) where a hot key must spill over instead of overloading one shard. Each
/// [`acquire`](Self::acquire) returns a [`LoadGuard`] that releases the load when dropped.
///
/// ```
/// use headroom_shard::{BoundedLoadRouter, ShardId};
///
/// let router = BoundedLoadRouter::new(4, 1.25)?;
/// let guard = router.acquire("tenant:7");
/// assert!(guard.shard() < ShardId(4));
/// assert_eq!(router.load(guard.shard()), 1);
/// drop(guard);
/// assert_eq!(router.total_load(), 0);
/// # Ok::<(), headroom_shard::ConfigError>(())
/// ```
#[derive(Debug)]
pub struct BoundedLoadRouter {
    ring: RingRouter,
    shards: Vec<ShardId>,
    loads: Vec<AtomicU64>,
    total: AtomicU64,
    balance: f64,
}

impl BoundedLoadRouter {
    /// Virtual nodes per shard used by [`new`](Self::new).
    pub const DEFAULT_VNODES: u32 = 100;

    /// Shards `0..shards` with balance factor `balance` (> 1; 1.25 is the paper's example).
    pub fn new(shards: u32, balance: f64) -> Result<Self, ConfigError> {
        Self::with_ring(RingRouter::new(shards, Self::DEFAULT_VNODES)?, balance)
    }

    /// Bounded loads over an existing ring.
    pub fn with_ring(ring: RingRouter, balance: f64) -> Result<Self, ConfigError> {
        if !(balance.is_finite() && balance > 1.0) {
            return Err(ConfigError::new(
                ConfigErrorKind::InvalidWeight,
                format_args!("balance factor {balance} must be above 1"),
            ));
        }
        let shards = super::Router::shards(&ring);
        Ok(Self {
            loads: shards.iter().map(|_| AtomicU64::new(0)).collect(),
            shards,
            ring,
            total: AtomicU64::new(0),
            balance,
        })
    }

    /// The cap per shard when `total` assignments are live.
    pub fn capacity(&self, total: u64) -> u64 {
        (self.balance * total as f64 / self.shards.len() as f64).ceil() as u64
    }

    /// Assigns `key` to the first shard clockwise that is under the cap.
    pub fn acquire<K: ShardKey + ?Sized>(&self, key: &K) -> LoadGuard<'_> {
        let hash = key.with_key_bytes(key_hash);
        let total = self.total.fetch_add(1, Ordering::AcqRel) + 1;
        let cap = self.capacity(total).max(1);
        let start = self.ring.point_index(hash);
        // The caps add up to more than the live total, so some shard is under its cap; the
        // walk visits every point once and the final fallback only serves a racing release.
        for step in 0..self.ring.point_count() {
            let shard = self.ring.owner_at(start + step);
            let index = self.index(shard);
            let accepted = self.loads[index]
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |load| {
                    (load < cap).then_some(load + 1)
                })
                .is_ok();
            if accepted {
                return LoadGuard {
                    router: self,
                    index,
                };
            }
        }
        let index = self.index(self.ring.owner_at(start));
        self.loads[index].fetch_add(1, Ordering::AcqRel);
        LoadGuard {
            router: self,
            index,
        }
    }

    fn index(&self, shard: ShardId) -> usize {
        self.shards.binary_search(&shard).unwrap_or_default()
    }

    /// The live assignments of `shard` (0 for an unknown shard).
    pub fn load(&self, shard: ShardId) -> u64 {
        self.shards
            .binary_search(&shard)
            .map_or(0, |index| self.loads[index].load(Ordering::Acquire))
    }

    /// All live assignments.
    pub fn total_load(&self) -> u64 {
        self.total.load(Ordering::Acquire)
    }
}

/// A live assignment of a key to a shard; dropping it releases the load.
#[derive(Debug)]
#[must_use = "the assignment is released when the guard is dropped"]
pub struct LoadGuard<'a> {
    router: &'a BoundedLoadRouter,
    index: usize,
}

impl LoadGuard<'_> {
    /// The shard the key was assigned to.
    pub fn shard(&self) -> ShardId {
        self.router.shards[self.index]
    }
}

impl Drop for LoadGuard<'_> {
    fn drop(&mut self) {
        self.router.loads[self.index].fetch_sub(1, Ordering::AcqRel);
        self.router.total.fetch_sub(1, Ordering::AcqRel);
    }
}
