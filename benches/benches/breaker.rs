//! The overhead of the failure-handling strategies on the success path, next to a bare call
//! in the same run.
//!
//! Run with:
//! `cargo bench -p headroom-benches --bench breaker -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use headroom_breaker::{CircuitBreaker, Hedge, Pipeline, Retry, RetryBudget};
use headroom_core::BackendError;

async fn op() -> Result<u64, BackendError> {
    Ok(black_box(1))
}

fn breaker(time_window: bool) -> CircuitBreaker<BackendError> {
    let builder = CircuitBreaker::builder();
    let builder = if time_window {
        builder.time_window(Duration::from_secs(10), 10)
    } else {
        builder.count_window(100)
    };
    builder.build().expect("breaker")
}

fn closed_breaker(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("breaker_closed_call");
    group.bench_function(BenchmarkId::new("bare", "async"), |b| {
        b.to_async(&runtime)
            .iter(|| async { op().await.expect("ok") })
    });
    for (window, timed) in [("count_window", false), ("time_window", true)] {
        let breaker = breaker(timed);
        group.bench_function(BenchmarkId::new("call", window), |b| {
            b.to_async(&runtime)
                .iter(|| async { breaker.call(op()).await.expect("ok") })
        });
        group.bench_function(BenchmarkId::new("permit", window), |b| {
            b.iter(|| breaker.try_acquire().expect("closed").success())
        });
    }
    group.finish();
}

fn pipeline(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let budget = RetryBudget::builder().build().expect("budget");
    let pipeline = Pipeline::builder()
        .retry(
            Retry::builder()
                .budget(budget.clone())
                .build()
                .expect("retry"),
        )
        .breaker(breaker(true))
        .timeout(Duration::from_secs(1))
        .hedge(
            Hedge::builder()
                .delay(Duration::from_millis(100))
                .budget(budget)
                .build()
                .expect("hedge"),
        )
        .build();
    let mut group = c.benchmark_group("breaker_pipeline");
    group.bench_function(BenchmarkId::new("bare", "async"), |b| {
        b.to_async(&runtime)
            .iter(|| async { op().await.expect("ok") })
    });
    group.bench_function(
        BenchmarkId::new("pipeline", "retry+breaker+timeout+hedge"),
        |b| {
            b.to_async(&runtime)
                .iter(|| async { pipeline.call(op).await.expect("ok") })
        },
    );
    group.finish();
}

criterion_group!(benches, closed_breaker, pipeline);
criterion_main!(benches);
