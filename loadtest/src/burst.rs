//! The opening burst: every client connected before a drop opens, each sending its reservation at the opening
//! instant.
//!
//! A hyped drop does not open to a steady stream: tens of thousands of clients connect early and send in the same
//! second, most of them to be told "sold out". Goose starts its users over time and `rate` spaces requests out, so
//! neither shows that. Here each client opens its own HTTP/1.1 connection before `opens_at` and encodes its request;
//! at the opening one loop writes every client's request in turn (a non-blocking write each, so 16,000 sends leave
//! in a fraction of the time 16,000 tasks woken by a timer take), and each client's task then reads its answer.
//! Each answer's latency counts from the opening instant, not from when its request left: the generator's own lag
//! (it shares the cores) is inside the figures, and is reported apart as the send lag.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Semaphore};
use tokio::time::Instant;

use crate::rate::percentile;
use crate::verify::{check, Check};

/// Makes client `i`'s request (its member's token, its instance's host).
pub type MakeRequest = Arc<dyn Fn(usize) -> Request<Full<Bytes>> + Send + Sync>;

/// What to send: one request per client, client `i` over its own connection to `addrs[i mod n]`.
pub struct Plan {
    /// `host:port` of each instance.
    pub addrs: Vec<String>,
    pub clients: usize,
    pub make_request: MakeRequest,
    /// The instant every client sends (the drop's `opens_at` on this process's clock).
    pub opening: Instant,
    /// Connections being opened at once.
    pub connect_concurrency: usize,
    /// How long one connect, and then one answer, may take.
    pub timeout: Duration,
    /// Servers whose memory is read before the connections, once they are open, and after the answers.
    pub server_pids: Vec<u32>,
}

/// A server's resident memory (kB, from `/proc/PID/status`) at the three moments of a burst, and its peak.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerMemory {
    pub pid: u32,
    pub rss_before_kb: u64,
    pub rss_connected_kb: u64,
    pub rss_after_kb: u64,
    pub hwm_kb: u64,
}

/// The drop's counts as the API reports them after the burst.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct DropCounts {
    pub stock: u64,
    pub available: u64,
    pub held: u64,
    pub sold: u64,
}

/// The figures of a burst. Times are milliseconds from the opening instant.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BurstReport {
    pub clients: u64,
    /// Clients whose connection was open (and ready) before the opening.
    pub connected_before_opening: u64,
    /// Clients that could not connect at all.
    pub connect_errors: u64,
    /// From the first connect to the last connection ready.
    pub connect_seconds: f64,
    /// Clients that sent and got no answer (broken connection, timeout).
    pub no_answer: u64,
    /// Answers by status and error code: `201`, `409 sold_out`, `429 overloaded`.
    pub answers: BTreeMap<String, u64>,
    /// 429 and 503 answers without `Retry-After`.
    pub back_pressure_without_retry_after: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The last answer: the time until every client that got one had it.
    pub max_ms: f64,
    /// How late the clients' sends left after the opening instant (the generator's share).
    pub send_lag_p50_ms: f64,
    pub send_lag_max_ms: f64,
    pub servers: Vec<ServerMemory>,
    /// Filled in by the caller, which knows the drop.
    pub drop: Option<DropCounts>,
}

impl BurstReport {
    pub fn answered(&self) -> u64 {
        self.answers.values().sum()
    }

    /// Answers of a status (any code).
    pub fn with_status(&self, status: u16) -> u64 {
        self.answers
            .iter()
            .filter(|(label, _)| label_status(label) == status)
            .map(|(_, n)| n)
            .sum()
    }

