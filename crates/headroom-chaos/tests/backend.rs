//! The backend wrappers, over the real memory backends on tokio's paused clock (which the
//! experiment's default clock follows): off they are the inner store; on, they delay, fail
//! without reaching the store, hold until the experiment stops, and lose bus messages at the
//! rate asked; and a cache over a failing or stalled L2 still answers its callers.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use headroom_cache::Cache;
use headroom_chaos::{
    ChaosBus, ChaosKvStore, ChaosLeaseStore, ChaosMigrationStore, ChaosRateStore, Delay,
    Experiment, ExperimentConfig, FaultKind,
};
use headroom_core::bus::{BusEvent, InvalidationBus, Subscription};
use headroom_core::kv::{KvEntry, KvStore, VersionAt};
use headroom_core::lease::{Begin, BeginId, FencingToken, LeaseStore};
use headroom_core::memory::{
    MemoryBus, MemoryKvStore, MemoryLeaseStore, MemoryMigrationStore, MemoryRateStore,
};
use headroom_core::migration::{MigrationRecord, MigrationStore};
use headroom_core::rate::{Gcra, RateStore};
use headroom_core::{BackendError, Key, Namespace};
use tokio::time::{Instant, timeout};

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(60 * 60);

/// One unit a minute: a cell charged once refuses the next call.
const ONE_A_MINUTE: Gcra = Gcra {
    emission_interval: MINUTE,
    burst: 1,
};

const RECORD: MigrationRecord = MigrationRecord {
    from_epoch: 1,
    to_epoch: 2,
    phase: 0,
};

fn key(name: &str) -> Key {
    Namespace::new("chaos-test").unwrap().key(name).unwrap()
}

fn experiment() -> Experiment {
    Experiment::builder("backend").seed(42).build().unwrap()
}

/// A value carrying version `version` at offset 0 (see `KvStore::set_if_newer`).
fn versioned(version: u64) -> Bytes {
    Bytes::from(version.to_le_bytes().to_vec())
}

/// Every wrapper, each over its own memory store, with the inner stores kept to look at.
#[derive(Clone)]
struct Stores {
    kv: MemoryKvStore,
    leases: MemoryLeaseStore,
    rates: MemoryRateStore,
    migrations: MemoryMigrationStore,
    chaos_kv: ChaosKvStore<MemoryKvStore>,
    chaos_bus: ChaosBus<MemoryBus>,
    chaos_leases: ChaosLeaseStore<MemoryLeaseStore>,
    chaos_rates: ChaosRateStore<MemoryRateStore>,
    chaos_migrations: ChaosMigrationStore<MemoryMigrationStore>,
}

type Call = Pin<Box<dyn Future<Output = Result<&'static str, BackendError>> + Send>>;

