//! The hot paths of the instruction-count regression gate, one per name, on deterministic
//! inputs. `scripts/bench-gate.sh` runs each under callgrind, counting only inside its
//! `measured_*` function, and compares instructions per iteration with
//! `benches/gate-baseline.txt`.
//!
//! Run with: `cargo run --profile bench -p headroom-benches --bin gate -- <name>` (or `--list`).

use std::hint::black_box;

use std::time::Duration;

use headroom_breaker::CircuitBreaker;
use headroom_cache::Cache;
use headroom_core::Namespace;
use headroom_core::memory::{MemoryKvStore, MemoryLeaseStore};
use headroom_idempotency::{Idempotency, IdempotencyKey, Scope};
use headroom_limit::Bulkhead;
use headroom_limit::rate::{DirectLimiter, KeyedLimiter, Quota};
use headroom_shard::{JumpRouter, MaglevRouter, RingRouter, Router, cluster_slot};

/// Iterations of every measured loop; the gate divides by it.
const ITERATIONS: usize = 10_000;

type Bench = (&'static str, fn());

const BENCHES: &[Bench] = &[
    ("cache_l1_hit", cache_l1_hit),
    ("shard_jump_1000", shard_jump),
    ("shard_ring_100x160", shard_ring),
    ("shard_maglev_100", shard_maglev),
    ("shard_cluster_slot", shard_cluster_slot),
    ("bulkhead_try_acquire_release", bulkhead),
    ("breaker_closed_permit_count_window", breaker),
    ("rate_direct_check", rate_direct),
    ("rate_keyed_check", rate_keyed),
    ("idempotency_replay_memory", idempotency_replay),
];

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    if name == "--list" {
        for (name, _) in BENCHES {
            println!("{name}");
        }
        println!("iterations {ITERATIONS}");
        return;
    }
    match BENCHES.iter().find(|(n, _)| *n == name) {
        Some((_, bench)) => bench(),
        None => {
            eprintln!("unknown bench {name:?}; --list names them");
            std::process::exit(2);
        }
    }
}

fn cache_l1_hit() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let cache: Cache<u64, String> = runtime.block_on(async {
        let cache = Cache::builder()
            .name("gate")
            .ttl(Duration::from_secs(3_600))
            .l2(
                MemoryKvStore::new(),
                Namespace::new("gate").expect("namespace"),
            )
            .build()
            .expect("cache");
        for k in 0..64 {
            cache.insert(k, format!("value-{k}")).await.expect("fill");
        }
        cache
    });
    measured_cache_l1_hit(&runtime, &cache);
}

#[inline(never)]
fn measured_cache_l1_hit(runtime: &tokio::runtime::Runtime, cache: &Cache<u64, String>) {
    runtime.block_on(async {
        for i in 0..ITERATIONS {
            black_box(cache.get(&(i as u64 % 64)).await.expect("get"));
        }
    });
}

fn keys() -> Vec<String> {
    (0..1024).map(|i| format!("tenant:{i}:orders")).collect()
}

fn shard_jump() {
    measured_route(&JumpRouter::new(1000).expect("router"), &keys());
}

fn shard_ring() {
    measured_route(&RingRouter::new(100, 160).expect("router"), &keys());
}

fn shard_maglev() {
    measured_route(&MaglevRouter::new(100, 65_537).expect("router"), &keys());
}

#[inline(never)]
fn measured_route(router: &dyn Router, keys: &[String]) {
    for i in 0..ITERATIONS {
        black_box(router.route_bytes(black_box(keys[i % keys.len()].as_bytes())));
    }
}

fn shard_cluster_slot() {
    measured_cluster_slot(&keys());
}

#[inline(never)]
fn measured_cluster_slot(keys: &[String]) {
    for i in 0..ITERATIONS {
        black_box(cluster_slot(black_box(keys[i % keys.len()].as_bytes())));
    }
}

fn bulkhead() {
    let bulkhead = Bulkhead::builder("gate")
        .max_concurrent(64)
        .build()
        .expect("bulkhead");
    measured_bulkhead(&bulkhead);
}

#[inline(never)]
fn measured_bulkhead(bulkhead: &Bulkhead) {
    for _ in 0..ITERATIONS {
        drop(black_box(bulkhead.try_acquire()));
    }
}

fn breaker() {
    let breaker: CircuitBreaker<()> = CircuitBreaker::builder()
        .count_window(100)
        .build()
        .expect("breaker");
    measured_breaker(&breaker);
}

#[inline(never)]
fn measured_breaker(breaker: &CircuitBreaker<()>) {
    for _ in 0..ITERATIONS {
        black_box(breaker.try_acquire()).expect("closed").success();
    }
}

/// A quota no check in the gate exhausts, so every check takes the admitting path.
fn generous() -> Quota {
    Quota::per_second(1_000_000_000).expect("quota")
}

fn rate_direct() {
    measured_rate_direct(&DirectLimiter::builder(generous()).build());
}

#[inline(never)]
fn measured_rate_direct(limiter: &DirectLimiter) {
    for _ in 0..ITERATIONS {
        black_box(limiter.check()).expect("admitted");
    }
}

fn rate_keyed() {
    let limiter: KeyedLimiter<String> = KeyedLimiter::builder(generous()).build();
    let keys = keys();
    for key in &keys {
        limiter.check_key(key.as_str()).expect("admitted");
    }
    measured_rate_keyed(&limiter, &keys);
}

#[inline(never)]
fn measured_rate_keyed(limiter: &KeyedLimiter<String>, keys: &[String]) {
    for i in 0..ITERATIONS {
        black_box(limiter.check_key(keys[i % keys.len()].as_str())).expect("admitted");
    }
}

fn idempotency_replay() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let executor = Idempotency::builder(MemoryLeaseStore::new())
        .build()
        .expect("executor");
    let scope = Scope::new("tenant-42", "create-payment").expect("scope");
    let key = IdempotencyKey::new("8e03978e-40d5-43e8-bc93-6894a57f9324").expect("key");
    let prime = executor.execute(&scope, &key, b"amount=100", || async {
        Ok::<_, std::convert::Infallible>("pay_1MtwBwLkdIwHu7ix".to_owned())
    });
    runtime.block_on(prime).expect("prime");
    measured_idempotency_replay(&runtime, &executor, &scope, &key);
}

#[inline(never)]
fn measured_idempotency_replay(
    runtime: &tokio::runtime::Runtime,
    executor: &Idempotency<MemoryLeaseStore>,
    scope: &Scope,
    key: &IdempotencyKey,
) {
    runtime.block_on(async {
        for _ in 0..ITERATIONS {
            let replay = executor.execute(scope, key, b"amount=100", || async {
                Ok::<String, std::convert::Infallible>(String::new())
            });
            black_box(replay.await.expect("replay"));
        }
    });
}
