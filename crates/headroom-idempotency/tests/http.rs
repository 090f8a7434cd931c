//! The Idempotency-Key layer: every documented status, on the memory store and on a Redis that
//! is killed.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use headroom_core::lease::{Begin, BeginId, Fenced, LeaseStore};
use headroom_core::memory::MemoryLeaseStore;
use headroom_core::{BackendError, Key};
use headroom_idempotency::http::{IdempotencyLayer, is_final_status};
use headroom_idempotency::{FencingToken, Idempotency, InProgressPolicy};
use headroom_redis::{Redis, RedisConfig, RedisLeaseStore};
use headroom_testkit::RedisServer;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::Notify;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

type Body = Full<Bytes>;

fn tenant(parts: &http::request::Parts) -> Option<String> {
    parts
        .headers
        .get("x-tenant")?
        .to_str()
        .ok()
        .map(str::to_owned)
}

/// A payments endpoint that counts its calls and answers with the status in `x-status`.
fn payments(
    calls: Arc<AtomicUsize>,
) -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(move |request: Request<Body>| {
        let calls = Arc::clone(&calls);
        async move {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let status = request
                .headers()
                .get("x-status")
                .and_then(|s| s.to_str().ok()?.parse().ok())
                .unwrap_or(201);
            let mut response = Response::new(Body::from(format!("payment {n}")));
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            response
                .headers_mut()
                .insert("content-type", "text/plain".parse().unwrap());
            response
                .headers_mut()
                .insert("location", format!("/payments/{n}").parse().unwrap());
            response
                .headers_mut()
                .insert("x-request-trace", "not replayed".parse().unwrap());
            Ok(response)
        }
    })
}

fn post(key: Option<&str>, body: &'static str) -> Request<Body> {
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri("/payments")
        .header("x-tenant", "acme");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Body::from(body)).unwrap()
}

async fn send<S>(service: &mut S, request: Request<Body>) -> (StatusCode, http::HeaderMap, String)
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Error: std::fmt::Debug,
{
    let response = service.ready().await.unwrap().call(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8(body.to_vec()).unwrap(),
    )
}

fn memory_layer() -> IdempotencyLayer<MemoryLeaseStore, fn(&http::request::Parts) -> Option<String>>
{
    let executor = Idempotency::builder(MemoryLeaseStore::new())
        .in_progress(InProgressPolicy::Reject)
        .build()
        .unwrap();
    IdempotencyLayer::new(
        executor,
        tenant as fn(&http::request::Parts) -> Option<String>,
    )
    .max_body_len(1024)
}

/// The layer on an executor that stores outcomes of at most 1,024 bytes.
fn storing_up_to_1024_bytes()
-> IdempotencyLayer<MemoryLeaseStore, fn(&http::request::Parts) -> Option<String>> {
    let executor = Idempotency::builder(MemoryLeaseStore::new())
        .max_outcome_len(1024)
        .build()
        .unwrap();
    IdempotencyLayer::new(
        executor,
        tenant as fn(&http::request::Parts) -> Option<String>,
    )
}

