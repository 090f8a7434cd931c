//! Work queue behaviour: overflow policies, priorities, deadlines, CoDel, adaptive LIFO and
//! cancellation.

use std::sync::Arc;
use std::time::Duration;

use headroom_core::ManualClock;
use headroom_limit::{
    CodelConfig, Enqueue, Overflow, Overloaded, Priority, Reason, WorkQueue, WorkQueueBuilder,
};
use parking_lot::Mutex;

type Shed = Arc<Mutex<Vec<(u32, Reason)>>>;

fn recording(builder: WorkQueueBuilder<u32>) -> (WorkQueue<u32>, Shed) {
    let shed: Shed = Arc::default();
    let sink = Arc::clone(&shed);
    let queue = builder
        .on_shed(move |item, rejection: Overloaded| sink.lock().push((item, rejection.reason())))
        .build()
        .expect("valid queue");
    (queue, shed)
}

fn drain(queue: &WorkQueue<u32>) -> Vec<u32> {
    std::iter::from_fn(|| queue.try_pop()).collect()
}

#[tokio::test]
async fn reject_new_hands_the_item_back() {
    let (queue, shed) = recording(WorkQueue::builder("q").capacity(2));
    queue.try_push(1).unwrap();
    queue.try_push(2).unwrap();
    let refused = queue.try_push(3).unwrap_err();
    assert_eq!(refused.rejection().reason(), Reason::QueueFull);
    assert_eq!(refused.into_item(), 3);
    assert_eq!(drain(&queue), [1, 2]);
    assert!(shed.lock().is_empty());
    assert_eq!(queue.rejected(Priority::Default, Reason::QueueFull), 1);
}

#[tokio::test]
async fn drop_oldest_evicts_the_oldest_of_the_class() {
    let (queue, shed) = recording(
        WorkQueue::builder("q")
            .capacity(2)
            .overflow(Overflow::DropOldest),
    );
    for item in 1..=4 {
        queue.try_push(item).unwrap();
    }
    assert_eq!(drain(&queue), [3, 4]);
    assert_eq!(*shed.lock(), [(1, Reason::Evicted), (2, Reason::Evicted)]);
}

#[tokio::test]
async fn more_important_work_evicts_the_least_important_first() {
    let (queue, shed) = recording(WorkQueue::builder("q").capacity(3));
    let with = |p| Enqueue::new().priority(p);
    queue.try_push_with(1, with(Priority::Default)).unwrap();
    queue.try_push_with(2, with(Priority::Sheddable)).unwrap();
    queue.try_push_with(3, with(Priority::Sheddable)).unwrap();
    queue.try_push_with(4, with(Priority::Critical)).unwrap();
    queue.try_push_with(5, with(Priority::Default)).unwrap();
    // Full of work at least as important: refused under RejectNew.
    assert_eq!(
        queue
            .try_push_with(6, with(Priority::Sheddable))
            .unwrap_err()
            .rejection()
            .reason(),
        Reason::QueueFull
    );
    assert_eq!(*shed.lock(), [(2, Reason::Evicted), (3, Reason::Evicted)]);
    // Served most important first.
    assert_eq!(drain(&queue), [4, 1, 5]);
}

#[tokio::test]
async fn expired_items_are_dropped_never_run() {
    let manual = ManualClock::new();
    let clock = manual.clock();
    let (queue, shed) = recording(WorkQueue::builder("q").capacity(2).clock(clock.clone()));
    let soon = clock.now() + Duration::from_millis(10);
    queue
        .try_push_with(1, Enqueue::new().deadline(soon))
        .unwrap();
    queue.try_push(2).unwrap();
    manual.advance(Duration::from_millis(10));
    // A full queue first clears expired items to make room.
    queue.try_push(3).unwrap();
    assert_eq!(drain(&queue), [2, 3]);
    assert_eq!(*shed.lock(), [(1, Reason::DeadlineExpired)]);
    let past = Enqueue::new().deadline(clock.now());
    assert_eq!(
        queue
            .try_push_with(4, past)
            .unwrap_err()
            .rejection()
            .reason(),
        Reason::DeadlineExpired
    );

    // Expired while queued and found at pop time.
    queue
        .try_push_with(
            5,
            Enqueue::new().deadline(clock.now() + Duration::from_millis(1)),
        )
        .unwrap();
    manual.advance(Duration::from_millis(2));
    assert_eq!(queue.try_pop(), None);
    assert_eq!(shed.lock().last(), Some(&(5, Reason::DeadlineExpired)));
}

