//! The peer of headroom's job worker: apalis 1.0 with its Redis backend, apalis-redis 1.0.0.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use apalis::prelude::{TaskSink, WorkerBuilder, WorkerBuilderExt, WorkerContext};
use apalis_redis::{Config, ConnectionManager, RedisStorage};
use serde::{Deserialize, Serialize};

/// The job the peer's worker runs: as small as a job gets.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct PeerJob {
    /// The job's number.
    pub n: u64,
}

/// The fetch batch [`apalis_drain`] uses unless `concurrency` is larger.
pub const APALIS_BATCH: usize = 100;

/// Jobs per call of apalis' bulk push (one Lua script each).
const PUSH_CHUNK: u64 = 1_000;

/// Task ids per round trip of `promote_scheduled`.
const PROMOTE_CHUNK: isize = 1_000;

/// Pushes `jobs` jobs (each a [`PeerJob`]) into an apalis-redis queue named `queue` on
/// `redis_url`, then starts one apalis worker with `concurrency` concurrent handlers whose
/// handler does nothing but count, and returns the time from the worker's start until the last
/// job completed (the push is not timed).
///
/// The queue must be new: the call panics if `queue` already holds tasks, so give each call its
/// own name. Run it on a tokio runtime (apalis-redis's client is redis-rs on tokio).
///
/// # What is timed
///
/// From just before `Worker::run` (so the worker's registration with the queue and its first
/// fetch count) until the handler of the `jobs`-th job returns. That handler then calls
/// `WorkerContext::stop`, apalis' own way to end a worker from a handler: the worker waits for
/// the handlers in flight, writes the results not yet written and deregisters. That shutdown
/// is not timed (it is one more round trip of results). After it, untimed, the call checks
/// that apalis recorded every job as done (`{queue}:done` holds `jobs` ids), so a run that lost
/// a job panics instead of reporting a throughput.
///
/// # Settings
///
/// Everything is apalis' default except:
///
/// - `Config::batch_size(max(concurrency, APALIS_BATCH = 100))`, the tasks one fetch script
///   takes (default 10). Its doc: "Larger batches can improve throughput by reducing the
///   number of queue operations". The worker fetches only once its batch is used up, and
///   writes the finished tasks' results just before, so each batch costs two round trips in
///   series that no handler overlaps; a batch below `concurrency` would also leave handlers
///   idle. 100 is the batch of apalis-redis's own worker tests. On this 2-core machine at
///   concurrency 8: batch 10 about 20,000 jobs/s, 32 and 50 30,000-45,000, 100 about 50,000,
///   and 250 and 1,000 no faster than 100.
/// - `Config::lock_tasks(false)` (default `true`). Its doc: it "can be turned off for tasks that
///   last shorter than a worker heartbeat as lease renewal will not be helpful", and a counting
///   handler lasts microseconds against the 30 s heartbeat. With it on, every task also takes
///   a lease through a script whose `LREM` scans the whole waiting list, and the drain runs at
///   about 6,000-8,000 jobs/s here. Delivery stays at least once: a fetched task is still in
///   the worker's in-flight set until its result is written, and another worker's heartbeat
///   re-enqueues the in-flight tasks of a dead one.
/// - `concurrency` through `WorkerBuilderExt::concurrency` (feature `limit`), a
///   `tower::limit::ConcurrencyLimit`: how apalis 1.0 bounds the tasks in flight. The handlers
///   run as futures on the worker's own task; `parallelize(tokio::spawn)` is not used, as with
///   a handler that only counts it was slower (about 33,000 jobs/s).
///
/// Kept at their defaults: `persist_results` (`true`: writing the result is what marks a task
/// done and takes it out of the in-flight set), `emit_events` (`true`: one `PUBLISH` per task to
/// a channel no one listens to; turning it off made no measurable difference), the 30 s
/// heartbeat, the JSON codec, and the polling: apalis-redis fetches the next batch as soon as
/// one is used up, with no poll interval unless one is added with `poll_with_interval`.
///
/// # A limitation of apalis-redis 1.0.0 worked around
///
/// Every push lands in the queue's scheduled set (its run time is clamped to now), and each
/// fetch first moves all the due scheduled tasks to the waiting list with one Lua `unpack`,
/// which fails beyond about 8,000 ids ("too many results to unpack"): a worker cannot start on
/// a queue filled with 10,000 tasks. So after the push, untimed, `promote_scheduled` makes
/// that move itself in chunks of 1,000, in the same order; the worker's fetches then find the
/// scheduled set empty. This leaves the move of each task out of the timed part, which favours
/// apalis a little: apalis' own script moved 7,000 ids in 4.3 ms of server time here, so about
/// 6 ms for 10,000, some 3% of a 200 ms drain.
///
/// # Panics
///
/// If Redis cannot be reached, the queue is not new, apalis fails, or it did not record every
/// job as done.
pub async fn apalis_drain(redis_url: &str, queue: &str, jobs: u64, concurrency: usize) -> Duration {
    assert!(jobs > 0, "no jobs to drain");
    assert!(concurrency > 0, "no handlers");
    let config = Config::default()
        .queue(queue)
        .batch_size(concurrency.max(APALIS_BATCH))
        .lock_tasks(false);
    let conn = apalis_redis::connect(redis_url)
        .await
        .expect("connect to Redis");
    let mut check = conn.clone();
    let keys = [
        config.active_jobs_list(),
        config.scheduled_jobs_set(),
        config.job_data_hash(),
        config.done_jobs_set(),
    ];
    let existing: u64 = redis::cmd("EXISTS")
        .arg(&keys)
        .query_async(&mut check)
        .await
        .expect("EXISTS");
    assert_eq!(existing, 0, "apalis queue {queue:?} is not new");

    let mut storage = RedisStorage::<PeerJob>::new(conn).with_config(config.clone());
    let mut next = 0;
    while next < jobs {
        let end = jobs.min(next + PUSH_CHUNK);
        storage
            .push_bulk((next..end).map(|n| PeerJob { n }).collect())
            .await
            .expect("push jobs");
        next = end;
    }
    promote_scheduled(&mut check, &config).await;

    let done = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(OnceLock::<Instant>::new());
    let handler = {
        let (done, finished) = (Arc::clone(&done), Arc::clone(&finished));
        move |_job: PeerJob, worker: WorkerContext| {
            let (done, finished) = (Arc::clone(&done), Arc::clone(&finished));
            async move {
                if done.fetch_add(1, Ordering::Relaxed) + 1 == jobs {
                    let _ = finished.set(Instant::now());
                    worker.stop().expect("stop the worker");
                }
            }
        }
    };
    let worker = WorkerBuilder::new(format!("{queue}-worker"))
        .backend(storage)
        .concurrency(concurrency)
        .build(handler);

    let started = Instant::now();
    Box::pin(worker.run()).await.expect("apalis worker");
    let finished = *finished
        .get()
        .expect("the worker stopped before the last job");
    assert_eq!(done.load(Ordering::Relaxed), jobs, "jobs run");

    let recorded: u64 = redis::cmd("SCARD")
        .arg(config.done_jobs_set())
        .query_async(&mut check)
        .await
        .expect("SCARD");
    assert_eq!(recorded, jobs, "jobs apalis recorded as done");
    finished - started
}

/// Moves every task of `config`'s queue from its scheduled set to its waiting list, in the
/// order apalis-redis's fetch script would (by run time, then id), `PROMOTE_CHUNK` at a time.
/// See "A limitation of apalis-redis 1.0.0 worked around" on [`apalis_drain`].
async fn promote_scheduled(conn: &mut ConnectionManager, config: &Config) {
    let (scheduled, waiting) = (config.scheduled_jobs_set(), config.active_jobs_list());
    loop {
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(&scheduled)
            .arg(0)
            .arg(PROMOTE_CHUNK - 1)
            .query_async(conn)
            .await
            .expect("ZRANGE");
        if ids.is_empty() {
            return;
        }
        let () = redis::pipe()
            .atomic()
            .cmd("RPUSH")
            .arg(&waiting)
            .arg(&ids)
            .ignore()
            .cmd("ZREM")
            .arg(&scheduled)
            .arg(&ids)
            .ignore()
            .query_async(conn)
            .await
            .expect("move scheduled tasks to the waiting list");
    }
}
