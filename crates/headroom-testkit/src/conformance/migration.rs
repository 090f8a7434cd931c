//! Checks of the [`MigrationStore`] contract.

use std::sync::Arc;
use std::time::{Duration, Instant};

use headroom_core::migration::{MigrationRecord, MigrationStore, Transition};
use headroom_core::{BackendErrorKind, Key, MAX_DURATION, Namespace};

const LONG: Duration = Duration::from_secs(60);
const SHORT: Duration = Duration::from_millis(50);

fn key(ns: &Namespace) -> Key {
    ns.key("migration").expect("valid test key")
}

const START: MigrationRecord = MigrationRecord {
    from_epoch: 7,
    to_epoch: 8,
    phase: 0,
};

/// Expands to one test per migration store check, each in a module named `$name`.
///
/// `$make` is an expression of a future that yields a fresh store; it runs once per test. The
/// store must run on real time, since one check waits for a short acknowledgement to expire.
#[macro_export]
macro_rules! migration_store_conformance {
    ($name:ident, $make:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::migration_store_conformance!(@tests $make;
                missing_records_load_as_none,
                the_first_record_created_wins,
                transitions_apply_only_from_the_expected_record,
                concurrent_transitions_apply_exactly_once,
                lagging_counts_live_participants_below_the_phase,
                acknowledgements_expire_with_their_lease,
                acknowledgement_leases_outside_what_the_store_keeps_are_refused,
                remove_deletes_the_record_and_its_participants,
                keys_are_independent,
            );
        }
    };
    (@tests $make:expr; $($check:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let store = $make.await;
                $crate::conformance::migration::$check(&store, $crate::unique_namespace(stringify!($check))).await;
            }
        )+
    };
}

/// A key never created loads as `None`, and transitions on it are rejected without a record.
pub async fn missing_records_load_as_none<S: MigrationStore>(store: &S, ns: Namespace) {
    let key = key(&ns);
    assert_eq!(store.load(&key).await.expect("load"), None);
    assert_eq!(
        store.transition(&key, START, 1).await.expect("transition"),
        Transition::Rejected(None)
    );
    assert_eq!(store.load(&key).await.expect("load"), None);
}

/// `create` stores the first record and returns it; a later `create` returns it unchanged.
pub async fn the_first_record_created_wins<S: MigrationStore>(store: &S, ns: Namespace) {
    let key = key(&ns);
    assert_eq!(store.create(&key, START).await.expect("create"), START);
    let other = MigrationRecord {
        from_epoch: 1,
        to_epoch: 2,
        phase: 3,
    };
    assert_eq!(store.create(&key, other).await.expect("create"), START);
    assert_eq!(store.load(&key).await.expect("load"), Some(START));
}

/// A transition applies only when epochs and phase all match; otherwise it reports the record.
pub async fn transitions_apply_only_from_the_expected_record<S: MigrationStore>(
    store: &S,
    ns: Namespace,
) {
    let key = key(&ns);
    store.create(&key, START).await.expect("create");
    for stale in [
        MigrationRecord { phase: 1, ..START },
        MigrationRecord {
            from_epoch: 6,
            ..START
        },
        MigrationRecord {
            to_epoch: 9,
            ..START
        },
    ] {
        assert_eq!(
            store.transition(&key, stale, 2).await.expect("transition"),
            Transition::Rejected(Some(START))
        );
    }
    assert_eq!(
        store.transition(&key, START, 1).await.expect("transition"),
        Transition::Applied
    );
    let moved = MigrationRecord { phase: 1, ..START };
    assert_eq!(store.load(&key).await.expect("load"), Some(moved));
    assert_eq!(
        store.transition(&key, START, 1).await.expect("transition"),
        Transition::Rejected(Some(moved))
    );
}

/// Of many concurrent transitions from one record, exactly one applies.
pub async fn concurrent_transitions_apply_exactly_once<S: MigrationStore + Clone>(
    store: &S,
    ns: Namespace,
) {
    let key = Arc::new(key(&ns));
    store.create(&key, START).await.expect("create");
    let tasks: Vec<_> = (0..16u8)
        .map(|i| {
            let (store, key) = (store.clone(), Arc::clone(&key));
            tokio::spawn(async move {
                store
                    .transition(&key, START, 1 + i % 3)
                    .await
                    .expect("transition")
            })
        })
        .collect();
    let mut applied = 0;
    for task in tasks {
        if task.await.expect("task") == Transition::Applied {
            applied += 1;
        }
    }
    assert_eq!(applied, 1);
    let phase = store.load(&key).await.expect("load").expect("record").phase;
    assert!((1..=3).contains(&phase), "phase {phase}");
}

