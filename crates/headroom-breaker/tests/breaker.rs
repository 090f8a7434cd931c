//! The circuit breaker's state machine on a manual clock.

use std::future::pending;
use std::time::Duration;

use headroom_breaker::{CircuitBreaker, Reason, State};
use headroom_core::ManualClock;

#[derive(Debug, PartialEq)]
enum Failure {
    Dependency,
    BadRequest,
}

fn breaker(manual: &ManualClock) -> CircuitBreaker<Failure> {
    CircuitBreaker::builder()
        .clock(manual.clock())
        .count_window(10)
        .minimum_calls(10)
        .failure_ratio(0.5)
        .open_duration(Duration::from_secs(10))
        .max_open_duration(Duration::from_secs(40))
        .half_open_probes(3)
        .half_open_max_wait(Duration::from_secs(30))
        .failure_if(|error| *error == Failure::Dependency)
        .build()
        .expect("valid config")
}

fn record(breaker: &CircuitBreaker<Failure>, failures: usize, successes: usize) {
    for _ in 0..failures {
        breaker.try_acquire().expect("admitted").failure();
    }
    for _ in 0..successes {
        breaker.try_acquire().expect("admitted").success();
    }
}

/// Opens a fresh breaker and moves it to half-open.
fn half_open(manual: &ManualClock) -> CircuitBreaker<Failure> {
    let breaker = breaker(manual);
    record(&breaker, 10, 0);
    assert_eq!(breaker.state(), State::Open);
    manual.advance(Duration::from_secs(10));
    breaker
}

#[test]
fn does_not_trip_below_the_minimum_number_of_calls() {
    let manual = ManualClock::new();
    let breaker = breaker(&manual);
    record(&breaker, 9, 0);
    assert_eq!(breaker.state(), State::Closed, "9 calls < minimum of 10");
    record(&breaker, 1, 0);
    assert_eq!(breaker.state(), State::Open);
}

#[test]
fn trips_exactly_at_the_failure_ratio() {
    let manual = ManualClock::new();
    let breaker = breaker(&manual);
    record(&breaker, 0, 6);
    record(&breaker, 4, 0);
    assert_eq!(breaker.state(), State::Closed, "4 of 10 is below 0.5");
    // The window holds the last 10 calls: one success slides out, a failure comes in.
    record(&breaker, 1, 0);
    assert_eq!(breaker.state(), State::Open, "5 of 10 reaches 0.5");
}

/// 0.55 × 100 is a little above 55 in floating point: the share itself is compared, so 55
/// failures of 100 reach a ratio of 0.55.
#[test]
fn trips_at_a_failure_ratio_that_floating_point_multiplication_overshoots() {
    let manual = ManualClock::new();
    let breaker = CircuitBreaker::<Failure>::builder()
        .clock(manual.clock())
        .count_window(100)
        .minimum_calls(100)
        .failure_ratio(0.55)
        .build()
        .expect("valid config");
    record(&breaker, 0, 45);
    record(&breaker, 54, 0);
    assert_eq!(breaker.state(), State::Closed, "99 calls < minimum of 100");
    record(&breaker, 1, 0);
    assert_eq!(breaker.state(), State::Open, "55 of 100 reaches 0.55");
}

#[test]
fn a_success_that_completes_the_minimum_is_judged_too() {
    let manual = ManualClock::new();
    let breaker = CircuitBreaker::<Failure>::builder()
        .clock(manual.clock())
        .count_window(10)
        .minimum_calls(4)
        .failure_ratio(0.5)
        .build()
        .expect("valid config");
    record(&breaker, 3, 1);
    assert_eq!(
        breaker.state(),
        State::Open,
        "4 calls in the window, 75 % failed: the ratio of 50 % is reached"
    );

    // The same on a time window.
    let breaker = CircuitBreaker::<Failure>::builder()
        .clock(manual.clock())
        .time_window(Duration::from_secs(10), 10)
        .minimum_calls(4)
        .failure_ratio(0.5)
        .build()
        .expect("valid config");
    record(&breaker, 3, 1);
    assert_eq!(breaker.state(), State::Open);
}

