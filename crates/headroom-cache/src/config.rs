use std::time::Duration;

use crate::ConfigError;

/// The tunable settings of a cache, loadable with serde (feature `serde`, human-readable
/// durations). Every field has a default; [`CacheBuilder`](crate::CacheBuilder) sets them one
/// by one or all at once with [`CacheBuilder::config`](crate::CacheBuilder::config).
///
/// ```
/// # #[cfg(feature = "serde")] {
/// let config: headroom_cache::CacheConfig = serde_json::from_str(r#"{
///     "ttl": "5m",
///     "soft_ttl": "4m",
///     "fail_safe_max_stale": "1h",
///     "l2_timeout": "50ms"
/// }"#).unwrap();
/// assert_eq!(config.ttl, std::time::Duration::from_secs(300));
/// # }
/// ```
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize, serde::Serialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct CacheConfig {
    /// The name used as the `cache` label of metrics and in traces.
    pub name: String,
    /// The most entries L1 holds (when `l1_max_bytes` is not set).
    pub l1_max_capacity: u64,
    /// The most bytes L1 holds, counting each entry as its key, its encoded value and about
    /// 100 bytes of bookkeeping; replaces `l1_max_capacity` when set. A cache without L2
    /// encodes each value it puts in L1 once to weigh it. `None`: L1 is bounded by entries.
    pub l1_max_bytes: Option<u64>,
    /// Whether L1 evictions (for lack of capacity) are counted in
    /// `headroom_cache_evictions_total`. Counting makes moka report every L1 removal to the
    /// cache, which adds about half a microsecond to each L1 write or invalidation.
    pub l1_eviction_metric: bool,
    /// The longest an entry is served from L1 before L1 asks L2 again, whatever its TTL:
    /// the bound on how stale one instance can be behind another. `None`: the entry's TTL.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub l1_max_ttl: Option<Duration>,
    /// How long a value is served (hard TTL): the default, and the maximum of per-entry TTLs.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub ttl: Duration,
    /// After this age a hit is still served but refreshed in the background (eager refresh).
    /// `None`: no eager refresh. Values at or above the entry's TTL disable it for that entry.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub soft_ttl: Option<Duration>,
    /// Up to this much is added at random to each entry's TTLs, so entries loaded together do
    /// not expire together. Zero disables jitter.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub ttl_jitter: Duration,
    /// How long a "not found" answer of the loader is cached (at most `ttl`). `None`: not cached.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub negative_ttl: Option<Duration>,
    /// How long past its TTL a value is kept to be served when the loader fails or times out
    /// (fail-safe). Zero disables fail-safe.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub fail_safe_max_stale: Duration,
    /// After a load fails and a stale value is served instead, that value is served for this
    /// long without calling the loader again (fail-safe throttle), so a failing source is not
    /// called on every request: from L1, and by loads that find that very copy while L1 is
    /// bypassed. A write or invalidation of the key ends it. At most `l1_max_ttl`, when that
    /// is set.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub fail_safe_throttle: Duration,
    /// When a stale value is at hand, callers wait this long for the loader before being served
    /// the stale value; the loader keeps running and updates the cache when it finishes.
    /// `None`: wait for the loader (up to the hard timeout).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub loader_soft_timeout: Option<Duration>,
    /// The loader is abandoned after this long and the call fails with
    /// [`CacheErrorKind::LoaderTimeout`](crate::CacheErrorKind::LoaderTimeout) (or is served a
    /// stale value). Default 30 s. `None`: no limit; then a loader that never answers keeps its
    /// key's load (and its entry in the map of loads in flight) forever.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub loader_hard_timeout: Option<Duration>,
    /// The longest any L2 call may take before the cache goes on without it.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub l2_timeout: Duration,
    /// After this many L2 failures in a row, the cache stops calling L2 for a cool-down.
    pub l2_failure_threshold: u32,
    /// How long the cache leaves L2 alone after repeated failures before probing it again.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub l2_cooldown: Duration,
    /// The most keys whose L2 copy is known to be outdated (a write here failed to reach L2)
    /// that are remembered until a delete reaches L2. A key beyond it makes the cache skip L2
    /// reads for `ttl + ttl_jitter + fail_safe_max_stale`, after which every copy it could have
    /// missed has expired. As many keys heard from other instances are remembered besides;
    /// past that, they are served as if their message had been missed.
    pub l2_max_pending_deletes: usize,
    /// The largest encoded value accepted, in bytes: checked when a value is encoded for L2
    /// (without L2, bound L1 in bytes with `l1_max_bytes` instead).
    pub max_value_len: usize,
    /// The version of the cached value's shape, written in every L2 entry. An entry of another
    /// schema version reads as a miss and is left in place, so that during a rolling deploy
    /// that changes the value type, old and new instances ignore (rather than delete) each
    /// other's entries. A tombstone (a removal) counts whatever its schema version. Default 0.
    pub schema_version: u32,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            name: "default".to_owned(),
            l1_max_capacity: 10_000,
            l1_max_bytes: None,
            l1_eviction_metric: true,
            l1_max_ttl: None,
            ttl: Duration::from_secs(300),
            soft_ttl: None,
            ttl_jitter: Duration::ZERO,
            negative_ttl: None,
            fail_safe_max_stale: Duration::ZERO,
            fail_safe_throttle: Duration::from_secs(30),
            loader_soft_timeout: None,
            loader_hard_timeout: Some(Duration::from_secs(30)),
            l2_timeout: Duration::from_millis(250),
            l2_failure_threshold: 5,
            l2_cooldown: Duration::from_secs(5),
            l2_max_pending_deletes: 10_000,
            max_value_len: 1024 * 1024,
            schema_version: 0,
        }
    }
}

