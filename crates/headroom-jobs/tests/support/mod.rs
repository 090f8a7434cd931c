//! A job store slowed, held, losing a reply or failing, where a test needs it, shared by the
//! test targets.

// Each test target uses only some of it.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use headroom_core::jobs::{
    Completed, Completion, Delivery, EnqueueLimits, Enqueued, FetchRequest, JobNumber, JobRecord,
    JobStore, NewJob, PartitionStats,
};
use headroom_core::lease::Fenced;
use headroom_core::memory::MemoryJobStore;
use headroom_core::{BackendError, BackendErrorKind, Key};
use tokio::sync::Notify;

/// A job store (the memory store unless told otherwise), with completions that take
/// `completion_takes` (each `complete_many` call is recorded); with `slow_first_enqueue`, the
/// answer to the first enqueue held back 10 ms once its job is stored (`first_enqueue_stored`
/// is told then); with `holding_first_enqueue`, the first enqueue held before it reaches the
/// store (`first_enqueue_held` is told then) until `release_first_enqueue` is notified; and
/// while `fetch_panics` is set, every fetch panics (a bug in a store), telling
/// `fetch_panicked` first.
#[derive(Clone, Debug, Default)]
pub(crate) struct SlowStore<S = MemoryJobStore> {
    inner: S,
    completion_takes: Duration,
    /// The jobs of each `complete_many` call, and when (paused time) each call began.
    pub(crate) completions: Arc<Mutex<Vec<(usize, tokio::time::Instant)>>>,
    /// The job of each `extend` call, and when (paused time) it was made.
    pub(crate) extends: Arc<Mutex<Vec<(JobNumber, tokio::time::Instant)>>>,
    slow_first_enqueue: bool,
    first_enqueue_slowed: Arc<AtomicBool>,
    pub(crate) first_enqueue_stored: Arc<Notify>,
    lose_first_completion_reply: bool,
    completion_reply_lost: Arc<AtomicBool>,
    /// The first `complete_many` is applied twice, answered by the second, as when a client
    /// sends a command again after its connection dropped (Redis Cluster's does).
    resend_first_completion: bool,
    completion_resent: Arc<AtomicBool>,
    lose_first_enqueue_reply: bool,
    enqueue_reply_lost: Arc<AtomicBool>,
    hold_first_enqueue: bool,
    first_enqueue_taken: Arc<AtomicBool>,
    pub(crate) first_enqueue_held: Arc<Notify>,
    pub(crate) release_first_enqueue: Arc<Notify>,
    pub(crate) fetch_panics: Arc<AtomicBool>,
    pub(crate) fetch_panicked: Arc<Notify>,
    /// How long each `extend` takes, applied or failed.
    extend_takes: Duration,
    /// When set, an `extend` or `newest_of` sent while the store is out of reach fails only
    /// this long after it was sent, with a timeout.
    failure_takes: Option<Duration>,
    /// While set, every `extend`, `complete_many` and `newest_of` fails with a connection
    /// error, as when the store is out of the worker's reach.
    pub(crate) out_of_reach: Arc<AtomicBool>,
    /// How many of the next fetches fail with a timeout, as in a blip of the store.
    pub(crate) failing_fetches: Arc<AtomicUsize>,
    /// How many of the next burials fail with a timeout, without reaching the store.
    pub(crate) failing_buries: Arc<AtomicUsize>,
    /// While set, every `stats` call fails with a connection error.
    pub(crate) failing_stats: Arc<AtomicBool>,
    /// While the store is out of reach, it answers as a Redis that refuses writes (a demoted
    /// primary's `READONLY`, a command error) rather than with a dropped connection.
    read_only_outage: bool,
    /// Until then, every `complete_many` is refused with `READONLY`, as by a primary demoted
    /// in a failover that the client still writes to.
    read_only_until: Option<tokio::time::Instant>,
    lose_first_fetch_reply: bool,
    fetch_reply_lost: Arc<AtomicBool>,
    lose_first_retry_reply: bool,
    retry_reply_lost: Arc<AtomicBool>,
    /// While set, the next `retry` fails with a timeout without reaching the store; unset by
    /// that call.
    pub(crate) fail_next_retry: Arc<AtomicBool>,
    /// The first `retry` is applied, then sent again once the job was delivered again, and
    /// answered as the second time, as Redis Cluster's client does after a dropped connection.
    resend_first_retry: bool,
    retry_resent: Arc<AtomicBool>,
    /// While set, every `recover` is refused with a command error (a script the server will
    /// not run).
    pub(crate) failing_recovers: Arc<AtomicBool>,
    /// How many releases are answered before every later one waits for ever, as a store
    /// that stopped answering; `None`: all are.
    releases_answered: Option<usize>,
    releases: Arc<AtomicUsize>,
}

