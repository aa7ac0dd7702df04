//! The waiting room of a queue drop (API.md, "Launch modes"; DESIGN.md guarantee 11): who waits in which order,
//! who is admitted, and how fast. Two implementations with one behaviour: `MemoryRoom` here (one instance, beside
//! the embedded gate) and `redis::RedisRoom` (every instance, under the drop's hash tag, so any instance serves
//! any member).
//!
//! **Order.** A member who joins before `opens_at` waits in the pre-queue with a random key drawn at the join
//! (uniform, independent of when they joined); at `opens_at` the pre-queue is placed in the order of those keys, a
//! uniform shuffle. Later members go behind them in the order they joined. Joining again keeps one's place.
//!
//! **Admission follows the stock.** Every tick (any instance, any number of times: each tick is one atomic step)
//! admits members from the head while the admitted members who have not reserved yet are fewer than the units
//! available, and never faster than `admit_per_second` (a token bucket of one second's worth). A member who
//! reserves no longer counts against the stock (the hold does); a pass that expires unused frees its place, and the
//! member may join again, at the back. A unit that comes back (expiry, cancel, decline) is available again, so the
//! next tick admits the next member.
//!
//! **Sold out and the ETA** are derived on read from the drop's counts, so a waiting member learns "sold out" on the
//! first look after it became true. The ETA divides the people ahead by the measured admission rate (admissions
//! over the last window of `RATE_WINDOW_MS`), and is unknown while nothing is available.

use std::collections::{HashMap, VecDeque};

use async_trait::async_trait;
use parking_lot::Mutex;
use uuid::Uuid;

use super::GateResult;
use crate::core::{Counts, IdHasher};
use crate::types::{DropSpec, QueueCounts, QueueTerms};

/// The window over which the admission rate (for the ETA) is measured.
pub const RATE_WINDOW_MS: i64 = 10_000;

/// Where a member stands in a drop's waiting room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Waiting; `position` (1-based among those still waiting) is `None` in the pre-queue, before `opens_at`.
    Waiting { position: Option<u64> },
    /// Admitted with a pass valid until `pass_expires_ms`; `used` once the member reserved.
    Admitted { pass_expires_ms: i64, used: bool },
    /// Admitted, but the pass expired unused: the place is gone (join again, at the back).
    Expired,
}

/// What a member's status read needs of the room: their place, the room's admission rate and, from a room that
/// sees the drop's counters itself (Redis), the drop's counts, read in one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sighting {
    pub place: Place,
    /// Admissions per second, as `QueueCounts::admit_rate`.
    pub admit_rate: f64,
    /// The drop's counts read with the place; `None` from a room that leaves them to the gate.
    pub counts: Option<Counts>,
}

/// What a join made in one step with a read of the drop's counts found (`WaitingRoom::join_counted`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Joining {
    /// Nothing is left to sell or to come back (`Counts::gone`): no place was taken.
    SoldOut,
    /// The member's place, as `join` answers it, with the room's admission rate and the drop's counts.
    Placed {
        place: Place,
        new: bool,
        admit_rate: f64,
        counts: Counts,
    },
}

#[async_trait]
pub trait WaitingRoom: Send + Sync + 'static {
    /// Puts `member` in the drop's queue, or finds their place; `true` when they took a new place (first join, or
    /// again after their pass expired).
    async fn join(&self, drop: &DropSpec, member: Uuid, now_ms: i64) -> GateResult<(Place, bool)>;
    /// `join` with the sold-out check before it, in one step with a read of the drop's counts and the admission
    /// rate, where the room sees the drop's counters itself (Redis: one script call, shared by a drop's concurrent
    /// joins, where the counts, the join and the rate were two round trips). `None` from a room that leaves the
    /// counts to the gate (the caller reads them, checks and joins), and from Redis when the drop's keys are gone
    /// (the gate's read rebuilds them).
    async fn join_counted(
        &self,
        _drop: &DropSpec,
        _member: Uuid,
        _now_ms: i64,
    ) -> GateResult<Option<Joining>> {
        Ok(None)
    }
    /// The member's place, or `None` if they never joined.
    async fn place(&self, drop: &DropSpec, member: Uuid, now_ms: i64) -> GateResult<Option<Place>>;
    /// The member's place with what a status read needs beside it (`Sighting`), or `None` if they never joined.
    /// The status polls of a queue launch are most of its requests: in Redis this is one script call, where the
    /// place, the rate and the drop's counts were three round trips.
    async fn sighting(
        &self,
        drop: &DropSpec,
        member: Uuid,
        now_ms: i64,
    ) -> GateResult<Option<Sighting>> {
        let Some(place) = self.place(drop, member, now_ms).await? else {
            return Ok(None);
        };
        let admit_rate = self.counts(drop, now_ms).await?.admit_rate;
        Ok(Some(Sighting {
            place,
            admit_rate,
            counts: None,
        }))
    }
    /// One admission step at `now_ms` given the drop's counts; returns how many members it admitted.
    async fn tick(&self, drop: &DropSpec, now_ms: i64, counts: Counts) -> GateResult<u64>;
    /// The room's numbers.
    async fn counts(&self, drop: &DropSpec, now_ms: i64) -> GateResult<QueueCounts>;
    /// `member` reserved with their pass: they stop counting against the units available. A room that sees the
    /// drop's holds itself (Redis: the member's units) does nothing here.
    fn reserved(&self, _drop: Uuid, _member: Uuid) {}
    /// Forgets the drop (it left memory).
    async fn unload(&self, drop: Uuid);
}

