//! `flashsale-load chaos`: a seeded chaos rehearsal with a history checker (issue #21).
//!
//! The run starts its own world (`world`: a private database on the `DATABASE_URL` server reached through a
//! proxy it can cut, a private `redis-server` it can kill and restart, `--instances` `flashsale serve`
//! processes), sets a drop up (`fixture`), and for `--seconds` lets buyers (`workload`) reserve, pay, cancel,
//! read and abandon while the faults of a schedule derived from `--seed` (`schedule`) are carried out
//! (`faults`). Every call and every fault step goes to `<out>/history.jsonl` (`history`). Then it heals
//! everything, waits for the holds to drain, runs `flashsale reconcile`, reads the drop from every instance and
//! from Postgres (`settle`), and judges the history (`checker`, a pure function), writing `<out>/summary.txt`
//! (`report`).
//!
//! Bounded on every path: each step has its own limit, the whole run a hard deadline, and Ctrl-C or SIGTERM
//! end it early; whatever ends it, every child process is killed (`kill_on_drop`, and `World::teardown`) and the
//! database is dropped (unless `--keep`).

pub mod checker;
pub mod faults;
pub mod fixture;
pub mod history;
pub mod http;
pub mod procs;
pub mod proxy;
pub mod report;
pub mod schedule;
pub mod settle;
pub mod workload;
pub mod world;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use anyhow::{anyhow, Context};
use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use self::checker::Violation;
use self::fixture::Sale;
use self::history::{Entry, Recorder, RunInfo, RunTag};
use self::schedule::{PlannedFault, ScheduleParams};
use self::workload::{Buyer, Shared};
use self::world::{PrivateDb, World, RESTART_TIMEOUT};
use crate::config::ChaosArgs;
use crate::setup::{progress, rfc3339};

/// What a finished run found.
#[derive(Debug)]
pub struct ChaosOutcome {
    pub violations: Vec<Violation>,
    /// The summary, as printed and written to `<out>/summary.txt`.
    pub summary: String,
    pub out: PathBuf,
}

impl ChaosOutcome {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Time for everything but the load window and the settling after it: the database, Redis, the instances'
/// first start (a debug build), the admin and the members' signups.
const SETUP_MARGIN: Duration = Duration::from_secs(120);
/// Time after the load window for the faults to heal, the holds to drain, reconcile and the final reads, on top
/// of one call's timeout.
const SETTLE_MARGIN: Duration = Duration::from_secs(120);
/// On top of `hold_seconds + pay_lease_seconds`, how long holds may take to drain after the heal.
const DRAIN_MARGIN: Duration = Duration::from_secs(20);

/// Runs the rehearsal (see the module's doc).
pub async fn run(args: ChaosArgs) -> anyhow::Result<ChaosOutcome> {
    args.validate()?;
    let started = Instant::now();
    let out = args.out.clone().unwrap_or_else(default_out);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let schedule = plan_schedule(&args, &out)?;
    let db = PrivateDb::create(&args.database_url).await?;
    progress(format!("chaos: database {} created", db.name));
    let scratch = std::env::temp_dir().join(format!(
        "flashsale-chaos-{}-{:08x}",
        std::process::id(),
        rand::thread_rng().gen::<u32>()
    ));
    let cleanup = Cleanup {
        db: Some(db.clone()),
        scratch: scratch.clone(),
        keep: args.keep,
    };
    let slot: Arc<StdMutex<Option<Arc<World>>>> = Arc::default();
    let rehearsal = Rehearsal {
        args: args.clone(),
        db: db.clone(),
        scratch: scratch.clone(),
        out,
        schedule,
        started,
    };
    let mut task = tokio::spawn(rehearse(rehearsal, Arc::clone(&slot)));
    let limit = Duration::from_secs(args.seconds)
        + SETUP_MARGIN
        + SETTLE_MARGIN
        + Duration::from_millis(args.op_timeout_ms);
    let outcome = tokio::select! {
        joined = &mut task => joined.unwrap_or_else(|err| Err(match err.try_into_panic() {
            Ok(panic) => anyhow!("the rehearsal panicked: {}", panic_text(&panic)),
            Err(err) => anyhow!("the rehearsal was cancelled: {err}"),
        })),
        why = interrupted() => Err(anyhow!("interrupted by {why}")),
        () = tokio::time::sleep(limit) => Err(anyhow!("the run passed its hard deadline of {limit:?}")),
    };
    // Whatever ended the run: its tasks (buyers, faults) end with it, then every process is killed.
    if !task.is_finished() {
        task.abort();
        let _ = task.await;
    }
    let world = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(world) = world {
        world.teardown().await;
    }
    cleanup.release().await;
    outcome
}

/// Drops the database and Redis's folder when the run ends (unless `--keep`): `release` on every path that
/// returns, and `Drop` on one that unwinds (a panic), from a thread of its own since a destructor cannot await.
struct Cleanup {
    db: Option<PrivateDb>,
    scratch: PathBuf,
    keep: bool,
}

impl Cleanup {
    async fn release(mut self) {
        if let Some(db) = self.db.take() {
            clean_up(self.keep, &db, &self.scratch).await;
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Some(db) = self.db.take() else {
            return;
        };
        let (keep, scratch) = (self.keep, self.scratch.clone());
        let _ = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(clean_up(keep, &db, &scratch));
            }
        })
        .join();
    }
}

