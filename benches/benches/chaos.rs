//! A chaos layer's cost per request: a ready service alone, and wrapped in a `ChaosLayer`
//! whose experiment is off, and on at rate 0 (every call drawn, none injected).
//!
//! Run with: `cargo bench -p headroom-benches --bench chaos`

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use headroom_chaos::{Chaos, ChaosLayer, Experiment, ExperimentConfig};
use tower::{Layer, Service, ServiceExt, service_fn};

fn echo()
-> impl Service<u64, Response = u64, Error = Infallible, Future = Ready<Result<u64, Infallible>>> + Clone
{
    service_fn(|n: u64| ready(Ok::<_, Infallible>(n)))
}

/// One ready+call of `service`, completed at once.
fn call<S>(service: &mut S)
where
    S: Service<u64, Response = u64, Error = Infallible>,
{
    let ready = service.ready().now_or_never().expect("ready").expect("ok");
    black_box(
        ready
            .call(black_box(7))
            .now_or_never()
            .expect("done")
            .expect("ok"),
    );
}

fn chaos_layer(c: &mut Criterion) {
    let mut group = c.benchmark_group("chaos_layer");
    let mut bare = echo();
    group.bench_function(BenchmarkId::new("bare", "ready+call"), |b| {
        b.iter(|| call(&mut bare))
    });
    let off = Experiment::builder("bench-off")
        .build()
        .expect("experiment");
    let mut service = ChaosLayer::new(Chaos::new(off).outcome(|| 0)).layer(echo());
    group.bench_function(BenchmarkId::new("headroom_chaos", "off"), |b| {
        b.iter(|| call(&mut service))
    });
    let drawing = Experiment::builder("bench-rate-0")
        .build()
        .expect("experiment");
    drawing
        .start(ExperimentConfig::new(ExperimentConfig::LONGEST).outcome(0.0))
        .expect("started");
    let mut service = ChaosLayer::new(Chaos::new(drawing).outcome(|| 0)).layer(echo());
    group.bench_function(BenchmarkId::new("headroom_chaos", "on, rate 0"), |b| {
        b.iter(|| call(&mut service))
    });
    group.finish();
}

criterion_group!(benches, chaos_layer);
criterion_main!(benches);
