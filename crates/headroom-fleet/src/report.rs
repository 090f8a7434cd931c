//! Figures per window and the promises they must keep.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use serde::Serialize;

use crate::db::Reload;
use crate::fleet::ANSWER_TIMEOUT;
use crate::load::{DROPPED, Event, HOT_TENANT, HUNG, Kind};

/// The staleness bound the trial holds the fleet to: `max_silence` (2 s) plus half a
/// `ping_interval` (silence is checked every half interval) plus 250 ms of scheduling delay
/// on a loaded two-core machine.
pub const STALENESS_BOUND: Duration = Duration::from_millis(2_500);
/// Checkouts per second and burst of the hot tenant's tier.
const HOT_TENANT_QUOTA: (f64, f64) = (2.0, 2.0);

/// What a window promises beyond what every window promises.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Expect {
    /// The most L1 flushes each instance other than `spared` may make.
    pub max_flushes: Option<u64>,
    /// The instance the fault was done to (its own flushes are not judged).
    pub spared: Option<usize>,
    /// No product loaded before the window, and never written, may be loaded again in it
    /// (nothing hidden in L2).
    pub no_reloads: bool,
    /// Products read by every instance at once load at most this often each on average with
    /// the fleet-wide single flight.
    pub max_locked_loads_per_key: Option<f64>,
    /// Goodput back within 5 % of offered within this many seconds after the fault ends.
    pub recovery_within: Option<u64>,
    /// Critical requests (checkouts) keep this success ratio.
    pub critical_success: Option<f64>,
    /// Every instance uses its L1 again within this many seconds after the fault ends.
    pub l1_back_within: Option<f64>,
    /// The fault overflowed an instance's invalidation outbox: the others flush for it at
    /// least once (or the window judged nothing of that path).
    pub overflowed: bool,
    /// The instance cut from Redis during the fault. Nobody can hear of the writes it
    /// acknowledges meanwhile before it reaches Redis again, so they count as acknowledged
    /// when the fault ends.
    pub cut_off: Option<usize>,
}

/// What the schedule recorded about one window.
#[derive(Clone, Debug)]
pub struct Window {
    /// Its name.
    pub name: String,
    /// When it began and ended, on the load's clock.
    pub start: Duration,
    /// See `start`.
    pub end: Duration,
    /// When the fault itself was over (recovery is measured from here).
    pub fault_end: Duration,
    /// L1 flushes per instance (`None` for an instance that was never up), summed over each
    /// process's own lifetime.
    pub flushes: Vec<Option<u64>>,
    /// Those flushes by reason, over every instance.
    pub flush_reasons: BTreeMap<String, u64>,
    /// L2 hits and misses over every instance.
    pub l2: (u64, u64),
    /// Database loads per product at the start and at the end.
    pub loads_before: HashMap<String, u64>,
    /// See `loads_before`.
    pub loads_after: HashMap<String, u64>,
    /// Database reloads per product (see `Database::reloads`) at the start and at the end.
    pub reloads_before: HashMap<String, u64>,
    /// See `reloads_before`.
    pub reloads_after: HashMap<String, u64>,
    /// Per product reloaded by the end, how its latest reload came.
    pub last_reloads: HashMap<String, Reload>,
    /// Seconds after the fault until every instance used L1 again, when measured.
    pub l1_back_after: Option<f64>,
    /// Its promises.
    pub expect: Expect,
}

/// The figures of one window.
// The fields are the JSON figures, described in docs/operations.md.
#[allow(missing_docs)]
#[derive(Clone, Debug, Serialize)]
pub struct WindowReport {
    pub name: String,
    pub start_s: f64,
    pub end_s: f64,
    pub requests: usize,
    pub outcomes: BTreeMap<String, usize>,
    pub goodput: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p99_good_ms: f64,
    pub critical_success: f64,
    /// Requests to an instance that was up throughout that got no answer: hung past the
    /// client's timeout or their connection lost.
    pub unanswered: usize,
    pub stale_reads: usize,
    pub max_staleness_ms: f64,
    /// Up to five reads staler than the bound: product, version served, staleness (ms), and
    /// the instance that served it.
    pub stale_examples: Vec<(String, u64, f64, Option<usize>)>,
    pub duplicate_executions: usize,
    pub different_outcomes: usize,
    /// Writes acknowledged by the instance cut off from Redis while it was cut off.
    pub writes_cut_off: usize,
    /// Reads that served a version older than one of those writes before the cut ended (or
    /// less than the bound after): nobody could hear of them yet.
    pub reads_before_heard: usize,
    pub flushes_per_instance: Vec<Option<u64>>,
    pub flush_reasons: BTreeMap<String, u64>,
    pub loads_hot: u64,
    pub reloads: u64,
    /// Loads per product first read in the window by every instance at once, without and
    /// with the fleet-wide single flight.
    pub loads_per_cold_key: Option<(f64, f64)>,
    pub l2_hit_ratio: Option<f64>,
    pub hot_tenant_orders: usize,
    pub hot_tenant_allowed: f64,
    pub recovery_s: Option<f64>,
    pub l1_back_s: Option<f64>,
    pub broken: Vec<String>,
}

