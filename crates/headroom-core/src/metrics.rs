//! Metric handles that reach the process's recorder whenever it is installed.
//!
//! A `metrics` handle is bound to the recorder current when it is registered; one registered
//! before the service installs its recorder is a no-op for good. Headroom's parts are often
//! built first (in a `Headroom`, in lazy statics, in tests) and the exporter installed after,
//! so every part records through these handles instead:
//!
//! - registered while a recorder is current (the global one, or a thread's local one), a
//!   handle is that recorder's for good;
//! - registered while none is, a handle waits. A thread counting through waiting counters and
//!   histograms looks for a recorder on its first such record and every [`LOOK_EVERY`]th
//!   after (looking costs a few dozen instructions, so it is not done on every record). The
//!   first look that finds one registers every waiting handle of the process with it, gauges
//!   included, and they stay with it. Waiting gauges look too, on the same count, as they
//!   are set, increased or decreased. Up to [`LOOK_EVERY`] records per thread after the
//!   recorder arrives are lost, as `metrics` loses every record made before it.
//! - A waiting gauge keeps its value and hands it over, so a limit set when its part was built
//!   is there at once; a level (in flight) is published from its part's state at its first
//!   change after.
//!
//! No recorder is told apart from the no-op one by its size: a recorder that holds no data is
//! taken for the no-op one, and handles registered with it keep waiting while recording to it.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

pub use metrics::Label;
use metrics::{IntoF64, IntoLabels, Key, KeyName, Level, Metadata, Recorder};
use parking_lot::Mutex;

static METADATA: Metadata<'static> = Metadata::new("headroom", Level::INFO, Some("headroom"));

/// How often a thread recording through waiting handles looks for a recorder.
pub const LOOK_EVERY: u32 = 64;

thread_local! {
    /// Records made on this thread through waiting handles.
    static WAITING_RECORDS: Cell<u32> = const { Cell::new(0) };
}

/// Handles registered while no recorder was current.
static WAITING: Mutex<Vec<Weak<dyn Waiting>>> = Mutex::new(Vec::new());

/// A handle that can register with a recorder found after it was built.
trait Waiting: Send + Sync {
    /// Registers with the recorder current on this thread, unless it has registered already.
    fn bind(&self);
}

/// Counts a record through a waiting counter or histogram; on the thread's first and every
/// [`LOOK_EVERY`]th, looks for a recorder and, when there is one, binds every waiting handle.
/// Returns whether it looked.
#[inline]
fn record_while_waiting() -> bool {
    let look = WAITING_RECORDS.with(|records| {
        let n = records.get();
        records.set(n.wrapping_add(1));
        n % LOOK_EVERY == 0
    });
    if look {
        look_for_recorder();
    }
    look
}

#[inline(never)]
fn look_for_recorder() {
    if !recorder_installed() {
        return;
    }
    let waiting = std::mem::take(&mut *WAITING.lock());
    for handle in waiting.iter().filter_map(Weak::upgrade) {
        handle.bind();
    }
}

/// Whether the recorder current on this thread is one that keeps what it is given.
fn recorder_installed() -> bool {
    metrics::with_recorder(|recorder| size_of_val(recorder) != 0)
}

fn wait(handle: Weak<dyn Waiting>) {
    {
        let mut waiting = WAITING.lock();
        if waiting.len().is_power_of_two() {
            waiting.retain(|handle| handle.strong_count() > 0);
        }
        waiting.push(handle);
    }
    // A recorder installed since the handle looked, and found by others already, would not
    // be looked for again by handles that are all bound.
    look_for_recorder();
}

/// One registered handle and what it takes to register it again.
#[derive(Debug)]
struct Handle<H> {
    key: Key,
    register: fn(&dyn Recorder, &Key) -> H,
    /// Registered when the part was built: the no-op handle when no recorder was current.
    built: H,
    /// The handle to record to: `built` when a recorder was current then, or the one
    /// registered with the first recorder found after.
    bound: OnceLock<H>,
}

