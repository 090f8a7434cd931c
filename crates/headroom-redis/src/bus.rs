use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use headroom_core::bus::{BusEvent, InvalidationBus, LossReason, Subscription};
use headroom_core::{BackendError, Key};
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use crate::connection::bounded;
use crate::error::backend_error;
use crate::{Redis, RedisMode};

/// Events a subscriber may fall behind by before it is told it lost some.
pub(crate) const SUBSCRIBER_BUFFER: usize = 1024;

/// The Redis [`InvalidationBus`]: `PUBLISH`/`SUBSCRIBE` on a standalone server, sharded
/// `SPUBLISH`/`SSUBSCRIBE` on a cluster (a channel lives on the node owning its slot, so
/// messages do not fan out to every node).
///
/// Subscriptions share one dedicated RESP3 connection (separate from the command connection).
/// When it drops, every subscription yields [`BusEvent::Lost`]; the connection is
/// re-established and its channels resubscribed by itself, and each subscription yields
/// [`BusEvent::Live`] again once Redis confirms. A subscriber that falls
/// 1,024 events behind yields `Lost(Lagged(n))`.
///
/// While a subscription is not live, the bus pings its connection so that it reconnects even
/// after an outage longer than the client's own reconnection attempts. A connection that
/// stalls without closing is not detected here: consumers detect silence with their own
/// liveness messages, as the bus contract says.
#[derive(Clone, Debug)]
pub struct RedisBus {
    inner: Arc<Inner>,
}

struct Inner {
    publisher: Redis,
    subscriber: SubscriberConn,
    channels: Arc<Mutex<HashMap<Bytes, Channel>>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus")
            .field("publisher", &self.publisher)
            .field("channels", &self.channels.lock().len())
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
enum SubscriberConn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

#[derive(Default)]
struct Channel {
    subscribers: Vec<Subscriber>,
    /// Redis confirmed the subscription and no disconnection was seen since.
    live: bool,
}

pub(crate) struct Subscriber {
    events: mpsc::Sender<BusEvent>,
    /// Events dropped because the subscriber was full, not yet reported.
    lagged: u64,
}

impl Subscriber {
    /// A subscriber sending to `events`.
    pub(crate) fn new(events: mpsc::Sender<BusEvent>) -> Self {
        Self { events, lagged: 0 }
    }

    /// Delivers `event`, first reporting any loss; returns false once the subscriber is gone.
    pub(crate) fn deliver(&mut self, event: BusEvent) -> bool {
        if self.lagged > 0 {
            match self
                .events
                .try_send(BusEvent::Lost(LossReason::Lagged(self.lagged)))
            {
                Ok(()) => {
                    self.lagged = 0;
                    if !self.send(BusEvent::Live) {
                        return !self.events.is_closed();
                    }
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.lagged += 1;
                    return true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        self.send(event);
        !self.events.is_closed()
    }

    fn send(&mut self, event: BusEvent) -> bool {
        match self.events.try_send(event) {
            Ok(()) => true,
            Err(_) => {
                self.lagged += 1;
                false
            }
        }
    }
}

impl RedisBus {
    /// A bus publishing through `redis` and subscribing through a dedicated connection made
    /// from the same configuration.
    pub async fn connect(redis: Redis) -> Result<Self, BackendError> {
        let config = redis.config().clone();
        let (pushes, pushed) = mpsc::unbounded_channel::<PushInfo>();
        let subscriber = match config.mode {
            RedisMode::Standalone => {
                let manager = push_connection(&config, pushes, true).await?;
                SubscriberConn::Standalone(manager)
            }
            RedisMode::Cluster => {
                let client = ClusterClientBuilder::new(config.urls.iter().map(String::as_str))
                    .connection_timeout(config.connect_timeout)
                    .response_timeout(config.command_timeout)
                    .use_protocol(ProtocolVersion::RESP3)
                    .push_sender(pushes)
                    .build()
                    .map_err(backend_error)?;
                let connect = client.get_async_connection();
                let conn = bounded(config.connect_timeout.saturating_mul(2), connect).await?;
                SubscriberConn::Cluster(conn)
            }
        };
        let channels = Arc::new(Mutex::new(HashMap::new()));
        tokio::spawn(route(pushed, Arc::downgrade(&channels)));
        tokio::spawn(revive(
            subscriber.clone(),
            Arc::downgrade(&channels),
            config.reconnect_max_delay,
            config.command_timeout,
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                publisher: redis,
                subscriber,
                channels,
            }),
        })
    }
}

/// While any subscription is not live, pings the subscriber connection every `every`: an idle
/// connection whose own reconnection attempts ran out during a long outage only reconnects
/// (and resubscribes) when a command fails on it.
async fn revive(
    subscriber: SubscriberConn,
    channels: std::sync::Weak<Mutex<HashMap<Bytes, Channel>>>,
    every: Duration,
    timeout: Duration,
) {
    loop {
        tokio::time::sleep(every).await;
        let Some(channels) = channels.upgrade() else {
            return;
        };
        let all_live = channels
            .lock()
            .values()
            .all(|channel| channel.live || channel.subscribers.is_empty());
        if all_live {
            continue;
        }
        let ping = redis::cmd("PING");
        // A failure is the point: it makes the connection reconnect.
        let _ = match subscriber.clone() {
            SubscriberConn::Standalone(mut conn) => {
                bounded(timeout, ping.query_async::<Value>(&mut conn)).await
            }
            SubscriberConn::Cluster(mut conn) => {
                bounded(timeout, ping.query_async::<Value>(&mut conn)).await
            }
        };
    }
}

/// A dedicated RESP3 connection to a standalone server whose pushes (messages, invalidations,
/// disconnections) go to `pushes`; with `resubscribe`, its channels are subscribed again after a
/// reconnection.
pub(crate) async fn push_connection(
    config: &crate::RedisConfig,
    pushes: mpsc::UnboundedSender<PushInfo>,
    resubscribe: bool,
) -> Result<ConnectionManager, BackendError> {
    let info = config.urls[0]
        .as_str()
        .into_connection_info()
        .map_err(backend_error)?;
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    let client = redis::Client::open(info.set_redis_settings(settings)).map_err(backend_error)?;
    let mut manager = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.command_timeout))
        .set_min_delay(config.reconnect_min_delay)
        .set_max_delay(config.reconnect_max_delay)
        .set_push_sender(pushes);
    if resubscribe {
        manager = manager.set_automatic_resubscription();
    }
    let connect = ConnectionManager::new_with_config(client, manager);
    bounded(config.connect_timeout.saturating_mul(2), connect).await
}

