//! Likes on posts and comments, follows between members, and follower/following lists.
//!
//! Every PUT and DELETE here is idempotent and answers 204. The like or follow row is inserted with
//! `ON CONFLICT DO NOTHING RETURNING` or deleted with `DELETE ... RETURNING`; only when a row really came or went
//! does the same transaction move the count (`like_count = like_count +/- 1`, serialised by the row lock) and
//! record or forget the activity. A repeated PUT therefore changes nothing, and parallel likes and unlikes leave
//! `like_count` equal to the number of like rows.
//!
//! Lock order (see `feeds/mod.rs`): post, then comment, then like rows. A post like inserts its row (invisible to
//! others until commit), then its foreign key takes a key-share lock on the post, then it updates the post. An
//! unlike locks the post first, because it deletes an existing like row that a concurrent post delete would
//! otherwise wait for while holding the post. Comment likes and unlikes lock the post, then the comment. The
//! deadlock this avoids is shown by `deleting_a_post_while_others_like_it_is_never_a_500` in `tests/feeds.rs`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use uuid::Uuid;

use super::activity::{self, NewActivity, Undo};
use super::posts::{comment_not_found, post_not_found};
use crate::auth::AuthMember;
use crate::error::{ApiError, OnConstraint};
use crate::extract::{ApiPath, ApiQuery};
use crate::pagination::{Page, PageQuery};
use crate::AppState;

/// Likes a post; liking it again changes nothing.
#[utoipa::path(put, path = "/api/v1/posts/{id}/like", tag = "feeds", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The post")),
    responses((status = 204, description = "Liked"),
        (status = 404, description = "`post_not_found`", body = crate::error::ErrorBody)))]
pub async fn like_post(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(post): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.db.get().await?;
    set_post_like(&mut client, member.id, post, true).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Takes a like of a post back; one that is not there changes nothing.
#[utoipa::path(delete, path = "/api/v1/posts/{id}/like", tag = "feeds", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The post")),
    responses((status = 204, description = "Not liked"),
        (status = 404, description = "`post_not_found`", body = crate::error::ErrorBody)))]
pub async fn unlike_post(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(post): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.db.get().await?;
    set_post_like(&mut client, member.id, post, false).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Makes `member`'s like of `post` present or absent. Returns whether anything changed.
pub async fn set_post_like(
    client: &mut deadpool_postgres::Client,
    member: Uuid,
    post: Uuid,
    liked: bool,
) -> Result<bool, ApiError> {
    let tx = client.transaction().await?;
    if !liked {
        // An unlike deletes an existing like row: lock the post first (the crate-wide order), so a concurrent
        // post delete, which holds the post while its cascade waits for like rows, cannot deadlock with us.
        let lock = tx
            .prepare_cached("SELECT 1 FROM posts WHERE id = $1 FOR NO KEY UPDATE")
            .await?;
        tx.query_opt(&lock, &[&post])
            .await?
            .ok_or_else(post_not_found)?;
    }
    // A like needs no lock first: its new row is invisible to others until commit, and a missing post fails its
    // foreign key (404) without a check-then-insert race.
    let author = toggle_like(&tx, Likeable::Post, post, member, liked).await?;
    if let Some(author) = author {
        if liked {
            activity::record(&tx, NewActivity::liked_post(member, post, author)).await?;
        } else {
            activity::forget(&tx, Undo::PostLike { member, post }).await?;
        }
    }
    tx.commit().await?;
    Ok(author.is_some())
}

/// What can be liked: each has a like table keyed by (its id, member) and a `like_count`.
#[derive(Debug, Clone, Copy)]
enum Likeable {
    Post,
    Comment,
}

impl Likeable {
    /// Statements: insert the like row, delete it (both `$1` liked id, `$2` member, returning a row only when a
    /// row came or went), and move the count by `$2`, returning the author.
    fn sql(self) -> [&'static str; 3] {
        match self {
            Likeable::Post => [
                "INSERT INTO post_likes (post_id, member_id) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING RETURNING post_id",
                "DELETE FROM post_likes WHERE post_id = $1 AND member_id = $2 RETURNING post_id",
                "UPDATE posts SET like_count = like_count + $2 WHERE id = $1 RETURNING author_id",
            ],
            Likeable::Comment => [
                "INSERT INTO comment_likes (comment_id, member_id) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING RETURNING comment_id",
                "DELETE FROM comment_likes WHERE comment_id = $1 AND member_id = $2 RETURNING comment_id",
                "UPDATE comments SET like_count = like_count + $2 WHERE id = $1 RETURNING author_id",
            ],
        }
    }

    /// The like table's foreign key to the liked thing, and the 404 it means.
    fn missing(self) -> (&'static str, fn() -> ApiError) {
        match self {
            Likeable::Post => ("post_likes_post_fkey", post_not_found),
            Likeable::Comment => ("comment_likes_comment_fkey", comment_not_found),
        }
    }
}

/// Inserts (`liked`) or deletes `member`'s like row of `id`. Only when a row really came or went, moves the
/// count by one in the same transaction (`like_count + 1`, serialised by the row lock, never read-modify-write)
/// and returns the author of the liked thing; otherwise returns `None` and changes nothing.
async fn toggle_like(
    tx: &impl GenericClient,
    what: Likeable,
    id: Uuid,
    member: Uuid,
    liked: bool,
) -> Result<Option<Uuid>, ApiError> {
    let [insert, delete, count] = what.sql();
    let statement = tx
        .prepare_cached(if liked { insert } else { delete })
        .await?;
    let (fkey, not_found) = what.missing();
    let touched = tx
        .query_opt(&statement, &[&id, &member])
        .await
        .on_constraint(fkey, not_found)?
        .is_some();
    if !touched {
        return Ok(None);
    }
    let delta: i32 = if liked { 1 } else { -1 };
    let statement = tx.prepare_cached(count).await?;
    // The like row's foreign key (or our lock) holds the liked row in place, so exactly one row is updated.
    let author = tx.query_one(&statement, &[&id, &delta]).await?.get(0);
    Ok(Some(author))
}

/// Likes a comment; liking it again changes nothing.
#[utoipa::path(put, path = "/api/v1/comments/{id}/like", tag = "feeds", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The comment")),
    responses((status = 204, description = "Liked"),
        (status = 404, description = "`comment_not_found`", body = crate::error::ErrorBody)))]
