//! Where the client gets its JWT: asked again before every (re)connect, which is how a
//! long-lived client keeps presenting a token that has not expired.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::error::BoxError;

/// Hands out a JWT for the next connection attempt.
///
/// Implemented for every `Fn() -> impl Future<Output = Result<String, E>>`, so an async
/// closure is a provider:
///
/// ```
/// # use seqcast_client::TokenProvider;
/// fn assert_provider(_: impl TokenProvider) {}
/// assert_provider(|| async { Ok::<_, std::io::Error>("my.jwt.token".to_owned()) });
/// ```
///
/// [`fixed_token`] wraps a token that never changes.
pub trait TokenProvider: Send + Sync + 'static {
    /// A token for the connection about to be opened. An error fails that attempt; the client
    /// backs off and asks again.
    fn token(&self) -> BoxFuture<'static, Result<String, BoxError>>;
}

impl<F, Fut, E> TokenProvider for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, E>> + Send + 'static,
    E: Into<BoxError>,
{
    fn token(&self) -> BoxFuture<'static, Result<String, BoxError>> {
        let fut = self();
        Box::pin(async move { fut.await.map_err(Into::into) })
    }
}

/// A provider that always returns `token` (for tokens that outlive the client, and examples).
pub fn fixed_token(token: impl Into<String>) -> impl TokenProvider {
    let token: Arc<str> = Arc::from(token.into());
    move || {
        let token = Arc::clone(&token);
        async move { Ok::<_, std::convert::Infallible>(token.to_string()) }
    }
}

/// The provider as the connection task holds it.
#[derive(Clone)]
pub(crate) struct SharedTokens(pub(crate) Arc<dyn TokenProvider>);

impl fmt::Debug for SharedTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenProvider")
    }
}

/// The `exp` claim of a JWT (seconds since the Unix epoch), read without verifying anything:
/// the server verifies; the client only needs to know when to bring the next token. `None` for
/// anything that is not a JWT with a numeric `exp`.
pub(crate) fn jwt_exp(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64url_decode(payload)?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = &claims["exp"];
    exp.as_u64().or_else(|| {
        exp.as_f64()
            .filter(|e| e.is_finite() && *e >= 0.0)
            .map(|e| e as u64)
    })
}

/// Unpadded (or padded) base64url, as JWTs use it.
fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// How long before `exp` the client asks for the next token and sends it in an `auth` frame:
/// a third of the time left, at most a minute — so a token that lives for hours is replaced a
/// minute early, and one that lives for seconds still is, with time for a slow provider.
pub(crate) fn refresh_delay(exp: u64, now: std::time::SystemTime) -> std::time::Duration {
    let left = time_left(exp, now);
    left - (left / 3).min(std::time::Duration::from_secs(60))
}

/// The time until `exp` (zero once past it).
fn time_left(exp: u64, now: std::time::SystemTime) -> std::time::Duration {
    use std::time::{Duration, UNIX_EPOCH};
    (UNIX_EPOCH + Duration::from_secs(exp))
        .duration_since(now)
        .unwrap_or(Duration::ZERO)
}

/// Keeps one connection's token fresh: before the token in force expires, asks the provider for
/// the next one and yields the `auth` frame to send; the server's `auth_ok` (with the new `exp`)
/// arms the next round. When the provider fails, it asks again halfway to `exp`; when it still
/// has nothing by then, or the server refuses the token, the server closes the connection at
/// `exp` (4001) and the client reconnects with a token asked for then.
pub(crate) struct Refresh {
    tokens: SharedTokens,
    /// `exp` of the token in force on this connection.
    exp: Option<u64>,
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    fetching: Option<BoxFuture<'static, Result<String, BoxError>>>,
    /// An `auth` frame was sent and not answered yet.
    pending: bool,
}

