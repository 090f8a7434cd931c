//! The work queue as tower middleware: a bounded, prioritised queue in front of workers.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::FutureExt;
use futures_util::future::poll_fn;
use headroom_core::Clock;
use tokio::sync::oneshot;
use tower_layer::Layer;
use tower_service::Service;

use super::{BoxError, Prioritize};
use crate::{ConfigError, Enqueue, Overflow, Overloaded, Priority, QueueConfig, Reason, WorkQueue};

/// A queued request and the way back to its caller.
struct Job<Req, Rsp> {
    request: Req,
    reply: oneshot::Sender<Result<Rsp, BoxError>>,
}

/// Puts a [`WorkQueue`] and a pool of worker tasks in front of a service.
///
/// Each call of [`layer`](Layer::layer) creates a queue and spawns `workers` tasks on the
/// current tokio runtime (so it must run inside one, as tower's `Buffer` does). Each worker
/// owns a clone of the inner service and runs one request at a time: `workers` is the
/// concurrency limit. Requests are admitted, ordered and shed by the [`QueueConfig`]:
/// priorities (from `prioritize`), overflow policy, CoDel and adaptive LIFO. A request whose
/// caller has gone (its response future was dropped, for example by a timeout) is never run,
/// and gives up its place: at once if it is at the head of its class, else once it gets there
/// (finding it sooner would take a scan of the queue). A full queue frees such places before
/// it refuses or evicts anyone. A request whose service panics fails with [`Panicked`]; its
/// worker goes on with a fresh clone of the service. A `poll_ready` error fails its request
/// with that error, and the worker discards that service for a fresh clone too, as tower's
/// contract requires.
///
/// ```
/// use headroom_limit::tower::QueueLayer;
/// use headroom_limit::{Priority, QueueConfig};
/// use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let layer = QueueLayer::new("render", QueueConfig::default(), 4, |_: &u32| Priority::Default)?;
/// let mut service = ServiceBuilder::new()
///     .layer(layer)
///     .service(service_fn(|n: u32| async move { Ok::<_, std::io::Error>(n + 1) }));
/// assert_eq!(service.ready().await?.call(1).await?, 2);
/// # Ok(()) }
/// ```
pub struct QueueLayer<Req, P> {
    name: Arc<str>,
    config: QueueConfig,
    workers: usize,
    prioritize: P,
    clock: Clock,
    _request: PhantomData<fn(Req)>,
}

impl<Req, P> QueueLayer<Req, P> {
    /// A layer queueing requests by `config`, served by `workers` tasks, classified by
    /// `prioritize`.
    pub fn new(
        name: &str,
        config: QueueConfig,
        workers: usize,
        prioritize: P,
    ) -> Result<Self, ConfigError> {
        if workers == 0 {
            return Err(ConfigError::new("workers", "must be at least 1"));
        }
        // Validated here so that `layer` cannot fail.
        WorkQueue::<()>::builder(name)
            .config(config.clone())
            .build()?;
        Ok(Self {
            name: Arc::from(name),
            config,
            workers,
            prioritize,
            clock: Clock::system(),
            _request: PhantomData,
        })
    }

    /// The clock that times queue delay (default: [`Clock::system`]).
    #[must_use]
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }
}

impl<Req, P: Clone> Clone for QueueLayer<Req, P> {
    fn clone(&self) -> Self {
        Self {
            name: Arc::clone(&self.name),
            config: self.config.clone(),
            workers: self.workers,
            prioritize: self.prioritize.clone(),
            clock: self.clock.clone(),
            _request: PhantomData,
        }
    }
}

impl<Req, P> fmt::Debug for QueueLayer<Req, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueLayer")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

impl<S, Req, P> Layer<S> for QueueLayer<Req, P>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send + 'static,
    S::Error: Into<BoxError>,
    Req: Send + 'static,
    P: Clone,
{
    type Service = QueueService<Req, S::Response, P>;

    fn layer(&self, inner: S) -> Self::Service {
        let queue = WorkQueue::builder(&*self.name)
            .config(self.config.clone())
            .clock(self.clock.clone())
            .on_shed(|job: Job<Req, S::Response>, rejection: Overloaded| {
                // The caller may be gone already; then there is no one to tell.
                let _ = job.reply.send(Err(rejection.into()));
            })
            .abandoned(|job: &Job<Req, S::Response>| job.reply.is_closed())
            .build()
            .expect("the configuration was validated by QueueLayer::new");
        for _ in 0..self.workers {
            tokio::spawn(work(queue.clone(), inner.clone()));
        }
        let release: Release = {
            let queue = queue.clone();
            Arc::new(move || queue.release_abandoned())
        };
        QueueService {
            closer: Arc::new(Closer(queue.clone())),
            queue,
            release,
            prioritize: self.prioritize.clone(),
        }
    }
}

async fn work<S, Req>(queue: WorkQueue<Job<Req, S::Response>>, template: S)
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
{
    let mut service = template.clone();
    while let Some(job) = queue.pop().await {
        if job.reply.is_closed() {
            continue;
        }
        // The request's result, and whether the service must be discarded.
        let serve = async {
            if let Err(error) = poll_fn(|cx| service.poll_ready(cx)).await {
                return (true, Err(error.into()));
            }
            (false, service.call(job.request).await.map_err(Into::into))
        };
        let (discard, result) = match AssertUnwindSafe(serve).catch_unwind().await {
            Ok(served) => served,
            // A service that panicked may be left half-changed.
            Err(_) => (true, Err(Panicked.into())),
        };
        if discard {
            // Neither a service whose `poll_ready` failed (tower's contract) nor one that
            // panicked is used again: start over from a clone.
            service = template.clone();
        }
        let _ = job.reply.send(result);
    }
}

