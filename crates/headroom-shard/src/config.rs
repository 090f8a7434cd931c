//! Topology configuration, loadable with serde.

use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, ConfigErrorKind};
use crate::{
    AnyRouter, Directory, JumpRouter, MaglevRouter, RangeRouter, RendezvousRouter, RingRouter,
    ShardId, SlotRouter, Topology,
};

/// A topology as written in a configuration file.
///
/// ```
/// use headroom_shard::TopologyConfig;
///
/// let config: TopologyConfig = serde_json::from_str(r#"{
///     "name": "orders",
///     "epoch": 3,
///     "router": { "kind": "jump", "shards": 8 },
///     "nodes": [
///         { "id": "db-a", "address": "postgres://a" },
///         { "id": "db-b", "address": "postgres://b" }
///     ],
///     "shards": [
///         { "range": [0, 4], "primary": "db-a" },
///         { "range": [4, 8], "primary": "db-b" }
///     ]
/// }"#)?;
/// let topology = config.build(|node| Ok::<_, std::io::Error>(node.address.clone()))?;
/// assert_eq!(topology.epoch(), 3);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyConfig {
    /// The name used in metric labels.
    #[serde(default = "default_name")]
    pub name: String,
    /// The version; each published topology needs a greater one.
    pub epoch: u64,
    /// How keys map to logical shards.
    pub router: RouterConfig,
    /// The physical nodes.
    pub nodes: Vec<NodeConfig>,
    /// Where each logical shard lives.
    pub shards: Vec<PlacementConfig>,
    /// How long a replication report counts (default 10 s); see
    /// [`TopologyBuilder::status_ttl`](crate::TopologyBuilder::status_ttl).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub status_ttl: Option<std::time::Duration>,
    /// The most shards with their own metric label (default 1024); see
    /// [`TopologyBuilder::max_shard_labels`](crate::TopologyBuilder::max_shard_labels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_shard_labels: Option<u32>,
}

fn default_name() -> String {
    "default".to_owned()
}

/// A physical node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique id, referenced by placements.
    pub id: String,
    /// How to reach the node; interpreted by the function that builds handles.
    pub address: String,
}

/// The placement of one logical shard (`shard`) or a run of them (`range`, end exclusive).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementConfig {
    /// One logical shard.
    #[serde(default)]
    pub shard: Option<u32>,
    /// Logical shards `[start, end)`.
    #[serde(default)]
    pub range: Option<[u32; 2]>,
    /// The primary node's id.
    pub primary: String,
    /// The replica nodes' ids.
    #[serde(default)]
    pub replicas: Vec<String>,
}

/// The shards of a hashing router: a count (`0..n`, equal weights) or weighted members.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MembersConfig {
    /// Shards `0..n` with equal weights.
    Count(u32),
    /// Explicit shards with relative weights.
    Weighted(Vec<MemberConfig>),
}

/// A weighted member.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// The shard.
    pub shard: ShardId,
    /// Its relative weight (default 1).
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

fn default_vnodes() -> u32 {
    160
}

fn default_table_size() -> u32 {
    MaglevRouter::DEFAULT_TABLE_SIZE
}

/// A router, by kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum RouterConfig {
    /// [`JumpRouter`] over shards `0..shards`.
    Jump {
        /// The number of shards.
        shards: u32,
    },
    /// [`RendezvousRouter`].
    Rendezvous {
        /// The members.
        shards: MembersConfig,
    },
    /// [`RingRouter`].
    Ring {
        /// The members.
        shards: MembersConfig,
        /// Virtual nodes per unit of weight (default 160).
        #[serde(default = "default_vnodes")]
        vnodes: u32,
    },
    /// [`MaglevRouter`] (weights are not supported and must be 1).
    Maglev {
        /// The members.
        shards: MembersConfig,
        /// A prime table size (default 65537).
        #[serde(default = "default_table_size")]
        table_size: u32,
    },
    /// [`RangeRouter`].
    Range {
        /// The owner of the lowest range.
        first: ShardId,
        /// Split points, increasing: keys from `at` on belong to `shard`.
        #[serde(default)]
        splits: Vec<SplitConfig>,
    },
    /// [`SlotRouter::even`]: Redis Cluster slots in `shards` contiguous ranges.
    Slots {
        /// The number of shards.
        shards: u32,
    },
    /// [`SlotRouter::builder`]: explicit slot ranges.
    SlotRanges {
        /// Every slot must be covered.
        ranges: Vec<SlotRangeConfig>,
    },
    /// [`Directory`] overrides over a base router.
    Directory {
        /// The router for keys without an override.
        base: Box<RouterConfig>,
        /// The overrides.
        overrides: Vec<OverrideConfig>,
    },
}

