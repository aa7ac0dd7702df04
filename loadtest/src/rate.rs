//! Latency at a constant arrival rate, without coordinated omission.
//!
//! Goose is closed-loop: a user sends its next request when the last one answered, so a server that stalls is
//! simply asked less, and the requests it would have delayed are never measured. Here request `k` has an intended
//! send time, `start + k / rps`, fixed before the run; a fixed pool of raw HTTP/1.1 connections (hyper, one
//! request in flight each) takes the tickets in order, each waiting until its ticket's time, and a request's
//! latency counts from its intended time, not from when a connection got to send it. A stall of the server makes
//! every ticket behind it late, and each of them shows it (the wrk2 way).
//!
//! Per request the harness does little (an atomic ticket, one write, one read), so on two cores it can offer far
//! more than goose's ~34 µs of CPU per request allows.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Makes request `k` of the run (for instance, with the `k`-th member's token).
pub type MakeRequest = Arc<dyn Fn(u64) -> Request<Full<Bytes>> + Send + Sync>;

/// What to offer: `total` requests at `rps`, over `connections` connections to each of `addrs`.
#[derive(Clone)]
pub struct Plan {
    /// `host:port` of each instance.
    pub addrs: Vec<String>,
    pub rps: u32,
    pub total: u64,
    pub connections: usize,
    pub timeout: Duration,
    pub make_request: MakeRequest,
}

