//! Sessions: login, refresh-token rotation with reuse detection, logout and logout-all (`/api/v1/auth/*`).
//!
//! A refresh token is 32 random bytes (hex on the wire) that the server keeps only as a SHA-256 hash, so a copy of
//! the table cannot be replayed. Each login starts a *family*; each refresh marks the presented token used and
//! issues its successor in the same family, in one transaction that locks the presented row, so two concurrent
//! refreshes of one token cannot both succeed. A used or revoked token presented again means someone else holds
//! a copy: the whole family is revoked and the caller gets 401 `token_reused`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Json;
use deadpool_postgres::GenericClient;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use uuid::Uuid;

use crate::abuse::ClientAddr;
use crate::auth::{self, AuthMember, Role};
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::AppState;

/// Random bytes in a refresh token: 256 bits cannot be guessed or enumerated.
const REFRESH_TOKEN_BYTES: usize = 32;

/// This module's part of the OpenAPI document (`crate::openapi`): every handler the router names.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(login_handler, refresh_handler, logout_handler, logout_all_handler),
    tags((name = "auth", description = "Sessions: access tokens and rotating refresh tokens"))
)]
pub struct Doc;

pub fn router() -> crate::Routes {
    crate::Routes::new()
        .route(api!("/auth/login"), post(login_handler))
        .route(api!("/auth/refresh"), post(refresh_handler))
        .route(api!("/auth/logout"), post(logout_handler))
        .route(api!("/auth/logout-all"), post(logout_all_handler))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct LoginBody {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct RefreshBody {
    pub refresh_token: String,
}

/// The answer to login and refresh.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TokenPair {
    pub access_token: String,
    pub refresh_token: String,
    /// Always `Bearer`.
    #[schema(value_type = String, example = "Bearer")]
    pub token_type: &'static str,
    /// Lifetime of the access token.
    pub expires_in: u64,
}

/// Signs in: a new access token and a new refresh-token family.
#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = LoginBody,
    responses((status = 200, description = "The tokens", body = TokenPair),
        (status = 401, description = "`invalid_credentials`", body = crate::error::ErrorBody),
        (status = 429, description = "`too_many_attempts` (failed logins of this account or address; see \
`Retry-After`) or `overloaded` (too many passwords being checked)", body = crate::error::ErrorBody)))]
async fn login_handler(
    State(state): State<AppState>,
    ClientAddr(address): ClientAddr,
    ApiJson(body): ApiJson<LoginBody>,
) -> Result<Json<TokenPair>, ApiError> {
    let email = body.email.trim().to_lowercase();
    // Refused before any hashing: a locked account or address costs the server nothing.
    state.login_limiter.check(&email, address)?;
    match login(&state, &email, body.password).await {
        Ok(pair) => {
            state.login_limiter.succeeded(&email);
            Ok(Json(pair))
        }
        Err(err) => {
            if err.code() == "invalid_credentials" {
                state.login_limiter.failed(&email, address);
            }
            Err(err)
        }
    }
}

/// Trades a refresh token for a new pair; the old one is dead, and presenting a dead one revokes its family.
#[utoipa::path(post, path = "/api/v1/auth/refresh", tag = "auth", request_body = RefreshBody,
    responses((status = 200, description = "The new tokens", body = TokenPair),
        (status = 401, description = "`invalid_refresh_token`, `token_reused` or `refresh_token_expired`",
            body = crate::error::ErrorBody)))]
async fn refresh_handler(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RefreshBody>,
) -> Result<Json<TokenPair>, ApiError> {
    refresh(&state, &body.refresh_token).await.map(Json)
}

/// Ends the session (the refresh token's family).
#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth", request_body = RefreshBody,
    responses((status = 204, description = "Signed out (also for an unknown token)")))]
async fn logout_handler(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RefreshBody>,
) -> Result<StatusCode, ApiError> {
    logout(&state, &body.refresh_token).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Ends every session of the member; access tokens issued before stop working.
#[utoipa::path(post, path = "/api/v1/auth/logout-all", tag = "auth", security(("bearer" = [])),
    responses((status = 204, description = "Signed out everywhere")))]
