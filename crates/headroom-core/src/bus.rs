//! The invalidation bus: small messages fanned out to every instance of a service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use futures_util::stream::BoxStream;

use crate::{BackendError, Key};

/// What a [`Subscription`] yields.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BusEvent {
    /// A message published on the channel.
    Message(Bytes),
    /// Messages may have been lost since the previous event: the subscription fell behind, or
    /// its connection dropped. A consumer that keeps derived state (an L1 cache) must treat
    /// everything it learned before this event as possibly stale.
    Lost(LossReason),
    /// The subscription is (again) receiving messages. Every subscription yields this first,
    /// once it is live, and again after each recovery from [`BusEvent::Lost`].
    Live,
}

/// Why messages may have been lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LossReason {
    /// The subscriber fell behind and this many messages were dropped.
    Lagged(u64),
    /// The connection carrying the subscription dropped.
    Disconnected,
}

/// A live subscription to one channel: a stream of [`BusEvent`]s.
///
/// Dropping it unsubscribes. The stream ends only when the bus itself is shut down.
pub struct Subscription {
    events: BoxStream<'static, BusEvent>,
}

impl Subscription {
    /// Wraps a stream of events; used by bus implementations.
    pub fn new(events: impl Stream<Item = BusEvent> + Send + 'static) -> Self {
        Self {
            events: Box::pin(events),
        }
    }

    /// The next event, or `None` once the bus is shut down.
    pub async fn next_event(&mut self) -> Option<BusEvent> {
        futures_util::StreamExt::next(&mut self.events).await
    }
}

impl Stream for Subscription {
    type Item = BusEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<BusEvent>> {
        self.events.as_mut().poll_next(cx)
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

/// A publish/subscribe channel between the instances of a service.
///
/// # Contract
///
/// - Delivery is at most once and may lose messages; a bus never loses them silently: a
///   subscription yields [`BusEvent::Lost`] when it may have missed any (it fell behind, or its
///   connection dropped) and [`BusEvent::Live`] once it receives again. Consumers detect the
///   rest (a silent channel) with their own sequence numbers and liveness pings.
/// - Messages published by one publisher on one channel arrive in publish order.
/// - A subscriber receives messages published after its subscription yielded
///   [`BusEvent::Live`], including its own instance's; filtering its own is the consumer's job.
/// - Messages are small (invalidations, not values); implementations may refuse large ones with
///   [`BackendErrorKind::TooLarge`](crate::BackendErrorKind::TooLarge).
/// - `publish` succeeds once the message is handed to the bus, whether or not anyone listens.
pub trait InvalidationBus: Send + Sync + fmt::Debug + 'static {
    /// Publishes `message` on `channel`.
    fn publish(
        &self,
        channel: &Key,
        message: Bytes,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Subscribes to `channel`.
    fn subscribe(
        &self,
        channel: &Key,
    ) -> impl Future<Output = Result<Subscription, BackendError>> + Send;
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

trait ErasedBus: Send + Sync + fmt::Debug + 'static {
    fn publish<'a>(
        &'a self,
        channel: &'a Key,
        message: Bytes,
    ) -> BoxFuture<'a, Result<(), BackendError>>;
    fn subscribe<'a>(
        &'a self,
        channel: &'a Key,
    ) -> BoxFuture<'a, Result<Subscription, BackendError>>;
}

impl<B: InvalidationBus> ErasedBus for B {
    fn publish<'a>(
        &'a self,
        channel: &'a Key,
        message: Bytes,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(InvalidationBus::publish(self, channel, message))
    }
    fn subscribe<'a>(
        &'a self,
        channel: &'a Key,
    ) -> BoxFuture<'a, Result<Subscription, BackendError>> {
        Box::pin(InvalidationBus::subscribe(self, channel))
    }
}

/// An [`InvalidationBus`] chosen at run time, behind one cheap-to-clone type.
#[derive(Clone, Debug)]
pub struct DynInvalidationBus(Arc<dyn ErasedBus>);

impl DynInvalidationBus {
    /// Erases the type of `bus`.
    pub fn new(bus: impl InvalidationBus) -> Self {
        Self(Arc::new(bus))
    }
}

impl InvalidationBus for DynInvalidationBus {
    async fn publish(&self, channel: &Key, message: Bytes) -> Result<(), BackendError> {
        self.0.publish(channel, message).await
    }
    async fn subscribe(&self, channel: &Key) -> Result<Subscription, BackendError> {
        self.0.subscribe(channel).await
    }
}
