//! Hides: a [`clear`](crate::Cache::clear) or a tag's
//! [invalidation](crate::Cache::invalidate_tag) makes L2 entries created at or before its time
//! read as misses. Each instance remembers the hides it made or heard of, and each hide is
//! also kept in L2, so that an instance that missed the message (it lost it, or started
//! later) learns it there before it serves an entry the hide could cover.
//!
//! In L2 a hide is one key under `<l2 namespace>.hidden` (`c` for a clear, `t:<tag>` for a
//! tag) holding its time, written only over an older one and kept as long as an entry lives.
//! What an instance read there (or found absent) counts while the bus has been heard
//! throughout, with no loss of messages detected since; read while messages were not being
//! heard, it counts for `max_silence`. A hide made elsewhere afterwards arrives as a message,
//! or its loss is detected, within that bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use headroom_core::kv::{KvEntry, VersionAt};
use headroom_core::{Key, Namespace};
use parking_lot::Mutex;

use crate::envelope;
use crate::l2::L2;

/// The most tags remembered; past it, tags that can no longer hide a live entry (and tags
/// known not to be hidden) are forgotten, and then the cache hides everything as old as the
/// newest tag instead (a clear).
pub(crate) const MAX_HIDDEN_TAGS: usize = 10_000;

/// Ends the namespace of the hides, beside the entries' (`<l2 namespace>.hidden`).
pub(crate) const BESIDE: &str = ".hidden";

/// Where a hide's time sits in its L2 value: the whole value, a little-endian `u64`.
pub(crate) const VERSION_AT: VersionAt = VersionAt::new(0);

/// `clear_counts_at` when no read of the clear made while messages were heard is known.
const NO_HEARD_READ: u64 = u64::MAX;

/// The wall clock when a hide is read, in Unix milliseconds, and the latest time a hide can
/// plausibly carry: later, it is foreign bytes (kept, it would hide every entry until then).
#[derive(Clone, Copy)]
pub(crate) struct Wall {
    pub(crate) now: u64,
    pub(crate) latest: u64,
}

/// A hide that could cover an entry is not known for sure: learn it from L2 first.
#[derive(Debug)]
pub(crate) struct Unsure;

/// What a hide covers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Hide {
    All,
    Tag(Box<str>),
}

/// How what is known of the hides is to be taken (see [`Hides::hidden`]).
#[derive(Clone, Copy)]
pub(crate) enum Heard {
    /// Whether messages are being heard now.
    Now(bool),
    /// The hides the entry needs were just read from L2.
    Learned,
}

/// A read of the clear from L2 about to be made (see [`Hides::clear_read`]).
pub(crate) struct ClearRead(Read);

pub(crate) struct Hides {
    state: Mutex<State>,
    /// Counts the losses of messages detected: what was read from L2 before one no longer
    /// counts.
    losses: AtomicU64,
    /// How long what was read from L2 while messages were not being heard counts.
    unheard: Duration,
    /// The clear's time; the losses counted when it was last read from L2 while messages
    /// were heard (`NO_HEARD_READ`: none); and until when (nanoseconds after `origin`, 0:
    /// never read) its last read counts while messages are not heard. Out of the lock: an
    /// untagged entry's check takes none.
    clear_at: AtomicU64,
    clear_counts_at: AtomicU64,
    clear_unheard_until: AtomicU64,
    origin: Instant,
}

#[derive(Default)]
struct State {
    clear: Known,
    tags: HashMap<Box<str>, Known>,
}

/// One hide as this instance knows it.
#[derive(Clone, Copy, Default)]
struct Known {
    /// Entries created at or before this Unix millisecond are hidden (0: none known).
    at: u64,
    /// When L2 was last read for it.
    read: Option<Read>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Read {
    losses: u64,
    heard: bool,
    at: Instant,
}

impl Hides {
    pub(crate) fn new(unheard: Duration, origin: Instant) -> Self {
        Self {
            state: Mutex::new(State::default()),
            losses: AtomicU64::new(0),
            unheard,
            clear_at: AtomicU64::new(0),
            clear_counts_at: AtomicU64::new(NO_HEARD_READ),
            clear_unheard_until: AtomicU64::new(0),
            origin,
        }
    }

    /// Messages may have been lost: hides made elsewhere meanwhile are learned from L2 again.
    pub(crate) fn lost(&self) {
        self.losses.fetch_add(1, Ordering::AcqRel);
    }

    /// Hides entries created at or before `at_unix_ms`.
    pub(crate) fn clear(&self, at_unix_ms: u64) {
        let mut state = self.state.lock();
        state.clear.at = state.clear.at.max(at_unix_ms);
        self.clear_at.fetch_max(at_unix_ms, Ordering::AcqRel);
    }

    /// Hides entries carrying `tag` created at or before `at_unix_ms`; `oldest_alive` is the
    /// Unix millisecond before which no live entry was created.
    pub(crate) fn hide_tag(&self, tag: &str, at_unix_ms: u64, oldest_alive: u64) {
        let mut state = self.state.lock();
        let known = state.tags.entry(tag.into()).or_default();
        known.at = known.at.max(at_unix_ms);
        self.bound(&mut state, oldest_alive, None);
    }

