//! Configuration files from arbitrary bytes, for every crate's serde-loadable configuration:
//! a typed error or a value, never a panic; accepted values survive a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;

/// Parses `data` as a `T`; an accepted value must serialize and parse again.
fn round_trip<T>(data: &[u8])
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    if let Ok(config) = serde_json::from_slice::<T>(data) {
        let text = serde_json::to_string(&config).expect("an accepted configuration serializes");
        serde_json::from_str::<T>(&text).expect("a serialized configuration parses again");
    }
}

/// One entry per configuration type; the first input byte picks one.
const CONFIGS: &[fn(&[u8])] = &[
    round_trip::<headroom_idempotency::IdempotencyConfig>,
    round_trip::<headroom_redis::RedisConfig>,
    round_trip::<headroom_cache::CacheConfig>,
    round_trip::<headroom_limit::BulkheadConfig>,
    round_trip::<headroom_limit::QueueConfig>,
    round_trip::<headroom_limit::LoadShedConfig>,
    round_trip::<headroom_breaker::config::BreakerConfig>,
    round_trip::<headroom_breaker::config::RetryConfig>,
    round_trip::<headroom_breaker::config::HedgeConfig>,
    round_trip::<headroom_breaker::config::PipelineConfig>,
    round_trip::<headroom_shard::TopologyConfig>,
];

fuzz_target!(|data: &[u8]| {
    let Some((&which, json)) = data.split_first() else {
        return;
    };
    CONFIGS[usize::from(which) % CONFIGS.len()](json);
});
