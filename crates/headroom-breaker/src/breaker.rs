//! The circuit breaker: stop calling a dependency that is failing, probe it, resume.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use headroom_core::metrics::{Counter, Gauge};
use headroom_core::{Clock, Stopwatch};
use parking_lot::Mutex;
use tokio::sync::broadcast;
use tracing::Instrument;

use crate::config::{BreakerConfig, WindowConfig};
use crate::error::{CircuitOpen, ConfigError, Error, Predicate};
use crate::window::{Sample, Window};

/// Where a breaker is in its cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum State {
    /// Calls go through and are counted.
    Closed,
    /// Calls are refused until the open duration has passed.
    Open,
    /// A bounded number of probe calls go through; the rest are refused.
    HalfOpen,
    /// Refused by hand until [`CircuitBreaker::reset`].
    Isolated,
}

impl State {
    const fn from_bits(bits: u64) -> Self {
        match bits & 3 {
            CLOSED => Self::Closed,
            OPEN => Self::Open,
            HALF_OPEN => Self::HalfOpen,
            _ => Self::Isolated,
        }
    }

    const ALL: [Self; 4] = [Self::Closed, Self::Open, Self::HalfOpen, Self::Isolated];

    const fn bits(self) -> u64 {
        match self {
            Self::Closed => CLOSED,
            Self::Open => OPEN,
            Self::HalfOpen => HALF_OPEN,
            Self::Isolated => ISOLATED,
        }
    }

    /// The name used in metrics and traces.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
            Self::Isolated => "isolated",
        }
    }
}

/// Why a breaker changed state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// The failure ratio reached its threshold with enough calls in the window.
    FailureRatio,
    /// The slow-call ratio reached its threshold with enough calls in the window.
    SlowCallRatio,
    /// The open duration passed.
    OpenElapsed,
    /// Every half-open probe succeeded.
    ProbesSucceeded,
    /// A half-open probe failed or was slow.
    ProbeFailed,
    /// The probes did not finish within the half-open maximum wait.
    ProbesStalled,
    /// [`CircuitBreaker::isolate`] was called.
    Isolated,
    /// [`CircuitBreaker::reset`] was called.
    Reset,
}

/// A state change, as sent to [`CircuitBreaker::subscribe`] receivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Transition {
    /// The state left.
    pub from: State,
    /// The state entered.
    pub to: State,
    /// Why.
    pub reason: Reason,
    /// When, on the breaker's clock.
    pub at: Instant,
}

const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
const ISOLATED: u64 = 3;
const PROBE_COUNT_MASK: u64 = u32::MAX as u64;

/// The admission a call holds: the state word it was admitted under and its start time.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ticket {
    word: u64,
    start_nanos: u64,
}

/// How an admitted call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    Failure,
    /// An error the classifier says is not the dependency's fault.
    Ignored,
    /// The call's future was dropped before it finished.
    Cancelled,
}

