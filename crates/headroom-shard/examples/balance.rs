//! Prints the balance and disruption figures quoted in `docs/sharding.md`.
//!
//! Run with: `cargo run --release -p headroom-shard --example balance`
//!
//! Jump hash's key-space share is measured with 2^28 keys (about 270,000 per shard at 1000
//! shards), enough for sampling noise to fall under the 1.01 bound; this takes a few seconds.

use headroom_shard::hash::mix;
use headroom_shard::{JumpRouter, MaglevRouter, RendezvousRouter, RingRouter, Router};

fn max_over_mean(loads: &[u64]) -> f64 {
    let max = *loads.iter().max().unwrap_or(&0) as f64;
    max / (loads.iter().sum::<u64>() as f64 / loads.len() as f64)
}

fn balance(router: &impl Router, shards: usize, keys: u64) -> f64 {
    let mut loads = vec![0u64; shards];
    for key in 0..keys {
        loads[router.route(&key).index()] += 1;
    }
    max_over_mean(&loads)
}

fn moved(before: &impl Router, after: &impl Router, keys: u64) -> f64 {
    let changed = (0..keys)
        .filter(|key| before.route(key) != after.route(key))
        .count();
    changed as f64 / keys as f64
}

fn main() -> Result<(), headroom_shard::ConfigError> {
    const MILLION: u64 = 1_000_000;
    let jump = JumpRouter::new(1000)?;
    println!(
        "jump, 1000 shards, 1M keys: {:.4}",
        balance(&jump, 1000, MILLION)
    );
    let mut loads = vec![0u64; 1000];
    for i in 0..1u64 << 28 {
        loads[jump.route_hash(mix(i, 0x5eed)).index()] += 1;
    }
    println!(
        "jump, 1000 shards, 2^28 hashes: {:.4}",
        max_over_mean(&loads)
    );

    for table_size in [MaglevRouter::DEFAULT_TABLE_SIZE, 1_000_003] {
        let maglev = MaglevRouter::new(1000, table_size)?;
        let mut share = vec![0u64; 1000];
        for shard in maglev.table() {
            share[shard.index()] += 1;
        }
        println!(
            "maglev, 1000 shards, table {table_size}: share {:.4}, 1M keys {:.4}",
            max_over_mean(&share),
            balance(&maglev, 1000, MILLION)
        );
    }
    for vnodes in [160, 1000] {
        let ring = RingRouter::new(1000, vnodes)?;
        println!(
            "ring, 1000 shards, {vnodes} vnodes, 1M keys: {:.4}",
            balance(&ring, 1000, MILLION)
        );
    }
    let ring = RingRouter::new(100, 160)?;
    println!(
        "ring, 100 shards, 160 vnodes, 1M keys: {:.4}",
        balance(&ring, 100, MILLION)
    );
    let rendezvous = RendezvousRouter::new(100)?;
    println!(
        "rendezvous, 100 shards, 1M keys: {:.4}",
        balance(&rendezvous, 100, MILLION)
    );

    println!(
        "moved, jump 1000->1001: {:.5} (ideal {:.5})",
        moved(&jump, &JumpRouter::new(1001)?, MILLION),
        1.0 / 1001.0
    );
    println!(
        "moved, rendezvous 100->101: {:.5} (ideal {:.5})",
        moved(&rendezvous, &RendezvousRouter::new(101)?, MILLION),
        1.0 / 101.0
    );
    println!(
        "moved, ring 100->101: {:.5} (ideal {:.5})",
        moved(&ring, &RingRouter::new(101, 160)?, MILLION),
        1.0 / 101.0
    );
    for n in [10, 100, 1000] {
        let a = MaglevRouter::new(n, MaglevRouter::DEFAULT_TABLE_SIZE)?;
        let b = MaglevRouter::new(n + 1, MaglevRouter::DEFAULT_TABLE_SIZE)?;
        let changed = a
            .table()
            .iter()
            .zip(b.table())
            .filter(|(x, y)| x != y)
            .count();
        println!(
            "moved, maglev {n}->{}: {:.5} (ideal {:.5})",
            n + 1,
            changed as f64 / a.table().len() as f64,
            1.0 / f64::from(n + 1)
        );
    }
    Ok(())
}
