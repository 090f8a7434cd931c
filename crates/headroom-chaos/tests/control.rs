//! Switching experiments at run time: the hard end time, stop signals (an SLO's burn among
//! them), held calls released at the stop, a restart replacing the run, and configurations
//! refused or loaded from a file.

use std::time::Duration;

use futures_util::FutureExt;
use headroom_chaos::{
    Chaos, Delay, Experiment, ExperimentConfig, FaultKind, StartError, StopReason,
};
use headroom_core::{ManualClock, Signal};
use tokio::time::timeout;

const MINUTE: Duration = Duration::from_secs(60);

fn failing(experiment: &Experiment) -> Chaos<u32, &'static str> {
    Chaos::new(experiment.clone()).fault(|| "injected")
}

/// A forgotten experiment stops by itself at its end time, with no call to notice it.
#[tokio::test(start_paused = true)]
async fn an_experiment_stops_by_itself_at_its_end_time() {
    let experiment = Experiment::builder("forgotten").build().unwrap();
    let chaos = failing(&experiment);
    experiment
        .start(ExperimentConfig::new(Duration::from_secs(300)).fault(1.0))
        .unwrap();
    assert!(chaos.call(async { Ok(1) }).await.is_err());
    tokio::time::sleep(Duration::from_secs(299)).await;
    assert!(experiment.is_running());
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::yield_now().await;
    let status = experiment.status();
    assert_eq!(status.running, None);
    assert_eq!(status.last_stop, Some(StopReason::Ended));
    assert_eq!(chaos.call(async { Ok(1) }).await, Ok(1));
}

/// Without a runtime to time it, the end is noticed by the first call or status read after it.
#[test]
fn without_a_runtime_the_end_is_noticed_at_the_next_call() {
    let time = ManualClock::new();
    let experiment = Experiment::builder("no-runtime")
        .clock(time.clock())
        .build()
        .unwrap();
    let chaos = failing(&experiment);
    experiment
        .start(ExperimentConfig::new(MINUTE).fault(1.0))
        .unwrap();
    assert!(chaos.call(async { Ok(1) }).now_or_never().unwrap().is_err());
    time.advance(MINUTE);
    assert_eq!(chaos.call(async { Ok(1) }).now_or_never().unwrap(), Ok(1));
    assert_eq!(experiment.status().last_stop, Some(StopReason::Ended));
}

#[test]
fn a_raised_stop_signal_stops_the_experiment_at_the_next_call() {
    let guard = Signal::new("orders error rate");
    let experiment = Experiment::builder("guarded")
        .stop_when(guard.clone())
        .build()
        .unwrap();
    let chaos = failing(&experiment);
    experiment
        .start(ExperimentConfig::new(MINUTE).fault(1.0))
        .unwrap();
    assert!(chaos.call(async { Ok(1) }).now_or_never().unwrap().is_err());
    guard.set(true);
    assert_eq!(chaos.call(async { Ok(1) }).now_or_never().unwrap(), Ok(1));
    assert_eq!(
        experiment.status().last_stop,
        Some(StopReason::Signal("orders error rate".to_owned()))
    );
    guard.set(false);
    assert!(
        !experiment.is_running(),
        "a stopped experiment stays stopped"
    );
}

/// A start while a stop signal is raised is refused, naming the signal, and runs nothing;
/// once the signal is lowered, the start succeeds.
#[test]
fn a_start_while_a_stop_signal_is_raised_is_refused() {
    let guard = Signal::new("orders error rate");
    let experiment = Experiment::builder("guarded")
        .stop_when(guard.clone())
        .build()
        .unwrap();
    guard.set(true);
    let refused = experiment
        .start(ExperimentConfig::new(MINUTE).fault(1.0))
        .unwrap_err();
    assert_eq!(refused, StartError::Halted("orders error rate".to_owned()));
    assert!(!experiment.is_running());
    assert_eq!(experiment.status().last_stop, None);
    guard.set(false);
    experiment
        .start(ExperimentConfig::new(MINUTE).fault(1.0))
        .unwrap();
    assert!(experiment.is_running());
}