impl Outcome {
    /// The `outcome` label of `headroom_breaker_calls_total`.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Ignored => "ignored",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Counters registered once, so that recording a call costs one handle increment.
struct Metrics {
    success: Counter,
    failure: Counter,
    ignored: Counter,
    cancelled: Counter,
    rejected: Counter,
    slow: Counter,
    state: Gauge,
    /// By `from` and `to` state; none from a state to itself.
    transitions: [[Option<Counter>; 4]; 4],
}

impl Metrics {
    fn new(name: &Arc<str>) -> Self {
        let calls = |outcome: &'static str| headroom_core::counter!("headroom_breaker_calls_total", "breaker" => name.to_string(), "outcome" => outcome);
        Self {
            success: calls("success"),
            failure: calls("failure"),
            ignored: calls("ignored"),
            cancelled: calls("cancelled"),
            rejected: calls("rejected"),
            slow: headroom_core::counter!("headroom_breaker_slow_calls_total", "breaker" => name.to_string()),
            state: headroom_core::gauge!("headroom_breaker_state", "breaker" => name.to_string()),
            transitions: State::ALL.map(|from| {
                State::ALL.map(|to| {
                    (from != to).then(|| {
                        headroom_core::counter!(
                            "headroom_breaker_transitions_total",
                            "breaker" => name.to_string(),
                            "from" => from.as_str(),
                            "to" => to.as_str(),
                        )
                    })
                })
            }),
        }
    }
}

/// Bookkeeping changed only while making a transition.
struct Recovery {
    /// Openings since the breaker was last closed: drives the open-duration backoff.
    opens: u32,
    probes_succeeded: u32,
}

/// The breaker state every clone shares.
pub(crate) struct Shared {
    name: Arc<str>,
    /// Replaced whole at run time ([`CircuitBreaker::reconfigure`]); read where a decision is
    /// made, not on a closed call's path.
    config: ArcSwap<BreakerConfig>,
    /// Nanoseconds since the breaker was built, on its clock.
    time: Stopwatch,
    /// Generation (upper 62 bits) and state (lower 2 bits): one load tells a call what to do,
    /// and a result recorded under an older generation is dropped.
    state: AtomicU64,
    open_until: AtomicU64,
    /// When the wait on running probes began: the start of the half-open phase, then each
    /// probe that succeeded or was admitted with none running. Probes that run
    /// `half_open_max_wait` past it without one finishing count as stalled.
    probes_waited_since: AtomicU64,
    /// Half-open probes admitted (lower 32 bits), tagged with the generation (upper 32 bits),
    /// so that a late release can never touch the count of a later half-open phase.
    probes: AtomicU64,
    recovery: Mutex<Recovery>,
    window: Window,
    /// A time window's bucket epoch at its last judgement: within one epoch no call leaves
    /// the window, so a success cannot raise a ratio and needs no judgement.
    judged_epoch: AtomicU64,
    /// The last judgement found fewer than `minimum_calls`: the next call may complete them.
    short: AtomicBool,
    /// A call taking longer than this many nanoseconds is slow; [`NOT_TIMED`] when slow
    /// calls are ignored.
    slow_nanos: AtomicU64,
    events: broadcast::Sender<Transition>,
    metrics: Metrics,
}

/// No slow-call limit, or (as a ticket's start) a call admitted while there was none.
const NOT_TIMED: u64 = u64::MAX;

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// The slow-call limit of `config` in nanoseconds, or [`NOT_TIMED`].
fn slow_nanos(config: &BreakerConfig) -> u64 {
    match config.slow_call_ratio {
        Some(_) => nanos(config.slow_call_duration).min(NOT_TIMED - 1),
        None => NOT_TIMED,
    }
}

/// The state word of the generation after `word`'s, in state `to`.
fn next_generation(word: u64, to: State) -> u64 {
    (((word >> 2) + 1) << 2) | to.bits()
}

fn probe_tag(word: u64) -> u64 {
    (word >> 2) << 32
}

impl Shared {
    fn now_nanos(&self) -> u64 {
        self.time.elapsed_nanos()
    }

    fn rejected(&self, state: State, retry_after: Option<Duration>) -> CircuitOpen {
        self.metrics.rejected.increment(1);
        CircuitOpen { state, retry_after }
    }

    fn ticket(&self, word: u64) -> Ticket {
        Ticket {
            word,
            start_nanos: if self.slow_nanos.load(Ordering::Relaxed) == NOT_TIMED {
                NOT_TIMED
            } else {
                self.now_nanos()
            },
        }
    }

    pub(crate) fn acquire(&self) -> Result<Ticket, CircuitOpen> {
        let mut word = self.state.load(Ordering::Acquire);
        // Each pass either returns or follows a transition another pass cannot undo
        // (open -> half-open), so three passes always suffice.
        for _ in 0..3 {
            match word & 3 {
                CLOSED => return Ok(self.ticket(word)),
                OPEN => {
                    let now = self.now_nanos();
                    let until = self.open_until.load(Ordering::Acquire);
                    if now < until {
                        return Err(
                            self.rejected(State::Open, Some(Duration::from_nanos(until - now)))
                        );
                    }
                    self.transition(word, State::HalfOpen, Reason::OpenElapsed);
                    word = self.state.load(Ordering::Acquire);
                }
                HALF_OPEN => return self.admit_probe(word),
                _ => return Err(self.rejected(State::Isolated, None)),
            }
        }
        Err(self.rejected(State::from_bits(word), None))
    }

