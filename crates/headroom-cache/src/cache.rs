use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared, join_all};
use headroom_core::bus::{DynInvalidationBus, Subscription};
use headroom_core::kv::KvEntry;
use headroom_core::{Clock, Key};
use moka::ops::compute::Op;
use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::codec::ValueCodec;
use crate::config::{CacheConfig, TtlConfig};
use crate::envelope::{self, Times};
use crate::error::{CacheError, CacheErrorKind, ConfigError};
use crate::hides::{ClearRead, Heard, Hide, Hides, MAX_HIDDEN_TAGS, Unsure, Wall};
use crate::invalidation::{Invalidation, InvalidationConfig, Local, ShutdownGroup};
use crate::key::CacheKey;
use crate::l2::L2;
use crate::lock::{Claim, FleetLock, LockGuard};
use crate::metrics::Metrics;
use crate::{CacheBuilder, TtlFn};

/// Stripes of the write counters that tell a load whether its key was written meanwhile.
const WRITE_STRIPES: usize = 256;
/// The first wait before a hide that did not reach L2 is written again; each failure doubles it.
const HIDE_RETRY_FIRST: Duration = Duration::from_millis(50);
/// The longest wait between writes of a hide that does not reach L2.
const HIDE_RETRY_MAX: Duration = Duration::from_secs(1);
/// Bytes an L1 entry costs besides its key and value (moka's node and the slot's deadlines).
const SLOT_OVERHEAD: usize = 100;

/// A typed two-level cache: L1 in process (moka), L2 in any
/// [`KvStore`](headroom_core::kv::KvStore), a loader behind both.
///
/// Cloning is cheap; clones share everything. Reads and writes must run inside a tokio
/// runtime (loads run in spawned tasks so that a dropped caller never cancels them).
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::time::Duration;
/// use headroom_cache::Cache;
/// use headroom_core::{memory::MemoryKvStore, Namespace};
///
/// let cache: Cache<u64, String> = Cache::builder()
///     .name("users")
///     .ttl(Duration::from_secs(60))
///     .l2(MemoryKvStore::new(), Namespace::new("app:users")?)
///     .build()?;
///
/// let name = cache
///     .get_or_load(&7, |id| async move { Ok::<_, std::io::Error>(Some(format!("user {id}"))) })
///     .await?;
/// assert_eq!(name.as_deref(), Some("user 7"));
/// assert_eq!(cache.get(&7).await?.as_deref(), Some("user 7"));
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub struct Cache<K, V> {
    inner: Arc<Inner<K, V>>,
}

impl<K, V> Clone for Cache<K, V> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K, V> fmt::Debug for Cache<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("name", &self.inner.config.name)
            .field("l2", &self.inner.l2.as_ref().map(|l2| &l2.namespace))
            .finish_non_exhaustive()
    }
}

/// What a read or load ends with, shared by every caller waiting on the same load.
type Outcome<V> = Result<Option<V>, CacheError>;
type Pending<V> = Shared<BoxFuture<'static, Outcome<V>>>;
/// Outcomes of a batch load, in the order of its keys (`O` is an outcome, or one that may be
/// missing); `None` when the load task died (a loader panic).
type Outcomes<O> = Shared<BoxFuture<'static, Option<Arc<Vec<O>>>>>;

/// What a batch load answers, shared by its caller and the readers that join it.
struct Answers<V> {
    /// When its loader runs: the outcomes known before (`None` for the keys it loads), so that
    /// a reader of one of those keys does not wait for the loader, nor share its failure.
    /// `None` when the batch answers every key at once, or its task died first.
    early: Outcomes<Option<Outcome<V>>>,
    /// Every key's outcome.
    all: Outcomes<Outcome<V>>,
}

type Batch<V> = Arc<Answers<V>>;

/// A load in flight: callers join it; `load` tells it apart from a later load of the key.
struct InFlight<V> {
    load: u64,
    join: Join<V>,
    /// Set once the load answered early with a value it goes on refreshing (or, past its soft
    /// timeout, with a stale one): when that value stops being servable. A caller coming
    /// later does not join that answer but starts a load of its own.
    answered_until: Option<Instant>,
}

impl<V> InFlight<V> {
    fn joinable(&self, now: Instant) -> bool {
        self.answered_until.is_none_or(|until| now < until)
    }
}

/// What a caller joining a load in flight waits on.
enum Join<V> {
    One(Pending<V>),
    /// A batch load, and the key's place among its keys.
    Batch(Batch<V>, usize),
}

impl<V: Clone + Send + Sync + 'static> Join<V> {
    /// The outcome for the key.
    fn wait(&self) -> BoxFuture<'static, Outcome<V>> {
        match self {
            Self::One(pending) => pending.clone().boxed(),
            Self::Batch(batch, place) => {
                let (batch, place) = (Arc::clone(batch), *place);
                async move {
                    if let Some(early) = batch.early.clone().await
                        && let Some(Some(outcome)) = early.get(place)
                    {
                        return outcome.clone();
                    }
                    pick(batch.all.clone().await.as_deref().map(Vec::as_slice), place)
                }
                .boxed()
            }
        }
    }
}

/// The outcome at `place` of a batch.
fn pick<V: Clone>(outcomes: Option<&[Outcome<V>]>, place: usize) -> Outcome<V> {
    match outcomes {
        Some(outcomes) => outcomes.get(place).cloned().unwrap_or(Ok(None)),
        None => Err(CacheError::new(CacheErrorKind::LoaderPanicked)),
    }
}

/// A batch's outcomes as its callers get them: a key with none is not found.
fn answers<V>(outcomes: Vec<Option<Outcome<V>>>) -> Vec<Outcome<V>> {
    outcomes
        .into_iter()
        .map(|outcome| outcome.unwrap_or(Ok(None)))
        .collect()
}

/// What a key of a batch read waits on: the batch this read started (the key's place in it),
/// or a load in flight that it joined.
enum Wait<V> {
    Own(usize),
    Joined(BoxFuture<'static, Outcome<V>>),
}

/// One cached value (or cached "not found") with its deadlines on this instance's clock.
///
/// L1 holds slots by value: a hit clones the slot (its value, as a raw moka read would) and
/// hands the value over without reference counting.
#[derive(Clone)]
pub(crate) struct Slot<V> {
    value: Option<V>,
    /// When the value was made, in Unix microseconds: its version, as in L2.
    created_micros: u64,
    /// Until then, a hit is served as is.
    fresh_until: Instant,
    /// Until then, a hit is served (and refreshed in the background after `fresh_until`).
    expires_at: Instant,
    /// Until then, the value may be served when a load fails (fail-safe).
    stale_until: Instant,
    /// Kept so that a refresh writes the entry back with them.
    tags: Tags,
    /// Bytes counted against `l1_max_bytes` (see `Inner::weigh`).
    pub(crate) weight: u32,
}

impl<V> Slot<V> {
    /// What a tombstone made at `created_micros` reads as at `now`: nothing, not even stale.
    fn removed(created_micros: u64, now: Instant) -> Self {
        Self {
            value: None,
            created_micros,
            fresh_until: now,
            expires_at: now,
            stale_until: now,
            tags: None,
            weight: 0,
        }
    }
}

/// The tags of an entry (`None` when it has none), shared by its L1 slot and its loads.
type Tags = Option<Arc<[Box<str>]>>;

/// A copy resting after a failed load: its version and when the rest ends.
#[derive(Clone, Copy)]
struct Rest {
    version: u64,
    until: Instant,
}

/// A key's write counter stripe and its value when a read or load began.
#[derive(Clone, Copy)]
struct WriteMark {
    stripe: usize,
    count: u64,
}

pub(crate) struct Inner<K, V> {
    l1: moka::sync::Cache<K, Slot<V>>,
    l2: Option<Arc<L2>>,
    codec: Box<dyn ValueCodec<V>>,
    config: CacheConfig,
    /// The lifetimes new entries get; `config`'s until replaced at run time.
    ttls: ArcSwap<TtlConfig>,
    ttl_by: Option<TtlFn<V>>,
    clock: Clock,
    metrics: Arc<Metrics>,
    /// Hashed with foldhash, randomly seeded per process and per map (no seed-independent
    /// collisions are known), which costs 8 % fewer instructions per key of a batch read than
    /// SipHash. It holds the keys being loaded at the moment: as many as the loads in flight.
    in_flight: Mutex<HashMap<K, InFlight<V>, foldhash::fast::RandomState>>,
    loads: AtomicU64,
    writes: Box<[AtomicU64]>,
    /// Per write stripe, the loads that changed L1 (put a value there or dropped one). A read
    /// that does not join loads ([`Cache::get`]) fills L1 only if none did since it began:
    /// what it read from L2 may be older than what the load found.
    loads_done: Box<[AtomicU64]>,
    /// Per write stripe, the writes whose L2 change has not landed yet: no read fills L1
    /// meanwhile, since what it read from L2 may be the state the write replaces.
    writing: Box<[AtomicU32]>,
    /// Per key, the copy resting after a failed load (see `rest`), apart from L1: a load that
    /// finds that very copy as its only candidate serves it without calling the loader, so
    /// the throttle holds while L1 is bypassed or has dropped the copy. A write or
    /// invalidation of the key removes it. Bounded; a key it cannot hold is loaded again.
    resting: moka::sync::Cache<K, Rest>,
    /// At least the records in `resting` (counted before one goes in, and after it left), so
    /// that a write, with none there, does not look.
    resting_len: Arc<AtomicUsize>,
    /// Picks a key's write stripe. Not flooding-resistant, and need not be: keys that share a
    /// stripe only skip some L1 fills, and any 256 keys already share stripes.
    stripes: foldhash::fast::RandomState,
    invalidation: Option<Invalidation>,
    /// One load of a key at a time across the fleet (see `CacheBuilder::fleet_lock`).
    fleet_lock: Option<FleetLock>,
    /// Whether the subscription to writes made by other programs is live (when there is one).
    external_live: Option<Arc<AtomicBool>>,
    /// Dropped with the cache: stops the task watching writes made by other programs.
    _external_stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// What [`Cache::clear`] and [`Cache::invalidate_tag`] hid in L2.
    hides: Hides,
    /// Hides made here that L2 did not take yet, with their times (see `keep_unkept`).
    unkept_hides: Mutex<HashMap<Hide, u64>>,
    /// Whether the task writing `unkept_hides` runs.
    keeping_unkept: AtomicBool,
}

impl<K, V> Cache<K, V>
where
    K: CacheKey,
    V: Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// Starts building a cache.
    pub fn builder() -> CacheBuilder<K, V> {
        CacheBuilder::new()
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        l1: moka::sync::Cache<K, Slot<V>>,
        l2: Option<Arc<L2>>,
        codec: Box<dyn ValueCodec<V>>,
        config: CacheConfig,
        ttl_by: Option<TtlFn<V>>,
        clock: Clock,
        metrics: Arc<Metrics>,
        invalidation: Option<(DynInvalidationBus, Key, InvalidationConfig)>,
        external_writes: Option<(Subscription, Vec<u8>)>,
        fleet_lock: Option<FleetLock>,
    ) -> Self {
        let (external_stop, external_stopped) = tokio::sync::oneshot::channel();
        let unheard = invalidation
            .as_ref()
            .map_or_else(InvalidationConfig::default, |(_, _, config)| config.clone())
            .max_silence;
        // As many keys as L1 holds entries (by count); deadlines follow the cache's clock,
        // moka's lifetime only frees the memory.
        let resting_len = Arc::new(AtomicUsize::new(0));
        let left = Arc::clone(&resting_len);
        let resting = moka::sync::Cache::builder()
            .max_capacity(config.l1_max_capacity)
            .eviction_listener(move |_, _, _| {
                left.fetch_sub(1, Ordering::AcqRel);
            });
        let resting = match config.fail_safe_throttle {
            throttle if throttle.is_zero() => resting.build(),
            throttle => resting.time_to_live(throttle).build(),
        };
        let cache = Self {
            inner: Arc::new(Inner {
                fleet_lock,
                invalidation: invalidation.map(|(bus, channel, invalidation)| {
                    Invalidation::new(
                        bus,
                        channel,
                        invalidation,
                        config.l2_max_pending_deletes,
                        clock.clone(),
                        &config.name,
                    )
                }),
                // Until the subscription is live, writes by others may go unseen.
                external_live: external_writes
                    .as_ref()
                    .map(|_| Arc::new(AtomicBool::new(false))),
                _external_stop: external_writes.as_ref().map(|_| external_stop),
                hides: Hides::new(unheard, clock.now()),
                unkept_hides: Mutex::new(HashMap::new()),
                keeping_unkept: AtomicBool::new(false),
                l1,
                l2,
                codec,
                ttls: ArcSwap::from_pointee(config.ttls()),
                config,
                ttl_by,
                clock,
                metrics,
                in_flight: Mutex::new(HashMap::default()),
                loads: AtomicU64::new(0),
                writes: (0..WRITE_STRIPES).map(|_| AtomicU64::new(0)).collect(),
                loads_done: (0..WRITE_STRIPES).map(|_| AtomicU64::new(0)).collect(),
                writing: (0..WRITE_STRIPES).map(|_| AtomicU32::new(0)).collect(),
                resting,
                resting_len,
                stripes: foldhash::fast::RandomState::default(),
            }),
        };
        if let Some(invalidation) = &cache.inner.invalidation {
            let local: Weak<Inner<K, V>> = Arc::downgrade(&cache.inner);
            invalidation.spawn(local);
            if let Some(l2) = &cache.inner.l2 {
                l2.announce_deletes_to(invalidation.publisher());
            }
        }
        if let (Some((writes, prefix)), Some(live)) = (external_writes, &cache.inner.external_live)
        {
            let local: Weak<Inner<K, V>> = Arc::downgrade(&cache.inner);
            tokio::spawn(crate::invalidation::watch_external_writes(
                writes,
                prefix,
                Arc::clone(live),
                local,
                external_stopped,
            ));
        }
        cache
    }

