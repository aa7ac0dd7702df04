//! The engine's vocabulary outside the core: drops as configured, purchases as stored, and the outcomes the
//! service returns. Plain data; the HTTP layer converts these to its wire types.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::core::{Counts, HoldState, HoldView, ReleaseReason, RestoredHold};

/// A drop as created by its seller: what is sold, how much, when, and under which limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropSpec {
    pub id: Uuid,
    /// Assigned by Postgres when the drop is stored: a small number that never repeats (the Redis gate writes it
    /// into reservation ids).
    pub seq: i64,
    pub product_id: Uuid,
    pub seller_id: Uuid,
    pub stock: u32,
    pub opens_at: DateTime<Utc>,
    pub closes_at: Option<DateTime<Utc>>,
    pub per_member_limit: u32,
    pub hold_seconds: u32,
    /// Price of one unit, in the currency's smallest unit.
    pub price: i64,
    pub currency: String,
    pub created_at: DateTime<Utc>,
    /// How units are given out: a race (`FirstCome`) or by a draw, whose holds only the draw's allocator takes.
    pub mode: DropMode,
    /// When a draw ranks its entries; `None` for other modes.
    pub draw_at: Option<DateTime<Utc>>,
    /// A queue drop's waiting room terms; `None` for other modes.
    pub queue: Option<QueueTerms>,
    /// A campaign's goal (API.md, "Preorder campaigns"): all or nothing at `closes_at`; `None` for other drops.
    pub goal_units: Option<u32>,
}

/// How a queue drop's waiting room runs (API.md, "Launch modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueTerms {
    /// From when members may join (never after `opens_at`).
    pub queue_opens_at: DateTime<Utc>,
    /// How long an admission pass is valid.
    pub pass_seconds: u32,
    /// A ceiling on admissions per second; `None`: the stock alone decides.
    pub admit_per_second: Option<u32>,
}

/// A drop's waiting room in numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QueueCounts {
    /// Members waiting (the pre-queue included).
    pub waiting: u64,
    /// Admitted members whose pass is valid and who have not reserved yet.
    pub admitted: u64,
    /// Members admitted per second, measured over the last window.
    pub admit_rate: f64,
}

/// A drop's launch mode (API.md, "Launch modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropMode {
    FirstCome,
    Draw,
    Queue,
}

impl DropMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DropMode::FirstCome => "first_come",
            DropMode::Draw => "draw",
            DropMode::Queue => "queue",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "first_come" => Some(DropMode::FirstCome),
            "draw" => Some(DropMode::Draw),
            "queue" => Some(DropMode::Queue),
            _ => None,
        }
    }
}

impl DropSpec {
    pub fn opens_at_ms(&self) -> i64 {
        self.opens_at.timestamp_millis()
    }

    pub fn closes_at_ms(&self) -> Option<i64> {
        self.closes_at.map(|at| at.timestamp_millis())
    }

    /// Where the drop stands at `now_ms` given its counts: the clock decides scheduled/closed, stock decides
    /// open/sold_out.
    pub fn status(&self, now_ms: i64, counts: &Counts) -> DropStatus {
        if now_ms < self.opens_at_ms() {
            DropStatus::Scheduled
        } else if self.closes_at_ms().is_some_and(|closes| now_ms >= closes) {
            DropStatus::Closed
        } else if counts.available == 0 {
            DropStatus::SoldOut
        } else {
            DropStatus::Open
        }
    }
}

/// What creating a drop needs; the engine assigns the id.
#[derive(Debug, Clone)]
pub struct NewDrop {
    pub product_id: Uuid,
    pub seller_id: Uuid,
    pub stock: u32,
    pub opens_at: DateTime<Utc>,
    pub closes_at: Option<DateTime<Utc>>,
    pub per_member_limit: u32,
    pub hold_seconds: u32,
    pub price: i64,
    pub currency: String,
    pub mode: DropMode,
    /// A draw's time and its 32-byte secret seed (stored with the drop, in the same statement).
    pub draw: Option<DrawTerms>,
    /// A queue drop's terms.
    pub queue: Option<QueueTerms>,
    /// A campaign's goal in units (1..=stock, with `closes_at`); `None` for a drop that is not a campaign.
    pub goal_units: Option<u32>,
}

