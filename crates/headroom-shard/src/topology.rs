//! Topologies: logical shards placed on physical nodes, each node holding a user handle.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use headroom_core::Clock;
use headroom_core::metrics::{Counter, Gauge};
use headroom_core::{counter, gauge};

use crate::error::{ConfigError, ConfigErrorKind, UnknownShard};
use crate::hash::ShardKey;
use crate::metrics::{LAG_REJECTIONS, READS, ROUTED, TOPOLOGY_EPOCH};
use crate::{AnyRouter, Router, ShardId};

/// The largest shard id a topology accepts; per-shard tables are indexed by id.
pub const MAX_SHARD_ID: u32 = (1 << 20) - 1;

const UNKNOWN: u64 = u64::MAX;

/// How long a replication report counts unless the builder says otherwise.
const DEFAULT_STATUS_TTL: Duration = Duration::from_secs(10);

/// How many shards get their own metric label unless the builder says otherwise.
const DEFAULT_MAX_SHARD_LABELS: u32 = 1024;

/// A physical node (a database primary or replica, a Redis node) and the handle to reach it.
pub struct Node<H> {
    id: Arc<str>,
    handle: H,
    pub(crate) state: Arc<NodeState>,
    pub(crate) metrics: NodeMetrics,
    clock: Clock,
    status_ttl: Duration,
}

impl<H> Node<H> {
    /// The node's id, unique within its topology.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The user-supplied handle (a connection pool, a client).
    pub fn handle(&self) -> &H {
        &self.handle
    }

    /// Requests currently routed to this node and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::Acquire)
    }

    /// The last replication status reported for this node, or unknown once it is older than
    /// the topology's [`status_ttl`](TopologyBuilder::status_ttl).
    pub fn status(&self) -> ReplicaStatus {
        self.status_at(self.clock.now())
    }

    /// The status as of `now`, read once per routing decision.
    pub(crate) fn status_at(&self, now: Instant) -> ReplicaStatus {
        self.state.status(now, self.status_ttl)
    }

    /// Records `status` as reported now.
    pub(crate) fn set_status(&self, status: ReplicaStatus) {
        self.state.set(status, self.clock.now());
    }

    /// A mark to pass to [`set_probed_status`](Self::set_probed_status) with the answer of a
    /// probe sent now.
    pub(crate) fn probe_mark(&self) -> u64 {
        self.state.forgotten.load(Ordering::Acquire)
    }

    /// Records `status`, a probe's answer, unless the node's status was forgotten since the
    /// probe was sent (`mark`): the answer then describes what the node followed before.
    pub(crate) fn set_probed_status(&self, mark: u64, status: ReplicaStatus) {
        self.set_status(status);
        // Checked after the write, so that a forget that came meanwhile is never undone.
        if self.probe_mark() != mark {
            self.state.reported_micros.store(UNKNOWN, Ordering::Release);
        }
    }
}

impl<H> fmt::Debug for Node<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id)
            .field("in_flight", &self.in_flight())
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

/// Live per-node state, carried from one topology to the next when a node keeps its id.
#[derive(Debug)]
pub(crate) struct NodeState {
    pub(crate) in_flight: AtomicUsize,
    lag_micros: AtomicU64,
    position: AtomicU64,
    /// When the status was reported, in microseconds after `base`; `UNKNOWN` before any report.
    reported_micros: AtomicU64,
    /// How many times the status was forgotten: a probe answer from before it is dropped.
    forgotten: AtomicU64,
    base: Instant,
}

