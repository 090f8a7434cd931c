//! Waiting for a permit with `RateLimit::acquire`, on tokio's paused clock: a permit due
//! within `max_wait` is waited for, one due later is refused at once with its wait, nothing is
//! reserved while waiting, and a dropped wait consumes nothing.

use std::time::Duration;

use headroom_core::memory::MemoryRateStore;
use headroom_core::rate::{Gcra, RateDecision, RateStore};
use headroom_core::{BackendError, BackendErrorKind, Key};
use headroom_limit::rate::{
    DistributedRateLimiter, Fallback, LocalRateLimiter, Quota, Quotas, RateErrorKind, RateLimit,
    TierConfig,
};
use headroom_testkit::unique_namespace;
use tokio::time::Instant;

const MS: Duration = Duration::from_millis(1);

/// One permit every 100 ms, none saved up.
fn one_per_100ms() -> Quota {
    Quota::per_second(10).unwrap().with_burst(1).unwrap()
}

fn tiers() -> TierConfig {
    TierConfig::new()
        .tier("t", one_per_100ms())
        // The same, and a second quota of one permit every 300 ms.
        .tier(
            "two",
            Quotas::new([
                one_per_100ms(),
                Quota::new(10, Duration::from_secs(3))
                    .unwrap()
                    .with_burst(1)
                    .unwrap(),
            ])
            .unwrap(),
        )
}

fn local() -> LocalRateLimiter {
    LocalRateLimiter::builder("api", tiers()).build().unwrap()
}

fn distributed() -> DistributedRateLimiter<MemoryRateStore> {
    DistributedRateLimiter::builder(
        "api",
        MemoryRateStore::new(),
        unique_namespace("rate"),
        tiers(),
    )
    .build()
    .unwrap()
}

/// A permit 100 ms away: refused at once for a caller who waits 50 ms, waited for by one who
/// waits 150 ms; with two quotas, the wait is the slower one's (300 ms).
async fn waits_for_near_permits_and_refuses_far_ones_at_once(limiter: impl RateLimit) {
    for (tier, due) in [("t", 100 * MS), ("two", 300 * MS)] {
        limiter.check(tier, "k", 1).await.unwrap();
        let started = Instant::now();
        let refused = limiter
            .acquire(tier, "k", 1, due - 50 * MS)
            .await
            .unwrap_err();
        assert_eq!(started.elapsed(), Duration::ZERO, "refused at once");
        assert_eq!(refused.kind(), RateErrorKind::Limited);
        assert_eq!(refused.limited().unwrap().retry_after(), due);

        limiter.acquire(tier, "k", 1, due + 50 * MS).await.unwrap();
        assert_eq!(started.elapsed(), due, "admitted when its permit is due");
        // That permit was spent.
        assert!(limiter.check(tier, "k", 1).await.is_err());
        tokio::time::advance(due).await;
    }
}

#[tokio::test(start_paused = true)]
async fn local_acquire_waits_for_near_permits_and_refuses_far_ones_at_once() {
    waits_for_near_permits_and_refuses_far_ones_at_once(local()).await;
}

#[tokio::test(start_paused = true)]
async fn distributed_acquire_waits_for_near_permits_and_refuses_far_ones_at_once() {
    let limiter = distributed();
    waits_for_near_permits_and_refuses_far_ones_at_once(limiter.clone()).await;
    // A wait costs no round trip: the refusal is remembered until the permit is due. Per
    // tier: the first check, the refused acquire, the admitted acquire once it woke, the last
    // check.
    assert_eq!(limiter.round_trips(), 2 * 4);
}

