//! Bulkhead acquire + release under contention, on every core, against `tokio::sync::Semaphore`.
//!
//! Each thread takes a permit with `try_acquire`, retrying until it gets one, and drops it,
//! for a fixed time; the program prints the total throughput. Two limits: 64 (the counters
//! are contended, permits are not) and 1 (threads also fight over the single permit).
//!
//! Run with: `cargo run --release -p headroom-benches --bin bulkhead_contention`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use headroom_benches::{cores, throughput};
use headroom_limit::Bulkhead;
use tokio::sync::Semaphore;

const RUN_FOR: Duration = Duration::from_secs(2);

fn main() {
    let threads = cores();
    println!("acquire + release, {threads} threads, {RUN_FOR:?} each");
    println!("| limit | tokio Semaphore (M ops/s) | headroom Bulkhead (M ops/s) | ratio |");
    println!("|---|---|---|---|");
    for limit in [64, 1] {
        let semaphore = Arc::new(Semaphore::new(limit));
        let peer = throughput(threads, RUN_FOR, move || {
            semaphore
                .try_acquire()
                .map(|permit| drop(black_box(permit)))
                .is_ok()
        });
        let bulkhead = Bulkhead::builder("contention")
            .max_concurrent(limit)
            .build()
            .expect("bulkhead");
        let ours = throughput(threads, RUN_FOR, move || {
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
