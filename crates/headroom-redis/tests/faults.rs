//! The shared handle under real faults: a killed and restarted server, a cut, stalled or
//! delayed connection, and foreign data under the namespace.

use std::time::{Duration, Instant};

use headroom_core::bus::{BusEvent, InvalidationBus, LossReason};
use headroom_core::kv::KvStore;
use headroom_core::{BackendErrorKind, Classify};
use headroom_redis::{Redis, RedisBus, RedisConfig, RedisKvStore, tracked_writes};
use headroom_testkit::{FaultProxy, RedisCluster, RedisServer, shared_server, unique_namespace};

const TIMEOUT: Duration = Duration::from_millis(300);
const HOUR: Duration = Duration::from_secs(3_600);

fn config(url: String) -> RedisConfig {
    RedisConfig::standalone(url)
        .with_command_timeout(TIMEOUT)
        .with_connect_timeout(TIMEOUT)
}

/// Retries `op` until it succeeds, within a bounded number of attempts; returns the attempts.
async fn attempts_until_ok<F, Fut, T>(mut op: F) -> usize
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, headroom_core::BackendError>>,
{
    for attempt in 1..=100 {
        if op().await.is_ok() {
            return attempt;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no success within 100 attempts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_restarted_server_reconnects_by_itself() {
    let server = RedisServer::start();
    let store = RedisKvStore::new(Redis::connect(config(server.url())).await.expect("connect"));
    let key = unique_namespace("restart").key("k").unwrap();
    store
        .set(&key, "before".into(), HOUR)
        .await
        .expect("set before the kill");

    server.kill();
    let err = store.get(&key).await.expect_err("the server is down");
    assert!(
        err.is_retryable(),
        "a dead server is a retryable error: {err:?}"
    );

    server.restart();
    // The handle reconnects in the background; the first command after the restart may still
    // see the broken connection, and every later one must succeed.
    let attempts = attempts_until_ok(|| store.get(&key)).await;
    assert!(attempts <= 3, "reconnection took {attempts} attempts");
    store
        .set(&key, "after".into(), HOUR)
        .await
        .expect("set after the restart");
    assert_eq!(
        store.get(&key).await.expect("get").as_deref(),
        Some(&b"after"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connection_fails_within_the_timeout_and_recovers() {
    let server = shared_server();
    let proxy = FaultProxy::start(server.addr()).await;
    let store = RedisKvStore::new(Redis::connect(config(proxy.url())).await.expect("connect"));
    let key = unique_namespace("cut").key("k").unwrap();
    store
        .set(&key, "v".into(), HOUR)
        .await
        .expect("set through the proxy");

    proxy.cut();
    for _ in 0..3 {
        let started = Instant::now();
        let err = store.get(&key).await.expect_err("the connection is cut");
        assert!(
            matches!(
                err.kind(),
                BackendErrorKind::Connection | BackendErrorKind::Timeout
            ),
            "{err:?}"
        );
        assert!(
            started.elapsed() < TIMEOUT * 3,
            "took {:?}",
            started.elapsed()
        );
    }

    proxy.restore();
    attempts_until_ok(|| store.get(&key)).await;
    assert_eq!(
        store.get(&key).await.expect("get").as_deref(),
        Some(&b"v"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connection_times_out_instead_of_hanging() {
    let server = shared_server();
    let proxy = FaultProxy::start(server.addr()).await;
    let store = RedisKvStore::new(Redis::connect(config(proxy.url())).await.expect("connect"));
    let key = unique_namespace("stall").key("k").unwrap();
    store.set(&key, "v".into(), HOUR).await.expect("set");

    proxy.stall();
    let started = Instant::now();
    let err = store
        .get(&key)
        .await
        .expect_err("the connection is stalled");
    assert!(err.is_timeout(), "{err:?}");
    assert!(
        started.elapsed() < TIMEOUT * 3,
        "took {:?}",
        started.elapsed()
    );

    proxy.restore();
    attempts_until_ok(|| store.get(&key)).await;
    assert_eq!(
        store.get(&key).await.expect("get").as_deref(),
        Some(&b"v"[..])
    );
}

/// A connection that goes silent without closing (a frozen host, a dead NAT entry) is never
/// reported broken by the socket: the handle notices the silence by its timeouts and dials a
/// new connection, while the old one stays silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connection_is_replaced_by_a_new_one() {
    let server = shared_server();
    let proxy = FaultProxy::start(server.addr()).await;
    let store = RedisKvStore::new(Redis::connect(config(proxy.url())).await.expect("connect"));
    let key = unique_namespace("silent").key("k").unwrap();
    store.set(&key, "v".into(), HOUR).await.expect("set");

    proxy.silence();
    let err = store.get(&key).await.expect_err("the connection is silent");
    assert!(err.is_timeout(), "{err:?}");

    let attempts = attempts_until_ok(|| store.get(&key)).await;
    assert!(
        attempts <= 10,
        "replacing the connection took {attempts} attempts"
    );
    assert_eq!(
        store.get(&key).await.expect("get").as_deref(),
        Some(&b"v"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_server_times_out_then_answers_after_resume() {
    let server = RedisServer::start();
    let store = RedisKvStore::new(Redis::connect(config(server.url())).await.expect("connect"));
    let key = unique_namespace("pause").key("k").unwrap();
    store.set(&key, "v".into(), HOUR).await.expect("set");

    server.pause();
    let err = store.get(&key).await.expect_err("the server is frozen");
    assert!(err.is_timeout(), "{err:?}");

    server.resume();
    attempts_until_ok(|| store.get(&key)).await;
    assert_eq!(
        store.get(&key).await.expect("get").as_deref(),
        Some(&b"v"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_connection_still_answers_within_the_timeout() {
    let server = shared_server();
    let proxy = FaultProxy::start(server.addr()).await;
    let store = RedisKvStore::new(Redis::connect(config(proxy.url())).await.expect("connect"));
    let key = unique_namespace("delay").key("k").unwrap();
    store.set(&key, "v".into(), HOUR).await.expect("set");
    proxy.delay(Duration::from_millis(20));
    assert_eq!(
        store.get(&key).await.expect("slow but in time").as_deref(),
        Some(&b"v"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_data_under_the_namespace_is_bytes_or_a_typed_error() {
    let redis = Redis::connect(config(shared_server().url()))
        .await
        .expect("connect");
    let store = RedisKvStore::new(redis.clone());
    let ns = unique_namespace("foreign");
    let garbage = ns.key("garbage").unwrap();
    let list = ns.key("list").unwrap();
    let foreign: &[u8] = b"\x00\xff\xfenot-an-envelope";
    // Another program writes under the namespace: raw bytes, and a list.
    redis
        .query::<()>(redis::cmd("SET").arg(garbage.as_bytes()).arg(foreign))
        .await
        .expect("raw SET");
    redis
        .query::<()>(redis::cmd("RPUSH").arg(list.as_bytes()).arg("a").arg("b"))
        .await
        .expect("raw RPUSH");

    // Bytes in, bytes out: a string value is returned whatever it contains.
    let value = store.get(&garbage).await.expect("get garbage");
    assert_eq!(value.as_deref(), Some(foreign));

    // A key of another type is foreign data: a typed corrupt error alone, absent inside a
    // batch read.
    let err = store.get(&list).await.expect_err("wrong type");
    assert_eq!(err.kind(), BackendErrorKind::Corrupt);
    assert!(!err.is_retryable());
    let values = store
        .get_many(&[garbage.clone(), list.clone()])
        .await
        .expect("MGET");
    assert_eq!(
        values[1], None,
        "MGET answers nil for a key of another type"
    );

    // Overwriting and deleting foreign keys works.
    store
        .set(&list, "mine now".into(), HOUR)
        .await
        .expect("overwrite");
    assert_eq!(store.delete(&[garbage, list]).await.expect("delete"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_fails_fast_at_connect() {
    let server = RedisServer::start();
    let url = server.url();
    drop(server);
    let started = Instant::now();
    let err = Redis::connect(config(url))
        .await
        .expect_err("nothing listens");
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        started.elapsed() < TIMEOUT * 4,
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn invalid_configuration_is_a_config_error() {
    let err = Redis::connect(RedisConfig::cluster(Vec::<String>::new()))
        .await
        .expect_err("no URL");
    assert_eq!(err.kind(), BackendErrorKind::Config);
    let mut two = RedisConfig::standalone("redis://127.0.0.1:1");
    two.urls.push("redis://127.0.0.1:2".into());
    let err = Redis::connect(two)
        .await
        .expect_err("two URLs for one server");
    assert_eq!(err.kind(), BackendErrorKind::Config);
    let err = Redis::connect(RedisConfig::standalone("http://nope"))
        .await
        .expect_err("bad URL");
    assert_eq!(err.kind(), BackendErrorKind::Config);
    // TLS is left off: a `rediss` URL says so rather than failing as a connection would.
    let err = Redis::connect(RedisConfig::standalone("rediss://127.0.0.1:1"))
        .await
        .expect_err("no TLS built in");
    assert_eq!(err.kind(), BackendErrorKind::Config, "{err}");
    // The longest reconnection delay is also how often connections are checked: zero would
    // ping Redis without a pause.
    let mut busy = RedisConfig::standalone(shared_server().url());
    busy.reconnect_min_delay = Duration::ZERO;
    busy.reconnect_max_delay = Duration::ZERO;
    let err = Redis::connect(busy)
        .await
        .expect_err("zero reconnection delay");
    assert_eq!(err.kind(), BackendErrorKind::Config);
    assert!(
        err.detail()
            .is_some_and(|detail| detail.contains("reconnect_max_delay")),
        "{err}"
    );
    let mut zero = RedisConfig::standalone(shared_server().url());
    zero.command_timeout = Duration::ZERO;
    let err = Redis::connect(zero)
        .await
        .expect_err("zero command timeout");
    assert!(
        err.detail()
            .is_some_and(|detail| detail.contains("command_timeout")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_node_killed_and_restarted_is_reconnected() {
    let cluster = RedisCluster::start();
    let redis = Redis::connect(
        RedisConfig::cluster(cluster.urls())
            .with_command_timeout(Duration::from_secs(1))
            .with_connect_timeout(TIMEOUT),
    )
    .await
    .expect("connect");
    let store = RedisKvStore::new(redis);
    let ns = unique_namespace("cluster-restart");
    let keys: Vec<_> = (0..30).map(|i| ns.key(format!("k{i}")).unwrap()).collect();
    for key in &keys {
        store.set(key, "v".into(), HOUR).await.expect("set");
    }

    let node = &cluster.nodes()[1];
    node.kill();
    node.restart();
    cluster.wait_until_ok();
    // The restarted master lost its data (no persistence) but serves its slots again.
    attempts_until_ok(|| store.get_many(&keys)).await;
    for key in &keys {
        store
            .set(key, "again".into(), HOUR)
            .await
            .expect("set after restart");
    }
    let values = store.get_many(&keys).await.expect("get_many");
    assert!(values.iter().all(|v| v.as_deref() == Some(&b"again"[..])));
}

/// A configuration for the shared cluster that dials every node through a proxy of its own,
/// with `command_timeout`, and the proxies.
async fn cluster_through_proxies(command_timeout: Duration) -> (RedisConfig, Vec<FaultProxy>) {
    let cluster = headroom_testkit::shared_cluster();
    let mut proxies = Vec::new();
    let mut mapped = RedisConfig::cluster(cluster.urls())
        .with_command_timeout(command_timeout)
        .with_connect_timeout(TIMEOUT);
    for node in cluster.nodes() {
        let proxy = FaultProxy::start(node.addr()).await;
        mapped = mapped.with_address(node.addr().to_string(), proxy.addr().to_string());
        proxies.push(proxy);
    }
    (mapped, proxies)
}

async fn next_event(sub: &mut headroom_core::bus::Subscription) -> BusEvent {
    tokio::time::timeout(Duration::from_secs(10), sub.next_event())
        .await
        .expect("an event within 10 s")
        .expect("the bus is not shut down")
}

async fn bus_survives_a_restart(server: &RedisServer, config: RedisConfig) {
    let redis = Redis::connect(config).await.expect("connect");
    let bus = RedisBus::connect(redis).await.expect("bus");
    let channel = unique_namespace("bus-restart").key("ch").unwrap();
    let mut sub = bus.subscribe(&channel).await.expect("subscribe");
    assert_eq!(next_event(&mut sub).await, BusEvent::Live);
    bus.publish(&channel, "before".into())
        .await
        .expect("publish");
    assert_eq!(
        next_event(&mut sub).await,
        BusEvent::Message("before".into())
    );

    server.kill();
    assert_eq!(
        next_event(&mut sub).await,
        BusEvent::Lost(LossReason::Disconnected)
    );
    // An outage longer than the client's own reconnection attempts last.
    tokio::time::sleep(Duration::from_secs(5)).await;
    server.restart();
    assert_eq!(
        next_event(&mut sub).await,
        BusEvent::Live,
        "resubscribed after the restart"
    );
    attempts_until_ok(|| bus.publish(&channel, "after".into())).await;
    assert_eq!(
        next_event(&mut sub).await,
        BusEvent::Message("after".into())
    );
}

/// The bus through `proxies`, whose connections then all go silent for good: each
/// subscription yields `Lost`, then `Live` on a new connection, and messages flow again.
async fn bus_survives_silence(config: RedisConfig, proxies: &[FaultProxy]) {
    let redis = Redis::connect(config).await.expect("connect");
    let bus = RedisBus::connect(redis).await.expect("bus");
    let channel = unique_namespace("bus-silent").key("ch").unwrap();
    let mut sub = bus.subscribe(&channel).await.expect("subscribe");
    assert_eq!(next_event(&mut sub).await, BusEvent::Live);

    for proxy in proxies {
        proxy.silence();
    }
    // A publish on the silent connection never reaches Redis: exactly one arrives.
    lost_then_live_again(
        &bus,
        &channel,
        &mut sub,
        "subscribed again on a new connection",
    )
    .await;
}

/// The subscription reports a loss, then `Live` (`why`), and a message published after
/// reaches it.
async fn lost_then_live_again(
    bus: &RedisBus,
    channel: &headroom_core::Key,
    sub: &mut headroom_core::bus::Subscription,
    why: &str,
) {
    assert_eq!(
        next_event(sub).await,
        BusEvent::Lost(LossReason::Disconnected)
    );
    assert_eq!(next_event(sub).await, BusEvent::Live, "{why}");
    attempts_until_ok(|| bus.publish(channel, "after".into())).await;
    assert_eq!(next_event(sub).await, BusEvent::Message("after".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_replaces_a_silent_subscriber_connection() {
    let server = shared_server();
    let proxy = FaultProxy::start(server.addr()).await;
    bus_survives_silence(config(proxy.url()), &[proxy]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_replaces_silent_cluster_connections() {
    let (mapped, proxies) = cluster_through_proxies(TIMEOUT).await;
    bus_survives_silence(mapped, &proxies).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_reports_loss_on_restart_and_resubscribes() {
    let server = RedisServer::start();
    bus_survives_a_restart(&server, config(server.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_reports_loss_when_the_proxy_cuts_and_resubscribes() {
    let server = shared_server();
    let proxy = FaultProxy::start(server.addr()).await;
    let redis = Redis::connect(config(proxy.url())).await.expect("connect");
    let bus = RedisBus::connect(redis).await.expect("bus");
    let channel = unique_namespace("bus-cut").key("ch").unwrap();
    let mut sub = bus.subscribe(&channel).await.expect("subscribe");
    assert_eq!(next_event(&mut sub).await, BusEvent::Live);

    proxy.cut();
    assert_eq!(
        next_event(&mut sub).await,
        BusEvent::Lost(LossReason::Disconnected)
    );
    proxy.restore();
    assert_eq!(next_event(&mut sub).await, BusEvent::Live);
    attempts_until_ok(|| bus.publish(&channel, "after".into())).await;
    assert_eq!(
        next_event(&mut sub).await,
        BusEvent::Message("after".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracked_writes_report_keys_changed_by_anyone_and_survive_a_restart() {
    let server = RedisServer::start();
    let redis = Redis::connect(config(server.url())).await.expect("connect");
    let mut writes = tracked_writes(&redis, b"shop:").await.expect("tracking");
    assert_eq!(next_event(&mut writes).await, BusEvent::Live);

    // Another program writes, outside the prefix and inside it.
    server.cli(&["SET", "elsewhere:x", "1"]);
    server.cli(&["SET", "shop:k", "1"]);
    assert_eq!(
        next_event(&mut writes).await,
        BusEvent::Message("shop:k".into())
    );
    server.cli(&["DEL", "shop:k"]);
    assert_eq!(
        next_event(&mut writes).await,
        BusEvent::Message("shop:k".into())
    );
    // A flush changes everything.
    server.cli(&["FLUSHALL"]);
    assert_eq!(
        next_event(&mut writes).await,
        BusEvent::Lost(LossReason::Disconnected)
    );
    assert_eq!(next_event(&mut writes).await, BusEvent::Live);

    server.kill();
    assert_eq!(
        next_event(&mut writes).await,
        BusEvent::Lost(LossReason::Disconnected)
    );
    server.restart();
    assert_eq!(
        next_event(&mut writes).await,
        BusEvent::Live,
        "tracking is on again"
    );
    server.cli(&["SET", "shop:after", "1"]);
    assert_eq!(
        next_event(&mut writes).await,
        BusEvent::Message("shop:after".into())
    );
}

/// Messages a subscription had no room for are reported as a loss once it has room again, even
/// when no message follows them: a subscriber must not wait for an event that may not come to
/// learn that it missed some.
#[tokio::test(flavor = "current_thread")]
async fn a_bus_reports_messages_it_had_no_room_for_without_a_later_message() {
    let server = shared_server();
    let redis = Redis::connect(config(server.url())).await.expect("connect");
    let bus = RedisBus::connect(redis).await.expect("bus");
    let channel = unique_namespace("bus-burst").key("ch").unwrap();
    let mut subscription = bus.subscribe(&channel).await.expect("subscribe");
    assert_eq!(next_event(&mut subscription).await, BusEvent::Live);
    // Well over the events a subscription holds (1,024), none read meanwhile.
    let sent = 2_000;
    for i in 0..sent {
        bus.publish(&channel, bytes::Bytes::from(i.to_string()))
            .await
            .expect("publish");
    }
    let mut messages = 0;
    let after = loop {
        match next_event(&mut subscription).await {
            BusEvent::Message(_) => messages += 1,
            other => break other,
        }
    };
    assert!(messages < sent, "{messages} of {sent} held");
    assert!(
        matches!(after, BusEvent::Lost(LossReason::Lagged(_))),
        "{after:?}"
    );
    assert_eq!(next_event(&mut subscription).await, BusEvent::Live);
}

/// A burst of more invalidations than the subscription holds is reported as a loss even when
/// no write follows it, so a cache drops what it may have missed rather than serving it.
/// (One thread: the burst is all forwarded before the test reads any of it.)
#[tokio::test(flavor = "current_thread")]
async fn tracked_writes_report_a_burst_they_could_not_hold_without_a_later_write() {
    let server = RedisServer::start();
    let redis = Redis::connect(config(server.url())).await.expect("connect");
    let mut writes = tracked_writes(&redis, b"shop:").await.expect("tracking");
    assert_eq!(next_event(&mut writes).await, BusEvent::Live);
    // Well over the events a subscription holds (1,024).
    let keys = 5_000;
    let mut mset = vec!["MSET".to_owned()];
    for i in 0..keys {
        mset.extend([format!("shop:{i}"), "1".to_owned()]);
    }
    server.cli(&mset.iter().map(String::as_str).collect::<Vec<_>>());
    let mut messages = 0;
    let after = loop {
        match next_event(&mut writes).await {
            BusEvent::Message(_) => messages += 1,
            other => break other,
        }
    };
    assert!(messages < keys, "{messages} of {keys} keys held");
    assert!(
        matches!(after, BusEvent::Lost(LossReason::Lagged(_))),
        "{after:?}"
    );
    assert_eq!(next_event(&mut writes).await, BusEvent::Live);
}

/// A burst the subscription could not hold, then a cut connection: the loss is reported, and
/// `Live` comes only once tracking is on again, never while the connection is down (a cache
/// would take its L1 back with no invalidation arriving).
#[tokio::test(flavor = "current_thread")]
async fn tracked_writes_are_live_again_only_once_tracking_is_on() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.addr()).await;
    let redis = Redis::connect(config(proxy.url())).await.expect("connect");
    let mut writes = tracked_writes(&redis, b"shop:").await.expect("tracking");
    assert_eq!(next_event(&mut writes).await, BusEvent::Live);
    let mut mset = vec!["MSET".to_owned()];
    for i in 0..5_000 {
        mset.extend([format!("shop:{i}"), "1".to_owned()]);
    }
    server.cli(&mset.iter().map(String::as_str).collect::<Vec<_>>());
    // Let the burst fill the subscription before the cut.
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.cut();
    tokio::time::sleep(headroom_redis::TRACKING_PING_INTERVAL + TIMEOUT * 2).await;
    let lost = loop {
        match next_event(&mut writes).await {
            BusEvent::Message(_) => {}
            other => break other,
        }
    };
    assert!(matches!(lost, BusEvent::Lost(_)), "{lost:?}");
    let cut_for = Instant::now() + Duration::from_secs(3);
    while let Some(left) = cut_for.checked_duration_since(Instant::now()) {
        match tokio::time::timeout(left, writes.next_event()).await {
            Err(_) => break,
            Ok(event) => assert!(
                !matches!(event, Some(BusEvent::Live)),
                "live while the connection is cut"
            ),
        }
    }
    proxy.restore();
    let live = loop {
        match next_event(&mut writes).await {
            BusEvent::Live => break true,
            BusEvent::Lost(_) => {}
            other => panic!("{other:?} before tracking is on again"),
        }
    };
    assert!(live);
    assert_eq!(tracking_clients(&server), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracked_writes_are_refused_on_a_cluster() {
    let redis = Redis::connect(RedisConfig::cluster(
        headroom_testkit::shared_cluster().urls(),
    ))
    .await
    .expect("connect");
    let err = tracked_writes(&redis, b"shop:").await.expect_err("cluster");
    assert_eq!(err.kind(), BackendErrorKind::Config);
}

/// Moving the channel's slot to another master makes the old owner drop the sharded
/// subscription (an unsolicited `SUNSUBSCRIBE`): the bus reports the loss, subscribes again on
/// the new owner and delivers from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_follows_its_channel_when_the_slot_migrates() {
    let cluster = RedisCluster::start();
    let redis = Redis::connect(RedisConfig::cluster(cluster.urls()).with_connect_timeout(TIMEOUT))
        .await
        .expect("connect");
    let bus = RedisBus::connect(redis).await.expect("bus");
    let channel = unique_namespace("bus-migrate").key("ch").unwrap();
    let mut sub = bus.subscribe(&channel).await.expect("subscribe");
    assert_eq!(next_event(&mut sub).await, BusEvent::Live);
    bus.publish(&channel, "before".into())
        .await
        .expect("publish");
    assert_eq!(
        next_event(&mut sub).await,
        BusEvent::Message("before".into())
    );

    let name = String::from_utf8(channel.to_bytes().to_vec()).unwrap();
    let slot = cluster.keyslot(&name);
    let to = (cluster.slot_owner(slot) + 1) % cluster.masters();
    cluster.migrate_slot(slot, to);
    assert_eq!(
        next_event(&mut sub).await,
        BusEvent::Lost(LossReason::Disconnected),
        "the old owner dropped the subscription"
    );
    assert_eq!(
        next_event(&mut sub).await,
        BusEvent::Live,
        "subscribed on the new owner"
    );
    attempts_until_ok(|| bus.publish(&channel, "after".into())).await;
    assert_eq!(
        next_event(&mut sub).await,
        BusEvent::Message("after".into())
    );
}

/// A tracking connection that stalls without closing is noticed by its pings: the
/// subscription reports a loss, and tracking is on again once the connection answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracked_writes_report_a_stalled_connection_as_lost() {
    let server = shared_server();
    let proxy = FaultProxy::start(server.addr()).await;
    let redis = Redis::connect(config(proxy.url())).await.expect("connect");
    let prefix = format!("{}:", unique_namespace("track-stall").as_str());
    let mut writes = tracked_writes(&redis, prefix.as_bytes())
        .await
        .expect("tracking");
    assert_eq!(next_event(&mut writes).await, BusEvent::Live);

    proxy.stall();
    let stalled = Instant::now();
    assert_eq!(
        next_event(&mut writes).await,
        BusEvent::Lost(LossReason::Disconnected)
    );
    let noticed = stalled.elapsed();
    // The documented bound, plus slack for scheduling on a loaded machine.
    let bound = headroom_redis::TRACKING_PING_INTERVAL + TIMEOUT;
    assert!(
        noticed <= bound + Duration::from_millis(300),
        "stall noticed after {noticed:?}"
    );
    println!("tracking stall noticed after {noticed:?} (bound {bound:?})");

    proxy.restore();
    assert_eq!(next_event(&mut writes).await, BusEvent::Live);
    let key = format!("{prefix}k");
    server.cli(&["SET", &key, "1"]);
    assert_eq!(next_event(&mut writes).await, BusEvent::Message(key.into()));
}

/// A tracking connection that goes silent for good is reported lost and replaced: tracking
/// is on again on a new connection, and writes are reported again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracked_writes_replace_a_silent_connection() {
    let server = shared_server();
    let proxy = FaultProxy::start(server.addr()).await;
    let redis = Redis::connect(config(proxy.url())).await.expect("connect");
    let prefix = format!("{}:", unique_namespace("track-silent").as_str());
    let mut writes = tracked_writes(&redis, prefix.as_bytes())
        .await
        .expect("tracking");
    assert_eq!(next_event(&mut writes).await, BusEvent::Live);

    proxy.silence();
    assert_eq!(
        next_event(&mut writes).await,
        BusEvent::Lost(LossReason::Disconnected)
    );
    assert_eq!(next_event(&mut writes).await, BusEvent::Live);
    let key = format!("{prefix}k");
    server.cli(&["SET", &key, "1"]);
    assert_eq!(next_event(&mut writes).await, BusEvent::Message(key.into()));
}

/// Whether any client connected to `server` has key tracking on.
fn tracking_clients(server: &RedisServer) -> usize {
    server
        .cli(&["CLIENT", "LIST"])
        .lines()
        .filter(|line| {
            line.split_whitespace()
                .any(|field| field.starts_with("flags=") && field.contains('t'))
        })
        .count()
}

/// Polls `condition` for up to 5 s.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..250 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what} within 5 s");
}

/// Dropping the last subscription of a channel unsubscribes it in Redis; dropping a tracked
/// writes subscription closes its tracking connection; dropping the bus and its
/// subscriptions closes its subscriber connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_subscriptions_release_redis() {
    let server = RedisServer::start();
    let redis = Redis::connect(config(server.url())).await.expect("connect");
    let clients = |server: &RedisServer| server.cli(&["CLIENT", "LIST"]).lines().count();
    let before = clients(&server);
    let bus = RedisBus::connect(redis.clone()).await.expect("bus");
    let channel = unique_namespace("bus-drop").key("ch").unwrap();
    let name = String::from_utf8(channel.to_bytes().to_vec()).unwrap();
    let subscribers = |server: &RedisServer| {
        let out = server.cli(&["PUBSUB", "NUMSUB", &name]);
        out.lines().nth(1).unwrap_or("").trim().to_owned()
    };
    let mut first = bus.subscribe(&channel).await.expect("subscribe");
    let mut second = bus.subscribe(&channel).await.expect("subscribe");
    assert_eq!(next_event(&mut first).await, BusEvent::Live);
    assert_eq!(next_event(&mut second).await, BusEvent::Live);
    assert_eq!(subscribers(&server), "1");
    drop(first);
    bus.publish(&channel, "x".into()).await.expect("publish");
    assert_eq!(next_event(&mut second).await, BusEvent::Message("x".into()));
    assert_eq!(subscribers(&server), "1", "one subscription is left");
    drop(second);
    eventually("the channel unsubscribed", || subscribers(&server) == "0").await;
    // Subscribing again works.
    let mut again = bus.subscribe(&channel).await.expect("subscribe");
    assert_eq!(next_event(&mut again).await, BusEvent::Live);
    assert_eq!(subscribers(&server), "1");

    let mut writes = tracked_writes(&redis, b"shop:").await.expect("tracking");
    assert_eq!(next_event(&mut writes).await, BusEvent::Live);
    assert_eq!(tracking_clients(&server), 1);
    drop(writes);
    eventually("the tracking connection closed", || {
        tracking_clients(&server) == 0
    })
    .await;
    drop((again, bus));
    eventually("the subscriber connection closed", || {
        clients(&server) == before
    })
    .await;
}

/// The master serving the channel dies and a replica takes over: the bus reports the loss,
/// subscribes on the new master and delivers from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_follows_its_channel_through_a_master_failover() {
    let cluster = RedisCluster::start_with(3, 1);
    let redis = Redis::connect(
        RedisConfig::cluster(cluster.urls())
            .with_command_timeout(Duration::from_secs(1))
            .with_connect_timeout(TIMEOUT),
    )
    .await
    .expect("connect");
    let bus = RedisBus::connect(redis).await.expect("bus");
    let channel = unique_namespace("bus-failover").key("ch").unwrap();
    let mut sub = bus.subscribe(&channel).await.expect("subscribe");
    assert_eq!(next_event(&mut sub).await, BusEvent::Live);

    let name = String::from_utf8(channel.to_bytes().to_vec()).unwrap();
    let owner = cluster.slot_owner(cluster.keyslot(&name));
    cluster.fail_over(owner);
    lost_then_live_again(
        &bus,
        &channel,
        &mut sub,
        "subscribed on the promoted replica",
    )
    .await;
}

/// A client whose address map sends every cluster node through its own proxy: it works
/// through them, fails (typed, within its timeout) while they are cut, and recovers after,
/// while a client without the map is never affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_map_dials_every_cluster_node_through_its_mapped_address() {
    let cluster = headroom_testkit::shared_cluster();
    let (mapped, proxies) = cluster_through_proxies(TIMEOUT).await;
    let through_proxies = RedisKvStore::new(Redis::connect(mapped).await.expect("connect"));
    let direct = RedisKvStore::new(
        Redis::connect(RedisConfig::cluster(cluster.urls()))
            .await
            .expect("connect"),
    );
    let ns = unique_namespace("address-map");
    let keys: Vec<_> = (0..30).map(|i| ns.key(format!("k{i}")).unwrap()).collect();
    for key in &keys {
        through_proxies
            .set(key, "v".into(), HOUR)
            .await
            .expect("set");
    }

    for proxy in &proxies {
        proxy.cut();
    }
    let start = Instant::now();
    let err = through_proxies
        .get_many(&keys)
        .await
        .expect_err("every node is cut off");
    assert!(
        matches!(
            err.kind(),
            BackendErrorKind::Timeout | BackendErrorKind::Connection
        ),
        "{err}"
    );
    assert!(start.elapsed() < TIMEOUT * 4, "{:?}", start.elapsed());
    let values = direct.get_many(&keys).await.expect("the direct client");
    assert!(values.iter().all(|v| v.as_deref() == Some(&b"v"[..])));

    for proxy in &proxies {
        proxy.restore();
    }
    attempts_until_ok(|| through_proxies.get_many(&keys)).await;
}

#[tokio::test]
async fn an_address_map_entry_that_is_not_host_port_is_a_config_error() {
    let config = RedisConfig::cluster(["redis://127.0.0.1:1"]).with_address("10.0.0.1", "x:1");
    let err = Redis::connect(config).await.expect_err("bad map");
    assert_eq!(err.kind(), BackendErrorKind::Config);
}

/// Callers that give up before the command timeout (the cache's L2 timeout, the rate
/// limiter's) never see the handle's own timeout: the silence is noticed all the same, by the
/// handle's own pings, and the connection replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connection_is_replaced_when_callers_give_up_first() {
    let server = shared_server();
    let proxy = FaultProxy::start(server.addr()).await;
    let store = RedisKvStore::new(Redis::connect(config(proxy.url())).await.expect("connect"));
    let key = unique_namespace("silent-impatient").key("k").unwrap();
    store.set(&key, "v".into(), HOUR).await.expect("set");

    proxy.silence();
    let impatient = || async {
        match tokio::time::timeout(TIMEOUT / 3, store.get(&key)).await {
            Ok(result) => result,
            Err(_) => Err(headroom_core::BackendError::new(BackendErrorKind::Timeout)),
        }
    };
    let attempts = attempts_until_ok(impatient).await;
    // The handle pings every `reconnect_max_delay` (1 s): a few seconds at most.
    assert!(
        attempts <= 40,
        "replacing the connection took {attempts} attempts"
    );
}

/// Cluster connections that go silent without closing are replaced as a standalone one is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_cluster_connections_are_replaced_by_new_ones() {
    let (mapped, proxies) = cluster_through_proxies(TIMEOUT).await;
    let store = RedisKvStore::new(Redis::connect(mapped).await.expect("connect"));
    let key = unique_namespace("silent-cluster").key("k").unwrap();
    store.set(&key, "v".into(), HOUR).await.expect("set");

    for proxy in &proxies {
        proxy.silence();
    }
    let err = store
        .get(&key)
        .await
        .expect_err("every connection is silent");
    assert!(err.is_timeout(), "{err:?}");

    let attempts = attempts_until_ok(|| store.get(&key)).await;
    assert!(
        attempts <= 10,
        "replacing the connections took {attempts} attempts"
    );
    assert_eq!(
        store.get(&key).await.expect("get").as_deref(),
        Some(&b"v"[..])
    );
}

/// A command that times out on a cluster is not sent again behind the caller's back: the
/// caller saw an error, and a write must not then happen twice (a rate check spending twice,
/// a job enqueued twice). Each round slows every node past the timeout for a while, then
/// watches the counter the timed-out `INCR` wrote for long enough that a resent one would
/// have landed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_cluster_command_runs_at_most_once() {
    const SHORT: Duration = Duration::from_millis(100);
    let cluster = headroom_testkit::shared_cluster();
    let (mapped, proxies) = cluster_through_proxies(SHORT).await;
    let redis = Redis::connect(mapped).await.expect("connect");
    let direct = Redis::connect(RedisConfig::cluster(cluster.urls()))
        .await
        .expect("connect");
    let ns = unique_namespace("at-most-once");
    for round in 0..12 {
        let key = ns.key(format!("k{round}")).unwrap();
        for proxy in &proxies {
            proxy.delay(SHORT * 3 / 2);
        }
        let err = redis
            .query::<i64>(redis::cmd("INCR").arg(key.as_bytes()))
            .await
            .expect_err("the reply comes after the timeout");
        assert!(err.is_timeout(), "{err:?}");
        // The nodes stay slow a while longer, then recover.
        tokio::time::sleep(SHORT * 8).await;
        for proxy in &proxies {
            proxy.restore();
        }
        let watched = Instant::now();
        while watched.elapsed() < SHORT * 6 {
            let runs: Option<i64> = direct
                .query(redis::cmd("GET").arg(key.as_bytes()))
                .await
                .expect("get");
            assert!(runs <= Some(1), "round {round}: INCR ran {runs:?} times");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A TCP door in front of `upstream` that counts the dials it gets: while open it forwards
/// them, while shut it closes them as soon as they are accepted (and closes the connections it
/// forwarded when it shuts), as a server that is down behind a load balancer would.
struct CountingDoor {
    addr: std::net::SocketAddr,
    shut: tokio::sync::watch::Sender<bool>,
    dials: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingDoor {
    async fn open(upstream: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shut, watching) = tokio::sync::watch::channel(false);
        let dials = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = std::sync::Arc::clone(&dials);
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if *watching.borrow() {
                    continue;
                }
                let mut shut = watching.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = shut.wait_for(|&shut| shut) => {}
                    }
                });
            }
        });
        Self {
            addr,
            shut,
            dials,
            task,
        }
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    fn dials(&self) -> usize {
        self.dials.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn set_shut(&self, shut: bool) {
        self.shut.send_replace(shut);
    }
}

impl Drop for CountingDoor {
    fn drop(&mut self) {
        self.shut.send_replace(true);
        self.task.abort();
    }
}

/// During an outage the handle redials on one schedule of its own, whose delays grow from
/// `reconnect_min_delay` up to `reconnect_max_delay`, however many commands arrive meanwhile;
/// each of those fails within the command timeout, and the handle is back once Redis is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_redialed_with_growing_delays_however_many_commands_arrive() {
    const OUTAGE: Duration = Duration::from_secs(3);
    let server = shared_server();
    let door = CountingDoor::open(server.addr()).await;
    let mut config = config(door.url());
    config.reconnect_min_delay = Duration::from_millis(10);
    config.reconnect_max_delay = Duration::from_secs(1);
    let store = RedisKvStore::new(Redis::connect(config).await.expect("connect"));
    let key = unique_namespace("backoff").key("k").unwrap();
    store.set(&key, "v".into(), HOUR).await.expect("set");

    door.set_shut(true);
    let before = door.dials();
    let started = Instant::now();
    // A command every 10 ms, for a bounded time.
    while started.elapsed() < OUTAGE {
        let sent = Instant::now();
        let err = store.get(&key).await.expect_err("Redis is down");
        assert!(err.is_retryable(), "{err:?}");
        assert!(sent.elapsed() < TIMEOUT * 3, "took {:?}", sent.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let dials = door.dials() - before;
    // Delays of 10, 20, 40, ... ms up to 1 s: dials at 0, 10, 30, 70, 150, 310, 630 ms, then
    // about once a second: 9 in 3 s, and a few more for slack.
    assert!(dials <= 12, "{dials} dials in {OUTAGE:?}");

    door.set_shut(false);
    // Back by the next dial: at most `reconnect_max_delay` away.
    attempts_until_ok(|| store.get(&key)).await;
}

/// A standalone primary demoted by a failover that keeps its clients connected (`REPLICAOF`,
/// with the address moved to the new primary, as managed failovers do) answers writes with
/// `READONLY`: the handle notices, dials again and reaches the new primary behind the address,
/// rather than failing every write until the process restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demoted_primary_is_left_for_the_new_one_behind_its_address() {
    let (old, new) = (RedisServer::start(), RedisServer::start());
    let proxy = FaultProxy::start(old.addr()).await;
    let store = RedisKvStore::new(Redis::connect(config(proxy.url())).await.expect("connect"));
    let key = unique_namespace("demoted").key("k").unwrap();
    let ttl = Duration::from_secs(60);
    store.set(&key, "1".into(), ttl).await.expect("set");
    // The failover: the new server leads, the old one follows it, the address moves.
    old.cli(&["REPLICAOF", "127.0.0.1", &new.port().to_string()]);
    proxy.redirect(new.addr());
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(error) = store.set(&key, "2".into(), ttl).await {
        assert!(Instant::now() < deadline, "writes still fail: {error}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let name = std::str::from_utf8(key.as_bytes()).unwrap();
    assert_eq!(new.cli(&["GET", name]).trim(), "2");
}
