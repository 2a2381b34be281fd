//! The load generator behind `cargo xtask bench`: drives a running seqcast server the way its
//! users do — real WebSocket subscribers (tokio-tungstenite), HTTP publishers over keep-alive
//! connections — and reports throughput, HDR latency percentiles and its own CPU use as JSON.
//!
//! Boundary: it talks to one server over 127.0.0.0/8 only and never starts one (the xtask
//! does); the `store` scenario alone runs the persistence crate in-process.
//!
//! Invariant: where latency is measured, publishing follows a fixed schedule and latency is
//! taken from the intended send time whenever the server held the publisher up, so a stalled
//! server cannot hide its stall by slowing the load down (no coordinated omission).

pub mod check;
pub mod http;
pub mod probe;
pub mod scenarios;
pub mod stats;
pub mod ws;

use std::net::SocketAddr;

/// Where the server is and how to authenticate, shared by every scenario.
#[derive(Debug, Clone)]
pub struct Target {
    /// The server's HTTP/WebSocket address.
    pub addr: SocketAddr,
    /// Where the fan-out publishers publish, when not `addr` (another node of the same
    /// PostgreSQL deployment: publish on one node, receive on another).
    pub publish_addr: Option<SocketAddr>,
    /// A client JWT (HS256) valid for every key.
    pub token: String,
    /// The publisher API key.
    pub api_key: String,
    /// The server's process id, to read its CPU time and RSS from /proc.
    pub server_pid: Option<u32>,
    /// How many source addresses (127.0.0.2, 127.0.0.3, …) to spread WebSocket clients over;
    /// 0 or 1 lets the kernel pick.
    pub source_ips: usize,
}

/// Mint an HS256 client token valid for `ttl_secs` with claims `sub` and `exp`.
pub fn mint_token(secret: &str, sub: &str, ttl_secs: u64) -> anyhow::Result<String> {
    mint_token_with(secret, sub, ttl_secs, false)
}

/// [`mint_token`], with `publish: true` when `publish` (a token that may publish over the
/// WebSocket).
pub fn mint_token_with(
    secret: &str,
    sub: &str,
    ttl_secs: u64,
    publish: bool,
) -> anyhow::Result<String> {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        exp: u64,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        publish: bool,
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let claims = Claims {
        sub,
        exp: now + ttl_secs,
        publish,
    };
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &key,
    )?)
}