pub async fn like_comment(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(comment): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.db.get().await?;
    set_comment_like(&mut client, member.id, comment, true).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Takes a like of a comment back; one that is not there changes nothing.
#[utoipa::path(delete, path = "/api/v1/comments/{id}/like", tag = "feeds", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The comment")),
    responses((status = 204, description = "Not liked"),
        (status = 404, description = "`comment_not_found`", body = crate::error::ErrorBody)))]
pub async fn unlike_comment(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(comment): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.db.get().await?;
    set_comment_like(&mut client, member.id, comment, false).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Makes `member`'s like of `comment` present or absent. Returns whether anything changed.
pub async fn set_comment_like(
    client: &mut deadpool_postgres::Client,
    member: Uuid,
    comment: Uuid,
    liked: bool,
) -> Result<bool, ApiError> {
    let tx = client.transaction().await?;
    // Post first, then comment: the order a post delete takes them in through its cascade. The activity's foreign
    // key needs the post, and an unlike's deleted like row is waited for by a comment delete's cascade.
    let lock_post = tx
        .prepare_cached(
            "SELECT p.id FROM posts p
             WHERE p.id = (SELECT c.post_id FROM comments c WHERE c.id = $1)
             FOR KEY SHARE",
        )
        .await?;
    let post: Uuid = tx
        .query_opt(&lock_post, &[&comment])
        .await?
        .ok_or_else(comment_not_found)?
        .get(0);
    let lock_comment = tx
        .prepare_cached("SELECT 1 FROM comments WHERE id = $1 FOR NO KEY UPDATE")
        .await?;
    tx.query_opt(&lock_comment, &[&comment])
        .await?
        .ok_or_else(comment_not_found)?;
    let author = toggle_like(&tx, Likeable::Comment, comment, member, liked).await?;
    if let Some(author) = author {
        if liked {
            let activity = NewActivity::liked_comment(member, post, comment, author);
            activity::record(&tx, activity).await?;
        } else {
            activity::forget(&tx, Undo::CommentLike { member, comment }).await?;
        }
    }
    tx.commit().await?;
    Ok(author.is_some())
}

/// Follows a member; following again changes nothing.
#[utoipa::path(put, path = "/api/v1/members/{id}/follow", tag = "feeds", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The member to follow")),
    responses((status = 204, description = "Following"),
        (status = 404, description = "`member_not_found`", body = crate::error::ErrorBody),
        (status = 422, description = "`validation`: you cannot follow yourself", body = crate::error::ErrorBody)))]
pub async fn follow(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(followee): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.db.get().await?;
    set_follow(&mut client, member.id, followee, true).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Stops following a member; not following changes nothing.
#[utoipa::path(delete, path = "/api/v1/members/{id}/follow", tag = "feeds", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The member to unfollow")),
    responses((status = 204, description = "Not following"),
        (status = 404, description = "`member_not_found`", body = crate::error::ErrorBody),
        (status = 422, description = "`validation`: you cannot follow yourself", body = crate::error::ErrorBody)))]
