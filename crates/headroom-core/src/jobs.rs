//! The job store behind durable job queues: partitions of jobs, bounded on enqueue, delivered
//! at least once, with leases that lapse when a worker dies.
//!
//! A queue is spread over one or more **partitions**, each a [`Key`] whose local part carries
//! a `{hash tag}` on Redis Cluster, so every step on a partition touches one slot. The store
//! derives all the keys of a partition (lanes, delayed jobs, records, counters) from it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::lease::Fenced;
use crate::{BackendError, Key};

/// The most priority lanes a partition has; lane 0 is the first.
pub const MAX_LANES: u8 = 8;

/// A job's number within its partition, given by the store on enqueue: the first job of a
/// partition is 1, and numbers never repeat while the partition's data lives.
pub type JobNumber = u64;

/// A job to enqueue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NewJob {
    /// Opaque bytes for the handler.
    pub payload: Bytes,
    /// The priority lane, below [`MAX_LANES`].
    pub lane: u8,
    /// How long the job waits before it may be delivered (zero: at once).
    pub delay: Duration,
    /// The tenant the job counts against, if the queue bounds tenants.
    pub tenant: Option<Bytes>,
    /// An idempotency key: a second enqueue with the same key within the window returns the
    /// first job's number and adds nothing.
    pub dedup_key: Option<Bytes>,
    /// What the job writes (a record's key, for a write-behind): the newest unfinished job
    /// of a subject is found by [`JobStore::newest_of`].
    pub subject: Option<Bytes>,
    /// How the job ranks among the jobs of its subject (a write's version): one added with a
    /// lower rank than the unfinished newest of its subject does not replace it. On Redis,
    /// at most 2^53.
    pub subject_rank: u64,
}

impl NewJob {
    /// A job with `payload` in lane 0, ready at once.
    pub fn new(payload: Bytes) -> Self {
        Self {
            payload,
            ..Self::default()
        }
    }

    /// In `lane`.
    #[must_use]
    pub fn lane(mut self, lane: u8) -> Self {
        self.lane = lane;
        self
    }

    /// Delivered no sooner than `delay` from now.
    #[must_use]
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Counted against `tenant`.
    #[must_use]
    pub fn tenant(mut self, tenant: impl Into<Bytes>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// Deduplicated by `key`.
    #[must_use]
    pub fn dedup_key(mut self, key: impl Into<Bytes>) -> Self {
        self.dedup_key = Some(key.into());
        self
    }

    /// Found by [`JobStore::newest_of`] with `subject` while it is the newest unfinished job
    /// added with it.
    #[must_use]
    pub fn subject(mut self, subject: impl Into<Bytes>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Ranked `rank` among the jobs of its subject (see [`NewJob::subject_rank`]).
    #[must_use]
    pub fn subject_rank(mut self, rank: u64) -> Self {
        self.subject_rank = rank;
        self
    }
}

/// The bounds an enqueue is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnqueueLimits {
    /// The most unfinished jobs (waiting, delayed, running or retrying) in the partition.
    pub max_len: u64,
    /// The most unfinished jobs of one tenant in the partition.
    pub max_per_tenant: Option<u64>,
    /// How long a dedup key is remembered.
    pub dedup_window: Duration,
}

/// The answer to [`JobStore::enqueue`].
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Enqueued {
    /// The job was added.
    Added(JobNumber),
    /// A job with the same dedup key was added within the window; nothing was added.
    Duplicate(JobNumber),
    /// The partition, or the job's tenant in it, holds its maximum; nothing was added.
    Full {
        /// Whether the tenant's bound refused it (otherwise the partition's).
        tenant: bool,
        /// The unfinished jobs counted against the bound that refused it.
        depth: u64,
        /// Jobs finished (done or dead) per second in the partition over about the last
        /// [`DRAIN_WINDOW`], for a retry-after estimate.
        drained_per_sec: f64,
        /// The partition's unfinished jobs, of every tenant (`depth` when the partition's
        /// bound refused it): those of other tenants may have to drain before a tenant's own.
        unfinished: u64,
    },
}

/// The window over which [`Enqueued::Full::drained_per_sec`] is measured.
pub const DRAIN_WINDOW: Duration = Duration::from_secs(10);

/// What [`JobStore::fetch`] asks for.
#[derive(Clone, Copy, Debug)]
pub struct FetchRequest<'a> {
    /// The caller's name, unique among the workers of the queue while it lives.
    pub consumer: &'a str,
    /// The lanes to take ready jobs from, in order: the first lane is emptied before the next
    /// is read. Lanes not listed are not read.
    pub lanes: &'a [u8],
    /// The most jobs to deliver.
    pub max: usize,
    /// How long the deliveries of this fetch may go without completion or extension before
    /// another worker may take them over; a delivery taken over must also have gone this long.
    /// A consumer fetches with one visibility (a store may keep the latest per consumer).
    pub visibility: Duration,
}

