//! The open-loop load: Poisson arrivals of reads, writes, idempotent checkouts (with client
//! retries) and reports, spread over the instances that are up, each answer logged.

use std::io;
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

/// No answer because the instance was down: none was up, or the schedule took the one asked
/// out of the load (to stop or kill it) before the request failed.
pub const UNREACHABLE: &str = "unreachable";
/// No answer within the client's timeout from an instance that was up throughout.
pub const HUNG: &str = "hung";
/// The connection lost (or an unreadable answer) with an instance that was up throughout: a
/// handler that panicked, a process that died on its own.
pub const DROPPED: &str = "dropped";

/// The outcome of a request that got no answer, `still_up` when its instance was still the
/// one in its slot (the schedule had not taken it out) when the request failed.
pub fn unanswered(error: &io::Error, still_up: bool) -> &'static str {
    match (still_up, error.kind()) {
        (false, _) => UNREACHABLE,
        (true, io::ErrorKind::TimedOut) => HUNG,
        (true, _) => DROPPED,
    }
}

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
    /// The service's outcome, or why there was none: [`UNREACHABLE`], [`HUNG`], [`DROPPED`].
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
        let key = match &request {
            ServiceRequest::Read { key }
            | ServiceRequest::ReadLocked { key }
            | ServiceRequest::Write { key } => key.clone(),
            ServiceRequest::Checkout { key, .. } => key.clone(),
            _ => String::new(),
        };
        let sent = self.now();
        let answer = match serving {
            Some((slot, client)) => match client.call(&request).await {
                Ok(answer) => answer,
                Err(error) => {
                    // Stop and kill empty the slot before they touch the process, and a
                    // restart fills it with another client: the same client still there means
                    // nothing the schedule did can explain the failure.
                    let still_up = self
                        .fleet
                        .client(slot)
                        .is_some_and(|now| Arc::ptr_eq(&now, &client));
                    ServiceResponse::outcome(unanswered(&error, still_up))
                }
            },
            None => ServiceResponse::outcome(UNREACHABLE),
        };
        let latency = self.now().saturating_sub(sent);
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::PathBuf;

    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    use super::*;
    use crate::proto::Client;

    /// A fleet of one slot, served by whatever the test puts behind `addr`.
    fn fleet_at(addr: SocketAddr) -> (Arc<Fleet>, Arc<Client>) {
        let fleet = Arc::new(Fleet::new(PathBuf::new(), 1, addr, Vec::new()));
        let client = Arc::new(Client::new(addr, crate::fleet::ANSWER_TIMEOUT));
        fleet.set_client(0, Some(Arc::clone(&client)));
        (fleet, client)
    }

    fn read(key: &str) -> (Kind, ServiceRequest) {
        (
            Kind::Read,
            ServiceRequest::Read {
                key: key.to_owned(),
            },
        )
    }

    /// An instance that reads each request and never answers: a hang (a read blocked on a
    /// failed-over master, say). The client's 5 s timeout passes on the paused clock.
    #[tokio::test(start_paused = true)]
    async fn a_request_an_up_instance_never_answers_is_hung() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (fleet, _) = fleet_at(listener.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let load = Load::new(fleet, 1.0);
        load.send(0, read("hot-0")).await;
        let events = load.events();
        assert_eq!(events[0].outcome, HUNG);
        assert_eq!(events[0].instance, Some(0));
    }

    /// An instance that closes the connection instead of answering: a handler that panicked,
    /// or a process that died without the schedule killing it.
    #[tokio::test]
    async fn a_request_an_up_instance_drops_is_dropped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (fleet, _) = fleet_at(listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut line = String::new();
            let _ = BufReader::new(stream).read_line(&mut line).await;
        });
        let load = Load::new(fleet, 1.0);
        load.send(0, read("hot-0")).await;
        assert_eq!(load.events()[0].outcome, DROPPED);
    }

    /// The schedule takes an instance out of the load before it stops or kills it: a request
    /// it cut off is the instance being down, not a broken answer.
    #[tokio::test]
    async fn a_request_cut_off_by_the_schedule_taking_its_instance_down_is_unreachable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (fleet, _) = fleet_at(listener.local_addr().unwrap());
        let (received, got_request) = oneshot::channel();
        let (kill, killed) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut line = String::new();
            let mut reader = BufReader::new(stream);
            let _ = reader.read_line(&mut line).await;
            let _ = received.send(());
            let _ = killed.await;
        });
        let load = Load::new(Arc::clone(&fleet), 1.0);
        let sending = tokio::spawn({
            let load = Arc::clone(&load);
            async move { load.send(0, read("hot-0")).await }
        });
        got_request.await.unwrap();
        fleet.set_client(0, None);
        kill.send(()).unwrap();
        sending.await.unwrap();
        assert_eq!(load.events()[0].outcome, UNREACHABLE);
    }

    /// A timeout is a hang only on an instance the schedule left alone: one stopped (its
    /// drain and graceful shutdown can outlast a slow request) or killed meanwhile was down.
    #[test]
    fn a_failure_on_an_instance_taken_out_of_the_load_is_unreachable() {
        let timed_out = io::Error::new(io::ErrorKind::TimedOut, "no answer in time");
        let closed = io::Error::new(io::ErrorKind::UnexpectedEof, "closed");
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(unanswered(&timed_out, true), HUNG);
        assert_eq!(unanswered(&closed, true), DROPPED);
        assert_eq!(unanswered(&refused, true), DROPPED);
        for error in [&timed_out, &closed, &refused] {
            assert_eq!(unanswered(error, false), UNREACHABLE);
        }
    }

    /// With no instance up there is nobody to ask.
    #[tokio::test]
    async fn a_request_with_no_instance_up_is_unreachable() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 9));
        let (fleet, _) = fleet_at(addr);
        fleet.set_client(0, None);
        let load = Load::new(fleet, 1.0);
        load.send(0, read("hot-0")).await;
        assert_eq!(load.events()[0].outcome, UNREACHABLE);
        assert_eq!(load.events()[0].instance, None);
    }
}
