//! Rate limits shared by every instance of a service, over a [`RateStore`].

use std::collections::HashMap;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use futures_util::future::{Either, select};
use headroom_core::metrics::Counter;
use headroom_core::rate::{Gcra, RateDecision, RateStore};
use headroom_core::{BackendError, BackendErrorKind, Clock, Key, Namespace, Stopwatch};
use tracing::Instrument;

use super::cells::TierCells;
use super::limiter::record;
use super::local::nanos;
use super::reserved::{Local, LocalState, REFUSAL_MEMORY_NS, fnv1a};
use super::{
    Admitted, Quota, Quotas, RateError, RateErrorKind, RateLimit, RateLimited, TierConfig, wait,
};
use crate::ConfigError;
use crate::metrics::TierMetrics;

/// What a [`DistributedRateLimiter`] does while its store is unreachable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(tag = "mode", rename_all = "snake_case", from = "FallbackFields")
)]
#[non_exhaustive]
pub enum Fallback {
    /// Enforce, in each instance, its share of the quota: rate and burst divided by
    /// `instances` (see [`Quota::share`](super::Quota::share)). With that many instances up,
    /// the service as a whole stays within the quota's rate; each instance starts its share
    /// full when the store goes away, and a share's burst is at least one unit, so the fleet
    /// may admit up to `instances` units at once then, when the quota's burst is smaller.
    Local {
        /// How many instances share the quota.
        instances: u32,
    },
    /// Admit everything: availability over enforcement.
    Open,
    /// Refuse everything with [`RateErrorKind::Unavailable`]: enforcement over availability.
    Closed,
}

/// [`Fallback`] as loaded: serde lets a unit variant of a tagged enum take any field, so each
/// mode is a struct variant here, and a field it does not take is refused.
#[cfg(feature = "serde")]
#[derive(serde::Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
enum FallbackFields {
    Local { instances: u32 },
    Open {},
    Closed {},
}

#[cfg(feature = "serde")]
impl From<FallbackFields> for Fallback {
    fn from(fields: FallbackFields) -> Self {
        match fields {
            FallbackFields::Local { instances } => Fallback::Local { instances },
            FallbackFields::Open {} => Fallback::Open,
            FallbackFields::Closed {} => Fallback::Closed,
        }
    }
}

impl Fallback {
    fn as_str(self) -> &'static str {
        match self {
            Fallback::Local { .. } => "local",
            Fallback::Open => "open",
            Fallback::Closed => "closed",
        }
    }
}

/// Configuration of a [`DistributedRateLimiter`], loadable with serde (feature `serde`,
/// human-readable durations). Every field but `tiers` has the builder's default.
///
/// ```
/// # #[cfg(feature = "serde")] {
/// use std::time::Duration;
/// use headroom_limit::rate::{DistributedConfig, Fallback};
///
/// let config: DistributedConfig = serde_json::from_str(r#"{
///     "tiers": { "free": { "limit": 60, "period": "1m" } },
///     "batch": 5,
///     "fallback": { "mode": "local", "instances": 4 },
///     "timeout": "50ms"
/// }"#).unwrap();
/// assert_eq!(config.fallback, Fallback::Local { instances: 4 });
/// assert_eq!(config.timeout, Duration::from_millis(50));
/// assert_eq!(config.retry_after_failure, Duration::from_secs(1));
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct DistributedConfig {
    /// Quotas by tier.
    pub tiers: TierConfig,
    /// Units reserved per round trip (1: exact mode).
    pub batch: u32,
    /// What to do while the store is unreachable.
    pub fallback: Fallback,
    /// How long a store call may take (more than zero).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub timeout: Duration,
    /// How long to use the fallback after a failed store call (more than zero).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub retry_after_failure: Duration,
    /// The most keys held per tier in local state.
    pub max_keys_per_tier: usize,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        Self {
            tiers: TierConfig::new(),
            batch: 1,
            fallback: Fallback::Local { instances: 1 },
            timeout: Duration::from_millis(100),
            retry_after_failure: Duration::from_secs(1),
            max_keys_per_tier: 100_000,
        }
    }
}

/// Builds a [`DistributedRateLimiter`].
#[derive(Debug)]
#[must_use]
pub struct DistributedRateLimiterBuilder<S> {
    name: String,
    store: S,
    namespace: Namespace,
    tiers: TierConfig,
    clock: Clock,
    batch: u32,
    fallback: Fallback,
    timeout: Duration,
    retry_after_failure: Duration,
    max_keys: usize,
}