pub async fn unfollow(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(followee): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.db.get().await?;
    set_follow(&mut client, member.id, followee, false).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Makes `follower` follow `followee` or not. Following yourself is 422 either way; a missing followee is 404.
/// Returns whether anything changed.
pub async fn set_follow(
    client: &mut deadpool_postgres::Client,
    follower: Uuid,
    followee: Uuid,
    following: bool,
) -> Result<bool, ApiError> {
    if follower == followee {
        return Err(follow_self());
    }
    let tx = client.transaction().await?;
    let changed = if following {
        let insert = tx
            .prepare_cached(
                "INSERT INTO follows (follower_id, followee_id) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING RETURNING followee_id",
            )
            .await?;
        let inserted = tx
            .query_opt(&insert, &[&follower, &followee])
            .await
            .on_constraint("follows_followee_fkey", member_not_found)
            .on_constraint("follows_not_self_check", follow_self)?
            .is_some();
        if inserted {
            activity::record(&tx, NewActivity::followed(follower, followee)).await?;
        }
        inserted
    } else {
        let delete = tx
            .prepare_cached(
                "DELETE FROM follows WHERE follower_id = $1 AND followee_id = $2
                 RETURNING followee_id",
            )
            .await?;
        let deleted = tx
            .query_opt(&delete, &[&follower, &followee])
            .await?
            .is_some();
        if deleted {
            activity::forget(&tx, Undo::Follow { follower, followee }).await?;
        } else {
            require_member(&tx, followee).await?;
        }
        deleted
    };
    tx.commit().await?;
    Ok(changed)
}

/// An entry of a follower or following list: the other member, and since when.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FollowEntry {
    pub id: Uuid,
    pub name: String,
    pub followed_at: DateTime<Utc>,
}

/// Who follows a member, newest first.
#[utoipa::path(get, path = "/api/v1/members/{id}/followers", tag = "feeds",
    params(("id" = Uuid, Path, description = "The member"), crate::pagination::PageParams),
    responses((status = 200, description = "A page of followers", body = Page<FollowEntry>),
        (status = 404, description = "`member_not_found`", body = crate::error::ErrorBody)))]
pub async fn list_followers(
    State(state): State<AppState>,
    ApiPath(member): ApiPath<Uuid>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<FollowEntry>>, ApiError> {
    // Those who follow `member`, newest first (`follows_followee_recent_idx`).
    const SQL: &str = "
        SELECT m.id, m.name, f.created_at
        FROM follows f JOIN members m ON m.id = f.follower_id
        WHERE f.followee_id = $1
          AND (f.created_at, f.follower_id) < (COALESCE($2, 'infinity'::timestamptz),
                                               COALESCE($3, 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid))
        ORDER BY f.created_at DESC, f.follower_id DESC
        LIMIT $4";
    follow_list(&state, SQL, member, &page).await.map(Json)
}

/// Whom a member follows, newest first.
#[utoipa::path(get, path = "/api/v1/members/{id}/following", tag = "feeds",
    params(("id" = Uuid, Path, description = "The member"), crate::pagination::PageParams),
    responses((status = 200, description = "A page of followed members", body = Page<FollowEntry>),
        (status = 404, description = "`member_not_found`", body = crate::error::ErrorBody)))]
pub async fn list_following(
    State(state): State<AppState>,
    ApiPath(member): ApiPath<Uuid>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<FollowEntry>>, ApiError> {
    // Those `member` follows, newest first (`follows_follower_recent_idx`).
    const SQL: &str = "
        SELECT m.id, m.name, f.created_at
        FROM follows f JOIN members m ON m.id = f.followee_id
        WHERE f.follower_id = $1
          AND (f.created_at, f.followee_id) < (COALESCE($2, 'infinity'::timestamptz),
                                               COALESCE($3, 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid))
        ORDER BY f.created_at DESC, f.followee_id DESC
        LIMIT $4";
    follow_list(&state, SQL, member, &page).await.map(Json)
}

/// Runs a follower or following list query; an empty page of an unknown member is 404.
async fn follow_list(
    state: &AppState,
    sql: &str,
    member: Uuid,
    page: &PageQuery,
) -> Result<Page<FollowEntry>, ApiError> {
    let limit = page.limit()?;
    let after: Option<(DateTime<Utc>, Uuid)> = page.after()?;
    let (after_at, after_id) = after.unzip();
    let client = state.db.get().await?;
    let statement = client.prepare_cached(sql).await?;
    let rows = client
        .query(&statement, &[&member, &after_at, &after_id, &(limit + 1)])
        .await?;
    if rows.is_empty() {
        require_member(&client, member).await?;
    }
    let entries = rows
        .iter()
        .map(|row| FollowEntry {
            id: row.get(0),
            name: row.get(1),
            followed_at: row.get(2),
        })
        .collect();
    Ok(Page::from_rows(entries, limit, |e: &FollowEntry| {
        (e.followed_at, e.id)
    }))
}

/// 404 unless `member` exists.
pub(crate) async fn require_member(
    client: &impl GenericClient,
    member: Uuid,
) -> Result<(), ApiError> {
    let statement = client
        .prepare_cached("SELECT 1 FROM members WHERE id = $1")
        .await?;
    match client.query_opt(&statement, &[&member]).await? {
        Some(_) => Ok(()),
        None => Err(member_not_found()),
    }
}

fn member_not_found() -> ApiError {
    ApiError::not_found("member_not_found").with_message("no such member")
}

fn follow_self() -> ApiError {
    ApiError::invalid("id", "you cannot follow yourself")
}
