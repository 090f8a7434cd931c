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
    S: Service<Req>,
    S::Error: Into<BoxError>,
    R: Router,
    E: ShardKeyExtractor<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Any shard may receive the next request, so all must be ready (as tower's `Steer`).
        let mut pending = false;
        for service in &mut self.services {
            match service.poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error.into())),
                Poll::Pending => pending = true,
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let router = &self.router;
        let Some(shard) = self
            .extractor
            .with_shard_key(&request, |key| router.route_bytes(key))
        else {
            return ResponseFuture::rejected(MissingShardKey);
        };
        match self.services.get_mut(shard.index()) {
            Some(service) => ResponseFuture::called(service.call(request)),
            None => ResponseFuture::rejected(UnknownShard(shard)),
        }
    }
}