impl<S: RateStore> DistributedRateLimiterBuilder<S> {
    /// The clock local decisions read (default: the system clock). The store keeps its own
    /// time for shared cells.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Reserve up to `units` at a time from the store and spend them locally (default 1:
    /// every decision is one round trip). See the type's documentation for how batches are
    /// sized and the bound this keeps.
    pub fn batch(mut self, units: u32) -> Self {
        self.batch = units;
        self
    }

    /// What to do while the store is unreachable (default: [`Fallback::Local`] for one
    /// instance, that is the whole quota per instance).
    pub fn fallback(mut self, fallback: Fallback) -> Self {
        self.fallback = fallback;
        self
    }

    /// How long a store call may take before the store counts as unreachable (default 100 ms,
    /// more than zero).
    /// Keep it below the deadlines of the limiter's callers: a check cancelled first counts
    /// for nothing, so callers that always give up sooner never switch it to the fallback.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long to use the fallback after a failed store call before one request probes the
    /// store again (default 1 s, more than zero), so an outage does not cost a timeout on
    /// every request.
    pub fn retry_after_failure(mut self, wait: Duration) -> Self {
        self.retry_after_failure = wait;
        self
    }

    /// The most keys held per tier in local state (reserved units, fallback cells);
    /// default 100,000. Keys are held in a fixed size whatever their length, so this bounds
    /// the bytes too (docs/rate-limits.md, "Memory under attacker-chosen keys").
    pub fn max_keys_per_tier(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// Builds the limiter; errors on invalid tier names, a zero batch, zero instances, or a
    /// zero timeout or retry window.
    pub fn build(self) -> Result<DistributedRateLimiter<S>, ConfigError> {
        if self.batch == 0 {
            return Err(ConfigError::new("batch", "must be at least 1"));
        }
        if self.fallback == (Fallback::Local { instances: 0 }) {
            return Err(ConfigError::new("instances", "must be at least 1"));
        }
        // Zero would count every store call not ready at once as an outage.
        if self.timeout.is_zero() {
            return Err(ConfigError::new("timeout", "must be more than zero"));
        }
        // Zero would leave no window in which the fallback spares a failing store.
        if self.retry_after_failure.is_zero() {
            return Err(ConfigError::new(
                "retry_after_failure",
                "must be more than zero",
            ));
        }
        let round_trips = |outcome: &'static str| {
            headroom_core::counter!(
                "headroom_limit_rate_store_round_trips_total",
                "limiter" => self.name.clone(),
                "outcome" => outcome
            )
        };
        let inner = Inner {
            metrics: StoreMetrics {
                ok: round_trips("ok"),
                error: round_trips("error"),
                fallbacks: headroom_core::counter!(
                    "headroom_limit_rate_fallbacks_total",
                    "limiter" => self.name.clone(),
                    "fallback" => self.fallback.as_str()
                ),
                round_trips: AtomicU64::new(0),
                fallback_decisions: AtomicU64::new(0),
            },
            name: self.name.into(),
            store: self.store,
            namespace: self.namespace,
            time: self.clock.stopwatch(),
            last_round_trip: AtomicU64::new(0),
            batch: self.batch,
            fallback: self.fallback,
            timeout: self.timeout,
            retry_after_failure: self.retry_after_failure,
            max_keys: self.max_keys,
            health: AtomicU64::new(HEALTHY),
            last_failure: ArcSwapOption::empty(),
            tiers: ArcSwap::from_pointee(HashMap::new()),
        };
        let tiers = inner.build_tiers(&self.tiers, None)?;
        inner.tiers.store(Arc::new(tiers));
        Ok(DistributedRateLimiter {
            inner: Arc::new(inner),
        })
    }
}

