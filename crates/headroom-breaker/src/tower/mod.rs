//! tower middleware (feature `tower`).
//!
//! - [`CircuitBreakerLayer`] wraps a service in a [`CircuitBreaker`](crate::CircuitBreaker):
//!   a refused call fails with [`Error::CircuitOpen`](crate::Error::CircuitOpen) without
//!   reaching the service, and each response is recorded. Its future does not allocate.
//! - [`PipelineLayer`] runs each request through a whole [`Pipeline`](crate::Pipeline). Each
//!   attempt (and hedge) calls a clone of the service with a clone of the request, so both
//!   must be `Clone`; the response future is boxed.
//!
//! - [`RetryLayer`], [`TimeoutLayer`], [`HedgeLayer`] and [`FallbackLayer`] apply one strategy
//!   each, for stacks that compose their own order. A retry or hedge calls a clone of the
//!   service with a clone of the request for each attempt, so both must be `Clone`; a timeout
//!   drops (cancels) the response future it gives up on; a fallback wraps a service failing
//!   with [`Error`](crate::Error), so it goes outside the other layers. Their futures are boxed,
//!   except the fallback's.
//!
//! All keep the service's error typed inside [`Error`](crate::Error) (the hedge adds no error
//! and returns the service's own).
//!
//! ```
//! use headroom_breaker::CircuitBreaker;
//! use headroom_breaker::tower::CircuitBreakerLayer;
//! use tower_layer::Layer;
//!
//! # fn wrap<S>(service: S) -> Result<(), headroom_breaker::ConfigError> {
//! let breaker = CircuitBreaker::<std::io::Error>::builder().name("users").build()?;
//! let service = CircuitBreakerLayer::new(breaker).layer(service);
//! # drop(service);
//! # Ok(())
//! # }
//! ```

mod future;
mod layer;
mod service;

pub use future::{FallbackFuture, ResponseFuture};
pub use layer::{
    CircuitBreakerLayer, FallbackLayer, HedgeLayer, PipelineLayer, RetryLayer, TimeoutLayer,
};
pub use service::{
    CircuitBreakerService, FallbackService, HedgeService, PipelineService, RetryService,
    TimeoutService,
};