/// A job handed to a worker by [`JobStore::fetch`].
///
/// Not `#[non_exhaustive]`: every store outside this crate builds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The job's number.
    pub number: JobNumber,
    /// Which delivery of the job this is, from 1: the fencing token of every later step. A
    /// job taken over from a worker whose visibility ran out is delivered with a greater one,
    /// so the earlier holder's steps are rejected.
    pub attempt: u32,
    /// The job's lane.
    pub lane: u8,
    /// The job's payload.
    pub payload: Bytes,
    /// The job's tenant.
    pub tenant: Option<Bytes>,
    /// When the job was enqueued, in milliseconds since the Unix epoch by the store's clock.
    pub enqueued_at_ms: u64,
    /// Whether the job was taken over from a holder whose visibility ran out.
    pub taken_over: bool,
    /// Earlier deliveries of the job that its holder handed back with
    /// [`JobStore::release`]: `attempt - handed_back` is the attempts charged to the job.
    pub handed_back: u32,
}

/// A job to finish with [`JobStore::complete_many`].
///
/// Not `#[non_exhaustive]`: callers outside this crate build it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The job's number.
    pub number: JobNumber,
    /// The attempt that holds it.
    pub attempt: u32,
    /// The result to keep.
    pub result: Bytes,
}

/// What [`JobStore::complete_many`] answers: for each job, in order, what
/// [`JobStore::complete`] would have answered for it.
pub type Completed = Vec<Result<Fenced, BackendError>>;

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum JobState {
    /// Waiting to be delivered for the first time (ready, or delayed).
    Queued,
    /// Held by a worker.
    Running,
    /// Waiting to be delivered again after a failed attempt.
    Retrying,
    /// Completed; its result is kept for the retention given.
    Done,
    /// Given up on after its last attempt; kept for the retention given.
    Dead,
}

impl JobState {
    /// The state's lower-case name: `queued`, `running`, `retrying`, `done` or `dead`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Done => "done",
            Self::Dead => "dead",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`JobStore::status`] knows of a job.
///
/// Not `#[non_exhaustive]`: every store outside this crate builds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRecord {
    /// Its state.
    pub state: JobState,
    /// Deliveries so far.
    pub attempt: u32,
    /// Its lane.
    pub lane: u8,
    /// When it was enqueued (Unix milliseconds, store clock).
    pub enqueued_at_ms: u64,
    /// The tenant it counts against.
    pub tenant: Option<Bytes>,
    /// Its payload while unfinished or dead; `None` once done.
    pub payload: Option<Bytes>,
    /// The result stored by [`JobStore::complete`].
    pub result: Option<Bytes>,
    /// The error of the last failed attempt (or, for a job that never failed, why it was
    /// first handed back).
    pub error: Option<Bytes>,
}

