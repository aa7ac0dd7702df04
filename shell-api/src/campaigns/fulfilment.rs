//! Fulfilment: a drop's purchases for its seller (its supporters), shipments with tracking in batches, and one
//! purchase for its buyer, its seller or an admin.
//!
//! A shipment is one `shipments` row per purchase (its primary key), inserted ON CONFLICT DO NOTHING in one
//! statement for the whole batch, with the `shipped` notices of the rows it inserted in the same transaction: a
//! repeated or racing shipment ships and notifies each purchase once. The drop's row is read `FOR SHARE`, so a
//! campaign's outcome cannot change under a shipment; only a funded campaign (or a drop that is not a campaign)
//! ships, and only an unfunded one refunds, so a shipped purchase is never refunded.

use std::collections::HashMap;

use axum::extract::State;
use axum::Json;
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::AuthMember;
use crate::drops::purchases::{self, PurchaseJson, PURCHASE_SELECT};
use crate::error::{ApiError, Fields};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::notify::{notify_members, About, Kind};
use crate::pagination::{Page, PageQuery};
use crate::AppState;

/// Most purchases one shipment request may name.
pub const SHIPMENT_ITEMS_MAX: usize = 1_000;
/// Longest tracking text.
const TRACKING_MAX_CHARS: usize = 200;

/// What the fulfilment routes need of a drop.
struct DropOwner {
    seller_id: Uuid,
    campaign: Option<String>,
}

async fn drop_owner(
    client: &impl GenericClient,
    drop: Uuid,
    for_share: bool,
) -> Result<DropOwner, ApiError> {
    let lock = if for_share { " FOR SHARE" } else { "" };
    let row = client
        .query_opt(
            &format!("SELECT seller_id, campaign FROM drops WHERE id = $1{lock}"),
            &[&drop],
        )
        .await?
        .ok_or(engine::EngineError::DropNotFound)?;
    Ok(DropOwner {
        seller_id: row.get("seller_id"),
        campaign: row.get("campaign"),
    })
}

#[derive(Debug, Deserialize)]
pub(crate) struct SupportersQuery {
    status: Option<String>,
    #[serde(flatten)]
    page: PageQuery,
}

/// The drop's purchases, oldest first (the drop's seller, admin).
#[utoipa::path(get, path = "/api/v1/drops/{id}/purchases", tag = "campaigns", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The drop"),
        ("status" = Option<String>, Query, description = "`paid`, `refunded` or `shipped`"),
        crate::pagination::PageParams),
    responses((status = 200, description = "A page of the drop's purchases", body = Page<PurchaseJson>),
        (status = 403, description = "`forbidden`: not the drop's seller", body = crate::error::ErrorBody),
        (status = 404, description = "`drop_not_found`", body = crate::error::ErrorBody),
        (status = 422, description = "`validation`: an unknown status", body = crate::error::ErrorBody)))]
pub(crate) async fn drop_purchases(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(drop): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<SupportersQuery>,
) -> Result<Json<Page<PurchaseJson>>, ApiError> {
    let condition = match query.status.as_deref() {
        None => "TRUE",
        Some(status) => purchases::status_condition(status)
            .ok_or_else(|| ApiError::invalid("status", "must be paid, refunded or shipped"))?,
    };
    let limit = query.page.limit()?;
    let after: Uuid = query.page.after()?.unwrap_or(Uuid::nil());
    let client = state.db.get().await?;
    let owner = drop_owner(&client, drop, false).await?;
    member.require_owner_or_admin(owner.seller_id)?;
    let rows = client
        .query(
            &format!(
                "{PURCHASE_SELECT} WHERE p.drop_id = $1 AND p.id > $2 AND {condition}
                 ORDER BY p.id LIMIT $3"
            ),
            &[&drop, &after, &(limit + 1)],
        )
        .await?;
    let items = rows.iter().map(purchases::purchase_from_row).collect();
    Ok(Json(Page::from_rows(items, limit, |p| p.id)))
}

/// One drop purchase (its buyer, the drop's seller, admin).
#[utoipa::path(get, path = "/api/v1/purchases/{id}", tag = "campaigns", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The purchase")),
    responses((status = 200, description = "The purchase", body = PurchaseJson),
        (status = 403, description = "`forbidden`: neither its buyer nor the drop's seller", body = crate::error::ErrorBody),
        (status = 404, description = "`purchase_not_found`", body = crate::error::ErrorBody)))]
