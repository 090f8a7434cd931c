use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::stream;
use headroom_core::bus::{BusEvent, InvalidationBus, LossReason, Subscription};
use headroom_core::{BackendError, BackendErrorKind, Key};
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::{IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::{Notify, mpsc};

use crate::connection::{Conn, bounded, cluster_address_map};
use crate::error::backend_error;
use crate::{Redis, RedisConfig, RedisMode};

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
/// On a cluster, a node that gives the channel's slot away (a slot migration) ends the
/// subscription: it yields [`BusEvent::Lost`], and [`BusEvent::Live`] once subscribed on the
/// new owner. While a subscription is not live, the bus subscribes it again every
/// `reconnect_max_delay`, so that the connection reconnects even after an outage longer than
/// the client's own reconnection attempts. While a subscription is live, the bus pings the
/// connection every `reconnect_max_delay`; one that goes silent without closing (two pings in
/// a row without an answer within `command_timeout`) loses every subscription and is replaced
/// by a new connection, on which they are subscribed again. Consumers still detect shorter silences with their own
/// liveness messages, as the bus contract says.
///
/// Dropping the last subscription of a channel unsubscribes it; dropping the bus and every
/// subscription closes the connection.
#[derive(Clone, Debug)]
pub struct RedisBus {
    inner: Arc<Inner>,
}

struct Inner {
    publisher: Redis,
    subscriber: Arc<Listener>,
    channels: Arc<Mutex<HashMap<Bytes, Channel>>>,
    /// Channels whose subscription was dropped, for the maintenance task to unsubscribe.
    released: mpsc::UnboundedSender<Bytes>,
    /// Held while a channel is subscribed or unsubscribed, so that the commands reach Redis
    /// in the order the decisions were made.
    commands: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus")
            .field("publisher", &self.publisher)
            .field("channels", &self.channels.lock().len())
            .finish_non_exhaustive()
    }
}

/// The subscriber connection, and what dials a new one when it goes silent.
struct Listener {
    conn: ArcSwap<Conn>,
    /// The number of the connection in use. Pushes carry the number of the connection they
    /// came from, and those of replaced connections (which may still reconnect and resubscribe
    /// by themselves until dropped) are ignored.
    generation: Arc<AtomicU64>,
    config: RedisConfig,
    pushes: mpsc::UnboundedSender<Push>,
}

/// A push, with the number of the connection it came from.
type Push = (u64, PushInfo);

/// Sends a connection's pushes to `pushes`, numbered `generation`.
fn numbered(
    pushes: &mpsc::UnboundedSender<Push>,
    generation: u64,
) -> impl redis::aio::AsyncPushSender {
    let pushes = pushes.clone();
    move |push| pushes.send((generation, push))
}

#[derive(Default)]
struct Channel {
    subscribers: Vec<Subscriber>,
    /// Redis confirmed the subscription and no disconnection was seen since.
    live: bool,
}

