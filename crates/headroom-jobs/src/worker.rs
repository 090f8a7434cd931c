use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use headroom_core::jobs::{Completion, Delivery, FetchRequest, JobState, JobStore};
use headroom_core::lease::Fenced;
use headroom_core::{BackendError, BackendErrorKind, Classify, Key};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::config::{InvalidConfig, WorkerConfig};
use crate::queue::{JobQueue, QueueInner};
use crate::{JobError, JobId, envelope};

/// A job handed to a handler.
#[derive(Clone, Debug)]
pub struct JobContext {
    queue: Arc<str>,
    id: JobId,
    nonce: Option<u64>,
    attempt: u32,
    lane: u8,
    payload: Bytes,
    tenant: Option<String>,
    origin: Option<String>,
    enqueued_at: SystemTime,
    taken_over: bool,
}

impl JobContext {
    /// The job's id, numbered per queue: a queue of another name on the same store, or a
    /// store that numbers jobs again (a new memory store, Redis data lost), gives the same ids
    /// to other jobs. Key the job's effect by [`idempotency_key`](Self::idempotency_key).
    pub fn id(&self) -> JobId {
        self.id
    }

    /// The key to run the job's effect under (with `headroom-idempotency`), so that a second
    /// delivery replays instead of running again: the queue's name, the job's id and either
    /// the number the job drew at random on enqueue
    /// ([`QueueConfig::job_nonces`](crate::QueueConfig::job_nonces)), which no other job of
    /// any queue or store shares, or else its enqueue time (store clock, ms), which tells
    /// apart the jobs of queues of one store and of a store that numbers jobs again, but not
    /// those of two stores with a queue of the same name enqueued in the same millisecond.
    pub fn idempotency_key(&self) -> String {
        match self.nonce {
            Some(nonce) => format!("{}/{}/{nonce:016x}", self.queue, self.id),
            None => {
                let enqueued_ms = self
                    .enqueued_at
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |since| since.as_millis());
                format!("{}/{}/{enqueued_ms}", self.queue, self.id)
            }
        }
    }

    /// Which attempt this is, from 1. Deliveries a stopping worker handed back before their
    /// handler started are not counted; a job it cut off mid-run is (its effect may have
    /// begun), and so is a takeover after a worker died or stalled.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The job's priority lane.
    pub fn lane(&self) -> u8 {
        self.lane
    }

    /// The payload given on enqueue.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The tenant given on enqueue.
    pub fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    /// The origin given on enqueue (a `traceparent`, a request id).
    pub fn origin(&self) -> Option<&str> {
        self.origin.as_deref()
    }

    /// When the job was enqueued (store clock).
    pub fn enqueued_at(&self) -> SystemTime {
        self.enqueued_at
    }

    /// Whether an earlier delivery ended without an answer (its worker died or stalled past
    /// the visibility timeout) and this worker took the job over.
    pub fn taken_over(&self) -> bool {
        self.taken_over
    }
}

/// What a worker did between its start and its shutdown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerReport {
    /// Jobs completed.
    pub done: u64,
    /// Attempts that failed and were put back for another.
    pub retried: u64,
    /// Jobs given up on.
    pub dead: u64,
    /// Jobs taken over by another worker while running here (visibility ran out).
    pub lost: u64,
    /// Jobs still running when the shutdown's grace ended, handed back for another worker.
    pub handed_back: u64,
    /// Jobs the worker could not finish nor hand back: a job whose answer or hand-back the
    /// store did not take within the finishing step's budget (the attempts metric's
    /// `abandoned`), a job whose task ended with the worker's own failure, or a job still
    /// running or being handed back when the shutdown's bound ended (a handler that blocks its
    /// thread without yielding cannot be cut off; its answer, or the hand-back, if it comes
    /// after the report, is still stored). Each stays held until its visibility runs out,
    /// unless that late step lands first; then another worker takes it over.
    pub abandoned: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Running,
    Draining,
    Abort,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    Retried,
    Dead,
    Lost,
    HandedBack,
    /// Neither finished nor handed back: the store could not be reached.
    Abandoned,
}

/// The outcomes of a worker's jobs, counted as each job's task ends, where `shutdown` reads
/// them whatever became of the fetch loop.
#[derive(Debug, Default)]
struct Tally {
    /// The outcomes so far, and how many job tasks have not ended.
    counts: Mutex<(WorkerReport, u64)>,
}

impl Tally {
    fn lock(&self) -> MutexGuard<'_, (WorkerReport, u64)> {
        // Only counters behind it: a panic elsewhere leaves them whole.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The outcomes so far; the job tasks that have not ended are abandoned.
    fn report(&self) -> WorkerReport {
        let (mut report, unfinished) = *self.lock();
        report.abandoned += unfinished;
        report
    }
}

/// A job task on its worker's tally: counted with its outcome, or as abandoned when the task
/// ends without one (aborted, or the worker's own code panicked).
struct Counted {
    tally: Arc<Tally>,
    finished: bool,
}

impl Counted {
    fn start(tally: &Arc<Tally>) -> Self {
        tally.lock().1 += 1;
        Self {
            tally: Arc::clone(tally),
            finished: false,
        }
    }

    fn finish(mut self, outcome: Outcome) {
        let mut counts = self.tally.lock();
        counts.0.count(outcome);
        counts.1 -= 1;
        self.finished = true;
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if !self.finished {
            let mut counts = self.tally.lock();
            counts.0.abandoned += 1;
            counts.1 -= 1;
        }
    }
}

impl WorkerReport {
    fn count(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Done => self.done += 1,
            Outcome::Retried => self.retried += 1,
            Outcome::Dead => self.dead += 1,
            Outcome::Lost => self.lost += 1,
            Outcome::HandedBack => self.handed_back += 1,
            Outcome::Abandoned => self.abandoned += 1,
        }
    }
}

/// Builds a [`Worker`].
#[must_use]
pub struct WorkerBuilder<S, H> {
    queue: JobQueue<S>,
    handler: H,
    config: WorkerConfig,
    consumer: Option<String>,
}

