//! Run with: cargo run -p axum-service
//!
//! An HTTP service on axum with every headroom part in place:
//!
//! - `GET /products/{id}`: read through a two-level cache (L1 in process, L2 in the shared
//!   backend), so the database sees one load per product per TTL; each load runs through a
//!   pipeline that retries a failed query once, bounds it with a timeout and hedges a slow one
//!   (reads are safe to repeat; retries and hedges share one budget), and holds one of the
//!   catalogue database's 16 connections (a bulkhead);
//! - `POST /orders`: behind a rate limit per API key (tiers shared through the backend, 429
//!   with `Retry-After` and `RateLimit` headers), a keyed bulkhead (at most 32 orders at once,
//!   shared fairly between API keys, a short queue, a typed 503 beyond it) and the idempotency
//!   layer (`Idempotency-Key` header, scoped per `x-api-key`), so a retried order is replayed
//!   instead of charged twice (a refusal given before the charge is not stored, so its retry
//!   runs again); each order is stored on the shard of its API key;
//! - the payment gateway the orders call is a tower service behind a circuit breaker layer,
//!   with a chaos experiment between the two (off until started): `PUT /admin/chaos` with an
//!   experiment's JSON starts it on every instance sharing the backend, `DELETE /admin/chaos`
//!   stops it, and it stops by itself at its end time or when the orders SLO pages (see
//!   docs/chaos.md); in a real service, put these routes behind your admin authentication;
//! - two service level objectives on orders (99.9 % answered without a server error, 99 %
//!   within 300 ms), recorded by `SloLayer`s, with their burn rates evaluated at each scrape;
//!   `--print-slo-rules` prints the Prometheus rules that alert on them;
//! - `POST /exports`: a slow export moved off the request path: it enqueues a job on a bounded
//!   queue (per-tenant bound by `x-api-key`, deduplicated by `Idempotency-Key`) and answers
//!   `202 Accepted` with `Location: /jobs/{id}`, or `503` with `Retry-After` when the queue is
//!   full; `GET /jobs/{id}` answers the job's state and, once done, its result, to the API key
//!   that enqueued it only. Workers in the same process run the exports (see docs/jobs.md);
//! - `GET /metrics`: every headroom metric in the Prometheus text format, through
//!   `metrics-exporter-prometheus` (the recorder may be installed before or after the parts
//!   are built).
//!
//! With `HEADROOM_RUNTIME_CONFIG=/path/to/runtime.json`, the catalogue database's bulkhead,
//! the orders rate limits and the products cache take new settings from that file whenever
//! it changes (checked every 5 s; see docs/operations.md, "Reloading configuration").
//!
//! It listens on 127.0.0.1:3000 (or `LISTEN_ADDR`) until SIGTERM or Ctrl-C, then stops
//! gracefully: it takes no new connection, gives the requests in flight 10 s to answer and
//! running exports 10 s more, and shuts the caches down so that the other instances keep their L1 (a
//! process killed outright costs each of them one flush). Memory backends by default; set
//! `REDIS_URL=redis://127.0.0.1:6379` to share state between instances. With `--smoke` (or
//! `HEADROOM_SMOKE=1`) it listens on a free port, sends a few requests to itself and exits;
//! `--print-metrics` then prints what `/metrics` answered.
//!
//! ```text
//! curl localhost:3000/products/7
//! curl -X POST -H 'x-api-key: acme' -H 'Idempotency-Key: order-1' -d 'sku=7' localhost:3000/orders
//! curl -i -X POST -H 'x-api-key: acme' localhost:3000/exports
//! curl -H 'x-api-key: acme' localhost:3000/jobs/0-1
//! curl localhost:3000/metrics
//! curl -X PUT -H 'Content-Type: application/json' localhost:3000/admin/chaos \
//!      -d '{"duration": "5m", "fault": {"rate": 0.2}, "blast_radius": {"max_fraction": 0.25}}'
//! curl -X DELETE localhost:3000/admin/chaos
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use headroom::breaker::tower::{CircuitBreakerLayer, CircuitBreakerService};
use headroom::chaos::{Chaos, ChaosLayer, ChaosService, Experiment, ExperimentConfig, FleetSwitch};
use headroom::core::jobs::DynJobStore;
use headroom::core::kv::DynKvStore;
use headroom::core::lease::DynLeaseStore;
use headroom::idempotency::Idempotency;
use headroom::idempotency::http::{IdempotencyLayer, is_final_status};
use headroom::jobs::{EnqueueError, Job, JobError, JobId, JobQueue, JobState, Worker};
use headroom::limit::KeyedBulkhead;
use headroom::limit::rate::RateKey;
use headroom::limit::tower::{KeyedBulkheadLayer, RateLimitLayer};
use headroom::prelude::*;
use headroom::reload::{Reloader, RuntimeConfig};
use headroom::shard::JumpRouter;
use headroom::slo::{SloConfig, SloLayer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::util::{BoxCloneSyncService, ServiceFn, service_fn};
use tower::{Layer, ServiceBuilder, ServiceExt};

/// A charge at the payment gateway failed.
#[derive(Debug)]
struct GatewayError;

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("payment gateway error")
    }
}

