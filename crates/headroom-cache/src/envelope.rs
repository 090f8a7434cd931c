//! The versioned envelope around every value the cache writes to L2.
//!
//! # Layout (format version 3)
//!
//! All integers are little-endian.
//!
//! | bytes | field |
//! |---|---|
//! | 2 | magic `b"hc"` |
//! | 1 | format version |
//! | 2 | header length `h`: the bytes after this field up to the tags (32 in version 3, 30 in version 2, 26 in version 1) |
//! | 1 | flags: bit 0 set when the entry caches "not found" (no payload follows); bit 1 set (with bit 0) when the entry is a tombstone: the key was removed |
//! | 1 | codec id ([`Codec::ID`](crate::codec::Codec::ID)) |
//! | 8 | created at, Unix milliseconds: when the value was written, or when its load began; also the entry's version (see [`VERSION_AT`]) |
//! | 8 | fresh until (soft TTL), Unix milliseconds |
//! | 8 | expires at (hard TTL), Unix milliseconds |
//! | 4 | schema version, set by the user (version 2; version 1 entries read as schema 0) |
//! | 2 | created at, the microseconds within its millisecond (0–999): the tie-break of the entry's version (version 3; earlier entries read as 0) |
//! | `h - 32` | fields added by later versions (skipped by this reader) |
//! | 1 | number of tags, then per tag: 1 byte length and UTF-8 bytes |
//! | rest | the payload, encoded by the codec |
//!
//! A reader skips header fields it does not know (the header length tells it where they end),
//! so a later format that appends fields stays readable here, and every later reader keeps
//! decoding version 1. Anything else (wrong magic, truncated, a timestamp order that makes no
//! sense, invalid tag text) is refused with an [`EnvelopeError`], never a panic.

use std::fmt;

use headroom_core::kv::VersionAt;

/// The format version this crate writes.
pub const FORMAT_VERSION: u8 = 3;

/// Where the created-at millisecond starts in an encoded envelope.
pub const CREATED_AT: usize = 7;

/// Where the microseconds within the created-at millisecond start (format version 3).
pub const CREATED_SUB_MS_MICROS: usize = 35;

/// Where the format version sits in an encoded envelope.
const FORMAT_AT: usize = 2;

/// The first format version that carries the microseconds within the created-at millisecond.
const FIRST_WITH_MICROS: u8 = 3;

/// The entry's version, which
/// [`KvStore::set_if_newer`](headroom_core::kv::KvStore::set_if_newer) compares: the
/// created-at millisecond, then, in entries of format 3 on, the microseconds within it. An
/// entry of an earlier format counts as made at microsecond 0 of its millisecond (whatever it
/// holds at those bytes), so a write of that millisecond replaces it, as it would between two
/// earlier entries. Bytes without the envelope's magic (another program's) carry no version:
/// any entry replaces them.
pub const VERSION_AT: VersionAt = VersionAt::new(CREATED_AT)
    .with_tie_at(CREATED_SUB_MS_MICROS)
    .with_tie_only_when(FORMAT_AT, FIRST_WITH_MICROS)
    .with_marker(&MAGIC);

const MAGIC: [u8; 2] = *b"hc";
/// Header bytes after the header-length field in version 1: flags, codec, three timestamps.
const HEADER_V1: u16 = 1 + 1 + 8 + 8 + 8;
/// Version 2 appends the schema version.
const HEADER_V2: u16 = HEADER_V1 + 4;
/// Version 3 appends the microseconds within the created-at millisecond.
const HEADER_V3: u16 = HEADER_V2 + 2;
const FLAG_NOT_FOUND: u8 = 1;
const FLAG_TOMBSTONE: u8 = 2;
/// The most tags an envelope carries.
pub const MAX_TAGS: usize = 32;

/// A decoded envelope, borrowing its tags and payload from the input bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// The format version the bytes were written in.
    pub version: u8,
    /// The codec the payload was written with.
    pub codec: u8,
    /// When the value was produced, Unix milliseconds.
    pub created_unix_ms: u64,
    /// The microseconds within `created_unix_ms` at which the value was produced (0–999; 0
    /// in formats before 3).
    pub created_sub_ms_micros: u16,
    /// Until when the value is fresh (soft TTL), Unix milliseconds.
    pub fresh_until_unix_ms: u64,
    /// When the value expires (hard TTL), Unix milliseconds.
    pub expires_unix_ms: u64,
    /// The user's schema version of the payload (0 when unset).
    pub schema: u32,
    /// Whether the entry is a tombstone: the key was removed at `created_unix_ms`. A
    /// tombstone has no payload.
    pub tombstone: bool,
    /// Tags attached to the entry.
    pub tags: Vec<&'a str>,
    /// The encoded value, or `None` when the entry caches "not found".
    pub payload: Option<&'a [u8]>,
}

