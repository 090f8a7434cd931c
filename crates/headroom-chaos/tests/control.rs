//! Switching experiments at run time: the hard end time, stop signals (an SLO's burn among
//! them), held calls released at the stop, a restart replacing the run, and configurations
//! refused or loaded from a file.

use std::time::Duration;

use futures_util::FutureExt;
use headroom_chaos::{Chaos, Delay, Experiment, ExperimentConfig, FaultKind, StopReason};
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
        let error = experiment.start(config.clone()).unwrap_err();
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