/// Tiered rate limits shared by every instance, kept in a [`RateStore`]
/// (`headroom_redis::RedisRateStore` for Redis and Redis Cluster, or the in-memory store).
///
/// # Exact mode (the default)
///
/// Every decision is at most one [`apply_all`](RateStore::apply_all) on the store: one round
/// trip, on the store's clock, over the key's cell of each quota of its tier (one for most
/// tiers), all charged or none. The cells are `<namespace>:<tier>:{<tag>}:<index>:<key>`,
/// where the tag is the FNV-1a hash of the key (64 bits, 16 lowercase hexadecimal digits): it
/// comes first, so the cells of a key share one cluster slot and braces in a caller's key never
/// choose it. Keys are at most [`MAX_KEY_LEN`](Self::MAX_KEY_LEN) bytes.
///
/// Any number of instances admit together exactly what one limiter would. A refusal is
/// remembered until its `retry_after`, or for one second when that is longer: the store's
/// cells only move forward, so requests for that key are refused locally meanwhile with no
/// round trip and the wait that is left, which is exact too and keeps a flood of refused
/// requests off the store (one round trip a second per key at most). Past the second, the
/// next request asks the store again, so a cell deleted or lost (a key reset, a store
/// restarted without its data) is noticed within a second, whatever wait it gave. (For a tier
/// of several quotas, the refusal is remembered for the quota that waited longest; a
/// remembered refusal of another cost names that quota's wait, which another quota may
/// exceed.)
///
/// # Batched mode
///
/// With [`batch(n)`](DistributedRateLimiterBuilder::batch), an instance reserves up to `n`
/// units of a key with one `apply_all` and spends them locally, so a busy key costs one round
/// trip per `n` requests. A batch is sized by the key's use (the request's cost included, up
/// to `n`): the cost alone first, twice as many each time they run out while held, as many as
/// were spent when they lapse; so a key is charged what it uses, where a whole batch per hold
/// would charge a key used at a fraction of its quota the quota's whole rate. When the cell
/// holds fewer units than asked, the instance takes what is left (a second round trip). A key the store refused within the
/// last `n` intervals is saturated: the instance asks for single units, as in exact mode,
/// until the key goes `n` intervals without a refusal; so does an instance whose last store
/// call took half of `n` intervals or more, as its units would be half gone when they arrive.
/// Reserved units are charged in the store before they are spent, and an instance keeps them
/// for at most `n` emission intervals from before the call, so:
///
/// - over the life of the store, the instances never admit more than the store granted;
/// - in any window, they admit at most `n` units more than one exact limiter would (units
///   charged just before the window and spent inside it), whatever the number of instances;
/// - they may admit less: units reserved by an instance that sees no more requests for the key
///   are lost to the others until they replenish (at most `n - 1` per instance and key).
///
/// For a tier of several quotas, the intervals are those of its fastest quota (the shortest
/// emission interval), so the bound holds for each quota.
///
/// # When the store is unreachable
///
/// A store error or a call slower than the [`timeout`](DistributedRateLimiterBuilder::timeout)
/// switches the limiter to its [`Fallback`] for
/// [`retry_after_failure`](DistributedRateLimiterBuilder::retry_after_failure). Then one
/// request probes the store while the others keep the fallback; its answer brings every request
/// back to the store, its failure starts another window. A recovering store sees one call per
/// window from each instance, not a herd. Fallback decisions are counted.
///
/// ```
/// use headroom_core::memory::MemoryRateStore;
/// use headroom_core::Namespace;
/// use headroom_limit::rate::{DistributedRateLimiter, Fallback, Quota, RateLimit, TierConfig};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let tiers = TierConfig::new().tier("free", Quota::per_minute(60).unwrap());
/// let limiter = DistributedRateLimiter::builder(
///     "api",
///     MemoryRateStore::new(),
///     Namespace::new("rate").unwrap(),
///     tiers,
/// )
/// .fallback(Fallback::Local { instances: 4 })
/// .build()
/// .unwrap();
/// assert_eq!(limiter.check("free", "alice", 1).await.unwrap().remaining(), 59);
/// assert_eq!(limiter.round_trips(), 1);
/// # }
/// ```
#[derive(Debug)]
pub struct DistributedRateLimiter<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for DistributedRateLimiter<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

#[derive(Debug)]
struct Inner<S> {
    name: Box<str>,
    store: S,
    namespace: Namespace,
    /// Nanoseconds since the limiter was built, on its clock.
    time: Stopwatch,
    batch: u32,
    fallback: Fallback,
    timeout: Duration,
    retry_after_failure: Duration,
    max_keys: usize,
    /// [`HEALTHY`], [`PROBING`], or the time (ns on `time`) until which the store is not
    /// tried after a failure. A failure is written with `Release` after `last_failure`, and
    /// routing reads it with `Acquire`, so a request routed to the fallback sees that failure.
    health: AtomicU64,
    /// The last failed store call: the source of the refusals of a closed fallback that did
    /// not call the store themselves.
    last_failure: ArcSwapOption<BackendError>,
    /// How long the last store call took (ns), in batched mode: a batch pays only when its
    /// units outlive the round trip.
    last_round_trip: AtomicU64,
    tiers: ArcSwap<HashMap<Box<str>, Arc<Tier>>>,
    metrics: StoreMetrics,
}

