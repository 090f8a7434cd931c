//! Routers: pure, deterministic maps from a key to a shard.
//!
//! Every router hashes keys with the stable functions of [`crate::hash`], so the same key
//! lands on the same shard in every process. Lookups take no lock and do not allocate.
//! [`BoundedLoadRouter`] is the exception that proves the rule: it balances live load, so its
//! answer depends on what is currently assigned and it hands out guards instead.

mod bounded;
mod directory;
mod jump;
mod maglev;
mod range;
mod rendezvous;
mod ring;
mod slots;

use std::fmt;

pub use bounded::{BoundedLoadRouter, LoadGuard};
pub use directory::Directory;
pub use jump::{JumpRouter, jump_hash};
pub use maglev::MaglevRouter;
pub use range::{RangeRouter, RangeRouterBuilder};
pub use rendezvous::RendezvousRouter;
pub use ring::RingRouter;
pub use slots::{CLUSTER_SLOTS, SlotRouter, SlotRouterBuilder, cluster_slot};

use crate::error::{ConfigError, ConfigErrorKind};
use crate::hash::ShardKey;

/// A logical shard. Many logical shards may live on one physical node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(transparent))]
pub struct ShardId(pub u32);

impl ShardId {
    /// The id as an index into per-shard tables.
    #[inline]
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Maps key bytes to a shard, the same way everywhere.
///
/// Implementations are pure functions of their construction: no randomness, no process state.
pub trait Router: Send + Sync + fmt::Debug {
    /// The shard that owns `key`.
    fn route_bytes(&self, key: &[u8]) -> ShardId;

    /// Every shard this router can return, in increasing order.
    fn shards(&self) -> Vec<ShardId>;

    /// How the router divides the key space; [`ReshardPlan`](crate::ReshardPlan) uses it to
    /// list what moves in the router's own units.
    fn layout(&self) -> Layout<'_> {
        Layout::Hashed
    }

    /// The shard that owns `key`.
    #[inline]
    fn route<K: ShardKey + ?Sized>(&self, key: &K) -> ShardId
    where
        Self: Sized,
    {
        key.with_key_bytes(|bytes| self.route_bytes(bytes))
    }
}

/// How a router divides the key space.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum Layout<'a> {
    /// Keys are spread by hash; what moves is measured over a sample of keys.
    Hashed,
    /// Keys map to Redis Cluster slots; what moves is a set of slot ranges.
    Slots(&'a SlotRouter),
    /// Keys map to byte ranges; what moves is a set of key ranges.
    Ranges(&'a RangeRouter),
    /// Some keys are pinned to shards (sorted by key), the others routed by `base`; what
    /// moves is the pinned keys that change node, and what moves in the base's units.
    Pinned {
        /// The pinned keys and their shards, sorted by key.
        pins: &'a [(Box<[u8]>, ShardId)],
        /// The router of every other key.
        base: &'a dyn Router,
    },
}

impl<R: Router + ?Sized> Router for Box<R> {
    #[inline]
    fn route_bytes(&self, key: &[u8]) -> ShardId {
        (**self).route_bytes(key)
    }

    fn shards(&self) -> Vec<ShardId> {
        (**self).shards()
    }

    fn layout(&self) -> Layout<'_> {
        (**self).layout()
    }
}

impl<R: Router + ?Sized> Router for std::sync::Arc<R> {
    fn layout(&self) -> Layout<'_> {
        (**self).layout()
    }

    #[inline]
    fn route_bytes(&self, key: &[u8]) -> ShardId {
        (**self).route_bytes(key)
    }

    fn shards(&self) -> Vec<ShardId> {
        (**self).shards()
    }
}

/// One of the pure routers of this crate, chosen at runtime (for example from configuration).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum AnyRouter {
    /// Jump consistent hash.
    Jump(JumpRouter),
    /// Weighted rendezvous (highest random weight).
    Rendezvous(RendezvousRouter),
    /// Consistent hash ring with weighted virtual nodes.
    Ring(RingRouter),
    /// Maglev lookup table.
    Maglev(MaglevRouter),
    /// Key ranges.
    Range(RangeRouter),
    /// Redis Cluster hash slots.
    Slots(SlotRouter),
    /// Explicit overrides on top of another router.
    Directory(Box<Directory<AnyRouter>>),
}

