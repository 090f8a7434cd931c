//! Write-behind for a headroom cache: the cache answers reads at once, the database gets the
//! writes in batches.

use std::borrow::Cow;

use bytes::Bytes;
use headroom_cache::{Cache, CacheError, CacheKey};
use headroom_core::jobs::JobStore;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Mutex;

use crate::{EnqueueError, Write, WriteBehind};

/// Why a write-behind cache write failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheWriteError {
    /// The durable write was refused (the backlog is full, or the store failed): nothing
    /// changed, neither in the cache nor for the writer.
    #[error("the write was not accepted")]
    Enqueue(#[from] EnqueueError),
    /// The value could not be encoded: nothing changed.
    #[error("the value could not be encoded")]
    Encode(#[from] serde_json::Error),
    /// The write is durable and will reach the writer, but the cache refused the value (an
    /// invalid key or a value too large for it): reads may answer the old value until the
    /// writer's write is loaded again.
    #[error("the write is durable but the cache refused it")]
    Cache(#[from] CacheError),
}

/// A [`Cache`] whose writes go to a [`WriteBehind`]: `insert` updates L1 and L2 at once and
/// records a durable write, which a [`Flusher`](crate::Flusher) hands to the writer, coalesced
/// per key per flush window.
///
/// Values are written as JSON; a writer reads them back with [`Write::json`].
///
/// A key's writes take turns in this process: each records its version and updates the
/// cache before the next begins, so the cache keeps the value of the latest version, the one
/// the writer keeps.
#[derive(Debug)]
pub struct WriteBehindCache<K, V, S> {
    cache: Cache<K, V>,
    writes: WriteBehind<S>,
    /// The turns, one per stripe of keys.
    turns: Box<[Mutex<()>]>,
}

/// Stripes of keys whose writes take turns: enough that unrelated keys rarely wait.
const TURN_STRIPES: usize = 64;

impl<K, V, S> WriteBehindCache<K, V, S>
where
    K: CacheKey,
    V: Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
    S: JobStore,
{
    /// `cache`, writing behind through `writes`.
    pub fn new(cache: Cache<K, V>, writes: WriteBehind<S>) -> Self {
        Self {
            cache,
            writes,
            turns: (0..TURN_STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// The cache, for reads.
    pub fn cache(&self) -> &Cache<K, V> {
        &self.cache
    }

    /// The write-behind, to start its flusher.
    pub fn writes(&self) -> &WriteBehind<S> {
        &self.writes
    }

    /// Records the write durably, then puts `value` in the cache; answers the write's version.
    /// An `Ok` is an acknowledged write: it reaches the writer even if this process dies next
    /// (with the Redis job store).
    pub async fn insert(&self, key: K, value: V) -> Result<u64, CacheWriteError> {
        let encoded = serde_json::to_vec(&value)?;
        let bytes = key_bytes(&key);
        let _turn = self.turn(&bytes).lock().await;
        let version = self.writes.put(bytes, encoded).await?;
        self.cache.insert(key, value).await?;
        Ok(version)
    }

    /// Records the delete durably, then removes `key` from the cache.
    pub async fn remove(&self, key: &K) -> Result<u64, CacheWriteError> {
        let bytes = key_bytes(key);
        let _turn = self.turn(&bytes).lock().await;
        let version = self.writes.delete(bytes).await?;
        self.cache.remove(key).await?;
        Ok(version)
    }

    fn turn(&self, key: &[u8]) -> &Mutex<()> {
        &self.turns[xxhash_rust::xxh3::xxh3_64(key) as usize % TURN_STRIPES]
    }
}

fn key_bytes<K: CacheKey>(key: &K) -> Bytes {
    match key.to_key_bytes() {
        Cow::Borrowed(bytes) => Bytes::copy_from_slice(bytes),
        Cow::Owned(bytes) => Bytes::from(bytes),
    }
}

impl Write {
    /// The value written by a [`WriteBehindCache`], decoded; `None` for a delete.
    pub fn json<V: DeserializeOwned>(&self) -> Option<Result<V, serde_json::Error>> {
        self.value
            .as_ref()
            .map(|bytes| serde_json::from_slice(bytes))
    }
}
