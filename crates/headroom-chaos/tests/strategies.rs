//! Each strategy injects at its rate, draws independently of the others, and stays inside the
//! blast radius; delays follow their distribution. Draws are seeded, so every count here is
//! reproducible; the tolerances are what a fair draw would meet anyway.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use headroom_chaos::{Chaos, Delay, Experiment, ExperimentConfig};
use tokio::time::{Instant, timeout};

const CALLS: u32 = 10_000;
const RATE: f64 = 0.25;
/// About 4.6 standard deviations of a share drawn at 0.25 over 10,000 calls (σ = 0.0043).
const TOLERANCE: f64 = 0.02;
const MINUTE: Duration = Duration::from_secs(60);
/// How long a caller waits for a held call.
const HOLD: Duration = Duration::from_secs(1);

fn experiment(seed: u64) -> Experiment {
    Experiment::builder("strategies")
        .seed(seed)
        .build()
        .unwrap()
}

/// The point under test: answers 1 when it runs, 0 when an outcome is substituted, and fails
/// with "injected" when a fault is.
fn point(experiment: &Experiment, hook_runs: &Arc<AtomicU64>) -> Chaos<u32, &'static str> {
    let hook_runs = Arc::clone(hook_runs);
    Chaos::new(experiment.clone())
        .fault(|| "injected")
        .outcome(|| 0)
        .behavior(move || {
            hook_runs.fetch_add(1, Ordering::Relaxed);
            async {}
        })
}

fn assert_share(strategy: &str, observed: u32, expected: f64) {
    let share = f64::from(observed) / f64::from(CALLS);
    assert!(
        (share - expected).abs() <= TOLERANCE,
        "{strategy}: {observed} of {CALLS} calls ({share:.4}), expected {expected} ± {TOLERANCE}"
    );
}

/// What 10,000 calls saw with one strategy on at 0.25.
#[derive(Default)]
struct Seen {
    delayed: u32,
    failed: u32,
    substituted: u32,
    held: u32,
    hooked: u32,
}

async fn run(config: ExperimentConfig, seed: u64) -> Seen {
    let experiment = experiment(seed);
    let hook_runs = Arc::new(AtomicU64::new(0));
    let chaos = point(&experiment, &hook_runs);
    experiment.start(config).unwrap();
    let mut seen = Seen::default();
    for _ in 0..CALLS {
        let started = Instant::now();
        match timeout(HOLD, chaos.call(async { Ok(1) })).await {
            Err(_) => seen.held += 1,
            Ok(Err(_)) => seen.failed += 1,
            Ok(Ok(0)) => seen.substituted += 1,
            Ok(Ok(_)) => {}
        }
        if started.elapsed() > Duration::ZERO && started.elapsed() < HOLD {
            seen.delayed += 1;
        }
    }
    seen.hooked = u32::try_from(hook_runs.load(Ordering::Relaxed)).unwrap();
    experiment.stop();
    seen
}

#[tokio::test(start_paused = true)]
async fn each_strategy_injects_at_its_rate_and_nothing_else() {
    let base = || ExperimentConfig::new(ExperimentConfig::LONGEST);
    let delay = Delay::Fixed(Duration::from_millis(10));

    let seen = run(base().latency(RATE, delay), 1).await;
    assert_share("latency", seen.delayed, RATE);
    assert_eq!(
        (seen.failed, seen.substituted, seen.held, seen.hooked),
        (0, 0, 0, 0)
    );

    let seen = run(base().fault(RATE), 2).await;
    assert_share("fault", seen.failed, RATE);
    assert_eq!(
        (seen.delayed, seen.substituted, seen.held, seen.hooked),
        (0, 0, 0, 0)
    );

    let seen = run(base().outcome(RATE), 3).await;
    assert_share("outcome", seen.substituted, RATE);
    assert_eq!(
        (seen.delayed, seen.failed, seen.held, seen.hooked),
        (0, 0, 0, 0)
    );

    let seen = run(base().behavior(RATE), 4).await;
    assert_share("behavior", seen.hooked, RATE);
    assert_eq!(
        (seen.delayed, seen.failed, seen.substituted, seen.held),
        (0, 0, 0, 0)
    );

    let seen = run(base().abort(RATE), 5).await;
    assert_share("abort", seen.held, RATE);
    assert_eq!(
        (seen.delayed, seen.failed, seen.substituted, seen.hooked),
        (0, 0, 0, 0)
    );
}

/// Strategies draw independently: with latency and fault each at 0.5, a quarter of the calls
/// get both.
#[tokio::test(start_paused = true)]
async fn strategies_draw_independently() {
    let experiment = experiment(6);
    let chaos = Chaos::<u32, &str>::new(experiment.clone()).fault(|| "injected");
    experiment
        .start(
            ExperimentConfig::new(Duration::from_secs(3600))
                .latency(0.5, Delay::Fixed(Duration::from_millis(1)))
                .fault(0.5),
        )
        .unwrap();
    let mut both = 0;
    for _ in 0..CALLS {
        let started = Instant::now();
        let failed = chaos.call(async { Ok(1) }).await.is_err();
        if failed && started.elapsed() > Duration::ZERO {
            both += 1;
        }
    }
    assert_share("latency and fault", both, 0.25);
}

