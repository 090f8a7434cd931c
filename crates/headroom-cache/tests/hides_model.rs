//! Writes, clears and tag invalidations made on several instances of one cache, instances
//! started later, and lost messages, against a plain model of what docs/invalidation.md
//! promises: once the messages are delivered, the latest write of a key is served, unless a
//! clear or an invalidation of one of its tags made after it hides it. While a message may
//! have been lost, the instances that missed it may serve an older write until the loss is
//! detected (within `max_silence`); after that, the same holds again.
//!
//! Hides count in whole milliseconds ("created at or before"), so a write made after a hide
//! within the same millisecond may read either way; one made before it never reads.

mod common;

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use headroom_cache::{Cache, InvalidationConfig};
use headroom_core::bus::{InvalidationBus, Subscription};
use headroom_core::memory::{MemoryBus, MemoryKvStore};
use headroom_core::{BackendError, Clock, Key, ManualClock, Namespace};
use parking_lot::Mutex;
use proptest::prelude::*;

const INSTANCES: usize = 2;
const KEYS: [&str; 2] = ["a", "b"];
const TAGS: [&str; 2] = ["t0", "t1"];

#[derive(Clone, Debug)]
enum Op {
    /// Moves the shared clock on by this many milliseconds.
    Advance(u64),
    /// `insert` (with one tag, or none) on an instance.
    Insert(usize, usize, u64, Option<usize>),
    Remove(usize, usize),
    Clear(usize),
    InvalidateTag(usize, usize),
    Get(usize, usize),
    /// `get_many_or_load` of every key on an instance; the loader answers what the latest
    /// write left, as a database the writes went to first would.
    GetMany(usize),
    /// `get_or_load` of one key, likewise.
    GetOrLoad(usize, usize),
    /// Shuts an instance down and starts a new one in its place, with nothing in L1 and no
    /// message heard.
    Restart(usize),
    /// The next message the instance publishes is lost.
    Lose(usize),
    /// No message is lost any more, and the clock moves past `max_silence` in steps of
    /// `ping_interval` (every loss is detected by then).
    Heal,
}

fn op() -> impl Strategy<Value = Op> {
    let instance = 0..INSTANCES;
    let key = 0..KEYS.len();
    let tag = 0..TAGS.len();
    prop_oneof![
        2 => (1u64..3).prop_map(Op::Advance),
        4 => (instance.clone(), key.clone(), 0u64..100, proptest::option::of(tag.clone()))
            .prop_map(|(i, k, v, t)| Op::Insert(i, k, v, t)),
        1 => (instance.clone(), key.clone()).prop_map(|(i, k)| Op::Remove(i, k)),
        2 => instance.clone().prop_map(Op::Clear),
        2 => (instance.clone(), tag).prop_map(|(i, t)| Op::InvalidateTag(i, t)),
        6 => (instance.clone(), key.clone()).prop_map(|(i, k)| Op::Get(i, k)),
        2 => instance.clone().prop_map(Op::GetMany),
        2 => (instance.clone(), key).prop_map(|(i, k)| Op::GetOrLoad(i, k)),
        1 => instance.clone().prop_map(Op::Restart),
        2 => instance.prop_map(Op::Lose),
        2 => Just(Op::Heal),
    ]
}

/// A hide as the model knows it: its millisecond, and the step it was made at.
#[derive(Clone, Copy, Debug)]
struct Hide {
    at: u64,
    step: usize,
}

/// The latest write of a key: its value (`None`: removed), millisecond, step and tag.
#[derive(Clone, Copy, Debug)]
struct Write {
    value: Option<u64>,
    at: u64,
    step: usize,
    tag: Option<usize>,
}

#[derive(Default)]
struct Model {
    now: u64,
    writes: HashMap<usize, Write>,
    /// The write before a load's, while that load may not have reached L2: a load whose own
    /// read learned a hide (flushing L1) does not write its value back.
    before_load: HashMap<usize, Write>,
    /// Every value each key was ever written with.
    written: HashMap<usize, HashSet<u64>>,
    clear: Option<Hide>,
    tags: HashMap<usize, Hide>,
    /// The instances whose messages may have been lost since the last heal.
    losing: HashSet<usize>,
}

/// What a read may serve.
#[derive(Debug, PartialEq)]
enum Expect {
    Exactly(Option<u64>),
    /// The value or a miss: written after a hide, within its millisecond.
    EitherOr(u64),
    /// A miss or any value the key was written with: the instance may have missed a message.
    AnyWritten,
}

