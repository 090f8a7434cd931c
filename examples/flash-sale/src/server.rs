//! The order service: product pages and checkout, served by axum on loopback, in two builds.
//!
//! - unprotected: every request goes straight to the database;
//! - with headroom: product reads through a two-level cache; price updates commit to the
//!   database, then remove the product from the cache (L1 here, a tombstone in the shared L2,
//!   and an invalidation message to the other instance's L1); checkout through rate limits per
//!   customer tier, a load shedder (priority by tier), idempotency keys, and a circuit breaker
//!   with a timeout around every database call.
//!
//! A checkout's slow part is the payment provider's call (fraud screening and authorisation).
//! Unprotected, the checkout holds its database transaction open across it, as a naive order
//! service does. With headroom, the checkout reserves the order in one short query, enqueues a
//! payment job and answers 202 with where to follow it (`GET /payments/{id}`); a worker on each
//! instance charges the order under the provider's idempotency key for it (so a job delivered
//! again charges once) and marks it paid. No database connection waits on the provider.
//!
//! Every response carries an `x-outcome` header naming what happened, which the load generator
//! counts. A product page whose row had already been replaced by a price update when it was
//! served also carries `x-stale-ms`: how long before (the database knows).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use headroom::breaker::{self, CircuitBreaker, Timeout};
use headroom::cache::Cache;
use headroom::core::jobs::DynJobStore;
use headroom::core::lease::DynLeaseStore;
use headroom::core::rate::DynRateStore;
use headroom::idempotency::{Idempotency, IdempotencyError, IdempotencyKey, Scope};
use headroom::jobs::{EnqueueError, Job, JobContext, JobError, JobId, JobQueue, Worker};
use headroom::limit::rate::{DistributedRateLimiter, Quota, RateErrorKind, RateLimit, TierConfig};
use headroom::limit::{Bulkhead, LoadShedder, Priority};
use headroom::{BuildError, Headroom};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::db::{Database, DbError, Product};
use crate::payment::Gateway;

/// Why a protected call did not reach a result.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Failure {
    Db(DbError),
    Elapsed,
    CircuitOpen,
    Shed,
    /// Over the customer's checkout quota; retry after the given time.
    RateLimited(Duration),
    /// The rate limit could not be judged (a misconfigured tier).
    RateLimitError,
    /// The payment queue is full; retry after the given time.
    QueueFull(Duration),
    /// The payment queue's store failed.
    JobStore,
}

impl Failure {
    fn from_breaker(err: breaker::Error<Failure>) -> Self {
        match err {
            breaker::Error::CircuitOpen(_) => Failure::CircuitOpen,
            other => other.into_inner().unwrap_or(Failure::Elapsed),
        }
    }

    fn from_enqueue(err: EnqueueError) -> Self {
        match err {
            EnqueueError::Full { retry_after, .. } => Failure::QueueFull(retry_after),
            _ => Failure::JobStore,
        }
    }

    fn outcome(self) -> &'static str {
        match self {
            Failure::Db(_) => "db-error",
            Failure::Elapsed => "db-timeout",
            Failure::CircuitOpen => "circuit-open",
            Failure::Shed => "shed",
            Failure::RateLimited(_) => "rate-limited",
            Failure::RateLimitError => "rate-limit-error",
            Failure::QueueFull(_) => "queue-full",
            Failure::JobStore => "job-store-error",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.outcome())
    }
}

impl std::error::Error for Failure {}

/// What the protected build counts on top of its components' own counters.
#[derive(Debug, Default)]
pub(crate) struct GuardCounters {
    pub(crate) replays: AtomicU64,
    pub(crate) breaker_rejections: AtomicU64,
    /// For each payment job done: from its enqueue (the 202) until the order was paid.
    pub(crate) payment_waits: Mutex<Vec<Duration>>,
}

/// The protections of one instance.
#[derive(Debug)]
struct Guard {
    products: Cache<u64, Product>,
    shedder: LoadShedder,
    rate_limits: DistributedRateLimiter<DynRateStore>,
    idempotency: Idempotency<DynLeaseStore>,
    breaker: CircuitBreaker<Failure>,
    timeout: Timeout,
    /// Orders waiting for their payment, bounded in all and per customer.
    payments: JobQueue<DynJobStore>,
    /// A cap on the payment worker's use of the database.
    payment_db: Bulkhead,
    counters: Arc<GuardCounters>,
    /// Product pages skip the cache and the shedder (`--weaken`).
    weakened: bool,
}

