//! One switch for the fleet: on real Redis, one start reaches every instance, one stop stops
//! them all, the end time stops them by itself and expires the switch, and an unreadable switch
//! stops them (fail safe); on the memory store and paused time, what a follower leaves alone,
//! what it resumes, and what it stops.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use headroom_chaos::{
    ChaosKvStore, Delay, Experiment, ExperimentConfig, FaultKind, FleetError, FleetSwitch,
    StopReason,
};
use headroom_core::kv::KvStore;
use headroom_core::memory::MemoryKvStore;
use headroom_core::{Clock, Namespace};
use headroom_redis::{Redis, RedisConfig, RedisKvStore};
use headroom_testkit::{RedisServer, unique_namespace};
use tokio::task::JoinHandle;

const NAME: &str = "inventory-degraded";
const POLL: Duration = Duration::from_millis(100);

fn config(duration: Duration) -> ExperimentConfig {
    ExperimentConfig::new(duration)
        .latency(0.2, Delay::Fixed(Duration::from_millis(100)))
        .fault(0.01)
}

// ---------------------------------------------------------------------------------------------
// Real Redis: three instances, each with its own connection, store, experiment and follower.

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

async fn redis_store(server: &RedisServer) -> RedisKvStore {
    RedisKvStore::new(
        Redis::connect(RedisConfig::standalone(server.url()))
            .await
            .expect("connect to the test Redis"),
    )
}

async fn instances(server: &RedisServer, namespace: &Namespace) -> Vec<Instance> {
    let mut instances = Vec::new();
    for _ in 0..3 {
        let switch = FleetSwitch::new(redis_store(server).await, namespace, NAME).unwrap();
        let experiment = experiment();
        let follower = tokio::spawn(switch.follow(experiment.clone(), POLL));
        instances.push(Instance {
            experiment,
            follower,
        });
    }
    instances
}

/// Waits, within a deadline, until every instance satisfies `condition`. Real time: this waits
/// for the followers' polls of a real Redis, and fails rather than waits forever.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_switch_starts_and_stops_the_experiment_on_every_instance() {
    let server = RedisServer::start();
    let namespace = unique_namespace("chaos-fleet");
    let instances = instances(&server, &namespace).await;
    let admin = FleetSwitch::new(redis_store(&server).await, &namespace, NAME).unwrap();
    let key = String::from_utf8(admin.key().as_bytes().to_vec()).unwrap();
    assert_eq!(key, format!("{}:chaos:{NAME}", namespace.as_str()));

    let ten_minutes = config(Duration::from_secs(600));
    admin.start(&ten_minutes).await.unwrap();
    let ttl_ms: u64 = server.cli(&["PTTL", &key]).trim().parse().unwrap();
    assert!(
        (590_000..=600_000).contains(&ttl_ms),
        "the switch expires with the experiment: {ttl_ms} ms"
    );
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
        !experiment.is_running() && experiment.status().last_stop == Some(StopReason::Fleet)
    })
    .await;

    // A forgotten experiment: every instance stops at the end time, and the switch expires.
    admin.start(&config(Duration::from_secs(2))).await.unwrap();
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server.cli(&["EXISTS", &key]).trim() != "0" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the switch did not expire"
        );
        tokio::time::sleep(POLL).await;
    }
    assert!(admin.key().as_bytes().starts_with(b"chaos-fleet"));
    assert!(
        instances
            .iter()
            .all(|instance| !instance.follower.is_finished())
    );
}

