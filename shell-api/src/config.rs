//! The `flashsale` command line: one typed config per subcommand, every setting also readable from the
//! environment (documented in `.env.example`), passed explicitly to what needs it.

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand};

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

#[derive(Debug, Clone, Args)]
pub struct AdminCreateArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Email of the admin.
    #[arg(long)]
    pub email: String,
    /// Password (at least 8 characters); for an existing member it is left unchanged.
    #[arg(long)]
    pub password: String,
    /// Display name for a newly created admin.
    #[arg(long, default_value = "Admin")]
    pub name: String,
}

#[derive(Debug, Clone, Args)]
pub struct ReconcileArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Only this drop (default: every drop).
    #[arg(long = "drop")]
    pub drop: Option<uuid::Uuid>,
}

#[derive(Debug, Clone, Args)]
pub struct SettleArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub shop: ShopArgs,
    /// The UTC day to settle, YYYY-MM-DD (default: yesterday).
    #[arg(long)]
    pub date: Option<chrono::NaiveDate>,
}

/// Settings of the regular shop.
#[derive(Debug, Clone, Args)]
pub struct ShopArgs {
    /// The marketplace fee taken in the daily settlement, in basis points of gross sales (300 = 3%), rounded
    /// down; at most 10000.
    #[arg(long, env = "SETTLEMENT_FEE_BPS", default_value_t = 300, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub settlement_fee_bps: u32,
}

#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// PostgreSQL URL; the database is created if missing.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/flashsale"
    )]
    pub database_url: String,
    /// Maximum connections in the Postgres pool.
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: usize,
    /// How long a request waits for a pooled connection before answering 503.
    #[arg(long, env = "DB_POOL_WAIT_MS", default_value_t = 2000)]
    pub db_pool_wait_ms: u64,
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
}

/// Limits of the live part: event streams (drop events, notifications) and the notifier.
#[derive(Debug, Clone, Args)]
pub struct LiveArgs {
    /// Event streams (drop events and notification streams) this instance keeps open at once; past it, 429 with
    /// Retry-After.
    #[arg(long, env = "LIVE_STREAMS_MAX", default_value_t = 20_000)]
    pub live_streams_max: usize,
    /// Event streams one signed-in member may keep open on this instance; past it, 429 with Retry-After.
    #[arg(long, env = "LIVE_STREAMS_PER_MEMBER_MAX", default_value_t = 8)]
    pub live_streams_per_member_max: usize,
    /// Longest life of one event stream; then it ends and the browser's EventSource reconnects (the token is
    /// checked again and the current state sent at once), so dead or revoked streams never stay.
    #[arg(long, env = "LIVE_STREAM_MAX_SECONDS", default_value_t = 600)]
    pub live_stream_max_seconds: u64,
    /// How often a drop's producer reads its counts (one read per drop, whatever the number of watchers).
    #[arg(long, env = "LIVE_POLL_INTERVAL_MS", default_value_t = 100)]
    pub live_poll_interval_ms: u64,
    /// How often the notifier looks for drops scheduled, opened or restocked, and for new notifications of
    /// members with an open notification stream.
    #[arg(long, env = "LIVE_NOTIFY_INTERVAL_MS", default_value_t = 500)]
    pub live_notify_interval_ms: u64,
    /// A restock burst: units that come back to a sold-out drop within this long of the last restock
    /// notification do not notify again.
    #[arg(long, env = "LIVE_RESTOCK_WINDOW_SECONDS", default_value_t = 60)]
    pub live_restock_window_seconds: u64,
}

