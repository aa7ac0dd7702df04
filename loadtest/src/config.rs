//! The `flashsale-load` command line: one typed config per subcommand. The goose scenarios (`drop`, `browse`,
//! `feed`, `shop`, `mixed`) take goose's own options too (`--report-file`, `--threshold`, `-u`, `-t`, ...), flattened in
//! from `GooseConfiguration`; `rate` drives a constant arrival rate without goose. Every setting of ours is also
//! read from the environment (`LOAD_*`, plus the usual `DATABASE_URL`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use clap::{Args, Parser, Subcommand};
use goose::config::GooseConfiguration;
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(
    name = "flashsale-load",
    version,
    about = "Load harness for flashsale: goose scenarios against one or several servers, verified afterwards, \
             and a constant-arrival-rate mode for latency without coordinated omission"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The drop funnel: at `opens_at` every buyer tries to reserve; of the holders some abandon (cancel or let the
    /// hold expire), some are declined, the rest pay; refused buyers retry while stock comes back. Then the
    /// invariants are verified through the API and in Postgres. Exits 1 if an invariant or a threshold fails, 2
    /// when the run could not be carried out.
    Drop(DropArgs),
    /// Shop browsing: the product list, search and product pages, anonymously, for `-t` (default 30 s).
    Browse(BrowseArgs),
    /// Feeds: members read the newsfeed (recent and popular), post, like and comment, for `-t` (default 30 s).
    Feed(FeedArgs),
    /// The regular shop: members charge points, fill carts, order (points or card), ask for refunds that the
    /// seller decides, for `-t` (default 30 s); then the shop's guarantees are verified in Postgres. Exits 1 if
    /// one or a threshold fails.
    Shop(ShopArgs),
    /// A realistic blend: the drop funnel while shoppers browse, members read and write the feeds and others buy
    /// from the shelf; the run ends when the funnel is done, and the drop's and the shop's invariants are verified.
    Mixed(MixedArgs),
    /// A waiting room: members join a queue drop (some before the opening, the rest after), wait for their pass,
    /// reserve with it and pay, cancel, are declined or let the pass expire. Then the room's guarantees are checked
    /// (no reservation without a pass, admission in the published order, the pre-queue shuffled, everyone waiting
    /// told sold_out within 1 s) with the stock's. Exits 1 if one or a threshold fails.
    Queue(QueueArgs),
    /// A draw: members enter (some twice, some withdraw), the draw ranks them at `draw_at`, winners pay, are
    /// declined, cancel or let their hold expire (the units go down the ranking). Then the draw is recomputed from
    /// its seed and checked against the winners and Postgres. Exits 1 if a check or a threshold fails.
    Draw(DrawArgs),
    /// Subscriptions: members subscribe (points or cards, some declining), pause, resume, cancel, change cards and
    /// accept a raised price for `-t` (default 30 s), while `flashsale renew --at` runs in rounds (several processes
    /// at once, each round further on the test clock); then one charge per period, the ledgers and the gateway's
    /// records are verified in Postgres. Exits 1 if a check or a threshold fails, 2 when the run could not be
    /// carried out.
    Subscribe(SubscribeRunArgs),
    /// A constant arrival rate over raw HTTP/1.1 connections: requests are scheduled at fixed intended times and
    /// their latency counts from that time, so a stalled server shows in every request it delayed.
    Rate(RateArgs),
    /// The opening burst: sets up one drop and its members, opens `--clients` connections before `opens_at`, has
    /// each send one reservation at the opening instant, and reports how long until every client had an answer,
    /// the answers by status, connection errors, latency and the servers' memory. Exits 1 if a target fails.
    Burst(BurstArgs),
    /// A seeded chaos rehearsal: starts its own Postgres database (behind a proxy it can cut), Redis and
    /// `--instances` servers, sells one drop to `--buyers` while killing, pausing and slowing them on a schedule
    /// derived from `--seed`, then heals everything and checks the recorded history against Postgres. Exits 1 on
    /// any violation, 2 when the run itself could not be carried out.
    Chaos(ChaosArgs),
    /// Two preorder campaigns at once: buyers reserve and pay into both from the opening; one reaches its goal
    /// (funded), the other is kept short of it (unfunded). After `closes_at` the servers' own campaign loop decides
    /// both and refunds the unfunded one; the run waits for that, then checks in Postgres and in the gateway's
    /// refund ledger that every purchase of the unfunded one was refunded exactly once and none of the funded one,
    /// the states, the notifications and the stock. The servers need SIMULATED_GATEWAY_LEDGER=true. Exits 1 if a
    /// check or a threshold fails, 2 when the run could not be carried out.
    Campaign(CampaignArgs),
}

/// Where the servers are and how to set a run up; shared by every subcommand that talks to the API.
#[derive(Debug, Clone, Args, Serialize)]
pub struct TargetArgs {
    /// Base URL of the flashsale server; several instances serving the same data (one Postgres, and one Redis for
    /// drops) as a comma-separated list or by repeating the flag. Setup goes to the first; users are spread over
    /// them round robin, and a hold is paid or cancelled through another instance than the one that granted it.
    /// Only loopback hosts are accepted: this harness is for local runs.
    #[arg(
        long = "base-url",
        env = "LOAD_BASE_URL",
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8080"
    )]
    pub base_urls: Vec<String>,
    /// PostgreSQL URL of the server's database, read after a drop run to verify purchases.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/flashsale",
        hide_env_values = true
    )]
    #[serde(skip)]
    pub database_url: String,
    /// Email of an existing admin (`flashsale admin create`); it promotes the run's seller.
    #[arg(
        long,
        env = "LOAD_ADMIN_EMAIL",
        default_value = "admin@flashsale.local"
    )]
    pub admin_email: String,
    /// Password of that admin.
    #[arg(
        long,
        env = "LOAD_ADMIN_PASSWORD",
        hide_env_values = true,
        default_value = ""
    )]
    #[serde(skip)]
    pub admin_password: String,
    /// Most signups/logins in flight during setup (argon2 makes each cost the server 10-30 ms of CPU).
    #[arg(long, env = "LOAD_SETUP_CONCURRENCY", default_value_t = 16)]
    pub setup_concurrency: usize,
}

