//! Invalidation across instances: every write publishes a small message on an
//! [`InvalidationBus`]; every other instance drops the keys from its L1.
//!
//! Messages carry no values: the origin instance, its sequence number, the send time, and
//! the keys (or "everything"). Lost messages are detected three ways, and each makes L1 safe
//! again by flushing it (and bypassing it while the subscription is down):
//!
//! - the bus reports a loss ([`BusEvent::Lost`]: lag, disconnection, server restart or
//!   failover): L1 is flushed and bypassed until [`BusEvent::Live`];
//! - an origin's sequence numbers jump: L1 is flushed;
//! - silence: every instance publishes a ping each `ping_interval`, its own included. When
//!   nothing (not even its own ping) arrives for `max_silence`, the subscription is taken as
//!   dead: L1 is flushed and bypassed until a message arrives. When one origin falls silent
//!   while others are heard (it crashed, or its messages stopped getting out), L1 is flushed
//!   once and the origin no longer waited for. A publisher sends again, under the same
//!   sequence numbers, what the bus refused, so an origin that speaks again after a cut
//!   shows no gap; one whose messages were taken by the bus and then lost does.
//!
//! An instance that stops gracefully ([`Cache::shutdown`](crate::Cache::shutdown)) sends its
//! last keys and a goodbye: the others stop expecting it and flush nothing, unless it had to
//! give up on some of those keys (its goodbye then shows a gap).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use headroom_core::bus::{BusEvent, DynInvalidationBus, InvalidationBus, Subscription};
use headroom_core::metrics::{Counter, Gauge, Histogram};
use headroom_core::{Clock, Key};
use headroom_core::{counter, gauge, histogram};
use indexmap::IndexSet;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use crate::hides::MAX_HIDDEN_TAGS;

/// The first byte of every message; a message of another format is counted and ignored.
pub(crate) const FORMAT_VERSION: u8 = 1;

/// The settings of invalidation across instances, loadable with serde (feature `serde`).
///
/// The staleness bound is `max_silence`: no instance serves from L1 a value invalidated on
/// another instance longer ago than that (plus the runtime's scheduling delay), whatever
/// happens to the bus.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize, serde::Serialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct InvalidationConfig {
    /// How often each instance publishes a liveness ping.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub ping_interval: Duration,
    /// How long the bus may stay silent before L1 is flushed and bypassed: the staleness
    /// bound. At least twice `ping_interval`.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub max_silence: Duration,
    /// The most keys waiting to be published; beyond it the pending keys are replaced by one
    /// "flush" message, which empties the other instances' L1 (their L2 entries stay
    /// visible).
    pub max_pending_keys: usize,
}

impl Default for InvalidationConfig {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_millis(500),
            max_silence: Duration::from_secs(2),
            max_pending_keys: 1024,
        }
    }
}

impl InvalidationConfig {
    pub(crate) fn validate(&self) -> Result<(), &'static str> {
        if self.ping_interval.is_zero() {
            return Err("invalidation ping_interval must be greater than zero");
        }
        if self.max_silence < self.ping_interval.saturating_mul(2) {
            return Err("invalidation max_silence must be at least twice ping_interval");
        }
        if self.max_pending_keys == 0 {
            return Err("invalidation max_pending_keys must be at least 1");
        }
        Ok(())
    }
}

/// What a message asks of the instances receiving it.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum Action<'a> {
    /// Liveness only.
    Ping,
    /// The origin shuts down: stop expecting its pings.
    Bye,
    /// Drop these keys (their L2 key parts) from L1.
    #[serde(borrow)]
    Keys(Vec<&'a [u8]>),
    /// Drop everything from L1.
    Clear,
    /// Drop every entry carrying one of these tags, in L1 and (hidden) in L2.
    #[serde(borrow)]
    Tags(Vec<&'a str>),
    /// Drop everything from L1 only: more keys were written than one message carries.
    Flush,
    /// These keys were written, but the writer could not update L2, which may still hold an
    /// older copy: drop them from L1, do not read them from L2, and delete them from L2.
    #[serde(borrow)]
    Outdated(Vec<&'a [u8]>),
}

/// One invalidation message (after the format byte).
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Message<'a> {
    pub(crate) origin: u64,
    pub(crate) seq: u64,
    pub(crate) sent_unix_ms: u64,
    #[serde(borrow)]
    pub(crate) action: Action<'a>,
}

impl Message<'_> {
    pub(crate) fn encode(&self) -> Bytes {
        let mut out = vec![FORMAT_VERSION];
        // Serializing into a Vec cannot fail for these types.
        out.extend(postcard::to_stdvec(self).unwrap_or_default());
        Bytes::from(out)
    }
}

/// Decodes a message; `None` for anything else (another format, foreign or corrupt bytes).
pub(crate) fn decode(bytes: &[u8]) -> Option<Message<'_>> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, body)) => postcard::from_bytes(body).ok(),
        _ => None,
    }
}

