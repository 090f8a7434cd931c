//! What an objective promises, declared in code or loaded with serde.

use std::fmt;
use std::time::Duration;

use crate::ConfigError;

/// How a request is judged good.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(tag = "kind", rename_all = "snake_case", from = "SliFields")
)]
pub enum Sli {
    /// Good when the request succeeded.
    Availability,
    /// Good when the request succeeded within `threshold`.
    Latency {
        /// The slowest a good request may be.
        #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
        threshold: Duration,
    },
}

/// [`Sli`] as loaded: serde lets a unit variant of a tagged enum take any field, so each kind
/// is a struct variant here, and a field it does not take is refused.
#[cfg(feature = "serde")]
#[derive(serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum SliFields {
    Availability {},
    Latency {
        #[serde(with = "humantime_serde")]
        threshold: Duration,
    },
}

#[cfg(feature = "serde")]
impl From<SliFields> for Sli {
    fn from(fields: SliFields) -> Self {
        match fields {
            SliFields::Availability {} => Sli::Availability,
            SliFields::Latency { threshold } => Sli::Latency { threshold },
        }
    }
}

/// How urgent a burn-rate alert is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Severity {
    /// Wake someone: at this rate the budget is gone within days.
    Page,
    /// Look at it during working hours.
    Ticket,
}

impl Severity {
    /// `page` or `ticket`: the `severity` label of metrics and alerts.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Page => "page",
            Severity::Ticket => "ticket",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One multi-window burn-rate alert: it fires while the error budget burns faster than
/// `burn_rate` times the sustainable rate over both `long_window` and `short_window`.
///
/// The long window makes the alert significant (a share of the budget is really gone), the
/// short one makes it stop soon after the burn does.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct BurnAlert {
    /// How urgent the alert is.
    pub severity: Severity,
    /// The burn rate above which it fires: 1.0 spends exactly the budget over the period.
    pub burn_rate: f64,
    /// The window that makes the alert significant.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub long_window: Duration,
    /// The window that makes the alert reset soon after the burn stops.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub short_window: Duration,
}

const MINUTE: u64 = 60;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;

impl BurnAlert {
    /// An alert of `severity` firing above `burn_rate` over both windows.
    pub fn new(
        severity: Severity,
        burn_rate: f64,
        long_window: Duration,
        short_window: Duration,
    ) -> Self {
        Self {
            severity,
            burn_rate,
            long_window,
            short_window,
        }
    }

    /// The four alerts of the Google SRE workbook's multi-window, multi-burn-rate scheme, for
    /// a 30-day period: page at 14.4× over 1 h and 5 min (2 % of the budget in an hour) and at
    /// 6× over 6 h and 30 min (5 % in six hours); ticket at 3× over 1 day and 2 h (10 % in a
    /// day) and at 1× over 3 days and 6 h (10 % in three days).
    pub fn workbook() -> Vec<BurnAlert> {
        let secs = Duration::from_secs;
        vec![
            Self::new(Severity::Page, 14.4, secs(HOUR), secs(5 * MINUTE)),
            Self::new(Severity::Page, 6.0, secs(6 * HOUR), secs(30 * MINUTE)),
            Self::new(Severity::Ticket, 3.0, secs(DAY), secs(2 * HOUR)),
            Self::new(Severity::Ticket, 1.0, secs(3 * DAY), secs(6 * HOUR)),
        ]
    }

    /// The [`workbook`](Self::workbook) alerts that can fire for an objective of `target` over
    /// 30 days: a burn rate `b` fires at an error ratio above `b × (1 − target)`, which cannot
    /// exceed 100 %, so below a target of 0.9306 the 14.4× page is left out, below 0.8333 the
    /// 6× page, and below 0.6667 the 3× ticket.
    pub fn workbook_for(target: f64) -> Vec<BurnAlert> {
        Self::workbook_over(default_period(), target)
    }

    /// The [`workbook_for`](Self::workbook_for) alerts of `target` for a budget spent over
    /// `period`: every window is scaled by `period / 30 days` (to the whole second), so each
    /// alert fires when the same share of the budget is spent as over 30 days (the 14.4× page
    /// at 2 %). No window is shorter than a minute, so that a Prometheus scraping every 15 s
    /// has four samples in each for `rate` (a short window, which decides only when an alert
    /// stops, is held there for periods under 6 days; a long one for periods under 12 hours,
    /// whose alerts then spend more of their budget before they fire). An alert whose short
    /// window is then not shorter than its long one, or whose long window exceeds the period,
    /// is left out. The default alerts of an objective.
    pub fn workbook_over(period: Duration, target: f64) -> Vec<BurnAlert> {
        let scale = period.as_secs_f64() / default_period().as_secs_f64();
        let scaled = |window: Duration| {
            Duration::from_secs(((window.as_secs_f64() * scale).round() as u64).max(MINUTE))
        };
        Self::workbook()
            .into_iter()
            .filter(|alert| alert.burn_rate * (1.0 - target) < 1.0)
            .map(|alert| Self {
                long_window: scaled(alert.long_window),
                short_window: scaled(alert.short_window),
                ..alert
            })
            .filter(|alert| alert.short_window < alert.long_window && alert.long_window <= period)
            .collect()
    }
}