    /// The cache's configuration, as built: the lifetimes in force are [`ttls`](Self::ttls).
    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// How many keys have a load running now. It returns to 0 once loads finish, whether
    /// they succeed, fail, time out, panic or lose every caller; a count that stays above 0
    /// with no traffic is a load that never ends (see `loader_hard_timeout`).
    pub fn loads_in_flight(&self) -> usize {
        self.inner.in_flight.lock().len()
    }

    /// Whether [`reconfigure_ttls`](Self::reconfigure_ttls) would accept `ttls`; the longest
    /// an entry written under them lives.
    pub fn check_ttls(&self, ttls: &TtlConfig) -> Result<Duration, ConfigError> {
        ttls.validate()?;
        let inner = &*self.inner;
        let lifetime = ttls
            .ttl
            .saturating_add(ttls.ttl_jitter)
            .saturating_add(inner.config.fail_safe_max_stale);
        if inner.l2.is_none() && lifetime > inner.config.max_entry_lifetime() {
            return Err(ConfigError::new(
                "a cache without L2 keeps entries at most the lifetime it was built with \
                 (ttl + ttl_jitter + fail_safe_max_stale)",
            ));
        }
        Ok(lifetime)
    }

    /// The lifetimes entries written now get.
    pub fn ttls(&self) -> TtlConfig {
        TtlConfig::clone(&self.inner.ttls.load())
    }

    /// Replaces the lifetimes of the entries written from now on, while the cache runs;
    /// entries already cached keep the deadlines they were written with. A longer TTL than
    /// the cache was built with keeps entries in L2 that long (L1 still drops them after the
    /// lifetime it was built with, and reads them back from L2); a cache without L2 refuses
    /// one. The cache remembers the longest lifetime it ever gave, for how long removals and
    /// tag invalidations must hide older copies. An invalid configuration is refused and the
    /// one in force stays.
    pub fn reconfigure_ttls(&self, ttls: TtlConfig) -> Result<(), ConfigError> {
        let lifetime = self.check_ttls(&ttls)?;
        let inner = &*self.inner;
        // Raised before the new TTLs are used, so that nothing written under them outlives
        // what removals account for. Without L2 the lifetime cannot grow (see `check_ttls`).
        if let Some(l2) = &inner.l2 {
            l2.outlive(lifetime);
        }
        inner.ttls.store(Arc::new(ttls));
        Ok(())
    }

    /// Reads a value from L1, then L2; never calls a loader.
    ///
    /// `Ok(None)` means absent, or cached as "not found". A value past its soft TTL is served
    /// without a refresh (there is no loader to refresh it with); one past its TTL is not.
    /// L2 failures read as a miss. An L2 hit fills L1 in a spawned task, once the caller has
    /// its value.
    pub async fn get(&self, key: &K) -> Result<Option<V>, CacheError> {
        let inner = &self.inner;
        if inner.l1_usable()
            && let Some(slot) = inner.l1.get(key)
            && inner.clock.now() < slot.expires_at
        {
            inner.metrics.l1_hits.increment(1);
            return Ok(slot.value);
        }
        inner.metrics.l1_misses.increment(1);
        match &inner.l2 {
            // Boxed so that the future of an L1 hit stays small.
            Some(l2) => {
                let span = tracing::debug_span!("cache.get", name = %inner.config.name);
                Box::pin(inner.read_l2(l2, key).instrument(span)).await
            }
            None => inner.check_key(key).map(|()| None),
        }
    }

    /// Reads a value from L1, then L2, then `loader`, with stampede protection.
    ///
    /// - One load per key runs at a time in this instance, however many callers ask; they all
    ///   receive its result. The load runs in a spawned task, so a caller that is dropped does
    ///   not cancel it for the others.
    /// - A hit past its soft TTL is served at once and refreshed in the background.
    /// - `Ok(None)` from the loader means "not found": returned, and cached for the negative
    ///   TTL when one is configured; otherwise a value the cache held for the key is removed
    ///   (L1 here, a tombstone in L2), so that fail-safe never serves it again.
    /// - When the loader fails or times out and a value within `fail_safe_max_stale` past its
    ///   TTL is at hand (in L1 or L2), that stale value is served instead of the error.
    ///
    /// The loader gets the key by value and returns `Result<Option<V>, E>`. A loaded value
    /// keeps the tags of the entry it replaces (see
    /// [`get_or_load_tagged`](Self::get_or_load_tagged)).
    pub async fn get_or_load<F, Fut, E>(&self, key: &K, loader: F) -> Result<Option<V>, CacheError>
    where
        F: FnOnce(K) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: Into<Box<dyn StdError + Send + Sync>> + Send + 'static,
    {
        self.read_or_load(key, None, loader).await
    }

    /// Like [`get_or_load`](Self::get_or_load), and a value this call loads (or refreshes)
    /// carries `tags`, so that [`invalidate_tag`](Self::invalidate_tag) of any of them removes
    /// it. A call that joins a load already in flight gets that load's value and tags.
    ///
    /// Fails with [`CacheErrorKind::InvalidTag`] as [`insert_tagged`](Self::insert_tagged) does.
    pub async fn get_or_load_tagged<F, Fut, E>(
        &self,
        key: &K,
        tags: &[&str],
        loader: F,
    ) -> Result<Option<V>, CacheError>
    where
        F: FnOnce(K) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: Into<Box<dyn StdError + Send + Sync>> + Send + 'static,
    {
        check_tags(tags)?;
        let tags: Tags = (!tags.is_empty()).then(|| tags.iter().map(|&t| t.into()).collect());
        self.read_or_load(key, tags, loader).await
    }

    async fn read_or_load<F, Fut, E>(
        &self,
        key: &K,
        tags: Tags,
        loader: F,
    ) -> Result<Option<V>, CacheError>
    where
        F: FnOnce(K) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: Into<Box<dyn StdError + Send + Sync>> + Send + 'static,
    {
        let inner = &self.inner;
        if inner.l1_usable()
            && let Some(slot) = inner.l1.get(key)
        {
            let now = inner.clock.now();
            if now < slot.fresh_until {
                inner.metrics.l1_hits.increment(1);
                return Ok(slot.value);
            }
            if now < slot.expires_at {
                inner.metrics.l1_hits.increment(1);
                inner.metrics.refreshes.increment(1);
                // Starts (or joins) a load without waiting for it.
                let span = tracing::debug_span!("cache.get_or_load", name = %inner.config.name);
                span.in_scope(|| drop(Inner::join_or_load(inner, key, tags, loader)));
                return Ok(slot.value);
            }
        }
        inner.metrics.l1_misses.increment(1);
        if inner.l2.is_none() {
            inner.check_key(key)?;
        }
        let span = tracing::debug_span!("cache.get_or_load", name = %inner.config.name);
        // The load is spawned inside the span, and runs in it.
        let wait = span.in_scope(|| Inner::join_or_load(inner, key, tags, loader));
        wait.instrument(span).await
    }

