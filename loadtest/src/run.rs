//! One function per subcommand that goose runs: check the settings, build the parts, run goose, and for a drop
//! verify the invariants and build the summary. `main` prints and picks the exit status; tests call these too.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::Method;
use serde_json::json;

use crate::attack::{self, Ended, Parts, Shape};
use crate::browse::Shop;
use crate::burst::{self, BurstReport, DropCounts};
use crate::campaign::{self, CampaignRun, CampaignSummary, Campaigns};
use crate::chaos::{self, ChaosOutcome};
use crate::client::{plain_user, send_retrying, success, Call, RetryPolicy, Targets};
use crate::config::{
    refuse_goose_options, BrowseArgs, BurstArgs, CampaignArgs, ChaosArgs, DrawArgs, DropArgs,
    FeedArgs, FunnelArgs, MixedArgs, QueueArgs, RateArgs, ShopArgs, SubscribeRunArgs, TargetArgs,
};
use crate::drop_funnel::{Funnel, FunnelRun};
use crate::feed::Social;
use crate::launch::{self, Kind, Launch, LaunchSummary};
use crate::rate::{self, RateReport};
use crate::setup::{self, progress};
use crate::shopping::{self, ShopRun, Shoppers};
use crate::subscribe::{self, SubscribeRun, SubscribeSummary, Subscribers};
use crate::summary::{threshold_line, Milestones, Summary};
use crate::verify::{self, Check};

/// A finished drop run: the summary (whose `passed` says whether every check and threshold held) and what the run
/// saw, to verify again.
#[derive(Debug)]
pub struct DropOutcome {
    pub summary: Summary,
    pub run: FunnelRun,
}

/// Browse and feed runs take `-t` when not given.
const RUN_TIME_DEFAULT: &str = "30s";
/// Goose users browsing or reading when `-u` is not given.
const USERS_DEFAULT: usize = 20;

fn targets(target: &TargetArgs) -> anyhow::Result<Arc<Targets>> {
    target.validate()?;
    Ok(Arc::new(Targets::new(target.bases())?))
}

/// `flashsale-load drop`.
pub async fn drop(args: DropArgs) -> anyhow::Result<DropOutcome> {
    refuse_goose_options(&args.goose, "drop")?;
    args.funnel.validate()?;
    let targets = targets(&args.target)?;
    let funnel = Funnel::new(
        args.funnel.clone(),
        args.target.clone(),
        Arc::clone(&targets),
        false,
    );
    let parts = Parts {
        funnel: Some(Arc::clone(&funnel)),
        setup_concurrency: args.target.setup_concurrency,
        ..Parts::default()
    };
    let shape = Shape {
        name: "drop",
        host: targets.base(0).to_owned(),
        one_iteration: true,
        run_time_default: None,
    };
    let ended = attack::run(args.goose, parts, shape).await?;
    finish_drop(
        "drop",
        &funnel,
        &args.funnel,
        &args.target,
        ended,
        Vec::new(),
    )
    .await
}

/// `flashsale-load mixed`: the funnel, shoppers and readers at once, until the funnel is done.
pub async fn mixed(args: MixedArgs) -> anyhow::Result<DropOutcome> {
    refuse_goose_options(&args.goose, "mixed")?;
    anyhow::ensure!(
        args.goose.run_time.is_none(),
        "mixed ends when the drop funnel is done; it takes no --run-time"
    );
    args.funnel.validate()?;
    args.catalog.validate()?;
    args.social.validate()?;
    args.shelf.validate()?;
    let targets = targets(&args.target)?;
    let shoppers = Shoppers::new(args.shelf, args.target.clone(), Arc::clone(&targets));
    let funnel = Funnel::new(
        args.funnel.clone(),
        args.target.clone(),
        Arc::clone(&targets),
        true,
    );
    let parts = Parts {
        funnel: Some(Arc::clone(&funnel)),
        shop: Some((
            Shop::new(args.catalog, args.target.clone(), Arc::clone(&targets)),
            args.shoppers,
        )),
        social: Some((Social::new(args.social, Arc::clone(&targets)), args.readers)),
        shelf: Some((Arc::clone(&shoppers), args.shelf_shoppers)),
        launch: None,
        subscribe: None,
        setup_concurrency: args.target.setup_concurrency,
        ..Parts::default()
    };
    // A cap in case the funnel never reports done (goose started fewer tabs than asked): the opening, every hold
    // and the restock window, and a minute more.
    let cap_seconds = args.funnel.opens_in_ms / 1000
        + args.funnel.restock_window().as_secs()
        + u64::from(args.funnel.hold_seconds)
        + 60;
    let shape = Shape {
        name: "mixed",
        host: targets.base(0).to_owned(),
        one_iteration: false,
        run_time_default: Some(format!("{cap_seconds}s")),
    };
    let ended = attack::run(args.goose, parts, shape).await?;
    let shop_checks = match shoppers.run() {
        Some(run) if args.shelf_shoppers > 0 => {
            reverify_shop(&run, &args.target.database_url).await?
        }
        _ => Vec::new(),
    };
    finish_drop(
        "mixed",
        &funnel,
        &args.funnel,
        &args.target,
        ended,
        shop_checks,
    )
    .await
}

