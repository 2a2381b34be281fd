//! The WebSocket door, `GET /ws`: the checks made before the upgrade (origin, shutdown, the
//! connection limits, a bearer token on the upgrade), then the socket is handed to
//! [`crate::connection`], tracked so shutdown can wait for it.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Extension;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};

use crate::connection;
use crate::error::ApiError;
use crate::state::AppState;

/// `GET /ws`
#[utoipa::path(
    get,
    path = "/ws",
    summary = "WebSocket upgrade (the protocol is in docs/protocol.md)",
    description = "Authenticate with a `hello` frame, or with `Authorization: Bearer` on the upgrade.",
    responses(
        (status = 101, description = "Switching protocols"),
        (status = 400, description = "Not a WebSocket upgrade request (`bad_request`)", body = seqcast_protocol::ErrorBody),
        (status = 401, description = "Bad bearer token on the upgrade (`unauthorized`)", body = seqcast_protocol::ErrorBody),
        (status = 403, description = "Origin not allowed (`forbidden`)", body = seqcast_protocol::ErrorBody),
        (status = 429, description = "Over a per-IP connection limit (`rate_limited`), with `Retry-After`", body = seqcast_protocol::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until a retry can succeed"))),
        (status = 503, description = "At the connection cap, or shutting down (`unavailable`)", body = seqcast_protocol::ErrorBody),
    )
)]
pub async fn ws_upgrade(
    State(app): State<Arc<AppState>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return ApiError::BadRequest(format!("not a WebSocket upgrade request: {e}"))
                .into_response();
        }
    };
    if let Err(e) = check_origin(&app, &headers) {
        return e.into_response();
    }
    if app.shutdown.is_cancelled() {
        return ApiError::Unavailable("server is shutting down".into()).into_response();
    }
    let ip = app
        .limiter
        .client_ip(peer.map(|Extension(ConnectInfo(a))| a), &headers);
    let slot = match app.limiter.admit_connection(ip) {
        Ok(slot) => slot,
        Err(e) => {
            tracing::info!(event = "connection_refused", client_ip = ip.map(|i| i.to_string()), code = %e.code(), reason = e.message(), "WebSocket upgrade refused by a limit");
            return e.into_response();
        }
    };
    let pre_auth = match headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        Some(v) => match app.auth.reader(Some(v)) {
            Ok(g) => Some(g),
            Err(e) => return e.into_response(),
        },
        None => None,
    };
    let max = app.settings.max_message_bytes;
    let tracker = app.connections.clone();
    let http_request_id: Option<Arc<str>> = crate::observe::request_id_of(&headers).map(Arc::from);
    // Client frames are small; a 1 KiB read buffer keeps idle connections cheap (tungstenite
    // allocates and zero-fills it on the first read).
    ws.read_buffer_size(1024)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            tracker.track_future(async move {
                connection::serve(socket, app, pre_auth, http_request_id).await;
                drop(slot);
            })
        })
}

/// Browsers send `Origin`; other clients don't, and are let through. Absent an allow-list, only
/// the server's own host is allowed.
fn check_origin(app: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let origin = origin.trim_end_matches('/');
    let allowed = match &app.settings.allowed_origins {
        Some(list) => list.iter().any(|o| o == "*" || o == origin),
        None => {
            let host = headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            origin.split_once("://").is_some_and(|(_, h)| h == host)
        }
    };
    if allowed {
        Ok(())
    } else {
        tracing::info!(
            event = "origin_rejected",
            origin,
            "WebSocket upgrade from a disallowed origin"
        );
        Err(ApiError::Forbidden(format!(
            "origin {origin} is not allowed"
        )))
    }
}
