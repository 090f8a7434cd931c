//! The bytes a job is stored as: a version byte, the origin's length and bytes, then the
//! payload.

use bytes::{BufMut, Bytes, BytesMut};

const VERSION: u8 = 1;

/// The longest origin carried, in bytes.
pub(crate) const MAX_ORIGIN_LEN: usize = 255;

pub(crate) fn seal(origin: Option<&str>, payload: &[u8]) -> Bytes {
    let origin = origin.unwrap_or("").as_bytes();
    let mut sealed = BytesMut::with_capacity(2 + origin.len() + payload.len());
    sealed.put_u8(VERSION);
    sealed.put_u8(origin.len() as u8);
    sealed.put_slice(origin);
    sealed.put_slice(payload);
    sealed.freeze()
}

/// The origin (if any) and the payload, or `None` when the bytes are not an envelope.
pub(crate) fn open(sealed: &Bytes) -> Option<(Option<String>, Bytes)> {
    let (&version, rest) = sealed.split_first()?;
    let (&len, rest) = rest.split_first()?;
    if version != VERSION || rest.len() < usize::from(len) {
        return None;
    }
    let origin = std::str::from_utf8(&rest[..usize::from(len)]).ok()?;
    let origin = (!origin.is_empty()).then(|| origin.to_owned());
    Some((origin, sealed.slice(2 + usize::from(len)..)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_and_origins_round_trip() {
        for (origin, payload) in [(None, &b""[..]), (Some("00-abc-01"), b"charge 7")] {
            let sealed = seal(origin, payload);
            let (back, bytes) = open(&sealed).expect("an envelope");
            assert_eq!(back.as_deref(), origin);
            assert_eq!(&bytes[..], payload);
        }
    }

    #[test]
    fn foreign_bytes_are_not_an_envelope() {
        for bytes in [
            &b""[..],
            b"\x01",
            b"\x02\x00abc",
            b"\x01\x09short",
            b"\x01\x02\xff\xfe",
        ] {
            assert_eq!(open(&Bytes::copy_from_slice(bytes)), None, "{bytes:?}");
        }
    }
}