    /// Reads many values: L1 first, then L2 in one round trip for all L1 misses, then one call
    /// of `loader` for every key still missing. Results come in the order of `keys`.
    ///
    /// Keys already being loaded by another call are joined rather than loaded again, and
    /// concurrent single-key reads join this call's load. The loader returns the values it
    /// found; keys absent from its map are "not found" (cached for the negative TTL when one
    /// is configured). When the loader fails, keys with a stale value within
    /// `fail_safe_max_stale` are served that value; if any key has none, the call fails.
    /// A key L2 could not hold (empty, or over 1,024 bytes), with L2 or without, fails the
    /// call with [`CacheErrorKind::InvalidKey`] before anything is read or loaded.
    pub async fn get_many_or_load<F, Fut, E>(
        &self,
        keys: &[K],
        loader: F,
    ) -> Result<Vec<Option<V>>, CacheError>
    where
        F: FnOnce(Vec<K>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<HashMap<K, V>, E>> + Send + 'static,
        E: Into<Box<dyn StdError + Send + Sync>> + Send + 'static,
    {
        let span = tracing::debug_span!("cache.get_many", name = %self.inner.config.name);
        self.read_many_or_load(keys, loader).instrument(span).await
    }

    async fn read_many_or_load<F, Fut, E>(
        &self,
        keys: &[K],
        loader: F,
    ) -> Result<Vec<Option<V>>, CacheError>
    where
        F: FnOnce(Vec<K>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<HashMap<K, V>, E>> + Send + 'static,
        E: Into<Box<dyn StdError + Send + Sync>> + Send + 'static,
    {
        let inner = &self.inner;
        let now = inner.clock.now();
        let l1_usable = inner.l1_usable();
        let mut results: Vec<Option<V>> = Vec::with_capacity(keys.len());
        // Keys to read on, by place in `keys`: those L1 did not serve, which this call waits
        // for, then those it served past their soft TTL, refreshed in the background.
        let mut missing: Vec<usize> = Vec::new();
        let mut refresh: Vec<usize> = Vec::new();
        for (place, key) in keys.iter().enumerate() {
            match inner.l1_get(key, l1_usable) {
                Some(slot) if now < slot.expires_at => {
                    if now >= slot.fresh_until {
                        refresh.push(place);
                    }
                    results.push(slot.value);
                }
                _ => {
                    results.push(None);
                    // Sized at the first miss, for every key left: a read that L1 serves
                    // whole allocates nothing for it.
                    if missing.is_empty() {
                        missing.reserve_exact(keys.len() - place);
                    }
                    missing.push(place);
                }
            }
        }
        // Counted once per batch rather than per key.
        let misses = missing.len() as u64;
        if misses < keys.len() as u64 {
            inner.metrics.l1_hits.increment(keys.len() as u64 - misses);
        }
        if misses > 0 {
            inner.metrics.l1_misses.increment(misses);
        }
        if missing.is_empty() && refresh.is_empty() {
            return Ok(results);
        }
        if !refresh.is_empty() {
            inner.metrics.refreshes.increment(refresh.len() as u64);
        }
        // Every key is checked before the batch is registered: other readers may join it,
        // and must not get this call's invalid key as their error.
        for &place in missing.iter().chain(&refresh) {
            inner.check_key(&keys[place])?;
        }
        let asks = missing.iter().chain(&refresh).map(|&place| &keys[place]);
        let (own, waits) = Inner::join_or_load_many(inner, asks, loader);
        if missing.is_empty() {
            // Only refreshes: they run in the background.
            return Ok(results);
        }
        let own = async move {
            match own {
                Some(batch) => batch.all.clone().await,
                None => None,
            }
        };
        // Per missing key, its place in this call's batch, or `None` when it joined a load.
        let mut joined = Vec::new();
        let in_batch: Vec<Option<usize>> = waits
            .into_iter()
            .take(missing.len())
            .map(|wait| match wait {
                Wait::Own(at) => Some(at),
                Wait::Joined(pending) => {
                    joined.push(pending);
                    None
                }
            })
            .collect();
        let (own, joined) = futures_util::future::join(own, join_all(joined)).await;
        let mut joined = joined.into_iter();
        for (place, at) in missing.into_iter().zip(in_batch) {
            results[place] = match at {
                Some(at) => pick(own.as_deref().map(Vec::as_slice), at)?,
                None => joined.next().unwrap_or(Ok(None))?,
            };
        }
        Ok(results)
    }

    /// Writes a value to L1 and L2 (write-through), with the TTL of
    /// [`CacheBuilder::ttl_by`] or the default TTL.
    ///
    /// Fails only for an invalid key or a value too large; an L2 failure does not fail the
    /// write. When the value could not be written to L2, the key's L2 copy is outdated: this
    /// instance stops reading it and deletes it from L2 once L2 answers again. With invalidation
    /// on, the write's message tells the other instances the same, so they stop reading the old
    /// copy too; without it, they may read it until its TTL.
    ///
    /// Of two writes of one key, on any instances, the later call stays in L2 even when the
    /// earlier one reaches L2 last: each L2 entry carries the Unix microsecond of its write and
    /// is written only over an older one (so the order holds up to the clock skew between
    /// instances). [`insert_at`](Self::insert_at) takes that time from the caller.
    pub async fn insert(&self, key: K, value: V) -> Result<(), CacheError> {
        self.insert_tagged(key, value, &[]).await
    }

    /// Like [`insert`](Self::insert), with tags written in the entry's L2 envelope, so that
    /// [`invalidate_tag`](Self::invalidate_tag) of any of them removes it.
    ///
    /// Fails with [`CacheErrorKind::InvalidTag`] for an empty tag, one over 255 bytes, or more
    /// than [`MAX_TAGS`](crate::envelope::MAX_TAGS) tags.
    pub async fn insert_tagged(&self, key: K, value: V, tags: &[&str]) -> Result<(), CacheError> {
        let span = tracing::debug_span!("cache.insert", name = %self.inner.config.name);
        self.write_value(key, value, tags, u64::MAX)
            .instrument(span)
            .await
    }

    /// Like [`insert`](Self::insert), for a write made at `at` rather than at the call: the
    /// entry's version in L2 is `at` to the microsecond, capped at the cache clock's now. A
    /// caller that orders its writes elsewhere (a database, a write-behind) passes the time it
    /// ordered the write by, so that L2 keeps the same write whichever reaches it last. The TTL
    /// still counts from the call; a write older than its TTL counts as made one TTL ago.
    ///
    /// Two writes of one key made in the same microsecond keep the order in which they reach
    /// L2.
    pub async fn insert_at(&self, key: K, value: V, at: SystemTime) -> Result<(), CacheError> {
        let span = tracing::debug_span!("cache.insert", name = %self.inner.config.name);
        self.write_value(key, value, &[], unix_micros(at))
            .instrument(span)
            .await
    }

    /// Writes `value` as made at `at_unix_us` or now, whichever is earlier.
    async fn write_value(
        &self,
        key: K,
        value: V,
        tags: &[&str],
        at_unix_us: u64,
    ) -> Result<(), CacheError> {
        let inner = &self.inner;
        check_tags(tags)?;
        // With L2, building the key's L2 form checks it.
        if inner.l2.is_none() {
            inner.check_key(&key)?;
        }
        let mut times = inner.times(Some(&value));
        // Never later than now: the deadlines count from now and must not precede it. Never
        // earlier than one TTL ago: the L2 lifetime counts from it and stays bounded.
        let now = times.created_micros();
        let ttl = times
            .expires
            .saturating_sub(times.created)
            .saturating_mul(1_000);
        times.set_created_micros(at_unix_us.clamp(now.saturating_sub(ttl), now));
        let l2_entry = match &inner.l2 {
            Some(l2) => Some(inner.entry(l2, &key, Some(&value), times, tags)?),
            None => None,
        };
        let writing = vec![Inner::begin_write(inner, &key)];
        let mut slot = inner.slot(
            Some(value),
            times,
            inner.clock.now(),
            inner.clock.unix_millis(),
            (!tags.is_empty()).then(|| tags.iter().map(|&t| t.into()).collect()),
        );
        inner.weigh(&key, &mut slot, l2_entry.as_ref().map(|e| e.value.len()));
        let version = slot.created_micros;
        if inner.l1_usable() {
            // As in L2, a write made earlier than the one L1 holds does not replace it.
            let mut pending = Some(slot);
            let entry = inner.l1.entry(key.clone()).or_insert_with_if(
                || {
                    pending
                        .take()
                        .expect("moka runs an initializer at most once")
                },
                |held| held.created_micros <= version,
            );
            // A concurrent write's initializer ran instead of this one's: this one goes in if
            // it is the newer.
            if let Some(slot) = pending.filter(|_| entry.value().created_micros < version) {
                inner
                    .l1
                    .entry(key.clone())
                    .and_compute_with(|held| match held {
                        Some(held) if held.value().created_micros > version => Op::Nop,
                        _ => Op::Put(slot),
                    });
            }
        }
        let published = vec![key.to_key_bytes().into_owned()];
        // Should L2 hold a newer write or removal (made here before, or elsewhere), L1 must not
        // serve this one in its place.
        let if_refused = move |inner: &Inner<K, V>| {
            inner.l1.entry(key).and_compute_with(|held| match held {
                Some(held) if held.value().created_micros == version => Op::Remove,
                _ => Op::Nop,
            });
        };
        Inner::write_through(
            inner,
            l2_entry.into_iter().collect(),
            published,
            writing,
            if_refused,
        )
        .await;
        Ok(())
    }

    /// Removes a value from L1 and L2.
    ///
    /// An in-flight load of the key still answers its callers but no longer fills the cache.
    /// When L2 cannot be reached, the delete is retried in the background and this instance
    /// does not read the key from L2 meanwhile.
    pub async fn remove(&self, key: &K) -> Result<(), CacheError> {
        self.remove_many(std::slice::from_ref(key)).await
    }

    /// Removes values from L1 and L2: one L2 call, one invalidation message for all keys
    /// (neither for no keys).
    ///
    /// In L2 each key gets a tombstone (read as absent) rather than a delete, so that a value
    /// loaded before the removal, on any instance, never replaces it. Fails, removing nothing,
    /// when a key is invalid.
    pub async fn remove_many(&self, keys: &[K]) -> Result<(), CacheError> {
        let span = tracing::debug_span!("cache.remove", name = %self.inner.config.name);
        self.remove_keys(keys, u64::MAX).instrument(span).await
    }

    /// Like [`remove`](Self::remove), for a removal made at `at` rather than at the call: the
    /// tombstone's version in L2 is `at` to the microsecond, capped at the cache clock's now
    /// (see [`insert_at`](Self::insert_at)).
    pub async fn remove_at(&self, key: &K, at: SystemTime) -> Result<(), CacheError> {
        let span = tracing::debug_span!("cache.remove", name = %self.inner.config.name);
        self.remove_keys(std::slice::from_ref(key), unix_micros(at))
            .instrument(span)
            .await
    }

    /// Removes `keys` as removed at `at_unix_us` or now, whichever is earlier.
    async fn remove_keys(&self, keys: &[K], at_unix_us: u64) -> Result<(), CacheError> {
        if keys.is_empty() {
            // No L2 call, no message.
            return Ok(());
        }
        let inner = &self.inner;
        let at_unix_us = inner.clock.unix_micros().min(at_unix_us);
        let tombstones = match &inner.l2 {
            Some(l2) => keys
                .iter()
                .map(|key| inner.tombstone(l2, key, at_unix_us))
                .collect::<Result<Vec<_>, _>>()?,
            None => {
                for key in keys {
                    inner.check_key(key)?;
                }
                Vec::new()
            }
        };
        let mut writing = Vec::with_capacity(keys.len());
        for key in keys {
            writing.push(Inner::begin_write(inner, key));
            inner.l1.invalidate(key);
        }
        let published = match inner.invalidation {
            Some(_) => keys.iter().map(|k| k.to_key_bytes().into_owned()).collect(),
            None => Vec::new(),
        };
        Inner::write_through(inner, tombstones, published, writing, |_| {}).await;
        Ok(())
    }

    /// Empties the cache on every instance: L1 here and, through the invalidation bus, on the
    /// others. L2 entries written before the call are no longer read by any instance (they
    /// expire from L2 with their TTL): the clear is kept in L2 too, for instances that miss
    /// the message or start later.
    ///
    /// Returns once the clear is in L2 and the message queued; a call dropped meanwhile still
    /// has both done. When L2 cannot be reached, the message goes at once and the clear is
    /// written to L2 in the background until it is (or no entry it hides can still be
    /// alive), then published again.
    pub async fn clear(&self) {
        let inner = &self.inner;
        let at = inner.clock.unix_millis();
        inner.clear_at(at);
        Inner::keep_hide(inner, Hide::All, at).await;
    }

    /// Removes every entry carrying `tag` (see [`insert_tagged`](Self::insert_tagged)) on
    /// every instance: L1 is flushed here and, through the invalidation bus, on the others.
    /// L2 entries carrying the tag written before the call are no longer read by any
    /// instance (they expire from L2 with their TTL): the invalidation is kept in L2 too,
    /// like a [`clear`](Self::clear), and returns when [`clear`](Self::clear) would.
    pub async fn invalidate_tag(&self, tag: &str) {
        let inner = &self.inner;
        let at = inner.clock.unix_millis();
        inner.hide_tag(tag, at);
        Inner::keep_hide(inner, Hide::Tag(tag.into()), at).await;
    }

    /// Whether this instance's L1 is in use: always without an invalidation bus; with one,
    /// only while its subscription is live and not silent (otherwise every read goes to L2).
    pub fn l1_in_use(&self) -> bool {
        self.inner.l1_usable()
    }

    /// Stops this cache's part in invalidation across instances, for a graceful stop of the
    /// process: sends the keys still queued and a goodbye, then stops listening. The other
    /// instances stop expecting this one without flushing anything (unless the bus refused
    /// some of those keys). Afterwards L1 is no longer used (invalidations are no longer
    /// heard); L2 reads and writes go on, and a write is still announced, at the cost of an
    /// L1 flush on every other instance. Without an invalidation bus it does nothing. Shutting
    /// down again (after a shutdown cut short by a timeout, say) waits for the first to finish.
    pub async fn shutdown(&self) {
        if let Some(invalidation) = &self.inner.invalidation {
            invalidation.shutdown().await;
        }
    }

    pub(crate) fn join(&self, group: &ShutdownGroup) {
        if let Some(invalidation) = &self.inner.invalidation {
            group.add(invalidation);
        }
    }

    /// Drops a value from L1 only, for instance when another instance changed it.
    ///
    /// Like [`remove`](Self::remove), it stops in-flight loads of the key from filling L1 with
    /// a value read before the call.
    pub fn invalidate_local(&self, key: &K) {
        self.inner.bump_writes(key);
        self.inner.l1.invalidate(key);
    }

    /// The number of keys whose L2 copy is known to be outdated and waits for a delete.
    pub fn pending_l2_deletes(&self) -> usize {
        self.inner.l2.as_ref().map_or(0, |l2| l2.pending_deletes())
    }
}

impl<K, V> Inner<K, V>
where
    K: CacheKey,
    V: Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// Refuses a key L2 could not hold, with L2 or without, so that L1's entry bound also
    /// bounds the bytes its keys take.
    fn check_key(&self, key: &K) -> Result<(), CacheError> {
        key.with_key_bytes(Key::check)
            .map_err(|error| CacheError::with_source(CacheErrorKind::InvalidKey, error))
    }

    fn l2_key(&self, l2: &L2, key: &K) -> Result<Key, CacheError> {
        key.with_key_bytes(|bytes| l2.namespace.key(bytes))
            .map_err(|error| CacheError::with_source(CacheErrorKind::InvalidKey, error))
    }

    /// The L2 part of [`Cache::get`]: read, decode, fill L1.
    async fn read_l2(self: &Arc<Self>, l2: &Arc<L2>, key: &K) -> Result<Option<V>, CacheError> {
        let full = self.l2_key(l2, key)?;
        let write = self.mark(key);
        let loads_done = self.loads_done[write.stripe].load(Ordering::Acquire);
        let Some(bytes) = self.l2_get(l2, &full).await else {
            self.metrics.l2_misses.increment(1);
            return Ok(None);
        };
        let (now, unix_now) = (self.clock.now(), self.clock.unix_millis());
        let decoded = self.decode_checked(l2, &full, &bytes, now, unix_now).await;
        match decoded {
            Some(slot) if now < slot.expires_at => {
                self.metrics.l2_hits.increment(1);
                let value = slot.value.clone();
                let (this, key) = (Arc::clone(self), key.clone());
                tokio::spawn(async move { this.fill_read(&key, slot, write, loads_done) });
                Ok(value)
            }
            _ => {
                self.metrics.l2_misses.increment(1);
                Ok(None)
            }
        }
    }

    /// Where the key's writes stand now, to tell later whether it was written meanwhile.
    fn mark(&self, key: &K) -> WriteMark {
        let stripe = self.stripe(key);
        WriteMark {
            stripe,
            count: self.writes[stripe].load(Ordering::Acquire),
        }
    }

    /// Whether no write of the key (or of a key sharing its stripe) happened since `mark`.
    fn unchanged(&self, mark: WriteMark) -> bool {
        self.writes[mark.stripe].load(Ordering::Acquire) == mark.count
    }

    /// Whether no write happened since `mark` and none is still reaching L2.
    fn settled(&self, mark: WriteMark) -> bool {
        self.writing[mark.stripe].load(Ordering::Acquire) == 0 && self.unchanged(mark)
    }

    /// Records a write of `key`: loads started before it no longer fill the cache, and later
    /// reads start a new load instead of joining theirs.
    fn bump_writes(&self, key: &K) {
        self.bump_stripe(key, self.stripe(key));
    }

    fn bump_stripe(&self, key: &K, stripe: usize) {
        self.writes[stripe].fetch_add(1, Ordering::AcqRel);
        let mut in_flight = self.in_flight.lock();
        // Mostly nothing is being loaded: then the key is not hashed.
        if !in_flight.is_empty() {
            in_flight.remove(key);
        }
        drop(in_flight);
        // After the load is detached: a rest counted before the detachment is seen here, and
        // one counted after sees the load detached (see `rest`), through the lock.
        if self.resting_len.load(Ordering::Acquire) > 0 {
            self.resting.invalidate(key);
        }
    }

    /// Marks keys of load `load` (those it still holds) as answered early, each with a value
    /// servable until its instant.
    fn answered_until<'k>(&self, answered: impl IntoIterator<Item = (&'k K, Instant)>, load: u64)
    where
        K: 'k,
    {
        let mut in_flight = self.in_flight.lock();
        for (key, until) in answered {
            if let Some(entry) = in_flight.get_mut(key)
                && entry.load == load
            {
                entry.answered_until = Some(until);
            }
        }
    }

    /// A load of `key` takes the place of one whose early answer expired: the overtaken one,
    /// ending later with an older value (or failing), must not fill L1 over it, as after a
    /// write.
    fn overtake(&self, key: &K) {
        self.writes[self.stripe(key)].fetch_add(1, Ordering::AcqRel);
    }

    /// Whether the load numbered `load` is still the one in flight for `key`: a write to the
    /// key (as it begins and as it lands), a message invalidating it or a flush detaches a
    /// load, writes to other keys do not. Only an attached load writes its value to L2.
    fn attached(&self, key: &K, load: u64) -> bool {
        self.in_flight
            .lock()
            .get(key)
            .is_some_and(|entry| entry.load == load)
    }

    fn stripe(&self, key: &K) -> usize {
        self.stripes.hash_one(key) as usize % WRITE_STRIPES
    }

    /// Records a write of `key` whose L2 change is under way: until the returned guard is
    /// dropped (after L2 has the change, or the change was given up), no read fills L1 with
    /// the key's stripe; dropping it counts as another write, so reads begun meanwhile do not
    /// fill L1 either.
    fn begin_write(this: &Arc<Self>, key: &K) -> Writing<K, V> {
        let stripe = this.stripe(key);
        this.bump_stripe(key, stripe);
        this.writing[stripe].fetch_add(1, Ordering::AcqRel);
        Writing {
            inner: Arc::clone(this),
            key: key.clone(),
            stripe,
        }
    }

    /// Writes `entries` (values, or tombstones of removed keys) to L2, then announces `keys`
    /// on the invalidation bus: after L2 has the change, so that an instance reading L2 on the
    /// message sees it. With a bus, this runs in a spawned task, so a caller dropped meanwhile
    /// cannot skip the message; without one, a dropped write leaves the key pending (see `L2`).
    /// When L2 met a newer entry for some of them (and kept it), `if_refused` runs before the
    /// write ends.
    async fn write_through(
        this: &Arc<Self>,
        entries: Vec<KvEntry>,
        keys: Vec<Vec<u8>>,
        writing: Vec<Writing<K, V>>,
        if_refused: impl FnOnce(&Self) + Send + 'static,
    ) {
        /// How many entries L2 took (all when there is no L2), `None` when it failed.
        async fn l2_work(l2: Option<&Arc<L2>>, entries: &[KvEntry]) -> Option<u64> {
            match l2 {
                Some(l2) => l2.set_many(entries).await,
                None => Some(entries.len() as u64),
            }
        }
        let met_newer = |written: Option<u64>, entries: usize| {
            written.is_some_and(|written| written < entries as u64)
        };
        if this.invalidation.is_none() {
            let written = l2_work(this.l2.as_ref(), &entries).await;
            if met_newer(written, entries.len()) {
                if_refused(this);
            }
            drop(writing);
            return;
        }
        let this = Arc::clone(this);
        let task = tokio::spawn(
            async move {
                let written = l2_work(this.l2.as_ref(), &entries).await;
                if met_newer(written, entries.len()) {
                    if_refused(&this);
                }
                drop(writing);
                if let Some(invalidation) = &this.invalidation {
                    let keys = keys.iter().map(Vec::as_slice);
                    if written.is_some() {
                        invalidation.publish_keys(keys);
                    } else {
                        invalidation.publish_outdated_keys(keys);
                    }
                }
            }
            .in_current_span(),
        );
        // The task never panics; a runtime shutting down is the only other way it ends early.
        let _ = task.await;
    }

    /// Whether L1 may be read and filled: not while invalidation messages may be lost.
    fn l1_usable(&self) -> bool {
        self.invalidation.as_ref().is_none_or(Invalidation::healthy)
            && self
                .external_live
                .as_ref()
                .is_none_or(|live| live.load(Ordering::Acquire))
    }

    /// The L1 slot of `key`, when L1 is usable.
    fn l1_get(&self, key: &K, usable: bool) -> Option<Slot<V>> {
        if usable { self.l1.get(key) } else { None }
    }

    /// Whether an L2 entry created at `created` is hidden by a clear or one of its tags.
    fn hidden(
        &self,
        created: u64,
        tags: &[&str],
        now: Instant,
        learned: bool,
    ) -> Result<bool, Unsure> {
        let heard = if learned {
            Heard::Learned
        } else {
            Heard::Now(self.heard())
        };
        self.hides.hidden(created, tags, now, heard)
    }

    /// Whether a clear or a tag invalidation known now hides `slot`, an L1 copy read before
    /// L2 told of it: such a copy is no candidate for fail-safe either.
    fn hides_copy(&self, slot: &Slot<V>, now: Instant) -> bool {
        let tags: Vec<&str> = slot
            .tags
            .iter()
            .flat_map(|tags| tags.iter().map(|t| &**t))
            .collect();
        self.hidden(slot.created_micros / 1_000, &tags, now, true)
            .unwrap_or(false)
    }

    /// Drops L1's copy of `key` if it was made before `before` (µs since the Unix epoch): a
    /// copy a write put there since stays. Judged by the copy itself, not by the key's write
    /// stripe, which writes of other keys change too.
    fn drop_older(&self, key: &K, write: WriteMark, before: u64) {
        // A change to L1, so that a read begun before it does not fill L1 with the copy.
        self.load_changes_l1(write);
        self.l1
            .entry(key.clone())
            .and_compute_with(|held| match held {
                Some(held) if held.value().created_micros < before => Op::Remove,
                _ => Op::Nop,
            });
    }

    /// Whether invalidation messages are being heard now.
    fn heard(&self) -> bool {
        self.invalidation
            .as_ref()
            .is_some_and(Invalidation::healthy)
    }

    /// The Unix millisecond before which no live entry was created.
    fn oldest_alive(&self) -> u64 {
        let alive = millis(self.longest_lifetime());
        self.clock.unix_millis().saturating_sub(alive)
    }

    /// Drops everything from L1 and hides L2 entries carrying `tag` created at or before
    /// `at_unix_ms`.
    fn hide_tag(&self, tag: &str, at_unix_ms: u64) {
        self.hides.hide_tag(tag, at_unix_ms, self.oldest_alive());
        self.flush();
    }

    /// Drops everything from L1 and hides L2 entries created at or before `at_unix_ms`.
    fn clear_at(&self, at_unix_ms: u64) {
        self.hides.clear(at_unix_ms);
        self.flush();
    }

    /// Keeps a hide made here in L2, then publishes it; returns once it is published. Runs
    /// in its own task, holding the cache for that first write only (bounded by the L2
    /// timeout), so that a caller dropped meanwhile, even with the cache, still has it
    /// published. A hide L2 did not take is written again later (see `keep_unkept`).
    async fn keep_hide(this: &Arc<Self>, hide: Hide, at_unix_ms: u64) {
        let Some(key) = this.l2.as_ref().and_then(|l2| l2.hide_key(&hide)) else {
            // No L2, or a tag too long to be a key: no entry carries it.
            this.publish_hide(&hide, at_unix_ms);
            return;
        };
        let (published, on_published) = oneshot::channel();
        let inner = Arc::clone(this);
        tokio::spawn(async move {
            let l2 = inner.l2.as_ref().expect("a hide key needs L2");
            let kept = l2.keep_hides(std::iter::once((key, at_unix_ms))).await;
            inner.publish_hide(&hide, at_unix_ms);
            let _ = published.send(());
            if !kept {
                Self::hold_unkept(&inner, hide, at_unix_ms);
            }
        });
        let _ = on_published.await;
    }

    /// Remembers a hide L2 did not take, for the task that writes them again.
    fn hold_unkept(this: &Arc<Self>, hide: Hide, at_unix_ms: u64) {
        let mut unkept = this.unkept_hides.lock();
        let at = unkept.entry(hide).or_insert(0);
        *at = (*at).max(at_unix_ms);
        // As many as an instance remembers one by one; past it, a clear of the newest stands
        // for them, here too.
        if unkept.len() > MAX_HIDDEN_TAGS {
            let newest = unkept.values().copied().max().unwrap_or(0);
            unkept.clear();
            unkept.insert(Hide::All, newest);
            this.clear_at(newest);
        }
        let start = !this.keeping_unkept.swap(true, Ordering::AcqRel);
        drop(unkept);
        if start {
            tokio::spawn(Self::keep_unkept(Arc::downgrade(this), this.clock.clone()));
        }
    }

    /// Writes the hides L2 did not take, all in one call, until L2 takes them (or no entry
    /// they hide can be alive), then publishes them again: an instance that read L2 in
    /// between found them absent.
    async fn keep_unkept(this: Weak<Self>, clock: Clock) {
        let mut pause = HIDE_RETRY_FIRST;
        loop {
            clock.sleep(pause).await;
            let Some(inner) = this.upgrade() else { return };
            let Some(l2) = &inner.l2 else { return };
            let oldest_alive = inner.oldest_alive();
            let unkept: Vec<(Hide, u64)> = {
                let mut unkept = inner.unkept_hides.lock();
                unkept.retain(|_, at| *at >= oldest_alive);
                unkept
                    .iter()
                    .map(|(hide, at)| (hide.clone(), *at))
                    .collect()
            };
            let keys = unkept
                .iter()
                .filter_map(|(hide, at)| Some((l2.hide_key(hide)?, *at)));
            if !unkept.is_empty() && l2.keep_hides(keys).await {
                let mut held = inner.unkept_hides.lock();
                for (hide, at) in &unkept {
                    if held.get(hide) == Some(at) {
                        held.remove(hide);
                    }
                }
                drop(held);
                for (hide, at) in &unkept {
                    inner.publish_hide(hide, *at);
                }
                pause = HIDE_RETRY_FIRST;
            } else {
                pause = (pause * 2).min(HIDE_RETRY_MAX);
            }
            let unkept = inner.unkept_hides.lock();
            if unkept.is_empty() {
                inner.keeping_unkept.store(false, Ordering::Release);
                return;
            }
        }
    }

    /// Publishes a hide made at `at_unix_ms`: the others hide what was written up to then.
    fn publish_hide(&self, hide: &Hide, at_unix_ms: u64) {
        if let Some(invalidation) = &self.invalidation {
            match hide {
                Hide::All => invalidation.publish_clear(at_unix_ms),
                Hide::Tag(tag) => invalidation.publish_tag(tag, at_unix_ms),
            }
        }
    }

    /// Puts a slot read or loaded before `write` into L1, unless the key was written since.
    fn fill_l1(&self, key: &K, slot: Slot<V>, write: WriteMark) -> bool {
        if !self.settled(write) || !self.l1_usable() {
            return false;
        }
        self.l1.insert(key.clone(), slot);
        // A write that raced with the insert wins: drop what was just put.
        if !self.settled(write) {
            self.l1.invalidate(key);
            return false;
        }
        true
    }

    /// [`fill_l1`](Self::fill_l1) for a read that did not join loads, begun when the stripe's
    /// `loads_done` was `loads_done`: no load may have changed L1 since.
    fn fill_read(&self, key: &K, slot: Slot<V>, write: WriteMark, loads_done: u64) {
        let done = &self.loads_done[write.stripe];
        if done.load(Ordering::Acquire) != loads_done || !self.fill_l1(key, slot, write) {
            return;
        }
        // A load that changed L1 meanwhile may have been overwritten: drop what was just put.
        if done.load(Ordering::Acquire) != loads_done {
            self.l1.invalidate(key);
        }
    }

    /// Records that a load is about to change the key's L1 copy (see `loads_done`): counted
    /// first, so that a read filling L1 meanwhile sees it by its second look at the latest.
    fn load_changes_l1(&self, write: WriteMark) {
        self.loads_done[write.stripe].fetch_add(1, Ordering::AcqRel);
    }

    /// The longest any entry written so far can live, under every TTL configuration the cache
    /// has had: what tags and tombstones must outlive. L2 keeps it; without L2 it is the
    /// lifetime the cache was built with, which a reload cannot raise.
    /// The wall clock now, and the latest time a hide read now can carry: a minute ahead of
    /// it, for clocks apart, or as far as an entry lives, whichever is later. A hide from a
    /// clock ahead by less is honoured; one dated later would hide every entry made for
    /// longer than an entry lives.
    fn wall(&self) -> Wall {
        let now = self.clock.unix_millis();
        let ahead = millis(self.longest_lifetime()).max(60_000);
        Wall {
            now,
            latest: now.saturating_add(ahead),
        }
    }

    fn longest_lifetime(&self) -> Duration {
        self.l2
            .as_ref()
            .map_or_else(|| self.config.max_entry_lifetime(), |l2| l2.max_lifetime())
    }

    /// The deadlines of a value produced now.
    fn times(&self, value: Option<&V>) -> Times {
        let config = self.ttls.load();
        let (ttl, soft) = match value {
            Some(value) => {
                let ttl = self
                    .ttl_by
                    .as_ref()
                    .map_or(config.ttl, |ttl_by| ttl_by(value).min(config.ttl));
                (ttl, config.soft_ttl.unwrap_or(ttl).min(ttl))
            }
            None => {
                let ttl = config.negative_ttl.unwrap_or_default().min(config.ttl);
                (ttl, ttl)
            }
        };
        let jitter = fastrand::u64(0..=millis(config.ttl_jitter));
        let mut times = Times::at(self.clock.unix_micros());
        times.fresh_until = times
            .created
            .saturating_add(millis(soft))
            .saturating_add(jitter);
        times.expires = times
            .created
            .saturating_add(millis(ttl))
            .saturating_add(jitter);
        times
    }

    /// An L1 slot for `times`, read at `now` (whose wall time is `now_ms`).
    fn slot(
        &self,
        value: Option<V>,
        times: Times,
        now: Instant,
        now_ms: u64,
        tags: Tags,
    ) -> Slot<V> {
        let after = |ms: u64| now + Duration::from_millis(ms.saturating_sub(now_ms));
        let stale_ms = times
            .expires
            .saturating_add(millis(self.config.fail_safe_max_stale));
        let stale_until = after(stale_ms);
        let mut expires_at = after(times.expires);
        if let Some(cap) = self.config.l1_max_ttl {
            expires_at = expires_at.min(now + cap);
        }
        Slot {
            value,
            created_micros: times.created_micros(),
            fresh_until: after(times.fresh_until).min(expires_at),
            expires_at,
            stale_until,
            tags,
            weight: 0,
        }
    }

    /// Sets the L1 weight of `slot`: the key, the encoded value (`encoded` bytes when known)
    /// and the bookkeeping. Only weighed when L1 is bounded by bytes.
    fn weigh(&self, key: &K, slot: &mut Slot<V>, encoded: Option<usize>) {
        if self.config.l1_max_bytes.is_none() {
            return;
        }
        let encoded = encoded.unwrap_or_else(|| {
            let mut bytes = Vec::new();
            match &slot.value {
                Some(value) => self
                    .codec
                    .encode(value, &mut bytes)
                    .map_or(0, |()| bytes.len()),
                None => 0,
            }
        });
        let total = key.to_key_bytes().len() + encoded + SLOT_OVERHEAD;
        slot.weight = u32::try_from(total).unwrap_or(u32::MAX);
    }

    /// The L2 entry for a value produced at `times`.
    fn entry(
        &self,
        l2: &L2,
        key: &K,
        value: Option<&V>,
        times: Times,
        tags: &[&str],
    ) -> Result<KvEntry, CacheError> {
        let key = self.l2_key(l2, key)?;
        let mut bytes = Vec::with_capacity(64);
        envelope::write_header(
            &mut bytes,
            self.codec.id(),
            times,
            value.is_none(),
            self.config.schema_version,
            tags,
        );
        if let Some(value) = value {
            self.codec
                .encode(value, &mut bytes)
                .map_err(|error| CacheError::with_source(CacheErrorKind::Encode, error))?;
        }
        if bytes.len() > self.config.max_value_len {
            return Err(CacheError::with_source(
                CacheErrorKind::ValueTooLarge,
                format!(
                    "encoded value of {} bytes exceeds the limit of {} bytes",
                    bytes.len(),
                    self.config.max_value_len
                ),
            ));
        }
        let lifetime = times
            .expires
            .saturating_sub(times.created)
            .saturating_add(millis(self.config.fail_safe_max_stale))
            .max(1);
        Ok(KvEntry {
            key,
            value: Bytes::from(bytes),
            // Past what a store keeps, the L2 copy goes first; L1 and the envelope keep the
            // entry's own times.
            ttl: Duration::from_millis(lifetime).min(headroom_core::MAX_DURATION),
        })
    }

    /// The L2 tombstone of `key` removed at `at_unix_us` (see `L2::tombstone`).
    fn tombstone(&self, l2: &L2, key: &K, at_unix_us: u64) -> Result<KvEntry, CacheError> {
        Ok(l2.tombstone(self.l2_key(l2, key)?, at_unix_us))
    }

    /// Decodes L2 bytes into a slot; undecodable bytes are deleted and read as `None`. A
    /// tombstone reads as a slot without a value that is already past its fail-safe window:
    /// newer than a copy L1 holds, it replaces that copy as what a load may serve (see
    /// [`adopt`]). `Unsure` when a hide that could cover the entry must be learned from L2
    /// first (see [`decode_checked`](Self::decode_checked)); `learned` once it was.
    ///
    /// `now` and `unix_now` are the same moment on the two clocks (a batch reads them once).
    fn decode(
        &self,
        l2: &Arc<L2>,
        key: &Key,
        bytes: &[u8],
        now: Instant,
        unix_now: u64,
        learned: bool,
    ) -> Result<Option<Slot<V>>, Unsure> {
        let env = match envelope::decode(bytes) {
            Ok(env) => env,
            Err(error) => return Ok(self.discard(l2, key, bytes, error)),
        };
        let times = Times {
            created: env.created_unix_ms,
            created_sub_ms: env.created_sub_ms_micros,
            fresh_until: env.fresh_until_unix_ms,
            expires: env.expires_unix_ms,
        };
        // A tombstone carries no value, so its schema does not matter: a removal made by an
        // instance of another schema (a rolling deploy) counts here too.
        if env.tombstone {
            return Ok(Some(Slot::removed(times.created_micros(), now)));
        }
        // Another schema's entry is not corrupt: a miss, left for its own readers, whatever
        // its codec (a codec change comes with a new schema version).
        if env.schema != self.config.schema_version {
            return Ok(None);
        }
        if env.codec != self.codec.id() {
            return Ok(self.discard(l2, key, bytes, "written by another codec"));
        }
        if self.hidden(env.created_unix_ms, &env.tags, now, learned)? {
            return Ok(None);
        }
        let value = match env.payload.map(|p| self.codec.decode(p)).transpose() {
            Ok(value) => value,
            Err(error) => return Ok(self.discard(l2, key, bytes, error)),
        };
        let tags: Tags =
            (!env.tags.is_empty()).then(|| env.tags.iter().map(|&t| t.into()).collect());
        let mut slot = self.slot(value, times, now, unix_now, tags);
        if self.config.l1_max_bytes.is_some() {
            let total = key.as_bytes().len() + bytes.len() + SLOT_OVERHEAD;
            slot.weight = u32::try_from(total).unwrap_or(u32::MAX);
        }
        Ok(Some(slot))
    }

    /// [`decode`](Self::decode), learning first from L2 the hides the entry needs (one more
    /// round trip, once per hide after a loss of messages). An entry whose hides cannot be
    /// learned (L2 stopped answering) reads as a miss.
    async fn decode_checked(
        &self,
        l2: &Arc<L2>,
        key: &Key,
        bytes: &[u8],
        now: Instant,
        unix_now: u64,
    ) -> Option<Slot<V>> {
        match self.decode(l2, key, bytes, now, unix_now, false) {
            Ok(found) => found,
            Err(Unsure) => {
                if !self.learn_hides(l2, &[bytes], now).await {
                    return None;
                }
                self.decode(l2, key, bytes, now, unix_now, true)
                    .ok()
                    .flatten()
            }
        }
    }

    /// Reads `key` from L2, with the clear (in the same round trip) when what is known of it
    /// does not count.
    async fn l2_get(&self, l2: &L2, key: &Key) -> Option<Bytes> {
        match self.clear_to_read(l2) {
            Some(clear) => {
                let found = self.read_with_clear(l2, std::slice::from_ref(key), clear);
                found.await?.pop().flatten()
            }
            None => l2.get(key).await.flatten(),
        }
    }

    /// Reads `keys` from L2 in one round trip, with the clear when what is known of it does
    /// not count.
    async fn l2_get_many(&self, l2: &L2, keys: &[Key]) -> Option<Vec<Option<Bytes>>> {
        match self.clear_to_read(l2) {
            Some(clear) => self.read_with_clear(l2, keys, clear).await,
            None => l2.get_many(keys).await,
        }
    }

    /// The clear's read and key, when what is known of it does not count.
    fn clear_to_read(&self, l2: &L2) -> Option<(ClearRead, Key)> {
        let read = self
            .hides
            .clear_read(|| self.clock.now(), || self.heard())?;
        Some((read, l2.hide_key(&Hide::All)?))
    }

    async fn read_with_clear(
        &self,
        l2: &L2,
        keys: &[Key],
        (read, clear): (ClearRead, Key),
    ) -> Option<Vec<Option<Bytes>>> {
        let mut with_clear = Vec::with_capacity(keys.len() + 1);
        with_clear.extend_from_slice(keys);
        with_clear.push(clear);
        let mut found = l2.get_many(&with_clear).await?;
        let value = found.pop().flatten();
        let wall = self.wall();
        let recorded = self.hides.learned_clear(read, value.as_deref(), wall);
        if recorded.learned {
            self.flush();
        }
        if recorded.foreign
            && let (Some(clear), Some(value)) = (with_clear.pop(), value)
        {
            l2.replace_foreign_hide(clear, &value, wall.now).await;
        }
        Some(found)
    }

    /// Learns from L2 the hides the entries encoded in `values` need; one it did not know of
    /// flushes L1, as its message would have.
    /// Returns whether L2 was reached (otherwise the hides stay unsure).
    async fn learn_hides(&self, l2: &L2, values: &[&[u8]], now: Instant) -> bool {
        let oldest_alive = self.oldest_alive();
        let heard = || self.heard();
        match self
            .hides
            .learn(l2, values, (now, self.wall()), heard, oldest_alive)
            .await
        {
            Some(learned) => {
                if learned {
                    self.flush();
                }
                true
            }
            None => false,
        }
    }

    /// Reads undecodable bytes as a miss and deletes them from L2.
    fn discard(
        &self,
        l2: &Arc<L2>,
        key: &Key,
        bytes: &[u8],
        error: impl fmt::Display,
    ) -> Option<Slot<V>> {
        tracing::debug!(%error, "L2 value is not a valid envelope");
        l2.discard(key.clone(), bytes);
        None
    }

    /// Joins the load of `key` in flight, or starts one in a spawned task.
    fn join_or_load<F, Fut, E>(
        this: &Arc<Self>,
        key: &K,
        tags: Tags,
        loader: F,
    ) -> BoxFuture<'static, Outcome<V>>
    where
        F: FnOnce(K) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: Into<Box<dyn StdError + Send + Sync>> + Send + 'static,
    {
        let mut in_flight = this.in_flight.lock();
        let overtaking = match in_flight.get(key) {
            Some(existing) if existing.joinable(this.clock.now()) => return existing.join.wait(),
            Some(_) => {
                this.overtake(key);
                true
            }
            None => false,
        };
        let load = this.loads.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let pending = answer
            .map(|answer| {
                answer.unwrap_or_else(|_| Err(CacheError::new(CacheErrorKind::LoaderPanicked)))
            })
            .boxed()
            .shared();
        in_flight.insert(
            key.clone(),
            InFlight {
                load,
                join: Join::One(pending.clone()),
                answered_until: None,
            },
        );
        drop(in_flight);
        // The guard goes with the task from the start: a task dropped before it first runs (its
        // runtime shut down) still leaves nothing in flight.
        let done = InFlightGuard {
            inner: Arc::clone(this),
            load,
            keys: [key.clone()],
        };
        // The overtaken load holds this instance's fleet lock of the key, and stays detached:
        // its value would never reach L2 for a waiter to find.
        let claim = !overtaking;
        tokio::spawn(
            Arc::clone(this)
                .load(done, tags, loader, reply, claim)
                .in_current_span(),
        );
        pending.boxed()
    }

    /// The load task of one key: L2, then the loader, with fail-safe and soft timeout.
    async fn load<F, Fut, E>(
        self: Arc<Self>,
        done: InFlightGuard<K, V, [K; 1]>,
        tags: Tags,
        loader: F,
        reply: oneshot::Sender<Outcome<V>>,
        claim: bool,
    ) where
        F: FnOnce(K) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: Into<Box<dyn StdError + Send + Sync>> + Send + 'static,
    {
        let [key] = &done.keys;
        let write = self.mark(key);
        let mut reply = Some(reply);
        let now = self.clock.now();
        let mut best = self
            .l1_get(key, self.l1_usable())
            .filter(|slot| now < slot.stale_until);
        let mut fill = false;
        if let Some(l2) = &self.l2 {
            let full = match self.l2_key(l2, key) {
                Ok(full) => full,
                Err(error) => {
                    send(&mut reply, Err(error));
                    return;
                }
            };
            let found = match self.l2_get(l2, &full).await {
                Some(bytes) => {
                    self.decode_checked(l2, &full, &bytes, now, self.clock.unix_millis())
                        .await
                }
                None => None,
            };
            fill = self.adopt(key, write, found, &mut best, now);
        }
        // A servable value answers at once (past its soft TTL too: stale-while-revalidate,
        // refreshed below); L1 is filled after the callers have it.
        if let Some(slot) = best.as_ref().filter(|slot| now < slot.expires_at) {
            send(&mut reply, Ok(slot.value.clone()));
            let refreshing = now >= slot.fresh_until;
            if refreshing {
                self.answered_until([(key, slot.expires_at)], done.load);
            }
            if fill {
                // Let the callers run first.
                tokio::task::yield_now().await;
                self.fill_l1(key, slot.clone(), write);
            }
            if !refreshing {
                return;
            }
        }
        // The copy resting after a failed load, found again: the loader is not tried again
        // within the throttle, whether or not L1 served it.
        if let Some(stale) = best.as_ref().filter(|slot| now >= slot.expires_at)
            && self.resting_copy(key, stale, now)
        {
            self.metrics.stale_served.increment(1);
            send(&mut reply, Ok(stale.value.clone()));
            return;
        }
        // The soft timeout runs from here, over the wait for a fleet lock and the load alike.
        let soft = self
            .config
            .loader_soft_timeout
            .zip(best.as_ref())
            .map(|(soft, stale)| (self.clock.now() + soft, stale));
        // With a fleet lock, one instance loads; the others wait for its value in L2.
        let _lock = match (&self.fleet_lock, &self.l2) {
            (Some(lock), Some(l2)) if claim => match self
                .past_soft_timeout(
                    self.claim_or_wait(lock, l2, key),
                    soft,
                    &mut reply,
                    key,
                    done.load,
                )
                .await
            {
                Ok(guard) => guard,
                Err(loaded) => {
                    send(&mut reply, Ok(loaded.value.clone()));
                    self.fill_l1(key, loaded, write);
                    return;
                }
            },
            _ => None,
        };
        let started = self.clock.now();
        let version = self.clock.unix_micros();
        let load = self.bounded(loader(key.clone()));
        let result = self
            .past_soft_timeout(load, soft, &mut reply, key, done.load)
            .await;
        self.metrics
            .load_duration
            .record(self.clock.now().saturating_duration_since(started));
        match result {
            Ok(value) => {
                self.metrics.loads.increment(1);
                let cached = value.is_some() || self.ttls.load().negative_ttl.is_some();
                let entry = if cached {
                    let tags = tags.or_else(|| best.as_ref().and_then(|slot| slot.tags.clone()));
                    self.store(key, value.clone(), write, version, tags)
                } else if best.is_some() {
                    self.forget(key, write, version)
                } else {
                    None
                };
                send(&mut reply, Ok(value));
                if let (Some(l2), Some(entry)) = (&self.l2, entry)
                    && self.attached(key, done.load)
                {
                    l2.set_loaded(&[entry]).await;
                }
            }
            Err(error) => {
                let now = self.clock.now();
                match best.filter(|slot| now < slot.stale_until) {
                    Some(stale) => {
                        if reply.is_some() {
                            self.metrics.stale_served.increment(1);
                            tracing::warn!(
                                %error,
                                "load failed; serving a stale value (fail-safe)"
                            );
                            send(&mut reply, Ok(stale.value.clone()));
                        }
                        self.rest(key, &stale, write, done.load);
                    }
                    None => send(&mut reply, Err(error)),
                }
            }
        }
    }

    /// Awaits `work`. Past the soft timeout's deadline, with callers still waiting and a stale
    /// value at hand, answers them with that value (within its fail-safe window) and goes on.
    async fn past_soft_timeout<T>(
        &self,
        work: impl Future<Output = T>,
        soft: Option<(Instant, &Slot<V>)>,
        reply: &mut Option<oneshot::Sender<Outcome<V>>>,
        key: &K,
        load: u64,
    ) -> T {
        let Some((deadline, stale)) = soft.filter(|_| reply.is_some()) else {
            return work.await;
        };
        tokio::pin!(work);
        let left = deadline.saturating_duration_since(self.clock.now());
        tokio::select! {
            out = &mut work => out,
            () = self.clock.sleep(left) => {
                // Only within its fail-safe window, which may have ended meanwhile.
                if self.clock.now() < stale.stale_until {
                    self.metrics.stale_served.increment(1);
                    tracing::debug!("loader exceeds its soft timeout; serving the stale value");
                    send(reply, Ok(stale.value.clone()));
                    self.answered_until([(key, stale.stale_until)], load);
                }
                work.await
            }
        }
    }

    /// Claims the fleet lock of `key`: `Ok` with the guard (or `None` when the lease store is
    /// unavailable, or the wait ran out) means this instance loads; `Err` is the fresh value
    /// another instance's load put in L2 meanwhile.
    async fn claim_or_wait(
        &self,
        lock: &FleetLock,
        l2: &Arc<L2>,
        key: &K,
    ) -> Result<Option<LockGuard>, Slot<V>> {
        let config = &self.config;
        let lease = config
            .loader_hard_timeout
            .unwrap_or(lock.wait)
            .saturating_add(config.l2_timeout);
        let key_bytes = key.to_key_bytes();
        let claim = || lock.claim(&key_bytes, lease, &self.clock, config.l2_timeout);
        match claim().await {
            Claim::Held(guard) => return Ok(Some(guard)),
            Claim::Unavailable => return Ok(None),
            Claim::Taken => {}
        }
        let Ok(full) = self.l2_key(l2, key) else {
            return Ok(None);
        };
        let deadline = self.clock.now() + lock.wait;
        let poll = (lock.wait / 20).clamp(Duration::from_millis(10), Duration::from_millis(200));
        loop {
            let now = self.clock.now();
            if now >= deadline {
                return Ok(None);
            }
            self.clock.sleep(poll.min(deadline - now)).await;
            let now = self.clock.now();
            let found = match self.l2_get(l2, &full).await {
                Some(bytes) => {
                    self.decode_checked(l2, &full, &bytes, now, self.clock.unix_millis())
                        .await
                }
                None => None,
            };
            if let Some(slot) = found
                && now < slot.fresh_until
            {
                return Err(slot);
            }
            // A holder that finished without a value for L2 (the source has none) freed the lock.
            match claim().await {
                Claim::Held(guard) => return Ok(Some(guard)),
                Claim::Unavailable => return Ok(None),
                Claim::Taken => {}
            }
        }
    }

    /// [`adopt_over_copy`](Self::adopt_over_copy) for one key, its L2 hit or miss recorded
    /// at once.
    fn adopt(
        &self,
        key: &K,
        write: WriteMark,
        found: Option<Slot<V>>,
        best: &mut Option<Slot<V>>,
        now: Instant,
    ) -> bool {
        let mut tally = L2Tally::default();
        let servable = self.adopt_over_copy(key, write, found, best, now, &mut tally);
        tally.record(&self.metrics);
        servable
    }

    /// [`adopt`] of what L2 holds for `key` over L1's copy of it in `best`, if any: a copy a
    /// clear or tag known now hides is no candidate, and a copy that L2 or a hide showed was
    /// replaced after it was made is dropped from L1 too, unless a write put a newer one there
    /// since: once the tombstone or hide is gone from L2, the copy must not come back (through
    /// fail-safe).
    fn adopt_over_copy(
        &self,
        key: &K,
        write: WriteMark,
        found: Option<Slot<V>>,
        best: &mut Option<Slot<V>>,
        now: Instant,
        tally: &mut L2Tally,
    ) -> bool {
        let held = best.as_ref().map(|copy| copy.created_micros);
        if best.as_ref().is_some_and(|copy| self.hides_copy(copy, now)) {
            *best = None;
        }
        let servable = adopt(found, best, now, tally);
        if let Some(made) = held
            && best.is_none()
        {
            self.drop_older(key, write, made.saturating_add(1));
        }
        servable
    }

    /// Runs a loader under the hard timeout, counting failures.
    async fn bounded<T, E>(&self, load: impl Future<Output = Result<T, E>>) -> Result<T, CacheError>
    where
        E: Into<Box<dyn StdError + Send + Sync>>,
    {
        let result = match self.config.loader_hard_timeout {
            Some(limit) => tokio::select! {
                result = load => result,
                () = self.clock.sleep(limit) => {
                    self.metrics.load_timeouts.increment(1);
                    return Err(CacheError::new(CacheErrorKind::LoaderTimeout));
                }
            },
            None => load.await,
        };
        result.map_err(|error| {
            self.metrics.load_errors.increment(1);
            CacheError::with_source(CacheErrorKind::Loader, error)
        })
    }

    /// Puts a loaded value in L1 and returns its L2 entry; for a value L2 cannot hold (too
    /// large), a tombstone instead (see `forget`).
    ///
    /// The entry's created time (its version in L2) is `version`, the Unix microsecond the
    /// load began at: a write made meanwhile elsewhere is newer, so this entry never replaces
    /// it.
    fn store(
        &self,
        key: &K,
        value: Option<V>,
        write: WriteMark,
        version: u64,
        tags: Tags,
    ) -> Option<KvEntry> {
        let mut times = self.times(value.as_ref());
        times.set_created_micros(times.created_micros().min(version));
        let tag_refs: Vec<&str> = tags.iter().flat_map(|t| t.iter().map(|t| &**t)).collect();
        let entry = match &self.l2 {
            Some(l2) => match self.entry(l2, key, value.as_ref(), times, &tag_refs) {
                Ok(entry) => Some(entry),
                Err(error) => {
                    self.metrics.oversized.increment(1);
                    tracing::warn!(%error, "loaded value not cached");
                    // Whatever the cache held for the key before the load is older than this
                    // value: neither a read (from L2) nor fail-safe may serve it again.
                    return self.forget(key, write, version);
                }
            },
            None => None,
        };
        let mut slot = self.slot(
            value,
            times,
            self.clock.now(),
            self.clock.unix_millis(),
            tags,
        );
        self.weigh(key, &mut slot, entry.as_ref().map(|e| e.value.len()));
        self.load_changes_l1(write);
        self.fill_l1(key, slot, write);
        entry
    }

    /// The source no longer has the key (and "not found" is not cached): drops the copy
    /// held here and returns a tombstone for L2, versioned when the load began so that it
    /// replaces only entries older than the load.
    fn forget(&self, key: &K, write: WriteMark, version: u64) -> Option<KvEntry> {
        self.drop_older(key, write, version);
        let l2 = self.l2.as_ref()?;
        self.tombstone(l2, key, version).ok()
    }

    /// After failed load `load` was answered with `stale`, lets it rest for the fail-safe
    /// throttle (within its fail-safe window and `l1_max_ttl`): L1 serves it, and a load that
    /// finds that very copy serves it (see `resting_copy`), without calling the loader.
    ///
    /// Judged by the key itself, not by its write stripe, which writes of other keys change
    /// too: a write, invalidation or flush of the key detached the load, and then nothing
    /// rests. In L1 the copy held there (the same version) is extended; `stale` goes in
    /// where L1 holds nothing or an older copy only while the stripe shows no write since
    /// `write` and none on its way to L2 (a removal on its way dropped the copy from L1, and
    /// it must not come back); otherwise it rests apart from L1 only.
    fn rest(&self, key: &K, stale: &Slot<V>, write: WriteMark, load: u64) {
        let throttle = self.config.fail_safe_throttle;
        if throttle.is_zero() || !self.attached(key, load) {
            return;
        }
        let now = self.clock.now();
        let mut until = (now + throttle).min(stale.stale_until);
        if let Some(cap) = self.config.l1_max_ttl {
            // Not behind L2 for longer than the cap: past it the loader may be tried again.
            until = until.min(now + cap);
        }
        let version = stale.created_micros;
        if self.l1_usable() {
            let settled = self.settled(write);
            let rested = |mut slot: Slot<V>| {
                slot.fresh_until = until;
                slot.expires_at = until;
                Op::Put(slot)
            };
            self.l1
                .entry(key.clone())
                .and_compute_with(|held| match held {
                    Some(held) if held.value().created_micros == version => {
                        rested(held.into_value())
                    }
                    Some(held) if held.value().created_micros > version => Op::Nop,
                    _ if settled => rested(stale.clone()),
                    _ => Op::Nop,
                });
        }
        self.resting_len.fetch_add(1, Ordering::AcqRel);
        self.resting.insert(key.clone(), Rest { version, until });
        // A write, invalidation or flush of the key since the first look may have come
        // between that look and the changes above: it ends the rest all the same.
        if !self.attached(key, load) {
            self.resting.invalidate(key);
            self.l1
                .entry(key.clone())
                .and_compute_with(|held| match held {
                    Some(held)
                        if held.value().created_micros == version
                            && held.value().expires_at == until =>
                    {
                        Op::Remove
                    }
                    _ => Op::Nop,
                });
        }
    }

    /// Whether `stale`, a load's candidate past its TTL, is the copy resting for `key` (see
    /// `rest`): then it is served without calling the loader. It was found after L2's
    /// tombstones and newer writes, and the hides, were taken into account, so the rest
    /// serves nothing that fail-safe would not.
    fn resting_copy(&self, key: &K, stale: &Slot<V>, now: Instant) -> bool {
        self.resting
            .get(key)
            .is_some_and(|rest| rest.version == stale.created_micros && now < rest.until)
    }

    /// Registers one batch load for every key not already in flight. Returns that load (if any
    /// key needed it) and, per key in order, what to wait on.
    fn join_or_load_many<'k, F, Fut, E>(
        this: &Arc<Self>,
        keys: impl Iterator<Item = &'k K>,
        loader: F,
    ) -> (Option<Batch<V>>, Vec<Wait<V>>)
    where
        F: FnOnce(Vec<K>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<HashMap<K, V>, E>> + Send + 'static,
        E: Into<Box<dyn StdError + Send + Sync>> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel::<Vec<Outcome<V>>>();
        let (early_reply, early) = oneshot::channel::<Vec<Option<Outcome<V>>>>();
        let batch: Batch<V> = Arc::new(Answers {
            early: early.map(|early| early.ok().map(Arc::new)).boxed().shared(),
            all: answer
                .map(|answer| answer.ok().map(Arc::new))
                .boxed()
                .shared(),
        });
        let load = this.loads.fetch_add(1, Ordering::Relaxed);
        let mut waits = Vec::with_capacity(keys.size_hint().0);
        let mut to_load = Vec::with_capacity(waits.capacity());
        let mut in_flight = this.in_flight.lock();
        let now = this.clock.now();
        for key in keys {
            let own = |to_load: &mut Vec<K>| {
                let at = to_load.len();
                to_load.push(key.clone());
                (
                    InFlight {
                        load,
                        join: Join::Batch(Arc::clone(&batch), at),
                        answered_until: None,
                    },
                    Wait::Own(at),
                )
            };
            let wait = match in_flight.entry(key.clone()) {
                Entry::Occupied(mut entry) => match &entry.get().join {
                    // Listed twice in this call.
                    Join::Batch(_, at) if entry.get().load == load => Wait::Own(*at),
                    join if entry.get().joinable(now) => Wait::Joined(join.wait()),
                    // Its early answer is no longer servable: a load of its own.
                    _ => {
                        this.overtake(key);
                        let (flight, wait) = own(&mut to_load);
                        entry.insert(flight);
                        wait
                    }
                },
                Entry::Vacant(entry) => {
                    let (flight, wait) = own(&mut to_load);
                    entry.insert(flight);
                    wait
                }
            };
            waits.push(wait);
        }
        drop(in_flight);
        if to_load.is_empty() {
            return (None, waits);
        }
        // As in `join_or_load`: the guard goes with the task from the start.
        let done = InFlightGuard {
            inner: Arc::clone(this),
            load,
            keys: to_load,
        };
        tokio::spawn(
            Arc::clone(this)
                .load_many(done, loader, reply, early_reply)
                .in_current_span(),
        );
        (Some(batch), waits)
    }

    /// The load task of a batch: one L2 round trip, then one loader call for what is left.
    async fn load_many<F, Fut, E>(
        self: Arc<Self>,
        done: InFlightGuard<K, V, Vec<K>>,
        loader: F,
        reply: oneshot::Sender<Vec<Outcome<V>>>,
        early_reply: oneshot::Sender<Vec<Option<Outcome<V>>>>,
    ) where
        F: FnOnce(Vec<K>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<HashMap<K, V>, E>> + Send + 'static,
        E: Into<Box<dyn StdError + Send + Sync>> + Send + 'static,
    {
        let keys = &done.keys;
        let writes: Vec<WriteMark> = keys.iter().map(|key| self.mark(key)).collect();
        // L1 again, after the marks: a write or another load may have put a value there since
        // the caller looked, and it must be seen, not loaded over.
        let now = self.clock.now();
        let l1_usable = self.l1_usable();
        // Mostly absent: `contains_key` first, which (unlike `get`) records no read.
        let mut best: Vec<Option<Slot<V>>> = keys
            .iter()
            .map(|key| {
                let held = l1_usable && self.l1.contains_key(key);
                self.l1_get(key, held).filter(|slot| now < slot.stale_until)
            })
            .collect();
        // Per key, in order; `None` until known.
        let mut outcomes: Vec<Option<Outcome<V>>> = vec![None; keys.len()];
        let mut fill = vec![false; keys.len()];
        if let Some(l2) = &self.l2 {
            let mut batch = l2.namespace.key_batch(keys.len());
            for key in keys {
                if let Err(error) = key.with_key_bytes(|bytes| batch.push(bytes)) {
                    let error = CacheError::with_source(CacheErrorKind::InvalidKey, error);
                    let _ = reply.send(vec![Err(error); keys.len()]);
                    return;
                }
            }
            let full = batch.finish();
            let values = self
                .l2_get_many(l2, &full)
                .await
                .unwrap_or_else(|| vec![None; keys.len()]);
            let unix_now = self.clock.unix_millis();
            let mut unsure = Vec::new();
            // Every key is adopted once, found or not, so each counts one L2 hit or miss.
            let mut tally = L2Tally::default();
            for (i, (bytes, full)) in values.iter().zip(&full).enumerate() {
                let found = match bytes {
                    Some(bytes) => match self.decode(l2, full, bytes, now, unix_now, false) {
                        Ok(found) => found,
                        Err(Unsure) => {
                            unsure.push(i);
                            continue;
                        }
                    },
                    None => None,
                };
                let (key, write) = (&keys[i], writes[i]);
                fill[i] = self.adopt_over_copy(key, write, found, &mut best[i], now, &mut tally);
            }
            tally.record(&self.metrics);
            if !unsure.is_empty() {
                let needing: Vec<&[u8]> = unsure
                    .iter()
                    .filter_map(|&i| values[i].as_deref())
                    .collect();
                // Unless L2 answered, the entries stay misses.
                let learned = self.learn_hides(l2, &needing, now).await;
                for i in unsure {
                    let found = values[i].as_deref().filter(|_| learned).and_then(|bytes| {
                        self.decode(l2, &full[i], bytes, now, unix_now, true)
                            .ok()
                            .flatten()
                    });
                    fill[i] = self.adopt(&keys[i], writes[i], found, &mut best[i], now);
                }
            }
        }
        let mut to_load = Vec::new();
        let mut answered_all = true;
        for (i, slot) in best.iter().enumerate() {
            match slot {
                Some(slot) if now < slot.fresh_until => {
                    outcomes[i] = Some(Ok(slot.value.clone()));
                }
                Some(slot) if now < slot.expires_at => {
                    outcomes[i] = Some(Ok(slot.value.clone()));
                    to_load.push(i);
                }
                // Resting after a failed load: not loaded again within the throttle.
                Some(slot) if self.resting_copy(&keys[i], slot, now) => {
                    self.metrics.stale_served.increment(1);
                    outcomes[i] = Some(Ok(slot.value.clone()));
                }
                _ => {
                    answered_all = false;
                    to_load.push(i);
                }
            }
        }
        let mut reply = Some(reply);
        // Readers joining a key answered here get its value only while it is servable.
        let answered_until = |outcomes: &[Option<Outcome<V>>]| {
            let answered = keys.iter().zip(&best).zip(outcomes);
            self.answered_until(
                answered.filter_map(|((key, slot), outcome)| {
                    Some((key, slot.as_ref().filter(|_| outcome.is_some())?.expires_at))
                }),
                done.load,
            );
        };
        if answered_all && let Some(reply) = reply.take() {
            // Everything goes in the full answer, now.
            drop(early_reply);
            // Keep the outcomes only when a refresh below still needs them.
            let answer = if to_load.is_empty() {
                std::mem::take(&mut outcomes)
            } else {
                answered_until(&outcomes);
                outcomes.clone()
            };
            let _ = reply.send(answers(answer));
            // Let the callers run before the fills below.
            tokio::task::yield_now().await;
        } else {
            answered_until(&outcomes);
            let _ = early_reply.send(outcomes.clone());
        }
        // Per key, whether the cache held a value (which a "not found" must remove) and its
        // tags (which a loaded value keeps); only a load reads them.
        let held: Vec<Option<Tags>> = if to_load.is_empty() {
            Vec::new()
        } else {
            best.iter()
                .map(|slot| slot.as_ref().map(|slot| slot.tags.clone()))
                .collect()
        };
        // Filled slots are servable, so their outcome is known; one being refreshed is kept
        // for the rest after a failed refresh.
        for (i, slot) in best.iter_mut().enumerate() {
            if !fill[i] {
                continue;
            }
            let filled = match slot {
                Some(fresh) if now < fresh.fresh_until => slot.take(),
                refreshing => refreshing.clone(),
            };
            if let Some(filled) = filled {
                self.fill_l1(&keys[i], filled, writes[i]);
            }
        }
        if to_load.is_empty() {
            return;
        }
        let started = self.clock.now();
        let version = self.clock.unix_micros();
        let result = self
            .bounded(loader(to_load.iter().map(|&i| keys[i].clone()).collect()))
            .await;
        self.metrics
            .load_duration
            .record(self.clock.now().saturating_duration_since(started));
        let mut entries = Vec::new();
        match result {
            Ok(mut found) => {
                self.metrics.loads.increment(1);
                for &i in &to_load {
                    let key = &keys[i];
                    let value = found.remove(key);
                    let entry = if value.is_some() || self.ttls.load().negative_ttl.is_some() {
                        let tags = held[i].clone().flatten();
                        self.store(key, value.clone(), writes[i], version, tags)
                    } else if held[i].is_some() {
                        self.forget(key, writes[i], version)
                    } else {
                        None
                    };
                    if let Some(entry) = entry
                        && self.attached(key, done.load)
                    {
                        entries.push(entry);
                    }
                    outcomes[i] = Some(Ok(value));
                }
            }
            Err(error) => {
                let now = self.clock.now();
                for &i in &to_load {
                    let key = &keys[i];
                    if outcomes[i].is_some() {
                        // Answered already (a refresh): its value rests too, so that a failing
                        // source is tried once per throttle, as for a single key.
                        if let Some(stale) = best[i].take().filter(|slot| now < slot.stale_until) {
                            self.rest(key, &stale, writes[i], done.load);
                        }
                        continue;
                    }
                    let outcome = match best[i].take().filter(|slot| now < slot.stale_until) {
                        Some(stale) => {
                            self.metrics.stale_served.increment(1);
                            self.rest(key, &stale, writes[i], done.load);
                            Ok(stale.value)
                        }
                        None => Err(error.clone()),
                    };
                    outcomes[i] = Some(outcome);
                }
            }
        }
        if let Some(reply) = reply.take() {
            let _ = reply.send(answers(outcomes));
        }
        if let Some(l2) = &self.l2 {
            l2.set_loaded(&entries).await;
        }
    }
}

