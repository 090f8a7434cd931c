//! Adaptive limits against a simulated service: they settle near its capacity and back off
//! when its latency rises.
//!
//! The service runs `workers` requests at a time for 10 ms each; the rest wait inside it, so
//! any concurrency above `workers` only adds latency. Forty closed-loop callers go through a
//! bulkhead whose limit is adaptive. Paused time keeps it deterministic.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use headroom_limit::Bulkhead;
use headroom_limit::adaptive::{
    AdaptiveConfig, AdaptiveLimit, AimdConfig, GradientConfig, Outcome,
};
use tokio::sync::Semaphore;

const CALLERS: usize = 40;
const CAPACITY: usize = 10;
const SERVICE_TIME: Duration = Duration::from_millis(10);

struct Service {
    workers: Semaphore,
}

impl Service {
    async fn call(&self) {
        let _worker = self.workers.acquire().await.expect("never closed");
        tokio::time::sleep(SERVICE_TIME).await;
    }
}

/// Runs the callers for `duration` and returns the mean limit over its second half.
async fn run(bulkhead: &Bulkhead, service: &Arc<Service>, duration: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (bulkhead, service, stop) =
                (bulkhead.clone(), Arc::clone(service), Arc::clone(&stop));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match bulkhead.acquire().await {
                        Ok(_permit) => service.call().await,
                        Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                }
            })
        })
        .collect();
    let steps = duration.as_millis() as usize / 10;
    let mut sum = 0.0;
    let mut count = 0.0;
    for step in 0..steps {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if step >= steps / 2 {
            sum += bulkhead.limit() as f64;
            count += 1.0;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.await.expect("caller");
    }
    sum / count
}

async fn converges_and_backs_off(config: AdaptiveConfig) -> (f64, f64) {
    let bulkhead = Bulkhead::builder("adaptive")
        .adaptive(config)
        .max_queued(CALLERS)
        .max_wait(Duration::from_secs(10))
        .build()
        .expect("valid");
    let service = Arc::new(Service {
        workers: Semaphore::new(CAPACITY),
    });
    let settled = run(&bulkhead, &service, Duration::from_secs(6)).await;
    // Half the capacity goes away: the same concurrency now queues inside the service and
    // latency rises.
    assert_eq!(service.workers.forget_permits(CAPACITY / 2), CAPACITY / 2);
    let halved = run(&bulkhead, &service, Duration::from_secs(6)).await;
    println!("settled at {settled:.1} (capacity {CAPACITY}), after halving capacity {halved:.1}");
    (settled, halved)
}

#[tokio::test(start_paused = true)]
async fn gradient_settles_near_capacity_and_backs_off_when_latency_rises() {
    let (settled, halved) = converges_and_backs_off(AdaptiveConfig::Gradient(GradientConfig {
        initial_limit: 40,
        ..GradientConfig::default()
    }))
    .await;
    let capacity = CAPACITY as f64;
    let tolerance = GradientConfig::default().rtt_tolerance;
    assert!(
        gradient_band(capacity, tolerance).contains(&settled),
        "settled at {settled}"
    );
    assert!(
        halved < settled * 0.75 && gradient_band(capacity / 2.0, tolerance).contains(&halved),
        "backed off to {halved} from {settled}"
    );
}

/// Where the documentation says a gradient limit settles on a service of `capacity`:
/// `rtt_tolerance × capacity` plus a queue allowance of `√limit` (at least 2).
fn gradient_band(capacity: f64, tolerance: f64) -> std::ops::RangeInclusive<f64> {
    let top = tolerance * capacity + 2.0 * (tolerance * capacity).sqrt() + 2.0;
    0.7 * capacity..=top
}

#[tokio::test(start_paused = true)]
async fn aimd_settles_near_capacity_and_backs_off_when_latency_rises() {
    let (settled, halved) = converges_and_backs_off(AdaptiveConfig::Aimd(AimdConfig {
        initial_limit: 2,
        latency_threshold: Some(Duration::from_millis(15)),
        ..AimdConfig::default()
    }))
    .await;
    let capacity = CAPACITY as f64;
    assert!(
        (0.7 * capacity..=1.6 * capacity).contains(&settled),
        "settled at {settled}"
    );
    assert!(
        halved < settled * 0.75 && (0.7 * capacity / 2.0..=1.8 * capacity / 2.0).contains(&halved),
        "backed off to {halved} from {settled}"
    );
}

