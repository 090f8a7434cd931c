//! The circuit breaker driven by arbitrary sequences of calls, outcomes, time and manual
//! controls on a manual clock: never a panic, a half-open phase admits no more than its probes
//! (a cancelled probe gives its slot back), an isolated breaker admits nothing, and a reset
//! breaker admits calls.
#![no_main]

use std::time::Duration;

use headroom_breaker::{CircuitBreaker, State, Transition};
use headroom_core::ManualClock;
use libfuzzer_sys::fuzz_target;
use tokio::sync::broadcast;

const PROBES: u32 = 3;

fuzz_target!(|data: &[u8]| {
    let clock = ManualClock::new();
    let breaker: CircuitBreaker<()> = CircuitBreaker::builder()
        .clock(clock.clock())
        .count_window(10)
        .minimum_calls(4)
        .failure_ratio(0.5)
        .slow_calls(0.5, Duration::from_millis(100))
        .open_duration(Duration::from_secs(1))
        .max_open_duration(Duration::from_secs(8))
        .half_open_probes(PROBES)
        .half_open_max_wait(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut transitions = breaker.subscribe();
    // Held permits, with the half-open phase they were admitted in as probes (0: not a probe).
    let mut held = Vec::new();
    let mut phase = 0u64;
    // Probes admitted in the current half-open phase, less those cancelled.
    let mut probes = 0u32;
    for &byte in data.iter().take(400) {
        match byte % 8 {
            // Take a permit and keep it for later.
            0 | 1 => {
                let permit = breaker.try_acquire();
                if entered_half_open(&mut transitions) {
                    phase += 1;
                    probes = 0;
                }
                if let Ok(permit) = permit {
                    let probe_of = if breaker.state() == State::HalfOpen {
                        probes += 1;
                        assert!(probes <= PROBES, "{probes} probes admitted in one half-open phase");
                        phase
                    } else {
                        0
                    };
                    held.push((permit, probe_of));
                }
            }
            // Finish a held call: success, failure, slow success, or dropped (cancelled).
            2 if !held.is_empty() => {
                let (permit, probe_of) = held.remove(usize::from(byte >> 3) % held.len());
                match (byte >> 3) % 4 {
                    0 => permit.success(),
                    1 => permit.failure(),
                    2 => {
                        clock.advance(Duration::from_millis(150));
                        permit.success();
                    }
                    _ => {
                        drop(permit);
                        if probe_of == phase && probe_of != 0 {
                            probes -= 1;
                        }
                    }
                }
            }
            3 => clock.advance(Duration::from_millis(u64::from(byte) * 20)),
            4 => {
                breaker.isolate();
                assert!(breaker.try_acquire().is_err(), "an isolated breaker admits nothing");
            }
            5 => {
                held.clear();
                breaker.reset();
                assert!(breaker.try_acquire().is_ok(), "a reset breaker admits calls");
            }
            _ => {
                // A quick call, finished at once.
                let permit = breaker.try_acquire();
                if entered_half_open(&mut transitions) {
                    phase += 1;
                    probes = 0;
                }
                if let Ok(permit) = permit {
                    if breaker.state() == State::HalfOpen {
                        probes += 1;
                        assert!(probes <= PROBES, "{probes} probes admitted in one half-open phase");
                    }
                    if byte & 0x10 == 0 { permit.success() } else { permit.failure() }
                }
            }
        }
        if entered_half_open(&mut transitions) {
            phase += 1;
            probes = 0;
        }
    }
});

/// Drains the transitions seen so far; whether the breaker (may have) entered half-open.
fn entered_half_open(transitions: &mut broadcast::Receiver<Transition>) -> bool {
    let mut entered = false;
    loop {
        match transitions.try_recv() {
            Ok(transition) => entered |= transition.to == State::HalfOpen,
            Err(broadcast::error::TryRecvError::Lagged(_)) => entered = true,
            Err(_) => return entered,
        }
    }
}
