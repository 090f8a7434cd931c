//! Checks of the [`KvStore`] contract.

use std::time::{Duration, Instant};

use bytes::Bytes;
use headroom_core::kv::{KvEntry, KvStore, VersionAt};
use headroom_core::{BackendErrorKind, Key, MAX_DURATION, Namespace};

/// The value limit the stores under test must be configured with.
pub const MAX_VALUE_LEN: usize = 1024 * 1024;

const HOUR: Duration = Duration::from_secs(3_600);

fn key(ns: &Namespace, name: impl AsRef<[u8]>) -> Key {
    ns.key(name).expect("valid test key")
}

/// Empty, binary, non-UTF-8 and large values come back byte for byte.
pub async fn values_round_trip_unchanged<S: KvStore>(store: &S, ns: Namespace) {
    let large: Vec<u8> = (0..MAX_VALUE_LEN).map(|i| (i % 251) as u8).collect();
    let values: Vec<Bytes> = vec![
        Bytes::new(),
        Bytes::from_static(b"plain"),
        Bytes::from_static(&[0, 159, 146, 150, 255, 0xC3, 0x28, b'\r', b'\n']),
        Bytes::from(large),
    ];
    for (i, value) in values.iter().enumerate() {
        let k = key(&ns, format!("v{i}"));
        store.set(&k, value.clone(), HOUR).await.expect("set");
        assert_eq!(
            store.get(&k).await.expect("get").as_ref(),
            Some(value),
            "value {i}"
        );
    }
    let binary_key = key(&ns, [0u8, 255, b'{', b'}', b' ']);
    store
        .set(&binary_key, "k".into(), HOUR)
        .await
        .expect("set binary key");
    assert_eq!(
        store.get(&binary_key).await.expect("get").as_deref(),
        Some(&b"k"[..])
    );
}

/// A key never written reads as `None`.
pub async fn missing_keys_read_as_none<S: KvStore>(store: &S, ns: Namespace) {
    assert_eq!(store.get(&key(&ns, "nobody")).await.expect("get"), None);
}

/// `set` replaces the previous value.
pub async fn set_overwrites<S: KvStore>(store: &S, ns: Namespace) {
    let k = key(&ns, "k");
    store.set(&k, "one".into(), HOUR).await.expect("set");
    store.set(&k, "two".into(), HOUR).await.expect("set");
    assert_eq!(
        store.get(&k).await.expect("get").as_deref(),
        Some(&b"two"[..])
    );
}