#[derive(Debug)]
struct StoreMetrics {
    ok: Counter,
    error: Counter,
    fallbacks: Counter,
    round_trips: AtomicU64,
    fallback_decisions: AtomicU64,
}

#[derive(Debug)]
struct Tier {
    quotas: Quotas,
    /// The shortest emission interval of the quotas (ns): how long reserved units are held
    /// and refusals count as recent is measured in it.
    interval: u64,
    prefix: Namespace,
    /// Each quota's part of its cells' keys (see `cells`).
    quota_parts: Vec<[u8; QUOTA_PART_LEN]>,
    local_state: LocalState,
    local: Option<TierCells>,
    metrics: TierMetrics,
}

/// The longest key a distributed limiter takes: the store's key part less what the limiter
/// adds (a hash tag and the quota's part).
const MAX_KEY_LEN: usize = Key::MAX_LEN - TAG_LEN - QUOTA_PART_LEN;
/// `{`, 16 hexadecimal digits, `}`.
const TAG_LEN: usize = 18;
/// `:`, the quota's index, 8 hexadecimal digits of its rate and burst, `:`.
const QUOTA_PART_LEN: usize = 11;

/// The part of a quota's cell keys: its index, and a hash of its rate and burst, so that a
/// quota changed by a reload starts with fresh cells (every key full) rather than holding
/// keys to what they spent under the old one.
fn quota_part(index: usize, gcra: Gcra) -> [u8; QUOTA_PART_LEN] {
    let mut bytes = [0u8; 12];
    bytes[..8].copy_from_slice(&nanos(gcra.emission_interval).to_le_bytes());
    bytes[8..].copy_from_slice(&gcra.burst.to_le_bytes());
    let hash = fnv1a(&bytes);
    let mut part = [b':'; QUOTA_PART_LEN];
    part[1] = b'0' + index as u8;
    for (i, digit) in part[2..10].iter_mut().enumerate() {
        *digit = b"0123456789abcdef"[((hash >> (28 - 4 * i)) & 0xF) as usize];
    }
    part
}

impl Tier {
    /// The store's cells of `key`, one per quota:
    /// `<namespace>:<tier>:{<tag>}:<index><quota hash>:<key>`, where the tag is the FNV-1a hash
    /// (64 bits, 16 lowercase hexadecimal digits) of the key.
    /// The tag comes first, so every cell of a key is on one Redis Cluster slot and braces in
    /// a caller's key never choose that slot.
    fn cells(&self, key: &str) -> Result<Vec<(Key, Gcra)>, RateError> {
        let invalid = || RateError::new(RateErrorKind::InvalidKey);
        let hash = fnv1a(key.as_bytes());
        let mut tag = [b'{'; TAG_LEN];
        for (i, digit) in tag[1..17].iter_mut().enumerate() {
            *digit = b"0123456789abcdef"[((hash >> (60 - 4 * i)) & 0xF) as usize];
        }
        tag[17] = b'}';
        self.quotas
            .iter()
            .zip(&self.quota_parts)
            .map(|(quota, part)| {
                let key = self
                    .prefix
                    .key_from_parts(&[&tag, part, key.as_bytes()])
                    .map_err(|_| invalid())?;
                Ok((key, quota.gcra()))
            })
            .collect()
    }
}

/// The store answered its last probe (or never failed): every request may call it.
const HEALTHY: u64 = 0;
/// One request is probing the store after a failure; the others use the fallback meanwhile.
const PROBING: u64 = u64::MAX;

/// Whether a request calls the store.
enum Route<'a> {
    Store,
    /// This request probes the store after an outage.
    Probe(Probe<'a>),
    Fallback,
}

