//! A bounded backpressure queue of work in front of a worker pool or any other consumer.

use std::collections::VecDeque;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::future::{Either, select};
use headroom_core::{Classify, Clock};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tracing::Instrument;

use crate::metrics::AdmissionMetrics;
use crate::{ConfigError, Overloaded, Priority, Reason};

/// What a full queue does with new work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(tag = "policy", rename_all = "snake_case", from = "OverflowFields")
)]
pub enum Overflow {
    /// Refuse the new item ([`Reason::QueueFull`]).
    RejectNew,
    /// Drop the oldest queued item of the same class to make room ([`Reason::Evicted`]).
    DropOldest,
    /// Let [`WorkQueue::push`] wait up to `timeout` for room ([`Reason::WaitTimeout`] after).
    Wait {
        /// The longest a producer waits for room.
        #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
        timeout: Duration,
    },
}

/// [`Overflow`] as loaded: serde lets a unit variant of a tagged enum take any field, so each
/// policy is a struct variant here, and a field it does not take is refused.
#[cfg(feature = "serde")]
#[derive(serde::Deserialize)]
#[serde(tag = "policy", rename_all = "snake_case", deny_unknown_fields)]
enum OverflowFields {
    RejectNew {},
    DropOldest {},
    Wait {
        #[serde(with = "humantime_serde")]
        timeout: Duration,
    },
}

#[cfg(feature = "serde")]
impl From<OverflowFields> for Overflow {
    fn from(fields: OverflowFields) -> Self {
        match fields {
            OverflowFields::RejectNew {} => Overflow::RejectNew,
            OverflowFields::DropOldest {} => Overflow::DropOldest,
            OverflowFields::Wait { timeout } => Overflow::Wait { timeout },
        }
    }
}

/// CoDel parameters: shed when queue delay stays above `target` for a whole `interval`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct CodelConfig {
    /// Acceptable standing queue delay (default 5 ms).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub target: Duration,
    /// Window over which the minimum delay must exceed the target (default 100 ms).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub interval: Duration,
}

impl Default for CodelConfig {
    fn default() -> Self {
        Self {
            target: Duration::from_millis(5),
            interval: Duration::from_millis(100),
        }
    }
}

/// Configuration of a [`WorkQueue`], loadable with serde (feature `serde`).
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct QueueConfig {
    /// How many items the queue holds, all classes together (default 1024).
    pub capacity: usize,
    /// What a full queue does with new work (default [`Overflow::RejectNew`]).
    pub overflow: Overflow,
    /// Shed items that waited too long while the queue is persistently slow (default off).
    pub codel: Option<CodelConfig>,
    /// Serve the newest item first while overloaded (default off): fresh requests still meet
    /// their callers' deadlines while the stale ones age out.
    pub adaptive_lifo: bool,
}

impl QueueConfig {
    /// Checks every setting, as [`WorkQueueBuilder::build`] and [`WorkQueue::reconfigure`] do.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.capacity == 0 {
            return Err(ConfigError::new("capacity", "must be at least 1"));
        }
        if let Some(codel) = &self.codel {
            if codel.target.is_zero() {
                return Err(ConfigError::new("codel.target", "must be positive"));
            }
            if codel.interval.is_zero() {
                return Err(ConfigError::new("codel.interval", "must be positive"));
            }
        }
        Ok(())
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            capacity: 1024,
            overflow: Overflow::RejectNew,
            codel: None,
            adaptive_lifo: false,
        }
    }
}

/// How an item enters a [`WorkQueue`]: its priority and its deadline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Enqueue {
    priority: Priority,
    deadline: Option<Instant>,
}

impl Enqueue {
    /// Default priority, no deadline.
    pub fn new() -> Self {
        Self::default()
    }

    /// The item's priority class.
    #[must_use]
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// The instant (on the queue's clock) after which the item is dropped instead of run.
    #[must_use]
    pub fn deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }
}

