//! The Redis job store: the conformance suite, standalone and cluster, and what the Redis
//! backend keeps in Redis beyond it (keys, streams, TTLs, corrupt data, cluster slots).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use headroom_core::jobs::{
    Completed, Completion, Delivery, EnqueueLimits, Enqueued, FetchRequest, JobNumber, JobState,
    JobStore, NewJob,
};
use headroom_core::lease::Fenced;
use headroom_core::slot::cluster_slot;
use headroom_core::{BackendErrorKind, Key, Namespace};
use headroom_redis::{Redis, RedisConfig, RedisJobStore};
use headroom_testkit::{RedisServer, shared_cluster, shared_server, unique_namespace};

async fn store(config: RedisConfig) -> RedisJobStore {
    RedisJobStore::new(
        Redis::connect(config)
            .await
            .expect("connect to the test Redis"),
    )
}

headroom_testkit::job_store_conformance!(
    standalone_jobs,
    store(RedisConfig::standalone(shared_server().url()))
);

headroom_testkit::job_store_conformance!(
    cluster_jobs,
    store(RedisConfig::cluster(shared_cluster().urls()))
);

const LONG: Duration = Duration::from_secs(60);
const WAIT_BOUND: Duration = Duration::from_secs(10);

/// What each check gets: the store, a raw handle on the same Redis and a fresh namespace.
struct Ctx {
    store: RedisJobStore,
    redis: Redis,
    ns: Namespace,
}

impl Ctx {
    async fn new(config: RedisConfig, name: &str) -> Self {
        let redis = Redis::connect(config).await.expect("connect");
        Self {
            store: RedisJobStore::new(redis.clone()),
            redis,
            ns: unique_namespace(name),
        }
    }

    fn partition(&self, tag: &str) -> Key {
        self.ns.key(format!("{{{tag}}}")).expect("valid key")
    }

    async fn add(&self, p: &Key, job: NewJob) -> JobNumber {
        match self
            .store
            .enqueue(p, &job, &limits(1_000))
            .await
            .expect("enqueue")
        {
            Enqueued::Added(number) => number,
            other => panic!("expected the job to be added, got {other:?}"),
        }
    }

    /// Completes each of `numbers` at its first attempt in one `complete_many`.
    async fn complete_firsts(&self, p: &Key, numbers: &[JobNumber]) -> Completed {
        let jobs: Vec<Completion> = numbers
            .iter()
            .map(|&number| Completion {
                number,
                attempt: 1,
                result: Bytes::new(),
            })
            .collect();
        self.store
            .complete_many(p, &jobs, LONG)
            .await
            .expect("complete_many")
    }

    async fn fetch(
        &self,
        p: &Key,
        consumer: &str,
        lanes: &[u8],
        max: usize,
        visibility: Duration,
    ) -> Vec<Delivery> {
        self.store
            .fetch(
                p,
                FetchRequest {
                    consumer,
                    lanes,
                    max,
                    visibility,
                },
            )
            .await
            .expect("fetch")
    }

    /// Fetches from lane 0 until something is delivered, bounded by [`WAIT_BOUND`].
    async fn fetch_eventually(
        &self,
        p: &Key,
        consumer: &str,
        visibility: Duration,
    ) -> Vec<Delivery> {
        let deadline = Instant::now() + WAIT_BOUND;
        loop {
            let delivered = self.fetch(p, consumer, &[0], 10, visibility).await;
            if !delivered.is_empty() {
                return delivered;
            }
            assert!(Instant::now() < deadline, "nothing delivered within 10 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The consumers of lane 0's group in partition `p`, by name.
    async fn consumers(&self, p: &Key) -> Vec<String> {
        let consumers: Vec<Vec<redis::Value>> = self
            .raw(
                redis::cmd("XINFO")
                    .arg("CONSUMERS")
                    .arg(sub(p, ":s:0"))
                    .arg("w"),
            )
            .await;
        let mut names: Vec<String> = consumers
            .iter()
            .map(|c| redis::from_redis_value(c[1].clone()).unwrap())
            .collect();
        names.sort();
        names
    }

    async fn raw<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        self.redis.query(cmd).await.expect("raw command")
    }
}

/// A key derived from partition `p`: `p` followed by `suffix`.
fn sub(p: &Key, suffix: &str) -> Vec<u8> {
    [p.as_bytes(), suffix.as_bytes()].concat()
}

fn limits(max_len: u64) -> EnqueueLimits {
    EnqueueLimits {
        max_len,
        max_per_tenant: None,
        dedup_window: LONG,
    }
}

fn job(payload: &'static str) -> NewJob {
    NewJob::new(Bytes::from_static(payload.as_bytes()))
}

/// Runs each check against the shared standalone server and the shared cluster.
macro_rules! on_both {
    ($($check:ident),+ $(,)?) => {
        mod standalone {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let config = RedisConfig::standalone(shared_server().url());
                    super::$check(Ctx::new(config, stringify!($check)).await).await;
                }
            )+
        }
        mod cluster {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let config = RedisConfig::cluster(shared_cluster().urls());
                    super::$check(Ctx::new(config, stringify!($check)).await).await;
                }
            )+
        }
    };
}

on_both!(
    a_job_lives_in_its_record_and_lane_stream,
    foreign_subjects_find_nothing_and_fail_no_step,
    a_corrupt_job_taken_off_its_lane_is_not_its_subjects_newest,
    a_delayed_set_or_lane_of_another_type_fails_no_step,
    concurrent_enqueuers_never_pass_the_bound,
    a_dedup_key_lives_for_its_window,
    lanes_are_separate_streams_read_in_order,
    a_delayed_job_waits_in_the_delay_set,
    an_idle_delivery_is_taken_over_and_its_holder_forgotten,
    a_consumer_gone_without_leaving_is_forgotten,
    takeovers_go_longest_idle_first_in_every_lane,
    lapsed_deliveries_are_looked_for_once_per_quarter_of_the_visibility,
    a_batch_completion_clears_every_lane_and_answers_each_job,
    completions_in_any_order_leave_exactly_the_pending_and_ready_entries,
    a_completion_whose_entry_is_not_pending_removes_no_other_entry,
    a_retried_job_is_redelivered_with_the_next_attempt,
    buried_jobs_are_dead_letters_newest_first,
    garbage_in_a_record_is_a_typed_error,
    a_record_no_step_could_finish_is_corrupt_and_not_delivered,
    a_tenant_count_the_store_did_not_write_is_started_again,
    a_takeover_place_the_store_did_not_write_is_dropped,
    a_record_of_another_type_is_corrupt_and_stops_no_other_job,
    a_corrupt_hand_back_count_changes_nothing_and_charges_every_delivery,
    garbage_in_the_counts_is_a_typed_error,
    drain_stats_of_another_type_fail_no_step,
    an_unfinished_count_the_store_did_not_write_fails_no_step,
    invalid_arguments_are_refused_before_redis,
    a_lost_fetch_is_recovered_at_its_attempt_while_still_held,
);

