//! Authentication core: roles, access tokens (HS256 JWT) and the `AuthMember` extractor.
//!
//! Access tokens carry the member's `token_version`; logout-all and password changes bump it in Postgres, which
//! kills every earlier token. Checking that on every request must not cost a query on the hot path, so a small
//! per-member cache (`MemberCache`) holds the current version and role for `MEMBER_CACHE_TTL`, and this instance
//! evicts an entry the moment it changes it. Other instances see a change within the TTL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use chrono::Utc;
use dashmap::DashMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::ApiError;
use crate::AppState;

/// How long a cached version/role may be served before it is read again from Postgres.
const MEMBER_CACHE_TTL: Duration = Duration::from_secs(5);
/// Bound on cached members; past it the cache is cleared (entries are cheap to refetch).
const MEMBER_CACHE_ENTRIES_MAX: usize = 200_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Customer,
    Seller,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Seller => "seller",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "customer" => Some(Role::Customer),
            "seller" => Some(Role::Seller),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// What an access token asserts.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// Member id.
    pub sub: Uuid,
    /// Role at issue time (the current role is read from the member cache).
    pub role: Role,
    /// The member's token_version at issue time.
    pub ver: i32,
    pub iat: i64,
    pub exp: i64,
}

/// Signing keys and token lifetime.
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    pub access_token_seconds: u64,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys").finish_non_exhaustive()
    }
}

impl TokenKeys {
    pub fn new(secret: &[u8], access_token_seconds: u64) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            access_token_seconds,
        }
    }

    pub fn issue(&self, member: Uuid, role: Role, version: i32) -> Result<String, ApiError> {
        let now = Utc::now().timestamp();
        let claims = Claims {
            sub: member,
            role,
            ver: version,
            iat: now,
            exp: now + i64::try_from(self.access_token_seconds).unwrap_or(i64::MAX / 2),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(ApiError::internal)
    }

    fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(|err| match err.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    ApiError::unauthorized("token_expired", "access token expired")
                }
                _ => ApiError::unauthorized("invalid_token", "invalid access token"),
            })
    }
}

#[derive(Debug, Clone, Copy)]
struct CachedMember {
    version: i32,
    role: Role,
    fetched_at: Instant,
}

/// Current token_version and role per member; see the module comment.
#[derive(Debug, Default)]
pub struct MemberCache {
    entries: DashMap<Uuid, CachedMember>,
}

impl MemberCache {
    /// Forget a member after changing its version or role, so this instance sees the change at once.
    pub fn evict(&self, member: Uuid) {
        self.entries.remove(&member);
    }

    async fn lookup(
        &self,
        state: &AppState,
        member: Uuid,
    ) -> Result<Option<CachedMember>, ApiError> {
        if let Some(hit) = self.entries.get(&member) {
            if hit.fetched_at.elapsed() < MEMBER_CACHE_TTL {
                return Ok(Some(*hit));
            }
        }
        let client = state.db.get().await?;
        let row = client
            .query_opt(
                "SELECT token_version, role FROM members WHERE id = $1",
                &[&member],
            )
            .await?;
        let Some(row) = row else {
            self.entries.remove(&member);
            return Ok(None);
        };
        let role: String = row.get(1);
        let fresh = CachedMember {
            version: row.get(0),
            role: Role::parse(&role).unwrap_or(Role::Customer),
            fetched_at: Instant::now(),
        };
        if self.entries.len() >= MEMBER_CACHE_ENTRIES_MAX {
            self.entries.clear();
        }
        self.entries.insert(member, fresh);
        Ok(Some(fresh))
    }
}

/// The authenticated caller. Extracting it answers 401 for a missing, invalid, expired or revoked token.
#[derive(Debug, Clone, Copy)]
pub struct AuthMember {
    pub id: Uuid,
    pub role: Role,
}

impl AuthMember {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// 403 unless the caller has one of `roles`.
    pub fn require(&self, roles: &[Role]) -> Result<(), ApiError> {
        if roles.contains(&self.role) {
            Ok(())
        } else {
            Err(ApiError::forbidden())
        }
    }

    /// 403 unless the caller owns the resource or is an admin.
    pub fn require_owner_or_admin(&self, owner: Uuid) -> Result<(), ApiError> {
        if self.id == owner || self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::forbidden())
        }
    }
}

impl FromRequestParts<AppState> for AuthMember {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| ApiError::unauthorized("unauthorized", "missing bearer token"))?;
        let claims = state.tokens.verify(token.trim())?;
        let current = state
            .members
            .lookup(state, claims.sub)
            .await?
            .ok_or_else(|| ApiError::unauthorized("invalid_token", "member no longer exists"))?;
        if current.version != claims.ver {
            return Err(ApiError::unauthorized(
                "token_revoked",
                "access token revoked",
            ));
        }
        Ok(AuthMember {
            id: claims.sub,
            role: current.role,
        })
    }
}

/// Hashes a password with argon2id (default parameters) off the async threads: it is deliberately slow.
pub async fn hash_password(password: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || {
        use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
        let salt = SaltString::generate(&mut OsRng);
        argon2::Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(|err| ApiError::internal(anyhow::anyhow!("hashing password: {err}")))
    })
    .await
    .map_err(ApiError::internal)?
}

/// Checks a password against a stored argon2 hash, off the async threads.
pub async fn verify_password(password: String, hash: String) -> Result<bool, ApiError> {
    tokio::task::spawn_blocking(move || {
        use argon2::password_hash::{PasswordHash, PasswordVerifier};
        let Ok(parsed) = PasswordHash::new(&hash) else {
            return false;
        };
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
    .await
    .map_err(ApiError::internal)
}

/// Shared so handlers can clone it cheaply.
pub type SharedTokenKeys = Arc<TokenKeys>;