async fn logout_all_handler(
    State(state): State<AppState>,
    caller: AuthMember,
) -> Result<StatusCode, ApiError> {
    logout_all(&state, caller.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn invalid_credentials() -> ApiError {
    ApiError::unauthorized("invalid_credentials", "wrong email or password")
}

/// A hash to verify against when the email is unknown, so both failures cost one argon2 verification and
/// answer in about the same time (no probing which emails have accounts).
async fn dummy_password_hash() -> Result<String, ApiError> {
    static DUMMY: OnceCell<String> = OnceCell::const_new();
    DUMMY
        .get_or_try_init(|| auth::hash_password("no member has this password".to_owned()))
        .await
        .cloned()
}

/// Checks email and password, then starts a new refresh-token family.
pub async fn login(state: &AppState, email: &str, password: String) -> Result<TokenPair, ApiError> {
    let email = email.trim().to_lowercase();
    // The connection goes back to the pool while argon2 runs: hashing is slow on purpose.
    let found = {
        let client = state.db.get().await?;
        client
            .query_opt(
                "SELECT id, password_hash, role, token_version FROM members WHERE email = $1",
                &[&email],
            )
            .await?
    };
    let hash = match &found {
        Some(row) => row.get(1),
        None => dummy_password_hash().await?,
    };
    let verified = auth::verify_password(password, hash).await?;
    let row = match found {
        Some(row) if verified => row,
        _ => return Err(invalid_credentials()),
    };
    let member: Uuid = row.get(0);
    let role = Role::from_db(row.get(2))?;
    let client = state.db.get().await?;
    issue(&client, state, member, role, row.get(3), Uuid::now_v7()).await
}

/// Rotates a refresh token: the presented one becomes used, its successor in the same family is returned.
pub async fn refresh(state: &AppState, token: &str) -> Result<TokenPair, ApiError> {
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    // FOR UPDATE serialises refreshes of one token: a second one waits here, then sees `used_at` set.
    let row = tx
        .query_opt(
            "SELECT r.id, r.family_id, r.member_id,
                    r.used_at IS NOT NULL OR r.revoked_at IS NOT NULL AS dead,
                    r.expires_at <= now() AS expired,
                    m.role, m.token_version
             FROM refresh_tokens r JOIN members m ON m.id = r.member_id
             WHERE r.token_hash = $1
             FOR UPDATE OF r",
            &[&hash_token(token)],
        )
        .await?
        .ok_or_else(|| ApiError::unauthorized("invalid_refresh_token", "unknown refresh token"))?;
    let (id, family, member): (Uuid, Uuid, Uuid) = (row.get(0), row.get(1), row.get(2));
    let (dead, expired): (bool, bool) = (row.get(3), row.get(4));
    if dead {
        revoke_family(&tx, family).await?;
        tx.commit().await?;
        return Err(ApiError::unauthorized(
            "token_reused",
            "this refresh token was already used; the session has been revoked",
        ));
    }
    if expired {
        return Err(ApiError::unauthorized(
            "refresh_token_expired",
            "refresh token expired; log in again",
        ));
    }
    tx.execute(
        "UPDATE refresh_tokens SET used_at = now() WHERE id = $1",
        &[&id],
    )
    .await?;
    let pair = issue(
        &tx,
        state,
        member,
        Role::from_db(row.get(5))?,
        row.get(6),
        family,
    )
    .await?;
    tx.commit().await?;
    Ok(pair)
}

/// Revokes the family of `token`. Unknown tokens are fine: logging out twice is not an error.
pub async fn logout(state: &AppState, token: &str) -> Result<(), ApiError> {
    let client = state.db.get().await?;
    client
        .execute(
            "UPDATE refresh_tokens SET revoked_at = now()
             WHERE revoked_at IS NULL
               AND family_id = (SELECT family_id FROM refresh_tokens WHERE token_hash = $1)",
            &[&hash_token(token)],
        )
        .await?;
    Ok(())
}

/// Revokes every refresh token of `member` and kills its access tokens (see `end_all_sessions`).
pub async fn logout_all(state: &AppState, member: Uuid) -> Result<(), ApiError> {
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    end_all_sessions(&tx, member).await?;
    tx.commit().await?;
    state.members.evict(member);
    Ok(())
}

/// Inside the caller's transaction: revokes all refresh tokens of `member` and bumps its `token_version`, so
/// every access token issued before fails. The caller evicts the member cache entry after committing.
pub async fn end_all_sessions(client: &impl GenericClient, member: Uuid) -> Result<(), ApiError> {
    client
        .execute(
            "UPDATE refresh_tokens SET revoked_at = now() WHERE member_id = $1 AND revoked_at IS NULL",
            &[&member],
        )
        .await?;
    client
        .execute(
            "UPDATE members SET token_version = token_version + 1, updated_at = now() WHERE id = $1",
            &[&member],
        )
        .await?;
    Ok(())
}

async fn revoke_family(client: &impl GenericClient, family: Uuid) -> Result<(), ApiError> {
    client
        .execute(
            "UPDATE refresh_tokens SET revoked_at = now() WHERE family_id = $1 AND revoked_at IS NULL",
            &[&family],
        )
        .await?;
    Ok(())
}

/// Stores a fresh refresh token of `family` and signs an access token for `member`.
async fn issue(
    client: &impl GenericClient,
    state: &AppState,
    member: Uuid,
    role: Role,
    token_version: i32,
    family: Uuid,
) -> Result<TokenPair, ApiError> {
    let mut bytes = [0u8; REFRESH_TOKEN_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let refresh_token = hex::encode(bytes);
    // Seconds as float8 for make_interval; the configured lifetime is far below where f64 loses precision.
    let lifetime_seconds = state.settings.refresh_token_seconds as f64;
    client
        .execute(
            "INSERT INTO refresh_tokens (id, token_hash, family_id, member_id, expires_at)
             VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))",
            &[
                &Uuid::now_v7(),
                &hash_token(&refresh_token),
                &family,
                &member,
                &lifetime_seconds,
            ],
        )
        .await?;
    Ok(TokenPair {
        access_token: state.tokens.issue(member, role, token_version)?,
        refresh_token,
        token_type: "Bearer",
        expires_in: state.tokens.access_token_seconds,
    })
}

fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}
