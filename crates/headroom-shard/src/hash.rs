//! The stable hash functions behind every router.
//!
//! Routing must agree across processes, machines and Rust versions, so nothing here uses
//! `RandomState` or `DefaultHasher`. The functions are fixed and covered by golden vectors:
//!
//! - [`key_hash`]: XXH3-64 with seed 0 over the key bytes (the published XXH3 algorithm, as
//!   implemented by the `xxhash-rust` crate).
//! - [`mix`]: combines two 64-bit hashes with the MurmurHash3 64-bit finalizer, used where a
//!   key is scored against a node (rendezvous) or a node derives its positions (ring, Maglev).
//! - [`crc16`]: CRC-16/XMODEM, the checksum of Redis Cluster slots.

/// A value that can be routed: it exposes the bytes every router hashes.
///
/// Integers are encoded big-endian, so their byte order matches their numeric order and
/// [`RangeRouter`](crate::RangeRouter) ranges over integer keys behave as expected.
pub trait ShardKey {
    /// Calls `f` with the key's bytes.
    fn with_key_bytes<T>(&self, f: impl FnOnce(&[u8]) -> T) -> T;
}

impl ShardKey for [u8] {
    #[inline]
    fn with_key_bytes<T>(&self, f: impl FnOnce(&[u8]) -> T) -> T {
        f(self)
    }
}

impl<const N: usize> ShardKey for [u8; N] {
    #[inline]
    fn with_key_bytes<T>(&self, f: impl FnOnce(&[u8]) -> T) -> T {
        f(self)
    }
}

impl ShardKey for Vec<u8> {
    #[inline]
    fn with_key_bytes<T>(&self, f: impl FnOnce(&[u8]) -> T) -> T {
        f(self)
    }
}

impl ShardKey for str {
    #[inline]
    fn with_key_bytes<T>(&self, f: impl FnOnce(&[u8]) -> T) -> T {
        f(self.as_bytes())
    }
}

impl ShardKey for String {
    #[inline]
    fn with_key_bytes<T>(&self, f: impl FnOnce(&[u8]) -> T) -> T {
        f(self.as_bytes())
    }
}

impl ShardKey for headroom_core::Key {
    #[inline]
    fn with_key_bytes<T>(&self, f: impl FnOnce(&[u8]) -> T) -> T {
        f(self.as_bytes())
    }
}

macro_rules! integer_keys {
    ($($ty:ty),*) => {$(
        impl ShardKey for $ty {
            #[inline]
            fn with_key_bytes<T>(&self, f: impl FnOnce(&[u8]) -> T) -> T {
                f(&self.to_be_bytes())
            }
        }
    )*};
}

integer_keys!(u16, u32, u64, u128);

impl<K: ShardKey + ?Sized> ShardKey for &K {
    #[inline]
    fn with_key_bytes<T>(&self, f: impl FnOnce(&[u8]) -> T) -> T {
        (**self).with_key_bytes(f)
    }
}

/// The 64-bit hash of a key: XXH3-64 with seed 0.
///
/// ```
/// assert_eq!(headroom_shard::hash::key_hash(b""), 0x2d06_8005_38d3_94c2);
/// ```
#[inline]
pub fn key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

/// Combines two hashes into a well-mixed third: `fmix64(a ^ b * φ)`, where `fmix64` is the
/// MurmurHash3 64-bit finalizer and `φ` is 0x9E37_79B9_7F4A_7C15.
#[inline]
pub fn mix(a: u64, b: u64) -> u64 {
    let mut x = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

pub use headroom_core::slot::crc16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_hashes() {
        assert_eq!(
            key_hash(b"hello"),
            xxhash_rust::xxh3::xxh3_64_with_seed(b"hello", 0)
        );
        assert_eq!(key_hash(b"abc"), 0x78af_5f94_892f_3950);
        assert_eq!(mix(0, 0), 0);
        assert_eq!(mix(1, 2), 0xe850_28e6_b31f_8e7a);
        assert_eq!(crc16(b""), 0);
        assert_eq!(crc16(b"123456789"), 0x31C3);
    }

    #[test]
    fn integers_hash_big_endian() {
        let mut bytes = Vec::new();
        258u32.with_key_bytes(|b| bytes.extend_from_slice(b));
        assert_eq!(bytes, [0, 0, 1, 2]);
    }
}