    /// Whether an L2 entry created at `created` carrying `tags` is hidden; `Unsure` when a
    /// hide that could cover it must be read from L2 first.
    pub(crate) fn hidden(
        &self,
        created: u64,
        tags: &[&str],
        now: Instant,
        heard: Heard,
    ) -> Result<bool, Unsure> {
        if tags.is_empty() {
            // The stamp before the time: `mirror_clear` writes them the other way round, so a
            // stamp seen here comes with a time at least as new as the read it stamps.
            let counts = match heard {
                Heard::Now(true) => self.clear_counts_heard(),
                Heard::Now(false) => {
                    self.nanos(now) < self.clear_unheard_until.load(Ordering::Acquire)
                }
                Heard::Learned => false,
            };
            if counts {
                return Ok(created <= self.clear_at.load(Ordering::Acquire));
            }
        }
        if created <= self.clear_at.load(Ordering::Acquire) {
            return Ok(true);
        }
        let state = self.state.lock();
        if created <= state.clear.at {
            return Ok(true);
        }
        let counts = |read: Option<Read>| match heard {
            Heard::Learned => read.is_some(),
            Heard::Now(heard) => self.counts(read, now, heard),
        };
        let mut sure = counts(state.clear.read);
        for tag in tags {
            match state.tags.get(*tag) {
                Some(known) if created <= known.at => return Ok(true),
                Some(known) => sure &= counts(known.read),
                None => sure = false,
            }
        }
        if sure { Ok(false) } else { Err(Unsure) }
    }

    /// A read of the clear to be made with the entries' (in the same round trip) and handed
    /// to [`learned_clear`](Self::learned_clear): when it was never read, or messages were lost
    /// since. While messages are not heard the entries' check asks for it once its last read
    /// no longer counts (`max_silence` later), which costs that read a second round trip:
    /// telling it here would take a clock reading on every L2 read.
    pub(crate) fn clear_read(
        &self,
        now: impl FnOnce() -> Instant,
        heard: impl Fn() -> bool,
    ) -> Option<ClearRead> {
        let losses = self.losses.load(Ordering::Acquire);
        let heard = heard();
        let counts_at = self.clear_counts_at.load(Ordering::Acquire);
        let never_read =
            counts_at == NO_HEARD_READ && self.clear_unheard_until.load(Ordering::Acquire) == 0;
        if !never_read && (!heard || counts_at == losses) {
            return None;
        }
        Some(ClearRead(Read {
            losses,
            heard,
            at: now(),
        }))
    }

    /// Records the clear read from L2 (`None`: absent) at `wall`; returns whether it was
    /// unknown, and whether it was foreign bytes (see [`record`]) for L2 to replace.
    pub(crate) fn learned_clear(
        &self,
        read: ClearRead,
        value: Option<&[u8]>,
        wall: Wall,
    ) -> Recorded {
        let mut state = self.state.lock();
        let recorded = record(&mut state.clear, value, read.0, wall);
        self.mirror_clear(&state);
        recorded
    }

    /// Reads from L2 the hides not known for sure that could cover the entries encoded in
    /// `values`, in one round trip. `heard` tells whether messages are being heard now.
    /// Returns whether it learned of a hide it did not know (L1 may hold entries it
    /// covers), or `None` when L2 was not reached: the hides stay unsure. Foreign bytes found
    /// where a hide is kept are replaced in L2 by a hide of `wall.now` (see [`record`]).
    pub(crate) async fn learn(
        &self,
        l2: &L2,
        values: &[&[u8]],
        (now, wall): (Instant, Wall),
        heard: impl Fn() -> bool,
        oldest_alive: u64,
    ) -> Option<bool> {
        let read = self.read(now, heard);
        let (names, keys) = {
            let state = self.state.lock();
            let mut names: Vec<Option<&str>> = Vec::new();
            if !self.counts(state.clear.read, now, read.heard) {
                names.push(None);
            }
            for value in values {
                let Ok(env) = envelope::decode(value) else {
                    continue;
                };
                for tag in env.tags {
                    let unknown = state
                        .tags
                        .get(tag)
                        .is_none_or(|known| !self.counts(known.read, now, read.heard));
                    if unknown && !names.contains(&Some(tag)) {
                        names.push(Some(tag));
                    }
                }
            }
            let keys: Option<Vec<Key>> = names
                .iter()
                .map(|name| l2.hide_key(&name.map_or(Hide::All, |tag| Hide::Tag(tag.into()))))
                .collect();
            (names, keys?)
        };
        if keys.is_empty() {
            return Some(false);
        }
        let found = l2.read_hides(&keys).await?;
        let mut learned = false;
        let mut foreign = Vec::new();
        {
            let mut state = self.state.lock();
            for ((name, value), key) in names.into_iter().zip(found).zip(keys) {
                let known = match name {
                    None => &mut state.clear,
                    Some(tag) => state.tags.entry(tag.into()).or_default(),
                };
                let recorded = record(known, value.as_deref(), read, wall);
                learned |= recorded.learned;
                if recorded.foreign
                    && let Some(value) = value
                {
                    foreign.push((key, value));
                }
            }
            self.mirror_clear(&state);
            self.bound(&mut state, oldest_alive, Some(read));
        }
        for (key, value) in foreign {
            l2.replace_foreign_hide(key, &value, wall.now).await;
        }
        Some(learned)
    }