/// A fetch whose answer was lost is found again by its token: `recover` delivers again, as
/// they were (the same attempt, taken over or not), the jobs it delivered that are still
/// running there, whatever the consumer fetched since; not one finished or taken over since,
/// and nothing for another consumer or token. Asked again (its answer lost too), it answers
/// the same.
async fn a_lost_fetch_is_recovered_at_its_attempt_while_still_held(ctx: Ctx) {
    let p = ctx.partition("q");
    let visibility = Duration::from_millis(200);
    let old = ctx.add(&p, job("old")).await;
    // Another worker's delivery, lapsed by the time of the lost fetch, which takes it over.
    assert_eq!(ctx.fetch(&p, "dies", &[0], 1, visibility).await.len(), 1);
    let a = ctx.add(&p, job("a")).await;
    let b = ctx.add(&p, job("b")).await;
    let c = ctx.add(&p, job("c")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let request = |max| FetchRequest {
        consumer: "w",
        lanes: &[0],
        max,
        visibility,
    };
    let lost = ctx.store.fetch_marked(&p, request(3), 7).await.unwrap();
    let numbers = |d: &[Delivery]| d.iter().map(|d| (d.number, d.attempt)).collect::<Vec<_>>();
    assert_eq!(numbers(&lost), [(old, 2), (a, 1), (b, 1)]);
    assert!(lost[0].taken_over);
    let later = ctx.store.fetch_marked(&p, request(1), 8).await.unwrap();
    assert_eq!(numbers(&later), [(c, 1)]);
    assert!(matches!(
        ctx.complete_firsts(&p, &[b]).await[..],
        [Ok(Fenced::Applied)]
    ));

    let recovered = ctx.store.recover(&p, "w", 7, 10).await.unwrap();
    assert_eq!(recovered, lost[..2]);
    assert_eq!(ctx.store.recover(&p, "w", 7, 10).await.unwrap(), lost[..2]);
    assert_eq!(ctx.store.recover(&p, "w", 7, 1).await.unwrap(), lost[..1]);
    for (consumer, token) in [("x", 7), ("w", 9), ("w", 0)] {
        assert_eq!(
            ctx.store.recover(&p, consumer, token, 10).await.unwrap(),
            [],
            "{consumer} {token}"
        );
    }
    // Recovered, a job is held from then as after an extension; lapsed, it is taken over
    // by another worker, and no longer the lost fetch's to recover.
    let deadline = Instant::now() + WAIT_BOUND;
    let mut taken = Vec::new();
    while taken.len() < 3 {
        assert!(Instant::now() < deadline, "taken over: {taken:?}");
        taken.extend(numbers(&ctx.fetch(&p, "other", &[0], 10, visibility).await));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    taken.sort_unstable();
    assert_eq!(taken, [(old, 3), (a, 2), (c, 2)]);
    assert_eq!(ctx.store.recover(&p, "w", 7, 10).await.unwrap(), []);
}

/// Enqueue writes a record without expiry and one stream entry holding just the number;
/// delivery marks the record running; completion removes the entry, drops the payload, and
/// gives the record its retention.
async fn a_job_lives_in_its_record_and_lane_stream(ctx: Ctx) {
    let p = ctx.partition("q");
    let number = ctx.add(&p, job("payload").lane(3).tenant("acme")).await;
    let record = sub(&p, &format!(":j:{number}"));
    let stream = sub(&p, ":s:3");
    let state: Option<String> = ctx.raw(redis::cmd("HGET").arg(&record).arg("s")).await;
    assert_eq!(state.as_deref(), Some("q"));
    let ttl: i64 = ctx.raw(redis::cmd("PTTL").arg(&record)).await;
    assert_eq!(ttl, -1, "an unfinished record never expires");
    let entries: Vec<(String, Vec<(String, String)>)> = ctx
        .raw(redis::cmd("XRANGE").arg(&stream).arg("-").arg("+"))
        .await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].1, [("n".to_owned(), number.to_string())]);
    let tenants: i64 = ctx
        .raw(redis::cmd("HGET").arg(sub(&p, ":t")).arg("acme"))
        .await;
    assert_eq!(tenants, 1);

    let delivered = ctx.fetch(&p, "w1", &[3], 10, LONG).await;
    assert_eq!(delivered.len(), 1);
    assert_eq!((delivered[0].number, delivered[0].attempt), (number, 1));
    let status = ctx.store.status(&p, number).await.unwrap().unwrap();
    assert_eq!((status.state, status.attempt), (JobState::Running, 1));

    let retention = Duration::from_secs(30);
    let applied = ctx
        .store
        .complete(&p, number, 1, Bytes::from_static(b"result"), retention)
        .await
        .unwrap();
    assert_eq!(applied, Fenced::Applied);
    let len: u64 = ctx.raw(redis::cmd("XLEN").arg(&stream)).await;
    assert_eq!(len, 0, "a finished delivery leaves its lane");
    let pending: (u64, Option<String>, Option<String>, redis::Value) =
        ctx.raw(redis::cmd("XPENDING").arg(&stream).arg("w")).await;
    assert_eq!(pending.0, 0, "a finished delivery is acknowledged");
    let ttl: i64 = ctx.raw(redis::cmd("PTTL").arg(&record)).await;
    assert!(ttl > 0 && ttl <= 30_000, "kept for the retention, {ttl} ms");
    let emptied: Vec<Option<Vec<u8>>> = ctx
        .raw(
            redis::cmd("HMGET")
                .arg(&record)
                .arg("p")
                .arg("sid")
                .arg("c")
                .arg("f"),
        )
        .await;
    assert_eq!(
        emptied,
        vec![Some(Vec::new()); 4],
        "a done job's payload and delivery (its fetch's mark too) are emptied"
    );
    let done = ctx.store.status(&p, number).await.unwrap().unwrap();
    assert_eq!(done.state, JobState::Done);
    assert_eq!(done.result.as_deref(), Some(&b"result"[..]));
    let tenants: Option<i64> = ctx
        .raw(redis::cmd("HGET").arg(sub(&p, ":t")).arg("acme"))
        .await;
    assert_eq!(tenants, None, "a tenant without unfinished jobs is dropped");
    assert_eq!(ctx.store.stats(&p).await.unwrap().unfinished, 0);
}

