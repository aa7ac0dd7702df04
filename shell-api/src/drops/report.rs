//! The drop report (`GET /api/v1/drops/{id}/report`): how a drop went, from the per-second counts the engine
//! records (`drop_seconds`, added up across instances) and the drop's stored sales. Counts reach Postgres on the
//! engine's next tick (1 s), so a report of a drop on sale lags by about a second; it is kept after the drop settles.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use uuid::Uuid;

use crate::auth::AuthMember;
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::AppState;

/// Most seconds a report's series lists (a day); a drop on sale longer keeps its first day here and its totals in
/// `funnel`.
pub const SERIES_SECONDS_MAX: i32 = 86_400;

/// What the engine decided, over the whole drop.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Funnel {
    /// Holds granted.
    pub reserved: i64,
    /// Holds paid.
    pub paid: i64,
    /// Holds released because they ran out of time.
    pub expired: i64,
    /// Holds released by their buyer.
    pub cancelled: i64,
    /// Holds released because their payment was declined.
    pub declined: i64,
    pub refused_sold_out: i64,
    pub refused_limit: i64,
    /// Refused because the service was at its in-flight bound (429).
    pub refused_overload: i64,
}

/// One second of the drop, counted from its opening.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Second {
    pub second: i32,
    pub reserved: i64,
    pub paid: i64,
    /// Expired, cancelled and declined.
    pub released: i64,
    /// Sold out, over the limit and overloaded.
    pub refused: i64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DropReport {
    pub drop_id: Uuid,
    pub stock: i32,
    /// Units paid, as stored.
    pub sold: i32,
    pub opened_at: DateTime<Utc>,
    /// When the last unit was paid; null while units are left.
    pub sold_out_at: Option<DateTime<Utc>>,
    pub seconds_to_sell_out: Option<f64>,
    pub funnel: Funnel,
    pub peak_reservations_per_second: i64,
    /// Every second from the opening to the last one with anything counted (seconds with nothing are zeros).
    pub series: Vec<Second>,
}

/// `GET /api/v1/drops/{id}/report` (the drop's seller, admin).
#[utoipa::path(get, path = "/api/v1/drops/{id}/report", tag = "drops", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The drop")),
    responses((status = 200, description = "How the drop went: its funnel, its sell-out time and its per-second series", body = DropReport),
        (status = 403, description = "`forbidden`: neither the drop's seller nor an admin", body = crate::error::ErrorBody),
        (status = 404, description = "`drop_not_found`", body = crate::error::ErrorBody)))]
pub async fn drop_report(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(drop): ApiPath<Uuid>,
) -> Result<Json<DropReport>, ApiError> {
    let client = state.db.get().await?;
    Ok(Json(report_for(&client, &member, drop).await?))
}

/// The report of `drop` for `member`, who must be its seller or an admin.
pub async fn report_for(
    client: &impl GenericClient,
    member: &AuthMember,
    drop: Uuid,
) -> Result<DropReport, ApiError> {
    let row = client
        .query_opt(
            "SELECT seller_id, stock, sold, opens_at FROM drops WHERE id = $1",
            &[&drop],
        )
        .await?
        .ok_or_else(|| ApiError::from(engine::EngineError::DropNotFound))?;
    member.require_owner_or_admin(row.get(0))?;
    let (stock, sold, opened_at): (i32, i32, DateTime<Utc>) = (row.get(1), row.get(2), row.get(3));
    let sold_out_at = if sold >= stock {
        sold_out_at(client, drop, stock).await?
    } else {
        None
    };
    let (funnel, series) = series_of(client, drop).await?;
    Ok(DropReport {
        drop_id: drop,
        stock,
        sold,
        opened_at,
        seconds_to_sell_out: sold_out_at
            .map(|at| (at - opened_at).num_milliseconds().max(0) as f64 / 1000.0),
        sold_out_at,
        peak_reservations_per_second: series.iter().map(|s| s.reserved).max().unwrap_or(0),
        funnel,
        series,
    })
}

/// When the purchase that made the drop's paid units reach its stock was paid.
async fn sold_out_at(
    client: &impl GenericClient,
    drop: Uuid,
    stock: i32,
) -> Result<Option<DateTime<Utc>>, ApiError> {
    let row = client
        .query_opt(
            "SELECT paid_at FROM (
                 SELECT paid_at, sum(quantity) OVER (ORDER BY paid_at, id) AS units
                 FROM purchases WHERE drop_id = $1) p
             WHERE units >= $2 ORDER BY paid_at LIMIT 1",
            &[&drop, &i64::from(stock)],
        )
        .await?;
    Ok(row.map(|row| row.get(0)))
}

/// The drop's funnel and its series, every second from 0 to the last counted (at most `SERIES_SECONDS_MAX`).
async fn series_of(
    client: &impl GenericClient,
    drop: Uuid,
) -> Result<(Funnel, Vec<Second>), ApiError> {
    let rows = client
        .query(
            "SELECT second, reserved, paid, expired, cancelled, declined, refused_sold_out, refused_limit,
                    refused_overload
             FROM drop_seconds WHERE drop_id = $1 ORDER BY second",
            &[&drop],
        )
        .await?;
    let mut funnel = Funnel::default();
    let mut series: Vec<Second> = Vec::new();
    for row in &rows {
        let at: i32 = row.get(0);
        let c = |i: usize| row.get::<_, i64>(i);
        funnel.reserved += c(1);
        funnel.paid += c(2);
        funnel.expired += c(3);
        funnel.cancelled += c(4);
        funnel.declined += c(5);
        funnel.refused_sold_out += c(6);
        funnel.refused_limit += c(7);
        funnel.refused_overload += c(8);
        if at >= SERIES_SECONDS_MAX {
            continue;
        }
        while series.len() < usize::try_from(at).unwrap_or(0) {
            let second = i32::try_from(series.len()).unwrap_or(i32::MAX);
            series.push(Second {
                second,
                reserved: 0,
                paid: 0,
                released: 0,
                refused: 0,
            });
        }
        series.push(Second {
            second: at,
            reserved: c(1),
            paid: c(2),
            released: c(3) + c(4) + c(5),
            refused: c(6) + c(7) + c(8),
        });
    }
    Ok((funnel, series))
}
