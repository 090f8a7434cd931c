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
