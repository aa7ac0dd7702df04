//! The fault schedule: a list of (start, end, fault) derived from the seed alone, before the run starts, so the
//! same seed replays the same faults (the workload's timing still varies with the machine). Printed and written to
//! `<out>/schedule.json`.
//!
//! Faults come in rounds: each round takes every kind once, in a seeded order, with seeded durations and a seeded
//! pause of a few seconds between starts. A fault may overlap another only where that is safe: at most
//! `instances - 1` instances are impaired at any moment (killed, paused or restarting slow), one instance has one
//! fault at a time with a gap for its restart, and Redis and Postgres are never down at once (one shared
//! dependency at a time, so a failure can be told apart). Rounds go on while they fit in the load window, so the
//! count of each kind grows with `--seconds`.

use std::ops::RangeInclusive;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// A kind of fault, as scheduled; each is carried out as two steps (see `history::FaultWhat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// SIGKILL an instance, restart it at the end (same port).
    KillInstance,
    /// SIGSTOP an instance past the payment lease, SIGCONT at the end.
    StopInstance,
    /// SIGKILL Redis, restart it at the end (same port and folder; the AOF brings back all but ~1 s).
    KillRedis,
    /// Cut every proxied Postgres connection and refuse new ones; restore at the end.
    CutPostgres,
    /// Restart an instance with a payment latency past the lease; back to none at the end.
    SlowGateway,
}

impl FaultKind {
    pub const ALL: [Self; 5] = [
        Self::KillInstance,
        Self::StopInstance,
        Self::KillRedis,
        Self::CutPostgres,
        Self::SlowGateway,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::KillInstance => "kill_instance",
            Self::StopInstance => "stop_instance",
            Self::KillRedis => "kill_redis",
            Self::CutPostgres => "cut_postgres",
            Self::SlowGateway => "slow_gateway",
        }
    }

    /// Whether the fault impairs one instance (else a shared dependency).
    pub fn on_instance(self) -> bool {
        matches!(
            self,
            Self::KillInstance | Self::StopInstance | Self::SlowGateway
        )
    }

    /// How long the fault lasts, in milliseconds.
    fn duration_ms(self, pay_lease_ms: u64) -> RangeInclusive<u64> {
        match self {
            Self::KillInstance => 1_500..=4_000,
            // Past the lease, so that another instance may take a paused payment over.
            Self::StopInstance => pay_lease_ms + 1_000..=pay_lease_ms + 3_000,
            Self::KillRedis => 1_000..=3_000,
            Self::CutPostgres => 2_000..=5_000,
            Self::SlowGateway => 4_000..=8_000,
        }
    }
}

/// What a schedule is derived from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ScheduleParams {
    pub seed: u64,
    /// The load window, in seconds; every fault starts and ends inside it.
    pub seconds: u64,
    pub instances: usize,
    pub pay_lease_seconds: u64,
}

/// One fault of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PlannedFault {
    pub kind: FaultKind,
    /// The instance it impairs (instance faults only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<usize>,
    /// When it starts and ends, in milliseconds from the start of the load.
    pub start_ms: u64,
    pub end_ms: u64,
}

impl PlannedFault {
    fn overlaps(&self, start_ms: u64, end_ms: u64) -> bool {
        self.start_ms < end_ms && start_ms < self.end_ms
    }
}

/// Between two faults of one instance (its restart takes time), and around an instance fault when counting how
/// many instances are impaired at once.
const INSTANCE_GAP_MS: u64 = 2_000;
/// Between an outage of Redis and one of Postgres.
const SHARED_GAP_MS: u64 = 3_000;
/// Between the starts of two faults in a round.
const PAUSE_MS: RangeInclusive<u64> = 2_000..=5_000;
/// Quiet time at the start (the workload warms up) and at the end (the last fault heals) of the window, at most.
const EDGE_MS_MAX: u64 = 3_000;
/// Placement attempts for one fault, each moving it past what was in its way.
const PLACE_TRIES_MAX: usize = 64;

