//! Rate limits against their peers: the direct and keyed GCRA checks against `governor`'s
//! `check` and `check_key` (on its default clock and on `std::time::Instant`, the clock
//! headroom reads outside tests), the tiered local check of one quota and of two quotas at once
//! next to the keyed check, and the distributed check (one quota and two) on a loopback
//! `redis-server` (started by the testkit) against a raw EVALSHA of a trivial script on the same
//! kind of connection, and of a script doing only `TIME`, `GET` and `SET PX` (the floor of any
//! GCRA on the server's clock), the Redis calls interleaved (see `headroom_benches::interleaved`).
//!
//! Run with: `cargo bench -p headroom-benches --bench rate`

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use governor::clock::{Clock as _, DefaultClock, MonotonicClock};
use governor::{Quota as GovernorQuota, RateLimiter};
use headroom_benches::interleaved;
use headroom_core::Namespace;
use headroom_core::rate::RateStore;
use headroom_limit::rate::{
    DirectLimiter, DistributedRateLimiter, KeyedLimiter, LocalRateLimiter, Quota, Quotas,
    RateLimit, TierConfig,
};
use headroom_redis::{Redis, RedisConfig, RedisRateStore};
use headroom_testkit::RedisServer;

/// A rate no benchmark loop can exhaust, so every check is admitted (the common path).
const PER_SECOND: u32 = 1_000_000_000;
const KEYS: u64 = 1024;

fn governor_quota() -> GovernorQuota {
    GovernorQuota::per_second(NonZeroU32::new(PER_SECOND).expect("non-zero"))
}

fn local(c: &mut Criterion) {
    let quota = Quota::per_second(PER_SECOND).expect("quota");

    // What a check pays to read the time: governor's default clock and headroom's system clock
    // both read the calibrated TSC (quanta); the limiters count on a `Stopwatch`.
    let mut group = c.benchmark_group("rate_clock");
    let quanta = DefaultClock::default();
    let clock = headroom_core::Clock::system();
    group.bench_function(BenchmarkId::new("governor", "DefaultClock::now"), |b| {
        b.iter(|| black_box(quanta.now()))
    });
    group.bench_function(BenchmarkId::new("std", "Instant::now"), |b| {
        b.iter(|| black_box(Instant::now()))
    });
    group.bench_function(BenchmarkId::new("headroom", "Clock::now"), |b| {
        b.iter(|| black_box(clock.now()))
    });
    let stopwatch = clock.stopwatch();
    group.bench_function(
        BenchmarkId::new("headroom", "Stopwatch::elapsed_nanos"),
        |b| b.iter(|| black_box(stopwatch.elapsed_nanos())),
    );
    group.finish();

    let mut group = c.benchmark_group("rate_direct");
    let governor = RateLimiter::direct(governor_quota());
    let governor_std = RateLimiter::direct_with_clock(governor_quota(), MonotonicClock);
    let headroom = DirectLimiter::builder(quota).build();
    group.bench_function(BenchmarkId::new("governor", "check"), |b| {
        b.iter(|| black_box(governor.check()).is_ok())
    });
    group.bench_function(BenchmarkId::new("governor_std_clock", "check"), |b| {
        b.iter(|| black_box(governor_std.check()).is_ok())
    });
    group.bench_function(BenchmarkId::new("headroom", "check"), |b| {
        b.iter(|| black_box(headroom.check()).is_ok())
    });
    group.finish();

    let mut group = c.benchmark_group("rate_keyed");
    let governor = RateLimiter::keyed(governor_quota());
    let governor_std = RateLimiter::dashmap_with_clock(governor_quota(), MonotonicClock);
    let headroom: KeyedLimiter<u64> = KeyedLimiter::builder(quota).build();
    for key in 0..KEYS {
        let _ = governor.check_key(&key);
        let _ = governor_std.check_key(&key);
        let _ = headroom.check_key(&key);
    }
    group.bench_function(BenchmarkId::new("governor", "check_key"), |b| {
        let mut key = 0;
        b.iter(|| {
            key = (key + 1) % KEYS;
            black_box(governor.check_key(&key)).is_ok()
        })
    });
    group.bench_function(BenchmarkId::new("governor_std_clock", "check_key"), |b| {
        let mut key = 0;
        b.iter(|| {
            key = (key + 1) % KEYS;
            black_box(governor_std.check_key(&key)).is_ok()
        })
    });
    group.bench_function(BenchmarkId::new("headroom", "check_key"), |b| {
        let mut key = 0;
        b.iter(|| {
            key = (key + 1) % KEYS;
            black_box(headroom.check_key(&key)).is_ok()
        })
    });
    group.finish();

    // Tiers: one quota (a keyed limiter's cell behind the tier lookup) and two quotas charged
    // together (a small locked set of cells per key), on the same string keys.
    let mut group = c.benchmark_group("rate_tiered");
    let keys: Vec<String> = (0..KEYS).map(|key| format!("user-{key}")).collect();
    let keyed: KeyedLimiter<String> = KeyedLimiter::builder(quota).build();
    let tiers = TierConfig::new().tier("one", quota).tier(
        "two",
        Quotas::new([quota, Quota::per_hour(u32::MAX).expect("quota")]).expect("quotas"),
    );
    let tiered = LocalRateLimiter::builder("bench", tiers)
        .build()
        .expect("limiter");
    for key in &keys {
        let _ = keyed.check_key(key.as_str());
        let _ = tiered.check_now("one", key, 1);
        let _ = tiered.check_now("two", key, 1);
    }
    group.bench_function(
        BenchmarkId::new("headroom", "KeyedLimiter::check_key"),
        |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % keys.len();
                black_box(keyed.check_key(keys[i].as_str())).is_ok()
            })
        },
    );
    for tier in ["one", "two"] {
        group.bench_function(
            BenchmarkId::new("headroom", format!("LocalRateLimiter::check_now/{tier}")),
            |b| {
                let mut i = 0;
                b.iter(|| {
                    i = (i + 1) % keys.len();
                    black_box(tiered.check_now(tier, &keys[i], 1)).is_ok()
                })
            },
        );
    }
    group.finish();
}

