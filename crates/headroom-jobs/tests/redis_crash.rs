//! Jobs on real Redis through the failures they exist for: a worker process killed with
//! SIGKILL in the middle of a job, Redis itself killed and restarted mid-run, and a
//! write-behind instance killed with writes acknowledged but not yet written.
//!
//! This target has its own `main`: run with the argument `worker` or `writer`, it is the
//! worker process or the write-behind instance a scenario kills.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use headroom_idempotency::{Idempotency, IdempotencyKey, Scope};
use headroom_jobs::{Job, JobError, JobId, JobQueue, JobState, Write, WriteBehind};
use headroom_redis::{Redis, RedisConfig, RedisJobStore, RedisLeaseStore};
use headroom_testkit::RedisServer;

const VISIBILITY: Duration = Duration::from_secs(2);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn queue(url: &str) -> (Redis, JobQueue<RedisJobStore>) {
    let redis = Redis::connect(RedisConfig::standalone(url)).await.unwrap();
    let queue = JobQueue::builder("payments", RedisJobStore::new(redis.clone()))
        .build()
        .unwrap();
    (redis, queue)
}

/// The idempotent handler both processes run: the charge (an `INCR` of the job's counter in
/// Redis) happens inside an idempotency key named by the job id, with records in Redis.
async fn charge(
    redis: &Redis,
    idempotency: &Idempotency<RedisLeaseStore>,
    id: JobId,
) -> Result<String, JobError> {
    let scope = Scope::new("shop", "charge").unwrap();
    let key = IdempotencyKey::new(&id.to_string()).unwrap();
    let out = idempotency
        .execute(&scope, &key, b"", || async {
            let charges: u64 = redis
                .query(redis::cmd("INCR").arg(format!("charges:{id}")))
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(format!("charge {charges}"))
        })
        .await
        .map_err(|e| JobError::retry(e.to_string()))?;
    Ok(out.value)
}

fn idempotency(redis: &Redis) -> Idempotency<RedisLeaseStore> {
    Idempotency::builder(RedisLeaseStore::new(redis.clone()))
        .lease(Duration::from_secs(1))
        .build()
        .unwrap()
}

/// The worker process: charges, says so, then hangs as if stuck before it could answer,
/// until it is killed. A job whose payload is `before` hangs before charging.
fn worker_process(url: &str) {
    runtime().block_on(async {
        let (redis, queue) = queue(url).await;
        let idempotency = Arc::new(idempotency(&redis));
        let _worker = queue
            .worker(move |job| {
                let (redis, idempotency) = (redis.clone(), idempotency.clone());
                async move {
                    let before = job.payload() == "before";
                    if !before {
                        charge(&redis, &idempotency, job.id()).await?;
                    }
                    let _: () = redis
                        .query(
                            redis::cmd("SET")
                                .arg(format!("reached:{}", job.id()))
                                .arg(1),
                        )
                        .await
                        .unwrap();
                    std::future::pending::<()>().await;
                    Ok(Bytes::new())
                }
            })
            .concurrency(2)
            .visibility(VISIBILITY)
            .consumer("doomed")
            .start()
            .unwrap();
        std::future::pending::<()>().await;
    });
}

/// The database write-behind writes to: a Redis hash of `version:value` per key, a write
/// applied only over an older version.
static APPLY: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and tonumber(string.match(current, '^(%d+):')) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. ARGV[3])
return 1
",
    )
});

async fn apply(redis: &Redis, batch: Vec<Write>) -> Result<(), JobError> {
    for write in batch {
        let value = write.value.unwrap_or_default();
        let _: i64 = redis
            .invoke(
                APPLY
                    .key("database")
                    .arg(&write.key[..])
                    .arg(write.version)
                    .arg(&value[..]),
            )
            .await
            .map_err(|e| JobError::retry(e.to_string()))?;
    }
    Ok(())
}

fn write_behind(redis: &Redis) -> WriteBehind<RedisJobStore> {
    WriteBehind::builder("profiles", RedisJobStore::new(redis.clone()))
        .flush_interval(Duration::from_millis(50))
        .config({
            let mut config = headroom_jobs::WriteBehindConfig::default();
            config.visibility = VISIBILITY;
            config
        })
        .build()
        .unwrap()
}

