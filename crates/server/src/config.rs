//! Settings: command-line flags over `SEQCAST_*` environment variables over a TOML file
//! (`--config FILE`) over built-in defaults that work on a fresh machine.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use seqcast_backlog::BacklogLimits;
use seqcast_persistence::Synchronous;
use seqcast_sequencing::WindowLimits;
use serde::Deserialize;

/// The `seqcast` command line.
#[derive(Debug, Parser)]
#[command(
    name = "seqcast",
    version,
    about = "A WebSocket push server with one sequence authority"
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// What to do (default: `serve`).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings for `serve` when no subcommand is given.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve(ServeArgs),
    /// Mint a client JWT with the configured secret.
    Token(TokenArgs),
    /// Database maintenance.
    #[command(subcommand)]
    Db(DbCommand),
}

/// `seqcast db …`
#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Apply the embedded schema migrations and exit.
    Migrate(ServeArgs),
    /// Put stream positions that break insertion order back in order, per stream (for databases
    /// written by a buggy version); a healthy database, pruned or not, is left as it is.
    RepairSequences(ServeArgs),
    /// Copy the database to FILE with SQLite's online backup API: consistent (one commit's
    /// state) while the server runs and publishes.
    Backup(BackupArgs),
    /// Install a backup FILE as the data directory's database under a NEW epoch (the old file
    /// is kept aside). Refused while a server holds the data directory.
    Restore(BackupArgs),
}

/// `seqcast db backup FILE` / `seqcast db restore FILE`
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The backup file (written by `backup`, which refuses an existing file; read by `restore`).
    pub file: std::path::PathBuf,
    /// Server settings (for the data directory).
    #[command(flatten)]
    pub settings: ServeArgs,
}

/// `seqcast token …`
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The user (`sub` claim).
    #[arg(long)]
    pub sub: String,
    /// Key patterns the token may read, comma-separated (`search:*,session:abc`); absent = all.
    #[arg(long, value_delimiter = ',')]
    pub channels: Option<Vec<String>>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl_secs: u64,
    /// Allow the token to publish (`publish: true` claim).
    #[arg(long)]
    pub publish: bool,
    /// The server's TOML settings file (where its `jwt_secret` or `data_dir` may be set).
    #[arg(long, env = "SEQCAST_CONFIG")]
    pub config: Option<PathBuf>,
    /// The server's data directory, where a development secret is kept (`./seqcast-data`).
    #[arg(long, env = "SEQCAST_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The server's HS256 secret (absent: the development secret in the data directory).
    #[arg(long, env = "SEQCAST_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
}

impl TokenArgs {
    /// The server settings these flags name: only what finds the secret; the rest from the
    /// settings file, else the defaults.
    pub fn serve_args(&self) -> ServeArgs {
        ServeArgs {
            config: self.config.clone(),
            data_dir: self.data_dir.clone(),
            jwt_secret: self.jwt_secret.clone(),
            ..ServeArgs::default()
        }
    }
}

/// Which store assigns sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// SQLite in the data directory: durable, the default.
    Sqlite,
    /// An in-memory counter: nothing survives a restart.
    Memory,
    /// PostgreSQL (`--database-url`): several server nodes share one sequence space.
    Postgres,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// SQLite durability (`synchronous` pragma).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// An acknowledged publish survives power loss (fsync per commit).
    #[default]
    Full,
    /// An acknowledged publish survives a process crash, not power loss.
    Normal,
}

