//! Configuration reloaded while the parts serve traffic: nothing is dropped or leaked, an
//! invalid configuration changes nothing, and a watched file is applied when it changes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use headroom::Headroom;
use headroom::breaker::CircuitBreaker;
use headroom::breaker::config::{BreakerConfig, WindowConfig};
use headroom::cache::TtlConfig;
use headroom::limit::rate::{Quota, RateLimit, TierConfig};
use headroom::limit::{
    Bulkhead, BulkheadConfig, LoadShedConfig, LoadShedder, Overflow, Priority, QueueConfig, Reason,
    WorkQueue,
};
use headroom::reload::{Reloader, RuntimeConfig};
use headroom_core::ManualClock;

/// More than the largest limit: the bulkhead, not the workers, bounds what runs at once.
const WORKERS: usize = 40;
const ROUNDS: usize = 200;

/// Small limits, or large ones: reloads alternate between them under load.
fn config(small: bool) -> RuntimeConfig {
    fn pick<T>(small: bool, a: T, b: T) -> T {
        if small { a } else { b }
    }
    let mut config = RuntimeConfig::default();
    config.bulkheads.insert(
        "db".into(),
        BulkheadConfig {
            max_concurrent: pick(small, 2, 32),
            max_queued: 64,
            max_wait: Duration::from_secs(30),
            adaptive: None,
        },
    );
    config.queues.insert(
        "jobs".into(),
        QueueConfig {
            capacity: pick(small, 2, 64),
            overflow: Overflow::Wait {
                timeout: Duration::from_secs(30),
            },
            ..QueueConfig::default()
        },
    );
    config.shedders.insert(
        "api".into(),
        LoadShedConfig {
            sheddable_at: pick(small, 0.5, 0.8),
            ..LoadShedConfig::default()
        },
    );
    config.rate_limits.insert(
        "orders".into(),
        TierConfig::new().tier(
            "standard",
            Quota::per_second(pick(small, 1_000, 5_000)).unwrap(),
        ),
    );
    let mut breaker = BreakerConfig::default();
    breaker.failure_ratio = pick(small, 0.6, 0.9);
    config.breakers.insert("gateway".into(), breaker);
    config.caches.insert(
        "products".into(),
        TtlConfig {
            ttl: Duration::from_millis(pick(small, 5, 60_000)),
            soft_ttl: None,
            ttl_jitter: Duration::ZERO,
            negative_ttl: None,
        },
    );
    config
}

