//! [`Headroom`]: one shared backend handed to every part.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

use headroom_core::bus::DynInvalidationBus;
use headroom_core::jobs::DynJobStore;
use headroom_core::kv::DynKvStore;
use headroom_core::lease::DynLeaseStore;
use headroom_core::memory::{
    MemoryBus, MemoryJobStore, MemoryKvStore, MemoryLeaseStore, MemoryRateStore,
};
use headroom_core::rate::DynRateStore;
use headroom_core::{BackendError, BackendErrorKind, Classify, Clock, KeyError, Namespace};

/// Which backend a [`Headroom`] shares between its parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Backend {
    /// The in-memory backends of `headroom-core`: state shared by the tasks of one process.
    Memory,
    /// One Redis server: state shared by every instance of the service.
    Redis,
    /// A Redis Cluster.
    RedisCluster,
}

impl Backend {
    /// A short name: `memory`, `redis` or `redis-cluster`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Redis => "redis",
            Backend::RedisCluster => "redis-cluster",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a [`Headroom`] could not be built.
#[derive(Debug)]
#[non_exhaustive]
pub enum BuildError {
    /// The namespace was refused.
    Namespace(KeyError),
    /// The backend could not be reached.
    Backend(BackendError),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Namespace(err) => write!(f, "invalid headroom namespace: {err}"),
            BuildError::Backend(err) if err.kind() == BackendErrorKind::Config => {
                write!(f, "headroom backend misconfigured: {err}")
            }
            BuildError::Backend(err) => write!(f, "headroom backend unavailable: {err}"),
        }
    }
}

/// The message already names the cause, so `source` skips to the cause's own source and a
/// report that walks the chain does not print it twice. The cause itself is in the variant.
impl StdError for BuildError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            BuildError::Namespace(err) => err.source(),
            BuildError::Backend(err) => err.source(),
        }
    }
}

impl Classify for BuildError {
    fn is_timeout(&self) -> bool {
        matches!(self, BuildError::Backend(err) if err.is_timeout())
    }

    fn is_retryable(&self) -> bool {
        matches!(self, BuildError::Backend(err) if err.is_retryable())
    }
}

/// One backend (memory or Redis, chosen at run time) shared by every headroom part of a
/// service, under one namespace.
///
/// Build it once at start-up with [`Headroom::builder`] and clone it freely (it is reference
/// counted). Its methods start the builders of each part already wired to the shared stores:
/// caches get the KV store as L2, idempotency gets the lease store, and every component gets
/// the clock and a child of the namespace, so two services (or two caches) never share keys.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let headroom = headroom::Headroom::builder().namespace("shop").memory()?;
/// assert_eq!(headroom.backend(), headroom::Backend::Memory);
/// assert_eq!(headroom.namespace().as_str(), "shop");
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct Headroom {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    backend: Backend,
    namespace: Namespace,
    #[cfg(feature = "idempotency")]
    idempotency_namespace: Namespace,
    clock: Clock,
    kv: DynKvStore,
    bus: DynInvalidationBus,
    leases: DynLeaseStore,
    rates: DynRateStore,
    jobs: DynJobStore,
    /// Every cache built from [`Headroom::cache`], for [`Headroom::shutdown`].
    #[cfg(feature = "cache")]
    caches: headroom_cache::ShutdownGroup,
}

/// Builds a [`Headroom`]; finish with [`memory`](Self::memory) or, with the `redis` feature,
/// `redis`, `redis_cluster` or `redis_with`.
#[derive(Clone, Debug)]
#[must_use]
pub struct HeadroomBuilder {
    namespace: String,
    clock: Clock,
    tenant_share: std::num::NonZeroUsize,
}

impl Headroom {
    /// Starts building: namespace `headroom`, system clock.
    pub fn builder() -> HeadroomBuilder {
        HeadroomBuilder {
            namespace: String::from("headroom"),
            clock: Clock::system(),
            tenant_share: MEMORY_TENANT_SHARE,
        }
    }

    /// The shared backend's kind.
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// The namespace every part's keys live under.
    pub fn namespace(&self) -> &Namespace {
        &self.inner.namespace
    }

    /// The clock every part is built with.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// The shared KV store (the L2 of caches).
    pub fn kv_store(&self) -> &DynKvStore {
        &self.inner.kv
    }

    /// The shared invalidation bus.
    pub fn invalidation_bus(&self) -> &DynInvalidationBus {
        &self.inner.bus
    }

    /// The shared lease store (idempotency records).
    pub fn lease_store(&self) -> &DynLeaseStore {
        &self.inner.leases
    }

