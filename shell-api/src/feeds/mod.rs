//! Feeds: posts, comments, likes, follows, the newsfeed and the activity feed (API.md, "Feeds").
//!
//! The database is the judge of every rule it can judge: likes and follows are unique by primary key, a like on
//! a missing post is a foreign-key violation mapped to 404, and counts move in the same transaction as the row
//! that moves them, as `count = count + 1`, only when a row was really inserted or deleted. So a repeated PUT
//! never double-counts and parallel likes and unlikes leave every count exact.
//!
//! Lock order, to keep concurrent writers free of deadlocks: post row, then comment row, then like rows. A post
//! delete takes them in that order through its cascades, so every writer that touches more than one of them takes
//! them in that order too (see `social.rs`).
//!
//! - `posts.rs`: posts and comments (create, read, edit, delete, lists).
//! - `social.rs`: likes on posts and comments, follows, follower and following lists.
//! - `feed.rs`: the newsfeed query, public so the benchmark measures the shipped SQL.
//! - `activity.rs`: recording activities inside the action's transaction, and the activity feed.

pub mod activity;
pub mod feed;
pub mod posts;
pub mod social;

use axum::routing::{get, post, put};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::Row;
use uuid::Uuid;

/// Longest post title, in characters (Unicode scalar values, as Postgres `char_length` counts them).
pub const TITLE_CHARS_MAX: usize = 200;
/// Longest post body, in characters.
pub const CONTENT_CHARS_MAX: usize = 10_000;
/// Longest comment, in characters.
pub const COMMENT_CHARS_MAX: usize = 2_000;

/// This module's part of the OpenAPI document (`crate::openapi`): every handler the router names.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    posts::create_post,
    posts::get_post,
    posts::update_post,
    posts::delete_post,
    posts::list_member_posts,
    posts::create_comment,
    posts::list_comments,
    posts::delete_comment,
    social::like_post,
    social::unlike_post,
    social::like_comment,
    social::unlike_comment,
    social::follow,
    social::unfollow,
    social::list_followers,
    social::list_following,
    feed::get_feed,
    activity::get_activity,
))]
pub struct Doc;

pub fn router() -> crate::Routes {
    crate::Routes::new()
        .route(api!("/posts"), post(posts::create_post))
        .route(
            api!("/posts/{id}"),
            get(posts::get_post)
                .patch(posts::update_post)
                .delete(posts::delete_post),
        )
        .route(
            api!("/posts/{id}/comments"),
            post(posts::create_comment).get(posts::list_comments),
        )
        .route(
            api!("/comments/{id}"),
            axum::routing::delete(posts::delete_comment),
        )
        .route(
            api!("/posts/{id}/like"),
            put(social::like_post).delete(social::unlike_post),
        )
        .route(
            api!("/comments/{id}/like"),
            put(social::like_comment).delete(social::unlike_comment),
        )
        .route(
            api!("/members/{id}/follow"),
            put(social::follow).delete(social::unfollow),
        )
        .route(api!("/members/{id}/followers"), get(social::list_followers))
        .route(api!("/members/{id}/following"), get(social::list_following))
        .route(api!("/members/{id}/posts"), get(posts::list_member_posts))
        .route(api!("/feed"), get(feed::get_feed))
        .route(api!("/activity"), get(activity::get_activity))
}

/// The columns of `Post`, in the order `Post::from_row` reads them; `p` is the posts alias. A macro so that
/// `concat!` can build whole statements from it at compile time (see `feed.rs`).
macro_rules! post_columns {
    () => {
        "p.id, p.author_id, p.title, p.content, p.like_count, p.comment_count, p.created_at, p.updated_at"
    };
}
pub(crate) use post_columns;

/// `post_columns!()` as a constant, for statements built with `format!`.
pub(crate) const POST_COLUMNS: &str = post_columns!();

/// A post as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Post {
    pub id: Uuid,
    pub author_id: Uuid,
    pub title: String,
    pub content: String,
    pub like_count: i32,
    pub comment_count: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Post {
    /// Reads a row selected with `POST_COLUMNS`.
    pub(crate) fn from_row(row: &Row) -> Self {
        Self {
            id: row.get(0),
            author_id: row.get(1),
            title: row.get(2),
            content: row.get(3),
            like_count: row.get(4),
            comment_count: row.get(5),
            created_at: row.get(6),
            updated_at: row.get(7),
        }
    }
}

/// The columns of `Comment`, in the order `Comment::from_row` reads them; `c` is the comments alias.
pub(crate) const COMMENT_COLUMNS: &str =
    "c.id, c.post_id, c.author_id, c.content, c.like_count, c.created_at";

/// A comment as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Comment {
    pub id: Uuid,
    pub post_id: Uuid,
    pub author_id: Uuid,
    pub content: String,
    pub like_count: i32,
    pub created_at: DateTime<Utc>,
}

impl Comment {
    /// Reads a row selected with `COMMENT_COLUMNS`.
    pub(crate) fn from_row(row: &Row) -> Self {
        Self {
            id: row.get(0),
            post_id: row.get(1),
            author_id: row.get(2),
            content: row.get(3),
            like_count: row.get(4),
            created_at: row.get(5),
        }
    }
}
