use std::borrow::Cow;
use std::hash::Hash;
use std::sync::Arc;

use bytes::Bytes;

/// A key type the cache accepts: hashable for L1, and turned into bytes for L2.
///
/// The bytes become the key part of a [`headroom_core::Key`] under the cache's namespace, so
/// two keys must map to different bytes. Implemented for strings, byte strings and integers
/// (written in decimal, so `42u64` and `"42"` are the same L2 key).
pub trait CacheKey: Hash + Eq + Clone + Send + Sync + 'static {
    /// The key's bytes in L2 (without the namespace).
    fn to_key_bytes(&self) -> Cow<'_, [u8]>;
}

macro_rules! borrowed_key {
    ($($t:ty => $as:ty),*) => {$(
        impl CacheKey for $t {
            fn to_key_bytes(&self) -> Cow<'_, [u8]> {
                Cow::Borrowed(<$t as AsRef<$as>>::as_ref(self).as_ref())
            }
        }
    )*};
}

borrowed_key!(
    String => str,
    Box<str> => str,
    Arc<str> => str,
    &'static str => str,
    Vec<u8> => [u8],
    Box<[u8]> => [u8],
    Arc<[u8]> => [u8],
    Bytes => [u8]
);

macro_rules! integer_key {
    ($($t:ty),*) => {$(
        impl CacheKey for $t {
            fn to_key_bytes(&self) -> Cow<'_, [u8]> {
                Cow::Owned(self.to_string().into_bytes())
            }
        }
    )*};
}

integer_key!(
    u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize
);
