//! Keyed checks of existing keys do not allocate, direct checks never do, and millions of
//! distinct keys keep the bytes held under a bound set by the cap, measured with a counting
//! global allocator.

use std::alloc::System;
use std::sync::Mutex;
use std::time::Duration;

use headroom_core::ManualClock;
use headroom_limit::rate::{DirectLimiter, KeyedLimiter, Quota};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// The allocator's counts are process-wide: measure one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn checks_do_not_allocate() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let clock = ManualClock::new();
    let direct = DirectLimiter::builder(Quota::per_second(1000).unwrap())
        .clock(clock.clock())
        .build();
    let keyed: KeyedLimiter<String> = KeyedLimiter::builder(Quota::per_second(1000).unwrap())
        .clock(clock.clock())
        .build();
    keyed.check_key("alice").unwrap();

    let region = Region::new(GLOBAL);
    for _ in 0..2000 {
        let _ = direct.check();
        let _ = keyed.check_key("alice");
        let _ = keyed.check_key_n("alice", 2);
    }
    let change = region.change();
    assert_eq!(change.allocations + change.reallocations, 0, "{change:?}");
}

#[test]
fn millions_of_distinct_keys_keep_memory_under_the_cap() {
    const MAX_KEYS: usize = 20_000;
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let clock = ManualClock::new();
    let region = Region::new(GLOBAL);
    let limiter: KeyedLimiter<u64> = KeyedLimiter::builder(Quota::per_hour(10).unwrap())
        .clock(clock.clock())
        .max_keys(MAX_KEYS)
        .build();
    let mut peak = 0isize;
    for key in 0..3_000_000u64 {
        limiter.check_key(&key).unwrap();
        if key % 50_000 == 0 {
            clock.advance(Duration::from_millis(1));
            let stats = region.change();
            peak = peak.max(stats.bytes_allocated as isize - stats.bytes_deallocated as isize);
        }
    }
    let stats = region.change();
    peak = peak.max(stats.bytes_allocated as isize - stats.bytes_deallocated as isize);
    assert!(limiter.len() <= MAX_KEYS);
    // An entry is a u64 key and an AtomicU64 plus one control byte; a table is at most 7/8
    // full after growing, and at most half full just after doubling: 4× covers both, and the
    // eviction scratch space.
    let bound = (MAX_KEYS * (16 + 1) * 4 + 64 * 1024) as isize;
    assert!(peak <= bound, "peak {peak} bytes > bound {bound}");
}
