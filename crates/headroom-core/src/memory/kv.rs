use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::kv::{KvEntry, KvStore, VersionAt, check_versions, is_newer};
use crate::{BackendError, BackendErrorKind, Clock, Key};

const SHARDS: usize = 16;
/// Stale slots the eviction order may hold beyond twice the live entries before it is compacted.
const ORDER_SLACK: usize = 16;
/// Bytes an entry costs besides its key and value: its map slot, the key's allocation and its
/// place in the eviction order. Counted, so that empty values cannot hold unbounded memory.
const ENTRY_OVERHEAD: usize = 128;

/// An in-memory [`KvStore`]: a sharded map with per-entry expiry, bounded in entries and in
/// bytes (keys plus values).
///
/// When a shard is over either bound, a write evicts the entries of that shard written first
/// (first in, first out; an overwrite keeps the key's place), in O(1) amortized time: each shard
/// keeps its keys in write order. Expired entries are never returned; they are dropped when
/// read, deleted, evicted or overwritten.
///
/// ```
/// # tokio_test_block_on(async {
/// use std::time::Duration;
/// use headroom_core::{kv::KvStore, memory::MemoryKvStore, Namespace};
///
/// let store = MemoryKvStore::new();
/// let key = Namespace::new("app")?.key("user:1")?;
/// store.set(&key, "Ada".into(), Duration::from_secs(60)).await?;
/// assert_eq!(store.get(&key).await?.as_deref(), Some(&b"Ada"[..]));
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct MemoryKvStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    clock: Clock,
    max_entries_per_shard: usize,
    max_bytes_per_shard: usize,
    max_value_len: usize,
}

#[derive(Debug, Default)]
struct Shard {
    map: HashMap<Bytes, Entry>,
    /// Keys in the order they were first written, with the number of that write; a slot whose
    /// key is gone or was written anew since (another number) is stale and skipped.
    order: VecDeque<(Bytes, u64)>,
    /// Key and value bytes held, with `ENTRY_OVERHEAD` for each entry.
    bytes: usize,
    writes: u64,
}

#[derive(Debug)]
struct Entry {
    value: Bytes,
    expires_at: Instant,
    /// The write that put the key in the map (its place in `order`).
    number: u64,
}

impl Shard {
    fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let entry = self.map.remove(key)?;
        self.bytes -= key.len() + entry.value.len() + ENTRY_OVERHEAD;
        Some(entry)
    }

    /// Writes `key`, then evicts the oldest other entries while over a bound.
    fn insert(&mut self, key: &Key, value: Bytes, expires_at: Instant, bounds: (usize, usize)) {
        let key_bytes = key.as_bytes();
        let added = key_bytes.len() + value.len() + ENTRY_OVERHEAD;
        if let Some(entry) = self.map.get_mut(key_bytes) {
            self.bytes = self.bytes - entry.value.len() + value.len();
            entry.value = value;
            entry.expires_at = expires_at;
        } else {
            self.writes += 1;
            let number = self.writes;
            let key_bytes = key.to_bytes();
            self.map.insert(
                key_bytes.clone(),
                Entry {
                    value,
                    expires_at,
                    number,
                },
            );
            self.bytes += added;
            self.order.push_back((key_bytes, number));
            if self.order.len() > 2 * self.map.len() + ORDER_SLACK {
                let map = &self.map;
                self.order
                    .retain(|(key, number)| map.get(key).is_some_and(|e| e.number == *number));
            }
        }
        let (max_entries, max_bytes) = bounds;
        while (self.map.len() > max_entries || self.bytes > max_bytes) && self.map.len() > 1 {
            let Some((oldest, number)) = self.order.pop_front() else {
                break;
            };
            if oldest == key_bytes {
                // Never evict the entry just written: it goes to the back.
                self.order.push_back((oldest, number));
                continue;
            }
            if self.map.get(&oldest).is_some_and(|e| e.number == number) {
                self.remove(&oldest);
            }
        }
    }
}

