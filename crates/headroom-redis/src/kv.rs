use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::try_join_all;
use headroom_core::kv::{KvEntry, KvStore};
use headroom_core::{BackendError, BackendErrorKind, Key};

use headroom_core::slot::cluster_slot;

use crate::Redis;

/// The Redis [`KvStore`]: `GET`, `MGET`, `SET PX` (pipelined for many), `DEL`.
///
/// Values are stored as they are given; keys are the full namespaced [`Key`]s.
#[derive(Clone, Debug)]
pub struct RedisKvStore {
    redis: Redis,
    max_value_len: usize,
}

impl RedisKvStore {
    /// A store on `redis` accepting values of up to 16 MiB.
    pub fn new(redis: Redis) -> Self {
        Self {
            redis,
            max_value_len: 16 * 1024 * 1024,
        }
    }

    /// Sets the largest value accepted, in bytes. Larger values fail with
    /// [`BackendErrorKind::TooLarge`] before anything is sent.
    #[must_use]
    pub fn with_max_value_len(mut self, max_value_len: usize) -> Self {
        self.max_value_len = max_value_len;
        self
    }

    /// The connection this store uses.
    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    fn check(&self, value: &Bytes, ttl: Duration) -> Result<u64, BackendError> {
        if value.len() > self.max_value_len {
            return Err(BackendError::with_detail(
                BackendErrorKind::TooLarge,
                format!(
                    "value of {} bytes exceeds the limit of {} bytes",
                    value.len(),
                    self.max_value_len
                ),
            ));
        }
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        if millis == 0 {
            return Err(BackendError::with_detail(
                BackendErrorKind::Config,
                "a ttl under one millisecond is not allowed",
            ));
        }
        Ok(millis)
    }

    async fn set_pipelined(&self, entries: &[(&KvEntry, u64)]) -> Result<(), BackendError> {
        let mut pipeline = redis::pipe();
        for (entry, millis) in entries {
            pipeline
                .cmd("SET")
                .arg(entry.key.as_bytes())
                .arg(entry.value.as_ref())
                .arg("PX")
                .arg(*millis)
                .ignore();
        }
        self.redis.query_pipeline::<()>(&pipeline).await
    }
}

impl KvStore for RedisKvStore {
    async fn get(&self, key: &Key) -> Result<Option<Bytes>, BackendError> {
        let value: Option<Vec<u8>> = self
            .redis
            .query(redis::cmd("GET").arg(key.as_bytes()))
            .await?;
        Ok(value.map(Bytes::from))
    }

    async fn get_many(&self, keys: &[Key]) -> Result<Vec<Option<Bytes>>, BackendError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for key in keys {
            cmd.arg(key.as_bytes());
        }
        let values: Vec<Option<Vec<u8>>> = self.redis.query(&cmd).await?;
        if values.len() != keys.len() {
            return Err(BackendError::with_detail(
                BackendErrorKind::Protocol,
                format!(
                    "MGET of {} keys answered {} values",
                    keys.len(),
                    values.len()
                ),
            ));
        }
        Ok(values.into_iter().map(|v| v.map(Bytes::from)).collect())
    }

    async fn set(&self, key: &Key, value: Bytes, ttl: Duration) -> Result<(), BackendError> {
        let millis = self.check(&value, ttl)?;
        self.redis
            .query::<()>(
                redis::cmd("SET")
                    .arg(key.as_bytes())
                    .arg(value.as_ref())
                    .arg("PX")
                    .arg(millis),
            )
            .await
    }

    async fn set_many(&self, entries: &[KvEntry]) -> Result<(), BackendError> {
        let checked = entries
            .iter()
            .map(|entry| Ok((entry, self.check(&entry.value, entry.ttl)?)))
            .collect::<Result<Vec<_>, BackendError>>()?;
        if checked.is_empty() {
            return Ok(());
        }
        if !self.redis.is_cluster() {
            return self.set_pipelined(&checked).await;
        }
        // A cluster pipeline must stay within one slot: one pipeline per slot, all at once.
        let mut by_slot: BTreeMap<u16, Vec<(&KvEntry, u64)>> = BTreeMap::new();
        for item in checked {
            by_slot
                .entry(cluster_slot(item.0.key.as_bytes()))
                .or_default()
                .push(item);
        }
        try_join_all(by_slot.values().map(|group| self.set_pipelined(group))).await?;
        Ok(())
    }

    async fn delete(&self, keys: &[Key]) -> Result<u64, BackendError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut cmd = redis::cmd("DEL");
        for key in keys {
            cmd.arg(key.as_bytes());
        }
        self.redis.query(&cmd).await
    }
}
