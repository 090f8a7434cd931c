//! Adaptive concurrency limits that learn from latency and errors.
//!
//! An [`AdaptiveLimit`] is fed one sample per finished request (its round-trip time, the
//! number of requests in flight when it finished, and its [`Outcome`]) and answers with the
//! concurrency the service seems able to take. Two algorithms are provided, after Netflix's
//! concurrency-limits:
//!
//! - [`AimdConfig`]: additive increase, multiplicative decrease. Grows by one while the limit
//!   is being used and every request succeeds fast; shrinks by a ratio on a
//!   [`Outcome::Dropped`] or a round trip slower than the latency threshold. Simple and
//!   robust; it needs a drop signal (errors, timeouts or the threshold) to find the ceiling.
//! - [`GradientConfig`]: the gradient algorithm. Compares each round trip with the lowest one
//!   seen (the no-load round trip) and scales the limit by their ratio, plus a small queue
//!   allowance: the limit settles where queueing starts to add latency, without any error
//!   signal. The no-load round trip is re-learned periodically (a *probe*), so a lasting
//!   change of the service's base latency is followed.
//!
//! Use it as the limit of a [`Bulkhead`](crate::Bulkhead) through
//! [`BulkheadBuilder::adaptive`](crate::BulkheadBuilder::adaptive), or on its own.
//!
//! ```
//! use std::time::Duration;
//! use headroom_limit::adaptive::{AdaptiveConfig, AdaptiveLimit, AimdConfig, Outcome};
//!
//! let limit = AdaptiveLimit::new("search", AdaptiveConfig::Aimd(AimdConfig {
//!     initial_limit: 10,
//!     ..AimdConfig::default()
//! }))?;
//! assert_eq!(limit.sample(Duration::from_millis(5), 10, Outcome::Success), 11);
//! assert_eq!(limit.sample(Duration::from_millis(5), 11, Outcome::Dropped), 9);
//! # Ok::<(), headroom_limit::ConfigError>(())
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge};
use parking_lot::Mutex;

use crate::ConfigError;

/// How a request that held a permit ended, as far as the limit is concerned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The request finished; its round trip is a valid latency sample.
    #[default]
    Success,
    /// The request failed in a way that signals overload downstream (a timeout, a rejection
    /// by the callee, a connection refused). The limit backs off.
    Dropped,
    /// The sample says nothing about capacity (a cancelled request, a client error, a panic).
    Ignored,
}

/// Which algorithm an [`AdaptiveLimit`] runs, with its parameters.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(tag = "algorithm", rename_all = "snake_case", deny_unknown_fields)
)]
pub enum AdaptiveConfig {
    /// Additive increase, multiplicative decrease.
    Aimd(AimdConfig),
    /// Gradient: the ratio of no-load to current round trip steers the limit.
    Gradient(GradientConfig),
}

impl AdaptiveConfig {
    fn bounds(&self) -> (usize, usize, usize) {
        match self {
            AdaptiveConfig::Aimd(c) => (c.min_limit, c.initial_limit, c.max_limit),
            AdaptiveConfig::Gradient(c) => (c.min_limit, c.initial_limit, c.max_limit),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let (min, initial, max) = self.bounds();
        if min == 0 {
            return Err(ConfigError::new("min_limit", "must be at least 1"));
        }
        if max > crate::bulkhead::MAX_LIMIT {
            return Err(ConfigError::new(
                "max_limit",
                "exceeds the largest supported limit",
            ));
        }
        if !(min <= initial && initial <= max) {
            return Err(ConfigError::new(
                "initial_limit",
                "must lie between min_limit and max_limit",
            ));
        }
        match self {
            AdaptiveConfig::Aimd(c) => {
                if !(c.backoff_ratio > 0.0 && c.backoff_ratio < 1.0) {
                    return Err(ConfigError::new("backoff_ratio", "must lie in (0, 1)"));
                }
            }
            AdaptiveConfig::Gradient(c) => {
                if !(c.smoothing > 0.0 && c.smoothing <= 1.0) {
                    return Err(ConfigError::new("smoothing", "must lie in (0, 1]"));
                }
                if !(c.rtt_tolerance >= 1.0 && c.rtt_tolerance.is_finite()) {
                    return Err(ConfigError::new("rtt_tolerance", "must be at least 1.0"));
                }
                if c.probe_interval == 0 {
                    return Err(ConfigError::new("probe_interval", "must be at least 1"));
                }
            }
        }
        Ok(())
    }
}

/// Parameters of the AIMD algorithm.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct AimdConfig {
    /// The limit to start from.
    pub initial_limit: usize,
    /// The limit never goes below this (at least 1).
    pub min_limit: usize,
    /// The limit never goes above this.
    pub max_limit: usize,
    /// The limit is multiplied by this on a drop, in (0, 1).
    pub backoff_ratio: f64,
    /// A round trip slower than this counts as a drop. `None` relies on
    /// [`Outcome::Dropped`] only.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub latency_threshold: Option<Duration>,
}

impl Default for AimdConfig {
    fn default() -> Self {
        Self {
            initial_limit: 20,
            min_limit: 1,
            max_limit: 1_000,
            backoff_ratio: 0.9,
            latency_threshold: None,
        }
    }
}

