//! The embedded PostgreSQL migrations (schema `seqcast`), the store's identity (epoch), and
//! `seqcast db repair-sequences` for PostgreSQL.

use tokio_postgres::Client;

use super::{PgConfig, PgRuntime, connect, pg_error};
use crate::error::StoreError;
use crate::maintenance::{AppliedMigration, MigrationReport, Renumbering, RepairReport};

struct PgMigration {
    version: u32,
    name: &'static str,
    sql: &'static str,
}

/// Append only: an applied migration is never edited.
const PG_MIGRATIONS: &[PgMigration] = &[
    PgMigration {
        version: 1,
        name: "log",
        sql: include_str!("../../migrations/postgres/0001_log.sql"),
    },
    PgMigration {
        version: 2,
        name: "outbox",
        sql: include_str!("../../migrations/postgres/0002_outbox.sql"),
    },
    PgMigration {
        version: 3,
        name: "pruned_positions",
        sql: include_str!("../../migrations/postgres/0003_pruned_positions.sql"),
    },
    PgMigration {
        version: 4,
        name: "publish_without_notify",
        sql: include_str!("../../migrations/postgres/0004_publish_without_notify.sql"),
    },
    PgMigration {
        version: 5,
        name: "head",
        sql: include_str!("../../migrations/postgres/0005_head.sql"),
    },
];

/// The PostgreSQL schema version this build writes and reads.
pub const PG_SCHEMA_VERSION: u32 = 5;

/// Key of the session advisory lock that migrations run under, so nodes that start together
/// do not race ("seqcast" in ASCII).
const MIGRATION_LOCK: i64 = 0x0073_6571_6361_7374;

/// Applies the pending migrations under `pg_advisory_lock`, each in its own transaction.
pub(crate) async fn apply_migrations(client: &mut Client) -> Result<MigrationReport, StoreError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg_error)?;
    let result = apply_locked(client).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg_error);
    let report = result?;
    unlocked?;
    Ok(report)
}

async fn apply_locked(client: &mut Client) -> Result<MigrationReport, StoreError> {
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS seqcast;
             CREATE TABLE IF NOT EXISTS seqcast.schema_migrations (
                 version    int PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );",
        )
        .await
        .map_err(pg_error)?;
    let mut version = schema_version(client).await?;
    check_known(version)?;
    let mut applied = Vec::new();
    for migration in PG_MIGRATIONS {
        if migration.version <= version {
            continue;
        }
        let tx = client.transaction().await.map_err(pg_error)?;
        tx.batch_execute(migration.sql).await.map_err(pg_error)?;
        if migration.version == 1 {
            let epoch = random_hex(16);
            tx.execute(
                "INSERT INTO seqcast.store_meta (key, value) VALUES ('epoch', $1)",
                &[&epoch],
            )
            .await
            .map_err(pg_error)?;
        }
        let v = i32::try_from(migration.version).unwrap_or(i32::MAX);
        tx.execute(
            "INSERT INTO seqcast.schema_migrations (version, name) VALUES ($1, $2)",
            &[&v, &migration.name],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applied database migration"
        );
        applied.push(AppliedMigration {
            version: migration.version,
            name: migration.name,
        });
        version = migration.version;
    }
    Ok(MigrationReport {
        applied,
        schema_version: version,
    })
}

fn check_known(version: u32) -> Result<(), StoreError> {
    if version > PG_SCHEMA_VERSION {
        return Err(StoreError::Corrupt(format!(
            "database schema version {version} is newer than this build supports ({PG_SCHEMA_VERSION})"
        )));
    }
    Ok(())
}

async fn schema_version(client: &Client) -> Result<u32, StoreError> {
    let row = client
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM seqcast.schema_migrations",
            &[],
        )
        .await
        .map_err(pg_error)?;
    let v: i32 = row.get(0);
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("schema_migrations holds {v}")))
}

/// Fails unless the schema is exactly the one this build reads.
pub(crate) async fn require_current_schema(client: &Client) -> Result<(), StoreError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('seqcast.schema_migrations') IS NOT NULL",
            &[],
        )
        .await
        .map_err(pg_error)?
        .get(0);
    let version = if exists {
        schema_version(client).await?
    } else {
        0
    };
    check_known(version)?;
    if version < PG_SCHEMA_VERSION {
        return Err(StoreError::Unavailable(format!(
            "database schema version {version} is older than {PG_SCHEMA_VERSION}; run `seqcast db migrate`"
        )));
    }
    Ok(())
}

/// The store's epoch: the random id made with the schema, bound to the database's identity —
/// the cluster's system identifier, its current timeline and the database's oid — so a
/// restore into another cluster or database, or a failover to another timeline, is another
/// history with another epoch.
pub(crate) async fn read_epoch(client: &Client) -> Result<String, StoreError> {
    let seed: String = client
        .query_one(
            "SELECT value FROM seqcast.store_meta WHERE key = 'epoch'",
            &[],
        )
        .await
        .map_err(pg_error)?
        .get(0);
    Ok(format!("{seed}-{}", identity(client).await))
}

