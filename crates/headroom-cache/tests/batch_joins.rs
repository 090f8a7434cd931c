//! Single-key reads that join a batch load: they get what the batch knows of their key as soon
//! as it knows it, and never a value past its TTL.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use headroom_cache::{Cache, CacheErrorKind};
use headroom_core::memory::MemoryKvStore;
use headroom_core::{ManualClock, Namespace};
use tokio::sync::Semaphore;

const SEC: Duration = Duration::from_secs(1);

fn cache(clock: &ManualClock, soft_ttl: Option<Duration>) -> Cache<String, String> {
    let mut builder = Cache::builder().clock(clock.clock()).ttl(10 * SEC).l2(
        MemoryKvStore::builder().clock(clock.clock()).build(),
        Namespace::new("test:batch_joins").unwrap(),
    );
    if let Some(soft_ttl) = soft_ttl {
        builder = builder.soft_ttl(soft_ttl);
    }
    builder.build().unwrap()
}

/// A batch loader that waits for `gate`, then answers every key (or fails).
fn gated(
    gate: &Arc<Semaphore>,
    fails: bool,
) -> impl FnOnce(
    Vec<String>,
) -> futures_util::future::BoxFuture<
    'static,
    Result<HashMap<String, String>, std::io::Error>,
> + Send
+ 'static {
    let gate = Arc::clone(gate);
    move |keys| {
        async move {
            let _permit = gate.acquire().await;
            if fails {
                return Err(std::io::Error::other("database down"));
            }
            Ok(keys
                .into_iter()
                .map(|k| (k.clone(), format!("{k}-loaded")))
                .collect())
        }
        .boxed()
    }
}

/// A batch finds "c" in L2 near the end of its TTL and waits in its loader for "b". A caller of
/// "c" after that TTL, while the loader still runs, must not get the expired value: not
/// when the loader then succeeds (the batch does not reload "c"), and not when "c" was being
/// refreshed and the loader fails (no fail-safe is configured).
#[tokio::test(start_paused = true)]
async fn a_caller_joining_a_batch_after_a_keys_ttl_gets_no_expired_value() {
    for (soft_ttl, fails) in [(None, false), (Some(5 * SEC), true)] {
        let clock = ManualClock::new();
        let cache = cache(&clock, soft_ttl);
        let c = "c".to_owned();
        cache.insert(c.clone(), "c1".to_owned()).await.unwrap();
        clock.advance(9 * SEC);
        if soft_ttl.is_none() {
            // Read from L2 by the batch.
            cache.invalidate_local(&c);
        }
        let gate = Arc::new(Semaphore::new(0));
        let batch = tokio::spawn({
            let (cache, keys) = (cache.clone(), [c.clone(), "b".to_owned()]);
            let loader = gated(&gate, fails);
            async move { cache.get_many_or_load(&keys, loader).await }
        });
        // The batch answers what it found and waits in its loader.
        common::idle().await;
        clock.advance(2 * SEC);
        assert_eq!(cache.get(&c).await.unwrap(), None, "past the TTL");
        let single = tokio::spawn({
            let (cache, c) = (cache.clone(), c.clone());
            async move {
                cache
                    .get_or_load(&c, |_| async { Ok::<_, Infallible>(Some("c2".to_owned())) })
                    .await
            }
        });
        common::idle().await;
        gate.add_permits(1);
        let single = single.await.unwrap();
        assert_ne!(
            single.as_ref().ok().cloned().flatten().as_deref(),
            Some("c1"),
            "a value past its TTL was served (soft TTL {soft_ttl:?}, loader fails: {fails})"
        );
        let _ = batch.await.unwrap();
    }
}

/// A single read joins a batch for "c", which the batch then finds in L2; the batch's loader,
/// called for "b" alone, panics. The single read gets "c"'s value: the loader was not its.
#[tokio::test]
async fn a_caller_joining_a_batch_gets_its_keys_value_when_the_loader_panics_for_another() {
    let clock = ManualClock::new();
    let cache = cache(&clock, None);
    let c = "c".to_owned();
    cache.insert(c.clone(), "c1".to_owned()).await.unwrap();
    cache.invalidate_local(&c);
    let keys = [c.clone(), "b".to_owned()];
    let mut batch = Box::pin(cache.get_many_or_load(&keys, |_keys: Vec<String>| async {
        if true {
            panic!("the loader panicked");
        }
        Ok::<HashMap<String, String>, Infallible>(HashMap::new())
    }));
    // One poll: the batch misses L1 and registers its keys; its task has not run yet.
    assert!((&mut batch).now_or_never().is_none());
    let single = cache.get_or_load(&c, |_| async { Ok::<_, Infallible>(Some("c2".to_owned())) });
    let (batch, single) = tokio::join!(batch, single);
    assert_eq!(
        batch.unwrap_err().kind(),
        CacheErrorKind::LoaderPanicked,
        "the batch's own caller shares its loader's fate"
    );
    assert_eq!(
        single.unwrap().as_deref(),
        Some("c1"),
        "the joiner got its key's value, found in L2 before the loader ran"
    );
}