    pub fn server_errors(&self) -> u64 {
        self.answers
            .iter()
            .filter(|(label, _)| label_status(label) >= 500)
            .map(|(_, n)| n)
            .sum()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let answers = self
            .answers
            .iter()
            .map(|(label, n)| format!("{label}:{n}"))
            .collect::<Vec<_>>()
            .join("  ");
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "burst: {} clients, {} connected before the opening (in {:.2} s), {} connect errors, {} answered, {} unanswered",
            self.clients,
            self.connected_before_opening,
            self.connect_seconds,
            self.connect_errors,
            self.answered(),
            self.no_answer
        );
        let _ = writeln!(out, "answers: {answers}");
        let _ = writeln!(
            out,
            "from the opening: every answer in {:.1} ms; p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms; sends left p50 {:.1} ms, last {:.1} ms after it",
            self.max_ms, self.p50_ms, self.p99_ms, self.max_ms, self.send_lag_p50_ms, self.send_lag_max_ms
        );
        for s in &self.servers {
            // "Before" follows setup, whose argon2 buffers the allocator may still hold: the peak says more.
            let _ = writeln!(
                out,
                "server {}: RSS {} MB before the connections, {} MB with them open, {} MB after the answers; peak {} MB",
                s.pid,
                s.rss_before_kb / 1024,
                s.rss_connected_kb / 1024,
                s.rss_after_kb / 1024,
                s.hwm_kb / 1024
            );
        }
        if let Some(d) = self.drop {
            let _ = writeln!(
                out,
                "drop after: stock {} available {} held {} sold {}",
                d.stock, d.available, d.held, d.sold
            );
        }
        out
    }
}

