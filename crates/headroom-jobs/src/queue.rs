use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use headroom_core::jobs::{
    EnqueueLimits, Enqueued, JobRecord, JobState, JobStore, NewJob, PartitionStats,
};
use headroom_core::{BackendError, Clock, Key, Namespace};

use crate::config::{InvalidConfig, QueueConfig};
use crate::envelope::{self, MAX_ORIGIN_LEN};
use crate::metrics::QueueMetrics;
use crate::{EnqueueError, JobId};

/// A job to enqueue: its payload and how it should run.
#[derive(Clone, Debug)]
#[must_use]
pub struct Job {
    payload: Bytes,
    lane: u8,
    run_at: RunAt,
    tenant: Option<String>,
    idempotency_key: Option<String>,
    route: Option<Bytes>,
    /// Found by [`JobQueue::newest_of`] while it is the newest unfinished job of its route,
    /// with this rank among them.
    subject: Option<u64>,
    origin: Option<String>,
}

#[derive(Clone, Copy, Debug)]
enum RunAt {
    Now,
    After(Duration),
    At(SystemTime),
}

impl Job {
    /// A job carrying `payload`, in lane 0, ready at once.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self {
            payload: payload.into(),
            lane: 0,
            run_at: RunAt::Now,
            tenant: None,
            idempotency_key: None,
            route: None,
            subject: None,
            origin: None,
        }
    }

    /// In priority lane `lane` (an index into the queue's `lane_weights`).
    pub fn lane(mut self, lane: u8) -> Self {
        self.lane = lane;
        self
    }

    /// Run no sooner than `delay` from now.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.run_at = RunAt::After(delay);
        self
    }

    /// Run no sooner than `time`, as this process's clock (the queue's) reads it: the delay
    /// from its now is what the store counts, on its own clock, so a skew between the two
    /// shifts the run by as much. A time past runs at once.
    pub fn at(mut self, time: SystemTime) -> Self {
        self.run_at = RunAt::At(time);
        self
    }

    /// Counted against `tenant`'s bound; a tenant's jobs share one partition.
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// Enqueued once per `key` within the queue's dedup window: a second enqueue answers the
    /// first job's id. Keys are kept per tenant.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Jobs with one route key (an entity's id, say) go to one partition, so they are
    /// delivered in the order they became ready relative to each other. A job with a tenant
    /// goes by its tenant instead (a tenant's jobs share one partition); a job with neither
    /// goes by its idempotency key, and otherwise round the partitions. Without a tenant, an
    /// idempotency key deduplicates only among jobs of one route.
    pub fn route(mut self, key: impl Into<Bytes>) -> Self {
        self.route = Some(key.into());
        self
    }

    /// Found by [`JobQueue::newest_of`] with its route key while it is the newest unfinished
    /// job enqueued so with that route, ranked `rank` among them (see
    /// [`NewJob::subject_rank`]).
    pub(crate) fn subject_of_its_route(mut self, rank: u64) -> Self {
        self.subject = Some(rank);
        self
    }

    /// Where the job came from (a W3C `traceparent`, a request id), up to 255 bytes: carried
    /// to the worker's span as `job.origin`.
    pub fn origin(mut self, origin: impl Into<String>) -> Self {
        self.origin = Some(origin.into());
        self
    }
}

/// The answer to a successful [`JobQueue::enqueue`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Enqueue {
    /// The job's id.
    pub id: JobId,
    /// Whether the job was enqueued before with the same idempotency key, and this is its id.
    pub duplicate: bool,
}

/// What a queue knows of a job, for a status endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct JobStatus {
    /// Where the job is in its life.
    pub state: JobState,
    /// Deliveries so far.
    pub attempt: u32,
    /// When it was enqueued (store clock).
    pub enqueued_at: SystemTime,
    /// The handler's result, once done.
    pub result: Option<Bytes>,
    /// The error of the last failed attempt (or, for a job that never failed, why it was first
    /// handed back).
    pub error: Option<String>,
}