impl std::error::Error for GatewayError {}

/// The payment gateway client: a tower service from an amount to a charge id.
type Gateway = BoxCloneSyncService<u64, u64, headroom::breaker::Error<GatewayError>>;

/// The order database: two shards, each a primary with a replica.
type OrdersDb = Arc<TopologyHandle<&'static str, JumpRouter>>;

#[derive(Clone)]
struct App {
    products: Cache<u64, String>,
    catalogue: Pipeline<std::io::Error>,
    /// The catalogue database's connections.
    catalogue_db: Bulkhead,
    orders_db: OrdersDb,
    gateway: Gateway,
    /// The switch of the payment gateway's chaos experiment, shared by every instance.
    chaos: FleetSwitch<DynKvStore>,
    charges: Arc<AtomicU64>,
    exports: JobQueue<DynJobStore>,
    slos: Slos,
    metrics: PrometheusHandle,
}

/// The caller's API key, the tenant its exports belong to; an empty one is none (anyone could
/// send it).
fn api_key(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .filter(|key| !key.is_empty())
}

/// Enqueues an export for the caller's API key: 202 with where to follow it, 503 with when
/// to retry when the queue is full.
async fn export(State(app): State<App>, headers: HeaderMap) -> axum::response::Response {
    let Some(tenant) = api_key(&headers) else {
        return (StatusCode::BAD_REQUEST, "x-api-key required").into_response();
    };
    let mut job = Job::new(format!("export for {tenant}")).tenant(tenant);
    if let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
        job = job.idempotency_key(key);
    }
    match app.exports.enqueue(job).await {
        Ok(enqueued) => (
            StatusCode::ACCEPTED,
            [(
                axum::http::header::LOCATION,
                format!("/jobs/{}", enqueued.id),
            )],
            format!("export {} queued", enqueued.id),
        )
            .into_response(),
        Err(EnqueueError::Full { retry_after, .. }) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(
                axum::http::header::RETRY_AFTER,
                retry_after.as_secs().max(1).to_string(),
            )],
            "exports are backed up; retry later",
        )
            .into_response(),
        Err(error @ (EnqueueError::TooLarge { .. } | EnqueueError::Invalid(_))) => {
            (StatusCode::BAD_REQUEST, error.to_string()).into_response()
        }
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "job store unavailable").into_response(),
    }
}

/// An export's state, and its result once done, for the API key that enqueued it.
async fn job_status(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> (StatusCode, String) {
    let Ok(id) = id.parse::<JobId>() else {
        return (StatusCode::BAD_REQUEST, "not a job id".to_owned());
    };
    let Some(tenant) = api_key(&headers) else {
        return (StatusCode::BAD_REQUEST, "x-api-key required".to_owned());
    };
    match app.exports.status_for(tenant, id).await {
        Ok(Some(status)) => {
            let detail = match status.state {
                JobState::Done => status
                    .result
                    .map(|r| String::from_utf8_lossy(&r).into_owned())
                    .unwrap_or_default(),
                JobState::Dead | JobState::Retrying => status.error.unwrap_or_default(),
                _ => String::new(),
            };
            (StatusCode::OK, format!("{} {detail}", status.state))
        }
        Ok(None) => (StatusCode::NOT_FOUND, "no such job".to_owned()),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "job store unavailable".to_owned(),
        ),
    }
}

