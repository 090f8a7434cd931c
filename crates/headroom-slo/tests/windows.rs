//! Windows against their documented bound, for random series of outcomes: every request
//! younger than `window - granularity` is counted, none as old as `window`, and the totals
//! count every request once, however far the buckets have moved up.

use std::time::Duration;

use headroom_core::ManualClock;
use headroom_slo::{BurnAlert, Objective, ObjectiveConfig, Severity};
use proptest::prelude::*;

/// A step of the series: wait `gap` seconds, then record `requests` outcomes, every
/// `bad_every`-th bad (never when 0), or evaluate and check.
#[derive(Clone, Debug)]
enum Step {
    Record {
        gap: u64,
        requests: u64,
        bad_every: u64,
    },
    Check {
        gap: u64,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        20 => (0..6_u64, 1..5_u64, 0..4_u64).prop_map(|(gap, requests, bad_every)| Step::Record { gap, requests, bad_every }),
        1 => (0..6_u64).prop_map(|gap| Step::Check { gap }),
    ]
}

/// Windows of 10 s, 1 min and 1 h: buckets of 1 s, 8 s and 64 s. A step every 2.5 s on
/// average reuses most 1 s buckets, so over the hours a case spans requests move through
/// every level.
fn objective(time: &ManualClock) -> Objective {
    let config = ObjectiveConfig::availability("model", 0.99)
        .period(Duration::from_secs(3600))
        .alerts([BurnAlert::new(
            Severity::Page,
            2.0,
            Duration::from_secs(60),
            Duration::from_secs(10),
        )]);
    Objective::with_clock(config, time.clock()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn windows_count_within_their_granularity(steps in prop::collection::vec(step(), 1..8_000)) {
        let time = ManualClock::new();
        let objective = objective(&time);
        // Every request recorded: (second, bad).
        let mut recorded: Vec<(u64, bool)> = Vec::new();
        // Bad requests among the first n + 1 recorded.
        let mut bad_so_far: Vec<u64> = Vec::new();
        let mut now = 0;
        for step in steps {
            let gap = match step {
                Step::Record { gap, .. } | Step::Check { gap } => gap,
            };
            time.advance(Duration::from_secs(gap));
            now += gap;
            match step {
                Step::Record { requests, bad_every, .. } => {
                    for request in 0..requests {
                        let bad = bad_every != 0 && request % bad_every == 0;
                        objective.record(!bad);
                        recorded.push((now, bad));
                        bad_so_far.push(bad_so_far.last().copied().unwrap_or(0) + u64::from(bad));
                    }
                }
                Step::Check { .. } => {
                    let status = objective.evaluate();
                    prop_assert_eq!(status.events, recorded.len() as u64);
                    prop_assert_eq!(status.bad, recorded.iter().filter(|(_, bad)| *bad).count() as u64);
                    for window in &status.windows {
                        let (length, granularity) = (window.window.as_secs(), window.granularity.as_secs());
                        // `recorded` is in time order: the requests at most `age` old are a suffix.
                        let younger = |age: u64, bad_only: bool| {
                            let first = recorded.partition_point(|(at, _)| now - at > age);
                            let bad_before = if first == 0 { 0 } else { bad_so_far[first - 1] };
                            if bad_only {
                                bad_so_far.last().copied().unwrap_or(0) - bad_before
                            } else {
                                (recorded.len() - first) as u64
                            }
                        };
                        let sure = length.saturating_sub(granularity);
                        // Ages are whole seconds here: younger than `length` is at most one less.
                        let oldest = length - 1;
                        prop_assert!(younger(sure, false) <= window.events && window.events <= younger(oldest, false),
                            "window {}s: {} requests, {} surely in, {} at most", length, window.events, younger(sure, false), younger(oldest, false));
                        prop_assert!(younger(sure, true) <= window.bad && window.bad <= younger(oldest, true),
                            "window {}s: {} bad, {} surely in, {} at most", length, window.bad, younger(sure, true), younger(oldest, true));
                    }
                }
            }
        }
    }
}
