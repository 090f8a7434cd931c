use bytes::Bytes;
use futures_util::stream;
use headroom_core::bus::{BusEvent, LossReason, Subscription};
use headroom_core::{BackendError, BackendErrorKind};
use redis::aio::ConnectionManager;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use crate::Redis;
use crate::bus::{SUBSCRIBER_BUFFER, Subscriber, push_connection};
use crate::connection::bounded;

/// Keys under `prefix` written by anyone, reported by Redis itself (server-assisted client-side
/// caching: `CLIENT TRACKING ON BCAST PREFIX`), so that an L1 cache also learns of changes made
/// by programs that do not use headroom.
///
/// Each [`BusEvent::Message`] is one full key that was written, deleted or expired. The
/// subscription yields [`BusEvent::Live`] once tracking is on; when the connection drops it
/// yields [`BusEvent::Lost`], turns tracking on again once Redis answers and yields `Live`. A
/// `FLUSHALL`/`FLUSHDB` is reported as `Lost` then `Live`: everything may have changed.
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
    let conn = push_connection(config, pushes, false).await?;
    let (events, received) = mpsc::channel(SUBSCRIBER_BUFFER);
    tokio::spawn(track(
        conn,
        prefix.to_vec(),
        pushed,
        Subscriber::new(events),
        config.reconnect_max_delay,
        config.command_timeout,
    ));
    let events = stream::unfold(received, |mut received| async move {
        received.recv().await.map(|event| (event, received))
    });
    Ok(Subscription::new(events))
}

/// Keeps tracking on and forwards invalidations until the subscription is dropped.
async fn track(
    mut conn: ConnectionManager,
    prefix: Vec<u8>,
    mut pushed: mpsc::UnboundedReceiver<PushInfo>,
    mut subscriber: Subscriber,
    retry_every: std::time::Duration,
    timeout: std::time::Duration,
) {
    let mut tracking = false;
    loop {
        if !tracking {
            let mut on = redis::cmd("CLIENT");
            on.arg("TRACKING")
                .arg("ON")
                .arg("BCAST")
                .arg("PREFIX")
                .arg(prefix.as_slice());
            // A failure makes the connection reconnect; the next round tries again.
            if bounded(timeout, on.query_async::<()>(&mut conn))
                .await
                .is_ok()
            {
                tracking = true;
                if !subscriber.deliver(BusEvent::Live) {
                    return;
                }
            }
        }
        let open = tokio::select! {
            push = pushed.recv() => match push {
                Some(push) => forward(push, &mut subscriber, &mut tracking),
                None => false,
            },
            () = tokio::time::sleep(retry_every), if !tracking => true,
        };
        if !open {
            return;
        }
    }
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
