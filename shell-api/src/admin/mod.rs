//! The back office (API.md, "Preorder campaigns and fulfilment", Back office): one search over members (email,
//! name), products (name), drops (id, product name) and stores (name, suspended ones too: API.md's "Stores" asks
//! the back office to find them), for staff, newest first.
//!
//! Substring matches (`ILIKE '%q%'`, the pattern made as `catalog`'s product search makes it: this area may
//! import `catalog`) are served by trigram GIN indexes (migration 0017 for members' email and name, 0002 for
//! product names, which also find drops through `drops_product_idx`); a drop's id is matched exactly. Each kind's branch is cut at the page's size before the branches are merged, so a page reads at most
//! `limit` rows of each. Stores are matched by name through migration 0021's trigram index over every store (the
//! stores area's own indexes cover active stores only). Figures on 100k members and 100k products: `scripts/admin_search_bench.sh`.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::auth::{AuthMember, Role};
use crate::error::ApiError;
use crate::extract::ApiQuery;
use crate::pagination::{Page, PageQuery};
use crate::AppState;

/// Longest search text.
const QUERY_MAX_CHARS: usize = 100;

/// This module's part of the OpenAPI document (`crate::openapi`).
#[derive(utoipa::OpenApi)]
#[openapi(paths(search), tags((name = "admin", description = "The back office (admins)")))]
pub struct Doc;

pub fn router() -> crate::Routes {
    crate::Routes::new().route(api!("/admin/search"), axum::routing::get(search))
}

/// What a search finds, as `kind` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SearchKind {
    Member,
    Product,
    Drop,
    Store,
}

#[derive(Debug, Deserialize)]
pub struct SearchQuery {
    q: Option<String>,
    kind: Option<String>,
    #[serde(flatten)]
    page: PageQuery,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = SearchHit)]
pub struct SearchHit {
    #[schema(value_type = SearchKind)]
    kind: String,
    id: Uuid,
    /// A member's `name <email>`, a product's name, a drop's product name, a store's name.
    title: String,
    created_at: DateTime<Utc>,
}

/// Each kind's branch: rows `(kind, id, title, created_at)` matching `$1` (an ILIKE pattern) or, for drops, the
/// id `$2`, older than the cursor `($3, $4)`, at most `$5`.
const MEMBERS: &str =
    "(SELECT 'member' AS kind, id, name || ' <' || email || '>' AS title, created_at FROM members
    WHERE (email ILIKE $1 OR name ILIKE $1) AND (created_at, id) < ($3, $4)
    ORDER BY created_at DESC, id DESC LIMIT $5)";
const PRODUCTS: &str = "(SELECT 'product' AS kind, id, name AS title, created_at FROM products
    WHERE deleted_at IS NULL AND name ILIKE $1 AND (created_at, id) < ($3, $4)
    ORDER BY created_at DESC, id DESC LIMIT $5)";
const DROPS: &str = "((SELECT 'drop' AS kind, d.id, p.name AS title, d.created_at FROM drops d JOIN products p ON p.id = d.product_id
    WHERE p.deleted_at IS NULL AND p.name ILIKE $1 AND (d.created_at, d.id) < ($3, $4)
    ORDER BY d.created_at DESC, d.id DESC LIMIT $5)
    UNION
    (SELECT 'drop' AS kind, d.id, p.name AS title, d.created_at FROM drops d
    JOIN products p ON p.id = d.product_id WHERE d.id = $2 AND (d.created_at, d.id) < ($3, $4)))";

const STORES: &str = "(SELECT 'store' AS kind, id, name AS title, created_at FROM stores
    WHERE name ILIKE $1 AND (created_at, id) < ($3, $4)
    ORDER BY created_at DESC, id DESC LIMIT $5)";

