//! The history checker: a pure function of the recorded history, the drop's rows read from Postgres after the
//! run, and the drop as every instance served it at the end. No I/O, so each check is unit-tested against planted
//! histories (a double sale, a lost acknowledgement, a hold that went backwards, ...).
//!
//! Every check judges only what is certain. A call that got no answer (`error: ...`) may or may not have taken
//! effect, so it never counts as an observation; two observations are ordered only when one completed before the
//! other was invoked (on the one monotonic clock of the history); a reservation counts as granted while Redis was
//! down only when its whole call lies inside the window between the kill and the restart.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::history::{FaultWhat, History, Op, OpKind, Outcome, RunInfo};
use crate::verify::DropCounts;

/// A purchase row of the drop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurchaseRow {
    pub id: String,
    pub reservation_id: String,
    pub member_id: String,
    pub quantity: i64,
}

/// A reservation row of the drop (holds that settled; holds still journaled in batches have none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationRow {
    pub id: String,
    pub member_id: String,
    pub quantity: i64,
    pub status: String,
    pub reason: Option<String>,
}

/// What Postgres holds about the drop after the run (also `<out>/postgres.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbSnapshot {
    pub stock: i64,
    pub per_member_limit: i64,
    pub purchases: Vec<PurchaseRow>,
    pub reservations: Vec<ReservationRow>,
}

impl DbSnapshot {
    /// Units over every purchase row.
    pub fn purchased_units(&self) -> i64 {
        self.purchases.iter().map(|p| p.quantity).sum()
    }
}

/// The drop as one instance served it after the run: the `drop_read` op and the counts it answered (`None`:
/// no readable answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FinalRead {
    pub instance: usize,
    pub op: Option<u64>,
    pub counts: Option<DropCounts>,
}

/// The last `drop_read` of each instance in the history (`0..instances`).
pub fn final_reads(history: &History, instances: usize) -> Vec<FinalRead> {
    (0..instances)
        .map(|instance| {
            let last = history
                .ops
                .iter()
                .filter(|op| op.kind == OpKind::DropRead && op.instance == instance)
                .max_by_key(|op| op.op);
            FinalRead {
                instance,
                op: last.map(|op| op.op),
                counts: last.and_then(drop_counts),
            }
        })
        .collect()
}

/// The counts of a `200` answer to `GET /drops/{id}`.
pub fn drop_counts(op: &Op) -> Option<DropCounts> {
    if op.http_status() != Some(200) {
        return None;
    }
    let field = |key: &str| op.response.get(key)?.as_i64();
    Some(DropCounts {
        stock: field("stock")?,
        available: field("available")?,
        held: field("held")?,
        sold: field("sold")?,
    })
}

/// The kinds of violation, each a guarantee of DESIGN.md seen from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// More units paid in Postgres than the drop's stock: a unit was sold twice.
    Oversold,
    /// Two purchase rows for one reservation that no 200 acknowledged.
    TwoPurchasesOneReservation,
    /// A payment answered 200 has no purchase row.
    AckLost,
    /// A payment answered 200 has more than one purchase row.
    AckStoredTwice,
    /// A payment answered 200 has its row under another purchase id.
    AckPurchaseIdDiffers,
    /// A member holds more paid units than the per-member limit.
    MemberOverLimit,
    /// A reservation observed paid and released, one after the other.
    HoldWentBackwards,
    /// Two different purchase ids answered for one reservation.
    TwoPurchaseIds,
    /// A reservation granted (201) while Redis, the stock authority, was down.
    GrantedWhileRedisDown,
    /// An instance could not tell the drop's final state.
    FinalStateUnread,
    /// Instances disagree on the final counts.
    InstancesDisagree,
    /// Final counts that do not add up to the stock, or a negative one.
    CountsDoNotAddUp,
    /// `sold` on the API is not the units in Postgres's purchases.
    SoldDiffersFromPostgres,
    /// Holds left after every hold expired and was reaped.
    HoldsNotDrained,
    /// A purchase row for a reservation Postgres records as released.
    PurchaseOfReleasedHold,
}

impl Check {
    pub fn name(self) -> &'static str {
        match self {
            Self::Oversold => "oversold",
            Self::TwoPurchasesOneReservation => "two_purchases_one_reservation",
            Self::AckLost => "ack_lost",
            Self::AckStoredTwice => "ack_stored_twice",
            Self::AckPurchaseIdDiffers => "ack_purchase_id_differs",
            Self::MemberOverLimit => "member_over_limit",
            Self::HoldWentBackwards => "hold_went_backwards",
            Self::TwoPurchaseIds => "two_purchase_ids",
            Self::GrantedWhileRedisDown => "granted_while_redis_down",
            Self::FinalStateUnread => "final_state_unread",
            Self::InstancesDisagree => "instances_disagree",
            Self::CountsDoNotAddUp => "counts_do_not_add_up",
            Self::SoldDiffersFromPostgres => "sold_differs_from_postgres",
            Self::HoldsNotDrained => "holds_not_drained",
            Self::PurchaseOfReleasedHold => "purchase_of_released_hold",
        }
    }
}

