//! Objectives refuse what cannot be measured or alerted on, naming the field, and load from
//! files.

use std::time::Duration;

use headroom_slo::{
    BurnAlert, ObjectiveConfig, RuleOptions, Severity, SloConfig, Slos, prometheus_rules_with,
};

fn refused(config: ObjectiveConfig) -> String {
    let error = Slos::new(SloConfig {
        objectives: vec![config],
    })
    .unwrap_err();
    format!("{}: {error}", error.field())
}

#[test]
fn invalid_objectives_are_refused_with_the_field_at_fault() {
    let secs = Duration::from_secs;
    let base = || ObjectiveConfig::availability("checkout", 0.999);
    let cases = [
        (ObjectiveConfig::availability("", 0.999), "name"),
        (ObjectiveConfig::availability("a\nb", 0.999), "name"),
        (ObjectiveConfig::availability("a\u{2028}b", 0.999), "name"),
        (ObjectiveConfig::availability("{{ $value }}", 0.999), "name"),
        (
            ObjectiveConfig::availability("x".repeat(129), 0.999),
            "name",
        ),
        (ObjectiveConfig::availability("checkout", 1.0), "target"),
        (
            ObjectiveConfig::availability("checkout", f64::NAN),
            "target",
        ),
        (
            ObjectiveConfig::latency("checkout", Duration::ZERO, 0.99),
            "sli.threshold",
        ),
        (base().period(Duration::from_millis(10)), "period"),
        (base().period(secs(1000 * 86_400)), "period"),
        (
            base().alerts([BurnAlert::new(Severity::Page, 14.4, secs(300), secs(3600))]),
            "alerts[0].short_window",
        ),
        (
            base().alerts([BurnAlert::new(
                Severity::Page,
                14.4,
                secs(40 * 86_400),
                secs(3600),
            )]),
            "alerts[0].long_window",
        ),
        (
            base().alerts([BurnAlert::new(
                Severity::Page,
                f64::NAN,
                secs(3600),
                secs(300),
            )]),
            "alerts[0].burn_rate",
        ),
        (
            base().alerts([BurnAlert::new(
                Severity::Page,
                14.4,
                secs(3600),
                Duration::from_micros(300_000_500),
            )]),
            "alerts[0].short_window",
        ),
        // 1000 x 0.1 % is 100 %: an error ratio cannot exceed it.
        (
            base().alerts([BurnAlert::new(
                Severity::Page,
                1000.0,
                secs(3600),
                secs(300),
            )]),
            "alerts[0].burn_rate",
        ),
    ];
    for (config, field) in cases {
        let message = refused(config.clone());
        assert!(
            message.starts_with(&format!("{field}: ")),
            "{config:?}: {message}"
        );
    }
}

/// A selector that would close the matchers and add its own query is refused, whether the
/// rules come from the objectives' configurations or from a built set of objectives.
#[test]
fn a_selector_that_escapes_its_braces_is_refused() {
    let objectives = vec![ObjectiveConfig::availability("checkout", 0.999)];
    let options = RuleOptions::default().selector(r#"job="a"} or vector(1) or {x="b""#);
    let from_configs = prometheus_rules_with(&objectives, &options).unwrap_err();
    assert_eq!(from_configs.field(), "selector");
    let slos = Slos::new(SloConfig { objectives }).unwrap();
    let from_slos = slos.prometheus_rules_with(&options).unwrap_err();
    assert_eq!(from_slos.field(), "selector");
    assert!(slos.prometheus_rules().starts_with("groups:"));
}

#[test]
fn two_objectives_may_not_share_a_name() {
    let error = Slos::new(SloConfig {
        objectives: vec![
            ObjectiveConfig::availability("checkout", 0.999),
            ObjectiveConfig::latency("checkout", Duration::from_millis(300), 0.99),
        ],
    })
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "objective `checkout`: name is used by another objective"
    );
}

#[cfg(feature = "serde")]
#[test]
fn objectives_load_from_a_file_and_unknown_fields_are_refused() {
    let config: SloConfig = serde_json::from_str(
        r#"{ "objectives": [
            { "name": "search", "sli": { "kind": "latency", "threshold": "250ms" }, "target": 0.99,
              "period": "7d",
              "alerts": [{ "severity": "page", "burn_rate": 10.0, "long_window": "1h", "short_window": "5m" }] }
        ] }"#,
    )
    .unwrap();
    assert_eq!(
        config.objectives[0],
        ObjectiveConfig::latency("search", Duration::from_millis(250), 0.99)
            .period(Duration::from_secs(7 * 86_400))
            .alerts([BurnAlert::new(
                Severity::Page,
                10.0,
                Duration::from_secs(3600),
                Duration::from_secs(300)
            )])
    );
    let misspelt = serde_json::from_str::<SloConfig>(
        r#"{ "objectives": [{ "name": "x", "sli": { "kind": "availability" }, "targte": 0.9 }] }"#,
    );
    assert!(
        misspelt
            .unwrap_err()
            .to_string()
            .contains("unknown field `targte`")
    );
    // A threshold given to the availability SLI (meant for a latency one) is refused too.
    let misplaced = serde_json::from_str::<SloConfig>(
        r#"{ "objectives": [{ "name": "x", "sli": { "kind": "availability", "threshold": "100ms" }, "target": 0.9 }] }"#,
    );
    assert!(misplaced.is_err(), "{misplaced:?}");
}

