//! The HTTP listener: accepts TCP connections and serves each with hyper, with hyper's timer
//! wired in so a request head (and an idle keep-alive gap) has a deadline, the peer's address
//! handed to handlers for the per-IP limits, and a graceful shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

/// Serve `service` on `listener` until `shutdown`; then stop accepting, let requests in flight
/// finish (idle keep-alive connections are closed) for at most `grace`.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    header_timeout: Duration,
    shutdown: CancellationToken,
    grace: Duration,
) where
    S: tower::Service<Request, Response = Response, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let tasks = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most likely: let connections close, then go on.
                    tracing::warn!(event = "accept_failed", error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // Frames are small and latency matters: never let Nagle hold one back for an ACK.
        let _ = tcp.set_nodelay(true);
        let service = service.clone();
        let per_connection =
            hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                service.clone().oneshot(req.map(Body::new))
            });
        let conn = builder
            .serve_connection(TokioIo::new(tcp), per_connection)
            .with_upgrades();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                log_connection_error(peer, &e);
            }
        });
    }
    drop(listener);
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!(
            event = "shutdown_deadline",
            open_http_connections = tasks.len(),
            "HTTP requests still in flight at the deadline"
        );
    }
}

fn log_connection_error(peer: SocketAddr, e: &hyper::Error) {
    if e.is_timeout() {
        tracing::info!(
            event = "http_header_timeout",
            peer = %peer,
            "closing an HTTP connection: no complete request head in time"
        );
    } else {
        tracing::debug!(event = "http_connection_error", peer = %peer, error = %e, "HTTP connection ended with an error");
    }
}
