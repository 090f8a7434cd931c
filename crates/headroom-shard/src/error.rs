//! Errors of the shard crate: one type per operation family, each with a `#[non_exhaustive]`
//! kind and a [`Classify`] impl.

use std::fmt;

use headroom_core::Classify;

use crate::ShardId;

/// What is wrong with a router or topology definition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    /// A router or topology has no shards, nodes or members.
    Empty,
    /// The same shard, node or key appears twice (a node twice in one placement too: as its
    /// own replica, or as a replica twice).
    Duplicate,
    /// A weight is zero, negative or not a number.
    InvalidWeight,
    /// A Maglev table size is not a prime larger than the number of members.
    InvalidTableSize,
    /// A router would exceed the size limit (2^24 shards, ring points or table entries).
    TooLarge,
    /// Range bounds are not strictly increasing.
    UnorderedBounds,
    /// A Redis Cluster slot is outside `0..16384` or left unassigned.
    InvalidSlot,
    /// A shard the router can return has no entry in the topology.
    MissingShard,
    /// A shard refers to a node the topology does not define.
    UnknownNode,
    /// A new topology's epoch is not greater than the current one.
    StaleEpoch,
    /// The user-supplied handle could not be created.
    Handle,
    /// A setting is outside what works: no virtual nodes on a ring, a replication report that
    /// never counts.
    InvalidValue,
}

/// An invalid router or topology definition.
#[derive(Debug, thiserror::Error)]
#[error("{kind:?}: {detail}")]
pub struct ConfigError {
    kind: ConfigErrorKind,
    detail: Box<str>,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl ConfigError {
    pub(crate) fn new(kind: ConfigErrorKind, detail: impl fmt::Display) -> Self {
        Self {
            kind,
            detail: detail.to_string().into(),
            source: None,
        }
    }

    #[cfg(feature = "serde")]
    pub(crate) fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        self.source = Some(source.into());
        self
    }

    /// What is wrong.
    pub fn kind(&self) -> ConfigErrorKind {
        self.kind
    }
}

impl Classify for ConfigError {
    fn is_timeout(&self) -> bool {
        false
    }

    fn is_retryable(&self) -> bool {
        false
    }
}

/// Why a migration refused a step or a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MigrationErrorKind {
    /// The write was routed under an epoch its owner no longer accepts; route it again.
    Fenced,
    /// The migration is already done; there is no next phase.
    Finished,
    /// The copy phase cannot end before every moving unit is reported copied.
    CopyIncomplete,
    /// The target topology's epoch is not greater than the source's, or the shared record
    /// describes a migration between other epochs.
    StaleEpoch,
    /// Another process changed the shared phase first; refresh and decide again.
    Conflict,
    /// The migration was rolled back, or a rollback came after the cut-over (too late: the
    /// new owners have taken writes the old ones never saw).
    RolledBack,
    /// The shared migration store failed; the error's source says how.
    Backend,
    /// The shared record is gone, or holds a phase this participant cannot take on from its
    /// own: behind it (a store failover lost the write, the record was removed) or a rollback
    /// after its cut-over. Participants may now route differently; no step is taken until an
    /// operator decides (finish the migration with the processes on the later phase, or
    /// restore the record).
    Diverged,
    /// A setting is outside what works: a zero poll interval, or an acknowledgement lease
    /// shorter than two poll intervals.
    InvalidValue,
}

impl MigrationErrorKind {
    /// A short snake_case name: `fenced`, `finished`, `copy_incomplete`, `stale_epoch`,
    /// `conflict`, `rolled_back`, `backend`, `diverged`, `invalid_value`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fenced => "fenced",
            Self::Finished => "finished",
            Self::CopyIncomplete => "copy_incomplete",
            Self::StaleEpoch => "stale_epoch",
            Self::Conflict => "conflict",
            Self::RolledBack => "rolled_back",
            Self::Backend => "backend",
            Self::Diverged => "diverged",
            Self::InvalidValue => "invalid_value",
        }
    }
}

/// A refused migration step or a fenced write.
#[derive(Clone, Debug, thiserror::Error)]
#[error("migration: {kind:?} (epoch {epoch})")]
pub struct MigrationError {
    kind: MigrationErrorKind,
    epoch: u64,
    #[source]
    source: Option<std::sync::Arc<headroom_core::BackendError>>,
}

impl PartialEq for MigrationError {
    fn eq(&self, other: &Self) -> bool {
        (self.kind, self.epoch) == (other.kind, other.epoch)
    }
}

impl Eq for MigrationError {}

impl MigrationError {
    pub(crate) fn new(kind: MigrationErrorKind, epoch: u64) -> Self {
        Self {
            kind,
            epoch,
            source: None,
        }
    }

    pub(crate) fn backend(source: headroom_core::BackendError, epoch: u64) -> Self {
        Self {
            kind: MigrationErrorKind::Backend,
            epoch,
            source: Some(std::sync::Arc::new(source)),
        }
    }

    /// Why the step or write was refused.
    pub fn kind(&self) -> MigrationErrorKind {
        self.kind
    }

    /// The epoch in force when the error was raised.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

impl Classify for MigrationError {
    fn is_timeout(&self) -> bool {
        self.source
            .as_ref()
            .is_some_and(|source| source.is_timeout())
    }

    /// A fenced write succeeds when routed again under the current epoch, and a store
    /// failure may succeed when tried again. A step refused for a conflict is not retried:
    /// the shared phase moved, and the driver decides again (an `advance` tried again would
    /// move one step further).
    fn is_retryable(&self) -> bool {
        match self.kind {
            MigrationErrorKind::Fenced => true,
            MigrationErrorKind::Backend => self
                .source
                .as_ref()
                .is_some_and(|source| source.is_retryable()),
            _ => false,
        }
    }

    fn is_rejected(&self) -> bool {
        self.kind == MigrationErrorKind::Fenced
    }
}

/// A shard id that the topology does not know (for example a key routed by a foreign router).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("shard {0} is not in the topology")]
pub struct UnknownShard(pub ShardId);

impl Classify for UnknownShard {
    fn is_timeout(&self) -> bool {
        false
    }

    fn is_retryable(&self) -> bool {
        false
    }
}
