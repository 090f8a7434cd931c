//! Write-behind: writes acknowledged once durable in the job store, coalesced per key and
//! handed to a writer (a database) in batches, retried until it takes them.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use headroom_core::jobs::{Completion, Delivery, FetchRequest, JobStore};
use headroom_core::lease::Fenced;
use headroom_core::metrics::{Counter, Gauge};
use headroom_core::{BackendError, BackendErrorKind, Classify, Clock, Namespace};
use tokio::sync::watch;

use crate::config::InvalidConfig;
use crate::queue::JobQueue;
use crate::worker::{extension_due, may_pass};
use crate::{EnqueueError, Job, JobError, QueueConfig};

/// One write handed to the [`Writer`]: the latest of the writes to its key in the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Write {
    /// The key written.
    pub key: Bytes,
    /// The write's version: greater for a later write of the key (by this process's order,
    /// and across processes by their clocks, in microseconds). Apply a write only over an
    /// older version (`UPDATE .. WHERE version < $1`), since a batch retried after a failure
    /// can reach the writer after a later one written by another instance.
    pub version: u64,
    /// The value, or `None` for a delete.
    pub value: Option<Bytes>,
}

/// Where write-behind writes go: a database, another service.
///
/// `write` is called with the coalesced writes of one batch, each key once. An `Err` (or a
/// panic) keeps the whole batch and calls again after a backoff, in the same order, until it
/// succeeds; later writes of the same keys wait behind it. A fatal error
/// ([`JobError::fatal`]) says some write of the batch can never be written: the batch's writes
/// are then handed over one at a time, and each refused for good alone is buried as a dead
/// letter of the queue, with the error (and with it the earlier writes of its key that it
/// superseded in the batch).
pub trait Writer: Send + Sync + 'static {
    /// Writes `batch`.
    fn write(&self, batch: Vec<Write>) -> impl Future<Output = Result<(), JobError>> + Send;
}

impl<F, Fut> Writer for F
where
    F: Fn(Vec<Write>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), JobError>> + Send,
{
    fn write(&self, batch: Vec<Write>) -> impl Future<Output = Result<(), JobError>> + Send {
        self(batch)
    }
}

/// Write-behind settings.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct WriteBehindConfig {
    /// How often pending writes are handed to the writer (default 1 s): writes of one key
    /// within one interval reach the writer once per flusher, while a partition takes at
    /// most ten batches of writes per interval (a pass takes ten, the next follows at once).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub flush_interval: Duration,
    /// The most writes (after coalescing) per writer call, and per fetch from the store
    /// (default 1,000, at most 100,000).
    pub batch: usize,
    /// How long a batch may go unanswered before another instance takes it over (default
    /// 60 s); a live flusher extends it while its writer runs.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub visibility: Duration,
    /// The first wait after a failed writer call (default 100 ms), doubling after each.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub retry_initial: Duration,
    /// The longest wait between writer calls for one batch (default 30 s).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub retry_max: Duration,
}

impl Default for WriteBehindConfig {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_secs(1),
            batch: 1_000,
            visibility: Duration::from_secs(60),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(30),
        }
    }
}

impl WriteBehindConfig {
    /// Checks every setting.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if self.flush_interval < Duration::from_millis(1) {
            return Err(InvalidConfig::new(
                "flush_interval",
                "must be at least 1 ms",
            ));
        }
        // A pass holds up to ten batches in memory.
        if !(1..=100_000).contains(&self.batch) {
            return Err(InvalidConfig::new(
                "batch",
                "must be at least 1 and at most 100,000",
            ));
        }
        if self.visibility < Duration::from_millis(30) {
            return Err(InvalidConfig::new("visibility", "must be at least 30 ms"));
        }
        if self.retry_initial < Duration::from_millis(1) || self.retry_max < self.retry_initial {
            return Err(InvalidConfig::new(
                "retry_initial",
                "must be at least 1 ms and at most retry_max",
            ));
        }
        Ok(())
    }
}

/// Durable write-behind on a [`JobStore`]: [`put`](Self::put) and [`delete`](Self::delete)
/// answer once the write is in the store; a [`Flusher`] hands the writes to a [`Writer`].
///
/// Each write is a job routed by its key, so one key's writes stay in one partition, in
/// order. The queue's bound is the backlog of unwritten writes: past it, writes are refused
/// with [`EnqueueError::Full`] (backpressure on the writing path) rather than buffered without
/// end. With the Redis store, a crashed instance loses no acknowledged write: another
/// instance's flusher takes over its batch after the visibility timeout and writes it.
pub struct WriteBehind<S> {
    queue: JobQueue<S>,
    config: WriteBehindConfig,
    /// The last version given, when this handle keeps its own (on a manual clock); `None`
    /// shares the process's, [`LAST_VERSION`].
    own_last_version: Option<AtomicU64>,
    clock: Clock,
}

/// The last version given by any handle of the process on the system clock: two handles
/// writing one key must not give it equal versions, or a writer that applies versions drops
/// the later write.
static LAST_VERSION: AtomicU64 = AtomicU64::new(0);

