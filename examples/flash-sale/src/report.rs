//! The side-by-side report.

use std::time::Duration;

use crate::counters::Snapshot;
use headroom::jobs::WorkerReport;

use crate::db::DbStats;
use crate::load::{Chaos, Kind, Outcome, Plan, Sample};
use crate::payment::PaymentStats;

/// A request counts towards goodput when it succeeded within this time, retries included.
pub(crate) const SLO: Duration = Duration::from_millis(500);

/// What the protected run promises during the spike: p99 within the SLO.
pub(crate) const SPIKE_P99_TARGET: Duration = SLO;
/// Share of the spike's offered requests served within the SLO.
pub(crate) const SPIKE_GOODPUT_TARGET: f64 = 0.75;
/// Share of premium checkouts that succeed during the spike.
pub(crate) const SPIKE_PREMIUM_TARGET: f64 = 0.99;

/// What the protected run promises while its shared backend misbehaves: p99 within the SLO.
pub(crate) const CHAOS_P99_TARGET: Duration = SLO;
/// Share of a chaos phase's requests served within the SLO.
pub(crate) const CHAOS_GOODPUT_TARGET: f64 = 0.95;

/// Counters of the protected build.
#[derive(Clone, Debug, Default)]
pub(crate) struct GuardStats {
    pub(crate) l1_hits: u64,
    pub(crate) l1_misses: u64,
    pub(crate) l2_hits: u64,
    pub(crate) l2_misses: u64,
    pub(crate) shed: u64,
    pub(crate) replays: u64,
    pub(crate) breaker_rejections: u64,
    /// What the payment workers did, summed over the instances.
    pub(crate) payment_jobs: WorkerReport,
    /// Payment jobs left unfinished after the drain (`None`: the store did not answer).
    pub(crate) unpaid: Option<u64>,
    /// For each payment job done: from its 202 until the order was paid.
    pub(crate) payment_waits: Vec<Duration>,
}

/// One run's results.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) label: &'static str,
    pub(crate) samples: Vec<Sample>,
    pub(crate) db: DbStats,
    pub(crate) payments: PaymentStats,
    pub(crate) guard: Option<GuardStats>,
    /// What headroom's metrics counted in each phase (protected run only).
    pub(crate) phase_counters: Vec<Snapshot>,
}

/// Figures of a set of samples.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Figures {
    pub(crate) requests: usize,
    pub(crate) succeeded: usize,
    pub(crate) good: usize,
    pub(crate) p50: Duration,
    /// Over every answer, failures and client timeouts included.
    pub(crate) p99: Duration,
    /// Over successful requests only.
    pub(crate) p99_ok: Duration,
}

impl Figures {
    pub(crate) fn of<'a>(samples: impl Iterator<Item = &'a Sample>) -> Self {
        let (mut latencies, mut ok_latencies) = (Vec::new(), Vec::new());
        let mut good = 0;
        for sample in samples {
            latencies.push(sample.latency);
            if sample.outcome.is_success() {
                ok_latencies.push(sample.latency);
                if sample.latency <= SLO {
                    good += 1;
                }
            }
        }
        latencies.sort_unstable();
        ok_latencies.sort_unstable();
        Self {
            requests: latencies.len(),
            succeeded: ok_latencies.len(),
            good,
            p50: percentile(&latencies, 0.50),
            p99: percentile(&latencies, 0.99),
            p99_ok: percentile(&ok_latencies, 0.99),
        }
    }
}

pub(crate) fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

fn ratio(part: u64, whole: u64) -> String {
    if whole == 0 {
        return String::from("-");
    }
    format!("{:.1} %", part as f64 * 100.0 / whole as f64)
}

fn phase_samples<'a>(
    run: &'a Run,
    plan: &'a Plan,
    phase: usize,
) -> impl Iterator<Item = &'a Sample> + 'a {
    run.samples
        .iter()
        .filter(move |s| plan.phase_at(s.at) == phase)
}

/// Product pages served after their row had changed, and the longest such staleness.
fn staleness<'a>(samples: impl Iterator<Item = &'a Sample>) -> (usize, Option<Duration>) {
    let stale: Vec<Duration> = samples.filter_map(|s| s.stale).collect();
    (stale.len(), stale.iter().max().copied())
}

