//! The tiered in-process limiter and the interface every tiered limiter shares.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use headroom_core::Clock;

use super::cells::TierCells;
use super::{Admitted, Quotas, RateError, RateErrorKind, TierConfig};
use crate::ConfigError;
use crate::metrics::TierMetrics;

/// A limiter that charges a key of a tier: [`LocalRateLimiter`] in process,
/// [`DistributedRateLimiter`](super::DistributedRateLimiter) across instances. The tower
/// layer takes either.
pub trait RateLimit: Clone + Send + Sync + 'static {
    /// Spends `cost` units of `key`'s quotas in `tier` (every quota of the tier, or none).
    fn check(
        &self,
        tier: &str,
        key: &str,
        cost: u32,
    ) -> impl Future<Output = Result<Admitted, RateError>> + Send;

    /// Spends `cost` units as [`check`](Self::check) does, waiting for them when they will be
    /// available within `max_wait`; refuses at once, with the wait it would have needed
    /// ([`RateLimited::retry_after`](super::RateLimited::retry_after)), when they will not, so
    /// a caller never sleeps only to be refused.
    ///
    /// Nothing is reserved while waiting: another caller may take the units first, and the
    /// wait goes on within `max_wait`. Dropping the future while it waits consumes nothing.
    /// Errors other than a refusal come back at once.
    fn acquire(
        &self,
        tier: &str,
        key: &str,
        cost: u32,
        max_wait: Duration,
    ) -> impl Future<Output = Result<Admitted, RateError>> + Send;
}

/// Records a decision in the tier's metrics and traces rejections.
pub(crate) fn record(metrics: &TierMetrics, tier: &str, result: &Result<Admitted, RateError>) {
    match result {
        Ok(_) => metrics.allowed.increment(1),
        Err(error) if error.kind() == RateErrorKind::Limited => {
            metrics.rejected.increment(1);
            tracing::trace!(tier, retry_after = ?error.limited().map(|l| l.retry_after()), "rate limited");
        }
        Err(_) => {}
    }
}

/// Tiered rate limits in one process: a [`KeyedLimiter`](super::KeyedLimiter) per tier, or
/// for a tier of several [`Quotas`], one small locked set of cells per key so that a request
/// is charged to all of them or none.
///
/// Cheap to clone (clones share state). The tiers can be replaced at run time with
/// [`replace`](Self::replace); tiers whose quotas did not change keep their state.
///
/// # Memory
///
/// Each tier holds at most [`max_keys_per_tier`](LocalRateLimiterBuilder::max_keys_per_tier)
/// keys, capped as a [`KeyedLimiter`](super::KeyedLimiter) is, and each key in a fixed 48 bytes
/// whatever its length: a key of up to 47 bytes as it is, a longer one as a 128-bit digest
/// under a random seed (two long keys share a cell with probability 2^-128, and a sender who
/// does not know the seed cannot search for such a pair). So a tier takes at most 256 bytes
/// per key held, the hash tables' spare room included, or 512 for a tier of several quotas,
/// plus under 1 KiB per shard: 256 MB (512 MB) per tier at the default cap, whatever keys
/// senders choose. A key already held is checked without allocating, and one over 47 bytes
/// costs one more hash, of its 16-byte digest.
///
/// ```
/// use std::time::Duration;
/// use headroom_limit::rate::{
///     LocalRateLimiter, Quota, Quotas, RateErrorKind, RateLimit, TierConfig,
/// };
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let tiers = TierConfig::new()
///     .tier("free", Quota::per_minute(1).unwrap())
///     // 10 a second and 1,000 an hour: a request must fit both.
///     .tier("pro", Quotas::new([Quota::per_second(10).unwrap(), Quota::per_hour(1000).unwrap()])
///         .unwrap());
/// let limiter = LocalRateLimiter::builder("api", tiers).build().unwrap();
/// assert!(limiter.check("free", "alice", 1).await.is_ok());
/// let refused = limiter.check("free", "alice", 1).await.unwrap_err();
/// assert_eq!(refused.kind(), RateErrorKind::Limited);
/// // The next unit is a minute away: a caller willing to wait a second is refused at once.
/// let refused = limiter.acquire("free", "alice", 1, Duration::from_secs(1)).await.unwrap_err();
/// assert!(refused.limited().unwrap().retry_after() > Duration::from_secs(59));
/// // The per-second quota has the fewest units left.
/// assert_eq!(limiter.check("pro", "bob", 1).await.unwrap().remaining(), 9);
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct LocalRateLimiter {
    inner: Arc<LocalInner>,
}