/// `name` when `answer` is what a fresh store answers, else the answer itself (leaked: tests only).
fn named(name: &'static str, fresh: bool, answer: impl Debug) -> &'static str {
    if fresh {
        name
    } else {
        format!("{name}: {answer:?}").leak()
    }
}

impl Stores {
    /// The wrappers, and a subscriber on the inner bus's channel `bus` (it sees what reaches
    /// the bus).
    async fn new(experiment: &Experiment) -> (Self, Subscription) {
        let bus = MemoryBus::new();
        let direct = bus.subscribe(&key("bus")).await.unwrap();
        let (kv, leases) = (MemoryKvStore::new(), MemoryLeaseStore::new());
        let (rates, migrations) = (MemoryRateStore::new(), MemoryMigrationStore::new());
        let stores = Self {
            chaos_kv: ChaosKvStore::new(kv.clone(), experiment.clone()),
            chaos_bus: ChaosBus::new(bus, experiment.clone()),
            chaos_leases: ChaosLeaseStore::new(leases.clone(), experiment.clone()),
            chaos_rates: ChaosRateStore::new(rates.clone(), experiment.clone()),
            chaos_migrations: ChaosMigrationStore::new(migrations.clone(), experiment.clone()),
            kv,
            leases,
            rates,
            migrations,
        };
        (stores, direct)
    }

    /// One call through each wrapper, each owning its wrapper (so it can be spawned) and
    /// answering its name when it gets what a fresh store answers.
    fn calls(&self) -> Vec<(&'static str, Call)> {
        let Self {
            chaos_kv: kv,
            chaos_bus: bus,
            chaos_leases: leases,
            chaos_rates: rates,
            chaos_migrations: migrations,
            ..
        } = self.clone();
        vec![
            (
                "kv.set",
                Box::pin(async move {
                    kv.set(&key("a"), Bytes::from_static(b"1"), MINUTE).await?;
                    Ok("kv.set")
                }),
            ),
            (
                "bus.publish",
                Box::pin(async move {
                    bus.publish(&key("bus"), Bytes::from_static(b"hello"))
                        .await?;
                    Ok("bus.publish")
                }),
            ),
            ("bus.subscribe", {
                let bus = self.chaos_bus.clone();
                Box::pin(async move {
                    bus.subscribe(&key("bus")).await?;
                    Ok("bus.subscribe")
                })
            }),
            (
                "leases.begin",
                Box::pin(async move {
                    let begun = leases
                        .begin(&key("op"), b"fingerprint", MINUTE, BeginId::random())
                        .await?;
                    let fresh = matches!(
                        begun,
                        Begin::Acquired {
                            took_over: false,
                            ..
                        }
                    );
                    Ok(named("leases.begin", fresh, begun))
                }),
            ),
            (
                "rates.apply",
                Box::pin(async move {
                    let decision = rates.apply(&key("cell"), ONE_A_MINUTE, 1).await?;
                    Ok(named("rates.apply", decision.allowed, decision))
                }),
            ),
            (
                "migrations.create",
                Box::pin(async move {
                    let created = migrations.create(&key("m"), RECORD).await?;
                    Ok(named("migrations.create", created == RECORD, created))
                }),
            ),
        ]
    }

    /// Every method of every wrapper, once, on the keys of [`Stores::calls`].
    async fn every_method(&self) -> Vec<(&'static str, Result<(), BackendError>)> {
        let (a, token) = (key("a"), FencingToken(1));
        let entries = [KvEntry {
            key: a.clone(),
            value: versioned(1),
            ttl: MINUTE,
        }];
        let channel = key("bus");
        vec![
            ("kv.get", self.chaos_kv.get(&a).await.map(drop)),
            (
                "kv.get_many",
                self.chaos_kv
                    .get_many(std::slice::from_ref(&a))
                    .await
                    .map(drop),
            ),
            (
                "kv.set",
                self.chaos_kv.set(&a, versioned(1), MINUTE).await.map(drop),
            ),
            ("kv.set_many", self.chaos_kv.set_many(&entries).await),
            (
                "kv.delete",
                self.chaos_kv
                    .delete(std::slice::from_ref(&a))
                    .await
                    .map(drop),
            ),
            (
                "kv.set_if_newer",
                self.chaos_kv
                    .set_if_newer(&entries, VersionAt::new(0))
                    .await
                    .map(drop),
            ),
            (
                "kv.delete_if_eq",
                self.chaos_kv.delete_if_eq(&a, b"1").await.map(drop),
            ),
            (
                "bus.publish",
                self.chaos_bus.publish(&channel, Bytes::new()).await,
            ),
            (
                "bus.subscribe",
                self.chaos_bus.subscribe(&channel).await.map(drop),
            ),
            (
                "leases.begin",
                self.chaos_leases
                    .begin(&key("op"), b"fingerprint", MINUTE, BeginId::random())
                    .await
                    .map(drop),
            ),
            (
                "leases.complete",
                self.chaos_leases
                    .complete(&key("op"), token, Bytes::new(), MINUTE)
                    .await
                    .map(drop),
            ),
            (
                "leases.extend",
                self.chaos_leases
                    .extend(&key("op"), token, MINUTE)
                    .await
                    .map(drop),
            ),
            (
                "leases.release",
                self.chaos_leases.release(&key("op"), token).await.map(drop),
            ),
            (
                "rates.apply_all",
                self.chaos_rates
                    .apply_all(&[(key("cell"), ONE_A_MINUTE)], 1)
                    .await
                    .map(drop),
            ),
            (
                "rates.apply",
                self.chaos_rates
                    .apply(&key("cell"), ONE_A_MINUTE, 1)
                    .await
                    .map(drop),
            ),
            (
                "migrations.create",
                self.chaos_migrations
                    .create(&key("m"), RECORD)
                    .await
                    .map(drop),
            ),
            (
                "migrations.load",
                self.chaos_migrations.load(&key("m")).await.map(drop),
            ),
            (
                "migrations.transition",
                self.chaos_migrations
                    .transition(&key("m"), RECORD, 1)
                    .await
                    .map(drop),
            ),
            (
                "migrations.acknowledge",
                self.chaos_migrations
                    .acknowledge(&key("m"), "node-1", 1, MINUTE)
                    .await,
            ),
            (
                "migrations.lagging",
                self.chaos_migrations.lagging(&key("m"), 1).await.map(drop),
            ),
            (
                "migrations.remove",
                self.chaos_migrations.remove(&key("m")).await,
            ),
        ]
    }
}

/// The events `subscription` yields before the (paused) clock runs idle for a second.
async fn events(subscription: &mut Subscription) -> Vec<BusEvent> {
    let mut events = Vec::new();
    while let Ok(event) = timeout(Duration::from_secs(1), subscription.next_event()).await {
        events.push(event.expect("the subscription ended"));
    }
    events
}

/// How many messages `subscription` delivers before the clock runs idle for a second.
async fn delivered(subscription: &mut Subscription) -> usize {
    events(subscription)
        .await
        .iter()
        .filter(|event| matches!(event, BusEvent::Message(_)))
        .count()
}

async fn kv_script(store: &impl KvStore) -> Vec<String> {
    let entry = |name: &str, value: Bytes| KvEntry {
        key: key(name),
        value,
        ttl: MINUTE,
    };
    vec![
        format!(
            "{:?}",
            store.set(&key("a"), Bytes::from_static(b"1"), MINUTE).await
        ),
        format!("{:?}", store.get(&key("a")).await),
        format!(
            "{:?}",
            store.get_many(&[key("a"), key("b"), key("a")]).await
        ),
        format!(
            "{:?}",
            store
                .set_many(&[entry("b", versioned(0)), entry("c", versioned(0))])
                .await
        ),
        format!("{:?}", store.delete(&[key("b"), key("z")]).await),
        format!(
            "{:?}",
            store
                .set_if_newer(&[entry("v", versioned(2))], VersionAt::new(0))
                .await
        ),
        format!(
            "{:?}",
            store
                .set_if_newer(&[entry("v", versioned(1))], VersionAt::new(0))
                .await
        ),
        format!(
            "{:?}",
            store
                .set_if_newer(
                    &[entry("v", Bytes::from_static(b"short"))],
                    VersionAt::new(0)
                )
                .await
        ),
        format!("{:?}", store.delete_if_eq(&key("a"), b"other").await),
        format!("{:?}", store.delete_if_eq(&key("a"), b"1").await),
        format!(
            "{:?}",
            store.get_many(&[key("a"), key("c"), key("v")]).await
        ),
        format!(
            "{:?}",
            store
                .set(&key("a"), Bytes::from_static(b"1"), Duration::ZERO)
                .await
        ),
    ]
}

async fn bus_script(bus: &impl InvalidationBus) -> Vec<String> {
    let channel = key("bus");
    let mut subscription = bus.subscribe(&channel).await.unwrap();
    let mut answers = Vec::new();
    for message in [&b"one"[..], b"two", b"three"] {
        answers.push(format!(
            "{:?}",
            bus.publish(&channel, Bytes::copy_from_slice(message)).await
        ));
    }
    let too_large = Bytes::from(vec![0; MemoryBus::MAX_MESSAGE_LEN + 1]);
    answers.push(format!("{:?}", bus.publish(&channel, too_large).await));
    answers.push(format!("{:?}", events(&mut subscription).await));
    answers
}

async fn lease_script(store: &impl LeaseStore) -> Vec<String> {
    let (a, b) = (key("op-a"), key("op-b"));
    let token = match store
        .begin(&a, b"first", MINUTE, BeginId::random())
        .await
        .unwrap()
    {
        Begin::Acquired { token, .. } => token,
        other => panic!("{other:?}"),
    };
    vec![
        format!("{token:?}"),
        format!(
            "{:?}",
            store.begin(&a, b"second", MINUTE, BeginId::random()).await
        ),
        format!("{:?}", store.extend(&a, token, HOUR).await),
        format!(
            "{:?}",
            store
                .complete(&a, token, Bytes::from_static(b"done"), HOUR)
                .await
        ),
        format!(
            "{:?}",
            store.begin(&a, b"first", MINUTE, BeginId::random()).await
        ),
        format!(
            "{:?}",
            store
                .complete(&a, FencingToken(token.0 + 9), Bytes::new(), HOUR)
                .await
        ),
        format!(
            "{:?}",
            store.begin(&b, b"other", MINUTE, BeginId::random()).await
        ),
        format!("{:?}", store.release(&b, token).await),
        format!("{:?}", store.begin_completes_at_once()),
    ]
}

async fn rate_script(store: &impl RateStore) -> Vec<String> {
    let gcra = Gcra {
        emission_interval: Duration::from_millis(100),
        burst: 3,
    };
    let cells = [(key("cell-a"), gcra), (key("cell-b"), ONE_A_MINUTE)];
    vec![
        format!("{:?}", store.apply(&key("cell-a"), gcra, 2).await),
        format!("{:?}", store.apply_all(&cells, 1).await),
        format!("{:?}", store.apply_all(&cells, 1).await),
        format!("{:?}", store.apply(&key("cell-a"), gcra, 1).await),
        format!("{:?}", store.apply(&key("cell-a"), gcra, 4).await),
        format!("{:?}", store.apply_all(&[], 1).await),
    ]
}

async fn migration_script(store: &impl MigrationStore) -> Vec<String> {
    let m = key("m");
    let next = MigrationRecord { phase: 1, ..RECORD };
    vec![
        format!("{:?}", store.load(&m).await),
        format!("{:?}", store.create(&m, RECORD).await),
        format!("{:?}", store.create(&m, next).await),
        format!("{:?}", store.transition(&m, RECORD, 1).await),
        format!("{:?}", store.transition(&m, RECORD, 2).await),
        format!("{:?}", store.acknowledge(&m, "node-1", 1, MINUTE).await),
        format!("{:?}", store.acknowledge(&m, "node-2", 0, MINUTE).await),
        format!("{:?}", store.lagging(&m, 1).await),
        format!("{:?}", store.lagging(&m, 2).await),
        format!("{:?}", store.remove(&m).await),
        format!("{:?}", store.load(&m).await),
    ]
}

/// Off (here: after a run that failed everything), every method of every wrapper answers what
/// the inner store answers, errors included.
#[tokio::test(start_paused = true)]
async fn off_every_wrapper_answers_what_its_inner_store_answers() {
    let experiment = experiment();
    experiment
        .start(ExperimentConfig::new(MINUTE).fault(1.0).loss(1.0))
        .unwrap();
    experiment.stop();

    let kv = kv_script(&MemoryKvStore::new()).await;
    assert!(kv.contains(&"Ok(Some(b\"1\"))".to_owned()), "{kv:?}");
    assert_eq!(
        kv_script(&ChaosKvStore::new(MemoryKvStore::new(), experiment.clone())).await,
        kv
    );
    let bus = bus_script(&MemoryBus::new()).await;
    assert!(bus.last().unwrap().contains("three"), "{bus:?}");
    assert_eq!(
        bus_script(&ChaosBus::new(MemoryBus::new(), experiment.clone())).await,
        bus
    );
    let leases = lease_script(&MemoryLeaseStore::new()).await;
    assert!(
        leases.iter().any(|answer| answer.contains("Completed")),
        "{leases:?}"
    );
    assert_eq!(
        lease_script(&ChaosLeaseStore::new(
            MemoryLeaseStore::new(),
            experiment.clone()
        ))
        .await,
        leases
    );
    let rates = rate_script(&MemoryRateStore::new()).await;
    assert!(
        rates.iter().any(|answer| answer.contains("allowed: false")),
        "{rates:?}"
    );
    assert_eq!(
        rate_script(&ChaosRateStore::new(
            MemoryRateStore::new(),
            experiment.clone()
        ))
        .await,
        rates
    );
    let migrations = migration_script(&MemoryMigrationStore::new()).await;
    assert!(migrations.contains(&"Ok(1)".to_owned()), "{migrations:?}");
    assert_eq!(
        migration_script(&ChaosMigrationStore::new(
            MemoryMigrationStore::new(),
            experiment.clone()
        ))
        .await,
        migrations
    );
    assert_eq!(experiment.status().running, None);
}

/// Off, a wrapped call is the inner store's own future: it allocates nothing the inner call
/// does not (counted on this thread), and is no larger than the inner future but for a tag.
#[test]
fn off_a_wrapped_call_is_the_inner_call() {
    let experiment = experiment();
    let (inner_kv, inner_rates) = (MemoryKvStore::new(), MemoryRateStore::new());
    let kv = ChaosKvStore::new(MemoryKvStore::new(), experiment.clone());
    let rates = ChaosRateStore::new(MemoryRateStore::new(), experiment.clone());
    let (a, cell) = (key("a"), key("cell"));
    let gcra = Gcra {
        emission_interval: Duration::from_nanos(1),
        burst: u32::MAX,
    };
    // Each pair of stores first makes its one-time allocations (a shard's map, a cell).
    let calls = |kv: &dyn Fn() -> bool, rates: &dyn Fn() -> bool| {
        assert!(kv() && rates());
        allocation_counter::measure(|| {
            for _ in 0..1_000 {
                assert!(kv() && rates());
            }
        })
        .count_total
    };
    let inner = calls(
        &|| inner_kv.get(&a).now_or_never().unwrap().is_ok(),
        &|| {
            inner_rates
                .apply(&cell, gcra, 1)
                .now_or_never()
                .unwrap()
                .is_ok()
        },
    );
    let wrapped = calls(&|| kv.get(&a).now_or_never().unwrap().is_ok(), &|| {
        rates.apply(&cell, gcra, 1).now_or_never().unwrap().is_ok()
    });
    assert_eq!(wrapped, inner);
    assert!(
        size_of_val(&kv.get(&a)) <= size_of_val(&inner_kv.get(&a)) + size_of::<usize>(),
        "{} bytes for {}",
        size_of_val(&kv.get(&a)),
        size_of_val(&inner_kv.get(&a))
    );
}

/// A failing backend: every call of every wrapper fails with the configured kind of error,
/// and none reaches its store.
#[tokio::test(start_paused = true)]
async fn a_fault_fails_every_call_with_its_kind_without_reaching_the_store() {
    let experiment = experiment();
    let (stores, mut direct) = Stores::new(&experiment).await;
    for kind in [
        FaultKind::Timeout,
        FaultKind::Connection,
        FaultKind::Unavailable,
        FaultKind::Command,
    ] {
        experiment
            .start(ExperimentConfig::new(MINUTE).fault_of(1.0, kind))
            .unwrap();
        for (name, answer) in stores.every_method().await {
            let error = answer.expect_err(name);
            assert_eq!(error.kind(), kind.backend_kind(), "{name}");
            assert_eq!(
                error.detail(),
                Some("injected by chaos experiment `backend`"),
                "{name}"
            );
        }
    }
    experiment.stop();

    assert!(stores.kv.is_empty(), "a failed set wrote nothing");
    assert_eq!(
        delivered(&mut direct).await,
        0,
        "a failed publish sent nothing"
    );
    assert!(
        matches!(
            stores
                .leases
                .begin(&key("op"), b"fingerprint", MINUTE, BeginId::random())
                .await,
            Ok(Begin::Acquired {
                took_over: false,
                ..
            })
        ),
        "a failed begin took no lease"
    );
    assert!(
        stores
            .rates
            .apply(&key("cell"), ONE_A_MINUTE, 1)
            .await
            .unwrap()
            .allowed,
        "a failed apply charged nothing"
    );
    assert_eq!(
        stores.migrations.load(&key("m")).await.unwrap(),
        None,
        "a failed create stored nothing"
    );
}

/// A store that counts its calls as they are made, before their futures are polled (as a
/// store that queues its command at once would).
#[derive(Clone, Debug, Default)]
struct Eager(Arc<AtomicUsize>);

impl Eager {
    fn made(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    fn make<T>(&self, answer: T) -> std::future::Ready<Result<T, BackendError>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(answer))
    }
}

