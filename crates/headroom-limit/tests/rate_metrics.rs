//! Rate-limit decisions, store round trips and fallbacks are counted with the documented
//! names and labels.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use headroom_core::memory::MemoryRateStore;
use headroom_core::rate::{Gcra, RateDecision, RateStore};
use headroom_core::{BackendError, BackendErrorKind, ManualClock};
use headroom_limit::rate::{
    DistributedRateLimiter, Fallback, LocalRateLimiter, Quota, RateLimit, TierConfig,
};
use headroom_testkit::unique_namespace;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

/// Counters by `name{label=value,...}` (labels sorted).
#[derive(Default)]
struct Counters(Mutex<HashMap<String, Arc<AtomicU64>>>);

impl Counters {
    fn get(&self, name: &str) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |count| count.load(Ordering::Relaxed))
    }
}

impl Recorder for Counters {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut labels: Vec<String> = key
            .labels()
            .map(|label| format!("{}={}", label.key(), label.value()))
            .collect();
        labels.sort();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        let count = Arc::clone(self.0.lock().unwrap().entry(name).or_default());
        Counter::from_arc(count)
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[derive(Debug)]
struct DownStore;

impl RateStore for DownStore {
    async fn apply_all(
        &self,
        _: &[(headroom_core::Key, Gcra)],
        _: u32,
    ) -> Result<RateDecision, BackendError> {
        Err(BackendError::new(BackendErrorKind::Connection))
    }
}

#[tokio::test]
async fn decisions_are_counted_per_tier_and_outcome() {
    let counters = Counters::default();
    let clock = ManualClock::new();
    let tiers = TierConfig::new()
        .tier("free", Quota::per_minute(2).unwrap())
        .tier("pro", Quota::per_minute(100).unwrap());
    let limiter = metrics::with_local_recorder(&counters, || {
        LocalRateLimiter::builder("api", tiers)
            .clock(clock.clock())
            .build()
            .unwrap()
    });
    for _ in 0..5 {
        let _ = limiter.check("free", "alice", 1).await;
        let _ = limiter.check("pro", "alice", 1).await;
    }
    let count = |tier: &str, outcome: &str| {
        counters.get(&format!(
            "headroom_limit_rate_decisions_total{{limiter=api,outcome={outcome},tier={tier}}}"
        ))
    };
    assert_eq!(
        (count("free", "allowed"), count("free", "rejected")),
        (2, 3)
    );
    assert_eq!((count("pro", "allowed"), count("pro", "rejected")), (5, 0));
}

#[tokio::test]
async fn round_trips_and_fallbacks_are_counted() {
    let counters = Counters::default();
    let clock = ManualClock::new();
    let tiers = TierConfig::new().tier("t", Quota::per_minute(60).unwrap());
    let (up, down) = metrics::with_local_recorder(&counters, || {
        let up = DistributedRateLimiter::builder(
            "up",
            MemoryRateStore::with_limits(clock.clock(), 100),
            unique_namespace("rate"),
            tiers.clone(),
        )
        .clock(clock.clock())
        .build()
        .unwrap();
        let down =
            DistributedRateLimiter::builder("down", DownStore, unique_namespace("rate"), tiers)
                .clock(clock.clock())
                .fallback(Fallback::Open)
                .build()
                .unwrap();
        (up, down)
    });
    for _ in 0..3 {
        up.check("t", "k", 1).await.unwrap();
        down.check("t", "k", 1).await.unwrap();
    }
    let get = |name: &str| counters.get(name);
    assert_eq!(
        get("headroom_limit_rate_store_round_trips_total{limiter=up,outcome=ok}"),
        3
    );
    assert_eq!(
        get("headroom_limit_rate_store_round_trips_total{limiter=up,outcome=error}"),
        0
    );
    // The store is tried once; the next calls use the fallback until the retry interval.
    assert_eq!(
        get("headroom_limit_rate_store_round_trips_total{limiter=down,outcome=error}"),
        1
    );
    assert_eq!(
        get("headroom_limit_rate_fallbacks_total{fallback=open,limiter=down}"),
        3
    );
    assert_eq!(
        get("headroom_limit_rate_fallbacks_total{fallback=local,limiter=up}"),
        0
    );
    assert_eq!(
        get("headroom_limit_rate_decisions_total{limiter=down,outcome=allowed,tier=t}"),
        3
    );
}