impl<S, H> std::fmt::Debug for WorkerBuilder<S, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("queue", &self.queue.inner.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S, H, Fut> WorkerBuilder<S, H>
where
    S: JobStore,
    H: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Bytes, JobError>> + Send + 'static,
{
    /// Every setting at once.
    pub fn config(mut self, config: WorkerConfig) -> Self {
        self.config = config;
        self
    }

    /// See [`WorkerConfig::concurrency`].
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.config.concurrency = concurrency;
        self
    }

    /// See [`WorkerConfig::prefetch`].
    pub fn prefetch(mut self, prefetch: usize) -> Self {
        self.config.prefetch = prefetch;
        self
    }

    /// See [`WorkerConfig::visibility`].
    pub fn visibility(mut self, visibility: Duration) -> Self {
        self.config.visibility = visibility;
        self
    }

    /// See [`WorkerConfig::max_attempts`].
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.config.max_attempts = max_attempts;
        self
    }

    /// The backoff between attempts: see [`WorkerConfig::backoff_initial`] and the fields
    /// after it.
    pub fn backoff(mut self, initial: Duration, multiplier: f64, max: Duration) -> Self {
        self.config.backoff_initial = initial;
        self.config.backoff_multiplier = multiplier;
        self.config.backoff_max = max;
        self
    }

    /// The worker's name among the queue's consumers (default: the process id and a random
    /// suffix). Two live workers must not share one.
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.consumer = Some(name.into());
        self
    }

    /// Starts the worker on the current tokio runtime.
    pub fn start(self) -> Result<Worker, InvalidConfig> {
        self.config.validate()?;
        let consumer = match self.consumer {
            Some(name) if !name.is_empty() && name.len() <= 128 => name,
            Some(_) => return Err(InvalidConfig::new("consumer", "must be 1 to 128 bytes")),
            None => format!("{}-{:016x}", std::process::id(), fastrand::u64(..)),
        };
        let (phase, watch_phase) = watch::channel(Phase::Running);
        let (completions, waiting) = mpsc::unbounded_channel();
        // It ends once every job task and the fetch loop are gone (they hold the sender), or
        // when a shutdown stops it.
        let stop_completer = Arc::new(Notify::new());
        let completer = tokio::spawn(complete_in_batches(
            self.queue.clone(),
            waiting,
            Arc::clone(&stop_completer),
        ));
        let storing = Arc::new(Semaphore::new(
            self.config.concurrency + self.config.prefetch,
        ));
        let tally = Arc::new(Tally::default());
        let hand_back_budget = self.config.visibility / 2;
        let shared = Arc::new(Shared {
            storing,
            queue: self.queue,
            handler: self.handler,
            config: self.config,
            consumer,
            completions,
            tally: Arc::clone(&tally),
        });
        let leave_running = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(fetch_loop(shared, watch_phase, Arc::clone(&leave_running)));
        Ok(Worker {
            phase,
            task,
            leave_running,
            completer,
            stop_completer,
            tally,
            hand_back_budget,
        })
    }
}

impl<S: JobStore> JobQueue<S> {
    /// A builder for a worker that runs this queue's jobs with `handler`.
    ///
    /// The handler answers a result (kept for `status`), a [`JobError`] (retried with backoff
    /// while attempts remain, or dead), or panics (an attempt failed; the worker goes on).
    pub fn worker<H, Fut>(&self, handler: H) -> WorkerBuilder<S, H>
    where
        H: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, JobError>> + Send + 'static,
    {
        WorkerBuilder {
            queue: self.clone(),
            handler,
            config: WorkerConfig::default(),
            consumer: None,
        }
    }
}

/// A running worker: fetches jobs from every partition of its queue, in turn, and runs up to
/// its concurrency at once.
///
/// Dropping it stops fetching and lets running jobs finish; [`shutdown`](Self::shutdown)
/// also waits for them, up to a bound.
#[derive(Debug)]
pub struct Worker {
    phase: watch::Sender<Phase>,
    task: tokio::task::JoinHandle<()>,
    /// Set when a shutdown drops the fetch loop at its bound: see [`JobTasks`].
    leave_running: Arc<AtomicBool>,
    /// Stores the completions: joined by `shutdown` within its bound, so none is stored
    /// after it returned (unless the bound cut a store call short), but the steps of the job
    /// tasks left running at the bound (see [`JobTasks`]).
    completer: tokio::task::JoinHandle<()>,
    /// Tells the completer to store what it was handed and end, though job tasks left
    /// running still hold its sender.
    stop_completer: Arc<Notify>,
    tally: Arc<Tally>,
    /// How long a shutdown waits, after the grace, for the cut-off jobs to be handed back:
    /// the budget of each hand-back's store calls.
    hand_back_budget: Duration,
}

impl Worker {
    /// Stops fetching, waits up to `grace` for the running jobs, then cuts off those still
    /// running and hands them back (each goes back to its lane at once, for another worker),
    /// and answers what the worker did.
    ///
    /// It returns within `grace` plus half the visibility timeout (the budget of the
    /// hand-back's store calls), whatever the handlers and the store do, and also after the
    /// worker's own fetch loop panicked. A job it could not finish nor hand back by then is
    /// counted in [`WorkerReport::abandoned`] and stays held until its visibility runs out,
    /// when another worker takes it over. A handler that blocks its thread without yielding
    /// cannot be cut off: it is left running, and its answer, if it ever comes, is stored
    /// unless the job was taken over meanwhile; so is a hand-back whose store calls were still
    /// being tried. After the fetch loop panicked, though, the job tasks stop with it, and such
    /// an answer is lost with its task (the job runs again after its visibility). On a
    /// current-thread runtime such a handler blocks the runtime itself, this shutdown included,
    /// and nothing can bound that.
    pub async fn shutdown(self, grace: Duration) -> WorkerReport {
        let Self {
            phase,
            mut task,
            leave_running,
            completer,
            stop_completer,
            tally,
            hand_back_budget,
        } = self;
        let started = tokio::time::Instant::now();
        // Saturating: a grace of `Duration::MAX` waits without end rather than overflow.
        let bound = grace.saturating_add(hand_back_budget);
        let left = || bound.saturating_sub(started.elapsed());
        phase.send_replace(Phase::Draining);
        let ended = match tokio::time::timeout(grace, &mut task).await {
            Ok(ended) => Some(ended),
            Err(_) => {
                phase.send_replace(Phase::Abort);
                tokio::time::timeout(left(), &mut task).await.ok()
            }
        };
        match ended {
            Some(Ok(())) => {}
            Some(Err(error)) => tracing::error!(%error, "the worker's fetch loop panicked"),
            // Waiting for a job task that does not end (a handler that never yields): drop
            // the loop, which leaves that task to store its answer if it ever comes.
            None => {
                leave_running.store(true, Ordering::Relaxed);
                task.abort();
            }
        }
        stop_completer.notify_one();
        let mut completer = completer;
        match tokio::time::timeout(left(), &mut completer).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "the worker's completer panicked"),
            Err(_) => completer.abort(),
        }
        let report = tally.report();
        if report.abandoned > 0 {
            tracing::warn!(
                abandoned = report.abandoned,
                "the worker stopped with jobs it could not finish nor hand back; another worker takes them over after their visibility"
            );
        }
        report
    }
}