    /// The rejection a call made now would get, without admitting one. Not counted: the
    /// caller counts it when it rejects. An elapsed open duration is left to
    /// [`acquire`](Self::acquire), which admits the probe; but a half-open phase whose probes
    /// stalled is reopened here, as `acquire` would, since the stuck probes may hold what the
    /// caller would otherwise wait on (the inner service's only concurrency permit), so that
    /// no `acquire` would ever come.
    #[cfg(feature = "tower")]
    pub(crate) fn refusal(&self) -> Option<CircuitOpen> {
        let mut word = self.state.load(Ordering::Acquire);
        // Only a stalled half-open phase takes another pass, after a transition (ours or
        // another caller's), and a fresh half-open phase is not stalled.
        for _ in 0..3 {
            match word & 3 {
                CLOSED => return None,
                OPEN => {
                    let now = self.now_nanos();
                    let until = self.open_until.load(Ordering::Acquire);
                    return (now < until).then(|| CircuitOpen {
                        state: State::Open,
                        retry_after: Some(Duration::from_nanos(until - now)),
                    });
                }
                HALF_OPEN => {
                    let config = self.config.load();
                    // Stalled with any probe running, not only with every slot taken: the
                    // capacity below may let fewer probes in than the breaker allows.
                    // Time first: the running count takes a lock.
                    let stalled = self
                        .now_nanos()
                        .saturating_sub(self.probes_waited_since.load(Ordering::Acquire))
                        >= nanos(config.half_open_max_wait)
                        && self.probes_running(word) > 0;
                    if !stalled {
                        let admitted = self.probes_admitted(word);
                        return (admitted >= u64::from(config.half_open_probes)).then_some(
                            CircuitOpen {
                                state: State::HalfOpen,
                                retry_after: None,
                            },
                        );
                    }
                    self.transition(word, State::Open, Reason::ProbesStalled);
                    word = self.state.load(Ordering::Acquire);
                }
                _ => {
                    return Some(CircuitOpen {
                        state: State::Isolated,
                        retry_after: None,
                    });
                }
            }
        }
        Some(CircuitOpen {
            state: State::from_bits(word),
            retry_after: None,
        })
    }

    /// The probes admitted in the half-open phase of `word` (a probe that succeeded keeps its
    /// slot; one whose result did not count gives it back).
    #[cfg(feature = "tower")]
    fn probes_admitted(&self, word: u64) -> u64 {
        let probes = self.probes.load(Ordering::Acquire);
        if probes & !PROBE_COUNT_MASK == probe_tag(word) {
            probes & PROBE_COUNT_MASK
        } else {
            0
        }
    }

    /// The probes of the half-open phase of `word` still running: admitted and not yet
    /// succeeded (a failed one ends the phase).
    #[cfg(feature = "tower")]
    fn probes_running(&self, word: u64) -> u64 {
        if self.probes_admitted(word) == 0 {
            return 0;
        }
        // Both counts under the lock a success takes, so that a probe admitted meanwhile is
        // not missed.
        let recovery = self.recovery.lock();
        if self.state.load(Ordering::Acquire) != word {
            return 0;
        }
        self.probes_admitted(word)
            .saturating_sub(u64::from(recovery.probes_succeeded))
    }

    /// The refusal of a caller that cannot make its call yet (the guarded service is not
    /// ready) while the circuit is open, its open duration passed or not: only a call admits
    /// the probe, and calls admitted before the circuit opened may hold the capacity it waits
    /// on for good. `None` in any other state.
    #[cfg(feature = "tower")]
    pub(crate) fn open_refusal(&self) -> Option<CircuitOpen> {
        (self.state.load(Ordering::Acquire) & 3 == OPEN).then_some(CircuitOpen {
            state: State::Open,
            retry_after: None,
        })
    }

    /// How long until the half-open phase counts as stalled, while probes of it run; `None`
    /// in any other state. A caller waiting on the guarded service meanwhile looks again then.
    #[cfg(feature = "tower")]
    pub(crate) fn until_stalled(&self) -> Option<Duration> {
        let word = self.state.load(Ordering::Acquire);
        if word & 3 != HALF_OPEN || self.probes_running(word) == 0 {
            return None;
        }
        let waited = self
            .now_nanos()
            .saturating_sub(self.probes_waited_since.load(Ordering::Acquire));
        Some(Duration::from_nanos(
            nanos(self.config.load().half_open_max_wait).saturating_sub(waited),
        ))
    }

    /// The clock the breaker measures time on.
    #[cfg(feature = "tower")]
    pub(crate) fn clock(&self) -> Clock {
        self.time.clock().clone()
    }

    /// Counts a rejection made from [`refusal`](Self::refusal).
    #[cfg(feature = "tower")]
    pub(crate) fn count_rejection(&self) {
        self.metrics.rejected.increment(1);
    }

