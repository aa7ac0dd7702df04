//! Running the service on a socket: bind, announce, serve, and shut down gracefully on SIGTERM or Ctrl-C.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rand::RngCore;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{app, db, AppState, Settings};
use std::net::SocketAddr;

use clap::Args;

use crate::config::{DbArgs, EngineArgs, RedisArgs};
use crate::live::LiveArgs;
use crate::shop::ShopArgs;

/// Resolves settings, migrates, binds and serves until a shutdown signal; then drains within the grace period.
#[allow(
    clippy::too_many_lines,
    reason = "the start-up sequence read top to bottom: settings, migrations, engine, tasks, bind, graceful shutdown"
)]
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let jwt_secret = match (&args.jwt_secret, args.dev) {
        (Some(secret), _) if !secret.is_empty() => secret.as_bytes().to_vec(),
        (_, true) => {
            tracing::warn!("--dev without JWT_SECRET: signing with a random secret; tokens die with the process");
            let mut secret = vec![0u8; 32];
            rand::thread_rng().fill_bytes(&mut secret);
            secret
        }
        _ => anyhow::bail!("JWT_SECRET is required (or pass --dev for a throwaway secret)"),
    };
    let settings = Settings {
        jwt_secret,
        access_token_seconds: args.access_token_seconds,
        refresh_token_seconds: args.refresh_token_seconds,
        max_body_bytes: args.max_body_bytes,
        request_timeout: Duration::from_millis(args.request_timeout_ms),
        login_limits: crate::abuse::LoginLimits {
            failures_per_account: args.login_failures_per_account,
            failures_per_address: args.login_failures_per_address,
            window: Duration::from_secs(args.login_failure_window_seconds),
        },
        live: crate::live::LiveConfig::from(&args.live),
        campaigns: crate::campaigns::CampaignConfig::from(&args.campaigns),
    };

    if !args.serve_huge_pages {
        refuse_huge_pages();
    }
    raise_open_files(
        args.live.live_streams_max
            + args.engine.reserve_inflight_max
            + args.engine.pay_inflight_max
            + args.db.db_pool_size,
    );

    let mut hashing = crate::abuse::HashingConfig {
        queue_max: args.password_hash_queue_max,
        wait_max: Duration::from_millis(args.password_hash_wait_ms),
        ..crate::abuse::HashingConfig::default()
    };
    if args.password_hash_concurrency > 0 {
        hashing.concurrency = args.password_hash_concurrency;
    }
    crate::abuse::configure_hashing(hashing);
    if args.metrics {
        // Before the engine starts: it takes its metric handles at start.
        crate::metrics::install().context("installing the metrics recorder")?;
    }
    let pool = db::connect(&args.db).await?;
    let applied = db::migrate(&pool).await?;
    if !applied.is_empty() {
        tracing::info!(?applied, "migrations applied");
    }
    let started = crate::start_engine(
        pool.clone(),
        &args.engine,
        &args.redis,
        Arc::new(engine::clock::SystemClock),
    )
    .await
    .context("starting the drop engine")?;
    let engine = Arc::clone(&started.engine);
    if started.redis.is_some() {
        tracing::info!(
            "Redis is the stock authority; any number of instances may serve these drops"
        );
    }
    let state = AppState::new(pool, settings, Arc::clone(&engine), started.redis.as_ref());
    // Learn credential changes from before this start, then keep polling for other instances' changes.
    state
        .members
        .poll_changes(&state.db, state.settings.access_token_seconds)
        .await
        .map_err(|err| anyhow::anyhow!("reading credential changes: {}", err.code()))?;
    tokio::spawn(crate::auth::poll_changes_forever(state.clone()));
    tokio::spawn(crate::shop::settlement::run_daily(
        state.db.clone(),
        args.shop.settlement_fee_bps,
    ));
    tokio::spawn(crate::live::notifications::notify_forever(state.clone()));
    tokio::spawn(crate::drops::draw::draw_forever(state.clone()));
    tokio::spawn(crate::subscriptions::renew::renew_forever(state.clone()));
    tokio::spawn(crate::campaigns::close::campaigns_forever(state.clone()));
    let live = Arc::clone(&state.live);

    // The handlers are installed before the server says it is listening: a SIGTERM sent the moment it is ready
    // (a supervisor, a test) drains it cleanly instead of killing it by the default action.
    let shutdown = shutdown_signal().context("listening for SIGTERM and SIGINT")?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let (addr, mut server) = start_serving(&args, state, stop_rx, done_rx)?;
    println!("listening on http://{addr}");
    std::io::stdout().flush().ok();

    tokio::select! {
        result = &mut server => {
            engine.shutdown().await;
            let _ = done_tx.send(true);
            return result.context("server task")?.context("serving");
        }
        () = shutdown => {}
    }
    tracing::info!("shutting down: finishing in-flight requests");
    // Event streams never finish by themselves; end them so graceful shutdown does not wait out its grace.
    live.shutdown();
    let _ = stop_tx.send(true);
    let grace = Duration::from_millis(args.shutdown_grace_ms);
    match tokio::time::timeout(grace, &mut server).await {
        Ok(result) => result.context("server task")?.context("serving")?,
        Err(_) => {
            tracing::warn!("grace period over; dropping remaining connections");
            server.abort();
        }
    }
    // Requests are done (or cut off); whatever they queued is committed before the process exits.
    engine.shutdown().await;
    // The per-core runtimes may run engine tasks (a Redis drop's lanes start on the runtime that loaded the drop);
    // they end only now.
    let _ = done_tx.send(true);
    tracing::info!("writer drained; bye");
    Ok(())
}

