//! The activity log and the activity feed (`GET /api/v1/activity`).
//!
//! Every action writes its activity in its own transaction (`record`), so the log never disagrees with the
//! data: no activity without its action, no action without its activity. Undoing an action (unlike, unfollow)
//! removes its activity in the same way (`forget`), so toggling does not flood anyone's feed and the feed never
//! says "liked" about a like that is gone. Deleting a post or comment cascades to its activities.
//!
//! The feed is "what the people I follow did" UNION "what was done to me" (`target_member_id = me`: comments and
//! likes on my posts, likes on my comments, follows of me), newest first, never my own actions. The first half
//! reads at most one page of keys per followed member from `activities_actor_recent_idx`, so its cost is bounded
//! by followees x page size however long their histories are.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::auth::AuthMember;
use crate::error::ApiError;
use crate::extract::ApiQuery;
use crate::pagination::{Page, PageQuery};
use crate::AppState;

/// What an activity records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Posted,
    Commented,
    Liked,
    Followed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Posted => "posted",
            Kind::Commented => "commented",
            Kind::Liked => "liked",
            Kind::Followed => "followed",
        }
    }

    fn parse(text: &str) -> Option<Kind> {
        match text {
            "posted" => Some(Kind::Posted),
            "commented" => Some(Kind::Commented),
            "liked" => Some(Kind::Liked),
            "followed" => Some(Kind::Followed),
            _ => None,
        }
    }
}

/// An activity about to be recorded. The constructors are the only shapes `activities_shape_check` allows.
#[derive(Debug, Clone, Copy)]
pub struct NewActivity {
    actor_id: Uuid,
    kind: Kind,
    post_id: Option<Uuid>,
    comment_id: Option<Uuid>,
    target_member_id: Option<Uuid>,
}

impl NewActivity {
    pub fn posted(author: Uuid, post: Uuid) -> Self {
        Self {
            actor_id: author,
            kind: Kind::Posted,
            post_id: Some(post),
            comment_id: None,
            target_member_id: None,
        }
    }

    pub fn commented(author: Uuid, post: Uuid, comment: Uuid, post_author: Uuid) -> Self {
        Self {
            actor_id: author,
            kind: Kind::Commented,
            post_id: Some(post),
            comment_id: Some(comment),
            target_member_id: Some(post_author),
        }
    }

    pub fn liked_post(member: Uuid, post: Uuid, post_author: Uuid) -> Self {
        Self {
            actor_id: member,
            kind: Kind::Liked,
            post_id: Some(post),
            comment_id: None,
            target_member_id: Some(post_author),
        }
    }

    pub fn liked_comment(member: Uuid, post: Uuid, comment: Uuid, comment_author: Uuid) -> Self {
        Self {
            actor_id: member,
            kind: Kind::Liked,
            post_id: Some(post),
            comment_id: Some(comment),
            target_member_id: Some(comment_author),
        }
    }

    pub fn followed(follower: Uuid, followee: Uuid) -> Self {
        Self {
            actor_id: follower,
            kind: Kind::Followed,
            post_id: None,
            comment_id: None,
            target_member_id: Some(followee),
        }
    }
}

/// Records an activity; call it inside the action's transaction.
pub async fn record(
    tx: &impl GenericClient,
    activity: NewActivity,
) -> Result<(), tokio_postgres::Error> {
    let statement = tx
        .prepare_cached(
            "INSERT INTO activities (id, actor_id, kind, post_id, comment_id, target_member_id)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .await?;
    tx.execute(
        &statement,
        &[
            &Uuid::now_v7(),
            &activity.actor_id,
            &activity.kind.as_str(),
            &activity.post_id,
            &activity.comment_id,
            &activity.target_member_id,
        ],
    )
    .await?;
    Ok(())
}

/// An action being undone, whose activity goes with it.
#[derive(Debug, Clone, Copy)]
pub enum Undo {
    PostLike { member: Uuid, post: Uuid },
    CommentLike { member: Uuid, comment: Uuid },
    Follow { follower: Uuid, followee: Uuid },
}

/// Removes the activity of an action being undone; call it inside the undoing transaction, only after the
/// action's own row was really deleted. Each lookup is one of the partial unique indexes on `activities`.
pub async fn forget(tx: &impl GenericClient, undo: Undo) -> Result<(), tokio_postgres::Error> {
    let (sql, actor, object) = match undo {
        Undo::PostLike { member, post } => (
            "DELETE FROM activities
             WHERE actor_id = $1 AND post_id = $2 AND kind = 'liked' AND comment_id IS NULL",
            member,
            post,
        ),
        Undo::CommentLike { member, comment } => (
            "DELETE FROM activities
             WHERE actor_id = $1 AND comment_id = $2 AND kind = 'liked' AND comment_id IS NOT NULL",
            member,
            comment,
        ),
        Undo::Follow { follower, followee } => (
            "DELETE FROM activities
             WHERE actor_id = $1 AND target_member_id = $2 AND kind = 'followed'",
            follower,
            followee,
        ),
    };
    let statement = tx.prepare_cached(sql).await?;
    let removed = tx.execute(&statement, &[&actor, &object]).await?;
    // Every live like and follow has exactly one activity: it was recorded in the same transaction, and both
    // rows cascade together.
    debug_assert_eq!(removed, 1, "activity of {undo:?}");
    Ok(())
}

/// An activity as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Activity {
    pub id: Uuid,
    pub actor_id: Uuid,
    pub kind: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub post_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_member_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
}