/// Every target in (0, 1) builds with the default alerts: they are the workbook's alerts that
/// can fire for it (a burn rate `b` needs an error ratio of `b × (1 − target)`, at most 100 %),
/// from code and from a file; an alert the user gives that cannot fire is still refused.
#[test]
fn every_target_builds_with_the_default_alerts_that_can_fire_for_it() {
    for target in [0.5, 0.8, 0.9, 0.93, 0.95, 0.99, 0.999] {
        for config in [
            ObjectiveConfig::availability("orders", target),
            ObjectiveConfig::latency("search", Duration::from_millis(250), target),
        ] {
            assert!(config.validate().is_ok(), "{target}");
            let expected: Vec<BurnAlert> = BurnAlert::workbook()
                .into_iter()
                .filter(|alert| alert.burn_rate * (1.0 - target) < 1.0)
                .collect();
            assert!(!expected.is_empty());
            assert_eq!(config.alerts, expected, "{target}");
        }
    }
    #[cfg(feature = "serde")]
    {
        let config: SloConfig = serde_json::from_str(
            r#"{ "objectives": [{ "name": "x", "sli": { "kind": "availability" }, "target": 0.9 }] }"#,
        )
        .unwrap();
        assert_eq!(
            config.objectives[0],
            ObjectiveConfig::availability("x", 0.9)
        );
        assert!(Slos::new(config).is_ok());
    }
    let impossible = ObjectiveConfig::availability("orders", 0.9).alerts(BurnAlert::workbook());
    assert!(refused(impossible).starts_with("alerts[0].burn_rate: "));
}

/// The default alerts spend the same share of the budget before they fire whatever the period
/// (the workbook's shares are for 30 days: 2 % in the page's long window, then 5 %, 10 %,
/// 10 %), from code and from a file; a period shorter than the workbook's longest window
/// still builds. Alerts given explicitly are kept as given.
#[test]
fn the_default_alerts_spend_the_workbook_shares_of_any_period() {
    let day = 86_400.0;
    let share = |alert: &BurnAlert, period: Duration| {
        alert.burn_rate * alert.long_window.as_secs_f64() / period.as_secs_f64()
    };
    let thirty_days = Duration::from_secs(30 * 86_400);
    let workbook: Vec<f64> = BurnAlert::workbook()
        .iter()
        .map(|alert| share(alert, thirty_days))
        .collect();
    for days in [1.0, 7.0, 28.0, 90.0] {
        let period = Duration::from_secs_f64(days * day);
        let config = ObjectiveConfig::availability("orders", 0.999).period(period);
        assert!(config.validate().is_ok(), "{days} days");
        assert_eq!(config.alerts.len(), 4, "{days} days");
        for (alert, expected) in config.alerts.iter().zip(&workbook) {
            let error = (share(alert, period) - expected).abs() / expected;
            assert!(
                error < 0.01,
                "{days} days: {alert:?} spends {}",
                share(alert, period)
            );
            assert!(alert.short_window < alert.long_window && alert.long_window <= period);
        }
        #[cfg(feature = "serde")]
        {
            let file: SloConfig = serde_json::from_str(&format!(
                r#"{{ "objectives": [{{ "name": "orders", "sli": {{ "kind": "availability" }}, "target": 0.999, "period": "{}s" }}] }}"#,
                period.as_secs()
            ))
            .unwrap();
            assert_eq!(file.objectives[0], config, "{days} days");
        }
    }
    let given = [BurnAlert::new(
        Severity::Page,
        10.0,
        Duration::from_secs(3600),
        Duration::from_secs(300),
    )];
    let kept = ObjectiveConfig::availability("orders", 0.999)
        .alerts(given)
        .period(Duration::from_secs(7 * 86_400));
    assert_eq!(kept.alerts, given);
    // Even when they are the 30-day workbook's, as a user pinning the classic windows gives.
    let pinned = ObjectiveConfig::availability("orders", 0.999)
        .alerts(BurnAlert::workbook())
        .period(Duration::from_secs(7 * 86_400));
    assert_eq!(pinned.alerts, BurnAlert::workbook());
}
