//! Write-behind for a headroom cache: the cache answers reads at once, the database gets the
//! writes in batches.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::join_all;
use headroom_breaker::CircuitBreaker;
use headroom_cache::{Cache, CacheConfig, CacheError, CacheKey};
use headroom_core::jobs::JobStore;
use headroom_core::{BackendError, BackendErrorKind, Classify, Clock};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Mutex;

use crate::write_behind::OnDead;
use crate::{EnqueueError, Flusher, Write, WriteBehind, Writer};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a write-behind cache write failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheWriteError {
    /// The durable write was refused (the backlog is full, or the job invalid): nothing
    /// changed, neither in the cache nor for the writer. Or the store failed
    /// ([`EnqueueError::Backend`]): the write may have been recorded all the same (a lost
    /// answer) and then reaches the writer, so the key was removed from the cache; if it was
    /// recorded, [`WriteBehindCache::get_or_load`] answers it until the writer has it.
    #[error("the write was not accepted")]
    Enqueue(#[from] EnqueueError),
    /// Writes of keys sharing this key's turns already wait up to their bound, behind a
    /// slow job store or cache: nothing changed; retry later.
    #[error("{waiting} writes already wait their turn for this key")]
    Busy {
        /// The writes waiting, this bound.
        waiting: usize,
    },
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
/// records a durable write, which a [`Flusher`] hands to the writer, coalesced per key per
/// flush window. Start the flusher with [`start`](Self::start), which also takes the writes
/// the writer refuses for good out of the cache.
///
/// Values are written as JSON; a writer reads them back with [`Write::json`]. Read through
/// [`get_or_load`](Self::get_or_load): on a miss, it answers a write the writer does not
/// have yet before it asks the source.
///
/// A key's writes take turns in this process: each records its version and updates the
/// cache before the next begins, so the cache keeps the value of the latest version, the one
/// the writer keeps. Across instances, each cache write carries its version, the microsecond
/// the write was recorded at (see [`Cache::insert_at`]): L2 keeps the write of the latest
/// version whichever instance's write reaches it last. Keys are spread over 256 stripes and the keys
/// of a stripe take turns together: a write waits for the earlier writes of its stripe, each a
/// job store call and a cache write. A write runs to its end in a task of its own, even when
/// its caller stops waiting for it. At most 64 writes of a stripe wait at once; past that, a
/// write is refused at once with [`CacheWriteError::Busy`], so that callers who give up on a
/// slow store cannot pile up writes without end.
pub struct WriteBehindCache<K, V, S> {
    cache: Cache<K, V>,
    writes: Arc<WriteBehind<S>>,
    /// The turns, one per stripe of keys.
    turns: Arc<[Arc<Turn>]>,
    /// Guards the loads' looks at the unwritten writes, as the cache's breaker guards L2: with
    /// the store out of reach, loads fail at once rather than each wait for its timeout.
    lookups: Arc<CircuitBreaker<()>>,
}

/// The turn of a stripe of keys, and how many writes wait for it or hold it.
#[derive(Default)]
struct Turn {
    lock: Mutex<()>,
    waiting: AtomicUsize,
}

/// Counts a write against its stripe's bound until it ends (or is dropped unrun).
struct Waiting(Arc<Turn>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<K, V, S> std::fmt::Debug for WriteBehindCache<K, V, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBehindCache")
            .field("cache", &self.cache)
            .field("writes", &self.writes)
            .finish_non_exhaustive()
    }
}

/// The stripes of keys whose writes take turns.
const TURN_STRIPES: usize = 256;

/// The most writes of one stripe waiting for (or holding) its turn.
const MAX_WAITING: usize = 64;

impl<K, V, S> WriteBehindCache<K, V, S>
where
    K: CacheKey,
    V: Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
    S: JobStore,
{
    /// `cache`, writing behind through `writes`.
    pub fn new(cache: Cache<K, V>, writes: WriteBehind<S>) -> Self {
        let lookups = Arc::new(lookup_breaker(cache.config(), writes.clock()));
        Self {
            cache,
            writes: Arc::new(writes),
            turns: (0..TURN_STRIPES).map(|_| Arc::default()).collect(),
            lookups,
        }
    }

    /// The cache, for reads.
    pub fn cache(&self) -> &Cache<K, V> {
        &self.cache
    }

    /// Reads `key` as [`Cache::get_or_load`] does, except that on a miss of both levels the
    /// key's newest write the writer does not have yet ([`WriteBehind::pending`]) is the
    /// value, and `loader` (the source the writer writes to) is asked only when there is
    /// none. This covers a write that did not reach L2 (Redis out of reach at that moment),
    /// an entry that left L2 before the flush (TTL, eviction) and a write whose enqueue
    /// answer was lost. A load first waits for this instance's writes under way in the key's
    /// stripe, so that one still on its way to the job store is found; across instances see
    /// the write-behind guarantees in `docs/jobs.md`. When the job store cannot be asked,
    /// the load fails (served stale, if the cache's fail-safe has a value), rather than risk
    /// loading the value a write replaced; after the cache's `l2_failure_threshold` such
    /// failures in a row, loads fail at once until a look after its `l2_cooldown` succeeds.
    ///
    /// Reads through [`cache`](Self::cache) do not look at the unwritten writes.
    pub async fn get_or_load<F, Fut, E>(&self, key: &K, loader: F) -> Result<Option<V>, CacheError>
    where
        F: FnOnce(K) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        let unwritten = self.unwritten();
        self.cache
            .get_or_load(key, move |key: K| async move {
                let bytes = key_bytes(&key);
                wait_for_writes_under_way(&unwritten.turns, [&bytes[..]]).await;
                if let Some(write) = unwritten.pending(&bytes).await? {
                    return value_of::<V>(&write);
                }
                let loaded = loader(key).await.map_err(Into::into)?;
                // A write of another instance may have landed during the load.
                match unwritten.pending(&bytes).await? {
                    Some(write) => value_of(&write),
                    None => Ok(loaded),
                }
            })
            .await
    }

    /// Reads `keys` as [`Cache::get_many_or_load`] does, except that the keys missing from
    /// both levels are looked up among the unwritten writes as
    /// [`get_or_load`](Self::get_or_load) does (one job store call per key, all at once, before
    /// and after the load), and `loader` gets only the keys that have none. When the job store
    /// cannot be asked for some key, the load fails.
    pub async fn get_many_or_load<F, Fut, E>(
        &self,
        keys: &[K],
        loader: F,
    ) -> Result<Vec<Option<V>>, CacheError>
    where
        F: FnOnce(Vec<K>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<HashMap<K, V>, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        let lookups = self.unwritten();
        self.cache
            .get_many_or_load(keys, move |missing: Vec<K>| async move {
                let bytes: Vec<Bytes> = missing.iter().map(key_bytes).collect();
                wait_for_writes_under_way(&lookups.turns, bytes.iter().map(|b| &b[..])).await;
                let mut found = HashMap::new();
                let unwritten = lookups.take_pending(missing, &mut found).await?;
                if unwritten.is_empty() {
                    return Ok::<_, BoxError>(found);
                }
                let mut loaded = loader(unwritten.clone()).await.map_err(Into::into)?;
                // Writes of other instances may have landed during the load.
                let mut landed = HashMap::new();
                let unwritten = lookups.take_pending(unwritten, &mut landed).await?;
                for key in unwritten {
                    if let Some(value) = loaded.remove(&key) {
                        found.insert(key, value);
                    }
                }
                found.extend(landed);
                Ok(found)
            })
            .await
    }

    /// What a load needs to look at the unwritten writes.
    fn unwritten(&self) -> Unwritten<S> {
        Unwritten {
            writes: Arc::clone(&self.writes),
            turns: Arc::clone(&self.turns),
            lookups: Arc::clone(&self.lookups),
        }
    }

    /// The write-behind, for its queue and its unwritten writes.
    pub fn writes(&self) -> &WriteBehind<S> {
        &self.writes
    }

    /// Starts handing the writes to `writer`, as [`WriteBehind::start`] does, and takes each
    /// write the writer refuses for good out of the cache: the database never gets it, so the
    /// key is removed, as of now, which also drops the copies that reads made of the write
    /// while it waited, or, while a later write of the key waits, as of the refused write's
    /// version ([`Cache::remove_at`]), so that in L2 that later write stays (when the job
    /// store cannot say, as of now: the later write is then read again, from the unwritten
    /// writes by [`get_or_load`](Self::get_or_load)). L1 copies of the
    /// key are dropped (here, and through the invalidation bus on the other instances) and
    /// read again. The removals run once the flusher's pass
    /// is finished, and a shutdown out of time cuts them short. A key whose
    /// [`CacheKey::from_key_bytes`] gives nothing back cannot be removed (a warning says so),
    /// and stays until its TTL; so does a refused write whose own cache write reaches L2
    /// after the removal (a slow L2 on the instance that made it).
    pub fn start<W: Writer>(&self, writer: W) -> Flusher {
        let (cache, writes) = (self.cache.clone(), Arc::clone(&self.writes));
        let on_dead: OnDead = Box::new(move |write: Write| {
            let (cache, writes) = (cache.clone(), Arc::clone(&writes));
            async move {
                let Some(key) = K::from_key_bytes(&write.key) else {
                    tracing::warn!(
                        cache = %cache.config().name,
                        "a write refused for good stays in the cache: its key cannot be read back from its bytes"
                    );
                    return;
                };
                // A read that answered the write while it waited cached it as of that read.
                // Unless a later write of the key waits, the database has every other write,
                // so the key goes as of now; otherwise as of the refused write, and the later
                // one stays.
                let later_waits = matches!(
                    writes.pending(&write.key).await,
                    Ok(Some(later)) if later.version > write.version
                );
                let removed = if later_waits {
                    cache.remove_at(&key, version_time(write.version)).await
                } else {
                    cache.remove(&key).await
                };
                if let Err(error) = removed {
                    tracing::warn!(%error, "a write refused for good could not be removed from the cache");
                }
            }
            .boxed()
        });
        self.writes.start_flusher(writer, Some(on_dead))
    }

    /// Records the write durably, then puts `value` in the cache; answers the write's version.
    /// An `Ok` is an acknowledged write: it reaches the writer even if this process dies next
    /// (with the Redis job store).
    pub async fn insert(&self, key: K, value: V) -> Result<u64, CacheWriteError> {
        let encoded = serde_json::to_vec(&value)?;
        let bytes = key_bytes(&key);
        let (writes, cache) = (Arc::clone(&self.writes), self.cache.clone());
        self.in_turn(&bytes.clone(), async move {
            let version = match writes.put(bytes, encoded).await {
                Ok(version) => version,
                Err(error) => return Err(forget_if_unknown(&cache, &key, error).await),
            };
            cache.insert_at(key, value, version_time(version)).await?;
            Ok(version)
        })
        .await
    }

    /// Records the delete durably, then removes `key` from the cache.
    pub async fn remove(&self, key: &K) -> Result<u64, CacheWriteError> {
        let bytes = key_bytes(key);
        let (writes, cache, key) = (Arc::clone(&self.writes), self.cache.clone(), key.clone());
        self.in_turn(&bytes.clone(), async move {
            let version = match writes.delete(bytes).await {
                Ok(version) => version,
                Err(error) => return Err(forget_if_unknown(&cache, &key, error).await),
            };
            cache.remove_at(&key, version_time(version)).await?;
            Ok(version)
        })
        .await
    }

    /// Runs `write` in its key's turn, in a task of its own: a caller that stops waiting
    /// leaves it to finish, so the cache and the writer still agree.
    async fn in_turn(
        &self,
        key: &[u8],
        write: impl Future<Output = Result<u64, CacheWriteError>> + Send + 'static,
    ) -> Result<u64, CacheWriteError> {
        let turn = turn_of(&self.turns, key);
        if turn.waiting.fetch_add(1, Ordering::AcqRel) >= MAX_WAITING {
            turn.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(CacheWriteError::Busy {
                waiting: MAX_WAITING,
            });
        }
        let waiting = Waiting(Arc::clone(turn));
        let task = tokio::spawn(async move {
            let _turn = waiting.0.lock.lock().await;
            write.await
        });
        match task.await {
            Ok(written) => written,
            Err(failed) => match failed.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                // Cancelled: the runtime is shutting down, and drops this caller too.
                Err(_) => std::future::pending().await,
            },
        }
    }
}

