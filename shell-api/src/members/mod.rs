//! Members: signup, profile, password change and roles (`/api/v1/members/*`), and the `admin create` command.
//!
//! Emails are stored trimmed and lower-cased, so uniqueness (the `members_email_key` constraint, the only judge
//! of it) ignores case. The member JSON never carries the password hash or the token version.

pub mod sessions;

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::auth::{AuthMember, Role};
use crate::error::{ApiError, Fields, OnConstraint};
use crate::extract::{nullable, ApiJson, ApiPath};
use crate::{auth, db, AppState};
use clap::Args;

use crate::config::DbArgs;

pub const EMAIL_CHARS_MAX: usize = 254;
pub const NAME_CHARS_MAX: usize = 100;
pub const GREETING_CHARS_MAX: usize = 500;
pub const PASSWORD_CHARS_MIN: usize = 8;
/// Generous for pass phrases, yet bounds what argon2 is asked to chew.
pub const PASSWORD_CHARS_MAX: usize = 128;

const MEMBER_COLUMNS: &str = "id, email, name, greeting, role, created_at";

/// This module's part of the OpenAPI document (`crate::openapi`): every handler the router names.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(signup_handler, me_handler, update_me_handler, change_password_handler, set_role_handler),
    tags((name = "members", description = "Signup, profile, password and roles"))
)]
pub struct Doc;

pub fn router() -> crate::Routes {
    crate::Routes::new()
        .route(api!("/members"), post(signup_handler))
        .route(
            api!("/members/me"),
            get(me_handler).patch(update_me_handler),
        )
        .route(api!("/members/me/password"), put(change_password_handler))
        .route(api!("/members/{id}/role"), put(set_role_handler))
        .merge(sessions::router())
}

/// A member as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MemberBody {
    pub id: Uuid,
    pub email: String,
    pub name: String,
    pub greeting: Option<String>,
    pub role: Role,
    pub created_at: DateTime<Utc>,
}

impl MemberBody {
    /// From a row selected with `MEMBER_COLUMNS`.
    fn from_row(row: &Row) -> Result<Self, ApiError> {
        Ok(Self {
            id: row.get(0),
            email: row.get(1),
            name: row.get(2),
            greeting: row.get(3),
            role: Role::from_db(row.get(4))?,
            created_at: row.get(5),
        })
    }
}

/// Fields are optional here so that a missing one is reported by name (422 `fields.<name>`), like a bad one.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct SignupBody {
    #[schema(value_type = String, required = true, max_length = 254, example = "buyer@example.com")]
    pub email: Option<String>,
    /// 8 to 128 characters.
    #[schema(value_type = String, required = true, min_length = 8, max_length = 128)]
    pub password: Option<String>,
    #[schema(value_type = String, required = true, min_length = 1, max_length = 100)]
    pub name: Option<String>,
    #[schema(max_length = 500)]
    pub greeting: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct ProfilePatch {
    #[schema(value_type = String, min_length = 1, max_length = 100)]
    pub name: Option<String>,
    /// Absent: unchanged; `null` or blank: cleared.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, max_length = 500)]
    pub greeting: Option<Option<String>>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct PasswordChange {
    #[schema(value_type = String, required = true)]
    pub current_password: Option<String>,
    #[schema(value_type = String, required = true, min_length = 8, max_length = 128)]
    pub new_password: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct RoleChange {
    #[schema(value_type = Role, required = true)]
    pub role: Option<String>,
}

/// Signs up a new member (role `customer`).
#[utoipa::path(post, path = "/api/v1/members", tag = "members", request_body = SignupBody,
    responses(
        (status = 201, description = "The new member", body = MemberBody),
        (status = 409, description = "`email_taken`", body = crate::error::ErrorBody),
        (status = 422, description = "`validation`: a malformed email, a short password, a missing name",
            body = crate::error::ErrorBody),
        (status = 429, description = "`overloaded`: too many passwords being hashed", body = crate::error::ErrorBody),
    ))]
