//! Settings more than one command shares: where Postgres and Redis are, and the drop engine's limits. Each
//! command's own settings live beside the command (`server::ServeArgs`, `ops::reconcile::ReconcileArgs`,
//! `shop::settlement::SettleArgs`, `members::AdminCreateArgs`); `cli.rs` composes them. Every setting is also read
//! from the environment (documented in `.env.example`) and passed explicitly to what needs it.

use clap::Args;

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
    /// Most reservations (or hold transitions) the Redis gate sends in one script call.
    #[arg(long, env = "REDIS_BATCH_MAX", default_value_t = 512)]
    pub redis_batch_max: usize,
    /// Script calls of each kind (reservations, transitions) one drop may have in flight at once on an instance:
    /// while they are in flight the next batch gathers.
    #[arg(long, env = "REDIS_CALLS_IN_FLIGHT", default_value_t = 2)]
    pub redis_calls_in_flight: usize,
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
            calls_in_flight: self.redis_calls_in_flight.max(1),
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
            redis_calls_in_flight: 2,
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
    /// How often each instance runs an admission step of every queue drop it has loaded.
    #[arg(long, env = "QUEUE_TICK_MS", default_value_t = 100)]
    pub queue_tick_ms: u64,
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
    /// Count each drop's decisions for its report (GET /api/v1/drops/{id}/report); `false` only to measure what the
    /// counting costs.
    #[arg(long, env = "DROP_REPORT_COUNTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub drop_report_counts: bool,
    /// Latency the simulated payment gateway adds to each charge.
    #[arg(long, env = "PAYMENT_LATENCY_MS", default_value_t = 0)]
    pub payment_latency_ms: u64,
    /// Share (0.0..=1.0) of charges the simulated gateway answers as unavailable.
    #[arg(long, env = "PAYMENT_FAILURE_RATE", default_value_t = 0.0)]
    pub payment_failure_rate: f64,
    /// Keep the simulated gateway's refund idempotency records in Postgres (`simulated_gateway_refunds`) instead
    /// of its memory, so they outlive the process as a real gateway's do: for tests and demos that kill instances
    /// and count refunds at the gateway.
    #[arg(long, env = "SIMULATED_GATEWAY_LEDGER", default_value_t = false, action = clap::ArgAction::Set)]
    pub simulated_gateway_ledger: bool,
}

impl EngineArgs {
    pub fn engine_config(&self) -> engine::EngineConfig {
        engine::EngineConfig {
            reserve_inflight_max: self.reserve_inflight_max,
            pay_inflight_max: self.pay_inflight_max,
            reaper_interval: std::time::Duration::from_millis(self.reaper_interval_ms.max(1)),
            queue_tick: std::time::Duration::from_millis(self.queue_tick_ms.max(1)),
            payment_timeout: std::time::Duration::from_millis(self.payment_timeout_ms.max(1)),
            settled_retain: std::time::Duration::from_secs(self.drop_retain_seconds),
            report_counts: self.drop_report_counts,
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
            queue_tick_ms: 100,
            payment_timeout_ms: 30_000,
            drop_retain_seconds: 3600,
            drop_report_counts: true,
            writer_batch_rows_max: 1000,
            writer_flush_interval_ms: 0,
            writer_unawaited_linger_ms: 5,
            writer_channel_capacity: 16_384,
            payment_latency_ms: 0,
            payment_failure_rate: 0.0,
            simulated_gateway_ledger: false,
        }
    }
}
