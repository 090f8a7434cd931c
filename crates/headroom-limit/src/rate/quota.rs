//! Quotas: how many units per period, with how large a burst; and the quotas of a tier,
//! which a request must fit together.

use std::time::Duration;

use headroom_core::rate::Gcra;

use crate::ConfigError;

/// The longest a full burst may take to replenish: the limiters count time in `u64`
/// nanoseconds (about 584 years).
pub const MAX_BURST_TIME: Duration = Duration::from_nanos(u64::MAX);

/// A rate limit: `limit` units per `period` on average, with bursts of up to `burst` units.
///
/// Units replenish one at a time, every `period / limit` (the emission interval of GCRA), not
/// all at once at the end of a window, so there is no boundary at which twice the limit gets
/// through. Loadable with serde (feature `serde`); `burst` defaults to `limit`:
///
/// ```
/// # #[cfg(feature = "serde")] {
/// use std::time::Duration;
/// use headroom_limit::rate::Quota;
///
/// let quota: Quota = serde_json::from_str(r#"{ "limit": 600, "period": "1m", "burst": 20 }"#).unwrap();
/// assert_eq!(quota, Quota::per_minute(600).unwrap().with_burst(20).unwrap());
/// assert_eq!(quota.emission_interval(), Duration::from_millis(100));
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(try_from = "QuotaConfig", into = "QuotaConfig")
)]
pub struct Quota {
    limit: u32,
    period: Duration,
    burst: u32,
}

impl Quota {
    /// `limit` units per `period`, with a burst of `limit`.
    ///
    /// Errors when `limit` is zero, `period` is zero, the emission interval (`period / limit`)
    /// would be shorter than a nanosecond, or `period` is past [`MAX_BURST_TIME`].
    pub fn new(limit: u32, period: Duration) -> Result<Self, ConfigError> {
        if limit == 0 {
            return Err(ConfigError::new("limit", "must be at least 1"));
        }
        if period.is_zero() || (period / limit).is_zero() {
            return Err(ConfigError::new(
                "period",
                "must be at least one nanosecond per unit",
            ));
        }
        let quota = Self {
            limit,
            period,
            burst: limit,
        };
        if quota.burst_time_fits() {
            Ok(quota)
        } else {
            Err(ConfigError::new("period", "must be under about 584 years"))
        }
    }

    /// `limit` units per second.
    pub fn per_second(limit: u32) -> Result<Self, ConfigError> {
        Self::new(limit, Duration::from_secs(1))
    }

    /// `limit` units per minute.
    pub fn per_minute(limit: u32) -> Result<Self, ConfigError> {
        Self::new(limit, Duration::from_secs(60))
    }

    /// `limit` units per hour.
    pub fn per_hour(limit: u32) -> Result<Self, ConfigError> {
        Self::new(limit, Duration::from_secs(3600))
    }

    /// The same rate with bursts of up to `burst` units (at least 1, and a burst's worth of
    /// time, `burst × period / limit`, within [`MAX_BURST_TIME`]).
    pub fn with_burst(self, burst: u32) -> Result<Self, ConfigError> {
        if burst == 0 {
            return Err(ConfigError::new("burst", "must be at least 1"));
        }
        let quota = Self { burst, ..self };
        if quota.burst_time_fits() {
            Ok(quota)
        } else {
            Err(ConfigError::new(
                "burst",
                "a burst's worth of time (burst × period / limit) must be under about 584 years",
            ))
        }
    }

    /// Whether the time a full burst takes to replenish fits in what the limiters count.
    fn burst_time_fits(&self) -> bool {
        self.emission_interval()
            .checked_mul(self.burst)
            .is_some_and(|time| time <= MAX_BURST_TIME)
    }

    /// Units per period.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The period over which `limit` units replenish.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// The most units that may be spent at once.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// The time one unit takes to replenish: `period / limit`.
    pub fn emission_interval(&self) -> Duration {
        self.period / self.limit
    }

    /// The GCRA parameters of this quota, as a [`RateStore`](headroom_core::rate::RateStore)
    /// takes them.
    pub fn gcra(&self) -> Gcra {
        Gcra {
            emission_interval: self.emission_interval(),
            burst: self.burst,
        }
    }

    /// This quota split evenly over `instances`: the share one instance enforces on its own
    /// when the shared store is unreachable. The shares' rates add up to the quota's: a limit
    /// that does not split evenly is kept over a period `instances` times as long (2 a minute
    /// over 4 instances: 2 every 4 minutes each). The burst is split rounding down, but is at
    /// least 1; it is lowered, should the rounding put its time past [`MAX_BURST_TIME`].
    pub fn share(&self, instances: u32) -> Self {
        let instances = instances.max(1);
        let stretched = self
            .period
            .checked_mul(instances)
            .filter(|period| *period / self.limit <= MAX_BURST_TIME);
        let (limit, period) = match stretched {
            Some(period) if !self.limit.is_multiple_of(instances) => (self.limit, period),
            _ => ((self.limit / instances).max(1), self.period),
        };
        let share = Self {
            limit,
            period,
            burst: (self.burst / instances).max(1),
        };
        if share.burst_time_fits() {
            return share;
        }
        let fits = MAX_BURST_TIME.as_nanos() / share.emission_interval().as_nanos().max(1);
        Self {
            burst: u32::try_from(fits).unwrap_or(u32::MAX).max(1),
            ..share
        }
    }
}