/// An aborted call is held until the experiment stops, then makes its real call; a restart
/// releases the calls held by the run it replaces.
#[tokio::test(start_paused = true)]
async fn held_calls_go_on_when_the_run_ends() {
    let experiment = Experiment::builder("stall").build().unwrap();
    let chaos = Chaos::<u32, ()>::new(experiment.clone());
    experiment
        .start(ExperimentConfig::new(Duration::from_secs(3600)).abort(1.0))
        .unwrap();
    assert!(timeout(MINUTE, chaos.call(async { Ok(1) })).await.is_err());

    let held = tokio::spawn({
        let chaos = chaos.clone();
        async move { chaos.call(async { Ok(2) }).await }
    });
    tokio::time::sleep(MINUTE).await;
    assert!(!held.is_finished());
    experiment.stop();
    assert_eq!(held.await.unwrap(), Ok(2));

    let held = tokio::spawn({
        let chaos = chaos.clone();
        async move { chaos.call(async { Ok(3) }).await }
    });
    tokio::time::sleep(MINUTE).await;
    experiment
        .start(ExperimentConfig::new(Duration::from_secs(3600)))
        .unwrap();
    assert_eq!(held.await.unwrap(), Ok(3));
}

/// Starting a running experiment replaces its run: new settings, a new end time, counts from
/// zero.
#[test]
fn starting_again_replaces_the_run() {
    let experiment = Experiment::builder("changed").build().unwrap();
    let chaos = failing(&experiment);
    experiment
        .start(ExperimentConfig::new(MINUTE).fault(1.0))
        .unwrap();
    for _ in 0..10 {
        let _ = chaos.call(async { Ok(1) }).now_or_never();
    }
    let changed = ExperimentConfig::new(Duration::from_secs(600)).fault_of(0.0, FaultKind::Timeout);
    experiment.start(changed.clone()).unwrap();
    let status = experiment.status().running.unwrap();
    assert_eq!(
        (status.config, status.seen, status.affected),
        (changed, 0, 0)
    );
    assert!(status.remaining > MINUTE);
    assert_eq!(chaos.call(async { Ok(1) }).now_or_never().unwrap(), Ok(1));
}

#[test]
fn invalid_configurations_are_refused_with_the_field() {
    let ms = Duration::from_millis;
    let base = || ExperimentConfig::new(MINUTE);
    let cases = [
        (ExperimentConfig::new(Duration::ZERO), "duration"),
        (
            ExperimentConfig::new(Duration::from_secs(2 * 24 * 3600)),
            "duration",
        ),
        (base().fault(1.5), "fault.rate"),
        (base().outcome(-0.1), "outcome.rate"),
        (base().abort(f64::NAN), "abort.rate"),
        (base().loss(2.0), "loss.rate"),
        (base().behavior(f64::INFINITY), "behavior.rate"),
        (
            base().latency(
                0.5,
                Delay::Uniform {
                    min: ms(10),
                    max: ms(5),
                },
            ),
            "latency.delay",
        ),
        (
            base().latency(
                0.5,
                Delay::Exponential {
                    mean: ms(0),
                    max: ms(5),
                },
            ),
            "latency.delay",
        ),
        (
            base().latency(0.5, Delay::Fixed(Duration::from_secs(61))),
            "latency.delay",
        ),
        (base().max_fraction(1.01), "blast_radius.max_fraction"),
        (base().max_per_second(0), "blast_radius.max_per_second"),
    ];
    let experiment = Experiment::builder("refused").build().unwrap();
    for (config, field) in cases {
        let Err(StartError::Config(error)) = experiment.start(config.clone()) else {
            panic!("{config:?} was not refused");
        };
        assert_eq!(error.field(), field, "{config:?}");
        assert!(!experiment.is_running());
    }
    for name in ["", "has space", "a{b}", &"x".repeat(129)] {
        assert_eq!(
            Experiment::builder(name).build().unwrap_err().field(),
            "name"
        );
    }
}