impl<K, V> Local for Inner<K, V>
where
    K: CacheKey,
    V: Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    fn invalidate_keys(&self, keys: &[&[u8]]) {
        for bytes in keys {
            match K::from_key_bytes(bytes) {
                Some(key) => {
                    self.bump_writes(&key);
                    self.l1.invalidate(&key);
                }
                // Bytes no key of this type has: nothing in L1 to drop.
                None if K::REBUILDS_EVERY_KEY => {}
                // A key type that cannot be rebuilt from its bytes: drop everything instead.
                None => return self.flush(),
            }
        }
    }

    fn outdated_keys(&self, keys: &[&[u8]]) {
        // L2 first: a read that misses L1 once it is dropped must not find the old copy there.
        if let Some(l2) = &self.l2 {
            let full: Vec<Key> = keys
                .iter()
                .filter_map(|bytes| l2.namespace.key(bytes).ok())
                .collect();
            // The write that missed L2 was made elsewhere, before the message: any write made
            // here from the next millisecond on is newer (a version is the created-at
            // millisecond, then the microseconds within it).
            let missed = (self.clock.unix_millis(), u16::MAX);
            l2.outdated_elsewhere(full.iter().map(|key| (key, missed)));
        }
        self.invalidate_keys(keys);
    }

    fn flush(&self) {
        for count in &self.writes {
            count.fetch_add(1, Ordering::AcqRel);
        }
        self.in_flight.lock().clear();
        self.l1.invalidate_all();
        self.resting.invalidate_all();
    }

    fn messages_lost(&self) {
        self.hides.lost();
        self.flush();
    }

    fn clear(&self, at_unix_ms: u64) {
        self.clear_at(at_unix_ms);
    }

    fn invalidate_tag(&self, tag: &str, at_unix_ms: u64) {
        self.hide_tag(tag, at_unix_ms);
    }
}

