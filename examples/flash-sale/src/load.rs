//! The load generator: open-loop arrivals at a target rate, phase by phase, from customers who
//! give up after a second and retry (with the same idempotency key for a checkout), and a small
//! steady stream of price updates from the back office.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

/// How long a customer waits for one attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// Share of checkout attempts whose response is lost (a mobile network drop): the customer
/// stops waiting after [`LOST_AFTER`] and retries with the same idempotency key.
const LOST_RESPONSES: f64 = 0.03;
const LOST_AFTER: Duration = Duration::from_millis(15);
/// Attempts per request, the first included.
const MAX_ATTEMPTS: u32 = 3;
/// The most requests one phase may start, whatever its rate.
const MAX_REQUESTS_PER_PHASE: u64 = 50_000;
/// How long stragglers may run after the last phase.
const DRAIN: Duration = Duration::from_secs(4);
/// The products on sale: most page views, and every price update.
const HOT_PRODUCTS: u64 = 50;

/// One phase of the run.
#[derive(Clone, Debug)]
pub(crate) struct Phase {
    pub(crate) name: &'static str,
    /// Arrival rate as a multiple of the base rate.
    pub(crate) multiplier: f64,
    pub(crate) duration: Duration,
    /// Share of arrivals that are checkouts (the rest read a product page).
    pub(crate) checkout_share: f64,
    /// Share of checkouts sent by a few scripted buyers (scalpers) hammering the sale.
    pub(crate) scalper_share: f64,
    /// The fault injected into the protected run's shared backend during the phase.
    pub(crate) chaos: Option<Chaos>,
}

/// A chaos experiment of one phase, on the protected run's shared backend (its KV store,
/// invalidation bus, lease store and rate store).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Chaos {
    /// Every backend call delayed this long.
    Latency(Duration),
    /// This share of the invalidation messages dropped, for each subscriber.
    Loss(f64),
}

/// The run: a base rate and its phases.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub(crate) base_rate: f64,
    /// Price updates per second, in every phase, on top of the visitors' requests.
    pub(crate) update_rate: f64,
    pub(crate) phases: Vec<Phase>,
}

impl Plan {
    /// Requests per second offered during `phase`: visitors and price updates.
    pub(crate) fn offered_rate(&self, phase: &Phase) -> f64 {
        self.base_rate * phase.multiplier + self.update_rate
    }

    pub(crate) fn total(&self) -> Duration {
        self.phases.iter().map(|p| p.duration).sum()
    }

    /// The phase running at `at` since the start.
    pub(crate) fn phase_at(&self, at: Duration) -> usize {
        let mut end = Duration::ZERO;
        for (i, phase) in self.phases.iter().enumerate() {
            end += phase.duration;
            if at < end {
                return i;
            }
        }
        self.phases.len() - 1
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Read,
    Checkout,
    /// A price update (back office).
    Update,
}

/// How a request ended, after its retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Outcome {
    Ok,
    /// A checkout answered from its idempotency record.
    Replayed,
    /// Refused by the load shedder.
    Shed,
    RateLimited,
    CircuitOpen,
    /// The same checkout was still running.
    InProgress,
    /// The payment queue was full (503).
    QueueFull,
    /// 500: database error or timeout.
    ServerError,
    /// The customer gave up waiting.
    Timeout,
}

impl Outcome {
    pub(crate) const ERRORS: [Outcome; 7] = [
        Outcome::Timeout,
        Outcome::ServerError,
        Outcome::Shed,
        Outcome::RateLimited,
        Outcome::CircuitOpen,
        Outcome::InProgress,
        Outcome::QueueFull,
    ];

    pub(crate) fn is_success(self) -> bool {
        matches!(self, Outcome::Ok | Outcome::Replayed)
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Replayed => "replayed",
            Outcome::Shed => "shed (503)",
            Outcome::RateLimited => "rate-limited (429)",
            Outcome::CircuitOpen => "circuit open (503)",
            Outcome::InProgress => "in progress (409)",
            Outcome::QueueFull => "payment queue full (503)",
            Outcome::ServerError => "server error (500)",
            Outcome::Timeout => "client timeout",
        }
    }

    fn from_response(status: u16, outcome: Option<&[u8]>) -> Self {
        match (status, outcome) {
            // A checkout with headroom answers 202: accepted, paid by a job.
            (200 | 202, Some(b"replayed")) => Outcome::Replayed,
            (200 | 202, _) => Outcome::Ok,
            (429, _) => Outcome::RateLimited,
            (409, _) => Outcome::InProgress,
            (503, Some(b"circuit-open")) => Outcome::CircuitOpen,
            (503, Some(b"queue-full")) => Outcome::QueueFull,
            (503, _) => Outcome::Shed,
            _ => Outcome::ServerError,
        }
    }

    fn retryable(self) -> bool {
        !self.is_success() && self != Outcome::RateLimited
    }
}