/// Where Redis is, and the Redis gate's limits. Without a URL the engine runs on its embedded gate.
#[derive(Debug, Clone, Args)]
pub struct RedisArgs {
    /// Redis URL. Unset or empty: the embedded gate (one instance; its in-memory core is the stock authority). Set:
    /// Redis is the stock authority and any number of instances may serve the same drops. Several comma-separated
    /// URLs are the seed nodes of a Redis Cluster.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Treat a single REDIS_URL as a Redis Cluster seed node.
    #[arg(long, env = "REDIS_CLUSTER", default_value_t = false)]
    pub redis_cluster: bool,
    /// Prefix of every Redis key, so several deployments can share one Redis.
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "flashsale:")]
    pub redis_key_prefix: String,
    /// Longest wait for one Redis call; past it reservations are refused with 503 (never granted).
    #[arg(long, env = "REDIS_TIMEOUT_MS", default_value_t = 1000)]
    pub redis_timeout_ms: u64,
    /// Most reservations the Redis gate sends in one script call.
    #[arg(long, env = "REDIS_BATCH_MAX", default_value_t = 512)]
    pub redis_batch_max: usize,
    /// How long a payment in progress owns its hold. Past it, any instance's reaper fences the payment in Postgres:
    /// the hold is paid if its purchase is stored, else released and the charge refunded, and the late payment is
    /// refused (409 hold_expired). Keep it well above PAYMENT_TIMEOUT_MS.
    #[arg(long, env = "PAY_LEASE_SECONDS", default_value_t = 120)]
    pub pay_lease_seconds: u64,
    /// A journal entry delivered to an instance and not written for this long is written by another (claimed
    /// from an instance that died).
    #[arg(long, env = "JOURNAL_CLAIM_IDLE_MS", default_value_t = 5000)]
    pub journal_claim_idle_ms: u64,
}

impl RedisArgs {
    /// The Redis URLs, if Redis is configured.
    pub fn urls(&self) -> Option<Vec<String>> {
        let urls: Vec<String> = self
            .redis_url
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
            .collect();
        (!urls.is_empty()).then_some(urls)
    }

    /// The Redis gate's configuration, if Redis is configured.
    pub fn gate_config(&self) -> Option<engine::gate::redis::RedisGateConfig> {
        let urls = self.urls()?;
        Some(engine::gate::redis::RedisGateConfig {
            cluster: self.redis_cluster,
            key_prefix: self.redis_key_prefix.clone(),
            call_timeout: std::time::Duration::from_millis(self.redis_timeout_ms.max(1)),
            batch_max: self.redis_batch_max.max(1),
            pay_lease: std::time::Duration::from_secs(self.pay_lease_seconds.max(1)),
            journal_claim_idle: std::time::Duration::from_millis(self.journal_claim_idle_ms.max(1)),
            ..engine::gate::redis::RedisGateConfig::new(urls)
        })
    }
}

impl Default for RedisArgs {
    /// No Redis: the embedded gate.
    fn default() -> Self {
        Self {
            redis_url: None,
            redis_cluster: false,
            redis_key_prefix: "flashsale:".into(),
            redis_timeout_ms: 1000,
            redis_batch_max: 512,
            pay_lease_seconds: 120,
            journal_claim_idle_ms: 5000,
        }
    }
}

