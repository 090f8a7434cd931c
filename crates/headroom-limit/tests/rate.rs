//! In-process rate limits on a manual clock: exact quotas, bursts, costs and retry-after.

use std::sync::Arc;
use std::time::Duration;

use headroom_core::{Classify, ManualClock};
use headroom_limit::rate::{
    DirectLimiter, KeyedLimiter, LocalRateLimiter, Quota, Quotas, RateErrorKind, TierConfig,
};
use proptest::prelude::*;

const MS: Duration = Duration::from_millis(1);

fn ten_per_second_burst_five() -> Quota {
    Quota::per_second(10).unwrap().with_burst(5).unwrap()
}

#[test]
fn direct_limiter_admits_exactly_the_burst_then_one_per_interval_with_exact_retry_after() {
    let clock = ManualClock::new();
    let limiter = DirectLimiter::builder(ten_per_second_burst_five())
        .clock(clock.clock())
        .build();
    for _ in 0..5 {
        limiter.check().unwrap();
    }
    let refused = limiter.check().unwrap_err();
    assert_eq!(refused.retry_after(), 100 * MS);
    assert!(refused.is_rejected() && refused.is_retryable() && !refused.is_timeout());
    assert_eq!(refused.quota(), ten_per_second_burst_five());

    clock.advance(99 * MS);
    assert_eq!(limiter.check().unwrap_err().retry_after(), MS);
    clock.advance(MS);
    limiter.check().unwrap();
    assert_eq!(limiter.check().unwrap_err().retry_after(), 100 * MS);

    // Over ten more seconds at 1 ms steps, exactly 100 more units get through.
    let mut admitted = 0;
    for _ in 0..10_000 {
        clock.advance(MS);
        admitted += u32::from(limiter.check().is_ok());
    }
    assert_eq!(admitted, 100);
}

#[test]
fn costs_are_all_or_nothing_and_wait_for_their_whole_size() {
    let clock = ManualClock::new();
    let limiter = DirectLimiter::builder(ten_per_second_burst_five())
        .clock(clock.clock())
        .build();
    let admitted = limiter.check_n(3).unwrap();
    assert_eq!(admitted.remaining(), 2);
    assert_eq!(admitted.reset_after(), 300 * MS);
    let refused = limiter.check_n(3).unwrap_err();
    assert_eq!(refused.kind(), RateErrorKind::Limited);
    assert_eq!(refused.limited().unwrap().retry_after(), 100 * MS);
    // Nothing was charged by the refusal.
    assert_eq!(limiter.check_n(2).unwrap().remaining(), 0);
    let too_big = limiter.check_n(6).unwrap_err();
    assert_eq!(too_big.kind(), RateErrorKind::CostTooHigh);
    assert!(!too_big.is_retryable() && !too_big.is_rejected());
    clock.advance(500 * MS);
    assert_eq!(limiter.check_n(5).unwrap().remaining(), 0);
}

#[test]
fn direct_limiter_shared_by_threads_admits_exactly_the_burst() {
    let clock = ManualClock::new();
    let limiter = Arc::new(
        DirectLimiter::builder(Quota::per_hour(1000).unwrap())
            .clock(clock.clock())
            .build(),
    );
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let limiter = Arc::clone(&limiter);
            std::thread::spawn(move || (0..1000).filter(|_| limiter.check().is_ok()).count())
        })
        .collect();
    let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(total, 1000);
}

#[test]
fn keyed_limiter_keeps_keys_apart_with_exact_retry_after() {
    let clock = ManualClock::new();
    let limiter: KeyedLimiter<String> = KeyedLimiter::builder(ten_per_second_burst_five())
        .clock(clock.clock())
        .build();
    for _ in 0..5 {
        limiter.check_key("alice").unwrap();
    }
    assert_eq!(
        limiter.check_key("alice").unwrap_err().retry_after(),
        100 * MS
    );
    assert_eq!(limiter.check_key_n("bob", 5).unwrap().remaining(), 0);
    clock.advance(30 * MS);
    assert_eq!(
        limiter.check_key("alice").unwrap_err().retry_after(),
        70 * MS
    );
    assert_eq!(
        limiter.check_key_n("carol", 6).unwrap_err().kind(),
        RateErrorKind::CostTooHigh
    );
    // A refused new key takes no memory.
    assert_eq!(limiter.len(), 2);
}

