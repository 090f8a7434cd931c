//! Run with: cargo run --release -p flash-sale
//!
//! An order service goes through a flash sale twice, on the same stand-in database: once
//! unprotected, once with headroom. A built-in load generator sends open-loop traffic over
//! loopback through six phases (baseline, 3× growth, a 6× flash-sale spike with scripted
//! buyers, recovery, then a chaos phase in two parts at the baseline rate), with a steady
//! stream of price updates throughout; the program prints a side-by-side report and writes an
//! SVG chart of latency and goodput.
//!
//! A checkout's slow part is the payment provider's call (80–200 ms). Unprotected, the checkout
//! holds its database transaction open across it; with headroom, the checkout reserves the
//! order, enqueues a payment job (`headroom::jobs`) and answers 202, and a worker on each
//! instance pays the order. The report shows the database connections this frees.
//!
//! The chaos phase tests headroom itself, with one `headroom::chaos::Experiment` wrapping the
//! protected run's shared backend (`Headroom::with_chaos`), started with each part's settings
//! as the part begins:
//!
//! - **chaos: Redis latency**: every call to the KV store (the cache's L2), the lease store
//!   (idempotency records), the rate store (rate limits), the job store (payments) and the
//!   invalidation bus is 30 ms slower;
//! - **chaos: lost messages**: half of the invalidation messages are dropped, for each
//!   subscriber, while prices change: the other instance may keep serving a replaced price from
//!   its L1, and the report measures for how long against the cache's staleness bound.
//!
//! The unprotected run has no shared backend to slow down; it runs the same phases, as a
//! reference.
//!
//! - Memory backends by default; set `REDIS_URL=redis://127.0.0.1:6379` to share the cache's L2,
//!   the idempotency records and the rate-limit cells through Redis.
//! - `--smoke` (or `HEADROOM_SMOKE=1`) runs a few seconds, for CI.
//! - `--chart <path>` chooses where the chart goes (default `target/flash-sale.svg`).
//! - `--check` exits with status 1 when the protected run misses a spike or chaos target (CI
//!   runs `--smoke --check`).
//! - `--weaken` (or `HEADROOM_WEAKEN=1`) switches off the protection of product pages (no cache,
//!   no shedding) and pays inside the checkout's transaction, to see the targets missed and
//!   `--check` fail.

mod chart;
mod counters;
mod db;
mod load;
mod payment;
mod report;
mod server;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use headroom::chaos::{Delay, Experiment, ExperimentConfig};

use crate::counters::{Counters, Snapshot};
use crate::db::Database;
use crate::load::{Chaos, Phase, Plan};
use crate::payment::Gateway;
use crate::report::{GuardStats, Run};
use crate::server::GuardCounters;

/// Connections of the stand-in database.
pub(crate) const DB_CONNECTIONS: usize = 16;
/// Instances of the service, sharing the database and the headroom backend.
const INSTANCES: usize = 2;
/// How long the payment workers may take to pay for the last orders after the load ends.
const PAYMENT_DRAIN: Duration = Duration::from_secs(30);

/// The chaos experiment's name (the `experiment` label of its metrics).
pub(crate) const EXPERIMENT: &str = "flash-sale-chaos";
/// How much slower every call to the shared backend is in "chaos: Redis latency".
const CHAOS_LATENCY: Duration = Duration::from_millis(30);
/// The share of invalidation messages lost, per subscriber, in "chaos: lost messages".
const CHAOS_LOSS: f64 = 0.5;

fn plan(smoke: bool) -> Plan {
    let phase = |name, multiplier, secs: f64, checkout_share, scalper_share, chaos| Phase {
        name,
        multiplier,
        duration: Duration::from_secs_f64(secs),
        checkout_share,
        scalper_share,
        chaos,
    };
    let scale = if smoke { 0.12 } else { 1.0 };
    Plan {
        base_rate: 200.0,
        update_rate: 5.0,
        phases: vec![
            phase("baseline", 1.0, 6.0 * scale, 0.2, 0.0, None),
            phase("growth", 3.0, 8.0 * scale, 0.2, 0.0, None),
            // The sale opens: half the visitors check out, and scripts join in.
            phase("spike", 6.0, 10.0 * scale, 0.5, 0.1, None),
            phase("recovery", 1.0, 4.0 * scale, 0.2, 0.0, None),
            // Headroom's own backend misbehaves, at the baseline rate.
            phase(
                "chaos: Redis latency",
                1.0,
                8.0 * scale,
                0.2,
                0.0,
                Some(Chaos::Latency(CHAOS_LATENCY)),
            ),
            phase(
                "chaos: lost messages",
                1.0,
                8.0 * scale,
                0.2,
                0.0,
                Some(Chaos::Loss(CHAOS_LOSS)),
            ),
        ],
    }
}

/// The experiment's settings for a phase of `duration`: it ends by itself with the phase.
fn experiment_config(chaos: Chaos, duration: Duration) -> ExperimentConfig {
    let config = ExperimentConfig::new(duration);
    match chaos {
        Chaos::Latency(delay) => config.latency(1.0, Delay::Fixed(delay)),
        Chaos::Loss(rate) => config.loss(rate),
    }
}

