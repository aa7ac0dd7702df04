//! The run's report: a compact table on stdout for people, the same numbers (plus the drop's timeline) as JSON
//! for tools and later comparison.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use crate::config::DropArgs;
use crate::drop_funnel::{Outcomes, Snapshot};
use crate::metrics::{EndpointSummary, Phase, Recorder};
use crate::verify::{Check, DbFacts, DropCounts, Verdict};

/// One phase: how long it took, what it sent, and each endpoint's numbers.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub phase: Phase,
    pub seconds: f64,
    pub requests: u64,
    /// Requests answered per second over the phase's window.
    pub throughput_rps: f64,
    pub endpoints: Vec<EndpointSummary>,
}

impl PhaseReport {
    pub fn new(phase: Phase, seconds: f64, recorder: &Recorder) -> Self {
        let endpoints = recorder.summary(phase);
        let requests = endpoints.iter().map(|e| e.requests).sum();
        Self {
            phase,
            seconds,
            requests,
            throughput_rps: if seconds > 0.0 {
                requests as f64 / seconds
            } else {
                0.0
            },
            endpoints,
        }
    }
}

/// One instance the run drove: how many requests it was sent and the drop as it served it after the run.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceReport {
    pub base_url: String,
    /// Requests sent to it, retries included.
    pub requests: u64,
    pub final_state: Option<DropCounts>,
    pub final_status: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// The first instance's base URL, where setup went.
    pub base_url: String,
    /// Every instance, in `--base-url` order (one entry for a single server).
    pub instances: Vec<InstanceReport>,
    pub config: DropArgs,
    pub drop_id: String,
    pub opens_at: DateTime<Utc>,
    /// Time to sign up and log in every buyer.
    pub buyers_ready_seconds: f64,
    /// Setup (accounts to warm-up), spike (opening to the last attempt's answer), settle (opening to the last
    /// buyer done), verify (waiting out holds, reading back), monitor (the drop-state poller).
    pub phases: Vec<PhaseReport>,
    pub outcomes: Outcomes,
    pub final_state: Option<DropCounts>,
    pub final_status: Option<String>,
    pub db: DbFacts,
    pub checks: Vec<Check>,
    pub passed: bool,
    /// Moments read off the timeline.
    pub milestones: Milestones,
    /// The drop's counters every 100 ms from drop creation until the holds drained.
    pub timeline: Vec<Snapshot>,
}

/// When the drop reached its notable states, in milliseconds after `opens_at`, as the 100 ms poller saw them
/// (so each is late by up to one poll and one request).
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

/// Where the report goes when `--report` is not given.
pub fn default_path(now: DateTime<Utc>) -> PathBuf {
    PathBuf::from(format!(
        "reports/drop-{}.json",
        now.format("%Y%m%dT%H%M%SZ")
    ))
}