/// One broken guarantee, with the ops that show it (sorted, unique).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub check: Check,
    pub detail: String,
    pub ops: Vec<u64>,
}

fn violation(check: Check, detail: String, ops: impl IntoIterator<Item = u64>) -> Violation {
    let ops: BTreeSet<u64> = ops.into_iter().collect();
    Violation {
        check,
        detail,
        ops: ops.into_iter().collect(),
    }
}

/// The history indexed for the checks.
struct Index<'a> {
    /// Every op about a reservation, by reservation id.
    by_reservation: HashMap<&'a str, Vec<&'a Op>>,
    purchases_by_reservation: HashMap<&'a str, Vec<&'a PurchaseRow>>,
}

impl<'a> Index<'a> {
    fn new(history: &'a History, db: &'a DbSnapshot) -> Self {
        let mut by_reservation: HashMap<&str, Vec<&Op>> = HashMap::new();
        for op in &history.ops {
            if let Some(reservation) = op.reservation.as_deref() {
                by_reservation.entry(reservation).or_default().push(op);
            }
        }
        let mut purchases_by_reservation: HashMap<&str, Vec<&PurchaseRow>> = HashMap::new();
        for row in &db.purchases {
            purchases_by_reservation
                .entry(row.reservation_id.as_str())
                .or_default()
                .push(row);
        }
        Self {
            by_reservation,
            purchases_by_reservation,
        }
    }

    /// Pay ops about a reservation.
    fn pays(&self, reservation: &str) -> impl Iterator<Item = &'a Op> + '_ {
        self.by_reservation
            .get(reservation)
            .into_iter()
            .flatten()
            .copied()
            .filter(|op| op.kind == OpKind::Pay)
    }
}

/// Every violation the history shows, in a stable order.
pub fn check(history: &History, db: &DbSnapshot, finals: &[FinalRead]) -> Vec<Violation> {
    let index = Index::new(history, db);
    let mut found = Vec::new();
    found.extend(oversold(history, db, &index));
    found.extend(two_purchases(db, &index));
    found.extend(acknowledged_purchases(history, &index));
    found.extend(member_limit(db, &index));
    found.extend(backwards_holds(&index));
    found.extend(granted_while_redis_down(history));
    found.extend(final_counts(db, finals));
    found.extend(purchases_of_released_holds(db, &index));
    found.sort_by(|a, b| (a.check, &a.ops).cmp(&(b.check, &b.ops)));
    found
}

/// More units in purchases than stock. The ops named are the payments that completed after their hold expired
/// (the likely second sale of a unit), or every payment of a purchased reservation when none did.
fn oversold(history: &History, db: &DbSnapshot, index: &Index) -> Option<Violation> {
    let units = db.purchased_units();
    if units <= db.stock {
        return None;
    }
    let paid: Vec<&Op> = index
        .purchases_by_reservation
        .keys()
        .flat_map(|reservation| index.pays(reservation))
        .collect();
    let late: Vec<u64> = paid
        .iter()
        .filter(|pay| {
            let expiry = pay
                .reservation
                .as_deref()
                .and_then(|r| hold_expiry_ms(history, index, r));
            expiry.is_some_and(|expiry| pay.complete_ms as i64 > expiry)
        })
        .map(|pay| pay.op)
        .collect();
    let detail = format!(
        "{units} units paid in {} purchase rows for a stock of {}; {} payment(s) completed after their hold expired",
        db.purchases.len(),
        db.stock,
        late.len()
    );
    let ops = if late.is_empty() {
        paid.iter().map(|pay| pay.op).collect()
    } else {
        late
    };
    Some(violation(Check::Oversold, detail, ops))
}

/// When a hold expires on the history's clock: the `expires_at` of its 201, from the run's wall-clock start.
fn hold_expiry_ms(history: &History, index: &Index, reservation: &str) -> Option<i64> {
    let RunInfo { started_at, .. } = history.run.as_ref()?;
    let started: DateTime<Utc> = started_at.parse().ok()?;
    let granted = index
        .by_reservation
        .get(reservation)?
        .iter()
        .find(|op| op.kind == OpKind::Reserve && op.http_status() == Some(201))?;
    let expires: DateTime<Utc> = granted.str_field("expires_at")?.parse().ok()?;
    Some((expires - started).num_milliseconds())
}

