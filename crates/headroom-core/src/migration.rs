//! The migration store: the shared state of a live resharding, so several processes migrate
//! together (`headroom-shard` routes by it).

use std::fmt;
use std::future::Future;
use std::time::Duration;

use crate::{BackendError, Key};

/// The shared record of one migration: which topology epochs it moves between and its phase.
///
/// Phases are small numbers whose meaning belongs to the caller (`headroom-shard` numbers its
/// phases in order); the store only compares and replaces them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MigrationRecord {
    /// The epoch of the topology being replaced.
    pub from_epoch: u64,
    /// The epoch of the replacement.
    pub to_epoch: u64,
    /// The current phase.
    pub phase: u8,
}

/// The answer to [`MigrationStore::transition`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transition {
    /// The record was as expected and now has the new phase.
    Applied,
    /// The record differed from the expected one (another process moved it first, or it does
    /// not exist); nothing was changed. Carries the record as stored, if any.
    Rejected(Option<MigrationRecord>),
}

/// Keeps migration records and the phase each participating process has reached.
///
/// # Contract
///
/// - Every method is one atomic step (one round trip and one Lua script on one key on Redis).
/// - `create` stores `record` if the key has none and returns the stored record: the new one,
///   or the existing one unchanged (the first creator wins).
/// - `transition` replaces the phase only if the stored record equals `expected` (both epochs
///   and the phase): of several concurrent transitions from one record, exactly one applies.
/// - `acknowledge` records that `participant` has reached `phase`, valid for `lease` on the
///   store's clock (Redis server time); a participant acknowledges again to stay live.
/// - `lagging` counts participants with a live acknowledgement of a phase below `phase`;
///   participants whose lease expired are not counted (and may be forgotten).
/// - Records do not expire; `remove` deletes a record and its acknowledgements.
pub trait MigrationStore: Send + Sync + fmt::Debug + 'static {
    /// Creates the record of `key` unless one exists; returns the stored record.
    fn create(
        &self,
        key: &Key,
        record: MigrationRecord,
    ) -> impl Future<Output = Result<MigrationRecord, BackendError>> + Send;

    /// The record of `key`, if any.
    fn load(
        &self,
        key: &Key,
    ) -> impl Future<Output = Result<Option<MigrationRecord>, BackendError>> + Send;

    /// Moves the record of `key` from `expected` to phase `phase`.
    fn transition(
        &self,
        key: &Key,
        expected: MigrationRecord,
        phase: u8,
    ) -> impl Future<Output = Result<Transition, BackendError>> + Send;

    /// Records that `participant` has reached `phase`, for `lease`.
    fn acknowledge(
        &self,
        key: &Key,
        participant: &str,
        phase: u8,
        lease: Duration,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// How many live participants acknowledged a phase below `phase`.
    fn lagging(
        &self,
        key: &Key,
        phase: u8,
    ) -> impl Future<Output = Result<u64, BackendError>> + Send;

    /// Deletes the record of `key` and its acknowledgements.
    fn remove(&self, key: &Key) -> impl Future<Output = Result<(), BackendError>> + Send;
}