#[derive(Clone, Debug)]
struct App {
    db: Arc<Database>,
    gateway: Arc<Gateway>,
    guard: Option<Arc<Guard>>,
}

/// How much of the database one instance's requests may use at once.
pub(crate) const INSTANCE_CONCURRENCY: usize = 8;
/// How much of it one instance's payment worker may use at once, on top.
const PAYMENT_DB_CONCURRENCY: usize = 4;
/// Payments one instance's worker runs at once (most of their time is the provider's).
const PAYMENT_CONCURRENCY: usize = 32;

/// The protections of one instance, built from the shared [`Headroom`].
///
/// `weakened` sends product pages straight to the database, past the cache and the shedder:
/// a deliberately broken build that shows `--check` failing when the targets are missed.
pub(crate) fn guard(
    headroom: &Headroom,
    instance: usize,
    counters: Arc<GuardCounters>,
    weakened: bool,
) -> Result<GuardHandle, Box<dyn std::error::Error>> {
    let products = headroom
        .cache::<u64, Product>("products")?
        .ttl(Duration::from_secs(20))
        .soft_ttl(Duration::from_secs(15))
        .ttl_jitter(Duration::from_secs(2))
        // L1 entries live ten seconds, so instances also read each other's loads from L2,
        // and longer than the invalidation's staleness bound (`max_silence`, 2 s), so that a
        // page is fresh after a lost message only because the loss was detected.
        .l1_max_ttl(Duration::from_secs(10))
        .fail_safe_max_stale(Duration::from_secs(120))
        .loader_soft_timeout(Duration::from_millis(150))
        .build()?;
    let bulkhead = headroom
        .bulkhead(format!("checkout-{instance}"))
        .max_concurrent(INSTANCE_CONCURRENCY)
        .max_queued(2 * INSTANCE_CONCURRENCY)
        .max_wait(Duration::from_millis(100))
        .build()?;
    let shedder = LoadShedder::builder(bulkhead).build()?;
    // Checkouts per customer, by tier: generous for people, tight enough to stop scripts.
    let tiers = TierConfig::new()
        .tier("premium", Quota::per_second(10)?.with_burst(10)?)
        .tier("standard", Quota::per_second(5)?.with_burst(5)?)
        .tier("free", Quota::per_second(1)?.with_burst(3)?);
    let rate_limits = headroom.rate_limiter("checkout", tiers)?.build()?;
    let idempotency = headroom
        .idempotency()
        .lease(Duration::from_secs(10))
        .retention(Duration::from_secs(600))
        .in_progress(headroom::idempotency::InProgressPolicy::Wait {
            max_wait: Duration::from_millis(600),
        })
        .build()?;
    let breaker = headroom
        .circuit_breaker::<Failure>(format!("database-{instance}"))
        .failure_ratio(0.5)
        .minimum_calls(20)
        .time_window(Duration::from_secs(5), 10)
        .open_duration(Duration::from_millis(500))
        .failure_if(|failure| matches!(failure, Failure::Db(_) | Failure::Elapsed))
        .build()?;
    // Shared by the instances: the same queue on the shared job store.
    let payments = headroom
        .job_queue("payments")?
        .max_len(5_000)
        .max_per_tenant(10)
        .build()?;
    let payment_db = headroom
        .bulkhead(format!("payments-db-{instance}"))
        .max_concurrent(PAYMENT_DB_CONCURRENCY)
        .max_queued(PAYMENT_CONCURRENCY)
        .max_wait(Duration::from_secs(1))
        .build()?;
    Ok(GuardHandle(Arc::new(Guard {
        products,
        shedder,
        rate_limits,
        idempotency,
        breaker,
        timeout: Timeout::new(Duration::from_millis(250)).with_clock(headroom.clock().clone()),
        payments,
        payment_db,
        counters,
        weakened,
    })))
}

/// The protections of one instance, ready to serve.
#[derive(Clone, Debug)]
pub(crate) struct GuardHandle(Arc<Guard>);

