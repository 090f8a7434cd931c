//! A randomized model test: the breaker against a plain sequential reference model.

use std::collections::VecDeque;
use std::time::Duration;

use headroom_breaker::{CircuitBreaker, Permit, State};
use headroom_core::ManualClock;
use proptest::prelude::*;

const WINDOW: usize = 6;
const MINIMUM: usize = 4;
const RATIO: f64 = 0.5;
const PROBES: u32 = 2;
const OPEN_MS: u64 = 100;
const MAX_OPEN_MS: u64 = 400;
const MAX_WAIT_MS: u64 = 300;

#[derive(Clone, Copy, Debug)]
enum End {
    Success,
    Failure,
    Ignore,
    Cancel,
}

#[derive(Clone, Debug)]
enum Op {
    /// Ask for a permit and keep it.
    Acquire,
    /// Finish the held permit at this index (modulo the number held).
    Finish(usize, End),
    Advance(u64),
    Isolate,
    Reset,
}

fn op() -> impl Strategy<Value = Op> {
    let end = prop_oneof![
        3 => Just(End::Success),
        3 => Just(End::Failure),
        1 => Just(End::Ignore),
        1 => Just(End::Cancel),
    ];
    prop_oneof![
        6 => Just(Op::Acquire),
        6 => (any::<usize>(), end).prop_map(|(i, end)| Op::Finish(i, end)),
        2 => (1u64..200).prop_map(Op::Advance),
        1 => Just(Op::Isolate),
        1 => Just(Op::Reset),
    ]
}

/// The reference: the behaviour documented in docs/breaker.md and the rustdoc of
/// `CircuitBreaker`, written as plainly as possible. A result is counted only in the phase
/// (generation) that admitted it: every transition, and every reset, starts a new one.
#[derive(Debug)]
struct Model {
    state: State,
    generation: u64,
    now: u64,
    window: VecDeque<bool>,
    open_until: u64,
    opens: u32,
    admitted: u32,
    succeeded: u32,
    waited_since: u64,
}

impl Model {
    fn new() -> Self {
        Self {
            state: State::Closed,
            generation: 0,
            now: 0,
            window: VecDeque::new(),
            open_until: 0,
            opens: 0,
            admitted: 0,
            succeeded: 0,
            waited_since: 0,
        }
    }

    fn enter(&mut self, to: State) {
        self.generation += 1;
        self.state = to;
        match to {
            State::Open => {
                self.opens += 1;
                let open = (OPEN_MS << (self.opens - 1).min(20)).min(MAX_OPEN_MS);
                self.open_until = self.now + open;
            }
            State::HalfOpen => {
                self.admitted = 0;
                self.succeeded = 0;
                self.waited_since = self.now;
            }
            State::Closed => {
                self.opens = 0;
                self.window.clear();
            }
            _ => {}
        }
    }

    /// `Some((generation, state))` when admitted.
    fn acquire(&mut self) -> Option<(u64, State)> {
        if self.state == State::Open {
            if self.now < self.open_until {
                return None;
            }
            self.enter(State::HalfOpen);
        }
        match self.state {
            State::Closed => Some((self.generation, State::Closed)),
            State::HalfOpen if self.admitted < PROBES => {
                // "Probes run [half_open_max_wait] with none finishing (from the start of the
                // half-open phase, the last probe that succeeded, or a probe admitted when none
                // was running)": this one starts the wait when none runs.
                if self.admitted == self.succeeded {
                    self.waited_since = self.now;
                }
                self.admitted += 1;
                Some((self.generation, State::HalfOpen))
            }
            State::HalfOpen => {
                if self.now - self.waited_since >= MAX_WAIT_MS {
                    self.enter(State::Open);
                }
                None
            }
            _ => None,
        }
    }

    fn finish(&mut self, (generation, admitted_in): (u64, State), end: End) {
        let failure = match end {
            End::Success => Some(false),
            End::Failure => Some(true),
            End::Ignore | End::Cancel => None,
        };
        if generation != self.generation {
            return;
        }
        match (admitted_in, failure) {
            (State::Closed, Some(failure)) => {
                if self.window.len() == WINDOW {
                    self.window.pop_front();
                }
                self.window.push_back(failure);
                if self.window_trips() {
                    self.enter(State::Open);
                }
            }
            (State::HalfOpen, None) => self.admitted = self.admitted.saturating_sub(1),
            (State::HalfOpen, Some(true)) => self.enter(State::Open),
            (State::HalfOpen, Some(false)) => {
                self.succeeded += 1;
                self.waited_since = self.now;
                if self.succeeded >= PROBES {
                    self.enter(State::Closed);
                }
            }
            _ => {}
        }
    }

    /// "When the window holds at least `minimum_calls` and the share of failures reaches
    /// `failure_ratio` [...] the circuit opens": whatever the call that completed it was.
    fn window_trips(&self) -> bool {
        let calls = self.window.len();
        let failures = self.window.iter().filter(|failed| **failed).count();
        calls >= MINIMUM && failures as f64 / calls as f64 >= RATIO
    }

    fn isolate(&mut self) {
        if self.state != State::Isolated {
            self.enter(State::Isolated);
        }
    }

    /// "`reset()` closes the circuit and empties its window from any state; calls admitted
    /// before it are not counted": a new generation even when already closed.
    fn reset(&mut self) {
        self.enter(State::Closed);
    }
}

fn end_permit(permit: Permit<'_>, end: End) {
    match end {
        End::Success => permit.success(),
        End::Failure => permit.failure(),
        End::Ignore => permit.ignore(),
        End::Cancel => drop(permit),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn breaker_follows_the_model(ops in proptest::collection::vec(op(), 1..200)) {
        let manual = ManualClock::new();
        let breaker = CircuitBreaker::<()>::builder()
            .clock(manual.clock())
            .count_window(WINDOW as u32)
            .minimum_calls(MINIMUM as u32)
            .failure_ratio(RATIO)
            .open_duration(Duration::from_millis(OPEN_MS))
            .max_open_duration(Duration::from_millis(MAX_OPEN_MS))
            .half_open_probes(PROBES)
            .half_open_max_wait(Duration::from_millis(MAX_WAIT_MS))
            .build()
            .expect("valid config");
        let mut model = Model::new();
        let mut held: Vec<(Permit<'_>, (u64, State))> = Vec::new();
        for op in ops {
            match op {
                Op::Acquire => {
                    let real = breaker.try_acquire();
                    let expected = model.acquire();
                    prop_assert_eq!(real.is_ok(), expected.is_some(), "admission, model {:?}", model);
                    if let (Ok(permit), Some(admission)) = (real, expected) {
                        held.push((permit, admission));
                    }
                }
                Op::Finish(index, end) => {
                    if !held.is_empty() {
                        let (permit, admission) = held.swap_remove(index % held.len());
                        end_permit(permit, end);
                        model.finish(admission, end);
                    }
                }
                Op::Advance(ms) => {
                    manual.advance(Duration::from_millis(ms));
                    model.now += ms;
                }
                Op::Isolate => {
                    breaker.isolate();
                    model.isolate();
                }
                Op::Reset => {
                    breaker.reset();
                    model.reset();
                }
            }
            prop_assert_eq!(breaker.state(), model.state, "model {:?}", model);
        }
    }
}