/// Drops the database and Redis's folder, unless `keep`.
async fn clean_up(keep: bool, db: &PrivateDb, scratch: &Path) {
    if keep {
        progress(format!(
            "chaos: kept database {} and Redis's folder {}",
            db.name,
            scratch.display()
        ));
        return;
    }
    let _ = std::fs::remove_dir_all(scratch);
    match db.drop_database().await {
        Ok(()) => progress(format!("chaos: database {} dropped", db.name)),
        Err(err) => progress(format!("chaos: could not drop {}: {err:#}", db.name)),
    }
}

/// Derives the schedule, prints it and writes `<out>/schedule.json`.
fn plan_schedule(args: &ChaosArgs, out: &Path) -> anyhow::Result<Vec<PlannedFault>> {
    let params = ScheduleParams {
        seed: args.seed,
        seconds: args.seconds,
        instances: args.instances,
        pay_lease_seconds: u64::from(args.pay_lease_seconds),
    };
    let faults = schedule::plan(&params);
    println!(
        "fault schedule (seed {}, {} faults):\n{}",
        args.seed,
        faults.len(),
        schedule::render(&faults)
    );
    let path = out.join("schedule.json");
    let json = serde_json::json!({ "params": params, "faults": faults });
    std::fs::write(&path, serde_json::to_vec_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(faults)
}

/// What the rehearsal task is given.
struct Rehearsal {
    args: ChaosArgs,
    db: PrivateDb,
    scratch: PathBuf,
    out: PathBuf,
    schedule: Vec<PlannedFault>,
    started: Instant,
}

/// The run itself, in a task of its own so that a panic or an interruption still reaches the teardown.
async fn rehearse(
    r: Rehearsal,
    slot: Arc<StdMutex<Option<Arc<World>>>>,
) -> anyhow::Result<ChaosOutcome> {
    let world = Arc::new(World::start(&r.args, &r.out, r.db.clone(), r.scratch.clone()).await?);
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&world));
    let sale = fixture::set_up(&world, &r.args).await?;
    let drop_id = sale.drop_id.clone();
    let members = sale.members.len();
    let history_path = r.out.join("history.jsonl");
    let (recorder, writer) = Recorder::create(&history_path)?;
    let recorder = Arc::new(recorder);
    recorder
        .record(Entry::Run(RunInfo {
            kind: RunTag::Run,
            seed: r.args.seed,
            started_at: rfc3339(chrono::Utc::now()),
            drop_id: drop_id.clone(),
            stock: i64::from(r.args.stock),
            per_member_limit: i64::from(r.args.per_member_limit),
            hold_seconds: u64::from(r.args.hold_seconds),
            pay_lease_seconds: u64::from(r.args.pay_lease_seconds),
            instances: r.args.instances,
            seconds: r.args.seconds,
        }))
        .await;
    load(&world, &recorder, &r, sale).await;
    world.heal(&recorder).await;
    let drained = settle_down(&world, &r.args, &drop_id).await;
    settle::final_reads(&world, &recorder, &drop_id).await;
    recorder.close().await;
    let lines = writer.finish().await?;
    progress(format!(
        "chaos: {lines} history lines in {}",
        history_path.display()
    ));
    let text = std::fs::read_to_string(&history_path)
        .with_context(|| format!("reading {}", history_path.display()))?;
    let history = history::parse(&text)?;
    let db = settle::snapshot(&world, &drop_id).await?;
    let finals = checker::final_reads(&history, r.args.instances);
    let violations = checker::check(&history, &db, &finals);
    let summary = report::render(&report::Summary {
        args: &r.args,
        drop_id: &drop_id,
        members,
        schedule: &r.schedule,
        history: &history,
        db: &db,
        finals: &finals,
        reconcile: &drained.2,
        drained: (drained.0, drained.1),
        violations: &violations,
        elapsed: r.started.elapsed(),
        out: &r.out,
    });
    write_results(&r.out, &summary, &db, &violations)?;
    Ok(ChaosOutcome {
        violations,
        summary,
        out: r.out,
    })
}