impl NodeState {
    fn new(now: Instant) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            lag_micros: AtomicU64::new(UNKNOWN),
            position: AtomicU64::new(UNKNOWN),
            reported_micros: AtomicU64::new(UNKNOWN),
            forgotten: AtomicU64::new(0),
            base: now,
        }
    }

    fn micros_since_base(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.base).as_micros()).unwrap_or(UNKNOWN - 1)
    }

    fn status(&self, now: Instant, ttl: Duration) -> ReplicaStatus {
        let reported = self.reported_micros.load(Ordering::Acquire);
        let age = self.micros_since_base(now).saturating_sub(reported);
        if reported == UNKNOWN || u128::from(age) > ttl.as_micros() {
            return ReplicaStatus::default();
        }
        let known = |value: u64| (value != UNKNOWN).then_some(value);
        ReplicaStatus {
            lag: known(self.lag_micros.load(Ordering::Acquire)).map(Duration::from_micros),
            position: known(self.position.load(Ordering::Acquire)),
        }
    }

    /// Forgets the last report: the status reads as unknown until the next one, and a probe
    /// answer asked for before now is dropped (see [`Node::set_probed_status`]).
    fn forget_status(&self) {
        self.forgotten.fetch_add(1, Ordering::AcqRel);
        self.reported_micros.store(UNKNOWN, Ordering::Release);
    }

    fn set(&self, status: ReplicaStatus, now: Instant) {
        let micros = status.lag.map_or(UNKNOWN, |lag| {
            u64::try_from(lag.as_micros()).unwrap_or(UNKNOWN - 1)
        });
        self.lag_micros.store(micros, Ordering::Release);
        self.position.store(
            status.position.map_or(UNKNOWN, |p| p.min(UNKNOWN - 1)),
            Ordering::Release,
        );
        self.reported_micros
            .store(self.micros_since_base(now), Ordering::Release);
    }
}

pub(crate) struct NodeMetrics {
    pub(crate) primary_reads: Counter,
    pub(crate) replica_reads: Counter,
    pub(crate) lag_rejections: Counter,
}

/// How far a replica is behind its primary, as reported by a [`LagProbe`](crate::LagProbe).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// Replication delay; `None` when unknown (the replica is then never chosen by
    /// [`ReadPolicy::LagAware`](crate::ReadPolicy::LagAware)).
    pub lag: Option<Duration>,
    /// The replayed position (LSN, offset or timestamp, in the same units as the positions
    /// sessions record); `None` when unknown (the replica then never serves a session read
    /// that requires a position).
    pub position: Option<u64>,
}

/// A logical shard: its primary and replicas, as indexes into the topology's nodes.
#[derive(Debug)]
pub(crate) struct ShardEntry {
    pub(crate) primary: usize,
    pub(crate) replicas: Box<[usize]>,
    pub(crate) next_replica: AtomicUsize,
    routed_reads: Counter,
    routed_writes: Counter,
}

/// Logical shards placed on nodes, with the router that maps keys to shards.
///
/// A topology is immutable once built, apart from live node state (in-flight counts and
/// replication status). Publish a new one through a [`TopologyHandle`] to change it; its
/// [`epoch`](Self::epoch) must grow with each version.
///
/// ```
/// use headroom_shard::{JumpRouter, ReadPolicy, ShardId, Topology};
///
/// // 8 logical shards on two primaries, each with one replica.
/// let topology = Topology::builder(JumpRouter::new(8)?)
///     .name("orders")
///     .epoch(1)
///     .node("db-a", "postgres://a")
///     .node("db-a-replica", "postgres://a-replica")
///     .node("db-b", "postgres://b")
///     .node("db-b-replica", "postgres://b-replica")
///     .shards(0..4, "db-a", &["db-a-replica"])
///     .shards(4..8, "db-b", &["db-b-replica"])
///     .build()?;
///
/// let write = topology.write("order:1")?;
/// assert!(write.node_id() == "db-a" || write.node_id() == "db-b");
/// let read = topology.read("order:1", &ReadPolicy::RoundRobin)?;
/// assert!(read.node_id().ends_with("replica"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Topology<H, R = AnyRouter> {
    name: Arc<str>,
    epoch: u64,
    pub(crate) clock: Clock,
    router: R,
    pub(crate) nodes: Vec<Node<H>>,
    pub(crate) shards: Vec<Option<ShardEntry>>,
}

impl<H, R: fmt::Debug> fmt::Debug for Topology<H, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Topology")
            .field("name", &self.name)
            .field("epoch", &self.epoch)
            .field("router", &self.router)
            .field("nodes", &self.nodes)
            .finish_non_exhaustive()
    }
}

/// The role of the node a request was routed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The shard's primary.
    Primary,
    /// One of the shard's replicas.
    Replica,
}

/// Where a request goes: a node of a shard. Counts as in flight on the node until dropped.
#[must_use = "the node counts the request as in flight until the target is dropped"]
pub struct Target<'a, H> {
    node: &'a Node<H>,
    shard: ShardId,
    role: Role,
    epoch: u64,
}