#[test]
fn a_time_window_is_judged_again_when_old_successes_expire() {
    let manual = ManualClock::new();
    let breaker = CircuitBreaker::<Failure>::builder()
        .clock(manual.clock())
        .time_window(Duration::from_secs(10), 10)
        .minimum_calls(4)
        .failure_ratio(0.5)
        .build()
        .expect("valid config");
    record(&breaker, 0, 6);
    manual.advance(Duration::from_secs(5));
    record(&breaker, 3, 0);
    assert_eq!(breaker.state(), State::Closed, "3 failures in 9 calls");
    // The six successes leave the window; the next call sees 3 failures in 4 calls.
    manual.advance(Duration::from_secs(6));
    record(&breaker, 0, 1);
    assert_eq!(breaker.state(), State::Open);
}

#[test]
fn time_window_forgets_old_failures() {
    let manual = ManualClock::new();
    let breaker = CircuitBreaker::<Failure>::builder()
        .clock(manual.clock())
        .time_window(Duration::from_secs(10), 10)
        .minimum_calls(4)
        .failure_ratio(0.5)
        .build()
        .expect("valid config");
    record(&breaker, 3, 0);
    manual.advance(Duration::from_secs(11));
    record(&breaker, 1, 3);
    assert_eq!(breaker.state(), State::Closed, "1 of 4 in the window");
    record(&breaker, 1, 0);
    assert_eq!(breaker.state(), State::Closed, "2 of 5 in the window");
    record(&breaker, 1, 0);
    assert_eq!(breaker.state(), State::Open, "3 of 6 in the window");
}

#[test]
fn classifier_decides_which_errors_count() {
    let manual = ManualClock::new();
    let breaker = breaker(&manual);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        for _ in 0..20 {
            let result = breaker
                .call(async { Err::<(), _>(Failure::BadRequest) })
                .await;
            assert!(matches!(
                result.unwrap_err().inner(),
                Some(Failure::BadRequest)
            ));
        }
        assert_eq!(breaker.state(), State::Closed, "client errors do not count");
        for _ in 0..10 {
            let _ = breaker
                .call(async { Err::<(), _>(Failure::Dependency) })
                .await;
        }
        assert_eq!(breaker.state(), State::Open);
        let refused = breaker
            .call(async { Ok::<_, Failure>(()) })
            .await
            .unwrap_err();
        assert_eq!(refused.kind(), headroom_breaker::ErrorKind::CircuitOpen);
    });
}

#[test]
fn open_refuses_with_the_time_left() {
    let manual = ManualClock::new();
    let breaker = breaker(&manual);
    record(&breaker, 10, 0);
    manual.advance(Duration::from_secs(4));
    let open = breaker.try_acquire().unwrap_err();
    assert_eq!(open.retry_after(), Some(Duration::from_secs(6)));
    manual.advance(Duration::from_secs(5));
    assert!(breaker.try_acquire().is_err());
    assert_eq!(breaker.state(), State::Open);
}

#[test]
fn half_open_admits_exactly_the_configured_probes_and_closes_after_them() {
    let manual = ManualClock::new();
    let breaker = half_open(&manual);
    let probes: Vec<_> = (0..3)
        .map(|_| breaker.try_acquire().expect("probe admitted"))
        .collect();
    assert_eq!(breaker.state(), State::HalfOpen);
    for _ in 0..5 {
        assert!(breaker.try_acquire().is_err(), "a fourth call is refused");
    }
    let mut probes = probes.into_iter();
    probes.next().expect("probe").success();
    probes.next().expect("probe").success();
    assert_eq!(breaker.state(), State::HalfOpen);
    assert!(
        breaker.try_acquire().is_err(),
        "finished probes are not replaced"
    );
    probes.next().expect("probe").success();
    assert_eq!(breaker.state(), State::Closed);
    // Closed again with an empty window: nine failures do not reopen it.
    record(&breaker, 9, 0);
    assert_eq!(breaker.state(), State::Closed);
}

