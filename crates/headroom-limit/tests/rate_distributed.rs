//! Distributed rate limits: instances sharing one store admit together what one limiter
//! would (exactly, or within the documented bound when batching), on the in-memory store,
//! a real Redis and a real Redis Cluster; and the fallbacks when the store goes away.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use headroom_core::memory::MemoryRateStore;
use headroom_core::rate::{Gcra, RateDecision, RateStore};
use headroom_core::{BackendError, BackendErrorKind, Classify, Key, ManualClock, Namespace};
use headroom_limit::rate::{
    DistributedConfig, DistributedRateLimiter, Fallback, Quota, RateErrorKind, RateLimit,
    TierConfig,
};
use headroom_redis::{Redis, RedisConfig, RedisRateStore};
use headroom_testkit::{RedisServer, shared_cluster, shared_server, unique_namespace};

const INSTANCES: usize = 4;
const REQUESTS_PER_INSTANCE: usize = 150;
const QUOTA: u32 = 200;

fn tiers() -> TierConfig {
    // 200 an hour: one unit replenishes every 18 s, far longer than a test takes, so the
    // whole run sees exactly the burst.
    TierConfig::new().tier("free", Quota::per_hour(QUOTA).unwrap())
}

/// Runs `INSTANCES` limiters concurrently, each sending its requests for one key until it is
/// done; returns (admitted in total, round trips in total).
async fn admitted_together<S: RateStore + Clone>(
    store: S,
    namespace: Namespace,
    batch: u32,
) -> (usize, u64) {
    let limiters: Vec<_> = (0..INSTANCES)
        .map(|i| {
            DistributedRateLimiter::builder(
                format!("instance-{i}"),
                store.clone(),
                namespace.clone(),
                tiers(),
            )
            .batch(batch)
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
        })
        .collect();
    let tasks: Vec<_> = limiters
        .iter()
        .cloned()
        .map(|limiter| {
            tokio::spawn(async move {
                let mut admitted = 0;
                for _ in 0..REQUESTS_PER_INSTANCE {
                    match limiter.check("free", "tenant-1", 1).await {
                        Ok(_) => admitted += 1,
                        Err(error) => assert_eq!(error.kind(), RateErrorKind::Limited),
                    }
                }
                admitted
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    let round_trips = limiters.iter().map(|l| l.round_trips()).sum();
    assert!(limiters.iter().all(|l| l.fallback_decisions() == 0));
    (total, round_trips)
}

async fn redis_store(config: RedisConfig) -> RedisRateStore {
    RedisRateStore::new(Redis::connect(config).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_instances_on_one_memory_store_admit_exactly_the_quota() {
    let (admitted, round_trips) =
        admitted_together(MemoryRateStore::new(), unique_namespace("rate"), 1).await;
    assert_eq!(admitted, QUOTA as usize);
    assert_at_most_one_round_trip_each(round_trips);
}

/// One round trip per admitted request, and refusals remembered once seen: after its first
/// refusal an instance refuses locally.
fn assert_at_most_one_round_trip_each(round_trips: u64) {
    assert!(
        round_trips >= u64::from(QUOTA) && round_trips <= u64::from(QUOTA) + INSTANCES as u64,
        "{round_trips} round trips"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_instances_on_one_redis_admit_exactly_the_quota_one_round_trip_each() {
    let store = redis_store(RedisConfig::standalone(shared_server().url())).await;
    let (admitted, round_trips) = admitted_together(store, unique_namespace("rate"), 1).await;
    assert_eq!(admitted, QUOTA as usize);
    assert_at_most_one_round_trip_each(round_trips);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_instances_on_a_redis_cluster_admit_exactly_the_quota() {
    let store = redis_store(RedisConfig::cluster(shared_cluster().urls())).await;
    let (admitted, _) = admitted_together(store, unique_namespace("rate"), 1).await;
    assert_eq!(admitted, QUOTA as usize);
}

/// Batched: never more than the store granted (the quota here, as no unit replenishes during
/// the run), at most `batch` units per instance left unspent, and far fewer round trips.
fn assert_within_batch_bound(admitted: usize, round_trips: u64, batch: u32) {
    assert!(admitted <= QUOTA as usize, "{admitted} admitted");
    assert!(
        admitted >= QUOTA as usize - INSTANCES * (batch as usize - 1),
        "{admitted} admitted"
    );
    // One per batch, plus per instance the smaller batches it starts with (1, 2, 4, ... below
    // `batch`), two where the batches run out and one for its first refusal.
    let smaller = (0..).take_while(|&k| 2u32.pow(k) < batch).count() as u64;
    let most = u64::from(QUOTA) / u64::from(batch) + (3 + smaller) * INSTANCES as u64;
    assert!(round_trips <= most, "{round_trips} round trips > {most}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_instances_on_one_redis_stay_within_the_documented_bound() {
    let store = redis_store(RedisConfig::standalone(shared_server().url())).await;
    let (admitted, round_trips) = admitted_together(store, unique_namespace("rate"), 10).await;
    assert_within_batch_bound(admitted, round_trips, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_instances_on_a_redis_cluster_stay_within_the_documented_bound() {
    let store = redis_store(RedisConfig::cluster(shared_cluster().urls())).await;
    let (admitted, round_trips) = admitted_together(store, unique_namespace("rate"), 10).await;
    assert_within_batch_bound(admitted, round_trips, 10);
}

/// A tier whose quota changes starts with every key full: a key that spent the old quota is
/// not held to it once the limit is raised.
#[tokio::test]
async fn a_changed_quota_starts_every_key_full() {
    let clock = ManualClock::new();
    let store = MemoryRateStore::with_limits(clock.clock(), 1000);
    let limiter = DistributedRateLimiter::builder(
        "api",
        store,
        unique_namespace("rate"),
        TierConfig::new().tier("t", Quota::per_minute(1).unwrap()),
    )
    .clock(clock.clock())
    .build()
    .unwrap();
    limiter.check("t", "k", 1).await.unwrap();
    assert!(limiter.check("t", "k", 1).await.is_err(), "one a minute");
    // A cost of zero spends nothing, so it is admitted even on a key just refused.
    assert_eq!(limiter.check("t", "k", 0).await.unwrap().remaining(), 0);
    limiter
        .replace(&TierConfig::new().tier("t", Quota::per_second(100).unwrap()))
        .unwrap();
    clock.advance(Duration::from_millis(100));
    for _ in 0..100 {
        limiter.check("t", "k", 1).await.unwrap();
    }
}

/// A cost of zero spends nothing in the store either: a check of cost zero on one instance
/// (may this be sent?) leaves the unit for the request that spends it, on any instance.
#[tokio::test]
async fn a_cost_of_zero_spends_nothing_in_the_store() {
    let clock = ManualClock::new();
    let store = MemoryRateStore::with_limits(clock.clock(), 1000);
    let ns = unique_namespace("rate");
    let instance = || {
        DistributedRateLimiter::builder(
            "api",
            store.clone(),
            ns.clone(),
            TierConfig::new().tier("t", Quota::per_minute(1).unwrap()),
        )
        .clock(clock.clock())
        .build()
        .unwrap()
    };
    let (a, b) = (instance(), instance());
    assert_eq!(a.check("t", "k", 0).await.unwrap().remaining(), 1);
    b.check("t", "k", 1)
        .await
        .expect("the unit a check of cost zero left");
    assert!(a.check("t", "k", 1).await.is_err(), "one a minute");
}

/// A store that refuses everything, even a cost of zero, as a cell whose time is far ahead of
/// the store's clock does (the clock stepped back).
#[derive(Clone, Debug)]
struct RefusingStore;

impl RateStore for RefusingStore {
    async fn apply_all(&self, _: &[(Key, Gcra)], _: u32) -> Result<RateDecision, BackendError> {
        Ok(RateDecision {
            allowed: false,
            remaining: 0,
            retry_after: Duration::from_secs(1),
            reset_after: Duration::from_secs(1),
            cell: 0,
        })
    }
}

/// A cost of zero is never refused, even by a store that refuses it.
#[tokio::test]
async fn a_cost_of_zero_is_admitted_though_the_store_refuses_it() {
    let limiter = DistributedRateLimiter::builder(
        "api",
        RefusingStore,
        unique_namespace("rate"),
        TierConfig::new().tier("t", Quota::per_minute(1).unwrap()),
    )
    .build()
    .unwrap();
    assert_eq!(limiter.check("t", "k", 0).await.unwrap().remaining(), 0);
    assert!(limiter.check("t", "k", 1).await.is_err());
}

/// A key's batches follow its use: the cost alone first, twice as many each time they run out
/// within their hold (up to the batch), and as many as were spent when they lapse.
#[tokio::test]
async fn batched_units_are_spent_locally_grow_with_use_and_expire() {
    let clock = ManualClock::new();
    let store = MemoryRateStore::with_limits(clock.clock(), 1000);
    let limiter = DistributedRateLimiter::builder(
        "api",
        store.clone(),
        unique_namespace("rate"),
        TierConfig::new().tier("t", Quota::per_second(100).unwrap()),
    )
    .clock(clock.clock())
    .batch(10)
    .build()
    .unwrap();
    let mut asked_at = Vec::new();
    for request in 1..=27 {
        let before = limiter.round_trips();
        limiter.check("t", "k", 1).await.unwrap();
        if limiter.round_trips() > before {
            asked_at.push(request);
        }
    }
    // Batches of 1, 2, 4, 8, 10 and 10.
    assert_eq!(asked_at, [1, 2, 4, 8, 16, 26]);
    // Of the last batch, 2 units are spent and 8 left; they are held for at most 10 emission
    // intervals (100 ms), then the next request asks again, for as many as were spent: 2
    // units, for it and the next; the one after finds them run out, and asks for 4.
    clock.advance(Duration::from_millis(100));
    for expected in [7, 7, 8] {
        limiter.check("t", "k", 1).await.unwrap();
        assert_eq!(limiter.round_trips(), expected);
    }
}

/// A limiter of tier `t` at `quota` on `store` under `ns`, on `clock`, reserving up to `batch`
/// units at a time.
fn on_manual_clock(
    store: &MemoryRateStore,
    ns: &Namespace,
    clock: &ManualClock,
    quota: Quota,
    batch: u32,
) -> DistributedRateLimiter<MemoryRateStore> {
    DistributedRateLimiter::builder(
        "api",
        store.clone(),
        ns.clone(),
        TierConfig::new().tier("t", quota),
    )
    .clock(clock.clock())
    .batch(batch)
    .build()
    .unwrap()
}

/// Requests costing more than one unit batch too: their batches grow as those of single units
/// do, so a busy key costs far fewer round trips than requests.
#[tokio::test]
async fn batches_grow_for_requests_of_any_cost() {
    let clock = ManualClock::new();
    let limiter = on_manual_clock(
        &MemoryRateStore::with_limits(clock.clock(), 1000),
        &unique_namespace("rate"),
        &clock,
        Quota::per_second(1000).unwrap(),
        10,
    );
    for _ in 0..20 {
        limiter.check("t", "k", 2).await.unwrap();
    }
    assert!(
        limiter.round_trips() <= 8,
        "{} round trips for 20 requests",
        limiter.round_trips()
    );
}

/// A key asked for less than once per hold is charged what it uses, whatever the cost: two
/// batched instances using a key at 63 % of its quota in requests of 5 units leave it the rest
/// of its burst, and cost no more round trips than requests.
#[tokio::test]
async fn batched_requests_less_than_once_per_hold_are_charged_their_cost() {
    let clock = ManualClock::new();
    let store = MemoryRateStore::with_limits(clock.clock(), 1000);
    let ns = unique_namespace("rate");
    let instance =
        |batch| on_manual_clock(&store, &ns, &clock, Quota::per_second(100).unwrap(), batch);
    let (a, b, exact) = (instance(10), instance(10), instance(1));
    // A request every 150 ms on `a`, every 170 ms on `b`, for 20 s; a batch is held 100 ms.
    let mut at: Vec<(u64, bool)> = (1..=133).map(|i| (150 * i, true)).collect();
    at.extend((1..=117).map(|i| (170 * i, false)));
    at.sort_unstable();
    let mut now = 0;
    for &(ms, on_a) in &at {
        clock.advance(Duration::from_millis(ms - now));
        now = ms;
        let limiter = if on_a { &a } else { &b };
        limiter.check("t", "k", 5).await.unwrap();
    }
    let round_trips = a.round_trips() + b.round_trips();
    assert!(
        round_trips <= at.len() as u64,
        "{round_trips} round trips for {} requests",
        at.len()
    );
    exact.check("t", "k", 30).await.unwrap();
}

/// A memory store that charges each call at once and answers it only when let through, so
/// that a reservation's answer can come after a later one's.
#[derive(Clone, Debug, Default)]
struct GatedStore {
    inner: MemoryRateStore,
    entered: Arc<tokio::sync::Notify>,
    gate: Arc<tokio::sync::Notify>,
    gated: Arc<AtomicBool>,
}

impl RateStore for GatedStore {
    async fn apply_all(
        &self,
        cells: &[(Key, Gcra)],
        cost: u32,
    ) -> Result<RateDecision, BackendError> {
        let decision = self.inner.apply_all(cells, cost).await;
        if self.gated.swap(false, Ordering::SeqCst) {
            self.entered.notify_one();
            self.gate.notified().await;
        }
        decision
    }
}

/// Units reserved by a call whose answer comes after a later reservation's are held no longer
/// than their own hold from before their call, though they join units held longer.
#[tokio::test]
async fn units_answered_late_are_held_no_longer_than_their_own_hold() {
    let clock = ManualClock::new();
    let store = GatedStore {
        inner: MemoryRateStore::with_limits(clock.clock(), 100),
        ..GatedStore::default()
    };
    // 10 a second: a batch of 4 is held 400 ms.
    let limiter = DistributedRateLimiter::builder(
        "api",
        store.clone(),
        unique_namespace("rate"),
        TierConfig::new().tier("t", Quota::per_second(10).unwrap()),
    )
    .clock(clock.clock())
    .batch(4)
    .timeout(Duration::from_secs(60))
    .build()
    .unwrap();
    // Reservations of 1 and 2, all spent: the next is of 2.
    for _ in 0..3 {
        limiter.check("t", "k", 1).await.unwrap();
    }
    clock.advance(Duration::from_millis(1000));
    store.gated.store(true, Ordering::SeqCst);
    let late = tokio::spawn({
        let limiter = limiter.clone();
        async move { limiter.check("t", "k", 1).await }
    });
    store.entered.notified().await;
    // At 1,100 ms another reservation of 2, held until 1,500 ms, answers first.
    clock.advance(Duration::from_millis(100));
    limiter.check("t", "k", 1).await.unwrap();
    // The late one's unit, charged at 1,000 ms, may be spent until 1,400 ms only.
    clock.advance(Duration::from_millis(350));
    store.gate.notify_one();
    late.await.unwrap().unwrap();
    let before = limiter.round_trips();
    limiter.check("t", "k", 1).await.unwrap();
    limiter.check("t", "k", 1).await.unwrap();
    assert!(
        limiter.round_trips() > before,
        "a unit was spent 450 ms after it was charged"
    );
}

/// Requests of one key arriving at once, on an instance whose units ran out, do not each
/// reserve a batch: one does, the others ask for their cost, and every one fits the quota.
#[tokio::test(start_paused = true)]
async fn requests_of_a_key_at_once_reserve_one_batch() {
    let limiter = DistributedRateLimiter::builder(
        "api",
        FlakyStore::new(Duration::from_millis(1)),
        unique_namespace("rate"),
        TierConfig::new().tier("t", Quota::per_second(100).unwrap()),
    )
    .batch(10)
    .timeout(Duration::from_secs(1))
    .build()
    .unwrap();
    // Batches of 1, 2, 4 and 8, all spent: the next would be of 10.
    for _ in 0..15 {
        limiter.check("t", "k", 1).await.unwrap();
    }
    let at_once = futures_util::future::join_all((0..20).map(|_| limiter.check("t", "k", 1))).await;
    let refused = at_once.iter().filter(|checked| checked.is_err()).count();
    assert_eq!(refused, 0, "refused of 20 requests with 85 units left");
}

/// Reserved units are held for `batch` intervals counted from before the round trip: against a
/// store slower than that, a batch would expire on arrival and charge the key `batch` units
/// per request. Under half its quota, no request is refused however slow the store, and
/// batches still save round trips against a store that answers within their hold.
#[tokio::test(start_paused = true)]
async fn a_store_slower_than_a_batch_is_held_refuses_nothing_under_the_quota() {
    for (latency, batched) in [
        (Duration::from_millis(20), false),
        (Duration::from_millis(1), true),
    ] {
        // 1,000 a second: a batch of 10 is held for 10 ms.
        let limiter = DistributedRateLimiter::builder(
            "api",
            FlakyStore::new(latency),
            unique_namespace("rate"),
            TierConfig::new().tier("t", Quota::per_second(1000).unwrap()),
        )
        .batch(10)
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
        // Ten callers, a check every 20 ms each, 2 ms apart: 500 a second on one key.
        let start = tokio::time::Instant::now();
        let callers = (0..10u64).map(|caller| {
            let limiter = limiter.clone();
            async move {
                let first = start + Duration::from_millis(2 * caller);
                let mut ticks = tokio::time::interval_at(first, Duration::from_millis(20));
                let mut refused = 0;
                for _ in 0..50 {
                    ticks.tick().await;
                    if limiter.check("t", "k", 1).await.is_err() {
                        refused += 1;
                    }
                }
                refused
            }
        });
        let refused: u32 = futures_util::future::join_all(callers)
            .await
            .into_iter()
            .sum();
        assert_eq!(refused, 0, "{latency:?}: refused under half the quota");
        let round_trips = limiter.round_trips();
        if batched {
            assert!(
                round_trips <= 150,
                "{latency:?}: {round_trips} round trips for 500 checks"
            );
        } else {
            assert!(
                round_trips <= 500,
                "{latency:?}: {round_trips} round trips for 500 checks"
            );
        }
    }
}

/// Two batched instances each use a key at 30 % of its quota, and an exact one at 10 %:
/// together they are under it, so nothing is refused and the key keeps most of its burst. A
/// batch reserved whole at each hold, whatever the key's use, would charge each batched
/// instance the key's whole rate: the key would run dry, and each batch would be refused
/// and asked again for what is left.
#[tokio::test(start_paused = true)]
async fn batched_instances_sharing_a_key_under_its_quota_are_charged_what_they_use() {
    let store = MemoryRateStore::new();
    let ns = unique_namespace("rate");
    let instance = |batch| {
        DistributedRateLimiter::builder(
            "api",
            store.clone(),
            ns.clone(),
            TierConfig::new().tier("t", Quota::per_second(1000).unwrap()),
        )
        .batch(batch)
        .build()
        .unwrap()
    };
    let instances = [instance(10), instance(10), instance(1)];
    // A check every 10 ms per caller, callers 1 ms apart: three callers on each batched
    // instance (300 a second each), one on the exact one (100 a second).
    let start = tokio::time::Instant::now();
    let callers = instances.iter().enumerate().flat_map(|(i, limiter)| {
        let callers = if i < 2 { 3 } else { 1 };
        (0..callers).map(move |caller| async move {
            let first = start + Duration::from_millis(3 * i as u64 + caller);
            let mut ticks = tokio::time::interval_at(first, Duration::from_millis(10));
            let (mut refused, mut least) = (0, u32::MAX);
            for _ in 0..300 {
                ticks.tick().await;
                match limiter.check("t", "k", 1).await {
                    Ok(admitted) => least = least.min(admitted.remaining()),
                    Err(_) => refused += 1,
                }
            }
            (refused, least)
        })
    });
    let seen = futures_util::future::join_all(callers).await;
    let refused: u32 = seen.iter().map(|(refused, _)| refused).sum();
    assert_eq!(refused, 0, "refused of 2,100 checks at 70 % of the quota");
    // What the store left, with what the instance holds.
    let least = seen.iter().map(|&(_, least)| least).min().unwrap();
    assert!(least >= 500, "the key fell to {least} units of its 1,000");
    let batched: u64 = instances[..2].iter().map(|l| l.round_trips()).sum();
    assert!(
        batched < 900,
        "{batched} round trips for 1,800 batched checks"
    );
}

/// FNV-1a, 64 bits: a hash anyone can compute, as a sender would to aim keys at one place.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Keys a sender chose to share a victim's place under an unkeyed hash (FNV-1a over 16
/// shards) cannot push the victim's reserved units out of local state: they are placed by a
/// hash the sender cannot compute, so a flood of them a tenth of the key cap spreads out, and
/// the victim's next request is still served from its reserved unit, with no round trip.
#[tokio::test]
async fn keys_aimed_at_a_victims_shard_leave_its_reserved_units_in_place() {
    const MAX_KEYS: usize = 1_600;
    let clock = ManualClock::new();
    let limiter = DistributedRateLimiter::builder(
        "api",
        MemoryRateStore::with_limits(clock.clock(), 10_000),
        unique_namespace("rate"),
        TierConfig::new().tier("t", Quota::per_hour(100).unwrap()),
    )
    .clock(clock.clock())
    .batch(10)
    .max_keys_per_tier(MAX_KEYS)
    .build()
    .unwrap();
    // A reservation of the cost alone, then one of two units: one is held.
    for _ in 0..2 {
        limiter.check("t", "victim", 1).await.unwrap();
    }
    assert_eq!(limiter.round_trips(), 2);
    let aim = |key: &str| fnv1a(key.as_bytes()) % 16;
    let flood: Vec<String> = (0..)
        .map(|n| format!("flood-{n}"))
        .filter(|key| aim(key) == aim("victim"))
        .take(MAX_KEYS / 8)
        .collect();
    for key in &flood {
        limiter.check("t", key, 1).await.unwrap();
    }
    let before = limiter.round_trips();
    assert_eq!(before, 2 + flood.len() as u64);
    limiter.check("t", "victim", 1).await.unwrap();
    assert_eq!(
        limiter.round_trips(),
        before,
        "the victim's reserved unit was dropped by the flood"
    );
}

/// A store that is down: every call fails at once.
#[derive(Clone, Debug)]
struct DownStore;

impl RateStore for DownStore {
    async fn apply_all(&self, _: &[(Key, Gcra)], _: u32) -> Result<RateDecision, BackendError> {
        Err(BackendError::new(BackendErrorKind::Connection))
    }
}

/// A store that never answers, counting calls.
#[derive(Clone, Debug, Default)]
struct StalledStore {
    calls: Arc<AtomicU32>,
}

impl RateStore for StalledStore {
    fn apply_all(
        &self,
        _: &[(Key, Gcra)],
        _: u32,
    ) -> impl Future<Output = Result<RateDecision, BackendError>> + Send {
        self.calls.fetch_add(1, Ordering::Relaxed);
        std::future::pending()
    }
}

/// A memory store that counts its calls, answers each after `latency`, fails while `down` is
/// set, and while `misconfigured` is set refuses every call at once as a configuration error
/// (as a store refuses a quota it cannot hold, without reaching its server).
#[derive(Clone, Debug)]
struct FlakyStore {
    inner: MemoryRateStore,
    calls: Arc<AtomicU32>,
    down: Arc<AtomicBool>,
    misconfigured: Arc<AtomicBool>,
    latency: Duration,
}

impl FlakyStore {
    fn new(latency: Duration) -> Self {
        Self {
            inner: MemoryRateStore::new(),
            calls: Arc::default(),
            down: Arc::default(),
            misconfigured: Arc::default(),
            latency,
        }
    }

    fn calls(&self) -> u32 {
        self.calls.load(Ordering::Relaxed)
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }
}

impl RateStore for FlakyStore {
    async fn apply_all(
        &self,
        cells: &[(Key, Gcra)],
        cost: u32,
    ) -> Result<RateDecision, BackendError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if self.misconfigured.load(Ordering::Relaxed) {
            return Err(BackendError::new(BackendErrorKind::Config));
        }
        tokio::time::sleep(self.latency).await;
        if self.down.load(Ordering::Relaxed) {
            return Err(BackendError::new(BackendErrorKind::Connection));
        }
        self.inner.apply_all(cells, cost).await
    }
}

/// A limiter on `store` (on tokio's clock) that fails open for one second after a failure.
fn recovering_limiter(store: FlakyStore) -> DistributedRateLimiter<FlakyStore> {
    DistributedRateLimiter::builder(
        "api",
        store,
        unique_namespace("rate"),
        TierConfig::new().tier("t", Quota::per_minute(1000).unwrap()),
    )
    .fallback(Fallback::Open)
    .timeout(Duration::from_millis(100))
    .retry_after_failure(Duration::from_secs(1))
    .build()
    .unwrap()
}

/// Sends `n` checks at once, each for its own key; returns how many were admitted.
async fn concurrent_checks<S: RateStore>(limiter: &DistributedRateLimiter<S>, n: usize) -> usize {
    let keys: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
    futures_util::future::join_all(keys.iter().map(|key| limiter.check("t", key, 1)))
        .await
        .iter()
        .filter(|result| result.is_ok())
        .count()
}

/// When the failure window ends, one request probes the store; the others arriving while the
/// probe is out keep the fallback, so a recovering store sees one call, not a herd.
#[tokio::test(start_paused = true)]
async fn after_the_failure_window_one_probe_goes_out_and_the_rest_keep_the_fallback() {
    let store = FlakyStore::new(Duration::from_millis(10));
    let limiter = recovering_limiter(store.clone());
    store.set_down(true);
    limiter.check("t", "k", 1).await.unwrap();
    assert_eq!((store.calls(), limiter.fallback_decisions()), (1, 1));

    store.set_down(false);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(concurrent_checks(&limiter, 16).await, 16);
    assert_eq!(store.calls(), 2, "one probe, not one call per request");
    assert_eq!(limiter.fallback_decisions(), 1 + 15);

    // The probe was answered: requests go to the store again, concurrently.
    assert_eq!(concurrent_checks(&limiter, 4).await, 4);
    assert_eq!((store.calls(), limiter.fallback_decisions()), (6, 16));
}

/// A probe the store refuses as a configuration error, without reaching its server, says
/// nothing of the store's health: the next request probes, and the others keep the fallback.
#[tokio::test(start_paused = true)]
async fn a_probe_refused_as_a_configuration_error_leaves_the_outage_on() {
    let store = FlakyStore::new(Duration::from_millis(10));
    let limiter = recovering_limiter(store.clone());
    store.set_down(true);
    limiter.check("t", "k", 1).await.unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    store.misconfigured.store(true, Ordering::Relaxed);
    let refused = limiter.check("t", "k", 1).await.unwrap_err();
    assert_eq!(refused.kind(), RateErrorKind::StoreConfig, "{refused:?}");
    store.misconfigured.store(false, Ordering::Relaxed);
    assert_eq!(store.calls(), 2);
    assert_eq!(concurrent_checks(&limiter, 16).await, 16);
    assert_eq!(store.calls(), 3, "one probe, not one call per request");
}

/// A probe the store fails keeps every request on the fallback for another whole window, with
/// one probe at its end.
#[tokio::test(start_paused = true)]
async fn a_failed_probe_keeps_the_fallback_for_another_window() {
    let store = FlakyStore::new(Duration::from_millis(10));
    let limiter = recovering_limiter(store.clone());
    store.set_down(true);
    limiter.check("t", "k", 1).await.unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(concurrent_checks(&limiter, 8).await, 8);
    assert_eq!(store.calls(), 2);

    // The probe failed 10 ms into it: the next window ends a second after that.
    tokio::time::advance(Duration::from_millis(999)).await;
    assert_eq!(concurrent_checks(&limiter, 8).await, 8);
    assert_eq!(store.calls(), 2);
    store.set_down(false);
    tokio::time::advance(Duration::from_millis(11)).await;
    assert_eq!(concurrent_checks(&limiter, 8).await, 8);
    assert_eq!(store.calls(), 3);
    assert_eq!(limiter.fallback_decisions(), 1 + 8 + 8 + 7);
}

/// A probe dropped before the store answers leaves no claim behind: the next request probes.
#[tokio::test(start_paused = true)]
async fn a_dropped_probe_lets_the_next_request_probe() {
    let store = FlakyStore::new(Duration::from_millis(10));
    let limiter = recovering_limiter(store.clone());
    store.set_down(true);
    limiter.check("t", "k", 1).await.unwrap();
    store.set_down(false);
    tokio::time::advance(Duration::from_secs(1)).await;
    let probe = limiter.check("t", "k", 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(1), probe)
            .await
            .is_err()
    );
    assert_eq!(store.calls(), 2);
    limiter.check("t", "k", 1).await.unwrap();
    assert_eq!(store.calls(), 3);
    assert_eq!(limiter.fallback_decisions(), 1);
}

fn limiter_on<S: RateStore>(
    store: S,
    fallback: Fallback,
    clock: &ManualClock,
) -> DistributedRateLimiter<S> {
    DistributedRateLimiter::builder(
        "api",
        store,
        unique_namespace("rate"),
        TierConfig::new().tier("t", Quota::per_minute(40).unwrap()),
    )
    .clock(clock.clock())
    .fallback(fallback)
    .build()
    .unwrap()
}

#[tokio::test]
async fn local_fallback_enforces_this_instances_share() {
    let clock = ManualClock::new();
    let limiter = limiter_on(DownStore, Fallback::Local { instances: 4 }, &clock);
    for _ in 0..10 {
        limiter.check("t", "k", 1).await.unwrap();
    }
    let refused = limiter.check("t", "k", 1).await.unwrap_err();
    assert_eq!(
        refused.limited().unwrap().retry_after(),
        Duration::from_secs(6)
    );
    // A refusal names the configured quota, as an admission does, not the share.
    assert_eq!(
        refused.limited().unwrap().quota(),
        Quota::per_minute(40).unwrap()
    );
    assert_eq!(limiter.fallback_decisions(), 11);
    // Only the first call tried the store; the rest waited out the retry interval.
    assert_eq!(limiter.round_trips(), 1);
    clock.advance(Duration::from_secs(1));
    limiter.check("t", "other", 1).await.unwrap();
    assert_eq!(limiter.round_trips(), 2);
}

/// With fewer units a period than instances, the instances' shares still add up to the
/// quota's rate: each instance admits one unit per `instances` emission intervals, not one
/// per period. Only the burst cannot be split below one unit each, so the fleet admits at
/// most `instances` at once when the store goes away (as the `Fallback::Local` docs say).
#[tokio::test]
async fn local_fallback_shares_add_up_to_the_quota_when_instances_outnumber_its_units() {
    let clock = ManualClock::new();
    let instances = 4;
    let fleet: Vec<_> = (0..instances)
        .map(|_| {
            DistributedRateLimiter::builder(
                "sms",
                DownStore,
                unique_namespace("rate"),
                TierConfig::new().tier("t", Quota::per_minute(2).unwrap()),
            )
            .clock(clock.clock())
            .fallback(Fallback::Local { instances })
            .retry_after_failure(Duration::from_secs(3_600))
            .build()
            .unwrap()
        })
        .collect();
    let minutes = 10;
    let mut admitted = 0;
    for _ in 0..=minutes * 60 {
        for limiter in &fleet {
            if limiter.check("t", "k", 1).await.is_ok() {
                admitted += 1;
            }
        }
        clock.advance(Duration::from_secs(1));
    }
    // Two a minute, and the first instants' burst of one per instance.
    assert!(
        admitted <= 2 * minutes + u64::from(instances),
        "{admitted} admitted in {minutes} minutes"
    );
    assert!(
        admitted >= 2 * minutes,
        "{admitted} admitted in {minutes} minutes"
    );
}

/// A cost the whole quota admits but this instance's share cannot hold is still a rate
/// decision during an outage, never an error: it takes the whole share, once the share is full.
#[tokio::test]
async fn local_fallback_takes_a_cost_over_the_share_as_the_whole_share() {
    let clock = ManualClock::new();
    // 40 a minute, burst 40: each of 4 instances holds 10.
    let limiter = limiter_on(DownStore, Fallback::Local { instances: 4 }, &clock);
    limiter.check("t", "k", 30).await.unwrap();
    let refused = limiter.check("t", "k", 30).await.unwrap_err();
    assert_eq!(refused.kind(), RateErrorKind::Limited);
    assert_eq!(
        refused.limited().unwrap().retry_after(),
        Duration::from_secs(60),
        "the share refills in a minute"
    );
    let too_high = limiter.check("t", "k", 41).await.unwrap_err();
    assert_eq!(
        too_high.kind(),
        RateErrorKind::CostTooHigh,
        "over the quota itself"
    );
}

#[tokio::test]
async fn fail_open_admits_and_fail_closed_refuses() {
    let clock = ManualClock::new();
    let open = limiter_on(DownStore, Fallback::Open, &clock);
    for _ in 0..100 {
        open.check("t", "k", 1).await.unwrap();
    }
    let closed = limiter_on(DownStore, Fallback::Closed, &clock);
    let refused = closed.check("t", "k", 1).await.unwrap_err();
    assert_eq!(refused.kind(), RateErrorKind::Unavailable);
    assert!(refused.is_rejected());
    let source = std::error::Error::source(&refused).unwrap();
    assert_eq!(
        source.downcast_ref::<BackendError>().unwrap().kind(),
        BackendErrorKind::Connection
    );
}

#[tokio::test(start_paused = true)]
async fn a_store_that_does_not_answer_times_out_into_the_fallback() {
    let store = StalledStore::default();
    let limiter = DistributedRateLimiter::builder(
        "api",
        store.clone(),
        unique_namespace("rate"),
        TierConfig::new().tier("t", Quota::per_minute(40).unwrap()),
    )
    .timeout(Duration::from_millis(50))
    .fallback(Fallback::Closed)
    .build()
    .unwrap();
    let started = tokio::time::Instant::now();
    let refused = limiter.check("t", "k", 1).await.unwrap_err();
    assert_eq!(refused.kind(), RateErrorKind::Unavailable);
    assert_eq!(started.elapsed(), Duration::from_millis(50));
    assert_eq!(store.calls.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_check_leaves_the_limiter_usable() {
    let clock = ManualClock::new();
    let store = StalledStore::default();
    let limiter = limiter_on(store.clone(), Fallback::Open, &clock);
    let check = limiter.check("t", "k", 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(1), check)
            .await
            .is_err()
    );
    // The cancelled call left no reservation or lock behind: the next call reaches the store.
    let again = limiter.check("t", "k", 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(1), again)
            .await
            .is_err()
    );
    assert_eq!(store.calls.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn costs_and_keys_that_cannot_fit_are_typed_errors() {
    let clock = ManualClock::new();
    let limiter = limiter_on(MemoryRateStore::new(), Fallback::Closed, &clock);
    let too_big = limiter.check("t", "k", 41).await.unwrap_err();
    assert_eq!(too_big.kind(), RateErrorKind::CostTooHigh);
    let long = "x".repeat(Key::MAX_LEN + 1);
    assert_eq!(
        limiter.check("t", &long, 1).await.unwrap_err().kind(),
        RateErrorKind::InvalidKey
    );
    assert_eq!(
        limiter.check("nope", "k", 1).await.unwrap_err().kind(),
        RateErrorKind::UnknownTier
    );
    assert_eq!(limiter.round_trips(), 0);
}

/// A zero `timeout` would count every store call not ready at its first poll as an outage, and
/// a zero `retry_after_failure` would leave no window in which the fallback spares the store:
/// both are refused, naming the field, from the builder and from a loaded configuration.
#[test]
fn a_zero_timeout_or_retry_after_failure_is_a_typed_error() {
    let builder = || {
        DistributedRateLimiter::builder(
            "zero",
            MemoryRateStore::new(),
            Namespace::new("rate").unwrap(),
            tiers(),
        )
    };
    let zero_timeout = builder().timeout(Duration::ZERO).build().unwrap_err();
    assert_eq!(zero_timeout.field(), "timeout");
    assert!(!zero_timeout.is_retryable());
    let zero_window = builder()
        .retry_after_failure(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(zero_window.field(), "retry_after_failure");
    let config = DistributedConfig {
        tiers: tiers(),
        timeout: Duration::ZERO,
        ..DistributedConfig::default()
    };
    let from_config = DistributedRateLimiter::builder_from(
        "zero",
        MemoryRateStore::new(),
        Namespace::new("rate").unwrap(),
        config,
    )
    .build()
    .unwrap_err();
    assert_eq!(from_config.field(), "timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_switches_to_the_local_fallback_without_hanging() {
    let server = RedisServer::start();
    let store = redis_store(
        RedisConfig::standalone(server.url()).with_command_timeout(Duration::from_millis(200)),
    )
    .await;
    let limiter = DistributedRateLimiter::builder(
        "api",
        store,
        unique_namespace("rate"),
        TierConfig::new().tier("t", Quota::per_hour(40).unwrap()),
    )
    .fallback(Fallback::Local { instances: 4 })
    .timeout(Duration::from_millis(300))
    .retry_after_failure(Duration::from_millis(100))
    .build()
    .unwrap();
    for _ in 0..5 {
        limiter.check("t", "k", 1).await.unwrap();
    }
    assert_eq!(limiter.fallback_decisions(), 0);

    server.kill();
    let run = async {
        let mut admitted = 0;
        for _ in 0..30 {
            if limiter.check("t", "k", 1).await.is_ok() {
                admitted += 1;
            }
        }
        admitted
    };
    let admitted = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("checks must not hang while Redis is down");
    // The local share of 40 an hour over 4 instances is a burst of 10.
    assert_eq!(admitted, 10);
    assert_eq!(limiter.fallback_decisions(), 30);
}

#[tokio::test]
async fn refusals_are_remembered_exactly_until_their_retry_after() {
    let clock = ManualClock::new();
    let limiter = DistributedRateLimiter::builder(
        "api",
        MemoryRateStore::with_limits(clock.clock(), 1000),
        unique_namespace("rate"),
        TierConfig::new().tier("t", Quota::per_second(10).unwrap().with_burst(5).unwrap()),
    )
    .clock(clock.clock())
    .build()
    .unwrap();
    for _ in 0..5 {
        limiter.check("t", "k", 1).await.unwrap();
    }
    let retry = |error: headroom_limit::rate::RateError| error.limited().unwrap().retry_after();
    assert_eq!(
        retry(limiter.check("t", "k", 1).await.unwrap_err()),
        Duration::from_millis(100)
    );
    assert_eq!(limiter.round_trips(), 6);
    clock.advance(Duration::from_millis(40));
    assert_eq!(
        retry(limiter.check("t", "k", 1).await.unwrap_err()),
        Duration::from_millis(60)
    );
    assert_eq!(
        retry(limiter.check("t", "k", 3).await.unwrap_err()),
        Duration::from_millis(260)
    );
    assert_eq!(limiter.round_trips(), 6);
    clock.advance(Duration::from_millis(60));
    limiter.check("t", "k", 1).await.unwrap();
    assert_eq!(limiter.round_trips(), 7);
}

/// A refused cost of several units waits exactly until they fit, also when a single unit
/// would fit at once.
#[tokio::test]
async fn a_refused_cost_waits_exactly_for_its_own_units() {
    let clock = ManualClock::new();
    let limiter = DistributedRateLimiter::builder(
        "api",
        MemoryRateStore::with_limits(clock.clock(), 1000),
        unique_namespace("rate"),
        TierConfig::new().tier("t", Quota::per_second(10).unwrap().with_burst(3).unwrap()),
    )
    .clock(clock.clock())
    .build()
    .unwrap();
    limiter.check("t", "k", 1).await.unwrap();
    // Two units are left: three fit in one interval.
    let refused = limiter.check("t", "k", 3).await.unwrap_err();
    assert_eq!(
        refused.limited().unwrap().retry_after(),
        Duration::from_millis(100)
    );
    // The refusal said nothing against a single unit.
    limiter.check("t", "k", 1).await.unwrap();
}

mod batched_bound {
    use futures_util::FutureExt;
    use proptest::prelude::*;

    use super::*;

    const BATCH: u32 = 4;
    const INTERVAL_MS: u64 = 100;
    const BURST: u64 = 5;

    proptest! {
        /// Three batched instances on one store, random interleavings and gaps on a manual
        /// clock: in every window, they admit at most `BATCH` more than GCRA allows one exact
        /// limiter (`burst + window / interval`). Without the slack the test fails: batching
        /// does shift admissions.
        #[test]
        fn batched_instances_admit_at_most_a_batch_more_in_any_window(
            ops in prop::collection::vec((0..3usize, 0..120u64), 1..150)
        ) {
            let clock = ManualClock::new();
            let store = MemoryRateStore::with_limits(clock.clock(), 100);
            let namespace = unique_namespace("rate");
            let quota = Quota::per_second(10).unwrap().with_burst(BURST as u32).unwrap();
            let instances: Vec<_> = (0..3)
                .map(|i| {
                    DistributedRateLimiter::builder(
                        format!("i{i}"),
                        store.clone(),
                        namespace.clone(),
                        TierConfig::new().tier("t", quota),
                    )
                    .clock(clock.clock())
                    .batch(BATCH)
                    .build()
                    .unwrap()
                })
                .collect();
            let mut now_ms = 0;
            let mut admitted_at = Vec::new();
            for (instance, advance_ms) in ops {
                clock.advance(Duration::from_millis(advance_ms));
                now_ms += advance_ms;
                let decision = instances[instance]
                    .check("t", "k", 1)
                    .now_or_never()
                    .expect("the memory store answers at once");
                match decision {
                    Ok(_) => admitted_at.push(now_ms),
                    Err(error) => prop_assert_eq!(error.kind(), RateErrorKind::Limited),
                }
            }
            for (i, &start) in admitted_at.iter().enumerate() {
                for (j, &end) in admitted_at.iter().enumerate().skip(i) {
                    let in_window = (j - i + 1) as u64;
                    let exact = BURST + (end - start) / INTERVAL_MS;
                    prop_assert!(
                        in_window <= exact + u64::from(BATCH),
                        "{} admitted in [{}, {}] ms, exact allows {}",
                        in_window, start, end, exact
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn a_quota_the_store_cannot_hold_is_a_typed_error_with_the_store_error_as_source() {
    let store = redis_store(RedisConfig::standalone(shared_server().url())).await;
    // Redis keeps microseconds: ten million a second is an interval of 100 ns.
    let limiter = DistributedRateLimiter::builder(
        "api",
        store,
        unique_namespace("rate"),
        TierConfig::new().tier("t", Quota::per_second(10_000_000).unwrap()),
    )
    .fallback(Fallback::Open)
    .build()
    .unwrap();
    let error = limiter.check("t", "k", 1).await.unwrap_err();
    assert_eq!(error.kind(), RateErrorKind::StoreConfig);
    assert!(!error.is_retryable() && !error.is_rejected());
    let source = std::error::Error::source(&error).unwrap();
    assert_eq!(
        source.downcast_ref::<BackendError>().unwrap().kind(),
        BackendErrorKind::Config
    );
    assert_eq!(limiter.fallback_decisions(), 0);
}

/// Four instances saturating one key, in exact mode or batched: returns the units admitted and
/// the store round trips made over one simulated second.
async fn saturated(batch: u32) -> (u32, u64) {
    let clock = ManualClock::new();
    let store = MemoryRateStore::with_limits(clock.clock(), 1000);
    let namespace = unique_namespace("rate");
    let limiters: Vec<_> = (0..4)
        .map(|_| {
            on_manual_clock(
                &store,
                &namespace,
                &clock,
                Quota::per_second(100).unwrap(),
                batch,
            )
        })
        .collect();
    let mut admitted = 0;
    for _ in 0..1_000 {
        for limiter in &limiters {
            for _ in 0..5 {
                admitted += u32::from(limiter.check("t", "k", 1).await.is_ok());
            }
        }
        clock.advance(Duration::from_millis(1));
    }
    (admitted, limiters.iter().map(|l| l.round_trips()).sum())
}

/// A key saturated far beyond its rate costs a batched limiter no more round trips than an
/// exact one: the docs promise fewer round trips for busy keys.
#[tokio::test]
async fn a_saturated_key_costs_batched_instances_no_more_round_trips_than_exact_ones() {
    let (exact_admitted, exact) = saturated(1).await;
    let (batched_admitted, batched) = saturated(10).await;
    println!(
        "exact: {exact_admitted} admitted, {exact} round trips; batched: {batched_admitted} admitted, {batched} round trips"
    );
    assert!(
        batched <= exact,
        "batched {batched} round trips against exact {exact}"
    );
    assert!(
        batched_admitted.abs_diff(exact_admitted) <= 10,
        "batched admitted {batched_admitted}, exact {exact_admitted}: more than a batch apart"
    );
}

/// How long an instance answers a refusal itself before it asks the store again, whatever the
/// wait (docs/rate-limits.md, "Exact mode").
const REFUSAL_MEMORY: Duration = Duration::from_secs(1);

/// A limiter on the shared Redis, on `clock`, with one tier `t` of `quota`.
async fn on_redis(
    namespace: &Namespace,
    clock: &ManualClock,
    quota: Quota,
    batch: u32,
) -> DistributedRateLimiter<RedisRateStore> {
    let store = redis_store(RedisConfig::standalone(shared_server().url())).await;
    DistributedRateLimiter::builder(
        "api",
        store,
        namespace.clone(),
        TierConfig::new().tier("t", quota),
    )
    .clock(clock.clock())
    .batch(batch)
    .build()
    .unwrap()
}

/// The one store cell a tier of one quota keeps under `namespace` (with a key checked).
fn only_cell(namespace: &Namespace) -> String {
    let pattern = format!("{}:*", namespace.as_str());
    let keys = shared_server().cli(&["KEYS", &pattern]);
    let keys: Vec<&str> = keys.lines().filter(|line| !line.is_empty()).collect();
    assert_eq!(keys.len(), 1, "cells under {pattern}: {keys:?}");
    keys[0].to_owned()
}

/// A cell holding an absurd time refuses with a wait of centuries; once it is deleted, an
/// instance that remembered the refusal asks the store again within the documented bound
/// and is admitted, though the wait it remembered saturates the instance's clock.
#[tokio::test]
async fn a_refusal_from_an_absurd_cell_is_forgotten_once_the_cell_is_deleted() {
    let clock = ManualClock::new();
    let namespace = unique_namespace("rate");
    let limiter = on_redis(&namespace, &clock, Quota::per_second(10).unwrap(), 1).await;
    limiter.check("t", "k", 1).await.unwrap();
    let cell = only_cell(&namespace);
    shared_server().cli(&["SET", &cell, "1e300"]);
    let refused = limiter.check("t", "k", 1).await.unwrap_err();
    assert!(refused.limited().unwrap().retry_after() > Duration::from_secs(3_600 * 24 * 365));
    // Refused again at once without a round trip: the memory still spares the store.
    assert_eq!(
        limiter.check("t", "k", 1).await.unwrap_err().kind(),
        RateErrorKind::Limited
    );
    assert_eq!(limiter.round_trips(), 2);

    shared_server().cli(&["DEL", &cell]);
    clock.advance(REFUSAL_MEMORY);
    let admitted = limiter.check("t", "k", 1).await;
    assert!(
        admitted.is_ok(),
        "still refused after the cell was deleted: {admitted:?}"
    );
    assert_eq!(limiter.round_trips(), 3);
}

/// A key of one an hour reset with DEL (support, a Redis restart without persistence, a
/// failover that lost the write) is admitted again by an instance that refused it within the
/// bound, not an hour later.
#[tokio::test]
async fn a_deleted_cell_of_an_hourly_quota_admits_again_within_the_bound() {
    let clock = ManualClock::new();
    let namespace = unique_namespace("rate");
    let limiter = on_redis(&namespace, &clock, Quota::per_hour(1).unwrap(), 1).await;
    limiter.check("t", "k", 1).await.unwrap();
    let refused = limiter.check("t", "k", 1).await.unwrap_err();
    assert!(refused.limited().unwrap().retry_after() > Duration::from_secs(3_500));
    // Within the bound the refusal is answered here, with the wait that is left.
    clock.advance(Duration::from_millis(400));
    let remembered = limiter.check("t", "k", 1).await.unwrap_err();
    assert_eq!(
        refused.limited().unwrap().retry_after() - remembered.limited().unwrap().retry_after(),
        Duration::from_millis(400)
    );
    assert_eq!(limiter.round_trips(), 2);

    shared_server().cli(&["DEL", &only_cell(&namespace)]);
    clock.advance(REFUSAL_MEMORY);
    let admitted = limiter.check("t", "k", 1).await;
    assert!(
        admitted.is_ok(),
        "still refused after the cell was deleted: {admitted:?}"
    );
    assert_eq!(limiter.round_trips(), 3);
}

/// Past the bound a key the store still refuses is asked about once, and the fresh refusal is
/// remembered for another bound: a refused flood costs one round trip per bound.
#[tokio::test]
async fn a_key_still_refused_past_the_bound_costs_one_round_trip_per_bound() {
    let clock = ManualClock::new();
    let namespace = unique_namespace("rate");
    let limiter = on_redis(&namespace, &clock, Quota::per_hour(1).unwrap(), 1).await;
    limiter.check("t", "k", 1).await.unwrap();
    for _ in 0..3 {
        for _ in 0..10 {
            let refused = limiter.check("t", "k", 1).await.unwrap_err();
            assert_eq!(refused.kind(), RateErrorKind::Limited);
        }
        clock.advance(REFUSAL_MEMORY);
    }
    assert_eq!(limiter.round_trips(), 1 + 3);
}

/// Past the bound, the requests that come while one asks the store again are answered by the
/// refusal it remembers: a key hammered by concurrent callers costs one round trip a second
/// too, not one per caller that arrives during the round trip.
#[tokio::test]
async fn concurrent_requests_past_the_bound_ask_the_store_once() {
    let clock = ManualClock::new();
    let namespace = unique_namespace("rate");
    let limiter = on_redis(&namespace, &clock, Quota::per_hour(1).unwrap(), 1).await;
    limiter.check("t", "k", 1).await.unwrap();
    limiter.check("t", "k", 1).await.unwrap_err();
    for _ in 0..3 {
        clock.advance(REFUSAL_MEMORY);
        let before = limiter.round_trips();
        let at_once =
            futures_util::future::join_all((0..20).map(|_| limiter.check("t", "k", 1))).await;
        assert!(at_once.iter().all(|refused| {
            refused
                .as_ref()
                .is_err_and(|refused| refused.kind() == RateErrorKind::Limited)
        }));
        assert_eq!(
            limiter.round_trips() - before,
            1,
            "round trips for 20 at once"
        );
    }
}

/// A batched instance that was refused by an absurd cell stops treating the key as saturated
/// once the store admits it again: it batches again, fewer round trips than requests.
#[tokio::test]
async fn a_batched_instance_batches_again_once_a_deleted_absurd_cell_admits() {
    let clock = ManualClock::new();
    let namespace = unique_namespace("rate");
    let limiter = on_redis(&namespace, &clock, Quota::per_second(10).unwrap(), 4).await;
    limiter.check("t", "k", 1).await.unwrap();
    let cell = only_cell(&namespace);
    shared_server().cli(&["SET", &cell, "1e300"]);
    limiter.check("t", "k", 1).await.unwrap_err();
    shared_server().cli(&["DEL", &cell]);
    clock.advance(REFUSAL_MEMORY);
    let before = limiter.round_trips();
    for _ in 0..7 {
        limiter.check("t", "k", 1).await.unwrap();
    }
    // Batches of 1, 2 and 4 hold the seven.
    assert_eq!(limiter.round_trips() - before, 3);
}

/// Failing closed, every refusal of an outage carries the store's error as its source, not
/// only the one whose call failed: the requests that keep the fallback meanwhile too.
#[tokio::test]
async fn every_refusal_while_failing_closed_carries_the_store_error() {
    let server = RedisServer::start();
    let store = redis_store(
        RedisConfig::standalone(server.url()).with_command_timeout(Duration::from_millis(200)),
    )
    .await;
    // On a manual clock the failure window never ends by itself: the second check keeps the
    // fallback without calling the store.
    let clock = ManualClock::new();
    let limiter = limiter_on(store, Fallback::Closed, &clock);
    server.kill();
    let mut kinds = Vec::new();
    for key in ["a", "b"] {
        let refused = limiter.check("t", key, 1).await.unwrap_err();
        assert_eq!(refused.kind(), RateErrorKind::Unavailable);
        let source = std::error::Error::source(&refused)
            .unwrap_or_else(|| panic!("the refusal of {key:?} has no source"));
        kinds.push(source.downcast_ref::<BackendError>().unwrap().kind());
    }
    assert_eq!(limiter.round_trips(), 1);
    assert_eq!(kinds[0], kinds[1]);
}
