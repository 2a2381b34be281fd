//! Who may do what: client JWTs (HS256 with the secret, or RS256/ES256/EdDSA with a configured
//! public key; `sub`, `exp`, optional `nbf`, `iss`, `aud`, `channels` patterns and `publish`),
//! the publisher API keys, and the development-mode secrets.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use seqcast_protocol::{KeyPattern, SubscriptionKey};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;

use crate::error::ApiError;

/// Claims of a seqcast client token, as minted.
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

/// Claims as read from a token: `channels: null` is told apart from an absent `channels`.
#[derive(Debug, Deserialize)]
struct IncomingClaims {
    sub: String,
    exp: u64,
    #[serde(default, deserialize_with = "present")]
    channels: Option<Option<Vec<String>>>,
    #[serde(default)]
    publish: bool,
}

fn present<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<Vec<String>>>, D::Error> {
    Option::<Vec<String>>::deserialize(d).map(Some)
}

/// What a verified token (or API key) allows.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The user (`sub`); for an API key, `api-key#N` (its position in the configured list).
    pub sub: String,
    /// None = every key.
    patterns: Option<Vec<KeyPattern>>,
    /// May publish.
    pub publish: bool,
    /// Expiry (seconds since the Unix epoch); `None` for an API key.
    pub exp: Option<u64>,
}

impl Grant {
    /// A grant for an API-key publisher: every key, may publish.
    pub fn api_key(index: usize) -> Self {
        Grant {
            sub: format!("api-key#{index}"),
            patterns: None,
            publish: true,
            exp: None,
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

    /// Who a rate limit counts this grant as: the API key, or the token's user.
    pub fn rate_key(&self) -> String {
        if self.exp.is_none() {
            self.sub.clone()
        } else {
            format!("sub:{}", self.sub)
        }
    }
}

/// The grant may publish: a token needs the `publish: true` claim (an API key always may).
pub fn check_may_publish(grant: &Grant) -> Result<(), ApiError> {
    if grant.publish {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "token may not publish (no `publish: true` claim)".into(),
        ))
    }
}

/// Verifies and mints tokens; checks API keys.
pub struct Authority {
    /// The HS256 secret (to mint and to verify); `None` when only public keys are configured.
    secret: Option<(EncodingKey, DecodingKey)>,
    /// Public keys for asymmetric tokens: (key id, algorithm family, key).
    public: Vec<PublicKey>,
    issuer: Option<String>,
    audience: Option<String>,
    api_keys: Vec<String>,
    tickets: Tickets,
}

struct PublicKey {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("public_keys", &self.public.len())
            .field("api_keys", &self.api_keys.len())
            .finish_non_exhaustive()
    }
}

/// The `Authorization` header's scheme (matched case-insensitively, RFC 7235) and credentials.
fn credentials<'a>(authorization: &'a str, scheme: &str) -> Option<&'a str> {
    let v = authorization.trim();
    let (s, rest) = v.split_once(|c: char| c.is_ascii_whitespace())?;
    s.eq_ignore_ascii_case(scheme).then(|| rest.trim())
}

impl Authority {
    /// An authority for a secret and one API key.
    pub fn new(jwt_secret: &str, api_key: &str) -> Self {
        Self::with_keys(jwt_secret, vec![api_key.to_owned()])
    }

    /// An authority for a secret and several API keys (any is valid).
    pub fn with_keys(jwt_secret: &str, api_keys: Vec<String>) -> Self {
        let mut a = Self::without_secret(api_keys);
        a.secret = Some((
            EncodingKey::from_secret(jwt_secret.as_bytes()),
            DecodingKey::from_secret(jwt_secret.as_bytes()),
        ));
        a
    }

    /// An authority with no HS256 secret (add public keys with
    /// [`Authority::with_public_keys`]): HS256 tokens are refused and nothing can be minted.
    pub fn without_secret(api_keys: Vec<String>) -> Self {
        Authority {
            secret: None,
            public: Vec::new(),
            issuer: None,
            audience: None,
            api_keys: api_keys.into_iter().filter(|k| !k.is_empty()).collect(),
            tickets: Tickets::default(),
        }
    }