/// The claim of the one request probing the store. Dropped before the store answers (the
/// request was cancelled), it gives the claim back so the next request probes.
struct Probe<'a> {
    health: &'a AtomicU64,
    /// The end of the failure window the claim replaced (already past).
    window_end: u64,
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        // Fails when the answer was recorded, which replaced the claim.
        let _ = self.health.compare_exchange(
            PROBING,
            self.window_end,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

impl<S: RateStore> Inner<S> {
    fn now(&self) -> u64 {
        self.time.elapsed_nanos()
    }

    fn build_tiers(
        &self,
        config: &TierConfig,
        previous: Option<&HashMap<Box<str>, Arc<Tier>>>,
    ) -> Result<HashMap<Box<str>, Arc<Tier>>, ConfigError> {
        config.build(
            previous,
            |tier| &tier.quotas,
            |name, quotas| {
                let prefix = self
                    .namespace
                    .child(name)
                    .map_err(|_| ConfigError::new("tiers", "name does not fit the namespace"))?;
                let local = match self.fallback {
                    Fallback::Local { instances } => Some(TierCells::new(
                        &quotas.share(instances),
                        self.time.clock().clone(),
                        self.max_keys,
                        Duration::from_secs(10),
                    )),
                    Fallback::Open | Fallback::Closed => None,
                };
                let shortest = quotas.iter().map(|quota| quota.emission_interval()).min();
                Ok(Tier {
                    quotas: quotas.clone(),
                    interval: nanos(shortest.unwrap_or_default()),
                    prefix,
                    quota_parts: quotas
                        .iter()
                        .enumerate()
                        .map(|(index, quota)| quota_part(index, quota.gcra()))
                        .collect(),
                    local_state: LocalState::new(self.max_keys),
                    local,
                    metrics: TierMetrics::new(&self.name, name),
                })
            },
        )
    }

    /// One store call, bounded by the timeout.
    async fn apply(&self, cells: &[(Key, Gcra)], cost: u32) -> Result<RateDecision, BackendError> {
        self.metrics.round_trips.fetch_add(1, Ordering::Relaxed);
        let started = (self.batch > 1).then(|| self.now());
        let call = pin!(self.store.apply_all(cells, cost));
        let deadline = pin!(self.time.clock().sleep(self.timeout));
        let result = match select(call, deadline).await {
            Either::Left((result, _)) => result,
            Either::Right(((), _)) => Err(BackendError::with_detail(
                BackendErrorKind::Timeout,
                "rate store call timed out",
            )),
        };
        if let Some(started) = started {
            let took = self.now().saturating_sub(started);
            self.last_round_trip.store(took, Ordering::Relaxed);
        }
        match &result {
            Ok(_) => self.metrics.ok.increment(1),
            Err(_) => self.metrics.error.increment(1),
        }
        result
    }

    async fn decide(&self, tier: &Tier, key: &str, cost: u32) -> Result<Admitted, RateError> {
        let quotas = &tier.quotas;
        if cost > quotas.max_cost() {
            return Err(RateError::new(RateErrorKind::CostTooHigh));
        }
        let now = self.now();
        let local = tier
            .local_state
            .check(key, cost, now, tier.interval, self.batch);
        let (saturated, sized, outlived) = match local {
            Local::Spent {
                units,
                store_remaining,
                quota,
            } => {
                let quota = quotas.get(quota);
                return Ok(Admitted {
                    quota,
                    remaining: store_remaining.saturating_add(units),
                    reset_after: quota.emission_interval()
                        * quota.burst().saturating_sub(store_remaining),
                });
            }
            Local::Blocked { wait, quota } => {
                let quota = quotas.get(quota);
                let extra = nanos(quota.emission_interval()).saturating_mul(u64::from(cost - 1));
                let wait = Duration::from_nanos(wait.saturating_add(extra));
                return Err(RateLimited::new(quota, wait).into());
            }
            Local::Unknown {
                saturated,
                batch,
                outlived,
            } => (saturated, batch, outlived),
        };
        if key.len() > MAX_KEY_LEN {
            return Err(RateError::new(RateErrorKind::InvalidKey));
        }
        let probe = match self.route(now) {
            Route::Store => None,
            Route::Probe(probe) => Some(probe),
            Route::Fallback => return self.fall_back(tier, key, cost, None),
        };
        let cells = tier.cells(key)?;
        // A saturated key is charged one request at a time, as in exact mode: a batch would
        // be refused and the call repeated for what is left, two round trips for one unit.
        // A cost of zero asks without spending: it reserves nothing either. Nor does a call
        // to a store slow enough that a batch, held for `batch` intervals from before the
        // call, would be half gone (or expired) on arrival, charged and mostly unspendable.
        let hold = tier.interval.saturating_mul(u64::from(self.batch));
        let slow = self
            .last_round_trip
            .load(Ordering::Relaxed)
            .saturating_mul(2)
            >= hold;
        let batch = if saturated || cost == 0 || slow {
            cost
        } else {
            sized
        };
        let mut reserve = batch.max(cost).min(quotas.max_cost());
        let mut decision = self.apply(&cells, reserve).await.map_err(Arc::new);
        if let Ok(refused) = &decision
            && !refused.allowed
            && reserve > cost
        {
            if quotas.as_slice().len() > 1 {
                // The refusal of a batch tells only which quota waits longest for all of it;
                // another may be the one that holds back the cost alone. Ask for the cost.
                reserve = cost;
                decision = self.apply(&cells, reserve).await.map_err(Arc::new);
            } else if refused.remaining >= cost {
                // Fewer units than a batch are left: take what is there.
                reserve = refused.remaining.min(reserve);
                decision = self.apply(&cells, reserve).await.map_err(Arc::new);
            }
        }
        self.record_health(&decision, probe);
        match decision {
            Ok(decision) if decision.allowed => {
                // The store admitted a unit its earlier refusal held back: the refusal's cell
                // was deleted or lost, so the refusal no longer holds (nor makes the key
                // saturated).
                if let Some(blocked_until) = outlived
                    && cost > 0
                {
                    tier.local_state.forget_refusal(key, blocked_until);
                }
                let granted = reserve - cost;
                // In batched mode a reservation of the cost alone is kept too: a second request
                // within its hold finds it run out, and the next batch grows.
                if granted > 0 || (self.batch > 1 && cost > 0) {
                    let interval = tier.interval;
                    let expires =
                        now.saturating_add(interval.saturating_mul(u64::from(self.batch)));
                    let arrived = self.now();
                    tier.local_state.update(key, arrived, |entry| {
                        // Units merged with others still held expire with the earlier, so
                        // none is held longer than the bound allows (a reservation answered
                        // late may join one made after it); with none left, the new ones get
                        // their whole hold.
                        if entry.expires > arrived && entry.units > 0 {
                            entry.units += granted;
                            entry.expires = entry.expires.min(expires);
                        } else {
                            entry.units = granted;
                            entry.expires = expires;
                        }
                        entry.reserved = entry.units.saturating_add(cost);
                        entry.reserving = false;
                        entry.store_remaining = decision.remaining;
                        entry.reserved_quota = quota_index(decision.cell);
                    });
                }
                Ok(Admitted {
                    quota: quotas.get(decision.cell),
                    remaining: decision.remaining.saturating_add(granted),
                    reset_after: decision.reset_after,
                })
            }
            // A cost of zero spends nothing, so it is never refused, even by a store whose cell
            // is ahead of its clock.
            Ok(decision) if cost == 0 => Ok(Admitted {
                quota: quotas.get(decision.cell),
                remaining: decision.remaining,
                reset_after: decision.reset_after,
            }),
            Ok(decision) => {
                // The refusal was for `reserve` units (the cost alone, with several quotas);
                // by the quota that waits longest, `cost` units fit `reserve - cost` intervals
                // earlier and a single unit `reserve - 1` intervals earlier. (With several
                // quotas, another may hold a single unit back longer: remembering the shorter
                // wait only asks the store sooner.)
                let quota = quotas.get(decision.cell);
                let interval = nanos(quota.emission_interval());
                let retry_after = nanos(decision.retry_after);
                let earlier = |units: u32| interval.saturating_mul(u64::from(units));
                let for_one = retry_after.saturating_sub(earlier(reserve - 1));
                tier.local_state.update(key, now, |entry| {
                    entry.reserving = false;
                    entry.refused = true;
                    entry.blocked_until = now.saturating_add(for_one);
                    entry.answered_until = now.saturating_add(for_one.min(REFUSAL_MEMORY_NS));
                    entry.blocked_quota = quota_index(decision.cell);
                });
                let wait = retry_after.saturating_sub(earlier(reserve - cost)).max(1);
                Err(RateLimited::new(quota, Duration::from_nanos(wait)).into())
            }
            Err(error) if error.kind() == BackendErrorKind::Config => {
                Err(RateError::with_source(RateErrorKind::StoreConfig, error))
            }
            Err(error) => self.fall_back(tier, key, cost, Some(error)),
        }
    }

    /// Whether a request at `now` calls the store. After a failure, the store is left alone
    /// for `retry_after_failure`; then the first request to come probes it, and the others
    /// keep the fallback until the probe's answer is in.
    fn route(&self, now: u64) -> Route<'_> {
        match self.health.load(Ordering::Acquire) {
            HEALTHY => Route::Store,
            PROBING => Route::Fallback,
            window_end if now < window_end => Route::Fallback,
            window_end => match self.health.compare_exchange(
                window_end,
                PROBING,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => Route::Probe(Probe {
                    health: &self.health,
                    window_end,
                }),
                Err(_) => Route::Fallback,
            },
        }
    }

    /// Records what a store call says of the store: an answer to a probe ends the outage, a
    /// failure starts one (or, for a probe, another window) from now. A configuration error
    /// (a quota the store cannot hold, refused before any call) says nothing: a probe that
    /// got one is dropped, and the next request probes.
    fn record_health(
        &self,
        decision: &Result<RateDecision, Arc<BackendError>>,
        probe: Option<Probe<'_>>,
    ) {
        let failure = match decision {
            Err(error) if error.kind() == BackendErrorKind::Config => return,
            Err(error) => Some(error),
            Ok(_) => None,
        };
        let Some(error) = failure else {
            if probe.is_some() {
                self.health.store(HEALTHY, Ordering::Relaxed);
                tracing::info!(limiter = &*self.name, "rate store reachable again");
            }
            return;
        };
        // Before the window opens, so every request it routes to the fallback finds it.
        self.last_failure.store(Some(Arc::clone(error)));
        let window_end = self
            .now()
            .saturating_add(nanos(self.retry_after_failure))
            .clamp(HEALTHY + 1, PROBING - 1);
        if probe.is_some() {
            self.health.store(window_end, Ordering::Release);
            return;
        }
        // A failure seen while a probe is out leaves the decision to the probe.
        let previous = self
            .health
            .fetch_update(Ordering::Release, Ordering::Relaxed, |health| {
                (health != PROBING).then_some(window_end)
            });
        if previous == Ok(HEALTHY) {
            tracing::warn!(
                limiter = &*self.name,
                %error,
                fallback = self.fallback.as_str(),
                "rate store unreachable, using the fallback"
            );
        }
    }

    fn fall_back(
        &self,
        tier: &Tier,
        key: &str,
        cost: u32,
        error: Option<Arc<BackendError>>,
    ) -> Result<Admitted, RateError> {
        self.metrics.fallbacks.increment(1);
        self.metrics
            .fallback_decisions
            .fetch_add(1, Ordering::Relaxed);
        match (&tier.local, self.fallback) {
            // A cost the quota admits but the share cannot hold takes the whole share.
            (Some(local), _) => {
                // Answers name the quota the enforced share comes from, admitted or refused.
                let configured = |share: Quota| {
                    let shares = local.quotas().as_slice();
                    let index = shares.iter().position(|s| *s == share);
                    tier.quotas.get(index.unwrap_or(0))
                };
                local
                    .check(key, cost.min(local.quotas().max_cost()))
                    .map(|admitted| Admitted {
                        quota: configured(admitted.quota),
                        ..admitted
                    })
                    .map_err(|error| match error.limited() {
                        Some(limited) => {
                            RateLimited::new(configured(limited.quota()), limited.retry_after())
                                .into()
                        }
                        None => error,
                    })
            }
            // A request that did not call the store is refused for the failure that opened the
            // window (or a later one).
            (None, Fallback::Closed) => Err(RateError::unavailable(
                error.or_else(|| self.last_failure.load_full()),
            )),
            (None, _) => {
                let quotas = tier.quotas.as_slice();
                let narrowest = quotas.iter().min_by_key(|quota| quota.burst());
                let quota = narrowest.copied().unwrap_or_else(|| tier.quotas.get(0));
                Ok(Admitted {
                    quota,
                    remaining: quota.burst(),
                    reset_after: Duration::ZERO,
                })
            }
        }
    }
}

