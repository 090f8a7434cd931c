use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use headroom_core::bus::Subscription;
use headroom_core::bus::{DynInvalidationBus, InvalidationBus};
use headroom_core::kv::{DynKvStore, KvStore};
use headroom_core::lease::{DynLeaseStore, LeaseStore};
use headroom_core::{Clock, Namespace};
use moka::notification::RemovalCause;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{Bound, Codec, Postcard, ValueCodec};
use crate::l2::L2;
use crate::lock::FleetLock;
use crate::metrics::Metrics;
use crate::{Cache, CacheConfig, CacheKey, ConfigError, InvalidationConfig, ShutdownGroup};

/// Chooses an entry's TTL from its value.
pub(crate) type TtlFn<V> = Arc<dyn Fn(&V) -> Duration + Send + Sync>;

/// Builds a [`Cache`]. Start with [`Cache::builder`].
#[must_use]
pub struct CacheBuilder<K, V> {
    config: CacheConfig,
    /// A name given with [`name`](CacheBuilder::name): it outlasts a later `config`.
    name: Option<String>,
    clock: Clock,
    l2: Option<(DynKvStore, Namespace)>,
    codec: Box<dyn ValueCodec<V>>,
    ttl_by: Option<TtlFn<V>>,
    invalidation: Option<(DynInvalidationBus, InvalidationConfig)>,
    external_writes: Option<Subscription>,
    shutdown_group: Option<ShutdownGroup>,
    fleet_lock: Option<(DynLeaseStore, Duration)>,
    key: PhantomData<fn(K)>,
}

impl<K, V> fmt::Debug for CacheBuilder<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("config", &self.config)
            .field("clock", &self.clock)
            .field("l2", &self.l2)
            .field("codec", &self.codec)
            .finish_non_exhaustive()
    }
}

