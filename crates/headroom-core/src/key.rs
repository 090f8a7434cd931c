use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

/// Why a namespace or key was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The namespace or key is empty.
    #[error("{what} must not be empty")]
    Empty {
        /// `"namespace"` or `"key"`.
        what: &'static str,
    },
    /// The namespace or key is longer than allowed.
    #[error("{what} is {len} bytes long, more than the limit of {max}")]
    TooLong {
        /// `"namespace"` or `"key"`.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// The namespace contains a byte outside `[A-Za-z0-9_.:/-]`.
    #[error("namespace contains {byte:#04x} at offset {offset}; allowed are A-Z a-z 0-9 _ . : / -")]
    InvalidNamespaceByte {
        /// The offending byte.
        byte: u8,
        /// Its offset.
        offset: usize,
    },
    /// A name that must be one segment of a namespace (a part's name) contains `:`.
    #[error("name contains ':' at offset {offset}; a name is one segment of its keys")]
    Separator {
        /// The separator's offset.
        offset: usize,
    },
}

impl crate::Classify for KeyError {
    fn is_timeout(&self) -> bool {
        false
    }

    fn is_retryable(&self) -> bool {
        false
    }
}

/// A validated prefix that keeps one application's (or one component's) keys apart from every
/// other's in a shared store.
///
/// A namespace is 1 to [`Namespace::MAX_LEN`] bytes of `[A-Za-z0-9_.:/-]`. Braces are refused so
/// a namespace can never choose the Redis Cluster slot of the keys under it: only the key part
/// may carry a `{hash tag}`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Namespace {
    prefix: Bytes,
}

impl Namespace {
    /// The longest namespace accepted, in bytes.
    pub const MAX_LEN: usize = 128;

    /// Validates `name` as a namespace.
    pub fn new(name: &str) -> Result<Self, KeyError> {
        validate_namespace(name)?;
        Ok(Self {
            prefix: Bytes::copy_from_slice(name.as_bytes()),
        })
    }

    /// The namespace `self:segment`, for a component inside an application's namespace.
    pub fn child(&self, segment: &str) -> Result<Self, KeyError> {
        validate_namespace(segment)?;
        let joined = [self.as_str(), segment].join(":");
        Self::new(&joined)
    }

    /// The namespace as text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.prefix).expect("namespaces are validated ASCII")
    }

    /// The full key `namespace:key` for a key part of 1 to [`Key::MAX_LEN`] bytes.
    ///
    /// The key part is binary-safe: any bytes are accepted.
    pub fn key(&self, key: impl AsRef<[u8]>) -> Result<Key, KeyError> {
        self.key_from_parts(&[key.as_ref()])
    }

    /// The full key `namespace:` followed by `parts` concatenated, built in one allocation.
    /// The parts together are the key part, with the limits of [`Namespace::key`].
    pub fn key_from_parts(&self, parts: &[&[u8]]) -> Result<Key, KeyError> {
        let len: usize = parts.iter().map(|part| part.len()).sum();
        check_key_len(len)?;
        let mut full = BytesMut::with_capacity(self.prefix.len() + 1 + len);
        full.put_slice(&self.prefix);
        full.put_u8(b':');
        for part in parts {
            full.put_slice(part);
        }
        Ok(Key {
            full: full.freeze(),
            prefix_len: self.prefix.len() + 1,
        })
    }

    /// Whether `key` is accepted by [`key`](Self::key), without building it.
    pub fn check_key(&self, key: &[u8]) -> Result<(), KeyError> {
        check_key_len(key.len())
    }

    /// Builds many keys of this namespace in one buffer: one allocation for all of them rather
    /// than one each, for a batch read. `count` is how many keys are expected (room for at
    /// most 4096 is made up front; more grow the buffer). The keys share the buffer: one
    /// kept keeps it all alive, so keep them only as long as the batch call.
    ///
    /// ```
    /// use headroom_core::Namespace;
    ///
    /// let ns = Namespace::new("app")?;
    /// let mut batch = ns.key_batch(2);
    /// batch.push(b"a")?;
    /// batch.push(b"bc")?;
    /// let keys = batch.finish();
    /// assert_eq!(keys[1].as_bytes(), b"app:bc");
    /// assert_eq!(keys[1], ns.key("bc")?);
    /// # Ok::<(), headroom_core::KeyError>(())
    /// ```
    pub fn key_batch(&self, count: usize) -> KeyBatch<'_> {
        // Room for keys of 16 bytes; longer ones, or more, grow the buffer.
        let count = count.min(4096);
        let each = self.prefix.len() + 1 + 16;
        KeyBatch {
            namespace: self,
            buffer: BytesMut::with_capacity(count.saturating_mul(each)),
            lens: Vec::with_capacity(count),
        }
    }
}

/// Keys of one namespace written into one buffer (see [`Namespace::key_batch`]).
#[derive(Debug)]
pub struct KeyBatch<'a> {
    namespace: &'a Namespace,
    buffer: BytesMut,
    /// The full length of each key, in order.
    lens: Vec<usize>,
}

impl KeyBatch<'_> {
    /// Adds the key `namespace:key`, with the limits of [`Namespace::key`]; a refused key
    /// adds nothing.
    pub fn push(&mut self, key: &[u8]) -> Result<(), KeyError> {
        check_key_len(key.len())?;
        let prefix = &self.namespace.prefix;
        self.buffer.reserve(prefix.len() + 1 + key.len());
        self.buffer.put_slice(prefix);
        self.buffer.put_u8(b':');
        self.buffer.put_slice(key);
        self.lens.push(prefix.len() + 1 + key.len());
        Ok(())
    }

    /// The keys, in the order they were pushed, sharing the one buffer.
    pub fn finish(self) -> Vec<Key> {
        let prefix_len = self.namespace.prefix.len() + 1;
        let mut rest = self.buffer.freeze();
        self.lens
            .into_iter()
            .map(|len| Key {
                full: rest.split_to(len),
                prefix_len,
            })
            .collect()
    }
}