/// Dropping a waiting acquire gives the wait up and takes nothing: the permit it waited for
/// goes to the next caller, on every quota of the tier.
async fn a_dropped_acquire_consumes_nothing(limiter: impl RateLimit) {
    for (tier, due) in [("t", 100 * MS), ("two", 300 * MS)] {
        limiter.check(tier, "k", 1).await.unwrap();
        let waiting = limiter.acquire(tier, "k", 1, Duration::from_secs(1));
        assert!(
            tokio::time::timeout(due / 2, waiting).await.is_err(),
            "still waiting"
        );
        tokio::time::advance(due / 2).await;
        limiter.check(tier, "k", 1).await.unwrap();
        let refused = limiter.check(tier, "k", 1).await.unwrap_err();
        assert_eq!(refused.limited().unwrap().retry_after(), due);
        tokio::time::advance(due).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_local_acquire_consumes_nothing() {
    a_dropped_acquire_consumes_nothing(local()).await;
}

#[tokio::test(start_paused = true)]
async fn a_dropped_distributed_acquire_consumes_nothing() {
    let limiter = distributed();
    a_dropped_acquire_consumes_nothing(limiter.clone()).await;
    // Per tier: the first check, the acquire's first attempt (none while it waited), the two
    // checks after it was dropped.
    assert_eq!(limiter.round_trips(), 2 * 4);
}

/// Two callers waiting for one permit: nothing is reserved, so one gets it when it is due and
/// the other, whose next permit is then past its `max_wait`, is refused at that moment.
async fn waiters_race_for_a_permit_nothing_is_reserved(limiter: impl RateLimit) {
    limiter.check("t", "k", 1).await.unwrap();
    let started = Instant::now();
    let (a, b) = tokio::join!(
        limiter.acquire("t", "k", 1, 150 * MS),
        limiter.acquire("t", "k", 1, 150 * MS)
    );
    assert_eq!(started.elapsed(), 100 * MS);
    assert!(
        a.is_ok() != b.is_ok(),
        "one permit, one caller: {a:?} {b:?}"
    );
    let refused = a.err().or(b.err()).unwrap();
    assert_eq!(refused.limited().unwrap().retry_after(), 100 * MS);
}

#[tokio::test(start_paused = true)]
async fn local_waiters_race_for_a_permit_nothing_is_reserved() {
    waiters_race_for_a_permit_nothing_is_reserved(local()).await;
}

#[tokio::test(start_paused = true)]
async fn distributed_waiters_race_for_a_permit_nothing_is_reserved() {
    waiters_race_for_a_permit_nothing_is_reserved(distributed()).await;
}

/// Errors that waiting cannot cure come back at once; a `max_wait` too long to add to a
/// clock reading waits as long as it takes, without a panic.
async fn bad_requests_are_not_waited_on(limiter: impl RateLimit) {
    let started = Instant::now();
    let unknown = limiter.acquire("gold", "k", 1, Duration::from_secs(1));
    assert_eq!(
        unknown.await.unwrap_err().kind(),
        RateErrorKind::UnknownTier
    );
    let costly = limiter.acquire("t", "k", 2, Duration::from_secs(1));
    assert_eq!(costly.await.unwrap_err().kind(), RateErrorKind::CostTooHigh);
    assert_eq!(started.elapsed(), Duration::ZERO);

    limiter.check("t", "k", 1).await.unwrap();
    limiter.acquire("t", "k", 1, Duration::MAX).await.unwrap();
    assert_eq!(started.elapsed(), 100 * MS);
}

#[tokio::test(start_paused = true)]
async fn bad_local_requests_are_not_waited_on() {
    bad_requests_are_not_waited_on(local()).await;
}

#[tokio::test(start_paused = true)]
async fn bad_distributed_requests_are_not_waited_on() {
    bad_requests_are_not_waited_on(distributed()).await;
}

/// A store that is down.
#[derive(Clone, Debug)]
struct DownStore;

impl RateStore for DownStore {
    async fn apply_all(&self, _: &[(Key, Gcra)], _: u32) -> Result<RateDecision, BackendError> {
        Err(BackendError::new(BackendErrorKind::Connection))
    }
}

/// Failing closed is not a wait: the refusal comes back at once. The local fallback's
/// refusals are waited for like the store's.
#[tokio::test(start_paused = true)]
async fn fallbacks_are_waited_on_only_when_they_name_a_wait() {
    let closed =
        DistributedRateLimiter::builder("api", DownStore, unique_namespace("rate"), tiers())
            .fallback(Fallback::Closed)
            .build()
            .unwrap();
    let started = Instant::now();
    let refused = closed
        .acquire("t", "k", 1, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), RateErrorKind::Unavailable);
    assert_eq!(started.elapsed(), Duration::ZERO);

    let local =
        DistributedRateLimiter::builder("api", DownStore, unique_namespace("rate"), tiers())
            .fallback(Fallback::Local { instances: 1 })
            .build()
            .unwrap();
    local.check("t", "k", 1).await.unwrap();
    local.acquire("t", "k", 1, 150 * MS).await.unwrap();
    assert_eq!(started.elapsed(), 100 * MS);
}