#[test]
fn a_configuration_loads_from_json_with_readable_durations() {
    let config: ExperimentConfig = serde_json::from_str(
        r#"{
            "duration": "10m",
            "blast_radius": { "max_fraction": 0.05, "max_per_second": 20 },
            "latency": { "rate": 0.2, "delay": { "uniform": { "min": "50ms", "max": "300ms" } } },
            "fault": { "rate": 0.01, "kind": "timeout" }
        }"#,
    )
    .unwrap();
    let ms = Duration::from_millis;
    assert_eq!(
        config,
        ExperimentConfig::new(Duration::from_secs(600))
            .latency(
                0.2,
                Delay::Uniform {
                    min: ms(50),
                    max: ms(300)
                }
            )
            .fault_of(0.01, FaultKind::Timeout)
            .max_fraction(0.05)
            .max_per_second(20)
    );
    let unknown = serde_json::from_str::<ExperimentConfig>(r#"{ "duration": "1m", "faults": {} }"#);
    assert!(
        unknown.is_err(),
        "a misspelt strategy is refused, not ignored"
    );
    let round_trip: ExperimentConfig =
        serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
    assert_eq!(round_trip, config);
}

/// A strategy left out is left out of the JSON too, not written as `null`: an instance built
/// before a new optional field reads every configuration that does not use it.
#[test]
fn fields_left_out_are_not_serialized() {
    let config = ExperimentConfig::new(MINUTE).fault(0.1);
    let json = serde_json::to_value(&config).unwrap();
    let object = json.as_object().unwrap();
    for absent in ["latency", "outcome", "behavior", "abort", "loss"] {
        assert!(!object.contains_key(absent), "{absent} in {json}");
    }
    assert!(
        !object["blast_radius"]
            .as_object()
            .unwrap()
            .contains_key("max_per_second"),
        "{json}"
    );
    assert_eq!(
        serde_json::from_value::<ExperimentConfig>(json).unwrap(),
        config
    );
    let full = config
        .latency(0.5, Delay::Fixed(Duration::from_millis(5)))
        .outcome(0.2)
        .behavior(0.3)
        .abort(0.4)
        .loss(0.6)
        .max_per_second(9);
    let round_trip: ExperimentConfig =
        serde_json::from_value(serde_json::to_value(&full).unwrap()).unwrap();
    assert_eq!(round_trip, full);
}

/// The kill switch kills: stopping ends injected delays at once, and no delay outlasts the
/// run's end time.
#[tokio::test(start_paused = true)]
async fn stopping_or_ending_cuts_injected_delays_short() {
    let experiment = Experiment::builder("slow").build().unwrap();
    let chaos = Chaos::<u32, ()>::new(experiment.clone());
    let day = ExperimentConfig::LONGEST;
    experiment
        .start(ExperimentConfig::new(day).latency(1.0, Delay::Fixed(day)))
        .unwrap();
    let delayed = tokio::spawn({
        let chaos = chaos.clone();
        async move {
            let started = tokio::time::Instant::now();
            chaos.call(async { Ok(1) }).await.unwrap();
            started.elapsed()
        }
    });
    tokio::time::sleep(MINUTE).await;
    experiment.stop();
    assert_eq!(
        delayed.await.unwrap(),
        MINUTE,
        "the delay ended with the stop"
    );

    experiment
        .start(
            ExperimentConfig::new(Duration::from_secs(600))
                .latency(1.0, Delay::Fixed(Duration::from_secs(600))),
        )
        .unwrap();
    tokio::time::sleep(Duration::from_secs(599)).await;
    let started = tokio::time::Instant::now();
    chaos.call(async { Ok(1) }).await.unwrap();
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(1),
        "the delay ended with the run"
    );
}