fn stale_cell((count, longest): (usize, Option<Duration>)) -> String {
    match longest {
        Some(longest) => format!("{count} (max {})", ms(longest)),
        None => String::from("0"),
    }
}

/// The name of a phase in tables.
fn phase_label(plan: &Plan, phase: usize) -> String {
    let phase = &plan.phases[phase];
    format!("{} {}x", phase.name, phase.multiplier)
}

/// Prints the report and returns whether the protected run met the spike and chaos targets.
pub(crate) fn print(plan: &Plan, backend: &str, runs: [&Run; 2]) -> bool {
    let [bare, guarded] = runs;
    let width = (0..plan.phases.len())
        .map(|i| phase_label(plan, i).len())
        .max()
        .unwrap_or(0)
        .max(10);
    println!();
    println!(
        "flash sale: {} rps base load and {} price updates/s, database of {} connections, backend {backend}",
        plan.base_rate,
        plan.update_rate,
        crate::DB_CONNECTIONS
    );
    println!(
        "goodput = requests that succeeded within {} (retries included), per second",
        ms(SLO)
    );
    println!();
    println!("p99 = all answers, failures included; p99 ok = successful requests only");
    println!();
    println!(
        "{:<width$} {:>8} | {:^42} | {:^42}",
        "phase", "offered", bare.label, guarded.label
    );
    println!(
        "{:<width$} {:>8} | {:>9} {:>7} {:>7} {:>7} {:>7} | {:>9} {:>7} {:>7} {:>7} {:>7}",
        "",
        "rps",
        "goodput/s",
        "p50",
        "p99",
        "p99 ok",
        "failed",
        "goodput/s",
        "p50",
        "p99",
        "p99 ok",
        "failed"
    );
    println!("{}", "-".repeat(98 + width));
    for (i, phase) in plan.phases.iter().enumerate() {
        let secs = phase.duration.as_secs_f64();
        let cells: Vec<String> = [bare, guarded]
            .iter()
            .map(|run| {
                let f = Figures::of(phase_samples(run, plan, i));
                format!(
                    "{:>9.0} {:>7} {:>7} {:>7} {:>7}",
                    f.good as f64 / secs,
                    ms(f.p50),
                    ms(f.p99),
                    ms(f.p99_ok),
                    ratio((f.requests - f.succeeded) as u64, f.requests as u64)
                )
            })
            .collect();
        println!(
            "{:<width$} {:>8.0} | {} | {}",
            phase_label(plan, i),
            plan.offered_rate(phase),
            cells[0],
            cells[1]
        );
    }
    println!();

    let total = plan.total().as_secs_f64();
    let row = |name: &str, f: &dyn Fn(&Run) -> String| {
        println!("{:<34} {:>20} {:>20}", name, f(bare), f(guarded));
    };
    println!(
        "{:<34} {:>20} {:>20}",
        "whole run", bare.label, guarded.label
    );
    println!("{}", "-".repeat(76));
    row("requests", &|r| r.samples.len().to_string());
    row("throughput (answered/s)", &|r| {
        let answered = r
            .samples
            .iter()
            .filter(|s| s.outcome != Outcome::Timeout)
            .count();
        format!("{:.0}", answered as f64 / total)
    });
    row("goodput (/s)", &|r| {
        format!("{:.0}", Figures::of(r.samples.iter()).good as f64 / total)
    });
    row("p50", &|r| ms(Figures::of(r.samples.iter()).p50));
    row("p99 (all answers)", &|r| {
        ms(Figures::of(r.samples.iter()).p99)
    });
    row("p99 (successful requests)", &|r| {
        ms(Figures::of(r.samples.iter()).p99_ok)
    });
    row("p99 product page", &|r| {
        ms(Figures::of(r.samples.iter().filter(|s| s.kind == Kind::Read)).p99)
    });
    row("p99 checkout answer (see below)", &|r| {
        ms(Figures::of(r.samples.iter().filter(|s| s.kind == Kind::Checkout)).p99)
    });
    row("price updates", &|r| {
        let updates = r.samples.iter().filter(|s| s.kind == Kind::Update);
        let ok = updates.clone().filter(|s| s.outcome.is_success()).count();
        format!("{ok} of {}", updates.count())
    });
    row("pages served after a price change", &|r| {
        stale_cell(staleness(r.samples.iter()))
    });
    for outcome in Outcome::ERRORS {
        row(&format!("errors: {}", outcome.label()), &|r| {
            r.samples
                .iter()
                .filter(|s| s.outcome == outcome)
                .count()
                .to_string()
        });
    }
    row("retries sent", &|r| {
        r.samples
            .iter()
            .map(|s| u64::from(s.attempts - 1))
            .sum::<u64>()
            .to_string()
    });
    row("orders committed", &|r| r.db.orders.to_string());
    row("duplicate orders", &|r| r.db.duplicate_orders.to_string());
    row("checkouts run again (idempotent insert absorbed)", &|r| {
        r.db.repeated_checkouts.to_string()
    });
    row("orders paid", &|r| r.db.paid_orders.to_string());
    row("double charges (payment provider)", &|r| {
        r.payments.double_charges.to_string()
    });
    row("charges asked again (provider's key absorbed)", &|r| {
        r.payments.repeated_charges.to_string()
    });
    row("orders cancelled (payment not queued)", &|r| {
        r.db.cancelled_orders.to_string()
    });
    row("connection time idle in transaction", &|r| {
        idle_share(&r.db)
    });
    row("payment jobs done / retried / dead / handed back", &|r| {
        r.guard.as_ref().map_or("-".into(), |g| {
            let jobs = g.payment_jobs;
            format!(
                "{} / {} / {} / {}",
                jobs.done, jobs.retried, jobs.dead, jobs.handed_back
            )
        })
    });
    row("payment p99, from 202 to paid", &|r| {
        r.guard
            .as_ref()
            .filter(|g| !g.payment_waits.is_empty())
            .map_or("-".into(), |g| {
                let mut waits = g.payment_waits.clone();
                waits.sort_unstable();
                ms(percentile(&waits, 0.99))
            })
    });
    row("idempotent replays", &|r| {
        r.guard
            .as_ref()
            .map_or("-".into(), |g| g.replays.to_string())
    });
    row("shed (checkouts and page loads)", &|r| {
        r.guard.as_ref().map_or("-".into(), |g| g.shed.to_string())
    });
    row("breaker rejections", &|r| {
        r.guard
            .as_ref()
            .map_or("-".into(), |g| g.breaker_rejections.to_string())
    });
    row("cache hit ratio L1", &|r| {
        r.guard
            .as_ref()
            .map_or("-".into(), |g| ratio(g.l1_hits, g.l1_hits + g.l1_misses))
    });
    row("cache hit ratio L2 (of L1 misses)", &|r| {
        r.guard
            .as_ref()
            .map_or("-".into(), |g| ratio(g.l2_hits, g.l2_hits + g.l2_misses))
    });
    row("cache hit ratio overall", &|r| {
        r.guard.as_ref().map_or("-".into(), |g| {
            ratio(g.l1_hits + g.l2_hits, g.l1_hits + g.l1_misses)
        })
    });
    row("database queries", &|r| r.db.queries.to_string());
    row("database queries/s", &|r| {
        format!("{:.0}", r.db.queries as f64 / total)
    });
    row("database mean query time", &|r| ms(r.db.mean_query));
    row("database peak queries waiting+running", &|r| {
        r.db.peak_pending.to_string()
    });
    println!(
        "checkout answer: {} answers once the order is charged; {} answers 202 once the \
         payment is queued, and the charge follows (\"payment p99, from 202 to paid\")",
        bare.label, guarded.label
    );
    println!();

    let spike = plan
        .phases
        .iter()
        .position(|p| p.name == "spike")
        .unwrap_or(plan.phases.len() - 1);
    let spike_secs = plan.phases[spike].duration.as_secs_f64();
    let offered = plan.offered_rate(&plan.phases[spike]) * spike_secs;
    let check = |run: &Run| {
        let f = Figures::of(phase_samples(run, plan, spike));
        let premium: Vec<&Sample> = phase_samples(run, plan, spike)
            .filter(|s| s.kind == Kind::Checkout && s.premium)
            .collect();
        let premium_ok = premium.iter().filter(|s| s.outcome.is_success()).count();
        let premium_share = premium_ok as f64 / premium.len().max(1) as f64;
        (f.p99, f.p99_ok, f.good as f64 / offered, premium_share)
    };
    let mut met = true;
    println!(
        "spike targets: p99 of all answers <= {}, goodput >= {:.0} % of offered, premium checkouts >= {:.0} % successful",
        ms(SPIKE_P99_TARGET),
        SPIKE_GOODPUT_TARGET * 100.0,
        SPIKE_PREMIUM_TARGET * 100.0
    );
    for run in [bare, guarded] {
        let (p99, p99_ok, goodput, premium) = check(run);
        let ok = p99 <= SPIKE_P99_TARGET
            && goodput >= SPIKE_GOODPUT_TARGET
            && premium >= SPIKE_PREMIUM_TARGET;
        println!(
            "  {:<12} p99 {:>8} (successful {:>8})  goodput {:>5.1} %  premium checkouts {:>5.1} %  => {}",
            run.label,
            ms(p99),
            ms(p99_ok),
            goodput * 100.0,
            premium * 100.0,
            if ok { "held" } else { "degraded" }
        );
        if run.guard.is_some() {
            met = ok;
        }
    }
    let payments_met = print_payments(bare, guarded);
    let chaos_met = print_chaos(plan, bare, guarded);
    met && payments_met && chaos_met
}