impl<K, V> CacheBuilder<K, V>
where
    K: CacheKey,
    V: Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    pub(crate) fn new() -> Self {
        Self {
            config: CacheConfig::default(),
            name: None,
            clock: Clock::system(),
            l2: None,
            codec: Box::new(Bound::new(Postcard)),
            ttl_by: None,
            invalidation: None,
            external_writes: None,
            shutdown_group: None,
            fleet_lock: None,
            key: PhantomData,
        }
    }

    /// Replaces every setting of [`CacheConfig`] at once (for a configuration loaded from a
    /// file), but a name given with [`name`](Self::name), before or after, stays.
    pub fn config(mut self, config: CacheConfig) -> Self {
        self.config = config;
        self
    }

    /// The name used as the `cache` label of metrics and by a reload (default: the
    /// configuration's, `"default"`). It outlasts [`config`](Self::config): a cache built
    /// under a name (as `Headroom::cache` does) keeps it whatever file it is configured from.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The shared level: any [`KvStore`], with keys written under `namespace`.
    /// Without it the cache is L1 only.
    ///
    /// The cache also keeps records beside `namespace`, in `<namespace>.hidden` (its clears and
    /// tag invalidations) and `<namespace>.fleet-lock`; a namespace ending in either is
    /// refused at build, as it could be another cache's.
    pub fn l2(mut self, store: impl KvStore, namespace: Namespace) -> Self {
        self.l2 = Some((DynKvStore::new(store), namespace));
        self
    }

    /// Invalidation across instances over `bus` (memory or Redis): every write publishes the
    /// keys it changed, and every instance drops them from its L1 within milliseconds.
    /// Lost messages are detected and make L1 flushed or bypassed, so no instance serves from
    /// L1 a value invalidated longer ago than [`InvalidationConfig::max_silence`].
    ///
    /// Needs [`l2`](Self::l2): its namespace names the channel. The cache must be built inside
    /// a tokio runtime, which runs the publisher and listener tasks.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use headroom_cache::{Cache, InvalidationConfig};
    /// use headroom_core::memory::{MemoryBus, MemoryKvStore};
    /// use headroom_core::Namespace;
    ///
    /// // Two instances of one cache; in production, each in its own process over Redis.
    /// let (store, bus) = (MemoryKvStore::new(), MemoryBus::new());
    /// let instance = || {
    ///     Cache::<String, u64>::builder()
    ///         .l2(store.clone(), Namespace::new("app:stock").unwrap())
    ///         .invalidation(bus.clone(), InvalidationConfig::default())
    ///         .build()
    /// };
    /// let (a, b) = (instance()?, instance()?);
    /// b.insert("apples".into(), 3).await?;
    /// a.insert("apples".into(), 2).await?; // B drops its L1 copy when the message arrives
    /// b.remove_many(&["apples".into(), "pears".into()]).await?; // one message for both
    /// a.clear().await; // every instance
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub fn invalidation(mut self, bus: impl InvalidationBus, config: InvalidationConfig) -> Self {
        self.invalidation = Some((DynInvalidationBus::new(bus), config));
        self
    }

    /// Keys changed in L2 by other programs, so that L1 drops them too: a subscription whose
    /// messages are full L2 keys, such as `headroom_redis::tracked_writes` (Redis
    /// server-assisted tracking of the L2 namespace). While it reports a loss, L1 is flushed
    /// and bypassed until it is live again. Needs an L2 and a tokio runtime.
    pub fn external_writes(mut self, writes: Subscription) -> Self {
        self.external_writes = Some(writes);
        self
    }

    /// Adds the cache to `group`, so that [`ShutdownGroup::shutdown`] shuts it down with the
    /// others (see [`Cache::shutdown`]).
    pub fn shutdown_group(mut self, group: &ShutdownGroup) -> Self {
        self.shutdown_group = Some(group.clone());
        self
    }

    /// One load of a key at a time across every instance (a fleet-wide single flight): before
    /// calling its loader, an instance claims the key's lock in `leases` (memory or Redis,
    /// shared by the fleet). The holder loads and writes the value to L2; the others poll L2
    /// for a fresh value and use it, for at most `wait`, after which they load anyway, so a
    /// lost or slow holder never blocks reads. A lease store that does not answer within
    /// `l2_timeout` is skipped. Applies to `get_or_load` and its refreshes (not to batches).
    /// Needs an L2; lock records live in the namespace `<l2 namespace>.fleet-lock`.
    pub fn fleet_lock(mut self, leases: impl LeaseStore, wait: Duration) -> Self {
        self.fleet_lock = Some((DynLeaseStore::new(leases), wait));
        self
    }

    /// The codec of L2 values (default [`Postcard`]).
    pub fn codec<C: Codec>(mut self, codec: C) -> Self {
        self.codec = Box::new(Bound::new(codec));
        self
    }

    /// The clock (default [`Clock::system`]); a manual clock in tests.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// See [`CacheConfig::l1_max_capacity`].
    pub fn l1_max_capacity(mut self, entries: u64) -> Self {
        self.config.l1_max_capacity = entries;
        self
    }

    /// See [`CacheConfig::l1_max_bytes`].
    pub fn l1_max_bytes(mut self, bytes: u64) -> Self {
        self.config.l1_max_bytes = Some(bytes);
        self
    }

    /// See [`CacheConfig::l1_max_ttl`].
    pub fn l1_max_ttl(mut self, ttl: Duration) -> Self {
        self.config.l1_max_ttl = Some(ttl);
        self
    }

    /// See [`CacheConfig::ttl`].
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = ttl;
        self
    }

    /// Chooses each value's TTL from the value itself (for loaded and inserted values),
    /// instead of [`CacheConfig::ttl`], which stays the maximum: longer answers are cut to it.
    /// Jitter and the soft TTL still apply.
    pub fn ttl_by(mut self, ttl_by: impl Fn(&V) -> Duration + Send + Sync + 'static) -> Self {
        self.ttl_by = Some(Arc::new(ttl_by));
        self
    }

    /// See [`CacheConfig::soft_ttl`].
    pub fn soft_ttl(mut self, soft_ttl: Duration) -> Self {
        self.config.soft_ttl = Some(soft_ttl);
        self
    }

    /// See [`CacheConfig::ttl_jitter`].
    pub fn ttl_jitter(mut self, jitter: Duration) -> Self {
        self.config.ttl_jitter = jitter;
        self
    }

    /// See [`CacheConfig::negative_ttl`].
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.config.negative_ttl = Some(ttl);
        self
    }

    /// See [`CacheConfig::fail_safe_max_stale`].
    pub fn fail_safe_max_stale(mut self, max_stale: Duration) -> Self {
        self.config.fail_safe_max_stale = max_stale;
        self
    }

    /// See [`CacheConfig::fail_safe_throttle`].
    pub fn fail_safe_throttle(mut self, throttle: Duration) -> Self {
        self.config.fail_safe_throttle = throttle;
        self
    }

    /// See [`CacheConfig::loader_soft_timeout`].
    pub fn loader_soft_timeout(mut self, timeout: Duration) -> Self {
        self.config.loader_soft_timeout = Some(timeout);
        self
    }

    /// See [`CacheConfig::loader_hard_timeout`].
    pub fn loader_hard_timeout(mut self, timeout: Duration) -> Self {
        self.config.loader_hard_timeout = Some(timeout);
        self
    }

    /// See [`CacheConfig::l2_timeout`].
    pub fn l2_timeout(mut self, timeout: Duration) -> Self {
        self.config.l2_timeout = timeout;
        self
    }

    /// See [`CacheConfig::l2_failure_threshold`].
    pub fn l2_failure_threshold(mut self, failures: u32) -> Self {
        self.config.l2_failure_threshold = failures;
        self
    }

    /// See [`CacheConfig::l2_cooldown`].
    pub fn l2_cooldown(mut self, cooldown: Duration) -> Self {
        self.config.l2_cooldown = cooldown;
        self
    }

    /// See [`CacheConfig::l2_max_pending_deletes`].
    pub fn l2_max_pending_deletes(mut self, keys: usize) -> Self {
        self.config.l2_max_pending_deletes = keys;
        self
    }

    /// See [`CacheConfig::l1_eviction_metric`].
    pub fn l1_eviction_metric(mut self, enabled: bool) -> Self {
        self.config.l1_eviction_metric = enabled;
        self
    }

    /// See [`CacheConfig::schema_version`].
    pub fn schema_version(mut self, version: u32) -> Self {
        self.config.schema_version = version;
        self
    }

    /// See [`CacheConfig::max_value_len`].
    pub fn max_value_len(mut self, bytes: usize) -> Self {
        self.config.max_value_len = bytes;
        self
    }

    /// Builds the cache, or says which setting cannot work.
    pub fn build(mut self) -> Result<Cache<K, V>, ConfigError> {
        if let Some(name) = self.name.take() {
            self.config.name = name;
        }
        self.config.validate().map_err(ConfigError::new)?;
        if let Some((_, namespace)) = &self.l2 {
            check_beside(namespace)?;
        }
        let invalidation = match (self.invalidation, &self.l2) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "invalidation needs an l2, whose namespace names the channel",
                ));
            }
            (Some((bus, config)), Some((_, namespace))) => {
                config.validate().map_err(ConfigError::new)?;
                if tokio::runtime::Handle::try_current().is_err() {
                    return Err(ConfigError::new(
                        "a cache with invalidation must be built inside a tokio runtime",
                    ));
                }
                let channel = namespace
                    .key("~invalidation")
                    .map_err(|_| ConfigError::new("invalid invalidation channel"))?;
                Some((bus, channel, config))
            }
        };
        let external_writes = match (self.external_writes, &self.l2) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "external writes need an l2 namespace to watch",
                ));
            }
            (Some(writes), Some((_, namespace))) => {
                if tokio::runtime::Handle::try_current().is_err() {
                    return Err(ConfigError::new(
                        "a cache watching external writes must be built inside a tokio runtime",
                    ));
                }
                let prefix = namespace
                    .key_from_parts(&[b"x"])
                    .map_err(|_| ConfigError::new("invalid l2 namespace"))?;
                let prefix = prefix.as_bytes()[..prefix.as_bytes().len() - 1].to_vec();
                Some((writes, prefix))
            }
        };
        let fleet_lock = match (self.fleet_lock, &self.l2) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "a fleet lock needs an l2, where waiting instances find the loaded value",
                ));
            }
            (Some((store, wait)), Some((_, namespace))) => {
                Some(FleetLock::new(store, namespace, wait)?)
            }
        };
        let metrics = Arc::new(Metrics::new(&self.config.name));
        let l1 = match self.config.l1_max_bytes {
            Some(bytes) => moka::sync::Cache::builder()
                .max_capacity(bytes)
                .weigher(|_, slot: &crate::cache::Slot<V>| slot.weight),
            None => moka::sync::Cache::builder().max_capacity(self.config.l1_max_capacity),
        };
        let mut l1 = l1
            // Serving decisions use the cache's clock and each entry's deadlines; this only
            // frees memory once no entry can be served any more, fail-safe window included. A
            // global TTL keeps moka's read path as fast as without expiry.
            .time_to_live(self.config.max_entry_lifetime());
        if self.config.l1_eviction_metric {
            let evictions = metrics.evictions.clone();
            l1 = l1.eviction_listener(move |_, _, cause| {
                if cause == RemovalCause::Size {
                    evictions.increment(1);
                }
            });
        }
        let l1 = l1.build();
        let l2 = self
            .l2
            .map(|(store, namespace)| {
                L2::new(
                    store,
                    namespace,
                    &self.config,
                    self.codec.id(),
                    self.clock.clone(),
                    Arc::clone(&metrics),
                )
                .map(Arc::new)
            })
            .transpose()?;
        let cache = Cache::from_parts(
            l1,
            l2,
            self.codec,
            self.config,
            self.ttl_by,
            self.clock,
            metrics,
            invalidation,
            external_writes,
            fleet_lock,
        );
        if let Some(group) = &self.shutdown_group {
            cache.join(group);
        }
        Ok(cache)
    }
}

/// Refuses an L2 namespace ending like one a cache keeps beside its own (its hides, its fleet
/// lock): it could be another cache's, whose entries would overwrite them.
fn check_beside(namespace: &Namespace) -> Result<(), ConfigError> {
    let name = namespace.as_str();
    if name.ends_with(crate::hides::BESIDE) {
        return Err(ConfigError::new(
            "an l2 namespace ending in `.hidden` is reserved for a cache's hides",
        ));
    }
    if name.ends_with(crate::lock::BESIDE) {
        return Err(ConfigError::new(
            "an l2 namespace ending in `.fleet-lock` is reserved for a cache's fleet lock",
        ));
    }
    Ok(())
}