/// A range split point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    /// The first key (UTF-8) of the range.
    pub at: String,
    /// The owner of the range.
    pub shard: ShardId,
}

/// Slots `[start, end)` of a Redis Cluster layout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotRangeConfig {
    /// The first slot.
    pub start: u16,
    /// One past the last slot.
    pub end: u16,
    /// The owner.
    pub shard: ShardId,
}

/// A directory override.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideConfig {
    /// The exact key (UTF-8).
    pub key: String,
    /// The shard it lives on.
    pub shard: ShardId,
}

impl MembersConfig {
    /// An iterator, not a list: the router bounds a count before building its members.
    fn members(&self) -> Box<dyn Iterator<Item = (ShardId, f64)> + '_> {
        match self {
            Self::Count(n) => Box::new((0..*n).map(|i| (ShardId(i), 1.0))),
            Self::Weighted(members) => Box::new(members.iter().map(|m| (m.shard, m.weight))),
        }
    }
}

impl RouterConfig {
    /// Builds the router.
    pub fn build(&self) -> Result<AnyRouter, ConfigError> {
        Ok(match self {
            Self::Jump { shards } => JumpRouter::new(*shards)?.into(),
            Self::Rendezvous { shards } => RendezvousRouter::weighted(shards.members())?.into(),
            Self::Ring { shards, vnodes } => {
                RingRouter::weighted(shards.members(), *vnodes)?.into()
            }
            Self::Maglev { shards, table_size } => {
                if let MembersConfig::Weighted(members) = shards
                    && let Some(member) = members.iter().find(|m| m.weight != 1.0)
                {
                    return Err(ConfigError::new(
                        ConfigErrorKind::InvalidWeight,
                        format_args!(
                            "Maglev has no weights; shard {} has {}",
                            member.shard, member.weight
                        ),
                    ));
                }
                MaglevRouter::with_members(shards.members().map(|(s, _)| s), *table_size)?.into()
            }
            Self::Range { first, splits } => splits
                .iter()
                .fold(RangeRouter::builder(*first), |builder, split| {
                    builder.split_at(&split.at, split.shard)
                })
                .build()?
                .into(),
            Self::Slots { shards } => SlotRouter::even(*shards)?.into(),
            Self::SlotRanges { ranges } => ranges
                .iter()
                .fold(SlotRouter::builder(), |builder, r| {
                    builder.assign(r.start..r.end, r.shard)
                })
                .build()?
                .into(),
            Self::Directory { base, overrides } => Directory::new(
                base.build()?,
                overrides.iter().map(|o| (o.key.as_bytes(), o.shard)),
            )?
            .into(),
        })
    }
}

impl TopologyConfig {
    /// Builds the topology, creating each node's handle with `connect`.
    pub fn build<H, E>(
        &self,
        mut connect: impl FnMut(&NodeConfig) -> Result<H, E>,
    ) -> Result<Topology<H>, ConfigError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    {
        let mut builder = Topology::builder(self.router.build()?)
            .name(self.name.as_str())
            .epoch(self.epoch);
        if let Some(ttl) = self.status_ttl {
            builder = builder.status_ttl(ttl);
        }
        if let Some(max) = self.max_shard_labels {
            builder = builder.max_shard_labels(max);
        }
        for node in &self.nodes {
            let handle = connect(node).map_err(|source| {
                ConfigError::new(ConfigErrorKind::Handle, format_args!("node {}", node.id))
                    .with_source(source)
            })?;
            builder = builder.node(node.id.as_str(), handle);
        }
        for placement in &self.shards {
            let replicas: Vec<&str> = placement.replicas.iter().map(String::as_str).collect();
            let primary = placement.primary.as_str();
            builder = match (placement.shard, placement.range) {
                (Some(shard), None) => builder.shard(ShardId(shard), primary, &replicas),
                (None, Some([start, end])) if start < end => {
                    builder.shards(start..end, primary, &replicas)
                }
                _ => {
                    return Err(ConfigError::new(
                        ConfigErrorKind::MissingShard,
                        format_args!(
                            "placement on {primary} needs either `shard` or a non-empty `range`"
                        ),
                    ));
                }
            };
        }
        builder.build()
    }
}