impl<S: RateStore> DistributedRateLimiter<S> {
    /// A builder named `name` (the `limiter` label of metrics) keeping `tiers` in `store`
    /// under `namespace`.
    pub fn builder(
        name: impl Into<String>,
        store: S,
        namespace: Namespace,
        tiers: TierConfig,
    ) -> DistributedRateLimiterBuilder<S> {
        Self::builder_from(
            name,
            store,
            namespace,
            DistributedConfig {
                tiers,
                ..DistributedConfig::default()
            },
        )
    }

    /// A builder set up from `config` (the clock can still be changed).
    pub fn builder_from(
        name: impl Into<String>,
        store: S,
        namespace: Namespace,
        config: DistributedConfig,
    ) -> DistributedRateLimiterBuilder<S> {
        DistributedRateLimiterBuilder {
            name: name.into(),
            store,
            namespace,
            tiers: config.tiers,
            clock: Clock::system(),
            batch: config.batch,
            fallback: config.fallback,
            timeout: config.timeout,
            retry_after_failure: config.retry_after_failure,
            max_keys: config.max_keys_per_tier,
        }
    }

    /// The name given at build time (the `limiter` label of its metrics).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Whether [`replace`](Self::replace) would accept `tiers`: valid names that fit the
    /// limiter's namespace in the store.
    pub fn check_tiers(&self, tiers: &TierConfig) -> Result<(), ConfigError> {
        tiers.validate()?;
        for (name, _) in tiers.iter() {
            self.inner
                .namespace
                .child(name)
                .map_err(|_| ConfigError::new("tiers", "name does not fit the namespace"))?;
        }
        Ok(())
    }

