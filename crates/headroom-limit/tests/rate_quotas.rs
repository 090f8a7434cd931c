//! Tiers of several quotas ("10 a second and 1,000 a day"), as `Quotas` documents them: a
//! request is admitted only if every quota admits it, a refused request is charged to none of
//! them, and a refusal waits for the slowest of the quotas that refuse. Checked in process and
//! across instances (the memory store, a real Redis and a real Redis Cluster) against a model
//! built from that meaning and from GCRA as `headroom_core::rate::Gcra` documents it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use headroom_core::memory::MemoryRateStore;
use headroom_core::rate::RateStore;
use headroom_core::{Key, ManualClock, Namespace};
use headroom_limit::rate::{
    Admitted, DistributedRateLimiter, LocalRateLimiter, Quota, Quotas, RateError, RateErrorKind,
    RateLimit, TierConfig,
};
use headroom_redis::{Redis, RedisConfig, RedisRateStore};
use headroom_testkit::{shared_cluster, shared_server, unique_namespace};
use proptest::prelude::*;

const MS: Duration = Duration::from_millis(1);

/// Bursts of 3 at 10 a second, and at most 2 a second sustained (bursts of 6): the first binds
/// a burst, the second a busy key.
fn short_and_long() -> Quotas {
    Quotas::new([
        Quota::per_second(10).unwrap().with_burst(3).unwrap(),
        Quota::new(6, Duration::from_secs(3)).unwrap(),
    ])
    .unwrap()
}

/// GCRA per quota and key, from its documented definition: a cell holds its theoretical
/// arrival time `tat`; cost `n` at `now` is admitted if `max(tat, now) + n × interval −
/// burst × interval ≤ now`, which then becomes the new `tat`.
struct Model {
    quotas: Vec<Quota>,
    tats: HashMap<u8, Vec<u128>>,
}

/// What the model says of one request.
#[derive(Debug)]
enum Expected {
    /// Units left per quota.
    Admitted {
        remaining: Vec<u128>,
        to_full: Vec<u128>,
    },
    /// The wait of each quota (zero for those that admit).
    Refused {
        waits: Vec<u128>,
    },
    TooCostly,
}

impl Model {
    fn new(quotas: &Quotas) -> Self {
        Self {
            quotas: quotas.as_slice().to_vec(),
            tats: HashMap::new(),
        }
    }

    fn check(&mut self, key: u8, now: u128, cost: u32) -> Expected {
        if self.quotas.iter().any(|quota| cost > quota.burst()) {
            return Expected::TooCostly;
        }
        let tats = self
            .tats
            .entry(key)
            .or_insert_with(|| vec![0; self.quotas.len()]);
        let params: Vec<(u128, u128)> = self
            .quotas
            .iter()
            .map(|q| {
                let interval = q.emission_interval().as_nanos();
                (interval, interval * u128::from(q.burst()))
            })
            .collect();
        let new_tats: Vec<u128> = tats
            .iter()
            .zip(&params)
            .map(|(&tat, &(interval, _))| tat.max(now) + u128::from(cost) * interval)
            .collect();
        let waits: Vec<u128> = new_tats
            .iter()
            .zip(&params)
            .map(|(&new_tat, &(_, tolerance))| {
                new_tat.saturating_sub(tolerance).saturating_sub(now)
            })
            .collect();
        // Admitted only if each quota admits; otherwise nothing changes.
        if waits.iter().any(|&wait| wait > 0) {
            return Expected::Refused { waits };
        }
        *tats = new_tats;
        Expected::Admitted {
            remaining: tats
                .iter()
                .zip(&params)
                .map(|(&tat, &(interval, tolerance))| (now + tolerance - tat) / interval)
                .collect(),
            to_full: tats.iter().map(|&tat| tat - now).collect(),
        }
    }
}