#[tokio::test]
async fn a_retry_replays_status_selected_headers_and_body() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut service = memory_layer().layer(payments(Arc::clone(&calls)));
    let (status, headers, body) = send(&mut service, post(Some("\"k-1\""), "amount=10")).await;
    assert_eq!((status, body.as_str()), (StatusCode::CREATED, "payment 0"));
    assert!(headers.get("idempotent-replayed").is_none());
    assert_eq!(headers["x-request-trace"], "not replayed");

    let (status, headers, body) = send(&mut service, post(Some("\"k-1\""), "amount=10")).await;
    assert_eq!((status, body.as_str()), (StatusCode::CREATED, "payment 0"));
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(headers["location"], "/payments/0");
    assert_eq!(headers["content-type"], "text/plain");
    assert!(
        headers.get("x-request-trace").is_none(),
        "only selected headers are replayed"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bad_keys_get_400_and_never_reach_the_service() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut service = memory_layer().layer(payments(Arc::clone(&calls)));
    let too_long = format!("\"{}\"", "k".repeat(256));
    for key in [
        None,
        Some("\"unterminated"),
        Some("has space"),
        Some(too_long.as_str()),
    ] {
        let (status, _, _) = send(&mut service, post(key, "x")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{key:?}");
    }
    let mut twice = post(Some("a"), "x");
    twice
        .headers_mut()
        .append("idempotency-key", "b".parse().unwrap());
    assert_eq!(send(&mut service, twice).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn key_reuse_with_another_body_gets_422() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut service = memory_layer().layer(payments(calls));
    assert_eq!(
        send(&mut service, post(Some("k"), "amount=10")).await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        send(&mut service, post(Some("k"), "amount=99")).await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
}

#[tokio::test]
async fn an_oversized_body_gets_413() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut service = memory_layer().layer(payments(Arc::clone(&calls)));
    let big: &'static str = Box::leak("x".repeat(2048).into_boxed_str());
    assert_eq!(
        send(&mut service, post(Some("k"), big)).await.0,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_request_without_a_principal_gets_401() {
    let mut service = memory_layer().layer(payments(Arc::new(AtomicUsize::new(0))));
    let mut request = post(Some("k"), "x");
    request.headers_mut().remove("x-tenant");
    assert_eq!(
        send(&mut service, request).await.0,
        StatusCode::UNAUTHORIZED
    );
    // An empty principal is no principal.
    let mut request = post(Some("k"), "x");
    request
        .headers_mut()
        .insert("x-tenant", "".parse().unwrap());
    assert_eq!(
        send(&mut service, request).await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn safe_methods_pass_through_without_a_key() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut service = memory_layer().layer(payments(Arc::clone(&calls)));
    let get = Request::get("/payments/1").body(Body::default()).unwrap();
    assert_eq!(send(&mut service, get).await.0, StatusCode::CREATED);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A handler that charged a card and then failed with a 500 has still run: by default its
/// response is stored and replayed, so a retry does not charge again.
#[tokio::test]
async fn server_errors_are_stored_and_replayed_by_default() {
    for code in ["500", "502", "503"] {
        let calls = Arc::new(AtomicUsize::new(0));
        let mut service = memory_layer().layer(payments(Arc::clone(&calls)));
        let mut failing = post(Some("k"), "x");
        failing
            .headers_mut()
            .insert("x-status", code.parse().unwrap());
        let (status, _, body) = send(&mut service, failing).await;
        assert_eq!(status.as_str(), code);
        let (retried, headers, replayed_body) = send(&mut service, post(Some("k"), "x")).await;
        assert_eq!(retried.as_str(), code, "the retry replays the {code}");
        assert_eq!(headers["idempotent-replayed"], "true");
        assert_eq!(replayed_body, body);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran once");
    }
}

/// Statuses that ask the client to retry (the request was not acted on) are not stored, and a
/// user can opt any other status out.
#[tokio::test]
async fn retry_statuses_and_opted_out_statuses_are_not_stored() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut service = memory_layer()
        .store_status(|status| is_final_status(status) && status != StatusCode::BAD_GATEWAY)
        .layer(payments(Arc::clone(&calls)));
    for (i, code) in ["429", "408", "409", "425", "502"].into_iter().enumerate() {
        let key = format!("k{i}");
        let mut failing = post(Some(&key), "x");
        failing
            .headers_mut()
            .insert("x-status", code.parse().unwrap());
        assert_eq!(send(&mut service, failing).await.0.as_str(), code);
        let (status, headers, _) = send(&mut service, post(Some(&key), "x")).await;
        assert_eq!(status, StatusCode::CREATED, "a {code} is not stored");
        assert!(headers.get("idempotent-replayed").is_none());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 10);
}

/// The storing policy panics once the handler has answered: the handler ran, so the key keeps
/// an outcome, and a retry does not run it again.
#[tokio::test]
async fn a_storing_policy_that_panics_after_the_handler_answered_keeps_the_key() {
    let calls = Arc::new(AtomicUsize::new(0));
    let panicked = Arc::new(AtomicUsize::new(0));
    let service = storing_up_to_1024_bytes()
        .store_status({
            let panicked = Arc::clone(&panicked);
            move |status| {
                if panicked.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("a bug in the storing policy");
                }
                is_final_status(status)
            }
        })
        .layer(payments(Arc::clone(&calls)));
    let first = tokio::spawn(service.clone().oneshot(post(Some("k"), "x"))).await;
    assert!(first.unwrap_err().is_panic());
    let (status, headers, _) = send(&mut service.clone(), post(Some("k"), "x")).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran again");
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
}

#[tokio::test]
async fn a_duplicate_while_the_first_runs_gets_409_with_retry_after() {
    let release = Arc::new(Notify::new());
    let slow = {
        let release = Arc::clone(&release);
        service_fn(move |_: Request<Body>| {
            let release = Arc::clone(&release);
            async move {
                release.notified().await;
                Ok::<_, Infallible>(Response::new(Body::from("done")))
            }
        })
    };
    let service = memory_layer().layer(slow);
    let first = tokio::spawn(service.clone().oneshot(post(Some("k"), "x")));
    tokio::task::yield_now().await;
    let (status, headers, _) = send(&mut service.clone(), post(Some("k"), "x")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(headers["retry-after"], "1");
    release.notify_one();
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_store_gets_503_when_failing_closed() {
    let server = RedisServer::start();
    let redis = Redis::connect(
        RedisConfig::standalone(server.url())
            .with_command_timeout(Duration::from_millis(300))
            .with_connect_timeout(Duration::from_millis(300)),
    )
    .await
    .unwrap();
    let executor = Idempotency::builder(RedisLeaseStore::new(redis))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut service = IdempotencyLayer::new(executor, tenant).layer(payments(Arc::clone(&calls)));
    assert_eq!(
        send(&mut service, post(Some("k"), "x")).await.0,
        StatusCode::CREATED
    );
    server.kill();
    let (status, headers, _) = send(&mut service, post(Some("k2"), "x")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("retry-after"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn inner_service_errors_propagate_and_release_the_key() {
    let calls = Arc::new(AtomicUsize::new(0));
    let flaky = {
        let calls = Arc::clone(&calls);
        service_fn(move |_: Request<Body>| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    Err(BoxError::from("connection reset"))
                } else {
                    Ok(Response::new(Body::from("ok")))
                }
            }
        })
    };
    let mut service = memory_layer().layer(flaky);
    let err = service
        .ready()
        .await
        .unwrap()
        .call(post(Some("k"), "x"))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "connection reset");
    assert_eq!(
        send(&mut service, post(Some("k"), "x")).await.0,
        StatusCode::OK
    );
}

/// A handler whose response is larger than the store takes has still run: however often the
/// client retries, it never runs again, and every answer carries the same status.
#[tokio::test]
async fn a_response_too_large_to_store_runs_once_however_often_the_client_retries() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = storing_up_to_1024_bytes();
    let large = {
        let calls = Arc::clone(&calls);
        service_fn(move |_: Request<Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let mut response = Response::new(Body::from(vec![b'x'; 64 * 1024]));
            *response.status_mut() = StatusCode::CREATED;
            async { Ok::<_, Infallible>(response) }
        })
    };
    let mut service = layer.layer(large);
    let (first, first_headers, _) = send(&mut service, post(Some("\"big\""), "export")).await;
    assert_eq!(first, StatusCode::CREATED);
    assert_eq!(first_headers["idempotent-body-omitted"], "true");
    for _ in 0..5 {
        let (status, headers, body) = send(&mut service, post(Some("\"big\""), "export")).await;
        assert_eq!(status, first, "a retry gets the first request's status");
        assert_eq!(headers["idempotent-replayed"], "true");
        assert_eq!(headers["idempotent-body-omitted"], "true");
        assert!(body.is_empty());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran once");
}

/// `headroom_idempotency_not_replayable_total` counts each kept outcome a retry cannot get
/// whole, once: a value too large to store (not again for the outcome recorded when the
/// operation took effect, nor for such an outcome the final value replaced), and a response
/// kept without its body.
#[tokio::test]
async fn outcomes_kept_without_their_body_count_once_as_not_replayable() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let executor = metrics::with_local_recorder(&recorder, || {
        Idempotency::builder(MemoryLeaseStore::new())
            .max_outcome_len(1024)
            .build()
            .unwrap()
    });
    let counted = || {
        handle
            .render()
            .lines()
            .find_map(|line| line.strip_prefix("headroom_idempotency_not_replayable_total "))
            .map(str::to_owned)
    };
    let scope = headroom_idempotency::Scope::new("acme", "export").unwrap();
    let large = "x".repeat(4096);
    for (name, last) in [
        ("both large", large.clone()),
        ("last small", "small".to_owned()),
    ] {
        let key = headroom_idempotency::IdempotencyKey::new(&name.replace(' ', "-")).unwrap();
        let (large, last) = (large.clone(), last.clone());
        executor
            .execute_leased(&scope, &key, b"x", |lease| async move {
                lease.took_effect(&large);
                Ok::<_, Infallible>(last)
            })
            .await
            .unwrap();
    }
    assert_eq!(
        counted().as_deref(),
        Some("1"),
        "counted once, for the large value"
    );
    let huge = service_fn(|_: Request<Body>| async {
        Ok::<_, Infallible>(Response::new(Body::from(vec![b'x'; 64 * 1024])))
    });
    let mut service = IdempotencyLayer::new(executor, tenant).layer(huge);
    let (_, headers, _) = send(&mut service, post(Some("\"huge\""), "x")).await;
    assert_eq!(headers["idempotent-body-omitted"], "true");
    assert_eq!(
        counted().as_deref(),
        Some("2"),
        "and the response kept without its body"
    );
}

/// A response kept without its body counts as not replayable only once a record took it: a
/// store that never took it leaves nothing a retry could not get whole (the retry runs the
/// handler again), so nothing is counted.
#[tokio::test(start_paused = true)]
async fn a_response_without_its_body_the_store_never_took_is_not_counted() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let store = Noting {
        completes_fail: true,
        ..Noting::default()
    };
    let executor = metrics::with_local_recorder(&recorder, || {
        Idempotency::builder(store)
            .max_outcome_len(1024)
            .build()
            .unwrap()
    });
    let huge = service_fn(|_: Request<Body>| async {
        Ok::<_, Infallible>(Response::new(Body::from(vec![b'x'; 64 * 1024])))
    });
    let mut service = IdempotencyLayer::new(executor, tenant).layer(huge);
    let (status, headers, _) = send(&mut service, post(Some("\"huge\""), "x")).await;
    assert_eq!(
        (status, &headers["idempotent-body-omitted"]),
        (
            StatusCode::OK,
            &"true".parse::<http::HeaderValue>().unwrap()
        )
    );
    let rendered = handle.render();
    let counted = rendered
        .lines()
        .find_map(|line| line.strip_prefix("headroom_idempotency_not_replayable_total "));
    assert!(
        counted.is_none_or(|n| n == "0"),
        "counted {counted:?} with no record kept"
    );
}

/// A response the layer does not store (a 429 asking the client to come back) reaches its
/// caller whole, however large, with every header: nothing is replayed from it, so nothing of
/// it may be left out.
#[tokio::test]
async fn a_response_that_is_not_stored_reaches_its_caller_whole() {
    let layer = storing_up_to_1024_bytes();
    let busy = service_fn(|_: Request<Body>| {
        let mut response = Response::new(Body::from(vec![b'x'; 4096]));
        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        response
            .headers_mut()
            .insert("retry-after", "3".parse().unwrap());
        async { Ok::<_, Infallible>(response) }
    });
    let mut service = layer.layer(busy);
    let (status, headers, body) = send(&mut service, post(Some("\"busy\""), "x")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body.len(), 4096, "the body is the handler's");
    assert_eq!(headers["retry-after"], "3");
    assert!(headers.get("idempotent-body-omitted").is_none());
}

/// A response body that fails while it is read cannot be replayed, but the handler behind it
/// ran: retries must not run it again.
#[tokio::test]
async fn a_response_body_that_breaks_runs_the_handler_once() {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A body that yields one chunk and then fails.
    struct Breaks(Option<Bytes>, bool);
    impl From<Bytes> for Breaks {
        fn from(bytes: Bytes) -> Self {
            Self(Some(bytes), false)
        }
    }
    impl http_body::Body for Breaks {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
            match self.0.take() {
                Some(chunk) => Poll::Ready(Some(Ok(http_body::Frame::data(chunk)))),
                None if self.1 => Poll::Ready(Some(Err("connection to the backend reset".into()))),
                None => Poll::Ready(None),
            }
        }
    }

    let calls = Arc::new(AtomicUsize::new(0));
    let breaking = {
        let calls = Arc::clone(&calls);
        service_fn(move |_: Request<Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let mut response = Response::new(Breaks(Some(Bytes::from_static(b"half")), true));
            *response.status_mut() = StatusCode::OK;
            async { Ok::<_, Infallible>(response) }
        })
    };
    let mut service = memory_layer().layer(breaking);
    for _ in 0..4 {
        let response = service
            .ready()
            .await
            .unwrap()
            .call(post(Some("\"brk\""), "charge"))
            .await
            .unwrap();
        assert_eq!(response.headers()["idempotent-body-omitted"], "true");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran once");
}

/// Configuring a layer after it was cloned changes that layer only, and never panics.
#[tokio::test]
async fn configuring_a_cloned_layer_does_not_panic_or_change_the_clone() {
    let layer = memory_layer();
    let kept = layer.clone();
    let put_only = layer.methods([Method::PUT]);
    let calls = Arc::new(AtomicUsize::new(0));
    // The reconfigured layer passes POST through unprotected; the clone still requires a key.
    let mut open = put_only.layer(payments(Arc::clone(&calls)));
    assert_eq!(
        send(&mut open, post(None, "x")).await.0,
        StatusCode::CREATED
    );
    let mut guarded = kept.layer(payments(Arc::clone(&calls)));
    assert_eq!(
        send(&mut guarded, post(None, "x")).await.0,
        StatusCode::BAD_REQUEST
    );
}

/// The handler has answered and its body is being read when the client goes away: the key
/// keeps the outcome (its status, with the body omitted), so the client's retry is answered
/// from it and the handler does not run again.
#[tokio::test(start_paused = true)]
async fn a_client_gone_while_the_body_is_read_leaves_the_handler_run_once() {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A body whose data never comes (`true`), or an empty one.
    struct Endless(bool);
    impl From<Bytes> for Endless {
        fn from(_: Bytes) -> Self {
            Self(false)
        }
    }
    impl http_body::Body for Endless {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
            if self.0 {
                Poll::Pending
            } else {
                Poll::Ready(None)
            }
        }
    }

    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = Arc::clone(&calls);
        service_fn(move |_: Request<Body>| {
            // Only the first answer's body never ends, so that a second run shows.
            let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
            let mut response = Response::new(Endless(first));
            *response.status_mut() = StatusCode::CREATED;
            async { Ok::<_, Infallible>(response) }
        })
    };
    let mut service = waiting_layer().layer(handler);
    send_and_go_away(&mut service, &calls).await;
    let retry = service
        .ready()
        .await
        .unwrap()
        .call(post(Some("\"gone\""), "charge"))
        .await
        .unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.headers()["idempotent-body-omitted"], "true");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran once");
}

