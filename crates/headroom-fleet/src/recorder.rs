//! A `metrics` recorder that keeps every counter in memory, so a service can report what
//! headroom counted (L1 flushes by reason, L2 hits).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

/// Counters by name and labels; gauges and histograms are ignored.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    counters: Arc<Mutex<HashMap<Key, Arc<AtomicU64>>>>,
}

impl Counters {
    /// Installs a new set of counters as the process's recorder.
    ///
    /// # Panics
    ///
    /// If a recorder is installed already.
    pub fn install() -> Self {
        let counters = Self::default();
        metrics::set_global_recorder(counters.clone()).expect("no recorder installed yet");
        counters
    }

    /// The sum of counter `name` over every label set where each of `labels` matches.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        counters
            .iter()
            .filter(|(key, _)| key.name() == name)
            .filter(|(key, _)| {
                labels.iter().all(|(label, value)| {
                    key.labels()
                        .any(|l| l.key() == *label && l.value() == *value)
                })
            })
            .map(|(_, count)| count.load(Ordering::Relaxed))
            .sum()
    }

    /// Counter `name` summed by the value of `label`, over the label sets where each of
    /// `only` matches.
    pub fn by_label(&self, name: &str, label: &str, only: &[(&str, &str)]) -> Vec<(String, u64)> {
        let counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        let mut sums: HashMap<String, u64> = HashMap::new();
        let matches = |key: &Key| {
            key.name() == name
                && only
                    .iter()
                    .all(|(l, v)| key.labels().any(|k| k.key() == *l && k.value() == *v))
        };
        for (key, count) in counters.iter().filter(|(key, _)| matches(key)) {
            if let Some(value) = key.labels().find(|l| l.key() == label) {
                *sums.entry(value.value().to_owned()).or_default() += count.load(Ordering::Relaxed);
            }
        }
        sums.into_iter().collect()
    }
}

impl Recorder for Counters {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        Counter::from_arc(Arc::clone(counters.entry(key.clone()).or_default()))
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}
