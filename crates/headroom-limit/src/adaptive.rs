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
//! - [`GradientConfig`]: Gradient2. Compares the average round trip of the last round trip's
//!   worth of successful requests (the short RTT) with a long-term average of the round trips
//!   taken without a queue (the long RTT) and scales the limit by their ratio, plus a queue
//!   allowance: the limit settles where queueing starts to add latency, without any error
//!   signal, however much single round trips vary. Every step is sized by the limit, so it
//!   behaves the same at a capacity of 10 and of 10,000. A limit in full use may hold a queue
//!   of its own making, so the long RTT learns only from round trips taken while the limit is
//!   less than half used and from a short *probe* now and then.
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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use headroom_core::metrics::{Counter, Gauge};
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
    /// Gradient2: the ratio of the long to the short round trip steers the limit.
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
        if max > crate::limits::MAX_LIMIT {
            return Err(ConfigError::new(
                "max_limit",
                "must be at most 2147483647 (2^31 - 1)",
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
                if c.long_window == 0 {
                    return Err(ConfigError::new("long_window", "must be at least 1"));
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
    /// The limit never goes above this (at most 2³¹ − 1).
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

/// Parameters of the gradient algorithm (Gradient2, after Netflix's concurrency-limits).
///
/// Only [`Outcome::Success`] samples are measured: a failure may come back at once (a refused
/// connection) or only at a timeout, and says nothing about how long the service takes. The
/// short RTT is an exponential average of their round trips over the last round trip (one
/// limit's worth of samples), so round trips that merely vary do not read as queueing. The long
/// RTT is the no-load round trip: an exponential average over `long_window` round trips of those
/// taken while less than half the limit was in use, brought down quickly (by 5 % a sample)
/// while it is more than twice the short RTT. Each successful sample taken with the limit in use
/// scales the limit by the gradient `rtt_tolerance × long / short`, clamped to [0.5, 1], plus a
/// queue allowance of `max(queue_size, √limit)`, and `smoothing` of that estimate is blended in
/// per round trip, so every step is sized by the limit: the limit settles near
/// `rtt_tolerance × capacity + √limit` at any scale, and falls only when queueing adds latency.
/// A [`Outcome::Dropped`] sample blends in half the limit instead.
///
/// A busy service may never leave the limit less than half used. So every `probe_interval`
/// round trips (jittered by ±50 % so that instances do not probe together) the limit drops to
/// `limit / (2 × rtt_tolerance)` for about one and a half round trips; the average of the
/// successful round trips that come back after the first round trip's worth (the requests
/// admitted before the drop) becomes the long RTT, and the limit goes back to where it was.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct GradientConfig {
    /// The limit to start from.
    pub initial_limit: usize,
    /// The limit never goes below this (at least 1).
    pub min_limit: usize,
    /// The limit never goes above this (at most 2³¹ − 1).
    pub max_limit: usize,
    /// How much of each new estimate is blended into the limit per round trip, in (0, 1].
    pub smoothing: f64,
    /// How much slower than the long RTT a round trip may be before the limit shrinks
    /// (1.2 = 20 % slower).
    pub rtt_tolerance: f64,
    /// The smallest queue allowance added on top of the gradient, so the limit can grow; the
    /// allowance is `√limit` when that is larger.
    pub queue_size: usize,
    /// How many round trips the long RTT averages over (of those taken while less than half
    /// the limit is in use).
    pub long_window: u32,
    /// About how many round trips pass between probes of the no-load round trip.
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
            long_window: 1_000,
            probe_interval: 100,
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
    config: AdaptiveConfig,
    state: Mutex<State>,
    limit: AtomicUsize,
    gauge: Gauge,
    changes: Counter,
    /// Set when a load shedder refused a request for the limit's sake (see
    /// [`AdaptiveLimit::refused_demand`]); taken by the next sample.
    refused_demand: AtomicBool,
}

enum State {
    Aimd {
        config: AimdConfig,
        limit: usize,
        /// The highest limit reached in full use, at least the initial one: as far as
        /// refused demand alone takes the limit (see [`AdaptiveLimit::sample`]).
        proven: usize,
    },
    Gradient(Box<Gradient>),
}

struct Gradient {
    config: GradientConfig,
    limit: f64,
    /// The highest limit reached in full use, at least the initial one: as far as refused
    /// demand alone takes the limit (see [`AdaptiveLimit::sample`]).
    proven: f64,
    /// The long RTT in seconds: the no-load round trip, an exponential average over
    /// `long_window` round trips of those taken while the limit was less than half used, reset
    /// by each probe; `None` before the first successful sample.
    long_rtt: Option<f64>,
    /// The short RTT in seconds, an exponential average over the last round trip.
    short_rtt: f64,
    /// Round trips left before the next probe.
    until_probe: f64,
    probe: Option<Probe>,
    rng: fastrand::Rng,
}

/// A probe under way: the limit is lowered until `samples_left` more samples have come in.
struct Probe {
    restore: f64,
    samples_left: u64,
    /// Samples still to come before the requests admitted at the old limit are all back.
    draining: u64,
    /// The sum and number of successful round trips after that: the no-load round trip.
    rtt_sum: f64,
    rtt_count: u64,
}

/// Blends `sample` into the exponential average `average` with `weight`.
fn blend(average: f64, sample: f64, weight: f64) -> f64 {
    average * (1.0 - weight) + sample * weight
}

impl Gradient {
    fn new(config: GradientConfig) -> Self {
        let mut gradient = Self {
            limit: config.initial_limit as f64,
            proven: config.initial_limit as f64,
            config,
            long_rtt: None,
            short_rtt: 0.0,
            until_probe: 0.0,
            probe: None,
            rng: fastrand::Rng::new(),
        };
        gradient.schedule_probe();
        gradient
    }

    fn schedule_probe(&mut self) {
        let jitter = 0.5 + self.rng.f64();
        self.until_probe = f64::from(self.config.probe_interval) * jitter;
    }

    fn clamp(&self, limit: f64) -> f64 {
        limit.clamp(self.config.min_limit as f64, self.config.max_limit as f64)
    }

    fn sample(&mut self, rtt: Duration, in_flight: usize, outcome: Outcome, wanted: bool) -> usize {
        let rtt = rtt.as_secs_f64().max(1e-9);
        // Only a success measures the service: a failure may come back at once (a refused
        // connection) or only at a timeout.
        let success = outcome == Outcome::Success;
        if success {
            // Averaged over a round trip, so that round trips which merely vary (not queueing)
            // do not pull the limit down.
            self.short_rtt = match self.long_rtt {
                None => rtt,
                Some(_) => blend(self.short_rtt, rtt, 2.0 / (self.limit + 1.0)),
            };
        }
        if let Some(probe) = &mut self.probe {
            probe.samples_left -= 1;
            if probe.draining > 0 {
                probe.draining -= 1;
            } else if success {
                probe.rtt_sum += rtt;
                probe.rtt_count += 1;
            }
            if probe.samples_left == 0 {
                if probe.rtt_count > 0 {
                    self.long_rtt = Some(probe.rtt_sum / probe.rtt_count as f64);
                }
                self.limit = probe.restore;
                self.probe = None;
                self.schedule_probe();
            }
            return self.limit as usize;
        }
        // Counted in round trips, so a limit that falls after scheduling does not put the
        // probe off.
        self.until_probe -= 1.0 / self.limit;
        if self.until_probe <= 0.0 && self.long_rtt.is_some() {
            // Long enough for the requests admitted before the drop to finish and for a round
            // trip at the lower limit to come back; only the latter are without a queue.
            self.probe = Some(Probe {
                restore: self.limit,
                samples_left: (self.limit * 1.5).ceil() as u64 + 1,
                draining: self.limit.ceil() as u64,
                rtt_sum: 0.0,
                rtt_count: 0,
            });
            self.limit = self.clamp(self.limit / (2.0 * self.config.rtt_tolerance));
            return self.limit as usize;
        }
        let idle = (in_flight as f64) < self.limit / 2.0;
        if success {
            let long = match self.long_rtt {
                None => rtt,
                // A round trip taken with the limit in full use includes the queue the limit
                // allows, so only the others (and probes) teach the no-load round trip.
                Some(long) if idle => {
                    let weight = 2.0 / (f64::from(self.config.long_window) * self.limit + 1.0);
                    blend(long, rtt, weight)
                }
                Some(long) => long,
            };
            // Round trips far below it mean the service got faster: catch up quickly.
            self.long_rtt = Some(if long > 2.0 * self.short_rtt {
                long * 0.95
            } else {
                long
            });
        }
        let estimate = match (outcome, self.long_rtt) {
            (Outcome::Dropped, _) => self.limit * 0.5,
            // An idle service teaches nothing about its ceiling, unless requests were refused
            // for the limit's sake meanwhile.
            _ if idle && !wanted => return self.limit as usize,
            (Outcome::Success, Some(long)) => {
                let gradient = (self.config.rtt_tolerance * long / self.short_rtt).clamp(0.5, 1.0);
                let allowance = (self.config.queue_size as f64).max(self.limit.sqrt());
                self.limit * gradient + allowance
            }
            _ => return self.limit as usize,
        };
        let weight = (self.config.smoothing / self.limit).min(1.0);
        let next = self.clamp(self.limit * (1.0 - weight) + estimate * weight);
        self.limit = if idle {
            // Only refused demand asks for more: it may restore what full use has shown, but
            // a priority kept below a share of the limit cannot show the service past it.
            next.min(self.limit.max(self.proven))
        } else {
            self.proven = self.proven.max(next);
            next
        };
        self.limit as usize
    }
}

impl AdaptiveLimit {
    /// A limit named `name` (the `limiter` label of its metrics) running `config`.
    pub fn new(name: &str, config: AdaptiveConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let initial = config.bounds().1;
        let built = config.clone();
        let state = match config {
            AdaptiveConfig::Aimd(config) => State::Aimd {
                config,
                limit: initial,
                proven: initial,
            },
            AdaptiveConfig::Gradient(config) => State::Gradient(Box::new(Gradient::new(config))),
        };
        let name: Arc<str> = Arc::from(name);
        let gauge = headroom_core::gauge!("headroom_limit_concurrency_limit_requests", "limiter" => name.to_string());
        gauge.set(initial as f64);
        Ok(Self {
            inner: Arc::new(Inner {
                changes: headroom_core::counter!("headroom_limit_limit_changes_total", "limiter" => name.to_string()),
                config: built,
                name,
                state: Mutex::new(state),
                limit: AtomicUsize::new(initial),
                gauge,
                refused_demand: AtomicBool::new(false),
            }),
        })
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &AdaptiveConfig {
        &self.inner.config
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.inner.limit.load(Ordering::Relaxed)
    }

    /// Records that a request was refused because of the limit (by a load shedder keeping its
    /// priority below a share of it): the next sample counts as a limit in demand, however
    /// few requests hold permits.
    pub(crate) fn refused_demand(&self) {
        self.inner.refused_demand.store(true, Ordering::Relaxed);
    }

    /// Feeds one finished request and returns the (possibly new) limit.
    ///
    /// `rtt` is how long the request held its permit, `in_flight` how many requests held
    /// one at that moment (this one included). The limit only grows while it is being used:
    /// an idle service teaches nothing about its ceiling. Requests refused for its sake (by a
    /// [`LoadShedder`](crate::LoadShedder) that keeps some priorities below a share of it)
    /// grow it back to the highest limit reached in full use, or the initial one, not past
    /// it: work held below a share of the limit cannot show the service at the whole of it.
    pub fn sample(&self, rtt: Duration, in_flight: usize, outcome: Outcome) -> usize {
        if outcome == Outcome::Ignored {
            return self.limit();
        }
        let wanted = self.inner.refused_demand.swap(false, Ordering::Relaxed);
        let mut state = self.inner.state.lock();
        let new = match &mut *state {
            State::Aimd {
                config,
                limit,
                proven,
            } => {
                let slow = config.latency_threshold.is_some_and(|t| rtt > t);
                if outcome == Outcome::Dropped || slow {
                    let backed_off = (*limit as f64 * config.backoff_ratio).floor() as usize;
                    *limit = backed_off.max(config.min_limit);
                } else if in_flight.saturating_mul(2) >= *limit {
                    *limit = (*limit + 1).min(config.max_limit);
                    *proven = (*proven).max(*limit);
                } else if wanted && *limit < *proven {
                    *limit += 1;
                }
                *limit
            }
            State::Gradient(gradient) => gradient.sample(rtt, in_flight, outcome, wanted),
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