/// A service of `capacity` workers taking `service_time()` per request, with a FIFO queue
/// inside, driven by `4 × capacity` closed-loop callers through `limit`: each caller sends its
/// next request as soon as the last one returns and waits for admission while `limit` requests
/// are in flight. Simulated event by event (no runtime), so a capacity of 1,000 is cheap.
/// Halfway through, half the workers go away. Returns the mean limit over the second quarter
/// and over the last quarter of the run.
fn simulate(
    limit: &AdaptiveLimit,
    capacity: usize,
    seconds: u64,
    mut service_time: impl FnMut() -> Duration,
) -> (f64, f64) {
    use std::cmp::Reverse;
    use std::collections::{BinaryHeap, VecDeque};

    let callers = 4 * capacity;
    let end = Duration::from_secs(seconds);
    let mut workers = capacity;
    let mut now = Duration::ZERO;
    let mut in_flight = 0;
    let mut idle_callers = callers;
    // Requests admitted and waiting for a worker (their admission time), and those being
    // served (completion time, admission time).
    let mut service_queue: VecDeque<Duration> = VecDeque::new();
    let mut serving: BinaryHeap<Reverse<(Duration, Duration)>> = BinaryHeap::new();
    let (mut settled, mut halved) = ((0.0, 0.0), (0.0, 0.0));
    let mut next_reading = Duration::ZERO;
    loop {
        while idle_callers > 0 && in_flight < limit.limit() {
            idle_callers -= 1;
            in_flight += 1;
            service_queue.push_back(now);
        }
        while serving.len() < workers {
            let Some(admitted) = service_queue.pop_front() else {
                break;
            };
            serving.push(Reverse((now + service_time(), admitted)));
        }
        let Some(Reverse((done, admitted))) = serving.pop() else {
            panic!("the simulated service stalled");
        };
        now = done;
        if now >= end {
            break;
        }
        if now >= end / 2 {
            workers = capacity / 2;
        }
        limit.sample(now - admitted, in_flight, Outcome::Success);
        in_flight -= 1;
        idle_callers += 1;
        while now >= next_reading {
            let quarter = next_reading.as_secs_f64() / end.as_secs_f64() * 4.0;
            let sum = match quarter as usize {
                1 => &mut settled,
                3 => &mut halved,
                _ => &mut (0.0, 0.0),
            };
            sum.0 += limit.limit() as f64;
            sum.1 += 1.0;
            next_reading += Duration::from_millis(10);
        }
    }
    (settled.0 / settled.1, halved.0 / halved.1)
}

/// The gradient limit settles within the band its documentation gives,
/// `rtt_tolerance × capacity` plus a queue allowance of at most `sqrt` of the limit, and
/// follows the capacity when half of it goes away, whatever the scale.
#[test]
fn gradient_converges_near_capacity_of_10_100_and_1000() {
    for capacity in [10, 100, 1_000] {
        let config = GradientConfig {
            initial_limit: 20,
            max_limit: 10_000,
            ..GradientConfig::default()
        };
        let tolerance = config.rtt_tolerance;
        let limit = AdaptiveLimit::new("gradient", AdaptiveConfig::Gradient(config)).unwrap();
        let (settled, halved) = simulate(&limit, capacity, 16, || SERVICE_TIME);
        println!("capacity {capacity}: settled at {settled:.1}, after halving {halved:.1}");
        let band = |capacity| gradient_band(capacity, tolerance);
        let capacity = capacity as f64;
        assert!(
            band(capacity).contains(&settled),
            "capacity {capacity}: settled at {settled}, outside {:?}",
            band(capacity)
        );
        assert!(
            band(capacity / 2.0).contains(&halved),
            "capacity {capacity}: after halving at {halved}, outside {:?}",
            band(capacity / 2.0)
        );
    }
}

/// Service times spread uniformly over 5 to 15 ms (a fixed-seed generator, so the run is
/// the same every time): a round trip slower than the average is not queueing, and the limit
/// still settles within the documented band of the capacity, at every scale.
#[test]
fn gradient_converges_near_capacity_when_service_times_vary() {
    for capacity in [10, 100, 1_000] {
        let config = GradientConfig {
            initial_limit: 20,
            max_limit: 10_000,
            ..GradientConfig::default()
        };
        let tolerance = config.rtt_tolerance;
        let limit = AdaptiveLimit::new("gradient", AdaptiveConfig::Gradient(config)).unwrap();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let spread = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let uniform = (state >> 11) as f64 / (1_u64 << 53) as f64;
            Duration::from_secs_f64(0.005 + 0.010 * uniform)
        };
        let (settled, halved) = simulate(&limit, capacity, 16, spread);
        println!("capacity {capacity}: settled at {settled:.1}, after halving {halved:.1}");
        let band = |capacity| gradient_band(capacity, tolerance);
        let capacity = capacity as f64;
        assert!(
            band(capacity).contains(&settled),
            "capacity {capacity}: settled at {settled}, outside {:?}",
            band(capacity)
        );
        assert!(
            band(capacity / 2.0).contains(&halved),
            "capacity {capacity}: after halving at {halved}, outside {:?}",
            band(capacity / 2.0)
        );
    }
}

/// The most a test gradient limit may reach, so that it settles at a known value when the
/// round trip never changes.
const STEADY_MAX: usize = 100;

