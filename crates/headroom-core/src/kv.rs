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

    /// Writes one value that expires after `ttl`.
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
}
