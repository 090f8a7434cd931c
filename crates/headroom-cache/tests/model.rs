//! The cache against a plain model of its time rules (TTL, negative TTL, fail-safe and its
//! throttle), driven by random operations on a manual clock.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use headroom_cache::{Cache, CacheErrorKind};
use headroom_core::ManualClock;
use headroom_core::Namespace;
use headroom_core::memory::MemoryKvStore;
use proptest::prelude::*;

const TTL: u64 = 10;
const NEGATIVE_TTL: u64 = 3;
const MAX_STALE: u64 = 20;
const THROTTLE: u64 = 4;

#[derive(Clone, Debug)]
enum Op {
    Advance(u64),
    /// A read of key `0..3` whose loader would answer this (`Err` when `None`).
    Load(u8, Option<Option<u32>>),
    Insert(u8, u32),
    Remove(u8),
    InvalidateLocal(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1u64..15).prop_map(Op::Advance),
        (
            0u8..3,
            proptest::option::of(proptest::option::of(0u32..100))
        )
            .prop_map(|(k, answer)| Op::Load(k, answer)),
        (0u8..3, 0u32..100).prop_map(|(k, v)| Op::Insert(k, v)),
        (0u8..3).prop_map(Op::Remove),
        (0u8..3).prop_map(Op::InvalidateLocal),
    ]
}

/// What the model remembers of a key: the value (or "not found") and when it was written.
#[derive(Clone, Copy, Debug)]
struct Entry {
    value: Option<u32>,
    at: u64,
    /// After a failed load served this stale value: until then, it is served without a load.
    resting_until: u64,
}

impl Entry {
    fn ttl(&self) -> u64 {
        if self.value.is_some() {
            TTL
        } else {
            NEGATIVE_TTL
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn cache_follows_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let clock = ManualClock::new();
            let cache: Cache<u8, u32> = Cache::builder()
                .clock(clock.clock())
                .ttl(Duration::from_secs(TTL))
                .negative_ttl(Duration::from_secs(NEGATIVE_TTL))
                .fail_safe_max_stale(Duration::from_secs(MAX_STALE))
                .fail_safe_throttle(Duration::from_secs(THROTTLE))
                .l2(
                    MemoryKvStore::builder().clock(clock.clock()).build(),
                    Namespace::new("model").unwrap(),
                )
                .build()
                .unwrap();
            let mut model: HashMap<u8, Entry> = HashMap::new();
            let mut now = 0;
            let calls = Arc::new(AtomicUsize::new(0));
            for op in ops {
                match op {
                    Op::Advance(secs) => {
                        clock.advance(Duration::from_secs(secs));
                        now += secs;
                    }
                    Op::Load(k, answer) => {
                        let before = calls.load(Ordering::SeqCst);
                        let counter = Arc::clone(&calls);
                        let got = cache
                            .get_or_load(&k, move |_| async move {
                                counter.fetch_add(1, Ordering::SeqCst);
                                answer.ok_or_else(|| std::io::Error::other("loader failed"))
                            })
                            .await;
                        let loaded = calls.load(Ordering::SeqCst) > before;
                        let entry = model.get(&k).copied();
                        match entry.filter(|e| now < e.at + e.ttl() || now < e.resting_until) {
                            Some(fresh) => {
                                prop_assert!(!loaded, "op {:?}: fresh entry, no load", op);
                                prop_assert_eq!(got.unwrap(), fresh.value);
                            }
                            None => {
                                prop_assert!(loaded, "op {:?}: expired or absent, load", op);
                                match answer {
                                    Some(value) => {
                                        prop_assert_eq!(got.unwrap(), value);
                                        model.insert(k, Entry { value, at: now, resting_until: 0 });
                                    }
                                    None => match entry.filter(|e| now < e.at + e.ttl() + MAX_STALE) {
                                        Some(stale) => {
                                            prop_assert_eq!(got.unwrap(), stale.value);
                                            let until = (now + THROTTLE).min(stale.at + stale.ttl() + MAX_STALE);
                                            model.insert(k, Entry { resting_until: until, ..stale });
                                        }
                                        None => prop_assert_eq!(
                                            got.unwrap_err().kind(),
                                            CacheErrorKind::Loader
                                        ),
                                    },
                                }
                            }
                        }
                    }
                    Op::Insert(k, v) => {
                        cache.insert(k, v).await.unwrap();
                        model.insert(k, Entry { value: Some(v), at: now, resting_until: 0 });
                    }
                    Op::Remove(k) => {
                        cache.remove(&k).await.unwrap();
                        model.remove(&k);
                    }
                    Op::InvalidateLocal(k) => {
                        cache.invalidate_local(&k);
                        // The throttle rests in L1 only.
                        if let Some(entry) = model.get_mut(&k) {
                            entry.resting_until = 0;
                        }
                    }
                }
                // Background L1 fills and L2 writes finish before the next operation.
                for _ in 0..10 {
                    tokio::task::yield_now().await;
                }
            }
            Ok(())
        })?;
    }
}