/// The stripe of `key`, whose writes take turns together.
fn stripe_of(key: &[u8]) -> usize {
    xxhash_rust::xxh3::xxh3_64(key) as usize % TURN_STRIPES
}

/// The turn of `key`'s stripe.
fn turn_of<'t>(turns: &'t [Arc<Turn>], key: &[u8]) -> &'t Arc<Turn> {
    &turns[stripe_of(key)]
}

/// Waits until the writes of `keys`' stripes under way in this instance now have ended, so
/// that a load's look finds them: a write that begins later is versioned after the load,
/// and its cache write wins over the load's.
async fn wait_for_writes_under_way<'k>(
    turns: &[Arc<Turn>],
    keys: impl IntoIterator<Item = &'k [u8]>,
) {
    let mut stripes: Vec<usize> = keys.into_iter().map(stripe_of).collect();
    stripes.sort_unstable();
    stripes.dedup();
    for stripe in stripes {
        drop(turns[stripe].lock.lock().await);
    }
}

/// The value a write leaves: `None` for a delete.
fn value_of<V: DeserializeOwned>(write: &Write) -> Result<Option<V>, BoxError> {
    Ok(write.json().transpose()?)
}

/// A load's view of the unwritten writes: the write-behind, this instance's turns and the
/// breaker guarding the looks.
struct Unwritten<S> {
    writes: Arc<WriteBehind<S>>,
    turns: Arc<[Arc<Turn>]>,
    lookups: Arc<CircuitBreaker<()>>,
}