/// The drop funnel's settings. Rates are funnel rates: `abandon_rate` of the holders abandon, and
/// `decline_rate` of the others pay with `tok_declined`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct FunnelArgs {
    /// Members who try to buy; each gets `--attempts-per-buyer` goose users (its tabs).
    #[arg(long, env = "LOAD_BUYERS", default_value_t = 600)]
    pub buyers: u32,
    /// Units the drop sells.
    #[arg(long, env = "LOAD_STOCK", default_value_t = 120)]
    pub stock: u32,
    /// Units one member may buy.
    #[arg(long, env = "LOAD_PER_MEMBER_LIMIT", default_value_t = 1)]
    pub per_member_limit: u32,
    /// Tabs per buyer: goose users of one member that each fire one reservation at the opening instant.
    #[arg(long, env = "LOAD_ATTEMPTS_PER_BUYER", default_value_t = 5)]
    pub attempts_per_buyer: u32,
    /// Seconds a hold lasts before the reaper may release it.
    #[arg(long, env = "LOAD_HOLD_SECONDS", default_value_t = 10)]
    pub hold_seconds: u32,
    /// The drop opens this long after it is created, once every buyer is signed in. Goose must start every user
    /// within it (they start at `--attempts-per-buyer` x `--buyers` a second).
    #[arg(long, env = "LOAD_OPENS_IN_MS", default_value_t = 4000)]
    pub opens_in_ms: u64,
    /// Share of holders who abandon their hold (cancel it, or let it expire).
    #[arg(long, env = "LOAD_ABANDON_RATE", default_value_t = 0.2)]
    pub abandon_rate: f64,
    /// Of those who abandon, the share who cancel; the others let the hold expire.
    #[arg(long, env = "LOAD_CANCEL_SHARE", default_value_t = 0.5)]
    pub cancel_share: f64,
    /// Of the holders who do not abandon, the share who pay with `tok_declined`; the others pay with `tok_ok`.
    #[arg(long, env = "LOAD_DECLINE_RATE", default_value_t = 0.2)]
    pub decline_rate: f64,
    /// The server's REAPER_INTERVAL_MS; it only bounds how long the harness waits for expired holds to return.
    #[arg(long, env = "LOAD_REAPER_INTERVAL_MS", default_value_t = 1000)]
    pub reaper_interval_ms: u64,
    /// Seconds refused buyers keep retrying after the spike, on top of `hold_seconds`.
    #[arg(long, env = "LOAD_RESTOCK_SLACK_SECONDS", default_value_t = 5)]
    pub restock_slack_seconds: u64,
    /// Also write the summary (funnel, timeline, checks) as JSON here.
    #[arg(long, env = "LOAD_SUMMARY_FILE")]
    pub summary_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct DropArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub funnel: FunnelArgs,
    #[command(flatten)]
    pub goose: GooseConfiguration,
}

/// What the fair launches (`queue`, `draw`) share: one goose user per member, and the funnel's rates applied to
/// what a member is given (a pass, a won hold).
#[derive(Debug, Clone, Args, Serialize)]
pub struct LaunchArgs {
    /// Members who take part, one goose user each.
    #[arg(long, env = "LOAD_BUYERS", default_value_t = 400)]
    pub buyers: u32,
    /// Units the drop sells (one per member).
    #[arg(long, env = "LOAD_STOCK", default_value_t = 80)]
    pub stock: u32,
    /// Seconds a hold lasts.
    #[arg(long, env = "LOAD_HOLD_SECONDS", default_value_t = 5)]
    pub hold_seconds: u32,
    /// The drop opens this long after it is created, once every member is signed in (queue: the pre-queue joins
    /// before; draw: entries are taken from then).
    #[arg(long, env = "LOAD_OPENS_IN_MS", default_value_t = 4000)]
    pub opens_in_ms: u64,
    /// Share of those given something who abandon it: a pass never used, a won hold left to expire.
    #[arg(long, env = "LOAD_ABANDON_RATE", default_value_t = 0.15)]
    pub abandon_rate: f64,
    /// Share who cancel their hold.
    #[arg(long, env = "LOAD_CANCEL_RATE", default_value_t = 0.1)]
    pub cancel_rate: f64,
    /// Share who pay with `tok_declined`; the rest pay with `tok_ok`.
    #[arg(long, env = "LOAD_DECLINE_RATE", default_value_t = 0.1)]
    pub decline_rate: f64,
    /// How often a member looks at its place or entry, in milliseconds.
    #[arg(long, env = "LOAD_POLL_MS", default_value_t = 250)]
    pub poll_ms: u64,
    /// Also write the summary (figures and checks) as JSON here.
    #[arg(long, env = "LOAD_SUMMARY_FILE")]
    pub summary_file: Option<PathBuf>,
}

impl LaunchArgs {
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            self.buyers > 0 && self.stock > 0,
            "--buyers and --stock must be above 0"
        );
        ensure!(self.hold_seconds > 0, "--hold-seconds must be above 0");
        ensure!(
            self.opens_in_ms >= 1000,
            "--opens-in-ms must be at least 1000"
        );
        ensure!(
            (20..=5_000).contains(&self.poll_ms),
            "--poll-ms must be between 20 and 5000"
        );
        let shares = [self.abandon_rate, self.cancel_rate, self.decline_rate];
        ensure!(
            shares.iter().all(|s| (0.0..=1.0).contains(s)) && shares.iter().sum::<f64>() <= 1.0,
            "--abandon-rate, --cancel-rate and --decline-rate are shares: each in 0..=1, together at most 1"
        );
        Ok(())
    }
}