/// The schedule for `params`, ordered by start.
pub fn plan(params: &ScheduleParams) -> Vec<PlannedFault> {
    let load_ms = params.seconds.saturating_mul(1000);
    let edge_ms = EDGE_MS_MAX.min(load_ms / 10);
    let mut planner = Planner {
        params: *params,
        rng: StdRng::seed_from_u64(params.seed),
        window_end_ms: load_ms - edge_ms,
        placed: Vec::new(),
    };
    let mut earliest = edge_ms;
    loop {
        let mut order = FaultKind::ALL;
        order.shuffle(&mut planner.rng);
        let mut placed_any = false;
        for kind in order {
            let duration = planner
                .rng
                .gen_range(kind.duration_ms(params.pay_lease_seconds * 1000));
            if let Some(fault) = planner.place(kind, earliest, duration) {
                earliest = fault.start_ms + planner.rng.gen_range(PAUSE_MS);
                planner.placed.push(fault);
                placed_any = true;
            }
        }
        if !placed_any {
            break;
        }
    }
    let mut faults = planner.placed;
    faults.sort_by_key(|f| (f.start_ms, f.end_ms));
    faults
}

struct Planner {
    params: ScheduleParams,
    rng: StdRng,
    window_end_ms: u64,
    placed: Vec<PlannedFault>,
}

impl Planner {
    /// The earliest safe place at or after `earliest` for a fault of `kind` lasting `duration_ms`, if one fits in
    /// the window.
    fn place(&mut self, kind: FaultKind, earliest: u64, duration_ms: u64) -> Option<PlannedFault> {
        let mut start = earliest;
        for _ in 0..PLACE_TRIES_MAX {
            let end = start + duration_ms;
            if end > self.window_end_ms {
                return None;
            }
            let blocked_until = if kind.on_instance() {
                self.instance_conflict(start, end)
            } else {
                self.shared_conflict(start, end)
            };
            match blocked_until {
                Some(next) => start = next.max(start + 1),
                None if kind.on_instance() => {
                    let instance = self.free_instance(start, end)?;
                    return Some(PlannedFault {
                        kind,
                        instance: Some(instance),
                        start_ms: start,
                        end_ms: end,
                    });
                }
                None => {
                    return Some(PlannedFault {
                        kind,
                        instance: None,
                        start_ms: start,
                        end_ms: end,
                    })
                }
            }
        }
        None
    }

    /// Instance faults near `start..end` (within the restart gap).
    fn instance_neighbours(&self, start: u64, end: u64) -> impl Iterator<Item = &PlannedFault> {
        let (from, to) = (start.saturating_sub(INSTANCE_GAP_MS), end + INSTANCE_GAP_MS);
        self.placed
            .iter()
            .filter(move |f| f.kind.on_instance() && f.overlaps(from, to))
    }

    /// `None` if one more instance may be impaired over `start..end`; else when the first neighbour ends (plus
    /// the gap), the earliest start worth trying next.
    fn instance_conflict(&self, start: u64, end: u64) -> Option<u64> {
        let mut busy: Vec<usize> = self
            .instance_neighbours(start, end)
            .filter_map(|f| f.instance)
            .collect();
        busy.sort_unstable();
        busy.dedup();
        if busy.len() < self.params.instances - 1 {
            return None;
        }
        self.instance_neighbours(start, end)
            .map(|f| f.end_ms + INSTANCE_GAP_MS)
            .min()
    }

    /// `None` if no outage of Redis or Postgres is near `start..end`; else when the last one near ends (plus the
    /// gap).
    fn shared_conflict(&self, start: u64, end: u64) -> Option<u64> {
        let (from, to) = (start.saturating_sub(SHARED_GAP_MS), end + SHARED_GAP_MS);
        self.placed
            .iter()
            .filter(|f| !f.kind.on_instance() && f.overlaps(from, to))
            .map(|f| f.end_ms + SHARED_GAP_MS)
            .max()
    }

