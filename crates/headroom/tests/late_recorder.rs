//! Parts built before the process installs its metrics recorder still report to it.
//!
//! This file is its own test binary with one test: the recorder is process-wide and can be
//! installed once.

use std::time::Duration;

use headroom::Headroom;
use headroom::breaker::Error as BreakerError;
use headroom::core::metrics::LOOK_EVERY;
use headroom::idempotency::{IdempotencyKey, Scope};
use headroom::limit::rate::{Quota, RateLimit, TierConfig};
use headroom::shard::{JumpRouter, Topology, TopologyHandle};
use metrics_exporter_prometheus::PrometheusBuilder;

/// The sum of the samples of `name` whose labels include every one of `labels`, if any.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            let matches = rest.is_empty() && labels.is_empty()
                || rest.starts_with('{')
                    && labels
                        .iter()
                        .all(|(key, value)| rest.contains(&format!("{key}=\"{value}\"")));
            if matches {
                value.parse::<f64>().ok()
            } else {
                None
            }
        })
        .reduce(|sum, value| sum + value)
}

#[tokio::test]
async fn parts_built_before_the_recorder_report_to_it() {
    let headroom = Headroom::builder().namespace("shop").memory().unwrap();
    let cache = headroom
        .cache::<u64, String>("products")
        .unwrap()
        .build()
        .unwrap();
    let bulkhead = headroom
        .bulkhead("db")
        .max_concurrent(1)
        .max_queued(0)
        .build()
        .unwrap();
    let limiter = headroom
        .rate_limiter(
            "api",
            TierConfig::new().tier("free", Quota::per_minute(1).unwrap()),
        )
        .unwrap()
        .build()
        .unwrap();
    let breaker = headroom
        .circuit_breaker::<std::io::Error>("payments")
        .build()
        .unwrap();
    let pipeline = headroom
        .pipeline::<std::io::Error>("inventory")
        .timeout(Duration::from_secs(5))
        .build();
    let idempotency = headroom.idempotency().build().unwrap();
    let topology = TopologyHandle::new(
        Topology::builder(JumpRouter::new(4).unwrap())
            .name("orders")
            .epoch(3)
            .node("a", "primary-a")
            .shards(0..4, "a", &[])
            .build()
            .unwrap(),
    );

    // Work before the recorder: a permit is taken and still held when it arrives.
    let held = bulkhead.try_acquire().unwrap();
    let handle = PrometheusBuilder::new().install_recorder().unwrap();

    // Handles look for a recorder every `LOOK_EVERY` records of a thread; these reads find it
    // (the runtime has one thread).
    for _ in 0..LOOK_EVERY {
        assert_eq!(cache.get(&1).await.unwrap(), None);
    }
    let warmed = handle.render();

    // Work after the recorder.
    let loaded = cache
        .get_or_load(&7, |_| async {
            Ok::<_, std::io::Error>(Some(String::from("teapot")))
        })
        .await
        .unwrap();
    assert_eq!(loaded.as_deref(), Some("teapot"));
    assert!(bulkhead.try_acquire().is_err(), "the one permit is held");
    drop(held);
    let in_flight_after_release = sample(
        &handle.render(),
        "headroom_limit_in_flight_requests",
        &[("bulkhead", "db")],
    );
    let again = bulkhead.try_acquire().unwrap();
    assert!(limiter.check("free", "c1", 1).await.is_ok());
    assert!(limiter.check("free", "c1", 1).await.is_err());
    breaker
        .call(async { Ok::<_, std::io::Error>(()) })
        .await
        .unwrap();
    let failed: Result<(), BreakerError<std::io::Error>> = breaker
        .call(async { Err(std::io::Error::other("declined")) })
        .await;
    assert!(failed.is_err());
    pipeline
        .call(|| async { Ok::<_, std::io::Error>(()) })
        .await
        .unwrap();
    let scope = Scope::new("customer-1", "checkout").unwrap();
    let key = IdempotencyKey::new("k-1").unwrap();
    for _ in 0..2 {
        idempotency
            .execute(&scope, &key, b"sku=1", || async {
                Ok::<_, std::io::Error>(1_u32)
            })
            .await
            .unwrap();
    }
    drop(topology.load().write(&"order-1").unwrap());

    let text = handle.render();
    // Counters by what the work after the warm-up added; gauges by value.
    let expect = |name: &str, labels: &[(&str, &str)], value: f64| {
        let before = sample(&warmed, name, labels).unwrap_or(0.0);
        assert_eq!(
            sample(&text, name, labels).map(|now| now - before),
            Some(value),
            "{name} {labels:?} in\n{text}"
        );
    };
    let expect_gauge = |name: &str, labels: &[(&str, &str)], value: f64| {
        assert_eq!(
            sample(&text, name, labels),
            Some(value),
            "{name} {labels:?} in\n{text}"
        );
    };
    expect(
        "headroom_cache_misses_total",
        &[("cache", "products"), ("level", "l1")],
        1.0,
    );
    expect(
        "headroom_cache_loads_total",
        &[("cache", "products"), ("outcome", "ok")],
        1.0,
    );
    expect(
        "headroom_limit_rejected_total",
        &[
            ("bulkhead", "db"),
            ("priority", "default"),
            ("reason", "queue_full"),
        ],
        1.0,
    );
    // The permit taken before the recorder and given back after it left the gauge at zero,
    // not at minus one; the one taken after counts.
    assert_eq!(in_flight_after_release, Some(0.0), "{text}");
    expect_gauge(
        "headroom_limit_in_flight_requests",
        &[("bulkhead", "db")],
        1.0,
    );
    // Set when the bulkhead was built, before the recorder.
    expect_gauge(
        "headroom_limit_concurrency_limit_requests",
        &[("bulkhead", "db")],
        1.0,
    );
    expect(
        "headroom_limit_rate_decisions_total",
        &[("limiter", "api"), ("outcome", "allowed")],
        1.0,
    );
    expect(
        "headroom_breaker_calls_total",
        &[("breaker", "payments"), ("outcome", "failure")],
        1.0,
    );
    expect_gauge("headroom_breaker_state", &[("breaker", "payments")], 0.0);
    expect("headroom_idempotency_executions_total", &[], 1.0);
    expect("headroom_idempotency_replays_total", &[], 1.0);
    expect(
        "headroom_shard_routed_total",
        &[("topology", "orders"), ("op", "write")],
        1.0,
    );
    expect_gauge(
        "headroom_shard_topology_epoch",
        &[("topology", "orders")],
        3.0,
    );
    drop(again);
}
