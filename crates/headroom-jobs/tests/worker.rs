//! Queues and workers on the memory job store.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use headroom_core::jobs::{FetchRequest, JobStore};
use headroom_core::memory::{MemoryJobStore, MemoryLeaseStore};
use headroom_idempotency::{Idempotency, IdempotencyKey, Scope};
use headroom_jobs::{
    EnqueueError, Job, JobError, JobId, JobQueue, JobState, QueueConfig, Worker, WorkerConfig,
};
use support::SlowStore;

async fn wait_for_state<S: JobStore>(queue: &JobQueue<S>, id: JobId, state: JobState) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        if queue.status(id).await.unwrap().map(|s| s.state) == Some(state) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} never became {state}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn number(bytes: &Bytes) -> u64 {
    std::str::from_utf8(bytes).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_jobs_across_four_workers_each_take_effect_once() {
    let queue = JobQueue::builder("orders", MemoryJobStore::new())
        .partitions(4)
        .max_len(20_000)
        .build()
        .unwrap();
    let idempotency = Arc::new(
        Idempotency::builder(MemoryLeaseStore::new())
            .build()
            .unwrap(),
    );
    let effects: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let runs = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (idempotency, effects, runs) = (idempotency.clone(), effects.clone(), runs.clone());
            queue
                .worker(move |job| {
                    let (idempotency, effects, runs) =
                        (idempotency.clone(), effects.clone(), runs.clone());
                    async move {
                        runs.fetch_add(1, Ordering::Relaxed);
                        let scope = Scope::new("shop", "fulfil").unwrap();
                        let key = IdempotencyKey::new(&job.id().to_string()).unwrap();
                        let order = number(job.payload());
                        let out = idempotency
                            .execute(&scope, &key, job.payload(), || async {
                                *effects.lock().unwrap().entry(order).or_default() += 1;
                                Ok::<_, std::io::Error>(format!("fulfilled {order}"))
                            })
                            .await
                            .map_err(|e| JobError::retry(e.to_string()))?;
                        Ok(Bytes::from(out.value))
                    }
                })
                .concurrency(8)
                .consumer(format!("worker-{w}"))
                .start()
                .unwrap()
        })
        .collect();
    let mut ids = Vec::new();
    for order in 0..10_000u64 {
        ids.push(queue.enqueue(Job::new(order.to_string())).await.unwrap().id);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while effects.lock().unwrap().len() < 10_000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "10,000 jobs not done in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut reports = Vec::new();
    for worker in workers {
        reports.push(worker.shutdown(Duration::from_secs(10)).await);
    }
    let effects = effects.lock().unwrap().clone();
    assert!((0..10_000).all(|order| effects.get(&order) == Some(&1)));
    assert_eq!(runs.load(Ordering::Relaxed), 10_000);
    assert_eq!(reports.iter().map(|r| r.done).sum::<u64>(), 10_000);
    assert!(
        reports.iter().all(|r| r.done > 0),
        "a worker got nothing: {reports:?}"
    );
    for id in ids.iter().step_by(997) {
        let status = queue.status(*id).await.unwrap().unwrap();
        assert_eq!(status.state, JobState::Done);
        assert!(status.result.unwrap().starts_with(b"fulfilled "));
    }
    assert_eq!(queue.stats().await.unwrap().unfinished, 0);
}