/// What the cache does on behalf of the bus.
pub(crate) trait Local: Send + Sync + 'static {
    /// Drops keys (as L2 key parts) from L1 and detaches their loads in flight.
    fn invalidate_keys(&self, keys: &[&[u8]]);
    /// Like `invalidate_keys`, and the keys' L2 copies are outdated (see [`Action::Outdated`]).
    fn outdated_keys(&self, keys: &[&[u8]]);
    /// Drops everything from L1 and detaches every load in flight.
    fn flush(&self);
    /// Messages may have been lost: flushes, and learns hides made elsewhere from L2 again.
    fn messages_lost(&self);
    /// Flushes L1 and stops reading L2 entries created at or before `at_unix_ms`.
    fn clear(&self, at_unix_ms: u64);
    /// Flushes L1 and stops reading L2 entries carrying `tag` created at or before
    /// `at_unix_ms`.
    fn invalidate_tag(&self, tag: &str, at_unix_ms: u64);
}

/// Why L1 was flushed, the label of `headroom_cache_invalidation_flushes_total`.
#[derive(Clone, Copy)]
enum Flush {
    Lost,
    Silence,
    Gap,
    Clear,
    Tag,
    Overflow,
}

struct InvalidationMetrics {
    sent: Counter,
    publish_errors: Counter,
    received: Counter,
    invalid: Counter,
    gaps: Counter,
    flushes: [Counter; 6],
    healthy: Gauge,
    lag: Histogram,
}

impl InvalidationMetrics {
    fn new(cache: &str) -> Self {
        let name = cache.to_owned();
        let flush = |reason: &'static str| counter!("headroom_cache_invalidation_flushes_total", "cache" => name.clone(), "reason" => reason);
        Self {
            sent: counter!("headroom_cache_invalidation_sent_total", "cache" => name.clone()),
            publish_errors: counter!("headroom_cache_invalidation_publish_errors_total", "cache" => name.clone()),
            received: counter!("headroom_cache_invalidation_received_total", "cache" => name.clone()),
            invalid: counter!("headroom_cache_invalidation_invalid_total", "cache" => name.clone()),
            gaps: counter!("headroom_cache_invalidation_gaps_total", "cache" => name.clone()),
            flushes: [
                flush("lost"),
                flush("silence"),
                flush("gap"),
                flush("clear"),
                flush("tag"),
                flush("overflow"),
            ],
            healthy: gauge!("headroom_cache_invalidation_healthy", "cache" => name.clone()),
            lag: histogram!("headroom_cache_invalidation_lag_seconds", "cache" => name.clone()),
        }
    }
}

/// Keys waiting for the publisher task.
#[derive(Default)]
struct Outbox {
    /// Each key once, in the order first queued: a key written again while queued does not
    /// fill the outbox.
    keys: IndexSet<Vec<u8>>,
    /// Keys written whose L2 copies could not be updated.
    outdated: IndexSet<Vec<u8>>,
    /// Each tag once, with the time of its latest invalidation (Unix ms): the message hides
    /// the entries carrying it written up to then.
    tags: HashMap<String, u64>,
    /// More keys than `max_pending_keys` were queued: send a flush instead of the keys.
    overflowed: bool,
    /// A clear, with the time of the latest (Unix ms): the message hides every entry written
    /// up to then.
    clear: Option<u64>,
}

/// The most bytes of keys or tags one message carries: under every bus's limit on a message
/// (the memory bus takes 64 KiB), so that a large queue goes out as several messages rather
/// than one the bus refuses each time it is sent again.
const MESSAGE_BYTES: usize = 48 * 1024;

/// How many items of these lengths, from the first, one message carries (at least one: a key
/// or tag is far below the limit).
fn fitting(lengths: impl Iterator<Item = usize>) -> usize {
    let mut bytes = 0;
    lengths
        .take_while(|len| {
            // Each item also takes its length, a varint of at most 3 bytes here.
            bytes += len + 3;
            bytes <= MESSAGE_BYTES
        })
        .count()
        .max(1)
}

impl Outbox {
    /// Past `max_keys` keys, one flush stands for them all. Outdated keys count apart, up to
    /// `max_outdated`, so that a burst of writes does not drop them (a flush empties L1, not
    /// the old L2 copies the others would read back); past that many, they are given up too,
    /// and the others read those copies until they are deleted or expire.
    fn bound(&mut self, max_keys: usize, max_outdated: usize) {
        if self.overflowed || self.keys.len() > max_keys {
            self.keys = IndexSet::new();
            self.overflowed = true;
        }
        if self.outdated.len() > max_outdated {
            self.outdated = IndexSet::new();
            self.overflowed = true;
        }
    }

    /// A clear at `at` covers every key queued before it (outdated ones too: their L2 copies
    /// were written before it), and every tag invalidated up to then; a tag invalidated
    /// later still hides what the clear does not.
    fn make_clear(&mut self, at: u64) {
        let at = self.clear.map_or(at, |queued| queued.max(at));
        let mut tags = std::mem::take(&mut self.tags);
        tags.retain(|_, tag_at| *tag_at > at);
        *self = Self {
            clear: Some(at),
            tags,
            ..Self::default()
        };
    }

