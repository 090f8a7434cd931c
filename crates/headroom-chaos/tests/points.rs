//! The injection points: a tower layer with a predicate, a pipeline's operation, and the off
//! path, which injects nothing and allocates nothing.

use std::convert::Infallible;
use std::future::ready;
use std::time::Duration;

use futures_util::FutureExt;
use headroom_breaker::{CircuitBreaker, Error, Pipeline};
use headroom_chaos::{Chaos, ChaosLayer, Experiment, ExperimentConfig, StopReason};
use headroom_core::{BackendError, BackendErrorKind, ManualClock};
use headroom_slo::{BurnAlert, Objective, ObjectiveConfig, Severity, SloLayer};
use tower::{Layer, Service, ServiceExt, service_fn};

const MINUTE: Duration = Duration::from_secs(60);

/// Only the requests the predicate picks are injected into, and only they count as seen.
#[tokio::test]
async fn the_layer_injects_only_into_the_requests_it_picks() {
    let experiment = Experiment::builder("checkout-503").seed(1).build().unwrap();
    let chaos = Chaos::new(experiment.clone()).outcome(|| 503);
    let mut service = ChaosLayer::new(chaos)
        .when(|path: &&str| path.starts_with("/checkout"))
        .layer(service_fn(|_: &str| ready(Ok::<_, Infallible>(200))));
    experiment
        .start(ExperimentConfig::new(MINUTE).outcome(1.0))
        .unwrap();
    for _ in 0..100 {
        assert_eq!(
            service.ready().await.unwrap().call("/catalog").await,
            Ok(200)
        );
        assert_eq!(
            service.ready().await.unwrap().call("/checkout").await,
            Ok(503)
        );
    }
    let status = experiment.status().running.unwrap();
    assert_eq!((status.seen, status.affected), (100, 100));
}

/// In a pipeline, injected faults are failures like any other: the breaker opens on them, and
/// the pipeline's timeout ends a held call.
#[tokio::test(start_paused = true)]
async fn a_pipeline_sees_injected_faults_and_its_timeout_ends_held_calls() {
    let experiment = Experiment::builder("inventory").build().unwrap();
    let chaos = Chaos::<u32, BackendError>::new(experiment.clone())
        .fault(|| BackendError::new(BackendErrorKind::Connection));
    let pipeline = Pipeline::<BackendError>::builder()
        .breaker(
            CircuitBreaker::builder()
                .name("inventory")
                .failure_ratio(0.5)
                .minimum_calls(10)
                .count_window(10)
                .build()
                .unwrap(),
        )
        .timeout(Duration::from_millis(250))
        .build();
    experiment
        .start(ExperimentConfig::new(MINUTE).fault(1.0))
        .unwrap();
    for _ in 0..10 {
        let error = pipeline
            .call(chaos.wrap(|| ready(Ok(1))))
            .await
            .unwrap_err();
        assert!(matches!(error, Error::Inner(_)), "{error:?}");
    }
    let refused = pipeline
        .call(chaos.wrap(|| ready(Ok(1))))
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::CircuitOpen(_)), "{refused:?}");

    let stalled = Pipeline::<BackendError>::builder()
        .timeout(Duration::from_millis(250))
        .build();
    experiment
        .start(ExperimentConfig::new(MINUTE).abort(1.0))
        .unwrap();
    let started = tokio::time::Instant::now();
    let elapsed = stalled.call(chaos.wrap(|| ready(Ok(1)))).await.unwrap_err();
    assert!(matches!(elapsed, Error::Elapsed(_)), "{elapsed:?}");
    assert_eq!(started.elapsed(), Duration::from_millis(250));
}

