//! The `flashsale-load` command line: one typed config per subcommand; every setting is also read from the
//! environment (`LOAD_*`, plus the usual `DATABASE_URL`).

use std::path::PathBuf;

use anyhow::{bail, ensure, Context};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(
    name = "flashsale-load",
    version,
    about = "Load driver for flashsale: runs a scenario against a server, verifies the invariants, writes a report"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The drop funnel: buyers sign up, wait for a drop to open, reserve all at once, then pay, decline, cancel
    /// or abandon; refused buyers retry while stock comes back. Exits 1 if an invariant fails, 2 on errors.
    Drop(DropArgs),
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct DropArgs {
    /// Base URL of the flashsale server; several instances serving the same drop (sharing one Redis and one
    /// Postgres) as a comma-separated list or by repeating the flag. Setup goes to the first; buyers are spread
    /// over them round robin and pay or cancel through another instance than the one that granted the hold.
    /// Only loopback hosts are accepted: this driver is for local runs.
    #[arg(
        long = "base-url",
        env = "LOAD_BASE_URL",
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8080"
    )]
    pub base_urls: Vec<String>,
    /// PostgreSQL URL of the server's database, read after the run to verify purchases.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/flashsale",
        hide_env_values = true
    )]
    #[serde(skip)]
    pub database_url: String,
    /// Email of an existing admin (`flashsale admin create`); it promotes the demo seller.
    #[arg(
        long,
        env = "LOAD_ADMIN_EMAIL",
        default_value = "admin@flashsale.local"
    )]
    pub admin_email: String,
    /// Password of that admin.
    #[arg(long, env = "LOAD_ADMIN_PASSWORD", hide_env_values = true)]
    #[serde(skip)]
    pub admin_password: String,
    /// Buyers to sign up; each fires its attempts when the drop opens.
    #[arg(long, env = "LOAD_BUYERS", default_value_t = 600)]
    pub buyers: u32,
    /// Units the drop sells.
    #[arg(long, env = "LOAD_STOCK", default_value_t = 120)]
    pub stock: u32,
    /// Units one member may buy.
    #[arg(long, env = "LOAD_PER_MEMBER_LIMIT", default_value_t = 1)]
    pub per_member_limit: u32,
    /// Concurrent reservation attempts (one unit each) per buyer at the opening instant.
    #[arg(long, env = "LOAD_ATTEMPTS_PER_BUYER", default_value_t = 5)]
    pub attempts_per_buyer: u32,
    /// Seconds a hold lasts before the reaper may release it.
    #[arg(long, env = "LOAD_HOLD_SECONDS", default_value_t = 10)]
    pub hold_seconds: u32,
    /// The drop opens this long after it is created (after every buyer is signed in).
    #[arg(long, env = "LOAD_OPENS_IN_MS", default_value_t = 3000)]
    pub opens_in_ms: u64,
    /// Share of holds paid with `tok_declined` (the gateway declines; the unit returns to sale).
    #[arg(long, env = "LOAD_DECLINE_SHARE", default_value_t = 0.1)]
    pub decline_share: f64,
    /// Share of holds cancelled by their buyer.
    #[arg(long, env = "LOAD_CANCEL_SHARE", default_value_t = 0.1)]
    pub cancel_share: f64,
    /// Share of holds never paid nor cancelled, left for the reaper.
    #[arg(long, env = "LOAD_ABANDON_SHARE", default_value_t = 0.05)]
    pub abandon_share: f64,
    /// Most requests in flight from the driver at once.
    #[arg(long, env = "LOAD_CONCURRENCY", default_value_t = 512)]
    pub concurrency: usize,
    /// Most signups/logins in flight during setup (argon2 makes each cost the server 10-30 ms of CPU).
    #[arg(long, env = "LOAD_SETUP_CONCURRENCY", default_value_t = 16)]
    pub setup_concurrency: usize,
    /// The server's REAPER_INTERVAL_MS; it only bounds how long the driver waits for expired holds to return.
    #[arg(long, env = "LOAD_REAPER_INTERVAL_MS", default_value_t = 1000)]
    pub reaper_interval_ms: u64,
    /// Seconds refused buyers keep retrying after the spike, on top of `hold_seconds`.
    #[arg(long, env = "LOAD_RESTOCK_SLACK_SECONDS", default_value_t = 5)]
    pub restock_slack_seconds: u64,
    /// Timeout of one HTTP request.
    #[arg(long, env = "LOAD_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,
    /// Where to write the JSON report (default `reports/drop-<timestamp>.json`).
    #[arg(long, env = "LOAD_REPORT")]
    pub report: Option<PathBuf>,
}

/// Most buyers one run signs up: each costs the server two argon2 hashes.
pub const BUYERS_MAX: u32 = 100_000;
/// Most attempts one buyer fires at the opening instant.
pub const ATTEMPTS_PER_BUYER_MAX: u32 = 100;
/// Longest hold the driver will wait out.
pub const HOLD_SECONDS_MAX: u32 = 600;
/// Longest wait before the drop opens.
pub const OPENS_IN_MS_MAX: u64 = 600_000;
/// Most instances one run drives.
pub const INSTANCES_MAX: usize = 64;

