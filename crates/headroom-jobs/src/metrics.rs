//! Metric handles, registered once per queue so recording never builds a key.

use headroom_core::metrics::{Counter, Gauge, Histogram};

use crate::QueueStats;

pub(crate) struct QueueMetrics {
    pub(crate) added: Counter,
    pub(crate) duplicate: Counter,
    pub(crate) full: Counter,
    pub(crate) done: Counter,
    pub(crate) retried: Counter,
    pub(crate) dead: Counter,
    pub(crate) lost: Counter,
    pub(crate) handed_back: Counter,
    pub(crate) abandoned: Counter,
    pub(crate) store_errors: Counter,
    pub(crate) running: Gauge,
    pub(crate) duration: Histogram,
    unfinished: Gauge,
    ready: Gauge,
    delayed: Gauge,
    dead_kept: Gauge,
    oldest_age: Gauge,
}

impl QueueMetrics {
    pub(crate) fn new(queue: &str) -> Self {
        let enqueued = |outcome: &'static str| headroom_core::counter!("headroom_jobs_enqueued_total", "queue" => queue.to_owned(), "outcome" => outcome);
        let finished = |outcome: &'static str| headroom_core::counter!("headroom_jobs_attempts_total", "queue" => queue.to_owned(), "outcome" => outcome);
        Self {
            added: enqueued("added"),
            duplicate: enqueued("duplicate"),
            full: enqueued("full"),
            done: finished("done"),
            retried: finished("retried"),
            dead: finished("dead"),
            lost: finished("lost"),
            handed_back: finished("handed_back"),
            abandoned: finished("abandoned"),
            store_errors: headroom_core::counter!("headroom_jobs_store_errors_total", "queue" => queue.to_owned()),
            running: headroom_core::gauge!("headroom_jobs_running", "queue" => queue.to_owned()),
            duration: headroom_core::histogram!("headroom_jobs_duration_seconds", "queue" => queue.to_owned()),
            unfinished: headroom_core::gauge!("headroom_jobs_depth", "queue" => queue.to_owned()),
            ready: headroom_core::gauge!("headroom_jobs_ready", "queue" => queue.to_owned()),
            delayed: headroom_core::gauge!("headroom_jobs_delayed", "queue" => queue.to_owned()),
            dead_kept: headroom_core::gauge!("headroom_jobs_dead", "queue" => queue.to_owned()),
            oldest_age: headroom_core::gauge!("headroom_jobs_oldest_ready_age_seconds", "queue" => queue.to_owned()),
        }
    }

    pub(crate) fn publish(&self, stats: &QueueStats) {
        self.unfinished.set(stats.unfinished as f64);
        self.ready.set(stats.ready as f64);
        self.delayed.set(stats.delayed as f64);
        self.dead_kept.set(stats.dead as f64);
        self.oldest_age
            .set(stats.oldest_ready_age.map_or(0.0, |age| age.as_secs_f64()));
    }
}
