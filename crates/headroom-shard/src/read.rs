//! Replica routing: read policies, lag probes and read-your-writes sessions.

use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::future::{Either, join_all, select};

use crate::error::UnknownShard;
use crate::hash::{ShardKey, key_hash};
use crate::topology::{Node, ReplicaStatus, Role, ShardEntry, Target, Topology};
use crate::{Router, ShardId};

/// How reads choose among a shard's primary and replicas. Writes always go to the primary.
///
/// Every policy other than [`Primary`](Self::Primary) reads from replicas and falls back to the
/// primary when no replica qualifies (none configured, all too far behind, or none has caught
/// up with the session).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(tag = "policy", rename_all = "snake_case", from = "ReadPolicyFields")
)]
#[non_exhaustive]
pub enum ReadPolicy {
    /// Every read goes to the primary.
    #[default]
    Primary,
    /// Replicas in turn.
    RoundRobin,
    /// Power of two choices: two random replicas, the one with fewer reads in flight.
    LeastInFlight,
    /// Like [`LeastInFlight`](Self::LeastInFlight), among replicas whose reported lag is known
    /// and at most `max_lag`; others are skipped and counted as lag rejections.
    ///
    /// The lag is the one last reported: a replica whose replication stalls just after a report
    /// may be `max_lag` plus that report's age behind. With `monitor_lag` the age stays under
    /// its interval plus twice the probe's timeout (an answer at the start of a round counts
    /// while that round waits for its slowest probe, the interval passes, and the next
    /// round's probe answers or times out); a probe that fails makes the status unknown at
    /// once, and reports are never trusted past the topology's `status_ttl`.
    LagAware {
        /// The largest replication delay a read tolerates, as of the replica's last report.
        #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
        max_lag: Duration,
    },
}

/// [`ReadPolicy`] as loaded: serde lets a unit variant of a tagged enum take any field, so
/// each policy is a struct variant here, and a field it does not take is refused.
#[cfg(feature = "serde")]
#[derive(serde::Deserialize)]
#[serde(tag = "policy", rename_all = "snake_case", deny_unknown_fields)]
enum ReadPolicyFields {
    Primary {},
    RoundRobin {},
    LeastInFlight {},
    LagAware {
        #[serde(with = "humantime_serde")]
        max_lag: Duration,
    },
}

#[cfg(feature = "serde")]
impl From<ReadPolicyFields> for ReadPolicy {
    fn from(fields: ReadPolicyFields) -> Self {
        match fields {
            ReadPolicyFields::Primary {} => ReadPolicy::Primary,
            ReadPolicyFields::RoundRobin {} => ReadPolicy::RoundRobin,
            ReadPolicyFields::LeastInFlight {} => ReadPolicy::LeastInFlight,
            ReadPolicyFields::LagAware { max_lag } => ReadPolicy::LagAware { max_lag },
        }
    }
}

/// A read-your-writes session: the positions its writes reached, per primary.
///
/// Record the position (LSN, replication offset, commit timestamp: any number that grows
/// with each write on a shard's primary) after every write; reads through
/// [`Topology::read_session`] then only use a replica whose reported position has reached it,
/// and the primary otherwise. A position counts on the primary it was written on: once the
/// shard has another primary (a failover, a migration's cut-over), its replicas are numbered
/// by another stream, and the session reads from the primary until it writes there. Serialize
/// the session (with the `serde` feature) to carry it across requests, in a cookie or a
/// header; the form written is also read by the version before, which kept a position per
/// shard, so instances of both share sessions during a rolling deploy
/// (`a_session_written_now_is_read_in_the_per_shard_form`).
///
/// It holds one entry per shard written on (the primary it was last written through) and one
/// per primary (the furthest position reached there), so it stays as small as the set of
/// shards and nodes the session touched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(from = "SessionForm", into = "SessionForm"))]
pub struct Session {
    /// The primary each shard was last written through, sorted by shard.
    shards: Vec<ShardWritten>,
    /// How far the session reached on each primary, sorted by primary.
    primaries: Vec<Reached>,
}

/// The primary a shard was last written through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ShardWritten {
    shard: ShardId,
    /// The hash of the primary's node id: stable across processes, small in a cookie.
    /// `UNKNOWN_PRIMARY` for a position written before sessions named their primary.
    primary: u64,
}

