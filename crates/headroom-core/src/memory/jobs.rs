use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::jobs::{
    Completed, Completion, DRAIN_WINDOW, Delivery, EnqueueLimits, Enqueued, FetchRequest,
    JobNumber, JobRecord, JobState, JobStore, MAX_LANES, NewJob, PartitionStats,
};
use crate::lease::Fenced;
use crate::{BackendError, BackendErrorKind, Clock, Key};

/// The hasher of maps whose keys no client chooses, so that hash flooding cannot reach them.
type FastHash = foldhash::fast::RandomState;

/// What a job costs beyond its payload, result and error bytes: record, indexes and
/// bookkeeping, rounded up.
const JOB_OVERHEAD: usize = 160;

/// The most dead letters listed per partition; older ones stay readable by `status` until
/// their retention passes.
const MAX_DEAD_LETTERS: usize = 10_000;

/// An in-memory [`JobStore`] for services that run one process.
///
/// Jobs live in maps behind one mutex per store; every step is a few map and queue operations,
/// and expired records (done, dead, dedup keys) are dropped in deadline order as steps run,
/// each in O(log n), never by a scan.
///
/// Memory is bounded in bytes (payloads, results, errors and dedup keys, plus a fixed overhead
/// per job) besides each partition's own bound on unfinished jobs. An enqueue that would pass
/// the byte bound first drops finished records (done and dead), those whose retention ends
/// first, before it ends, then the dedup keys of finished jobs, those whose window ends first
/// (a key dropped so no longer catches a duplicate; an unfinished job keeps its key); only
/// when unfinished work fills the bound is it refused with
/// [`BackendErrorKind::Unavailable`]. Completing, retrying and
/// burying are never refused, since refusing them would run a job again.
///
/// Jobs do not outlive the process: use the Redis job store when they must.
#[derive(Clone, Debug)]
pub struct MemoryJobStore {
    inner: Arc<Inner>,
}

/// Builds a [`MemoryJobStore`].
#[derive(Debug)]
#[must_use]
pub struct MemoryJobStoreBuilder {
    clock: Clock,
    max_bytes: usize,
}

impl MemoryJobStoreBuilder {
    /// The clock for delays, visibility and retention (default: the system clock).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The most bytes held (default 256 MiB).
    pub fn max_bytes(mut self, max: usize) -> Self {
        self.max_bytes = max.max(1);
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryJobStore {
        MemoryJobStore {
            inner: Arc::new(Inner {
                clock: self.clock,
                max_bytes: self.max_bytes,
                state: Mutex::new(State::default()),
            }),
        }
    }
}

impl MemoryJobStore {
    /// A store on the system clock with the default bound.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder with the defaults.
    pub fn builder() -> MemoryJobStoreBuilder {
        MemoryJobStoreBuilder {
            clock: Clock::system(),
            max_bytes: 256 << 20,
        }
    }

    /// The bytes held now, as counted against the bound.
    pub fn bytes(&self) -> usize {
        self.inner.state.lock().bytes
    }