/// The exports queue: at most 1,000 waiting, 50 per API key.
fn exports(headroom: &Headroom) -> Result<JobQueue<DynJobStore>, Box<dyn std::error::Error>> {
    Ok(headroom
        .job_queue("exports")?
        .max_len(1_000)
        .max_per_tenant(50)
        .build()?)
}

/// Runs exports, four at a time: the slow part a request no longer waits for.
fn export_worker(exports: &JobQueue<DynJobStore>) -> Result<Worker, Box<dyn std::error::Error>> {
    Ok(exports
        .worker(|job| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let rows = 1_000 + job.id().number();
            if job.payload().is_empty() {
                return Err(JobError::fatal("nothing to export"));
            }
            Ok(format!("{rows} rows exported").into())
        })
        .concurrency(4)
        .start()?)
}

async fn scrape(State(app): State<App>) -> String {
    // Brings the burn-rate gauges up to this moment.
    app.slos.evaluate();
    app.metrics.render()
}

/// The objectives of `POST /orders`.
fn slos() -> Result<Slos, headroom::slo::ConfigError> {
    Slos::new(SloConfig {
        objectives: vec![
            ObjectiveConfig::availability("orders", 0.999),
            ObjectiveConfig::latency("orders-latency", Duration::from_millis(300), 0.99),
        ],
    })
}

/// An order counts as served unless the service answered with a server error (a refusal by
/// the rate limit, 429, is the client's doing; an overloaded 503 is the service's).
fn served(result: &Result<axum::response::Response, std::convert::Infallible>) -> bool {
    matches!(result, Ok(response) if !response.status().is_server_error())
}

async fn product(
    State(app): State<App>,
    Path(id): Path<u64>,
) -> Result<String, (StatusCode, &'static str)> {
    let (catalogue, db) = (app.catalogue.clone(), app.catalogue_db.clone());
    let name = app
        .products
        .get_or_load(&id, |id| async move {
            catalogue
                .call(|| {
                    let db = db.clone();
                    async move {
                        let _connection = db.acquire().await.map_err(std::io::Error::other)?;
                        // The database query of a real service.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        Ok::<_, std::io::Error>((id < 1_000).then(|| format!("product {id}")))
                    }
                })
                .await
        })
        .await
        .map_err(|_| (StatusCode::SERVICE_UNAVAILABLE, "catalogue unavailable"))?;
    name.ok_or((StatusCode::NOT_FOUND, "no such product"))
}

async fn order(State(app): State<App>, headers: HeaderMap, body: String) -> impl IntoResponse {
    let customer = headers
        .get("x-api-key")
        .and_then(|key| key.to_str().ok())
        .unwrap_or("");
    // The shard that stores this customer's orders.
    let shard = match app.orders_db.load().write(customer) {
        Ok(target) => target.node_id().to_owned(),
        Err(_) => return (StatusCode::INTERNAL_SERVER_ERROR, String::from("no shard")),
    };
    let amount = body.len() as u64 * 100;
    match app.gateway.oneshot(amount).await {
        Ok(charge) => {
            app.charges.fetch_add(1, Ordering::Relaxed);
            (StatusCode::CREATED, format!("charge {charge} on {shard}"))
        }
        Err(err) if err.kind() == headroom::breaker::ErrorKind::CircuitOpen => (
            StatusCode::SERVICE_UNAVAILABLE,
            String::from("payments paused"),
        ),
        Err(_) => (StatusCode::BAD_GATEWAY, String::from("payment failed")),
    }
}