#[tokio::test(start_paused = true)]
async fn wait_policy_waits_for_room_then_times_out() {
    let (queue, _) = recording(
        WorkQueue::builder("q")
            .capacity(1)
            .overflow(Overflow::Wait {
                timeout: Duration::from_millis(50),
            }),
    );
    queue.push(1).await.unwrap();
    let producer = tokio::spawn({
        let queue = queue.clone();
        async move { queue.push(2).await.map_err(|e| e.rejection().reason()) }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(queue.pop().await, Some(1));
    producer.await.unwrap().expect("got room");
    let started = tokio::time::Instant::now();
    let refused = queue.push(3).await.unwrap_err();
    assert_eq!(refused.rejection().reason(), Reason::WaitTimeout);
    assert_eq!(started.elapsed(), Duration::from_millis(50));
    // try_push never waits.
    assert_eq!(
        queue.try_push(4).unwrap_err().rejection().reason(),
        Reason::QueueFull
    );
}

#[tokio::test(start_paused = true)]
async fn a_push_that_waits_is_counted_once_and_only_when_refused() {
    let (queue, _) = recording(
        WorkQueue::builder("q")
            .capacity(1)
            .overflow(Overflow::Wait {
                timeout: Duration::from_millis(50),
            }),
    );
    queue.push(1).await.unwrap();
    let producer = tokio::spawn({
        let queue = queue.clone();
        async move { queue.push(2).await.map_err(|e| e.rejection().reason()) }
    });
    // Room is made and taken again while the producer waits: it wakes and finds none.
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(queue.pop().await, Some(1));
    queue.try_push(3).unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(queue.pop().await, Some(3));
    producer.await.unwrap().expect("got room");
    assert_eq!(
        queue.rejected(Priority::Default, Reason::QueueFull),
        0,
        "a push that waited and got in was not refused"
    );
    // A push that waits out its timeout is one refusal, whatever happened meanwhile.
    let waiting = tokio::spawn({
        let queue = queue.clone();
        async move { queue.push(4).await.map_err(|e| e.rejection().reason()) }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    queue.try_push(5).unwrap_err();
    assert_eq!(waiting.await.unwrap(), Err(Reason::WaitTimeout));
    assert_eq!(queue.rejected(Priority::Default, Reason::WaitTimeout), 1);
    assert_eq!(
        queue.rejected(Priority::Default, Reason::QueueFull),
        1,
        "only the try_push that found no room"
    );
}

#[tokio::test]
async fn codel_sheds_items_once_delay_stays_above_target() {
    let manual = ManualClock::new();
    let codel = CodelConfig {
        target: Duration::from_millis(5),
        interval: Duration::from_millis(100),
    };
    let (queue, shed) = recording(
        WorkQueue::builder("q")
            .capacity(1_000)
            .codel(codel)
            .clock(manual.clock()),
    );
    // A standing queue: every item waits 20 ms for a whole interval and more.
    let mut next = 0;
    let mut served = 0;
    for _ in 0..30 {
        for _ in 0..2 {
            queue.try_push(next).unwrap();
            next += 1;
        }
        manual.advance(Duration::from_millis(10));
        if queue.try_pop().is_some() {
            served += 1;
        }
    }
    let shed = shed.lock();
    assert!(!shed.is_empty(), "a persistent standing queue must be shed");
    assert!(shed.iter().all(|(_, reason)| *reason == Reason::QueueDelay));
    assert!(served > 0);
    drop(shed);

    // Once the queue drains and delay is low again, nothing more is shed.
    let before = queue.rejected(Priority::Default, Reason::QueueDelay);
    while queue.try_pop().is_some() {}
    for item in 0..50 {
        queue.try_push(item).unwrap();
        manual.advance(Duration::from_millis(3));
        assert_eq!(queue.try_pop(), Some(item));
    }
    assert!(queue.rejected(Priority::Default, Reason::QueueDelay) <= before + 1);
}

#[tokio::test]
async fn adaptive_lifo_serves_newest_first_only_when_overloaded() {
    let (queue, _) = recording(WorkQueue::builder("q").capacity(4).adaptive_lifo(true));
    queue.try_push(1).unwrap();
    queue.try_push(2).unwrap();
    // Half full is not overloaded: FIFO.
    assert_eq!(queue.try_pop(), Some(1));
    for item in 3..=5 {
        queue.try_push(item).unwrap();
    }
    // More than half full: overloaded, newest first until it is half full again.
    assert_eq!(queue.try_pop(), Some(5));
    assert_eq!(queue.try_pop(), Some(4));
    assert_eq!(queue.try_pop(), Some(2));
    assert_eq!(queue.try_pop(), Some(3));
}

#[tokio::test(start_paused = true)]
async fn cancelled_producers_and_consumers_leak_no_slot_or_item() {
    for seed in 0..20_u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let queue: WorkQueue<u32> = WorkQueue::builder("q")
            .capacity(rng.usize(1..5))
            .overflow(Overflow::Wait {
                timeout: Duration::from_millis(rng.u64(1..30)),
            })
            .build()
            .unwrap();
        let pushed = Arc::new(Mutex::new(Vec::new()));
        let popped = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for item in 0..40_u32 {
            let (queue, pushed) = (queue.clone(), Arc::clone(&pushed));
            let cancel = Duration::from_millis(rng.u64(0..20));
            let start = Duration::from_millis(rng.u64(0..30));
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(start).await;
                if let Ok(Ok(())) = tokio::time::timeout(cancel, queue.push(item)).await {
                    pushed.lock().push(item);
                }
            }));
        }
        for _ in 0..10 {
            let (queue, popped) = (queue.clone(), Arc::clone(&popped));
            let cancel = Duration::from_millis(rng.u64(0..40));
            tasks.push(tokio::spawn(async move {
                while let Ok(Some(item)) = tokio::time::timeout(cancel, queue.pop()).await {
                    popped.lock().push(item);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        // Whatever is left is still there, and the queue has room for exactly its capacity.
        popped.lock().extend(std::iter::from_fn(|| queue.try_pop()));
        let mut pushed = pushed.lock().clone();
        let mut popped = popped.lock().clone();
        pushed.sort_unstable();
        popped.sort_unstable();
        assert_eq!(
            pushed, popped,
            "seed {seed}: every accepted item comes out once"
        );
        let capacity = queue.config().capacity;
        for item in 0..capacity as u32 {
            queue.try_push(item).unwrap();
        }
        assert!(queue.try_push(99).is_err(), "seed {seed}");
    }
}

#[tokio::test]
async fn close_refuses_producers_and_lets_consumers_drain() {
    let queue: WorkQueue<u32> = WorkQueue::builder("q").build().unwrap();
    queue.try_push(1).unwrap();
    let consumer = tokio::spawn({
        let queue = queue.clone();
        async move {
            let mut got = Vec::new();
            while let Some(item) = queue.pop().await {
                got.push(item);
            }
            got
        }
    });
    tokio::task::yield_now().await;
    queue.close();
    assert_eq!(
        queue.try_push(2).unwrap_err().rejection().reason(),
        Reason::Closed
    );
    assert_eq!(consumer.await.unwrap(), [1]);
}

#[test]
fn bad_configuration_is_a_typed_error() {
    let err = WorkQueue::<u32>::builder("q")
        .capacity(0)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "capacity");
    let err = WorkQueue::<u32>::builder("q")
        .codel(CodelConfig {
            target: Duration::ZERO,
            interval: Duration::from_millis(100),
        })
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "codel.target");
}

mod model {
    use std::collections::VecDeque;

    use headroom_limit::{Enqueue, Overflow, Priority, Reason, WorkQueue};
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Push(Priority),
        Pop,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => prop_oneof![
                Just(Priority::Critical),
                Just(Priority::Default),
                Just(Priority::Sheddable)
            ]
            .prop_map(Op::Push),
            2 => Just(Op::Pop),
        ]
    }

    proptest! {
        /// Against a model of three FIFO classes: capacity is never exceeded, the most
        /// important class is served first and FIFO within a class, a full queue evicts the
        /// oldest item of the least important lower class, and otherwise follows the policy.
        #[test]
        fn queue_follows_the_model(
            capacity in 1..6_usize,
            drop_oldest in any::<bool>(),
            ops in proptest::collection::vec(op(), 1..120),
        ) {
            let overflow = if drop_oldest { Overflow::DropOldest } else { Overflow::RejectNew };
            let queue: WorkQueue<u32> =
                WorkQueue::builder("model").capacity(capacity).overflow(overflow).build().unwrap();
            let mut classes: [VecDeque<u32>; 3] = Default::default();
            let index = |p: Priority| Priority::ALL.iter().position(|q| *q == p).unwrap();
            for (id, op) in (0_u32..).zip(ops) {
                match op {
                    Op::Push(priority) => {
                        let len: usize = classes.iter().map(VecDeque::len).sum();
                        let expected_ok = if len < capacity {
                            true
                        } else if let Some(lower) =
                            (index(priority) + 1..3).rev().find(|&c| !classes[c].is_empty())
                        {
                            classes[lower].pop_front();
                            true
                        } else if drop_oldest && !classes[index(priority)].is_empty() {
                            classes[index(priority)].pop_front();
                            true
                        } else {
                            false
                        };
                        let pushed = queue.try_push_with(id, Enqueue::new().priority(priority));
                        match pushed {
                            Ok(()) => {
                                prop_assert!(expected_ok);
                                classes[index(priority)].push_back(id);
                            }
                            Err(refused) => {
                                prop_assert!(!expected_ok);
                                prop_assert_eq!(refused.rejection().reason(), Reason::QueueFull);
                            }
                        }
                    }
                    Op::Pop => {
                        let expected = classes.iter_mut().find_map(VecDeque::pop_front);
                        prop_assert_eq!(queue.try_pop(), expected);
                    }
                }
                let len: usize = classes.iter().map(VecDeque::len).sum();
                prop_assert_eq!(queue.len(), len);
                prop_assert!(len <= capacity);
            }
        }
    }
}

/// Gauges by name, holding the value the last update left.
#[derive(Default)]
struct Gauges(Mutex<std::collections::HashMap<String, Arc<GaugeCell>>>);

#[derive(Default)]
struct GaugeCell(std::sync::atomic::AtomicU64);

impl GaugeCell {
    fn update(&self, change: impl Fn(f64) -> f64) {
        use std::sync::atomic::Ordering;
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some(change(f64::from_bits(bits)).to_bits())
            });
    }
}

