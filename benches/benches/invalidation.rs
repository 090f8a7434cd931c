//! Invalidation propagation between two cache instances on loopback Redis (a `redis-server`
//! started by the testkit), each with its own connections: the time from the start of
//! `insert` on A until B serves the new value (A's L2 write, the message, B's L1 drop and
//! B's L2 read), beside the floor under it, one raw message over the same bus (`RedisBus`
//! publish on A, received on B's subscription). Prints p50, p99 and max of each.
//!
//! Run with: `cargo bench -p headroom-benches --bench invalidation`

use std::time::{Duration, Instant};

use bytes::Bytes;
use headroom_cache::{Cache, InvalidationConfig};
use headroom_core::Namespace;
use headroom_core::bus::{BusEvent, InvalidationBus};
use headroom_redis::{Redis, RedisBus, RedisConfig, RedisKvStore};
use headroom_testkit::RedisServer;

const SAMPLES: usize = 2_000;

async fn instance(server: &RedisServer, ns: &Namespace) -> (Cache<u64, u64>, RedisBus) {
    let redis = Redis::connect(RedisConfig::standalone(server.url()))
        .await
        .expect("connect");
    let bus = RedisBus::connect(redis.clone()).await.expect("bus");
    let cache = Cache::builder()
        .ttl(Duration::from_secs(3_600))
        .l2(RedisKvStore::new(redis), ns.clone())
        .invalidation(bus.clone(), InvalidationConfig::default())
        .build()
        .expect("cache");
    (cache, bus)
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    println!(
        "{name:<40} p50 {:>9.1?}  p99 {:>9.1?}  max {:>9.1?}  ({} samples)",
        at(0.50),
        at(0.99),
        samples[samples.len() - 1],
        samples.len()
    );
}

fn main() {
    let server = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let ns = Namespace::new("bench:invalidation").expect("namespace");
        let (a, a_bus) = instance(&server, &ns).await;
        let (b, b_bus) = instance(&server, &ns).await;
        while !(a.l1_in_use() && b.l1_in_use()) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }

        let mut samples = Vec::with_capacity(SAMPLES);
        a.insert(0, 0).await.expect("insert");
        for version in 1..=SAMPLES as u64 {
            // B holds the previous version in L1.
            while b.get(&0).await.expect("get") != Some(version - 1) {
                tokio::task::yield_now().await;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
            let started = Instant::now();
            a.insert(0, version).await.expect("insert");
            while b.get(&0).await.expect("get") != Some(version) {
                // This loop runs on the main thread, outside the runtime's workers: give the
                // core away between reads, or polling would starve the tasks it waits for.
                std::thread::yield_now();
            }
            samples.push(started.elapsed());
        }
        report("cache insert on A -> served by B", samples);

        let channel = ns.key("bench-floor").expect("channel");
        let mut subscription = b_bus.subscribe(&channel).await.expect("subscribe");
        while subscription.next_event().await != Some(BusEvent::Live) {}
        let mut samples = Vec::with_capacity(SAMPLES);
        for i in 0..SAMPLES {
            let message = Bytes::from(i.to_le_bytes().to_vec());
            let started = Instant::now();
            a_bus
                .publish(&channel, message.clone())
                .await
                .expect("publish");
            loop {
                match subscription.next_event().await {
                    Some(BusEvent::Message(received)) if received == message => break,
                    Some(_) => {}
                    None => panic!("bus closed"),
                }
            }
            samples.push(started.elapsed());
        }
        report("floor: RedisBus publish -> received", samples);
    });
}
