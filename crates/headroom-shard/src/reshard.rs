//! Resharding: what moves between two topologies, and the routing of a live migration.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};

use headroom_core::metrics::{Counter, Gauge};
use headroom_core::{counter, gauge};
use tokio::sync::Notify;
use tracing::Instrument;

use crate::error::{MigrationError, MigrationErrorKind, UnknownShard};
use crate::hash::ShardKey;
use crate::metrics::{MIGRATION_PHASE, MIGRATION_PROGRESS, SHADOW_READS};
use crate::router::{CLUSTER_SLOTS, Layout};
use crate::{AnyRouter, ReadPolicy, Router, Session, ShardId, Target, Topology};

/// Keys sampled to measure hash-spread moves: 2^16, so a fraction is within ±0.5% (3σ).
pub const PLAN_SAMPLES: u32 = 1 << 16;

/// What moves when one topology replaces another, grouped by source and destination node.
///
/// Units follow how the routers divide keys:
///
/// - the same router in both topologies: logical [`Shards`](Units::Shards) that change
///   primary node (the usual resharding when many logical shards share few nodes);
/// - Redis Cluster slots on both sides: [`Slots`](Units::Slots) ranges, with exact fractions;
/// - ranges on both sides: [`KeyRanges`](Units::KeyRanges) (no fraction: it depends on the
///   key distribution);
/// - ranges on one side and a hash router on the other: [`KeyRanges`](Units::KeyRanges) of
///   the range side, one move per pair of nodes the keys of a range may go between (the keys
///   of those ranges that the other side places accordingly; no fraction);
/// - otherwise, keys spread by hash: fractions measured over [`PLAN_SAMPLES`] keys.
///
/// ```
/// use headroom_shard::{JumpRouter, ReshardPlan, Topology, Units};
///
/// let build = |epoch, second: &str| {
///     Topology::builder(JumpRouter::new(4).unwrap())
///         .epoch(epoch)
///         .node("a", ())
///         .node(second, ())
///         .shards(0..3, "a", &[])
///         .shards(3..4, second, &[])
///         .build()
/// };
/// let plan = ReshardPlan::between(&build(1, "b")?, &build(2, "c")?);
/// assert_eq!(plan.moves().len(), 1);
/// assert_eq!(plan.moves()[0].units(), &Units::Shards(vec![headroom_shard::ShardId(3)]));
/// assert!((plan.moved_fraction().unwrap() - 0.25).abs() < 0.01);
/// # Ok::<(), headroom_shard::ConfigError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ReshardPlan {
    from_epoch: u64,
    to_epoch: u64,
    moves: Vec<Move>,
    sampled: bool,
}

/// Keys moving from one node to another.
#[derive(Clone, Debug, PartialEq)]
pub struct Move {
    from: Arc<str>,
    to: Arc<str>,
    units: Units,
    fraction: Option<f64>,
}

impl Move {
    /// The node that owns the keys before the move.
    pub fn from(&self) -> &str {
        &self.from
    }

    /// The node that owns the keys after the move.
    pub fn to(&self) -> &str {
        &self.to
    }

    /// What moves.
    pub fn units(&self) -> &Units {
        &self.units
    }

    /// The fraction of all keys that moves, when the layout allows knowing it.
    pub fn fraction(&self) -> Option<f64> {
        self.fraction
    }
}

/// The units of a [`Move`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Units {
    /// Logical shards that change node.
    Shards(Vec<ShardId>),
    /// Redis Cluster slot ranges.
    Slots(Vec<Range<u16>>),
    /// Key ranges.
    KeyRanges(Vec<KeyRange>),
    /// Keys pinned to a shard (a [`Directory`](crate::Directory)'s overrides), sorted.
    Keys(Vec<Box<[u8]>>),
    /// Keys spread by hash; the fraction was measured over this many sample keys.
    Sampled(u32),
}

impl Units {
    /// How many units move (shards, slots, ranges; sampled moves count as one).
    pub fn count(&self) -> u64 {
        match self {
            Self::Shards(shards) => shards.len() as u64,
            Self::Slots(ranges) => ranges.iter().map(|r| u64::from(r.end - r.start)).sum(),
            Self::KeyRanges(ranges) => ranges.len() as u64,
            Self::Keys(keys) => keys.len() as u64,
            Self::Sampled(_) => 1,
        }
    }
}

/// Keys from `start` (inclusive) to `end` (exclusive; `None` is unbounded), in byte order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    /// The first key of the range.
    pub start: Box<[u8]>,
    /// The first key after the range, if any.
    pub end: Option<Box<[u8]>>,
}

type Pair = (Arc<str>, Arc<str>);