/// The furthest position the session reached on one primary, through any shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
struct Reached {
    /// The hash of the primary's node id.
    primary: u64,
    position: u64,
    /// The greatest topology epoch a write recorded here was routed under: a migration's
    /// reads ask whether the session wrote here since the new topology took over.
    #[cfg_attr(feature = "serde", serde(default))]
    epoch: u64,
}

/// The primary of a position from a session serialized before sessions named their primary:
/// no node's hash, so the shard is read from its primary until the session writes there.
const UNKNOWN_PRIMARY: u64 = 0;

/// A session as written: a position per shard, as sessions kept them before they kept them
/// per primary (so that the versions before read it, during a rolling deploy), and how far it
/// reached on each primary, epochs included (which the versions before ignore).
#[cfg(feature = "serde")]
#[derive(serde::Serialize, serde::Deserialize)]
struct SessionForm {
    #[serde(default)]
    primaries: Vec<Reached>,
    #[serde(default)]
    positions: Vec<WrittenForm>,
}

/// A position per shard, as sessions kept them before.
#[cfg(feature = "serde")]
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum WrittenForm {
    Named {
        shard: ShardId,
        primary: u64,
        position: u64,
    },
    /// `[shard, position]`, before sessions named their primary.
    Unnamed(ShardId, u64),
}

#[cfg(feature = "serde")]
impl From<SessionForm> for Session {
    fn from(form: SessionForm) -> Self {
        let mut session = Self::default();
        for written in form.positions {
            // Epoch 0: no migration counts these writes as made under its new topology.
            let (shard, primary, position) = match written {
                WrittenForm::Named {
                    shard,
                    primary,
                    position,
                } => (shard, primary, position),
                WrittenForm::Unnamed(shard, position) => (shard, UNKNOWN_PRIMARY, position),
            };
            session.record(shard, primary, position, 0);
        }
        for Reached {
            primary,
            position,
            epoch,
        } in form.primaries
        {
            session.reach(primary, position, epoch);
        }
        session
    }
}

#[cfg(feature = "serde")]
impl From<Session> for SessionForm {
    fn from(session: Session) -> Self {
        let reached = |primary| {
            session
                .primaries
                .binary_search_by_key(&primary, |r: &Reached| r.primary)
                .map_or(0, |at| session.primaries[at].position)
        };
        Self {
            positions: session
                .shards
                .iter()
                .map(|&ShardWritten { shard, primary }| WrittenForm::Named {
                    shard,
                    primary,
                    position: reached(primary),
                })
                .collect(),
            primaries: session.primaries,
        }
    }
}

impl Session {
    /// A session that has written nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `write` (a write's target, on the shard's primary) reached `position`;
    /// positions on one primary never go backwards.
    pub fn record_write<H>(&mut self, write: &Target<'_, H>, position: u64) {
        let primary = key_hash(write.node_id().as_bytes());
        self.record(write.shard(), primary, position, write.epoch());
    }

    fn record(&mut self, shard: ShardId, primary: u64, position: u64, epoch: u64) {
        self.set_shard(shard, primary);
        // A position of no known primary numbers no stream: it only marks the shard.
        if primary != UNKNOWN_PRIMARY {
            self.reach(primary, position, epoch);
        }
    }

    fn set_shard(&mut self, shard: ShardId, primary: u64) {
        match self.shards.binary_search_by_key(&shard, |w| w.shard) {
            Ok(at) => self.shards[at].primary = primary,
            Err(at) => self.shards.insert(at, ShardWritten { shard, primary }),
        }
    }

    fn reach(&mut self, primary: u64, position: u64, epoch: u64) {
        match self.primaries.binary_search_by_key(&primary, |r| r.primary) {
            Ok(at) => {
                let reached = &mut self.primaries[at];
                reached.position = reached.position.max(position);
                reached.epoch = reached.epoch.max(epoch);
            }
            Err(at) => self.primaries.insert(
                at,
                Reached {
                    primary,
                    position,
                    epoch,
                },
            ),
        }
    }

    /// The position a replica of `shard` must have reached to serve this session while
    /// `primary` (a node id) is the shard's primary: `None` when the session wrote nothing
    /// on `primary`, `u64::MAX` (no replica) when it last wrote on `shard` through another
    /// primary. Otherwise the furthest position it reached on `primary` through any shard:
    /// positions number the primary's one replication stream, and a key may have moved
    /// between its shards (a router with more or fewer shards).
    pub fn required(&self, shard: ShardId, primary: &str) -> Option<u64> {
        self.required_since(shard, primary, 0)
    }

