//! Wiring: secrets, the store, the hub, the router, and the server's lifetime (start, serve,
//! graceful shutdown).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use seqcast_persistence::{DbReader, DbWriter, EventReader, EventWriter, StoreConfig};
use seqcast_sequencing::{MemorySequencer, RecoveryWindow, RetainedMessage};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Authority, dev_secret, random_hex};
use crate::config::{Settings, StorageKind};
use crate::error::ApiError;
use crate::hub::Hub;
use crate::storage::Store;
use crate::{connection, http, now_ms};

/// Everything a request handler needs.
#[derive(Debug)]
pub struct AppState {
    /// Fan-out, recovery window and backlogs.
    pub hub: Arc<Hub>,
    /// Tokens and keys.
    pub auth: Authority,
    /// The sequence authority.
    pub store: Store,
    /// Resolved settings.
    pub settings: Settings,
    /// Cancelled when the server starts shutting down.
    pub shutdown: CancellationToken,
    /// Tracks WebSocket connection tasks, so shutdown can wait for them.
    pub connections: TaskTracker,
    /// No JWT secret was configured: a generated one is in use.
    pub dev_mode: bool,
    /// Makes message ids for publishes that bring none.
    pub message_ids: http::MessageIds,
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    /// Cancel to shut down.
    pub shutdown: CancellationToken,
    /// The development token printed at start (development mode only).
    pub dev_token: Option<String>,
    /// The API key in use.
    pub api_key: String,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl ServerHandle {
    /// Wait until the server has stopped (after `shutdown` is cancelled).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("server task panicked")?
    }

    /// Shut down and wait.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// Start a server with `settings` and return once it is listening.
pub async fn start(
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<ServerHandle> {
    let listener = bind(&settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let addr = listener.local_addr()?;

    let (jwt_secret, dev_mode) = match &settings.jwt_secret {
        Some(s) => (s.clone(), false),
        None => {
            let (s, _) = dev_secret(&settings.data_dir, "jwt-secret").with_context(|| {
                format!(
                    "cannot keep a development secret in {}",
                    settings.data_dir.display()
                )
            })?;
            (s, true)
        }
    };
    let api_key = match &settings.api_key {
        Some(k) => k.clone(),
        None => {
            dev_secret(&settings.data_dir, "api-key")
                .with_context(|| {
                    format!("cannot keep an API key in {}", settings.data_dir.display())
                })?
                .0
        }
    };
    let auth = Authority::new(&jwt_secret, &api_key);

    let (hub, store) = open_store(&settings)?;
    tracing::info!(
        event = "store_opened",
        storage = ?settings.storage,
        epoch = hub.epoch(),
        head = hub.head(),
        data_dir = %settings.data_dir.display(),
        "sequence authority ready"
    );
    if settings.storage == StorageKind::Memory {
        tracing::warn!(
            event = "memory_storage",
            "storage is memory: sequence numbers restart at 1 and nothing survives a restart"
        );
    }

    let dev_token = if dev_mode {
        let token = auth
            .mint("dev", None, 24 * 3600, true)
            .map_err(|e| anyhow::anyhow!("cannot mint the development token: {e}"))?;
        print_dev_banner(addr, &token, &api_key);
        Some(token)
    } else {
        None
    };

    let app = Arc::new(AppState {
        hub,
        auth,
        store,
        settings,
        shutdown: shutdown.clone(),
        connections: TaskTracker::new(),
        dev_mode,
        message_ids: http::MessageIds::default(),
    });
    let router = router(Arc::clone(&app));
    tracing::info!(event = "listening", addr = %addr, "listening");

    let expiry = tokio::spawn(expire_periodically(Arc::clone(&app)));
    let task = tokio::spawn(async move {
        let graceful = app.shutdown.clone();
        // Frames are small and latency matters: never let Nagle hold one back for an ACK.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { graceful.cancelled().await })
            .await;
        tracing::info!(
            event = "shutting_down",
            open_connections = app.connections.len(),
            "no longer accepting connections"
        );
        app.connections.close();
        if tokio::time::timeout(app.settings.shutdown_grace, app.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                event = "shutdown_deadline",
                open_connections = app.connections.len(),
                "connections still open at the deadline"
            );
        }
        expiry.abort();
        if let Store::Sqlite { writer, .. } = &app.store {
            writer.close().await;
        }
        tracing::info!(event = "stopped", "server stopped");
        served.context("server failed")
    });
    Ok(ServerHandle {
        addr,
        shutdown,
        dev_token,
        api_key,
        task,
    })
}

/// Bind with a listen backlog large enough for a reconnect storm (the kernel caps it at
/// `net.core.somaxconn`).
async fn bind(listen: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(listen).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(addr).and_then(|()| socket.listen(4096)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "address resolves to nothing",
        )
    }))
}

/// Run until `shutdown` is cancelled.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    start(settings, shutdown).await?.wait().await
}