/// Checks one decision against the model's expectation: the same outcome, and the figures
/// that bind (the fewest units left and the quota holding them; the longest wait and a quota
/// waiting that long). `exact_wait` is false for a refusal an instance answers from its
/// memory of an earlier one, which names one refusing quota and its wait.
fn assert_matches(
    quotas: &Quotas,
    got: Result<Admitted, RateError>,
    expected: &Expected,
    exact_wait: bool,
) -> Result<(), TestCaseError> {
    match (got, expected) {
        (Ok(admitted), Expected::Admitted { remaining, to_full }) => {
            let fewest = *remaining.iter().min().unwrap();
            prop_assert_eq!(u128::from(admitted.remaining()), fewest);
            let holders: Vec<Quota> = quotas
                .iter()
                .zip(remaining)
                .filter(|&(_, &left)| left == fewest)
                .map(|(quota, _)| quota)
                .collect();
            prop_assert!(holders.contains(&admitted.quota()), "{:?}", admitted);
            prop_assert_eq!(
                admitted.reset_after().as_nanos(),
                *to_full.iter().max().unwrap()
            );
        }
        (Err(error), Expected::Refused { waits }) => {
            prop_assert_eq!(error.kind(), RateErrorKind::Limited);
            let limited = *error.limited().unwrap();
            let named = quotas.iter().position(|q| q == limited.quota()).unwrap();
            prop_assert!(waits[named] > 0, "{:?} names a quota that admits", limited);
            let longest = *waits.iter().max().unwrap();
            let got = limited.retry_after().as_nanos();
            if exact_wait {
                prop_assert_eq!(got, longest);
                prop_assert_eq!(waits[named], longest);
            } else {
                prop_assert!(got >= waits[named] && got <= longest, "{} {:?}", got, waits);
            }
        }
        (Err(error), Expected::TooCostly) => {
            prop_assert_eq!(error.kind(), RateErrorKind::CostTooHigh);
        }
        (got, expected) => prop_assert!(false, "got {:?}, the model says {:?}", got, expected),
    }
    Ok(())
}

#[derive(Clone, Debug)]
enum Op {
    Advance(u64),
    Check { key: u8, cost: u32 },
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            (0..400u64).prop_map(Op::Advance),
            // Costs up to 4: one more than the smallest burst, a typed error.
            (0..3u8, 1..=4u32).prop_map(|(key, cost)| Op::Check { key, cost }),
        ],
        1..200,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// In process: every decision is the model's, to the nanosecond.
    #[test]
    fn local_tiers_admit_iff_each_quota_would(ops in ops()) {
        let clock = ManualClock::new();
        let quotas = short_and_long();
        let limiter = LocalRateLimiter::builder("api", TierConfig::new().tier("t", quotas.clone()))
            .clock(clock.clock())
            .build()
            .unwrap();
        let mut model = Model::new(&quotas);
        let mut now = 0u128;
        for op in ops {
            match op {
                Op::Advance(ms) => {
                    clock.advance(Duration::from_millis(ms));
                    now += u128::from(ms) * 1_000_000;
                }
                Op::Check { key, cost } => {
                    let got = limiter.check_now("t", &key.to_string(), cost);
                    assert_matches(&quotas, got, &model.check(key, now, cost), true)?;
                }
            }
        }
    }

    /// Across instances (exact mode, one store): the same admissions, and the store's
    /// refusals wait for the slowest quota. A refusal remembered by the instance names the
    /// quota that refused and its wait.
    #[test]
    fn distributed_tiers_admit_iff_each_quota_would(ops in ops()) {
        let clock = ManualClock::new();
        let quotas = short_and_long();
        let limiter = DistributedRateLimiter::builder(
            "api",
            MemoryRateStore::with_limits(clock.clock(), 1000),
            unique_namespace("rate"),
            TierConfig::new().tier("t", quotas.clone()),
        )
        .clock(clock.clock())
        .build()
        .unwrap();
        let mut model = Model::new(&quotas);
        let mut now = 0u128;
        for op in ops {
            match op {
                Op::Advance(ms) => {
                    clock.advance(Duration::from_millis(ms));
                    now += u128::from(ms) * 1_000_000;
                }
                Op::Check { key, cost } => {
                    let round_trips = limiter.round_trips();
                    let got = limiter
                        .check("t", &key.to_string(), cost)
                        .now_or_never()
                        .expect("the memory store answers at once");
                    let asked = limiter.round_trips() > round_trips;
                    assert_matches(&quotas, got, &model.check(key, now, cost), asked)?;
                }
            }
        }
        prop_assert_eq!(limiter.fallback_decisions(), 0);
    }
}

/// Ten a second in bursts of ten, and thirty an hour: the hourly quota runs out first over
/// a few seconds, however many requests the other refuses meanwhile.
fn second_and_hour() -> Quotas {
    Quotas::new([Quota::per_second(10).unwrap(), Quota::per_hour(30).unwrap()]).unwrap()
}