    /// The shared rate store (GCRA cells of distributed rate limits).
    pub fn rate_store(&self) -> &DynRateStore {
        &self.inner.rates
    }

    /// The shared job store (durable job queues and write-behind).
    pub fn job_store(&self) -> &DynJobStore {
        &self.inner.jobs
    }

    /// A job queue builder named `name`, on the shared job store under
    /// `<namespace>:jobs`, on the shared clock.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// use headroom::jobs::Job;
    ///
    /// let headroom = headroom::Headroom::builder().namespace("shop").memory()?;
    /// let checkout = headroom.job_queue("checkout")?.max_len(10_000).build()?;
    /// let enqueued = checkout.enqueue(Job::new("order 7")).await?;
    /// assert!(checkout.status(enqueued.id).await?.is_some());
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    #[cfg(feature = "jobs")]
    #[cfg_attr(docsrs, doc(cfg(feature = "jobs")))]
    pub fn job_queue(
        &self,
        name: impl Into<String>,
    ) -> Result<headroom_jobs::JobQueueBuilder<DynJobStore>, KeyError> {
        Ok(
            headroom_jobs::JobQueue::builder(name, self.inner.jobs.clone())
                .namespace(self.child_namespace("jobs")?)
                .clock(self.inner.clock.clone()),
        )
    }

    /// A write-behind builder named `name`, on the shared job store under
    /// `<namespace>:write-behind` (apart from the job queues, so that a queue and a
    /// write-behind of one name share nothing), on the shared clock.
    #[cfg(feature = "jobs")]
    #[cfg_attr(docsrs, doc(cfg(feature = "jobs")))]
    pub fn write_behind(
        &self,
        name: impl Into<String>,
    ) -> Result<headroom_jobs::WriteBehindBuilder<DynJobStore>, KeyError> {
        Ok(
            headroom_jobs::WriteBehind::builder(name, self.inner.jobs.clone())
                .namespace(self.child_namespace("write-behind")?)
                .clock(self.inner.clock.clone()),
        )
    }

    /// The namespace of one component: `<namespace>:<segment>`.
    pub fn child_namespace(&self, segment: &str) -> Result<Namespace, KeyError> {
        self.inner.namespace.child(segment)
    }

    /// The namespace of the part `name` of a `kind` of component: `<namespace>:<kind>:<name>`.
    /// The name is one segment: one holding `:` is refused, or two parts could share keys
    /// (`products` with key `v2:7` and `products:v2` with key `7`).
    #[cfg(any(feature = "cache", feature = "limit"))]
    fn part_namespace(&self, kind: &str, name: &str) -> Result<Namespace, KeyError> {
        if let Some(offset) = name.find(':') {
            return Err(KeyError::Separator { offset });
        }
        self.inner.namespace.child(kind)?.child(name)
    }

    /// A cache builder named `name`, with the shared KV store as L2 under
    /// `<namespace>:cache:<name>`, invalidation across instances over the shared bus (default
    /// [`InvalidationConfig`](headroom_cache::InvalidationConfig): a 2 s staleness bound when
    /// messages are lost), and the shared clock. `name` must be one namespace segment
    /// (`[A-Za-z0-9_./-]`; a name holding `:` is refused with [`KeyError::Separator`]), and not
    /// end in `.hidden` or `.fleet-lock` (the builder refuses it: another cache keeps records
    /// there). Build
    /// it inside a tokio runtime.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::time::Duration;
    ///
    /// let headroom = headroom::Headroom::builder().namespace("shop").memory()?;
    /// let prices = headroom
    ///     .cache::<u64, u32>("prices")?
    ///     .ttl(Duration::from_secs(60))
    ///     .build()?;
    /// let price = prices
    ///     .get_or_load(&7, |_| async { Ok::<_, std::io::Error>(Some(1_999)) })
    ///     .await?;
    /// assert_eq!(price, Some(1_999));
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    #[cfg(feature = "cache")]
    #[cfg_attr(docsrs, doc(cfg(feature = "cache")))]
    pub fn cache<K, V>(&self, name: &str) -> Result<headroom_cache::CacheBuilder<K, V>, KeyError>
    where
        K: headroom_cache::CacheKey,
        V: Clone + serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
    {
        let namespace = self.part_namespace("cache", name)?;
        Ok(headroom_cache::Cache::builder()
            .name(name)
            .clock(self.inner.clock.clone())
            .l2(self.inner.kv.clone(), namespace)
            .invalidation(
                self.inner.bus.clone(),
                headroom_cache::InvalidationConfig::default(),
            )
            .shutdown_group(&self.inner.caches))
    }