/// The queue terms of a queue drop; `None` for other modes.
fn terms(drop: &DropSpec) -> Option<&QueueTerms> {
    drop.queue.as_ref()
}

/// A member's state in one room.
#[derive(Debug, Clone, Copy)]
enum Member {
    /// Waiting; the ordinal is set once the member is in the line (after `opens_at`).
    Waiting(Option<u64>),
    Admitted {
        pass_expires_ms: i64,
        used: bool,
    },
    Expired,
}

/// Admissions per second over a sliding pair of windows.
#[derive(Debug, Default, Clone, Copy)]
pub struct RateWindow {
    started_ms: i64,
    count: u64,
    previous: Option<f64>,
}

impl RateWindow {
    pub fn record(&mut self, now_ms: i64, admitted: u64) {
        if self.started_ms == 0 {
            self.started_ms = now_ms;
        }
        if now_ms - self.started_ms >= RATE_WINDOW_MS {
            let seconds = (now_ms - self.started_ms) as f64 / 1000.0;
            self.previous = Some(self.count as f64 / seconds);
            self.started_ms = now_ms;
            self.count = 0;
        }
        self.count += admitted;
    }

    pub fn rate(&self, now_ms: i64) -> f64 {
        if let Some(previous) = self.previous {
            return previous;
        }
        let seconds = ((now_ms - self.started_ms) as f64 / 1000.0).max(1.0);
        if self.started_ms == 0 {
            0.0
        } else {
            self.count as f64 / seconds
        }
    }
}

/// One drop's room in memory.
#[derive(Debug, Default)]
struct Room {
    members: HashMap<Uuid, Member, IdHasher>,
    /// The pre-queue with each member's random key, until it is placed at `opens_at`.
    pre: Vec<(u64, Uuid)>,
    placed: bool,
    /// Waiting members in order; `line[0]` has ordinal `head`.
    line: VecDeque<Uuid>,
    head: u64,
    /// Admitted members who have not reserved yet, with their pass's expiry.
    outstanding: HashMap<Uuid, i64, IdHasher>,
    tokens: f64,
    last_tick_ms: i64,
    rate: RateWindow,
}

impl Room {
    /// Places the pre-queue at the opening: sorted by the keys drawn at joining, a uniform shuffle.
    fn place_pre_queue(&mut self) {
        if self.placed {
            return;
        }
        self.placed = true;
        self.pre.sort_unstable();
        for (_, member) in std::mem::take(&mut self.pre) {
            self.push(member);
        }
    }

    fn push(&mut self, member: Uuid) {
        let ordinal = self.head + self.line.len() as u64;
        self.line.push_back(member);
        self.members.insert(member, Member::Waiting(Some(ordinal)));
    }

    fn place_of(&self, member: Uuid, now_ms: i64) -> Option<Place> {
        Some(match *self.members.get(&member)? {
            Member::Waiting(ordinal) => Place::Waiting {
                position: ordinal.map(|ordinal| ordinal - self.head + 1),
            },
            Member::Admitted {
                pass_expires_ms,
                used,
            } if used || pass_expires_ms > now_ms => Place::Admitted {
                pass_expires_ms,
                used,
            },
            Member::Admitted { .. } | Member::Expired => Place::Expired,
        })
    }

