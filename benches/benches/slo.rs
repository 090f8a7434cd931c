//! The SLO layer's cost per request: a ready service alone, and wrapped in an `SloLayer` that
//! records into an availability or a latency objective; and one evaluation of an objective.
//!
//! Run with: `cargo bench -p headroom-benches --bench slo`

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use headroom_benches::{echo, ready_call};
use headroom_slo::{Objective, ObjectiveConfig, SloLayer};
use tower::Layer;

fn slo_layer(c: &mut Criterion) {
    let mut group = c.benchmark_group("slo_layer");
    let mut bare = echo();
    group.bench_function(BenchmarkId::new("bare", "ready+call"), |b| {
        b.iter(|| ready_call(&mut bare))
    });
    let availability =
        Objective::new(ObjectiveConfig::availability("bench", 0.999)).expect("objective");
    let mut service = SloLayer::new(availability).layer(echo());
    group.bench_function(BenchmarkId::new("headroom_slo", "availability"), |b| {
        b.iter(|| ready_call(&mut service))
    });
    let latency = Objective::new(ObjectiveConfig::latency(
        "bench-latency",
        Duration::from_millis(300),
        0.99,
    ))
    .expect("objective");
    let mut service = SloLayer::new(latency).layer(echo());
    group.bench_function(BenchmarkId::new("headroom_slo", "latency"), |b| {
        b.iter(|| ready_call(&mut service))
    });
    group.finish();
}

/// One evaluation of an objective with the default alerts, every bucket of every level in use.
fn slo_evaluate(c: &mut Criterion) {
    let time = headroom_core::ManualClock::new();
    let objective = Objective::with_clock(
        ObjectiveConfig::availability("bench-evaluate", 0.999),
        time.clock(),
    )
    .expect("objective");
    // A request every 30 s for 50 days: every level's ring is full.
    for _ in 0..(50 * 24 * 120) {
        objective.record(true);
        time.advance(Duration::from_secs(30));
    }
    c.bench_function("slo_evaluate/full", |b| {
        b.iter(|| black_box(objective.evaluate()))
    });
}

criterion_group!(benches, slo_layer, slo_evaluate);
criterion_main!(benches);
