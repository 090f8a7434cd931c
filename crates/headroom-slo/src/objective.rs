//! An objective at run time: requests recorded, windows evaluated, burn published.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use headroom_core::metrics::{Counter, Gauge};
use headroom_core::{Clock, Signal, Stopwatch, counter, gauge};
use parking_lot::Mutex;

use crate::events::{Counts, Events};
use crate::rules::prometheus_duration;
use crate::{BurnAlert, ConfigError, ObjectiveConfig, Severity, Sli};

/// How many level-0 buckets the shortest window spans.
const BUCKETS_PER_SHORTEST_WINDOW: u32 = 10;

/// An objective being measured: record each request's outcome, read its burn rates.
///
/// Recording is a clock read and one or two atomic adds into a fixed ring of time buckets; no
/// request is stored. The objective evaluates its windows each time a request opens a new
/// bucket (a tenth of the shortest window: every 30 s with the default alerts), whenever
/// [`evaluate`](Self::evaluate) is called, and on a timer with
/// [`evaluate_every`](Self::evaluate_every), and then:
///
/// - publishes `headroom_slo_events_total{slo}`, `headroom_slo_bad_events_total{slo}`,
///   `headroom_slo_burn_rate{slo, window}`, `headroom_slo_error_budget_remaining{slo}` and
///   `headroom_slo_burning{slo, severity}`;
/// - raises or lowers its [`signal`](Self::signal) per severity, which other parts read (a
///   load shedder refusing low priorities while the page alert fires, say).
///
/// An alert fires while the burn rate is above its threshold over both its windows, as the
/// generated Prometheus rules ([`crate::prometheus_rules`]) compute it from the two counters.
///
/// The objective judges this instance's own requests since it was built: in its first hour the
/// "1 h" window holds less than an hour, and the remaining budget covers the time since the
/// start, up to the period. The fleet's numbers over full windows are the generated rules'.
///
/// ```
/// use std::time::Duration;
/// use headroom_core::ManualClock;
/// use headroom_slo::{Objective, ObjectiveConfig, Severity};
///
/// let time = ManualClock::new();
/// let checkout = Objective::with_clock(ObjectiveConfig::availability("checkout", 0.999), time.clock())?;
/// // 55 minutes of good traffic, then five minutes in which 2 % fail: 20 times the rate
/// // that would spend the budget over the period.
/// for request in 0..12_000 {
///     checkout.record(request < 11_000 || request % 50 != 0);
///     time.advance(Duration::from_millis(300));
/// }
/// let status = checkout.evaluate();
/// let burn = status.window(Duration::from_secs(300)).unwrap().burn_rate;
/// assert!((burn - 20.0).abs() < 1e-9);
/// // Over the hour the burn is 20 / 12 = 1.67: short of the page's 14.4.
/// assert!(!status.firing(Severity::Page));
/// # Ok::<(), headroom_slo::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct Objective {
    inner: Arc<Inner>,
}

struct Inner {
    config: ObjectiveConfig,
    /// The windows evaluated, shortest first; the period is one of them.
    windows: Vec<Duration>,
    /// The slowest a good request may be, in nanoseconds (`u64::MAX` for availability).
    threshold: u64,
    origin: Stopwatch,
    events: Events,
    signals: Vec<(Severity, Signal)>,
    published: Mutex<Published>,
}

/// The metric handles, and the totals they were last given.
struct Published {
    counts: Counts,
    events: Counter,
    bad: Counter,
    burn_rates: Vec<Gauge>,
    budget_remaining: Gauge,
    burning: Vec<Gauge>,
}

/// A request's start, from [`Objective::start`].
#[derive(Clone, Copy, Debug)]
pub struct Started(u64);

impl Objective {
    /// Measures `config` on the system clock.
    pub fn new(config: ObjectiveConfig) -> Result<Self, ConfigError> {
        Self::with_clock(config, Clock::system())
    }