    /// Stops this instance gracefully, before the process exits: every cache built from
    /// `cache` (feature `cache`) sends its queued invalidations and a goodbye, so the other
    /// instances flush nothing for it (a crash costs each of them one L1 flush, as does a
    /// goodbye whose keys the bus refused). Await it on SIGTERM, after the server stopped
    /// taking requests.
    pub async fn shutdown(&self) {
        #[cfg(feature = "cache")]
        self.inner.caches.shutdown().await;
    }

    /// An idempotency executor builder over the shared lease store, with records under
    /// `<namespace>:idempotency` and the shared clock.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use headroom::idempotency::{IdempotencyKey, Scope};
    ///
    /// let headroom = headroom::Headroom::builder().namespace("shop").memory()?;
    /// let idempotency = headroom.idempotency().build()?;
    /// let scope = Scope::new("customer-1", "checkout")?;
    /// let key = IdempotencyKey::new("order-2b1f")?;
    /// let order = idempotency
    ///     .execute(&scope, &key, b"sku=7", || async { Ok::<_, std::io::Error>(41_u64) })
    ///     .await?;
    /// assert!(!order.replayed);
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    #[cfg(feature = "idempotency")]
    #[cfg_attr(docsrs, doc(cfg(feature = "idempotency")))]
    pub fn idempotency(&self) -> headroom_idempotency::IdempotencyBuilder<DynLeaseStore> {
        headroom_idempotency::Idempotency::builder(self.inner.leases.clone())
            .clock(self.inner.clock.clone())
            .namespace(self.inner.idempotency_namespace.clone())
    }

    /// The same backends, namespace and clock, each backend wrapped so that `experiment`
    /// injects into its calls: every part built from the result (caches, idempotency, rate
    /// limits, job queues) meets a slow, failing or stalling backend, and caches meet lost invalidation
    /// messages, while the experiment runs; while it is off, one relaxed load per call.
    /// Caches built from it share this instance's [`shutdown`](Self::shutdown).
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use headroom::chaos::{Delay, Experiment, ExperimentConfig};
    ///
    /// let headroom = headroom::Headroom::builder().namespace("shop").memory()?;
    /// let redis_slow = Experiment::builder("redis-slow").build()?;
    /// let under_chaos = headroom.with_chaos(&redis_slow);
    /// redis_slow.start(
    ///     ExperimentConfig::new(Duration::from_secs(60))
    ///         .latency(1.0, Delay::Fixed(Duration::from_millis(1))),
    /// )?;
    /// assert_eq!(under_chaos.namespace(), headroom.namespace());
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    #[cfg(feature = "chaos")]
    #[cfg_attr(docsrs, doc(cfg(feature = "chaos")))]
    pub fn with_chaos(&self, experiment: &headroom_chaos::Experiment) -> Headroom {
        use headroom_chaos::{
            ChaosBus, ChaosJobStore, ChaosKvStore, ChaosLeaseStore, ChaosRateStore,
        };

        let inner = &self.inner;
        Headroom {
            inner: Arc::new(Inner {
                backend: inner.backend,
                namespace: inner.namespace.clone(),
                #[cfg(feature = "idempotency")]
                idempotency_namespace: inner.idempotency_namespace.clone(),
                clock: inner.clock.clone(),
                kv: DynKvStore::new(ChaosKvStore::new(inner.kv.clone(), experiment.clone())),
                bus: DynInvalidationBus::new(ChaosBus::new(inner.bus.clone(), experiment.clone())),
                leases: DynLeaseStore::new(ChaosLeaseStore::new(
                    inner.leases.clone(),
                    experiment.clone(),
                )),
                rates: DynRateStore::new(ChaosRateStore::new(
                    inner.rates.clone(),
                    experiment.clone(),
                )),
                jobs: DynJobStore::new(ChaosJobStore::new(inner.jobs.clone(), experiment.clone())),
                #[cfg(feature = "cache")]
                caches: inner.caches.clone(),
            }),
        }
    }

    /// A bulkhead builder named `name`, on the shared clock.
    #[cfg(feature = "limit")]
    #[cfg_attr(docsrs, doc(cfg(feature = "limit")))]
    pub fn bulkhead(&self, name: impl Into<String>) -> headroom_limit::BulkheadBuilder {
        headroom_limit::Bulkhead::builder(name).clock(self.inner.clock.clone())
    }

