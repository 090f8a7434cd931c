//! Fault injection that a service puts in its own stack, for chaos experiments in staging and
//! production: does the circuit breaker open, does the cache serve stale, does the shedder
//! hold the SLO, when a dependency or Redis misbehaves?
//!
//! - [`Experiment`]: the switch. Off by default, costing one relaxed atomic load per call;
//!   started with an [`ExperimentConfig`] (in code, or loaded with serde), changed by starting
//!   it again, and stopped by hand, by its hard end time, or by a [`Signal`](headroom_core::Signal)
//!   such as an SLO's fast burn. A [blast radius](BlastRadius) caps the calls it affects.
//! - Strategies: **latency** (fixed, uniform or exponential delays), **fault** (an error),
//!   **outcome** (a substituted response), **behavior** (a hook), **abort** (the call is held
//!   until the caller's timeout), and **loss** (bus messages dropped), each with its own rate.
//! - Injection points: [`Chaos`] for any future and a pipeline's operation, `ChaosLayer` for
//!   tower services (feature `tower`), and [backend wrappers](ChaosKvStore) for the KV store,
//!   invalidation bus, lease store, rate store and migration store.
//! - With the `fleet` feature, one switch starts and stops the experiment on every instance
//!   through the shared backend.
//!
//! # Metrics
//!
//! Per experiment, labelled `experiment`: `headroom_chaos_injected_total{strategy}` (each
//! injected strategy), `headroom_chaos_spared_total` (calls a strategy drew that the blast
//! radius spared), `headroom_chaos_stops_total{reason}` (`manual`, `ended`, `signal`,
//! `fleet`), the gauge `headroom_chaos_running`, and with the `fleet` feature
//! `headroom_chaos_fleet_errors_total` (switch reads that failed or were not understood, and
//! failed clears after a stop signal).
//! A fault or substitute is counted when it answers the call, not when it is drawn: a call the
//! run's end releases first runs as without the experiment. Each injection is also a `tracing`
//! event (target `headroom_chaos`, in the span of the call it affects), and each start and stop
//! a warning.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backend;
mod config;
mod experiment;
#[cfg(feature = "fleet")]
mod fleet;
mod inject;
#[cfg(feature = "tower")]
mod layer;

pub use backend::{
    ChaosBus, ChaosJobStore, ChaosKvStore, ChaosLeaseStore, ChaosMigrationStore, ChaosRateStore,
};
pub use config::{BlastRadius, Delay, ExperimentConfig, Fault, FaultKind, Latency, Rate};
pub use experiment::{
    Experiment, ExperimentBuilder, Injection, RunStatus, Status, StopReason, Strategies,
};
#[cfg(feature = "fleet")]
#[cfg_attr(docsrs, doc(cfg(feature = "fleet")))]
pub use fleet::{FleetError, FleetSwitch};
pub use inject::{Built, Chaos, ChaosFuture, Deferred, Later};
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub use layer::{ChaosLayer, ChaosService, Everything, Pick, ServiceCall};

/// The guide, `docs/chaos.md`, whose examples are compiled as doc tests.
#[cfg(all(doctest, feature = "fleet", feature = "tower"))]
#[doc = include_str!("../../../docs/chaos.md")]
mod guide {}

/// Why [`Experiment::start`] refused to start a run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A stop signal of the experiment, named here, is raised: the run would stop at once.
    #[error("chaos experiment: not started while its stop signal `{0}` is raised")]
    Halted(String),
}

/// A configuration refused, naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("chaos experiment: {field} {reason}")]
pub struct ConfigError {
    field: &'static str,
    reason: &'static str,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, reason: &'static str) -> Self {
        Self { field, reason }
    }

    /// The field at fault, e.g. `latency.rate`.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// What the field must be.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}
