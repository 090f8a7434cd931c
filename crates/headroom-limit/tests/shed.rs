//! Load shedding by priority: under overload the least important work goes first.

use std::sync::Arc;
use std::time::Duration;

use headroom_core::{Classify, Signal};
use headroom_limit::{Bulkhead, LoadShedConfig, LoadShedder, Priority, Reason};
use parking_lot::Mutex;

#[derive(Default, Debug)]
struct Tally {
    offered: [usize; 3],
    completed: [usize; 3],
    refused_by_shedder: [usize; 3],
    refused_by_bulkhead: [usize; 3],
}

fn slot(priority: Priority) -> usize {
    Priority::ALL
        .iter()
        .position(|p| *p == priority)
        .expect("known")
}

/// Offered load three times the capacity of 10 workers × 10 ms: 1.5× sheddable, 1.2×
/// default and 0.3× critical.
#[tokio::test(start_paused = true)]
async fn sheddable_work_is_refused_before_critical_work_is_touched() {
    let bulkhead = Bulkhead::builder("api")
        .max_concurrent(10)
        .max_queued(10)
        .max_wait(Duration::from_millis(50))
        .build()
        .expect("valid bulkhead");
    let shedder = LoadShedder::builder(bulkhead.clone())
        .shed_at(Priority::Sheddable, 0.5)
        .shed_at(Priority::Default, 0.75)
        .build()
        .expect("valid shedder");
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut rng = fastrand::Rng::with_seed(11);
    let mut due = [0.0_f64; 3];
    let rates = [0.3, 1.2, 1.5];
    let mut tasks = Vec::new();
    for _ in 0..2_000 {
        for priority in Priority::ALL {
            due[slot(priority)] += rates[slot(priority)];
            while due[slot(priority)] >= 1.0 {
                due[slot(priority)] -= 1.0;
                tally.lock().offered[slot(priority)] += 1;
                let (shedder, tally) = (shedder.clone(), Arc::clone(&tally));
                let work = Duration::from_millis(rng.u64(8..=12));
                tasks.push(tokio::spawn(async move {
                    match shedder.acquire(priority).await {
                        Ok(_permit) => {
                            tokio::time::sleep(work).await;
                            tally.lock().completed[slot(priority)] += 1;
                        }
                        Err(refused) => {
                            assert!(refused.is_rejected() && refused.is_retryable());
                            assert_eq!(refused.priority(), priority);
                            let mut tally = tally.lock();
                            match refused.reason() {
                                Reason::InFlight => tally.refused_by_shedder[slot(priority)] += 1,
                                _ => tally.refused_by_bulkhead[slot(priority)] += 1,
                            }
                        }
                    }
                }));
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for task in tasks {
        task.await.expect("request task");
    }
    let tally = tally.lock();
    println!("{tally:?}");
    let [critical, default, sheddable] = [0, 1, 2];
    assert_eq!(
        tally.completed[critical], tally.offered[critical],
        "critical untouched"
    );
    assert!(tally.refused_by_shedder[sheddable] > 0);
    let refused_share = |i: usize| {
        (tally.refused_by_shedder[i] + tally.refused_by_bulkhead[i]) as f64
            / tally.offered[i] as f64
    };
    assert!(refused_share(sheddable) > refused_share(default));
    assert!(
        refused_share(sheddable) > 0.9,
        "sheddable is shed first and most"
    );
    let total: usize = tally.completed.iter().sum();
    assert!(
        total as f64 >= 0.9 * 2_000.0,
        "capacity stays in use: {total}"
    );
    // Counted by priority and reason.
    for priority in Priority::ALL {
        assert_eq!(
            shedder.rejected(priority, Reason::InFlight) as usize,
            tally.refused_by_shedder[slot(priority)]
        );
    }
}

#[tokio::test(start_paused = true)]
async fn queue_delay_signal_sheds_low_priority_work() {
    let bulkhead = Bulkhead::builder("slow")
        .max_concurrent(1)
        .max_queued(100)
        .max_wait(Duration::from_secs(1))
        .build()
        .unwrap();
    let shedder = LoadShedder::builder(bulkhead.clone())
        .shed_at(Priority::Sheddable, 1.0)
        .shed_at(Priority::Default, 1.0)
        .queue_delay_target(Duration::from_millis(20))
        .build()
        .unwrap();
    let held = bulkhead.acquire().await.unwrap();
    let waiter = tokio::spawn({
        let shedder = shedder.clone();
        async move { shedder.acquire(Priority::Default).await.map(drop) }
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    drop(held);
    waiter.await.unwrap().unwrap();
    assert!(bulkhead.queue_delay() >= Duration::from_millis(30));
    assert_eq!(
        shedder.check(Priority::Sheddable).unwrap_err().reason(),
        Reason::QueueDelay
    );
}

/// An overload long enough to shut every priority, then no traffic gets through the shedder
/// at all: the signal must fade by itself, since no admission will ever reset it.
///
/// The documented rule: the queue-delay load is `delay / target`, fading linearly to zero over
/// `queue_delay_decay` after the wait ended, and a priority is refused while the load reaches
/// its threshold. So each priority comes back once the wait is `decay × (1 − threshold ×
/// target / delay)` old: the lower its threshold, the later, and sheddable work last.
#[tokio::test(start_paused = true)]
async fn queue_delay_signal_fades_once_overload_ends() {
    let (decay, target) = (Duration::from_secs(1), Duration::from_millis(20));
    let bulkhead = Bulkhead::builder("latch")
        .max_concurrent(1)
        .max_queued(100)
        .max_wait(Duration::from_secs(1))
        .build()
        .unwrap();
    let shedder = LoadShedder::builder(bulkhead.clone())
        .shed_at(Priority::Sheddable, 0.5)
        .shed_at(Priority::Default, 0.75)
        .queue_delay_target(target)
        .queue_delay_decay(decay)
        .build()
        .unwrap();
    // One caller waits 100 ms (5x the target) behind a slow one: every priority is shed.
    let held = shedder
        .acquire(Priority::Critical)
        .await
        .unwrap()
        .into_owned();
    let waiter = tokio::spawn({
        let shedder = shedder.clone();
        async move { shedder.acquire(Priority::Critical).await.map(drop) }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(held);
    waiter.await.unwrap().unwrap();
    let delay = bulkhead.queue_delay();
    assert!(delay >= 5 * target, "a wait of {delay:?}");
    for priority in Priority::ALL {
        assert_eq!(
            shedder.check(priority).unwrap_err().reason(),
            Reason::QueueDelay
        );
    }
    // The overload is over and the bulkhead idle; callers only ever meet the shedder. Steps
    // of a 64th of the window, so that no priority's return falls on a step's edge.
    let step = decay / 64;
    let mut admitted_after: [Option<Duration>; 3] = [None; 3];
    for n in 1..=64 {
        tokio::time::advance(step).await;
        for priority in Priority::ALL {
            if admitted_after[slot(priority)].is_none() && shedder.check(priority).is_ok() {
                admitted_after[slot(priority)] = Some(step * n);
            }
        }
    }
    let config = shedder.config();
    let [critical, default, sheddable] = [
        (Priority::Critical, config.critical_at),
        (Priority::Default, config.default_at),
        (Priority::Sheddable, config.sheddable_at),
    ]
    .map(|(priority, threshold)| {
        let after = admitted_after[slot(priority)]
            .unwrap_or_else(|| panic!("{priority} not admitted within the decay window"));
        // The first step past the wait's age at which the faded load drops below the threshold.
        let expected =
            decay.mul_f64(1.0 - threshold * target.as_secs_f64() / delay.as_secs_f64());
        assert!(
            expected < after && after <= expected + step,
            "{priority} admitted {after:?} after the overload, expected within a step of {expected:?}"
        );
        after
    });
    assert!(
        critical <= default && default <= sheddable && critical < sheddable,
        "back in order of importance: critical {critical:?}, default {default:?}, sheddable {sheddable:?}"
    );
    assert!(sheddable <= decay, "everything admitted within the window");
}

#[tokio::test]
async fn adaptive_bulkhead_reports_the_adaptive_limit_as_reason() {
    use headroom_limit::adaptive::{AdaptiveConfig, AimdConfig};
    let bulkhead = Bulkhead::builder("adaptive")
        .adaptive(AdaptiveConfig::Aimd(AimdConfig {
            initial_limit: 2,
            ..AimdConfig::default()
        }))
        .build()
        .unwrap();
    let shedder = LoadShedder::builder(bulkhead.clone()).build().unwrap();
    let _a = shedder.acquire(Priority::Critical).await.unwrap();
    let _b = shedder.acquire(Priority::Critical).await.unwrap();
    let refused = shedder.check(Priority::Default).unwrap_err();
    assert_eq!(refused.reason(), Reason::AdaptiveLimit);
}

/// A bulkhead of an adaptive limit that an outage drove down, then used only by work shed at
/// 0.4 of the limit: that work alone never holds half of it, which an idle service would look
/// like, but the demand refused for it is demand the limit did not meet, so the limit climbs
/// back to what full use had shown (here, of a service as fast at any load) rather than staying
/// where the outage left it, shedding nearly everything.
#[tokio::test(start_paused = true)]
async fn an_adaptive_limit_an_outage_drove_down_grows_back_with_the_refused_demand() {
    use headroom_limit::adaptive::{AdaptiveConfig, AimdConfig, GradientConfig, Outcome};
    for config in [
        AdaptiveConfig::Gradient(GradientConfig {
            initial_limit: 4,
            ..GradientConfig::default()
        }),
        AdaptiveConfig::Aimd(AimdConfig {
            initial_limit: 10,
            ..AimdConfig::default()
        }),
    ] {
        let bulkhead = Bulkhead::builder("batch")
            .adaptive(config.clone())
            .build()
            .unwrap();
        let shedder = LoadShedder::builder(bulkhead.clone())
            .shed_at(Priority::Sheddable, 0.4)
            .build()
            .unwrap();
        let answering = |outcome| {
            move || async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                outcome
            }
        };
        let seconds = Duration::from_secs;
        // A gradient limit drops for a while at each probe of the no-load round trip: the
        // highest limit over the last second is the limit outside probes.
        let highest_over_a_second = || async {
            let mut highest = 0;
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                highest = highest.max(bulkhead.limit());
            }
            highest
        };
        let (_, full) = tokio::join!(
            drive(
                &shedder,
                Priority::Critical,
                50,
                seconds(10),
                answering(Outcome::Success),
            ),
            async {
                tokio::time::sleep(seconds(9)).await;
                highest_over_a_second().await
            }
        );
        drive(
            &shedder,
            Priority::Critical,
            50,
            seconds(2),
            answering(Outcome::Dropped),
        )
        .await;
        let down = bulkhead.limit();
        assert!(
            down * 4 < full,
            "{config:?}: the outage left {down} of {full}"
        );
        let (_, back) = tokio::join!(
            drive(
                &shedder,
                Priority::Sheddable,
                50,
                seconds(30),
                answering(Outcome::Success),
            ),
            async {
                tokio::time::sleep(seconds(29)).await;
                highest_over_a_second().await
            }
        );
        assert!(
            back * 4 >= full * 3,
            "{config:?}: the limit came back to {back} of {full} (from {down})"
        );
    }
}

/// Runs `callers` closed-loop callers of `priority` through `shedder` for `duration`, each
/// request served by `service`, whose answer is the outcome its permit reports.
async fn drive<F, Fut>(
    shedder: &LoadShedder,
    priority: Priority,
    callers: usize,
    duration: Duration,
    service: F,
) where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = headroom_limit::adaptive::Outcome> + Send,
{
    let until = tokio::time::Instant::now() + duration;
    let callers: Vec<_> = (0..callers)
        .map(|_| {
            let (shedder, service) = (shedder.clone(), service.clone());
            tokio::spawn(async move {
                while tokio::time::Instant::now() < until {
                    match shedder.acquire(priority).await {
                        Ok(mut permit) => permit.set_outcome(service().await),
                        Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
}

/// Work of a priority shed at 0.4 of the limit, alone on a service of 10 workers taking
/// 10 ms each, cannot show that service at full use: the demand refused for it does not grow
/// the gradient limit past where the documentation says it settles on that service
/// (`rtt_tolerance × capacity` plus a queue allowance of `√limit`), which would let the shed
/// work alone fill the service and leave no room for the work the rest is kept for.
#[tokio::test(start_paused = true)]
async fn demand_refused_for_a_shed_priority_does_not_grow_the_limit_past_the_service() {
    use headroom_limit::adaptive::{AdaptiveConfig, GradientConfig};
    let config = GradientConfig::default();
    let bulkhead = Bulkhead::builder("batch")
        .adaptive(AdaptiveConfig::Gradient(config.clone()))
        .build()
        .unwrap();
    let shedder = LoadShedder::builder(bulkhead.clone())
        .shed_at(Priority::Sheddable, 0.4)
        .build()
        .unwrap();
    let workers = Arc::new(tokio::sync::Semaphore::new(10));
    let service = move || {
        let workers = Arc::clone(&workers);
        async move {
            let _worker = workers.acquire().await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
            headroom_limit::adaptive::Outcome::Success
        }
    };
    drive(
        &shedder,
        Priority::Sheddable,
        50,
        Duration::from_secs(30),
        service,
    )
    .await;
    let settled = config.rtt_tolerance * 10.0;
    let top = settled + 2.0 * settled.sqrt() + 2.0;
    assert!(
        bulkhead.limit() as f64 <= top,
        "the limit grew to {} (the band tops at {top:.1})",
        bulkhead.limit()
    );
}

/// While a signal given to the shedder is raised, the priorities it names are refused with
/// `Reason::Signal` on an idle bulkhead; the others, and everyone once it is lowered, get in.
#[test]
fn a_raised_signal_sheds_the_priorities_it_names_and_only_while_raised() {
    let burning = Signal::new("checkout page burn");
    let bulkhead = Bulkhead::builder("signal")
        .max_concurrent(10)
        .build()
        .unwrap();
    let shedder = LoadShedder::builder(bulkhead)
        .shed_while(burning.clone(), Priority::Default)
        .build()
        .unwrap();
    let admitted = || Priority::ALL.map(|priority| shedder.check(priority).is_ok());
    assert_eq!(admitted(), [true, true, true]);
    burning.set(true);
    assert_eq!(admitted(), [true, false, false]);
    let refused = shedder.check(Priority::Sheddable).unwrap_err();
    assert_eq!(refused.reason(), Reason::Signal);
    assert_eq!(shedder.rejected(Priority::Default, Reason::Signal), 1);
    burning.set(false);
    assert_eq!(admitted(), [true, true, true]);
}

/// New thresholds apply from the next check; invalid ones are refused and the old stay.
#[tokio::test]
async fn reconfigured_thresholds_apply_to_the_next_check() {
    let bulkhead = Bulkhead::builder("resized")
        .max_concurrent(10)
        .build()
        .unwrap();
    let shedder = LoadShedder::builder(bulkhead).build().unwrap();
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(shedder.acquire(Priority::Critical).await.unwrap());
    }
    assert!(shedder.check(Priority::Sheddable).is_ok(), "60 % < 70 %");
    let stricter = LoadShedConfig {
        sheddable_at: 0.5,
        ..shedder.config()
    };
    shedder.reconfigure(stricter.clone()).unwrap();
    assert_eq!(
        shedder.check(Priority::Sheddable).unwrap_err().reason(),
        Reason::InFlight
    );
    let invalid = LoadShedConfig {
        sheddable_at: 0.95,
        ..stricter.clone()
    };
    assert!(shedder.reconfigure(invalid).is_err());
    assert_eq!(shedder.config(), stricter);
}

#[test]
fn thresholds_must_not_favour_less_important_work() {
    let bulkhead = Bulkhead::builder("b").build().unwrap();
    let err = LoadShedder::builder(bulkhead.clone())
        .config(LoadShedConfig {
            sheddable_at: 0.95,
            ..LoadShedConfig::default()
        })
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "default_at");
    let err = LoadShedder::builder(bulkhead)
        .shed_at(Priority::Critical, 1.5)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "critical_at");
}

/// A bulkhead whose queue is as long as a `usize` allows (configured as "no bound") leaves
/// the shedder working: an idle bulkhead admits every priority.
#[test]
fn a_bulkhead_with_the_longest_queue_admits_when_idle() {
    let bulkhead = Bulkhead::builder("unbounded-queue")
        .max_concurrent(10)
        .max_queued(usize::MAX)
        .build()
        .unwrap();
    let shedder = LoadShedder::builder(bulkhead).build().unwrap();
    assert!(Priority::ALL.iter().all(|&p| shedder.check(p).is_ok()));
}

/// A queue-delay target that no wait in the bulkhead can reach would never shed: with no
/// queue nobody waits, and a wait is at most `max_wait`, so a target above `max_wait` divided
/// by the lowest threshold never reaches it. Refused as configuration, at build and on
/// reconfigure; a target the waits can reach is taken.
#[test]
fn a_queue_delay_target_no_wait_can_reach_is_refused() {
    let ms = Duration::from_millis;
    let unqueued = Bulkhead::builder("unqueued")
        .max_concurrent(1)
        .build()
        .unwrap();
    let refused = LoadShedder::builder(unqueued)
        .queue_delay_target(ms(1))
        .build()
        .unwrap_err();
    assert_eq!(refused.field(), "queue_delay_target");
    let short = Bulkhead::builder("short")
        .max_concurrent(1)
        .max_queued(10)
        .max_wait(ms(5))
        .build()
        .unwrap();
    // The default lowest threshold is 0.7: a 20 ms target needs waits of 14 ms.
    let refused = LoadShedder::builder(short.clone())
        .queue_delay_target(ms(20))
        .build()
        .unwrap_err();
    assert_eq!(refused.field(), "queue_delay_target");
    let shedder = LoadShedder::builder(short)
        .queue_delay_target(ms(5))
        .build()
        .unwrap();
    let mut config = shedder.config();
    config.queue_delay_target = Some(ms(20));
    assert_eq!(
        shedder.reconfigure(config).unwrap_err().field(),
        "queue_delay_target"
    );
    assert_eq!(shedder.config().queue_delay_target, Some(ms(5)));
}