impl metrics::GaugeFn for GaugeCell {
    fn increment(&self, value: f64) {
        self.update(|v| v + value);
    }
    fn decrement(&self, value: f64) {
        self.update(|v| v - value);
    }
    fn set(&self, value: f64) {
        self.update(|_| value);
    }
}

impl Gauges {
    fn get(&self, name: &str) -> f64 {
        let gauges = self.0.lock();
        f64::from_bits(gauges[name].0.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl metrics::Recorder for Gauges {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }
    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        let cell = Arc::clone(self.0.lock().entry(key.name().to_owned()).or_default());
        metrics::Gauge::from_arc(cell)
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

#[tokio::test]
async fn queued_gauge_counts_items_evicted_or_expired_on_push() {
    const QUEUED: &str = "headroom_limit_queued_requests";
    let gauges = Gauges::default();
    let manual = ManualClock::new();
    let clock = manual.clock();
    let queue = metrics::with_local_recorder(&gauges, || {
        WorkQueue::builder("q")
            .capacity(2)
            .overflow(Overflow::DropOldest)
            .clock(clock.clone())
            .build()
            .expect("valid queue")
    });
    for item in 1..=5 {
        queue.try_push(item).unwrap();
    }
    assert_eq!(gauges.get(QUEUED), queue.len() as f64, "after evictions");
    let soon = Enqueue::new().deadline(clock.now() + Duration::from_millis(10));
    queue.try_push_with(6, soon).unwrap();
    queue.try_push_with(7, soon).unwrap();
    manual.advance(Duration::from_millis(10));
    queue.try_push(8).unwrap();
    assert_eq!(gauges.get(QUEUED), queue.len() as f64, "after expiries");
    assert_eq!(drain(&queue), [8]);
    assert_eq!(gauges.get(QUEUED), 0.0);
}

/// A shed handler that panics fails nothing else: the push that shed the item was accepted
/// (a retry would run the work twice), the gauges and a waiting consumer see its item.
#[tokio::test]
async fn a_panicking_shed_handler_leaves_the_push_admitted_and_counted() {
    const QUEUED: &str = "headroom_limit_queued_requests";
    let gauges = Gauges::default();
    let queue = metrics::with_local_recorder(&gauges, || {
        WorkQueue::builder("q")
            .capacity(1)
            .overflow(Overflow::DropOldest)
            .on_shed(|_: u32, _| panic!("shed handler"))
            .build()
            .expect("valid queue")
    });
    let consumer = tokio::spawn({
        let queue = queue.clone();
        async move { queue.pop().await }
    });
    tokio::task::yield_now().await;
    queue.try_push(1).unwrap();
    // Evicts 1 before the consumer runs; its handler panics.
    let pushed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| queue.try_push(2)));
    assert_eq!(consumer.await.unwrap(), Some(2));
    assert_eq!(gauges.get(QUEUED), 0.0, "queued gauge after the pop");
    assert!(matches!(pushed, Ok(Ok(()))), "the push was accepted");
}

/// Every shed item reaches the handler, on a push and on a pop, though it panics on one.
#[tokio::test]
async fn every_shed_item_reaches_the_handler_though_it_panics_on_one() {
    let manual = ManualClock::new();
    let clock = manual.clock();
    let shed: Shed = Arc::default();
    let sink = Arc::clone(&shed);
    let queue = WorkQueue::builder("q")
        .capacity(2)
        .clock(clock.clone())
        .on_shed(move |item, rejection: Overloaded| {
            if item % 2 == 1 {
                panic!("shed handler fails on odd items");
            }
            sink.lock().push((item, rejection.reason()));
        })
        .build()
        .expect("valid queue");
    let soon = Enqueue::new().deadline(clock.now() + Duration::from_millis(10));
    queue.try_push_with(1, soon).unwrap();
    queue.try_push_with(2, soon).unwrap();
    manual.advance(Duration::from_millis(10));
    // Both expired items are shed to make room; the handler panics on the first.
    let pushed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| queue.try_push(4)));
    assert!(matches!(pushed, Ok(Ok(()))), "the push was accepted");
    assert_eq!(*shed.lock(), [(2, Reason::DeadlineExpired)]);
    // A consumer that sheds an item whose handler panics gets the next one.
    let soon = Enqueue::new().deadline(clock.now() + Duration::from_millis(10));
    queue.try_pop().unwrap();
    queue.try_push_with(3, soon).unwrap();
    queue.try_push(6).unwrap();
    manual.advance(Duration::from_millis(10));
    let popped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| queue.try_pop()));
    assert!(
        matches!(popped, Ok(Some(6))),
        "the pop goes on to the next item"
    );
}