/// Builds a [`MemoryKvStore`].
#[derive(Clone, Debug)]
#[must_use]
pub struct MemoryKvStoreBuilder {
    clock: Clock,
    max_entries: usize,
    max_bytes: usize,
    max_value_len: usize,
}

impl MemoryKvStoreBuilder {
    /// The clock that decides expiry (default: [`Clock::system`]).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The most entries held at once (default 1,000,000). Rounded up to a multiple of the
    /// number of internal shards.
    pub fn max_entries(mut self, max_entries: usize) -> Self {
        self.max_entries = max_entries.max(1);
        self
    }

    /// The largest value accepted, in bytes (default 16 MiB), and at most a shard's share of
    /// [`max_bytes`](Self::max_bytes), so that values held one per shard cannot add up past
    /// it.
    pub fn max_value_len(mut self, max_value_len: usize) -> Self {
        self.max_value_len = max_value_len;
        self
    }

    /// The most bytes held at once (default 1 GiB): keys, values and 128 bytes for each
    /// entry's bookkeeping, so that empty values count too. Split evenly among the internal
    /// shards (16); a value larger than a shard's share is refused as too large.
    pub fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes.max(1);
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryKvStore {
        let max_bytes_per_shard = self.max_bytes.div_ceil(SHARDS);
        MemoryKvStore {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
                hasher: RandomState::new(),
                clock: self.clock,
                max_entries_per_shard: self.max_entries.div_ceil(SHARDS),
                max_bytes_per_shard,
                max_value_len: self.max_value_len.min(max_bytes_per_shard),
            }),
        }
    }
}

impl MemoryKvStore {
    /// A store with default limits on the system clock.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Starts building a store.
    pub fn builder() -> MemoryKvStoreBuilder {
        MemoryKvStoreBuilder {
            clock: Clock::system(),
            max_entries: 1_000_000,
            max_bytes: 1 << 30,
            max_value_len: 16 * 1024 * 1024,
        }
    }

    /// The number of entries held, expired ones not yet dropped included.
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|s| s.lock().map.len()).sum()
    }

    /// The bytes held (keys, values and 128 for each entry), expired entries not yet dropped
    /// included.
    pub fn bytes(&self) -> usize {
        self.inner.shards.iter().map(|s| s.lock().bytes).sum()
    }

    #[cfg(test)]
    fn order_len(&self) -> usize {
        self.inner.shards.iter().map(|s| s.lock().order.len()).sum()
    }

    /// Whether the store holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &[u8]) -> &Mutex<Shard> {
        let index = self.inner.hasher.hash_one(key) as usize % SHARDS;
        &self.inner.shards[index]
    }

    fn read(&self, key: &Key, now: Instant) -> Option<Bytes> {
        let mut shard = self.shard(key.as_bytes()).lock();
        match shard.map.get(key.as_bytes()) {
            Some(entry) if entry.expires_at > now => Some(entry.value.clone()),
            Some(_) => {
                shard.remove(key.as_bytes());
                None
            }
            None => None,
        }
    }

    fn check(&self, value: &Bytes, ttl: Duration) -> Result<(), BackendError> {
        crate::lasting(ttl)?;
        if value.len() > self.inner.max_value_len {
            return Err(BackendError::with_detail(
                BackendErrorKind::TooLarge,
                format!(
                    "value of {} bytes exceeds the limit of {} bytes",
                    value.len(),
                    self.inner.max_value_len
                ),
            ));
        }
        Ok(())
    }

    fn write(&self, key: &Key, value: Bytes, ttl: Duration, now: Instant) {
        self.write_if(key, value, ttl, now, |_| true);
    }

    /// Writes unless `replace` refuses what the key holds (a live value or `None`).
    fn write_if(
        &self,
        key: &Key,
        value: Bytes,
        ttl: Duration,
        now: Instant,
        replace: impl FnOnce(Option<&[u8]>) -> bool,
    ) -> bool {
        let mut shard = self.shard(key.as_bytes()).lock();
        let live = match shard.map.get(key.as_bytes()) {
            Some(entry) if entry.expires_at <= now => {
                // An expired entry is gone: the write is a new entry.
                shard.remove(key.as_bytes());
                None
            }
            Some(entry) => Some(&entry.value[..]),
            None => None,
        };
        if !replace(live) {
            return false;
        }
        let expires_at = now
            .checked_add(ttl)
            .unwrap_or(now + Duration::from_secs(u32::MAX.into()));
        let bounds = (
            self.inner.max_entries_per_shard,
            self.inner.max_bytes_per_shard,
        );
        shard.insert(key, value, expires_at, bounds);
        true
    }
}