/// One second of the timeline.
// The fields are the JSON figures, described in docs/operations.md.
#[allow(missing_docs)]
#[derive(Clone, Debug, Default, Serialize)]
pub struct Second {
    pub offered: usize,
    pub good: usize,
    pub p99_ms: f64,
    pub max_staleness_ms: f64,
}

/// The whole trial.
// The fields are the JSON figures, described in docs/operations.md.
#[allow(missing_docs)]
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub windows: Vec<WindowReport>,
    pub timeline: Vec<Second>,
    pub executions: ExecutionFigures,
    pub broken: Vec<String>,
}

/// Idempotency over the whole run.
// The fields are the JSON figures, described in docs/operations.md.
#[allow(missing_docs)]
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExecutionFigures {
    pub keys: usize,
    pub duplicate_executions: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// How stale each read was: the time since a newer version had been acknowledged to a
/// writer when the read was sent (zero when the version served was current). A write
/// acknowledged by an instance while it was cut off from Redis counts, for the other
/// instances, from the end of the cut; the writer itself knows it at once.
pub fn staleness(events: &[Event], windows: &[Window]) -> Vec<Duration> {
    let cuts: Vec<(usize, Duration, Duration)> = windows
        .iter()
        .filter_map(|w| Some((w.expect.cut_off?, w.start, w.fault_end)))
        .collect();
    let heard_at = |event: &Event| {
        let acked = event.sent + event.latency;
        cuts.iter()
            .find(|(slot, from, to)| event.instance == Some(*slot) && (*from..*to).contains(&acked))
            .map_or(acked, |(_, _, to)| *to)
    };
    // Per product: each version acknowledged, when, when the others could hear of it, and by
    // which instance.
    type Ack = (u64, Duration, Duration, Option<usize>);
    let mut acks: HashMap<&str, Vec<Ack>> = HashMap::new();
    for event in events {
        if let (Kind::Write, "ok", Some(version)) =
            (event.kind, event.outcome.as_str(), event.version)
        {
            acks.entry(&event.key).or_default().push((
                version,
                event.sent + event.latency,
                heard_at(event),
                event.instance,
            ));
        }
    }
    events
        .iter()
        .map(|event| {
            let (Kind::Read, Some(served)) = (event.kind, event.version) else {
                return Duration::ZERO;
            };
            acks.get(event.key.as_str())
                .into_iter()
                .flatten()
                .map(|&(version, acked, heard, writer)| {
                    let known = if writer.is_some() && writer == event.instance {
                        acked
                    } else {
                        heard
                    };
                    (version, known)
                })
                .filter(|(version, known)| *version > served && *known < event.sent)
                .map(|(_, known)| event.sent - known)
                .max()
                .unwrap_or_default()
        })
        .collect()
}

/// Judges every window and the run.
pub fn judge(
    events: &[Event],
    windows: &[Window],
    executions: &HashMap<String, Vec<u64>>,
) -> Report {
    let stale = staleness(events, windows);
    let stale_as_acknowledged = staleness(events, &[]);
    let mut orders_by_key: HashMap<&str, HashSet<u64>> = HashMap::new();
    for event in events.iter().filter(|e| e.kind == Kind::Checkout) {
        if let Some(order) = event.order {
            orders_by_key.entry(&event.key).or_default().insert(order);
        }
    }
    let mut reports = Vec::new();
    for window in windows {
        let inside: Vec<(usize, &Event)> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| e.sent >= window.start && e.sent < window.end)
            .collect();
        let mut outcomes = BTreeMap::new();
        for (_, e) in &inside {
            *outcomes.entry(e.outcome.clone()).or_insert(0) += 1;
        }
        let good = inside.iter().filter(|(_, e)| e.is_good()).count();
        let mut latencies: Vec<f64> = inside.iter().map(|(_, e)| ms(e.latency)).collect();
        latencies.sort_by(f64::total_cmp);
        let mut good_latencies: Vec<f64> = inside
            .iter()
            .filter(|(_, e)| e.is_good())
            .map(|(_, e)| ms(e.latency))
            .collect();
        good_latencies.sort_by(f64::total_cmp);
        let critical: Vec<&Event> = inside
            .iter()
            .map(|(_, e)| *e)
            .filter(|e| e.kind == Kind::Checkout)
            .collect();
        let critical_success = if critical.is_empty() {
            1.0
        } else {
            critical.iter().filter(|e| e.is_good()).count() as f64 / critical.len() as f64
        };
        let staleness_in: Vec<Duration> = inside.iter().map(|(i, _)| stale[*i]).collect();
        let stale_reads = staleness_in
            .iter()
            .filter(|s| **s > STALENESS_BOUND)
            .count();
        let max_staleness = staleness_in.iter().max().copied().unwrap_or_default();
        let stale_examples = inside
            .iter()
            .filter(|(i, _)| stale[*i] > STALENESS_BOUND)
            .take(5)
            .map(|(i, e)| {
                (
                    e.key.clone(),
                    e.version.unwrap_or(0),
                    ms(stale[*i]),
                    e.instance,
                )
            })
            .collect();
        let writes_cut_off = inside
            .iter()
            .filter(|(_, e)| e.kind == Kind::Write && e.outcome == "ok")
            .filter(|(_, e)| {
                window
                    .expect
                    .cut_off
                    .is_some_and(|slot| e.instance == Some(slot))
                    && e.sent + e.latency < window.fault_end
            })
            .count();
        let reads_before_heard = inside
            .iter()
            .filter(|(i, _)| stale_as_acknowledged[*i] > stale[*i])
            .count();
        let keys: HashSet<&str> = critical.iter().map(|e| e.key.as_str()).collect();
        let duplicate_executions = keys
            .iter()
            .filter(|k| executions.get(**k).is_some_and(|orders| orders.len() > 1))
            .count();
        let different_outcomes = keys
            .iter()
            .filter(|k| {
                orders_by_key
                    .get(**k)
                    .is_some_and(|orders| orders.len() > 1)
            })
            .count();
        let flushes_per_instance = window.flushes.clone();
        let delta = |key: &String| {
            window.loads_after.get(key).copied().unwrap_or(0)
                - window.loads_before.get(key).copied().unwrap_or(0)
        };
        let loads_hot = window
            .loads_after
            .keys()
            .filter(|k| k.starts_with("hot-"))
            .map(delta)
            .sum();
        let per_key = |prefix: &str| {
            let loads: Vec<u64> = window
                .loads_after
                .keys()
                .filter(|k| k.starts_with(prefix))
                .map(delta)
                .filter(|n| *n > 0)
                .collect();
            (!loads.is_empty()).then(|| loads.iter().sum::<u64>() as f64 / loads.len() as f64)
        };
        let loads_per_cold_key = per_key("cold-plain-").zip(per_key("cold-locked-"));
        // A product written so far is loaded again by design (a write removes it from the
        // cache); a product never written that is loaded again was hidden in L2.
        let written: HashSet<&str> = events
            .iter()
            .filter(|e| e.kind == Kind::Write && e.sent < window.end)
            .map(|e| e.key.as_str())
            .collect();
        let mut reloaded: Vec<(&str, u64)> = window
            .reloads_after
            .iter()
            .filter(|(k, _)| !written.contains(k.as_str()))
            .map(|(k, after)| {
                let before = window.reloads_before.get(k).copied().unwrap_or(0);
                (k.as_str(), after - before)
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        reloaded.sort_unstable();
        let reloads = reloaded.iter().map(|(_, n)| n).sum();
        let (hits, misses) = window.l2;
        let l2_hit_ratio = (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64);
        let hot_tenant_orders = keys
            .iter()
            .filter(|k| k.starts_with(&format!("{HOT_TENANT}.")))
            .filter(|k| executions.contains_key(**k))
            .count();
        let span = (window.end - window.start).as_secs_f64();
        let hot_tenant_allowed = HOT_TENANT_QUOTA.0 * span + HOT_TENANT_QUOTA.1;
        let recovery_s = recovery(events, window.fault_end, window.end);

        let mut broken = Vec::new();
        // The stand-in database knows every product: "missing" is the cache losing a value.
        let count = |outcome: &str| outcomes.get(outcome).copied().unwrap_or(0);
        let caused_by_shared_state: usize = ["cache", "rate_store", "missing"]
            .into_iter()
            .map(count)
            .sum();
        if caused_by_shared_state > 0 {
            broken.push(format!(
                "{caused_by_shared_state} caller errors caused by L2, the bus or the rate store"
            ));
        }
        // Nothing the schedule did explains these (a stopped or killed instance's requests
        // are `unreachable`): a read blocked on Redis past its timeouts, or a handler that
        // panicked, fails its caller as surely as an error does.
        let (hung, dropped) = (count(HUNG), count(DROPPED));
        let unanswered = hung + dropped;
        if unanswered > 0 {
            broken.push(format!(
                "{unanswered} requests to an instance that was up got no answer ({hung} hung past {ANSWER_TIMEOUT:?}, {dropped} lost their connection)"
            ));
        }
        if duplicate_executions > 0 || different_outcomes > 0 {
            broken.push(format!(
                "idempotency: {duplicate_executions} duplicate executions, {different_outcomes} keys with different outcomes"
            ));
        }
        if stale_reads > 0 {
            broken.push(format!(
                "{stale_reads} reads staler than {STALENESS_BOUND:?} (max {:.0} ms)",
                ms(max_staleness)
            ));
        }
        if hot_tenant_orders as f64 > hot_tenant_allowed {
            broken.push(format!(
                "rate limit: {hot_tenant_orders} orders of {HOT_TENANT} against {hot_tenant_allowed:.0} allowed"
            ));
        }
        let expect = window.expect;
        if let Some(max) = expect.max_flushes {
            for (instance, count) in flushes_per_instance.iter().enumerate() {
                if Some(instance) == expect.spared {
                    continue;
                }
                match count {
                    Some(count) if *count > max => broken.push(format!(
                        "instance {instance} flushed L1 {count} times (at most {max})"
                    )),
                    // A count that could not be read is no proof that the promise held.
                    None => broken.push(format!("instance {instance}: L1 flushes unknown")),
                    Some(_) => {}
                }
            }
        }
        if let Some(max) = expect.max_locked_loads_per_key {
            match loads_per_cold_key {
                None => broken.push(
                    "single flight unknown: no loads of products read at once by every instance"
                        .to_owned(),
                ),
                Some((_, locked)) if locked > max => broken.push(format!(
                    "single flight: {locked:.2} loads per product across the fleet (at most {max})"
                )),
                Some(_) => {}
            }
        }
        let overflow_flushes = window.flush_reasons.get("overflow").copied().unwrap_or(0);
        if expect.overflowed && overflow_flushes == 0 {
            broken.push(
                "no instance flushed for an overflowed outbox: the window did not reach that path"
                    .to_owned(),
            );
        }
        if expect.no_reloads && reloads > 0 {
            let named: Vec<String> = reloaded
                .iter()
                .take(5)
                .map(|(k, _)| match window.last_reloads.get(*k) {
                    Some(how) => format!(
                        "{k} decided {:.0} ms after the first answer, queued {:.0} ms",
                        ms(how.decided_after),
                        ms(how.queued)
                    ),
                    None => (*k).to_owned(),
                })
                .collect();
            broken.push(format!(
                "{} products loaded again ({reloads} loads), as if hidden in L2: {}",
                reloaded.len(),
                named.join("; ")
            ));
        }
        if let Some(within) = expect.recovery_within
            && recovery_s.is_none_or(|s| s > within as f64)
        {
            broken.push(format!(
                "goodput not back within 5 % of offered in {within} s"
            ));
        }
        if let Some(min) = expect.critical_success {
            if critical.is_empty() {
                broken.push("critical success unknown: no checkouts in the window".to_owned());
            } else if critical_success < min {
                broken.push(format!(
                    "critical success {:.1} % (at least {:.0} %)",
                    critical_success * 100.0,
                    min * 100.0
                ));
            }
        }
        if let Some(within) = expect.l1_back_within
            && window.l1_back_after.is_none_or(|s| s > within)
        {
            broken.push(format!("L1 not in use on every instance within {within} s"));
        }
        reports.push(WindowReport {
            name: window.name.clone(),
            start_s: window.start.as_secs_f64(),
            end_s: window.end.as_secs_f64(),
            requests: inside.len(),
            outcomes,
            goodput: if inside.is_empty() {
                1.0
            } else {
                good as f64 / inside.len() as f64
            },
            p50_ms: percentile(&latencies, 0.50),
            p99_ms: percentile(&latencies, 0.99),
            p99_good_ms: percentile(&good_latencies, 0.99),
            critical_success,
            unanswered,
            stale_reads,
            max_staleness_ms: ms(max_staleness),
            stale_examples,
            duplicate_executions,
            different_outcomes,
            writes_cut_off,
            reads_before_heard,
            flushes_per_instance,
            flush_reasons: window.flush_reasons.clone(),
            loads_hot,
            reloads,
            loads_per_cold_key,
            l2_hit_ratio,
            hot_tenant_orders,
            hot_tenant_allowed,
            recovery_s,
            l1_back_s: window.l1_back_after,
            broken,
        });
    }
    let duplicates = executions
        .values()
        .filter(|orders| orders.len() > 1)
        .count();
    let mut broken: Vec<String> = reports
        .iter()
        .flat_map(|w| w.broken.iter().map(move |b| format!("{}: {b}", w.name)))
        .collect();
    if duplicates > 0 {
        broken.push(format!(
            "run: {duplicates} idempotency keys executed more than once"
        ));
    }
    Report {
        windows: reports,
        timeline: timeline(events, &stale),
        executions: ExecutionFigures {
            keys: executions.len(),
            duplicate_executions: duplicates,
        },
        broken,
    }
}

/// Seconds from `from` until the first whole second in which at least 95 % of the requests
/// sent got a good answer; `None` if that never happens before `until`.
fn recovery(events: &[Event], from: Duration, until: Duration) -> Option<f64> {
    let mut second = from;
    while second + Duration::from_secs(1) <= until {
        let next = second + Duration::from_secs(1);
        let sent: Vec<&Event> = events
            .iter()
            .filter(|e| e.sent >= second && e.sent < next)
            .collect();
        let good = sent.iter().filter(|e| e.is_good()).count();
        if !sent.is_empty() && good as f64 >= 0.95 * sent.len() as f64 {
            return Some((second - from).as_secs_f64());
        }
        second = next;
    }
    None
}

fn timeline(events: &[Event], stale: &[Duration]) -> Vec<Second> {
    let seconds = events
        .iter()
        .map(|e| e.sent.as_secs() as usize + 1)
        .max()
        .unwrap_or(0);
    let mut latencies: Vec<Vec<f64>> = vec![Vec::new(); seconds];
    let mut timeline = vec![Second::default(); seconds];
    for (event, staleness) in events.iter().zip(stale) {
        let second = event.sent.as_secs() as usize;
        let entry = &mut timeline[second];
        entry.offered += 1;
        entry.good += usize::from(event.is_good());
        entry.max_staleness_ms = entry.max_staleness_ms.max(ms(*staleness));
        latencies[second].push(ms(event.latency));
    }
    for (entry, mut second) in timeline.iter_mut().zip(latencies) {
        second.sort_by(f64::total_cmp);
        entry.p99_ms = percentile(&second, 0.99);
    }
    timeline
}

/// The report as text: one table per window, then the broken promises.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    for w in &report.windows {
        out.push_str(&format!(
            "\n== {} ({:.1}-{:.1} s)\n  requests {:>6}  goodput {:>5.1} %  p50 {:>6.1} ms  p99 {:>7.1} ms  p99 good {:>7.1} ms\n  outcomes {:?}\n  critical success {:.1} %  unanswered {}  stale reads {}  max staleness {:.0} ms\n  duplicates {}  different outcomes {}  orders of {HOT_TENANT} {} (allowed {:.0})\n  L1 flushes per instance {:?} by reason {:?}\n  loads of hot products {}  reloads {}  L2 hit ratio {}\n  recovery {}  L1 back {}  loads per cold product (plain, single flight) {}\n",
            w.name,
            w.start_s,
            w.end_s,
            w.requests,
            w.goodput * 100.0,
            w.p50_ms,
            w.p99_ms,
            w.p99_good_ms,
            w.outcomes,
            w.critical_success * 100.0,
            w.unanswered,
            w.stale_reads,
            w.max_staleness_ms,
            w.duplicate_executions,
            w.different_outcomes,
            w.hot_tenant_orders,
            w.hot_tenant_allowed,
            w.flushes_per_instance,
            w.flush_reasons,
            w.loads_hot,
            w.reloads,
            w.l2_hit_ratio.map_or("-".to_owned(), |r| format!("{:.1} %", r * 100.0)),
            w.recovery_s.map_or("-".to_owned(), |s| format!("{s:.0} s")),
            w.l1_back_s.map_or("-".to_owned(), |s| format!("{s:.1} s")),
            w.loads_per_cold_key
                .map_or("-".to_owned(), |(plain, locked)| format!("{plain:.2}, {locked:.2}")),
        ));
        if w.writes_cut_off > 0 {
            out.push_str(&format!(
                "  writes acknowledged while cut off {}  reads of the version before them until heard {}\n",
                w.writes_cut_off, w.reads_before_heard
            ));
        }
        for (key, version, staleness, instance) in &w.stale_examples {
            out.push_str(&format!(
                "  stale: {key} v{version} served {staleness:.0} ms late by instance {instance:?}\n"
            ));
        }
        for broken in &w.broken {
            out.push_str(&format!("  BROKEN: {broken}\n"));
        }
    }
    out.push_str(&format!(
        "\nidempotency keys {}  executed more than once {}\n",
        report.executions.keys, report.executions.duplicate_executions
    ));
    if report.broken.is_empty() {
        out.push_str("every promise held\n");
    } else {
        out.push_str(&format!("{} promises broken\n", report.broken.len()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: Kind, at_ms: u64, version: u64, instance: usize) -> Event {
        Event {
            sent: Duration::from_millis(at_ms),
            latency: Duration::from_millis(1),
            kind,
            outcome: "ok".to_owned(),
            key: "hot-0".to_owned(),
            version: Some(version),
            order: None,
            instance: Some(instance),
        }
    }

    fn cut_window(instance: usize, from_ms: u64, to_ms: u64) -> Window {
        Window {
            name: "cut".to_owned(),
            start: Duration::from_millis(from_ms),
            end: Duration::from_millis(to_ms + 5_000),
            fault_end: Duration::from_millis(to_ms),
            flushes: Vec::new(),
            flush_reasons: BTreeMap::new(),
            l2: (0, 0),
            loads_before: HashMap::new(),
            loads_after: HashMap::new(),
            reloads_before: HashMap::new(),
            reloads_after: HashMap::new(),
            last_reloads: HashMap::new(),
            l1_back_after: None,
            expect: Expect {
                cut_off: Some(instance),
                ..Expect::default()
            },
        }
    }

    #[test]
    fn a_read_is_as_stale_as_the_time_since_a_newer_version_was_acknowledged() {
        let events = [
            event(Kind::Write, 1_000, 2, 1),
            event(Kind::Read, 500, 1, 0),
            event(Kind::Read, 3_001, 1, 0),
            event(Kind::Read, 3_001, 2, 0),
        ];
        let stale = staleness(&events, &[]);
        assert_eq!(
            stale,
            [
                Duration::ZERO,
                Duration::ZERO,
                Duration::from_secs(2),
                Duration::ZERO
            ]
        );
    }

    /// The writer itself hears its write at once, cut off or not: it never serves the
    /// version before it again (its pending delete, `docs/cache.md`).
    #[test]
    fn the_cut_instance_reading_the_version_before_its_own_write_is_stale() {
        let events = [
            event(Kind::Write, 1_000, 2, 2),
            event(Kind::Read, 3_600, 1, 2),
            event(Kind::Read, 3_600, 1, 0),
        ];
        let stale = staleness(&events, &[cut_window(2, 500, 4_000)]);
        assert_eq!(
            stale,
            [Duration::ZERO, Duration::from_millis(2_599), Duration::ZERO]
        );
    }

    /// A window whose fault was to overflow an outbox, and in which nobody flushed for one,
    /// judged nothing of that path: broken.
    #[test]
    fn a_burst_that_never_overflowed_breaks_its_window() {
        let mut window = cut_window(0, 0, 1_000);
        window.expect = Expect {
            overflowed: true,
            ..Expect::default()
        };
        let events = [event(Kind::Read, 100, 1, 0)];
        let report = judge(&events, std::slice::from_ref(&window), &HashMap::new());
        let broken = &report.windows[0].broken;
        assert!(broken.iter().any(|b| b.contains("overflow")), "{broken:?}");
        window.flush_reasons.insert("overflow".to_owned(), 5);
        let report = judge(&events, &[window], &HashMap::new());
        assert!(
            report.windows[0].broken.is_empty(),
            "{:?}",
            report.windows[0].broken
        );
    }

    /// The stand-in database knows every product: a read answered "missing" is the cache
    /// losing a value, a caller error.
    #[test]
    fn a_product_the_cache_answers_missing_breaks_the_window() {
        let window = cut_window(0, 0, 1_000);
        let mut missing = event(Kind::Read, 100, 1, 0);
        missing.outcome = "missing".to_owned();
        let report = judge(&[missing], &[window], &HashMap::new());
        let broken = &report.windows[0].broken;
        assert!(
            broken.iter().any(|b| b.contains("caller errors")),
            "{broken:?}"
        );
    }

    fn baseline() -> Window {
        let mut window = cut_window(0, 0, 10_000);
        window.name = "baseline".to_owned();
        window.flushes = vec![Some(0); 6];
        window.expect = Expect {
            max_flushes: Some(0),
            no_reloads: true,
            ..Expect::default()
        };
        window
    }

    /// A request to an instance that was up throughout and never answered (a hang past the
    /// client's timeout, or a connection lost to a panicking handler) failed its caller.
    #[test]
    fn a_request_an_up_instance_never_answered_breaks_the_window() {
        for outcome in [HUNG, DROPPED] {
            let mut unanswered = event(Kind::Read, 100, 1, 0);
            unanswered.outcome = outcome.to_owned();
            unanswered.version = None;
            unanswered.latency = Duration::from_secs(5);
            let report = judge(&[unanswered], &[baseline()], &HashMap::new());
            let window = &report.windows[0];
            assert!(
                window.broken.iter().any(|b| b.contains("no answer")),
                "{outcome}: {:?}",
                window.broken
            );
            let json = serde_json::to_value(&report).unwrap();
            assert_eq!(json["windows"][0]["unanswered"], 1, "{outcome}");
            assert!(render(&report).contains("unanswered 1"), "{outcome}");
        }
    }

    /// A request cut off by the schedule stopping or killing its instance breaks nothing.
    #[test]
    fn a_request_to_an_instance_the_schedule_took_down_breaks_nothing() {
        let mut down = event(Kind::Read, 100, 1, 0);
        down.outcome = crate::load::UNREACHABLE.to_owned();
        down.version = None;
        let report = judge(&[down], &[baseline()], &HashMap::new());
        assert!(
            report.windows[0].broken.is_empty(),
            "{:?}",
            report.windows[0].broken
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["windows"][0]["unanswered"], 0);
    }

    #[test]
    fn a_write_acknowledged_while_its_instance_was_cut_off_counts_from_the_end_of_the_cut() {
        let events = [
            // Acknowledged by the cut instance at 1,001 ms, inside the cut (500 to 4,000 ms).
            event(Kind::Write, 1_000, 2, 2),
            event(Kind::Read, 3_001, 1, 0),
            event(Kind::Read, 6_000, 1, 0),
        ];
        let stale = staleness(&events, &[cut_window(2, 500, 4_000)]);
        assert_eq!(
            stale,
            [Duration::ZERO, Duration::ZERO, Duration::from_secs(2)]
        );
    }

    /// A promise whose figures were never measured is broken, not kept: a window expecting
    /// checkouts or single-flight loads that saw none says so.
    #[test]
    fn promises_with_nothing_measured_are_broken() {
        let mut window = cut_window(0, 0, 1_000);
        window.expect = Expect {
            critical_success: Some(0.99),
            max_locked_loads_per_key: Some(1.5),
            ..Expect::default()
        };
        let events = [event(Kind::Read, 100, 1, 0)];
        let report = judge(&events, &[window], &HashMap::new());
        let broken = &report.windows[0].broken;
        assert!(broken.iter().any(|b| b.contains("checkouts")), "{broken:?}");
        assert!(
            broken.iter().any(|b| b.contains("single flight")),
            "{broken:?}"
        );
    }
}