impl<S: JobStore> SlowStore<S> {
    /// `inner`, whose first enqueue waits for `release_first_enqueue` before it reaches the
    /// store, as a call still on its way while other instances write.
    pub(crate) fn holding_first_enqueue(inner: S) -> Self {
        Self {
            inner,
            completion_takes: Duration::ZERO,
            completions: Arc::default(),
            extends: Arc::default(),
            slow_first_enqueue: false,
            first_enqueue_slowed: Arc::default(),
            first_enqueue_stored: Arc::default(),
            lose_first_completion_reply: false,
            completion_reply_lost: Arc::default(),
            resend_first_completion: false,
            completion_resent: Arc::default(),
            lose_first_enqueue_reply: false,
            enqueue_reply_lost: Arc::default(),
            hold_first_enqueue: true,
            first_enqueue_taken: Arc::default(),
            first_enqueue_held: Arc::default(),
            release_first_enqueue: Arc::default(),
            fetch_panics: Arc::default(),
            fetch_panicked: Arc::default(),
            extend_takes: Duration::ZERO,
            failure_takes: None,
            out_of_reach: Arc::default(),
            failing_fetches: Arc::default(),
            failing_buries: Arc::default(),
            failing_stats: Arc::default(),
            read_only_outage: false,
            read_only_until: None,
            lose_first_fetch_reply: false,
            fetch_reply_lost: Arc::default(),
            lose_first_retry_reply: false,
            retry_reply_lost: Arc::default(),
            fail_next_retry: Arc::default(),
            resend_first_retry: false,
            retry_resent: Arc::default(),
            failing_recovers: Arc::default(),
            releases_answered: None,
            releases: Arc::default(),
        }
    }

    /// `inner`, whose first fetch is applied, then answered with a timeout, as when its reply
    /// is lost on the way back.
    pub(crate) fn first_fetch_reply_lost(inner: S) -> Self {
        Self {
            hold_first_enqueue: false,
            lose_first_fetch_reply: true,
            ..Self::holding_first_enqueue(inner)
        }
    }

    /// The error of a call made while the store is out of reach.
    fn outage(&self) -> BackendError {
        if self.read_only_outage {
            read_only()
        } else {
            BackendError::new(BackendErrorKind::Connection)
        }
    }
}

/// What Redis answers a write sent to a replica (a primary demoted in a failover).
fn read_only() -> BackendError {
    BackendError::with_detail(
        BackendErrorKind::Command,
        "READONLY You can't write against a read only replica.",
    )
}

impl SlowStore {
    /// Completions take `takes`.
    pub(crate) fn slow_completions(takes: Duration) -> Self {
        Self {
            completion_takes: takes,
            ..Self::default()
        }
    }

    /// The first `retry` (a hand-back too) is applied, then sent again once another delivery
    /// took the job, and answered as the second time.
    pub(crate) fn first_retry_resent() -> Self {
        Self {
            resend_first_retry: true,
            ..Self::default()
        }
    }

    /// The first `retry` (a hand-back too) is applied, then answered with a timeout, as when
    /// its reply is lost on the way back.
    pub(crate) fn first_retry_reply_lost() -> Self {
        Self {
            lose_first_retry_reply: true,
            ..Self::default()
        }
    }

    /// The first `complete_many` is applied, then answered with a timeout, as when its reply
    /// is lost on the way back.
    pub(crate) fn first_completion_reply_lost() -> Self {
        Self {
            lose_first_completion_reply: true,
            ..Self::default()
        }
    }

    /// The first `complete_many` is applied, then sent and applied again, and answered as the
    /// second time.
    pub(crate) fn first_completion_resent() -> Self {
        Self {
            resend_first_completion: true,
            ..Self::default()
        }
    }

    /// The first enqueue is applied, then answered with a timeout, as when its reply is lost
    /// on the way back.
    pub(crate) fn first_enqueue_reply_lost() -> Self {
        Self {
            lose_first_enqueue_reply: true,
            ..Self::default()
        }
    }

    /// Each extension takes `takes`, a round trip.
    pub(crate) fn slow_extends(takes: Duration) -> Self {
        Self {
            extend_takes: takes,
            ..Self::default()
        }
    }