/// Two purchase rows for one reservation (a reservation a 200 acknowledged is judged by `acknowledged_purchases`).
fn two_purchases(db: &DbSnapshot, index: &Index) -> Vec<Violation> {
    let mut found = Vec::new();
    for (reservation, rows) in sorted(&index.purchases_by_reservation) {
        let acknowledged = index
            .pays(reservation)
            .any(|op| op.http_status() == Some(200));
        if rows.len() > 1 && !acknowledged {
            found.push(violation(
                Check::TwoPurchasesOneReservation,
                format!(
                    "reservation {reservation} has {} purchase rows ({} units in all)",
                    rows.len(),
                    rows.iter().map(|r| r.quantity).sum::<i64>()
                ),
                index.pays(reservation).map(|op| op.op),
            ));
        }
    }
    let _ = db;
    found
}

/// Every payment answered 200 has exactly one purchase row, under the purchase id it answered.
fn acknowledged_purchases(history: &History, index: &Index) -> Vec<Violation> {
    let mut acks: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in &history.ops {
        if op.kind == OpKind::Pay && op.http_status() == Some(200) {
            if let Some(reservation) = op.reservation.as_deref() {
                acks.entry(reservation).or_default().push(op);
            }
        }
    }
    let mut found = Vec::new();
    for (reservation, ops) in acks {
        let rows = index
            .purchases_by_reservation
            .get(reservation)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let op_ids = ops.iter().map(|op| op.op);
        match rows {
            [] => found.push(violation(
                Check::AckLost,
                format!("reservation {reservation}: paid with 200, but no purchase row"),
                op_ids,
            )),
            [row] => {
                let answered: BTreeSet<&str> = ops
                    .iter()
                    .map(|op| op.str_field("purchase_id").unwrap_or("(none)"))
                    .collect();
                if answered.iter().any(|id| *id != row.id) {
                    found.push(violation(
                        Check::AckPurchaseIdDiffers,
                        format!(
                            "reservation {reservation}: answered purchase id(s) {answered:?}, stored {}",
                            row.id
                        ),
                        op_ids,
                    ));
                }
            }
            _ => found.push(violation(
                Check::AckStoredTwice,
                format!(
                    "reservation {reservation}: paid with 200, stored as {} purchase rows",
                    rows.len()
                ),
                op_ids,
            )),
        }
    }
    found
}

/// No member holds more paid units than the limit.
fn member_limit(db: &DbSnapshot, index: &Index) -> Vec<Violation> {
    let mut by_member: BTreeMap<&str, Vec<&PurchaseRow>> = BTreeMap::new();
    for row in &db.purchases {
        by_member
            .entry(row.member_id.as_str())
            .or_default()
            .push(row);
    }
    by_member
        .into_iter()
        .filter_map(|(member, rows)| {
            let units: i64 = rows.iter().map(|r| r.quantity).sum();
            (units > db.per_member_limit).then(|| {
                violation(
                    Check::MemberOverLimit,
                    format!(
                        "member {member} paid {units} units in {} purchases; the limit is {}",
                        rows.len(),
                        db.per_member_limit
                    ),
                    rows.iter()
                        .flat_map(|row| index.pays(&row.reservation_id))
                        .map(|op| op.op),
                )
            })
        })
        .collect()
}

/// What an answered op says about its reservation's state, when it says something final.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// Paid, with the purchase id when the answer carries one.
    Paid(Option<String>),
    Released,
}

fn seen(op: &Op) -> Option<Seen> {
    let status = op.http_status()?;
    let paid = || Seen::Paid(op.str_field("purchase_id").map(str::to_owned));
    match (op.kind, status, op.code()) {
        (OpKind::Pay, 200, _) => Some(paid()),
        (OpKind::Pay, 402, _) => Some(Seen::Released),
        (OpKind::Pay | OpKind::Cancel, 409, Some("already_released" | "hold_expired")) => {
            Some(Seen::Released)
        }
        (OpKind::Cancel, 204, _) => Some(Seen::Released),
        (OpKind::Cancel, 409, Some("already_paid")) => Some(Seen::Paid(None)),
        (OpKind::Read, 200, _) => match op.str_field("status")? {
            "paid" => Some(paid()),
            "released" => Some(Seen::Released),
            _ => None,
        },
        _ => None,
    }
}

