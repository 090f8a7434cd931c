//! Every injection is counted per strategy, spared calls and stops are counted, and the running
//! gauge follows the experiment: what a dashboard shows beside what broke. Each injection is
//! also a tracing event in the span of the call it affects.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use headroom_chaos::{Chaos, Delay, Experiment, ExperimentConfig};
use metrics_exporter_prometheus::PrometheusBuilder;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

fn line<'a>(rendered: &'a str, series: &str) -> Option<&'a str> {
    rendered
        .lines()
        .find(|line| line.starts_with(series))
        .map(|line| line[series.len()..].trim())
}

/// Tests of this file run on threads of their own, some with a subscriber of their own, some
/// with none. A callsite first reached on a thread with none may be cached as uninteresting
/// while another thread installs its subscriber, and that one then misses the event. A global
/// subscriber interested in everything, installed before any test emits, keeps every callsite
/// enabled; each test's own subscriber still gets its thread's events.
fn every_callsite_enabled() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing::subscriber::set_global_default(Events::default());
    });
}

#[test]
fn injections_spares_stops_and_the_running_gauge_are_recorded() {
    every_callsite_enabled();
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        let experiment = Experiment::builder("recorded").seed(1).build().unwrap();
        let chaos = Chaos::<u32, &str>::new(experiment.clone())
            .fault(|| "injected")
            .outcome(|| 0);
        experiment
            .start(
                ExperimentConfig::new(Duration::from_secs(60))
                    .latency(1.0, Delay::Fixed(Duration::ZERO))
                    .fault(1.0)
                    .max_fraction(0.5),
            )
            .unwrap();
        let rendered = handle.render();
        assert_eq!(
            line(
                &rendered,
                r#"headroom_chaos_running{experiment="recorded"}"#
            ),
            Some("1")
        );
        for _ in 0..100 {
            let _ = chaos.call(async { Ok(1) }).now_or_never();
        }
        experiment.stop();
    });
    let rendered = handle.render();
    let series = |strategy: &str| {
        format!(r#"headroom_chaos_injected_total{{experiment="recorded",strategy="{strategy}"}}"#)
    };
    assert_eq!(
        line(&rendered, &series("latency")),
        Some("50"),
        "{rendered}"
    );
    assert_eq!(line(&rendered, &series("fault")), Some("50"));
    assert_eq!(line(&rendered, &series("outcome")), Some("0"));
    assert_eq!(
        line(
            &rendered,
            r#"headroom_chaos_spared_total{experiment="recorded"}"#
        ),
        Some("50")
    );
    assert_eq!(
        line(
            &rendered,
            r#"headroom_chaos_stops_total{experiment="recorded",reason="manual"}"#
        ),
        Some("1")
    );
    assert_eq!(
        line(
            &rendered,
            r#"headroom_chaos_running{experiment="recorded"}"#
        ),
        Some("0")
    );
}

