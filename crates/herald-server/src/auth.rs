//! Credentials in, a [`Principal`] out.
//!
//! `Authorization: Bearer X` (or `?token=X`, for `EventSource` and iframes,
//! which cannot set headers) carries either an API key — full access, for
//! backends — or a JWT minted by the application for a user: HS256 with the
//! configured secret, or RS256/ES256 with the configured public key. `exp` is
//! required and, like `nbf`, enforced with the configured leeway; `sub` must be
//! one valid channel segment; `channels` and `publish` are filter lists;
//! `aud` and `iss` must be `[auth] audience` and `issuer` when those are set.
//!
//! An API key is accepted only from the `Authorization` header: query strings
//! end up in proxy and browser logs, so a key sent as `?token=` is refused
//! (`api_key_in_query`) with a message saying where keys go.
//!
//! With nothing configured the server is in open development mode: requests
//! without credentials act as an API key would, and a random per-process secret
//! lets `GET /api/dev/token` mint user tokens so the demos can show real
//! per-user isolation. Tokens and keys never reach the logs.

use std::{sync::Arc, time::Duration};

use axum::http::{HeaderMap, StatusCode, header};
use herald_core::{Filter, Grant, Principal, channel::validate_segment};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

use crate::{
    config::{AuthConfig, ConfigError},
    edge::error::ApiError,
    edge::query::Query,
};

pub struct Auth {
    open: bool,
    api_keys: Vec<String>,
    /// HS256: the configured secret, or the per-process one in open mode.
    secret: Option<Vec<u8>>,
    public_key: Option<(DecodingKey, Algorithm)>,
    leeway: u64,
    /// `[auth] audience` and `issuer`, when set.
    audience: Option<String>,
    issuer: Option<String>,
    /// Shared by every admin connection: one allocation, not one each.
    admin: Arc<Principal>,
}

/// The claims Herald reads from, and writes into, a user token.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: serde_json::Value,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(default)]
    pub channels: Vec<String>,
    #[serde(default)]
    pub publish: Vec<String>,
    /// Checked against `[auth] audience` when that is set (one or a list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

fn unauthorized(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, code, message)
}

pub fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

impl Auth {
    pub fn from_config(cfg: &AuthConfig) -> Result<Self, ConfigError> {
        let open = cfg.is_open();
        let secret = if open {
            Some(random_secret().map_err(|e| ConfigError::Invalid(format!("no randomness for the dev secret: {e}")))?)
        } else {
            (!cfg.jwt_secret.is_empty()).then(|| cfg.jwt_secret.as_bytes().to_vec())
        };
        let public_key = if cfg.jwt_public_key.is_empty() { None } else { Some(load_public_key(&cfg.jwt_public_key)?) };
        Ok(Auth {
            open,
            api_keys: cfg.api_keys.clone(),
            secret,
            public_key,
            leeway: cfg.leeway.as_secs(),
            audience: Some(cfg.audience.trim().to_owned()).filter(|a| !a.is_empty()),
            issuer: Some(cfg.issuer.trim().to_owned()).filter(|i| !i.is_empty()),
            admin: Arc::new(Principal::Admin),
        })
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// The principal behind a request.
    pub(crate) fn authenticate(&self, headers: &HeaderMap, query: &Query) -> Result<Arc<Principal>, ApiError> {
        self.authenticate_bearer(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()), query)
    }

    /// The principal behind an `Authorization` header's value, else
    /// `?token=`; an API key in the query is refused.
    pub(crate) fn authenticate_bearer(
        &self,
        authorization: Option<&str>,
        query: &Query,
    ) -> Result<Arc<Principal>, ApiError> {
        let credential = bearer(authorization, query);
        if let Some(c) = credential
            && header_token(authorization).is_none()
            && self.is_api_key(c)
        {
            return Err(unauthorized(
                "api_key_in_query",
                "API keys are accepted only in the Authorization header (Authorization: Bearer KEY): a query \
                 string ends up in proxy and browser logs. ?token= is for user tokens; consider this key exposed.",
            ));
        }
        self.authenticate_credential(credential)
    }

