//! Authentication and per-stream authorization with JWTs.
//!
//! A token is verified with one key and one algorithm, both fixed by the
//! configuration (HS256 with a secret, or EdDSA / RS256 with a public key):
//! the token's own `alg` header is never trusted to choose. Its claims list
//! the streams it may publish to and subscribe to:
//!
//! ```json
//! {"exp": 1700000000, "jobcast": {"publish": ["job-1"], "subscribe": ["job-*"]}}
//! ```
//!
//! A pattern is an exact stream id, or a prefix ending in `*` matched as a
//! plain string prefix (`*` alone matches every stream). `exp` is required,
//! `nbf` is respected. `"metrics": true` lets a token read `/metrics`.
//!
//! Where a token comes from matters: `Authorization: Bearer` grants what the
//! claims say; a cookie or `?access_token=` (GET only) grants reading only,
//! since a browser sends cookies with cross-site requests (a cookie-
//! authenticated write would be a CSRF hole) and query strings end up in
//! proxy logs and browser history.
//!
//! This module verifies tokens and knows no HTTP: taking a token from a
//! request and guarding routes is `http::guard`'s job.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// The algorithm of a public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlg {
    /// Ed25519 signatures (`alg: EdDSA`).
    EdDsa,
    /// RSA PKCS#1 v1.5 with SHA-256 (`alg: RS256`).
    Rs256,
}

/// A key that cannot be used to verify tokens.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The PEM text is not a public key of the expected (or any supported) kind.
    #[error("not a PEM {expected} public key")]
    NotAPublicKey {
        /// What was expected: `Ed25519`, `RSA`, or `Ed25519 or RSA`.
        expected: &'static str,
        /// Why the key was refused.
        #[source]
        source: jsonwebtoken::errors::Error,
    },
    /// An HS256 secret must not be empty.
    #[error("the JWT secret is empty")]
    EmptySecret,
    /// An HS256 secret shorter than [`MIN_SECRET_BYTES`]: one token is
    /// enough to guess it offline.
    #[error(
        "the JWT secret is {len} bytes; at least 32 bytes are needed \
         (e.g. `openssl rand -base64 32`)"
    )]
    ShortSecret {
        /// The secret's length in bytes.
        len: usize,
    },
    /// A private key where a public key belongs: the server only verifies,
    /// and a private key on every node is a key that can mint tokens.
    #[error(
        "this is a private key; give the server the public key \
         (e.g. `openssl pkey -in key.pem -pubout`)"
    )]
    PrivateKey,
}

/// The shortest HS256 secret accepted (RFC 7518 §3.2: a key of at least
/// the hash's size, 256 bits).
pub const MIN_SECRET_BYTES: usize = 32;

/// How tokens are verified: one key, one pinned algorithm. Its `Debug`
/// never shows the key.
#[derive(Clone)]
pub struct Auth {
    key: Arc<DecodingKey>,
    alg: Algorithm,
    leeway: Duration,
    audience: Option<String>,
    issuer: Option<String>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("alg", &self.alg)
            .field("key", &"<redacted>")
            .field("leeway", &self.leeway)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .finish()
    }
}

impl Auth {
    /// Verifies HS256 tokens with a shared secret of at least
    /// [`MIN_SECRET_BYTES`] bytes.
    pub fn hs256(secret: impl AsRef<[u8]>) -> Result<Auth, KeyError> {
        let len = secret.as_ref().len();
        if len > 0 && len < MIN_SECRET_BYTES {
            return Err(KeyError::ShortSecret { len });
        }
        Self::hs256_allow_short(secret)
    }

    /// Like [`Auth::hs256`], accepting a secret of any non-zero length
    /// (`--insecure-short-secret`: for tests and migrations only).
    pub fn hs256_allow_short(secret: impl AsRef<[u8]>) -> Result<Auth, KeyError> {
        let secret = secret.as_ref();
        if secret.is_empty() {
            return Err(KeyError::EmptySecret);
        }
        Ok(Self::new(
            DecodingKey::from_secret(secret),
            Algorithm::HS256,
        ))
    }