impl ReshardPlan {
    /// The plan for replacing `from` with `to`.
    pub fn between<H, R: Router + PartialEq>(from: &Topology<H, R>, to: &Topology<H, R>) -> Self {
        let mut sampled = false;
        let moves = if from.router() == to.router() {
            shard_moves(from, to)
        } else {
            let mut pins = Vec::new();
            let before = unpinned(from.router().layout(), &mut pins);
            let after = unpinned(to.router().layout(), &mut pins);
            let mut moves = match (before, after) {
                (Layout::Slots(a), Layout::Slots(b)) => {
                    slot_moves(from, to, |s| (a.slot_owner(s), b.slot_owner(s)))
                }
                (Layout::Ranges(a), Layout::Ranges(b)) => range_moves(from, to, a, b),
                // Samples would all fall in the first range: every range is listed instead,
                // for every node of the side that spreads keys by hash (slots too).
                (Layout::Ranges(ranges), Layout::Hashed | Layout::Slots(_)) => {
                    ranges_to_spread(from, to, ranges, true)
                }
                (Layout::Hashed | Layout::Slots(_), Layout::Ranges(ranges)) => {
                    ranges_to_spread(to, from, ranges, false)
                }
                _ => {
                    sampled = true;
                    sampled_moves(from, to)
                }
            };
            // No sample nor base unit says where a pinned key goes: list those that move.
            if !pins.is_empty() {
                moves.extend(pinned_moves(from, to, pins.into_iter()));
                moves.sort_by(|x, y| (&x.from, &x.to).cmp(&(&y.from, &y.to)));
            }
            moves
        };
        Self {
            from_epoch: from.epoch(),
            to_epoch: to.epoch(),
            moves,
            sampled,
        }
    }

    /// The epoch of the topology being replaced.
    pub fn from_epoch(&self) -> u64 {
        self.from_epoch
    }

    /// The epoch of the replacement.
    pub fn to_epoch(&self) -> u64 {
        self.to_epoch
    }

    /// The moves, ordered by source then destination node.
    pub fn moves(&self) -> &[Move] {
        &self.moves
    }

    /// The fraction of all keys that moves, when every move's fraction is known.
    pub fn moved_fraction(&self) -> Option<f64> {
        self.moves.iter().map(Move::fraction).sum()
    }

    /// The number of units to copy, for progress reporting.
    pub fn unit_count(&self) -> u64 {
        self.moves.iter().map(|m| m.units.count()).sum()
    }

    /// Whether the moves were measured over sample keys ([`Units::Sampled`], between routers
    /// that both spread keys by hash and share no unit). Such a plan may miss moves, a source
    /// node or all of them (empty though keys move): the copier then scans every node of the
    /// old topology. Every other plan lists each unit that changes node.
    pub fn is_sampled(&self) -> bool {
        self.sampled
    }
}

fn node_of<H, R: Router>(topology: &Topology<H, R>, shard: ShardId) -> Option<Arc<str>> {
    topology.primary(shard).ok().map(|node| node.id().into())
}

fn sample_shares<R: Router>(router: &R) -> BTreeMap<ShardId, u32> {
    let mut shares = BTreeMap::new();
    for i in 0..PLAN_SAMPLES {
        *shares
            .entry(router.route_bytes(&i.to_be_bytes()))
            .or_default() += 1;
    }
    shares
}

/// The moves between the ranges of `ranged` (the topology being replaced when `ranged_first`,
/// else the replacement) and `spread`, whose router spreads keys by hash: the keys of a range
/// on one node may go to, or come from, any node of `spread`, so each range is listed for
/// every such other node.
fn ranges_to_spread<H, R: Router>(
    ranged: &Topology<H, R>,
    spread: &Topology<H, R>,
    ranges: &crate::RangeRouter,
    ranged_first: bool,
) -> Vec<Move> {
    let mut spread_nodes: Vec<Arc<str>> = spread
        .router()
        .shards()
        .into_iter()
        .filter_map(|shard| node_of(spread, shard))
        .collect();
    spread_nodes.sort_unstable();
    spread_nodes.dedup();
    let bounds: Vec<(&[u8], ShardId)> = ranges.ranges().collect();
    let mut moves: BTreeMap<Pair, Vec<KeyRange>> = BTreeMap::new();
    for (i, &(lo, shard)) in bounds.iter().enumerate() {
        let Some(node) = node_of(ranged, shard) else {
            continue;
        };
        let hi = bounds.get(i + 1).map(|&(hi, _)| Box::<[u8]>::from(hi));
        for other in spread_nodes.iter().filter(|other| **other != node) {
            let pair = if ranged_first {
                (Arc::clone(&node), Arc::clone(other))
            } else {
                (Arc::clone(other), Arc::clone(&node))
            };
            push_range(moves.entry(pair).or_default(), lo, hi.clone());
        }
    }
    key_range_moves(moves)
}

/// Adds the keys from `start` to `end` to `ranges`, joining them to the last range when it
/// ends where they start.
fn push_range(ranges: &mut Vec<KeyRange>, start: &[u8], end: Option<Box<[u8]>>) {
    match ranges.last_mut() {
        Some(last) if last.end.as_deref() == Some(start) => last.end = end,
        _ => ranges.push(KeyRange {
            start: start.into(),
            end,
        }),
    }
}