/// Shrinking the capacity drops nothing: queued items stay and pushes are refused until the
/// queue is under the new capacity. Growing it lets a push that waits for room in at once.
#[tokio::test(start_paused = true)]
async fn a_reconfigured_capacity_keeps_queued_items_and_wakes_waiting_pushes() {
    let queue: WorkQueue<u32> = WorkQueue::builder("resized")
        .capacity(4)
        .overflow(Overflow::Wait {
            timeout: Duration::from_secs(60),
        })
        .build()
        .unwrap();
    for item in 0..4 {
        queue.push(item).await.unwrap();
    }
    let mut smaller = queue.config();
    smaller.capacity = 2;
    queue.reconfigure(smaller.clone()).unwrap();
    assert_eq!(queue.len(), 4, "nothing queued is dropped");
    assert_eq!(
        queue.try_push(9).unwrap_err().rejection().reason(),
        Reason::QueueFull
    );
    assert_eq!(queue.try_pop(), Some(0));
    assert_eq!(queue.try_pop(), Some(1));
    assert_eq!(queue.try_pop(), Some(2));
    assert!(queue.try_push(3).is_ok(), "under the new capacity again");

    // A push waits for room; growing the capacity lets it in without a pop.
    let waiting = tokio::spawn({
        let queue = queue.clone();
        async move { queue.push(10).await }
    });
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished());
    let mut larger = smaller;
    larger.capacity = 8;
    queue.reconfigure(larger).unwrap();
    waiting.await.unwrap().unwrap();
    assert_eq!(drain(&queue), [3, 3, 10]);

    let mut invalid = queue.config();
    invalid.capacity = 0;
    assert!(queue.reconfigure(invalid).is_err());
    assert_eq!(
        queue.config().capacity,
        8,
        "the configuration in force stays"
    );
}

