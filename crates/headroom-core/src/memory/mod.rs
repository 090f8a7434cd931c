//! In-memory backends: the embedded defaults for a single process.
//!
//! They are real implementations, safe to share across tasks and threads, bounded in memory,
//! and pass the same conformance suite as the Redis backends. Use them when one process is
//! all you run; switch to `headroom-redis` when instances must share state.

mod bus;
mod jobs;
mod kv;
mod lease;
mod migration;
mod rate;

pub use bus::MemoryBus;
pub use jobs::{MemoryJobStore, MemoryJobStoreBuilder};
pub use kv::{MemoryKvStore, MemoryKvStoreBuilder};
pub use lease::{MemoryLeaseStore, MemoryLeaseStoreBuilder};
pub use migration::MemoryMigrationStore;
pub use rate::{MemoryRateStore, MemoryRateStoreBuilder};

/// `by` after `at`; past what the platform's clock counts, as far as it counts: never.
pub(crate) fn after(at: std::time::Instant, by: std::time::Duration) -> std::time::Instant {
    at.checked_add(by)
        .unwrap_or_else(|| at + std::time::Duration::from_secs(u64::from(u32::MAX)))
}
