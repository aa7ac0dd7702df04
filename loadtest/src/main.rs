//! The `flashsale-load` binary: runs one scenario, prints the report, writes it as JSON, and exits 0 when every
//! invariant held, 1 when one failed, 2 when the run itself could not be carried out.

use std::process::ExitCode;

use clap::Parser;
use loadtest::config::{Cli, Command};
use loadtest::{drop_funnel, report};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Drop(args) => match run_drop(&args).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(err) => {
                eprintln!("flashsale-load: error: {err:#}");
                ExitCode::from(2)
            }
        },
    }
}

async fn run_drop(args: &loadtest::config::DropArgs) -> anyhow::Result<bool> {
    let report = drop_funnel::run(args).await?;
    print!("{}", report::render(&report));
    let path = args
        .report
        .clone()
        .unwrap_or_else(|| report::default_path(report.started_at));
    report::write_json(&report, &path)?;
    println!("report: {}", path.display());
    Ok(report.passed)
}
