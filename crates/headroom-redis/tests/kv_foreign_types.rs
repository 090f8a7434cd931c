//! The KV store's conditional writes over keys another program filled with a Redis type other
//! than a string, standalone and cluster.

use std::time::Duration;

use bytes::Bytes;
use headroom_core::kv::{KvEntry, KvStore, VersionAt};
use headroom_core::{BackendErrorKind, Key};
use headroom_redis::{Redis, RedisConfig, RedisKvStore};
use headroom_testkit::{shared_cluster, shared_server, unique_namespace};

const HOUR: Duration = Duration::from_secs(3_600);

async fn standalone() -> RedisKvStore {
    RedisKvStore::new(
        Redis::connect(RedisConfig::standalone(shared_server().url()))
            .await
            .expect("connect"),
    )
}

async fn cluster() -> RedisKvStore {
    RedisKvStore::new(
        Redis::connect(RedisConfig::cluster(shared_cluster().urls()))
            .await
            .expect("connect"),
    )
}

async fn write_hash(store: &RedisKvStore, key: &Key) {
    store
        .redis()
        .query::<()>(
            redis::cmd("HSET")
                .arg(key.as_bytes())
                .arg("field")
                .arg("value"),
        )
        .await
        .expect("HSET");
}

async fn type_of(store: &RedisKvStore, key: &Key) -> String {
    store
        .redis()
        .query(redis::cmd("TYPE").arg(key.as_bytes()))
        .await
        .expect("TYPE")
}

/// A value whose version (a little-endian `u64` first) is `version`.
fn versioned(version: u64, rest: &str) -> Bytes {
    [&version.to_le_bytes()[..], rest.as_bytes()]
        .concat()
        .into()
}

fn entry(key: &Key, value: Bytes) -> KvEntry {
    KvEntry {
        key: key.clone(),
        value,
        ttl: HOUR,
    }
}

/// One call (one script: the keys share a slot) writes over a hash as over bytes another
/// program wrote, and still compares versions for the other keys.
async fn set_if_newer_replaces_a_key_of_another_type(store: RedisKvStore) {
    let ns = unique_namespace("foreign-type");
    let [foreign, absent, newer] =
        ["{t}foreign", "{t}absent", "{t}newer"].map(|k| ns.key(k).unwrap());
    write_hash(&store, &foreign).await;
    store
        .set(&newer, versioned(9, "held"), HOUR)
        .await
        .expect("set");

    let written = store
        .set_if_newer(
            &[
                entry(&foreign, versioned(5, "mine")),
                entry(&absent, versioned(5, "mine")),
                entry(&newer, versioned(5, "older")),
            ],
            VersionAt::new(0),
        )
        .await
        .expect("a key of another type does not fail the batch");
    assert_eq!(written, 2);
    assert_eq!(type_of(&store, &foreign).await, "string");
    assert_eq!(
        store.get(&foreign).await.expect("get"),
        Some(versioned(5, "mine"))
    );
    assert_eq!(
        store.get(&absent).await.expect("get"),
        Some(versioned(5, "mine"))
    );
    assert_eq!(
        store.get(&newer).await.expect("get"),
        Some(versioned(9, "held"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_if_newer_replaces_a_key_of_another_type_on_redis() {
    set_if_newer_replaces_a_key_of_another_type(standalone().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_if_newer_replaces_a_key_of_another_type_on_redis_cluster() {
    set_if_newer_replaces_a_key_of_another_type(cluster().await).await;
}

/// A hash never holds the bytes expected: nothing is deleted, and the call does not fail.
async fn delete_if_eq_leaves_a_key_of_another_type(store: RedisKvStore) {
    let key = unique_namespace("foreign-type").key("k").unwrap();
    write_hash(&store, &key).await;
    let deleted = store
        .delete_if_eq(&key, b"expected")
        .await
        .expect("a key of another type does not fail the call");
    assert!(!deleted);
    assert_eq!(type_of(&store, &key).await, "hash");
    // Reads still tell it apart from an absent key: foreign data, a typed corrupt error.
    let error = store.get(&key).await.expect_err("a key of another type");
    assert_eq!(error.kind(), BackendErrorKind::Corrupt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_if_eq_leaves_a_key_of_another_type_on_redis() {
    delete_if_eq_leaves_a_key_of_another_type(standalone().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_if_eq_leaves_a_key_of_another_type_on_redis_cluster() {
    delete_if_eq_leaves_a_key_of_another_type(cluster().await).await;
}