/// The writing instance: writes 2,000 times on 100 keys, printing each acknowledged write.
/// Its flusher's first batch holding a write of the last round hangs as if stuck, and stays
/// so until the process is killed: the last writes of some keys are then only in the batch
/// the dead instance held, and the writes after it are acknowledged and ready.
fn writer_process(url: &str) {
    runtime().block_on(async {
        let redis = Redis::connect(RedisConfig::standalone(url)).await.unwrap();
        let writes = write_behind(&redis);
        let db = redis.clone();
        let _flusher = writes.start(move |batch: Vec<Write>| {
            let db = db.clone();
            async move {
                if batch
                    .iter()
                    .any(|write| write.value.as_deref() == Some(b"19"))
                {
                    println!("stalled");
                    std::future::pending::<()>().await;
                }
                apply(&db, batch).await
            }
        });
        for round in 0..20 {
            for key in 0..100 {
                let value = format!("{round}");
                writes
                    .put(format!("user:{key}"), value.clone())
                    .await
                    .unwrap();
                println!("acked user:{key} {value}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!("all acked");
        std::future::pending::<()>().await;
    });
}

fn an_instance_killed_mid_run_loses_no_acknowledged_write() {
    let server = RedisServer::start();
    let url = server.url();
    let mut child = Killed(
        Command::new(std::env::current_exe().unwrap())
            .args(["writer", &url])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut acked = std::collections::HashMap::new();
    let (mut all_acked, mut stalled) = (false, false);
    for line in BufReader::new(child.0.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        match line.split(' ').collect::<Vec<_>>()[..] {
            ["acked", key, value] => {
                acked.insert(key.to_owned(), value.to_owned());
            }
            ["all", "acked"] => all_acked = true,
            ["stalled"] => stalled = true,
            _ => panic!("unexpected line {line:?}"),
        }
        if all_acked && stalled {
            break;
        }
    }
    assert!(all_acked && stalled, "the writing instance ended early");
    assert_eq!(acked.len(), 100);
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    runtime().block_on(async {
        let redis = Redis::connect(RedisConfig::standalone(&url)).await.unwrap();
        let writes = write_behind(&redis);
        let database = || {
            let redis = redis.clone();
            async move {
                let rows: std::collections::HashMap<String, String> = redis
                    .query(redis::cmd("HGETALL").arg("database"))
                    .await
                    .unwrap();
                rows
            }
        };
        let written = |rows: &std::collections::HashMap<String, String>| {
            acked.iter().all(|(key, value)| {
                rows.get(key)
                    .and_then(|row| row.split_once(':'))
                    .is_some_and(|(_, written)| written == value)
            })
        };
        assert!(
            !written(&database().await),
            "every write was written before the kill"
        );
        let db = redis.clone();
        let flusher = writes.start(move |batch: Vec<Write>| {
            let db = db.clone();
            async move { apply(&db, batch).await }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while !written(&database().await) {
            assert!(
                Instant::now() < deadline,
                "an acknowledged write never reached the database"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The last writes of some keys were in the batch the dead instance held: they are
        // written once its visibility lapses and another flusher takes it over.
        while writes.queue().stats().await.unwrap().unfinished > 0 {
            assert!(
                Instant::now() < deadline,
                "the dead instance's batch was never taken over"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            written(&database().await),
            "an older write replaced a newer one"
        );
        flusher.shutdown(Duration::from_secs(5)).await;
    });
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(Instant::now() < deadline, "{what} within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn a_worker_killed_mid_job_loses_it_to_another_and_the_charge_happens_once() {
    let server = RedisServer::start();
    let url = server.url();
    runtime().block_on(async {
        let (redis, queue) = queue(&url).await;
        let after = queue.enqueue(Job::new("after")).await.unwrap().id;
        let before = queue.enqueue(Job::new("before")).await.unwrap().id;
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["worker", &url])
            .spawn()
            .unwrap();
        let mut child = Killed(child);
        let reached = |id: JobId| {
            let redis = redis.clone();
            async move {
                let n: u64 = redis
                    .query(redis::cmd("EXISTS").arg(format!("reached:{id}")))
                    .await
                    .unwrap();
                n == 1
            }
        };
        wait_until("the worker process reached both jobs", async || {
            reached(after).await && reached(before).await
        })
        .await;
        let charges = |id: JobId| {
            let redis = redis.clone();
            async move {
                let n: Option<u64> = redis
                    .query(redis::cmd("GET").arg(format!("charges:{id}")))
                    .await
                    .unwrap();
                n.unwrap_or(0)
            }
        };
        assert_eq!((charges(after).await, charges(before).await), (1, 0));
        // SIGKILL: no shutdown, no hand-back; both jobs are left held in Redis.
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        let killed_at = Instant::now();
        assert_eq!(
            queue.status(after).await.unwrap().unwrap().state,
            JobState::Running
        );

        let idempotency = Arc::new(idempotency(&redis));
        let survivor_redis = redis.clone();
        let taken_over: Arc<Mutex<HashSet<JobId>>> = Arc::default();
        let seen = taken_over.clone();
        let worker = queue
            .worker(move |job| {
                let (redis, idempotency, seen) =
                    (survivor_redis.clone(), idempotency.clone(), seen.clone());
                async move {
                    if job.taken_over() {
                        seen.lock().unwrap().insert(job.id());
                    }
                    charge(&redis, &idempotency, job.id())
                        .await
                        .map(Bytes::from)
                }
            })
            .visibility(VISIBILITY)
            .start()
            .unwrap();
        for id in [after, before] {
            wait_until("the survivor finished the job", async || {
                queue.status(id).await.unwrap().unwrap().state == JobState::Done
            })
            .await;
        }
        assert!(
            killed_at.elapsed() >= VISIBILITY - Duration::from_millis(500),
            "taken over before the visibility timeout"
        );
        assert_eq!(*taken_over.lock().unwrap(), HashSet::from([after, before]));
        // The charge made before the kill is replayed, not made again; the one the dead
        // worker never made is made once.
        assert_eq!((charges(after).await, charges(before).await), (1, 1));
        let status = queue.status(after).await.unwrap().unwrap();
        assert_eq!(
            (status.attempt, status.result.as_deref()),
            (2, Some(&b"charge 1"[..]))
        );
        worker.shutdown(Duration::from_secs(5)).await;
    });
}

fn redis_killed_and_restarted_mid_run_loses_no_acknowledged_job() {
    let server = RedisServer::builder()
        .config("appendonly", "yes")
        .config("appendfsync", "always")
        .start();
    let url = server.url();
    runtime().block_on(async {
        let (redis, queue) = queue(&url).await;
        let done: Arc<Mutex<HashSet<JobId>>> = Arc::default();
        let ran = done.clone();
        let idempotency = Arc::new(idempotency(&redis));
        let worker_redis = redis.clone();
        let worker = queue
            .worker(move |job| {
                let (redis, idempotency, ran) =
                    (worker_redis.clone(), idempotency.clone(), ran.clone());
                async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let out = charge(&redis, &idempotency, job.id()).await?;
                    ran.lock().unwrap().insert(job.id());
                    Ok(Bytes::from(out))
                }
            })
            .concurrency(4)
            .visibility(VISIBILITY)
            .backoff(Duration::from_millis(50), 2.0, Duration::from_millis(500))
            .max_attempts(50)
            .start()
            .unwrap();
        let mut acknowledged = Vec::new();
        let mut refused = 0;
        for i in 0..1_500u32 {
            if i == 500 {
                server.kill();
            }
            if i == 700 {
                server.restart();
            }
            match queue.enqueue(Job::new(i.to_string())).await {
                Ok(enqueued) => acknowledged.push(enqueued.id),
                Err(_) => {
                    refused += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        assert!(refused > 0, "Redis was never down");
        assert!(
            acknowledged.len() >= 1_000,
            "{} acknowledged",
            acknowledged.len()
        );
        wait_until("every acknowledged job ran", async || {
            let done = done.lock().unwrap();
            acknowledged.iter().all(|id| done.contains(id))
        })
        .await;
        for id in &acknowledged {
            let status = queue.status(*id).await.unwrap().unwrap();
            assert_eq!(status.state, JobState::Done, "{id}");
        }
        worker.shutdown(Duration::from_secs(5)).await;
    });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("worker") => return worker_process(&args[2]),
        Some("writer") => return writer_process(&args[2]),
        _ => {}
    }
    // `cargo test` passes harness flags (filters, --nocapture): run every scenario unless a
    // filter names one.
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-'));
    let scenarios: [(&str, fn()); 3] = [
        (
            "a_worker_killed_mid_job_loses_it_to_another_and_the_charge_happens_once",
            a_worker_killed_mid_job_loses_it_to_another_and_the_charge_happens_once,
        ),
        (
            "redis_killed_and_restarted_mid_run_loses_no_acknowledged_job",
            redis_killed_and_restarted_mid_run_loses_no_acknowledged_job,
        ),
        (
            "an_instance_killed_mid_run_loses_no_acknowledged_write",
            an_instance_killed_mid_run_loses_no_acknowledged_write,
        ),
    ];
    for (name, scenario) in scenarios {
        if filter.is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        println!("test {name} ...");
        scenario();
        println!("test {name} ... ok");
    }
}
