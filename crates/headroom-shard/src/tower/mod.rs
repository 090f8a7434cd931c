//! tower middleware that sends each request to the service of its shard.
//!
//! [`ShardLayer`] turns one service per logical shard (a `Vec<S>` indexed by [`ShardId`])
//! into a single [`Sharded`] service: it extracts the request's shard key with a
//! [`ShardKeyExtractor`] (any closure `Fn(&Req) -> Option<K>` works), routes it, and calls that
//! shard's service. Unlike tower's `Steer`, it does not wait for every shard: it is always
//! ready, and each request waits in its response future for its own shard's service (a clone
//! of it, so shard services must be `Clone`; wrap one that is not in tower's `Buffer`). A busy
//! or stalled shard delays only the requests routed to it; bound each shard with a concurrency
//! limit or a buffer to apply backpressure.
//!
//! ```
//! use headroom_shard::tower::{ShardLayer, MissingShardKey};
//! use headroom_shard::JumpRouter;
//! use tower::{Layer, Service, ServiceExt, service_fn};
//!
//! # tokio_test();
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn tokio_test() {
//! let shards: Vec<_> = (0..4)
//!     .map(|shard| service_fn(move |user: String| async move {
//!         Ok::<_, std::convert::Infallible>(format!("{user} served by shard {shard}"))
//!     }))
//!     .collect();
//! let layer = ShardLayer::new(JumpRouter::new(4).unwrap(), |user: &String| {
//!     (!user.is_empty()).then(|| user.clone())
//! });
//! let mut service = layer.layer(shards);
//! let reply = service.ready().await.unwrap().call("alice".to_owned()).await.unwrap();
//! assert!(reply.starts_with("alice served by shard"));
//! let err = service.ready().await.unwrap().call(String::new()).await.unwrap_err();
//! assert!(err.is::<MissingShardKey>());
//! # }
//! ```
//!
//! [`ShardId`]: crate::ShardId

mod error;
mod future;
mod layer;
mod service;

pub use error::{BoxError, MissingShardKey};
pub use future::ResponseFuture;
pub use layer::ShardLayer;
pub use service::{ShardKeyExtractor, Sharded};