fn key_range_moves(moves: BTreeMap<Pair, Vec<KeyRange>>) -> Vec<Move> {
    moves
        .into_iter()
        .map(|((from, to), ranges)| Move {
            from,
            to,
            units: Units::KeyRanges(ranges),
            fraction: None,
        })
        .collect()
}

fn shard_moves<H, R: Router>(from: &Topology<H, R>, to: &Topology<H, R>) -> Vec<Move> {
    // A directory's shares are its base router's (its pinned keys are a handful).
    let layout = unpinned(from.router().layout(), &mut Vec::new());
    let exact_slots = match layout {
        Layout::Slots(slots) => Some(slots),
        _ => None,
    };
    // A range's share of the keys depends on the keys: none is given.
    let ranged = matches!(layout, Layout::Ranges(_));
    let shares = sample_shares(from.router());
    let mut moves: BTreeMap<Pair, (Vec<ShardId>, f64)> = BTreeMap::new();
    for shard in from.router().shards() {
        let (Some(a), Some(b)) = (node_of(from, shard), node_of(to, shard)) else {
            continue;
        };
        if a != b {
            let share = match exact_slots {
                Some(slots) => {
                    let owned = (0..CLUSTER_SLOTS).filter(|&s| slots.slot_owner(s) == shard);
                    owned.count() as f64 / f64::from(CLUSTER_SLOTS)
                }
                None => {
                    f64::from(shares.get(&shard).copied().unwrap_or(0)) / f64::from(PLAN_SAMPLES)
                }
            };
            let entry = moves.entry((a, b)).or_default();
            entry.0.push(shard);
            entry.1 += share;
        }
    }
    moves
        .into_iter()
        .map(|((from, to), (shards, fraction))| Move {
            from,
            to,
            units: Units::Shards(shards),
            fraction: (!ranged).then_some(fraction),
        })
        .collect()
}

fn slot_moves<H, R: Router>(
    from: &Topology<H, R>,
    to: &Topology<H, R>,
    owners: impl Fn(u16) -> (ShardId, ShardId),
) -> Vec<Move> {
    let mut moves: BTreeMap<Pair, Vec<Range<u16>>> = BTreeMap::new();
    for slot in 0..CLUSTER_SLOTS {
        let (a, b) = owners(slot);
        let (Some(a), Some(b)) = (node_of(from, a), node_of(to, b)) else {
            continue;
        };
        if a != b {
            let ranges = moves.entry((a, b)).or_default();
            match ranges.last_mut() {
                Some(last) if last.end == slot => last.end = slot + 1,
                _ => ranges.push(slot..slot + 1),
            }
        }
    }
    moves
        .into_iter()
        .map(|((from, to), ranges)| {
            let slots: u32 = ranges.iter().map(|r| u32::from(r.end - r.start)).sum();
            Move {
                from,
                to,
                fraction: Some(f64::from(slots) / f64::from(CLUSTER_SLOTS)),
                units: Units::Slots(ranges),
            }
        })
        .collect()
}

fn range_moves<H, R: Router>(
    from: &Topology<H, R>,
    to: &Topology<H, R>,
    a: &crate::RangeRouter,
    b: &crate::RangeRouter,
) -> Vec<Move> {
    let mut bounds: Vec<&[u8]> = a.ranges().chain(b.ranges()).map(|(lo, _)| lo).collect();
    bounds.sort_unstable();
    bounds.dedup();
    let mut moves: BTreeMap<Pair, Vec<KeyRange>> = BTreeMap::new();
    for (i, lo) in bounds.iter().enumerate() {
        let hi = bounds.get(i + 1).map(|hi| Box::<[u8]>::from(*hi));
        let (Some(x), Some(y)) = (
            node_of(from, a.route_bytes(lo)),
            node_of(to, b.route_bytes(lo)),
        ) else {
            continue;
        };
        if x != y {
            push_range(moves.entry((x, y)).or_default(), lo, hi);
        }
    }
    key_range_moves(moves)
}

/// The keys a layout pins to shards.
/// The layout of the router under any directories, whose pinned keys go to `pins`.
fn unpinned<'a>(mut layout: Layout<'a>, pins: &mut Vec<&'a [u8]>) -> Layout<'a> {
    while let Layout::Pinned { pins: pinned, base } = layout {
        pins.extend(pinned.iter().map(|(key, _)| key.as_ref()));
        layout = base.layout();
    }
    layout
}

fn pinned_moves<'k, H, R: Router>(
    from: &Topology<H, R>,
    to: &Topology<H, R>,
    keys: impl Iterator<Item = &'k [u8]>,
) -> Vec<Move> {
    let mut moves: BTreeMap<Pair, Vec<Box<[u8]>>> = BTreeMap::new();
    for key in keys {
        let (Some(a), Some(b)) = (
            node_of(from, from.router().route_bytes(key)),
            node_of(to, to.router().route_bytes(key)),
        ) else {
            continue;
        };
        if a != b {
            moves.entry((a, b)).or_default().push(key.into());
        }
    }
    moves
        .into_iter()
        .map(|((from, to), mut keys)| {
            keys.sort_unstable();
            keys.dedup();
            Move {
                from,
                to,
                units: Units::Keys(keys),
                fraction: None,
            }
        })
        .collect()
}