#[test]
fn keys_full_again_are_dropped_and_draining_keys_kept() {
    let clock = ManualClock::new();
    let limiter: KeyedLimiter<u32> = KeyedLimiter::builder(ten_per_second_burst_five())
        .clock(clock.clock())
        .build();
    limiter.check_key(&1).unwrap();
    limiter.check_key_n(&2, 5).unwrap();
    clock.advance(100 * MS);
    // Key 1 is full again; key 2 still has 400 ms to go.
    assert_eq!(limiter.sweep(), 1);
    assert_eq!(
        limiter
            .check_key_n(&2, 2)
            .unwrap_err()
            .limited()
            .unwrap()
            .retry_after(),
        100 * MS
    );
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
            (0..16u8, 1..=5u32).prop_map(|(key, cost)| Op::Check { key, cost }),
        ],
        1..200,
    )
}

proptest! {
    /// Sweeping every millisecond and a tight cap change no decision as long as the keys that
    /// are still draining fit: dropping full cells is lossless.
    #[test]
    fn dropping_full_cells_never_changes_a_decision(ops in ops()) {
        let clock = ManualClock::new();
        let quota = ten_per_second_burst_five();
        let bounded: KeyedLimiter<u8> = KeyedLimiter::builder(quota)
            .clock(clock.clock())
            .shards(1)
            .max_keys(16)
            .idle_sweep(MS)
            .build();
        let reference: KeyedLimiter<u8> = KeyedLimiter::builder(quota).clock(clock.clock()).build();
        for op in ops {
            match op {
                Op::Advance(ms) => clock.advance(Duration::from_millis(ms)),
                Op::Check { key, cost } => {
                    let got = bounded.check_key_n(&key, cost).map_err(|e| e.limited().copied());
                    let want = reference.check_key_n(&key, cost).map_err(|e| e.limited().copied());
                    prop_assert_eq!(got, want);
                }
            }
        }
    }
}

/// A full shard evicts the eighth of its draining keys nearest to full again, even when
/// they all drain until the same instant: the others keep their refusals.
#[test]
fn a_full_shard_of_keys_draining_alike_evicts_only_an_eighth() {
    let clock = ManualClock::new();
    let limiter: KeyedLimiter<u64> = KeyedLimiter::builder(Quota::per_hour(1).unwrap())
        .clock(clock.clock())
        .shards(1)
        .max_keys(16)
        .build();
    for key in 0..16u64 {
        limiter.check_key(&key).unwrap();
    }
    limiter.check_key(&16).unwrap();
    // An eighth, and one more to make room for the new key. (Checking the keys again would
    // insert the evicted ones and evict others.)
    let kept = limiter.len() - 1;
    assert!(kept >= 16 - 16 / 8 - 1, "{kept} of 16 draining keys kept");
}

#[test]
fn millions_of_distinct_keys_stay_under_the_cap() {
    let clock = ManualClock::new();
    let limiter: KeyedLimiter<u64> = KeyedLimiter::builder(Quota::per_hour(10).unwrap())
        .clock(clock.clock())
        .max_keys(10_000)
        .build();
    for key in 0..2_000_000u64 {
        // Every new key is admitted (it starts full) and then drains for an hour: the
        // attacker's best case, where nothing can be dropped losslessly.
        limiter.check_key(&key).unwrap();
        if key % 10_000 == 0 {
            clock.advance(MS);
        }
    }
    assert!(
        limiter.len() <= limiter.max_keys(),
        "{} keys",
        limiter.len()
    );
    assert!(limiter.max_keys() <= 10_000 + 64);
}

