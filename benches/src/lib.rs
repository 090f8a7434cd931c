//! Fixtures shared by the benchmarks and the contention programs of this package.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use headroom_redis::{Redis, RedisConfig};
use headroom_testkit::RedisServer;

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
