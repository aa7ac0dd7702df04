//! Authentication core: roles, access tokens (HS256 JWT) and the `AuthMember` extractor.
//!
//! Checking a token costs no I/O: the signature and expiry are checked in memory, and the claims (member, role,
//! `token_version`) are trusted unless the member's credentials changed recently. Logout-all and password
//! changes bump `members.token_version`, role changes update `members.role`, and a trigger stamps
//! `auth_changed_at`. `MemberCache` holds only members changed within one access-token lifetime (older tokens
//! have expired anyway): this instance marks a member it changes at once (`evict`, then one lookup), and
//! `poll_changes` learns of changes made by other instances within `AUTH_POLL_INTERVAL`.

use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use dashmap::DashMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::ApiError;
use crate::AppState;

/// How often an instance reads credential changes made elsewhere.
pub const AUTH_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Changes are re-read with this overlap, so a transaction that committed late is not missed.
const AUTH_POLL_OVERLAP: Duration = Duration::from_secs(5);
/// Bound on remembered changes; past it the oldest half is dropped after a full reload.
const CHANGED_ENTRIES_MAX: usize = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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

    /// A role as a client writes it; `None` for anything else.
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "customer" => Some(Role::Customer),
            "seller" => Some(Role::Seller),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// A role as `members.role` stores it. An unknown one is a fault of ours (500, logged), never quietly taken
    /// for some other role.
    pub fn from_db(text: &str) -> Result<Role, ApiError> {
        Role::parse(text)
            .ok_or_else(|| ApiError::internal(anyhow::anyhow!("unknown role {text:?} in members")))
    }
}

/// What an access token asserts.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
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
    /// Names these keys in each thread's cache of verified tokens (`VERIFIED`), so keys with another secret (tests
    /// run several apps in one process) never take each other's entries.
    id: u64,
}

/// Most verified tokens each worker thread remembers.
const VERIFIED_TOKENS_MAX: usize = 100_000;

/// A thread's verified tokens: token -> (id of the keys that checked it, its claims).
type VerifiedTokens = std::collections::HashMap<Box<str>, (u64, Claims), rustc_hash::FxBuildHasher>;

thread_local! {
    /// Tokens whose signature this thread checked: a buyer sends the same token with every request of a drop, and
    /// checking it again (base64, HMAC-SHA256, JSON) was the largest part of a refused reservation. Keyed by the
    /// whole token, so only a byte-for-byte copy of a verified token hits; expiry is still checked on every use.
    /// Per thread, so two cores never share its cache lines; bounded: cleared when full.
    static VERIFIED: std::cell::RefCell<VerifiedTokens> = std::cell::RefCell::default();
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
            id: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
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
        let cached = VERIFIED.with(|verified| {
            verified
                .borrow()
                .get(token)
                .filter(|(keys, _)| *keys == self.id)
                .map(|(_, claims)| *claims)
        });
        if let Some(claims) = cached {
            if claims.exp > Utc::now().timestamp() {
                return Ok(claims);
            }
            return Err(ApiError::unauthorized(
                "token_expired",
                "access token expired",
            ));
        }
        let claims = self.verify_signature(token)?;
        VERIFIED.with(|verified| {
            let mut verified = verified.borrow_mut();
            if verified.len() >= VERIFIED_TOKENS_MAX {
                verified.clear();
            }
            verified.insert(token.into(), (self.id, claims));
        });
        Ok(claims)
    }

    fn verify_signature(&self, token: &str) -> Result<Claims, ApiError> {
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
enum Known {
    /// The member's current version and role, as last read.
    Current {
        version: i32,
        role: Role,
        changed_at: DateTime<Utc>,
    },
    /// Changed by this instance just now; read it again before trusting any token.
    Stale,
}

/// Members whose credentials changed within one access-token lifetime; see the module comment.
#[derive(Debug, Default)]
pub struct MemberCache {
    /// Fx-hashed: member ids are made by the service, and every authenticated request looks one up.
    changed: DashMap<Uuid, Known, rustc_hash::FxBuildHasher>,
    /// Where the next poll starts: the newest `auth_changed_at` seen.
    poll_since: parking_lot::Mutex<Option<DateTime<Utc>>>,
}

impl MemberCache {
    /// Call after changing a member's token_version or role, so this instance sees it on the next request.
    pub fn evict(&self, member: Uuid) {
        self.changed.insert(member, Known::Stale);
    }

    /// Version and role to check a token against: from the token itself unless the member changed.
    async fn current(
        &self,
        state: &AppState,
        claims: &Claims,
    ) -> Result<Option<(i32, Role)>, ApiError> {
        match self.changed.get(&claims.sub).map(|known| *known) {
            None => Ok(Some((claims.ver, claims.role))),
            Some(Known::Current { version, role, .. }) => Ok(Some((version, role))),
            Some(Known::Stale) => {
                let client = state.db.get().await?;
                let row = client
                    .query_opt(
                        "SELECT token_version, role, auth_changed_at FROM members WHERE id = $1",
                        &[&claims.sub],
                    )
                    .await?;
                let Some(row) = row else {
                    return Ok(None);
                };
                let version: i32 = row.get(0);
                let role = Role::from_db(row.get(1))?;
                let changed_at: DateTime<Utc> = row.get(2);
                self.changed.insert(
                    claims.sub,
                    Known::Current {
                        version,
                        role,
                        changed_at,
                    },
                );
                Ok(Some((version, role)))
            }
        }
    }

    /// Reads credential changes since the last poll (at start: within one access-token lifetime) and forgets
    /// changes older than that lifetime. Returns how many changes were read.
    pub async fn poll_changes(
        &self,
        db: &deadpool_postgres::Pool,
        token_seconds: u64,
    ) -> Result<usize, ApiError> {
        let lifetime =
            chrono::Duration::seconds(i64::try_from(token_seconds).unwrap_or(i64::MAX / 4_000));
        let overlap = chrono::Duration::from_std(AUTH_POLL_OVERLAP).unwrap_or_default();
        let since = self
            .poll_since
            .lock()
            .map_or_else(|| Utc::now() - lifetime, |since| since - overlap);
        let client = db.get().await?;
        let rows = client
            .query(
                "SELECT id, token_version, role, auth_changed_at FROM members WHERE auth_changed_at > $1",
                &[&since],
            )
            .await?;
        let mut newest = since;
        for row in &rows {
            let changed_at: DateTime<Utc> = row.get(3);
            newest = newest.max(changed_at);
            let known = Known::Current {
                version: row.get(1),
                role: Role::from_db(row.get(2))?,
                changed_at,
            };
            self.changed.insert(row.get(0), known);
        }
        {
            let mut since = self.poll_since.lock();
            *since = Some(since.map_or(newest, |old| old.max(newest)));
        }
        let horizon = Utc::now() - lifetime;
        self.changed.retain(|_, known| match known {
            Known::Current { changed_at, .. } => *changed_at > horizon,
            Known::Stale => true,
        });
        if self.changed.len() > CHANGED_ENTRIES_MAX {
            tracing::warn!(
                entries = self.changed.len(),
                "credential-change cache over its bound; resetting"
            );
            self.changed.clear();
            *self.poll_since.lock() = None;
        }
        Ok(rows.len())
    }
}

/// Polls credential changes every `AUTH_POLL_INTERVAL` until the process ends.
pub async fn poll_changes_forever(state: AppState) {
    let mut ticker = tokio::time::interval(AUTH_POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Err(err) = state
            .members
            .poll_changes(&state.db, state.settings.access_token_seconds)
            .await
        {
            tracing::warn!(code = err.code(), "polling credential changes failed");
        }
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
        Self::from_headers(&parts.headers, state).await
    }
}

impl AuthMember {
    /// The member a request's bearer token names, checked as every route checks it (the hot path calls it before
    /// routing).
    pub async fn from_headers(headers: &HeaderMap, state: &AppState) -> Result<Self, ApiError> {
        let token = headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| ApiError::unauthorized("unauthorized", "missing bearer token"))?;
        let claims = state.tokens.verify(token.trim())?;
        let (version, role) = state
            .members
            .current(state, &claims)
            .await?
            .ok_or_else(|| ApiError::unauthorized("invalid_token", "member no longer exists"))?;
        if version != claims.ver {
            return Err(ApiError::unauthorized(
                "token_revoked",
                "access token revoked",
            ));
        }
        Ok(AuthMember {
            id: claims.sub,
            role,
        })
    }
}