#[tokio::main]
async fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let smoke = flag("--smoke") || std::env::var("HEADROOM_SMOKE").is_ok_and(|v| v == "1");
    let check = flag("--check");
    let weakened = flag("--weaken") || std::env::var("HEADROOM_WEAKEN").is_ok_and(|v| v == "1");
    let chart_path = args
        .iter()
        .position(|a| a == "--chart")
        .and_then(|i| args.get(i + 1))
        .map_or_else(|| PathBuf::from("target/flash-sale.svg"), PathBuf::from);
    let plan = plan(smoke);
    // Cache metrics are registered when a cache is built: install the recorder first.
    let counters = Counters::install();

    let bare = run_bare(&plan).await?;
    let (guarded, backend) = {
        let namespace = format!(
            "flash-sale:{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis()
        );
        let headroom = server::headroom(&namespace).await?;
        let backend = headroom.backend().to_string();
        (
            run_guarded(&plan, &headroom, &counters, weakened).await?,
            backend,
        )
    };

    let held = report::print(&plan, &backend, [&bare, &guarded]);
    if let Some(dir) = chart_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    chart::draw(&chart_path, &plan, [&bare, &guarded])?;
    let shown = std::fs::canonicalize(&chart_path).unwrap_or(chart_path);
    println!();
    println!("chart: {}", shown.display());
    if held {
        return Ok(ExitCode::SUCCESS);
    }
    println!("headroom did not meet its targets on this machine (see above)");
    Ok(if check {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn run_bare(plan: &Plan) -> Result<Run, Box<dyn std::error::Error>> {
    let db = Database::new(DB_CONNECTIONS);
    let gateway = Arc::new(Gateway::default());
    let mut targets = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..INSTANCES {
        let (addr, task) = server::start(db.clone(), gateway.clone(), None).await?;
        targets.push(addr);
        servers.push(task);
    }
    let samples = load::run("unprotected", plan, &targets, |_| {}).await;
    for server in servers {
        server.abort();
    }
    Ok(Run {
        label: "unprotected",
        samples,
        db: db.stats(),
        payments: gateway.stats(),
        guard: None,
        phase_counters: Vec::new(),
    })
}

async fn run_guarded(
    plan: &Plan,
    headroom: &headroom::Headroom,
    counters: &Counters,
    weakened: bool,
) -> Result<Run, Box<dyn std::error::Error>> {
    let db = Database::new(DB_CONNECTIONS);
    let gateway = Arc::new(Gateway::default());
    // One experiment for the whole run: off until a chaos phase starts it.
    let experiment = Experiment::builder(EXPERIMENT)
        .clock(headroom.clock().clone())
        .build()?;
    let under_chaos = headroom.with_chaos(&experiment);
    let configs: Vec<Option<ExperimentConfig>> = plan
        .phases
        .iter()
        .map(|phase| {
            phase
                .chaos
                .map(|chaos| experiment_config(chaos, phase.duration))
        })
        .collect();
    for config in configs.iter().flatten() {
        config.validate()?;
    }
    let guard_counters = Arc::new(GuardCounters::default());
    let mut targets = Vec::new();
    let mut servers = Vec::new();
    let mut guards = Vec::new();
    let mut workers = Vec::new();
    for instance in 0..INSTANCES {
        let guard = server::guard(&under_chaos, instance, guard_counters.clone(), weakened)?;
        let (addr, task) = server::start(db.clone(), gateway.clone(), Some(guard.clone())).await?;
        workers.push(guard.start_payments(db.clone(), gateway.clone())?);
        targets.push(addr);
        servers.push(task);
        guards.push(guard);
    }
    // Counters at each phase's start, then at the end of the run.
    let mut marks: Vec<Snapshot> = Vec::new();
    let samples = load::run("headroom", plan, &targets, |index| {
        marks.push(counters.snapshot());
        match &configs[index] {
            Some(config) => experiment
                .start(config.clone())
                .expect("validated before the run"),
            None => experiment.stop(),
        }
    })
    .await;
    experiment.stop();
    for server in servers {
        server.abort();
    }
    // The orders accepted last are paid after the load ends.
    let drained = tokio::time::Instant::now() + PAYMENT_DRAIN;
    while guards[0].unfinished_payments().await != Some(0) && tokio::time::Instant::now() < drained
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut payment_jobs = headroom::jobs::WorkerReport::default();
    for worker in workers {
        let report = worker.shutdown(Duration::from_secs(5)).await;
        payment_jobs.done += report.done;
        payment_jobs.retried += report.retried;
        payment_jobs.dead += report.dead;
        payment_jobs.lost += report.lost;
        payment_jobs.handed_back += report.handed_back;
    }
    let unpaid = guards[0].unfinished_payments().await;
    let end = counters.snapshot();
    marks.push(end.clone());
    let phase_counters = marks.windows(2).map(|w| w[1].since(&w[0])).collect();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let level = |name, level| end.get(name, &[("level", level)]);
    let stats = GuardStats {
        l1_hits: level("headroom_cache_hits_total", "l1"),
        l1_misses: level("headroom_cache_misses_total", "l1"),
        l2_hits: level("headroom_cache_hits_total", "l2"),
        l2_misses: level("headroom_cache_misses_total", "l2"),
        shed: guards.iter().map(|g| g.shed()).sum(),
        replays: load(&guard_counters.replays),
        breaker_rejections: load(&guard_counters.breaker_rejections),
        payment_jobs,
        unpaid,
        payment_waits: std::mem::take(
            &mut *guard_counters
                .payment_waits
                .lock()
                .expect("payment waits lock"),
        ),
    };
    Ok(Run {
        label: if weakened { "weakened" } else { "headroom" },
        samples,
        db: db.stats(),
        payments: gateway.stats(),
        guard: Some(stats),
        phase_counters,
    })
}
