//! Checks of the [`RateStore`] contract.

use std::time::{Duration, Instant};

use headroom_core::rate::{Gcra, RateStore};
use headroom_core::{BackendErrorKind, Key, Namespace};

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

/// A cost of zero is admitted and spends nothing, on a full cell and on an empty one: it
/// tells what is left.
pub async fn a_cost_of_zero_is_admitted_and_spends_nothing<S: RateStore>(store: &S, ns: Namespace) {
    let key = ns.key("k").expect("key");
    let d = store.apply(&key, HOURLY, 0).await.expect("apply");
    assert!(d.allowed && d.remaining == 10, "{d:?}");
    assert!(store.apply(&key, HOURLY, 10).await.expect("apply").allowed);
    let d = store.apply(&key, HOURLY, 0).await.expect("apply");
    assert!(d.allowed && d.remaining == 0, "{d:?}");
    assert!(!store.apply(&key, HOURLY, 1).await.expect("apply").allowed);
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

/// Two cells of one limit key: their keys share a hash tag, as the contract asks.
fn two_cells(ns: &Namespace, wide: Gcra, narrow: Gcra) -> [(Key, Gcra); 2] {
    [
        (ns.key("{k}:wide").expect("key"), wide),
        (ns.key("{k}:narrow").expect("key"), narrow),
    ]
}

const NARROW: Gcra = Gcra {
    emission_interval: Duration::from_secs(3_600),
    burst: 3,
};

/// Several cells admit a cost only together: the fewest units left bind, and a refusal
/// charges none of them (each cell alone still holds what it held).
pub async fn several_cells_are_charged_together_or_not_at_all<S: RateStore>(
    store: &S,
    ns: Namespace,
) {
    let cells = two_cells(&ns, HOURLY, NARROW);
    let admitted = store.apply_all(&cells, 2).await.expect("apply");
    assert!(admitted.allowed);
    assert_eq!((admitted.remaining, admitted.cell), (1, 1), "{admitted:?}");
    let refused = store.apply_all(&cells, 2).await.expect("apply");
    assert!(!refused.allowed, "the narrow cell has one unit left");
    assert_eq!((refused.remaining, refused.cell), (1, 1), "{refused:?}");
    // Neither cell was charged by the refusal: the wide one still has 8 units, the narrow 1.
    let [wide, narrow] = &cells;
    assert_eq!(
        store
            .apply(&wide.0, wide.1, 8)
            .await
            .expect("apply")
            .remaining,
        0
    );
    assert!(
        store
            .apply(&narrow.0, narrow.1, 1)
            .await
            .expect("apply")
            .allowed
    );
    // Both cells are empty now.
    let refused = store.apply_all(&cells, 1).await.expect("apply");
    assert!(!refused.allowed);
    assert_eq!(refused.remaining, 0);
}

/// A refusal waits for the slowest of the cells that refuse.
pub async fn a_refusal_waits_for_the_longest_of_the_cells<S: RateStore>(store: &S, ns: Namespace) {
    let hourly = Gcra {
        emission_interval: Duration::from_secs(3_600),
        burst: 1,
    };
    let daily = Gcra {
        emission_interval: Duration::from_secs(86_400),
        burst: 1,
    };
    let cells = two_cells(&ns, hourly, daily);
    assert!(store.apply_all(&cells, 1).await.expect("apply").allowed);
    let refused = store.apply_all(&cells, 1).await.expect("apply");
    assert!(!refused.allowed);
    assert_eq!(refused.cell, 1, "{refused:?}");
    assert!(
        refused.retry_after > hourly.emission_interval
            && refused.retry_after <= daily.emission_interval,
        "{refused:?}"
    );
    assert!(
        refused.reset_after > hourly.emission_interval,
        "{refused:?}"
    );
}

/// No cell, or a cost over any cell's burst, can never be admitted: configuration errors that
/// charge nothing.
pub async fn impossible_combined_decisions_are_refused<S: RateStore>(store: &S, ns: Namespace) {
    let err = store.apply_all(&[], 1).await.expect_err("no cell");
    assert_eq!(err.kind(), BackendErrorKind::Config);
    let cells = two_cells(&ns, HOURLY, NARROW);
    let err = store
        .apply_all(&cells, 4)
        .await
        .expect_err("cost over a burst");
    assert_eq!(err.kind(), BackendErrorKind::Config);
    let wide = &cells[0];
    assert!(
        store
            .apply(&wide.0, wide.1, 10)
            .await
            .expect("apply")
            .allowed
    );
}

/// Of many concurrent requests on two cells, exactly the smaller burst is admitted, and each
/// cell is charged for exactly those.
pub async fn concurrent_requests_on_several_cells_admit_exactly_the_smallest_burst<S: RateStore>(
    store: &S,
    ns: Namespace,
) {
    let cells = two_cells(&ns, HOURLY, NARROW);
    let decisions =
        futures_util::future::join_all((0..100).map(|_| store.apply_all(&cells, 1))).await;
    let allowed = decisions
        .iter()
        .filter(|d| d.as_ref().expect("apply").allowed)
        .count();
    assert_eq!(allowed, 3);
    let wide = &cells[0];
    assert_eq!(
        store
            .apply(&wide.0, wide.1, 1)
            .await
            .expect("apply")
            .remaining,
        6
    );
}