/// A queue's counts, summed over its partitions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStats {
    /// Unfinished jobs: what `max_len` bounds.
    pub unfinished: u64,
    /// Jobs ready in the lanes.
    pub ready: u64,
    /// Jobs held by workers.
    pub running: u64,
    /// Jobs waiting for a delay or a retry backoff.
    pub delayed: u64,
    /// Dead jobs kept.
    pub dead: u64,
    /// How long ago the job at the front of a lane was enqueued, the longest over lanes (a
    /// delayed or retried job counts from its enqueue), by the store's clock against this
    /// process's.
    pub oldest_ready_age: Option<Duration>,
}

/// A durable job queue on a [`JobStore`]: producers [`enqueue`](Self::enqueue); workers,
/// made with [`worker`](Self::worker), run the jobs.
///
/// Clones share the queue.
pub struct JobQueue<S> {
    pub(crate) inner: Arc<QueueInner<S>>,
}

impl<S> Clone for JobQueue<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S> std::fmt::Debug for JobQueue<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobQueue")
            .field("name", &self.inner.name)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

pub(crate) struct QueueInner<S> {
    pub(crate) name: Arc<str>,
    pub(crate) store: S,
    pub(crate) config: QueueConfig,
    pub(crate) partitions: Vec<Key>,
    limits: EnqueueLimits,
    next_partition: AtomicUsize,
    pub(crate) clock: Clock,
    pub(crate) metrics: QueueMetrics,
    /// Each partition's counts as last read, `None` before any reading: what the gauges show
    /// of a partition that cannot be read.
    last_read: Mutex<Vec<Option<PartitionStats>>>,
}

/// One reading of a queue's partitions.
pub(crate) struct Reading {
    /// Each partition's counts as read now, `None` where the read failed.
    pub(crate) partitions: Vec<Option<PartitionStats>>,
    /// The counts of the partitions read, with the last reading of those that failed.
    pub(crate) stats: QueueStats,
    /// The first failure, if any partition could not be read.
    pub(crate) error: Option<BackendError>,
}

/// Builds a [`JobQueue`].
#[derive(Debug)]
#[must_use]
pub struct JobQueueBuilder<S> {
    name: String,
    store: S,
    config: QueueConfig,
    namespace: Option<Namespace>,
    clock: Clock,
}

impl<S: JobStore> JobQueueBuilder<S> {
    /// Every setting at once.
    pub fn config(mut self, config: QueueConfig) -> Self {
        self.config = config;
        self
    }

    /// See [`QueueConfig::partitions`].
    pub fn partitions(mut self, partitions: u16) -> Self {
        self.config.partitions = partitions;
        self
    }

    /// See [`QueueConfig::max_len`].
    pub fn max_len(mut self, max_len: u64) -> Self {
        self.config.max_len = max_len;
        self
    }

    /// See [`QueueConfig::max_per_tenant`].
    pub fn max_per_tenant(mut self, max: u64) -> Self {
        self.config.max_per_tenant = Some(max);
        self
    }

    /// See [`QueueConfig::lane_weights`].
    pub fn lane_weights(mut self, weights: impl Into<Vec<u32>>) -> Self {
        self.config.lane_weights = weights.into();
        self
    }

    /// The namespace of the queue's keys in a shared store (default `headroom.jobs`).
    pub fn namespace(mut self, namespace: Namespace) -> Self {
        self.namespace = Some(namespace);
        self
    }