    /// Require `iss` / `aud` claims.
    pub fn require(mut self, issuer: Option<String>, audience: Option<String>) -> Self {
        self.issuer = issuer;
        self.audience = audience;
        self
    }

    /// Accept tokens signed with the public key(s) in `path`: PEM (RSA, EC P-256 or Ed25519)
    /// or a JWKS document.
    pub fn with_public_keys(mut self, path: &Path) -> Result<Self, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        self.public = parse_public_keys(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(self)
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = 5;
        v.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if self.issuer.is_some() {
            required.push("iss");
        }
        if self.audience.is_some() {
            required.push("aud");
        }
        v.set_required_spec_claims(&required);
        match &self.issuer {
            Some(i) => v.set_issuer(&[i]),
            None => v.iss = None,
        }
        match &self.audience {
            Some(a) => v.set_audience(&[a]),
            None => v.validate_aud = false,
        }
        v
    }

    /// Verify a client token.
    pub fn verify(&self, token: &str) -> Result<Grant, ApiError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| ApiError::Unauthorized("token is not a valid JWT".into()))?;
        let claims = match header.alg {
            Algorithm::HS256 => match &self.secret {
                Some((_, key)) => self.decode(token, key, Algorithm::HS256)?,
                None => {
                    return Err(ApiError::Unauthorized(
                        "HS256 tokens are not accepted: no JWT secret is configured (tokens are verified with the configured public key)".into(),
                    ));
                }
            },
            alg @ (Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA) => {
                let mut candidates = self.public.iter().filter(|k| {
                    k.algorithms.contains(&alg)
                        && (header.kid.is_none() || k.kid.is_none() || k.kid == header.kid)
                });
                let Some(first) = candidates.next() else {
                    return Err(ApiError::Unauthorized(format!(
                        "no public key configured for {alg:?} tokens"
                    )));
                };
                let mut result = self.decode(token, &first.key, alg);
                for k in candidates {
                    if !matches!(&result, Err(ApiError::Unauthorized(m)) if m == BAD_SIGNATURE) {
                        break;
                    }
                    result = self.decode(token, &k.key, alg);
                }
                result?
            }
            other => {
                return Err(ApiError::Unauthorized(format!(
                    "token algorithm {other:?} is not accepted"
                )));
            }
        };
        let patterns = match claims.channels {
            None => None,
            Some(None) => {
                return Err(ApiError::Unauthorized(
                    "token has `channels: null`; omit the claim for every key, or list patterns"
                        .into(),
                ));
            }
            Some(Some(list)) => Some(
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
            exp: Some(claims.exp),
        })
    }

    fn decode(
        &self,
        token: &str,
        key: &DecodingKey,
        alg: Algorithm,
    ) -> Result<IncomingClaims, ApiError> {
        jsonwebtoken::decode::<IncomingClaims>(token, key, &self.validation(alg))
            .map(|d| d.claims)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                let why = match e.kind() {
                    ErrorKind::ExpiredSignature => "token expired".to_string(),
                    ErrorKind::ImmatureSignature => "token not valid yet (nbf)".to_string(),
                    ErrorKind::InvalidSignature => BAD_SIGNATURE.to_string(),
                    ErrorKind::InvalidIssuer => "token issuer (iss) is not accepted".to_string(),
                    ErrorKind::InvalidAudience => {
                        "token audience (aud) is not accepted".to_string()
                    }
                    ErrorKind::MissingRequiredClaim(c) => format!("token lacks the {c} claim"),
                    ErrorKind::InvalidToken
                    | ErrorKind::Base64(_)
                    | ErrorKind::Json(_)
                    | ErrorKind::Utf8(_) => "token is not a valid JWT".to_string(),
                    other => format!("token rejected: {other:?}"),
                };
                ApiError::Unauthorized(why)
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
        let Some((encoding, _)) = &self.secret else {
            return Err(ApiError::Internal(
                "cannot sign a token: no JWT secret is configured".into(),
            ));
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, encoding)
            .map_err(|e| ApiError::Internal(format!("cannot sign token: {e}")))
    }

    /// Which configured API key `given` is, compared in constant time against every key.
    fn api_key_index(&self, given: &str) -> Option<usize> {
        let mut found = None;
        for (i, k) in self.api_keys.iter().enumerate() {
            if bool::from(given.as_bytes().ct_eq(k.as_bytes())) && found.is_none() {
                found = Some(i);
            }
        }
        found
    }

    /// Check an `Authorization` header value for a publisher: `ApiKey K` or `Bearer <jwt with publish:true>`.
    pub fn publisher(&self, authorization: Option<&str>) -> Result<Grant, ApiError> {
        let Some(v) = authorization else {
            return Err(ApiError::Unauthorized(
                "missing Authorization header: publish with `Authorization: ApiKey <key>` (in development mode the key is in the data directory's `api-key` file) or `Authorization: Bearer <token>` with `publish: true`".into(),
            ));
        };
        if let Some(given) = credentials(v, "ApiKey") {
            return match self.api_key_index(given) {
                Some(i) => Ok(Grant::api_key(i)),
                None => Err(ApiError::Unauthorized("API key is not valid".into())),
            };
        }
        if let Some(token) = credentials(v, "Bearer") {
            let grant = self.verify(token)?;
            check_may_publish(&grant)?;
            return Ok(grant);
        }
        Err(ApiError::Unauthorized(
            "Authorization must be `ApiKey <key>` or `Bearer <token>`".into(),
        ))
    }

    /// Check an `Authorization: Bearer …` header value for a reader.
    pub fn reader(&self, authorization: Option<&str>) -> Result<Grant, ApiError> {
        match authorization {
            Some(v) => match credentials(v, "Bearer") {
                Some(token) => self.verify(token),
                None => Err(ApiError::Unauthorized(
                    "Authorization must be `Bearer <token>`".into(),
                )),
            },
            None => Err(ApiError::Unauthorized(
                "missing Authorization header: expected `Authorization: Bearer <token>`".into(),
            )),
        }
    }
}

