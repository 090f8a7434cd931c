//! The fleet trial: a Redis Cluster of three masters with a replica each, six `fleet-service`
//! processes (one of them reaching Redis through fault proxies, to be cut off), an open-loop
//! load, and a schedule of faults, each followed by a recovery window.
//! Prints a report per window, writes `report.json`, `report.txt` and `timeline.svg`, and
//! exits 1 when a promise is broken.
//!
//! Run it with `bash scripts/fleet-trial.sh` (add `--short` for the CI schedule).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use headroom_fleet::chart;
use headroom_fleet::db::{Database, Latency};
use headroom_fleet::fleet::Fleet;
use headroom_fleet::load::{Kind, Load};
use headroom_fleet::proto::{ServiceRequest, ServiceResponse, Stats};
use headroom_fleet::report::{self, Expect, Window};
use headroom_testkit::{FaultProxy, RedisCluster};

const INSTANCES: usize = 6;
/// Requests per second of the usual mix.
const RATE: f64 = 100.0;
/// Reports the fleet can serve per second: 6 instances x 2 at once / 100 ms each.
const REPORT_CAPACITY: f64 = 120.0;
/// The instance that reaches every cluster node through a fault proxy, to be cut from Redis.
const CUT_SLOT: usize = 2;

/// Window lengths of one schedule.
struct Schedule {
    warmup: Duration,
    baseline: Duration,
    settle: Duration,
    overload: Duration,
    cut: Duration,
}

impl Schedule {
    fn short() -> Self {
        Self {
            warmup: Duration::from_secs(5),
            baseline: Duration::from_secs(8),
            settle: Duration::from_secs(6),
            overload: Duration::from_secs(6),
            cut: Duration::from_secs(6),
        }
    }

    fn full() -> Self {
        Self {
            warmup: Duration::from_secs(10),
            baseline: Duration::from_secs(30),
            settle: Duration::from_secs(20),
            overload: Duration::from_secs(10),
            cut: Duration::from_secs(10),
        }
    }
}

/// What the slots counted between two looks.
struct Counted {
    flushes: Vec<Option<u64>>,
    reasons: BTreeMap<String, u64>,
    l2: (u64, u64),
}

