//! The server's lifetime: open what it serves from (secrets, the data directory, the store, the
//! hub), serve a listener the caller bound, keep the log within retention and watch the
//! database file while it runs, and stop gracefully when told — by a signal, in the binary.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use seqcast_persistence::{
    DbReader, DbWriter, EventReader, HookError, MemoryStore, PgConfig, PgStore, StoreConfig,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Authority, dev_secret};
use crate::config::{AuthMode, Settings, StorageKind, auth_mode};
use crate::error::ApiError;
use crate::hub::Hub;
use crate::limits::Limiter;
use crate::routes::service;
use crate::state::{AppState, MessageIds, PROBE_DEADLINE, file_identity};
use crate::storage::Store;
use crate::{listener, now_ms};

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

/// Bind `settings.listen` for [`run`], with a listen backlog large enough for a reconnect
/// storm. With no token verifier configured, an address that is not loopback is refused first,
/// before anything is bound or generated.
pub async fn bind(settings: &Settings) -> anyhow::Result<TcpListener> {
    let listen_ips: Vec<std::net::IpAddr> = tokio::net::lookup_host(&settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?
        .map(|a| a.ip())
        .collect();
    auth_mode(
        settings.jwt_secret.is_some(),
        settings.jwt_public_key.is_some(),
        &settings.listen,
        &listen_ips,
    )?;
    bind_with_backlog(&settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))
}

/// Serve `settings` on `listener` until `shutdown` completes, then stop gracefully (no new
/// connections, WebSocket clients closed with 1001, requests in flight finished, the store
/// closed) and return. The caller binds the listener ([`bind`]; tests bind `127.0.0.1:0`) and
/// says what stops the server ([`stop_signal`] in the binary).
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let token = CancellationToken::new();
    let trigger = token.clone();
    // Watched from the start: a signal while the store opens stops the server as it begins.
    let watcher = tokio::spawn(async move {
        shutdown.await;
        trigger.cancel();
    });
    let result = match start(listener, settings, token).await {
        Ok(server) => server.wait().await,
        Err(e) => Err(e),
    };
    watcher.abort();
    result
}