    /// The clock the queue reads for schedules and ages (default: the system clock).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Builds the queue, or names the setting that cannot work.
    pub fn build(self) -> Result<JobQueue<S>, InvalidConfig> {
        self.config.validate()?;
        let name = &self.name;
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(InvalidConfig::new(
                "name",
                "must be 1 to 64 bytes of A-Z a-z 0-9 _ - .",
            ));
        }
        let namespace = match self.namespace {
            Some(namespace) => namespace,
            None => Namespace::new("headroom.jobs").expect("a valid namespace"),
        };
        let partitions = (0..self.config.partitions)
            .map(|p| {
                namespace
                    .key(format!("{{{name}.{p}}}"))
                    .expect("a short valid key")
            })
            .collect();
        let partitions_n = u64::from(self.config.partitions);
        let limits = EnqueueLimits {
            max_len: self.config.max_len.div_ceil(partitions_n),
            max_per_tenant: self.config.max_per_tenant,
            dedup_window: self.config.dedup_window,
        };
        Ok(JobQueue {
            inner: Arc::new(QueueInner {
                metrics: QueueMetrics::new(name),
                last_read: Mutex::new(vec![None; usize::from(self.config.partitions)]),
                name: self.name.into(),
                store: self.store,
                config: self.config,
                partitions,
                limits,
                next_partition: AtomicUsize::new(0),
                clock: self.clock,
            }),
        })
    }
}

/// An idempotency key as the store keeps it: per tenant, so one tenant's key never answers
/// another's job, and for a job without a tenant, per route. The scopes' bytes never meet
/// (tenant and key are at most 255 bytes, checked before; a key is UTF-8, which never holds
/// the bytes `0xFE` and `0xFF`):
/// - a tenant's key is the tenant's length byte (1 to 255), the tenant and the key;
/// - the empty tenant's, a zero byte, `0xFE` and the key;
/// - a route's, a zero byte, `0xFF`, the route's 128-bit hash (so a long route does not
///   lengthen the key) and the key;
/// - any other, a zero byte and the key.
///
/// The empty tenant's tag came later: before it, its keys were those of jobs with neither
/// tenant nor route. The others are as they were, so their keys are still recognised.
fn scoped_key(tenant: Option<&str>, route: Option<&[u8]>, key: &str) -> Bytes {
    let mut scoped = Vec::with_capacity(18 + 255 + key.len());
    match (tenant, route) {
        (Some(""), _) => scoped.extend_from_slice(&[0, 0xFE]),
        (Some(tenant), _) => {
            scoped.push(tenant.len() as u8);
            scoped.extend_from_slice(tenant.as_bytes());
        }
        (None, Some(route)) => {
            scoped.extend_from_slice(&[0, 0xFF]);
            scoped.extend_from_slice(&xxhash_rust::xxh3::xxh3_128(route).to_be_bytes());
        }
        (None, None) => scoped.push(0),
    }
    scoped.extend_from_slice(key.as_bytes());
    Bytes::from(scoped)
}