#[test]
fn refused_requests_are_charged_to_no_quota_in_process() {
    let clock = ManualClock::new();
    let limiter = LocalRateLimiter::builder("api", TierConfig::new().tier("t", second_and_hour()))
        .clock(clock.clock())
        .build()
        .unwrap();
    // Four threads, 100 requests each: ten get through, 390 are refused by the first quota.
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let limiter = limiter.clone();
            std::thread::spawn(move || {
                (0..100)
                    .filter(|_| limiter.check_now("t", "k", 1).is_ok())
                    .count()
            })
        })
        .collect();
    let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(admitted, 10);
    // Had the refusals been charged to the hourly quota, it would be empty: it has 20 left.
    clock.advance(Duration::from_secs(1));
    let admitted = limiter.check_now("t", "k", 10).unwrap();
    assert_eq!(admitted.remaining(), 0);
    clock.advance(Duration::from_secs(1));
    let admitted = limiter.check_now("t", "k", 10).unwrap();
    assert_eq!(
        (admitted.remaining(), admitted.quota()),
        (0, Quota::per_second(10).unwrap())
    );
    // Now the hourly quota is spent: one unit is back two minutes after its first charge.
    clock.advance(Duration::from_secs(1));
    let refused = limiter.check_now("t", "k", 1).unwrap_err();
    let limited = refused.limited().unwrap();
    assert_eq!(limited.quota(), Quota::per_hour(30).unwrap());
    assert_eq!(limited.retry_after(), Duration::from_secs(117));
}

#[tokio::test(start_paused = true)]
async fn acquire_on_a_tier_of_several_quotas_waits_for_the_slowest() {
    let limiter = LocalRateLimiter::builder(
        "api",
        TierConfig::new().tier(
            "t",
            Quotas::new([
                Quota::per_second(10).unwrap().with_burst(1).unwrap(),
                Quota::per_second(2).unwrap().with_burst(1).unwrap(),
            ])
            .unwrap(),
        ),
    )
    .build()
    .unwrap();
    limiter.check("t", "k", 1).await.unwrap();
    // The first quota is back in 100 ms, the second in 500 ms: the permit is 500 ms away.
    let refused = limiter.acquire("t", "k", 1, 400 * MS).await.unwrap_err();
    assert_eq!(
        refused.limited().unwrap().retry_after(),
        Duration::from_millis(500)
    );
    let started = tokio::time::Instant::now();
    limiter.acquire("t", "k", 1, 500 * MS).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_millis(500));
}

/// Four instances on one store, a tier of a wide quota (200 an hour) and a narrow one (50 an
/// hour): exactly the narrow burst gets through, and the wide cell is charged for those
/// alone, which a limiter keeping only the wide quota under the same names sees.
async fn four_instances_charge_every_quota_or_none<S: RateStore + Clone>(store: S) {
    let namespace = unique_namespace("rate");
    let wide = Quota::per_hour(200).unwrap();
    let narrow = Quota::per_hour(50).unwrap();
    let tiers = TierConfig::new().tier("t", Quotas::new([wide, narrow]).unwrap());
    let limiters: Vec<_> = (0..4)
        .map(|i| {
            DistributedRateLimiter::builder(
                format!("instance-{i}"),
                store.clone(),
                namespace.clone(),
                tiers.clone(),
            )
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
                for _ in 0..150 {
                    match limiter.check("t", "tenant-1", 1).await {
                        Ok(_) => admitted += 1,
                        Err(error) => assert_eq!(error.kind(), RateErrorKind::Limited),
                    }
                }
                admitted
            })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        admitted += task.await.unwrap();
    }
    assert_eq!(admitted, 50);
    assert!(limiters.iter().all(|l| l.fallback_decisions() == 0));

    // The wide quota is the first of the tier: the cell a tier of it alone keeps.
    let wide_only = DistributedRateLimiter::builder(
        "reader",
        store,
        namespace,
        TierConfig::new().tier("t", wide),
    )
    .build()
    .unwrap();
    assert_eq!(
        wide_only
            .check("t", "tenant-1", 150)
            .await
            .unwrap()
            .remaining(),
        0
    );
}

