//! End-to-end time to sell a drop: buyers reserve and pay, concurrently, until every unit is sold.
//! `sell_out BASE_URL DROP_ID TOKENS_FILE [CONCURRENCY [SERVER_PID]]`; prints the units sold, the seconds from the
//! first request to the last payment, and units per second, then each stage's latency as the buyers saw it, the
//! generator's own CPU time and, given the server's pid, its resident memory once the buyers are connected and once
//! the drop is sold (their difference is what the sold units keep, without the connections' buffers). Each buyer loops reserve -> pay (`tok_ok`) until the drop answers `sold_out`; a member at its
//! per-member limit moves on to the next token; an answer of 429 or 503 is retried after its `Retry-After`, as a
//! client should. Used by `scripts/wire.sh`.
//!
//! The generator shares the machine's cores with the server, so it is kept light: each buyer keeps one raw
//! HTTP/1.1 connection, writes each request as one buffer and reads its answer only as far as the measurement needs
//! (the status, the hold's id, the error code).
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(
    clippy::too_many_lines,
    reason = "an example is one measurement read top to bottom: its setup, the load and the report"
)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// What one buyer saw: each request's latency in microseconds, by stage, and the answers that were retried.
#[derive(Default)]
struct Seen {
    reserve_us: Vec<u64>,
    pay_us: Vec<u64>,
    retried: u64,
}

/// One answer as far as the measurement reads it.
struct Answer {
    status: u16,
    /// A 429 or 503 with `Retry-After`: the client waits a second (the server's hint) and asks again.
    retry: bool,
    body: Vec<u8>,
}

impl Answer {
    /// Whether the body holds `needle` (an error code, quoted).
    fn says(&self, needle: &[u8]) -> bool {
        self.body.windows(needle.len()).any(|w| w == needle)
    }

    /// The hold's id from a 201's body (`"id":"..."` comes first in it).
    fn hold_id(&self) -> Option<&str> {
        const KEY: &[u8] = br#""id":""#;
        let start = self.body.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
        let rest = self.body.get(start..)?;
        let end = rest.iter().position(|&b| b == b'"')?;
        std::str::from_utf8(rest.get(..end)?).ok()
    }
}

/// One buyer's connection: raw HTTP/1.1, one request at a time, each written whole and its answer read whole
/// (`loadtest::burst::read_answer`).
struct Buyer {
    stream: TcpStream,
    request: Vec<u8>,
}

impl Buyer {
    async fn connect(addr: &str) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Self {
            stream,
            request: Vec::with_capacity(512),
        }
    }

    async fn post(&mut self, path: &str, auth: &str, body: &[u8]) -> Answer {
        self.request.clear();
        self.request.extend_from_slice(b"POST ");
        self.request.extend_from_slice(path.as_bytes());
        self.request.extend_from_slice(
            b" HTTP/1.1\r\nhost: flashsale\r\ncontent-type: application/json\r\nauthorization: ",
        );
        self.request.extend_from_slice(auth.as_bytes());
        self.request.extend_from_slice(b"\r\ncontent-length: ");
        self.request
            .extend_from_slice(body.len().to_string().as_bytes());
        self.request.extend_from_slice(b"\r\n\r\n");
        self.request.extend_from_slice(body);
        self.stream.write_all(&self.request).await.expect("send");
        let (status, retry_after, body) = loadtest::burst::read_answer(&self.stream)
            .await
            .expect("an answer");
        Answer {
            status,
            retry: retry_after && matches!(status, 429 | 503),
            body,
        }
    }
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// "p50 X ms  p99 Y ms  max Z ms" of `samples` (sorted here), by the harness's nearest-rank percentile.
fn percentiles(samples: &mut [u64]) -> String {
    samples.sort_unstable();
    let at = |p: f64| {
        if samples.is_empty() {
            0.0
        } else {
            loadtest::rate::percentile(samples, p) as f64 / 1000.0
        }
    };
    format!(
        "p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        at(50.0),
        at(99.0),
        at(100.0)
    )
}