impl KvStore for Eager {
    fn get(&self, _: &Key) -> impl Future<Output = Result<Option<Bytes>, BackendError>> + Send {
        self.make(None)
    }

    fn get_many(
        &self,
        keys: &[Key],
    ) -> impl Future<Output = Result<Vec<Option<Bytes>>, BackendError>> + Send {
        self.make(vec![None; keys.len()])
    }

    fn set(
        &self,
        _: &Key,
        _: Bytes,
        _: Duration,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        self.make(())
    }

    fn set_many(&self, _: &[KvEntry]) -> impl Future<Output = Result<(), BackendError>> + Send {
        self.make(())
    }

    fn delete(&self, _: &[Key]) -> impl Future<Output = Result<u64, BackendError>> + Send {
        self.make(0)
    }
}

/// The inner call is made only once the injection lets it through: never for a fault or a
/// call ended while held, and after the delay for a delayed one.
#[tokio::test(start_paused = true)]
async fn the_inner_call_is_made_only_once_the_injection_lets_it_through() {
    let experiment = experiment();
    let inner = Eager::default();
    let store = ChaosKvStore::new(inner.clone(), experiment.clone());
    let a = key("a");
    drop(store.get(&a));
    assert_eq!(inner.made(), 1, "off: the inner call, made at once");

    experiment
        .start(ExperimentConfig::new(MINUTE).fault(1.0))
        .unwrap();
    assert!(store.get(&a).await.is_err());
    experiment
        .start(ExperimentConfig::new(HOUR).abort(1.0))
        .unwrap();
    assert!(timeout(MINUTE, store.get(&a)).await.is_err());
    assert_eq!(inner.made(), 1);

    let delay = Duration::from_millis(50);
    experiment
        .start(ExperimentConfig::new(MINUTE).latency(1.0, Delay::Fixed(delay)))
        .unwrap();
    let mut call = std::pin::pin!(store.get(&a));
    assert!(timeout(delay / 2, &mut call).await.is_err());
    assert_eq!(inner.made(), 1, "not during the delay");
    assert_eq!(call.await.unwrap(), None);
    assert_eq!(inner.made(), 2);
}

