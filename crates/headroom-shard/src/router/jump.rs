use crate::ShardId;
use crate::error::{ConfigError, ConfigErrorKind};
use crate::hash::key_hash;

use super::{MAX_ENTRIES, Router};

/// Jump consistent hash (Lamping and Veach, 2014) over shards `0..n`.
///
/// Perfect balance in expectation, no memory, and growing from `n` to `n + 1` shards moves
/// exactly the keys that land on the new shard (`1 / (n + 1)` of them). Shards can only be
/// added or removed at the end; to retire a shard in the middle, keep its id and move it to
/// another node in the [`Topology`](crate::Topology).
///
/// ```
/// use headroom_shard::{JumpRouter, Router, ShardId};
///
/// let router = JumpRouter::new(16)?;
/// assert_eq!(router.route("user:42"), router.route(b"user:42".as_slice()));
/// assert!(router.route("user:42") < ShardId(16));
/// # Ok::<(), headroom_shard::ConfigError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JumpRouter {
    shards: u32,
}

impl JumpRouter {
    /// A router over shards `0..shards`, at most 2^24.
    pub fn new(shards: u32) -> Result<Self, ConfigError> {
        if shards == 0 {
            return Err(ConfigError::new(ConfigErrorKind::Empty, "no shards"));
        }
        if u64::from(shards) > MAX_ENTRIES {
            return Err(ConfigError::new(
                ConfigErrorKind::TooLarge,
                format_args!("{shards} shards, more than {MAX_ENTRIES}"),
            ));
        }
        Ok(Self { shards })
    }

    /// The number of shards.
    pub fn shard_count(&self) -> u32 {
        self.shards
    }

    /// The shard of a precomputed key hash.
    #[inline]
    pub fn route_hash(&self, hash: u64) -> ShardId {
        ShardId(jump_hash(hash, self.shards))
    }
}

impl Router for JumpRouter {
    #[inline]
    fn route_bytes(&self, key: &[u8]) -> ShardId {
        self.route_hash(key_hash(key))
    }

    fn shards(&self) -> Vec<ShardId> {
        (0..self.shards).map(ShardId).collect()
    }
}

/// Jump consistent hash of `key` into `buckets` buckets (returns 0 when `buckets` is 0).
///
/// The algorithm of the paper: a 64-bit linear congruential generator decides, bucket count by
/// bucket count, whether the key jumps forward.
#[inline]
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let buckets = i64::from(buckets);
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < buckets {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b.max(0) as u32
}
