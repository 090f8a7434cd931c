//! How cached values become bytes in L2: serde with a pluggable [`Codec`].
//!
//! [`Postcard`] (compact, the default) is always available; `Json` (readable with
//! `redis-cli`) comes with the `json` feature. The codec's [`Codec::ID`] is written in every
//! envelope, so a value written by one codec is never decoded by another: it reads as a miss.

use std::fmt;
use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The error of a codec, boxed.
pub type CodecError = Box<dyn std::error::Error + Send + Sync>;

/// Turns values into bytes and back.
pub trait Codec: Send + Sync + fmt::Debug + 'static {
    /// The id written in every envelope; ids 0 to 15 are reserved for headroom's codecs.
    const ID: u8;

    /// Appends the encoding of `value` to `out`.
    fn encode<T: Serialize>(&self, value: &T, out: &mut Vec<u8>) -> Result<(), CodecError>;

    /// Decodes a value from `bytes`.
    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError>;
}

/// The [postcard](https://docs.rs/postcard) codec: compact, not self-describing. The default.
#[derive(Clone, Copy, Debug, Default)]
pub struct Postcard;

impl Codec for Postcard {
    const ID: u8 = 1;

    fn encode<T: Serialize>(&self, value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let taken = std::mem::take(out);
        *out = postcard::to_extend(value, taken)?;
        Ok(())
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        let (value, rest) = postcard::take_from_bytes(bytes)?;
        if !rest.is_empty() {
            return Err("trailing bytes after the value".into());
        }
        Ok(value)
    }
}

/// The JSON codec: larger and slower, but readable in `redis-cli` (feature `json`).
#[cfg(feature = "json")]
#[derive(Clone, Copy, Debug, Default)]
pub struct Json;

#[cfg(feature = "json")]
impl Codec for Json {
    const ID: u8 = 2;

    fn encode<T: Serialize>(&self, value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
        serde_json::to_writer(out, value)?;
        Ok(())
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

/// A codec bound to one value type, object-safe so the cache is not generic over its codec.
pub(crate) trait ValueCodec<V>: Send + Sync + fmt::Debug {
    fn id(&self) -> u8;
    fn encode(&self, value: &V, out: &mut Vec<u8>) -> Result<(), CodecError>;
    fn decode(&self, bytes: &[u8]) -> Result<V, CodecError>;
}

pub(crate) struct Bound<C, V> {
    codec: C,
    value: PhantomData<fn(V) -> V>,
}

impl<C, V> Bound<C, V> {
    pub(crate) fn new(codec: C) -> Self {
        Self {
            codec,
            value: PhantomData,
        }
    }
}

impl<C: fmt::Debug, V> fmt::Debug for Bound<C, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.codec.fmt(f)
    }
}

impl<C: Codec, V: Serialize + DeserializeOwned> ValueCodec<V> for Bound<C, V> {
    fn id(&self) -> u8 {
        C::ID
    }

    fn encode(&self, value: &V, out: &mut Vec<u8>) -> Result<(), CodecError> {
        self.codec.encode(value, out)
    }

    fn decode(&self, bytes: &[u8]) -> Result<V, CodecError> {
        self.codec.decode(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct User {
        id: u64,
        name: String,
    }

    fn round_trip<C: Codec>(codec: C) {
        let user = User {
            id: 7,
            name: "Ada".into(),
        };
        let mut out = b"prefix".to_vec();
        codec.encode(&user, &mut out).unwrap();
        assert_eq!(&out[..6], b"prefix", "encode appends");
        assert_eq!(codec.decode::<User>(&out[6..]).unwrap(), user);
        assert!(codec.decode::<User>(&out[6..out.len() - 1]).is_err());
    }

    #[test]
    fn postcard_round_trips_and_refuses_truncation() {
        round_trip(Postcard);
    }

    #[cfg(feature = "json")]
    #[test]
    fn json_round_trips_and_refuses_truncation() {
        round_trip(Json);
    }
}
