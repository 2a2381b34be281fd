//! Who may do what: client JWTs (HS256, `sub`, `exp`, optional `channels` patterns and
//! `publish`), the publisher API key, and the development-mode secrets.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use seqcast_protocol::{KeyPattern, SubscriptionKey};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// Claims of a seqcast client token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Key patterns the token may read (absent = every key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<String>>,
    /// Whether the token may publish.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub publish: bool,
}

/// What a verified token allows.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The user (`sub`).
    pub sub: String,
    /// None = every key.
    patterns: Option<Vec<KeyPattern>>,
    /// May publish.
    pub publish: bool,
}

impl Grant {
    /// A grant for an API-key publisher: every key, may publish.
    pub fn api_key() -> Self {
        Grant {
            sub: "api-key".into(),
            patterns: None,
            publish: true,
        }
    }

    /// May this grant read (or, with `publish`, write) `key`?
    pub fn allows(&self, key: &SubscriptionKey) -> bool {
        match &self.patterns {
            None => true,
            Some(ps) => ps.iter().any(|p| p.matches(key)),
        }
    }

    /// True when the grant reads everything (no filtering needed).
    pub fn is_unrestricted(&self) -> bool {
        self.patterns.is_none()
    }
}

/// Verifies and mints tokens; checks API keys.
pub struct Authority {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    api_key: String,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

impl Authority {
    /// An authority for a secret and an API key.
    pub fn new(jwt_secret: &str, api_key: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Authority {
            encoding: EncodingKey::from_secret(jwt_secret.as_bytes()),
            decoding: DecodingKey::from_secret(jwt_secret.as_bytes()),
            validation,
            api_key: api_key.to_owned(),
        }
    }

    /// Verify a client token.
    pub fn verify(&self, token: &str) -> Result<Grant, ApiError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                let why = match e.kind() {
                    ErrorKind::ExpiredSignature => "token expired".to_string(),
                    ErrorKind::InvalidSignature => "token signature is invalid".to_string(),
                    ErrorKind::InvalidToken
                    | ErrorKind::Base64(_)
                    | ErrorKind::Json(_)
                    | ErrorKind::Utf8(_) => "token is not a valid JWT".to_string(),
                    other => format!("token rejected: {other:?}"),
                };
                ApiError::Unauthorized(why)
            })?;
        let claims = data.claims;
        let patterns = match claims.channels {
            None => None,
            Some(list) => Some(
                list.iter()
                    .map(|p| KeyPattern::parse(p))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        ApiError::Unauthorized(format!(
                            "token has an invalid channels pattern: {e}"
                        ))
                    })?,
            ),
        };
        Ok(Grant {
            sub: claims.sub,
            patterns,
            publish: claims.publish,
        })
    }

    /// Mint a token.
    pub fn mint(
        &self,
        sub: &str,
        channels: Option<Vec<String>>,
        ttl_secs: u64,
        publish: bool,
    ) -> Result<String, ApiError> {
        if let Some(list) = &channels {
            for p in list {
                KeyPattern::parse(p).map_err(|e| {
                    ApiError::BadRequest(format!("invalid channels pattern {p:?}: {e}"))
                })?;
            }
        }
        let claims = Claims {
            sub: sub.to_owned(),
            exp: jsonwebtoken::get_current_timestamp().saturating_add(ttl_secs),
            channels,
            publish,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| ApiError::Internal(format!("cannot sign token: {e}")))
    }

    /// Check an `Authorization` header value for a publisher: `ApiKey K` or `Bearer <jwt with publish:true>`.
    pub fn publisher(&self, authorization: Option<&str>) -> Result<Grant, ApiError> {
        match authorization.map(str::trim) {
            Some(v) if v.starts_with("ApiKey ") => {
                let given = v["ApiKey ".len()..].trim();
                if constant_time_eq(given.as_bytes(), self.api_key.as_bytes()) {
                    Ok(Grant::api_key())
                } else {
                    Err(ApiError::Unauthorized("API key is not valid".into()))
                }
            }
            Some(v) if v.starts_with("Bearer ") => {
                let grant = self.verify(v["Bearer ".len()..].trim())?;
                if grant.publish {
                    Ok(grant)
                } else {
                    Err(ApiError::Forbidden(
                        "token may not publish (no `publish: true` claim)".into(),
                    ))
                }
            }
            Some(_) => Err(ApiError::Unauthorized(
                "Authorization must be `ApiKey <key>` or `Bearer <token>`".into(),
            )),
            None => Err(ApiError::Unauthorized(
                "missing Authorization header".into(),
            )),
        }
    }

    /// Check an `Authorization: Bearer …` header value for a reader.
    pub fn reader(&self, authorization: Option<&str>) -> Result<Grant, ApiError> {
        match authorization.map(str::trim) {
            Some(v) if v.starts_with("Bearer ") => self.verify(v["Bearer ".len()..].trim()),
            Some(_) => Err(ApiError::Unauthorized(
                "Authorization must be `Bearer <token>`".into(),
            )),
            None => Err(ApiError::Unauthorized(
                "missing Authorization header".into(),
            )),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Read a secret kept in the data directory, or make and keep a new one (development mode).
/// Returns the secret and whether it was just created.
pub fn dev_secret(data_dir: &Path, file: &str) -> std::io::Result<(String, bool)> {
    let path = data_dir.join(file);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok((s.trim().to_owned(), false)),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(data_dir)?;
    let secret = random_hex(32);
    write_private(&path, &secret)?;
    Ok((secret, true))
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    use rand::RngCore;
    let mut bytes = vec![0u8; n];
    rand::rng().fill_bytes(&mut bytes);
    let mut s = String::with_capacity(n * 2);
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn minted_tokens_verify_and_carry_patterns() {
        let a = Authority::new("secret", "key");
        let t = a
            .mint("alice", Some(vec!["search:*".into()]), 60, false)
            .unwrap();
        let g = a.verify(&t).unwrap();
        assert_eq!(g.sub, "alice");
        assert!(g.allows(&SubscriptionKey::parse("search:r1").unwrap()));
        assert!(!g.allows(&SubscriptionKey::parse("session:r1").unwrap()));
        assert!(!g.publish);
        let other = Authority::new("other-secret", "key");
        assert!(matches!(other.verify(&t), Err(ApiError::Unauthorized(_))));
    }

    #[test]
    fn expired_tokens_and_bad_keys_are_unauthorized() {
        let a = Authority::new("secret", "key");
        let claims = Claims {
            sub: "bob".into(),
            exp: 1_000,
            channels: None,
            publish: false,
        };
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        let err = a.verify(&t).unwrap_err();
        assert_eq!(err, ApiError::Unauthorized("token expired".into()));
        assert!(a.publisher(Some("ApiKey key")).is_ok());
        assert!(matches!(
            a.publisher(Some("ApiKey nope")),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(a.publisher(None), Err(ApiError::Unauthorized(_))));
        let reader = a.mint("r", None, 60, false).unwrap();
        assert!(matches!(
            a.publisher(Some(&format!("Bearer {reader}"))),
            Err(ApiError::Forbidden(_))
        ));
    }

    #[test]
    fn dev_secret_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (a, created) = dev_secret(dir.path(), "jwt-secret").unwrap();
        assert!(created);
        assert_eq!(a.len(), 64);
        let (b, created) = dev_secret(dir.path(), "jwt-secret").unwrap();
        assert!(!created);
        assert_eq!(a, b);
    }
}
