//! The subscription and charge rows, their wire shapes, billing periods and the derived charge ids.

use chrono::{DateTime, Duration, Months, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::error::ApiError;

/// Dunning: after a declined renewal on its due date, retries this many days after that date; the renewal's
/// attempt `n` (1-based) is due `RETRY_DAYS[n - 2]` days after the period's start. A decline of the last is the end.
pub const RETRY_DAYS: [i64; 3] = [1, 3, 5];
/// The most attempts of one period: the due date and the retries.
pub const ATTEMPTS_MAX: i32 = 1 + RETRY_DAYS.len() as i32;

/// A billing period's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interval {
    Week,
    Month,
}

impl Interval {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "week" => Some(Interval::Week),
            "month" => Some(Interval::Month),
            _ => None,
        }
    }

    pub fn from_db(text: &str) -> Result<Self, ApiError> {
        Self::parse(text)
            .ok_or_else(|| ApiError::internal(anyhow::anyhow!("unknown interval {text:?}")))
    }

    /// The end of the period starting at `start`. A month is a calendar month (Jan 31 is followed by Feb 28 or
    /// 29, and the day stays there after).
    pub fn after(self, start: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Interval::Week => start + Duration::days(7),
            Interval::Month => start
                .checked_add_months(Months::new(1))
                .unwrap_or(start + Duration::days(30)),
        }
    }
}

/// The id of a charge attempt, and the gateway's idempotency key for it: the same subscription, period start and
/// attempt always give the same id, in any process.
pub fn charge_id(subscription: Uuid, period_start: DateTime<Utc>, attempt: i32) -> Uuid {
    let digest = Sha256::digest(format!(
        "flashsale subscription charge {subscription} {} {attempt}",
        period_start.timestamp_micros()
    ));
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// When attempt `attempt` (2..=`ATTEMPTS_MAX`) of the period starting at `period_start` is due.
pub fn retry_at(period_start: DateTime<Utc>, attempt: i32) -> Option<DateTime<Utc>> {
    let index = usize::try_from(attempt - 2).ok()?;
    RETRY_DAYS
        .get(index)
        .map(|days| period_start + Duration::days(*days))
}

/// Every column `Subscription::from_row` reads, in its order.
pub const COLUMNS: &str = "id, product_id, member_id, status, price, currency, billing_interval, \
    current_period_start, current_period_end, cancel_at_period_end, created_at, seller_id, payment_method, \
    payment_token, renewal_attempt, next_attempt_at, paused_reason, canceled_at";

/// A subscription as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Subscription {
    pub id: Uuid,
    pub product_id: Uuid,
    pub member_id: Uuid,
    /// `active`, `past_due`, `paused` or `canceled`.
    pub status: String,
    /// What the member pays per period (a higher product price applies only after `accept-price`).
    pub price: i64,
    pub currency: String,
    /// `week` or `month`.
    pub interval: String,
    pub current_period_start: DateTime<Utc>,
    pub current_period_end: DateTime<Utc>,
    pub cancel_at_period_end: bool,
    pub created_at: DateTime<Utc>,
    /// `points` or `card`.
    pub payment_method: String,
    /// When the next charge attempt is due (null while paused or canceled).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// While paused: `member` (asked for) or `price_change` (a higher price waits for `accept-price`).
    pub paused_reason: Option<String>,
    pub canceled_at: Option<DateTime<Utc>>,
    #[serde(skip)]
    pub seller_id: Uuid,
    #[serde(skip)]
    pub payment_token: Option<String>,
    #[serde(skip)]
    pub renewal_attempt: i32,
}

impl Subscription {
    /// From a row selected with `COLUMNS`.
    pub fn from_row(row: &Row) -> Self {
        Self {
            id: row.get(0),
            product_id: row.get(1),
            member_id: row.get(2),
            status: row.get(3),
            price: row.get(4),
            currency: row.get(5),
            interval: row.get(6),
            current_period_start: row.get(7),
            current_period_end: row.get(8),
            cancel_at_period_end: row.get(9),
            created_at: row.get(10),
            seller_id: row.get(11),
            payment_method: row.get(12),
            payment_token: row.get(13),
            renewal_attempt: row.get(14),
            next_attempt_at: row.get(15),
            paused_reason: row.get(16),
            canceled_at: row.get(17),
        }
    }
}

/// Every column `Charge::from_row` reads, in its order.
pub const CHARGE_COLUMNS: &str =
    "id, period_start, period_end, amount, status, attempt, created_at";

/// One charge attempt as the API shows it (attempts still in flight are not listed).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Charge {
    pub id: Uuid,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub amount: i64,
    /// `paid` or `failed`.
    pub status: String,
    /// 1 on the due date, 2 to 4 for the dunning retries.
    pub attempt: i32,
    pub created_at: DateTime<Utc>,
}

impl Charge {
    pub fn from_row(row: &Row) -> Self {
        Self {
            id: row.get(0),
            period_start: row.get(1),
            period_end: row.get(2),
            amount: row.get(3),
            status: row.get(4),
            attempt: row.get(5),
            created_at: row.get(6),
        }
    }
}

pub fn subscription_not_found() -> ApiError {
    ApiError::not_found("subscription_not_found").with_message("no such subscription")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charge_ids_are_the_same_for_the_same_attempt_and_differ_otherwise() {
        let subscription = Uuid::now_v7();
        let start = Utc::now();
        assert_eq!(
            charge_id(subscription, start, 1),
            charge_id(subscription, start, 1)
        );
        assert_ne!(
            charge_id(subscription, start, 1),
            charge_id(subscription, start, 2)
        );
        assert_ne!(
            charge_id(subscription, start, 1),
            charge_id(subscription, start + Duration::days(7), 1)
        );
    }

    #[test]
    fn retries_fall_on_days_one_three_and_five_then_stop() {
        let start = Utc::now();
        assert_eq!(retry_at(start, 2), Some(start + Duration::days(1)));
        assert_eq!(retry_at(start, 3), Some(start + Duration::days(3)));
        assert_eq!(retry_at(start, 4), Some(start + Duration::days(5)));
        assert_eq!(retry_at(start, 5), None);
        assert_eq!(ATTEMPTS_MAX, 4);
    }

    #[test]
    fn a_month_is_a_calendar_month() {
        let jan31 = DateTime::parse_from_rfc3339("2026-01-31T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            Interval::Month.after(jan31).to_rfc3339(),
            "2026-02-28T10:00:00+00:00"
        );
        assert_eq!(Interval::Week.after(jan31) - jan31, Duration::days(7));
    }
}
