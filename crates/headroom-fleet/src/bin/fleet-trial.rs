//! The fleet trial: a Redis Cluster of three masters with a replica each, six `fleet-service`
//! processes, an open-loop load, and a schedule of faults, each followed by a recovery window.
//! Prints a report per window, writes `report.json`, `report.txt` and `timeline.svg`, and
//! exits 1 when a promise is broken.
//!
//! Run it with `bash scripts/fleet-trial.sh` (add `--short` for the CI schedule).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use headroom_fleet::db::{Database, Latency};
use headroom_fleet::fleet::Fleet;
use headroom_fleet::load::Load;
use headroom_fleet::proto::{ServiceRequest, ServiceResponse, Stats};
use headroom_fleet::report::{self, Expect, Window};
use headroom_testkit::RedisCluster;

const INSTANCES: usize = 6;
/// Requests per second of the usual mix.
const RATE: f64 = 100.0;
/// Reports the fleet can serve per second: 6 instances x 2 at once / 100 ms each.
const REPORT_CAPACITY: f64 = 120.0;

/// Window lengths of one schedule.
struct Schedule {
    warmup: Duration,
    baseline: Duration,
    settle: Duration,
    overload: Duration,
}

impl Schedule {
    fn short() -> Self {
        Self {
            warmup: Duration::from_secs(5),
            baseline: Duration::from_secs(8),
            settle: Duration::from_secs(6),
            overload: Duration::from_secs(6),
        }
    }

    fn full() -> Self {
        Self {
            warmup: Duration::from_secs(10),
            baseline: Duration::from_secs(30),
            settle: Duration::from_secs(20),
            overload: Duration::from_secs(10),
        }
    }
}

/// Counters summed per process lifetime while a window runs.
struct Tally {
    last: Vec<Option<Stats>>,
    flushes: Vec<Option<u64>>,
    reasons: BTreeMap<String, u64>,
    l2: (u64, u64),
}

impl Tally {
    async fn start(fleet: &Fleet) -> Self {
        Self {
            last: fleet.stats().await,
            flushes: vec![None; fleet.size()],
            reasons: BTreeMap::new(),
            l2: (0, 0),
        }
    }

    /// Adds what each instance counted since the last look; `restarted` is a slot whose
    /// process changed meanwhile (its old counters are gone, its new ones start from 0).
    async fn add(&mut self, fleet: &Fleet, restarted: Option<usize>) {
        let now = fleet.stats().await;
        for (slot, (before, after)) in self.last.iter().zip(&now).enumerate() {
            // A restarted slot is a new process: what it counted while starting (its empty
            // L1 catching up with the others) is not a flush the fault caused elsewhere.
            let (Some(after), false) = (after, restarted == Some(slot)) else {
                continue;
            };
            // A slot that was down at the last look started from zero.
            let before = before.clone().unwrap_or_default();
            let flushes = |s: &Stats| s.flushes.values().sum::<u64>();
            *self.flushes[slot].get_or_insert(0) += flushes(after) - flushes(&before);
            *self
                .reasons
                .entry("(publish errors)".to_owned())
                .or_default() += after.publish_errors - before.publish_errors;
            for (reason, count) in &after.flushes {
                let earlier = before.flushes.get(reason).copied().unwrap_or(0);
                *self.reasons.entry(reason.clone()).or_default() += count - earlier;
            }
            self.l2.0 += after.l2_hits - before.l2_hits;
            self.l2.1 += after.l2_misses - before.l2_misses;
        }
        self.last = now;
    }
}

struct Trial {
    cluster: Arc<RedisCluster>,
    db: Database,
    fleet: Arc<Fleet>,
    load: Arc<Load>,
    schedule: Schedule,
    windows: Vec<Window>,
}

