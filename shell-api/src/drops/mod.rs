//! Drop routes: thin handlers over `engine::Engine` (create and read drops, reserve, pay, cancel, purchases).
//! Wire types live here and convert from engine types; the engine never sees JSON.

pub mod draw;
pub mod hot;
pub mod purchases;
pub mod queue;
pub mod report;
pub mod wire;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use chrono::{DateTime, Utc};
use engine::core::Counts;
use engine::core::HoldState;
use engine::types::{
    reason_name, state_name, DrawTerms, DropInfo, DropMode, DropStatus, NewDrop, QueueTerms,
    Reservation,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::{AuthMember, Role};
use crate::error::{ApiError, Fields};
use crate::extract::{ApiJson, ApiPath, ApiQuery, OptionalJson};
use crate::idempotency::IdempotencyKey;
use crate::pagination::{encode_cursor, Page, PageQuery};
use crate::AppState;
use purchases::PurchaseJson;

/// Largest stock one drop may sell: a drop's units live in the gate's memory (and its Redis hash), so it is
/// bounded far below a shelf's `products::SHELF_STOCK_MAX`, which is one Postgres column.
pub const DROP_STOCK_MAX: i64 = 10_000_000;
/// Largest per-member limit.
const PER_MEMBER_LIMIT_MAX: i64 = 1_000;
/// Longest hold: a day.
const HOLD_SECONDS_MAX: i64 = 86_400;

/// This module's part of the OpenAPI document (`crate::openapi`): every handler the router names.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(create_drop, list_drops, get_drop, reserve, get_reservation, cancel_reservation, pay, my_purchases,
        report::drop_report, draw::enter, draw::get_my_entry, draw::withdraw, draw::get_draw,
        draw::get_ranking, queue::join, queue::my_place),
    tags((name = "drops", description = "Timed drops: holds, payments and purchases (the engine)"))
)]
pub struct Doc;

pub fn router() -> crate::Routes {
    crate::Routes::new()
        .route(api!("/drops"), post(create_drop).get(list_drops))
        .route(api!("/drops/{id}"), get(get_drop))
        .route(RESERVE_ROUTE, post(reserve))
        .route(
            api!("/reservations/{id}"),
            get(get_reservation).delete(cancel_reservation),
        )
        .route(api!("/reservations/{id}/payment"), post(pay))
        .route(api!("/members/me/purchases"), get(my_purchases))
        .route(api!("/drops/{id}/report"), get(report::drop_report))
        .route(api!("/drops/{id}/entries"), post(draw::enter))
        .route(
            api!("/drops/{id}/entries/me"),
            get(draw::get_my_entry).delete(draw::withdraw),
        )
        .route(api!("/drops/{id}/draw"), get(draw::get_draw))
        .route(api!("/drops/{id}/draw/ranking"), get(draw::get_ranking))
        .route(api!("/drops/{id}/queue"), post(queue::join))
        .route(api!("/drops/{id}/queue/me"), get(queue::my_place))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateDrop {
    /// A product of the caller's (or any, for an admin).
    product_id: Uuid,
    #[schema(minimum = 1, maximum = 10_000_000)]
    stock: i64,
    opens_at: DateTime<Utc>,
    /// After `opens_at`; none: open until sold out.
    closes_at: Option<DateTime<Utc>>,
    /// Default 1.
    #[schema(minimum = 1, maximum = 1_000)]
    per_member_limit: Option<i64>,
    /// How long a hold waits for payment; default 300.
    #[schema(minimum = 1, maximum = 86_400)]
    hold_seconds: Option<i64>,
    /// Default: the product's price.
    #[schema(minimum = 0)]
    price: Option<i64>,
    /// `first_come` (default), `queue` or `draw`.
    #[schema(value_type = Option<DropModeName>)]
    mode: Option<String>,
    /// When a draw ranks its entries: required for a draw (after `opens_at`, before `closes_at`); refused for
    /// other modes.
    draw_at: Option<DateTime<Utc>>,
    /// A queue drop: when members may start joining; default 30 minutes before `opens_at`, never after it.
    queue_opens_at: Option<DateTime<Utc>>,
    /// A queue drop: how long an admission pass is valid; default 120.
    #[schema(minimum = 1, maximum = 3_600)]
    pass_seconds: Option<i64>,
    /// A queue drop: a ceiling on admissions per second; default none (the stock alone decides).
    #[schema(minimum = 1, maximum = 100_000)]
    admit_per_second: Option<i64>,
    /// Makes the drop a campaign, all or nothing: 1..=stock, needs `closes_at`; not for a draw.
    #[schema(minimum = 1)]
    goal_units: Option<i64>,
}

/// A drop's launch mode, as `mode` names it (documentation only).
#[derive(utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum DropModeName {
    FirstCome,
    Queue,
    Draw,
}

