//! Private PostgreSQL clusters for fault tests: started from the installed binaries
//! (`initdb`, `pg_ctl`, `pg_basebackup` in `pg_config --bindir`) in a temporary directory on a
//! free port, run as user `postgres` when the test runs as root. A primary, and streaming
//! standbys made with `pg_basebackup -R` (synchronous when the primary names them in
//! `synchronous_standby_names`). Every cluster is stopped (`pg_ctl stop -m immediate`) when its
//! value is dropped, also when the test panics.
//!
//! Without the binaries, [`PgCluster::primary`] says so loudly on stderr and gives `None` (the
//! test passes), except under `CI=true`, where it fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One PostgreSQL cluster (a primary or a standby) of a test.
#[derive(Debug)]
pub struct PgCluster {
    bindir: PathBuf,
    /// The temporary directory that holds every cluster of the test (shared with standbys).
    root: Arc<tempfile::TempDir>,
    data: PathBuf,
    name: String,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    as_postgres: bool,
}

fn skip_or_fail(why: &str) -> Option<PathBuf> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(
        !ci,
        "PostgreSQL fault tests cannot run under CI=true: {why}"
    );
    eprintln!("\n!!!! SKIPPED: PostgreSQL fault test — {why}\n");
    None
}

/// The directory of the installed PostgreSQL binaries, or None (said loudly; a failure under
/// `CI=true`).
pub fn pg_bindir() -> Option<PathBuf> {
    let bindir = match std::env::var("SEQCAST_TEST_PG_BINDIR") {
        Ok(d) => PathBuf::from(d),
        Err(_) => match Command::new("pg_config").arg("--bindir").output() {
            Ok(o) if o.status.success() => {
                PathBuf::from(String::from_utf8_lossy(&o.stdout).trim().to_owned())
            }
            Ok(o) => {
                return skip_or_fail(&format!(
                    "pg_config --bindir failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
            Err(e) => return skip_or_fail(&format!("no pg_config on PATH: {e}")),
        },
    };
    for tool in ["initdb", "pg_ctl", "pg_basebackup"] {
        if !bindir.join(tool).exists() {
            return skip_or_fail(&format!("no {tool} in {}", bindir.display()));
        }
    }
    Some(bindir)
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl PgCluster {
    /// A fresh primary (trust authentication for `postgres`, replication allowed from
    /// 127.0.0.1), started; None without the binaries (see the module docs).
    pub fn primary() -> Option<PgCluster> {
        let bindir = pg_bindir()?;
        let root = Arc::new(
            tempfile::Builder::new()
                .prefix("seqcast-pg-")
                .tempdir_in("/tmp")
                .unwrap(),
        );
        let as_postgres = running_as_root();
        if as_postgres {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(root.path())
                .status()
                .unwrap();
            assert!(status.success(), "cannot chown the cluster directory");
        }
        let cluster = PgCluster {
            bindir,
            data: root.path().join("primary"),
            root,
            name: "primary".to_owned(),
            port: free_port(),
            as_postgres,
        };
        cluster.run_ok(
            "initdb",
            &[
                "-D",
                &cluster.data_str(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-N",
            ],
        );
        cluster.append_conf(
            "wal_level = replica\nmax_wal_senders = 10\nfsync = off\nsynchronous_commit = on\n\
             wal_sender_timeout = 5s\nwal_receiver_status_interval = 1s\nmax_connections = 200\n",
        );
        cluster.start();
        Some(cluster)
    }

    /// A streaming standby of this primary (`pg_basebackup -R`), named `name` (its
    /// `cluster_name`, hence its `application_name` on the primary), started.
    pub fn standby(&self, name: &str) -> PgCluster {
        let standby = PgCluster {
            bindir: self.bindir.clone(),
            root: Arc::clone(&self.root),
            data: self.root.path().join(name),
            name: name.to_owned(),
            port: free_port(),
            as_postgres: self.as_postgres,
        };
        standby.run_ok(
            "pg_basebackup",
            &[
                "-D",
                &standby.data_str(),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ],
        );
        standby.append_conf(&format!("cluster_name = '{name}'\n"));
        standby.start();
        standby
    }

    /// Sets `synchronous_standby_names` on this primary (`''` makes commits asynchronous) and
    /// reloads.
    pub fn set_synchronous_standby_names(&self, names: &str) {
        self.sql(&format!(
            "ALTER SYSTEM SET synchronous_standby_names = '{names}'"
        ));
        self.sql("SELECT pg_reload_conf()");
    }

    /// Runs SQL with psql on database `postgres`; panics on failure; returns its output
    /// (tuples only, unaligned).
    pub fn sql(&self, sql: &str) -> String {
        let out = self.run(
            "psql",
            &[
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                sql,
            ],
        );
        assert!(
            out.status.success(),
            "psql on {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Creates database `name` and gives its URL (dropped with the cluster).
    pub fn create_database(&self, name: &str) -> String {
        self.sql(&format!("CREATE DATABASE {name}"));
        self.url(name)
    }

    /// `postgres://postgres@127.0.0.1:port/db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `pg_ctl start -w` (same port and settings).
    pub fn start(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.root.path().display()
        );
        let log = self.root.path().join(format!("{}.log", self.name));
        self.run_ok(
            "pg_ctl",
            &[
                "-D",
                &self.data_str(),
                "-o",
                &opts,
                "-l",
                &log.display().to_string(),
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
    }

    /// `pg_ctl stop -m fast -w`.
    pub fn stop(&self) {
        self.run_ok(
            "pg_ctl",
            &["-D", &self.data_str(), "-m", "fast", "-w", "stop"],
        );
    }

    /// `pg_ctl restart -m fast -w`.
    pub fn restart(&self) {
        self.stop();
        self.start();
    }

    /// `pg_ctl promote -w`: this standby becomes a primary on a new timeline.
    pub fn promote(&self) {
        self.run_ok("pg_ctl", &["-D", &self.data_str(), "-w", "promote"]);
    }

    /// Fails this primary over to `standby` (its synchronous standby), as an operator must to
    /// lose no acknowledged commit: this primary stops (`-m fast`) with
    /// `synchronous_standby_names` unchanged, then the standby is promoted.
    ///
    /// Clearing `synchronous_standby_names` first (or any other way of making this primary
    /// asynchronous before it is gone) would be wrong: PostgreSQL then releases every COMMIT
    /// waiting for the standby as a success, and if the standby is not streaming at that
    /// moment (it reconnects only every `wal_retrieve_retry_interval`, 5 s, after a restart of
    /// the primary) those commits are acknowledged and missing from the promoted standby. With
    /// the names kept, a waiting COMMIT ends with the session (never reported committed), and a
    /// connected standby receives all WAL before the primary's shutdown completes.
    ///
    /// Returns the standby's replication state just before (`streaming/sync`, or `not
    /// connected`), for the test's fault log.
    pub fn fail_over_to(&self, standby: &PgCluster) -> String {
        let state = self.sql(&format!(
            "SELECT state || '/' || sync_state FROM pg_stat_replication WHERE application_name = '{}'",
            standby.name
        ));
        self.stop();
        standby.promote();
        if state.is_empty() {
            "not connected".to_owned()
        } else {
            state
        }
    }

    /// Waits until the primary reports `name` as a streaming synchronous standby.
    pub fn wait_for_sync_standby(&self, name: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let state = self.sql(&format!(
                "SELECT state || '/' || sync_state FROM pg_stat_replication WHERE application_name = '{name}'"
            ));
            if state == "streaming/sync" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "standby {name} is not a streaming synchronous standby (state: {state:?})"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The lines of the server log about replication, restarts, promotion and warnings (for
    /// failure messages: when the synchronous standby was connected, when commits stopped
    /// waiting for it).
    pub fn replication_log(&self) -> String {
        const NOTABLE: [&str; 13] = [
            "synchronous",
            "WARNING",
            "DETAIL:  The transaction",
            "shutdown request",
            "ready to accept",
            "promote",
            "redo done",
            "last completed transaction",
            "started streaming",
            "replication terminated",
            "could not connect to the primary",
            "End of WAL",
            "new timeline",
        ];
        self.log()
            .lines()
            .filter(|l| NOTABLE.iter().any(|n| l.contains(n)))
            .map(|l| format!("{}: {l}\n", self.name))
            .collect()
    }

    /// The server log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join(format!("{}.log", self.name)))
            .unwrap_or_default()
    }

    fn data_str(&self) -> String {
        self.data.display().to_string()
    }

    fn append_conf(&self, lines: &str) {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))
            .unwrap();
        f.write_all(lines.as_bytes()).unwrap();
    }

    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let bin = self.bindir.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        cmd.args(args)
            .current_dir(self.root.path())
            .env_remove("PGDATA")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()))
    }

    fn run_ok(&self, tool: &str, args: &[&str]) {
        let out = self.run(tool, args);
        assert!(
            out.status.success(),
            "{tool} {args:?} failed on {}: {}{}\nserver log:\n{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// The directory of this cluster's data.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.data.join("postmaster.pid").exists() {
            let _ = self.run(
                "pg_ctl",
                &["-D", &self.data_str(), "-m", "immediate", "-w", "stop"],
            );
        }
    }
}
