//! The writer's statements and the column arrays they take (one array per column, `UNNEST`ed by Postgres: a
//! statement per kind of row, not per row).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::core::ReleaseReason;
use crate::types::{reason_name, HoldRow, Purchase, SecondRow, EVENTS};

/// One row of `hold_batches` per drop of a batch: new holds, journaled compactly (the embedded gate's, and those the
/// Redis gate's journal read from its streams).
pub(super) const JOURNAL_HOLDS: &str =
    "INSERT INTO hold_batches (drop_id, ids, member_ids, quantities, created_at, expires_at)
     VALUES ($1, $2, $3, $4, $5, $6)";

/// Releases, each with its hold's row (inserted if missing). A paid hold is never released: the guard keeps a late
/// or replayed release from touching it.
pub(super) const UPSERT_RELEASES: &str =
    "INSERT INTO reservations (id, drop_id, member_id, quantity, status, reason, created_at, expires_at, updated_at)
     SELECT u.id, u.drop_id, u.member_id, u.quantity, 'released', u.reason, u.created_at, u.expires_at, u.at
     FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::int4[], $5::timestamptz[], $6::timestamptz[],
                 $7::text[], $8::timestamptz[])
          AS u(id, drop_id, member_id, quantity, created_at, expires_at, reason, at)
     ON CONFLICT (id) DO UPDATE SET status = 'released', reason = EXCLUDED.reason,
                                    updated_at = EXCLUDED.updated_at
     WHERE reservations.status <> 'paid'";

/// A drop report's counts per drop and second (`types::Event` order), added to what other instances stored.
pub(super) const UPSERT_SECONDS: &str =
    "INSERT INTO drop_seconds (drop_id, second, reserved, paid, expired, cancelled, declined, refused_sold_out,
                               refused_limit, refused_overload)
     SELECT * FROM UNNEST($1::uuid[], $2::int4[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], $7::int8[],
                          $8::int8[], $9::int8[], $10::int8[])
     ON CONFLICT (drop_id, second) DO UPDATE SET
         reserved = drop_seconds.reserved + EXCLUDED.reserved,
         paid = drop_seconds.paid + EXCLUDED.paid,
         expired = drop_seconds.expired + EXCLUDED.expired,
         cancelled = drop_seconds.cancelled + EXCLUDED.cancelled,
         declined = drop_seconds.declined + EXCLUDED.declined,
         refused_sold_out = drop_seconds.refused_sold_out + EXCLUDED.refused_sold_out,
         refused_limit = drop_seconds.refused_limit + EXCLUDED.refused_limit,
         refused_overload = drop_seconds.refused_overload + EXCLUDED.refused_overload";

/// A purchase's reservation row, as paid (`$1`..`$7`); the two statements below differ only in what they do with a
/// row already there.
macro_rules! paid_rows {
    () => {
        "INSERT INTO reservations (id, drop_id, member_id, quantity, status, created_at, expires_at, updated_at)
     SELECT u.id, u.drop_id, u.member_id, u.quantity, 'paid', u.created_at, u.expires_at, u.paid_at
     FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::int4[], $5::timestamptz[], $6::timestamptz[],
                 $7::timestamptz[])
          AS u(id, drop_id, member_id, quantity, created_at, expires_at, paid_at)"
    };
}
/// The purchases (`$8`..`$16`); likewise.
macro_rules! purchase_rows {
    () => {
        "INSERT INTO purchases (id, reservation_id, drop_id, product_id, member_id, quantity, amount, currency, paid_at)
     SELECT p.* FROM UNNEST($8::uuid[], $9::uuid[], $10::uuid[], $11::uuid[], $12::uuid[], $13::int4[],
                            $14::int8[], $15::text[], $16::timestamptz[])
          AS p(id, reservation_id, drop_id, product_id, member_id, quantity, amount, currency, paid_at)"
    };
}
/// Purchases and their paid reservation rows where none is expected (`write_batch`'s `plain`): any row already
/// there, a released one included, fails the batch, which is then written with `PURCHASES_FENCED`. Each drop's
/// `sold` rises by its units in the batch (`$17`, `$18`: known before, as every row goes in or none), once per drop
/// per batch; its CHECK against the stock is the backstop.
pub(super) const PURCHASES_PLAIN: &str = concat!(
    "WITH paid AS (",
    paid_rows!(),
    "), stored AS (",
    purchase_rows!(),
    ")
     UPDATE drops d SET sold = d.sold + u.units
     FROM UNNEST($17::uuid[], $18::int4[]) AS u(drop_id, units)
     WHERE d.id = u.drop_id"
);
/// The same over rows that may be there: a reservation row is marked paid unless it is `released` (the fence), a
/// purchase is stored only for a reservation so marked, and a reservation paid before keeps the purchase stored
/// then. Each drop's `sold` rises by the units of the purchases this statement inserted, and it answers how many
/// that was.
pub(super) const PURCHASES_FENCED: &str = concat!(
    "WITH paid AS (",
    paid_rows!(),
    " ON CONFLICT (id) DO UPDATE SET status = 'paid', reason = NULL, updated_at = EXCLUDED.updated_at
     WHERE reservations.status <> 'released'
     RETURNING id), stored AS (",
    purchase_rows!(),
    " WHERE p.reservation_id IN (SELECT id FROM paid)
     ON CONFLICT (reservation_id) DO NOTHING
     RETURNING drop_id, quantity),
     counted AS (
         UPDATE drops d SET sold = d.sold + s.units
         FROM (SELECT drop_id, sum(quantity)::int4 AS units FROM stored GROUP BY drop_id) s
         WHERE d.id = s.drop_id)
     SELECT count(*) FROM stored"
);