impl fmt::Debug for Envelope<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("version", &self.version)
            .field("codec", &self.codec)
            .field("created_unix_ms", &self.created_unix_ms)
            .field("created_sub_ms_micros", &self.created_sub_ms_micros)
            .field("fresh_until_unix_ms", &self.fresh_until_unix_ms)
            .field("expires_unix_ms", &self.expires_unix_ms)
            .field("schema", &self.schema)
            .field("tombstone", &self.tombstone)
            .field("tags", &self.tags)
            .field("payload_len", &self.payload.map(<[u8]>::len))
            .finish()
    }
}

/// Why bytes are not a valid envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// The bytes do not start with the envelope magic: foreign data.
    #[error("not a headroom cache envelope")]
    Foreign,
    /// The format version is not one this reader knows.
    #[error("unknown envelope format version {0}")]
    UnknownVersion(u8),
    /// The bytes end before the envelope does.
    #[error("envelope truncated")]
    Truncated,
    /// A field holds a value that cannot be right.
    #[error("malformed envelope: {0}")]
    Malformed(&'static str),
}

impl headroom_core::Classify for EnvelopeError {
    fn is_timeout(&self) -> bool {
        false
    }

    fn is_retryable(&self) -> bool {
        false
    }
}

impl Envelope<'_> {
    /// Appends the encoded envelope to `out`.
    ///
    /// At most [`MAX_TAGS`] tags of at most 255 bytes each are written; longer ones are cut.
    /// Over 999 microseconds within the created-at millisecond are written as 999.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let times = Times {
            created: self.created_unix_ms,
            created_sub_ms: self.created_sub_ms_micros.min(999),
            fresh_until: self.fresh_until_unix_ms,
            expires: self.expires_unix_ms,
        };
        write_fixed(out, self.codec, times, self.flags(), self.schema);
        write_tags(out, &self.tags);
        if let Some(payload) = self.payload {
            out.extend_from_slice(payload);
        }
    }

    fn flags(&self) -> u8 {
        if self.tombstone {
            FLAG_NOT_FOUND | FLAG_TOMBSTONE
        } else if self.payload.is_none() {
            FLAG_NOT_FOUND
        } else {
            0
        }
    }

    /// The encoded envelope.
    pub fn encode(&self) -> Vec<u8> {
        // Magic, version and header length; the header; the tags' count.
        let fixed = 5 + usize::from(HEADER_V3) + 1;
        let tags: usize = self.tags.iter().map(|tag| 1 + tag.len()).sum();
        let mut out = Vec::with_capacity(fixed + tags + self.payload.map_or(0, <[u8]>::len));
        self.encode_into(&mut out);
        out
    }
}

/// When an entry was made (its version) and its deadlines, as its envelope holds them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Times {
    /// Unix milliseconds.
    pub(crate) created: u64,
    /// The microseconds within `created` (0–999).
    pub(crate) created_sub_ms: u16,
    /// The soft TTL's end, Unix milliseconds.
    pub(crate) fresh_until: u64,
    /// The hard TTL's end, Unix milliseconds.
    pub(crate) expires: u64,
}

impl Times {
    /// Made at `micros` (Unix microseconds), fresh and alive until that millisecond.
    pub(crate) fn at(micros: u64) -> Self {
        let created = micros / 1_000;
        Self {
            created,
            created_sub_ms: (micros % 1_000) as u16,
            fresh_until: created,
            expires: created,
        }
    }

    /// When the entry was made, in Unix microseconds.
    pub(crate) fn created_micros(self) -> u64 {
        self.created
            .saturating_mul(1_000)
            .saturating_add(u64::from(self.created_sub_ms))
    }

    /// Sets when the entry was made, in Unix microseconds.
    pub(crate) fn set_created_micros(&mut self, micros: u64) {
        self.created = micros / 1_000;
        self.created_sub_ms = (micros % 1_000) as u16;
    }
}

/// Writes a header; the payload (if any) follows it.
pub(crate) fn write_header(
    out: &mut Vec<u8>,
    codec: u8,
    times: Times,
    not_found: bool,
    schema: u32,
    tags: &[&str],
) {
    let flags = if not_found { FLAG_NOT_FOUND } else { 0 };
    write_fixed(out, codec, times, flags, schema);
    write_tags(out, tags);
}

/// Writes a tombstone: the key was removed at `times.created` (a reader of format version 1
/// takes it for a cached "not found").
pub(crate) fn write_tombstone(out: &mut Vec<u8>, codec: u8, times: Times, schema: u32) {
    write_fixed(out, codec, times, FLAG_NOT_FOUND | FLAG_TOMBSTONE, schema);
    write_tags(out, &[]);
}

