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
use crate::campaign::{self, CampaignRun, CampaignSummary, Campaigns};
use crate::chaos::{self, ChaosOutcome};
use crate::client::{plain_user, Targets};
use crate::config::{
    refuse_goose_options, BrowseArgs, CampaignArgs, ChaosArgs, DropArgs, FeedArgs, FunnelArgs,
    MixedArgs, RateArgs, ShopArgs, TargetArgs,
};
use crate::drop_funnel::{Funnel, FunnelRun};
use crate::feed::Social;
use crate::rate::{self, RateReport};
use crate::setup::{self, progress};
use crate::shopping::{self, ShopRun, Shoppers};
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
    let addrs = targets
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
        .collect::<anyhow::Result<Vec<_>>>()?;
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
        crate::summary::write_json(path, &summary)?;
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
    let mut user = plain_user(targets.base(0), Duration::from_secs(30))?;
    let tag = setup::run_tag();
    progress(format!(
        "rate setup: a drop and {} members (run tag {tag})",
        args.members
    ));
    let seller = setup::seller(
        &mut user,
        targets,
        &args.target.admin_email,
        &args.target.admin_password,
        &tag,
    )
    .await?;
    let product = setup::preorder_product(&mut user, targets, &seller, &tag).await?;
    let members = setup::members(
        &user,
        targets,
        &tag,
        args.members,
        args.target.setup_concurrency,
    )
    .await?;
    let (drop_id, _) = setup::create_drop(
        &mut user,
        targets,
        &seller,
        json!({
            "product_id": product,
            "stock": RESERVE_STOCK,
            "opens_at": setup::rfc3339(chrono::Utc::now() - chrono::Duration::seconds(1)),
            "per_member_limit": RESERVE_LIMIT,
            "hold_seconds": RESERVE_HOLD_SECONDS,
        }),
    )
    .await?;
    Ok((
        format!("{}/drops/{drop_id}/reservations", setup::API),
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
