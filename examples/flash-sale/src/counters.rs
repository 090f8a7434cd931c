//! A minimal `metrics` recorder that keeps the counters the report needs (cache hits and
//! misses per level), so the demo reads them the way a service's dashboard would.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

type Registry = HashMap<(String, String), Arc<AtomicU64>>;

/// Counters by name and `level` label, summed over every other label.
#[derive(Clone, Debug, Default)]
pub(crate) struct Counters {
    counters: Arc<Mutex<Registry>>,
}

impl Counters {
    /// Installs a recorder feeding these counters as the global one.
    pub(crate) fn install() -> Self {
        let counters = Self::default();
        // Only the first install wins; the demo installs once, before building anything.
        let _ = metrics::set_global_recorder(counters.clone());
        counters
    }

    /// The value of counter `name` with label `level` (empty for none).
    pub(crate) fn get(&self, name: &str, level: &str) -> u64 {
        let counters = self.counters.lock().expect("counters lock");
        counters
            .get(&(name.to_owned(), level.to_owned()))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

impl Recorder for Counters {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let level = key
            .labels()
            .find(|label| label.key() == "level")
            .map_or_else(String::new, |label| label.value().to_owned());
        let mut counters = self.counters.lock().expect("counters lock");
        let counter = counters
            .entry((key.name().to_owned(), level))
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