/// The status of an answer's label (`409 sold_out` -> 409).
fn label_status(label: &str) -> u16 {
    label
        .split(' ')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Judges a burst: every client connected and answered, nothing but a grant, a refusal or back-pressure with
/// `Retry-After`, no 5xx, every answer within `within_ms` of the opening, and the drop's counts adding up to the
/// grants the clients saw.
pub fn checks(report: &BurstReport, within_ms: u64) -> Vec<Check> {
    let expected = |label: &str| {
        label == "201"
            || label == "409 sold_out"
            || label == "409 limit_exceeded"
            || label_status(label) == 429
    };
    let unexpected: Vec<String> = report
        .answers
        .iter()
        .filter(|(label, _)| !expected(label))
        .map(|(label, n)| format!("{label}:{n}"))
        .collect();
    let granted = report.with_status(201);
    let mut checks = vec![
        check(
            "every client connected before the opening",
            report.connected_before_opening == report.clients && report.connect_errors == 0,
            format!(
                "{} of {} ({} connect errors)",
                report.connected_before_opening, report.clients, report.connect_errors
            ),
        ),
        check(
            "every client answered",
            report.answered() == report.clients && report.no_answer == 0,
            format!("{} of {}", report.answered(), report.clients),
        ),
        check(
            "no 5xx",
            report.server_errors() == 0,
            format!("{}", report.server_errors()),
        ),
        check(
            "only 201, 409 or 429 with Retry-After",
            unexpected.is_empty() && report.back_pressure_without_retry_after == 0,
            format!(
                "unexpected [{}], without Retry-After {}",
                unexpected.join(" "),
                report.back_pressure_without_retry_after
            ),
        ),
        check(
            "every answer within the target",
            report.answered() > 0 && report.max_ms <= within_ms as f64,
            format!("last at {:.1} ms, target {within_ms} ms", report.max_ms),
        ),
    ];
    let sold_out = report.answers.get("409 sold_out").copied().unwrap_or(0);
    match report.drop {
        Some(d) => checks.extend(drop_checks(d, granted, sold_out)),
        None => checks.push(check(
            "the drop's counts were read",
            false,
            "no counts".to_owned(),
        )),
    }
    checks
}

/// The drop's counts against what the clients saw: `granted` 201s, `sold_out` told sold out.
fn drop_checks(d: DropCounts, granted: u64, sold_out: u64) -> [Check; 3] {
    [
        check(
            "the drop's holds are the grants",
            d.held + d.sold == granted,
            format!(
                "held {} + sold {} against {granted} answered 201",
                d.held, d.sold
            ),
        ),
        check(
            "available + held + sold == stock",
            d.available + d.held + d.sold == d.stock,
            format!(
                "{} + {} + {} against {}",
                d.available, d.held, d.sold, d.stock
            ),
        ),
        check(
            "sold out only when nothing was left",
            sold_out == 0 || d.available == 0,
            format!("{sold_out} told sold out, {} available", d.available),
        ),
    ]
}

/// One client's outcome.
enum Outcome {
    ConnectFailed,
    NoAnswer,
    Answered {
        label: String,
        retry_after: bool,
        latency: Duration,
        send_lag: Duration,
    },
}

/// A client's connection, open before the opening, with its request encoded, waiting for the send loop.
struct Ready {
    stream: Arc<TcpStream>,
    request: Vec<u8>,
    /// The send loop says when the request left and how many of its bytes it wrote.
    sent: oneshot::Sender<(Instant, usize)>,
}

/// Opens every client's connection, sends every request at the opening and gathers the figures.
pub async fn run(plan: Plan) -> anyhow::Result<BurstReport> {
    anyhow::ensure!(!plan.addrs.is_empty() && plan.clients > 0);
    let plan = Arc::new(plan);
    let gate = Arc::new(Semaphore::new(plan.connect_concurrency.max(1)));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<Ready>();
    let before: Vec<(u64, u64)> = plan.server_pids.iter().map(|&p| memory_kb(p)).collect();
    let started = Instant::now();
    let clients = spawn_clients(&plan, &gate, &ready_tx);
    drop(ready_tx);
    // Every connection that opens before the opening is gathered; the send loop starts at the opening.
    let mut ready = Vec::with_capacity(plan.clients);
    let opening = tokio::time::sleep_until(plan.opening);
    tokio::pin!(opening);
    loop {
        tokio::select! {
            next = ready_rx.recv() => match next {
                Some(client) => ready.push(client),
                None => break,
            },
            () = &mut opening => break,
        }
        if ready.len() == plan.clients {
            break;
        }
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    let connected_before_opening = ready.len() as u64;
    let connected: Vec<(u64, u64)> = plan.server_pids.iter().map(|&p| memory_kb(p)).collect();
    if Instant::now() >= plan.opening {
        crate::setup::progress(format!(
            "burst: only {connected_before_opening} of {} connections were open at the opening (raise --opens-in-ms)",
            plan.clients
        ));
    }
    tokio::time::sleep_until(plan.opening).await;
    send_all(ready);
    // Clients that connected after the opening are sent as they come.
    while let Some(late) = ready_rx.recv().await {
        send_all(vec![late]);
    }
    let mut outcomes = Vec::with_capacity(plan.clients);
    for client in clients {
        outcomes.push(client.await.context("a burst client panicked")?);
    }
    let mut report = tally(outcomes);
    report.clients = plan.clients as u64;
    report.connected_before_opening = connected_before_opening;
    report.connect_seconds = connect_seconds;
    report.servers = plan
        .server_pids
        .iter()
        .zip(before.iter().zip(&connected))
        .map(|(&pid, (&(rss_before_kb, _), &(rss_connected_kb, _)))| {
            let (rss_after_kb, hwm_kb) = memory_kb(pid);
            ServerMemory {
                pid,
                rss_before_kb,
                rss_connected_kb,
                rss_after_kb,
                hwm_kb,
            }
        })
        .collect();
    Ok(report)
}

/// Starts each client: it connects, encodes its request, hands both to the send loop, and reads its answer once
/// the loop says its request left.
fn spawn_clients(
    plan: &Arc<Plan>,
    gate: &Arc<Semaphore>,
    ready_tx: &tokio::sync::mpsc::UnboundedSender<Ready>,
) -> Vec<tokio::task::JoinHandle<Outcome>> {
    (0..plan.clients)
        .map(|i| {
            let (plan, gate, ready_tx) = (Arc::clone(plan), Arc::clone(gate), ready_tx.clone());
            tokio::spawn(async move {
                let Some(stream) = connect(&plan, i, &gate).await else {
                    return Outcome::ConnectFailed;
                };
                let request = encode((plan.make_request)(i)).await;
                let (sent_tx, sent_rx) = oneshot::channel();
                let stream = Arc::new(stream);
                let ready = Ready {
                    stream: Arc::clone(&stream),
                    request: request.clone(),
                    sent: sent_tx,
                };
                if ready_tx.send(ready).is_err() {
                    return Outcome::NoAnswer;
                }
                let Ok((sent, written)) = sent_rx.await else {
                    return Outcome::NoAnswer;
                };
                exchange(&plan, &stream, &request[written..], sent).await
            })
        })
        .collect()
}

/// Writes each client's request with one non-blocking write, in turn, and tells each client when its request left
/// and how much of it was written (the client writes the rest itself, which a fresh socket's buffer makes rare).
fn send_all(ready: Vec<Ready>) {
    for client in ready {
        let written = client.stream.try_write(&client.request).unwrap_or(0);
        let _ = client.sent.send((Instant::now(), written));
    }
}

/// Client `i`'s connection, open, or `None` when it could not be opened in time.
async fn connect(plan: &Plan, i: usize, gate: &Semaphore) -> Option<TcpStream> {
    // The semaphore is never closed, so acquiring only waits.
    let _permit = gate.acquire().await.ok()?;
    let addr = &plan.addrs[i % plan.addrs.len()];
    let open = async {
        let stream = TcpStream::connect(addr).await.ok()?;
        stream.set_nodelay(true).ok()?;
        Some(stream)
    };
    tokio::time::timeout(plan.timeout, open)
        .await
        .ok()
        .flatten()
}

/// A request as HTTP/1.1 puts it on the wire: its line, its headers, a content length and its body.
async fn encode(request: Request<Full<Bytes>>) -> Vec<u8> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut out = Vec::with_capacity(256 + body.len());
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let _ = write!(Wire(&mut out), "{} {target} HTTP/1.1\r\n", parts.method);
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let _ = write!(Wire(&mut out), "content-length: {}\r\n\r\n", body.len());
    out.extend_from_slice(&body);
    out
}

/// `fmt::Write` into a byte buffer.
struct Wire<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Wire<'_> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        self.0.extend_from_slice(text.as_bytes());
        Ok(())
    }
}