/// `flashsale-load queue`: the waiting room, then its checks.
pub async fn queue(args: QueueArgs) -> anyhow::Result<LaunchOutcome> {
    refuse_goose_options(&args.goose, "queue")?;
    args.launch.validate()?;
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.pre_share),
        "--pre-share is a share, in 0..=1"
    );
    anyhow::ensure!(args.pass_seconds > 0, "--pass-seconds must be above 0");
    let terms = launch::queue::Terms {
        pass_seconds: args.pass_seconds,
        admit_per_second: args.admit_per_second,
        pre_share: args.pre_share,
        late_join_ms: args.late_join_ms,
        poll_ms: args.launch.poll_ms,
    };
    run_launch(Kind::Queue(terms), args.launch, args.target, args.goose).await
}

/// `flashsale-load draw`: the draw, then its checks.
pub async fn draw(args: DrawArgs) -> anyhow::Result<LaunchOutcome> {
    refuse_goose_options(&args.goose, "draw")?;
    args.launch.validate()?;
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.withdraw_rate),
        "--withdraw-rate is a share, in 0..=1"
    );
    anyhow::ensure!(
        args.entry_window_ms >= 1000 && args.closes_after_ms >= 1000,
        "--entry-window-ms and --closes-after-ms must be at least 1000"
    );
    let terms = launch::draw::Terms {
        entry_window_ms: args.entry_window_ms,
        closes_after_ms: args.closes_after_ms,
        withdraw_rate: args.withdraw_rate,
        poll_ms: args.launch.poll_ms,
    };
    run_launch(Kind::Draw(terms), args.launch, args.target, args.goose).await
}

async fn run_launch(
    kind: Kind,
    args: crate::config::LaunchArgs,
    target: TargetArgs,
    goose: goose::config::GooseConfiguration,
) -> anyhow::Result<LaunchOutcome> {
    let targets = targets(&target)?;
    let run = Launch::new(kind, args, target, Arc::clone(&targets));
    let parts = Parts {
        launch: Some(Arc::clone(&run)),
        setup_concurrency: run.target.setup_concurrency,
        ..Parts::default()
    };
    let shape = Shape {
        name: run.name(),
        host: targets.base(0).to_owned(),
        one_iteration: true,
        run_time_default: None,
    };
    let ended = attack::run(goose, parts, shape).await?;
    let (checks, figures) = judge_launch(&run).await?;
    let thresholds_failed: Vec<String> =
        ended.thresholds_failed.iter().map(threshold_line).collect();
    let summary = LaunchSummary {
        scenario: run.name(),
        passed: verify::passed(&checks) && thresholds_failed.is_empty(),
        drop_id: run.fixture.get().map(|f| f.drop_id.clone()),
        args: run.args.clone(),
        figures,
        unexpected: crate::lock(&run.tally).unexpected.clone(),
        checks,
        thresholds_failed,
        report_files: ended.report_files,
    };
    if let Some(path) = &run.args.summary_file {
        summary.write_json(path)?;
    }
    Ok(LaunchOutcome { summary, run })
}

/// A finished fair launch: its summary, and the run, to judge again.
#[derive(Debug)]
pub struct LaunchOutcome {
    pub summary: LaunchSummary,
    pub run: Arc<Launch>,
}

