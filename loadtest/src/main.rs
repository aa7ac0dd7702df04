//! The `flashsale-load` binary: runs one subcommand, prints goose's tables and our summary, and exits 0 when every
//! invariant and threshold held, 1 when one failed, 2 when the run itself could not be carried out.

use std::process::ExitCode;

use clap::Parser;
use loadtest::config::{Cli, Command};
use loadtest::run;
use loadtest::summary::{self, threshold_line};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Drop(args) => run::drop(args).await.map(|o| drop_verdict(&o)),
        Command::Mixed(args) => run::mixed(args).await.map(|o| drop_verdict(&o)),
        Command::Browse(args) => run::browse(args).await.map(|e| goose_verdict("browse", &e)),
        Command::Feed(args) => run::feed(args).await.map(|e| goose_verdict("feed", &e)),
        Command::Shop(args) => run::shop(args).await.map(|o| shop_verdict(&o)),
        Command::Queue(args) => run::queue(args).await.map(|o| launch_verdict(&o.summary)),
        Command::Draw(args) => run::draw(args).await.map(|o| launch_verdict(&o.summary)),
        Command::Subscribe(args) => run::subscribe(args).await.map(|o| subscribe_verdict(&o)),
        Command::Rate(args) => run::rate(args).await.map(|report| {
            print!("{}", report.render());
            report.errors() == 0
        }),
        Command::Burst(args) => {
            let json = args.json.clone();
            run::burst(args).await.and_then(|outcome| {
                print!("{}", outcome.render());
                if let Some(path) = json {
                    summary::write_json(&outcome.to_json(), &path)?;
                }
                Ok(outcome.passed())
            })
        }
        Command::Campaign(args) => run::campaign(args).await.map(|summary| {
            print!("{}", loadtest::campaign::render(&summary));
            summary.passed
        }),
        Command::Chaos(args) => run::chaos(args).await.map(|outcome| {
            print!("{}", outcome.summary);
            outcome.passed()
        }),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            eprintln!("flashsale-load: error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn drop_verdict(outcome: &run::DropOutcome) -> bool {
    print!("{}", summary::render(&outcome.summary));
    outcome.summary.passed
}

fn launch_verdict(summary: &loadtest::launch::LaunchSummary) -> bool {
    print!("{}", summary.render());
    for file in &summary.report_files {
        println!("goose report: {file}");
    }
    summary.passed
}

fn shop_verdict(outcome: &run::ShopOutcome) -> bool {
    println!("\nshop checks");
    print!("{}", summary::render_checks(&outcome.checks));
    goose_verdict("shop", &outcome.ended) && outcome.passed()
}

fn subscribe_verdict(outcome: &run::SubscribeOutcome) -> bool {
    println!("\nsubscribe checks");
    print!("{}", summary::render_checks(&outcome.summary.checks));
    goose_verdict("subscribe", &outcome.ended) && outcome.summary.passed
}

fn goose_verdict(name: &str, ended: &loadtest::attack::Ended) -> bool {
    let passed = ended.thresholds_failed.is_empty();
    println!(
        "\nflashsale-load {name}: {}",
        if passed { "PASS" } else { "FAIL" }
    );
    for rule in &ended.thresholds_failed {
        println!("  FAIL  threshold {}", threshold_line(rule));
    }
    for file in &ended.report_files {
        println!("goose report: {file}");
    }
    passed
}
