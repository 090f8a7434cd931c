//! The key-value store behind the cache's shared level (L2).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::{BackendError, Key};

/// One entry of a [`KvStore::set_many`] call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvEntry {
    /// The key.
    pub key: Key,
    /// The value, opaque bytes.
    pub value: Bytes,
    /// How long the entry lives; never zero.
    pub ttl: Duration,
}

/// A shared key-value store: bytes in, bytes out, every entry with a time to live.
///
/// # Contract
///
/// Every implementation (memory, Redis standalone, Redis Cluster) passes the same conformance
/// suite in `headroom-testkit`:
///
/// - Values are opaque: any bytes written are read back unchanged, including empty values and
///   bytes that are not valid UTF-8. Interpreting them (and rejecting corrupt ones) is the
///   caller's job; the store never fails a read because of what the bytes contain.
/// - `set` and `set_many` overwrite, and the entry expires `ttl` after the write (millisecond
///   precision). A `ttl` of zero is rejected with [`BackendErrorKind::Config`](crate::BackendErrorKind::Config).
/// - `get_many` answers in the order of `keys`, one slot per key (duplicates included), and
///   is one round trip to a networked store (split per node on a cluster, sent concurrently).
/// - `set_many` writes all entries in one round trip (pipelined); it is not a transaction.
/// - `delete` returns how many of the keys existed.
/// - `set_if_newer` is atomic per key: it compares with what the key holds at the moment it
///   writes, so no write lands between the comparison and its own. It is one round trip (one
///   per node on a cluster).
/// - `delete_if_eq` is atomic: it deletes only the exact bytes it was given.
/// - A value larger than the store's limit fails with
///   [`BackendErrorKind::TooLarge`](crate::BackendErrorKind::TooLarge) and writes nothing.
/// - Every call of a networked store is bounded by its configured timeout and fails with
///   [`BackendErrorKind::Timeout`](crate::BackendErrorKind::Timeout) rather than hang; a lost
///   connection fails the call in flight and the store reconnects by itself.
pub trait KvStore: Send + Sync + fmt::Debug + 'static {
    /// Reads one value.
    fn get(&self, key: &Key) -> impl Future<Output = Result<Option<Bytes>, BackendError>> + Send;

    /// Reads many values in one round trip, in the order of `keys`.
    fn get_many(
        &self,
        keys: &[Key],
    ) -> impl Future<Output = Result<Vec<Option<Bytes>>, BackendError>> + Send;

    /// Writes one value that expires after `ttl`. A TTL under a millisecond or over
    /// [`MAX_DURATION`](crate::MAX_DURATION) fails with
    /// [`BackendErrorKind::Config`](crate::BackendErrorKind::Config), in a batch before
    /// anything is written.
    fn set(
        &self,
        key: &Key,
        value: Bytes,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Writes many values in one round trip.
    fn set_many(
        &self,
        entries: &[KvEntry],
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Deletes keys; returns how many existed.
    fn delete(&self, keys: &[Key]) -> impl Future<Output = Result<u64, BackendError>> + Send;

    /// Writes each entry unless its key already holds a newer value (a higher version; an
    /// equal one is replaced); returns how many entries were written.
    ///
    /// A value's version sits where `version` says (see [`VersionAt`]). A held value too
    /// short to carry its `u64`, or that does not start with the version's marker (bytes
    /// another program wrote), is overwritten; one that ends before the tie-break, or whose
    /// gate byte says it has none, has a tie-break of 0. An entry too short to carry the whole
    /// version (its gate byte included), or without the marker, fails the call with
    /// [`BackendErrorKind::Config`](crate::BackendErrorKind::Config) before anything is
    /// written.
    ///
    /// The default implementation reads, compares and writes in separate calls: it is not
    /// atomic, and a store shared by several callers must override it.
    fn set_if_newer(
        &self,
        entries: &[KvEntry],
        version: VersionAt,
    ) -> impl Future<Output = Result<u64, BackendError>> + Send {
        async move {
            check_versions(entries, version)?;
            let keys: Vec<Key> = entries.iter().map(|entry| entry.key.clone()).collect();
            let held = self.get_many(&keys).await?;
            let newer: Vec<KvEntry> = entries
                .iter()
                .zip(held)
                .filter(|(entry, held)| is_newer(&entry.value, held.as_deref(), version))
                .map(|(entry, _)| entry.clone())
                .collect();
            self.set_many(&newer).await?;
            Ok(newer.len() as u64)
        }
    }

    /// Deletes `key` only while it holds exactly `expected`; returns whether it was deleted.
    ///
    /// The default implementation reads and deletes in separate calls: it is not atomic, and
    /// a store shared by several callers must override it.
    fn delete_if_eq(
        &self,
        key: &Key,
        expected: &[u8],
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        async move {
            if self.get(key).await?.as_deref() != Some(expected) {
                return Ok(false);
            }
            Ok(self.delete(std::slice::from_ref(key)).await? > 0)
        }
    }
}

/// Where a value carries its version for [`KvStore::set_if_newer`]: a little-endian `u64` in
/// its bytes `at..at + 8` and, optionally, a little-endian `u16` tie-break in its bytes
/// `tie_at..tie_at + 2` that orders two values of one `u64` (a millisecond and the
/// microseconds within it, say).
///
/// When values of several formats share a store, the tie-break can be made to count only in
/// values of a format that carries it ([`with_tie_only_when`](Self::with_tie_only_when)); in
/// the others it counts as 0, whatever their bytes hold there.
///
/// ```
/// use headroom_core::kv::{VersionAt, is_newer};
///
/// let version = VersionAt::new(0).with_tie_at(8);
/// let value = |ms: u64, us: u16| [&ms.to_le_bytes()[..], &us.to_le_bytes()].concat();
/// assert!(is_newer(&value(7, 500), Some(&value(7, 100)), version));
/// assert!(!is_newer(&value(7, 100), Some(&value(7, 500)), version));
/// assert!(!is_newer(&value(6, 900), Some(&value(7, 0)), version));
///
/// // A format byte first: the tie-break counts only from format 3 on.
/// let version = VersionAt::new(1).with_tie_at(9).with_tie_only_when(0, 3);
/// let value = |format: u8, ms: u64, us: u16| {
///     [&[format][..], &ms.to_le_bytes(), &us.to_le_bytes()].concat()
/// };
/// assert!(is_newer(&value(3, 7, 100), Some(&value(2, 7, 500)), version));
/// assert!(!is_newer(&value(3, 7, 100), Some(&value(3, 7, 500)), version));
///
/// // Only values that start with a marker carry a version: any such value replaces bytes
/// // another program wrote, whatever they hold where the version would be.
/// let version = VersionAt::new(2).with_marker(b"hc");
/// let value = |ms: u64| [&b"hc"[..], &ms.to_le_bytes()].concat();
/// assert!(is_newer(&value(1), Some(&[0xFF; 10]), version));
/// assert!(!is_newer(&value(1), Some(&value(2)), version));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VersionAt {
    at: usize,
    tie_at: Option<usize>,
    tie_only_when: Option<(usize, u8)>,
    marker: &'static [u8],
}