/// Judges a finished fair launch from what it saw, the API and Postgres; again after a fault is planted behind the
/// server's back, the checks must catch it.
#[allow(
    clippy::too_many_lines,
    reason = "each mode's facts, checks and figures, then the shared ones, in report order"
)]
pub async fn judge_launch(
    run: &Launch,
) -> anyhow::Result<(
    Vec<Check>,
    std::collections::BTreeMap<&'static str, serde_json::Value>,
)> {
    let fixture = run.fixture.get().context("the launch was never set up")?;
    let (snapshots, last) = run.finish().await?;
    let instances = run.on_every_instance().await;
    let (client, _connection) =
        verify::connect(&run.target.database_url, launch::DB_TIMEOUT).await?;
    let db = launch::db_facts(&client, &fixture.drop_id).await?;
    let member_ids: Vec<String> = fixture.members.iter().map(|m| m.id.clone()).collect();
    let (holds, server_failures) = {
        let tally = crate::lock(&run.tally);
        (tally.holds.clone(), tally.server_failures)
    };
    let mut figures = std::collections::BTreeMap::new();
    let mut checks = match &run.kind {
        Kind::Queue(_) => {
            let logs = crate::lock(&run.queue_log).clone();
            figures.insert(
                "members joined",
                json!(logs.iter().filter(|l| l.join.is_some()).count()),
            );
            figures.insert(
                "joined the pre-queue",
                json!(logs.iter().filter(|l| l.pre_queue).count()),
            );
            figures.insert(
                "admitted",
                json!(logs.iter().filter(|l| l.admitted_ms.is_some()).count()),
            );
            figures.insert(
                "told sold_out",
                json!(logs.iter().filter(|l| l.sold_out_ms.is_some()).count()),
            );
            if let Some((n, rho, bound)) = launch::queue::pre_queue_correlation(&logs) {
                figures.insert(
                    "pre-queue rank correlation",
                    json!(format!("{rho:+.3} over {n} (bound {bound:.3})")),
                );
            }
            launch::queue::verify(&logs, &snapshots, &db.reservations, &member_ids)
        }
        Kind::Draw(_) => {
            let logs = crate::lock(&run.draw_log).clone();
            let probes = crate::lock(&run.draw_probes).clone();
            let published = launch::draw::read_published(run, &fixture.drop_id).await?;
            let facts = launch::draw::draw_facts(&client, &fixture.drop_id).await?;
            figures.insert("entries", json!(published.entries));
            figures.insert(
                "withdrawn",
                json!(logs.iter().filter(|l| l.withdrawn).count()),
            );
            figures.insert(
                "won",
                json!(facts.entries.iter().filter(|e| e.status == "won").count()),
            );
            figures.insert(
                "lost",
                json!(facts.entries.iter().filter(|e| e.status == "lost").count()),
            );
            figures.insert("seed", json!(published.seed));
            launch::draw::verify(&logs, &probes, &published, &facts, &db.reservations)
        }
    };
    checks.extend(launch::stock_checks(
        i64::from(run.args.stock),
        &snapshots,
        last,
        &instances,
        &db,
        &holds,
        server_failures,
    ));
    figures.insert("holds", json!(holds.len()));
    figures.insert(
        "paid (200)",
        json!(holds.iter().filter(|h| h.purchase.is_some()).count()),
    );
    if let Some(last) = last {
        figures.insert(
            "final available/held/sold",
            json!(format!("{}/{}/{}", last.available, last.held, last.sold)),
        );
    }
    Ok((checks, figures))
}

/// `flashsale-load browse`.
pub async fn browse(mut args: BrowseArgs) -> anyhow::Result<Ended> {
    args.catalog.validate()?;
    let targets = targets(&args.target)?;
    let users = args.goose.users.unwrap_or(USERS_DEFAULT);
    args.goose.users = Some(users);
    let parts = Parts {
        shop: Some((
            Shop::new(args.catalog, args.target.clone(), Arc::clone(&targets)),
            users,
        )),
        setup_concurrency: args.target.setup_concurrency,
        ..Parts::default()
    };
    attack::run(args.goose, parts, time_boxed("browse", &targets)).await
}

/// `flashsale-load feed`.
pub async fn feed(mut args: FeedArgs) -> anyhow::Result<Ended> {
    args.social.validate()?;
    let targets = targets(&args.target)?;
    let users = args.goose.users.unwrap_or(USERS_DEFAULT);
    args.goose.users = Some(users);
    let parts = Parts {
        social: Some((Social::new(args.social, Arc::clone(&targets)), users)),
        setup_concurrency: args.target.setup_concurrency,
        ..Parts::default()
    };
    attack::run(args.goose, parts, time_boxed("feed", &targets)).await
}

