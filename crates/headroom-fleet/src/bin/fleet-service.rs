//! One instance of the fleet's order service: products read through the two-level cache,
//! written to the database and then the cache, orders placed once per idempotency key within
//! rate limits per tenant tier, and every database call behind a load shedder.
//!
//! Run by `fleet-trial`: `fleet-service <port> <database address> <instance>
//! [--via <announced host:port>=<reachable host:port>]... <seed URL>...`; each `--via` sends the
//! instance's connections to one cluster node through another address (the trial's fault
//! proxies).
//! It prints `ready` once it listens, and on SIGTERM shuts headroom down gracefully (queued
//! invalidations and a goodbye) before it exits; it exits at once when its standard input
//! closes (the trial that started it is gone, even killed).

use std::error::Error;
use std::io::Read;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use headroom::Headroom;
use headroom::cache::Cache;
use headroom::core::lease::DynLeaseStore;
use headroom::core::rate::DynRateStore;
use headroom::idempotency::{
    Idempotency, IdempotencyError, IdempotencyKey, InProgressPolicy, Scope,
};
use headroom::limit::rate::{DistributedRateLimiter, Fallback, Quota, RateLimit, TierConfig};
use headroom::limit::{LoadShedder, Priority};
use headroom::redis::RedisConfig;
use headroom_fleet::proto::{
    Client, DbRequest, DbResponse, ServiceRequest, ServiceResponse, Stats, serve_lines,
};
use headroom_fleet::recorder::Counters;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Semaphore;

/// Database calls one instance runs at once; more wait in the bulkhead's queue or are shed.
const DB_CONCURRENCY: usize = 2;
/// How many instances share the rate limits.
const INSTANCES: u32 = 6;
/// Products a bulk import removes from the cache at once: more than the invalidation
/// outbox's 1,024 keys.
const BURST_BATCH: usize = 1_250;

struct Service {
    instance: usize,
    products: Cache<String, u64>,
    /// The same products through a cache with a fleet-wide single flight.
    locked: Cache<String, u64>,
    shedder: LoadShedder,
    limiter: DistributedRateLimiter<DynRateStore>,
    orders: Idempotency<DynLeaseStore>,
    db: Client,
    counters: Counters,
    loads: AtomicU64,
}

/// Why a database call did not happen.
#[derive(Debug)]
enum DbFailure {
    Shed,
    Io(std::io::Error),
}

impl std::fmt::Display for DbFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Shed => f.write_str("shed"),
            Self::Io(err) => write!(f, "db: {err}"),
        }
    }
}

impl Error for DbFailure {}

impl DbFailure {
    fn outcome(&self) -> &'static str {
        match self {
            Self::Shed => "shed",
            Self::Io(_) => "db",
        }
    }
}

impl Service {
    /// One database call at `priority`, behind the shedder; a load's request is told how long
    /// it waited there.
    async fn db(&self, priority: Priority, mut request: DbRequest) -> Result<u64, DbFailure> {
        let asked = Instant::now();
        let _permit = self
            .shedder
            .acquire(priority)
            .await
            .map_err(|_| DbFailure::Shed)?;
        if let DbRequest::Get { queued_us, .. } = &mut request {
            *queued_us = u64::try_from(asked.elapsed().as_micros()).unwrap_or(u64::MAX);
        }
        let answer: DbResponse = self.db.call(&request).await.map_err(DbFailure::Io)?;
        Ok(answer.value)
    }

    async fn handle(self: Arc<Self>, request: ServiceRequest) -> ServiceResponse {
        match request {
            ServiceRequest::Read { key } => self.read(&self.products, key).await,
            ServiceRequest::ReadLocked { key } => self.read(&self.locked, key).await,
            ServiceRequest::Write { key } => self.write(key).await,
            ServiceRequest::Checkout { tenant, tier, key } => {
                self.checkout(&tenant, &tier, &key).await
            }
            ServiceRequest::Report => match self.db(Priority::Sheddable, DbRequest::Report).await {
                Ok(_) => ServiceResponse::outcome("ok"),
                Err(failure) => ServiceResponse::outcome(failure.outcome()),
            },
            ServiceRequest::Burst { count } => self.burst(count).await,
            ServiceRequest::Stats => self.stats(),
        }
    }

    async fn read(self: &Arc<Self>, cache: &Cache<String, u64>, key: String) -> ServiceResponse {
        let service = Arc::clone(self);
        let loaded = cache
            .get_or_load(&key, move |key| async move {
                service.loads.fetch_add(1, Ordering::Relaxed);
                service
                    .db(Priority::Default, DbRequest::Get { key, queued_us: 0 })
                    .await
                    .map(Some)
            })
            .await;
        match loaded {
            Ok(Some(version)) => ServiceResponse {
                version: Some(version),
                ..ServiceResponse::outcome("ok")
            },
            Ok(None) => ServiceResponse::outcome("missing"),
            Err(err) => match err.source().map(ToString::to_string) {
                Some(cause) if cause == "shed" => ServiceResponse::outcome("shed"),
                Some(cause) if cause.starts_with("db") => ServiceResponse::outcome("db"),
                _ => ServiceResponse::outcome("cache"),
            },
        }
    }