impl<'a, H> Target<'a, H> {
    pub(crate) fn new(node: &'a Node<H>, shard: ShardId, role: Role, epoch: u64) -> Self {
        node.state.in_flight.fetch_add(1, Ordering::AcqRel);
        Self {
            node,
            shard,
            role,
            epoch,
        }
    }

    /// The handle of the chosen node.
    pub fn handle(&self) -> &'a H {
        &self.node.handle
    }

    /// The id of the chosen node.
    pub fn node_id(&self) -> &'a str {
        &self.node.id
    }

    /// The logical shard of the key.
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// Whether the node is the shard's primary or a replica.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The epoch of the topology that made the choice. To fence a write at the node, stamp
    /// it with this outside a migration; inside one, stamp the owner's write and the
    /// mirror's alike with [`WriteRoute::epoch`](crate::WriteRoute::epoch), the route's (a
    /// mirror's target is the new topology's, of a greater epoch).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

impl<H> Drop for Target<'_, H> {
    fn drop(&mut self) {
        self.node.state.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<H> fmt::Debug for Target<'_, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("node", &self.node.id)
            .field("shard", &self.shard)
            .field("role", &self.role)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl<H, R: Router> Topology<H, R> {
    /// Starts a topology routed by `router`.
    pub fn builder(router: R) -> TopologyBuilder<H, R> {
        TopologyBuilder {
            name: "default".into(),
            epoch: 0,
            clock: Clock::system(),
            status_ttl: DEFAULT_STATUS_TTL,
            max_shard_labels: DEFAULT_MAX_SHARD_LABELS,
            router,
            nodes: Vec::new(),
            shards: Vec::new(),
        }
    }

    /// The name used in metric labels.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version of this topology; a replacement must have a greater one.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The router mapping keys to logical shards.
    pub fn router(&self) -> &R {
        &self.router
    }

    /// The logical shard of `key`.
    #[inline]
    pub fn shard_of<K: ShardKey + ?Sized>(&self, key: &K) -> ShardId {
        key.with_key_bytes(|bytes| self.router.route_bytes(bytes))
    }

    /// The nodes, in the order they were added.
    pub fn nodes(&self) -> &[Node<H>] {
        &self.nodes
    }

    /// The node with id `id`.
    pub fn node(&self, id: &str) -> Option<&Node<H>> {
        self.nodes.iter().find(|node| *node.id == *id)
    }

    #[inline]
    pub(crate) fn entry(&self, shard: ShardId) -> Result<&ShardEntry, UnknownShard> {
        self.shards
            .get(shard.index())
            .and_then(Option::as_ref)
            .ok_or(UnknownShard(shard))
    }

    /// The primary node of `shard`.
    pub fn primary(&self, shard: ShardId) -> Result<&Node<H>, UnknownShard> {
        Ok(&self.nodes[self.entry(shard)?.primary])
    }

    /// The replica nodes of `shard`.
    pub fn replicas(
        &self,
        shard: ShardId,
    ) -> Result<impl Iterator<Item = &Node<H>> + '_, UnknownShard> {
        let entry = self.entry(shard)?;
        Ok(entry.replicas.iter().map(|&index| &self.nodes[index]))
    }

    /// Routes a write of `key` to its shard's primary.
    #[inline]
    pub fn write<K: ShardKey + ?Sized>(&self, key: &K) -> Result<Target<'_, H>, UnknownShard> {
        self.write_shard(self.shard_of(key))
    }

    /// Routes a write to `shard`'s primary.
    pub fn write_shard(&self, shard: ShardId) -> Result<Target<'_, H>, UnknownShard> {
        let entry = self.entry(shard)?;
        entry.routed_writes.increment(1);
        Ok(self.primary_of(entry, shard))
    }

    /// `shard`'s primary, as a write's target, not counted as routed (a migration asks for a
    /// key's new primary before it knows whether the write goes there).
    pub(crate) fn primary_target(&self, shard: ShardId) -> Result<Target<'_, H>, UnknownShard> {
        Ok(self.primary_of(self.entry(shard)?, shard))
    }

    fn primary_of(&self, entry: &ShardEntry, shard: ShardId) -> Target<'_, H> {
        Target::new(&self.nodes[entry.primary], shard, Role::Primary, self.epoch)
    }

    /// Counts a write routed to `shard` (a known one).
    pub(crate) fn count_write(&self, shard: ShardId) {
        if let Ok(entry) = self.entry(shard) {
            entry.routed_writes.increment(1);
        }
    }

    /// Reports the replication status of node `id`, dated now; returns whether the node exists.
    pub fn report(&self, id: &str, status: ReplicaStatus) -> bool {
        self.node(id).map(|node| node.set_status(status)).is_some()
    }

    pub(crate) fn count_read(&self, entry: &ShardEntry) {
        entry.routed_reads.increment(1);
    }

    /// Takes over live node state (in-flight counts, replication status) from `previous`
    /// for every node that keeps its id. A node that replicates other primaries than before
    /// (a failover) keeps its in-flight count but not its last report: its positions number
    /// another primary's stream.
    pub(crate) fn adopt_state<R2>(&mut self, previous: &Topology<H, R2>) {
        let olds: Vec<Option<usize>> = self
            .nodes
            .iter()
            .map(|node| previous.nodes.iter().position(|old| old.id == node.id))
            .collect();
        let moved: Vec<bool> = {
            let (now, before) = (self.upstreams(), previous.upstreams());
            olds.iter()
                .enumerate()
                .map(|(index, old)| old.is_some_and(|old| now[index] != before[old]))
                .collect()
        };
        for (index, node) in self.nodes.iter_mut().enumerate() {
            let Some(old) = olds[index] else { continue };
            let state = Arc::clone(&previous.nodes[old].state);
            if moved[index] {
                state.forget_status();
            }
            node.state = state;
        }
    }
}

