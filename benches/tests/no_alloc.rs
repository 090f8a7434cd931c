//! The hot paths allocate nothing: an L1 cache hit, a bulkhead permit (plain and keyed) taken
//! and returned, a closed circuit breaker's permit, rate checks and shard lookups, counted by a
//! global allocator on the measuring thread only (other tests run beside them on their own
//! threads).
//! (Each crate may check more of its own paths; this is the family-wide check.)

use std::time::Duration;

use headroom_breaker::CircuitBreaker;
use headroom_cache::Cache;
use headroom_core::Namespace;
use headroom_core::memory::MemoryKvStore;
use headroom_limit::rate::{DirectLimiter, KeyedLimiter, Quota};
use headroom_limit::{Bulkhead, KeyedBulkhead};
use headroom_shard::{JumpRouter, MaglevRouter, RingRouter, Router, cluster_slot};

/// Runs `f` and asserts that it allocated (or reallocated) nothing on this thread.
fn assert_no_alloc(what: &str, f: impl FnOnce()) {
    let counted = allocation_counter::measure(f);
    assert_eq!(counted.count_total, 0, "{what} allocated: {counted:?}");
}

const READS: u64 = 10_000;

/// Allocations made while `read_all` reads keys 0..16 [`READS`] times; it returns its hits.
fn allocations_over_hits(read_all: impl Fn() -> u64) -> u64 {
    assert_eq!(read_all(), READS, "warm-up: every read hits");
    let mut hits = 0;
    let counted = allocation_counter::measure(|| hits = read_all());
    assert_eq!(hits, READS);
    counted.count_total
}

/// moka itself allocates a little for its periodic housekeeping (amortized: a few dozen
/// small allocations per 10,000 reads, more when an eviction listener is set). The check: an
/// L1 hit through the cache allocates exactly what the same raw moka read does, nothing of
/// its own, with and without the eviction metric (which sets a listener). The reads run on
/// this thread (a current-thread runtime), so every allocation they make is counted.
#[test]
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

    // Keyed: a tenant's state is made and dropped on each permit, and new tenants keep coming.
    let keyed = KeyedBulkhead::builder("no-alloc")
        .max_concurrent(8)
        .build()
        .unwrap();
    assert_no_alloc("keyed bulkhead try_acquire + release", || {
        for tenant in 0..1_000_u64 {
            drop(std::hint::black_box(keyed.try_acquire(&tenant).unwrap()));
            drop(std::hint::black_box(keyed.try_acquire("tenant").unwrap()));
        }
    });
    runtime.block_on(async { drop(keyed.acquire("tenant").await.unwrap()) });
    assert_no_alloc("keyed bulkhead acquire + release, uncontended", || {
        runtime.block_on(async {
            for _ in 0..1_000 {
                drop(std::hint::black_box(keyed.acquire("tenant").await.unwrap()));
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

/// Another thread allocating during a measurement (as the test harness does while another
/// test measures) is not counted against the measured code.
#[test]
fn other_threads_allocations_are_not_counted() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Barrier};

    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(Barrier::new(2));
    let allocator = {
        let (stop, started) = (Arc::clone(&stop), Arc::clone(&started));
        std::thread::spawn(move || {
            started.wait();
            while !stop.load(Ordering::Relaxed) {
                std::hint::black_box(vec![0u8; 64]);
            }
        })
    };
    started.wait();
    assert_no_alloc("a loop that only yields", || {
        for _ in 0..1_000 {
            std::thread::yield_now();
        }
    });
    stop.store(true, Ordering::Relaxed);
    allocator.join().unwrap();
}
