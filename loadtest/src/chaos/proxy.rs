//! A TCP proxy in front of Postgres, in the harness's own runtime, so the run can cut Postgres off from every
//! instance at once (close every proxied connection, refuse new ones) and give it back, without touching the
//! server itself (which other work on the machine may share).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Connections carried at once, at most; more are refused (the instances' pools are far smaller).
const CONNECTIONS_MAX: usize = 512;

#[derive(Debug)]
pub struct PgProxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    /// Bumped on every cut; each connection ends when it changes.
    cuts: watch::Sender<u64>,
    /// Connections accepted in all, for the summary.
    accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl PgProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `target` (`host:port`).
    pub async fn start(target: String) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the Postgres proxy")?;
        let port = listener.local_addr()?.port();
        let up = Arc::new(AtomicBool::new(true));
        let accepted = Arc::new(AtomicU64::new(0));
        let (cuts, _) = watch::channel(0u64);
        let task = tokio::spawn(accept_loop(
            listener,
            target,
            Arc::clone(&up),
            cuts.clone(),
            Arc::clone(&accepted),
        ));
        Ok(Self {
            port,
            up,
            cuts,
            accepted,
            task,
        })
    }

    /// Closes every proxied connection and refuses new ones until `restore`.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for PgProxy {
    /// Stops accepting; the connections' tasks live in the accept task's set and end with it.
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: String,
    up: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
) {
    let mut connections = JoinSet::new();
    while let Ok((inbound, _)) = listener.accept().await {
        while connections.try_join_next().is_some() {}
        // Cut, or full: dropping the socket closes it, which a client sees as a refused connection.
        if !up.load(Ordering::SeqCst) || connections.len() >= CONNECTIONS_MAX {
            continue;
        }
        accepted.fetch_add(1, Ordering::Relaxed);
        connections.spawn(carry(inbound, target.clone(), cuts.subscribe()));
    }
}

/// Copies both ways until either side closes or the proxy is cut.
async fn carry(mut inbound: TcpStream, target: String, mut cut: watch::Receiver<u64>) {
    let Ok(mut outbound) = TcpStream::connect(&target).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
        _ = cut.changed() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An echo server; its address.
    async fn echo() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream) -> bool {
        let attempt = async {
            stream.write_all(b"hi").await.ok()?;
            let mut buf = [0u8; 2];
            stream.read_exact(&mut buf).await.ok()?;
            Some(&buf == b"hi")
        };
        matches!(
            tokio::time::timeout(std::time::Duration::from_secs(2), attempt).await,
            Ok(Some(true))
        )
    }

    #[tokio::test]
    async fn a_cut_closes_connections_and_refuses_new_ones_until_restored() {
        let proxy = PgProxy::start(echo().await).await.unwrap();
        let addr = ("127.0.0.1", proxy.port);
        let mut before = TcpStream::connect(addr).await.unwrap();
        assert!(round_trip(&mut before).await);
        proxy.cut();
        assert!(!round_trip(&mut before).await);
        let mut during = TcpStream::connect(addr).await.unwrap();
        assert!(!round_trip(&mut during).await);
        proxy.restore();
        let mut after = TcpStream::connect(addr).await.unwrap();
        assert!(round_trip(&mut after).await);
        assert_eq!(proxy.accepted(), 2);
    }
}
