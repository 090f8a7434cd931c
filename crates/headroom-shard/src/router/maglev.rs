use crate::ShardId;
use crate::error::{ConfigError, ConfigErrorKind};
use crate::hash::{key_hash, mix};

use super::{MAX_ENTRIES, Router, member_seed, uniform, validate_members};

/// Maglev hashing (Eisenbud et al., 2016): a lookup table filled by per-member permutations.
///
/// Every member owns `⌊M / n⌋` or `⌈M / n⌉` of the `M` table entries, so balance is near perfect
/// (max/mean ≤ 1 + n / M). Lookup is one hash and one array read. Disruption on a membership
/// change is small but not minimal: besides the `1 / (n + 1)` of entries that must move, a few
/// percent more change owner. The table size must be a prime larger than the number of
/// members and at most 2^24; the paper suggests at least 100 × n. Maglev has no weights.
///
/// ```
/// use headroom_shard::{MaglevRouter, Router, ShardId};
///
/// let router = MaglevRouter::new(10, MaglevRouter::DEFAULT_TABLE_SIZE)?;
/// assert!(router.route("video:1") < ShardId(10));
/// # Ok::<(), headroom_shard::ConfigError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct MaglevRouter {
    table: Vec<ShardId>,
    shards: Vec<ShardId>,
}

impl MaglevRouter {
    /// The default table size: 65537, a prime that keeps balance within 1.01 up to 650 shards
    /// and within 1.02 at 1000.
    pub const DEFAULT_TABLE_SIZE: u32 = 65_537;

    /// Shards `0..shards` over a table of `table_size` entries.
    pub fn new(shards: u32, table_size: u32) -> Result<Self, ConfigError> {
        Self::with_members(uniform(shards).map(|(shard, _)| shard), table_size)
    }

    /// The given shards over a table of `table_size` entries.
    pub fn with_members(
        shards: impl IntoIterator<Item = ShardId>,
        table_size: u32,
    ) -> Result<Self, ConfigError> {
        let members = validate_members(shards.into_iter().map(|shard| (shard, 1.0)))?;
        let m = u64::from(table_size);
        if m > MAX_ENTRIES || !is_prime(m) || m <= members.len() as u64 {
            return Err(ConfigError::new(
                ConfigErrorKind::InvalidTableSize,
                format_args!(
                    "{table_size} is not a prime above {} and at most {MAX_ENTRIES}",
                    members.len()
                ),
            ));
        }
        // (offset, skip, next) per member, as in the paper's population algorithm.
        let mut perms: Vec<(u64, u64, u64)> = members
            .iter()
            .map(|(shard, _)| {
                let seed = member_seed(*shard);
                (mix(seed, 1) % m, mix(seed, 2) % (m - 1) + 1, 0)
            })
            .collect();
        const EMPTY: ShardId = ShardId(u32::MAX);
        let mut table = vec![EMPTY; m as usize];
        let mut filled = 0u64;
        'fill: loop {
            for (i, (offset, skip, next)) in perms.iter_mut().enumerate() {
                let mut entry = (*offset + *next * *skip) % m;
                while table[entry as usize] != EMPTY {
                    *next += 1;
                    entry = (*offset + *next * *skip) % m;
                }
                table[entry as usize] = members[i].0;
                *next += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        Ok(Self {
            table,
            shards: members.iter().map(|(shard, _)| *shard).collect(),
        })
    }

    /// The lookup table: entry `hash % len` owns the key.
    pub fn table(&self) -> &[ShardId] {
        &self.table
    }

    /// The shard of a precomputed key hash.
    #[inline]
    pub fn route_hash(&self, hash: u64) -> ShardId {
        self.table[(hash % self.table.len() as u64) as usize]
    }
}

impl Router for MaglevRouter {
    #[inline]
    fn route_bytes(&self, key: &[u8]) -> ShardId {
        self.route_hash(key_hash(key))
    }

    fn shards(&self) -> Vec<ShardId> {
        self.shards.clone()
    }
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}