impl Router for AnyRouter {
    #[inline]
    fn route_bytes(&self, key: &[u8]) -> ShardId {
        match self {
            Self::Jump(r) => r.route_bytes(key),
            Self::Rendezvous(r) => r.route_bytes(key),
            Self::Ring(r) => r.route_bytes(key),
            Self::Maglev(r) => r.route_bytes(key),
            Self::Range(r) => r.route_bytes(key),
            Self::Slots(r) => r.route_bytes(key),
            Self::Directory(r) => r.route_bytes(key),
        }
    }

    fn shards(&self) -> Vec<ShardId> {
        match self {
            Self::Jump(r) => r.shards(),
            Self::Rendezvous(r) => r.shards(),
            Self::Ring(r) => r.shards(),
            Self::Maglev(r) => r.shards(),
            Self::Range(r) => r.shards(),
            Self::Slots(r) => r.shards(),
            Self::Directory(r) => r.shards(),
        }
    }

    fn layout(&self) -> Layout<'_> {
        match self {
            Self::Range(r) => r.layout(),
            Self::Slots(r) => r.layout(),
            Self::Directory(r) => r.layout(),
            _ => Layout::Hashed,
        }
    }
}

macro_rules! any_router_from {
    ($($variant:ident($ty:ty)),*) => {$(
        impl From<$ty> for AnyRouter {
            fn from(router: $ty) -> Self {
                Self::$variant(router)
            }
        }
    )*};
}

any_router_from!(
    Jump(JumpRouter),
    Rendezvous(RendezvousRouter),
    Ring(RingRouter),
    Maglev(MaglevRouter),
    Range(RangeRouter),
    Slots(SlotRouter)
);

impl From<Directory<AnyRouter>> for AnyRouter {
    fn from(router: Directory<AnyRouter>) -> Self {
        Self::Directory(Box::new(router))
    }
}

/// Members of a weighted router: sorted by shard, no duplicates, positive finite weights.
pub(crate) fn validate_members(
    members: impl IntoIterator<Item = (ShardId, f64)>,
) -> Result<Vec<(ShardId, f64)>, ConfigError> {
    // Bounded before anything is built: a count typed wrong must not exhaust memory.
    let members = members.into_iter();
    let too_large = || {
        ConfigError::new(
            ConfigErrorKind::TooLarge,
            format_args!("more than {MAX_ENTRIES} shards"),
        )
    };
    if members.size_hint().0 as u64 > MAX_ENTRIES {
        return Err(too_large());
    }
    let mut members: Vec<(ShardId, f64)> = members.take(MAX_ENTRIES as usize + 1).collect();
    if members.len() as u64 > MAX_ENTRIES {
        return Err(too_large());
    }
    if members.is_empty() {
        return Err(ConfigError::new(ConfigErrorKind::Empty, "no shards"));
    }
    members.sort_by_key(|(shard, _)| *shard);
    for pair in members.windows(2) {
        if pair[0].0 == pair[1].0 {
            return Err(ConfigError::new(
                ConfigErrorKind::Duplicate,
                format_args!("shard {} listed twice", pair[0].0),
            ));
        }
    }
    if let Some((shard, weight)) = members.iter().find(|(_, w)| !(w.is_finite() && *w > 0.0)) {
        return Err(ConfigError::new(
            ConfigErrorKind::InvalidWeight,
            format_args!("shard {shard} has weight {weight}"),
        ));
    }
    Ok(members)
}

/// The most points a ring or entries a Maglev table may hold (64 MiB of table at most).
pub(crate) const MAX_ENTRIES: u64 = 1 << 24;

/// Shards `0..count` with weight 1.
pub(crate) fn uniform(count: u32) -> impl Iterator<Item = (ShardId, f64)> {
    (0..count).map(|i| (ShardId(i), 1.0))
}

/// The seed a member derives its hashes from: the hash of its id, big-endian.
#[inline]
pub(crate) fn member_seed(shard: ShardId) -> u64 {
    crate::hash::key_hash(&shard.0.to_be_bytes())
}
