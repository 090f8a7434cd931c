//! Namespaces and keys from arbitrary bytes: never a panic, and every accepted key is exactly
//! `namespace:key`.
#![no_main]

use headroom_core::Namespace;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte is the namespace's length; the rest is the namespace, then the key.
    let Some((&len, rest)) = data.split_first() else {
        return;
    };
    let (name, key) = rest.split_at(usize::from(len).min(rest.len()));
    let Ok(name) = std::str::from_utf8(name) else {
        return;
    };
    let Ok(ns) = Namespace::new(name) else { return };
    if let Ok(full) = ns.key(key) {
        assert_eq!(full.namespace(), name);
        assert_eq!(full.local(), key);
        assert_eq!(full.as_bytes().len(), name.len() + 1 + key.len());
    }
});
