//! A retry storm under tokio's paused time: a dependency fails for ten seconds under steady
//! load. Run with `--nocapture` to see the figures recorded in docs/breaker.md.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use headroom_breaker::{CircuitBreaker, ErrorKind, Pipeline, Retry, RetryBudget, State};
use headroom_core::Classify;
use tokio::time::Instant;

#[derive(Debug)]
struct Unavailable;

impl Classify for Unavailable {
    fn is_timeout(&self) -> bool {
        false
    }

    fn is_retryable(&self) -> bool {
        true
    }
}

const REQUESTS: u64 = 1_500;
const EVERY: Duration = Duration::from_millis(20);
const OUTAGE_START: Duration = Duration::from_secs(5);
const OUTAGE_END: Duration = Duration::from_secs(15);
const RECOVERED_AFTER: Duration = Duration::from_secs(20);

#[derive(Debug, Default)]
struct Storm {
    calls: u64,
    failed: u64,
    budget_exhausted: u64,
    failed_after_recovery: u64,
}

impl Storm {
    fn amplification(&self) -> f64 {
        self.calls as f64 / REQUESTS as f64
    }
}

/// 50 requests a second for 30 s; every call takes 5 ms and fails during the outage.
async fn storm(pipeline: Pipeline<Unavailable>) -> Storm {
    let start = Instant::now();
    let calls = Arc::new(AtomicU64::new(0));
    let mut requests = Vec::new();
    for _ in 0..REQUESTS {
        let pipeline = pipeline.clone();
        let calls = calls.clone();
        requests.push(tokio::spawn(async move {
            let sent = start.elapsed();
            let result = pipeline
                .call(|| {
                    calls.fetch_add(1, Ordering::Relaxed);
                    async move {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        let now = start.elapsed();
                        if (OUTAGE_START..OUTAGE_END).contains(&now) {
                            Err(Unavailable)
                        } else {
                            Ok(())
                        }
                    }
                })
                .await;
            (sent, result.err().map(|error| error.kind()))
        }));
        tokio::time::sleep(EVERY).await;
    }
    let mut storm = Storm::default();
    for request in requests {
        let (sent, error) = request.await.expect("request task");
        if let Some(kind) = error {
            storm.failed += 1;
            storm.budget_exhausted += u64::from(kind == ErrorKind::BudgetExhausted);
            storm.failed_after_recovery += u64::from(sent >= RECOVERED_AFTER);
        }
    }
    storm.calls = calls.load(Ordering::Relaxed);
    storm
}

fn retry(budget: Option<RetryBudget>) -> Retry<Unavailable> {
    let mut retry = Retry::builder()
        .max_attempts(4)
        .base_delay(Duration::from_millis(10))
        .max_delay(Duration::from_millis(200));
    if let Some(budget) = budget {
        retry = retry.budget(budget);
    }
    retry.build().expect("retry")
}

fn budget() -> RetryBudget {
    RetryBudget::builder()
        .ratio(0.1)
        .min_per_second(1)
        .window(Duration::from_secs(10))
        .build()
        .expect("budget")
}

#[tokio::test(start_paused = true)]
async fn without_a_budget_retries_multiply_the_load() {
    let storm = storm(Pipeline::builder().retry(retry(None)).build()).await;
    println!(
        "no budget: {storm:?}, {:.2}x calls per request",
        storm.amplification()
    );
    assert!(storm.amplification() > 1.8, "{storm:?}");
}

#[tokio::test(start_paused = true)]
async fn a_retry_budget_keeps_calls_within_bounds_and_recovery_follows() {
    let storm = storm(Pipeline::builder().retry(retry(Some(budget()))).build()).await;
    println!(
        "budget 0.1: {storm:?}, {:.2}x calls per request",
        storm.amplification()
    );
    assert!(storm.amplification() <= 1.2, "{storm:?}");
    assert!(
        storm.budget_exhausted > 0,
        "the budget refused retries: {storm:?}"
    );
    assert_eq!(storm.failed_after_recovery, 0, "{storm:?}");
}

#[tokio::test(start_paused = true)]
async fn a_breaker_and_a_budget_shed_the_outage_and_close_again() {
    let breaker = CircuitBreaker::builder()
        .time_window(Duration::from_secs(5), 5)
        .minimum_calls(20)
        .failure_ratio(0.5)
        .open_duration(Duration::from_secs(1))
        .max_open_duration(Duration::from_secs(2))
        .half_open_probes(3)
        .build()
        .expect("breaker");
    let mut events = breaker.subscribe();
    let pipeline = Pipeline::builder()
        .retry(retry(Some(budget())))
        .breaker(breaker.clone())
        .build();
    let storm = storm(pipeline).await;
    let opened = std::iter::from_fn(|| events.try_recv().ok())
        .filter(|transition| transition.to == State::Open)
        .count();
    println!(
        "budget 0.1 + breaker: {storm:?}, {:.2}x calls per request, opened {opened} times",
        storm.amplification()
    );
    assert!(storm.amplification() <= 1.2, "{storm:?}");
    assert!(opened >= 1);
    assert!(
        storm.calls < REQUESTS * 9 / 10,
        "the open circuit spared the dependency: {storm:?}"
    );
    assert_eq!(breaker.state(), State::Closed);
    assert_eq!(storm.failed_after_recovery, 0, "{storm:?}");
}