struct Shared<S, H> {
    queue: JobQueue<S>,
    handler: H,
    config: WorkerConfig,
    consumer: String,
    /// To the worker's completer: see [`complete_in_batches`].
    completions: mpsc::UnboundedSender<Completing>,
    /// A place for every job whose handler answered and whose answer is not stored yet (as
    /// many as fetch slots): such a job leaves its fetch slot for the next fetch, so fetching
    /// overlaps storing, and a slow store still holds fetching back.
    storing: Arc<Semaphore>,
    /// Where each job task counts its outcome.
    tally: Arc<Tally>,
}

/// A job's completion waiting for the worker's completer.
struct Completing {
    partition: usize,
    job: Completion,
    answer: CompletionAnswer,
}

/// The most completions the completer sends in one call.
const MAX_COMPLETIONS_PER_CALL: usize = 64;

/// Completes the worker's jobs: each partition's completions go in one
/// [`JobStore::complete_many`] (one round trip and one script on Redis) at a time, with every
/// completion of the partition waiting when the call is sent (up to
/// [`MAX_COMPLETIONS_PER_CALL`]). It never waits for more to arrive: a completion waits at most
/// for its partition's call in flight, and those that became ready meanwhile share the next.
/// The partitions' calls run side by side, so one partition whose node hangs (each call taking
/// the store's timeout) holds back no other's completions. Each job's task gets its own
/// answer, and retries through store errors itself.
///
/// Told to `stop`, it stores what it was handed and ends, though a job task left running
/// (a handler that never yields) still holds a sender.
async fn complete_in_batches<S: JobStore>(
    queue: JobQueue<S>,
    mut waiting: mpsc::UnboundedReceiver<Completing>,
    stop: Arc<Notify>,
) {
    let queue = &*queue.inner;
    let mut rounds = Rounds::new(queue.partitions.len());
    let mut calls = FuturesUnordered::new();
    let mut stopping = false;
    let mut open = true;
    loop {
        while let Some(partition) = rounds.ready.pop() {
            let (jobs, answers) = rounds.take(partition);
            calls.push(complete_round(queue, partition, jobs, answers));
        }
        if !open && calls.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            Some(partition) = calls.next(), if !calls.is_empty() => rounds.answered(partition),
            () = stop.notified(), if !stopping => {
                // A job task that answers later completes its job alone; those already sent
                // are still received.
                waiting.close();
                stopping = true;
            }
            next = waiting.recv(), if open => match next {
                Some(completing) => rounds.add(completing),
                None => open = false,
            },
        }
        // Every completion waiting at this moment goes in the next call of its partition.
        while open && let Ok(completing) = waiting.try_recv() {
            rounds.add(completing);
        }
    }
}

/// The completions waiting for their partition's next call.
struct Rounds {
    /// Per partition, in the order the jobs finished.
    waiting: Vec<Vec<Completing>>,
    /// Per partition, whether a call is in flight.
    in_flight: Vec<bool>,
    /// The partitions with completions waiting and no call in flight.
    ready: Vec<usize>,
}

impl Rounds {
    fn new(partitions: usize) -> Self {
        Self {
            waiting: (0..partitions).map(|_| Vec::new()).collect(),
            in_flight: vec![false; partitions],
            ready: Vec::new(),
        }
    }

    fn add(&mut self, completing: Completing) {
        let p = completing.partition;
        self.waiting[p].push(completing);
        if !self.in_flight[p] && self.waiting[p].len() == 1 {
            self.ready.push(p);
        }
    }

    /// The next call's jobs of `partition`, whose call is then in flight.
    fn take(&mut self, partition: usize) -> (Vec<Completion>, Vec<CompletionAnswer>) {
        self.in_flight[partition] = true;
        let waiting = &mut self.waiting[partition];
        let end = waiting.len().min(MAX_COMPLETIONS_PER_CALL);
        waiting
            .drain(..end)
            .map(|completing| (completing.job, completing.answer))
            .unzip()
    }

    /// `partition`'s call ended.
    fn answered(&mut self, partition: usize) {
        self.in_flight[partition] = false;
        if !self.waiting[partition].is_empty() {
            self.ready.push(partition);
        }
    }
}

type CompletionAnswer = oneshot::Sender<Result<Fenced, BackendError>>;

/// Completes `jobs` of `partition` in one call and tells each its answer; answers the partition.
async fn complete_round<S: JobStore>(
    queue: &QueueInner<S>,
    partition: usize,
    jobs: Vec<Completion>,
    answers: Vec<CompletionAnswer>,
) -> usize {
    let answered = queue
        .store
        .complete_many(
            &queue.partitions[partition],
            &jobs,
            queue.config.result_retention,
        )
        .await;
    match answered {
        Ok(each) if each.len() == answers.len() => {
            for (answer, step) in answers.into_iter().zip(each) {
                let _ = answer.send(step);
            }
        }
        Ok(each) => {
            let detail = format!(
                "the store answered {} of {} completions",
                each.len(),
                answers.len()
            );
            for answer in answers {
                let _ = answer.send(Err(BackendError::with_detail(
                    BackendErrorKind::Protocol,
                    detail.clone(),
                )));
            }
        }
        Err(error) => {
            for answer in answers {
                let copy = match error.detail() {
                    Some(detail) => BackendError::with_detail(error.kind(), detail),
                    None => BackendError::new(error.kind()),
                };
                let _ = answer.send(Err(copy));
            }
        }
    }
    partition
}

