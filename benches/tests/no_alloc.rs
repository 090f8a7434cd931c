//! The hot paths allocate nothing: an L1 cache hit, a bulkhead permit taken and returned, a
//! closed circuit breaker's permit, rate checks and shard lookups, counted by a global
//! allocator.
//! (Each crate may check more of its own paths; this is the family-wide check.)

use std::alloc::System;
use std::time::Duration;

use headroom_breaker::CircuitBreaker;
use headroom_cache::Cache;
use headroom_core::Namespace;
use headroom_core::memory::MemoryKvStore;
use headroom_limit::Bulkhead;
use headroom_limit::rate::{DirectLimiter, KeyedLimiter, Quota};
use headroom_shard::{JumpRouter, MaglevRouter, RingRouter, Router, cluster_slot};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn assert_no_alloc<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let region = Region::new(GLOBAL);
    let out = f();
    let change = region.change();
    assert_eq!(
        change.allocations + change.reallocations,
        0,
        "{what} allocated: {change:?}"
    );
    out
}

const READS: u64 = 10_000;

/// Allocations made while `read_all` reads keys 0..16 [`READS`] times; it returns its hits.
fn allocations_over_hits(read_all: impl Fn() -> u64) -> u64 {
    assert_eq!(read_all(), READS, "warm-up: every read hits");
    let region = Region::new(GLOBAL);
    let hits = read_all();
    let change = region.change();
    assert_eq!(hits, READS);
    (change.allocations + change.reallocations) as u64
}

/// moka itself allocates a little for its periodic housekeeping (amortized: a few dozen
/// small allocations per 10,000 reads, more when an eviction listener is set). The check: an
/// L1 hit through the cache allocates exactly what the same raw moka read does, nothing of
/// its own, with and without the eviction metric (which sets a listener).
/// One test: the allocator counts every thread, so the checks must not run side by side.
#[test]
fn hot_paths_allocate_nothing() {
    l1_hits_allocate_nothing_beyond_moka();
    permits_allocate_nothing();
    rate_checks_allocate_nothing();
    shard_lookups_allocate_nothing();
}

fn l1_hits_allocate_nothing_beyond_moka() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    for eviction_metric in [false, true] {
        // Values without heap data: any allocation is the cache's or moka's.
        let cache: Cache<u64, [u64; 4]> = runtime.block_on(async {
            let cache = Cache::builder()
                .name("no-alloc")
                .ttl(Duration::from_secs(3_600))
                .l1_eviction_metric(eviction_metric)
                .l2(MemoryKvStore::new(), Namespace::new("no-alloc").unwrap())
                .build()
                .unwrap();
            for k in 0..16 {
                cache.insert(k, [k; 4]).await.unwrap();
            }
            cache
        });
        let through_cache = allocations_over_hits(|| {
            runtime.block_on(async {
                let mut hits = 0;
                for i in 0..READS {
                    hits += u64::from(cache.get(&(i % 16)).await.unwrap().is_some());
                }
                hits
            })
        });

        let mut raw = moka::sync::Cache::builder()
            .max_capacity(10_000)
            .time_to_live(Duration::from_secs(3_600));
        if eviction_metric {
            raw = raw.eviction_listener(|_, _, _| {});
        }
        let raw: moka::sync::Cache<u64, [u64; 4]> = raw.build();
        for k in 0..16 {
            raw.insert(k, [k; 4]);
        }
        let through_moka = allocations_over_hits(|| {
            (0..READS)
                .map(|i| u64::from(raw.get(&(i % 16)).is_some()))
                .sum()
        });
        assert!(
            through_cache <= through_moka,
            "eviction metric {eviction_metric}: {through_cache} allocations through the cache, {through_moka} through raw moka"
        );
    }
}

fn permits_allocate_nothing() {
    let bulkhead = Bulkhead::builder("no-alloc")
        .max_concurrent(8)
        .build()
        .unwrap();
    drop(bulkhead.try_acquire());
    assert_no_alloc("bulkhead try_acquire + release", || {
        for _ in 0..1_000 {
            drop(std::hint::black_box(bulkhead.try_acquire().unwrap()));
        }
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async { drop(bulkhead.acquire().await.unwrap()) });
    assert_no_alloc("bulkhead acquire + release, uncontended", || {
        runtime.block_on(async {
            for _ in 0..1_000 {
                drop(std::hint::black_box(bulkhead.acquire().await.unwrap()));
            }
        })
    });

    let breaker: CircuitBreaker<()> = CircuitBreaker::builder().count_window(100).build().unwrap();
    breaker.try_acquire().unwrap().success();
    assert_no_alloc("closed breaker permit", || {
        for _ in 0..1_000 {
            breaker.try_acquire().unwrap().success();
        }
    });
}

fn rate_checks_allocate_nothing() {
    let quota = Quota::per_second(1_000_000_000).unwrap();
    let direct = DirectLimiter::builder(quota).build();
    let keyed: KeyedLimiter<String> = KeyedLimiter::builder(quota).build();
    let keys: Vec<String> = (0..256).map(|i| format!("customer-{i}")).collect();
    for key in &keys {
        keyed.check_key(key.as_str()).unwrap();
    }
    assert_no_alloc("direct and keyed rate checks", || {
        for key in &keys {
            direct.check().unwrap();
            keyed.check_key(key.as_str()).unwrap();
        }
    });
}

fn shard_lookups_allocate_nothing() {
    let keys: Vec<String> = (0..256).map(|i| format!("tenant:{i}:orders")).collect();
    let routers: Vec<Box<dyn Router>> = vec![
        Box::new(JumpRouter::new(1000).unwrap()),
        Box::new(RingRouter::new(100, 160).unwrap()),
        Box::new(MaglevRouter::new(100, 65_537).unwrap()),
    ];
    assert_no_alloc("shard lookups", || {
        for router in &routers {
            for key in &keys {
                std::hint::black_box(router.route_bytes(key.as_bytes()));
                std::hint::black_box(cluster_slot(key.as_bytes()));
            }
        }
    });
}
