//! Checks of the [`RateStore`] contract.

use std::time::{Duration, Instant};

use headroom_core::rate::{Gcra, RateStore};
use headroom_core::{BackendErrorKind, Namespace};

const HOURLY: Gcra = Gcra {
    emission_interval: Duration::from_secs(3_600),
    burst: 10,
};

/// A burst is admitted exactly, counting down, then refused with a retry-after of at most one
/// interval; refusals charge nothing.
pub async fn admits_exactly_the_burst<S: RateStore>(store: &S, ns: Namespace) {
    let key = ns.key("k").expect("key");
    for expected in (0..10).rev() {
        let d = store.apply(&key, HOURLY, 1).await.expect("apply");
        assert!(d.allowed, "within the burst");
        assert_eq!(d.remaining, expected);
    }
    let mut previous = Duration::MAX;
    for _ in 0..3 {
        let d = store.apply(&key, HOURLY, 1).await.expect("apply");
        assert!(!d.allowed, "over the burst");
        assert_eq!(d.remaining, 0);
        assert!(
            d.retry_after > Duration::ZERO && d.retry_after <= HOURLY.emission_interval,
            "{d:?}"
        );
        assert!(
            d.retry_after <= previous,
            "a refusal must not charge the cell"
        );
        previous = d.retry_after;
    }
}

/// A cost spends that many units at once.
pub async fn costs_spend_several_units<S: RateStore>(store: &S, ns: Namespace) {
    let key = ns.key("k").expect("key");
    assert_eq!(
        store.apply(&key, HOURLY, 7).await.expect("apply").remaining,
        3
    );
    assert!(!store.apply(&key, HOURLY, 4).await.expect("apply").allowed);
    assert!(store.apply(&key, HOURLY, 3).await.expect("apply").allowed);
}

/// A cost over the burst can never be admitted: a configuration error.
pub async fn impossible_costs_are_refused<S: RateStore>(store: &S, ns: Namespace) {
    let key = ns.key("k").expect("key");
    let err = store
        .apply(&key, HOURLY, 11)
        .await
        .expect_err("cost over burst");
    assert_eq!(err.kind(), BackendErrorKind::Config);
}

/// Keys are separate cells.
pub async fn keys_are_independent<S: RateStore>(store: &S, ns: Namespace) {
    let a = ns.key("a").expect("key");
    let b = ns.key("b").expect("key");
    assert!(store.apply(&a, HOURLY, 10).await.expect("apply").allowed);
    assert!(!store.apply(&a, HOURLY, 1).await.expect("apply").allowed);
    assert!(store.apply(&b, HOURLY, 10).await.expect("apply").allowed);
}

/// Of many concurrent requests, exactly the burst is admitted.
pub async fn concurrent_requests_admit_exactly_the_burst<S: RateStore>(store: &S, ns: Namespace) {
    let key = ns.key("k").expect("key");
    let decisions =
        futures_util::future::join_all((0..100).map(|_| store.apply(&key, HOURLY, 1))).await;
    let allowed = decisions
        .iter()
        .filter(|d| d.as_ref().expect("apply").allowed)
        .count();
    assert_eq!(allowed, 10);
}

/// Units come back at the configured rate (on the store's own clock).
pub async fn units_replenish_over_time<S: RateStore>(store: &S, ns: Namespace) {
    let key = ns.key("k").expect("key");
    let fast = Gcra {
        emission_interval: Duration::from_millis(20),
        burst: 1,
    };
    assert!(store.apply(&key, fast, 1).await.expect("apply").allowed);
    let refused = store.apply(&key, fast, 1).await.expect("apply");
    assert!(!refused.allowed && refused.retry_after <= fast.emission_interval);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !store.apply(&key, fast, 1).await.expect("apply").allowed {
        assert!(
            Instant::now() < deadline,
            "no unit came back within 5 s at one per 20 ms"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