/// A reservation seen paid and, strictly later, released (or the other way round), or answered with two
/// purchase ids.
fn backwards_holds(index: &Index) -> Vec<Violation> {
    let mut found = Vec::new();
    for (reservation, ops) in sorted(&index.by_reservation) {
        let seen: Vec<(&Op, Seen)> = ops
            .iter()
            .filter_map(|op| seen(op).map(|s| (*op, s)))
            .collect();
        let mut conflicting = BTreeSet::new();
        for (a, seen_a) in &seen {
            for (b, seen_b) in &seen {
                let ordered = a.complete_ms < b.invoke_ms;
                let differ = matches!(
                    (seen_a, seen_b),
                    (Seen::Paid(_), Seen::Released) | (Seen::Released, Seen::Paid(_))
                );
                if ordered && differ {
                    conflicting.extend([a.op, b.op]);
                }
            }
        }
        if !conflicting.is_empty() {
            found.push(violation(
                Check::HoldWentBackwards,
                format!("reservation {reservation} was seen paid and released, one strictly after the other"),
                conflicting,
            ));
        }
        let ids: BTreeSet<&str> = seen
            .iter()
            .filter_map(|(_, s)| match s {
                Seen::Paid(Some(id)) => Some(id.as_str()),
                _ => None,
            })
            .collect();
        if ids.len() > 1 {
            found.push(violation(
                Check::TwoPurchaseIds,
                format!("reservation {reservation} was answered with purchase ids {ids:?}"),
                seen.iter()
                    .filter(|(_, s)| matches!(s, Seen::Paid(Some(_))))
                    .map(|(op, _)| op.op),
            ));
        }
    }
    found
}

/// The windows in which Redis was certainly down: from the end of each successful kill (the process was gone)
/// to the start of the next restart (before a new process existed). Open at the end when no restart followed.
pub fn redis_down_windows(history: &History) -> Vec<(u64, u64)> {
    let mut steps: Vec<_> = history
        .faults
        .iter()
        .filter(|f| matches!(f.what, FaultWhat::KillRedis | FaultWhat::RestartRedis))
        .collect();
    steps.sort_by_key(|f| (f.start_ms, f.end_ms));
    let mut windows = Vec::new();
    let mut down_since = None;
    for step in steps {
        match step.what {
            FaultWhat::KillRedis if step.ok => down_since = down_since.or(Some(step.end_ms)),
            FaultWhat::RestartRedis => {
                if let Some(since) = down_since.take() {
                    windows.push((since, step.start_ms));
                }
            }
            _ => {}
        }
    }
    if let Some(since) = down_since {
        windows.push((since, u64::MAX));
    }
    windows
}

/// A 201 whose call lies strictly inside a window when Redis was down. A replay of an earlier attempt with the
/// same `Idempotency-Key` that may have been granted (a 201, or no answer) is the first answer again, not a
/// grant, and is left out.
fn granted_while_redis_down(history: &History) -> Vec<Violation> {
    let windows = redis_down_windows(history);
    if windows.is_empty() {
        return Vec::new();
    }
    let mut maybe_granted: HashMap<&str, u64> = HashMap::new();
    let mut reserves: Vec<&Op> = history
        .ops
        .iter()
        .filter(|op| op.kind == OpKind::Reserve)
        .collect();
    reserves.sort_by_key(|op| op.op);
    let mut found = Vec::new();
    for op in reserves {
        let key = op.idempotency_key.as_deref();
        let replay = key.is_some_and(|k| maybe_granted.contains_key(k));
        let granted = op.http_status() == Some(201);
        if granted && !replay {
            let inside = windows
                .iter()
                .find(|(down, up)| op.invoke_ms > *down && op.complete_ms < *up);
            if let Some((down, up)) = inside {
                found.push(violation(
                    Check::GrantedWhileRedisDown,
                    format!(
                        "reservation {} granted in {}..{} ms while Redis was down ({down}..{} ms)",
                        op.reservation.as_deref().unwrap_or("?"),
                        op.invoke_ms,
                        op.complete_ms,
                        if *up == u64::MAX {
                            "end".to_owned()
                        } else {
                            up.to_string()
                        }
                    ),
                    [op.op],
                ));
            }
        }
        if let (Some(k), true) = (key, granted || matches!(op.status, Outcome::Error(_))) {
            maybe_granted.entry(k).or_insert(op.op);
        }
    }
    found
}

/// Final counts as a tuple `(available, held, sold, stock)`, to group instances that agree in a stable order
/// (`DropCounts` has no order of its own).
type CountsKey = (i64, i64, i64, i64);

