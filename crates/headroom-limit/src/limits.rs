//! Bounds shared by the bulkhead and the adaptive limits that steer it.

/// The largest concurrency limit a bulkhead supports: its permits hand off through a tokio
/// semaphore.
pub(crate) const MAX_LIMIT: usize = tokio::sync::Semaphore::MAX_PERMITS;
