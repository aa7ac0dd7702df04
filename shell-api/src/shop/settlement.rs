//! The daily settlement: per seller, UTC day and currency, `gross` (shelf order items, drop purchases and
//! subscription periods paid that day), `refunds` (shelf refunds accepted that day, and purchases of unfunded
//! campaigns refunded that day: `campaigns::refunds`), `fee` (`SETTLEMENT_FEE_BPS` of gross, rounded down) and
//! `net = gross - refunds - fee`.
//!
//! One statement computes every row from the stored sales and upserts it on `(seller_id, day, currency)`, so
//! running a day again rewrites the same rows, never adds to them. `flashsale settle [--date]` runs it (default:
//! yesterday); `serve` runs it at start and then shortly after every UTC midnight (one task, one statement a day),
//! and trims search events past their horizon on the same schedule.

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use chrono::{NaiveDate, Utc};
use deadpool_postgres::{GenericClient, Pool};
use serde::Serialize;

use super::require_seller;
use crate::auth::AuthMember;
use crate::error::ApiError;
use crate::extract::ApiQuery;
use crate::pagination::{Page, PageQuery};
use crate::AppState;
use clap::Args;

use crate::config::DbArgs;
use crate::shop::ShopArgs;

/// 100% in basis points: the most a fee can be.
pub const FEE_BPS_MAX: u32 = 10_000;
/// How long after UTC midnight `serve` settles the day that ended, so purchases queued at midnight are stored.
const AFTER_MIDNIGHT: Duration = Duration::from_secs(5 * 60);
/// Back-off after a failed daily run before trying again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10 * 60);

/// Settles `day` for every seller with sales or accepted refunds on it. Returns the rows written.
pub async fn settle(
    client: &impl GenericClient,
    day: NaiveDate,
    fee_bps: u32,
) -> anyhow::Result<u64> {
    anyhow::ensure!(
        fee_bps <= FEE_BPS_MAX,
        "SETTLEMENT_FEE_BPS must be at most {FEE_BPS_MAX}"
    );
    let start = day
        .and_hms_opt(0, 0, 0)
        .ok_or_else(|| anyhow::anyhow!("no midnight on {day}"))?
        .and_utc();
    let end = start + chrono::Duration::days(1);
    let fee_bps = i64::from(fee_bps);
    let rows = client
        .execute(
            "INSERT INTO settlements AS s (seller_id, day, currency, orders, gross, refunds, fee, net, computed_at)
             SELECT seller_id, $1, currency, orders, gross, refunds, fee, gross - refunds - fee, now()
             FROM (
                 SELECT seller_id, currency, orders, gross, refunds,
                        floor(gross::numeric * $2::int8 / 10000)::int8 AS fee
                 FROM (
                     SELECT seller_id, currency, sum(orders)::int4 AS orders, sum(gross)::int8 AS gross,
                            sum(refunds)::int8 AS refunds
                     FROM (
                         SELECT seller_id, currency, count(DISTINCT order_id) AS orders,
                                sum(subtotal) AS gross, 0 AS refunds
                         FROM order_items WHERE paid_at >= $3 AND paid_at < $4
                         GROUP BY seller_id, currency
                         UNION ALL
                         SELECT d.seller_id, p.currency, count(*), sum(p.amount), 0
                         FROM purchases p JOIN drops d ON d.id = p.drop_id
                         WHERE p.paid_at >= $3 AND p.paid_at < $4
                         GROUP BY d.seller_id, p.currency
                         UNION ALL
                         SELECT seller_id, currency, count(*), sum(amount), 0
                         FROM subscription_charges WHERE status = 'paid' AND paid_at >= $3 AND paid_at < $4
                         GROUP BY seller_id, currency
                         UNION ALL
                         SELECT seller_id, currency, 0, 0, sum(amount)
                         FROM refunds WHERE status = 'accepted' AND decided_at >= $3 AND decided_at < $4
                         GROUP BY seller_id, currency
                         UNION ALL
                         SELECT d.seller_id, r.currency, 0, 0, sum(r.amount)
                         FROM purchase_refunds r JOIN drops d ON d.id = r.drop_id
                         WHERE r.refunded_at >= $3 AND r.refunded_at < $4
                         GROUP BY d.seller_id, r.currency
                     ) parts
                     GROUP BY seller_id, currency
                 ) totals
             ) figures
             ON CONFLICT (seller_id, day, currency) DO UPDATE
             SET orders = EXCLUDED.orders, gross = EXCLUDED.gross, refunds = EXCLUDED.refunds,
                 fee = EXCLUDED.fee, net = EXCLUDED.net, computed_at = EXCLUDED.computed_at",
            &[&day, &fee_bps, &start, &end],
        )
        .await?;
    Ok(rows)
}

