//! Configuration of every strategy, loadable with serde (feature `serde`, durations written as
//! `"250ms"`, `"5s"`). Builders start from these defaults; `build()` validates.

use std::time::Duration;

use crate::error::{ConfigError, check};

/// The largest count window (one byte per call) and the most half-open probes.
const MAX_WINDOW_SLOTS: u32 = 1 << 20;
/// The most buckets a time window may have (a cache line each, per core).
const MAX_TIME_BUCKETS: u32 = 1024;

/// Where a section's settings are checked: alone (from its builder), or inside a
/// [`PipelineConfig`], whose sections share setting names (the breaker's `window` and the
/// budget's).
#[derive(Clone, Copy)]
enum Within {
    Alone,
    Pipeline,
}

/// The name of a setting as its error reports it: `window` alone, `budget.window` inside a
/// pipeline. Both are `'static`, so an error still costs nothing to build.
macro_rules! setting {
    ($within:expr, $section:literal, $field:literal) => {
        match $within {
            Within::Alone => $field,
            Within::Pipeline => concat!($section, ".", $field),
        }
    };
}

/// How a breaker's sliding window measures recent calls.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)
)]
#[non_exhaustive]
pub enum WindowConfig {
    /// The last `size` calls.
    Count {
        /// How many calls the window holds.
        size: u32,
    },
    /// The calls of the last `length`, kept in `buckets` slices that expire one at a time.
    Time {
        /// How far back the window reaches.
        #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
        length: Duration,
        /// How many slices the window is cut into (its time resolution).
        buckets: u32,
    },
}

impl WindowConfig {
    fn validate(&self, within: Within) -> Result<(), ConfigError> {
        match *self {
            Self::Count { size } => check(
                (1..=MAX_WINDOW_SLOTS).contains(&size),
                setting!(within, "breaker", "window.size"),
                "between 1 and 1048576",
            ),
            Self::Time { length, buckets } => {
                check(
                    (1..=MAX_TIME_BUCKETS).contains(&buckets),
                    setting!(within, "breaker", "window.buckets"),
                    "between 1 and 1024",
                )?;
                check(
                    length.as_nanos() >= u128::from(buckets),
                    setting!(within, "breaker", "window.length"),
                    "at least one nanosecond per bucket",
                )
            }
        }
    }
}

/// Circuit breaker settings. See [`CircuitBreakerBuilder`](crate::CircuitBreakerBuilder) for
/// what each one does.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Share of failed calls in the window that opens the circuit, in (0, 1]. Default 0.5.
    pub failure_ratio: f64,
    /// Share of slow calls in the window that opens the circuit, in (0, 1]; `None` (the
    /// default) ignores call duration.
    pub slow_call_ratio: Option<f64>,
    /// A call taking longer than this is slow; more than zero. Default 1 s.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub slow_call_duration: Duration,
    /// The sliding window. Default: the last 10 s in 10 buckets.
    pub window: WindowConfig,
    /// Calls the window must hold before the ratios are judged, at least 1 and, for a count
    /// window, at most its size. Default 20.
    pub minimum_calls: u32,
    /// How long the circuit stays open the first time. Default 5 s.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub open_duration: Duration,
    /// Each reopening without a successful recovery doubles the open duration, up to this.
    /// Default 60 s; equal to `open_duration` for no backoff.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub max_open_duration: Duration,
    /// Probe calls let through when half-open; all must succeed to close. Default 3.
    pub half_open_probes: u32,
    /// If probes run this long with none finishing (from the start of the half-open phase, the
    /// last probe that succeeded, or a probe admitted when none was running), the circuit
    /// reopens (and later admits fresh probes) rather than wait on them forever. Default 30 s.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub half_open_max_wait: Duration,
    /// Whether a call cancelled before it finished (its future dropped) counts as a failure.
    /// Default `false`: it is forgotten, and a half-open probe slot it held is freed.
    pub count_cancelled: bool,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_ratio: 0.5,
            slow_call_ratio: None,
            slow_call_duration: Duration::from_secs(1),
            window: WindowConfig::Time {
                length: Duration::from_secs(10),
                buckets: 10,
            },
            minimum_calls: 20,
            open_duration: Duration::from_secs(5),
            max_open_duration: Duration::from_secs(60),
            half_open_probes: 3,
            half_open_max_wait: Duration::from_secs(30),
            count_cancelled: false,
        }
    }
}

