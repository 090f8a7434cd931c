//! What a trace shows of a queue: a span per job that carries its id and the origin given on
//! enqueue. A binary of its own: tracing's callsite cache is shared by every thread, and tests
//! running beside this one without a subscriber could leave its spans unrecorded.

mod support;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use headroom_core::memory::MemoryJobStore;
use headroom_jobs::{Job, JobQueue, JobState};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

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
    support::current_thread().block_on(async {
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
