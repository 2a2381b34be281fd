//! The operator's view: `GET /admin` (a small page, no data in it) and the JSON it polls,
//! `GET /admin/api/overview`, behind `--admin-token` (`Authorization: Bearer <token>`). Without
//! a configured token both answer 404: the page is off.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use subtle::ConstantTimeEq as _;

use crate::error::ApiError;
use crate::metrics::{RecentError, WriterSummary};
use crate::state::AppState;

const PAGE: &str = include_str!("../assets/admin.html");
/// Keys listed on the page.
const BUSIEST: usize = 20;

fn check(app: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &app.settings.admin_token else {
        return Err(ApiError::NotFound(
            "the operator's page is off: start the server with --admin-token".into(),
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        })
        .map(|(_, t)| t.trim())
        .ok_or_else(|| {
            ApiError::Unauthorized(
                "admin token required: Authorization: Bearer <admin token>".into(),
            )
        })?;
    if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized("wrong admin token".into()))
    }
}

/// `GET /admin`: the page. It asks for the token and keeps it in the tab's session storage.
pub async fn page(State(app): State<Arc<AppState>>) -> Result<Response, ApiError> {
    if app.settings.admin_token.is_none() {
        return Err(ApiError::NotFound(
            "the operator's page is off: start the server with --admin-token".into(),
        ));
    }
    let mut r = PAGE.into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
        ),
    );
    Ok(r)
}

/// A key with live subscribers on this node.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BusyKey {
    /// `channel:request_id`.
    pub subscription_key: String,
    /// Live subscriptions of the key on this node.
    pub subscribers: usize,
    /// Frames waiting in the deepest send queue among them: how far its slowest live
    /// subscriber is behind.
    pub lag_frames: usize,
}

/// The database writer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WriterView {
    /// Group totals and the last group (take differences between polls for recent averages).
    #[serde(flatten)]
    pub groups: WriterSummary,
    /// Commands waiting for the writer.
    pub queued_commands: u64,
    /// Transactions that failed since start.
    pub transactions_failed: u64,
    /// False once the writer has stopped (publishes then answer 503).
    pub running: bool,
}

/// `GET /admin/api/overview`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Overview {
    /// Server version.
    pub version: &'static str,
    /// `sqlite` or `memory`.
    pub storage: &'static str,
    /// Milliseconds since the Unix epoch, when this was read.
    pub now_ms: u64,
    /// The newest sequence number.
    pub head: u64,
    /// The log's history id.
    pub epoch: String,
    /// The oldest sequence number the log holds.
    pub retention_floor: u64,
    /// The oldest sequence number held in memory.
    pub cache_floor: u64,
    /// Bytes of the log's tail held in memory.
    pub cache_bytes: u64,
    /// Open WebSocket connections.
    pub connections: u64,
    /// Open subscriptions (catching up or live).
    pub subscriptions: i64,
    /// Messages committed since start.
    pub published: u64,
    /// Why publishes would be refused now, if they would.
    pub write_fault: Option<String>,
    /// The keys with the most live subscribers.
    pub busiest_keys: Vec<BusyKey>,
    /// The database writer (absent for memory storage).
    pub writer: Option<WriterView>,
    /// The last errors answered (HTTP and WebSocket), newest first.
    pub last_errors: Vec<RecentError>,
}

/// `GET /admin/api/overview`
#[utoipa::path(
    get,
    path = "/admin/api/overview",
    summary = "The operator's view: head, epoch, retention floor, connections, busiest keys, the writer, last errors",
    security(("adminToken" = [])),
    responses(
        (status = 200, description = "Overview", body = Overview),
        (status = 401, description = "No or wrong admin token (`unauthorized`)", body = seqcast_protocol::ErrorBody),
        (status = 404, description = "No admin token configured: the operator's view is off (`not_found`)", body = seqcast_protocol::ErrorBody),
    )
)]
pub async fn overview(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<axum::Json<Overview>, ApiError> {
    check(&app, &headers)?;
    let hub = &app.hub;
    let gauges = hub.gauges();
    let gauge = |name: &str| gauges.iter().find(|g| g.0 == name).map_or(0, |g| g.2);
    let health = app.store.health();
    let writer = health.queued_commands.map(|queued| WriterView {
        groups: hub.metrics.writer_summary(),
        queued_commands: queued as u64,
        transactions_failed: health.stats.transactions_failed,
        running: health.stopped.is_none(),
    });
    Ok(axum::Json(Overview {
        version: env!("CARGO_PKG_VERSION"),
        storage: app.store.name(),
        now_ms: crate::now_ms(),
        head: hub.head(),
        epoch: hub.epoch(),
        retention_floor: hub.retention_floor(),
        cache_floor: gauge("seqcast_cache_floor"),
        cache_bytes: gauge("seqcast_cache_bytes"),
        connections: app.connections.len() as u64,
        subscriptions: hub.metrics.subscriptions.get(),
        published: hub.metrics.published.get(),
        write_fault: app.write_fault(),
        busiest_keys: hub
            .busiest_keys(BUSIEST)
            .into_iter()
            .map(|(key, subscribers, lag_frames)| BusyKey {
                subscription_key: key.to_string(),
                subscribers,
                lag_frames,
            })
            .collect(),
        writer,
        last_errors: hub.metrics.recent_errors(),
    }))
}