impl<S> std::fmt::Debug for WriteBehind<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBehind")
            .field("queue", &self.queue.inner.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Builds a [`WriteBehind`].
#[derive(Debug)]
#[must_use]
pub struct WriteBehindBuilder<S> {
    name: String,
    store: S,
    queue: QueueConfig,
    config: WriteBehindConfig,
    namespace: Option<Namespace>,
    clock: Clock,
}

impl<S: JobStore> WriteBehindBuilder<S> {
    /// The settings of the queue holding unwritten writes (default: 100,000 writes, one
    /// partition; results kept one minute).
    pub fn queue(mut self, config: QueueConfig) -> Self {
        self.queue = config;
        self
    }

    /// The flush settings.
    pub fn config(mut self, config: WriteBehindConfig) -> Self {
        self.config = config;
        self
    }

    /// See [`WriteBehindConfig::flush_interval`].
    pub fn flush_interval(mut self, interval: Duration) -> Self {
        self.config.flush_interval = interval;
        self
    }

    /// The namespace of the queue's keys (default `headroom.jobs`).
    pub fn namespace(mut self, namespace: Namespace) -> Self {
        self.namespace = Some(namespace);
        self
    }

    /// The clock for versions and the lag (default: the system clock).
    ///
    /// On the system clock, versions keep increasing across every handle of the process. A
    /// handle on a manual clock stands for a process of its own (tests run many in one), so
    /// its versions keep increasing within the handle only.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Builds it, or names the setting that cannot work.
    pub fn build(self) -> Result<WriteBehind<S>, InvalidConfig> {
        self.config.validate()?;
        let mut queue = JobQueue::builder(self.name, self.store)
            .config(self.queue)
            .clock(self.clock.clone());
        if let Some(namespace) = self.namespace {
            queue = queue.namespace(namespace);
        }
        Ok(WriteBehind {
            queue: queue.build()?,
            config: self.config,
            own_last_version: self.clock.is_manual().then(|| AtomicU64::new(0)),
            clock: self.clock,
        })
    }
}

fn encode(version: u64, key: &[u8], value: Option<&[u8]>) -> Bytes {
    let mut out = BytesMut::with_capacity(13 + key.len() + value.map_or(0, <[u8]>::len));
    out.put_u64(version);
    out.put_u8(u8::from(value.is_some()));
    out.put_u32(key.len() as u32);
    out.put_slice(key);
    if let Some(value) = value {
        out.put_slice(value);
    }
    out.freeze()
}

fn decode(mut bytes: Bytes) -> Option<Write> {
    if bytes.len() < 13 {
        return None;
    }
    let version = bytes.get_u64();
    let has_value = match bytes.get_u8() {
        0 => false,
        1 => true,
        _ => return None,
    };
    let len = bytes.get_u32() as usize;
    if bytes.len() < len || (!has_value && bytes.len() != len) {
        return None;
    }
    let key = bytes.split_to(len);
    Some(Write {
        key,
        version,
        value: has_value.then_some(bytes),
    })
}

impl<S: JobStore> WriteBehind<S> {
    /// A builder for the write-behind `name` on `store`.
    pub fn builder(name: impl Into<String>, store: S) -> WriteBehindBuilder<S> {
        WriteBehindBuilder {
            name: name.into(),
            store,
            queue: QueueConfig {
                max_len: 100_000,
                result_retention: Duration::from_secs(60),
                ..QueueConfig::default()
            },
            config: WriteBehindConfig::default(),
            namespace: None,
            clock: Clock::system(),
        }
    }

    /// The clock writes are versioned by.
    #[cfg(feature = "cache")]
    pub(crate) fn clock(&self) -> Clock {
        self.clock.clone()
    }

    /// The queue holding the unwritten writes.
    pub fn queue(&self) -> &JobQueue<S> {
        &self.queue
    }

    /// Records that `key` now holds `value`; answers the write's version once the write is
    /// durable in the store.
    pub async fn put(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<u64, EnqueueError> {
        let value = value.into();
        self.record(key.into(), Some(&value)).await
    }

    /// Records that `key` was deleted; answers the write's version once durable.
    pub async fn delete(&self, key: impl Into<Bytes>) -> Result<u64, EnqueueError> {
        self.record(key.into(), None).await
    }

    async fn record(&self, key: Bytes, value: Option<&[u8]>) -> Result<u64, EnqueueError> {
        let micros = self.clock.unix_micros();
        let versions = self.own_last_version.as_ref().unwrap_or(&LAST_VERSION);
        let version = versions
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(micros.max(last + 1))
            })
            .map_or(micros, |last| micros.max(last + 1));
        let payload = encode(version, &key, value);
        // Ranked by version: the pending write of a key is the one the writer keeps.
        let job = Job::new(payload).route(key).subject_of_its_route(version);
        self.queue.enqueue(job).await?;
        Ok(version)
    }

    /// The newest write (the highest version) recorded for `key` while the writer does not
    /// have it yet: from `put` or `delete` until the writer took it (or refused it for good).
    /// `None` when the writer has the key's newest write, or none was recorded.
    ///
    /// A read that misses the cache asks this before the source, which lacks the write
    /// until the flush (`WriteBehindCache::get_or_load`, feature `cache`).
    pub async fn pending(&self, key: &[u8]) -> Result<Option<Write>, BackendError> {
        let Some(payload) = self.queue.newest_of(key).await? else {
            return Ok(None);
        };
        decode(payload)
            .filter(|write| write.key == key)
            .map(Some)
            .ok_or_else(|| {
                BackendError::with_detail(
                    BackendErrorKind::Corrupt,
                    "the newest write of a key is not a write-behind record",
                )
            })
    }

    /// Starts handing the writes to `writer`, on the current tokio runtime. Run one flusher
    /// per instance: together they drain every partition.
    pub fn start<W: Writer>(&self, writer: W) -> Flusher {
        self.start_flusher(writer, None)
    }

    /// [`start`](Self::start), calling `on_dead` with each write refused for good once it
    /// is buried.
    pub(crate) fn start_flusher<W: Writer>(&self, writer: W, on_dead: Option<OnDead>) -> Flusher {
        let (phase, watch_phase) = watch::channel(Phase::Running);
        let name = self.queue.inner.name.clone();
        let shared = Arc::new(FlushShared {
            queue: self.queue.clone(),
            config: self.config.clone(),
            writer,
            on_dead,
            consumer: format!("{}-{:016x}", std::process::id(), fastrand::u64(..)),
            metrics: FlushMetrics::new(&name),
            oldest_held_ms: AtomicU64::new(0),
            tally: Arc::default(),
        });
        let tally = Arc::clone(&shared.tally);
        let task = tokio::spawn(flush_loop(shared, watch_phase));
        Flusher {
            phase,
            task,
            tally,
            hand_back_budget: self.config.visibility / 2,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Running,
    Draining,
    Abort,
}

/// What a flusher handed to its writer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlushReport {
    /// Writer calls that succeeded.
    pub calls: u64,
    /// Writes handed over in them, after coalescing.
    pub writes: u64,
    /// Writes recorded and superseded by a later write of their key in the same batch.
    pub coalesced: u64,
    /// Writer calls that failed (made again, or refused for good with a fatal error).
    pub failures: u64,
    /// Writes the flusher let go of neither written nor handed back: those it held when its
    /// shutdown's bound ran out (a writer that blocked its thread), and those whose hand-back
    /// the store refused. Another flusher takes them over once their visibility runs out.
    pub abandoned: u64,
}

/// A flusher's counts, shared so that a shutdown can report them without its flush loop.
#[derive(Debug, Default)]
struct FlushTally {
    calls: AtomicU64,
    writes: AtomicU64,
    coalesced: AtomicU64,
    failures: AtomicU64,
    /// The deliveries in hand: fetched and neither written, handed back nor buried.
    held: AtomicU64,
    /// Deliveries let go of unwritten, their hand-back refused by the store.
    abandoned: AtomicU64,
}

impl FlushTally {
    fn report(&self) -> FlushReport {
        FlushReport {
            calls: self.calls.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            coalesced: self.coalesced.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            abandoned: self.abandoned.load(Ordering::Relaxed),
        }
    }
}

/// A running flusher. Dropping it stops it after the batch in hand; [`shutdown`](Self::shutdown)
/// first flushes every pending write it can reach.
#[derive(Debug)]
pub struct Flusher {
    phase: watch::Sender<Phase>,
    task: tokio::task::JoinHandle<()>,
    tally: Arc<FlushTally>,
    hand_back_budget: Duration,
}

impl Flusher {
    /// Flushes now: hands every pending write that is ready to the writer, then stops. Waits
    /// up to `grace`; a batch whose writer has not answered by then is handed back to the
    /// store for another instance.
    ///
    /// Returns within `grace` plus half the visibility (the hand-back's budget), even when
    /// the writer blocks its thread: the writes it holds then are counted in
    /// [`FlushReport::abandoned`] and taken over by another flusher after their visibility.
    /// Such a writer, once it returns, still completes its writes (fencing rejects them if
    /// they were taken over; versions make a second write harmless).
    pub async fn shutdown(self, grace: Duration) -> FlushReport {
        let Self {
            phase,
            mut task,
            tally,
            hand_back_budget,
        } = self;
        let started = tokio::time::Instant::now();
        // Saturating: a grace of `Duration::MAX` waits without end rather than overflow.
        let bound = grace.saturating_add(hand_back_budget);
        phase.send_replace(Phase::Draining);
        let ended = match tokio::time::timeout(grace, &mut task).await {
            Ok(ended) => Some(ended),
            Err(_) => {
                phase.send_replace(Phase::Abort);
                let left = bound.saturating_sub(started.elapsed());
                tokio::time::timeout(left, &mut task).await.ok()
            }
        };
        let mut report = tally.report();
        match ended {
            Some(Ok(())) => {}
            Some(Err(error)) => tracing::error!(%error, "the flush loop panicked"),
            None => {
                task.abort();
                report.abandoned += tally.held.load(Ordering::Relaxed);
                tracing::warn!(
                    abandoned = report.abandoned,
                    "the flusher stopped with writes it could not write nor hand back; another flusher takes them over after their visibility"
                );
            }
        }
        report
    }
}

/// What a flusher does with a write refused for good, after burying it.
pub(crate) type OnDead = Box<dyn Fn(Write) -> BoxFuture<'static, ()> + Send + Sync>;

/// Refused writes taken out of a cache at once, after a pass.
const REMOVALS_IN_FLIGHT: usize = 64;

struct FlushShared<S, W> {
    queue: JobQueue<S>,
    config: WriteBehindConfig,
    writer: W,
    on_dead: Option<OnDead>,
    consumer: String,
    metrics: FlushMetrics,
    /// When the oldest write of the batch in hand was recorded (Unix ms), 0 when none is.
    oldest_held_ms: AtomicU64,
    tally: Arc<FlushTally>,
}

struct FlushMetrics {
    calls: Counter,
    writes: Counter,
    coalesced: Counter,
    failures: Counter,
    lag: Gauge,
}

impl FlushMetrics {
    fn new(name: &str) -> Self {
        Self {
            calls: headroom_core::counter!("headroom_jobs_write_behind_calls_total", "queue" => name.to_owned()),
            writes: headroom_core::counter!("headroom_jobs_write_behind_writes_total", "queue" => name.to_owned()),
            coalesced: headroom_core::counter!("headroom_jobs_write_behind_coalesced_total", "queue" => name.to_owned()),
            failures: headroom_core::counter!("headroom_jobs_write_behind_failures_total", "queue" => name.to_owned()),
            lag: headroom_core::gauge!("headroom_jobs_write_behind_lag_seconds", "queue" => name.to_owned()),
        }
    }
}

fn phase_is(phase: &watch::Receiver<Phase>, wanted: Phase) -> bool {
    *phase.borrow() == wanted
}

async fn flush_loop<S: JobStore, W: Writer>(
    shared: Arc<FlushShared<S, W>>,
    mut phase: watch::Receiver<Phase>,
) {
    let partitions = shared.queue.inner.partitions.len();
    // On its own timer: a pass can be stuck on a failing writer for as long as it fails.
    let lag = tokio::spawn(publish_lag_every(Arc::clone(&shared)));
    let _lag = crate::worker::AbortOnDrop(lag);
    // Kept per partition: on a Redis Cluster each partition is on its own node, and one out
    // of reach (failing over) must not hold back the passes over the others.
    let initial = shared.config.flush_interval;
    let mut flushes: Vec<PartitionFlushes> = (0..partitions)
        .map(|_| PartitionFlushes::new(initial))
        .collect();
    let max_backoff = initial.max((shared.config.visibility / 10).min(MAX_FLUSH_BACKOFF));
    loop {
        let draining = !phase_is(&phase, Phase::Running);
        // One pass of every partition in turn, round after round while any had more: a
        // backlog in one partition holds back no other's writes, even those made meanwhile.
        // A partition out of reach is left out meanwhile rather than cost each round a timeout.
        let mut more = true;
        let mut pause = shared.config.retry_initial;
        while more && !phase_is(&phase, Phase::Abort) {
            more = false;
            let mut failed = false;
            for (p, partition) in flushes.iter_mut().enumerate() {
                // Draining, every partition is tried: the grace bounds the shutdown.
                if !draining && !partition.takes_turn() {
                    continue;
                }
                let answered = match drain_partition(&shared, p, &mut partition.lost, &mut phase)
                    .await
                {
                    Ok(drained) => {
                        more |= drained.more;
                        drained.answered
                    }
                    Err(error) => {
                        failed = true;
                        shared.queue.inner.metrics.store_errors.increment(1);
                        tracing::warn!(queue = %shared.queue.inner.name, partition = p, %error, "fetching writes failed");
                        // An error no retry cures came from a node that answered: the
                        // partition is in reach, and tried again at the next interval.
                        !error.is_retryable()
                    }
                };
                if answered {
                    partition.backoff = initial;
                } else if !draining {
                    partition.leave_out(&shared, p, max_backoff);
                }
                if phase_is(&phase, Phase::Abort) {
                    break;
                }
            }
            // Draining, a fetch that failed is tried again until the grace ends: the writes it
            // missed would otherwise wait for another instance (or, in memory, be lost).
            if failed && draining {
                more = true;
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = aborted(&mut phase) => {}
                }
                pause = pause.saturating_mul(2).min(shared.config.retry_max);
            }
        }
        if draining || phase_is(&phase, Phase::Abort) {
            return;
        }
        // The phase as it is now counts: a shutdown seen during the pass (while the writer
        // was busy) starts the draining pass at once.
        let stop = async {
            if phase.wait_for(|now| *now != Phase::Running).await.is_err() {
                // The flusher was dropped: stop after this pass.
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = stop => {}
            () = tokio::time::sleep(shared.config.flush_interval) => {}
        }
        if phase.has_changed().is_err() {
            return;
        }
    }
}

/// The longest a flusher leaves a partition out of its rounds after its calls kept failing,
/// as a worker leaves it unfetched.
const MAX_FLUSH_BACKOFF: Duration = Duration::from_secs(5);

/// How a flusher stands with one partition.
struct PartitionFlushes {
    /// A fetch that failed after the store may have run it (only its answer lost): its token
    /// and when it was sent. Its writes are taken back at the partition's next pass.
    lost: Option<(u64, tokio::time::Instant)>,
    /// After a failed call, asks the partition's node again beside the rounds, which leave
    /// the partition out until it answers: each call there may take the store's timeout.
    probe: Option<Probe>,
    /// How long the partition is left alone after its next failed call.
    backoff: Duration,
}

impl PartitionFlushes {
    fn new(backoff: Duration) -> Self {
        Self {
            lost: None,
            probe: None,
            backoff,
        }
    }

    /// Whether the partition takes its turn in this round: unless a call to it failed and
    /// its node has not answered since.
    fn takes_turn(&mut self) -> bool {
        use futures_util::FutureExt;
        let Some(probe) = &mut self.probe else {
            return true;
        };
        if !probe.0.is_finished() {
            return false;
        }
        // A probe that panicked says nothing of the node: the partition's own calls tell.
        if let Some(Ok(backoff)) = (&mut probe.0).now_or_never() {
            self.backoff = backoff;
        }
        self.probe = None;
        true
    }

    /// A call to partition `p` failed: it is left out of the rounds until its node answers
    /// again, asked after a backoff that doubles, up to `max_backoff`, after each failure in
    /// a row, as a worker's fetches are.
    fn leave_out<S: JobStore, W: Writer>(
        &mut self,
        shared: &Arc<FlushShared<S, W>>,
        p: usize,
        max_backoff: Duration,
    ) {
        let shared = Arc::clone(shared);
        let mut backoff = self.backoff;
        self.probe = Some(Probe(tokio::spawn(async move {
            let queue = &shared.queue.inner;
            loop {
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2).min(max_backoff);
                // The recovery of a fetch never made: the kind of call that failed, on the
                // partition's node, answering nothing, so that no write waits in the probe. (A
                // store without tokens answers it unasked: the partition is then tried in the
                // rounds after each backoff, as a worker tries it.)
                let token = fastrand::u64(1..);
                match queue
                    .store
                    .recover(&queue.partitions[p], &shared.consumer, token, 1)
                    .await
                {
                    Err(error) if error.is_retryable() => {
                        queue.metrics.store_errors.increment(1);
                        tracing::debug!(queue = %queue.name, partition = p, %error, retry_in = ?backoff, "the partition is still out of reach");
                    }
                    // Answered, even with an error: the node is back, and the partition's
                    // own calls tell the rest.
                    _ => return backoff,
                }
            }
        })));
    }
}