/// A body within `max_outcome_len` whose headers take the stored response over it is a body
/// too large to store: its status and headers, the body omitted, for the first caller and every
/// retry; never a 500.
#[tokio::test]
async fn a_body_just_under_the_limit_with_its_headers_over_it_is_omitted_not_lost() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = storing_up_to_1024_bytes();
    let handler = {
        let calls = Arc::clone(&calls);
        service_fn(move |_: Request<Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let mut response = Response::new(Body::from(vec![b'x'; 1024]));
            *response.status_mut() = StatusCode::CREATED;
            response
                .headers_mut()
                .insert("content-type", "text/plain".parse().unwrap());
            async { Ok::<_, Infallible>(response) }
        })
    };
    let mut service = layer.layer(handler);
    for _ in 0..3 {
        let (status, headers, body) = send(&mut service, post(Some("\"edge\""), "export")).await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(headers["content-type"], "text/plain");
        assert_eq!(headers["idempotent-body-omitted"], "true");
        assert!(body.is_empty());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran once");
}

/// The client goes away while the handler runs, after its effect: the handler still runs to
/// its answer, which the key keeps, so the client's retry replays it instead of running the
/// handler again.
#[tokio::test]
async fn a_client_gone_while_the_handler_runs_leaves_the_handler_run_once() {
    let calls = Arc::new(AtomicUsize::new(0));
    let finish = Arc::new(Notify::new());
    let handler = {
        let (calls, finish) = (Arc::clone(&calls), Arc::clone(&finish));
        service_fn(move |_: Request<Body>| {
            let (calls, finish) = (Arc::clone(&calls), Arc::clone(&finish));
            async move {
                // The effect (a card charged), then more work before the answer.
                let n = calls.fetch_add(1, Ordering::SeqCst);
                finish.notified().await;
                let mut response = Response::new(Body::from(format!("payment {n}")));
                *response.status_mut() = StatusCode::CREATED;
                Ok::<_, Infallible>(response)
            }
        })
    };
    let mut service = waiting_layer().layer(handler);
    send_and_go_away(&mut service, &calls).await;
    finish.notify_one();
    let (status, headers, body) = send(&mut service, post(Some("\"gone\""), "charge")).await;
    assert_eq!((status, body.as_str()), (StatusCode::CREATED, "payment 0"));
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran once");
}