/// An item the queue did not take, handed back with the reason.
pub struct PushError<T> {
    item: T,
    rejection: Overloaded,
}

impl<T> PushError<T> {
    /// Why the item was refused.
    pub fn rejection(&self) -> Overloaded {
        self.rejection
    }

    /// The refused item.
    pub fn into_item(self) -> T {
        self.item
    }
}

impl<T> fmt::Debug for PushError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PushError")
            .field("rejection", &self.rejection)
            .finish_non_exhaustive()
    }
}

impl<T> fmt::Display for PushError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.rejection, f)
    }
}

impl<T> std::error::Error for PushError<T> {}

impl<T> Classify for PushError<T> {
    fn is_timeout(&self) -> bool {
        false
    }

    fn is_retryable(&self) -> bool {
        true
    }

    fn is_rejected(&self) -> bool {
        true
    }
}

type ShedHandler<T> = Box<dyn Fn(T, Overloaded) + Send + Sync>;

/// Tells an item whose caller has gone, so that its place can go to live work.
type AbandonedCheck<T> = dyn Fn(&T) -> bool + Send + Sync;

/// A bounded queue of work with overflow policies, deadlines, priorities, CoDel and adaptive
/// LIFO.
///
/// Producers [`push`](WorkQueue::push) items; consumers (a pool of workers, a batcher)
/// [`pop`](WorkQueue::pop) them. Items leave the queue in one of two ways: handed to a
/// consumer, or *shed* — evicted to make room, past their deadline, or dropped by CoDel —
/// in which case they are passed to the [`on_shed`](WorkQueueBuilder::on_shed) handler with
/// the reason (so a waiting caller can be answered) and never reach a consumer.
///
/// - Priorities: the more important class is always served first, and a full queue makes
///   room for new work by evicting the least important class first.
/// - Deadlines: an item whose deadline passed is shed, never handed out.
/// - CoDel: when the shortest queue delay seen over an interval stays above the target, the
///   queue is overloaded and items that waited more than twice the target are shed.
/// - Adaptive LIFO: while overloaded, the newest item of a class is served first.
///
/// Cloning is cheap; clones share the queue. Push and pop take the queue's own lock briefly
/// (never a global one) and do not allocate once the queue has grown to its working size.
///
/// ```
/// use headroom_limit::{Enqueue, Priority, WorkQueue};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let queue = WorkQueue::builder("jobs").capacity(2).build()?;
/// queue.push("report").await?;
/// queue.push_with("page", Enqueue::new().priority(Priority::Critical)).await?;
/// assert!(queue.push("third").await.is_err());
/// assert_eq!(queue.pop().await, Some("page"));
/// assert_eq!(queue.pop().await, Some("report"));
/// # Ok(()) }
/// ```
pub struct WorkQueue<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for WorkQueue<T> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

struct Inner<T> {
    name: Arc<str>,
    config: ArcSwap<QueueConfig>,
    clock: Clock,
    state: Mutex<State<T>>,
    items: Notify,
    space: Notify,
    on_shed: Option<ShedHandler<T>>,
    abandoned: Option<Box<AbandonedCheck<T>>>,
    last_delay_nanos: AtomicU64,
    metrics: AdmissionMetrics,
}

struct State<T> {
    classes: [VecDeque<Entry<T>>; Priority::ALL.len()],
    len: usize,
    closed: bool,
    codel: Codel,
    /// Entries looked at to find expired ones, to show the cost of a push into a full queue.
    #[cfg(test)]
    examined: usize,
}

struct Entry<T> {
    item: T,
    priority: Priority,
    enqueued: Instant,
    deadline: Option<Instant>,
}

/// CoDel as in folly's `Codel`: the minimum delay over an interval decides overload.
#[derive(Default)]
struct Codel {
    interval_end: Option<Instant>,
    min_delay: Duration,
    reset: bool,
    overloaded: bool,
}

