//! The `seqcast` binary: parse settings, set up logs, run a subcommand.

use std::process::ExitCode;

use clap::Parser;
use seqcast_server::config::{Cli, Command, DbCommand, LogFormat, ServeArgs, Settings};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => serve(&cli.serve),
        Some(Command::Serve(args)) => serve(&args),
        Some(Command::Token(t)) => token(&t),
        Some(Command::Db(DbCommand::Migrate(args))) => db_migrate(&args),
        Some(Command::Db(DbCommand::RepairSequences(args))) => db_repair(&args),
        Some(Command::Db(DbCommand::Backup(args))) => db_backup(&args),
        Some(Command::Db(DbCommand::Restore(args))) => db_restore(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("seqcast: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal: a log file or pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stdout);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.init(),
    }
}

fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let settings = Settings::resolve(args)?;
    init_logging(settings.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = seqcast_server::bind(&settings).await?;
        seqcast_server::run(listener, settings, seqcast_server::stop_signal()).await
    })
}

fn token(t: &seqcast_server::config::TokenArgs) -> anyhow::Result<()> {
    let settings = Settings::resolve(&t.serve_args())?;
    let secret = match &settings.jwt_secret {
        Some(s) => s.clone(),
        None if settings.jwt_public_key.is_some() => anyhow::bail!(
            "the server verifies tokens with --jwt-public-key and has no --jwt-secret: mint tokens \
             with your identity provider (seqcast token signs HS256 with --jwt-secret)"
        ),
        None => {
            let (s, created) = seqcast_server::auth::dev_secret(&settings.data_dir, "jwt-secret")?;
            if created {
                eprintln!(
                    "seqcast: no JWT secret configured; generated a development secret in {}",
                    settings.data_dir.display()
                );
            }
            s
        }
    };
    let auth = seqcast_server::auth::Authority::new(&secret, "");
    let token = auth
        .mint(&t.sub, t.channels.clone(), t.ttl_secs, t.publish)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{token}");
    Ok(())
}

fn db_path(args: &ServeArgs) -> anyhow::Result<std::path::PathBuf> {
    let settings = Settings::resolve(args)?;
    std::fs::create_dir_all(&settings.data_dir)?;
    Ok(settings.data_dir.join("seqcast.db"))
}

/// The PostgreSQL URL when the settings say `--storage postgres`.
fn postgres_url(args: &ServeArgs) -> anyhow::Result<Option<String>> {
    let mut args = args.clone();
    // `db` subcommands need no JWT secret; only the storage settings matter here.
    if args.jwt_secret.is_none() {
        args.jwt_secret = Some("unused-by-db-commands".to_owned());
    }
    let settings = Settings::resolve(&args)?;
    Ok(
        (settings.storage == seqcast_server::config::StorageKind::Postgres)
            .then_some(settings.database_url)
            .flatten(),
    )
}

fn db_migrate(args: &ServeArgs) -> anyhow::Result<()> {
    if let Some(url) = postgres_url(args)? {
        let report = seqcast_persistence::pg_migrate(&url)?;
        println!("migrated PostgreSQL schema seqcast: {report:?}");
        return Ok(());
    }
    let path = db_path(args)?;
    let report = seqcast_persistence::migrate(&path)?;
    println!("{}: {}", path.display(), migration_summary(&report));
    Ok(())
}

/// `schema 3, nothing to apply` / `applied 1 migration: schema 3 (3 retry_index)`.
fn migration_summary(report: &seqcast_persistence::MigrationReport) -> String {
    let version = report.schema_version;
    match report.applied.as_slice() {
        [] => format!("schema {version}, nothing to apply"),
        applied => {
            let names: Vec<String> = applied
                .iter()
                .map(|m| format!("{} {}", m.version, m.name))
                .collect();
            format!(
                "applied {} migration{}: schema {version} ({})",
                applied.len(),
                if applied.len() == 1 { "" } else { "s" },
                names.join(", ")
            )
        }
    }
}

fn db_repair(args: &ServeArgs) -> anyhow::Result<()> {
    if let Some(url) = postgres_url(args)? {
        let report = seqcast_persistence::pg_repair_sequences(&url)?;
        println!(
            "repaired PostgreSQL schema seqcast: {} streams checked, {} rows renumbered",
            report.streams, report.rows_renumbered
        );
        return Ok(());
    }
    let path = db_path(args)?;
    let report = seqcast_persistence::repair_sequences(&path)?;
    println!(
        "repaired {}: {} streams checked, {} rows renumbered",
        path.display(),
        report.streams,
        report.rows_renumbered
    );
    Ok(())
}

fn db_backup(args: &seqcast_server::config::BackupArgs) -> anyhow::Result<()> {
    let path = db_path(&args.settings)?;
    let report = seqcast_persistence::backup(&path, &args.file)?;
    println!(
        "backed up {} to {}: epoch {}, head {}, {} pages",
        path.display(),
        args.file.display(),
        report.epoch,
        report.head,
        report.pages
    );
    Ok(())
}

fn db_restore(args: &seqcast_server::config::BackupArgs) -> anyhow::Result<()> {
    let settings = Settings::resolve(&args.settings)?;
    // The same lock a running server holds: never swap the file under a server.
    let _lock = seqcast_server::lifetime::lock_data_dir(&settings)?;
    let path = settings.data_dir.join("seqcast.db");
    let report = seqcast_persistence::restore(&args.file, &path)?;
    println!(
        "restored {} into {}: head {}, new epoch {} (was {}); clients of the old history will get recovered: false",
        args.file.display(),
        path.display(),
        report.head,
        report.epoch,
        report.old_epoch
    );
    if let Some(previous) = report.previous {
        println!(
            "the database that was in place is kept as {}",
            previous.display()
        );
    }
    Ok(())
}