/// Waits until the phase satisfies `pred`; a dropped worker is draining, never aborting.
async fn until(phase: &mut watch::Receiver<Phase>, pred: impl Fn(Phase) -> bool) {
    loop {
        let now = *phase.borrow_and_update();
        if pred(now) {
            return;
        }
        if phase.changed().await.is_err() {
            if pred(Phase::Draining) {
                return;
            }
            std::future::pending::<()>().await;
        }
    }
}

/// Smooth weighted round robin over the lanes of one partition: each fetch of the partition
/// reads the lane whose turn it is first, then the others in priority order.
struct LaneSchedule {
    weights: Vec<i64>,
    current: Vec<i64>,
    total: i64,
}

impl LaneSchedule {
    fn new(weights: &[u32]) -> Self {
        let weights: Vec<i64> = weights.iter().map(|&w| i64::from(w)).collect();
        Self {
            total: weights.iter().sum(),
            current: vec![0; weights.len()],
            weights,
        }
    }

    fn next_order(&mut self) -> Vec<u8> {
        for (current, weight) in self.current.iter_mut().zip(&self.weights) {
            *current += weight;
        }
        let first = (0..self.current.len())
            .max_by_key(|&i| (self.current[i], std::cmp::Reverse(i)))
            .unwrap_or(0);
        self.current[first] -= self.total;
        let mut order = Vec::with_capacity(self.weights.len());
        order.push(first as u8);
        order.extend((0..self.weights.len() as u8).filter(|&lane| usize::from(lane) != first));
        order
    }
}

async fn fetch_loop<S, H, Fut>(
    shared: Arc<Shared<S, H>>,
    mut phase: watch::Receiver<Phase>,
    leave_running: Arc<AtomicBool>,
) where
    S: JobStore,
    H: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Bytes, JobError>> + Send + 'static,
{
    let config = &shared.config;
    let queue = &shared.queue.inner;
    // A slot for every job fetched and not answered (running, or waiting for a handler), so
    // fetches take several jobs at once while handlers are busy.
    let slots = Arc::new(Semaphore::new(config.concurrency + config.prefetch));
    let handlers = Arc::new(Semaphore::new(config.concurrency));
    let mut jobs = JobTasks {
        tasks: JoinSet::new(),
        leave_running,
    };
    let partitions = queue.partitions.len();
    // One schedule per partition, each stepped by that partition's fetches only: one shared
    // by all, stepped on every fetch as the partitions take turns too, would give a partition
    // the same leading lanes every time when the partition count and the weights' sum share a
    // factor, and starve the other lanes there.
    let mut lanes: Vec<LaneSchedule> = (0..partitions)
        .map(|_| LaneSchedule::new(&queue.config.lane_weights))
        .collect();
    let mut next_partition = fastrand::usize(..partitions);
    // Kept per partition: on a Redis Cluster each partition is on its own node, and one out
    // of reach (failing over) must not hold back the fetches of the others.
    let mut fetches: Vec<PartitionFetches> = (0..partitions)
        .map(|_| PartitionFetches::new(config.poll_interval))
        .collect();
    let max_backoff = config
        .poll_interval
        .max((config.visibility / 10).min(MAX_FETCH_BACKOFF));
    let mut empty_in_a_row = 0;
    let mut idle = Duration::from_millis(1);
    // On its own timer: the loop below waits for slots, which a spike keeps all busy.
    let _stats = AbortOnDrop(tokio::spawn(publish_stats_every(
        shared.queue.clone(),
        config.stats_interval,
    )));
    loop {
        // Each job task counts its own outcome on the tally.
        while jobs.tasks.try_join_next().is_some() {}
        let first = tokio::select! {
            biased;
            () = until(&mut phase, |p| p != Phase::Running) => break,
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let mut held = vec![first];
        while let Ok(slot) = Arc::clone(&slots).try_acquire_owned() {
            held.push(slot);
        }
        // The partition whose turn it is, skipping those whose last call failed lately.
        let now = tokio::time::Instant::now();
        let Some(skipped) = (0..partitions).find(|&i| {
            fetches[(next_partition + i) % partitions]
                .resume_at
                .is_none_or(|at| at <= now)
        }) else {
            // Every partition failed lately: wait for the first to be tried again.
            drop(held);
            let resume = fetches.iter().filter_map(|fetches| fetches.resume_at).min();
            tokio::select! {
                biased;
                () = until(&mut phase, |p| p != Phase::Running) => break,
                () = sleep_until(resume) => {}
            }
            continue;
        };
        let p = (next_partition + skipped) % partitions;
        next_partition = (p + 1) % partitions;
        // A skipped turn finds nothing, as an empty fetch: with the others empty too, the
        // loop pauses as often as when no partition is skipped.
        empty_in_a_row += skipped;
        let recovering = fetches[p].lost.is_some();
        let token = match fetches[p].lost {
            Some((token, _)) => token,
            None => fastrand::u64(1..),
        };
        // The store holds what it delivers from about now: each job's extensions count from it.
        let sent = tokio::time::Instant::now();
        let fetched = if recovering {
            // No more than this fetch could take: the lost one had no more slots than these.
            queue
                .store
                .recover(&queue.partitions[p], &shared.consumer, token, held.len())
                .await
        } else {
            let order = lanes[p].next_order();
            let request = FetchRequest {
                consumer: &shared.consumer,
                lanes: &order,
                max: held.len(),
                visibility: config.visibility,
            };
            queue
                .store
                .fetch_marked(&queue.partitions[p], request, token)
                .await
        };
        let pause = match fetched {
            Ok(deliveries) if !deliveries.is_empty() => {
                fetches[p].answered(config.poll_interval);
                empty_in_a_row = 0;
                idle = Duration::from_millis(1);
                for delivery in deliveries {
                    let slot = held.pop().expect("no more deliveries than slots");
                    let shared = Arc::clone(&shared);
                    // The turn is taken here, in fetch order, so jobs fetched ahead start in
                    // the order they were delivered.
                    let turn = Turn::take(&handlers);
                    let counted = Counted::start(&shared.tally);
                    let phase = phase.clone();
                    jobs.tasks.spawn(async move {
                        let outcome =
                            run_job(shared, (p, sent), delivery, (slot, turn), phase).await;
                        counted.finish(outcome);
                    });
                }
                None
            }
            // The lost fetch had delivered nothing: fetch at once.
            Ok(_) if recovering => {
                fetches[p].answered(config.poll_interval);
                None
            }
            Ok(_) => {
                fetches[p].answered(config.poll_interval);
                empty_in_a_row += 1;
                (empty_in_a_row >= partitions).then(|| {
                    empty_in_a_row = 0;
                    let pause = idle;
                    idle = idle.saturating_mul(2).min(config.poll_interval);
                    pause
                })
            }
            Err(error) => {
                queue.metrics.store_errors.increment(1);
                tracing::warn!(queue = %queue.name, partition = p, %error, recovering, "fetching jobs failed");
                let partition = &mut fetches[p];
                // Its jobs would otherwise wait out their visibility, unknown to any handler,
                // and be charged another attempt. Taking them back is tried while they may
                // still be held; after that they are taken over as before.
                // A recovery is tried again only while the partition is out of reach (a fetch
                // there would fail too); refused, it is given up, so that fetching goes on.
                partition.lost = match partition.lost {
                    Some(first)
                        if error.is_retryable() && first.1.elapsed() < config.visibility =>
                    {
                        Some(first)
                    }
                    Some(_) => None,
                    None => may_pass(&error).then_some((token, sent)),
                };
                // The other partitions are fetched meanwhile: this one's calls may each take
                // the store's timeout, so it is left alone for a while, longer after each
                // failure.
                partition.resume_at = Some(later(partition.backoff));
                partition.backoff = partition.backoff.saturating_mul(2).min(max_backoff);
                None
            }
        };
        drop(held);
        if let Some(pause) = pause {
            tokio::select! {
                biased;
                () = until(&mut phase, |p| p != Phase::Running) => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
    while jobs.tasks.join_next().await.is_some() {}
    // Gone for good: the store forgets this consumer wherever it holds nothing (a bounded
    // wait; a consumer left behind is harmless, and found again by takeovers).
    let leave = async {
        for partition in &queue.partitions {
            if let Err(error) = queue.store.leave(partition, &shared.consumer).await {
                tracing::debug!(queue = %queue.name, %error, "leaving the consumer group failed");
            }
        }
    };
    let _ = tokio::time::timeout(config.visibility / 2, leave).await;
}

/// The longest a worker leaves a partition alone after its calls kept failing.
const MAX_FETCH_BACKOFF: Duration = Duration::from_secs(5);

/// How a worker's fetch loop stands with one partition.
struct PartitionFetches {
    /// A fetch that failed after the store may have run it (only its answer lost): its token
    /// and when it was sent. Its jobs are taken back at the partition's next turn.
    lost: Option<(u64, tokio::time::Instant)>,
    /// After a failed call, the partition's turns are skipped until then.
    resume_at: Option<tokio::time::Instant>,
    /// How long the partition is skipped after its next failed call.
    backoff: Duration,
}

impl PartitionFetches {
    fn new(poll_interval: Duration) -> Self {
        Self {
            lost: None,
            resume_at: None,
            backoff: poll_interval,
        }
    }

    /// The partition's call was answered: its next turn comes as usual.
    fn answered(&mut self, poll_interval: Duration) {
        self.lost = None;
        self.resume_at = None;
        self.backoff = poll_interval;
    }
}

/// Sleeps until `at`; for ever when `None`.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `by` from now, or a year when that is past what an `Instant` holds.
fn later(by: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(by)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 86_400))
}

/// A worker's job tasks, aborted with the fetch loop (when it panics, or its runtime stops),
/// except when a shutdown drops the loop once its bound ran out with a job task still running
/// (`leave_running`): by then every handler that yields was cut off, so that task's handler
/// blocks its thread, or its hand-back is still trying the store, and it is left running to
/// store its answer if it ever comes
/// (`a_blocked_handlers_late_answer_is_stored_after_the_shutdown`).
struct JobTasks {
    tasks: JoinSet<()>,
    leave_running: Arc<AtomicBool>,
}

impl Drop for JobTasks {
    fn drop(&mut self) {
        if self.leave_running.load(Ordering::Relaxed) {
            self.tasks.detach_all();
        }
    }
}

/// Publishes the queue's counts every `every`, until aborted.
async fn publish_stats_every<S: JobStore>(queue: JobQueue<S>, every: Duration) {
    loop {
        if queue.publish_stats().await.is_err() {
            queue.inner.metrics.store_errors.increment(1);
        }
        tokio::time::sleep(every).await;
    }
}

/// Aborts its task when dropped.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum Ran {
    Answered(Result<Result<Bytes, JobError>, Box<dyn std::any::Any + Send>>),
    Lost,
    Aborted,
}

/// One running job on the running gauge, taken off however its attempt ends.
struct Running<'a>(&'a headroom_core::metrics::Gauge);

