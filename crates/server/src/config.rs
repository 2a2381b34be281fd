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
    /// Renumber stream sequences by insertion order, per stream (for databases written by a buggy version).
    RepairSequences(ServeArgs),
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
    /// Server settings (for the secret).
    #[command(flatten)]
    pub settings: ServeArgs,
}

/// Which store assigns sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// SQLite in the data directory: durable, the default.
    Sqlite,
    /// An in-memory counter: nothing survives a restart.
    Memory,
    /// PostgreSQL (not available in this version).
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
    /// HS256 secret for client tokens (absent: development mode).
    #[arg(long, env = "SEQCAST_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Key for `Authorization: ApiKey K` on publish endpoints.
    #[arg(long, env = "SEQCAST_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Allowed browser origins, comma-separated; absent = same host only.
    #[arg(long, env = "SEQCAST_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    /// Recovery window size in messages (500).
    #[arg(long, env = "SEQCAST_RECOVERY_MAX_MESSAGES")]
    pub recovery_max_messages: Option<usize>,
    /// Recovery window age in seconds (900).
    #[arg(long, env = "SEQCAST_RECOVERY_TTL_SECS")]
    pub recovery_ttl_secs: Option<u64>,
    /// Messages kept in memory for recovery (default: the window size, at most 10000); a larger
    /// window is served from the database.
    #[arg(long, env = "SEQCAST_RECOVERY_BUFFER_MESSAGES")]
    pub recovery_buffer_messages: Option<usize>,
    /// Log output.
    #[arg(long, env = "SEQCAST_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// SQLite durability: full (default) or normal.
    #[arg(long, env = "SEQCAST_SYNCHRONOUS")]
    pub synchronous: Option<SyncMode>,
    /// Backlog bound per subscription key (1000).
    #[arg(long, env = "SEQCAST_BACKLOG_PER_KEY")]
    pub backlog_per_key: Option<usize>,
    /// Backlog bound over all keys (100000).
    #[arg(long, env = "SEQCAST_BACKLOG_TOTAL")]
    pub backlog_total: Option<usize>,
    /// Backlog age limit in seconds (120).
    #[arg(long, env = "SEQCAST_BACKLOG_TTL_SECS")]
    pub backlog_ttl_secs: Option<u64>,
    /// Frames queued per connection before a slow client is closed with 1013 (1024).
    #[arg(long, env = "SEQCAST_SEND_QUEUE")]
    pub send_queue: Option<usize>,
    /// Largest accepted WebSocket frame / HTTP body in bytes (1 MiB).
    #[arg(long, env = "SEQCAST_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
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
}

/// A settings problem, reported before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
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
    /// JWT secret, if configured (None = development mode).
    pub jwt_secret: Option<String>,
    /// API key, if configured.
    pub api_key: Option<String>,
    /// Allowed origins (None = same host only).
    pub allowed_origins: Option<Vec<String>>,
    /// Recovery window bounds (what clients may recover).
    pub recovery: WindowLimits,
    /// Messages the in-memory ring holds; the rest of a larger window comes from the database.
    pub recovery_buffer_messages: usize,
    /// Backlog bounds.
    pub backlog: BacklogLimits,
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
}

impl Settings {
    /// Bounds of the in-memory recovery ring.
    pub fn ring_limits(&self) -> WindowLimits {
        WindowLimits {
            max_messages: self.recovery_buffer_messages,
            max_age_ms: self.recovery.max_age_ms,
        }
    }

    /// Merge flags/environment (already in `args`, clap applies flag-over-env), then the TOML file, then defaults.
    pub fn resolve(args: &ServeArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
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
        let recovery_max_messages = pick!(recovery_max_messages, 500);
        let recovery_ttl_secs = pick!(recovery_ttl_secs, 900);
        let backlog_per_key = pick!(backlog_per_key, 1_000);
        let backlog_total = pick!(backlog_total, 100_000);
        let backlog_ttl_secs = pick!(backlog_ttl_secs, 120);
        let send_queue = pick!(send_queue, 1024);
        let max_message_bytes = pick!(max_message_bytes, 1 << 20);
        positive("recovery_max_messages", recovery_max_messages)?;
        let recovery_buffer_messages =
            pick!(recovery_buffer_messages, recovery_max_messages.min(10_000));
        positive("recovery_buffer_messages", recovery_buffer_messages)?;
        positive("backlog_per_key", backlog_per_key)?;
        positive("backlog_total", backlog_total)?;
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
        Ok(Settings {
            listen,
            data_dir: pick!(data_dir, PathBuf::from("seqcast-data")),
            storage: pick!(storage, StorageKind::Sqlite),
            database_url: pick_opt!(database_url),
            jwt_secret: pick_opt!(jwt_secret).filter(|s| !s.is_empty()),
            api_key: pick_opt!(api_key).filter(|s| !s.is_empty()),
            allowed_origins,
            recovery: WindowLimits {
                max_messages: recovery_max_messages,
                max_age_ms: recovery_ttl_secs.saturating_mul(1000),
            },
            recovery_buffer_messages: recovery_buffer_messages.min(recovery_max_messages),
            backlog: BacklogLimits {
                per_key: backlog_per_key,
                total: backlog_total,
                ttl_ms: backlog_ttl_secs.saturating_mul(1000),
            },
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
        })
    }
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
        assert_eq!(s.recovery.max_messages, 7, "flag wins over file");
        assert_eq!(s.listen, "127.0.0.1:9000", "file wins over default");
        assert_eq!(s.storage, StorageKind::Memory);
        assert_eq!(s.recovery.max_age_ms, 900_000, "default when neither");
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
}
