//! The experiment: the switch every injection point reads, its current run, the draws, the
//! blast radius and the automatic stops.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use headroom_core::metrics::{Counter, Gauge};
use headroom_core::{Clock, Signal, counter, gauge};
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::config::{ExperimentConfig, FaultKind};
use crate::{ConfigError, StartError};

/// The strategies an injection point can apply. A point draws only those it supports, so a
/// fault configured on an experiment is never counted at a point that cannot return one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Strategies(u8);

impl Strategies {
    /// Delays.
    pub const LATENCY: Self = Self(1);
    /// Errors instead of the call.
    pub const FAULT: Self = Self(1 << 1);
    /// Substituted responses instead of the call.
    pub const OUTCOME: Self = Self(1 << 2);
    /// A hook run before the call.
    pub const BEHAVIOR: Self = Self(1 << 3);
    /// Calls held until the experiment stops.
    pub const ABORT: Self = Self(1 << 4);
    /// Bus messages dropped.
    pub const LOSS: Self = Self(1 << 5);

    /// The strategies of a backend call: latency, fault and abort.
    pub const BACKEND: Self = Self(Self::LATENCY.0 | Self::FAULT.0 | Self::ABORT.0);

    /// Both sets.
    #[must_use]
    pub const fn with(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// Whether every strategy of `other` is in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether `self` and `other` share a strategy.
    pub const fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }

    /// The strategies `config` injects (those with a rate above zero).
    pub(crate) fn of(config: &ExperimentConfig) -> Self {
        let on = |strategy: Self, rate: Option<f64>| {
            if rate.is_some_and(|rate| rate > 0.0) {
                strategy
            } else {
                Self(0)
            }
        };
        on(Self::LATENCY, config.latency.map(|latency| latency.rate))
            .with(on(Self::FAULT, config.fault.map(|fault| fault.rate)))
            .with(on(Self::OUTCOME, config.outcome.map(|rate| rate.rate)))
            .with(on(Self::BEHAVIOR, config.behavior.map(|rate| rate.rate)))
            .with(on(Self::ABORT, config.abort.map(|rate| rate.rate)))
            .with(on(Self::LOSS, config.loss.map(|rate| rate.rate)))
    }
}

/// Why an experiment stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// [`Experiment::stop`] was called.
    Manual,
    /// Its duration ran out.
    Ended,
    /// A stop signal was raised; its name.
    Signal(String),
    /// The fleet switch it followed was switched off, expired, or could not be read.
    Fleet,
}

