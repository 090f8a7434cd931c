//! A tower layer that gives HTTP services idempotency through the `Idempotency-Key` header
//! (IETF draft `draft-ietf-httpapi-idempotency-key-header`).
//!
//! For the configured methods (`POST` and `PATCH` by default) the layer:
//!
//! | situation | response |
//! |---|---|
//! | first request with a key | the service's response; stored unless it is a 408, 409, 425 or 429 (server errors are stored: the handler may have acted before it failed); a response not stored reaches its caller as the service gave it, streamed |
//! | retry with the same key and request | the stored status, replayed headers and body, plus `Idempotent-Replayed: true` |
//! | stored response's body over `max_outcome_len`, or failing while read | to the first request and every retry: the status and replayed headers (left out too when they leave no room for `Idempotent-Body-Omitted`), an empty body and `Idempotent-Body-Omitted: true`; the handler never runs again |
//! | key missing (when required) | `400 Bad Request` |
//! | key malformed, too long, or sent twice | `400 Bad Request` |
//! | no scope (tenant or principal) for the request, or an empty one | `401 Unauthorized` |
//! | same key and endpoint (method and path), different query or body | `422 Unprocessable Content` |
//! | the first request is still running | `409 Conflict` with `Retry-After` |
//! | the lease was lost while the request ran (an extension refused, or the store unreachable for a whole lease): the handler was stopped, or, had it answered, its answer is kept with the body omitted for the retry | `409 Conflict` with `Retry-After` |
//! | another request took the key over before this one's response was stored | `409 Conflict` with `Retry-After` |
//! | body larger than the limit | `413 Content Too Large` |
//! | record store down (failing closed) | `503 Service Unavailable` with `Retry-After` |
//! | the runtime running the request shut down before it answered | `503 Service Unavailable` with `Retry-After` |
//!
//! A client that goes away does not stop a keyed request halfway: a handler dropped after its
//! effect would release the key, and the client's retry would run it again. So each keyed
//! request runs on a task of its own until the handler answers and the key keeps the outcome,
//! which the retry replays; the answer's body is read for the record only while the client
//! waits (once it is gone, the record keeps the status and headers, the body omitted). A
//! request still waiting for its key (a duplicate of one running), or for the inner service's
//! capacity, when its client goes away stops there: the handler is never called for nobody.
//! The task runs in the request's span; a timeout or concurrency limit outside this layer no
//! longer bounds the handler once the client is gone, so bound slow dependencies inside it
//! (the lease is extended for as long as the handler runs).
//!
//! A panic in the handler fails that request only, as without the layer, and releases the key
//! like an error: the handler has not answered, so a retry runs it again, even when it had
//! charged the card before it panicked (tower-http's `CatchPanicLayer` outside this layer
//! answers that request 500 and the client retries). A handler that may panic after its effect
//! wants `CatchPanicLayer` *inside* this layer, between it and the handler: the panic becomes a
//! 500 response, stored and replayed like any server error.
//!
//! Before it calls the handler, the layer puts the lease's
//! [`FencingToken`](crate::FencingToken) into the request's extensions
//! (`request.extensions().get::<FencingToken>()`, or axum's `Extension<FencingToken>`), for the
//! handler's own writes to compare, as [`Lease::token`](crate::Lease::token); it is absent when
//! the request runs without a record (the store down and
//! [`StoreFailure::FailOpen`](crate::StoreFailure::FailOpen)).
//!
//! The layer's service is always ready: it reserves none of the inner service's capacity for
//! a request that may never call it (a replay, a refusal, a duplicate waiting for its key, a
//! body still uploading). A request drives its own clone of the inner service to ready only
//! once it is to call it, as tower's `Oneshot` does, so the backpressure of a concurrency
//! limit or a buffer inside this layer applies to the requests that run the handler, and a
//! retry storm on one slow key does not starve the others. A keyed request waits for that
//! capacity holding its key (its duplicates wait or get 409 meanwhile); a client that goes
//! away before the handler is called stops it there and frees the key. An error of the inner
//! service's `poll_ready` (or a panic in it) fails that request alone, and frees its key: the
//! handler did not run. Layers outside this one see it always ready, so one that sheds load when its
//! inner service is not ready (tower's `LoadShed`) sheds nothing there: put it inside.
//!
//! The request fingerprint is the method, path and query, and body by default; replace it with
//! [`IdempotencyLayer::fingerprint`]. Records are scoped by the tenant the scope function
//! returns, and by method and path, so a key can never replay another tenant's response.
//! The path is the one this layer sees: a router that strips a prefix before it (axum's
//! `Router::nest`) makes `/v1/charges` and `/v1/refunds` both `/`, one record for both. Apply
//! the layer outside `nest`, or name the mount point in the scope function's tenant.
//!
//! ```
//! use headroom_core::memory::MemoryLeaseStore;
//! use headroom_idempotency::Idempotency;
//! use headroom_idempotency::http::IdempotencyLayer;
//!
//! let executor = Idempotency::builder(MemoryLeaseStore::new()).build().unwrap();
//! // The scope is the authenticated principal; here, an API key header.
//! let layer = IdempotencyLayer::new(executor, |parts: &http::request::Parts| {
//!     parts.headers.get("x-api-key")?.to_str().ok().map(str::to_owned)
//! });
//! # let _ = layer;
//! ```

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use headroom_core::lease::LeaseStore;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::{Deserialize, Serialize};
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;

