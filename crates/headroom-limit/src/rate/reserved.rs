//! What an instance of a distributed limiter knows of each key without asking the store.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};

use hashbrown::HashTable;
use parking_lot::Mutex;

use super::cells::TierKey;

/// Units reserved and not yet spent, and until when each key is known to be refused, in a
/// bounded sharded map.
///
/// Keys come from requests, so they are held as a tier's cells hold them ([`TierKey`]: a
/// fixed 48 bytes, a long key as a digest under a random seed), which keeps the map's bytes
/// bounded by its key cap, and placed in shards by a randomly seeded hash: with a hash a
/// sender could compute, keys aimed at one shard would fill it with a sixteenth of the cap
/// and clear the units other keys reserved there.
#[derive(Debug)]
pub(crate) struct LocalState {
    shards: Box<[Shard]>,
    shard_cap: usize,
    /// The seed of long keys' digests.
    seed: RandomState,
    /// Places held keys in shards and in their tables.
    hasher: RandomState,
    /// Keys held in every shard, changed under the shard's lock: with none (exact mode with
    /// no refusal), a check neither hashes nor locks.
    held: AtomicUsize,
}

type Shard = Mutex<HashTable<(TierKey, Entry)>>;

/// The longest an instance answers a refusal itself (ns), without asking the store: the
/// refusal's wait when shorter. Remembering refusals keeps a refused flood off the store (one
/// round trip a second per key and instance at most); the bound is how long a cell deleted or
/// lost (a key reset, a store restarted without its data) goes unnoticed, whatever the wait
/// it gave.
pub(crate) const REFUSAL_MEMORY_NS: u64 = 1_000_000_000;

// The documented 256 bytes per key rest on this: 89 bytes a slot with its control byte, at
// most 16/7 slots per key.
const _: () = assert!(size_of::<(TierKey, Entry)>() == 88);

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Entry {
    pub(crate) units: u32,
    /// The units these started with: those reserved, with the cost of the request that
    /// reserved them. What was spent of them sizes the next batch.
    pub(crate) reserved: u32,
    /// Units left in the store when these were reserved.
    pub(crate) store_remaining: u32,
    /// The quota with the fewest units left when these were reserved (its index in the tier).
    pub(crate) reserved_quota: u8,
    /// When the reserved units must no longer be spent (ns since the limiter's origin).
    pub(crate) expires: u64,
    /// Whether the store has refused this key.
    pub(crate) refused: bool,
    /// Until when a cost of 1 is refused (after the last refusal): the store's cells only ever
    /// move forward, so a refusal holds until then whatever the other instances do, as long
    /// as the cell is not deleted or lost.
    pub(crate) blocked_until: u64,
    /// Until when the refusal is answered here without asking the store: at most
    /// `blocked_until`, and a bounded time after the refusal, so a cell deleted or lost
    /// (or one holding an absurd time, whose wait saturates) is not refused for ever.
    pub(crate) answered_until: u64,
    /// The quota that refused (its index in the tier).
    pub(crate) blocked_quota: u8,
    /// A batch for this key is on its way from the store: requests meanwhile ask for their
    /// cost alone rather than each reserve a batch. Cleared by the next answer recorded here.
    pub(crate) reserving: bool,
}

/// What the local state says about a request.
pub(crate) enum Local {
    /// Spent from reserved units: units left here and in the store, and the quota they were
    /// reserved under that had the fewest left.
    Spent {
        units: u32,
        store_remaining: u32,
        quota: usize,
    },
    /// A cost of 1 is refused by `quota` for this much longer.
    Blocked { wait: u64, quota: usize },
    /// Ask the store.
    Unknown {
        /// The store refused this key within the last `batch` intervals: the key is
        /// saturated, and a batch would be refused and retried with what is left.
        saturated: bool,
        /// The units to reserve, the request's cost included (see [`batch_size`]).
        batch: u32,
        /// The `blocked_until` of a refusal no longer answered here though its wait has not
        /// run out: should the store admit a unit now, the refusal's cell was deleted or lost.
        outlived: Option<u64>,
    },
}

/// The units to reserve for a key at `now` (the request's `cost` included, at most `batch`),
/// from its last reservation: what it started with (`reserved`), has left and holds until.
/// Twice as many when they ran out while held, as many as were spent when they lapsed, and
/// just the cost for a key with none; so a key is charged what it uses, where a whole batch
/// per hold would charge a key used at a fraction of its quota the quota's whole rate, and a
/// key asked for once per hold is charged its cost alone.
pub(crate) fn batch_size(last: Option<&Entry>, cost: u32, batch: u32, now: u64) -> u32 {
    let size = match last {
        Some(last) if last.expires > now => last.reserved.saturating_mul(2),
        Some(last) => last.reserved.saturating_sub(last.units),
        None => 0,
    };
    size.max(cost).min(batch)
}