/// The load window: buyers and faults until it ends, then `stop`, and both are waited for (bounded).
async fn load(world: &Arc<World>, recorder: &Arc<Recorder>, r: &Rehearsal, sale: Sale) {
    let load_ms = r.args.seconds * 1000;
    let op_timeout = Duration::from_millis(r.args.op_timeout_ms);
    let shared = Arc::new(Shared {
        recorder: Arc::clone(recorder),
        addrs: Arc::clone(&world.addrs),
        drop_id: sale.drop_id,
        stock: i64::from(r.args.stock),
        per_member_limit: r.args.per_member_limit,
        hold_seconds: r.args.hold_seconds,
        load_ms,
        op_timeout,
        seed: r.args.seed,
        paid_units: AtomicI64::new(0),
    });
    let (stop, stopped) = watch::channel(false);
    let mut faults = JoinSet::new();
    for fault in &r.schedule {
        faults.spawn(faults::inject(
            Arc::clone(world),
            Arc::clone(recorder),
            *fault,
            r.args.slow_latency_ms(),
            stopped.clone(),
        ));
    }
    let mut buyers = JoinSet::new();
    for (i, members) in workload::deal(sale.members, r.args.buyers)
        .into_iter()
        .enumerate()
    {
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        buyers.spawn(Buyer::new(Arc::clone(&shared), index, members).run());
    }
    progress(format!(
        "chaos: {} buyers and {} faults for {} s",
        buyers.len(),
        faults.len(),
        r.args.seconds
    ));
    tokio::time::sleep_until(recorder.at(load_ms)).await;
    let _ = stop.send(true);
    progress("chaos: load window over; faults heal, buyers finish their last call");
    join_bounded(&mut buyers, op_timeout + Duration::from_secs(5), "buyers").await;
    join_bounded(&mut faults, RESTART_TIMEOUT * 2, "faults").await;
}

/// Waits for every task of `set`, at most `limit`; aborts the rest.
async fn join_bounded(set: &mut JoinSet<()>, limit: Duration, what: &str) {
    let all = async {
        while let Some(joined) = set.join_next().await {
            if let Err(err) = joined {
                progress(format!("chaos: one of the {what} failed: {err}"));
            }
        }
    };
    if tokio::time::timeout(limit, all).await.is_err() {
        progress(format!(
            "chaos: {} of the {what} still running after {limit:?}; aborted",
            set.len()
        ));
        set.shutdown().await;
    }
}

/// Holds drain, reconcile, holds drain again: whether they drained each time, and what reconcile said.
async fn settle_down(world: &World, args: &ChaosArgs, drop_id: &str) -> (bool, bool, String) {
    let lease =
        Duration::from_secs(u64::from(args.hold_seconds) + u64::from(args.pay_lease_seconds));
    let reaper = Duration::from_millis(args.reaper_interval_ms);
    progress("chaos: waiting for every hold to expire and be reaped");
    let before = settle::drain(world, drop_id, lease + reaper + DRAIN_MARGIN).await;
    let reconciled = settle::reconcile(world, drop_id).await;
    progress(format!("chaos: reconcile: {reconciled}"));
    let after = settle::drain(world, drop_id, lease + reaper + DRAIN_MARGIN / 2).await;
    (before, after, reconciled)
}

/// `summary.txt`, `violations.json` and `postgres.json` (the rows the checker read) beside the history.
fn write_results(
    out: &Path,
    summary: &str,
    db: &checker::DbSnapshot,
    violations: &[Violation],
) -> anyhow::Result<()> {
    let path = out.join("summary.txt");
    std::fs::write(&path, summary).with_context(|| format!("writing {}", path.display()))?;
    let path = out.join("postgres.json");
    std::fs::write(&path, serde_json::to_vec_pretty(db)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let path = out.join("violations.json");
    std::fs::write(&path, serde_json::to_vec_pretty(violations)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// `reports/chaos-<timestamp>`.
fn default_out() -> PathBuf {
    PathBuf::from("reports").join(format!(
        "chaos-{}",
        chrono::Local::now().format("%Y%m%d-%H%M%S")
    ))
}

/// Ctrl-C or SIGTERM, whichever comes first; its name.
async fn interrupted() -> &'static str {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "Ctrl-C",
        () = terminate => "SIGTERM",
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}
