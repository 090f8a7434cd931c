//! Idempotency keys: a retried request runs at most once per (scope, key), and every retry gets
//! the first outcome back.
//!
//! Clients retry: timeouts, dropped connections and impatient users all send the same request
//! twice. [`Idempotency`] makes the second (and the hundredth) a replay instead of a second
//! charge:
//!
//! - the first request takes a **lease** on its key and runs; concurrent duplicates wait for its
//!   outcome or are told it is in progress;
//! - its outcome is **stored** for a retention period (24 h by default) and **replayed** to later
//!   requests with the same key and request fingerprint; the same key with another request is
//!   refused ([`IdempotencyError::KeyReused`]);
//! - a holder that dies loses its lease, and its successor runs with a greater **fencing token**,
//!   so a late completion by the first holder is rejected instead of overwriting the outcome;
//! - records are kept per [`Scope`] (tenant or principal, and operation), so one caller can
//!   never replay another's response;
//! - when the store is down, requests **fail closed** by default ([`StoreFailure`]).
//!
//! Records live in any [`LeaseStore`](headroom_core::lease::LeaseStore): the in-memory
//! `MemoryLeaseStore` of `headroom-core` for one process, or `RedisLeaseStore` of
//! `headroom-redis` for many instances (one Lua script, one round trip, per step).
//!
//! With the `tower` feature, `http::IdempotencyLayer` applies all of this to HTTP services
//! through the `Idempotency-Key` header.
//!
//! See `docs/idempotency.md` in the repository for the failure modes and what each asks of you.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
mod error;
mod executor;
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub mod http;
mod key;

pub use config::{IdempotencyConfig, InProgressPolicy, StoreFailure};
pub use error::IdempotencyError;
pub use executor::{Executed, Idempotency, IdempotencyBuilder, InvalidConfig, Lease};
pub use headroom_core::lease::FencingToken;
pub use key::{IdempotencyKey, InvalidKey, Scope};
