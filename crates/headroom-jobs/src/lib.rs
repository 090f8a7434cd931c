//! Durable job queues with backpressure: move slow work off the request path.
//!
//! A request that must do something slow (a payment provider, a fraud check, an email)
//! enqueues a job and answers `202 Accepted` with a status URL; workers run the job. headroom's
//! queues are built for the moments of growth they exist for:
//!
//! - **Bounded.** A queue holds at most `max_len` unfinished jobs, and a tenant at most
//!   `max_per_tenant`. The bound is checked and the job added in one atomic step of the store
//!   (one round trip on Redis), so no race of producers passes it; a full queue refuses with
//!   [`EnqueueError::Full`], which carries a retry-after from the queue's recent drain rate.
//! - **Deduplicated.** An idempotency key on enqueue makes a retried request's second enqueue
//!   answer the first job's id.
//! - **Priorities, delays, schedules.** Jobs go to weighted lanes, served in proportion to
//!   their weights; a job can wait a delay or run at a time.
//! - **At least once, effectively once.** A worker that dies loses its jobs to another worker
//!   after the visibility timeout; a live one extends it. Every delivery has a greater attempt
//!   number, and the store rejects the steps of an earlier holder (unless Redis lost the
//!   earlier delivery in a failover or restart: see the durability section of `docs/jobs.md`).
//!   Run the handler's effect
//!   under `headroom-idempotency`, keyed by [`JobContext::idempotency_key`], and it happens
//!   once however often the job is delivered.
//! - **Retries and dead letters.** A failed attempt is retried after an exponential backoff
//!   with jitter; after the last attempt the job is dead, kept with its payload and error.
//! - **Graceful shutdown.** [`Worker::shutdown`] stops fetching, waits for running jobs up to
//!   a bound, and hands back the rest at once.
//! - **Observable.** `status` answers queued, running, retrying, done (with the result) or
//!   dead; metrics give depth, oldest ready age, throughput, retries and dead letters; each
//!   job runs in a `headroom.job` span carrying its id and the origin given on enqueue.
//!
//! Jobs live in any [`JobStore`](headroom_core::jobs::JobStore): the bounded
//! `MemoryJobStore` of `headroom-core` for one process (jobs die with it), or
//! `RedisJobStore` of `headroom-redis` (Redis Streams with consumer groups, standalone or
//! Cluster; a queue's partitions spread it over the cluster's slots).
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! use std::time::Duration;
//!
//! use bytes::Bytes;
//! use headroom_core::jobs::JobState;
//! use headroom_core::memory::MemoryJobStore;
//! use headroom_jobs::{Job, JobError, JobQueue};
//!
//! let queue = JobQueue::builder("emails", MemoryJobStore::new())
//!     .max_len(10_000)
//!     .build()?;
//! let worker = queue
//!     .worker(|job| async move {
//!         let to = std::str::from_utf8(job.payload()).map_err(|e| JobError::fatal(e.to_string()))?;
//!         Ok(Bytes::from(format!("sent to {to}")))
//!     })
//!     .concurrency(4)
//!     .start()?;
//!
//! let id = queue.enqueue(Job::new("ada@example.com")).await?.id;
//! while queue.status(id).await?.unwrap().state != JobState::Done {
//!     tokio::time::sleep(Duration::from_millis(5)).await;
//! }
//! let status = queue.status(id).await?.unwrap();
//! assert_eq!(status.result.as_deref(), Some(&b"sent to ada@example.com"[..]));
//! worker.shutdown(Duration::from_secs(5)).await;
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! See `docs/jobs.md` in the repository for the semantics, sizing and what needs Redis
//! persistence.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "cache")]
mod cache;
mod config;
mod envelope;
mod error;
mod id;
mod metrics;
mod queue;
mod worker;
mod write_behind;

#[cfg(feature = "cache")]
#[cfg_attr(docsrs, doc(cfg(feature = "cache")))]
pub use cache::{CacheWriteError, WriteBehindCache};
pub use config::{InvalidConfig, QueueConfig, WorkerConfig};
pub use error::{EnqueueError, JobError};
pub use headroom_core::jobs::JobState;
pub use id::{InvalidJobId, JobId};
pub use queue::{Enqueue, Job, JobQueue, JobQueueBuilder, JobStatus, QueueStats};
pub use worker::{JobContext, Worker, WorkerBuilder, WorkerReport};
pub use write_behind::{
    FlushReport, Flusher, Write, WriteBehind, WriteBehindBuilder, WriteBehindConfig, Writer,
};