/// A finished shop run: goose's end, the shop's checks, and what the run did, to verify again.
#[derive(Debug)]
pub struct ShopOutcome {
    pub ended: Ended,
    pub checks: Vec<Check>,
    pub run: ShopRun,
}

impl ShopOutcome {
    /// Every check and every threshold held.
    pub fn passed(&self) -> bool {
        verify::passed(&self.checks) && self.ended.thresholds_failed.is_empty()
    }
}

/// `flashsale-load shop`: shoppers for `-t`, then the shop's guarantees checked in Postgres.
pub async fn shop(mut args: ShopArgs) -> anyhow::Result<ShopOutcome> {
    args.shelf.validate()?;
    let targets = targets(&args.target)?;
    let users = args.goose.users.unwrap_or(USERS_DEFAULT);
    args.goose.users = Some(users);
    let shoppers = Shoppers::new(args.shelf, args.target.clone(), Arc::clone(&targets));
    let parts = Parts {
        shelf: Some((Arc::clone(&shoppers), users)),
        setup_concurrency: args.target.setup_concurrency,
        ..Parts::default()
    };
    let ended = attack::run(args.goose, parts, time_boxed("shop", &targets)).await?;
    let run = shoppers.run().context("the shop was never set up")?;
    let checks = reverify_shop(&run, &args.target.database_url).await?;
    Ok(ShopOutcome { ended, checks, run })
}

/// Reads Postgres again for a finished shop run and judges it: after a fault is planted behind the server's back,
/// the checks must catch it.
pub async fn reverify_shop(run: &ShopRun, database_url: &str) -> anyhow::Result<Vec<Check>> {
    let facts = shopping::shop_facts(database_url, run).await?;
    Ok(shopping::verify_shop(&facts))
}

/// A finished subscribe run: goose's end and the summary (whose `passed` says whether every check held).
#[derive(Debug)]
pub struct SubscribeOutcome {
    pub ended: Ended,
    pub summary: SubscribeSummary,
}

/// `flashsale-load subscribe`: members for `-t` while renewal rounds run, a final round, then the checks.
pub async fn subscribe(mut args: SubscribeRunArgs) -> anyhow::Result<SubscribeOutcome> {
    args.subscribe.validate()?;
    let targets = targets(&args.target)?;
    let users = args.goose.users.unwrap_or(USERS_DEFAULT);
    args.goose.users = Some(users);
    let subscribers = Subscribers::new(
        args.subscribe.clone(),
        args.target.clone(),
        Arc::clone(&targets),
    );
    let parts = Parts {
        subscribe: Some((Arc::clone(&subscribers), users)),
        setup_concurrency: args.target.setup_concurrency,
        ..Parts::default()
    };
    let ended = attack::run(args.goose, parts, time_boxed("subscribe", &targets)).await?;
    let renewals = subscribers.finish_renewals().await?;
    let run = subscribers
        .run(renewals)
        .context("the subscriptions were never set up")?;
    let checks = reverify_subscribe(&run, &args.target.database_url).await?;
    let summary = SubscribeSummary::new(args.subscribe.clone(), run, checks, &ended);
    if let Some(path) = &args.subscribe.summary_file {
        crate::summary::write_json(&summary, path)?;
    }
    Ok(SubscribeOutcome { ended, summary })
}

/// Reads Postgres again for a finished subscribe run and judges it: after a charge or a ledger row is changed
/// behind the server's back, the checks must catch it.
pub async fn reverify_subscribe(
    run: &SubscribeRun,
    database_url: &str,
) -> anyhow::Result<(subscribe::checks::SubscribeFacts, Vec<Check>)> {
    let facts = subscribe::checks::facts(database_url, run).await?;
    let checks = subscribe::checks::verify(run, &facts);
    Ok((facts, checks))
}

fn time_boxed(name: &'static str, targets: &Targets) -> Shape {
    Shape {
        name,
        host: targets.base(0).to_owned(),
        one_iteration: false,
        run_time_default: Some(RUN_TIME_DEFAULT.to_owned()),
    }
}