/// A partition's counts, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionStats {
    /// Unfinished jobs: the count [`EnqueueLimits::max_len`] bounds.
    pub unfinished: u64,
    /// Jobs in the lanes, ready for delivery, in every lane.
    pub ready: u64,
    /// Jobs held by workers.
    pub running: u64,
    /// Jobs waiting for their delay or retry backoff (including those whose wait has passed
    /// but that no fetch has moved to their lane yet).
    pub delayed: u64,
    /// When the oldest ready job was enqueued (Unix milliseconds), if any is ready.
    pub oldest_ready_ms: Option<u64>,
    /// Dead jobs still kept.
    pub dead: u64,
}

/// Stores the jobs of queue partitions.
///
/// # Contract
///
/// - Every method is one atomic step on one partition (one round trip and one Lua script on
///   Redis, on one cluster slot), except the default `complete_many`, one step per job.
/// - `enqueue` checks the bounds and adds the job in the same step: no interleaving of callers
///   lets the unfinished jobs of a partition (or of a tenant in it) pass their bound. A job
///   whose `dedup_key` was enqueued within `dedup_window` is [`Enqueued::Duplicate`], even
///   when the partition is full. A job with a delay becomes ready when it has passed.
/// - `fetch`, in one step: makes ready the jobs whose delay passed (in the order of their due
///   time, each joining the end of its lane; a store may move a bounded batch of them per
///   fetch, the rest at the next); then takes over the deliveries whose holder went
///   longer than the visibility it fetched them with, and than this fetch's `visibility`,
///   without completing, failing or extending them (oldest first; a store may look for them
///   at most once per quarter of `visibility`, so such a delivery may wait up to that much
///   longer before a fetch takes it over). A worker fetching with a shorter visibility than
///   another's (during a deploy that changes it) never takes the other's jobs over sooner;
///   then takes ready jobs from the lanes in the order given, oldest first in each lane, up to
///   `max` in all. Each job delivered is running, with `attempt` one more than before and its
///   visibility counted from now.
/// - `recover`, in one step, delivers again the jobs a `fetch_marked` with the token delivered
///   that are still running at that attempt, counting their visibility from now, and changes
///   nothing else.
/// - `extend`, `complete`, `retry` and `bury` apply only for the current attempt of a running
///   job; otherwise they are [`Fenced::Rejected`] and change nothing.
///   - `extend` counts the job's visibility from now again.
///   - `complete` makes it done, keeping `result` for `retention`; `complete_many` does so
///     for several jobs.
///   - `retry` makes it wait `delay` (retrying), keeping `error`; it is then delivered again
///     with the next attempt, in its lane.
///   - `bury` makes it dead, keeping its payload and `error` for `retention`, and lists it
///     among the dead letters.
/// - A done or dead job no longer counts against any bound.
/// - `newest_of` answers the newest job of the subject while it is unfinished: the job added
///   with it last, unless the newest then unfinished ranked higher (`subject_rank`), which
///   stays the newest. Once the newest is done or dead, nothing, even if another job of the
///   subject is still unfinished.
/// - Times use the store's clock (Redis server time), never the caller's.
/// - Deliveries are at least once: a job taken over after its visibility ran out may still be
///   running in its first holder.
pub trait JobStore: Send + Sync + fmt::Debug + 'static {
    /// Adds `job` to `partition` if the bounds allow.
    fn enqueue(
        &self,
        partition: &Key,
        job: &NewJob,
        limits: &EnqueueLimits,
    ) -> impl Future<Output = Result<Enqueued, BackendError>> + Send;

    /// Delivers jobs from `partition` to `request.consumer`.
    fn fetch(
        &self,
        partition: &Key,
        request: FetchRequest<'_>,
    ) -> impl Future<Output = Result<Vec<Delivery>, BackendError>> + Send;

    /// Fetches as [`fetch`](Self::fetch) does, and marks each delivery with `token`, which the
    /// caller draws at random for this fetch (not 0), so that [`recover`](Self::recover) finds
    /// them again if the answer is lost. The default ignores the token: the deliveries of a
    /// lost answer then wait for their visibility to run out, and are taken over with a
    /// greater attempt.
    fn fetch_marked(
        &self,
        partition: &Key,
        request: FetchRequest<'_>,
        token: u64,
    ) -> impl Future<Output = Result<Vec<Delivery>, BackendError>> + Send {
        let _ = token;
        self.fetch(partition, request)
    }

    /// After a [`fetch_marked`](Self::fetch_marked) by `consumer` with `token` failed (a
    /// timeout, a dropped connection: the store may have run it, and only its answer was
    /// lost), delivers again (the token, drawn at random, names the fetch; the consumer lets
    /// a store narrow its search) up to `max` of the jobs it delivered that are still running at
    /// that delivery (not finished, handed back or taken over since), as they were: the same
    /// attempt, so uncharged and still the fencing token (no holder of it ever knew of it),
    /// with their visibility counted from now. None when the fetch delivered nothing, and none
    /// for token 0. The default answers none.
    fn recover(
        &self,
        partition: &Key,
        consumer: &str,
        token: u64,
        max: usize,
    ) -> impl Future<Output = Result<Vec<Delivery>, BackendError>> + Send {
        let _ = (partition, consumer, token, max);
        async { Ok(Vec::new()) }
    }

    /// Counts the visibility of the holder of `attempt` from now again.
    fn extend(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
    ) -> impl Future<Output = Result<Fenced, BackendError>> + Send;

    /// Finishes the job held by `attempt`, keeping `result` for `retention`.
    fn complete(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        result: Bytes,
        retention: Duration,
    ) -> impl Future<Output = Result<Fenced, BackendError>> + Send;

    /// Finishes each of `jobs` as [`complete`](Self::complete) would, in order, keeping each
    /// result for `retention`: a job listed twice is completed by its first entry, and the
    /// second is rejected. The answer holds one entry per job, in order. `Err` is a failure of
    /// the whole call (as for `complete`, some jobs may then be done). A store that sends a
    /// long list in parts answers the jobs of the parts that ran, and fails each job of a part
    /// that failed or was not sent.
    ///
    /// The default calls `complete` for each job; a store may do it all in one step (one round
    /// trip and one script on Redis).
    fn complete_many(
        &self,
        partition: &Key,
        jobs: &[Completion],
        retention: Duration,
    ) -> impl Future<Output = Result<Completed, BackendError>> + Send {
        async move {
            let mut answers = Vec::with_capacity(jobs.len());
            for job in jobs {
                answers.push(
                    self.complete(
                        partition,
                        job.number,
                        job.attempt,
                        job.result.clone(),
                        retention,
                    )
                    .await,
                );
            }
            Ok(answers)
        }
    }

    /// Puts the job held by `attempt` back after `delay`, keeping `error`.
    fn retry(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        delay: Duration,
        error: Bytes,
    ) -> impl Future<Output = Result<Fenced, BackendError>> + Send;

    /// Puts the job held by `attempt` back at once, as [`retry`](Self::retry) with no delay
    /// does, but uncharged: the holder is handing it back unfinished (it is stopping), not
    /// failing it. Its later deliveries count this one in
    /// [`handed_back`](Delivery::handed_back); their attempt numbers still grow, as fencing
    /// tokens. `error` (the reason) is kept only when the job has no error yet (of a
    /// failed attempt, or of an earlier hand-back).
    fn release(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        error: Bytes,
    ) -> impl Future<Output = Result<Fenced, BackendError>> + Send;

    /// Gives up on the job held by `attempt`, keeping it as a dead letter for `retention`.
    fn bury(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        error: Bytes,
        retention: Duration,
    ) -> impl Future<Output = Result<Fenced, BackendError>> + Send;

    /// What the store knows of job `number`; `None` if it never was or its retention passed.
    fn status(
        &self,
        partition: &Key,
        number: JobNumber,
    ) -> impl Future<Output = Result<Option<JobRecord>, BackendError>> + Send;

    /// The numbers of up to `max` dead jobs still kept, newest first.
    fn dead_letters(
        &self,
        partition: &Key,
        max: usize,
    ) -> impl Future<Output = Result<Vec<JobNumber>, BackendError>> + Send;

    /// Forgets `consumer`, which fetches no more (its worker stopped). A store that keeps
    /// consumers (Redis consumer groups) drops it from `partition` unless it still holds a job
    /// there; the default keeps nothing and does nothing.
    fn leave(
        &self,
        partition: &Key,
        consumer: &str,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        let _ = (partition, consumer);
        async { Ok(()) }
    }

    /// The number and payload of the newest job of `subject` in `partition`
    /// ([`NewJob::subject`]: the last added, unless the newest then unfinished ranked higher,
    /// [`NewJob::subject_rank`]), if it is unfinished.
    fn newest_of(
        &self,
        partition: &Key,
        subject: &[u8],
    ) -> impl Future<Output = Result<Option<(JobNumber, Bytes)>, BackendError>> + Send;

    /// The partition's counts.
    fn stats(
        &self,
        partition: &Key,
    ) -> impl Future<Output = Result<PartitionStats, BackendError>> + Send;
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Object-safe mirror of [`JobStore`], implemented for every store.
trait ErasedJobStore: Send + Sync + fmt::Debug + 'static {
    fn enqueue<'a>(
        &'a self,
        partition: &'a Key,
        job: &'a NewJob,
        limits: &'a EnqueueLimits,
    ) -> BoxFuture<'a, Result<Enqueued, BackendError>>;
    fn fetch<'a>(
        &'a self,
        partition: &'a Key,
        request: FetchRequest<'a>,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, BackendError>>;
    fn fetch_marked<'a>(
        &'a self,
        partition: &'a Key,
        request: FetchRequest<'a>,
        token: u64,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, BackendError>>;
    fn recover<'a>(
        &'a self,
        partition: &'a Key,
        consumer: &'a str,
        token: u64,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, BackendError>>;
    fn extend<'a>(
        &'a self,
        partition: &'a Key,
        number: JobNumber,
        attempt: u32,
    ) -> BoxFuture<'a, Result<Fenced, BackendError>>;
    fn complete<'a>(
        &'a self,
        partition: &'a Key,
        number: JobNumber,
        attempt: u32,
        result: Bytes,
        retention: Duration,
    ) -> BoxFuture<'a, Result<Fenced, BackendError>>;
    fn complete_many<'a>(
        &'a self,
        partition: &'a Key,
        jobs: &'a [Completion],
        retention: Duration,
    ) -> BoxFuture<'a, Result<Completed, BackendError>>;
    fn retry<'a>(
        &'a self,
        partition: &'a Key,
        number: JobNumber,
        attempt: u32,
        delay: Duration,
        error: Bytes,
    ) -> BoxFuture<'a, Result<Fenced, BackendError>>;
    fn release<'a>(
        &'a self,
        partition: &'a Key,
        number: JobNumber,
        attempt: u32,
        error: Bytes,
    ) -> BoxFuture<'a, Result<Fenced, BackendError>>;
    fn bury<'a>(
        &'a self,
        partition: &'a Key,
        number: JobNumber,
        attempt: u32,
        error: Bytes,
        retention: Duration,
    ) -> BoxFuture<'a, Result<Fenced, BackendError>>;
    fn status<'a>(
        &'a self,
        partition: &'a Key,
        number: JobNumber,
    ) -> BoxFuture<'a, Result<Option<JobRecord>, BackendError>>;
    fn dead_letters<'a>(
        &'a self,
        partition: &'a Key,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<JobNumber>, BackendError>>;
    fn leave<'a>(
        &'a self,
        partition: &'a Key,
        consumer: &'a str,
    ) -> BoxFuture<'a, Result<(), BackendError>>;
    fn newest_of<'a>(
        &'a self,
        partition: &'a Key,
        subject: &'a [u8],
    ) -> BoxFuture<'a, Result<Option<(JobNumber, Bytes)>, BackendError>>;
    fn stats<'a>(
        &'a self,
        partition: &'a Key,
    ) -> BoxFuture<'a, Result<PartitionStats, BackendError>>;
}

