//! The world a chaos run starts and tears down: a private database on the `DATABASE_URL` server, the proxy the
//! instances reach it through, a private Redis, and the `flashsale serve` instances. `start` builds it, `heal`
//! brings every part back after the faults, `teardown` kills it (the caller drops the database, whatever
//! happened).
//!
//! Which instances may be impaired is decided here, under one lock (`claim_down`): a fault takes an instance
//! down only while another one serves, so no two faults can take the last two down at the same moment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use anyhow::Context;
use hyper::Method;
use rand::Rng;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::history::{Entry, FaultEvent, FaultTag, FaultWhat, Recorder};
use super::http::{Addrs, Client, Request};
use super::procs::{Instance, RedisProc, ServerSpec};
use super::proxy::PgProxy;
use crate::config::ChaosArgs;
use crate::setup::progress;

/// The admin `flashsale admin create` makes for the run; it promotes the run's seller.
pub const ADMIN_EMAIL: &str = "admin@chaos.flashsale.local";
pub const ADMIN_PASSWORD: &str = "chaos-admin-password";
/// Any fixed secret: every instance must accept every other's tokens.
const JWT_SECRET: &str = "chaos-rehearsal-secret-not-a-secret";
/// Longest `flashsale admin create` (migrations, one argon2 hash) may take.
const ADMIN_CREATE_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest the first start of every instance may take (a debug build; several start at once on two cores).
const FIRST_START_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest a restart during or after the faults may take, retries included (Postgres may be cut meanwhile).
pub const RESTART_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a graceful stop (slow-gateway restarts) may take before SIGKILL.
pub const TERMINATE_GRACE: Duration = Duration::from_secs(3);

/// The run's own database on the `DATABASE_URL` server.
#[derive(Debug, Clone)]
pub struct PrivateDb {
    pub name: String,
    /// The server's `postgres` database, to create and drop ours.
    admin_url: String,
    /// Ours, directly (the harness's reads).
    pub direct_url: String,
    /// `host:port` of the server, for the proxy.
    pub target: String,
    /// `DATABASE_URL` parsed, to build the instances' URL through the proxy.
    url: url::Url,
}

impl PrivateDb {
    /// Creates `flashsale_chaos_<pid>_<random>` on the server `database_url` names.
    pub async fn create(database_url: &str) -> anyhow::Result<Self> {
        let url = url::Url::parse(database_url)
            .context("DATABASE_URL must be a postgres:// URL for a chaos run")?;
        let host = url
            .host_str()
            .context("DATABASE_URL has no host")?
            .to_owned();
        let port = url.port().unwrap_or(5432);
        let name = format!(
            "flashsale_chaos_{}_{:08x}",
            std::process::id(),
            rand::thread_rng().gen::<u32>()
        );
        let with_db = |db: &str| {
            let mut u = url.clone();
            u.set_path(&format!("/{db}"));
            u.to_string()
        };
        let db = Self {
            admin_url: with_db("postgres"),
            direct_url: with_db(&name),
            target: format!("{host}:{port}"),
            name,
            url,
        };
        db.execute(&format!("CREATE DATABASE {}", db.name)).await?;
        Ok(db)
    }

    /// Our database through the proxy on `port`: what the instances are given.
    pub fn proxied_url(&self, port: u16) -> anyhow::Result<String> {
        let mut u = self.url.clone();
        u.set_host(Some("127.0.0.1"))
            .context("DATABASE_URL cannot take a host")?;
        u.set_port(Some(port))
            .map_err(|()| anyhow::anyhow!("DATABASE_URL cannot take a port"))?;
        u.set_path(&format!("/{}", self.name));
        Ok(u.to_string())
    }

    /// Drops it, whatever is still connected.
    pub async fn drop_database(&self) -> anyhow::Result<()> {
        self.execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .await
    }

    /// A connection to our database, directly.
    pub async fn connect(&self) -> anyhow::Result<tokio_postgres::Client> {
        connect(&self.direct_url).await
    }

    async fn execute(&self, sql: &str) -> anyhow::Result<()> {
        let client = connect(&self.admin_url).await?;
        client
            .batch_execute(sql)
            .await
            .with_context(|| format!("{sql} (on the DATABASE_URL server)"))
    }
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    .context("connecting to Postgres timed out")?
    .context("connecting to Postgres (DATABASE_URL)")?;
    tokio::spawn(connection);
    Ok(client)
}

