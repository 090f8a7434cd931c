//! Migrations shared by several processes: the phase lives in a [`MigrationStore`].

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use futures_util::future::{Either, select};
use headroom_core::migration::{MigrationRecord, MigrationStore, Transition};
use headroom_core::{BackendError, Clock, Key};

use crate::error::{MigrationError, MigrationErrorKind};
use crate::{Migration, Phase, Router};

/// One process's part in a migration that several processes run together.
///
/// The phase is kept in a shared [`MigrationStore`] (memory for routers in one process, Redis
/// across processes) under `key`. Every participant routes through its own [`Migration`] and
/// keeps it in step with the store: [`refresh`](Self::refresh) reads the shared phase, takes it
/// on (waiting, on entering the cut-over, for its own writes still in flight to old owners) and
/// then acknowledges it in the store under a lease. [`follow`](Self::follow) refreshes every
/// `poll` interval; run it as a task in every participant.
///
/// One participant drives: [`advance`](Self::advance) moves the shared phase one step (a
/// compare-and-set, so two drivers cannot both move it) and, into the cut-over, returns only
/// once no live participant has acknowledged an earlier phase. From then on no participant
/// routes to a retired owner and none has a write in flight there. A participant renews its
/// acknowledgement while it waits for its own writes, however long they take (give writes a
/// timeout: the cut-over waits for the slowest); one that stops acknowledging (crashed,
/// partitioned, its refresh stopped) for longer than its lease is no longer waited for; the epoch fence at the data (see [`EpochFence`](crate::EpochFence) and the SQL pattern
/// in the guide) is what stops its late writes. [`rollback`](Self::rollback) abandons the
/// migration before the cut-over, and likewise returns once no live participant has a
/// mirrored write in flight.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use headroom_core::{Namespace, memory::MemoryMigrationStore};
/// use headroom_shard::{JumpRouter, Migration, Phase, SharedMigration, Topology};
///
/// let build = |epoch, last: &str| {
///     Topology::builder(JumpRouter::new(4).unwrap())
///         .epoch(epoch)
///         .node("a", ())
///         .node(last, ())
///         .shards(0..3, "a", &[])
///         .shards(3..4, last, &[])
///         .build()
/// };
/// let (from, to) = (Arc::new(build(1, "b")?), Arc::new(build(2, "c")?));
/// let store = MemoryMigrationStore::new();
/// let key = Namespace::new("orders")?.key("migration")?;
/// let join = |id: &str| {
///     let migration = Migration::new("orders", Arc::clone(&from), Arc::clone(&to)).unwrap();
///     SharedMigration::new(migration, store.clone(), key.clone(), id).join()
/// };
/// let (driver, other) = (join("web-1").await?, join("web-2").await?);
/// driver.migration().report_copied(1, 1);
/// assert_eq!(driver.advance().await?, Phase::DualWrite);
/// assert_eq!(other.refresh().await?, Phase::DualWrite);
/// # Ok(()) }
/// ```
pub struct SharedMigration<H, R, S> {
    migration: Migration<H, R>,
    store: S,
    key: Key,
    participant: Arc<str>,
    lease: Duration,
    poll: Duration,
    clock: Clock,
    /// The furthest phase this participant has taken on in full (its writes to old owners, or
    /// its mirrored writes, finished): the one it acknowledges. The local phase can be ahead
    /// while a refresh waits, and another refresh must not acknowledge that.
    taken_on: AtomicU8,
}

impl<H, R: fmt::Debug, S: fmt::Debug> fmt::Debug for SharedMigration<H, R, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMigration")
            .field("participant", &self.participant)
            .field("key", &self.key)
            .field("migration", &self.migration)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// How long an acknowledgement counts unless set otherwise.
const DEFAULT_LEASE: Duration = Duration::from_secs(10);
/// How often participants read the shared phase unless set otherwise.
const DEFAULT_POLL: Duration = Duration::from_millis(500);

/// Whether a participant on `local` can take on the shared phase `shared`: the same, a later
/// one, or a rollback before its cut-over.
fn can_take_on(local: Phase, shared: Phase) -> bool {
    match (local, shared) {
        _ if local == shared => true,
        (Phase::RolledBack, _) => false,
        (_, Phase::RolledBack) => local.mirrors(),
        _ => shared > local,
    }
}