impl Codel {
    /// Updates the state with one dequeued item's delay; true if the item should be shed.
    fn observe(&mut self, config: &CodelConfig, now: Instant, delay: Duration) -> bool {
        match self.interval_end {
            Some(end) if now <= end => {}
            Some(_) => {
                self.overloaded = self.min_delay > config.target;
                self.reset = true;
                self.interval_end = now.checked_add(config.interval);
            }
            None => {
                self.reset = true;
                self.interval_end = now.checked_add(config.interval);
            }
        }
        if self.reset || delay < self.min_delay {
            self.reset = false;
            self.min_delay = delay;
        }
        self.overloaded && delay > config.target.saturating_mul(2)
    }
}

/// What one look at the queue found.
enum Take<T> {
    Item(T),
    Shed(T, Overloaded),
    Empty,
    Closed,
}

/// Builds a [`WorkQueue`].
#[must_use]
pub struct WorkQueueBuilder<T> {
    name: String,
    config: QueueConfig,
    clock: Clock,
    on_shed: Option<ShedHandler<T>>,
    abandoned: Option<Box<AbandonedCheck<T>>>,
}

impl<T> fmt::Debug for WorkQueueBuilder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkQueueBuilder")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<T> WorkQueue<T> {
    /// A builder for a queue named `name` (the `queue` label of its metrics).
    pub fn builder(name: impl Into<String>) -> WorkQueueBuilder<T> {
        WorkQueueBuilder {
            name: name.into(),
            config: QueueConfig::default(),
            clock: Clock::system(),
            on_shed: None,
            abandoned: None,
        }
    }

    /// Adds an item of default priority without a deadline; see [`push_with`](Self::push_with).
    pub async fn push(&self, item: T) -> Result<(), PushError<T>> {
        self.push_with(item, Enqueue::new()).await
    }

    /// Adds an item, applying the overflow policy if the queue is full.
    ///
    /// Only [`Overflow::Wait`] ever waits, and never past the item's deadline. Dropping the
    /// future while it waits drops the item and leaves the queue as it was.
    pub async fn push_with(&self, item: T, how: Enqueue) -> Result<(), PushError<T>> {
        let Overflow::Wait { timeout } = self.inner.config.load().overflow else {
            return self.try_push_with(item, how);
        };
        let clock = &self.inner.clock;
        let now = clock.now();
        let (limit, reason) = match how.deadline {
            Some(deadline) if now.checked_add(timeout).is_none_or(|end| deadline < end) => (
                deadline.saturating_duration_since(now),
                Reason::DeadlineExpired,
            ),
            _ => (timeout, Reason::WaitTimeout),
        };
        let mut expire = pin!(clock.sleep(limit));
        let mut item = item;
        // Opened when the push first has to wait: one that finds room at once costs no span.
        let mut span = None;
        let result = loop {
            let mut space = pin!(self.inner.space.notified());
            space.as_mut().enable();
            // The policy may have changed while this push waited: it keeps its timeout, and
            // stops waiting when the queue no longer waits.
            if !matches!(self.inner.config.load().overflow, Overflow::Wait { .. }) {
                break self.try_push_with(item, how);
            }
            match self.offer(item, how) {
                Ok(()) => break Ok(()),
                // Not a refusal yet: the push waits for room.
                Err(full) if full.rejection.reason() == Reason::QueueFull => item = full.item,
                Err(refused) => break Err(refused),
            }
            let span = span.get_or_insert_with(|| {
                tracing::debug_span!("queue.push", name = %self.inner.name, outcome = tracing::field::Empty)
            });
            // An item at the head of its class that expires leaves its place to this push.
            let head_expires = pin!(async {
                match self.next_head_expiry() {
                    Some(at) => clock.sleep(at.saturating_duration_since(clock.now())).await,
                    None => std::future::pending().await,
                }
            });
            let waited = select(select(space, head_expires), expire.as_mut())
                .instrument(span.clone())
                .await;
            if let Either::Right(_) = waited {
                break Err(self.refuse(item, how.priority, reason));
            }
        };
        if let Some(span) = span {
            span.record(
                "outcome",
                match &result {
                    Ok(()) => "admitted",
                    Err(refused) => refused.rejection.reason().as_str(),
                },
            );
        }
        result
    }

    /// Adds an item of default priority without a deadline, never waiting.
    pub fn try_push(&self, item: T) -> Result<(), PushError<T>> {
        self.try_push_with(item, Enqueue::new())
    }

    /// Adds an item, never waiting: under [`Overflow::Wait`] a full queue refuses at once.
    pub fn try_push_with(&self, item: T, how: Enqueue) -> Result<(), PushError<T>> {
        match self.offer(item, how) {
            Err(full) if full.rejection.reason() == Reason::QueueFull => {
                Err(self.refuse(full.item, how.priority, Reason::QueueFull))
            }
            offered => offered,
        }
    }

    /// Adds the item if there is room (after the overflow policy made what room it may). A full
    /// queue hands the item back uncounted, for the caller to refuse or to wait; every other
    /// refusal is counted here.
    pub(crate) fn offer(&self, item: T, how: Enqueue) -> Result<(), PushError<T>> {
        let inner = &*self.inner;
        let now = inner.clock.now();
        if how.deadline.is_some_and(|deadline| deadline <= now) {
            return Err(self.refuse(item, how.priority, Reason::DeadlineExpired));
        }
        let config = inner.config.load();
        let mut state = inner.state.lock();
        if state.closed {
            drop(state);
            return Err(self.refuse(item, how.priority, Reason::Closed));
        }
        // Allocates only when dead items are found; an eviction needs no buffer.
        let mut expired = Vec::new();
        let mut abandoned = Vec::new();
        let mut evicted = None;
        if state.len >= config.capacity {
            let check = inner.abandoned.as_deref();
            Self::drop_dead_heads(&mut state, now, check, &mut expired, &mut abandoned);
            // One eviction makes room only in a queue at its capacity; a queue over it (its
            // capacity was lowered) refuses rather than lose queued work for nothing.
            if state.len == config.capacity {
                evicted = self.evict_for(&mut state, how.priority, config.overflow);
            }
        }
        let result = if state.len < config.capacity {
            state.classes[how.priority.index()].push_back(Entry {
                item,
                priority: how.priority,
                enqueued: now,
                deadline: how.deadline,
            });
            state.len += 1;
            Ok(())
        } else {
            Err(item)
        };
        drop(state);
        let removed = expired.len() + abandoned.len() + usize::from(evicted.is_some());
        if removed > 0 {
            inner.metrics.queued.decrement(removed as f64);
        }
        // Places freed beyond the one this push took are room for pushes that wait.
        for _ in usize::from(result.is_ok())..removed {
            inner.space.notify_one();
        }
        // Counted and announced before the shed handlers run: the item is in the queue.
        if result.is_ok() {
            inner.metrics.queued.increment(1.0);
            inner.metrics.admitted.increment(1);
            inner.items.notify_one();
        }
        for (item, rejection) in expired.into_iter().chain(evicted) {
            self.shed(item, rejection);
        }
        // No one is left to answer, and the queue turned nothing away: dropped uncounted,
        // outside the lock.
        drop(abandoned);
        result.map_err(|item| PushError {
            item,
            rejection: Overloaded::new(Reason::QueueFull, how.priority),
        })
    }

    /// The earliest deadline among the items at the head of their class: the next place
    /// [`drop_dead_heads`](Self::drop_dead_heads) can free.
    fn next_head_expiry(&self) -> Option<Instant> {
        let state = self.inner.state.lock();
        state
            .classes
            .iter()
            .filter_map(|class| class.front()?.deadline)
            .min()
    }

    /// Removes the dead items at the head of each class, expired or abandoned by their caller:
    /// they hold places for nothing. Expired items are to be shed; abandoned ones go uncounted,
    /// as no one is left to answer.
    ///
    /// Looks at each removed item once and at one live item per class, so a push into a full
    /// queue costs the same however long the queue is. An item that died behind a live one of
    /// its class (a shorter deadline pushed later, a caller that left sooner) keeps its place
    /// until it reaches the head, and is never run when a consumer gets to it.
    fn drop_dead_heads(
        state: &mut State<T>,
        now: Instant,
        check: Option<&AbandonedCheck<T>>,
        expired: &mut Vec<(T, Overloaded)>,
        abandoned: &mut Vec<T>,
    ) {
        for index in 0..state.classes.len() {
            while let Some(head) = state.classes[index].front() {
                // Abandonment first: an item whose caller left is no refusal, whatever its
                // deadline.
                let head_abandoned = check.is_some_and(|check| check(&head.item));
                let head_expired = head.deadline.is_some_and(|deadline| deadline <= now);
                #[cfg(test)]
                {
                    state.examined += 1;
                }
                if !head_abandoned && !head_expired {
                    break;
                }
                let Some(entry) = state.classes[index].pop_front() else {
                    break;
                };
                state.len -= 1;
                if head_abandoned {
                    abandoned.push(entry.item);
                } else {
                    let rejection = Overloaded::new(Reason::DeadlineExpired, entry.priority);
                    expired.push((entry.item, rejection));
                }
            }
        }
    }

    /// Frees at once the places of abandoned items at the head of their class, rather than
    /// at the next push into a full queue, and wakes a waiting push for each: for a caller
    /// that has just left. Costs what [`drop_dead_heads`](Self::drop_dead_heads) does.
    #[cfg(feature = "tower")]
    pub(crate) fn release_abandoned(&self) {
        let inner = &*self.inner;
        let Some(check) = inner.abandoned.as_deref() else {
            return;
        };
        let mut abandoned = Vec::new();
        let mut state = inner.state.lock();
        for class in &mut state.classes {
            while class.front().is_some_and(|head| check(&head.item)) {
                if let Some(entry) = class.pop_front() {
                    abandoned.push(entry.item);
                }
            }
        }
        state.len -= abandoned.len();
        drop(state);
        if abandoned.is_empty() {
            return;
        }
        inner.metrics.queued.decrement(abandoned.len() as f64);
        for _ in 0..abandoned.len() {
            inner.space.notify_one();
        }
    }

    /// Evicts one item from a full queue to make room for `incoming`, if the priorities or
    /// the overflow policy allow it.
    fn evict_for(
        &self,
        state: &mut State<T>,
        incoming: Priority,
        overflow: Overflow,
    ) -> Option<(T, Overloaded)> {
        // Less important work makes room for more important work, oldest first.
        let lower = Priority::ALL
            .iter()
            .rev()
            .find(|p| **p > incoming && !state.classes[p.index()].is_empty());
        let victim_class = match (lower, overflow) {
            (Some(lower), _) => *lower,
            (None, Overflow::DropOldest) => incoming,
            (None, _) => return None,
        };
        let entry = state.classes[victim_class.index()].pop_front()?;
        state.len -= 1;
        Some((entry.item, Overloaded::new(Reason::Evicted, entry.priority)))
    }

    /// Takes the next item to run, waiting while the queue is empty.
    ///
    /// Returns `None` once the queue is closed and drained. Items shed on the way (past their
    /// deadline, or dropped by CoDel) go to the shed handler. Cancel-safe: dropping the
    /// future loses no item.
    pub async fn pop(&self) -> Option<T> {
        loop {
            let mut notified = pin!(self.inner.items.notified());
            notified.as_mut().enable();
            loop {
                match self.take() {
                    Take::Item(item) => return Some(item),
                    Take::Shed(item, rejection) => self.shed(item, rejection),
                    Take::Closed => return None,
                    Take::Empty => break,
                }
            }
            notified.await;
        }
    }

    /// Takes the next item to run if there is one now.
    pub fn try_pop(&self) -> Option<T> {
        loop {
            match self.take() {
                Take::Item(item) => return Some(item),
                Take::Shed(item, rejection) => self.shed(item, rejection),
                Take::Closed | Take::Empty => return None,
            }
        }
    }

    fn take(&self) -> Take<T> {
        let inner = &*self.inner;
        let now = inner.clock.now();
        let config = inner.config.load();
        let mut state = inner.state.lock();
        let Some(index) = state.classes.iter().position(|class| !class.is_empty()) else {
            return if state.closed {
                Take::Closed
            } else {
                Take::Empty
            };
        };
        let overloaded = match config.codel {
            Some(_) => state.codel.overloaded,
            None => state.len * 2 > config.capacity,
        };
        let lifo = config.adaptive_lifo && overloaded;
        let class = &mut state.classes[index];
        let entry = if lifo {
            // Serving the newest first lets the oldest age out; shed it once it is stale.
            let stale = config.codel.is_some_and(|codel| {
                class.front().is_some_and(|oldest| {
                    now.saturating_duration_since(oldest.enqueued) > codel.target.saturating_mul(2)
                })
            });
            if stale {
                class.pop_front()
            } else {
                class.pop_back()
            }
        } else {
            class.pop_front()
        };
        let Some(entry) = entry else {
            return Take::Empty;
        };
        state.len -= 1;
        let delay = now.saturating_duration_since(entry.enqueued);
        let codel_shed = match &config.codel {
            Some(config) => state.codel.observe(config, now, delay),
            None => false,
        };
        drop(state);
        inner.space.notify_one();
        inner.metrics.queued.decrement(1.0);
        if entry.deadline.is_some_and(|deadline| deadline <= now) {
            return Take::Shed(
                entry.item,
                Overloaded::new(Reason::DeadlineExpired, entry.priority),
            );
        }
        if codel_shed {
            return Take::Shed(
                entry.item,
                Overloaded::new(Reason::QueueDelay, entry.priority),
            );
        }
        let nanos = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        inner.last_delay_nanos.store(nanos, Ordering::Relaxed);
        inner.metrics.queue_delay.record(delay.as_secs_f64());
        Take::Item(entry.item)
    }

    fn shed(&self, item: T, rejection: Overloaded) {
        let inner = &*self.inner;
        inner
            .metrics
            .rejections
            .record(rejection.priority(), rejection.reason());
        tracing::debug!(queue = %inner.name, reason = %rejection.reason(), priority = %rejection.priority(), "shed queued item");
        let Some(handler) = &inner.on_shed else {
            return;
        };
        // The panic belongs to the shed item's caller, not to the push or pop that shed it.
        if catch_unwind(AssertUnwindSafe(|| handler(item, rejection))).is_err() {
            tracing::error!(queue = %inner.name, reason = %rejection.reason(), priority = %rejection.priority(), "shed handler panicked");
        }
    }

    fn refuse(&self, item: T, priority: Priority, reason: Reason) -> PushError<T> {
        let inner = &*self.inner;
        inner.metrics.rejections.record(priority, reason);
        tracing::debug!(queue = %inner.name, %reason, %priority, "refused");
        PushError {
            item,
            rejection: Overloaded::new(reason, priority),
        }
    }

    /// Stops accepting items and wakes everyone: producers get [`Reason::Closed`], consumers
    /// drain what is queued and then get `None`.
    pub fn close(&self) {
        self.inner.state.lock().closed = true;
        self.inner.items.notify_waiters();
        self.inner.space.notify_waiters();
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.state.lock().closed
    }

    /// How many items are queued.
    pub fn len(&self) -> usize {
        self.inner.state.lock().len
    }

    /// Whether no item is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The name given at build time (the `queue` label of its metrics).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The configuration in force.
    pub fn config(&self) -> QueueConfig {
        QueueConfig::clone(&self.inner.config.load())
    }

    /// Replaces the configuration while the queue runs. Growing the capacity lets waiting
    /// pushes in at once; shrinking it drops nothing: queued items stay, and pushes are
    /// refused, evicting nothing, until consumers bring the queue under the new capacity.
    /// Pushes waiting for room keep the timeout they started with, and are refused at once
    /// if the queue no longer waits. Changed CoDel settings start a fresh interval. An
    /// invalid configuration is refused and the one in force stays.
    pub fn reconfigure(&self, config: QueueConfig) -> Result<(), ConfigError> {
        config.validate()?;
        let codel_changed = self.inner.config.load().codel != config.codel;
        self.inner.config.store(Arc::new(config));
        if codel_changed {
            self.inner.state.lock().codel = Codel::default();
        }
        // Waiting pushes look again: there may be room now, or another policy.
        self.inner.space.notify_waiters();
        Ok(())
    }

    /// How long the most recently handed-out item had waited.
    pub fn queue_delay(&self) -> Duration {
        Duration::from_nanos(self.inner.last_delay_nanos.load(Ordering::Relaxed))
    }

    /// How many items of `priority` were refused or shed for `reason` since the queue was
    /// built.
    pub fn rejected(&self, priority: Priority, reason: Reason) -> u64 {
        self.inner.metrics.rejections.count(priority, reason)
    }
}