impl StopReason {
    const LABELS: [&'static str; 4] = ["manual", "ended", "signal", "fleet"];

    /// The `reason` label, and the index of the stop counter.
    fn index(&self) -> usize {
        match self {
            Self::Manual => 0,
            Self::Ended => 1,
            Self::Signal(_) => 2,
            Self::Fleet => 3,
        }
    }
}

/// A fault-injection experiment: off until started, then injecting what its
/// [`ExperimentConfig`] says into every injection point built on it, until it is stopped, its
/// duration runs out, or one of its stop signals is raised.
///
/// Clones share the experiment (so do the injection points built on it); dropping the last one
/// ends a run still going. When it is off, an injection point costs one relaxed atomic load and
/// allocates nothing.
///
/// ```
/// use std::time::Duration;
/// use headroom_chaos::{Delay, Experiment, ExperimentConfig};
/// use headroom_core::Signal;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let checkout_burning = Signal::new("checkout fast burn");
/// let experiment = Experiment::builder("slow-inventory")
///     .stop_when(checkout_burning.clone())
///     .build()?;
/// experiment.start(
///     ExperimentConfig::new(Duration::from_secs(300))
///         .latency(0.1, Delay::Fixed(Duration::from_millis(200))),
/// )?;
/// assert!(experiment.is_running());
/// experiment.stop();
/// assert!(!experiment.is_running());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Experiment(Arc<Shared>);

struct Shared {
    name: Arc<str>,
    /// The one load an injection point pays while the experiment is off.
    on: AtomicBool,
    clock: Clock,
    stop_when: Box<[Signal]>,
    run: ArcSwapOption<Run>,
    /// Serialises starts and stops so a stop never clears a newer run.
    control: Mutex<Control>,
    /// Wakes the calls held by the abort strategy when a run stops.
    stopped: Notify,
    /// Each draw takes the next seed: reproducible for a given seed and order of calls.
    seed: AtomicU64,
    starts: AtomicU64,
    metrics: Metrics,
}

/// The last handle dropped ends a run still going: nothing can stop it later, and its end timer
/// gives up once the experiment is gone.
impl Drop for Shared {
    fn drop(&mut self) {
        let control = self.control.get_mut();
        if let Some(end_timer) = control.end_timer.take() {
            end_timer.abort();
        }
        if self.run.swap(None).is_none() {
            return;
        }
        self.on.store(false, Ordering::Relaxed);
        self.metrics.running.set(0.0);
        tracing::warn!(
            target: "headroom_chaos",
            experiment = %self.name,
            "chaos experiment dropped while running: stopped"
        );
    }
}

#[derive(Default)]
struct Control {
    last_stop: Option<StopReason>,
    /// The sequence number of the run that stopped last.
    #[cfg_attr(not(feature = "fleet"), allow(dead_code))]
    last_stopped: u64,
    /// The task that stops the current run at its end time.
    end_timer: Option<tokio::task::AbortHandle>,
}

struct Run {
    /// The strategies it injects: a call at a point that can apply none of them is not seen.
    injects: Strategies,
    /// Which start this is, so a follower stops only the run it started.
    #[cfg_attr(not(feature = "fleet"), allow(dead_code))]
    sequence: u64,
    config: ExperimentConfig,
    started: Instant,
    ends_at: Instant,
    seen: AtomicU64,
    radius: Mutex<Radius>,
}

#[derive(Default)]
struct Radius {
    affected: u64,
    second: u64,
    in_second: u32,
}

struct Metrics {
    latency: Counter,
    fault: Counter,
    outcome: Counter,
    behavior: Counter,
    abort: Counter,
    loss: Counter,
    spared: Counter,
    running: Gauge,
    /// Per stop reason, in [`StopReason::LABELS`] order.
    stops: [Counter; 4],
}

impl Metrics {
    fn new(name: &Arc<str>) -> Self {
        let injected = |strategy: &'static str| counter!("headroom_chaos_injected_total", "experiment" => name.clone(), "strategy" => strategy);
        Self {
            latency: injected("latency"),
            fault: injected("fault"),
            outcome: injected("outcome"),
            behavior: injected("behavior"),
            abort: injected("abort"),
            loss: injected("loss"),
            spared: counter!("headroom_chaos_spared_total", "experiment" => name.clone()),
            running: gauge!("headroom_chaos_running", "experiment" => name.clone()),
            stops: StopReason::LABELS.map(|reason| {
                counter!("headroom_chaos_stops_total", "experiment" => name.clone(), "reason" => reason)
            }),
        }
    }
}

/// Builds an [`Experiment`].
#[must_use]
pub struct ExperimentBuilder {
    name: String,
    clock: Clock,
    seed: Option<u64>,
    stop_when: Vec<Signal>,
}

impl Experiment {
    /// The longest name accepted, in bytes (it labels metrics and names the fleet switch).
    pub const MAX_NAME_LEN: usize = 128;

    /// An experiment named `name`: letters, digits, `-`, `_` and `.`.
    pub fn builder(name: impl Into<String>) -> ExperimentBuilder {
        ExperimentBuilder {
            name: name.into(),
            clock: Clock::default(),
            seed: None,
            stop_when: Vec::new(),
        }
    }

    /// The experiment's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The clock of its end times and delays.
    #[cfg(feature = "fleet")]
    pub(crate) fn clock(&self) -> &Clock {
        &self.0.clock
    }