async fn redis_store(config: RedisConfig) -> RedisRateStore {
    RedisRateStore::new(Redis::connect(config).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_instances_on_one_memory_store_charge_every_quota_or_none() {
    four_instances_charge_every_quota_or_none(MemoryRateStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_instances_on_one_redis_charge_every_quota_or_none() {
    four_instances_charge_every_quota_or_none(
        redis_store(RedisConfig::standalone(shared_server().url())).await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_instances_on_a_redis_cluster_charge_every_quota_or_none() {
    four_instances_charge_every_quota_or_none(
        redis_store(RedisConfig::cluster(shared_cluster().urls())).await,
    )
    .await;
}

/// A store that records the cells it is asked about.
#[derive(Clone, Debug, Default)]
struct Recording {
    inner: MemoryRateStore,
    keys: Arc<std::sync::Mutex<Vec<Key>>>,
}

impl RateStore for Recording {
    async fn apply_all(
        &self,
        cells: &[(Key, headroom_core::rate::Gcra)],
        cost: u32,
    ) -> Result<headroom_core::rate::RateDecision, headroom_core::BackendError> {
        self.keys
            .lock()
            .unwrap()
            .extend(cells.iter().map(|(key, _)| key.clone()));
        self.inner.apply_all(cells, cost).await
    }
}

/// The store's keys follow the documented layout,
/// `<namespace>:<tier>:{<tag>}:<index><quota>:<key>` with the FNV-1a hash of the key as the
/// tag and the low 32 bits of the FNV-1a hash of the quota's emission interval (nanoseconds,
/// u64 little-endian) and burst (u32 little-endian) as the quota: golden values, so every
/// instance and every version finds the same cells, and braces in a caller's key never
/// choose the slot. (10 a second: 100 ms and 10 hash to `eecf0422`; 30 an hour: 120 s and 30
/// to `c83bf43e`.)
#[tokio::test]
async fn store_keys_share_a_hash_tag_of_their_own() {
    let store = Recording::default();
    let limiter = DistributedRateLimiter::builder(
        "api",
        store.clone(),
        Namespace::new("rate").unwrap(),
        TierConfig::new().tier("t", second_and_hour()),
    )
    .build()
    .unwrap();
    limiter.check("t", "alice", 1).await.unwrap();
    limiter.check("t", "{x}", 1).await.unwrap();
    let keys = store.keys.lock().unwrap().clone();
    let keys: Vec<&[u8]> = keys.iter().map(|key| key.as_bytes()).collect();
    assert_eq!(
        keys,
        [
            &b"rate:t:{508b2abb65a03907}:0eecf0422:alice"[..],
            b"rate:t:{508b2abb65a03907}:1c83bf43e:alice",
            b"rate:t:{c724da1983ce5721}:0eecf0422:{x}",
            b"rate:t:{c724da1983ce5721}:1c83bf43e:{x}",
        ]
    );
    for key in keys {
        assert_eq!(headroom_core::slot::hash_tag(key).len(), 16);
    }
}

#[tokio::test]
async fn keys_longer_than_the_documented_limit_are_typed_errors() {
    let limiter = DistributedRateLimiter::builder(
        "api",
        MemoryRateStore::new(),
        unique_namespace("rate"),
        TierConfig::new().tier("t", second_and_hour()),
    )
    .build()
    .unwrap();
    let longest = "x".repeat(DistributedRateLimiter::<MemoryRateStore>::MAX_KEY_LEN);
    limiter.check("t", &longest, 1).await.unwrap();
    let error = limiter
        .check("t", &format!("{longest}x"), 1)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), RateErrorKind::InvalidKey);
    assert_eq!(limiter.round_trips(), 1);
}

/// In batched mode, a refusal names the quota that holds back the request's own cost and its
/// wait, as in exact mode: not the quota that would hold back the batch the limiter asked for.
/// Here the slow quota has room for one more request but not for a batch; the fast one has no
/// room at all.
#[tokio::test]
async fn a_batched_refusal_names_the_quota_that_holds_back_the_request() {
    let clock = ManualClock::new();
    let store = MemoryRateStore::builder().clock(clock.clock()).build();
    let (fast, slow) = (
        Quota::new(10, Duration::from_secs(100)).unwrap(),
        Quota::new(12, Duration::from_secs(1200)).unwrap(),
    );
    let tiers = TierConfig::new().tier("t", Quotas::new([fast, slow]).unwrap());
    let namespace = unique_namespace("rate-batched-refusal");
    let limiter = |name: &str, batch: u32| {
        DistributedRateLimiter::builder(name, store.clone(), namespace.clone(), tiers.clone())
            .clock(clock.clock())
            .batch(batch)
            .build()
            .unwrap()
    };
    let (batched, exact) = (limiter("batched", 5), limiter("exact", 1));
    let mut admitted = 0;
    let refused = loop {
        match batched.check("t", "alice", 1).await {
            Ok(_) => admitted += 1,
            Err(error) => break error,
        }
        if admitted == 7 {
            // Another instance spends what the fast quota has left.
            exact.check("t", "alice", 3).await.unwrap();
        }
        assert!(admitted <= 10, "the fast quota admits 10");
    };
    let limited = refused.limited().expect("refused by a quota");
    assert_eq!(
        (limited.quota(), limited.retry_after()),
        (fast, fast.emission_interval()),
        "after {admitted} admitted"
    );
}