impl GuardHandle {
    /// Work refused by the shedder, all priorities and reasons: checkouts and the product
    /// pages' database loads, which share it.
    pub(crate) fn shed(&self) -> u64 {
        let shedder = &self.0.shedder;
        Priority::ALL
            .iter()
            .flat_map(|&p| headroom::limit::Reason::ALL.map(|r| shedder.rejected(p, r)))
            .sum()
    }

    /// Starts this instance's payment worker.
    pub(crate) fn start_payments(
        &self,
        db: Arc<Database>,
        gateway: Arc<Gateway>,
    ) -> Result<Worker, Box<dyn std::error::Error>> {
        let guard = self.0.clone();
        Ok(self
            .0
            .payments
            .worker(move |job| {
                let (guard, db, gateway) = (guard.clone(), db.clone(), gateway.clone());
                async move { guard.pay(&db, &gateway, &job).await }
            })
            .concurrency(PAYMENT_CONCURRENCY)
            // A charged order must end paid: keep trying through database trouble.
            .max_attempts(20)
            .start()?)
    }

    /// Payment jobs not yet finished, on every instance.
    pub(crate) async fn unfinished_payments(&self) -> Option<u64> {
        Some(self.0.payments.stats().await.ok()?.unfinished)
    }
}

/// Starts one instance on a free loopback port.
pub(crate) async fn start(
    db: Arc<Database>,
    gateway: Arc<Gateway>,
    guard: Option<GuardHandle>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let app = App {
        db,
        gateway,
        guard: guard.map(|g| g.0),
    };
    let router = Router::new()
        .route("/products/{id}", get(product))
        .route("/products/{id}/price", post(update_price))
        .route("/checkout", post(checkout))
        .route("/payments/{id}", get(payment))
        .with_state(app);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        // Serving ends when the task is aborted at the end of the run.
        let _ = axum::serve(listener, router).await;
    });
    Ok((addr, task))
}

fn respond(status: StatusCode, outcome: &'static str) -> Response {
    let mut response = (status, outcome).into_response();
    response
        .headers_mut()
        .insert("x-outcome", HeaderValue::from_static(outcome));
    response
}

fn failure_response(failure: Failure) -> Response {
    let (status, retry_after) = match failure {
        Failure::Shed | Failure::CircuitOpen => (StatusCode::SERVICE_UNAVAILABLE, Some(1)),
        Failure::QueueFull(after) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Some((after.as_secs_f64().ceil() as u64).max(1)),
        ),
        Failure::RateLimited(after) => {
            (StatusCode::TOO_MANY_REQUESTS, Some(after.as_secs().max(1)))
        }
        Failure::Db(_) | Failure::Elapsed | Failure::RateLimitError | Failure::JobStore => {
            (StatusCode::INTERNAL_SERVER_ERROR, None)
        }
    };
    let mut response = respond(status, failure.outcome());
    if let Some(value) = retry_after.and_then(|s| HeaderValue::from_str(&s.to_string()).ok()) {
        response.headers_mut().insert("retry-after", value);
    }
    response
}

/// A product page, with `x-stale-ms` when the row shown had already been replaced.
fn page(db: &Database, product: Option<&Product>) -> Response {
    let mut response = respond(StatusCode::OK, "ok");
    if let Some(stale) = product.and_then(|p| db.staleness(p)) {
        let value = HeaderValue::from(u64::try_from(stale.as_millis()).unwrap_or(u64::MAX));
        response.headers_mut().insert("x-stale-ms", value);
    }
    response
}

/// The failure behind a cache error, as the loader reported it.
fn cache_failure(err: &headroom::cache::CacheError) -> Failure {
    std::error::Error::source(err)
        .and_then(|source| source.downcast_ref::<Failure>())
        .copied()
        .unwrap_or(Failure::Elapsed)
}

async fn product(State(app): State<App>, Path(id): Path<u64>) -> Response {
    let Some(guard) = app.guard else {
        return match app.db.product(id).await {
            Ok(product) => page(&app.db, Some(&product)),
            Err(_) => respond(StatusCode::INTERNAL_SERVER_ERROR, "db-error"),
        };
    };
    if guard.weakened {
        return match guard.db_call(app.db.product(id)).await {
            Ok(product) => page(&app.db, Some(&product)),
            Err(failure) => failure_response(failure),
        };
    }
    let db = app.db.clone();
    let loader_guard = guard.clone();
    let read = guard
        .products
        .get_or_load(&id, move |id| async move {
            // A cache miss is ordinary work: shed before critical checkouts are.
            let _permit = loader_guard
                .shedder
                .acquire(Priority::Default)
                .await
                .map_err(|_| Failure::Shed)?;
            loader_guard.db_call(db.product(id)).await.map(Some)
        })
        .await;
    match read {
        Ok(product) => page(&app.db, product.as_ref()),
        Err(err) => failure_response(cache_failure(&err)),
    }
}