    fn with<T>(&self, partition: &Key, step: impl FnOnce(&mut Partition, Now<'_>) -> T) -> T {
        let now_ms = self.inner.clock.unix_millis();
        let mut state = self.inner.state.lock();
        self.within(&mut state, partition, now_ms, step)
    }

    /// [`with`](Self::with), for a caller that holds the lock already.
    fn within<T>(
        &self,
        state: &mut State,
        partition: &Key,
        now_ms: u64,
        step: impl FnOnce(&mut Partition, Now<'_>) -> T,
    ) -> T {
        let State { partitions, bytes } = state;
        let partition = match partitions.get_mut(partition.as_bytes()) {
            Some(partition) => partition,
            None => partitions.entry(partition.to_bytes()).or_default(),
        };
        partition.expire(now_ms, bytes);
        step(
            partition,
            Now {
                ms: now_ms,
                bytes,
                max_bytes: self.inner.max_bytes,
            },
        )
    }
}

impl Default for MemoryJobStore {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug)]
struct Inner {
    clock: Clock,
    max_bytes: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// By the partitions' keys, which the application names (not its clients).
    partitions: HashMap<Bytes, Partition, FastHash>,
    bytes: usize,
}

impl State {
    /// Whether dropping finished records and the keys they release would let `need` more
    /// bytes fit. Counts only until they would: when they would not, they total less than
    /// `need`, so at most about `need` bytes of them are looked at.
    fn can_make_room(&self, need: usize, max: usize) -> bool {
        let mut over = self.bytes.saturating_add(need).saturating_sub(max);
        for p in self.partitions.values() {
            if over == 0 {
                break;
            }
            let records = p.finished.iter().filter_map(|(_, number)| {
                let job = p.jobs.get(number)?;
                let key = job
                    .dedup_key
                    .as_ref()
                    .filter(|key| p.dedup.get(*key).map(|&(guarded, _)| guarded) == Some(*number));
                Some(job.bytes() + key.map_or(0, |key| JOB_OVERHEAD + key.len()))
            });
            let keys = p.released.iter().map(|(_, key)| JOB_OVERHEAD + key.len());
            for freed in records.chain(keys) {
                over = over.saturating_sub(freed);
                if over == 0 {
                    break;
                }
            }
        }
        over == 0
    }

    /// Drops finished records (done and dead), those whose retention ends first, then dedup
    /// keys, those whose window ends first, until `need` more bytes fit or none is left: kept
    /// results and keys must not stop new work.
    fn make_room(&mut self, need: usize, max: usize) {
        while self.bytes.saturating_add(need) > max {
            let first = self
                .partitions
                .values_mut()
                .filter_map(|p| p.finished.first().copied().map(|first| (first, p)))
                .min_by_key(|(first, _)| *first);
            let Some(((_, number), partition)) = first else {
                break;
            };
            partition.finished.pop_first();
            partition.drop_record(number, &mut self.bytes);
        }
        // Every finished record is gone by now: the released keys are those of finished jobs
        // (a key whose job still has a record guards an unfinished job, and stays).
        while self.bytes.saturating_add(need) > max {
            let first = self
                .partitions
                .values_mut()
                .filter_map(|p| p.released.first().cloned().map(|first| (first, p)))
                .min_by_key(|((at, _), _)| *at);
            let Some(((at, key), partition)) = first else {
                return;
            };
            partition.drop_dedup_key(at, key, &mut self.bytes);
        }
    }
}

/// The time of a step and the store's byte books.
struct Now<'a> {
    ms: u64,
    bytes: &'a mut usize,
    max_bytes: usize,
}

impl Now<'_> {
    /// The same time and books, for one more use.
    fn reborrow(&mut self) -> Now<'_> {
        Now {
            ms: self.ms,
            bytes: self.bytes,
            max_bytes: self.max_bytes,
        }
    }
}

#[derive(Debug, Default)]
struct Partition {
    last_number: JobNumber,
    /// By the numbers the store gives: no client chooses them.
    jobs: HashMap<JobNumber, Job, FastHash>,
    lanes: [VecDeque<JobNumber>; MAX_LANES as usize],
    /// Waiting jobs by due time.
    delayed: BTreeSet<(u64, JobNumber)>,
    /// Running jobs by the time their visibility was last counted from.
    running: BTreeSet<(u64, JobNumber)>,
    /// Done and dead jobs by the end of their retention.
    finished: BTreeSet<(u64, JobNumber)>,
    dedup: HashMap<Bytes, (JobNumber, u64)>,
    dedup_expiry: BTreeSet<(u64, Bytes)>,
    /// The dedup keys whose job's record is gone (it finished and its record was dropped),
    /// by the end of their window: the ones room can be made from.
    released: BTreeSet<(u64, Bytes)>,
    tenants: HashMap<Bytes, u64>,
    /// The newest job of each subject and its rank, while it is unfinished.
    subjects: HashMap<Bytes, (u64, JobNumber)>,
    unfinished: u64,
    dead: VecDeque<JobNumber>,
    drain: Drain,
}