/// Settings of the drop engine.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Stock shards per drop in the embedded gate (rounded up to a power of two).
    #[arg(long, env = "ENGINE_SHARDS", default_value_t = engine::core::DEFAULT_SHARDS)]
    pub engine_shards: usize,
    /// Reservations in flight at once; past it, answers 429 with Retry-After at once.
    #[arg(long, env = "RESERVE_INFLIGHT_MAX", default_value_t = 4096)]
    pub reserve_inflight_max: usize,
    /// Payments in flight at once; past it, answers 429 with Retry-After at once.
    #[arg(long, env = "PAY_INFLIGHT_MAX", default_value_t = 1024)]
    pub pay_inflight_max: usize,
    /// How often the reaper releases expired holds.
    #[arg(long, env = "REAPER_INTERVAL_MS", default_value_t = 1000)]
    pub reaper_interval_ms: u64,
    /// How long a drop whose sale is settled (no holds, and sold out or closed) stays in memory before it is
    /// unloaded (reads then come from Postgres).
    #[arg(long, env = "DROP_RETAIN_SECONDS", default_value_t = 3600)]
    pub drop_retain_seconds: u64,
    /// Most rows the writer commits in one transaction.
    #[arg(long, env = "WRITER_BATCH_ROWS_MAX", default_value_t = 1000)]
    pub writer_batch_rows_max: usize,
    /// How long a batch that is not full waits for more rows; 0 commits whatever queued at once.
    #[arg(long, env = "WRITER_FLUSH_INTERVAL_MS", default_value_t = 0)]
    pub writer_flush_interval_ms: u64,
    /// How long a batch that nobody awaits (new holds and releases only) waits for more rows before its commit;
    /// a purchase, journal or flush arriving ends the wait. Those rows were never promised durable (a hold lost
    /// with the process returns its stock on restart), and fewer, larger commits leave Postgres's CPU to the
    /// reservations.
    #[arg(long, env = "WRITER_UNAWAITED_LINGER_MS", default_value_t = 5)]
    pub writer_unawaited_linger_ms: u64,
    /// Bound of the writer's queue; producers wait when it is full.
    #[arg(long, env = "WRITER_CHANNEL_CAPACITY", default_value_t = 16_384)]
    pub writer_channel_capacity: usize,
    /// Longest wait for the payment gateway's answer to a charge, in milliseconds. Past it the charge is refunded (in
    /// case it went through), the payment answers 503 payment_unavailable and the hold is held again, so a hung
    /// gateway never keeps a unit from sale. Keep it well below PAY_LEASE_SECONDS.
    #[arg(long, env = "PAYMENT_TIMEOUT_MS", default_value_t = 30_000)]
    pub payment_timeout_ms: u64,
    /// Latency the simulated payment gateway adds to each charge.
    #[arg(long, env = "PAYMENT_LATENCY_MS", default_value_t = 0)]
    pub payment_latency_ms: u64,
    /// Share (0.0..=1.0) of charges the simulated gateway answers as unavailable.
    #[arg(long, env = "PAYMENT_FAILURE_RATE", default_value_t = 0.0)]
    pub payment_failure_rate: f64,
}

impl EngineArgs {
    pub fn engine_config(&self) -> engine::EngineConfig {
        engine::EngineConfig {
            reserve_inflight_max: self.reserve_inflight_max,
            pay_inflight_max: self.pay_inflight_max,
            reaper_interval: std::time::Duration::from_millis(self.reaper_interval_ms.max(1)),
            payment_timeout: std::time::Duration::from_millis(self.payment_timeout_ms.max(1)),
            settled_retain: std::time::Duration::from_secs(self.drop_retain_seconds),
            writer: engine::writer::WriterConfig {
                batch_rows_max: self.writer_batch_rows_max,
                channel_capacity: self.writer_channel_capacity,
                linger: std::time::Duration::from_millis(self.writer_flush_interval_ms),
                unawaited_linger: std::time::Duration::from_millis(self.writer_unawaited_linger_ms),
                ..engine::writer::WriterConfig::default()
            },
        }
    }

    pub fn gateway_config(&self) -> engine::payment::SimulatedGatewayConfig {
        engine::payment::SimulatedGatewayConfig {
            latency: std::time::Duration::from_millis(self.payment_latency_ms),
            failure_rate: self.payment_failure_rate.clamp(0.0, 1.0),
        }
    }
}

impl Default for EngineArgs {
    /// The documented defaults, for tests and tools that build an engine without a command line.
    fn default() -> Self {
        Self {
            engine_shards: engine::core::DEFAULT_SHARDS,
            reserve_inflight_max: 4096,
            pay_inflight_max: 1024,
            reaper_interval_ms: 1000,
            payment_timeout_ms: 30_000,
            drop_retain_seconds: 3600,
            writer_batch_rows_max: 1000,
            writer_flush_interval_ms: 0,
            writer_unawaited_linger_ms: 5,
            writer_channel_capacity: 16_384,
            payment_latency_ms: 0,
            payment_failure_rate: 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

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