/// Bytes that are not a switch stop every follower's experiment, without a panic; a valid
/// start afterwards is followed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_switch_stops_the_experiment_everywhere() {
    let server = RedisServer::start();
    let namespace = unique_namespace("chaos-fleet-corrupt");
    let instances = instances(&server, &namespace).await;
    let store = redis_store(&server).await;
    let admin = FleetSwitch::new(store.clone(), &namespace, NAME).unwrap();
    admin
        .start(&config(Duration::from_secs(600)))
        .await
        .unwrap();
    until(&instances, "running", Experiment::is_running).await;

    let key = String::from_utf8(admin.key().as_bytes().to_vec()).unwrap();
    let garbage: [&[u8]; 5] = [
        b"\xff\x00not json",
        b"",
        br#"{"version":99}"#,
        // A valid record of this version holding an invalid configuration.
        br#"{"version":1,"generation":1,"ends_at_unix_ms":1,"config":{"duration":"0s"}}"#,
        // Another application's value under the key.
        br#"{"user":7,"cart":[1,2,3]}"#,
    ];
    for (i, garbage) in garbage.into_iter().enumerate() {
        if i % 2 == 0 {
            store
                .set(
                    admin.key(),
                    Bytes::copy_from_slice(garbage),
                    Duration::from_secs(60),
                )
                .await
                .unwrap();
        } else {
            // Through redis-cli, as an operator's typo would arrive.
            let text = String::from_utf8(garbage.to_vec()).unwrap();
            assert_eq!(
                server.cli(&["SET", &key, &text, "PX", "60000"]).trim(),
                "OK"
            );
        }
        until(
            &instances,
            "stopped on an unreadable switch",
            |experiment| {
                !experiment.is_running() && experiment.status().last_stop == Some(StopReason::Fleet)
            },
        )
        .await;
        assert!(
            instances
                .iter()
                .all(|instance| !instance.follower.is_finished()),
            "a follower ended (panicked?) on an unreadable switch"
        );
        admin
            .start(&config(Duration::from_secs(600)))
            .await
            .unwrap();
        until(&instances, "running again", Experiment::is_running).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The memory store on tokio's paused time.

/// Runs `test` on a current-thread runtime on paused time.
fn paused(test: impl Future<Output = ()>) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
        .block_on(test);
}

fn memory_switch<S: KvStore + Clone>(store: &S) -> FleetSwitch<S> {
    FleetSwitch::new(store.clone(), &Namespace::new("shop").unwrap(), NAME)
        .unwrap()
        .clock(Clock::default())
}

/// This instance's experiment.
fn experiment() -> Experiment {
    Experiment::builder(NAME).build().unwrap()
}

/// Makes `experiment` follow `switch`, reading it every second.
fn follow<S: KvStore + Clone>(switch: &FleetSwitch<S>, experiment: &Experiment) -> JoinHandle<()> {
    tokio::spawn(switch.follow(experiment.clone(), Duration::from_secs(1)))
}

/// A memory store that an experiment of its own, named `name`, makes misbehave.
fn chaotic_store(name: &str) -> (Experiment, ChaosKvStore<MemoryKvStore>) {
    let experiment = Experiment::builder(name).build().unwrap();
    let store = ChaosKvStore::new(MemoryKvStore::new(), experiment.clone());
    (experiment, store)
}

/// Three follower polls.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(3)).await;
}

/// A run started locally is the local operator's: a follower with no switch to follow leaves
/// it alone. A run the follower started ends when the switch is cleared; a new start is
/// followed once, and a run stopped by hand is not restarted for the same start.
#[test]
fn a_follower_acts_only_on_what_the_switch_started() {
    paused(async {
        let store = MemoryKvStore::new();
        let switch = memory_switch(&store);
        let experiment = experiment();
        let follower = follow(&switch, &experiment);

        experiment.start(config(Duration::from_secs(600))).unwrap();
        settle().await;
        assert!(experiment.is_running(), "a local run is left alone");
        switch.stop().await.unwrap();
        settle().await;
        assert!(experiment.is_running(), "clearing an empty switch too");
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
        assert!(!experiment.is_running());
        assert_eq!(experiment.status().last_stop, Some(StopReason::Fleet));

        // A local run that replaced the fleet's is not stopped with the switch.
        switch
            .start(&config(Duration::from_secs(600)))
            .await
            .unwrap();
        settle().await;
        let local = config(Duration::from_secs(300)).fault(0.5);
        experiment.start(local.clone()).unwrap();
        switch.stop().await.unwrap();
        settle().await;
        assert_eq!(experiment.status().running.unwrap().config, local);
        follower.abort();
    });
}