impl Model {
    /// Whether `served` is what `instance` may serve for `key`.
    fn fits(&self, instance: usize, key: usize, served: Option<u64>) -> bool {
        let before = self.before_load.get(&key);
        Self::allows(self.expect(instance, key), served, &self.written, key)
            || before.is_some_and(|write| {
                let expected = self.expect_write(write);
                Self::allows(expected, served, &self.written, key)
            })
    }

    fn allows(
        expected: Expect,
        served: Option<u64>,
        written: &HashMap<usize, HashSet<u64>>,
        key: usize,
    ) -> bool {
        match expected {
            Expect::Exactly(value) => served == value,
            Expect::EitherOr(value) => served.is_none() || served == Some(value),
            Expect::AnyWritten => {
                served.is_none_or(|value| written.get(&key).is_some_and(|all| all.contains(&value)))
            }
        }
    }

    /// Checks what a read with a loader served for `key`, and records its load: a load is
    /// only for a key the model lets miss, and serves the source's answer, which it writes.
    fn check_load(
        &mut self,
        step: usize,
        instance: usize,
        key: usize,
        served: Option<u64>,
        loaded: bool,
    ) -> Result<(), TestCaseError> {
        let fits = if loaded {
            self.fits(instance, key, None) && served == self.source(key)
        } else {
            served.is_some() && self.fits(instance, key, served)
        };
        prop_assert!(
            fits,
            "step {step}: instance {instance} served {served:?} for {} (loaded: {loaded}), expected {:?}",
            KEYS[key],
            self.expect(instance, key)
        );
        if loaded {
            if let Some(&before) = self.writes.get(&key) {
                self.before_load.entry(key).or_insert(before);
            }
            self.write(key, self.source(key), step, None);
        }
        Ok(())
    }

    /// What the source holds for `key`: the latest write.
    fn source(&self, key: usize) -> Option<u64> {
        self.writes.get(&key).and_then(|write| write.value)
    }

    fn write(&mut self, key: usize, value: Option<u64>, step: usize, tag: Option<usize>) {
        let write = Write {
            value,
            at: self.now,
            step,
            tag,
        };
        self.writes.insert(key, write);
        if let Some(value) = value {
            self.written.entry(key).or_default().insert(value);
        }
    }

    fn expect(&self, instance: usize, key: usize) -> Expect {
        if self.losing.iter().any(|&losing| losing != instance) {
            return Expect::AnyWritten;
        }
        self.writes
            .get(&key)
            .map_or(Expect::Exactly(None), |write| self.expect_write(write))
    }

    /// What a read may serve when `write` is the key's latest in L2.
    fn expect_write(&self, write: &Write) -> Expect {
        let Some(value) = write.value else {
            return Expect::Exactly(None);
        };
        let hides = self
            .clear
            .iter()
            .chain(write.tag.and_then(|t| self.tags.get(&t)));
        let mut uncertain = false;
        for hide in hides {
            if hide.step > write.step {
                return Expect::Exactly(None);
            }
            uncertain |= write.at <= hide.at;
        }
        if uncertain {
            Expect::EitherOr(value)
        } else {
            Expect::Exactly(Some(value))
        }
    }
}

fn config() -> InvalidationConfig {
    let mut config = InvalidationConfig::default();
    // Far beyond the few milliseconds a case moves the clock: no loss is ever suspected.
    config.ping_interval = Duration::from_secs(10);
    config.max_silence = Duration::from_secs(30);
    config
}

/// An instance's bus: the shared memory bus, losing the next message published when told.
#[derive(Clone, Debug)]
struct Lossy {
    inner: MemoryBus,
    lose_next: Arc<AtomicBool>,
}

impl InvalidationBus for Lossy {
    async fn publish(&self, channel: &Key, message: Bytes) -> Result<(), BackendError> {
        if self.lose_next.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        self.inner.publish(channel, message).await
    }

    async fn subscribe(&self, channel: &Key) -> Result<Subscription, BackendError> {
        self.inner.subscribe(channel).await
    }
}

fn instance(
    store: &MemoryKvStore,
    bus: &Lossy,
    ns: &Namespace,
    clock: Clock,
) -> Cache<String, u64> {
    Cache::builder()
        .clock(clock)
        .ttl(Duration::from_secs(600))
        .l2(store.clone(), ns.clone())
        .invalidation(bus.clone(), config())
        .build()
        .expect("build")
}

/// Lets every message published so far reach every instance (the memory bus and the
/// instances' tasks run on this thread, and the clock stands still meanwhile).
async fn deliver() {
    for _ in 0..200 {
        tokio::task::yield_now().await;
    }
}

