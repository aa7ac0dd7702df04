//! The processes a chaos run owns: `flashsale serve` instances and one `redis-server`, started, killed (SIGKILL),
//! paused (SIGSTOP), resumed (SIGCONT) and restarted on the same port. Every child is spawned with
//! `kill_on_drop`, so however the run ends (an error, a panic, Ctrl-C) dropping these structs kills them.
//!
//! SIGSTOP/SIGCONT go through the `kill` command: the workspace forbids `unsafe`, and a signal a few times a
//! minute does not justify a new dependency.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// How `flashsale` is run: the binary, the environment every instance shares, and where logs go.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    pub bin: PathBuf,
    /// Everything but BIND_ADDR and PAYMENT_LATENCY_MS, which are per start.
    pub env: Vec<(String, String)>,
    pub log_dir: PathBuf,
}

impl ServerSpec {
    /// A `flashsale` command with exactly this environment (nothing inherited but PATH, so a stray setting of
    /// the caller's cannot change the run).
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.bin);
        command.env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            command.env("PATH", path);
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        command.stdin(Stdio::null()).kill_on_drop(true);
        command
    }

    /// Runs `flashsale <args>` to completion (bounded by `limit`); its stdout, or an error with its stderr.
    pub async fn run(&self, args: &[&str], limit: Duration) -> anyhow::Result<String> {
        let child = self
            .command()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {} {}", self.bin.display(), args.join(" ")))?;
        let output = tokio::time::timeout(limit, child.wait_with_output())
            .await
            .with_context(|| format!("flashsale {} took over {limit:?}", args.join(" ")))??;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            bail!(
                "flashsale {} failed ({}): {}{}",
                args.join(" "),
                output.status,
                stdout,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(stdout)
    }
}

/// Longest one start of an instance may take to print `listening on` (a debug build applies migrations first).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two failed starts (Postgres cut, Redis down, port taken).
const START_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// One `flashsale serve` process.
#[derive(Debug)]
pub struct Instance {
    pub index: usize,
    child: Option<Child>,
    /// The port it listens on; kept across restarts when free.
    pub port: u16,
    /// The PAYMENT_LATENCY_MS it runs with.
    pub latency_ms: u64,
    /// Paused with SIGSTOP.
    pub stopped: bool,
}

impl Instance {
    /// A slot for instance `index`, not running yet.
    pub fn new(index: usize) -> Self {
        Self {
            index,
            child: None,
            port: 0,
            latency_ms: 0,
            stopped: false,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts it (after killing what runs), trying its port (a free one the first time or when the port is
    /// taken), and retrying failed starts until `until`. Returns a note on what happened (the port, retries).
    pub async fn start(
        &mut self,
        spec: &ServerSpec,
        latency_ms: u64,
        until: Instant,
    ) -> anyhow::Result<String> {
        self.kill().await;
        let wanted = self.port;
        let mut tries = 0u32;
        loop {
            tries += 1;
            let port = if self.port != 0 && port_free(self.port) {
                self.port
            } else {
                0
            };
            match self.start_once(spec, port, latency_ms).await {
                Ok(()) => {
                    let moved = if wanted != 0 && self.port != wanted {
                        format!(" (port {wanted} was taken: moved)")
                    } else {
                        String::new()
                    };
                    return Ok(format!(
                        "port {}, latency {latency_ms} ms, {tries} start(s){moved}",
                        self.port
                    ));
                }
                Err(err) if Instant::now() + START_RETRY_PAUSE < until => {
                    crate::setup::progress(format!(
                        "chaos: instance {} did not start ({err:#}); retrying",
                        self.index
                    ));
                    tokio::time::sleep(START_RETRY_PAUSE).await;
                }
                Err(err) => {
                    return Err(err.context(format!(
                        "instance {} did not start in {tries} tries",
                        self.index
                    )))
                }
            }
        }
    }

    async fn start_once(
        &mut self,
        spec: &ServerSpec,
        port: u16,
        latency_ms: u64,
    ) -> anyhow::Result<()> {
        let log = log_file(&spec.log_dir.join(format!("instance-{}.log", self.index)))?;
        let mut child = spec
            .command()
            .arg("serve")
            .env("BIND_ADDR", format!("127.0.0.1:{port}"))
            .env("PAYMENT_LATENCY_MS", latency_ms.to_string())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", spec.bin.display()))?;
        let stdout = child.stdout.take().context("the child's stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let listening = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = line.trim().strip_prefix("listening on http://") {
                    return Ok(Some(addr.to_owned()));
                }
            }
            anyhow::Ok(None)
        })
        .await;
        let addr = match listening {
            Ok(Ok(Some(addr))) => addr,
            Ok(Ok(None)) => bail!(
                "it exited before listening (see instance-{}.log)",
                self.index
            ),
            Ok(Err(err)) => return Err(err.context("reading its stdout")),
            Err(_) => bail!("no `listening on` line within {START_TIMEOUT:?}"),
        };
        let addr: SocketAddr = addr
            .parse()
            .with_context(|| format!("`listening on http://{addr}` is not an address"))?;
        // Keep reading stdout, so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
        self.port = addr.port();
        self.latency_ms = latency_ms;
        self.stopped = false;
        Ok(())
    }