    fn join(&mut self, drop: &DropSpec, member: Uuid, now_ms: i64) -> (Place, bool) {
        let open = now_ms >= drop.opens_at_ms();
        if open {
            self.place_pre_queue();
        }
        match self.place_of(member, now_ms) {
            Some(Place::Expired) | None => {}
            Some(place) => return (place, false),
        }
        self.outstanding.remove(&member);
        let position = if open {
            self.push(member);
            Some(self.line.len() as u64)
        } else {
            self.pre.push((rand::random(), member));
            self.members.insert(member, Member::Waiting(None));
            None
        };
        (Place::Waiting { position }, true)
    }

    fn tick(&mut self, terms: &QueueTerms, now_ms: i64, counts: Counts) -> u64 {
        self.place_pre_queue();
        let members = &mut self.members;
        self.outstanding.retain(|member, expires| {
            let live = *expires > now_ms;
            if !live {
                members.insert(*member, Member::Expired);
            }
            live
        });
        let room = u64::from(counts.available).saturating_sub(self.outstanding.len() as u64);
        let mut admit = room.min(self.line.len() as u64);
        if let Some(per_second) = terms.admit_per_second {
            let per_second = f64::from(per_second);
            let elapsed = if self.last_tick_ms == 0 {
                1.0
            } else {
                (now_ms - self.last_tick_ms).max(0) as f64 / 1000.0
            };
            self.tokens = (self.tokens + elapsed * per_second).min(per_second);
            admit = admit.min(self.tokens.floor() as u64);
            self.tokens -= admit as f64;
        }
        self.last_tick_ms = now_ms;
        let pass_expires_ms = now_ms + i64::from(terms.pass_seconds) * 1000;
        for _ in 0..admit {
            let Some(member) = self.line.pop_front() else {
                break;
            };
            self.head += 1;
            self.members.insert(
                member,
                Member::Admitted {
                    pass_expires_ms,
                    used: false,
                },
            );
            self.outstanding.insert(member, pass_expires_ms);
        }
        self.rate.record(now_ms, admit);
        admit
    }

    fn reserved(&mut self, member: Uuid) {
        if self.outstanding.remove(&member).is_some() {
            if let Some(Member::Admitted { used, .. }) = self.members.get_mut(&member) {
                *used = true;
            }
        }
    }

    fn counts(&self, now_ms: i64) -> QueueCounts {
        QueueCounts {
            waiting: (self.line.len() + self.pre.len()) as u64,
            admitted: self.outstanding.len() as u64,
            admit_rate: self.rate.rate(now_ms),
        }
    }
}

/// The waiting rooms of one instance, in memory (beside the embedded gate).
#[derive(Debug, Default)]
pub struct MemoryRoom {
    rooms: dashmap::DashMap<Uuid, Mutex<Room>, IdHasher>,
}

impl MemoryRoom {
    fn with<T>(&self, drop: Uuid, f: impl FnOnce(&mut Room) -> T) -> T {
        let room = self.rooms.entry(drop).or_default();
        let mut room = room.lock();
        f(&mut room)
    }
}

#[async_trait]
impl WaitingRoom for MemoryRoom {
    async fn join(&self, drop: &DropSpec, member: Uuid, now_ms: i64) -> GateResult<(Place, bool)> {
        Ok(self.with(drop.id, |room| room.join(drop, member, now_ms)))
    }

    async fn place(&self, drop: &DropSpec, member: Uuid, now_ms: i64) -> GateResult<Option<Place>> {
        Ok(self
            .rooms
            .get(&drop.id)
            .and_then(|room| room.lock().place_of(member, now_ms)))
    }

    async fn tick(&self, drop: &DropSpec, now_ms: i64, counts: Counts) -> GateResult<u64> {
        let Some(terms) = terms(drop) else {
            return Ok(0);
        };
        if now_ms < drop.opens_at_ms() {
            return Ok(0);
        }
        Ok(self.with(drop.id, |room| room.tick(terms, now_ms, counts)))
    }

    async fn counts(&self, drop: &DropSpec, now_ms: i64) -> GateResult<QueueCounts> {
        Ok(self
            .rooms
            .get(&drop.id)
            .map(|room| room.lock().counts(now_ms))
            .unwrap_or_default())
    }

    fn reserved(&self, drop: Uuid, member: Uuid) {
        if let Some(room) = self.rooms.get(&drop) {
            room.lock().reserved(member);
        }
    }