/// Configurations a reload must refuse whole, one bad setting each.
fn invalid(round: usize) -> RuntimeConfig {
    let mut config = config(round.is_multiple_of(2));
    match round % 6 {
        0 => config.bulkheads.get_mut("db").unwrap().max_concurrent = 0,
        1 => config.queues.get_mut("jobs").unwrap().capacity = 0,
        2 => config.shedders.get_mut("api").unwrap().sheddable_at = 1.5,
        3 => {
            config.breakers.get_mut("gateway").unwrap().window = WindowConfig::Count { size: 5 };
        }
        4 => {
            config.caches.get_mut("products").unwrap().ttl = Duration::ZERO;
        }
        _ => {
            config.rate_limits.insert(
                "orders".into(),
                TierConfig::new().tier("no spaces", Quota::per_second(1).unwrap()),
            );
        }
    }
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_drops_and_leaks_nothing() {
    let headroom = Headroom::builder().namespace("reload").memory().unwrap();
    let db = Bulkhead::builder("db")
        .max_concurrent(8)
        .max_queued(64)
        .max_wait(Duration::from_secs(30))
        .build()
        .unwrap();
    let api = LoadShedder::builder(Bulkhead::builder("api").max_concurrent(64).build().unwrap())
        .build()
        .unwrap();
    let jobs: WorkQueue<u64> = WorkQueue::builder("jobs")
        .capacity(16)
        .overflow(Overflow::Wait {
            timeout: Duration::from_secs(30),
        })
        .build()
        .unwrap();
    let orders = headroom
        .rate_limiter(
            "orders",
            TierConfig::new().tier("standard", Quota::per_second(1_000).unwrap()),
        )
        .unwrap()
        .build()
        .unwrap();
    let gateway: CircuitBreaker<std::io::Error> =
        headroom.circuit_breaker("gateway").build().unwrap();
    let products = headroom
        .cache::<u64, u64>("products")
        .unwrap()
        .build()
        .unwrap();
    let reloader = Reloader::new()
        .bulkhead(&db)
        .shedder(&api)
        .queue(&jobs)
        .rate_limiter(&orders)
        .breaker(&gateway)
        .cache(&products);

    let in_db = Arc::new(AtomicUsize::new(0));
    let most_in_db = Arc::new(AtomicUsize::new(0));
    let pushed = Arc::new(AtomicU64::new(0));
    let popped = Arc::new(AtomicU64::new(0));
    // Every job pushed is popped: the consumer runs until the queue is closed and drained.
    let consumer = {
        let (jobs, popped) = (jobs.clone(), popped.clone());
        tokio::spawn(async move {
            while jobs.pop().await.is_some() {
                popped.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        })
    };
    let workers: Vec<_> = (0..WORKERS)
        .map(|worker| {
            let (db, api, jobs, orders, gateway, products) = (
                db.clone(),
                api.clone(),
                jobs.clone(),
                orders.clone(),
                gateway.clone(),
                products.clone(),
            );
            let (in_db, most_in_db, pushed) = (in_db.clone(), most_in_db.clone(), pushed.clone());
            tokio::spawn(async move {
                for round in 0..ROUNDS {
                    {
                        let _permit = db.acquire().await.expect("waits rather than fails");
                        let now = in_db.fetch_add(1, Ordering::SeqCst) + 1;
                        most_in_db.fetch_max(now, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        in_db.fetch_sub(1, Ordering::SeqCst);
                    }
                    if let Ok(_permit) = api.acquire(Priority::Default).await {
                        tokio::task::yield_now().await;
                    }
                    jobs.push((worker * ROUNDS + round) as u64)
                        .await
                        .expect("waits for room rather than fails");
                    pushed.fetch_add(1, Ordering::Relaxed);
                    let _ = orders.check("standard", "acme", 1).await;
                    let answer = gateway
                        .call(async { Ok::<_, std::io::Error>(round) })
                        .await
                        .unwrap();
                    assert_eq!(answer, round);
                    let key = (round % 16) as u64;
                    let loaded = products
                        .get_or_load(&key, move |key| async move {
                            tokio::task::yield_now().await;
                            Ok::<_, std::io::Error>(Some(key * 10))
                        })
                        .await
                        .unwrap();
                    assert_eq!(loaded, Some(key * 10));
                }
            })
        })
        .collect();

    // Meanwhile, for as long as the workers run: small and large limits in turn, and invalid
    // configurations in between.
    let mut refused = 0;
    let mut under_load = 0;
    // What every part has in force, to compare after each refused reload.
    let in_force = || {
        (
            db.limit(),
            db.max_queued(),
            jobs.config(),
            api.config(),
            orders.quotas("standard"),
            gateway.config(),
            products.ttls(),
        )
    };
    let mut settings_in_force = in_force();
    let mut round = 0;
    while !workers.iter().all(tokio::task::JoinHandle::is_finished) {
        assert!(round < 1_000_000, "the workers never finished");
        if db.in_use() + db.queued() + jobs.len() > 0 {
            under_load += 1;
        }
        if round % 3 == 2 {
            let error = reloader.apply(&invalid(round)).unwrap_err();
            assert!(!error.reason().is_empty());
            assert!(
                in_force() == settings_in_force,
                "a refused reload changed nothing"
            );
            refused += 1;
        } else {
            reloader.apply(&config(round.is_multiple_of(2))).unwrap();
            settings_in_force = in_force();
        }
        round += 1;
        tokio::task::yield_now().await;
    }
    for worker in workers {
        worker.await.unwrap();
    }
    jobs.close();
    consumer.await.unwrap();
    assert!(refused > 0);
    assert!(
        under_load > 0,
        "no reload met a held permit or a queued job"
    );

    // The last settings: every permit, queue place and load is accounted for.
    let mut last = config(true);
    last.bulkheads.get_mut("db").unwrap().max_concurrent = 5;
    last.queues.get_mut("jobs").unwrap().capacity = 3;
    reloader.apply(&last).unwrap();
    assert_eq!((db.in_use(), db.queued()), (0, 0));
    let held: Vec<_> = (0..5)
        .map(|_| db.try_acquire().expect("a permit"))
        .collect();
    assert_eq!(db.try_acquire().unwrap_err().reason(), Reason::QueueFull);
    drop(held);
    assert!(
        most_in_db.load(Ordering::SeqCst) <= 32,
        "never more in flight than the largest limit in force"
    );
    assert_eq!(
        popped.load(Ordering::Relaxed),
        pushed.load(Ordering::Relaxed)
    );
    assert_eq!(pushed.load(Ordering::Relaxed), (WORKERS * ROUNDS) as u64);
    assert_eq!(jobs.len(), 0);
    assert_eq!(products.loads_in_flight(), 0);
    assert_eq!(api.bulkhead().in_use(), 0);
    assert_eq!(jobs.config().capacity, 3);
    assert_eq!(gateway.config().failure_ratio, 0.6);
    assert_eq!(products.ttls().ttl, Duration::from_millis(5));
}

#[test]
fn two_parts_of_one_kind_and_name_are_refused() {
    let a = Bulkhead::builder("db").max_concurrent(8).build().unwrap();
    let b = Bulkhead::builder("db").max_concurrent(4).build().unwrap();
    let reloader = Reloader::new().bulkhead(&a).bulkhead(&b);
    let error = reloader.apply(&RuntimeConfig::default()).unwrap_err();
    assert_eq!((error.kind(), error.name()), ("bulkhead", "db"));
}

#[test]
fn a_part_the_reloader_does_not_know_is_refused_and_nothing_changes() {
    let db = Bulkhead::builder("db").max_concurrent(8).build().unwrap();
    let reloader = Reloader::new().bulkhead(&db);
    let mut config = RuntimeConfig::default();
    config.bulkheads.insert(
        "db".into(),
        BulkheadConfig {
            max_concurrent: 16,
            ..BulkheadConfig::default()
        },
    );
    config
        .bulkheads
        .insert("bd".into(), BulkheadConfig::default());
    let error = reloader.apply(&config).unwrap_err();
    assert_eq!(
        error.to_string(),
        "bulkhead `bd`: no such part is registered"
    );
    assert_eq!(db.limit(), 8);
}

#[tokio::test]
async fn a_watched_file_is_applied_when_it_changes_and_a_bad_version_changes_nothing() {
    let dir = std::env::temp_dir().join(format!("headroom-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("runtime.json");
    let write = |limit: &str| {
        let json = format!(r#"{{ "bulkheads": {{ "db": {{ "max_concurrent": {limit} }} }} }}"#);
        std::fs::write(&path, json).unwrap();
    };
    write("12");
    let db = Bulkhead::builder("db").max_concurrent(8).build().unwrap();
    let time = ManualClock::new();
    let every = Duration::from_secs(5);
    let watch = tokio::spawn(Reloader::new().bulkhead(&db).watch(
        path.clone(),
        every,
        time.clock(),
        |bytes| serde_json::from_slice::<RuntimeConfig>(bytes),
    ));
    // Lets the watcher run until it waits for the clock again.
    async fn settle() {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }
    settle().await;
    assert_eq!(db.limit(), 12, "the first read is applied at once");

    write("20");
    settle().await;
    assert_eq!(db.limit(), 12, "not read again before its period");
    time.advance(every);
    settle().await;
    assert_eq!(db.limit(), 20);

    for bad in ["\"many\"", "0", "-1"] {
        write(bad);
        time.advance(every);
        settle().await;
        assert_eq!(db.limit(), 20, "{bad}: the settings in force stay");
    }
    write("24");
    time.advance(every);
    settle().await;
    assert_eq!(db.limit(), 24);

    // The file goes away for a while: the settings in force stay.
    std::fs::remove_file(&path).unwrap();
    time.advance(every);
    settle().await;
    assert_eq!(db.limit(), 24);
    write("28");
    time.advance(every);
    settle().await;
    assert_eq!(db.limit(), 28);
    watch.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The example file in docs/operations.md loads.
#[test]
fn the_documented_example_file_loads() {
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/operations.md"),
    )
    .unwrap();
    let section = docs.split("## Reloading configuration").nth(1).unwrap();
    let json = section
        .split("```json\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .unwrap();
    let config: RuntimeConfig = serde_json::from_str(json).unwrap();
    assert_eq!(config.bulkheads["catalogue-db"].max_concurrent, 32);
    assert_eq!(config.caches["products"].ttl, Duration::from_secs(600));
    assert_eq!(config.breakers["payment-gateway"].failure_ratio, 0.3);
}

/// A setting that only the part itself can judge (a rate tier whose name does not fit the
/// limiter's namespace in the store) is refused before any part changes.
#[tokio::test]
async fn a_setting_refused_by_its_part_leaves_every_part_unchanged() {
    let headroom = Headroom::builder()
        .namespace("n".repeat(60))
        .memory()
        .unwrap();
    let orders = headroom
        .rate_limiter(
            "orders",
            TierConfig::new().tier("standard", Quota::per_second(10).unwrap()),
        )
        .unwrap()
        .build()
        .unwrap();
    let db = Bulkhead::builder("db").max_concurrent(8).build().unwrap();
    let reloader = Reloader::new().bulkhead(&db).rate_limiter(&orders);
    let mut config = RuntimeConfig::default();
    config.bulkheads.insert(
        "db".into(),
        BulkheadConfig {
            max_concurrent: 16,
            ..BulkheadConfig::default()
        },
    );
    config.rate_limits.insert(
        "orders".into(),
        TierConfig::new().tier("t".repeat(64), Quota::per_second(10).unwrap()),
    );
    let error = reloader.apply(&config).unwrap_err();
    assert_eq!(error.part(), "rate limiter `orders`");
    assert_eq!(db.limit(), 8, "nothing changed");
    assert!(orders.quotas("standard").is_some());
}

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// The config of a reload naming `db`'s bulkhead and shedder entries, either or both.
fn db_config(bulkhead: Option<BulkheadConfig>, shedder: Option<LoadShedConfig>) -> RuntimeConfig {
    let mut config = RuntimeConfig::default();
    if let Some(bulkhead) = bulkhead {
        config.bulkheads.insert("db".into(), bulkhead);
    }
    if let Some(shedder) = shedder {
        config.shedders.insert("db".into(), shedder);
    }
    config
}

/// A shedder's queue-delay target is judged against the bulkhead as the reload leaves it: an
/// entry that takes the bulkhead's queue away while giving its shedder a target is refused
/// before the bulkhead changes.
#[test]
fn a_shedder_target_the_reloaded_bulkhead_cannot_reach_changes_nothing() {
    let db = Bulkhead::builder("db")
        .max_concurrent(8)
        .max_queued(16)
        .max_wait(ms(100))
        .build()
        .unwrap();
    let shedder = LoadShedder::builder(db.clone()).build().unwrap();
    let reloader = Reloader::new().bulkhead(&db).shedder(&shedder);
    // `max_queued` left out: the bulkhead would queue nobody, so no wait reaches the target.
    let config = db_config(
        Some(BulkheadConfig {
            max_concurrent: 32,
            ..BulkheadConfig::default()
        }),
        Some(LoadShedConfig {
            queue_delay_target: Some(ms(200)),
            ..LoadShedConfig::default()
        }),
    );
    let error = reloader.apply(&config).unwrap_err();
    assert_eq!(error.part(), "shedder `db`");
    assert!(error.reason().contains("queue_delay_target"), "{error}");
    assert_eq!(
        (db.limit(), db.max_queued(), db.max_wait()),
        (8, 16, ms(100)),
        "the bulkhead is unchanged"
    );
    assert_eq!(shedder.config(), LoadShedConfig::default());
}

/// A bulkhead entry alone can put its shedder's target out of reach (no queue, or a shorter
/// `max_wait`): the shedder would never shed on queue delay again, so the reload is refused.
#[test]
fn a_bulkhead_reload_that_leaves_its_shedder_target_unreachable_is_refused() {
    let db = Bulkhead::builder("db")
        .max_concurrent(8)
        .max_queued(4)
        .max_wait(ms(100))
        .build()
        .unwrap();
    // The lowest threshold is 0.7: a 100 ms target needs waits of 70 ms.
    let shedder = LoadShedder::builder(db.clone())
        .queue_delay_target(ms(100))
        .build()
        .unwrap();
    let reloader = Reloader::new().bulkhead(&db).shedder(&shedder);
    for (case, entry) in [
        (
            "no queue",
            BulkheadConfig {
                max_concurrent: 2,
                ..BulkheadConfig::default()
            },
        ),
        (
            "a shorter wait",
            BulkheadConfig {
                max_concurrent: 2,
                max_queued: 4,
                max_wait: ms(50),
                adaptive: None,
            },
        ),
    ] {
        let error = reloader
            .apply(&db_config(Some(entry), None))
            .expect_err(case);
        assert_eq!(error.part(), "shedder `db`", "{case}");
        assert!(
            error.reason().contains("queue_delay_target"),
            "{case}: {error}"
        );
        assert!(error.reason().contains("bulkhead `db`"), "{case}: {error}");
        assert_eq!(
            (db.limit(), db.max_queued(), db.max_wait()),
            (8, 4, ms(100)),
            "{case}: the bulkhead is unchanged"
        );
    }
    // A wait that still reaches the target is taken.
    let reaching = BulkheadConfig {
        max_concurrent: 2,
        max_queued: 4,
        max_wait: ms(70),
        adaptive: None,
    };
    assert_eq!(reloader.apply(&db_config(Some(reaching), None)), Ok(()));
    assert_eq!((db.limit(), db.max_wait()), (2, ms(70)));
    assert_eq!(shedder.config().queue_delay_target, Some(ms(100)));
    // Set on the bulkhead itself, unchecked: a reload naming neither part leaves them as they
    // are rather than being refused for them.
    db.set_max_queued(0);
    assert_eq!(reloader.apply(&RuntimeConfig::default()), Ok(()));
}

/// A bulkhead and its shedder may change together whichever was registered first: given a
/// queue and a target at once, or losing both at once.
#[test]
fn a_bulkhead_and_its_shedder_change_together_in_either_registration_order() {
    for shedder_first in [true, false] {
        let db = Bulkhead::builder("db").max_concurrent(8).build().unwrap();
        let shedder = LoadShedder::builder(db.clone()).build().unwrap();
        let reloader = if shedder_first {
            Reloader::new().shedder(&shedder).bulkhead(&db)
        } else {
            Reloader::new().bulkhead(&db).shedder(&shedder)
        };
        let queued = db_config(
            Some(BulkheadConfig {
                max_concurrent: 8,
                max_queued: 16,
                max_wait: ms(1_000),
                adaptive: None,
            }),
            Some(LoadShedConfig {
                queue_delay_target: Some(ms(200)),
                ..LoadShedConfig::default()
            }),
        );
        assert_eq!(
            reloader.apply(&queued),
            Ok(()),
            "shedder first: {shedder_first}"
        );
        assert_eq!((db.max_queued(), db.max_wait()), (16, ms(1_000)));
        assert_eq!(shedder.config().queue_delay_target, Some(ms(200)));

        let unqueued = db_config(
            Some(BulkheadConfig {
                max_concurrent: 8,
                ..BulkheadConfig::default()
            }),
            Some(LoadShedConfig::default()),
        );
        assert_eq!(
            reloader.apply(&unqueued),
            Ok(()),
            "shedder first: {shedder_first}"
        );
        assert_eq!(db.max_queued(), 0);
        assert_eq!(shedder.config().queue_delay_target, None);
    }
}

/// A bulkhead entry changes the registered bulkhead of that name; a shedder guarding another
/// bulkhead that happens to share the name is judged against the one it guards.
#[test]
fn a_shedder_is_judged_against_the_bulkhead_it_guards() {
    let db = Bulkhead::builder("db").max_concurrent(8).build().unwrap();
    let other = Bulkhead::builder("db").max_concurrent(4).build().unwrap();
    let shedder = LoadShedder::builder(other.clone()).build().unwrap();
    let reloader = Reloader::new().bulkhead(&db).shedder(&shedder);
    let config = db_config(
        Some(BulkheadConfig {
            max_concurrent: 32,
            max_queued: 16,
            max_wait: ms(1_000),
            adaptive: None,
        }),
        Some(LoadShedConfig {
            queue_delay_target: Some(ms(200)),
            ..LoadShedConfig::default()
        }),
    );
    let error = reloader.apply(&config).unwrap_err();
    assert_eq!(error.part(), "shedder `db`");
    assert_eq!((db.limit(), db.max_queued()), (8, 0), "nothing changed");
    assert_eq!(other.max_queued(), 0);
}