/// A queue shrunk below what it holds evicts nothing to make room: one eviction would not
/// make room, so the push is refused and every queued item stays.
#[tokio::test]
async fn a_queue_over_its_new_capacity_refuses_without_evicting() {
    let (queue, shed) = recording(
        WorkQueue::builder("shrunk")
            .capacity(4)
            .overflow(Overflow::DropOldest),
    );
    for item in 0..4 {
        queue.try_push(item).unwrap();
    }
    let mut smaller = queue.config();
    smaller.capacity = 2;
    queue.reconfigure(smaller).unwrap();
    for item in [10, 11] {
        let refused = queue.try_push(item).unwrap_err();
        assert_eq!(refused.rejection().reason(), Reason::QueueFull);
        assert_eq!(
            queue
                .try_push_with(item, Enqueue::new().priority(Priority::Critical))
                .unwrap_err()
                .rejection()
                .reason(),
            Reason::QueueFull
        );
    }
    assert!(shed.lock().is_empty(), "nothing evicted: {:?}", shed.lock());
    assert_eq!(drain(&queue), [0, 1, 2, 3]);
}

/// A push waiting for room follows a change of policy: once the queue no longer waits, it is
/// refused at its next look instead of waiting out the old timeout.
#[tokio::test(start_paused = true)]
async fn a_waiting_push_follows_a_new_overflow_policy() {
    let queue: WorkQueue<u32> = WorkQueue::builder("policy")
        .capacity(1)
        .overflow(Overflow::Wait {
            timeout: Duration::from_secs(30),
        })
        .build()
        .unwrap();
    queue.push(0).await.unwrap();
    let waiting = tokio::spawn({
        let queue = queue.clone();
        async move { queue.push(1).await }
    });
    tokio::task::yield_now().await;
    let mut reject = queue.config();
    reject.overflow = Overflow::RejectNew;
    queue.reconfigure(reject).unwrap();
    let started = tokio::time::Instant::now();
    let refused = waiting.await.unwrap().unwrap_err();
    assert_eq!(refused.rejection().reason(), Reason::QueueFull);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once"
    );
}

