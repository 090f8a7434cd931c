//! An SLO's page signal drives a load shedder: while the error budget burns fast, sheddable
//! work is refused; once the burn stops, it is admitted again.

use std::time::Duration;

use headroom::limit::{Bulkhead, LoadShedder, Priority, Reason};
use headroom::slo::{Objective, ObjectiveConfig, Severity};
use headroom_core::ManualClock;

#[test]
fn sheddable_work_is_refused_while_the_budget_burns_fast() {
    let time = ManualClock::new();
    let checkout = Objective::with_clock(
        ObjectiveConfig::availability("checkout", 0.999),
        time.clock(),
    )
    .unwrap();
    let shedder = LoadShedder::builder(Bulkhead::builder("checkout").build().unwrap())
        .shed_while(
            checkout.signal(Severity::Page).unwrap(),
            Priority::Sheddable,
        )
        .build()
        .unwrap();
    let minute = |bad: u64| {
        for request in 0..100 {
            checkout.record(request >= bad);
        }
        time.advance(Duration::from_secs(60));
    };
    // Seven good hours, so that only a fast burn can page.
    for _ in 0..420 {
        minute(0);
    }
    assert!(shedder.check(Priority::Sheddable).is_ok());
    // Half the requests fail: within minutes the hour's and the 5 minutes' burn pass 14.4.
    let mut minutes_to_shed = 0;
    while shedder.check(Priority::Sheddable).is_ok() {
        minute(50);
        minutes_to_shed += 1;
        assert!(minutes_to_shed <= 5, "still admitting sheddable work");
    }
    let refused = shedder.check(Priority::Sheddable).unwrap_err();
    assert_eq!(refused.reason(), Reason::Signal);
    assert!(
        shedder.check(Priority::Default).is_ok(),
        "only sheddable work goes"
    );
    // The failures stop: once the 5-minute window is clean the page, and the shedding, end.
    for _ in 0..6 {
        minute(0);
    }
    assert!(shedder.check(Priority::Sheddable).is_ok());
}
