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
