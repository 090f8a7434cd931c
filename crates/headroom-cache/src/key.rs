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

    /// Calls `f` with the key's L2 bytes: exactly those of [`to_key_bytes`](Self::to_key_bytes),
    /// or reads and writes of one key would use two L2 keys. The cache builds its L2 keys
    /// through it; override it when the bytes can be written without an allocation (integers
    /// write their decimal digits on the stack).
    ///
    /// ```
    /// use headroom_cache::CacheKey;
    ///
    /// assert_eq!(42u64.with_key_bytes(|bytes| bytes.to_vec()), b"42");
    /// ```
    fn with_key_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        f(&self.to_key_bytes())
    }

    /// The key whose [`to_key_bytes`](Self::to_key_bytes) are `bytes`, used to drop a key
    /// named in an invalidation message. `None` (the default) makes such a message flush the
    /// whole L1 instead: correct, but costly.
    fn from_key_bytes(bytes: &[u8]) -> Option<Self> {
        let _ = bytes;
        None
    }

    /// Whether [`from_key_bytes`](Self::from_key_bytes) rebuilds every key of this type, so
    /// that bytes it refuses (another program's key under the cache's prefix, reported by
    /// tracked writes) are no key of the cache and drop nothing. `false` (the default) makes
    /// refused bytes flush the whole L1.
    const REBUILDS_EVERY_KEY: bool = false;
}

macro_rules! borrowed_key {
    ($($t:ty => $as:ty, $rebuilds:expr, |$b:ident| $from:expr);* $(;)?) => {$(
        impl CacheKey for $t {
            const REBUILDS_EVERY_KEY: bool = $rebuilds;

            fn to_key_bytes(&self) -> Cow<'_, [u8]> {
                Cow::Borrowed(<$t as AsRef<$as>>::as_ref(self).as_ref())
            }

            fn from_key_bytes($b: &[u8]) -> Option<Self> {
                $from
            }
        }
    )*};
}

borrowed_key!(
    String => str, true, |b| std::str::from_utf8(b).ok().map(Into::into);
    Box<str> => str, true, |b| std::str::from_utf8(b).ok().map(Into::into);
    Arc<str> => str, true, |b| std::str::from_utf8(b).ok().map(Into::into);
    // A `'static` key cannot be rebuilt from bytes: messages naming one flush L1.
    &'static str => str, false, |b| { let _ = b; None };
    Vec<u8> => [u8], true, |b| Some(b.into());
    Box<[u8]> => [u8], true, |b| Some(b.into());
    Arc<[u8]> => [u8], true, |b| Some(b.into());
    Bytes => [u8], true, |b| Some(Bytes::copy_from_slice(b));
);

macro_rules! integer_key {
    ($($t:ty),*) => {$(
        impl CacheKey for $t {
            // Decimal digits that do not parse are no integer's.
            const REBUILDS_EVERY_KEY: bool = true;

            fn to_key_bytes(&self) -> Cow<'_, [u8]> {
                Cow::Owned(itoa::Buffer::new().format(*self).as_bytes().to_vec())
            }

            fn with_key_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
                f(itoa::Buffer::new().format(*self).as_bytes())
            }

            fn from_key_bytes(bytes: &[u8]) -> Option<Self> {
                std::str::from_utf8(bytes).ok()?.parse().ok()
            }
        }
    )*};
}

integer_key!(
    u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize
);