impl<H, R: Router, S: MigrationStore> SharedMigration<H, R, S> {
    /// A participant `participant` (an id unique among the processes, such as host and pid) in
    /// the migration recorded under `key`; configure it, then [`join`](Self::join).
    pub fn new(
        migration: Migration<H, R>,
        store: S,
        key: Key,
        participant: impl Into<Arc<str>>,
    ) -> Self {
        Self {
            migration,
            store,
            key,
            participant: participant.into(),
            lease: DEFAULT_LEASE,
            poll: DEFAULT_POLL,
            clock: Clock::system(),
            taken_on: AtomicU8::new(Phase::Copy as u8),
        }
    }

    /// Creates the shared record in [`Phase::Copy`] if none exists, takes on its phase and
    /// acknowledges it; route through [`migration`](Self::migration) only after this returns.
    ///
    /// Fails with [`MigrationErrorKind::StaleEpoch`] when the record describes a migration
    /// between other epochs, and with [`MigrationErrorKind::InvalidValue`] when the poll
    /// interval is zero or the lease shorter than two of them.
    pub async fn join(self) -> Result<Self, MigrationError> {
        // Acknowledgements are renewed every poll interval plus a refresh's own time: a lease
        // of less than two could lapse for a live participant, and the cut-over skip it.
        if self.poll.is_zero() || self.lease < self.poll.saturating_mul(2) {
            return Err(self.error(MigrationErrorKind::InvalidValue));
        }
        let start = MigrationRecord {
            phase: Phase::Copy as u8,
            ..self.expected_epochs()
        };
        let stored = self
            .store
            .create(&self.key, start)
            .await
            .map_err(|e| self.backend(e))?;
        self.check_epochs(stored)?;
        self.refresh().await?;
        Ok(self)
    }

    /// How long an acknowledgement keeps this participant counted (default 10 s); a driver's
    /// cut-over waits at most about this long for a participant that stopped refreshing. At
    /// least two [`poll`](Self::poll) intervals, or [`join`](Self::join) refuses it.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How often [`follow`](Self::follow) refreshes, and the driver checks acknowledgements
    /// during a cut-over (default 500 ms). Not zero, and at most half the lease, or
    /// [`join`](Self::join) refuses it; keep it well below the lease.
    #[must_use]
    pub fn poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// The clock for polling intervals (default: the system clock).
    #[must_use]
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The local router: route every read and write through it.
    pub fn migration(&self) -> &Migration<H, R> {
        &self.migration
    }

    /// This participant's id.
    pub fn participant(&self) -> &str {
        &self.participant
    }

    /// Reads the shared phase, takes it on locally, and acknowledges it.
    ///
    /// Fails with [`MigrationErrorKind::Diverged`], keeping the local phase, when the record
    /// is gone or behind the phase this participant has taken on (a store that lost a
    /// write): phases never go back, since this process may already route to the new owners.
    pub async fn refresh(&self) -> Result<Phase, MigrationError> {
        let mut phase = self.load().await?;
        loop {
            let local = self.take_on(phase).await;
            self.store
                .acknowledge(&self.key, &self.participant, local as u8, self.lease)
                .await
                .map_err(|e| self.backend(e))?;
            // A driver that moved the phase after our read may have counted the participants
            // before this acknowledgement arrived: read again, so that either it saw the
            // acknowledgement and waits for the next one, or this participant sees its phase.
            let now = self.load().await?;
            if now == phase {
                return Ok(local);
            }
            phase = now;
        }
    }

    /// Takes `phase` on locally and returns the phase now taken on in full. While the
    /// cut-over waits for this participant's writes to old owners, it keeps acknowledging the
    /// phase it had taken on in full: it stays counted as behind however long those writes
    /// take, since only a participant that died stops acknowledging.
    async fn take_on(&self, phase: Phase) -> Phase {
        let mut follow = std::pin::pin!(self.migration.follow(phase));
        loop {
            let renew = std::pin::pin!(self.clock.sleep(self.poll));
            if let Either::Left((waited_for, _)) = select(follow.as_mut(), renew).await {
                // Phases only move forward (a rollback is the last): the furthest counts.
                let taken_on = self.taken_on.fetch_max(waited_for as u8, Ordering::AcqRel);
                return Phase::from_u8(taken_on.max(waited_for as u8)).unwrap_or(waited_for);
            }
            let before =
                Phase::from_u8(self.taken_on.load(Ordering::Acquire)).unwrap_or(Phase::Copy);
            if let Err(error) = self
                .store
                .acknowledge(&self.key, &self.participant, before as u8, self.lease)
                .await
            {
                tracing::warn!(%error, participant = %self.participant, "migration acknowledgement not renewed");
            }
        }
    }