fn is_ratio(ratio: f64) -> bool {
    ratio > 0.0 && ratio <= 1.0
}

impl BreakerConfig {
    /// Checks every setting, naming the first one out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_within(Within::Alone)
    }

    fn validate_within(&self, within: Within) -> Result<(), ConfigError> {
        check(
            is_ratio(self.failure_ratio),
            setting!(within, "breaker", "failure_ratio"),
            "in (0, 1]",
        )?;
        if let Some(ratio) = self.slow_call_ratio {
            check(
                is_ratio(ratio),
                setting!(within, "breaker", "slow_call_ratio"),
                "in (0, 1]",
            )?;
        }
        // A zero limit makes every call slow: the circuit would open and never close.
        check(
            !self.slow_call_duration.is_zero(),
            setting!(within, "breaker", "slow_call_duration"),
            "more than zero",
        )?;
        self.window.validate(within)?;
        check(
            self.minimum_calls >= 1,
            setting!(within, "breaker", "minimum_calls"),
            "at least 1",
        )?;
        // A count window never holds more than its size: a larger minimum is never reached,
        // and the breaker would never open.
        if let WindowConfig::Count { size } = self.window {
            check(
                self.minimum_calls <= size,
                setting!(within, "breaker", "minimum_calls"),
                "at most window.size for a count window",
            )?;
        }
        check(
            !self.open_duration.is_zero(),
            setting!(within, "breaker", "open_duration"),
            "more than zero",
        )?;
        check(
            self.max_open_duration >= self.open_duration,
            setting!(within, "breaker", "max_open_duration"),
            "at least open_duration",
        )?;
        check(
            (1..=MAX_WINDOW_SLOTS).contains(&self.half_open_probes),
            setting!(within, "breaker", "half_open_probes"),
            "between 1 and 1048576",
        )?;
        check(
            !self.half_open_max_wait.is_zero(),
            setting!(within, "breaker", "half_open_max_wait"),
            "more than zero",
        )
    }
}

/// Retry settings. See [`RetryBuilder`](crate::RetryBuilder).
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct RetryConfig {
    /// Attempts in all, the first included. Default 3.
    pub max_attempts: u32,
    /// Backoff cap of the first retry; it doubles for each further retry. Default 100 ms.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub base_delay: Duration,
    /// Largest backoff cap. The wait is drawn uniformly below the cap (full jitter). Default 10 s.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub max_delay: Duration,
    /// Whether an attempt that timed out is retried. Default `true`. With
    /// [`Retry::builder`](crate::Retry::builder), an error that `Classify::is_timeout` calls
    /// a timeout counts as one too (a timeout layer's `Elapsed` under a retry layer).
    pub retry_timeouts: bool,
    /// A server asking to wait longer than this (retry-after) is not retried. Default 30 s.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub max_retry_after: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
            retry_timeouts: true,
            max_retry_after: Duration::from_secs(30),
        }
    }
}

impl RetryConfig {
    /// Checks every setting, naming the first one out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_within(Within::Alone)
    }

    fn validate_within(&self, within: Within) -> Result<(), ConfigError> {
        check(
            self.max_attempts >= 1,
            setting!(within, "retry", "max_attempts"),
            "at least 1",
        )?;
        check(
            self.max_delay >= self.base_delay,
            setting!(within, "retry", "max_delay"),
            "at least base_delay",
        )
    }
}