/// Hashes a password with argon2id (default parameters) off the async threads, within the process's hashing bound
/// (`abuse::hashing`): it is deliberately slow.
pub async fn hash_password(password: String) -> Result<String, ApiError> {
    crate::abuse::hashing()
        .run(move || {
            use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
            let salt = SaltString::generate(&mut OsRng);
            argon2::Argon2::default()
                .hash_password(password.as_bytes(), &salt)
                .map(|hash| hash.to_string())
                .map_err(|err| ApiError::internal(anyhow::anyhow!("hashing password: {err}")))
        })
        .await?
}

/// Checks a password against a stored argon2 hash, off the async threads.
pub async fn verify_password(password: String, hash: String) -> Result<bool, ApiError> {
    crate::abuse::hashing()
        .run(move || {
            use argon2::password_hash::{PasswordHash, PasswordVerifier};
            let Ok(parsed) = PasswordHash::new(&hash) else {
                return false;
            };
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .await
}

/// The caller when a bearer token came: none is anonymous, a bad one is 401 as on any route.
#[derive(Debug, Clone, Copy)]
pub struct MaybeMember(pub Option<AuthMember>);

impl FromRequestParts<AppState> for MaybeMember {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if !parts.headers.contains_key(AUTHORIZATION) {
            return Ok(Self(None));
        }
        AuthMember::from_request_parts(parts, state)
            .await
            .map(|member| Self(Some(member)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_role_reads_back_as_itself_and_an_unknown_one_is_an_error_not_a_customer() {
        for role in [Role::Customer, Role::Seller, Role::Admin] {
            assert_eq!(Role::from_db(role.as_str()).ok(), Some(role));
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        let err = Role::from_db("superuser").expect_err("unknown role");
        assert_eq!(err.status(), axum::http::StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(Role::parse("Admin"), None);
    }

    /// The per-thread cache of verified tokens never outlives a token's expiry, and never serves one key's token
    /// to another key.
    #[test]
    fn a_cached_token_still_expires_and_belongs_to_its_keys() {
        let keys = TokenKeys::new(b"first secret", 1);
        let member = Uuid::now_v7();
        let token = keys.issue(member, Role::Customer, 3).unwrap();
        assert_eq!(keys.verify(&token).unwrap().sub, member);
        // Cached now: the second check takes the cache's answer.
        assert_eq!(keys.verify(&token).unwrap().ver, 3);
        let other = TokenKeys::new(b"second secret", 1);
        assert_eq!(other.verify(&token).unwrap_err().code(), "invalid_token");
        std::thread::sleep(Duration::from_millis(2100));
        assert_eq!(keys.verify(&token).unwrap_err().code(), "token_expired");
    }
}