    fn admit_probe(&self, word: u64) -> Result<Ticket, CircuitOpen> {
        let tag = probe_tag(word);
        let limit = u64::from(self.config.load().half_open_probes);
        let mut probes = self.probes.load(Ordering::Acquire);
        while probes & !PROBE_COUNT_MASK == tag && probes & PROBE_COUNT_MASK < limit {
            match self.probes.compare_exchange_weak(
                probes,
                probes + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.restart_wait_if_idle(word, probes & PROBE_COUNT_MASK);
                    return Ok(self.ticket(word));
                }
                Err(current) => probes = current,
            }
        }
        let now = self.now_nanos();
        let since = self.probes_waited_since.load(Ordering::Acquire);
        if now.saturating_sub(since) >= nanos(self.config.load().half_open_max_wait)
            && self.transition(word, State::Open, Reason::ProbesStalled)
        {
            let until = self.open_until.load(Ordering::Acquire);
            return Err(self.rejected(
                State::Open,
                Some(Duration::from_nanos(until.saturating_sub(now))),
            ));
        }
        Err(self.rejected(State::HalfOpen, None))
    }

    /// A probe admitted when `admitted_before` probes of the phase of `word` were: if every
    /// one of those had succeeded, none was running, and the wait on probes starts now.
    fn restart_wait_if_idle(&self, word: u64, admitted_before: u64) {
        let recovery = self.recovery.lock();
        if self.state.load(Ordering::Acquire) == word
            && admitted_before == u64::from(recovery.probes_succeeded)
        {
            self.probes_waited_since
                .store(self.now_nanos(), Ordering::Release);
        }
    }

    fn release_probe(&self, word: u64) {
        let tag = probe_tag(word);
        let mut probes = self.probes.load(Ordering::Acquire);
        while probes & !PROBE_COUNT_MASK == tag && probes & PROBE_COUNT_MASK > 0 {
            match self.probes.compare_exchange_weak(
                probes,
                probes - 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(current) => probes = current,
            }
        }
    }

    pub(crate) fn finish(&self, ticket: Ticket, outcome: Outcome) {
        let slow_nanos = self.slow_nanos.load(Ordering::Relaxed);
        let timed = self.window.is_timed() || slow_nanos != NOT_TIMED;
        let now = if timed { self.now_nanos() } else { 0 };
        // A call admitted while slow calls were ignored started untimed and is never slow.
        let slow = matches!(outcome, Outcome::Success | Outcome::Failure)
            && slow_nanos != NOT_TIMED
            && now.saturating_sub(ticket.start_nanos) > slow_nanos;
        if slow {
            self.metrics.slow.increment(1);
        }
        let failure = match outcome {
            Outcome::Success => {
                self.metrics.success.increment(1);
                Some(false)
            }
            Outcome::Failure => {
                self.metrics.failure.increment(1);
                Some(true)
            }
            Outcome::Ignored => {
                self.metrics.ignored.increment(1);
                None
            }
            Outcome::Cancelled => {
                self.metrics.cancelled.increment(1);
                self.config.load().count_cancelled.then_some(true)
            }
        };
        let sample = failure.map(|failure| Sample { failure, slow });
        match ticket.word & 3 {
            CLOSED => {
                let Some(sample) = sample else { return };
                if self.state.load(Ordering::Acquire) != ticket.word {
                    return; // admitted before a transition: its result describes another era
                }
                let epoch = self.window.record(sample, now);
                if self.may_trip(sample, epoch) {
                    self.judge(ticket.word, now);
                }
            }
            HALF_OPEN => match sample {
                None => self.release_probe(ticket.word),
                Some(sample) if sample.failure || sample.slow => {
                    self.transition(ticket.word, State::Open, Reason::ProbeFailed);
                }
                Some(_) => {
                    let mut recovery = self.recovery.lock();
                    if self.state.load(Ordering::Acquire) != ticket.word {
                        return;
                    }
                    recovery.probes_succeeded += 1;
                    // Progress: the probes still running are waited on from now.
                    self.probes_waited_since
                        .store(self.now_nanos(), Ordering::Release);
                    if recovery.probes_succeeded >= self.config.load().half_open_probes {
                        self.transition_locked(
                            &mut recovery,
                            ticket.word,
                            State::Closed,
                            Reason::ProbesSucceeded,
                        );
                    }
                }
            },
            _ => {}
        }
    }

    /// Whether the window may have reached a threshold with this sample recorded. A failed or
    /// slow call may; so may any call while the window is short of `minimum_calls`. Otherwise a
    /// success only adds a call or replaces an older one, which cannot raise a ratio, unless
    /// older calls left a time window since its last judgement (a new bucket epoch).
    fn may_trip(&self, sample: Sample, epoch: Option<u64>) -> bool {
        if sample.failure || sample.slow || self.short.load(Ordering::Relaxed) {
            return true;
        }
        match epoch {
            None => false,
            Some(epoch) => {
                self.judged_epoch.load(Ordering::Relaxed) != epoch
                    && self.judged_epoch.swap(epoch, Ordering::Relaxed) != epoch
            }
        }
    }