    async fn unload(&self, drop: Uuid) {
        self.rooms.remove(&drop);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    const OPENS_MS: i64 = 1_000_000;

    fn queue_drop(admit_per_second: Option<u32>) -> DropSpec {
        let at = |ms: i64| Utc.timestamp_millis_opt(ms).unwrap();
        DropSpec {
            opens_at: at(OPENS_MS),
            queue: Some(QueueTerms {
                queue_opens_at: at(0),
                pass_seconds: 120,
                admit_per_second,
            }),
            ..DropSpec::for_tests(10, 1, crate::types::DropMode::Queue)
        }
    }

    fn counts(available: u32, held: u32) -> Counts {
        Counts {
            stock: available + held,
            available,
            held,
            paid: 0,
        }
    }

    fn position(place: Place) -> Option<u64> {
        match place {
            Place::Waiting { position } => position,
            other => panic!("not waiting: {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_pre_queue_is_shuffled_at_the_opening_and_later_joins_queue_behind_in_order() {
        let room = MemoryRoom::default();
        let drop = queue_drop(None);
        let early: Vec<Uuid> = (0..200).map(|_| Uuid::now_v7()).collect();
        for &member in &early {
            let (place, new) = room.join(&drop, member, OPENS_MS - 10).await.unwrap();
            assert!(new);
            assert_eq!(place, Place::Waiting { position: None });
        }
        let late: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
        for &member in &late {
            room.join(&drop, member, OPENS_MS + 1).await.unwrap();
        }
        let mut positions = Vec::new();
        for &member in &early {
            let place = room
                .place(&drop, member, OPENS_MS + 1)
                .await
                .unwrap()
                .unwrap();
            positions.push(position(place).unwrap());
        }
        let mut sorted = positions.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (1..=200).collect::<Vec<u64>>(), "a permutation");
        assert_ne!(positions, sorted, "not the join order");
        for (i, &member) in late.iter().enumerate() {
            let place = room
                .place(&drop, member, OPENS_MS + 1)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(position(place), Some(201 + i as u64));
        }
        // Joining again keeps the place.
        let (again, new) = room.join(&drop, late[0], OPENS_MS + 2).await.unwrap();
        assert!(!new);
        assert_eq!(position(again), Some(201));
    }

    #[tokio::test]
    async fn admission_follows_the_units_available_and_an_expired_pass_admits_the_next() {
        let room = MemoryRoom::default();
        let drop = queue_drop(None);
        let members: Vec<Uuid> = (0..6).map(|_| Uuid::now_v7()).collect();
        for &member in &members {
            room.join(&drop, member, OPENS_MS).await.unwrap();
        }
        assert_eq!(room.tick(&drop, OPENS_MS, counts(2, 0)).await.unwrap(), 2);
        // Nobody reserved: two passes out for two units, so nobody more.
        assert_eq!(
            room.tick(&drop, OPENS_MS + 100, counts(2, 0))
                .await
                .unwrap(),
            0
        );
        // The first reserves: one unit held, one available, one pass out.
        room.reserved(drop.id, members[0]);
        assert_eq!(
            room.tick(&drop, OPENS_MS + 200, counts(1, 1))
                .await
                .unwrap(),
            0
        );
        // The second's pass expires unused: its place goes to the next.
        let later = OPENS_MS + 120_001;
        assert_eq!(room.tick(&drop, later, counts(1, 1)).await.unwrap(), 1);
        assert_eq!(
            room.place(&drop, members[1], later).await.unwrap(),
            Some(Place::Expired)
        );
        assert!(matches!(
            room.place(&drop, members[2], later).await.unwrap(),
            Some(Place::Admitted { used: false, .. })
        ));
        assert_eq!(
            room.place(&drop, members[3], later).await.unwrap(),
            Some(Place::Waiting { position: Some(1) })
        );
        // The expired member may join again, at the back.
        let (place, new) = room.join(&drop, members[1], later).await.unwrap();
        assert!(new);
        assert_eq!(position(place), Some(4));
    }

    #[tokio::test]
    async fn admission_never_outruns_admit_per_second() {
        let room = MemoryRoom::default();
        let drop = queue_drop(Some(3));
        for _ in 0..50 {
            room.join(&drop, Uuid::now_v7(), OPENS_MS).await.unwrap();
        }
        let mut admitted = 0;
        // Five seconds of ticks every 100 ms, with more units than members: only the rate limits.
        for tick in 0..50 {
            admitted += room
                .tick(&drop, OPENS_MS + tick * 100, counts(100, 0))
                .await
                .unwrap();
        }
        assert!(
            (13..=18).contains(&admitted),
            "admitted {admitted} in 5 s at 3/s"
        );
    }
}
