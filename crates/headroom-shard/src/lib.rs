//! Shard routing: map keys to shards the same way in every process, machine and Rust version.
//!
//! This crate will hold routers (jump consistent hash, rendezvous, ring with virtual nodes,
//! Maglev, bounded-load consistent hashing, ranges, directories, Redis Cluster slots) over
//! stable, documented hash functions; topologies of primaries and replicas with read policies
//! and read-your-writes sessions; and resharding plans with an epoch-fenced migration.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