#[derive(Debug, Clone, Args)]
pub struct QueueArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub launch: LaunchArgs,
    /// Share of members who join the pre-queue, before the opening.
    #[arg(long, env = "LOAD_PRE_SHARE", default_value_t = 0.25)]
    pub pre_share: f64,
    /// The others join within this long after the opening.
    #[arg(long, env = "LOAD_LATE_JOIN_MS", default_value_t = 3000)]
    pub late_join_ms: u64,
    /// The drop's `pass_seconds`.
    #[arg(long, env = "LOAD_PASS_SECONDS", default_value_t = 4)]
    pub pass_seconds: u32,
    /// The drop's `admit_per_second` (none by default).
    #[arg(long, env = "LOAD_ADMIT_PER_SECOND")]
    pub admit_per_second: Option<u32>,
    #[command(flatten)]
    pub goose: GooseConfiguration,
}

#[derive(Debug, Clone, Args)]
pub struct DrawArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub launch: LaunchArgs,
    /// Entries are taken for this long after the opening; then the draw.
    #[arg(long, env = "LOAD_ENTRY_WINDOW_MS", default_value_t = 3000)]
    pub entry_window_ms: u64,
    /// The drop closes this long after the draw (waitlisted entries lose then at the latest).
    #[arg(long, env = "LOAD_CLOSES_AFTER_MS", default_value_t = 120_000)]
    pub closes_after_ms: u64,
    /// Share of members who withdraw their entry before the draw.
    #[arg(long, env = "LOAD_WITHDRAW_RATE", default_value_t = 0.1)]
    pub withdraw_rate: f64,
    #[command(flatten)]
    pub goose: GooseConfiguration,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct CatalogArgs {
    /// Regular products created for the run (bulk), which shoppers list, search and open.
    #[arg(long, env = "LOAD_PRODUCTS", default_value_t = 200)]
    pub products: u32,
}

#[derive(Debug, Clone, Args)]
pub struct BrowseArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub catalog: CatalogArgs,
    #[command(flatten)]
    pub goose: GooseConfiguration,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct SocialArgs {
    /// Members created for the run (signed up and logged in during setup); feed users take their tokens in turn.
    #[arg(long, env = "LOAD_MEMBERS", default_value_t = 50)]
    pub members: u32,
}

#[derive(Debug, Clone, Args)]
pub struct FeedArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub social: SocialArgs,
    #[command(flatten)]
    pub goose: GooseConfiguration,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct ShelfArgs {
    /// Regular products on the shelf for shop runs (few, so that orders contend for the last units).
    #[arg(long, env = "LOAD_SHELF_PRODUCTS", default_value_t = 20)]
    pub shelf_products: u32,
    /// Shelf stock of each of those products at the start.
    #[arg(long, env = "LOAD_SHELF_STOCK", default_value_t = 200)]
    pub shelf_stock: u32,
    /// Members who shop (signed up, logged in and given points during setup).
    #[arg(long, env = "LOAD_SHOP_MEMBERS", default_value_t = 50)]
    pub shop_members: u32,
    /// Points charged to each of them during setup (KRW; a product costs 10,000-59,000).
    #[arg(long, env = "LOAD_SHOP_POINTS", default_value_t = 300_000)]
    pub points: i64,
}

#[derive(Debug, Clone, Args)]
pub struct ShopArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub shelf: ShelfArgs,
    #[command(flatten)]
    pub goose: GooseConfiguration,
}

#[derive(Debug, Clone, Args)]
pub struct MixedArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub funnel: FunnelArgs,
    #[command(flatten)]
    pub catalog: CatalogArgs,
    #[command(flatten)]
    pub social: SocialArgs,
    #[command(flatten)]
    pub shelf: ShelfArgs,
    /// Goose users browsing the shop beside the drop's buyers.
    #[arg(long, env = "LOAD_SHOPPERS", default_value_t = 40)]
    pub shoppers: usize,
    /// Goose users reading and writing the feeds beside the drop's buyers.
    #[arg(long, env = "LOAD_READERS", default_value_t = 40)]
    pub readers: usize,
    /// Goose users buying from the shelf (cart, orders, refunds) beside the drop's buyers.
    #[arg(long, env = "LOAD_SHELF_SHOPPERS", default_value_t = 20)]
    pub shelf_shoppers: usize,
    #[command(flatten)]
    pub goose: GooseConfiguration,
}

/// The `subscribe` scenario's settings.
#[derive(Debug, Clone, Args, Serialize)]
pub struct SubscribeArgs {
    /// The `flashsale` binary whose `renew --at` the run spawns (with `--database-url` as its DATABASE_URL).
    #[arg(long, env = "LOAD_FLASHSALE_BIN")]
    pub flashsale_bin: PathBuf,
    /// Members who subscribe (signed up, logged in and given points during setup); goose users take them in turn.
    #[arg(
        long = "subscribe-members",
        env = "LOAD_SUBSCRIBE_MEMBERS",
        default_value_t = 100
    )]
    pub members: u32,
    /// Points charged to each of them during setup (KRW; a period costs 3,000-9,900), so some run short.
    #[arg(
        long = "subscribe-points",
        env = "LOAD_SUBSCRIBE_POINTS",
        default_value_t = 30_000
    )]
    pub points: i64,
    /// Renewal rounds during the run, `--renew-every-ms` apart; one more runs after goose.
    #[arg(long, env = "LOAD_RENEW_ROUNDS", default_value_t = 4)]
    pub renew_rounds: u32,
    /// `flashsale renew` processes started at once in each round, all with the round's `--at`.
    #[arg(long, env = "LOAD_RENEWERS", default_value_t = 2)]
    pub renewers: u32,
    /// Real time between renewal rounds, in milliseconds.
    #[arg(long, env = "LOAD_RENEW_EVERY_MS", default_value_t = 5_000)]
    pub renew_every_ms: u64,
    /// Days the test clock moves on each round (past a week: every weekly subscription comes due each round).
    #[arg(long, env = "LOAD_RENEW_STEP_DAYS", default_value_t = 8)]
    pub renew_step_days: u32,
    /// Also write the summary (what the run did, the facts and the checks) as JSON here.
    #[arg(long, env = "LOAD_SUMMARY_FILE")]
    pub summary_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct SubscribeRunArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub subscribe: SubscribeArgs,
    #[command(flatten)]
    pub goose: GooseConfiguration,
}

