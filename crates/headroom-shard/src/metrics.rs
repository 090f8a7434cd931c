//! Metric names. Every metric carries a `topology` (or `migration`) label with the name given
//! at build time. Handles are registered when a topology or migration is built, so recording on
//! the routing path neither allocates nor looks anything up; a recorder installed later still
//! gets them (see [`headroom_core::metrics`]).

/// Counter: requests routed to a shard. Labels: `topology`, `shard`, `op` (`read`, `write`).
pub const ROUTED: &str = "headroom_shard_routed_total";
/// Counter: reads served by a node. Labels: `topology`, `node`, `role` (`primary`, `replica`).
pub const READS: &str = "headroom_shard_reads_total";
/// Counter: replicas skipped because their lag exceeded the policy's bound or was unknown.
/// Labels: `topology`, `node`.
pub const LAG_REJECTIONS: &str = "headroom_shard_lag_rejections_total";
/// Gauge: the epoch of the topology in force. Labels: `topology`.
pub const TOPOLOGY_EPOCH: &str = "headroom_shard_topology_epoch";
/// Gauge: the phase of a migration (0 copy … 5 done, 6 rolled back). Labels: `migration`.
pub const MIGRATION_PHASE: &str = "headroom_shard_migration_phase";
/// Gauge: the fraction of moving units copied, 0 to 1. Labels: `migration`.
pub const MIGRATION_PROGRESS: &str = "headroom_shard_migration_progress_ratio";
/// Counter: shadow reads compared during a migration. Labels: `migration`, `outcome`
/// (`match`, `mismatch`).
pub const SHADOW_READS: &str = "headroom_shard_shadow_reads_total";