/// Every instance read the drop, they agree, the counts add up to the stock with nothing negative and no hold
/// left, and `sold` is the units in Postgres.
fn final_counts(db: &DbSnapshot, finals: &[FinalRead]) -> Vec<Violation> {
    let mut found = Vec::new();
    let mut groups: BTreeMap<CountsKey, (DropCounts, Vec<&FinalRead>)> = BTreeMap::new();
    for read in finals {
        match read.counts {
            Some(c) => {
                let key = (c.available, c.held, c.sold, c.stock);
                groups.entry(key).or_insert((c, Vec::new())).1.push(read);
            }
            None => found.push(violation(
                Check::FinalStateUnread,
                format!(
                    "instance {} did not answer GET /drops/{{id}} after the run",
                    read.instance
                ),
                read.op,
            )),
        }
    }
    if groups.len() > 1 {
        let shown: Vec<String> = groups
            .values()
            .map(|(c, reads)| {
                format!(
                    "instances {:?}: available {} held {} sold {}",
                    instances_of(reads),
                    c.available,
                    c.held,
                    c.sold
                )
            })
            .collect();
        found.push(violation(
            Check::InstancesDisagree,
            shown.join("; "),
            finals.iter().filter_map(|r| r.op),
        ));
    }
    for (counts, reads) in groups.values() {
        found.extend(one_final_state(db, counts, reads));
    }
    found
}

/// The checks of one final state, which `reads` (one or more instances) answered.
fn one_final_state(db: &DbSnapshot, c: &DropCounts, reads: &[&FinalRead]) -> Vec<Violation> {
    let who = format!("instances {:?}", instances_of(reads));
    let ops: Vec<u64> = reads.iter().filter_map(|r| r.op).collect();
    let mut found = Vec::new();
    let adds_up = c.available + c.held + c.sold == c.stock && c.stock == db.stock;
    if !adds_up || c.available < 0 || c.held < 0 || c.sold < 0 {
        found.push(violation(
            Check::CountsDoNotAddUp,
            format!(
                "{who}: available {} + held {} + sold {} vs stock {} (Postgres: {})",
                c.available, c.held, c.sold, c.stock, db.stock
            ),
            ops.clone(),
        ));
    }
    let units = db.purchased_units();
    if c.sold != units {
        found.push(violation(
            Check::SoldDiffersFromPostgres,
            format!(
                "{who}: sold {}, but Postgres has {units} units in purchases",
                c.sold
            ),
            ops.clone(),
        ));
    }
    if c.held != 0 {
        found.push(violation(
            Check::HoldsNotDrained,
            format!(
                "{who}: {} units still held after every hold expired",
                c.held
            ),
            ops,
        ));
    }
    found
}

fn instances_of(reads: &[&FinalRead]) -> Vec<usize> {
    reads.iter().map(|r| r.instance).collect()
}

/// A purchase row whose reservation row says `released`: the unit went back to sale and was sold too.
fn purchases_of_released_holds(db: &DbSnapshot, index: &Index) -> Vec<Violation> {
    let released: HashMap<&str, &ReservationRow> = db
        .reservations
        .iter()
        .filter(|r| r.status == "released")
        .map(|r| (r.id.as_str(), r))
        .collect();
    db.purchases
        .iter()
        .filter_map(|row| {
            let hold = released.get(row.reservation_id.as_str())?;
            Some(violation(
                Check::PurchaseOfReleasedHold,
                format!(
                    "purchase {} of reservation {} is stored, but the reservation is released ({})",
                    row.id,
                    row.reservation_id,
                    hold.reason.as_deref().unwrap_or("no reason")
                ),
                index
                    .by_reservation
                    .get(row.reservation_id.as_str())
                    .into_iter()
                    .flatten()
                    .map(|op| op.op),
            ))
        })
        .collect()
}