/// A drop's state, as `status` names it (documentation only: the engine's `DropStatus` names itself).
#[derive(utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum DropStatusName {
    Scheduled,
    Open,
    SoldOut,
    Closed,
}

/// A campaign's state, as `campaign` names it (documentation only).
#[derive(utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum CampaignName {
    Live,
    Funded,
    Unfunded,
}

/// A campaign's state as its counts say it: `funded` once `sold` reaches the goal; `unfunded` once it is
/// closed short of it with no hold left that could still be paid (the close decides then, from the same
/// numbers: `campaigns::close`); `live` until then. `None` for a drop without a goal.
pub fn campaign_state(
    goal_units: Option<u32>,
    counts: &Counts,
    status: DropStatus,
) -> Option<&'static str> {
    let goal = goal_units?;
    Some(if counts.paid >= goal {
        "funded"
    } else if status == DropStatus::Closed && counts.held == 0 {
        "unfunded"
    } else {
        "live"
    })
}

/// A hold's state and why it was released, as `status` and `reason` name them (documentation only).
#[derive(utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum HoldStatusName {
    Held,
    Paying,
    Paid,
    Released,
}

#[derive(utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum ReleaseReasonName {
    Cancelled,
    Expired,
    PaymentDeclined,
}

/// A drop on the wire; also the body of every `event: drop` of the drop's event stream (`live/events.rs`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Drop)]
pub(crate) struct DropJson {
    id: Uuid,
    product_id: Uuid,
    stock: u32,
    available: u32,
    held: u32,
    sold: u32,
    opens_at: DateTime<Utc>,
    closes_at: Option<DateTime<Utc>>,
    per_member_limit: u32,
    hold_seconds: u32,
    price: i64,
    currency: String,
    #[schema(value_type = DropStatusName)]
    status: &'static str,
    #[schema(value_type = DropModeName)]
    mode: &'static str,
    /// When a draw drop ranks its entries; null for other modes.
    draw_at: Option<DateTime<Utc>>,
    /// A queue drop's waiting room (absent for other modes).
    #[serde(skip_serializing_if = "Option::is_none")]
    queue: Option<queue::QueueCountsJson>,
    /// A queue drop's terms (absent for other modes).
    #[serde(skip_serializing_if = "Option::is_none")]
    queue_opens_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pass_seconds: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    admit_per_second: Option<u32>,
    /// A campaign's goal in units; null for a drop that is not a campaign.
    goal_units: Option<u32>,
    /// Null for a drop that is not a campaign.
    #[schema(value_type = Option<CampaignName>)]
    campaign: Option<&'static str>,
}

