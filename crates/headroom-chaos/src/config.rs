//! What an experiment injects, for how long, and how much of the traffic it may touch: plain
//! data, built in code or loaded with serde, and validated before it is switched on.

use std::time::Duration;

use headroom_core::BackendErrorKind;

use crate::ConfigError;

/// The settings of a running experiment: which strategies inject, at which rates, until when,
/// and the blast radius that caps them all.
///
/// Each strategy left out (`None`) injects nothing. Every rate is the probability, from 0 to 1,
/// that a call the experiment sees draws that strategy; strategies draw independently, so one
/// call can be delayed and then failed. A call ends one way, in this order: held (abort), else
/// failed (fault), else answered by the substitute (outcome), else it runs. So with abort at
/// `a` and fault at `f`, a share `f × (1 − a)` of the calls fail, and outcome's share is
/// `o × (1 − a) × (1 − f)` (less the delayed calls the run's end releases first: those run as
/// without the experiment). The blast radius then caps the calls affected by any strategy.
///
/// ```
/// use std::time::Duration;
/// use headroom_chaos::{Delay, ExperimentConfig};
///
/// let config = ExperimentConfig::new(Duration::from_secs(600))
///     .latency(0.2, Delay::Uniform { min: Duration::from_millis(50), max: Duration::from_millis(300) })
///     .fault(0.01)
///     .max_fraction(0.05);
/// assert!(config.validate().is_ok());
/// ```
// Fields left out (`None`) are not written: unknown fields are refused, so an instance built
// before a new optional field must still read every configuration that does not use it.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
#[non_exhaustive]
pub struct ExperimentConfig {
    /// How long the experiment runs once switched on; it stops by itself after it. Required,
    /// at most [`ExperimentConfig::LONGEST`].
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub duration: Duration,
    /// The cap on the calls affected, whatever the rates say.
    #[cfg_attr(feature = "serde", serde(default))]
    pub blast_radius: BlastRadius,
    /// Delays calls before they run.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub latency: Option<Latency>,
    /// Fails calls with an error instead of running them: the injection point's error, or for a
    /// backend wrapper a [`BackendError`](headroom_core::BackendError) of [`Fault::kind`].
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub fault: Option<Fault>,
    /// Answers calls with a substituted response instead of running them.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub outcome: Option<Rate>,
    /// Runs the injection point's hook before the call.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub behavior: Option<Rate>,
    /// Holds calls without completing them until the experiment stops, so the caller's own
    /// timeout is what ends them (a stalled backend, a hung dependency).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub abort: Option<Rate>,
    /// Drops published bus messages without an error (an invalidation bus wrapper only).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub loss: Option<Rate>,
}

/// A strategy's probability of injecting into a call, from 0 to 1.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct Rate {
    /// The probability.
    pub rate: f64,
}

/// The latency strategy: a rate and the delay it adds.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct Latency {
    /// The probability that a call is delayed.
    pub rate: f64,
    /// How long.
    pub delay: Delay,
}

/// The fault strategy: a rate and, for backend wrappers, the kind of backend error injected.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct Fault {
    /// The probability that a call fails.
    pub rate: f64,
    /// The kind of error a backend wrapper returns; tower layers and pipelines return the error
    /// their hook makes instead.
    #[cfg_attr(feature = "serde", serde(default))]
    pub kind: FaultKind,
}

/// The kind of [`BackendError`](headroom_core::BackendError) a backend wrapper injects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum FaultKind {
    /// The call timed out.
    Timeout,
    /// The connection failed.
    #[default]
    Connection,
    /// The backend is unavailable.
    Unavailable,
    /// The backend refused the command.
    Command,
}

impl FaultKind {
    /// The backend error kind injected.
    pub fn backend_kind(self) -> BackendErrorKind {
        match self {
            Self::Timeout => BackendErrorKind::Timeout,
            Self::Connection => BackendErrorKind::Connection,
            Self::Unavailable => BackendErrorKind::Unavailable,
            Self::Command => BackendErrorKind::Command,
        }
    }
}

/// How long an injected delay lasts.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(rename_all = "snake_case", deny_unknown_fields)
)]
#[non_exhaustive]
pub enum Delay {
    /// Always this long.
    Fixed(#[cfg_attr(feature = "serde", serde(with = "humantime_serde"))] Duration),
    /// Uniformly distributed from `min` up to `max`.
    Uniform {
        /// The shortest delay.
        #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
        min: Duration,
        /// The longest delay.
        #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
        max: Duration,
    },
    /// Exponentially distributed with mean `mean` (most calls a little slow, a few very slow,
    /// like a real tail), never longer than `max`.
    Exponential {
        /// The mean delay before the cap.
        #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
        mean: Duration,
        /// The longest delay.
        #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
        max: Duration,
    },
}

impl Delay {
    /// The delay for a uniform draw `u` in `[0, 1)`.
    pub(crate) fn sample(self, u: f64) -> Duration {
        match self {
            Self::Fixed(delay) => delay,
            Self::Uniform { min, max } => min + (max - min).mul_f64(u),
            Self::Exponential { mean, max } => {
                // Inverse transform: −mean·ln(1 − u), with 1 − u in (0, 1].
                mean.mul_f64(-(1.0 - u).ln()).min(max)
            }
        }
    }