/// A map's entries in key order, so violations come out the same way every time.
fn sorted<'m, 'a, V>(map: &'m HashMap<&'a str, V>) -> Vec<(&'a str, &'m V)> {
    let mut entries: Vec<_> = map.iter().map(|(k, v)| (*k, v)).collect();
    entries.sort_by_key(|(k, _)| *k);
    entries
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::history::{FaultEvent, FaultTag, RunTag};
    use serde_json::{json, Value};

    const STARTED: &str = "2025-01-01T00:00:00Z";

    fn op(
        id: u64,
        kind: OpKind,
        member: &str,
        reservation: &str,
        t: (u64, u64),
        status: u16,
        response: Value,
    ) -> Op {
        Op {
            op: id,
            kind,
            buyer: Some(0),
            member: Some(member.into()),
            instance: 0,
            reservation: Some(reservation.into()),
            method: "POST".into(),
            path: format!("/api/v1/reservations/{reservation}"),
            body: None,
            idempotency_key: Some(format!("key-{id}")),
            invoke_ms: t.0,
            complete_ms: t.1,
            status: Outcome::Status(status),
            response,
        }
    }

    /// A 201 for a hold that expires two seconds after the run's start.
    fn reserve(id: u64, member: &str, reservation: &str, t: (u64, u64)) -> Op {
        let body =
            json!({"id": reservation, "status": "held", "expires_at": "2025-01-01T00:00:02Z"});
        op(id, OpKind::Reserve, member, reservation, t, 201, body)
    }

    fn pay_ok(id: u64, member: &str, reservation: &str, purchase: &str, t: (u64, u64)) -> Op {
        let body =
            json!({"reservation_id": reservation, "purchase_id": purchase, "status": "paid"});
        op(id, OpKind::Pay, member, reservation, t, 200, body)
    }

    fn read(id: u64, member: &str, reservation: &str, status: &str, t: (u64, u64)) -> Op {
        op(
            id,
            OpKind::Read,
            member,
            reservation,
            t,
            200,
            json!({"id": reservation, "status": status}),
        )
    }

    fn error(code: &str) -> Value {
        json!({"error": {"code": code, "message": code}})
    }

    fn fault(what: FaultWhat, start_ms: u64, end_ms: u64) -> FaultEvent {
        FaultEvent {
            kind: FaultTag::Fault,
            what,
            instance: None,
            start_ms,
            end_ms,
            ok: true,
            detail: String::new(),
        }
    }

    fn purchase(id: &str, reservation: &str, member: &str, quantity: i64) -> PurchaseRow {
        PurchaseRow {
            id: id.into(),
            reservation_id: reservation.into(),
            member_id: member.into(),
            quantity,
        }
    }

    fn hold_row(id: &str, member: &str, status: &str, reason: Option<&str>) -> ReservationRow {
        ReservationRow {
            id: id.into(),
            member_id: member.into(),
            quantity: 1,
            status: status.into(),
            reason: reason.map(Into::into),
        }
    }

    fn finals(counts: [(i64, i64, i64); 3]) -> Vec<FinalRead> {
        counts
            .iter()
            .enumerate()
            .map(|(i, (available, held, sold))| FinalRead {
                instance: i,
                op: Some(900 + i as u64),
                counts: Some(DropCounts {
                    stock: 3,
                    available: *available,
                    held: *held,
                    sold: *sold,
                }),
            })
            .collect()
    }

    struct World {
        history: History,
        db: DbSnapshot,
        finals: Vec<FinalRead>,
    }

    impl World {
        fn violations(&self) -> Vec<Violation> {
            check(&self.history, &self.db, &self.finals)
        }

        /// The violations of one kind; fails if there is none.
        fn found(&self, kind: Check) -> Vec<Violation> {
            let all = self.violations();
            let of_kind: Vec<_> = all.iter().filter(|v| v.check == kind).cloned().collect();
            assert!(!of_kind.is_empty(), "expected {kind:?} in {all:#?}");
            of_kind
        }
    }

    /// Three units; M1 reserves and pays R1; M2 reserves R2 and cancels it; Redis is killed at 100-101 ms and
    /// restarted at 200-210 ms, during which M2 is refused, then granted R3 in a call that straddles the restart,
    /// and is declined paying it.
    fn clean() -> World {
        let ops = vec![
            reserve(1, "M1", "R1", (0, 5)),
            pay_ok(2, "M1", "R1", "P1", (10, 20)),
            read(3, "M1", "R1", "paid", (30, 31)),
            reserve(4, "M2", "R2", (40, 45)),
            op(5, OpKind::Cancel, "M2", "R2", (50, 52), 204, Value::Null),
            read(6, "M2", "R2", "released", (60, 61)),
            op(
                7,
                OpKind::Reserve,
                "M2",
                "",
                (120, 130),
                503,
                error("gate_unavailable"),
            ),
            reserve(8, "M2", "R3", (195, 230)),
            op(
                9,
                OpKind::Pay,
                "M2",
                "R3",
                (240, 250),
                402,
                error("payment_declined"),
            ),
            // A read that overlaps the payment may see either state.
            read(10, "M1", "R1", "held", (12, 14)),
        ];
        let history = History {
            run: Some(RunInfo {
                kind: RunTag::Run,
                seed: 1,
                started_at: STARTED.into(),
                drop_id: "D".into(),
                stock: 3,
                per_member_limit: 2,
                hold_seconds: 2,
                pay_lease_seconds: 2,
                instances: 3,
                seconds: 60,
            }),
            ops,
            faults: vec![
                fault(FaultWhat::KillRedis, 100, 101),
                fault(FaultWhat::RestartRedis, 200, 210),
            ],
        };
        World {
            history,
            db: DbSnapshot {
                stock: 3,
                per_member_limit: 2,
                purchases: vec![purchase("P1", "R1", "M1", 1)],
                reservations: vec![
                    hold_row("R1", "M1", "paid", None),
                    hold_row("R2", "M2", "released", Some("cancelled")),
                    hold_row("R3", "M2", "released", Some("payment_declined")),
                ],
            },
            finals: finals([(2, 0, 1); 3]),
        }
    }

    #[test]
    fn a_clean_history_passes() {
        assert_eq!(clean().violations(), []);
    }

    #[test]
    fn a_double_sale_is_reported() {
        let mut w = clean();
        // Two more units paid than remain: R4 (M3) and R5 (M4, two units), R5's payment after its hold expired.
        w.history.ops.push(reserve(11, "M3", "R4", (300, 310)));
        w.history.ops.push(pay_ok(12, "M3", "R4", "P4", (320, 330)));
        w.history.ops.push(reserve(13, "M4", "R5", (400, 410)));
        w.history
            .ops
            .push(pay_ok(14, "M4", "R5", "P5", (1000, 2500)));
        w.db.purchases.push(purchase("P4", "R4", "M3", 1));
        w.db.purchases.push(purchase("P5", "R5", "M4", 2));
        let found = w.found(Check::Oversold);
        assert_eq!(found[0].ops, [14], "{found:?}");
        assert!(found[0].detail.starts_with("4 units paid"), "{found:?}");
    }

    #[test]
    fn a_lost_acknowledgement_is_reported() {
        let mut w = clean();
        w.db.purchases.clear();
        assert_eq!(w.found(Check::AckLost)[0].ops, [2]);
    }

    #[test]
    fn a_purchase_stored_twice_is_reported() {
        let mut w = clean();
        w.db.purchases.push(purchase("P1b", "R1", "M1", 1));
        assert_eq!(w.found(Check::AckStoredTwice)[0].ops, [2]);
    }

    #[test]
    fn two_rows_for_an_unacknowledged_reservation_are_reported() {
        let mut w = clean();
        w.history.ops.push(reserve(11, "M3", "R4", (300, 310)));
        let mut lost = op(12, OpKind::Pay, "M3", "R4", (320, 330), 0, Value::Null);
        lost.status = Outcome::Error("error: timeout: no answer".into());
        w.history.ops.push(lost);
        w.db.purchases.push(purchase("P4", "R4", "M3", 1));
        w.db.purchases.push(purchase("P4b", "R4", "M3", 1));
        assert_eq!(w.found(Check::TwoPurchasesOneReservation)[0].ops, [12]);
    }

    #[test]
    fn an_acknowledged_purchase_under_another_id_is_reported() {
        let mut w = clean();
        w.db.purchases[0].id = "P-other".into();
        assert_eq!(w.found(Check::AckPurchaseIdDiffers)[0].ops, [2]);
    }

    #[test]
    fn a_hold_that_goes_backwards_is_reported() {
        let mut w = clean();
        w.history
            .ops
            .push(read(11, "M1", "R1", "released", (40, 41)));
        assert_eq!(w.found(Check::HoldWentBackwards)[0].ops, [2, 3, 11]);

        // A 409 released answer to a payment after a 200 is the same thing.
        let mut w = clean();
        w.history.ops.push(op(
            11,
            OpKind::Pay,
            "M1",
            "R1",
            (40, 41),
            409,
            error("hold_expired"),
        ));
        assert_eq!(w.found(Check::HoldWentBackwards)[0].ops, [2, 3, 11]);

        // So is a 200 after the hold was seen released.
        let mut w = clean();
        w.history.ops.push(pay_ok(11, "M2", "R2", "P2", (70, 80)));
        w.db.purchases.push(purchase("P2", "R2", "M2", 1));
        assert_eq!(w.found(Check::HoldWentBackwards)[0].ops, [5, 6, 11]);
    }

    #[test]
    fn overlapping_observations_are_not_ordered() {
        let mut w = clean();
        // Invoked before the 200 completed and completed after the later read began: no order is certain.
        w.history
            .ops
            .push(read(11, "M1", "R1", "released", (15, 35)));
        assert!(!w
            .violations()
            .iter()
            .any(|v| v.check == Check::HoldWentBackwards));
    }

    #[test]
    fn two_purchase_ids_for_one_hold_are_reported() {
        let mut w = clean();
        let mut other = read(11, "M1", "R1", "paid", (40, 41));
        other.response["purchase_id"] = json!("P9");
        w.history.ops.push(other);
        assert_eq!(w.found(Check::TwoPurchaseIds)[0].ops, [2, 11]);
    }

    #[test]
    fn a_member_over_the_limit_is_reported() {
        let mut w = clean();
        w.history.ops.push(reserve(11, "M1", "R4", (300, 310)));
        w.history.ops.push(pay_ok(12, "M1", "R4", "P4", (320, 330)));
        w.db.purchases.push(purchase("P4", "R4", "M1", 2));
        w.finals = finals([(0, 0, 3); 3]);
        assert_eq!(w.found(Check::MemberOverLimit)[0].ops, [2, 12]);
    }

    #[test]
    fn a_reservation_granted_while_redis_was_down_is_reported() {
        let mut w = clean();
        w.history.ops.push(reserve(11, "M3", "R4", (150, 160)));
        w.history.ops.push(op(
            12,
            OpKind::Cancel,
            "M3",
            "R4",
            (170, 180),
            204,
            Value::Null,
        ));
        let found = w.found(Check::GrantedWhileRedisDown);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].ops, [11]);
    }

    #[test]
    fn only_grants_certainly_inside_the_window_count() {
        let mut w = clean();
        // Invoked in the very millisecond the kill ended: not certainly after it.
        w.history.ops.push(reserve(11, "M3", "R4", (101, 150)));
        // The replay of an attempt that got no answer before the kill.
        let mut lost = op(12, OpKind::Reserve, "M4", "", (90, 140), 0, Value::Null);
        lost.status = Outcome::Error("error: timeout: no answer".into());
        lost.idempotency_key = Some("same".into());
        let mut replay = reserve(13, "M4", "R5", (150, 160));
        replay.idempotency_key = Some("same".into());
        w.history.ops.extend([lost, replay]);
        assert!(
            !w.violations()
                .iter()
                .any(|v| v.check == Check::GrantedWhileRedisDown),
            "{:?}",
            w.violations()
        );
    }

    #[test]
    fn redis_windows_close_at_the_restart_and_stay_open_without_one() {
        let mut w = clean();
        assert_eq!(redis_down_windows(&w.history), [(101, 200)]);
        w.history.faults.push(fault(FaultWhat::KillRedis, 500, 505));
        assert_eq!(
            redis_down_windows(&w.history),
            [(101, 200), (505, u64::MAX)]
        );
    }

    #[test]
    fn disagreeing_instances_are_reported() {
        let mut w = clean();
        w.finals = finals([(2, 0, 1), (1, 1, 1), (2, 0, 1)]);
        assert_eq!(w.found(Check::InstancesDisagree)[0].ops, [900, 901, 902]);
        // The odd one also still holds a unit.
        assert_eq!(w.found(Check::HoldsNotDrained)[0].ops, [901]);
    }

    #[test]
    fn counts_that_do_not_add_up_or_differ_from_postgres_are_reported() {
        let mut w = clean();
        w.finals = finals([(2, 0, 2); 3]);
        assert_eq!(w.found(Check::CountsDoNotAddUp)[0].ops, [900, 901, 902]);
        assert_eq!(
            w.found(Check::SoldDiffersFromPostgres)[0].ops,
            [900, 901, 902]
        );
        let mut w = clean();
        w.finals = finals([(3, 0, 0); 3]);
        assert_eq!(w.found(Check::SoldDiffersFromPostgres).len(), 1);
        w.finals[1].counts = None;
        assert_eq!(w.found(Check::FinalStateUnread)[0].ops, [901]);
    }

    #[test]
    fn a_purchase_of_a_released_hold_is_reported() {
        let mut w = clean();
        w.db.reservations[0].status = "released".into();
        w.db.reservations[0].reason = Some("expired".into());
        assert_eq!(w.found(Check::PurchaseOfReleasedHold)[0].ops, [1, 2, 3, 10]);
    }

    #[test]
    fn final_reads_come_from_the_last_drop_read_of_each_instance() {
        let mut history = clean().history;
        let mut first = op(
            20,
            OpKind::DropRead,
            "",
            "",
            (500, 501),
            200,
            json!({"stock": 3, "available": 1, "held": 1, "sold": 1}),
        );
        first.reservation = None;
        let mut last = first.clone();
        last.op = 21;
        last.response = json!({"stock": 3, "available": 2, "held": 0, "sold": 1});
        history.ops.extend([first, last]);
        let reads = final_reads(&history, 2);
        assert_eq!(reads[0].op, Some(21));
        assert_eq!(reads[0].counts.map(|c| c.available), Some(2));
        assert_eq!(
            reads[1],
            FinalRead {
                instance: 1,
                op: None,
                counts: None
            }
        );
    }
}