    /// What a read from L2 made now will count as. Losses first: a loss between the two looks
    /// then makes the read not count.
    fn read(&self, now: Instant, heard: impl Fn() -> bool) -> Read {
        let losses = self.losses.load(Ordering::Acquire);
        Read {
            losses,
            heard: heard(),
            at: now,
        }
    }

    /// Whether what was read from L2 at `read` still counts at `now`: while messages are
    /// heard, if they were then and none was lost since; while they are not (L1 is bypassed
    /// then, or there is no bus), for `unheard` after the read.
    fn counts(&self, read: Option<Read>, now: Instant, heard: bool) -> bool {
        read.is_some_and(|read| {
            if heard {
                read.heard && read.losses == self.losses.load(Ordering::Acquire)
            } else {
                now.saturating_duration_since(read.at) < self.unheard
            }
        })
    }

    /// Whether the clear was read from L2 while messages were heard, with no loss since.
    fn clear_counts_heard(&self) -> bool {
        let counts_at = self.clear_counts_at.load(Ordering::Acquire);
        counts_at == self.losses.load(Ordering::Acquire)
    }

    /// Copies the clear out of the lock (see `clear_at`).
    fn mirror_clear(&self, state: &State) {
        self.clear_at.fetch_max(state.clear.at, Ordering::AcqRel);
        let counts_at = match state.clear.read {
            Some(read) if read.heard => read.losses,
            _ => NO_HEARD_READ,
        };
        self.clear_counts_at.store(counts_at, Ordering::Release);
        let unheard_until = state
            .clear
            .read
            .map_or(0, |read| self.nanos(read.at + self.unheard).max(1));
        self.clear_unheard_until
            .store(unheard_until, Ordering::Release);
    }

    /// `at` in nanoseconds after `origin`.
    fn nanos(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(since).unwrap_or(u64::MAX)
    }

    /// Keeps at most `MAX_HIDDEN_TAGS` tags: those that can no longer hide a live entry and
    /// those known not to be hidden go first (they are read again from L2 when needed), but
    /// not those just read by `keep`; past the bound still, the hides become one clear of
    /// the newest.
    fn bound(&self, state: &mut State, oldest_alive: u64, keep: Option<Read>) {
        if state.tags.len() <= MAX_HIDDEN_TAGS {
            return;
        }
        let kept = |known: &Known| keep.is_some() && known.read == keep;
        state
            .tags
            .retain(|_, known| (known.at > 0 && known.at >= oldest_alive) || kept(known));
        if state.tags.len() > MAX_HIDDEN_TAGS {
            let newest = state.tags.values().map(|known| known.at).max().unwrap_or(0);
            state.clear.at = state.clear.at.max(newest);
            self.clear_at.fetch_max(newest, Ordering::AcqRel);
            state.tags.retain(|_, known| kept(known));
        }
    }
}

/// What [`record`] made of a hide read from L2.
pub(crate) struct Recorded {
    /// The hide is newer than what an earlier read found: L1 may hold entries it covers.
    pub(crate) learned: bool,
    /// The value was foreign bytes, taken as a hide of the time of the read.
    pub(crate) foreign: bool,
}

/// Records a hide read from L2 at `wall` (`None`: absent). Foreign bytes (not a time, or a
/// time past `wall.latest`) are taken as a hide of `wall.now`: whatever they replaced was made
/// before, and could have covered any entry made before.
fn record(known: &mut Known, value: Option<&[u8]>, read: Read, wall: Wall) -> Recorded {
    let found = match value.map(<[u8; 8]>::try_from) {
        None => Some(0),
        Some(Ok(bytes)) => Some(u64::from_le_bytes(bytes)).filter(|at| *at <= wall.latest),
        Some(Err(_)) => None,
    };
    let at = found.unwrap_or(wall.now);
    let learned = at > known.at && known.read.is_some();
    known.at = known.at.max(at);
    known.read = Some(read);
    Recorded {
        learned,
        foreign: found.is_none(),
    }
}

/// The L2 entry of a hide made at `at_unix_ms`, kept as long as an entry it covers can live.
pub(crate) fn entry(key: Key, at_unix_ms: u64, lifetime: Duration) -> KvEntry {
    KvEntry {
        key,
        value: Bytes::copy_from_slice(&at_unix_ms.to_le_bytes()),
        ttl: lifetime.clamp(Duration::from_millis(1), headroom_core::MAX_DURATION),
    }
}

/// The L2 key of a hide in `namespace` (the entries' namespace, then `.hidden`).
pub(crate) fn key(namespace: &Namespace, hide: &Hide) -> Option<Key> {
    match hide {
        Hide::All => namespace.key(b"c").ok(),
        Hide::Tag(tag) => namespace.key_from_parts(&[b"t:", tag.as_bytes()]).ok(),
    }
}
