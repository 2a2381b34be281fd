//! The two HTTP deadlines (`--http-request-timeout-secs`, `--http-body-timeout-secs`), with a
//! timer only while something is actually waited for.
//!
//! tower-http's layers register a timer for every request and another for every body frame (and
//! the end of the body) — three timer-wheel insertions and removals and their clock reads per
//! publish, ~3 % of a memory-storage publish. Here a request whose handler answers on its first
//! poll, and a body that is already in the connection's buffer, never touch the timer; the
//! deadline starts when the wait does:
//! - the request deadline when the handler first returns `Pending` (the work before it is
//!   CPU-bound and cannot stall);
//! - the body deadline each time the body has no frame ready, reset by every frame that
//!   arrives: the longest wait for the next piece of a body, as documented.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use tokio::time::Sleep;

/// The one timer of a wait: armed on the first call (the first time the inner work was not
/// ready), then polled; ready once `timeout` has passed since it was armed.
fn waited_too_long(
    sleep: &mut Option<Pin<Box<Sleep>>>,
    timeout: Duration,
    cx: &mut Context<'_>,
) -> Poll<()> {
    sleep
        .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)))
        .as_mut()
        .poll(cx)
}

/// The error a body past its deadline yields; [`crate::error::ApiError::from_body_error`] turns
/// it into 408 `timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimeout(pub Duration);

/// A request body with the body deadline: the wrapped body, and a timer armed only while the
/// next frame is not ready.
#[derive(Debug)]
pub struct DeadlineBody {
    inner: Body,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl DeadlineBody {
    /// `inner` with at most `timeout` of waiting for each of its frames.
    pub fn new(inner: Body, timeout: Duration) -> Self {
        DeadlineBody {
            inner,
            timeout,
            sleep: None,
        }
    }
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.sleep = None;
            return Poll::Ready(frame);
        }
        waited_too_long(&mut this.sleep, this.timeout, cx)
            .map(|()| Some(Err(axum::Error::new(BodyTimeout(this.timeout)))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The request deadline as a layer: past `timeout` of waiting for the handler, the answer is a
/// bare 408 (the JSON error body is added further out, by
/// [`crate::error::json_error_bodies`]). Also wraps each request's body in a [`DeadlineBody`].
#[derive(Debug, Clone, Copy)]
pub struct DeadlinesLayer {
    /// Handling, up to the response head.
    pub request: Duration,
    /// Each wait for a piece of the body.
    pub body: Duration,
}

impl<S> tower::Layer<S> for DeadlinesLayer {
    type Service = Deadlines<S>;
    fn layer(&self, inner: S) -> Deadlines<S> {
        Deadlines {
            inner,
            limits: *self,
        }
    }
}

/// See [`DeadlinesLayer`].
#[derive(Debug, Clone)]
pub struct Deadlines<S> {
    inner: S,
    limits: DeadlinesLayer,
}

impl<S> tower::Service<Request> for Deadlines<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let body = self.limits.body;
        let req = req.map(|inner| Body::new(DeadlineBody::new(inner, body)));
        DeadlineFuture {
            inner: self.inner.call(req),
            timeout: self.limits.request,
            sleep: None,
        }
    }
}

pin_project_lite::pin_project! {
    /// A handler's answer, or 408 once it has been waited for longer than the deadline.
    #[derive(Debug)]
    pub struct DeadlineFuture<F> {
        #[pin]
        inner: F,
        timeout: Duration,
        sleep: Option<Pin<Box<Sleep>>>,
    }
}

impl<F> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(answer) = this.inner.poll(cx) {
            return Poll::Ready(answer);
        }
        waited_too_long(this.sleep, *this.timeout, cx)
            .map(|()| Ok(StatusCode::REQUEST_TIMEOUT.into_response()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use axum::body::{Body, Bytes};
    use axum::extract::Request;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse as _, Response};
    use futures_util::FutureExt as _;
    use tower::{Layer as _, Service as _, ServiceExt as _};

    use super::{DeadlineBody, DeadlinesLayer};
    use crate::error::ApiError;

    const LIMITS: DeadlinesLayer = DeadlinesLayer {
        request: Duration::from_secs(5),
        body: Duration::from_secs(1),
    };

    /// A body whose frames are sent through the returned channel.
    fn channel_body() -> (tokio::sync::mpsc::Sender<Bytes>, Body) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|bytes| (Ok::<_, std::convert::Infallible>(bytes), rx))
        });
        (tx, Body::from_stream(stream))
    }

    #[test]
    fn an_answer_ready_at_once_needs_no_timer() {
        // No runtime here: arming a tokio timer would panic.
        let mut service = LIMITS.layer(tower::service_fn(|_req: Request| async {
            Ok::<_, std::convert::Infallible>(StatusCode::OK.into_response())
        }));
        let answer = service
            .call(Request::new(Body::from("{}")))
            .now_or_never()
            .expect("ready on the first poll")
            .unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn a_handler_that_does_not_answer_gets_408_at_the_request_deadline() {
        let service = LIMITS.layer(tower::service_fn(|_req: Request| async {
            std::future::pending::<()>().await;
            Ok::<Response, std::convert::Infallible>(StatusCode::OK.into_response())
        }));
        let started = tokio::time::Instant::now();
        let answer = service.oneshot(Request::new(Body::empty())).await.unwrap();
        assert_eq!(answer.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(started.elapsed(), LIMITS.request);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_handler_within_the_deadline_is_answered() {
        let service = LIMITS.layer(tower::service_fn(|_req: Request| async {
            tokio::time::sleep(Duration::from_secs(4)).await;
            Ok::<_, std::convert::Infallible>(StatusCode::OK.into_response())
        }));
        let answer = service.oneshot(Request::new(Body::empty())).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn the_body_deadline_is_per_piece_and_a_stall_is_a_timeout() {
        let (tx, body) = channel_body();
        let body = DeadlineBody::new(body, LIMITS.body);
        let sender = tokio::spawn(async move {
            // Five pieces 0.6 s apart: 3 s in all, but never 1 s without a piece.
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(600)).await;
                tx.send(Bytes::from_static(b"ab")).await.unwrap();
            }
            // Then nothing, with the body still open.
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(tx);
        });
        let started = tokio::time::Instant::now();
        let error = axum::body::to_bytes(Body::new(body), 1024)
            .await
            .expect_err("a stalled body is an error");
        // The last piece came at 3 s; the deadline is 1 s after it.
        assert_eq!(started.elapsed(), Duration::from_secs(4));
        assert!(
            matches!(
                ApiError::from_body_error(&error, 1024),
                ApiError::Timeout(_)
            ),
            "{error}"
        );
        sender.abort();

        // A body that keeps coming is read whole.
        let (tx, body) = channel_body();
        tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(600)).await;
                tx.send(Bytes::from_static(b"ab")).await.unwrap();
            }
        });
        let bytes = axum::body::to_bytes(Body::new(DeadlineBody::new(body, LIMITS.body)), 1024)
            .await
            .unwrap();
        assert_eq!(&bytes[..], b"ababababab");
    }
}
