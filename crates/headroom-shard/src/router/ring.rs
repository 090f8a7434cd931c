use crate::ShardId;
use crate::error::{ConfigError, ConfigErrorKind};
use crate::hash::{key_hash, mix};

use super::{MAX_ENTRIES, Router, member_seed, uniform, validate_members};

/// Consistent hash ring with virtual nodes (Karger et al., 1997), weighted.
///
/// Each member places `round(vnodes × weight)` points (at least one) at
/// [`mix`]`(member_seed, i)`; a key belongs to the first point at or after its hash, wrapping
/// around. Lookup is a binary search over the points (O(log(n × vnodes))). With 160 virtual
/// nodes the heaviest member carries about 1.1–1.2× the mean share; more virtual nodes tighten
/// that at the cost of memory.
///
/// ```
/// use headroom_shard::{RingRouter, Router, ShardId};
///
/// let router = RingRouter::new(8, 160)?;
/// assert!(router.route("session:abc") < ShardId(8));
/// # Ok::<(), headroom_shard::ConfigError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct RingRouter {
    points: Vec<u64>,
    owners: Vec<ShardId>,
    shards: Vec<ShardId>,
}

impl RingRouter {
    /// `vnodes` virtual nodes for each of shards `0..shards`.
    pub fn new(shards: u32, vnodes: u32) -> Result<Self, ConfigError> {
        Self::weighted(uniform(shards), vnodes)
    }

    /// Members with relative weights; a member of weight `w` gets `round(vnodes × w)` points.
    pub fn weighted(
        members: impl IntoIterator<Item = (ShardId, f64)>,
        vnodes: u32,
    ) -> Result<Self, ConfigError> {
        let members = validate_members(members)?;
        if vnodes == 0 {
            return Err(ConfigError::new(
                ConfigErrorKind::InvalidValue,
                "vnodes must be at least 1",
            ));
        }
        let counts: Vec<u64> = members
            .iter()
            .map(|(_, weight)| (f64::from(vnodes) * weight).round().max(1.0) as u64)
            .collect();
        if counts.iter().fold(0u64, |sum, &c| sum.saturating_add(c)) > MAX_ENTRIES {
            return Err(ConfigError::new(
                ConfigErrorKind::TooLarge,
                format_args!("more than {MAX_ENTRIES} ring points"),
            ));
        }
        let mut ring: Vec<(u64, ShardId)> = Vec::new();
        for ((shard, _), &count) in members.iter().zip(&counts) {
            let seed = member_seed(*shard);
            ring.extend((0..count).map(|i| (mix(seed, i), *shard)));
        }
        // Ties between points (vanishingly rare) resolve by shard id, deterministically.
        ring.sort_unstable();
        ring.dedup_by_key(|(point, _)| *point);
        Ok(Self {
            points: ring.iter().map(|(point, _)| *point).collect(),
            owners: ring.iter().map(|(_, shard)| *shard).collect(),
            shards: members.iter().map(|(shard, _)| *shard).collect(),
        })
    }

    /// The index of the point that owns `hash`.
    #[inline]
    pub(crate) fn point_index(&self, hash: u64) -> usize {
        let at = self.points.partition_point(|&point| point < hash);
        if at == self.points.len() { 0 } else { at }
    }

    /// The owner of the point at `index` (wrapping).
    #[inline]
    pub(crate) fn owner_at(&self, index: usize) -> ShardId {
        self.owners[index % self.owners.len()]
    }

    /// The number of points on the ring.
    pub fn point_count(&self) -> usize {
        self.points.len()
    }

    /// The shard of a precomputed key hash.
    #[inline]
    pub fn route_hash(&self, hash: u64) -> ShardId {
        self.owners[self.point_index(hash)]
    }
}

impl Router for RingRouter {
    #[inline]
    fn route_bytes(&self, key: &[u8]) -> ShardId {
        self.route_hash(key_hash(key))
    }

    fn shards(&self) -> Vec<ShardId> {
        self.shards.clone()
    }
}
