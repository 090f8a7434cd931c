//! Every part's operations open `tracing` spans named `<part>.<operation>` with the same
//! fields, `name` and `outcome`, and work spawned for a caller runs inside the caller's span.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use headroom::Headroom;
use headroom::breaker::Error as BreakerError;
use headroom::idempotency::{IdempotencyKey, Scope};
use headroom::limit::rate::{Quota, RateLimit, TierConfig};
use headroom::limit::{KeyedBulkhead, Overflow, WorkQueue};
use headroom::shard::{JumpRouter, Migration, Topology};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};
use tracing_core::span::Current;

/// One span: its name and its fields as text.
#[derive(Clone, Debug)]
struct Opened {
    meta: &'static Metadata<'static>,
    fields: BTreeMap<String, String>,
}

/// Keeps every span and which one each thread is in.
#[derive(Clone, Default)]
struct Spans {
    opened: Arc<Mutex<Vec<Opened>>>,
    entered: Arc<Mutex<Vec<Id>>>,
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl Subscriber for Spans {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut fields = BTreeMap::new();
        span.record(&mut Fields(&mut fields));
        let mut opened = self.opened.lock().unwrap();
        opened.push(Opened {
            meta: span.metadata(),
            fields,
        });
        Id::from_u64(opened.len() as u64)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        let mut opened = self.opened.lock().unwrap();
        let index = usize::try_from(span.into_u64()).unwrap() - 1;
        values.record(&mut Fields(&mut opened[index].fields));
    }

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, _: &Event<'_>) {}

    fn enter(&self, span: &Id) {
        self.entered.lock().unwrap().push(span.clone());
    }

    fn exit(&self, span: &Id) {
        let mut entered = self.entered.lock().unwrap();
        if let Some(at) = entered.iter().rposition(|id| id == span) {
            entered.remove(at);
        }
    }

    fn current_span(&self) -> Current {
        match self.entered.lock().unwrap().last() {
            Some(id) => {
                let index = usize::try_from(id.into_u64()).unwrap() - 1;
                Current::new(id.clone(), self.opened.lock().unwrap()[index].meta)
            }
            None => Current::none(),
        }
    }
}

impl Spans {
    /// The fields of every span called `name`, in the order they opened.
    fn named(&self, name: &str) -> Vec<BTreeMap<String, String>> {
        self.opened
            .lock()
            .unwrap()
            .iter()
            .filter(|span| span.meta.name() == name)
            .map(|span| span.fields.clone())
            .collect()
    }

    /// The `name` and `outcome` of every span called `span`.
    fn outcomes(&self, span: &str) -> Vec<(String, String)> {
        self.named(span)
            .into_iter()
            .map(|fields| {
                let field = |key: &str| fields.get(key).cloned().unwrap_or_default();
                (field("name"), field("outcome"))
            })
            .collect()
    }
}

fn pair(name: &str, outcome: &str) -> (String, String) {
    (name.to_owned(), outcome.to_owned())
}

