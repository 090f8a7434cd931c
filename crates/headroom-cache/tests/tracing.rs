//! The tracing spans of the cache, read back through a small in-test subscriber. In a test
//! binary of its own: a span callsite first reached on another test's thread, with no
//! subscriber, could otherwise be cached as disabled.

use std::collections::HashMap;
use std::sync::Arc;

use headroom_cache::{Cache, CacheError};
use headroom_core::Namespace;
use headroom_core::memory::MemoryKvStore;
use parking_lot::Mutex;

fn ns() -> Namespace {
    Namespace::new("test:tracing").unwrap()
}

/// Spans by id (name and `cache` field), the spans entered on this thread, and for each event
/// the span it happened in.
#[derive(Clone, Default)]
struct Traced(Arc<TracedState>);

#[derive(Default)]
struct TracedState {
    spans: Mutex<Vec<(&'static tracing::Metadata<'static>, String)>>,
    entered: Mutex<Vec<u64>>,
    /// (event message, the span it happened in: "cache.get name=...").
    events: Mutex<Vec<(String, Option<String>)>>,
}

struct Field<'a>(&'a str, String);

impl tracing::field::Visit for Field<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == self.0 {
            self.1 = format!("{value:?}");
        }
    }
}

impl Traced {
    fn describe(&self, id: u64) -> String {
        let spans = self.0.spans.lock();
        let (meta, cache) = &spans[id as usize - 1];
        format!("{} name={cache}", meta.name())
    }

    fn spans(&self) -> Vec<String> {
        let len = self.0.spans.lock().len() as u64;
        (1..=len).map(|id| self.describe(id)).collect()
    }
}

impl tracing::Subscriber for Traced {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attrs: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut name = Field("name", String::new());
        attrs.record(&mut name);
        let mut spans = self.0.spans.lock();
        spans.push((attrs.metadata(), name.1));
        tracing::span::Id::from_u64(spans.len() as u64)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut message = Field("message", String::new());
        event.record(&mut message);
        let current = self.0.entered.lock().last().copied();
        let span = current.map(|id| self.describe(id));
        self.0.events.lock().push((message.1, span));
    }
    fn enter(&self, id: &tracing::span::Id) {
        self.0.entered.lock().push(id.into_u64());
    }
    fn exit(&self, _: &tracing::span::Id) {
        self.0.entered.lock().pop();
    }
    fn current_span(&self) -> tracing_core::span::Current {
        match self.0.entered.lock().last() {
            Some(&id) => {
                let meta = self.0.spans.lock()[id as usize - 1].0;
                tracing_core::span::Current::new(tracing::span::Id::from_u64(id), meta)
            }
            None => tracing_core::span::Current::none(),
        }
    }
}

#[tokio::test]
async fn calls_run_in_spans_named_after_the_cache_and_loads_stay_in_them() {
    let traced = Traced::default();
    let _default = tracing::subscriber::set_default(traced.clone());
    let cache: Cache<String, String> = Cache::builder()
        .name("users")
        .l2(MemoryKvStore::new(), ns())
        .build()
        .unwrap();
    let k = "k".to_owned();
    cache.insert(k.clone(), "v".into()).await.unwrap();
    cache.remove(&k).await.unwrap();
    cache.get(&k).await.unwrap();
    let loaded = cache
        .get_or_load(&k, |_| async {
            tracing::info!("loading");
            Ok::<_, CacheError>(Some("v".to_owned()))
        })
        .await
        .unwrap();
    assert_eq!(loaded.as_deref(), Some("v"));
    cache
        .get_many_or_load(&["a".to_owned()], |_: Vec<String>| async {
            Ok::<_, CacheError>(HashMap::new())
        })
        .await
        .unwrap();
    let spans = traced.spans();
    for name in [
        "cache.insert",
        "cache.remove",
        "cache.get",
        "cache.get_or_load",
        "cache.get_many",
    ] {
        let expected = format!("{name} name=users");
        assert!(spans.contains(&expected), "{expected} in {spans:?}");
    }
    let events = traced.0.events.lock().clone();
    let loading = events.iter().find(|(message, _)| message == "loading");
    assert_eq!(
        loading.and_then(|(_, span)| span.clone()).as_deref(),
        Some("cache.get_or_load name=users"),
        "the loader runs in the caller's span: {events:?}"
    );
}