/// Start serving `settings` on `listener` and return once it serves; cancel `shutdown` (or
/// call [`ServerHandle::stop`]) to stop it. With no token verifier configured, the listener
/// must be on loopback (development mode).
pub async fn start(
    listener: TcpListener,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<ServerHandle> {
    let addr = listener.local_addr()?;
    // With no verifier, only loopback: checked on the address actually bound.
    let mode = auth_mode(
        settings.jwt_secret.is_some(),
        settings.jwt_public_key.is_some(),
        &settings.listen,
        &[addr.ip()],
    )?;
    let (app, api_key) = open(settings, mode, shutdown.clone())?;
    let dev_token = if app.dev_mode {
        let token = app
            .auth
            .mint("dev", None, 24 * 3600, true)
            .map_err(|e| anyhow::anyhow!("cannot mint the development token: {e}"))?;
        print_dev_banner(addr, &token, &api_key);
        Some(token)
    } else {
        None
    };
    let service = service(Arc::clone(&app));
    tracing::info!(event = "listening", addr = %addr, "listening");

    let delivery = tokio::spawn(stop_on_delivery_failure(Arc::clone(&app)));
    let retention = tokio::spawn(retain_periodically(Arc::clone(&app)));
    let watch = tokio::spawn(watch_database(Arc::clone(&app)));
    let task = tokio::spawn(async move {
        listener::serve(
            listener,
            service,
            app.settings.http_timeouts.header,
            app.shutdown.clone(),
            app.settings.shutdown_grace,
        )
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
        retention.abort();
        watch.abort();
        delivery.abort();
        app.store.close().await;
        tracing::info!(event = "stopped", "server stopped");
        Ok(())
    });
    Ok(ServerHandle {
        addr,
        shutdown,
        dev_token,
        api_key,
        task,
    })
}

/// Open what the server serves from: the secrets resolved, the data directory held (SQLite),
/// the store open and the hub filled from the log's tail. No socket and no task yet: [`start`]
/// adds those, and tests hand the state to [`crate::routes::service`] to call it in-process.
/// Returns the state and the API key in use.
pub fn open(
    settings: Settings,
    mode: AuthMode,
    shutdown: CancellationToken,
) -> anyhow::Result<(Arc<AppState>, String)> {
    let dev_mode = mode == AuthMode::Development;
    let jwt_secret = match &settings.jwt_secret {
        Some(s) => Some(s.clone()),
        None if dev_mode => Some(
            dev_secret(&settings.data_dir, "jwt-secret")
                .with_context(|| {
                    format!(
                        "cannot keep a development secret in {}",
                        settings.data_dir.display()
                    )
                })?
                .0,
        ),
        // Public keys only: HS256 tokens are refused.
        None => None,
    };
    let api_keys = if settings.api_keys.is_empty() {
        vec![
            dev_secret(&settings.data_dir, "api-key")
                .with_context(|| {
                    format!("cannot keep an API key in {}", settings.data_dir.display())
                })?
                .0,
        ]
    } else {
        settings.api_keys.clone()
    };
    let api_key = api_keys[0].clone();
    let auth = match &jwt_secret {
        Some(secret) => Authority::with_keys(secret, api_keys),
        None => Authority::without_secret(api_keys),
    };
    let mut auth = auth.require(settings.jwt_issuer.clone(), settings.jwt_audience.clone());
    if let Some(path) = &settings.jwt_public_key {
        auth = auth
            .with_public_keys(path)
            .map_err(|e| anyhow::anyhow!("--jwt-public-key: {e}"))?;
    }

    for name in &settings.retired {
        tracing::warn!(
            event = "retired_setting",
            setting = *name,
            "this setting no longer does anything (memory is bounded by cache_bytes; backlogs are read from the log); remove it"
        );
    }
    let data_dir_lock = match settings.storage {
        StorageKind::Sqlite => Some(lock_data_dir(&settings)?),
        _ => None,
    };
    let (hub, store) = open_store(&settings)?;
    tracing::info!(
        event = "store_opened",
        storage = store.name(),
        epoch = hub.epoch(),
        head = hub.head(),
        // Only SQLite keeps its database in the data directory.
        data_dir = (settings.storage == StorageKind::Sqlite)
            .then(|| settings.data_dir.display().to_string()),
        "sequence authority ready"
    );
    if settings.storage == StorageKind::Memory {
        tracing::warn!(
            event = "memory_storage",
            "storage is memory: sequence numbers restart at 1 and nothing survives a restart"
        );
    }

    let pages = crate::pages::PageCache::new(settings.cache_bytes / PAGE_CACHE_SHARE);
    let settings_limits = settings.limits.clone();
    let db_identity = match settings.storage {
        StorageKind::Sqlite => {
            let path = settings.data_dir.join("seqcast.db");
            let id =
                file_identity(&path).with_context(|| format!("cannot stat {}", path.display()))?;
            Some((path, id))
        }
        _ => None,
    };
    let app = Arc::new(AppState {
        hub,
        auth,
        store,
        settings,
        shutdown,
        connections: TaskTracker::new(),
        dev_mode,
        message_ids: MessageIds::default(),
        data_dir_lock,
        pages,
        limiter: Arc::new(Limiter::new(settings_limits)),
        db_identity,
        db_fault: std::sync::Mutex::new(None),
    });
    Ok((app, api_key))
}

/// Bind with a listen backlog large enough for a reconnect storm (the kernel caps it at
/// `net.core.somaxconn`).
async fn bind_with_backlog(listen: &str) -> std::io::Result<TcpListener> {
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

/// The shared log pages get this fraction (1/n) of `--cache-bytes`; the tail cache the rest.
const PAGE_CACHE_SHARE: usize = 4;

/// At most how many of the log's newest events are read at start to refill the cache; the read
/// also stops at the cache's byte budget (newest first), so a log of large events is read only
/// as far as the cache holds it.
const CACHE_REFILL_EVENTS: usize = 10_000;

fn open_store(settings: &Settings) -> anyhow::Result<(Arc<Hub>, Store)> {
    // The hub is made once the log's head is known; the commit hook reaches it through here.
    let slot: Arc<std::sync::OnceLock<Arc<Hub>>> = Arc::new(std::sync::OnceLock::new());
    let hook_slot = Arc::clone(&slot);
    let (failed, failures) = watch::channel(None);
    // A refusal stops the backend (its publishers get 503) and is told to the store's owner
    // (`Store::delivery_failure`); the process is stopped in one place,
    // `stop_on_delivery_failure`.
    let hook: seqcast_persistence::CommitHook = Box::new(move |events| {
        let delivered = match hook_slot.get() {
            Some(hub) => hub.apply_committed(events).map_err(|e| e.to_string()),
            None => Err("events committed before the hub was ready".to_owned()),
        };
        delivered.map_err(|why| {
            failed.send_replace(Some(why.clone()));
            HookError::new(why)
        })
    });
    // Each backend is opened (and, once the hub exists, started) by its own type; from then on
    // the server sees only the traits.
    type Start = Box<dyn FnOnce(&Arc<Hub>, u64)>;
    let (store, start): (Store, Start) = match settings.storage {
        StorageKind::Memory => {
            let (writer, reader, _info) = MemoryStore::open(hook);
            let store = Store::new("memory", Arc::new(writer), Arc::new(reader), failures);
            (store, Box::new(|_, _| {}))
        }
        StorageKind::Postgres => {
            let url = settings
                .database_url
                .clone()
                .context("--storage postgres needs --database-url")?;
            let mut config = PgConfig::new(url);
            config.pool_size = settings.pg_pool_size;
            config.statement_timeout = settings.pg_statement_timeout;
            // seqcast.publish() holds data to the same limit as HTTP publishes.
            config.max_message_bytes = Some(settings.max_message_bytes);
            // The tail starts once the hub exists (below): every event reaches the hub only
            // through it, this node's commits included.
            let (writer, reader, _info) =
                PgStore::open_paused(config, hook).context("cannot open the PostgreSQL store")?;
            let store = Store::new(
                "postgres",
                Arc::new(writer.clone()),
                Arc::new(reader),
                failures,
            );
            let start: Start = Box::new(move |hub, head| {
                // A node that was paused or slow while another pruned past it skips to the
                // shared retention floor instead of stopping; its subscribers that needed the
                // pruned part are closed with 1013 (resume: `recovered: false`).
                let skipping = Arc::clone(hub);
                writer.on_pruned_gap(Box::new(move |_applied, next| skipping.skip_to(next)));
                // A failover to another timeline or a restore: the node moves to the new epoch
                // without a restart; its live connections are closed so their clients resume
                // (and are told `recovered: false`).
                let moving = Arc::clone(hub);
                writer.on_new_history(Box::new(move |epoch, head, floor| {
                    moving.move_to_history(epoch.to_owned(), head, floor);
                }));
                writer.start_delivery(head);
            });
            (store, start)
        }
        StorageKind::Sqlite => {
            let path = settings.data_dir.join("seqcast.db");
            seqcast_persistence::migrate(&path)
                .with_context(|| format!("cannot migrate {}", path.display()))?;
            let reader =
                DbReader::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            let mut config = StoreConfig::new(&path);
            config.synchronous = settings.synchronous;
            config.busy_timeout = settings.db_busy_timeout;
            config.group_commit = settings.group_commit;
            config.fault = test_faults();
            let (writer, _info) = DbWriter::open(config, hook).with_context(|| {
                format!("cannot open the database writer on {}", path.display())
            })?;
            let store = Store::new(
                "sqlite",
                Arc::new(writer.clone()),
                Arc::new(reader),
                failures,
            );
            let start: Start = Box::new(move |hub, _head| {
                let observed = Arc::clone(hub);
                writer.observe_commits(Box::new(move |events, took| {
                    observed.metrics.group_committed(events, took);
                }));
            });
            (store, start)
        }
    };
    // One budget: the tail cache gets most of it, the shared log pages the rest.
    let tail_bytes = settings.cache_bytes - settings.cache_bytes / PAGE_CACHE_SHARE;
    // Nothing is published before the server listens, so the log is still at this head.
    let (epoch, head, floor, recent) = log_state(store.blocking_reader(), tail_bytes)?;
    let hub = Hub::new(epoch, head, floor, tail_bytes, recent)
        .context("the log's newest events are not a dense run")?;
    let hub = Arc::new(hub);
    let _ = slot.set(Arc::clone(&hub));
    start(&hub, head);
    Ok((hub, store))
}

/// Test-only fault injection for the black-box tests, from `SEQCAST_TEST_FAULT`:
/// `kill-writer-after=N` makes the database writer thread die after N committed
/// transactions. Not a setting: unset (always, in production) means no injector at all.
fn test_faults() -> Option<seqcast_persistence::FaultInjector> {
    let spec = std::env::var("SEQCAST_TEST_FAULT").ok()?;
    let fault = seqcast_persistence::FaultInjector::new();
    match spec
        .strip_prefix("kill-writer-after=")
        .and_then(|n| n.parse().ok())
    {
        Some(n) => fault.kill_writer_after(n),
        None => tracing::warn!(spec, "unknown SEQCAST_TEST_FAULT; ignored"),
    }
    tracing::warn!(
        event = "test_fault",
        spec,
        "test fault injection is armed (SEQCAST_TEST_FAULT); never set it in production"
    );
    Some(fault)
}

/// The log's epoch, head, retention floor and newest events, as many as `cache_bytes` holds (to
/// refill the cache).
fn log_state(
    reader: &dyn EventReader,
    cache_bytes: usize,
) -> anyhow::Result<(String, u64, u64, Vec<seqcast_persistence::CommittedEvent>)> {
    let head = reader.head()?;
    let floor = reader.retention_floor()?;
    let mut recent = reader.latest_events(CACHE_REFILL_EVENTS, 0, cache_bytes)?;
    // With PostgreSQL other nodes keep committing: the cache ends where the hub starts.
    recent.retain(|e| e.sequence_number <= head);
    Ok((reader.epoch()?, head, floor, recent))
}

/// The one place that decides what the process does when committed events could not be
/// delivered (the commit hook refused them, and the store stopped taking writes): it stops.
async fn stop_on_delivery_failure(app: Arc<AppState>) {
    if let Some(why) = app.store.delivery_failure().await {
        fail_stop(&why);
    }
}

/// Stop the process: serving on would hand out a window with a hole under `complete: true`.
fn fail_stop(why: &str) -> ! {
    tracing::error!(
        event = "fail_stop",
        error = why,
        "committed events cannot be delivered in order: stopping (a restart rebuilds from the log)"
    );
    eprintln!("seqcast: fatal: {why}");
    std::process::exit(70);
}

/// Hold the data directory for this process (an advisory lock on `seqcast.lock`, released
/// when the process ends, crash included), writing who holds it.
pub fn lock_data_dir(settings: &Settings) -> anyhow::Result<std::fs::File> {
    use std::io::{Read as _, Seek as _, Write as _};
    std::fs::create_dir_all(&settings.data_dir).with_context(|| {
        format!(
            "cannot create data directory {}",
            settings.data_dir.display()
        )
    })?;
    let path = settings.data_dir.join("seqcast.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            anyhow::bail!(
                "data directory {} is in use by another seqcast process ({}); stop it, or start this one with another --data-dir",
                settings.data_dir.display(),
                if holder.is_empty() {
                    "holder unknown"
                } else {
                    holder
                }
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(
        file,
        "pid {} listening on {}",
        std::process::id(),
        settings.listen
    )?;
    file.flush()?;
    Ok(file)
}

/// Look at the database file every second: removed or replaced means writes would be lost.
/// This is for `/readyz` and the log while nobody publishes; a publish does not depend on it,
/// as the writer itself looks at the file after each COMMIT, before anyone is answered.
async fn watch_database(app: Arc<AppState>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut writer_was_running = true;
    loop {
        tick.tick().await;
        app.check_database_file();
        // A database that failed a write is probed every second, so its recovery is noticed
        // (and logged) without waiting for a publish.
        if app.store.health().unwritable.is_some() && app.write_fault().is_none() {
            let _ = tokio::time::timeout(PROBE_DEADLINE, app.store.probe()).await;
        }
        let running = app.store.health().stopped.is_none();
        if writer_was_running && !running && !app.shutdown.is_cancelled() {
            tracing::error!(
                event = "writer_stopped",
                "the database writer has stopped: publishes answer 503 and /readyz 503; restart the server"
            );
        }
        writer_was_running = running;
    }
}

/// Events deleted per prune transaction: short, so publishes are never held up for long.
const PRUNE_CHUNK: usize = 5_000;
/// How often retention is applied.
const RETENTION_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Apply retention: raise the floor by age and count, tell the hub first (so nobody is served
/// from memory what the log is about to drop), then delete in short transactions.
async fn retain_periodically(app: Arc<AppState>) {
    let mut tick = tokio::time::interval(RETENTION_INTERVAL);
    let mut failing = false;
    loop {
        tick.tick().await;
        match apply_retention(&app).await {
            Ok(()) => {
                if failing {
                    tracing::info!(event = "retention_recovered", "retention works again");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(event = "retention_failed", error = %e, "could not prune the log; will retry");
                }
                failing = true;
            }
        }
    }
}

async fn apply_retention(app: &AppState) -> Result<(), ApiError> {
    let head = app.hub.head();
    let min_ts = now_ms().saturating_sub(app.settings.retention_ms);
    let first_young = app.store.read(move |r| r.first_at_or_after(min_ts)).await?;
    let by_age = first_young.map_or(head + 1, |s| s.min(head + 1));
    let by_count = app
        .settings
        .retention_max_events
        .map_or(0, |n| head.saturating_sub(n) + 1);
    let floor = by_age.max(by_count);
    if floor <= app.hub.retention_floor() {
        return Ok(());
    }
    app.hub.raise_retention_floor(floor);
    let mut deleted = 0;
    loop {
        let report = app.store.prune(floor, PRUNE_CHUNK).await?;
        deleted += report.deleted;
        if report.done || app.shutdown.is_cancelled() {
            break;
        }
    }
    tracing::debug!(
        event = "log_pruned",
        retention_floor = floor,
        deleted,
        "log pruned"
    );
    Ok(())
}

fn print_dev_banner(addr: SocketAddr, token: &str, api_key: &str) {
    tracing::warn!(
        event = "development_mode",
        "no token verifier configured (--jwt-secret, --jwt-public-key): development mode with a generated secret kept in the data directory, for loopback clients only"
    );
    eprintln!(
        "\n  seqcast is in DEVELOPMENT MODE: no --jwt-secret or --jwt-public-key was configured, so a\n  \
         secret was generated and kept in the data directory. It listens on loopback only; configure a\n  \
         verifier before listening on any other address.\n\n  \
         dev token (sub=dev, every channel, may publish, 24 h):\n    {token}\n  \
         API key:\n    {api_key}\n\n  \
         try:\n    curl -s -H 'Authorization: ApiKey {api_key}' -H 'Content-Type: application/json' \\\n      \
         -d '{{\"channel\":\"search\",\"request_id\":\"r1\",\"data\":{{\"hello\":\"world\"}}}}' http://{addr}/api/publish\n    \
         curl -s -H 'Authorization: Bearer {token}' 'http://{addr}/websocket/messages?since=0'\n  \
         demo page: http://{addr}/\n"
    );
}

/// Completes at the first SIGINT or SIGTERM: the binary's `shutdown` for [`run`]. A second
/// signal ends the process at once (exit status 130).
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                return std::future::pending().await;
            }
        };
        let name = tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        };
        // Shutdown starts as this returns: logging can fail (a closed pipe) and must not keep
        // us from stopping, so the log line and the wait for a second signal go on beside it.
        tokio::spawn(async move {
            tracing::info!(event = "signal", signal = name, "shutting down");
            // A second signal means "now".
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            std::process::exit(130);
        });
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
