//! Fixtures shared by the benchmarks and the contention programs of this package.

pub mod apalis_peer;
use std::cell::RefCell;
use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId};

use futures_util::FutureExt;
use headroom_core::jobs::{EnqueueLimits, FetchRequest, JobStore, NewJob};
use headroom_core::lease::Fenced;
use headroom_core::memory::MemoryJobStore;
use headroom_redis::{Redis, RedisConfig};
use headroom_testkit::RedisServer;
use tower::{Service, ServiceExt, service_fn};

/// A ready service that answers its request at once: what the layer benches wrap.
pub fn echo()
-> impl Service<u64, Response = u64, Error = Infallible, Future = Ready<Result<u64, Infallible>>> + Clone
{
    service_fn(|n: u64| ready(Ok::<_, Infallible>(n)))
}

/// One `ready` + `call` of `service`, completed at once.
pub fn ready_call<S>(service: &mut S)
where
    S: Service<u64, Response = u64, Error = Infallible>,
{
    let ready = service.ready().now_or_never().expect("ready").expect("ok");
    black_box(
        ready
            .call(black_box(7))
            .now_or_never()
            .expect("done")
            .expect("ok"),
    );
}

/// Runs `work` on `threads` threads for `run_for`; returns the operations per second in all
/// (an operation counts when `work` returns true).
pub fn throughput(
    threads: usize,
    run_for: Duration,
    work: impl Fn() -> bool + Send + Sync + 'static,
) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let work = Arc::new(work);
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (stop, work) = (Arc::clone(&stop), Arc::clone(&work));
            thread::spawn(move || {
                let mut done = 0_u64;
                while !stop.load(Ordering::Relaxed) {
                    done += u64::from(work());
                }
                done
            })
        })
        .collect();
    thread::sleep(run_for);
    stop.store(true, Ordering::Relaxed);
    let total: u64 = handles
        .into_iter()
        .map(|h| h.join().expect("worker thread"))
        .sum();
    total as f64 / started.elapsed().as_secs_f64()
}

/// Benches calls side by side on a loopback server, whose speed drifts from second to second
/// on a shared machine: every iteration of every bench function makes each of the calls once,
/// in turn, and the function reports the time of its own call. Criterion measures the
/// functions one after the other, so their figures still come from different stretches of
/// time; the ratios that do not are printed at the end: each call's mean over every call made
/// in the whole group, against the first call's (the peer).
///
/// `names` are each call's function and parameter. `prepare(i)` runs before call `i` and is not timed; `call(i)` is the timed call. What a call
/// leaves to spawned tasks (the cache's L1 fill) runs after it, untimed, so that it does not
/// land in the next call's time.
pub fn interleaved<F: Future<Output = ()>>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    runtime: &tokio::runtime::Runtime,
    names: &[(&str, &str)],
    prepare: impl Fn(usize),
    call: impl Fn(usize) -> F,
) {
    let totals = RefCell::new(vec![(Duration::ZERO, 0_u64); names.len()]);
    let (prepare, call, totals) = (&prepare, &call, &totals);
    for (own, &(function, parameter)) in names.iter().enumerate() {
        group.bench_function(BenchmarkId::new(function, parameter), |b| {
            b.to_async(runtime).iter_custom(|iters| async move {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    for i in 0..names.len() {
                        prepare(i);
                        let started = Instant::now();
                        call(i).await;
                        let elapsed = started.elapsed();
                        if i == own {
                            timed += elapsed;
                        }
                        {
                            let (total, count) = &mut totals.borrow_mut()[i];
                            *total += elapsed;
                            *count += 1;
                        }
                        tokio::task::yield_now().await;
                    }
                }
                timed
            })
        });
    }
    let totals = totals.borrow();
    if totals.iter().any(|&(_, count)| count == 0) {
        return; // Filtered out.
    }
    let mean = |i: usize| totals[i].0.as_secs_f64() * 1e6 / totals[i].1 as f64;
    let mut line = format!("interleaved means over {} calls each:", totals[0].1);
    for (i, (function, parameter)) in names.iter().enumerate() {
        line += &format!(
            " {function}/{parameter} {:.2} µs ({:.3}×);",
            mean(i),
            mean(i) / mean(0)
        );
    }
    println!("{line}");
}

/// The number of cores, the thread count of contention runs.
pub fn cores() -> usize {
    thread::available_parallelism().map_or(2, usize::from)
}

/// A single-threaded tokio runtime with timers, as criterion's async benches use.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A loopback `redis-server` with a headroom connection and a raw redis-rs connection of the
/// same kind (multiplexed, through `ConnectionManager`), for side-by-side benches.
pub struct LoopbackRedis {
    /// The server; stopped when this is dropped.
    pub server: RedisServer,
    /// headroom's shared handle.
    pub redis: Redis,
    /// The raw peer connection.
    pub raw: redis::aio::ConnectionManager,
}

impl LoopbackRedis {
    /// Starts a server and connects both clients on `runtime`.
    pub fn start(runtime: &tokio::runtime::Runtime) -> Self {
        let server = RedisServer::start();
        let (redis, raw) = runtime.block_on(async {
            let redis = Redis::connect(RedisConfig::standalone(server.url()))
                .await
                .expect("connect");
            let client = redis::Client::open(server.url()).expect("client");
            let raw = redis::aio::ConnectionManager::new(client)
                .await
                .expect("raw connection");
            (redis, raw)
        });
        Self { server, redis, raw }
    }
}

/// One job through the memory job store, as the jobs bench and the gate run it: `job`
/// enqueued in `partition` under `limits`, fetched by one consumer and completed with an
/// empty result kept for a millisecond.
pub async fn job_round_trip(
    store: &MemoryJobStore,
    partition: &headroom_core::Key,
    job: &NewJob,
    limits: &EnqueueLimits,
) -> Fenced {
    store
        .enqueue(partition, job, limits)
        .await
        .expect("enqueue");
    let request = FetchRequest {
        consumer: "bench",
        lanes: &[0],
        max: 1,
        visibility: Duration::from_secs(30),
    };
    let delivery = store
        .fetch(partition, request)
        .await
        .expect("fetch")
        .pop()
        .expect("a job");
    store
        .complete(
            partition,
            delivery.number,
            delivery.attempt,
            bytes::Bytes::new(),
            Duration::from_millis(1),
        )
        .await
        .expect("complete")
}
