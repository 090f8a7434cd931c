//! The stable vocabulary of the headroom crate family.
//!
//! Every other headroom crate builds on the pieces defined here, and this crate changes rarely:
//!
//! - [`Clock`]: the one source of time. [`Clock::system`] reads the calibrated CPU counter, or
//!   tokio's clock with the `test-util` feature (so tests under paused time drive it);
//!   [`ManualClock`] is driven by hand in tests; [`Stopwatch`] counts elapsed nanoseconds on
//!   hot paths.
//! - [`error`]: the classification convention ([`Classify`]) every headroom error follows, and
//!   [`BackendError`], the error of every backend call.
//! - [`Namespace`] and [`Key`]: validated, namespaced keys for every shared store.
//! - Backend traits, byte-oriented, with their contracts in their docs:
//!   [`KvStore`](kv::KvStore) (cache L2), [`InvalidationBus`](bus::InvalidationBus) (cache
//!   invalidation), [`LeaseStore`](lease::LeaseStore) (idempotency),
//!   [`RateStore`](rate::RateStore) (distributed rate limits) and
//!   [`JobStore`](jobs::JobStore) (durable job queues).
//! - [`MigrationStore`](migration::MigrationStore): the shared phase of a resharding that
//!   several processes run together.
//! - [`metrics`]: metric handles that reach the process's recorder even when it is installed
//!   after the parts are built.
//! - [`memory`]: real in-memory implementations of those traits, the default for a single
//!   process. They are embedded backends, not test doubles.
//!
//! Redis implementations live in `headroom-redis`, the only crate of the family that depends on
//! the `redis` client.
//!
//! # Minimum supported Rust version
//!
//! Rust 1.88.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod bus;
mod clock;
pub mod error;
pub mod jobs;
mod key;
pub mod kv;
pub mod lease;
pub mod memory;
pub mod metrics;
pub mod migration;
pub mod rate;
mod signal;
pub mod slot;

pub use clock::{Clock, ManualClock, Stopwatch};
pub use error::{BackendError, BackendErrorKind, Classify};
pub use key::{Key, KeyBatch, KeyError, Namespace};
pub use signal::Signal;

/// The longest lease, retention or lifetime a store keeps: ten years. Longer ones are refused
/// as configuration errors; no record needs them, and Redis scripts cannot count some of them
/// (Lua prints numbers past 10^14 in exponent form, which Redis refuses as an expiry).
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(10 * 365 * 24 * 3600);

/// A lease or retention in whole milliseconds (rounded down), or a configuration error when it
/// is under a millisecond or over [`MAX_DURATION`]: what every store keeps.
pub fn lasting_millis(duration: std::time::Duration) -> Result<u64, BackendError> {
    Ok(u64::try_from(lasting(duration)?.as_millis()).expect("at most MAX_DURATION"))
}

/// `duration`, or the configuration error of [`lasting_millis`] (the memory stores keep
/// durations as they are).
pub(crate) fn lasting(duration: std::time::Duration) -> Result<std::time::Duration, BackendError> {
    if duration < std::time::Duration::from_millis(1) || duration > MAX_DURATION {
        return Err(BackendError::with_detail(
            BackendErrorKind::Config,
            format!("duration {duration:?} must be between 1 ms and {MAX_DURATION:?}"),
        ));
    }
    Ok(duration)
}
