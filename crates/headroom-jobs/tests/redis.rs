//! Queues and write-behind on real Redis, standalone and Cluster.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use headroom_idempotency::{Idempotency, IdempotencyKey, Scope};
use headroom_jobs::{EnqueueError, Job, JobQueue, JobState, Write, WriteBehind};
use headroom_redis::{Redis, RedisConfig, RedisJobStore, RedisLeaseStore};
use headroom_testkit::{shared_cluster, shared_server, unique_namespace};
use support::SlowStore;

/// Rows by key: the version written last and the value.
type Rows = HashMap<Bytes, (u64, Option<Bytes>)>;

async fn cluster() -> Redis {
    Redis::connect(RedisConfig::cluster(shared_cluster().urls()))
        .await
        .unwrap()
}

async fn standalone() -> Redis {
    Redis::connect(RedisConfig::standalone(shared_server().url()))
        .await
        .unwrap()
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "{what} within 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 10,000 jobs on a queue spread over 6 partitions of a 3-master cluster, run by 4 workers:
/// each takes effect once, every partition is served, and every worker works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_jobs_over_cluster_partitions_and_four_workers_each_take_effect_once() {
    let redis = cluster().await;
    let ns = unique_namespace("cluster-jobs");
    let queue = JobQueue::builder("orders", RedisJobStore::new(redis.clone()))
        .namespace(ns.clone())
        .partitions(6)
        .max_len(20_000)
        .build()
        .unwrap();
    let masters: HashSet<usize> = (0..6)
        .map(|p| {
            let cluster = shared_cluster();
            cluster.slot_owner(cluster.keyslot(&format!("{}:{{orders.{p}}}", ns.as_str())))
        })
        .collect();
    assert!(masters.len() >= 2, "the partitions all live on one master");
    let idempotency = Arc::new(
        Idempotency::builder(RedisLeaseStore::new(redis.clone()))
            .namespace(ns.child("idempotency").unwrap())
            .build()
            .unwrap(),
    );
    let effects: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let by_partition: Arc<Mutex<HashMap<u16, u64>>> = Arc::default();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (idempotency, effects, by_partition) =
                (idempotency.clone(), effects.clone(), by_partition.clone());
            queue
                .worker(move |job| {
                    let (idempotency, effects, by_partition) =
                        (idempotency.clone(), effects.clone(), by_partition.clone());
                    async move {
                        *by_partition
                            .lock()
                            .unwrap()
                            .entry(job.id().partition())
                            .or_default() += 1;
                        let order: u64 =
                            std::str::from_utf8(job.payload()).unwrap().parse().unwrap();
                        let key = IdempotencyKey::new(&job.id().to_string()).unwrap();
                        idempotency
                            .execute(
                                &Scope::new("shop", "fulfil").unwrap(),
                                &key,
                                b"",
                                || async {
                                    *effects.lock().unwrap().entry(order).or_default() += 1;
                                    Ok::<_, std::io::Error>(())
                                },
                            )
                            .await
                            .map_err(|e| headroom_jobs::JobError::retry(e.to_string()))?;
                        Ok(Bytes::new())
                    }
                })
                .concurrency(8)
                .start()
                .unwrap()
        })
        .collect();
    for order in 0..10_000u64 {
        queue.enqueue(Job::new(order.to_string())).await.unwrap();
    }
    wait_until("10,000 jobs done", || {
        effects.lock().unwrap().len() == 10_000
    })
    .await;
    let mut done = 0;
    for worker in workers {
        let report = worker.shutdown(Duration::from_secs(10)).await;
        assert!(report.done > 0, "a worker got nothing: {report:?}");
        done += report.done;
    }
    assert_eq!(done, 10_000);
    let effects = effects.lock().unwrap().clone();
    assert!((0..10_000).all(|order| effects.get(&order) == Some(&1)));
    let by_partition = by_partition.lock().unwrap().clone();
    assert_eq!(by_partition.len(), 6, "{by_partition:?}");
    // Jobs without a tenant or route go round the partitions: each got its sixth.
    assert!(
        by_partition.values().all(|&n| n.abs_diff(10_000 / 6) <= 1),
        "{by_partition:?}"
    );
    assert_eq!(queue.stats().await.unwrap().unfinished, 0);
}

/// The queue at its bound refuses with a retry-after, and accepts again as a worker drains it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_on_redis_refuses_and_accepts_again_as_it_drains() {
    for redis in [standalone().await, cluster().await] {
        let queue = JobQueue::builder("bounded", RedisJobStore::new(redis))
            .namespace(unique_namespace("bounded"))
            .max_len(50)
            .build()
            .unwrap();
        for i in 0..50 {
            queue.enqueue(Job::new(format!("{i}"))).await.unwrap();
        }
        let refused = queue.enqueue(Job::new("over")).await.unwrap_err();
        assert!(
            matches!(
                refused,
                EnqueueError::Full {
                    depth: 50,
                    tenant: false,
                    ..
                }
            ),
            "{refused:?}"
        );
        assert!(refused.retry_after().unwrap() >= queue.config().min_retry_after);
        let worker = queue
            .worker(|_| async { Ok(Bytes::new()) })
            .start()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut accepted = 0;
        while accepted < 100 {
            match queue.enqueue(Job::new("more")).await {
                Ok(_) => accepted += 1,
                Err(EnqueueError::Full { .. }) => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                Err(other) => panic!("{other:?}"),
            }
            assert!(Instant::now() < deadline, "the queue never drained");
        }
        worker.shutdown(Duration::from_secs(5)).await;
    }
}

