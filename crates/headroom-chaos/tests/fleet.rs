//! One switch for the fleet: on real Redis, one start reaches every instance, one stop stops
//! them all, the end time stops them by itself and expires the switch, and an unreadable switch
//! stops them (fail safe); on the memory store and paused time, what a follower leaves alone.

use std::time::Duration;

use bytes::Bytes;
use headroom_chaos::{Delay, Experiment, ExperimentConfig, FleetSwitch, StopReason};
use headroom_core::kv::KvStore;
use headroom_core::memory::MemoryKvStore;
use headroom_core::{Clock, Namespace};
use headroom_redis::{Redis, RedisConfig, RedisKvStore};
use headroom_testkit::{RedisServer, unique_namespace};
use tokio::task::JoinHandle;

const NAME: &str = "inventory-degraded";
const POLL: Duration = Duration::from_millis(100);

/// One service instance: its own connection, experiment and follower.
struct Instance {
    experiment: Experiment,
    follower: JoinHandle<()>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

async fn instance(server: &RedisServer, namespace: &Namespace) -> Instance {
    let redis = Redis::connect(RedisConfig::standalone(server.url()))
        .await
        .unwrap();
    let switch = FleetSwitch::new(RedisKvStore::new(redis), namespace, NAME).unwrap();
    let experiment = Experiment::builder(NAME).build().unwrap();
    let follower = tokio::spawn(switch.follow(experiment.clone(), POLL));
    Instance {
        experiment,
        follower,
    }
}

/// Waits, within a bound, until every instance satisfies `condition`.
async fn until(instances: &[Instance], what: &str, condition: impl Fn(&Experiment) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !instances
        .iter()
        .all(|instance| condition(&instance.experiment))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every instance: {what}"
        );
        tokio::time::sleep(POLL / 4).await;
    }
}

fn config(duration: Duration) -> ExperimentConfig {
    ExperimentConfig::new(duration)
        .latency(0.2, Delay::Fixed(Duration::from_millis(100)))
        .fault(0.01)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_switch_starts_and_stops_the_experiment_on_every_instance() {
    let server = RedisServer::start();
    let namespace = unique_namespace("chaos-fleet");
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(instance(&server, &namespace).await);
    }
    let admin = FleetSwitch::new(
        RedisKvStore::new(
            Redis::connect(RedisConfig::standalone(server.url()))
                .await
                .unwrap(),
        ),
        &namespace,
        NAME,
    )
    .unwrap();

    let ten_minutes = config(Duration::from_secs(600));
    admin.start(&ten_minutes).await.unwrap();
    until(
        &instances,
        "running the switch's configuration",
        |experiment| {
            experiment.status().running.is_some_and(|run| {
                run.config == ten_minutes && run.remaining > Duration::from_secs(590)
            })
        },
    )
    .await;

    admin.stop().await.unwrap();
    until(&instances, "stopped by the fleet", |experiment| {
        experiment.status().last_stop == Some(StopReason::Fleet)
    })
    .await;

    // A forgotten experiment: every instance stops at the end time, and the switch expires.
    admin.start(&config(Duration::from_secs(1))).await.unwrap();
    until(
        &instances,
        "running the short experiment",
        Experiment::is_running,
    )
    .await;
    until(&instances, "stopped at the end time", |experiment| {
        !experiment.is_running()
            && matches!(
                experiment.status().last_stop,
                Some(StopReason::Ended | StopReason::Fleet)
            )
    })
    .await;
    let key = namespace.child("chaos").unwrap().key(NAME).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server
        .cli(&["EXISTS", &String::from_utf8_lossy(key.as_bytes())])
        .trim()
        != "0"
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the switch did not expire"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Bytes that are not a switch stop every follower's experiment, without a panic; a valid
/// start afterwards is followed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_switch_stops_the_experiment_everywhere() {
    let server = RedisServer::start();
    let namespace = unique_namespace("chaos-fleet-corrupt");
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(instance(&server, &namespace).await);
    }
    let store = RedisKvStore::new(
        Redis::connect(RedisConfig::standalone(server.url()))
            .await
            .unwrap(),
    );
    let admin = FleetSwitch::new(store.clone(), &namespace, NAME).unwrap();
    admin
        .start(&config(Duration::from_secs(600)))
        .await
        .unwrap();
    until(&instances, "running", Experiment::is_running).await;

    let key = namespace.child("chaos").unwrap().key(NAME).unwrap();
    for garbage in [
        &b"\xff\x00not json"[..],
        br#"{"version":99}"#,
        br#"{"version":1,"generation":1,"ends_at_unix_ms":1,"config":{"duration":"0s"}}"#,
    ] {
        store
            .set(
                &key,
                Bytes::copy_from_slice(garbage),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        until(
            &instances,
            "stopped on an unreadable switch",
            |experiment| experiment.status().last_stop == Some(StopReason::Fleet),
        )
        .await;
        assert!(
            instances
                .iter()
                .all(|instance| !instance.follower.is_finished())
        );
        admin
            .start(&config(Duration::from_secs(600)))
            .await
            .unwrap();
        until(&instances, "running again", Experiment::is_running).await;
    }
}

fn memory_switch(store: &MemoryKvStore) -> FleetSwitch<MemoryKvStore> {
    FleetSwitch::new(store.clone(), &Namespace::new("shop").unwrap(), NAME)
        .unwrap()
        .clock(Clock::default())
}

/// A run started locally is the local operator's: a follower with no switch to follow leaves
/// it alone. A run the follower started ends when the switch is cleared; a new start is
/// followed once, and a run stopped by hand is not restarted for the same start.
#[tokio::test(start_paused = true)]
async fn a_follower_acts_only_on_what_the_switch_started() {
    let store = MemoryKvStore::new();
    let switch = memory_switch(&store);
    let experiment = Experiment::builder(NAME).build().unwrap();
    let follower = tokio::spawn(switch.follow(experiment.clone(), Duration::from_secs(1)));
    let settle = || tokio::time::sleep(Duration::from_secs(3));

    experiment.start(config(Duration::from_secs(600))).unwrap();
    settle().await;
    assert!(experiment.is_running(), "a local run is left alone");
    experiment.stop();

    switch
        .start(&config(Duration::from_secs(600)))
        .await
        .unwrap();
    settle().await;
    assert!(experiment.is_running());
    experiment.stop();
    settle().await;
    assert!(
        !experiment.is_running(),
        "stopped by hand: the same start is not followed again"
    );

    switch
        .start(&config(Duration::from_secs(600)))
        .await
        .unwrap();
    settle().await;
    assert!(experiment.is_running(), "a new start is followed");
    switch.stop().await.unwrap();
    settle().await;
    assert_eq!(experiment.status().last_stop, Some(StopReason::Fleet));
    follower.abort();
}

#[tokio::test(start_paused = true)]
async fn a_follower_ends_the_run_at_the_end_time_written_in_the_switch() {
    let store = MemoryKvStore::new();
    let switch = memory_switch(&store);
    switch
        .start(&config(Duration::from_secs(60)))
        .await
        .unwrap();
    // An instance that joins 40 s late still ends with the others.
    tokio::time::sleep(Duration::from_secs(40)).await;
    let experiment = Experiment::builder(NAME).build().unwrap();
    let follower = tokio::spawn(switch.follow(experiment.clone(), Duration::from_secs(1)));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let remaining = experiment.status().running.unwrap().remaining;
    assert!(remaining <= Duration::from_secs(20), "{remaining:?}");
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(!experiment.is_running());
    follower.abort();
}
