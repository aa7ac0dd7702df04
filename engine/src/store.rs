//! Postgres reads and the few synchronous writes of the engine (creating a drop). Purchases and hold rows are
//! written by the batched writer; this module rebuilds memory from them after a restart.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use crate::core::{HoldState, RestoredHold};
use crate::types::{
    parse_reason, DropMode, DropSpec, DropStatus, HoldRow, Purchase, QueueTerms, Reservation,
    Restore,
};

const DROP_COLUMNS: &str =
    "id, product_id, seller_id, stock, opens_at, closes_at, per_member_limit, hold_seconds, \
                            price, currency, created_at, mode, draw_at, draw_seed, queue_opens_at, pass_seconds, \
                            admit_per_second, goal_units, campaign";
const DROP_COLUMNS_READ: &str =
    "id, seq, product_id, seller_id, stock, opens_at, closes_at, per_member_limit, \
                                 hold_seconds, price, currency, created_at, mode, draw_at, queue_opens_at, \
                                 pass_seconds, admit_per_second, goal_units";

fn to_u32(value: i32) -> u32 {
    // Every such column has a CHECK (> 0 or >= 0) in the migration.
    u32::try_from(value).unwrap_or(0)
}

fn to_i32(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

fn drop_from_row(row: &Row) -> DropSpec {
    DropSpec {
        id: row.get("id"),
        seq: row.get("seq"),
        product_id: row.get("product_id"),
        seller_id: row.get("seller_id"),
        stock: to_u32(row.get("stock")),
        opens_at: row.get("opens_at"),
        closes_at: row.get("closes_at"),
        per_member_limit: to_u32(row.get("per_member_limit")),
        hold_seconds: to_u32(row.get("hold_seconds")),
        price: row.get("price"),
        currency: row.get("currency"),
        created_at: row.get("created_at"),
        // The column's CHECK names only the modes `DropMode` knows.
        mode: DropMode::parse(row.get("mode")).unwrap_or(DropMode::FirstCome),
        draw_at: row.get("draw_at"),
        queue: queue_terms(row),
        goal_units: row.get::<_, Option<i32>>("goal_units").map(to_u32),
    }
}

fn queue_terms(row: &Row) -> Option<QueueTerms> {
    // The drops_queue_shape check sets both or neither.
    let queue_opens_at: Option<DateTime<Utc>> = row.get("queue_opens_at");
    let pass_seconds: Option<i32> = row.get("pass_seconds");
    Some(QueueTerms {
        queue_opens_at: queue_opens_at?,
        pass_seconds: to_u32(pass_seconds?),
        admit_per_second: row.get::<_, Option<i32>>("admit_per_second").map(to_u32),
    })
}

pub(crate) fn purchase_from_row(row: &Row) -> Purchase {
    Purchase {
        id: row.get("id"),
        reservation_id: row.get("reservation_id"),
        drop_id: row.get("drop_id"),
        product_id: row.get("product_id"),
        member_id: row.get("member_id"),
        quantity: to_u32(row.get("quantity")),
        amount: row.get("amount"),
        currency: row.get("currency"),
        paid_at: row.get("paid_at"),
    }
}

/// Stores a new drop; returns the `seq` Postgres gave it.
pub async fn insert_drop(
    client: &impl GenericClient,
    drop: &DropSpec,
    draw_seed: Option<&[u8]>,
) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!(
                "INSERT INTO drops ({DROP_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                 $18, $19)
                 RETURNING seq"
            ),
            &[
                &drop.id,
                &drop.product_id,
                &drop.seller_id,
                &to_i32(drop.stock),
                &drop.opens_at,
                &drop.closes_at,
                &to_i32(drop.per_member_limit),
                &to_i32(drop.hold_seconds),
                &drop.price,
                &drop.currency,
                &drop.created_at,
                &drop.mode.as_str(),
                &drop.draw_at,
                &draw_seed,
                &drop.queue.map(|queue| queue.queue_opens_at),
                &drop.queue.map(|queue| to_i32(queue.pass_seconds)),
                &drop.queue.and_then(|queue| queue.admit_per_second.map(to_i32)),
                &drop.goal_units.map(to_i32),
                // A campaign starts live; the migration's trigger and the campaign closer move it on.
                &drop.goal_units.map(|_| "live"),
            ],
        )
        .await?;
    Ok(row.get("seq"))
}

pub async fn load_drop(
    client: &impl GenericClient,
    id: Uuid,
) -> Result<Option<DropSpec>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            &format!("SELECT {DROP_COLUMNS_READ} FROM drops WHERE id = $1"),
            &[&id],
        )
        .await?;
    Ok(row.as_ref().map(drop_from_row))
}

