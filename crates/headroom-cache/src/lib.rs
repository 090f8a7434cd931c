//! A two-level cache: an in-process L1 on `moka` over a shared L2 on any
//! [`KvStore`](headroom_core::kv::KvStore) (memory or Redis).
//!
//! This crate will hold the typed tiered cache: reads through L1, L2 and a loader with
//! stampede protection; TTL with jitter, soft TTL with background refresh and hard TTL;
//! fail-safe serving of stale values; batch reads in one L2 round trip; isolation from a slow
//! or failed L2; a versioned envelope around every L2 value; and event-driven invalidation
//! across instances with a bounded staleness even when messages are lost.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