impl<'a> Running<'a> {
    fn start(gauge: &'a headroom_core::metrics::Gauge) -> Self {
        gauge.increment(1);
        Self(gauge)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.decrement(1);
    }
}

/// A fetched job's place in the queue for a handler. The semaphore serves waiters first come,
/// first served, and a waiter's place is taken when its acquire is first polled: taking it
/// when the job is fetched, not when its task first runs, keeps the fetch order.
enum Turn {
    Now(OwnedSemaphorePermit),
    Queued(Pin<Box<dyn Future<Output = OwnedSemaphorePermit> + Send>>),
}

impl Turn {
    fn take(handlers: &Arc<Semaphore>) -> Self {
        let mut acquire: Pin<Box<dyn Future<Output = OwnedSemaphorePermit> + Send>> = Box::pin(
            Arc::clone(handlers)
                .acquire_owned()
                .map(|permit| permit.expect("the semaphore is never closed")),
        );
        let mut cx = Context::from_waker(Waker::noop());
        match acquire.as_mut().poll(&mut cx) {
            Poll::Ready(permit) => Self::Now(permit),
            Poll::Pending => Self::Queued(acquire),
        }
    }

    async fn wait(self) -> OwnedSemaphorePermit {
        match self {
            Self::Now(permit) => permit,
            Self::Queued(acquire) => acquire.await,
        }
    }
}

/// How a fetched job got a handler: it did, it was taken over while it waited, or the worker
/// began to shut down first.
enum Waited {
    Handler(OwnedSemaphorePermit),
    Lost,
    Stopping,
}

