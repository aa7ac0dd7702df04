//! Posts and comments: create, read, edit, delete, a member's posts and a post's comments.
//!
//! Edit and delete are one statement guarded by `author_id = me OR admin`; only when it touches nothing do we
//! look again to tell 404 (gone) from 403 (not yours), so there is no check-then-act window.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Deserialize;
use uuid::Uuid;

use super::activity::{self, NewActivity};
use crate::error::check_text;

use super::{Comment, Post, COMMENT_CHARS_MAX, CONTENT_CHARS_MAX, TITLE_CHARS_MAX};
use crate::auth::AuthMember;
use crate::error::{ApiError, Fields, OnConstraint};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::pagination::{Page, PageQuery};
use crate::AppState;

/// Body of `POST /posts` and `PATCH /posts/{id}`. On PATCH an absent (or null) field is left unchanged.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct PostInput {
    /// Required on POST; 1 to 200 characters.
    #[schema(value_type = String, required = false, min_length = 1, max_length = 200)]
    pub title: Option<String>,
    /// Required on POST; 1 to 10000 characters.
    #[schema(value_type = String, required = false, min_length = 1, max_length = 10000)]
    pub content: Option<String>,
}

impl PostInput {
    fn validate(&self, creating: bool) -> Result<(), ApiError> {
        let mut fields = Fields::default();
        let title = self.title.as_deref();
        check_text(&mut fields, "title", title, creating, TITLE_CHARS_MAX);
        let content = self.content.as_deref();
        check_text(&mut fields, "content", content, creating, CONTENT_CHARS_MAX);
        fields.finish()
    }
}

/// Body of `POST /posts/{id}/comments`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct CommentInput {
    #[schema(value_type = String, required = true, min_length = 1, max_length = 2000)]
    pub content: Option<String>,
}

/// Writes a post.
#[utoipa::path(post, path = "/api/v1/posts", tag = "feeds", security(("bearer" = [])),
    request_body = PostInput,
    responses((status = 201, description = "The post", body = Post)))]
pub async fn create_post(
    State(state): State<AppState>,
    member: AuthMember,
    ApiJson(input): ApiJson<PostInput>,
) -> Result<(StatusCode, Json<Post>), ApiError> {
    input.validate(true)?;
    let (Some(title), Some(content)) = (input.title, input.content) else {
        // validate(true) rejected absent fields already.
        return Err(ApiError::invalid("body", "title and content are required"));
    };
    let mut client = state.db.get().await?;
    let post = insert_post(&mut client, member.id, title.trim(), &content).await?;
    Ok((StatusCode::CREATED, Json(post)))
}

/// Inserts a post and its `posted` activity in one transaction.
pub async fn insert_post(
    client: &mut deadpool_postgres::Client,
    author: Uuid,
    title: &str,
    content: &str,
) -> Result<Post, ApiError> {
    let tx = client.transaction().await?;
    let statement = tx
        .prepare_cached(&format!(
            "INSERT INTO posts AS p (id, author_id, title, content) VALUES ($1, $2, $3, $4)
             RETURNING {}",
            super::POST_COLUMNS
        ))
        .await?;
    let row = tx
        .query_one(&statement, &[&Uuid::now_v7(), &author, &title, &content])
        .await?;
    let post = Post::from_row(&row);
    activity::record(&tx, NewActivity::posted(author, post.id)).await?;
    tx.commit().await?;
    Ok(post)
}

/// One post.
#[utoipa::path(get, path = "/api/v1/posts/{id}", tag = "feeds",
    params(("id" = Uuid, Path, description = "The post")),
    responses((status = 200, description = "The post", body = Post),
        (status = 404, description = "`post_not_found`", body = crate::error::ErrorBody)))]
pub async fn get_post(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Post>, ApiError> {
    let client = state.db.get().await?;
    let statement = client
        .prepare_cached(&format!(
            "SELECT {} FROM posts p WHERE p.id = $1",
            super::POST_COLUMNS
        ))
        .await?;
    let row = client.query_opt(&statement, &[&id]).await?;
    row.map(|row| Json(Post::from_row(&row)))
        .ok_or_else(post_not_found)
}

/// Edits a post (its author, admin); absent fields are left as they are.
#[utoipa::path(patch, path = "/api/v1/posts/{id}", tag = "feeds", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The post")), request_body = PostInput,
    responses((status = 200, description = "The post", body = Post),
        (status = 403, description = "`forbidden`: not its author", body = crate::error::ErrorBody),
        (status = 404, description = "`post_not_found`", body = crate::error::ErrorBody)))]
