//! Keyed checks of existing keys do not allocate, direct checks never do, and millions of
//! distinct keys, or long ones, keep the bytes held under a bound set by the cap, measured with
//! a counting global allocator whose counts are per thread: only the measuring thread's
//! allocations count, so the test harness and other tests running meanwhile cannot disturb a
//! measurement.

use std::time::Duration;

use headroom_core::memory::MemoryRateStore;
use headroom_core::{ManualClock, Namespace};
use headroom_limit::rate::{
    DirectLimiter, DistributedRateLimiter, KeyedLimiter, LocalRateLimiter, Quota, Quotas,
    RateLimit, TierConfig,
};

#[test]
fn counts_only_the_measuring_thread() {
    let info = allocation_counter::measure(|| {
        std::thread::spawn(|| std::hint::black_box(vec![0u8; 1024]))
            .join()
            .unwrap();
    });
    // Spawning and joining allocate on this thread; the other thread's 1 KiB does not count.
    assert!(info.bytes_max < 1024, "{info:?}");
    let own = allocation_counter::measure(|| {
        std::hint::black_box(vec![0u8; 1024]);
    });
    assert_eq!((own.count_total, own.bytes_total), (1, 1024), "{own:?}");
}

#[test]
fn checks_do_not_allocate() {
    let clock = ManualClock::new();
    let direct = DirectLimiter::builder(Quota::per_second(1000).unwrap())
        .clock(clock.clock())
        .build();
    let keyed: KeyedLimiter<String> = KeyedLimiter::builder(Quota::per_second(1000).unwrap())
        .clock(clock.clock())
        .build();
    keyed.check_key("alice").unwrap();

    let info = allocation_counter::measure(|| {
        for _ in 0..2000 {
            let _ = direct.check();
            let _ = keyed.check_key("alice");
            let _ = keyed.check_key_n("alice", 2);
        }
    });
    assert_eq!(info.count_total, 0, "{info:?}");
}

#[test]
fn tiered_checks_of_known_keys_do_not_allocate() {
    let clock = ManualClock::new();
    let quota = Quota::per_second(1000).unwrap();
    let tiers = TierConfig::new().tier("one", quota).tier(
        "two",
        Quotas::new([quota, Quota::per_hour(100_000).unwrap()]).unwrap(),
    );
    let limiter = LocalRateLimiter::builder("api", tiers)
        .clock(clock.clock())
        .build()
        .unwrap();
    limiter.check_now("one", "alice", 1).unwrap();
    limiter.check_now("two", "alice", 1).unwrap();
    let info = allocation_counter::measure(|| {
        for _ in 0..500 {
            let _ = limiter.check_now("one", "alice", 1);
            let _ = limiter.check_now("two", "alice", 1);
            let _ = limiter.check_now("two", "alice", 3);
        }
    });
    assert_eq!(info.count_total, 0, "{info:?}");
}

#[test]
fn batched_distributed_checks_spent_from_reserved_units_do_not_allocate() {
    let clock = ManualClock::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let limiter = DistributedRateLimiter::builder(
        "api",
        MemoryRateStore::builder().clock(clock.clock()).build(),
        Namespace::new("rate").unwrap(),
        TierConfig::new().tier("t", Quota::per_hour(100_000).unwrap()),
    )
    .clock(clock.clock())
    .batch(1_000)
    .build()
    .unwrap();
    let long = "k".repeat(DistributedRateLimiter::<MemoryRateStore>::MAX_KEY_LEN);
    // Batches grow from 1 unit as they run out: after 512 requests, a key holds 511 units.
    runtime.block_on(async {
        for _ in 0..512 {
            limiter.check("t", "alice", 1).await.unwrap();
            limiter.check("t", &long, 1).await.unwrap();
        }
    });
    let warmed = limiter.round_trips();
    let info = allocation_counter::measure(|| {
        runtime.block_on(async {
            for _ in 0..400 {
                limiter.check("t", "alice", 1).await.unwrap();
                limiter.check("t", &long, 1).await.unwrap();
            }
        });
    });
    assert_eq!(info.count_total, 0, "{info:?}");
    assert_eq!(limiter.round_trips(), warmed);
}

