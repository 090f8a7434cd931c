//! The Idempotency-Key layer and the readiness of the service inside it: only a request that
//! runs the handler takes the inner service's capacity, and an inner readiness error fails that
//! request alone.
#![cfg(feature = "tower")]

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use headroom_core::memory::MemoryLeaseStore;
use headroom_idempotency::Idempotency;
use headroom_idempotency::http::IdempotencyLayer;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use tokio::sync::Notify;
use tower::limit::ConcurrencyLimitLayer;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

type Body = Full<Bytes>;
type Scoping = fn(&http::request::Parts) -> Option<String>;

fn tenant(parts: &http::request::Parts) -> Option<String> {
    parts
        .headers
        .get("x-tenant")?
        .to_str()
        .ok()
        .map(str::to_owned)
}

/// The layer with the default policy: a duplicate waits for the outcome, up to 5 s.
fn waiting_layer() -> IdempotencyLayer<MemoryLeaseStore, Scoping> {
    let executor = Idempotency::builder(MemoryLeaseStore::new())
        .build()
        .unwrap();
    IdempotencyLayer::new(executor, tenant as Scoping)
}

fn post<B: From<Bytes>>(key: &str, body: B) -> Request<B> {
    Request::builder()
        .method(Method::POST)
        .uri("/payments")
        .header("x-tenant", "acme")
        .header("idempotency-key", key)
        .body(body)
        .unwrap()
}

/// The calls a handler took, by idempotency key.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<HashMap<String, usize>>>);

impl Calls {
    fn note<B>(&self, request: &Request<B>) -> String {
        let key = request.headers()["idempotency-key"]
            .to_str()
            .unwrap()
            .to_owned();
        *self.0.lock().unwrap().entry(key.clone()).or_default() += 1;
        key
    }

    fn of(&self, key: &str) -> usize {
        self.0.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

/// A handler that answers 201 at once, except for key `a`, which it holds until `release`.
fn holding_a<B: Send + 'static>(
    calls: Calls,
    release: Arc<Notify>,
) -> impl Service<Request<B>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(move |request: Request<B>| {
        let key = calls.note(&request);
        let release = Arc::clone(&release);
        async move {
            if key == "a" {
                release.notified().await;
            }
            let mut response = Response::new(Body::from(format!("payment {key}")));
            *response.status_mut() = StatusCode::CREATED;
            Ok::<_, Infallible>(response)
        }
    })
}

/// Lets every task run until all wait (paused time moves on only then).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

/// A duplicate of a running request waits for its outcome (up to 5 s) and then replays it,
/// never calling the handler: it must not hold a slot of a concurrency limit inside the layer
/// meanwhile, or a few retries of one slow key starve every other key.
#[tokio::test(start_paused = true)]
async fn a_duplicate_waiting_for_its_key_leaves_the_inner_capacity_to_other_keys() {
    let (calls, release) = (Calls::default(), Arc::new(Notify::new()));
    let limited =
        ConcurrencyLimitLayer::new(2).layer(holding_a(calls.clone(), Arc::clone(&release)));
    let service = waiting_layer().layer(limited);

    let a = tokio::spawn(service.clone().oneshot(post("a", Body::from("charge"))));
    settle().await;
    assert_eq!(calls.of("a"), 1, "the handler holds request a");
    let duplicate = tokio::spawn(service.clone().oneshot(post("a", Body::from("charge"))));
    settle().await;
    let mut b = tokio::spawn(service.clone().oneshot(post("b", Body::from("charge"))));

    let answered = tokio::time::timeout(Duration::from_secs(1), &mut b)
        .await
        .expect("b is answered while a runs and its duplicate waits")
        .unwrap()
        .unwrap();
    assert_eq!(answered.status(), StatusCode::CREATED);
    assert_eq!(calls.of("b"), 1);
    assert!(!a.is_finished(), "a is still held");
    assert!(!duplicate.is_finished(), "the duplicate still waits");

    release.notify_one();
    assert_eq!(a.await.unwrap().unwrap().status(), StatusCode::CREATED);
    let replayed = duplicate.await.unwrap().unwrap();
    assert_eq!(replayed.status(), StatusCode::CREATED);
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");
    assert_eq!(calls.of("a"), 1, "the duplicate replayed");
}