/// The idempotency layer of `POST /orders`, scoped per `x-api-key`. `order` answers 500 (no
/// shard) and 503 (payments paused) before it charges anything: those answers release the key,
/// so that a retry runs the order again once the service recovers, rather than being told the
/// same for the whole retention. Its other answers are stored, a 502 among them: the gateway
/// may have charged before it failed.
fn orders_idempotency(
    idempotency: Idempotency<DynLeaseStore>,
) -> IdempotencyLayer<
    DynLeaseStore,
    impl Fn(&axum::http::request::Parts) -> Option<String> + Send + Sync + 'static,
> {
    IdempotencyLayer::new(idempotency, |parts: &axum::http::request::Parts| {
        parts
            .headers
            .get("x-api-key")?
            .to_str()
            .ok()
            .map(str::to_owned)
    })
    .store_status(|status| {
        is_final_status(status)
            && status != StatusCode::INTERNAL_SERVER_ERROR
            && status != StatusCode::SERVICE_UNAVAILABLE
    })
}

/// Turns a refusal of the bulkhead into a typed 503 response (the rate limit layer answers its
/// own refusals with 429).
async fn overloaded(err: headroom::limit::tower::BoxError) -> (StatusCode, String) {
    match err.downcast_ref::<Overloaded>() {
        Some(overloaded) => (StatusCode::SERVICE_UNAVAILABLE, overloaded.to_string()),
        None => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()),
    }
}

/// Starts the payment gateway's chaos experiment on every instance, with the configuration in
/// the body.
async fn start_chaos(State(app): State<App>, body: String) -> (StatusCode, String) {
    let config = match serde_json::from_str::<ExperimentConfig>(&body) {
        Ok(config) => config,
        Err(err) => return (StatusCode::BAD_REQUEST, err.to_string()),
    };
    match app.chaos.start(&config).await {
        Ok(()) => (
            StatusCode::ACCEPTED,
            String::from("started on every instance"),
        ),
        Err(err @ headroom::chaos::FleetError::Config(_)) => {
            (StatusCode::BAD_REQUEST, err.to_string())
        }
        Err(err) => (StatusCode::SERVICE_UNAVAILABLE, err.to_string()),
    }
}

/// Stops the payment gateway's chaos experiment on every instance.
async fn stop_chaos(State(app): State<App>) -> (StatusCode, String) {
    match app.chaos.stop().await {
        Ok(()) => (
            StatusCode::ACCEPTED,
            String::from("stopped on every instance"),
        ),
        Err(err) => (StatusCode::SERVICE_UNAVAILABLE, err.to_string()),
    }
}

fn gateway(
    headroom: &Headroom,
    experiment: &Experiment,
) -> Result<Gateway, Box<dyn std::error::Error>> {
    let breaker = headroom
        .circuit_breaker::<GatewayError>("payment-gateway")
        .failure_ratio(0.5)
        .minimum_calls(10)
        .open_duration(Duration::from_secs(5))
        .build()?;
    let next_charge = Arc::new(AtomicU64::new(1));
    let client: ServiceFn<_> = service_fn(move |_amount: u64| {
        let next_charge = next_charge.clone();
        async move {
            // The HTTP call to the gateway in a real service.
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok::<_, GatewayError>(next_charge.fetch_add(1, Ordering::Relaxed))
        }
    });
    // Inside the breaker, so that the breaker sees the injected failures as real ones.
    let chaotic: ChaosService<_, u64, GatewayError> =
        ChaosLayer::new(Chaos::new(experiment.clone()).fault(|| GatewayError)).layer(client);
    let guarded: CircuitBreakerService<_, _> = CircuitBreakerLayer::new(breaker).layer(chaotic);
    Ok(BoxCloneSyncService::new(guarded))
}

/// The catalogue database's reads: retried once, bounded, hedged when slow.
fn catalogue(headroom: &Headroom) -> Result<Pipeline<std::io::Error>, Box<dyn std::error::Error>> {
    let budget = headroom.retry_budget().ratio(0.1).build()?;
    let retry = Retry::builder_when(|_: &std::io::Error| true)
        .max_attempts(2)
        .budget(budget.clone())
        .build()?;
    let hedge = Hedge::builder().percentile(0.95).budget(budget).build()?;
    Ok(headroom
        .pipeline::<std::io::Error>("catalogue")
        .retry(retry)
        .timeout(Duration::from_millis(300))
        .hedge(hedge)
        .build())
}