pub async fn update_post(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(input): ApiJson<PostInput>,
) -> Result<Json<Post>, ApiError> {
    input.validate(false)?;
    let client = state.db.get().await?;
    let statement = client
        .prepare_cached(&format!(
            "UPDATE posts AS p
             SET title = COALESCE($3, p.title), content = COALESCE($4, p.content), updated_at = now()
             WHERE p.id = $1 AND (p.author_id = $2 OR $5)
             RETURNING {}",
            super::POST_COLUMNS
        ))
        .await?;
    let title = input.title.as_deref().map(str::trim);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
        [&id, &member.id, &title, &input.content, &member.is_admin()];
    match client.query_opt(&statement, &params).await? {
        Some(row) => Ok(Json(Post::from_row(&row))),
        None => Err(post_forbidden_or_missing(&client, id).await),
    }
}

/// Deletes a post with its comments and likes (its author, admin).
#[utoipa::path(delete, path = "/api/v1/posts/{id}", tag = "feeds", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The post")),
    responses((status = 204, description = "Deleted"),
        (status = 403, description = "`forbidden`: not its author", body = crate::error::ErrorBody),
        (status = 404, description = "`post_not_found`", body = crate::error::ErrorBody)))]
pub async fn delete_post(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let client = state.db.get().await?;
    // Comments, likes and activities of the post go with it (ON DELETE CASCADE).
    let statement = client
        .prepare_cached("DELETE FROM posts WHERE id = $1 AND (author_id = $2 OR $3)")
        .await?;
    let deleted = client
        .execute(&statement, &[&id, &member.id, &member.is_admin()])
        .await?;
    if deleted == 0 {
        return Err(post_forbidden_or_missing(&client, id).await);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// After a guarded write touched no post: 403 when the post exists (so it was not ours), else 404.
async fn post_forbidden_or_missing(client: &impl GenericClient, id: Uuid) -> ApiError {
    match client
        .query_opt("SELECT 1 FROM posts WHERE id = $1", &[&id])
        .await
    {
        Ok(Some(_)) => ApiError::forbidden(),
        Ok(None) => post_not_found(),
        Err(err) => err.into(),
    }
}

/// A member's posts, newest first.
#[utoipa::path(get, path = "/api/v1/members/{id}/posts", tag = "feeds",
    params(("id" = Uuid, Path, description = "The member"), crate::pagination::PageParams),
    responses((status = 200, description = "A page of posts", body = Page<Post>),
        (status = 404, description = "`member_not_found`", body = crate::error::ErrorBody)))]
pub async fn list_member_posts(
    State(state): State<AppState>,
    ApiPath(member): ApiPath<Uuid>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<Post>>, ApiError> {
    let limit = page.limit()?;
    let after: Option<(DateTime<Utc>, Uuid)> = page.after()?;
    let client = state.db.get().await?;
    let statement = client
        .prepare_cached(&format!(
            "SELECT {} FROM posts p
             WHERE p.author_id = $1
               AND (p.created_at, p.id) < (COALESCE($2, 'infinity'::timestamptz),
                                           COALESCE($3, 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid))
             ORDER BY p.created_at DESC, p.id DESC
             LIMIT $4",
            super::POST_COLUMNS
        ))
        .await?;
    let (after_at, after_id) = after.unzip();
    let rows = client
        .query(&statement, &[&member, &after_at, &after_id, &(limit + 1)])
        .await?;
    if rows.is_empty() {
        super::social::require_member(&client, member).await?;
    }
    let posts = rows.iter().map(Post::from_row).collect();
    Ok(Json(Page::from_rows(posts, limit, |p: &Post| {
        (p.created_at, p.id)
    })))
}

/// Comments on a post.
#[utoipa::path(post, path = "/api/v1/posts/{id}/comments", tag = "feeds", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The post")), request_body = CommentInput,
    responses((status = 201, description = "The comment", body = Comment),
        (status = 404, description = "`post_not_found`", body = crate::error::ErrorBody)))]
pub async fn create_comment(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(post_id): ApiPath<Uuid>,
    ApiJson(input): ApiJson<CommentInput>,
) -> Result<(StatusCode, Json<Comment>), ApiError> {
    let mut fields = Fields::default();
    let content = input.content.as_deref();
    check_text(&mut fields, "content", content, true, COMMENT_CHARS_MAX);
    fields.finish()?;
    let mut client = state.db.get().await?;
    let comment =
        insert_comment(&mut client, member.id, post_id, content.unwrap_or_default()).await?;
    Ok((StatusCode::CREATED, Json(comment)))
}