/// `sysid.timeline.dboid`; parts the role may not read are `0` (logged once per call).
async fn identity(client: &Client) -> String {
    let dboid = client
        .query_one(
            "SELECT oid::bigint FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(0);
    let sysid = match client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
    {
        Ok(row) => row.get::<_, String>(0),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the cluster's system identifier; the epoch is not bound to it");
            "0".to_owned()
        }
    };
    // The current WAL file's name starts with the timeline (8 hex digits). On a standby
    // pg_current_wal_lsn fails: then the last checkpoint's timeline.
    let timeline = match client
        .query_one(
            "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)",
            &[],
        )
        .await
    {
        Ok(row) => row.get::<_, String>(0),
        Err(_) => match client
            .query_one("SELECT timeline_id::text FROM pg_control_checkpoint()", &[])
            .await
        {
            Ok(row) => row.get::<_, String>(0),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the timeline; the epoch is not bound to it");
                "0".to_owned()
            }
        },
    };
    let timeline = u64::from_str_radix(&timeline, 16).unwrap_or(0);
    format!("{sysid}.{timeline}.{dboid}")
}

pub(crate) fn random_hex(bytes: usize) -> String {
    use rand::Rng as _;
    let mut rng = rand::rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

/// `seqcast db migrate` against PostgreSQL: creates the `seqcast` schema if needed and applies
/// every pending migration, under the advisory lock. Safe while servers run.
pub fn pg_migrate(url: &str) -> Result<MigrationReport, StoreError> {
    let config = PgConfig::new(url).connection("seqcast-migrate")?;
    let runtime = PgRuntime::new()?;
    runtime.block(async move {
        let mut client = connect(&config, None).await?;
        apply_migrations(&mut client).await
    })
}

/// `seqcast db repair-sequences` against PostgreSQL: the rule of SQLite's repair (a row keeps
/// its position while positions rise in creation order; one at or below its predecessor's gets
/// one past the larger of that and the stream's `pruned_position`), so a healthy database,
/// pruned or not, is left as it is. One transaction that holds the counter row (so no node
/// writes meanwhile).
pub fn pg_repair_sequences(url: &str) -> Result<RepairReport, StoreError> {
    let config = PgConfig::new(url).connection("seqcast-repair")?;
    let runtime = PgRuntime::new()?;
    runtime.block(async move {
        let mut client = connect(&config, None).await?;
        apply_migrations(&mut client).await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        tx.execute(
            "SELECT head FROM seqcast.counter WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await
        .map_err(pg_error)?;
        let streams: i64 = tx
            .query_one("SELECT count(*) FROM seqcast.streams", &[])
            .await
            .map_err(pg_error)?
            .get(0);
        let rows = tx
            .query(
                "SELECT r.stream_id, s.pruned_position, r.message_id, r.stream_sequence
                   FROM seqcast.stream_rows r JOIN seqcast.streams s USING (stream_id)
                  ORDER BY r.stream_id, r.first_sequence",
                &[],
            )
            .await
            .map_err(pg_error)?;
        let mut renumbering = Renumbering::default();
        let (mut ids, mut messages, mut positions) = (Vec::new(), Vec::new(), Vec::new());
        let mut lowest = 0i64;
        for row in &rows {
            let (stream, pruned, position): (i64, i64, i64) = (row.get(0), row.get(1), row.get(3));
            lowest = lowest.min(position);
            if let Some(new) = renumbering.next(stream, position, pruned) {
                ids.push(stream);
                messages.push(row.get::<_, String>(2));
                positions.push(new);
            }
        }
        if !ids.is_empty() {
            // (stream_id, stream_sequence) is unique and checked row by row: the moved rows go
            // first to distinct positions below every existing one, then to their own.
            let parked: Vec<i64> = (1..=i64::try_from(ids.len()).unwrap_or(i64::MAX))
                .map(|i| lowest - i)
                .collect();
            for targets in [&parked, &positions] {
                tx.execute(
                    "UPDATE seqcast.stream_rows r SET stream_sequence = u.position
                       FROM unnest($1::bigint[], $2::text[], $3::bigint[])
                            AS u(stream_id, message_id, position)
                      WHERE r.stream_id = u.stream_id AND r.message_id = u.message_id",
                    &[&ids, &messages, targets],
                )
                .await
                .map_err(pg_error)?;
            }
        }
        let renumbered = ids.len();
        tx.commit().await.map_err(pg_error)?;
        Ok(RepairReport {
            streams: usize::try_from(streams).unwrap_or(0),
            rows_renumbered: renumbered,
        })
    })
}