/// What [`Subscriber::report_loss`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reported {
    /// Nothing was left to report, or it is reported now.
    Yes,
    /// The subscriber is still full: reported later.
    Full,
    /// The subscriber is gone.
    Gone,
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
        // Only a message says the connection is live; `Live` and a loss speak for themselves.
        let live = matches!(event, BusEvent::Message(_));
        match self.report_loss(live) {
            Reported::Yes => {
                self.send(event);
                !self.events.is_closed()
            }
            Reported::Full => {
                self.lagged += 1;
                true
            }
            Reported::Gone => false,
        }
    }

    /// Reports the events dropped so far, if any, as a loss, followed by `Live` when the
    /// connection is `live` (otherwise `Live` comes once it is). Also called when there is
    /// nothing to deliver: a loss must not wait for an event that may not come.
    pub(crate) fn report_loss(&mut self, live: bool) -> Reported {
        if self.lagged == 0 {
            return if self.events.is_closed() {
                Reported::Gone
            } else {
                Reported::Yes
            };
        }
        match self
            .events
            .try_send(BusEvent::Lost(LossReason::Lagged(self.lagged)))
        {
            Ok(()) => {
                self.lagged = 0;
                if !live || self.send(BusEvent::Live) || !self.events.is_closed() {
                    Reported::Yes
                } else {
                    Reported::Gone
                }
            }
            Err(mpsc::error::TrySendError::Full(_)) => Reported::Full,
            Err(mpsc::error::TrySendError::Closed(_)) => Reported::Gone,
        }
    }

    /// Resolves once the subscription is dropped.
    pub(crate) async fn closed(&self) {
        self.events.closed().await;
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
        let (pushes, pushed) = mpsc::unbounded_channel::<Push>();
        let conn = subscriber_connection(&config, numbered(&pushes, 0)).await?;
        let generation = Arc::new(AtomicU64::new(0));
        let subscriber = Arc::new(Listener {
            conn: ArcSwap::from_pointee(conn),
            generation: Arc::clone(&generation),
            config: config.clone(),
            pushes,
        });
        let channels = Arc::new(Mutex::new(HashMap::new()));
        let dropped = Arc::new(Notify::new());
        let (released, to_release) = mpsc::unbounded_channel();
        let commands = Arc::new(tokio::sync::Mutex::new(()));
        tokio::spawn(route(
            pushed,
            generation,
            Arc::downgrade(&channels),
            Arc::clone(&dropped),
        ));
        tokio::spawn(maintain(
            Arc::clone(&subscriber),
            Arc::downgrade(&channels),
            Maintenance {
                dropped,
                to_release,
                commands: Arc::clone(&commands),
                every: config.reconnect_max_delay,
                timeout: config.command_timeout,
            },
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                publisher: redis,
                subscriber,
                channels,
                released,
                commands,
            }),
        })
    }
}

/// What the maintenance task listens to, and how often it acts.
struct Maintenance {
    /// Redis dropped a subscription by itself (a cluster slot moved to another node).
    dropped: Arc<Notify>,
    /// Channels whose last subscription was dropped.
    to_release: mpsc::UnboundedReceiver<Bytes>,
    /// Held while (un)subscribing, shared with `subscribe`.
    commands: Arc<tokio::sync::Mutex<()>>,
    every: Duration,
    timeout: Duration,
}

/// Keeps the subscriber connection in line with the subscriptions until the bus and every
/// subscription are dropped (which closes the connection):
///
/// - channels that are not live are subscribed again every `every`, and at once when Redis
///   dropped one by itself. A cluster node that gives a moved slot away ends the sharded
///   subscriptions of its channels; on a standalone server the command also makes an idle
///   connection whose own reconnection attempts ran out during a long outage reconnect;
/// - channels without subscribers are unsubscribed.
async fn maintain(
    subscriber: Arc<Listener>,
    channels: std::sync::Weak<Mutex<HashMap<Bytes, Channel>>>,
    mut maintenance: Maintenance,
) {
    // Channels to unsubscribe, kept until Redis confirms (a failed command is retried).
    let mut unused: Vec<Bytes> = Vec::new();
    // Pings in a row that got no answer.
    let mut unanswered = 0;
    loop {
        let released = tokio::select! {
            () = tokio::time::sleep(maintenance.every) => None,
            () = maintenance.dropped.notified() => None,
            name = maintenance.to_release.recv() => match name {
                Some(name) => Some(name),
                None => return,
            },
        };
        let Some(channels) = channels.upgrade() else {
            return;
        };
        let _commands = maintenance.commands.lock().await;
        if let Some(name) = released {
            let mut channels = channels.lock();
            let gone = channels.get_mut(&name).is_some_and(|channel| {
                channel.subscribers.retain(|s| !s.events.is_closed());
                channel.subscribers.is_empty()
            });
            if gone {
                channels.remove(&name);
                unused.push(name);
            }
        }
        let mut left = Vec::new();
        for name in unused.drain(..) {
            // Subscribed again meanwhile: keep it.
            if channels.lock().contains_key(&name) {
                continue;
            }
            if subscriber
                .unsubscribe(&name, maintenance.timeout)
                .await
                .is_err()
            {
                left.push(name);
            }
        }
        unused = left;
        // A connection that went silent without closing reports nothing: two pings in a row
        // that get no answer (one may only meet a server briefly busy, and a loss flushes
        // every instance's L1) lose every channel, and a new connection subscribes them below.
        let live = channels.lock().values().any(|channel| channel.live);
        unanswered = if live && !subscriber.answers(maintenance.timeout).await {
            unanswered + 1
        } else {
            0
        };
        if unanswered >= 2 {
            lose_all(&mut channels.lock());
            if subscriber.replace(&channels).await {
                unanswered = 0;
            }
        }
        // A failure is part of the point: it makes a closed connection reconnect. A timeout
        // followed by a ping without an answer may be a silent connection: a new one replaces
        // it, and every channel is subscribed again there (a connection still reconnecting is
        // replaced too, harmlessly).
        for round in 0..2 {
            let stale: Vec<Bytes> = channels
                .lock()
                .iter()
                .filter(|(_, channel)| !channel.live && !channel.subscribers.is_empty())
                .map(|(name, _)| name.clone())
                .collect();
            let mut timed_out = false;
            for name in stale {
                if let Err(error) = subscriber.subscribe(&name, maintenance.timeout).await
                    && error.kind() == BackendErrorKind::Timeout
                {
                    timed_out = true;
                    break;
                }
            }
            let silent = timed_out && round == 0 && !subscriber.answers(maintenance.timeout).await;
            if !silent || !subscriber.replace(&channels).await {
                break;
            }
            unanswered = 0;
        }
    }
}

