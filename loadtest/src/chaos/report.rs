//! The summary of a chaos run, printed and written to `<out>/summary.txt`: what was run, the calls by kind and
//! answer, the faults injected by kind, the final state on every instance and in Postgres, what `reconcile`
//! found, and every violation with the op ids that show it (look them up in history.jsonl).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use super::checker::{DbSnapshot, FinalRead, Violation};
use super::history::{FaultWhat, History, OpKind};
use super::schedule::{self, PlannedFault};
use crate::config::ChaosArgs;

/// Op ids shown per violation; the rest are counted.
const OPS_SHOWN_MAX: usize = 40;

/// Everything the summary says.
#[derive(Debug)]
pub struct Summary<'a> {
    pub args: &'a ChaosArgs,
    pub drop_id: &'a str,
    pub members: usize,
    pub schedule: &'a [PlannedFault],
    pub history: &'a History,
    pub db: &'a DbSnapshot,
    pub finals: &'a [FinalRead],
    pub reconcile: &'a str,
    /// Whether every instance reported no hold left, before and after reconcile.
    pub drained: (bool, bool),
    pub violations: &'a [Violation],
    pub elapsed: Duration,
    pub out: &'a Path,
}

pub fn render(s: &Summary) -> String {
    let mut out = String::new();
    let a = s.args;
    let _ = writeln!(
        out,
        "flashsale-load chaos: seed {}, {} s of load, {} instances, stock {}, {} buyers as {} members, \
         per-member limit {}, holds {} s, pay lease {} s\ndrop {}",
        a.seed,
        a.seconds,
        a.instances,
        a.stock,
        a.buyers,
        s.members,
        a.per_member_limit,
        a.hold_seconds,
        a.pay_lease_seconds,
        s.drop_id
    );
    ops(&mut out, s.history);
    faults(&mut out, s.schedule, s.history);
    finals(&mut out, s);
    violations(&mut out, s.violations);
    let _ = writeln!(
        out,
        "\nflashsale-load chaos: {} (seed {}, {:.1} s; history, schedule and logs in {})",
        if s.violations.is_empty() {
            "PASS".to_owned()
        } else {
            format!("FAIL, {} violation(s)", s.violations.len())
        },
        a.seed,
        s.elapsed.as_secs_f64(),
        s.out.display()
    );
    out
}

fn ops(out: &mut String, history: &History) {
    let mut by_kind: BTreeMap<OpKind, BTreeMap<String, u64>> = BTreeMap::new();
    for op in &history.ops {
        *by_kind
            .entry(op.kind)
            .or_default()
            .entry(op.label())
            .or_default() += 1;
    }
    let _ = writeln!(out, "\nops: {} in all", history.ops.len());
    for (kind, labels) in by_kind {
        let total: u64 = labels.values().sum();
        let shown: Vec<String> = labels.iter().map(|(l, n)| format!("{l}: {n}")).collect();
        let _ = writeln!(out, "  {:<9} {total:>6}  {}", kind.name(), shown.join(", "));
    }
}

fn faults(out: &mut String, schedule: &[PlannedFault], history: &History) {
    let planned: Vec<String> = schedule::counts(schedule)
        .iter()
        .map(|(kind, n)| format!("{} {n}", kind.name()))
        .collect();
    let _ = writeln!(out, "\nfaults planned: {}", planned.join(", "));
    let mut done: BTreeMap<FaultWhat, (u64, u64)> = BTreeMap::new();
    for fault in &history.faults {
        let entry = done.entry(fault.what).or_default();
        if fault.ok {
            entry.0 += 1;
        } else {
            entry.1 += 1;
        }
    }
    let _ = writeln!(out, "fault steps carried out:");
    for (what, (ok, failed)) in done {
        let failed = if failed > 0 {
            format!(" ({failed} failed or skipped)")
        } else {
            String::new()
        };
        let _ = writeln!(out, "  {:<17} {ok:>4}{failed}", what.name());
    }
}

fn finals(out: &mut String, s: &Summary) {
    let _ = writeln!(out, "\nafter the run:");
    for read in s.finals {
        let shown = match read.counts {
            Some(c) => format!(
                "available {} held {} sold {} of {}",
                c.available, c.held, c.sold, c.stock
            ),
            None => "no answer".to_owned(),
        };
        let _ = writeln!(out, "  instance {}: {shown}", read.instance);
    }
    let _ = writeln!(
        out,
        "  postgres: stock {}, {} purchase rows, {} units; {} reservation rows",
        s.db.stock,
        s.db.purchases.len(),
        s.db.purchased_units(),
        s.db.reservations.len()
    );
    let _ = writeln!(
        out,
        "  holds drained: {} before reconcile, {} after",
        yes_no(s.drained.0),
        yes_no(s.drained.1)
    );
    for line in s.reconcile.lines() {
        let _ = writeln!(out, "  reconcile: {line}");
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn violations(out: &mut String, violations: &[Violation]) {
    let _ = writeln!(out, "\nviolations: {}", violations.len());
    for v in violations {
        let shown: Vec<String> = v
            .ops
            .iter()
            .take(OPS_SHOWN_MAX)
            .map(u64::to_string)
            .collect();
        let more = v.ops.len().saturating_sub(OPS_SHOWN_MAX);
        let more = if more > 0 {
            format!(" ... and {more} more")
        } else {
            String::new()
        };
        let _ = writeln!(out, "  [{}] {}", v.check.name(), v.detail);
        let _ = writeln!(out, "      ops: {}{more}", shown.join(", "));
    }
}
