//! The cache against its peers: L1 hits against raw moka, L2 hits against raw redis-rs `GET`
//! on the same kind of connection (a loopback `redis-server` started by the testkit), and a
//! batch of 100 against 100 sequential reads.
//!
//! Run with: `cargo bench -p headroom-benches --bench cache`

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use headroom_cache::Cache;
use headroom_core::Namespace;
use headroom_redis::{Redis, RedisConfig, RedisKvStore};
use headroom_testkit::RedisServer;

const KEYS: u64 = 100;

fn value(i: u64) -> String {
    format!("{i:0>64}")
}

fn cache(c: &mut Criterion) {
    let server = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ns = Namespace::new("bench:cache").expect("namespace");
    let keys: Vec<u64> = (0..KEYS).collect();

    let (cache, lean, raw) = runtime.block_on(async {
        let redis = Redis::connect(RedisConfig::standalone(server.url()))
            .await
            .expect("connect");
        let cache: Cache<u64, String> = Cache::builder()
            .name("bench")
            .ttl(Duration::from_secs(3_600))
            .l2(RedisKvStore::new(redis.clone()), ns.clone())
            .build()
            .expect("cache");
        // The same without counting L1 evictions, which costs moka a removal notification.
        let lean: Cache<u64, String> = Cache::builder()
            .name("bench_lean")
            .ttl(Duration::from_secs(3_600))
            .l1_eviction_metric(false)
            .l2(RedisKvStore::new(redis), ns.clone())
            .build()
            .expect("cache");
        for &k in &keys {
            cache.insert(k, value(k)).await.expect("fill");
        }
        let client = redis::Client::open(server.url()).expect("client");
        let raw = redis::aio::ConnectionManager::new(client)
            .await
            .expect("raw connection");
        (cache, lean, raw)
    });
    let key7 = ns.key("7").expect("key");

    let moka_future = moka::future::Cache::<u64, String>::new(10_000);
    let moka_sync = moka::sync::Cache::<u64, String>::new(10_000);
    runtime.block_on(async {
        for &k in &keys {
            moka_future.insert(k, value(k)).await;
            moka_sync.insert(k, value(k));
        }
    });

    let mut group = c.benchmark_group("cache_get_l1_hit");
    group.bench_function(BenchmarkId::new("raw_moka_future", "get"), |b| {
        b.to_async(&runtime)
            .iter(|| async { moka_future.get(&7).await.expect("hit") })
    });
    group.bench_function(BenchmarkId::new("raw_moka_sync", "get"), |b| {
        b.iter(|| moka_sync.get(&7).expect("hit"))
    });
    group.bench_function(BenchmarkId::new("headroom", "get"), |b| {
        b.to_async(&runtime)
            .iter(|| async { cache.get(&7).await.expect("get").expect("hit") })
    });
    group.bench_function(BenchmarkId::new("headroom", "get_or_load"), |b| {
        b.to_async(&runtime).iter(|| async {
            cache
                .get_or_load(&7, |k| async move { Ok::<_, Infallible>(Some(value(k))) })
                .await
                .expect("get")
                .expect("hit")
        })
    });
    group.finish();

    let mut group = c.benchmark_group("cache_get_l2_hit");
    group.bench_function(BenchmarkId::new("raw_redis_rs", "GET"), |b| {
        b.to_async(&runtime).iter(|| {
            let mut conn = raw.clone();
            let cmd = redis::cmd("GET").arg(key7.as_bytes()).clone();
            async move {
                cmd.query_async::<Option<Vec<u8>>>(&mut conn)
                    .await
                    .expect("get")
                    .expect("hit")
            }
        })
    });
    group.bench_function(BenchmarkId::new("headroom", "get"), |b| {
        b.to_async(&runtime).iter(|| async {
            // Drop the L1 copy so the read goes to L2 (and fills L1 again).
            cache.invalidate_local(&7);
            cache.get(&7).await.expect("get").expect("hit")
        })
    });
    group.bench_function(
        BenchmarkId::new("headroom_no_eviction_metric", "get"),
        |b| {
            b.to_async(&runtime).iter(|| async {
                lean.invalidate_local(&7);
                lean.get(&7).await.expect("get").expect("hit")
            })
        },
    );
    group.finish();

    let mut group = c.benchmark_group("cache_get_100_l2_hits");
    group.bench_function(BenchmarkId::new("headroom", "get_many_or_load"), |b| {
        b.to_async(&runtime).iter(|| async {
            for k in &keys {
                cache.invalidate_local(k);
            }
            cache
                .get_many_or_load(&keys, |_| async {
                    Ok::<_, Infallible>(HashMap::<u64, String>::new())
                })
                .await
                .expect("get_many")
        })
    });
    group.bench_function(
        BenchmarkId::new("headroom_no_eviction_metric", "get_many_or_load"),
        |b| {
            b.to_async(&runtime).iter(|| async {
                for k in &keys {
                    lean.invalidate_local(k);
                }
                lean.get_many_or_load(&keys, |_| async {
                    Ok::<_, Infallible>(HashMap::<u64, String>::new())
                })
                .await
                .expect("get_many")
            })
        },
    );
    group.bench_function(BenchmarkId::new("headroom", "100_sequential_get"), |b| {
        b.to_async(&runtime).iter(|| async {
            for k in &keys {
                cache.invalidate_local(k);
                cache.get(k).await.expect("get").expect("hit");
            }
        })
    });
    group.finish();
}

criterion_group!(benches, cache);
criterion_main!(benches);