/// A slow backend: each wrapper's call takes exactly the injected delay, then is the real call.
#[tokio::test(start_paused = true)]
async fn each_wrapper_delays_its_calls_by_exactly_the_injected_latency() {
    let experiment = experiment();
    let (stores, _direct) = Stores::new(&experiment).await;
    let delay = Duration::from_millis(50);
    experiment
        .start(ExperimentConfig::new(MINUTE).latency(1.0, Delay::Fixed(delay)))
        .unwrap();
    for (name, call) in stores.calls() {
        let started = Instant::now();
        assert_eq!(call.await.unwrap(), name);
        assert_eq!(started.elapsed(), delay, "{name}");
    }
    // The methods a trait implements by default run the inner store's own implementation,
    // delayed once (the default would make two delayed calls).
    let started = Instant::now();
    let entries = [KvEntry {
        key: key("a"),
        value: versioned(3),
        ttl: MINUTE,
    }];
    assert_eq!(
        stores
            .chaos_kv
            .set_if_newer(&entries, VersionAt::new(0))
            .await
            .unwrap(),
        1
    );
    assert_eq!(started.elapsed(), delay);
    assert!(
        stores
            .chaos_kv
            .delete_if_eq(&key("a"), &versioned(3))
            .await
            .unwrap()
    );
    assert_eq!(started.elapsed(), 2 * delay);
    assert!(
        stores.chaos_leases.begin_completes_at_once(),
        "the memory store's answer, not the trait's default"
    );
}

