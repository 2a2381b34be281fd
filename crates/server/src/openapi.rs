//! The OpenAPI description, generated from the handlers' `#[utoipa::path]` attributes and the
//! protocol crate's types. Served at `GET /openapi.json`; `cargo xtask openapi` writes it to
//! docs/openapi.json, and CI fails when that file has drifted from this.

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use axum::response::Response;

use crate::{admin, events, http, upgrade};

/// See the module docs.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "seqcast",
        description = "WebSocket push server with one sequence authority. The WebSocket protocol at GET /ws is described in docs/protocol.md; every error status has the JSON body `ErrorBody`. Every answer carries `x-request-id` (the request's, or a new one).",
        license(name = "MIT OR Apache-2.0"),
    ),
    paths(
        http::publish,
        http::publish_batch,
        http::publish_stream,
        http::recover,
        http::stream_page,
        events::events,
        events::stream_ticket,
        upgrade::ws_upgrade,
        http::healthz,
        http::readyz,
        http::metrics,
        admin::overview,
    ),
    components(schemas(seqcast_protocol::MessageFrame, seqcast_protocol::ErrorCode)),
    modifiers(&Security),
    tags()
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "apiKey",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "Authorization",
                "`ApiKey <key>`",
            ))),
        );
        components.add_security_scheme(
            "adminToken",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// `GET /openapi.json`: the description, generated from the code once.
pub async fn serve() -> Response {
    static OPENAPI: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    http::assets::asset("application/json", OPENAPI.get_or_init(json).as_str())
}

/// The description as pretty JSON with a final newline (the form kept in docs/openapi.json).
pub fn json() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let s = doc
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    // utoipa spells the unsigned formats `u-int64`; the usual spelling is `uint64`.
    let mut s = s.replace("\"format\": \"u-int", "\"format\": \"uint");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    /// docs/openapi.json is the generated description. `cargo xtask openapi` rewrites it
    /// (this test with `SEQCAST_WRITE_OPENAPI=1`); CI fails on drift.
    #[test]
    fn docs_openapi_json_is_generated_from_the_code() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
        let generated = super::json();
        if std::env::var_os("SEQCAST_WRITE_OPENAPI").is_some() {
            std::fs::write(&path, &generated).unwrap();
            return;
        }
        let kept = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            kept == generated,
            "docs/openapi.json has drifted from the code: run `cargo xtask openapi` and commit it"
        );
    }

    #[test]
    fn every_route_is_documented() {
        let doc: serde_json::Value = serde_json::from_str(&super::json()).unwrap();
        for path in [
            "/api/publish",
            "/api/publish/batch",
            "/websocket/messages",
            "/api/streams/{channel}/{request_id}/messages",
            "/ws",
            "/healthz",
            "/readyz",
            "/metrics",
            "/admin/api/overview",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} is not documented");
        }
        let limit = &doc["paths"]["/websocket/messages"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "limit")
            .unwrap()["schema"];
        assert_eq!(limit["maximum"], 10000);
    }
}
