//! headroom helps async Rust services absorb 3×, 10×, 100× growth without falling over.
//!
//! It is a family of crates, each usable alone, wired together here:
//!
//! | crate | what it gives | feature |
//! |---|---|---|
//! | `headroom-core` | clock, error classification, namespaced keys, backend traits and in-memory backends | always |
//! | `headroom-cache` | two-level cache: moka L1 over a shared L2, stampede protection, fail-safe | `cache` |
//! | `headroom-idempotency` | idempotency keys with leases, fencing and replay | `idempotency` |
//! | `headroom-limit` | bulkheads, backpressure queues, load shedding, adaptive limits, rate-limit tiers | `limit` |
//! | `headroom-breaker` | circuit breakers, retries with budgets, timeouts, hedging | `breaker` |
//! | `headroom-shard` | shard routing, replicas, resharding | `shard` |
//! | `headroom-slo` | service level objectives, burn-rate alerts, generated Prometheus rules | `slo` |
//! | `headroom-chaos` | fault injection in a service's own stack, switched at run time | `chaos` |
//! | `headroom-jobs` | durable job queues with backpressure, write-behind for the cache | `jobs` |
//! | `headroom-redis` | Redis backends, standalone and cluster | `redis` |
//!
//! The crates are split so that each service pulls only what it uses, and so that only
//! `headroom-redis` depends on the `redis` client. Two more features reach into every enabled
//! crate: `tower` (the tower layers of idempotency, limits, breakers, shard routing, SLOs and chaos) and
//! `serde` (configuration types that load from files, with human-readable durations). `json`
//! adds the cache's JSON codec, and `full` enables everything. No feature is on by default.
//! `test-util`, for `[dev-dependencies]` only, makes the components' default clock follow
//! tokio's clock, so tests under `#[tokio::test(start_paused = true)]` drive it.
//!
//! ```toml
//! [dependencies]
//! headroom = { version = "0.1", features = ["cache", "idempotency", "limit", "breaker", "redis", "tower"] }
//! ```
//!
//! # One shared backend
//!
//! Every shared-state part talks to a backend trait of `headroom-core`: the in-memory
//! backends serve one process, and the Redis backends share state across instances. A
//! [`Headroom`] picks the backend once, at run time, and hands the same stores to every part
//! it builds, under one namespace:
//!
//! ```
//! # #[cfg(all(feature = "cache", feature = "idempotency", feature = "limit", feature = "breaker"))]
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use std::time::Duration;
//! use headroom::prelude::*;
//!
//! // Memory by default; `.redis(url).await?` or `.redis_cluster(seeds).await?` to share state.
//! let headroom = Headroom::builder().namespace("shop").memory()?;
//!
//! // A cache whose L2 is the shared KV store.
//! let products: Cache<u64, String> = headroom
//!     .cache("products")?
//!     .ttl(Duration::from_secs(60))
//!     .build()?;
//! let name = products
//!     .get_or_load(&7, |_| async { Ok::<_, std::io::Error>(Some("teapot".to_owned())) })
//!     .await?;
//! assert_eq!(name.as_deref(), Some("teapot"));
//!
//! // Idempotency records in the shared lease store.
//! let idempotency = headroom.idempotency().build()?;
//! let scope = Scope::new("customer-1", "checkout")?;
//! let key = IdempotencyKey::new("4c1e0d7a")?;
//! let order = idempotency
//!     .execute(&scope, &key, b"sku=7", || async { Ok::<_, std::io::Error>(1001_u64) })
//!     .await?;
//! let retry = idempotency
//!     .execute(&scope, &key, b"sku=7", || async { Ok::<_, std::io::Error>(1002_u64) })
//!     .await?;
//! assert_eq!((retry.value, retry.replayed), (order.value, true));
//!
//! // Rate limits per customer tier, shared through the backend.
//! use headroom::limit::rate::{Quota, RateLimit, TierConfig};
//! let tiers = TierConfig::new()
//!     .tier("free", Quota::per_second(5)?)
//!     .tier("premium", Quota::per_second(100)?);
//! let limiter = headroom.rate_limiter("checkout", tiers)?.build()?;
//! limiter.check("premium", "customer-1", 1).await?;
//!
//! // Admission control and a breaker around the database.
//! let checkout = headroom.bulkhead("checkout").max_concurrent(32).build()?;
//! let shedder = LoadShedder::builder(checkout).build()?;
//! let database = headroom.circuit_breaker::<std::io::Error>("database").build()?;
//! let _permit = shedder.acquire(Priority::Critical).await?;
//! let rows = database.call(async { Ok::<_, std::io::Error>(3) }).await?;
//! assert_eq!(rows, 3);
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! The guides live in the repository's `docs/` folder: `getting-started.md` first, then one per
//! crate and `architecture.md`.
//!
//! # Minimum supported Rust version
//!
//! Rust 1.88.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod headroom;