#[test]
fn a_failed_probe_reopens_with_a_longer_open_duration() {
    let manual = ManualClock::new();
    let breaker = half_open(&manual);
    let first = breaker.try_acquire().expect("probe");
    let second = breaker.try_acquire().expect("probe");
    first.failure();
    assert_eq!(breaker.state(), State::Open);
    assert_eq!(
        breaker.try_acquire().unwrap_err().retry_after(),
        Some(Duration::from_secs(20)),
        "the open duration doubles"
    );
    second.success(); // a late probe of the old half-open phase changes nothing
    assert_eq!(breaker.state(), State::Open);
    manual.advance(Duration::from_secs(20));
    breaker.try_acquire().expect("probe").failure();
    assert_eq!(
        breaker.try_acquire().unwrap_err().retry_after(),
        Some(Duration::from_secs(40))
    );
    manual.advance(Duration::from_secs(40));
    breaker.try_acquire().expect("probe").failure();
    assert_eq!(
        breaker.try_acquire().unwrap_err().retry_after(),
        Some(Duration::from_secs(40)),
        "capped at the maximum"
    );
}

#[test]
fn stalled_probes_reopen_after_the_maximum_wait_and_fresh_probes_follow() {
    let manual = ManualClock::new();
    let breaker = half_open(&manual);
    let stuck: Vec<_> = (0..3)
        .map(|_| breaker.try_acquire().expect("probe"))
        .collect();
    manual.advance(Duration::from_secs(29));
    assert!(breaker.try_acquire().is_err());
    assert_eq!(breaker.state(), State::HalfOpen);
    manual.advance(Duration::from_secs(1));
    assert!(breaker.try_acquire().is_err());
    assert_eq!(breaker.state(), State::Open, "gave up on the stuck probes");
    manual.advance(Duration::from_secs(20));
    let fresh: Vec<_> = (0..3)
        .map(|_| breaker.try_acquire().expect("fresh probe"))
        .collect();
    drop(stuck); // the old probes finishing late do not free the new phase's slots
    assert!(breaker.try_acquire().is_err());
    for probe in fresh {
        probe.success();
    }
    assert_eq!(breaker.state(), State::Closed);
}

#[tokio::test]
async fn a_cancelled_probe_frees_its_slot() {
    let manual = ManualClock::new();
    let breaker = half_open(&manual);
    let first = breaker.try_acquire().expect("probe");
    let second = breaker.try_acquire().expect("probe");
    {
        // A probe whose future is dropped mid-flight.
        let call = breaker.call(pending::<Result<(), Failure>>());
        let mut call = Box::pin(call);
        assert!(futures_poll_once(call.as_mut()).await.is_none());
    }
    let third = breaker
        .try_acquire()
        .expect("the cancelled probe's slot is free");
    assert!(breaker.try_acquire().is_err());
    first.success();
    second.success();
    third.success();
    assert_eq!(breaker.state(), State::Closed);
}

