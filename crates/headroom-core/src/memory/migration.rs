use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::migration::{MigrationRecord, MigrationStore, Transition};
use crate::{BackendError, Clock, Key};

/// An in-memory [`MigrationStore`] for processes that share one address space (several
/// routers in one process, tests, the single-process default).
///
/// One record per migration, behind one mutex per store. Memory grows with the number of
/// migrations and participants, both chosen by the operator; expired acknowledgements are
/// dropped when counted.
#[derive(Clone, Debug)]
pub struct MemoryMigrationStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    entries: Mutex<HashMap<Key, Entry>>,
    clock: Clock,
}

#[derive(Debug)]
struct Entry {
    record: MigrationRecord,
    /// Participant id → (acknowledged phase, lease deadline).
    participants: HashMap<Box<str>, (u8, Instant)>,
}

impl MemoryMigrationStore {
    /// A store on the system clock.
    pub fn new() -> Self {
        Self::with_clock(Clock::system())
    }

    /// A store whose acknowledgement leases run on `clock`.
    pub fn with_clock(clock: Clock) -> Self {
        Self {
            inner: Arc::new(Inner {
                entries: Mutex::new(HashMap::new()),
                clock,
            }),
        }
    }
}

impl Default for MemoryMigrationStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MigrationStore for MemoryMigrationStore {
    async fn create(
        &self,
        key: &Key,
        record: MigrationRecord,
    ) -> Result<MigrationRecord, BackendError> {
        let mut entries = self.inner.entries.lock();
        let entry = entries.entry(key.clone()).or_insert_with(|| Entry {
            record,
            participants: HashMap::new(),
        });
        Ok(entry.record)
    }

    async fn load(&self, key: &Key) -> Result<Option<MigrationRecord>, BackendError> {
        Ok(self.inner.entries.lock().get(key).map(|entry| entry.record))
    }

    async fn transition(
        &self,
        key: &Key,
        expected: MigrationRecord,
        phase: u8,
    ) -> Result<Transition, BackendError> {
        let mut entries = self.inner.entries.lock();
        Ok(match entries.get_mut(key) {
            Some(entry) if entry.record == expected => {
                entry.record.phase = phase;
                Transition::Applied
            }
            other => Transition::Rejected(other.map(|entry| entry.record)),
        })
    }

    async fn acknowledge(
        &self,
        key: &Key,
        participant: &str,
        phase: u8,
        lease: Duration,
    ) -> Result<(), BackendError> {
        let deadline = super::after(self.inner.clock.now(), crate::lasting(lease)?);
        if let Some(entry) = self.inner.entries.lock().get_mut(key) {
            entry
                .participants
                .insert(participant.into(), (phase, deadline));
        }
        Ok(())
    }

    async fn lagging(&self, key: &Key, phase: u8) -> Result<u64, BackendError> {
        let now = self.inner.clock.now();
        let mut entries = self.inner.entries.lock();
        let Some(entry) = entries.get_mut(key) else {
            return Ok(0);
        };
        entry
            .participants
            .retain(|_, (_, deadline)| *deadline > now);
        Ok(entry
            .participants
            .values()
            .filter(|(acknowledged, _)| *acknowledged < phase)
            .count() as u64)
    }

    async fn remove(&self, key: &Key) -> Result<(), BackendError> {
        self.inner.entries.lock().remove(key);
        Ok(())
    }
}
