use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream;
use parking_lot::Mutex;
use tokio::sync::broadcast;

use crate::bus::{BusEvent, InvalidationBus, LossReason, Subscription};
use crate::{BackendError, BackendErrorKind, Key};

/// An in-memory [`InvalidationBus`] on tokio broadcast channels, for instances of a cache that
/// live in one process.
///
/// A subscriber that falls more than `capacity` messages behind gets
/// [`BusEvent::Lost`] with [`LossReason::Lagged`], then [`BusEvent::Live`].
#[derive(Clone, Debug)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    channels: Mutex<HashMap<Key, broadcast::Sender<Bytes>>>,
    capacity: usize,
}

impl MemoryBus {
    /// The largest message accepted, in bytes.
    pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

    /// A bus whose subscribers may fall 1,024 messages behind before losing any.
    pub fn new() -> Self {
        Self::with_capacity(1024)
    }

    /// A bus whose subscribers may fall `capacity` messages behind before losing any.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                channels: Mutex::new(HashMap::new()),
                capacity: capacity.max(1),
            }),
        }
    }
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::new()
    }
}

impl InvalidationBus for MemoryBus {
    async fn publish(&self, channel: &Key, message: Bytes) -> Result<(), BackendError> {
        if message.len() > Self::MAX_MESSAGE_LEN {
            return Err(BackendError::with_detail(
                BackendErrorKind::TooLarge,
                format!(
                    "message of {} bytes exceeds {}",
                    message.len(),
                    Self::MAX_MESSAGE_LEN
                ),
            ));
        }
        let mut channels = self.inner.channels.lock();
        if let Some(sender) = channels.get(channel)
            && sender.send(message).is_err()
        {
            // Nobody listens any more: forget the channel so memory stays bounded.
            channels.remove(channel);
        }
        Ok(())
    }

    async fn subscribe(&self, channel: &Key) -> Result<Subscription, BackendError> {
        let receiver = self
            .inner
            .channels
            .lock()
            .entry(channel.clone())
            .or_insert_with(|| broadcast::channel(self.inner.capacity).0)
            .subscribe();
        let events = stream::unfold(
            (receiver, Some(BusEvent::Live)),
            |(mut receiver, pending)| async move {
                if let Some(event) = pending {
                    return Some((event, (receiver, None)));
                }
                match receiver.recv().await {
                    Ok(message) => Some((BusEvent::Message(message), (receiver, None))),
                    Err(broadcast::error::RecvError::Lagged(missed)) => Some((
                        BusEvent::Lost(LossReason::Lagged(missed)),
                        (receiver, Some(BusEvent::Live)),
                    )),
                    Err(broadcast::error::RecvError::Closed) => None,
                }
            },
        );
        Ok(Subscription::new(events))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Namespace;

    #[tokio::test]
    async fn a_lagging_subscriber_is_told_it_lost_messages_then_goes_live_again() {
        let bus = MemoryBus::with_capacity(4);
        let channel = Namespace::new("t").unwrap().key("ch").unwrap();
        let mut sub = bus.subscribe(&channel).await.unwrap();
        assert_eq!(sub.next_event().await, Some(BusEvent::Live));
        for i in 0..10u8 {
            bus.publish(&channel, Bytes::from(vec![i])).await.unwrap();
        }
        assert_eq!(
            sub.next_event().await,
            Some(BusEvent::Lost(LossReason::Lagged(6)))
        );
        assert_eq!(sub.next_event().await, Some(BusEvent::Live));
        for i in 6..10u8 {
            assert_eq!(
                sub.next_event().await,
                Some(BusEvent::Message(Bytes::from(vec![i])))
            );
        }
    }

    #[tokio::test]
    async fn oversized_messages_are_refused() {
        let bus = MemoryBus::new();
        let channel = Namespace::new("t").unwrap().key("ch").unwrap();
        let err = bus
            .publish(
                &channel,
                Bytes::from(vec![0; MemoryBus::MAX_MESSAGE_LEN + 1]),
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::TooLarge);
    }

    #[tokio::test]
    async fn channels_without_subscribers_are_forgotten() {
        let bus = MemoryBus::new();
        let channel = Namespace::new("t").unwrap().key("ch").unwrap();
        drop(bus.subscribe(&channel).await.unwrap());
        bus.publish(&channel, Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert!(bus.inner.channels.lock().is_empty());
    }
}
