//! Runs the apalis-redis peer of headroom's job worker once on a fresh loopback Redis and prints
//! its throughput: 10,000 jobs drained by one worker with 8 concurrent handlers.
//!
//! Run with: `cargo run --release -p headroom-benches --bin apalis_probe`.

use headroom_benches::apalis_peer::apalis_drain;
use headroom_testkit::RedisServer;

const JOBS: u64 = 10_000;
const CONCURRENCY: usize = 8;

fn main() {
    let server = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let queue = format!("apalis-probe-{}", std::process::id());
    let elapsed = runtime.block_on(apalis_drain(&server.url(), &queue, JOBS, CONCURRENCY));
    println!(
        "apalis-redis 1.0.0: {JOBS} jobs at concurrency {CONCURRENCY} in {:.1} ms: {:.0} jobs/s",
        elapsed.as_secs_f64() * 1e3,
        JOBS as f64 / elapsed.as_secs_f64()
    );
}
