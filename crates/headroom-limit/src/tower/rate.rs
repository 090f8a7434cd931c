//! HTTP rate limits as tower middleware.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, Request, Response, StatusCode};
use tower_layer::Layer;
use tower_service::Service;

use super::BoxError;
use crate::rate::{Admitted, Quota, RateErrorKind, RateLimit, Resolve};

/// The `RateLimit-Policy` header of the IETF draft: `"<tier>";q=<limit>;w=<period in s>`.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// The `RateLimit` header of the IETF draft: `"<tier>";r=<remaining>;t=<seconds to full>`.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Wraps HTTP services in a [`RateLimitService`] charging each request to the tier and key
/// its [`Resolve`]r names.
///
/// Admitted responses carry `RateLimit-Policy` and `RateLimit`; refused requests get
/// `429 Too Many Requests` with `Retry-After` as well, without reaching the inner service.
/// A distributed limiter failing closed answers `503 Service Unavailable` with `Retry-After`.
///
/// ```
/// use headroom_limit::rate::{LocalRateLimiter, Quota, RateKey, TierConfig};
/// use headroom_limit::tower::RateLimitLayer;
/// use http::{Request, Response, StatusCode};
/// use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let limiter = LocalRateLimiter::builder("api", TierConfig::new().tier("free", Quota::per_minute(1)?)).build()?;
/// let mut service = ServiceBuilder::new()
///     .layer(RateLimitLayer::new(limiter, |request: &Request<()>| {
///         let token = request.headers().get("x-api-token")?.to_str().ok()?;
///         Some(RateKey::new("free", token))
///     }))
///     .service(service_fn(|_: Request<()>| async { Ok::<_, std::io::Error>(Response::new(String::new())) }));
/// let request = || Request::builder().header("x-api-token", "t1").body(()).unwrap();
/// let ok = service.ready().await?.call(request()).await?;
/// assert_eq!(ok.headers()["ratelimit"], "\"free\";r=0;t=60");
/// let refused = service.ready().await?.call(request()).await?;
/// assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
/// assert_eq!(refused.headers()["retry-after"], "60");
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct RateLimitLayer<L, R> {
    limiter: L,
    resolver: R,
}

impl<L, R> RateLimitLayer<L, R> {
    /// A layer charging requests to `limiter` as `resolver` says.
    pub fn new(limiter: L, resolver: R) -> Self {
        Self { limiter, resolver }
    }
}

impl<S, L: Clone, R: Clone> Layer<S> for RateLimitLayer<L, R> {
    type Service = RateLimitService<S, L, R>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            limiter: self.limiter.clone(),
            resolver: self.resolver.clone(),
        }
    }
}

/// Answers requests over their quota with 429 and passes the others on, adding the rate-limit
/// headers to every answer. `poll_ready` is the inner service's.
///
/// The response future is boxed: the limiter's check may wait on a shared store.
#[derive(Clone, Debug)]
pub struct RateLimitService<S, L, R> {
    inner: S,
    limiter: L,
    resolver: R,
}

/// The response future of [`RateLimitService`].
pub type RateLimitFuture<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

impl<S, L, R, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimitService<S, L, R>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    L: RateLimit,
    R: Resolve<Request<ReqBody>>,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = BoxError;
    type Future = RateLimitFuture<Response<ResBody>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The clone takes the place of the service that was polled ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limiter = self.limiter.clone();
        let resolved = self.resolver.resolve(&request);
        Box::pin(async move {
            let Some(rate_key) = resolved else {
                return inner.call(request).await.map_err(Into::into);
            };
            let tier = rate_key.tier;
            match limiter.check(&tier, &rate_key.key, rate_key.cost).await {
                Ok(admitted) => {
                    let mut response = inner.call(request).await.map_err(Into::into)?;
                    set_headers(response.headers_mut(), &tier, &admitted);
                    Ok(response)
                }
                Err(error) => match (error.kind(), error.limited()) {
                    (RateErrorKind::Limited, Some(limited)) => {
                        let mut response =
                            refusal(StatusCode::TOO_MANY_REQUESTS, limited.retry_after());
                        let headers = response.headers_mut();
                        set_policy(headers, &tier, limited.quota());
                        insert(
                            headers,
                            RATELIMIT,
                            format!("\"{tier}\";r=0;t={}", seconds(limited.retry_after())),
                        );
                        Ok(response)
                    }
                    (RateErrorKind::Unavailable, _) => Ok(refusal(
                        StatusCode::SERVICE_UNAVAILABLE,
                        Duration::from_secs(1),
                    )),
                    _ => Err(error.into()),
                },
            }
        })
    }
}

/// Whole seconds, rounded up: a client waiting that long is admitted.
fn seconds(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

fn insert(headers: &mut HeaderMap, name: HeaderName, value: String) {
    // Tier names are validated tokens, so the values are always valid header values.
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert(name, value);
    }
}

fn set_policy(headers: &mut HeaderMap, tier: &str, quota: Quota) {
    insert(
        headers,
        RATELIMIT_POLICY,
        format!(
            "\"{tier}\";q={};w={}",
            quota.limit(),
            seconds(quota.period())
        ),
    );
}

fn set_headers(headers: &mut HeaderMap, tier: &str, admitted: &Admitted) {
    set_policy(headers, tier, admitted.quota());
    insert(
        headers,
        RATELIMIT,
        format!(
            "\"{tier}\";r={};t={}",
            admitted.remaining(),
            seconds(admitted.reset_after())
        ),
    );
}

fn refusal<B: Default>(status: StatusCode, retry_after: Duration) -> Response<B> {
    let mut response = Response::new(B::default());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(seconds(retry_after).max(1)));
    response
}
