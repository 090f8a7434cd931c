//! The hot paths allocate nothing: an L1 cache hit, a bulkhead permit taken and returned, a
//! closed circuit breaker's permit, and shard lookups, counted by a global allocator.
//! (Each crate may check more of its own paths; this is the family-wide check.)

use std::alloc::System;
use std::time::Duration;

use headroom_breaker::CircuitBreaker;
use headroom_cache::Cache;
use headroom_core::Namespace;
use headroom_core::memory::MemoryKvStore;
use headroom_limit::Bulkhead;
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

#[test]
fn l1_hits_allocate_nothing() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    // Values without heap data: any allocation would be the cache's own.
    let cache: Cache<u64, [u64; 4]> = runtime.block_on(async {
        let cache = Cache::builder()
            .name("no-alloc")
            .ttl(Duration::from_secs(3_600))
            .l2(MemoryKvStore::new(), Namespace::new("no-alloc").unwrap())
            .build()
            .unwrap();
        for k in 0..16 {
            cache.insert(k, [k; 4]).await.unwrap();
        }
        // Warm up thread-locals and moka's internal buffers.
        for k in 0..16 {
            cache.get(&k).await.unwrap();
        }
        cache
    });
    let hits = assert_no_alloc("L1 hit", || {
        runtime.block_on(async {
            let mut hits = 0;
            for i in 0..1_000u64 {
                hits += usize::from(cache.get(&(i % 16)).await.unwrap().is_some());
            }
            hits
        })
    });
    assert_eq!(hits, 1_000);
}

#[test]
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

#[test]
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