#[derive(Debug)]
struct Job {
    state: JobState,
    attempt: u32,
    /// Deliveries handed back uncharged.
    handed_back: u32,
    lane: u8,
    payload: Option<Bytes>,
    tenant: Option<Bytes>,
    enqueued_at_ms: u64,
    result: Option<Bytes>,
    error: Option<Bytes>,
    /// While running: when its visibility was last counted from. While waiting: its due time.
    /// Once finished: when its retention ends.
    at_ms: u64,
    /// While running: the visibility its holder fetched it with (ms).
    visibility_ms: u64,
    /// Its dedup key (counted with the key's own bytes, not the job's).
    dedup_key: Option<Bytes>,
    subject: Option<Bytes>,
    /// While running: the token of the fetch that delivered it (0 for none), and whether that
    /// delivery took it over, so that [`JobStore::recover`] can deliver it again as it was.
    token: u64,
    taken_over: bool,
}

impl Job {
    /// The running job's current delivery.
    fn delivery(&self, number: JobNumber) -> Delivery {
        Delivery {
            number,
            attempt: self.attempt,
            lane: self.lane,
            payload: self.payload.clone().unwrap_or_default(),
            tenant: self.tenant.clone(),
            enqueued_at_ms: self.enqueued_at_ms,
            taken_over: self.taken_over,
            handed_back: self.handed_back,
        }
    }

    /// Changes the job's fields with `change`, keeping the store's byte books.
    fn change(&mut self, bytes: &mut usize, change: impl FnOnce(&mut Self)) {
        let before = self.bytes();
        change(self);
        *bytes = *bytes - before + self.bytes();
    }

    fn bytes(&self) -> usize {
        let len = |b: &Option<Bytes>| b.as_ref().map_or(0, Bytes::len);
        JOB_OVERHEAD
            + len(&self.payload)
            + len(&self.tenant)
            + len(&self.subject)
            + len(&self.result)
            + len(&self.error)
    }
}

/// Jobs finished per bucket of [`DRAIN_WINDOW`]: the current bucket and the one before.
#[derive(Debug, Default)]
struct Drain {
    bucket: u64,
    current: u64,
    previous: u64,
}

impl Drain {
    fn window_ms() -> u64 {
        DRAIN_WINDOW.as_millis() as u64
    }

    fn roll(&mut self, now_ms: u64) {
        let bucket = now_ms / Self::window_ms();
        if bucket != self.bucket {
            self.previous = if bucket == self.bucket + 1 {
                self.current
            } else {
                0
            };
            self.current = 0;
            self.bucket = bucket;
        }
    }

    fn record(&mut self, now_ms: u64) {
        self.roll(now_ms);
        self.current += 1;
    }

    /// The previous bucket weighted by how much of it still lies within one window of now,
    /// plus the current bucket, per second.
    fn per_sec(&mut self, now_ms: u64) -> f64 {
        self.roll(now_ms);
        let into = (now_ms % Self::window_ms()) as f64 / Self::window_ms() as f64;
        (self.previous as f64 * (1.0 - into) + self.current as f64) / DRAIN_WINDOW.as_secs_f64()
    }
}

fn fits(bytes: &usize, more: usize, max: usize) -> Result<(), BackendError> {
    if bytes.saturating_add(more) > max {
        return Err(BackendError::with_detail(
            BackendErrorKind::Unavailable,
            format!("the memory job store holds {bytes} of its {max} bytes"),
        ));
    }
    Ok(())
}

