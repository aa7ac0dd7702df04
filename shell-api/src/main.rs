//! The `flashsale` binary: `serve`, `migrate`, `reconcile`, `settle`, `renew` and `admin create`.

use clap::Parser;
use shell_api::cli::{AdminCommand, Cli, Command};
use tracing_subscriber::EnvFilter;

/// mimalloc instead of the system allocator: the request path allocates and frees many small buffers (headers,
/// bodies, JSON) across two worker threads, and glibc's malloc/free showed as ~8% of a flat profile of it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Builds the runtime by hand: `serve` with `SERVE_RUNTIMES=per-core` runs its first runtime (the engine's, and
/// one listener's) on a single thread, and starts one more per core itself; everything else gets tokio's default.
fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let per_core = matches!(&cli.command, Command::Serve(args)
        if args.serve_runtimes == shell_api::server::ServeRuntimes::PerCore);
    let runtime = if per_core {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
    .enable_all()
    .build()?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // LOG_FORMAT=json: one JSON object per line, with the request's span (its id) on every line of a request.
    match std::env::var("LOG_FORMAT").as_deref() {
        Ok("json") => logs.json().with_current_span(true).init(),
        Ok("text") | Err(_) => logs.init(),
        Ok(other) => {
            logs.init();
            tracing::warn!(
                LOG_FORMAT = other,
                "unknown LOG_FORMAT (json or text); logging text"
            );
        }
    }
    match cli.command {
        Command::Serve(args) => shell_api::server::serve(*args).await,
        Command::Migrate(args) => {
            let pool = shell_api::db::connect(&args).await?;
            let applied = shell_api::db::migrate(&pool).await?;
            println!("applied migrations: {applied:?}");
            Ok(())
        }
        Command::Reconcile(args) => {
            shell_api::ops::reconcile::run(args).await?;
            Ok(())
        }
        Command::Settle(args) => shell_api::shop::settlement::run(args).await,
        Command::Renew(args) => shell_api::subscriptions::renew::run(*args).await,
        Command::Admin {
            command: AdminCommand::Create(args),
        } => shell_api::members::admin_create(args).await,
    }
}