impl VersionAt {
    /// A version that is the `u64` at `at`, without a tie-break.
    pub const fn new(at: usize) -> Self {
        Self {
            at,
            tie_at: None,
            tie_only_when: None,
            marker: &[],
        }
    }

    /// This version, carried only by values that start with `marker` (a format's magic
    /// bytes): a held value without it was written by another program and is older than any
    /// value offered, and an offered value without it is refused.
    pub const fn with_marker(self, marker: &'static [u8]) -> Self {
        Self { marker, ..self }
    }

    /// The bytes a value starts with when it carries the version (empty when any value does).
    pub const fn marker(self) -> &'static [u8] {
        self.marker
    }

    /// This version, with the `u16` at `tie_at` to break a tie.
    pub const fn with_tie_at(self, tie_at: usize) -> Self {
        Self {
            tie_at: Some(tie_at),
            ..self
        }
    }

    /// This version, whose tie-break counts only in values whose byte at `byte_at` is at
    /// least `at_least` (say, a format version from which values carry it); in any other
    /// value, it counts as 0. It applies to the tie-break set by
    /// [`with_tie_at`](Self::with_tie_at), in either order; without one, it has no effect.
    pub const fn with_tie_only_when(self, byte_at: usize, at_least: u8) -> Self {
        Self {
            tie_only_when: Some((byte_at, at_least)),
            ..self
        }
    }

    /// Where the `u64` starts.
    pub const fn at(self) -> usize {
        self.at
    }

    /// Where the `u16` that breaks a tie starts, if the version has one.
    pub const fn tie_at(self) -> Option<usize> {
        self.tie_at
    }

    /// The byte that decides whether the tie-break counts, and its least value, if one does
    /// (see [`with_tie_only_when`](Self::with_tie_only_when)).
    pub const fn tie_only_when(self) -> Option<(usize, u8)> {
        match self.tie_at {
            Some(_) => self.tie_only_when,
            None => None,
        }
    }

    /// How many bytes a value needs to carry the whole version, its gate byte and marker
    /// included.
    pub fn len_needed(self) -> usize {
        let end = self.at.saturating_add(8).max(self.marker.len());
        let Some(tie_at) = self.tie_at else {
            return end;
        };
        let gate_end = self.tie_only_when.map_or(0, |(at, _)| at.saturating_add(1));
        end.max(tie_at.saturating_add(2)).max(gate_end)
    }

    /// The tie-break `value` carries: 0 when the version has none, `value` ends before it, or
    /// its gate byte is missing or below its least value.
    fn tie_of(self, value: &[u8]) -> u16 {
        let Some(tie_at) = self.tie_at else { return 0 };
        let counts = self
            .tie_only_when
            .is_none_or(|(at, least)| value.get(at).is_some_and(|byte| *byte >= least));
        match value.get(tie_at..tie_at.saturating_add(2)) {
            Some(&[low, high]) if counts => u16::from_le_bytes([low, high]),
            _ => 0,
        }
    }
}