    /// Queues `tag` invalidated at `at`, unless a queued clear covers it.
    fn add_tag(&mut self, tag: &str, at: u64) {
        if self.clear.is_some_and(|clear_at| at <= clear_at) {
            return;
        }
        match self.tags.get_mut(tag) {
            Some(queued) => *queued = (*queued).max(at),
            None => {
                self.tags.insert(tag.to_owned(), at);
            }
        }
        self.bound_tags();
    }

    /// Past as many tags as an instance hides one by one (beyond which it hides everything
    /// as old as the newest), one clear stands for them: the queue stays bounded while the
    /// bus is out of reach.
    fn bound_tags(&mut self) {
        if self.tags.len() > MAX_HIDDEN_TAGS {
            let newest = self.tags.values().copied().max().unwrap_or(0);
            self.make_clear(newest);
        }
    }

    fn is_empty(&self) -> bool {
        self.clear.is_none()
            && !self.overflowed
            && self.keys.is_empty()
            && self.outdated.is_empty()
            && self.tags.is_empty()
    }
}

/// The cache's side of invalidation: state shared with the publisher and listener tasks.
pub(crate) struct Invalidation {
    shared: Arc<Shared>,
    /// Dropped with the cache, which stops both tasks (the publisher says goodbye first).
    closer: Arc<Closer>,
}

/// Stops the tasks of one cache: at once on [`shutdown`](Closer::shutdown), or when the cache
/// is dropped (the stop sender goes with it).
struct Closer {
    shared: Arc<Shared>,
    stop: watch::Sender<()>,
    /// Turns true once the publisher has said goodbye, which every shutdown waits for (a
    /// shutdown cut short by its caller leaves the publisher at it, and the next one waits
    /// again); closed when the publisher task ends.
    goodbye: Mutex<Option<watch::Receiver<bool>>>,
}

impl Closer {
    /// Tells the tasks to stop: the publisher sends what is queued, then the goodbye. L1 is
    /// no longer used from here on.
    fn signal(&self) {
        self.shared.stopped.store(true, Ordering::Release);
        self.shared.set_healthy(false);
        self.stop.send_replace(());
    }

    async fn shutdown(&self) {
        self.signal();
        let goodbye = self.goodbye.lock().clone();
        if let Some(mut goodbye) = goodbye {
            // An error means the publisher task is gone (the runtime is shutting down).
            let _ = goodbye.wait_for(|&said| said).await;
        }
    }
}

/// Caches to shut down together, such as every cache of one service.
///
/// Give it to each cache with
/// [`CacheBuilder::shutdown_group`](crate::CacheBuilder::shutdown_group); then
/// [`shutdown`](Self::shutdown) stops them all as [`Cache::shutdown`](crate::Cache::shutdown)
/// does. A cache dropped before that is left out.
#[derive(Clone, Default)]
pub struct ShutdownGroup {
    members: Arc<Mutex<Vec<Weak<Closer>>>>,
}

impl ShutdownGroup {
    /// An empty group.
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn add(&self, invalidation: &Invalidation) {
        let mut members = self.members.lock();
        members.retain(|member| member.strong_count() > 0);
        members.push(Arc::downgrade(&invalidation.closer));
    }

    /// Shuts down every cache of the group that is still alive: each sends what it has
    /// queued and says goodbye, and stops using its L1. Every cache is told to stop at once,
    /// and they finish together; a shutdown cut short (a timeout around it) leaves them
    /// finishing, and calling it again waits for them.
    pub async fn shutdown(&self) {
        let members: Vec<Arc<Closer>> = self
            .members
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for member in &members {
            member.signal();
        }
        futures_util::future::join_all(members.iter().map(|member| member.shutdown())).await;
    }
}

impl std::fmt::Debug for ShutdownGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownGroup")
            .field("members", &self.members.lock().len())
            .finish()
    }
}

struct Shared {
    bus: DynInvalidationBus,
    channel: Key,
    config: InvalidationConfig,
    clock: Clock,
    origin: u64,
    /// Whether L1 may be used: the subscription is live and not silent.
    healthy: AtomicBool,
    /// Shut down: no message is heard any more, so L1 is never used again.
    stopped: AtomicBool,
    outbox: Mutex<Outbox>,
    /// The most outdated keys queued: as many as the L2 deletes a cache owes and remembers
    /// (`CacheConfig::l2_max_pending_deletes`), since each is one.
    max_outdated: usize,
    wake: Notify,
    seq: AtomicU64,
    metrics: InvalidationMetrics,
}

impl Invalidation {
    /// The invalidation state of a cache; L1 stays bypassed until [`spawn`](Self::spawn)
    /// has started the tasks and the subscription is live.
    pub(crate) fn new(
        bus: DynInvalidationBus,
        channel: Key,
        config: InvalidationConfig,
        max_outdated: usize,
        clock: Clock,
        cache_name: &str,
    ) -> Self {
        let shared = Arc::new(Shared {
            bus,
            channel,
            config,
            max_outdated,
            clock,
            origin: fastrand::u64(..),
            healthy: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            outbox: Mutex::new(Outbox::default()),
            wake: Notify::new(),
            seq: AtomicU64::new(0),
            metrics: InvalidationMetrics::new(cache_name),
        });
        shared.metrics.healthy.set(0.0);
        Self {
            closer: Arc::new(Closer {
                shared: Arc::clone(&shared),
                stop: watch::channel(()).0,
                goodbye: Mutex::new(None),
            }),
            shared,
        }
    }

