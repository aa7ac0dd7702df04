//! Our summary of a drop run, printed after goose's tables: the funnel (what buyers were told and did), when the
//! drop sold out, the final counts on every instance and in Postgres, the invariant checks, the thresholds, and
//! where goose's reports are. Latency and throughput per request are goose's; this adds what goose cannot know.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use chrono::{DateTime, Utc};
use goose::threshold::ThresholdResult;
use serde::Serialize;

use crate::config::FunnelArgs;
use crate::drop_funnel::{InstanceState, Outcomes, Snapshot};
use crate::setup::rfc3339;
use crate::verify::{Check, DbFacts, DropCounts, Verdict};

/// Times from `opens_at` at which the drop reached a state, read from the poller's snapshots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Milestones {
    /// First reading with nothing available: every unit held or sold.
    pub all_units_taken_ms: Option<i64>,
    /// First reading with every unit sold.
    pub all_units_sold_ms: Option<i64>,
}

impl Milestones {
    pub fn from_timeline(timeline: &[Snapshot]) -> Self {
        let first = |pred: fn(&Snapshot) -> bool| {
            timeline
                .iter()
                .find(|s| s.t_ms >= 0 && pred(s))
                .map(|s| s.t_ms)
        };
        Self {
            all_units_taken_ms: first(|s| s.counts.available == 0),
            all_units_sold_ms: first(|s| s.counts.sold == s.counts.stock),
        }
    }
}

/// Everything the summary says, also written as JSON with `--summary-file`.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub scenario: &'static str,
    pub passed: bool,
    pub drop_id: String,
    pub opens_at: DateTime<Utc>,
    pub funnel: FunnelArgs,
    pub outcomes: Outcomes,
    pub milestones: Milestones,
    pub final_state: Option<DropCounts>,
    pub db: DbFacts,
    pub instances: Vec<InstanceState>,
    pub checks: Vec<Check>,
    pub thresholds_failed: Vec<String>,
    pub report_files: Vec<String>,
}

impl Summary {
    /// Writes the summary as JSON, creating its folder.
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        write_json(self, path)
    }
}