/// 50 enqueuers on two connections against a bound of 7: exactly 7 are added, and as many as
/// finish are accepted again.
async fn concurrent_enqueuers_never_pass_the_bound(ctx: Ctx) {
    let p = Arc::new(ctx.partition("q"));
    let other = RedisJobStore::new(
        Redis::connect(ctx.redis.config().clone())
            .await
            .expect("connect"),
    );
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = if i % 2 == 0 {
                ctx.store.clone()
            } else {
                other.clone()
            };
            let p = Arc::clone(&p);
            tokio::spawn(async move {
                store
                    .enqueue(&p, &NewJob::new(Bytes::from(i.to_string())), &limits(7))
                    .await
                    .expect("enqueue")
            })
        })
        .collect();
    let mut added = 0;
    for task in tasks {
        match task.await.unwrap() {
            Enqueued::Added(_) => added += 1,
            Enqueued::Full {
                tenant,
                depth,
                drained_per_sec,
                unfinished,
            } => {
                assert_eq!(unfinished, 7);
                assert!(!tenant);
                assert_eq!(depth, 7);
                assert_eq!(drained_per_sec, 0.0);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(added, 7);
    let count: u64 = ctx.raw(redis::cmd("GET").arg(sub(&p, ":n"))).await;
    assert_eq!(count, 7);
    for delivery in ctx.fetch(&p, "w", &[0], 2, LONG).await {
        let applied = ctx
            .store
            .complete(&p, delivery.number, delivery.attempt, Bytes::new(), LONG)
            .await
            .unwrap();
        assert_eq!(applied, Fenced::Applied);
    }
    let mut accepted = 0;
    for _ in 0..5 {
        if let Enqueued::Added(_) = ctx.store.enqueue(&p, &job("x"), &limits(7)).await.unwrap() {
            accepted += 1;
        }
    }
    assert_eq!(accepted, 2);
}

/// The dedup key expires with the window; within it, a duplicate adds nothing even when full.
async fn a_dedup_key_lives_for_its_window(ctx: Ctx) {
    let p = ctx.partition("q");
    let window = EnqueueLimits {
        dedup_window: Duration::from_millis(300),
        ..limits(1)
    };
    let Enqueued::Added(first) = ctx
        .store
        .enqueue(&p, &job("a").dedup_key("order-1"), &window)
        .await
        .unwrap()
    else {
        panic!("the first enqueue adds");
    };
    let ttl: i64 = ctx
        .raw(redis::cmd("PTTL").arg(sub(&p, ":dd:order-1")))
        .await;
    assert!(
        ttl > 0 && ttl <= 300,
        "the dedup key lives for the window, {ttl} ms"
    );
    let again = ctx
        .store
        .enqueue(&p, &job("b").dedup_key("order-1"), &window)
        .await
        .unwrap();
    assert_eq!(again, Enqueued::Duplicate(first));
    // Once the window passed, the same key is a new job, refused by the full partition.
    let deadline = Instant::now() + WAIT_BOUND;
    loop {
        match ctx
            .store
            .enqueue(&p, &job("c").dedup_key("order-1"), &window)
            .await
            .unwrap()
        {
            Enqueued::Duplicate(number) => assert_eq!(number, first),
            Enqueued::Full { tenant, depth, .. } => {
                assert!(!tenant && depth == 1);
                break;
            }
            other => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline, "a 300 ms window held for 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ctx.store.stats(&p).await.unwrap().unfinished, 1);
}

/// Each lane is its own stream; a fetch empties the lanes in the order asked, oldest first.
async fn lanes_are_separate_streams_read_in_order(ctx: Ctx) {
    let p = ctx.partition("q");
    let mut by_lane = [Vec::new(), Vec::new(), Vec::new()];
    for i in 0..9u8 {
        let lane = i % 3;
        by_lane[usize::from(lane)].push(ctx.add(&p, job("j").lane(lane)).await);
    }
    for lane in 0..3 {
        let len: u64 = ctx
            .raw(redis::cmd("XLEN").arg(sub(&p, &format!(":s:{lane}"))))
            .await;
        assert_eq!(len, 3);
    }
    let numbers = |ds: Vec<Delivery>| ds.into_iter().map(|d| d.number).collect::<Vec<_>>();
    let first = numbers(ctx.fetch(&p, "w", &[2, 0], 4, LONG).await);
    assert_eq!(
        first,
        [by_lane[2].clone(), by_lane[0][..1].to_vec()].concat()
    );
    let rest = numbers(ctx.fetch(&p, "w", &[1, 0, 2], 10, LONG).await);
    assert_eq!(
        rest,
        [by_lane[1].clone(), by_lane[0][1..].to_vec()].concat()
    );
    let stats = ctx.store.stats(&p).await.unwrap();
    assert_eq!((stats.ready, stats.running), (0, 9));
}

/// A delayed job waits in the delay set, then joins its lane when its time came.
async fn a_delayed_job_waits_in_the_delay_set(ctx: Ctx) {
    let p = ctx.partition("q");
    let start = Instant::now();
    let number = ctx
        .add(&p, job("later").lane(0).delay(Duration::from_millis(200)))
        .await;
    let now_job = ctx.add(&p, job("now")).await;
    let delayed: Vec<String> = ctx
        .raw(redis::cmd("ZRANGE").arg(sub(&p, ":d")).arg(0).arg(-1))
        .await;
    assert_eq!(delayed, [number.to_string()]);
    let first = ctx.fetch(&p, "w", &[0], 10, LONG).await;
    assert_eq!(
        first.iter().map(|d| d.number).collect::<Vec<_>>(),
        [now_job]
    );
    let later = ctx.fetch_eventually(&p, "w", LONG).await;
    assert_eq!(later[0].number, number);
    assert!(
        start.elapsed() >= Duration::from_millis(190),
        "{:?}",
        start.elapsed()
    );
    let left: u64 = ctx.raw(redis::cmd("ZCARD").arg(sub(&p, ":d"))).await;
    assert_eq!(left, 0);
}

/// A delivery idle past the visibility goes to another consumer with the next attempt; the
/// first holder is fenced, and the group forgets it (and its visibility) once it holds nothing.
async fn an_idle_delivery_is_taken_over_and_its_holder_forgotten(ctx: Ctx) {
    let p = ctx.partition("q");
    let number = ctx.add(&p, job("a")).await;
    let visibility = Duration::from_millis(300);
    let first = ctx.fetch(&p, "dies", &[0], 10, visibility).await;
    assert_eq!(first.len(), 1);
    let start = Instant::now();
    let taken = ctx.fetch_eventually(&p, "lives", visibility).await;
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "{:?}",
        start.elapsed()
    );
    assert_eq!((taken[0].number, taken[0].attempt), (number, 2));
    assert!(taken[0].taken_over);
    assert_eq!(
        ctx.store
            .complete(&p, number, 1, Bytes::new(), LONG)
            .await
            .unwrap(),
        Fenced::Rejected
    );
    assert_eq!(
        ctx.store.extend(&p, number, 1).await.unwrap(),
        Fenced::Rejected
    );
    assert_eq!(ctx.consumers(&p).await, ["lives"]);
    let visibilities = || async {
        let held: Vec<String> = ctx.raw(redis::cmd("HKEYS").arg(sub(&p, ":v"))).await;
        held
    };
    assert_eq!(
        visibilities().await,
        ["lives"],
        "a forgotten holder's visibility goes"
    );
    assert_eq!(
        ctx.store
            .complete(&p, number, 2, Bytes::new(), LONG)
            .await
            .unwrap(),
        Fenced::Applied
    );
    ctx.store.leave(&p, "lives").await.unwrap();
    assert!(
        visibilities().await.is_empty(),
        "a holder that left is forgotten"
    );
}

/// A worker killed while it held nothing (its jobs all finished) never leaves and is never
/// taken over from: the next look for lapsed deliveries forgets it, and its visibility, once
/// it has been idle for the visibility, so a queue's groups do not grow with every worker
/// that ever died. A consumer still holding a delivery is kept.
async fn a_consumer_gone_without_leaving_is_forgotten(ctx: Ctx) {
    let p = ctx.partition("q");
    let visibility = Duration::from_millis(100);
    let done = ctx.add(&p, job("done")).await;
    assert_eq!(
        ctx.fetch(&p, "dies", &[0], 1, visibility).await[0].number,
        done
    );
    let answers = ctx.complete_firsts(&p, &[done]).await;
    assert!(matches!(answers[..], [Ok(Fenced::Applied)]));
    let held = ctx.add(&p, job("held")).await;
    assert_eq!(ctx.fetch(&p, "holds", &[0], 1, LONG).await[0].number, held);
    let visibilities = || async {
        let mut held: Vec<String> = ctx.raw(redis::cmd("HKEYS").arg(sub(&p, ":v"))).await;
        held.sort();
        held
    };
    assert_eq!(ctx.consumers(&p).await, ["dies", "holds"]);
    assert_eq!(visibilities().await, ["dies", "holds"]);
    // Past the visibility (Redis counts idle time on its own clock), another worker looks.
    tokio::time::sleep(visibility + Duration::from_millis(50)).await;
    assert!(ctx.fetch(&p, "lives", &[0], 1, visibility).await.is_empty());
    // (From Redis 7.2 on, the looking worker's empty read makes it a consumer too.)
    let left = ctx.consumers(&p).await;
    assert!(left.contains(&"holds".to_owned()), "{left:?}");
    assert!(!left.contains(&"dies".to_owned()), "{left:?}");
    assert_eq!(visibilities().await, ["holds"]);

    // Many dead consumers are forgotten 100 per look, so no look takes long.
    for i in 0..250 {
        let _: i64 = ctx
            .raw(
                redis::cmd("XGROUP")
                    .arg("CREATECONSUMER")
                    .arg(sub(&p, ":s:0"))
                    .arg("w")
                    .arg(format!("dead{i}")),
            )
            .await;
    }
    // (A look with a visibility of zero finds every consumer idle long enough.)
    ctx.fetch(&p, "lives", &[0], 1, Duration::ZERO).await;
    let left = ctx.consumers(&p).await.len();
    assert!((150..=152).contains(&left), "{left} left after one look");
    for _ in 0..2 {
        ctx.fetch(&p, "lives", &[0], 1, Duration::ZERO).await;
    }
    let left = ctx.consumers(&p).await;
    assert!(
        left.iter().all(|name| !name.starts_with("dead")),
        "{left:?}"
    );
}

/// Takeovers come before ready jobs, longest idle first, from every lane (the lanes asked for
/// order only the ready jobs).
async fn takeovers_go_longest_idle_first_in_every_lane(ctx: Ctx) {
    let p = ctx.partition("q");
    let older = ctx.add(&p, job("older").lane(1)).await;
    let newer = ctx.add(&p, job("newer").lane(0)).await;
    let ready = ctx.add(&p, job("ready").lane(0)).await;
    // A fetch takes over only deliveries idle for the visibility they were fetched with too:
    // the older job is held for 20 ms, the newer one for 300 ms by another worker, 30 ms later.
    let short = Duration::from_millis(20);
    assert_eq!(ctx.fetch(&p, "a", &[1], 1, short).await[0].number, older);
    tokio::time::sleep(Duration::from_millis(30)).await;
    let long = Duration::from_millis(300);
    assert_eq!(ctx.fetch(&p, "a2", &[0], 1, long).await[0].number, newer);
    // The newer delivery then idles 30 ms longer than the takeover below: idle times are
    // counted in milliseconds, and two deliveries a moment apart could tie.
    tokio::time::sleep(Duration::from_millis(30)).await;
    let taken = ctx.fetch(&p, "b", &[0], 1, Duration::ZERO).await;
    assert_eq!((taken[0].number, taken[0].attempt), (older, 2));
    assert!(taken[0].taken_over);
    // Both deliveries lapsed now, the newer job's idle the longest.
    tokio::time::sleep(long + Duration::from_millis(50)).await;
    let rest = ctx.fetch(&p, "c", &[0], 3, Duration::from_millis(20)).await;
    let numbers: Vec<_> = rest.iter().map(|d| (d.number, d.attempt)).collect();
    assert_eq!(numbers, [(newer, 2), (older, 3), (ready, 1)]);
}

/// A fetch looks for lapsed deliveries at most once per quarter of its visibility, so one is
/// taken over within a quarter of the visibility after it lapsed (the bound documented on the
/// store); a look that found as many as the fetch could take leaves the next fetch to look at
/// once, so a dead holder's jobs are all taken over one after another, not a quarter apart.
async fn lapsed_deliveries_are_looked_for_once_per_quarter_of_the_visibility(ctx: Ctx) {
    let p = ctx.partition("q");
    let visibility = Duration::from_millis(800);
    for payload in ["a", "b", "c"] {
        ctx.add(&p, job(payload)).await;
    }
    let start = Instant::now();
    assert_eq!(ctx.fetch(&p, "dies", &[0], 3, visibility).await.len(), 3);
    // That fetch looked, found nothing lapsed, and noted when.
    let noted: Option<String> = ctx.raw(redis::cmd("GET").arg(sub(&p, ":scan"))).await;
    assert!(noted.is_some());
    let (mut taken, mut held) = (Vec::new(), Vec::new());
    while taken.len() < 3 {
        for delivery in ctx.fetch(&p, "lives", &[0], 1, visibility).await {
            assert!(delivery.taken_over);
            taken.push(start.elapsed());
            held.push(Completion {
                number: delivery.number,
                attempt: delivery.attempt,
                result: Bytes::new(),
            });
        }
        // A quarter late at most, and some slack for a loaded machine.
        assert!(
            start.elapsed() < visibility + visibility / 4 + Duration::from_millis(400),
            "taken over by {:?} at {:?}",
            start.elapsed(),
            taken
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        taken[0] >= visibility - Duration::from_millis(50),
        "{taken:?}"
    );
    assert!(taken[2] - taken[0] < visibility / 4, "{taken:?}");
    let answers = ctx.store.complete_many(&p, &held, LONG).await.unwrap();
    assert!(answers.iter().all(|a| matches!(a, Ok(Fenced::Applied))));
    // A fetch with a visibility of zero looks every time.
    ctx.add(&p, job("d")).await;
    let [d] = <[Delivery; 1]>::try_from(ctx.fetch(&p, "x", &[0], 1, Duration::ZERO).await).unwrap();
    let again = ctx.fetch(&p, "y", &[0], 1, Duration::ZERO).await;
    assert_eq!((again[0].number, again[0].attempt), (d.number, 2));
}

/// One `complete_many` finishes jobs of several lanes: their entries leave every lane, their
/// records keep the results for the retention; a job whose record is corrupt gets its own
/// error, and the others are still completed.
async fn a_batch_completion_clears_every_lane_and_answers_each_job(ctx: Ctx) {
    let p = ctx.partition("q");
    let a = ctx.add(&p, job("a").lane(0)).await;
    let b = ctx.add(&p, job("b").lane(3)).await;
    let bad = ctx.add(&p, job("bad").lane(0)).await;
    assert_eq!(ctx.fetch(&p, "w", &[0, 3], 10, LONG).await.len(), 3);
    let _: () = ctx
        .raw(
            redis::cmd("HSET")
                .arg(sub(&p, &format!(":j:{bad}")))
                .arg("l")
                .arg("nine"),
        )
        .await;
    let done = |number| Completion {
        number,
        attempt: 1,
        result: Bytes::from_static(b"ok"),
    };
    let answers = ctx
        .store
        .complete_many(&p, &[done(a), done(bad), done(b)], LONG)
        .await
        .expect("complete_many");
    assert!(matches!(answers[0], Ok(Fenced::Applied)), "{answers:?}");
    assert_eq!(
        answers[1].as_ref().map_err(|e| e.kind()).unwrap_err(),
        BackendErrorKind::Corrupt
    );
    assert!(matches!(answers[2], Ok(Fenced::Applied)), "{answers:?}");
    for lane in ["0", "3"] {
        let len: u64 = ctx
            .raw(redis::cmd("XLEN").arg(sub(&p, &format!(":s:{lane}"))))
            .await;
        let pending: Vec<redis::Value> = ctx
            .raw(
                redis::cmd("XPENDING")
                    .arg(sub(&p, &format!(":s:{lane}")))
                    .arg("w"),
            )
            .await;
        let expected = if lane == "0" { 1 } else { 0 };
        assert_eq!(len, expected, "lane {lane}");
        assert_eq!(
            pending[0],
            redis::Value::Int(expected as i64),
            "lane {lane}"
        );
    }
    for number in [a, b] {
        let ttl: i64 = ctx
            .raw(redis::cmd("PTTL").arg(sub(&p, &format!(":j:{number}"))))
            .await;
        assert!(ttl > 0 && ttl <= LONG.as_millis() as i64, "{ttl}");
        let record = ctx.store.status(&p, number).await.unwrap().unwrap();
        assert_eq!(record.state, JobState::Done);
        assert_eq!(record.result.as_deref(), Some(&b"ok"[..]));
    }
    let unfinished: u64 = ctx.raw(redis::cmd("GET").arg(sub(&p, ":n"))).await;
    assert_eq!(unfinished, 1);
}

/// A retried job waits in the delay set as retrying, then comes back with attempt 2 in a new
/// stream entry.
async fn a_retried_job_is_redelivered_with_the_next_attempt(ctx: Ctx) {
    let p = ctx.partition("q");
    let number = ctx.add(&p, job("a").lane(1)).await;
    let first = ctx.fetch(&p, "w", &[1], 1, LONG).await;
    assert_eq!(first[0].attempt, 1);
    let retried = ctx
        .store
        .retry(
            &p,
            number,
            1,
            Duration::from_millis(100),
            Bytes::from_static(b"boom"),
        )
        .await
        .unwrap();
    assert_eq!(retried, Fenced::Applied);
    let len: u64 = ctx.raw(redis::cmd("XLEN").arg(sub(&p, ":s:1"))).await;
    assert_eq!(len, 0);
    let record = ctx.store.status(&p, number).await.unwrap().unwrap();
    assert_eq!(record.state, JobState::Retrying);
    assert_eq!(record.error.as_deref(), Some(&b"boom"[..]));
    assert_eq!(
        ctx.store
            .complete(&p, number, 1, Bytes::new(), LONG)
            .await
            .unwrap(),
        Fenced::Rejected,
        "a retrying job has no holder"
    );
    let deadline = Instant::now() + WAIT_BOUND;
    let again = loop {
        let delivered = ctx.fetch(&p, "w", &[1], 1, LONG).await;
        if let [delivery] = delivered.as_slice() {
            break delivery.clone();
        }
        assert!(Instant::now() < deadline, "not redelivered within 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!((again.number, again.attempt, again.lane), (number, 2, 1));
    assert!(!again.taken_over);
    assert_eq!(&again.payload[..], b"a");
    assert_eq!(ctx.store.stats(&p).await.unwrap().unfinished, 1);
}

/// Buried jobs keep payload and error, are listed newest first, and free their place.
async fn buried_jobs_are_dead_letters_newest_first(ctx: Ctx) {
    let p = ctx.partition("q");
    let mut numbers = Vec::new();
    for i in 0..3 {
        numbers.push(
            ctx.add(&p, NewJob::new(Bytes::from(format!("job {i}"))))
                .await,
        );
    }
    // Buried in the order 2, 0, 1: newest first is 1, 0, 2.
    let delivered = ctx.fetch(&p, "w", &[0], 3, LONG).await;
    assert_eq!(delivered.len(), 3);
    for i in [2, 0, 1] {
        let applied = ctx
            .store
            .bury(&p, numbers[i], 1, Bytes::from_static(b"poison"), LONG)
            .await
            .unwrap();
        assert_eq!(applied, Fenced::Applied);
    }
    assert_eq!(
        ctx.store.dead_letters(&p, 10).await.unwrap(),
        [numbers[1], numbers[0], numbers[2]]
    );
    assert_eq!(
        ctx.store.dead_letters(&p, 2).await.unwrap(),
        [numbers[1], numbers[0]]
    );
    let dead = ctx.store.status(&p, numbers[2]).await.unwrap().unwrap();
    assert_eq!(dead.state, JobState::Dead);
    assert_eq!(dead.payload.as_deref(), Some(&b"job 2"[..]));
    assert_eq!(dead.error.as_deref(), Some(&b"poison"[..]));
    let stats = ctx.store.stats(&p).await.unwrap();
    assert_eq!((stats.unfinished, stats.running, stats.dead), (0, 0, 3));
    // A dead letter whose record went (here deleted by hand) is no longer listed.
    let _: i64 = ctx
        .raw(redis::cmd("DEL").arg(sub(&p, &format!(":j:{}", numbers[0]))))
        .await;
    assert_eq!(
        ctx.store.dead_letters(&p, 10).await.unwrap(),
        [numbers[1], numbers[2]]
    );
    assert_eq!(ctx.store.stats(&p).await.unwrap().dead, 2);
}

/// A job's record replaced by a key of another type (a string here): a fetch meeting it,
/// among ready, due or lapsed jobs, fails typed with `Corrupt`, takes it off its lane, and
/// leaves every other job deliverable; none is lost with it.
async fn a_record_of_another_type_is_corrupt_and_stops_no_other_job(ctx: Ctx) {
    let p = ctx.partition("q");
    let numbers = |ds: Vec<Delivery>| ds.into_iter().map(|d| d.number).collect::<Vec<_>>();
    async fn replace(ctx: &Ctx, p: &Key, number: JobNumber) {
        let record = sub(p, &format!(":j:{number}"));
        let _: i64 = ctx.raw(redis::cmd("DEL").arg(&record)).await;
        let _: () = ctx.raw(redis::cmd("SET").arg(&record).arg("x")).await;
    }
    async fn fetch_err(ctx: &Ctx, p: &Key, visibility: Duration) -> BackendErrorKind {
        let request = FetchRequest {
            consumer: "w",
            lanes: &[0],
            max: 10,
            visibility,
        };
        ctx.store.fetch(p, request).await.unwrap_err().kind()
    }

    // Ready: the jobs before it are delivered, then it fails alone, then the rest come.
    let [before, bad, after] = [
        ctx.add(&p, job("before")).await,
        ctx.add(&p, job("bad")).await,
        ctx.add(&p, job("after")).await,
    ];
    replace(&ctx, &p, bad).await;
    assert_eq!(numbers(ctx.fetch(&p, "w", &[0], 10, LONG).await), [before]);
    assert_eq!(fetch_err(&ctx, &p, LONG).await, BackendErrorKind::Corrupt);
    assert_eq!(numbers(ctx.fetch(&p, "w", &[0], 10, LONG).await), [after]);
    for number in [before, after] {
        let done = ctx.store.complete(&p, number, 1, Bytes::new(), LONG).await;
        assert_eq!(done.unwrap(), Fenced::Applied);
    }

    // Due: two jobs waiting to be retried, one replaced; the other still comes.
    let [x, y] = [ctx.add(&p, job("x")).await, ctx.add(&p, job("y")).await];
    assert_eq!(numbers(ctx.fetch(&p, "w", &[0], 10, LONG).await), [x, y]);
    for number in [x, y] {
        let retried = ctx.store.retry(&p, number, 1, Duration::ZERO, Bytes::new());
        assert_eq!(retried.await.unwrap(), Fenced::Applied);
    }
    replace(&ctx, &p, x).await;
    assert_eq!(fetch_err(&ctx, &p, LONG).await, BackendErrorKind::Corrupt);
    let again = ctx.fetch(&p, "w", &[0], 10, LONG).await;
    assert_eq!((again[0].number, again[0].attempt), (y, 2));
    assert_eq!(again.len(), 1);
    let done = ctx.store.complete(&p, y, 2, Bytes::new(), LONG).await;
    assert_eq!(done.unwrap(), Fenced::Applied);

    // Running: its steps and a batch completion answer `Corrupt` for it alone (the other job
    // is completed), and a takeover fails on it once, taking it off its lane.
    let [held, other] = [
        ctx.add(&p, job("held")).await,
        ctx.add(&p, job("other")).await,
    ];
    // Held for 1 ms, so that a takeover may take it: one past its holder's visibility only.
    assert_eq!(
        numbers(ctx.fetch(&p, "w", &[0], 10, Duration::from_millis(1)).await),
        [held, other]
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    replace(&ctx, &p, held).await;
    let err = ctx.store.extend(&p, held, 1).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Corrupt, "{err}");
    let answers = ctx.complete_firsts(&p, &[held, other]).await;
    assert_eq!(
        answers[0].as_ref().map_err(|e| e.kind()).unwrap_err(),
        BackendErrorKind::Corrupt
    );
    assert!(matches!(answers[1], Ok(Fenced::Applied)), "{answers:?}");
    assert_eq!(
        fetch_err(&ctx, &p, Duration::ZERO).await,
        BackendErrorKind::Corrupt
    );
    assert!(
        ctx.fetch(&p, "v", &[0], 10, Duration::ZERO)
            .await
            .is_empty()
    );

    // None of the replaced jobs is counted or listed any more.
    let stats = ctx.store.stats(&p).await.unwrap();
    assert_eq!(
        (stats.unfinished, stats.ready, stats.running, stats.delayed),
        (0, 0, 0, 0)
    );
}

/// A hand-back count the store did not write: a release fails on it with a typed error and
/// changes nothing (the job stays held, for a takeover), and a delivery reads it as no
/// hand-backs, so every delivery is charged.
async fn a_corrupt_hand_back_count_changes_nothing_and_charges_every_delivery(ctx: Ctx) {
    let p = ctx.partition("q");
    let number = ctx.add(&p, job("a")).await;
    assert_eq!(ctx.fetch(&p, "w", &[0], 1, Duration::ZERO).await.len(), 1);
    let record = sub(&p, &format!(":j:{number}"));
    let _: i64 = ctx
        .raw(redis::cmd("HSET").arg(&record).arg("h").arg("lots"))
        .await;
    let err = ctx
        .store
        .release(&p, number, 1, Bytes::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Corrupt, "{err}");
    let record_now = ctx.store.status(&p, number).await.unwrap().unwrap();
    assert_eq!(record_now.state, JobState::Running, "nothing changed");
    // The holder's visibility lapses; the job is taken over, charged as every delivery is.
    let taken = ctx.fetch(&p, "v", &[0], 1, Duration::ZERO).await;
    assert_eq!((taken[0].attempt, taken[0].handed_back), (2, 0));
}

/// Where a takeover look goes on from in a lane, replaced by something the store did not
/// write (garbage, or a key of another type): the look drops it and starts from the lane's
/// start, rather than failing every fetch of the partition.
async fn a_takeover_place_the_store_did_not_write_is_dropped(ctx: Ctx) {
    let p = ctx.partition("q");
    let place = sub(&p, ":scanat");
    let number = ctx.add(&p, job("a")).await;
    let short = Duration::from_millis(1);
    assert_eq!(ctx.fetch(&p, "gone", &[0], 1, short).await.len(), 1);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let _: i64 = ctx
        .raw(redis::cmd("HSET").arg(&place).arg("0").arg("garbage"))
        .await;
    let taken = ctx.fetch(&p, "new", &[0], 1, short).await;
    assert_eq!((taken[0].number, taken[0].attempt), (number, 2));
    tokio::time::sleep(Duration::from_millis(5)).await;
    let _: i64 = ctx.raw(redis::cmd("DEL").arg(&place)).await;
    let _: () = ctx.raw(redis::cmd("SET").arg(&place).arg("x")).await;
    let taken = ctx.fetch(&p, "newer", &[0], 1, short).await;
    assert_eq!((taken[0].number, taken[0].attempt), (number, 3));
}

/// A tenant's unfinished count that is not a number (written by something else): the steps
/// that count that tenant's jobs finish as they would and start its count again, rather than
/// failing half way (the partition's count already taken down, again at every retry) or
/// leaving other tenants' counts as they were.
async fn a_tenant_count_the_store_did_not_write_is_started_again(ctx: Ctx) {
    let p = ctx.partition("q");
    let counts = sub(&p, ":t");
    let [a, b, c] = [
        ctx.add(&p, job("a").tenant("acme")).await,
        ctx.add(&p, job("b").tenant("acme")).await,
        ctx.add(&p, job("c").tenant("globex")).await,
    ];
    assert_eq!(ctx.fetch(&p, "w", &[0], 10, LONG).await.len(), 3);
    let _: i64 = ctx
        .raw(redis::cmd("HSET").arg(&counts).arg("acme").arg("x"))
        .await;
    let buried = ctx.store.bury(&p, a, 1, Bytes::new(), LONG).await;
    assert_eq!(buried.unwrap(), Fenced::Applied);
    let _: i64 = ctx
        .raw(redis::cmd("HSET").arg(&counts).arg("acme").arg("x"))
        .await;
    let answers = ctx.complete_firsts(&p, &[b, c]).await;
    assert!(
        answers.iter().all(|a| matches!(a, Ok(Fenced::Applied))),
        "{answers:?}"
    );
    assert_eq!(ctx.store.stats(&p).await.unwrap().unfinished, 0);
    let left: Vec<String> = ctx.raw(redis::cmd("HKEYS").arg(&counts)).await;
    assert!(left.is_empty(), "tenant counts left: {left:?}");
    // Enqueues count again from there, with the count not a number once more.
    let _: i64 = ctx
        .raw(redis::cmd("HSET").arg(&counts).arg("acme").arg("x"))
        .await;
    ctx.add(&p, job("d").tenant("acme")).await;
    let count: String = ctx.raw(redis::cmd("HGET").arg(&counts).arg("acme")).await;
    assert_eq!(count, "1");
    // And so does an enqueue bounded per tenant, which reads the count first.
    let _: i64 = ctx
        .raw(redis::cmd("HSET").arg(&counts).arg("acme").arg("x"))
        .await;
    let bounded = EnqueueLimits {
        max_per_tenant: Some(10),
        ..limits(1_000)
    };
    let added = ctx
        .store
        .enqueue(&p, &job("e").tenant("acme"), &bounded)
        .await;
    assert!(matches!(added, Ok(Enqueued::Added(_))), "{added:?}");
    let count: String = ctx.raw(redis::cmd("HGET").arg(&counts).arg("acme")).await;
    assert_eq!(count, "1");
}

/// A record a delivery cannot carry (an attempt at the largest the store counts, so the next
/// is past it) or that no step could finish (its lane gone from it): a fetch meeting it fails
/// typed with `Corrupt` and takes it off its lane, instead of delivering it (to be delivered
/// again after every visibility, since no step would finish it) or failing the whole fetch
/// with the other jobs already marked running.
async fn a_record_no_step_could_finish_is_corrupt_and_not_delivered(ctx: Ctx) {
    let p = ctx.partition("q");
    let numbers = |ds: Vec<Delivery>| ds.into_iter().map(|d| d.number).collect::<Vec<_>>();
    let before = ctx.add(&p, job("before")).await;
    let last_attempt = ctx.add(&p, job("last attempt")).await;
    let no_lane = ctx.add(&p, job("no lane")).await;
    let after = ctx.add(&p, job("after")).await;
    let record = |number: JobNumber| sub(&p, &format!(":j:{number}"));
    let _: i64 = ctx
        .raw(
            redis::cmd("HSET")
                .arg(record(last_attempt))
                .arg("a")
                .arg(u32::MAX),
        )
        .await;
    let _: i64 = ctx
        .raw(redis::cmd("HDEL").arg(record(no_lane)).arg("l"))
        .await;
    let request = FetchRequest {
        consumer: "w",
        lanes: &[0],
        max: 10,
        visibility: LONG,
    };
    assert_eq!(
        numbers(ctx.store.fetch(&p, request).await.unwrap()),
        [before]
    );
    for _ in 0..2 {
        let err = ctx.store.fetch(&p, request).await.unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::Corrupt, "{err}");
    }
    assert_eq!(
        numbers(ctx.store.fetch(&p, request).await.unwrap()),
        [after]
    );
    let stats = ctx.store.stats(&p).await.unwrap();
    assert_eq!(
        (stats.unfinished, stats.ready, stats.running),
        (2, 0, 2),
        "the corrupt jobs are no longer counted"
    );
}

/// Bytes the store did not write in a record give a typed error, never a panic; a fetch
/// delivers the jobs before a corrupt one, fails on it alone, and then goes on past it.
async fn garbage_in_a_record_is_a_typed_error(ctx: Ctx) {
    let p = ctx.partition("q");
    let before = ctx.add(&p, job("before")).await;
    let bad = ctx.add(&p, job("bad")).await;
    let after = ctx.add(&p, job("after")).await;
    let record = sub(&p, &format!(":j:{bad}"));
    let _: i64 = ctx
        .raw(
            redis::cmd("HSET")
                .arg(&record)
                .arg("a")
                .arg(&b"\xff\x00garbage"[..]),
        )
        .await;
    let err = ctx.store.status(&p, bad).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Corrupt, "{err}");

    let numbers = |ds: Vec<Delivery>| ds.into_iter().map(|d| d.number).collect::<Vec<_>>();
    assert_eq!(numbers(ctx.fetch(&p, "w", &[0], 10, LONG).await), [before]);
    let err = ctx
        .store
        .fetch(
            &p,
            FetchRequest {
                consumer: "w",
                lanes: &[0],
                max: 10,
                visibility: LONG,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Corrupt, "{err}");
    // The corrupt job left its lane; the job read past it went back, undelivered.
    let stats = ctx.store.stats(&p).await.unwrap();
    assert_eq!((stats.ready, stats.running), (1, 1));
    assert_eq!(numbers(ctx.fetch(&p, "w", &[0], 10, LONG).await), [after]);
    assert_eq!(
        ctx.store.status(&p, after).await.unwrap().unwrap().attempt,
        1
    );

    // A corrupt job met by a takeover is also taken off its lane.
    for number in [before, after] {
        let done = ctx.store.complete(&p, number, 1, Bytes::new(), LONG).await;
        assert_eq!(done.unwrap(), Fenced::Applied);
    }
    let taken = ctx.add(&p, job("taken")).await;
    // Held for 1 ms, so that a takeover may take it: one past its holder's visibility only.
    let short = Duration::from_millis(1);
    assert_eq!(numbers(ctx.fetch(&p, "w", &[0], 10, short).await), [taken]);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let _: i64 = ctx
        .raw(
            redis::cmd("HSET")
                .arg(sub(&p, &format!(":j:{taken}")))
                .arg("e")
                .arg("-"),
        )
        .await;
    let err = ctx
        .store
        .fetch(
            &p,
            FetchRequest {
                consumer: "x",
                lanes: &[0],
                max: 10,
                visibility: Duration::ZERO,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Corrupt, "{err}");
    let stats = ctx.store.stats(&p).await.unwrap();
    assert_eq!(
        (stats.ready, stats.running),
        (0, 0),
        "the corrupt delivery is gone"
    );
    // Neither corrupt job counts against the bound any more: a queue full of them would
    // refuse every enqueue for good.
    assert_eq!(stats.unfinished, 0, "corrupt jobs still counted");
    assert!(
        ctx.fetch(&p, "x", &[0], 10, Duration::ZERO)
            .await
            .is_empty()
    );

    // A state the store never writes, and a record of the wrong type.
    let _: i64 = ctx
        .raw(
            redis::cmd("HSET")
                .arg(&record)
                .arg("a")
                .arg("1")
                .arg("s")
                .arg("?"),
        )
        .await;
    let err = ctx.store.status(&p, bad).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Corrupt, "{err}");
    let _: i64 = ctx.raw(redis::cmd("DEL").arg(&record)).await;
    let _: () = ctx.raw(redis::cmd("SET").arg(&record).arg("x")).await;
    assert!(ctx.store.status(&p, bad).await.is_err());
    assert_eq!(
        ctx.store
            .complete(&p, bad, 1, Bytes::new(), LONG)
            .await
            .map_err(|e| e.kind()),
        Err(BackendErrorKind::Corrupt)
    );

    // A running job whose delivery id was overwritten: its steps fail typed, change nothing.
    let good = ctx.add(&p, job("good")).await;
    assert_eq!(numbers(ctx.fetch(&p, "w", &[0], 10, LONG).await), [good]);
    let record = sub(&p, &format!(":j:{good}"));
    let _: i64 = ctx
        .raw(redis::cmd("HSET").arg(&record).arg("sid").arg("not-an-id"))
        .await;
    let err = ctx
        .store
        .complete(&p, good, 1, Bytes::new(), LONG)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Corrupt, "{err}");
    let status = ctx.store.status(&p, good).await.unwrap().unwrap();
    assert_eq!(status.state, JobState::Running);
}

/// Garbage in the partition's counters is a typed error too.
async fn garbage_in_the_counts_is_a_typed_error(ctx: Ctx) {
    let p = ctx.partition("q");
    ctx.add(&p, job("a")).await;
    // Bytes that are not a number, then a key of another type.
    let mut set = redis::cmd("SET");
    set.arg(sub(&p, ":n")).arg(&b"\xfe\xff"[..]);
    let mut hset = redis::cmd("HSET");
    hset.arg(sub(&p, ":n")).arg("f").arg("1");
    for garbage in [set, hset] {
        let _: i64 = ctx.raw(redis::cmd("DEL").arg(sub(&p, ":n"))).await;
        let _: redis::Value = ctx.raw(&garbage).await;
        let err = ctx.store.stats(&p).await.unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::Corrupt, "{err}");
        let err = ctx
            .store
            .enqueue(&p, &job("b"), &limits(10))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::Corrupt, "{err}");
    }
    let _: i64 = ctx.raw(redis::cmd("DEL").arg(sub(&p, ":n"))).await;
    // A dedup key holding something other than a number.
    let _: () = ctx
        .raw(redis::cmd("SET").arg(sub(&p, ":dd:k")).arg("nonsense"))
        .await;
    let err = ctx
        .store
        .enqueue(&p, &job("b").dedup_key("k"), &limits(10))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Corrupt, "{err}");
}

/// The drain-rate buckets replaced by a key of another type: they only estimate how fast the
/// partition drains, so every step goes on (the estimate starts over) rather than failing
/// after the job's own writes.
async fn drain_stats_of_another_type_fail_no_step(ctx: Ctx) {
    let p = ctx.partition("q");
    let [a, b] = [ctx.add(&p, job("a")).await, ctx.add(&p, job("b")).await];
    assert_eq!(ctx.fetch(&p, "w", &[0], 10, LONG).await.len(), 2);
    let _: () = ctx
        .raw(redis::cmd("SET").arg(sub(&p, ":stats")).arg("x"))
        .await;
    let done = ctx.store.complete(&p, a, 1, Bytes::new(), LONG).await;
    assert_eq!(done.unwrap(), Fenced::Applied);
    let _: i64 = ctx.raw(redis::cmd("DEL").arg(sub(&p, ":stats"))).await;
    let _: () = ctx
        .raw(redis::cmd("SET").arg(sub(&p, ":stats")).arg("x"))
        .await;
    let buried = ctx.store.bury(&p, b, 1, Bytes::new(), LONG).await;
    assert_eq!(buried.unwrap(), Fenced::Applied);
    let stats = ctx.store.stats(&p).await.unwrap();
    assert_eq!((stats.unfinished, stats.dead), (0, 1));
    ctx.add(&p, job("c")).await;
}

/// The partition's unfinished count replaced by something else: enqueues are refused as
/// corrupt until it is reset, but the steps that finish jobs go on whole (the job done or
/// dead, off its lane, its tenant's count down) rather than failing after their own writes.
async fn an_unfinished_count_the_store_did_not_write_fails_no_step(ctx: Ctx) {
    let p = ctx.partition("q");
    let a = ctx.add(&p, job("a").tenant("t")).await;
    let b = ctx.add(&p, job("b")).await;
    let visibility = Duration::from_millis(100);
    assert_eq!(ctx.fetch(&p, "w", &[0], 10, visibility).await.len(), 2);
    let _: () = ctx
        .raw(redis::cmd("SET").arg(sub(&p, ":n")).arg(&b"\xfe\xff"[..]))
        .await;
    let done = ctx.store.complete(&p, a, 1, Bytes::new(), LONG).await;
    assert_eq!(done.unwrap(), Fenced::Applied);
    let buried = ctx.store.bury(&p, b, 1, Bytes::new(), LONG).await;
    assert_eq!(buried.unwrap(), Fenced::Applied);
    let refused = ctx.store.enqueue(&p, &job("c"), &limits(10)).await;
    assert_eq!(refused.unwrap_err().kind(), BackendErrorKind::Corrupt);
    // Reset by hand; nothing is delivered again, and the tenant's count went down.
    let _: i64 = ctx.raw(redis::cmd("DEL").arg(sub(&p, ":n"))).await;
    tokio::time::sleep(2 * visibility).await;
    assert!(ctx.fetch(&p, "w2", &[0], 10, LONG).await.is_empty());
    let state = |n| {
        let store = &ctx.store;
        let p = &p;
        async move { store.status(p, n).await.unwrap().map(|record| record.state) }
    };
    assert_eq!(state(a).await, Some(JobState::Done));
    assert_eq!(state(b).await, Some(JobState::Dead));
    let one_per_tenant = EnqueueLimits {
        max_per_tenant: Some(1),
        ..limits(10)
    };
    let again = ctx
        .store
        .enqueue(&p, &job("d").tenant("t"), &one_per_tenant)
        .await;
    assert!(matches!(again, Ok(Enqueued::Added(_))), "{again:?}");
}

/// The subjects' hash replaced by a key of another type, or a field naming no job of its
/// subject: no newest job is found there, and no step fails on it (the next enqueue with a
/// subject writes the hash afresh).
async fn foreign_subjects_find_nothing_and_fail_no_step(ctx: Ctx) {
    let p = ctx.partition("q");
    let a = ctx.add(&p, job("a").subject("s")).await;
    let other = ctx.add(&p, job("o").subject("t")).await;
    let _: () = ctx.raw(redis::cmd("SET").arg(sub(&p, ":k")).arg("x")).await;
    assert_eq!(ctx.store.newest_of(&p, b"s").await.unwrap(), None);
    assert_eq!(ctx.fetch(&p, "w", &[0], 10, LONG).await.len(), 2);
    let done = ctx.store.complete(&p, a, 1, Bytes::new(), LONG).await;
    assert_eq!(done.unwrap(), Fenced::Applied);
    let b = ctx.add(&p, job("b").subject("s")).await;
    assert_eq!(
        ctx.store.newest_of(&p, b"s").await.unwrap(),
        Some((b, Bytes::from_static(b"b")))
    );
    for foreign in ["junk".to_owned(), other.to_string(), "99999".to_owned()] {
        let _: i64 = ctx
            .raw(redis::cmd("HSET").arg(sub(&p, ":k")).arg("s").arg(&foreign))
            .await;
        assert_eq!(
            ctx.store.newest_of(&p, b"s").await.unwrap(),
            None,
            "{foreign}"
        );
    }
    let buried = ctx.store.bury(&p, other, 1, Bytes::new(), LONG).await;
    assert_eq!(buried.unwrap(), Fenced::Applied);
}

/// A job a fetch takes off its lane as corrupt (no step could finish it) is no longer its
/// subject's newest: it will never run, so nothing may answer its payload as pending.
async fn a_corrupt_job_taken_off_its_lane_is_not_its_subjects_newest(ctx: Ctx) {
    let p = ctx.partition("q");
    let number = ctx.add(&p, job("a").subject("s")).await;
    let _: i64 = ctx
        .raw(
            redis::cmd("HSET")
                .arg(sub(&p, &format!(":j:{number}")))
                .arg("l")
                .arg("x"),
        )
        .await;
    let request = FetchRequest {
        consumer: "w",
        lanes: &[0],
        max: 10,
        visibility: LONG,
    };
    let err = ctx.store.fetch(&p, request).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Corrupt, "{err}");
    assert_eq!(ctx.store.newest_of(&p, b"s").await.unwrap(), None);
}