const LOCAL_SHARDS: usize = 16;

/// FNV-1a, 64 bits: a stable hash for the store's keys (cluster slots, quota parts), on which
/// every instance must agree. Anyone can compute it, so it never places keys in memory.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl LocalState {
    pub(crate) fn new(max_keys: usize) -> Self {
        Self {
            shards: (0..LOCAL_SHARDS)
                .map(|_| Mutex::new(HashTable::new()))
                .collect(),
            shard_cap: max_keys.div_ceil(LOCAL_SHARDS).max(1),
            seed: RandomState::new(),
            hasher: RandomState::new(),
            held: AtomicUsize::new(0),
        }
    }

    /// `key` as held, its hash, and its shard.
    fn place(&self, key: &str) -> (TierKey, u64, &Shard) {
        let key = TierKey::new(key, &self.seed);
        let hash = self.hasher.hash_one(key);
        // The tables use the low bits to place entries and the top seven as tags; pick the
        // shard from bits in between.
        let shard = &self.shards[(hash >> 32) as usize % LOCAL_SHARDS];
        (key, hash, shard)
    }

    /// `interval` is the shortest emission interval of the tier's quotas.
    pub(crate) fn check(&self, key: &str, cost: u32, now: u64, interval: u64, batch: u32) -> Local {
        let fresh = Local::Unknown {
            saturated: false,
            batch: batch_size(None, cost, batch, now),
            outlived: None,
        };
        if self.held.load(Ordering::Relaxed) == 0 {
            return fresh;
        }
        let (key, hash, shard) = self.place(key);
        let mut shard = shard.lock();
        let Some((_, entry)) = shard.find_mut(hash, |(k, _)| *k == key) else {
            return fresh;
        };
        // Reserved units are already charged in the store: spend them even when the store
        // refuses more.
        if entry.expires > now && entry.units >= cost {
            entry.units -= cost;
            return Local::Spent {
                units: entry.units,
                store_remaining: entry.store_remaining,
                quota: usize::from(entry.reserved_quota),
            };
        }
        // A cost of zero spends nothing: never refused. Past `answered_until`, the store is
        // asked again: only it knows whether the refusing cell is still there.
        if entry.answered_until > now && cost > 0 {
            return Local::Blocked {
                wait: entry.blocked_until.saturating_sub(now),
                quota: usize::from(entry.blocked_quota),
            };
        }
        let outlived = (entry.refused && entry.blocked_until > now).then_some(entry.blocked_until);
        if outlived.is_some() && cost > 0 {
            // This request asks the store again; the others answer from the refusal until it
            // has (its answer replaces or forgets the refusal), not one round trip each.
            entry.answered_until = now
                .saturating_add(REFUSAL_MEMORY_NS)
                .min(entry.blocked_until);
        }
        let recent = interval.saturating_mul(u64::from(batch));
        let mut size = batch_size(Some(entry), cost, batch, now);
        if entry.reserving {
            size = cost;
        } else if size > cost && cost > 0 {
            entry.reserving = true;
        }
        Local::Unknown {
            saturated: entry.refused && now < entry.blocked_until.saturating_add(recent),
            batch: size,
            outlived,
        }
    }

    /// Forgets the refusal of `key` that held until `blocked_until`, which the store has
    /// since admitted past; a later refusal recorded meanwhile is kept.
    pub(crate) fn forget_refusal(&self, key: &str, blocked_until: u64) {
        if self.held.load(Ordering::Relaxed) == 0 {
            return;
        }
        let (key, hash, shard) = self.place(key);
        let mut shard = shard.lock();
        if let Some((_, entry)) = shard.find_mut(hash, |(k, _)| *k == key)
            && entry.refused
            && entry.blocked_until == blocked_until
        {
            entry.refused = false;
            entry.blocked_until = 0;
            entry.answered_until = 0;
        }
    }

    pub(crate) fn update(&self, key: &str, now: u64, change: impl FnOnce(&mut Entry)) {
        let (key, hash, shard) = self.place(key);
        let mut shard = shard.lock();
        let held = |(k, _): &(TierKey, Entry)| *k == key;
        if shard.len() >= self.shard_cap && shard.find(hash, held).is_none() {
            let before = shard.len();
            shard.retain(|(_, e)| (e.expires > now && e.units > 0) || e.blocked_until > now);
            if shard.len() >= self.shard_cap {
                // Forgetting reserved units or refusals only ever admits less or asks more.
                shard.clear();
            }
            self.held.fetch_sub(before - shard.len(), Ordering::Relaxed);
        }
        match shard.find_mut(hash, held) {
            Some((_, entry)) => change(entry),
            None => {
                let mut entry = Entry::default();
                change(&mut entry);
                shard.insert_unique(hash, (key, entry), |(k, _)| self.hasher.hash_one(k));
                self.held.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