/// One request as the customer saw it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sample {
    /// When it was first sent, since the start of the run.
    pub(crate) at: Duration,
    /// From the first send to the final answer, retries included.
    pub(crate) latency: Duration,
    pub(crate) kind: Kind,
    pub(crate) outcome: Outcome,
    pub(crate) attempts: u32,
    /// Sent by a premium customer.
    pub(crate) premium: bool,
    /// For a product page: how long its row had been replaced by a price update when it was
    /// served (`None`: it was current).
    pub(crate) stale: Option<Duration>,
}

/// What the progress line shows.
#[derive(Debug, Default)]
struct Progress {
    sent: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    in_flight: AtomicUsize,
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// Drives `plan` against `targets` and returns every request's sample. `on_phase` is called
/// with each phase's index as it begins, before its first request.
pub(crate) async fn run(
    label: &str,
    plan: &Plan,
    targets: &[SocketAddr],
    mut on_phase: impl FnMut(usize),
) -> Vec<Sample> {
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(512)
        .build_http();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let progress = Arc::new(Progress::default());
    let start = Instant::now();
    let printer = tokio::spawn(print_progress(
        label.to_owned(),
        plan.clone(),
        start,
        progress.clone(),
    ));
    let next_reference = AtomicU64::new(1);
    let mut phase_start = start;
    for (index, phase) in plan.phases.iter().enumerate() {
        // Superposed Poisson streams: an arrival is an update with probability update / total.
        let rate = plan.offered_rate(phase);
        let update_share = plan.update_rate / rate;
        let phase_end = phase_start + phase.duration;
        tokio::time::sleep_until(phase_start).await;
        on_phase(index);
        let mut next = phase_start;
        let mut started = 0;
        while next < phase_end && started < MAX_REQUESTS_PER_PHASE {
            tokio::time::sleep_until(next).await;
            let request = if fastrand::f64() < update_share {
                Request::update(targets)
            } else {
                Request::random(phase, &next_reference, targets)
            };
            let (client, samples, progress) = (client.clone(), samples.clone(), progress.clone());
            progress.in_flight.fetch_add(1, Ordering::Relaxed);
            progress.sent.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let sample = request.send(&client, start).await;
                let counter = if sample.outcome.is_success() {
                    &progress.ok
                } else {
                    &progress.failed
                };
                counter.fetch_add(1, Ordering::Relaxed);
                samples.lock().expect("samples lock").push(sample);
                progress.in_flight.fetch_sub(1, Ordering::Relaxed);
            });
            started += 1;
            // Poisson arrivals: exponential gaps with mean 1 / rate.
            let gap = -(1.0 - fastrand::f64()).ln() / rate;
            next += Duration::from_secs_f64(gap);
        }
        phase_start = phase_end;
    }
    let drain_until = Instant::now() + DRAIN;
    while progress.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    printer.abort();
    eprintln!();
    let samples = samples.lock().expect("samples lock");
    samples.clone()
}

async fn print_progress(label: String, plan: Plan, start: Instant, progress: Arc<Progress>) {
    // One line redrawn in place on a terminal; a line every two seconds in a log.
    let tty = std::io::stderr().is_terminal();
    let (every, lead, end) = if tty {
        (Duration::from_millis(500), "\r", "")
    } else {
        (Duration::from_secs(2), "", "\n")
    };
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let elapsed = start.elapsed();
        let phase = &plan.phases[plan.phase_at(elapsed)];
        eprint!(
            "{lead}{label:<12} {:<9} {:>3.0}x {:>5.1}s/{:.0}s  sent {:>6}  ok {:>6}  failed {:>6}  in flight {:>4}   {end}",
            phase.name,
            phase.multiplier,
            elapsed.as_secs_f64().min(plan.total().as_secs_f64()),
            plan.total().as_secs_f64(),
            progress.sent.load(Ordering::Relaxed),
            progress.ok.load(Ordering::Relaxed),
            progress.failed.load(Ordering::Relaxed),
            progress.in_flight.load(Ordering::Relaxed),
        );
        let _ = std::io::stderr().flush();
    }
}

/// One customer request, before it is sent.
struct Request {
    kind: Kind,
    target: SocketAddr,
    path: String,
    customer: u64,
    tier: &'static str,
    reference: u64,
}

impl Request {
    /// A price update of one of the products on sale.
    fn update(targets: &[SocketAddr]) -> Self {
        Self {
            kind: Kind::Update,
            target: targets[fastrand::usize(..targets.len())],
            path: format!("/products/{}/price", fastrand::u64(0..HOT_PRODUCTS)),
            customer: 0,
            tier: "staff",
            reference: 0,
        }
    }