/// Everything the run started.
#[derive(Debug)]
pub struct World {
    pub spec: ServerSpec,
    pub db: PrivateDb,
    pub proxy: PgProxy,
    pub redis: Mutex<RedisProc>,
    pub instances: Vec<Mutex<Instance>>,
    pub addrs: Arc<Addrs>,
    /// Which instances serve now (running, not paused, not restarting).
    serving: StdMutex<Vec<bool>>,
}

impl World {
    /// Starts the proxy in front of `db`, Redis (its data in `scratch`), and the instances; what was started is
    /// killed when the future fails or is dropped (every child is `kill_on_drop`).
    pub async fn start(
        args: &ChaosArgs,
        out: &Path,
        db: PrivateDb,
        scratch: PathBuf,
    ) -> anyhow::Result<Self> {
        let proxy = PgProxy::start(db.target.clone()).await?;
        let redis = RedisProc::start(
            args.redis_server_bin.clone(),
            scratch.join("redis"),
            absolute(&out.join("redis.log"))?,
        )
        .await?;
        progress(format!(
            "chaos: redis on port {}, Postgres proxy on port {}",
            redis.port, proxy.port
        ));
        let spec = server_spec(args, out, &db.proxied_url(proxy.port)?, &redis.url())?;
        spec.run(
            &[
                "admin",
                "create",
                "--email",
                ADMIN_EMAIL,
                "--password",
                ADMIN_PASSWORD,
            ],
            ADMIN_CREATE_TIMEOUT,
        )
        .await?;
        let until = Instant::now() + FIRST_START_TIMEOUT;
        let started = futures_util::future::join_all((0..args.instances).map(|i| {
            let spec = &spec;
            async move {
                let mut instance = Instance::new(i);
                instance.start(spec, 0, until).await.map(|_| instance)
            }
        }))
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
        let addrs = Arc::new(Addrs::new(started.iter().map(Instance::addr).collect()));
        progress(format!(
            "chaos: {} instances at {:?}",
            started.len(),
            addrs.all()
        ));
        Ok(Self {
            spec,
            db,
            proxy,
            redis: Mutex::new(redis),
            serving: StdMutex::new(vec![true; started.len()]),
            instances: started.into_iter().map(Mutex::new).collect(),
            addrs,
        })
    }

    /// Marks `instance` as not serving if another one serves; false (and nothing changes) if none does.
    pub fn claim_down(&self, instance: usize) -> bool {
        let mut serving = self.serving.lock().unwrap_or_else(|p| p.into_inner());
        let others = serving
            .iter()
            .enumerate()
            .any(|(i, up)| i != instance && *up);
        if others {
            serving[instance] = false;
        }
        others
    }