/// A stalled backend: every call hangs until the caller's timeout ends it, without reaching
/// the store; a held call reaches its store once the experiment stops.
#[tokio::test(start_paused = true)]
async fn each_wrapper_holds_aborted_calls_until_the_experiment_stops() {
    let experiment = experiment();
    let (stores, mut direct) = Stores::new(&experiment).await;
    experiment
        .start(ExperimentConfig::new(HOUR).abort(1.0))
        .unwrap();
    for (name, call) in stores.calls() {
        assert!(
            timeout(Duration::from_secs(1), call).await.is_err(),
            "{name} answered"
        );
    }
    assert!(stores.kv.is_empty());
    assert_eq!(delivered(&mut direct).await, 0);
    assert_eq!(stores.migrations.load(&key("m")).await.unwrap(), None);

    let held: Vec<_> = stores
        .calls()
        .into_iter()
        .map(|(name, call)| (name, tokio::spawn(call)))
        .collect();
    tokio::time::sleep(MINUTE).await;
    assert!(held.iter().all(|(_, task)| !task.is_finished()));
    experiment.stop();
    for (name, task) in held {
        // What a fresh store answers: the timed-out calls took no lease and charged no cell.
        assert_eq!(task.await.unwrap().unwrap(), name);
    }
    assert_eq!(
        stores.kv.get(&key("a")).await.unwrap(),
        Some(Bytes::from_static(b"1"))
    );
    assert_eq!(delivered(&mut direct).await, 1);
    assert_eq!(
        stores.migrations.load(&key("m")).await.unwrap(),
        Some(RECORD)
    );
}