/// The inner service panicked while serving this request. Only that request fails: the
/// worker answers it with this error and goes on with a fresh clone of the service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Panicked;

impl fmt::Display for Panicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the service panicked while serving this request")
    }
}

impl std::error::Error for Panicked {}

/// Frees the places of abandoned requests at the head of the queue, for a caller that leaves.
type Release = Arc<dyn Fn() + Send + Sync>;

/// Closes the queue when the last handle to the service goes, so the workers stop.
struct Closer<T>(WorkQueue<T>);

impl<T> Drop for Closer<T> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The service built by [`QueueLayer`]: always ready; `call` enqueues the request.
///
/// A full queue refuses with [`Overloaded`] (under [`Overflow::Wait`](crate::Overflow::Wait)
/// the response future first waits for room). Requests shed later (evicted, past CoDel's
/// limit) fail with their [`Overloaded`] too. Once every clone of the service is dropped, the
/// queue closes and the workers finish what is queued and stop.
pub struct QueueService<Req, Rsp, P> {
    queue: WorkQueue<Job<Req, Rsp>>,
    closer: Arc<Closer<Job<Req, Rsp>>>,
    release: Release,
    prioritize: P,
}

impl<Req, Rsp, P: Clone> Clone for QueueService<Req, Rsp, P> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
            closer: Arc::clone(&self.closer),
            release: Arc::clone(&self.release),
            prioritize: self.prioritize.clone(),
        }
    }
}

impl<Req, Rsp, P> QueueService<Req, Rsp, P> {
    /// How many requests of `priority` were refused or shed for `reason` (see
    /// [`WorkQueue::rejected`]); a request that waited for room and got in counts nowhere.
    pub fn rejected(&self, priority: Priority, reason: Reason) -> u64 {
        self.queue.rejected(priority, reason)
    }
}

impl<Req, Rsp, P> fmt::Debug for QueueService<Req, Rsp, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueService")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl<Req, Rsp, P> Service<Req> for QueueService<Req, Rsp, P>
where
    Req: Send + 'static,
    Rsp: Send + 'static,
    P: Prioritize<Req>,
{
    type Response = Rsp;
    type Error = BoxError;
    type Future = QueueFuture<Rsp>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let priority = self.prioritize.priority(&request);
        let (reply, response) = oneshot::channel();
        let job = Job { request, reply };
        let how = Enqueue::new().priority(priority);
        let waits = matches!(self.queue.config().overflow, Overflow::Wait { .. });
        // Under `Wait` a full queue is no refusal yet: offered uncounted, the request waits
        // for room in its future, and is counted only if it never gets in.
        let offered = if waits {
            self.queue.offer(job, how)
        } else {
            self.queue.try_push_with(job, how)
        };
        let state = match offered {
            Ok(()) => State::Queued { response },
            Err(full) if waits && full.rejection().reason() == Reason::QueueFull => {
                let queue = self.queue.clone();
                let job = full.into_item();
                State::Pushing {
                    push: Box::pin(async move {
                        queue.push_with(job, how).await.map_err(|e| e.rejection())
                    }),
                    response,
                }
            }
            Err(refused) => {
                return QueueFuture {
                    state: State::Refused {
                        error: refused.rejection(),
                    },
                    priority,
                    release: None,
                };
            }
        };
        QueueFuture {
            state,
            priority,
            release: Some(Arc::clone(&self.release)),
        }
    }
}

type Push = Pin<Box<dyn Future<Output = Result<(), Overloaded>> + Send>>;

/// The response future of [`QueueService`].
pub struct QueueFuture<Rsp> {
    state: State<Rsp>,
    priority: Priority,
    /// Called when the caller leaves while its request is queued.
    release: Option<Release>,
}

enum State<Rsp> {
    Pushing {
        push: Push,
        response: oneshot::Receiver<Result<Rsp, BoxError>>,
    },
    Queued {
        response: oneshot::Receiver<Result<Rsp, BoxError>>,
    },
    Refused {
        error: Overloaded,
    },
    /// Answered: nothing of the request is left in the queue.
    Done,
}

impl<Rsp> fmt::Debug for QueueFuture<Rsp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueFuture")
            .field("priority", &self.priority)
            .finish_non_exhaustive()
    }
}

impl<Rsp> Future for QueueFuture<Rsp> {
    type Output = Result<Rsp, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Pushing { push, .. } => {
                    let pushed = std::task::ready!(push.as_mut().poll(cx));
                    let previous = std::mem::replace(&mut this.state, State::Done);
                    this.state = match (pushed, previous) {
                        (Ok(()), State::Pushing { response, .. }) => State::Queued { response },
                        (Err(error), _) => State::Refused { error },
                        (Ok(()), other) => other,
                    };
                }
                State::Queued { response } => {
                    let reply = std::task::ready!(Pin::new(response).poll(cx));
                    this.state = State::Done;
                    return Poll::Ready(match reply {
                        Ok(result) => result,
                        // The worker dropped the job without answering: the queue closed.
                        Err(_) => Err(Overloaded::new(Reason::Closed, this.priority).into()),
                    });
                }
                State::Refused { error } => {
                    let error = *error;
                    this.state = State::Done;
                    return Poll::Ready(Err(error.into()));
                }
                State::Done => {
                    return Poll::Ready(Err("queue future polled after completion".into()));
                }
            }
        }
    }
}

impl<Rsp> Drop for QueueFuture<Rsp> {
    fn drop(&mut self) {
        if let State::Queued { .. } = self.state {
            // Dropping the receiver first closes the reply, so the queue sees the request
            // as abandoned.
            self.state = State::Done;
            if let Some(release) = &self.release {
                release();
            }
        }
    }
}