impl<H: Clone> Handle<H> {
    /// Registers `name` with `labels` with the current recorder; the second value says
    /// whether none was current, so the handle waits.
    fn new(
        name: &'static str,
        labels: impl IntoLabels,
        register: fn(&dyn Recorder, &Key) -> H,
    ) -> (Self, bool) {
        let key = Key::from_parts(KeyName::from_const_str(name), labels);
        let (built, waits) = metrics::with_recorder(|recorder| {
            (register(recorder, &key), size_of_val(recorder) == 0)
        });
        let bound = OnceLock::new();
        if !waits {
            let _ = bound.set(built.clone());
        }
        let handle = Self {
            key,
            register,
            built,
            bound,
        };
        (handle, waits)
    }

    /// The handle to record to now; a counter or histogram looks for a recorder while waiting.
    #[inline]
    fn current(&self) -> &H {
        if let Some(bound) = self.bound.get() {
            return bound;
        }
        if record_while_waiting()
            && let Some(bound) = self.bound.get()
        {
            return bound;
        }
        &self.built
    }
}

fn register_counter(recorder: &dyn Recorder, key: &Key) -> metrics::Counter {
    recorder.register_counter(key, &METADATA)
}

fn register_histogram(recorder: &dyn Recorder, key: &Key) -> metrics::Histogram {
    recorder.register_histogram(key, &METADATA)
}

fn register_gauge(recorder: &dyn Recorder, key: &Key) -> metrics::Gauge {
    recorder.register_gauge(key, &METADATA)
}

impl<H: Send + Sync> Waiting for Handle<H> {
    fn bind(&self) {
        self.bound.get_or_init(|| {
            metrics::with_recorder(|recorder| (self.register)(recorder, &self.key))
        });
    }
}

/// A counter's or histogram's shared handle, waiting for a recorder when none is current.
fn shared<H: Clone + Send + Sync + 'static>(
    name: &'static str,
    labels: impl IntoLabels,
    register: fn(&dyn Recorder, &Key) -> H,
) -> Arc<Handle<H>> {
    let (handle, waits) = Handle::new(name, labels, register);
    let handle = Arc::new(handle);
    if waits {
        wait(Arc::downgrade(&handle) as Weak<dyn Waiting>);
    }
    handle
}

/// A counter that reaches the recorder whenever it is installed.
#[derive(Clone, Debug)]
pub struct Counter(Arc<Handle<metrics::Counter>>);

impl Counter {
    /// The counter `name` with `labels`, e.g. `&[("cache", name)]`.
    pub fn new(name: &'static str, labels: impl IntoLabels) -> Self {
        Self(shared(name, labels, register_counter))
    }

    /// Adds `value`.
    #[inline]
    pub fn increment(&self, value: u64) {
        self.0.current().increment(value);
    }
}

/// A histogram that reaches the recorder whenever it is installed.
#[derive(Clone, Debug)]
pub struct Histogram(Arc<Handle<metrics::Histogram>>);

impl Histogram {
    /// The histogram `name` with `labels`.
    pub fn new(name: &'static str, labels: impl IntoLabels) -> Self {
        Self(shared(name, labels, register_histogram))
    }

    /// Records one `value` (a `Duration` in seconds).
    #[inline]
    pub fn record(&self, value: impl IntoF64) {
        self.0.current().record(value.into_f64());
    }
}

/// A gauge that reaches the recorder whenever it is installed, with the value it has by then.
/// Clones share the value.
#[derive(Clone, Debug)]
pub struct Gauge(Arc<GaugeState>);

#[derive(Debug)]
struct GaugeState {
    handle: Handle<metrics::Gauge>,
    /// The value (as `f64` bits) while waiting; [`HANDED_OVER`] from when it was handed to the
    /// recorder found.
    kept: AtomicU64,
}

/// A NaN no gauge arithmetic produces: the kept value now lives in the recorder found.
const HANDED_OVER: u64 = 0x7ff8_dead_beef_0001;

impl Gauge {
    /// The gauge `name` with `labels`, at zero.
    pub fn new(name: &'static str, labels: impl IntoLabels) -> Self {
        let (handle, waits) = Handle::new(name, labels, register_gauge);
        let state = Arc::new(GaugeState {
            handle,
            kept: AtomicU64::new(0.0_f64.to_bits()),
        });
        if waits {
            wait(Arc::downgrade(&state) as Weak<dyn Waiting>);
        }
        Self(state)
    }