/// The automatic stop: an SLO with an error-rate bound (more than 10 % of requests failing over
/// both 5 minutes and 1 minute, i.e. a burn rate of 10 on a 99 % target) raises its signal, and
/// the experiment, injecting faults into 20 % of requests, stops by itself; after it, nothing is
/// injected and the objective sees only successes.
#[tokio::test]
async fn an_slo_signal_stops_the_experiment() {
    let time = ManualClock::new();
    let orders = Objective::with_clock(
        ObjectiveConfig::availability("orders", 0.99)
            .period(Duration::from_secs(24 * 3600))
            .alerts([BurnAlert::new(Severity::Page, 10.0, 5 * MINUTE, MINUTE)]),
        time.clock(),
    )
    .unwrap();
    let experiment = Experiment::builder("orders-errors")
        .clock(time.clock())
        .seed(3)
        .stop_when(orders.signal(Severity::Page).unwrap())
        .build()
        .unwrap();
    let chaos = Chaos::new(experiment.clone()).fault(|| "injected");
    let mut service = SloLayer::new(orders.clone())
        .layer(ChaosLayer::new(chaos).layer(service_fn(|_: ()| ready(Ok::<_, &str>(())))));
    experiment
        .start(ExperimentConfig::new(60 * MINUTE).fault(0.2))
        .unwrap();
    let mut seconds = 0;
    let mut failed_after_stop = 0;
    while seconds < 600 {
        let running = experiment.is_running();
        for _ in 0..10 {
            let failed = service.ready().await.unwrap().call(()).await.is_err();
            if failed && !running {
                failed_after_stop += 1;
            }
        }
        if !running {
            break;
        }
        time.advance(Duration::from_secs(1));
        seconds += 1;
    }
    let page = orders.signal(Severity::Page).unwrap();
    assert_eq!(
        experiment.status().last_stop,
        Some(StopReason::Signal(page.name().to_owned()))
    );
    assert!(seconds <= 5 * 60, "stopped after {seconds} s");
    assert_eq!(failed_after_stop, 0);
}

/// Off, a point is the bare call: nothing injected, nothing allocated (counted on this thread).
#[test]
fn the_off_path_injects_nothing_and_allocates_nothing() {
    let experiment = Experiment::builder("off").build().unwrap();
    let chaos = Chaos::<u32, &str>::new(experiment.clone())
        .fault(|| "injected")
        .outcome(|| 0);
    let mut service = ChaosLayer::new(chaos.clone())
        .layer(service_fn(|request: u32| ready(Ok::<_, &str>(request))));
    experiment
        .start(ExperimentConfig::new(MINUTE).fault(1.0))
        .unwrap();
    experiment.stop();
    let mut answers = 0u32;
    let allocations = allocation_counter::measure(|| {
        for request in 0..10_000 {
            answers += chaos.call(ready(Ok(1))).now_or_never().unwrap().unwrap();
            answers += service.call(request % 2).now_or_never().unwrap().unwrap();
        }
    });
    assert_eq!(
        answers,
        10_000 + 5_000,
        "every call answered by the real call"
    );
    assert_eq!(allocations.count_total, 0);
    assert_eq!(experiment.status().running, None);
}

/// A held or delayed request reaches the inner service only once its injection is over: a
/// stalled payment gateway charges nothing.
#[tokio::test(start_paused = true)]
async fn the_inner_service_is_called_only_after_the_injection() {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let experiment = Experiment::builder("stalled-gateway").build().unwrap();
    let mut service = ChaosLayer::new(Chaos::new(experiment.clone())).layer(service_fn({
        let calls = calls.clone();
        move |request: u32| {
            // Work done in `call` itself, as a client that sends on `call` does.
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            ready(Ok::<_, Infallible>(request))
        }
    }));
    experiment
        .start(ExperimentConfig::new(MINUTE).abort(1.0))
        .unwrap();
    let held = service.ready().await.unwrap().call(1);
    assert!(
        tokio::time::timeout(Duration::from_secs(1), held)
            .await
            .is_err()
    );
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a stalled call reached the service"
    );
    let held = service.ready().await.unwrap().call(2);
    experiment.stop();
    assert_eq!(held.await, Ok(2));
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// Off, a point does not even run its predicate: one relaxed load.
#[test]
fn the_off_path_does_not_run_the_predicate() {
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let experiment = Experiment::builder("off-picky").build().unwrap();
    let mut service = ChaosLayer::new(Chaos::<u32, Infallible>::new(experiment))
        .when({
            let runs = runs.clone();
            move |_: &u32| {
                runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                true
            }
        })
        .layer(service_fn(|request: u32| {
            ready(Ok::<_, Infallible>(request))
        }));
    for request in 0..100 {
        service.call(request).now_or_never().unwrap().unwrap();
    }
    assert_eq!(runs.load(std::sync::atomic::Ordering::Relaxed), 0);
}
