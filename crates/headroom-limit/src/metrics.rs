//! Metric handles, registered once per component so recording never builds a key.
//!
//! Handles reach the recorder whether it was installed before or after the component was
//! built (see [`headroom_core::metrics`]).

use std::sync::atomic::{AtomicU64, Ordering};

use headroom_core::metrics::{Counter, Gauge, Histogram};

use crate::{Priority, Reason};

const REASONS: usize = Reason::ALL.len();
const PRIORITIES: usize = Priority::ALL.len();

/// The handles of one admission point (a bulkhead or a work queue).
pub(crate) struct AdmissionMetrics {
    pub(crate) queued: Gauge,
    pub(crate) queue_delay: Histogram,
    pub(crate) admitted: Counter,
    pub(crate) rejections: Rejections,
}

impl AdmissionMetrics {
    /// Handles labelled `kind = name`, where `kind` is `bulkhead` or `queue`.
    pub(crate) fn new(kind: &'static str, name: &str) -> Self {
        Self {
            queued: headroom_core::gauge!("headroom_limit_queued_requests", kind => name.to_owned()),
            queue_delay: headroom_core::histogram!("headroom_limit_queue_delay_seconds", kind => name.to_owned()),
            admitted: headroom_core::counter!("headroom_limit_admitted_total", kind => name.to_owned()),
            rejections: Rejections::new(kind, name),
        }
    }
}

/// Rejections by priority and reason: a metric counter and an in-process count for each.
pub(crate) struct Rejections {
    counters: [[Counter; REASONS]; PRIORITIES],
    counts: [[AtomicU64; REASONS]; PRIORITIES],
}

impl Rejections {
    pub(crate) fn new(kind: &'static str, name: &str) -> Self {
        Self {
            counters: Priority::ALL.map(|priority| {
                Reason::ALL.map(|reason| {
                    headroom_core::counter!(
                        "headroom_limit_rejected_total",
                        kind => name.to_owned(),
                        "priority" => priority.as_str(),
                        "reason" => reason.as_str()
                    )
                })
            }),
            counts: Default::default(),
        }
    }

    pub(crate) fn record(&self, priority: Priority, reason: Reason) {
        self.counters[priority.index()][reason.index()].increment(1);
        self.counts[priority.index()][reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count(&self, priority: Priority, reason: Reason) -> u64 {
        self.counts[priority.index()][reason.index()].load(Ordering::Relaxed)
    }
}

/// Decisions of one rate-limit tier.
#[derive(Debug)]
pub(crate) struct TierMetrics {
    pub(crate) allowed: Counter,
    pub(crate) rejected: Counter,
}

impl TierMetrics {
    pub(crate) fn new(limiter: &str, tier: &str) -> Self {
        let counter = |outcome: &'static str| {
            headroom_core::counter!(
                "headroom_limit_rate_decisions_total",
                "limiter" => limiter.to_owned(),
                "tier" => tier.to_owned(),
                "outcome" => outcome
            )
        };
        Self {
            allowed: counter("allowed"),
            rejected: counter("rejected"),
        }
    }
}
