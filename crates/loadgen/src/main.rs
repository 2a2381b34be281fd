//! `seqcast-loadgen`: run one benchmark scenario against a running seqcast server and print its
//! result as one JSON object on stdout. `cargo xtask bench` starts the server and calls this.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use seqcast_loadgen::scenarios::{connections, fanout, publish, recovery, store};
use seqcast_loadgen::{Target, mint_token};
use seqcast_persistence::Synchronous;

#[derive(Debug, Parser)]
#[command(
    name = "seqcast-loadgen",
    about = "Load generator for seqcast benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Args)]
struct Server {
    /// The server's address (127.0.0.1:PORT).
    #[arg(long)]
    addr: SocketAddr,
    /// The server's JWT secret (tokens are minted from it).
    #[arg(long)]
    jwt_secret: String,
    /// The server's publisher API key.
    #[arg(long)]
    api_key: String,
    /// The server's pid, to report its CPU and memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Spread WebSocket clients over this many source addresses (127.0.0.2, …).
    #[arg(long, default_value_t = 1)]
    source_ips: usize,
}

impl Server {
    fn target(&self) -> anyhow::Result<Target> {
        Ok(Target {
            addr: self.addr,
            token: mint_token(&self.jwt_secret, "loadgen", 24 * 3600)?,
            api_key: self.api_key.clone(),
            server_pid: self.server_pid,
            source_ips: self.source_ips,
        })
    }
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// One key, N subscribers: fixed-rate latency or burst throughput.
    Fanout {
        #[command(flatten)]
        server: Server,
        #[arg(long)]
        subscribers: usize,
        /// Messages per second; absent = burst.
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, default_value_t = 5.0)]
        duration_secs: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup_secs: f64,
        #[arg(long, default_value_t = 8)]
        publishers: usize,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        #[arg(long, default_value_t = 512)]
        window: usize,
        #[arg(long, default_value_t = 256)]
        connect_concurrency: usize,
    },
    /// Closed-loop HTTP publishing.
    Publish {
        #[command(flatten)]
        server: Server,
        #[arg(long)]
        publishers: usize,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 3.0)]
        duration_secs: f64,
        #[arg(long, default_value_t = 0.5)]
        warmup_secs: f64,
    },
    /// `since` answers and a reconnect storm.
    Recovery {
        #[command(flatten)]
        server: Server,
        /// Missed-message counts, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        missed: Vec<usize>,
        #[arg(long, default_value_t = 50)]
        repeats: usize,
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 100)]
        storm_missed: usize,
    },
    /// Idle connections: accept time and server RSS per connection.
    Connections {
        #[command(flatten)]
        server: Server,
        #[arg(long)]
        connections: usize,
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
    },
    /// The persistence layer in-process: group commit against one transaction per message.
    Store {
        /// Directory for the database.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        publishers: usize,
        /// `true` (group commit) or `false` (one transaction per message).
        #[arg(long, action = clap::ArgAction::Set, default_value_t = true)]
        group_commit: bool,
        /// `full` or `normal`.
        #[arg(long, default_value = "full")]
        synchronous: String,
        #[arg(long, default_value_t = 3.0)]
        duration_secs: f64,
    },
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // One worker per core we may run on: `taskset` gives the load generator its own core.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rt = if cores == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cores)
            .enable_all()
            .build()?
    };
    let result = rt.block_on(async move {
        match cli.scenario {
            Scenario::Fanout {
                server,
                subscribers,
                rate,
                duration_secs,
                warmup_secs,
                publishers,
                batch,
                window,
                connect_concurrency,
            } => {
                let args = fanout::FanoutArgs {
                    subscribers,
                    rate,
                    duration: secs(duration_secs),
                    warmup: secs(warmup_secs),
                    publishers,
                    batch,
                    window,
                    connect_concurrency,
                };
                fanout::run(&server.target()?, &args).await
            }
            Scenario::Publish {
                server,
                publishers,
                batch,
                duration_secs,
                warmup_secs,
            } => {
                let args = publish::PublishArgs {
                    publishers,
                    batch,
                    duration: secs(duration_secs),
                    warmup: secs(warmup_secs),
                };
                publish::run(&server.target()?, &args).await
            }
            Scenario::Recovery {
                server,
                missed,
                repeats,
                clients,
                storm_missed,
            } => {
                let args = recovery::RecoveryArgs {
                    missed,
                    repeats,
                    clients,
                    storm_missed,
                };
                recovery::run(&server.target()?, &args).await
            }
            Scenario::Connections {
                server,
                connections,
                concurrency,
            } => {
                connections::run(
                    &server.target()?,
                    &connections::ConnectionsArgs {
                        connections,
                        concurrency,
                    },
                )
                .await
            }
            Scenario::Store {
                dir,
                publishers,
                group_commit,
                synchronous,
                duration_secs,
            } => {
                let synchronous: Synchronous = synchronous.parse().context("--synchronous")?;
                let args = store::StoreArgs {
                    dir,
                    publishers,
                    group_commit,
                    synchronous,
                    duration: secs(duration_secs),
                };
                store::run(&args).await
            }
        }
    })?;
    let mut result = result;
    result["loadgen_cores_available"] = cores.into();
    println!("{result}");
    Ok(())
}
