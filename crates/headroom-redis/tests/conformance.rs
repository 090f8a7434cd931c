//! The KV store conformance suite against real Redis, standalone and cluster.

use headroom_redis::{Redis, RedisBus, RedisConfig, RedisKvStore, RedisLeaseStore, RedisRateStore};
use headroom_testkit::conformance::kv::MAX_VALUE_LEN;
use headroom_testkit::{shared_cluster, shared_server};

async fn store(config: RedisConfig) -> RedisKvStore {
    let redis = Redis::connect(config)
        .await
        .expect("connect to the test Redis");
    RedisKvStore::new(redis).with_max_value_len(MAX_VALUE_LEN)
}

headroom_testkit::kv_store_conformance!(
    standalone,
    store(RedisConfig::standalone(shared_server().url()))
);

headroom_testkit::kv_store_conformance!(
    cluster,
    store(RedisConfig::cluster(shared_cluster().urls()))
);

async fn lease_store(config: RedisConfig) -> RedisLeaseStore {
    RedisLeaseStore::new(
        Redis::connect(config)
            .await
            .expect("connect to the test Redis"),
    )
}

headroom_testkit::lease_store_conformance!(
    standalone_lease,
    lease_store(RedisConfig::standalone(shared_server().url()))
);

headroom_testkit::lease_store_conformance!(
    cluster_lease,
    lease_store(RedisConfig::cluster(shared_cluster().urls()))
);

async fn rate_store(config: RedisConfig) -> RedisRateStore {
    RedisRateStore::new(
        Redis::connect(config)
            .await
            .expect("connect to the test Redis"),
    )
}

headroom_testkit::rate_store_conformance!(
    standalone_rate,
    rate_store(RedisConfig::standalone(shared_server().url()))
);

headroom_testkit::rate_store_conformance!(
    cluster_rate,
    rate_store(RedisConfig::cluster(shared_cluster().urls()))
);

async fn bus(config: RedisConfig) -> RedisBus {
    let redis = Redis::connect(config)
        .await
        .expect("connect to the test Redis");
    RedisBus::connect(redis)
        .await
        .expect("subscriber connection")
}

headroom_testkit::bus_conformance!(
    standalone_bus,
    bus(RedisConfig::standalone(shared_server().url()))
);

headroom_testkit::bus_conformance!(
    cluster_bus,
    bus(RedisConfig::cluster(shared_cluster().urls()))
);