/// Writes what the send loop left of the request, reads the whole answer, and labels it.
async fn exchange(plan: &Plan, stream: &TcpStream, rest: &[u8], sent: Instant) -> Outcome {
    let answer = async {
        if !rest.is_empty() {
            // A shared stream has no `write_all`; the rest is small, so write it until it is gone.
            let mut rest = rest;
            while !rest.is_empty() {
                stream.writable().await.ok()?;
                match stream.try_write(rest) {
                    Ok(n) => rest = &rest[n..],
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return None,
                }
            }
        }
        read_answer(stream).await
    };
    let Ok(Some((status, retry_after, body))) = tokio::time::timeout(plan.timeout, answer).await
    else {
        return Outcome::NoAnswer;
    };
    let latency = Instant::now().saturating_duration_since(plan.opening);
    let code = (status >= 400)
        .then(|| serde_json::from_slice::<serde_json::Value>(&body).ok())
        .flatten()
        .and_then(|v| v.pointer("/error/code")?.as_str().map(str::to_owned));
    Outcome::Answered {
        label: code.map_or_else(|| status.to_string(), |c| format!("{status} {c}")),
        retry_after,
        latency,
        send_lag: sent.saturating_duration_since(plan.opening),
    }
}

/// Reads one HTTP/1.1 answer with a `content-length`: its status, whether it says `retry-after`, and its body.
/// `None` when the connection ends or breaks first. (Also the sell-out example's reader.)
pub async fn read_answer(stream: &TcpStream) -> Option<(u16, bool, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n");
        if let Some(end) = head_end {
            let head = std::str::from_utf8(&buf[..end]).ok()?;
            let mut lines = head.split("\r\n");
            let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
            let mut length = 0usize;
            let mut retry_after = false;
            for line in lines {
                let (name, value) = line.split_once(':')?;
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().ok()?;
                } else if name.eq_ignore_ascii_case("retry-after") {
                    retry_after = true;
                }
            }
            let body_start = end + 4;
            if buf.len() >= body_start + length {
                return Some((
                    status,
                    retry_after,
                    buf[body_start..body_start + length].to_vec(),
                ));
            }
        }
        stream.readable().await.ok()?;
        match stream.try_read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return None,
        }
    }
}

/// Adds the clients' outcomes up.
fn tally(outcomes: Vec<Outcome>) -> BurstReport {
    let mut report = BurstReport::default();
    let mut latencies = Vec::with_capacity(outcomes.len());
    let mut lags = Vec::with_capacity(outcomes.len());
    for outcome in outcomes {
        match outcome {
            Outcome::ConnectFailed => report.connect_errors += 1,
            Outcome::NoAnswer => report.no_answer += 1,
            Outcome::Answered {
                label,
                retry_after,
                latency,
                send_lag,
            } => {
                let status = label_status(&label);
                if (status == 429 || status == 503) && !retry_after {
                    report.back_pressure_without_retry_after += 1;
                }
                *report.answers.entry(label).or_default() += 1;
                latencies.push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
                lags.push(u64::try_from(send_lag.as_micros()).unwrap_or(u64::MAX));
            }
        }
    }
    latencies.sort_unstable();
    lags.sort_unstable();
    let ms = |sorted: &[u64], p: f64| {
        if sorted.is_empty() {
            0.0
        } else {
            percentile(sorted, p) as f64 / 1000.0
        }
    };
    report.p50_ms = ms(&latencies, 50.0);
    report.p99_ms = ms(&latencies, 99.0);
    report.max_ms = ms(&latencies, 100.0);
    report.send_lag_p50_ms = ms(&lags, 50.0);
    report.send_lag_max_ms = ms(&lags, 100.0);
    report
}

