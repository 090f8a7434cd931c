//! The bytes a job is stored as: a version byte, the job's nonce (8 bytes, version 2 only),
//! the origin's length and bytes, then the payload. Version 1, without a nonce, is what
//! earlier versions read, and is written unless a nonce is asked for.

use bytes::{BufMut, Bytes, BytesMut};

/// With a nonce.
const VERSION: u8 = 2;

/// The longest origin carried, in bytes.
pub(crate) const MAX_ORIGIN_LEN: usize = 255;

/// A job as stored when it was enqueued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Opened {
    /// Drawn at random on enqueue (`None` for a job stored without one).
    pub(crate) nonce: Option<u64>,
    pub(crate) origin: Option<String>,
    pub(crate) payload: Bytes,
}

pub(crate) fn seal(nonce: Option<u64>, origin: Option<&str>, payload: &[u8]) -> Bytes {
    let origin = origin.unwrap_or("").as_bytes();
    let mut sealed = BytesMut::with_capacity(10 + origin.len() + payload.len());
    match nonce {
        Some(nonce) => {
            sealed.put_u8(VERSION);
            sealed.put_u64(nonce);
        }
        None => sealed.put_u8(1),
    }
    sealed.put_u8(origin.len() as u8);
    sealed.put_slice(origin);
    sealed.put_slice(payload);
    sealed.freeze()
}

/// The job, or `None` when the bytes are not an envelope.
pub(crate) fn open(sealed: &Bytes) -> Option<Opened> {
    let (&version, rest) = sealed.split_first()?;
    let (nonce, rest) = match version {
        1 => (None, rest),
        VERSION => {
            let (nonce, rest) = rest.split_first_chunk::<8>()?;
            (Some(u64::from_be_bytes(*nonce)), rest)
        }
        _ => return None,
    };
    let (&len, rest) = rest.split_first()?;
    let origin = std::str::from_utf8(rest.get(..usize::from(len))?).ok()?;
    let origin = (!origin.is_empty()).then(|| origin.to_owned());
    let start = sealed.len() - rest.len() + usize::from(len);
    Some(Opened {
        nonce,
        origin,
        payload: sealed.slice(start..),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_origins_and_nonces_round_trip() {
        for (nonce, origin, payload) in [
            (Some(0), None, &b""[..]),
            (Some(u64::MAX), Some("00-abc-01"), b"charge 7"),
            (None, Some("00-abc-01"), b"charge 7"),
        ] {
            let opened = open(&seal(nonce, origin, payload)).expect("an envelope");
            assert_eq!(opened.nonce, nonce);
            assert_eq!(opened.origin.as_deref(), origin);
            assert_eq!(&opened.payload[..], payload);
        }
    }

    /// A job sealed without a nonce is what versions before nonces read: their `open`
    /// took version 1 only.
    #[test]
    fn a_job_without_a_nonce_is_sealed_as_earlier_versions_read_it() {
        let sealed = seal(None, Some("abc"), b"charge");
        assert_eq!(&sealed[..], b"\x01\x03abccharge");
    }

    #[test]
    fn jobs_stored_before_nonces_are_read() {
        let opened = open(&Bytes::from_static(b"\x01\x03abccharge")).expect("an envelope");
        assert_eq!(
            opened,
            Opened {
                nonce: None,
                origin: Some("abc".to_owned()),
                payload: Bytes::from_static(b"charge"),
            }
        );
    }

    #[test]
    fn foreign_bytes_are_not_an_envelope() {
        for bytes in [
            &b""[..],
            b"\x01",
            b"\x03\x00abc",
            b"\x02\x00\x00\x00",
            b"\x01\x09short",
            b"\x01\x02\xff\xfe",
        ] {
            assert_eq!(open(&Bytes::copy_from_slice(bytes)), None, "{bytes:?}");
        }
    }
}