/// A duplicate whose client went away while it waited for the first request stops waiting:
/// when the first releases the key (a 429 is not stored), nobody is left to run the handler
/// for, so it does not run again.
#[tokio::test(start_paused = true)]
async fn a_duplicate_whose_client_went_away_while_waiting_does_not_run_the_handler() {
    let calls = Arc::new(AtomicUsize::new(0));
    let finish = Arc::new(Notify::new());
    let handler = {
        let (calls, finish) = (Arc::clone(&calls), Arc::clone(&finish));
        service_fn(move |_: Request<Body>| {
            let (calls, finish) = (Arc::clone(&calls), Arc::clone(&finish));
            async move {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    finish.notified().await;
                }
                let mut response = Response::new(Body::from("busy"));
                *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                Ok::<_, Infallible>(response)
            }
        })
    };
    let store = Noting::default();
    let executor = Idempotency::builder(store.clone()).build().unwrap();
    let service = IdempotencyLayer::new(executor, tenant).layer(handler);
    let first = tokio::spawn(service.clone().oneshot(post(Some("\"dup\""), "charge")));
    while calls.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    // The duplicate waits: the store told it twice that the first holds the key. Then its
    // client goes away.
    // Boxed, so that dropping it drops the request.
    let mut duplicate = Box::pin(service.clone().oneshot(post(Some("\"dup\""), "charge")));
    tokio::select! {
        biased;
        _ = &mut duplicate => panic!("the duplicate waits while the first runs"),
        () = async {
            // Paused time moves on while this sleeps, to the duplicate's next look.
            for _ in 0..1_000 {
                if store.in_progress.load(Ordering::SeqCst) >= 2 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            panic!("the duplicate never asked the store twice");
        } => {}
    }
    drop(duplicate);
    finish.notify_one();
    assert_eq!(
        first.await.unwrap().unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // Past the duplicate's longest wait (5 s).
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "nobody waits for a second run"
    );
}

