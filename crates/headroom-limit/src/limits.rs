//! Bounds shared by the bulkhead and the adaptive limits that steer it.

/// The largest concurrency limit a bulkhead supports: its free permits, and what a shrink
/// still owes, are counted (signed) in half of a 64-bit word, and they hand off through a
/// tokio semaphore.
pub(crate) const MAX_LIMIT: usize = {
    let half_word = i32::MAX as usize;
    if half_word < tokio::sync::Semaphore::MAX_PERMITS {
        half_word
    } else {
        tokio::sync::Semaphore::MAX_PERMITS
    }
};
