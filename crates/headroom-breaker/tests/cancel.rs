//! Timeouts and hedging cancel the work they abandon; hedging cuts a long tail within its
//! budget (the latency figures in docs/breaker.md are asserted here).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use headroom_breaker::{CircuitBreaker, ErrorKind, Hedge, Pipeline, RetryBudget, Timeout};
use headroom_core::ManualClock;
use tokio::time::Instant;

/// Counts drops and completions of the work it is part of.
#[derive(Clone, Default)]
struct Tally {
    dropped: Arc<AtomicU64>,
    finished: Arc<AtomicU64>,
}

struct Guard {
    tally: Tally,
    finished: bool,
}

impl Tally {
    fn guard(&self) -> Guard {
        Guard {
            tally: self.clone(),
            finished: false,
        }
    }

    fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::SeqCst)
    }

    fn finished(&self) -> u64 {
        self.finished.load(Ordering::SeqCst)
    }
}

impl Guard {
    fn finish(mut self) {
        self.finished = true;
        self.tally.finished.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.finished {
            self.tally.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn work(tally: &Tally, takes: Duration) -> Result<Duration, std::io::Error> {
    let guard = tally.guard();
    tokio::time::sleep(takes).await;
    guard.finish();
    Ok(takes)
}

#[tokio::test(start_paused = true)]
async fn a_timeout_drops_the_work_it_gives_up_on() {
    let tally = Tally::default();
    let timeout = Timeout::new(Duration::from_millis(100));
    let start = Instant::now();
    let result = timeout.call(work(&tally, Duration::from_secs(10))).await;
    assert_eq!(result.unwrap_err().after(), Duration::from_millis(100));
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    assert_eq!(
        tally.dropped(),
        1,
        "the work was cancelled when the timeout fired"
    );
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(tally.finished(), 0, "and never finished in the background");
}

#[tokio::test]
async fn a_timeout_on_a_manual_clock_fires_only_when_the_clock_moves() {
    let manual = ManualClock::new();
    let tally = Tally::default();
    let timeout = Timeout::new(Duration::from_secs(1)).with_clock(manual.clock());
    let guarded = tally.clone();
    let call = tokio::spawn(async move {
        timeout
            .call(async move {
                let _guard = guarded.guard();
                std::future::pending::<()>().await;
            })
            .await
    });
    tokio::task::yield_now().await;
    assert!(!call.is_finished());
    manual.advance(Duration::from_secs(1));
    let result = call.await.expect("task");
    assert!(result.is_err());
    assert_eq!(tally.dropped(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_pipeline_timeout_cancels_every_hedged_call_and_counts_as_a_breaker_failure() {
    let tally = Tally::default();
    let breaker = CircuitBreaker::builder()
        .count_window(2)
        .minimum_calls(2)
        .build()
        .expect("breaker");
    let pipeline = Pipeline::builder()
        .breaker(breaker.clone())
        .timeout(Duration::from_millis(300))
        .hedge(
            Hedge::builder()
                .delay(Duration::from_millis(100))
                .max_hedges(2)
                .build()
                .expect("hedge"),
        )
        .build();
    for _ in 0..2 {
        let error = pipeline
            .call(|| work(&tally, Duration::from_secs(10)))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Elapsed);
    }
    assert_eq!(
        tally.dropped(),
        6,
        "a primary and two hedges per request, all dropped"
    );
    assert_eq!(breaker.state(), headroom_breaker::State::Open);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_pipeline_call_cancels_its_work() {
    let tally = Tally::default();
    let pipeline = Pipeline::builder()
        .hedge(
            Hedge::builder()
                .delay(Duration::from_millis(10))
                .build()
                .expect("hedge"),
        )
        .build();
    let call = pipeline.call(|| work(&tally, Duration::from_secs(10)));
    let abandoned = tokio::time::timeout(Duration::from_millis(50), call).await;
    assert!(abandoned.is_err());
    assert_eq!(tally.dropped(), 2, "the primary and its hedge");
}

#[tokio::test(start_paused = true)]
async fn the_first_success_wins_and_the_slower_calls_are_cancelled() {
    let tally = Tally::default();
    let hedge = Hedge::builder()
        .delay(Duration::from_millis(50))
        .build()
        .expect("hedge");
    let calls = AtomicU64::new(0);
    let start = Instant::now();
    let took = hedge
        .call(|| {
            let slow = calls.fetch_add(1, Ordering::SeqCst) == 0;
            work(&tally, Duration::from_millis(if slow { 1_000 } else { 20 }))
        })
        .await
        .expect("hedged");
    assert_eq!(took, Duration::from_millis(20));
    assert_eq!(start.elapsed(), Duration::from_millis(70));
    assert_eq!((tally.finished(), tally.dropped()), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_failing_primary_leaves_the_hedge_to_answer() {
    let hedge = Hedge::builder()
        .delay(Duration::from_millis(10))
        .build()
        .expect("hedge");
    let calls = AtomicU64::new(0);
    let answer = hedge
        .call(|| {
            let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    Err("primary failed")
                } else {
                    tokio::time::sleep(Duration::from_millis(40)).await;
                    Ok("hedge")
                }
            }
        })
        .await;
    assert_eq!(answer, Ok("hedge"));
    let quick_failure = hedge.call(|| async { Err::<(), _>("fails fast") }).await;
    assert_eq!(
        quick_failure,
        Err("fails fast"),
        "no hedge for an attempt that already failed"
    );
}

fn percentile(latencies: &mut [Duration], p: f64) -> Duration {
    latencies.sort();
    latencies[((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1)]
}

/// 1 000 sequential requests; every 50th call of the dependency takes 1 s, the others 10 ms.
async fn tail(hedge: Option<Hedge>) -> (Duration, Duration, u64) {
    let calls = AtomicU64::new(0);
    let tally = Tally::default();
    let mut pipeline = Pipeline::builder();
    if let Some(hedge) = hedge {
        pipeline = pipeline.hedge(hedge);
    }
    let pipeline = pipeline.build();
    let mut latencies = Vec::new();
    for _ in 0..1_000 {
        let start = Instant::now();
        pipeline
            .call(|| {
                let slow = calls.fetch_add(1, Ordering::SeqCst) % 50 == 7;
                work(&tally, Duration::from_millis(if slow { 1_000 } else { 10 }))
            })
            .await
            .expect("call");
        latencies.push(start.elapsed());
    }
    let p50 = percentile(&mut latencies, 0.5);
    let p99 = percentile(&mut latencies, 0.99);
    (p50, p99, calls.load(Ordering::SeqCst) - 1_000)
}

#[tokio::test(start_paused = true)]
async fn hedging_cuts_the_long_tail_within_its_budget() {
    // Paused time makes every figure exact; docs/breaker.md quotes these assertions.
    let (p50, p99, extra) = tail(None).await;
    assert_eq!(
        (p50, p99, extra),
        (Duration::from_millis(10), Duration::from_secs(1), 0),
        "without hedging, the 2 % of slow calls are the p99"
    );

    let budget = RetryBudget::builder()
        .ratio(0.05)
        .min_per_second(0)
        .build()
        .expect("budget");
    let hedge = Hedge::builder()
        .delay(Duration::from_millis(50))
        .percentile(0.95)
        .budget(budget)
        .build()
        .expect("hedge");
    let (p50, p99, hedges) = tail(Some(hedge.clone())).await;
    assert_eq!(
        hedge.delay(),
        Duration::from_micros(10_240),
        "the learned p95"
    );
    assert_eq!(p50, Duration::from_millis(10));
    assert_eq!(
        p99,
        Duration::from_millis(21),
        "a slow call is answered by its hedge: the learned delay plus one fast call"
    );
    assert_eq!(
        hedges, 20,
        "one hedge per slow call, within 5 % of 1000 requests"
    );
}

#[tokio::test(start_paused = true)]
async fn when_everything_is_slow_the_budget_bounds_the_hedges() {
    let budget = RetryBudget::builder()
        .ratio(0.1)
        .min_per_second(0)
        .build()
        .expect("budget");
    let hedge = Hedge::builder()
        .delay(Duration::from_millis(10))
        .budget(budget)
        .build()
        .expect("hedge");
    let tally = Tally::default();
    let calls = AtomicU64::new(0);
    for _ in 0..200 {
        hedge
            .call(|| {
                calls.fetch_add(1, Ordering::SeqCst);
                work(&tally, Duration::from_millis(200))
            })
            .await
            .expect("call");
    }
    let hedges = calls.load(Ordering::SeqCst) - 200;
    assert!(
        (1..=20).contains(&hedges),
        "at most 10% of 200 requests: {hedges}"
    );
}