/// How `serve` runs its connections (`SERVE_RUNTIMES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServeRuntimes {
    /// One multi-threaded runtime, a worker per core, for every connection and the engine: a connection's task
    /// may be woken on another core than the one that read its request.
    Shared,
    /// A single-threaded runtime per core, each accepting on its own `SO_REUSEPORT` listener on the same address
    /// (the kernel spreads connections over them), so a request is read, handled and answered on one thread with
    /// no cross-thread wake-up. The first runtime also runs the engine's tasks (writer, reaper); the engine is
    /// shared by all, as with one runtime.
    PerCore,
}

/// The runtimes `serve` runs on: one for the shared setting, one per core otherwise.
pub fn runtime_count(runtimes: ServeRuntimes) -> usize {
    match runtimes {
        ServeRuntimes::Shared => 1,
        ServeRuntimes::PerCore => std::thread::available_parallelism().map_or(1, usize::from),
    }
}

/// Binds the listeners and starts serving `app(state)` on them until `stop` turns true: one listener on this
/// runtime, or with `SERVE_RUNTIMES=per-core` one per core, the others each on a thread of its own with a
/// single-threaded runtime that lives until `done` turns true. Returns the bound address and a task that ends
/// when every listener has stopped serving.
fn start_serving(
    args: &ServeArgs,
    state: AppState,
    stop: watch::Receiver<bool>,
    done: watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, JoinHandle<std::io::Result<()>>)> {
    let count = runtime_count(args.serve_runtimes);
    let reuse_port = args.serve_runtimes == ServeRuntimes::PerCore;
    let first = listen(args.bind_addr, reuse_port, args.listen_backlog)
        .with_context(|| format!("binding {}", args.bind_addr))?;
    // Port 0 picks a port once; the other listeners join it.
    let addr = first.local_addr()?;
    let mut others = Vec::with_capacity(count - 1);
    for core in 1..count {
        let listener = listen(addr, true, args.listen_backlog)
            .with_context(|| format!("binding listener {core} to {addr}"))?;
        others.push(spawn_core_runtime(
            core,
            listener.into_std()?,
            state.clone(),
            stop.clone(),
            done.clone(),
        )?);
    }
    let server = tokio::spawn(async move {
        let served = serve_connections(first, state, stop).await;
        for other in others {
            // A runtime that failed to start or serve says so; one whose thread died is an error too.
            other.await.unwrap_or_else(|_| {
                Err(std::io::Error::other("a serving runtime's thread ended"))
            })?;
        }
        served
    });
    if count > 1 {
        tracing::info!(runtimes = count, %addr, "serving on a runtime per core, one SO_REUSEPORT listener each");
    }
    Ok((addr, server))
}