/// What a draw drop is created with.
#[derive(Debug, Clone)]
pub struct DrawTerms {
    pub draw_at: DateTime<Utc>,
    pub seed: [u8; 32],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropStatus {
    Scheduled,
    Open,
    SoldOut,
    Closed,
}

impl DropStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DropStatus::Scheduled => "scheduled",
            DropStatus::Open => "open",
            DropStatus::SoldOut => "sold_out",
            DropStatus::Closed => "closed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "scheduled" => Some(DropStatus::Scheduled),
            "open" => Some(DropStatus::Open),
            "sold_out" => Some(DropStatus::SoldOut),
            "closed" => Some(DropStatus::Closed),
            _ => None,
        }
    }
}

/// A drop with its live counts.
#[derive(Debug, Clone)]
pub struct DropInfo {
    pub spec: DropSpec,
    pub counts: Counts,
    pub status: DropStatus,
    /// A queue drop's waiting room; `None` for other modes.
    pub queue: Option<QueueCounts>,
}

/// A reservation (hold) as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub id: Uuid,
    pub drop_id: Uuid,
    pub member_id: Uuid,
    pub quantity: u32,
    pub state: HoldState,
    pub expires_at: DateTime<Utc>,
    pub purchase_id: Option<Uuid>,
}

impl Reservation {
    pub fn from_hold(drop_id: Uuid, hold: &HoldView, purchase_id: Option<Uuid>) -> Self {
        Self {
            id: hold.id,
            drop_id,
            member_id: hold.member,
            quantity: hold.quantity,
            state: hold.state,
            expires_at: crate::clock::to_datetime(hold.expires_at_ms),
            purchase_id,
        }
    }
}

/// A paid purchase: what the writer stores and what a payment answers, the same every time it is asked.
/// A new hold, as stored.
#[derive(Debug, Clone)]
pub struct HoldRow {
    pub id: Uuid,
    pub drop_id: Uuid,
    pub member_id: Uuid,
    pub quantity: u32,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// A drop's state rebuilt from Postgres at load time.
#[derive(Debug, Default, Clone)]
pub struct Restore {
    /// Units paid per member.
    pub paid: Vec<(Uuid, u32)>,
    /// The reservations that were paid.
    pub paid_holds: Vec<Uuid>,
    /// Holds still alive.
    pub held: Vec<RestoredHold>,
}

/// What a drop's report counts, each second (`service::tally`): the column order of `drop_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Reserved,
    Paid,
    Expired,
    Cancelled,
    Declined,
    RefusedSoldOut,
    RefusedLimit,
    RefusedOverload,
}

/// How many kinds of `Event` there are.
pub const EVENTS: usize = 8;

/// A drop's counts in one second (seconds from its opening), per `Event`, as the writer stores them: added to what
/// other instances stored for the same second.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecondRow {
    pub drop_id: Uuid,
    pub second: i32,
    pub counts: [i64; EVENTS],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purchase {
    pub id: Uuid,
    pub reservation_id: Uuid,
    pub drop_id: Uuid,
    pub product_id: Uuid,
    pub member_id: Uuid,
    pub quantity: u32,
    pub amount: i64,
    pub currency: String,
    pub paid_at: DateTime<Utc>,
}

pub fn state_name(state: HoldState) -> &'static str {
    match state {
        HoldState::Held => "held",
        HoldState::Paying => "paying",
        HoldState::Paid => "paid",
        HoldState::Released(_) => "released",
    }
}

pub fn reason_name(reason: ReleaseReason) -> &'static str {
    match reason {
        ReleaseReason::Cancelled => "cancelled",
        ReleaseReason::Expired => "expired",
        ReleaseReason::PaymentDeclined => "payment_declined",
    }
}

pub fn parse_reason(text: &str) -> Option<ReleaseReason> {
    match text {
        "cancelled" => Some(ReleaseReason::Cancelled),
        "expired" => Some(ReleaseReason::Expired),
        "payment_declined" => Some(ReleaseReason::PaymentDeclined),
        _ => None,
    }
}

#[cfg(test)]
impl DropSpec {
    /// A drop for unit tests: open since the epoch, never closing, 60-second holds, 100 KRW a unit.
    pub(crate) fn for_tests(stock: u32, per_member_limit: u32, mode: DropMode) -> Self {
        use chrono::TimeZone;
        let epoch = Utc.timestamp_millis_opt(0).unwrap();
        Self {
            id: Uuid::now_v7(),
            seq: 1,
            product_id: Uuid::now_v7(),
            seller_id: Uuid::now_v7(),
            stock,
            opens_at: epoch,
            closes_at: None,
            per_member_limit,
            hold_seconds: 60,
            price: 100,
            currency: "KRW".into(),
            created_at: epoch,
            mode,
            draw_at: None,
            queue: None,
            goal_units: None,
        }
    }
}
