//! The in-process state of one tier: a cell per key for each of its quotas, charged together.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash, Hasher};
use std::time::Duration;

use headroom_core::{Clock, Stopwatch};
use parking_lot::Mutex;

use super::local::Gcra;
use super::table::{Cell, Table, default_shards};
use super::{Admitted, KeyedLimiter, Quotas, RateError, RateErrorKind, wait};

/// The theoretical arrival times of one key, one per quota, changed together under its lock.
type Tats = Mutex<[u64; Quotas::MAX]>;

impl Cell for Tats {
    fn fresh() -> Self {
        Mutex::new([0; Quotas::MAX])
    }

    fn full_at(&mut self) -> u64 {
        self.get_mut().iter().copied().max().unwrap_or(0)
    }
}

/// A key as a tier holds it, in a fixed 48 bytes: a short key's bytes, or a digest of a
/// longer one.
///
/// A tier's keys come from requests (often a raw header, before authentication), so their
/// length is the sender's. Held as given (as `governor` holds keys), 16 KiB tokens would make
/// every entry 16 KiB and the key cap no bound on bytes; refused over a length, as the
/// distributed limiter's store requires, they would fail callers whose key is merely long
/// (a JWT). A fixed size keeps a tier's bytes bounded by its key cap, and a key already held
/// is found without allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TierKey {
    /// The length of a short key, or [`DIGEST`](Self::DIGEST).
    len: u8,
    /// A short key's bytes, or the digest's 16, then zeros.
    bytes: [u8; TierKey::INLINE],
}

impl TierKey {
    /// The longest key held as it is: addresses, UUIDs, most ids and API tokens.
    const INLINE: usize = 47;
    const DIGEST: u8 = u8::MAX;
    const DIGEST_LEN: usize = 16;

    /// `key` as held, a longer key as a 128-bit digest keyed by `seed`: the SipHash values
    /// of `(key, 0u8)` and `(key, 1u8)`, sharing the one pass over the key. The seed is random,
    /// so a sender cannot search for two long keys that share a cell; any two do with
    /// probability 2^-128.
    pub(crate) fn new(key: &str, seed: &RandomState) -> Self {
        let mut bytes = [0; Self::INLINE];
        match u8::try_from(key.len()) {
            Ok(len) if usize::from(len) <= Self::INLINE => {
                bytes[..key.len()].copy_from_slice(key.as_bytes());
                Self { len, bytes }
            }
            _ => {
                let mut first = seed.build_hasher();
                key.hash(&mut first);
                let mut second = first.clone();
                first.write_u8(0);
                second.write_u8(1);
                bytes[..8].copy_from_slice(&first.finish().to_le_bytes());
                bytes[8..Self::DIGEST_LEN].copy_from_slice(&second.finish().to_le_bytes());
                Self {
                    len: Self::DIGEST,
                    bytes,
                }
            }
        }
    }

    fn as_bytes(&self) -> &[u8] {
        let len = match self.len {
            Self::DIGEST => Self::DIGEST_LEN,
            len => usize::from(len),
        };
        &self.bytes[..len]
    }
}

// The documented bytes per key rest on this: an entry is 56 bytes with one quota's cell, 120
// with several.
const _: () = assert!(size_of::<TierKey>() == 48);

/// Hashes the bytes in use only: a short key costs what the `str` itself would.
impl Hash for TierKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.as_bytes());
    }
}

/// A tier's cells in one process. One quota keeps the keyed limiter's lock-free cell; several
/// keep one small locked array per key, so that a request is charged to every quota or none.
#[derive(Debug)]
pub(crate) struct TierCells {
    quotas: Quotas,
    cells: Cells,
    /// The seed of long keys' digests.
    seed: RandomState,
}

#[derive(Debug)]
enum Cells {
    One(KeyedLimiter<TierKey>),
    Several {
        table: Table<TierKey, Tats>,
        gcras: Box<[Gcra]>,
        time: Stopwatch,
    },
}