/// One objective: the share of good requests an operation promises over a period, and the
/// alerts that watch its error budget.
///
/// ```
/// use std::time::Duration;
/// use headroom_slo::ObjectiveConfig;
///
/// // 99.9 % of checkouts succeed, and 99 % succeed within 300 ms, over 30 days.
/// let available = ObjectiveConfig::availability("checkout", 0.999);
/// let fast = ObjectiveConfig::latency("checkout-latency", Duration::from_millis(300), 0.99);
/// assert_eq!(available.period, Duration::from_secs(30 * 24 * 3600));
/// assert_eq!(fast.alerts.len(), 4);
/// ```
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(from = "ObjectiveFile"))]
pub struct ObjectiveConfig {
    /// The objective's name: the `slo` label of its metrics and alerts.
    pub name: String,
    /// How a request is judged good.
    pub sli: Sli,
    /// The share of good requests promised, in (0, 1): 0.999 leaves an error budget of 0.1 %.
    pub target: f64,
    /// The period the budget is spent over (default 30 days).
    #[cfg_attr(
        feature = "serde",
        serde(default = "default_period", with = "humantime_serde")
    )]
    pub period: Duration,
    /// The burn-rate alerts (default [`BurnAlert::workbook_over`] the period, for the target).
    pub alerts: Vec<BurnAlert>,
    /// Whether the alerts were given (through [`alerts`](Self::alerts), or listed in a file):
    /// a new period keeps them.
    #[cfg_attr(feature = "serde", serde(skip))]
    alerts_given: Given,
}

/// How a value was built, not part of it: equal to every other.
#[derive(Clone, Copy, Debug, Default)]
struct Given(bool);

impl PartialEq for Given {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// An [`ObjectiveConfig`] as a file gives it: without alerts, the defaults for its target.
#[cfg(feature = "serde")]
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectiveFile {
    name: String,
    sli: Sli,
    target: f64,
    #[serde(default = "default_period", with = "humantime_serde")]
    period: Duration,
    alerts: Option<Vec<BurnAlert>>,
}

#[cfg(feature = "serde")]
impl From<ObjectiveFile> for ObjectiveConfig {
    fn from(file: ObjectiveFile) -> Self {
        Self {
            alerts_given: Given(file.alerts.is_some()),
            alerts: file
                .alerts
                .unwrap_or_else(|| BurnAlert::workbook_over(file.period, file.target)),
            name: file.name,
            sli: file.sli,
            target: file.target,
            period: file.period,
        }
    }
}

fn default_period() -> Duration {
    Duration::from_secs(30 * DAY)
}

impl ObjectiveConfig {
    /// `target` of the requests named `name` succeed.
    pub fn availability(name: impl Into<String>, target: f64) -> Self {
        Self::new(name, Sli::Availability, target)
    }

    /// `target` of the requests named `name` succeed within `threshold`.
    pub fn latency(name: impl Into<String>, threshold: Duration, target: f64) -> Self {
        Self::new(name, Sli::Latency { threshold }, target)
    }

    fn new(name: impl Into<String>, sli: Sli, target: f64) -> Self {
        Self {
            name: name.into(),
            sli,
            target,
            period: default_period(),
            alerts: BurnAlert::workbook_for(target),
            alerts_given: Given(false),
        }
    }

    /// Replaces the period the budget is spent over. Alerts still at their defaults for the
    /// old period become the defaults for the new one ([`BurnAlert::workbook_over`]); alerts
    /// given explicitly are kept.
    #[must_use]
    pub fn period(mut self, period: Duration) -> Self {
        if !self.alerts_given.0 && self.alerts == BurnAlert::workbook_over(self.period, self.target)
        {
            self.alerts = BurnAlert::workbook_over(period, self.target);
        }
        self.period = period;
        self
    }