fn lane_index(lane: u8) -> Result<usize, BackendError> {
    if lane < MAX_LANES {
        Ok(usize::from(lane))
    } else {
        Err(BackendError::with_detail(
            BackendErrorKind::Config,
            format!("lane {lane} is not below {MAX_LANES}"),
        ))
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl Partition {
    /// What an enqueue of `job` answers without adding it: a duplicate, or full.
    fn answer_without_adding(
        &mut self,
        job: &NewJob,
        limits: &EnqueueLimits,
        now_ms: u64,
    ) -> Option<Enqueued> {
        if let Some(key) = &job.dedup_key
            && let Some(&(number, _)) = self.dedup.get(key)
        {
            return Some(Enqueued::Duplicate(number));
        }
        if let (Some(tenant), Some(max)) = (&job.tenant, limits.max_per_tenant) {
            let depth = self.tenants.get(tenant).copied().unwrap_or(0);
            if depth >= max {
                return Some(Enqueued::Full {
                    tenant: true,
                    depth,
                    drained_per_sec: self.drain.per_sec(now_ms),
                    unfinished: self.unfinished,
                });
            }
        }
        (self.unfinished >= limits.max_len).then(|| Enqueued::Full {
            tenant: false,
            depth: self.unfinished,
            drained_per_sec: self.drain.per_sec(now_ms),
            unfinished: self.unfinished,
        })
    }

    /// Drops the records whose retention ended and the dedup keys whose window passed.
    fn expire(&mut self, now_ms: u64, bytes: &mut usize) {
        while let Some(&(at, number)) = self.finished.first() {
            if at > now_ms {
                break;
            }
            self.finished.pop_first();
            self.drop_record(number, bytes);
        }
        while let Some((at, _)) = self.dedup_expiry.first() {
            if *at > now_ms {
                break;
            }
            let (at, key) = self.dedup_expiry.pop_first().expect("checked above");
            self.drop_dedup_key(at, key, bytes);
        }
    }

    /// Drops the record of a finished job; its dedup key, if it still guards it, is released.
    fn drop_record(&mut self, number: JobNumber, bytes: &mut usize) {
        let Some(job) = self.jobs.remove(&number) else {
            return;
        };
        *bytes -= job.bytes();
        if let Some(key) = job.dedup_key
            && let Some(&(guarded, until)) = self.dedup.get(&key)
            && guarded == number
        {
            self.released.insert((until, key));
        }
    }

    /// Drops a dedup key whose window ends at `at`.
    fn drop_dedup_key(&mut self, at: u64, key: Bytes, bytes: &mut usize) {
        self.dedup_expiry.remove(&(at, key.clone()));
        self.released.remove(&(at, key.clone()));
        self.dedup.remove(&key);
        *bytes -= JOB_OVERHEAD + key.len();
    }

    /// The job held by `attempt`, if it is running.
    fn held(&mut self, number: JobNumber, attempt: u32) -> Option<&mut Job> {
        self.jobs
            .get_mut(&number)
            .filter(|job| job.state == JobState::Running && job.attempt == attempt)
    }

    /// Takes `number` out of the running set and off the books of unfinished jobs.
    fn finish(&mut self, number: JobNumber, state: JobState, until_ms: u64, now_ms: u64) {
        let job = self.jobs.get_mut(&number).expect("a held job");
        self.running.remove(&(job.at_ms, number));
        job.state = state;
        job.at_ms = until_ms;
        self.finished.insert((until_ms, number));
        self.unfinished -= 1;
        if let Some(subject) = &job.subject
            && self.subjects.get(subject).map(|&(_, newest)| newest) == Some(number)
        {
            self.subjects.remove(subject);
        }
        if let Some(tenant) = &job.tenant
            && let Some(count) = self.tenants.get_mut(tenant)
        {
            *count -= 1;
            if *count == 0 {
                self.tenants.remove(tenant);
            }
        }
        self.drain.record(now_ms);
    }

    /// Puts the job held by `attempt` back after `delay`, as retrying; `handed_back`: its
    /// holder hands it back unfinished, uncharged.
    fn put_back(
        &mut self,
        number: JobNumber,
        attempt: u32,
        delay: Duration,
        error: Bytes,
        now: Now<'_>,
        handed_back: bool,
    ) -> Fenced {
        let Some(job) = self.held(number, attempt) else {
            return Fenced::Rejected;
        };
        // A hand-back is no failed attempt: the last failure's error stays.
        if !handed_back || job.error.is_none() {
            job.change(now.bytes, |job| job.error = Some(error));
        }
        let since = job.at_ms;
        let due = now.ms.saturating_add(millis(delay));
        job.state = JobState::Retrying;
        job.at_ms = due;
        job.handed_back += u32::from(handed_back);
        self.running.remove(&(since, number));
        self.delayed.insert((due, number));
        Fenced::Applied
    }

    /// Makes the job held by `attempt` done, keeping `result` for `retention`.
    fn complete(
        &mut self,
        number: JobNumber,
        attempt: u32,
        result: Bytes,
        retention: Duration,
        now: Now<'_>,
    ) -> Fenced {
        let Some(job) = self.held(number, attempt) else {
            return Fenced::Rejected;
        };
        job.change(now.bytes, |job| {
            job.payload = None;
            job.result = Some(result);
        });
        let until = now.ms.saturating_add(millis(retention));
        self.finish(number, JobState::Done, until, now.ms);
        Fenced::Applied
    }

    fn deliver(
        &mut self,
        number: JobNumber,
        taken_over: bool,
        now_ms: u64,
        (visibility_ms, token): (u64, u64),
    ) -> Delivery {
        let job = self.jobs.get_mut(&number).expect("a queued job");
        job.state = JobState::Running;
        job.attempt += 1;
        job.at_ms = now_ms;
        job.visibility_ms = visibility_ms;
        job.token = token;
        job.taken_over = taken_over;
        self.running.insert((now_ms, number));
        job.delivery(number)
    }
}

impl JobStore for MemoryJobStore {
    async fn enqueue(
        &self,
        partition: &Key,
        job: &NewJob,
        limits: &EnqueueLimits,
    ) -> Result<Enqueued, BackendError> {
        let lane = lane_index(job.lane)?;
        let need = JOB_OVERHEAD
            + job.payload.len()
            + job.tenant.as_ref().map_or(0, Bytes::len)
            + job.subject.as_ref().map_or(0, Bytes::len)
            + job.dedup_key.as_ref().map_or(0, |k| JOB_OVERHEAD + k.len());
        let now_ms = self.inner.clock.unix_millis();
        let max_bytes = self.inner.max_bytes;
        let mut state = self.inner.state.lock();
        if state.bytes.saturating_add(need) > max_bytes {
            // A duplicate or a refused job needs no room: answered before room is made, which
            // drops kept results and dedup keys.
            let answer = self.within(&mut state, partition, now_ms, |p, now| {
                p.answer_without_adding(job, limits, now.ms)
            });
            if let Some(answer) = answer {
                return Ok(answer);
            }
            if !state.can_make_room(need, max_bytes) {
                // Unfinished work fills the bound: refused without dropping anything.
                fits(&state.bytes, need, max_bytes)?;
            }
            state.make_room(need, max_bytes);
        }
        self.within(&mut state, partition, now_ms, |p, now| {
            if let Some(answer) = p.answer_without_adding(job, limits, now.ms) {
                return Ok(answer);
            }
            let due = now.ms.saturating_add(millis(job.delay));
            let record = Job {
                state: JobState::Queued,
                attempt: 0,
                handed_back: 0,
                lane: job.lane,
                payload: Some(job.payload.clone()),
                tenant: job.tenant.clone(),
                enqueued_at_ms: now.ms,
                result: None,
                error: None,
                at_ms: due,
                visibility_ms: 0,
                dedup_key: job.dedup_key.clone(),
                subject: job.subject.clone(),
                token: 0,
                taken_over: false,
            };
            let dedup_bytes = job.dedup_key.as_ref().map_or(0, |k| JOB_OVERHEAD + k.len());
            fits(now.bytes, record.bytes() + dedup_bytes, now.max_bytes)?;
            *now.bytes += record.bytes() + dedup_bytes;
            p.last_number += 1;
            let number = p.last_number;
            if job.delay.is_zero() {
                p.lanes[lane].push_back(number);
            } else {
                p.delayed.insert((due, number));
            }
            if let Some(key) = &job.dedup_key {
                let until = now.ms.saturating_add(millis(limits.dedup_window));
                p.dedup.insert(key.clone(), (number, until));
                p.dedup_expiry.insert((until, key.clone()));
            }
            if let Some(tenant) = &job.tenant {
                *p.tenants.entry(tenant.clone()).or_default() += 1;
            }
            if let Some(subject) = &job.subject {
                let outranked = p
                    .subjects
                    .get(subject)
                    .is_some_and(|&(rank, _)| rank > job.subject_rank);
                if !outranked {
                    p.subjects
                        .insert(subject.clone(), (job.subject_rank, number));
                }
            }
            p.unfinished += 1;
            p.jobs.insert(number, record);
            Ok(Enqueued::Added(number))
        })
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
        for &lane in request.lanes {
            lane_index(lane)?;
        }
        self.with(partition, |p, now| {
            while let Some(&(due, number)) = p.delayed.first() {
                if due > now.ms {
                    break;
                }
                p.delayed.pop_first();
                let lane = p.jobs[&number].lane;
                p.lanes[usize::from(lane)].push_back(number);
            }
            let mut deliveries = Vec::new();
            // Deliveries idle for their holder's visibility, and for this fetch's, longest idle
            // first.
            let visibility = millis(request.visibility);
            let lapsed: Vec<(u64, JobNumber)> = p
                .running
                .iter()
                .take_while(|&&(since, _)| now.ms.saturating_sub(since) >= visibility)
                .filter(|&&(since, number)| {
                    now.ms.saturating_sub(since) >= p.jobs[&number].visibility_ms
                })
                .take(request.max)
                .copied()
                .collect();
            for (since, number) in lapsed {
                p.running.remove(&(since, number));
                deliveries.push(p.deliver(number, true, now.ms, (visibility, token)));
            }
            for &lane in request.lanes {
                while deliveries.len() < request.max {
                    let Some(number) = p.lanes[usize::from(lane)].pop_front() else {
                        break;
                    };
                    deliveries.push(p.deliver(number, false, now.ms, (visibility, token)));
                }
            }
            Ok(deliveries)
        })
    }

    /// Scans the running jobs: it runs only after a fetch failed, never on a fetch's way.
    async fn recover(
        &self,
        partition: &Key,
        _consumer: &str,
        token: u64,
        max: usize,
    ) -> Result<Vec<Delivery>, BackendError> {
        if token == 0 {
            return Ok(Vec::new());
        }
        Ok(self.with(partition, |p, now| {
            let marked: Vec<(u64, JobNumber)> = p
                .running
                .iter()
                .filter(|&(_, number)| p.jobs[number].token == token)
                .take(max)
                .copied()
                .collect();
            marked
                .into_iter()
                .map(|(since, number)| {
                    p.running.remove(&(since, number));
                    p.running.insert((now.ms, number));
                    let job = p.jobs.get_mut(&number).expect("a running job");
                    job.at_ms = now.ms;
                    job.delivery(number)
                })
                .collect()
        }))
    }

    async fn extend(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
    ) -> Result<Fenced, BackendError> {
        Ok(self.with(partition, |p, now| {
            let Some(job) = p.held(number, attempt) else {
                return Fenced::Rejected;
            };
            let since = std::mem::replace(&mut job.at_ms, now.ms);
            p.running.remove(&(since, number));
            p.running.insert((now.ms, number));
            Fenced::Applied
        }))
    }

    async fn complete(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        result: Bytes,
        retention: Duration,
    ) -> Result<Fenced, BackendError> {
        Ok(self.with(partition, |p, now| {
            p.complete(number, attempt, result, retention, now)
        }))
    }

    async fn complete_many(
        &self,
        partition: &Key,
        jobs: &[Completion],
        retention: Duration,
    ) -> Result<Completed, BackendError> {
        Ok(self.with(partition, |p, mut now| {
            jobs.iter()
                .map(|job| {
                    Ok(p.complete(
                        job.number,
                        job.attempt,
                        job.result.clone(),
                        retention,
                        now.reborrow(),
                    ))
                })
                .collect()
        }))
    }

    async fn retry(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        delay: Duration,
        error: Bytes,
    ) -> Result<Fenced, BackendError> {
        Ok(self.with(partition, |p, now| {
            p.put_back(number, attempt, delay, error, now, false)
        }))
    }

    async fn release(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        error: Bytes,
    ) -> Result<Fenced, BackendError> {
        Ok(self.with(partition, |p, now| {
            p.put_back(number, attempt, Duration::ZERO, error, now, true)
        }))
    }

    async fn bury(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        error: Bytes,
        retention: Duration,
    ) -> Result<Fenced, BackendError> {
        Ok(self.with(partition, |p, now| {
            let Some(job) = p.held(number, attempt) else {
                return Fenced::Rejected;
            };
            job.change(now.bytes, |job| job.error = Some(error));
            let until = now.ms.saturating_add(millis(retention));
            p.finish(number, JobState::Dead, until, now.ms);
            p.dead.push_front(number);
            p.dead.truncate(MAX_DEAD_LETTERS);
            Fenced::Applied
        }))
    }

    async fn status(
        &self,
        partition: &Key,
        number: JobNumber,
    ) -> Result<Option<JobRecord>, BackendError> {
        Ok(self.with(partition, |p, _| {
            p.jobs.get(&number).map(|job| JobRecord {
                state: job.state,
                attempt: job.attempt,
                lane: job.lane,
                enqueued_at_ms: job.enqueued_at_ms,
                tenant: job.tenant.clone(),
                payload: job.payload.clone(),
                result: job.result.clone(),
                error: job.error.clone(),
            })
        }))
    }

    async fn dead_letters(
        &self,
        partition: &Key,
        max: usize,
    ) -> Result<Vec<JobNumber>, BackendError> {
        Ok(self.with(partition, |p, _| {
            let jobs = &p.jobs;
            p.dead.retain(|number| jobs.contains_key(number));
            p.dead.iter().take(max).copied().collect()
        }))
    }

    async fn newest_of(
        &self,
        partition: &Key,
        subject: &[u8],
    ) -> Result<Option<(JobNumber, Bytes)>, BackendError> {
        Ok(self.with(partition, |p, _| {
            let (_, number) = *p.subjects.get(subject)?;
            let payload = p.jobs.get(&number)?.payload.clone()?;
            Some((number, payload))
        }))
    }

    async fn stats(&self, partition: &Key) -> Result<PartitionStats, BackendError> {
        Ok(self.with(partition, |p, _| {
            let jobs = &p.jobs;
            p.dead.retain(|number| jobs.contains_key(number));
            PartitionStats {
                unfinished: p.unfinished,
                ready: p.lanes.iter().map(VecDeque::len).sum::<usize>() as u64,
                running: p.running.len() as u64,
                delayed: p.delayed.len() as u64,
                oldest_ready_ms: p
                    .lanes
                    .iter()
                    .filter_map(|lane| lane.front())
                    .map(|number| jobs[number].enqueued_at_ms)
                    .min(),
                dead: p.dead.len() as u64,
            }
        }))
    }
}