/// Flags and environment variables for the server — and, read with serde, the TOML file, which
/// uses the same names. Every field is optional so that the file and the defaults can fill what
/// is not given.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// A TOML settings file.
    #[arg(long, env = "SEQCAST_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, env = "SEQCAST_LISTEN")]
    pub listen: Option<String>,
    /// Where SQLite and generated secrets live.
    #[arg(long, env = "SEQCAST_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Sequence authority and store.
    #[arg(long, env = "SEQCAST_STORAGE")]
    pub storage: Option<StorageKind>,
    /// PostgreSQL URL for `--storage postgres`.
    #[arg(long, env = "SEQCAST_DATABASE_URL")]
    pub database_url: Option<String>,
    /// HS256 secret for client tokens. With neither this nor --jwt-public-key the server runs in
    /// development mode (loopback listen addresses only).
    #[arg(long, env = "SEQCAST_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Key(s) for `Authorization: ApiKey K` on publish endpoints: repeat the flag or give a
    /// comma-separated list (several are valid at once, for rotation).
    #[arg(
        long,
        env = "SEQCAST_API_KEY",
        hide_env_values = true,
        value_delimiter = ','
    )]
    #[serde(default, deserialize_with = "one_or_many")]
    pub api_key: Option<Vec<String>>,
    /// Required `iss` claim of client tokens (absent: not checked).
    #[arg(long, env = "SEQCAST_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim of client tokens (absent: not checked).
    #[arg(long, env = "SEQCAST_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Public key(s) for RS256/ES256/EdDSA client tokens: a PEM file or a JWKS (JSON) file.
    #[arg(long, env = "SEQCAST_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// Seconds a client has to send a request's headers; also how long an idle keep-alive
    /// connection is kept (10).
    #[arg(long, env = "SEQCAST_HTTP_HEADER_TIMEOUT_SECS")]
    pub http_header_timeout_secs: Option<u64>,
    /// Seconds a request body may take to arrive; past it: 408 (30).
    #[arg(long, env = "SEQCAST_HTTP_BODY_TIMEOUT_SECS")]
    pub http_body_timeout_secs: Option<u64>,
    /// Seconds a request may take to be answered; past it: 408 (30).
    #[arg(long, env = "SEQCAST_HTTP_REQUEST_TIMEOUT_SECS")]
    pub http_request_timeout_secs: Option<u64>,
    /// HTTP requests handled at once; more wait (10000).
    #[arg(long, env = "SEQCAST_HTTP_CONCURRENCY")]
    pub http_concurrency: Option<usize>,
    /// Seconds between the server's WebSocket pings (25).
    #[arg(long, env = "SEQCAST_PING_INTERVAL_SECS")]
    pub ping_interval_secs: Option<u64>,
    /// Seconds a pinged peer has to show it is alive (any frame, a pong included) before it is
    /// closed (20).
    #[arg(long, env = "SEQCAST_PING_TIMEOUT_SECS")]
    pub ping_timeout_secs: Option<u64>,
    /// Open WebSocket connections in total; more get 503 at the upgrade (100000).
    #[arg(long, env = "SEQCAST_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Open WebSocket connections per client IP; more get 429 (absent: no limit).
    #[arg(long, env = "SEQCAST_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// New WebSocket connections per second per client IP; more get 429 (absent: no limit).
    #[arg(long, env = "SEQCAST_CONNECTIONS_PER_SECOND_PER_IP")]
    pub connections_per_second_per_ip: Option<u32>,
    /// Publishes per second per API key or token `sub`; more get 429 (absent: no limit).
    #[arg(long, env = "SEQCAST_PUBLISH_RATE")]
    pub publish_rate: Option<u32>,
    /// Publishes a key or token may make at once above `publish_rate` (default: the rate).
    #[arg(long, env = "SEQCAST_PUBLISH_BURST")]
    pub publish_burst: Option<u32>,
    /// Peers (IP addresses) whose `X-Forwarded-For` names the client, comma-separated.
    #[arg(long, env = "SEQCAST_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<std::net::IpAddr>>,
    /// Token for the operator's page `/admin` and `/admin/api/...` (absent: they answer 404).
    #[arg(long, env = "SEQCAST_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Allowed browser origins, comma-separated; absent = same host only.
    #[arg(long, env = "SEQCAST_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    /// Recovery window count bound: a resume reaches back at most N messages of the whole log
    /// (absent: no count bound; the window is --recovery-ttl-secs, bounded by retention).
    #[arg(long, env = "SEQCAST_RECOVERY_MAX_MESSAGES")]
    pub recovery_max_messages: Option<u64>,
    /// Recovery window age in seconds (900).
    #[arg(long, env = "SEQCAST_RECOVERY_TTL_SECS")]
    pub recovery_ttl_secs: Option<u64>,
    /// Retired: memory is now bounded by --cache-bytes. Accepted with a warning.
    #[arg(long, env = "SEQCAST_RECOVERY_BUFFER_MESSAGES", hide = true)]
    pub recovery_buffer_messages: Option<usize>,
    /// Bytes of the log's recent tail kept in memory (64 MiB); older messages are read from the log.
    #[arg(long, env = "SEQCAST_CACHE_BYTES")]
    pub cache_bytes: Option<usize>,
    /// Largest recovery answer in bytes (8 MiB); a page cut short says `next_since`.
    #[arg(long, env = "SEQCAST_MAX_RESPONSE_BYTES")]
    pub max_response_bytes: Option<usize>,
    /// How long the log keeps events, in seconds (604800 = 7 days).
    #[arg(long, env = "SEQCAST_RETENTION_SECS")]
    pub retention_secs: Option<u64>,
    /// Most events the log keeps (absent: no count bound).
    #[arg(long, env = "SEQCAST_RETENTION_MAX_EVENTS")]
    pub retention_max_events: Option<u64>,
    /// Log output.
    #[arg(long, env = "SEQCAST_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// SQLite durability: full (default) or normal.
    #[arg(long, env = "SEQCAST_SYNCHRONOUS")]
    pub synchronous: Option<SyncMode>,
    /// Backlog bound per subscription key (1000).
    #[arg(long, env = "SEQCAST_BACKLOG_PER_KEY")]
    pub backlog_per_key: Option<usize>,
    /// Retired: backlogs are read from the log. Accepted with a warning.
    #[arg(long, env = "SEQCAST_BACKLOG_TOTAL", hide = true)]
    pub backlog_total: Option<usize>,
    /// Backlog age limit in seconds (120).
    #[arg(long, env = "SEQCAST_BACKLOG_TTL_SECS")]
    pub backlog_ttl_secs: Option<u64>,
    /// Frames queued per connection before live delivery to it pauses and it catches up from the log (1024).
    #[arg(long, env = "SEQCAST_SEND_QUEUE")]
    pub send_queue: Option<usize>,
    /// Milliseconds a busy connection's live messages may wait to go out together in one write
    /// (1); a connection that wrote less than half of it ago waits. 0: every message at once.
    #[arg(long, env = "SEQCAST_WRITE_DELAY_MS")]
    pub write_delay_ms: Option<u64>,
    /// Largest accepted WebSocket frame / HTTP body in bytes (1 MiB).
    #[arg(long, env = "SEQCAST_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Seconds one `GET /events` (Server-Sent Events) response lasts before the server ends it,
    /// so that proxies cycle it; the client resumes with `Last-Event-ID` and loses nothing (60).
    #[arg(long, env = "SEQCAST_SSE_MAX_SECS")]
    pub sse_max_secs: Option<u64>,
    /// Milliseconds between comment heartbeats on an idle SSE stream (15000; for tests).
    #[arg(long, env = "SEQCAST_SSE_HEARTBEAT_MS", hide = true)]
    pub sse_heartbeat_ms: Option<u64>,
    /// Seconds a stream ticket stays valid (30; for tests).
    #[arg(long, env = "SEQCAST_STREAM_TICKET_TTL_SECS", hide = true)]
    pub stream_ticket_ttl_secs: Option<u64>,
    /// Milliseconds a new connection has to authenticate (10000).
    #[arg(long, env = "SEQCAST_HELLO_TIMEOUT_MS")]
    pub hello_timeout_ms: Option<u64>,
    /// Seconds to wait for connections to close on shutdown (5).
    #[arg(long, env = "SEQCAST_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
    /// Milliseconds the writer waits on a locked database before answering 503 (5000).
    #[arg(long, env = "SEQCAST_DB_BUSY_TIMEOUT_MS")]
    pub db_busy_timeout_ms: Option<u64>,
    /// Most keys one connection may be subscribed to at once (1000).
    #[arg(long, env = "SEQCAST_MAX_SUBSCRIPTIONS")]
    pub max_subscriptions: Option<usize>,
    /// Group commit in the database writer (true); false = one transaction per command, for benchmarks.
    #[arg(long, env = "SEQCAST_GROUP_COMMIT")]
    pub group_commit: Option<bool>,
    /// PostgreSQL: connections in a node's read pool (16).
    #[arg(long, env = "SEQCAST_PG_POOL_SIZE")]
    pub pg_pool_size: Option<usize>,
    /// PostgreSQL: statement (and lock wait) timeout of every connection, in ms (5000).
    #[arg(long, env = "SEQCAST_PG_STATEMENT_TIMEOUT_MS")]
    pub pg_statement_timeout_ms: Option<u64>,
}

