//! The generated Prometheus rules, checked by Prometheus's own `promtool` (installed by
//! `scripts/test.sh` from the `prometheus` package): they load, and on a scripted series they
//! fire when the objective computed in process fires.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use headroom_core::ManualClock;
use headroom_slo::{
    BurnAlert, Objective, ObjectiveConfig, RuleOptions, Severity, prometheus_rules,
    prometheus_rules_with,
};

fn promtool(args: &[&str]) -> String {
    let output = Command::new("promtool").args(args).output().unwrap_or_else(|error| {
        panic!("promtool could not run ({error}): install the `prometheus` package, as scripts/test.sh does")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

fn scratch(name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("headroom-slo-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn path(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn generated_rules_pass_promtool_check() {
    let objectives = [
        ObjectiveConfig::availability("checkout", 0.999),
        ObjectiveConfig::latency("search \"fast\" \\ path", Duration::from_millis(250), 0.99)
            .period(Duration::from_secs(7 * 86_400))
            .alerts([
                BurnAlert::new(
                    Severity::Page,
                    10.0,
                    Duration::from_secs(5400),
                    Duration::from_secs(90),
                ),
                BurnAlert::new(
                    Severity::Ticket,
                    2.0,
                    Duration::from_secs(86_400),
                    Duration::from_secs(7200),
                ),
            ]),
    ];
    let rules = prometheus_rules_with(
        &objectives,
        &RuleOptions::default().selector(r#"job="shop", env=~"prod.*""#),
    )
    .unwrap();
    let file = scratch("check.yml", &rules);
    let report = promtool(&["check", "rules", path(&file)]);
    // Per objective: a ratio per window, the budget left, an alert per severity.
    // checkout: 8 windows + 1 + 2; search: 5 windows (1m30s, 1h30m, 2h, 1d, 7d) + 1 + 2.
    assert!(report.contains("SUCCESS: 19 rules found"), "{report}");
}

/// Every name an objective may take gives groups no other objective's groups share:
/// Prometheus refuses a whole file that repeats a group's name.
#[test]
fn objectives_whose_names_extend_each_other_load_together() {
    let objectives = [
        ObjectiveConfig::availability("checkout", 0.999),
        ObjectiveConfig::availability("checkout-budget", 0.999),
        ObjectiveConfig::availability("budget-checkout", 0.999),
        ObjectiveConfig::availability("budget:checkout", 0.999),
    ];
    let rules = prometheus_rules(&objectives).unwrap();
    let file = scratch("extended-names.yml", &rules);
    let report = promtool(&["check", "rules", path(&file)]);
    // Per objective: 8 ratios, the budget left and 2 alerts.
    assert!(report.contains("SUCCESS: 44 rules found"), "{report}");
}

/// Seven hours at 1,000 requests a minute, then ten minutes at 20 % bad, then good again.
fn bad_in_minute(minute: u64) -> u64 {
    if (420..430).contains(&minute) { 200 } else { 0 }
}

/// Minute by minute, through the start and the end of a burn.
#[test]
fn prometheus_fires_the_page_when_the_objective_does() {
    let config = ObjectiveConfig::availability("checkout", 0.999);
    let rules = scratch(
        "page.yml",
        &prometheus_rules(std::slice::from_ref(&config)).unwrap(),
    );

    // In process: the same requests, a minute's worth at each minute mark.
    let time = ManualClock::new();
    let objective = Objective::with_clock(config, time.clock()).unwrap();
    let mut in_process = Vec::new();
    for minute in 0..=450_u64 {
        if minute > 0 {
            for request in 0..1_000 {
                objective.record(request >= bad_in_minute(minute - 1));
            }
        }
        if (415..=445).contains(&minute) {
            in_process.push((minute, objective.evaluate().firing(Severity::Page)));
        }
        time.advance(Duration::from_secs(60));
    }
    // Page at 14.4 = an error ratio of 1.44 % over 1 h and 5 min (or 0.6 % over 6 h and
    // 30 min, which 2,000 bad in 360,000 never reach). 2 minutes in: 5 min at 20 %, but the
    // hour at 400 bad in about 60,000. 8 minutes in: 1,600 in the hour. 20 minutes in: the
    // hour still holds 2,000 bad, but the last 5 minutes are clean.
    let firing_at = |minute: u64| {
        in_process
            .iter()
            .any(|&(at, firing)| at == minute && firing)
    };
    assert_eq!(
        (firing_at(422), firing_at(428), firing_at(440)),
        (false, true, false)
    );

    // In Prometheus: the counters as scraped every minute.
    let mut events = Vec::new();
    let mut bad = Vec::new();
    let mut bad_total = 0;
    for minute in 0..=450_u64 {
        events.push((minute * 1_000).to_string());
        bad.push(bad_total.to_string());
        bad_total += bad_in_minute(minute);
    }
    let alert = |minute: u64, firing: bool| {
        let expected = if firing {
            "\n        exp_alerts:\n          - exp_labels: {severity: page, slo: checkout}\n            exp_annotations:\n              summary: checkout is burning its error budget fast enough to page\n              runbook: https://github.com/headroom-rs/headroom/blob/main/docs/operations.md#runbook-headroomslopageburn"
        } else {
            "\n        exp_alerts: []"
        };
        format!("      - eval_time: {minute}m\n        alertname: HeadroomSloPageBurn{expected}\n")
    };
    let tests = format!(
        "rule_files:\n  - {rules}\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n      - series: 'headroom_slo_events_total{{slo=\"checkout\"}}'\n        values: '{events}'\n      - series: 'headroom_slo_bad_events_total{{slo=\"checkout\"}}'\n        values: '{bad}'\n    alert_rule_test:\n{alerts}",
        rules = path(&rules),
        events = events.join(" "),
        bad = bad.join(" "),
        alerts = in_process
            .iter()
            .map(|&(minute, firing)| alert(minute, firing))
            .collect::<String>(),
    );
    let file = scratch("page-test.yml", &tests);
    promtool(&["test", "rules", path(&file)]);
}

/// An objective over one day keeps each of its default alerts working in Prometheus: their
/// windows, scaled down with the period, are never shorter than a minute, so a scrape every
/// 15 s puts enough samples in each for `rate`. Each alert alone, over an hour of good
/// requests, then 20 % bad: quiet before, firing five minutes in.
#[test]
fn each_default_alert_of_a_one_day_objective_fires_in_prometheus() {
    let day = Duration::from_secs(86_400);
    let (mut events, mut bad, mut bad_total) = (Vec::new(), Vec::new(), 0_u64);
    for scrape in 0..=280_u64 {
        events.push((scrape * 250).to_string());
        bad.push(bad_total.to_string());
        if scrape >= 240 {
            bad_total += 50;
        }
    }
    let defaults = BurnAlert::workbook_over(day, 0.999);
    assert_eq!(defaults.len(), 4);
    for (i, alert) in defaults.into_iter().enumerate() {
        let config = ObjectiveConfig::availability("checkout", 0.999)
            .period(day)
            .alerts([alert]);
        let rules = scratch(
            &format!("one-day-{i}.yml"),
            &prometheus_rules(std::slice::from_ref(&config)).unwrap(),
        );
        let (name, severity, meaning) = match alert.severity {
            Severity::Page => ("HeadroomSloPageBurn", "page", "fast enough to page"),
            Severity::Ticket => (
                "HeadroomSloTicketBurn",
                "ticket",
                "steadily enough for a ticket",
            ),
        };
        let tests = format!(
            "rule_files:\n  - {rules}\nevaluation_interval: 15s\ntests:\n  - interval: 15s\n    input_series:\n      - series: 'headroom_slo_events_total{{slo=\"checkout\"}}'\n        values: '{events}'\n      - series: 'headroom_slo_bad_events_total{{slo=\"checkout\"}}'\n        values: '{bad}'\n    alert_rule_test:\n      - eval_time: 55m\n        alertname: {name}\n        exp_alerts: []\n      - eval_time: 65m\n        alertname: {name}\n        exp_alerts:\n          - exp_labels: {{severity: {severity}, slo: checkout}}\n            exp_annotations:\n              summary: checkout is burning its error budget {meaning}\n              runbook: https://github.com/headroom-rs/headroom/blob/main/docs/operations.md#runbook-{lower}\n",
            rules = path(&rules),
            events = events.join(" "),
            bad = bad.join(" "),
            lower = name.to_lowercase(),
        );
        let file = scratch(&format!("one-day-{i}-test.yml"), &tests);
        promtool(&["test", "rules", path(&file)]);
    }
}

/// Two environments share an objective's name in one Prometheus, each with its rules written
/// for its own selector: staging burning its budget pages for staging alone, and the page says
/// which environment it is about.
#[test]
fn rules_for_two_selectors_judge_each_environment_apart() {
    let config = ObjectiveConfig::availability("checkout", 0.999);
    let rules_for = |env: &str| {
        let rules = prometheus_rules_with(
            std::slice::from_ref(&config),
            &RuleOptions::default().selector(format!(r#"job="shop", env="{env}""#)),
        )
        .unwrap();
        scratch(&format!("{env}.yml"), &rules)
    };
    let (prod, staging) = (rules_for("prod"), rules_for("staging"));
    // Seventy minutes at 1,000 requests a minute in each; 20 % of staging's fail.
    let series = |name: &str, env: &str, per_minute: u64| {
        let values: Vec<String> = (0..=70_u64).map(|m| (m * per_minute).to_string()).collect();
        format!(
            "      - series: '{name}{{slo=\"checkout\", job=\"shop\", env=\"{env}\"}}'\n        values: '{}'\n",
            values.join(" ")
        )
    };
    let tests = format!(
        "rule_files:\n  - {prod}\n  - {staging}\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{inputs}    alert_rule_test:\n      - eval_time: 65m\n        alertname: HeadroomSloPageBurn\n        exp_alerts:\n          - exp_labels: {{severity: page, slo: checkout, job: shop, env: staging}}\n            exp_annotations:\n              summary: checkout is burning its error budget fast enough to page\n              runbook: https://github.com/headroom-rs/headroom/blob/main/docs/operations.md#runbook-headroomslopageburn\n",
        prod = path(&prod),
        staging = path(&staging),
        inputs = [
            series("headroom_slo_events_total", "prod", 1_000),
            series("headroom_slo_bad_events_total", "prod", 0),
            series("headroom_slo_events_total", "staging", 1_000),
            series("headroom_slo_bad_events_total", "staging", 200),
        ]
        .concat(),
    );
    let file = scratch("environments-test.yml", &tests);
    promtool(&["test", "rules", path(&file)]);
}