    /// Adds `value`.
    #[inline]
    pub fn increment(&self, value: impl IntoF64) {
        let value = value.into_f64();
        match self.0.handle.bound.get() {
            Some(bound) => bound.increment(value),
            None => self
                .0
                .keep(|kept| kept + value, |gauge| gauge.increment(value)),
        }
    }

    /// Subtracts `value`.
    #[inline]
    pub fn decrement(&self, value: impl IntoF64) {
        let value = value.into_f64();
        match self.0.handle.bound.get() {
            Some(bound) => bound.decrement(value),
            None => self
                .0
                .keep(|kept| kept - value, |gauge| gauge.decrement(value)),
        }
    }

    /// Sets the value.
    #[inline]
    pub fn set(&self, value: impl IntoF64) {
        let value = value.into_f64();
        match self.0.handle.bound.get() {
            Some(bound) => bound.set(value),
            None => self.0.keep(|_| value, |gauge| gauge.set(value)),
        }
    }

    /// Publishes a level its part keeps (permits in use, say), read with `level`. Concurrent
    /// publishers each read the level again after setting it, so the gauge ends on the level
    /// the part ends on. A waiting gauge reads nothing: it is published at the first change
    /// after it is bound.
    #[inline]
    pub fn set_level(&self, level: impl Fn() -> usize) {
        if let Some(bound) = self.0.handle.bound.get() {
            publish_level(bound, &level);
        }
    }
}

/// Out of line, so that a part's path stays small enough to inline where no recorder is bound.
#[inline(never)]
fn publish_level(gauge: &metrics::Gauge, level: &dyn Fn() -> usize) {
    loop {
        let seen = level();
        gauge.set(seen as f64);
        if level() == seen {
            return;
        }
    }
}

impl GaugeState {
    /// Applies a change to the kept value until a recorder is found (looked for as a waiting
    /// counter does), then hands the value to it once and applies every later change to it.
    /// Each change lands in exactly one of them.
    #[inline(never)]
    fn keep(&self, change: impl Fn(f64) -> f64, apply: impl Fn(&metrics::Gauge)) {
        record_while_waiting();
        let mut kept = self.kept.load(Ordering::Acquire);
        loop {
            if kept == HANDED_OVER {
                // Handed over, or being handed over by another thread: the handle follows.
                return apply(self.handle.bound.wait());
            }
            let next = change(f64::from_bits(kept)).to_bits();
            match self
                .kept
                .compare_exchange_weak(kept, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(actual) => kept = actual,
            }
        }
        apply(&self.handle.built);
    }
}

impl Waiting for GaugeState {
    /// Registers with the current recorder and gives it the kept value, once.
    fn bind(&self) {
        let value = self.kept.swap(HANDED_OVER, Ordering::AcqRel);
        if value != HANDED_OVER {
            self.handle.bound.get_or_init(|| {
                let found = metrics::with_recorder(|recorder| {
                    (self.handle.register)(recorder, &self.handle.key)
                });
                found.set(f64::from_bits(value));
                found
            });
        }
    }
}

/// A [`Counter`] labelled like the `metrics` macros: `counter!("name", "label" => value, ...)`.
#[macro_export]
macro_rules! counter {
    ($name:expr $(, $key:expr => $value:expr)* $(,)?) => {
        $crate::metrics::Counter::new($name, ::std::vec![$($crate::metrics::Label::new($key, $value)),*])
    };
}

/// A [`Gauge`] labelled like the `metrics` macros: `gauge!("name", "label" => value, ...)`.
#[macro_export]
macro_rules! gauge {
    ($name:expr $(, $key:expr => $value:expr)* $(,)?) => {
        $crate::metrics::Gauge::new($name, ::std::vec![$($crate::metrics::Label::new($key, $value)),*])
    };
}

