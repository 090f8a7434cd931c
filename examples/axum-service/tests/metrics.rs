//! `GET /metrics` of the running service, after traffic, against the metrics the docs name and
//! the Grafana dashboard's queries.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// Metrics of parts this service does not build, by the part.
const NOT_BUILT_HERE: &[(&str, &[&str])] = &[
    // It has no answer to give in place of a product or a charge.
    ("fallback", &["headroom_breaker_fallbacks_total"]),
    // It writes its orders at once; write-behind is for services that batch their writes.
    (
        "write-behind",
        &[
            "headroom_jobs_write_behind_calls_total",
            "headroom_jobs_write_behind_writes_total",
            "headroom_jobs_write_behind_coalesced_total",
            "headroom_jobs_write_behind_failures_total",
            "headroom_jobs_write_behind_lag_seconds",
        ],
    ),
    // A resharding is an operation run on the fleet, not part of the service.
    (
        "shard migration",
        &[
            "headroom_shard_shadow_reads_total",
            "headroom_shard_migration_phase",
            "headroom_shard_migration_progress_ratio",
        ],
    ),
];

/// Every metric name the docs mention: `headroom_<crate>_...` words.
fn documented() -> BTreeSet<String> {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs");
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(&docs).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|ext| ext != "md") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let words = text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
        for word in words {
            let metric = [
                "cache",
                "limit",
                "breaker",
                "idempotency",
                "shard",
                "slo",
                "chaos",
                "jobs",
                "reload",
            ]
            .iter()
            .any(|part| word.starts_with(&format!("headroom_{part}_")));
            if metric && !word.ends_with('_') {
                names.insert(word.to_owned());
            }
        }
    }
    names
}

/// The metric names in the Grafana dashboard's queries, without the `_bucket`, `_sum` and
/// `_count` of histogram series.
fn dashboard() -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/grafana/headroom.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(!exprs.is_empty(), "no queries in the dashboard");
    let mut names = BTreeSet::new();
    for expr in exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("headroom_") {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| word.strip_suffix(suffix))
                    .unwrap_or(word);
                names.insert(family.to_owned());
            }
        }
    }
    names
}

fn collect_exprs<'a>(value: &'a serde_json::Value, exprs: &mut Vec<&'a str>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(expr)) => exprs.push(expr),
                    _ => collect_exprs(value, exprs),
                }
            }
        }
        serde_json::Value::Array(values) => {
            for value in values {
                collect_exprs(value, exprs);
            }
        }
        _ => {}
    }
}

/// The metric families of a Prometheus text exposition (`# TYPE <name> <type>` lines).
fn families(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn scrape() -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_axum-service"))
        .args(["--smoke", "--print-metrics"])
        .env_remove("REDIS_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (_, exposition) = stdout.split_once("# scrape\n").expect("a scrape printed");
    exposition.to_owned()
}

/// The metrics of parts this service does not build.
fn elsewhere() -> BTreeSet<&'static str> {
    NOT_BUILT_HERE
        .iter()
        .flat_map(|(_, names)| names.iter().copied())
        .collect()
}

#[test]
fn every_documented_metric_of_the_parts_it_builds_is_scraped() {
    let exposition = scrape();
    let scraped = families(&exposition);
    let elsewhere = elsewhere();
    let documented = documented();
    assert!(documented.len() > 50, "{documented:?}");
    let missing: Vec<&String> = documented
        .iter()
        .filter(|name| !elsewhere.contains(name.as_str()) && !scraped.contains(*name))
        .collect();
    assert!(
        missing.is_empty(),
        "documented but not scraped: {missing:?}\n{exposition}"
    );
    // The exclusions stay honest: each names a documented metric.
    for name in &elsewhere {
        assert!(documented.contains(*name), "{name} is not in the docs");
    }
    // And nothing is scraped that the docs do not name.
    let undocumented: Vec<&String> = scraped
        .iter()
        .filter(|name| name.starts_with("headroom_") && !documented.contains(*name))
        .collect();
    assert!(
        undocumented.is_empty(),
        "scraped but undocumented: {undocumented:?}"
    );
}

#[test]
fn the_dashboard_shows_every_documented_metric_and_only_those_that_exist() {
    let exposition = scrape();
    let scraped = families(&exposition);
    let elsewhere = elsewhere();
    let documented = documented();
    let shown = dashboard();
    let unknown: Vec<&String> = shown
        .iter()
        .filter(|name| !documented.contains(*name))
        .collect();
    assert!(
        unknown.is_empty(),
        "queried but not documented: {unknown:?}"
    );
    let absent: Vec<&String> = shown
        .iter()
        .filter(|name| !scraped.contains(*name) && !elsewhere.contains(name.as_str()))
        .collect();
    assert!(absent.is_empty(), "queried but not served: {absent:?}");
    let not_shown: Vec<&String> = documented
        .iter()
        .filter(|name| !shown.contains(*name))
        .collect();
    assert!(
        not_shown.is_empty(),
        "documented but not on the dashboard: {not_shown:?}"
    );
}