    /// Measures `config` on `clock` (a manual clock in tests).
    pub fn with_clock(config: ObjectiveConfig, clock: Clock) -> Result<Self, ConfigError> {
        config.validate()?;
        let windows = config.windows();
        let shortest = windows[0];
        let longest = windows[windows.len() - 1];
        let events = Events::new(shortest / BUCKETS_PER_SHORTEST_WINDOW, longest);
        let threshold = match config.sli {
            Sli::Availability => u64::MAX,
            Sli::Latency { threshold } => u64::try_from(threshold.as_nanos()).unwrap_or(u64::MAX),
        };
        let mut severities: Vec<Severity> = config.alerts.iter().map(|a| a.severity).collect();
        severities.sort();
        severities.dedup();
        let name = config.name.clone();
        let signals = severities
            .iter()
            .map(|&severity| (severity, Signal::new(format!("{name} {severity} burn"))))
            .collect();
        let published = Published {
            counts: Counts::default(),
            events: counter!("headroom_slo_events_total", "slo" => name.clone()),
            bad: counter!("headroom_slo_bad_events_total", "slo" => name.clone()),
            burn_rates: windows
                .iter()
                .map(|&window| {
                    gauge!("headroom_slo_burn_rate", "slo" => name.clone(), "window" => prometheus_duration(window))
                })
                .collect(),
            budget_remaining: gauge!("headroom_slo_error_budget_remaining", "slo" => name.clone()),
            burning: severities
                .iter()
                .map(|severity| gauge!("headroom_slo_burning", "slo" => name.clone(), "severity" => severity.as_str()))
                .collect(),
        };
        published.budget_remaining.set(1.0);
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                windows,
                threshold,
                origin: clock.stopwatch(),
                events,
                signals,
                published: Mutex::new(published),
            }),
        })
    }

    /// The objective's configuration.
    pub fn config(&self) -> &ObjectiveConfig {
        &self.inner.config
    }

    /// The objective's name.
    pub fn name(&self) -> &str {
        &self.inner.config.name
    }

    /// Records one request, good or bad as the caller judged it.
    #[inline]
    pub fn record(&self, good: bool) {
        let now = self.inner.origin.elapsed_nanos();
        self.count(now, !good);
    }

    /// Marks the start of a request whose outcome [`finish`](Self::finish) records; reads the
    /// clock only for a latency objective. A `Started` belongs to the objective that made it.
    #[inline]
    pub fn start(&self) -> Started {
        if self.inner.threshold == u64::MAX {
            Started(0)
        } else {
            Started(self.inner.origin.elapsed_nanos())
        }
    }

    /// Records a request started at `started` that `succeeded` or not: good when it succeeded
    /// (and, for a latency objective, within the threshold).
    #[inline]
    pub fn finish(&self, started: Started, succeeded: bool) {
        let now = self.inner.origin.elapsed_nanos();
        let good = succeeded && now.saturating_sub(started.0) <= self.inner.threshold;
        self.count(now, !good);
    }

    #[inline]
    fn count(&self, now: u64, bad: bool) {
        if self.inner.events.record(now, bad) {
            self.evaluate();
        }
    }

    /// Records a request started at `started` whose caller gave up before it finished (its
    /// future was dropped): bad for a latency objective once it has taken longer than the
    /// threshold, which it failed whatever its outcome would have been; otherwise not
    /// recorded, having no outcome.
    pub fn abandon(&self, started: Started) {
        let inner = &*self.inner;
        if inner.threshold == u64::MAX {
            return;
        }
        let now = inner.origin.elapsed_nanos();
        if now.saturating_sub(started.0) > inner.threshold {
            self.count(now, true);
        }
    }

    /// Evaluates the objective every `every` on its clock, for as long as the future runs:
    /// spawn it so that the gauges and the signals follow time even when few requests arrive
    /// (a signal that sheds traffic would otherwise wait for traffic to be lowered). An
    /// interval under a millisecond is taken as one millisecond.
    pub fn evaluate_every(&self, every: Duration) -> impl Future<Output = ()> + Send + 'static {
        // A zero wait may end at once, and a loop that never waits never gives its thread back.
        let every = every.max(Duration::from_millis(1));
        let objective = self.clone();
        async move {
            let clock = objective.inner.origin.clock().clone();
            loop {
                clock.sleep(every).await;
                objective.evaluate();
            }
        }
    }

    /// The signal raised while an alert of `severity` fires; `None` if the objective has no
    /// alert of that severity.
    pub fn signal(&self, severity: Severity) -> Option<Signal> {
        self.inner
            .signals
            .iter()
            .find(|(own, _)| *own == severity)
            .map(|(_, signal)| signal.clone())
    }

    /// Evaluates every window now, publishes the metrics and sets the signals.
    pub fn evaluate(&self) -> SloStatus {
        let inner = &*self.inner;
        // Held from the clock read to the publication, so that an evaluation of older data
        // never publishes over a newer one.
        let mut published = inner.published.lock();
        let now = inner.origin.elapsed_nanos();
        let (sums, all) = inner.events.sums(now, &inner.windows);
        let budget = inner.config.error_budget();
        let windows: Vec<WindowStatus> = inner
            .windows
            .iter()
            .zip(&sums)
            .map(|(&window, counts)| WindowStatus {
                window,
                granularity: inner.events.granularity(window),
                events: counts.total,
                bad: counts.bad,
                error_ratio: error_ratio(*counts),
                burn_rate: error_ratio(*counts) / budget,
            })
            .collect();
        let window = |window: Duration| {
            windows
                .iter()
                .find(|status| status.window == window)
                .expect("every alert window is evaluated")
        };
        let alerts: Vec<AlertStatus> = inner
            .config
            .alerts
            .iter()
            .map(|&alert| {
                let (long, short) = (window(alert.long_window), window(alert.short_window));
                // The generated rule's comparison: error ratio > burn rate * (1 - target).
                let threshold = alert.burn_rate * budget;
                AlertStatus {
                    alert,
                    long_burn_rate: long.burn_rate,
                    short_burn_rate: short.burn_rate,
                    firing: long.error_ratio > threshold && short.error_ratio > threshold,
                }
            })
            .collect();
        let status = SloStatus {
            objective: inner.config.name.clone(),
            error_budget_remaining: 1.0 - window(inner.config.period).burn_rate,
            events: all.total,
            bad: all.bad,
            windows,
            alerts,
        };
        for (severity, signal) in &inner.signals {
            signal.set(status.firing(*severity));
        }
        published.publish(&status, all, &inner.signals);
        status
    }
}

