//! A condition one part raises and other parts read, so they can act on it without depending on
//! each other: an SLO raises its fast-burn signal, a load shedder refuses low priorities while
//! it is raised.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A named yes/no condition shared by its clones.
///
/// Reading it is one relaxed atomic load, cheap enough for every request's path.
///
/// ```
/// use headroom_core::Signal;
///
/// let burning = Signal::new("checkout fast burn");
/// let seen_by_the_shedder = burning.clone();
/// assert!(!seen_by_the_shedder.is_raised());
/// burning.set(true);
/// assert!(seen_by_the_shedder.is_raised());
/// ```
#[derive(Clone)]
pub struct Signal(Arc<State>);

struct State {
    name: Box<str>,
    raised: AtomicBool,
    /// Wakes [`Signal::raised`] waiters when the signal is raised.
    raising: tokio::sync::Notify,
}

impl Signal {
    /// A signal named `name` (for logs and errors), lowered.
    pub fn new(name: impl Into<String>) -> Self {
        Self(Arc::new(State {
            name: name.into().into_boxed_str(),
            raised: AtomicBool::new(false),
            raising: tokio::sync::Notify::new(),
        }))
    }

    /// Raises or lowers the signal.
    pub fn set(&self, raised: bool) {
        let was = self.0.raised.swap(raised, Ordering::Relaxed);
        if raised && !was {
            self.0.raising.notify_waiters();
        }
    }

    /// Waits until the signal is raised: at once if it is, else when it next is.
    pub async fn raised(&self) {
        loop {
            let raising = self.0.raising.notified();
            let mut raising = std::pin::pin!(raising);
            raising.as_mut().enable();
            if self.is_raised() {
                return;
            }
            raising.await;
        }
    }

    /// Whether the signal is raised now.
    #[inline]
    pub fn is_raised(&self) -> bool {
        self.0.raised.load(Ordering::Relaxed)
    }

    /// The signal's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }
}

impl fmt::Debug for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signal")
            .field("name", &self.name())
            .field("raised", &self.is_raised())
            .finish()
    }
}