/// Time connections sat idle in transaction, and its share of all connection time.
fn idle_share(db: &DbStats) -> String {
    format!(
        "{:.1} s ({:.1} %)",
        db.idle_in_transaction.as_secs_f64(),
        idle_fraction(db) * 100.0
    )
}

/// The most of its connection time a protected run may spend idle in transaction.
pub(crate) const IDLE_SHARE_TARGET: f64 = 0.02;

/// The share of connection time spent idle in transaction.
fn idle_fraction(db: &DbStats) -> f64 {
    db.idle_in_transaction.as_secs_f64() / db.connection_time.as_secs_f64().max(1e-9)
}

/// Whether a protected run met the payment targets: connections not left idle in
/// transaction, every payment job finished, every order placed paid, each charged once, and
/// each checkout run once (a retry replayed, not absorbed by the idempotent insert).
pub(crate) fn payments_held(db: &DbStats, paid: &PaymentStats, guard: &GuardStats) -> bool {
    idle_fraction(db) <= IDLE_SHARE_TARGET
        && guard.unpaid == Some(0)
        && guard.payment_jobs.dead == 0
        && paid.double_charges == 0
        && db.repeated_checkouts == 0
        && db.orders == db.paid_orders
        && paid.charged == db.paid_orders
}

/// The payment targets, checked on the protected run. Returns whether they were met.
fn print_payments(bare: &Run, guarded: &Run) -> bool {
    println!();
    println!(
        "payment targets: at most {:.0} % of connection time idle in transaction; every payment job done, every order placed paid, each charged once, each checkout run once",
        IDLE_SHARE_TARGET * 100.0
    );
    let mut met = true;
    for run in [bare, guarded] {
        let (db, paid) = (&run.db, &run.payments);
        let Some(guard) = &run.guard else {
            println!(
                "  {:<12} pays inside the checkout's transaction: {} idle in transaction, {} double charges  => reference",
                run.label,
                idle_share(db),
                paid.double_charges
            );
            continue;
        };
        let ok = payments_held(db, paid, guard);
        println!(
            "  {:<12} idle in transaction {}, unfinished payment jobs {}, dead {}, orders placed {}, charged {}, paid {}, double charges {}, checkouts run again {}  => {}",
            run.label,
            idle_share(db),
            guard
                .unpaid
                .map_or_else(|| String::from("unknown"), |n| n.to_string()),
            guard.payment_jobs.dead,
            db.orders,
            paid.charged,
            db.paid_orders,
            paid.double_charges,
            db.repeated_checkouts,
            if ok { "held" } else { "missed" }
        );
        met &= ok;
    }
    met
}