/// Runs one delivered job and counts its outcome, whichever path it ends on.
async fn run_job<S, H, Fut>(
    shared: Arc<Shared<S, H>>,
    (partition, fetched): (usize, tokio::time::Instant),
    delivery: Delivery,
    places: (OwnedSemaphorePermit, Turn),
    phase: watch::Receiver<Phase>,
) -> Outcome
where
    S: JobStore,
    H: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Bytes, JobError>> + Send + 'static,
{
    let number = delivery.number;
    let outcome = attempt(&shared, (partition, fetched), delivery, places, phase).await;
    let metrics = &shared.queue.inner.metrics;
    match outcome {
        Outcome::Done => metrics.done.increment(1),
        Outcome::Retried => metrics.retried.increment(1),
        Outcome::Dead => metrics.dead.increment(1),
        Outcome::Lost => {
            metrics.lost.increment(1);
            tracing::warn!(
                queue = %shared.queue.inner.name,
                job.number = number,
                "the job was taken over by another worker"
            );
        }
        Outcome::HandedBack => metrics.handed_back.increment(1),
        Outcome::Abandoned => metrics.abandoned.increment(1),
    }
    outcome
}

async fn attempt<S, H, Fut>(
    shared: &Shared<S, H>,
    (partition, fetched): (usize, tokio::time::Instant),
    delivery: Delivery,
    (slot, turn): (OwnedSemaphorePermit, Turn),
    mut phase: watch::Receiver<Phase>,
) -> Outcome
where
    S: JobStore,
    H: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Bytes, JobError>> + Send + 'static,
{
    let queue = &shared.queue.inner;
    let config = &shared.config;
    let job = Held {
        store: &queue.store,
        key: &queue.partitions[partition],
        partition,
        completions: &shared.completions,
        number: delivery.number,
        attempt: delivery.attempt,
        charged: delivery.attempt.saturating_sub(delivery.handed_back),
        budget: config.visibility / 2,
        due: std::sync::Mutex::new(extension_due(fetched, config.visibility, false)),
        held_until: std::sync::Mutex::new(fetched.checked_add(config.visibility)),
    };
    let id = JobId {
        partition: partition as u16,
        number: delivery.number,
    };
    let Some(envelope::Opened {
        nonce,
        origin,
        payload,
    }) = envelope::open(&delivery.payload)
    else {
        let error = "the stored payload is not a job envelope (corrupt or foreign bytes)";
        tracing::warn!(queue = %queue.name, job.id = %id, error, "job is dead");
        return finish(
            shared,
            job.bury(error, queue.config.dead_retention).await,
            Outcome::Dead,
        );
    };
    if job.charged > config.max_attempts {
        let mut error = format!(
            "gave up after {} attempts; the last ended without an answer (its worker died, stalled or shut down)",
            config.max_attempts
        );
        // The dead letter keeps the job's last error along with why it was given up.
        if let Some(last) = job.last_error().await {
            error.push_str("; the last error: ");
            error.push_str(&last);
        }
        tracing::warn!(queue = %queue.name, job.id = %id, error, "job is dead");
        return finish(
            shared,
            job.bury(&error, queue.config.dead_retention).await,
            Outcome::Dead,
        );
    }
    // Fetched ahead: wait for a handler, keeping the job while waiting.
    let waited = tokio::select! {
        biased;
        () = until(&mut phase, |p| p != Phase::Running) => Waited::Stopping,
        permit = turn.wait() => Waited::Handler(permit),
        () = job.heartbeat(config.visibility) => Waited::Lost,
    };
    let handler_turn = match waited {
        Waited::Handler(permit) => permit,
        Waited::Lost => return Outcome::Lost,
        Waited::Stopping => {
            let step = job.release("its worker shut down before it started").await;
            return finish(shared, step, Outcome::HandedBack);
        }
    };
    let span = tracing::info_span!(
        "headroom.job",
        queue = %queue.name,
        job.id = %id,
        job.attempt = job.charged,
        job.origin = origin.as_deref().unwrap_or(""),
        outcome = tracing::field::Empty,
    );
    let context = JobContext {
        queue: Arc::clone(&queue.name),
        id,
        nonce,
        attempt: job.charged,
        lane: delivery.lane,
        payload,
        tenant: delivery
            .tenant
            .map(|tenant| String::from_utf8_lossy(&tenant).into_owned()),
        origin,
        enqueued_at: UNIX_EPOCH + Duration::from_millis(delivery.enqueued_at_ms),
        taken_over: delivery.taken_over,
    };
    let running = Running::start(&queue.metrics.running);
    let started = queue.clock.stopwatch();
    // A handler may panic while making its future as well as while running it.
    let handler = AssertUnwindSafe(async { (shared.handler)(context).await })
        .catch_unwind()
        .instrument(span.clone());
    // Biased, the answer first: a handler that answers as the grace ends (or as its job is
    // taken over) has finished, and its answer is stored rather than thrown away.
    let ran = tokio::select! {
        biased;
        answered = handler => Ran::Answered(answered),
        () = job.heartbeat(config.visibility) => Ran::Lost,
        () = until(&mut phase, |p| p == Phase::Abort) => Ran::Aborted,
    };
    drop(running);
    queue.metrics.duration.record(started.elapsed());
    // The handler is done: the next job may start while this one's answer is stored, and the
    // next fetch may use its slot once the answer holds a place among those being stored.
    drop(handler_turn);
    // Until its answer is stored, the job stays held: waiting for a place among the answers
    // being stored and for the completer may take longer than the visibility.
    let finishing = async {
        let _storing = match ran {
            Ran::Lost => None,
            _ => Some(
                Arc::clone(&shared.storing)
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed"),
            ),
        };
        drop(slot);
        match ran {
            Ran::Answered(Ok(Ok(mut result))) => {
                // The work is done: a result too large to keep is dropped, not the job failed
                // (a dead job invites running it again).
                if result.len() > queue.config.max_result_len {
                    tracing::warn!(
                        queue = %queue.name,
                        job.id = %id,
                        len = result.len(),
                        max = queue.config.max_result_len,
                        "the job's result is larger than the queue keeps; it is dropped"
                    );
                    result = Bytes::new();
                }
                finish(
                    shared,
                    job.complete(result, queue.config.result_retention).await,
                    Outcome::Done,
                )
            }
            Ran::Answered(Ok(Err(error))) => failed(shared, &job, error).await,
            Ran::Answered(Err(panic)) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-string panic".to_owned());
                failed(
                    shared,
                    &job,
                    JobError::retry(format!("the handler panicked: {message}")),
                )
                .await
            }
            Ran::Lost => Outcome::Lost,
            // Cut off mid-run: charged, since its effect may have begun, so a job that never
            // finishes within a shutdown's grace still ends dead after its attempts.
            Ran::Aborted => finish(shared, job.cut_off().await, Outcome::HandedBack),
        }
    };
    let keep_held = async {
        job.heartbeat(config.visibility).await;
        // Taken over, or already finished: the finishing step tells which.
        std::future::pending::<std::convert::Infallible>().await
    };
    let outcome = tokio::select! {
        biased;
        outcome = finishing => outcome,
        never = keep_held => match never {},
    };
    let name = match outcome {
        Outcome::Done => "done",
        Outcome::Retried => "retried",
        Outcome::Dead => "dead",
        Outcome::Lost => "lost",
        Outcome::HandedBack => "handed_back",
        Outcome::Abandoned => "abandoned",
    };
    span.record("outcome", name);
    outcome
}