use crate::executor::Keeping;
use crate::{Idempotency, IdempotencyError, IdempotencyKey, Scope};

/// The request header carrying the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The response header marking a replayed response.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// The response header marking a response whose body was left out: it was larger than the
/// store takes (`max_outcome_len`) or failed while it was read. The handler ran; the status and
/// replayed headers are the handler's (the headers left out too when they leave no room for
/// this one), and every retry gets the same.
pub const IDEMPOTENT_BODY_OMITTED: HeaderName = HeaderName::from_static("idempotent-body-omitted");

type Fingerprint = dyn Fn(&http::request::Parts, &[u8]) -> Vec<u8> + Send + Sync;
type StoreStatus = dyn Fn(StatusCode) -> bool + Send + Sync;

/// Applies [`Idempotency`] to HTTP requests. See the [module docs](self).
pub struct IdempotencyLayer<S, F> {
    executor: Idempotency<S>,
    options: Arc<Options<F>>,
}

struct Options<F> {
    scope: Arc<F>,
    methods: Vec<Method>,
    require_key: bool,
    max_body_len: usize,
    replay_headers: Vec<HeaderName>,
    fingerprint: Arc<Fingerprint>,
    store_status: Arc<StoreStatus>,
}

impl<F> Clone for Options<F> {
    fn clone(&self) -> Self {
        Self {
            scope: Arc::clone(&self.scope),
            methods: self.methods.clone(),
            require_key: self.require_key,
            max_body_len: self.max_body_len,
            replay_headers: self.replay_headers.clone(),
            fingerprint: Arc::clone(&self.fingerprint),
            store_status: Arc::clone(&self.store_status),
        }
    }
}

impl<S, F> Clone for IdempotencyLayer<S, F> {
    fn clone(&self) -> Self {
        Self {
            executor: self.executor.clone(),
            options: Arc::clone(&self.options),
        }
    }
}

impl<S, F> fmt::Debug for IdempotencyLayer<S, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("methods", &self.options.methods)
            .field("require_key", &self.options.require_key)
            .field("max_body_len", &self.options.max_body_len)
            .finish_non_exhaustive()
    }
}

/// Whether a response status is stored and replayed by default: every status but those that
/// ask the client to retry a request that was not acted on (408, 409, 425 and 429).
///
/// Server errors are stored, as Stripe does: a handler that charged a card and then failed with
/// a 500 must not charge again on retry. Opt statuses out with
/// [`IdempotencyLayer::store_status`].
pub fn is_final_status(status: StatusCode) -> bool {
    !matches!(status.as_u16(), 408 | 409 | 425 | 429)
}

fn default_fingerprint(parts: &http::request::Parts, body: &[u8]) -> Vec<u8> {
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut fingerprint =
        Vec::with_capacity(parts.method.as_str().len() + target.len() + body.len() + 2);
    fingerprint.extend_from_slice(parts.method.as_str().as_bytes());
    fingerprint.push(0);
    fingerprint.extend_from_slice(target.as_bytes());
    fingerprint.push(0);
    fingerprint.extend_from_slice(body);
    fingerprint
}