async fn signup_handler(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<SignupBody>,
) -> Result<(StatusCode, Json<MemberBody>), ApiError> {
    let member = signup(&state, body).await?;
    Ok((StatusCode::CREATED, Json(member)))
}

/// The signed-in member.
#[utoipa::path(get, path = "/api/v1/members/me", tag = "members", security(("bearer" = [])),
    responses((status = 200, description = "The member", body = MemberBody),
        (status = 404, description = "`member_not_found`: the member was deleted", body = crate::error::ErrorBody)))]
async fn me_handler(
    State(state): State<AppState>,
    caller: AuthMember,
) -> Result<Json<MemberBody>, ApiError> {
    find_member(&state, caller.id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("member_not_found"))
}

/// Changes the signed-in member's name or greeting.
#[utoipa::path(patch, path = "/api/v1/members/me", tag = "members", security(("bearer" = [])),
    request_body = ProfilePatch,
    responses((status = 200, description = "The member", body = MemberBody),
        (status = 404, description = "`member_not_found`", body = crate::error::ErrorBody)))]
async fn update_me_handler(
    State(state): State<AppState>,
    caller: AuthMember,
    ApiJson(patch): ApiJson<ProfilePatch>,
) -> Result<Json<MemberBody>, ApiError> {
    update_profile(&state, caller.id, patch).await.map(Json)
}

/// Changes the password; every session of the member ends (as logout-all).
#[utoipa::path(put, path = "/api/v1/members/me/password", tag = "members", security(("bearer" = [])),
    request_body = PasswordChange,
    responses((status = 204, description = "Changed; sign in again"),
        (status = 403, description = "`wrong_password`: the current password is wrong",
            body = crate::error::ErrorBody),
        (status = 404, description = "`member_not_found`", body = crate::error::ErrorBody),
        (status = 429, description = "`overloaded`: too many passwords being hashed", body = crate::error::ErrorBody)))]
async fn change_password_handler(
    State(state): State<AppState>,
    caller: AuthMember,
    ApiJson(body): ApiJson<PasswordChange>,
) -> Result<StatusCode, ApiError> {
    change_password(&state, caller.id, body).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sets a member's role (admin only).
#[utoipa::path(put, path = "/api/v1/members/{id}/role", tag = "members", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The member")), request_body = RoleChange,
    responses((status = 200, description = "The member with the new role", body = MemberBody),
        (status = 403, description = "`forbidden`: not an admin", body = crate::error::ErrorBody),
        (status = 404, description = "`member_not_found`", body = crate::error::ErrorBody)))]
async fn set_role_handler(
    State(state): State<AppState>,
    caller: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<RoleChange>,
) -> Result<Json<MemberBody>, ApiError> {
    caller.require(&[Role::Admin])?;
    set_role(&state, id, body).await.map(Json)
}

/// Creates a customer.
pub async fn signup(state: &AppState, body: SignupBody) -> Result<MemberBody, ApiError> {
    let mut fields = Fields::default();
    let email = required(
        &mut fields,
        "email",
        body.email.as_deref().map(normalize_email),
    );
    let password = required(&mut fields, "password", body.password.map(check_password));
    let name = required(&mut fields, "name", body.name.as_deref().map(check_name));
    let greeting = fields.take("greeting", check_greeting(body.greeting.as_deref()));
    let ((email, password), (name, greeting)) =
        fields.into_result(email.zip(password).zip(name.zip(greeting)))?;
    let hash = auth::hash_password(password).await?;
    let client = state.db.get().await?;
    let row = client
        .query_one(
            &format!(
                "INSERT INTO members (id, email, password_hash, name, greeting)
                 VALUES ($1, $2, $3, $4, $5) RETURNING {MEMBER_COLUMNS}"
            ),
            &[&Uuid::now_v7(), &email, &hash, &name, &greeting],
        )
        .await
        .on_constraint("members_email_key", || {
            ApiError::conflict("email_taken", "a member with this email already exists")
        })?;
    MemberBody::from_row(&row)
}

