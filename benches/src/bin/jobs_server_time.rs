//! Where a job's time goes on Redis: one worker of 8 handlers, 100 jobs in hand, drains 10,000
//! queued jobs from a fresh loopback Redis, eight times. Each drain prints its throughput, the
//! server's CPU per job (`INFO cpu`, which is the limit on one core: the server runs at about
//! one core during a drain) and this process's CPU per job. With `--scripts`, it also prints
//! each script's server time per job from `SLOWLOG`, which logs every command and so adds to
//! the server's time: compare those figures only with one another.
//!
//! Run with: `cargo run --release -p headroom-benches --bin jobs_server_time [-- --scripts]`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use headroom_benches::LoopbackRedis;
use headroom_jobs::{Job, JobQueue};
use headroom_redis::RedisJobStore;

const JOBS: u64 = 10_000;
const CONCURRENCY: usize = 8;
/// With the 8 running, 100 jobs in hand: as the jobs bench, and apalis' fetch batch.
const PREFETCH: usize = 92;
const DRAINS: usize = 8;

/// This process's CPU time (user and system), from `/proc/self/stat`.
fn own_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .expect("stat fields")
        .split_whitespace()
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // The kernel's clock tick, 100 per second on Linux.
    Duration::from_millis(ticks * 10)
}

/// The server's CPU time (user and system), from `INFO cpu`.
fn server_cpu(redis: &LoopbackRedis) -> Duration {
    let seconds: f64 = redis
        .server
        .cli(&["INFO", "cpu"])
        .lines()
        .filter_map(|line| {
            line.strip_prefix("used_cpu_user:")
                .or_else(|| line.strip_prefix("used_cpu_sys:"))
        })
        .map(|value| value.trim().parse::<f64>().expect("a CPU figure"))
        .sum();
    Duration::from_secs_f64(seconds)
}

/// Each logged command's total server time, keyed by its name (and a script's SHA prefix).
async fn slowlog_by_command(redis: &LoopbackRedis) -> BTreeMap<String, (u64, Duration)> {
    type Entry = (i64, i64, u64, Vec<redis::Value>, redis::Value, redis::Value);
    let mut raw = redis.raw.clone();
    let log: Vec<Entry> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(1_000_000)
        .query_async(&mut raw)
        .await
        .expect("SLOWLOG GET");
    let mut by = BTreeMap::<String, (u64, Duration)>::new();
    for (_, _, micros, args, _, _) in log {
        let text = |i: usize| match args.get(i) {
            Some(redis::Value::BulkString(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
            _ => String::new(),
        };
        let mut name = text(0).to_ascii_uppercase();
        if name == "EVALSHA" {
            name = format!("EVALSHA {}", &text(1)[..8.min(text(1).len())]);
        }
        let entry = by.entry(name).or_default();
        entry.0 += 1;
        entry.1 += Duration::from_micros(micros);
    }
    by
}

fn main() {
    let scripts = std::env::args().any(|arg| arg == "--scripts");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let redis = LoopbackRedis::start(&runtime);
    let per_job = |d: Duration| d.as_secs_f64() * 1e6 / JOBS as f64;
    for drain in 0..DRAINS {
        runtime.block_on(async {
            let queue = JobQueue::builder(format!("server-time-{drain}"), RedisJobStore::new(redis.redis.clone()))
                .max_len(JOBS)
                .build()
                .expect("queue");
            for n in 0..JOBS {
                queue
                    .enqueue(Job::new(format!("{{\"n\":{n}}}")))
                    .await
                    .expect("enqueue");
            }
            if scripts {
                redis.server.cli(&["CONFIG", "SET", "slowlog-log-slower-than", "0"]);
                redis.server.cli(&["CONFIG", "SET", "slowlog-max-len", "1000000"]);
                redis.server.cli(&["SLOWLOG", "RESET"]);
            }
            let done = Arc::new(AtomicU64::new(0));
            let (finished, all_done) = tokio::sync::oneshot::channel::<Instant>();
            let finished = Arc::new(Mutex::new(Some(finished)));
            let (server_before, own_before) = (server_cpu(&redis), own_cpu());
            let start = Instant::now();
            let worker = queue
                .worker(move |_| {
                    let (done, finished) = (done.clone(), finished.clone());
                    async move {
                        if done.fetch_add(1, Ordering::Relaxed) + 1 == JOBS
                            && let Some(finished) = finished.lock().expect("lock").take()
                        {
                            let _ = finished.send(Instant::now());
                        }
                        Ok(Bytes::new())
                    }
                })
                .concurrency(CONCURRENCY)
                .prefetch(PREFETCH)
                .start()
                .expect("worker");
            let end = all_done.await.expect("every job ran");
            let (server, own) = (server_cpu(&redis) - server_before, own_cpu() - own_before);
            let wall = end - start;
            worker.shutdown(Duration::from_secs(10)).await;
            println!(
                "{:>6.0} jobs/s; server {:>5.1} µs/job ({:.2} of a core); this process {:>5.1} µs/job ({:.2} of a core)",
                JOBS as f64 / wall.as_secs_f64(),
                per_job(server),
                server.as_secs_f64() / wall.as_secs_f64(),
                per_job(own),
                own.as_secs_f64() / wall.as_secs_f64(),
            );
            if scripts {
                redis.server.cli(&["CONFIG", "SET", "slowlog-log-slower-than", "10000"]);
                for (command, (calls, time)) in slowlog_by_command(&redis).await {
                    if time > Duration::from_millis(1) {
                        println!("  {command:<18} {calls:>6} calls, {:>6.2} µs/job", per_job(time));
                    }
                }
            }
        });
        redis.server.cli(&["FLUSHALL"]);
    }
}