impl<S: JobStore> ErasedJobStore for S {
    fn enqueue<'a>(
        &'a self,
        partition: &'a Key,
        job: &'a NewJob,
        limits: &'a EnqueueLimits,
    ) -> BoxFuture<'a, Result<Enqueued, BackendError>> {
        Box::pin(JobStore::enqueue(self, partition, job, limits))
    }
    fn fetch<'a>(
        &'a self,
        partition: &'a Key,
        request: FetchRequest<'a>,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, BackendError>> {
        Box::pin(JobStore::fetch(self, partition, request))
    }
    fn fetch_marked<'a>(
        &'a self,
        partition: &'a Key,
        request: FetchRequest<'a>,
        token: u64,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, BackendError>> {
        Box::pin(JobStore::fetch_marked(self, partition, request, token))
    }
    fn recover<'a>(
        &'a self,
        partition: &'a Key,
        consumer: &'a str,
        token: u64,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, BackendError>> {
        Box::pin(JobStore::recover(self, partition, consumer, token, max))
    }
    fn extend<'a>(
        &'a self,
        partition: &'a Key,
        number: JobNumber,
        attempt: u32,
    ) -> BoxFuture<'a, Result<Fenced, BackendError>> {
        Box::pin(JobStore::extend(self, partition, number, attempt))
    }
    fn complete<'a>(
        &'a self,
        partition: &'a Key,
        number: JobNumber,
        attempt: u32,
        result: Bytes,
        retention: Duration,
    ) -> BoxFuture<'a, Result<Fenced, BackendError>> {
        Box::pin(JobStore::complete(
            self, partition, number, attempt, result, retention,
        ))
    }
    fn complete_many<'a>(
        &'a self,
        partition: &'a Key,
        jobs: &'a [Completion],
        retention: Duration,
    ) -> BoxFuture<'a, Result<Completed, BackendError>> {
        Box::pin(JobStore::complete_many(self, partition, jobs, retention))
    }
    fn retry<'a>(
        &'a self,
        partition: &'a Key,
        number: JobNumber,
        attempt: u32,
        delay: Duration,
        error: Bytes,
    ) -> BoxFuture<'a, Result<Fenced, BackendError>> {
        Box::pin(JobStore::retry(
            self, partition, number, attempt, delay, error,
        ))
    }
    fn release<'a>(
        &'a self,
        partition: &'a Key,
        number: JobNumber,
        attempt: u32,
        error: Bytes,
    ) -> BoxFuture<'a, Result<Fenced, BackendError>> {
        Box::pin(JobStore::release(self, partition, number, attempt, error))
    }
    fn bury<'a>(
        &'a self,
        partition: &'a Key,
        number: JobNumber,
        attempt: u32,
        error: Bytes,
        retention: Duration,
    ) -> BoxFuture<'a, Result<Fenced, BackendError>> {
        Box::pin(JobStore::bury(
            self, partition, number, attempt, error, retention,
        ))
    }
    fn status<'a>(
        &'a self,
        partition: &'a Key,
        number: JobNumber,
    ) -> BoxFuture<'a, Result<Option<JobRecord>, BackendError>> {
        Box::pin(JobStore::status(self, partition, number))
    }
    fn dead_letters<'a>(
        &'a self,
        partition: &'a Key,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<JobNumber>, BackendError>> {
        Box::pin(JobStore::dead_letters(self, partition, max))
    }
    fn leave<'a>(
        &'a self,
        partition: &'a Key,
        consumer: &'a str,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(JobStore::leave(self, partition, consumer))
    }
    fn newest_of<'a>(
        &'a self,
        partition: &'a Key,
        subject: &'a [u8],
    ) -> BoxFuture<'a, Result<Option<(JobNumber, Bytes)>, BackendError>> {
        Box::pin(JobStore::newest_of(self, partition, subject))
    }
    fn stats<'a>(
        &'a self,
        partition: &'a Key,
    ) -> BoxFuture<'a, Result<PartitionStats, BackendError>> {
        Box::pin(JobStore::stats(self, partition))
    }
}