    fn longest(self) -> Duration {
        match self {
            Self::Fixed(delay) => delay,
            Self::Uniform { max, .. } | Self::Exponential { max, .. } => max,
        }
    }
}

/// The cap on the calls an experiment affects, whatever its rates say.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct BlastRadius {
    /// The largest share of the calls seen since the experiment started that may be affected,
    /// from 0 to 1 (1 by default: the rates alone decide). A call is seen when its point's
    /// predicate picks it and the point can apply one of the experiment's strategies (a
    /// fault-only experiment does not see calls at a point with no fault to return); it is
    /// affected when any strategy injects into it.
    pub max_fraction: f64,
    /// The most calls affected in each second of the run, counted from its start on the
    /// experiment's clock (no cap by default). Two seconds' caps can fall within one second
    /// across a boundary: at most twice the cap in any sliding second.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub max_per_second: Option<u32>,
}

impl Default for BlastRadius {
    fn default() -> Self {
        Self {
            max_fraction: 1.0,
            max_per_second: None,
        }
    }
}

impl ExperimentConfig {
    /// The longest experiment accepted: a day. A longer one is almost certainly forgotten.
    pub const LONGEST: Duration = Duration::from_secs(24 * 60 * 60);

    /// An experiment of `duration` that injects nothing until strategies are added.
    pub fn new(duration: Duration) -> Self {
        Self {
            duration,
            blast_radius: BlastRadius::default(),
            latency: None,
            fault: None,
            outcome: None,
            behavior: None,
            abort: None,
            loss: None,
        }
    }

    /// Delays a `rate` of the calls by `delay`.
    #[must_use]
    pub fn latency(mut self, rate: f64, delay: Delay) -> Self {
        self.latency = Some(Latency { rate, delay });
        self
    }

    /// Fails a `rate` of the calls (backend wrappers: with a connection error).
    #[must_use]
    pub fn fault(self, rate: f64) -> Self {
        self.fault_of(rate, FaultKind::default())
    }

    /// Fails a `rate` of the calls; backend wrappers fail them with an error of `kind`.
    #[must_use]
    pub fn fault_of(mut self, rate: f64, kind: FaultKind) -> Self {
        self.fault = Some(Fault { rate, kind });
        self
    }

    /// Answers a `rate` of the calls with the injection point's substituted response.
    #[must_use]
    pub fn outcome(mut self, rate: f64) -> Self {
        self.outcome = Some(Rate { rate });
        self
    }

    /// Runs the injection point's hook before a `rate` of the calls.
    #[must_use]
    pub fn behavior(mut self, rate: f64) -> Self {
        self.behavior = Some(Rate { rate });
        self
    }

    /// Holds a `rate` of the calls until the experiment stops.
    #[must_use]
    pub fn abort(mut self, rate: f64) -> Self {
        self.abort = Some(Rate { rate });
        self
    }

    /// Drops a `rate` of the messages published on a wrapped bus.
    #[must_use]
    pub fn loss(mut self, rate: f64) -> Self {
        self.loss = Some(Rate { rate });
        self
    }

    /// Affects at most this share of the calls seen.
    #[must_use]
    pub fn max_fraction(mut self, fraction: f64) -> Self {
        self.blast_radius.max_fraction = fraction;
        self
    }

    /// Affects at most this many calls per second.
    #[must_use]
    pub fn max_per_second(mut self, calls: u32) -> Self {
        self.blast_radius.max_per_second = Some(calls);
        self
    }

    /// Checks every field, naming the first one at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.duration.is_zero() || self.duration > Self::LONGEST {
            return Err(ConfigError::new(
                "duration",
                "must be above zero and at most a day",
            ));
        }
        check_fraction("blast_radius.max_fraction", self.blast_radius.max_fraction)?;
        if self.blast_radius.max_per_second == Some(0) {
            return Err(ConfigError::new(
                "blast_radius.max_per_second",
                "must be at least 1 (switch the experiment off instead)",
            ));
        }
        if let Some(latency) = self.latency {
            check_fraction("latency.rate", latency.rate)?;
            let ordered = match latency.delay {
                Delay::Fixed(_) => true,
                Delay::Uniform { min, max } => min <= max,
                Delay::Exponential { mean, max } => !mean.is_zero() && mean <= max,
            };
            if !ordered {
                return Err(ConfigError::new(
                    "latency.delay",
                    "must have min ≤ max (uniform) or 0 < mean ≤ max (exponential)",
                ));
            }
            if latency.delay.longest() > self.duration {
                return Err(ConfigError::new(
                    "latency.delay",
                    "must not outlast the experiment",
                ));
            }
        }
        let rates = [
            ("fault.rate", self.fault.map(|fault| fault.rate)),
            ("outcome.rate", self.outcome.map(|rate| rate.rate)),
            ("behavior.rate", self.behavior.map(|rate| rate.rate)),
            ("abort.rate", self.abort.map(|rate| rate.rate)),
            ("loss.rate", self.loss.map(|rate| rate.rate)),
        ];
        for (field, rate) in rates {
            if let Some(rate) = rate {
                check_fraction(field, rate)?;
            }
        }
        Ok(())
    }
}

fn check_fraction(field: &'static str, value: f64) -> Result<(), ConfigError> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::new(field, "must be between 0 and 1"))
    }
}
