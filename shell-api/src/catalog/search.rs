//! Search terms: a signed-in member's `GET /products?q=` is remembered, off the request path, for their recent
//! terms (distinct, newest first) and everyone's popular terms (the last 24 hours).
//!
//! Recording must not slow the search, so the list answers first and the insert runs in a spawned task. The
//! tasks are bounded by a semaphore (`RECORDS_IN_FLIGHT_MAX`): past it a term is not recorded rather than queued,
//! since a lost search term costs nothing and an unbounded queue could cost the process. Terms are stored
//! trimmed and lower-cased (the search itself ignores case), and events past `EVENTS_KEPT_HOURS` are trimmed by the
//! daily task.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::auth::AuthMember;
use crate::error::ApiError;
use crate::pagination::Page;
use crate::AppState;

/// Most recording tasks at once, across the process.
pub const RECORDS_IN_FLIGHT_MAX: usize = 64;
/// Most terms in the recent and popular lists.
pub const TERMS_MAX: i64 = 10;
/// Search events older than this are deleted by the daily task (the popular list reads the last 24 hours).
pub const EVENTS_KEPT_HOURS: i64 = 48;
/// A member's recent terms older than this are deleted by the daily task.
pub const RECENT_KEPT_DAYS: i64 = 90;

static RECORDING: Semaphore = Semaphore::const_new(RECORDS_IN_FLIGHT_MAX);

/// The term as stored: trimmed, inner whitespace collapsed, lower case. `None` for a blank one.
fn normalize(q: &str) -> Option<String> {
    let term = q.split_whitespace().collect::<Vec<_>>().join(" ");
    (!term.is_empty()).then(|| term.to_lowercase())
}

/// Remembers `q` for `member` in the background; returns at once. Dropped when `RECORDS_IN_FLIGHT_MAX`
/// recordings are already running.
pub fn record(state: &AppState, member: Uuid, q: &str) {
    let Some(term) = normalize(q) else {
        return;
    };
    let Ok(permit) = RECORDING.try_acquire() else {
        tracing::debug!("search term recording saturated; dropping a term");
        return;
    };
    let db = state.db.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let stored = async {
            let client = db.get().await?;
            client
                .execute(
                    "WITH recent AS (
                         INSERT INTO search_recent (member_id, term, searched_at) VALUES ($1, $2, now())
                         ON CONFLICT (member_id, term) DO UPDATE SET searched_at = EXCLUDED.searched_at
                     )
                     INSERT INTO search_events (term, searched_at) VALUES ($2, now())",
                    &[&member, &term],
                )
                .await?;
            Ok::<_, ApiError>(())
        }
        .await;
        if let Err(err) = stored {
            tracing::warn!(code = err.code(), "recording a search term failed");
        }
    });
}

/// Deletes search events and recent terms past their horizons. Returns the rows deleted.
pub async fn trim(client: &impl GenericClient) -> Result<u64, tokio_postgres::Error> {
    let events = client
        .execute(
            "DELETE FROM search_events WHERE searched_at < now() - make_interval(hours => $1::int)",
            &[&(EVENTS_KEPT_HOURS as i32)],
        )
        .await?;
    let recent = client
        .execute(
            "DELETE FROM search_recent WHERE searched_at < now() - make_interval(days => $1::int)",
            &[&(RECENT_KEPT_DAYS as i32)],
        )
        .await?;
    Ok(events + recent)
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RecentTerm {
    pub term: String,
    pub searched_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PopularTerm {
    pub term: String,
    pub count: i64,
}

/// `GET /search/recent`: my distinct terms, newest first, at most 10 (one page: `next_cursor` is null).
#[utoipa::path(get, path = "/api/v1/search/recent", tag = "shop", security(("bearer" = [])),
    responses((status = 200, description = "My distinct terms, newest first, at most 10 (one page)", body = Page<RecentTerm>)))]
pub async fn recent(
    State(state): State<AppState>,
    member: AuthMember,
) -> Result<Json<Page<RecentTerm>>, ApiError> {
    let client = state.db.get().await?;
    let rows = client
        .query(
            "SELECT term, searched_at FROM search_recent WHERE member_id = $1
             ORDER BY searched_at DESC, term LIMIT $2",
            &[&member.id, &TERMS_MAX],
        )
        .await?;
    Ok(Json(Page {
        items: rows
            .iter()
            .map(|row| RecentTerm {
                term: row.get(0),
                searched_at: row.get(1),
            })
            .collect(),
        next_cursor: None,
    }))
}

/// `GET /search/popular`: the most searched terms of the last 24 hours, at most 10, ties by term.
#[utoipa::path(get, path = "/api/v1/search/popular", tag = "shop",
    responses((status = 200, description = "The most searched terms of the last 24 h, at most 10 (one page)", body = Page<PopularTerm>)))]
pub async fn popular(State(state): State<AppState>) -> Result<Json<Page<PopularTerm>>, ApiError> {
    let client = state.db.get().await?;
    let rows = client
        .query(
            "SELECT term, count(*) AS searches FROM search_events
             WHERE searched_at > now() - interval '24 hours'
             GROUP BY term ORDER BY searches DESC, term LIMIT $1",
            &[&TERMS_MAX],
        )
        .await?;
    Ok(Json(Page {
        items: rows
            .iter()
            .map(|row| PopularTerm {
                term: row.get(0),
                count: row.get(1),
            })
            .collect(),
        next_cursor: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn terms_are_trimmed_collapsed_and_lower_case() {
        assert_eq!(normalize("  Air   Max 90 ").as_deref(), Some("air max 90"));
        assert_eq!(normalize(" \t "), None);
    }
}