    fn is_api_key(&self, credential: &str) -> bool {
        self.api_keys.iter().any(|k| constant_time_eq(k.as_bytes(), credential.as_bytes()))
    }

    /// The principal behind a credential found by [`credential`] or [`bearer`].
    pub(crate) fn authenticate_credential(&self, credential: Option<&str>) -> Result<Arc<Principal>, ApiError> {
        match self.principal(credential)? {
            Principal::Admin => Ok(self.admin.clone()),
            user => Ok(Arc::new(user)),
        }
    }

    /// The principal for a credential (or none), for every transport.
    pub fn principal(&self, credential: Option<&str>) -> Result<Principal, ApiError> {
        let Some(cred) = credential else {
            return if self.open {
                Ok(Principal::Admin)
            } else {
                Err(unauthorized("missing_token", "send an API key or a token: Authorization: Bearer ..., or ?token="))
            };
        };
        if self.is_api_key(cred) {
            return Ok(Principal::Admin);
        }
        self.verify(cred).map(Principal::User)
    }

    fn verify(&self, token: &str) -> Result<Grant, ApiError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| unauthorized("invalid_token", "not an API key, and not a well-formed JWT"))?;
        let key = match (header.alg, &self.secret, &self.public_key) {
            (Algorithm::HS256, Some(secret), _) => DecodingKey::from_secret(secret),
            (alg, _, Some((key, expected))) if alg == *expected => key.clone(),
            (alg, _, _) => {
                return Err(unauthorized("invalid_token", format!("algorithm {alg:?} is not accepted here")));
            }
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => unauthorized("token_expired", "the token has expired; get a new one"),
            ErrorKind::ImmatureSignature => unauthorized("token_not_yet_valid", "the token is not valid yet (nbf)"),
            ErrorKind::InvalidSignature => unauthorized("invalid_token", "the token's signature does not verify"),
            ErrorKind::MissingRequiredClaim(c) => unauthorized("invalid_token", format!("the token has no '{c}'")),
            ErrorKind::InvalidAudience => {
                unauthorized("invalid_token", "the token's audience ('aud') is not this server's ([auth] audience)")
            }
            ErrorKind::InvalidIssuer => {
                unauthorized("invalid_token", "the token's issuer ('iss') is not the one configured ([auth] issuer)")
            }
            _ => unauthorized("invalid_token", format!("the token is not valid: {e}")),
        })?;
        let claims = data.claims;
        let sub = claims
            .sub
            .as_str()
            .filter(|s| validate_segment(s).is_ok() && herald_core::inbox::user_channel(s).is_some())
            .ok_or_else(|| {
                unauthorized("invalid_token", "'sub' must be a string that is one channel segment (not '.' or '..')")
            })?;
        let filters = |list: &[String], what: &str| {
            list.iter()
                .map(|p| {
                    Filter::parse(p).map_err(|e| unauthorized("invalid_token", format!("'{what}' pattern '{p}': {e}")))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Grant {
            sub: sub.to_owned(),
            subscribe: filters(&claims.channels, "channels")?,
            publish: filters(&claims.publish, "publish")?,
            // When the server stops admitting the token: validation refuses
            // it once `exp < now - leeway` in whole seconds, so from the
            // second after exp + leeway. A stream closed any earlier would be
            // reopened with the same token and closed again at once.
            expires_at: Some(claims.exp.saturating_add(self.leeway as i64 + 1).saturating_mul(1000)),
        })
    }

    /// Mints an HS256 user token with this server's secret (the configured one,
    /// or the per-process one in open mode).
    pub fn mint(&self, sub: &str, channels: &[String], publish: &[String], ttl: Duration) -> Result<String, ApiError> {
        let secret = self.secret.as_ref().ok_or_else(|| {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no HS256 secret is configured to mint tokens with")
        })?;
        let stamp = Stamp { audience: self.audience.as_deref(), issuer: self.issuer.as_deref() };
        mint_with(secret, sub, channels, publish, ttl, stamp)
    }
}

