//! What the Redis lease store keeps in Redis, beyond the conformance suite.

use std::time::Duration;

use headroom_core::lease::{Begin, BeginId, Fenced, LeaseStore};
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