fn open_store(settings: &Settings) -> anyhow::Result<(Arc<Hub>, Store)> {
    match settings.storage {
        StorageKind::Memory => {
            let hub = Hub::new(
                random_hex(8),
                RecoveryWindow::with_floor(settings.ring_limits(), 0),
                settings.backlog,
                Some(MemorySequencer::new()),
            );
            Ok((Arc::new(hub), Store::Memory))
        }
        StorageKind::Postgres => anyhow::bail!(
            "--storage postgres is not available in this version of seqcast; use sqlite (the default) or memory"
        ),
        StorageKind::Sqlite => {
            std::fs::create_dir_all(&settings.data_dir).with_context(|| {
                format!(
                    "cannot create data directory {}",
                    settings.data_dir.display()
                )
            })?;
            let path = settings.data_dir.join("seqcast.db");
            seqcast_persistence::migrate(&path)
                .with_context(|| format!("cannot migrate {}", path.display()))?;
            let reader =
                DbReader::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            let epoch = reader.epoch()?;
            let head = reader.head()?;
            // Refill the recovery window so that recovery works across a restart.
            let now = now_ms();
            let recent = reader.latest_events(
                settings.recovery.max_messages,
                now.saturating_sub(settings.recovery.max_age_ms),
            )?;
            let floor = recent
                .first()
                .map_or(head, |e| e.sequence_number.saturating_sub(1));
            let mut window = RecoveryWindow::with_floor(settings.ring_limits(), floor);
            for ev in &recent {
                let msg = RetainedMessage {
                    sequence_number: ev.sequence_number,
                    key: ev.key.clone(),
                    timestamp_ms: ev.timestamp_ms,
                    frame: Hub::frame_of(ev),
                };
                window
                    .insert(msg, now)
                    .context("database returned events out of order")?;
            }
            let hub = Arc::new(Hub::new(epoch, window, settings.backlog, None));
            let hook_hub = Arc::clone(&hub);
            let mut config = StoreConfig::new(&path);
            config.synchronous = settings.synchronous;
            config.busy_timeout = settings.db_busy_timeout;
            config.group_commit = settings.group_commit;
            let (writer, _info) = DbWriter::open(
                config,
                Box::new(move |events| hook_hub.apply_committed(events, now_ms())),
            )
            .with_context(|| format!("cannot open the database writer on {}", path.display()))?;
            Ok((
                hub,
                Store::Sqlite {
                    writer,
                    reader: Arc::new(reader),
                },
            ))
        }
    }
}

fn print_dev_banner(addr: SocketAddr, token: &str, api_key: &str) {
    tracing::warn!(
        event = "development_mode",
        "no JWT secret configured: development mode with a generated secret kept in the data directory"
    );
    eprintln!(
        "\n  seqcast is in DEVELOPMENT MODE: no --jwt-secret was configured, so a secret was generated\n  \
         and kept in the data directory. Do not expose this server.\n\n  \
         dev token (sub=dev, every channel, may publish, 24 h):\n    {token}\n  \
         API key:\n    {api_key}\n\n  \
         try:\n    curl -s -H 'Authorization: ApiKey {api_key}' -H 'Content-Type: application/json' \\\n      \
         -d '{{\"channel\":\"demo\",\"request_id\":\"r1\",\"data\":{{\"hello\":\"world\"}}}}' http://{addr}/api/publish\n    \
         curl -s -H 'Authorization: Bearer {token}' 'http://{addr}/websocket/messages?since=0'\n  \
         demo page: http://{addr}/\n"
    );
}

async fn expire_periodically(app: Arc<AppState>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        app.hub.expire(now_ms());
    }
}

/// The routes.
pub fn router(app: Arc<AppState>) -> Router {
    Router::new()
        .route("/ws", get(ws_upgrade))
        .route("/websocket/messages", get(http::recover))
        .route("/api/publish", post(http::publish))
        .route("/api/publish/batch", post(http::publish_batch))
        .route(
            "/api/streams/{channel}/{request_id}/messages",
            get(http::stream_page),
        )
        .route("/healthz", get(http::healthz))
        .route("/readyz", get(http::readyz))
        .route("/metrics", get(http::metrics))
        .route("/openapi.json", get(http::assets::openapi))
        .route("/", get(http::assets::demo_page))
        .route("/client/seqcast.js", get(http::assets::client_js))
        .route("/client/seqcast.d.ts", get(http::assets::client_dts))
        .route("/dev/token", get(http::assets::dev_token))
        .fallback(http::not_found)
        .with_state(app)
}

async fn ws_upgrade(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if let Err(e) = check_origin(&app, &headers) {
        return e.into_response();
    }
    if app.shutdown.is_cancelled() {
        return ApiError::Unavailable("server is shutting down".into()).into_response();
    }
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
    // Client frames are small; a 1 KiB read buffer keeps idle connections cheap (tungstenite
    // allocates and zero-fills it on the first read).
    ws.read_buffer_size(1024)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| tracker.track_future(connection::serve(socket, app, pre_auth)))
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
