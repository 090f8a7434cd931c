//! The cache against its peers: L1 hits against raw moka, L2 hits against raw redis-rs `GET`
//! on the same kind of connection (a loopback `redis-server` started by the testkit), an L2 hit
//! on the in-memory store against the store's own `get` (the cache's own work), and a batch of
//! 100 L2 hits against one raw `MGET` of the same keys and against 100 sequential reads. The
//! Redis groups interleave their calls (see `headroom_benches::interleaved`).
//!
//! Run with: `cargo bench -p headroom-benches --bench cache`

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use headroom_benches::interleaved;
use headroom_cache::Cache;
use headroom_core::Namespace;
use headroom_core::kv::KvStore;
use headroom_core::memory::MemoryKvStore;
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

    // The L2 rows drop the L1 copy before each read (untimed), so that it goes to L2.
    let mut group = c.benchmark_group("cache_get_l2_hit");
    let get = redis::cmd("GET").arg(key7.as_bytes()).clone();
    let (raw, get, cache, lean) = (&raw, &get, &cache, &lean);
    interleaved(
        &mut group,
        &runtime,
        &[
            ("raw_redis_rs", "GET"),
            ("headroom", "get"),
            ("headroom_no_eviction_metric", "get"),
        ],
        |call| match call {
            1 => cache.invalidate_local(&7),
            2 => lean.invalidate_local(&7),
            _ => {}
        },
        |call| async move {
            let found = match call {
                0 => get
                    .query_async::<Option<Vec<u8>>>(&mut raw.clone())
                    .await
                    .expect("get")
                    .is_some(),
                1 => cache.get(&7).await.expect("get").is_some(),
                _ => lean.get(&7).await.expect("get").is_some(),
            };
            assert!(found);
        },
    );
    group.finish();

    // The cache's own work on an L2 hit, without a network: the same read with the in-memory
    // store as L2, next to the store's own `get`.
    let store = MemoryKvStore::new();
    let in_memory: Cache<u64, String> = runtime.block_on(async {
        let in_memory: Cache<u64, String> = Cache::builder()
            .name("bench_memory")
            .ttl(Duration::from_secs(3_600))
            .l2(store.clone(), ns.clone())
            .build()
            .expect("cache");
        in_memory.insert(7, value(7)).await.expect("fill");
        in_memory
    });
    let mut group = c.benchmark_group("cache_get_l2_hit_memory");
    let (store, in_memory, key7) = (&store, &in_memory, &key7);
    interleaved(
        &mut group,
        &runtime,
        &[
            ("headroom_memory", "MemoryKvStore::get"),
            ("headroom", "get"),
        ],
        |call| {
            if call == 1 {
                in_memory.invalidate_local(&7);
            }
        },
        |call| async move {
            let found = match call {
                0 => store.get(key7).await.expect("get").is_some(),
                _ => in_memory.get(&7).await.expect("get").is_some(),
            };
            assert!(found);
        },
    );
    group.finish();

    // The cache's own work on 100 L2 hits, without a network: the in-memory store as L2.
    let many_in_memory: Cache<u64, String> = runtime.block_on(async {
        let cache: Cache<u64, String> = Cache::builder()
            .name("bench_memory_many")
            .ttl(Duration::from_secs(3_600))
            .l2(store.clone(), ns.clone())
            .build()
            .expect("cache");
        for &k in &keys {
            cache.insert(k, value(k)).await.expect("fill");
        }
        cache
    });
    let full_keys: Vec<_> = keys
        .iter()
        .map(|k| ns.key(k.to_string()).expect("key"))
        .collect();
    let nothing = |_: Vec<u64>| async { Ok::<_, Infallible>(HashMap::<u64, String>::new()) };
    let mut group = c.benchmark_group("cache_get_100_l2_hits_memory");
    let (many_in_memory, full_keys, keys) = (&many_in_memory, &full_keys, &keys);
    interleaved(
        &mut group,
        &runtime,
        &[
            ("headroom_memory", "MemoryKvStore::get_many"),
            ("headroom", "get_many_or_load"),
        ],
        |call| {
            if call == 1 {
                for k in keys {
                    many_in_memory.invalidate_local(k);
                }
            }
        },
        |call| async move {
            let found = match call {
                0 => store
                    .get_many(full_keys)
                    .await
                    .expect("get_many")
                    .into_iter()
                    .flatten()
                    .count(),
                _ => hits(many_in_memory.get_many_or_load(keys, nothing).await),
            };
            assert_eq!(found, keys.len());
        },
    );
    group.finish();

    let mut group = c.benchmark_group("cache_get_100_l2_hits");
    let mut mget = redis::cmd("MGET");
    for k in keys {
        mget.arg(ns.key(k.to_string()).expect("key").as_bytes());
    }
    let mget = &mget;
    interleaved(
        &mut group,
        &runtime,
        &[
            ("raw_redis_rs", "MGET"),
            ("headroom", "get_many_or_load"),
            ("headroom_no_eviction_metric", "get_many_or_load"),
        ],
        |call| {
            let dropped = match call {
                1 => cache,
                2 => lean,
                _ => return,
            };
            for k in keys {
                dropped.invalidate_local(k);
            }
        },
        |call| async move {
            let found = match call {
                0 => mget
                    .query_async::<Vec<Option<Vec<u8>>>>(&mut raw.clone())
                    .await
                    .expect("mget")
                    .into_iter()
                    .flatten()
                    .count(),
                1 => hits(cache.get_many_or_load(keys, nothing).await),
                _ => hits(lean.get_many_or_load(keys, nothing).await),
            };
            assert_eq!(found, keys.len());
        },
    );
    // For reference: the same reads one by one (each L1 copy dropped first, timed with them).
    group.bench_function(BenchmarkId::new("headroom", "100_sequential_get"), |b| {
        b.to_async(&runtime).iter(|| async {
            for k in keys {
                cache.invalidate_local(k);
                cache.get(k).await.expect("get").expect("hit");
            }
        })
    });
    group.finish();
}

fn hits(found: Result<Vec<Option<String>>, headroom_cache::CacheError>) -> usize {
    found.expect("get_many").into_iter().flatten().count()
}

criterion_group!(benches, cache);
criterion_main!(benches);