    fn random(phase: &Phase, next_reference: &AtomicU64, targets: &[SocketAddr]) -> Self {
        let target = targets[fastrand::usize(..targets.len())];
        let checkout = fastrand::f64() < phase.checkout_share;
        // Scalpers are 20 free-tier accounts (ids ending in 9) placing order after order.
        let customer = if checkout && fastrand::f64() < phase.scalper_share {
            fastrand::u64(0..20) * 10 + 9
        } else {
            fastrand::u64(1..20_000)
        };
        let tier = match customer % 10 {
            0 | 1 => "premium",
            2..=6 => "standard",
            _ => "free",
        };
        if checkout {
            Self {
                kind: Kind::Checkout,
                target,
                path: String::from("/checkout"),
                customer,
                tier,
                reference: next_reference.fetch_add(1, Ordering::Relaxed),
            }
        } else {
            // Most visitors look at the few products on sale.
            let product = if fastrand::f64() < 0.8 {
                fastrand::u64(0..HOT_PRODUCTS)
            } else {
                fastrand::u64(0..5_000)
            };
            Self {
                kind: Kind::Read,
                target,
                path: format!("/products/{product}"),
                customer,
                tier,
                reference: 0,
            }
        }
    }

    async fn send(&self, client: &HttpClient, start: Instant) -> Sample {
        let first = Instant::now();
        let mut attempts = 0;
        let (outcome, stale) = loop {
            attempts += 1;
            let (outcome, stale) = self.attempt(client).await;
            if !outcome.retryable() || attempts == MAX_ATTEMPTS {
                break (outcome, stale);
            }
            // Exponential backoff with jitter: about 100 ms, then 200 ms.
            let backoff = 100.0 * f64::from(1 << (attempts - 1)) * (0.5 + fastrand::f64());
            tokio::time::sleep(Duration::from_millis(backoff as u64)).await;
        };
        Sample {
            at: first.duration_since(start),
            latency: first.elapsed(),
            kind: self.kind,
            outcome,
            attempts,
            premium: self.tier == "premium",
            stale,
        }
    }

    /// One attempt: its outcome and, for a product page, its staleness.
    async fn attempt(&self, client: &HttpClient) -> (Outcome, Option<Duration>) {
        let uri = format!("http://{}{}", self.target, self.path);
        let mut builder = hyper::Request::builder().uri(uri);
        match self.kind {
            Kind::Checkout => {
                builder = builder
                    .method(hyper::Method::POST)
                    .header("x-customer", self.customer)
                    .header("x-tier", self.tier)
                    .header("idempotency-key", self.reference);
            }
            Kind::Update => builder = builder.method(hyper::Method::POST),
            Kind::Read => {}
        }
        let Ok(request) = builder.body(Empty::new()) else {
            return (Outcome::ServerError, None);
        };
        let exchange = async {
            let response = client.request(request).await.ok()?;
            let status = response.status().as_u16();
            let outcome = response.headers().get("x-outcome").cloned();
            let stale = response
                .headers()
                .get("x-stale-ms")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .map(Duration::from_millis);
            response.into_body().collect().await.ok()?;
            Some((
                Outcome::from_response(status, outcome.as_ref().map(|v| v.as_bytes())),
                stale,
            ))
        };
        let patience = if self.kind == Kind::Checkout && fastrand::f64() < LOST_RESPONSES {
            LOST_AFTER
        } else {
            ATTEMPT_TIMEOUT
        };
        match tokio::time::timeout(patience, exchange).await {
            Ok(Some(answer)) => answer,
            Ok(None) => (Outcome::ServerError, None),
            Err(_) => (Outcome::Timeout, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_map_to_outcomes() {
        assert_eq!(
            Outcome::from_response(200, Some(b"replayed")),
            Outcome::Replayed
        );
        assert_eq!(Outcome::from_response(200, None), Outcome::Ok);
        assert_eq!(Outcome::from_response(202, Some(b"accepted")), Outcome::Ok);
        assert_eq!(
            Outcome::from_response(202, Some(b"replayed")),
            Outcome::Replayed
        );
        assert_eq!(
            Outcome::from_response(503, Some(b"queue-full")),
            Outcome::QueueFull
        );
        assert_eq!(Outcome::from_response(429, None), Outcome::RateLimited);
        assert_eq!(
            Outcome::from_response(503, Some(b"circuit-open")),
            Outcome::CircuitOpen
        );
        assert_eq!(Outcome::from_response(503, Some(b"shed")), Outcome::Shed);
        assert_eq!(Outcome::from_response(500, None), Outcome::ServerError);
        assert!(!Outcome::RateLimited.retryable() && Outcome::Shed.retryable());
    }

    #[test]
    fn phases_follow_each_other() {
        let phase = |secs| Phase {
            name: "p",
            multiplier: 1.0,
            duration: Duration::from_secs(secs),
            checkout_share: 0.0,
            scalper_share: 0.0,
            chaos: None,
        };
        let plan = Plan {
            base_rate: 1.0,
            update_rate: 0.5,
            phases: vec![phase(2), phase(3)],
        };
        assert_eq!(plan.offered_rate(&plan.phases[0]), 1.5);
        assert_eq!(plan.total(), Duration::from_secs(5));
        assert_eq!(plan.phase_at(Duration::from_millis(1_999)), 0);
        assert_eq!(plan.phase_at(Duration::from_secs(2)), 1);
        // Stragglers answered after the end count in the last phase.
        assert_eq!(plan.phase_at(Duration::from_secs(9)), 1);
    }
}