    /// Opens the circuit if the window holds enough calls and a ratio reached its threshold.
    fn judge(&self, word: u64, now: u64) {
        let totals = self.window.totals(now);
        let config = self.config.load();
        let short = totals.calls < u64::from(config.minimum_calls);
        if self.short.load(Ordering::Relaxed) != short {
            self.short.store(short, Ordering::Relaxed);
        }
        if short {
            return;
        }
        // The share itself is compared with the ratio: a quotient of exact integers rounds to
        // the same double as the ratio written in decimal when they are equal, while
        // `ratio * calls` may round above the count (0.55 * 100.0 > 55.0). Only judgements pay
        // for the division, not every call.
        let calls = totals.calls as f64;
        let reason = if totals.failures as f64 / calls >= config.failure_ratio {
            Reason::FailureRatio
        } else if config
            .slow_call_ratio
            .is_some_and(|ratio| totals.slow as f64 / calls >= ratio)
        {
            Reason::SlowCallRatio
        } else {
            return;
        };
        self.transition(word, State::Open, reason);
    }

    fn transition(&self, from_word: u64, to: State, reason: Reason) -> bool {
        let mut recovery = self.recovery.lock();
        self.transition_locked(&mut recovery, from_word, to, reason)
    }

    /// Moves from `from_word` to `to` unless another transition came first. The caller holds
    /// the recovery lock, so transitions are serialized; calls never take it in closed state.
    fn transition_locked(
        &self,
        recovery: &mut Recovery,
        from_word: u64,
        to: State,
        reason: Reason,
    ) -> bool {
        if self.state.load(Ordering::Acquire) != from_word {
            return false;
        }
        let now = self.now_nanos();
        let word = next_generation(from_word, to);
        match to {
            State::Open => {
                recovery.opens = recovery.opens.saturating_add(1);
                let doubling = 1u32 << (recovery.opens - 1).min(31);
                let config = self.config.load();
                let open_for = config
                    .open_duration
                    .saturating_mul(doubling)
                    .min(config.max_open_duration);
                self.open_until
                    .store(now.saturating_add(nanos(open_for)), Ordering::Release);
            }
            State::HalfOpen => {
                recovery.probes_succeeded = 0;
                self.probes.store(probe_tag(word), Ordering::Release);
                self.probes_waited_since.store(now, Ordering::Release);
            }
            State::Closed => {
                recovery.opens = 0;
                self.window.reset();
                self.short.store(true, Ordering::Relaxed);
            }
            State::Isolated => {}
        }
        self.state.store(word, Ordering::Release);
        let from = State::from_bits(from_word);
        self.announce(Transition {
            from,
            to,
            reason,
            at: self.time.started() + Duration::from_nanos(now),
        });
        true
    }

    fn announce(&self, transition: Transition) {
        let Transition {
            from, to, reason, ..
        } = transition;
        self.metrics.state.set(to.bits() as f64);
        if let Some(counter) = &self.metrics.transitions[from.bits() as usize][to.bits() as usize] {
            counter.increment(1);
        }
        if to == State::Open {
            tracing::warn!(breaker = %self.name, from = from.as_str(), ?reason, "circuit opened");
        } else {
            tracing::info!(breaker = %self.name, from = from.as_str(), to = to.as_str(), ?reason, "circuit state changed");
        }
        // No receiver is not an error: events are optional.
        let _ = self.events.send(transition);
    }
}

/// A circuit breaker for calls failing with `E`.
///
/// Closed, it counts calls in a sliding window (by count or by time) and judges the window after
/// each counted call, success or failure: it opens when, with at least `minimum_calls` in the
/// window, the failure ratio or the slow-call ratio reaches its threshold. Open, it refuses calls with [`CircuitOpen`] for the open duration, which doubles
/// on each reopening up to a maximum. Then it turns half-open and admits exactly
/// `half_open_probes` calls: if all succeed it closes, if one fails (or is slow) it reopens,
/// and if they have not all finished within `half_open_max_wait` it reopens too, so that
/// stuck probes never keep it half-open.
///
/// A closed call costs a few atomic operations and takes no lock: the state is one atomic word
/// and the window's counters are atomics, striped per thread for time windows. Clones share
/// the breaker.
///
/// ```
/// use std::time::Duration;
/// use headroom_breaker::{CircuitBreaker, State};
/// # use headroom_core::ManualClock;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let breaker = CircuitBreaker::<std::io::Error>::builder()
///     .failure_ratio(0.5)
///     .count_window(10)
///     .minimum_calls(4)
///     .open_duration(Duration::from_secs(5))
///     .build()?;
///
/// // Around a future:
/// let answer = breaker.call(async { Ok::<_, std::io::Error>(42) }).await?;
/// assert_eq!(answer, 42);
///
/// // Or by hand, with a permit:
/// if let Ok(permit) = breaker.try_acquire() {
///     // ... make the call, then:
///     permit.success();
/// }
/// assert_eq!(breaker.state(), State::Closed);
/// # Ok(())
/// # }
/// ```
pub struct CircuitBreaker<E> {
    inner: Arc<Inner<E>>,
}

