//! The order service: product pages and checkout, served by axum on loopback, in two builds.
//!
//! - unprotected: every request goes straight to the database;
//! - with headroom: product reads through a two-level cache; price updates commit to the
//!   database, then remove the product from the cache (L1 here, a tombstone in the shared L2,
//!   and an invalidation message to the other instance's L1); checkout through rate limits per
//!   customer tier, a load shedder (priority by tier), idempotency keys, and a circuit breaker
//!   with a timeout around every database call.
//!
//! Every response carries an `x-outcome` header naming what happened, which the load generator
//! counts. A product page whose row had already been replaced by a price update when it was
//! served also carries `x-stale-ms`: how long before (the database knows).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use headroom::breaker::{self, CircuitBreaker, Timeout};
use headroom::cache::Cache;
use headroom::core::lease::DynLeaseStore;
use headroom::core::rate::DynRateStore;
use headroom::idempotency::{Idempotency, IdempotencyError, IdempotencyKey, Scope};
use headroom::limit::rate::{DistributedRateLimiter, Quota, RateErrorKind, RateLimit, TierConfig};
use headroom::limit::{LoadShedder, Priority};
use headroom::{BuildError, Headroom};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::db::{Database, DbError, Product};

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
}

impl Failure {
    fn from_breaker(err: breaker::Error<Failure>) -> Self {
        match err {
            breaker::Error::CircuitOpen(_) => Failure::CircuitOpen,
            other => other.into_inner().unwrap_or(Failure::Elapsed),
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
    counters: Arc<GuardCounters>,
    /// Product pages skip the cache and the shedder (`--weaken`).
    weakened: bool,
}

#[derive(Clone, Debug)]
struct App {
    db: Arc<Database>,
    guard: Option<Arc<Guard>>,
}

/// How much of the database one instance may use at once.
pub(crate) const INSTANCE_CONCURRENCY: usize = 8;

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
        // L1 entries live one second, so instances also read each other's loads from L2.
        .l1_max_ttl(Duration::from_secs(1))
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
    Ok(GuardHandle(Arc::new(Guard {
        products,
        shedder,
        rate_limits,
        idempotency,
        breaker,
        timeout: Timeout::new(Duration::from_millis(250)).with_clock(headroom.clock().clone()),
        counters,
        weakened,
    })))
}

/// The protections of one instance, ready to serve.
#[derive(Clone, Debug)]
pub(crate) struct GuardHandle(Arc<Guard>);

impl GuardHandle {
    /// Checkouts refused by the shedder, all priorities and reasons.
    pub(crate) fn shed(&self) -> u64 {
        let shedder = &self.0.shedder;
        Priority::ALL
            .iter()
            .flat_map(|&p| headroom::limit::Reason::ALL.map(|r| shedder.rejected(p, r)))
            .sum()
    }
}

/// Starts one instance on a free loopback port.
pub(crate) async fn start(
    db: Arc<Database>,
    guard: Option<GuardHandle>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let app = App {
        db,
        guard: guard.map(|g| g.0),
    };
    let router = Router::new()
        .route("/products/{id}", get(product))
        .route("/products/{id}/price", post(update_price))
        .route("/checkout", post(checkout))
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
        Failure::RateLimited(after) => {
            (StatusCode::TOO_MANY_REQUESTS, Some(after.as_secs().max(1)))
        }
        Failure::Db(_) | Failure::Elapsed | Failure::RateLimitError => {
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
        let db = app.db.clone();
        let placed = tokio::spawn(async move { db.place_order(customer, reference_number).await });
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
    // transaction nor releases the key while the transaction still runs.
    let db = app.db.clone();
    let task_guard = guard.clone();
    let placed = tokio::spawn(async move {
        let guard = task_guard;
        guard
            .idempotency
            .execute(&scope, &key, b"checkout", || async {
                guard.admit(tier, customer, priority).await?;
                let _permit = guard
                    .shedder
                    .acquire(priority)
                    .await
                    .map_err(|_| Failure::Shed)?;
                guard
                    .db_call(db.place_order(customer, reference_number))
                    .await
            })
            .await
    })
    .await;
    match placed {
        Ok(Ok(executed)) => {
            if executed.replayed {
                guard.counters.replays.fetch_add(1, Ordering::Relaxed);
                respond(StatusCode::OK, "replayed")
            } else {
                respond(StatusCode::OK, "ok")
            }
        }
        Ok(Err(IdempotencyError::Operation(failure))) => failure_response(failure),
        Ok(Err(IdempotencyError::InProgress { .. })) => {
            respond(StatusCode::CONFLICT, "in-progress")
        }
        _ => respond(StatusCode::INTERNAL_SERVER_ERROR, "idempotency-error"),
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
            assert_eq!(outcome(&response), (StatusCode::OK, "ok".to_owned()));
        }
        let over_quota = checkout(State(app.clone()), checkout_headers(customer, "free", 4)).await;
        assert_eq!(
            outcome(&over_quota),
            (StatusCode::TOO_MANY_REQUESTS, "rate-limited".to_owned())
        );
        // The first checkout's response was lost; its retry must get the committed order.
        let retry = checkout(State(app.clone()), checkout_headers(customer, "free", 1)).await;
        assert_eq!(outcome(&retry), (StatusCode::OK, "replayed".to_owned()));
        assert_eq!(app.db.stats().orders, 3);
    }
}
