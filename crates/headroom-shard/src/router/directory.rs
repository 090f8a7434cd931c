use crate::ShardId;
use crate::error::{ConfigError, ConfigErrorKind};

use super::{Layout, Router};

/// Explicit placements for some keys (hot tenants, pinned customers) over any router.
///
/// Overrides are exact keys kept sorted, so a lookup is one binary search before falling back
/// to the base router; no hasher is involved and the answer is the same everywhere.
///
/// ```
/// use headroom_shard::{Directory, JumpRouter, Router, ShardId};
///
/// let router = Directory::new(JumpRouter::new(8)?, [("tenant:big", ShardId(7))])?;
/// assert_eq!(router.route("tenant:big"), ShardId(7));
/// assert_eq!(router.route("tenant:small"), JumpRouter::new(8)?.route("tenant:small"));
/// # Ok::<(), headroom_shard::ConfigError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Directory<R> {
    base: R,
    overrides: Vec<(Box<[u8]>, ShardId)>,
}

impl<R: Router> Directory<R> {
    /// `base` with the given overrides; a key listed twice is an error.
    pub fn new<K: AsRef<[u8]>>(
        base: R,
        overrides: impl IntoIterator<Item = (K, ShardId)>,
    ) -> Result<Self, ConfigError> {
        let mut overrides: Vec<(Box<[u8]>, ShardId)> = overrides
            .into_iter()
            .map(|(key, shard)| (key.as_ref().into(), shard))
            .collect();
        overrides.sort_unstable();
        for pair in overrides.windows(2) {
            if pair[0].0 == pair[1].0 {
                return Err(ConfigError::new(
                    ConfigErrorKind::Duplicate,
                    format_args!("key {:?} overridden twice", pair[0].0),
                ));
            }
        }
        Ok(Self { base, overrides })
    }

    /// The router used for keys without an override.
    pub fn base(&self) -> &R {
        &self.base
    }

    /// The overrides, sorted by key.
    pub fn overrides(&self) -> impl Iterator<Item = (&[u8], ShardId)> + '_ {
        self.overrides
            .iter()
            .map(|(key, shard)| (key.as_ref(), *shard))
    }
}

impl<R: Router> Router for Directory<R> {
    #[inline]
    fn route_bytes(&self, key: &[u8]) -> ShardId {
        match self
            .overrides
            .binary_search_by(|(candidate, _)| candidate.as_ref().cmp(key))
        {
            Ok(at) => self.overrides[at].1,
            Err(_) => self.base.route_bytes(key),
        }
    }

    fn layout(&self) -> Layout<'_> {
        Layout::Pinned {
            pins: &self.overrides,
            base: &self.base,
        }
    }

    fn shards(&self) -> Vec<ShardId> {
        let mut shards = self.base.shards();
        shards.extend(self.overrides.iter().map(|(_, shard)| *shard));
        shards.sort_unstable();
        shards.dedup();
        shards
    }
}