/// Verifies a finished funnel and builds its summary.
async fn finish_drop(
    scenario: &'static str,
    funnel: &Funnel,
    args: &FunnelArgs,
    target: &TargetArgs,
    ended: Ended,
    more_checks: Vec<Check>,
) -> anyhow::Result<DropOutcome> {
    let mut run = funnel
        .collect()
        .await?
        .ok_or_else(|| anyhow::anyhow!("the drop was never set up"))?;
    let (observations, instances) = run.observe(&target.database_url).await?;
    let mut checks = verify::verify(&observations);
    checks.extend(more_checks);
    let thresholds_failed: Vec<String> =
        ended.thresholds_failed.iter().map(threshold_line).collect();
    let summary = Summary {
        scenario,
        passed: verify::passed(&checks) && thresholds_failed.is_empty(),
        drop_id: run.drop_id.clone(),
        opens_at: run.opens_at,
        funnel: args.clone(),
        outcomes: run.outcomes.clone(),
        milestones: Milestones::from_timeline(&run.timeline),
        final_state: observations.final_state,
        db: observations.db,
        instances,
        checks,
        thresholds_failed,
        report_files: ended.report_files,
    };
    if let Some(path) = &args.summary_file {
        summary.write_json(path)?;
    }
    Ok(DropOutcome { summary, run })
}

/// Reads the API and Postgres again for a finished run and judges it again: after a fault is planted behind the
/// server's back, the checks must catch it.
pub async fn reverify(run: &mut FunnelRun, database_url: &str) -> anyhow::Result<Vec<Check>> {
    let (observations, _) = run.observe(database_url).await?;
    Ok(verify::verify(&observations))
}

/// `flashsale-load rate`: GETs `--path`, or with `--reserve` sets up an open drop and members and POSTs
/// reservations rotating their tokens; over every instance's connections.
pub async fn rate(args: RateArgs) -> anyhow::Result<RateReport> {
    args.validate()?;
    let targets = targets(&args.target)?;
    let addrs = socket_addrs(&targets)?;
    let make_request: rate::MakeRequest = if args.reserve {
        let (path, tokens) = reserve_fixture(&args, &targets).await?;
        let body = Bytes::from_static(br#"{"quantity":1}"#);
        Arc::new(move |k| {
            let token = &tokens[usize::try_from(k).unwrap_or(0) % tokens.len()];
            http_request(Method::POST, &path, Some(token), body.clone())
        })
    } else {
        let path = args.path.clone();
        Arc::new(move |_| http_request(Method::GET, &path, None, Bytes::new()))
    };
    progress(format!(
        "rate: offering {} req/s for {} s over {} connection(s) to each of {} instance(s)",
        args.rps,
        args.seconds,
        args.connections,
        addrs.len()
    ));
    rate::run(rate::Plan {
        addrs,
        rps: args.rps,
        total: args.requests(),
        connections: args.connections,
        timeout: Duration::from_millis(args.timeout_ms),
        make_request,
    })
    .await
}

/// `host:port` of every instance, for the raw-connection modes.
fn socket_addrs(targets: &Targets) -> anyhow::Result<Vec<String>> {
    targets
        .bases()
        .iter()
        .map(|base| {
            let url = url::Url::parse(base)?;
            let host = url.host_str().context("a base URL without host")?;
            let port = url
                .port_or_known_default()
                .context("a base URL without port")?;
            anyhow::Ok(format!("{host}:{port}"))
        })
        .collect()
}

/// A finished burst: its figures, its checks, and the drop, to read again.
#[derive(Debug)]
pub struct BurstOutcome {
    pub report: BurstReport,
    pub checks: Vec<Check>,
    pub drop_id: String,
    pub within_ms: u64,
}

impl BurstOutcome {
    pub fn passed(&self) -> bool {
        verify::passed(&self.checks)
    }

    /// The report, its checks and the verdict, as `--json` writes them.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "report": self.report,
            "checks": self.checks,
            "within_ms": self.within_ms,
            "passed": self.passed(),
        })
    }

    pub fn render(&self) -> String {
        format!(
            "{}\nburst checks\n{}\nflashsale-load burst: {}\n",
            self.report.render(),
            crate::summary::render_checks(&self.checks),
            if self.passed() { "PASS" } else { "FAIL" }
        )
    }
}

