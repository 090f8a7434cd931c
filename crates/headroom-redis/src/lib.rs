//! Redis backends for headroom: the one crate of the family that depends on `redis`.
//!
//! - [`RedisConfig`] and [`Redis`]: one shared, cheap-to-clone connection handle for a
//!   standalone server or a Redis Cluster, with automatic reconnect and a timeout on every
//!   command.
//! - [`RedisKvStore`]: the [`KvStore`](headroom_core::kv::KvStore) behind the cache's L2
//!   (`GET`, `MGET`, pipelined `SET PX`, `DEL`).
//! - [`RedisBus`]: the [`InvalidationBus`](headroom_core::bus::InvalidationBus) on pub/sub
//!   (sharded pub/sub on a cluster), reporting lost messages on disconnect.
//! - [`tracked_writes`]: keys under a prefix changed by anyone (`CLIENT TRACKING BCAST`), so
//!   a cache's L1 also learns of writes made outside headroom.
//! - [`RedisLeaseStore`]: the [`LeaseStore`](headroom_core::lease::LeaseStore) behind
//!   idempotency keys (one Lua script per step, one key per record, server time).
//! - [`RedisRateStore`]: the [`RateStore`](headroom_core::rate::RateStore) behind distributed
//!   rate limits (GCRA in one Lua script over the cells of one limit key, one slot, server time).
//! - [`RedisMigrationStore`]: the [`MigrationStore`](headroom_core::migration::MigrationStore)
//!   behind resharding shared by several processes (one hash per migration, server time).
//! - [`RedisJobStore`]: the [`JobStore`](headroom_core::jobs::JobStore) behind durable job
//!   queues (a Redis Stream per priority lane with a consumer group, one Lua script per step).
//!
//! ```no_run
//! # async fn demo() -> Result<(), headroom_core::BackendError> {
//! use std::time::Duration;
//! use headroom_core::{kv::KvStore, Namespace};
//! use headroom_redis::{Redis, RedisConfig, RedisKvStore};
//!
//! let redis = Redis::connect(RedisConfig::standalone("redis://127.0.0.1:6379")).await?;
//! let store = RedisKvStore::new(redis);
//! let key = Namespace::new("shop").unwrap().key("user:1").unwrap();
//! store.set(&key, "Ada".into(), Duration::from_secs(60)).await?;
//! # Ok(()) }
//! ```
//!
//! # Redis Cluster
//!
//! Every multi-key call is split by slot: `MGET` and `DEL` are routed per node by the client,
//! and pipelined writes are grouped per slot and sent concurrently. Keys that must live together
//! (the records of one idempotency key, for example) use `{hash tags}`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod address_map;
mod bus;
mod config;
mod connection;
mod error;
mod jobs;
mod kv;
mod lease;
mod migration;
mod rate;
mod tracking;

pub use bus::RedisBus;
pub use config::{RedisConfig, RedisMode};
pub use connection::Redis;
pub use jobs::RedisJobStore;
pub use kv::RedisKvStore;
pub use lease::RedisLeaseStore;
pub use migration::RedisMigrationStore;
pub use rate::RedisRateStore;
pub use tracking::{TRACKING_PING_INTERVAL, tracked_writes};
