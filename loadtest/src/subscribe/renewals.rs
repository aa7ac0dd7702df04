//! Renewals during a `subscribe` run, through the real binary: `flashsale renew --at <time>` spawned in rounds, each
//! round `renewers` processes at once with the same `--at`, every round a step further on the test clock, while
//! goose's users keep subscribing, pausing and changing their cards. The server's own renewal loop runs by the real
//! clock and finds nothing due (every period lasts a week or more); these processes are the ones that charge.
//!
//! Each process is bounded in time and its output kept: a renewer that fails, hangs or says nothing fails the run's
//! "renew processes" check.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::setup::{progress, rfc3339};

/// A renewer that has not finished in this long is killed and counted as failed.
const RENEW_TIMEOUT: Duration = Duration::from_secs(120);

/// How the rounds run.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub flashsale_bin: PathBuf,
    pub database_url: String,
    /// The test clock's origin: round `k` renews at `origin + k x step`.
    pub origin: DateTime<Utc>,
    pub step: chrono::Duration,
    pub rounds: u32,
    pub renewers: u32,
    /// Real time between rounds, the first one included.
    pub every: Duration,
}

impl Schedule {
    /// The test clock of round `round` (1-based; `rounds + 1` is the final one after goose).
    pub fn at(&self, round: u32) -> DateTime<Utc> {
        self.origin + self.step * i32::try_from(round).unwrap_or(i32::MAX)
    }
}

/// One `flashsale renew` process.
#[derive(Debug, Clone, Serialize)]
pub struct RenewRun {
    pub round: u32,
    pub at: String,
    /// Milliseconds since the first round began, when it started and ended.
    pub started_ms: u64,
    pub ended_ms: u64,
    /// Its exit status (`None`: killed, timed out or never started).
    pub exit: Option<i32>,
    /// Its report line (`renewals at ...: claimed ..., renewed ...`), or why it failed.
    pub line: String,
    /// Whether goose's users were still running when it ended.
    pub during_goose: bool,
}

impl RenewRun {
    pub fn succeeded(&self) -> bool {
        self.exit == Some(0) && self.line.starts_with("renewals at ")
    }
}

/// Runs rounds `1..=rounds`, `every` apart; `goose_running` says whether goose's users still act. `raised` is set
/// after the first round, for the seller's price change to follow a renewal at the old price.
pub async fn drive(
    schedule: Schedule,
    goose_running: Arc<AtomicBool>,
    first_round_done: Arc<AtomicBool>,
) -> Vec<RenewRun> {
    let begun = Instant::now();
    let mut runs = Vec::new();
    for round in 1..=schedule.rounds {
        tokio::time::sleep(schedule.every).await;
        runs.extend(run_round(&schedule, round, schedule.renewers, begun, &goose_running).await);
        first_round_done.store(true, Ordering::Relaxed);
    }
    runs
}

/// `count` renewers at once at round `round`'s time.
pub async fn run_round(
    schedule: &Schedule,
    round: u32,
    count: u32,
    begun: Instant,
    goose_running: &AtomicBool,
) -> Vec<RenewRun> {
    let at = rfc3339(schedule.at(round));
    progress(format!(
        "subscribe: renewal round {round}: {count} x flashsale renew --at {at}"
    ));
    let processes = (0..count).map(|_| renew_once(schedule, round, &at, begun, goose_running));
    futures_util::future::join_all(processes).await
}

async fn renew_once(
    schedule: &Schedule,
    round: u32,
    at: &str,
    begun: Instant,
    goose_running: &AtomicBool,
) -> RenewRun {
    let started_ms = elapsed_ms(begun);
    let output = tokio::process::Command::new(&schedule.flashsale_bin)
        .args(["renew", "--at", at])
        .env("DATABASE_URL", &schedule.database_url)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let (exit, line) = match tokio::time::timeout(RENEW_TIMEOUT, output).await {
        Err(_) => (None, format!("timed out after {RENEW_TIMEOUT:?}")),
        Ok(Err(err)) => (
            None,
            format!("could not start {:?}: {err}", schedule.flashsale_bin),
        ),
        Ok(Ok(output)) => {
            let stdout = String::from_utf8_lossy(&output.stdout);
            let stderr = String::from_utf8_lossy(&output.stderr);
            let line = stdout
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .or_else(|| stderr.lines().rev().find(|l| !l.trim().is_empty()))
                .unwrap_or("(no output)")
                .to_owned();
            (output.status.code(), line)
        }
    };
    let run = RenewRun {
        round,
        at: at.to_owned(),
        started_ms,
        ended_ms: elapsed_ms(begun),
        exit,
        line,
        during_goose: goose_running.load(Ordering::Relaxed),
    };
    progress(format!(
        "subscribe: renew --at {at} (exit {:?}): {}",
        run.exit, run.line
    ));
    run
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The most renewers of one round that ran at the same time (all of a round overlap when the last to start began
/// before the first to end finished).
pub fn most_at_once(runs: &[RenewRun]) -> usize {
    let mut best = 0;
    for round in runs.iter().map(|r| r.round) {
        let of_round: Vec<&RenewRun> = runs.iter().filter(|r| r.round == round).collect();
        let last_start = of_round.iter().map(|r| r.started_ms).max().unwrap_or(0);
        let first_end = of_round.iter().map(|r| r.ended_ms).min().unwrap_or(0);
        let overlapping = if last_start <= first_end {
            of_round.len()
        } else {
            1
        };
        best = best.max(overlapping);
    }
    best
}