/// The quotas of one tier: one [`Quota`], or several that a request must fit together, as in
/// "10 a second and 1,000 a day".
///
/// A request is admitted only if every quota admits it, and a refused request is charged to
/// none of them. A refusal waits for the slowest of the quotas that refuse: its
/// [`retry_after`](super::RateLimited::retry_after) is the longest of their waits, so the
/// request fits once it has passed (if nothing else was spent meanwhile).
///
/// Holds 1 to [`Quotas::MAX`] quotas. Loadable with serde (feature `serde`) in either form: one
/// quota's fields, or `quotas` and a list of them:
///
/// ```
/// # #[cfg(feature = "serde")] {
/// use headroom_limit::rate::{Quota, Quotas};
///
/// let one: Quotas = serde_json::from_str(r#"{ "limit": 60, "period": "1m" }"#).unwrap();
/// assert_eq!(one, Quotas::from(Quota::per_minute(60).unwrap()));
/// let two: Quotas = serde_json::from_str(r#"{ "quotas": [
///     { "limit": 10, "period": "1s" },
///     { "limit": 1000, "period": "1day" }
/// ] }"#).unwrap();
/// assert_eq!(two.as_slice().len(), 2);
/// assert_eq!(two.max_cost(), 10);
/// assert!(serde_json::from_str::<Quotas>(r#"{ "quotas": [] }"#).is_err());
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(try_from = "QuotasConfig", into = "QuotasConfig")
)]
pub struct Quotas {
    quotas: Box<[Quota]>,
}

impl Quotas {
    /// The most quotas one tier holds.
    pub const MAX: usize = 8;

    /// The quotas `quotas`, all of which a request must fit.
    ///
    /// Errors (field `quotas`) when there are none or more than [`Quotas::MAX`].
    pub fn new(quotas: impl IntoIterator<Item = Quota>) -> Result<Self, ConfigError> {
        let quotas: Box<[Quota]> = quotas.into_iter().collect();
        if quotas.is_empty() {
            return Err(ConfigError::new("quotas", "must hold at least one quota"));
        }
        if quotas.len() > Self::MAX {
            return Err(ConfigError::new("quotas", "must hold at most 8 quotas"));
        }
        Ok(Self { quotas })
    }

    /// The quotas, in the order given.
    pub fn as_slice(&self) -> &[Quota] {
        &self.quotas
    }

    /// The quotas, in the order given.
    pub fn iter(&self) -> impl Iterator<Item = Quota> + '_ {
        self.quotas.iter().copied()
    }

    /// The largest cost a request can have: the smallest burst. A larger cost is
    /// [`CostTooHigh`](super::RateErrorKind::CostTooHigh).
    pub fn max_cost(&self) -> u32 {
        self.iter().map(|quota| quota.burst()).min().unwrap_or(1)
    }

    /// The quota at `index`, or the first one for an index out of range (a store that
    /// answers with a foreign index still gets an answer).
    pub(crate) fn get(&self, index: usize) -> Quota {
        self.quotas.get(index).copied().unwrap_or(self.quotas[0])
    }

    /// Each quota split evenly over `instances`; see [`Quota::share`].
    pub fn share(&self, instances: u32) -> Self {
        Self {
            quotas: self.iter().map(|quota| quota.share(instances)).collect(),
        }
    }
}

impl From<Quota> for Quotas {
    fn from(quota: Quota) -> Self {
        Self {
            quotas: Box::new([quota]),
        }
    }
}

/// The serde shape of a [`Quota`], validated on the way in.
#[cfg(feature = "serde")]
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaConfig {
    limit: u32,
    #[serde(with = "humantime_serde")]
    period: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    burst: Option<u32>,
}

#[cfg(feature = "serde")]
impl TryFrom<QuotaConfig> for Quota {
    type Error = ConfigError;

    fn try_from(config: QuotaConfig) -> Result<Self, ConfigError> {
        let quota = Quota::new(config.limit, config.period)?;
        match config.burst {
            Some(burst) => quota.with_burst(burst),
            None => Ok(quota),
        }
    }
}

#[cfg(feature = "serde")]
impl From<Quota> for QuotaConfig {
    fn from(quota: Quota) -> Self {
        Self {
            limit: quota.limit,
            period: quota.period,
            burst: Some(quota.burst),
        }
    }
}

/// The serde shape of [`Quotas`]: one quota's fields, or `quotas` and a list of quotas.
#[cfg(feature = "serde")]
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotasConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    quotas: Option<Vec<Quota>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    limit: Option<u32>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    period: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    burst: Option<u32>,
}

#[cfg(feature = "serde")]
impl TryFrom<QuotasConfig> for Quotas {
    type Error = ConfigError;

    fn try_from(config: QuotasConfig) -> Result<Self, ConfigError> {
        match config {
            QuotasConfig {
                quotas: Some(quotas),
                limit: None,
                period: None,
                burst: None,
            } => Quotas::new(quotas),
            QuotasConfig {
                quotas: Some(_), ..
            } => Err(ConfigError::new(
                "quotas",
                "is a list of quotas in place of `limit`, `period` and `burst`: not both",
            )),
            QuotasConfig {
                limit: Some(limit),
                period: Some(period),
                burst,
                ..
            } => Quota::try_from(QuotaConfig {
                limit,
                period,
                burst,
            })
            .map(Quotas::from),
            QuotasConfig { limit: None, .. } => Err(ConfigError::new(
                "limit",
                "is missing (or give `quotas`, a list of quotas)",
            )),
            QuotasConfig { .. } => Err(ConfigError::new("period", "is missing")),
        }
    }
}

#[cfg(feature = "serde")]
impl From<Quotas> for QuotasConfig {
    fn from(quotas: Quotas) -> Self {
        match &*quotas.quotas {
            [quota] => Self {
                quotas: None,
                limit: Some(quota.limit),
                period: Some(quota.period),
                burst: Some(quota.burst),
            },
            many => Self {
                quotas: Some(many.to_vec()),
                limit: None,
                period: None,
                burst: None,
            },
        }
    }
}