impl<S, F> IdempotencyLayer<S, F>
where
    S: LeaseStore,
    F: Fn(&http::request::Parts) -> Option<String> + Send + Sync + 'static,
{
    /// A layer over `executor`; `scope` names the tenant or principal a request belongs to.
    pub fn new(executor: Idempotency<S>, scope: F) -> Self {
        Self {
            executor,
            options: Arc::new(Options {
                scope: Arc::new(scope),
                methods: vec![Method::POST, Method::PATCH],
                require_key: true,
                max_body_len: 1024 * 1024,
                replay_headers: vec![
                    header::CONTENT_TYPE,
                    header::CONTENT_ENCODING,
                    header::CONTENT_LANGUAGE,
                    header::LOCATION,
                    header::CONTENT_LOCATION,
                    header::ETAG,
                ],
                fingerprint: Arc::new(default_fingerprint),
                store_status: Arc::new(is_final_status),
            }),
        }
    }

    /// The options of this layer alone: copied first if a clone shares them.
    fn options_mut(&mut self) -> &mut Options<F> {
        Arc::make_mut(&mut self.options)
    }

    /// The methods protected (default `POST` and `PATCH`); others pass through.
    #[must_use]
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.options_mut().methods = methods.into_iter().collect();
        self
    }

    /// Whether a protected request without a key is refused with 400 (default) or passes
    /// through unprotected.
    #[must_use]
    pub fn require_key(mut self, require: bool) -> Self {
        self.options_mut().require_key = require;
        self
    }

    /// The largest request body accepted, in bytes (default 1 MiB); larger ones get 413.
    #[must_use]
    pub fn max_body_len(mut self, max: usize) -> Self {
        self.options_mut().max_body_len = max;
        self
    }

    /// The response headers stored and replayed (default: content type, encoding and
    /// language, location, content location, etag). The body is stored as the handler gave
    /// it: with a compression layer inside this one, it is replayed compressed as for the
    /// first request, so place compression outside this layer to fit each retry's
    /// `Accept-Encoding`.
    #[must_use]
    pub fn replay_headers(mut self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        self.options_mut().replay_headers = headers.into_iter().collect();
        self
    }

    /// Replaces the request fingerprint (default: method, path and query, body).
    #[must_use]
    pub fn fingerprint(
        mut self,
        fingerprint: impl Fn(&http::request::Parts, &[u8]) -> Vec<u8> + Send + Sync + 'static,
    ) -> Self {
        self.options_mut().fingerprint = Arc::new(fingerprint);
        self
    }

    /// Replaces the rule deciding which response statuses are stored (default
    /// [`is_final_status`]); other responses release the key so a retry runs the handler
    /// again. To opt one status out, say a 503 that only a handler's own load shedding returns:
    ///
    /// ```
    /// # use headroom_core::memory::MemoryLeaseStore;
    /// # use headroom_idempotency::Idempotency;
    /// use headroom_idempotency::http::{IdempotencyLayer, is_final_status};
    /// use http::StatusCode;
    /// # let executor = Idempotency::builder(MemoryLeaseStore::new()).build().unwrap();
    /// # let scope = |_: &http::request::Parts| Some(String::from("tenant"));
    /// let layer = IdempotencyLayer::new(executor, scope)
    ///     .store_status(|status| is_final_status(status) && status != StatusCode::SERVICE_UNAVAILABLE);
    /// # let _ = layer;
    /// ```
    #[must_use]
    pub fn store_status(
        mut self,
        store_status: impl Fn(StatusCode) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.options_mut().store_status = Arc::new(store_status);
        self
    }
}

impl<S, F, Inner> Layer<Inner> for IdempotencyLayer<S, F> {
    type Service = IdempotencyService<S, F, Inner>;

    fn layer(&self, inner: Inner) -> Self::Service {
        IdempotencyService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`IdempotencyLayer`].
pub struct IdempotencyService<S, F, Inner> {
    inner: Inner,
    layer: IdempotencyLayer<S, F>,
}

impl<S, F, Inner: Clone> Clone for IdempotencyService<S, F, Inner> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S, F, Inner: fmt::Debug> fmt::Debug for IdempotencyService<S, F, Inner> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("inner", &self.inner)
            .field("layer", &self.layer)
            .finish()
    }
}

/// A response as stored for replay.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
struct StoredResponse<B> {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    /// The first response's full head, returned to its own caller (never stored).
    #[serde(skip)]
    head: Option<http::response::Parts>,
    /// The body of a response that is not stored, passed to its caller unread.
    #[serde(skip)]
    unread: Option<B>,
    /// Kept without its body: a retry does not get it whole.
    #[serde(skip)]
    body_omitted: bool,
}

