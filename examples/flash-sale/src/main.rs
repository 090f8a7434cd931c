//! Run with: cargo run --release -p flash-sale
//!
//! An order service goes through a flash sale twice, on the same stand-in database: once
//! unprotected, once with headroom. A built-in load generator sends open-loop traffic over
//! loopback through four phases (baseline, 3× growth, a 6× flash-sale spike with scripted
//! buyers, recovery); the
//! program prints a side-by-side report and writes an SVG chart of latency and goodput.
//!
//! - Memory backends by default; set `REDIS_URL=redis://127.0.0.1:6379` to share the cache's L2,
//!   the idempotency records and the rate-limit cells through Redis.
//! - `--smoke` (or `HEADROOM_SMOKE=1`) runs a few seconds, for CI.
//! - `--chart <path>` chooses where the chart goes (default `target/flash-sale.svg`).
//! - `--check` exits with status 1 when the protected run misses a spike target (CI runs
//!   `--smoke --check`).
//! - `--weaken` (or `HEADROOM_WEAKEN=1`) switches off the protection of product pages (no cache, no shedding), to see
//!   the targets missed and `--check` fail.

mod chart;
mod counters;
mod db;
mod load;
mod report;
mod server;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::counters::Counters;
use crate::db::Database;
use crate::load::{Phase, Plan};
use crate::report::{GuardStats, Run};
use crate::server::GuardCounters;

/// Connections of the stand-in database.
pub(crate) const DB_CONNECTIONS: usize = 16;
/// Instances of the service, sharing the database and the headroom backend.
const INSTANCES: usize = 2;

fn plan(smoke: bool) -> Plan {
    let phase = |name, multiplier, secs: f64, checkout_share, scalper_share| Phase {
        name,
        multiplier,
        duration: Duration::from_secs_f64(secs),
        checkout_share,
        scalper_share,
    };
    let scale = if smoke { 0.12 } else { 1.0 };
    Plan {
        base_rate: 200.0,
        phases: vec![
            phase("baseline", 1.0, 6.0 * scale, 0.2, 0.0),
            phase("growth", 3.0, 8.0 * scale, 0.2, 0.0),
            // The sale opens: half the visitors check out, and scripts join in.
            phase("spike", 6.0, 10.0 * scale, 0.5, 0.1),
            phase("recovery", 1.0, 4.0 * scale, 0.2, 0.0),
        ],
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
    println!("headroom did not meet the spike targets on this machine (see above)");
    Ok(if check {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn run_bare(plan: &Plan) -> Result<Run, Box<dyn std::error::Error>> {
    let db = Database::new(DB_CONNECTIONS);
    let mut targets = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..INSTANCES {
        let (addr, task) = server::start(db.clone(), None).await?;
        targets.push(addr);
        servers.push(task);
    }
    let samples = load::run("unprotected", plan, &targets).await;
    for server in servers {
        server.abort();
    }
    Ok(Run {
        label: "unprotected",
        samples,
        db: db.stats(),
        guard: None,
    })
}

async fn run_guarded(
    plan: &Plan,
    headroom: &headroom::Headroom,
    counters: &Counters,
    weakened: bool,
) -> Result<Run, Box<dyn std::error::Error>> {
    let db = Database::new(DB_CONNECTIONS);
    let guard_counters = Arc::new(GuardCounters::default());
    let mut targets = Vec::new();
    let mut servers = Vec::new();
    let mut guards = Vec::new();
    for instance in 0..INSTANCES {
        let guard = server::guard(headroom, instance, guard_counters.clone(), weakened)?;
        let (addr, task) = server::start(db.clone(), Some(guard.clone())).await?;
        targets.push(addr);
        servers.push(task);
        guards.push(guard);
    }
    let samples = load::run("headroom", plan, &targets).await;
    for server in servers {
        server.abort();
    }
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let stats = GuardStats {
        l1_hits: counters.get("headroom_cache_hits_total", "l1"),
        l1_misses: counters.get("headroom_cache_misses_total", "l1"),
        l2_hits: counters.get("headroom_cache_hits_total", "l2"),
        l2_misses: counters.get("headroom_cache_misses_total", "l2"),
        shed: guards.iter().map(|g| g.shed()).sum(),
        replays: load(&guard_counters.replays),
        breaker_rejections: load(&guard_counters.breaker_rejections),
    };
    Ok(Run {
        label: if weakened { "weakened" } else { "headroom" },
        samples,
        db: db.stats(),
        guard: Some(stats),
    })
}