/// A partition's probe, stopped with the flush loop; it answers the partition's next backoff.
struct Probe(tokio::task::JoinHandle<Duration>);

impl Drop for Probe {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Returns once the flusher is told to abort; never if it was dropped.
async fn aborted(phase: &mut watch::Receiver<Phase>) {
    while !phase_is(phase, Phase::Abort) {
        if phase.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Publishes the lag every flush interval (at most every second): how long the oldest write
/// not yet written has waited, whether it waits in the store or in the batch in hand.
///
/// A partition that cannot be read may hold writes recorded since its last reading: its part
/// grows from that reading, from the age of the oldest write it found, or from the reading
/// itself when it found none, since a write acknowledged just after it waits there unseen.
/// Before any reading (an instance restarting during an outage) it grows from the flusher's
/// start. So an outage shows on the gauge even when the last reading found nothing.
async fn publish_lag_every<S: JobStore, W: Send + Sync + 'static>(shared: Arc<FlushShared<S, W>>) {
    let every = shared.config.flush_interval.min(Duration::from_secs(1));
    let queue = &shared.queue.inner;
    // Per partition: the age of its oldest ready write at its last reading, and when that was.
    let mut last_read = vec![(Duration::ZERO, tokio::time::Instant::now()); queue.partitions.len()];
    loop {
        let reading = shared.queue.publish_reading().await;
        if reading.error.is_some() {
            queue.metrics.store_errors.increment(1);
        }
        let now_ms = queue.clock.unix_millis();
        let mut ready = Duration::ZERO;
        for (read, last) in reading.partitions.iter().zip(&mut last_read) {
            let age = match read {
                Some(stats) => {
                    let age = stats.oldest_ready_ms.map_or(Duration::ZERO, |ms| {
                        Duration::from_millis(now_ms.saturating_sub(ms))
                    });
                    *last = (age, tokio::time::Instant::now());
                    age
                }
                None => last.0 + last.1.elapsed(),
            };
            ready = ready.max(age);
        }
        let held = match shared.oldest_held_ms.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            ms => Duration::from_millis(now_ms.saturating_sub(ms)),
        };
        shared.metrics.lag.set(ready.max(held).as_secs_f64());
        tokio::time::sleep(every).await;
    }
}

/// Takes the writes ready in partition `p` (up to ten batches), coalesces them per key (the
/// highest version wins), and hands them to the writer in chunks of `batch` keys, in order,
/// each until the writer takes it; first, the writes of the partition's `lost` fetch, if one's
/// answer was lost. Fails when it fetched nothing for a failed call.
async fn drain_partition<S: JobStore, W: Writer>(
    shared: &FlushShared<S, W>,
    p: usize,
    lost: &mut Option<(u64, tokio::time::Instant)>,
    phase: &mut watch::Receiver<Phase>,
) -> Result<Drained, BackendError> {
    let queue = &shared.queue.inner;
    let key = &queue.partitions[p];
    let config = &shared.config;
    let mut deliveries = Vec::new();
    let mut more = false;
    let mut answered = true;
    // The store holds the pass's writes from about now: their extensions count from it.
    let fetched = tokio::time::Instant::now();
    if let Some((token, sent)) = *lost {
        match queue
            .store
            .recover(key, &shared.consumer, token, config.batch)
            .await
        {
            Ok(recovered) => {
                *lost = None;
                deliveries = recovered;
            }
            // Tried again at the next pass while the store is out of reach and its writes
            // may still be held; refused, or after that, they are taken over as before.
            Err(error) if error.is_retryable() && sent.elapsed() < config.visibility => {
                return Err(error);
            }
            Err(error) => {
                *lost = None;
                return Err(error);
            }
        }
    }
    loop {
        let request = FetchRequest {
            consumer: &shared.consumer,
            lanes: &[0],
            max: config.batch,
            visibility: config.visibility,
        };
        let token = fastrand::u64(1..);
        let sent = tokio::time::Instant::now();
        let fetched = match queue.store.fetch_marked(key, request, token).await {
            Ok(fetched) => fetched,
            // The store may have run it: its writes are taken back at the next pass rather
            // than left to wait out their visibility.
            Err(error) if deliveries.is_empty() => {
                *lost = may_pass(&error).then_some((token, sent));
                return Err(error);
            }
            // Write what is in hand now: left held, it would reach the writer only after its
            // visibility, behind later writes of the same keys.
            Err(error) => {
                queue.metrics.store_errors.increment(1);
                tracing::warn!(queue = %queue.name, partition = p, %error, "fetching more writes failed");
                *lost = may_pass(&error).then_some((token, sent));
                answered = !error.is_retryable();
                break;
            }
        };
        more = fetched.len() >= config.batch;
        deliveries.extend(fetched);
        // A pass holds at most ten batches, so it ends (and completes them) well within
        // their visibility; the rest wait for the next pass, which follows at once.
        if !more || deliveries.len() >= 10 * config.batch || phase_is(phase, Phase::Abort) {
            break;
        }
    }
    if deliveries.is_empty() {
        return Ok(Drained {
            more: false,
            answered,
        });
    }
    let oldest = deliveries
        .iter()
        .map(|d| d.enqueued_at_ms.max(1))
        .min()
        .unwrap_or(0);
    shared.oldest_held_ms.store(oldest, Ordering::Relaxed);
    let tally = &shared.tally;
    tally.held.store(deliveries.len() as u64, Ordering::Relaxed);
    let mut latest: HashMap<Bytes, (u64, u64, usize)> = HashMap::new();
    let mut writes: Vec<Write> = Vec::new();
    let mut in_hand = InHand {
        per_write: Vec::new(),
        tally,
    };
    // Corrupt writes are buried: no longer this pass's to extend, complete or hand back.
    let (mut kept, mut corrupt) = (Vec::with_capacity(deliveries.len()), Vec::new());
    // The write each kept delivery is coalesced into, in the same order.
    let mut kept_writes = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        let Some(write) =
            crate::envelope::open(&delivery.payload).and_then(|opened| decode(opened.payload))
        else {
            corrupt.push(delivery);
            continue;
        };
        let rank = (write.version, delivery.number);
        match latest.get_mut(&write.key) {
            Some((version, number, index)) => {
                if rank > (*version, *number) {
                    (*version, *number) = rank;
                    writes[*index] = write;
                }
                kept_writes.push(*index);
                *in_hand.per_write[*index].get_mut() += 1;
            }
            None => {
                latest.insert(write.key.clone(), (rank.0, rank.1, writes.len()));
                kept_writes.push(writes.len());
                writes.push(write);
                in_hand.per_write.push(AtomicU64::new(1));
            }
        }
        kept.push(delivery);
    }
    let deliveries = kept;
    for delivery in corrupt {
        let error = Bytes::from_static(
            b"the stored write is not a write-behind record (corrupt or foreign bytes)",
        );
        tracing::warn!(queue = %queue.name, job.number = delivery.number, "a corrupt write is dead");
        bury(queue, key, &delivery, error).await;
        tally.held.fetch_sub(1, Ordering::Relaxed);
    }
    let handed = writes.len() as u64;
    let coalesced = (deliveries.len() - writes.len()) as u64;
    let refused = if writes.is_empty() {
        Some(Vec::new())
    } else {
        tokio::select! {
            refused = write_chunks(shared, &writes, &in_hand) => Some(refused),
            () = extend_all(&queue.store, key, &deliveries, fetched, config.visibility) => None,
            () = aborted(phase) => None,
        }
    };
    let written = refused.is_some();
    let mut refused_writes = Vec::new();
    if let Some(refused) = refused {
        // A write refused for good is dead, and so are the writes of its key it superseded
        // in this pass: none of them was written. Each is buried with the writer's error.
        let handed = handed - refused.len() as u64;
        let (dead_writes, dead): (Vec<Write>, HashMap<Bytes, String>) = refused
            .into_iter()
            .map(|(write, error)| (write.clone(), (write.key, error)))
            .unzip();
        tally.writes.fetch_add(handed, Ordering::Relaxed);
        tally.coalesced.fetch_add(coalesced, Ordering::Relaxed);
        shared.metrics.writes.increment(handed);
        shared.metrics.coalesced.increment(coalesced);
        let is_dead = |i: usize| dead.contains_key(&writes[kept_writes[i]].key);
        for (i, delivery) in deliveries.iter().enumerate().filter(|&(i, _)| is_dead(i)) {
            let error = &dead[&writes[kept_writes[i]].key];
            tracing::warn!(queue = %queue.name, job.number = delivery.number, error, "the writer refused a write for good; it is dead");
            bury(
                queue,
                key,
                delivery,
                Bytes::copy_from_slice(error.as_bytes()),
            )
            .await;
            in_hand.let_go(kept_writes[i]);
        }
        // All in one step (one round trip on Redis). A write left uncompleted (the store
        // failed) is delivered again and written again: versions make that harmless.
        let done: Vec<Completion> = deliveries
            .iter()
            .enumerate()
            .filter(|&(i, _)| !is_dead(i))
            .map(|(_, delivery)| Completion {
                number: delivery.number,
                attempt: delivery.attempt,
                result: Bytes::new(),
            })
            .collect();
        let _ = queue
            .store
            .complete_many(key, &done, queue.config.result_retention)
            .await;
        refused_writes = dead_writes;
    } else {
        // Shut down, or taken over: hand back what is still ours, for the next flusher. A
        // write whose chunk was written is written again: versions make that harmless. Many
        // at once: one after the other, ten batches could outlast the shutdown's budget.
        let in_hand = &in_hand;
        let refused = AtomicU64::new(0);
        futures_util::stream::iter(deliveries.iter().zip(&kept_writes))
            .for_each_concurrent(RELEASES_IN_FLIGHT, |(delivery, &write)| {
                let refused = &refused;
                async move {
                    let released = queue
                        .store
                        .release(
                            key,
                            delivery.number,
                            delivery.attempt,
                            Bytes::from_static(b"handed back"),
                        )
                        .await;
                    match released {
                        // Handed back, or taken over meanwhile: its new holder has it.
                        Ok(_) => {
                            in_hand.let_go(write);
                        }
                        // Still held by this flusher, which lets it go: unless written, it
                        // waits out its visibility.
                        Err(_) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            in_hand.abandon(write);
                        }
                    }
                }
            })
            .await;
        let refused = refused.into_inner();
        if refused > 0 {
            queue.metrics.store_errors.increment(refused);
            tracing::warn!(queue = %queue.name, refused, "the store refused to take writes back; another flusher takes over the unwritten ones after their visibility");
        }
    }
    shared.oldest_held_ms.store(0, Ordering::Relaxed);
    tally.held.store(0, Ordering::Relaxed);
    // Once the pass's writes are finished, so that a slow cache holds none of them back; a
    // shutdown out of time leaves the rest in the cache until their TTL.
    if let Some(on_dead) = &shared.on_dead
        && !refused_writes.is_empty()
    {
        let removals = futures_util::stream::iter(refused_writes)
            .for_each_concurrent(REMOVALS_IN_FLIGHT, on_dead);
        tokio::select! {
            () = removals => {}
            () = aborted(phase) => {
                tracing::warn!(queue = %queue.name, "shut down before every refused write was taken out of the cache");
            }
        }
    }
    Ok(Drained {
        more: more && written,
        answered,
    })
}