/// A [`Histogram`] labelled like the `metrics` macros: `histogram!("name", "label" => value, ...)`.
#[macro_export]
macro_rules! histogram {
    ($name:expr $(, $key:expr => $value:expr)* $(,)?) => {
        $crate::metrics::Histogram::new($name, ::std::vec![$($crate::metrics::Label::new($key, $value)),*])
    };
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use metrics::{KeyName, SharedString, Unit};

    use super::*;

    /// Keeps every counter, gauge and histogram sample by metric name.
    #[derive(Default)]
    struct Kept(Mutex<BTreeMap<String, Arc<Cell>>>);

    #[derive(Default)]
    struct Cell(Mutex<Vec<f64>>);

    impl metrics::CounterFn for Cell {
        fn increment(&self, value: u64) {
            let mut values = self.0.lock().unwrap();
            let last = values.last().copied().unwrap_or(0.0);
            values.push(last + value as f64);
        }
        fn absolute(&self, value: u64) {
            self.0.lock().unwrap().push(value as f64);
        }
    }

    impl metrics::GaugeFn for Cell {
        fn increment(&self, value: f64) {
            let mut values = self.0.lock().unwrap();
            let last = values.last().copied().unwrap_or(0.0);
            values.push(last + value);
        }
        fn decrement(&self, value: f64) {
            self.increment(-value);
        }
        fn set(&self, value: f64) {
            self.0.lock().unwrap().push(value);
        }
    }

    impl metrics::HistogramFn for Cell {
        fn record(&self, value: f64) {
            self.0.lock().unwrap().push(value);
        }
    }

    /// Handles built without a recorder are handed over process-wide: one test at a time.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    impl Kept {
        fn cell(&self, key: &Key) -> Arc<Cell> {
            let mut cells = self.0.lock().unwrap();
            Arc::clone(cells.entry(key.name().to_owned()).or_default())
        }

        fn last(&self, name: &str) -> Option<f64> {
            let cells = self.0.lock().unwrap();
            cells.get(name)?.0.lock().unwrap().last().copied()
        }

        fn samples(&self, name: &str) -> Vec<f64> {
            let cells = self.0.lock().unwrap();
            cells
                .get(name)
                .map_or_else(Vec::new, |cell| cell.0.lock().unwrap().clone())
        }
    }

    impl Recorder for Kept {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> metrics::Counter {
            metrics::Counter::from_arc(self.cell(key))
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> metrics::Gauge {
            metrics::Gauge::from_arc(self.cell(key))
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> metrics::Histogram {
            metrics::Histogram::from_arc(self.cell(key))
        }
    }

    #[test]
    fn handles_built_without_a_recorder_report_to_the_first_one_they_meet() {
        let _serial = serial();
        let counter = Counter::new("calls", &[("part", "a")]);
        let histogram = Histogram::new("seconds", &[("part", "a")]);
        counter.increment(1_000);
        histogram.record(9.0);
        let kept = Kept::default();
        metrics::with_local_recorder(&kept, || {
            for _ in 0..LOOK_EVERY {
                counter.increment(1);
                histogram.record(0.25);
            }
        });
        // Found within `LOOK_EVERY` records of the thread; what came before is lost.
        let landed = kept.last("calls").expect("the counter found the recorder");
        assert!((1.0..=f64::from(LOOK_EVERY)).contains(&landed), "{landed}");
        assert!(kept.samples("seconds").iter().all(|&value| value == 0.25));
        assert!(!kept.samples("seconds").is_empty());
        // Once found, the recorder is kept, as `metrics` keeps a handle's recorder.
        counter.increment(10);
        assert_eq!(kept.last("calls"), Some(landed + 10.0));
    }

    #[test]
    fn a_gauge_hands_its_value_to_the_recorder_it_meets() {
        let _serial = serial();
        let queued = Gauge::new("queued", &[("part", "a")]);
        let limit = Gauge::new("limit", &[("part", "a")]);
        let calls = Counter::new("calls", &[("part", "a")]);
        queued.increment(1.0);
        queued.increment(1.0);
        limit.set(8.0);
        let kept = Kept::default();
        metrics::with_local_recorder(&kept, || {
            queued.decrement(1.0);
            for _ in 0..LOOK_EVERY {
                calls.increment(1);
            }
            queued.decrement(1.0);
        });
        // Counted up before the recorder and down after it (either side of finding it):
        // zero, not minus one.
        assert_eq!(kept.last("queued"), Some(0.0));
        // Set before the recorder and not touched since: handed over by the first handle
        // that found it.
        assert_eq!(kept.last("limit"), Some(8.0));
        limit.increment(1.0);
        assert_eq!(kept.last("limit"), Some(9.0));
    }

    /// A part may hold only gauges that wait (its counters were built once a recorder was
    /// current, or it has none): its gauges find the recorder by themselves, as they change.
    /// (A level is published on a path that also counts, so it leaves the looking to that
    /// counter, as it does here to the other gauge.)
    #[test]
    fn gauges_find_a_recorder_with_no_waiting_counter_around() {
        let _serial = serial();
        let limit = Gauge::new("limit", &[("part", "a")]);
        let in_flight = Gauge::new("in_flight", &[("part", "a")]);
        let kept = Kept::default();
        metrics::with_local_recorder(&kept, || {
            for level in 0..LOOK_EVERY {
                limit.set(5.0);
                in_flight.set_level(|| level as usize);
            }
        });
        assert_eq!(kept.last("limit"), Some(5.0));
        assert_eq!(
            kept.last("in_flight"),
            Some(f64::from(LOOK_EVERY - 1)),
            "published from the first change after the gauge found the recorder"
        );
    }

    #[test]
    fn a_level_is_published_from_its_part_once_a_recorder_is_found() {
        let _serial = serial();
        let in_use = std::sync::atomic::AtomicUsize::new(3);
        let in_flight = Gauge::new("in_flight", &[("part", "a")]);
        let calls = Counter::new("calls", &[("part", "a")]);
        in_flight.set_level(|| in_use.load(Ordering::Relaxed));
        let kept = Kept::default();
        metrics::with_local_recorder(&kept, || {
            // A counter finds the recorder; the gauge is bound with it.
            for _ in 0..LOOK_EVERY {
                calls.increment(1);
            }
            assert_eq!(kept.last("in_flight"), Some(0.0), "not published yet");
            for _ in 0..2 {
                in_use.fetch_sub(1, Ordering::Relaxed);
                in_flight.set_level(|| in_use.load(Ordering::Relaxed));
                in_use.fetch_add(1, Ordering::Relaxed);
                in_flight.set_level(|| in_use.load(Ordering::Relaxed));
            }
        });
        assert_eq!(kept.last("in_flight"), Some(3.0));
    }

    #[test]
    fn handles_built_with_a_recorder_stay_with_it() {
        let _serial = serial();
        let kept = Kept::default();
        let (counter, gauge) = metrics::with_local_recorder(&kept, || {
            (
                Counter::new("calls", &[("part", "a")]),
                Gauge::new("level", &[("part", "a")]),
            )
        });
        let other = Kept::default();
        metrics::with_local_recorder(&other, || {
            counter.increment(1);
            gauge.set(3.0);
        });
        counter.increment(1);
        assert_eq!(kept.samples("calls"), [1.0, 2.0]);
        assert_eq!(kept.samples("level"), [3.0]);
        assert!(other.samples("calls").is_empty());
    }

    #[test]
    fn changes_racing_the_hand_over_each_land_once() {
        let _serial = serial();
        const CHANGES: u32 = 4 * LOOK_EVERY;
        for _ in 0..50 {
            let gauge = Arc::new(Gauge::new("level", &[("part", "a")]));
            let calls = Arc::new(Counter::new("calls", &[("part", "a")]));
            let kept = Arc::new(Kept::default());
            let threads: Vec<_> = (0..2)
                .map(|thread| {
                    let gauge = Arc::clone(&gauge);
                    let calls = Arc::clone(&calls);
                    let kept = Arc::clone(&kept);
                    std::thread::spawn(move || {
                        for i in 0..CHANGES {
                            // One thread meets the recorder half way; the other never does
                            // itself, so its changes reach the recorder only through the
                            // hand-over or the found handle.
                            if thread == 0 && i >= CHANGES / 2 {
                                metrics::with_local_recorder(&*kept, || {
                                    gauge.increment(1.0);
                                    // Finds the recorder on this thread's first count.
                                    calls.increment(1);
                                });
                            } else {
                                gauge.increment(1.0);
                            }
                        }
                    })
                })
                .collect();
            for thread in threads {
                thread.join().unwrap();
            }
            assert_eq!(kept.last("level"), Some(f64::from(2 * CHANGES)));
        }
    }
}