/// Most stream tickets issued within one ticket lifetime (used or not: a used one is kept until
/// it would have expired, for pruning in issue order); more are refused (503). This bounds the
/// book's memory, whatever the rate of issue and use.
pub const MAX_TICKETS: usize = 100_000;

/// Stream tickets: single-use credentials for one `GET /events?ticket=…` (a browser's
/// `EventSource` cannot send an `Authorization` header, and a token never goes in a URL). Each
/// holds the grant of the token it was issued for. Kept in this process's memory, bounded
/// ([`MAX_TICKETS`]; expired ones are dropped as new ones come), so a ticket is valid on the
/// node that issued it only.
#[derive(Debug, Default)]
struct Tickets {
    book: std::sync::Mutex<TicketBook>,
}

#[derive(Debug, Default)]
struct TicketBook {
    by_id: std::collections::HashMap<String, (Grant, std::time::Instant)>,
    /// Issue order (= expiry order: every ticket lives as long), for pruning.
    order: std::collections::VecDeque<(std::time::Instant, String)>,
}

impl TicketBook {
    /// Forget the tickets issued more than `ttl` before `now`.
    fn prune(&mut self, now: std::time::Instant, ttl: std::time::Duration) {
        while let Some((issued, _)) = self.order.front() {
            if now.duration_since(*issued) < ttl {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                self.by_id.remove(&id);
            }
        }
    }
}