/// The outcome of a finishing step: `outcome` if the store took it, lost if the job had been
/// taken over, abandoned if the store could not be reached within the budget (the job stays
/// held, and another worker takes it over after its visibility).
fn finish<S, H>(
    shared: &Shared<S, H>,
    step: Result<Fenced, BackendError>,
    outcome: Outcome,
) -> Outcome {
    match step {
        Ok(Fenced::Applied) => outcome,
        Ok(_) => Outcome::Lost,
        Err(error) => {
            shared.queue.inner.metrics.store_errors.increment(1);
            tracing::warn!(queue = %shared.queue.inner.name, %error, "finishing a job failed; another worker will run it again");
            Outcome::Abandoned
        }
    }
}

async fn failed<S: JobStore, H>(
    shared: &Shared<S, H>,
    job: &Held<'_, S>,
    error: JobError,
) -> Outcome {
    let config = &shared.config;
    if error.is_retryable() && job.charged < config.max_attempts {
        let delay = config.backoff(job.charged, fastrand::f64());
        finish(
            shared,
            job.retry(delay, error.message()).await,
            Outcome::Retried,
        )
    } else {
        let retention = shared.queue.inner.config.dead_retention;
        finish(
            shared,
            job.bury(error.message(), retention).await,
            Outcome::Dead,
        )
    }
}

/// Whether a store call that failed with `error` may pass when tried again: with the store out
/// of reach, and also while it refuses writes for a while (a primary demoted by a failover
/// answers `READONLY`, a Redis at `maxmemory` under `noeviction` answers `OOM`, a command
/// error). Not with data the store did not write, a value too large for it or a
/// configuration it refuses, which stay as they are.
pub(crate) fn may_pass(error: &BackendError) -> bool {
    !matches!(
        error.kind(),
        BackendErrorKind::Corrupt | BackendErrorKind::TooLarge | BackendErrorKind::Config
    )
}

/// When a held job's next extension is due (`None`: past what an `Instant` holds), its fetch
/// or last extension `sent` then: a third of the visibility later; or a tenth of it when that
/// extension failed in a way a retry may cure ([`may_pass`]: the store out of reach, or
/// refusing writes for a while), which is at once when
/// the failure took longer to come. A store out of reach for up to half the visibility then
/// costs no job, as long as its calls fail within a tenth of it (its command timeout), where
/// trying only every third would put the third try at the moment the hold runs out.
pub(crate) fn extension_due(
    sent: tokio::time::Instant,
    visibility: Duration,
    failed: bool,
) -> Option<tokio::time::Instant> {
    sent.checked_add(if failed {
        visibility / 10
    } else {
        visibility / 3
    })
}