/// Purchases as the column arrays their statements take (with their holds').
pub(super) struct PurchaseColumns<'a> {
    pub(super) holds: HoldColumns,
    pub(super) ids: Vec<Uuid>,
    pub(super) reservations: Vec<Uuid>,
    pub(super) drops: Vec<Uuid>,
    pub(super) products: Vec<Uuid>,
    pub(super) members: Vec<Uuid>,
    pub(super) quantities: Vec<i32>,
    pub(super) amounts: Vec<i64>,
    pub(super) currencies: Vec<&'a str>,
    pub(super) paid_at: Vec<DateTime<Utc>>,
    /// Units per drop, for `PURCHASES_PLAIN`.
    pub(super) sold_drops: Vec<Uuid>,
    pub(super) sold_units: Vec<i32>,
}

impl<'a> PurchaseColumns<'a> {
    pub(super) fn of(purchases: &[&'a (Purchase, HoldRow)]) -> Self {
        let mut units: HashMap<Uuid, i32> = HashMap::new();
        for (p, _) in purchases {
            *units.entry(p.drop_id).or_default() += quantity(p.quantity);
        }
        let (sold_drops, sold_units) = units.into_iter().unzip();
        Self {
            holds: HoldColumns::of(purchases.iter().map(|(_, hold)| hold)),
            ids: purchases.iter().map(|(p, _)| p.id).collect(),
            reservations: purchases.iter().map(|(p, _)| p.reservation_id).collect(),
            drops: purchases.iter().map(|(p, _)| p.drop_id).collect(),
            products: purchases.iter().map(|(p, _)| p.product_id).collect(),
            members: purchases.iter().map(|(p, _)| p.member_id).collect(),
            quantities: purchases
                .iter()
                .map(|(p, _)| quantity(p.quantity))
                .collect(),
            amounts: purchases.iter().map(|(p, _)| p.amount).collect(),
            currencies: purchases.iter().map(|(p, _)| p.currency.as_str()).collect(),
            paid_at: purchases.iter().map(|(p, _)| p.paid_at).collect(),
            sold_drops,
            sold_units,
        }
    }
}

/// Releases as the column arrays their statement takes.
pub(super) struct ReleaseColumns {
    pub(super) holds: HoldColumns,
    pub(super) reasons: Vec<&'static str>,
    pub(super) at: Vec<DateTime<Utc>>,
}

impl ReleaseColumns {
    pub(super) fn of(released: &[&(HoldRow, ReleaseReason, DateTime<Utc>)]) -> Self {
        Self {
            holds: HoldColumns::of(released.iter().map(|(hold, _, _)| hold)),
            reasons: released.iter().map(|r| reason_name(r.1)).collect(),
            at: released.iter().map(|r| r.2).collect(),
        }
    }
}

/// Holds as the column arrays the statements above take.
pub(super) struct HoldColumns {
    pub(super) ids: Vec<Uuid>,
    pub(super) drops: Vec<Uuid>,
    pub(super) members: Vec<Uuid>,
    pub(super) quantities: Vec<i32>,
    pub(super) created: Vec<DateTime<Utc>>,
    pub(super) expires: Vec<DateTime<Utc>>,
}

impl HoldColumns {
    /// The six columns as statement parameters, in the order every statement above takes them.
    pub(super) fn params(&self) -> [&(dyn ToSql + Sync); 6] {
        [
            &self.ids,
            &self.drops,
            &self.members,
            &self.quantities,
            &self.created,
            &self.expires,
        ]
    }

    pub(super) fn of<'a>(holds: impl ExactSizeIterator<Item = &'a HoldRow>) -> Self {
        let n = holds.len();
        let mut c = Self {
            ids: Vec::with_capacity(n),
            drops: Vec::with_capacity(n),
            members: Vec::with_capacity(n),
            quantities: Vec::with_capacity(n),
            created: Vec::with_capacity(n),
            expires: Vec::with_capacity(n),
        };
        for hold in holds {
            c.ids.push(hold.id);
            c.drops.push(hold.drop_id);
            c.members.push(hold.member_id);
            c.quantities.push(quantity(hold.quantity));
            c.created.push(hold.created_at);
            c.expires.push(hold.expires_at);
        }
        c
    }
}

pub(super) fn quantity(q: u32) -> i32 {
    // Quantities are bounded by a drop's stock, which the API caps far below i32::MAX.
    i32::try_from(q).unwrap_or(i32::MAX)
}

/// A drop report's counts as the column arrays `UPSERT_SECONDS` takes, one row per drop and second.
pub(super) struct SecondColumns {
    pub(super) drops: Vec<Uuid>,
    pub(super) seconds: Vec<i32>,
    pub(super) counts: [Vec<i64>; EVENTS],
}

impl SecondColumns {
    pub(super) fn of(rows: &[SecondRow]) -> Self {
        let mut summed: HashMap<(Uuid, i32), [i64; EVENTS]> = HashMap::with_capacity(rows.len());
        for row in rows {
            let sum = summed.entry((row.drop_id, row.second)).or_default();
            for (total, count) in sum.iter_mut().zip(row.counts) {
                *total = total.saturating_add(count);
            }
        }
        let mut c = Self {
            drops: Vec::with_capacity(summed.len()),
            seconds: Vec::with_capacity(summed.len()),
            counts: Default::default(),
        };
        for ((drop, second), counts) in summed {
            c.drops.push(drop);
            c.seconds.push(second);
            for (column, count) in c.counts.iter_mut().zip(counts) {
                column.push(count);
            }
        }
        c
    }
}
