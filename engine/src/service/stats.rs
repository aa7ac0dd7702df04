//! The engine's counters, striped per thread so the hot path never contends on one cache line.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters for the report: what happened, not how long it took.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub reservations: Counter,
    pub rejected_sold_out: Counter,
    pub rejected_limit: Counter,
    pub rejected_not_open: Counter,
    pub rejected_overloaded: Counter,
    pub payments: Counter,
    pub payments_declined: Counter,
    pub payments_unavailable: Counter,
    /// Payments Postgres refused (guarantee 5a): they outlived their lease, or their drop was full there. Each was
    /// refunded.
    pub payments_fenced: Counter,
    pub released_cancelled: Counter,
    pub released_expired: Counter,
    /// Loads of a drop from Postgres begun on a request, this instance not having it in memory (one per drop
    /// however many requests wait on it; a load that fails is counted, and so is the next waiter's retry).
    pub drops_loaded: Counter,
}

/// Slots of a `Counter`; threads spread over them.
const COUNTER_SLOTS: usize = 4;

/// A counter bumped from many threads at once: one slot per thread (round robin), each on its own cache line, so
/// two cores counting refusals do not pass one line back and forth on every request.
#[derive(Debug, Default)]
pub struct Counter([crossbeam_utils::CachePadded<AtomicU64>; COUNTER_SLOTS]);

impl Counter {
    pub fn get(&self) -> u64 {
        self.0.iter().map(|slot| slot.load(Ordering::Relaxed)).sum()
    }

    /// Takes the count so far, leaving zero: a bump lands either before (taken) or after (left for the next take),
    /// never in neither.
    pub(super) fn take(&self) -> u64 {
        self.0
            .iter()
            .map(|slot| slot.swap(0, Ordering::Relaxed))
            .sum()
    }

    fn bump(&self) {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        thread_local! {
            static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed) % COUNTER_SLOTS;
        }
        let slot = SLOT.with(|slot| *slot);
        self.0[slot].fetch_add(1, Ordering::Relaxed);
    }
}

pub(super) fn bump(counter: &Counter) {
    counter.bump();
}