pub async fn load_all_drops(
    client: &impl GenericClient,
) -> Result<Vec<DropSpec>, tokio_postgres::Error> {
    let rows = client
        .query(&format!("SELECT {DROP_COLUMNS_READ} FROM drops"), &[])
        .await?;
    Ok(rows.iter().map(drop_from_row).collect())
}

/// Drops newest first after `after` (an id), filtered by the part of `status` that the clock decides.
pub async fn list_drops(
    client: &impl GenericClient,
    after: Option<Uuid>,
    limit: i64,
    status: Option<DropStatus>,
    now: DateTime<Utc>,
) -> Result<Vec<DropSpec>, tokio_postgres::Error> {
    let time_filter = match status {
        None => "TRUE",
        Some(DropStatus::Scheduled) => "opens_at > $3",
        Some(DropStatus::Closed) => "closes_at IS NOT NULL AND closes_at <= $3",
        Some(DropStatus::Open | DropStatus::SoldOut) => {
            "opens_at <= $3 AND (closes_at IS NULL OR closes_at > $3)"
        }
    };
    let rows = client
        .query(
            &format!(
                "SELECT {DROP_COLUMNS_READ} FROM drops
                 WHERE ($1::uuid IS NULL OR id < $1) AND {time_filter} AND $3::timestamptz IS NOT NULL
                 ORDER BY id DESC LIMIT $2"
            ),
            &[&after, &limit, &now],
        )
        .await?;
    Ok(rows.iter().map(drop_from_row).collect())
}

/// Closes out holds that expired while no instance was running, then returns each drop's paid units per
/// member and its live holds. `drop` limits it to one drop.
pub async fn restore(
    client: &impl GenericClient,
    drop: Option<Uuid>,
    now: DateTime<Utc>,
) -> Result<HashMap<Uuid, Restore>, tokio_postgres::Error> {
    materialize_holds(client, drop).await?;
    client
        .execute(
            "UPDATE reservations SET status = 'released', reason = 'expired', updated_at = $2
             WHERE status IN ('held', 'paying') AND expires_at <= $2 AND ($1::uuid IS NULL OR drop_id = $1)",
            &[&drop, &now],
        )
        .await?;
    let mut restored: HashMap<Uuid, Restore> = HashMap::new();
    let paid = client
        .query(
            "SELECT drop_id, member_id, SUM(quantity)::int4 AS units FROM purchases
             WHERE ($1::uuid IS NULL OR drop_id = $1) GROUP BY drop_id, member_id",
            &[&drop],
        )
        .await?;
    for row in &paid {
        restored
            .entry(row.get("drop_id"))
            .or_default()
            .paid
            .push((row.get("member_id"), to_u32(row.get("units"))));
    }
    let paid_holds = client
        .query(
            "SELECT drop_id, reservation_id FROM purchases WHERE ($1::uuid IS NULL OR drop_id = $1)",
            &[&drop],
        )
        .await?;
    for row in &paid_holds {
        restored
            .entry(row.get("drop_id"))
            .or_default()
            .paid_holds
            .push(row.get("reservation_id"));
    }
    let held = client
        .query(
            "SELECT id, drop_id, member_id, quantity, created_at, expires_at FROM reservations
             WHERE status IN ('held', 'paying') AND ($1::uuid IS NULL OR drop_id = $1)",
            &[&drop],
        )
        .await?;
    for row in &held {
        let created_at: DateTime<Utc> = row.get("created_at");
        let expires_at: DateTime<Utc> = row.get("expires_at");
        restored
            .entry(row.get("drop_id"))
            .or_default()
            .held
            .push(RestoredHold {
                id: row.get("id"),
                member: row.get("member_id"),
                quantity: to_u32(row.get("quantity")),
                created_at_ms: created_at.timestamp_millis(),
                expires_at_ms: expires_at.timestamp_millis(),
            });
    }
    Ok(restored)
}

/// Gives every journaled hold of the drop (or of every drop) its own `reservations` row, as `held` unless it has a
/// row already (it settled: paid or released), and deletes the journal batches. One statement, so batches another
/// writer commits meanwhile stay for the next call rather than being deleted unread. Returns the holds written.
pub async fn materialize_holds(
    client: &impl GenericClient,
    drop: Option<Uuid>,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "WITH gone AS (DELETE FROM hold_batches WHERE $1::uuid IS NULL OR drop_id = $1 RETURNING *)
             INSERT INTO reservations (id, drop_id, member_id, quantity, status, created_at, expires_at, updated_at)
             SELECT h.id, g.drop_id, h.member_id, h.quantity, 'held', h.created_at, h.expires_at, h.created_at
             FROM gone g
             CROSS JOIN LATERAL unnest(g.ids, g.member_ids, g.quantities, g.created_at, g.expires_at)
                 AS h(id, member_id, quantity, created_at, expires_at)
             ON CONFLICT (id) DO NOTHING",
            &[&drop],
        )
        .await
}

