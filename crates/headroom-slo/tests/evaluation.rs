//! An objective's evaluation against a table computed by hand, for a scripted series of
//! outcomes on a manual clock.

use std::time::Duration;

use headroom_core::ManualClock;
use headroom_slo::{Objective, ObjectiveConfig, Severity, SloStatus};

const MINUTE: u64 = 60;
const HOUR: u64 = 3600;

/// The default alerts' windows and the 30-day period, shortest first.
const WINDOWS: [u64; 8] = [
    5 * MINUTE,
    30 * MINUTE,
    HOUR,
    2 * HOUR,
    6 * HOUR,
    24 * HOUR,
    72 * HOUR,
    720 * HOUR,
];

/// One checkpoint: the time (hour and minute since the start), each window's requests, bad
/// requests and burn rate (in [`WINDOWS`] order), the page and ticket alerts, and the error
/// budget left.
struct Row {
    at: (u64, u64),
    windows: [(u64, u64, f64); 8],
    page: bool,
    ticket: bool,
    budget_remaining: f64,
}

/// Target 99.9 %: a budget of 0.1 %, so a window's burn rate is its bad share / 0.001.
///
/// Traffic: a batch of 1,000 requests at minute 40 of every hour, from hour 0 to hour 61.
/// Bad among them: none for two days (hours 0 to 47); 20 at hour 48 (2 %, a burn of 20);
/// none at 49 to 53; 8 at each of hours 54 to 59 (0.8 %, a burn of 8); none at 60 and 61.
fn bad_at(hour: u64) -> u64 {
    match hour {
        48 => 20,
        54..=59 => 8,
        _ => 0,
    }
}

fn table() -> Vec<Row> {
    vec![
        // Two good days. The 1-day window starts at 23:42: hours 24 to 47.
        Row {
            at: (47, 42),
            windows: [
                (1_000, 0, 0.0),
                (1_000, 0, 0.0),
                (1_000, 0, 0.0),
                (2_000, 0, 0.0),
                (6_000, 0, 0.0),
                (24_000, 0, 0.0),
                (48_000, 0, 0.0),
                (48_000, 0, 0.0),
            ],
            page: false,
            ticket: false,
            budget_remaining: 1.0,
        },
        // Hour 48 burns at 20 over 5 min and 1 h: above 14.4 on both, the page fires.
        // 2 h: 20 / 2,000 = 1 % -> 10. 6 h: 20 / 6,000 -> 3.333. 1 day (hours 25 to 48):
        // 20 / 24,000 -> 0.8333. 3 days and 30 days: 20 / 49,000 -> 0.40816, so the budget
        // left is 1 - 0.40816.
        Row {
            at: (48, 42),
            windows: [
                (1_000, 20, 20.0),
                (1_000, 20, 20.0),
                (1_000, 20, 20.0),
                (2_000, 20, 10.0),
                (6_000, 20, 3.333_333),
                (24_000, 20, 0.833_333),
                (49_000, 20, 0.408_163),
                (49_000, 20, 0.408_163),
            ],
            page: true,
            ticket: false,
            budget_remaining: 0.591_837,
        },
        // Ten minutes after the batch the 5-minute window is empty: the page stops, though
        // the hour still burns at 20.
        Row {
            at: (48, 50),
            windows: [
                (0, 0, 0.0),
                (1_000, 20, 20.0),
                (1_000, 20, 20.0),
                (2_000, 20, 10.0),
                (6_000, 20, 3.333_333),
                (24_000, 20, 0.833_333),
                (49_000, 20, 0.408_163),
                (49_000, 20, 0.408_163),
            ],
            page: false,
            ticket: false,
            budget_remaining: 0.591_837,
        },
        // Six hours at a burn of 8: under 14.4, but above 6 over 6 h and 30 min, so the
        // second page fires. 1 day (hours 36 to 59): 68 / 24,000 -> 2.8333, under the
        // ticket's 3. 3 days: 68 / 60,000 -> 1.1333 and 6 h at 8, both above 1: the ticket
        // fires. The budget is overspent: 1 - 1.1333.
        Row {
            at: (59, 42),
            windows: [
                (1_000, 8, 8.0),
                (1_000, 8, 8.0),
                (1_000, 8, 8.0),
                (2_000, 16, 8.0),
                (6_000, 48, 8.0),
                (24_000, 68, 2.833_333),
                (60_000, 68, 1.133_333),
                (60_000, 68, 1.133_333),
            ],
            page: true,
            ticket: true,
            budget_remaining: -0.133_333,
        },
        // Two good hours later: 6 h (hours 56 to 61) holds 32 bad -> 5.333, under 6, and the
        // 30 minutes are clean: no page. 3 days: 68 / 62,000 -> 1.0968, still above 1 with
        // 6 h at 5.333: the ticket keeps firing, as a slow burn should.
        Row {
            at: (61, 42),
            windows: [
                (1_000, 0, 0.0),
                (1_000, 0, 0.0),
                (1_000, 0, 0.0),
                (2_000, 0, 0.0),
                (6_000, 32, 5.333_333),
                (24_000, 68, 2.833_333),
                (62_000, 68, 1.096_774),
                (62_000, 68, 1.096_774),
            ],
            page: false,
            ticket: true,
            budget_remaining: -0.096_774,
        },
    ]
}