    /// Verifies tokens with a PEM public key. The algorithm is `alg` when
    /// given, else inferred from the key's type (Ed25519: EdDSA, RSA: RS256) —
    /// never from a token.
    pub fn public_key_pem(pem: &[u8], alg: Option<KeyAlg>) -> Result<Auth, KeyError> {
        // jsonwebtoken would take an RSA private key and verify with it; a
        // private key has no business on a server that only verifies.
        if pem.windows(11).any(|w| w == b"PRIVATE KEY") {
            return Err(KeyError::PrivateKey);
        }
        let ed = || DecodingKey::from_ed_pem(pem).map(|k| Self::new(k, Algorithm::EdDSA));
        let rsa = || DecodingKey::from_rsa_pem(pem).map(|k| Self::new(k, Algorithm::RS256));
        match alg {
            Some(KeyAlg::EdDsa) => ed().map_err(|source| KeyError::NotAPublicKey {
                expected: "Ed25519",
                source,
            }),
            Some(KeyAlg::Rs256) => rsa().map_err(|source| KeyError::NotAPublicKey {
                expected: "RSA",
                source,
            }),
            None => ed()
                .or_else(|_| rsa())
                .map_err(|source| KeyError::NotAPublicKey {
                    expected: "Ed25519 or RSA",
                    source,
                }),
        }
    }

    fn new(key: DecodingKey, alg: Algorithm) -> Auth {
        Auth {
            key: Arc::new(key),
            alg,
            leeway: Duration::from_secs(5),
            audience: None,
            issuer: None,
        }
    }

    /// Tokens must carry this `aud` (a string, or an array containing it).
    pub fn with_audience(mut self, audience: impl Into<String>) -> Auth {
        self.audience = Some(audience.into());
        self
    }

    /// Tokens must carry this `iss`.
    pub fn with_issuer(mut self, issuer: impl Into<String>) -> Auth {
        self.issuer = Some(issuer.into());
        self
    }

    /// Clock skew tolerated on `exp` and `nbf` (default 5 s). A token is
    /// honoured, and an open stream kept, until `exp` plus this.
    pub fn with_leeway(mut self, leeway: Duration) -> Auth {
        self.leeway = leeway;
        self
    }

    /// The pinned algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// Verifies `token` and returns its grant.
    pub fn verify(&self, token: &str, source: TokenSource) -> Result<Grant, AuthError> {
        let mut v = Validation::new(self.alg);
        v.leeway = self.leeway.as_secs();
        v.validate_nbf = true;
        let mut required = vec!["exp"];
        match &self.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                required.push("aud");
            }
            None => v.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.key, &v).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                _ => AuthError::Invalid,
            })?;
        let claims = data.claims;
        let expires = grant_expiry(claims.exp, self.leeway, SystemTime::now());
        let perms = claims.jobcast.unwrap_or_default();
        Ok(Grant {
            publish: perms.publish,
            cancel: perms.cancel,
            subscribe: perms.subscribe,
            metrics: perms.metrics,
            expires: Some(expires),
            source,
            subject: claims.sub,
        })
    }
}

/// The longest a grant lasts, whatever its `exp` says: a far-future `exp`
/// (up to 2^64 − 1 seconds) must not overflow the clock arithmetic of every
/// deadline derived from it. The same bound stands for "never" in the SSE
/// writer.
pub const MAX_GRANT: Duration = Duration::from_secs(100 * 365 * 86_400);

/// When a grant of a token with this `exp` ends: `exp` plus the leeway,
/// capped at `now` + [`MAX_GRANT`]; saturating, never panicking.
fn grant_expiry(exp: u64, leeway: Duration, now: SystemTime) -> SystemTime {
    let cap = now.checked_add(MAX_GRANT).unwrap_or(now);
    UNIX_EPOCH
        .checked_add(Duration::from_secs(exp).saturating_add(leeway))
        .map_or(cap, |e| e.min(cap))
}

#[derive(Debug, Deserialize)]
struct Claims {
    exp: u64,
    /// Checked by jsonwebtoken, which skips a malformed one: declared here
    /// so that anything but a whole number of seconds fails to decode.
    #[serde(default)]
    #[allow(dead_code)]
    nbf: Option<u64>,
    #[serde(default)]
    jobcast: Option<Perms>,
    /// Who the token names (per-subject watcher caps, cancel requests).
    #[serde(default)]
    sub: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Perms {
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    /// Streams whose cancel this token may request (publish covers it too).
    #[serde(default)]
    cancel: Vec<String>,
    #[serde(default)]
    metrics: bool,
}

/// Where a token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer`: grants what the claims say.
    Bearer,
    /// The auth cookie: reading only.
    Cookie,
    /// `?access_token=` on a GET: reading only.
    Query,
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No token was sent.
    #[error("a token is required: send Authorization: Bearer <token>")]
    Missing,
    /// The token is malformed, badly signed, of another algorithm, or lacks `exp`.
    #[error("the token is invalid")]
    Invalid,
    /// The token's `exp` has passed.
    #[error("the token has expired")]
    Expired,
    /// The token's `nbf` is still ahead.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// A write came with a cookie or query token only.
    #[error("writes need Authorization: Bearer; a cookie or access_token grants reading only")]
    BearerRequired,
}

