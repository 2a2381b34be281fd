//! WebSocket clients: TCP connect (optionally from a chosen 127.x source address), the
//! upgrade, `hello` → `connected`, and `subscribe` → `sub_ack`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context as _, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::Target;

/// A client connection.
pub type Ws = WebSocketStream<TcpStream>;

/// The source address of client `n` when clients are spread over `spread` addresses:
/// 127.0.0.2, 127.0.0.3, … (None: let the kernel choose).
pub fn source_ip(n: usize, spread: usize) -> Option<IpAddr> {
    if spread <= 1 {
        return None;
    }
    let k = (n % spread.min(250)) as u8;
    Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + k)))
}

/// Open a connection and authenticate; returns it once `connected` arrived. `read_buffer`
/// is tungstenite's read buffer per connection (small for idle clients, large for receivers).
pub async fn open(target: &Target, n: usize, read_buffer: usize) -> anyhow::Result<Ws> {
    let stream = match source_ip(n, target.source_ips) {
        None => TcpStream::connect(target.addr).await,
        Some(ip) => {
            let socket = TcpSocket::new_v4()?;
            socket
                .bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("cannot bind {ip}"))?;
            socket.connect(target.addr).await
        }
    }
    .with_context(|| format!("cannot connect to {}", target.addr))?;
    stream.set_nodelay(true)?;
    let config = WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0);
    let url = format!("ws://{}/ws", target.addr);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
        .await
        .context("WebSocket upgrade failed")?;
    let hello = format!(r#"{{"type":"hello","token":"{}"}}"#, target.token);
    ws.send(Message::text(hello)).await?;
    expect_frame(&mut ws, r#"{"type":"connected""#).await?;
    Ok(ws)
}

/// Subscribe to `channel:request_id` (with `since` for a resume) and wait for `sub_ack`.
/// Returns the `sub_ack` text; drained or replayed messages follow it on the connection.
pub async fn subscribe(
    ws: &mut Ws,
    channel: &str,
    request_id: &str,
    since: Option<u64>,
) -> anyhow::Result<String> {
    let frame = match since {
        Some(s) => format!(
            r#"{{"type":"subscribe","channel":"{channel}","request_id":"{request_id}","since":{s}}}"#
        ),
        None => {
            format!(r#"{{"type":"subscribe","channel":"{channel}","request_id":"{request_id}"}}"#)
        }
    };
    ws.send(Message::text(frame)).await?;
    expect_frame(ws, r#"{"type":"sub_ack""#).await
}

/// Read until a text frame starting with `prefix`; an `error` frame or a close is an error.
async fn expect_frame(ws: &mut Ws, prefix: &str) -> anyhow::Result<String> {
    while let Some(msg) = ws.next().await {
        match msg.context("connection failed")? {
            Message::Text(t) if t.as_str().starts_with(prefix) => return Ok(t.as_str().to_owned()),
            Message::Text(t) if t.as_str().starts_with(r#"{"type":"error""#) => {
                bail!("server error: {}", t.as_str())
            }
            Message::Close(c) => bail!("server closed the connection: {c:?}"),
            _ => {}
        }
    }
    bail!("connection ended while waiting for {prefix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_clients_over_loopback_addresses() {
        assert_eq!(source_ip(5, 1), None);
        assert_eq!(
            source_ip(0, 4),
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))
        );
        assert_eq!(
            source_ip(5, 4),
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)))
        );
    }
}