/// A write on its way to L2 (see `Inner::begin_write`).
struct Writing<K: CacheKey, V> {
    inner: Arc<Inner<K, V>>,
    key: K,
    stripe: usize,
}

impl<K: CacheKey, V> Drop for Writing<K, V> {
    fn drop(&mut self) {
        // Bumped before the count falls, so no read that saw the old L2 state can fill L1;
        // and a load begun while the write was on its way is detached: its source may not
        // have the write yet (a write-behind), so its value must not reach L2.
        self.inner.writes[self.stripe].fetch_add(1, Ordering::AcqRel);
        self.inner.in_flight.lock().remove(&self.key);
        self.inner.writing[self.stripe].fetch_sub(1, Ordering::AcqRel);
    }
}

/// Removes keys from the in-flight map when their load task ends, however it ends (dropped
/// before it ever ran included).
struct InFlightGuard<K: CacheKey, V, Keys: AsRef<[K]>> {
    inner: Arc<Inner<K, V>>,
    load: u64,
    keys: Keys,
}

impl<K: CacheKey, V, Keys: AsRef<[K]>> Drop for InFlightGuard<K, V, Keys> {
    fn drop(&mut self) {
        let mut in_flight = self.inner.in_flight.lock();
        for key in self.keys.as_ref() {
            // A write may have detached this load and a newer one taken its place: put that
            // one back (rare; removing first takes one lookup instead of two).
            if let Some(entry) = in_flight.remove(key)
                && entry.load != self.load
            {
                in_flight.insert(key.clone(), entry);
            }
        }
    }
}

