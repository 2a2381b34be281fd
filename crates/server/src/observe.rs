//! Request tracing: every HTTP request gets an `x-request-id` (the client's, or a new UUID),
//! echoed in the answer and carried as `http_request_id` by every log line of the request (a
//! `tracing` span); one access-log line per request — errors at info, successes at debug, so
//! that a publish storm does not become a log storm; and error answers counted by code.
//!
//! `http_request_id` is not `request_id`: that name belongs to the stream key.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::HeaderName;
use axum::middleware::Next;
use axum::response::Response;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use tracing::Span;

use crate::app::AppState;
use crate::error::ApiError;
use crate::metrics::Transport;

/// The request id header.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id, as the request-id layer left it in the headers.
pub fn request_id_of(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers.get(REQUEST_ID).and_then(|v| v.to_str().ok())
}

/// Wrap `router` with the request id, the per-request span and access log, and the error
/// counter. Outermost: the id is set first, so every inner layer and handler sees it.
pub fn layers(router: Router, app: Arc<AppState>) -> Router {
    router
        .layer(axum::middleware::from_fn_with_state(app, count_errors))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    tracing::info_span!(
                        "http",
                        http_request_id = request_id_of(req.headers()).unwrap_or(""),
                        method = %req.method(),
                        path = req.uri().path(),
                    )
                })
                .on_request(())
                .on_response(access_log)
                .on_failure(()),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}

/// The access-log line (in the request's span, which carries id, method and path).
fn access_log<B>(res: &axum::http::Response<B>, latency: Duration, _span: &Span) {
    let status = res.status().as_u16();
    let latency_ms = latency.as_secs_f64() * 1000.0;
    if status >= 400 {
        let code = res
            .extensions()
            .get::<ApiError>()
            .map(|e| e.code().as_str());
        tracing::info!(
            event = "http_request",
            status,
            latency_ms,
            error_code = code,
            "request failed"
        );
    } else {
        tracing::debug!(event = "http_request", status, latency_ms, "request");
    }
}

/// Counts every error answer by code and keeps it for the operator's page.
async fn count_errors(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let origin = format!("{} {}", req.method(), req.uri().path());
    let r = next.run(req).await;
    if let Some(e) = r.extensions().get::<ApiError>() {
        app.hub.metrics.error(
            e.code(),
            Transport::http,
            r.status().as_u16(),
            origin,
            e.message(),
        );
    }
    r
}
