//! Overload: a simulated service with fixed capacity, offered three times what it can do.
//!
//! The service has 10 workers and each request takes 8–12 ms (10 ms on average), so it
//! completes 1000 requests per second. Callers give up after 100 ms. Arrivals are open-loop:
//! they keep coming whatever happens to earlier requests, as real traffic does. Everything
//! runs on tokio's paused clock, so the numbers are deterministic.
//!
//! Without protection every request is accepted into an unbounded backlog; the backlog grows
//! by 2000 requests per second, soon every request waits longer than its caller, and the
//! service spends its capacity on answers nobody reads: goodput collapses. With a bulkhead
//! (or a work queue with CoDel and adaptive LIFO) in front, the excess is refused at once and
//! the admitted requests run at unloaded speed.

use std::sync::Arc;
use std::time::Duration;

use headroom_limit::{Bulkhead, CodelConfig, Overloaded, WorkQueue};
use tokio::sync::{Semaphore, oneshot};
use tokio::time::Instant;

const WORKERS: usize = 10;
const CLIENT_TIMEOUT: Duration = Duration::from_millis(100);
const WINDOW_MS: u64 = 2_000;
/// Requests the service can complete during the window (one per millisecond).
const CAPACITY_IN_WINDOW: f64 = WINDOW_MS as f64;

#[derive(Clone, Copy, Debug)]
enum Protection {
    None,
    Bulkhead,
    Queue,
}

struct Job {
    service_time: Duration,
    reply: oneshot::Sender<Result<(), Overloaded>>,
}

#[derive(Debug)]
struct Outcome {
    offered: usize,
    /// Answered successfully within the caller's timeout.
    good: usize,
    /// Refused quickly with `Overloaded`.
    refused: usize,
    /// Latencies of the good requests.
    latencies: Vec<Duration>,
}

impl Outcome {
    fn goodput(&self) -> f64 {
        self.good as f64 / CAPACITY_IN_WINDOW
    }

    fn p99(&mut self) -> Duration {
        self.latencies.sort_unstable();
        let index = (self.latencies.len() * 99).div_ceil(100).saturating_sub(1);
        self.latencies[index]
    }
}

/// The service itself: `WORKERS` requests at a time, the rest wait in an unbounded FIFO.
async fn work(workers: Arc<Semaphore>, service_time: Duration) {
    let _worker = workers.acquire().await.expect("never closed");
    tokio::time::sleep(service_time).await;
}

async fn simulate(load: f64, protection: Protection) -> Outcome {
    let workers = Arc::new(Semaphore::new(WORKERS));
    let bulkhead = Bulkhead::builder("sim")
        .max_concurrent(WORKERS)
        .max_queued(WORKERS / 2)
        .max_wait(Duration::from_millis(5))
        .build()
        .expect("valid bulkhead");
    let queue: WorkQueue<Job> = WorkQueue::builder("sim")
        .capacity(WORKERS)
        .codel(CodelConfig {
            target: Duration::from_millis(5),
            interval: Duration::from_millis(100),
        })
        .adaptive_lifo(true)
        .on_shed(|job: Job, rejection| {
            let _ = job.reply.send(Err(rejection));
        })
        .build()
        .expect("valid queue");
    let mut pool = Vec::new();
    if let Protection::Queue = protection {
        for _ in 0..WORKERS {
            let (queue, workers) = (queue.clone(), Arc::clone(&workers));
            pool.push(tokio::spawn(async move {
                while let Some(job) = queue.pop().await {
                    work(Arc::clone(&workers), job.service_time).await;
                    let _ = job.reply.send(Ok(()));
                }
            }));
        }
    }

    let mut rng = fastrand::Rng::with_seed(7);
    let mut callers = Vec::new();
    let mut due = 0.0;
    for _ in 0..WINDOW_MS {
        due += load;
        while due >= 1.0 {
            due -= 1.0;
            let service_time = Duration::from_millis(rng.u64(8..=12));
            let (reply, answer) = oneshot::channel();
            let job = Job {
                service_time,
                reply,
            };
            match protection {
                Protection::None => {
                    let workers = Arc::clone(&workers);
                    tokio::spawn(async move {
                        work(workers, job.service_time).await;
                        let _ = job.reply.send(Ok(()));
                    });
                }
                Protection::Bulkhead => {
                    let (workers, bulkhead) = (Arc::clone(&workers), bulkhead.clone());
                    tokio::spawn(async move {
                        match bulkhead.acquire().await {
                            Ok(_permit) => {
                                work(workers, job.service_time).await;
                                let _ = job.reply.send(Ok(()));
                            }
                            Err(refused) => {
                                let _ = job.reply.send(Err(refused));
                            }
                        }
                    });
                }
                Protection::Queue => {
                    if let Err(refused) = queue.try_push(job) {
                        let rejection = refused.rejection();
                        let _ = refused.into_item().reply.send(Err(rejection));
                    }
                }
            }
            callers.push(tokio::spawn(async move {
                let start = Instant::now();
                match tokio::time::timeout(CLIENT_TIMEOUT, answer).await {
                    Ok(Ok(Ok(()))) => Some(Ok(start.elapsed())),
                    Ok(Ok(Err(_))) => Some(Err(())),
                    _ => None,
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut outcome = Outcome {
        offered: callers.len(),
        good: 0,
        refused: 0,
        latencies: Vec::new(),
    };
    for caller in callers {
        match caller.await.expect("caller task") {
            Some(Ok(latency)) => {
                outcome.good += 1;
                outcome.latencies.push(latency);
            }
            Some(Err(())) => outcome.refused += 1,
            None => {}
        }
    }
    queue.close();
    for worker in pool {
        worker.await.expect("worker task");
    }
    outcome
}

#[tokio::test(start_paused = true)]
async fn protection_keeps_goodput_and_latency_at_three_times_capacity() {
    let mut unloaded = simulate(0.5, Protection::None).await;
    let unloaded_p99 = unloaded.p99();
    assert_eq!(unloaded.good, unloaded.offered, "half load is all served");

    let mut collapse = simulate(3.0, Protection::None).await;
    let mut bulkhead = simulate(3.0, Protection::Bulkhead).await;
    let mut queue = simulate(3.0, Protection::Queue).await;
    for (name, run) in [
        ("unprotected", &mut collapse),
        ("bulkhead", &mut bulkhead),
        ("work queue", &mut queue),
    ] {
        let p99 = if run.latencies.is_empty() {
            "n/a".to_owned()
        } else {
            format!("{:?}", run.p99())
        };
        println!(
            "{name:>12}: offered {}, good {} ({:.1} % of capacity), refused {}, p99 of good {p99} (unloaded p99 {unloaded_p99:?})",
            run.offered,
            run.good,
            run.goodput() * 100.0,
            run.refused,
        );
    }

    assert!(
        collapse.goodput() < 0.2,
        "without protection goodput collapses: {:.3}",
        collapse.goodput()
    );
    for run in [&mut bulkhead, &mut queue] {
        assert!(run.goodput() >= 0.9, "goodput {:.3}", run.goodput());
        assert!(run.refused > 0);
        assert!(
            run.p99() <= unloaded_p99 * 2,
            "p99 {:?} vs unloaded {unloaded_p99:?}",
            run.p99()
        );
    }
}