    /// Replaces the burn-rate alerts.
    #[must_use]
    pub fn alerts(mut self, alerts: impl IntoIterator<Item = BurnAlert>) -> Self {
        self.alerts = alerts.into_iter().collect();
        self.alerts_given = Given(true);
        self
    }

    /// The error budget: the share of requests allowed to be bad.
    pub fn error_budget(&self) -> f64 {
        1.0 - self.target
    }

    /// Every window the objective evaluates, shortest first, without repeats: the alerts'
    /// windows and the period.
    pub fn windows(&self) -> Vec<Duration> {
        let mut windows: Vec<Duration> = self
            .alerts
            .iter()
            .flat_map(|alert| [alert.long_window, alert.short_window])
            .chain([self.period])
            .collect();
        windows.sort();
        windows.dedup();
        windows
    }

    /// Checks every setting, as building an [`Objective`](crate::Objective) does.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name = &self.name;
        // Names become label values and alert annotations, which Prometheus renders as Go
        // templates, in a YAML file.
        let unsafe_char = |c: char| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}');
        let length = name.chars().count();
        if !(1..=128).contains(&length)
            || name.chars().any(unsafe_char)
            || name.contains("{{")
            || name.contains("}}")
        {
            return Err(ConfigError::new(
                name,
                "name",
                "must be 1 to 128 characters, without control characters, line separators, `{{` or `}}`",
            ));
        }
        let whole_millis = |duration: Duration| duration.subsec_nanos().is_multiple_of(1_000_000);
        if !(self.target > 0.0 && self.target < 1.0) {
            return Err(ConfigError::new(name, "target", "must lie in (0, 1)"));
        }
        if let Sli::Latency { threshold } = self.sli
            && threshold.is_zero()
        {
            return Err(ConfigError::new(name, "sli.threshold", "must be positive"));
        }
        if !whole_millis(self.period) {
            return Err(ConfigError::new(
                name,
                "period",
                "must be whole milliseconds",
            ));
        }
        if self.period < Duration::from_secs(1) || self.period > Duration::from_secs(400 * DAY) {
            return Err(ConfigError::new(
                name,
                "period",
                "must lie between 1 s and 400 days",
            ));
        }
        for (index, alert) in self.alerts.iter().enumerate() {
            let field = |field: &str| format!("alerts[{index}].{field}");
            if alert.short_window < Duration::from_secs(1) {
                return Err(ConfigError::new(
                    name,
                    field("short_window"),
                    "must be at least 1 s",
                ));
            }
            for (window, length) in [
                ("short_window", alert.short_window),
                ("long_window", alert.long_window),
            ] {
                if !whole_millis(length) {
                    return Err(ConfigError::new(
                        name,
                        field(window),
                        "must be whole milliseconds",
                    ));
                }
            }
            if alert.short_window >= alert.long_window {
                return Err(ConfigError::new(
                    name,
                    field("short_window"),
                    "must be shorter than the long window",
                ));
            }
            if alert.long_window > self.period {
                return Err(ConfigError::new(
                    name,
                    field("long_window"),
                    "must not exceed the period",
                ));
            }
            // Above this the error ratio would have to exceed 100 %: the alert could never fire.
            if !(alert.burn_rate > 0.0 && alert.burn_rate * self.error_budget() < 1.0) {
                return Err(ConfigError::new(
                    name,
                    field("burn_rate"),
                    "must be positive and below 1 / (1 - target): above it the error ratio would have to exceed 100 %",
                ));
            }
        }
        Ok(())
    }
}

/// A set of objectives, as loaded from a file. [`Slos::new`](crate::Slos::new) and the rule
/// generators check it ([`SloConfig::validate`]).
///
/// ```
/// # #[cfg(feature = "serde")] {
/// let config: headroom_slo::SloConfig = serde_json::from_str(r#"{
///     "objectives": [
///         { "name": "checkout", "sli": { "kind": "availability" }, "target": 0.999 },
///         { "name": "search", "sli": { "kind": "latency", "threshold": "250ms" },
///           "target": 0.99, "period": "7d" }
///     ]
/// }"#).unwrap();
/// assert_eq!(config.objectives.len(), 2);
/// # }
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct SloConfig {
    /// The objectives, each with a distinct name.
    pub objectives: Vec<ObjectiveConfig>,
}

impl SloConfig {
    /// Checks every objective, and that no two share a name.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut names = std::collections::HashSet::new();
        for objective in &self.objectives {
            objective.validate()?;
            if !names.insert(objective.name.as_str()) {
                return Err(ConfigError::new(
                    &objective.name,
                    "name",
                    "is used by another objective",
                ));
            }
        }
        Ok(())
    }
}
