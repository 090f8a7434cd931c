//! Service level objectives: how many requests an operation promises to serve well, how fast
//! it is spending the rest, and the alerts that say so.
//!
//! - [`ObjectiveConfig`]: availability (good: succeeded) or latency (good: succeeded within a
//!   threshold), a target such as 99.9 %, a period (30 days by default) and the burn-rate
//!   alerts (the Google SRE workbook's multi-window, multi-burn-rate alerts by default), in code
//!   or loaded with serde (feature `serde`) as an [`SloConfig`].
//! - [`Objective`]: records each request into fixed time buckets (no per-request storage,
//!   about 25 KB per objective with the default alerts), evaluates every window, publishes burn rates and the
//!   remaining error budget as metrics, and raises a [`Signal`](headroom_core::Signal) per
//!   severity for other parts to act on.
//! - [`prometheus_rules`]: the recording and alerting rules that compute the same numbers in
//!   Prometheus from the same declarations.
//! - With the `tower` feature, [`SloLayer`] records the SLI of every call of a service.
//!
//! # Metrics
//!
//! Per objective, labelled `slo`: `headroom_slo_events_total` and
//! `headroom_slo_bad_events_total` (counters), `headroom_slo_burn_rate{window}`,
//! `headroom_slo_error_budget_remaining` and `headroom_slo_burning{severity}` (gauges). They
//! are updated at each evaluation: every tenth of the shortest window while requests arrive,
//! on [`Objective::evaluate`] (call it before a scrape to have them current) and on a timer
//! with [`Objective::evaluate_every`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
mod events;
#[cfg(feature = "tower")]
mod layer;
mod objective;
mod rules;

pub use config::{BurnAlert, ObjectiveConfig, Severity, Sli, SloConfig};
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub use layer::{ClassifyOutcome, SloFuture, SloLayer, SloService, SucceedsWhenOk};
pub use objective::{AlertStatus, Objective, SloStatus, Started, WindowStatus};
pub use rules::{RuleOptions, prometheus_rules, prometheus_rules_with};

use headroom_core::Clock;

/// A configuration refused, naming the objective and the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("objective `{objective}`: {field} {reason}")]
pub struct ConfigError {
    objective: String,
    field: String,
    reason: &'static str,
}

impl ConfigError {
    pub(crate) fn new(objective: &str, field: impl Into<String>, reason: &'static str) -> Self {
        Self {
            objective: objective.to_owned(),
            field: field.into(),
            reason,
        }
    }

    /// The objective refused.
    pub fn objective(&self) -> &str {
        &self.objective
    }

    /// The field at fault, e.g. `target` or `alerts[1].short_window`.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// What the field must be.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

/// Every objective of a service, built from one [`SloConfig`].
///
/// ```
/// use headroom_slo::{ObjectiveConfig, SloConfig, Slos};
///
/// let slos = Slos::new(SloConfig {
///     objectives: vec![ObjectiveConfig::availability("checkout", 0.999)],
/// })?;
/// slos.get("checkout").unwrap().record(true);
/// let rules = slos.prometheus_rules(); // for Prometheus's rule_files
/// # assert!(rules.starts_with("groups:"));
/// # Ok::<(), headroom_slo::ConfigError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Slos {
    config: SloConfig,
    objectives: Vec<Objective>,
}

impl Slos {
    /// Builds every objective of `config` on the system clock; refuses the whole set if one is
    /// invalid or two share a name.
    pub fn new(config: SloConfig) -> Result<Self, ConfigError> {
        Self::with_clock(config, Clock::system())
    }

    /// Builds every objective of `config` on `clock`.
    pub fn with_clock(config: SloConfig, clock: Clock) -> Result<Self, ConfigError> {
        config.validate()?;
        let objectives = config
            .objectives
            .iter()
            .map(|objective| Objective::with_clock(objective.clone(), clock.clone()))
            .collect::<Result<_, _>>()?;
        Ok(Self { config, objectives })
    }

    /// The objective named `name`.
    pub fn get(&self, name: &str) -> Option<&Objective> {
        self.objectives
            .iter()
            .find(|objective| objective.name() == name)
    }

    /// Every objective, in the configured order.
    pub fn iter(&self) -> impl Iterator<Item = &Objective> {
        self.objectives.iter()
    }

    /// Evaluates every objective now (see [`Objective::evaluate`]).
    pub fn evaluate(&self) -> Vec<SloStatus> {
        self.objectives.iter().map(Objective::evaluate).collect()
    }

    /// The Prometheus rules of every objective (see [`prometheus_rules`]).
    pub fn prometheus_rules(&self) -> String {
        rules::write(&self.config.objectives, &RuleOptions::default())
    }

    /// The Prometheus rules of every objective, with `options` (see
    /// [`prometheus_rules_with`], which refuses the same options).
    pub fn prometheus_rules_with(&self, options: &RuleOptions) -> Result<String, ConfigError> {
        rules::prometheus_rules_with(&self.config.objectives, options)
    }
}