/// What a stored response takes beyond its body of up to `max_body` bytes, as encoded: the
/// format byte, the status, the headers, and the lengths (postcard varints).
fn stored_overhead(status: u16, headers: &[(String, Vec<u8>)], max_body: usize) -> usize {
    let headers_len: usize = headers
        .iter()
        .map(|(name, value)| varint(name.len()) + name.len() + varint(value.len()) + value.len())
        .sum();
    1 + varint(usize::from(status)) + varint(headers.len()) + headers_len + varint(max_body)
}

/// The bytes a postcard varint of `n` takes.
fn varint(n: usize) -> usize {
    (usize::BITS - n.leading_zeros()).max(1).div_ceil(7) as usize
}

/// A response whose body could not be kept: its status and headers, and a header saying so;
/// without the headers when they would leave no room for that header under `max_len`, so that
/// the status is kept whenever it fits.
fn body_omitted<B>(
    status: u16,
    mut headers: Vec<(String, Vec<u8>)>,
    max_len: usize,
) -> StoredResponse<B> {
    headers.push((
        IDEMPOTENT_BODY_OMITTED.as_str().to_owned(),
        b"true".to_vec(),
    ));
    if stored_overhead(status, &headers, 0) > max_len {
        headers.drain(..headers.len() - 1);
    }
    StoredResponse {
        status,
        headers,
        body: Vec::new(),
        head: None,
        unread: None,
        body_omitted: true,
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, F, Inner, ReqB, ResB> Service<Request<ReqB>> for IdempotencyService<S, F, Inner>
where
    S: LeaseStore,
    F: Fn(&http::request::Parts) -> Option<String> + Send + Sync + 'static,
    Inner: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    Inner::Future: Send,
    Inner::Error: Send + 'static,
    ReqB: Body + From<Bytes> + Send + 'static,
    ReqB::Data: Send,
    ReqB::Error: Into<Box<dyn StdError + Send + Sync>>,
    ResB: Body + From<Bytes> + Send + 'static,
    ResB::Data: Send,
    ResB::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    type Response = Response<ResB>;
    type Error = Inner::Error;
    type Future = BoxFuture<Result<Response<ResB>, Inner::Error>>;

    /// Always ready: the inner service's capacity is taken by each request that calls it, in
    /// its own future, not reserved here for one that may never call it (a replay, a refusal, a
    /// duplicate waiting for its key, a body still uploading).
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        // A clone nobody readied: the request drives it to ready before it calls it.
        let mut inner = self.inner.clone();
        let layer = self.layer.clone();
        Box::pin(async move {
            let options = &layer.options;
            if !options.methods.contains(request.method()) {
                return call_when_ready(&mut inner, request).await;
            }
            let (parts, body) = request.into_parts();
            let mut values = parts.headers.get_all(IDEMPOTENCY_KEY).iter();
            let key = match (values.next(), values.next()) {
                (None, _) if options.require_key => {
                    return Ok(plain(
                        StatusCode::BAD_REQUEST,
                        "the Idempotency-Key header is required",
                    ));
                }
                (None, _) => {
                    return call_when_ready(&mut inner, Request::from_parts(parts, body)).await;
                }
                (Some(_), Some(_)) => {
                    return Ok(plain(
                        StatusCode::BAD_REQUEST,
                        "send one Idempotency-Key header",
                    ));
                }
                (Some(value), None) => match IdempotencyKey::parse_header(value.as_bytes()) {
                    Ok(key) => key,
                    Err(err) => return Ok(plain(StatusCode::BAD_REQUEST, &err.to_string())),
                },
            };
            let Some(tenant) = (options.scope)(&parts).filter(|tenant| !tenant.is_empty()) else {
                return Ok(plain(
                    StatusCode::UNAUTHORIZED,
                    "no principal to scope the idempotency key to",
                ));
            };
            let scope = match Scope::new(tenant, operation(&parts.method, parts.uri.path())) {
                Ok(scope) => scope,
                Err(err) => return Ok(plain(StatusCode::BAD_REQUEST, &err.to_string())),
            };
            let body = match Limited::new(body, options.max_body_len).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => {
                    return Ok(plain(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "the request body is too large",
                    ));
                }
                Err(_) => {
                    return Ok(plain(
                        StatusCode::BAD_REQUEST,
                        "the request body could not be read",
                    ));
                }
            };
            let fingerprint = (options.fingerprint)(&parts, &body);
            let request = Request::from_parts(parts, ReqB::from(body));
            // The client going away must not stop the handler halfway: the key would be
            // released and the client's retry would run it again. So the request runs on a
            // task of its own until the handler answers and the key keeps the outcome; the
            // answer's body is read for the record only while the client waits for it. A
            // request still waiting for the key, or for the inner service's capacity, when its
            // client goes away stops there.
            let (_client_waits, client_gone) = tokio::sync::watch::channel(());
            // In the request's span, as when it ran on the caller's task.
            let executing = tokio::spawn(
                execute(layer, scope, key, fingerprint, client_gone, inner, request)
                    .in_current_span(),
            );
            match executing.await {
                Ok(response) => response,
                Err(failed) if failed.is_panic() => std::panic::resume_unwind(failed.into_panic()),
                // Its runtime shut down under it: the outcome is unknown, as after a crash.
                Err(_) => Ok(with_retry_after(
                    plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the server stopped while running the request",
                    ),
                    Duration::from_secs(1),
                )),
            }
        })
    }
}