/// A price update from the back office: committed to the database, then the product is removed
/// from the cache, on every instance (through the invalidation bus) and in L2, so the next read
/// loads the new row. Both run in their own task: a client that gives up must not leave a
/// committed update with the old price still cached.
async fn update_price(State(app): State<App>, Path(id): Path<u64>) -> Response {
    let db = app.db.clone();
    let Some(guard) = app.guard else {
        return match tokio::spawn(async move { db.update_price(id).await }).await {
            Ok(Ok(_)) => respond(StatusCode::OK, "ok"),
            _ => respond(StatusCode::INTERNAL_SERVER_ERROR, "db-error"),
        };
    };
    let updated = tokio::spawn(async move {
        guard.db_call(db.update_price(id)).await?;
        // Only an invalid key fails a removal; L2 trouble is retried by the cache.
        Ok::<_, Failure>(guard.products.remove(&id).await.is_ok())
    })
    .await;
    match updated {
        Ok(Ok(true)) => respond(StatusCode::OK, "ok"),
        Ok(Err(failure)) => failure_response(failure),
        _ => respond(StatusCode::INTERNAL_SERVER_ERROR, "cache-error"),
    }
}

impl Guard {
    /// Admits a new checkout: within the customer's quota, and of a tier not being shed.
    async fn admit(&self, tier: &str, customer: u64, priority: Priority) -> Result<(), Failure> {
        match self.rate_limits.check(tier, &customer.to_string(), 1).await {
            Err(err) if err.kind() == RateErrorKind::Limited => {
                let after = err
                    .limited()
                    .map_or(Duration::from_secs(1), |l| l.retry_after());
                return Err(Failure::RateLimited(after));
            }
            // The limiter's own fallback decided when the store was unreachable; anything
            // else is a server error.
            Err(_) => return Err(Failure::RateLimitError),
            Ok(_) => {}
        }
        self.shedder.check(priority).map_err(|_| Failure::Shed)
    }

