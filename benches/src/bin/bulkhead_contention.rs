//! Bulkhead acquire + release under contention, on every core, against `tokio::sync::Semaphore`.
//!
//! Each thread takes a permit with `try_acquire`, retrying until it gets one, and drops it,
//! for a fixed time; the program prints the total throughput. Two limits: 64 (the counters
//! are contended, permits are not) and 1 (threads also fight over the single permit).
//!
//! Run with: `cargo run --release -p headroom-benches --bin bulkhead_contention`

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use headroom_limit::Bulkhead;
use tokio::sync::Semaphore;

const RUN_FOR: Duration = Duration::from_secs(2);

/// Runs `acquire_release` on `threads` threads for `RUN_FOR`; returns operations per second.
fn measure(threads: usize, acquire_release: impl Fn() -> bool + Send + Sync + 'static) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let work = Arc::new(acquire_release);
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (stop, work) = (Arc::clone(&stop), Arc::clone(&work));
            thread::spawn(move || {
                let mut done = 0_u64;
                while !stop.load(Ordering::Relaxed) {
                    if work() {
                        done += 1;
                    }
                }
                done
            })
        })
        .collect();
    thread::sleep(RUN_FOR);
    stop.store(true, Ordering::Relaxed);
    let total: u64 = handles
        .into_iter()
        .map(|handle| handle.join().expect("worker thread"))
        .sum();
    total as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let threads = thread::available_parallelism().map_or(2, usize::from);
    println!("acquire + release, {threads} threads, {RUN_FOR:?} each");
    println!("| limit | tokio Semaphore (M ops/s) | headroom Bulkhead (M ops/s) | ratio |");
    println!("|---|---|---|---|");
    for limit in [64, 1] {
        let semaphore = Arc::new(Semaphore::new(limit));
        let peer = measure(threads, move || {
            semaphore
                .try_acquire()
                .map(|permit| drop(black_box(permit)))
                .is_ok()
        });
        let bulkhead = Bulkhead::builder("contention")
            .max_concurrent(limit)
            .build()
            .expect("bulkhead");
        let ours = measure(threads, move || {
            bulkhead
                .try_acquire()
                .map(|permit| drop(black_box(permit)))
                .is_ok()
        });
        println!(
            "| {limit} | {:.2} | {:.2} | {:.2}× |",
            peer / 1e6,
            ours / 1e6,
            peer / ours
        );
    }
}