/// A stop, or the run's end, releases a delayed call to what it would have been without the
/// experiment: the fault or outcome drawn with its delay is not injected after the run, at any
/// point (a call, a built call, the tower layer, a backend wrapper).
#[tokio::test(start_paused = true)]
async fn a_call_released_by_the_stop_or_the_end_is_not_faulted() {
    use headroom_chaos::{ChaosKvStore, ChaosLayer};
    use headroom_core::kv::KvStore;
    use headroom_core::memory::MemoryKvStore;
    use tower::{Layer, Service, ServiceExt, service_fn};

    let experiment = Experiment::builder("slow-then-failing").build().unwrap();
    let chaos = Chaos::<u32, &str>::new(experiment.clone())
        .fault(|| "injected")
        .outcome(|| 503);
    let inner = MemoryKvStore::new();
    let kv = ChaosKvStore::new(inner.clone(), experiment.clone());
    let key = headroom_core::Namespace::new("chaos")
        .unwrap()
        .key("k")
        .unwrap();
    let delay = Delay::Fixed(10 * MINUTE);
    for (stop, config) in [
        (
            true,
            ExperimentConfig::new(60 * MINUTE)
                .latency(1.0, delay)
                .fault(1.0),
        ),
        (
            true,
            ExperimentConfig::new(60 * MINUTE)
                .latency(1.0, delay)
                .outcome(1.0),
        ),
        // Ended by its end time, which the delay reaches.
        (
            false,
            ExperimentConfig::new(10 * MINUTE)
                .latency(1.0, delay)
                .fault(1.0),
        ),
    ] {
        experiment.start(config).unwrap();
        let call = tokio::spawn(chaos.call(async { Ok(1) }));
        let built = tokio::spawn(chaos.call_with(|| async { Ok(2) }));
        let wrapped = tokio::spawn(chaos.wrap(|| async { Ok(4) })());
        let mut service = ChaosLayer::new(chaos.clone())
            .layer(service_fn(|n: u32| async move { Ok::<_, &str>(n) }));
        let layered = tokio::spawn(service.ready().await.unwrap().call(3));
        let write = tokio::spawn({
            let (kv, key) = (kv.clone(), key.clone());
            async move { kv.set(&key, "v".into(), MINUTE).await }
        });
        tokio::time::sleep(MINUTE).await;
        if stop {
            experiment.stop();
        }
        assert_eq!(call.await.unwrap(), Ok(1));
        assert_eq!(built.await.unwrap(), Ok(2));
        assert_eq!(wrapped.await.unwrap(), Ok(4));
        assert_eq!(layered.await.unwrap(), Ok(3));
        write.await.unwrap().expect("the write lands");
        assert_eq!(inner.get(&key).await.unwrap().as_deref(), Some(&b"v"[..]));
        inner.delete(std::slice::from_ref(&key)).await.unwrap();
    }
}

/// A raised stop signal stops the run at once, with no new call to notice it: the calls it
/// holds are released (behind a full bulkhead, no new call may come).
#[tokio::test(start_paused = true)]
async fn a_raised_stop_signal_releases_held_calls_with_no_call_to_notice_it() {
    let guard = Signal::new("orders error rate");
    let experiment = Experiment::builder("holding")
        .stop_when(guard.clone())
        .build()
        .unwrap();
    let chaos = failing(&experiment);
    experiment
        .start(ExperimentConfig::new(60 * MINUTE).abort(1.0))
        .unwrap();
    let held = tokio::spawn(chaos.call(async { Ok(1) }));
    tokio::time::sleep(MINUTE).await;
    assert!(!held.is_finished());
    guard.set(true);
    let released = timeout(MINUTE, held).await;
    assert_eq!(released.expect("released").unwrap(), Ok(1));
    assert_eq!(
        experiment.status().last_stop,
        Some(StopReason::Signal("orders error rate".to_owned()))
    );
}

/// A wrapped operation is not even built for a call answered by an injected fault or
/// substitute: building it may already act (a tower `Buffer` sends the request when called).
#[tokio::test]
async fn a_wrapped_operation_is_not_built_for_an_injected_answer() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let experiment = Experiment::builder("failing").build().unwrap();
    let chaos = failing(&experiment);
    experiment
        .start(ExperimentConfig::new(MINUTE).fault(1.0))
        .unwrap();
    let built = Arc::new(AtomicUsize::new(0));
    let mut operation = chaos.wrap({
        let built = Arc::clone(&built);
        move || {
            built.fetch_add(1, Ordering::SeqCst);
            async { Ok(1) }
        }
    });
    assert!(operation().await.is_err());
    assert_eq!(built.load(Ordering::SeqCst), 0);
    experiment.stop();
    assert_eq!(operation().await, Ok(1));
    assert_eq!(built.load(Ordering::SeqCst), 1);
}
