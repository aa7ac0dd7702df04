//! Runs the goose scenarios of one subcommand: sets goose's options that follow from ours (host, users, start
//! rate, iterations, a default HTML report), sets everything up in `test_start`, executes, and says how the run
//! ended. Goose prints its tables and writes its reports (`--report-file`) and judges `--threshold` itself.

use std::sync::{Arc, Mutex};

use anyhow::Context;
use goose::config::GooseConfiguration;
use goose::prelude::{GooseAttack, GooseError, GooseMetrics, Transaction, TransactionFunction};
use goose::threshold::ThresholdResult;

use crate::browse::Shop;
use crate::campaign::Campaigns;
use crate::drop_funnel::Funnel;
use crate::feed::Social;
use crate::launch::Launch;
use crate::setup::progress;
use crate::shopping::Shoppers;
use crate::subscribe::Subscribers;

/// The scenarios of a run, each with its goose users (the funnel counts its own: one per tab).
#[derive(Debug, Default, Clone)]
pub struct Parts {
    pub funnel: Option<Arc<Funnel>>,
    pub shop: Option<(Arc<Shop>, usize)>,
    pub social: Option<(Arc<Social>, usize)>,
    pub shelf: Option<(Arc<Shoppers>, usize)>,
    /// A fair launch (`queue`, `draw`): one user per member.
    pub launch: Option<Arc<Launch>>,
    pub subscribe: Option<(Arc<Subscribers>, usize)>,
    /// The `campaign` scenario: one goose user per buyer.
    pub campaigns: Option<Arc<Campaigns>>,
    pub setup_concurrency: usize,
}

impl Parts {
    fn users(&self) -> usize {
        self.funnel.as_ref().map_or(0, |f| f.users())
            + self.shop.as_ref().map_or(0, |(_, n)| *n)
            + self.social.as_ref().map_or(0, |(_, n)| *n)
            + self.shelf.as_ref().map_or(0, |(_, n)| *n)
            + self.launch.as_ref().map_or(0, |l| l.users())
            + self.subscribe.as_ref().map_or(0, |(_, n)| *n)
            + self.campaigns.as_ref().map_or(0, |c| c.users())
    }

    /// Everything the scenarios need, catalog and members first: the drop opens a fixed time after its setup.
    async fn setup(&self, user: &mut goose::prelude::GooseUser) -> anyhow::Result<()> {
        if let Some((shop, _)) = &self.shop {
            shop.setup(user).await?;
        }
        if let Some((social, _)) = &self.social {
            social.setup(user, self.setup_concurrency).await?;
        }
        if let Some((shelf, _)) = &self.shelf {
            shelf.setup(user, self.setup_concurrency).await?;
        }
        if let Some((subscribers, _)) = &self.subscribe {
            subscribers.setup(user, self.setup_concurrency).await?;
        }
        if let Some(funnel) = &self.funnel {
            funnel.setup(user).await?;
        }
        if let Some(launch) = &self.launch {
            launch.setup(user).await?;
        }
        if let Some(campaigns) = &self.campaigns {
            campaigns.setup(user).await?;
        }
        Ok(())
    }
}

/// How a goose run ended.
#[derive(Debug)]
pub struct Ended {
    pub metrics: GooseMetrics,
    /// The `--threshold` rules that failed (goose lists them in its tables and reports too).
    pub thresholds_failed: Vec<ThresholdResult>,
    /// The reports goose wrote.
    pub report_files: Vec<String>,
}

/// Options of goose that a subcommand sets from its own, unless given.
#[derive(Debug, Clone)]
pub struct Shape {
    /// A name for the default report file, `reports/<name>-<time>.html`.
    pub name: &'static str,
    /// The users' host when they send paths (ours send full URLs to the instance of each call).
    pub host: String,
    /// Every user runs its scenario once (the funnel), rather than until `-t` or the killswitch.
    pub one_iteration: bool,
    /// `-t` when not given.
    pub run_time_default: Option<String>,
}

