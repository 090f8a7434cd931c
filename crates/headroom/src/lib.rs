//! headroom helps async Rust services absorb 3×, 10×, 100× growth without falling over.
//!
//! It is a family of crates, each usable alone, wired together here:
//!
//! | crate | what it gives |
//! |---|---|
//! | `headroom-core` | clock, error classification, namespaced keys, backend traits and in-memory backends |
//! | `headroom-redis` | Redis backends, standalone and cluster (feature `redis`) |
//! | `headroom-cache` | two-level cache: moka L1 over a shared L2 |
//! | `headroom-idempotency` | idempotency keys with leases, fencing and replay |
//! | `headroom-limit` | bulkheads, backpressure queues, load shedding, rate limits |
//! | `headroom-breaker` | circuit breakers, retries with budgets, timeouts, hedging |
//! | `headroom-shard` | shard routing, replicas, resharding |
//!
//! Every shared-state feature talks to a backend trait from `headroom-core`: the in-memory
//! backends serve a single process, and the Redis backends share state across instances.
//!
//! # Minimum supported Rust version
//!
//! Rust 1.88.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[doc(inline)]
pub use headroom_core as core;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[doc(inline)]
pub use headroom_redis as redis;