/// What a pass over a partition found.
struct Drained {
    /// More writes may be ready.
    more: bool,
    /// Every call to the partition was answered.
    answered: bool,
}

/// Makes `delivery` of partition `key` a dead letter with `error`, kept for the queue's dead
/// retention, and counts it dead once it is one, as a worker counts its dead jobs. A store
/// that fails leaves it held, to be delivered again and buried (and counted) then.
async fn bury<S: JobStore>(
    queue: &crate::queue::QueueInner<S>,
    key: &headroom_core::Key,
    delivery: &Delivery,
    error: Bytes,
) {
    let buried = queue
        .store
        .bury(
            key,
            delivery.number,
            delivery.attempt,
            error,
            queue.config.dead_retention,
        )
        .await;
    match buried {
        Ok(Fenced::Applied) => queue.metrics.dead.increment(1),
        // Taken over meanwhile: its new holder writes or buries it.
        Ok(_) => {}
        Err(error) => {
            queue.metrics.store_errors.increment(1);
            tracing::warn!(queue = %queue.name, job.number = delivery.number, %error, "burying a dead write failed; it is delivered again");
        }
    }
}

/// The deliveries of a pass in hand, neither written, handed back nor buried: per write they
/// were coalesced into, and in all (the flusher's tally, which a shutdown out of time reports
/// as abandoned).
struct InHand<'t> {
    per_write: Vec<AtomicU64>,
    tally: &'t FlushTally,
}