/// A request body still being uploaded: its last chunk comes through `rest`.
struct Upload {
    chunk: Option<Bytes>,
    rest: Option<tokio::sync::oneshot::Receiver<Bytes>>,
}

impl From<Bytes> for Upload {
    fn from(bytes: Bytes) -> Self {
        Self {
            chunk: Some(bytes),
            rest: None,
        }
    }
}

impl http_body::Body for Upload {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        if let Some(chunk) = self.chunk.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(chunk))));
        }
        let Some(rest) = self.rest.as_mut() else {
            return Poll::Ready(None);
        };
        let rest = std::task::ready!(Pin::new(rest).poll(cx));
        self.rest = None;
        Poll::Ready(rest.ok().map(|chunk| Ok(http_body::Frame::data(chunk))))
    }
}

/// A keyed request reads its whole body before it knows whether it runs the handler: a slow
/// upload must not hold a slot of a concurrency limit inside the layer meanwhile.
#[tokio::test(start_paused = true)]
async fn a_request_still_uploading_its_body_leaves_the_inner_capacity_to_others() {
    let (calls, release) = (Calls::default(), Arc::new(Notify::new()));
    let limited = ConcurrencyLimitLayer::new(1).layer(holding_a(calls.clone(), release));
    let service = waiting_layer().layer(limited);

    let (tx, rx) = tokio::sync::oneshot::channel();
    let uploading = Upload {
        chunk: Some(Bytes::from_static(b"amount=")),
        rest: Some(rx),
    };
    let slow = tokio::spawn(service.clone().oneshot(post("slow", uploading)));
    settle().await;
    let b = tokio::spawn(
        service
            .clone()
            .oneshot(post("b", Upload::from(Bytes::from("x")))),
    );
    let answered = tokio::time::timeout(Duration::from_secs(1), b)
        .await
        .expect("b is answered while another request's body uploads")
        .unwrap()
        .unwrap();
    assert_eq!(answered.status(), StatusCode::CREATED);
    assert_eq!(calls.of("slow"), 0, "the upload is not done");

    tx.send(Bytes::from_static(b"10")).unwrap();
    assert_eq!(slow.await.unwrap().unwrap().status(), StatusCode::CREATED);
    assert_eq!(calls.of("slow"), 1);
}

/// A request that holds its key but waits for the inner service's capacity has not called the
/// handler: when its client goes away it stops there, and the key is free for the retry.
#[tokio::test(start_paused = true)]
async fn a_request_whose_client_leaves_while_it_waits_for_capacity_never_runs() {
    let (calls, release) = (Calls::default(), Arc::new(Notify::new()));
    let limited =
        ConcurrencyLimitLayer::new(1).layer(holding_a(calls.clone(), Arc::clone(&release)));
    let service = waiting_layer().layer(limited);

    let a = tokio::spawn(service.clone().oneshot(post("a", Body::from("charge"))));
    settle().await;
    let gone = tokio::spawn(service.clone().oneshot(post("c", Body::from("charge"))));
    settle().await;
    gone.abort();
    assert!(gone.await.unwrap_err().is_cancelled());
    release.notify_one();
    assert_eq!(a.await.unwrap().unwrap().status(), StatusCode::CREATED);
    settle().await;
    assert_eq!(calls.of("c"), 0, "nobody waited for c");

    // Not a replay, and no 409: the key was released without an outcome.
    let retry = service
        .clone()
        .oneshot(post("c", Body::from("charge")))
        .await
        .unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert!(retry.headers().get("idempotent-replayed").is_none());
    assert_eq!(calls.of("c"), 1);
}