/// Routes a read on `shard` of `topology`, behind none of `session`'s writes.
fn read_on<'t, H, R: Router>(
    topology: &'t Topology<H, R>,
    shard: ShardId,
    policy: &ReadPolicy,
    session: Option<&Session>,
) -> Result<Target<'t, H>, UnknownShard> {
    let required = match session {
        Some(session) => session.required(shard, topology.primary(shard)?.id()),
        None => None,
    };
    topology.read_shard(shard, policy, required)
}

fn sampled_moves<H, R: Router>(from: &Topology<H, R>, to: &Topology<H, R>) -> Vec<Move> {
    let mut moves: BTreeMap<Pair, u32> = BTreeMap::new();
    for i in 0..PLAN_SAMPLES {
        let key = i.to_be_bytes();
        let (Some(a), Some(b)) = (
            node_of(from, from.router().route_bytes(&key)),
            node_of(to, to.router().route_bytes(&key)),
        ) else {
            continue;
        };
        if a != b {
            *moves.entry((a, b)).or_default() += 1;
        }
    }
    moves
        .into_iter()
        .map(|((from, to), count)| Move {
            from,
            to,
            units: Units::Sampled(PLAN_SAMPLES),
            fraction: Some(f64::from(count) / f64::from(PLAN_SAMPLES)),
        })
        .collect()
}

/// The phases of a migration, in order.
///
/// | phase | writes to a moving key | reads of a moving key |
/// |---|---|---|
/// | `Copy` | old owner, mirrored to the new | old owner |
/// | `DualWrite` | old owner, mirrored to the new | old owner |
/// | `ShadowRead` | old owner, mirrored to the new | old owner, shadowed on the new |
/// | `CutOver` | new owner only | new owner |
/// | `Cleanup` | new owner only | new owner |
/// | `Done` | new owner only | new owner |
///
/// | `RolledBack` | old owner only | old owner |
///
/// Mirroring starts with `Copy` so nothing written while the backfill runs is missed; the
/// backfill must not overwrite what a mirrored write put on the new owner (copy if absent,
/// or compare versions). `DualWrite` begins once the copy is complete and lasts while the new
/// owners are watched under the write load; `ShadowRead` compares answers; `Cleanup` is the
/// time to delete moved data from the old owners. Any phase before `CutOver` may end in
/// `RolledBack` instead: the old owners never stopped receiving every write, so they are
/// complete, and the copies on the new owners can be dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// Backfill existing data while writes are mirrored.
    Copy = 0,
    /// Copy complete; writes still go to both owners.
    DualWrite = 1,
    /// Reads are also sent to the new owner and compared.
    ShadowRead = 2,
    /// The new owner is authoritative; the old one receives nothing.
    CutOver = 3,
    /// Moved data is being deleted from the old owners.
    Cleanup = 4,
    /// The migration is over; publish the new topology.
    Done = 5,
    /// The migration was abandoned before the cut-over; the old topology stays in force.
    RolledBack = 6,
}

impl Phase {
    /// The phase numbered `value` (its discriminant), if any.
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0 => Self::Copy,
            1 => Self::DualWrite,
            2 => Self::ShadowRead,
            3 => Self::CutOver,
            4 => Self::Cleanup,
            5 => Self::Done,
            6 => Self::RolledBack,
            _ => return None,
        })
    }

    /// The phase after this one; `None` after `Done` and `RolledBack`.
    pub fn next(self) -> Option<Self> {
        match self {
            Self::Done | Self::RolledBack => None,
            _ => Self::from_u8(self as u8 + 1),
        }
    }

    /// A short snake_case name: `copy`, `dual_write`, ..., `rolled_back`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Copy => "copy",
            Self::DualWrite => "dual_write",
            Self::ShadowRead => "shadow_read",
            Self::CutOver => "cut_over",
            Self::Cleanup => "cleanup",
            Self::Done => "done",
            Self::RolledBack => "rolled_back",
        }
    }

    /// Whether the new owners serve moving keys (from the cut-over on).
    pub fn new_owners_serve(self) -> bool {
        matches!(self, Self::CutOver | Self::Cleanup | Self::Done)
    }

    /// Whether writes to moving keys are mirrored to the new owners (before the cut-over).
    pub fn mirrors(self) -> bool {
        matches!(self, Self::Copy | Self::DualWrite | Self::ShadowRead)
    }

    fn load(cell: &AtomicU8) -> Self {
        Self::from_u8(cell.load(Ordering::SeqCst)).unwrap_or(Self::Copy)
    }
}

/// Runs a migration step inside a `migration.advance` span whose `outcome` is the phase
/// reached or the refusal's kind.
pub(crate) async fn traced_step(
    name: &str,
    step: impl Future<Output = Result<Phase, MigrationError>>,
) -> Result<Phase, MigrationError> {
    let span =
        tracing::debug_span!("migration.advance", name = %name, outcome = tracing::field::Empty);
    let result = step.instrument(span.clone()).await;
    let outcome = match &result {
        Ok(phase) => phase.as_str(),
        Err(error) => error.kind().as_str(),
    };
    span.record("outcome", outcome);
    result
}

