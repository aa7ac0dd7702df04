//! A drop's story, second by second, for its report: what the engine decided (reserved, paid, released by reason,
//! refused by reason), counted where it is decided and written through the writer's group commit as one row per
//! drop and second, added up across instances (`drop_seconds`).
//!
//! The hot path pays one striped counter bump: each drop keeps a ring of `SLOTS` seconds, and an event counts in
//! the slot of its second (seconds from the drop's opening, by the engine's clock). The reaper's tick takes what
//! every slot has counted (`Counter::take`, so nothing is counted twice or lost) and queues it for the writer,
//! unawaited. A slot is reused `SLOTS` seconds later, long after the tick (every `reaper_interval`, 1 s by
//! default) has taken its counts. What a process counted since its last tick is lost if it is killed.

use std::sync::atomic::{fence, AtomicBool, AtomicI64, Ordering};

use uuid::Uuid;

use super::stats::{bump, Counter};
use crate::types::{Event, SecondRow, EVENTS};

/// Seconds a drop's ring holds: a tick late by more than `SLOTS - 1` seconds would count a second's events in the
/// slot's next second (totals stay exact).
const SLOTS: usize = 8;

/// One second of a drop: which second it is and its counts per event.
#[derive(Debug)]
struct Slot {
    second: AtomicI64,
    counts: [Counter; EVENTS],
}

impl Default for Slot {
    fn default() -> Self {
        Self {
            second: AtomicI64::new(i64::MIN),
            counts: Default::default(),
        }
    }
}

/// The counts of one loaded drop.
#[derive(Debug)]
pub(super) struct DropTally {
    drop: Uuid,
    opens_at_ms: i64,
    slots: [Slot; SLOTS],
    /// Whether anything was counted since the last take: the tick skips an idle drop without touching its
    /// `SLOTS * EVENTS` striped counters (cache lines of their own: reading them all for every loaded drop every
    /// second was most of an idle instance's CPU with thousands of drops).
    counted: AtomicBool,
}

impl DropTally {
    pub(super) fn new(drop: Uuid, opens_at_ms: i64) -> Self {
        Self {
            drop,
            opens_at_ms,
            slots: Default::default(),
            counted: AtomicBool::new(false),
        }
    }

    /// Counts `event` at `now_ms`.
    pub(super) fn count(&self, event: Event, now_ms: i64) {
        let second = now_ms.saturating_sub(self.opens_at_ms).div_euclid(1000);
        let slot = &self.slots[slot_of(second)];
        let seen = slot.second.load(Ordering::Acquire);
        if seen < second {
            // The slot's earlier second was taken by a tick long ago; whoever moves it first wins, and a loser's
            // second is the same.
            let _ = slot
                .second
                .compare_exchange(seen, second, Ordering::AcqRel, Ordering::Acquire);
        }
        bump(&slot.counts[event as usize]);
        // Dekker's pattern with `take`: the count, a SeqCst fence, then the flag read here; the flag cleared, a
        // SeqCst fence, then the counts read there. Either the take sees this count, or this sees the flag it
        // cleared and sets it again, so no count is left behind with the flag down. The flag's line is only read
        // while it is up, so counting threads do not pass it back and forth.
        fence(Ordering::SeqCst);
        if !self.counted.load(Ordering::Relaxed) {
            self.counted.store(true, Ordering::Relaxed);
        }
    }

    /// Takes everything counted since the last take, one row per second that has any.
    pub(super) fn take(&self, out: &mut Vec<SecondRow>) {
        if !self.counted.swap(false, Ordering::Relaxed) {
            return;
        }
        fence(Ordering::SeqCst);
        for slot in &self.slots {
            let mut counts = [0i64; EVENTS];
            for (count, counter) in counts.iter_mut().zip(&slot.counts) {
                *count = i64::try_from(counter.take()).unwrap_or(i64::MAX);
            }
            if counts.iter().all(|&count| count == 0) {
                continue;
            }
            // Read after the take: a slot that moved on meanwhile had its earlier second taken already.
            let second = slot.second.load(Ordering::Acquire);
            out.push(SecondRow {
                drop_id: self.drop,
                second: i32::try_from(second.max(0)).unwrap_or(i32::MAX),
                counts,
            });
        }
    }
}

fn slot_of(second: i64) -> usize {
    usize::try_from(second.rem_euclid(SLOTS as i64)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(rows: &[SecondRow]) -> [i64; EVENTS] {
        let mut sum = [0; EVENTS];
        for row in rows {
            for (total, count) in sum.iter_mut().zip(row.counts) {
                *total += count;
            }
        }
        sum
    }

    #[test]
    fn events_count_in_their_second_and_are_taken_once() {
        let tally = DropTally::new(Uuid::nil(), 10_000);
        tally.count(Event::Reserved, 10_000);
        tally.count(Event::Reserved, 10_999);
        tally.count(Event::RefusedSoldOut, 11_000);
        tally.count(Event::Paid, 12_500);
        let mut rows = Vec::new();
        tally.take(&mut rows);
        rows.sort_by_key(|row| row.second);
        let seconds: Vec<(i32, i64, i64, i64)> = rows
            .iter()
            .map(|r| {
                (
                    r.second,
                    r.counts[Event::Reserved as usize],
                    r.counts[Event::Paid as usize],
                    r.counts[Event::RefusedSoldOut as usize],
                )
            })
            .collect();
        assert_eq!(seconds, vec![(0, 2, 0, 0), (1, 0, 0, 1), (2, 0, 1, 0)]);
        let mut again = Vec::new();
        tally.take(&mut again);
        assert!(again.is_empty(), "taken twice: {again:?}");
        // A slot reused `SLOTS` seconds later counts the new second.
        tally.count(Event::Expired, 10_000 + 1000 * SLOTS as i64);
        tally.take(&mut again);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].second, SLOTS as i32);
        assert_eq!(again[0].counts[Event::Expired as usize], 1);
    }

    #[test]
    fn counts_from_many_threads_are_all_taken_while_taking() {
        let tally = std::sync::Arc::new(DropTally::new(Uuid::nil(), 0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let taker = {
            let (tally, stop) = (tally.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rows = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    tally.take(&mut rows);
                }
                rows
            })
        };
        let counters: Vec<_> = (0..4)
            .map(|t| {
                let tally = tally.clone();
                std::thread::spawn(move || {
                    for i in 0..25_000i64 {
                        tally.count(Event::Reserved, (t * 25_000 + i) / 10);
                    }
                })
            })
            .collect();
        for counter in counters {
            counter.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let mut rows = taker.join().unwrap();
        tally.take(&mut rows);
        assert_eq!(totals(&rows)[Event::Reserved as usize], 100_000);
    }
}