/// A body the handler encoded (a compression layer inside this one) is replayed with its
/// encoding, so that the client can decode it.
#[tokio::test]
async fn a_replay_keeps_the_body_encoding() {
    let encoded = service_fn(|_: Request<Body>| async {
        let mut response = Response::new(Body::from("\u{1f}\u{8b} compressed bytes"));
        response
            .headers_mut()
            .insert("content-encoding", "gzip".parse().unwrap());
        Ok::<_, Infallible>(response)
    });
    let mut service = memory_layer().layer(encoded);
    let (_, first, _) = send(&mut service, post(Some("k"), "x")).await;
    let (_, replay, _) = send(&mut service, post(Some("k"), "x")).await;
    assert_eq!(replay["idempotent-replayed"], "true");
    assert_eq!(replay["content-encoding"], first["content-encoding"]);
}

/// A memory store that notes the tokens its `begin`s issued and how many it answered
/// `InProgress`; with `completes_fail`, every completion fails, as a store briefly down.
#[derive(Clone, Debug, Default)]
struct Noting {
    store: MemoryLeaseStore,
    issued: Arc<std::sync::Mutex<Vec<FencingToken>>>,
    in_progress: Arc<AtomicUsize>,
    completes_fail: bool,
}

impl LeaseStore for Noting {
    async fn begin(
        &self,
        key: &Key,
        fingerprint: &[u8],
        lease: Duration,
        id: BeginId,
    ) -> Result<Begin, BackendError> {
        let begin = self.store.begin(key, fingerprint, lease, id).await;
        match &begin {
            Ok(Begin::Acquired { token, .. }) => self.issued.lock().unwrap().push(*token),
            Ok(Begin::InProgress { .. }) => {
                self.in_progress.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
        begin
    }

    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        outcome: Bytes,
        retention: Duration,
    ) -> Result<Fenced, BackendError> {
        if self.completes_fail {
            return Err(BackendError::with_detail(
                headroom_core::BackendErrorKind::Unavailable,
                "store briefly down",
            ));
        }
        self.store.complete(key, token, outcome, retention).await
    }

    async fn extend(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Fenced, BackendError> {
        self.store.extend(key, token, lease).await
    }

    async fn release(&self, key: &Key, token: FencingToken) -> Result<Fenced, BackendError> {
        self.store.release(key, token).await
    }

    async fn release_begun(&self, key: &Key, id: BeginId) -> Result<Fenced, BackendError> {
        self.store.release_begun(key, id).await
    }

    fn begin_completes_at_once(&self) -> bool {
        self.store.begin_completes_at_once()
    }
}

/// The handler finds its lease's fencing token in the request's extensions, for its own
/// writes: the token the store issued for that lease, greater for the next holder of the key.
#[tokio::test]
async fn the_handler_finds_its_leases_fencing_token_in_the_request_extensions() {
    let store = Noting::default();
    let executor = Idempotency::builder(store.clone()).build().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = Arc::clone(&calls);
        service_fn(move |request: Request<Body>| {
            // The first answer is a 429, which is not stored: the retry holds the key anew.
            let status = if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                StatusCode::TOO_MANY_REQUESTS
            } else {
                StatusCode::CREATED
            };
            let token = request.extensions().get::<FencingToken>().copied();
            let mut response = Response::new(Body::from(format!("{token:?}")));
            *response.status_mut() = status;
            async { Ok::<_, Infallible>(response) }
        })
    };
    let mut service = IdempotencyLayer::new(executor, tenant).layer(handler);
    let (first, _, first_token) = send(&mut service, post(Some("\"fence\""), "charge")).await;
    let (second, _, second_token) = send(&mut service, post(Some("\"fence\""), "charge")).await;
    assert_eq!(
        (first, second),
        (StatusCode::TOO_MANY_REQUESTS, StatusCode::CREATED)
    );
    let issued = store.issued.lock().unwrap().clone();
    assert_eq!(issued.len(), 2, "{issued:?}");
    assert!(issued[0] < issued[1], "{issued:?}");
    assert_eq!(first_token, format!("{:?}", Some(issued[0])));
    assert_eq!(second_token, format!("{:?}", Some(issued[1])));
}