/// `--retention-max-events` when none is given and the log lives in memory (`--storage memory`).
pub const MEMORY_RETENTION_MAX_EVENTS: u64 = 1_000_000;

/// A settings problem, reported before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML file could not be read. (Its OS error is part of this message, not a `source`,
    /// so that `{:#}` does not print it twice.)
    #[error("cannot read config file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The TOML file is not valid.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid setting {name}: {message}")]
    Invalid {
        /// The setting.
        name: &'static str,
        /// Why.
        message: String,
    },
    /// No token verifier is configured and the server would listen beyond this machine.
    #[error(
        "no token verifier is configured and --listen {listen} is not a loopback address: development \
         mode (a generated secret, tokens from /dev/token) is for this machine only. Configure \
         --jwt-secret S (HS256) or --jwt-public-key FILE (your identity provider's PEM key or JWKS), \
         or listen on 127.0.0.1"
    )]
    NoVerifier {
        /// The listen address as given.
        listen: String,
    },
}

/// How clients are authenticated, decided at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// A verifier is configured (`--jwt-secret` and/or `--jwt-public-key`): only its tokens are
    /// accepted; nothing is generated, `/dev/token` answers 404.
    Configured,
    /// No verifier and a loopback listen address: a generated secret kept in the data directory,
    /// a development token printed at start, `/dev/token` for loopback peers.
    Development,
}

