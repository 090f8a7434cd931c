//! The L2 store against raw redis-rs on the same kind of connection, on a loopback
//! `redis-server` started by the testkit, the calls of each group interleaved (see
//! `headroom_benches::interleaved`).
//!
//! Run with: `cargo bench -p headroom-benches --bench kv`

use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use headroom_benches::{LoopbackRedis, interleaved, runtime};
use headroom_core::kv::{KvEntry, KvStore};
use headroom_core::memory::MemoryKvStore;
use headroom_core::{Key, Namespace};
use headroom_redis::RedisKvStore;

fn kv(c: &mut Criterion) {
    let runtime = runtime();
    let loopback = LoopbackRedis::start(&runtime);
    let ns = Namespace::new("bench").expect("namespace");
    let keys: Vec<Key> = (0..100)
        .map(|i| ns.key(format!("k{i}")).expect("key"))
        .collect();
    let value = Bytes::from(vec![b'x'; 256]);
    let entries: Vec<KvEntry> = keys
        .iter()
        .map(|key| KvEntry {
            key: key.clone(),
            value: value.clone(),
            ttl: Duration::from_secs(600),
        })
        .collect();

    let store = RedisKvStore::new(loopback.redis.clone());
    runtime.block_on(store.set_many(&entries)).expect("fill");
    let raw = loopback.raw.clone();
    let memory = MemoryKvStore::new();
    runtime
        .block_on(memory.set_many(&entries))
        .expect("fill memory");

    let mut group = c.benchmark_group("kv_get");
    let get = redis::cmd("GET").arg(keys[0].as_bytes()).clone();
    let (raw, store, get, first) = (&raw, &store, &get, &keys[0]);
    interleaved(
        &mut group,
        &runtime,
        &[("raw_redis_rs", "GET"), ("headroom_redis", "GET")],
        |_| {},
        |call| async move {
            let found = match call {
                0 => get
                    .query_async::<Option<Vec<u8>>>(&mut raw.clone())
                    .await
                    .expect("get")
                    .is_some(),
                _ => store.get(first).await.expect("get").is_some(),
            };
            assert!(found);
        },
    );
    group.bench_function(BenchmarkId::new("headroom_memory", "GET"), |b| {
        b.to_async(&runtime)
            .iter(|| async { memory.get(&keys[0]).await.expect("get") })
    });
    group.finish();

    let mut group = c.benchmark_group("kv_get_100");
    let mut mget = redis::cmd("MGET");
    for key in &keys {
        mget.arg(key.as_bytes());
    }
    let (mget, keys) = (&mget, &keys);
    interleaved(
        &mut group,
        &runtime,
        &[("raw_redis_rs", "MGET"), ("headroom_redis", "get_many")],
        |_| {},
        |call| async move {
            let found = match call {
                0 => mget
                    .query_async::<Vec<Option<Vec<u8>>>>(&mut raw.clone())
                    .await
                    .expect("mget")
                    .len(),
                _ => store.get_many(keys).await.expect("get_many").len(),
            };
            assert_eq!(found, keys.len());
        },
    );
    group.bench_function(
        BenchmarkId::new("headroom_redis", "100_sequential_get"),
        |b| {
            b.to_async(&runtime).iter(|| async {
                for key in keys {
                    store.get(key).await.expect("get");
                }
            })
        },
    );
    group.finish();
}

/// Writes of new keys into a full memory store, each evicting one entry: the cost must not
/// grow with the store's size.
fn memory_set_when_full(c: &mut Criterion) {
    let runtime = runtime();
    let ns = Namespace::new("bench").expect("namespace");
    let value = Bytes::from_static(b"v");
    let mut group = c.benchmark_group("kv_memory_set_full");
    for entries in [10_000usize, 1_000_000] {
        let store = MemoryKvStore::builder().max_entries(entries).build();
        let mut next = 0u64;
        let mut write = |store: &MemoryKvStore| {
            next += 1;
            let key = ns.key(next.to_be_bytes()).expect("key");
            runtime
                .block_on(store.set(&key, value.clone(), Duration::from_secs(600)))
                .expect("set");
        };
        for _ in 0..entries {
            write(&store);
        }
        group.bench_function(BenchmarkId::new("headroom_memory", entries), |b| {
            b.iter(|| write(&store));
        });
    }
    group.finish();
}

criterion_group!(benches, kv, memory_set_when_full);
criterion_main!(benches);