impl fmt::Debug for Refresh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Refresh")
            .field("exp", &self.exp)
            .field("fetching", &self.fetching.is_some())
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl Refresh {
    /// For a connection opened with a token expiring at `exp` (`None`: no `exp`, nothing to do).
    pub(crate) fn new(tokens: SharedTokens, exp: Option<u64>) -> Self {
        let mut r = Refresh {
            tokens,
            exp,
            timer: None,
            fetching: None,
            pending: false,
        };
        r.arm(exp.map(|e| refresh_delay(e, std::time::SystemTime::now())));
        r
    }

    fn arm(&mut self, delay: Option<std::time::Duration>) {
        self.timer = delay.map(|d| Box::pin(tokio::time::sleep(d)));
    }

    /// Resolves with the fresh token to send in an `auth` frame when it is time (never, without
    /// an `exp`). Cancel-safe: what it waits for is kept in `self`.
    pub(crate) async fn next(&mut self) -> String {
        loop {
            if let Some(fetch) = self.fetching.as_mut() {
                let result = fetch.await;
                self.fetching = None;
                match result {
                    Ok(token) => {
                        let new_exp = jwt_exp(&token);
                        if new_exp.is_some_and(|new| self.exp.is_some_and(|old| new <= old)) {
                            // The same token again (a fixed one): sending it would only bring
                            // the same exp back, sooner and sooner.
                            tracing::warn!(target: "seqcast_client", exp = self.exp, "the token provider gave no token that outlives the one in force; the connection ends at exp and reconnects");
                            continue;
                        }
                        self.pending = true;
                        tracing::debug!(target: "seqcast_client", old_exp = self.exp, new_exp, "sending a fresh token (auth)");
                        return token;
                    }
                    Err(e) => {
                        let left = self.exp.map(|e| time_left(e, std::time::SystemTime::now()));
                        tracing::warn!(target: "seqcast_client", error = %e, exp = self.exp, "the token provider failed before the token expired; asking again halfway to exp, else the connection ends at exp and reconnects");
                        self.arm(
                            left.filter(|l| *l > std::time::Duration::from_secs(1))
                                .map(|l| l / 2),
                        );
                    }
                }
            } else if let Some(timer) = self.timer.as_mut() {
                timer.await;
                self.timer = None;
                self.fetching = Some(self.tokens.0.token());
            } else {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The server took the token sent last: it is in force until `exp`.
    pub(crate) fn on_auth_ok(&mut self, exp: u64) {
        self.pending = false;
        self.exp = Some(exp);
        self.arm(Some(refresh_delay(exp, std::time::SystemTime::now())));
        tracing::debug!(target: "seqcast_client", exp, "token refreshed (auth_ok)");
    }

    /// An `unauthorized` error frame: if it answers our `auth`, the token in force stays until
    /// its `exp`, when the server closes with 4001 and the client reconnects.
    pub(crate) fn on_unauthorized(&mut self, message: &str) {
        if std::mem::take(&mut self.pending) {
            tracing::warn!(target: "seqcast_client", exp = self.exp, message, "the server refused the fresh token; the connection ends at exp (4001) and the client reconnects with a new one");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn exp_is_read_from_the_payload_without_verifying() {
        // {"alg":"HS256","typ":"JWT"} . {"sub":"u","exp":1700000000} . (any signature)
        let t = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ1IiwiZXhwIjoxNzAwMDAwMDAwfQ.sig";
        assert_eq!(jwt_exp(t), Some(1_700_000_000));
        // Padded, and a float exp.
        let padded = "x.eyJleHAiOjEyLjV9.y";
        assert_eq!(jwt_exp(padded), Some(12));
        for bad in [
            "",
            "abc",
            "a.!!!.c",
            "a.eyJzdWIiOiJ1In0.c",
            "a.bm90IGpzb24.c",
        ] {
            assert_eq!(jwt_exp(bad), None, "{bad}");
        }
    }

    /// An unsigned JWT-shaped token with this `exp`.
    fn token_expiring_at(exp: u64) -> String {
        let payload: String = format!("{{\"exp\":{exp}}}")
            .bytes()
            .collect::<Vec<u8>>()
            .chunks(3)
            .flat_map(|c| {
                const A: &[u8; 64] =
                    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
                let n = c.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)) << (8 * (3 - c.len()));
                (0..=c.len()).map(move |i| A[(n >> (18 - 6 * i)) as usize & 63] as char)
            })
            .collect();
        format!("e30.{payload}.sig")
    }

    fn provider(token: String, calls: &Arc<std::sync::atomic::AtomicUsize>) -> SharedTokens {
        let calls = Arc::clone(calls);
        SharedTokens(Arc::new(move || {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let token = token.clone();
            async move { Ok::<_, std::convert::Infallible>(token) }
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn a_fresh_token_goes_out_before_exp_and_the_same_one_never_does() {
        let now = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let exp = now + 30;
        assert_eq!(jwt_exp(&token_expiring_at(exp)), Some(exp));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let later = token_expiring_at(exp + 60);
        let mut r = Refresh::new(provider(later.clone(), &calls), Some(exp));
        let started = tokio::time::Instant::now();
        let sent = tokio::time::timeout(Duration::from_secs(60), r.next()).await;
        assert_eq!(sent.ok(), Some(later));
        let waited = started.elapsed();
        assert!(
            waited > Duration::from_secs(18) && waited <= Duration::from_secs(20),
            "{waited:?}"
        );
        r.on_auth_ok(exp + 60);

        // A provider that hands out the token in force again: asked once, nothing sent.
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut r = Refresh::new(provider(token_expiring_at(exp), &calls), Some(exp));
        let sent = tokio::time::timeout(Duration::from_secs(120), r.next()).await;
        assert!(sent.is_err(), "{sent:?}");
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn the_refresh_comes_a_third_of_the_lifetime_early_at_most_a_minute() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(refresh_delay(1003, now), Duration::from_secs(2));
        assert_eq!(refresh_delay(1000 + 3600, now), Duration::from_secs(3540));
        assert_eq!(refresh_delay(999, now), Duration::ZERO, "already expired");
    }
}