    /// A tiered rate limiter builder named `name`, sharing its GCRA cells through the shared
    /// rate store under `<namespace>:rate:<name>`, on the shared clock. With the memory
    /// backend the limits hold for this process; with Redis they hold across every instance.
    /// `name` is one namespace segment: a name holding `:` is refused with
    /// [`KeyError::Separator`].
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use headroom::limit::rate::{Quota, RateLimit, TierConfig};
    ///
    /// let headroom = headroom::Headroom::builder().namespace("shop").memory()?;
    /// let tiers = TierConfig::new()
    ///     .tier("free", Quota::per_second(2)?)
    ///     .tier("premium", Quota::per_second(50)?);
    /// let limiter = headroom.rate_limiter("checkout", tiers)?.build()?;
    /// assert!(limiter.check("free", "customer-1", 1).await.is_ok());
    /// assert!(limiter.check("free", "customer-1", 1).await.is_ok());
    /// assert!(limiter.check("free", "customer-1", 1).await.is_err());
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    #[cfg(feature = "limit")]
    #[cfg_attr(docsrs, doc(cfg(feature = "limit")))]
    pub fn rate_limiter(
        &self,
        name: &str,
        tiers: headroom_limit::rate::TierConfig,
    ) -> Result<headroom_limit::rate::DistributedRateLimiterBuilder<DynRateStore>, KeyError> {
        let namespace = self.part_namespace("rate", name)?;
        Ok(headroom_limit::rate::DistributedRateLimiter::builder(
            name,
            self.inner.rates.clone(),
            namespace,
            tiers,
        )
        .clock(self.inner.clock.clone()))
    }

    /// A circuit breaker builder named `name`, on the shared clock.
    #[cfg(feature = "breaker")]
    #[cfg_attr(docsrs, doc(cfg(feature = "breaker")))]
    pub fn circuit_breaker<E>(
        &self,
        name: impl Into<Arc<str>>,
    ) -> headroom_breaker::CircuitBreakerBuilder<E> {
        headroom_breaker::CircuitBreaker::builder()
            .name(name)
            .clock(self.inner.clock.clone())
    }

    /// A pipeline builder (retry, breaker, timeout, hedging in one call) named `name` in
    /// metrics, on the shared clock.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// use std::time::Duration;
    ///
    /// let headroom = headroom::Headroom::builder().namespace("shop").memory()?;
    /// let inventory = headroom
    ///     .pipeline::<std::io::Error>("inventory")
    ///     .timeout(Duration::from_millis(300))
    ///     .build();
    /// let stock = inventory.call(|| async { Ok::<_, std::io::Error>(12) }).await?;
    /// assert_eq!(stock, 12);
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    #[cfg(feature = "breaker")]
    #[cfg_attr(docsrs, doc(cfg(feature = "breaker")))]
    pub fn pipeline<E>(&self, name: impl Into<Arc<str>>) -> headroom_breaker::PipelineBuilder<E> {
        headroom_breaker::Pipeline::builder()
            .name(name)
            .clock(self.inner.clock.clone())
    }

    /// A retry budget builder on the shared clock, to bound the retries and hedges of every
    /// caller of one dependency.
    #[cfg(feature = "breaker")]
    #[cfg_attr(docsrs, doc(cfg(feature = "breaker")))]
    pub fn retry_budget(&self) -> headroom_breaker::RetryBudgetBuilder {
        headroom_breaker::RetryBudget::builder().clock(self.inner.clock.clone())
    }
}

impl HeadroomBuilder {
    /// The namespace every key lives under (default `headroom`): 1 to 116 bytes of
    /// `[A-Za-z0-9_.:/-]`, checked when the backend is chosen. (A [`Namespace`] holds up to
    /// 128; idempotency records live under `<namespace>:idempotency`, and each cache and rate
    /// limiter under `<namespace>:<kind>:<name>`, within the same 128; a cache also keeps
    /// `.hidden` and, with a fleet lock, `.fleet-lock` after its own, so its build needs 7 or
    /// 11 bytes more.)
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The clock every part is built with (default [`Clock::system`]).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// On the memory backends, one tenant holds at most a `share`-th of the idempotency
    /// records, in count and in bytes (default 8, so that one tenant cannot fill them for
    /// all; 1 for a service whose requests all run under one principal).
    pub fn memory_tenant_share(mut self, share: std::num::NonZeroUsize) -> Self {
        self.tenant_share = share;
        self
    }