    /// Waits (bounded) until `claim_down(instance)` succeeds.
    pub async fn wait_claim_down(&self, instance: usize, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        loop {
            if self.claim_down(instance) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn mark_serving(&self, instance: usize, addr: SocketAddr) {
        self.addrs.set(instance, addr);
        let mut serving = self.serving.lock().unwrap_or_else(|p| p.into_inner());
        serving[instance] = true;
    }

    /// Brings every part back: the proxy accepts, Redis answers, every instance runs unpaused, answers /healthz
    /// and has no payment latency. Each repair is recorded as a fault step (there is none when the faults healed
    /// themselves).
    pub async fn heal(&self, recorder: &Recorder) {
        if !self.proxy.is_up() {
            step(recorder, FaultWhat::RestorePostgres, None, async {
                self.proxy.restore();
                Ok(String::from("at heal"))
            })
            .await;
        }
        let mut redis = self.redis.lock().await;
        if !redis.answers().await {
            step(recorder, FaultWhat::RestartRedis, None, async {
                redis.restart().await.map(|()| String::from("at heal"))
            })
            .await;
        }
        drop(redis);
        for (i, slot) in self.instances.iter().enumerate() {
            let mut instance = slot.lock().await;
            self.heal_instance(recorder, i, &mut instance).await;
        }
    }

    async fn heal_instance(&self, recorder: &Recorder, i: usize, instance: &mut Instance) {
        if instance.stopped {
            step(recorder, FaultWhat::ContInstance, Some(i), async {
                instance.resume().await.map(|()| String::from("at heal"))
            })
            .await;
        }
        let healthy = !instance.exited() && healthz(instance.addr()).await;
        if healthy && instance.latency_ms == 0 {
            self.mark_serving(i, instance.addr());
            return;
        }
        let what = if healthy {
            FaultWhat::SlowGatewayOff
        } else {
            FaultWhat::RestartInstance
        };
        let ok = step(recorder, what, Some(i), async {
            instance.terminate(TERMINATE_GRACE).await;
            instance
                .start(&self.spec, 0, Instant::now() + RESTART_TIMEOUT)
                .await
                .map(|note| format!("at heal: {note}"))
        })
        .await;
        if ok {
            self.mark_serving(i, instance.addr());
        }
    }

    /// Kills every process; the proxy stops when the world is dropped.
    pub async fn teardown(&self) {
        for slot in &self.instances {
            slot.lock().await.kill().await;
        }
        self.redis.lock().await.kill().await;
    }
}

/// Carries out one fault step, timing it and recording it; whether it succeeded.
pub async fn step<F>(
    recorder: &Recorder,
    what: FaultWhat,
    instance: Option<usize>,
    action: F,
) -> bool
where
    F: std::future::Future<Output = anyhow::Result<String>>,
{
    let start_ms = recorder.now_ms();
    let result = action.await;
    let end_ms = recorder.now_ms();
    let (ok, detail) = match result {
        Ok(detail) => (true, detail),
        Err(err) => (false, format!("{err:#}")),
    };
    let target = instance.map(|i| format!(" {i}")).unwrap_or_default();
    progress(format!(
        "chaos: {:>7.3} s {}{target}{} {detail}",
        start_ms as f64 / 1000.0,
        what.name(),
        if ok { "" } else { " FAILED:" }
    ));
    recorder
        .record(Entry::Fault(FaultEvent {
            kind: FaultTag::Fault,
            what,
            instance,
            start_ms,
            end_ms,
            ok,
            detail,
        }))
        .await;
    ok
}

/// `GET /healthz` answers 200 within two seconds.
pub async fn healthz(addr: SocketAddr) -> bool {
    let mut client = Client::new(Arc::new(Addrs::new(vec![addr])), Duration::from_secs(2));
    client
        .send(0, &Request::new(Method::GET, "/healthz".into()))
        .await
        .status()
        == Some(200)
}

/// The instances' shared settings.
fn server_spec(
    args: &ChaosArgs,
    out: &Path,
    database_url: &str,
    redis_url: &str,
) -> anyhow::Result<ServerSpec> {
    let bin = match &args.server_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()
            .context("locating this executable")?
            .with_file_name("flashsale"),
    };
    anyhow::ensure!(
        bin.is_file(),
        "no flashsale binary at {} (build it: cargo build -p shell-api --bin flashsale; or --server-bin)",
        bin.display()
    );
    let prefix = format!(
        "chaos-{}-{:08x}:",
        std::process::id(),
        rand::thread_rng().gen::<u32>()
    );
    let env = [
        ("DATABASE_URL", database_url.to_owned()),
        ("REDIS_URL", redis_url.to_owned()),
        ("REDIS_KEY_PREFIX", prefix),
        ("JWT_SECRET", JWT_SECRET.to_owned()),
        ("RUST_LOG", "warn".to_owned()),
        // The logs go to files.
        ("NO_COLOR", "1".to_owned()),
        ("PAY_LEASE_SECONDS", args.pay_lease_seconds.to_string()),
        ("REAPER_INTERVAL_MS", args.reaper_interval_ms.to_string()),
        ("PAYMENT_TIMEOUT_MS", args.payment_timeout_ms.to_string()),
        // Tokens must outlive the run, or buyers would be refused 401 near its end.
        ("ACCESS_TOKEN_SECONDS", (args.seconds + 3600).to_string()),
        // Three instances and `reconcile` share the server with whatever else runs on it.
        ("DB_POOL_SIZE", "8".to_owned()),
        ("DB_POOL_WAIT_MS", "1000".to_owned()),
        ("SHUTDOWN_GRACE_MS", "1000".to_owned()),
        // A dead instance's journal entries are claimed by a live one sooner than the 5 s default.
        ("JOURNAL_CLAIM_IDLE_MS", "2000".to_owned()),
    ];
    Ok(ServerSpec {
        bin: absolute(&bin)?,
        env: env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        log_dir: absolute(out)?,
    })
}

pub fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_absolute() {
        Ok(path.to_owned())
    } else {
        Ok(std::env::current_dir()?.join(path))
    }
}