/// Yesterday, UTC: the default day to settle.
pub fn yesterday() -> NaiveDate {
    Utc::now().date_naive().pred_opt().unwrap_or(NaiveDate::MIN)
}

/// `flashsale settle [--date YYYY-MM-DD]`.
pub async fn run(args: SettleArgs) -> anyhow::Result<()> {
    let pool = crate::db::connect(&args.db).await?;
    crate::db::migrate(&pool).await?;
    let day = args.date.unwrap_or_else(yesterday);
    let client = pool.get().await?;
    let rows = settle(&client, day, args.shop.settlement_fee_bps).await?;
    println!("settled {day}: {rows} seller rows");
    Ok(())
}

/// Settles yesterday now and then after every UTC midnight, until the process ends; trims search events too.
pub async fn run_daily(pool: Pool, fee_bps: u32) {
    loop {
        let outcome = async {
            let client = pool.get().await?;
            let rows = settle(&client, yesterday(), fee_bps).await?;
            let trimmed = crate::catalog::search::trim(&client).await?;
            Ok::<_, anyhow::Error>((rows, trimmed))
        }
        .await;
        let wait = match outcome {
            Ok((rows, trimmed)) => {
                tracing::info!(day = %yesterday(), rows, trimmed, "settled");
                until_next_run()
            }
            Err(err) => {
                tracing::warn!(error = %err, "daily settlement failed; retrying later");
                RETRY_AFTER_FAILURE
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Time from now until `AFTER_MIDNIGHT` past the next UTC midnight.
fn until_next_run() -> Duration {
    let now = Utc::now();
    let next = now
        .date_naive()
        .succ_opt()
        .and_then(|day| day.and_hms_opt(0, 0, 0))
        .map(|midnight| midnight.and_utc());
    next.and_then(|next| (next - now).to_std().ok())
        .map_or(Duration::from_secs(24 * 60 * 60), |wait| {
            wait + AFTER_MIDNIGHT
        })
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Settlement {
    pub date: NaiveDate,
    pub currency: String,
    pub orders: i32,
    pub gross: i64,
    pub refunds: i64,
    pub fee: i64,
    pub net: i64,
}

/// `GET /sellers/me/settlements`: newest day first.
#[utoipa::path(get, path = "/api/v1/sellers/me/settlements", tag = "shop", security(("bearer" = [])),
    params(crate::pagination::PageParams),
    responses((status = 200, description = "A page of settlements, newest day first", body = Page<Settlement>),
        (status = 403, description = "`forbidden`: not a seller or admin", body = crate::error::ErrorBody)))]
pub async fn list_settlements(
    State(state): State<AppState>,
    member: AuthMember,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<Settlement>>, ApiError> {
    require_seller(&member)?;
    let limit = page.limit()?;
    let after: Option<(NaiveDate, String)> = page.after()?;
    let (day, currency) = match after {
        Some((day, currency)) => (Some(day), Some(currency)),
        None => (None, None),
    };
    let client = state.db.get().await?;
    let rows = client
        .query(
            "SELECT day, currency, orders, gross, refunds, fee, net FROM settlements
             WHERE seller_id = $1 AND ($2::date IS NULL OR (day, currency) < ($2, $3::text))
             ORDER BY day DESC, currency DESC LIMIT $4",
            &[&member.id, &day, &currency, &(limit + 1)],
        )
        .await?;
    let settlements = rows
        .iter()
        .map(|row| Settlement {
            date: row.get(0),
            currency: row.get(1),
            orders: row.get(2),
            gross: row.get(3),
            refunds: row.get(4),
            fee: row.get(5),
            net: row.get(6),
        })
        .collect();
    Ok(Json(Page::from_rows(
        settlements,
        limit,
        |s: &Settlement| (s.date, s.currency.clone()),
    )))
}

#[derive(Debug, Clone, Args)]
pub struct SettleArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub shop: ShopArgs,
    /// The UTC day to settle, YYYY-MM-DD (default: yesterday).
    #[arg(long)]
    pub date: Option<chrono::NaiveDate>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The daily run waits until just past the next UTC midnight: never more than a day and the margin.
    #[test]
    fn the_next_run_is_just_after_the_next_midnight() {
        let wait = until_next_run();
        assert!(wait > AFTER_MIDNIGHT);
        assert!(wait <= Duration::from_secs(24 * 60 * 60) + AFTER_MIDNIGHT);
        assert_eq!(yesterday().succ_opt(), Some(Utc::now().date_naive()));
    }
}
