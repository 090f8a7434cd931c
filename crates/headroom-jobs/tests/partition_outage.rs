//! Workers while one partition's store node is out of reach (a Redis Cluster master failing
//! over), or slow to answer some calls: the other partitions' jobs go on.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use headroom_core::jobs::JobStore;
use headroom_jobs::{Job, JobError, JobId, JobQueue, JobState};
use support::{Call, Fault, Faults};

/// How long a call to the partition out of reach takes to fail: a Redis client's command
/// timeout.
const COMMAND_TIMEOUT: Duration = Duration::from_millis(500);

const EVERY_CALL: [Call; 10] = [
    Call::Fetch,
    Call::Recover,
    Call::Extend,
    Call::Complete,
    Call::Retry,
    Call::Release,
    Call::Bury,
    Call::Status,
    Call::Stats,
    Call::Leave,
];

/// `calls` to the partition (the key whose local part is `local`) fail from now on, for
/// `lasts`: each waits [`COMMAND_TIMEOUT`], then fails with a timeout, without reaching the
/// store.
fn fail(store: &Faults, local: &str, calls: &[Call], lasts: Duration) {
    store.inject(
        calls,
        Some(local),
        Fault::Hang(COMMAND_TIMEOUT),
        Some(lasts),
    );
}

/// A route whose jobs go to `partition`, found by enqueueing a probe (held back a day, so it
/// is never delivered here) for each candidate and reading its partition.
async fn a_route_in<S: JobStore>(queue: &JobQueue<S>, partition: u16) -> Bytes {
    for candidate in 0.. {
        let route = Bytes::from(format!("route-{candidate}"));
        let probe = Job::new("probe")
            .route(route.clone())
            .delay(Duration::from_secs(86_400));
        if queue.enqueue(probe).await.unwrap().id.partition() == partition {
            return route;
        }
    }
    unreachable!()
}

async fn done_among<S: JobStore>(queue: &JobQueue<S>, ids: &[JobId]) -> usize {
    let mut done = 0;
    for &id in ids {
        if queue.status(id).await.unwrap().map(|s| s.state) == Some(JobState::Done) {
            done += 1;
        }
    }
    done
}

/// One partition out of reach (its master failing over for 25 s) while the worker's fetch of it
/// timed out: the worker takes that fetch's jobs back when the partition answers again, and
/// meanwhile goes on fetching the other partitions, whose jobs run at once rather than after
/// the failover (or a visibility).
#[tokio::test(start_paused = true)]
async fn a_partition_out_of_reach_holds_back_no_other_partitions_jobs() {
    let store = Faults::default();
    let queue = JobQueue::builder("failover", store.clone())
        .partitions(2)
        .build()
        .unwrap();
    let route = a_route_in(&queue, 1).await;
    fail(&store, "{failover.0}", &EVERY_CALL, Duration::from_secs(25));
    let worker = queue
        .worker(|_job| async { Ok(Bytes::new()) })
        .visibility(Duration::from_secs(30))
        .start()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        store.failed(Call::Fetch) > 0,
        "the worker never fetched the partition out of reach"
    );
    let mut ids = Vec::new();
    for i in 0..10 {
        let enqueued = queue
            .enqueue(Job::new(i.to_string()).route(route.clone()))
            .await
            .unwrap();
        assert_eq!(enqueued.id.partition(), 1);
        ids.push(enqueued.id);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let done = done_among(&queue, &ids).await;
    assert_eq!(
        done,
        10,
        "3 s after they were enqueued on the reachable partition, {done} of 10 jobs were done ({} fetches and {} recoveries of the other had failed)",
        store.failed(Call::Fetch),
        store.failed(Call::Recover),
    );
    worker.shutdown(Duration::from_secs(1)).await;
}