    /// Whether the session's last write of `shard` went to `primary`, and a write it
    /// recorded there was routed under `epoch` or later.
    pub(crate) fn last_wrote_since(&self, shard: ShardId, primary: &str, epoch: u64) -> bool {
        let primary = key_hash(primary.as_bytes());
        let last = self.shards.binary_search_by_key(&shard, |w| w.shard);
        last.is_ok_and(|at| self.shards[at].primary == primary)
            && self
                .primaries
                .binary_search_by_key(&primary, |r| r.primary)
                .is_ok_and(|at| self.primaries[at].epoch >= epoch)
    }

    /// Like [`required`](Self::required), but `None` unless a write the session recorded on
    /// `primary` was routed under `epoch` or later.
    pub(crate) fn required_since(&self, shard: ShardId, primary: &str, epoch: u64) -> Option<u64> {
        let primary = key_hash(primary.as_bytes());
        if let Ok(at) = self.shards.binary_search_by_key(&shard, |w| w.shard) {
            let written = self.shards[at].primary;
            if written == UNKNOWN_PRIMARY || written != primary {
                return Some(u64::MAX);
            }
        }
        let at = self
            .primaries
            .binary_search_by_key(&primary, |r| r.primary)
            .ok()?;
        let reached = self.primaries[at];
        (reached.epoch >= epoch).then_some(reached.position)
    }
}

impl<H, R: Router> Topology<H, R> {
    /// Routes a read of `key` by `policy`.
    #[inline]
    pub fn read<K: ShardKey + ?Sized>(
        &self,
        key: &K,
        policy: &ReadPolicy,
    ) -> Result<Target<'_, H>, UnknownShard> {
        self.read_shard(self.shard_of(key), policy, None)
    }

    /// Routes a read of `key` by `policy`, never to a replica behind `session`'s writes.
    #[inline]
    pub fn read_session<K: ShardKey + ?Sized>(
        &self,
        key: &K,
        policy: &ReadPolicy,
        session: &Session,
    ) -> Result<Target<'_, H>, UnknownShard> {
        let shard = self.shard_of(key);
        let required = session.required(shard, self.primary(shard)?.id());
        self.read_shard(shard, policy, required)
    }

    /// Routes a read on `shard` by `policy`; with `min_position`, only replicas that have
    /// reached it qualify.
    pub fn read_shard(
        &self,
        shard: ShardId,
        policy: &ReadPolicy,
        min_position: Option<u64>,
    ) -> Result<Target<'_, H>, UnknownShard> {
        let entry = self.entry(shard)?;
        self.count_read(entry);
        // Statuses are only read (and the clock only consulted) when a rule needs them.
        let needs_status = min_position.is_some() || matches!(policy, ReadPolicy::LagAware { .. });
        let rules = Rules {
            now: needs_status.then(|| self.clock.now()),
            min_position,
        };
        let chosen = match policy {
            ReadPolicy::Primary => None,
            ReadPolicy::RoundRobin => self.round_robin(entry, &rules),
            ReadPolicy::LeastInFlight => self.two_choices(entry, &rules, None),
            ReadPolicy::LagAware { max_lag } => self.two_choices(entry, &rules, Some(*max_lag)),
        };
        Ok(match chosen {
            Some(node) => {
                node.metrics.replica_reads.increment(1);
                Target::new(node, shard, Role::Replica, self.epoch())
            }
            None => {
                let node = &self.nodes[entry.primary];
                node.metrics.primary_reads.increment(1);
                Target::new(node, shard, Role::Primary, self.epoch())
            }
        })
    }

    fn replica(&self, entry: &ShardEntry, i: usize) -> &Node<H> {
        &self.nodes[entry.replicas[i]]
    }

    fn round_robin(&self, entry: &ShardEntry, rules: &Rules) -> Option<&Node<H>> {
        let count = entry.replicas.len();
        if count == 0 {
            return None;
        }
        let start = entry
            .next_replica
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (0..count)
            .map(|step| self.replica(entry, (start + step) % count))
            .find(|node| rules.caught_up(node))
    }

    fn two_choices(
        &self,
        entry: &ShardEntry,
        rules: &Rules,
        max_lag: Option<Duration>,
    ) -> Option<&Node<H>> {
        let qualifies = |node: &Node<H>| rules.caught_up(node) && rules.lag_within(node, max_lag);
        // Count, then pick the n-th qualifying replicas: no buffer, so no allocation.
        let mut count = 0;
        for &i in &entry.replicas {
            let node = &self.nodes[i];
            if qualifies(node) {
                count += 1;
            } else if max_lag.is_some() && rules.caught_up(node) {
                node.metrics.lag_rejections.increment(1);
            }
        }
        let nth = |n: usize| {
            entry
                .replicas
                .iter()
                .map(|&i| &self.nodes[i])
                .filter(|node| qualifies(node))
                .nth(n)
        };
        match count {
            0 => None,
            1 => nth(0),
            _ => {
                let first = fastrand::usize(..count);
                let second = (first + 1 + fastrand::usize(..count - 1)) % count;
                let (a, b) = (nth(first)?, nth(second)?);
                Some(if b.in_flight() < a.in_flight() { b } else { a })
            }
        }
    }

    /// Probes every node once with `probe`, all at once, and records the answers as they come.
    ///
    /// A node whose probe fails, or has not answered within `timeout` (on the topology's
    /// clock), gets an unknown status, so lag-aware and session reads avoid it; one hung node
    /// delays nobody else's report.
    pub async fn probe_nodes<P: LagProbe<H>>(&self, probe: &P, timeout: Duration) {
        join_all(self.nodes.iter().map(|node| async move {
            let mark = node.probe_mark();
            let answer = std::pin::pin!(probe.probe(node.id(), node.handle()));
            let deadline = std::pin::pin!(self.clock.sleep(timeout));
            let status = match select(answer, deadline).await {
                Either::Left((status, _)) => status,
                Either::Right(((), _)) => None,
            };
            node.set_probed_status(mark, status.unwrap_or_default());
        }))
        .await;
    }
}

