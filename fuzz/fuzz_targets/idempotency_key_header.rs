//! `Idempotency-Key` header values from arbitrary bytes: never a panic, and every accepted key
//! is 1 to 255 printable ASCII characters.
#![no_main]

use headroom_idempotency::IdempotencyKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(key) = IdempotencyKey::parse_header(data) {
        let key = key.as_str();
        assert!((1..=IdempotencyKey::MAX_LEN).contains(&key.len()));
        assert!(key.bytes().all(|b| (0x20..=0x7E).contains(&b)));
        assert_eq!(
            IdempotencyKey::new(key)
                .map(|k| k.as_str().to_owned())
                .as_deref(),
            Ok(key)
        );
    }
});