pub use crate::headroom::{Backend, BuildError, Headroom, HeadroomBuilder};

#[doc(inline)]
pub use headroom_core as core;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[doc(inline)]
pub use headroom_redis as redis;

#[cfg(feature = "cache")]
#[cfg_attr(docsrs, doc(cfg(feature = "cache")))]
#[doc(inline)]
pub use headroom_cache as cache;

#[cfg(feature = "idempotency")]
#[cfg_attr(docsrs, doc(cfg(feature = "idempotency")))]
#[doc(inline)]
pub use headroom_idempotency as idempotency;

#[cfg(feature = "limit")]
#[cfg_attr(docsrs, doc(cfg(feature = "limit")))]
#[doc(inline)]
pub use headroom_limit as limit;

#[cfg(feature = "breaker")]
#[cfg_attr(docsrs, doc(cfg(feature = "breaker")))]
#[doc(inline)]
pub use headroom_breaker as breaker;

#[cfg(feature = "shard")]
#[cfg_attr(docsrs, doc(cfg(feature = "shard")))]
#[doc(inline)]
pub use headroom_shard as shard;

#[cfg(feature = "slo")]
#[cfg_attr(docsrs, doc(cfg(feature = "slo")))]
#[doc(inline)]
pub use headroom_slo as slo;

#[cfg(feature = "chaos")]
#[cfg_attr(docsrs, doc(cfg(feature = "chaos")))]
#[doc(inline)]
pub use headroom_chaos as chaos;

#[cfg(feature = "jobs")]
#[cfg_attr(docsrs, doc(cfg(feature = "jobs")))]
#[doc(inline)]
pub use headroom_jobs as jobs;

pub mod reload;

/// The names most services use, in one import: `use headroom::prelude::*;`.
pub mod prelude {
    #[doc(inline)]
    pub use crate::{Backend, Headroom};
    #[doc(inline)]
    pub use headroom_core::{Classify, Clock, Namespace};

    #[cfg(feature = "cache")]
    #[cfg_attr(docsrs, doc(cfg(feature = "cache")))]
    #[doc(inline)]
    pub use headroom_cache::{Cache, CacheError};

    #[cfg(feature = "idempotency")]
    #[cfg_attr(docsrs, doc(cfg(feature = "idempotency")))]
    #[doc(inline)]
    pub use headroom_idempotency::{Idempotency, IdempotencyError, IdempotencyKey, Scope};

    #[cfg(feature = "limit")]
    #[cfg_attr(docsrs, doc(cfg(feature = "limit")))]
    #[doc(inline)]
    pub use headroom_limit::rate::{Quota, RateLimit, RateLimited, TierConfig};
    #[cfg(feature = "limit")]
    #[cfg_attr(docsrs, doc(cfg(feature = "limit")))]
    #[doc(inline)]
    pub use headroom_limit::{Bulkhead, LoadShedder, Overloaded, Priority};

    #[cfg(feature = "breaker")]
    #[cfg_attr(docsrs, doc(cfg(feature = "breaker")))]
    #[doc(inline)]
    pub use headroom_breaker::{
        CircuitBreaker, CircuitOpen, Elapsed, Fallback, Hedge, Pipeline, Retry, RetryBudget,
        Timeout,
    };

    #[cfg(feature = "shard")]
    #[cfg_attr(docsrs, doc(cfg(feature = "shard")))]
    #[doc(inline)]
    pub use headroom_shard::{
        JumpRouter, Node, ReadPolicy, Role, ShardId, Topology, TopologyHandle,
    };

    #[cfg(feature = "slo")]
    #[cfg_attr(docsrs, doc(cfg(feature = "slo")))]
    #[doc(inline)]
    pub use headroom_slo::{Objective, ObjectiveConfig, Severity, Slos};
}
