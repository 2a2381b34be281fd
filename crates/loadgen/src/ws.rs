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

/// What `connected` told a new connection.
#[derive(Debug, Clone, Default)]
pub struct Hello {
    /// The latest sequence number when the connection was made.
    pub head: u64,
    /// The store's epoch.
    pub epoch: String,
}

/// What `sub_ack` told a subscriber.
#[derive(Debug, Clone, Default)]
pub struct Ack {
    /// The seam: every message of the key above it arrives live.
    pub head: u64,
    /// The store's epoch.
    pub epoch: String,
    /// For a resume: whether history reached back to `since + 1` (None when not said).
    pub recovered: Option<bool>,
    /// Backlog messages that follow the `sub_ack`.
    pub drained: u64,
    /// The frame as received.
    pub text: String,
}

/// Open a connection and authenticate; returns it once `connected` arrived. `read_buffer`
/// is tungstenite's read buffer per connection (small for idle clients, large for receivers).
pub async fn open(target: &Target, n: usize, read_buffer: usize) -> anyhow::Result<Ws> {
    Ok(open_with(target, n, read_buffer, None).await?.0)
}

/// [`open`], also returning what `connected` said. `recv_buffer` sets the socket's kernel
/// receive buffer (SO_RCVBUF) before connecting: a small one makes a client that stops reading
/// push back on the server within kilobytes.
pub async fn open_with(
    target: &Target,
    n: usize,
    read_buffer: usize,
    recv_buffer: Option<u32>,
) -> anyhow::Result<(Ws, Hello)> {
    let source = source_ip(n, target.source_ips);
    let stream = if source.is_none() && recv_buffer.is_none() {
        TcpStream::connect(target.addr).await
    } else {
        let socket = TcpSocket::new_v4()?;
        if let Some(ip) = source {
            socket
                .bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("cannot bind {ip}"))?;
        }
        if let Some(size) = recv_buffer {
            socket
                .set_recv_buffer_size(size)
                .context("cannot set SO_RCVBUF")?;
        }
        socket.connect(target.addr).await
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
    let text = expect_frame(&mut ws, r#"{"type":"connected""#).await?;
    let v: serde_json::Value = serde_json::from_str(&text).context("`connected` is not JSON")?;
    let hello = Hello {
        head: v["head"].as_u64().unwrap_or(0),
        epoch: v["epoch"].as_str().unwrap_or_default().to_owned(),
    };
    Ok((ws, hello))
}

/// Subscribe to `channel:request_id` (with `since` for a resume) and wait for `sub_ack`.
/// Returns the `sub_ack` text; drained or replayed messages follow it on the connection.
pub async fn subscribe(
    ws: &mut Ws,
    channel: &str,
    request_id: &str,
    since: Option<u64>,
) -> anyhow::Result<String> {
    Ok(subscribe_with(ws, channel, request_id, since, None)
        .await?
        .text)
}

/// The `subscribe` frame, with `since` and `epoch` when given.
pub fn subscribe_frame(
    channel: &str,
    request_id: &str,
    since: Option<u64>,
    epoch: Option<&str>,
) -> String {
    let mut frame =
        format!(r#"{{"type":"subscribe","channel":"{channel}","request_id":"{request_id}""#);
    if let Some(s) = since {
        frame.push_str(&format!(r#","since":{s}"#));
    }
    if let Some(e) = epoch.filter(|e| !e.is_empty()) {
        frame.push_str(&format!(r#","epoch":{}"#, serde_json::Value::from(e)));
    }
    frame.push('}');
    frame
}

/// [`subscribe`] with the `epoch` a resume names, returning what `sub_ack` said.
pub async fn subscribe_with(
    ws: &mut Ws,
    channel: &str,
    request_id: &str,
    since: Option<u64>,
    epoch: Option<&str>,
) -> anyhow::Result<Ack> {
    ws.send(Message::text(subscribe_frame(
        channel, request_id, since, epoch,
    )))
    .await?;
    let text = expect_frame(ws, r#"{"type":"sub_ack""#).await?;
    let v: serde_json::Value = serde_json::from_str(&text).context("`sub_ack` is not JSON")?;
    Ok(Ack {
        head: v["head"].as_u64().unwrap_or(0),
        epoch: v["epoch"].as_str().unwrap_or_default().to_owned(),
        recovered: v["recovered"].as_bool(),
        drained: v["drained"].as_u64().unwrap_or(0),
        text,
    })
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
    fn builds_subscribe_frames() {
        assert_eq!(
            subscribe_frame("c", "r", None, None),
            r#"{"type":"subscribe","channel":"c","request_id":"r"}"#
        );
        assert_eq!(
            subscribe_frame("c", "r", Some(7), Some("e1")),
            r#"{"type":"subscribe","channel":"c","request_id":"r","since":7,"epoch":"e1"}"#
        );
    }

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
