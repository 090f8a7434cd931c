use crate::ShardId;
use crate::error::ConfigError;
use crate::hash::{key_hash, mix};

use super::{Router, member_seed, uniform, validate_members};

/// Weighted rendezvous hashing (highest random weight).
///
/// Each member scores the key as `-weight / ln(u)`, where `u` in `(0, 1)` comes from
/// [`mix`]`(key_hash(key), member_seed)`; the highest score wins. With equal weights this is
/// plain rendezvous. Removing a member moves only its keys; adding one moves `1 / (n + 1)` of
/// keys to it. [`top_k`](Self::top_k) ranks the next members for replica placement: the first
/// of the ranking is always [`route`](Router::route)'s answer. Lookup cost is O(n) per key.
///
/// ```
/// use headroom_shard::{RendezvousRouter, Router, ShardId};
///
/// let router = RendezvousRouter::weighted([(ShardId(0), 1.0), (ShardId(1), 2.0), (ShardId(7), 1.0)])?;
/// let mut replicas = [ShardId(0); 2];
/// assert_eq!(router.top_k(b"order:9", &mut replicas), 2);
/// assert_eq!(replicas[0], router.route("order:9"));
/// assert_ne!(replicas[0], replicas[1]);
/// # Ok::<(), headroom_shard::ConfigError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct RendezvousRouter {
    members: Vec<Member>,
    weighted: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Member {
    shard: ShardId,
    seed: u64,
    weight: f64,
}

impl RendezvousRouter {
    /// Equal weights over shards `0..shards`.
    pub fn new(shards: u32) -> Result<Self, ConfigError> {
        Self::weighted(uniform(shards))
    }

    /// Members with relative weights (positive and finite).
    pub fn weighted(
        members: impl IntoIterator<Item = (ShardId, f64)>,
    ) -> Result<Self, ConfigError> {
        let members = validate_members(members)?;
        let weighted = members.iter().any(|(_, w)| *w != members[0].1);
        let members = members
            .into_iter()
            .map(|(shard, weight)| Member {
                shard,
                seed: member_seed(shard),
                weight,
            })
            .collect();
        Ok(Self { members, weighted })
    }

    #[inline]
    fn score(&self, hash: u64, member: &Member) -> f64 {
        let h = mix(hash, member.seed);
        if !self.weighted {
            // -1/ln(u) increases with u, so the raw draw ranks the same way, exactly.
            return (h >> 11) as f64;
        }
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        -member.weight / u.ln()
    }

    /// The shard of a precomputed key hash.
    #[inline]
    pub fn route_hash(&self, hash: u64) -> ShardId {
        let mut best = self.members[0].shard;
        let mut best_score = f64::NEG_INFINITY;
        for member in &self.members {
            let score = self.score(hash, member);
            if score > best_score {
                best_score = score;
                best = member.shard;
            }
        }
        best
    }

    /// Fills `out` with the highest-ranked distinct shards for `key`, best first, and returns
    /// how many were written (`min(out.len(), members)`). Does not allocate.
    pub fn top_k(&self, key: &[u8], out: &mut [ShardId]) -> usize {
        let hash = key_hash(key);
        let k = out.len().min(self.members.len());
        if k == 0 {
            return 0;
        }
        let mut len = 0;
        for member in &self.members {
            let score = self.score(hash, member);
            if len == k && score <= self.score_of(hash, out[k - 1]) {
                continue;
            }
            // Insertion into the sorted prefix; ranks are recomputed rather than stored so
            // the caller's buffer is all the memory needed.
            let mut at = len.min(k - 1);
            while at > 0 && self.score_of(hash, out[at - 1]) < score {
                out[at] = out[at - 1];
                at -= 1;
            }
            out[at] = member.shard;
            len = (len + 1).min(k);
        }
        k
    }

    fn score_of(&self, hash: u64, shard: ShardId) -> f64 {
        let at = self
            .members
            .binary_search_by_key(&shard, |m| m.shard)
            .expect("ranked shards are members");
        self.score(hash, &self.members[at])
    }
}

impl Router for RendezvousRouter {
    #[inline]
    fn route_bytes(&self, key: &[u8]) -> ShardId {
        self.route_hash(key_hash(key))
    }

    fn shards(&self) -> Vec<ShardId> {
        self.members.iter().map(|m| m.shard).collect()
    }
}
