//! A minimal HTTP/1.1 keep-alive client: one request at a time per connection, bodies framed by
//! `Content-Length`. A general client costs more CPU per request than the server spends
//! answering it; this one lets one load-generator core keep a server core busy.

use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response: status and body.
#[derive(Debug)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// The body bytes.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text (lossy), for error messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One keep-alive connection.
#[derive(Debug)]
pub struct HttpConn {
    stream: TcpStream,
    host: String,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl HttpConn {
    /// Connect to `addr`.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            stream,
            host: addr.to_string(),
            buf: Vec::with_capacity(16 * 1024),
            out: Vec::with_capacity(4 * 1024),
        })
    }

    /// `POST path` with a JSON body and an `Authorization` header.
    pub async fn post_json(
        &mut self,
        path: &str,
        authorization: &str,
        body: &[u8],
    ) -> anyhow::Result<Response> {
        self.request("POST", path, authorization, Some(body)).await
    }

    /// `GET path` with an `Authorization` header.
    pub async fn get(&mut self, path: &str, authorization: &str) -> anyhow::Result<Response> {
        self.request("GET", path, authorization, None).await
    }

    async fn request(
        &mut self,
        method: &str,
        path: &str,
        authorization: &str,
        body: Option<&[u8]>,
    ) -> anyhow::Result<Response> {
        self.out.clear();
        self.out.extend_from_slice(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: {authorization}\r\n",
                self.host
            )
            .as_bytes(),
        );
        if let Some(b) = body {
            self.out.extend_from_slice(
                format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    b.len()
                )
                .as_bytes(),
            );
            self.out.extend_from_slice(b);
        } else {
            self.out.extend_from_slice(b"\r\n");
        }
        self.stream
            .write_all(&self.out)
            .await
            .context("cannot send the request")?;
        loop {
            if let Some(head) = parse_head(&self.buf)? {
                let total = head.head_len + head.content_length;
                while self.buf.len() < total {
                    self.fill().await?;
                }
                let body = self.buf[head.head_len..total].to_vec();
                self.buf.drain(..total);
                return Ok(Response {
                    status: head.status,
                    body,
                });
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self
            .stream
            .read(&mut chunk)
            .await
            .context("cannot read the response")?;
        if n == 0 {
            bail!("the server closed the connection");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// A parsed response head.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    /// Status code.
    pub status: u16,
    /// Body length.
    pub content_length: usize,
    /// Bytes up to and including the blank line.
    pub head_len: usize,
}

/// The head of the response at the start of `buf`, None while it is incomplete.
pub fn parse_head(buf: &[u8]) -> anyhow::Result<Option<Head>> {
    parse_head_with(buf, false)
}

/// [`parse_head`] for a response whose body may be chunked (a stream the caller decodes
/// itself; `content_length` is 0 then).
pub fn parse_head_of_stream(buf: &[u8]) -> anyhow::Result<Option<Head>> {
    parse_head_with(buf, true)
}

fn parse_head_with(buf: &[u8], chunked_ok: bool) -> anyhow::Result<Option<Head>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut content_length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .trim()
                    .parse::<usize>()
                    .context("bad Content-Length")?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") && !chunked_ok {
            bail!("chunked responses are not supported by the load generator");
        }
    }
    Ok(Some(Head {
        status,
        content_length: content_length.unwrap_or(0),
        head_len: end + 4,
    }))
}

/// A chunked body undone as its bytes arrive (chunk extensions and the trailer ignored).
#[derive(Debug, Default)]
pub struct Dechunker {
    /// Bytes of the current chunk still to come.
    chunk_left: usize,
    /// The CRLF that ends a chunk's data is still to come.
    crlf_left: bool,
    /// The last chunk arrived.
    pub ended: bool,
}

impl Dechunker {
    /// Append the data of what `raw` holds of the body to `body`; returns how many bytes of
    /// `raw` it used (the rest waits for more).
    pub fn decode(&mut self, raw: &[u8], body: &mut Vec<u8>) -> anyhow::Result<usize> {
        let mut at = 0;
        while !self.ended {
            if self.crlf_left {
                if raw.len() - at < 2 {
                    break;
                }
                at += 2;
                self.crlf_left = false;
            }
            if self.chunk_left > 0 {
                let n = self.chunk_left.min(raw.len() - at);
                body.extend_from_slice(&raw[at..at + n]);
                at += n;
                self.chunk_left -= n;
                if self.chunk_left > 0 {
                    break;
                }
                self.crlf_left = true;
                continue;
            }
            let Some(end) = raw[at..].windows(2).position(|w| w == b"\r\n") else {
                break;
            };
            let size_text = std::str::from_utf8(&raw[at..at + end])?;
            let size_text = size_text.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16)
                .with_context(|| format!("bad chunk size {size_text:?}"))?;
            at += end + 2;
            if size == 0 {
                self.ended = true;
            }
            self.chunk_left = size;
        }
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_a_complete_head_and_waits_for_an_incomplete_one() {
        let r =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(
            parse_head(r).unwrap(),
            Some(Head {
                status: 200,
                content_length: 5,
                head_len: r.len() - 5
            })
        );
        assert_eq!(parse_head(&r[..20]).unwrap(), None);
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        assert!(parse_head(b"nonsense\r\n\r\n").is_err());
    }
}