/// Development mode only when no verifier of any kind is configured **and** every address the
/// listen address resolves to (`listen_ips`) is loopback; no verifier and any other address is
/// refused ([`ConfigError::NoVerifier`]): a generated secret and `/dev/token` must never face a
/// network.
pub fn auth_mode(
    has_jwt_secret: bool,
    has_public_key: bool,
    listen: &str,
    listen_ips: &[std::net::IpAddr],
) -> Result<AuthMode, ConfigError> {
    if has_jwt_secret || has_public_key {
        return Ok(AuthMode::Configured);
    }
    let loopback = !listen_ips.is_empty() && listen_ips.iter().all(|ip| is_loopback(*ip));
    if loopback {
        Ok(AuthMode::Development)
    } else {
        Err(ConfigError::NoVerifier {
            listen: listen.to_owned(),
        })
    }
}

/// Loopback, IPv4-mapped IPv6 (`::ffff:127.0.0.1`) included.
pub fn is_loopback(ip: std::net::IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Deadlines on each phase of an HTTP request.
#[derive(Debug, Clone, Copy)]
pub struct HttpTimeouts {
    /// Request line and headers (and idle keep-alive between requests).
    pub header: Duration,
    /// The request body.
    pub body: Duration,
    /// Handling, up to the response head.
    pub request: Duration,
}

/// Caps on connections and rates. `None` = no limit.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Open WebSocket connections in total.
    pub max_connections: usize,
    /// Open WebSocket connections per client IP.
    pub max_connections_per_ip: Option<usize>,
    /// New WebSocket connections per second per client IP.
    pub connections_per_second_per_ip: Option<u32>,
    /// Publishes per second per API key / token subject, and the burst.
    pub publish_rate: Option<(u32, u32)>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

/// Resolved settings of a server.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Address to bind.
    pub listen: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Store kind.
    pub storage: StorageKind,
    /// PostgreSQL URL.
    pub database_url: Option<String>,
    /// PostgreSQL read pool size.
    pub pg_pool_size: usize,
    /// PostgreSQL statement timeout.
    pub pg_statement_timeout: Duration,
    /// JWT secret, if configured (neither this nor `jwt_public_key`: development mode, see
    /// [`auth_mode`]).
    pub jwt_secret: Option<String>,
    /// API keys, if configured (any of them is valid).
    pub api_keys: Vec<String>,
    /// Required `iss` claim.
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim.
    pub jwt_audience: Option<String>,
    /// Public-key file for asymmetric tokens.
    pub jwt_public_key: Option<PathBuf>,
    /// HTTP timeouts.
    pub http_timeouts: HttpTimeouts,
    /// HTTP requests handled at once.
    pub http_concurrency: usize,
    /// Server ping period on WebSockets.
    pub ping_interval: Duration,
    /// How long a pinged peer has to answer.
    pub ping_timeout: Duration,
    /// Connection and rate limits.
    pub limits: Limits,
    /// Allowed origins (None = same host only).
    pub allowed_origins: Option<Vec<String>>,
    /// Token for `/admin` (None: the operator's page is off).
    pub admin_token: Option<String>,
    /// Recovery window bounds (how far back a resume reaches).
    pub recovery: WindowLimits,
    /// Bytes of the log's recent tail kept in memory.
    pub cache_bytes: usize,
    /// Largest recovery answer in bytes.
    pub max_response_bytes: usize,
    /// How long the log keeps events (ms).
    pub retention_ms: u64,
    /// Most events the log keeps.
    pub retention_max_events: Option<u64>,
    /// What a subscribe without `since` drains.
    pub backlog: BacklogLimits,
    /// Retired settings that were given (flag, variable or file): warned about at start.
    pub retired: Vec<&'static str>,
    /// Log format.
    pub log_format: LogFormat,
    /// SQLite durability.
    pub synchronous: Synchronous,
    /// Per-connection send queue capacity (items).
    pub send_queue: usize,
    /// Maximum frame / body size.
    pub max_message_bytes: usize,
    /// Authentication deadline for new connections.
    pub hello_timeout: Duration,
    /// Shutdown deadline.
    pub shutdown_grace: Duration,
    /// SQLite busy timeout.
    pub db_busy_timeout: Duration,
    /// Group commit in the database writer.
    pub group_commit: bool,
    /// Most keys one connection may be subscribed to.
    pub max_subscriptions: usize,
    /// Longest a busy connection's live message waits to share a write (zero: never).
    pub write_delay: Duration,
    /// Server-Sent Events streams (`GET /events`).
    pub sse: SseSettings,
}