/// What Postgres decided for a payment whose lease ran out ([`fence_payment`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// Its release is stored: no purchase of the hold can be stored any more, whatever the payment does now.
    Released,
    /// Its purchase was stored first: the unit is sold.
    Paid,
}

/// Fences a payment whose lease ran out (guarantee 5a): stores its hold as released (expired) unless Postgres has it
/// paid, in one statement. The writer stores a purchase only with its reservation's row not `released`, and both
/// statements take that row's lock (or wait on each other's insert of it), so exactly one of them wins: a payment
/// that resumes after this answered `Released` is refused, and one whose purchase committed first makes this answer
/// `Paid`. Run it, and see it commit, before the gate gives the hold's units back to sale.
pub async fn fence_payment(
    client: &impl GenericClient,
    hold: &HoldRow,
    at: DateTime<Utc>,
) -> Result<Fence, tokio_postgres::Error> {
    let quantity = to_i32(hold.quantity);
    let released = client
        .query_opt(
            "INSERT INTO reservations (id, drop_id, member_id, quantity, status, reason, created_at, expires_at,
                                       updated_at)
             SELECT $1::uuid, $2::uuid, $3::uuid, $4::int4, 'released', 'expired', $5::timestamptz,
                    $6::timestamptz, $7::timestamptz
             WHERE NOT EXISTS (SELECT 1 FROM purchases WHERE reservation_id = $1)
             ON CONFLICT (id) DO UPDATE
                 SET status = 'released', reason = COALESCE(reservations.reason, 'expired'),
                     updated_at = EXCLUDED.updated_at
                 WHERE reservations.status <> 'paid'
                   AND NOT EXISTS (SELECT 1 FROM purchases WHERE reservation_id = $1)
             RETURNING 1",
            &[
                &hold.id,
                &hold.drop_id,
                &hold.member_id,
                &quantity,
                &hold.created_at,
                &hold.expires_at,
                &at,
            ],
        )
        .await?;
    Ok(if released.is_some() {
        Fence::Released
    } else {
        Fence::Paid
    })
}

pub async fn purchase_by_reservation(
    client: &impl GenericClient,
    reservation: Uuid,
) -> Result<Option<Purchase>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT * FROM purchases WHERE reservation_id = $1",
            &[&reservation],
        )
        .await?;
    Ok(row.as_ref().map(purchase_from_row))
}

/// A reservation as last stored, with its purchase id when paid.
pub async fn reservation(
    client: &impl GenericClient,
    id: Uuid,
) -> Result<Option<Reservation>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT r.id, r.drop_id, r.member_id, r.quantity, r.status, r.reason, r.expires_at, p.id AS purchase_id
             FROM reservations r LEFT JOIN purchases p ON p.reservation_id = r.id
             WHERE r.id = $1",
            &[&id],
        )
        .await?;
    Ok(row.map(|row| {
        let status: String = row.get("status");
        let reason: Option<String> = row.get("reason");
        let state = match status.as_str() {
            "paid" => HoldState::Paid,
            "paying" => HoldState::Paying,
            "released" => HoldState::Released(
                reason
                    .as_deref()
                    .and_then(parse_reason)
                    .unwrap_or(crate::core::ReleaseReason::Expired),
            ),
            _ => HoldState::Held,
        };
        Reservation {
            id: row.get("id"),
            drop_id: row.get("drop_id"),
            member_id: row.get("member_id"),
            quantity: to_u32(row.get("quantity")),
            state,
            expires_at: row.get("expires_at"),
            purchase_id: row.get("purchase_id"),
        }
    }))
}

/// A member's purchases, newest first, after the `(paid_at, id)` of the last one served.
pub async fn purchases_of(
    client: &impl GenericClient,
    member: Uuid,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<Purchase>, tokio_postgres::Error> {
    let (after_at, after_id) = after.unzip();
    let rows = client
        .query(
            "SELECT * FROM purchases
             WHERE member_id = $1 AND ($2::timestamptz IS NULL OR (paid_at, id) < ($2, $3))
             ORDER BY paid_at DESC, id DESC LIMIT $4",
            &[&member, &after_at, &after_id, &limit],
        )
        .await?;
    Ok(rows.iter().map(purchase_from_row).collect())
}
