//! Test support: a metrics recorder that keeps every counter and gauge, and a single poll.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

#[derive(Default)]
pub(crate) struct TestRecorder {
    values: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
}

fn render(key: &Key) -> String {
    let mut labels: Vec<String> = key
        .labels()
        .map(|label| format!("{}={}", label.key(), label.value()))
        .collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl TestRecorder {
    fn cell(&self, key: &Key) -> Arc<AtomicU64> {
        let mut values = self.values.lock().unwrap();
        Arc::clone(values.entry(render(key)).or_default())
    }

    /// The counter `name{labels}`, labels written `k=v` sorted by key and joined with commas.
    #[allow(dead_code)]
    pub(crate) fn counter(&self, name_and_labels: &str) -> u64 {
        self.values
            .lock()
            .unwrap()
            .get(name_and_labels)
            .map_or(0, |v| v.load(Ordering::Relaxed))
    }

    /// The number of distinct series of metric `name`.
    #[allow(dead_code)]
    pub(crate) fn series(&self, name: &str) -> usize {
        let prefix = format!("{name}{{");
        self.values
            .lock()
            .unwrap()
            .keys()
            .filter(|key| key.starts_with(&prefix))
            .count()
    }

    /// The gauge `name{labels}`.
    #[allow(dead_code)]
    pub(crate) fn gauge(&self, name_and_labels: &str) -> f64 {
        f64::from_bits(
            self.values
                .lock()
                .unwrap()
                .get(name_and_labels)
                .map_or(0, |v| v.load(Ordering::Relaxed)),
        )
    }
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.cell(key))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.cell(key))
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// Polls `future` once: its output if it is ready, `None` if it is pending.
pub(crate) async fn poll_once<F: std::future::Future + Unpin>(mut future: F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut future).poll(cx) {
            std::task::Poll::Ready(output) => Some(output),
            std::task::Poll::Pending => None,
        })
    })
    .await
}
