//! Quotas: how many units per period, with how large a burst.

use std::time::Duration;

use headroom_core::rate::Gcra;

use crate::ConfigError;

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
    /// Errors when `limit` is zero, `period` is zero, or the emission interval
    /// (`period / limit`) would be shorter than a nanosecond.
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
        Ok(Self {
            limit,
            period,
            burst: limit,
        })
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

    /// The same rate with bursts of up to `burst` units (at least 1).
    pub fn with_burst(self, burst: u32) -> Result<Self, ConfigError> {
        if burst == 0 {
            return Err(ConfigError::new("burst", "must be at least 1"));
        }
        Ok(Self { burst, ..self })
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

    /// This quota split evenly over `instances` (rate and burst, each at least 1): the share
    /// one instance enforces on its own when the shared store is unreachable.
    pub fn share(&self, instances: u32) -> Self {
        let instances = instances.max(1);
        let limit = (self.limit / instances).max(1);
        Self {
            limit,
            period: self.period,
            burst: (self.burst / instances).max(1),
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
