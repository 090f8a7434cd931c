//! The executor on real Redis, standalone and cluster: many executors sharing one store, and a
//! store that dies mid-request.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use headroom_core::Namespace;
use headroom_idempotency::{
    Idempotency, IdempotencyError, IdempotencyKey, InProgressPolicy, Scope, StoreFailure,
};
use headroom_redis::{Redis, RedisConfig, RedisLeaseStore};
use headroom_testkit::{RedisServer, shared_cluster, shared_server, unique_namespace};

async fn executors(config: RedisConfig, count: usize) -> Vec<Idempotency<RedisLeaseStore>> {
    let namespace = unique_namespace("idem");
    let mut executors = Vec::new();
    for _ in 0..count {
        // Each executor has its own connection, as separate instances would.
        let redis = Redis::connect(config.clone()).await.expect("connect");
        executors.push(
            Idempotency::builder(RedisLeaseStore::new(redis))
                .namespace(namespace.clone())
                .in_progress(InProgressPolicy::Wait {
                    max_wait: Duration::from_secs(20),
                })
                .build()
                .expect("executor"),
        );
    }
    executors
}

async fn two_hundred_requests_across_four_executors_run_once(config: RedisConfig) {
    let executors = executors(config, 4).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let scope = Scope::new("tenant", "charge").unwrap();
    let key = IdempotencyKey::new("order-1").unwrap();
    let calls = (0..200).map(|i| {
        let executor = executors[i % 4].clone();
        let (runs, scope, key) = (Arc::clone(&runs), scope.clone(), key.clone());
        tokio::spawn(async move {
            executor
                .execute(&scope, &key, b"amount=100", || async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst);
                    // Hold the lease across several round trips of the others.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, String>(format!("charge-{n}"))
                })
                .await
                .expect("every request gets the outcome")
        })
    });
    let outcomes = futures_util::future::try_join_all(calls).await.unwrap();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the operation ran more than once"
    );
    assert!(outcomes.iter().all(|o| o.value == "charge-0"));
    assert_eq!(outcomes.iter().filter(|o| !o.replayed).count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_two_hundred_requests_across_four_executors_run_once() {
    two_hundred_requests_across_four_executors_run_once(RedisConfig::standalone(
        shared_server().url(),
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_two_hundred_requests_across_four_executors_run_once() {
    two_hundred_requests_across_four_executors_run_once(RedisConfig::cluster(
        shared_cluster().urls(),
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_killed_mid_request_fails_closed_then_recovers() {
    let server = RedisServer::start();
    let config = RedisConfig::standalone(server.url())
        .with_command_timeout(Duration::from_millis(300))
        .with_connect_timeout(Duration::from_millis(300));
    let executor = executors(config, 1).await.remove(0);
    let scope = Scope::new("tenant", "charge").unwrap();
    let key = IdempotencyKey::new("k").unwrap();

    // The store dies while the operation runs: the outcome cannot be stored, yet the caller
    // gets it (the operation did run).
    let ran = executor
        .execute(&scope, &key, b"x", || async {
            server.kill();
            Ok::<_, String>("done".to_owned())
        })
        .await
        .expect("the operation's outcome is returned");
    assert_eq!(ran.value, "done");

    // While it is down, new requests fail closed with a typed error and run nothing.
    let runs = AtomicUsize::new(0);
    let err = executor
        .execute(
            &scope,
            &IdempotencyKey::new("other").unwrap(),
            b"x",
            || async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>("must not run".to_owned())
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, IdempotencyError::Unavailable(_)), "{err:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);

    // Back up (empty: no persistence): requests run again.
    server.restart();
    let mut recovered = None;
    for _ in 0..50 {
        match executor
            .execute(
                &scope,
                &IdempotencyKey::new("after").unwrap(),
                b"x",
                || async { Ok::<_, String>(1) },
            )
            .await
        {
            Ok(out) => {
                recovered = Some(out.value);
                break;
            }
            Err(IdempotencyError::Unavailable(_)) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!(recovered, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_runs_without_a_record_when_the_store_is_down() {
    let server = RedisServer::start();
    let redis = Redis::connect(
        RedisConfig::standalone(server.url())
            .with_command_timeout(Duration::from_millis(300))
            .with_connect_timeout(Duration::from_millis(300)),
    )
    .await
    .unwrap();
    let executor = Idempotency::builder(RedisLeaseStore::new(redis))
        .store_failure(StoreFailure::FailOpen)
        .build()
        .unwrap();
    server.kill();
    let out = executor
        .execute(
            &Scope::new("t", "op").unwrap(),
            &IdempotencyKey::new("k").unwrap(),
            b"x",
            || async { Ok::<_, String>("ran anyway".to_owned()) },
        )
        .await
        .unwrap();
    assert_eq!((out.value.as_str(), out.replayed), ("ran anyway", false));
}

/// `EVALSHA` calls the server has answered, from `INFO commandstats`.
fn evalsha_calls(server: &RedisServer) -> u64 {
    server
        .cli(&["INFO", "commandstats"])
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_key_costs_two_round_trips_and_a_replay_one() {
    let server = RedisServer::start();
    let redis = Redis::connect(RedisConfig::standalone(server.url()))
        .await
        .unwrap();
    let executor = Idempotency::builder(RedisLeaseStore::new(redis))
        .build()
        .unwrap();
    let scope = Scope::new("t", "op").unwrap();
    let run = |key: &'static str| {
        let (executor, scope) = (executor.clone(), scope.clone());
        async move {
            executor
                .execute(&scope, &IdempotencyKey::new(key).unwrap(), b"x", || async {
                    Ok::<_, String>(1u8)
                })
                .await
                .unwrap()
        }
    };
    run("warm-up").await; // loads the scripts

    let before = evalsha_calls(&server);
    assert!(!run("new").await.replayed);
    let after_new = evalsha_calls(&server);
    assert!(run("new").await.replayed);
    let after_replay = evalsha_calls(&server);
    assert_eq!(after_new - before, 2, "begin + complete");
    assert_eq!(
        after_replay - after_new,
        1,
        "begin answers the stored outcome"
    );
}

/// A client cannot choose the cluster slot of its records by putting a `{hash tag}` in its
/// idempotency keys: records of keys that share a tag still spread over the slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_tags_in_client_keys_do_not_choose_the_slot() {
    let cluster = shared_cluster();
    let namespace = unique_namespace("idem-tags");
    let redis = Redis::connect(RedisConfig::cluster(cluster.urls()))
        .await
        .unwrap();
    let executor = Idempotency::builder(RedisLeaseStore::new(redis))
        .namespace(namespace.clone())
        .build()
        .unwrap();
    let scope = Scope::new("tenant", "charge").unwrap();
    for i in 0..16 {
        let key = IdempotencyKey::new(&format!("{{hot}}-{i}")).unwrap();
        executor
            .execute(&scope, &key, b"x", || async { Ok::<_, String>(i) })
            .await
            .unwrap();
    }
    let pattern = format!("{}:*", namespace.as_str());
    let mut slots = std::collections::BTreeSet::new();
    let mut records = 0;
    for node in cluster.nodes() {
        for name in node.cli(&["--raw", "KEYS", &pattern]).lines() {
            if name.is_empty() {
                continue;
            }
            records += 1;
            slots.insert(cluster.keyslot(name));
        }
    }
    assert_eq!(records, 16);
    assert!(slots.len() > 1, "all records in slot {slots:?}");
}

fn scope() -> Scope {
    Scope::new("tenant", "charge").unwrap()
}

/// An executor over Redis on `config` with a 30 s lease that rejects duplicates of a running
/// request, its scripts loaded (its next begin is one EVALSHA), and the namespace of its
/// records, which hold only the warm-up's record of key `warm`.
async fn warm_executor(
    config: RedisConfig,
    namespace: &str,
) -> (Idempotency<RedisLeaseStore>, Namespace) {
    let namespace = unique_namespace(namespace);
    let redis = Redis::connect(config).await.unwrap();
    let executor = Idempotency::builder(RedisLeaseStore::new(redis))
        .namespace(namespace.clone())
        .lease(Duration::from_secs(30))
        .in_progress(InProgressPolicy::Reject)
        .build()
        .unwrap();
    executor
        .execute(
            &scope(),
            &IdempotencyKey::new("warm").unwrap(),
            b"x",
            || async { Ok::<_, String>(0) },
        )
        .await
        .unwrap();
    (executor, namespace)
}

/// Whether `server` holds a record of key `k` in `namespace`: a record's name ends with its
/// idempotency key, and the only other record is the warm-up's, of key `warm`.
fn holds_the_record_of_k(server: &RedisServer, namespace: &Namespace) -> bool {
    let pattern = format!("{}:*k", namespace.as_str());
    let records = server.cli(&["--raw", "KEYS", &pattern]);
    records.lines().any(|name| !name.is_empty())
}

/// Waits, for at most 5 s, until `server` holds the record of key `k` in `namespace`: the
/// begin held on the wire has reached Redis and run. A begin that never ran would leave
/// nothing to strand.
async fn wait_until_the_begin_ran(server: &RedisServer, namespace: &Namespace) {
    for _ in 0..100 {
        if holds_the_record_of_k(server, namespace) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the begin held on the wire never reached Redis: no record of `k`");
}

/// Retries the call of `key` every 50 ms, for at most 5 s, until it runs (counted in `runs`,
/// once in all) or replays: the key is not held by nobody for the 30 s lease.
async fn a_retry_soon_runs_once(
    executor: &Idempotency<RedisLeaseStore>,
    scope: &Scope,
    key: &IdempotencyKey,
    runs: &AtomicUsize,
) {
    let mut outcome = None;
    for _ in 0..100 {
        match executor
            .execute(scope, key, b"x", || async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>(1)
            })
            .await
        {
            Ok(out) => {
                outcome = Some(out.value);
                break;
            }
            Err(IdempotencyError::InProgress { .. } | IdempotencyError::Unavailable(_)) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!(
        outcome,
        Some(1),
        "a retry ran within 5 s, not after the 30 s lease"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A `begin` that timed out on a stalled connection, then ran once the wire delivered it, does
/// not leave an ownerless in-progress record for a whole lease: the call fails closed, and a
/// retry soon runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_that_timed_out_but_ran_does_not_strand_its_key() {
    let server = shared_server();
    let proxy = headroom_testkit::FaultProxy::start(server.addr()).await;
    let config =
        RedisConfig::standalone(proxy.url()).with_command_timeout(Duration::from_millis(100));
    let (executor, namespace) = warm_executor(config, "idem-timeout").await;
    let (scope, key, runs) = (
        scope(),
        IdempotencyKey::new("k").unwrap(),
        AtomicUsize::new(0),
    );

    // The begin is held on the wire past the command timeout; then the wire delivers it.
    proxy.stall();
    let failed = executor
        .execute(&scope, &key, b"x", || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>(0)
        })
        .await;
    assert!(
        matches!(failed, Err(IdempotencyError::Unavailable(_))),
        "{failed:?}"
    );
    // The stall outlasts the call, and the first asks for the lease the begin may have taken.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !holds_the_record_of_k(server, &namespace),
        "the begin was held on the wire"
    );
    proxy.restore();
    wait_until_the_begin_ran(server, &namespace).await;

    a_retry_soon_runs_once(&executor, &scope, &key, &runs).await;
}

/// A call dropped while its `begin` is on the wire (a client that hangs up, a timeout) does not
/// leave an ownerless in-progress record for a whole lease: a retry soon runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_dropped_during_begin_does_not_strand_its_key() {
    let server = shared_server();
    let proxy = headroom_testkit::FaultProxy::start(server.addr()).await;
    let (executor, namespace) =
        warm_executor(RedisConfig::standalone(proxy.url()), "idem-drop").await;
    let (scope, key, runs) = (
        scope(),
        IdempotencyKey::new("k").unwrap(),
        AtomicUsize::new(0),
    );

    // The begin is held on the wire; the caller gives up; then the wire delivers it.
    proxy.stall();
    let dropped = tokio::time::timeout(
        Duration::from_millis(200),
        executor.execute(&scope, &key, b"x", || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>(0)
        }),
    )
    .await;
    assert!(dropped.is_err(), "the call is dropped mid-begin");
    assert!(
        !holds_the_record_of_k(server, &namespace),
        "the begin was held on the wire"
    );
    proxy.restore();
    wait_until_the_begin_ran(server, &namespace).await;

    a_retry_soon_runs_once(&executor, &scope, &key, &runs).await;
}