impl From<DropInfo> for DropJson {
    fn from(info: DropInfo) -> Self {
        let spec = info.spec;
        Self {
            id: spec.id,
            product_id: spec.product_id,
            stock: info.counts.stock,
            available: info.counts.available,
            held: info.counts.held,
            sold: info.counts.paid,
            opens_at: spec.opens_at,
            closes_at: spec.closes_at,
            per_member_limit: spec.per_member_limit,
            hold_seconds: spec.hold_seconds,
            price: spec.price,
            currency: spec.currency,
            status: info.status.as_str(),
            mode: spec.mode.as_str(),
            draw_at: spec.draw_at,
            queue: info.queue.map(Into::into),
            queue_opens_at: spec.queue.map(|terms| terms.queue_opens_at),
            pass_seconds: spec.queue.map(|terms| terms.pass_seconds),
            admit_per_second: spec.queue.and_then(|terms| terms.admit_per_second),
            goal_units: spec.goal_units,
            campaign: campaign_state(spec.goal_units, &info.counts, info.status),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
#[schema(as = Reservation)]
struct ReservationJson {
    id: Uuid,
    drop_id: Uuid,
    member_id: Uuid,
    quantity: u32,
    #[schema(value_type = HoldStatusName)]
    status: &'static str,
    expires_at: DateTime<Utc>,
    /// When `status` is `released`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = ReleaseReasonName)]
    reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    purchase_id: Option<Uuid>,
}

impl ReservationJson {
    /// The same bytes `serde_json` writes for it, written directly: a granted hold is the hot path's answer, and
    /// serde's way through `Display` for the ids and the time cost more than the reservation itself (a test holds
    /// the two equal).
    fn to_json(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        // `"name":"<id>"` after `lead` (`{` or `,`).
        let id_field = |out: &mut Vec<u8>, lead: u8, name: &str, id: Uuid| {
            out.push(lead);
            out.push(b'"');
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":\"");
            out.extend_from_slice(
                id.hyphenated()
                    .encode_lower(&mut Uuid::encode_buffer())
                    .as_bytes(),
            );
            out.push(b'"');
        };
        id_field(&mut out, b'{', "id", self.id);
        id_field(&mut out, b',', "drop_id", self.drop_id);
        id_field(&mut out, b',', "member_id", self.member_id);
        out.extend_from_slice(b",\"quantity\":");
        crate::drops::wire::uint(&mut out, u64::from(self.quantity));
        out.extend_from_slice(b",\"status\":\"");
        out.extend_from_slice(self.status.as_bytes());
        out.extend_from_slice(b"\",\"expires_at\":\"");
        crate::drops::wire::rfc3339(&mut out, self.expires_at);
        out.push(b'"');
        if let Some(reason) = self.reason {
            out.extend_from_slice(b",\"reason\":\"");
            out.extend_from_slice(reason.as_bytes());
            out.push(b'"');
        }
        if let Some(purchase) = self.purchase_id {
            id_field(&mut out, b',', "purchase_id", purchase);
        }
        out.push(b'}');
        out
    }
}

impl From<Reservation> for ReservationJson {
    fn from(r: Reservation) -> Self {
        let reason = match r.state {
            HoldState::Released(reason) => Some(reason_name(reason)),
            _ => None,
        };
        Self {
            id: r.id,
            drop_id: r.drop_id,
            member_id: r.member_id,
            quantity: r.quantity,
            status: state_name(r.state),
            expires_at: r.expires_at,
            reason,
            purchase_id: r.purchase_id,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Payment)]
struct PaymentJson {
    reservation_id: Uuid,
    purchase_id: Uuid,
    /// Always `paid`.
    #[schema(value_type = String, example = "paid")]
    status: &'static str,
    amount: i64,
    currency: String,
    paid_at: DateTime<Utc>,
}

/// Schedules a drop of one of the caller's products (seller, admin).
#[utoipa::path(post, path = "/api/v1/drops", tag = "drops", security(("bearer" = [])), request_body = CreateDrop,
    responses((status = 201, description = "The drop", body = DropJson),
        (status = 403, description = "`forbidden`: not a seller, or not the product's seller", body = crate::error::ErrorBody),
        (status = 409, description = "`store_suspended`: the product's store is suspended", body = crate::error::ErrorBody),
        (status = 422, description = "`validation`: bounds, `closes_at` before `opens_at`, no such product, `mode` \
a queue's terms out of bounds or on another mode, a draw without `draw_at` or with one outside (`opens_at`, \
`closes_at`), a `goal_units` outside 1..=stock, without `closes_at` or on a draw",
            body = crate::error::ErrorBody)))]
async fn create_drop(
    State(state): State<AppState>,
    member: AuthMember,
    ApiJson(body): ApiJson<CreateDrop>,
) -> Result<(StatusCode, Json<DropJson>), ApiError> {
    member.require(&[Role::Seller, Role::Admin])?;
    let (per_member_limit, hold_seconds, mode, queue) = check_create(&body)?;
    let product = {
        let client = state.db.get().await?;
        crate::catalog::products::product_owner_and_price(&client, body.product_id).await?
    };
    let Some(product) = product else {
        return Err(ApiError::invalid("product_id", "no such product"));
    };
    member.require_owner_or_admin(product.seller_id)?;
    // Drops already scheduled or open go on; a suspended store's products take no new one.
    if product.store_suspended {
        return Err(crate::catalog::products::store_suspended());
    }
    // Every bound was checked above, so these conversions cannot fail.
    let to_u32 = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
    let info = state
        .engine
        .create_drop(NewDrop {
            product_id: body.product_id,
            seller_id: product.seller_id,
            stock: to_u32(body.stock),
            opens_at: body.opens_at,
            closes_at: body.closes_at,
            per_member_limit: to_u32(per_member_limit),
            hold_seconds: to_u32(hold_seconds),
            price: body.price.unwrap_or(product.price),
            currency: product.currency,
            mode,
            queue,
            draw: body.draw_at.map(|draw_at| DrawTerms {
                draw_at,
                seed: draw::new_seed(),
            }),
            goal_units: body.goal_units.map(to_u32),
        })
        .await?;
    Ok((StatusCode::CREATED, Json(info.into())))
}

/// The create body's bounds: the per-member limit, the hold's seconds, the mode and a queue's terms, or 422.
fn check_create(body: &CreateDrop) -> Result<(i64, i64, DropMode, Option<QueueTerms>), ApiError> {
    let per_member_limit = body.per_member_limit.unwrap_or(1);
    let hold_seconds = body.hold_seconds.unwrap_or(300);
    let mut fields = Fields::default();
    fields
        .check(
            (1..=DROP_STOCK_MAX).contains(&body.stock),
            "stock",
            "must be between 1 and 10000000",
        )
        .check(
            (1..=PER_MEMBER_LIMIT_MAX).contains(&per_member_limit),
            "per_member_limit",
            "must be between 1 and 1000",
        )
        .check(
            (1..=HOLD_SECONDS_MAX).contains(&hold_seconds),
            "hold_seconds",
            "must be between 1 and 86400",
        )
        .check(
            body.price.is_none_or(|p| p >= 0),
            "price",
            "must not be negative",
        )
        .check(
            body.closes_at.is_none_or(|closes| closes > body.opens_at),
            "closes_at",
            "must be after opens_at",
        );
    let mode = body
        .mode
        .as_deref()
        .map_or(Some(DropMode::FirstCome), DropMode::parse);
    fields.check(mode.is_some(), "mode", "must be first_come, queue or draw");
    let queue = queue::check_terms(body, mode == Some(DropMode::Queue), &mut fields);
    let draw = mode == Some(DropMode::Draw);
    fields
        .check(
            !draw || body.draw_at.is_some(),
            "draw_at",
            "required for a draw",
        )
        .check(
            draw || body.draw_at.is_none(),
            "draw_at",
            "only a draw has a draw_at",
        )
        .check(
            body.draw_at.is_none_or(|at| at > body.opens_at),
            "draw_at",
            "must be after opens_at",
        )
        .check(
            body.draw_at
                .is_none_or(|at| body.closes_at.is_none_or(|closes| at < closes)),
            "draw_at",
            "must be before closes_at",
        );
    check_goal(body, draw, &mut fields);
    fields.finish()?;
    Ok((
        per_member_limit,
        hold_seconds,
        mode.unwrap_or(DropMode::FirstCome),
        queue,
    ))
}

/// A campaign's goal: within the stock, with a close, and not on a draw.
fn check_goal(body: &CreateDrop, draw: bool, fields: &mut Fields) {
    fields
        .check(
            body.goal_units
                .is_none_or(|goal| (1..=body.stock).contains(&goal)),
            "goal_units",
            "must be between 1 and the stock",
        )
        .check(
            body.goal_units.is_none() || body.closes_at.is_some(),
            "goal_units",
            "a campaign needs closes_at",
        )
        .check(
            body.goal_units.is_none() || !draw,
            "goal_units",
            "a draw cannot be a campaign",
        );
}

/// A drop with its live counts (`available + held + sold == stock`).
#[utoipa::path(get, path = "/api/v1/drops/{id}", tag = "drops", params(("id" = Uuid, Path, description = "The drop")),
    responses((status = 200, description = "The drop", body = DropJson),
        (status = 404, description = "`drop_not_found`", body = crate::error::ErrorBody)))]