#[test]
fn a_follower_ends_the_run_at_the_end_time_written_in_the_switch() {
    paused(async {
        let store = MemoryKvStore::new();
        let switch = memory_switch(&store);
        switch
            .start(&config(Duration::from_secs(60)))
            .await
            .unwrap();
        // An instance that joins 40 s late still ends with the others.
        tokio::time::sleep(Duration::from_secs(40)).await;
        let experiment = experiment();
        let follower = follow(&switch, &experiment);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let remaining = experiment.status().running.unwrap().remaining;
        assert!(
            remaining > Duration::from_millis(17_900) && remaining <= Duration::from_secs(18),
            "{remaining:?}"
        );
        tokio::time::sleep(Duration::from_secs(18)).await;
        assert!(!experiment.is_running());
        assert_eq!(experiment.status().last_stop, Some(StopReason::Ended));
        assert!(
            store.get(switch.key()).await.unwrap().is_none(),
            "the switch expired"
        );
        follower.abort();
    });
}

/// A store that fails every read: the follower stops the run it started (fail safe) without
/// ending; when the store answers again, the same start resumes with the time it has left, and
/// still ends at its end time.
#[test]
fn a_failing_store_stops_the_fleet_run_until_it_answers_again() {
    paused(async {
        let (l2_down, store) = chaotic_store("l2-down");
        let switch = memory_switch(&store);
        let experiment = experiment();
        let follower = follow(&switch, &experiment);
        switch
            .start(&config(Duration::from_secs(60)))
            .await
            .unwrap();
        settle().await;
        assert!(experiment.is_running());

        l2_down
            .start(
                ExperimentConfig::new(Duration::from_secs(600)).fault_of(1.0, FaultKind::Timeout),
            )
            .unwrap();
        settle().await;
        assert!(!experiment.is_running(), "unconfirmed: stopped");
        assert_eq!(experiment.status().last_stop, Some(StopReason::Fleet));
        assert!(!follower.is_finished());

        l2_down.stop();
        settle().await;
        let remaining = experiment.status().running.unwrap().remaining;
        assert!(
            remaining <= Duration::from_secs(54) && remaining > Duration::from_secs(50),
            "resumed until the same end time: {remaining:?}"
        );
        tokio::time::sleep(remaining).await;
        assert!(!experiment.is_running());
        follower.abort();
    });
}

/// A local run is not the switch's to confirm: a failing store leaves it alone.
#[test]
fn a_failing_store_leaves_a_local_run_alone() {
    paused(async {
        let (l2_down, store) = chaotic_store("l2-down");
        let switch = memory_switch(&store);
        let experiment = experiment();
        let follower = follow(&switch, &experiment);
        l2_down
            .start(ExperimentConfig::new(Duration::from_secs(600)).fault(1.0))
            .unwrap();
        experiment.start(config(Duration::from_secs(60))).unwrap();
        settle().await;
        assert!(experiment.is_running());
        follower.abort();
    });
}