/// The job a worker holds, and the steps on it.
struct Held<'a, S> {
    store: &'a S,
    key: &'a Key,
    partition: usize,
    completions: &'a mpsc::UnboundedSender<Completing>,
    number: u64,
    /// The delivery's attempt: the fencing token of every step.
    attempt: u32,
    /// The attempts charged to the job, this one included (hand-backs are not charged).
    charged: u32,
    /// How long a finishing step keeps trying through store errors.
    budget: Duration,
    /// When the next extension is due ([`extension_due`]). Each phase's heartbeat keeps to
    /// it, so that moving from waiting to running to storing does not start the count again.
    due: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// Until when the store holds the job for this worker at the least: a visibility from
    /// the sending of the fetch or of the last extension it applied (`None` past what an
    /// `Instant` holds).
    held_until: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl<S: JobStore> Held<'_, S> {
    /// Extends the job's visibility when due (see [`extension_due`]), for as long as the job
    /// is held; returns when the store says another worker took it over.
    async fn heartbeat(&self, visibility: Duration) {
        loop {
            let due = *self.due.lock().expect("never poisoned");
            match due {
                Some(due) => tokio::time::sleep_until(due).await,
                None => std::future::pending().await,
            }
            let sent = tokio::time::Instant::now();
            // Due again soon if this call is cut off (its phase ended).
            self.set_due(extension_due(sent, visibility, true));
            match self.store.extend(self.key, self.number, self.attempt).await {
                Ok(Fenced::Applied) => {
                    self.set_due(extension_due(sent, visibility, false));
                    *self.held_until.lock().expect("never poisoned") = sent.checked_add(visibility);
                }
                // Due soon, as set above.
                Err(error) if may_pass(&error) => {}
                Err(_) => self.set_due(extension_due(sent, visibility, false)),
                Ok(_) => return,
            }
        }
    }

    fn set_due(&self, due: Option<tokio::time::Instant>) {
        *self.due.lock().expect("never poisoned") = due;
    }

    /// Runs a finishing step, again after store errors a retry may cure ([`may_pass`]; 50 ms,
    /// doubling up to a fifth of the budget, and a last try at its end) within the budget.
    /// The step leaves the job `landed`: a refused try is checked against the job's status,
    /// since an earlier try may have been applied with only its answer lost (a timeout), or
    /// the client sent the step twice (after its connection dropped). A job the step made
    /// `Retrying` may already be running again: another delivery while this holder's hold
    /// has not lapsed means the step was applied, since only a lapse lets another worker take
    /// the job over otherwise.
    async fn persist<F, Fut>(&self, landed: JobState, step: F) -> Result<Fenced, BackendError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Fenced, BackendError>>,
    {
        // No deadline when the budget (half the visibility) is past what an `Instant` holds.
        let deadline = tokio::time::Instant::now().checked_add(self.budget);
        let mut pause = Duration::from_millis(50);
        loop {
            match step().await {
                Err(error)
                    if may_pass(&error)
                        && deadline
                            .is_none_or(|deadline| tokio::time::Instant::now() < deadline) =>
                {
                    // The last try comes at the deadline, not a pause short of it.
                    let left = deadline.map_or(pause, |deadline| {
                        deadline.saturating_duration_since(tokio::time::Instant::now())
                    });
                    tokio::time::sleep(pause.min(left)).await;
                    pause = pause.saturating_mul(2).min(self.budget / 5);
                }
                // Rejected after a failed try (which may have been applied), or at once (a
                // client that sent the step again after its connection dropped): the job in
                // the state the step leads to, at this attempt, means it was applied.
                Ok(Fenced::Rejected) if self.landed(landed).await => {
                    return Ok(Fenced::Applied);
                }
                answer => return answer,
            }
        }
    }

    /// Whether the job is `state` at this holder's attempt (the fencing token: only this
    /// holder's steps can have put it there), or, `Retrying`, delivered again since while
    /// still held here (see [`persist`](Self::persist)).
    async fn landed(&self, state: JobState) -> bool {
        let held = || {
            self.held_until
                .lock()
                .expect("never poisoned")
                .is_none_or(|until| tokio::time::Instant::now() < until)
        };
        match self.store.status(self.key, self.number).await {
            Ok(Some(record)) => {
                (record.state == state && record.attempt == self.attempt)
                    || (state == JobState::Retrying && record.attempt > self.attempt && held())
            }
            _ => false,
        }
    }

    /// Completes the job through the worker's completer, with the completions ready at the
    /// same moment.
    async fn complete(&self, result: Bytes, retention: Duration) -> Result<Fenced, BackendError> {
        self.persist(JobState::Done, || async {
            let (answer, answered) = oneshot::channel();
            let completing = Completing {
                partition: self.partition,
                job: Completion {
                    number: self.number,
                    attempt: self.attempt,
                    result: result.clone(),
                },
                answer,
            };
            if self.completions.send(completing).is_ok()
                && let Ok(step) = answered.await
            {
                return step;
            }
            // The completer is gone (the runtime is shutting down, or a shutdown stopped it
            // while this handler ran on): complete alone.
            self.store
                .complete(
                    self.key,
                    self.number,
                    self.attempt,
                    result.clone(),
                    retention,
                )
                .await
        })
        .await
    }

    async fn retry(&self, delay: Duration, error: &str) -> Result<Fenced, BackendError> {
        let error = Bytes::copy_from_slice(error.as_bytes());
        self.persist(JobState::Retrying, || {
            self.store
                .retry(self.key, self.number, self.attempt, delay, error.clone())
        })
        .await
    }

    /// Hands the job back cut off mid-run by a shutdown, charged, for another worker at once.
    /// The error of an earlier attempt is kept, as a hand-back keeps it
    /// ([`JobStore::release`]): a cut-off is no failed attempt, and a job that then dies keeps
    /// its last error. Without one, the reason is kept.
    async fn cut_off(&self) -> Result<Fenced, BackendError> {
        let reason = "its worker shut down before it finished";
        let kept = match self.attempt {
            // No earlier delivery, so no error to keep: spare the store call.
            1 => None,
            // Read through a blip of the store, which would hold the hand-back up as long,
            // rather than hand back over the error (a retry keeps the error it is given); for
            // up to half the budget, so the hand-back keeps the other half.
            _ => tokio::time::timeout(self.budget / 2, self.last_error_through_blips())
                .await
                .unwrap_or(None),
        };
        self.retry(Duration::ZERO, kept.as_deref().unwrap_or(reason))
            .await
    }

    /// The error the store keeps for the job (of its last failed attempt, or why it was first
    /// handed back), if it keeps one and can be reached.
    async fn last_error(&self) -> Option<String> {
        self.read_last_error().await.unwrap_or(None)
    }

    /// As [`last_error`](Self::last_error), asking again after store errors a retry may cure
    /// ([`may_pass`]), with the pauses of [`persist`](Self::persist); the caller bounds it.
    async fn last_error_through_blips(&self) -> Option<String> {
        let mut pause = Duration::from_millis(50);
        loop {
            match self.read_last_error().await {
                Ok(error) => return error,
                Err(error) if may_pass(&error) => {
                    tokio::time::sleep(pause).await;
                    pause = pause.saturating_mul(2).min(self.budget / 5);
                }
                Err(_) => return None,
            }
        }
    }

    async fn read_last_error(&self) -> Result<Option<String>, BackendError> {
        Ok(self
            .store
            .status(self.key, self.number)
            .await?
            .and_then(|record| record.error)
            .map(|error| String::from_utf8_lossy(&error).into_owned()))
    }

    /// Hands the job back unfinished, uncharged, for another worker at once.
    async fn release(&self, error: &str) -> Result<Fenced, BackendError> {
        let error = Bytes::copy_from_slice(error.as_bytes());
        self.persist(JobState::Retrying, || {
            self.store
                .release(self.key, self.number, self.attempt, error.clone())
        })
        .await
    }

    async fn bury(&self, error: &str, retention: Duration) -> Result<Fenced, BackendError> {
        let error = Bytes::copy_from_slice(error.as_bytes());
        self.persist(JobState::Dead, || {
            self.store.bury(
                self.key,
                self.number,
                self.attempt,
                error.clone(),
                retention,
            )
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::LaneSchedule;

    #[test]
    fn lanes_lead_in_proportion_to_their_weights_and_none_starves() {
        let mut schedule = LaneSchedule::new(&[3, 1]);
        let firsts: Vec<u8> = (0..8).map(|_| schedule.next_order()[0]).collect();
        assert_eq!(firsts.iter().filter(|&&lane| lane == 0).count(), 6);
        assert_eq!(firsts.iter().filter(|&&lane| lane == 1).count(), 2);
        // Smoothly: lane 1 leads once in every four fetches.
        assert!(firsts.chunks(4).all(|four| four.contains(&1)));
        assert_eq!(schedule.next_order(), vec![0, 1]);
    }
}