/// How the server paces a Server-Sent Events stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseSettings {
    /// How long one response lasts before the server ends it (the client resumes).
    pub max_duration: Duration,
    /// The longest an open stream stays silent: a comment is written then.
    pub heartbeat: Duration,
    /// How long a stream ticket (`POST /api/stream-ticket`) stays valid.
    pub ticket_ttl: Duration,
}

impl Settings {
    /// Merge flags/environment (already in `args`, clap applies flag-over-env), then the TOML file, then defaults.
    pub fn resolve(args: &ServeArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                    path: path.clone(),
                    error,
                })?;
                toml::from_str::<ServeArgs>(&text).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    message: e.to_string(),
                })?
            }
            None => ServeArgs::default(),
        };
        macro_rules! pick {
            ($field:ident, $default:expr) => {
                args.$field
                    .clone()
                    .or(file.$field.clone())
                    .unwrap_or_else(|| $default)
            };
        }
        macro_rules! pick_opt {
            ($field:ident) => {
                args.$field.clone().or(file.$field.clone())
            };
        }
        let recovery_max_messages = pick_opt!(recovery_max_messages);
        let recovery_ttl_secs = pick!(recovery_ttl_secs, 900);
        let backlog_per_key = pick!(backlog_per_key, 1_000);
        let backlog_ttl_secs = pick!(backlog_ttl_secs, 120);
        let send_queue = pick!(send_queue, 1024);
        let max_message_bytes = pick!(max_message_bytes, 1 << 20);
        if recovery_max_messages == Some(0) {
            return Err(ConfigError::Invalid {
                name: "recovery_max_messages",
                message: "must be at least 1 (leave it out for no count bound)".into(),
            });
        }
        let mut retired = Vec::new();
        if pick_opt!(recovery_buffer_messages).is_some() {
            retired.push("recovery_buffer_messages");
        }
        if pick_opt!(backlog_total).is_some() {
            retired.push("backlog_total");
        }
        let cache_bytes = pick!(cache_bytes, 64 << 20);
        let max_response_bytes = pick!(max_response_bytes, 8 << 20);
        let retention_secs = pick!(retention_secs, 7 * 24 * 3600);
        let retention_max_events = pick_opt!(retention_max_events);
        if retention_secs == 0 {
            return Err(ConfigError::Invalid {
                name: "retention_secs",
                message: "must be at least 1".into(),
            });
        }
        if retention_max_events == Some(0) {
            return Err(ConfigError::Invalid {
                name: "retention_max_events",
                message: "must be at least 1".into(),
            });
        }
        if max_response_bytes < 1024 {
            return Err(ConfigError::Invalid {
                name: "max_response_bytes",
                message: format!("{max_response_bytes} is below the minimum of 1024"),
            });
        }
        positive("backlog_per_key", backlog_per_key)?;
        positive("send_queue", send_queue)?;
        if max_message_bytes < 1024 {
            return Err(ConfigError::Invalid {
                name: "max_message_bytes",
                message: format!("{max_message_bytes} is below the minimum of 1024"),
            });
        }
        let listen = pick!(listen, "127.0.0.1:8080".to_string());
        if listen.parse::<SocketAddr>().is_err() && !listen.contains(':') {
            return Err(ConfigError::Invalid {
                name: "listen",
                message: format!("{listen:?} is not host:port"),
            });
        }
        let allowed_origins = pick_opt!(allowed_origins).map(|v| {
            v.into_iter()
                .map(|o| o.trim().trim_end_matches('/').to_string())
                .filter(|o| !o.is_empty())
                .collect::<Vec<_>>()
        });
        let storage = pick!(storage, StorageKind::Sqlite);
        // The memory log is held in this process: without a count bound, 7 days of publishes
        // would be kept in RAM.
        let retention_max_events = retention_max_events
            .or((storage == StorageKind::Memory).then_some(MEMORY_RETENTION_MAX_EVENTS));
        let database_url = pick_opt!(database_url).filter(|s| !s.is_empty());
        let jwt_secret = pick_opt!(jwt_secret).filter(|s| !s.is_empty());
        if storage == StorageKind::Postgres {
            if database_url.is_none() {
                return Err(ConfigError::Invalid {
                    name: "database_url",
                    message: "--storage postgres needs --database-url".into(),
                });
            }
            if jwt_secret.is_none() {
                return Err(ConfigError::Invalid {
                    name: "jwt_secret",
                    message: "--storage postgres needs an explicit --jwt-secret shared by every node \
                              (a generated development secret would make a token valid on one node only)"
                        .into(),
                });
            }
        }
        let pg_pool_size = pick!(pg_pool_size, seqcast_persistence::DEFAULT_PG_POOL_SIZE);
        positive("pg_pool_size", pg_pool_size)?;
        Ok(Settings {
            listen,
            data_dir: pick!(data_dir, PathBuf::from("seqcast-data")),
            storage,
            database_url,
            pg_pool_size,
            pg_statement_timeout: Duration::from_millis(
                pick!(pg_statement_timeout_ms, 5_000).max(1),
            ),
            jwt_secret,
            api_keys: pick_opt!(api_key)
                .unwrap_or_default()
                .into_iter()
                .map(|k| k.trim().to_owned())
                .filter(|k| !k.is_empty())
                .collect(),
            jwt_issuer: pick_opt!(jwt_issuer).filter(|s| !s.is_empty()),
            jwt_audience: pick_opt!(jwt_audience).filter(|s| !s.is_empty()),
            jwt_public_key: pick_opt!(jwt_public_key),
            http_timeouts: HttpTimeouts {
                header: secs(
                    "http_header_timeout_secs",
                    pick!(http_header_timeout_secs, 10),
                )?,
                body: secs("http_body_timeout_secs", pick!(http_body_timeout_secs, 30))?,
                request: secs(
                    "http_request_timeout_secs",
                    pick!(http_request_timeout_secs, 30),
                )?,
            },
            http_concurrency: {
                let n = pick!(http_concurrency, 10_000);
                positive("http_concurrency", n)?;
                n
            },
            ping_interval: secs("ping_interval_secs", pick!(ping_interval_secs, 25))?,
            ping_timeout: secs("ping_timeout_secs", pick!(ping_timeout_secs, 20))?,
            limits: Limits {
                max_connections: {
                    let n = pick!(max_connections, 100_000);
                    positive("max_connections", n)?;
                    n
                },
                max_connections_per_ip: match pick_opt!(max_connections_per_ip) {
                    Some(n) => {
                        positive("max_connections_per_ip", n)?;
                        Some(n)
                    }
                    None => None,
                },
                connections_per_second_per_ip: match pick_opt!(connections_per_second_per_ip) {
                    Some(n) => {
                        positive("connections_per_second_per_ip", n as usize)?;
                        Some(n)
                    }
                    None => None,
                },
                publish_rate: match pick_opt!(publish_rate) {
                    Some(rate) => {
                        positive("publish_rate", rate as usize)?;
                        let burst = pick!(publish_burst, rate);
                        positive("publish_burst", burst as usize)?;
                        Some((rate, burst))
                    }
                    None => None,
                },
                trusted_proxies: pick_opt!(trusted_proxies).unwrap_or_default(),
            },
            allowed_origins,
            admin_token: pick_opt!(admin_token).filter(|s| !s.trim().is_empty()),
            recovery: WindowLimits {
                max_messages: recovery_max_messages,
                max_age_ms: recovery_ttl_secs.saturating_mul(1000),
            },
            cache_bytes,
            max_response_bytes,
            retention_ms: retention_secs.saturating_mul(1000),
            retention_max_events,
            backlog: BacklogLimits {
                per_key: backlog_per_key,
                ttl_ms: backlog_ttl_secs.saturating_mul(1000),
            },
            retired,
            log_format: pick!(log_format, LogFormat::Text),
            synchronous: match pick!(synchronous, SyncMode::Full) {
                SyncMode::Full => Synchronous::Full,
                SyncMode::Normal => Synchronous::Normal,
            },
            send_queue,
            max_message_bytes,
            hello_timeout: Duration::from_millis(pick!(hello_timeout_ms, 10_000)),
            shutdown_grace: Duration::from_secs(pick!(shutdown_grace_secs, 5)),
            db_busy_timeout: Duration::from_millis(pick!(db_busy_timeout_ms, 5_000)),
            group_commit: pick!(group_commit, true),
            max_subscriptions: pick!(max_subscriptions, 1_000),
            write_delay: Duration::from_millis(pick!(write_delay_ms, 1)),
            sse: SseSettings {
                max_duration: secs("sse_max_secs", pick!(sse_max_secs, 60))?,
                heartbeat: Duration::from_millis(pick!(sse_heartbeat_ms, 15_000).max(10)),
                ticket_ttl: secs("stream_ticket_ttl_secs", pick!(stream_ticket_ttl_secs, 30))?,
            },
        })
    }
}