#[derive(Debug, Clone, Args)]
pub struct RateArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Requests offered per second, evenly spaced.
    #[arg(long, env = "LOAD_RATE_RPS", default_value_t = 1000)]
    pub rps: u32,
    /// How long to offer them, in seconds.
    #[arg(long, env = "LOAD_RATE_SECONDS", default_value_t = 10)]
    pub seconds: u32,
    /// HTTP/1.1 connections per instance, each carrying one request at a time.
    #[arg(long, env = "LOAD_RATE_CONNECTIONS", default_value_t = 64)]
    pub connections: usize,
    /// The path to GET (ignored with --reserve).
    #[arg(long, env = "LOAD_RATE_PATH", default_value = "/healthz")]
    pub path: String,
    /// Reserve instead: sets up an open drop (stock 10,000,000) and `--members` members, then POSTs
    /// reservations at the rate, rotating the members' tokens.
    #[arg(long)]
    pub reserve: bool,
    /// Members whose tokens `--reserve` rotates (each can hold up to 1000 units).
    #[arg(long, env = "LOAD_RATE_MEMBERS", default_value_t = 200)]
    pub members: u32,
    /// Timeout of one request, in milliseconds; a request past it counts as an error.
    #[arg(long, env = "LOAD_RATE_TIMEOUT_MS", default_value_t = 10_000)]
    pub timeout_ms: u64,
}

/// The opening burst's settings: the drop, its members, the clients and the targets it is judged against.
#[derive(Debug, Clone, Args, Serialize)]
pub struct BurstArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Connections opened before the opening, each sending one reservation at the opening instant; spread round
    /// robin over the instances.
    #[arg(long, env = "LOAD_BURST_CLIENTS", default_value_t = 16_000)]
    pub clients: u32,
    /// Members signed up through the API (two argon2 hashes each on the server); client `i` reserves as member
    /// `i mod members`, so a member has several tabs open at the opening.
    #[arg(long, env = "LOAD_BURST_MEMBERS", default_value_t = 200)]
    pub members: u32,
    /// Units the drop sells.
    #[arg(long, env = "LOAD_BURST_STOCK", default_value_t = 1_000)]
    pub stock: u32,
    /// Units one member may hold; 0: the stock (at most 1000, the API's cap), so the limit does not refuse and the
    /// answers are grants, `sold_out` and back-pressure.
    #[arg(long, env = "LOAD_BURST_PER_MEMBER_LIMIT", default_value_t = 0)]
    pub per_member_limit: u32,
    /// The drop opens this long after it is created; every connection must be open by then.
    #[arg(long, env = "LOAD_BURST_OPENS_IN_MS", default_value_t = 10_000)]
    pub opens_in_ms: u64,
    /// Connections being opened at once before the opening (the server's accept backlog sees at most this many).
    #[arg(long, env = "LOAD_BURST_CONNECT_CONCURRENCY", default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Target: every client has its answer within this many milliseconds of the opening.
    #[arg(long, env = "LOAD_BURST_WITHIN_MS", default_value_t = 1_000)]
    pub within_ms: u64,
    /// How long one client waits for its answer before counting it as unanswered.
    #[arg(long, env = "LOAD_BURST_TIMEOUT_MS", default_value_t = 30_000)]
    pub timeout_ms: u64,
    /// Process ids of the servers, whose memory (VmRSS, VmHWM from /proc) is reported before the connections,
    /// with them open, and after the answers.
    #[arg(long, env = "LOAD_BURST_SERVER_PID", value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Also writes the report, its checks and the verdict to this file as JSON (`scripts/bench.sh`'s sheet).
    #[arg(long, env = "LOAD_BURST_JSON")]
    pub json: Option<std::path::PathBuf>,
}

/// Most clients one burst opens (each is a file on both sides; the machine's open-files limit is the real bound).
pub const BURST_CLIENTS_MAX: u32 = 100_000;

impl BurstArgs {
    pub fn validate(&self) -> anyhow::Result<()> {
        self.target.validate()?;
        ensure!(
            (1..=BURST_CLIENTS_MAX).contains(&self.clients),
            "--clients must be 1..={BURST_CLIENTS_MAX}"
        );
        ensure!(
            (1..=FIXTURES_MAX).contains(&self.members),
            "--members must be 1..={FIXTURES_MAX}"
        );
        ensure!(
            (1..=10_000_000).contains(&self.stock),
            "--stock must be 1..=10000000"
        );
        ensure!(
            self.per_member_limit <= 1000,
            "--per-member-limit must be 0 (the stock) or 1..=1000"
        );
        ensure!(
            (500..=OPENS_IN_MS_MAX).contains(&self.opens_in_ms),
            "--opens-in-ms must be 500..={OPENS_IN_MS_MAX}"
        );
        ensure!(
            (1..=10_000).contains(&self.connect_concurrency),
            "--connect-concurrency must be 1..=10000"
        );
        ensure!(
            (1..=600_000).contains(&self.within_ms),
            "--within-ms must be 1..=600000"
        );
        ensure!(
            (10..=600_000).contains(&self.timeout_ms),
            "--timeout-ms must be 10..=600000"
        );
        Ok(())
    }

    /// The drop's per-member limit: as given, or the stock up to the API's cap of 1000.
    pub fn member_limit(&self) -> u32 {
        if self.per_member_limit > 0 {
            self.per_member_limit
        } else {
            self.stock.min(1000)
        }
    }
}