/// Completions that hang on one partition (each call times out after 500 ms) do not hold back
/// another partition's: its results are stored as its jobs finish, not behind the hanging
/// calls, so its answers do not fill the places for answers being stored and stop fetching.
#[tokio::test(start_paused = true)]
async fn completions_hanging_on_one_partition_hold_back_no_other_partitions() {
    let store = Faults::default().timing(Call::Complete);
    let queue = JobQueue::builder("hanging", store.clone())
        .partitions(2)
        .build()
        .unwrap();
    let (stuck, quick) = (a_route_in(&queue, 0).await, a_route_in(&queue, 1).await);
    fail(
        &store,
        "{hanging.0}",
        &[Call::Complete],
        Duration::from_secs(3600),
    );
    let worker = queue
        .worker(|job| async move {
            // A short piece of work: the worker's eight handlers take 250 ms for 200 jobs.
            if job.payload().as_ref() != b"stuck" {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(Bytes::new())
        })
        .visibility(Duration::from_secs(30))
        .start()
        .unwrap();
    queue.enqueue(Job::new("stuck").route(stuck)).await.unwrap();
    while store.failed(Call::Complete) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let start = tokio::time::Instant::now();
    let mut ids = Vec::new();
    for i in 0..200 {
        let enqueued = queue
            .enqueue(Job::new(i.to_string()).route(quick.clone()))
            .await
            .unwrap();
        assert_eq!(enqueued.id.partition(), 1);
        ids.push(enqueued.id);
    }
    while done_among(&queue, &ids).await < ids.len() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the jobs were never done"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = start.elapsed();
    let calls = store.timed();
    let hanging: Vec<_> = calls
        .iter()
        .filter(|call| call.to("{hanging.0}") && call.ended.is_none_or(|ended| ended > start))
        .collect();
    let quick: Vec<_> = calls
        .iter()
        .filter(|call| !call.to("{hanging.0}") && call.began >= start)
        .collect();
    // The other partition's calls sent while one to the hanging partition was in flight:
    // served beside it, not after it.
    let beside = quick
        .iter()
        .filter(|call| hanging.iter().any(|h| h.in_flight_at(call.began)))
        .count();
    assert!(
        took < Duration::from_millis(500),
        "the 200 jobs took {took:?}, through {} hanging completion calls of the other partition ({beside} of their {} calls were sent beside one)",
        hanging.len(),
        quick.len(),
    );
    assert!(
        beside > 0,
        "none of the {} completion calls was sent beside a hanging one",
        quick.len()
    );
    let report = worker.shutdown(Duration::from_secs(1)).await;
    assert_eq!(report.done, 200, "{report:?}");
}

/// A job cut off by a shutdown while the store's `status` fails for a while (a blip) keeps the
/// error of its last failed attempt: the worker reads it once the store answers, rather than
/// handing the job back with the shutdown's reason over it.
#[tokio::test(start_paused = true)]
async fn a_job_cut_off_during_a_blip_of_status_keeps_its_last_error() {
    let store = Faults::default();
    let queue = JobQueue::builder("blip", store.clone()).build().unwrap();
    let id = queue.enqueue(Job::new("x")).await.unwrap().id;
    let second = Arc::new(tokio::sync::Notify::new());
    let tell = second.clone();
    let attempts = Arc::new(AtomicU32::new(0));
    let counted = attempts.clone();
    let worker = queue
        .worker(move |job| {
            let tell = tell.clone();
            counted.fetch_add(1, Ordering::Relaxed);
            async move {
                if job.attempt() == 1 {
                    return Err(JobError::retry("boom"));
                }
                tell.notify_one();
                std::future::pending().await
            }
        })
        .visibility(Duration::from_secs(30))
        .backoff(Duration::from_millis(10), 1.0, Duration::from_millis(10))
        .start()
        .unwrap();
    second.notified().await;
    // Four calls' worth: longer than one status call takes to fail, well within the hand-back's
    // budget (half the visibility).
    fail(&store, "{blip.0}", &[Call::Status], 4 * COMMAND_TIMEOUT);
    let report = worker.shutdown(Duration::from_secs(1)).await;
    assert_eq!(
        (report.retried, report.handed_back),
        (1, 1),
        "{report:?} after {} attempts",
        attempts.load(Ordering::Relaxed)
    );
    assert!(store.failed(Call::Status) > 0, "status never failed");
    tokio::time::sleep(4 * COMMAND_TIMEOUT).await;
    let status = queue.status(id).await.unwrap().unwrap();
    assert_eq!(status.error.as_deref(), Some("boom"), "{status:?}");
    assert_eq!(status.attempt, 2);
}