impl<H, R> Topology<H, R> {
    /// For each node, the ids of the primaries it is a replica of, in order: one pass over
    /// the shards.
    fn upstreams(&self) -> Vec<Vec<&str>> {
        let mut primaries: Vec<Vec<usize>> = vec![Vec::new(); self.nodes.len()];
        for entry in self.shards.iter().flatten() {
            for &replica in &entry.replicas {
                // Shards placed together follow one primary: most repeats are consecutive.
                if primaries[replica].last() != Some(&entry.primary) {
                    primaries[replica].push(entry.primary);
                }
            }
        }
        primaries
            .into_iter()
            .map(|indices| {
                let mut ids: Vec<&str> = indices.iter().map(|&i| &*self.nodes[i].id).collect();
                ids.sort_unstable();
                ids.dedup();
                ids
            })
            .collect()
    }
}

/// Builds a [`Topology`].
#[must_use]
pub struct TopologyBuilder<H, R> {
    name: Arc<str>,
    epoch: u64,
    clock: Clock,
    status_ttl: Duration,
    max_shard_labels: u32,
    router: R,
    nodes: Vec<(Arc<str>, H)>,
    shards: Vec<Placement>,
}

/// Logical shards (as a range, checked at build time) placed on a primary with replicas.
struct Placement {
    shards: std::ops::Range<u64>,
    primary: Arc<str>,
    replicas: Vec<Arc<str>>,
}

impl<H, R: fmt::Debug> fmt::Debug for TopologyBuilder<H, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopologyBuilder")
            .field("name", &self.name)
            .field("epoch", &self.epoch)
            .field("router", &self.router)
            .finish_non_exhaustive()
    }
}

impl<H, R: Router> TopologyBuilder<H, R> {
    /// The name used in metric labels (default `default`).
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// The topology's version (default 0).
    pub fn epoch(mut self, epoch: u64) -> Self {
        self.epoch = epoch;
        self
    }

    /// The clock that dates replication reports and times probes (default: the system clock).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// How long a replication report counts (default 10 s): an older one reads as unknown, so
    /// a replica whose probe hangs or stopped is avoided instead of trusted on its last
    /// answer. Set it to a few probe intervals.
    pub fn status_ttl(mut self, ttl: Duration) -> Self {
        self.status_ttl = ttl;
        self
    }

    /// The most shards that get their own `shard` metric label (default 1024). A topology
    /// placing more records every shard under `shard="all"`, so its routed counters stay at two
    /// series instead of two per shard.
    pub fn max_shard_labels(mut self, max: u32) -> Self {
        self.max_shard_labels = max;
        self
    }

    /// Adds a physical node with the handle used to reach it.
    pub fn node(mut self, id: impl Into<Arc<str>>, handle: H) -> Self {
        self.nodes.push((id.into(), handle));
        self
    }

    /// Places logical shard `shard` on node `primary` with `replicas`.
    pub fn shard(self, shard: ShardId, primary: &str, replicas: &[&str]) -> Self {
        self.place(
            u64::from(shard.0)..u64::from(shard.0) + 1,
            primary,
            replicas,
        )
    }