/// The delayed set and a lane stream replaced by keys of another type hold none of the
/// store's jobs: they are dropped and made afresh, so no step fails half way through its
/// writes (a retry that took its job off its lane and then failed to delay it left the job
/// retrying for good, counted against the bound).
async fn a_delayed_set_or_lane_of_another_type_fails_no_step(ctx: Ctx) {
    let p = ctx.partition("q");
    let _: () = ctx
        .raw(redis::cmd("SET").arg(sub(&p, ":s:0")).arg("x"))
        .await;
    let a = ctx.add(&p, job("a")).await;
    let delivered = ctx.fetch(&p, "w", &[0], 10, LONG).await;
    assert_eq!(delivered.len(), 1);
    let _: () = ctx.raw(redis::cmd("SET").arg(sub(&p, ":d")).arg("x")).await;
    let retried = ctx
        .store
        .retry(&p, a, 1, Duration::ZERO, Bytes::from_static(b"again"))
        .await;
    assert_eq!(retried.unwrap(), Fenced::Applied);
    let again = ctx.fetch_eventually(&p, "w", LONG).await;
    assert_eq!((again[0].number, again[0].attempt), (a, 2));
    let _: () = ctx.raw(redis::cmd("SET").arg(sub(&p, ":d")).arg("x")).await;
    let b = ctx.add(&p, job("b").delay(Duration::from_millis(1))).await;
    let later = ctx.fetch_eventually(&p, "w", LONG).await;
    assert_eq!(later[0].number, b);
    let _: () = ctx.raw(redis::cmd("SET").arg(sub(&p, ":d")).arg("x")).await;
    assert!(ctx.fetch(&p, "w", &[0], 10, LONG).await.is_empty());
    let stats = ctx.store.stats(&p).await.unwrap();
    assert_eq!((stats.unfinished, stats.running), (2, 2), "{stats:?}");
    // A lane no job of the partition uses, of another type: fetches, recoveries, stats and
    // leaving pass over it.
    let _: () = ctx
        .raw(redis::cmd("SET").arg(sub(&p, ":s:7")).arg("x"))
        .await;
    let c = ctx.add(&p, job("c")).await;
    let fetched = ctx.fetch(&p, "v", &[0], 10, Duration::ZERO).await;
    assert!(fetched.iter().any(|d| d.number == c), "{fetched:?}");
    assert!(ctx.store.recover(&p, "v", 1, 10).await.unwrap().is_empty());
    ctx.store.stats(&p).await.unwrap();
    ctx.store.leave(&p, "v").await.unwrap();
}

