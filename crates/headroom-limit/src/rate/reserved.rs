//! What an instance of a distributed limiter knows of each key without asking the store.

use std::collections::HashMap;

use parking_lot::Mutex;

/// Units reserved and not yet spent, and until when each key is known to be refused, in a
/// bounded sharded map.
#[derive(Debug)]
pub(crate) struct LocalState {
    shards: Box<[Mutex<HashMap<String, Entry>>]>,
    shard_cap: usize,
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Entry {
    pub(crate) units: u32,
    /// Units left in the store when these were reserved.
    pub(crate) store_remaining: u32,
    /// The quota with the fewest units left when these were reserved (its index in the tier).
    pub(crate) reserved_quota: u8,
    /// When the reserved units must no longer be spent (ns since the limiter's origin).
    pub(crate) expires: u64,
    /// Whether the store has refused this key.
    pub(crate) refused: bool,
    /// Until when a cost of 1 is refused (after the last refusal): the store's cells only ever
    /// move forward, so a refusal holds until then whatever the other instances do.
    pub(crate) blocked_until: u64,
    /// The quota that refused (its index in the tier).
    pub(crate) blocked_quota: u8,
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
    },
}

const LOCAL_SHARDS: usize = 16;

/// FNV-1a, 64 bits: a stable hash for spreading keys (over locks here, over cluster slots in
/// the store's keys), where no keyed hash is needed.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl LocalState {
    pub(crate) fn new(max_keys: usize) -> Self {
        Self {
            shards: (0..LOCAL_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            shard_cap: max_keys.div_ceil(LOCAL_SHARDS).max(1),
        }
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, Entry>> {
        // The maps inside use a keyed hash.
        &self.shards[(fnv1a(key.as_bytes()) % LOCAL_SHARDS as u64) as usize]
    }

    /// `interval` is the shortest emission interval of the tier's quotas.
    pub(crate) fn check(&self, key: &str, cost: u32, now: u64, interval: u64, batch: u32) -> Local {
        let mut shard = self.shard(key).lock();
        let Some(entry) = shard.get_mut(key) else {
            return Local::Unknown { saturated: false };
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
        // A cost of zero spends nothing: never refused.
        if entry.blocked_until > now && cost > 0 {
            return Local::Blocked {
                wait: entry.blocked_until - now,
                quota: usize::from(entry.blocked_quota),
            };
        }
        let recent = interval.saturating_mul(u64::from(batch));
        Local::Unknown {
            saturated: entry.refused && now < entry.blocked_until.saturating_add(recent),
        }
    }

    pub(crate) fn update(&self, key: &str, now: u64, change: impl FnOnce(&mut Entry)) {
        let mut shard = self.shard(key).lock();
        if shard.len() >= self.shard_cap && !shard.contains_key(key) {
            shard.retain(|_, e| (e.expires > now && e.units > 0) || e.blocked_until > now);
            if shard.len() >= self.shard_cap {
                // Forgetting reserved units or refusals only ever admits less or asks more.
                shard.clear();
            }
        }
        match shard.get_mut(key) {
            Some(entry) => change(entry),
            None => {
                let mut entry = Entry::default();
                change(&mut entry);
                shard.insert(key.to_owned(), entry);
            }
        }
    }
}
