//! Shard routing: jump hash against the paper's reference, the ring against the `hashring`
//! crate, and every router side by side at 10, 100 and 1000 shards.
//!
//! Run with: `cargo bench -p headroom-benches --bench shard`

use std::hint::black_box;

use criterion::{Bencher, BenchmarkId, Criterion, criterion_group, criterion_main};
use headroom_shard::hash::key_hash;
use headroom_shard::{JumpRouter, MaglevRouter, RendezvousRouter, RingRouter, Router};

const SIZES: [u32; 3] = [10, 100, 1000];

/// Jump consistent hash exactly as printed in the paper (Lamping and Veach, figure 1).
fn reference_jump(mut key: u64, num_buckets: i32) -> i32 {
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < i64::from(num_buckets) {
        b = j;
        key = key.wrapping_mul(2862933555777941757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1i64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as i32
}

/// A virtual node for `hashring`, which leaves virtual nodes to its user.
#[derive(Clone, Copy, Hash, PartialEq, Eq)]
struct VNode {
    node: u32,
    replica: u32,
}

fn keys() -> Vec<String> {
    (0..1024).map(|i| format!("user:{i}:profile")).collect()
}

/// Routes the precomputed hashes in turn, the same loop for headroom and the reference.
fn route_hashes(b: &mut Bencher<'_>, hashes: &[u64], route: impl Fn(u64) -> u32) {
    let mut i = 0;
    b.iter(|| {
        i = (i + 1) & 1023;
        route(black_box(hashes[i]))
    })
}

fn jump(c: &mut Criterion) {
    let hashes: Vec<u64> = keys().iter().map(|k| key_hash(k.as_bytes())).collect();
    let mut group = c.benchmark_group("shard/jump");
    for n in SIZES {
        let router = JumpRouter::new(n).unwrap();
        group.bench_with_input(BenchmarkId::new("headroom", n), &n, |b, _| {
            route_hashes(b, &hashes, |hash| router.route_hash(hash).0)
        });
        group.bench_with_input(BenchmarkId::new("reference", n), &n, |b, &n| {
            route_hashes(b, &hashes, |hash| reference_jump(hash, n as i32) as u32)
        });
    }
    group.finish();
}

fn ring(c: &mut Criterion) {
    let keys = keys();
    let mut group = c.benchmark_group("shard/ring_160");
    for n in SIZES {
        let router = RingRouter::new(n, 160).unwrap();
        let mut peer = hashring::HashRing::new();
        peer.batch_add(
            (0..n)
                .flat_map(|node| (0..160).map(move |replica| VNode { node, replica }))
                .collect(),
        );
        group.bench_with_input(BenchmarkId::new("headroom", n), &n, |b, _| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & 1023;
                router.route(black_box(keys[i].as_str()))
            })
        });
        group.bench_with_input(BenchmarkId::new("hashring", n), &n, |b, _| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & 1023;
                peer.get(black_box(&keys[i].as_str())).map(|v| v.node)
            })
        });
    }
    group.finish();
}

fn routers(c: &mut Criterion) {
    let keys = keys();
    let mut group = c.benchmark_group("shard/route");
    for n in SIZES {
        let routers: [(&str, Box<dyn Router>); 4] = [
            ("jump", Box::new(JumpRouter::new(n).unwrap())),
            ("ring_160", Box::new(RingRouter::new(n, 160).unwrap())),
            (
                "maglev",
                Box::new(MaglevRouter::new(n, MaglevRouter::DEFAULT_TABLE_SIZE).unwrap()),
            ),
            ("rendezvous", Box::new(RendezvousRouter::new(n).unwrap())),
        ];
        for (name, router) in &routers {
            group.bench_with_input(BenchmarkId::new(*name, n), &n, |b, _| {
                let mut i = 0;
                b.iter(|| {
                    i = (i + 1) & 1023;
                    router.route_bytes(black_box(keys[i].as_bytes()))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, jump, ring, routers);
criterion_main!(benches);