/// A gradient limit that has settled at `STEADY_MAX` on round trips of `rtt`.
fn settled_gradient(rtt: Duration) -> AdaptiveLimit {
    let config = GradientConfig {
        initial_limit: 50,
        max_limit: STEADY_MAX,
        ..GradientConfig::default()
    };
    let limit = AdaptiveLimit::new("gradient", AdaptiveConfig::Gradient(config)).unwrap();
    let (_, last) = steady_successes(&limit, rtt, 200);
    assert_eq!(last, STEADY_MAX, "a steady round trip lets the limit grow");
    limit
}

/// Feeds `round_trips` round trips of successes taking `rtt` with the limit in full use. A
/// probe lowers the limit for one and a half round trips, so the highest limit seen over two
/// round trips is the limit outside probes: returns the lowest and the last of those.
fn steady_successes(limit: &AdaptiveLimit, rtt: Duration, round_trips: usize) -> (usize, usize) {
    let (mut lowest, mut highest) = (usize::MAX, 0);
    for _ in 0..round_trips / 2 {
        highest = 0;
        for _ in 0..2 * STEADY_MAX + 2 {
            highest = highest.max(limit.sample(rtt, limit.limit(), Outcome::Success));
        }
        lowest = lowest.min(highest);
    }
    (lowest, highest)
}

/// A failure that returns at once (a refused connection) is not a round trip of the service:
/// it must not become the long RTT that later successes are compared with.
#[test]
fn a_fast_failure_does_not_lower_the_long_rtt() {
    let rtt = Duration::from_millis(50);
    let limit = settled_gradient(rtt);
    let settled = STEADY_MAX;
    limit.sample(Duration::from_millis(1), limit.limit(), Outcome::Dropped);
    let (after, _) = steady_successes(&limit, rtt, 100);
    println!("settled at {settled}, lowest over 100 round trips after a 1 ms drop: {after}");
    assert!(
        after as f64 >= 0.9 * settled as f64,
        "fell to {after} from {settled}"
    );
}

/// The same during a probe: the no-load round trip it measures comes from successes only.
#[test]
fn a_fast_failure_during_a_probe_does_not_become_the_long_rtt() {
    let rtt = Duration::from_millis(50);
    let limit = settled_gradient(rtt);
    let settled = STEADY_MAX;
    // A probe halves the limit (or more) at once; wait for the next one.
    let mut probing = false;
    for _ in 0..2 * 150 * STEADY_MAX {
        if limit.sample(rtt, limit.limit(), Outcome::Success) < settled / 2 {
            probing = true;
            break;
        }
    }
    assert!(probing, "a probe comes every 50 to 150 round trips");
    limit.sample(Duration::from_millis(1), limit.limit(), Outcome::Dropped);
    let (after, _) = steady_successes(&limit, rtt, 100);
    println!(
        "settled at {settled}, lowest over 100 round trips after a 1 ms drop in a probe: {after}"
    );
    assert!(
        after as f64 >= 0.9 * settled as f64,
        "fell to {after} from {settled}"
    );
}

#[test]
fn aimd_grows_only_while_used_and_backs_off_on_drops() {
    let limit = AdaptiveLimit::new(
        "aimd",
        AdaptiveConfig::Aimd(AimdConfig {
            initial_limit: 10,
            min_limit: 4,
            max_limit: 12,
            ..AimdConfig::default()
        }),
    )
    .unwrap();
    let rtt = Duration::from_millis(5);
    assert_eq!(
        limit.sample(rtt, 2, Outcome::Success),
        10,
        "idle: no growth"
    );
    assert_eq!(limit.sample(rtt, 10, Outcome::Success), 11);
    assert_eq!(limit.sample(rtt, 11, Outcome::Success), 12);
    assert_eq!(limit.sample(rtt, 12, Outcome::Success), 12, "capped at max");
    assert_eq!(limit.sample(rtt, 12, Outcome::Ignored), 12);
    assert_eq!(limit.sample(rtt, 12, Outcome::Dropped), 10);
    for _ in 0..20 {
        limit.sample(rtt, 12, Outcome::Dropped);
    }
    assert_eq!(limit.limit(), 4, "floored at min");
}

#[test]
fn invalid_adaptive_configuration_is_a_typed_error() {
    let bad = |config| AdaptiveLimit::new("bad", config).unwrap_err().field();
    assert_eq!(
        bad(AdaptiveConfig::Aimd(AimdConfig {
            min_limit: 0,
            ..AimdConfig::default()
        })),
        "min_limit"
    );
    assert_eq!(
        bad(AdaptiveConfig::Aimd(AimdConfig {
            backoff_ratio: 1.5,
            ..AimdConfig::default()
        })),
        "backoff_ratio"
    );
    assert_eq!(
        bad(AdaptiveConfig::Gradient(GradientConfig {
            initial_limit: 5_000,
            ..GradientConfig::default()
        })),
        "initial_limit"
    );
    assert_eq!(
        bad(AdaptiveConfig::Gradient(GradientConfig {
            rtt_tolerance: f64::NAN,
            ..GradientConfig::default()
        })),
        "rtt_tolerance"
    );
}