impl TierCells {
    /// Cells for `quotas` holding at most `max_keys` keys, dropping keys that are full again
    /// every `idle_sweep`.
    pub(crate) fn new(
        quotas: &Quotas,
        clock: Clock,
        max_keys: usize,
        idle_sweep: Duration,
    ) -> Self {
        let cells = match quotas.as_slice() {
            [quota] => Cells::One(
                KeyedLimiter::builder(*quota)
                    .clock(clock)
                    .max_keys(max_keys)
                    .idle_sweep(idle_sweep)
                    .build(),
            ),
            several => Cells::Several {
                table: Table::new(max_keys, default_shards(), idle_sweep),
                gcras: several.iter().map(|quota| Gcra::new(*quota)).collect(),
                time: clock.stopwatch(),
            },
        };
        Self {
            quotas: quotas.clone(),
            cells,
            seed: RandomState::new(),
        }
    }

    /// The quotas enforced.
    pub(crate) fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// Spends `cost` units of every quota of `key`, or none. The answer names the quota with
    /// the fewest units left (admitted) or the longest wait (refused).
    pub(crate) fn check(&self, key: &str, cost: u32) -> Result<Admitted, RateError> {
        self.check_held(&TierKey::new(key, &self.seed), cost)
    }

    fn check_held(&self, key: &TierKey, cost: u32) -> Result<Admitted, RateError> {
        match &self.cells {
            Cells::One(limiter) => limiter.check_key_n(key, cost),
            Cells::Several { table, gcras, time } => {
                if cost > self.quotas.max_cost() {
                    return Err(RateError::new(RateErrorKind::CostTooHigh));
                }
                let now = time.elapsed_nanos();
                table
                    .apply(key, now, |tats| {
                        charge(gcras, &mut tats.lock()[..], now, cost)
                    })
                    .map_err(|(quota, wait)| gcras[quota].limited(wait).into())
            }
        }
    }

    /// Spends `cost` units as [`check`](Self::check) does, waiting for them if every quota
    /// will hold them within `max_wait`; refuses at once, with the longest wait, otherwise.
    pub(crate) async fn acquire(
        &self,
        key: &str,
        cost: u32,
        max_wait: Duration,
    ) -> Result<Admitted, RateError> {
        let key = TierKey::new(key, &self.seed);
        let clock = match &self.cells {
            Cells::One(limiter) => return limiter.acquire_key_n(&key, cost, max_wait).await,
            Cells::Several { time, .. } => time.clock(),
        };
        wait::acquire(clock, max_wait, || {
            std::future::ready(self.check_held(&key, cost))
        })
        .await
    }
}

/// Charges `cost` units to each cell of `tats` under its quota in `gcras`, if every one of
/// them admits it; otherwise charges none and names the quota with the longest wait.
fn charge(gcras: &[Gcra], tats: &mut [u64], now: u64, cost: u32) -> Result<Admitted, (usize, u64)> {
    let mut next = [0; Quotas::MAX];
    let mut refused: Option<(usize, u64)> = None;
    for (index, (gcra, &tat)) in gcras.iter().zip(tats.iter()).enumerate() {
        match gcra.next(tat, now, cost) {
            Ok(new_tat) => next[index] = new_tat,
            Err(wait) => {
                if refused.is_none_or(|(_, longest)| wait > longest) {
                    refused = Some((index, wait));
                }
            }
        }
    }
    if let Some(refused) = refused {
        return Err(refused);
    }
    let mut admitted: Option<Admitted> = None;
    for ((gcra, tat), new_tat) in gcras.iter().zip(tats.iter_mut()).zip(next) {
        *tat = new_tat;
        let this = gcra.admitted(new_tat, now);
        admitted = Some(match admitted {
            Some(binding) if binding.remaining <= this.remaining => Admitted {
                reset_after: binding.reset_after.max(this.reset_after),
                ..binding
            },
            Some(binding) => Admitted {
                reset_after: binding.reset_after.max(this.reset_after),
                ..this
            },
            None => this,
        });
    }
    // Never `None`: a tier holds at least one quota.
    admitted.ok_or((0, 0))
}
