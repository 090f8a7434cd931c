//! What a dashboard and a trace show of a queue: counts by outcome, depth and age, and a span
//! per job that carries its id and the origin given on enqueue.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use headroom_core::memory::MemoryJobStore;
use headroom_jobs::{Job, JobError, JobQueue, JobState};
use metrics_exporter_prometheus::PrometheusBuilder;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

fn value(rendered: &str, series: &str) -> Option<f64> {
    rendered
        .lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .map(|line| line[series.len()..].trim().parse().unwrap())
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

#[test]
fn outcomes_depth_and_oldest_age_are_metrics() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let queue = metrics::with_local_recorder(&recorder, || {
        JobQueue::builder("mail", MemoryJobStore::new())
            .max_len(5)
            .build()
            .unwrap()
    });
    current_thread().block_on(async {
        let mut ids = Vec::new();
        for payload in ["ok", "ok", "fail", "fatal", "ok"] {
            ids.push(queue.enqueue(Job::new(payload)).await.unwrap().id);
        }
        assert!(queue.enqueue(Job::new("over")).await.is_err());
        tokio::time::sleep(Duration::from_secs(3)).await;
        queue.publish_stats().await.unwrap();
        let rendered = handle.render();
        assert_eq!(
            value(&rendered, r#"headroom_jobs_depth{queue="mail"}"#),
            Some(5.0)
        );
        assert_eq!(
            value(&rendered, r#"headroom_jobs_ready{queue="mail"}"#),
            Some(5.0)
        );
        assert_eq!(
            value(
                &rendered,
                r#"headroom_jobs_oldest_ready_age_seconds{queue="mail"}"#
            ),
            Some(3.0)
        );

        let worker = queue
            .worker(|job| async move {
                match &job.payload()[..] {
                    b"fail" if job.attempt() == 1 => Err(JobError::retry("try again")),
                    b"fatal" => Err(JobError::fatal("no such address")),
                    _ => Ok(Bytes::new()),
                }
            })
            .backoff(Duration::from_millis(100), 2.0, Duration::from_secs(1))
            .start()
            .unwrap();
        for id in &ids {
            while !matches!(
                queue.status(*id).await.unwrap().unwrap().state,
                JobState::Done | JobState::Dead
            ) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        worker.shutdown(Duration::from_secs(1)).await;
        queue.publish_stats().await.unwrap();
    });
    let rendered = handle.render();
    let series = |name: &str, outcome: &str| {
        value(
            &rendered,
            &format!(r#"{name}{{queue="mail",outcome="{outcome}"}}"#),
        )
    };
    assert_eq!(series("headroom_jobs_enqueued_total", "added"), Some(5.0));
    assert_eq!(series("headroom_jobs_enqueued_total", "full"), Some(1.0));
    assert_eq!(series("headroom_jobs_attempts_total", "done"), Some(4.0));
    assert_eq!(series("headroom_jobs_attempts_total", "retried"), Some(1.0));
    assert_eq!(series("headroom_jobs_attempts_total", "dead"), Some(1.0));
    assert_eq!(
        value(&rendered, r#"headroom_jobs_depth{queue="mail"}"#),
        Some(0.0)
    );
    assert_eq!(
        value(&rendered, r#"headroom_jobs_dead{queue="mail"}"#),
        Some(1.0)
    );
    assert_eq!(
        value(&rendered, r#"headroom_jobs_running{queue="mail"}"#),
        Some(0.0)
    );
    assert_eq!(
        value(
            &rendered,
            r#"headroom_jobs_duration_seconds_count{queue="mail"}"#
        ),
        Some(6.0)
    );
}

/// A span seen: its name and fields (as first given, then as recorded).
type Span = (&'static str, BTreeMap<String, String>);

/// An event seen: its message, the span it was in, and its other fields.
type Seen = (String, Option<u64>, BTreeMap<String, String>);

#[derive(Clone, Default)]
struct Spans {
    spans: Arc<Mutex<Vec<Span>>>,
    entered: Arc<Mutex<Vec<u64>>>,
    /// Each event's message and the span it was in.
    events: Arc<Mutex<Vec<Seen>>>,
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl Subscriber for Spans {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut fields = BTreeMap::new();
        span.record(&mut Fields(&mut fields));
        let mut spans = self.spans.lock().unwrap();
        spans.push((span.metadata().name(), fields));
        Id::from_u64(spans.len() as u64)
    }
    fn record(&self, id: &Id, values: &Record<'_>) {
        let mut spans = self.spans.lock().unwrap();
        values.record(&mut Fields(&mut spans[id.into_u64() as usize - 1].1));
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        let message = fields.remove("message").unwrap_or_default();
        let span = event
            .parent()
            .map(Id::into_u64)
            .or_else(|| self.entered.lock().unwrap().last().copied());
        self.events.lock().unwrap().push((message, span, fields));
    }
    fn enter(&self, span: &Id) {
        self.entered.lock().unwrap().push(span.into_u64());
    }
    fn exit(&self, _: &Id) {
        self.entered.lock().unwrap().pop();
    }
}

#[test]
fn a_job_runs_in_a_span_linked_to_the_request_that_enqueued_it() {
    let spans = Spans::default();
    let _guard = tracing::subscriber::set_default(spans.clone());
    current_thread().block_on(async {
        let queue = JobQueue::builder("checkout", MemoryJobStore::new())
            .build()
            .unwrap();
        let worker = queue
            .worker(|_| async {
                tracing::info!("charging");
                Ok(Bytes::new())
            })
            .start()
            .unwrap();
        let request = tracing::info_span!("POST /orders");
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let id = {
            let _entered = request.enter();
            queue
                .enqueue(Job::new("order 7").origin(traceparent))
                .await
                .unwrap()
                .id
        };
        while queue.status(id).await.unwrap().unwrap().state != JobState::Done {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        worker.shutdown(Duration::from_secs(1)).await;
        let spans = spans.spans.lock().unwrap();
        let (_, job) = spans
            .iter()
            .find(|(name, _)| *name == "headroom.job")
            .unwrap();
        assert_eq!(job["job.id"], id.to_string());
        assert_eq!(job["job.origin"], traceparent);
        assert_eq!(job["queue"], "checkout");
        assert_eq!(job["job.attempt"], "1");
        assert_eq!(job["outcome"], "done");
    });
    let spans_list = spans.spans.lock().unwrap();
    let events = spans.events.lock().unwrap();
    let span_name = |id: Option<u64>| id.map(|id| spans_list[id as usize - 1].0);
    let enqueued = events
        .iter()
        .find(|(message, _, _)| message == "job enqueued")
        .unwrap();
    assert_eq!(
        span_name(enqueued.1),
        Some("POST /orders"),
        "the request's trace names the job"
    );
    assert_eq!(enqueued.2["job.id"], "0-1");
    let charging = events
        .iter()
        .find(|(message, _, _)| message == "charging")
        .unwrap();
    assert_eq!(
        span_name(charging.1),
        Some("headroom.job"),
        "the handler runs in the job's span"
    );
}

#[test]
fn a_job_buried_on_delivery_is_counted_dead() {
    use headroom_core::jobs::{FetchRequest, JobStore};

    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let store = MemoryJobStore::new();
    let queue = metrics::with_local_recorder(&recorder, || {
        JobQueue::builder("poison", store.clone()).build().unwrap()
    });
    current_thread().block_on(async {
        let id = queue
            .enqueue(Job::new("kills its worker"))
            .await
            .unwrap()
            .id;
        // Its only allowed attempt went to a worker that died.
        let partition = headroom_core::Namespace::new("headroom.jobs")
            .unwrap()
            .key("{poison.0}")
            .unwrap();
        let request = FetchRequest {
            consumer: "died",
            lanes: &[0],
            max: 1,
            visibility: Duration::from_secs(1),
        };
        assert_eq!(store.fetch(&partition, request).await.unwrap().len(), 1);
        let worker = queue
            .worker(|_| async { Ok(Bytes::new()) })
            .max_attempts(1)
            .visibility(Duration::from_secs(1))
            .start()
            .unwrap();
        while queue.status(id).await.unwrap().unwrap().state != JobState::Dead {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let report = worker.shutdown(Duration::from_secs(1)).await;
        assert_eq!(report.dead, 1);
    });
    let rendered = handle.render();
    assert_eq!(
        value(
            &rendered,
            r#"headroom_jobs_attempts_total{queue="poison",outcome="dead"}"#
        ),
        Some(1.0)
    );
}

#[test]
fn the_depth_gauge_follows_the_queue_while_every_handler_is_busy() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let queue = metrics::with_local_recorder(&recorder, || {
        JobQueue::builder("busy", MemoryJobStore::new())
            .build()
            .unwrap()
    });
    current_thread().block_on(async {
        let worker = queue
            .worker(|_| async {
                tokio::time::sleep(Duration::from_secs(120)).await;
                Ok(Bytes::new())
            })
            .concurrency(2)
            .prefetch(0)
            .start()
            .unwrap();
        for _ in 0..60 {
            for _ in 0..10 {
                queue.enqueue(Job::new("slow")).await.unwrap();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tokio::time::sleep(Duration::from_secs(6)).await;
        let rendered = handle.render();
        let depth = value(&rendered, r#"headroom_jobs_depth{queue="busy"}"#).unwrap();
        assert_eq!(
            depth, 600.0,
            "the depth gauge stood still while the handlers were busy"
        );
        let age = value(
            &rendered,
            r#"headroom_jobs_oldest_ready_age_seconds{queue="busy"}"#,
        )
        .unwrap();
        assert!(age >= 60.0, "oldest ready age {age}");
        worker.shutdown(Duration::ZERO).await;
    });
}