    /// An `extend` sent while the store is out of reach fails `takes` after it was sent.
    pub(crate) fn failing_after(self, takes: Duration) -> Self {
        Self {
            failure_takes: Some(takes),
            ..self
        }
    }

    /// Every completion is refused with `READONLY` for `lasts` from now.
    pub(crate) fn read_only_completions(lasts: Duration) -> Self {
        Self {
            read_only_until: Some(tokio::time::Instant::now() + lasts),
            ..Self::default()
        }
    }

    /// While out of reach, the store refuses writes with `READONLY` instead.
    pub(crate) fn read_only_while_out_of_reach(self) -> Self {
        Self {
            read_only_outage: true,
            ..self
        }
    }

    /// The first `answered` releases (hand-backs) are answered, and no later one ever is.
    pub(crate) fn hanging_releases_after(answered: usize) -> Self {
        Self {
            releases_answered: Some(answered),
            ..Self::default()
        }
    }

    /// The first enqueue is answered 10 ms after its job is stored.
    pub(crate) fn slow_first_enqueue() -> Self {
        Self {
            slow_first_enqueue: true,
            ..Self::default()
        }
    }
}

impl<S: JobStore> JobStore for SlowStore<S> {
    async fn enqueue(
        &self,
        partition: &Key,
        job: &NewJob,
        limits: &EnqueueLimits,
    ) -> Result<Enqueued, BackendError> {
        if self.hold_first_enqueue && !self.first_enqueue_taken.swap(true, Ordering::Relaxed) {
            self.first_enqueue_held.notify_one();
            self.release_first_enqueue.notified().await;
        }
        let answer = self.inner.enqueue(partition, job, limits).await;
        if self.slow_first_enqueue && !self.first_enqueue_slowed.swap(true, Ordering::Relaxed) {
            self.first_enqueue_stored.notify_one();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if self.lose_first_enqueue_reply && !self.enqueue_reply_lost.swap(true, Ordering::Relaxed) {
            return Err(BackendError::new(BackendErrorKind::Timeout));
        }
        answer
    }

    async fn fetch(
        &self,
        partition: &Key,
        request: FetchRequest<'_>,
    ) -> Result<Vec<Delivery>, BackendError> {
        self.fetch_marked(partition, request, 0).await
    }

    async fn fetch_marked(
        &self,
        partition: &Key,
        request: FetchRequest<'_>,
        token: u64,
    ) -> Result<Vec<Delivery>, BackendError> {
        if self.fetch_panics.load(Ordering::Relaxed) {
            self.fetch_panicked.notify_one();
            panic!("a bug in the store's fetch");
        }
        let failing = |left: usize| left.checked_sub(1);
        if self
            .failing_fetches
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, failing)
            .is_ok()
        {
            return Err(BackendError::new(BackendErrorKind::Timeout));
        }
        let answer = self.inner.fetch_marked(partition, request, token).await;
        if self.lose_first_fetch_reply && !self.fetch_reply_lost.swap(true, Ordering::Relaxed) {
            return Err(BackendError::new(BackendErrorKind::Timeout));
        }
        answer
    }

    async fn recover(
        &self,
        partition: &Key,
        consumer: &str,
        token: u64,
        max: usize,
    ) -> Result<Vec<Delivery>, BackendError> {
        if self.failing_recovers.load(Ordering::Relaxed) {
            return Err(BackendError::with_detail(
                BackendErrorKind::Command,
                "ERR the script is refused",
            ));
        }
        self.inner.recover(partition, consumer, token, max).await
    }

    async fn extend(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
    ) -> Result<Fenced, BackendError> {
        self.extends
            .lock()
            .expect("extends lock")
            .push((number, tokio::time::Instant::now()));
        if let Some(takes) = self.failure_takes
            && self.out_of_reach.load(Ordering::Relaxed)
        {
            tokio::time::sleep(takes).await;
            return Err(BackendError::new(BackendErrorKind::Timeout));
        }
        tokio::time::sleep(self.extend_takes).await;
        if self.out_of_reach.load(Ordering::Relaxed) {
            return Err(self.outage());
        }
        self.inner.extend(partition, number, attempt).await
    }

    async fn complete(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        result: Bytes,
        retention: Duration,
    ) -> Result<Fenced, BackendError> {
        let job = Completion {
            number,
            attempt,
            result,
        };
        let mut answers = self
            .complete_many(partition, std::slice::from_ref(&job), retention)
            .await?;
        answers.pop().expect("one answer per job")
    }