/// Drives `inner`, a clone nobody readied, to ready and calls it (tower's `Oneshot`): its
/// readiness error is this request's.
async fn call_when_ready<Inner: Service<Request>, Request>(
    inner: &mut Inner,
    request: Request,
) -> Result<Inner::Response, Inner::Error> {
    std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
    inner.call(request).await
}

/// Runs one keyed request through the executor and answers with its response: the handler's,
/// a replay or a refusal.
async fn execute<S, F, Inner, ReqB, ResB>(
    layer: IdempotencyLayer<S, F>,
    scope: Scope,
    key: IdempotencyKey,
    fingerprint: Vec<u8>,
    client_gone: tokio::sync::watch::Receiver<()>,
    mut inner: Inner,
    mut request: Request<ReqB>,
) -> Result<Response<ResB>, Inner::Error>
where
    S: LeaseStore,
    Inner: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Body + From<Bytes>,
    ResB::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let options = &layer.options;
    let replay_headers = &options.replay_headers;
    let store_status = &options.store_status;
    let max_response_len = layer.executor.config().max_outcome_len;
    // Resolves when the client stops waiting (its side of the channel dropped).
    let gone = |mut client: tokio::sync::watch::Receiver<()>| async move {
        let _ = client.changed().await;
    };
    let started = AtomicBool::new(false);
    let executing = layer.executor.execute_keeping(
        &scope,
        &key,
        &fingerprint,
        |stored: &StoredResponse<ResB>| {
            if !StatusCode::from_u16(stored.status).is_ok_and(|status| store_status(status)) {
                Keeping::Not
            } else if stored.body_omitted {
                // A retry gets its status and headers only.
                Keeping::Partly
            } else {
                Keeping::Whole
            }
        },
        |lease| {
            let started = &started;
            let client_gone = gone(client_gone.clone());
            // No token when the request runs without a record (the store down, failing open).
            let token = lease.is_held().then(|| lease.token());
            async move {
                // Only the request that runs the handler takes the inner service's capacity,
                // and only now. A readiness error fails this request and releases the key: the
                // handler did not run.
                std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
                // Until here, a client gone stops the request and releases the key.
                started.store(true, Ordering::Relaxed);
                if let Some(token) = token {
                    request.extensions_mut().insert(token);
                }
                let response = inner.call(request).await?;
                let (head, body) = response.into_parts();
                let headers: Vec<(String, Vec<u8>)> = replay_headers
                    .iter()
                    .flat_map(|name| {
                        head.headers
                            .get_all(name)
                            .iter()
                            .map(|value| (name.as_str().to_owned(), value.as_bytes().to_vec()))
                    })
                    .collect();
                let status = head.status.as_u16();
                // The handler has run: whatever happens next (the storing policy panicking,
                // the body's read failing, the client going away meanwhile), the key must
                // keep an outcome, or a retry would run the handler again. A status not to
                // store releases the key all the same once this returns.
                let omitted = body_omitted(status, headers.clone(), max_response_len);
                lease.took_effect_as(&omitted, false);
                if !store_status(head.status) {
                    // Nothing is replayed from it: its caller gets it as it is.
                    return Ok(StoredResponse {
                        status,
                        headers: Vec::new(),
                        body: Vec::new(),
                        head: Some(head),
                        unread: Some(body),
                        body_omitted: false,
                    });
                }
                let max_body = max_response_len.saturating_sub(stored_overhead(
                    status,
                    &headers,
                    max_response_len,
                ));
                let read = Limited::new(body, max_body).collect();
                tokio::select! {
                    biased;
                    read = read => match read {
                        // Headers that alone pass the limit leave no room even for an empty
                        // body (`max_body` is then 0): kept as for a body too large.
                        Ok(_) if stored_overhead(status, &headers, 0) > max_response_len => {
                            Ok(omitted)
                        }
                        Ok(body) => Ok(StoredResponse {
                            status,
                            headers,
                            body: body.to_bytes().to_vec(),
                            head: Some(head),
                            unread: None,
                            body_omitted: false,
                        }),
                        Err(_) => Ok(omitted),
                    },
                    // Nobody to answer: the outcome recorded above stands.
                    () = client_gone => Ok(omitted),
                }
            }
        },
    );
    let mut executing = std::pin::pin!(executing);
    let mut client_left = std::pin::pin!(gone(client_gone.clone()));
    let outcome = std::future::poll_fn(|cx| {
        // Until the handler is called, nobody waits for what would come of it: a client gone
        // is seen before the wait could take the key.
        if !started.load(Ordering::Relaxed) && client_left.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        executing.as_mut().poll(cx).map(Some)
    })
    .await;
    let Some(outcome) = outcome else {
        return Ok(plain(StatusCode::REQUEST_TIMEOUT, "the client went away"));
    };
    match outcome {
        Ok(executed) => Ok(rebuild(executed.value, executed.replayed)),
        Err(IdempotencyError::Operation(err)) => Err(err),
        Err(err) => Ok(refusal(&err)),
    }
}

