use tower_layer::Layer;

use super::Sharded;

/// Builds a [`Sharded`] service from one service per logical shard.
#[derive(Clone, Debug)]
pub struct ShardLayer<R, E> {
    router: R,
    extractor: E,
}

impl<R, E> ShardLayer<R, E> {
    /// Routes requests with `router` by the key `extractor` finds in them.
    pub fn new(router: R, extractor: E) -> Self {
        Self { router, extractor }
    }
}

impl<S, R: Clone, E: Clone> Layer<Vec<S>> for ShardLayer<R, E> {
    type Service = Sharded<S, R, E>;

    fn layer(&self, services: Vec<S>) -> Self::Service {
        Sharded::new(services, self.router.clone(), self.extractor.clone())
    }
}
