//! seqcast server: the thin shell that composes the core crates. It owns the runtime, the
//! sockets, the signals and the configuration; it computes no sequence numbers itself
//! (the store does, through [`storage::Store::commit`]).
//!
//! Embedding: build [`config::Settings`], bind a listener, and call [`run`] — tests start the
//! same function on `127.0.0.1:0`, or call [`routes::service`] in-process.
//!
//! The modules stack without a cycle (`tests/module_graph.rs` checks it): at the bottom the
//! parts (`config`, `error`, `metrics`, `hub`, `storage`, `pages`, `auth`, `limits`); then
//! [`state::AppState`], made of them; then what serves from the state (`http` and `selection`,
//! `events`, `connection` with `catchup` and `publish`, `upgrade`, `admin`, `observe`); then
//! [`routes`], which names them all; and [`lifetime`] on top, which opens the state and serves
//! the routes.

pub mod admin;
pub mod auth;
pub mod catchup;
pub mod coalesce;
pub mod config;
pub mod connection;
pub mod deadline;
pub mod drive;
pub mod error;
pub mod events;
pub mod http;
pub mod hub;
pub mod lifetime;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod observe;
pub mod openapi;
pub mod pages;
pub mod publish;
pub mod routes;
pub mod selection;
pub mod state;
pub mod storage;
pub mod upgrade;

pub use lifetime::{ServerHandle, bind, run, start, stop_signal};

/// Milliseconds since the Unix epoch: the shell reads the clock and passes it into the core.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