impl Authority {
    /// Issue a stream ticket for `grant` (a verified token's), valid once within `ttl`.
    pub fn issue_ticket(&self, grant: Grant, ttl: std::time::Duration) -> Result<String, ApiError> {
        let now = std::time::Instant::now();
        // 128 random bits from the thread's CSPRNG, as 32 hex digits.
        let id = format!("{:032x}", rand::random::<u128>());
        let mut book = self.tickets.book.lock().unwrap_or_else(|p| p.into_inner());
        book.prune(now, ttl);
        if book.order.len() >= MAX_TICKETS {
            return Err(ApiError::Unavailable(format!(
                "{MAX_TICKETS} stream tickets were issued within their lifetime; retry in a few seconds"
            )));
        }
        book.by_id.insert(id.clone(), (grant, now));
        book.order.push_back((now, id.clone()));
        Ok(id)
    }

    /// Use a stream ticket: its grant, once — a second use, an expired or unknown ticket, or
    /// one whose token expired meanwhile is a 401.
    pub fn redeem_ticket(&self, ticket: &str, ttl: std::time::Duration) -> Result<Grant, ApiError> {
        let taken = self
            .tickets
            .book
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_id
            .remove(ticket);
        let Some((grant, issued)) = taken else {
            return Err(ApiError::Unauthorized(
                "stream ticket is not valid: unknown, already used, or issued by another node"
                    .into(),
            ));
        };
        if issued.elapsed() >= ttl {
            return Err(ApiError::Unauthorized("stream ticket expired".into()));
        }
        if grant
            .exp
            .is_some_and(|exp| exp <= jsonwebtoken::get_current_timestamp())
        {
            return Err(ApiError::Unauthorized(
                "the token the stream ticket was issued for has expired".into(),
            ));
        }
        Ok(grant)
    }
}

const BAD_SIGNATURE: &str = "token signature is invalid";

/// Public keys from a PEM file (one key) or a JWKS document.
fn parse_public_keys(bytes: &[u8]) -> Result<Vec<PublicKey>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
    if text.trim_start().starts_with('{') {
        let set: jsonwebtoken::jwk::JwkSet =
            serde_json::from_str(text).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            use jsonwebtoken::jwk::AlgorithmParameters as P;
            let algorithms = match &jwk.algorithm {
                P::RSA(_) => vec![Algorithm::RS256],
                P::EllipticCurve(_) => vec![Algorithm::ES256],
                P::OctetKeyPair(_) => vec![Algorithm::EdDSA],
                P::OctetKey(_) => continue, // a shared secret has no place in a public key set
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("bad JWK: {e}"))?;
            keys.push(PublicKey {
                kid: jwk.common.key_id.clone(),
                algorithms,
                key,
            });
        }
        if keys.is_empty() {
            return Err("the JWKS holds no RSA, EC or OKP key".into());
        }
        return Ok(keys);
    }
    type PemParser = fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>;
    let attempts: [(Algorithm, PemParser); 3] = [
        (Algorithm::RS256, DecodingKey::from_rsa_pem),
        (Algorithm::ES256, DecodingKey::from_ec_pem),
        (Algorithm::EdDSA, DecodingKey::from_ed_pem),
    ];
    for (alg, parse) in attempts {
        if let Ok(key) = parse(bytes) {
            return Ok(vec![PublicKey {
                kid: None,
                algorithms: vec![alg],
                key,
            }]);
        }
    }
    Err("not a PEM public key (RSA, EC P-256 or Ed25519) nor a JWKS document".into())
}