/// Runs the scenarios and waits for the end. Setup errors stop the run and are returned as errors.
#[allow(
    clippy::too_many_lines,
    reason = "goose's run from configuration to report, in the order goose requires"
)]
pub async fn run(
    mut config: GooseConfiguration,
    parts: Parts,
    shape: Shape,
) -> anyhow::Result<Ended> {
    let users = match config.users {
        // Browse and feed alone take `-u`; a funnel's, a launch's and the campaigns' users follow from their buyers
        // (and tabs).
        Some(users)
            if parts.funnel.is_none() && parts.launch.is_none() && parts.campaigns.is_none() =>
        {
            users
        }
        _ => parts.users(),
    };
    anyhow::ensure!(users > 0, "no goose users to run");
    config.host = Some(shape.host.clone());
    config.users = Some(users);
    // All users start within about a second: the funnel's tabs must all wait for the opening when it comes.
    if config.increase_rate.is_none() && config.increase_time.is_none() {
        config.increase_rate = Some(users.to_string());
    }
    if shape.one_iteration {
        config.iterations = Some(1);
    } else if config.run_time.is_none() {
        config.run_time = shape.run_time_default.clone();
    }
    // Two runs on one machine would fight over the telnet controller's port; nothing here uses it.
    config.no_telnet = true;
    if config.report_file.is_empty() {
        std::fs::create_dir_all("reports").context("creating reports/")?;
        config.report_file = vec![format!(
            "reports/{}-{}.html",
            shape.name,
            chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
        )];
    }
    let report_files = config.report_file.clone();

    let setup_error: Arc<Mutex<Option<anyhow::Error>>> = Arc::new(Mutex::new(None));
    let start = {
        let parts = parts.clone();
        let setup_error = Arc::clone(&setup_error);
        let function: TransactionFunction = Arc::new(move |user| {
            let parts = parts.clone();
            let setup_error = Arc::clone(&setup_error);
            Box::pin(async move {
                if let Err(err) = parts.setup(user).await {
                    progress(format!("setup failed: {err:#}"));
                    *setup_error
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(err);
                    goose::trigger_killswitch("setup failed");
                }
                Ok(())
            })
        });
        Transaction::new(function).set_name("setup")
    };

    let mut attack = GooseAttack::initialize_with_config(config)
        .map_err(goose_error)?
        .test_start(start);
    if let Some(funnel) = &parts.funnel {
        attack = attack.register_scenario(
            funnel
                .scenario()
                .set_weight(funnel.users())
                .map_err(goose_error)?,
        );
    }
    if let Some((shop, n)) = &parts.shop {
        if *n > 0 {
            attack = attack.register_scenario(
                shop.scenario()
                    .and_then(|s| s.set_weight(*n))
                    .map_err(goose_error)?,
            );
        }
    }
    if let Some((social, n)) = &parts.social {
        if *n > 0 {
            attack = attack.register_scenario(
                social
                    .scenario()
                    .and_then(|s| s.set_weight(*n))
                    .map_err(goose_error)?,
            );
        }
    }
    if let Some((shelf, n)) = &parts.shelf {
        if *n > 0 {
            attack = attack.register_scenario(
                shelf
                    .scenario()
                    .and_then(|s| s.set_weight(*n))
                    .map_err(goose_error)?,
            );
        }
    }
    if let Some(launch) = &parts.launch {
        attack = attack.register_scenario(
            launch
                .scenario()
                .set_weight(launch.users())
                .map_err(goose_error)?,
        );
    }
    if let Some((subscribers, n)) = &parts.subscribe {
        attack = attack.register_scenario(
            subscribers
                .scenario()
                .and_then(|s| s.set_weight(*n))
                .map_err(goose_error)?,
        );
    }
    if let Some(campaigns) = &parts.campaigns {
        attack = attack.register_scenario(
            campaigns
                .scenario()
                .set_weight(campaigns.users())
                .map_err(goose_error)?,
        );
    }
    progress(format!(
        "goose: {users} users; reports {}",
        report_files.join(", ")
    ));
    let result = attack.execute().await;
    if let Some(err) = setup_error
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
    {
        return Err(err.context("setting the run up"));
    }
    // Goose has written its reports when it ran to the end, whatever the thresholds said: the HTML ones are made to
    // draw offline.
    if matches!(result, Ok(_) | Err(GooseError::ThresholdsFailed { .. })) {
        crate::report::make_offline(&report_files)?;
    }
    match result {
        Ok(metrics) => Ok(Ended {
            metrics,
            thresholds_failed: Vec::new(),
            report_files,
        }),
        Err(GooseError::ThresholdsFailed { failed, metrics }) => Ok(Ended {
            metrics: *metrics.0,
            thresholds_failed: failed,
            report_files,
        }),
        Err(err) => Err(goose_error(err)),
    }
}

/// Goose's errors carry their detail in `Debug`.
fn goose_error(err: GooseError) -> anyhow::Error {
    anyhow::anyhow!("goose: {err:?}")
}
