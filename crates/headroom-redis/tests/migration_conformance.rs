//! The migration store conformance suite against real Redis, standalone and cluster.

use headroom_redis::{Redis, RedisConfig, RedisMigrationStore};
use headroom_testkit::{shared_cluster, shared_server};

async fn store(config: RedisConfig) -> RedisMigrationStore {
    RedisMigrationStore::new(
        Redis::connect(config)
            .await
            .expect("connect to the test Redis"),
    )
}

headroom_testkit::migration_store_conformance!(
    standalone_migration,
    store(RedisConfig::standalone(shared_server().url()))
);

headroom_testkit::migration_store_conformance!(
    cluster_migration,
    store(RedisConfig::cluster(shared_cluster().urls()))
);
