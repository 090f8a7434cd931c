//! Wall time follows tokio's clock (paused or not) without being pinned to whichever runtime
//! read it first. Alone in its test binary: the wall-time anchor is set once per process.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use headroom_core::Clock;

fn paused() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

fn real_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap()
}

/// A paused runtime that ran an hour ahead reads the wall time first; a later one, 10 s ahead
/// of the real time, still reads the real time plus 10 s, not a wall clock frozen until real
/// time catches up with the first runtime.
#[test]
fn wall_time_is_not_pinned_to_the_first_runtime_that_read_it() {
    let clock = Clock::system();
    let ahead = paused().block_on(async {
        tokio::time::advance(Duration::from_secs(3600)).await;
        clock.unix_time()
    });
    assert!(ahead.abs_diff(real_now() + Duration::from_secs(3600)) < Duration::from_secs(5));
    let later = paused().block_on(async {
        tokio::time::advance(Duration::from_secs(10)).await;
        clock.unix_time()
    });
    let expected = real_now() + Duration::from_secs(10);
    assert!(
        later.abs_diff(expected) < Duration::from_secs(5),
        "read {later:?}, expected about {expected:?}"
    );
    let outside = clock.unix_time();
    assert!(outside.abs_diff(real_now()) < Duration::from_secs(5));
}