    async fn complete_many(
        &self,
        partition: &Key,
        jobs: &[Completion],
        retention: Duration,
    ) -> Result<Completed, BackendError> {
        self.completions
            .lock()
            .expect("completions lock")
            .push((jobs.len(), tokio::time::Instant::now()));
        tokio::time::sleep(self.completion_takes).await;
        if self.out_of_reach.load(Ordering::Relaxed) {
            return Err(self.outage());
        }
        if self
            .read_only_until
            .is_some_and(|until| tokio::time::Instant::now() < until)
        {
            return Err(read_only());
        }
        let answer = self.inner.complete_many(partition, jobs, retention).await;
        if self.resend_first_completion && !self.completion_resent.swap(true, Ordering::Relaxed) {
            return self.inner.complete_many(partition, jobs, retention).await;
        }
        if self.lose_first_completion_reply
            && !self.completion_reply_lost.swap(true, Ordering::Relaxed)
        {
            return Err(BackendError::new(BackendErrorKind::Timeout));
        }
        answer
    }

    async fn retry(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        delay: Duration,
        error: Bytes,
    ) -> Result<Fenced, BackendError> {
        if self.fail_next_retry.swap(false, Ordering::Relaxed) {
            return Err(BackendError::new(BackendErrorKind::Timeout));
        }
        let answer = self
            .inner
            .retry(partition, number, attempt, delay, error.clone())
            .await;
        if self.resend_first_retry && !self.retry_resent.swap(true, Ordering::Relaxed) {
            while self
                .inner
                .status(partition, number)
                .await?
                .is_some_and(|record| record.attempt <= attempt)
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            return self
                .inner
                .retry(partition, number, attempt, delay, error)
                .await;
        }
        if self.lose_first_retry_reply && !self.retry_reply_lost.swap(true, Ordering::Relaxed) {
            return Err(BackendError::new(BackendErrorKind::Timeout));
        }
        answer
    }

    async fn release(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        error: Bytes,
    ) -> Result<Fenced, BackendError> {
        if self
            .releases_answered
            .is_some_and(|answered| self.releases.fetch_add(1, Ordering::Relaxed) >= answered)
        {
            std::future::pending::<()>().await;
        }
        self.inner.release(partition, number, attempt, error).await
    }

    async fn bury(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        error: Bytes,
        retention: Duration,
    ) -> Result<Fenced, BackendError> {
        let failing = |left: usize| left.checked_sub(1);
        if self
            .failing_buries
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, failing)
            .is_ok()
        {
            return Err(BackendError::new(BackendErrorKind::Timeout));
        }
        self.inner
            .bury(partition, number, attempt, error, retention)
            .await
    }

    async fn status(
        &self,
        partition: &Key,
        number: JobNumber,
    ) -> Result<Option<JobRecord>, BackendError> {
        self.inner.status(partition, number).await
    }

    async fn dead_letters(
        &self,
        partition: &Key,
        max: usize,
    ) -> Result<Vec<JobNumber>, BackendError> {
        self.inner.dead_letters(partition, max).await
    }

    async fn newest_of(
        &self,
        partition: &Key,
        subject: &[u8],
    ) -> Result<Option<(JobNumber, Bytes)>, BackendError> {
        // A round trip: the caller's other looks go on meanwhile.
        tokio::task::yield_now().await;
        if self.out_of_reach.load(Ordering::Relaxed) {
            if let Some(takes) = self.failure_takes {
                tokio::time::sleep(takes).await;
                return Err(BackendError::new(BackendErrorKind::Timeout));
            }
            return Err(self.outage());
        }
        self.inner.newest_of(partition, subject).await
    }

    async fn stats(&self, partition: &Key) -> Result<PartitionStats, BackendError> {
        if self.failing_stats.load(Ordering::Relaxed) {
            return Err(BackendError::new(BackendErrorKind::Connection));
        }
        self.inner.stats(partition).await
    }
}

/// A call to a job store, as a fault plan names it (`fetch` is a `fetch_marked`, `complete` a
/// `complete_many`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Call {
    Enqueue,
    Fetch,
    Recover,
    Extend,
    Complete,
    Retry,
    Release,
    Bury,
    Status,
    DeadLetters,
    Leave,
    NewestOf,
    Stats,
}

/// What a call meets while a fault is on.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Fault {
    /// It fails at once, without reaching the store.
    Fail(BackendErrorKind),
    /// It waits this long (a command timeout), then fails with a timeout, without reaching
    /// the store.
    Hang(Duration),
    /// It waits this long (a round trip), then reaches the store.
    Delay(Duration),
}