/// The chaos rehearsal's settings: the world it starts, the drop it sells, the workload and the faults' knobs.
#[derive(Debug, Clone, Args, Serialize)]
pub struct ChaosArgs {
    /// Instances of `flashsale serve` selling the drop; at least 2, so that a fault never takes them all down.
    #[arg(long, env = "LOAD_CHAOS_INSTANCES", default_value_t = 3)]
    pub instances: usize,
    /// Seconds of load with faults injected; healing, settling and checking come after.
    #[arg(long, env = "LOAD_CHAOS_SECONDS", default_value_t = 60)]
    pub seconds: u64,
    /// Seed of the fault schedule and of every buyer's choices: the same seed gives the same schedule.
    #[arg(long, env = "LOAD_CHAOS_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Units the drop sells. Buyers pace their payments to sell it out near the end of the load window.
    #[arg(long, env = "LOAD_CHAOS_STOCK", default_value_t = 150)]
    pub stock: u32,
    /// Buyer tasks, each looping reserve / pay / cancel / read / abandon until the load window ends.
    #[arg(long, env = "LOAD_CHAOS_BUYERS", default_value_t = 32)]
    pub buyers: u32,
    /// Members the buyers act as, shared out among them; 0 picks enough for 1.5 times the stock at the
    /// per-member limit (at least one per buyer, at most 400: each costs the server two argon2 hashes).
    #[arg(long, env = "LOAD_CHAOS_MEMBERS", default_value_t = 0)]
    pub members: u32,
    /// Units one member may buy.
    #[arg(long, env = "LOAD_CHAOS_PER_MEMBER_LIMIT", default_value_t = 2)]
    pub per_member_limit: u32,
    /// Seconds a hold lasts before the reaper may release it.
    #[arg(long, env = "LOAD_CHAOS_HOLD_SECONDS", default_value_t = 2)]
    pub hold_seconds: u32,
    /// The servers' PAY_LEASE_SECONDS: how long a payment owns its hold. A paused instance stays paused past it.
    #[arg(long, env = "LOAD_CHAOS_PAY_LEASE_SECONDS", default_value_t = 2)]
    pub pay_lease_seconds: u32,
    /// The servers' REAPER_INTERVAL_MS.
    #[arg(long, env = "LOAD_CHAOS_REAPER_INTERVAL_MS", default_value_t = 100)]
    pub reaper_interval_ms: u64,
    /// The servers' PAYMENT_TIMEOUT_MS: the longest payment call they make. Above the slow gateway's latency by
    /// default, so a slow-gateway fault makes payments that outlive their lease (the fence's case), not time-outs.
    #[arg(long, env = "LOAD_CHAOS_PAYMENT_TIMEOUT_MS", default_value_t = 5000)]
    pub payment_timeout_ms: u64,
    /// PAYMENT_LATENCY_MS of an instance during a slow-gateway fault; 0 (the default) is the lease plus 1.5 s.
    #[arg(long, env = "LOAD_CHAOS_SLOW_PAYMENT_LATENCY_MS", default_value_t = 0)]
    pub slow_payment_latency_ms: u64,
    /// How long a buyer waits for one answer before recording the call as indeterminate.
    #[arg(long, env = "LOAD_CHAOS_OP_TIMEOUT_MS", default_value_t = 10_000)]
    pub op_timeout_ms: u64,
    /// The `flashsale` binary to run; default: the one beside this executable (target/debug/flashsale).
    #[arg(long, env = "LOAD_CHAOS_SERVER_BIN")]
    pub server_bin: Option<PathBuf>,
    /// The `redis-server` binary the harness starts, kills and restarts.
    #[arg(long, env = "REDIS_SERVER_BIN", default_value = "redis-server")]
    pub redis_server_bin: PathBuf,
    /// The PostgreSQL server to use (its credentials, host and port; the run creates and drops a database of its
    /// own there, `flashsale_chaos_<pid>_<random>`).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    #[serde(skip)]
    pub database_url: String,
    /// Folder for history.jsonl, schedule.json, summary.txt and the processes' logs; default
    /// reports/chaos-<timestamp>.
    #[arg(long, env = "LOAD_CHAOS_OUT")]
    pub out: Option<PathBuf>,
    /// Keep the database and Redis's folder after the run (to look at them).
    #[arg(long)]
    pub keep: bool,
    /// Most signups/logins in flight during setup.
    #[arg(long, env = "LOAD_SETUP_CONCURRENCY", default_value_t = 4)]
    pub setup_concurrency: usize,
}

/// Most buyers one run signs up: each costs the server two argon2 hashes.
pub const BUYERS_MAX: u32 = 100_000;
/// Most tabs (goose users) per buyer.
pub const ATTEMPTS_PER_BUYER_MAX: u32 = 100;
/// Longest hold the harness will wait out.
pub const HOLD_SECONDS_MAX: u32 = 600;
/// Longest wait before the drop opens.
pub const OPENS_IN_MS_MAX: u64 = 600_000;
/// Most instances one run drives.
pub const INSTANCES_MAX: usize = 64;
/// Most members or products one run creates for browsing and feeds.
pub const FIXTURES_MAX: u32 = 10_000;
/// Most requests one `rate` run offers.
pub const RATE_REQUESTS_MAX: u64 = 20_000_000;

impl TargetArgs {
    /// Refuses non-loopback targets and settings that would make setup unbounded.
    pub fn validate(&self) -> anyhow::Result<()> {
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
        ensure!(
            (1..=1_000).contains(&self.setup_concurrency),
            "--setup-concurrency must be 1..=1000"
        );
        Ok(())
    }

    /// The base URLs without trailing `/`.
    pub fn bases(&self) -> Vec<String> {
        self.base_urls
            .iter()
            .map(|b| b.trim_end_matches('/').to_owned())
            .collect()
    }
}

/// The flat shares of holds that end each way, derived from the funnel rates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Shares {
    pub cancel: f64,
    pub expire: f64,
    pub decline: f64,
}