impl<T> fmt::Debug for WorkQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkQueue")
            .field("name", &self.inner.name)
            .field("len", &self.len())
            .field("config", &**self.inner.config.load())
            .finish()
    }
}

impl<T> WorkQueueBuilder<T> {
    /// How many items the queue holds (default 1024).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.config.capacity = capacity;
        self
    }

    /// What a full queue does with new work (default [`Overflow::RejectNew`]).
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.config.overflow = overflow;
        self
    }

    /// Enables CoDel shedding.
    pub fn codel(mut self, codel: CodelConfig) -> Self {
        self.config.codel = Some(codel);
        self
    }

    /// Serves the newest item first while overloaded.
    pub fn adaptive_lifo(mut self, enabled: bool) -> Self {
        self.config.adaptive_lifo = enabled;
        self
    }

    /// Replaces every setting with `config`.
    pub fn config(mut self, config: QueueConfig) -> Self {
        self.config = config;
        self
    }

    /// The clock that times queue delay and deadlines (default: [`Clock::system`]).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Receives every item shed from the queue with the reason, e.g. to answer its caller.
    ///
    /// Called outside the queue's lock; it must not block. A handler that panics loses only
    /// that item: the panic is caught and logged, the other shed items still reach the
    /// handler, and the push or pop that shed them goes on (a push so reports its item
    /// accepted, which it was).
    pub fn on_shed(mut self, handler: impl Fn(T, Overloaded) + Send + Sync + 'static) -> Self {
        self.on_shed = Some(Box::new(handler));
        self
    }

    /// Recognises items whose caller has gone (checked under the queue's lock: it must be
    /// cheap). A full queue frees their places at the head of each class before it refuses or
    /// evicts live work, and drops them without the shed handler or a rejection: no one is
    /// left to answer, and the queue turned nothing away.
    #[cfg(feature = "tower")]
    pub(crate) fn abandoned(mut self, check: impl Fn(&T) -> bool + Send + Sync + 'static) -> Self {
        self.abandoned = Some(Box::new(check));
        self
    }

    /// Builds the queue, or says which setting is out of range.
    pub fn build(self) -> Result<WorkQueue<T>, ConfigError> {
        self.config.validate()?;
        Ok(WorkQueue {
            inner: Arc::new(Inner {
                metrics: AdmissionMetrics::new("queue", &self.name),
                name: Arc::from(self.name),
                config: ArcSwap::from_pointee(self.config),
                clock: self.clock,
                state: Mutex::new(State {
                    classes: Default::default(),
                    len: 0,
                    closed: false,
                    codel: Codel::default(),
                    #[cfg(test)]
                    examined: 0,
                }),
                items: Notify::new(),
                space: Notify::new(),
                on_shed: self.on_shed,
                abandoned: self.abandoned,
                last_delay_nanos: AtomicU64::new(0),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use headroom_core::ManualClock;

    use super::*;

    /// A push into a full queue looks at a bounded number of entries to find expired ones,
    /// however long the queue: each expired entry once, plus one per class.
    #[test]
    fn a_push_into_a_full_queue_examines_a_bounded_number_of_entries() {
        const CAPACITY: usize = 100_000;
        let manual = ManualClock::new();
        let clock = manual.clock();
        let queue = WorkQueue::builder("q")
            .capacity(CAPACITY)
            .clock(clock.clone())
            .build()
            .unwrap();
        let soon = Enqueue::new().deadline(clock.now() + Duration::from_millis(10));
        let later = Enqueue::new().deadline(clock.now() + Duration::from_secs(3_600));
        for item in 0..CAPACITY {
            let how = if item < 100 { soon } else { later };
            queue.try_push_with(item, how).unwrap();
        }
        manual.advance(Duration::from_millis(10));
        let examined = || queue.inner.state.lock().examined;
        let before = examined();
        // The first 100 pushes take the places of the 100 expired items; the rest are refused.
        for item in 0..1_000 {
            let pushed = queue.try_push_with(CAPACITY + item, later);
            assert_eq!(pushed.is_ok(), item < 100, "push {item}");
        }
        let per_push = (examined() - before) as f64 / 1_000.0;
        assert!(per_push <= 4.0, "{per_push} entries examined per push");
        assert_eq!(queue.len(), CAPACITY);
    }

    /// Abandoned items cost a push into a full queue what expired ones do, and leave
    /// uncounted: neither shed nor refused.
    #[cfg(feature = "tower")]
    #[test]
    fn abandoned_items_free_their_places_at_the_cost_of_expired_ones() {
        use std::sync::atomic::AtomicUsize;

        const CAPACITY: usize = 100_000;
        // Items below this number have been abandoned by their callers.
        let gone = Arc::new(AtomicUsize::new(0));
        let shed = Arc::new(AtomicUsize::new(0));
        let queue = WorkQueue::builder("q")
            .capacity(CAPACITY)
            .abandoned({
                let gone = Arc::clone(&gone);
                move |item: &usize| *item < gone.load(Ordering::Relaxed)
            })
            .on_shed({
                let shed = Arc::clone(&shed);
                move |_, _| {
                    shed.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build()
            .unwrap();
        for item in 0..CAPACITY {
            queue.try_push(item).unwrap();
        }
        gone.store(100, Ordering::Relaxed);
        let examined = || queue.inner.state.lock().examined;
        let before = examined();
        // The first 100 pushes take the places of the 100 abandoned items; the rest are refused.
        for item in 0..1_000 {
            let pushed = queue.try_push(CAPACITY + item);
            assert_eq!(pushed.is_ok(), item < 100, "push {item}");
        }
        let per_push = (examined() - before) as f64 / 1_000.0;
        assert!(per_push <= 4.0, "{per_push} entries examined per push");
        assert_eq!(queue.len(), CAPACITY);
        assert_eq!(
            shed.load(Ordering::Relaxed),
            0,
            "abandoned items are not shed"
        );
        let rejected = |reason| queue.rejected(Priority::Default, reason);
        assert_eq!(rejected(Reason::QueueFull), 900);
        assert_eq!(
            rejected(Reason::Evicted) + rejected(Reason::DeadlineExpired),
            0
        );
    }
}