/// Replayed headers that leave no room for `Idempotent-Body-Omitted` beside them under
/// `max_outcome_len` are left out too: the first caller and every retry get the status and the
/// omitted body's header, never a 500, and the handler never runs again.
#[tokio::test]
async fn headers_that_nearly_fill_the_limit_still_leave_the_status_with_the_body_omitted() {
    the_status_is_kept_with_the_body_omitted(100, 220).await;
}

/// The same with an empty body and headers that alone pass the limit.
#[tokio::test]
async fn headers_past_the_limit_with_an_empty_body_leave_the_status_with_the_body_omitted() {
    the_status_is_kept_with_the_body_omitted(0, 290).await;
}

/// A 201 of `body_len` bytes with a `Location` of 10 + `path_len` bytes, under a limit of 256
/// bytes: the first caller and every retry get the status and `Idempotent-Body-Omitted`
/// without the `Location`, and the handler runs once.
async fn the_status_is_kept_with_the_body_omitted(body_len: usize, path_len: usize) {
    let calls = Arc::new(AtomicUsize::new(0));
    let executor = Idempotency::builder(MemoryLeaseStore::new())
        .max_outcome_len(256)
        .build()
        .unwrap();
    let handler = {
        let calls = Arc::clone(&calls);
        service_fn(move |_: Request<Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let mut response = Response::new(Body::from(vec![b'x'; body_len]));
            *response.status_mut() = StatusCode::CREATED;
            let location = format!("/payments/{}", "p".repeat(path_len));
            response
                .headers_mut()
                .insert("location", location.parse().unwrap());
            async { Ok::<_, Infallible>(response) }
        })
    };
    let mut service = IdempotencyLayer::new(executor, tenant).layer(handler);
    for attempt in 0..3 {
        let (status, headers, body) = send(&mut service, post(Some("\"near\""), "x")).await;
        assert_eq!(status, StatusCode::CREATED, "attempt {attempt}: {body}");
        assert_eq!(
            headers["idempotent-body-omitted"], "true",
            "attempt {attempt}"
        );
        assert!(headers.get("location").is_none(), "attempt {attempt}");
        assert!(body.is_empty());
        if attempt > 0 {
            assert_eq!(headers["idempotent-replayed"], "true");
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran once");
}

/// The layer with the default policy: a duplicate waits for the outcome.
fn waiting_layer() -> IdempotencyLayer<MemoryLeaseStore, fn(&http::request::Parts) -> Option<String>>
{
    let executor = Idempotency::builder(MemoryLeaseStore::new())
        .build()
        .unwrap();
    IdempotencyLayer::new(
        executor,
        tenant as fn(&http::request::Parts) -> Option<String>,
    )
}

/// Sends a keyed request and drops it, as a client going away, once the handler was called
/// (and before its response is done).
async fn send_and_go_away<S>(service: &mut S, calls: &AtomicUsize)
where
    S: Service<Request<Body>>,
    S::Error: std::fmt::Debug,
{
    let first = service
        .ready()
        .await
        .unwrap()
        .call(post(Some("\"gone\""), "charge"));
    tokio::pin!(first);
    tokio::select! {
        biased;
        _ = &mut first => panic!("the response is not done while the handler runs"),
        () = async {
            while calls.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        } => {}
    }
}

/// The runtime a keyed request runs on shuts down while its caller, polled on another runtime,
/// still waits: the caller gets a 503 with `Retry-After`, not a panic.
#[test]
fn a_runtime_shut_down_under_a_keyed_request_answers_503() {
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = Arc::clone(&calls);
        service_fn(move |_: Request<Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<Result<Response<Body>, Infallible>>()
        })
    };
    let requests = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let caller = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut service = waiting_layer().layer(handler);
    let mut request = service.call(post(Some("k"), "charge"));
    // The layer spawns the request on the runtime its future is polled in: `requests`.
    let in_requests = requests.handle().clone();
    let response = caller.block_on(async {
        let response = tokio::spawn(std::future::poll_fn(move |cx| {
            let _entered = in_requests.enter();
            request.as_mut().poll(cx)
        }));
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        requests.shutdown_background();
        response.await.expect("the caller does not panic")
    });
    let response = response.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
}

/// A path too long to name the operation as it is (over 250 bytes) is still protected: the
/// handler runs once and a retry replays, and another long path sharing its beginning is an
/// operation of its own.
#[tokio::test]
async fn a_long_path_is_protected_as_its_own_operation() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut service = memory_layer().layer(payments(Arc::clone(&calls)));
    let to = |last: char| {
        let path = format!("/files/{}{last}", "a".repeat(300));
        Request::builder()
            .method(Method::POST)
            .uri(path)
            .header("x-tenant", "acme")
            .header("idempotency-key", "\"k-1\"")
            .body(Body::from("x"))
            .unwrap()
    };
    let (status, headers, body) = send(&mut service, to('b')).await;
    assert_eq!((status, body.as_str()), (StatusCode::CREATED, "payment 0"));
    assert!(headers.get("idempotent-replayed").is_none());
    let (status, headers, body) = send(&mut service, to('b')).await;
    assert_eq!((status, body.as_str()), (StatusCode::CREATED, "payment 0"));
    assert_eq!(headers["idempotent-replayed"], "true");
    let (status, _, body) = send(&mut service, to('c')).await;
    assert_eq!((status, body.as_str()), (StatusCode::CREATED, "payment 1"));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