/// Refuses a key part that is empty or longer than [`Key::MAX_LEN`].
fn check_key_len(len: usize) -> Result<(), KeyError> {
    if len == 0 {
        return Err(KeyError::Empty { what: "key" });
    }
    if len > Key::MAX_LEN {
        return Err(KeyError::TooLong {
            what: "key",
            len,
            max: Key::MAX_LEN,
        });
    }
    Ok(())
}

impl fmt::Debug for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Namespace").field(&self.as_str()).finish()
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn validate_namespace(name: &str) -> Result<(), KeyError> {
    if name.is_empty() {
        return Err(KeyError::Empty { what: "namespace" });
    }
    if name.len() > Namespace::MAX_LEN {
        return Err(KeyError::TooLong {
            what: "namespace",
            len: name.len(),
            max: Namespace::MAX_LEN,
        });
    }
    match name
        .bytes()
        .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'/' | b'-')))
    {
        Some(offset) => Err(KeyError::InvalidNamespaceByte {
            byte: name.as_bytes()[offset],
            offset,
        }),
        None => Ok(()),
    }
}

/// A full key in a shared store: `namespace:key`, made by [`Namespace::key`].
///
/// Cloning is cheap (reference counted).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    full: Bytes,
    prefix_len: usize,
}

impl Key {
    /// The longest key part accepted, in bytes (the namespace is not counted).
    pub const MAX_LEN: usize = 1024;

    /// Whether `local` is accepted as the key part in any namespace: not empty, and at most
    /// [`MAX_LEN`](Self::MAX_LEN) bytes.
    ///
    /// ```
    /// use headroom_core::Key;
    ///
    /// assert!(Key::check(b"user:42").is_ok());
    /// assert!(Key::check(b"").is_err());
    /// assert!(Key::check(&[b'k'; 1025]).is_err());
    /// ```
    pub fn check(local: &[u8]) -> Result<(), KeyError> {
        check_key_len(local.len())
    }

    /// The full key, namespace included, as stored in the backend.
    pub fn as_bytes(&self) -> &[u8] {
        &self.full
    }

    /// The full key as shared bytes.
    pub fn to_bytes(&self) -> Bytes {
        self.full.clone()
    }

    /// The key part, without the namespace.
    pub fn local(&self) -> &[u8] {
        &self.full[self.prefix_len..]
    }

    /// The namespace part, without the separator.
    pub fn namespace(&self) -> &str {
        std::str::from_utf8(&self.full[..self.prefix_len - 1])
            .expect("namespaces are validated ASCII")
    }
}

impl AsRef<[u8]> for Key {
    fn as_ref(&self) -> &[u8] {
        &self.full
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?})", self.full.escape_ascii().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefixed_with_their_namespace() {
        let ns = Namespace::new("shop").unwrap().child("cache").unwrap();
        let key = ns.key("{user:1}.cart").unwrap();
        assert_eq!(key.as_bytes(), b"shop:cache:{user:1}.cart");
        assert_eq!(key.local(), b"{user:1}.cart");
        assert_eq!(key.namespace(), "shop:cache");
    }

    #[test]
    fn a_key_batch_builds_the_same_keys_as_one_at_a_time() {
        let ns = Namespace::new("shop").unwrap();
        let parts: Vec<Vec<u8>> = (0..40)
            .map(|i| vec![b'k'; 1 + i * 7 % Key::MAX_LEN])
            .collect();
        let mut batch = ns.key_batch(3);
        for part in &parts {
            batch.push(part).unwrap();
        }
        assert!(matches!(batch.push(b""), Err(KeyError::Empty { .. })));
        let too_long = vec![b'x'; Key::MAX_LEN + 1];
        assert!(matches!(
            batch.push(&too_long),
            Err(KeyError::TooLong { .. })
        ));
        let one_at_a_time: Vec<Key> = parts.iter().map(|part| ns.key(part).unwrap()).collect();
        assert_eq!(batch.finish(), one_at_a_time, "refused keys add nothing");
        assert!(ns.key_batch(0).finish().is_empty());
    }

    #[test]
    fn a_key_batch_of_any_expected_count_is_built() {
        let ns = Namespace::new("shop").unwrap();
        let mut batch = ns.key_batch(usize::MAX);
        batch.push(b"a").unwrap();
        assert_eq!(batch.finish(), [ns.key("a").unwrap()]);
    }

    #[test]
    fn bad_namespaces_and_keys_are_refused() {
        assert_eq!(
            Namespace::new(""),
            Err(KeyError::Empty { what: "namespace" })
        );
        assert!(matches!(
            Namespace::new("a{b}"),
            Err(KeyError::InvalidNamespaceByte {
                byte: b'{',
                offset: 1
            })
        ));
        assert!(matches!(
            Namespace::new(&"n".repeat(129)),
            Err(KeyError::TooLong { .. })
        ));
        let ns = Namespace::new("ns").unwrap();
        assert_eq!(ns.key(""), Err(KeyError::Empty { what: "key" }));
        assert!(matches!(
            ns.key(vec![0u8; 1025]),
            Err(KeyError::TooLong { len: 1025, .. })
        ));
        assert!(
            ns.key(vec![0xFFu8; 1024]).is_ok(),
            "key parts are binary-safe"
        );
    }
}