/// A record of a new start that is already over (read late, or written by a clock ahead):
/// the follower does not start it, and stops the run of the start it replaced.
#[test]
fn a_start_already_over_replaces_the_previous_one() {
    paused(async {
        let store = MemoryKvStore::new();
        let switch = memory_switch(&store);
        let experiment = experiment();
        let follower = follow(&switch, &experiment);
        switch
            .start(&config(Duration::from_secs(600)))
            .await
            .unwrap();
        settle().await;
        assert!(experiment.is_running());

        let over = serde_json::json!({
            "version": 1,
            "generation": 7,
            "ends_at_unix_ms": Clock::system().unix_millis() - 1_000,
            "config": config(Duration::from_secs(60)),
        });
        store
            .set(
                switch.key(),
                Bytes::from(serde_json::to_vec(&over).unwrap()),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        settle().await;
        assert!(!experiment.is_running());
        assert_eq!(experiment.status().last_stop, Some(StopReason::Fleet));
        follower.abort();
    });
}

/// Dropping the follower stops the run it started, not a local one.
#[test]
fn dropping_the_follower_stops_the_run_it_started() {
    paused(async {
        let store = MemoryKvStore::new();
        let switch = memory_switch(&store);
        let experiment = experiment();
        let follower = follow(&switch, &experiment);
        switch
            .start(&config(Duration::from_secs(600)))
            .await
            .unwrap();
        settle().await;
        assert!(experiment.is_running());
        follower.abort();
        assert!(follower.await.unwrap_err().is_cancelled());
        assert!(!experiment.is_running());
        assert_eq!(experiment.status().last_stop, Some(StopReason::Fleet));

        let follower = follow(&switch, &experiment);
        switch.stop().await.unwrap();
        experiment.start(config(Duration::from_secs(600))).unwrap();
        settle().await;
        follower.abort();
        let _ = follower.await;
        assert!(experiment.is_running());
    });
}

/// What `start` refuses writes nothing; names that would pick a slot are refused.
#[test]
fn invalid_starts_and_names_are_refused() {
    paused(async {
        let store = MemoryKvStore::new();
        let switch = memory_switch(&store);
        for refused in [
            ExperimentConfig::new(Duration::ZERO),
            ExperimentConfig::new(Duration::from_micros(500)),
            ExperimentConfig::new(Duration::from_secs(60)).fault(1.5),
        ] {
            assert!(matches!(
                switch.start(&refused).await,
                Err(FleetError::Config(_))
            ));
        }
        assert!(store.get(switch.key()).await.unwrap().is_none());

        let shop = Namespace::new("shop").unwrap();
        for name in ["", "{tag}", "a:b", "a b", &"x".repeat(129)] {
            assert!(
                matches!(
                    FleetSwitch::new(store.clone(), &shop, name),
                    Err(FleetError::Config(_))
                ),
                "{name:?}"
            );
        }
    });
}

/// A run an operator started on one instance is theirs: a fleet start does not replace it, and
/// neither does a follower resuming after the store failed. The fleet's run starts once the
/// local one is over.
#[test]
fn a_follower_never_replaces_a_local_run() {
    paused(async {
        let (store_down, store) = chaotic_store("store-down");
        let switch = memory_switch(&store);
        let experiment = experiment();
        let follower = follow(&switch, &experiment);
        let local = ExperimentConfig::new(Duration::from_secs(60)).abort(0.1);
        experiment.start(local.clone()).unwrap();
        let fleet = config(Duration::from_secs(600));
        switch.start(&fleet).await.unwrap();
        settle().await;
        assert_eq!(
            experiment.status().running.unwrap().config,
            local,
            "a fleet start replaced it"
        );

        // The local run ends; the fleet's starts.
        tokio::time::sleep(Duration::from_secs(60)).await;
        settle().await;
        assert_eq!(experiment.status().running.unwrap().config, fleet);

        // The store fails: the fleet's run stops; meanwhile an operator starts one locally.
        store_down
            .start(ExperimentConfig::new(Duration::from_secs(600)).fault(1.0))
            .unwrap();
        settle().await;
        assert!(!experiment.is_running());
        experiment.start(local.clone()).unwrap();
        store_down.stop();
        settle().await;
        assert_eq!(
            experiment.status().running.unwrap().config,
            local,
            "the resume replaced it"
        );
        follower.abort();
    });
}

/// A record can only say when a run ends within the run's own duration: a record claiming a
/// month for a one-minute experiment (foreign, corrupt, or from a clock far ahead) runs a
/// minute.
#[test]
fn a_record_cannot_stretch_a_run_past_its_duration() {
    paused(async {
        let store = MemoryKvStore::new();
        let switch = memory_switch(&store);
        let experiment = experiment();
        let follower = follow(&switch, &experiment);
        let month_ms = 30 * 24 * 3600 * 1000;
        let record = serde_json::json!({
            "version": 1,
            "generation": 7,
            "ends_at_unix_ms": Clock::default().unix_millis() + month_ms,
            "config": { "duration": "1m", "fault": { "rate": 0.5 } }
        });
        store
            .set(
                switch.key(),
                Bytes::from(serde_json::to_vec(&record).unwrap()),
                Duration::from_secs(40 * 24 * 3600),
            )
            .await
            .unwrap();
        settle().await;
        let remaining = experiment.status().running.unwrap().remaining;
        assert!(
            remaining <= Duration::from_secs(60),
            "{remaining:?} left of a one-minute run"
        );
        follower.abort();
    });
}

/// A store that hangs is a store that failed: the follower stops the fleet's run within a
/// polling interval or two, and resumes it when the store answers again.
#[test]
fn a_hanging_store_stops_the_fleet_run() {
    paused(async {
        let (store_stalls, store) = chaotic_store("store-stalls");
        let switch = memory_switch(&store);
        let experiment = experiment();
        let follower = follow(&switch, &experiment);
        switch
            .start(&config(Duration::from_secs(600)))
            .await
            .unwrap();
        settle().await;
        assert!(experiment.is_running());
        store_stalls
            .start(ExperimentConfig::new(Duration::from_secs(600)).abort(1.0))
            .unwrap();
        settle().await;
        assert_eq!(experiment.status().last_stop, Some(StopReason::Fleet));
        store_stalls.stop();
        settle().await;
        assert!(experiment.is_running(), "resumed once the store answers");
        follower.abort();
    });
}

/// Two instances following a started switch: `watched` stops when `paging` is raised.
struct Paged {
    paging: headroom_core::Signal,
    watched: Experiment,
    other: Experiment,
    followers: [JoinHandle<()>; 2],
}

async fn paged<S: KvStore + Clone>(switch: &FleetSwitch<S>) -> Paged {
    let paging = headroom_core::Signal::new("orders page burn");
    let watched = Experiment::builder(NAME)
        .stop_when(paging.clone())
        .build()
        .unwrap();
    let other = experiment();
    let followers = [follow(switch, &watched), follow(switch, &other)];
    switch
        .start(&config(Duration::from_secs(600)))
        .await
        .unwrap();
    settle().await;
    assert!(watched.is_running() && other.is_running());
    Paged {
        paging,
        watched,
        other,
        followers,
    }
}

/// A stop signal ends the run while the store fails: the follower cannot clear the switch
/// then, and clears it once the store answers, so the other instances, which stopped while
/// they could not read the switch, do not resume the run.
#[test]
fn a_stop_signal_clears_the_switch_once_the_store_answers_again() {
    paused(async {
        let (store_down, store) = chaotic_store("store-down");
        let switch = memory_switch(&store);
        let Paged {
            paging,
            watched,
            other,
            followers,
        } = paged(&switch).await;

        store_down
            .start(ExperimentConfig::new(Duration::from_secs(600)).fault(1.0))
            .unwrap();
        paging.set(true);
        assert!(!watched.is_running(), "the signal stops the run");
        settle().await;
        store_down.stop();
        settle().await;
        assert_eq!(
            store.get(switch.key()).await.unwrap(),
            None,
            "the switch is cleared"
        );
        assert!(!other.is_running(), "the other instance stays stopped");
        assert_eq!(other.status().last_stop, Some(StopReason::Fleet));
        for follower in followers {
            follower.abort();
        }
    });
}

/// One instance's SLO pages: its stop signal ends its run, and its follower clears the switch,
/// so the run stops on every instance, and nobody restarts it.
#[test]
fn a_stop_signal_on_one_instance_stops_the_fleet() {
    paused(async {
        let store = MemoryKvStore::new();
        let switch = memory_switch(&store);
        let Paged {
            paging,
            watched,
            other,
            followers,
        } = paged(&switch).await;

        paging.set(true);
        settle().await;
        assert_eq!(
            watched.status().last_stop,
            Some(StopReason::Signal("orders page burn".to_owned()))
        );
        assert_eq!(other.status().last_stop, Some(StopReason::Fleet));
        assert_eq!(
            store.get(switch.key()).await.unwrap(),
            None,
            "the switch is cleared"
        );
        paging.set(false);
        settle().await;
        assert!(!watched.is_running() && !other.is_running());
        for follower in followers {
            follower.abort();
        }
    });
}
