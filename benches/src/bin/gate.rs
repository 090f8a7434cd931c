//! The hot paths of the instruction-count regression gate, one per name, on deterministic
//! inputs. `scripts/bench-gate.sh` runs each under callgrind, counting only inside its
//! `measured_*` function, and compares instructions per iteration with
//! `benches/gate-baseline.txt`.
//!
//! Run with: `cargo run --profile bench -p headroom-benches --bin gate -- <name>` (or `--list`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::hint::black_box;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use headroom_breaker::{CircuitBreaker, Hedge, Pipeline, Retry, RetryBudget};
use headroom_cache::Cache;
use headroom_chaos::{Chaos, ChaosLayer, ChaosService, Experiment, ExperimentConfig};
use headroom_core::jobs::{EnqueueLimits, NewJob};
use headroom_core::memory::{MemoryJobStore, MemoryKvStore, MemoryLeaseStore, MemoryRateStore};
use headroom_core::{BackendError, ManualClock, Namespace};
use headroom_idempotency::{Idempotency, IdempotencyKey, Scope};
use headroom_limit::Bulkhead;
use headroom_limit::rate::{
    DirectLimiter, DistributedRateLimiter, KeyedLimiter, Quota, RateLimit, TierConfig,
};
use headroom_limit::tower::{BulkheadLayer, BulkheadService};
use headroom_shard::{
    JumpRouter, MaglevRouter, ReadPolicy, RendezvousRouter, RingRouter, Router, ShardId, Topology,
    TopologyHandle, cluster_slot,
};
use headroom_slo::{Objective, ObjectiveConfig, SloLayer, SloService};
use tower::util::ServiceFn;
use tower::{Layer, Service, ServiceExt, service_fn};

/// Iterations of every measured loop; the gate divides by it.
const ITERATIONS: usize = 10_000;