fn secs(name: &'static str, v: u64) -> Result<Duration, ConfigError> {
    if v == 0 {
        return Err(ConfigError::Invalid {
            name,
            message: "must be at least 1 second".into(),
        });
    }
    Ok(Duration::from_secs(v))
}

/// A TOML value that is one string or a list of strings (`api_key = "k"` or `["k1", "k2"]`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(Option::<OneOrMany>::deserialize(d)?.map(|v| match v {
        OneOrMany::One(s) => s.split(',').map(str::to_owned).collect(),
        OneOrMany::Many(v) => v,
    }))
}

fn positive(name: &'static str, v: usize) -> Result<(), ConfigError> {
    if v == 0 {
        return Err(ConfigError::Invalid {
            name,
            message: "must be at least 1".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seqcast.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\nrecovery_max_messages = 42\nstorage = \"memory\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            recovery_max_messages: Some(7),
            ..ServeArgs::default()
        };
        let s = Settings::resolve(&args).unwrap();
        assert_eq!(s.recovery.max_messages, Some(7), "flag wins over file");
        assert_eq!(s.listen, "127.0.0.1:9000", "file wins over default");
        assert_eq!(s.storage, StorageKind::Memory);
        assert_eq!(s.recovery.max_age_ms, 900_000, "default when neither");
    }

    #[test]
    fn retired_settings_still_start_and_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.toml");
        std::fs::write(&path, "recovery_buffer_messages = 100\nbacklog_total = 5\n").unwrap();
        let s = Settings::resolve(&ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(s.retired, ["recovery_buffer_messages", "backlog_total"]);
        let s = Settings::resolve(&ServeArgs::default()).unwrap();
        assert!(s.retired.is_empty());
        assert_eq!(s.cache_bytes, 64 << 20);
        assert_eq!(s.retention_ms, 7 * 24 * 3600 * 1000);
        assert_eq!(s.write_delay, Duration::from_millis(1));
        let s = Settings::resolve(&ServeArgs {
            write_delay_ms: Some(0),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(s.write_delay, Duration::ZERO, "0 turns coalescing off");
    }

    #[test]
    fn unknown_file_keys_and_zero_bounds_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "lisen = \"x\"\n").unwrap();
        let err = Settings::resolve(&ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
        let err = Settings::resolve(&ServeArgs {
            send_queue: Some(0),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("send_queue"), "{err}");
    }

    #[test]
    fn development_mode_needs_no_verifier_and_a_loopback_listen_address() {
        use std::net::IpAddr;
        let v4: IpAddr = "127.0.0.1".parse().unwrap();
        let v6: IpAddr = "::1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let any: IpAddr = "0.0.0.0".parse().unwrap();
        let lan: IpAddr = "192.168.1.10".parse().unwrap();
        for ips in [vec![v4], vec![v6], vec![mapped], vec![v4, v6]] {
            assert_eq!(
                auth_mode(false, false, "localhost:8080", &ips).unwrap(),
                AuthMode::Development,
                "{ips:?}"
            );
        }
        // Any verifier turns development mode off, whatever the address.
        for (secret, public) in [(true, false), (false, true), (true, true)] {
            for ips in [vec![v4], vec![any], vec![lan]] {
                assert_eq!(
                    auth_mode(secret, public, "x:1", &ips).unwrap(),
                    AuthMode::Configured
                );
            }
        }
        // No verifier and an address beyond this machine (or one of several): refused, saying
        // what to configure.
        for ips in [vec![any], vec![lan], vec![v4, lan], vec![]] {
            let err = auth_mode(false, false, "0.0.0.0:8080", &ips).unwrap_err();
            let text = err.to_string();
            for needle in [
                "--jwt-secret",
                "--jwt-public-key",
                "0.0.0.0:8080",
                "loopback",
            ] {
                assert!(text.contains(needle), "{ips:?}: {text}");
            }
        }
    }

    #[test]
    fn the_recovery_window_has_no_count_bound_unless_given() {
        let s = Settings::resolve(&ServeArgs::default()).unwrap();
        assert_eq!(s.recovery.max_messages, None);
        assert_eq!(s.recovery.max_age_ms, 900_000);
        let s = Settings::resolve(&ServeArgs {
            recovery_max_messages: Some(500),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(s.recovery.max_messages, Some(500));
        let err = Settings::resolve(&ServeArgs {
            recovery_max_messages: Some(0),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("recovery_max_messages"), "{err}");
    }
}