/// A [`JobStore`] chosen at run time (memory or Redis), behind one cheap-to-clone type.
///
/// Each call boxes its future; use the concrete store type where that matters.
#[derive(Clone, Debug)]
pub struct DynJobStore(Arc<dyn ErasedJobStore>);

impl DynJobStore {
    /// Erases the type of `store`.
    pub fn new(store: impl JobStore) -> Self {
        Self(Arc::new(store))
    }
}

impl JobStore for DynJobStore {
    async fn enqueue(
        &self,
        partition: &Key,
        job: &NewJob,
        limits: &EnqueueLimits,
    ) -> Result<Enqueued, BackendError> {
        self.0.enqueue(partition, job, limits).await
    }
    async fn fetch(
        &self,
        partition: &Key,
        request: FetchRequest<'_>,
    ) -> Result<Vec<Delivery>, BackendError> {
        self.0.fetch(partition, request).await
    }
    async fn fetch_marked(
        &self,
        partition: &Key,
        request: FetchRequest<'_>,
        token: u64,
    ) -> Result<Vec<Delivery>, BackendError> {
        self.0.fetch_marked(partition, request, token).await
    }
    async fn recover(
        &self,
        partition: &Key,
        consumer: &str,
        token: u64,
        max: usize,
    ) -> Result<Vec<Delivery>, BackendError> {
        self.0.recover(partition, consumer, token, max).await
    }
    async fn extend(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
    ) -> Result<Fenced, BackendError> {
        self.0.extend(partition, number, attempt).await
    }
    async fn complete(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        result: Bytes,
        retention: Duration,
    ) -> Result<Fenced, BackendError> {
        self.0
            .complete(partition, number, attempt, result, retention)
            .await
    }
    async fn complete_many(
        &self,
        partition: &Key,
        jobs: &[Completion],
        retention: Duration,
    ) -> Result<Completed, BackendError> {
        self.0.complete_many(partition, jobs, retention).await
    }
    async fn retry(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        delay: Duration,
        error: Bytes,
    ) -> Result<Fenced, BackendError> {
        self.0.retry(partition, number, attempt, delay, error).await
    }
    async fn release(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        error: Bytes,
    ) -> Result<Fenced, BackendError> {
        self.0.release(partition, number, attempt, error).await
    }
    async fn bury(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        error: Bytes,
        retention: Duration,
    ) -> Result<Fenced, BackendError> {
        self.0
            .bury(partition, number, attempt, error, retention)
            .await
    }
    async fn status(
        &self,
        partition: &Key,
        number: JobNumber,
    ) -> Result<Option<JobRecord>, BackendError> {
        self.0.status(partition, number).await
    }
    async fn dead_letters(
        &self,
        partition: &Key,
        max: usize,
    ) -> Result<Vec<JobNumber>, BackendError> {
        self.0.dead_letters(partition, max).await
    }
    async fn leave(&self, partition: &Key, consumer: &str) -> Result<(), BackendError> {
        self.0.leave(partition, consumer).await
    }
    async fn newest_of(
        &self,
        partition: &Key,
        subject: &[u8],
    ) -> Result<Option<(JobNumber, Bytes)>, BackendError> {
        self.0.newest_of(partition, subject).await
    }
    async fn stats(&self, partition: &Key) -> Result<PartitionStats, BackendError> {
        self.0.stats(partition).await
    }
}
