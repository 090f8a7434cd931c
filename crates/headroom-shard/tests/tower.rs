//! The tower service that routes requests by shard key.
#![cfg(feature = "tower")]

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use headroom_shard::tower::{BoxError, MissingShardKey, ShardKeyExtractor, ShardLayer};
use headroom_shard::{JumpRouter, Router, ShardId, UnknownShard};
use tower::{Layer, Service, ServiceExt, service_fn};

struct Request {
    tenant: Option<u64>,
}

#[tokio::test]
async fn requests_reach_the_service_of_their_shard() {
    let router = JumpRouter::new(8).unwrap();
    let calls: Arc<Vec<AtomicUsize>> = Arc::new((0..8).map(|_| AtomicUsize::new(0)).collect());
    let services: Vec<_> = (0..8)
        .map(|shard: usize| {
            let calls = Arc::clone(&calls);
            service_fn(move |_: Request| {
                calls[shard].fetch_add(1, Ordering::Relaxed);
                async move { Ok::<_, Infallible>(shard) }
            })
        })
        .collect();
    let mut service = ShardLayer::new(router, |r: &Request| r.tenant).layer(services);
    for tenant in 0..200u64 {
        let shard = service
            .ready()
            .await
            .unwrap()
            .call(Request {
                tenant: Some(tenant),
            })
            .await
            .unwrap();
        assert_eq!(ShardId(shard as u32), router.route(&tenant));
    }
    assert_eq!(
        calls
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum::<usize>(),
        200
    );
    let err = service
        .ready()
        .await
        .unwrap()
        .call(Request { tenant: None })
        .await
        .unwrap_err();
    assert!(err.is::<MissingShardKey>());
}

/// Hashes a key borrowed from the request, without copying it.
#[derive(Clone)]
struct Borrowed;

impl ShardKeyExtractor<(String, u8)> for Borrowed {
    fn with_shard_key<T>(
        &self,
        request: &(String, u8),
        route: impl FnOnce(&[u8]) -> T,
    ) -> Option<T> {
        Some(route(request.0.as_bytes()))
    }
}

#[tokio::test]
async fn routes_outside_the_services_are_unknown_shards() {
    let services = vec![service_fn(|_: (String, u8)| async { Ok::<_, BoxError>(()) }); 2];
    let mut service = ShardLayer::new(JumpRouter::new(4).unwrap(), Borrowed).layer(services);
    let mut unknown = 0;
    for i in 0..32 {
        if let Err(err) = service
            .ready()
            .await
            .unwrap()
            .call((format!("k{i}"), 0))
            .await
        {
            assert!(
                err.downcast_ref::<UnknownShard>()
                    .is_some_and(|u| u.0 >= ShardId(2))
            );
            unknown += 1;
        }
    }
    assert!(unknown > 0);
}

#[tokio::test]
async fn a_busy_shard_delays_only_its_own_requests() {
    let (busy, mut busy_handle) = tower_test_pair();
    let (free, mut free_handle) = tower_test_pair();
    free_handle.allow(1);
    busy_handle.allow(0);
    let router = JumpRouter::new(2).unwrap();
    let key_on = |shard: u32| {
        (0..100u64)
            .find(|k| router.route(k) == ShardId(shard))
            .unwrap()
    };
    let (busy_key, free_key) = (key_on(0), key_on(1));
    let mut service = ShardLayer::new(router, |key: &u64| Some(*key)).layer(vec![busy, free]);
    // Shard 0 is not ready, yet the service is: a request for shard 1 goes through.
    assert!(futures_poll_ready(&mut service).is_ready());
    let done = poll_once(service.call(free_key)).await;
    assert!(matches!(done, Some(Ok(()))), "{done:?}");
    // A request for shard 0 waits for shard 0 alone, and completes once it is ready.
    let mut waiting = service.call(busy_key);
    assert!(poll_once(&mut waiting).await.is_none());
    assert!(futures_poll_ready(&mut service).is_ready());
    busy_handle.allow(1);
    assert!(matches!(poll_once(&mut waiting).await, Some(Ok(()))));
}

/// Polls `future` once.
async fn poll_once<F: Future + Unpin>(mut future: F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut future).poll(cx) {
            std::task::Poll::Ready(output) => Some(output),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

fn futures_poll_ready<Req, S: Service<Req>>(
    service: &mut S,
) -> std::task::Poll<Result<(), S::Error>> {
    let waker = std::task::Waker::noop();
    service.poll_ready(&mut std::task::Context::from_waker(waker))
}

/// A service whose readiness the test controls: ready while it has permits.
#[derive(Clone)]
struct Gate(Arc<AtomicUsize>);

struct GateHandle(Arc<AtomicUsize>);

impl GateHandle {
    fn allow(&mut self, permits: usize) {
        self.0.store(permits, Ordering::Release);
    }
}

fn tower_test_pair() -> (Gate, GateHandle) {
    let permits = Arc::new(AtomicUsize::new(0));
    (Gate(Arc::clone(&permits)), GateHandle(permits))
}

impl<Req> Service<Req> for Gate {
    type Response = ();
    type Error = Infallible;
    type Future = std::future::Ready<Result<(), Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        if self.0.load(Ordering::Acquire) > 0 {
            std::task::Poll::Ready(Ok(()))
        } else {
            std::task::Poll::Pending
        }
    }

    fn call(&mut self, _: Req) -> Self::Future {
        std::future::ready(Ok(()))
    }
}