    /// Switches the experiment on with `config`, for `config.duration` from now. If it was
    /// running, the new run replaces it: new settings, a new end time, counts from zero.
    ///
    /// Refused with [`StartError::Config`] if `config` is invalid, and with
    /// [`StartError::Halted`] while one of its stop signals is raised (the run would stop at
    /// once); either way nothing changes.
    pub fn start(&self, config: ExperimentConfig) -> Result<(), StartError> {
        config.validate()?;
        if let Some(signal) = self.0.stop_when.iter().find(|signal| signal.is_raised()) {
            return Err(StartError::Halted(signal.name().to_owned()));
        }
        let ends_at = self.0.clock.now() + config.duration;
        self.start_until(config, ends_at);
        Ok(())
    }

    /// Starts a validated run ending at `ends_at`; returns its sequence number.
    pub(crate) fn start_until(&self, config: ExperimentConfig, ends_at: Instant) -> u64 {
        let mut control = self.0.control.lock();
        let sequence = self.0.starts.fetch_add(1, Ordering::Relaxed) + 1;
        let run = Arc::new(Run {
            injects: Strategies::of(&config),
            sequence,
            started: self.0.clock.now(),
            ends_at,
            config,
            seen: AtomicU64::new(0),
            radius: Mutex::new(Radius::default()),
        });
        tracing::warn!(
            target: "headroom_chaos",
            experiment = %self.0.name,
            config = ?run.config,
            "chaos experiment started"
        );
        self.0.run.store(Some(Arc::clone(&run)));
        self.0.on.store(true, Ordering::Relaxed);
        control.last_stop = None;
        self.0.metrics.running.set(1.0);
        // Wake calls held by the run this one replaces.
        self.0.stopped.notify_waiters();
        let end_timer = self.spawn_end_timer(&run);
        if let Some(replaced) = std::mem::replace(&mut control.end_timer, end_timer) {
            replaced.abort();
        }
        sequence
    }

    /// Without traffic nobody would notice the end time or a raised stop signal (and behind a
    /// full bulkhead held calls let no new call come): a task stops the run at its end or when a
    /// stop signal is raised, so the `running` gauge and held calls follow it. Without a tokio
    /// runtime the next call or status read stops it instead.
    fn spawn_end_timer(&self, run: &Arc<Run>) -> Option<tokio::task::AbortHandle> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let clock = self.0.clock.clone();
        let remaining = run.ends_at.saturating_duration_since(clock.now());
        let signals = self.0.stop_when.clone();
        let shared = Arc::downgrade(&self.0);
        let run = Arc::downgrade(run);
        let timer = runtime.spawn(async move {
            let mut ended = std::pin::pin!(clock.sleep(remaining));
            loop {
                let raised = async {
                    if signals.is_empty() {
                        std::future::pending::<()>().await;
                    }
                    let each = signals.iter().map(|signal| Box::pin(signal.raised()));
                    futures_util::future::select_all(each).await;
                };
                let raised = std::pin::pin!(raised);
                let first = futures_util::future::select(ended.as_mut(), raised).await;
                let (Some(shared), Some(run)) = (shared.upgrade(), run.upgrade()) else {
                    return;
                };
                let experiment = Experiment(shared);
                match first {
                    futures_util::future::Either::Left(_) => {
                        return experiment.stop_run(&run, StopReason::Ended);
                    }
                    // A signal lowered again before this look waits for the next raise.
                    futures_util::future::Either::Right(_) => {
                        if !experiment.check_stops(&run, clock.now()) {
                            return;
                        }
                    }
                }
            }
        });
        Some(timer.abort_handle())
    }

    /// Switches the experiment off. Calls held by the abort strategy go on to their real call.
    pub fn stop(&self) {
        if let Some(run) = self.0.run.load_full() {
            self.stop_run(&run, StopReason::Manual);
        }
    }