/// Waits (bounded) until every instance hears messages.
async fn live(caches: &[Cache<String, u64>]) {
    common::settle(|| caches.iter().all(Cache::l1_in_use)).await;
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let clock = ManualClock::new();
        let (store, bus) = (MemoryKvStore::new(), MemoryBus::new());
        let buses: Vec<Lossy> = (0..INSTANCES)
            .map(|_| Lossy {
                inner: bus.clone(),
                lose_next: Arc::default(),
            })
            .collect();
        let ns = Namespace::new("model:hides").unwrap();
        let mut caches: Vec<_> = buses
            .iter()
            .map(|bus| instance(&store, bus, &ns, clock.clock()))
            .collect();
        live(&caches).await;
        let mut model = Model::default();
        for (step, op) in ops.iter().enumerate() {
            match *op {
                Op::Advance(ms) => {
                    clock.advance(Duration::from_millis(ms));
                    model.now += ms;
                }
                Op::Insert(i, k, value, tag) => {
                    let tags: Vec<&str> = tag.iter().map(|&t| TAGS[t]).collect();
                    caches[i]
                        .insert_tagged(KEYS[k].to_owned(), value, &tags)
                        .await
                        .unwrap();
                    model.write(k, Some(value), step, tag);
                    model.before_load.remove(&k);
                }
                Op::Remove(i, k) => {
                    caches[i].remove(&KEYS[k].to_owned()).await.unwrap();
                    model.write(k, None, step, None);
                    model.before_load.remove(&k);
                }
                Op::Clear(i) => {
                    caches[i].clear().await;
                    model.clear = Some(Hide {
                        at: model.now,
                        step,
                    });
                }
                Op::InvalidateTag(i, t) => {
                    caches[i].invalidate_tag(TAGS[t]).await;
                    let hide = Hide {
                        at: model.now,
                        step,
                    };
                    model.tags.insert(t, hide);
                }
                Op::Get(i, k) => {
                    let served = caches[i].get(&KEYS[k].to_owned()).await.unwrap();
                    prop_assert!(
                        model.fits(i, k, served),
                        "step {step}: instance {i} served {served:?} for {}, expected {:?}",
                        KEYS[k],
                        model.expect(i, k)
                    );
                }
                Op::GetMany(i) => {
                    let asked = Arc::new(Mutex::new(Vec::new()));
                    let keys: Vec<String> = KEYS.iter().map(|&k| k.to_owned()).collect();
                    let source: Vec<Option<u64>> =
                        (0..KEYS.len()).map(|k| model.source(k)).collect();
                    let loader = {
                        let asked = Arc::clone(&asked);
                        move |keys: Vec<String>| {
                            let answer = keys
                                .iter()
                                .filter_map(|key| {
                                    let k = KEYS.iter().position(|&known| known == key).unwrap();
                                    Some((key.clone(), source[k]?))
                                })
                                .collect::<HashMap<_, _>>();
                            asked.lock().extend(keys);
                            std::future::ready(Ok::<_, Infallible>(answer))
                        }
                    };
                    let served = caches[i].get_many_or_load(&keys, loader).await.unwrap();
                    let asked = asked.lock().clone();
                    for (k, served) in served.into_iter().enumerate() {
                        let loaded = asked.contains(&keys[k]);
                        model.check_load(step, i, k, served, loaded)?;
                    }
                }
                Op::GetOrLoad(i, k) => {
                    let source = model.source(k);
                    let asked = Arc::new(AtomicBool::new(false));
                    let loader = {
                        let asked = Arc::clone(&asked);
                        move |_| {
                            asked.store(true, Ordering::SeqCst);
                            std::future::ready(Ok::<_, Infallible>(source))
                        }
                    };
                    let served = caches[i]
                        .get_or_load(&KEYS[k].to_owned(), loader)
                        .await
                        .unwrap();
                    model.check_load(step, i, k, served, asked.load(Ordering::SeqCst))?;
                }
                Op::Restart(i) => {
                    caches[i].shutdown().await;
                    caches[i] = instance(&store, &buses[i], &ns, clock.clock());
                    live(&caches).await;
                }
                Op::Lose(i) => {
                    buses[i].lose_next.store(true, Ordering::SeqCst);
                    model.losing.insert(i);
                }
                Op::Heal => {
                    for bus in &buses {
                        bus.lose_next.store(false, Ordering::SeqCst);
                    }
                    let config = config();
                    let steps =
                        config.max_silence.as_millis() / config.ping_interval.as_millis() + 2;
                    for _ in 0..steps {
                        clock.advance(config.ping_interval);
                        deliver().await;
                    }
                    model.now += u64::try_from(steps * config.ping_interval.as_millis()).unwrap();
                    model.losing.clear();
                }
            }
            deliver().await;
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_instance_serves_what_the_writes_and_hides_leave(ops in prop::collection::vec(op(), 1..40)) {
        run(&ops)?;
    }
}