pub async fn find_member(state: &AppState, id: Uuid) -> Result<Option<MemberBody>, ApiError> {
    let client = state.db.get().await?;
    client
        .query_opt(
            &format!("SELECT {MEMBER_COLUMNS} FROM members WHERE id = $1"),
            &[&id],
        )
        .await?
        .as_ref()
        .map(MemberBody::from_row)
        .transpose()
}

/// Changes name and/or greeting; absent fields stay as they are.
pub async fn update_profile(
    state: &AppState,
    member: Uuid,
    patch: ProfilePatch,
) -> Result<MemberBody, ApiError> {
    let mut fields = Fields::default();
    let name = patch
        .name
        .as_deref()
        .map(check_name)
        .and_then(|checked| fields.take("name", checked));
    // Outer `None`: leave the greeting alone; `Some(None)`: clear it.
    let greeting = patch.greeting.map(|greeting| {
        fields
            .take("greeting", check_greeting(greeting.as_deref()))
            .flatten()
    });
    fields.finish()?;
    let set_greeting = greeting.is_some();
    let greeting = greeting.flatten();
    let client = state.db.get().await?;
    client
        .query_opt(
            &format!(
                "UPDATE members
                 SET name = COALESCE($2, name),
                     greeting = CASE WHEN $3 THEN $4 ELSE greeting END,
                     updated_at = now()
                 WHERE id = $1 RETURNING {MEMBER_COLUMNS}"
            ),
            &[&member, &name, &set_greeting, &greeting],
        )
        .await?
        .as_ref()
        .map(MemberBody::from_row)
        .transpose()?
        .ok_or_else(|| ApiError::not_found("member_not_found"))
}

/// Verifies the current password, stores the new one, and ends every session (like logout-all), so whoever
/// knew the old password is out.
pub async fn change_password(
    state: &AppState,
    member: Uuid,
    body: PasswordChange,
) -> Result<(), ApiError> {
    let mut fields = Fields::default();
    let current = required(
        &mut fields,
        "current_password",
        body.current_password.map(Ok),
    );
    let new = required(
        &mut fields,
        "new_password",
        body.new_password.map(check_password),
    );
    let (current, new) = fields.into_result(current.zip(new))?;
    let stored: String = {
        let client = state.db.get().await?;
        client
            .query_opt(
                "SELECT password_hash FROM members WHERE id = $1",
                &[&member],
            )
            .await?
            .ok_or_else(|| ApiError::not_found("member_not_found"))?
            .get(0)
    };
    // 403, not 401: the caller is authenticated; a 401 would tell clients to drop or refresh their token.
    if !auth::verify_password(current, stored).await? {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "wrong_password",
            "the current password is wrong",
        ));
    }
    let hash = auth::hash_password(new).await?;
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "UPDATE members SET password_hash = $2, updated_at = now() WHERE id = $1",
        &[&member, &hash],
    )
    .await?;
    sessions::end_all_sessions(&tx, member).await?;
    tx.commit().await?;
    state.members.evict(member);
    Ok(())
}

/// Sets a member's role (the caller checked it is an admin). Access tokens need no reissue: the extractor reads
/// the current role through the member cache, which is evicted here.
pub async fn set_role(
    state: &AppState,
    member: Uuid,
    body: RoleChange,
) -> Result<MemberBody, ApiError> {
    let role = match body.role.as_deref() {
        None => return Err(ApiError::invalid("role", "required")),
        Some(text) => Role::parse(text)
            .ok_or_else(|| ApiError::invalid("role", "must be customer, seller or admin"))?,
    };
    let client = state.db.get().await?;
    let row = client
        .query_opt(
            &format!(
                "UPDATE members SET role = $2, updated_at = now() WHERE id = $1 RETURNING {MEMBER_COLUMNS}"
            ),
            &[&member, &role.as_str()],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("member_not_found"))?;
    state.members.evict(member);
    MemberBody::from_row(&row)
}