/// Writes a summary as JSON, creating its folder (every scenario's `--summary-file`).
pub fn write_json(summary: &impl Serialize, path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let json = serde_json::to_vec_pretty(summary).context("encoding the summary")?;
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

/// A threshold rule and what was observed, as one line.
pub fn threshold_line(result: &ThresholdResult) -> String {
    format!("{} (observed {})", result.rule, result.observed)
}

/// Answers and their counts, as one line (`201 x66, 409 sold_out x139`).
pub(crate) fn tallies(map: &std::collections::BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "none".to_owned();
    }
    map.iter()
        .map(|(k, n)| format!("{k} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The human-readable summary.
#[allow(
    clippy::too_many_lines,
    reason = "the report's text in the order it prints"
)]
pub fn render(s: &Summary) -> String {
    let c = &s.funnel;
    let mut out = String::new();
    // Writing to a String cannot fail.
    let mut line = |text: String| {
        let _ = writeln!(out, "{text}");
    };
    line(String::new());
    line(format!(
        "flashsale-load {}: {}",
        s.scenario,
        if s.passed { "PASS" } else { "FAIL" }
    ));
    line(format!(
        "  drop {}  opens_at {}  on {} instance(s)",
        s.drop_id,
        rfc3339(s.opens_at),
        s.instances.len()
    ));
    line(format!(
        "  {} buyers x {} tabs, stock {}, limit {}/member, hold {} s; of the holders {:.0}% abandon ({:.0}% of them cancel), {:.0}% of the rest are declined",
        c.buyers,
        c.attempts_per_buyer,
        c.stock,
        c.per_member_limit,
        c.hold_seconds,
        c.abandon_rate * 100.0,
        c.cancel_share * 100.0,
        c.decline_rate * 100.0,
    ));
    let o = &s.outcomes;
    line(format!(
        "funnel    opening answers: {}",
        tallies(&o.spike_answers)
    ));
    line(format!(
        "          holds: {} at the opening + {} while waiting; paid {}, declined {}, cancelled {}, left to expire {}",
        o.holds_at_opening, o.holds_in_restock, o.paid, o.declined, o.cancelled, o.expired
    ));
    line(format!(
        "          {} tabs waited for stock ({} retries: {}); {} left without a unit",
        o.waiting_tabs,
        o.restock_answers.values().sum::<u64>(),
        tallies(&o.restock_answers),
        o.unserved_tabs
    ));
    line(format!(
        "          unexpected answers: {} ({} server errors or unanswered)",
        tallies(&o.unexpected),
        o.server_failures
    ));
    if o.late_tabs > 0 {
        line(format!(
            "          {} tabs started after opens_at: raise --opens-in-ms for a synchronised spike",
            o.late_tabs
        ));
    }
    let at = |ms: Option<i64>| {
        ms.map_or_else(
            || "never".to_owned(),
            |ms| format!("+{:.1} s", ms as f64 / 1000.0),
        )
    };
    line(format!(
        "timeline  every unit taken {}, every unit sold {} after opens_at (100 ms polling)",
        at(s.milestones.all_units_taken_ms),
        at(s.milestones.all_units_sold_ms)
    ));
    match &s.final_state {
        Some(f) => line(format!(
            "final     stock {} = available {} + held {} + sold {}; Postgres: {} purchase rows, {} units, {} reservations",
            f.stock,
            f.available,
            f.held,
            f.sold,
            s.db.purchase_rows,
            s.db.purchase_units,
            s.db.distinct_reservations
        )),
        None => line("final     the drop could not be read".to_owned()),
    }
    for (n, i) in s.instances.iter().enumerate() {
        let state = i.final_state.as_ref().map_or_else(
            || "the drop could not be read".to_owned(),
            |f| {
                format!(
                    "available {} + held {} + sold {} ({})",
                    f.available,
                    f.held,
                    f.sold,
                    i.final_status.as_deref().unwrap_or("?")
                )
            },
        );
        line(format!(
            "{:<9} {} {}: {} calls; after the run {state}",
            if n == 0 { "instances" } else { "" },
            n + 1,
            i.base_url,
            i.requests
        ));
    }
    line("checks".to_owned());
    line(render_checks(&s.checks).trim_end().to_owned());
    for rule in &s.thresholds_failed {
        line(format!("  FAIL  threshold {rule}"));
    }
    for file in &s.report_files {
        line(format!("goose report: {file}"));
    }
    out
}

/// One line per check: verdict, name, detail.
pub fn render_checks(checks: &[Check]) -> String {
    let mut out = String::new();
    for check in checks {
        let verdict = match check.verdict {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        };
        // Writing to a String cannot fail.
        let _ = writeln!(out, "  {verdict}  {:<36} {}", check.name, check.detail);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(t_ms: i64, available: i64, held: i64, sold: i64) -> Snapshot {
        Snapshot {
            t_ms,
            instance: 0,
            counts: DropCounts {
                stock: 10,
                available,
                held,
                sold,
            },
            status: "open".to_owned(),
        }
    }

    #[test]
    fn milestones_are_the_first_readings_after_the_opening() {
        let timeline = [
            snapshot(-100, 10, 0, 0),
            snapshot(0, 4, 6, 0),
            snapshot(100, 0, 8, 2),
            snapshot(200, 3, 2, 5),
            snapshot(300, 0, 0, 10),
            snapshot(400, 0, 0, 10),
        ];
        let m = Milestones::from_timeline(&timeline);
        assert_eq!(m.all_units_taken_ms, Some(100));
        assert_eq!(m.all_units_sold_ms, Some(300));
        assert_eq!(
            Milestones::from_timeline(&timeline[..2]),
            Milestones::default()
        );
    }
}