fn rebuild<B: From<Bytes>>(stored: StoredResponse<B>, replayed: bool) -> Response<B> {
    let body = stored
        .unread
        .unwrap_or_else(|| B::from(Bytes::from(stored.body)));
    if let Some(head) = stored.head {
        return Response::from_parts(head, body);
    }
    let mut response = Response::new(body);
    *response.status_mut() =
        StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (name, value) in stored.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::from_bytes(&value))
        {
            response.headers_mut().append(name, value);
        }
    }
    if replayed {
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    response
}

fn refusal<E, B: From<Bytes>>(err: &IdempotencyError<E>) -> Response<B> {
    match err {
        IdempotencyError::InvalidKey(err) => plain(StatusCode::BAD_REQUEST, &err.to_string()),
        IdempotencyError::KeyReused => plain(
            StatusCode::UNPROCESSABLE_ENTITY,
            "this Idempotency-Key was used with a different request",
        ),
        IdempotencyError::InProgress { retry_after } => with_retry_after(
            plain(
                StatusCode::CONFLICT,
                "a request with this Idempotency-Key is in progress",
            ),
            *retry_after,
        ),
        IdempotencyError::Fenced => with_retry_after(
            plain(
                StatusCode::CONFLICT,
                "another request with this Idempotency-Key took over",
            ),
            Duration::from_secs(1),
        ),
        // The store may have been out of reach, with nobody else holding the key.
        IdempotencyError::LeaseLost => with_retry_after(
            plain(
                StatusCode::CONFLICT,
                "the lease on this Idempotency-Key was lost while the request ran; retry it with the same key",
            ),
            Duration::from_secs(1),
        ),
        IdempotencyError::Unavailable(_) => with_retry_after(
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "idempotency records are unavailable",
            ),
            Duration::from_secs(1),
        ),
        IdempotencyError::NotReplayable => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the request with this Idempotency-Key was executed, but its response was not stored and cannot be replayed",
        ),
        _ => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the idempotent response could not be stored or read",
        ),
    }
}

fn plain<B: From<Bytes>>(status: StatusCode, message: &str) -> Response<B> {
    let mut response = Response::new(B::from(Bytes::copy_from_slice(message.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn with_retry_after<B>(mut response: Response<B>, after: Duration) -> Response<B> {
    let seconds = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    response
}

/// The operation a request's records are scoped by: its method and path, or, for a path too
/// long for a [`Scope`], the method, the path's beginning and the XXH3-128 hash of the whole
/// path. A crafted collision could only replay the crafter's own outcome: the tenant and key
/// are part of the scope too.
fn operation(method: &Method, path: &str) -> String {
    let whole = format!("{method} {path}");
    if whole.len() <= Scope::MAX_LEN {
        return whole;
    }
    let hash = format!(" #{:032x}", xxhash_rust::xxh3::xxh3_128(path.as_bytes()));
    let mut end = Scope::MAX_LEN - hash.len();
    while !whole.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{hash}", &whole[..end])
}