/// One entry of a fault plan.
#[derive(Clone, Debug)]
struct Rule {
    call: Call,
    /// The local part of the partition's key; every partition when `None`.
    partition: Option<Vec<u8>>,
    fault: Fault,
    /// For ever when `None`.
    until: Option<tokio::time::Instant>,
}

/// One timed call: to which partition (the local part of its key), and when (paused time) it
/// began and got past its fault (`None`: not yet).
#[derive(Clone, Debug)]
pub(crate) struct Timed {
    pub(crate) call: Call,
    pub(crate) partition: Vec<u8>,
    pub(crate) began: tokio::time::Instant,
    pub(crate) ended: Option<tokio::time::Instant>,
}

impl Timed {
    pub(crate) fn to(&self, partition: &str) -> bool {
        self.partition == partition.as_bytes()
    }

    pub(crate) fn in_flight_at(&self, at: tokio::time::Instant) -> bool {
        self.began <= at && self.ended.is_none_or(|ended| at < ended)
    }
}

const CALLS: usize = Call::Stats as usize + 1;

/// The memory job store, with the calls a fault plan names failing, hanging or delayed; the
/// plan changes as a test goes (a partition's node going out of reach and coming back). Each
/// call's fault is decided as it is sent.
#[derive(Clone, Debug, Default)]
pub(crate) struct Faults {
    inner: MemoryJobStore,
    plan: Arc<Mutex<Vec<Rule>>>,
    /// The calls of these kinds are timed.
    timing: Vec<Call>,
    timed: Arc<Mutex<Vec<Timed>>>,
    /// Of each kind, the calls that failed, and those that reached the store.
    failed: Arc<[AtomicUsize; CALLS]>,
    reached: Arc<[AtomicUsize; CALLS]>,
}

impl Faults {
    /// The calls of kind `call` are timed.
    pub(crate) fn timing(mut self, call: Call) -> Self {
        self.timing.push(call);
        self
    }

    /// From now on, `calls` to `partition` (the local part of its key; every partition when
    /// `None`) meet `fault`, for `lasts` (for ever when `None`).
    pub(crate) fn inject(
        &self,
        calls: &[Call],
        partition: Option<&str>,
        fault: Fault,
        lasts: Option<Duration>,
    ) {
        let until = lasts.map(|lasts| tokio::time::Instant::now() + lasts);
        self.plan
            .lock()
            .unwrap()
            .extend(calls.iter().map(|&call| Rule {
                call,
                partition: partition.map(|local| local.as_bytes().to_vec()),
                fault,
                until,
            }));
    }

    /// Every fault is off from now on.
    pub(crate) fn heal(&self) {
        self.plan.lock().unwrap().clear();
    }

    /// The calls of kind `call` that failed so far.
    pub(crate) fn failed(&self, call: Call) -> usize {
        self.failed[call as usize].load(Ordering::Relaxed)
    }

    /// The calls of every kind that failed so far.
    pub(crate) fn failures(&self) -> usize {
        self.failed.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }

    /// The calls of kind `call` that reached the store so far.
    pub(crate) fn reached(&self, call: Call) -> usize {
        self.reached[call as usize].load(Ordering::Relaxed)
    }

    pub(crate) fn timed(&self) -> Vec<Timed> {
        self.timed.lock().unwrap().clone()
    }

    /// Lets `call` to `partition` meet its fault, if one is on; `Ok` once it may reach the
    /// store.
    async fn reach(&self, partition: &Key, call: Call) -> Result<(), BackendError> {
        let timed = self.timing.contains(&call).then(|| {
            let mut timed = self.timed.lock().unwrap();
            timed.push(Timed {
                call,
                partition: partition.local().to_vec(),
                began: tokio::time::Instant::now(),
                ended: None,
            });
            timed.len() - 1
        });
        let now = tokio::time::Instant::now();
        let fault = self
            .plan
            .lock()
            .unwrap()
            .iter()
            .find(|rule| {
                rule.call == call
                    && rule
                        .partition
                        .as_ref()
                        .is_none_or(|local| local.as_slice() == partition.local())
                    && rule.until.is_none_or(|until| now < until)
            })
            .map(|rule| rule.fault);
        let reached = match fault {
            None => Ok(()),
            Some(Fault::Fail(kind)) => Err(BackendError::new(kind)),
            Some(Fault::Hang(takes)) => {
                tokio::time::sleep(takes).await;
                Err(BackendError::new(BackendErrorKind::Timeout))
            }
            Some(Fault::Delay(takes)) => {
                tokio::time::sleep(takes).await;
                Ok(())
            }
        };
        if let Some(at) = timed {
            self.timed.lock().unwrap()[at].ended = Some(tokio::time::Instant::now());
        }
        let counts = if reached.is_ok() {
            &self.reached
        } else {
            &self.failed
        };
        counts[call as usize].fetch_add(1, Ordering::Relaxed);
        reached
    }
}