/// Routes reads and writes while keys move from one topology to another.
///
/// Every request of the migrating service goes through the migration until it is
/// [`Done`](Phase::Done); then publish the target topology in the
/// [`TopologyHandle`](crate::TopologyHandle). Keys whose primary node is the same in both
/// topologies are routed as usual; moving keys follow the [`Phase`] table.
///
/// The cut-over is fenced: [`advance`](Self::advance) into `CutOver` switches routing and then
/// waits until every write routed to an old owner has finished (dropped its [`WriteRoute`]),
/// so once it returns no write is in flight to a retired owner and none can be routed there.
///
/// A `Migration` holds its phase in memory and its guarantees cover the routes it makes, in
/// one process. For several processes, each wraps its own in a
/// [`SharedMigration`](crate::SharedMigration), which keeps the phase in a shared store and
/// extends the cut-over wait to every live process. Each route also carries the epoch it was
/// made under ([`WriteRoute::epoch`]); stamp both the owner's and the mirror's write with it
/// and let the data store refuse older epochs (an [`EpochFence`] in front of an owner, or a
/// compare on an epoch column; see the guide), so a process that stopped following the shared
/// phase cannot land a late write.
pub struct Migration<H, R = AnyRouter> {
    name: Arc<str>,
    from: Arc<Topology<H, R>>,
    to: Arc<Topology<H, R>>,
    plan: ReshardPlan,
    phase: AtomicU8,
    /// Writes routed to an old owner: the cut-over waits for them.
    old_writers: Writers,
    /// Writes routed with a mirror: a rollback waits for them.
    mirrored: Writers,
    copied: AtomicU64,
    to_copy: AtomicU64,
    /// Whether `report_copied` was called: a sampled plan's own count proves nothing.
    copy_reported: AtomicBool,
    metrics: MigrationMetrics,
}

struct MigrationMetrics {
    phase: Gauge,
    progress: Gauge,
    shadow_match: Counter,
    shadow_mismatch: Counter,
}

impl<H, R: fmt::Debug> fmt::Debug for Migration<H, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Migration")
            .field("phase", &Phase::load(&self.phase))
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

/// Where a write goes during a migration.
#[must_use = "the cut-over and a rollback wait for this write until the route is dropped"]
pub struct WriteRoute<'a, H> {
    owner: Target<'a, H>,
    mirror: Option<Target<'a, H>>,
    _old_writer: Option<Writer<'a>>,
    _mirrored: Option<Writer<'a>>,
}

/// Writes in flight of one kind, counted so that a phase change can wait for them to end.
#[derive(Default)]
struct Writers {
    count: AtomicUsize,
    none_left: Notify,
}

impl Writers {
    fn enter(&self) -> Writer<'_> {
        self.count.fetch_add(1, Ordering::SeqCst);
        Writer(self)
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until none is in flight.
    async fn none(&self) {
        loop {
            let notified = self.none_left.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One write counted in its [`Writers`] until dropped.
struct Writer<'a>(&'a Writers);

impl Drop for Writer<'_> {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.none_left.notify_waiters();
        }
    }
}

impl<'a, H> WriteRoute<'a, H> {
    /// The authoritative owner: write here first.
    pub fn owner(&self) -> &Target<'a, H> {
        &self.owner
    }

    /// The new owner that must also receive the write, while the key is moving.
    pub fn mirror(&self) -> Option<&Target<'a, H>> {
        self.mirror.as_ref()
    }

    /// The topology epoch the route was made under.
    pub fn epoch(&self) -> u64 {
        self.owner.epoch()
    }
}

impl<H> fmt::Debug for WriteRoute<'_, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteRoute")
            .field("owner", &self.owner)
            .field("mirror", &self.mirror)
            .finish()
    }
}

/// Where a read goes during a migration.
#[derive(Debug)]
pub struct ReadRoute<'a, H> {
    /// The node whose answer counts.
    pub target: Target<'a, H>,
    /// The new owner to read as well and compare, during [`Phase::ShadowRead`]; report the
    /// outcome with [`Migration::record_shadow`].
    pub shadow: Option<Target<'a, H>>,
}