/// An entry is gone once its TTL has passed, while one with a long TTL stays.
pub async fn entries_expire_after_their_ttl<S: KvStore>(store: &S, ns: Namespace) {
    let short = key(&ns, "short");
    let long = key(&ns, "long");
    store.set(&long, "stays".into(), HOUR).await.expect("set");
    store
        .set(&short, "goes".into(), Duration::from_millis(5))
        .await
        .expect("set");
    // Expiry happens in the store's own time (Redis' clock for Redis): wait for it, bounded.
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.get(&short).await.expect("get").is_some() {
        assert!(
            Instant::now() < deadline,
            "entry with a 5 ms ttl still present after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        store.get(&long).await.expect("get").as_deref(),
        Some(&b"stays"[..])
    );
}

/// A TTL under a millisecond (zero is not an entry that never expires) or over
/// [`MAX_DURATION`] is a configuration error, alone or in a batch, and writes nothing: not even
/// the batch's other entries. The longest TTL accepted is kept.
pub async fn ttls_outside_what_the_store_keeps_are_refused<S: KvStore>(store: &S, ns: Namespace) {
    let (k, good) = (key(&ns, "k"), key(&ns, "good"));
    let value = versioned(1, "v");
    let entry = |key: &Key, ttl| KvEntry {
        key: key.clone(),
        value: value.clone(),
        ttl,
    };
    for ttl in [
        Duration::ZERO,
        Duration::from_micros(999),
        MAX_DURATION + Duration::from_millis(1),
        Duration::from_millis(u64::MAX),
        Duration::MAX,
    ] {
        let err = store
            .set(&k, value.clone(), ttl)
            .await
            .expect_err("refused");
        assert_eq!(err.kind(), BackendErrorKind::Config, "{ttl:?}");
        let batch = [entry(&good, HOUR), entry(&k, ttl)];
        let err = store.set_many(&batch).await.expect_err("refused");
        assert_eq!(err.kind(), BackendErrorKind::Config, "{ttl:?}");
        let err = store
            .set_if_newer(&batch, VersionAt::new(3))
            .await
            .expect_err("refused");
        assert_eq!(err.kind(), BackendErrorKind::Config, "{ttl:?}");
        for key in [&k, &good] {
            assert_eq!(store.get(key).await.expect("get"), None, "{ttl:?}");
        }
    }
    store
        .set(&k, value.clone(), MAX_DURATION)
        .await
        .expect("the longest ttl");
    assert_eq!(store.get(&k).await.expect("get"), Some(value));
}

/// A value over the limit fails with `TooLarge` and writes nothing, alone or in a batch.
pub async fn oversized_values_are_refused_and_not_written<S: KvStore>(store: &S, ns: Namespace) {
    let big = Bytes::from(vec![7u8; MAX_VALUE_LEN + 1]);
    let k = key(&ns, "big");
    let err = store
        .set(&k, big.clone(), HOUR)
        .await
        .expect_err("oversized");
    assert_eq!(err.kind(), BackendErrorKind::TooLarge);
    let small = key(&ns, "small");
    let batch = [
        KvEntry {
            key: small.clone(),
            value: "ok".into(),
            ttl: HOUR,
        },
        KvEntry {
            key: k.clone(),
            value: big,
            ttl: HOUR,
        },
    ];
    let err = store
        .set_many(&batch)
        .await
        .expect_err("oversized in batch");
    assert_eq!(err.kind(), BackendErrorKind::TooLarge);
    assert_eq!(
        store.get_many(&[k, small]).await.expect("get_many"),
        vec![None, None]
    );
}

/// `get_many` answers one slot per key, in order, duplicates and misses included, across many
/// keys (so across cluster slots).
pub async fn get_many_answers_in_order_with_duplicates<S: KvStore>(store: &S, ns: Namespace) {
    assert!(
        store
            .get_many(&[])
            .await
            .expect("empty get_many")
            .is_empty()
    );
    let keys: Vec<Key> = (0..100).map(|i| key(&ns, format!("k{i}"))).collect();
    for (i, k) in keys.iter().enumerate().filter(|(i, _)| i % 3 != 0) {
        store
            .set(k, Bytes::from(i.to_string()), HOUR)
            .await
            .expect("set");
    }
    let mut asked = keys.clone();
    asked.push(keys[1].clone());
    asked.push(keys[0].clone());
    let got = store.get_many(&asked).await.expect("get_many");
    assert_eq!(got.len(), asked.len());
    for (i, value) in got.iter().take(100).enumerate() {
        let expected = (i % 3 != 0).then(|| Bytes::from(i.to_string()));
        assert_eq!(value, &expected, "key {i}");
    }
    assert_eq!(got[100], Some(Bytes::from("1")));
    assert_eq!(got[101], None);
}

/// `set_many` writes every entry with its own TTL.
pub async fn set_many_writes_every_entry<S: KvStore>(store: &S, ns: Namespace) {
    store.set_many(&[]).await.expect("empty set_many");
    let entries: Vec<KvEntry> = (0..100)
        .map(|i| KvEntry {
            key: key(&ns, format!("k{i}")),
            value: Bytes::from(format!("v{i}")),
            ttl: HOUR + Duration::from_secs(i),
        })
        .collect();
    store.set_many(&entries).await.expect("set_many");
    let keys: Vec<Key> = entries.iter().map(|e| e.key.clone()).collect();
    let got = store.get_many(&keys).await.expect("get_many");
    let expected: Vec<Option<Bytes>> = entries.iter().map(|e| Some(e.value.clone())).collect();
    assert_eq!(got, expected);
}

/// `delete` removes keys and counts those that existed.
pub async fn delete_counts_existing_keys<S: KvStore>(store: &S, ns: Namespace) {
    assert_eq!(store.delete(&[]).await.expect("empty delete"), 0);
    let keys: Vec<Key> = (0..10).map(|i| key(&ns, format!("k{i}"))).collect();
    for k in &keys[..6] {
        store.set(k, "v".into(), HOUR).await.expect("set");
    }
    assert_eq!(store.delete(&keys).await.expect("delete"), 6);
    assert_eq!(
        store.get_many(&keys).await.expect("get_many"),
        vec![None; 10]
    );
    assert_eq!(store.delete(&keys).await.expect("delete again"), 0);
}

/// The same key part in two namespaces names two entries.
pub async fn namespaces_do_not_collide<S: KvStore>(store: &S, ns: Namespace) {
    let a = ns.child("a").expect("ns");
    let b = ns.child("b").expect("ns");
    store
        .set(&key(&a, "k"), "in a".into(), HOUR)
        .await
        .expect("set");
    store
        .set(&key(&b, "k"), "in b".into(), HOUR)
        .await
        .expect("set");
    store.delete(&[key(&a, "k")]).await.expect("delete");
    assert_eq!(store.get(&key(&a, "k")).await.expect("get"), None);
    assert_eq!(
        store.get(&key(&b, "k")).await.expect("get").as_deref(),
        Some(&b"in b"[..])
    );
}

/// Many tasks writing and reading their own keys at once each read what they wrote.
pub async fn concurrent_writers_and_readers_agree<S: KvStore>(store: &S, ns: Namespace) {
    let tasks = (0..32).map(|task| {
        let ns = ns.clone();
        async move {
            for round in 0..20 {
                let k = key(&ns, format!("t{task}"));
                let value = Bytes::from(format!("{task}:{round}"));
                store.set(&k, value.clone(), HOUR).await.expect("set");
                assert_eq!(store.get(&k).await.expect("get"), Some(value));
            }
        }
    });
    futures_util::future::join_all(tasks).await;
}

/// A value carrying `version` (little-endian) at byte 3, then `tag`.
fn versioned(version: u64, tag: &str) -> Bytes {
    let mut bytes = b"hdr".to_vec();
    bytes.extend_from_slice(&version.to_le_bytes());
    bytes.extend_from_slice(tag.as_bytes());
    Bytes::from(bytes)
}

/// `set_if_newer` writes over absent, older, equally new and unversioned (too short) values,
/// never over a newer value, and refuses an entry that carries no version.
pub async fn set_if_newer_never_replaces_a_newer_value<S: KvStore>(store: &S, ns: Namespace) {
    let entry = |name: &str, value: Bytes| KvEntry {
        key: key(&ns, name),
        value,
        ttl: HOUR,
    };
    // Versions that differ only in a high byte, so a wrong byte order shows.
    let (low, high) = (0x0100_0000_0000_00ff_u64, 0x0200_0000_0000_0001_u64);
    store
        .set_many(&[
            entry("older", versioned(low, "held")),
            entry("newer", versioned(high, "held")),
            entry("same", versioned(low, "held")),
            entry("short", Bytes::from_static(b"x")),
        ])
        .await
        .expect("set_many");
    let written = store
        .set_if_newer(
            &[
                entry("absent", versioned(low, "new")),
                entry("older", versioned(high, "new")),
                entry("newer", versioned(low, "new")),
                entry("same", versioned(low, "new")),
                entry("short", versioned(low, "new")),
            ],
            VersionAt::new(3),
        )
        .await
        .expect("set_if_newer");
    assert_eq!(written, 4, "absent, older, same and short are written");
    for (name, expected) in [
        ("absent", versioned(low, "new")),
        ("older", versioned(high, "new")),
        ("newer", versioned(high, "held")),
        ("same", versioned(low, "new")),
        ("short", versioned(low, "new")),
    ] {
        assert_eq!(
            store.get(&key(&ns, name)).await.expect("get"),
            Some(expected),
            "{name}"
        );
    }
    let error = store
        .set_if_newer(
            &[entry("absent", Bytes::from_static(b"tiny"))],
            VersionAt::new(3),
        )
        .await
        .expect_err("an entry without a version");
    assert_eq!(error.kind(), BackendErrorKind::Config);
}

/// With a marker, a held value that does not start with it carries no version (another
/// program wrote it), so any value offered replaces it, whatever its bytes read as where the
/// version would be; marked values keep their order; an offered value without the marker is
/// refused.
pub async fn set_if_newer_replaces_a_held_value_without_the_marker<S: KvStore>(
    store: &S,
    ns: Namespace,
) {
    let version = VersionAt::new(3).with_marker(b"hdr");
    let (low, high) = (0x0100_0000_0000_00ff_u64, 0x0200_0000_0000_0001_u64);
    let mut unmarked = versioned(high, "held").to_vec();
    unmarked[0] = b'x';
    let cases = [
        (
            "unmarked",
            Bytes::from(unmarked),
            versioned(low, "new"),
            true,
        ),
        (
            "text",
            Bytes::from_static(b"written by another program"),
            versioned(low, "new"),
            true,
        ),
        (
            "marked-newer",
            versioned(high, "held"),
            versioned(low, "new"),
            false,
        ),
        (
            "marked-older",
            versioned(low, "held"),
            versioned(high, "new"),
            true,
        ),
    ];
    offer_over_held(store, &ns, version, &cases).await;
    let mut offered = versioned(high, "new").to_vec();
    offered[0] = b'x';
    let error = store
        .set_if_newer(
            &[KvEntry {
                key: key(&ns, "text"),
                value: Bytes::from(offered),
                ttl: HOUR,
            }],
            version,
        )
        .await
        .expect_err("an entry without the marker");
    assert_eq!(error.kind(), BackendErrorKind::Config);
}

/// A value carrying the tie-break `tie` at byte 0 and `version` at byte 3 (both
/// little-endian), then `tag`.
fn tied(version: u64, tie: u16, tag: &str) -> Bytes {
    let mut bytes = tie.to_le_bytes().to_vec();
    bytes.push(b'-');
    bytes.extend_from_slice(&version.to_le_bytes());
    bytes.extend_from_slice(tag.as_bytes());
    Bytes::from(bytes)
}

/// With a tie-break, `set_if_newer` orders two values of one version by it (equal ones are
/// replaced), still lets the version decide first, counts as 0 the tie-break of a held value
/// too short to carry one and that of any value, held or offered, whose gate byte is below
/// its least value, and refuses an entry too short to carry the tie-break.
pub async fn set_if_newer_breaks_a_tie_by_the_second_field<S: KvStore>(store: &S, ns: Namespace) {
    let entry = |name: &str, value: Bytes| KvEntry {
        key: key(&ns, name),
        value,
        ttl: HOUR,
    };
    let version = VersionAt::new(3).with_tie_at(0);
    let (low, high) = (0x0100_0000_0000_00ff_u64, 0x0200_0000_0000_0001_u64);
    // (name, held, offered, whether the offered value is written)
    let cases = [
        (
            "tie-lower",
            tied(low, 100, "held"),
            tied(low, 500, "new"),
            true,
        ),
        (
            "tie-higher",
            tied(low, 500, "held"),
            tied(low, 100, "new"),
            false,
        ),
        (
            "tie-same",
            tied(low, 100, "held"),
            tied(low, 100, "new"),
            true,
        ),
        // Ties that differ only in their high byte, so a wrong byte order shows.
        (
            "tie-bytes",
            tied(low, 0x00ff, "held"),
            tied(low, 0x0100, "new"),
            true,
        ),
        (
            "version-first",
            tied(low, 900, "held"),
            tied(high, 0, "new"),
            true,
        ),
        (
            "version-only",
            tied(high, 0, "held"),
            tied(low, 900, "new"),
            false,
        ),
    ];
    offer_over_held(store, &ns, version, &cases).await;
    // A held value that carries the u64 but ends before the tie-break (written by a format
    // without one): its tie-break counts as 0, and its u64 still decides.
    let trailing = VersionAt::new(3).with_tie_at(11);
    let with_tie = |version: u64, tie: u16| {
        let mut bytes = versioned(version, "").to_vec();
        bytes.extend_from_slice(&tie.to_le_bytes());
        Bytes::from(bytes)
    };
    let cases = [
        (
            "untied-newer",
            versioned(high, ""),
            with_tie(low, 900),
            false,
        ),
        ("untied-older", versioned(low, ""), with_tie(high, 0), true),
        ("untied-same", versioned(low, ""), with_tie(low, 0), true),
    ];
    offer_over_held(store, &ns, trailing, &cases).await;
    // A tie-break that counts only in values whose byte 2 is at least 3 (a format that
    // carries it); in others it counts as 0, whatever their bytes there.
    let gated_version = version.with_tie_only_when(2, 3);
    let gated = |version: u64, gate: u8, tie: u16| {
        let mut bytes = tied(version, tie, "").to_vec();
        bytes[2] = gate;
        Bytes::from(bytes)
    };
    let cases = [
        (
            "gate-held-below",
            gated(low, 2, 900),
            gated(low, 3, 100),
            true,
        ),
        (
            "gate-offered-below",
            gated(low, 3, 100),
            gated(low, 2, 900),
            false,
        ),
        (
            "gate-both-below",
            gated(low, 2, 900),
            gated(low, 0, 100),
            true,
        ),
        (
            "gate-both-met",
            gated(low, 4, 500),
            gated(low, 3, 100),
            false,
        ),
        (
            "gate-version-first",
            gated(high, 2, 0),
            gated(low, 3, 900),
            false,
        ),
    ];
    offer_over_held(store, &ns, gated_version, &cases).await;
    let error = store
        .set_if_newer(
            &[entry("tie-lower", tied(low, 1, ""))],
            VersionAt::new(3).with_tie_at(11),
        )
        .await
        .expect_err("an entry without room for the tie-break");
    assert_eq!(error.kind(), BackendErrorKind::Config);
}

/// For each case `(name, held, offered, written)`: holds `held` under `name`, offers `offered`
/// with `set_if_newer(version)`, and checks that exactly the cases marked `written` were.
async fn offer_over_held<S: KvStore>(
    store: &S,
    ns: &Namespace,
    version: VersionAt,
    cases: &[(&str, Bytes, Bytes, bool)],
) {
    let entry = |name: &str, value: &Bytes| KvEntry {
        key: key(ns, name),
        value: value.clone(),
        ttl: HOUR,
    };
    let held: Vec<KvEntry> = cases
        .iter()
        .map(|(name, held, ..)| entry(name, held))
        .collect();
    store.set_many(&held).await.expect("set_many");
    let offered: Vec<KvEntry> = cases
        .iter()
        .map(|(name, _, offered, _)| entry(name, offered))
        .collect();
    let written = store
        .set_if_newer(&offered, version)
        .await
        .expect("set_if_newer");
    let expected = cases.iter().filter(|case| case.3).count() as u64;
    assert_eq!(written, expected, "how many were written");
    for (name, held, offered, replaced) in cases {
        let expected = if *replaced { offered } else { held };
        assert_eq!(
            store.get(&key(ns, name)).await.expect("get").as_ref(),
            Some(expected),
            "{name}"
        );
    }
}

/// `delete_if_eq` deletes only the exact bytes given.
pub async fn delete_if_eq_deletes_only_the_expected_bytes<S: KvStore>(store: &S, ns: Namespace) {
    let k = key(&ns, "k");
    store.set(&k, "current".into(), HOUR).await.expect("set");
    assert!(
        !store
            .delete_if_eq(&k, b"previous")
            .await
            .expect("delete_if_eq"),
        "other bytes stay"
    );
    assert_eq!(
        store.get(&k).await.expect("get").as_deref(),
        Some(&b"current"[..])
    );
    assert!(
        store
            .delete_if_eq(&k, b"current")
            .await
            .expect("delete_if_eq")
    );
    assert_eq!(store.get(&k).await.expect("get"), None);
    assert!(
        !store
            .delete_if_eq(&k, b"current")
            .await
            .expect("delete_if_eq"),
        "an absent key is not deleted"
    );
}
