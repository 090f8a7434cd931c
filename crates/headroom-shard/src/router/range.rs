use crate::ShardId;
use crate::error::{ConfigError, ConfigErrorKind};

use super::{Layout, Router};

/// Range sharding: ordered split points divide the byte-ordered key space into ranges.
///
/// Range scans stay on one shard and hot ranges can be split precisely, at the price of
/// balance depending on the key distribution (sequential keys all hit the last range).
/// Lookup is a binary search over the split points.
///
/// ```
/// use headroom_shard::{RangeRouter, Router, ShardId};
///
/// let router = RangeRouter::builder(ShardId(0))
///     .split_at("g", ShardId(1))
///     .split_at("p", ShardId(2))
///     .build()?;
/// assert_eq!(router.route("apple"), ShardId(0));
/// assert_eq!(router.route("grape"), ShardId(1));
/// assert_eq!(router.route("zebra"), ShardId(2));
/// # Ok::<(), headroom_shard::ConfigError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeRouter {
    bounds: Vec<Box<[u8]>>,
    owners: Vec<ShardId>,
}

impl RangeRouter {
    /// Starts a router whose lowest range (from the empty key) belongs to `first`.
    pub fn builder(first: ShardId) -> RangeRouterBuilder {
        RangeRouterBuilder {
            first,
            splits: Vec::new(),
        }
    }

    /// The ranges as `(inclusive lower bound, owner)`; the first lower bound is the empty key.
    pub fn ranges(&self) -> impl Iterator<Item = (&[u8], ShardId)> + '_ {
        std::iter::once(&[][..])
            .chain(self.bounds.iter().map(AsRef::as_ref))
            .zip(self.owners.iter().copied())
    }
}

impl Router for RangeRouter {
    #[inline]
    fn route_bytes(&self, key: &[u8]) -> ShardId {
        self.owners[self.bounds.partition_point(|bound| bound.as_ref() <= key)]
    }

    fn layout(&self) -> Layout<'_> {
        Layout::Ranges(self)
    }

    fn shards(&self) -> Vec<ShardId> {
        let mut shards = self.owners.clone();
        shards.sort_unstable();
        shards.dedup();
        shards
    }
}

/// Builds a [`RangeRouter`]; split points must be strictly increasing.
#[derive(Clone, Debug)]
#[must_use]
pub struct RangeRouterBuilder {
    first: ShardId,
    splits: Vec<(Box<[u8]>, ShardId)>,
}

impl RangeRouterBuilder {
    /// Keys from `bound` (inclusive) up to the next split belong to `shard`.
    pub fn split_at(mut self, bound: impl AsRef<[u8]>, shard: ShardId) -> Self {
        self.splits.push((bound.as_ref().into(), shard));
        self
    }

    /// Checks the split points and builds the router.
    pub fn build(self) -> Result<RangeRouter, ConfigError> {
        let mut previous: &[u8] = &[];
        for (bound, _) in &self.splits {
            if bound.as_ref() <= previous {
                return Err(ConfigError::new(
                    ConfigErrorKind::UnorderedBounds,
                    format_args!("split {bound:?} does not follow {previous:?}"),
                ));
            }
            previous = bound;
        }
        let (bounds, rest): (Vec<_>, Vec<_>) = self.splits.into_iter().unzip();
        let mut owners = vec![self.first];
        owners.extend(rest);
        Ok(RangeRouter { bounds, owners })
    }
}
