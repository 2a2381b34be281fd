//! The benchmark scenarios. Each returns one JSON object: its parameters, its results, and the
//! CPU the load generator and the server used while it ran.

pub mod connections;
pub mod fanout;
pub mod publish;
pub mod recovery;
pub mod store;

use std::time::{Duration, Instant};

/// Sleep until `deadline` measured from `start`.
pub(crate) async fn sleep_until(start: Instant, at: Duration) {
    tokio::time::sleep_until((start + at).into()).await;
}

/// A run-unique suffix for keys, so repeated runs against one server never share a stream.
pub(crate) fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}", nanos & 0xffff_ffff_ffff)
}