/// The numbers of a run. Latencies are in microseconds, from each request's intended send time to its answer.
#[derive(Debug, Clone, Serialize)]
pub struct RateReport {
    pub offered_rps: u32,
    pub requests: u64,
    pub seconds: f64,
    pub achieved_rps: f64,
    /// Answers by status; 0 is no answer (connect error, timeout, broken connection).
    pub statuses: BTreeMap<u16, u64>,
    /// Requests sent more than a millisecond after their intended time (every connection was busy).
    pub sent_late: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl RateReport {
    /// Answers that were not 2xx.
    pub fn errors(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| !(200..300).contains(*s))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn render(&self) -> String {
        let ms = |us: u64| us as f64 / 1000.0;
        let statuses = self
            .statuses
            .iter()
            .map(|(s, n)| {
                if *s == 0 {
                    format!("no answer:{n}")
                } else {
                    format!("{s}:{n}")
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
        format!(
            "rate: offered {} req/s, {} requests in {:.2} s = {:.0} req/s achieved; {} sent late; statuses {statuses}\n\
             latency from the intended send time: p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms\n",
            self.offered_rps,
            self.requests,
            self.seconds,
            self.achieved_rps,
            self.sent_late,
            ms(self.p50_us),
            ms(self.p90_us),
            ms(self.p99_us),
            ms(self.p999_us),
            ms(self.max_us),
        )
    }
}

/// The intended send time of request `k`, as an offset from the start.
pub fn intended_offset(k: u64, rps: u32) -> Duration {
    Duration::from_nanos(k.saturating_mul(1_000_000_000) / u64::from(rps.max(1)))
}

/// Nearest-rank percentile of sorted, non-empty samples: the smallest sample with at least `p`% of the samples
/// at or below it.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    debug_assert!(!sorted.is_empty());
    debug_assert!(sorted.windows(2).all(|w| w[0] <= w[1]));
    // The epsilon keeps float error (0.999 x 1000 = 999.000...1) from moving the rank up by one.
    let rank = ((p / 100.0) * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The resolution of tokio's timer.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// What one connection's worker measured.
#[derive(Default)]
struct Samples {
    latencies_us: Vec<u64>,
    statuses: BTreeMap<u16, u64>,
    sent_late: u64,
}

/// Offers the plan's requests at its rate and measures them.
pub async fn run(plan: Plan) -> anyhow::Result<RateReport> {
    anyhow::ensure!(!plan.addrs.is_empty() && plan.connections > 0 && plan.rps > 0);
    let next = Arc::new(AtomicU64::new(0));
    // A little ahead, so the workers are waiting when the first ticket is due.
    let start = Instant::now() + Duration::from_millis(20);
    let mut workers = Vec::new();
    for addr in &plan.addrs {
        for _ in 0..plan.connections {
            workers.push(tokio::spawn(worker(
                addr.clone(),
                plan.clone(),
                Arc::clone(&next),
                start,
            )));
        }
    }
    let mut all = Samples::default();
    for worker in workers {
        let samples = worker.await.context("a rate worker panicked")?;
        all.latencies_us.extend(samples.latencies_us);
        all.sent_late += samples.sent_late;
        for (status, n) in samples.statuses {
            *all.statuses.entry(status).or_default() += n;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    all.latencies_us.sort_unstable();
    let pick = |p: f64| {
        if all.latencies_us.is_empty() {
            0
        } else {
            percentile(&all.latencies_us, p)
        }
    };
    let requests = all.latencies_us.len() as u64;
    Ok(RateReport {
        offered_rps: plan.rps,
        requests,
        seconds,
        achieved_rps: requests as f64 / seconds.max(f64::EPSILON),
        statuses: all.statuses,
        sent_late: all.sent_late,
        p50_us: pick(50.0),
        p90_us: pick(90.0),
        p99_us: pick(99.0),
        p999_us: pick(99.9),
        max_us: all.latencies_us.last().copied().unwrap_or(0),
    })
}

/// One connection: takes tickets until none is left, each at its intended time; reconnects after a failure.
async fn worker(addr: String, plan: Plan, next: Arc<AtomicU64>, start: Instant) -> Samples {
    let mut samples = Samples {
        latencies_us: Vec::with_capacity(
            usize::try_from(plan.total).unwrap_or(0) / plan.connections.max(1) + 1,
        ),
        ..Samples::default()
    };
    let mut connection: Option<SendRequest<Full<Bytes>>> = None;
    loop {
        let k = next.fetch_add(1, Ordering::Relaxed);
        if k >= plan.total {
            return samples;
        }
        let intended = start + intended_offset(k, plan.rps);
        // Tokio's timer fires on the first millisecond tick at or after its deadline, so a sleep until `intended`
        // would send up to a millisecond late and add that to every latency. Waking up to a tick early and
        // counting from the earlier of the intended and the actual send time keeps that slop out, while a send
        // held back by busy connections still counts from its intended time.
        tokio::time::sleep_until(intended.checked_sub(TIMER_TICK).unwrap_or(intended)).await;
        let sent = Instant::now();
        if sent > intended + TIMER_TICK {
            samples.sent_late += 1;
        }
        let request = (plan.make_request)(k);
        let status =
            match tokio::time::timeout(plan.timeout, exchange(&addr, &mut connection, request))
                .await
            {
                Ok(Some(status)) => status,
                _ => {
                    // A connection that failed or timed out mid-request cannot be reused.
                    connection = None;
                    0
                }
            };
        let latency = Instant::now().saturating_duration_since(intended.min(sent));
        samples
            .latencies_us
            .push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
        *samples.statuses.entry(status).or_default() += 1;
    }
}

/// Sends one request on the connection (opening it first if needed) and reads the whole answer; its status.
async fn exchange(
    addr: &str,
    connection: &mut Option<SendRequest<Full<Bytes>>>,
    request: Request<Full<Bytes>>,
) -> Option<u16> {
    if connection.as_ref().is_none_or(|c| c.is_closed()) {
        let stream = TcpStream::connect(addr).await.ok()?;
        stream.set_nodelay(true).ok()?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        *connection = Some(sender);
    }
    let sender = connection.as_mut()?;
    sender.ready().await.ok()?;
    let response = sender.send_request(request).await.ok()?;
    let status = response.status().as_u16();
    response.into_body().collect().await.ok()?;
    Some(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A keep-alive HTTP server that answers 200 at once, except the `stall_at`-th request, which it holds for
    /// `stall`.
    async fn stalling_server(stall_at: u64, stall: Duration) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(AtomicU64::new(0));
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let seen = Arc::clone(&seen);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let n = socket.read(&mut chunk).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        // The requests here have no body.
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        buf.drain(..end);
                        if seen.fetch_add(1, Ordering::Relaxed) == stall_at {
                            tokio::time::sleep(stall).await;
                        }
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if socket.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn plan(addr: String, rps: u32, total: u64) -> Plan {
        let host = addr.clone();
        Plan {
            addrs: vec![addr],
            rps,
            total,
            connections: 1,
            timeout: Duration::from_secs(5),
            make_request: Arc::new(move |_| {
                Request::get("/")
                    .header("host", &host)
                    .body(Full::new(Bytes::new()))
                    .unwrap()
            }),
        }
    }

    #[test]
    fn tickets_are_evenly_spaced() {
        assert_eq!(intended_offset(0, 100), Duration::ZERO);
        assert_eq!(intended_offset(1, 100), Duration::from_millis(10));
        assert_eq!(intended_offset(250, 100), Duration::from_millis(2500));
        assert_eq!(intended_offset(3, 3), Duration::from_secs(1));
    }

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&samples, 50.0), 500);
        assert_eq!(percentile(&samples, 99.0), 990);
        assert_eq!(percentile(&samples, 99.9), 999);
        assert_eq!(percentile(&samples, 100.0), 1000);
        assert_eq!(percentile(&[7], 99.0), 7);
    }

    #[tokio::test]
    async fn a_fast_server_answers_every_ticket_in_time() {
        let addr = stalling_server(u64::MAX, Duration::ZERO).await;
        let report = run(plan(addr, 200, 100)).await.unwrap();
        assert_eq!(report.requests, 100);
        assert_eq!(report.statuses.get(&200), Some(&100));
        assert_eq!(report.errors(), 0);
        // 100 tickets 5 ms apart take half a second.
        assert!(report.seconds >= 0.49, "{report:?}");
        assert!(report.p50_us < 20_000, "{report:?}");
    }

    #[tokio::test]
    async fn a_stall_shows_in_every_request_it_delayed() {
        // One connection, a ticket every 10 ms; the server holds the 10th request for 300 ms.
        let addr = stalling_server(10, Duration::from_millis(300)).await;
        let report = run(plan(addr, 100, 100)).await.unwrap();
        assert_eq!(report.requests, 100);
        assert_eq!(report.errors(), 0);
        assert!(report.max_us >= 300_000, "{report:?}");
        // Measured from the send time, only the stalled request would be slow. From the intended time the ~30
        // tickets due during the stall were all late, by 300 ms down to a few: the p90 shows it, and the sends
        // that had to wait for the connection are counted.
        assert!(report.p90_us >= 50_000, "{report:?}");
        assert!(report.sent_late >= 25, "{report:?}");
        assert!(report.p50_us < 50_000, "{report:?}");
    }
}
