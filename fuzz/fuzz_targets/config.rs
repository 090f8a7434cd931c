//! Configuration files from arbitrary bytes, for every crate's serde-loadable configuration:
//! a typed error or a value, never a panic; accepted values survive a round trip.
#![no_main]

use headroom_idempotency::IdempotencyConfig;
use libfuzzer_sys::fuzz_target;

fn round_trip<T>(data: &[u8])
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    if let Ok(config) = serde_json::from_slice::<T>(data) {
        let again: T = serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
        assert_eq!(config, again);
    }
}

/// One entry per configuration type; the first input byte picks one.
const CONFIGS: &[fn(&[u8])] = &[round_trip::<IdempotencyConfig>];

fuzz_target!(|data: &[u8]| {
    let Some((&which, json)) = data.split_first() else {
        return;
    };
    CONFIGS[usize::from(which) % CONFIGS.len()](json);
});