impl<S: JobStore> Unwritten<S> {
    /// [`WriteBehind::pending`] under the breaker.
    async fn pending(&self, key: &[u8]) -> Result<Option<Write>, BackendError> {
        self.guarded(self.writes.pending(key)).await
    }

    /// Runs `looks` under the breaker as one call (a batch's looks count once).
    async fn guarded<T>(
        &self,
        looks: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        let Ok(permit) = self.lookups.try_acquire() else {
            return Err(BackendError::with_detail(
                BackendErrorKind::Unavailable,
                "the job store keeps failing: unwritten writes are not looked up for a while",
            ));
        };
        let answer = looks.await;
        match &answer {
            Ok(_) => permit.success(),
            // Corrupt data says nothing of the store's health.
            Err(error) if error.is_retryable() => permit.failure(),
            Err(_) => permit.ignore(),
        }
        answer
    }

    /// Moves the values of the `keys` that have an unwritten write into `found` (a delete's
    /// key stays out: not found), and answers the other keys.
    async fn take_pending<K, V>(
        &self,
        keys: Vec<K>,
        found: &mut HashMap<K, V>,
    ) -> Result<Vec<K>, BoxError>
    where
        K: CacheKey,
        V: DeserializeOwned,
    {
        let looks = join_all(keys.iter().map(|key| {
            let bytes = key_bytes(key);
            async move { self.writes.pending(&bytes).await }
        }));
        let pending = self
            .guarded(async { looks.await.into_iter().collect::<Result<Vec<_>, _>>() })
            .await?;
        let mut without = Vec::new();
        for (key, pending) in keys.into_iter().zip(pending) {
            match pending {
                Some(write) => {
                    if let Some(value) = value_of(&write)? {
                        found.insert(key, value);
                    }
                }
                None => without.push(key),
            }
        }
        Ok(without)
    }
}