    /// Starts the publisher and listener tasks, which act on `local` (once it is fully built:
    /// a failed upgrade means the cache is gone).
    pub(crate) fn spawn(&self, local: Weak<dyn Local>) {
        let stop = &self.closer.stop;
        let (said_goodbye, goodbye) = watch::channel(false);
        tokio::spawn(publish(
            Arc::clone(&self.shared),
            stop.subscribe(),
            said_goodbye,
        ));
        *self.closer.goodbye.lock() = Some(goodbye);
        tokio::spawn(listen(Arc::clone(&self.shared), local, stop.subscribe()));
    }

    /// Whether L1 may be read and filled.
    pub(crate) fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Acquire) && !self.shared.stopped.load(Ordering::Acquire)
    }

    /// Sends what is queued and a goodbye, stops listening and stops using L1.
    pub(crate) async fn shutdown(&self) {
        self.closer.shutdown().await;
    }

    /// Queues keys (as L2 key parts) for the next message.
    pub(crate) fn publish_keys<'k>(&self, keys: impl IntoIterator<Item = &'k [u8]>) {
        self.shared.queue_keys(keys, false);
    }

    /// Queues keys (as L2 key parts) whose L2 copies this instance could not update.
    pub(crate) fn publish_outdated_keys<'k>(&self, keys: impl IntoIterator<Item = &'k [u8]>) {
        self.shared.queue_keys(keys, true);
    }

    /// A handle that queues keys for the next message without keeping the tasks alive.
    pub(crate) fn publisher(&self) -> KeyPublisher {
        KeyPublisher(Arc::downgrade(&self.shared))
    }

    /// Queues a tag invalidated at `at_unix_ms` for the next message.
    pub(crate) fn publish_tag(&self, tag: &str, at_unix_ms: u64) {
        self.shared.outbox.lock().add_tag(tag, at_unix_ms);
        self.shared.wake.notify_one();
    }

    /// Queues a "clear" made at `at_unix_ms` for the next message.
    pub(crate) fn publish_clear(&self, at_unix_ms: u64) {
        self.shared.outbox.lock().make_clear(at_unix_ms);
        self.shared.wake.notify_one();
    }
}

/// Queues keys for the next message of a cache's invalidation, while the cache lives.
pub(crate) struct KeyPublisher(Weak<Shared>);

impl KeyPublisher {
    pub(crate) fn publish_keys<'k>(&self, keys: impl IntoIterator<Item = &'k [u8]>) {
        if let Some(shared) = self.0.upgrade() {
            shared.queue_keys(keys, false);
        }
    }
}