    /// Why the run numbered `sequence` stopped, if it was the last to stop. Reading it first
    /// stops the current run if a stop signal is raised, so a follower notices with no traffic.
    #[cfg(feature = "fleet")]
    pub(crate) fn stop_reason_of(&self, sequence: u64) -> Option<StopReason> {
        if let Some(run) = self.0.run.load_full() {
            self.check_stops(&run, self.0.clock.now());
        }
        let control = self.0.control.lock();
        (control.last_stopped == sequence)
            .then(|| control.last_stop.clone())
            .flatten()
    }

    /// The current run's sequence number, if one is running.
    #[cfg(feature = "fleet")]
    pub(crate) fn running_sequence(&self) -> Option<u64> {
        self.0.run.load().as_ref().map(|run| run.sequence)
    }

    /// Stops the run numbered `sequence` if it is still the current one.
    #[cfg(feature = "fleet")]
    pub(crate) fn stop_started(&self, sequence: u64, reason: StopReason) {
        if let Some(run) = self
            .0
            .run
            .load_full()
            .filter(|run| run.sequence == sequence)
        {
            self.stop_run(&run, reason);
        }
    }

    /// Stops `run` if it is still the current one.
    fn stop_run(&self, run: &Arc<Run>, reason: StopReason) {
        let mut control = self.0.control.lock();
        let current = self.0.run.load();
        if !current
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, run))
        {
            return;
        }
        self.0.on.store(false, Ordering::Relaxed);
        self.0.run.store(None);
        self.0.metrics.running.set(0.0);
        self.0.metrics.stops[reason.index()].increment(1);
        tracing::warn!(
            target: "headroom_chaos",
            experiment = %self.0.name,
            reason = ?reason,
            "chaos experiment stopped"
        );
        control.last_stop = Some(reason);
        control.last_stopped = run.sequence;
        if let Some(end_timer) = control.end_timer.take() {
            end_timer.abort();
        }
        self.0.stopped.notify_waiters();
    }

    /// Whether the experiment is running now. Reading it stops a run past its end time or
    /// with a raised stop signal.
    pub fn is_running(&self) -> bool {
        self.status().running.is_some()
    }

    /// What the experiment is doing: its run, if any, and why the last one stopped.
    pub fn status(&self) -> Status {
        if let Some(run) = self.0.run.load_full() {
            self.check_stops(&run, self.0.clock.now());
        }
        let control = self.0.control.lock();
        let running = self.0.run.load_full().map(|run| RunStatus {
            config: run.config.clone(),
            remaining: run.ends_at.saturating_duration_since(self.0.clock.now()),
            seen: run.seen.load(Ordering::Relaxed),
            affected: run.radius.lock().affected,
        });
        Status {
            running,
            last_stop: control.last_stop.clone(),
        }
    }

    /// Stops `run` if it has ended or a stop signal is raised; whether it still runs.
    fn check_stops(&self, run: &Arc<Run>, now: Instant) -> bool {
        if now >= run.ends_at {
            self.stop_run(run, StopReason::Ended);
            return false;
        }
        if let Some(signal) = self.0.stop_when.iter().find(|signal| signal.is_raised()) {
            self.stop_run(run, StopReason::Signal(signal.name().to_owned()));
            return false;
        }
        true
    }

    /// Whether the experiment is switched on: one relaxed load. Injection points check it
    /// before anything else (a predicate, a draw).
    #[inline]
    pub fn is_on(&self) -> bool {
        self.0.on.load(Ordering::Relaxed)
    }

    /// Draws what to inject into one call at a point supporting `at`: `None` when the
    /// experiment is off (one relaxed load), when no strategy drew this call, or when the blast
    /// radius spares it.
    #[inline]
    pub fn draw(&self, at: Strategies) -> Option<Injection> {
        if !self.is_on() {
            return None;
        }
        self.draw_running(at)
    }

    #[cold]
    fn draw_running(&self, at: Strategies) -> Option<Injection> {
        // A guard, not a clone: no reference count is touched unless the call is injected.
        let current = self.0.run.load();
        let run = current.as_ref()?;
        let now = self.0.clock.now();
        if !self.check_stops(run, now) || !run.injects.intersects(at) {
            return None;
        }
        run.seen.fetch_add(1, Ordering::Relaxed);
        let config = &run.config;
        let mut rng = fastrand::Rng::with_seed(next_seed(&self.0.seed));
        let mut drawn = |strategy: Strategies, rate: Option<f64>| {
            at.contains(strategy) && rate.is_some_and(|rate| rng.f64() < rate)
        };
        let latency = drawn(
            Strategies::LATENCY,
            config.latency.map(|latency| latency.rate),
        );
        let behavior = drawn(Strategies::BEHAVIOR, config.behavior.map(|rate| rate.rate));
        let abort = drawn(Strategies::ABORT, config.abort.map(|rate| rate.rate));
        let fault = drawn(Strategies::FAULT, config.fault.map(|fault| fault.rate));
        let outcome = drawn(Strategies::OUTCOME, config.outcome.map(|rate| rate.rate));
        let loss = drawn(Strategies::LOSS, config.loss.map(|rate| rate.rate));
        // One call ends one way: held, failed, or answered.
        let end = if abort {
            Some(End::Abort)
        } else if fault {
            config.fault.map(|fault| End::Fault(fault.kind))
        } else if outcome {
            Some(End::Outcome)
        } else {
            None
        };
        if !(latency || behavior || loss || end.is_some()) {
            return None;
        }
        if !run.admit(now) {
            self.0.metrics.spared.increment(1);
            return None;
        }
        let delay = match config.latency {
            Some(settings) if latency => Some(settings.delay.sample(rng.f64())),
            _ => None,
        };
        let injection = Injection {
            experiment: self.clone(),
            run: Arc::clone(run),
            delay,
            behavior,
            end,
            loss,
            answered: AtomicBool::new(false),
        };
        injection.record();
        Some(injection)
    }
}