impl Trial {
    /// Runs one window: the fault, then `settle` of recovery while watching whether every
    /// instance uses L1 again.
    async fn window<F, Fut>(&mut self, name: &str, expect: Expect, restarts: bool, fault: F)
    where
        F: FnOnce(Arc<Fleet>, Arc<RedisCluster>, Arc<Load>) -> Fut,
        Fut: Future<Output = Vec<Option<usize>>>,
    {
        println!("window: {name}");
        let loads_before = self.db.loads();
        let mut tally = Tally::start(&self.fleet).await;
        let start = self.load.now();
        let steps = fault(
            Arc::clone(&self.fleet),
            Arc::clone(&self.cluster),
            Arc::clone(&self.load),
        )
        .await;
        let fault_end = self.load.now();
        if restarts {
            // Each step restarted one slot; tally what the others counted across them.
            for restarted in steps {
                tally.add(&self.fleet, restarted).await;
            }
        }
        // When every instance went back to using L1 for good (until the window ends).
        let mut l1_back_after = None;
        while self.load.now() < fault_end + self.schedule.settle {
            let stats = self.fleet.stats().await;
            if stats
                .iter()
                .all(|s| s.as_ref().is_some_and(|s| s.l1_in_use))
            {
                l1_back_after.get_or_insert((self.load.now() - fault_end).as_secs_f64());
            } else {
                l1_back_after = None;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        tally.add(&self.fleet, None).await;
        self.windows.push(Window {
            name: name.to_owned(),
            start,
            end: self.load.now(),
            fault_end,
            flushes: tally.flushes,
            flush_reasons: tally.reasons,
            l2: tally.l2,
            loads_before,
            loads_after: self.db.loads(),
            l1_back_after,
            expect,
        });
    }
}

/// The slot of a product's L2 key and of the cache's invalidation channel.
fn slots(cluster: &RedisCluster) -> (u16, u16) {
    (
        cluster.keyslot("fleet:cache:products:hot-0"),
        cluster.keyslot("fleet:cache:products:~invalidation"),
    )
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work)
        .await
        .expect("cluster admin task")
}

async fn run(schedule: Schedule, out: PathBuf) -> Result<bool, Box<dyn std::error::Error>> {
    let binary = std::env::current_exe()?.with_file_name("fleet-service");
    let cluster = Arc::new(blocking(|| RedisCluster::start_with(3, 1)).await);
    let db = Database::new(
        12,
        Latency {
            get: Duration::from_millis(5),
            put: Duration::from_millis(1),
            checkout: Duration::from_millis(10),
            report: Duration::from_millis(100),
        },
    );
    let db_addr = db.serve().await?;
    let fleet = Arc::new(Fleet::new(binary, INSTANCES, db_addr, cluster.urls()));
    for slot in 0..INSTANCES {
        fleet.start(slot).await?;
    }
    let load = Load::new(Arc::clone(&fleet), RATE);
    let generator = tokio::spawn(Arc::clone(&load).run(1_000_000));
    let mut trial = Trial {
        cluster,
        db,
        fleet,
        load,
        schedule,
        windows: Vec::new(),
    };
    let wait = |d: Duration| async move {
        tokio::time::sleep(d).await;
        vec![]
    };
    let (warmup, baseline) = (trial.schedule.warmup, trial.schedule.baseline);
    trial
        .window("warm-up", Expect::default(), false, move |_, _, _| {
            wait(warmup)
        })
        .await;
    trial
        .window(
            "baseline",
            Expect {
                max_flushes: Some(0),
                no_reloads: true,
                ..Expect::default()
            },
            false,
            move |_, _, _| wait(baseline),
        )
        .await;
    trial
        .window(
            "rolling deploy",
            Expect {
                max_flushes: Some(0),
                ..Expect::default()
            },
            true,
            |fleet, _, _| async move {
                let mut steps = Vec::new();
                for slot in 0..fleet.size() {
                    fleet.stop(slot).await.expect("graceful stop");
                    fleet.start(slot).await.expect("restart");
                    // As a deploy waits for health before the next instance: the newcomer
                    // hears every other instance once (its empty L1 catching up) in its own
                    // step, so only flushes the restart caused elsewhere are counted.
                    tokio::time::sleep(Duration::from_millis(2_500)).await;
                    steps.push(Some(slot));
                }
                steps
            },
        )
        .await;
    trial
        .window(
            "crash (SIGKILL) and replace",
            Expect {
                max_flushes: Some(1),
                spared: Some(0),
                ..Expect::default()
            },
            true,
            |fleet, _, _| async move {
                fleet.kill(0).await.expect("kill");
                // Long enough for the others to notice the silence.
                tokio::time::sleep(Duration::from_secs(3)).await;
                fleet.start(0).await.expect("replace");
                tokio::time::sleep(Duration::from_millis(2_500)).await;
                vec![Some(0)]
            },
        )
        .await;
    trial
        .window(
            "write burst (5,000 writes on one instance)",
            Expect {
                no_reloads: true,
                ..Expect::default()
            },
            false,
            |fleet, _, _| async move {
                if let Some(client) = fleet.client(1) {
                    let _ = client
                        .call::<_, ServiceResponse>(&ServiceRequest::Burst { count: 5_000 })
                        .await;
                }
                vec![]
            },
        )
        .await;
    trial
        .window(
            "master failover",
            Expect {
                l1_back_within: Some(10.0),
                ..Expect::default()
            },
            false,
            |_, cluster, _| async move {
                blocking(move || {
                    let master = cluster.slot_owner(slots(&cluster).0);
                    cluster.fail_over(master);
                })
                .await;
                vec![]
            },
        )
        .await;
    trial
        .window(
            "slot migration (hot key and bus channel)",
            Expect {
                l1_back_within: Some(10.0),
                ..Expect::default()
            },
            false,
            |_, cluster, _| async move {
                blocking(move || {
                    let (key_slot, channel_slot) = slots(&cluster);
                    for slot in [key_slot, channel_slot] {
                        let owner = cluster.slot_owner(slot);
                        let masters: Vec<usize> = (0..cluster.nodes().len())
                            .filter(|&i| i != owner && cluster.nodes()[i].is_running())
                            .filter(|&i| {
                                let port = cluster.nodes()[i].port();
                                cluster
                                    .topology()
                                    .iter()
                                    .any(|n| n.port == port && n.master && !n.slots.is_empty())
                            })
                            .collect();
                        cluster.migrate_slot(slot, masters[0]);
                    }
                })
                .await;
                vec![]
            },
        )
        .await;
    let overload = trial.schedule.overload;
    trial
        .window(
            "overload (3x capacity)",
            Expect {
                recovery_within: Some(5),
                critical_success: Some(0.99),
                ..Expect::default()
            },
            false,
            move |_, _, load| async move {
                load.surge(3.0 * REPORT_CAPACITY);
                tokio::time::sleep(overload).await;
                load.surge(0.0);
                vec![]
            },
        )
        .await;
    trial.load.stop();
    let _ = generator.await;
    // Requests in flight finish (each has a 5 s timeout).
    tokio::time::sleep(Duration::from_secs(2)).await;
    trial.fleet.stop_all().await;

    let report = report::judge(&trial.load.events(), &trial.windows, &trial.db.executions());
    let text = report::render(&report);
    print!("{text}");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("report.txt"), &text)?;
    std::fs::write(out.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
    for broken in &report.broken {
        eprintln!("BROKEN: {broken}");
    }
    Ok(report.broken.is_empty())
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut schedule = Schedule::full();
    let mut out = PathBuf::from("target/fleet-trial");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--short" => schedule = Schedule::short(),
            "--out" => out = args.next().map_or(out, PathBuf::from),
            other => {
                eprintln!("unknown argument {other}; usage: fleet-trial [--short] [--out DIR]");
                return ExitCode::from(2);
            }
        }
    }
    match run(schedule, out).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("fleet trial failed to run: {err}");
            ExitCode::from(2)
        }
    }
}