async fn get_drop(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<DropJson>, ApiError> {
    Ok(Json(state.engine.drop_info(id).await?.into()))
}

#[derive(Debug, Deserialize)]
struct DropListQuery {
    status: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

/// Drops, oldest first.
#[utoipa::path(get, path = "/api/v1/drops", tag = "drops",
    params(("status" = Option<DropStatusName>, Query, description = "Only drops in this state"),
        crate::pagination::PageParams),
    responses((status = 200, description = "A page of drops", body = Page<DropJson>)))]
async fn list_drops(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<DropListQuery>,
) -> Result<Json<Page<DropJson>>, ApiError> {
    let status = match query.status.as_deref() {
        None => None,
        Some(text) => Some(DropStatus::parse(text).ok_or_else(|| {
            ApiError::invalid("status", "must be scheduled, open, sold_out or closed")
        })?),
    };
    let page = PageQuery {
        limit: query.limit,
        cursor: query.cursor,
    };
    let limit = page.limit()?;
    let after: Option<Uuid> = page.after()?;
    let (infos, next) = state.engine.list_drops(after, limit, status).await?;
    let page = Page {
        items: infos.into_iter().map(DropJson::from).collect(),
        next_cursor: next.map(|id| encode_cursor(&id)),
    };
    Ok(Json(page))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReserveBody {
    /// Default 1; at most the drop's per-member limit.
    #[schema(minimum = 1)]
    quantity: Option<i64>,
}

/// Holds units of an open drop for `hold_seconds`, to be paid or released. The body is optional.
#[utoipa::path(post, path = "/api/v1/drops/{id}/reservations", tag = "drops", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The drop"), crate::idempotency::IdempotencyParams,
        ("Admission-Pass" = Option<String>, Header, description = "A queue drop: the pass its waiting room gave \
this member")),
    request_body = Option<ReserveBody>,
    responses((status = 201, description = "The hold", body = ReservationJson),
        (status = 403, description = "`not_admitted`: a draw drop, whose holds only its draw gives (enter it with \
`POST .../entries`), or a queue drop without this member's `Admission-Pass`; `pass_expired`: the pass expired \
(join the queue again)", body = crate::error::ErrorBody),
        (status = 404, description = "`drop_not_found`", body = crate::error::ErrorBody),
        (status = 409, description = "`not_open`, `closed`, `sold_out` or `limit_exceeded`", body = crate::error::ErrorBody),
        (status = 422, description = "`validation`: a quantity that is not positive or is over the limit",
            body = crate::error::ErrorBody),
        (status = 429, description = "`overloaded`: too many reservations in flight; see `Retry-After`",
            body = crate::error::ErrorBody),
        (status = 503, description = "`gate_unavailable`: the stock authority cannot be reached (nothing was \
reserved); also `request_timeout`, `database_unavailable`", body = crate::error::ErrorBody)))]
async fn reserve(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(drop_id): ApiPath<Uuid>,
    headers: axum::http::HeaderMap,
    IdempotencyKey(key): IdempotencyKey,
    OptionalJson(body): OptionalJson<ReserveBody>,
) -> Result<Response, ApiError> {
    let pass = queue::pass_of(&headers);
    reserve_answer(&state, member.id, drop_id, key, pass, body).await
}