#[test]
fn tiers_keep_a_cell_per_key_at_any_length() {
    // A tier holds keys up to 47 bytes as they are and longer ones as digests: keys either
    // side of that length, and long keys differing only in their first or last byte, each
    // keep a cell of their own.
    let long = "k".repeat(16 * 1024);
    let mut keys = vec![
        String::new(),
        "k".repeat(47),
        "k".repeat(48),
        "k".repeat(49),
        long.clone(),
        format!("{long}!"),
        format!("!{long}"),
    ];
    keys.push(format!("{}!", &long[1..]));
    let quota = Quota::per_hour(2).unwrap();
    let tiers = TierConfig::new().tier("one", quota).tier(
        "several",
        Quotas::new([quota, Quota::new(10, Duration::from_secs(86_400)).unwrap()]).unwrap(),
    );
    let limiter = LocalRateLimiter::builder("api", tiers)
        .clock(ManualClock::new().clock())
        .build()
        .unwrap();
    for tier in ["one", "several"] {
        for key in &keys {
            assert_eq!(
                limiter.check_now(tier, key, 1).unwrap().remaining(),
                1,
                "{tier}"
            );
        }
        for key in &keys {
            assert_eq!(
                limiter.check_now(tier, key, 1).unwrap().remaining(),
                0,
                "{tier}"
            );
            assert!(limiter.check_now(tier, key, 1).is_err(), "{tier}");
        }
    }
}

#[tokio::test]
async fn tiers_have_their_own_quotas_and_can_be_replaced_at_run_time() {
    let clock = ManualClock::new();
    let tiers = TierConfig::new()
        .tier("free", Quota::per_minute(2).unwrap())
        .tier("pro", Quota::per_minute(100).unwrap());
    let limiter = LocalRateLimiter::builder("api", tiers)
        .clock(clock.clock())
        .build()
        .unwrap();
    limiter.check_now("free", "alice", 2).unwrap();
    let refused = limiter.check_now("free", "alice", 1).unwrap_err();
    assert_eq!(
        refused.limited().unwrap().retry_after(),
        Duration::from_secs(30)
    );
    assert_eq!(
        limiter.check_now("pro", "alice", 1).unwrap().remaining(),
        99
    );
    assert_eq!(
        limiter.check_now("gold", "alice", 1).unwrap_err().kind(),
        RateErrorKind::UnknownTier
    );

    // Free keeps its quota and so its state; pro changes and starts afresh; gold appears.
    limiter
        .replace(
            &TierConfig::new()
                .tier("free", Quota::per_minute(2).unwrap())
                .tier("pro", Quota::per_minute(10).unwrap())
                .tier("gold", Quota::per_minute(1000).unwrap()),
        )
        .unwrap();
    assert!(limiter.check_now("free", "alice", 1).is_err());
    assert_eq!(limiter.check_now("pro", "alice", 1).unwrap().remaining(), 9);
    assert!(limiter.check_now("gold", "alice", 1).is_ok());
    assert_eq!(
        limiter.quotas("pro"),
        Some(Quota::per_minute(10).unwrap().into())
    );

    let bad = TierConfig::new().tier("free tier", Quota::per_minute(1).unwrap());
    assert_eq!(limiter.replace(&bad).unwrap_err().field(), "tiers");
}