fn hash(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

impl<S: JobStore> JobQueue<S> {
    /// A builder for the queue `name` on `store`, with the defaults of [`QueueConfig`].
    pub fn builder(name: impl Into<String>, store: S) -> JobQueueBuilder<S> {
        JobQueueBuilder {
            name: name.into(),
            store,
            config: QueueConfig::default(),
            namespace: None,
            clock: Clock::system(),
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The queue's configuration.
    pub fn config(&self) -> &QueueConfig {
        &self.inner.config
    }

    /// Adds `job`, or refuses it with a typed error.
    ///
    /// The bound is checked and the job added in one atomic step of the store (one round trip
    /// on Redis). A full queue answers [`EnqueueError::Full`] with a retry-after; nothing is
    /// added. A job's tenant, else its [route](Job::route), else its idempotency key picks its
    /// partition, so a tenant's bound is exact, and a key's deduplication among jobs of one
    /// tenant (or, without one, of one route); other jobs go round the partitions.
    pub async fn enqueue(&self, job: Job) -> Result<Enqueue, EnqueueError> {
        let inner = &*self.inner;
        let config = &inner.config;
        if job.payload.len() > config.max_payload_len {
            return Err(EnqueueError::TooLarge {
                len: job.payload.len(),
                max: config.max_payload_len,
            });
        }
        if usize::from(job.lane) >= config.lane_weights.len() {
            return Err(EnqueueError::Invalid(format!(
                "lane {} is not below the queue's {} lanes",
                job.lane,
                config.lane_weights.len()
            )));
        }
        if job
            .origin
            .as_ref()
            .is_some_and(|o| o.len() > MAX_ORIGIN_LEN)
        {
            return Err(EnqueueError::Invalid(format!(
                "origin is longer than {MAX_ORIGIN_LEN} bytes"
            )));
        }
        if job.tenant.as_ref().is_some_and(|t| t.len() > 255) {
            return Err(EnqueueError::Invalid(
                "tenant is longer than 255 bytes".into(),
            ));
        }
        if job.idempotency_key.as_ref().is_some_and(|k| k.len() > 255) {
            return Err(EnqueueError::Invalid(
                "idempotency key is longer than 255 bytes".into(),
            ));
        }
        let partition = self.partition_for(&job);
        let delay = match job.run_at {
            RunAt::Now => Duration::ZERO,
            RunAt::After(delay) => delay,
            RunAt::At(time) => time
                .duration_since(UNIX_EPOCH + inner.clock.unix_time())
                .unwrap_or(Duration::ZERO),
        };
        let dedup_key = job
            .idempotency_key
            .as_ref()
            .map(|key| scoped_key(job.tenant.as_deref(), job.route.as_deref(), key));
        let nonce = config.job_nonces.then(|| fastrand::u64(..));
        let sealed = envelope::seal(nonce, job.origin.as_deref(), &job.payload);
        let mut new = NewJob::new(sealed).lane(job.lane).delay(delay);
        if let Some(tenant) = &job.tenant {
            new = new.tenant(Bytes::copy_from_slice(tenant.as_bytes()));
        }
        if let Some(key) = dedup_key {
            new = new.dedup_key(key);
        }
        if let (Some(rank), Some(route)) = (job.subject, &job.route) {
            new = new.subject(route.clone()).subject_rank(rank);
        }
        let answer = inner
            .store
            .enqueue(&inner.partitions[partition], &new, &inner.limits)
            .await;
        let id = |number| JobId {
            partition: partition as u16,
            number,
        };
        match answer {
            Ok(Enqueued::Added(number)) => {
                inner.metrics.added.increment(1);
                tracing::debug!(queue = %inner.name, job.id = %id(number), "job enqueued");
                Ok(Enqueue {
                    id: id(number),
                    duplicate: false,
                })
            }
            Ok(Enqueued::Duplicate(number)) => {
                inner.metrics.duplicate.increment(1);
                tracing::debug!(queue = %inner.name, job.id = %id(number), "job enqueued before");
                Ok(Enqueue {
                    id: id(number),
                    duplicate: true,
                })
            }
            Ok(Enqueued::Full {
                tenant,
                depth,
                drained_per_sec,
                unfinished,
            }) => {
                inner.metrics.full.increment(1);
                let (bound, ahead) = if tenant {
                    // Lanes are first in, first out, and a tenant that reached its bound most
                    // likely holds the newest jobs: the other tenants' jobs drain first.
                    (
                        config.max_per_tenant.unwrap_or(depth),
                        unfinished.saturating_sub(depth),
                    )
                } else {
                    (inner.limits.max_len, 0)
                };
                let to_drain = ahead + depth.saturating_sub(bound) + 1;
                Err(EnqueueError::Full {
                    queue: inner.name.to_string(),
                    tenant,
                    depth,
                    retry_after: self.retry_after(to_drain, drained_per_sec),
                })
            }
            Ok(other) => Err(EnqueueError::Backend(BackendError::with_detail(
                headroom_core::BackendErrorKind::Protocol,
                format!("unknown enqueue answer {other:?}"),
            ))),
            Err(error) => {
                inner.metrics.store_errors.increment(1);
                Err(EnqueueError::Backend(error))
            }
        }
    }

    /// The time the partition's drain rate takes to finish `to_drain` jobs, plus up to half
    /// again of jitter, within the configured bounds.
    fn retry_after(&self, to_drain: u64, drained_per_sec: f64) -> Duration {
        let config = &self.inner.config;
        let wait = if drained_per_sec > 0.0 && drained_per_sec.is_finite() {
            Duration::try_from_secs_f64(to_drain as f64 / drained_per_sec)
                .unwrap_or(config.max_retry_after)
        } else {
            config.max_retry_after
        };
        // Up to half again at random, so the producers refused together do not all come back
        // at the same moment; past what a `Duration` holds, the longest.
        let jittered = wait.as_secs_f64() * (1.0 + fastrand::f64() / 2.0);
        Duration::try_from_secs_f64(jittered)
            .unwrap_or(Duration::MAX)
            .clamp(config.min_retry_after, config.max_retry_after)
    }

    /// The payload of the newest unfinished job enqueued with route `route` as its subject
    /// ([`Job::subject_of_its_route`], without a tenant), if any.
    pub(crate) async fn newest_of(&self, route: &[u8]) -> Result<Option<Bytes>, BackendError> {
        let inner = &self.inner;
        let partition = &inner.partitions[self.partition_of_route(route)];
        let Some((_, sealed)) = inner.store.newest_of(partition, route).await? else {
            return Ok(None);
        };
        envelope::open(&sealed)
            .map(|opened| Some(opened.payload))
            .ok_or_else(|| {
                BackendError::with_detail(
                    headroom_core::BackendErrorKind::Corrupt,
                    "the newest job of a route is not a sealed job",
                )
            })
    }

    /// The partition of the jobs with `route` and no tenant: one place for the rule, which
    /// [`newest_of`](Self::newest_of) relies on to find the partition a job was enqueued in.
    fn partition_of_route(&self, route: &[u8]) -> usize {
        match self.inner.partitions.len() {
            1 => 0,
            n => (hash(route) % n as u64) as usize,
        }
    }

    fn partition_for(&self, job: &Job) -> usize {
        let n = self.inner.partitions.len();
        if n == 1 {
            return 0;
        }
        let chosen = match (&job.tenant, &job.route, &job.idempotency_key) {
            (Some(tenant), _, _) => hash(tenant.as_bytes()),
            (None, Some(route), _) => return self.partition_of_route(route),
            (None, None, Some(key)) => hash(key.as_bytes()),
            (None, None, None) => self.inner.next_partition.fetch_add(1, Ordering::Relaxed) as u64,
        };
        (chosen % n as u64) as usize
    }

    /// What the store knows of job `id`; `None` if it never was, or its retention passed.
    ///
    /// Job ids are guessable: behind a public endpoint use [`status_for`](Self::status_for).
    pub async fn status(&self, id: JobId) -> Result<Option<JobStatus>, BackendError> {
        let Some(partition) = self.inner.partitions.get(usize::from(id.partition)) else {
            return Ok(None);
        };
        let record = self.inner.store.status(partition, id.number).await?;
        Ok(record.map(status_of))
    }

    /// What the store knows of job `id` if it was enqueued for `tenant`; `None` otherwise, so
    /// a status endpoint serving this never shows one tenant another's job (ids are numbers
    /// anyone can guess).
    pub async fn status_for(
        &self,
        tenant: &str,
        id: JobId,
    ) -> Result<Option<JobStatus>, BackendError> {
        let Some(partition) = self.inner.partitions.get(usize::from(id.partition)) else {
            return Ok(None);
        };
        let record = self.inner.store.status(partition, id.number).await?;
        Ok(record
            .filter(|record| record.tenant.as_deref() == Some(tenant.as_bytes()))
            .map(status_of))
    }

    /// The ids of up to `max` dead jobs, newest first within each partition.
    pub async fn dead_letters(&self, max: usize) -> Result<Vec<JobId>, BackendError> {
        let mut ids = Vec::new();
        for (p, partition) in self.inner.partitions.iter().enumerate() {
            if ids.len() >= max {
                break;
            }
            let numbers = self
                .inner
                .store
                .dead_letters(partition, max - ids.len())
                .await?;
            ids.extend(numbers.into_iter().map(|number| JobId {
                partition: p as u16,
                number,
            }));
        }
        Ok(ids)
    }

    /// The queue's counts, summed over its partitions (one store call per partition, made
    /// together). Fails if any partition cannot be read.
    pub async fn stats(&self) -> Result<QueueStats, BackendError> {
        let reading = self.read().await;
        match reading.error {
            Some(error) => Err(error),
            None => Ok(reading.stats),
        }
    }

    /// Reads the queue's counts and publishes them as metrics: what workers do every
    /// `stats_interval`.
    ///
    /// A partition that cannot be read (its Redis Cluster master out of reach) counts with
    /// its last reading, its oldest ready job ageing on (with nothing, before any reading),
    /// so that the gauges go on following the others. The gauges are published all the same,
    /// and the first failure is answered.
    pub async fn publish_stats(&self) -> Result<QueueStats, BackendError> {
        let reading = self.publish_reading().await;
        match reading.error {
            Some(error) => Err(error),
            None => Ok(reading.stats),
        }
    }

    /// [`publish_stats`](Self::publish_stats), answering each partition's reading.
    pub(crate) async fn publish_reading(&self) -> Reading {
        let reading = self.read().await;
        self.inner.metrics.publish(&reading.stats);
        reading
    }

    /// Reads every partition's counts at once: one partition out of reach (a timeout) does
    /// not hold back the others.
    async fn read(&self) -> Reading {
        let inner = &*self.inner;
        let answers = futures_util::future::join_all(
            inner
                .partitions
                .iter()
                .map(|partition| inner.store.stats(partition)),
        )
        .await;
        let mut last_read = inner
            .last_read
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut error = None;
        let partitions: Vec<Option<PartitionStats>> = answers
            .into_iter()
            .zip(last_read.iter_mut())
            .map(|(answer, last)| match answer {
                Ok(stats) => {
                    *last = Some(stats);
                    Some(stats)
                }
                Err(failed) => {
                    error.get_or_insert(failed);
                    None
                }
            })
            .collect();
        let mut total = QueueStats::default();
        let mut oldest: Option<u64> = None;
        for stats in last_read.iter().flatten() {
            total.unfinished += stats.unfinished;
            total.ready += stats.ready;
            total.running += stats.running;
            total.delayed += stats.delayed;
            total.dead += stats.dead;
            oldest = match (oldest, stats.oldest_ready_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        drop(last_read);
        total.oldest_ready_age =
            oldest.map(|ms| Duration::from_millis(inner.clock.unix_millis().saturating_sub(ms)));
        Reading {
            partitions,
            stats: total,
            error,
        }
    }
}

fn status_of(record: JobRecord) -> JobStatus {
    JobStatus {
        state: record.state,
        attempt: record.attempt,
        enqueued_at: UNIX_EPOCH + Duration::from_millis(record.enqueued_at_ms),
        result: record.result,
        error: record
            .error
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::scoped_key;

    /// No two scopes make the same bytes, whatever bytes their tenants, routes and keys hold:
    /// separators, lengths, the tags themselves.
    #[test]
    fn scoped_keys_of_different_scopes_or_keys_never_meet() {
        let tenants = [
            None,
            Some(""),
            Some("a"),
            Some("ab"),
            Some("\0"),
            Some("\u{1}a"),
            Some("\u{2}ab"),
        ];
        let routes: [Option<&[u8]>; 4] = [None, Some(b""), Some(b"\0"), Some(&[0xFE, 0xFF])];
        let keys = ["", "k", "b", "ab", "\0k", "\u{1}", "\u{2}ab", "a\0"];
        let mut seen = HashMap::new();
        for tenant in tenants {
            for route in routes {
                for key in keys {
                    let scoped = scoped_key(tenant, route, key);
                    // A tenant's key ignores the route: the tenant is its scope.
                    let scope = (tenant, if tenant.is_some() { None } else { route }, key);
                    if let Some(other) = seen.insert(scoped.clone(), scope) {
                        assert_eq!(other, scope, "two scopes make {scoped:?}");
                    }
                }
            }
        }
    }
}
