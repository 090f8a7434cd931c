//! A chaos layer's cost per request: a ready service alone, and wrapped in a `ChaosLayer`
//! whose experiment is off, and on at rate 0 (every call drawn, none injected).
//!
//! Run with: `cargo bench -p headroom-benches --bench chaos`

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use headroom_benches::{echo, ready_call};
use headroom_chaos::{Chaos, ChaosLayer, Experiment, ExperimentConfig};
use tower::Layer;

fn chaos_layer(c: &mut Criterion) {
    let mut group = c.benchmark_group("chaos_layer");
    let mut bare = echo();
    group.bench_function(BenchmarkId::new("bare", "ready+call"), |b| {
        b.iter(|| ready_call(&mut bare))
    });
    let off = Experiment::builder("bench-off")
        .build()
        .expect("experiment");
    let mut service = ChaosLayer::new(Chaos::new(off).outcome(|| 0)).layer(echo());
    group.bench_function(BenchmarkId::new("headroom_chaos", "off"), |b| {
        b.iter(|| ready_call(&mut service))
    });
    let drawing = Experiment::builder("bench-rate-0")
        .build()
        .expect("experiment");
    drawing
        .start(ExperimentConfig::new(ExperimentConfig::LONGEST).outcome(0.0))
        .expect("started");
    let mut service = ChaosLayer::new(Chaos::new(drawing).outcome(|| 0)).layer(echo());
    group.bench_function(BenchmarkId::new("headroom_chaos", "on, rate 0"), |b| {
        b.iter(|| ready_call(&mut service))
    });
    group.finish();
}

criterion_group!(benches, chaos_layer);
criterion_main!(benches);