/// Why `GET /dev/token` must not answer this request, if it must not: development mode is for
/// this machine only, so the peer must be a loopback address and the request must not have come
/// through a proxy on this machine for someone else (`Forwarded`, `X-Forwarded-For`,
/// `X-Real-IP`).
pub fn dev_token_refusal(peer: Option<std::net::IpAddr>, forwarded: bool) -> Option<String> {
    match peer {
        Some(ip) if crate::config::is_loopback(ip) => forwarded.then(|| {
            "development tokens are for loopback peers only; this request was forwarded by a proxy"
                .to_owned()
        }),
        Some(ip) => Some(format!(
            "development tokens are for loopback peers only, not {ip}"
        )),
        None => Some("development tokens are for loopback peers only; the peer is unknown".into()),
    }
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

    /// A ticket is taken once; an expired one is refused and forgotten; expired tickets are
    /// dropped as new ones are issued, so the book holds only the live ones.
    #[test]
    fn stream_tickets_are_single_use_expire_and_stay_bounded() {
        let a = Authority::new("secret", "key");
        let grant = a
            .verify(
                &a.mint("alice", Some(vec!["search:*".into()]), 60, false)
                    .unwrap(),
            )
            .unwrap();
        let minute = std::time::Duration::from_secs(60);
        let t = a.issue_ticket(grant.clone(), minute).unwrap();
        assert_eq!(t.len(), 32, "128 bits in hex");
        let g = a.redeem_ticket(&t, minute).unwrap();
        assert!(g.allows(&SubscriptionKey::parse("search:1").unwrap()));
        assert!(!g.allows(&SubscriptionKey::parse("orders:1").unwrap()));
        assert!(matches!(
            a.redeem_ticket(&t, minute),
            Err(ApiError::Unauthorized(_))
        ));
        let expired = a.issue_ticket(grant.clone(), minute).unwrap();
        let err = a.redeem_ticket(&expired, std::time::Duration::ZERO);
        assert!(matches!(err, Err(ApiError::Unauthorized(m)) if m.contains("expired")));
        for _ in 0..100 {
            a.issue_ticket(grant.clone(), std::time::Duration::ZERO)
                .unwrap();
        }
        let book = a.tickets.book.lock().unwrap();
        assert_eq!(
            (book.by_id.len(), book.order.len()),
            (1, 1),
            "expired ones pruned"
        );
    }

    /// Issuing and using tickets as fast as possible keeps the book bounded: used tickets
    /// count until they would have expired.
    #[test]
    fn tickets_issued_and_used_at_once_still_hit_the_bound() {
        let a = Authority::new("secret", "key");
        let grant = a.verify(&a.mint("u", None, 60, false).unwrap()).unwrap();
        let minute = std::time::Duration::from_secs(60);
        for _ in 0..MAX_TICKETS {
            let t = a.issue_ticket(grant.clone(), minute).unwrap();
            a.redeem_ticket(&t, minute).unwrap();
        }
        assert!(matches!(
            a.issue_ticket(grant, minute),
            Err(ApiError::Unavailable(_))
        ));
        let book = a.tickets.book.lock().unwrap();
        assert_eq!((book.by_id.len(), book.order.len()), (0, MAX_TICKETS));
    }

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

    #[test]
    fn without_a_secret_hs256_is_refused_and_nothing_is_minted() {
        let a = Authority::without_secret(vec!["k".into()]);
        let t = Authority::new("secret", "k")
            .mint("x", None, 60, true)
            .unwrap();
        let err = a.verify(&t).unwrap_err();
        assert!(err.message().contains("HS256"), "{err:?}");
        assert!(a.mint("x", None, 60, false).is_err());
        assert!(a.publisher(Some("ApiKey k")).is_ok(), "API keys still work");
    }

    #[test]
    fn dev_tokens_go_to_loopback_peers_only() {
        let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
        assert_eq!(dev_token_refusal(ip("127.0.0.1"), false), None);
        assert_eq!(dev_token_refusal(ip("::1"), false), None);
        assert_eq!(dev_token_refusal(ip("::ffff:127.0.0.1"), false), None);
        for peer in [
            ip("10.0.0.7"),
            ip("192.168.1.2"),
            ip("::ffff:10.0.0.7"),
            ip("2001:db8::1"),
            None,
        ] {
            let why = dev_token_refusal(peer, false).expect("refused");
            assert!(why.contains("loopback"), "{why}");
        }
        assert!(
            dev_token_refusal(ip("127.0.0.1"), true).is_some(),
            "forwarded by a proxy"
        );
    }
}
