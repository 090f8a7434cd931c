use std::fmt;

use headroom_core::{Key, Namespace};
use xxhash_rust::xxh3::xxh3_64;

/// Why an idempotency key or scope was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidKey {
    /// The value is empty.
    #[error("the {field} is empty")]
    Empty {
        /// `"key"`, `"tenant"` or `"operation"`.
        field: &'static str,
    },
    /// The value is longer than allowed.
    #[error("the {field} is {len} bytes long, more than the limit of {max}")]
    TooLong {
        /// `"key"`, `"tenant"` or `"operation"`.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The value holds a byte it may not.
    #[error("the {field} holds the byte {byte:#04x} at offset {offset}")]
    InvalidByte {
        /// `"key"`, `"tenant"` or `"operation"`.
        field: &'static str,
        /// The byte.
        byte: u8,
        /// Its offset.
        offset: usize,
    },
    /// The `Idempotency-Key` header is not a structured-field string or a plain token.
    #[error("the Idempotency-Key header is malformed: {0}")]
    MalformedHeader(&'static str),
}

/// A validated idempotency key: 1 to 255 printable ASCII characters (`0x20..=0x7E`), as the
/// IETF `Idempotency-Key` draft allows (a UUID is the usual choice).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The longest key accepted.
    pub const MAX_LEN: usize = 255;

    /// Validates `key`.
    pub fn new(key: &str) -> Result<Self, InvalidKey> {
        check("key", key.as_bytes(), Self::MAX_LEN, |b| {
            (0x20..=0x7E).contains(&b)
        })?;
        Ok(Self(key.to_owned()))
    }

    /// Parses the value of an `Idempotency-Key` header.
    ///
    /// The draft makes the value a structured-field string (`"8e03978e-40d5-43e8"`, with `\"`
    /// and `\\` escapes, and parameters such as `;v=1`, which are ignored); a bare token of visible ASCII (`8e03978e-40d5-43e8`) is accepted too,
    /// since many clients send one.
    ///
    /// ```
    /// use headroom_idempotency::IdempotencyKey;
    /// assert_eq!(IdempotencyKey::parse_header(b"\"a\\\"b\"").unwrap().as_str(), "a\"b");
    /// assert_eq!(IdempotencyKey::parse_header(b"plain-key").unwrap().as_str(), "plain-key");
    /// assert!(IdempotencyKey::parse_header(b"\"unterminated").is_err());
    /// ```
    pub fn parse_header(value: &[u8]) -> Result<Self, InvalidKey> {
        let value = value.trim_ascii();
        if !value.starts_with(b"\"") {
            check("key", value, Self::MAX_LEN, |b| {
                (0x21..=0x7E).contains(&b) && b != b'"'
            })?;
            return Ok(Self(String::from_utf8_lossy(value).into_owned()));
        }
        // A structured-field string with optional parameters (`"key";v=1`), which are ignored.
        let key = sfv::Parser::new(value)
            .parse_item_with_visitor(string_item)
            .map_err(|_| InvalidKey::MalformedHeader("not a structured-field string"))?;
        let key = key.as_str();
        if key.len() > Self::MAX_LEN {
            return Err(InvalidKey::TooLong {
                field: "key",
                len: key.len(),
                max: Self::MAX_LEN,
            });
        }
        Self::new(key)
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IdempotencyKey").field(&self.0).finish()
    }
}

/// Whose key it is and for what: records are kept per (tenant, operation, key), so one tenant
/// or principal can never replay another's outcome, and one key can be reused across operations.
///
/// The tenant is normally the authenticated principal (an account or API key id); the
/// operation names the endpoint or use case (`"POST /payments"`, `"charge"`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Scope {
    tenant: String,
    operation: String,
}

impl Scope {
    /// The longest tenant or operation accepted, in bytes.
    pub const MAX_LEN: usize = 255;

    /// Validates a scope: both parts are 1 to 255 bytes of UTF-8 without control characters.
    pub fn new(
        tenant: impl Into<String>,
        operation: impl Into<String>,
    ) -> Result<Self, InvalidKey> {
        let tenant = tenant.into();
        let operation = operation.into();
        check("tenant", tenant.as_bytes(), Self::MAX_LEN, |b| {
            !b.is_ascii_control()
        })?;
        check("operation", operation.as_bytes(), Self::MAX_LEN, |b| {
            !b.is_ascii_control()
        })?;
        Ok(Self { tenant, operation })
    }

    /// The tenant or principal.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The operation.
    pub fn operation(&self) -> &str {
        &self.operation
    }

    /// The record's key in `namespace`: a hash tag of its own, then tenant and operation each
    /// behind a one-byte length (both are at most 255 bytes), then the key, so no two scopes and
    /// keys map to the same record whatever characters they hold.
    ///
    /// The tag (`{` and 16 hex digits of the XXH3 hash of the rest, then `}`) comes first, so it
    /// is the one Redis Cluster hashes: braces in a client's key never choose the slot. The
    /// tenant follows it as the lease store's scope (see the `LeaseStore` contract), so a store
    /// bounded per scope bounds each tenant.
    pub(crate) fn record_key(&self, namespace: &Namespace, key: &IdempotencyKey) -> Key {
        let tenant_len = [self.tenant.len() as u8];
        let operation_len = [self.operation.len() as u8];
        let parts: [&[u8]; 5] = [
            &tenant_len,
            self.tenant.as_bytes(),
            &operation_len,
            self.operation.as_bytes(),
            key.0.as_bytes(),
        ];
        // One-shot hashing of the parts laid end to end, and the tag built on the stack: this
        // runs on every request, replays included.
        let mut flat = [0u8; 2 + 2 * 255 + IdempotencyKey::MAX_LEN];
        let mut len = 0;
        for part in parts {
            flat[len..len + part.len()].copy_from_slice(part);
            len += part.len();
        }
        let hash = xxh3_64(&flat[..len]);
        let mut tag = [b'{'; 18];
        for (i, digit) in tag[1..17].iter_mut().enumerate() {
            *digit = b"0123456789abcdef"[((hash >> (60 - 4 * i)) & 0xF) as usize];
        }
        tag[17] = b'}';
        namespace
            .key_from_parts(&[&tag, parts[0], parts[1], parts[2], parts[3], parts[4]])
            .expect("18 + 1 + 255 + 1 + 255 + 255 bytes fit the key limit")
    }
}