/// Total loss: a subscriber through the wrapper gets none of the messages, and no `Lost`
/// event either (the loss is silent); a subscriber on the bus itself gets them all.
#[tokio::test(start_paused = true)]
async fn with_total_loss_a_subscriber_through_the_wrapper_silently_gets_nothing() {
    let experiment = experiment();
    let bus = MemoryBus::new();
    let chaotic = ChaosBus::new(bus.clone(), experiment.clone());
    let channel = key("channel");
    let mut direct = bus.subscribe(&channel).await.unwrap();
    let mut through = chaotic.subscribe(&channel).await.unwrap();
    experiment
        .start(ExperimentConfig::new(MINUTE).loss(1.0))
        .unwrap();
    for n in 0..100u32 {
        chaotic
            .publish(&channel, Bytes::from(n.to_le_bytes().to_vec()))
            .await
            .unwrap();
    }
    assert_eq!(delivered(&mut direct).await, 100);
    assert_eq!(events(&mut through).await, [BusEvent::Live]);
    assert_eq!(
        experiment.status().running.unwrap().affected,
        100,
        "one loss per message, none for the publishes"
    );
}

/// Lost messages are lost at the rate asked: 0.3 of 10,000, within ±0.02. The share lost has a
/// standard deviation of √(0.3 × 0.7 / 10,000) ≈ 0.0046, so the tolerance is about 4.4 of
/// them; the experiment is seeded, so the draws are the same on every run anyway.
#[tokio::test(start_paused = true)]
async fn a_bus_loses_messages_silently_at_the_rate_asked() {
    let experiment = experiment();
    let bus = MemoryBus::with_capacity(20_000);
    let chaotic = ChaosBus::new(bus.clone(), experiment.clone());
    let channel = key("channel");
    let mut direct = bus.subscribe(&channel).await.unwrap();
    let mut through = chaotic.subscribe(&channel).await.unwrap();
    experiment
        .start(ExperimentConfig::new(MINUTE).loss(0.3))
        .unwrap();
    for n in 0..10_000u32 {
        chaotic
            .publish(&channel, Bytes::from(n.to_le_bytes().to_vec()))
            .await
            .unwrap();
    }
    assert_eq!(delivered(&mut direct).await, 10_000);
    let events = events(&mut through).await;
    assert!(
        !events
            .iter()
            .any(|event| matches!(event, BusEvent::Lost(_))),
        "silently"
    );
    let lost = 10_000 - (events.len() - 1);
    let share = lost as f64 / 10_000.0;
    assert!((share - 0.3).abs() <= 0.02, "{lost} lost");
    experiment.stop();
    bus.publish(&channel, Bytes::from_static(b"after"))
        .await
        .unwrap();
    assert_eq!(
        delivered(&mut through).await,
        1,
        "nothing is lost once stopped"
    );
}

