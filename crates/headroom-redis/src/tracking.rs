use std::time::Duration;

use bytes::Bytes;
use headroom_core::bus::{BusEvent, LossReason, Subscription};
use headroom_core::{BackendError, BackendErrorKind};
use redis::aio::ConnectionManager;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use crate::bus::{Received, Reported, SUBSCRIBER_BUFFER, Subscriber, push_connection};
use crate::connection::bounded;
use crate::{Redis, RedisConfig};

/// How often [`tracked_writes`] pings its connection while tracking is on. A ping not
/// answered within the command timeout counts as a lost connection.
pub const TRACKING_PING_INTERVAL: Duration = Duration::from_millis(500);

/// Keys under `prefix` written by anyone, reported by Redis itself (server-assisted client-side
/// caching: `CLIENT TRACKING ON BCAST PREFIX`), so that an L1 cache also learns of changes made
/// by programs that do not use headroom.
///
/// Each [`BusEvent::Message`] is one full key that was written, deleted or expired. The
/// subscription yields [`BusEvent::Live`] once tracking is on. The connection is pinged every
/// [`TRACKING_PING_INTERVAL`]; when it drops, or a ping gets no answer within the command
/// timeout (a stalled connection), the subscription yields [`BusEvent::Lost`], turns tracking
/// on again once Redis answers and yields `Live`; a connection that stays silent through that
/// is replaced by a new one. So a write is reported, or a loss is, within
/// `TRACKING_PING_INTERVAL` plus the command timeout. A `FLUSHALL`/`FLUSHDB` is reported as
/// `Lost` then `Live`: everything may have changed. Keys of a burst larger than the
/// subscription holds (1,024 events) are reported as `Lost` by the next ping at the latest.
/// Dropping the subscription closes the connection.
///
/// Cost: Redis sends one invalidation to this connection for every write of every key under
/// the prefix, by any client, this instance's own writes included (a write also drops the
/// writer's fresh L1 copy, so the next read goes to L2). It keeps no per-key state for BCAST
/// tracking, but the traffic grows with the write rate times the number of instances.
///
/// Standalone servers only: on a cluster each node tracks its own keys, which would need one
/// tracking connection per node; that is refused with [`BackendErrorKind::Config`].
pub async fn tracked_writes(redis: &Redis, prefix: &[u8]) -> Result<Subscription, BackendError> {
    if redis.is_cluster() {
        return Err(BackendError::with_detail(
            BackendErrorKind::Config,
            "key tracking needs one connection per cluster node and is only supported on a standalone server",
        ));
    }
    let config = redis.config();
    let (pushes, pushed) = mpsc::unbounded_channel::<PushInfo>();
    let conn = push_connection(config, pushes.clone(), false).await?;
    let (events, received) = mpsc::channel(SUBSCRIBER_BUFFER);
    tokio::spawn(track(
        Pushes {
            conn,
            to: pushes,
            config: config.clone(),
        },
        prefix.to_vec(),
        pushed,
        Subscriber::new(events),
    ));
    let received = Received {
        events: received,
        release: None,
    };
    Ok(received.into_subscription())
}

/// The tracking connection, and what replaces it when it goes silent.
struct Pushes {
    conn: ConnectionManager,
    to: mpsc::UnboundedSender<PushInfo>,
    config: RedisConfig,
}

impl Pushes {
    /// A connection that closed reconnects by itself; one that went silent never learns it
    /// should, so a new one takes its place. A failed dial keeps the old one.
    async fn replace(&mut self) {
        match push_connection(&self.config, self.to.clone(), false).await {
            Ok(fresh) => {
                tracing::warn!("Redis tracking connection went silent; replaced by a new one");
                self.conn = fresh;
            }
            Err(error) => tracing::warn!(
                %error,
                "Redis tracking connection went silent; dialing a new one failed"
            ),
        }
    }
}

/// Keeps tracking on and forwards invalidations until the subscription is dropped, which
/// ends the task and closes the connection.
async fn track(
    mut pushes: Pushes,
    prefix: Vec<u8>,
    mut pushed: mpsc::UnboundedReceiver<PushInfo>,
    mut subscriber: Subscriber,
) {
    let (retry_every, timeout) = (
        pushes.config.reconnect_max_delay,
        pushes.config.command_timeout,
    );
    let mut tracking = false;
    loop {
        if !tracking {
            // Off first: after a stall the server may still track for this connection, and
            // it refuses a prefix it already has.
            let mut on = redis::pipe();
            on.cmd("CLIENT").arg("TRACKING").arg("OFF").ignore();
            on.cmd("CLIENT")
                .arg("TRACKING")
                .arg("ON")
                .arg("BCAST")
                .arg("PREFIX")
                .arg(prefix.as_slice())
                .ignore();
            // A failure makes a closed connection reconnect, and a silent one be replaced;
            // the next round tries again.
            match bounded(timeout, on.query_async::<()>(&mut pushes.conn)).await {
                Ok(()) => {
                    tracking = true;
                    if !subscriber.deliver(BusEvent::Live) {
                        return;
                    }
                }
                Err(error) if error.kind() == BackendErrorKind::Timeout => pushes.replace().await,
                Err(_) => {}
            }
        }
        let wait = if tracking {
            TRACKING_PING_INTERVAL
        } else {
            retry_every
        };
        let open = tokio::select! {
            push = pushed.recv() => match push {
                Some(push) => forward(push, &mut subscriber, &mut tracking),
                None => false,
            },
            () = tokio::time::sleep(wait) => {
                if tracking && !alive(&mut pushes.conn, timeout).await {
                    tracking = false;
                    subscriber.deliver(BusEvent::Lost(LossReason::Disconnected))
                } else {
                    // Keys dropped from a burst the subscriber could not hold are reported
                    // now, not at the next write, which may be long in coming.
                    subscriber.report_loss(tracking) != Reported::Gone
                }
            },
            () = subscriber.closed() => false,
        };
        if !open {
            return;
        }
    }
}

/// Whether the connection answers a ping within `timeout`.
async fn alive(conn: &mut ConnectionManager, timeout: Duration) -> bool {
    bounded(timeout, redis::cmd("PING").query_async::<Value>(conn))
        .await
        .is_ok()
}

/// Passes one push on; returns false once the subscriber is gone.
fn forward(push: PushInfo, subscriber: &mut Subscriber, tracking: &mut bool) -> bool {
    match push.kind {
        PushKind::Invalidate => match push.data.first() {
            Some(Value::Array(keys)) => keys.iter().all(|key| match key {
                Value::BulkString(key) => {
                    subscriber.deliver(BusEvent::Message(Bytes::copy_from_slice(key)))
                }
                _ => true,
            }),
            // No key list: the whole database was flushed.
            _ => {
                subscriber.deliver(BusEvent::Lost(LossReason::Disconnected))
                    && subscriber.deliver(BusEvent::Live)
            }
        },
        PushKind::Disconnection => {
            *tracking = false;
            subscriber.deliver(BusEvent::Lost(LossReason::Disconnected))
        }
        _ => true,
    }
}
