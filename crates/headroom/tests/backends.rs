//! The stores a `Headroom` shares pass the backend conformance suites, through their erased
//! types, on memory and on a real Redis server.

use headroom::Headroom;
use headroom::core::kv::KvStore;
use headroom_testkit::shared_server;

fn memory() -> Headroom {
    Headroom::builder()
        .namespace("conformance")
        .memory()
        .unwrap()
}

headroom_testkit::bus_conformance!(memory_bus, async { memory().invalidation_bus().clone() });
headroom_testkit::lease_store_conformance!(memory_lease, async { memory().lease_store().clone() });
headroom_testkit::rate_store_conformance!(memory_rate, async { memory().rate_store().clone() });

async fn redis() -> Headroom {
    Headroom::builder()
        .namespace("conformance")
        .redis(shared_server().url())
        .await
        .unwrap()
}

headroom_testkit::bus_conformance!(redis_bus, async {
    redis().await.invalidation_bus().clone()
});
headroom_testkit::lease_store_conformance!(redis_lease, async {
    redis().await.lease_store().clone()
});
headroom_testkit::rate_store_conformance!(redis_rate, async { redis().await.rate_store().clone() });

#[tokio::test]
async fn redis_backend_is_reported_and_stores_are_shared() {
    let headroom = redis().await;
    assert_eq!(headroom.backend(), headroom::Backend::Redis);
    let key = headroom.namespace().key("shared").unwrap();
    headroom
        .kv_store()
        .set(&key, "v".into(), std::time::Duration::from_secs(5))
        .await
        .unwrap();
    let other = redis().await;
    assert_eq!(
        other.kv_store().get(&key).await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
}

#[test]
fn invalid_namespace_is_a_typed_error() {
    let err = Headroom::builder()
        .namespace("has space")
        .memory()
        .unwrap_err();
    assert!(matches!(err, headroom::BuildError::Namespace(_)));
}

/// The documented limit: 116 bytes, so that the parts' namespaces inside it fit.
#[test]
fn a_namespace_up_to_116_bytes_builds_and_a_longer_one_is_a_typed_error() {
    let longest = "n".repeat(116);
    let headroom = Headroom::builder().namespace(&longest).memory().unwrap();
    assert_eq!(headroom.namespace().as_str(), longest);
    let err = Headroom::builder()
        .namespace("n".repeat(117))
        .memory()
        .unwrap_err();
    assert!(matches!(err, headroom::BuildError::Namespace(_)), "{err}");
}

#[tokio::test]
async fn unreachable_redis_is_a_backend_error() {
    // Port 1 on loopback: nothing listens there.
    let config = headroom::redis::RedisConfig::standalone("redis://127.0.0.1:1")
        .with_connect_timeout(std::time::Duration::from_millis(200));
    let err = Headroom::builder().redis_with(config).await.unwrap_err();
    assert!(matches!(err, headroom::BuildError::Backend(_)));
}

/// An invalid backend configuration is reported as one, naming the setting, not as an outage.
#[tokio::test]
async fn an_invalid_redis_configuration_is_not_reported_as_an_outage() {
    let mut config = headroom::redis::RedisConfig::standalone("redis://127.0.0.1:1");
    config.command_timeout = std::time::Duration::ZERO;
    let err = Headroom::builder().redis_with(config).await.unwrap_err();
    let message = err.to_string();
    assert!(!message.contains("unavailable"), "{message}");
    assert!(message.contains("command_timeout"), "{message}");
}
