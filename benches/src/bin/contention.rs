//! The hot primitives on every core, each next to its peer: an L1 cache hit next to a raw moka
//! read, a keyed rate check next to governor's, and a shard lookup, each on one thread and on
//! all cores, printed as throughput. Keys come from a counter of each thread's own, so that the
//! only shared writes are the primitives' own.
//!
//! Run with: `cargo run --release -p headroom-benches --bin contention`

use std::cell::Cell;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::{Quota as GovernorQuota, RateLimiter};
use headroom_limit::rate::{KeyedLimiter, Quota};

use headroom_benches::{cores, runtime, throughput};
use headroom_cache::Cache;
use headroom_core::Namespace;
use headroom_core::memory::MemoryKvStore;
use headroom_shard::{JumpRouter, Router};

const RUN_FOR: Duration = Duration::from_secs(2);
const KEYS: u64 = 1024;
/// A quota no run can exhaust, so that every check is admitted on both sides.
const PER_SECOND: u32 = 1_000_000_000;

/// The next of 1024 keys, from a counter of this thread's own (each thread starts elsewhere).
fn next_key() -> u64 {
    static THREADS: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static NEXT: Cell<u64> = const { Cell::new(u64::MAX) };
    }
    NEXT.with(|next| {
        let key = match next.get() {
            u64::MAX => THREADS.fetch_add(1, Ordering::Relaxed).wrapping_mul(337),
            key => key,
        };
        next.set(key.wrapping_add(1));
        key % KEYS
    })
}

fn main() {
    let rt = runtime();
    let cache: Arc<Cache<u64, u64>> = Arc::new(rt.block_on(async {
        let cache = Cache::builder()
            .name("contention")
            .ttl(Duration::from_secs(3_600))
            .l2(
                MemoryKvStore::new(),
                Namespace::new("contention").expect("namespace"),
            )
            .build()
            .expect("cache");
        for k in 0..KEYS {
            cache.insert(k, k).await.expect("fill");
        }
        cache
    }));
    let moka: moka::sync::Cache<u64, u64> = moka::sync::Cache::builder()
        .max_capacity(10_000)
        .time_to_live(Duration::from_secs(3_600))
        .build();
    for k in 0..KEYS {
        moka.insert(k, k);
    }
    let keyed: Arc<KeyedLimiter<u64>> =
        Arc::new(KeyedLimiter::builder(Quota::per_second(PER_SECOND).expect("quota")).build());
    let governor = Arc::new(RateLimiter::keyed(GovernorQuota::per_second(
        NonZeroU32::new(PER_SECOND).expect("non-zero"),
    )));
    for k in 0..KEYS {
        let _ = keyed.check_key(&k);
        let _ = governor.check_key(&k);
    }
    let router = Arc::new(JumpRouter::new(1000).expect("router"));
    let keys: Arc<Vec<String>> =
        Arc::new((0..1024).map(|i| format!("tenant:{i}:orders")).collect());

    println!("| primitive | threads | M ops/s |");
    println!("|---|---|---|");
    for threads in [1, cores()] {
        let c = Arc::clone(&cache);
        let l1 = throughput(threads, RUN_FOR, move || {
            futures_util::FutureExt::now_or_never(c.get(&next_key())).is_some_and(|hit| hit.is_ok())
        });
        let m = moka.clone();
        let raw = throughput(threads, RUN_FOR, move || m.get(&next_key()).is_some());
        let l = Arc::clone(&keyed);
        let rate = throughput(threads, RUN_FOR, move || l.check_key(&next_key()).is_ok());
        let g = Arc::clone(&governor);
        let rate_peer = throughput(threads, RUN_FOR, move || g.check_key(&next_key()).is_ok());
        let (r, k) = (Arc::clone(&router), Arc::clone(&keys));
        let route = throughput(threads, RUN_FOR, move || {
            black_box(r.route_bytes(k[next_key() as usize].as_bytes()));
            true
        });
        println!("| cache L1 hit | {threads} | {:.2} |", l1 / 1e6);
        println!("| raw moka sync get | {threads} | {:.2} |", raw / 1e6);
        println!("| keyed rate check | {threads} | {:.2} |", rate / 1e6);
        println!(
            "| governor check_key | {threads} | {:.2} |",
            rate_peer / 1e6
        );
        println!(
            "| jump route, 1000 shards | {threads} | {:.2} |",
            route / 1e6
        );
    }
}