pub(crate) async fn get_purchase(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<PurchaseJson>, ApiError> {
    let client = state.db.get().await?;
    let purchase = purchases::purchase(&client, id).await?.ok_or_else(|| {
        ApiError::not_found("purchase_not_found").with_message("no such purchase")
    })?;
    if purchase.member_id != member.id {
        let owner = drop_owner(&client, purchase.drop_id, false).await?;
        member.require_owner_or_admin(owner.seller_id)?;
    }
    Ok(Json(purchase))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ShipmentItem {
    purchase_id: Uuid,
    /// The carrier's tracking number or link (at most 200 characters).
    tracking: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ShipmentBody {
    /// 1..=1000 purchases of this drop.
    items: Vec<ShipmentItem>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ShipmentAnswer {
    /// Purchases this request shipped (0 for a repeat: each purchase ships once).
    shipped: u64,
}

/// Marks paid purchases of the drop shipped, once each, and tells each buyer `shipped` (the drop's seller, admin).
#[utoipa::path(post, path = "/api/v1/drops/{id}/shipments", tag = "campaigns", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The drop")), request_body = ShipmentBody,
    responses((status = 200, description = "How many purchases this request shipped", body = ShipmentAnswer),
        (status = 403, description = "`forbidden`: not the drop's seller", body = crate::error::ErrorBody),
        (status = 404, description = "`drop_not_found`", body = crate::error::ErrorBody),
        (status = 409, description = "`campaign_not_funded`: a campaign that is live or unfunded", body = crate::error::ErrorBody),
        (status = 422, description = "`validation`: no items or more than 1000, a purchase of another drop, unknown \
or refunded, a tracking text over 200 characters", body = crate::error::ErrorBody)))]
pub(crate) async fn ship(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(drop): ApiPath<Uuid>,
    ApiJson(body): ApiJson<ShipmentBody>,
) -> Result<Json<ShipmentAnswer>, ApiError> {
    let items = check_items(body.items)?;
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    let owner = drop_owner(&tx, drop, true).await?;
    member.require_owner_or_admin(owner.seller_id)?;
    if owner.campaign.as_deref().is_some_and(|c| c != "funded") {
        return Err(ApiError::conflict(
            "campaign_not_funded",
            "only a funded campaign ships",
        ));
    }
    check_purchases(&tx, drop, &items).await?;
    let shipped = store_shipments(&tx, drop, member.id, &items, state.engine.now()).await?;
    tx.commit().await?;
    Ok(Json(ShipmentAnswer { shipped }))
}

/// The items' bounds; a purchase named twice ships once, with its first tracking.
fn check_items(items: Vec<ShipmentItem>) -> Result<Vec<ShipmentItem>, ApiError> {
    let mut fields = Fields::default();
    fields
        .check(
            (1..=SHIPMENT_ITEMS_MAX).contains(&items.len()),
            "items",
            "must name 1 to 1000 purchases",
        )
        .check(
            items.iter().all(|item| {
                item.tracking.as_deref().is_none_or(|t| {
                    t.chars().count() <= TRACKING_MAX_CHARS && crate::error::storable(t)
                })
            }),
            "tracking",
            "must be at most 200 characters",
        );
    fields.finish()?;
    let mut seen = std::collections::HashSet::new();
    Ok(items
        .into_iter()
        .filter(|item| seen.insert(item.purchase_id))
        .collect())
}

/// Every item is a purchase of this drop that was not refunded (nor is being refunded), or 422.
async fn check_purchases(
    client: &impl GenericClient,
    drop: Uuid,
    items: &[ShipmentItem],
) -> Result<(), ApiError> {
    let ids: Vec<Uuid> = items.iter().map(|item| item.purchase_id).collect();
    let rows = client
        .query(
            "SELECT p.id, p.drop_id, EXISTS (SELECT 1 FROM purchase_refunds r WHERE r.purchase_id = p.id) AS refunded
             FROM purchases p WHERE p.id = ANY($1)",
            &[&ids],
        )
        .await?;
    let found: HashMap<Uuid, (Uuid, bool)> = rows
        .iter()
        .map(|row| (row.get("id"), (row.get("drop_id"), row.get("refunded"))))
        .collect();
    for id in &ids {
        match found.get(id) {
            Some((of, _)) if *of != drop => {
                return Err(ApiError::invalid(
                    "items",
                    format!("purchase {id} is of another drop"),
                ));
            }
            Some((_, true)) => {
                return Err(ApiError::invalid(
                    "items",
                    format!("purchase {id} was refunded"),
                ));
            }
            Some(_) => {}
            None => return Err(ApiError::invalid("items", format!("no purchase {id}"))),
        }
    }
    Ok(())
}

/// Inserts the shipments that are not there yet and tells their buyers; returns how many it inserted.
async fn store_shipments(
    client: &impl GenericClient,
    drop: Uuid,
    by: Uuid,
    items: &[ShipmentItem],
    now: chrono::DateTime<chrono::Utc>,
) -> Result<u64, ApiError> {
    let ids: Vec<Uuid> = items.iter().map(|item| item.purchase_id).collect();
    let tracking: Vec<Option<&str>> = items.iter().map(|item| item.tracking.as_deref()).collect();
    let inserted = client
        .query(
            "WITH new AS (
                 INSERT INTO shipments (purchase_id, drop_id, tracking, shipped_at, shipped_by)
                 SELECT t.id, $2, t.tracking, $4, $3 FROM UNNEST($1::uuid[], $5::text[]) AS t (id, tracking)
                 ON CONFLICT (purchase_id) DO NOTHING
                 RETURNING purchase_id)
             SELECT new.purchase_id, p.member_id FROM new JOIN purchases p ON p.id = new.purchase_id",
            &[&ids, &drop, &by, &now, &tracking],
        )
        .await?;
    // One notice per shipped purchase, pipelined on this connection.
    let notices = inserted.iter().map(|row| {
        let members = [row.get::<_, Uuid>("member_id")];
        let about = About {
            drop_id: Some(drop),
            purchase_id: Some(row.get("purchase_id")),
            ..About::default()
        };
        async move { notify_members(client, Kind::Shipped, &members, about).await }
    });
    futures_util::future::try_join_all(notices).await?;
    Ok(inserted.len() as u64)
}