impl Run {
    /// Counts one more affected call if the blast radius allows it.
    fn admit(&self, now: Instant) -> bool {
        let radius = self.config.blast_radius;
        let seen = self.seen.load(Ordering::Relaxed);
        let mut state = self.radius.lock();
        let affected = state.affected + 1;
        // `affected / seen ≤ max_fraction`, without rounding the fraction.
        if affected as f64 > radius.max_fraction * seen as f64 {
            return false;
        }
        if let Some(per_second) = radius.max_per_second {
            let second = now.saturating_duration_since(self.started).as_secs();
            // A call that read the clock just before another moved the window on counts in
            // the newer second: the window never moves back.
            if second > state.second {
                state.second = second;
                state.in_second = 0;
            }
            if state.in_second >= per_second {
                return false;
            }
            state.in_second += 1;
        }
        state.affected = affected;
        true
    }
}

impl ExperimentBuilder {
    /// The clock of end times, delays and the per-second cap (the system clock by default).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Seeds the draws, so a test sees the same injections for the same sequence of calls
    /// (random by default).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Stops the experiment as soon as `signal` is raised, for example an SLO's page signal
    /// (`Objective::signal`) or one of the service's own. Watched from when a run starts (on a
    /// tokio runtime; without one, checked at every call the experiment sees while running),
    /// and by [`Experiment::status`]. May be given several times.
    pub fn stop_when(mut self, signal: Signal) -> Self {
        self.stop_when.push(signal);
        self
    }