    /// Places every logical shard in `shards` on node `primary` with `replicas`.
    pub fn shards(self, shards: std::ops::Range<u32>, primary: &str, replicas: &[&str]) -> Self {
        self.place(
            u64::from(shards.start)..u64::from(shards.end),
            primary,
            replicas,
        )
    }

    fn place(mut self, shards: std::ops::Range<u64>, primary: &str, replicas: &[&str]) -> Self {
        if !shards.is_empty() {
            let replicas = replicas.iter().map(|&id| id.into()).collect();
            self.shards.push(Placement {
                shards,
                primary: primary.into(),
                replicas,
            });
        }
        self
    }

    /// Checks that every node is unique, every placement names known nodes, none of them
    /// twice (a primary as its own replica, a replica listed twice:
    /// [`ConfigErrorKind::Duplicate`]), and every shard the router can return is placed, then
    /// builds the topology.
    pub fn build(self) -> Result<Topology<H, R>, ConfigError> {
        let Self {
            name,
            epoch,
            clock,
            status_ttl,
            max_shard_labels,
            router,
            nodes,
            shards: placements,
        } = self;
        if nodes.is_empty() {
            return Err(ConfigError::new(ConfigErrorKind::Empty, "no nodes"));
        }
        if status_ttl.is_zero() {
            return Err(ConfigError::new(
                ConfigErrorKind::InvalidValue,
                "status_ttl must be positive: no replication report would count",
            ));
        }
        let mut ids: Vec<&str> = nodes.iter().map(|(id, _)| &**id).collect();
        ids.sort_unstable();
        if let Some(pair) = ids.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(ConfigError::new(
                ConfigErrorKind::Duplicate,
                format_args!("node {} defined twice", pair[0]),
            ));
        }
        let index_of = |id: &str| {
            nodes
                .iter()
                .position(|(node, _)| **node == *id)
                .ok_or_else(|| {
                    ConfigError::new(ConfigErrorKind::UnknownNode, format_args!("node {id}"))
                })
        };
        // One routed-counter pair per shard, or one shared pair for a topology with more
        // shards than the label limit: metric series stay bounded whatever the shard count.
        let routed = |shard: &str| {
            let counter = |op: &'static str| counter!(ROUTED, "topology" => name.to_string(), "shard" => shard.to_string(), "op" => op);
            (counter("read"), counter("write"))
        };
        let placed: u64 = placements
            .iter()
            .map(|p| p.shards.end - p.shards.start)
            .sum();
        let shared_counters = (placed > u64::from(max_shard_labels)).then(|| routed("all"));
        let mut shards: Vec<Option<ShardEntry>> = Vec::new();
        for Placement {
            shards: range,
            primary,
            replicas,
        } in &placements
        {
            if range.end > u64::from(MAX_SHARD_ID) + 1 {
                return Err(ConfigError::new(
                    ConfigErrorKind::TooLarge,
                    format_args!("shard {} is above {MAX_SHARD_ID}", range.end - 1),
                ));
            }
            // A node twice in one placement would be read as a replica of itself, or take
            // two turns of every round among the replicas.
            if let Some(twice) = replicas
                .iter()
                .enumerate()
                .find(|&(i, id)| *id == *primary || replicas[..i].contains(id))
                .map(|(_, id)| id)
            {
                let role = if *twice == *primary {
                    "the primary and a replica"
                } else {
                    "a replica twice"
                };
                return Err(ConfigError::new(
                    ConfigErrorKind::Duplicate,
                    format_args!(
                        "node {twice} is {role} of shards {}..{}",
                        range.start, range.end
                    ),
                ));
            }
            let primary = index_of(primary)?;
            let replicas: Box<[usize]> = replicas
                .iter()
                .map(|id| index_of(id))
                .collect::<Result<_, _>>()?;
            if shards.len() < range.end as usize {
                shards.resize_with(range.end as usize, || None);
            }
            let start = range.start as usize;
            for (offset, slot) in shards[start..range.end as usize].iter_mut().enumerate() {
                let shard = ShardId((start + offset) as u32);
                if slot.is_some() {
                    return Err(ConfigError::new(
                        ConfigErrorKind::Duplicate,
                        format_args!("shard {shard} placed twice"),
                    ));
                }
                let (routed_reads, routed_writes) = match &shared_counters {
                    Some((reads, writes)) => (reads.clone(), writes.clone()),
                    None => routed(&shard.to_string()),
                };
                *slot = Some(ShardEntry {
                    primary,
                    replicas: replicas.clone(),
                    next_replica: AtomicUsize::new(0),
                    routed_reads,
                    routed_writes,
                });
            }
        }
        if let Some(missing) = router
            .shards()
            .into_iter()
            .find(|shard| shards.get(shard.index()).is_none_or(Option::is_none))
        {
            return Err(ConfigError::new(
                ConfigErrorKind::MissingShard,
                format_args!("the router returns shard {missing}, which is not placed"),
            ));
        }
        let now = clock.now();
        let nodes = nodes
            .into_iter()
            .map(|(id, handle)| {
                let label = |role: &'static str| {
                    counter!(READS, "topology" => name.to_string(), "node" => id.to_string(), "role" => role)
                };
                Node {
                    metrics: NodeMetrics {
                        primary_reads: label("primary"),
                        replica_reads: label("replica"),
                        lag_rejections: counter!(LAG_REJECTIONS, "topology" => name.to_string(), "node" => id.to_string()),
                    },
                    id,
                    handle,
                    state: Arc::new(NodeState::new(now)),
                    clock: clock.clone(),
                    status_ttl,
                }
            })
            .collect();
        Ok(Topology {
            name,
            epoch,
            clock,
            router,
            nodes,
            shards,
        })
    }
}

