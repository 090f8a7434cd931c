//! Admission control against its peers: the bulkhead and the keyed bulkhead against
//! `tokio::sync::Semaphore`, and the bulkhead layer against `tower::limit::ConcurrencyLimit`,
//! uncontended.
//!
//! Run with: `cargo bench -p headroom-benches --bench limit`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use headroom_benches::echo;
use headroom_limit::tower::BulkheadLayer;
use headroom_limit::{Bulkhead, KeyedBulkhead};
use tokio::sync::Semaphore;
use tower::limit::ConcurrencyLimitLayer;
use tower::{Layer, Service, ServiceExt};

const LIMIT: usize = 64;

fn acquire_release(c: &mut Criterion) {
    let semaphore = Semaphore::new(LIMIT);
    let bulkhead = Bulkhead::builder("bench")
        .max_concurrent(LIMIT)
        .build()
        .expect("bulkhead");
    let mut group = c.benchmark_group("bulkhead_acquire_release");
    group.bench_function(BenchmarkId::new("tokio_semaphore", "try_acquire"), |b| {
        b.iter(|| drop(black_box(semaphore.try_acquire().expect("free"))))
    });
    group.bench_function(BenchmarkId::new("headroom_bulkhead", "try_acquire"), |b| {
        b.iter(|| drop(black_box(bulkhead.try_acquire().expect("free"))))
    });
    group.bench_function(BenchmarkId::new("tokio_semaphore", "acquire"), |b| {
        b.iter(|| {
            let permit = semaphore.acquire().now_or_never().expect("ready");
            drop(black_box(permit.expect("open")))
        })
    });
    group.bench_function(BenchmarkId::new("headroom_bulkhead", "acquire"), |b| {
        b.iter(|| {
            let permit = bulkhead.acquire().now_or_never().expect("ready");
            drop(black_box(permit.expect("free")))
        })
    });
    group.finish();
}

/// The keyed bulkhead's uncontended path: one lock, the tenant's hash looked up, and its
/// state made and dropped again when it was idle.
fn keyed_acquire_release(c: &mut Criterion) {
    let semaphore = Semaphore::new(LIMIT);
    let keyed = KeyedBulkhead::builder("bench")
        .max_concurrent(LIMIT)
        .build()
        .expect("keyed bulkhead");
    let tenant = "tenant-42";
    let mut group = c.benchmark_group("keyed_bulkhead_acquire_release");
    group.bench_function(BenchmarkId::new("tokio_semaphore", "try_acquire"), |b| {
        b.iter(|| drop(black_box(semaphore.try_acquire().expect("free"))))
    });
    group.bench_function(
        BenchmarkId::new("headroom_keyed_bulkhead", "try_acquire/idle_tenant"),
        |b| {
            b.iter(|| {
                drop(black_box(
                    keyed.try_acquire(black_box(tenant)).expect("free"),
                ))
            })
        },
    );
    {
        // Another permit of the same tenant is held: its state already exists.
        let _held = keyed.try_acquire(tenant).expect("free");
        group.bench_function(
            BenchmarkId::new("headroom_keyed_bulkhead", "try_acquire/active_tenant"),
            |b| {
                b.iter(|| {
                    drop(black_box(
                        keyed.try_acquire(black_box(tenant)).expect("free"),
                    ))
                })
            },
        );
    }
    group.bench_function(BenchmarkId::new("tokio_semaphore", "acquire"), |b| {
        b.iter(|| {
            let permit = semaphore.acquire().now_or_never().expect("ready");
            drop(black_box(permit.expect("open")))
        })
    });
    group.bench_function(
        BenchmarkId::new("headroom_keyed_bulkhead", "acquire/idle_tenant"),
        |b| {
            b.iter(|| {
                let permit = keyed
                    .acquire(black_box(tenant))
                    .now_or_never()
                    .expect("ready");
                drop(black_box(permit.expect("free")))
            })
        },
    );
    group.finish();
}

fn layer(c: &mut Criterion) {
    let mut group = c.benchmark_group("bulkhead_layer");
    let mut tower_limit = ConcurrencyLimitLayer::new(LIMIT).layer(echo());
    group.bench_function(
        BenchmarkId::new("tower_concurrency_limit", "ready+call"),
        |b| {
            b.iter(|| {
                let service = tower_limit
                    .ready()
                    .now_or_never()
                    .expect("ready")
                    .expect("ok");
                black_box(
                    service
                        .call(black_box(7))
                        .now_or_never()
                        .expect("done")
                        .expect("ok"),
                )
            })
        },
    );
    let bulkhead = Bulkhead::builder("bench")
        .max_concurrent(LIMIT)
        .build()
        .expect("bulkhead");
    let mut headroom = BulkheadLayer::new(bulkhead).layer(echo());
    group.bench_function(
        BenchmarkId::new("headroom_bulkhead_layer", "ready+call"),
        |b| {
            b.iter(|| {
                let service = headroom.ready().now_or_never().expect("ready").expect("ok");
                black_box(
                    service
                        .call(black_box(7))
                        .now_or_never()
                        .expect("done")
                        .expect("ok"),
                )
            })
        },
    );
    group.finish();
}

criterion_group!(benches, acquire_release, keyed_acquire_release, layer);
criterion_main!(benches);
