//! Admission control: decide early, and cheaply, which work a service takes on.
//!
//! This crate will hold bulkheads (bounded concurrency with a bounded wait queue),
//! backpressure queues with overflow policies, deadlines, CoDel shedding and priority
//! classes, adaptive concurrency limits, load shedding, and GCRA rate limits by tier, in
//! process and across instances through a [`RateStore`](headroom_core::rate::RateStore).
#![forbid(unsafe_code)]
#![warn(missing_docs)]
