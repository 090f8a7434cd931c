//! Admission control: decide early, and cheaply, which work a service takes on.
//!
//! A service that accepts more work than it can finish does not get slower gracefully: queues
//! grow, every request waits longer than its caller is willing to, and the work done is wasted.
//! This crate keeps the amount of work in a service bounded and refuses the excess at the door,
//! with a typed, counted reason:
//!
//! - [`Bulkhead`]: a named compartment with a concurrency limit and a bounded, timed wait
//!   queue. Permits are released on drop, panic and cancellation; limits change at run time.
//! - [`KeyedBulkhead`]: one compartment shared among tenants, each guaranteed a (weighted)
//!   share of it and free to borrow what the others leave idle; memory bounded under any
//!   number of attacker-chosen tenant names.
//! - [`WorkQueue`]: a bounded queue of work in front of a worker pool, with overflow policies
//!   ([`Overflow`]), per-item deadlines, priority classes, CoDel shedding and adaptive LIFO.
//! - [`adaptive`]: concurrency limits that learn from latency and errors (AIMD, Gradient2),
//!   usable as the limit of a bulkhead.
//! - [`LoadShedder`]: refuses the least important work first when a bulkhead is saturated.
//! - [`rate`]: rate limits with GCRA: a lock-free direct limiter, bounded keyed limiters,
//!   tiers, and limits shared across instances through a `RateStore` (Redis).
//! - `tower` (feature `tower`): tower layers for the bulkheads, the queue, the shedder and
//!   HTTP rate limits.
//!
//! Every refusal is an [`Overloaded`] carrying a [`Reason`] and the [`Priority`] of the refused
//! work; it implements [`Classify`](headroom_core::Classify) as a retryable rejection.
//! Configuration types deserialize with serde (feature `serde`, human-readable durations).
//!
//! The guide in `docs/limits.md` explains how to choose limits (Little's law), how to use
//! priorities and how these pieces compose with timeouts.
//!
//! # Metrics
//!
//! Through the `metrics` facade, labelled `bulkhead`, `queue` or `shedder` with the
//! component's name:
//!
//! | name | kind | meaning |
//! |---|---|---|
//! | `headroom_limit_in_flight_requests` | gauge | permits held |
//! | `headroom_limit_queued_requests` | gauge | callers or items waiting |
//! | `headroom_limit_queue_delay_seconds` | histogram | time waited: by every item a work queue hands out; by the bulkhead callers that had to queue (an immediate admission records nothing, so `admitted_total` less the histogram's count is those admitted at once) |
//! | `headroom_limit_admitted_total` | counter | work admitted |
//! | `headroom_limit_rejected_total` | counter | work refused or shed, by `priority` and `reason` |
//! | `headroom_limit_concurrency_limit_requests` | gauge | current limit (`bulkhead` or `limiter`) |
//! | `headroom_limit_limit_changes_total` | counter | limit changes (`bulkhead` or `limiter`) |
//! | `headroom_limit_tracked_tenants` | gauge | tenants with state of their own in a keyed bulkhead |
//! | `headroom_limit_tenant_overflows_total` | counter | acquires of tenants that found no room of their own, charged to the overflow tenant |
//! | `headroom_limit_rate_decisions_total` | counter | rate-limit decisions, by `limiter`, `tier` and `outcome` (`allowed`, `rejected`) |
//! | `headroom_limit_rate_store_round_trips_total` | counter | rate store calls, by `limiter` and `outcome` (`ok`, `error`) |
//! | `headroom_limit_rate_fallbacks_total` | counter | decisions made by the fallback while the store is unreachable, by `limiter` and `fallback` |
//!
//! Handles are registered when a component is built; a recorder installed later still gets
//! them (see [`headroom_core::metrics`]). Refusals
//! and limit changes are also `tracing` events at debug and trace level.
//!
//! # Minimum supported Rust version
//!
//! Rust 1.88.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod adaptive;
mod bulkhead;
mod error;
mod keyed_bulkhead;
mod limits;
mod metrics;
mod priority;
mod queue;
pub mod rate;
mod shed;
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub mod tower;

pub use bulkhead::{Bulkhead, BulkheadBuilder, BulkheadConfig, OwnedPermit, Permit};
pub use error::{ConfigError, Overloaded, Reason};
pub use keyed_bulkhead::{
    KeyedBulkhead, KeyedBulkheadBuilder, KeyedBulkheadConfig, KeyedPermit, OwnedKeyedPermit,
    TenantClass,
};
pub use priority::Priority;
pub use queue::{
    CodelConfig, Enqueue, Overflow, PushError, QueueConfig, WorkQueue, WorkQueueBuilder,
};
pub use shed::{LoadShedConfig, LoadShedder, LoadShedderBuilder};