/// Beyond any row's `created_at`: the first page's cursor.
fn far_future() -> DateTime<Utc> {
    DateTime::from_timestamp(253_402_300_799, 0).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn parse_kind(kind: Option<&str>) -> Result<Option<SearchKind>, ApiError> {
    match kind {
        None => Ok(None),
        Some("member") => Ok(Some(SearchKind::Member)),
        Some("product") => Ok(Some(SearchKind::Product)),
        Some("drop") => Ok(Some(SearchKind::Drop)),
        Some("store") => Ok(Some(SearchKind::Store)),
        Some(_) => Err(ApiError::invalid(
            "kind",
            "must be member, product, drop or store",
        )),
    }
}

/// Members, products, drops and stores matching `q`, newest first (admin; paged). Without `kind`, all four.
#[utoipa::path(get, path = "/api/v1/admin/search", tag = "admin", security(("bearer" = [])),
    params(("q" = String, Query, description = "Text to find (1..=100 characters): in a member's email or name, a \
product's name, a drop's product name, a store's name; or a drop's id"),
        ("kind" = Option<SearchKind>, Query, description = "Only this kind"),
        crate::pagination::PageParams),
    responses((status = 200, description = "A page of hits, newest first", body = Page<SearchHit>),
        (status = 403, description = "`forbidden`: not an admin", body = crate::error::ErrorBody),
        (status = 422, description = "`validation`: no `q`, or one too long; an unknown kind", body = crate::error::ErrorBody)))]
pub async fn search(
    State(state): State<AppState>,
    member: AuthMember,
    ApiQuery(query): ApiQuery<SearchQuery>,
) -> Result<Json<Page<SearchHit>>, ApiError> {
    member.require(&[Role::Admin])?;
    let q = query.q.as_deref().map(str::trim).unwrap_or_default();
    if q.is_empty() || q.chars().count() > QUERY_MAX_CHARS || !crate::error::storable(q) {
        return Err(ApiError::invalid("q", "must be 1 to 100 characters"));
    }
    let kind = parse_kind(query.kind.as_deref())?;
    let limit = query.page.limit()?;
    let after: Option<(DateTime<Utc>, Uuid)> = query.page.after()?;
    let (at, id) = after.unwrap_or_else(|| (far_future(), Uuid::max()));
    let branches: Vec<&str> = [
        (SearchKind::Member, MEMBERS),
        (SearchKind::Product, PRODUCTS),
        (SearchKind::Drop, DROPS),
        (SearchKind::Store, STORES),
    ]
    .into_iter()
    .filter(|(k, _)| kind.is_none_or(|kind| kind == *k))
    .map(|(_, sql)| sql)
    .collect();
    let sql = format!(
        "SELECT kind, id, title, created_at FROM ({}) hits ORDER BY created_at DESC, id DESC LIMIT $5",
        branches.join(" UNION ALL ")
    );
    let drop_id = Uuid::parse_str(q).ok();
    let client = state.db.get().await?;
    // Typed, since a branch left out may leave a parameter unused, whose type Postgres cannot infer; and unnamed,
    // so every search is planned for its own pattern: a cached statement's generic plan, blind to how rare the
    // pattern is, walked the `created_at` index filtering every row (300 ms at 100k members instead of 8).
    let pattern = crate::catalog::products::contains_pattern(q);
    let limit_rows = limit + 1;
    let rows = client
        .query_typed(
            &sql,
            &[
                (&pattern, Type::TEXT),
                (&drop_id, Type::UUID),
                (&at, Type::TIMESTAMPTZ),
                (&id, Type::UUID),
                (&limit_rows, Type::INT8),
            ],
        )
        .await?;
    let hits = rows
        .iter()
        .map(|row| SearchHit {
            kind: row.get(0),
            id: row.get(1),
            title: row.get(2),
            created_at: row.get(3),
        })
        .collect();
    Ok(Json(Page::from_rows(hits, limit, |hit| {
        (hit.created_at, hit.id)
    })))
}

#[cfg(test)]
mod tests {
    use crate::catalog::products::contains_pattern;

    #[test]
    fn a_pattern_takes_like_characters_literally() {
        assert_eq!(contains_pattern("a%b_c\\d"), "%a\\%b\\_c\\\\d%");
        assert_eq!(contains_pattern("sneaker"), "%sneaker%");
    }
}
