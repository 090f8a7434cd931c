//! The side-by-side report.

use std::time::Duration;

use crate::db::DbStats;
use crate::load::{Kind, Outcome, Plan, Sample};

/// A request counts towards goodput when it succeeded within this time, retries included.
pub(crate) const SLO: Duration = Duration::from_millis(500);

/// What the protected run promises during the spike: p99 within the SLO.
pub(crate) const SPIKE_P99_TARGET: Duration = SLO;
/// Share of the spike's offered requests served within the SLO.
pub(crate) const SPIKE_GOODPUT_TARGET: f64 = 0.75;
/// Share of premium checkouts that succeed during the spike.
pub(crate) const SPIKE_PREMIUM_TARGET: f64 = 0.99;

/// Counters of the protected build.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GuardStats {
    pub(crate) l1_hits: u64,
    pub(crate) l1_misses: u64,
    pub(crate) l2_hits: u64,
    pub(crate) l2_misses: u64,
    pub(crate) shed: u64,
    pub(crate) replays: u64,
    pub(crate) breaker_rejections: u64,
}

/// One run's results.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) label: &'static str,
    pub(crate) samples: Vec<Sample>,
    pub(crate) db: DbStats,
    pub(crate) guard: Option<GuardStats>,
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

/// Prints the report and returns whether the protected run met the spike targets.
pub(crate) fn print(plan: &Plan, backend: &str, runs: [&Run; 2]) -> bool {
    let [bare, guarded] = runs;
    println!();
    println!(
        "flash sale: {} rps base load, database of {} connections, backend {backend}",
        plan.base_rate,
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
        "{:<10} {:>8} | {:^42} | {:^42}",
        "phase", "offered", bare.label, guarded.label
    );
    println!(
        "{:<10} {:>8} | {:>9} {:>7} {:>7} {:>7} {:>7} | {:>9} {:>7} {:>7} {:>7} {:>7}",
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
    println!("{}", "-".repeat(108));
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
            "{:<10} {:>8.0} | {} | {}",
            format!("{} {}x", phase.name, phase.multiplier),
            plan.base_rate * phase.multiplier,
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
    row("p99 checkout", &|r| {
        ms(Figures::of(r.samples.iter().filter(|s| s.kind == Kind::Checkout)).p99)
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
    row("duplicate orders (double charges)", &|r| {
        r.db.duplicate_orders.to_string()
    });
    row("idempotent replays", &|r| {
        r.guard.map_or("-".into(), |g| g.replays.to_string())
    });
    row("checkouts shed", &|r| {
        r.guard.map_or("-".into(), |g| g.shed.to_string())
    });
    row("breaker rejections", &|r| {
        r.guard
            .map_or("-".into(), |g| g.breaker_rejections.to_string())
    });
    row("cache hit ratio L1", &|r| {
        r.guard
            .map_or("-".into(), |g| ratio(g.l1_hits, g.l1_hits + g.l1_misses))
    });
    row("cache hit ratio L2 (of L1 misses)", &|r| {
        r.guard
            .map_or("-".into(), |g| ratio(g.l2_hits, g.l2_hits + g.l2_misses))
    });
    row("cache hit ratio overall", &|r| {
        r.guard.map_or("-".into(), |g| {
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
    println!();

    let spike = plan
        .phases
        .iter()
        .position(|p| p.name == "spike")
        .unwrap_or(plan.phases.len() - 1);
    let spike_secs = plan.phases[spike].duration.as_secs_f64();
    let offered = plan.base_rate * plan.phases[spike].multiplier * spike_secs;
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
    met
}

#[cfg(test)]
mod tests {
    use super::*;

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