impl InHand<'_> {
    /// The writer took write `i`: its deliveries are written.
    fn written(&self, i: usize) {
        let deliveries = self.per_write[i].swap(0, Ordering::Relaxed);
        self.tally.held.fetch_sub(deliveries, Ordering::Relaxed);
    }

    /// A delivery of write `i` was handed back or buried; one already written was counted
    /// then. Answers whether it was unwritten.
    fn let_go(&self, i: usize) -> bool {
        let unwritten = self.per_write[i]
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if unwritten {
            self.tally.held.fetch_sub(1, Ordering::Relaxed);
        }
        unwritten
    }

    /// A delivery of write `i` is let go of though the store refused to take it back: unless
    /// written, it is abandoned.
    fn abandon(&self, i: usize) {
        if self.let_go(i) {
            self.tally.abandoned.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A write the writer refused for good, and the writer's message.
type Refused = (Write, String);

/// Hands `writes` to the writer in chunks of `batch`, in order, each until it is taken;
/// answers the writes refused for good.
async fn write_chunks<S, W: Writer>(
    shared: &FlushShared<S, W>,
    writes: &[Write],
    in_hand: &InHand<'_>,
) -> Vec<Refused> {
    let mut refused = Vec::new();
    for (n, chunk) in writes.chunks(shared.config.batch).enumerate() {
        let start = n * shared.config.batch;
        match write_until_taken(shared, chunk.to_vec()).await {
            Ok(()) => (start..start + chunk.len()).for_each(|i| in_hand.written(i)),
            // Some write of the chunk can never be written: find which, one at a time.
            Err(error) if chunk.len() == 1 => refused.push((chunk[0].clone(), error)),
            Err(_) => {
                for (i, write) in (start..).zip(chunk) {
                    match write_until_taken(shared, vec![write.clone()]).await {
                        Ok(()) => in_hand.written(i),
                        Err(error) => refused.push((write.clone(), error)),
                    }
                }
            }
        }
    }
    refused
}

/// Calls the writer until it takes `writes`, backing off between calls, or until it
/// refuses them for good (a fatal [`JobError`]), answering its message.
async fn write_until_taken<S, W: Writer>(
    shared: &FlushShared<S, W>,
    writes: Vec<Write>,
) -> Result<(), String> {
    use futures_util::FutureExt;
    let mut pause = shared.config.retry_initial;
    loop {
        // The call is made inside the caught future: a writer may panic while making its
        // future as well as while running it.
        let call =
            std::panic::AssertUnwindSafe(async { shared.writer.write(writes.clone()).await })
                .catch_unwind();
        let (error, again) = match call.await {
            Ok(Ok(())) => {
                shared.tally.calls.fetch_add(1, Ordering::Relaxed);
                shared.metrics.calls.increment(1);
                return Ok(());
            }
            Ok(Err(error)) => (error.message().to_owned(), error.is_retryable()),
            Err(_) => ("the writer panicked".to_owned(), true),
        };
        shared.tally.failures.fetch_add(1, Ordering::Relaxed);
        shared.metrics.failures.increment(1);
        if !again {
            return Err(error);
        }
        tracing::warn!(queue = %shared.queue.inner.name, error, retry_in = ?pause, "the writer failed; the batch waits");
        tokio::time::sleep(pause).await;
        pause = pause.saturating_mul(2).min(shared.config.retry_max);
    }
}

/// Hand-backs of one pass in flight at once: a pass holds up to ten batches, which one after
/// the other could outlast a shutdown's budget of half the visibility.
const RELEASES_IN_FLIGHT: usize = 64;

/// Extensions of one pass in flight at once: a pass holds up to ten batches, which one after
/// the other could take longer than their visibility.
const EXTENSIONS_IN_FLIGHT: usize = 64;

/// Extends the deliveries of a pass, fetched from `fetched` on, as a worker extends a job it
/// holds (see [`extension_due`]): all of them a third of the visibility after the last round
/// over all of them, and those whose extension failed in a way a retry may cure (the store out
/// of reach, or refusing writes for a while) again sooner.
/// Returns when one was taken over.
async fn extend_all<S: JobStore>(
    store: &S,
    key: &headroom_core::Key,
    deliveries: &[Delivery],
    fetched: tokio::time::Instant,
    visibility: Duration,
) {
    use futures_util::StreamExt;
    use futures_util::stream::FuturesUnordered;
    // When the last round over all of them, and the last round, began.
    let (mut all_began, mut began) = (fetched, fetched);
    let mut failed = Vec::new();
    loop {
        let all_due = extension_due(all_began, visibility, false);
        let due = if failed.is_empty() {
            all_due
        } else {
            [all_due, extension_due(began, visibility, true)]
                .into_iter()
                .flatten()
                .min()
        };
        match due {
            Some(due) => tokio::time::sleep_until(due).await,
            None => std::future::pending().await,
        }
        began = tokio::time::Instant::now();
        let these: Vec<&Delivery> = if all_due.is_some_and(|due| began >= due) {
            all_began = began;
            deliveries.iter().collect()
        } else {
            std::mem::take(&mut failed)
        };
        failed.clear();
        let (mut waiting, mut extensions) = (these.into_iter(), FuturesUnordered::new());
        loop {
            while extensions.len() < EXTENSIONS_IN_FLIGHT
                && let Some(delivery) = waiting.next()
            {
                extensions.push(async move {
                    (
                        delivery,
                        store.extend(key, delivery.number, delivery.attempt).await,
                    )
                });
            }
            match extensions.next().await {
                Some((_, Ok(headroom_core::lease::Fenced::Rejected))) => return,
                Some((delivery, Err(error))) if may_pass(&error) => {
                    failed.push(delivery);
                }
                Some(_) => {}
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_out_of_bounds_is_a_typed_error() {
        for batch in [0, 100_001, usize::MAX] {
            let config = WriteBehindConfig {
                batch,
                ..WriteBehindConfig::default()
            };
            assert_eq!(config.validate().unwrap_err().field(), "batch");
        }
    }

    #[test]
    fn writes_round_trip_and_foreign_bytes_do_not_decode() {
        for (key, value) in [
            (&b"k"[..], Some(&b"v"[..])),
            (b"user:7", None),
            (b"", Some(b"")),
        ] {
            let write = decode(encode(42, key, value)).expect("a write");
            assert_eq!(
                (&write.key[..], write.version, write.value.as_deref()),
                (key, 42, value)
            );
        }
        for bytes in [
            &b""[..],
            &[0; 12],
            &[0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0],
            &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 9, 1],
        ] {
            assert_eq!(decode(Bytes::copy_from_slice(bytes)), None, "{bytes:?}");
        }
    }
}