impl Default for MemoryKvStore {
    fn default() -> Self {
        Self::new()
    }
}

impl KvStore for MemoryKvStore {
    async fn get(&self, key: &Key) -> Result<Option<Bytes>, BackendError> {
        Ok(self.read(key, self.inner.clock.now()))
    }

    async fn get_many(&self, keys: &[Key]) -> Result<Vec<Option<Bytes>>, BackendError> {
        let now = self.inner.clock.now();
        Ok(keys.iter().map(|key| self.read(key, now)).collect())
    }

    async fn set(&self, key: &Key, value: Bytes, ttl: Duration) -> Result<(), BackendError> {
        self.check(&value, ttl)?;
        self.write(key, value, ttl, self.inner.clock.now());
        Ok(())
    }

    async fn set_many(&self, entries: &[KvEntry]) -> Result<(), BackendError> {
        for entry in entries {
            self.check(&entry.value, entry.ttl)?;
        }
        let now = self.inner.clock.now();
        for entry in entries {
            self.write(&entry.key, entry.value.clone(), entry.ttl, now);
        }
        Ok(())
    }

    async fn delete(&self, keys: &[Key]) -> Result<u64, BackendError> {
        let now = self.inner.clock.now();
        let mut existed = 0;
        for key in keys {
            let removed = self.shard(key.as_bytes()).lock().remove(key.as_bytes());
            if removed.is_some_and(|entry| entry.expires_at > now) {
                existed += 1;
            }
        }
        Ok(existed)
    }

    async fn set_if_newer(
        &self,
        entries: &[KvEntry],
        version: VersionAt,
    ) -> Result<u64, BackendError> {
        for entry in entries {
            self.check(&entry.value, entry.ttl)?;
        }
        check_versions(entries, version)?;
        let now = self.inner.clock.now();
        let mut written = 0;
        for entry in entries {
            let newer = |held: Option<&[u8]>| is_newer(&entry.value, held, version);
            if self.write_if(&entry.key, entry.value.clone(), entry.ttl, now, newer) {
                written += 1;
            }
        }
        Ok(written)
    }