/// Writes at most [`MAX_TAGS`] tags, each cut to 255 bytes.
fn write_tags(out: &mut Vec<u8>, tags: &[&str]) {
    let tags = &tags[..tags.len().min(MAX_TAGS)];
    out.push(tags.len() as u8);
    for tag in tags {
        let mut end = tag.len().min(255);
        while !tag.is_char_boundary(end) {
            end -= 1;
        }
        let bytes = &tag.as_bytes()[..end];
        out.push(bytes.len() as u8);
        out.extend_from_slice(bytes);
    }
}

/// Writes everything before the tags.
fn write_fixed(out: &mut Vec<u8>, codec: u8, times: Times, flags: u8, schema: u32) {
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&HEADER_V3.to_le_bytes());
    out.push(flags);
    out.push(codec);
    for time in [times.created, times.fresh_until, times.expires] {
        out.extend_from_slice(&time.to_le_bytes());
    }
    out.extend_from_slice(&schema.to_le_bytes());
    out.extend_from_slice(&times.created_sub_ms.to_le_bytes());
}

/// Decodes an envelope; never panics, whatever the bytes.
///
/// ```
/// use headroom_cache::envelope::{self, Envelope, EnvelopeError};
///
/// let bytes = Envelope {
///     version: envelope::FORMAT_VERSION,
///     codec: 1,
///     created_unix_ms: 1_000,
///     created_sub_ms_micros: 0,
///     fresh_until_unix_ms: 2_000,
///     expires_unix_ms: 3_000,
///     schema: 0,
///     tombstone: false,
///     tags: vec!["user"],
///     payload: Some(b"value"),
/// }
/// .encode();
/// let decoded = envelope::decode(&bytes).unwrap();
/// assert_eq!(decoded.payload, Some(&b"value"[..]));
/// assert_eq!(envelope::decode(b"GARBAGE"), Err(EnvelopeError::Foreign));
/// ```
pub fn decode(bytes: &[u8]) -> Result<Envelope<'_>, EnvelopeError> {
    let mut reader = Reader(bytes);
    if reader.take(2)? != MAGIC {
        return Err(EnvelopeError::Foreign);
    }
    let version = reader.u8()?;
    if version == 0 {
        return Err(EnvelopeError::UnknownVersion(version));
    }
    let header_len = u16::from_le_bytes(reader.array()?);
    if header_len < HEADER_V1 {
        return Err(EnvelopeError::Malformed("header too short"));
    }
    let mut header = Reader(reader.take(usize::from(header_len))?);
    let flags = header.u8()?;
    let codec = header.u8()?;
    let created_unix_ms = u64::from_le_bytes(header.array()?);
    let fresh_until_unix_ms = u64::from_le_bytes(header.array()?);
    let expires_unix_ms = u64::from_le_bytes(header.array()?);
    if fresh_until_unix_ms > expires_unix_ms || created_unix_ms > fresh_until_unix_ms {
        return Err(EnvelopeError::Malformed("timestamps out of order"));
    }
    let schema = if version >= 2 {
        u32::from_le_bytes(header.array()?)
    } else {
        0
    };
    let created_sub_ms_micros = if version >= 3 {
        u16::from_le_bytes(header.array()?)
    } else {
        0
    };
    if created_sub_ms_micros > 999 {
        return Err(EnvelopeError::Malformed(
            "over 999 microseconds within a millisecond",
        ));
    }
    let tag_count = usize::from(reader.u8()?);
    if tag_count > MAX_TAGS {
        return Err(EnvelopeError::Malformed("too many tags"));
    }
    let mut tags = Vec::with_capacity(tag_count);
    for _ in 0..tag_count {
        let len = usize::from(reader.u8()?);
        let tag = std::str::from_utf8(reader.take(len)?)
            .map_err(|_| EnvelopeError::Malformed("tag is not UTF-8"))?;
        tags.push(tag);
    }
    let tombstone = flags & FLAG_TOMBSTONE != 0;
    if tombstone && flags & FLAG_NOT_FOUND == 0 {
        return Err(EnvelopeError::Malformed("a tombstone with a payload"));
    }
    let payload = if flags & FLAG_NOT_FOUND != 0 {
        if !reader.0.is_empty() {
            return Err(EnvelopeError::Malformed("payload after a not-found entry"));
        }
        None
    } else {
        Some(reader.0)
    };
    Ok(Envelope {
        version,
        codec,
        created_unix_ms,
        created_sub_ms_micros,
        fresh_until_unix_ms,
        expires_unix_ms,
        schema,
        tombstone,
        tags,
        payload,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], EnvelopeError> {
        if self.0.len() < n {
            return Err(EnvelopeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, EnvelopeError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], EnvelopeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(payload: Option<&[u8]>) -> Envelope<'_> {
        Envelope {
            version: FORMAT_VERSION,
            codec: 1,
            created_unix_ms: 10,
            created_sub_ms_micros: 250,
            fresh_until_unix_ms: 20,
            expires_unix_ms: 30,
            schema: 7,
            tombstone: false,
            tags: vec!["a", "bc"],
            payload,
        }
    }

    #[test]
    fn round_trips_values_and_not_found() {
        for payload in [Some(&b"xyz"[..]), Some(&b""[..]), None] {
            let env = sample(payload);
            assert_eq!(decode(&env.encode()), Ok(env));
        }
    }

    #[test]
    fn encode_sizes_its_buffer_exactly() {
        for payload in [Some(&b"xyz"[..]), None] {
            let bytes = sample(payload).encode();
            assert_eq!(bytes.capacity(), bytes.len());
        }
    }

    #[test]
    fn a_later_version_with_extra_header_fields_is_readable() {
        let mut bytes = sample(Some(b"p")).encode();
        // Version 4 appends four header bytes this reader does not know.
        bytes[2] = 4;
        bytes[3..5].copy_from_slice(&(HEADER_V3 + 4).to_le_bytes());
        let tags_at = 5 + usize::from(HEADER_V3);
        bytes.splice(tags_at..tags_at, [9, 9, 9, 9]);
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.version, 4);
        assert_eq!((decoded.schema, decoded.created_sub_ms_micros), (7, 250));
        assert_eq!(decoded.tags, ["a", "bc"]);
        assert_eq!(decoded.payload, Some(&b"p"[..]));
    }

    #[test]
    fn version_1_entries_read_as_schema_0() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(b"hc\x01");
        bytes.extend_from_slice(&HEADER_V1.to_le_bytes());
        bytes.extend_from_slice(&[0, 1]);
        for time in [10u64, 20, 30] {
            bytes.extend_from_slice(&time.to_le_bytes());
        }
        bytes.extend_from_slice(b"\x00p");
        let decoded = decode(&bytes).unwrap();
        assert_eq!((decoded.version, decoded.schema), (1, 0));
        assert_eq!(decoded.payload, Some(&b"p"[..]));
    }

    #[test]
    fn version_2_entries_read_as_made_at_their_millisecond() {
        let mut bytes = sample(Some(b"p")).encode();
        bytes[2] = 2;
        bytes[3..5].copy_from_slice(&HEADER_V2.to_le_bytes());
        let sub_ms_at = 5 + usize::from(HEADER_V2);
        bytes.drain(sub_ms_at..sub_ms_at + 2);
        let decoded = decode(&bytes).unwrap();
        assert_eq!((decoded.version, decoded.schema), (2, 7));
        assert_eq!(
            (decoded.created_unix_ms, decoded.created_sub_ms_micros),
            (10, 0)
        );
        assert_eq!(decoded.tags, ["a", "bc"]);
        assert_eq!(decoded.payload, Some(&b"p"[..]));
    }

    #[test]
    fn tombstones_round_trip_and_the_version_sits_at_version_at() {
        let mut tombstone = sample(None);
        tombstone.tombstone = true;
        tombstone.tags = vec![];
        let bytes = tombstone.encode();
        assert_eq!(decode(&bytes), Ok(tombstone));
        assert_eq!(
            headroom_core::kv::version_of(&bytes, VERSION_AT),
            Some((10, 250))
        );
    }

    #[test]
    fn more_than_999_microseconds_within_a_millisecond_are_refused() {
        let mut bytes = sample(None).encode();
        bytes[CREATED_SUB_MS_MICROS..CREATED_SUB_MS_MICROS + 2]
            .copy_from_slice(&1_000u16.to_le_bytes());
        assert!(matches!(decode(&bytes), Err(EnvelopeError::Malformed(_))));
    }

    #[test]
    fn more_than_999_microseconds_are_written_as_999() {
        let mut envelope = sample(None);
        envelope.created_sub_ms_micros = 1_500;
        let bytes = envelope.encode();
        assert_eq!(decode(&bytes).map(|e| e.created_sub_ms_micros), Ok(999));
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = sample(None).encode();
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "prefix of {len} bytes");
        }
    }

    #[test]
    fn foreign_and_malformed_bytes_are_refused() {
        assert_eq!(decode(b"hello world"), Err(EnvelopeError::Foreign));
        let mut bytes = sample(None).encode();
        bytes[2] = 0;
        assert_eq!(decode(&bytes), Err(EnvelopeError::UnknownVersion(0)));
        let mut out_of_order = sample(None);
        out_of_order.fresh_until_unix_ms = 40;
        assert!(matches!(
            decode(&out_of_order.encode()),
            Err(EnvelopeError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn decoding_mutated_envelopes_never_panics(index in 0usize..64, byte in any::<u8>()) {
            let mut bytes = sample(Some(b"payload")).encode();
            let i = index % bytes.len();
            bytes[i] = byte;
            let _ = decode(&bytes);
        }
    }
}
