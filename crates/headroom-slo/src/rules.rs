//! Prometheus recording and alerting rules generated from the objectives' declarations.

use std::fmt::Write as _;
use std::time::Duration;

use crate::{ConfigError, ObjectiveConfig, Severity, SloConfig};

/// How the rules are written.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RuleOptions {
    /// The page the alerts' `runbook` annotation points into (the runbooks' anchors are
    /// added). Default: headroom's operations guide.
    pub runbook_url: String,
    /// Label matchers every counter selector gets besides `slo`, such as
    /// `job="shop", env="production"`, so that instances of another service or environment
    /// sharing an objective's name are not counted. The recorded series keep the labels it
    /// picks with `=` or `=~`, and the alerts and the budget select them with the same
    /// matchers: rules written for two selectors, loaded into one Prometheus, record and
    /// alert apart, and an alert carries those labels. Default: none.
    pub selector: String,
}

impl Default for RuleOptions {
    fn default() -> Self {
        Self {
            runbook_url: "https://github.com/headroom-rs/headroom/blob/main/docs/operations.md"
                .to_owned(),
            selector: String::new(),
        }
    }
}

impl RuleOptions {
    /// Sets the runbook page.
    #[must_use]
    pub fn runbook_url(mut self, url: impl Into<String>) -> Self {
        self.runbook_url = url.into();
        self
    }

    /// Sets the extra label matchers.
    #[must_use]
    pub fn selector(mut self, selector: impl Into<String>) -> Self {
        self.selector = selector.into();
        self
    }
}

/// The Prometheus rule file (YAML) that computes, from `headroom_slo_events_total` and
/// `headroom_slo_bad_events_total`, what the objectives compute in process, with the default
/// [`RuleOptions`]. Per objective:
///
/// - a group `headroom-slo/<name>` with a recording rule
///   `headroom_slo:error_ratio:rate<window>{slo}` per alert window, and an alert per severity,
///   `HeadroomSloPageBurn` or `HeadroomSloTicketBurn`, that fires while the error ratio is
///   above `burn_rate * (1 - target)` over both windows of any of its alerts, labelled `slo`
///   and `severity`, with `summary` and `runbook` annotations;
/// - a group `headroom-slo-budget/<name>`, evaluated every 5 minutes, with the period's ratio
///   and `headroom_slo:error_budget_remaining{slo}`. It reads the counters over the whole
///   period: Prometheus must keep them that long (`--storage.tsdb.retention.time`, 15 days by
///   default), or the budget covers only what it keeps.
///
/// The rules sum over every instance, so they judge the fleet; each instance's
/// [`Objective`](crate::Objective) judges its own requests. The objectives are checked first,
/// as [`SloConfig::validate`] does.
///
/// ```
/// use headroom_slo::{ObjectiveConfig, prometheus_rules};
///
/// let rules = prometheus_rules(&[ObjectiveConfig::availability("checkout", 0.999)])?;
/// assert!(rules.contains("record: \"headroom_slo:error_ratio:rate5m\""));
/// assert!(rules.contains("alert: \"HeadroomSloPageBurn\""));
/// # Ok::<(), headroom_slo::ConfigError>(())
/// ```
pub fn prometheus_rules(objectives: &[ObjectiveConfig]) -> Result<String, ConfigError> {
    prometheus_rules_with(objectives, &RuleOptions::default())
}

/// [`prometheus_rules`] with `options`.
pub fn prometheus_rules_with(
    objectives: &[ObjectiveConfig],
    options: &RuleOptions,
) -> Result<String, ConfigError> {
    SloConfig {
        objectives: objectives.to_vec(),
    }
    .validate()?;
    if options.selector.contains(['{', '}', '\n']) {
        return Err(ConfigError::new(
            "",
            "selector",
            "must be label matchers only, without braces or line breaks",
        ));
    }
    Ok(write(objectives, options))
}

/// The rules of objectives already checked.
pub(crate) fn write(objectives: &[ObjectiveConfig], options: &RuleOptions) -> String {
    let mut out = String::from("groups:\n");
    for objective in objectives {
        write_groups(&mut out, objective, options);
    }
    out
}

fn write_groups(out: &mut String, objective: &ObjectiveConfig, options: &RuleOptions) {
    let name = &objective.name;
    let slo = promql_string(name);
    let selector = options.selector.trim();
    let matchers = if selector.is_empty() {
        format!("slo={slo}")
    } else {
        format!("slo={slo}, {selector}")
    };
    // The recorded series keep the labels the selector picks (by `=` or `=~`), and everything
    // that reads them selects them as the counters were: rules written for two selectors
    // (two environments sharing an objective's name) record and alert apart.
    let sum = match selected_labels(selector).join(", ") {
        labels if labels.is_empty() => "sum".to_owned(),
        labels => format!("sum by ({labels})"),
    };
    let ratio = |out: &mut String, window: Duration| {
        let range = prometheus_duration(window);
        let expr = format!(
            "{sum}(rate(headroom_slo_bad_events_total{{{matchers}}}[{range}])) / {sum}(rate(headroom_slo_events_total{{{matchers}}}[{range}]))"
        );
        write_rule(
            out,
            "record",
            &ratio_rule(window),
            &expr,
            &[("slo", name)],
            &[],
        );
    };
    let _ = writeln!(
        out,
        "  - name: {}",
        yaml_string(&format!("headroom-slo/{name}"))
    );
    let _ = writeln!(out, "    rules:");
    for window in objective.windows() {
        if window != objective.period {
            ratio(out, window);
        }
    }
    write_alerts(out, objective, options, &matchers);

    // The two prefixes differ before the name starts, so no objective's name makes one of its
    // groups another's: Prometheus refuses a file that repeats a group's name.
    let budget_group = format!("headroom-slo-budget/{name}");
    let _ = writeln!(out, "  - name: {}", yaml_string(&budget_group));
    let _ = writeln!(out, "    interval: 5m");
    let _ = writeln!(out, "    rules:");
    ratio(out, objective.period);
    let expr = format!(
        "1 - {}{{{matchers}}} / (1 - {:?})",
        ratio_rule(objective.period),
        objective.target
    );
    write_rule(
        out,
        "record",
        "headroom_slo:error_budget_remaining",
        &expr,
        &[("slo", name)],
        &[],
    );
}

