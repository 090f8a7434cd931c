//! The open-loop load: Poisson arrivals of reads, writes, idempotent checkouts (with client
//! retries) and reports, spread over the instances that are up, each answer logged.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::fleet::Fleet;
use crate::proto::{ServiceRequest, ServiceResponse};

/// Hot products: most reads and writes go to them.
pub const HOT_KEYS: usize = 10;
/// The long tail of products.
pub const TAIL_KEYS: usize = 2_000;
/// The tenant that orders far more than its tier allows.
pub const HOT_TENANT: &str = "free-0";

/// What a request did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A product read.
    Read,
    /// A product write.
    Write,
    /// An order (critical).
    Checkout,
    /// A report (sheddable).
    Report,
}

/// One answered (or failed) request.
#[derive(Clone, Debug)]
pub struct Event {
    /// When it was sent, since the run started.
    pub sent: Duration,
    /// How long the answer took.
    pub latency: Duration,
    /// What it was.
    pub kind: Kind,
    /// The service's outcome, or `unreachable` when the instance did not answer.
    pub outcome: String,
    /// The product (reads and writes) or idempotency key (checkouts).
    pub key: String,
    /// The version served or written.
    pub version: Option<u64>,
    /// The order placed.
    pub order: Option<u64>,
    /// The slot of the instance that answered.
    pub instance: Option<usize>,
}

impl Event {
    /// Whether the request got the answer it should: success, or a correct refusal (over the
    /// tenant's rate limit).
    pub fn is_good(&self) -> bool {
        self.outcome == "ok" || self.outcome == "rate_limited"
    }
}

/// The load generator's state, shared with the schedule that changes its rates.
#[derive(Debug)]
pub struct Load {
    fleet: Arc<Fleet>,
    started: Instant,
    /// Requests per second of the usual mix, in thousandths.
    rate_milli: AtomicU64,
    /// Extra reports per second (overload), in thousandths.
    surge_milli: AtomicU64,
    stop: AtomicBool,
    orders: AtomicU64,
    events: Mutex<Vec<Event>>,
}

impl Load {
    /// A load on `fleet` at `rate` requests per second, not yet running.
    pub fn new(fleet: Arc<Fleet>, rate: f64) -> Arc<Self> {
        Arc::new(Self {
            fleet,
            started: Instant::now(),
            rate_milli: AtomicU64::new((rate * 1000.0) as u64),
            surge_milli: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            orders: AtomicU64::new(0),
            events: Mutex::new(Vec::new()),
        })
    }

    /// Time since the load was created: the clock of every event and window.
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Adds `rate` reports per second on top of the usual mix (0 to end the surge).
    pub fn surge(&self, rate: f64) {
        self.surge_milli
            .store((rate * 1000.0) as u64, Ordering::Relaxed);
    }

    /// Stops sending; requests in flight still finish.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Sends requests with exponential gaps until stopped, at most `limit` of them.
    pub async fn run(self: Arc<Self>, limit: u64) {
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        let mut next = Instant::now();
        for _ in 0..limit {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let base = self.rate_milli.load(Ordering::Relaxed) as f64 / 1000.0;
            let surge = self.surge_milli.load(Ordering::Relaxed) as f64 / 1000.0;
            let total = base + surge;
            let gap = -(1.0 - rng.f64()).ln() / total;
            next += Duration::from_secs_f64(gap);
            tokio::time::sleep_until(next.into()).await;
            let request = if rng.f64() * total < surge {
                (Kind::Report, ServiceRequest::Report)
            } else {
                self.pick(&mut rng)
            };
            let retry = matches!(request.0, Kind::Checkout) && rng.f64() < 0.3;
            let retry_after = Duration::from_millis(rng.u64(0..300));
            let instance = rng.usize(..self.fleet.size());
            let load = Arc::clone(&self);
            tokio::spawn(async move {
                if retry {
                    let again = Arc::clone(&load);
                    let request = request.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(retry_after).await;
                        again.send(instance + 1, request).await;
                    });
                }
                load.send(instance, request).await;
            });
        }
    }

    /// The usual mix: 70 % reads, 10 % writes, 10 % checkouts, 10 % reports.
    fn pick(&self, rng: &mut fastrand::Rng) -> (Kind, ServiceRequest) {
        let product = |rng: &mut fastrand::Rng, hot_share: f64| {
            if rng.f64() < hot_share {
                format!("hot-{}", rng.usize(..HOT_KEYS))
            } else {
                format!("tail-{}", rng.usize(..TAIL_KEYS))
            }
        };
        match rng.u32(..10) {
            0..7 => {
                let key = product(rng, 0.8);
                (Kind::Read, ServiceRequest::Read { key })
            }
            7 => {
                let key = product(rng, 0.9);
                (Kind::Write, ServiceRequest::Write { key })
            }
            8 => {
                let tenant = if rng.bool() {
                    HOT_TENANT.to_owned()
                } else if rng.bool() {
                    format!("free-{}", rng.usize(1..5))
                } else {
                    format!("pro-{}", rng.usize(..5))
                };
                let tier = tenant.split('-').next().unwrap_or("free").to_owned();
                let n = self.orders.fetch_add(1, Ordering::Relaxed);
                let key = format!("{tenant}.{n}");
                (
                    Kind::Checkout,
                    ServiceRequest::Checkout { tenant, tier, key },
                )
            }
            _ => (Kind::Report, ServiceRequest::Report),
        }
    }

    /// Sends `request` to the first instance that is up from `slot` on, and logs the answer
    /// as an event, judged with the rest.
    pub async fn send(&self, slot: usize, (kind, request): (Kind, ServiceRequest)) {
        let size = self.fleet.size();
        let serving = (0..size)
            .map(|i| (slot + i) % size)
            .find_map(|s| Some((s, self.fleet.client(s)?)));
        let instance = serving.as_ref().map(|(s, _)| *s);
        let client = serving.map(|(_, client)| client);
        let key = match &request {
            ServiceRequest::Read { key }
            | ServiceRequest::ReadLocked { key }
            | ServiceRequest::Write { key } => key.clone(),
            ServiceRequest::Checkout { key, .. } => key.clone(),
            _ => String::new(),
        };
        let sent = self.now();
        let answer = match client {
            Some(client) => client.call::<_, ServiceResponse>(&request).await.ok(),
            None => None,
        };
        let latency = self.now().saturating_sub(sent);
        let answer = answer.unwrap_or_else(|| ServiceResponse::outcome("unreachable"));
        let event = Event {
            sent,
            latency,
            kind,
            outcome: answer.outcome,
            key,
            version: answer.version,
            order: answer.order,
            instance,
        };
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(event);
    }
}
