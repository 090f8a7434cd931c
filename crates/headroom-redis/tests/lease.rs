//! What the Redis lease store keeps in Redis, beyond the conformance suite.

use std::time::Duration;

use bytes::Bytes;
use headroom_core::lease::{Begin, BeginId, Fenced, FencingToken, LeaseStore};
use headroom_core::{BackendErrorKind, Key};
use headroom_redis::{Redis, RedisConfig, RedisLeaseStore};
use headroom_testkit::{shared_server, unique_namespace};

/// The lease contract: the store keeps the last token after a release, at least as long as the
/// lease, so tokens keep growing for the key even if the server's clock steps back.
#[tokio::test]
async fn a_release_keeps_the_last_token_and_frees_the_key() {
    let server = shared_server();
    let store = RedisLeaseStore::new(
        Redis::connect(RedisConfig::standalone(server.url()))
            .await
            .unwrap(),
    );
    let key = unique_namespace("lease").key("k").unwrap();
    let lease = Duration::from_secs(30);
    let Begin::Acquired { token, .. } = store
        .begin(&key, b"fp", lease, BeginId::random())
        .await
        .unwrap()
    else {
        panic!("a fresh key is acquired");
    };
    assert_eq!(store.release(&key, token).await.unwrap(), Fenced::Applied);

    let name = std::str::from_utf8(key.as_bytes()).unwrap();
    let kept = server.cli(&["HGET", name, "tok"]);
    assert_eq!(kept.trim(), token.0.to_string(), "the last token is kept");
    let ttl: i64 = server.cli(&["PTTL", name]).trim().parse().unwrap();
    assert!(ttl >= 30_000, "kept for at least the lease, {ttl} ms left");

    // The released holder can change nothing; a new request takes the key with a greater token.
    assert_eq!(store.release(&key, token).await.unwrap(), Fenced::Rejected);
    let Begin::Acquired {
        token: next,
        took_over,
    } = store
        .begin(&key, b"fp2", lease, BeginId::random())
        .await
        .unwrap()
    else {
        panic!("a released key is acquired again");
    };
    assert!(next > token && !took_over);
}

/// A store on the shared server, and a fresh key for it.
async fn store_and_key(prefix: &str) -> (RedisLeaseStore, Key) {
    let store = RedisLeaseStore::new(
        Redis::connect(RedisConfig::standalone(shared_server().url()))
            .await
            .unwrap(),
    );
    (store, unique_namespace(prefix).key("k").unwrap())
}

fn name(key: &Key) -> &str {
    std::str::from_utf8(key.as_bytes()).unwrap()
}

/// What another program left at the key: its type and its fields, to check nothing changed.
fn snapshot(key: &Key) -> (String, Vec<String>) {
    let server = shared_server();
    let kind = server.cli(&["TYPE", name(key)]).trim().to_owned();
    let mut fields: Vec<String> = if kind == "hash" {
        server
            .cli(&["HGETALL", name(key)])
            .lines()
            .map(str::to_owned)
            .collect()
    } else {
        vec![server.cli(&["GET", name(key)])]
    };
    fields.sort();
    (kind, fields)
}

/// The contract of docs/idempotency.md: corrupt or foreign bytes in a record are `Corrupt`
/// (HTTP 500), never a store error a caller would take for the store being down, and the
/// record is left as it is.
#[tokio::test]
async fn a_corrupt_or_foreign_record_is_corrupt_to_begin() {
    let id = BeginId::random();
    let by = id.0.to_string();
    let far = "99999999999999";
    let records: [(&str, Vec<&str>); 11] = [
        ("a lease without a deadline", vec!["st", "p", "fp", "x"]),
        (
            "a lease with a word for a deadline",
            vec!["st", "p", "fp", "x", "tok", "1", "exp", "soon"],
        ),
        (
            "a lease with a word for a token, asked again by its begin",
            vec!["st", "p", "fp", "x", "tok", "abc", "exp", far, "by", &by],
        ),
        (
            "a lease without a token",
            vec!["st", "p", "fp", "x", "exp", far, "by", &by],
        ),
        (
            "a lease without a fingerprint",
            vec!["st", "p", "tok", "1", "exp", far],
        ),
        (
            "a completion without an outcome",
            vec!["st", "c", "fp", "x", "tok", "1"],
        ),
        (
            "a completion without a fingerprint",
            vec!["st", "c", "out", "o", "tok", "1"],
        ),
        (
            "a release with a word for a token",
            vec!["st", "r", "tok", "abc"],
        ),
        ("an unknown state", vec!["st", "zzz", "fp", "x", "tok", "1"]),
        ("a token without a state", vec!["tok", "1", "fp", "x"]),
        (
            "a token beyond u64",
            vec![
                "st",
                "p",
                "fp",
                "x",
                "tok",
                "99999999999999999999",
                "exp",
                far,
                "by",
                &by,
            ],
        ),
    ];
    for (what, fields) in records {
        let (store, key) = store_and_key("lease-corrupt").await;
        let mut args = vec!["HSET", name(&key)];
        args.extend(fields);
        shared_server().cli(&args);
        let before = snapshot(&key);
        let err = store
            .begin(&key, b"x", Duration::from_secs(30), id)
            .await
            .expect_err(what);
        assert_eq!(err.kind(), BackendErrorKind::Corrupt, "{what}: {err:?}");
        assert_eq!(
            snapshot(&key),
            before,
            "{what}: the record is left as it is"
        );
    }

    // A key of another type in the record's place.
    let (store, key) = store_and_key("lease-corrupt").await;
    shared_server().cli(&["SET", name(&key), "foreign"]);
    let err = store
        .begin(&key, b"x", Duration::from_secs(30), id)
        .await
        .expect_err("a string at the key");
    assert_eq!(err.kind(), BackendErrorKind::Corrupt, "{err:?}");
    assert_eq!(shared_server().cli(&["GET", name(&key)]).trim(), "foreign");
}