impl FunnelArgs {
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            (1..=BUYERS_MAX).contains(&self.buyers),
            "--buyers must be 1..={BUYERS_MAX}"
        );
        ensure!(self.stock >= 1, "--stock must be at least 1");
        ensure!(
            (1..=1000).contains(&self.per_member_limit),
            "--per-member-limit must be 1..=1000"
        );
        ensure!(
            (1..=ATTEMPTS_PER_BUYER_MAX).contains(&self.attempts_per_buyer),
            "--attempts-per-buyer must be 1..={ATTEMPTS_PER_BUYER_MAX}"
        );
        ensure!(
            u64::from(self.buyers) * u64::from(self.attempts_per_buyer) <= u64::from(BUYERS_MAX),
            "--buyers x --attempts-per-buyer must be at most {BUYERS_MAX} goose users"
        );
        ensure!(
            (1..=HOLD_SECONDS_MAX).contains(&self.hold_seconds),
            "--hold-seconds must be 1..={HOLD_SECONDS_MAX}"
        );
        ensure!(
            (500..=OPENS_IN_MS_MAX).contains(&self.opens_in_ms),
            "--opens-in-ms must be 500..={OPENS_IN_MS_MAX}"
        );
        for (name, rate) in [
            ("--abandon-rate", self.abandon_rate),
            ("--cancel-share", self.cancel_share),
            ("--decline-rate", self.decline_rate),
        ] {
            ensure!((0.0..=1.0).contains(&rate), "{name} must be 0.0..=1.0");
        }
        ensure!(
            self.reaper_interval_ms <= 60_000,
            "--reaper-interval-ms must be at most 60000"
        );
        ensure!(
            self.restock_slack_seconds <= 600,
            "--restock-slack-seconds must be at most 600"
        );
        Ok(())
    }

    /// Goose users of the funnel: one per tab of every buyer.
    pub fn users(&self) -> usize {
        self.buyers as usize * self.attempts_per_buyer as usize
    }

    /// The funnel rates as flat shares of all holds.
    pub fn shares(&self) -> Shares {
        Shares {
            cancel: self.abandon_rate * self.cancel_share,
            expire: self.abandon_rate * (1.0 - self.cancel_share),
            decline: (1.0 - self.abandon_rate) * self.decline_rate,
        }
    }

    /// How long refused buyers keep trying for stock that comes back.
    pub fn restock_window(&self) -> Duration {
        Duration::from_secs(u64::from(self.hold_seconds) + self.restock_slack_seconds)
    }
}

impl CatalogArgs {
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            (1..=FIXTURES_MAX).contains(&self.products),
            "--products must be 1..={FIXTURES_MAX}"
        );
        Ok(())
    }
}

impl ShelfArgs {
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            (1..=FIXTURES_MAX).contains(&self.shelf_products),
            "--shelf-products must be 1..={FIXTURES_MAX}"
        );
        ensure!(
            (1..=1_000_000).contains(&self.shelf_stock),
            "--shelf-stock must be 1..=1000000"
        );
        ensure!(
            (1..=FIXTURES_MAX).contains(&self.shop_members),
            "--shop-members must be 1..={FIXTURES_MAX}"
        );
        ensure!(
            (0..=1_000_000_000).contains(&self.points),
            "--points must be 0..=1000000000"
        );
        Ok(())
    }
}

impl SocialArgs {
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            (1..=FIXTURES_MAX).contains(&self.members),
            "--members must be 1..={FIXTURES_MAX}"
        );
        Ok(())
    }
}

impl SubscribeArgs {
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            (1..=FIXTURES_MAX).contains(&self.members),
            "--subscribe-members must be 1..={FIXTURES_MAX}"
        );
        ensure!(
            (0..=1_000_000_000).contains(&self.points),
            "--subscribe-points must be 0..=1000000000"
        );
        ensure!(
            (1..=100).contains(&self.renew_rounds),
            "--renew-rounds must be 1..=100"
        );
        ensure!(
            (1..=16).contains(&self.renewers),
            "--renewers must be 1..=16"
        );
        ensure!(
            (100..=600_000).contains(&self.renew_every_ms),
            "--renew-every-ms must be 100..=600000"
        );
        ensure!(
            (1..=366).contains(&self.renew_step_days),
            "--renew-step-days must be 1..=366"
        );
        Ok(())
    }
}

impl RateArgs {
    pub fn validate(&self) -> anyhow::Result<()> {
        self.target.validate()?;
        ensure!(
            (1..=1_000_000).contains(&self.rps),
            "--rps must be 1..=1000000"
        );
        ensure!(
            (1..=3600).contains(&self.seconds),
            "--seconds must be 1..=3600"
        );
        ensure!(
            self.requests() <= RATE_REQUESTS_MAX,
            "--rps x --seconds must be at most {RATE_REQUESTS_MAX} requests"
        );
        ensure!(
            (1..=10_000).contains(&self.connections),
            "--connections must be 1..=10000"
        );
        ensure!(self.path.starts_with('/'), "--path must start with /");
        ensure!(
            (1..=FIXTURES_MAX).contains(&self.members),
            "--members must be 1..={FIXTURES_MAX}"
        );
        ensure!(
            (10..=600_000).contains(&self.timeout_ms),
            "--timeout-ms must be 10..=600000"
        );
        Ok(())
    }

    /// Requests the run offers in all.
    pub fn requests(&self) -> u64 {
        u64::from(self.rps) * u64::from(self.seconds)
    }
}

/// Most instances, buyers and members a chaos run drives: it runs on the machine it tests.
pub const CHAOS_INSTANCES_MAX: usize = 16;
pub const CHAOS_BUYERS_MAX: u32 = 1_000;
pub const CHAOS_MEMBERS_MAX: u32 = 2_000;
/// Members a chaos run picks itself when `--members` is 0, at most.
const CHAOS_MEMBERS_AUTO_MAX: u32 = 400;

