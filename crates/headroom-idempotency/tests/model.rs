//! A randomized model of arrivals, completions, failures, cancellations, crashes and lease
//! expiries on a manual clock. Invariants checked after every step:
//!
//! - never two live executions of one key at once (a crashed holder is dead: it neither runs
//!   nor releases, and its lease expires);
//! - every outcome returned for a key, fresh or replayed, is the first one stored for it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use headroom_core::ManualClock;
use headroom_core::memory::MemoryLeaseStore;
use headroom_idempotency::{
    Executed, Idempotency, IdempotencyError, IdempotencyKey, InProgressPolicy, Scope,
};
use proptest::prelude::*;
use tokio::sync::oneshot;

const LEASE: Duration = Duration::from_secs(30);
const KEYS: u8 = 3;

#[derive(Clone, Debug)]
enum Step {
    /// A request for a key arrives.
    Arrive(u8),
    /// The n-th running operation finishes: with a value, or with an error.
    Finish { nth: usize, ok: bool },
    /// The n-th pending request is dropped by its caller.
    Cancel(usize),
    /// The process serving the n-th pending request dies: nothing of it runs any more.
    Crash(usize),
    /// Time passes, in steps small enough for live holders to extend their leases.
    Wait(u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..KEYS).prop_map(Step::Arrive),
        4 => (0..8usize, any::<bool>()).prop_map(|(nth, ok)| Step::Finish { nth, ok }),
        1 => (0..8usize).prop_map(Step::Cancel),
        1 => (0..8usize).prop_map(Step::Crash),
        2 => (1..6u8).prop_map(Step::Wait),
    ]
}

type Call = Pin<Box<dyn Future<Output = Result<Executed<u64>, IdempotencyError<String>>>>>;
/// Where a started operation waits for the model to finish it.
type Finisher = Arc<Mutex<Option<oneshot::Sender<Result<u64, String>>>>>;

struct Pending {
    key: u8,
    call: Call,
    /// Set once its operation started: the way to finish it.
    finish: Finisher,
}

#[derive(Default)]
struct Model {
    /// Live (not crashed) operations running per key.
    running: HashMap<u8, usize>,
    /// The first outcome stored per key.
    stored: HashMap<u8, u64>,
    next_value: u64,
}

fn run(steps: Vec<Step>) {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
        .block_on(async move {
            let clock = ManualClock::new();
            let idem = Idempotency::builder(MemoryLeaseStore::with_limits(clock.clock(), 1_000))
                .clock(clock.clock())
                .lease(LEASE)
                .in_progress(InProgressPolicy::Reject)
                .build()
                .unwrap();
            let scope = Scope::new("tenant", "op").unwrap();
            let model = Arc::new(Mutex::new(Model::default()));
            let mut pending: Vec<Pending> = Vec::new();
            let mut crashed: Vec<Call> = Vec::new();

            for step in steps {
                match step {
                    Step::Arrive(k) => {
                        let finish: Finisher = Arc::new(Mutex::new(None));
                        let call: Call = {
                            let (idem, scope, model, finish) = (
                                idem.clone(),
                                scope.clone(),
                                Arc::clone(&model),
                                Arc::clone(&finish),
                            );
                            Box::pin(async move {
                                let key = IdempotencyKey::new(&format!("k{k}")).unwrap();
                                idem.execute(&scope, &key, b"same request", || async move {
                                    let (tx, rx) = oneshot::channel();
                                    *finish.lock().unwrap() = Some(tx);
                                    let running = {
                                        let mut m = model.lock().unwrap();
                                        let running = m.running.entry(k).or_default();
                                        *running += 1;
                                        *running
                                    };
                                    assert_eq!(running, 1, "two live executions of key {k}");
                                    let _done = Finished {
                                        model: Arc::clone(&model),
                                        key: k,
                                    };
                                    rx.await.unwrap_or_else(|_| Err("dropped".to_owned()))
                                })
                                .await
                            })
                        };
                        pending.push(Pending {
                            key: k,
                            call,
                            finish,
                        });
                    }
                    Step::Finish { nth, ok } => {
                        let started: Vec<&Pending> = pending
                            .iter()
                            .filter(|p| p.finish.lock().unwrap().is_some())
                            .collect();
                        if let Some(p) = started.get(nth % started.len().max(1)) {
                            let value = {
                                let mut m = model.lock().unwrap();
                                m.next_value += 1;
                                m.next_value
                            };
                            let tx = p.finish.lock().unwrap().take().unwrap();
                            let _ = tx.send(if ok { Ok(value) } else { Err("failed".into()) });
                        }
                    }
                    Step::Cancel(nth) => {
                        if !pending.is_empty() {
                            drop(pending.remove(nth % pending.len()));
                        }
                    }
                    Step::Crash(nth) => {
                        if !pending.is_empty() {
                            let dead = pending.remove(nth % pending.len());
                            if dead.finish.lock().unwrap().is_some() {
                                // Its operation stops counting as live: it never runs again.
                                *model.lock().unwrap().running.get_mut(&dead.key).unwrap() -= 1;
                            }
                            // Kept, never polled or dropped: no destructor, no release.
                            crashed.push(dead.call);
                        }
                    }
                    Step::Wait(quarters) => {
                        for _ in 0..quarters {
                            clock.advance(LEASE / 4);
                            poll_all(&mut pending, &model).await;
                        }
                    }
                }
                poll_all(&mut pending, &model).await;
            }
            // Crashed calls were never polled or dropped during the run; the checks are done now.
            drop(crashed);
        });
}

/// Decrements the running count when an operation ends (or is dropped).
struct Finished {
    model: Arc<Mutex<Model>>,
    key: u8,
}

impl Drop for Finished {
    fn drop(&mut self) {
        if let Some(running) = self.model.lock().unwrap().running.get_mut(&self.key) {
            *running = running.saturating_sub(1);
        }
    }
}

async fn poll_all(pending: &mut Vec<Pending>, model: &Arc<Mutex<Model>>) {
    // Let spawned releases and woken timers run, then poll every pending call.
    for _ in 0..3 {
        tokio::task::yield_now().await;
        let mut i = 0;
        while i < pending.len() {
            match pending[i].call.as_mut().now_or_never() {
                None => i += 1,
                Some(result) => {
                    let done = pending.remove(i);
                    if let Ok(out) = result {
                        let mut m = model.lock().unwrap();
                        let first = *m.stored.entry(done.key).or_insert(out.value);
                        assert_eq!(
                            out.value, first,
                            "key {} answered {} after {}",
                            done.key, out.value, first
                        );
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn at_most_one_live_execution_and_one_outcome_per_key(steps in prop::collection::vec(step(), 1..60)) {
        run(steps);
    }
}
