//! The fault harness itself, against real PostgreSQL: private clusters (primary, synchronous
//! standby, promotion) and the fault proxy (latency, black hole, reset, switching upstream).
//! Without the PostgreSQL binaries these tests say so loudly and pass, except under `CI=true`.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use seqcast_e2e::fault_proxy::FaultProxy;
use seqcast_e2e::pg_cluster::PgCluster;
use tokio_postgres::NoTls;

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) =
        tokio::time::timeout(Duration::from_secs(5), tokio_postgres::connect(url, NoTls))
            .await
            .expect("connect timed out")
            .unwrap();
    tokio::spawn(connection);
    client
}

async fn one(client: &tokio_postgres::Client) -> Result<i32, tokio_postgres::Error> {
    client.query_one("SELECT 1", &[]).await.map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_passes_delays_black_holes_resets_and_switches_a_real_connection() {
    let Some(primary) = PgCluster::primary() else {
        return;
    };
    let proxy = FaultProxy::start(primary.addr()).await;
    let client = connect(&proxy.url("postgres")).await;
    assert_eq!(one(&client).await.unwrap(), 1);

    // Latency: a round trip takes at least twice the added delay.
    proxy.set_latency(Duration::from_millis(150));
    let t = Instant::now();
    one(&client).await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    proxy.set_latency(Duration::ZERO);

    // Black hole: the query never answers and the connection is not closed either.
    proxy.black_hole();
    let hung = tokio::time::timeout(Duration::from_secs(2), one(&client)).await;
    assert!(hung.is_err(), "a black-holed query answered: {hung:?}");
    assert!(
        !client.is_closed(),
        "a black hole must not close the connection"
    );
    // New connections hang too (the TCP connect succeeds, the startup gets no answer).
    let new = tokio::time::timeout(
        Duration::from_secs(2),
        tokio_postgres::connect(&proxy.url("postgres"), NoTls),
    )
    .await;
    assert!(
        new.is_err(),
        "a connection through the black hole was answered"
    );
    // Healed: new connections work; the black-holed one stays dead.
    proxy.heal();
    let fresh = connect(&proxy.url("postgres")).await;
    assert_eq!(one(&fresh).await.unwrap(), 1);
    assert!(
        tokio::time::timeout(Duration::from_secs(1), one(&client))
            .await
            .is_err()
    );

    // Reset: the open connection fails at once.
    let t = Instant::now();
    proxy.reset_all();
    let err = tokio::time::timeout(Duration::from_secs(2), one(&fresh))
        .await
        .expect("a reset connection must fail promptly, not hang");
    assert!(err.is_err());
    assert!(t.elapsed() < Duration::from_secs(2));

    // Switch upstream: new connections reach the other server.
    let standby = primary.standby("s1");
    proxy.set_upstream(standby.addr());
    let on_standby = connect(&proxy.url("postgres")).await;
    let in_recovery: bool = on_standby
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(in_recovery, "the switched proxy did not reach the standby");
}

/// A primary with a streaming synchronous standby `s1`, and a client of the primary that made
/// table `t` with one row (1); None without the PostgreSQL binaries.
async fn synchronous_pair_with_one_row() -> Option<(PgCluster, PgCluster, tokio_postgres::Client)> {
    let primary = PgCluster::primary()?;
    let standby = primary.standby("s1");
    primary.set_synchronous_standby_names("s1");
    primary.wait_for_sync_standby("s1", Duration::from_secs(20));
    let client = connect(&primary.url("postgres")).await;
    client
        .batch_execute("CREATE TABLE t (n int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    Some((primary, standby, client))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_standby_holds_commits_until_it_confirms_and_can_be_promoted() {
    let Some((primary, standby, client)) = synchronous_pair_with_one_row().await else {
        return;
    };

    // The standby is gone: a commit waits (for ever, by PostgreSQL's default).
    standby.stop();
    let insert = tokio::spawn(async move {
        client
            .batch_execute("INSERT INTO t VALUES (2)")
            .await
            .unwrap();
        client
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !insert.is_finished(),
        "a commit returned without the standby"
    );
    // It comes back: the commit completes.
    standby.start();
    let client = tokio::time::timeout(Duration::from_secs(20), insert)
        .await
        .expect("the commit did not complete once the standby was back")
        .unwrap();
    drop(client);

    // Promotion: the standby takes writes on a new timeline, with both rows.
    assert_eq!(primary.fail_over_to(&standby), "streaming/sync");
    let promoted = connect(&standby.url("postgres")).await;
    let rows: i64 = promoted
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 2);
    promoted
        .batch_execute("INSERT INTO t VALUES (3)")
        .await
        .unwrap();
    let timeline: String = promoted
        .query_one(
            "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(
        timeline, "00000001",
        "promotion must move to a new timeline"
    );
}

/// The failover of the fault tests loses no commit PostgreSQL reported: with the synchronous
/// standby cut off (as it is for a few seconds after a restart of the primary), a COMMIT waits;
/// failing over then must not report it committed, since the promoted standby lacks it.
/// (Clearing `synchronous_standby_names` before stopping the primary released that COMMIT as a
/// success: the nemesis run's "acknowledged … is not in the log" after a failover.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_reports_no_commit_the_cut_off_synchronous_standby_lacks() {
    let Some((primary, standby, client)) = synchronous_pair_with_one_row().await else {
        return;
    };

    // The standby is cut off: it streams from a port nobody listens on.
    let nowhere = seqcast_e2e::pg_cluster::free_port();
    standby.sql(&format!(
        "ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port={nowhere} user=postgres'"
    ));
    standby.sql("SELECT pg_reload_conf()");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !primary
        .sql("SELECT count(*) FROM pg_stat_replication")
        .eq("0")
    {
        assert!(Instant::now() < deadline, "the standby stays connected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let insert =
        tokio::spawn(async move { client.batch_execute("INSERT INTO t VALUES (2)").await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !insert.is_finished(),
        "a commit returned without the synchronous standby"
    );

    assert_eq!(primary.fail_over_to(&standby), "not connected");
    let outcome = tokio::time::timeout(Duration::from_secs(20), insert)
        .await
        .expect("the waiting commit did not end with the failover")
        .unwrap();
    let promoted = connect(&standby.url("postgres")).await;
    let rows: Vec<i32> = promoted
        .query("SELECT n FROM t ORDER BY n", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(rows.contains(&1), "a confirmed commit is lost: {rows:?}");
    assert!(
        outcome.is_err() || rows.contains(&2),
        "a commit was reported (Ok) and the promoted standby lacks it: {rows:?}\n{}{}",
        primary.replication_log(),
        standby.replication_log()
    );
}