/// The version `value` carries where `version` says (see [`KvStore::set_if_newer`]): its
/// `u64`, then its tie-break, which counts as 0 when there is none, `value` ends before it (a
/// value written by a format without one), or the version's gate byte says it does not count
/// (see [`VersionAt::with_tie_only_when`]); `None` when `value` is too short for the `u64`
/// or does not start with the version's marker.
pub fn version_of(value: &[u8], version: VersionAt) -> Option<(u64, u16)> {
    if !value.starts_with(version.marker) {
        return None;
    }
    let high = value.get(version.at..version.at.checked_add(8)?)?;
    Some((
        u64::from_le_bytes(high.try_into().ok()?),
        version.tie_of(value),
    ))
}

/// Whether `value` may replace `held` under [`KvStore::set_if_newer`].
pub fn is_newer(value: &[u8], held: Option<&[u8]>, version: VersionAt) -> bool {
    match (
        held.and_then(|held| version_of(held, version)),
        version_of(value, version),
    ) {
        (Some(held), Some(new)) => new >= held,
        _ => true,
    }
}

/// Refuses entries too short to carry their version, or without its marker.
pub fn check_versions(entries: &[KvEntry], version: VersionAt) -> Result<(), BackendError> {
    if entries.iter().any(|entry| {
        entry.value.len() < version.len_needed() || !entry.value.starts_with(version.marker)
    }) {
        return Err(BackendError::with_detail(
            crate::BackendErrorKind::Config,
            "a value that does not carry its version",
        ));
    }
    Ok(())
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Object-safe mirror of [`KvStore`], implemented for every store.
trait ErasedKvStore: Send + Sync + fmt::Debug + 'static {
    fn get<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Result<Option<Bytes>, BackendError>>;
    fn get_many<'a>(
        &'a self,
        keys: &'a [Key],
    ) -> BoxFuture<'a, Result<Vec<Option<Bytes>>, BackendError>>;
    fn set<'a>(
        &'a self,
        key: &'a Key,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>>;
    fn set_many<'a>(&'a self, entries: &'a [KvEntry]) -> BoxFuture<'a, Result<(), BackendError>>;
    fn delete<'a>(&'a self, keys: &'a [Key]) -> BoxFuture<'a, Result<u64, BackendError>>;
    fn set_if_newer<'a>(
        &'a self,
        entries: &'a [KvEntry],
        version: VersionAt,
    ) -> BoxFuture<'a, Result<u64, BackendError>>;
    fn delete_if_eq<'a>(
        &'a self,
        key: &'a Key,
        expected: &'a [u8],
    ) -> BoxFuture<'a, Result<bool, BackendError>>;
}

impl<S: KvStore> ErasedKvStore for S {
    fn get<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Result<Option<Bytes>, BackendError>> {
        Box::pin(KvStore::get(self, key))
    }
    fn get_many<'a>(
        &'a self,
        keys: &'a [Key],
    ) -> BoxFuture<'a, Result<Vec<Option<Bytes>>, BackendError>> {
        Box::pin(KvStore::get_many(self, keys))
    }
    fn set<'a>(
        &'a self,
        key: &'a Key,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(KvStore::set(self, key, value, ttl))
    }
    fn set_many<'a>(&'a self, entries: &'a [KvEntry]) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(KvStore::set_many(self, entries))
    }
    fn delete<'a>(&'a self, keys: &'a [Key]) -> BoxFuture<'a, Result<u64, BackendError>> {
        Box::pin(KvStore::delete(self, keys))
    }
    fn set_if_newer<'a>(
        &'a self,
        entries: &'a [KvEntry],
        version: VersionAt,
    ) -> BoxFuture<'a, Result<u64, BackendError>> {
        Box::pin(KvStore::set_if_newer(self, entries, version))
    }
    fn delete_if_eq<'a>(
        &'a self,
        key: &'a Key,
        expected: &'a [u8],
    ) -> BoxFuture<'a, Result<bool, BackendError>> {
        Box::pin(KvStore::delete_if_eq(self, key, expected))
    }
}