impl Published {
    fn publish(&mut self, status: &SloStatus, all: Counts, signals: &[(Severity, Signal)]) {
        // Evaluations publish one at a time, each with totals at least the last one's, so the
        // counters only move forwards.
        self.events
            .increment(all.total.saturating_sub(self.counts.total));
        self.bad.increment(all.bad.saturating_sub(self.counts.bad));
        self.counts = Counts {
            total: all.total.max(self.counts.total),
            bad: all.bad.max(self.counts.bad),
        };
        for (gauge, window) in self.burn_rates.iter().zip(&status.windows) {
            gauge.set(window.burn_rate);
        }
        self.budget_remaining.set(status.error_budget_remaining);
        for (gauge, (_, signal)) in self.burning.iter().zip(signals) {
            gauge.set(if signal.is_raised() { 1.0 } else { 0.0 });
        }
    }
}

/// The bad share of `counts` (0.0 when there are none).
fn error_ratio(counts: Counts) -> f64 {
    if counts.total == 0 {
        0.0
    } else {
        counts.bad as f64 / counts.total as f64
    }
}

impl fmt::Debug for Objective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Objective")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// An objective's state at one evaluation.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct SloStatus {
    /// The objective's name.
    pub objective: String,
    /// Every window evaluated, shortest first.
    pub windows: Vec<WindowStatus>,
    /// Every alert, in the configured order.
    pub alerts: Vec<AlertStatus>,
    /// The share of the period's error budget left: 1.0 untouched, 0.0 spent, below 0.0
    /// overspent.
    pub error_budget_remaining: f64,
    /// Requests recorded since the objective was built.
    pub events: u64,
    /// Bad requests among them.
    pub bad: u64,
}

impl SloStatus {
    /// The status of `window`, if the objective evaluates it.
    pub fn window(&self, window: Duration) -> Option<&WindowStatus> {
        self.windows.iter().find(|status| status.window == window)
    }

    /// Whether an alert of `severity` fires.
    pub fn firing(&self, severity: Severity) -> bool {
        self.alerts
            .iter()
            .any(|status| status.alert.severity == severity && status.firing)
    }
}

/// One window at one evaluation.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct WindowStatus {
    /// The window's length.
    pub window: Duration,
    /// How exact its edge is: every request younger than `window - granularity` is counted,
    /// none older than `window`.
    pub granularity: Duration,
    /// Requests in the window.
    pub events: u64,
    /// Bad requests in the window.
    pub bad: u64,
    /// The bad share (0.0 for an empty window).
    pub error_ratio: f64,
    /// The bad share divided by the error budget: 1.0 spends exactly the budget over the
    /// period.
    pub burn_rate: f64,
}

/// One alert at one evaluation.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct AlertStatus {
    /// The alert.
    pub alert: BurnAlert,
    /// The burn rate over its long window.
    pub long_burn_rate: f64,
    /// The burn rate over its short window.
    pub short_burn_rate: f64,
    /// Whether both windows' error ratios are above `burn_rate * (1 - target)`.
    pub firing: bool,
}
