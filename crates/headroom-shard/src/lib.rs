//! Shard routing: map keys to shards the same way in every process, machine and Rust version.
//!
//! Three layers, each usable alone:
//!
//! - **Routers** map a key to a logical [`ShardId`]: [`JumpRouter`], [`RendezvousRouter`]
//!   (weighted, with top-k for replica placement), [`RingRouter`] (weighted virtual nodes),
//!   [`MaglevRouter`], [`RangeRouter`], [`SlotRouter`] (Redis Cluster slots, `{hash tags}`
//!   included), and [`Directory`] (explicit overrides for hot tenants on top of any router).
//!   [`BoundedLoadRouter`] assigns live load with a cap per shard. Keys hash through the stable
//!   functions of [`hash`], never `RandomState`; golden vectors pin them. Lookups take no lock
//!   and do not allocate.
//! - **Topologies** place logical shards on physical nodes (many shards per node is the normal
//!   setup) with a primary and replicas, each node holding your handle (a pool, a client).
//!   A [`TopologyHandle`] swaps versions atomically with epoch checks; readers never block.
//!   Writes go to the primary; reads follow a [`ReadPolicy`] (primary, round robin, least in
//!   flight, lag-aware) and a [`Session`] gives read-your-writes.
//! - **Resharding**: a [`ReshardPlan`] says what moves between two topologies, and a
//!   [`Migration`] routes traffic through copy, dual-write, shadow-read, cut-over and cleanup
//!   (or a rollback before the cut-over); once the cut-over returns, no write of its process
//!   is in flight to, or can be routed to, a retired owner. Several processes migrate together
//!   through a [`SharedMigration`] each: the phase lives in a shared
//!   [`MigrationStore`](headroom_core::migration::MigrationStore) (memory or Redis), every
//!   process follows it, and the cut-over returns once every live process has left the old
//!   owners. Writes carry their route's epoch for a fence where the data lives, which stops a
//!   process that stopped following (its acknowledgement lease expired).
//!
//! The guide in `docs/sharding.md` compares the routers (balance, disruption, lookup cost,
//! memory). Metric names are in [`metrics`].
//!
//! ```
//! use headroom_shard::{JumpRouter, ReadPolicy, ReplicaStatus, Session, Topology};
//!
//! let topology = Topology::builder(JumpRouter::new(64)?)
//!     .node("a", "db-a:5432")
//!     .node("a-replica", "db-a-replica:5432")
//!     .shards(0..64, "a", &["a-replica"])
//!     .build()?;
//!
//! let mut session = Session::new();
//! let write = topology.write("cart:7")?;
//! // ... perform the write on `write.handle()`, learn its commit position ...
//! session.record_write(&write, 1_000);
//! drop(write);
//!
//! // The replica has not replayed position 1000 yet: the session reads from the primary.
//! topology.report("a-replica", ReplicaStatus { lag: None, position: Some(990) });
//! let read = topology.read_session("cart:7", &ReadPolicy::RoundRobin, &session)?;
//! assert_eq!(read.node_id(), "a");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Features
//!
//! - `serde`: `TopologyConfig` and friends, to load topologies from configuration files.
//! - `tower`: the `tower` module, a service that routes requests by shard key.
//!
//! # Minimum supported Rust version
//!
//! Rust 1.88.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "serde")]
mod config;
mod error;
pub mod hash;
pub mod metrics;
mod read;
mod reshard;
mod router;
mod shared;
mod topology;
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub mod tower;

#[cfg(feature = "serde")]
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
pub use config::{
    MemberConfig, MembersConfig, NodeConfig, OverrideConfig, PlacementConfig, RouterConfig,
    SlotRangeConfig, SplitConfig, TopologyConfig,
};
pub use error::{ConfigError, ConfigErrorKind, MigrationError, MigrationErrorKind, UnknownShard};
pub use read::{LagProbe, ReadPolicy, Session, monitor_lag};
pub use reshard::{
    EpochFence, KeyRange, Migration, Move, PLAN_SAMPLES, Phase, ReadRoute, ReshardPlan, Units,
    WriteRoute,
};
pub use router::{
    AnyRouter, BoundedLoadRouter, CLUSTER_SLOTS, Directory, JumpRouter, Layout, LoadGuard,
    MaglevRouter, RangeRouter, RangeRouterBuilder, RendezvousRouter, RingRouter, Router, ShardId,
    SlotRouter, SlotRouterBuilder, cluster_slot, jump_hash,
};
pub use shared::SharedMigration;
pub use topology::{
    MAX_SHARD_ID, Node, ReplicaStatus, Role, Target, Topology, TopologyBuilder, TopologyHandle,
};