struct Inner<E> {
    shared: Shared,
    counts_as_failure: Predicate<E>,
}

impl<E> Clone for CircuitBreaker<E> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<E> fmt::Debug for CircuitBreaker<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.inner.shared.name)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl<E> CircuitBreaker<E> {
    /// A builder starting from [`BreakerConfig::default`].
    pub fn builder() -> CircuitBreakerBuilder<E> {
        CircuitBreakerBuilder {
            config: BreakerConfig::default(),
            name: None,
            clock: Clock::system(),
            counts_as_failure: None,
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        State::from_bits(self.inner.shared.state.load(Ordering::Acquire))
    }

    /// The name given at build time (the `breaker` label of its metrics).
    pub fn name(&self) -> &str {
        &self.inner.shared.name
    }

    /// The settings in force.
    pub fn config(&self) -> BreakerConfig {
        BreakerConfig::clone(&self.inner.shared.config.load())
    }

    /// Replaces the thresholds while the breaker runs: failure and slow-call ratios, the slow
    /// call duration, the minimum calls, open durations, half-open probes and their wait. The
    /// state and the calls in the window are kept, and the next call that ends judges them by
    /// the new thresholds, whatever its outcome. A half-open phase is judged at once by the new
    /// number of probes: if at least that many have succeeded, the circuit closes; raised, the
    /// extra probes are admitted, and all must succeed.
    /// The window's kind and size are fixed when the breaker is built, so a configuration
    /// that changes them is refused, as is an invalid one; the settings in force stay.
    pub fn reconfigure(&self, config: BreakerConfig) -> Result<(), ConfigError> {
        self.check_config(&config)?;
        let shared = &self.inner.shared;
        // Under the transitions' lock, so that two reconfigurations never leave one's slow
        // limit with the other's settings, and a probe's success is counted against either
        // the old probe count or the new one, not lost between them.
        let mut recovery = shared.recovery.lock();
        let probes = config.half_open_probes;
        shared
            .slow_nanos
            .store(slow_nanos(&config), Ordering::Relaxed);
        shared.config.store(Arc::new(config));
        // The calls in the window may be above new thresholds: the next call judges them,
        // whatever its outcome.
        shared.short.store(true, Ordering::Relaxed);
        // A half-open phase is judged only when a probe succeeds. Lowered to no more probes
        // than have succeeded, none may be left running to succeed, and its slots stay taken:
        // judge it now. (Raised, the extra slots open at the next admission.)
        let word = shared.state.load(Ordering::Acquire);
        if word & 3 == HALF_OPEN && recovery.probes_succeeded >= probes {
            shared.transition_locked(&mut recovery, word, State::Closed, Reason::ProbesSucceeded);
        }
        Ok(())
    }

    /// Whether [`reconfigure`](Self::reconfigure) would accept `config`.
    pub fn check_config(&self, config: &BreakerConfig) -> Result<(), ConfigError> {
        config.validate()?;
        if config.window != self.inner.shared.config.load().window {
            return Err(ConfigError::new(
                "window",
                "the window the breaker was built with (build a new breaker to change it)",
            ));
        }
        Ok(())
    }

    /// Asks to make one call. The permit must be told how the call ended; dropping it unused
    /// counts as a cancelled call.
    pub fn try_acquire(&self) -> Result<Permit<'_>, CircuitOpen> {
        let shared = &self.inner.shared;
        shared.acquire().map(|ticket| Permit {
            shared,
            ticket: Some(ticket),
        })
    }