impl Shared {
    fn queue_keys<'k>(&self, keys: impl IntoIterator<Item = &'k [u8]>, outdated: bool) {
        let mut keys = keys.into_iter().peekable();
        if keys.peek().is_none() {
            // Nothing to announce: no need to wake the publisher.
            return;
        }
        let mut outbox = self.outbox.lock();
        let keys = keys.map(<[u8]>::to_vec);
        if outdated {
            // Kept through an overflow of the other keys: a flush empties L1, not the old L2
            // copies the others would read back. Nor does a queued clear stand for them: an
            // outdated copy may be newer than the clear's call.
            outbox.outdated.extend(keys);
        } else if !outbox.overflowed && outbox.clear.is_none() {
            // A queued clear flushes L1 when it arrives, after these writes, so it stands for
            // their keys; so does a queued flush.
            outbox.keys.extend(keys);
        }
        outbox.bound(self.config.max_pending_keys, self.max_outdated);
        drop(outbox);
        self.wake.notify_one();
    }

    /// Publishes one message, sent now; whether the bus took it.
    async fn send(&self, action: Action<'_>) -> bool {
        self.send_at(action, self.clock.unix_millis()).await
    }

    /// Publishes one message dated `unix_ms` (a clear's or a tag's hide time: a message the
    /// bus refused for a while must not hide what was written meanwhile); whether the bus
    /// took it.
    async fn send_at(&self, action: Action<'_>, unix_ms: u64) -> bool {
        // Only the publisher task sends. A number is used up only by a message the bus took
        // (or skipped on purpose, see `publish`): what failed is sent again under the same
        // number, so receivers see no gap (and one that failed yet arrived is merely applied
        // twice). A message the bus took and then lost still shows as a gap.
        let seq = self.seq.load(Ordering::Relaxed);
        let message = Message {
            origin: self.origin,
            seq,
            sent_unix_ms: unix_ms,
            action,
        };
        match self.bus.publish(&self.channel, message.encode()).await {
            Ok(()) => {
                self.seq.store(seq + 1, Ordering::Relaxed);
                self.metrics.sent.increment(1);
                true
            }
            Err(error) => {
                self.metrics.publish_errors.increment(1);
                tracing::debug!(%error, "invalidation message not published");
                false
            }
        }
    }

    /// Sends what `outbox` holds, emptying it part by part; at the first publish that fails,
    /// stops and leaves the rest in it.
    async fn send_outbox(&self, outbox: &mut Outbox) -> bool {
        if let Some(at) = outbox.clear {
            // A clear covers every key and tag queued before it; tags invalidated later follow.
            if !self.send_at(Action::Clear, at).await {
                return false;
            }
            outbox.clear = None;
        }
        if outbox.overflowed {
            if !self.send(Action::Flush).await {
                return false;
            }
            outbox.overflowed = false;
        }
        // Several messages when the queue is large: each fits any bus (see MESSAGE_BYTES).
        while !outbox.keys.is_empty() {
            let n = fitting(outbox.keys.iter().map(Vec::len));
            let keys: Vec<&[u8]> = outbox.keys.iter().take(n).map(Vec::as_slice).collect();
            if !self.send(Action::Keys(keys)).await {
                return false;
            }
            outbox.keys.drain(..n);
        }
        while !outbox.outdated.is_empty() {
            let n = fitting(outbox.outdated.iter().map(Vec::len));
            let keys: Vec<&[u8]> = outbox.outdated.iter().take(n).map(Vec::as_slice).collect();
            if !self.send(Action::Outdated(keys)).await {
                return false;
            }
            outbox.outdated.drain(..n);
        }
        // Oldest first, each message dated by its newest tag: a tag is hidden up to at most
        // the time of a tag invalidated after it and sent with it.
        let mut tags: Vec<(String, u64)> = outbox.tags.drain().collect();
        tags.sort_unstable_by_key(|&(_, at)| at);
        let mut sent = 0;
        while sent < tags.len() {
            let n = fitting(tags[sent..].iter().map(|(tag, _)| tag.len()));
            let batch = &tags[sent..sent + n];
            let at = batch[n - 1].1;
            if !self
                .send_at(
                    Action::Tags(batch.iter().map(|(tag, _)| tag.as_str()).collect()),
                    at,
                )
                .await
            {
                outbox.tags.extend(tags.drain(sent..));
                return false;
            }
            sent += n;
        }
        true
    }

    /// Queues again, ahead of what was queued since, what could not be sent.
    fn put_back(&self, mut unsent: Outbox) {
        let mut outbox = self.outbox.lock();
        let newer = std::mem::take(&mut *outbox);
        if let Some(at) = newer.clear {
            unsent.make_clear(at);
        }
        for (tag, at) in &newer.tags {
            unsent.add_tag(tag, *at);
        }
        // A clear stands for every key, queued before it or since (it flushes L1 when
        // received, after those writes), but not for outdated keys queued since.
        if unsent.clear.is_none() {
            unsent.keys.extend(newer.keys);
        }
        unsent.outdated.extend(newer.outdated);
        unsent.overflowed |= newer.overflowed;
        unsent.bound(self.config.max_pending_keys, self.max_outdated);
        *outbox = unsent;
    }

    fn set_healthy(&self, healthy: bool) {
        let healthy = healthy && !self.stopped.load(Ordering::Acquire);
        if self.healthy.swap(healthy, Ordering::AcqRel) != healthy {
            self.metrics.healthy.set(if healthy { 1.0 } else { 0.0 });
            if healthy {
                tracing::info!("invalidation bus healthy; L1 in use again");
            } else {
                tracing::warn!("invalidation bus unhealthy; L1 flushed and bypassed");
            }
        }
    }
}

/// The publisher task: one message at a time, in sequence order, batching every key queued
/// while the previous message was in flight; a ping when nothing was sent for
/// `ping_interval`; what the bus refused, again after a pause (in order, so that receivers
/// see no gap); when told to stop, what is still queued (once), then the goodbye. What is
/// queued after the goodbye goes out the same way, until the cache is dropped.
async fn publish(
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<()>,
    said_goodbye: watch::Sender<bool>,
) {
    let mut stopping = false;
    // The cache is gone: nothing more comes once the outbox is found empty.
    let mut dropped = false;
    // Whether anything was sent (or given up) since the last goodbye.
    let mut bye_due = true;
    let mut failures = 0;
    let mut last_sent = shared.clock.now();
    loop {
        let mut outbox = std::mem::take(&mut *shared.outbox.lock());
        if !outbox.is_empty() {
            bye_due = true;
            let sent = shared.send_outbox(&mut outbox).await;
            last_sent = shared.clock.now();
            if sent {
                failures = 0;
            } else if stopping {
                // Given up on the rest. Skip a sequence number (past the refused message's,
                // which may have arrived all the same) so that the next message, the goodbye
                // at the latest, shows a gap: the others flush rather than retire this
                // instance without these keys.
                shared.seq.fetch_add(2, Ordering::Relaxed);
            } else {
                shared.put_back(outbox);
                failures += 1;
                tokio::select! {
                    () = shared.clock.sleep(retry_pause(failures, shared.config.ping_interval)) => {}
                    _ = stopped.changed() => stopping = true,
                }
            }
        } else if stopping {
            if bye_due {
                shared.send(Action::Bye).await;
                bye_due = false;
                said_goodbye.send_replace(true);
            }
            if dropped {
                return;
            }
            // Keys queued from here on (a write that lands late, its caller gone) still go
            // out, then another goodbye. The others have retired this instance, so they take
            // the message for a gap and flush: costly, but never stale.
            tokio::select! {
                () = shared.wake.notified() => {}
                changed = stopped.changed() => dropped = changed.is_err(),
            }
        } else {
            // Pings keep their beat however often the task is woken with nothing to send.
            let quiet = shared.clock.now().saturating_duration_since(last_sent);
            tokio::select! {
                () = shared.wake.notified() => {}
                () = shared.clock.sleep(shared.config.ping_interval.saturating_sub(quiet)) => {
                    shared.send(Action::Ping).await;
                    last_sent = shared.clock.now();
                }
                // Keys may have been queued since the outbox was last taken: the next turn
                // sends them, and the goodbye only once it finds the outbox empty.
                _ = stopped.changed() => stopping = true,
            }
        }
    }
}

