use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::lease::{Begin, Fenced, FencingToken, LeaseStore};
use crate::{BackendError, BackendErrorKind, Clock, Key};

/// An in-memory [`LeaseStore`] for services that run one process.
///
/// Records live in a map behind one mutex per store (every step is a few map operations).
/// Memory is bounded: at [`max_records`](Self::with_limits) the store first drops
/// expired records, and if every record is still live it refuses new keys with
/// [`BackendErrorKind::Unavailable`] rather than forget a live record (which could let an
/// operation run twice).
#[derive(Clone, Debug)]
pub struct MemoryLeaseStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    records: Mutex<HashMap<Key, Record>>,
    next_token: AtomicU64,
    clock: Clock,
    max_records: usize,
}

#[derive(Debug)]
enum Record {
    InProgress {
        fingerprint: Bytes,
        token: FencingToken,
        lease_until: Instant,
    },
    Completed {
        fingerprint: Bytes,
        outcome: Bytes,
        expires_at: Instant,
    },
}

impl Record {
    /// Whether the record still means something at `now`: a live lease or a retained outcome.
    fn is_live(&self, now: Instant) -> bool {
        match self {
            Self::InProgress { lease_until, .. } => *lease_until > now,
            Self::Completed { expires_at, .. } => *expires_at > now,
        }
    }
}

impl MemoryLeaseStore {
    /// A store on the system clock holding up to 1,000,000 records.
    pub fn new() -> Self {
        Self::with_limits(Clock::system(), 1_000_000)
    }

    /// A store on `clock` holding up to `max_records` records.
    pub fn with_limits(clock: Clock, max_records: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                records: Mutex::new(HashMap::new()),
                next_token: AtomicU64::new(1),
                clock,
                max_records: max_records.max(1),
            }),
        }
    }

    /// The number of records held, expired ones not yet dropped included.
    pub fn len(&self) -> usize {
        self.inner.records.lock().len()
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `change` on the in-progress record of `key` if `token` holds it.
    fn with_holder(
        &self,
        key: &Key,
        token: FencingToken,
        change: impl FnOnce(&mut HashMap<Key, Record>, Instant, Bytes),
    ) -> Fenced {
        let now = self.inner.clock.now();
        let mut records = self.inner.records.lock();
        match records.get(key) {
            Some(Record::InProgress {
                token: current,
                fingerprint,
                ..
            }) if *current == token => {
                let fingerprint = fingerprint.clone();
                change(&mut records, now, fingerprint);
                Fenced::Applied
            }
            _ => Fenced::Rejected,
        }
    }
}

impl Default for MemoryLeaseStore {
    fn default() -> Self {
        Self::new()
    }
}

impl LeaseStore for MemoryLeaseStore {
    async fn begin(
        &self,
        key: &Key,
        fingerprint: &[u8],
        lease: Duration,
    ) -> Result<Begin, BackendError> {
        let now = self.inner.clock.now();
        let mut records = self.inner.records.lock();
        let took_over = match records.get(key) {
            Some(Record::Completed {
                fingerprint,
                outcome,
                expires_at,
            }) if *expires_at > now => {
                return Ok(Begin::Completed {
                    fingerprint: fingerprint.clone(),
                    outcome: outcome.clone(),
                });
            }
            Some(Record::InProgress {
                fingerprint,
                lease_until,
                ..
            }) => {
                if *lease_until > now {
                    return Ok(Begin::InProgress {
                        fingerprint: fingerprint.clone(),
                        lease_remaining: *lease_until - now,
                    });
                }
                true
            }
            Some(Record::Completed { .. }) => false,
            None => {
                if records.len() >= self.inner.max_records {
                    records.retain(|_, record| record.is_live(now));
                    if records.len() >= self.inner.max_records {
                        return Err(BackendError::with_detail(
                            BackendErrorKind::Unavailable,
                            format!(
                                "the lease store holds its maximum of {} live records",
                                self.inner.max_records
                            ),
                        ));
                    }
                }
                false
            }
        };
        let token = FencingToken(self.inner.next_token.fetch_add(1, Ordering::Relaxed));
        records.insert(
            key.clone(),
            Record::InProgress {
                fingerprint: Bytes::copy_from_slice(fingerprint),
                token,
                lease_until: now + lease,
            },
        );
        Ok(Begin::Acquired { token, took_over })
    }

    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        outcome: Bytes,
        retention: Duration,
    ) -> Result<Fenced, BackendError> {
        Ok(self.with_holder(key, token, |records, now, fingerprint| {
            let completed = Record::Completed {
                fingerprint,
                outcome,
                expires_at: now + retention,
            };
            records.insert(key.clone(), completed);
        }))
    }

    async fn extend(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Fenced, BackendError> {
        Ok(self.with_holder(key, token, |records, now, fingerprint| {
            let extended = Record::InProgress {
                fingerprint,
                token,
                lease_until: now + lease,
            };
            records.insert(key.clone(), extended);
        }))
    }

    async fn release(&self, key: &Key, token: FencingToken) -> Result<Fenced, BackendError> {
        Ok(self.with_holder(key, token, |records, _, _| {
            records.remove(key);
        }))
    }
}