    /// One database call under the breaker and the timeout.
    async fn db_call<T>(
        &self,
        call: impl Future<Output = Result<T, DbError>>,
    ) -> Result<T, Failure> {
        let result = self
            .breaker
            .call(async {
                match self.timeout.call(call).await {
                    Ok(result) => result.map_err(Failure::Db),
                    Err(_) => Err(Failure::Elapsed),
                }
            })
            .await
            .map_err(Failure::from_breaker);
        if matches!(result, Err(Failure::CircuitOpen)) {
            self.counters
                .breaker_rejections
                .fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// A payment job: charges the order under the provider's idempotency key for it (so a
    /// job delivered again, or cut off mid-charge, does not charge twice) and marks it paid.
    async fn pay(
        &self,
        db: &Database,
        gateway: &Gateway,
        job: &JobContext,
    ) -> Result<Bytes, JobError> {
        let Some((customer, reference)) = std::str::from_utf8(job.payload())
            .ok()
            .and_then(|p| p.split_once(':'))
            .and_then(|(c, r)| Some((c.parse::<u64>().ok()?, r.parse::<u64>().ok()?)))
        else {
            return Err(JobError::fatal("not a payment"));
        };
        let key = format!("order {customer}-{reference}");
        gateway.charge(customer, reference, Some(&key)).await;
        // Capped apart from the checkouts, and no breaker of theirs: a charged order is marked
        // paid by retrying, not given up on.
        let _connection = self
            .payment_db
            .acquire()
            .await
            .map_err(|err| JobError::retry(err.to_string()))?;
        match self.timeout.call(db.mark_paid(customer, reference)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => return Err(JobError::retry(err.to_string())),
            Err(_) => return Err(JobError::retry("marking the order paid timed out")),
        }
        let waited = SystemTime::now()
            .duration_since(job.enqueued_at())
            .unwrap_or_default();
        self.counters
            .payment_waits
            .lock()
            .expect("payment waits lock")
            .push(waited);
        Ok(Bytes::new())
    }

    /// Reserves the order and queues its payment; answers the payment's job id. A payment
    /// that cannot be queued withdraws the order.
    async fn reserve_and_queue_payment(
        &self,
        db: &Database,
        customer: u64,
        reference: u64,
        priority: Priority,
    ) -> Result<String, Failure> {
        {
            let _permit = self
                .shedder
                .acquire(priority)
                .await
                .map_err(|_| Failure::Shed)?;
            self.db_call(db.reserve_order(customer, reference)).await?;
        }
        let payment = Job::new(format!("{customer}:{reference}"))
            .tenant(customer.to_string())
            .idempotency_key(reference.to_string());
        match self.payments.enqueue(payment).await {
            Ok(enqueued) => Ok(enqueued.id.to_string()),
            Err(refused) => {
                // Best effort: an order left reserved shows in the report as unpaid.
                let _ = self.db_call(db.cancel_order(customer, reference)).await;
                Err(Failure::from_enqueue(refused))
            }
        }
    }
}

/// The customer, tier, priority and order reference of a checkout.
fn checkout_request(headers: &HeaderMap) -> Option<(u64, &'static str, Priority, String)> {
    let text = |name: &str| headers.get(name)?.to_str().ok();
    let customer = text("x-customer")?.parse().ok()?;
    let (tier, priority) = match text("x-tier")? {
        "premium" => ("premium", Priority::Critical),
        "standard" => ("standard", Priority::Default),
        _ => ("free", Priority::Sheddable),
    };
    Some((
        customer,
        tier,
        priority,
        text("idempotency-key")?.to_owned(),
    ))
}

async fn checkout(State(app): State<App>, headers: HeaderMap) -> Response {
    let Some((customer, tier, priority, reference)) = checkout_request(&headers) else {
        return respond(StatusCode::BAD_REQUEST, "bad-request");
    };
    let Ok(reference_number) = reference.parse::<u64>() else {
        return respond(StatusCode::BAD_REQUEST, "bad-request");
    };
    let Some(guard) = app.guard else {
        // A transaction commits even if the client has given up waiting for it.
        let (db, gateway) = (app.db.clone(), app.gateway.clone());
        let placed = tokio::spawn(async move {
            db.place_order_and_pay(customer, reference_number, &gateway)
                .await
        });
        return match placed.await {
            Ok(Ok(_)) => respond(StatusCode::OK, "ok"),
            _ => respond(StatusCode::INTERNAL_SERVER_ERROR, "db-error"),
        };
    };
    let (Ok(scope), Ok(key)) = (
        Scope::new(customer.to_string(), "checkout"),
        IdempotencyKey::new(&reference),
    ) else {
        return respond(StatusCode::BAD_REQUEST, "bad-request");
    };
    // The idempotency record is looked up first: a retry of a checkout that already committed
    // gets its replay even when the customer is over quota or the tier is being shed. Only new
    // work meets the rate limit and the shedder, and a refusal releases the key for a retry.
    // The whole operation runs in its own task, so a client that gives up neither cancels the
    // transaction nor releases the key while the transaction still runs. The weakened build
    // pays inside the checkout's transaction instead of queueing the payment.
    let (db, gateway) = (app.db.clone(), app.gateway.clone());
    let task_guard = guard.clone();
    let placed = tokio::spawn(async move {
        let guard = task_guard;
        guard
            .idempotency
            .execute(&scope, &key, b"checkout", || async {
                guard.admit(tier, customer, priority).await?;
                if guard.weakened {
                    let _permit = guard
                        .shedder
                        .acquire(priority)
                        .await
                        .map_err(|_| Failure::Shed)?;
                    let paid = db.place_order_and_pay(customer, reference_number, &gateway);
                    guard.db_call(paid).await?;
                    return Ok(None);
                }
                guard
                    .reserve_and_queue_payment(&db, customer, reference_number, priority)
                    .await
                    .map(Some)
            })
            .await
    })
    .await;
    match placed {
        Ok(Ok(executed)) => {
            let outcome = if executed.replayed {
                guard.counters.replays.fetch_add(1, Ordering::Relaxed);
                "replayed"
            } else {
                "accepted"
            };
            let Some(payment) = executed.value else {
                return respond(StatusCode::OK, outcome);
            };
            let mut response = respond(StatusCode::ACCEPTED, outcome);
            if let Ok(location) = HeaderValue::from_str(&format!("/payments/{payment}")) {
                response
                    .headers_mut()
                    .insert(axum::http::header::LOCATION, location);
            }
            response
        }
        Ok(Err(IdempotencyError::Operation(failure))) => failure_response(failure),
        Ok(Err(IdempotencyError::InProgress { .. })) => {
            respond(StatusCode::CONFLICT, "in-progress")
        }
        _ => respond(StatusCode::INTERNAL_SERVER_ERROR, "idempotency-error"),
    }
}

/// A checkout's payment, for the customer who placed it: its state (`queued`, `running`,
/// `retrying`, `done`, `dead`). The demo trusts `x-customer`; an application takes the
/// customer from the request's authentication.
async fn payment(State(app): State<App>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let Some(guard) = app.guard else {
        return respond(StatusCode::NOT_FOUND, "not-found");
    };
    let (Ok(id), Some(customer)) = (
        id.parse::<JobId>(),
        headers.get("x-customer").and_then(|v| v.to_str().ok()),
    ) else {
        return respond(StatusCode::BAD_REQUEST, "bad-request");
    };
    match guard.payments.status_for(customer, id).await {
        Ok(Some(status)) => {
            let mut response = respond(StatusCode::OK, "ok");
            *response.body_mut() = status.state.to_string().into();
            response
        }
        Ok(None) => respond(StatusCode::NOT_FOUND, "not-found"),
        Err(_) => respond(StatusCode::INTERNAL_SERVER_ERROR, "job-store-error"),
    }
}

/// Builds the shared backend: Redis when `REDIS_URL` is set, memory otherwise.
pub(crate) async fn headroom(namespace: &str) -> Result<Headroom, BuildError> {
    let builder = Headroom::builder().namespace(namespace);
    match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => builder.redis(url).await,
        _ => builder.memory(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use headroom::core::ManualClock;

    fn checkout_headers(customer: u64, tier: &str, reference: u64) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let value = |v: String| HeaderValue::from_str(&v).expect("header value");
        headers.insert("x-customer", value(customer.to_string()));
        headers.insert("x-tier", value(tier.to_owned()));
        headers.insert("idempotency-key", value(reference.to_string()));
        headers
    }

    fn outcome(response: &Response) -> (StatusCode, String) {
        let outcome = response
            .headers()
            .get("x-outcome")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        (response.status(), outcome)
    }

    #[tokio::test]
    async fn a_retried_checkout_that_committed_gets_its_replay_even_over_quota() {
        // Time stands still, so the customer's quota does not refill during the test.
        let manual = ManualClock::new();
        let headroom = Headroom::builder()
            .namespace("flash-sale-test")
            .clock(manual.clock())
            .memory()
            .expect("memory backend");
        let guard = guard(&headroom, 0, Arc::new(GuardCounters::default()), false).expect("guard");
        let app = App {
            db: Database::new(4),
            gateway: Arc::new(Gateway::default()),
            guard: Some(guard.0),
        };
        // A free-tier customer may place a burst of 3 checkouts.
        let customer = 17;
        for reference in 1..=3 {
            let response = checkout(
                State(app.clone()),
                checkout_headers(customer, "free", reference),
            )
            .await;
            assert_eq!(
                outcome(&response),
                (StatusCode::ACCEPTED, "accepted".to_owned())
            );
        }
        let over_quota = checkout(State(app.clone()), checkout_headers(customer, "free", 4)).await;
        assert_eq!(
            outcome(&over_quota),
            (StatusCode::TOO_MANY_REQUESTS, "rate-limited".to_owned())
        );
        // The first checkout's response was lost; its retry must get the committed order.
        let retry = checkout(State(app.clone()), checkout_headers(customer, "free", 1)).await;
        assert_eq!(
            outcome(&retry),
            (StatusCode::ACCEPTED, "replayed".to_owned())
        );
        assert_eq!(app.db.stats().orders, 3);
    }

    fn location(response: &Response) -> String {
        response
            .headers()
            .get(axum::http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .expect("a Location header")
            .to_owned()
    }

    async fn payment_state(app: &App, location: &str, customer: u64) -> (StatusCode, String) {
        let id = location.trim_start_matches("/payments/").to_owned();
        let mut headers = HeaderMap::new();
        headers.insert("x-customer", HeaderValue::from(customer));
        let response = payment(State(app.clone()), Path(id), headers).await;
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1_024)
            .await
            .expect("body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn a_checkout_answers_202_and_a_worker_pays_the_order_once_with_no_connection_held_meanwhile()
     {
        let headroom = Headroom::builder()
            .namespace("flash-sale-test")
            .memory()
            .expect("memory backend");
        let counters = Arc::new(GuardCounters::default());
        let guard = guard(&headroom, 0, counters.clone(), false).expect("guard");
        let app = App {
            db: Database::new(4),
            gateway: Arc::new(Gateway::default()),
            guard: Some(guard.0.clone()),
        };
        let customer = 42;
        let accepted = checkout(State(app.clone()), checkout_headers(customer, "premium", 7)).await;
        assert_eq!(
            outcome(&accepted),
            (StatusCode::ACCEPTED, "accepted".to_owned())
        );
        let followed = location(&accepted);
        // Nothing pays it yet: the order is reserved, its payment queued, for its customer only.
        assert_eq!(
            payment_state(&app, &followed, customer).await,
            (StatusCode::OK, "queued".to_owned())
        );
        assert_eq!(
            payment_state(&app, &followed, customer + 1).await.0,
            StatusCode::NOT_FOUND
        );
        let reserved = app.db.stats();
        assert_eq!((reserved.orders, reserved.paid_orders), (1, 0));

        let worker = guard
            .start_payments(app.db.clone(), app.gateway.clone())
            .expect("worker");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while payment_state(&app, &followed, customer).await.1 != "done"
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            payment_state(&app, &followed, customer).await,
            (StatusCode::OK, "done".to_owned())
        );
        // The retried checkout is answered with the same payment, and pays nothing again.
        let retried = checkout(State(app.clone()), checkout_headers(customer, "premium", 7)).await;
        assert_eq!(
            outcome(&retried),
            (StatusCode::ACCEPTED, "replayed".to_owned())
        );
        assert_eq!(location(&retried), followed);
        let report = worker.shutdown(Duration::from_secs(5)).await;
        assert_eq!((report.done, report.dead), (1, 0));
        let db = app.db.stats();
        let paid = app.gateway.stats();
        assert_eq!((db.orders, db.paid_orders, db.duplicate_orders), (1, 1, 0));
        assert_eq!((paid.charged, paid.double_charges), (1, 0));
        assert!(db.idle_in_transaction < Duration::from_millis(5));
        assert_eq!(counters.payment_waits.lock().expect("waits").len(), 1);
    }

    #[tokio::test]
    async fn a_payment_cut_off_mid_charge_is_paid_by_the_next_worker_and_charged_once() {
        let headroom = Headroom::builder()
            .namespace("flash-sale-test")
            .memory()
            .expect("memory backend");
        let guard = guard(&headroom, 0, Arc::new(GuardCounters::default()), false).expect("guard");
        let app = App {
            db: Database::new(4),
            gateway: Arc::new(Gateway::default()),
            guard: Some(guard.0.clone()),
        };
        let customer = 42;
        let accepted = checkout(State(app.clone()), checkout_headers(customer, "premium", 7)).await;
        let followed = location(&accepted);
        let first = guard
            .start_payments(app.db.clone(), app.gateway.clone())
            .expect("worker");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while app.gateway.stats().charged == 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The worker is stopped mid-charge, with no grace: its job is handed back.
        let report = first.shutdown(Duration::ZERO).await;
        assert_eq!((report.done, report.handed_back), (0, 1));
        let next = guard
            .start_payments(app.db.clone(), app.gateway.clone())
            .expect("worker");
        while payment_state(&app, &followed, customer).await.1 != "done"
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(next.shutdown(Duration::from_secs(5)).await.done, 1);
        let paid = app.gateway.stats();
        assert_eq!((paid.charged, paid.double_charges), (1, 0));
        assert_eq!(app.db.stats().paid_orders, 1);
    }
}