/// What `app` builds besides the router.
struct Parts {
    charges: Arc<AtomicU64>,
    reloader: Reloader,
    /// Makes this instance's experiment follow the shared switch; spawn it.
    follow_chaos: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    /// Runs the exports; shut it down before exiting.
    export_worker: Worker,
}

async fn app(
    headroom: &Headroom,
    metrics: PrometheusHandle,
    chaos_poll: Duration,
) -> Result<(Router, Parts), Box<dyn std::error::Error>> {
    let products = headroom
        .cache::<u64, String>("products")?
        .ttl(Duration::from_secs(60))
        .negative_ttl(Duration::from_secs(10))
        .build()?;
    let bulkhead = KeyedBulkhead::builder("orders")
        .max_concurrent(32)
        .max_queued(64)
        .max_wait(Duration::from_millis(200))
        .build()?;
    let catalogue_db = headroom
        .bulkhead("catalogue-db")
        .max_concurrent(16)
        .build()?;
    let orders_db = Arc::new(TopologyHandle::new(
        Topology::builder(JumpRouter::new(2)?)
            .name("orders")
            .node("orders-a", "postgres://orders-a")
            .node("orders-a-replica", "postgres://orders-a-replica")
            .node("orders-b", "postgres://orders-b")
            .node("orders-b-replica", "postgres://orders-b-replica")
            .shards(0..1, "orders-a", &["orders-a-replica"])
            .shards(1..2, "orders-b", &["orders-b-replica"])
            .build()?,
    ));
    // API keys starting with `partner-` get the partner tier.
    let tiers = TierConfig::new()
        .tier("standard", Quota::per_second(20)?)
        .tier("partner", Quota::per_second(200)?);
    let rate_limits = headroom.rate_limiter("orders", tiers)?.build()?;
    // What may change at run time, from a watched file.
    let reloader = Reloader::new()
        .bulkhead(&catalogue_db)
        .rate_limiter(&rate_limits)
        .cache(&products);
    let idempotency = headroom.idempotency().build()?;
    let charges = Arc::new(AtomicU64::new(0));
    let slos = slos()?;
    let objective = |name: &str| slos.get(name).expect("declared above").clone();
    // A chaos experiment that users' pain ends: it stops as soon as the orders SLO pages.
    let experiment = Experiment::builder("payment-gateway")
        .stop_when(
            objective("orders")
                .signal(headroom::slo::Severity::Page)
                .expect("the default alerts page"),
        )
        .build()?;
    let chaos = FleetSwitch::new(
        headroom.kv_store().clone(),
        headroom.namespace(),
        experiment.name(),
    )?;
    let follow_chaos = Box::pin(chaos.follow(experiment.clone(), chaos_poll));
    let exports = exports(headroom)?;
    let export_worker = export_worker(&exports)?;
    let state = App {
        products,
        catalogue: catalogue(headroom)?,
        catalogue_db,
        orders_db,
        gateway: gateway(headroom, &experiment)?,
        chaos,
        charges: charges.clone(),
        exports,
        slos: slos.clone(),
        metrics,
    };
    let orders = ServiceBuilder::new()
        .layer(SloLayer::new(objective("orders")).classify(served))
        .layer(SloLayer::new(objective("orders-latency")).classify(served))
        .layer(HandleErrorLayer::new(overloaded))
        .layer(RateLimitLayer::new(
            rate_limits,
            |request: &axum::http::Request<axum::body::Body>| {
                let key = request.headers().get("x-api-key")?.to_str().ok()?;
                let tier = if key.starts_with("partner-") {
                    "partner"
                } else {
                    "standard"
                };
                Some(RateKey::new(tier, key))
            },
        ))
        // Cloning a header value copies no bytes; requests without a key share a tenant.
        .layer(KeyedBulkheadLayer::new(
            bulkhead,
            |request: &axum::http::Request<axum::body::Body>| {
                request.headers().get("x-api-key").cloned()
            },
        ))
        .layer(orders_idempotency(idempotency));
    let router = Router::new()
        .route("/products/{id}", get(product))
        .route("/orders", post(order).layer(orders))
        .route("/exports", post(export))
        .route("/jobs/{id}", get(job_status))
        .route("/metrics", get(scrape))
        .route("/admin/chaos", put(start_chaos).delete(stop_chaos))
        .with_state(state);
    Ok((
        router,
        Parts {
            charges,
            reloader,
            follow_chaos,
            export_worker,
        },
    ))
}