/// The pause after `failures` publishes in a row failed: 10 ms, doubling up to `ping_interval`.
fn retry_pause(failures: u32, ping_interval: Duration) -> Duration {
    Duration::from_millis(10)
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(ping_interval)
}

/// What the listener knows of one other instance.
struct Origin {
    next_seq: u64,
    heard: Instant,
    /// Not heard for `max_silence` while the channel was: flushed for once, not waited for
    /// any more.
    silent: bool,
    /// This instance lost messages since the origin was last heard: L1 was flushed and stays
    /// bypassed until the origin speaks again (or falls silent), so the numbers its next
    /// message skips, sent during the loss or since, are covered.
    resync: bool,
}

/// After this instance lost messages: each origin's next message sets its count afresh.
fn resync(origins: &mut HashMap<u64, Origin>) {
    for origin in origins.values_mut() {
        origin.resync = true;
    }
}

/// The channel is heard again after a loss: every origin to hear from before L1 is used
/// again gets a whole `max_silence` from now to speak.
fn await_origins(origins: &mut HashMap<u64, Origin>, now: Instant) {
    for origin in origins.values_mut() {
        if origin.resync && !origin.silent {
            origin.heard = now;
        }
    }
}

/// Silent origins remembered (most are crashed instances, which never speak again); past
/// this, the one silent longest is forgotten, and should it speak again, that is a gap.
const MAX_SILENT_ORIGINS: usize = 256;

/// Marks the origins not heard for `silence` as silent; whether any newly fell silent.
fn mark_silent(origins: &mut HashMap<u64, Origin>, now: Instant, silence: Duration) -> bool {
    let mut fell_silent = false;
    for origin in origins.values_mut() {
        if !origin.silent && now.saturating_duration_since(origin.heard) >= silence {
            origin.silent = true;
            fell_silent = true;
        }
    }
    while origins.values().filter(|origin| origin.silent).count() > MAX_SILENT_ORIGINS {
        let longest = origins
            .iter()
            .filter(|(_, origin)| origin.silent)
            .min_by_key(|(_, origin)| origin.heard)
            .map(|(id, _)| *id);
        if let Some(id) = longest {
            origins.remove(&id);
        }
    }
    fell_silent
}