    async fn write(&self, key: String) -> ServiceResponse {
        let version = match self
            .db(Priority::Default, DbRequest::Put { key: key.clone() })
            .await
        {
            Ok(version) => version,
            Err(failure) => return ServiceResponse::outcome(failure.outcome()),
        };
        // Several instances write one product: the cache orders its own writes, not the
        // database's, so the value is removed (one load from the database follows) rather than
        // written through, as docs/cache.md advises for rows with concurrent writers.
        match self.products.remove(&key).await {
            Ok(()) => ServiceResponse {
                version: Some(version),
                ..ServiceResponse::outcome("ok")
            },
            Err(_) => ServiceResponse::outcome("cache"),
        }
    }

    async fn checkout(&self, tenant: &str, tier: &str, key: &str) -> ServiceResponse {
        let (Ok(scope), Ok(idempotency_key)) =
            (Scope::new(tenant, "checkout"), IdempotencyKey::new(key))
        else {
            return ServiceResponse::outcome("bad_request");
        };
        match self.limiter.check(tier, tenant, 1).await {
            Ok(_) => {}
            Err(err) if err.limited().is_some() => return ServiceResponse::outcome("rate_limited"),
            Err(_) => return ServiceResponse::outcome("rate_store"),
        }
        let placed = self
            .orders
            .execute(&scope, &idempotency_key, b"checkout", || {
                self.db(
                    Priority::Critical,
                    DbRequest::Checkout {
                        key: key.to_owned(),
                    },
                )
            })
            .await;
        match placed {
            Ok(executed) => ServiceResponse {
                order: Some(executed.value),
                replayed: executed.replayed,
                ..ServiceResponse::outcome("ok")
            },
            Err(IdempotencyError::InProgress { .. }) => ServiceResponse::outcome("in_progress"),
            Err(IdempotencyError::Operation(failure)) => {
                ServiceResponse::outcome(failure.outcome())
            }
            Err(_) => ServiceResponse::outcome("idempotency"),
        }
    }

    /// A bulk import of `count` products of this instance's own: each batch of
    /// [`BURST_BATCH`] has its rows written to the database (64 at a time, on the import's
    /// own connections rather than through the request shedder), then is removed from the
    /// cache in one `remove_many`, more keys than the invalidation outbox holds (1,024), so
    /// the other instances are sent a flush instead of the keys. Answers how many products
    /// were written and removed.
    async fn burst(self: &Arc<Self>, count: u32) -> ServiceResponse {
        let gate = Arc::new(Semaphore::new(64));
        let mut written = 0;
        let keys: Vec<String> = (0..count)
            .map(|n| format!("burst-{}-{n}", self.instance))
            .collect();
        for batch in keys.chunks(BURST_BATCH) {
            let mut puts = tokio::task::JoinSet::new();
            for key in batch {
                let (service, gate, key) = (Arc::clone(self), Arc::clone(&gate), key.clone());
                puts.spawn(async move {
                    let _permit = gate.acquire_owned().await;
                    service
                        .db
                        .call::<_, DbResponse>(&DbRequest::Put { key })
                        .await
                        .is_ok()
                });
            }
            let put = puts.join_all().await.into_iter().filter(|ok| *ok).count();
            if self.products.remove_many(batch).await.is_ok() {
                written += put;
            }
        }
        ServiceResponse {
            version: Some(written as u64),
            ..ServiceResponse::outcome("ok")
        }
    }

    fn stats(&self) -> ServiceResponse {
        let counters = &self.counters;
        let labels = [("cache", "products"), ("level", "l2")];
        let stats = Stats {
            flushes: counters
                .by_label(
                    "headroom_cache_invalidation_flushes_total",
                    "reason",
                    &[("cache", "products")],
                )
                .into_iter()
                .collect(),
            l2_hits: counters.sum("headroom_cache_hits_total", &labels),
            l2_misses: counters.sum("headroom_cache_misses_total", &labels),
            loads: self.loads.load(Ordering::Relaxed),
            publish_errors: counters.sum(
                "headroom_cache_invalidation_publish_errors_total",
                &[("cache", "products")],
            ),
            l1_in_use: self.products.l1_in_use(),
        };
        ServiceResponse {
            stats: Some(stats),
            ..ServiceResponse::outcome("ok")
        }
    }
}