/// `lagging` counts live participants whose acknowledged phase is below the one asked about.
pub async fn lagging_counts_live_participants_below_the_phase<S: MigrationStore>(
    store: &S,
    ns: Namespace,
) {
    let key = key(&ns);
    store.create(&key, START).await.expect("create");
    assert_eq!(store.lagging(&key, 3).await.expect("lagging"), 0);
    store.acknowledge(&key, "a", 1, LONG).await.expect("ack");
    store.acknowledge(&key, "b", 3, LONG).await.expect("ack");
    store.acknowledge(&key, "c", 2, LONG).await.expect("ack");
    assert_eq!(store.lagging(&key, 3).await.expect("lagging"), 2);
    assert_eq!(store.lagging(&key, 2).await.expect("lagging"), 1);
    assert_eq!(store.lagging(&key, 1).await.expect("lagging"), 0);
    // A participant acknowledging again replaces its phase.
    store.acknowledge(&key, "a", 3, LONG).await.expect("ack");
    store.acknowledge(&key, "c", 4, LONG).await.expect("ack");
    assert_eq!(store.lagging(&key, 3).await.expect("lagging"), 0);
}

/// A participant whose acknowledgement lease expired is no longer waited for.
pub async fn acknowledgements_expire_with_their_lease<S: MigrationStore>(store: &S, ns: Namespace) {
    let key = key(&ns);
    store.create(&key, START).await.expect("create");
    store
        .acknowledge(&key, "gone", 0, SHORT)
        .await
        .expect("ack");
    store.acknowledge(&key, "live", 0, LONG).await.expect("ack");
    assert_eq!(store.lagging(&key, 1).await.expect("lagging"), 2);
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.lagging(&key, 1).await.expect("lagging") != 1 {
        assert!(Instant::now() < deadline, "the short lease never expired");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    store.acknowledge(&key, "live", 1, LONG).await.expect("ack");
    assert_eq!(store.lagging(&key, 1).await.expect("lagging"), 0);
}

/// An acknowledgement lease under a millisecond or over [`MAX_DURATION`] is a configuration
/// error and records nothing; the longest one accepted is counted.
pub async fn acknowledgement_leases_outside_what_the_store_keeps_are_refused<S: MigrationStore>(
    store: &S,
    ns: Namespace,
) {
    let key = key(&ns);
    store.create(&key, START).await.expect("create");
    for lease in [
        Duration::ZERO,
        MAX_DURATION + Duration::from_millis(1),
        Duration::from_millis(u64::MAX),
        Duration::MAX,
    ] {
        let err = store
            .acknowledge(&key, "a", 0, lease)
            .await
            .expect_err("refused");
        assert_eq!(err.kind(), BackendErrorKind::Config, "{lease:?}");
    }
    assert_eq!(store.lagging(&key, 1).await.expect("lagging"), 0);
    store
        .acknowledge(&key, "a", 0, MAX_DURATION)
        .await
        .expect("ack");
    assert_eq!(store.lagging(&key, 1).await.expect("lagging"), 1);
}

/// `remove` deletes the record and its acknowledgements; a new record starts clean.
pub async fn remove_deletes_the_record_and_its_participants<S: MigrationStore>(
    store: &S,
    ns: Namespace,
) {
    let key = key(&ns);
    store.create(&key, START).await.expect("create");
    store.acknowledge(&key, "a", 0, LONG).await.expect("ack");
    store.remove(&key).await.expect("remove");
    assert_eq!(store.load(&key).await.expect("load"), None);
    let next = MigrationRecord {
        from_epoch: 8,
        to_epoch: 9,
        phase: 0,
    };
    assert_eq!(store.create(&key, next).await.expect("create"), next);
    assert_eq!(store.lagging(&key, 5).await.expect("lagging"), 0);
}

/// Records and acknowledgements of different keys do not interact.
pub async fn keys_are_independent<S: MigrationStore>(store: &S, ns: Namespace) {
    let (a, b) = (ns.key("a").expect("key"), ns.key("b").expect("key"));
    store.create(&a, START).await.expect("create");
    assert_eq!(store.load(&b).await.expect("load"), None);
    store.acknowledge(&a, "p", 0, LONG).await.expect("ack");
    store.acknowledge(&b, "p", 0, LONG).await.expect("ack");
    assert_eq!(store.lagging(&b, 9).await.expect("lagging"), 0);
    assert_eq!(store.lagging(&a, 9).await.expect("lagging"), 1);
    store.transition(&a, START, 2).await.expect("transition");
    assert_eq!(store.load(&b).await.expect("load"), None);
}