/// The listener task: subscribes (again, after a failure), applies messages, watches for
/// lost messages and silence.
async fn listen(shared: Arc<Shared>, local: Weak<dyn Local>, mut stopped: watch::Receiver<()>) {
    let lost = |reason: Flush| {
        shared.metrics.flushes[reason as usize].increment(1);
        match local.upgrade() {
            Some(local) => {
                local.messages_lost();
                true
            }
            None => false,
        }
    };
    // Back to using L1 once every origin heard before the loss has spoken again or fallen
    // silent. Loads that read L2 while messages were being lost must not fill it: the flush
    // detaches them (L1 itself is already empty). False when the cache is gone.
    let recover = |origins: &HashMap<u64, Origin>| {
        if shared.healthy.load(Ordering::Acquire)
            || origins
                .values()
                .any(|origin| origin.resync && !origin.silent)
        {
            return true;
        }
        match local.upgrade() {
            Some(local) => {
                local.flush();
                shared.set_healthy(true);
                true
            }
            None => false,
        }
    };
    let mut origins: HashMap<u64, Origin> = HashMap::new();
    loop {
        let mut subscription: Subscription = tokio::select! {
            subscribed = shared.bus.subscribe(&shared.channel) => match subscribed {
                Ok(subscription) => subscription,
                Err(error) => {
                    tracing::debug!(%error, "invalidation subscribe failed; retrying");
                    tokio::select! {
                        () = shared.clock.sleep(shared.config.ping_interval) => continue,
                        _ = stopped.changed() => return,
                    }
                }
            },
            _ = stopped.changed() => return,
        };
        let mut live = false;
        // This instance's own messages come back later than `max_silence`: the channel flows
        // but is behind, and is not taken for live until one comes back in time.
        let mut behind = false;
        let mut heard = shared.clock.now();
        let silence = shared.config.max_silence;
        // Checked when the oldest of the last messages heard (from the channel, and from
        // each origin) turns `max_silence` old, not on a beat: the bound is exact. Messages
        // only move these times later, so a check that finds nothing due just moves on.
        let mut next_check = heard + silence;
        // An origin's silence went unchecked while the channel itself was quiet: check at the
        // next message.
        let mut check_on_message = false;
        loop {
            let wait = next_check.saturating_duration_since(shared.clock.now());
            let event = tokio::select! {
                event = subscription.next_event() => event,
                () = shared.clock.sleep(wait) => {
                    let now = shared.clock.now();
                    if live && now.saturating_duration_since(heard) >= silence {
                        live = false;
                        shared.set_healthy(false);
                        resync(&mut origins);
                        if !lost(Flush::Silence) { return; }
                    }
                    // An origin that fell silent may have written without telling: flush
                    // once and stop waiting for it. Should it speak again, its sequence
                    // number shows whether anything it sent meanwhile was lost. Only while
                    // the channel is heard (this instance's own pings come every
                    // `ping_interval`): when it is quiet too, the silence is this
                    // instance's, which the check above covers.
                    let hearing = live && now.saturating_duration_since(heard) < silence / 2;
                    if hearing && mark_silent(&mut origins, now, silence) && !lost(Flush::Silence) {
                        return;
                    }
                    // An origin waited for since a loss may just have fallen silent.
                    if live && !recover(&origins) {
                        return;
                    }
                    check_on_message = live && !hearing;
                    next_check = if hearing {
                        let oldest = origins
                            .values()
                            .filter(|origin| !origin.silent)
                            .map(|origin| origin.heard)
                            .fold(heard, Instant::min);
                        oldest + silence
                    } else if live {
                        // Until the channel is heard again, only its own silence is due.
                        heard + silence
                    } else {
                        // Nothing is due until the channel is live again.
                        now + silence
                    };
                    continue;
                }
                _ = stopped.changed() => return,
            };
            match event {
                None => break,
                Some(BusEvent::Lost(reason)) => {
                    tracing::debug!(?reason, "invalidation messages lost");
                    live = false;
                    shared.set_healthy(false);
                    resync(&mut origins);
                    if !lost(Flush::Lost) {
                        return;
                    }
                }
                Some(BusEvent::Live) => {
                    live = true;
                    behind = false;
                    heard = shared.clock.now();
                    await_origins(&mut origins, heard);
                    if !recover(&origins) {
                        return;
                    }
                }
                Some(BusEvent::Message(bytes)) => {
                    let Some(message) = decode(&bytes) else {
                        shared.metrics.invalid.increment(1);
                        continue;
                    };
                    let now = shared.clock.now();
                    heard = now;
                    // Sent on this instance's own clock: how far behind the channel is. Not a
                    // clear's or a tag's, dated by the hide (which a refused publish delays).
                    let dated_by_send = !matches!(message.action, Action::Clear | Action::Tags(_));
                    if message.origin == shared.origin && dated_by_send {
                        let late = shared
                            .clock
                            .unix_millis()
                            .saturating_sub(message.sent_unix_ms);
                        let was_behind = behind;
                        behind = Duration::from_millis(late) >= silence;
                        if behind && !was_behind {
                            tracing::debug!(late_ms = late, "invalidation messages arrive late");
                            live = false;
                            shared.set_healthy(false);
                            resync(&mut origins);
                            if !lost(Flush::Silence) {
                                return;
                            }
                        }
                    }
                    if !live && !behind {
                        // Silent (or behind) until now: L1 was flushed and bypassed meanwhile.
                        live = true;
                        await_origins(&mut origins, now);
                    }
                    if std::mem::take(&mut check_on_message) {
                        next_check = now;
                    }
                    if message.origin == shared.origin {
                        if live && !recover(&origins) {
                            return;
                        }
                        continue;
                    }
                    shared.metrics.received.increment(1);
                    let lag = shared
                        .clock
                        .unix_millis()
                        .saturating_sub(message.sent_unix_ms);
                    shared.metrics.lag.record(Duration::from_millis(lag));
                    let known = origins.get_mut(&message.origin);
                    let gap = match &known {
                        // Numbers skipped since the loss are covered by its flush, unless the
                        // origin was silent before it (and so not waited for).
                        Some(origin) => {
                            (origin.silent || !origin.resync) && message.seq > origin.next_seq
                        }
                        // A new instance starts at 0; a later number means missed messages.
                        None => message.seq > 0,
                    };
                    match known {
                        Some(origin) => {
                            origin.next_seq = origin.next_seq.max(message.seq.saturating_add(1));
                            origin.heard = now;
                            origin.silent = false;
                            origin.resync = false;
                        }
                        None => {
                            origins.insert(
                                message.origin,
                                Origin {
                                    next_seq: message.seq.saturating_add(1),
                                    heard: now,
                                    silent: false,
                                    resync: false,
                                },
                            );
                        }
                    }
                    if live && !recover(&origins) {
                        return;
                    }
                    let Some(target) = local.upgrade() else {
                        return;
                    };
                    if gap {
                        shared.metrics.gaps.increment(1);
                        shared.metrics.flushes[Flush::Gap as usize].increment(1);
                        target.messages_lost();
                    }
                    match message.action {
                        Action::Ping => {}
                        Action::Bye => {
                            origins.remove(&message.origin);
                        }
                        Action::Keys(keys) => target.invalidate_keys(&keys),
                        Action::Outdated(keys) => target.outdated_keys(&keys),
                        Action::Clear => {
                            shared.metrics.flushes[Flush::Clear as usize].increment(1);
                            target.clear(message.sent_unix_ms);
                        }
                        Action::Tags(tags) => {
                            shared.metrics.flushes[Flush::Tag as usize].increment(1);
                            for tag in tags {
                                target.invalidate_tag(tag, message.sent_unix_ms);
                            }
                        }
                        Action::Flush => {
                            shared.metrics.flushes[Flush::Overflow as usize].increment(1);
                            target.flush();
                        }
                    }
                }
                Some(_) => {}
            }
        }
        // The bus shut the subscription: messages may be lost until a new one is live.
        shared.set_healthy(false);
        if !lost(Flush::Lost) {
            return;
        }
    }
}

