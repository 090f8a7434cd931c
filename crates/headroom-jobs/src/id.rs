use std::fmt;
use std::str::FromStr;

use headroom_core::jobs::JobNumber;

/// A job's id within its queue: the partition it lives in and its number there.
///
/// It prints as `partition-number` (`3-1042`), the form [`FromStr`] reads back, so it can go
/// into a status URL and come back as a path segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId {
    pub(crate) partition: u16,
    pub(crate) number: JobNumber,
}

impl JobId {
    /// The partition the job lives in.
    pub fn partition(self) -> u16 {
        self.partition
    }

    /// The job's number within its partition.
    pub fn number(self) -> JobNumber {
        self.number
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.partition, self.number)
    }
}

/// Text that is not a job id.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a job id (expected partition-number, e.g. 3-1042)")]
pub struct InvalidJobId(String);

impl FromStr for JobId {
    type Err = InvalidJobId;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidJobId(text.chars().take(64).collect());
        let (partition, number) = text.split_once('-').ok_or_else(invalid)?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(partition) || !digits(number) {
            return Err(invalid());
        }
        Ok(Self {
            partition: partition.parse().map_err(|_| invalid())?,
            number: number.parse().map_err(|_| invalid())?,
        })
    }
}