/// What a replica must satisfy to serve one read.
struct Rules {
    /// The instant statuses are judged at; `None` when no rule needs a status.
    now: Option<Instant>,
    min_position: Option<u64>,
}

impl Rules {
    /// Whether `node` has replayed at least `min_position` (always, when none is needed).
    fn caught_up<H>(&self, node: &Node<H>) -> bool {
        match (self.min_position, self.now) {
            (Some(min), Some(now)) => node.status_at(now).position.is_some_and(|at| at >= min),
            _ => true,
        }
    }

    /// Whether `node`'s known lag is at most `max_lag` (always, when there is no bound).
    fn lag_within<H>(&self, node: &Node<H>, max_lag: Option<Duration>) -> bool {
        match (max_lag, self.now) {
            (Some(max), Some(now)) => node.status_at(now).lag.is_some_and(|lag| lag <= max),
            _ => true,
        }
    }
}

/// Asks a node how far behind its primary it is.
///
/// Implemented for closures `Fn(&str, &H) -> impl Future<Output = Option<ReplicaStatus>>`
/// taking the node id and handle; `None` means the probe failed.
pub trait LagProbe<H>: Send + Sync {
    /// Probes the node `id` through `handle`.
    fn probe(&self, id: &str, handle: &H) -> impl Future<Output = Option<ReplicaStatus>> + Send;
}

impl<H, F, Fut> LagProbe<H> for F
where
    F: Fn(&str, &H) -> Fut + Send + Sync,
    Fut: Future<Output = Option<ReplicaStatus>> + Send,
{
    fn probe(&self, id: &str, handle: &H) -> impl Future<Output = Option<ReplicaStatus>> + Send {
        self(id, handle)
    }
}

/// Probes the nodes of the current topology in rounds `interval` apart, forever, each probe
/// bounded by `timeout` (see [`Topology::probe_nodes`]); spawn it as a task and abort it (or
/// drop it) to stop. A round lasts until its slowest probe answers or times out, so a report
/// is at most `interval + 2 × timeout` old before the next replaces it. Each round probes the
/// topology in force when it starts, and waits on its clock.
pub async fn monitor_lag<H, R, P>(
    topology: &crate::TopologyHandle<H, R>,
    probe: &P,
    interval: Duration,
    timeout: Duration,
) where
    H: Send + Sync,
    R: Router,
    P: LagProbe<H>,
{
    loop {
        let current = topology.snapshot();
        current.probe_nodes(probe, timeout).await;
        current.clock.sleep(interval).await;
    }
}