    /// Replaces the tiers. A changed quota starts with fresh cells, every key full (its old
    /// cells expire in the store); unchanged ones keep theirs. Local state of new or changed
    /// tiers starts afresh.
    pub fn replace(&self, tiers: &TierConfig) -> Result<(), ConfigError> {
        let current = self.inner.tiers.load();
        let next = self.inner.build_tiers(tiers, Some(&current))?;
        self.inner.tiers.store(Arc::new(next));
        Ok(())
    }

    /// The longest key a check takes, in bytes; longer ones are
    /// [`RateErrorKind::InvalidKey`]. The store's keys hold a hash tag and the quota's index
    /// besides the key.
    pub const MAX_KEY_LEN: usize = MAX_KEY_LEN;

    /// The quotas of `tier`, if configured.
    pub fn quotas(&self, tier: &str) -> Option<Quotas> {
        self.inner.tiers.load().get(tier).map(|t| t.quotas.clone())
    }

    /// Store calls made so far (successful or not).
    pub fn round_trips(&self) -> u64 {
        self.inner.metrics.round_trips.load(Ordering::Relaxed)
    }

    /// Decisions made by the fallback so far.
    pub fn fallback_decisions(&self) -> u64 {
        self.inner
            .metrics
            .fallback_decisions
            .load(Ordering::Relaxed)
    }
}