/// An inner service whose `poll_ready` fails once `fail` is set, or panics once `panic` is
/// (clearing it), and that panics if called before it was driven to ready, as tower's contract
/// allows.
#[derive(Default)]
struct FailsReadiness {
    fail: Arc<AtomicBool>,
    panic: Arc<AtomicBool>,
    calls: Calls,
    ready: bool,
}

/// A clone is not ready, as a clone of tower's `ConcurrencyLimit` holds no permit.
impl Clone for FailsReadiness {
    fn clone(&self) -> Self {
        Self {
            fail: Arc::clone(&self.fail),
            panic: Arc::clone(&self.panic),
            calls: self.calls.clone(),
            ready: false,
        }
    }
}

impl Service<Request<Full<Bytes>>> for FailsReadiness {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.fail.swap(false, Ordering::SeqCst) {
            return Poll::Ready(Err("the connection pool closed".into()));
        }
        assert!(
            !self.panic.swap(false, Ordering::SeqCst),
            "a bug in the connection pool"
        );
        self.ready = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
        assert!(
            std::mem::take(&mut self.ready),
            "called before poll_ready said ready"
        );
        self.calls.note(&request);
        let mut response = Response::new(Body::from("done"));
        *response.status_mut() = StatusCode::CREATED;
        std::future::ready(Ok(response))
    }
}

/// The inner service's readiness error is the error of the request that would have called it:
/// the layer stays ready for others, and the key is released, since the handler never ran.
#[tokio::test(start_paused = true)]
async fn an_inner_readiness_error_fails_only_that_request() {
    let fail = Arc::new(AtomicBool::new(true));
    let calls = Calls::default();
    let mut service = waiting_layer().layer(FailsReadiness {
        fail: Arc::clone(&fail),
        calls: calls.clone(),
        ..FailsReadiness::default()
    });

    let ready = std::future::poll_fn(|cx| service.poll_ready(cx)).await;
    assert!(ready.is_ok(), "the layer itself is ready: {ready:?}");
    let err = service
        .call(post("k", Body::from("charge")))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "the connection pool closed");
    assert_eq!(calls.of("k"), 0);

    // The same service answers the next requests; the retry runs the handler.
    let other = service
        .ready()
        .await
        .unwrap()
        .call(post("other", Body::from("charge")))
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::CREATED);
    let retry = service
        .ready()
        .await
        .unwrap()
        .call(post("k", Body::from("charge")))
        .await
        .unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert!(retry.headers().get("idempotent-replayed").is_none());
    assert_eq!(calls.of("k"), 1);

    // A request the layer passes through fails alike, alone.
    fail.store(true, Ordering::SeqCst);
    let get = Request::get("/payments/1")
        .header("idempotency-key", "get")
        .body(Body::default())
        .unwrap();
    let err = service.ready().await.unwrap().call(get).await.unwrap_err();
    assert_eq!(err.to_string(), "the connection pool closed");
    let get = Request::get("/payments/1")
        .header("idempotency-key", "get")
        .body(Body::default())
        .unwrap();
    let answered = service.ready().await.unwrap().call(get).await.unwrap();
    assert_eq!(answered.status(), StatusCode::CREATED);
}

/// A panic in the inner service's `poll_ready` fails that request only, as a panic in the
/// handler does: its key is released and the layer goes on serving.
#[tokio::test(start_paused = true)]
async fn an_inner_readiness_panic_fails_only_that_request() {
    let panic = Arc::new(AtomicBool::new(true));
    let calls = Calls::default();
    let service = waiting_layer().layer(FailsReadiness {
        panic: Arc::clone(&panic),
        calls: calls.clone(),
        ..FailsReadiness::default()
    });
    let failed = tokio::spawn(service.clone().oneshot(post("k", Body::from("charge")))).await;
    assert!(failed.unwrap_err().is_panic());
    assert_eq!(calls.of("k"), 0);

    let retry = service
        .clone()
        .oneshot(post("k", Body::from("charge")))
        .await
        .unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert!(retry.headers().get("idempotent-replayed").is_none());
    assert_eq!(calls.of("k"), 1);
}