/// The chaos section: what was injected beside what headroom did, per chaos phase, with the
/// recovery phase (same rate, nothing injected) as the reference; then the chaos targets.
/// Returns whether the protected run met them.
fn print_chaos(plan: &Plan, bare: &Run, guarded: &Run) -> bool {
    let chaos: Vec<usize> = (0..plan.phases.len())
        .filter(|&i| plan.phases[i].chaos.is_some())
        .collect();
    if chaos.is_empty() {
        return true;
    }
    let bound = headroom::cache::InvalidationConfig::default().max_silence;
    println!();
    println!("chaos: one experiment on the protected run's shared backend (Headroom::with_chaos)");
    for &i in &chaos {
        let injected = match plan.phases[i].chaos {
            Some(Chaos::Latency(delay)) => format!(
                "every call to the KV store (cache L2), lease store, rate store, job store and invalidation bus {} slower",
                ms(delay)
            ),
            Some(Chaos::Loss(rate)) => format!(
                "{:.0} % of invalidation messages dropped, per subscriber, while prices change",
                rate * 100.0
            ),
            None => String::new(),
        };
        println!("  {:<24} {injected}", plan.phases[i].name);
    }
    println!(
        "  {} has no shared backend to slow down: it ran the same phases with nothing injected",
        bare.label
    );
    println!();
    let reference = plan.phases.iter().position(|p| p.name == "recovery");
    let columns: Vec<usize> = reference.into_iter().chain(chaos.iter().copied()).collect();
    let labels: Vec<String> = columns
        .iter()
        .map(|&i| {
            let label = phase_label(plan, i);
            if plan.phases[i].chaos.is_none() {
                format!("{label} (no chaos)")
            } else {
                label
            }
        })
        .collect();
    let cell = labels.iter().map(String::len).max().unwrap_or(0).max(12);
    print!("{:<42}", format!("{}, per phase", guarded.label));
    for label in &labels {
        print!(" {label:>cell$}");
    }
    println!();
    println!("{}", "-".repeat(42 + (cell + 1) * columns.len()));
    let row = |name: &str, value: &dyn Fn(usize) -> String| {
        print!("{name:<42}");
        for &i in &columns {
            print!(" {:>cell$}", value(i));
        }
        println!();
    };
    let counted = |i: usize, name: &str, labels: &[(&str, &str)]| {
        guarded
            .phase_counters
            .get(i)
            .map_or(0, |c| c.get(name, labels))
    };
    let injected = |strategy| {
        move |i| {
            counted(
                i,
                "headroom_chaos_injected_total",
                &[("experiment", crate::EXPERIMENT), ("strategy", strategy)],
            )
            .to_string()
        }
    };
    row("injected: latency (calls delayed)", &injected("latency"));
    row("injected: loss (messages dropped)", &injected("loss"));
    row("price updates (ok of sent)", &|i| {
        let updates: Vec<&Sample> = phase_samples(guarded, plan, i)
            .filter(|s| s.kind == Kind::Update)
            .collect();
        let ok = updates.iter().filter(|s| s.outcome.is_success()).count();
        format!("{ok} of {}", updates.len())
    });
    row("product pages served from L1", &|i| {
        counted(i, "headroom_cache_hits_total", &[("level", "l1")]).to_string()
    });
    row("product pages served from L2", &|i| {
        counted(i, "headroom_cache_hits_total", &[("level", "l2")]).to_string()
    });
    row("loader calls (database reads)", &|i| {
        counted(i, "headroom_cache_loads_total", &[]).to_string()
    });
    row("L1 flushes: gap / silence / lost", &|i| {
        let flushes = |reason| {
            counted(
                i,
                "headroom_cache_invalidation_flushes_total",
                &[("reason", reason)],
            )
        };
        format!(
            "{} / {} / {}",
            flushes("gap"),
            flushes("silence"),
            flushes("lost")
        )
    });
    row("L2 errors and timeouts", &|i| {
        counted(i, "headroom_cache_l2_errors_total", &[]).to_string()
    });
    row("pages served after a price change", &|i| {
        stale_cell(staleness(phase_samples(guarded, plan, i)))
    });
    row("p99 product page", &|i| {
        ms(Figures::of(phase_samples(guarded, plan, i).filter(|s| s.kind == Kind::Read)).p99)
    });
    row("p99 checkout", &|i| {
        ms(Figures::of(phase_samples(guarded, plan, i).filter(|s| s.kind == Kind::Checkout)).p99)
    });
    row("p99 all answers", &|i| {
        ms(Figures::of(phase_samples(guarded, plan, i)).p99)
    });
    row("goodput (share of requests within SLO)", &|i| {
        let f = Figures::of(phase_samples(guarded, plan, i));
        ratio(f.good as u64, f.requests as u64)
    });
    println!();

    println!(
        "chaos targets: p99 of all answers <= {}, goodput >= {:.0} % of the phase's requests, no product page served more than {} (the cache's staleness bound, max_silence) after its price changed",
        ms(CHAOS_P99_TARGET),
        CHAOS_GOODPUT_TARGET * 100.0,
        ms(bound)
    );
    let mut met = true;
    for &i in &chaos {
        for run in [bare, guarded] {
            let f = Figures::of(phase_samples(run, plan, i));
            let goodput = f.good as f64 / f.requests.max(1) as f64;
            let (stale, longest) = staleness(phase_samples(run, plan, i));
            let ok = f.p99 <= CHAOS_P99_TARGET
                && goodput >= CHAOS_GOODPUT_TARGET
                && longest.is_none_or(|longest| longest <= bound);
            let verdict = match (run.guard.is_some(), ok) {
                (false, _) => "nothing injected",
                (true, true) => "held",
                (true, false) => "missed",
            };
            println!(
                "  {:<22} {:<12} p99 {:>8}  goodput {:>5.1} %  stale pages {:>4}, longest {:>8}  => {verdict}",
                plan.phases[i].name,
                run.label,
                ms(f.p99),
                goodput * 100.0,
                stale,
                longest.map_or_else(|| String::from("-"), ms),
            );
            if run.guard.is_some() {
                met &= ok;
            }
        }
    }
    met
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payment_targets_fail_for_a_run_that_pays_inside_its_transaction_leaves_orders_unpaid_or_runs_a_checkout_twice()
     {
        let db = DbStats {
            orders: 10,
            paid_orders: 10,
            connection_time: Duration::from_secs(100),
            idle_in_transaction: Duration::from_secs(1),
            ..DbStats::default()
        };
        let paid = PaymentStats {
            charged: 10,
            double_charges: 0,
            repeated_charges: 0,
        };
        let guard = GuardStats {
            unpaid: Some(0),
            ..GuardStats::default()
        };
        assert!(payments_held(&db, &paid, &guard));
        let paying_inside = DbStats {
            idle_in_transaction: Duration::from_secs(60),
            ..db
        };
        assert!(!payments_held(&paying_inside, &paid, &guard));
        let left_unpaid = DbStats {
            paid_orders: 9,
            ..db
        };
        let charged_nine = PaymentStats { charged: 9, ..paid };
        assert!(!payments_held(&left_unpaid, &charged_nine, &guard));
        let twice = PaymentStats {
            double_charges: 1,
            ..paid
        };
        assert!(!payments_held(&db, &twice, &guard));
        // A checkout run twice fails the target though the idempotent insert absorbed it.
        let run_twice = DbStats {
            repeated_checkouts: 1,
            ..db
        };
        assert!(!payments_held(&run_twice, &paid, &guard));
    }

    #[test]
    fn percentile_takes_the_nearest_rank() {
        let sorted: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&sorted, 0.50), Duration::from_millis(50));
        assert_eq!(percentile(&sorted, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&[], 0.99), Duration::ZERO);
    }

    #[test]
    fn goodput_counts_successes_within_the_slo_only() {
        let sample = |latency, outcome| Sample {
            at: Duration::ZERO,
            latency,
            kind: Kind::Read,
            outcome,
            attempts: 1,
            premium: false,
            stale: None,
        };
        let samples = [
            sample(Duration::from_millis(10), Outcome::Ok),
            sample(SLO + Duration::from_millis(1), Outcome::Ok),
            sample(Duration::from_millis(10), Outcome::Shed),
            sample(Duration::from_millis(10), Outcome::Replayed),
        ];
        let figures = Figures::of(samples.iter());
        assert_eq!(
            (figures.requests, figures.succeeded, figures.good),
            (4, 3, 2)
        );
    }

    #[test]
    fn p99_of_successes_leaves_failures_out() {
        let sample = |ms, outcome| Sample {
            at: Duration::ZERO,
            latency: Duration::from_millis(ms),
            kind: Kind::Read,
            outcome,
            attempts: 1,
            premium: false,
            stale: None,
        };
        // 90 fast successes and 10 slow client timeouts.
        let samples: Vec<Sample> = (1..=90)
            .map(|ms| sample(ms, Outcome::Ok))
            .chain((0..10).map(|_| sample(1_000, Outcome::Timeout)))
            .collect();
        let figures = Figures::of(samples.iter());
        assert_eq!(figures.p99, Duration::from_millis(1_000));
        assert_eq!(figures.p99_ok, Duration::from_millis(90));
    }
}
