//! Idempotency keys: a retried request runs at most once per (scope, key).
//!
//! This crate will hold the executor that takes a lease on first arrival, stores the outcome
//! for a retention period and replays it to later duplicates; fencing tokens that stop a holder
//! whose lease expired from overwriting its successor's outcome; per-tenant scoping; and a
//! tower layer that speaks the `Idempotency-Key` HTTP header. State lives in a
//! [`LeaseStore`](headroom_core::lease::LeaseStore) (memory or Redis).
#![forbid(unsafe_code)]
#![warn(missing_docs)]