async fn futures_poll_once<F: std::future::Future + Unpin>(mut fut: F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut fut).poll(cx) {
            std::task::Poll::Ready(output) => Some(output),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

#[test]
fn cancelled_calls_count_as_failures_when_configured() {
    let manual = ManualClock::new();
    let breaker = CircuitBreaker::<Failure>::builder()
        .clock(manual.clock())
        .count_window(4)
        .minimum_calls(4)
        .count_cancelled(true)
        .build()
        .expect("valid config");
    for _ in 0..4 {
        drop(breaker.try_acquire().expect("admitted"));
    }
    assert_eq!(breaker.state(), State::Open);

    let forgiving = CircuitBreaker::<Failure>::builder()
        .clock(manual.clock())
        .count_window(4)
        .minimum_calls(4)
        .build()
        .expect("valid config");
    for _ in 0..4 {
        drop(forgiving.try_acquire().expect("admitted"));
    }
    assert_eq!(forgiving.state(), State::Closed);
}

#[test]
fn slow_calls_trip_the_breaker() {
    let manual = ManualClock::new();
    let breaker = CircuitBreaker::<Failure>::builder()
        .clock(manual.clock())
        .count_window(4)
        .minimum_calls(4)
        .slow_calls(0.5, Duration::from_millis(100))
        .build()
        .expect("valid config");
    for slow in [false, true, false] {
        let permit = breaker.try_acquire().expect("admitted");
        manual.advance(Duration::from_millis(if slow { 150 } else { 50 }));
        permit.success();
    }
    assert_eq!(breaker.state(), State::Closed);
    let permit = breaker.try_acquire().expect("admitted");
    manual.advance(Duration::from_millis(101));
    permit.success();
    assert_eq!(breaker.state(), State::Open, "2 of 4 calls were slow");
}

#[test]
fn trips_at_a_slow_call_ratio_that_floating_point_multiplication_overshoots() {
    let manual = ManualClock::new();
    let breaker = CircuitBreaker::<Failure>::builder()
        .clock(manual.clock())
        .count_window(100)
        .minimum_calls(100)
        .slow_calls(0.55, Duration::from_millis(100))
        .build()
        .expect("valid config");
    for slow in (0..100).map(|call| call >= 45) {
        let permit = breaker.try_acquire().expect("admitted");
        manual.advance(Duration::from_millis(if slow { 150 } else { 50 }));
        permit.success();
    }
    assert_eq!(breaker.state(), State::Open, "55 of 100 slow reaches 0.55");
}

#[test]
fn isolate_and_reset_by_hand_and_every_transition_is_announced() {
    let manual = ManualClock::new();
    let breaker = breaker(&manual);
    let mut events = breaker.subscribe();
    breaker.isolate();
    let refused = breaker.try_acquire().unwrap_err();
    assert_eq!(refused.retry_after(), None);
    manual.advance(Duration::from_secs(3_600));
    assert!(breaker.try_acquire().is_err(), "isolation does not expire");
    breaker.reset();
    assert_eq!(breaker.state(), State::Closed);
    record(&breaker, 10, 0);
    manual.advance(Duration::from_secs(10));
    for _ in 0..3 {
        breaker.try_acquire().expect("probe").success();
    }
    let seen: Vec<_> = std::iter::from_fn(|| events.try_recv().ok())
        .map(|t| (t.from, t.to, t.reason))
        .collect();
    assert_eq!(
        seen,
        [
            (State::Closed, State::Isolated, Reason::Isolated),
            (State::Isolated, State::Closed, Reason::Reset),
            (State::Closed, State::Open, Reason::FailureRatio),
            (State::Open, State::HalfOpen, Reason::OpenElapsed),
            (State::HalfOpen, State::Closed, Reason::ProbesSucceeded),
        ]
    );
}

#[test]
fn results_admitted_before_a_transition_are_dropped() {
    let manual = ManualClock::new();
    let breaker = breaker(&manual);
    let early: Vec<_> = (0..10)
        .map(|_| breaker.try_acquire().expect("admitted"))
        .collect();
    record(&breaker, 10, 0);
    assert_eq!(breaker.state(), State::Open);
    breaker.reset();
    for permit in early {
        permit.failure(); // from the previous closed phase
    }
    assert_eq!(breaker.state(), State::Closed);
}

#[test]
fn a_closed_breaker_is_shared_safely_across_threads() {
    let breaker = CircuitBreaker::<Failure>::builder()
        .time_window(Duration::from_secs(60), 6)
        .minimum_calls(1_000)
        .failure_ratio(0.5)
        .build()
        .expect("valid config");
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let breaker = breaker.clone();
            std::thread::spawn(move || {
                for i in 0..10_000 {
                    let permit = breaker.try_acquire().expect("closed");
                    if i % 10 == 0 {
                        permit.failure();
                    } else {
                        permit.success();
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("thread");
    }
    assert_eq!(
        breaker.state(),
        State::Closed,
        "10% failures stay under 50%"
    );
}

#[test]
fn invalid_settings_are_typed_errors() {
    let error = CircuitBreaker::<Failure>::builder()
        .failure_ratio(0.0)
        .build()
        .unwrap_err();
    assert_eq!(error.field(), "failure_ratio");
    let error = CircuitBreaker::<Failure>::builder()
        .half_open_probes(0)
        .build()
        .unwrap_err();
    assert_eq!(error.field(), "half_open_probes");
}

/// A call slower than zero is every call: with a zero slow-call duration the breaker would
/// open on its first judgement and reopen on every probe. Refused at build, at
/// reconfiguration, and from a loaded configuration.
#[test]
fn a_zero_slow_call_duration_is_refused() {
    let error = CircuitBreaker::<Failure>::builder()
        .slow_calls(0.5, Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(error.field(), "slow_call_duration");

    let manual = ManualClock::new();
    let breaker = breaker(&manual);
    let mut config = breaker.config();
    config.slow_call_ratio = Some(0.5);
    config.slow_call_duration = Duration::ZERO;
    assert_eq!(
        breaker.reconfigure(config).unwrap_err().field(),
        "slow_call_duration"
    );

    #[cfg(feature = "serde")]
    {
        let loaded: headroom_breaker::BreakerConfig =
            serde_json::from_str(r#"{ "slow_call_ratio": 0.5, "slow_call_duration": "0s" }"#)
                .expect("parses");
        let error = CircuitBreaker::<Failure>::builder()
            .config(loaded.clone())
            .build()
            .unwrap_err();
        assert_eq!(error.field(), "slow_call_duration");
        let mut pipeline = headroom_breaker::PipelineConfig::default();
        pipeline.breaker = Some(loaded);
        assert_eq!(
            pipeline.validate().unwrap_err().field(),
            "breaker.slow_call_duration"
        );
    }
}

/// A count window never holds more than its size, so a larger minimum would never be reached
/// and the breaker would never open: refused at build and at reconfiguration.
#[test]
fn a_minimum_above_the_count_window_size_is_refused() {
    // The default minimum is 20.
    let error = CircuitBreaker::<Failure>::builder()
        .count_window(10)
        .build()
        .unwrap_err();
    assert_eq!(error.field(), "minimum_calls");

    let manual = ManualClock::new();
    let breaker = breaker(&manual);
    let before = breaker.config();
    let mut unreachable = before.clone();
    unreachable.minimum_calls = 11;
    assert_eq!(
        breaker.check_config(&unreachable).unwrap_err().field(),
        "minimum_calls"
    );
    assert_eq!(
        breaker.reconfigure(unreachable).unwrap_err().field(),
        "minimum_calls"
    );
    assert_eq!(breaker.config(), before, "the settings in force stay");

    // A time window holds any number of calls.
    CircuitBreaker::<Failure>::builder()
        .time_window(Duration::from_secs(1), 10)
        .minimum_calls(1000)
        .build()
        .expect("no count bound on a time window");
}

#[tokio::test]
async fn a_probe_that_panics_frees_its_slot() {
    let manual = ManualClock::new();
    let breaker = half_open(&manual);
    let first = breaker.try_acquire().expect("probe");
    let second = breaker.try_acquire().expect("probe");
    let panicking = breaker.clone();
    let task = tokio::spawn(async move {
        panicking
            .call(async { panic!("user code panicked") as Result<(), Failure> })
            .await
    });
    assert!(task.await.unwrap_err().is_panic());
    let third = breaker
        .try_acquire()
        .expect("the panicked probe's slot is free");
    first.success();
    second.success();
    third.success();
    assert_eq!(breaker.state(), State::Closed);
}

#[test]
fn calls_in_flight_during_a_reset_of_a_closed_breaker_are_not_counted() {
    let manual = ManualClock::new();
    let breaker = breaker(&manual);
    let in_flight: Vec<_> = (0..10)
        .map(|_| breaker.try_acquire().expect("closed"))
        .collect();
    breaker.reset();
    for permit in in_flight {
        permit.failure();
    }
    assert_eq!(
        breaker.state(),
        State::Closed,
        "the ten failures were admitted before the reset and describe the old window"
    );
    record(&breaker, 10, 0);
    assert_eq!(breaker.state(), State::Open, "calls after the reset count");
}

#[test]
fn a_refusal_says_which_state_refused() {
    let manual = ManualClock::new();
    let breaker = half_open(&manual);
    let _probes: Vec<_> = (0..3)
        .map(|_| breaker.try_acquire().expect("probe"))
        .collect();
    let full = breaker.try_acquire().unwrap_err();
    assert_eq!(full.state(), State::HalfOpen);
    assert_eq!(full.retry_after(), None);
    assert_eq!(
        full.to_string(),
        "circuit half-open, every probe slot taken"
    );

    breaker.isolate();
    let isolated = breaker.try_acquire().unwrap_err();
    assert_eq!(isolated.state(), State::Isolated);
    assert_eq!(isolated.to_string(), "circuit isolated");

    breaker.reset();
    record(&breaker, 10, 0);
    let open = breaker.try_acquire().unwrap_err();
    assert_eq!(open.state(), State::Open);
    assert_eq!(open.to_string(), "circuit open, retry after 10s");
}

/// New thresholds apply to the calls already in the window, at the next judgement; the state
/// and the window are kept.
#[test]
fn reconfigured_thresholds_judge_the_calls_already_counted() {
    let manual = ManualClock::new();
    let breaker = breaker(&manual);
    let mut config = breaker.config();
    config.failure_ratio = 0.9;
    breaker.reconfigure(config.clone()).unwrap();
    record(&breaker, 6, 4);
    assert_eq!(breaker.state(), State::Closed, "6 failures in 10 < 0.9");
    config.failure_ratio = 0.5;
    breaker.reconfigure(config).unwrap();
    // The window still holds 6 failures in 10: the next failure is judged against 0.5.
    record(&breaker, 1, 0);
    assert_eq!(breaker.state(), State::Open);
}

/// A window of another kind or size, or an invalid threshold, is refused; the settings in
/// force stay.
#[test]
fn a_reconfiguration_that_changes_the_window_or_is_invalid_is_refused() {
    let manual = ManualClock::new();
    let breaker = breaker(&manual);
    let before = breaker.config();
    let mut other_window = before.clone();
    other_window.window = headroom_breaker::config::WindowConfig::Count { size: 20 };
    assert_eq!(
        breaker.reconfigure(other_window).unwrap_err().field(),
        "window"
    );
    let mut invalid = before.clone();
    invalid.failure_ratio = 0.0;
    assert_eq!(
        breaker.reconfigure(invalid).unwrap_err().field(),
        "failure_ratio"
    );
    assert_eq!(breaker.config(), before);
}

/// Slow calls switched on at run time judge only calls admitted afterwards: a call admitted
/// while duration was ignored was never timed and is not slow, however late it ends.
#[test]
fn slow_calls_switched_on_at_run_time_time_only_later_calls() {
    let manual = ManualClock::new();
    let breaker = breaker(&manual);
    let untimed = breaker.try_acquire().unwrap();
    let mut config = breaker.config();
    // Every call in the window must be slow to open it.
    config.slow_call_ratio = Some(1.0);
    config.slow_call_duration = Duration::from_millis(100);
    breaker.reconfigure(config).unwrap();
    manual.advance(Duration::from_secs(1));
    untimed.success();
    let slow_call = || {
        let timed = breaker.try_acquire().unwrap();
        manual.advance(Duration::from_secs(1));
        timed.success();
    };
    for _ in 0..9 {
        slow_call();
    }
    assert_eq!(
        breaker.state(),
        State::Closed,
        "9 slow calls in 10: the untimed one was not slow"
    );
    // One more slow call pushes the untimed one out of the window: 10 slow in 10.
    slow_call();
    assert_eq!(breaker.state(), State::Open);
}

/// A lowered threshold is judged at the next call, whatever its outcome: the calls already in
/// the window may be above it.
#[test]
fn a_lowered_threshold_is_judged_at_the_next_call_even_a_success() {
    let manual = ManualClock::new();
    let breaker = breaker(&manual);
    let mut config = breaker.config();
    config.failure_ratio = 0.9;
    breaker.reconfigure(config.clone()).unwrap();
    record(&breaker, 6, 4);
    assert_eq!(breaker.state(), State::Closed);
    config.failure_ratio = 0.5;
    breaker.reconfigure(config).unwrap();
    // The success pushes the oldest failure out: 5 failures in 10, at the new threshold.
    record(&breaker, 0, 1);
    assert_eq!(breaker.state(), State::Open);
}

/// `open_after_failures_in_a_row(3, 5 s)`: a success among the failures keeps it closed, three
/// in a row open it for 5 s each time (no doubling), and one probe closes it.
#[test]
fn opens_after_failures_in_a_row_for_its_cooldown_each_time() {
    let manual = ManualClock::new();
    let breaker = CircuitBreaker::<Failure>::builder()
        .clock(manual.clock())
        .open_after_failures_in_a_row(3, Duration::from_secs(5))
        .build()
        .expect("valid config");
    record(&breaker, 2, 1);
    record(&breaker, 2, 0);
    assert_eq!(breaker.state(), State::Closed, "a success among them");
    record(&breaker, 1, 0);
    assert_eq!(breaker.state(), State::Open, "three in a row");
    for _ in 0..2 {
        manual.advance(Duration::from_secs(5) - Duration::from_millis(1));
        assert!(breaker.try_acquire().is_err(), "open for its cooldown");
        manual.advance(Duration::from_millis(1));
        let probe = breaker.try_acquire().expect("one probe");
        assert!(breaker.try_acquire().is_err(), "only one probe");
        probe.failure();
        assert_eq!(breaker.state(), State::Open, "the probe failed");
    }
    manual.advance(Duration::from_secs(5));
    breaker.try_acquire().expect("one probe").success();
    assert_eq!(breaker.state(), State::Closed);
}

/// Lowering the probes a half-open phase needs to no more than have already succeeded closes
/// the circuit there and then: no probe is left to succeed and judge the phase.
#[test]
fn lowering_the_half_open_probes_below_those_that_succeeded_closes_the_circuit() {
    let manual = ManualClock::new();
    let breaker = half_open(&manual);
    let mut transitions = breaker.subscribe();
    record(&breaker, 0, 2);
    assert_eq!(breaker.state(), State::HalfOpen, "2 of 3 probes succeeded");
    let mut config = breaker.config();
    config.half_open_probes = 2;
    breaker.reconfigure(config).expect("valid");
    assert_eq!(breaker.state(), State::Closed);
    let closed = std::iter::from_fn(|| transitions.try_recv().ok()).last();
    assert_eq!(
        closed.map(|t| (t.from, t.to, t.reason)),
        Some((State::HalfOpen, State::Closed, Reason::ProbesSucceeded))
    );
    breaker.try_acquire().expect("closed").success();
}

/// Raising the probes of a half-open phase opens the extra slots, and the phase closes only
/// once that many probes succeeded.
#[test]
fn raising_the_half_open_probes_admits_and_awaits_the_extra_probes() {
    let manual = ManualClock::new();
    let breaker = half_open(&manual);
    record(&breaker, 0, 2);
    let mut config = breaker.config();
    config.half_open_probes = 5;
    breaker.reconfigure(config).expect("valid");
    assert_eq!(breaker.state(), State::HalfOpen);
    let third = breaker.try_acquire().expect("a third slot");
    let fourth = breaker.try_acquire().expect("a fourth slot");
    let fifth = breaker.try_acquire().expect("a fifth slot");
    assert!(breaker.try_acquire().is_err(), "five slots, all taken");
    third.success();
    fourth.success();
    assert_eq!(breaker.state(), State::HalfOpen, "4 of 5 succeeded");
    fifth.success();
    assert_eq!(breaker.state(), State::Closed);
}

/// A configuration error is typed and classified like every other error of the crate: not a
/// timeout, not worth retrying, not a rejection.
#[test]
fn a_configuration_error_is_classified() {
    fn classified<E: headroom_core::Classify>(error: &E) -> (bool, bool, bool) {
        (
            error.is_timeout(),
            error.is_retryable(),
            error.is_rejected(),
        )
    }
    let error = CircuitBreaker::<Failure>::builder()
        .failure_ratio(0.0)
        .build()
        .unwrap_err();
    assert_eq!(classified(&error), (false, false, false));
}
