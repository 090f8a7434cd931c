//! Priority classes.

use std::fmt;

/// How important a piece of work is; under overload lower classes are shed first.
///
/// Ordered from most to least important: `Critical < Default < Sheddable`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Priority {
    /// Work the service exists for (user-facing requests whose failure is visible). Shed last.
    Critical,
    /// Ordinary work.
    #[default]
    Default,
    /// Work that can be dropped without harm (prefetches, retries, batch jobs). Shed first.
    Sheddable,
}

impl Priority {
    /// Every class, most important first.
    pub const ALL: [Priority; 3] = [Priority::Critical, Priority::Default, Priority::Sheddable];

    /// A short name, used as the `priority` label of metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::Default => "default",
            Priority::Sheddable => "sheddable",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Priority::Critical => 0,
            Priority::Default => 1,
            Priority::Sheddable => 2,
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