impl CacheConfig {
    /// The longest any entry of this cache can be kept: TTL, jitter and fail-safe window.
    pub(crate) fn max_entry_lifetime(&self) -> Duration {
        self.ttl
            .saturating_add(self.ttl_jitter)
            .saturating_add(self.fail_safe_max_stale)
    }

    /// The lifetimes this configuration gives new entries.
    pub fn ttls(&self) -> TtlConfig {
        TtlConfig {
            ttl: self.ttl,
            soft_ttl: self.soft_ttl,
            ttl_jitter: self.ttl_jitter,
            negative_ttl: self.negative_ttl,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), &'static str> {
        if self.ttl.is_zero() {
            return Err("ttl must be greater than zero");
        }
        if self.negative_ttl.is_some_and(|ttl| ttl.is_zero()) {
            return Err("negative_ttl must be greater than zero");
        }
        if self.l1_max_ttl.is_some_and(|ttl| ttl.is_zero()) {
            return Err("l1_max_ttl must be greater than zero");
        }
        if self.l2_timeout.is_zero() {
            return Err("l2_timeout must be greater than zero");
        }
        if self.l2_failure_threshold == 0 {
            return Err("l2_failure_threshold must be at least 1");
        }
        let times = [
            ("ttl must be at most ten years", Some(self.ttl)),
            ("soft_ttl must be at most ten years", self.soft_ttl),
            (
                "ttl_jitter must be at most ten years",
                Some(self.ttl_jitter),
            ),
            ("negative_ttl must be at most ten years", self.negative_ttl),
            (
                "fail_safe_max_stale must be at most ten years",
                Some(self.fail_safe_max_stale),
            ),
            (
                "fail_safe_throttle must be at most ten years",
                Some(self.fail_safe_throttle),
            ),
            ("l1_max_ttl must be at most ten years", self.l1_max_ttl),
            (
                "loader_soft_timeout must be at most ten years",
                self.loader_soft_timeout,
            ),
            (
                "loader_hard_timeout must be at most ten years",
                self.loader_hard_timeout,
            ),
            (
                "l2_timeout must be at most ten years",
                Some(self.l2_timeout),
            ),
            (
                "l2_cooldown must be at most ten years",
                Some(self.l2_cooldown),
            ),
        ];
        match times
            .into_iter()
            .find(|(_, time)| time.is_some_and(too_long))
        {
            Some((reason, _)) => Err(reason),
            None => Ok(()),
        }
    }
}

/// The longest time a cache takes: what every store keeps, far inside what its clocks count
/// (and moka's limit of a thousand years).
pub(crate) const MAX_TIME: Duration = headroom_core::MAX_DURATION;

fn too_long(time: Duration) -> bool {
    time > MAX_TIME
}

/// The lifetimes a cache gives the entries it writes from now on, replaceable while it runs
/// ([`Cache::reconfigure_ttls`](crate::Cache::reconfigure_ttls)); the fields mean what they
/// mean in [`CacheConfig`].
///
/// ```
/// # #[cfg(feature = "serde")] {
/// let ttls: headroom_cache::TtlConfig =
///     serde_json::from_str(r#"{ "ttl": "10m", "soft_ttl": "8m" }"#).unwrap();
/// assert_eq!(ttls.ttl, std::time::Duration::from_secs(600));
/// # }
/// ```
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize, serde::Serialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct TtlConfig {
    /// How long a value is served (hard TTL).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub ttl: Duration,
    /// After this age a hit is refreshed in the background. `None`: no eager refresh.
    #[cfg_attr(feature = "serde", serde(default, with = "humantime_serde"))]
    pub soft_ttl: Option<Duration>,
    /// Up to this much is added at random to each entry's TTLs.
    #[cfg_attr(feature = "serde", serde(default, with = "humantime_serde"))]
    pub ttl_jitter: Duration,
    /// How long a "not found" answer is cached. `None`: not cached.
    #[cfg_attr(feature = "serde", serde(default, with = "humantime_serde"))]
    pub negative_ttl: Option<Duration>,
}

impl TtlConfig {
    /// Checks the lifetimes, as building a cache does.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ttl.is_zero() {
            return Err(ConfigError::new("ttl must be greater than zero"));
        }
        if self.negative_ttl.is_some_and(|ttl| ttl.is_zero()) {
            return Err(ConfigError::new("negative_ttl must be greater than zero"));
        }
        let times = [
            Some(self.ttl),
            self.soft_ttl,
            Some(self.ttl_jitter),
            self.negative_ttl,
        ];
        if times.into_iter().flatten().any(too_long) {
            return Err(ConfigError::new(
                "ttl, soft_ttl, ttl_jitter and negative_ttl must be at most ten years",
            ));
        }
        Ok(())
    }
}