/// Retry budget settings. See [`RetryBudget`](crate::RetryBudget).
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct BudgetConfig {
    /// Retries (and hedges) allowed per request over the window, in [0, 10]. Default 0.2.
    pub ratio: f64,
    /// Retries allowed per second regardless of traffic, so that a quiet service can still
    /// retry. Default 10.
    pub min_per_second: u32,
    /// How far back requests and retries are counted. Default 10 s.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

impl BudgetConfig {
    /// Checks every setting, naming the first one out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_within(Within::Alone)
    }

    fn validate_within(&self, within: Within) -> Result<(), ConfigError> {
        check(
            (0.0..=10.0).contains(&self.ratio),
            setting!(within, "budget", "ratio"),
            "between 0 and 10",
        )?;
        check(
            self.window >= Duration::from_millis(10),
            setting!(within, "budget", "window"),
            "at least 10ms",
        )
    }
}

/// Hedging settings. See [`HedgeBuilder`](crate::HedgeBuilder).
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct HedgeConfig {
    /// Wait before each extra attempt; with `percentile` set, used until enough latencies have
    /// been observed. Default 100 ms.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub delay: Duration,
    /// Wait instead for this percentile (in (0, 1), e.g. 0.95) of recently observed latencies.
    pub percentile: Option<f64>,
    /// Extra attempts at most, each after a further delay. Default 1.
    pub max_hedges: u32,
}

impl Default for HedgeConfig {
    fn default() -> Self {
        Self {
            delay: Duration::from_millis(100),
            percentile: None,
            max_hedges: 1,
        }
    }
}

impl HedgeConfig {
    /// Checks every setting, naming the first one out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_within(Within::Alone)
    }

    fn validate_within(&self, within: Within) -> Result<(), ConfigError> {
        if let Some(p) = self.percentile {
            check(
                p > 0.0 && p < 1.0,
                setting!(within, "hedge", "percentile"),
                "in (0, 1)",
            )?;
        }
        check(
            (1..=16).contains(&self.max_hedges),
            setting!(within, "hedge", "max_hedges"),
            "between 1 and 16",
        )
    }
}

/// A whole pipeline: each strategy present is applied (see [`Pipeline`](crate::Pipeline) for
/// the order); the budget is shared by retries and hedges.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct PipelineConfig {
    /// Time limit of each attempt (hedges included).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub timeout: Option<Duration>,
    /// The circuit breaker.
    pub breaker: Option<BreakerConfig>,
    /// Retries.
    pub retry: Option<RetryConfig>,
    /// The budget bounding retries and hedges.
    pub budget: Option<BudgetConfig>,
    /// Hedged attempts.
    pub hedge: Option<HedgeConfig>,
}

