//! The HTTP rate-limit layer: 429 with `Retry-After`, the IETF `RateLimit` headers on every
//! answer, 503 when failing closed, and unlimited requests passed through.
#![cfg(feature = "tower")]

use std::time::Duration;

use headroom_core::rate::{Gcra, RateDecision, RateStore};
use headroom_core::{BackendError, BackendErrorKind, Key, ManualClock, Namespace};
use headroom_limit::rate::{
    DistributedRateLimiter, Fallback, LocalRateLimiter, Quota, RateError, RateKey, TierConfig,
};
use headroom_limit::tower::RateLimitLayer;
use http::{Request, Response, StatusCode};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn request(tier: &str, token: &str) -> Request<()> {
    Request::builder()
        .header("x-tier", tier)
        .header("x-token", token)
        .body(())
        .unwrap()
}

fn resolve(request: &Request<()>) -> Option<RateKey> {
    let tier = request.headers().get("x-tier")?.to_str().ok()?.to_owned();
    let token = request.headers().get("x-token")?.to_str().ok()?;
    Some(RateKey::new(tier, token))
}

async fn ok(_: Request<()>) -> Result<Response<String>, BoxError> {
    Ok(Response::new("done".to_owned()))
}

#[tokio::test]
async fn admitted_requests_carry_the_headers_and_refused_ones_get_429_with_retry_after() {
    let clock = ManualClock::new();
    let tiers = TierConfig::new().tier("free", Quota::per_minute(2).unwrap());
    let limiter = LocalRateLimiter::builder("api", tiers)
        .clock(clock.clock())
        .build()
        .unwrap();
    let mut service = ServiceBuilder::new()
        .layer(RateLimitLayer::new(limiter, resolve))
        .service(service_fn(ok));

    let first = service
        .ready()
        .await
        .unwrap()
        .call(request("free", "a"))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.headers()["ratelimit-policy"], "\"free\";q=2;w=60");
    assert_eq!(first.headers()["ratelimit"], "\"free\";r=1;t=30");
    assert!(first.headers().get("retry-after").is_none());

    service
        .ready()
        .await
        .unwrap()
        .call(request("free", "a"))
        .await
        .unwrap();
    clock.advance(Duration::from_millis(10_500));
    let refused = service
        .ready()
        .await
        .unwrap()
        .call(request("free", "a"))
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.body(), "");
    // 19.5 s to wait, rounded up so a client that waits is admitted.
    assert_eq!(refused.headers()["retry-after"], "20");
    assert_eq!(refused.headers()["ratelimit"], "\"free\";r=0;t=20");
    assert_eq!(refused.headers()["ratelimit-policy"], "\"free\";q=2;w=60");

    // Another key has its own quota; a request the resolver does not name is not limited.
    let other = service
        .ready()
        .await
        .unwrap()
        .call(request("free", "b"))
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::OK);
    for _ in 0..5 {
        let unlimited = Request::builder().body(()).unwrap();
        let response = service
            .ready()
            .await
            .unwrap()
            .call(unlimited)
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers().get("ratelimit").is_none());
    }
}

#[tokio::test]
async fn an_unknown_tier_is_an_error_not_a_refusal() {
    let limiter = LocalRateLimiter::builder("api", TierConfig::new())
        .build()
        .unwrap();
    let mut service = ServiceBuilder::new()
        .layer(RateLimitLayer::new(limiter, resolve))
        .service(service_fn(ok));
    let error = service
        .ready()
        .await
        .unwrap()
        .call(request("gold", "a"))
        .await
        .unwrap_err();
    assert!(error.downcast_ref::<RateError>().is_some());
}

#[derive(Debug)]
struct DownStore;

impl RateStore for DownStore {
    async fn apply_all(&self, _: &[(Key, Gcra)], _: u32) -> Result<RateDecision, BackendError> {
        Err(BackendError::new(BackendErrorKind::Connection))
    }
}

#[tokio::test]
async fn failing_closed_answers_503_with_retry_after() {
    let limiter = DistributedRateLimiter::builder(
        "api",
        DownStore,
        Namespace::new("rate").unwrap(),
        TierConfig::new().tier("free", Quota::per_minute(2).unwrap()),
    )
    .fallback(Fallback::Closed)
    .build()
    .unwrap();
    let mut service = ServiceBuilder::new()
        .layer(RateLimitLayer::new(limiter, resolve))
        .service(service_fn(ok));
    let response = service
        .ready()
        .await
        .unwrap()
        .call(request("free", "a"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
}