/// A RESP3 connection whose pushes go to `pushes`.
async fn subscriber_connection(
    config: &RedisConfig,
    pushes: impl redis::aio::AsyncPushSender,
) -> Result<Conn, BackendError> {
    Ok(match config.mode {
        RedisMode::Standalone => Conn::Standalone(push_connection(config, pushes, true).await?),
        RedisMode::Cluster => {
            let client = ClusterClientBuilder::new(config.urls.iter().map(String::as_str))
                .connection_timeout(config.connect_timeout)
                .response_timeout(config.command_timeout)
                .use_protocol(ProtocolVersion::RESP3)
                .push_sender(pushes);
            let client = cluster_address_map(client, config)
                .build()
                .map_err(backend_error)?;
            let connect = client.get_async_connection();
            Conn::Cluster(bounded(config.connect_timeout.saturating_mul(2), connect).await?)
        }
    })
}

impl Listener {
    fn conn(&self) -> Conn {
        Conn::clone(&self.conn.load())
    }

    /// Subscribes to `channel` (sharded on a cluster) within `timeout`.
    async fn subscribe(&self, channel: &[u8], timeout: Duration) -> Result<(), BackendError> {
        match self.conn() {
            Conn::Standalone(mut conn) => bounded(timeout, conn.subscribe(channel)).await,
            Conn::Cluster(mut conn) => bounded(timeout, conn.ssubscribe(channel)).await,
        }
    }

    /// Unsubscribes from `channel` within `timeout`.
    async fn unsubscribe(&self, channel: &[u8], timeout: Duration) -> Result<(), BackendError> {
        match self.conn() {
            Conn::Standalone(mut conn) => bounded(timeout, conn.unsubscribe(channel)).await,
            Conn::Cluster(mut conn) => bounded(timeout, conn.sunsubscribe(channel)).await,
        }
    }

    /// Whether the connection answers a `PING` (every primary's, on a cluster) in time.
    async fn answers(&self, timeout: Duration) -> bool {
        let answer = self
            .conn()
            .query::<Value>(&redis::cmd("PING"), timeout)
            .await;
        !answer.is_err_and(|error| error.kind() == BackendErrorKind::Timeout)
    }

    /// A connection that closed reconnects by itself; one that went silent never learns it
    /// should, so a new one takes its place, and every channel is lost until subscribed
    /// there. A failed dial keeps the old one. Whether it replaced the connection.
    async fn replace(&self, channels: &Mutex<HashMap<Bytes, Channel>>) -> bool {
        let next = self.generation.load(Ordering::SeqCst) + 1;
        match subscriber_connection(&self.config, numbered(&self.pushes, next)).await {
            Ok(fresh) => {
                tracing::warn!("Redis subscriber connection went silent; replaced by a new one");
                let mut channels = channels.lock();
                self.generation.store(next, Ordering::SeqCst);
                self.conn.store(Arc::new(fresh));
                lose_all(&mut channels);
                true
            }
            Err(error) => {
                tracing::warn!(
                    %error,
                    "Redis subscriber connection went silent; dialing a new one failed"
                );
                false
            }
        }
    }
}