/// Zero retentions and dedup windows, and lanes past the last, are refused as configuration
/// errors without touching Redis.
async fn invalid_arguments_are_refused_before_redis(ctx: Ctx) {
    let p = ctx.partition("q");
    let zero_window = EnqueueLimits {
        dedup_window: Duration::ZERO,
        ..limits(10)
    };
    let err = ctx
        .store
        .enqueue(&p, &job("a").dedup_key("k"), &zero_window)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Config);
    // Without a dedup key the window does not matter.
    assert!(matches!(
        ctx.store
            .enqueue(&p, &job("a"), &zero_window)
            .await
            .unwrap(),
        Enqueued::Added(_)
    ));
    let err = ctx
        .store
        .enqueue(&p, &job("a").lane(8), &limits(10))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Config);
    let err = ctx
        .store
        .enqueue(
            &p,
            &job("a").subject("s").subject_rank((1 << 53) + 1),
            &limits(10),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Config);
    let err = ctx
        .store
        .fetch(
            &p,
            FetchRequest {
                consumer: "w",
                lanes: &[0, 9],
                max: 1,
                visibility: LONG,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Config);
    let delivered = ctx.fetch(&p, "w", &[0], 1, LONG).await;
    let number = delivered[0].number;
    for retention in [Duration::ZERO, Duration::from_micros(999)] {
        let err = ctx
            .store
            .complete(&p, number, 1, Bytes::new(), retention)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::Config);
        let err = ctx
            .store
            .bury(&p, number, 1, Bytes::new(), retention)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::Config);
    }
    // Nothing changed: the job is still held by attempt 1.
    assert_eq!(
        ctx.store.extend(&p, number, 1).await.unwrap(),
        Fenced::Applied
    );
    // A zero retry delay is allowed: the job is ready at the next fetch.
    assert_eq!(
        ctx.store
            .retry(&p, number, 1, Duration::ZERO, Bytes::new())
            .await
            .unwrap(),
        Fenced::Applied
    );
    assert_eq!(ctx.fetch(&p, "w", &[0], 1, LONG).await[0].attempt, 2);
}

