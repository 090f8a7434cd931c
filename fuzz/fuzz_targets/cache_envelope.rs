//! L2 envelopes from arbitrary bytes (corrupt, truncated or foreign values in Redis): a typed
//! error or an envelope, never a panic; an accepted envelope encodes and decodes to the same
//! content.
#![no_main]

use headroom_cache::envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(decoded) = envelope::decode(data) {
        let again = decoded.encode();
        let redecoded = envelope::decode(&again).expect("a re-encoded envelope decodes");
        assert_eq!(redecoded.payload, decoded.payload);
        assert_eq!(redecoded.tags, decoded.tags);
        assert_eq!(redecoded.expires_unix_ms, decoded.expires_unix_ms);
    }
});
