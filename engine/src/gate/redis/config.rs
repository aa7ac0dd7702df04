//! The Redis gate's settings and its connection error.

use std::time::Duration;

/// Settings of the Redis gate.
#[derive(Debug, Clone)]
pub struct RedisGateConfig {
    /// One URL for a single server; several for the seed nodes of a Redis Cluster.
    pub urls: Vec<String>,
    /// Treat a single URL as a cluster seed.
    pub cluster: bool,
    /// Put in front of every key, so deployments (and tests) can share one Redis.
    pub key_prefix: String,
    /// Longest wait for one Redis call; past it the request is refused (503), never granted.
    pub call_timeout: Duration,
    /// Most reservations, or hold transitions, in one script call.
    pub batch_max: usize,
    /// Script calls of each kind (reserve, transition) one drop may have in flight at once on this instance.
    pub calls_in_flight: usize,
    /// How long a `paying` hold belongs to the payment that began it; past it any instance's reaper fences the
    /// payment in Postgres and settles the hold (paid if its purchase is stored, else released and refunded).
    pub pay_lease: Duration,
    /// Drops the backstop sweep looks at per second at most (a sweep covers notes lost without the subscription
    /// dropping; see `notes.rs`): the idle cost of this instance in Redis calls, whatever the number of drops.
    pub sweep_lanes_per_second: usize,
    /// Each drop is swept at least this often while there are fewer than `sweep_lanes_per_second` times as many.
    pub sweep_period_min: Duration,
    /// The shortest time between two reads of a drop's stream unless the first filled a read (`journal_batch_max`
    /// entries): a busy drop's notes cost at most one read, and its holds one commit, per this.
    pub journal_idle: Duration,
    /// A journal entry delivered to a consumer and not acknowledged for this long is claimed by another.
    pub journal_claim_idle: Duration,
    /// Most stream entries the journal writes in one go.
    pub journal_batch_max: usize,
    /// How long the keys of a drop whose sale is over stay in Redis after an instance unloads it.
    pub settled_ttl: Duration,
    /// Whether this instance runs the journal (reads the streams into Postgres). Every instance does by default;
    /// one that does not leaves the writing to the others (and a benchmark measures the gate alone).
    pub journal: bool,
    /// Whether this instance subscribes to the drops' notes. Every instance does; off, it hears none (as if every
    /// note were lost) and relies on what it schedules itself and on the backstop sweep, which is what a test of a
    /// lost note needs.
    pub notes: bool,
}

impl RedisGateConfig {
    pub fn new(urls: Vec<String>) -> Self {
        Self {
            urls,
            cluster: false,
            key_prefix: "flashsale:".into(),
            call_timeout: Duration::from_millis(1000),
            batch_max: 512,
            calls_in_flight: 2,
            pay_lease: Duration::from_secs(120),
            sweep_lanes_per_second: 10,
            sweep_period_min: Duration::from_secs(30),
            journal_idle: Duration::from_millis(20),
            journal_claim_idle: Duration::from_secs(5),
            journal_batch_max: 512,
            journal: true,
            notes: true,
            settled_ttl: Duration::from_secs(7 * 24 * 60 * 60),
        }
    }
}

/// Why the gate could not set up.
#[derive(Debug, thiserror::Error)]
pub enum RedisGateError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}