/// Dispatches pushes from the subscriber connection to subscriptions until the bus is dropped.
async fn route(
    mut pushed: mpsc::UnboundedReceiver<PushInfo>,
    channels: std::sync::Weak<Mutex<HashMap<Bytes, Channel>>>,
) {
    while let Some(push) = pushed.recv().await {
        let Some(channels) = channels.upgrade() else {
            return;
        };
        let mut channels = channels.lock();
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                if let [Value::BulkString(name), Value::BulkString(payload)] = push.data.as_slice()
                    && let Some(channel) = channels.get_mut(name.as_slice())
                {
                    let payload = Bytes::copy_from_slice(payload);
                    channel
                        .subscribers
                        .retain_mut(|s| s.deliver(BusEvent::Message(payload.clone())));
                }
            }
            PushKind::Subscribe | PushKind::SSubscribe => {
                if let Some(Value::BulkString(name)) = push.data.first()
                    && let Some(channel) = channels.get_mut(name.as_slice())
                    && !channel.live
                {
                    channel.live = true;
                    channel
                        .subscribers
                        .retain_mut(|s| s.deliver(BusEvent::Live));
                }
            }
            PushKind::Disconnection => {
                for channel in channels.values_mut() {
                    if channel.live {
                        channel.live = false;
                        channel
                            .subscribers
                            .retain_mut(|s| s.deliver(BusEvent::Lost(LossReason::Disconnected)));
                    }
                }
            }
            _ => {}
        }
    }
}

impl InvalidationBus for RedisBus {
    async fn publish(&self, channel: &Key, message: Bytes) -> Result<(), BackendError> {
        let command = if self.inner.publisher.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        let _receivers: i64 = self
            .inner
            .publisher
            .query(
                redis::cmd(command)
                    .arg(channel.as_bytes())
                    .arg(message.as_ref()),
            )
            .await?;
        Ok(())
    }

    async fn subscribe(&self, channel: &Key) -> Result<Subscription, BackendError> {
        let name = channel.to_bytes();
        let (events, received) = mpsc::channel(SUBSCRIBER_BUFFER);
        let first = {
            let mut channels = self.inner.channels.lock();
            let entry = channels.entry(name.clone()).or_default();
            let mut subscriber = Subscriber { events, lagged: 0 };
            if entry.live {
                subscriber.deliver(BusEvent::Live);
            }
            entry.subscribers.push(subscriber);
            entry.subscribers.len() == 1
        };
        if first {
            let timeout = self.inner.publisher.config().command_timeout;
            let subscribed = match self.inner.subscriber.clone() {
                SubscriberConn::Standalone(mut conn) => {
                    bounded(timeout, conn.subscribe(name.as_ref())).await
                }
                SubscriberConn::Cluster(mut conn) => {
                    bounded(timeout, conn.ssubscribe(name.as_ref())).await
                }
            };
            if let Err(err) = subscribed {
                self.inner.channels.lock().remove(&name);
                return Err(err);
            }
        }
        let events = stream::unfold(received, |mut received| async move {
            received.recv().await.map(|event| (event, received))
        });
        Ok(Subscription::new(events))
    }
}