    /// A seeded pick among the instances with no fault near `start..end`.
    fn free_instance(&mut self, start: u64, end: u64) -> Option<usize> {
        let busy: Vec<usize> = self
            .instance_neighbours(start, end)
            .filter_map(|f| f.instance)
            .collect();
        let free: Vec<usize> = (0..self.params.instances)
            .filter(|i| !busy.contains(i))
            .collect();
        free.choose(&mut self.rng).copied()
    }
}

/// How many faults of each kind a schedule holds, in `FaultKind::ALL` order.
pub fn counts(faults: &[PlannedFault]) -> Vec<(FaultKind, usize)> {
    FaultKind::ALL
        .iter()
        .map(|kind| (*kind, faults.iter().filter(|f| f.kind == *kind).count()))
        .collect()
}

/// The schedule as lines to print: `  12.345 s .. 15.000 s  kill_instance 1`.
pub fn render(faults: &[PlannedFault]) -> String {
    let mut out = String::new();
    for f in faults {
        let target = f.instance.map(|i| format!(" {i}")).unwrap_or_default();
        out.push_str(&format!(
            "  {:>8.3} s .. {:>8.3} s  {}{target}\n",
            f.start_ms as f64 / 1000.0,
            f.end_ms as f64 / 1000.0,
            f.kind.name()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(seed: u64, seconds: u64, instances: usize) -> ScheduleParams {
        ScheduleParams {
            seed,
            seconds,
            instances,
            pay_lease_seconds: 2,
        }
    }

    /// The safety rules, checked at every moment a fault starts or ends.
    fn assert_safe(p: &ScheduleParams, faults: &[PlannedFault]) {
        let load_ms = p.seconds * 1000;
        for f in faults {
            assert!(f.start_ms < f.end_ms && f.end_ms <= load_ms, "{f:?}");
            assert_eq!(f.instance.is_some(), f.kind.on_instance(), "{f:?}");
        }
        for moment in faults.iter().flat_map(|f| [f.start_ms, f.end_ms - 1]) {
            let now: Vec<&PlannedFault> = faults
                .iter()
                .filter(|f| f.start_ms <= moment && moment < f.end_ms)
                .collect();
            let impaired: Vec<usize> = now.iter().filter_map(|f| f.instance).collect();
            let mut distinct = impaired.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(
                impaired.len(),
                distinct.len(),
                "two faults on one instance at {moment}"
            );
            assert!(
                distinct.len() < p.instances,
                "every instance impaired at {moment}"
            );
            let shared = now.iter().filter(|f| !f.kind.on_instance()).count();
            assert!(shared <= 1, "Redis and Postgres down at once at {moment}");
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let a = plan(&params(7, 60, 3));
        assert_eq!(a, plan(&params(7, 60, 3)));
        assert_ne!(a, plan(&params(8, 60, 3)));
    }

    #[test]
    fn a_minute_holds_every_kind_safely() {
        for instances in [2, 3, 5] {
            for seed in 0..300 {
                let p = params(seed, 60, instances);
                let faults = plan(&p);
                assert_safe(&p, &faults);
                for (kind, n) in counts(&faults) {
                    assert!(
                        n >= 1,
                        "seed {seed}, {instances} instances: no {kind:?}\n{}",
                        render(&faults)
                    );
                }
            }
        }
    }

    #[test]
    fn twenty_minutes_hold_each_kind_ten_times() {
        for seed in 0..20 {
            let p = params(seed, 1200, 3);
            let faults = plan(&p);
            assert_safe(&p, &faults);
            for (kind, n) in counts(&faults) {
                assert!(n >= 10, "seed {seed}: {n} x {kind:?}");
            }
        }
    }

    #[test]
    fn a_longer_lease_pauses_longer() {
        let p = ScheduleParams {
            pay_lease_seconds: 5,
            ..params(3, 120, 3)
        };
        let stops: Vec<_> = plan(&p)
            .into_iter()
            .filter(|f| f.kind == FaultKind::StopInstance)
            .collect();
        assert!(!stops.is_empty());
        assert!(
            stops.iter().all(|f| f.end_ms - f.start_ms >= 6_000),
            "{stops:?}"
        );
    }
}
