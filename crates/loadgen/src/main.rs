//! `seqcast-loadgen`: run one benchmark scenario against a running seqcast server and print its
//! result as one JSON object on stdout. `cargo xtask bench` starts the server and calls this.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use seqcast_loadgen::scenarios::{
    catchup, connections, fanout, publish, recovery, resume, slowconsumer, sse, store, storm,
    tokens, wspublish,
};
use seqcast_loadgen::{Target, mint_token, mint_token_with};
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
    /// Publish (fan-out scenarios) to this address instead: another node on the same database.
    #[arg(long)]
    publish_addr: Option<SocketAddr>,
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
    /// [`Server::target`] with a token that may publish over the WebSocket.
    fn publisher_target(&self) -> anyhow::Result<Target> {
        Ok(Target {
            token: mint_token_with(&self.jwt_secret, "loadgen-publisher", 24 * 3600, true)?,
            ..self.target()?
        })
    }

    fn target(&self) -> anyhow::Result<Target> {
        Ok(Target {
            addr: self.addr,
            publish_addr: self.publish_addr,
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
        /// Bytes of padding in each message's data.
        #[arg(long, default_value_t = 0)]
        pad_bytes: usize,
    },
    /// N Server-Sent Events streams (`GET /events`) over one key or `--keys` keys, at a fixed
    /// publish rate.
    Sse {
        #[command(flatten)]
        server: Server,
        #[arg(long)]
        subscribers: usize,
        /// Spread the streams over this many distinct keys (stream n follows key n % keys;
        /// message i goes to key i % keys). Must divide `--subscribers`.
        #[arg(long, default_value_t = 1)]
        keys: usize,
        /// Messages per second.
        #[arg(long)]
        rate: f64,
        #[arg(long, default_value_t = 5.0)]
        duration_secs: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup_secs: f64,
        #[arg(long, default_value_t = 8)]
        publishers: usize,
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
    /// Closed-loop publishing over the WebSocket (`publish` → `publish_ack`).
    WsPublish {
        #[command(flatten)]
        server: Server,
        #[arg(long, default_value_t = 64)]
        publishers: usize,
        /// `publish` frames each publisher keeps unanswered.
        #[arg(long, default_value_t = 32)]
        in_flight: usize,
        #[arg(long, default_value_t = 3.0)]
        duration_secs: f64,
        #[arg(long, default_value_t = 0.5)]
        warmup_secs: f64,
    },
    /// Token streams: S sessions (a key and a subscriber each) publishing R small messages a
    /// second through a few streaming publisher connections, on a fixed schedule.
    Tokens {
        #[command(flatten)]
        server: Server,
        #[arg(long, default_value_t = 1000)]
        sessions: usize,
        /// Messages per second per session.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        /// About how many bytes of `data` per message.
        #[arg(long, default_value_t = 60)]
        bytes: usize,
        /// Publisher connections the sessions are spread over.
        #[arg(long, default_value_t = 8)]
        connections: usize,
        /// `ws` (publish frames) or `ndjson` (POST /api/publish/stream).
        #[arg(long, default_value = "ws")]
        transport: String,
        #[arg(long, default_value_t = 5.0)]
        duration_secs: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup_secs: f64,
        #[arg(long, default_value_t = 256)]
        connect_concurrency: usize,
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
    /// One subscriber catches up N messages from the log with `since`, then follows live.
    Catchup {
        #[command(flatten)]
        server: Server,
        /// Messages published before the subscriber arrives.
        #[arg(long, default_value_t = 100_000)]
        messages: usize,
        /// Messages published live after the catch-up (the seam check).
        #[arg(long, default_value_t = 10)]
        live: usize,
        /// Seconds between publishing and subscribing (lets the WAL checkpoint of the burst finish
        /// outside the measured catch-up).
        #[arg(long, default_value_t = 1.0)]
        settle_secs: f64,
        #[arg(long, default_value_t = 60.0)]
        deadline_secs: f64,
    },
    /// K keys miss M messages; one `resume` of all K against K `subscribe` frames with `since`.
    Resume {
        #[command(flatten)]
        server: Server,
        #[arg(long, default_value_t = 500)]
        keys: usize,
        #[arg(long, default_value_t = 10_000)]
        messages: usize,
        #[arg(long, default_value_t = 1.0)]
        settle_secs: f64,
        #[arg(long, default_value_t = 60.0)]
        deadline_secs: f64,
    },
    /// Reconnect storm: C clients drop, M messages are published, all resume at once.
    Storm {
        #[command(flatten)]
        server: Server,
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 2000)]
        missed: usize,
        #[arg(long, default_value_t = 60.0)]
        deadline_secs: f64,
    },
    /// Fixed-rate fan-out with one subscriber that stops reading for a while, against a
    /// baseline without it.
    Slowconsumer {
        #[command(flatten)]
        server: Server,
        #[arg(long, default_value_t = 50)]
        subscribers: usize,
        /// Messages per second.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Length of the run with the staller.
        #[arg(long, default_value_t = 20.0)]
        duration_secs: f64,
        /// Measured length of the baseline run without the staller (0: none).
        #[arg(long, default_value_t = 10.0)]
        baseline_secs: f64,
        /// Warm-up of the baseline run.
        #[arg(long, default_value_t = 1.0)]
        warmup_secs: f64,
        /// When the staller stops reading.
        #[arg(long, default_value_t = 4.0)]
        stall_at_secs: f64,
        /// How long it does not read.
        #[arg(long, default_value_t = 10.0)]
        stall_secs: f64,
        /// Bytes of padding per message, so the stall outgrows the TCP buffers.
        #[arg(long, default_value_t = 1024)]
        pad_bytes: usize,
        /// The staller's socket receive buffer (SO_RCVBUF).
        #[arg(long, default_value_t = 8192)]
        recv_buffer: u32,
        #[arg(long, default_value_t = 8)]
        publishers: usize,
        /// Longest the staller may take to have everything once publishing ended.
        #[arg(long, default_value_t = 30.0)]
        drain_deadline_secs: f64,
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

/// Exit status of a run that completed and printed its result but found problems.
const PROBLEMS_EXIT: i32 = 3;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// A fixed-rate fan-out: `rate` messages a second, one per publish, connected 256 at a time,
/// no padding.
fn paced(
    subscribers: usize,
    rate: f64,
    duration_secs: f64,
    warmup_secs: f64,
    publishers: usize,
) -> fanout::FanoutArgs {
    fanout::FanoutArgs {
        subscribers,
        rate: Some(rate),
        duration: secs(duration_secs),
        warmup: secs(warmup_secs),
        publishers,
        batch: 1,
        window: 512,
        connect_concurrency: 256,
        pad: 0,
        keys: 1,
    }
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
                pad_bytes,
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
                    pad: pad_bytes,
                    keys: 1,
                };
                fanout::run(&server.target()?, &args).await
            }
            Scenario::Sse {
                server,
                subscribers,
                keys,
                rate,
                duration_secs,
                warmup_secs,
                publishers,
                connect_concurrency,
            } => {
                let args = fanout::FanoutArgs {
                    connect_concurrency,
                    keys,
                    ..paced(subscribers, rate, duration_secs, warmup_secs, publishers)
                };
                sse::run(&server.target()?, &args).await
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
            Scenario::WsPublish {
                server,
                publishers,
                in_flight,
                duration_secs,
                warmup_secs,
            } => {
                let args = wspublish::WsPublishArgs {
                    publishers,
                    in_flight,
                    duration: secs(duration_secs),
                    warmup: secs(warmup_secs),
                };
                wspublish::run(&server.publisher_target()?, &args).await
            }
            Scenario::Tokens {
                server,
                sessions,
                rate,
                bytes,
                connections,
                transport,
                duration_secs,
                warmup_secs,
                connect_concurrency,
            } => {
                let args = tokens::TokensArgs {
                    sessions,
                    rate,
                    bytes,
                    connections,
                    transport: transport.parse()?,
                    duration: secs(duration_secs),
                    warmup: secs(warmup_secs),
                    connect_concurrency,
                };
                tokens::run(&server.publisher_target()?, &args).await
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
            Scenario::Catchup {
                server,
                messages,
                live,
                settle_secs,
                deadline_secs,
            } => {
                let args = catchup::CatchupArgs {
                    messages,
                    live,
                    settle: secs(settle_secs),
                    deadline: secs(deadline_secs),
                };
                catchup::run(&server.target()?, &args).await
            }
            Scenario::Resume {
                server,
                keys,
                messages,
                settle_secs,
                deadline_secs,
            } => {
                let args = resume::ResumeArgs {
                    keys,
                    messages,
                    settle: secs(settle_secs),
                    deadline: secs(deadline_secs),
                };
                resume::run(&server.target()?, &args).await
            }
            Scenario::Storm {
                server,
                clients,
                missed,
                deadline_secs,
            } => {
                let args = storm::StormArgs {
                    clients,
                    missed,
                    deadline: secs(deadline_secs),
                };
                storm::run(&server.target()?, &args).await
            }
            Scenario::Slowconsumer {
                server,
                subscribers,
                rate,
                duration_secs,
                baseline_secs,
                warmup_secs,
                stall_at_secs,
                stall_secs,
                pad_bytes,
                recv_buffer,
                publishers,
                drain_deadline_secs,
            } => {
                let args = slowconsumer::SlowArgs {
                    fanout: fanout::FanoutArgs {
                        pad: pad_bytes,
                        ..paced(subscribers, rate, duration_secs, warmup_secs, publishers)
                    },
                    baseline: secs(baseline_secs),
                    stall_at: secs(stall_at_secs),
                    stall: secs(stall_secs),
                    recv_buffer,
                    drain_deadline: secs(drain_deadline_secs),
                };
                slowconsumer::run(&server.target()?, &args).await
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
    // A scenario that ran but found the server breaking a guarantee still prints its result,
    // and fails.
    if let Some(problems) = result["problems"].as_array().filter(|p| !p.is_empty()) {
        eprintln!(
            "seqcast-loadgen: problems: {}",
            serde_json::Value::from(problems.clone())
        );
        std::process::exit(PROBLEMS_EXIT);
    }
    Ok(())
}