/// The route of reservations, as the router names it (and the metrics label it), and its parts around `{id}` (the
/// hot path matches them; a test holds the three together).
pub(crate) const RESERVE_ROUTE: &str = api!("/drops/{id}/reservations");
pub(crate) const RESERVE_PREFIX: &str = api!("/drops/");
pub(crate) const RESERVE_SUFFIX: &str = "/reservations";

/// A reservation's answer once the caller, the drop and the body are known: the route's handler and the hot path
/// (`hot.rs`, which answers this route before routing) both end here, so they answer alike by construction.
pub(crate) async fn reserve_answer(
    state: &AppState,
    member: Uuid,
    drop_id: Uuid,
    key: Option<String>,
    pass: Option<&str>,
    body: ReserveBody,
) -> Result<Response, ApiError> {
    // A pass is checked before anything is recorded, with no I/O: a refused one leaves no idempotency record.
    if let Some(pass) = pass {
        let now_ms = state.engine.now().timestamp_millis();
        queue::check_pass(&state.admission_key, pass, drop_id, member, now_ms)?;
    }
    let admitted = pass.is_some();
    let quantity = body.quantity.unwrap_or(1);
    let quantity = u32::try_from(quantity)
        .ok()
        .filter(|q| *q > 0)
        .ok_or_else(|| ApiError::invalid("quantity", "must be a positive whole number"))?;
    let engine = &state.engine;
    Ok(state
        .idempotency
        .run(member, "reserve", key, || async move {
            let reserved = if admitted {
                engine.reserve_admitted(drop_id, member, quantity).await
            } else {
                engine.reserve(drop_id, member, quantity).await
            };
            match reserved {
                Ok(reservation) => created_json(ReservationJson::from(reservation).to_json()),
                Err(err) => ApiError::from(err).into_response(),
            }
        })
        .await)
}