/// A call released by the run's end makes its real call: the fault or substitute drawn with
/// its delay is neither injected nor counted, and only what reached a caller is.
#[tokio::test(start_paused = true)]
async fn a_fault_or_outcome_released_by_the_end_is_not_counted() {
    every_callsite_enabled();
    use headroom_chaos::ChaosKvStore;
    use headroom_core::kv::KvStore;
    use headroom_core::memory::MemoryKvStore;

    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let experiment = metrics::with_local_recorder(&recorder, || {
        Experiment::builder("released").build().unwrap()
    });
    let chaos = Chaos::<u32, &str>::new(experiment.clone())
        .fault(|| "injected")
        .outcome(|| 0);
    let kv = ChaosKvStore::new(MemoryKvStore::new(), experiment.clone());
    let key = headroom_core::Namespace::new("chaos")
        .unwrap()
        .key("k")
        .unwrap();
    let secs = Duration::from_secs;
    let slow = ExperimentConfig::new(secs(10)).latency(1.0, Delay::Fixed(secs(5)));
    let events = Events::default();
    let logging = tracing::subscriber::set_default(events.clone());

    experiment.start(slow.clone().fault(1.0)).unwrap();
    // Answered at 5 s, within the run: injected.
    assert_eq!(chaos.call(async { Ok(7) }).await, Err("injected"));
    tokio::time::sleep(secs(1)).await;
    // Drawn at 6 s, released by the end at 10 s: the real calls run.
    let write = tokio::spawn({
        let (kv, key) = (kv.clone(), key.clone());
        async move { kv.set(&key, "v".into(), secs(60)).await }
    });
    assert_eq!(chaos.call(async { Ok(7) }).await, Ok(7));
    write.await.unwrap().expect("the write lands");

    experiment.start(slow.outcome(1.0)).unwrap();
    tokio::time::sleep(secs(6)).await;
    assert_eq!(chaos.call(async { Ok(7) }).await, Ok(7));

    let rendered = handle.render();
    let series = |strategy: &str| {
        format!(r#"headroom_chaos_injected_total{{experiment="released",strategy="{strategy}"}}"#)
    };
    assert_eq!(line(&rendered, &series("fault")), Some("1"), "{rendered}");
    assert_eq!(line(&rendered, &series("outcome")), Some("0"), "{rendered}");
    assert_eq!(line(&rendered, &series("latency")), Some("4"), "{rendered}");
    drop(logging);
    let seen = events.seen.lock().unwrap();
    let logged = |field: &str| {
        seen.iter()
            .filter(|(_, _, fields)| fields.get(field).is_some_and(|value| value == "true"))
            .count()
    };
    assert_eq!((logged("fault"), logged("outcome")), (1, 0), "{seen:?}");
}

/// A point built on `Experiment::draw` that asks `answers` more than once (a retry of its own
/// check) still counts one injected fault: the call is answered once.
#[tokio::test(start_paused = true)]
async fn asking_twice_whether_a_fault_answers_counts_it_once() {
    every_callsite_enabled();
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let experiment = metrics::with_local_recorder(&recorder, || {
        Experiment::builder("asked-twice").build().unwrap()
    });
    experiment
        .start(ExperimentConfig::new(Duration::from_secs(10)).fault(1.0))
        .unwrap();
    let injection = experiment
        .draw(headroom_chaos::Strategies::FAULT)
        .expect("every call is faulted");
    assert!(injection.answers());
    assert!(injection.answers(), "the same answer the second time");
    let fault = r#"headroom_chaos_injected_total{experiment="asked-twice",strategy="fault"}"#;
    assert_eq!(line(&handle.render(), fault), Some("1"));
}

/// An answer asked for before the wait is not final: once the run has ended, the call is
/// made as without the experiment.
#[tokio::test(start_paused = true)]
async fn a_fault_asked_about_before_the_run_ended_no_longer_answers_after_it() {
    every_callsite_enabled();
    let experiment = Experiment::builder("asked-early").build().unwrap();
    experiment
        .start(ExperimentConfig::new(Duration::from_secs(10)).fault(1.0))
        .unwrap();
    let injection = experiment
        .draw(headroom_chaos::Strategies::FAULT)
        .expect("every call is faulted");
    assert!(injection.answers());
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(!injection.answers(), "the run has ended");
}

/// An experiment dropped while it runs is off for good: the gauge goes back to 0 rather than
/// showing a run nobody can stop.
#[tokio::test(start_paused = true)]
async fn dropping_a_running_experiment_resets_the_running_gauge() {
    every_callsite_enabled();
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let experiment = metrics::with_local_recorder(&recorder, || {
        Experiment::builder("dropped").build().unwrap()
    });
    let chaos = Chaos::<u32, &str>::new(experiment.clone()).fault(|| "injected");
    experiment
        .start(ExperimentConfig::new(Duration::from_secs(10)).fault(1.0))
        .unwrap();
    let gauge = r#"headroom_chaos_running{experiment="dropped"}"#;
    assert_eq!(line(&handle.render(), gauge), Some("1"));
    drop(chaos);
    drop(experiment);
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(line(&handle.render(), gauge), Some("0"));
}

/// An event seen: its target, the name of the span it was in, and its fields as text.
type Seen = (String, Option<&'static str>, BTreeMap<String, String>);

/// Every event seen, and the spans that were entered.
#[derive(Clone, Default)]
struct Events {
    seen: Arc<Mutex<Vec<Seen>>>,
    spans: Arc<Mutex<Vec<&'static str>>>,
    entered: Arc<Mutex<Vec<u64>>>,
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl Subscriber for Events {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut spans = self.spans.lock().unwrap();
        spans.push(span.metadata().name());
        Id::from_u64(spans.len() as u64)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        let span = self
            .entered
            .lock()
            .unwrap()
            .last()
            .map(|id| self.spans.lock().unwrap()[usize::try_from(*id).unwrap() - 1]);
        self.seen
            .lock()
            .unwrap()
            .push((event.metadata().target().to_owned(), span, fields));
    }
    fn enter(&self, span: &Id) {
        self.entered.lock().unwrap().push(span.into_u64());
    }
    fn exit(&self, _: &Id) {
        self.entered.lock().unwrap().pop();
    }
}

/// Each injection is an event in the span of the call it affects, naming the experiment and
/// what was injected; starts and stops are events too.
#[test]
fn each_injection_is_a_tracing_event_in_the_callers_span() {
    every_callsite_enabled();
    let events = Events::default();
    tracing::subscriber::with_default(events.clone(), || {
        let experiment = Experiment::builder("traced").build().unwrap();
        let chaos = Chaos::<u32, &str>::new(experiment.clone()).fault(|| "injected");
        experiment
            .start(ExperimentConfig::new(Duration::from_secs(60)).fault(1.0))
            .unwrap();
        let checkout = tracing::info_span!("checkout");
        checkout.in_scope(|| {
            let _ = chaos.call(async { Ok(1) }).now_or_never();
        });
        experiment.stop();
    });
    let seen = events.seen.lock().unwrap();
    let chaos: Vec<_> = seen
        .iter()
        .filter(|(target, _, _)| target == "headroom_chaos")
        .collect();
    assert_eq!(
        chaos.len(),
        3,
        "a start, an injection and a stop: {chaos:?}"
    );
    let (_, span, fields) = chaos[1];
    assert_eq!(*span, Some("checkout"));
    assert_eq!(fields["experiment"], "traced");
    assert_eq!(fields["fault"], "true");
    assert_eq!(fields["abort"], "false");
    assert!(chaos[2].2["message"].contains("stopped"), "{:?}", chaos[2]);
}