/// Mean delays: uniform 50–150 ms has mean 100 ms; exponential with mean 100 ms capped at 1 s
/// has mean 100·(1 − e^−10) ≈ 99.995 ms. Standard errors over 10,000 draws: 0.29 ms and 1 ms;
/// tolerances of 2 ms and 5 ms.
#[tokio::test(start_paused = true)]
async fn delays_follow_their_distribution() {
    let ms = Duration::from_millis;
    let cases = [
        (
            Delay::Uniform {
                min: ms(50),
                max: ms(150),
            },
            100.0,
            2.0,
            ms(50),
            ms(150),
        ),
        (
            Delay::Exponential {
                mean: ms(100),
                max: ms(1000),
            },
            99.995,
            5.0,
            ms(0),
            ms(1000),
        ),
    ];
    for (seed, (delay, mean, tolerance, shortest, longest)) in (7..).zip(cases) {
        let experiment = experiment(seed);
        let chaos = Chaos::<u32, ()>::new(experiment.clone());
        experiment
            .start(ExperimentConfig::new(Duration::from_secs(24 * 3600)).latency(1.0, delay))
            .unwrap();
        let mut total = Duration::ZERO;
        for _ in 0..CALLS {
            let started = Instant::now();
            chaos.call(async { Ok(1) }).await.unwrap();
            let took = started.elapsed();
            assert!((shortest..=longest).contains(&took), "{delay:?}: {took:?}");
            total += took;
        }
        let observed = total.as_secs_f64() * 1e3 / f64::from(CALLS);
        assert!(
            (observed - mean).abs() <= tolerance,
            "{delay:?}: mean {observed:.3} ms, expected {mean} ± {tolerance}"
        );
    }
}

/// The blast radius caps the share affected at every moment, whatever the rate says.
#[tokio::test(start_paused = true)]
async fn the_blast_radius_caps_the_share_affected() {
    let experiment = experiment(9);
    let chaos = Chaos::<u32, &str>::new(experiment.clone()).fault(|| "injected");
    experiment
        .start(ExperimentConfig::new(MINUTE).fault(1.0).max_fraction(0.1))
        .unwrap();
    let mut failed = 0u32;
    for call in 1..=CALLS {
        if chaos.call(async { Ok(1) }).await.is_err() {
            failed += 1;
        }
        assert!(
            f64::from(failed) <= 0.1 * f64::from(call),
            "{failed} failed of {call}"
        );
    }
    assert_eq!(failed, CALLS / 10, "the cap is reached, not undershot");
    let status = experiment.status().running.unwrap();
    assert_eq!(
        (status.seen, status.affected),
        (u64::from(CALLS), u64::from(failed))
    );
}

/// 100 calls a second for 10 seconds, all drawn, at most 5 affected a second.
#[tokio::test(start_paused = true)]
async fn the_blast_radius_caps_the_calls_affected_per_second() {
    let experiment = experiment(10);
    let chaos = Chaos::<u32, &str>::new(experiment.clone()).fault(|| "injected");
    experiment
        .start(ExperimentConfig::new(MINUTE).fault(1.0).max_per_second(5))
        .unwrap();
    for second in 0..10 {
        let mut failed = 0;
        for _ in 0..100 {
            if chaos.call(async { Ok(1) }).await.is_err() {
                failed += 1;
            }
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        assert_eq!(failed, 5, "second {second}");
    }
}

/// Consecutive calls draw independently: at a fault rate of 0.1, a call and the next both fail
/// about 1 % of the time, and so do a call and the one after next (over 200,000 calls the
/// standard error is 0.022 %; the tolerance is 0.1 %).
#[test]
fn consecutive_calls_draw_independently() {
    let experiment = experiment(12);
    let chaos = Chaos::<u32, &str>::new(experiment.clone()).fault(|| "injected");
    experiment
        .start(ExperimentConfig::new(MINUTE).fault(0.1))
        .unwrap();
    let failed: Vec<bool> = (0..200_000)
        .map(|_| {
            futures_util::FutureExt::now_or_never(chaos.call(async { Ok(1) }))
                .unwrap()
                .is_err()
        })
        .collect();
    for gap in [1, 2, 3] {
        let both = failed
            .windows(gap + 1)
            .filter(|pair| pair[0] && pair[gap])
            .count();
        let share = both as f64 / (failed.len() - gap) as f64;
        assert!(
            (share - 0.01).abs() <= 0.001,
            "calls {gap} apart both failed {share:.5} of the time, expected 0.01"
        );
    }
}

/// A call at a point that can apply none of the configured strategies is not seen: it counts
/// neither in the rates nor in the blast radius. A fault-only experiment at a point with no
/// fault hook sees nothing, and a point that can fail makes up the whole share it is capped at.
#[test]
fn calls_that_cannot_be_injected_are_not_seen() {
    let experiment = experiment(13);
    let cannot_fail = Chaos::<u32, &str>::new(experiment.clone());
    let can_fail = Chaos::<u32, &str>::new(experiment.clone()).fault(|| "injected");
    experiment
        .start(ExperimentConfig::new(MINUTE).fault(1.0).max_fraction(0.5))
        .unwrap();
    fn call(chaos: &Chaos<u32, &'static str>) -> Result<u32, &'static str> {
        futures_util::FutureExt::now_or_never(chaos.call(async { Ok(1) })).unwrap()
    }
    let mut failed = 0;
    for _ in 0..100 {
        assert_eq!(call(&cannot_fail), Ok(1));
        failed += u32::from(call(&can_fail).is_err());
    }
    let status = experiment.status().running.unwrap();
    assert_eq!(
        status.seen, 100,
        "only the calls that could be failed are seen"
    );
    assert_eq!(failed, 50);
}