/// Writes the JSON report, creating its folder.
pub fn write_json(report: &Report, path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let json = serde_json::to_vec_pretty(report).context("encoding the report")?;
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

fn statuses(e: &EndpointSummary) -> String {
    e.statuses
        .iter()
        .map(|(status, n)| {
            if *status == crate::metrics::STATUS_TRANSPORT_ERROR {
                format!("err:{n}")
            } else {
                format!("{status}:{n}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn tallies(map: &std::collections::BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "none".to_owned();
    }
    map.iter()
        .map(|(k, n)| format!("{k} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The human-readable summary.
pub fn render(report: &Report) -> String {
    let c = &report.config;
    let mut out = String::new();
    // Writing to a String cannot fail.
    let mut line = |text: String| {
        let _ = writeln!(out, "{text}");
    };
    line(format!(
        "flashsale-load drop: {}",
        if report.passed { "PASS" } else { "FAIL" }
    ));
    let target = if report.instances.len() > 1 {
        format!(
            "{} instances {}",
            report.instances.len(),
            report
                .instances
                .iter()
                .map(|i| i.base_url.as_str())
                .collect::<Vec<_>>()
                .join(",")
        )
    } else {
        report.base_url.clone()
    };
    line(format!(
        "  target {target}  drop {}  opens_at {}",
        report.drop_id,
        report.opens_at.to_rfc3339_opts(SecondsFormat::Millis, true)
    ));
    line(format!(
        "  {} buyers x {} attempts, stock {}, limit {}/member, hold {} s; holds declined {:.0}%, cancelled {:.0}%, abandoned {:.0}%; driver concurrency {}",
        c.buyers,
        c.attempts_per_buyer,
        c.stock,
        c.per_member_limit,
        c.hold_seconds,
        c.decline_share * 100.0,
        c.cancel_share * 100.0,
        c.abandon_share * 100.0,
        c.concurrency
    ));
    line(String::new());
    line(format!(
        "{:<8} {:<30} {:>6}  {:<36} {:>5} {:>8} {:>8} {:>8} {:>8}",
        "phase", "endpoint", "reqs", "statuses", "retry", "p50 ms", "p90 ms", "p99 ms", "max ms"
    ));
    for phase in &report.phases {
        line(format!(
            "{:<8} {:.2} s, {} requests, {:.0} req/s{}",
            phase.phase.as_str(),
            phase.seconds,
            phase.requests,
            phase.throughput_rps,
            if phase.phase == Phase::Setup {
                format!(
                    " (buyers signed up and logged in in {:.1} s)",
                    report.buyers_ready_seconds
                )
            } else {
                String::new()
            }
        ));
        for e in &phase.endpoints {
            let ms = |f: fn(&crate::metrics::LatencySummary) -> f64| {
                e.latency
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |l| format!("{:.1}", f(l)))
            };
            line(format!(
                "{:<8} {:<30} {:>6}  {:<36} {:>5} {:>8} {:>8} {:>8} {:>8}",
                "",
                e.endpoint,
                e.requests,
                statuses(e),
                e.retries,
                ms(|l| l.p50_ms),
                ms(|l| l.p90_ms),
                ms(|l| l.p99_ms),
                ms(|l| l.max_ms)
            ));
        }
    }
    let o = &report.outcomes;
    line(String::new());
    line(format!(
        "outcomes  opening answers: {}",
        tallies(&o.spike_answers)
    ));
    line(format!(
        "          holds: {} at the opening + {} while waiting; paid {}, declined {}, cancelled {}, abandoned {}",
        o.holds_in_spike, o.holds_in_restock, o.paid, o.declined, o.cancelled, o.abandoned
    ));
    line(format!(
        "          {} buyers waited for stock ({} retries: {}); {} left without their units",
        o.waiting_buyers,
        o.restock_answers.values().sum::<u64>(),
        tallies(&o.restock_answers),
        o.unserved_buyers
    ));
    line(format!(
        "          unexpected answers: {}",
        tallies(&o.unexpected)
    ));
    let at = |ms: Option<i64>| {
        ms.map_or_else(
            || "never".to_owned(),
            |ms| format!("+{:.1} s", ms as f64 / 1000.0),
        )
    };
    line(format!(
        "timeline  every unit taken {}, every unit sold {} after opens_at (100 ms polling)",
        at(report.milestones.all_units_taken_ms),
        at(report.milestones.all_units_sold_ms)
    ));
    match &report.final_state {
        Some(f) => line(format!(
            "final     stock {} = available {} + held {} + sold {} ({}); Postgres: {} purchase rows, {} units, {} reservations",
            f.stock,
            f.available,
            f.held,
            f.sold,
            report.final_status.as_deref().unwrap_or("?"),
            report.db.purchase_rows,
            report.db.purchase_units,
            report.db.distinct_reservations
        )),
        None => line("final     the drop could not be read".to_owned()),
    }
    if report.instances.len() > 1 {
        for (n, i) in report.instances.iter().enumerate() {
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
                "{:<9} {} {}: {} requests; after the run {state}",
                if n == 0 { "instances" } else { "" },
                n + 1,
                i.base_url,
                i.requests
            ));
        }
    }
    line(String::new());
    line("checks".to_owned());
    for check in &report.checks {
        let verdict = match check.verdict {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        };
        line(format!("  {verdict}  {:<36} {}", check.name, check.detail));
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