/// The breaker of the loads' looks at the unwritten writes, with the settings of the cache's
/// L2 breaker (validated when the cache has L2; settings that do not build give the cache's
/// defaults).
fn lookup_breaker(config: &CacheConfig, clock: Clock) -> CircuitBreaker<()> {
    let build = |failures, cooldown| {
        CircuitBreaker::builder()
            .name(format!("write-behind-lookups:{}", config.name))
            .clock(clock.clone())
            .open_after_failures_in_a_row(failures, cooldown)
            // A look cut off (by the cache's loader timeout) waited as long as a failure.
            .count_cancelled(true)
            .build()
    };
    let (failure_threshold, cooldown) = (config.l2_failure_threshold, config.l2_cooldown);
    build(failure_threshold, cooldown)
        .or_else(|_| build(5, Duration::from_secs(5)))
        .unwrap_or_else(|_| unreachable!("the default settings are valid"))
}

/// A failed enqueue, first removing `key` from the cache when the store failed: the write
/// may have been recorded all the same (its answer lost), and would then reach the writer, so
/// the value it replaces must not be answered on.
async fn forget_if_unknown<K, V>(
    cache: &Cache<K, V>,
    key: &K,
    error: EnqueueError,
) -> CacheWriteError
where
    K: CacheKey,
    V: Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    if matches!(error, EnqueueError::Backend(_))
        && let Err(removal) = cache.remove(key).await
    {
        tracing::warn!(error = %removal, "a write of unknown outcome could not be removed from the cache");
    }
    CacheWriteError::Enqueue(error)
}

/// The time of a write's version (Unix microseconds), by which L2 orders it.
fn version_time(version: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(version)
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