/// Takes a slot read from L2 as the key's best candidate when it is at least as new as
/// L1's. Returns whether it may be served and so should fill L1; a slot past its TTL is kept
/// only as a fail-safe candidate and counts as a miss, and one past its fail-safe window (a
/// tombstone, say) leaves no candidate: L1's older copy was replaced after it was made.
fn adopt<V>(
    found: Option<Slot<V>>,
    best: &mut Option<Slot<V>>,
    now: Instant,
    tally: &mut L2Tally,
) -> bool {
    let newer = found.filter(|slot| {
        best.as_ref()
            .is_none_or(|b| slot.created_micros >= b.created_micros)
    });
    let Some(slot) = newer else {
        tally.misses += 1;
        return false;
    };
    let servable = now < slot.expires_at;
    if servable {
        tally.hits += 1;
    } else {
        tally.misses += 1;
    }
    *best = (now < slot.stale_until).then_some(slot);
    servable
}

/// L2 hits and misses counted over a read, recorded once.
#[derive(Default)]
struct L2Tally {
    hits: u64,
    misses: u64,
}

impl L2Tally {
    fn record(self, metrics: &Metrics) {
        if self.hits > 0 {
            metrics.l2_hits.increment(self.hits);
        }
        if self.misses > 0 {
            metrics.l2_misses.increment(self.misses);
        }
    }
}

/// Refuses an empty tag, one over 255 bytes, or more than `MAX_TAGS` tags.
fn check_tags(tags: &[&str]) -> Result<(), CacheError> {
    if tags.len() > envelope::MAX_TAGS || tags.iter().any(|t| t.is_empty() || t.len() > 255) {
        return Err(CacheError::new(CacheErrorKind::InvalidTag));
    }
    Ok(())
}

fn send<V>(reply: &mut Option<oneshot::Sender<Outcome<V>>>, outcome: Outcome<V>) {
    if let Some(reply) = reply.take() {
        // Every caller may have gone; the load still fills the cache.
        let _ = reply.send(outcome);
    }
}

/// `at` in Unix microseconds (0 before the epoch).
fn unix_micros(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
    })
}

pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