impl<H, R: Router + PartialEq> Migration<H, R> {
    /// A migration from `from` to `to`, starting in [`Phase::Copy`]; `to` must have the
    /// greater epoch. `name` labels its metrics.
    ///
    /// A node of `to` that keeps its id takes over its live state in `from` (in-flight
    /// requests, and its replication status unless it now follows other primaries), as
    /// [`TopologyHandle::replace`](crate::TopologyHandle::replace) does: the status probed
    /// through the handle that holds `from` serves the reads `to` routes from the cut-over
    /// on. That needs `to` not shared yet (as `Arc::new(to)` is); otherwise report to it
    /// ([`to_topology`](Self::to_topology)) as well.
    pub fn new(
        name: &str,
        from: Arc<Topology<H, R>>,
        mut to: Arc<Topology<H, R>>,
    ) -> Result<Self, MigrationError> {
        if to.epoch() <= from.epoch() {
            return Err(MigrationError::new(
                MigrationErrorKind::StaleEpoch,
                from.epoch(),
            ));
        }
        if let Some(next) = Arc::get_mut(&mut to) {
            next.adopt_state(&from);
        }
        let plan = ReshardPlan::between(&from, &to);
        let shadow = |outcome: &'static str| counter!(SHADOW_READS, "migration" => name.to_owned(), "outcome" => outcome);
        let metrics = MigrationMetrics {
            phase: gauge!(MIGRATION_PHASE, "migration" => name.to_owned()),
            progress: gauge!(MIGRATION_PROGRESS, "migration" => name.to_owned()),
            shadow_match: shadow("match"),
            shadow_mismatch: shadow("mismatch"),
        };
        metrics.phase.set(f64::from(Phase::Copy as u8));
        metrics.progress.set(0.0);
        Ok(Self {
            name: Arc::from(name),
            to_copy: AtomicU64::new(plan.unit_count()),
            from,
            to,
            plan,
            phase: AtomicU8::new(Phase::Copy as u8),
            old_writers: Writers::default(),
            mirrored: Writers::default(),
            copied: AtomicU64::new(0),
            copy_reported: AtomicBool::new(false),
            metrics,
        })
    }
}

impl<H, R: Router> Migration<H, R> {
    /// The name given at build time (the `migration` label of its metrics).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What moves.
    pub fn plan(&self) -> &ReshardPlan {
        &self.plan
    }

    /// The topology being replaced.
    pub fn from_topology(&self) -> &Arc<Topology<H, R>> {
        &self.from
    }

    /// The replacement topology.
    pub fn to_topology(&self) -> &Arc<Topology<H, R>> {
        &self.to
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        Phase::load(&self.phase)
    }

    /// Reports backfill progress: `copied` of `total` units (by default the plan's
    /// [`unit_count`](ReshardPlan::unit_count); any unit the copier counts in works).
    ///
    /// A [sampled](ReshardPlan::is_sampled) plan may miss moves, so its copy is complete only
    /// once reported so, even when the plan is empty: once the scan of every old node is
    /// over, report the copier's own count (`n` of `n`, or `0` of `0` if nothing moved).
    pub fn report_copied(&self, copied: u64, total: u64) {
        self.to_copy.store(total, Ordering::Release);
        self.copied.store(copied.min(total), Ordering::Release);
        self.copy_reported.store(true, Ordering::Release);
        self.metrics.progress.set(self.progress());
    }

    /// The fraction of the backfill done, 0 to 1: 1 for a plan with nothing to copy, but 0
    /// for a sampled plan until a report (see [`report_copied`](Self::report_copied)).
    pub fn progress(&self) -> f64 {
        let total = self.to_copy.load(Ordering::Acquire);
        if total == 0 {
            // An empty sampled plan does not show that nothing moves.
            let known = !self.plan.is_sampled() || self.copy_reported.load(Ordering::Acquire);
            return if known { 1.0 } else { 0.0 };
        }
        self.copied.load(Ordering::Acquire) as f64 / total as f64
    }

    /// Counts one shadow-read comparison.
    pub fn record_shadow(&self, matched: bool) {
        if matched {
            self.metrics.shadow_match.increment(1);
        } else {
            self.metrics.shadow_mismatch.increment(1);
            tracing::warn!(to_epoch = self.to.epoch(), "shadow read mismatch");
        }
    }