#[test]
fn millions_of_distinct_keys_keep_memory_under_the_cap() {
    const MAX_KEYS: usize = 20_000;
    let clock = ManualClock::new();
    let mut held = 0;
    let info = allocation_counter::measure(|| {
        let limiter: KeyedLimiter<u64> = KeyedLimiter::builder(Quota::per_hour(10).unwrap())
            .clock(clock.clock())
            .max_keys(MAX_KEYS)
            .build();
        for key in 0..3_000_000u64 {
            limiter.check_key(&key).unwrap();
            if key % 50_000 == 0 {
                clock.advance(Duration::from_millis(1));
            }
        }
        held = limiter.len();
    });
    assert!(held <= MAX_KEYS);
    // An entry is a u64 key and an AtomicU64 plus one control byte; a table is at most 7/8
    // full after growing, and at most half full just after doubling: 4× covers both, and the
    // eviction scratch space.
    let bound = (MAX_KEYS * (16 + 1) * 4 + 64 * 1024) as u64;
    assert!(
        info.bytes_max <= bound,
        "peak {} bytes > bound {bound}",
        info.bytes_max
    );
}

/// Sends `3 × max_keys` distinct 8 KiB keys (a raw header an attacker fills before any
/// authentication) to `tier`, each admitted and then draining, and returns the peak bytes.
fn peak_bytes_of_long_keys(tier: &str, quotas: Quotas, max_keys: usize) -> u64 {
    const KEY_LEN: usize = 8 * 1024;
    let clock = ManualClock::new();
    let mut rng = fastrand::Rng::with_seed(7);
    // A random body, and a random prefix of its own for every key.
    let mut key: String = (0..KEY_LEN).map(|_| rng.alphanumeric()).collect();
    let info = allocation_counter::measure(|| {
        let limiter = LocalRateLimiter::builder("api", TierConfig::new().tier(tier, quotas))
            .clock(clock.clock())
            .max_keys_per_tier(max_keys)
            .build()
            .unwrap();
        for n in 0..3 * max_keys {
            let mut bytes = std::mem::take(&mut key).into_bytes();
            bytes[..16].fill_with(|| rng.alphanumeric() as u8);
            key = String::from_utf8(bytes).unwrap();
            limiter.check_now(tier, &key, 1).unwrap();
            if n % 1000 == 0 {
                clock.advance(Duration::from_millis(1));
            }
        }
    });
    info.bytes_max
}

#[test]
fn long_keys_keep_a_tier_within_its_bytes() {
    const MAX_KEYS: usize = 20_000;
    let hourly = Quota::per_hour(10).unwrap();
    // The documented bound: at most 256 bytes per key held in a tier of one quota, 512 in a
    // tier of several, whatever the keys' length.
    let several = Quotas::new([hourly, Quota::per_minute(10).unwrap()]).unwrap();
    let peaks = [
        (
            "one",
            peak_bytes_of_long_keys("one", hourly.into(), MAX_KEYS),
            256,
        ),
        (
            "several",
            peak_bytes_of_long_keys("several", several, MAX_KEYS),
            512,
        ),
    ];
    for (tier, peak, per_key) in peaks {
        let bound = (MAX_KEYS * per_key + 64 * 1024) as u64;
        assert!(
            peak <= bound,
            "peak bytes by tier: {peaks:?}; {tier} > bound {bound}"
        );
    }
}

#[test]
fn long_keys_keep_a_distributed_limiters_local_state_within_its_bytes() {
    const MAX_KEYS: usize = 20_000;
    const KEY_LEN: usize = 990;
    // The store's own cells are capped apart, in its bytes.
    const STORE_BYTES: usize = 256 * 1024;
    let clock = ManualClock::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut key: String = (0..KEY_LEN).map(|_| rng.alphanumeric()).collect();
    // Batched, so every new key is held with the units reserved for it.
    let info = allocation_counter::measure(|| {
        let store = MemoryRateStore::builder()
            .clock(clock.clock())
            .max_bytes(STORE_BYTES)
            .build();
        let limiter = DistributedRateLimiter::builder(
            "api",
            store,
            Namespace::new("rate").unwrap(),
            TierConfig::new().tier("t", Quota::per_hour(100).unwrap()),
        )
        .clock(clock.clock())
        .batch(10)
        .max_keys_per_tier(MAX_KEYS)
        .build()
        .unwrap();
        runtime.block_on(async {
            for n in 0..3 * MAX_KEYS {
                let mut bytes = std::mem::take(&mut key).into_bytes();
                bytes[..16].fill_with(|| rng.alphanumeric() as u8);
                key = String::from_utf8(bytes).unwrap();
                limiter.check("t", &key, 1).await.unwrap();
                if n % 1000 == 0 {
                    clock.advance(Duration::from_millis(1));
                }
            }
            assert_eq!(limiter.round_trips(), 3 * MAX_KEYS as u64);
        });
    });
    // The documented bound: at most 256 bytes per key held in local state, whatever the keys'
    // length, beside the store's bytes (counted twice for its tables' spare room).
    let bound = (MAX_KEYS * 256 + 2 * STORE_BYTES + 64 * 1024) as u64;
    assert!(
        info.bytes_max <= bound,
        "peak {} bytes > bound {bound}",
        info.bytes_max
    );
}