    /// Runs `fut` if the breaker admits it and records how it ended: an error counts as a
    /// failure when the classifier says so, dropping the returned future counts as a cancelled
    /// call.
    pub async fn call<T, F>(&self, fut: F) -> Result<T, Error<E>>
    where
        F: Future<Output = Result<T, E>>,
    {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            // Without a span the caller's future is not wrapped, so not moved.
            let permit = self.try_acquire().map_err(Error::CircuitOpen)?;
            let result = fut.await.map_err(Error::Inner);
            self.record(permit, &result);
            return result;
        }
        let span = tracing::debug_span!("breaker.call", name = %self.inner.shared.name, outcome = tracing::field::Empty);
        let permit = match self.try_acquire() {
            Ok(permit) => permit,
            Err(open) => {
                span.record("outcome", "rejected");
                return Err(Error::CircuitOpen(open));
            }
        };
        let result = fut.instrument(span.clone()).await.map_err(Error::Inner);
        let outcome = self.outcome(&result);
        span.record("outcome", outcome.as_str());
        permit.finish(outcome);
        result
    }

    /// Records the result of a call made under `permit`.
    pub(crate) fn record<T>(&self, permit: Permit<'_>, result: &Result<T, Error<E>>) {
        permit.finish(self.outcome(result));
    }

    pub(crate) fn outcome<T>(&self, result: &Result<T, Error<E>>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(Error::Inner(error)) if !(self.inner.counts_as_failure)(error) => Outcome::Ignored,
            Err(Error::Inner(_) | Error::Elapsed(_)) => Outcome::Failure,
            Err(_) => Outcome::Ignored,
        }
    }

    #[cfg(feature = "tower")]
    pub(crate) fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// Receives every state change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Transition> {
        self.inner.shared.events.subscribe()
    }

    /// Refuses every call until [`reset`](Self::reset), whatever the window says.
    pub fn isolate(&self) {
        let shared = &self.inner.shared;
        let mut recovery = shared.recovery.lock();
        let word = shared.state.load(Ordering::Acquire);
        if word & 3 != ISOLATED {
            shared.transition_locked(&mut recovery, word, State::Isolated, Reason::Isolated);
        }
    }

    /// Closes the breaker and empties its window, from any state. Calls admitted before the
    /// reset are not counted in the new window, also when the breaker was closed already.
    pub fn reset(&self) {
        let shared = &self.inner.shared;
        let mut recovery = shared.recovery.lock();
        let word = shared.state.load(Ordering::Acquire);
        if word & 3 == CLOSED {
            // A new generation first, so that results admitted before it stop recording.
            shared
                .state
                .store(next_generation(word, State::Closed), Ordering::Release);
            shared.window.reset();
            shared.short.store(true, Ordering::Relaxed);
        } else {
            shared.transition_locked(&mut recovery, word, State::Closed, Reason::Reset);
        }
    }
}

/// Leave to make one call through a [`CircuitBreaker`].
///
/// Tell it how the call went with [`success`](Self::success), [`failure`](Self::failure) or
/// [`ignore`](Self::ignore). Dropping it without doing so records a cancelled call (counted as
/// a failure only if the breaker is configured so), so a permit held across an `.await` that
/// is cancelled never leaks a half-open probe slot.
#[must_use = "a permit records a cancelled call when dropped unused"]
pub struct Permit<'a> {
    shared: &'a Shared,
    ticket: Option<Ticket>,
}

impl Permit<'_> {
    /// The call succeeded.
    pub fn success(self) {
        self.finish(Outcome::Success);
    }

    /// The call failed because of the dependency.
    pub fn failure(self) {
        self.finish(Outcome::Failure);
    }

    /// The call ended in a way that says nothing about the dependency's health (for example,
    /// a client error). It is not counted, and a half-open probe slot it held is freed.
    pub fn ignore(self) {
        self.finish(Outcome::Ignored);
    }

    /// Whether this permit admits a half-open probe.
    pub(crate) fn is_probe(&self) -> bool {
        self.ticket
            .is_some_and(|ticket| ticket.word & 3 == HALF_OPEN)
    }

    fn finish(mut self, outcome: Outcome) {
        if let Some(ticket) = self.ticket.take() {
            self.shared.finish(ticket, outcome);
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.shared.finish(ticket, Outcome::Cancelled);
        }
    }
}

impl fmt::Debug for Permit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("state", &self.ticket.map(|t| State::from_bits(t.word)))
            .finish()
    }
}

/// Builds a [`CircuitBreaker`]; every setting defaults to [`BreakerConfig::default`].
#[must_use]
pub struct CircuitBreakerBuilder<E> {
    config: BreakerConfig,
    name: Option<Arc<str>>,
    clock: Clock,
    counts_as_failure: Option<Predicate<E>>,
}

