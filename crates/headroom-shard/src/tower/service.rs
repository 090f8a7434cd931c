use std::task::{Context, Poll};

use tower_service::Service;

use super::{BoxError, MissingShardKey, ResponseFuture};
use crate::Router;
use crate::error::UnknownShard;
use crate::hash::ShardKey;

/// Finds the shard key of a request.
///
/// Implemented for every closure `Fn(&Req) -> Option<K>` where `K` is a [`ShardKey`]; implement
/// it by hand to hash a key borrowed from the request without copying it.
pub trait ShardKeyExtractor<Req> {
    /// Calls `route` with the key bytes of `request`, or returns `None` when it has no key.
    fn with_shard_key<T>(&self, request: &Req, route: impl FnOnce(&[u8]) -> T) -> Option<T>;
}

impl<Req, K, F> ShardKeyExtractor<Req> for F
where
    F: Fn(&Req) -> Option<K>,
    K: ShardKey,
{
    fn with_shard_key<T>(&self, request: &Req, route: impl FnOnce(&[u8]) -> T) -> Option<T> {
        self(request).map(|key| key.with_key_bytes(route))
    }
}

/// Sends each request to the service of its shard; see [`ShardLayer`](super::ShardLayer).
#[derive(Clone, Debug)]
pub struct Sharded<S, R, E> {
    services: Vec<S>,
    router: R,
    extractor: E,
}

impl<S, R, E> Sharded<S, R, E> {
    /// `services[i]` serves logical shard `i`.
    pub fn new(services: Vec<S>, router: R, extractor: E) -> Self {
        Self {
            services,
            router,
            extractor,
        }
    }

    /// The services, indexed by shard.
    pub fn services(&self) -> &[S] {
        &self.services
    }
}

impl<S, R, E, Req> Service<Req> for Sharded<S, R, E>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    R: Router,
    E: ShardKeyExtractor<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req>;

    /// Always ready: each request waits for its own shard's service in its response future,
    /// so a busy shard never holds up requests for the others.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let router = &self.router;
        let Some(shard) = self
            .extractor
            .with_shard_key(&request, |key| router.route_bytes(key))
        else {
            return ResponseFuture::rejected(MissingShardKey);
        };
        match self.services.get(shard.index()) {
            // A clone per request, as tower's `Oneshot` does: the clone reserves its own
            // readiness (a permit, a buffer slot) for this request alone.
            Some(service) => ResponseFuture::waiting(service.clone(), request),
            None => ResponseFuture::rejected(UnknownShard(shard)),
        }
    }
}