    /// Reads the shared phase. Fails with [`MigrationErrorKind::Diverged`] when the record is
    /// gone or holds a phase this participant cannot take on from the one it had before the
    /// read: every local phase was read from the record, which only moves forward, so the
    /// store lost a write and processes may now route differently.
    async fn load(&self) -> Result<Phase, MigrationError> {
        let local = self.migration.phase();
        let record = self
            .store
            .load(&self.key)
            .await
            .map_err(|e| self.backend(e))?;
        let shared = match record {
            Some(record) => Some(self.check_epochs(record)?),
            None => None,
        };
        match shared {
            Some(shared) if can_take_on(local, shared) => Ok(shared),
            _ => {
                tracing::error!(
                    ?local, ?shared, participant = %self.participant,
                    "shared migration record lost or behind this participant"
                );
                Err(self.error(MigrationErrorKind::Diverged))
            }
        }
    }

    /// Refreshes every poll interval, forever; spawn it as a task and abort it (or drop it) to
    /// stop. A failed refresh is logged and tried again at the next interval.
    pub async fn follow(&self) {
        loop {
            if let Err(error) = self.refresh().await {
                tracing::warn!(%error, participant = %self.participant, "migration refresh failed");
            }
            self.clock.sleep(self.poll).await;
        }
    }

    /// Moves the shared phase to the next one after the shared phase now, and returns it.
    ///
    /// Each call moves one step from wherever the phase is, so a second call (an operator's
    /// second run, a retry after an answer was lost) moves one step further: to take one
    /// given step, use [`advance_to`](Self::advance_to).
    ///
    /// Leaving [`Phase::Copy`] requires this participant's [`Migration`] to have the backfill
    /// reported complete. Entering [`Phase::CutOver`] returns once every live participant has
    /// acknowledged it, that is, has stopped routing to old owners and finished its writes
    /// there. Fails with [`MigrationErrorKind::Conflict`] when another participant moved the
    /// phase first, and with [`MigrationErrorKind::Diverged`] when the record is gone or its
    /// phase went back behind this participant's, before or during the wait (participants
    /// on either side of it would wait for each other forever, and a missing record counts
    /// nobody). If this future is dropped during that wait, the shared phase has still
    /// advanced; [`settled`](Self::settled) waits again, as does the next `advance` before it
    /// moves on.
    pub async fn advance(&self) -> Result<Phase, MigrationError> {
        crate::reshard::traced_step(self.migration.name(), self.advance_untraced()).await
    }

    /// Moves the shared phase to `target`, the phase after the shared one, and returns it;
    /// when the shared phase is already `target`, moves nothing (and, into
    /// [`Phase::CutOver`], waits for the participants as the step does). So a step can be
    /// tried again safely, after a lost answer or by a second driver, and a transition the
    /// store applied but answered as refused (sent twice by a cluster client after a dropped
    /// connection) counts as taken. Fails with [`MigrationErrorKind::Conflict`] when `target`
    /// is neither the shared phase nor the one after it, and otherwise as
    /// [`advance`](Self::advance).
    pub async fn advance_to(&self, target: Phase) -> Result<Phase, MigrationError> {
        crate::reshard::traced_step(self.migration.name(), self.advance_to_untraced(target)).await
    }

    async fn advance_to_untraced(&self, target: Phase) -> Result<Phase, MigrationError> {
        let current = self.refresh().await?;
        if current == target {
            return self.reached(target).await;
        }
        // A rolled back migration is refused as such by the step.
        if current != Phase::RolledBack && current.next() != Some(target) {
            return Err(self.error(MigrationErrorKind::Conflict));
        }
        match self.step(current).await {
            // Moved by another driver taking the same step, or by this one: a transition sent
            // again (a cluster client resending after a dropped connection) finds its own
            // first sending applied.
            Err(error) if error.kind() == MigrationErrorKind::Conflict => {
                if self.refresh().await? == target {
                    self.reached(target).await
                } else {
                    Err(error)
                }
            }
            stepped => stepped,
        }
    }

    /// `target`, which the shared phase has reached: into the cut-over, once the
    /// participants have taken it on, as the step waits.
    async fn reached(&self, target: Phase) -> Result<Phase, MigrationError> {
        if target == Phase::CutOver {
            self.await_acknowledgements(target).await?;
        }
        Ok(target)
    }