    /// SIGKILL (a paused process dies too), and waits until it is gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
        self.stopped = false;
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub async fn terminate(&mut self, grace: Duration) {
        if let Some(child) = self.child.as_mut() {
            if self.stopped {
                let _ = signal(child, "CONT").await;
            }
            if signal(child, "TERM").await.is_ok()
                && tokio::time::timeout(grace, child.wait()).await.is_ok()
            {
                self.child = None;
            }
        }
        self.kill().await;
    }

    /// SIGSTOP.
    pub async fn pause(&mut self) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("not running")?;
        signal(child, "STOP").await?;
        self.stopped = true;
        Ok(())
    }

    /// SIGCONT.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("not running")?;
        signal(child, "CONT").await?;
        self.stopped = false;
        Ok(())
    }

    /// Whether the process has exited on its own.
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => false,
            Some(_) => {
                self.child = None;
                true
            }
            None => true,
        }
    }
}

/// Sends `SIG<name>` to a child with the `kill` command.
async fn signal(child: &Child, name: &str) -> anyhow::Result<()> {
    let pid = child.id().context("the process has exited")?;
    let status = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .context("running kill")?;
    anyhow::ensure!(status.success(), "kill -{name} {pid} failed: {status}");
    Ok(())
}

/// Whether 127.0.0.1:`port` can be listened on now.
pub fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A free port on 127.0.0.1 (bound, then released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A log file to append to, for a child's stderr.
fn log_file(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Longest Redis may take to answer PING after a start (it replays its AOF first).
const REDIS_START_TIMEOUT: Duration = Duration::from_secs(20);

/// The private `redis-server`: append-only, fsync every second, no RDB snapshots, in a folder of its own, so that
/// a SIGKILL loses at most about a second of writes and a restart on the same port and folder replays the rest.
#[derive(Debug)]
pub struct RedisProc {
    bin: PathBuf,
    pub port: u16,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl RedisProc {
    /// Starts a new server on a free port with its data in `dir` (created), logging to `log`.
    pub async fn start(bin: PathBuf, dir: PathBuf, log: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut redis = Self {
            bin,
            port: free_port()?,
            dir,
            log,
            child: None,
        };
        redis.restart().await?;
        Ok(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts it again on its port and folder, and waits until it answers PING.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await;
        let child = Command::new(&self.bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            .args(["--save", "", "--daemonize", "no"])
            .arg("--logfile")
            .arg(&self.log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "spawning {} (set REDIS_SERVER_BIN or --redis-server-bin)",
                    self.bin.display()
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        while Instant::now() < deadline {
            if ping(self.port).await {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                bail!(
                    "redis-server exited at start ({status}); see {}",
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("redis-server did not answer PING within {REDIS_START_TIMEOUT:?}")
    }

    /// SIGKILL, and waits until it is gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Whether it answers PING now.
    pub async fn answers(&self) -> bool {
        self.child.is_some() && ping(self.port).await
    }
}

/// `+PONG` to an inline PING (not `-LOADING` while the AOF replays), within half a second.
async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).await.ok()?;
        Some(buf[..n].starts_with(b"+PONG"))
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), attempt).await,
        Ok(Some(true))
    )
}