/// Places held by expired items are room for pushes that wait: once the items they wait behind
/// expire, they get in without a consumer, rather than waiting out their timeout.
#[tokio::test]
async fn waiting_pushes_get_the_places_of_expired_items() {
    let manual = ManualClock::new();
    let clock = manual.clock();
    let (queue, shed) = recording(
        WorkQueue::builder("q")
            .capacity(2)
            .overflow(Overflow::Wait {
                timeout: Duration::from_millis(200),
            })
            .clock(clock.clone()),
    );
    let soon = Enqueue::new().deadline(clock.now() + Duration::from_millis(10));
    queue.try_push_with(1, soon).unwrap();
    queue.try_push_with(2, soon).unwrap();
    let waiting = |item| {
        let queue = queue.clone();
        tokio::spawn(async move { queue.push(item).await.map_err(|e| e.rejection().reason()) })
    };
    let (third, fourth) = (waiting(3), waiting(4));
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(
        !third.is_finished() && !fourth.is_finished(),
        "the queue is full"
    );
    manual.advance(Duration::from_millis(10));
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(
        third.is_finished() && fourth.is_finished(),
        "both got in at expiry"
    );
    assert_eq!(third.await.unwrap(), Ok(()));
    assert_eq!(fourth.await.unwrap(), Ok(()));
    let mut queued = drain(&queue);
    queued.sort_unstable();
    assert_eq!(queued, [3, 4]);
    assert_eq!(
        *shed.lock(),
        [(1, Reason::DeadlineExpired), (2, Reason::DeadlineExpired)]
    );
}

/// The longest wait is taken as such, without a panic: a push into a full queue waits up to its
/// own deadline.
#[tokio::test]
async fn the_longest_wait_is_taken_without_a_panic() {
    let manual = ManualClock::new();
    let clock = manual.clock();
    let (queue, _) = recording(
        WorkQueue::builder("q")
            .capacity(1)
            .overflow(Overflow::Wait {
                timeout: Duration::MAX,
            })
            .clock(clock.clone()),
    );
    queue.try_push(1).unwrap();
    let within = Enqueue::new().deadline(clock.now() + Duration::from_secs(1));
    let waiting = {
        let queue = queue.clone();
        tokio::spawn(async move {
            queue
                .push_with(2, within)
                .await
                .map_err(|e| e.rejection().reason())
        })
    };
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    manual.advance(Duration::from_secs(1));
    assert_eq!(waiting.await.unwrap(), Err(Reason::DeadlineExpired));
}