/// Like `Fields::take`, and an absent value is "required".
fn required<T>(
    fields: &mut Fields,
    name: &str,
    checked: Option<Result<T, &'static str>>,
) -> Option<T> {
    fields.take(name, checked.unwrap_or(Err("required")))
}

/// Trims and lower-cases an email, then checks its shape: one `@`, a non-empty local part, a dotted domain,
/// no spaces. Deliverability is not ours to judge.
pub fn normalize_email(raw: &str) -> Result<String, &'static str> {
    let email = raw.trim().to_lowercase();
    if email.chars().count() > EMAIL_CHARS_MAX {
        return Err("must be at most 254 characters");
    }
    let shaped = email.split_once('@').is_some_and(|(local, domain)| {
        !local.is_empty()
            && !domain.contains('@')
            && domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !domain.contains("..")
    });
    if !shaped || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must be an email address");
    }
    Ok(email)
}

fn check_password(password: String) -> Result<String, &'static str> {
    let chars = password.chars().count();
    if chars < PASSWORD_CHARS_MIN {
        Err("must be at least 8 characters")
    } else if chars > PASSWORD_CHARS_MAX {
        Err("must be at most 128 characters")
    } else {
        Ok(password)
    }
}

fn check_name(name: &str) -> Result<String, &'static str> {
    let name = name.trim();
    if name.is_empty() {
        Err("must not be empty")
    } else if name.chars().count() > NAME_CHARS_MAX {
        Err("must be at most 100 characters")
    } else if !crate::error::storable(name) {
        Err(crate::error::NUL_REASON)
    } else {
        Ok(name.to_owned())
    }
}

/// A blank greeting is no greeting.
fn check_greeting(greeting: Option<&str>) -> Result<Option<String>, &'static str> {
    match greeting.map(str::trim) {
        None | Some("") => Ok(None),
        Some(text) if text.chars().count() > GREETING_CHARS_MAX => {
            Err("must be at most 500 characters")
        }
        Some(text) if !crate::error::storable(text) => Err(crate::error::NUL_REASON),
        Some(text) => Ok(Some(text.to_owned())),
    }
}

/// `flashsale admin create`: creates an admin, or promotes the existing member with that email.
pub async fn admin_create(args: AdminCreateArgs) -> anyhow::Result<()> {
    let email =
        normalize_email(&args.email).map_err(|reason| anyhow::anyhow!("--email {reason}"))?;
    let password =
        check_password(args.password).map_err(|reason| anyhow::anyhow!("--password {reason}"))?;
    let pool = db::connect(&args.db).await?;
    db::migrate(&pool).await?;
    let hash = auth::hash_password(password)
        .await
        .map_err(|err| anyhow::anyhow!("hashing the password: {err:?}"))?;
    let client = pool.get().await.context("connecting to Postgres")?;
    let row = client
        .query_one(
            "INSERT INTO members (id, email, password_hash, name, role)
             VALUES ($1, $2, $3, $4, 'admin')
             ON CONFLICT (email) DO UPDATE SET role = 'admin', updated_at = now()
             RETURNING id, (xmax = 0) AS created",
            &[&Uuid::now_v7(), &email, &hash, &args.name],
        )
        .await
        .context("creating the admin")?;
    let id: Uuid = row.get(0);
    let created: bool = row.get(1);
    let verb = if created { "created" } else { "promoted" };
    println!("{verb} admin {email} ({id})");
    Ok(())
}

#[derive(Debug, Clone, Args)]
pub struct AdminCreateArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Email of the admin.
    #[arg(long)]
    pub email: String,
    /// Password (at least 8 characters); for an existing member it is left unchanged.
    #[arg(long)]
    pub password: String,
    /// Display name for a newly created admin.
    #[arg(long, default_value = "Admin")]
    pub name: String,
}