/// Parameters of the gradient algorithm.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct GradientConfig {
    /// The limit to start from.
    pub initial_limit: usize,
    /// The limit never goes below this (at least 1).
    pub min_limit: usize,
    /// The limit never goes above this.
    pub max_limit: usize,
    /// How much of each new estimate is blended into the limit, in (0, 1].
    pub smoothing: f64,
    /// How much slower than the no-load round trip a round trip may be before the limit
    /// shrinks (1.2 = 20 % slower). The limit settles near
    /// `rtt_tolerance × capacity + queue_size`.
    pub rtt_tolerance: f64,
    /// Extra concurrency allowed on top of the gradient, so the limit can grow.
    pub queue_size: usize,
    /// Every this many samples the no-load round trip is forgotten and the limit restarts
    /// from `max(min_limit, queue_size)`, so a change of base latency is learned.
    pub probe_interval: u32,
}

impl Default for GradientConfig {
    fn default() -> Self {
        Self {
            initial_limit: 20,
            min_limit: 1,
            max_limit: 1_000,
            smoothing: 0.2,
            rtt_tolerance: 1.2,
            queue_size: 2,
            probe_interval: 1_000,
        }
    }
}

/// A concurrency limit that adapts to the latency and errors it observes.
///
/// Cloning is cheap and clones share the limit. Sampling takes a lock owned by this limit
/// (never a global one); reading the limit is a single atomic load.
#[derive(Clone)]
pub struct AdaptiveLimit {
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    state: Mutex<State>,
    limit: AtomicUsize,
    gauge: Gauge,
    changes: Counter,
}

enum State {
    Aimd {
        config: AimdConfig,
        limit: usize,
    },
    Gradient {
        config: GradientConfig,
        limit: f64,
        /// The lowest round trip since the last probe, in seconds.
        no_load_rtt: Option<f64>,
        until_probe: u32,
    },
}

impl AdaptiveLimit {
    /// A limit named `name` (the `limiter` label of its metrics) running `config`.
    pub fn new(name: &str, config: AdaptiveConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let initial = config.bounds().1;
        let state = match config {
            AdaptiveConfig::Aimd(config) => State::Aimd {
                config,
                limit: initial,
            },
            AdaptiveConfig::Gradient(config) => State::Gradient {
                limit: initial as f64,
                no_load_rtt: None,
                until_probe: config.probe_interval,
                config,
            },
        };
        let name: Arc<str> = Arc::from(name);
        let gauge = metrics::gauge!("headroom_limit_concurrency_limit_requests", "limiter" => name.to_string());
        gauge.set(initial as f64);
        Ok(Self {
            inner: Arc::new(Inner {
                changes: metrics::counter!("headroom_limit_limit_changes_total", "limiter" => name.to_string()),
                name,
                state: Mutex::new(state),
                limit: AtomicUsize::new(initial),
                gauge,
            }),
        })
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.inner.limit.load(Ordering::Relaxed)
    }

    /// Feeds one finished request and returns the (possibly new) limit.
    ///
    /// `rtt` is how long the request held its permit, `in_flight` how many requests held
    /// one at that moment (this one included). The limit only grows while it is being used:
    /// an idle service teaches nothing about its ceiling.
    pub fn sample(&self, rtt: Duration, in_flight: usize, outcome: Outcome) -> usize {
        if outcome == Outcome::Ignored {
            return self.limit();
        }
        let mut state = self.inner.state.lock();
        let new = match &mut *state {
            State::Aimd { config, limit } => {
                let slow = config.latency_threshold.is_some_and(|t| rtt > t);
                if outcome == Outcome::Dropped || slow {
                    let backed_off = (*limit as f64 * config.backoff_ratio).floor() as usize;
                    *limit = backed_off.max(config.min_limit);
                } else if in_flight.saturating_mul(2) >= *limit {
                    *limit = (*limit + 1).min(config.max_limit);
                }
                *limit
            }
            State::Gradient {
                config,
                limit,
                no_load_rtt,
                until_probe,
            } => {
                *until_probe -= 1;
                if *until_probe == 0 {
                    *until_probe = config.probe_interval;
                    *no_load_rtt = None;
                    *limit = config.min_limit.max(config.queue_size) as f64;
                } else {
                    let rtt = rtt.as_secs_f64().max(1e-9);
                    let no_load = no_load_rtt.map_or(rtt, |lowest| lowest.min(rtt));
                    *no_load_rtt = Some(no_load);
                    let app_limited = (in_flight as f64) < *limit / 2.0;
                    let estimate = if outcome == Outcome::Dropped {
                        Some(*limit * 0.5)
                    } else if app_limited {
                        None
                    } else {
                        let gradient = (config.rtt_tolerance * no_load / rtt).clamp(0.5, 1.0);
                        Some(*limit * gradient + config.queue_size as f64)
                    };
                    if let Some(estimate) = estimate {
                        let blended =
                            *limit * (1.0 - config.smoothing) + estimate * config.smoothing;
                        *limit = blended.clamp(config.min_limit as f64, config.max_limit as f64);
                    }
                }
                *limit as usize
            }
        };
        drop(state);
        let old = self.inner.limit.swap(new, Ordering::Relaxed);
        if old != new {
            self.inner.gauge.set(new as f64);
            self.inner.changes.increment(1);
            tracing::trace!(limiter = %self.inner.name, old, new, "concurrency limit changed");
        }
        new
    }
}

impl fmt::Debug for AdaptiveLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveLimit")
            .field("name", &self.inner.name)
            .field("limit", &self.limit())
            .finish()
    }
}