/// On a cluster, partitions with different hash tags live on different masters and both
/// work; a partition without a hash tag is refused, since its keys would spread over slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_partitions_are_spread_over_slots() {
    let cluster = shared_cluster();
    let ctx = Ctx::new(RedisConfig::cluster(cluster.urls()), "spread").await;
    let first = ctx.partition("p0");
    let owner = cluster.slot_owner(cluster_slot(first.as_bytes()));
    let second = (1..100)
        .map(|i| ctx.partition(&format!("p{i}")))
        .find(|p| cluster.slot_owner(cluster_slot(p.as_bytes())) != owner)
        .expect("a hash tag on another master");
    for p in [&first, &second] {
        let number = ctx.add(p, job("a")).await;
        let key = String::from_utf8(sub(p, ":s:0")).unwrap();
        assert_eq!(cluster.keyslot(&key), cluster_slot(p.as_bytes()));
        let delivered = ctx.fetch(p, "w", &[0], 10, LONG).await;
        assert_eq!(delivered.len(), 1);
        assert_eq!(
            ctx.store
                .complete(p, number, 1, Bytes::new(), LONG)
                .await
                .unwrap(),
            Fenced::Applied
        );
        let stats = ctx.store.stats(p).await.unwrap();
        assert_eq!((stats.unfinished, stats.running), (0, 0));
    }
    let untagged = ctx.ns.key("plain").unwrap();
    let err = ctx
        .store
        .enqueue(&untagged, &job("a"), &limits(10))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Config);
}