type Bench = (&'static str, fn());

const BENCHES: &[Bench] = &[
    ("cache_l1_hit", cache_l1_hit),
    ("cache_l2_hit_memory", cache_l2_hit),
    ("cache_get_many_per_key_memory", cache_get_many),
    ("shard_jump_1000", shard_jump),
    ("shard_ring_100x160", shard_ring),
    ("shard_maglev_100", shard_maglev),
    ("shard_cluster_slot", shard_cluster_slot),
    ("shard_rendezvous_100", shard_rendezvous),
    ("shard_topology_read_round_robin", shard_topology_read),
    ("bulkhead_try_acquire_release", bulkhead),
    ("bulkhead_tower_layer", bulkhead_layer),
    ("breaker_closed_permit_count_window", breaker),
    ("breaker_closed_permit_time_window", breaker_time_window),
    ("breaker_closed_call_time_window", breaker_call_time_window),
    ("breaker_pipeline_success", pipeline),
    ("breaker_hedge_fast_answer", hedge_fast),
    ("rate_direct_check", rate_direct),
    ("rate_keyed_check", rate_keyed),
    ("rate_distributed_check_memory", rate_distributed),
    ("idempotency_replay_memory", idempotency_replay),
    ("slo_layer_latency", slo_layer),
    ("tower_bare_call", bare_call),
    ("chaos_layer_off", chaos_off),
    ("jobs_enqueue_fetch_complete_memory", jobs_memory),
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
    let runtime = current_thread();
    let cache = filled_cache(&runtime);
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

/// A cache of 64 entries on the memory L2, built and filled on `runtime`.
fn filled_cache(runtime: &tokio::runtime::Runtime) -> Cache<u64, String> {
    runtime.block_on(async {
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
    })
}

/// An L2 hit: the L1 copy is dropped before each read, which then fills L1 again.
fn cache_l2_hit() {
    let runtime = current_thread();
    let cache = filled_cache(&runtime);
    measured_cache_l2_hit(&runtime, &cache);
}

#[inline(never)]
fn measured_cache_l2_hit(runtime: &tokio::runtime::Runtime, cache: &Cache<u64, String>) {
    runtime.block_on(async {
        for i in 0..ITERATIONS {
            let key = i as u64 % 64;
            cache.invalidate_local(&key);
            black_box(cache.get(&key).await.expect("get"));
        }
    });
}

/// Batches of 50 L2 hits (one `get_many` of the store each); counted per key.
fn cache_get_many() {
    let runtime = current_thread();
    let cache = filled_cache(&runtime);
    let keys: Vec<u64> = (0..50).collect();
    measured_cache_get_many(&runtime, &cache, &keys);
}

#[inline(never)]
fn measured_cache_get_many(
    runtime: &tokio::runtime::Runtime,
    cache: &Cache<u64, String>,
    keys: &[u64],
) {
    runtime.block_on(async {
        for _ in 0..ITERATIONS / keys.len() {
            for key in keys {
                cache.invalidate_local(key);
            }
            let found = cache
                .get_many_or_load(keys, |_| async { Ok::<_, Infallible>(HashMap::new()) })
                .await
                .expect("get_many");
            black_box(found);
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

fn shard_rendezvous() {
    measured_route(&RendezvousRouter::new(100).expect("router"), &keys());
}

fn shard_topology_read() {
    let mut builder = Topology::builder(JumpRouter::new(16).expect("router"));
    for shard in 0..16u32 {
        let primary = format!("primary-{shard}");
        let replicas = [format!("replica-{shard}-a"), format!("replica-{shard}-b")];
        builder = builder
            .node(primary.as_str(), ())
            .node(replicas[0].as_str(), ())
            .node(replicas[1].as_str(), ())
            .shard(
                ShardId(shard),
                &primary,
                &[replicas[0].as_str(), replicas[1].as_str()],
            );
    }
    let handle = TopologyHandle::new(builder.build().expect("topology"));
    measured_topology_read(&handle, &keys());
}

#[inline(never)]
fn measured_topology_read(handle: &TopologyHandle<(), JumpRouter>, keys: &[String]) {
    for i in 0..ITERATIONS {
        let topology = handle.load();
        let target = topology
            .read(keys[i % keys.len()].as_str(), &ReadPolicy::RoundRobin)
            .expect("read");
        black_box(target.node_id());
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

type Echo = ServiceFn<fn(u64) -> Ready<Result<u64, Infallible>>>;

/// One request through the bulkhead's tower layer: `ready`, then `call` answered at once.
fn bulkhead_layer() {
    let bulkhead = Bulkhead::builder("gate")
        .max_concurrent(64)
        .build()
        .expect("bulkhead");
    let echo: fn(u64) -> Ready<Result<u64, Infallible>> = |n| ready(Ok(n));
    let mut service = BulkheadLayer::new(bulkhead).layer(service_fn(echo));
    measured_bulkhead_layer(&mut service);
}

#[inline(never)]
fn measured_bulkhead_layer(service: &mut BulkheadService<Echo>) {
    for i in 0..ITERATIONS {
        let ready = poll_now(service.ready()).expect("ready").expect("ok");
        let answer = poll_now(ready.call(i as u64)).expect("answered");
        black_box(answer.expect("ok"));
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

/// A time window on a manual clock, so that every run reads the same times.
fn breaker_time_window() {
    let manual = ManualClock::new();
    let breaker: CircuitBreaker<()> = CircuitBreaker::builder()
        .clock(manual.clock())
        .time_window(Duration::from_secs(10), 10)
        .build()
        .expect("breaker");
    measured_breaker_time_window(&breaker, &manual);
}

#[inline(never)]
fn measured_breaker_time_window(breaker: &CircuitBreaker<()>, manual: &ManualClock) {
    for i in 0..ITERATIONS {
        // A new bucket every 100 calls: rollovers are part of the path.
        if i % 100 == 0 {
            manual.advance(Duration::from_millis(250));
        }
        black_box(breaker.try_acquire()).expect("closed").success();
    }
}

/// `call` of a future that answers at once, through a closed breaker with a time window on a
/// manual clock: the permit's path and the wrapping future's.
fn breaker_call_time_window() {
    let manual = ManualClock::new();
    let breaker: CircuitBreaker<()> = CircuitBreaker::builder()
        .clock(manual.clock())
        .time_window(Duration::from_secs(10), 10)
        .build()
        .expect("breaker");
    measured_breaker_call_time_window(&breaker, &manual);
}

#[inline(never)]
fn measured_breaker_call_time_window(breaker: &CircuitBreaker<()>, manual: &ManualClock) {
    for i in 0..ITERATIONS {
        if i % 100 == 0 {
            manual.advance(Duration::from_millis(250));
        }
        let answer = poll_now(breaker.call(async move { Ok::<_, ()>(i) })).expect("answered");
        black_box(answer).expect("closed");
    }
}

/// One request through the SLO layer of a latency objective, on a manual clock: a new time
/// bucket, and with it an evaluation, every 1,000 calls.
fn slo_layer() {
    let manual = ManualClock::new();
    let objective = Objective::with_clock(
        ObjectiveConfig::latency("gate", Duration::from_millis(300), 0.99),
        manual.clock(),
    )
    .expect("objective");
    let echo: fn(u64) -> Ready<Result<u64, Infallible>> = |n| ready(Ok(n));
    let mut service = SloLayer::new(objective).layer(service_fn(echo));
    measured_slo_layer(&mut service, &manual);
}

#[inline(never)]
fn measured_slo_layer(service: &mut SloService<Echo>, manual: &ManualClock) {
    for i in 0..ITERATIONS {
        if i % 100 == 0 {
            manual.advance(Duration::from_secs(3));
        }
        let ready = poll_now(service.ready()).expect("ready").expect("ok");
        let answer = poll_now(ready.call(i as u64)).expect("answered");
        black_box(answer.expect("ok"));
    }
}

/// The service the chaos layer wraps, alone: the difference is the layer's cost when off.
fn bare_call() {
    let echo: fn(u64) -> Ready<Result<u64, Infallible>> = |n| ready(Ok(n));
    measured_bare_call(&mut service_fn(echo));
}

#[inline(never)]
fn measured_bare_call(service: &mut Echo) {
    for i in 0..ITERATIONS {
        let ready = poll_now(service.ready()).expect("ready").expect("ok");
        black_box(
            poll_now(ready.call(i as u64))
                .expect("answered")
                .expect("ok"),
        );
    }
}

/// A chaos layer whose experiment ran and was switched off, with every hook given.
fn chaos_off() {
    let experiment = Experiment::builder("gate").build().expect("experiment");
    let chaos = Chaos::new(experiment.clone())
        .fault(|| unreachable!("off"))
        .outcome(|| 0);
    experiment
        .start(ExperimentConfig::new(Duration::from_secs(60)).fault(1.0))
        .expect("started");
    experiment.stop();
    let echo: fn(u64) -> Ready<Result<u64, Infallible>> = |n| ready(Ok(n));
    measured_chaos_off(&mut ChaosLayer::new(chaos).layer(service_fn(echo)));
}

#[inline(never)]
fn measured_chaos_off(service: &mut ChaosService<Echo, u64, Infallible>) {
    for i in 0..ITERATIONS {
        let ready = poll_now(service.ready()).expect("ready").expect("ok");
        black_box(
            poll_now(ready.call(i as u64))
                .expect("answered")
                .expect("ok"),
        );
    }
}

/// Polls `future` once, with a waker that does nothing. Always inlined: a shared polling
/// helper's inlining is decided for the whole binary, so a path's count would move whenever
/// paths are added (futures-util's `now_or_never` did, by up to 30 %).
#[inline(always)]
fn poll_now<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => Some(output),
        Poll::Pending => None,
    }
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

/// Retry with a budget, breaker and timeout around an operation that succeeds at once.
fn pipeline() {
    let runtime = current_thread();
    let budget = RetryBudget::builder().build().expect("budget");
    let pipeline = Pipeline::<BackendError>::builder()
        .retry(
            Retry::builder()
                .max_attempts(3)
                .budget(budget)
                .build()
                .expect("retry"),
        )
        .breaker(
            CircuitBreaker::builder()
                .count_window(100)
                .build()
                .expect("breaker"),
        )
        .timeout(Duration::from_secs(1))
        .build();
    measured_pipeline(&runtime, &pipeline);
}

#[inline(never)]
fn measured_pipeline(runtime: &tokio::runtime::Runtime, pipeline: &Pipeline<BackendError>) {
    runtime.block_on(async {
        for i in 0..ITERATIONS {
            let answer = pipeline
                .call(|| async move { Ok::<_, BackendError>(i) })
                .await;
            black_box(answer).expect("success");
        }
    });
}

/// A hedge whose first call answers at once: no hedge is started.
fn hedge_fast() {
    let runtime = current_thread();
    let hedge = Hedge::builder()
        .delay(Duration::from_millis(50))
        .build()
        .expect("hedge");
    measured_hedge_fast(&runtime, &hedge);
}

#[inline(never)]
fn measured_hedge_fast(runtime: &tokio::runtime::Runtime, hedge: &Hedge) {
    runtime.block_on(async {
        for i in 0..ITERATIONS {
            let answer = hedge.call(|| async move { Ok::<_, BackendError>(i) }).await;
            black_box(answer).expect("success");
        }
    });
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

/// A distributed check on the memory rate store: the limiter's own work around one store call.
fn rate_distributed() {
    let runtime = current_thread();
    let limiter = DistributedRateLimiter::builder(
        "gate",
        MemoryRateStore::new(),
        Namespace::new("gate").expect("namespace"),
        // The shared stores keep microseconds: a million a second is the finest rate they hold.
        TierConfig::new().tier(
            "t",
            Quota::per_second(1_000_000)
                .and_then(|q| q.with_burst(1_000_000))
                .expect("quota"),
        ),
    )
    .build()
    .expect("limiter");
    measured_rate_distributed(&runtime, &limiter);
}

#[inline(never)]
fn measured_rate_distributed(
    runtime: &tokio::runtime::Runtime,
    limiter: &DistributedRateLimiter<MemoryRateStore>,
) {
    runtime.block_on(async {
        for _ in 0..ITERATIONS {
            black_box(limiter.check("t", "user-1", 1).await).expect("admitted");
        }
    });
}

fn idempotency_replay() {
    let runtime = current_thread();
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

/// One job through the memory job store: enqueued, fetched and completed. The store's manual
/// clock moves a millisecond per job, so each done job's retention passes and what the store
/// prunes is the same in every run.
fn jobs_memory() {
    let runtime = current_thread();
    let clock = ManualClock::new();
    let store = MemoryJobStore::builder().clock(clock.clock()).build();
    let partition = Namespace::new("gate")
        .expect("namespace")
        .key("{q}")
        .expect("key");
    measured_jobs_memory(&runtime, &clock, &store, &partition);
}

#[inline(never)]
fn measured_jobs_memory(
    runtime: &tokio::runtime::Runtime,
    clock: &ManualClock,
    store: &MemoryJobStore,
    partition: &headroom_core::Key,
) {
    let limits = EnqueueLimits {
        max_len: 1_000,
        max_per_tenant: None,
        dedup_window: Duration::from_secs(60),
    };
    let job = NewJob::new(bytes::Bytes::from_static(b"{\"order\":4711}"));
    runtime.block_on(async {
        for _ in 0..ITERATIONS {
            black_box(headroom_benches::job_round_trip(store, partition, &job, &limits).await);
            clock.advance(Duration::from_millis(1));
        }
    });
}