#[test]
fn invalid_quotas_are_configuration_errors() {
    assert_eq!(Quota::per_second(0).unwrap_err().field(), "limit");
    assert_eq!(
        Quota::new(10, Duration::ZERO).unwrap_err().field(),
        "period"
    );
    assert_eq!(
        Quota::new(u32::MAX, Duration::from_nanos(1))
            .unwrap_err()
            .field(),
        "period"
    );
    assert_eq!(
        Quota::per_second(1)
            .unwrap()
            .with_burst(0)
            .unwrap_err()
            .field(),
        "burst"
    );
    // A burst's worth of time past what the limiters count (u64 nanoseconds, ~584 years),
    // which would otherwise admit everything once reached.
    assert_eq!(
        Quota::per_hour(1)
            .unwrap()
            .with_burst(u32::MAX)
            .unwrap_err()
            .field(),
        "burst"
    );
    assert_eq!(Quota::new(1, Duration::MAX).unwrap_err().field(), "period");
    // A share rounds its limit and burst down apart, which can lengthen the burst's time: it
    // stays within what the limiters count.
    let share = Quota::new(19, Duration::from_nanos(u64::MAX / 6))
        .unwrap()
        .with_burst(100)
        .unwrap()
        .share(10);
    assert!(
        share
            .emission_interval()
            .checked_mul(share.burst())
            .is_some_and(|time| time <= headroom_limit::rate::MAX_BURST_TIME),
        "{share:?}"
    );
    let share = Quota::per_minute(100)
        .unwrap()
        .with_burst(10)
        .unwrap()
        .share(4);
    assert_eq!((share.limit(), share.burst()), (25, 2));
    // Shares add up to the quota's rate, also when the units do not split evenly or are
    // fewer than the instances: 10 a minute over 4 is one each 24 s, 2 over 4 one each 2 min.
    let share = Quota::per_minute(10).unwrap().share(4);
    assert_eq!(share.emission_interval(), Duration::from_secs(24));
    let share = Quota::per_minute(2).unwrap().share(4);
    assert_eq!(share.emission_interval(), Duration::from_secs(120));
    assert_eq!(share.burst(), 1);
}

#[tokio::test]
async fn acquire_waits_for_a_near_permit_and_refuses_a_far_one_at_once() {
    let manual = ManualClock::new();
    let quota = Quota::per_second(10).unwrap().with_burst(1).unwrap();
    let direct = DirectLimiter::builder(quota).clock(manual.clock()).build();
    let keyed: KeyedLimiter<String> = KeyedLimiter::builder(quota).clock(manual.clock()).build();
    direct.check().unwrap();
    keyed.check_key("alice").unwrap();

    // The next permit is 100 ms away: a caller willing to wait 50 ms is refused at once.
    let far = direct
        .acquire_n(1, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert_eq!(
        far.limited().map(|l| l.retry_after()),
        Some(Duration::from_millis(100))
    );
    let far = keyed
        .acquire_key_n("alice", 1, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert_eq!(
        far.limited().map(|l| l.retry_after()),
        Some(Duration::from_millis(100))
    );

    // One willing to wait 150 ms waits the 100 ms, then gets it.
    let near = tokio::spawn(async move {
        let direct = direct.acquire_n(1, Duration::from_millis(150)).await;
        let keyed = keyed
            .acquire_key_n("alice", 1, Duration::from_millis(150))
            .await;
        (direct.is_ok(), keyed.is_ok())
    });
    tokio::task::yield_now().await;
    manual.advance(Duration::from_millis(99));
    tokio::task::yield_now().await;
    assert!(!near.is_finished(), "admitted before its permit was due");
    manual.advance(Duration::from_millis(1));
    assert_eq!(near.await.unwrap(), (true, true));
}

/// A `max_wait` too long to add to a clock reading means no limit: the caller waits for its
/// permit, and nothing panics.
#[tokio::test(start_paused = true)]
async fn acquire_with_an_unbounded_wait_waits_without_a_panic() {
    let quota = Quota::per_second(10).unwrap().with_burst(1).unwrap();
    let direct = DirectLimiter::builder(quota).build();
    let keyed: KeyedLimiter<String> = KeyedLimiter::builder(quota).build();
    direct.check().unwrap();
    keyed.check_key("alice").unwrap();
    let started = tokio::time::Instant::now();
    direct.acquire_n(1, Duration::MAX).await.unwrap();
    keyed
        .acquire_key_n("alice", 1, Duration::MAX)
        .await
        .unwrap();
    assert_eq!(started.elapsed(), 100 * MS);
}