impl<E> fmt::Debug for CircuitBreakerBuilder<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerBuilder")
            .field("config", &self.config)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<E> CircuitBreakerBuilder<E> {
    /// Replaces every setting with `config` (for example, one loaded from a file).
    pub fn config(mut self, config: BreakerConfig) -> Self {
        self.config = config;
        self
    }

    /// Names the breaker in metrics and traces. Default `"default"`.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The clock measuring windows, open durations and slow calls. Default: the system clock.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Share of failures that opens the circuit, in (0, 1].
    pub fn failure_ratio(mut self, ratio: f64) -> Self {
        self.config.failure_ratio = ratio;
        self
    }

    /// Opens the circuit also when `ratio` of the calls in the window took longer than
    /// `slower_than` (more than zero).
    pub fn slow_calls(mut self, ratio: f64, slower_than: Duration) -> Self {
        self.config.slow_call_ratio = Some(ratio);
        self.config.slow_call_duration = slower_than;
        self
    }

    /// Judges the last `size` calls. The window never holds more, so `build()` refuses a
    /// `minimum_calls` above `size` (the default minimum is 20).
    pub fn count_window(mut self, size: u32) -> Self {
        self.config.window = WindowConfig::Count { size };
        self
    }

    /// Judges the calls of the last `length`, in `buckets` slices.
    pub fn time_window(mut self, length: Duration, buckets: u32) -> Self {
        self.config.window = WindowConfig::Time { length, buckets };
        self
    }

    /// Calls the window must hold before it is judged (the minimum throughput); for a count
    /// window, at most its size.
    pub fn minimum_calls(mut self, calls: u32) -> Self {
        self.config.minimum_calls = calls;
        self
    }

    /// How long the circuit stays open the first time.
    pub fn open_duration(mut self, duration: Duration) -> Self {
        self.config.open_duration = duration;
        self
    }

    /// The longest open duration reached by doubling on repeated reopening.
    pub fn max_open_duration(mut self, duration: Duration) -> Self {
        self.config.max_open_duration = duration;
        self
    }

    /// Probe calls admitted when half-open.
    pub fn half_open_probes(mut self, probes: u32) -> Self {
        self.config.half_open_probes = probes;
        self
    }

    /// How long half-open waits for its probes before reopening.
    pub fn half_open_max_wait(mut self, wait: Duration) -> Self {
        self.config.half_open_max_wait = wait;
        self
    }

    /// Whether cancelled calls count as failures.
    pub fn count_cancelled(mut self, count: bool) -> Self {
        self.config.count_cancelled = count;
        self
    }

    /// Opens the circuit when the last `failures` calls all failed, for `cooldown` each time
    /// (no doubling); one probe then closes it or opens it again; cancelled calls count as
    /// nothing. The breaker of a dependency that is either up or down (a store, a cache's
    /// backend): a count window of `failures` that must all fail.
    pub fn open_after_failures_in_a_row(self, failures: u32, cooldown: Duration) -> Self {
        self.count_window(failures)
            .minimum_calls(failures)
            .failure_ratio(1.0)
            .open_duration(cooldown)
            .max_open_duration(cooldown)
            .half_open_probes(1)
            .count_cancelled(false)
    }

    /// Decides which errors count as failures; the others are ignored. Default: all do.
    /// Timeouts of a pipeline's attempts always count.
    pub fn failure_if(mut self, counts: impl Fn(&E) -> bool + Send + Sync + 'static) -> Self {
        self.counts_as_failure = Some(Box::new(counts));
        self
    }

    /// Validates the settings and builds the breaker.
    pub fn build(self) -> Result<CircuitBreaker<E>, ConfigError> {
        self.config.validate()?;
        let window = match self.config.window {
            WindowConfig::Count { size } => Window::count(size),
            WindowConfig::Time { length, buckets } => Window::time(nanos(length), buckets),
        };
        let name = self.name.unwrap_or_else(|| Arc::from("default"));
        let metrics = Metrics::new(&name);
        metrics.state.set(0.0);
        let shared = Shared {
            slow_nanos: AtomicU64::new(slow_nanos(&self.config)),
            name,
            config: ArcSwap::from_pointee(self.config),
            time: self.clock.stopwatch(),
            state: AtomicU64::new(CLOSED),
            open_until: AtomicU64::new(0),
            probes_waited_since: AtomicU64::new(0),
            probes: AtomicU64::new(0),
            recovery: Mutex::new(Recovery {
                opens: 0,
                probes_succeeded: 0,
            }),
            window,
            judged_epoch: AtomicU64::new(u64::MAX),
            short: AtomicBool::new(true),
            events: broadcast::channel(64).0,
            metrics,
        };
        Ok(CircuitBreaker {
            inner: Arc::new(Inner {
                shared,
                counts_as_failure: self.counts_as_failure.unwrap_or_else(|| Box::new(|_| true)),
            }),
        })
    }
}
