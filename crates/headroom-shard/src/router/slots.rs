use std::ops::Range;

use crate::ShardId;
use crate::error::{ConfigError, ConfigErrorKind};

use super::{Layout, Router};

pub use headroom_core::slot::{CLUSTER_SLOTS, cluster_slot};

/// Redis Cluster slots: keys map to one of 16384 slots, slots to shards.
///
/// Use it to route the way a Redis Cluster does, or as a general fixed-slot scheme where
/// resharding moves whole slots. Lookup is a CRC16 and one array read.
///
/// ```
/// use headroom_shard::{Router, ShardId, SlotRouter};
///
/// let router = SlotRouter::even(3)?;
/// assert_eq!(router.route("{user1}.following"), router.route("{user1}.followers"));
/// assert_eq!(router.slot_owner(0), ShardId(0));
/// assert_eq!(router.slot_owner(16383), ShardId(2));
/// # Ok::<(), headroom_shard::ConfigError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotRouter {
    owners: Vec<ShardId>,
}

impl SlotRouter {
    /// Slots split into `shards` contiguous ranges of nearly equal size, in order (the layout
    /// `redis-cli --cluster create` produces).
    pub fn even(shards: u32) -> Result<Self, ConfigError> {
        if shards == 0 {
            return Err(ConfigError::new(ConfigErrorKind::Empty, "0 shards"));
        }
        if shards > u32::from(CLUSTER_SLOTS) {
            return Err(ConfigError::new(
                ConfigErrorKind::TooLarge,
                format_args!("{shards} shards for {CLUSTER_SLOTS} slots"),
            ));
        }
        let slots = u64::from(CLUSTER_SLOTS);
        let owners = (0..slots)
            .map(|slot| ShardId((slot * u64::from(shards) / slots) as u32))
            .collect();
        Ok(Self { owners })
    }

    /// Starts a router where every slot must be assigned explicitly.
    pub fn builder() -> SlotRouterBuilder {
        SlotRouterBuilder {
            owners: vec![None; usize::from(CLUSTER_SLOTS)],
            error: None,
        }
    }

    /// The owner of `slot` (taken modulo 16384).
    #[inline]
    pub fn slot_owner(&self, slot: u16) -> ShardId {
        self.owners[usize::from(slot % CLUSTER_SLOTS)]
    }

    /// Contiguous slot ranges with their owners, in slot order.
    pub fn slot_ranges(&self) -> Vec<(Range<u16>, ShardId)> {
        let mut ranges: Vec<(Range<u16>, ShardId)> = Vec::new();
        for (slot, owner) in (0..CLUSTER_SLOTS).zip(&self.owners) {
            match ranges.last_mut() {
                Some((range, last)) if last == owner => range.end = slot + 1,
                _ => ranges.push((slot..slot + 1, *owner)),
            }
        }
        ranges
    }
}

impl Router for SlotRouter {
    #[inline]
    fn route_bytes(&self, key: &[u8]) -> ShardId {
        self.owners[usize::from(cluster_slot(key))]
    }

    fn layout(&self) -> Layout<'_> {
        Layout::Slots(self)
    }

    fn shards(&self) -> Vec<ShardId> {
        let mut shards = self.owners.clone();
        shards.sort_unstable();
        shards.dedup();
        shards
    }
}

/// Builds a [`SlotRouter`] from explicit slot ranges.
#[derive(Debug)]
#[must_use]
pub struct SlotRouterBuilder {
    owners: Vec<Option<ShardId>>,
    error: Option<ConfigError>,
}

impl SlotRouterBuilder {
    /// Assigns `slots` (a range within `0..16384`) to `shard`. A slot assigned twice makes
    /// [`build`](Self::build) fail with [`ConfigErrorKind::Duplicate`].
    pub fn assign(mut self, slots: Range<u16>, shard: ShardId) -> Self {
        if slots.start >= slots.end || slots.end > CLUSTER_SLOTS {
            self.error.get_or_insert(ConfigError::new(
                ConfigErrorKind::InvalidSlot,
                format_args!("slot range {slots:?}"),
            ));
            return self;
        }
        let range = usize::from(slots.start)..usize::from(slots.end);
        if let Some(taken) = self.owners[range.clone()].iter().position(Option::is_some) {
            let slot = range.start + taken;
            self.error.get_or_insert(ConfigError::new(
                ConfigErrorKind::Duplicate,
                format_args!("slot {slot} assigned twice"),
            ));
            return self;
        }
        for owner in &mut self.owners[range] {
            *owner = Some(shard);
        }
        self
    }

    /// Checks that every slot has an owner and builds the router.
    pub fn build(self) -> Result<SlotRouter, ConfigError> {
        if let Some(error) = self.error {
            return Err(error);
        }
        let owners = self
            .owners
            .iter()
            .enumerate()
            .map(|(slot, owner)| {
                owner.ok_or_else(|| {
                    ConfigError::new(
                        ConfigErrorKind::InvalidSlot,
                        format_args!("slot {slot} has no owner"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(SlotRouter { owners })
    }
}