/// This process's CPU time (user + system) so far, from /proc/self/stat (clock ticks of 1/100 s).
fn own_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |n: usize| {
        fields
            .get(n)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, base, drop, tokens, rest @ ..] = &args[..] else {
        eprintln!("usage: sell_out BASE_URL DROP_ID TOKENS_FILE [CONCURRENCY [SERVER_PID]]");
        std::process::exit(2);
    };
    let concurrency: usize = rest
        .first()
        .map_or(128, |n| n.parse().expect("concurrency"));
    let server_pid: Option<u32> = rest.get(1).map(|pid| pid.parse().expect("server pid"));
    let addr: Arc<str> = base
        .strip_prefix("http://")
        .expect("an http:// base URL")
        .trim_end_matches('/')
        .into();
    let tokens: Arc<Vec<String>> = Arc::new(
        std::fs::read_to_string(tokens)
            .expect("tokens file")
            .lines()
            .filter(|line| !line.is_empty())
            .map(|token| format!("Bearer {token}"))
            .collect(),
    );
    let reserve_path: Arc<str> = format!("/api/v1/drops/{drop}/reservations").into();
    let next_token = Arc::new(AtomicUsize::new(0));
    let sold = Arc::new(AtomicU64::new(0));
    let unexpected = Arc::new(AtomicU64::new(0));
    let mut connections = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        connections.push(Buyer::connect(&addr).await);
    }
    let rss_connected = server_pid.map(|pid| loadtest::burst::memory_kb(pid).0);
    let cpu_before = own_cpu_seconds();
    let started = Instant::now();
    let buyers: Vec<_> = connections
        .into_iter()
        .map(|mut buyer| {
            let (tokens, next_token, sold, unexpected, reserve_path) = (
                tokens.clone(),
                next_token.clone(),
                sold.clone(),
                unexpected.clone(),
                reserve_path.clone(),
            );
            tokio::spawn(async move {
                let mut seen = Seen::default();
                let mut token = next_token.fetch_add(1, Ordering::Relaxed) % tokens.len();
                loop {
                    let sent = Instant::now();
                    let held = buyer.post(&reserve_path, &tokens[token], b"{}").await;
                    if held.retry {
                        seen.retried += 1;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    seen.reserve_us.push(micros(sent));
                    match held.status {
                        201 => {}
                        409 if held.says(br#""sold_out""#) => return seen,
                        409 if held.says(br#""limit_exceeded""#) => {
                            token = next_token.fetch_add(1, Ordering::Relaxed) % tokens.len();
                            continue;
                        }
                        _ => {
                            unexpected.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                    let pay_path = format!(
                        "/api/v1/reservations/{}/payment",
                        held.hold_id().expect("reservation id")
                    );
                    loop {
                        let sent = Instant::now();
                        let paid = buyer
                            .post(&pay_path, &tokens[token], br#"{"payment_token":"tok_ok"}"#)
                            .await;
                        if paid.retry {
                            seen.retried += 1;
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                        seen.pay_us.push(micros(sent));
                        if paid.status == 200 {
                            sold.fetch_add(1, Ordering::Relaxed);
                        } else {
                            unexpected.fetch_add(1, Ordering::Relaxed);
                        }
                        break;
                    }
                }
            })
        })
        .collect();
    let mut all = Seen::default();
    for buyer in buyers {
        let seen = buyer.await.expect("buyer");
        all.reserve_us.extend(seen.reserve_us);
        all.pay_us.extend(seen.pay_us);
        all.retried += seen.retried;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = own_cpu_seconds() - cpu_before;
    let rss_sold = server_pid.map(|pid| loadtest::burst::memory_kb(pid).0);
    let sold = sold.load(Ordering::Relaxed);
    println!(
        "sold {sold} units in {seconds:.2} s ({:.0} units/s), {} unexpected answers",
        sold as f64 / seconds,
        unexpected.load(Ordering::Relaxed)
    );
    println!(
        "reserve ({} answers): {}",
        all.reserve_us.len(),
        percentiles(&mut all.reserve_us)
    );
    println!(
        "pay ({} answers): {}",
        all.pay_us.len(),
        percentiles(&mut all.pay_us)
    );
    println!(
        "retried after 429/503: {}; generator CPU {cpu:.2} s ({:.0}% of one core)",
        all.retried,
        cpu / seconds * 100.0
    );
    if let (Some(connected), Some(sold_kb)) = (rss_connected, rss_sold) {
        println!(
            "server RSS with the buyers connected {} MB, sold out {} MB: {} bytes per unit sold",
            connected / 1024,
            sold_kb / 1024,
            sold_kb.saturating_sub(connected) * 1024 / sold.max(1)
        );
    }
}