/// A listening socket with `SO_REUSEADDR` (as `TcpListener::bind` sets it), `SO_REUSEPORT` when asked, and
/// `backlog` connections waiting to be accepted (the kernel caps it at `net.core.somaxconn`).
fn listen(addr: SocketAddr, reuse_port: bool, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Serves `app(state)` on `listener` until `stop` turns true, then finishes the requests in flight.
async fn serve_connections(
    listener: TcpListener,
    state: AppState,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    // With connection info: failed logins are also counted per client address.
    axum::serve(
        listener,
        axum::ServiceExt::<axum::extract::Request>::into_make_service_with_connect_info::<
            std::net::SocketAddr,
        >(app(state)),
    )
    .with_graceful_shutdown(async move {
        let _ = stop.wait_for(|stop| *stop).await;
    })
    .await
}

/// A thread with a single-threaded runtime that serves `listener` until `stop`, then keeps running the tasks
/// spawned on it until `done`; the receiver gets how serving ended.
fn spawn_core_runtime(
    core: usize,
    listener: std::net::TcpListener,
    state: AppState,
    stop: watch::Receiver<bool>,
    mut done: watch::Receiver<bool>,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<std::io::Result<()>>> {
    let (served_tx, served_rx) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building a serving runtime")?;
    std::thread::Builder::new()
        .name(format!("serve-{core}"))
        .spawn(move || {
            runtime.block_on(async move {
                let served = match TcpListener::from_std(listener) {
                    Ok(listener) => serve_connections(listener, state, stop).await,
                    Err(err) => Err(err),
                };
                let _ = served_tx.send(served);
                let _ = done.wait_for(|done| *done).await;
            });
        })
        .context("starting a serving thread")?;
    Ok(served_rx)
}

/// Installs the SIGINT (Ctrl-C) and SIGTERM handlers now and returns what completes on either.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Address to listen on; port 0 picks a free port (the bound address is printed).
    #[arg(long, env = "BIND_ADDR", default_value = "127.0.0.1:8080")]
    pub bind_addr: SocketAddr,
    /// How connections are served: `shared`, one multi-threaded runtime (a worker per core); or `per-core`, a
    /// single-threaded runtime per core, each with its own SO_REUSEPORT listener, so a request never wakes another
    /// thread. The engine is shared either way.
    #[arg(long, env = "SERVE_RUNTIMES", value_enum, default_value_t = ServeRuntimes::Shared)]
    pub serve_runtimes: ServeRuntimes,
    /// Connections each listener lets wait to be accepted (the kernel caps it at net.core.somaxconn): thousands of
    /// clients connecting before a drop opens overflow a short queue, and each dropped SYN costs its client a
    /// second before it tries again.
    #[arg(long, env = "LISTEN_BACKLOG", default_value_t = 4096)]
    pub listen_backlog: u32,
    /// Let the kernel back the heap with transparent huge pages (2 MiB) where the system allows them. Off, the
    /// process opts out: the allocator returns freed memory to the kernel and each fault back in zeroed a whole
    /// huge page, about 5% of the server's CPU in a sell-out, for more memory besides.
    #[arg(long, env = "SERVE_HUGE_PAGES", default_value_t = false, action = clap::ArgAction::Set)]
    pub serve_huge_pages: bool,
    /// Secret for signing access tokens (HS256). Required unless --dev.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Development mode: without JWT_SECRET, sign with a random per-process secret.
    #[arg(long)]
    pub dev: bool,
    /// Lifetime of access tokens.
    #[arg(long, env = "ACCESS_TOKEN_SECONDS", default_value_t = 900)]
    pub access_token_seconds: u64,
    /// Lifetime of refresh tokens.
    #[arg(long, env = "REFRESH_TOKEN_SECONDS", default_value_t = 1_209_600)]
    pub refresh_token_seconds: u64,
    /// Largest accepted request body; larger bodies get 413.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 1_048_576)]
    pub max_body_bytes: usize,
    /// How long a request may take to get its answer (the head; event streams go on) before a 503.
    #[arg(long, env = "REQUEST_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub request_timeout_ms: u64,
    /// Password hashes (argon2) running at once, at most; 0: half the cores, at least one. The rest of the cores
    /// stay free for reservations during a login storm.
    #[arg(long, env = "PASSWORD_HASH_CONCURRENCY", default_value_t = 0)]
    pub password_hash_concurrency: usize,
    /// Sign-ins waiting for a hashing slot, at most; past it, and after PASSWORD_HASH_WAIT_MS of waiting, 429.
    #[arg(long, env = "PASSWORD_HASH_QUEUE_MAX", default_value_t = 1024)]
    pub password_hash_queue_max: usize,
    #[arg(long, env = "PASSWORD_HASH_WAIT_MS", default_value_t = 10_000)]
    pub password_hash_wait_ms: u64,
    /// Failed logins per account, then per client address, within LOGIN_FAILURE_WINDOW_SECONDS; past either,
    /// logins answer 429 `too_many_attempts` with `Retry-After` until the window ends.
    #[arg(long, env = "LOGIN_FAILURES_PER_ACCOUNT", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub login_failures_per_account: u32,
    #[arg(long, env = "LOGIN_FAILURES_PER_ADDRESS", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub login_failures_per_address: u32,
    #[arg(long, env = "LOGIN_FAILURE_WINDOW_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub login_failure_window_seconds: u64,
    /// Record metrics and serve them at `GET /metrics` (Prometheus text format); `false` leaves both out.
    #[arg(long, env = "METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub metrics: bool,
    /// How long graceful shutdown waits for in-flight requests and the writer's last flush.
    #[arg(long, env = "SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub shop: ShopArgs,
    #[command(flatten)]
    pub live: LiveArgs,
    #[command(flatten)]
    pub campaigns: crate::campaigns::CampaignArgs,
}

/// Opts this process out of transparent huge pages (`SERVE_HUGE_PAGES=false`), for the faults from now on.
fn refuse_huge_pages() {
    match nix::sys::prctl::set_thp_disable(true) {
        Ok(()) => tracing::debug!("transparent huge pages off for this process"),
        Err(err) => tracing::warn!(error = %err, "cannot turn transparent huge pages off"),
    }
}

/// Raises this process's open-files limit (soft) to its hard limit, since every connection is a file and a drop's
/// opening brings thousands at once, and logs the limit. Warns when it stays below `wanted`, the files the settings
/// can keep open at once (streams, requests in flight, the database pool).
pub fn raise_open_files(wanted: usize) -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        tracing::warn!("cannot read the open-files limit");
        return None;
    };
    let limit = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                tracing::info!(
                    from = soft,
                    to = hard,
                    "raised the open-files limit to its hard limit"
                );
                hard
            }
            Err(err) => {
                tracing::warn!(error = %err, soft, hard, "cannot raise the open-files limit");
                soft
            }
        }
    } else {
        soft
    };
    let wanted = u64::try_from(wanted).unwrap_or(u64::MAX);
    if limit < wanted {
        tracing::warn!(
            limit,
            wanted,
            "the open-files limit is below what the settings can keep open (LIVE_STREAMS_MAX + RESERVE_INFLIGHT_MAX + \
             PAY_INFLIGHT_MAX + DB_POOL_SIZE); connections past it are refused by the kernel (raise `ulimit -Hn`)"
        );
    }
    Some(limit)
}
