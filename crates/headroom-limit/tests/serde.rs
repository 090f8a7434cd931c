//! Configurations load from files with human-readable durations.
#![cfg(feature = "serde")]

use std::time::Duration;

use headroom_limit::adaptive::{AdaptiveConfig, GradientConfig};
use headroom_limit::{
    Bulkhead, BulkheadConfig, CodelConfig, LoadShedConfig, Overflow, Priority, QueueConfig,
    WorkQueue,
};

#[test]
fn bulkhead_config_with_adaptive_limit_loads_and_builds() {
    let config: BulkheadConfig = serde_json::from_str(
        r#"{
            "max_queued": 16,
            "max_wait": "250ms",
            "adaptive": { "algorithm": "gradient", "initial_limit": 8, "max_limit": 64 }
        }"#,
    )
    .unwrap();
    assert_eq!(config.max_wait, Duration::from_millis(250));
    assert_eq!(
        config.adaptive,
        Some(AdaptiveConfig::Gradient(GradientConfig {
            initial_limit: 8,
            max_limit: 64,
            ..GradientConfig::default()
        }))
    );
    let bulkhead = Bulkhead::from_config("orders", config).unwrap();
    assert_eq!((bulkhead.limit(), bulkhead.max_queued()), (8, 16));
}

#[test]
fn queue_and_shed_configs_load() {
    let queue: QueueConfig = serde_json::from_str(
        r#"{
            "capacity": 256,
            "overflow": { "policy": "wait", "timeout": "20ms" },
            "codel": { "target": "5ms", "interval": "100ms" },
            "adaptive_lifo": true
        }"#,
    )
    .unwrap();
    assert_eq!(
        queue.overflow,
        Overflow::Wait {
            timeout: Duration::from_millis(20)
        }
    );
    assert_eq!(queue.codel, Some(CodelConfig::default()));
    WorkQueue::<u32>::builder("q")
        .config(queue)
        .build()
        .unwrap();

    let shed: LoadShedConfig =
        serde_json::from_str(r#"{ "sheddable_at": 0.5, "queue_delay_target": "10ms" }"#).unwrap();
    assert_eq!(shed.sheddable_at, 0.5);
    assert_eq!(shed.queue_delay_target, Some(Duration::from_millis(10)));
    let priority: Priority = serde_json::from_str(r#""sheddable""#).unwrap();
    assert_eq!(priority, Priority::Sheddable);
}

#[test]
fn unknown_fields_and_bad_values_are_errors_not_panics() {
    assert!(serde_json::from_str::<BulkheadConfig>(r#"{ "max_concurent": 4 }"#).is_err());
    assert!(serde_json::from_str::<BulkheadConfig>(r#"{ "max_wait": "soon" }"#).is_err());
    // An overflow policy with a field it does not take: a typo, or a timeout meant for `wait`.
    for overflow in [
        r#"{ "policy": "drop_oldest", "timeout": "1s" }"#,
        r#"{ "policy": "wait", "timeout": "50ms", "max": 3 }"#,
    ] {
        let config = format!(r#"{{ "overflow": {overflow} }}"#);
        assert!(
            serde_json::from_str::<QueueConfig>(&config).is_err(),
            "{overflow}"
        );
    }
    let config: BulkheadConfig = serde_json::from_str(r#"{ "max_concurrent": 0 }"#).unwrap();
    assert_eq!(
        Bulkhead::from_config("zero", config).unwrap_err().field(),
        "max_concurrent"
    );
}

#[test]
fn rate_tiers_and_fallbacks_load_with_human_readable_periods() {
    use headroom_limit::rate::{Fallback, Quota, TierConfig};

    let tiers: TierConfig = serde_json::from_str(
        r#"{
            "free": { "limit": 60, "period": "1m" },
            "pro": { "limit": 100, "period": "1s", "burst": 500 }
        }"#,
    )
    .unwrap();
    assert_eq!(
        tiers.get("free"),
        Some(&Quota::per_minute(60).unwrap().into())
    );
    assert_eq!(
        tiers.get("pro"),
        Some(
            &Quota::per_second(100)
                .unwrap()
                .with_burst(500)
                .unwrap()
                .into()
        )
    );
    let round_trip: TierConfig =
        serde_json::from_str(&serde_json::to_string(&tiers).unwrap()).unwrap();
    assert_eq!(round_trip, tiers);

    let fallback: Fallback =
        serde_json::from_str(r#"{ "mode": "local", "instances": 4 }"#).unwrap();
    assert_eq!(fallback, Fallback::Local { instances: 4 });
    assert_eq!(
        serde_json::from_str::<Fallback>(r#"{ "mode": "closed" }"#).unwrap(),
        Fallback::Closed
    );
    // A field the mode does not take is an error, not ignored.
    assert!(serde_json::from_str::<Fallback>(r#"{ "mode": "open", "instances": 4 }"#).is_err());

    let config: headroom_limit::rate::DistributedConfig = serde_json::from_str(
        r#"{ "tiers": { "free": { "limit": 60, "period": "1m" } }, "batch": 0 }"#,
    )
    .unwrap();
    let built = headroom_limit::rate::DistributedRateLimiter::builder_from(
        "api",
        headroom_core::memory::MemoryRateStore::new(),
        headroom_core::Namespace::new("rate").unwrap(),
        config,
    )
    .build();
    assert_eq!(built.unwrap_err().field(), "batch");

    // Out-of-range values are errors, not panics.
    for bad in [
        r#"{ "t": { "limit": 0, "period": "1m" } }"#,
        r#"{ "t": { "limit": 1, "period": "0s" } }"#,
        r#"{ "t": { "limit": 1, "period": "1m", "burst": 0 } }"#,
        r#"{ "t": { "limit": 1, "period": "soon" } }"#,
        r#"{ "t": { "limit": 1, "period": "1m", "extra": 1 } }"#,
    ] {
        assert!(serde_json::from_str::<TierConfig>(bad).is_err(), "{bad}");
    }
}

#[test]
fn a_tier_of_several_quotas_loads_from_a_list_next_to_single_quota_tiers() {
    use headroom_limit::rate::{Quota, Quotas, TierConfig};

    let tiers: TierConfig = serde_json::from_str(
        r#"{
            "free": { "limit": 60, "period": "1m" },
            "api": { "quotas": [
                { "limit": 10, "period": "1s" },
                { "limit": 1000, "period": "1day", "burst": 100 }
            ] }
        }"#,
    )
    .unwrap();
    let day = Quota::new(1000, Duration::from_secs(86_400))
        .unwrap()
        .with_burst(100)
        .unwrap();
    assert_eq!(
        tiers.get("api"),
        Some(&Quotas::new([Quota::per_second(10).unwrap(), day]).unwrap())
    );
    assert_eq!(
        tiers.get("free"),
        Some(&Quota::per_minute(60).unwrap().into())
    );
    // Written back, each tier keeps its form.
    let written = serde_json::to_value(&tiers).unwrap();
    assert_eq!(written["api"]["quotas"].as_array().unwrap().len(), 2);
    assert_eq!(written["free"]["limit"], 60);
    let round_trip: TierConfig = serde_json::from_value(written).unwrap();
    assert_eq!(round_trip, tiers);
}

#[test]
fn bad_quota_lists_are_typed_errors_naming_the_field() {
    use headroom_limit::rate::{Quota, Quotas, TierConfig};

    let quota = Quota::per_second(1).unwrap();
    assert_eq!(Quotas::new([]).unwrap_err().field(), "quotas");
    assert_eq!(
        Quotas::new([quota; Quotas::MAX + 1]).unwrap_err().field(),
        "quotas"
    );
    assert!(Quotas::new([quota; Quotas::MAX]).is_ok());

    // From a file, the same errors (their field named in the message), never a panic.
    let nine = [r#"{ "limit": 1, "period": "1s" }"#; 9].join(", ");
    let nine = format!(r#"{{ "t": {{ "quotas": [{nine}] }} }}"#);
    for (bad, field) in [
        (r#"{ "t": { "quotas": [] } }"#, "`quotas`"),
        (nine.as_str(), "`quotas`"),
        (
            r#"{ "t": { "quotas": [{ "limit": 0, "period": "1s" }] } }"#,
            "`limit`",
        ),
        (
            r#"{ "t": { "quotas": [{ "limit": 5, "period": "0s" }] } }"#,
            "`period`",
        ),
        (
            r#"{ "t": { "quotas": [{ "limit": 5, "period": "1s", "burst": 0 }] } }"#,
            "`burst`",
        ),
        (
            r#"{ "t": { "quotas": [{ "limit": 5, "period": "1s" }], "limit": 5 } }"#,
            "`quotas`",
        ),
        (r#"{ "t": { "period": "1s" } }"#, "`limit`"),
        (r#"{ "t": { "limit": 5 } }"#, "`period`"),
        (r#"{ "t": {} }"#, "`limit`"),
    ] {
        let error = serde_json::from_str::<TierConfig>(bad).unwrap_err();
        assert!(
            error.to_string().contains(field),
            "{bad}: {error} does not name {field}"
        );
    }
}

#[test]
fn keyed_bulkhead_config_with_classes_loads_and_builds() {
    use headroom_limit::{KeyedBulkhead, KeyedBulkheadConfig};

    let config: KeyedBulkheadConfig = serde_json::from_str(
        r#"{
            "max_concurrent": 32,
            "max_queued": 16,
            "max_wait": "25ms",
            "max_tenants": 500,
            "classes": { "enterprise": 4, "pro": 2 }
        }"#,
    )
    .unwrap();
    assert_eq!(config.max_wait, Duration::from_millis(25));
    let round_trip: KeyedBulkheadConfig =
        serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
    assert_eq!(round_trip, config);
    let bulkhead = KeyedBulkhead::from_config("api", config).unwrap();
    assert_eq!(
        (
            bulkhead.capacity(),
            bulkhead.max_queued(),
            bulkhead.max_tenants()
        ),
        (32, 16, 500)
    );
    assert_eq!(bulkhead.class("enterprise").unwrap().weight(), 4);

    // Unset fields take their defaults; unknown fields and bad values are errors.
    let defaults: KeyedBulkheadConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(defaults, KeyedBulkheadConfig::default());
    assert!(serde_json::from_str::<KeyedBulkheadConfig>(r#"{ "max_tenant": 4 }"#).is_err());
    assert!(serde_json::from_str::<KeyedBulkheadConfig>(r#"{ "classes": { "a": -1 } }"#).is_err());
    let zero: KeyedBulkheadConfig =
        serde_json::from_str(r#"{ "classes": { "free": 0 } }"#).unwrap();
    assert_eq!(
        KeyedBulkhead::from_config("zero", zero)
            .unwrap_err()
            .field(),
        "classes"
    );
}