/// 201 with a JSON body written already.
fn created_json(body: Vec<u8>) -> Response {
    (
        StatusCode::CREATED,
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// A hold and what became of it (owner, admin).
#[utoipa::path(get, path = "/api/v1/reservations/{id}", tag = "drops", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The reservation")),
    responses((status = 200, description = "The reservation", body = ReservationJson),
        (status = 403, description = "`forbidden`: someone else's", body = crate::error::ErrorBody),
        (status = 404, description = "`reservation_not_found`", body = crate::error::ErrorBody)))]
async fn get_reservation(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<ReservationJson>, ApiError> {
    let reservation = state.engine.reservation(id).await?;
    member.require_owner_or_admin(reservation.member_id)?;
    Ok(Json(reservation.into()))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct PayBody {
    /// The simulated gateway declines `tok_declined`, answers 503 for `tok_unavailable` and accepts any other
    /// `tok_*`.
    #[schema(min_length = 1, max_length = 256, example = "tok_ok")]
    payment_token: String,
}

/// Pays a hold (owner). Paying a paid reservation again answers the same 200 body.
#[utoipa::path(post, path = "/api/v1/reservations/{id}/payment", tag = "drops", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The reservation"), crate::idempotency::IdempotencyParams),
    request_body = PayBody,
    responses((status = 200, description = "Paid", body = PaymentJson),
        (status = 402, description = "`payment_declined`: the hold is released", body = crate::error::ErrorBody),
        (status = 403, description = "`forbidden`: someone else's", body = crate::error::ErrorBody),
        (status = 404, description = "`reservation_not_found`", body = crate::error::ErrorBody),
        (status = 409, description = "`hold_expired`, `already_released` or `payment_in_progress`", body = crate::error::ErrorBody),
        (status = 503, description = "`payment_unavailable` (the hold is kept) or `storage_unavailable` (nothing \
was charged); also `request_timeout`, `database_unavailable`", body = crate::error::ErrorBody)))]
async fn pay(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(body): ApiJson<PayBody>,
) -> Result<Response, ApiError> {
    if body.payment_token.is_empty() || body.payment_token.len() > 256 {
        return Err(ApiError::invalid(
            "payment_token",
            "must be 1 to 256 characters",
        ));
    }
    // In a task of its own: a payment the client stops waiting for still ends paid or back to held, never
    // stranded `paying` (the embedded gate has no lease to settle it later).
    crate::guard::run_to_completion(async move {
        let engine = &state.engine;
        Ok(state
            .idempotency
            .run(member.id, "pay", key, || async move {
                match engine.pay(id, member.id, &body.payment_token).await {
                    Ok(purchase) => Json(PaymentJson {
                        reservation_id: purchase.reservation_id,
                        purchase_id: purchase.id,
                        status: "paid",
                        amount: purchase.amount,
                        currency: purchase.currency,
                        paid_at: purchase.paid_at,
                    })
                    .into_response(),
                    Err(err) => ApiError::from(err).into_response(),
                }
            })
            .await)
    })
    .await
}