struct Args {
    port: u16,
    db: SocketAddr,
    instance: usize,
    /// Announced node address, and the address to dial instead.
    via: Vec<(String, String)>,
    seeds: Vec<String>,
}

fn args() -> Option<Args> {
    let mut args = std::env::args().skip(1).peekable();
    let port = args.next()?.parse().ok()?;
    let db = args.next()?.parse().ok()?;
    let instance = args.next()?.parse().ok()?;
    let mut via = Vec::new();
    while args.next_if(|arg| arg == "--via").is_some() {
        let (announced, reachable) = args
            .next()?
            .split_once('=')
            .map(|(a, r)| (a.to_owned(), r.to_owned()))?;
        via.push((announced, reachable));
    }
    Some(Args {
        port,
        db,
        instance,
        via,
        seeds: args.collect(),
    })
}

async fn build(args: &Args, counters: Counters) -> Result<(Service, Headroom), Box<dyn Error>> {
    let redis = args.via.iter().fold(
        RedisConfig::cluster(args.seeds.iter().map(String::as_str)),
        |config, (announced, reachable)| config.with_address(announced, reachable),
    );
    let headroom = Headroom::builder()
        .namespace("fleet")
        .redis_with(redis)
        .await?;
    let products = headroom
        .cache::<String, u64>("products")?
        .ttl(Duration::from_secs(600))
        .build()?;
    let locked = headroom
        .cache::<String, u64>("locked-products")?
        .ttl(Duration::from_secs(600))
        .fleet_lock(headroom.lease_store().clone(), Duration::from_secs(1))
        .build()?;
    let bulkhead = headroom
        .bulkhead(format!("db-{}", args.instance))
        .max_concurrent(DB_CONCURRENCY)
        .max_queued(2 * DB_CONCURRENCY)
        .max_wait(Duration::from_millis(100))
        .build()?;
    let shedder = LoadShedder::builder(bulkhead)
        .shed_at(Priority::Sheddable, 0.5)
        .shed_at(Priority::Default, 0.75)
        // Waits are bounded by max_wait (100 ms), so only sheddable and default work is shed
        // on queue delay; critical work is refused only when the compartment is full.
        .queue_delay_target(Duration::from_millis(200))
        .build()?;
    let tiers = TierConfig::new()
        .tier("free", Quota::per_second(2)?.with_burst(2)?)
        .tier("pro", Quota::per_second(10)?.with_burst(10)?);
    // While Redis is out of reach, each instance enforces its share of every quota.
    let limiter = headroom
        .rate_limiter("checkout", tiers)?
        .fallback(Fallback::Local {
            instances: INSTANCES,
        })
        .build()?;
    let orders = headroom
        .idempotency()
        .in_progress(InProgressPolicy::Wait {
            max_wait: Duration::from_secs(2),
        })
        .build()?;
    let service = Service {
        instance: args.instance,
        products,
        locked,
        shedder,
        limiter,
        orders,
        db: Client::new(args.db, Duration::from_secs(2)),
        counters,
        loads: AtomicU64::new(0),
    };
    Ok((service, headroom))
}

#[tokio::main]
async fn main() -> ExitCode {
    let Some(args) = args() else {
        eprintln!(
            "usage: fleet-service <port> <database address> <instance> [--via A=B]... <seed URL>..."
        );
        return ExitCode::from(2);
    };
    let counters = Counters::install();
    let (service, headroom) = match build(&args, counters).await {
        Ok((service, headroom)) => (Arc::new(service), headroom),
        Err(err) => {
            eprintln!("fleet-service {}: {err}", args.instance);
            return ExitCode::FAILURE;
        }
    };
    let listener = match TcpListener::bind(("127.0.0.1", args.port)).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("fleet-service {}: {err}", args.instance);
            return ExitCode::FAILURE;
        }
    };
    let Ok(mut terminate) = signal(SignalKind::terminate()) else {
        return ExitCode::FAILURE;
    };
    println!("ready");
    // The trial holds this instance's standard input open; its end means the trial is gone.
    // A thread of its own, so that the blocking read never holds up the runtime's shutdown.
    let instance = args.instance;
    std::thread::spawn(move || {
        let mut buffer = [0_u8; 64];
        while matches!(std::io::stdin().read(&mut buffer), Ok(n) if n > 0) {}
        eprintln!("fleet-service {instance}: the trial is gone; exiting");
        std::process::exit(1);
    });
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let service = Arc::clone(&service);
                    tokio::spawn(serve_lines(stream, move |request| {
                        Arc::clone(&service).handle(request)
                    }));
                }
            }
            _ = terminate.recv() => break,
        }
    }
    headroom.shutdown().await;
    ExitCode::SUCCESS
}