    async fn delete_if_eq(&self, key: &Key, expected: &[u8]) -> Result<bool, BackendError> {
        let now = self.inner.clock.now();
        let mut shard = self.shard(key.as_bytes()).lock();
        let held = shard
            .map
            .get(key.as_bytes())
            .is_some_and(|entry| entry.expires_at > now && entry.value[..] == *expected);
        if held {
            shard.remove(key.as_bytes());
        }
        Ok(held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ManualClock, Namespace};

    #[tokio::test]
    async fn entry_count_stays_bounded_under_many_distinct_keys() {
        let store = MemoryKvStore::builder().max_entries(1_600).build();
        let ns = Namespace::new("t").unwrap();
        for i in 0..50_000u32 {
            let key = ns.key(i.to_be_bytes()).unwrap();
            store
                .set(&key, Bytes::from_static(b"v"), Duration::from_secs(60))
                .await
                .unwrap();
        }
        assert!(store.len() <= 1_600, "len {}", store.len());
    }

    /// Entries with nothing in them still cost the store memory: the bound counts them, so
    /// attacker-chosen empty values cannot hold more than it allows.
    #[tokio::test]
    async fn empty_values_count_against_the_byte_bound() {
        let store = MemoryKvStore::builder()
            .max_entries(usize::MAX)
            .max_bytes(1 << 20)
            .build();
        let ns = Namespace::new("t").unwrap();
        for i in 0..100_000u32 {
            let key = ns.key(i.to_be_bytes()).unwrap();
            store
                .set(&key, Bytes::new(), Duration::from_secs(60))
                .await
                .unwrap();
        }
        let held = store.len() * (ns.key([0u8; 4]).unwrap().as_bytes().len() + ENTRY_OVERHEAD);
        assert!(held <= (1 << 20) + SHARDS * 256, "{} entries", store.len());
        assert!(store.bytes() <= 1 << 20, "{} bytes", store.bytes());
    }

    #[tokio::test]
    async fn held_bytes_stay_bounded() {
        let store = MemoryKvStore::builder().max_bytes(160 * 1024).build();
        let ns = Namespace::new("t").unwrap();
        let value = Bytes::from(vec![0u8; 1_024]);
        for i in 0..5_000u32 {
            let key = ns.key(i.to_be_bytes()).unwrap();
            store
                .set(&key, value.clone(), Duration::from_secs(60))
                .await
                .unwrap();
        }
        assert!(store.bytes() <= 160 * 1024, "{} bytes held", store.bytes());
        assert!(store.len() > 100, "{} entries", store.len());
        // A value larger than a shard's share of the bound is refused.
        let big = ns.key("big").unwrap();
        let refused = store
            .set(
                &big,
                Bytes::from(vec![1u8; 64 * 1024]),
                Duration::from_secs(60),
            )
            .await
            .unwrap_err();
        assert_eq!(refused.kind(), crate::BackendErrorKind::TooLarge);
    }

    #[tokio::test]
    async fn overwrites_and_deletes_keep_the_eviction_order_bounded() {
        let store = MemoryKvStore::builder().max_entries(SHARDS * 4).build();
        let ns = Namespace::new("t").unwrap();
        let key = ns.key("k").unwrap();
        for _ in 0..10_000 {
            store
                .set(&key, "v".into(), Duration::from_secs(60))
                .await
                .unwrap();
            store.delete(std::slice::from_ref(&key)).await.unwrap();
        }
        assert!(
            store.order_len() <= 2 * SHARDS * 4 + SHARDS,
            "{}",
            store.order_len()
        );
    }

    /// Values each larger than a shard's share of the byte bound cannot add up past it, one
    /// per shard: a value too large for a share is refused with a typed error.
    #[tokio::test]
    async fn values_larger_than_a_share_cannot_hold_more_than_the_byte_bound() {
        let store = MemoryKvStore::builder().max_bytes(1 << 20).build();
        let ns = Namespace::new("t").unwrap();
        let large = Bytes::from(vec![0u8; 512 * 1024]);
        for i in 0..200u32 {
            let key = ns.key(i.to_be_bytes()).unwrap();
            if let Err(error) = store
                .set(&key, large.clone(), Duration::from_secs(60))
                .await
            {
                assert_eq!(error.kind(), crate::BackendErrorKind::TooLarge);
            }
        }
        assert!(
            store.bytes() <= (1 << 20) + (1 << 16),
            "{} bytes",
            store.bytes()
        );
    }

    #[tokio::test]
    async fn a_full_shard_drops_its_oldest_entry_not_the_one_just_written() {
        let manual = ManualClock::new();
        let store = MemoryKvStore::builder()
            .max_entries(SHARDS)
            .clock(manual.clock())
            .build();
        let ns = Namespace::new("t").unwrap();
        let keys: Vec<Key> = (0..200u32)
            .map(|i| ns.key(i.to_be_bytes()).unwrap())
            .collect();
        // Find two keys of one shard, the shard holding one entry: writing the second drops
        // the first, the oldest (expired here), never the one just written.
        let first = &keys[0];
        let same_shard = keys[1..]
            .iter()
            .find(|k| std::ptr::eq(store.shard(k.as_bytes()), store.shard(first.as_bytes())))
            .expect("two keys share a shard");
        store
            .set(first, "short".into(), Duration::from_secs(1))
            .await
            .unwrap();
        manual.advance(Duration::from_secs(2));
        store
            .set(same_shard, "long".into(), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(
            store.get(same_shard).await.unwrap().as_deref(),
            Some(&b"long"[..])
        );
        assert_eq!(store.get(first).await.unwrap(), None);
    }
}