/// Releases a hold (owner), with reason `cancelled`.
#[utoipa::path(delete, path = "/api/v1/reservations/{id}", tag = "drops", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The reservation")),
    responses((status = 204, description = "Released"),
        (status = 403, description = "`forbidden`: someone else's", body = crate::error::ErrorBody),
        (status = 404, description = "`reservation_not_found`", body = crate::error::ErrorBody),
        (status = 409, description = "`already_paid`, `already_released` or `payment_in_progress`", body = crate::error::ErrorBody)))]
async fn cancel_reservation(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    state.engine.cancel(id, member.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The signed-in member's drop purchases, newest first, with what became of each (`status`).
#[utoipa::path(get, path = "/api/v1/members/me/purchases", tag = "drops", security(("bearer" = [])),
    params(crate::pagination::PageParams),
    responses((status = 200, description = "A page of purchases", body = Page<PurchaseJson>)))]
async fn my_purchases(
    State(state): State<AppState>,
    member: AuthMember,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<PurchaseJson>>, ApiError> {
    let limit = page.limit()?;
    let after: Option<(DateTime<Utc>, Uuid)> = page.after()?;
    let client = state.db.get().await?;
    let purchases = purchases::purchases_of_member(&client, member.id, after, limit + 1).await?;
    Ok(Json(Page::from_rows(purchases, limit, |p| {
        (p.paid_at, p.id)
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_is_written_as_serde_writes_it_in_every_state() {
        let expires = DateTime::from_timestamp_millis(1_796_000_000_123).unwrap();
        let base = ReservationJson {
            id: Uuid::now_v7(),
            drop_id: Uuid::now_v7(),
            member_id: Uuid::new_v4(),
            quantity: 1,
            status: "held",
            expires_at: expires,
            reason: None,
            purchase_id: None,
        };
        let cases = [
            ReservationJson {
                quantity: 1000,
                ..base
            },
            ReservationJson {
                status: "paying",
                expires_at: expires + chrono::Duration::milliseconds(877),
                ..base
            },
            ReservationJson {
                status: "released",
                reason: Some("expired"),
                ..base
            },
            ReservationJson {
                status: "paid",
                purchase_id: Some(Uuid::now_v7()),
                ..base
            },
            ReservationJson {
                reason: Some("cancelled"),
                purchase_id: Some(Uuid::max()),
                ..base
            },
            base,
        ];
        for case in cases {
            assert_eq!(
                String::from_utf8(case.to_json()).unwrap(),
                serde_json::to_string(&case).unwrap()
            );
        }
    }
}