/// Runs 400 jobs, alternating between lanes 0 and 1 (weights 3 and 1), through one worker
/// running one at a time with `prefetch` fetched ahead; answers the (lane, job) of each start.
async fn starts(prefetch: usize) -> Vec<(u8, u64)> {
    let queue = JobQueue::builder("ordered", MemoryJobStore::new())
        .lane_weights([3, 1])
        .build()
        .unwrap();
    for i in 0..400u64 {
        let lane = u8::from(i % 2 == 1);
        queue
            .enqueue(Job::new(i.to_string()).lane(lane))
            .await
            .unwrap();
    }
    let started: Arc<Mutex<Vec<(u8, u64)>>> = Arc::default();
    let seen = started.clone();
    let worker = queue
        .worker(move |job| {
            seen.lock()
                .unwrap()
                .push((job.lane(), number(job.payload())));
            async { Ok(Bytes::new()) }
        })
        .concurrency(1)
        .prefetch(prefetch)
        .start()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while started.lock().unwrap().len() < 400 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    worker.shutdown(Duration::from_secs(5)).await;
    started.lock().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn within_a_lane_jobs_start_in_the_order_they_were_enqueued_even_when_fetched_ahead() {
    for prefetch in [0, 8] {
        let started = starts(prefetch).await;
        for lane in [0, 1] {
            let order: Vec<u64> = started
                .iter()
                .filter(|(l, _)| *l == lane)
                .map(|(_, n)| *n)
                .collect();
            assert_eq!(order.len(), 200);
            assert!(
                order.windows(2).all(|w| w[0] < w[1]),
                "lane {lane} out of order with prefetch {prefetch}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_lead_fetches_in_proportion_to_their_weights() {
    // One job per fetch: while both lanes hold jobs, lane 0 (weight 3) leads, and so gets,
    // three of every four fetches.
    let started = starts(0).await;
    let first_hundred = started
        .iter()
        .take(100)
        .filter(|(lane, _)| *lane == 0)
        .count();
    assert_eq!(first_hundred, 75);
}

/// A worker whose one handler takes 100 ms per job: it drains 10 jobs a second.
fn ten_a_second(queue: &JobQueue<MemoryJobStore>) -> Worker {
    queue
        .worker(|_| async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(Bytes::new())
        })
        .concurrency(1)
        .start()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_refuses_with_a_retry_after_and_accepts_again_as_it_drains() {
    let queue = JobQueue::builder("bounded", MemoryJobStore::new())
        .max_len(100)
        .build()
        .unwrap();
    for i in 0..100 {
        queue.enqueue(Job::new(format!("{i}"))).await.unwrap();
    }
    let refused = queue.enqueue(Job::new("one more")).await.unwrap_err();
    let EnqueueError::Full {
        depth,
        retry_after,
        tenant,
        ..
    } = refused
    else {
        panic!("{refused:?}");
    };
    assert_eq!((depth, tenant), (100, false));
    // Nothing has drained yet: the longest retry-after.
    assert_eq!(retry_after, queue.config().max_retry_after);

    // A worker drains 10 jobs a second.
    let worker = ten_a_second(&queue);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut accepted = 0;
    let retry_after = loop {
        match queue.enqueue(Job::new("refill")).await {
            Ok(_) => accepted += 1,
            Err(EnqueueError::Full { retry_after, .. }) => break retry_after,
            Err(other) => panic!("{other:?}"),
        }
    };
    // About 50 jobs finished in 5 s; the queue took that many again.
    assert!((45..=55).contains(&accepted), "{accepted} accepted");
    // One more place takes about a tenth of a second at 10 a second (the rate is measured
    // over a window that started before the worker, so up to a quarter second), plus up to
    // half again of jitter.
    assert!(
        retry_after >= Duration::from_millis(100) && retry_after <= Duration::from_millis(375),
        "{retry_after:?}"
    );
    worker.shutdown(Duration::from_secs(1)).await;
}

/// The longest durations a configuration takes are bounds, not arithmetic to overflow: a
/// refusal with no drain yet, a finished job's store calls and a long backoff all work.
#[tokio::test(start_paused = true)]
async fn the_longest_durations_are_taken_without_a_panic() {
    let mut config = QueueConfig::default();
    config.max_len = 1;
    config.max_retry_after = Duration::MAX;
    let queue = JobQueue::builder("unbounded-waits", MemoryJobStore::new())
        .config(config)
        .build()
        .unwrap();
    let first = queue.enqueue(Job::new("first")).await.unwrap();
    let refused = queue.enqueue(Job::new("second")).await.unwrap_err();
    let EnqueueError::Full { retry_after, .. } = refused else {
        panic!("{refused:?}");
    };
    assert_eq!(
        retry_after,
        Duration::MAX,
        "nothing drained: the longest wait"
    );

    let attempts = Arc::new(AtomicU32::new(0));
    let counted = attempts.clone();
    let worker = queue
        .worker(move |_| {
            let attempt = counted.fetch_add(1, Ordering::Relaxed) + 1;
            async move {
                if attempt == 1 {
                    Err(JobError::retry("once"))
                } else {
                    Ok(Bytes::new())
                }
            }
        })
        .visibility(Duration::MAX)
        .backoff(Duration::from_secs(3_600), 2.0, Duration::MAX)
        .start()
        .unwrap();
    wait_for_state(&queue, first.id, JobState::Retrying).await;
    let report = worker.shutdown(Duration::from_secs(1)).await;
    assert_eq!(report.abandoned, 0, "{report:?}");
}

#[tokio::test(start_paused = true)]
async fn a_tenant_at_its_bound_is_refused_while_others_are_not() {
    let queue = JobQueue::builder("tenants", MemoryJobStore::new())
        .partitions(4)
        .max_per_tenant(3)
        .build()
        .unwrap();
    for _ in 0..3 {
        queue.enqueue(Job::new("x").tenant("acme")).await.unwrap();
    }
    let refused = queue
        .enqueue(Job::new("x").tenant("acme"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            EnqueueError::Full {
                tenant: true,
                depth: 3,
                ..
            }
        ),
        "{refused:?}"
    );
    assert!(refused.retry_after().is_some());
    queue.enqueue(Job::new("x").tenant("globex")).await.unwrap();
}

/// A tenant at its bound gets a place back when one of its own jobs finishes, and the lanes
/// are first in, first out: its retry-after is the time the jobs ahead of its own take to
/// drain, not the time the partition takes to finish one job.
#[tokio::test(start_paused = true)]
async fn a_tenant_at_its_bound_is_told_to_wait_for_the_jobs_ahead_of_its_own() {
    let queue = JobQueue::builder("shares", MemoryJobStore::new())
        .max_len(1_000)
        .max_per_tenant(5)
        .build()
        .unwrap();
    for _ in 0..195 {
        queue.enqueue(Job::new("x")).await.unwrap();
    }
    for _ in 0..5 {
        queue.enqueue(Job::new("x").tenant("acme")).await.unwrap();
    }
    // 10 jobs a second, for 10 s: 100 finish, and 95 others are left ahead of acme's 5.
    let worker = ten_a_second(&queue);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let refused = queue
        .enqueue(Job::new("x").tenant("acme"))
        .await
        .unwrap_err();
    let EnqueueError::Full {
        tenant: true,
        depth: 5,
        retry_after,
        ..
    } = refused
    else {
        panic!("{refused:?}");
    };
    // acme's first job finishes 96 jobs from now: 9.6 s at 10 a second. The rate is measured
    // over a window that may begin before the worker (as low as three quarters of it), and
    // up to half again of jitter is added: at most 19.2 s. The partition's rate for one job
    // would say a tenth of a second.
    assert!(
        retry_after >= Duration::from_millis(9_600) && retry_after <= Duration::from_millis(19_200),
        "{retry_after:?}"
    );
    // Coming back when told (a tenth of a second later: the job that frees the place may end
    // at that very instant), acme is let in.
    tokio::time::sleep(retry_after + Duration::from_millis(100)).await;
    queue
        .enqueue(Job::new("x").tenant("acme"))
        .await
        .expect("a place freed within the retry-after");
    worker.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_enqueue_answers_the_first_id_within_its_tenant() {
    let queue = JobQueue::builder("dedup", MemoryJobStore::new())
        .partitions(4)
        .build()
        .unwrap();
    let first = queue
        .enqueue(Job::new("pay").tenant("acme").idempotency_key("order-9"))
        .await
        .unwrap();
    assert!(!first.duplicate);
    let again = queue
        .enqueue(Job::new("pay").tenant("acme").idempotency_key("order-9"))
        .await
        .unwrap();
    assert_eq!((again.id, again.duplicate), (first.id, true));
    // Another tenant's key is its own.
    let other = queue
        .enqueue(Job::new("pay").tenant("globex").idempotency_key("order-9"))
        .await
        .unwrap();
    assert!(!other.duplicate);
    assert_eq!(queue.stats().await.unwrap().unfinished, 2);
    // A tenant reads its own job's status, and no one else's.
    assert!(queue.status_for("acme", first.id).await.unwrap().is_some());
    assert_eq!(queue.status_for("globex", first.id).await.unwrap(), None);
    assert_eq!(queue.status_for("", first.id).await.unwrap(), None);
}

/// Without a tenant, an idempotency key is kept per route: the same key under two routes makes
/// two jobs, even when both routes go to one partition.
#[tokio::test(start_paused = true)]
async fn a_key_under_two_routes_makes_two_jobs() {
    let queue = JobQueue::builder("routes", MemoryJobStore::new())
        .build()
        .unwrap();
    let charge = |order: &'static str| Job::new("charge").route(order).idempotency_key("charge");
    let first = queue.enqueue(charge("order-1")).await.unwrap();
    let second = queue.enqueue(charge("order-2")).await.unwrap();
    assert!(
        !second.duplicate,
        "another route's job was taken for this one"
    );
    assert_ne!(first.id, second.id);
    let again = queue.enqueue(charge("order-1")).await.unwrap();
    assert_eq!((again.id, again.duplicate), (first.id, true));
    // Nor does a key under a route answer the same key without one.
    let unrouted = queue
        .enqueue(Job::new("charge").idempotency_key("charge"))
        .await
        .unwrap();
    assert!(!unrouted.duplicate);
    assert_eq!(queue.stats().await.unwrap().unfinished, 3);
}

/// An enqueue that failed with a timeout may have added its job, its answer lost: tried again
/// with the same idempotency key, it answers that job's id and adds no second one.
#[tokio::test(start_paused = true)]
async fn an_enqueue_whose_answer_was_lost_is_tried_again_safely_with_its_key() {
    let queue = JobQueue::builder("lost", SlowStore::first_enqueue_reply_lost())
        .build()
        .unwrap();
    let job = || Job::new("pay").idempotency_key("order-9");
    let failed = queue.enqueue(job()).await.unwrap_err();
    assert!(matches!(failed, EnqueueError::Backend(_)), "{failed:?}");
    assert_eq!(
        queue.stats().await.unwrap().unfinished,
        1,
        "the job was added"
    );
    let again = queue.enqueue(job()).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(queue.stats().await.unwrap().unfinished, 1);
    let status = queue.status(again.id).await.unwrap().unwrap();
    assert_eq!(status.state, JobState::Queued);
}

#[tokio::test(start_paused = true)]
async fn failed_attempts_back_off_exponentially_and_the_last_one_makes_the_job_dead() {
    let queue = JobQueue::builder("flaky", MemoryJobStore::new())
        .build()
        .unwrap();
    let attempts: Arc<Mutex<Vec<tokio::time::Instant>>> = Arc::default();
    let seen = attempts.clone();
    let worker = queue
        .worker(move |job| {
            seen.lock().unwrap().push(tokio::time::Instant::now());
            let attempt = job.attempt();
            async move { Err::<Bytes, _>(JobError::retry(format!("down on attempt {attempt}"))) }
        })
        .max_attempts(4)
        .backoff(Duration::from_secs(1), 2.0, Duration::from_secs(60))
        .start()
        .unwrap();
    let id = queue.enqueue(Job::new("x")).await.unwrap().id;
    wait_for_state(&queue, id, JobState::Dead).await;
    let status = queue.status(id).await.unwrap().unwrap();
    assert_eq!(status.attempt, 4);
    assert_eq!(status.error.as_deref(), Some("down on attempt 4"));
    assert_eq!(queue.dead_letters(10).await.unwrap(), [id]);
    let attempts = attempts.lock().unwrap().clone();
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(gaps.len(), 3);
    // Each wait is its exponential value (1 s, 2 s, 4 s) less up to half of it in jitter, plus
    // at most one idle poll.
    for (gap, full) in gaps.iter().zip([1, 2, 4]) {
        let full = Duration::from_secs(full);
        assert!(
            *gap >= full / 2 && *gap <= full + Duration::from_millis(150),
            "{gaps:?}"
        );
    }
    let report = worker.shutdown(Duration::from_secs(1)).await;
    assert_eq!((report.retried, report.dead), (3, 1));
}

#[tokio::test(start_paused = true)]
async fn a_fatal_error_makes_the_job_dead_at_once() {
    let queue = JobQueue::builder("fatal", MemoryJobStore::new())
        .build()
        .unwrap();
    let worker = queue
        .worker(|_| async { Err::<Bytes, _>(JobError::fatal("card declined")) })
        .start()
        .unwrap();
    let id = queue.enqueue(Job::new("x")).await.unwrap().id;
    wait_for_state(&queue, id, JobState::Dead).await;
    let status = queue.status(id).await.unwrap().unwrap();
    assert_eq!(
        (status.attempt, status.error.as_deref()),
        (1, Some("card declined"))
    );
    worker.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_job_whose_completion_reply_was_lost_counts_as_done() {
    // The store applied the completion; only its answer was lost.
    a_completion_applied_counts_as_done(SlowStore::first_completion_reply_lost()).await;
}

/// A completion the client sent twice (its connection dropped after the first was applied)
/// is answered "rejected" by the second: the job is done at this worker's attempt, so it
/// counts as done, not lost.
#[tokio::test(start_paused = true)]
async fn a_job_whose_completion_was_sent_twice_counts_as_done() {
    a_completion_applied_counts_as_done(SlowStore::first_completion_resent()).await;
}

/// A shutdown cuts a job off and hands it back; the store applies the hand-back but its answer
/// is lost, and another worker fetches the job before the hand-back is tried again, which the
/// store then refuses. The job was handed back, not lost, and counts so.
#[tokio::test(start_paused = true)]
async fn a_hand_back_applied_with_its_answer_lost_counts_as_handed_back() {
    a_hand_back_refused_after_it_was_applied_counts_as_handed_back(
        SlowStore::first_retry_reply_lost(),
    )
    .await;
}

/// The same when the client sent the hand-back again (Redis Cluster's does after a dropped
/// connection) and the store refused the second: no error was seen, the job was handed back.
#[tokio::test(start_paused = true)]
async fn a_hand_back_sent_twice_counts_as_handed_back() {
    a_hand_back_refused_after_it_was_applied_counts_as_handed_back(SlowStore::first_retry_resent())
        .await;
}

/// Runs one job that a shutdown cuts off, on `store`, whose first hand-back is applied but
/// answered otherwise while a second worker fetches the job: it counts as handed back.
async fn a_hand_back_refused_after_it_was_applied_counts_as_handed_back(store: SlowStore) {
    let queue = JobQueue::builder("handed", store).build().unwrap();
    let mut quick = WorkerConfig::default();
    quick.poll_interval = Duration::from_millis(5);
    let long = |_| async {
        tokio::time::sleep(Duration::from_secs(3_600)).await;
        Ok(Bytes::new())
    };
    let a = queue
        .worker(long)
        .config(quick.clone())
        .consumer("a")
        .start()
        .unwrap();
    let id = queue.enqueue(Job::new("x")).await.unwrap().id;
    wait_for_state(&queue, id, JobState::Running).await;
    let b = queue
        .worker(long)
        .config(quick)
        .consumer("b")
        .start()
        .unwrap();
    let report = a.shutdown(Duration::from_millis(100)).await;
    assert_eq!((report.handed_back, report.lost), (1, 0), "{report:?}");
    let status = queue.status(id).await.unwrap().unwrap();
    assert_eq!(
        (status.state, status.attempt),
        (JobState::Running, 2),
        "b holds it"
    );
    b.shutdown(Duration::ZERO).await;
}

/// The same rule does not take a takeover for the step: a worker cut off from the store past
/// the visibility loses its job to another; its handler then fails, and its retry's first try
/// fails without reaching the store, the next is refused. The job is at a later attempt, but
/// this worker's hold had lapsed: it was lost, not retried.
#[tokio::test(start_paused = true)]
async fn a_retry_refused_after_the_hold_lapsed_counts_as_lost() {
    let store: SlowStore = SlowStore::default();
    let (out_of_reach, fail_next_retry) = (
        Arc::clone(&store.out_of_reach),
        Arc::clone(&store.fail_next_retry),
    );
    let queue = JobQueue::builder("lapsed", store).build().unwrap();
    let mut quick = WorkerConfig::default();
    quick.poll_interval = Duration::from_millis(5);
    let go = Arc::new(tokio::sync::Notify::new());
    let a = queue
        .worker({
            let go = Arc::clone(&go);
            move |_| {
                let go = Arc::clone(&go);
                async move {
                    go.notified().await;
                    Err::<Bytes, _>(JobError::retry("gateway 502"))
                }
            }
        })
        .config(quick.clone())
        .consumer("a")
        .visibility(Duration::from_secs(1))
        .start()
        .unwrap();
    let id = queue.enqueue(Job::new("x")).await.unwrap().id;
    wait_for_state(&queue, id, JobState::Running).await;
    out_of_reach.store(true, Ordering::Relaxed);
    let b = queue
        .worker(|_| std::future::pending::<Result<Bytes, JobError>>())
        .config(quick)
        .consumer("b")
        .start()
        .unwrap();
    while queue.status(id).await.unwrap().unwrap().attempt < 2 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fail_next_retry.store(true, Ordering::Relaxed);
    go.notify_one();
    let report = a.shutdown(Duration::from_secs(5)).await;
    assert_eq!((report.lost, report.retried), (1, 0), "{report:?}");
    b.shutdown(Duration::ZERO).await;
}

/// Runs one job on `store`, whose first completion is applied whatever it answers, and
/// checks that the worker counts it done.
async fn a_completion_applied_counts_as_done(store: SlowStore) {
    let queue = JobQueue::builder("applied", store).build().unwrap();
    let worker = queue
        .worker(|_| async { Ok(Bytes::from_static(b"paid")) })
        .start()
        .unwrap();
    let id = queue.enqueue(Job::new("x")).await.unwrap().id;
    wait_for_state(&queue, id, JobState::Done).await;
    let report = worker.shutdown(Duration::from_secs(1)).await;
    assert_eq!((report.done, report.lost), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn a_panicking_handler_fails_only_its_attempt() {
    let queue = JobQueue::builder("panics", MemoryJobStore::new())
        .build()
        .unwrap();
    let worker = queue
        .worker(|job| async move {
            if job.payload() == "bad" && job.attempt() == 1 {
                panic!("bug on the first attempt");
            }
            Ok(Bytes::from(format!("ok on attempt {}", job.attempt())))
        })
        .concurrency(1)
        .backoff(Duration::from_millis(100), 2.0, Duration::from_secs(1))
        .start()
        .unwrap();
    let bad = queue.enqueue(Job::new("bad")).await.unwrap().id;
    let good = queue.enqueue(Job::new("good")).await.unwrap().id;
    wait_for_state(&queue, bad, JobState::Done).await;
    wait_for_state(&queue, good, JobState::Done).await;
    let bad = queue.status(bad).await.unwrap().unwrap();
    assert_eq!(bad.result.as_deref(), Some(&b"ok on attempt 2"[..]));
    assert_eq!(
        bad.error.as_deref(),
        Some("the handler panicked: bug on the first attempt")
    );
    let report = worker.shutdown(Duration::from_secs(1)).await;
    assert_eq!((report.done, report.retried), (2, 1));
}

#[tokio::test(start_paused = true)]
async fn delayed_and_scheduled_jobs_wait_for_their_time() {
    let queue = JobQueue::builder("later", MemoryJobStore::new())
        .build()
        .unwrap();
    let ran: Arc<Mutex<HashMap<String, tokio::time::Instant>>> = Arc::default();
    let seen = ran.clone();
    let start = tokio::time::Instant::now();
    let worker = queue
        .worker(move |job| {
            let payload = String::from_utf8(job.payload().to_vec()).unwrap();
            seen.lock()
                .unwrap()
                .insert(payload, tokio::time::Instant::now());
            async { Ok(Bytes::new()) }
        })
        .start()
        .unwrap();
    let delayed = queue
        .enqueue(Job::new("delayed").delay(Duration::from_secs(30)))
        .await
        .unwrap();
    let at = std::time::SystemTime::UNIX_EPOCH
        + headroom_core::Clock::system().unix_time()
        + Duration::from_secs(60);
    let scheduled = queue.enqueue(Job::new("scheduled").at(at)).await.unwrap();
    queue.enqueue(Job::new("now")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(
        queue.status(delayed.id).await.unwrap().unwrap().state,
        JobState::Queued
    );
    wait_for_state(&queue, scheduled.id, JobState::Done).await;
    let ran = ran.lock().unwrap().clone();
    let after = |name: &str| ran[name] - start;
    assert!(after("now") < Duration::from_millis(150));
    assert!(
        after("delayed") >= Duration::from_secs(30)
            && after("delayed") < Duration::from_millis(30_150)
    );
    assert!(
        after("scheduled") >= Duration::from_secs(60)
            && after("scheduled") < Duration::from_millis(60_150)
    );
    worker.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_fetching_waits_for_running_jobs_and_hands_back_the_rest() {
    let queue = JobQueue::builder("drain", MemoryJobStore::new())
        .build()
        .unwrap();
    let worker = queue
        .worker(|job| async move {
            let secs = number(job.payload());
            tokio::time::sleep(Duration::from_secs(secs)).await;
            Ok(Bytes::from(format!("slept {secs} s")))
        })
        .concurrency(2)
        .visibility(Duration::from_secs(600))
        .start()
        .unwrap();
    let short = queue.enqueue(Job::new("2")).await.unwrap().id;
    let long = queue.enqueue(Job::new("3600")).await.unwrap().id;
    wait_for_state(&queue, long, JobState::Running).await;
    let report = worker.shutdown(Duration::from_secs(10)).await;
    assert_eq!((report.done, report.handed_back), (1, 1));
    assert_eq!(
        queue.status(short).await.unwrap().unwrap().state,
        JobState::Done
    );
    // Handed back at once, for the next worker, not held until its visibility ends.
    let long_status = queue.status(long).await.unwrap().unwrap();
    assert_eq!(long_status.state, JobState::Retrying);
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.running, stats.unfinished), (0, 1));

    // Nothing is fetched after a shutdown.
    let queued_after = queue.enqueue(Job::new("1")).await.unwrap().id;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        queue.status(queued_after).await.unwrap().unwrap().state,
        JobState::Queued
    );

    let next = queue
        .worker(|job| async move { Ok(Bytes::from(format!("attempt {}", job.attempt()))) })
        .start()
        .unwrap();
    wait_for_state(&queue, long, JobState::Done).await;
    // Cut off mid-run, it was charged: this is its second attempt.
    let long_status = queue.status(long).await.unwrap().unwrap();
    assert_eq!(long_status.result.as_deref(), Some(&b"attempt 2"[..]));
    next.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_charges_the_job_it_cut_off_but_not_those_fetched_ahead() {
    let queue = JobQueue::builder("rolling", MemoryJobStore::new())
        .build()
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(queue.enqueue(Job::new("3600")).await.unwrap().id);
    }
    // Three deploys in a row: each worker runs one job and holds two fetched ahead when it is
    // shut down, and hands all three back: the one it cut off charged, the two that never
    // started not.
    for _ in 0..3 {
        let worker = queue
            .worker(|job| async move {
                tokio::time::sleep(Duration::from_secs(number(job.payload()))).await;
                Ok(Bytes::new())
            })
            .concurrency(1)
            .prefetch(2)
            .max_attempts(4)
            .visibility(Duration::from_secs(600))
            .start()
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while queue.stats().await.unwrap().running < 3 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the worker never held all three jobs: {:?}",
                queue
                    .status(ids[0])
                    .await
                    .unwrap()
                    .map(|s| (s.state, s.error))
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let report = worker.shutdown(Duration::from_secs(1)).await;
        assert_eq!((report.handed_back, report.dead), (3, 0));
    }
    // Nine deliveries were handed back; three of them, one per deploy, were charged.
    let next = queue
        .worker(|job| async move { Ok(Bytes::from(job.attempt().to_string())) })
        .max_attempts(4)
        .start()
        .unwrap();
    let mut charged_before = 0;
    for &id in &ids {
        wait_for_state(&queue, id, JobState::Done).await;
        let status = queue.status(id).await.unwrap().unwrap();
        assert_eq!(
            status.attempt, 4,
            "every job was delivered three times before"
        );
        let attempt: u32 = std::str::from_utf8(&status.result.unwrap())
            .unwrap()
            .parse()
            .unwrap();
        charged_before += attempt - 1;
    }
    assert_eq!(charged_before, 3);
    next.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_job_of_a_dead_worker_is_taken_over_and_its_effect_happens_once() {
    let store = MemoryJobStore::new();
    let queue = JobQueue::builder("payments", store.clone())
        .build()
        .unwrap();
    let idempotency = Arc::new(
        Idempotency::builder(MemoryLeaseStore::new())
            .build()
            .unwrap(),
    );
    let charges = Arc::new(AtomicU32::new(0));
    let charge = {
        let (idempotency, charges) = (idempotency.clone(), charges.clone());
        move |id: JobId| {
            let (idempotency, charges) = (idempotency.clone(), charges.clone());
            async move {
                let scope = Scope::new("shop", "charge").unwrap();
                let key = IdempotencyKey::new(&id.to_string()).unwrap();
                idempotency
                    .execute(&scope, &key, b"", || async {
                        charges.fetch_add(1, Ordering::Relaxed);
                        Ok::<_, std::io::Error>("charged".to_owned())
                    })
                    .await
                    .map(|out| out.value)
            }
        }
    };
    let id = queue.enqueue(Job::new("charge 40")).await.unwrap().id;

    // A worker takes the job, charges, and dies before it answers: its delivery is left held.
    let partition = headroom_core::Namespace::new("headroom.jobs")
        .unwrap()
        .key("{payments.0}")
        .unwrap();
    let taken = store
        .fetch(
            &partition,
            FetchRequest {
                consumer: "dies",
                lanes: &[0],
                max: 1,
                visibility: Duration::from_secs(30),
            },
        )
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    charge(id).await.unwrap();

    let taken_over = Arc::new(AtomicU32::new(0));
    let seen = taken_over.clone();
    let charge_again = charge.clone();
    let worker = queue
        .worker(move |job| {
            if job.taken_over() {
                seen.fetch_add(1, Ordering::Relaxed);
            }
            let charge = charge_again.clone();
            async move {
                charge(job.id())
                    .await
                    .map(Bytes::from)
                    .map_err(|e| JobError::retry(e.to_string()))
            }
        })
        .visibility(Duration::from_secs(30))
        .start()
        .unwrap();
    let start = tokio::time::Instant::now();
    wait_for_state(&queue, id, JobState::Done).await;
    assert!(
        start.elapsed() >= Duration::from_secs(29),
        "taken over after {:?}",
        start.elapsed()
    );
    assert_eq!(taken_over.load(Ordering::Relaxed), 1);
    assert_eq!(charges.load(Ordering::Relaxed), 1, "the charge ran twice");
    let status = queue.status(id).await.unwrap().unwrap();
    assert_eq!(
        (status.attempt, status.result.as_deref()),
        (2, Some(&b"charged"[..]))
    );
    worker.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_live_worker_keeps_a_long_job_past_its_visibility() {
    let queue = JobQueue::builder("long", MemoryJobStore::new())
        .build()
        .unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let make = |counted: Arc<AtomicU32>| {
        move |_job| {
            counted.fetch_add(1, Ordering::Relaxed);
            async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                Ok(Bytes::new())
            }
        }
    };
    let a = queue
        .worker(make(counted.clone()))
        .visibility(Duration::from_secs(1))
        .start()
        .unwrap();
    let b = queue
        .worker(make(counted))
        .visibility(Duration::from_secs(1))
        .start()
        .unwrap();
    let id = queue.enqueue(Job::new("x")).await.unwrap().id;
    wait_for_state(&queue, id, JobState::Done).await;
    assert_eq!(runs.load(Ordering::Relaxed), 1);
    let (ra, rb) = (
        a.shutdown(Duration::from_secs(1)).await,
        b.shutdown(Duration::from_secs(1)).await,
    );
    assert_eq!((ra.lost + rb.lost, ra.done + rb.done), (0, 1));
}

#[tokio::test(start_paused = true)]
async fn bad_input_gets_typed_errors() {
    let queue = JobQueue::builder("input", MemoryJobStore::new())
        .build()
        .unwrap();
    let too_large = queue
        .enqueue(Job::new(vec![0u8; 512 * 1024 + 1]))
        .await
        .unwrap_err();
    assert!(matches!(
        too_large,
        EnqueueError::TooLarge {
            len: 524_289,
            max: 524_288
        }
    ));
    assert!(matches!(
        queue.enqueue(Job::new("x").lane(1)).await,
        Err(EnqueueError::Invalid(_))
    ));
    assert!(matches!(
        queue.enqueue(Job::new("x").origin("o".repeat(256))).await,
        Err(EnqueueError::Invalid(_))
    ));
    for text in [
        "",
        "1",
        "-1",
        "1-",
        "a-1",
        "1-b",
        "70000-1",
        "1-99999999999999999999",
        "1--1",
    ] {
        assert!(text.parse::<JobId>().is_err(), "{text:?}");
    }
    assert_eq!("3-1042".parse::<JobId>().unwrap().to_string(), "3-1042");
    // A job id from another queue's partitions is not found, not a panic.
    assert_eq!(queue.status("9-1".parse().unwrap()).await.unwrap(), None);
    assert_eq!(
        JobQueue::builder("bad name!", MemoryJobStore::new())
            .build()
            .unwrap_err()
            .field(),
        "name"
    );
}

#[tokio::test(start_paused = true)]
async fn a_handler_that_panics_before_its_future_fails_only_its_attempt() {
    let queue = JobQueue::builder("sync-panics", MemoryJobStore::new())
        .build()
        .unwrap();
    let worker = queue
        .worker(|job| {
            assert!(job.attempt() > 1, "bug before the first await");
            async { Ok(Bytes::from_static(b"ok")) }
        })
        .backoff(Duration::from_millis(100), 2.0, Duration::from_secs(1))
        .start()
        .unwrap();
    let start = tokio::time::Instant::now();
    let id = queue.enqueue(Job::new("x")).await.unwrap().id;
    wait_for_state(&queue, id, JobState::Done).await;
    // Retried after its backoff, not after the 30 s visibility timeout.
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    let status = queue.status(id).await.unwrap().unwrap();
    assert_eq!(status.attempt, 2);
    assert!(status.error.unwrap().starts_with("the handler panicked"));
    let report = worker.shutdown(Duration::from_secs(1)).await;
    assert_eq!((report.done, report.retried, report.lost), (1, 1, 0));
}

const COMPLETION_TAKES: Duration = Duration::from_millis(100);

/// Results of jobs that finish at the same moment are stored in one call, a result waits for
/// no other job, and a handler's turn ends when it answers: the next job starts while the
/// result before it is being stored.
#[tokio::test(start_paused = true)]
async fn results_ready_together_are_stored_together_and_the_next_job_starts_meanwhile() {
    let store = SlowStore::slow_completions(COMPLETION_TAKES);
    let queue = JobQueue::builder("batched", store.clone()).build().unwrap();
    let ids: Vec<JobId> = {
        let mut ids = Vec::new();
        for i in 0..8 {
            ids.push(queue.enqueue(Job::new(i.to_string())).await.unwrap().id);
        }
        ids
    };
    let together = Arc::new(tokio::sync::Barrier::new(8));
    let worker = queue
        .worker(move |_| {
            let together = together.clone();
            async move {
                together.wait().await;
                Ok(Bytes::from_static(b"ok"))
            }
        })
        .concurrency(8)
        .start()
        .unwrap();
    for &id in &ids {
        wait_for_state(&queue, id, JobState::Done).await;
    }
    let report = worker.shutdown(Duration::from_secs(1)).await;
    assert_eq!(report.done, 8);
    let sizes: Vec<usize> = store
        .completions
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(sizes.iter().sum::<usize>(), 8);
    assert!(sizes.len() <= 2, "eight results stored in {sizes:?}");

    // One handler at a time: each job starts as soon as the one before answered, while its
    // result is still being stored, and every result is stored.
    let store = SlowStore::slow_completions(COMPLETION_TAKES);
    let queue = JobQueue::builder("one-at-a-time", store.clone())
        .build()
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(queue.enqueue(Job::new(i.to_string())).await.unwrap().id);
    }
    let started: Arc<Mutex<Vec<tokio::time::Instant>>> = Arc::default();
    let seen = started.clone();
    let worker = queue
        .worker(move |_| {
            seen.lock().unwrap().push(tokio::time::Instant::now());
            async { Ok(Bytes::new()) }
        })
        .concurrency(1)
        .start()
        .unwrap();
    for &id in &ids {
        wait_for_state(&queue, id, JobState::Done).await;
    }
    let report = worker.shutdown(Duration::from_secs(1)).await;
    assert_eq!(report.done, 3);
    let started = started.lock().unwrap().clone();
    let first_stored = store.completions.lock().unwrap()[0].1;
    assert!(
        started[1] < first_stored + COMPLETION_TAKES,
        "the second job waited for the first one's result to be stored"
    );
}

/// A job whose handler answered leaves its fetch slot for the next fetch while its result is
/// stored, but a worker holds at most as many such jobs as slots: with a store that never
/// finishes storing, a worker of concurrency 1 and prefetch 1 holds four jobs and fetches no
/// more.
#[tokio::test(start_paused = true)]
async fn answers_being_stored_hold_back_fetching_beyond_their_own_bound() {
    let store = SlowStore::slow_completions(Duration::from_secs(3600));
    let queue = JobQueue::builder("stuck", store.clone()).build().unwrap();
    for i in 0..10 {
        queue.enqueue(Job::new(i.to_string())).await.unwrap();
    }
    let ran = Arc::new(AtomicU32::new(0));
    let counted = ran.clone();
    let _worker = queue
        .worker(move |_| {
            counted.fetch_add(1, Ordering::Relaxed);
            async { Ok(Bytes::new()) }
        })
        .concurrency(1)
        .prefetch(1)
        .visibility(Duration::from_secs(7200))
        .start()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.running, stats.ready), (4, 6));
    assert_eq!(ran.load(Ordering::Relaxed), 4);
}

/// A job whose answer takes longer to store than its visibility stays held meanwhile: another
/// worker does not take it over and run it again.
#[tokio::test(start_paused = true)]
async fn a_job_stays_held_while_its_answer_waits_to_be_stored() {
    let store = SlowStore::slow_completions(Duration::from_secs(10));
    let queue = JobQueue::builder("held", store).build().unwrap();
    let id = queue.enqueue(Job::new("0")).await.unwrap().id;
    let ran = Arc::new(AtomicU32::new(0));
    let start = |name: &str| {
        let counted = ran.clone();
        queue
            .worker(move |_| {
                counted.fetch_add(1, Ordering::Relaxed);
                async { Ok(Bytes::new()) }
            })
            .consumer(name)
            .visibility(Duration::from_secs(1))
            .start()
            .unwrap()
    };
    let first = start("first");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while ran.load(Ordering::Relaxed) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the job never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The answer takes ten visibilities to store; a second worker looks for lapsed jobs.
    let second = start("second");
    wait_for_state(&queue, id, JobState::Done).await;
    assert_eq!(ran.load(Ordering::Relaxed), 1, "the job ran again");
    assert_eq!(first.shutdown(Duration::from_secs(1)).await.done, 1);
    second.shutdown(Duration::from_secs(1)).await;
}

/// Jobs fetched ahead keep their hold while they wait for a handler, however long the wait:
/// with one handler, ten jobs fetched at once and each running for two visibilities, a second
/// worker looking for lapsed deliveries takes none over, and each job runs once.
#[tokio::test(start_paused = true)]
async fn jobs_fetched_ahead_are_kept_while_they_wait_for_a_handler() {
    let queue = JobQueue::builder("ahead", MemoryJobStore::new())
        .build()
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(queue.enqueue(Job::new(i.to_string())).await.unwrap().id);
    }
    let runs = Arc::new(AtomicU32::new(0));
    let taken_over = Arc::new(AtomicU32::new(0));
    let make = |runs: Arc<AtomicU32>, taken_over: Arc<AtomicU32>| {
        move |job: headroom_jobs::JobContext| {
            runs.fetch_add(1, Ordering::Relaxed);
            if job.taken_over() {
                taken_over.fetch_add(1, Ordering::Relaxed);
            }
            async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                Ok(Bytes::new())
            }
        }
    };
    let holder = queue
        .worker(make(runs.clone(), taken_over.clone()))
        .concurrency(1)
        .prefetch(50)
        .visibility(Duration::from_secs(1))
        .start()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while queue.stats().await.unwrap().ready > 0 {
        assert!(tokio::time::Instant::now() < deadline, "never fetched");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let other = queue
        .worker(make(runs.clone(), taken_over.clone()))
        .visibility(Duration::from_secs(1))
        .start()
        .unwrap();
    for &id in &ids {
        wait_for_state(&queue, id, JobState::Done).await;
    }
    let (held, idle) = (
        holder.shutdown(Duration::from_secs(1)).await,
        other.shutdown(Duration::from_secs(1)).await,
    );
    assert_eq!(runs.load(Ordering::Relaxed), 10, "a job ran twice");
    assert_eq!(taken_over.load(Ordering::Relaxed), 0);
    assert_eq!((held.done, held.lost, idle.done), (10, 0, 0));
}

/// What a shutdown may take on a loaded test machine beyond its bound: scheduling, not work.
const SCHEDULING_SLACK: Duration = Duration::from_secs(2);

/// A handler that blocks its thread without ever yielding until `release` sends (or is
/// dropped), telling `started` when it begins: a handler nothing can cut off.
struct Blocking {
    started: Arc<tokio::sync::Notify>,
    release: std::sync::mpsc::Sender<()>,
    released: Arc<Mutex<std::sync::mpsc::Receiver<()>>>,
}

impl Blocking {
    fn new() -> Self {
        let (release, released) = std::sync::mpsc::channel();
        Self {
            started: Arc::default(),
            release,
            released: Arc::new(Mutex::new(released)),
        }
    }

    fn handler(
        &self,
    ) -> impl Fn(headroom_jobs::JobContext) -> std::future::Ready<Result<Bytes, JobError>>
    + Send
    + Sync
    + 'static {
        let (started, released) = (self.started.clone(), self.released.clone());
        move |_job| {
            started.notify_one();
            let _ = released.lock().unwrap().recv();
            std::future::ready(Ok(Bytes::new()))
        }
    }
}

/// Shuts `worker` down while `blocking`'s handler blocks its thread: the shutdown returns
/// within its bound (the grace, then half the visibility for the hand-back) and reports the
/// blocked job as abandoned. The handler is released afterwards.
async fn shuts_down_within_its_bound_leaving_the_blocked_job(
    worker: Worker,
    blocking: &Blocking,
    grace: Duration,
    visibility: Duration,
) {
    let bound = grace + visibility / 2;
    let shutdown = tokio::time::timeout(bound + SCHEDULING_SLACK, worker.shutdown(grace)).await;
    blocking.release.send(()).unwrap();
    let report = shutdown.unwrap_or_else(|_| {
        panic!("shutdown({grace:?}) did not return within its bound of {bound:?}")
    });
    assert_eq!(
        (report.done, report.handed_back, report.abandoned),
        (0, 0, 1),
        "the blocked job is reported as abandoned: {report:?}"
    );
}

/// The fetch loop panics (a bug in the store) while a handler blocks its thread: the
/// shutdown still returns within its bound. Real time: a handler that blocks a thread needs a
/// multi-threaded runtime, which cannot pause time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_fetch_loop_panics_shutdown_returns_within_its_bound_though_a_handler_never_yields()
 {
    let store: SlowStore = SlowStore::default();
    let (fetch_panics, fetch_panicked) = (store.fetch_panics.clone(), store.fetch_panicked.clone());
    let queue = JobQueue::builder("stuck", store).build().unwrap();
    queue.enqueue(Job::new("blocks")).await.unwrap();
    let blocking = Blocking::new();
    let (grace, visibility) = (Duration::from_secs(1), Duration::from_secs(1));
    let worker = queue
        .worker(blocking.handler())
        .visibility(visibility)
        .start()
        .unwrap();
    blocking.started.notified().await;
    fetch_panics.store(true, Ordering::Relaxed);
    fetch_panicked.notified().await;

    shuts_down_within_its_bound_leaving_the_blocked_job(worker, &blocking, grace, visibility).await;
}

/// A handler that blocks its thread is not cut off when the grace ends: the shutdown still
/// returns within its bound (the grace, then half the visibility for the hand-back). Real
/// time, as above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_returns_within_its_bound_though_a_handler_never_yields() {
    let queue = JobQueue::builder("stuck", MemoryJobStore::new())
        .build()
        .unwrap();
    queue.enqueue(Job::new("blocks")).await.unwrap();
    let blocking = Blocking::new();
    let (grace, visibility) = (Duration::from_secs(1), Duration::from_secs(1));
    let worker = queue
        .worker(blocking.handler())
        .visibility(visibility)
        .start()
        .unwrap();
    blocking.started.notified().await;

    shuts_down_within_its_bound_leaving_the_blocked_job(worker, &blocking, grace, visibility).await;
}

/// A job whose answer the store never takes (out of reach for longer than the finishing step
/// tries) is counted as abandoned, not as lost: no other worker took it over.
#[tokio::test(start_paused = true)]
async fn a_job_whose_answer_the_store_never_takes_is_abandoned_not_lost() {
    let store: SlowStore = SlowStore::default();
    let queue = JobQueue::builder("unreachable", store.clone())
        .build()
        .unwrap();
    let id = queue.enqueue(Job::new("x")).await.unwrap().id;
    store.out_of_reach.store(true, Ordering::Relaxed);
    let worker = queue
        .worker(|_job| async { Ok(Bytes::new()) })
        .visibility(Duration::from_secs(30))
        .start()
        .unwrap();
    wait_for_state(&queue, id, JobState::Running).await;
    // Past the finishing step's budget of half the visibility.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let report = worker.shutdown(Duration::from_secs(1)).await;
    assert_eq!((report.done, report.lost, report.abandoned), (0, 0, 1));
}

/// When the fetch loop panics (a bug in the store), the handlers it started are stopped with
/// it, and their jobs are not held on: another worker takes them over after their visibility.
#[tokio::test(start_paused = true)]
async fn a_panicking_fetch_loop_stops_its_running_handlers() {
    struct Flag(Arc<std::sync::atomic::AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let store: SlowStore = SlowStore::default();
    let (fetch_panics, fetch_panicked) = (store.fetch_panics.clone(), store.fetch_panicked.clone());
    let queue = JobQueue::builder("panics", store).build().unwrap();
    let id = queue.enqueue(Job::new("x")).await.unwrap().id;
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stopped.clone();
    let visibility = Duration::from_secs(10);
    let worker = queue
        .worker(move |_job| {
            let flag = Flag(flag.clone());
            async move {
                let _flag = flag;
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(Bytes::new())
            }
        })
        .visibility(visibility)
        .start()
        .unwrap();
    wait_for_state(&queue, id, JobState::Running).await;
    fetch_panics.store(true, Ordering::Relaxed);
    fetch_panicked.notified().await;
    worker.shutdown(Duration::from_secs(1)).await;
    assert!(stopped.load(Ordering::Relaxed), "the handler still runs");
    fetch_panics.store(false, Ordering::Relaxed);
    tokio::time::sleep(visibility * 2).await;
    let other = queue
        .worker(|_job| async { Ok(Bytes::new()) })
        .visibility(visibility)
        .start()
        .unwrap();
    wait_for_state(&queue, id, JobState::Done).await;
    assert_eq!(queue.status(id).await.unwrap().unwrap().attempt, 2);
    other.shutdown(Duration::from_secs(1)).await;
}

/// The answer of a handler that blocked its thread through a whole shutdown is still stored
/// when it comes, by a store whose calls yield (as a network store's do), since no worker took
/// the job over meanwhile. Real time, as above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_handlers_late_answer_is_stored_after_the_shutdown() {
    let store = SlowStore::slow_completions(Duration::from_millis(1));
    let queue = JobQueue::builder("late", store).build().unwrap();
    let id = queue.enqueue(Job::new("blocks")).await.unwrap().id;
    let blocking = Blocking::new();
    let (grace, visibility) = (Duration::from_millis(200), Duration::from_secs(1));
    let worker = queue
        .worker(blocking.handler())
        .visibility(visibility)
        .start()
        .unwrap();
    blocking.started.notified().await;
    shuts_down_within_its_bound_leaving_the_blocked_job(worker, &blocking, grace, visibility).await;
    let stored = async {
        loop {
            let status = queue.status(id).await.unwrap().unwrap();
            if status.state == JobState::Done {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let status = tokio::time::timeout(SCHEDULING_SLACK, stored)
        .await
        .expect("the late answer was not stored");
    assert_eq!(status.attempt, 1);
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_with_an_endless_grace_returns_once_the_worker_is_idle() {
    let queue = JobQueue::builder("endless", MemoryJobStore::new())
        .build()
        .unwrap();
    let id = queue.enqueue(Job::new("1")).await.unwrap().id;
    let worker = queue
        .worker(|_job| async { Ok(Bytes::new()) })
        .start()
        .unwrap();
    wait_for_state(&queue, id, JobState::Done).await;
    let report = worker.shutdown(Duration::MAX).await;
    assert_eq!((report.done, report.abandoned), (1, 0));
}

/// A job is extended every third of its visibility from its fetch to its stored answer,
/// however its time splits between waiting for a handler, running and being stored: each
/// phase does not start the count again.
#[tokio::test(start_paused = true)]
async fn a_held_job_is_extended_every_third_of_its_visibility_across_its_phases() {
    let visibility = Duration::from_secs(30);
    let store = SlowStore::slow_completions(Duration::from_secs(15));
    let queue = JobQueue::builder("phases", store.clone()).build().unwrap();
    // The first runs 19.9 s while the second waits for the handler, then runs 9.9 s.
    let first = queue.enqueue(Job::new("19900")).await.unwrap().id;
    let second = queue.enqueue(Job::new("9900")).await.unwrap().id;
    assert!(first < second);
    let worker = queue
        .worker(|job| async move {
            let ms: u64 = std::str::from_utf8(job.payload()).unwrap().parse().unwrap();
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(Bytes::new())
        })
        .concurrency(1)
        .prefetch(1)
        .visibility(visibility)
        .start()
        .unwrap();
    let fetched = tokio::time::Instant::now();
    wait_for_state(&queue, first, JobState::Done).await;
    wait_for_state(&queue, second, JobState::Done).await;
    let report = worker.shutdown(Duration::from_secs(1)).await;
    assert_eq!((report.done, report.lost), (2, 0));
    let second_number = {
        let extends = store.extends.lock().unwrap();
        // Job numbers grow with enqueues: the second job's is the larger of the two.
        extends.iter().map(|e| e.0).max().unwrap()
    };
    let mut last = fetched;
    for (number, at) in store.extends.lock().unwrap().iter().copied() {
        if number != second_number {
            continue;
        }
        assert!(
            at - last <= visibility / 3 + Duration::from_millis(100),
            "{:?} without an extension of the second job, from {:?}",
            at - last,
            last - fetched
        );
        last = at;
    }
    // Its answer is stored when the last completion call, which takes 15 s, ends.
    let stored = store.completions.lock().unwrap().last().unwrap().1 + Duration::from_secs(15);
    assert!(
        stored - last <= visibility / 3 + Duration::from_millis(100),
        "{:?} without an extension before the answer was stored",
        stored - last
    );
}

/// Two workers of one queue, on `store`, which is out of the first worker's reach
/// (extensions and completions fail) from `from` to `to` after the job was enqueued; the job's
/// handler runs `runs_for`, and its visibility is 30 s. Checks that the job ran once, done by
/// the first worker, none of it taken over by the second.
async fn assert_kept_through_an_outage(
    store: SlowStore,
    (from, to): (Duration, Duration),
    runs_for: Duration,
) {
    let visibility = Duration::from_secs(30);
    let queue = JobQueue::builder("outage", store.clone()).build().unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let handler = |runs: Arc<AtomicU32>| {
        move |_job| {
            runs.fetch_add(1, Ordering::Relaxed);
            async move {
                tokio::time::sleep(runs_for).await;
                Ok(Bytes::new())
            }
        }
    };
    let id = queue.enqueue(Job::new("x")).await.unwrap().id;
    let start = tokio::time::Instant::now();
    let holder = queue
        .worker(handler(runs.clone()))
        .visibility(visibility)
        .start()
        .unwrap();
    wait_for_state(&queue, id, JobState::Running).await;
    let other = queue
        .worker(handler(runs.clone()))
        .visibility(visibility)
        .start()
        .unwrap();
    tokio::time::sleep_until(start + from).await;
    store.out_of_reach.store(true, Ordering::Relaxed);
    tokio::time::sleep_until(start + to).await;
    store.out_of_reach.store(false, Ordering::Relaxed);
    wait_for_state(&queue, id, JobState::Done).await;
    assert_eq!(
        runs.load(Ordering::Relaxed),
        1,
        "the job ran again elsewhere"
    );
    let (holder, other) = (
        holder.shutdown(Duration::from_secs(1)).await,
        other.shutdown(Duration::from_secs(1)).await,
    );
    assert_eq!((holder.done, holder.lost, other.done), (1, 0, 0));
}

/// A store out of a worker's reach for half the visibility of a job it runs, from just before
/// the job's first extension is due (the worst moment: the extension due a third later, and
/// the one after, fall in the outage), costs no job: an extension that failed is tried again
/// soon, so one lands before the hold runs out and no other worker takes the job over.
#[tokio::test(start_paused = true)]
async fn a_running_job_is_kept_through_a_store_outage_of_half_its_visibility() {
    assert_kept_through_an_outage(
        SlowStore::slow_extends(Duration::from_millis(500)),
        (Duration::from_millis(9_900), Duration::from_millis(24_900)),
        Duration::from_secs(45),
    )
    .await;
}

/// A job whose handler answers while the store is out of reach, for less than half the
/// visibility, is stored once the store is back: its completion is tried until the end of
/// its budget, and its extensions keep it held meanwhile.
#[tokio::test(start_paused = true)]
async fn a_job_finished_during_a_store_outage_of_under_half_its_visibility_is_stored() {
    assert_kept_through_an_outage(
        SlowStore::slow_extends(Duration::from_millis(500)),
        (Duration::from_secs(4), Duration::from_millis(18_900)),
        Duration::from_secs(5),
    )
    .await;
}

/// The same outage, with extensions that fail only 4 s after they were sent (a timeout longer
/// than a tenth of the visibility): the next try goes out as the failure comes back, not a
/// tenth of the visibility after, so one still lands before the hold runs out.
#[tokio::test(start_paused = true)]
async fn a_running_job_is_kept_through_an_outage_whose_failures_come_slowly() {
    assert_kept_through_an_outage(
        SlowStore::default().failing_after(Duration::from_secs(4)),
        (Duration::from_millis(9_900), Duration::from_millis(24_900)),
        Duration::from_secs(45),
    )
    .await;
}

/// A tenant of each of a two-partition queue's partitions, found by enqueueing a probe (held
/// back a day, so it is never delivered here) for each candidate and reading its partition.
async fn a_tenant_in_each_partition(queue: &JobQueue<MemoryJobStore>) -> [String; 2] {
    let mut found: [Option<String>; 2] = [None, None];
    for candidate in 0.. {
        let tenant = format!("tenant-{candidate}");
        let probe = Job::new("probe")
            .tenant(tenant.clone())
            .delay(Duration::from_secs(86_400));
        let partition = usize::from(queue.enqueue(probe).await.unwrap().id.partition());
        found[partition].get_or_insert(tenant);
        if let [Some(a), Some(b)] = &found {
            return [a.clone(), b.clone()];
        }
    }
    unreachable!()
}

/// Lanes take turns leading the fetches of each partition: with two partitions and two lanes
/// of equal weight, neither partition reads one lane first every time (which starved the
/// other lane in that partition while the first held jobs).
#[tokio::test(start_paused = true)]
async fn in_every_partition_lanes_take_turns_leading_and_none_starves() {
    let queue = JobQueue::builder("turns", MemoryJobStore::new())
        .partitions(2)
        .lane_weights([1, 1])
        .build()
        .unwrap();
    let tenants = a_tenant_in_each_partition(&queue).await;
    for tenant in &tenants {
        for lane in [0, 1] {
            for _ in 0..50 {
                queue
                    .enqueue(Job::new("x").tenant(tenant.clone()).lane(lane))
                    .await
                    .unwrap();
            }
        }
    }
    let started: Arc<Mutex<Vec<(u16, u8)>>> = Arc::default();
    let seen = started.clone();
    let worker = queue
        .worker(move |job| {
            seen.lock()
                .unwrap()
                .push((job.id().partition(), job.lane()));
            async { Ok(Bytes::new()) }
        })
        .concurrency(1)
        .prefetch(0)
        .start()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while started.lock().unwrap().len() < 200 {
        assert!(tokio::time::Instant::now() < deadline, "not all jobs ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    worker.shutdown(Duration::from_secs(1)).await;
    let started = started.lock().unwrap().clone();
    for partition in [0, 1] {
        let lanes: Vec<u8> = started
            .iter()
            .filter(|(p, _)| *p == partition)
            .map(|(_, lane)| *lane)
            .take(10)
            .collect();
        assert!(
            lanes.contains(&0) && lanes.contains(&1),
            "partition {partition} started only one lane first: {lanes:?}"
        );
    }
}

/// An empty tenant is a tenant: its idempotency keys are its own, not those of jobs with
/// neither a tenant nor a route.
#[tokio::test(start_paused = true)]
async fn an_empty_tenants_keys_are_its_own() {
    let queue = JobQueue::builder("empty-tenant", MemoryJobStore::new())
        .build()
        .unwrap();
    let tenanted = queue
        .enqueue(Job::new("a").tenant("").idempotency_key("k"))
        .await
        .unwrap();
    assert!(!tenanted.duplicate);
    let untenanted = queue
        .enqueue(Job::new("b").idempotency_key("k"))
        .await
        .unwrap();
    assert!(
        !untenanted.duplicate,
        "a job without a tenant was taken for the empty tenant's"
    );
    assert_eq!(queue.stats().await.unwrap().unfinished, 2);
}

/// A handler that answers at the very moment the shutdown's grace ends has finished: its
/// job is done, not cut off, handed back and run again.
#[tokio::test(start_paused = true)]
async fn a_job_that_answers_as_the_grace_ends_is_done_not_run_again() {
    let grace = Duration::from_secs(5);
    for round in 0..20 {
        let queue = JobQueue::builder("on-the-bell", MemoryJobStore::new())
            .build()
            .unwrap();
        let id = queue.enqueue(Job::new("x")).await.unwrap().id;
        let started = Arc::new(tokio::sync::Notify::new());
        let tell = started.clone();
        let worker = queue
            .worker(move |_job| {
                tell.notify_one();
                async move {
                    tokio::time::sleep(grace).await;
                    Ok(Bytes::from_static(b"answered"))
                }
            })
            .start()
            .unwrap();
        // The grace starts at the instant the handler does (time is paused).
        started.notified().await;
        let report = worker.shutdown(grace).await;
        let status = queue.status(id).await.unwrap().unwrap();
        assert_eq!(
            (status.state, report.done, report.handed_back),
            (JobState::Done, 1, 0),
            "round {round}: {report:?}"
        );
    }
}

/// A job cut off by a shutdown on its last attempt dies with the error of its last failed
/// attempt, not with the shutdown's reason nor with "no answer" alone.
#[tokio::test(start_paused = true)]
async fn a_job_cut_off_on_its_last_attempt_dies_with_its_last_error() {
    let queue = JobQueue::builder("last-error", MemoryJobStore::new())
        .build()
        .unwrap();
    let id = queue.enqueue(Job::new("x")).await.unwrap().id;
    let on_last = Arc::new(tokio::sync::Notify::new());
    let tell = on_last.clone();
    let worker = queue
        .worker(move |job| {
            let tell = tell.clone();
            async move {
                if job.attempt() < 5 {
                    return Err(JobError::retry(format!("gateway 502 on {}", job.attempt())));
                }
                tell.notify_one();
                std::future::pending().await
            }
        })
        .max_attempts(5)
        .backoff(Duration::from_millis(10), 1.0, Duration::from_millis(10))
        .start()
        .unwrap();
    on_last.notified().await;
    let report = worker.shutdown(Duration::ZERO).await;
    assert_eq!((report.retried, report.handed_back), (4, 1));
    let handed_back = queue.status(id).await.unwrap().unwrap();
    assert_eq!(handed_back.error.as_deref(), Some("gateway 502 on 4"));

    let next = queue
        .worker(|_job| async { Ok(Bytes::new()) })
        .max_attempts(5)
        .start()
        .unwrap();
    wait_for_state(&queue, id, JobState::Dead).await;
    let dead = queue.status(id).await.unwrap().unwrap();
    let error = dead.error.unwrap();
    assert!(error.contains("gateway 502 on 4"), "{error}");
    assert_eq!(next.shutdown(Duration::from_secs(1)).await.dead, 1);
}

/// A completion the store refuses for a while, as a primary demoted in a failover answers
/// `READONLY` (or a Redis at its memory limit answers `OOM`), is a store error like any other:
/// tried again within the finishing step's budget, so the job is done once, not abandoned and
/// run again after its visibility.
#[tokio::test(start_paused = true)]
async fn a_completion_refused_as_read_only_for_a_while_is_tried_again_and_the_job_runs_once() {
    let store = SlowStore::read_only_completions(Duration::from_secs(1));
    let queue = JobQueue::builder("read-only", store).build().unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let worker = queue
        .worker(move |_job| {
            counted.fetch_add(1, Ordering::Relaxed);
            async { Ok(Bytes::from_static(b"paid")) }
        })
        .visibility(Duration::from_secs(10))
        .start()
        .unwrap();
    let id = queue.enqueue(Job::new("x")).await.unwrap().id;
    wait_for_state(&queue, id, JobState::Done).await;
    // Past the visibility: a job abandoned meanwhile would have run again by now.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let report = worker.shutdown(Duration::from_secs(1)).await;
    assert_eq!(runs.load(Ordering::Relaxed), 1, "the job ran again");
    assert_eq!((report.done, report.abandoned), (1, 0), "{report:?}");
}

/// A store that refuses writes (`READONLY`) for half the visibility of a running job, from
/// just before its first extension is due, costs no job: a refused extension is tried again
/// soon, as one that failed with the store out of reach is.
#[tokio::test(start_paused = true)]
async fn a_running_job_is_kept_through_a_read_only_store_for_half_its_visibility() {
    assert_kept_through_an_outage(
        SlowStore::slow_extends(Duration::from_millis(500)).read_only_while_out_of_reach(),
        (Duration::from_millis(9_900), Duration::from_millis(24_900)),
        Duration::from_secs(45),
    )
    .await;
}

/// Taking back a lost fetch's jobs is given up at once when the store refuses it with an error
/// no retry cures: the worker goes back to fetching, so jobs that fetch never took run at once.
#[tokio::test(start_paused = true)]
async fn a_recovery_the_store_refuses_does_not_hold_fetching_back() {
    let store: SlowStore = SlowStore::default();
    store.failing_fetches.store(1, Ordering::Relaxed);
    store.failing_recovers.store(true, Ordering::Relaxed);
    let queue = JobQueue::builder("recovery-refused", store)
        .build()
        .unwrap();
    let id = queue.enqueue(Job::new("x")).await.unwrap().id;
    let start = tokio::time::Instant::now();
    let worker = queue
        .worker(|_job| async { Ok(Bytes::new()) })
        .visibility(Duration::from_secs(10))
        .start()
        .unwrap();
    wait_for_state(&queue, id, JobState::Done).await;
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "the job ran {:?} after the failed fetch",
        start.elapsed()
    );
    worker.shutdown(Duration::from_secs(1)).await;
}

/// A fetch the store ran but whose reply was lost (a timeout) does not strand its jobs: the
/// worker takes them back as the same delivery at once, so the job runs within a second or
/// two, on its first attempt, rather than after its visibility on a second one (with
/// `max_attempts(1)`, dead without ever running).
#[tokio::test(start_paused = true)]
async fn a_job_whose_fetch_reply_was_lost_runs_at_once_on_its_first_attempt() {
    let store = SlowStore::first_fetch_reply_lost(MemoryJobStore::new());
    let queue = JobQueue::builder("fetch-lost", store).build().unwrap();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let seen = attempts.clone();
    let id = queue.enqueue(Job::new("x")).await.unwrap().id;
    let start = tokio::time::Instant::now();
    let worker = queue
        .worker(move |job| {
            seen.lock()
                .unwrap()
                .push((job.attempt(), tokio::time::Instant::now() - start));
            async { Ok(Bytes::new()) }
        })
        .visibility(Duration::from_secs(10))
        .max_attempts(1)
        .start()
        .unwrap();
    wait_for_state(&queue, id, JobState::Done).await;
    let report = worker.shutdown(Duration::from_secs(1)).await;
    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    let (attempt, after) = attempts[0];
    assert_eq!(attempt, 1);
    assert!(
        after < Duration::from_secs(2),
        "the job ran only {after:?} after the lost fetch"
    );
    assert_eq!((report.done, report.dead), (1, 0), "{report:?}");
    let status = queue.status(id).await.unwrap().unwrap();
    assert_eq!(status.attempt, 1, "the job was delivered again");
}

/// Job ids are numbered per queue: a queue of another name on the same store (as the docs
/// advise when the partitions change) numbers its jobs from `0-1` again. An effect run under
/// the documented key still runs once for each job, not once for the first queue's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_two_queues_on_one_store_each_take_effect_under_the_documented_key() {
    let store = MemoryJobStore::new();
    let charges = Charges::default();
    for name in ["checkout", "checkout-v2"] {
        charges
            .charge_one(JobQueue::builder(name, store.clone()))
            .await;
    }
    assert_eq!(charges.count(), 2, "each queue's job charged");
}

/// Two stores (one memory store per replica, say) with a queue of the same name give the same
/// ids to their jobs, and may enqueue them in the same millisecond: with job nonces on, an
/// effect run under the documented key still runs once for each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_two_stores_with_a_queue_of_one_name_each_take_effect_under_the_documented_key() {
    // A clock that stands still: both jobs are enqueued in the same millisecond.
    let clock = headroom_core::ManualClock::new().clock();
    let charges = Charges::default();
    for _ in 0..2 {
        let store = MemoryJobStore::builder().clock(clock.clone()).build();
        let mut config = QueueConfig::default();
        config.job_nonces = true;
        charges
            .charge_one(JobQueue::builder("checkout", store).config(config))
            .await;
    }
    assert_eq!(charges.count(), 2, "each store's job charged");
}

/// Charges made by jobs whose handlers follow the documented effectively-once recipe, on one
/// idempotency store.
#[derive(Clone)]
struct Charges {
    idempotency: Arc<Idempotency<MemoryLeaseStore>>,
    made: Arc<AtomicU32>,
}

impl Default for Charges {
    fn default() -> Self {
        Self {
            idempotency: Arc::new(
                Idempotency::builder(MemoryLeaseStore::new())
                    .build()
                    .unwrap(),
            ),
            made: Arc::default(),
        }
    }
}

impl Charges {
    fn count(&self) -> u32 {
        self.made.load(Ordering::SeqCst)
    }

    /// Runs one job of the queue `builder` makes, until done.
    async fn charge_one(&self, builder: headroom_jobs::JobQueueBuilder<MemoryJobStore>) {
        let queue = builder.build().unwrap();
        let charges = self.clone();
        let worker = queue
            .worker(move |job| {
                let charges = charges.clone();
                async move {
                    let key = IdempotencyKey::new(&job.idempotency_key()).unwrap();
                    charges
                        .idempotency
                        .execute(
                            &Scope::new("shop", "charge").unwrap(),
                            &key,
                            job.payload(),
                            || async {
                                charges.made.fetch_add(1, Ordering::SeqCst);
                                Ok::<_, std::io::Error>(())
                            },
                        )
                        .await
                        .map_err(|e| JobError::retry(e.to_string()))?;
                    Ok(Bytes::new())
                }
            })
            .start()
            .unwrap();
        let id = queue.enqueue(Job::new("charge")).await.unwrap().id;
        wait_for_state(&queue, id, JobState::Done).await;
        worker.shutdown(Duration::from_secs(5)).await;
    }
}

/// A handler that succeeded with a result over `max_result_len` did its work: the job is done
/// (not dead, which would invite running it again), without the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_the_limit_is_dropped_and_the_job_is_done() {
    let mut config = QueueConfig::default();
    config.max_result_len = 8;
    let queue = JobQueue::builder("receipts", MemoryJobStore::new())
        .config(config)
        .build()
        .unwrap();
    let worker = queue
        .worker(|_job| async { Ok(Bytes::from_static(b"nine byte")) })
        .start()
        .unwrap();
    let id = queue.enqueue(Job::new("charge")).await.unwrap().id;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = queue.status(id).await.unwrap().expect("kept");
        if matches!(status.state, JobState::Done | JobState::Dead) {
            break status;
        }
        assert!(tokio::time::Instant::now() < deadline, "never finished");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    worker.shutdown(Duration::from_secs(5)).await;
    assert_eq!(status.state, JobState::Done, "{:?}", status.error);
    assert_eq!(status.result, Some(Bytes::new()), "the result is dropped");
}

/// By default a job is stored as workers of earlier versions read it (envelope version 1,
/// without a nonce), so that a rolling deploy's older workers run the newer producers' jobs;
/// with job nonces on, it is not.
#[tokio::test]
async fn by_default_jobs_are_stored_as_earlier_workers_read_them() {
    for (nonces, version) in [(false, 1u8), (true, 2)] {
        let store = MemoryJobStore::new();
        let mut config = QueueConfig::default();
        config.job_nonces = nonces;
        let queue = JobQueue::builder("compat", store.clone())
            .config(config)
            .build()
            .unwrap();
        queue.enqueue(Job::new("charge")).await.unwrap();
        let request = FetchRequest {
            consumer: "reader",
            lanes: &[0],
            max: 1,
            visibility: Duration::from_secs(60),
        };
        let partition = headroom_core::Namespace::new("headroom.jobs")
            .unwrap()
            .key("{compat.0}")
            .unwrap();
        let fetched = store.fetch(&partition, request).await.unwrap();
        assert_eq!(fetched.len(), 1, "the queue's partition is {partition:?}");
        assert_eq!(fetched[0].payload[0], version, "nonces {nonces}");
    }
}