/// Inserts a comment, bumps the post's `comment_count` and records `commented`, in one transaction. A missing
/// post fails the comment's foreign key: 404.
pub async fn insert_comment(
    client: &mut deadpool_postgres::Client,
    author: Uuid,
    post_id: Uuid,
    content: &str,
) -> Result<Comment, ApiError> {
    let tx = client.transaction().await?;
    let insert = tx
        .prepare_cached(&format!(
            "INSERT INTO comments AS c (id, post_id, author_id, content) VALUES ($1, $2, $3, $4)
             RETURNING {}",
            super::COMMENT_COLUMNS
        ))
        .await?;
    let row = tx
        .query_one(&insert, &[&Uuid::now_v7(), &post_id, &author, &content])
        .await
        .on_constraint("comments_post_fkey", post_not_found)?;
    let comment = Comment::from_row(&row);
    let bump = tx
        .prepare_cached(
            "UPDATE posts SET comment_count = comment_count + 1 WHERE id = $1 RETURNING author_id",
        )
        .await?;
    // The foreign key check above holds a key-share lock on the post, so it is still there.
    let post_author: Uuid = tx.query_one(&bump, &[&post_id]).await?.get(0);
    activity::record(
        &tx,
        NewActivity::commented(author, post_id, comment.id, post_author),
    )
    .await?;
    tx.commit().await?;
    Ok(comment)
}

/// A post's comments, oldest first.
#[utoipa::path(get, path = "/api/v1/posts/{id}/comments", tag = "feeds",
    params(("id" = Uuid, Path, description = "The post"), crate::pagination::PageParams),
    responses((status = 200, description = "A page of comments", body = Page<Comment>),
        (status = 404, description = "`post_not_found`", body = crate::error::ErrorBody)))]
pub async fn list_comments(
    State(state): State<AppState>,
    ApiPath(post_id): ApiPath<Uuid>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<Comment>>, ApiError> {
    let limit = page.limit()?;
    let after: Option<(DateTime<Utc>, Uuid)> = page.after()?;
    let client = state.db.get().await?;
    // Oldest first, as a conversation reads.
    let statement = client
        .prepare_cached(&format!(
            "SELECT {} FROM comments c
             WHERE c.post_id = $1
               AND (c.created_at, c.id) > (COALESCE($2, '-infinity'::timestamptz),
                                           COALESCE($3, '00000000-0000-0000-0000-000000000000'::uuid))
             ORDER BY c.created_at, c.id
             LIMIT $4",
            super::COMMENT_COLUMNS
        ))
        .await?;
    let (after_at, after_id) = after.unzip();
    let rows = client
        .query(&statement, &[&post_id, &after_at, &after_id, &(limit + 1)])
        .await?;
    if rows.is_empty()
        && client
            .query_opt("SELECT 1 FROM posts WHERE id = $1", &[&post_id])
            .await?
            .is_none()
    {
        return Err(post_not_found());
    }
    let comments = rows.iter().map(Comment::from_row).collect();
    Ok(Json(Page::from_rows(comments, limit, |c: &Comment| {
        (c.created_at, c.id)
    })))
}

/// Deletes a comment (its author, admin).
#[utoipa::path(delete, path = "/api/v1/comments/{id}", tag = "feeds", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The comment")),
    responses((status = 204, description = "Deleted"),
        (status = 403, description = "`forbidden`: not its author", body = crate::error::ErrorBody),
        (status = 404, description = "`comment_not_found`", body = crate::error::ErrorBody)))]
pub async fn delete_comment(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.db.get().await?;
    remove_comment(&mut client, member, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes a comment (author or admin) and decrements its post's `comment_count`, in one transaction. The post
/// row is locked before the comment (the crate-wide lock order), so this cannot deadlock with a post delete.
pub async fn remove_comment(
    client: &mut deadpool_postgres::Client,
    member: AuthMember,
    id: Uuid,
) -> Result<(), ApiError> {
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            "SELECT post_id, author_id FROM comments WHERE id = $1",
            &[&id],
        )
        .await?
        .ok_or_else(comment_not_found)?;
    let post_id: Uuid = row.get(0);
    member.require_owner_or_admin(row.get(1))?;
    let decrement = tx
        .prepare_cached("UPDATE posts SET comment_count = comment_count - 1 WHERE id = $1")
        .await?;
    let delete = tx
        .prepare_cached("DELETE FROM comments WHERE id = $1")
        .await?;
    // Either may find nothing when the post or the comment was deleted meanwhile; dropping `tx` rolls back.
    if tx.execute(&decrement, &[&post_id]).await? == 0 || tx.execute(&delete, &[&id]).await? == 0 {
        return Err(comment_not_found());
    }
    tx.commit().await?;
    Ok(())
}

pub(crate) fn post_not_found() -> ApiError {
    ApiError::not_found("post_not_found").with_message("no such post")
}

pub(crate) fn comment_not_found() -> ApiError {
    ApiError::not_found("comment_not_found").with_message("no such comment")
}
