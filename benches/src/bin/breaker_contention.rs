//! Threads hammering one closed circuit breaker, next to threads hammering one shared atomic
//! counter (the cheapest contended operation), in the same run.
//!
//! Run with: `cargo run --release -p headroom-benches --bin breaker_contention`

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use headroom_benches::throughput;
use headroom_breaker::CircuitBreaker;
use headroom_core::BackendError;

const RUN_FOR: Duration = Duration::from_secs(2);

fn breaker(timed: bool) -> CircuitBreaker<BackendError> {
    let builder = CircuitBreaker::builder();
    let builder = if timed {
        builder.time_window(Duration::from_secs(10), 10)
    } else {
        builder.count_window(100)
    };
    builder.build().expect("breaker")
}

fn main() {
    println!("{:<34} {:>8} {:>14}", "scenario", "threads", "Mcalls/s");
    for threads in [1, 2] {
        let counter = Arc::new(AtomicU64::new(0));
        let rate = throughput(threads, RUN_FOR, move || {
            black_box(counter.fetch_add(1, Ordering::Relaxed));
            true
        });
        println!(
            "{:<34} {threads:>8} {:>14.1}",
            "shared atomic counter",
            rate / 1e6
        );
        for (name, timed) in [
            ("breaker, count window", false),
            ("breaker, time window", true),
        ] {
            let breaker = breaker(timed);
            let rate = throughput(threads, RUN_FOR, move || {
                breaker.try_acquire().expect("closed").success();
                true
            });
            println!("{name:<34} {threads:>8} {:>14.1}", rate / 1e6);
        }
    }
}
