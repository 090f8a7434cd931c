//! Metric handles, registered once per cache so recording on hot paths neither allocates nor
//! looks anything up. A recorder installed after the cache is built still gets them.

use headroom_core::metrics::{Counter, Gauge, Histogram};
use headroom_core::{counter, gauge, histogram};

/// Every metric of one cache, labelled with its name.
pub(crate) struct Metrics {
    pub(crate) l1_hits: Counter,
    pub(crate) l1_misses: Counter,
    pub(crate) l2_hits: Counter,
    pub(crate) l2_misses: Counter,
    pub(crate) loads: Counter,
    pub(crate) load_errors: Counter,
    pub(crate) load_timeouts: Counter,
    pub(crate) load_duration: Histogram,
    pub(crate) refreshes: Counter,
    pub(crate) stale_served: Counter,
    pub(crate) l2_errors: Counter,
    pub(crate) l2_timeouts: Counter,
    pub(crate) l2_skipped: Counter,
    pub(crate) l2_corrupt: Counter,
    pub(crate) l2_pending_deletes: Gauge,
    pub(crate) l2_pending_untracked: Counter,
    pub(crate) breaker_open: Gauge,
    pub(crate) evictions: Counter,
    pub(crate) oversized: Counter,
}

impl Metrics {
    pub(crate) fn new(cache: &str) -> Self {
        let name = cache.to_owned();
        let level = |level: &'static str, what: &'static str| match what {
            "hits" => {
                counter!("headroom_cache_hits_total", "cache" => name.clone(), "level" => level)
            }
            _ => counter!("headroom_cache_misses_total", "cache" => name.clone(), "level" => level),
        };
        let load = |outcome: &'static str| counter!("headroom_cache_loads_total", "cache" => name.clone(), "outcome" => outcome);
        let l2 = |kind: &'static str| counter!("headroom_cache_l2_errors_total", "cache" => name.clone(), "kind" => kind);
        Self {
            l1_hits: level("l1", "hits"),
            l1_misses: level("l1", "misses"),
            l2_hits: level("l2", "hits"),
            l2_misses: level("l2", "misses"),
            loads: load("ok"),
            load_errors: load("error"),
            load_timeouts: load("timeout"),
            load_duration: histogram!("headroom_cache_load_duration_seconds", "cache" => name.clone()),
            refreshes: counter!("headroom_cache_refreshes_total", "cache" => name.clone()),
            stale_served: counter!("headroom_cache_stale_served_total", "cache" => name.clone()),
            l2_errors: l2("error"),
            l2_timeouts: l2("timeout"),
            l2_skipped: counter!("headroom_cache_l2_skipped_total", "cache" => name.clone()),
            l2_corrupt: counter!("headroom_cache_l2_corrupt_total", "cache" => name.clone()),
            l2_pending_deletes: gauge!("headroom_cache_l2_pending_deletes", "cache" => name.clone()),
            l2_pending_untracked: counter!("headroom_cache_l2_outdated_untracked_total", "cache" => name.clone()),
            breaker_open: gauge!("headroom_cache_l2_breaker_open", "cache" => name.clone()),
            evictions: counter!("headroom_cache_evictions_total", "cache" => name.clone()),
            oversized: counter!("headroom_cache_oversized_total", "cache" => name.clone()),
        }
    }
}
