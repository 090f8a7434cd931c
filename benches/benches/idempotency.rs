//! The idempotency executor: a new key and a replay on the memory store, and on loopback Redis
//! side by side with a raw `SET NX` on the same kind of connection.
//!
//! Run with: `cargo bench -p headroom-benches --bench idempotency`

use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use headroom_benches::{LoopbackRedis, runtime};
use headroom_core::memory::MemoryLeaseStore;
use headroom_idempotency::{Idempotency, IdempotencyKey, Scope};
use headroom_redis::RedisLeaseStore;

type Outcome = Result<String, std::convert::Infallible>;

fn idempotency(c: &mut Criterion) {
    let runtime = runtime();
    let loopback = LoopbackRedis::start(&runtime);
    let scope = Scope::new("tenant-42", "create-payment").expect("scope");
    let replay_key = IdempotencyKey::new("replayed-key").expect("key");
    let fresh = AtomicU64::new(0);
    let fresh_key = || {
        IdempotencyKey::new(&format!("fresh-{}", fresh.fetch_add(1, Ordering::Relaxed)))
            .expect("key")
    };

    let memory = Idempotency::builder(MemoryLeaseStore::new())
        .build()
        .expect("executor");
    let raw = loopback.raw.clone();
    let on_redis = Idempotency::builder(RedisLeaseStore::new(loopback.redis.clone()))
        .build()
        .expect("executor");
    let receipt = || async { Outcome::Ok("pay_1MtwBwLkdIwHu7ix".to_owned()) };
    runtime
        .block_on(memory.execute(&scope, &replay_key, b"body", receipt))
        .expect("prime");
    runtime
        .block_on(on_redis.execute(&scope, &replay_key, b"body", receipt))
        .expect("prime");

    let mut group = c.benchmark_group("idempotency_memory");
    group.bench_function("replay", |b| {
        b.to_async(&runtime).iter(|| async {
            memory
                .execute(&scope, &replay_key, b"body", receipt)
                .await
                .expect("replay")
        })
    });
    group.bench_function("new_key", |b| {
        b.to_async(&runtime).iter(|| {
            let key = fresh_key();
            let (memory, scope) = (&memory, &scope);
            async move {
                memory
                    .execute(scope, &key, b"body", receipt)
                    .await
                    .expect("run")
            }
        })
    });
    group.finish();

    let mut group = c.benchmark_group("idempotency_redis");
    group.bench_function(BenchmarkId::new("raw_redis_rs", "SET_NX"), |b| {
        b.to_async(&runtime).iter(|| {
            let mut conn = raw.clone();
            let cmd = redis::cmd("SET")
                .arg(format!(
                    "bench:setnx:{}",
                    fresh.fetch_add(1, Ordering::Relaxed)
                ))
                .arg("1")
                .arg("NX")
                .arg("PX")
                .arg(60_000)
                .clone();
            async move {
                cmd.query_async::<Option<String>>(&mut conn)
                    .await
                    .expect("set nx")
            }
        })
    });
    group.bench_function(BenchmarkId::new("headroom", "replay_1_round_trip"), |b| {
        b.to_async(&runtime).iter(|| async {
            on_redis
                .execute(&scope, &replay_key, b"body", receipt)
                .await
                .expect("replay")
        })
    });
    group.bench_function(BenchmarkId::new("headroom", "new_key_2_round_trips"), |b| {
        b.to_async(&runtime).iter(|| {
            let key = fresh_key();
            let (on_redis, scope) = (&on_redis, &scope);
            async move {
                on_redis
                    .execute(scope, &key, b"body", receipt)
                    .await
                    .expect("run")
            }
        })
    });
    group.finish();
}

criterion_group!(benches, idempotency);
criterion_main!(benches);
