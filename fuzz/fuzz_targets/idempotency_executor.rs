//! The idempotency executor driven by arbitrary sequences of arrivals, completions, failures,
//! cancellations, crashes and time, on the memory store and a manual clock. Checks that no two
//! live executions of a key overlap and that every outcome returned for a key is the first one
//! stored.
#![no_main]

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
use libfuzzer_sys::fuzz_target;
use tokio::sync::oneshot;

const LEASE: Duration = Duration::from_secs(30);

type Call = Pin<Box<dyn Future<Output = Result<Executed<u64>, IdempotencyError<()>>>>>;
type Finisher = Arc<Mutex<Option<oneshot::Sender<Result<u64, ()>>>>>;

struct Pending {
    key: u8,
    call: Call,
    finish: Finisher,
}

#[derive(Default)]
struct State {
    running: HashMap<u8, usize>,
    stored: HashMap<u8, u64>,
}

struct Running(Arc<Mutex<State>>, u8);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(n) = self.0.lock().unwrap().running.get_mut(&self.1) {
            *n = n.saturating_sub(1);
        }
    }
}

async fn poll_all(pending: &mut Vec<Pending>, state: &Arc<Mutex<State>>) {
    for _ in 0..3 {
        tokio::task::yield_now().await;
        let mut i = 0;
        while i < pending.len() {
            match pending[i].call.as_mut().now_or_never() {
                None => i += 1,
                Some(result) => {
                    let done = pending.remove(i);
                    if let Ok(out) = result {
                        let mut state = state.lock().unwrap();
                        let first = *state.stored.entry(done.key).or_insert(out.value);
                        assert_eq!(out.value, first, "two outcomes for one key");
                    }
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        let clock = ManualClock::new();
        let idem = Idempotency::builder(MemoryLeaseStore::with_limits(clock.clock(), 64))
            .clock(clock.clock())
            .lease(LEASE)
            .in_progress(InProgressPolicy::Reject)
            .build()
            .unwrap();
        let scope = Scope::new("tenant", "op").unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let mut pending: Vec<Pending> = Vec::new();
        let mut crashed: Vec<Call> = Vec::new();
        let mut next_value = 0u64;

        for pair in data.chunks(2).take(200) {
            let (op, arg) = (pair[0], *pair.get(1).unwrap_or(&0));
            match op % 5 {
                0 => {
                    let k = arg % 3;
                    let finish: Finisher = Arc::new(Mutex::new(None));
                    let (idem, scope, state2, finish2) = (
                        idem.clone(),
                        scope.clone(),
                        Arc::clone(&state),
                        Arc::clone(&finish),
                    );
                    let call: Call = Box::pin(async move {
                        let key = IdempotencyKey::new(&format!("k{k}")).unwrap();
                        idem.execute(&scope, &key, b"request", || async move {
                            let (tx, rx) = oneshot::channel();
                            *finish2.lock().unwrap() = Some(tx);
                            let running = {
                                let mut s = state2.lock().unwrap();
                                let n = s.running.entry(k).or_default();
                                *n += 1;
                                *n
                            };
                            assert_eq!(running, 1, "two live executions of one key");
                            let _running = Running(state2, k);
                            rx.await.unwrap_or(Err(()))
                        })
                        .await
                    });
                    pending.push(Pending {
                        key: k,
                        call,
                        finish,
                    });
                }
                1 => {
                    let started: Vec<&Pending> = pending
                        .iter()
                        .filter(|p| p.finish.lock().unwrap().is_some())
                        .collect();
                    if !started.is_empty() {
                        let p = started[usize::from(arg) % started.len()];
                        next_value += 1;
                        let tx = p.finish.lock().unwrap().take().unwrap();
                        let _ = tx.send(if arg % 4 == 0 {
                            Err(())
                        } else {
                            Ok(next_value)
                        });
                    }
                }
                2 if !pending.is_empty() => {
                    let i = usize::from(arg) % pending.len();
                    drop(pending.remove(i));
                }
                3 if !pending.is_empty() => {
                    let dead = pending.remove(usize::from(arg) % pending.len());
                    if dead.finish.lock().unwrap().is_some()
                        && let Some(n) = state.lock().unwrap().running.get_mut(&dead.key)
                    {
                        *n -= 1;
                    }
                    crashed.push(dead.call);
                }
                4 => {
                    for _ in 0..(arg % 4 + 1) {
                        clock.advance(LEASE / 4);
                        poll_all(&mut pending, &state).await;
                    }
                }
                _ => {}
            }
            poll_all(&mut pending, &state).await;
        }
        // Crashed calls were never polled or dropped during the run; the checks are done now.
        drop(crashed);
    });
});