/// Only the keys picked are affected, and only they are seen.
#[tokio::test]
async fn the_key_predicate_limits_the_experiment_to_the_keys_it_picks() {
    let experiment = experiment();
    let hot = |key: &Key| key.local().starts_with(b"hot:");
    let store = ChaosKvStore::new(MemoryKvStore::new(), experiment.clone()).when(hot);
    let rates = ChaosRateStore::new(MemoryRateStore::new(), experiment.clone()).when(hot);
    experiment
        .start(ExperimentConfig::new(MINUTE).fault(1.0))
        .unwrap();
    for n in 0..10 {
        assert!(store.get(&key(&format!("hot:{n}"))).await.is_err());
        assert!(store.get(&key(&format!("cold:{n}"))).await.is_ok());
        assert!(
            store
                .get_many(&[key("cold:a"), key(&format!("hot:{n}"))])
                .await
                .is_err(),
            "a call on several keys is seen if any of them is picked"
        );
        assert!(
            store
                .get_many(&[key("cold:a"), key("cold:b")])
                .await
                .is_ok()
        );
        let cells = [(key("cold:a"), ONE_A_MINUTE), (key("hot:a"), ONE_A_MINUTE)];
        assert!(rates.apply_all(&cells, 1).await.is_err());
        assert!(
            rates
                .apply(&key(&format!("cold:{n}")), ONE_A_MINUTE, 1)
                .await
                .is_ok()
        );
    }
    let run = experiment.status().running.unwrap();
    assert_eq!((run.seen, run.affected), (30, 30));
}