/// On a standalone server, a partition without a hash tag works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_partitions_need_no_hash_tag() {
    let ctx = Ctx::new(RedisConfig::standalone(shared_server().url()), "untagged").await;
    let p = ctx.ns.key("plain").unwrap();
    let number = ctx.add(&p, job("a")).await;
    let delivered = ctx.fetch(&p, "w", &[0], 10, LONG).await;
    assert_eq!(delivered[0].number, number);
}

/// The entries of a lane: their job numbers, oldest first.
async fn lane_numbers(ctx: &Ctx, p: &Key, lane: u8) -> Vec<JobNumber> {
    let entries: Vec<(String, Vec<(String, String)>)> = ctx
        .raw(
            redis::cmd("XRANGE")
                .arg(sub(p, &format!(":s:{lane}")))
                .arg("-")
                .arg("+"),
        )
        .await;
    entries
        .iter()
        .map(|(_, fields)| fields[0].1.parse().expect("a job number"))
        .collect()
}

/// Completions remove their lane entries in bulk where they can: whatever order jobs finish
/// in, a lane keeps exactly the entries of running and ready jobs, and a running job's entry
/// before the completed ones is never removed with them.
async fn completions_in_any_order_leave_exactly_the_pending_and_ready_entries(ctx: Ctx) {
    let p = ctx.partition("q");
    let mut numbers = Vec::new();
    for _ in 0..6 {
        numbers.push(ctx.add(&p, job("x")).await);
    }
    let [a, b, c, d, e, f] = numbers[..] else {
        unreachable!("six jobs")
    };
    let held = ctx.fetch(&p, "w", &[0], 3, LONG).await;
    assert_eq!(held.len(), 3);
    let complete = |jobs: Vec<JobNumber>| {
        let jobs: Vec<Completion> = jobs
            .into_iter()
            .map(|number| Completion {
                number,
                attempt: 1,
                result: Bytes::new(),
            })
            .collect();
        let store = ctx.store.clone();
        let p = p.clone();
        async move {
            let answers = store
                .complete_many(&p, &jobs, LONG)
                .await
                .expect("complete");
            assert!(answers.iter().all(|a| matches!(a, Ok(Fenced::Applied))));
        }
    };
    // The newest running job first, then the oldest: `b` stays, before both.
    complete(vec![c]).await;
    assert_eq!(lane_numbers(&ctx, &p, 0).await, [a, b, d, e, f]);
    complete(vec![a]).await;
    assert_eq!(lane_numbers(&ctx, &p, 0).await, [b, d, e, f]);
    let more = ctx.fetch(&p, "w", &[0], 2, LONG).await;
    assert_eq!(more.len(), 2);
    complete(vec![e, d]).await;
    assert_eq!(lane_numbers(&ctx, &p, 0).await, [b, f]);
    let stats = ctx.store.stats(&p).await.expect("stats");
    assert_eq!((stats.running, stats.ready), (1, 1));
    complete(vec![b]).await;
    assert_eq!(lane_numbers(&ctx, &p, 0).await, [f]);
    let last = ctx.fetch(&p, "w", &[0], 10, LONG).await;
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].number, f);
    complete(vec![f]).await;
    assert!(lane_numbers(&ctx, &p, 0).await.is_empty());
}