impl ChaosArgs {
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            (2..=CHAOS_INSTANCES_MAX).contains(&self.instances),
            "--instances must be 2..={CHAOS_INSTANCES_MAX} (a fault never takes every instance down)"
        );
        ensure!(
            (10..=86_400).contains(&self.seconds),
            "--seconds must be 10..=86400"
        );
        ensure!(
            (1..=1_000_000).contains(&self.stock),
            "--stock must be 1..=1000000"
        );
        ensure!(
            (1..=CHAOS_BUYERS_MAX).contains(&self.buyers),
            "--buyers must be 1..={CHAOS_BUYERS_MAX}"
        );
        ensure!(
            self.members == 0 || (self.buyers..=CHAOS_MEMBERS_MAX).contains(&self.members),
            "--members must be 0 (auto) or --buyers..={CHAOS_MEMBERS_MAX}"
        );
        ensure!(
            (1..=1000).contains(&self.per_member_limit),
            "--per-member-limit must be 1..=1000"
        );
        ensure!(
            (1..=60).contains(&self.hold_seconds),
            "--hold-seconds must be 1..=60"
        );
        ensure!(
            (1..=60).contains(&self.pay_lease_seconds),
            "--pay-lease-seconds must be 1..=60"
        );
        ensure!(
            (10..=10_000).contains(&self.reaper_interval_ms),
            "--reaper-interval-ms must be 10..=10000"
        );
        ensure!(
            (1..=120_000).contains(&self.payment_timeout_ms),
            "--payment-timeout-ms must be 1..=120000"
        );
        ensure!(
            self.slow_payment_latency_ms <= 120_000,
            "--slow-payment-latency-ms must be at most 120000"
        );
        ensure!(
            (100..=120_000).contains(&self.op_timeout_ms),
            "--op-timeout-ms must be 100..=120000"
        );
        ensure!(
            (1..=64).contains(&self.setup_concurrency),
            "--setup-concurrency must be 1..=64"
        );
        Ok(())
    }

    /// Members the run signs up: `--members`, or enough for 1.5 times the stock at the per-member limit.
    pub fn member_count(&self) -> u32 {
        if self.members > 0 {
            return self.members;
        }
        let wanted =
            (u64::from(self.stock) * 3).div_ceil(2 * u64::from(self.per_member_limit.max(1)));
        u32::try_from(wanted)
            .unwrap_or(u32::MAX)
            .clamp(self.buyers, CHAOS_MEMBERS_AUTO_MAX.max(self.buyers))
    }

    /// PAYMENT_LATENCY_MS of a slow instance: as given, or the lease plus 1.5 s.
    pub fn slow_latency_ms(&self) -> u64 {
        if self.slow_payment_latency_ms > 0 {
            self.slow_payment_latency_ms
        } else {
            u64::from(self.pay_lease_seconds) * 1000 + 1500
        }
    }
}

/// The `campaign` scenario's settings: two campaigns that open and close together, the buyers, and their behaviour.
#[derive(Debug, Clone, Args, Serialize)]
pub struct CampaignSettings {
    /// Members who buy (one goose user each): every one reserves a unit of the funded campaign at the opening,
    /// and the first `--unfunded-buyers` also one of the unfunded campaign.
    #[arg(long, env = "LOAD_CAMPAIGN_BUYERS", default_value_t = 200)]
    pub buyers: u32,
    /// Units of the campaign meant to be funded (refused buyers retry while cancelled units come back).
    #[arg(long, env = "LOAD_CAMPAIGN_FUNDED_STOCK", default_value_t = 60)]
    pub funded_stock: u32,
    /// Its goal: at most the units its paying buyers can take (`--buyers` less the cancelling share).
    #[arg(long, env = "LOAD_CAMPAIGN_FUNDED_GOAL", default_value_t = 30)]
    pub funded_goal: u32,
    /// Units of the campaign meant to fail.
    #[arg(long, env = "LOAD_CAMPAIGN_UNFUNDED_STOCK", default_value_t = 60)]
    pub unfunded_stock: u32,
    /// Its goal: above `--unfunded-buyers`, so that one unit per member can never reach it.
    #[arg(long, env = "LOAD_CAMPAIGN_UNFUNDED_GOAL", default_value_t = 50)]
    pub unfunded_goal: u32,
    /// Buyers who also buy into the unfunded campaign, one unit each.
    #[arg(long, env = "LOAD_CAMPAIGN_UNFUNDED_BUYERS", default_value_t = 40)]
    pub unfunded_buyers: u32,
    /// Share of the funded campaign's holders who cancel (their units go back to the buyers still waiting).
    #[arg(long, env = "LOAD_CAMPAIGN_CANCEL_RATE", default_value_t = 0.1)]
    pub cancel_rate: f64,
    /// Share of the unfunded campaign's holders who pay with `tok_declined` (no purchase, nothing to refund).
    #[arg(long, env = "LOAD_CAMPAIGN_DECLINE_RATE", default_value_t = 0.1)]
    pub decline_rate: f64,
    /// Seconds a hold lasts (buyers pay or cancel at once; a hold left at `closes_at` delays the close).
    #[arg(long, env = "LOAD_CAMPAIGN_HOLD_SECONDS", default_value_t = 30)]
    pub hold_seconds: u32,
    /// Both campaigns open this long after they are created, once every buyer is signed in.
    #[arg(long, env = "LOAD_CAMPAIGN_OPENS_IN_MS", default_value_t = 3000)]
    pub opens_in_ms: u64,
    /// Both close this long after they open (`closes_at`); refused buyers of the funded one retry until shortly
    /// before.
    #[arg(long, env = "LOAD_CAMPAIGN_SECONDS", default_value_t = 6)]
    pub campaign_seconds: u64,
    /// After `closes_at`, how long the run waits for the servers to decide both campaigns and finish the refunds.
    #[arg(long, env = "LOAD_CAMPAIGN_CLOSE_WAIT_SECONDS", default_value_t = 60)]
    pub close_wait_seconds: u64,
    /// Also write the summary (campaigns, outcomes, checks) as JSON here.
    #[arg(long, env = "LOAD_SUMMARY_FILE")]
    pub summary_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct CampaignArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub campaign: CampaignSettings,
    #[command(flatten)]
    pub goose: GooseConfiguration,
}