/// A dedicated RESP3 connection to a standalone server whose pushes (messages, invalidations,
/// disconnections) go to `pushes`; with `resubscribe`, its channels are subscribed again after a
/// reconnection.
pub(crate) async fn push_connection(
    config: &crate::RedisConfig,
    pushes: impl redis::aio::AsyncPushSender,
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
    mut pushed: mpsc::UnboundedReceiver<Push>,
    generation: Arc<AtomicU64>,
    channels: std::sync::Weak<Mutex<HashMap<Bytes, Channel>>>,
    dropped: Arc<Notify>,
) {
    loop {
        // Every so often without a push too: a subscriber told of no loss for want of room
        // (here, or by the maintenance task) must not wait for a push that may not come.
        let push = tokio::time::timeout(LOSS_REPORT_EVERY, pushed.recv()).await;
        let Some(channels) = channels.upgrade() else {
            return;
        };
        let mut channels = channels.lock();
        let (from, push) = match push {
            Ok(Some(push)) => push,
            Ok(None) => return,
            Err(_) => {
                for channel in channels.values_mut() {
                    let live = channel.live;
                    channel
                        .subscribers
                        .retain_mut(|s| s.report_loss(live) != Reported::Gone);
                }
                continue;
            }
        };
        // Read under the lock a replacement takes to change it: a push of a replaced
        // connection (not yet dropped) is never applied after the replacement lost the
        // channels.
        if from != generation.load(Ordering::SeqCst) {
            continue;
        }
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
            // Redis ended a subscription still in use: a cluster node gave the channel's
            // slot away. (A channel whose last subscription was dropped is no longer listed.)
            PushKind::Unsubscribe | PushKind::SUnsubscribe => {
                if let Some(Value::BulkString(name)) = push.data.first()
                    && let Some(channel) = channels.get_mut(name.as_slice())
                {
                    if channel.live {
                        channel.live = false;
                        channel
                            .subscribers
                            .retain_mut(|s| s.deliver(BusEvent::Lost(LossReason::Disconnected)));
                    }
                    dropped.notify_one();
                }
            }
            PushKind::Disconnection => lose_all(&mut channels),
            _ => {}
        }
    }
}

/// How soon, without a push, a subscriber is told of a loss it had no room for.
const LOSS_REPORT_EVERY: Duration = Duration::from_millis(50);

/// The connection is gone: every live channel is lost until subscribed again.
fn lose_all(channels: &mut HashMap<Bytes, Channel>) {
    for channel in channels.values_mut() {
        if channel.live {
            channel.live = false;
            channel
                .subscribers
                .retain_mut(|s| s.deliver(BusEvent::Lost(LossReason::Disconnected)));
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
        // From here on, dropping this future releases the channel like a dropped subscription.
        let received = Received {
            events: received,
            release: Some((name.clone(), self.inner.released.clone())),
        };
        let first = {
            let mut channels = self.inner.channels.lock();
            let entry = channels.entry(name.clone()).or_default();
            let mut subscriber = Subscriber::new(events);
            if entry.live {
                subscriber.deliver(BusEvent::Live);
            }
            entry.subscribers.push(subscriber);
            entry.subscribers.len() == 1
        };
        if first {
            // After any unsubscription of this channel already decided on.
            let _commands = self.inner.commands.lock().await;
            let timeout = self.inner.publisher.config().command_timeout;
            self.inner.subscriber.subscribe(&name, timeout).await?;
        }
        Ok(received.into_subscription())
    }
}

/// The receiving end of one subscription; dropping it releases its channel.
pub(crate) struct Received {
    pub(crate) events: mpsc::Receiver<BusEvent>,
    /// The channel, and where to report that this subscription is gone.
    pub(crate) release: Option<(Bytes, mpsc::UnboundedSender<Bytes>)>,
}

impl Received {
    pub(crate) fn into_subscription(self) -> Subscription {
        Subscription::new(stream::unfold(self, |mut received| async move {
            received.events.recv().await.map(|event| (event, received))
        }))
    }
}

impl Drop for Received {
    fn drop(&mut self) {
        // Closed first, so that the maintenance task sees this subscriber gone.
        self.events.close();
        if let Some((name, released)) = self.release.take() {
            let _ = released.send(name);
        }
    }
}