/// Sends one HTTP/1.1 request over a fresh connection; returns the status and the body.
async fn send(
    addr: std::net::SocketAddr,
    request: &str,
) -> Result<(u16, String), Box<dyn std::error::Error>> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await??;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or("malformed response")?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok((status, body.to_owned()))
}

fn order_request(key: &str) -> String {
    format!(
        "POST /orders HTTP/1.1\r\nHost: localhost\r\nx-api-key: acme\r\nIdempotency-Key: {key}\r\n\
         Content-Type: text/plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\nsku=7"
    )
}

/// Starts a chaos experiment failing every payment, sends orders until this instance follows
/// the switch (the order is answered 502, the injected gateway failure), and stops it.
/// Returns the last answer and how many orders were charged before the experiment began.
async fn chaos_round(
    addr: std::net::SocketAddr,
    key: &str,
) -> Result<(u16, u64), Box<dyn std::error::Error>> {
    let config = r#"{"duration": "1m", "fault": {"rate": 1.0}}"#;
    let start = format!(
        "PUT /admin/chaos HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{config}",
        config.len()
    );
    let (started, body) = send(addr, &start).await?;
    println!("PUT /admin/chaos           -> {started} {body}");
    let (mut answered, mut charged_before) = (0, 0);
    // The follower polls every 50 ms here: a bounded wait for it to start the experiment.
    for attempt in 0..100 {
        let (status, _) = send(addr, &order_request(&format!("{key}-chaos-{attempt}"))).await?;
        answered = status;
        if status != 201 {
            break;
        }
        charged_before += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("POST /orders (chaos)       -> {answered} (injected gateway failure)");
    let stop = "DELETE /admin/chaos HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let (stopped, body) = send(addr, stop).await?;
    println!("DELETE /admin/chaos        -> {stopped} {body}");
    if (started, stopped) != (202, 202) {
        return Err("the chaos switch did not answer as expected".into());
    }
    Ok((answered, charged_before))
}

/// Enqueues an export, follows its Location until it is done, and checks that another API
/// key cannot read it and that an empty key neither reads nor enqueues.
async fn export_round(addr: std::net::SocketAddr) -> Result<bool, Box<dyn std::error::Error>> {
    let post = "POST /exports HTTP/1.1\r\nHost: localhost\r\nx-api-key: acme\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(post.as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await??;
    let location = response
        .lines()
        .find_map(|line| line.strip_prefix("location: "))
        .ok_or("no Location header")?
        .to_owned();
    println!(
        "POST /exports              -> {} (Location: {location})",
        &response[9..12]
    );
    let get = |key: &str| {
        format!(
            "GET {location} HTTP/1.1\r\nHost: localhost\r\nx-api-key: {key}\r\nConnection: close\r\n\r\n"
        )
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let done = loop {
        let (status, body) = send(addr, &get("acme")).await?;
        if status == 200 && body.starts_with("done") {
            println!("GET {location:<22} -> {status} {body}");
            break true;
        }
        if tokio::time::Instant::now() > deadline {
            println!("GET {location:<22} -> {status} {body} (not done in 5 s)");
            break false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (other, _) = send(addr, &get("globex")).await?;
    println!("GET {location:<22} -> {other} (another API key)");
    // An empty key is no tenant: anyone could send it.
    let (anonymous, _) = send(addr, &get("")).await?;
    println!("GET {location:<22} -> {anonymous} (an empty API key)");
    let empty = post.replace("x-api-key: acme", "x-api-key: ");
    let (refused, _) = send(addr, &empty).await?;
    println!("POST /exports              -> {refused} (an empty API key)");
    Ok(done
        && response.starts_with("HTTP/1.1 202")
        && other == 404
        && anonymous == 400
        && refused == 400)
}

/// Resolves when the process is asked to stop: SIGTERM (what a rolling deploy sends) or
/// Ctrl-C. The handlers are installed at once, not when the future is first polled.
fn stop_requested() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let signals = {
        use tokio::signal::unix::{SignalKind, signal};
        signal(SignalKind::terminate()).and_then(|t| Ok((t, signal(SignalKind::interrupt())?)))
    };
    async move {
        #[cfg(unix)]
        if let Ok((mut terminate, mut interrupt)) = signals {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// How long requests in flight get to answer once the process is asked to stop.
const DRAIN: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let smoke = std::env::args().any(|a| a == "--smoke")
        || std::env::var("HEADROOM_SMOKE").is_ok_and(|v| v == "1");
    let print_metrics = std::env::args().any(|a| a == "--print-metrics");
    if std::env::args().any(|a| a == "--print-slo-rules") {
        print!("{}", slos()?.prometheus_rules());
        return Ok(());
    }
    // Histograms as Prometheus histograms (buckets, in seconds), so they add up across
    // instances; without buckets the exporter writes per-instance summaries.
    let metrics = PrometheusBuilder::new()
        .set_buckets(&[
            0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])?
        .install_recorder()?;
    let builder = Headroom::builder().namespace("axum-service");
    let headroom = match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => builder.redis(url).await?,
        _ => builder.memory()?,
    };
    // The smoke run checks the switch quickly; a service polls it every second or so.
    let chaos_poll = Duration::from_millis(if smoke { 50 } else { 1_000 });
    let (router, parts) = app(&headroom, metrics, chaos_poll).await?;
    let Parts {
        charges,
        reloader,
        follow_chaos,
        export_worker,
    } = parts;
    tokio::spawn(follow_chaos);
    if let Ok(path) = std::env::var("HEADROOM_RUNTIME_CONFIG") {
        tokio::spawn(reloader.watch(
            path,
            Duration::from_secs(5),
            headroom.clock().clone(),
            |bytes| serde_json::from_slice::<RuntimeConfig>(bytes),
        ));
    }
    let listen = match std::env::var("LISTEN_ADDR") {
        Ok(addr) if !addr.is_empty() => addr,
        _ if smoke => "127.0.0.1:0".to_owned(),
        _ => "127.0.0.1:3000".to_owned(),
    };
    // Installed before the service says it listens, so that a stop asked at once is heard.
    let stop_requested = (!smoke).then(stop_requested);
    let listener = TcpListener::bind(&listen).await?;
    let addr = listener.local_addr()?;
    println!(
        "listening on http://{addr} (backend: {})",
        headroom.backend()
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    if let Some(stop_requested) = stop_requested {
        stop_requested.await;
        let _ = stop.send(());
        // Connections left open (an idle keep-alive) do not hold the process past the drain.
        let mut server = server;
        match tokio::time::timeout(DRAIN, &mut server).await {
            Ok(served) => served??,
            Err(_) => server.abort(),
        }
        // Running exports get 10 s to finish; the rest go back to the queue for the next
        // instance.
        export_worker.shutdown(Duration::from_secs(10)).await;
        headroom.shutdown().await;
        println!("stopped gracefully");
        return Ok(());
    }

    let product = "GET /products/7 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let (status, body) = send(addr, product).await?;
    println!("GET /products/7            -> {status} {body}");
    // A unique key per run, so a shared Redis does not replay the previous run's order.
    let key = format!(
        "order-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    let (first, body) = send(addr, &order_request(&key)).await?;
    println!("POST /orders               -> {first} {body}");
    let (retry, body) = send(addr, &order_request(&key)).await?;
    println!("POST /orders (same key)    -> {retry} {body} (replayed)");
    let missing = "POST /orders HTTP/1.1\r\nHost: localhost\r\nx-api-key: acme\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let (no_key, _) = send(addr, missing).await?;
    println!("POST /orders (no key)      -> {no_key}");
    let (injected, charged_before_chaos) = chaos_round(addr, &key).await?;
    let exported = export_round(addr).await?;
    let (scraped, exposition) = send(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await?;
    println!(
        "GET /metrics               -> {scraped} ({} series)",
        exposition
            .lines()
            .filter(|line| line.starts_with("headroom_"))
            .count()
    );
    if print_metrics {
        println!("# scrape\n{exposition}");
    }
    let _ = stop.send(());
    server.await??;
    export_worker.shutdown(Duration::from_secs(5)).await;
    headroom.shutdown().await;
    let charged = charges.load(Ordering::Relaxed) - charged_before_chaos;
    println!("payment gateway charged {charged} time(s)");
    if (
        status, first, retry, no_key, charged, scraped, injected, exported,
    ) != (200, 201, 201, 400, 1, 200, 502, true)
    {
        return Err("the service did not answer as expected".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU16;

    use axum::body::Body;
    use axum::http::Request;

    use super::*;

    /// Sends one request through the router; returns the status, headers and body.
    async fn call(router: &Router, request: Request<Body>) -> (StatusCode, HeaderMap, String) {
        let response = router.clone().oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        (
            parts.status,
            parts.headers,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    fn order_with(key: &str) -> Request<Body> {
        Request::post("/orders")
            .header("x-api-key", "acme")
            .header("idempotency-key", key)
            .body(Body::from("sku=7"))
            .unwrap()
    }

    /// `order` answers 500 "no shard" and 503 "payments paused" (the breaker open) before it
    /// charges anything: behind the orders' idempotency layer, the retry of such an order is
    /// charged once the service recovers, rather than told the refusal again for the whole
    /// retention.
    #[tokio::test]
    async fn an_order_refused_before_its_charge_is_charged_when_retried_after_recovery() {
        let headroom = Headroom::builder().memory().unwrap();
        for (refusal, message) in [
            (StatusCode::INTERNAL_SERVER_ERROR, "no shard"),
            (StatusCode::SERVICE_UNAVAILABLE, "payments paused"),
        ] {
            // `order`'s answers, the shard map's and the breaker's state held by `answer`.
            let answer = Arc::new(AtomicU16::new(refusal.as_u16()));
            let charges = Arc::new(AtomicU64::new(0));
            let handler = {
                let (answer, charges) = (Arc::clone(&answer), Arc::clone(&charges));
                post(move || async move {
                    let status = StatusCode::from_u16(answer.load(Ordering::SeqCst)).unwrap();
                    if status != StatusCode::CREATED {
                        return (status, String::from(message));
                    }
                    let charge = charges.fetch_add(1, Ordering::SeqCst);
                    (status, format!("charge {charge} on orders-a"))
                })
            };
            let idempotency = headroom.idempotency().build().unwrap();
            let router =
                Router::new().route("/orders", handler.layer(orders_idempotency(idempotency)));
            let key = format!("order-{}", refusal.as_u16());
            for _ in 0..2 {
                let (status, headers, body) = call(&router, order_with(&key)).await;
                assert_eq!((status, body.as_str()), (refusal, message));
                assert!(
                    headers.get("idempotent-replayed").is_none(),
                    "a {refusal} given before any charge is not replayed"
                );
            }
            answer.store(StatusCode::CREATED.as_u16(), Ordering::SeqCst);
            let (status, headers, body) = call(&router, order_with(&key)).await;
            assert_eq!(
                (status, body.as_str()),
                (StatusCode::CREATED, "charge 0 on orders-a")
            );
            assert!(headers.get("idempotent-replayed").is_none());
            // From now on the charge is replayed.
            let (status, headers, replayed) = call(&router, order_with(&key)).await;
            assert_eq!((status, replayed), (StatusCode::CREATED, body));
            assert_eq!(headers["idempotent-replayed"], "true");
            assert_eq!(charges.load(Ordering::SeqCst), 1);
        }
    }
}