    async fn advance_untraced(&self) -> Result<Phase, MigrationError> {
        let current = self.refresh().await?;
        self.step(current).await
    }

    /// Moves the shared phase on from `current`, just read.
    async fn step(&self, current: Phase) -> Result<Phase, MigrationError> {
        if current == Phase::RolledBack {
            return Err(self.error(MigrationErrorKind::RolledBack));
        }
        if current.new_owners_serve() {
            // A cut-over whose wait was dropped: nobody may still route to an old owner when
            // the next step (the cleanup of old owners) begins.
            self.await_acknowledgements(current).await?;
        }
        let next = current
            .next()
            .ok_or_else(|| self.error(MigrationErrorKind::Finished))?;
        if current == Phase::Copy && self.migration.progress() < 1.0 {
            return Err(self.error(MigrationErrorKind::CopyIncomplete));
        }
        self.transition(current, next).await?;
        tracing::info!(phase = ?next, participant = %self.participant, "shared migration advanced");
        self.refresh().await?;
        if next == Phase::CutOver {
            self.await_acknowledgements(next).await?;
        }
        Ok(next)
    }

    /// Waits until no live participant has acknowledged a phase before the shared one, and
    /// returns that phase.
    pub async fn settled(&self) -> Result<Phase, MigrationError> {
        let phase = self.refresh().await?;
        self.await_acknowledgements(phase).await?;
        Ok(phase)
    }

    /// Abandons the migration before the cut-over, for every participant: each one routes to
    /// the old owners only from its next refresh. Refused with
    /// [`MigrationErrorKind::RolledBack`] from the cut-over on.
    ///
    /// Returns once every live participant has acknowledged the rollback, that is, has no
    /// mirrored write in flight any more, so that the copies on the new owners can be dropped
    /// then (as for the cut-over, a participant that stops acknowledging is waited for no
    /// longer than its lease). If this future is dropped during that wait, the migration is
    /// still rolled back, and the next call waits again.
    pub async fn rollback(&self) -> Result<(), MigrationError> {
        let current = self.refresh().await?;
        if current != Phase::RolledBack {
            if !current.mirrors() {
                return Err(self.error(MigrationErrorKind::RolledBack));
            }
            self.transition(current, Phase::RolledBack).await?;
            self.refresh().await?;
        }
        self.await_acknowledgements(Phase::RolledBack).await
    }

    /// Waits until no live participant has acknowledged a phase before `phase`.
    async fn await_acknowledgements(&self, phase: Phase) -> Result<(), MigrationError> {
        loop {
            let lagging = self
                .store
                .lagging(&self.key, phase as u8)
                .await
                .map_err(|e| self.backend(e))?;
            // A record gone (which counts nobody) or gone back (whose followers never reach
            // `phase`) cannot end the wait: fail instead of returning early or never.
            self.load().await?;
            if lagging == 0 {
                return Ok(());
            }
            tracing::debug!(lagging, phase = ?phase, "waiting for participants");
            self.clock.sleep(self.poll).await;
        }
    }

    async fn transition(&self, current: Phase, next: Phase) -> Result<(), MigrationError> {
        let expected = MigrationRecord {
            phase: current as u8,
            ..self.expected_epochs()
        };
        match self
            .store
            .transition(&self.key, expected, next as u8)
            .await
            .map_err(|e| self.backend(e))?
        {
            Transition::Applied => Ok(()),
            _ => Err(self.error(MigrationErrorKind::Conflict)),
        }
    }

    fn expected_epochs(&self) -> MigrationRecord {
        MigrationRecord {
            from_epoch: self.migration.from_topology().epoch(),
            to_epoch: self.migration.to_topology().epoch(),
            phase: 0,
        }
    }

    /// The record's phase, if the record is about this migration.
    fn check_epochs(&self, record: MigrationRecord) -> Result<Phase, MigrationError> {
        let expected = self.expected_epochs();
        if (record.from_epoch, record.to_epoch) != (expected.from_epoch, expected.to_epoch) {
            return Err(self.error(MigrationErrorKind::StaleEpoch));
        }
        Phase::from_u8(record.phase).ok_or_else(|| self.error(MigrationErrorKind::Conflict))
    }

    fn error(&self, kind: MigrationErrorKind) -> MigrationError {
        MigrationError::new(kind, self.migration.to_topology().epoch())
    }

    fn backend(&self, error: BackendError) -> MigrationError {
        MigrationError::backend(error, self.migration.to_topology().epoch())
    }
}