/// Takes a structured-field item's string and ignores its parameters.
fn string_item(
    item: sfv::BareItemFromInput<'_>,
) -> Result<impl sfv::visitor::ParameterVisitor<'_, Out = String>, NotAString> {
    match item {
        sfv::BareItemFromInput::String(key) => Ok(sfv::visitor::parameter_visitor_with(
            sfv::visitor::Ignored,
            move |_| Ok(key.as_str().to_owned()),
        )),
        _ => Err(NotAString),
    }
}

/// A structured-field item that is not a string.
#[derive(Debug, thiserror::Error)]
#[error("not a string")]
struct NotAString;

fn check(
    field: &'static str,
    value: &[u8],
    max: usize,
    allowed: impl Fn(u8) -> bool,
) -> Result<(), InvalidKey> {
    if value.is_empty() {
        return Err(InvalidKey::Empty { field });
    }
    if value.len() > max {
        return Err(InvalidKey::TooLong {
            field,
            len: value.len(),
            max,
        });
    }
    match value.iter().position(|&b| !allowed(b)) {
        Some(offset) => Err(InvalidKey::InvalidByte {
            field,
            byte: value[offset],
            offset,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_parse_per_the_draft() {
        assert_eq!(
            IdempotencyKey::parse_header(b" \"abc\" ").unwrap().as_str(),
            "abc"
        );
        assert_eq!(
            IdempotencyKey::parse_header(b"\"a b\"").unwrap().as_str(),
            "a b"
        );
        assert_eq!(
            IdempotencyKey::parse_header(b"\"\\\\\"").unwrap().as_str(),
            "\\"
        );
        for bad in [
            &b"\"a"[..],
            b"\"a\\x\"",
            b"\"a\"b",
            b"\"\x01\"",
            b"a b",
            b"",
            b"\"\"",
        ] {
            assert!(
                IdempotencyKey::parse_header(bad).is_err(),
                "{:?}",
                bad.escape_ascii().to_string()
            );
        }
        let long = format!("\"{}\"", "k".repeat(256));
        assert!(matches!(
            IdempotencyKey::parse_header(long.as_bytes()),
            Err(InvalidKey::TooLong { len: 256, .. })
        ));
        assert!(IdempotencyKey::parse_header(&[0xFF, 0xFE]).is_err());
    }

    #[test]
    fn structured_field_parameters_are_accepted_and_ignored() {
        for value in [
            &b"\"abc\";v=1"[..],
            b"\"abc\"; v=1",
            b"\"abc\";a;b=?0;c=\"x y\";d=1.5;e=tok/en;f=:aGk=:",
            b" \"abc\";v=1 ",
        ] {
            assert_eq!(
                IdempotencyKey::parse_header(value).map(|k| k.0),
                Ok("abc".to_owned()),
                "{}",
                value.escape_ascii()
            );
        }
        for bad in [
            &b"\"abc\";"[..],
            b"\"abc\";V=1",
            b"\"abc\";v=",
            b"\"abc\";v=\"open",
            b"\"abc\" ;v=1",
            b"\"abc\";v=1,\"def\"",
        ] {
            assert!(
                IdempotencyKey::parse_header(bad).is_err(),
                "{}",
                bad.escape_ascii()
            );
        }
    }

    #[test]
    fn record_keys_cannot_collide_across_scopes() {
        let ns = Namespace::new("idem").unwrap();
        let record = |tenant: &str, operation: &str, key: &str| {
            Scope::new(tenant, operation)
                .unwrap()
                .record_key(&ns, &IdempotencyKey::new(key).unwrap())
        };
        assert_ne!(record("ab", "c", "k"), record("a", "bc", "k"));
        assert_ne!(record("t", "ok", "x"), record("t", "o", "kx"));
        // A length byte equal to a printable character cannot shift the boundaries either.
        let a65 = "A".repeat(65);
        assert_ne!(record(&a65, "o", "k"), record(&"A".repeat(64), "Ao", "k"));
        let longest = "x".repeat(255);
        assert_eq!(record(&longest, &longest, &longest).local().len(), 785);
    }

    #[test]
    fn scopes_refuse_control_characters_and_empty_parts() {
        assert!(matches!(
            Scope::new("", "op"),
            Err(InvalidKey::Empty { field: "tenant" })
        ));
        assert!(matches!(
            Scope::new("t\n", "op"),
            Err(InvalidKey::InvalidByte {
                field: "tenant",
                byte: b'\n',
                offset: 1
            })
        ));
        assert!(Scope::new("tenant-é", "POST /payments").is_ok());
    }
}