    /// Routes a write of `key`.
    pub fn write<K: ShardKey + ?Sized>(&self, key: &K) -> Result<WriteRoute<'_, H>, UnknownShard> {
        let (old_shard, new_shard) = key.with_key_bytes(|bytes| {
            (
                self.from.router().route_bytes(bytes),
                self.to.router().route_bytes(bytes),
            )
        });
        loop {
            let phase = self.phase();
            if phase.new_owners_serve() {
                return Ok(WriteRoute {
                    owner: self.to.write_shard(new_shard)?,
                    mirror: None,
                    _old_writer: None,
                    _mirrored: None,
                });
            }
            // Announce the write to an old owner, as a mirrored one too, then read the phase
            // again: with both sides sequentially consistent, either this write sees the
            // cut-over (or the rollback) or the cut-over (or the rollback) sees this write and
            // waits for it.
            let old_writer = self.old_writers.enter();
            // No phase leads back to mirroring: a write that finds none is not counted.
            let mirrored = phase.mirrors().then(|| self.mirrored.enter());
            let phase = self.phase();
            if phase.new_owners_serve() {
                continue;
            }
            let owner = self.from.write_shard(old_shard)?;
            let mirror = self.to.primary_target(new_shard)?;
            let moving = phase.mirrors() && mirror.node_id() != owner.node_id();
            if moving {
                self.to.count_write(new_shard);
            }
            return Ok(WriteRoute {
                owner,
                mirror: moving.then_some(mirror),
                _old_writer: Some(old_writer),
                _mirrored: mirrored.filter(|_| moving),
            });
        }
    }

    /// Routes a read of `key` by `policy`.
    pub fn read<K: ShardKey + ?Sized>(
        &self,
        key: &K,
        policy: &ReadPolicy,
    ) -> Result<ReadRoute<'_, H>, UnknownShard> {
        self.read_with(key, policy, None)
    }

    /// Routes a read of `key` by `policy`, never to a replica behind `session`'s writes (see
    /// [`Topology::read_session`]); record the session's writes with the targets
    /// [`write`](Self::write) routes them to. After the cut-over, a moved key the session may
    /// have written before it is read from the new primary until the session has written
    /// there under the new topology (or recorded a mirror's write: record all or none).
    /// Before the cut-over here but after the copy, a moved key is read from its new primary
    /// when the session's last write of its new shard went there under the new topology
    /// (through a process already past the cut-over, or a recorded mirror).
    pub fn read_session<K: ShardKey + ?Sized>(
        &self,
        key: &K,
        policy: &ReadPolicy,
        session: &Session,
    ) -> Result<ReadRoute<'_, H>, UnknownShard> {
        self.read_with(key, policy, Some(session))
    }

    fn read_with<K: ShardKey + ?Sized>(
        &self,
        key: &K,
        policy: &ReadPolicy,
        session: Option<&Session>,
    ) -> Result<ReadRoute<'_, H>, UnknownShard> {
        let (old_shard, new_shard) = key.with_key_bytes(|bytes| {
            (
                self.from.router().route_bytes(bytes),
                self.to.router().route_bytes(bytes),
            )
        });
        let read = |topology, shard| read_on(topology, shard, policy, session);
        let phase = self.phase();
        if phase.new_owners_serve() {
            let (old_primary, new_primary) = (
                self.from.primary(old_shard)?.id(),
                self.to.primary(new_shard)?.id(),
            );
            let target = match session {
                // The session's writes of a moved key before the cut-over went to the old
                // primary, and to the new one only as mirrors whose positions it may not know.
                // Its writes on the new primary under the new topology are either such mirrors
                // (recorded) or came after the cut-over, so after every mirror; any earlier
                // position there (a key that stays) may be older than the mirror: until it has
                // written there under the new topology, it reads from the new primary.
                Some(session)
                    if new_primary != old_primary
                        && session.required(old_shard, old_primary).is_some() =>
                {
                    let since = session.required_since(new_shard, new_primary, self.to.epoch());
                    let policy = if since.is_some() {
                        policy
                    } else {
                        &ReadPolicy::Primary
                    };
                    self.to.read_shard(new_shard, policy, since)?
                }
                _ => read(&*self.to, new_shard)?,
            };
            return Ok(ReadRoute {
                target,
                shadow: None,
            });
        }
        // Once the copy is over (the new owner has every key, and every write through its
        // mirror), a session whose last write of the key's new shard went to the new owner
        // under the new topology may have written the key through a process already past the
        // cut-over, where the old owner never gets it: the key is read where it went (and,
        // in shadow reads, compared with the old owner), from the new primary, since the
        // mirrors of the session's writes through processes before the cut-over may have
        // landed there after that write.
        if let Some(session) = session
            && matches!(phase, Phase::DualWrite | Phase::ShadowRead)
        {
            let new_primary = self.to.primary(new_shard)?.id();
            if new_primary != self.from.primary(old_shard)?.id()
                && session.last_wrote_since(new_shard, new_primary, self.to.epoch())
            {
                let shadow = if phase == Phase::ShadowRead {
                    Some(read(&*self.from, old_shard)?)
                } else {
                    None
                };
                return Ok(ReadRoute {
                    target: self.to.read_shard(new_shard, &ReadPolicy::Primary, None)?,
                    shadow,
                });
            }
        }
        let target = read(&*self.from, old_shard)?;
        let shadow = if phase == Phase::ShadowRead
            && self.to.primary(new_shard)?.id() != self.from.primary(old_shard)?.id()
        {
            Some(read(&*self.to, new_shard)?)
        } else {
            None
        };
        Ok(ReadRoute { target, shadow })
    }

    /// Moves to the next phase and returns it.
    ///
    /// Leaving [`Phase::Copy`] requires the backfill to be reported complete
    /// ([`report_copied`](Self::report_copied)), unless the plan is exact and empty (nothing
    /// moves); a [sampled](ReshardPlan::is_sampled) plan always needs the report. Entering
    /// [`Phase::CutOver`] waits until every write routed to an old owner has finished; if this
    /// future is dropped during that wait the phase has still advanced (routing is already
    /// fenced), and [`drained`](Self::drained) waits again, as does the next `advance` before
    /// it moves on.
    pub async fn advance(&self) -> Result<Phase, MigrationError> {
        traced_step(&self.name, self.advance_untraced()).await
    }

    async fn advance_untraced(&self) -> Result<Phase, MigrationError> {
        let current = self.phase();
        if current == Phase::RolledBack {
            return Err(MigrationError::new(
                MigrationErrorKind::RolledBack,
                self.from.epoch(),
            ));
        }
        let next = current
            .next()
            .ok_or_else(|| MigrationError::new(MigrationErrorKind::Finished, self.to.epoch()))?;
        if current == Phase::Copy && self.progress() < 1.0 {
            return Err(MigrationError::new(
                MigrationErrorKind::CopyIncomplete,
                self.from.epoch(),
            ));
        }
        if current.new_owners_serve() {
            // A cut-over whose wait was dropped: its writes to old owners end before the next
            // step (the cleanup of old owners) begins.
            self.drained().await;
        }
        self.phase
            .compare_exchange(
                current as u8,
                next as u8,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .map_err(|_| MigrationError::new(MigrationErrorKind::StaleEpoch, self.from.epoch()))?;
        self.metrics.phase.set(f64::from(next as u8));
        tracing::info!(phase = ?next, to_epoch = self.to.epoch(), "migration advanced");
        if next == Phase::CutOver {
            self.drained().await;
        }
        Ok(next)
    }

    /// Abandons the migration before the cut-over: every route goes to the old owners again,
    /// without mirrors. Refused with [`MigrationErrorKind::RolledBack`] from the cut-over on.
    ///
    /// Returns once every write routed with a mirror has dropped its [`WriteRoute`], so that
    /// the copies on the new owners can be dropped then: a mirrored write landing afterwards
    /// would leave a stale copy. (Hold the route until the mirror's write has ended, timeouts
    /// included: a write abandoned by its caller may still land.) If this future is dropped during that wait, the
    /// migration is still rolled back, and the next call waits again.
    pub async fn rollback(&self) -> Result<(), MigrationError> {
        loop {
            let current = self.phase();
            if current == Phase::RolledBack {
                break;
            }
            if !current.mirrors() {
                return Err(MigrationError::new(
                    MigrationErrorKind::RolledBack,
                    self.to.epoch(),
                ));
            }
            if self.set_phase(current, Phase::RolledBack) {
                tracing::warn!(from = ?current, to_epoch = self.to.epoch(), "migration rolled back");
                break;
            }
        }
        self.mirrored.none().await;
        Ok(())
    }

    /// Takes on `phase` as decided elsewhere (by the process driving a shared migration).
    /// Phases only move forward (or to `RolledBack` before the cut-over); entering the
    /// cut-over waits, as [`advance`](Self::advance) does, for writes routed to old owners,
    /// and a rollback, as [`rollback`](Self::rollback) does, for mirrored writes. Returns the
    /// phase it waited for: the local phase then, which may be past `phase`.
    pub(crate) async fn follow(&self, phase: Phase) -> Phase {
        loop {
            let current = self.phase();
            let forward = phase != Phase::RolledBack && phase > current;
            let rollback = phase == Phase::RolledBack && current.mirrors();
            if !(forward || rollback) || self.set_phase(current, phase) {
                break;
            }
        }
        let local = self.phase();
        match local {
            phase if phase.new_owners_serve() => self.drained().await,
            Phase::RolledBack => self.mirrored.none().await,
            _ => {}
        }
        local
    }

    fn set_phase(&self, current: Phase, next: Phase) -> bool {
        let swapped = self
            .phase
            .compare_exchange(
                current as u8,
                next as u8,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok();
        if swapped {
            self.metrics.phase.set(f64::from(next as u8));
        }
        swapped
    }

    /// Waits until no write routed to an old owner is in flight.
    pub async fn drained(&self) {
        self.old_writers.none().await;
    }

    /// Writes routed to old owners and not finished yet.
    pub fn writes_to_old_owners(&self) -> usize {
        self.old_writers.count()
    }
}

/// Rejects writes routed under an epoch older than the owner accepts, in one process.
///
/// An owner served by this process (an embedded store, a proxy in front of a node) raises its
/// fence to the target epoch at cut-over; a write stamped with an older epoch is then refused
/// with [`MigrationErrorKind::Fenced`] and must be routed again. The fence is in memory: when
/// several processes write to one owner, keep the fence where the data lives instead (an epoch
/// column compared in the write's `WHERE`, or a fence key checked by a Lua script), as the
/// guide shows.
#[derive(Debug, Default)]
pub struct EpochFence {
    min_epoch: AtomicU64,
}

impl EpochFence {
    /// A fence admitting epochs from `epoch` on.
    pub fn new(epoch: u64) -> Self {
        Self {
            min_epoch: AtomicU64::new(epoch),
        }
    }

    /// Raises the fence to `epoch` (never lowers it).
    pub fn raise(&self, epoch: u64) {
        self.min_epoch.fetch_max(epoch, Ordering::AcqRel);
    }

    /// Admits a write routed under `epoch`, or refuses it.
    pub fn admit(&self, epoch: u64) -> Result<(), MigrationError> {
        let min = self.min_epoch.load(Ordering::Acquire);
        if epoch < min {
            return Err(MigrationError::new(MigrationErrorKind::Fenced, min));
        }
        Ok(())
    }
}
