//! Failure handling: stop calling what is failing, retry what may succeed, bound every wait.
//!
//! - [`CircuitBreaker`]: closed / open / half-open, tripped by a failure ratio or a slow-call
//!   ratio over a count- or time-based sliding window once it holds a minimum of calls; open
//!   for a duration that backs off on repeated failure; a bounded number of half-open probes
//!   with a maximum wait; a classifier for which errors count; manual isolate and reset;
//!   state-change events. A closed call costs a few atomic operations and takes no lock. Use it
//!   around a future ([`CircuitBreaker::call`]) or with a [`Permit`].
//! - [`Retry`]: exponential backoff with full jitter, server retry-after, a classifier for
//!   retryable errors, and a [`RetryBudget`] so that retries cannot multiply load in an outage.
//! - [`Timeout`]: a time limit that drops, and so cancels, the work it gives up on.
//! - [`Hedge`]: a second attempt after a fixed or percentile delay; the first success wins and
//!   the others are cancelled; bounded by the budget.
//! - [`Fallback`]: the answer when everything else failed.
//! - [`Pipeline`]: all of them in one documented order, on async closures.
//!
//! With the `tower` feature, the `tower` module has a layer for the breaker, for the pipeline
//! and for each strategy alone.
//!
//! Errors are typed: [`Error`] wraps the operation's own error or one of the cheap rejections
//! [`CircuitOpen`] and [`Elapsed`], or reports a spent budget, and implements
//! [`headroom_core::Classify`]. Configuration types in [`config`] load with serde (feature
//! `serde`). Time comes from [`headroom_core::Clock`], so every behaviour is testable on a
//! manual clock or tokio's paused time.
//!
//! # Metrics
//!
//! Through the `metrics` facade, registered when a strategy is built (a recorder installed
//! later still gets them, see [`headroom_core::metrics`]):
//! `headroom_breaker_calls_total{breaker, outcome}` (success, failure, ignored, cancelled,
//! rejected), `headroom_breaker_slow_calls_total{breaker}`,
//! `headroom_breaker_state{breaker}` (0 closed, 1 open, 2 half-open, 3 isolated),
//! `headroom_breaker_transitions_total{breaker, from, to}`,
//! `headroom_breaker_retries_total{pipeline}`, `headroom_breaker_hedges_total{pipeline}`,
//! `headroom_breaker_budget_exhausted_total{pipeline, strategy}`,
//! `headroom_breaker_timeouts_total{pipeline}` and `headroom_breaker_fallbacks_total`.
//! Transitions are also `tracing` events (a warning when a circuit opens).
//!
//! # Usage
//!
//! ```toml
//! [dependencies]
//! headroom-breaker = { version = "0.1", features = ["serde", "tower"] }
//! ```
//!
//! The guide is `docs/breaker.md` in the repository.
//!
//! # Minimum supported Rust version
//!
//! Rust 1.88.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod breaker;
mod budget;
pub mod config;
mod error;
mod fallback;
mod hedge;
mod pipeline;
mod retry;
mod timeout;
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub mod tower;
mod window;

/// The guide, `docs/breaker.md`, whose examples are compiled as doc tests.
#[cfg(all(doctest, feature = "serde"))]
#[doc = include_str!("../../../docs/breaker.md")]
mod guide {}

pub use breaker::{CircuitBreaker, CircuitBreakerBuilder, Permit, Reason, State, Transition};
pub use budget::{RetryBudget, RetryBudgetBuilder};
pub use config::{
    BreakerConfig, BudgetConfig, HedgeConfig, PipelineConfig, RetryConfig, WindowConfig,
};
pub use error::{CircuitOpen, ConfigError, Elapsed, Error, ErrorKind};
pub use fallback::Fallback;
pub use hedge::{Hedge, HedgeBuilder};
pub use pipeline::{Pipeline, PipelineBuilder};
pub use retry::{Retry, RetryBuilder};
pub use timeout::Timeout;