/// On a bus, the predicate picks channels: a subscription on a channel it does not pick loses
/// nothing, and its messages are not seen.
#[tokio::test(start_paused = true)]
async fn the_key_predicate_picks_the_bus_channels_that_lose_messages() {
    let experiment = experiment();
    let bus = MemoryBus::new();
    let chaotic =
        ChaosBus::new(bus.clone(), experiment.clone()).when(|key: &Key| key.local() == b"lossy");
    let (lossy, kept) = (key("lossy"), key("kept"));
    let mut lossy_subscription = chaotic.subscribe(&lossy).await.unwrap();
    let mut kept_subscription = chaotic.subscribe(&kept).await.unwrap();
    experiment
        .start(ExperimentConfig::new(MINUTE).loss(1.0))
        .unwrap();
    for _ in 0..10 {
        bus.publish(&lossy, Bytes::from_static(b"x")).await.unwrap();
        bus.publish(&kept, Bytes::from_static(b"x")).await.unwrap();
    }
    assert_eq!(delivered(&mut lossy_subscription).await, 0);
    assert_eq!(delivered(&mut kept_subscription).await, 10);
    assert_eq!(experiment.status().running.unwrap().seen, 10);
}

/// What a user would run: a cache whose L2 is wrapped. While every L2 call fails, and then
/// while every L2 call stalls, each caller still gets its value (from the loader): a caller is
/// never failed by L2.
#[tokio::test(start_paused = true)]
async fn a_cache_answers_every_caller_while_its_l2_fails_or_stalls() {
    let experiment = experiment();
    let store = MemoryKvStore::new();
    let loads = Arc::new(AtomicUsize::new(0));
    let loader = || {
        let loads = Arc::clone(&loads);
        move |key: String| {
            loads.fetch_add(1, Ordering::Relaxed);
            std::future::ready(Ok::<_, std::io::Error>(Some(format!("loaded {key}"))))
        }
    };
    for (config, failure) in [
        (ExperimentConfig::new(HOUR).fault(1.0), "failing"),
        (ExperimentConfig::new(HOUR).abort(1.0), "stalled"),
    ] {
        // A fresh cache each time: empty L1, L2 breaker closed.
        let cache = Cache::<String, String>::builder()
            .l2(
                ChaosKvStore::new(store.clone(), experiment.clone()),
                Namespace::new("chaos-test:cache").unwrap(),
            )
            .build()
            .unwrap();
        experiment.start(config).unwrap();
        loads.store(0, Ordering::Relaxed);
        for n in 0..10 {
            let key = format!("product:{n}");
            let value = cache.get_or_load(&key, loader()).await;
            assert_eq!(
                value.unwrap(),
                Some(format!("loaded {key}")),
                "{failure} L2"
            );
            assert_eq!(cache.get(&format!("absent:{n}")).await.unwrap(), None);
        }
        assert_eq!(loads.load(Ordering::Relaxed), 10, "{failure} L2");
        assert!(
            experiment.status().running.unwrap().affected > 0,
            "the {failure} L2 was called"
        );
        assert!(store.is_empty(), "no write reached the {failure} L2");
        experiment.stop();
    }
}
