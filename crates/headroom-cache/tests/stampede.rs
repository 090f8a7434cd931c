//! Stampede protection with callers spread over the worker threads of a multi-thread runtime,
//! where callers reach the key before, during and after its load in every interleaving.

mod common;

use headroom_core::memory::MemoryKvStore;
use headroom_testkit::unique_namespace;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stampede_on_a_multi_thread_runtime() {
    // Each round is a fresh cache and key: the interleaving differs from round to round.
    for _ in 0..20 {
        common::stampede_runs_one_load_and_survives_cancellation(
            MemoryKvStore::new(),
            unique_namespace("stampede-mt"),
        )
        .await;
    }
}