/// Applies writes made by other programs, reported as full L2 keys starting with `prefix`,
/// until the subscription ends or the cache is dropped (`stopped` resolves; the subscription
/// is dropped with this task). While it reports a loss, L1 is flushed and bypassed.
pub(crate) async fn watch_external_writes(
    mut writes: Subscription,
    prefix: Vec<u8>,
    live: Arc<AtomicBool>,
    local: Weak<dyn Local>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        let event = tokio::select! {
            event = writes.next_event() => event,
            _ = &mut stopped => return,
        };
        let Some(event) = event else { break };
        let Some(local) = local.upgrade() else { return };
        match event {
            BusEvent::Message(key) => {
                if let Some(part) = key.strip_prefix(prefix.as_slice()) {
                    local.invalidate_keys(&[part]);
                }
            }
            BusEvent::Lost(_) => {
                live.store(false, Ordering::Release);
                local.flush();
            }
            // Writes made while the subscription was down are unknown: start L1 afresh.
            _ => {
                local.flush();
                live.store(true, Ordering::Release);
            }
        }
    }
    live.store(false, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let message = Message {
            origin: 7,
            seq: 42,
            sent_unix_ms: 1_700_000_000_000,
            action: Action::Keys(vec![b"a", b"bc"]),
        };
        let bytes = message.encode();
        assert!(bytes.len() < 32, "{} bytes", bytes.len());
        assert_eq!(decode(&bytes), Some(message));
        let outdated = Message {
            origin: 7,
            seq: 43,
            sent_unix_ms: 1_700_000_000_000,
            action: Action::Outdated(vec![b"a"]),
        };
        assert_eq!(decode(&outdated.encode()), Some(outdated));
        assert_eq!(decode(b""), None);
        assert_eq!(decode(&[FORMAT_VERSION + 1, 0, 0, 0, 0]), None);
        assert_eq!(decode(&bytes[..bytes.len() - 1]), None);
        assert_eq!(decode(&[FORMAT_VERSION, 0xff, 0xff, 0xff]), None);
    }

    struct Inert;

    impl Local for Inert {
        fn invalidate_keys(&self, _: &[&[u8]]) {}
        fn outdated_keys(&self, _: &[&[u8]]) {}
        fn flush(&self) {}
        fn messages_lost(&self) {}
        fn clear(&self, _: u64) {}
        fn invalidate_tag(&self, _: &str, _: u64) {}
    }

    /// Whatever wakes the publisher without giving it anything to send, it pings on its beat:
    /// the others must not take it for silent.
    #[tokio::test(start_paused = true)]
    async fn wakes_with_nothing_to_send_do_not_hold_back_the_pings() {
        use headroom_core::memory::MemoryBus;

        let bus = MemoryBus::new();
        let channel = headroom_core::Namespace::new("pings")
            .and_then(|ns| ns.key("~invalidation"))
            .expect("channel");
        let mut heard = bus.subscribe(&channel).await.expect("subscribe");
        let config = InvalidationConfig::default();
        let interval = config.ping_interval;
        let invalidation = Invalidation::new(
            DynInvalidationBus::new(bus),
            channel,
            config,
            10_000,
            Clock::system(),
            "pings",
        );
        let local: Arc<dyn Local> = Arc::new(Inert);
        invalidation.spawn(Arc::downgrade(&local));
        for _ in 0..8 {
            invalidation.shared.wake.notify_one();
            tokio::time::sleep(interval / 2).await;
        }
        let mut pings = 0;
        while let Some(Some(event)) = heard.next_event().now_or_never() {
            if let BusEvent::Message(bytes) = event
                && decode(&bytes).is_some_and(|m| m.action == Action::Ping)
            {
                pings += 1;
            }
        }
        assert!(pings >= 3, "{pings} pings in four ping intervals");
    }
}
