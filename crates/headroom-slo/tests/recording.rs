//! How requests are recorded: the latency threshold, calls given up on, evaluation on a timer,
//! and recording from several threads at once.

use std::future::pending;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use headroom_core::ManualClock;
use headroom_slo::{BurnAlert, Objective, ObjectiveConfig, Severity, SloLayer};
use tower::{Layer, Service, ServiceExt, service_fn};

const THRESHOLD: Duration = Duration::from_millis(300);

fn latency(time: &ManualClock) -> Objective {
    Objective::with_clock(
        ObjectiveConfig::latency("search", THRESHOLD, 0.99),
        time.clock(),
    )
    .unwrap()
}

/// A latency objective: good when the call succeeded within the threshold, the threshold
/// itself included; a failure is bad however fast.
#[tokio::test(flavor = "current_thread")]
async fn latency_counts_successes_within_the_threshold() {
    let time = ManualClock::new();
    let objective = latency(&time);
    let took = |elapsed: Duration, succeeded: bool| {
        let started = objective.start();
        time.advance(elapsed);
        objective.finish(started, succeeded);
    };
    took(THRESHOLD, true);
    took(THRESHOLD + Duration::from_nanos(1), true);
    took(Duration::from_millis(1), false);
    let status = objective.evaluate();
    assert_eq!((status.events, status.bad), (3, 2));
}

/// Through the layer: a call dropped before its answer is bad for a latency objective once it
/// has taken longer than the threshold, and not recorded before that.
#[tokio::test(flavor = "current_thread")]
async fn a_call_given_up_on_counts_against_latency_once_past_the_threshold() {
    let time = ManualClock::new();
    let objective = latency(&time);
    let mut service =
        SloLayer::new(objective.clone()).layer(service_fn(|_: ()| pending::<Result<(), ()>>()));
    let early = service.ready().await.unwrap().call(());
    time.advance(THRESHOLD);
    drop(early);
    assert_eq!(
        objective.evaluate().events,
        0,
        "within the threshold: no outcome"
    );
    let late = service.ready().await.unwrap().call(());
    time.advance(THRESHOLD + Duration::from_millis(1));
    drop(late);
    let status = objective.evaluate();
    assert_eq!((status.events, status.bad), (1, 1));

    // An availability objective never records a call without an outcome.
    let available = Objective::with_clock(
        ObjectiveConfig::availability("search-ok", 0.99),
        time.clock(),
    )
    .unwrap();
    let mut service =
        SloLayer::new(available.clone()).layer(service_fn(|_: ()| pending::<Result<(), ()>>()));
    let given_up = service.ready().await.unwrap().call(());
    time.advance(Duration::from_secs(60));
    drop(given_up);
    assert_eq!(available.evaluate().events, 0);
}

/// An availability and a latency objective on `time`.
fn both_kinds(time: &ManualClock) -> [Objective; 2] {
    let available = Objective::with_clock(
        ObjectiveConfig::availability("search-ok", 0.99),
        time.clock(),
    )
    .unwrap();
    [available, latency(time)]
}

/// A service that panics failed its caller (a catching layer outside answers 500, or the
/// connection drops): both kinds of objective count the call as bad, at once.
#[tokio::test(flavor = "current_thread")]
async fn a_call_whose_service_panics_counts_as_bad() {
    for objective in both_kinds(&ManualClock::new()) {
        let service = SloLayer::new(objective.clone()).layer(service_fn(|_: ()| async {
            panic!("the handler failed");
            #[allow(unreachable_code)]
            Ok::<(), ()>(())
        }));
        let panicked = tokio::spawn(service.oneshot(())).await.unwrap_err();
        assert!(panicked.is_panic());
        let status = objective.evaluate();
        assert_eq!((status.events, status.bad), (1, 1), "{}", objective.name());
    }
}

/// A service whose `call` itself panics, before any future exists, failed its caller just the
/// same: both kinds of objective count the call as bad.
#[tokio::test(flavor = "current_thread")]
async fn a_call_whose_service_panics_in_call_counts_as_bad() {
    for objective in both_kinds(&ManualClock::new()) {
        let service = SloLayer::new(objective.clone()).layer(service_fn(
            |_: ()| -> std::future::Ready<Result<(), ()>> { panic!("in call") },
        ));
        let panicked = tokio::spawn(service.oneshot(())).await.unwrap_err();
        assert!(panicked.is_panic());
        let status = objective.evaluate();
        assert_eq!((status.events, status.bad), (1, 1), "{}", objective.name());
    }
}

/// With no request arriving, the timer still moves the windows on: the page signal is lowered
/// once the short window has no bad request left.
#[tokio::test(flavor = "current_thread")]
async fn evaluation_on_a_timer_lowers_the_signal_without_traffic() {
    let time = ManualClock::new();
    let config = ObjectiveConfig::availability("checkout", 0.99).alerts([BurnAlert::new(
        Severity::Page,
        10.0,
        Duration::from_secs(600),
        Duration::from_secs(60),
    )]);
    let objective = Objective::with_clock(config, time.clock()).unwrap();
    for _ in 0..100 {
        objective.record(false);
    }
    objective.evaluate();
    let page = objective.signal(Severity::Page).unwrap();
    assert!(page.is_raised());
    let timer = tokio::spawn(objective.evaluate_every(Duration::from_secs(10)));
    for _ in 0..7 {
        time.advance(Duration::from_secs(10));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }
    assert!(
        !page.is_raised(),
        "the minute is clean and nobody recorded anything"
    );
    timer.abort();
}

/// A zero interval is taken as the shortest one: the timer waits between evaluations, so the
/// task that runs it still lets the others run.
#[test]
fn a_timer_of_zero_leaves_its_thread_to_the_other_tasks() {
    let (done, finished) = std::sync::mpsc::channel();
    // Its own thread, so that a timer that never yields fails the test instead of hanging it.
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let time = ManualClock::new();
            let objective = latency(&time);
            let timer = tokio::spawn(objective.evaluate_every(Duration::ZERO));
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            timer.abort();
        });
        let _ = done.send(());
    });
    assert!(
        finished.recv_timeout(Duration::from_secs(10)).is_ok(),
        "the timer kept its thread"
    );
}

/// Two threads record while a third moves the clock through many buckets and evaluates:
/// every request is counted once.
#[test]
fn concurrent_recording_counts_every_request_once() {
    const PER_THREAD: u64 = 50_000;
    let time = ManualClock::new();
    let config = ObjectiveConfig::availability("busy", 0.99).alerts([BurnAlert::new(
        Severity::Page,
        2.0,
        Duration::from_secs(20),
        Duration::from_secs(10),
    )]);
    let objective = Objective::with_clock(config, time.clock()).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    std::thread::scope(|scope| {
        let recorders: Vec<_> = (0..2)
            .map(|thread| {
                let objective = objective.clone();
                scope.spawn(move || {
                    for request in 0..PER_THREAD {
                        objective.record(request % 10 != thread);
                    }
                })
            })
            .collect();
        scope.spawn(|| {
            // 100 ms a step: a new first-level bucket (1 s) every ten steps, a full ring every
            // 256 s, so buckets move up levels while the others record.
            while !done.load(Ordering::Relaxed) {
                time.advance(Duration::from_millis(100));
                objective.evaluate();
            }
        });
        for recorder in recorders {
            recorder.join().unwrap();
        }
        done.store(true, Ordering::Relaxed);
    });
    let status = objective.evaluate();
    assert_eq!(status.events, 2 * PER_THREAD);
    assert_eq!(status.bad, 2 * PER_THREAD / 10);
}
