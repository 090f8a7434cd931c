//! The read-side hot primitives on every core: an L1 cache hit next to a raw moka read, and a
//! shard lookup, each on one thread and on all cores, printed as throughput.
//!
//! Run with: `cargo run --release -p headroom-benches --bin contention`

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use headroom_benches::{cores, runtime, throughput};
use headroom_cache::Cache;
use headroom_core::Namespace;
use headroom_core::memory::MemoryKvStore;
use headroom_shard::{JumpRouter, Router};

const RUN_FOR: Duration = Duration::from_secs(2);

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
        for k in 0..1024 {
            cache.insert(k, k).await.expect("fill");
        }
        cache
    }));
    let moka: moka::sync::Cache<u64, u64> = moka::sync::Cache::builder()
        .max_capacity(10_000)
        .time_to_live(Duration::from_secs(3_600))
        .build();
    for k in 0..1024 {
        moka.insert(k, k);
    }
    let router = Arc::new(JumpRouter::new(1000).expect("router"));
    let keys: Arc<Vec<String>> =
        Arc::new((0..1024).map(|i| format!("tenant:{i}:orders")).collect());

    println!("| primitive | threads | M ops/s |");
    println!("|---|---|---|");
    for threads in [1, cores()] {
        let next = Arc::new(AtomicU64::new(0));
        let (c, n) = (Arc::clone(&cache), Arc::clone(&next));
        let l1 = throughput(threads, RUN_FOR, move || {
            let key = n.fetch_add(1, Ordering::Relaxed) % 1024;
            futures_util::FutureExt::now_or_never(c.get(&key)).is_some_and(|hit| hit.is_ok())
        });
        let (m, n) = (moka.clone(), Arc::clone(&next));
        let raw = throughput(threads, RUN_FOR, move || {
            m.get(&(n.fetch_add(1, Ordering::Relaxed) % 1024)).is_some()
        });
        let (r, k, n) = (Arc::clone(&router), Arc::clone(&keys), Arc::clone(&next));
        let route = throughput(threads, RUN_FOR, move || {
            let key = &k[(n.fetch_add(1, Ordering::Relaxed) % 1024) as usize];
            black_box(r.route_bytes(key.as_bytes()));
            true
        });
        println!("| cache L1 hit | {threads} | {:.2} |", l1 / 1e6);
        println!("| raw moka sync get | {threads} | {:.2} |", raw / 1e6);
        println!(
            "| jump route, 1000 shards | {threads} | {:.2} |",
            route / 1e6
        );
    }
}