    /// Shares the in-memory backends of `headroom-core` (one process). Idempotency records are
    /// bounded to 1,000,000 and 256 MiB, and one tenant to a share of each
    /// ([`memory_tenant_share`](Self::memory_tenant_share)).
    pub fn memory(self) -> Result<Headroom, BuildError> {
        let namespaces = self.namespaces()?;
        let kv = MemoryKvStore::builder().clock(self.clock.clone()).build();
        let leases = MemoryLeaseStore::builder()
            .clock(self.clock.clone())
            .max_records(MEMORY_MAX_RECORDS)
            .max_bytes(MEMORY_MAX_BYTES)
            .max_records_per_scope(MEMORY_MAX_RECORDS / self.tenant_share)
            .max_bytes_per_scope(MEMORY_MAX_BYTES / self.tenant_share)
            .build();
        let rates = MemoryRateStore::with_limits(self.clock.clone(), MEMORY_MAX_RECORDS);
        let jobs = MemoryJobStore::builder().clock(self.clock.clone()).build();
        Ok(self.finish(
            Backend::Memory,
            namespaces,
            Stores {
                kv: DynKvStore::new(kv),
                bus: DynInvalidationBus::new(MemoryBus::new()),
                leases: DynLeaseStore::new(leases),
                rates: DynRateStore::new(rates),
                jobs: DynJobStore::new(jobs),
            },
        ))
    }

    /// Connects to one Redis server at `url` (`redis://host:port`) and shares it.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub async fn redis(self, url: impl Into<String>) -> Result<Headroom, BuildError> {
        self.redis_with(headroom_redis::RedisConfig::standalone(url))
            .await
    }

    /// Connects to a Redis Cluster through its seed nodes and shares it.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub async fn redis_cluster<I, S>(self, seeds: I) -> Result<Headroom, BuildError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.redis_with(headroom_redis::RedisConfig::cluster(seeds))
            .await
    }

    /// Connects to Redis as `config` says (timeouts, standalone or cluster) and shares it.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub async fn redis_with(
        self,
        config: headroom_redis::RedisConfig,
    ) -> Result<Headroom, BuildError> {
        use headroom_redis::{
            Redis, RedisBus, RedisJobStore, RedisKvStore, RedisLeaseStore, RedisRateStore,
        };

        let namespaces = self.namespaces()?;
        let redis = Redis::connect(config).await.map_err(BuildError::Backend)?;
        let backend = if redis.is_cluster() {
            Backend::RedisCluster
        } else {
            Backend::Redis
        };
        let bus = RedisBus::connect(redis.clone())
            .await
            .map_err(BuildError::Backend)?;
        Ok(self.finish(
            backend,
            namespaces,
            Stores {
                kv: DynKvStore::new(RedisKvStore::new(redis.clone())),
                bus: DynInvalidationBus::new(bus),
                leases: DynLeaseStore::new(RedisLeaseStore::new(redis.clone())),
                rates: DynRateStore::new(RedisRateStore::new(redis.clone())),
                jobs: DynJobStore::new(RedisJobStore::new(redis)),
            },
        ))
    }

    /// The application's namespace and the idempotency records' one inside it.
    fn namespaces(&self) -> Result<(Namespace, Namespace), BuildError> {
        let namespace = Namespace::new(&self.namespace).map_err(BuildError::Namespace)?;
        let idempotency = namespace
            .child("idempotency")
            .map_err(BuildError::Namespace)?;
        Ok((namespace, idempotency))
    }

    fn finish(
        self,
        backend: Backend,
        #[cfg_attr(not(feature = "idempotency"), allow(unused_variables))]
        (namespace, idempotency_namespace): (Namespace, Namespace),
        Stores {
            kv,
            bus,
            leases,
            rates,
            jobs,
        }: Stores,
    ) -> Headroom {
        Headroom {
            inner: Arc::new(Inner {
                backend,
                namespace,
                #[cfg(feature = "idempotency")]
                idempotency_namespace,
                clock: self.clock,
                kv,
                bus,
                leases,
                rates,
                jobs,
                #[cfg(feature = "cache")]
                caches: headroom_cache::ShutdownGroup::new(),
            }),
        }
    }
}

/// The stores a [`Headroom`] shares, one of each backend trait.
struct Stores {
    kv: DynKvStore,
    bus: DynInvalidationBus,
    leases: DynLeaseStore,
    rates: DynRateStore,
    jobs: DynJobStore,
}

/// Records (idempotency records, rate cells) the memory backends keep at most, so attacker-chosen
/// keys cannot grow memory without bound.
const MEMORY_MAX_RECORDS: usize = 1_000_000;

/// Bytes of idempotency records the memory backend keeps at most.
const MEMORY_MAX_BYTES: usize = 256 << 20;

/// One tenant holds at most this fraction of the memory idempotency records by default, in
/// count and in bytes, so that it cannot fill them for every tenant.
const MEMORY_TENANT_SHARE: std::num::NonZeroUsize = std::num::NonZeroUsize::new(8).unwrap();