/// `VmRSS` and `VmHWM` of a process in kB (zeros when it cannot be read: the process is gone or not ours to see).
pub fn memory_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Raises this process's open-files limit (soft) to its hard limit: every client is a file. Returns the limit.
pub fn raise_open_files() -> anyhow::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) =
        getrlimit(Resource::RLIMIT_NOFILE).context("reading the open-files limit")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("raising the open-files limit")?;
    }
    Ok(hard)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::Verdict;

    /// A burst that passed: 500 clients, 20 granted, the rest told sold out, all within 300 ms.
    fn good() -> BurstReport {
        BurstReport {
            clients: 500,
            connected_before_opening: 500,
            answers: BTreeMap::from([("201".to_owned(), 20), ("409 sold_out".to_owned(), 480)]),
            p50_ms: 100.0,
            p99_ms: 250.0,
            max_ms: 300.0,
            drop: Some(DropCounts {
                stock: 20,
                available: 0,
                held: 20,
                sold: 0,
            }),
            ..BurstReport::default()
        }
    }

    fn failed(report: &BurstReport) -> Vec<&'static str> {
        checks(report, 1000)
            .into_iter()
            .filter(|c| c.verdict == Verdict::Fail)
            .map(|c| c.name)
            .collect()
    }

    #[test]
    fn a_good_burst_passes_every_check() {
        assert_eq!(failed(&good()), Vec::<&str>::new());
        assert_eq!(good().with_status(409), 480);
    }

    #[test]
    fn each_check_fails_on_its_own_fault() {
        let mut late = good();
        late.max_ms = 1000.5;
        assert_eq!(failed(&late), ["every answer within the target"]);

        let mut lost = good();
        lost.no_answer = 1;
        *lost.answers.get_mut("409 sold_out").unwrap() -= 1;
        assert_eq!(failed(&lost), ["every client answered"]);

        let mut refused = good();
        refused.connect_errors = 1;
        refused.connected_before_opening = 499;
        *refused.answers.get_mut("409 sold_out").unwrap() -= 1;
        assert_eq!(
            failed(&refused),
            [
                "every client connected before the opening",
                "every client answered"
            ]
        );

        let mut broken = good();
        *broken.answers.get_mut("409 sold_out").unwrap() -= 1;
        broken.answers.insert("503 gate_unavailable".to_owned(), 1);
        assert_eq!(
            failed(&broken),
            ["no 5xx", "only 201, 409 or 429 with Retry-After"]
        );

        let mut early = good();
        *early.answers.get_mut("409 sold_out").unwrap() -= 1;
        early.answers.insert("409 not_open".to_owned(), 1);
        assert_eq!(failed(&early), ["only 201, 409 or 429 with Retry-After"]);

        let mut bare = good();
        *bare.answers.get_mut("409 sold_out").unwrap() -= 1;
        bare.answers.insert("429 overloaded".to_owned(), 1);
        assert_eq!(failed(&bare), Vec::<&str>::new());
        bare.back_pressure_without_retry_after = 1;
        assert_eq!(failed(&bare), ["only 201, 409 or 429 with Retry-After"]);
    }

    #[test]
    fn the_drop_must_account_for_the_grants() {
        let mut extra = good();
        extra.drop = Some(DropCounts {
            stock: 20,
            available: 0,
            held: 21,
            sold: 0,
        });
        assert_eq!(
            failed(&extra),
            [
                "the drop's holds are the grants",
                "available + held + sold == stock"
            ]
        );
        let mut undersold = good();
        undersold.drop = Some(DropCounts {
            stock: 21,
            available: 1,
            held: 20,
            sold: 0,
        });
        assert_eq!(failed(&undersold), ["sold out only when nothing was left"]);
        let mut unread = good();
        unread.drop = None;
        assert_eq!(failed(&unread), ["the drop's counts were read"]);
    }

    #[test]
    fn labels_carry_their_status() {
        assert_eq!(label_status("409 sold_out"), 409);
        assert_eq!(label_status("201"), 201);
        assert_eq!(label_status("junk"), 0);
    }
}