#[derive(Debug)]
struct LocalInner {
    name: Box<str>,
    clock: Clock,
    max_keys: usize,
    tiers: ArcSwap<HashMap<Box<str>, Arc<LocalTier>>>,
}

#[derive(Debug)]
struct LocalTier {
    cells: TierCells,
    metrics: TierMetrics,
}

/// Builds a [`LocalRateLimiter`].
#[derive(Debug)]
#[must_use]
pub struct LocalRateLimiterBuilder {
    name: String,
    tiers: TierConfig,
    clock: Clock,
    max_keys: usize,
}

impl LocalRateLimiterBuilder {
    /// The clock time is read from (default: the system clock).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The most keys held per tier (default 1,000,000), each in at most 256 bytes (512 in a
    /// tier of several quotas) whatever its length; see [Memory](LocalRateLimiter#memory).
    pub fn max_keys_per_tier(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// Builds the limiter; errors on an invalid tier name.
    pub fn build(self) -> Result<LocalRateLimiter, ConfigError> {
        let inner = LocalInner {
            name: self.name.into(),
            clock: self.clock,
            max_keys: self.max_keys,
            tiers: ArcSwap::from_pointee(HashMap::new()),
        };
        let tiers = inner.build_tiers(&self.tiers, None)?;
        inner.tiers.store(Arc::new(tiers));
        Ok(LocalRateLimiter {
            inner: Arc::new(inner),
        })
    }
}

impl LocalInner {
    fn build_tiers(
        &self,
        config: &TierConfig,
        previous: Option<&HashMap<Box<str>, Arc<LocalTier>>>,
    ) -> Result<HashMap<Box<str>, Arc<LocalTier>>, ConfigError> {
        config.build(
            previous,
            |tier| tier.cells.quotas(),
            |name, quotas| {
                // Keys are full again one period after their last request at the latest.
                let longest = quotas.iter().map(|quota| quota.period()).max();
                let idle_sweep = longest.unwrap_or_default().max(Duration::from_secs(1));
                Ok(LocalTier {
                    cells: TierCells::new(quotas, self.clock.clone(), self.max_keys, idle_sweep),
                    metrics: TierMetrics::new(&self.name, name),
                })
            },
        )
    }
}

impl LocalRateLimiter {
    /// A builder named `name` (the `limiter` label of metrics) enforcing `tiers`.
    pub fn builder(name: impl Into<String>, tiers: TierConfig) -> LocalRateLimiterBuilder {
        LocalRateLimiterBuilder {
            name: name.into(),
            tiers,
            clock: Clock::system(),
            max_keys: 1_000_000,
        }
    }

    /// The name given at build time (the `limiter` label of its metrics).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Whether [`replace`](Self::replace) would accept `tiers`.
    pub fn check_tiers(&self, tiers: &TierConfig) -> Result<(), ConfigError> {
        tiers.validate()
    }

    /// Replaces the tiers. Tiers whose quotas are unchanged keep their keys' state; new or
    /// changed tiers start with every key full (a lowered quota gives every key a full burst
    /// once).
    pub fn replace(&self, tiers: &TierConfig) -> Result<(), ConfigError> {
        let current = self.inner.tiers.load();
        let next = self.inner.build_tiers(tiers, Some(&current))?;
        self.inner.tiers.store(Arc::new(next));
        Ok(())
    }

    /// The quotas of `tier`, if configured.
    pub fn quotas(&self, tier: &str) -> Option<Quotas> {
        self.inner
            .tiers
            .load()
            .get(tier)
            .map(|t| t.cells.quotas().clone())
    }

    /// Spends `cost` units of `key`'s quotas in `tier` (every quota of the tier, or none),
    /// without waiting on anything.
    pub fn check_now(&self, tier: &str, key: &str, cost: u32) -> Result<Admitted, RateError> {
        let tiers = self.inner.tiers.load();
        let Some(state) = tiers.get(tier) else {
            return Err(RateError::new(RateErrorKind::UnknownTier));
        };
        let result = state.cells.check(key, cost);
        record(&state.metrics, tier, &result);
        result
    }
}

impl RateLimit for LocalRateLimiter {
    async fn check(&self, tier: &str, key: &str, cost: u32) -> Result<Admitted, RateError> {
        self.check_now(tier, key, cost)
    }

    async fn acquire(
        &self,
        tier: &str,
        key: &str,
        cost: u32,
        max_wait: Duration,
    ) -> Result<Admitted, RateError> {
        let Some(state) = self.inner.tiers.load().get(tier).cloned() else {
            return Err(RateError::new(RateErrorKind::UnknownTier));
        };
        let result = state.cells.acquire(key, cost, max_wait).await;
        record(&state.metrics, tier, &result);
        result
    }
}