impl PipelineConfig {
    /// Checks every setting, naming the first one out of range by its path: `timeout`,
    /// `budget.window`, `breaker.window.size`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(timeout) = self.timeout {
            check(timeout > Duration::ZERO, "timeout", "more than zero")?;
        }
        if let Some(breaker) = &self.breaker {
            breaker.validate_within(Within::Pipeline)?;
        }
        if let Some(retry) = &self.retry {
            retry.validate_within(Within::Pipeline)?;
        }
        if let Some(budget) = &self.budget {
            budget.validate_within(Within::Pipeline)?;
        }
        match &self.hedge {
            Some(hedge) => hedge.validate_within(Within::Pipeline),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        assert_eq!(BreakerConfig::default().validate(), Ok(()));
        assert_eq!(RetryConfig::default().validate(), Ok(()));
        assert_eq!(BudgetConfig::default().validate(), Ok(()));
        assert_eq!(HedgeConfig::default().validate(), Ok(()));
        let bad = BreakerConfig {
            failure_ratio: 1.5,
            ..BreakerConfig::default()
        };
        assert_eq!(bad.validate().map_err(|e| e.field()), Err("failure_ratio"));
        let bad = BreakerConfig {
            window: WindowConfig::Count { size: 0 },
            ..BreakerConfig::default()
        };
        assert_eq!(bad.validate().map_err(|e| e.field()), Err("window.size"));
        let bad = BreakerConfig {
            window: WindowConfig::Count { size: 10 },
            minimum_calls: 11,
            ..BreakerConfig::default()
        };
        assert_eq!(bad.validate().map_err(|e| e.field()), Err("minimum_calls"));
        let bad = RetryConfig {
            max_attempts: 0,
            ..RetryConfig::default()
        };
        assert_eq!(bad.validate().map_err(|e| e.field()), Err("max_attempts"));
        let bad = HedgeConfig {
            percentile: Some(1.0),
            ..HedgeConfig::default()
        };
        assert_eq!(bad.validate().map_err(|e| e.field()), Err("percentile"));
        // No wait: every hedge starts at once (parallel hedging), which is allowed.
        let parallel = HedgeConfig {
            delay: Duration::ZERO,
            ..HedgeConfig::default()
        };
        assert_eq!(parallel.validate(), Ok(()));
        // No time at all: every attempt not ready at once would fail.
        let bad = PipelineConfig {
            timeout: Some(Duration::ZERO),
            ..PipelineConfig::default()
        };
        assert_eq!(bad.validate().map_err(|e| e.field()), Err("timeout"));
        assert_eq!(PipelineConfig::default().validate(), Ok(()));
    }

    /// Inside a pipeline the sections share setting names (the breaker's window and the
    /// budget's): an error names the section too, and a section checked alone does not.
    #[test]
    fn pipeline_errors_name_the_section_of_the_setting() {
        let field = |config: PipelineConfig| config.validate().map_err(|e| e.field());
        let budget = BudgetConfig {
            window: Duration::from_millis(5),
            ..BudgetConfig::default()
        };
        assert_eq!(budget.validate().map_err(|e| e.field()), Err("window"));
        assert_eq!(
            field(PipelineConfig {
                budget: Some(budget),
                ..PipelineConfig::default()
            }),
            Err("budget.window")
        );
        let breaker = |breaker| PipelineConfig {
            breaker: Some(breaker),
            ..PipelineConfig::default()
        };
        assert_eq!(
            field(breaker(BreakerConfig {
                window: WindowConfig::Time {
                    length: Duration::from_nanos(5),
                    buckets: 10,
                },
                ..BreakerConfig::default()
            })),
            Err("breaker.window.length")
        );
        assert_eq!(
            field(breaker(BreakerConfig {
                failure_ratio: 0.0,
                ..BreakerConfig::default()
            })),
            Err("breaker.failure_ratio")
        );
        assert_eq!(
            field(PipelineConfig {
                retry: Some(RetryConfig {
                    max_attempts: 0,
                    ..RetryConfig::default()
                }),
                ..PipelineConfig::default()
            }),
            Err("retry.max_attempts")
        );
        assert_eq!(
            field(PipelineConfig {
                hedge: Some(HedgeConfig {
                    max_hedges: 0,
                    ..HedgeConfig::default()
                }),
                ..PipelineConfig::default()
            }),
            Err("hedge.max_hedges")
        );
        assert_eq!(
            field(PipelineConfig {
                timeout: Some(Duration::ZERO),
                ..PipelineConfig::default()
            }),
            Err("timeout")
        );
    }

    #[cfg(feature = "serde")]
    #[test]
    fn pipeline_config_loads_from_json_with_readable_durations() {
        let json = r#"{
            "timeout": "250ms",
            "breaker": {
                "failure_ratio": 0.25,
                "window": { "kind": "count", "size": 50 },
                "open_duration": "2s"
            },
            "retry": { "max_attempts": 4, "base_delay": "20ms" },
            "budget": { "ratio": 0.1 },
            "hedge": { "delay": "30ms", "percentile": 0.95 }
        }"#;
        let config: PipelineConfig = serde_json::from_str(json).expect("config");
        assert_eq!(config.timeout, Some(Duration::from_millis(250)));
        let breaker = config.breaker.expect("breaker");
        assert_eq!(breaker.window, WindowConfig::Count { size: 50 });
        assert_eq!(breaker.open_duration, Duration::from_secs(2));
        assert_eq!(breaker.minimum_calls, 20);
        assert_eq!(config.retry.expect("retry").max_attempts, 4);
        assert_eq!(config.hedge.expect("hedge").percentile, Some(0.95));
        let typo = r#"{ "breaker": { "failure_ration": 0.2 } }"#;
        assert!(serde_json::from_str::<PipelineConfig>(typo).is_err());
    }
}