/// The longest lifetime a minted token may have.
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 86_400);

/// Signs a user token with an HS256 secret.
pub fn mint(
    secret: &[u8],
    sub: &str,
    channels: &[String],
    publish: &[String],
    ttl: Duration,
) -> Result<String, ApiError> {
    mint_with(secret, sub, channels, publish, ttl, Stamp::default())
}

/// The `aud` and `iss` a minted token carries (a server checking them
/// accepts only tokens that do).
#[derive(Debug, Clone, Copy, Default)]
pub struct Stamp<'a> {
    pub audience: Option<&'a str>,
    pub issuer: Option<&'a str>,
}

impl<'a> Stamp<'a> {
    /// The audience and issuer `[auth]` configures.
    pub fn of(cfg: &'a AuthConfig) -> Self {
        let set = |s: &'a str| Some(s.trim()).filter(|s| !s.is_empty());
        Stamp { audience: set(&cfg.audience), issuer: set(&cfg.issuer) }
    }
}

/// [`mint`], stamped with an audience and an issuer.
pub fn mint_with(
    secret: &[u8],
    sub: &str,
    channels: &[String],
    publish: &[String],
    ttl: Duration,
    stamp: Stamp<'_>,
) -> Result<String, ApiError> {
    validate_segment(sub).map_err(|e| ApiError::bad_request("invalid_user", format!("sub: {e}")))?;
    if ttl > MAX_TTL {
        // Past this, `exp` overflowed into the past: a token born expired.
        return Err(ApiError::bad_request("invalid_parameter", "a token lives at most 10 years (ttl)"));
    }
    for p in channels.iter().chain(publish) {
        Filter::parse(p)?;
    }
    let now = herald_store::now_ms() / 1000;
    let claims = Claims {
        sub: sub.into(),
        exp: now + ttl.as_secs().max(1) as i64,
        nbf: None,
        iat: Some(now),
        channels: channels.to_vec(),
        publish: publish.to_vec(),
        aud: stamp.audience.map(Into::into),
        iss: stamp.issuer.map(str::to_owned),
    };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

/// The credential of a request: the bearer token, else `?token=`.
pub(crate) fn credential<'a>(headers: &'a HeaderMap, query: &'a Query) -> Option<&'a str> {
    bearer(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()), query)
}

/// The credential from an `Authorization` header's value, else `?token=`.
pub(crate) fn bearer<'a>(authorization: Option<&'a str>, query: &'a Query) -> Option<&'a str> {
    header_token(authorization).or_else(|| query.get("token")).filter(|t| !t.is_empty())
}

/// The token of a `Bearer` `Authorization` header.
fn header_token(authorization: Option<&str>) -> Option<&str> {
    authorization
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .filter(|t| !t.is_empty())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_secret() -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = vec![0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

/// PEM text or a path to it; RSA keys verify RS256, EC keys ES256.
fn load_public_key(text_or_path: &str) -> Result<(DecodingKey, Algorithm), ConfigError> {
    let pem = if text_or_path.contains("-----BEGIN") {
        text_or_path.to_owned()
    } else {
        std::fs::read_to_string(text_or_path)
            .map_err(|e| ConfigError::Invalid(format!("[auth] jwt_public_key: {text_or_path}: {e}")))?
    };
    if let Ok(k) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
        return Ok((k, Algorithm::RS256));
    }
    if let Ok(k) = DecodingKey::from_ec_pem(pem.as_bytes()) {
        return Ok((k, Algorithm::ES256));
    }
    Err(ConfigError::Invalid("[auth] jwt_public_key is neither an RSA nor an EC public key in PEM".into()))
}