    /// The experiment, off.
    pub fn build(self) -> Result<Experiment, ConfigError> {
        if !valid_name(&self.name) {
            return Err(ConfigError::new(
                "name",
                "must be 1 to 128 letters, digits, `-`, `_` or `.`",
            ));
        }
        let name: Arc<str> = self.name.into();
        Ok(Experiment(Arc::new(Shared {
            metrics: Metrics::new(&name),
            name,
            on: AtomicBool::new(false),
            clock: self.clock,
            stop_when: self.stop_when.into_boxed_slice(),
            run: ArcSwapOption::empty(),
            control: Mutex::new(Control::default()),
            stopped: Notify::new(),
            seed: AtomicU64::new(self.seed.unwrap_or_else(|| fastrand::u64(..))),
            starts: AtomicU64::new(0),
        })))
    }
}

/// The next seed of a SplitMix64 sequence: consecutive seeds of a counter give correlated first
/// draws (two calls in a row would fail together far less often than the rate says), so each
/// call's generator is seeded from the counter's mixed value.
fn next_seed(state: &AtomicU64) -> u64 {
    let mut z = state
        .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// An experiment's name: it labels metrics and is the key part of its fleet switch, so it
/// never carries a `{hash tag}` that would pick a Redis Cluster slot.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= Experiment::MAX_NAME_LEN
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'))
}

/// How an injected call ends, when it does not run as usual.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Abort,
    Fault(FaultKind),
    Outcome,
}

/// What one call gets: drawn by [`Experiment::draw`], already counted in the blast radius, and
/// its delay, hook, hold and loss in the metrics. Its fault or outcome is counted only when it
/// answers the call ([`Injection::answers`]): the run may end while the call waits. Injection
/// points built on an experiment apply it in this order: the hook, the delay, the hold, then
/// the fault or outcome instead of the call.
pub struct Injection {
    experiment: Experiment,
    run: Arc<Run>,
    delay: Option<Duration>,
    behavior: bool,
    end: Option<End>,
    loss: bool,
    /// Whether [`Injection::answers`] counted this call's answer: asked again, it counts
    /// nothing more.
    answered: AtomicBool,
}

impl Injection {
    /// The delay to add before the call.
    pub fn delay(&self) -> Option<Duration> {
        self.delay
    }

    /// Whether to run the point's hook.
    pub fn behavior(&self) -> bool {
        self.behavior
    }

    /// Whether to hold the call until the experiment stops (done by [`Injection::wait`]).
    pub fn abort(&self) -> bool {
        self.end == Some(End::Abort)
    }

    /// The fault to return instead of the call, with the kind a backend wrapper uses.
    pub fn fault(&self) -> Option<FaultKind> {
        match self.end {
            Some(End::Fault(kind)) => Some(kind),
            _ => None,
        }
    }

    /// Whether to answer with the point's substituted response instead of the call.
    pub fn outcome(&self) -> bool {
        self.end == Some(End::Outcome)
    }

    /// Whether to drop the bus message.
    pub fn loss(&self) -> bool {
        self.loss
    }