/// The steps after `begin` read the record too: a key of another type in its place is
/// `Corrupt` to each of them, and left as it is.
#[tokio::test]
async fn a_key_of_another_type_is_corrupt_to_every_step() {
    let (store, key) = store_and_key("lease-wrongtype").await;
    shared_server().cli(&["RPUSH", name(&key), "a", "b"]);
    let token = FencingToken(1);
    let lease = Duration::from_secs(30);
    let results = [
        (
            "complete",
            store
                .complete(&key, token, Bytes::from_static(b"o"), lease)
                .await,
        ),
        ("extend", store.extend(&key, token, lease).await),
        ("release", store.release(&key, token).await),
        (
            "release_begun",
            store.release_begun(&key, BeginId::random()).await,
        ),
    ];
    for (step, result) in results {
        let err = result.expect_err(step);
        assert_eq!(err.kind(), BackendErrorKind::Corrupt, "{step}: {err:?}");
    }
    assert_eq!(shared_server().cli(&["LLEN", name(&key)]).trim(), "2");
}

/// A begin released by its id is remembered for at least a minute, also once another begin
/// with a short lease took the key and let it go: a copy of it that reaches Redis within that
/// minute takes nothing.
#[tokio::test]
async fn a_released_begin_is_remembered_for_a_minute_whatever_the_leases_since() {
    let server = shared_server();
    let store = RedisLeaseStore::new(
        Redis::connect(RedisConfig::standalone(server.url()))
            .await
            .unwrap(),
    );
    let key = unique_namespace("lease-marker").key("k").unwrap();
    let (released, other) = (BeginId::random(), BeginId::random());
    assert_eq!(
        store.release_begun(&key, released).await.unwrap(),
        Fenced::Rejected
    );
    let Begin::Acquired { token, .. } = store
        .begin(&key, b"fp", Duration::from_secs(1), other)
        .await
        .unwrap()
    else {
        panic!("the free key is taken");
    };
    assert_eq!(
        store
            .extend(&key, token, Duration::from_secs(1))
            .await
            .unwrap(),
        Fenced::Applied
    );
    assert_eq!(store.release(&key, token).await.unwrap(), Fenced::Applied);
    let name = std::str::from_utf8(key.as_bytes()).unwrap();
    let ttl: i64 = server.cli(&["PTTL", name]).trim().parse().unwrap();
    assert!(ttl > 55_000, "the released begin is kept {ttl} ms");
}

/// A lease that ran out on the server's clock (its deadline moved into the past here) stands
/// for a run that may have taken effect: a begin with another fingerprint is answered the
/// holder's, with no time left, and changes nothing; one with the same fingerprint takes it
/// over with a greater token.
#[tokio::test]
async fn an_expired_lease_is_taken_over_only_with_its_fingerprint() {
    let (store, key) = store_and_key("lease-fp").await;
    let lease = Duration::from_secs(30);
    let Begin::Acquired { token, .. } = store
        .begin(&key, b"x", lease, BeginId::random())
        .await
        .unwrap()
    else {
        panic!("a fresh key is acquired");
    };
    shared_server().cli(&["HSET", name(&key), "exp", "1"]);
    let before = snapshot(&key);
    assert_eq!(
        store
            .begin(&key, b"y", lease, BeginId::random())
            .await
            .unwrap(),
        Begin::InProgress {
            fingerprint: Bytes::from_static(b"x"),
            lease_remaining: Duration::ZERO,
        }
    );
    assert_eq!(snapshot(&key), before, "nothing changed");
    let Begin::Acquired {
        token: next,
        took_over,
    } = store
        .begin(&key, b"x", lease, BeginId::random())
        .await
        .unwrap()
    else {
        panic!("the same request takes the expired lease over");
    };
    assert!(next > token && took_over, "{next:?} after {token:?}");
}
