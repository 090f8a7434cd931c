use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tower_service::Service;

use super::BoxError;

pin_project! {
    /// The response future of [`Sharded`](super::Sharded): waits until the shard's service is
    /// ready, then calls it.
    pub struct ResponseFuture<S: Service<Req>, Req> {
        #[pin]
        state: State<S, Req>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S: Service<Req>, Req> {
        Waiting { service: S, request: Option<Req> },
        Called { #[pin] future: S::Future },
        Rejected { error: Option<BoxError> },
    }
}

impl<S: Service<Req>, Req> ResponseFuture<S, Req> {
    pub(super) fn waiting(service: S, request: Req) -> Self {
        Self {
            state: State::Waiting {
                service,
                request: Some(request),
            },
        }
    }

    pub(super) fn rejected(error: impl Into<BoxError>) -> Self {
        Self {
            state: State::Rejected {
                error: Some(error.into()),
            },
        }
    }
}

impl<S: Service<Req>, Req> fmt::Debug for ResponseFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Waiting { .. } => "waiting",
            State::Called { .. } => "called",
            State::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let future = match self.as_mut().project().state.project() {
                StateProj::Waiting { service, request } => {
                    ready!(service.poll_ready(cx)).map_err(Into::into)?;
                    let Some(request) = request.take() else {
                        return Poll::Ready(Err("response future polled after completion".into()));
                    };
                    service.call(request)
                }
                StateProj::Called { future } => return future.poll(cx).map_err(Into::into),
                StateProj::Rejected { error } => {
                    return Poll::Ready(Err(error
                        .take()
                        .unwrap_or_else(|| "response future polled after completion".into())));
                }
            };
            self.as_mut().project().state.set(State::Called { future });
        }
    }
}
