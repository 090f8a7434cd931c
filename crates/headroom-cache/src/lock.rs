//! The fleet lock: one load of a key at a time across every instance sharing a lease store.
//! The holder loads; the others wait, bounded, for its value to appear in L2.

use std::time::Duration;

use headroom_core::lease::{
    Begin, BeginId, DynLeaseStore, FencingToken, LeaseStore, may_have_applied,
    release_in_background,
};
use headroom_core::{Clock, Key, Namespace};

use crate::ConfigError;

/// Ends the namespace of the lock records, beside the L2 namespace (`<l2 namespace>.fleet-lock`).
pub(crate) const BESIDE: &str = ".fleet-lock";

pub(crate) struct FleetLock {
    store: DynLeaseStore,
    /// Beside the L2 namespace, never inside it, so lock records are not taken for entries.
    namespace: Namespace,
    /// The longest an instance waits for another's load before loading itself.
    pub(crate) wait: Duration,
}

/// What claiming the lock of a key gave.
pub(crate) enum Claim {
    /// This instance loads; the lock is released when the guard is dropped.
    Held(LockGuard),
    /// Another instance is loading the key.
    Taken,
    /// The lease store did not answer (in time): load without the lock.
    Unavailable,
}

impl FleetLock {
    pub(crate) fn new(
        store: DynLeaseStore,
        l2: &Namespace,
        wait: Duration,
    ) -> Result<Self, ConfigError> {
        let namespace = Namespace::new(&format!("{}{BESIDE}", l2.as_str()))
            .map_err(|_| ConfigError::new("the l2 namespace is too long for a fleet lock"))?;
        if wait.is_zero() || wait > crate::config::MAX_TIME {
            return Err(ConfigError::new(
                "the fleet lock wait must be greater than zero and at most ten years",
            ));
        }
        Ok(Self {
            store,
            namespace,
            wait,
        })
    }

    /// Claims the lock of `key` for `lease`, giving the store at most `timeout` to answer.
    pub(crate) async fn claim(
        &self,
        key: &[u8],
        lease: Duration,
        clock: &Clock,
        timeout: Duration,
    ) -> Claim {
        let Ok(key) = self.namespace.key(key) else {
            return Claim::Unavailable;
        };
        // Until the store answers, the claim may have taken the lock without knowing it: a
        // claim that times out, fails with its answer lost, or is dropped releases what it
        // may hold, rather than leave the others waiting on nobody for its lease.
        let mut claiming = Claiming {
            store: &self.store,
            key: &key,
            lease,
            id: BeginId::random(),
            clock,
            answered: false,
        };
        let begin = tokio::select! {
            begin = self.store.begin(&key, b"", lease, claiming.id) => begin,
            () = clock.sleep(timeout) => return Claim::Unavailable,
        };
        claiming.answered = !matches!(&begin, Err(error) if may_have_applied(error));
        drop(claiming);
        match begin {
            Ok(Begin::Acquired { token, .. }) => Claim::Held(LockGuard {
                store: self.store.clone(),
                key,
                token,
            }),
            Ok(Begin::InProgress { .. }) => Claim::Taken,
            Ok(_) | Err(_) => Claim::Unavailable,
        }
    }
}

/// A claim on its way to the store; dropped before its answer, it releases the lease that
/// claim may have taken.
struct Claiming<'a> {
    store: &'a DynLeaseStore,
    key: &'a Key,
    lease: Duration,
    id: BeginId,
    clock: &'a Clock,
    answered: bool,
}

impl Drop for Claiming<'_> {
    fn drop(&mut self) {
        if !self.answered {
            let (store, key, id) = (self.store.clone(), self.key.clone(), self.id);
            release_in_background(
                move || {
                    let (store, key) = (store.clone(), key.clone());
                    async move { store.release_begun(&key, id).await }
                },
                self.lease,
                self.clock,
            );
        }
    }
}

/// A held fleet lock, released (in a spawned task) when dropped; a lock whose release is lost
/// expires with its lease.
pub(crate) struct LockGuard {
    store: DynLeaseStore,
    key: Key,
    token: FencingToken,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (store, key, token) = (self.store.clone(), self.key.clone(), self.token);
            runtime.spawn(async move {
                let _ = store.release(&key, token).await;
            });
        }
    }
}
