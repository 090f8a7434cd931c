//! tower middleware (feature `tower`).
//!
//! - [`CircuitBreakerLayer`] wraps a service in a [`CircuitBreaker`](crate::CircuitBreaker):
//!   a refused call fails with [`Error::CircuitOpen`](crate::Error::CircuitOpen) without
//!   reaching the service, and each response is recorded. Its future does not allocate.
//! - [`PipelineLayer`] runs each request through a whole [`Pipeline`](crate::Pipeline). Each
//!   attempt (and hedge) calls a clone of the service with a clone of the request, so both
//!   must be `Clone`; the response future is boxed.
//!
//! Both keep the service's error typed inside [`Error`](crate::Error).
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

pub use future::ResponseFuture;
pub use layer::{CircuitBreakerLayer, PipelineLayer};
pub use service::{CircuitBreakerService, PipelineService};