impl CampaignSettings {
    /// Refuses settings that could not give one funded and one unfunded campaign, or an unbounded run.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            (1..=BUYERS_MAX).contains(&self.buyers),
            "--buyers must be 1..={BUYERS_MAX}"
        );
        for (name, rate) in [
            ("--cancel-rate", self.cancel_rate),
            ("--decline-rate", self.decline_rate),
        ] {
            ensure!((0.0..1.0).contains(&rate), "{name} must be 0.0..1.0");
        }
        ensure!(
            (1..=self.funded_stock).contains(&self.funded_goal),
            "--funded-goal must be 1..=--funded-stock"
        );
        ensure!(
            self.funded_goal <= self.paying_buyers(),
            "--funded-goal must be at most the buyers who pay ({} of {} after --cancel-rate), or it may not be reached",
            self.paying_buyers(),
            self.buyers
        );
        ensure!(
            (1..=self.unfunded_stock).contains(&self.unfunded_goal),
            "--unfunded-goal must be 1..=--unfunded-stock"
        );
        ensure!(
            self.unfunded_buyers >= 1
                && self.unfunded_buyers < self.unfunded_goal
                && self.unfunded_buyers <= self.buyers,
            "--unfunded-buyers must be at least 1, below --unfunded-goal and at most --buyers"
        );
        ensure!(
            (1..=HOLD_SECONDS_MAX).contains(&self.hold_seconds),
            "--hold-seconds must be 1..={HOLD_SECONDS_MAX}"
        );
        ensure!(
            (500..=OPENS_IN_MS_MAX).contains(&self.opens_in_ms),
            "--opens-in-ms must be 500..={OPENS_IN_MS_MAX}"
        );
        ensure!(
            (2..=3_600).contains(&self.campaign_seconds),
            "--campaign-seconds must be 2..=3600"
        );
        ensure!(
            (1..=3_600).contains(&self.close_wait_seconds),
            "--close-wait-seconds must be 1..=3600"
        );
        Ok(())
    }

    /// Buyers who pay for a unit of the funded campaign at worst: every buyer less the most the cancel rate
    /// makes cancel (`Campaigns`' picks cancel at most `ceil(n x rate)` of `n` holds).
    pub fn paying_buyers(&self) -> u32 {
        let cancelling = (f64::from(self.buyers) * self.cancel_rate).ceil() as u32;
        self.buyers.saturating_sub(cancelling)
    }
}

/// Goose options a scenario sets itself from its own settings, refused when given by hand.
pub fn refuse_goose_options(goose: &GooseConfiguration, what: &str) -> anyhow::Result<()> {
    for (given, option) in [
        (goose.host.is_some(), "--host (use --base-url)"),
        (goose.users.is_some(), "--users"),
        (goose.iterations.is_some(), "--iterations"),
        (goose.scenarios.is_some(), "--scenarios"),
    ] {
        ensure!(!given, "{what} sets {option} itself");
    }
    Ok(())
}

/// One base URL: `http://` on a loopback host.
fn check_base_url(base: &str) -> anyhow::Result<()> {
    let url = url::Url::parse(base).with_context(|| format!("--base-url {base:?} is not a URL"))?;
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
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> anyhow::Result<DropArgs> {
        let argv = ["flashsale-load", "drop"].iter().chain(args);
        let Command::Drop(args) = Cli::try_parse_from(argv)?.command else {
            unreachable!("parsed the drop subcommand")
        };
        args.target.validate()?;
        args.funnel.validate()?;
        Ok(args)
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn goose_options_sit_beside_ours() {
        let args = parse(&[
            "--buyers",
            "7",
            "--report-file",
            "r.html",
            "--threshold",
            "p99<200ms",
            "--threshold",
            "error-rate<1%",
        ])
        .unwrap();
        assert_eq!(args.funnel.buyers, 7);
        assert_eq!(args.goose.report_file, ["r.html"]);
        assert_eq!(args.goose.threshold, ["p99<200ms", "error-rate<1%"]);
        assert!(refuse_goose_options(&args.goose, "drop").is_ok());
        let users = parse(&["--users", "5"]).unwrap();
        assert!(refuse_goose_options(&users.goose, "drop").is_err());
    }

    #[test]
    fn one_base_url_by_default_or_as_given() {
        // LOAD_BASE_URL in the test environment would change the default; it is not set by the test runner.
        if std::env::var_os("LOAD_BASE_URL").is_none() {
            assert_eq!(
                parse(&[]).unwrap().target.base_urls,
                ["http://127.0.0.1:8080"]
            );
        }
        let args = parse(&["--base-url", "http://127.0.0.1:9000/"]).unwrap();
        assert_eq!(args.target.bases(), ["http://127.0.0.1:9000"]);
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
        assert_eq!(listed.target.base_urls, want);
        assert_eq!(repeated.target.base_urls, want);
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

    fn chaos(args: &[&str]) -> anyhow::Result<ChaosArgs> {
        let argv = ["flashsale-load", "chaos"].iter().chain(args);
        let Command::Chaos(args) = Cli::try_parse_from(argv)?.command else {
            unreachable!("parsed the chaos subcommand")
        };
        args.validate()?;
        Ok(args)
    }

    #[test]
    fn chaos_picks_members_and_a_slow_latency_past_the_lease() {
        let args = chaos(&["--stock", "150", "--buyers", "32"]).unwrap();
        // 1.5 x 150 units at 2 a member.
        assert_eq!(args.member_count(), 113);
        assert_eq!(args.slow_latency_ms(), 3500);
        let few = chaos(&["--stock", "10", "--buyers", "32"]).unwrap();
        assert_eq!(few.member_count(), 32, "at least one member a buyer");
        let many = chaos(&["--stock", "100000"]).unwrap();
        assert_eq!(many.member_count(), 400);
        let given = chaos(&["--members", "50", "--slow-payment-latency-ms", "9000"]).unwrap();
        assert_eq!((given.member_count(), given.slow_latency_ms()), (50, 9000));
        assert!(chaos(&["--instances", "1"]).is_err());
        assert!(chaos(&["--members", "3", "--buyers", "4"]).is_err());
    }

    #[test]
    fn funnel_rates_become_shares_of_all_holds() {
        let args = parse(&[]).unwrap();
        let shares = args.funnel.shares();
        // 20% abandon, half of them cancel; 20% of the other 80% are declined; 64% pay.
        assert!((shares.cancel - 0.1).abs() < 1e-9);
        assert!((shares.expire - 0.1).abs() < 1e-9);
        assert!((shares.decline - 0.16).abs() < 1e-9);
        assert!(parse(&["--abandon-rate", "1.5"]).is_err());
    }
}