    /// Whether the run that drew this call still runs: not stopped, replaced, or out of time.
    pub fn is_running(&self) -> bool {
        let shared = &self.experiment.0;
        shared
            .run
            .load()
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, &self.run))
            && self.experiment.check_stops(&self.run, shared.clock.now())
    }

    /// The experiment's name, for the errors a point makes.
    pub fn experiment(&self) -> &str {
        self.experiment.name()
    }

    /// Whether the drawn fault or outcome answers the call instead of its real call: one was
    /// drawn and the run that drew it still runs. A call released by the run's end is made as
    /// without the experiment, its fault or outcome not injected. A `true` is counted in
    /// `headroom_chaos_injected_total` and logged once, however often it is asked: a point
    /// asks after [`Injection::wait`], as it answers the call (a point built on
    /// [`Experiment::draw`] asks this, not [`Injection::is_running`], or its faults go
    /// uncounted).
    pub fn answers(&self) -> bool {
        let (fault, outcome) = (self.fault().is_some(), self.outcome());
        if !(fault || outcome) || !self.is_running() {
            return false;
        }
        if !self.answered.swap(true, Ordering::Relaxed) {
            let metrics = &self.experiment.0.metrics;
            if fault {
                metrics.fault.increment(1);
            } else {
                metrics.outcome.increment(1);
            }
            self.log(None, false, false, fault, outcome, false);
        }
        true
    }

    /// Waits out the delay, or for an aborted call holds until the run ends. Either ends when
    /// the run does (stopped, replaced, or out of time): stopping an experiment releases every
    /// call it is delaying or holding, which then asks [`Injection::answers`]. A caller's
    /// timeout usually ends a hold first.
    pub async fn wait(&self) {
        let delay = self.delay.filter(|delay| !delay.is_zero());
        if delay.is_none() && !self.abort() {
            return;
        }
        // Held: until the run ends. Delayed only: the delay, cut short by the run's end.
        let limit = if self.abort() { None } else { delay };
        self.while_running(limit).await;
    }

    /// Sleeps for `limit` (forever if `None`), but no longer than this call's run lasts: it
    /// wakes at the run's end time, when the run is stopped, and when another replaces it.
    async fn while_running(&self, limit: Option<Duration>) {
        let shared = &self.experiment.0;
        let to_end = self
            .run
            .ends_at
            .saturating_duration_since(shared.clock.now());
        let sleep = shared
            .clock
            .sleep(limit.map_or(to_end, |limit| limit.min(to_end)));
        let stopped = async {
            loop {
                let notified = shared.stopped.notified();
                let mut notified = std::pin::pin!(notified);
                notified.as_mut().enable();
                let current = shared.run.load();
                if !current
                    .as_ref()
                    .is_some_and(|current| Arc::ptr_eq(current, &self.run))
                {
                    return;
                }
                notified.await;
            }
        };
        futures_util::future::select(std::pin::pin!(sleep), std::pin::pin!(stopped)).await;
    }

    /// Counts and logs what applies as soon as the call is drawn; the fault or outcome waits
    /// for [`Injection::answers`].
    fn record(&self) {
        let metrics = &self.experiment.0.metrics;
        let strategies = [
            (self.delay.is_some(), &metrics.latency),
            (self.behavior, &metrics.behavior),
            (self.abort(), &metrics.abort),
            (self.loss, &metrics.loss),
        ];
        let mut any = false;
        for (injected, counter) in strategies {
            if injected {
                counter.increment(1);
                any = true;
            }
        }
        if any {
            self.log(
                self.delay,
                self.behavior,
                self.abort(),
                false,
                false,
                self.loss,
            );
        }
    }

    /// One `chaos injected` event, with every field, so the events of one call read alike.
    fn log(
        &self,
        delay: Option<Duration>,
        behavior: bool,
        abort: bool,
        fault: bool,
        outcome: bool,
        loss: bool,
    ) {
        tracing::info!(
            target: "headroom_chaos",
            experiment = %self.experiment.0.name,
            delay_ms = delay.map(|delay| delay.as_secs_f64() * 1e3),
            behavior,
            abort,
            fault,
            outcome,
            loss,
            "chaos injected"
        );
    }
}

impl fmt::Debug for Injection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Injection")
            .field("experiment", &self.experiment.name())
            .field("delay", &self.delay)
            .field("behavior", &self.behavior)
            .field("end", &self.end)
            .field("loss", &self.loss)
            .finish()
    }
}

/// The state of an experiment ([`Experiment::status`]).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Status {
    /// The current run, if the experiment is on.
    pub running: Option<RunStatus>,
    /// Why the last run stopped, if one stopped since the last start.
    pub last_stop: Option<StopReason>,
}

/// A running experiment.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct RunStatus {
    /// Its settings.
    pub config: ExperimentConfig,
    /// The time left before it stops by itself.
    pub remaining: Duration,
    /// The calls it has seen.
    pub seen: u64,
    /// The calls it has affected.
    pub affected: u64,
}

impl fmt::Debug for Experiment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Experiment")
            .field("name", &self.name())
            .field("on", &self.0.on.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A boxed future, for the injected path only.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