impl<S: RateStore> RateLimit for DistributedRateLimiter<S> {
    async fn check(&self, tier: &str, key: &str, cost: u32) -> Result<Admitted, RateError> {
        let tiers = self.inner.tiers.load_full();
        let Some(state) = tiers.get(tier) else {
            return Err(RateError::new(RateErrorKind::UnknownTier));
        };
        if !tracing::enabled!(tracing::Level::DEBUG) {
            // Without a span the decision's future is not wrapped, so not moved.
            let result = self.inner.decide(state, key, cost).await;
            record(&state.metrics, tier, &result);
            return result;
        }
        let span = tracing::debug_span!("rate.check", name = %self.inner.name, tier, outcome = tracing::field::Empty);
        let result = self
            .inner
            .decide(state, key, cost)
            .instrument(span.clone())
            .await;
        record(&state.metrics, tier, &result);
        span.record(
            "outcome",
            match &result {
                Ok(_) => "allowed",
                Err(error) if error.kind() == RateErrorKind::Limited => "rejected",
                Err(_) => "error",
            },
        );
        result
    }

    async fn acquire(
        &self,
        tier: &str,
        key: &str,
        cost: u32,
        max_wait: Duration,
    ) -> Result<Admitted, RateError> {
        let tiers = self.inner.tiers.load_full();
        let Some(state) = tiers.get(tier) else {
            return Err(RateError::new(RateErrorKind::UnknownTier));
        };
        let result = wait::acquire(self.inner.time.clock(), max_wait, || {
            self.inner.decide(state, key, cost)
        })
        .await;
        record(&state.metrics, tier, &result);
        result
    }
}

/// A cell index from the store as the local state keeps it (a tier holds at most 8 quotas;
/// a foreign index maps to one the tier has).
fn quota_index(cell: usize) -> u8 {
    u8::try_from(cell.min(Quotas::MAX - 1)).unwrap_or(0)
}