/// What a request may do: the verified claims, or everything when auth is off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    publish: Vec<String>,
    cancel: Vec<String>,
    subscribe: Vec<String>,
    metrics: bool,
    /// When the grant ends (None: never, auth is off).
    pub expires: Option<SystemTime>,
    /// Where the token came from (`Bearer` when auth is off).
    pub source: TokenSource,
    /// The token's `sub` claim, if any.
    pub subject: Option<String>,
}

impl Grant {
    /// Everything, forever: auth is off.
    pub fn all() -> Grant {
        Grant {
            publish: vec!["*".into()],
            cancel: vec!["*".into()],
            subscribe: vec!["*".into()],
            metrics: true,
            expires: None,
            source: TokenSource::Bearer,
            subject: None,
        }
    }

    /// Nothing at all: what a request without a verified grant may do.
    pub fn none() -> Grant {
        Grant {
            publish: Vec::new(),
            cancel: Vec::new(),
            subscribe: Vec::new(),
            metrics: false,
            expires: Some(UNIX_EPOCH),
            source: TokenSource::Query,
            subject: None,
        }
    }

    /// The patterns of the streams this grant may watch (for the stream list).
    pub fn subscribe_patterns(&self) -> &[String] {
        &self.subscribe
    }

    /// Whether this grant may read `/metrics`.
    pub fn may_read_metrics(&self) -> bool {
        self.metrics
    }

    /// Whether this grant may watch and read `stream`.
    pub fn may_subscribe(&self, stream: &str) -> bool {
        self.subscribe.iter().any(|p| matches(p, stream))
    }

    /// Whether this grant may append to, create, end and delete `stream`.
    pub fn may_publish(&self, stream: &str) -> bool {
        self.source == TokenSource::Bearer && self.publish.iter().any(|p| matches(p, stream))
    }

    /// Whether this grant may request a cancel of `stream`: publish, or the
    /// claim's `cancel` patterns, with a Bearer token.
    pub fn may_cancel(&self, stream: &str) -> bool {
        self.may_publish(stream)
            || (self.source == TokenSource::Bearer
                && self.cancel.iter().any(|p| matches(p, stream)))
    }

    /// How long until the grant ends, from now (None: never).
    pub fn remaining(&self) -> Option<Duration> {
        self.expires.map(|e| {
            e.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        })
    }
}

/// Whether `pattern` (an exact id, or a prefix ending in `*`) covers `stream`.
pub fn matches(pattern: &str, stream: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => stream.starts_with(prefix),
        None => pattern == stream,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_exact_or_plain_prefixes() {
        assert!(matches("job-1", "job-1"));
        assert!(!matches("job-1", "job-10"));
        assert!(matches("job-*", "job-10"));
        assert!(matches("job-*", "job-"));
        assert!(!matches("job-*", "job"));
        assert!(matches("*", "anything"));
        // `*` only means something at the end.
        assert!(!matches("j*b", "jxb"));
    }

    #[test]
    fn far_future_exp_saturates_at_the_cap() {
        let now = SystemTime::now();
        for exp in [u64::MAX, i64::MAX as u64, 1 << 62] {
            assert_eq!(
                grant_expiry(exp, Duration::from_secs(5), now),
                now + MAX_GRANT
            );
        }
        assert_eq!(
            grant_expiry(1000, Duration::from_secs(5), now),
            UNIX_EPOCH + Duration::from_secs(1005)
        );
    }

    #[test]
    fn debug_redacts_the_key() {
        let a = Auth::hs256("super-secret-value-of-32-bytes-or-more").unwrap();
        let s = format!("{a:?}");
        assert!(!s.contains("super-secret"), "{s}");
        assert!(s.contains("redacted"));
    }
}
