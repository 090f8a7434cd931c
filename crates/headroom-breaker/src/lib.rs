//! Failure handling: stop calling what is failing, retry what may succeed, bound every wait.
//!
//! This crate will hold circuit breakers (failure and slow-call ratios over sliding windows,
//! bounded half-open probes), retries with exponential backoff, jitter and a retry budget,
//! timeouts that cancel the work, hedged requests, fallbacks, and a pipeline composing them,
//! usable on async closures and as tower layers.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
