//! Checks of the [`InvalidationBus`] contract.

use std::time::Duration;

use bytes::Bytes;
use headroom_core::bus::{BusEvent, InvalidationBus, Subscription};
use headroom_core::{Key, Namespace};

/// How long a check waits for an event that must arrive.
const WAIT: Duration = Duration::from_secs(5);

fn channel(ns: &Namespace, name: &str) -> Key {
    ns.key(name).expect("valid channel")
}

async fn next(sub: &mut Subscription) -> BusEvent {
    tokio::time::timeout(WAIT, sub.next_event())
        .await
        .expect("an event within 5 s")
        .expect("the bus is not shut down")
}

/// Subscribes and waits until the subscription is live.
pub async fn live_subscription<B: InvalidationBus>(bus: &B, channel: &Key) -> Subscription {
    let mut sub = bus.subscribe(channel).await.expect("subscribe");
    assert_eq!(next(&mut sub).await, BusEvent::Live);
    sub
}

async fn expect_message(sub: &mut Subscription, expected: &[u8]) {
    assert_eq!(
        next(sub).await,
        BusEvent::Message(Bytes::copy_from_slice(expected))
    );
}

/// A subscription yields `Live` first, then messages in publish order.
pub async fn subscription_goes_live_then_receives_in_order<B: InvalidationBus>(
    bus: &B,
    ns: Namespace,
) {
    let ch = channel(&ns, "ch");
    let mut sub = live_subscription(bus, &ch).await;
    for i in 0..50u32 {
        bus.publish(&ch, Bytes::from(i.to_be_bytes().to_vec()))
            .await
            .expect("publish");
    }
    for i in 0..50u32 {
        expect_message(&mut sub, &i.to_be_bytes()).await;
    }
}

/// Every subscriber of a channel receives every message.
pub async fn every_subscriber_receives_every_message<B: InvalidationBus>(bus: &B, ns: Namespace) {
    let ch = channel(&ns, "ch");
    let mut first = live_subscription(bus, &ch).await;
    let mut second = live_subscription(bus, &ch).await;
    bus.publish(&ch, Bytes::from_static(b"hello"))
        .await
        .expect("publish");
    expect_message(&mut first, b"hello").await;
    expect_message(&mut second, b"hello").await;
}

/// Publishing where nobody listens succeeds.
pub async fn publishing_without_subscribers_succeeds<B: InvalidationBus>(bus: &B, ns: Namespace) {
    bus.publish(&channel(&ns, "empty"), Bytes::from_static(b"x"))
        .await
        .expect("publish");
}

/// A message on one channel never reaches another channel's subscribers.
pub async fn channels_are_separate<B: InvalidationBus>(bus: &B, ns: Namespace) {
    let a = channel(&ns, "a");
    let b = channel(&ns, "b");
    let mut sub_a = live_subscription(bus, &a).await;
    bus.publish(&b, Bytes::from_static(b"for b"))
        .await
        .expect("publish");
    bus.publish(&a, Bytes::from_static(b"for a"))
        .await
        .expect("publish");
    expect_message(&mut sub_a, b"for a").await;
}

/// Dropping one subscription leaves the others receiving.
pub async fn dropped_subscription_does_not_disturb_others<B: InvalidationBus>(
    bus: &B,
    ns: Namespace,
) {
    let ch = channel(&ns, "ch");
    let gone = live_subscription(bus, &ch).await;
    let mut kept = live_subscription(bus, &ch).await;
    drop(gone);
    bus.publish(&ch, Bytes::from_static(b"still here"))
        .await
        .expect("publish");
    expect_message(&mut kept, b"still here").await;
}

/// A channel whose every subscription was dropped can be subscribed again at once, and the
/// new subscription receives, however the two race inside the bus.
pub async fn channel_subscribed_again_after_its_last_subscription_dropped<B: InvalidationBus>(
    bus: &B,
    ns: Namespace,
) {
    let ch = channel(&ns, "ch");
    for round in 0..10u8 {
        let mut sub = live_subscription(bus, &ch).await;
        bus.publish(&ch, Bytes::from(vec![round]))
            .await
            .expect("publish");
        expect_message(&mut sub, &[round]).await;
    }
}