/// Write-behind on the cluster: writes spread over the partitions by key, and every key's
/// last write reaches the writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_on_the_cluster_hands_every_keys_last_write_to_the_writer() {
    let writes = WriteBehind::builder("profiles", RedisJobStore::new(cluster().await))
        .namespace(unique_namespace("write-behind"))
        .queue({
            let mut config = headroom_jobs::QueueConfig::default();
            config.partitions = 4;
            config.max_len = 100_000;
            config
        })
        .flush_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    // Every write is recorded before the flusher starts, so each key's twenty coalesce
    // into one, whatever the timing.
    let mut last = HashMap::new();
    for round in 0..20 {
        for key in 0..100 {
            let (key, value) = (format!("user:{key}"), format!("{round}"));
            writes.put(key.clone(), value.clone()).await.unwrap();
            last.insert(key, value);
        }
    }
    let rows: Arc<Mutex<Rows>> = Arc::default();
    let calls = Arc::new(AtomicU64::new(0));
    let (db, counted) = (rows.clone(), calls.clone());
    let flusher = writes.start(move |batch: Vec<Write>| {
        let (db, counted) = (db.clone(), counted.clone());
        async move {
            counted.fetch_add(1, Ordering::Relaxed);
            let mut rows = db.lock().unwrap();
            for write in batch {
                let row = rows.entry(write.key).or_insert((0, None));
                if row.0 < write.version {
                    *row = (write.version, write.value);
                }
            }
            Ok(())
        }
    });
    let report = flusher.shutdown(Duration::from_secs(30)).await;
    let rows = rows.lock().unwrap().clone();
    for (key, value) in &last {
        let row = rows.get(key.as_bytes()).and_then(|(_, v)| v.clone());
        assert_eq!(row.as_deref(), Some(value.as_bytes()), "{key}");
    }
    assert_eq!((report.writes, report.coalesced), (100, 1_900));
    assert_eq!(writes.queue().stats().await.unwrap().unfinished, 0);
}

/// A worker that shuts down leaves its lanes' consumer groups: restarts do not pile up
/// consumers in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_shuts_down_leaves_the_consumer_group() {
    let ns = unique_namespace("leaving");
    let queue = JobQueue::builder("leaving", RedisJobStore::new(standalone().await))
        .namespace(ns.clone())
        .build()
        .unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let counted = done.clone();
    let worker = queue
        .worker(move |_| {
            counted.fetch_add(1, Ordering::Relaxed);
            async { Ok(Bytes::new()) }
        })
        .consumer("leaver")
        .start()
        .unwrap();
    for i in 0..3 {
        queue.enqueue(Job::new(format!("{i}"))).await.unwrap();
    }
    wait_until("three jobs ran", || done.load(Ordering::Relaxed) == 3).await;
    let lane = shared_server()
        .cli(&["KEYS", &format!("{}:*:s:0", ns.as_str())])
        .trim()
        .to_owned();
    assert!(!lane.is_empty(), "the lane's stream exists");
    let consumers = || shared_server().cli(&["XINFO", "CONSUMERS", &lane, "w"]);
    assert!(consumers().contains("leaver"), "{}", consumers());
    let report = worker.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.done, 3);
    assert!(!consumers().contains("leaver"), "{}", consumers());
}

/// A fetch Redis ran but whose reply was lost (the store answers a timeout after running the
/// real fetch) does not strand its job for the visibility: the worker takes it back as the
/// same delivery, so it runs at once on its first attempt, on standalone Redis and on a
/// cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_fetch_reply_was_lost_runs_at_once_on_its_first_attempt_on_redis() {
    for (what, redis) in [
        ("standalone", standalone().await),
        ("cluster", cluster().await),
    ] {
        let store = SlowStore::first_fetch_reply_lost(RedisJobStore::new(redis));
        let queue = JobQueue::builder("fetch-lost", store)
            .namespace(unique_namespace("fetch-lost"))
            .build()
            .unwrap();
        let id = queue.enqueue(Job::new("x")).await.unwrap().id;
        let attempts: Arc<Mutex<Vec<(u32, Duration)>>> = Arc::default();
        let seen = attempts.clone();
        let start = Instant::now();
        let worker = queue
            .worker(move |job| {
                seen.lock().unwrap().push((job.attempt(), start.elapsed()));
                async { Ok(Bytes::new()) }
            })
            .visibility(Duration::from_secs(10))
            .max_attempts(1)
            .start()
            .unwrap();
        wait_until("the job ran", || !attempts.lock().unwrap().is_empty()).await;
        let report = worker.shutdown(Duration::from_secs(5)).await;
        let attempts = attempts.lock().unwrap().clone();
        assert_eq!(attempts.len(), 1, "{what}: {attempts:?}");
        let (attempt, after) = attempts[0];
        assert_eq!(attempt, 1, "{what}");
        assert!(
            after < Duration::from_secs(2),
            "{what}: ran only after {after:?}"
        );
        assert_eq!((report.done, report.dead), (1, 0), "{what}: {report:?}");
        let status = queue.status(id).await.unwrap().unwrap();
        assert_eq!(
            (status.state, status.attempt),
            (JobState::Done, 1),
            "{what}"
        );
    }
}