impl Activity {
    fn from_row(row: &Row) -> Result<Self, ApiError> {
        let kind: &str = row.get(2);
        Ok(Self {
            id: row.get(0),
            actor_id: row.get(1),
            kind: Kind::parse(kind).ok_or_else(|| {
                ApiError::internal(anyhow::anyhow!("unknown activity kind {kind:?}"))
            })?,
            post_id: row.get(3),
            comment_id: row.get(4),
            target_member_id: row.get(5),
            created_at: row.get(6),
        })
    }
}

/// The activity feed. `$1` viewer, `$2`/`$3` the keyset position after which the page starts (NULL: from the
/// newest), `$4` rows to fetch. Like the following newsfeed it picks the page's keys first, from index-only scans
/// (at most `$4` per followed member, plus `$4` done to me), and reads only the chosen rows.
pub const ACTIVITY_SQL: &str = "
    WITH page AS (
        (SELECT k.created_at, k.id
         FROM follows f
         CROSS JOIN LATERAL (
             SELECT a.created_at, a.id
             FROM activities a
             WHERE a.actor_id = f.followee_id
               AND (a.created_at, a.id) < (COALESCE($2, 'infinity'::timestamptz),
                                           COALESCE($3, 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid))
             ORDER BY a.created_at DESC, a.id DESC
             LIMIT $4
         ) k
         WHERE f.follower_id = $1)
        UNION
        (SELECT a.created_at, a.id
         FROM activities a
         WHERE a.target_member_id = $1 AND a.actor_id <> $1
           AND (a.created_at, a.id) < (COALESCE($2, 'infinity'::timestamptz),
                                       COALESCE($3, 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid))
         ORDER BY a.created_at DESC, a.id DESC
         LIMIT $4)
        ORDER BY created_at DESC, id DESC
        LIMIT $4
    )
    SELECT a.id, a.actor_id, a.kind, a.post_id, a.comment_id, a.target_member_id, a.created_at
    FROM page JOIN activities a ON a.id = page.id
    ORDER BY a.created_at DESC, a.id DESC";

/// One page of `viewer`'s activity feed: up to `fetch` rows after `after`.
pub async fn activity_page(
    client: &impl GenericClient,
    viewer: Uuid,
    after: Option<(DateTime<Utc>, Uuid)>,
    fetch: i64,
) -> Result<Vec<Activity>, ApiError> {
    let statement = client.prepare_cached(ACTIVITY_SQL).await?;
    let (after_at, after_id) = after.unzip();
    let rows = client
        .query(&statement, &[&viewer, &after_at, &after_id, &fetch])
        .await?;
    rows.iter().map(Activity::from_row).collect()
}

/// What the members I follow did, and what was done to my posts and to me, newest first.
#[utoipa::path(get, path = "/api/v1/activity", tag = "feeds", security(("bearer" = [])),
    params(crate::pagination::PageParams),
    responses((status = 200, description = "A page of activities", body = Page<Activity>)))]
pub async fn get_activity(
    State(state): State<AppState>,
    member: AuthMember,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<Activity>>, ApiError> {
    let limit = page.limit()?;
    let after = page.after()?;
    let client = state.db.get().await?;
    let items = activity_page(&client, member.id, after, limit + 1).await?;
    Ok(Json(Page::from_rows(items, limit, |a: &Activity| {
        (a.created_at, a.id)
    })))
}
