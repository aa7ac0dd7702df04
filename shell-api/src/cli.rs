//! The `flashsale` command line: a subcommand per command, each with its settings (kept beside the command, and
//! the shared ones in `config.rs`), composed here with `#[command(flatten)]`.

use clap::{Parser, Subcommand};

use crate::config::DbArgs;
use crate::members::AdminCreateArgs;
use crate::ops::reconcile::ReconcileArgs;
use crate::server::ServeArgs;
use crate::shop::settlement::SettleArgs;
use crate::subscriptions::renew::RenewArgs;

#[derive(Debug, Parser)]
#[command(
    name = "flashsale",
    version,
    about = "High-concurrency preorder / flash-sale engine"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply migrations, then serve the HTTP API until SIGTERM or Ctrl-C.
    Serve(Box<ServeArgs>),
    /// Apply pending SQL migrations and exit.
    Migrate(DbArgs),
    /// Check each drop's Redis state against Postgres and rebuild it from Postgres where Redis lost data.
    Reconcile(ReconcileArgs),
    /// Settle one UTC day of the regular shop per seller (gross, refunds, fee, net); running it again rewrites
    /// the same rows.
    Settle(SettleArgs),
    /// Charge every subscription renewal due at `--at` (default now), each period exactly once, with dunning
    /// retries; running it again, or on several machines at once, charges nothing twice.
    Renew(Box<RenewArgs>),
    /// Administrative tasks.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create an admin member, or promote an existing member with this email to admin.
    Create(AdminCreateArgs),
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::EngineArgs;

    /// `EngineArgs::default()` restates the command-line defaults by hand; this keeps the two from drifting.
    #[test]
    fn engine_defaults_match_the_command_line_defaults() {
        let engine_vars = [
            "ENGINE_SHARDS",
            "RESERVE_INFLIGHT_MAX",
            "PAY_INFLIGHT_MAX",
            "REAPER_INTERVAL_MS",
            "DROP_RETAIN_SECONDS",
            "WRITER_BATCH_ROWS_MAX",
            "WRITER_FLUSH_INTERVAL_MS",
            "WRITER_CHANNEL_CAPACITY",
            "PAYMENT_TIMEOUT_MS",
            "PAYMENT_LATENCY_MS",
            "PAYMENT_FAILURE_RATE",
        ];
        if engine_vars
            .iter()
            .any(|var| std::env::var_os(var).is_some())
        {
            // The environment overrides the defaults; there is nothing to compare against then.
            return;
        }
        let cli = Cli::try_parse_from(["flashsale", "serve", "--dev"]).expect("parse");
        let Command::Serve(serve) = cli.command else {
            panic!("expected serve");
        };
        assert_eq!(
            format!("{:?}", serve.engine),
            format!("{:?}", EngineArgs::default())
        );
    }
}