/// The current topology, replaceable at runtime; readers never block.
///
/// Readers [`load`](Self::load) a snapshot (lock-free, no allocation) and route against it;
/// [`replace`](Self::replace) publishes a new version atomically, refusing any version whose
/// epoch is not greater than the current one. Node state (in-flight counts, replication
/// status) carries over to the new version for nodes that keep their id.
///
/// ```
/// use headroom_shard::{JumpRouter, Topology, TopologyHandle};
///
/// let v1 = Topology::builder(JumpRouter::new(2)?).epoch(1).node("a", ()).shards(0..2, "a", &[]).build()?;
/// let handle = TopologyHandle::new(v1);
/// let v2 = Topology::builder(JumpRouter::new(2)?).epoch(2).node("b", ()).shards(0..2, "b", &[]).build()?;
/// handle.replace(v2)?;
/// assert_eq!(handle.load().write("k")?.node_id(), "b");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct TopologyHandle<H, R = AnyRouter> {
    current: ArcSwap<Topology<H, R>>,
    writer: Mutex<()>,
    /// The current epoch, labelled with the first topology's name.
    epoch: Gauge,
}

impl<H, R: fmt::Debug> fmt::Debug for TopologyHandle<H, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TopologyHandle")
            .field(&self.current.load())
            .finish()
    }
}

impl<H, R: Router> TopologyHandle<H, R> {
    /// A handle holding `topology`.
    pub fn new(topology: Topology<H, R>) -> Self {
        let epoch = gauge!(TOPOLOGY_EPOCH, "topology" => topology.name.to_string());
        epoch.set(topology.epoch as f64);
        Self {
            current: ArcSwap::from_pointee(topology),
            writer: Mutex::new(()),
            epoch,
        }
    }

    /// The current topology, for routing now (lock-free, no allocation).
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<Topology<H, R>>> {
        self.current.load()
    }

    /// The current topology, to keep across `.await` points.
    pub fn snapshot(&self) -> Arc<Topology<H, R>> {
        self.current.load_full()
    }

    /// Publishes `next` if its epoch is greater than the current one; returns the previous
    /// topology.
    pub fn replace(&self, mut next: Topology<H, R>) -> Result<Arc<Topology<H, R>>, ConfigError> {
        // Writers queue behind each other so the epoch check and the swap are one step;
        // readers never touch this lock.
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.current.load_full();
        if next.epoch <= current.epoch {
            return Err(ConfigError::new(
                ConfigErrorKind::StaleEpoch,
                format_args!("epoch {} after {}", next.epoch, current.epoch),
            ));
        }
        next.adopt_state(&current);
        tracing::info!(topology = %next.name, from = current.epoch, to = next.epoch, "topology replaced");
        self.epoch.set(next.epoch as f64);
        self.current.store(Arc::new(next));
        Ok(current)
    }
}