impl DropArgs {
    /// Refuses settings that would make the run unbounded or meaningless, and non-loopback targets.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            (1..=BUYERS_MAX).contains(&self.buyers),
            "--buyers must be 1..={BUYERS_MAX}"
        );
        ensure!(self.stock >= 1, "--stock must be at least 1");
        ensure!(
            self.per_member_limit >= 1,
            "--per-member-limit must be at least 1"
        );
        ensure!(
            (1..=ATTEMPTS_PER_BUYER_MAX).contains(&self.attempts_per_buyer),
            "--attempts-per-buyer must be 1..={ATTEMPTS_PER_BUYER_MAX}"
        );
        ensure!(
            (1..=HOLD_SECONDS_MAX).contains(&self.hold_seconds),
            "--hold-seconds must be 1..={HOLD_SECONDS_MAX}"
        );
        ensure!(
            self.opens_in_ms <= OPENS_IN_MS_MAX,
            "--opens-in-ms must be at most {OPENS_IN_MS_MAX}"
        );
        for (name, share) in [
            ("--decline-share", self.decline_share),
            ("--cancel-share", self.cancel_share),
            ("--abandon-share", self.abandon_share),
        ] {
            ensure!((0.0..=1.0).contains(&share), "{name} must be 0.0..=1.0");
        }
        ensure!(
            self.decline_share + self.cancel_share + self.abandon_share <= 1.0,
            "--decline-share + --cancel-share + --abandon-share must not exceed 1.0"
        );
        ensure!(
            (1..=10_000).contains(&self.concurrency),
            "--concurrency must be 1..=10000"
        );
        ensure!(
            (1..=1_000).contains(&self.setup_concurrency),
            "--setup-concurrency must be 1..=1000"
        );
        ensure!(
            self.reaper_interval_ms <= 60_000,
            "--reaper-interval-ms must be at most 60000"
        );
        ensure!(
            self.restock_slack_seconds <= 600,
            "--restock-slack-seconds must be at most 600"
        );
        ensure!(
            (100..=600_000).contains(&self.request_timeout_ms),
            "--request-timeout-ms must be 100..=600000"
        );
        ensure!(
            (1..=INSTANCES_MAX).contains(&self.base_urls.len()),
            "--base-url must name 1..={INSTANCES_MAX} instances"
        );
        let mut seen = std::collections::BTreeSet::new();
        for base in &self.base_urls {
            check_base_url(base)?;
            let key = base.trim_end_matches('/');
            ensure!(
                seen.insert(key),
                "--base-url names {key} twice; each instance once"
            );
        }
        Ok(())
    }
}

/// One base URL: `http://` on a loopback host.
fn check_base_url(base: &str) -> anyhow::Result<()> {
    let url =
        reqwest::Url::parse(base).with_context(|| format!("--base-url {base:?} is not a URL"))?;
    ensure!(
        url.scheme() == "http",
        "--base-url must be http:// (got {base:?})"
    );
    let host = url.host_str().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        bail!(
            "--base-url must point at a loopback host (127.0.0.1, ::1 or localhost), not {base:?}"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<DropArgs> {
        let argv = ["flashsale-load", "drop", "--admin-password", "x"]
            .iter()
            .chain(args);
        let Command::Drop(args) = Cli::try_parse_from(argv)?.command;
        args.validate()?;
        Ok(args)
    }

    #[test]
    fn one_base_url_by_default_or_as_given() {
        // LOAD_BASE_URL in the test environment would change the default; it is not set by the test runner.
        if std::env::var_os("LOAD_BASE_URL").is_none() {
            assert_eq!(parse(&[]).unwrap().base_urls, ["http://127.0.0.1:8080"]);
        }
        let args = parse(&["--base-url", "http://127.0.0.1:9000/"]).unwrap();
        assert_eq!(args.base_urls, ["http://127.0.0.1:9000/"]);
    }

    #[test]
    fn several_base_urls_comma_separated_or_repeated() {
        let listed = parse(&[
            "--base-url",
            "http://127.0.0.1:1,http://localhost:2,http://[::1]:3",
        ])
        .unwrap();
        let repeated = parse(&[
            "--base-url",
            "http://127.0.0.1:1",
            "--base-url",
            "http://localhost:2,http://[::1]:3",
        ])
        .unwrap();
        let want = ["http://127.0.0.1:1", "http://localhost:2", "http://[::1]:3"];
        assert_eq!(listed.base_urls, want);
        assert_eq!(repeated.base_urls, want);
    }

    #[test]
    fn bad_base_urls_are_refused() {
        for bad in [
            "http://127.0.0.1:1,http://127.0.0.1:1/",
            "http://127.0.0.1:1,",
            "http://127.0.0.1:1,http://10.0.0.1:2",
            "https://127.0.0.1:1",
        ] {
            assert!(parse(&["--base-url", bad]).is_err(), "{bad}");
        }
    }
}
