//! A minimal `metrics` recorder that keeps the counters the report needs (cache hits and
//! misses per level, loads, invalidation flushes, chaos injections per strategy), so the demo
//! reads them the way a service's dashboard would.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

/// A counter's name and labels.
type Series = (String, Vec<(String, String)>);
type Registry = HashMap<Series, Arc<AtomicU64>>;

/// Every counter registered, by name and labels.
#[derive(Clone, Debug, Default)]
pub(crate) struct Counters {
    counters: Arc<Mutex<Registry>>,
}

/// The counters' values at one moment.
#[derive(Clone, Debug, Default)]
pub(crate) struct Snapshot(HashMap<Series, u64>);

impl Counters {
    /// Installs a recorder feeding these counters as the global one.
    pub(crate) fn install() -> Self {
        let counters = Self::default();
        // Only the first install wins; the demo installs once, before building anything.
        let _ = metrics::set_global_recorder(counters.clone());
        counters
    }

    /// The values now.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let counters = self.counters.lock().expect("counters lock");
        Snapshot(
            counters
                .iter()
                .map(|(series, value)| (series.clone(), value.load(Ordering::Relaxed)))
                .collect(),
        )
    }
}

impl Snapshot {
    /// The sum of the counters named `name` that carry every label of `labels`.
    pub(crate) fn get(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.0
            .iter()
            .filter(|((series, have), _)| {
                series == name
                    && labels
                        .iter()
                        .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v))
            })
            .map(|(_, value)| value)
            .sum()
    }

    /// What was counted from `earlier` until this snapshot.
    pub(crate) fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot(
            self.0
                .iter()
                .map(|(series, value)| {
                    let before = earlier.0.get(series).copied().unwrap_or(0);
                    (series.clone(), value.saturating_sub(before))
                })
                .collect(),
        )
    }
}

impl Recorder for Counters {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut labels: Vec<(String, String)> = key
            .labels()
            .map(|label| (label.key().to_owned(), label.value().to_owned()))
            .collect();
        labels.sort();
        let mut counters = self.counters.lock().expect("counters lock");
        let counter = counters
            .entry((key.name().to_owned(), labels))
            .or_default()
            .clone();
        Counter::from_arc(counter)
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_sum_over_other_labels_and_subtract() {
        let counters = Counters::default();
        let metadata = Metadata::new("test", metrics::Level::INFO, None);
        let key = |cache: &'static str, level: &'static str| {
            Key::from_parts(
                "hits",
                vec![
                    metrics::Label::new("cache", cache),
                    metrics::Label::new("level", level),
                ],
            )
        };
        counters
            .register_counter(&key("a", "l1"), &metadata)
            .increment(2);
        let before = counters.snapshot();
        counters
            .register_counter(&key("b", "l1"), &metadata)
            .increment(3);
        counters
            .register_counter(&key("a", "l2"), &metadata)
            .increment(5);
        let now = counters.snapshot();
        assert_eq!(now.get("hits", &[("level", "l1")]), 5);
        assert_eq!(now.get("hits", &[]), 10);
        assert_eq!(now.since(&before).get("hits", &[("level", "l1")]), 3);
        assert_eq!(now.get("misses", &[]), 0);
    }
}
