//! Test support for the headroom crates: real Redis, real faults, one conformance suite.
//!
//! - [`RedisServer`]: a real `redis-server` process on a free loopback port that a test can
//!   kill, restart (same port) and pause (`SIGSTOP`/`SIGCONT`).
//! - [`RedisCluster`]: a real Redis Cluster of several masters (and optional replicas).
//! - [`FaultProxy`]: a TCP proxy between a client and Redis that cuts, stalls or delays
//!   connections on command.
//! - [`conformance`]: the contract tests of the backend traits, run against every
//!   implementation (memory, Redis standalone, Redis Cluster) by the crates that provide them.
//!
//! Processes started here die with the test process, even when it is killed: each server runs
//! under a small shell guard that kills it once the test process's end of a pipe closes.
//!
//! When `redis-server` is not installed, starting a server panics with a message naming the
//! install command, so a test never passes silently without Redis.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod conformance;
mod proxy;
mod server;

pub use proxy::FaultProxy;
pub use server::{
    ClusterNode, RedisCluster, RedisServer, RedisServerBuilder, shared_cluster, shared_server,
};

use std::sync::atomic::{AtomicU64, Ordering};

use headroom_core::Namespace;

/// A namespace no other test in this process (or another process) uses, so tests can share
/// one server.
pub fn unique_namespace(prefix: &str) -> Namespace {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    Namespace::new(&format!("{prefix}-{}-{n}", std::process::id()))
        .expect("test namespaces are valid")
}
