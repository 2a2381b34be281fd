//! The HTTP surface: which path goes to which handler ([`router`]), and the layers every
//! request passes through ([`service`]). No handler lives here.

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::Response;
use axum::routing::{get, post};

use crate::state::AppState;
use crate::{admin, events, http, openapi, upgrade};

/// The routes (CORS on the HTTP API), without the layers every request passes: [`service`]
/// puts those around the whole router once.
pub fn router(app: Arc<AppState>) -> Router {
    // The HTTP API answers browsers of the allowed origins (CORS, preflight included); the
    // WebSocket checks `Origin` itself, at the upgrade.
    let api = Router::new()
        .route("/websocket/messages", get(http::recover))
        .route("/api/publish", post(http::publish))
        .route("/api/publish/batch", post(http::publish_batch))
        .route("/api/publish/stream", post(http::publish_stream))
        .route("/events", get(events::events))
        .route("/api/stream-ticket", post(events::stream_ticket))
        .route(
            "/api/streams/{channel}/{request_id}/messages",
            get(http::stream_page),
        );
    let api = match cors(app.settings.allowed_origins.as_deref()) {
        Some(layer) => api.layer(layer),
        None => api,
    };
    Router::new()
        .route("/ws", get(upgrade::ws_upgrade))
        .merge(api)
        .route("/healthz", get(http::healthz))
        .route("/readyz", get(http::readyz))
        .route("/metrics", get(http::metrics))
        .route("/openapi.json", get(openapi::serve))
        .route("/admin", get(admin::page))
        .route("/admin/api/overview", get(admin::overview))
        .route("/", get(http::assets::demo_page))
        .route("/favicon.ico", get(http::assets::favicon))
        .route("/client/seqcast.js", get(http::assets::client_js))
        .route("/client/seqcast.d.ts", get(http::assets::client_dts))
        .route("/dev/token", get(http::assets::dev_token))
        .fallback(http::not_found)
        .with_state(app)
}

/// The HTTP service: [`router`] inside, from the outside in, request ids with the access log and
/// the error counter ([`crate::observe`]), JSON bodies on every error status, a cap on requests
/// handled at once, a deadline on each request's handling and on its body
/// ([`crate::deadline`]: timers only while something is waited for).
///
/// The layers wrap the router once, not each route (`Router::layer` would): a route's layers
/// cost a boxed service clone and a boxed future each per request, about 5 % of a publish
/// (measured).
pub fn service(
    app: Arc<AppState>,
) -> impl tower::Service<
    axum::extract::Request,
    Response = Response,
    Error = std::convert::Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    let timeouts = app.settings.http_timeouts;
    let concurrency = app.settings.http_concurrency;
    tower::ServiceBuilder::new()
        .layer(crate::observe::ObserveLayer::new(Arc::clone(&app)))
        .map_response(crate::error::json_error_bodies)
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(concurrency))
        .layer(crate::deadline::DeadlinesLayer {
            request: timeouts.request,
            body: timeouts.body,
        })
        .service(router(app))
}

/// CORS for the HTTP API from `--allowed-origins`: those origins (or any, for `*`) may call it
/// from a browser with `Authorization` and `Content-Type` headers; a preflight is answered
/// here. Without the setting, no CORS headers are sent (same origin only).
fn cors(allowed: Option<&[String]>) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderName, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allowed = allowed?;
    let origin = if allowed.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            allowed
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([
                header::RETRY_AFTER,
                crate::events::NEXT_SINCE_HEADER,
                crate::events::EPOCH_HEADER,
            ])
            .max_age(std::time::Duration::from_secs(600)),
    )
}
