//! The in-process state of one tier: a cell per key for each of its quotas, charged together.

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

/// A tier's cells in one process. One quota keeps the keyed limiter's lock-free cell; several
/// keep one small locked array per key, so that a request is charged to every quota or none.
#[derive(Debug)]
pub(crate) struct TierCells {
    quotas: Quotas,
    cells: Cells,
}

#[derive(Debug)]
enum Cells {
    One(KeyedLimiter<String>),
    Several {
        table: Table<String, Tats>,
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
        }
    }

    /// The quotas enforced.
    pub(crate) fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// Spends `cost` units of every quota of `key`, or none. The answer names the quota with
    /// the fewest units left (admitted) or the longest wait (refused).
    pub(crate) fn check(&self, key: &str, cost: u32) -> Result<Admitted, RateError> {
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
        let clock = match &self.cells {
            Cells::One(limiter) => return limiter.acquire_key_n(key, cost, max_wait).await,
            Cells::Several { time, .. } => time.clock(),
        };
        wait::acquire(clock, max_wait, || {
            std::future::ready(self.check(key, cost))
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