fn close(actual: f64, expected: f64) -> bool {
    (actual - expected).abs() < 1e-6
}

fn check(row: &Row, status: &SloStatus, objective: &Objective) {
    let at = format!("{}:{:02}", row.at.0, row.at.1);
    for (window, (events, bad, burn)) in WINDOWS.iter().zip(row.windows) {
        let window = Duration::from_secs(*window);
        let seen = status.window(window).expect("the window is evaluated");
        assert_eq!(
            (seen.events, seen.bad),
            (events, bad),
            "{at}, window {window:?}: requests and bad requests"
        );
        assert!(
            close(seen.burn_rate, burn),
            "{at}, window {window:?}: burn rate {} where the table has {burn}",
            seen.burn_rate
        );
    }
    assert_eq!(status.firing(Severity::Page), row.page, "{at}: page");
    assert_eq!(status.firing(Severity::Ticket), row.ticket, "{at}: ticket");
    assert!(
        close(status.error_budget_remaining, row.budget_remaining),
        "{at}: budget left {} where the table has {}",
        status.error_budget_remaining,
        row.budget_remaining
    );
    // The signals other parts read follow the alerts.
    let page = objective.signal(Severity::Page).unwrap();
    let ticket = objective.signal(Severity::Ticket).unwrap();
    assert_eq!(
        (page.is_raised(), ticket.is_raised()),
        (row.page, row.ticket),
        "{at}: signals"
    );
}

/// No batch may lie within a window's granularity of its edge, or the table's counts would
/// depend on how the batch was bucketed rather than on the documented bound.
fn assert_edges_clear(status: &SloStatus, now: u64) {
    for window in &status.windows {
        let edge = now.saturating_sub(window.window.as_secs());
        let batch_near_edge = (0..=61_u64)
            .map(|hour| hour * HOUR + 40 * MINUTE)
            .any(|batch| batch >= edge && batch < edge + window.granularity.as_secs());
        assert!(
            !batch_near_edge || now < window.window.as_secs(),
            "a batch lies within {:?} of the {:?} window's edge",
            window.granularity,
            window.window
        );
    }
}

#[test]
fn burn_rates_alerts_and_budget_follow_the_hand_computed_table() {
    let time = ManualClock::new();
    let objective = Objective::with_clock(
        ObjectiveConfig::availability("checkout", 0.999),
        time.clock(),
    )
    .unwrap();
    let mut now = 0;
    let mut advance_to = |to: u64| {
        assert!(to >= now);
        time.advance(Duration::from_secs(to - now));
        now = to;
    };
    let mut rows = table().into_iter().peekable();
    for hour in 0..=61_u64 {
        advance_to(hour * HOUR + 40 * MINUTE);
        for request in 0..1_000 {
            objective.record(request >= bad_at(hour));
        }
        while let Some(row) = rows.next_if(|row| row.at.0 == hour) {
            advance_to(row.at.0 * HOUR + row.at.1 * MINUTE);
            let status = objective.evaluate();
            assert_edges_clear(&status, row.at.0 * HOUR + row.at.1 * MINUTE);
            check(&row, &status, &objective);
        }
    }
    assert!(rows.next().is_none(), "every row was checked");
}