fn counted(before: &[Option<Stats>], after: &[Option<Stats>]) -> Counted {
    let mut reasons = BTreeMap::new();
    let mut l2 = (0, 0);
    let flushes = before
        .iter()
        .zip(after)
        .map(|(before, after)| {
            let delta = after.as_ref()?.since(&before.clone().unwrap_or_default());
            for (reason, count) in &delta.flushes {
                *reasons.entry(reason.clone()).or_default() += count;
            }
            *reasons.entry("(publish errors)".to_owned()).or_default() += delta.publish_errors;
            l2 = (l2.0 + delta.l2_hits, l2.1 + delta.l2_misses);
            Some(delta.total_flushes())
        })
        .collect();
    Counted {
        flushes,
        reasons,
        l2,
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
    async fn window<F, Fut>(&mut self, name: &str, expect: Expect, fault: F)
    where
        F: FnOnce(Arc<Fleet>, Arc<RedisCluster>, Arc<Load>) -> Fut,
        Fut: Future<Output = ()>,
    {
        println!("window: {name}");
        let (loads_before, reloads_before) = (self.db.loads(), self.db.reloads());
        let stats_before = self.fleet.stats().await;
        let start = self.load.now();
        fault(
            Arc::clone(&self.fleet),
            Arc::clone(&self.cluster),
            Arc::clone(&self.load),
        )
        .await;
        let fault_end = self.load.now();
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
        let counted = counted(&stats_before, &self.fleet.stats().await);
        self.windows.push(Window {
            name: name.to_owned(),
            start,
            end: self.load.now(),
            fault_end,
            flushes: counted.flushes,
            flush_reasons: counted.reasons,
            l2: counted.l2,
            loads_before,
            loads_after: self.db.loads(),
            reloads_before,
            reloads_after: self.db.reloads(),
            last_reloads: self.db.last_reloads(),
            l1_back_after,
            expect,
        });
    }
}

/// Waits, as a deploy waits for health before it moves on, until a newcomer has heard every
/// other instance (each first message flushes its still empty L1), then leaves those flushes
/// out of its counters: they are the newcomer's own start, not a cost to the others.
async fn settle_newcomer(fleet: &Fleet, slot: usize) {
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    fleet.rebase(slot).await;
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
    let mut fleet = Fleet::new(binary, INSTANCES, db_addr, cluster.urls());
    let mut proxies = Vec::new();
    for node in cluster.nodes() {
        let proxy = FaultProxy::start(node.addr()).await;
        fleet = fleet.with_route(CUT_SLOT, node.addr(), proxy.addr());
        proxies.push(proxy);
    }
    let proxies = Arc::new(proxies);
    let fleet = Arc::new(fleet);
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
    let wait = |d: Duration| tokio::time::sleep(d);
    let (warmup, baseline) = (trial.schedule.warmup, trial.schedule.baseline);
    trial
        .window("warm-up", Expect::default(), move |_, _, _| wait(warmup))
        .await;
    trial
        .window(
            "baseline",
            Expect {
                max_flushes: Some(0),
                no_reloads: true,
                ..Expect::default()
            },
            move |_, _, _| wait(baseline),
        )
        .await;
    trial
        .window(
            "stampede (every instance reads 50 new products at once)",
            Expect {
                max_locked_loads_per_key: Some(1.5),
                ..Expect::default()
            },
            |fleet, _, load| async move {
                // Each read is an event of the window: a waiter of the single flight that
                // failed instead of waiting breaks it as a caller error.
                let mut reads = tokio::task::JoinSet::new();
                for n in 0..50 {
                    for slot in 0..fleet.size() {
                        for request in [
                            ServiceRequest::Read {
                                key: format!("cold-plain-{n}"),
                            },
                            ServiceRequest::ReadLocked {
                                key: format!("cold-locked-{n}"),
                            },
                        ] {
                            let load = Arc::clone(&load);
                            reads
                                .spawn(async move { load.send(slot, (Kind::Read, request)).await });
                        }
                    }
                }
                reads.join_all().await;
            },
        )
        .await;
    trial
        .window(
            "rolling deploy",
            Expect {
                max_flushes: Some(0),
                ..Expect::default()
            },
            |fleet, _, _| async move {
                for slot in 0..fleet.size() {
                    fleet.stop(slot).await.expect("graceful stop");
                    fleet.start(slot).await.expect("restart");
                    settle_newcomer(&fleet, slot).await;
                }
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
            |fleet, _, _| async move {
                fleet.kill(0).await.expect("kill");
                // Long enough for the others to notice the silence.
                tokio::time::sleep(Duration::from_secs(3)).await;
                fleet.start(0).await.expect("replace");
                settle_newcomer(&fleet, 0).await;
            },
        )
        .await;
    trial
        .window(
            "write burst (5,000 writes on one instance)",
            Expect {
                no_reloads: true,
                overflowed: true,
                ..Expect::default()
            },
            |fleet, _, _| async move {
                const BURST: u64 = 5_000;
                let client = fleet.client(1).expect("instance 1 runs");
                let burst = client
                    .call::<_, ServiceResponse>(&ServiceRequest::Burst {
                        count: BURST as u32,
                    })
                    .await
                    .expect("the burst answers");
                // Fewer writes would not be the burst the window judges.
                assert_eq!(burst.version, Some(BURST), "products the burst wrote");
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
            |_, cluster, _| async move {
                blocking(move || {
                    let master = cluster.slot_owner(slots(&cluster).0);
                    cluster.fail_over(master);
                })
                .await;
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
            |_, cluster, _| async move {
                blocking(move || {
                    let (key_slot, channel_slot) = slots(&cluster);
                    for slot in [key_slot, channel_slot] {
                        let owner = cluster.slot_owner(slot);
                        let owner_port = cluster.nodes()[owner].port();
                        // Another master that serves slots, as the cluster sees it now.
                        let target = cluster
                            .topology()
                            .into_iter()
                            .find(|n| {
                                n.master && !n.failed && !n.slots.is_empty() && n.port != owner_port
                            })
                            .and_then(|n| cluster.nodes().iter().position(|s| s.port() == n.port))
                            .expect("a second master");
                        cluster.migrate_slot(slot, target);
                    }
                })
                .await;
            },
        )
        .await;
    let (cut, cut_proxies) = (trial.schedule.cut, Arc::clone(&proxies));
    trial
        .window(
            "one instance cut from Redis",
            Expect {
                max_flushes: Some(1),
                spared: Some(CUT_SLOT),
                l1_back_within: Some(10.0),
                cut_off: Some(CUT_SLOT),
                ..Expect::default()
            },
            move |_, _, _| async move {
                for proxy in cut_proxies.iter() {
                    proxy.cut();
                }
                tokio::time::sleep(cut).await;
                for proxy in cut_proxies.iter() {
                    proxy.restore();
                }
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
            move |_, _, load| async move {
                load.surge(3.0 * REPORT_CAPACITY);
                tokio::time::sleep(overload).await;
                load.surge(0.0);
            },
        )
        .await;
    trial.load.stop();
    let _ = generator.await;
    // Requests in flight finish (each has a 5 s timeout).
    tokio::time::sleep(Duration::from_secs(2)).await;
    trial.fleet.stop_all().await;
    // The cut instance's way to Redis stays open until it has stopped.
    drop(proxies);

    let report = report::judge(&trial.load.events(), &trial.windows, &trial.db.executions());
    let text = report::render(&report);
    print!("{text}");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("report.txt"), &text)?;
    std::fs::write(out.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
    std::fs::write(out.join("timeline.svg"), chart::timeline(&report))?;
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