/// A [`KvStore`] chosen at run time (memory or Redis), behind one cheap-to-clone type.
///
/// Each call boxes its future; use the concrete store type where that matters.
#[derive(Clone, Debug)]
pub struct DynKvStore(Arc<dyn ErasedKvStore>);

impl DynKvStore {
    /// Erases the type of `store`.
    pub fn new(store: impl KvStore) -> Self {
        Self(Arc::new(store))
    }
}

impl KvStore for DynKvStore {
    async fn get(&self, key: &Key) -> Result<Option<Bytes>, BackendError> {
        self.0.get(key).await
    }
    async fn get_many(&self, keys: &[Key]) -> Result<Vec<Option<Bytes>>, BackendError> {
        self.0.get_many(keys).await
    }
    async fn set(&self, key: &Key, value: Bytes, ttl: Duration) -> Result<(), BackendError> {
        self.0.set(key, value, ttl).await
    }
    async fn set_many(&self, entries: &[KvEntry]) -> Result<(), BackendError> {
        self.0.set_many(entries).await
    }
    async fn delete(&self, keys: &[Key]) -> Result<u64, BackendError> {
        self.0.delete(keys).await
    }
    async fn set_if_newer(
        &self,
        entries: &[KvEntry],
        version: VersionAt,
    ) -> Result<u64, BackendError> {
        self.0.set_if_newer(entries, version).await
    }
    async fn delete_if_eq(&self, key: &Key, expected: &[u8]) -> Result<bool, BackendError> {
        self.0.delete_if_eq(key, expected).await
    }
}

impl<S: KvStore> KvStore for Arc<S> {
    async fn get(&self, key: &Key) -> Result<Option<Bytes>, BackendError> {
        S::get(self, key).await
    }
    async fn get_many(&self, keys: &[Key]) -> Result<Vec<Option<Bytes>>, BackendError> {
        S::get_many(self, keys).await
    }
    async fn set(&self, key: &Key, value: Bytes, ttl: Duration) -> Result<(), BackendError> {
        S::set(self, key, value, ttl).await
    }
    async fn set_many(&self, entries: &[KvEntry]) -> Result<(), BackendError> {
        S::set_many(self, entries).await
    }
    async fn delete(&self, keys: &[Key]) -> Result<u64, BackendError> {
        S::delete(self, keys).await
    }
    async fn set_if_newer(
        &self,
        entries: &[KvEntry],
        version: VersionAt,
    ) -> Result<u64, BackendError> {
        S::set_if_newer(self, entries, version).await
    }
    async fn delete_if_eq(&self, key: &Key, expected: &[u8]) -> Result<bool, BackendError> {
        S::delete_if_eq(self, key, expected).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_applies_in_either_order_and_counts_in_the_length_needed() {
        let gated = VersionAt::new(0).with_tie_at(8).with_tie_only_when(12, 3);
        assert_eq!(
            VersionAt::new(0).with_tie_only_when(12, 3).with_tie_at(8),
            gated
        );
        assert_eq!(gated.len_needed(), 13);
        assert_eq!(gated.tie_only_when(), Some((12, 3)));
        assert_eq!(VersionAt::new(0).with_tie_only_when(12, 3).len_needed(), 8);
        assert_eq!(
            VersionAt::new(0).with_tie_only_when(12, 3).tie_only_when(),
            None
        );
        let value = |tie: u16, gate: u8| {
            [&7u64.to_le_bytes()[..], &tie.to_le_bytes(), &[0, 0, gate]].concat()
        };
        assert_eq!(version_of(&value(500, 3), gated), Some((7, 500)));
        assert_eq!(version_of(&value(500, 2), gated), Some((7, 0)));
        assert_eq!(version_of(&value(500, 2)[..12], gated), Some((7, 0)));
        let entry = |value: &[u8]| KvEntry {
            key: crate::Namespace::new("t").unwrap().key("k").unwrap(),
            value: Bytes::copy_from_slice(value),
            ttl: Duration::from_secs(1),
        };
        assert!(check_versions(&[entry(&value(1, 3))], gated).is_ok());
        assert!(check_versions(&[entry(&value(1, 3)[..12])], gated).is_err());
    }
}
