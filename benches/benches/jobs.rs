//! Job queues: an enqueue on loopback Redis side by side with a raw `XADD`, a worker draining
//! a queue side by side with apalis-redis at the same concurrency, and a job's enqueue, fetch
//! and completion on the memory store.
//!
//! Run with: `cargo bench -p headroom-benches --bench jobs`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use headroom_benches::apalis_peer::{APALIS_BATCH, apalis_drain};
use headroom_benches::{LoopbackRedis, runtime};
use headroom_core::Namespace;
use headroom_core::jobs::{EnqueueLimits, NewJob};
use headroom_core::memory::MemoryJobStore;
use headroom_jobs::{Job, JobQueue, WorkerConfig};
use headroom_redis::RedisJobStore;

/// Jobs per drain in the worker comparison.
const DRAIN: u64 = 10_000;
/// Handlers running at once, for both workers.
const CONCURRENCY: usize = 8;
/// Jobs headroom's worker fetches ahead of its handlers: with them it holds up to
/// `APALIS_BATCH` jobs, as the peer does with its fetch batch.
const PREFETCH: usize = APALIS_BATCH - CONCURRENCY;

fn enqueue(c: &mut Criterion) {
    let runtime = runtime();
    let loopback = LoopbackRedis::start(&runtime);
    let queue = JobQueue::builder("bench", RedisJobStore::new(loopback.redis.clone()))
        .max_len(u64::MAX / 2)
        .build()
        .expect("queue");
    let raw = loopback.raw.clone();
    let payload = Bytes::from_static(b"{\"order\":4711,\"amount\":1999}");
    let mut group = c.benchmark_group("jobs_enqueue_redis");
    group.bench_function(BenchmarkId::new("raw_redis_rs", "XADD"), |b| {
        b.to_async(&runtime).iter(|| {
            let mut conn = raw.clone();
            let payload = payload.clone();
            async move {
                let _: String = redis::cmd("XADD")
                    .arg("bench:raw-stream")
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(100_000)
                    .arg("*")
                    .arg("p")
                    .arg(&payload[..])
                    .query_async(&mut conn)
                    .await
                    .expect("XADD");
            }
        })
    });
    group.bench_function(BenchmarkId::new("headroom", "enqueue"), |b| {
        b.to_async(&runtime).iter(|| async {
            queue
                .enqueue(Job::new(payload.clone()))
                .await
                .expect("enqueue")
        })
    });
    group.finish();
    loopback.server.cli(&["FLUSHALL"]);
}

fn drain(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let loopback = LoopbackRedis::start(&runtime);
    let url = loopback.server.url();
    let round = AtomicU64::new(0);
    let mut group = c.benchmark_group("jobs_worker_redis");
    group.throughput(Throughput::Elements(DRAIN));
    group.sample_size(10);
    group.bench_function(BenchmarkId::new("apalis_redis", CONCURRENCY), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let name = format!("apalis-{}", round.fetch_add(1, Ordering::Relaxed));
                total += runtime.block_on(apalis_drain(&url, &name, DRAIN, CONCURRENCY));
                loopback.server.cli(&["FLUSHALL"]);
            }
            total
        })
    });
    // The same jobs in hand as the peer, then the worker's default prefetch.
    for (id, prefetch) in [
        ("headroom", PREFETCH),
        (
            "headroom_default_prefetch",
            WorkerConfig::default().prefetch,
        ),
    ] {
        group.bench_function(BenchmarkId::new(id, CONCURRENCY), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let name = format!("headroom-{}", round.fetch_add(1, Ordering::Relaxed));
                    total += runtime.block_on(headroom_drain(&loopback, &name, prefetch));
                    loopback.server.cli(&["FLUSHALL"]);
                }
                total
            })
        });
    }
    group.finish();
}

/// Enqueues [`DRAIN`] jobs (untimed), then times one worker of [`CONCURRENCY`] handlers and
/// `prefetch` jobs fetched ahead from its start until the last job's handler returned.
async fn headroom_drain(loopback: &LoopbackRedis, name: &str, prefetch: usize) -> Duration {
    let queue = JobQueue::builder(name, RedisJobStore::new(loopback.redis.clone()))
        .max_len(DRAIN)
        .build()
        .expect("queue");
    for n in 0..DRAIN {
        queue
            .enqueue(Job::new(format!("{{\"n\":{n}}}")))
            .await
            .expect("enqueue");
    }
    let done = Arc::new(AtomicU64::new(0));
    let (finished, all_done) = tokio::sync::oneshot::channel::<Instant>();
    let finished = Arc::new(std::sync::Mutex::new(Some(finished)));
    let counted = done.clone();
    let start = Instant::now();
    let worker = queue
        .worker(move |_| {
            let (counted, finished) = (counted.clone(), finished.clone());
            async move {
                if counted.fetch_add(1, Ordering::Relaxed) + 1 == DRAIN
                    && let Some(finished) = finished.lock().expect("lock").take()
                {
                    let _ = finished.send(Instant::now());
                }
                Ok(Bytes::new())
            }
        })
        .concurrency(CONCURRENCY)
        .prefetch(prefetch)
        .start()
        .expect("worker");
    let end = all_done.await.expect("every job ran");
    let report = worker.shutdown(Duration::from_secs(10)).await;
    assert_eq!(report.done, DRAIN, "every job completed");
    end - start
}

fn memory(c: &mut Criterion) {
    let runtime = runtime();
    let store = MemoryJobStore::new();
    let partition = Namespace::new("bench")
        .expect("ns")
        .key("{q}")
        .expect("key");
    let limits = EnqueueLimits {
        max_len: 1_000,
        max_per_tenant: None,
        dedup_window: Duration::from_secs(60),
    };
    let job = NewJob::new(Bytes::from_static(b"{\"order\":4711}"));
    let mut group = c.benchmark_group("jobs_memory");
    group.bench_function("enqueue_fetch_complete", |b| {
        b.to_async(&runtime)
            .iter(|| headroom_benches::job_round_trip(&store, &partition, &job, &limits))
    });
    group.finish();
}

criterion_group!(benches, enqueue, drain, memory);
criterion_main!(benches);