impl JobStore for Faults {
    async fn enqueue(
        &self,
        partition: &Key,
        job: &NewJob,
        limits: &EnqueueLimits,
    ) -> Result<Enqueued, BackendError> {
        self.reach(partition, Call::Enqueue).await?;
        self.inner.enqueue(partition, job, limits).await
    }

    async fn fetch(
        &self,
        partition: &Key,
        request: FetchRequest<'_>,
    ) -> Result<Vec<Delivery>, BackendError> {
        self.fetch_marked(partition, request, 0).await
    }

    async fn fetch_marked(
        &self,
        partition: &Key,
        request: FetchRequest<'_>,
        token: u64,
    ) -> Result<Vec<Delivery>, BackendError> {
        self.reach(partition, Call::Fetch).await?;
        self.inner.fetch_marked(partition, request, token).await
    }

    async fn recover(
        &self,
        partition: &Key,
        consumer: &str,
        token: u64,
        max: usize,
    ) -> Result<Vec<Delivery>, BackendError> {
        self.reach(partition, Call::Recover).await?;
        self.inner.recover(partition, consumer, token, max).await
    }

    async fn extend(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
    ) -> Result<Fenced, BackendError> {
        self.reach(partition, Call::Extend).await?;
        self.inner.extend(partition, number, attempt).await
    }

    async fn complete(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        result: Bytes,
        retention: Duration,
    ) -> Result<Fenced, BackendError> {
        let job = Completion {
            number,
            attempt,
            result,
        };
        let mut answers = self
            .complete_many(partition, std::slice::from_ref(&job), retention)
            .await?;
        answers.pop().expect("one answer per job")
    }

    async fn complete_many(
        &self,
        partition: &Key,
        jobs: &[Completion],
        retention: Duration,
    ) -> Result<Completed, BackendError> {
        self.reach(partition, Call::Complete).await?;
        self.inner.complete_many(partition, jobs, retention).await
    }

    async fn retry(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        delay: Duration,
        error: Bytes,
    ) -> Result<Fenced, BackendError> {
        self.reach(partition, Call::Retry).await?;
        self.inner
            .retry(partition, number, attempt, delay, error)
            .await
    }

    async fn release(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        error: Bytes,
    ) -> Result<Fenced, BackendError> {
        self.reach(partition, Call::Release).await?;
        self.inner.release(partition, number, attempt, error).await
    }

    async fn bury(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        error: Bytes,
        retention: Duration,
    ) -> Result<Fenced, BackendError> {
        self.reach(partition, Call::Bury).await?;
        self.inner
            .bury(partition, number, attempt, error, retention)
            .await
    }

    async fn status(
        &self,
        partition: &Key,
        number: JobNumber,
    ) -> Result<Option<JobRecord>, BackendError> {
        self.reach(partition, Call::Status).await?;
        self.inner.status(partition, number).await
    }

    async fn dead_letters(
        &self,
        partition: &Key,
        max: usize,
    ) -> Result<Vec<JobNumber>, BackendError> {
        self.reach(partition, Call::DeadLetters).await?;
        self.inner.dead_letters(partition, max).await
    }

    async fn leave(&self, partition: &Key, consumer: &str) -> Result<(), BackendError> {
        self.reach(partition, Call::Leave).await?;
        self.inner.leave(partition, consumer).await
    }

    async fn newest_of(
        &self,
        partition: &Key,
        subject: &[u8],
    ) -> Result<Option<(JobNumber, Bytes)>, BackendError> {
        self.reach(partition, Call::NewestOf).await?;
        self.inner.newest_of(partition, subject).await
    }

    async fn stats(&self, partition: &Key) -> Result<PartitionStats, BackendError> {
        self.reach(partition, Call::Stats).await?;
        self.inner.stats(partition).await
    }
}

/// A current-thread runtime on paused time, for tests that install a subscriber or recorder
/// for this thread.
pub(crate) fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}
