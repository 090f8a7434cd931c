//! A two-level cache: an in-process L1 on `moka` over a shared L2 on any
//! [`KvStore`](headroom_core::kv::KvStore) (memory or Redis), with a loader behind both.
//!
//! - **Reads**: [`Cache::get`], [`Cache::get_or_load`] and [`Cache::get_many_or_load`] look in
//!   L1, then L2, then call the loader; L2 hits fill L1, loaded values fill both. A batch reads
//!   L2 in one round trip and calls its loader once for every key still missing.
//! - **Writes**: [`Cache::insert`], [`Cache::remove`] and [`Cache::remove_many`] write
//!   through to L2.
//! - **Stampede protection**: one load per key per instance, whatever the number of callers;
//!   loads run in spawned tasks, so a caller that gives up does not cancel them for the others.
//! - **TTL**: a default TTL or one chosen per value ([`CacheBuilder::ttl_by`]), random jitter,
//!   negative caching of "not found", and L1 never serving an entry past its L2 expiry.
//! - **Freshness**: past the soft TTL a hit is served and refreshed in the background; past the
//!   (hard) TTL it is not served.
//! - **Fail-safe**: when the loader fails or times out, a value up to `fail_safe_max_stale`
//!   past its TTL is served instead of the error; a loader past its soft timeout keeps running
//!   and updates the cache when it finishes.
//! - **L2 isolation**: every L2 call has a timeout and L2 errors never fail a cache call; after
//!   repeated failures a breaker stops calling L2 for a cool-down, then probes it.
//! - **Invalidation across instances** ([`CacheBuilder::invalidation`]): writes publish the
//!   keys they change on an [`InvalidationBus`](headroom_core::bus::InvalidationBus) and
//!   other instances drop them from L1; lost messages (bus losses, sequence gaps, silence)
//!   flush or bypass L1, so staleness stays under [`InvalidationConfig::max_silence`].
//!   [`Cache::invalidate_tag`] (for entries written with [`Cache::insert_tagged`]) and
//!   [`Cache::clear`] reach every instance.
//! - **Envelope**: every L2 value is wrapped in a versioned [`envelope`] (format version,
//!   timestamps, schema version, tags) and encoded by a pluggable [`codec`]; undecodable
//!   bytes are a miss, a metric and a delete (of those bytes only); another schema version's
//!   value is a miss left in place (its removals count). Loads write back only over older entries, so a value
//!   loaded before a write or removal elsewhere never replaces it.
//!
//! The guides (`docs/cache.md`, `docs/invalidation.md`) cover the concepts, sizing L1,
//! invalidation across instances, and Redis settings.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::time::Duration;
//! use headroom_cache::Cache;
//! use headroom_core::{memory::MemoryKvStore, Namespace};
//!
//! #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
//! struct User {
//!     name: String,
//! }
//!
//! let users: Cache<u64, User> = Cache::builder()
//!     .name("users")
//!     .ttl(Duration::from_secs(300))
//!     .soft_ttl(Duration::from_secs(240))
//!     .ttl_jitter(Duration::from_secs(10))
//!     .negative_ttl(Duration::from_secs(30))
//!     .fail_safe_max_stale(Duration::from_secs(3_600))
//!     .loader_soft_timeout(Duration::from_millis(100))
//!     .l2(MemoryKvStore::new(), Namespace::new("app:users")?)
//!     .build()?;
//!
//! let user = users
//!     .get_or_load(&1, |id| async move {
//!         // A database query in a real service.
//!         Ok::<_, std::io::Error>((id == 1).then(|| User { name: "Ada".into() }))
//!     })
//!     .await?;
//! assert_eq!(user, Some(User { name: "Ada".into() }));
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! # Metrics
//!
//! Through the `metrics` facade, labelled `cache` with the cache's name:
//! `headroom_cache_hits_total` and `headroom_cache_misses_total` (label `level`: `l1`, `l2`),
//! `headroom_cache_loads_total` (label `outcome`: `ok`, `error`, `timeout`),
//! `headroom_cache_load_duration_seconds`, `headroom_cache_refreshes_total`,
//! `headroom_cache_stale_served_total`, `headroom_cache_l2_errors_total` (label `kind`:
//! `error`, `timeout`), `headroom_cache_l2_skipped_total`, `headroom_cache_l2_corrupt_total`,
//! `headroom_cache_l2_pending_deletes`, `headroom_cache_l2_outdated_untracked_total`,
//! `headroom_cache_l2_breaker_open`,
//! `headroom_cache_evictions_total` and `headroom_cache_oversized_total`; with invalidation,
//! `headroom_cache_invalidation_sent_total`, `_publish_errors_total`, `_received_total`,
//! `_invalid_total`, `_gaps_total`, `_flushes_total` (label `reason`), the
//! `headroom_cache_invalidation_healthy` gauge and `headroom_cache_invalidation_lag_seconds`
//! (all prefixed `headroom_cache_invalidation`). Handles are
//! registered when the cache is built; a recorder installed later still gets them (see
//! [`headroom_core::metrics`]).
//!
//! # Minimum supported Rust version
//!
//! Rust 1.88.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod builder;
mod cache;
pub mod codec;
mod config;
pub mod envelope;
mod error;
mod hides;
mod invalidation;
mod key;
mod l2;
mod lock;
mod metrics;

pub use builder::CacheBuilder;
pub(crate) use builder::TtlFn;
pub use cache::Cache;
pub use config::{CacheConfig, TtlConfig};
pub use error::{CacheError, CacheErrorKind, ConfigError};
pub use invalidation::{InvalidationConfig, ShutdownGroup};
pub use key::CacheKey;