/// `flashsale-load burst`: a drop opening `--opens-in-ms` from its creation, its members signed up first, then
/// `--clients` connections opened before the opening and one reservation each sent at it; judged afterwards.
pub async fn burst(args: BurstArgs) -> anyhow::Result<BurstOutcome> {
    args.validate()?;
    let files = burst::raise_open_files()?;
    anyhow::ensure!(
        u64::from(args.clients) + 64 <= files,
        "--clients {} needs as many open files, and this process may open {files} (raise `ulimit -Hn`)",
        args.clients
    );
    let targets = targets(&args.target)?;
    let addrs = socket_addrs(&targets)?;
    let opens_in = chrono::Duration::milliseconds(i64::try_from(args.opens_in_ms)?);
    let (drop_id, opens_at, tokens) = drop_and_members(
        &args.target,
        &targets,
        args.members,
        json!({
            "stock": args.stock,
            "opens_at": setup::rfc3339(chrono::Utc::now() + opens_in),
            "per_member_limit": args.member_limit(),
        }),
    )
    .await?;
    // The opening on this process's clock; the server compares `opens_at` with the same system clock.
    let opening = tokio::time::Instant::now()
        + (opens_at - chrono::Utc::now())
            .to_std()
            .context("the drop opened before the clients could connect (raise --opens-in-ms)")?;
    progress(format!(
        "burst: opening {} connections over {} instance(s); the drop opens at {}",
        args.clients,
        addrs.len(),
        setup::rfc3339(opens_at)
    ));
    let path = format!("{}/drops/{drop_id}/reservations", setup::API);
    let body = Bytes::from_static(br#"{"quantity":1}"#);
    let mut report = burst::run(burst::Plan {
        addrs,
        clients: args.clients as usize,
        make_request: Arc::new(move |i| {
            http_request(
                Method::POST,
                &path,
                Some(&tokens[i % tokens.len()]),
                body.clone(),
            )
        }),
        opening,
        connect_concurrency: args.connect_concurrency,
        timeout: Duration::from_millis(args.timeout_ms),
        server_pids: args.server_pid.clone(),
    })
    .await?;
    report.drop = drop_counts(&targets, &drop_id).await.ok();
    let checks = burst::checks(&report, args.within_ms);
    Ok(BurstOutcome {
        report,
        checks,
        drop_id,
        within_ms: args.within_ms,
    })
}

/// Reads the burst's drop again and judges it again: after a hold is taken behind the harness's back, the
/// accounting checks must catch it.
pub async fn reverify_burst(outcome: &mut BurstOutcome, base_url: &str) -> anyhow::Result<()> {
    let targets = Targets::new(vec![base_url.trim_end_matches('/').to_owned()])?;
    outcome.report.drop = Some(drop_counts(&targets, &outcome.drop_id).await?);
    outcome.checks = burst::checks(&outcome.report, outcome.within_ms);
    Ok(())
}

/// The drop's counts from `GET /api/v1/drops/{id}` on the first instance.
async fn drop_counts(targets: &Targets, drop_id: &str) -> anyhow::Result<DropCounts> {
    let mut user = plain_user(targets.base(0), Duration::from_secs(30))?;
    let call = Call::get("/drops/{id}", format!("{}/drops/{drop_id}", setup::API));
    let reply = send_retrying(&mut user, targets, &call, RetryPolicy::OVERLOAD, success).await;
    let body = setup::expect(&reply, 200, "reading the drop")?;
    let field = |name: &str| {
        body.get(name)
            .and_then(serde_json::Value::as_u64)
            .with_context(|| format!("the drop without {name}"))
    };
    Ok(DropCounts {
        stock: field("stock")?,
        available: field("available")?,
        held: field("held")?,
        sold: field("sold")?,
    })
}

/// `flashsale-load campaign`: two campaigns bought into at once, then, once the servers have decided them and
/// refunded the unfunded one, the checks; returns the summary, the run is in `campaign_run` for tests that verify
/// again.
pub async fn campaign(args: CampaignArgs) -> anyhow::Result<CampaignSummary> {
    Ok(campaign_run(args).await?.0)
}

/// `campaign`, also handing back what the run saw.
pub async fn campaign_run(args: CampaignArgs) -> anyhow::Result<(CampaignSummary, CampaignRun)> {
    refuse_goose_options(&args.goose, "campaign")?;
    args.campaign.validate()?;
    let targets = targets(&args.target)?;
    let campaigns = Campaigns::new(
        args.campaign.clone(),
        args.target.clone(),
        Arc::clone(&targets),
    );
    let parts = Parts {
        campaigns: Some(Arc::clone(&campaigns)),
        setup_concurrency: args.target.setup_concurrency,
        ..Parts::default()
    };
    let shape = Shape {
        name: "campaign",
        host: targets.base(0).to_owned(),
        one_iteration: true,
        run_time_default: None,
    };
    let ended = attack::run(args.goose, parts, shape).await?;
    let run = campaigns
        .collect()?
        .context("the campaigns were never set up")?;
    let observations = run.observe(&args.target.database_url).await?;
    let checks = campaign::verify(&observations);
    let thresholds_failed: Vec<String> =
        ended.thresholds_failed.iter().map(threshold_line).collect();
    let summary = CampaignSummary {
        scenario: "campaign",
        passed: verify::passed(&checks) && thresholds_failed.is_empty(),
        drop_id: run.drops[0].drop_id.clone(),
        campaigns: run.drops.to_vec(),
        opens_at: run.opens_at,
        closes_at: run.closes_at,
        settings: run.settings.clone(),
        outcomes: run.outcomes.to_vec(),
        unexpected: run.unexpected.clone(),
        observations,
        checks,
        thresholds_failed,
        report_files: ended.report_files,
    };
    if let Some(path) = &args.campaign.summary_file {
        crate::summary::write_json(&summary, path)?;
    }
    Ok((summary, run))
}

/// Reads Postgres and the API again for a finished campaign run and judges it again: after a refund is removed,
/// duplicated or invented behind the servers' back, the checks must catch it.
pub async fn reverify_campaign(
    run: &CampaignRun,
    database_url: &str,
) -> anyhow::Result<Vec<Check>> {
    Ok(campaign::verify(&run.observe(database_url).await?))
}

/// `flashsale-load chaos`: the seeded chaos rehearsal; it starts and ends its own servers (see `chaos`).
pub async fn chaos(args: ChaosArgs) -> anyhow::Result<ChaosOutcome> {
    chaos::run(args).await
}

/// An open drop with room for the whole run, and members' tokens: the reservations path and the tokens.
async fn reserve_fixture(
    args: &RateArgs,
    targets: &Targets,
) -> anyhow::Result<(String, Vec<String>)> {
    let (drop_id, _, tokens) = drop_and_members(
        &args.target,
        targets,
        args.members,
        json!({
            "stock": RESERVE_STOCK,
            "opens_at": setup::rfc3339(chrono::Utc::now() - chrono::Duration::seconds(1)),
            "per_member_limit": RESERVE_LIMIT,
            "hold_seconds": RESERVE_HOLD_SECONDS,
        }),
    )
    .await?;
    Ok((
        format!("{}/drops/{drop_id}/reservations", setup::API),
        tokens,
    ))
}

/// A fresh seller, a preorder product of it, `members` members signed up and logged in, and a drop of the product
/// with `fields` in its body: the drop's id, its `opens_at` as stored, and the members' tokens.
async fn drop_and_members(
    target: &TargetArgs,
    targets: &Targets,
    members: u32,
    fields: serde_json::Value,
) -> anyhow::Result<(String, chrono::DateTime<chrono::Utc>, Vec<String>)> {
    let mut user = plain_user(targets.base(0), Duration::from_secs(30))?;
    let tag = setup::run_tag();
    progress(format!(
        "setup: a drop ({fields}) and {members} members (run tag {tag})"
    ));
    let seller = setup::seller(
        &mut user,
        targets,
        &target.admin_email,
        &target.admin_password,
        &tag,
    )
    .await?;
    let product = setup::preorder_product(&mut user, targets, &seller, &tag).await?;
    let members = setup::members(&user, targets, &tag, members, target.setup_concurrency).await?;
    let mut body = fields;
    body["product_id"] = json!(product);
    let (drop_id, opens_at) = setup::create_drop(&mut user, targets, &seller, body).await?;
    Ok((
        drop_id,
        opens_at,
        members.into_iter().map(|m| m.token).collect(),
    ))
}

/// The `--reserve` drop: as much stock and as high a per-member limit as the API allows, and holds that return
/// soon, so the run measures reservations rather than refusals for as long as it can.
const RESERVE_STOCK: u32 = 10_000_000;
const RESERVE_LIMIT: u32 = 1_000;
const RESERVE_HOLD_SECONDS: u32 = 30;

fn http_request(
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Bytes,
) -> hyper::Request<Full<Bytes>> {
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "flashsale");
    if let Some(token) = token {
        request = request
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json");
    }
    // A builder from a valid method, a path that validate() checked to start with `/` and plain ASCII headers
    // cannot fail; an empty request would only be refused by the server, and counted.
    request
        .body(Full::new(body))
        .unwrap_or_else(|_| hyper::Request::new(Full::new(Bytes::new())))
}