/// A completion removes the entries before its own in bulk only when its entry was pending
/// (delivered by the lane's group). Here the lane's stream is lost while a job runs (evicted
/// under an `allkeys-*` memory policy, or deleted by hand) and made again by new jobs whose
/// ids fall below the running job's (a server whose clock is behind the one that delivered
/// it): completing that job must leave the new, ready jobs in their lane.
async fn a_completion_whose_entry_is_not_pending_removes_no_other_entry(ctx: Ctx) {
    let p = ctx.partition("q");
    let running = ctx.add(&p, job("running")).await;
    assert_eq!(ctx.fetch(&p, "w", &[0], 1, LONG).await.len(), 1);
    let _: i64 = ctx.raw(redis::cmd("DEL").arg(sub(&p, ":s:0"))).await;
    let mut ready = Vec::new();
    for _ in 0..3 {
        ready.push(ctx.add(&p, job("ready")).await);
    }
    let entries: Vec<(String, Vec<(String, String)>)> = ctx
        .raw(redis::cmd("XRANGE").arg(sub(&p, ":s:0")).arg("-").arg("+"))
        .await;
    let newest_ms: u64 = entries
        .last()
        .and_then(|(id, _)| id.split_once('-'))
        .and_then(|(ms, _)| ms.parse().ok())
        .expect("an entry id");
    // The running job was delivered by a clock a second ahead.
    let _: i64 = ctx
        .raw(
            redis::cmd("HSET")
                .arg(sub(&p, &format!(":j:{running}")))
                .arg("sid")
                .arg(format!("{}-0", newest_ms + 1_000)),
        )
        .await;
    assert_eq!(
        ctx.store
            .complete(&p, running, 1, Bytes::new(), LONG)
            .await
            .expect("complete"),
        Fenced::Applied
    );
    assert_eq!(
        lane_numbers(&ctx, &p, 0).await,
        ready,
        "the ready jobs stay"
    );
}

/// A `complete_many` too long for one script call that fails part way still answers for each
/// job: the jobs of the calls that ran are done and answered so, and only the others carry the
/// error. Here the server refuses the call that holds a result over its bulk length limit.
#[tokio::test]
async fn a_long_completion_that_fails_part_way_answers_for_the_jobs_it_finished() {
    let server = RedisServer::builder()
        .config("proto-max-bulk-len", "1mb")
        .start();
    let ctx = Ctx::new(RedisConfig::standalone(server.url()), "jobs").await;
    let p = ctx.partition("p");
    const JOBS: usize = 1_000;
    for _ in 0..JOBS {
        ctx.add(&p, job("x")).await;
    }
    let mut delivered = Vec::new();
    for _ in 0..JOBS {
        if delivered.len() == JOBS {
            break;
        }
        delivered.extend(ctx.fetch(&p, "w", &[0], JOBS, LONG).await);
    }
    assert_eq!(delivered.len(), JOBS);
    let too_long = Bytes::from(vec![b'r'; (1 << 20) + 1]);
    let mut jobs: Vec<Completion> = delivered
        .iter()
        .map(|d| Completion {
            number: d.number,
            attempt: d.attempt,
            result: Bytes::from_static(b"ok"),
        })
        .collect();
    jobs[JOBS - 1].result = too_long;

    let answers = ctx
        .store
        .complete_many(&p, &jobs, LONG)
        .await
        .expect("the first calls completed their jobs");
    assert_eq!(answers.len(), JOBS);
    assert_eq!(answers[0].as_ref().ok(), Some(&Fenced::Applied));
    assert!(answers[JOBS - 1].is_err(), "the refused call's jobs fail");
    // The server closed the connection that sent the refused call: read on a new one.
    let reader = store(RedisConfig::standalone(server.url())).await;
    for (answer, d) in answers.iter().zip(&delivered) {
        let state = reader.status(&p, d.number).await.unwrap().unwrap().state;
        match answer {
            Ok(Fenced::Applied) => assert_eq!(state, JobState::Done),
            Ok(other) => panic!("job {} answered {other:?}", d.number),
            Err(_) => assert_eq!(state, JobState::Running),
        }
    }
}