fn distributed(c: &mut Criterion) {
    let server = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // The Redis script keeps microseconds: a million a second is the finest rate it holds.
    let quota = Quota::per_second(1_000_000)
        .and_then(|q| q.with_burst(1_000_000))
        .expect("quota");
    let (store, limiter, raw, trivial, floor) = runtime.block_on(async {
        let redis = Redis::connect(RedisConfig::standalone(server.url()))
            .await
            .expect("connect");
        let store = RedisRateStore::new(redis);
        let limiter = DistributedRateLimiter::builder(
            "bench",
            store.clone(),
            Namespace::new("bench").expect("namespace"),
            TierConfig::new().tier("t", quota).tier(
                "t2",
                // A second quota the loop cannot exhaust either (1 µs per unit, the finest
                // rate the script keeps).
                Quotas::new([
                    quota,
                    Quota::new(1_000_000_000, Duration::from_secs(1000)).expect("quota"),
                ])
                .expect("quotas"),
            ),
        )
        .build()
        .expect("limiter");
        let client = redis::Client::open(server.url()).expect("client");
        let raw = redis::aio::ConnectionManager::new(client)
            .await
            .expect("raw connection");
        let trivial = redis::Script::new("return 1");
        // What any GCRA on the server's clock with expiring cells must do, and nothing else:
        // the floor under the store's script.
        let floor = redis::Script::new(
            "local t = redis.call('TIME') local tat = redis.call('GET', KEYS[1]) \
             redis.call('SET', KEYS[1], t[1], 'PX', 1000) return 1",
        );
        for script in [&trivial, &floor] {
            script
                .prepare_invoke()
                .load_async(&mut raw.clone())
                .await
                .expect("load script");
        }
        (store, limiter, raw, trivial, floor)
    });
    let ns = Namespace::new("bench").expect("namespace");
    let (key, floor_key) = (ns.key("raw").expect("key"), ns.key("floor").expect("key"));

    let mut group = c.benchmark_group("rate_distributed");
    let names = [
        ("raw_redis_rs", "EVALSHA"),
        ("headroom_redis", "RateStore::apply"),
        ("headroom", "DistributedRateLimiter::check"),
        ("headroom", "DistributedRateLimiter::check/two_quotas"),
        ("raw_redis_rs", "EVALSHA/TIME+GET+SET"),
    ];
    let (store, limiter, raw, trivial, floor, key, floor_key) =
        (&store, &limiter, &raw, &trivial, &floor, &key, &floor_key);
    interleaved(
        &mut group,
        &runtime,
        &names,
        |_| {},
        |call| async move {
            let admitted = match call {
                0 => {
                    trivial
                        .key(key.as_bytes())
                        .invoke_async::<i64>(&mut raw.clone())
                        .await
                        .expect("evalsha")
                        == 1
                }
                1 => {
                    store
                        .apply(key, quota.gcra(), 1)
                        .await
                        .expect("apply")
                        .allowed
                }
                2 => limiter.check("t", "user-1", 1).await.is_ok(),
                3 => limiter.check("t2", "user-1", 1).await.is_ok(),
                _ => {
                    floor
                        .key(floor_key.as_bytes())
                        .invoke_async::<i64>(&mut raw.clone())
                        .await
                        .expect("evalsha")
                        == 1
                }
            };
            assert!(admitted);
        },
    );
    group.finish();
}

criterion_group!(benches, local, distributed);
criterion_main!(benches);
