//! Follows one subscription key and prints its events as they arrive, reconnecting on its own.
//!
//! ```text
//! cargo run -p seqcast-client --example follow -- \
//!     --url ws://127.0.0.1:8080/ws --token T --channel search --request-id r1
//! ```
//!
//! `--since N` resumes after sequence number N (a position a service kept across its own
//! restart); `--count N` exits after N messages (for scripts; the default follows forever).

use clap::Parser;
use futures_util::StreamExt;
use seqcast_client::{Client, ConnectionState, Event, GapReason, Resume, fixed_token};

#[derive(Debug, Parser)]
#[command(about = "Follow one seqcast subscription key and print its messages")]
struct Args {
    /// The server's WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// A client JWT (`seqcast token --sub me` prints one).
    #[arg(long, env = "SEQCAST_TOKEN")]
    token: String,
    /// The channel to follow.
    #[arg(long)]
    channel: String,
    /// The request id to follow.
    #[arg(long)]
    request_id: String,
    /// Resume after this sequence number instead of starting with the key's recent backlog.
    #[arg(long)]
    since: Option<u64>,
    /// Exit after this many messages (default: follow until Ctrl-C).
    #[arg(long)]
    count: Option<u64>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = Client::connect(&args.url, fixed_token(args.token)).await?;
    let mut states = client.watch_state();
    // Prints connection changes; ends with the client (the last sender is gone).
    tokio::spawn(async move {
        while states.changed().await.is_ok() {
            match &*states.borrow_and_update() {
                ConnectionState::Connected(info) => eprintln!(
                    "connected: connection {} (client_id {}, head {})",
                    info.connection_sequence, info.client_id, info.head
                ),
                ConnectionState::Reconnecting { delay, reason, .. } => {
                    eprintln!("disconnected ({reason}); retrying in {delay:?}")
                }
                _ => {}
            }
        }
    });
    let mut events = match args.since {
        Some(since) => {
            let resume = Resume { since, epoch: None };
            client
                .subscribe_from(&args.channel, &args.request_id, resume)
                .await?
        }
        None => client.subscribe(&args.channel, &args.request_id).await?,
    };
    let mut printed = 0;
    while args.count.is_none_or(|n| printed < n) {
        tokio::select! {
            event = events.next() => match event {
                Some(Event::Message(m)) => {
                    println!(
                        "#{} [{}:{} stream #{}] {}",
                        m.sequence_number, m.channel, m.request_id, m.stream_sequence, m.data_json()
                    );
                    printed += 1;
                }
                Some(Event::Subscribed(s)) => match s.since {
                    Some(since) => eprintln!(
                        "subscribed to {}: resuming after #{since}{} (head #{})",
                        s.key,
                        match s.recovered {
                            Some(false) => ", history incomplete",
                            _ => "",
                        },
                        s.head
                    ),
                    None => {
                        eprintln!(
                            "subscribed to {}: {} backlog message(s) follow, then live (head #{})",
                            s.key, s.drained, s.head
                        );
                        if s.expired > 0 {
                            eprintln!(
                                "  {} older message(s) of {} are not in the backlog (older than the server's backlog TTL, 2 minutes by default); --since 0 replays what the recovery window still holds",
                                s.expired, s.key
                            );
                        }
                        if s.overflow > 0 {
                            eprintln!(
                                "  {} more of {} are not in the backlog (the server drains only the newest of a key)",
                                s.overflow, s.key
                            );
                        }
                    }
                },
                Some(Event::Gap(g)) => eprintln!(
                    "GAP on {}: messages after {} are lost ({}){}",
                    g.key,
                    g.since.map_or_else(|| "the start".to_owned(), |n| format!("#{n}")),
                    match g.reason {
                        GapReason::Window => "outside the server's recovery window",
                        GapReason::EpochChanged => "the server's store was replaced: numbers restarted",
                        _ => "the server could not replay them",
                    },
                    g.oldest_sequence
                        .map(|n| format!("; its history starts at #{n}"))
                        .unwrap_or_default()
                ),
                Some(Event::Refused(r)) => {
                    eprintln!("REFUSED {}: {} ({})", r.key, r.message, r.code);
                    break;
                }
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    client.close().await;
    Ok(())
}