#[tokio::test]
async fn operations_open_spans_with_a_name_and_an_outcome() {
    let spans = Spans::default();
    let _default = tracing::subscriber::set_default(spans.clone());
    let headroom = Headroom::builder().namespace("shop").memory().unwrap();

    // The cache: the load runs in a task of its own, inside the caller's span.
    let cache = headroom
        .cache::<u64, String>("products")
        .unwrap()
        .build()
        .unwrap();
    let loaded_in = cache
        .get_or_load(&7, |_| async {
            let current = tracing::Span::current();
            Ok::<_, std::io::Error>(current.metadata().map(|meta| meta.name().to_owned()))
        })
        .await
        .unwrap();
    assert_eq!(loaded_in.as_deref(), Some("cache.get_or_load"));
    assert_eq!(spans.named("cache.get_or_load")[0]["name"], "products");

    // A bulkhead: a caller that waits for a permit.
    let bulkhead = headroom
        .bulkhead("db")
        .max_concurrent(1)
        .max_queued(1)
        .max_wait(Duration::from_secs(5))
        .build()
        .unwrap();
    let held = bulkhead.try_acquire().unwrap();
    let waiting = {
        let bulkhead = bulkhead.clone();
        tokio::spawn(async move { bulkhead.acquire().await.map(drop) })
    };
    for _ in 0..100 {
        if bulkhead.queued() == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(bulkhead.queued(), 1, "the second caller waits");
    drop(held);
    waiting.await.unwrap().unwrap();
    assert_eq!(spans.outcomes("bulkhead.acquire"), [pair("db", "admitted")]);

    // A keyed bulkhead: a tenant that waits, then gives up.
    let keyed = KeyedBulkhead::builder("tenants")
        .max_concurrent(1)
        .max_queued(1)
        .max_wait(Duration::from_millis(20))
        .build()
        .unwrap();
    let held = keyed.try_acquire("acme").unwrap();
    assert!(keyed.acquire("acme").await.is_err());
    drop(held);
    assert_eq!(
        spans.outcomes("keyed_bulkhead.acquire"),
        [pair("tenants", "wait_timeout")]
    );

    // A work queue: a push that waits for room.
    let queue = WorkQueue::builder("jobs")
        .capacity(1)
        .overflow(Overflow::Wait {
            timeout: Duration::from_secs(5),
        })
        .build()
        .unwrap();
    queue.push(1_u32).await.unwrap();
    let pushing = {
        let queue = queue.clone();
        tokio::spawn(async move { queue.push(2).await.map_err(drop) })
    };
    for _ in 0..100 {
        if !spans.named("queue.push").is_empty() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(queue.pop().await, Some(1));
    pushing.await.unwrap().unwrap();
    assert_eq!(spans.outcomes("queue.push"), [pair("jobs", "admitted")]);

    // A breaker: a call that succeeds, one that fails, one refused.
    let breaker = headroom
        .circuit_breaker::<std::io::Error>("payments")
        .build()
        .unwrap();
    breaker
        .call(async { Ok::<_, std::io::Error>(()) })
        .await
        .unwrap();
    let failed: Result<(), BreakerError<std::io::Error>> = breaker
        .call(async { Err(std::io::Error::other("declined")) })
        .await;
    assert!(failed.is_err());
    breaker.isolate();
    assert!(
        breaker
            .call(async { Ok::<_, std::io::Error>(()) })
            .await
            .is_err()
    );
    assert_eq!(
        spans.outcomes("breaker.call"),
        [
            pair("payments", "success"),
            pair("payments", "failure"),
            pair("payments", "rejected")
        ]
    );

    // A pipeline.
    let pipeline = headroom
        .pipeline::<std::io::Error>("inventory")
        .timeout(Duration::from_secs(5))
        .build();
    pipeline
        .call(|| async { Ok::<_, std::io::Error>(()) })
        .await
        .unwrap();
    assert_eq!(spans.outcomes("pipeline.call"), [pair("inventory", "ok")]);
    // The same pipeline as a tower layer.
    {
        use tower::{ServiceBuilder, ServiceExt};
        ServiceBuilder::new()
            .layer(headroom::breaker::tower::PipelineLayer::new(
                pipeline.clone(),
            ))
            .service(tower::service_fn(|(): ()| async {
                Ok::<_, std::io::Error>(())
            }))
            .oneshot(())
            .await
            .unwrap();
    }
    assert_eq!(
        spans.outcomes("pipeline.call"),
        [pair("inventory", "ok"), pair("inventory", "ok")]
    );

    // Idempotency: the first request runs, the retry is replayed.
    let idempotency = headroom.idempotency().build().unwrap();
    let scope = Scope::new("customer-1", "checkout").unwrap();
    let key = IdempotencyKey::new("k-1").unwrap();
    for _ in 0..2 {
        idempotency
            .execute(&scope, &key, b"sku=1", || async {
                Ok::<_, std::io::Error>(1_u32)
            })
            .await
            .unwrap();
    }
    assert_eq!(
        spans.outcomes("idempotency.execute"),
        [pair("checkout", "executed"), pair("checkout", "replayed")]
    );

    // A shared rate limit.
    let limiter = headroom
        .rate_limiter(
            "api",
            TierConfig::new().tier("free", Quota::per_minute(1).unwrap()),
        )
        .unwrap()
        .build()
        .unwrap();
    assert!(limiter.check("free", "c1", 1).await.is_ok());
    assert!(limiter.check("free", "c1", 1).await.is_err());
    assert_eq!(
        spans.outcomes("rate.check"),
        [pair("api", "allowed"), pair("api", "rejected")]
    );

    // A resharding step: refused while the copy is incomplete, then the phase reached.
    let topology = |epoch: u64, shards_on_b: std::ops::Range<u32>| {
        Topology::builder(JumpRouter::new(4).unwrap())
            .epoch(epoch)
            .node("a", ())
            .node("b", ())
            .shards(0..shards_on_b.start, "a", &[])
            .shards(shards_on_b, "b", &[])
            .build()
            .unwrap()
    };
    let migration = Migration::new(
        "orders-reshard",
        Arc::new(topology(1, 2..4)),
        Arc::new(topology(2, 1..4)),
    )
    .unwrap();
    assert!(migration.advance().await.is_err());
    let moving = migration.plan().unit_count();
    migration.report_copied(moving, moving);
    migration.advance().await.unwrap();
    assert_eq!(
        spans.outcomes("migration.advance"),
        [
            pair("orders-reshard", "copy_incomplete"),
            pair("orders-reshard", "dual_write")
        ]
    );
}