fn write_alerts(
    out: &mut String,
    objective: &ObjectiveConfig,
    options: &RuleOptions,
    matchers: &str,
) {
    let name = &objective.name;
    let target = objective.target;
    for severity in [Severity::Page, Severity::Ticket] {
        let pairs: Vec<String> = objective
            .alerts
            .iter()
            .filter(|alert| alert.severity == severity)
            .map(|alert| {
                let threshold = format!("({:?} * (1 - {target:?}))", alert.burn_rate);
                format!(
                    "({long}{{{matchers}}} > {threshold} and {short}{{{matchers}}} > {threshold})",
                    long = ratio_rule(alert.long_window),
                    short = ratio_rule(alert.short_window),
                )
            })
            .collect();
        if pairs.is_empty() {
            continue;
        }
        let (alert, meaning) = match severity {
            Severity::Page => ("HeadroomSloPageBurn", "fast enough to page"),
            Severity::Ticket => ("HeadroomSloTicketBurn", "steadily enough for a ticket"),
        };
        let summary = format!("{name} is burning its error budget {meaning}");
        // The anchor of the runbook's heading, "Runbook: <alert>".
        let runbook = format!("{}#runbook-{}", options.runbook_url, alert.to_lowercase());
        write_rule(
            out,
            "alert",
            alert,
            &pairs.join(" or "),
            &[("slo", name), ("severity", severity.as_str())],
            &[("summary", &summary), ("runbook", &runbook)],
        );
    }
}

/// The names of the labels `selector` picks values of (`name="v"` or `name=~"re"`), sorted;
/// matchers that exclude (`!=`, `!~`) pick none.
fn selected_labels(selector: &str) -> Vec<&str> {
    // Split at the commas outside quoted values.
    let mut quoted = false;
    let mut escaped = false;
    let mut start = 0;
    let mut matchers = Vec::new();
    for (at, c) in selector.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                matchers.push(&selector[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    matchers.push(&selector[start..]);
    let mut labels: Vec<&str> = matchers
        .into_iter()
        .filter_map(|matcher| {
            let matcher = matcher.trim_start();
            let end = matcher
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(matcher.len());
            let (name, rest) = matcher.split_at(end);
            (!name.is_empty() && rest.trim_start().starts_with('=')).then_some(name)
        })
        .collect();
    labels.sort_unstable();
    labels.dedup();
    labels
}

/// The recording rule that holds the error ratio over `window`.
fn ratio_rule(window: Duration) -> String {
    format!(
        "headroom_slo:error_ratio:rate{}",
        prometheus_duration(window)
    )
}

fn write_rule(
    out: &mut String,
    kind: &str,
    name: &str,
    expr: &str,
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
) {
    let _ = writeln!(out, "      - {kind}: {}", yaml_string(name));
    let _ = writeln!(out, "        expr: {}", yaml_string(expr));
    for (section, pairs) in [("labels", labels), ("annotations", annotations)] {
        if pairs.is_empty() {
            continue;
        }
        let _ = writeln!(out, "        {section}:");
        for (key, value) in pairs {
            let _ = writeln!(out, "          {key}: {}", yaml_string(value));
        }
    }
}

/// `duration` as Prometheus writes one: `30d`, `6h`, `1h30m`, `250ms`.
pub(crate) fn prometheus_duration(duration: Duration) -> String {
    const UNITS: [(&str, u128); 5] = [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ];
    let mut millis = duration.as_millis();
    if millis == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, size) in UNITS {
        if millis >= size {
            let _ = write!(out, "{}{unit}", millis / size);
            millis %= size;
        }
    }
    out
}

/// A YAML double-quoted scalar. Names carry no control characters (the configuration refuses
/// them), so quotes and backslashes are all that need escaping.
fn yaml_string(value: &str) -> String {
    format!("\"{}\"", escape(value))
}

/// A PromQL double-quoted string: the same escaping.
fn promql_string(value: &str) -> String {
    format!("\"{}\"", escape(value))
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_as_prometheus_reads_them() {
        let cases = [
            (Duration::from_secs(300), "5m"),
            (Duration::from_secs(3600), "1h"),
            (Duration::from_secs(5400), "1h30m"),
            (Duration::from_secs(30 * 86_400), "30d"),
            (Duration::from_millis(1500), "1s500ms"),
        ];
        for (duration, written) in cases {
            assert_eq!(prometheus_duration(duration), written);
        }
    }
}
