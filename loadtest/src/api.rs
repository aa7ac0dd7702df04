//! One HTTP call to the flashsale API, made the way every scenario makes it: bounded by the driver's in-flight
//! semaphore, timed, recorded under (phase, endpoint), and, where asked, repeated after a 429/503 once its
//! `Retry-After` has passed (capped, jittered, a bounded number of times).
//!
//! The API may be served by several instances (one Redis, one Postgres): a request names the instance it goes to
//! (`Request::on`), the reply says which one answered, and a retry of an idempotent request goes to the next one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::Rng;
use reqwest::Method;
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::metrics::{Phase, Recorder, STATUS_TRANSPORT_ERROR};

/// A request, kept as data so that a retry can build it again.
#[derive(Debug, Clone)]
pub struct Request {
    method: Method,
    path: String,
    token: Option<String>,
    body: Option<Value>,
    idempotency_key: Option<String>,
    /// Index of the instance to send to (taken modulo the number of instances).
    instance: usize,
}

impl Request {
    pub fn get(path: impl Into<String>) -> Self {
        Self::new(Method::GET, path, None)
    }

    pub fn post(path: impl Into<String>, body: Value) -> Self {
        Self::new(Method::POST, path, Some(body))
    }

    pub fn put(path: impl Into<String>, body: Value) -> Self {
        Self::new(Method::PUT, path, Some(body))
    }

    pub fn delete(path: impl Into<String>) -> Self {
        Self::new(Method::DELETE, path, None)
    }

    fn new(method: Method, path: impl Into<String>, body: Option<Value>) -> Self {
        Self {
            method,
            path: path.into(),
            token: None,
            body,
            idempotency_key: None,
            instance: 0,
        }
    }

    /// Sends to the `instance`-th base URL (modulo their number; 0, the first, unless told).
    pub fn on(mut self, instance: usize) -> Self {
        self.instance = instance;
        self
    }

    /// Safe to send again to any instance: it carries an `Idempotency-Key`, or its method is idempotent.
    fn idempotent(&self) -> bool {
        self.idempotency_key.is_some()
            || matches!(self.method, Method::GET | Method::PUT | Method::DELETE)
    }

    /// Sends `Authorization: Bearer <token>`.
    pub fn auth(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    /// Sends `Idempotency-Key`, so that a retry after 429/503 (or a lost answer) cannot take a second hold.
    pub fn idempotency_key(mut self, key: String) -> Self {
        self.idempotency_key = Some(key);
        self
    }
}

/// An answer: the status (0 when there was no HTTP answer), the JSON body (`Null` if none), `Retry-After`, and
/// the index of the instance that answered (or was asked, when none did).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<Duration>,
    pub instance: usize,
}

impl Reply {
    /// `error.code` of an error body.
    pub fn error_code(&self) -> Option<&str> {
        self.body.get("error")?.get("code")?.as_str()
    }

    /// A string field of the body.
    pub fn str_field(&self, key: &str) -> Option<&str> {
        self.body.get(key)?.as_str()
    }

    /// What to call this answer in outcome tallies: `201`, `409 sold_out`, `0` for no answer.
    pub fn label(&self) -> String {
        match self.error_code() {
            Some(code) => format!("{} {code}", self.status),
            None => self.status.to_string(),
        }
    }
}

/// How often a 429/503 is retried and how long a `Retry-After` is honoured at most.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub retries_max: u32,
    pub retry_after_cap: Duration,
}

impl RetryPolicy {
    /// No retries: the caller handles every answer.
    pub const NONE: Self = Self {
        retries_max: 0,
        retry_after_cap: Duration::ZERO,
    };
    /// For buyers: five more tries, waiting what the server asks but never more than two seconds.
    pub const OVERLOAD: Self = Self {
        retries_max: 5,
        retry_after_cap: Duration::from_secs(2),
    };
}

/// When the server says 429/503 without `Retry-After`.
const RETRY_AFTER_DEFAULT: Duration = Duration::from_secs(1);
/// Spread of retries, so refused clients do not come back in one herd.
const RETRY_JITTER_MS_MAX: u64 = 250;

/// The client side of the API. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Api {
    http: reqwest::Client,
    /// One base URL per instance, without a trailing `/`; never empty.
    bases: Vec<String>,
    /// Requests sent to each instance (retries included).
    sent: Vec<AtomicU64>,
    recorder: Arc<Recorder>,
    inflight: Semaphore,
}

impl Api {
    /// A client for the instances at `base_urls` (at least one) with at most `concurrency` requests in flight in
    /// all and a timeout per request.
    pub fn new(
        base_urls: &[String],
        concurrency: usize,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!base_urls.is_empty(), "no base URL");
        let http = reqwest::Client::builder()
            // The target is always local; a proxy from the environment must not get in the way.
            .no_proxy()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(concurrency)
            .connect_timeout(Duration::from_secs(5).min(timeout))
            .timeout(timeout)
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http,
            bases: base_urls
                .iter()
                .map(|b| b.trim_end_matches('/').to_owned())
                .collect(),
            sent: base_urls.iter().map(|_| AtomicU64::new(0)).collect(),
            recorder: Arc::new(Recorder::default()),
            inflight: Semaphore::new(concurrency),
        })
    }

    pub fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    /// How many instances serve the API (at least one).
    pub fn instances(&self) -> usize {
        self.bases.len()
    }

    /// The index of the instance `offset` places after `instance`, wrapping around: with one instance, always 0.
    pub fn next_instance(&self, instance: usize, offset: usize) -> usize {
        (instance % self.bases.len() + offset) % self.bases.len()
    }

    /// Requests sent to each instance so far, in `base_urls` order.
    pub fn sent_per_instance(&self) -> Vec<u64> {
        self.sent
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    /// Sends once and records the outcome. Time spent waiting for an in-flight slot is not counted as latency:
    /// the numbers describe the server, not the driver's queue.
    pub async fn send(&self, phase: Phase, endpoint: &'static str, request: &Request) -> Reply {
        // The semaphore is never closed, so acquire cannot fail; without a permit the request would still be
        // correct, only unbounded.
        let _permit = self.inflight.acquire().await.ok();
        let started = Instant::now();
        let reply = self.send_unrecorded(request).await;
        self.recorder
            .record(phase, endpoint, reply.status, started.elapsed());
        reply
    }

    /// Sends, and repeats after 429/503 up to `policy.retries_max` times, waiting out `Retry-After` (capped). An
    /// idempotent request (an `Idempotency-Key`, or GET/PUT/DELETE) is repeated on the next instance each time, so
    /// that with several instances no retry goes where the previous try went; others stay on their instance.
    pub async fn send_retrying(
        &self,
        phase: Phase,
        endpoint: &'static str,
        request: &Request,
        policy: RetryPolicy,
    ) -> Reply {
        let mut reply = self.send(phase, endpoint, request).await;
        let mut retry = request.clone();
        for _ in 0..policy.retries_max {
            if !matches!(reply.status, 429 | 503) {
                break;
            }
            let wait = reply
                .retry_after
                .unwrap_or(RETRY_AFTER_DEFAULT)
                .min(policy.retry_after_cap);
            tokio::time::sleep(wait + jitter(RETRY_JITTER_MS_MAX)).await;
            self.recorder.retried(phase, endpoint);
            if retry.idempotent() {
                retry.instance = self.next_instance(retry.instance, 1);
            }
            reply = self.send(phase, endpoint, &retry).await;
        }
        reply
    }

    async fn send_unrecorded(&self, request: &Request) -> Reply {
        let instance = request.instance % self.bases.len();
        self.sent[instance].fetch_add(1, Ordering::Relaxed);
        let url = format!("{}{}", self.bases[instance], request.path);
        let mut builder = self.http.request(request.method.clone(), url);
        if let Some(token) = &request.token {
            builder = builder.bearer_auth(token);
        }
        if let Some(key) = &request.idempotency_key {
            builder = builder.header("Idempotency-Key", key);
        }
        if let Some(body) = &request.body {
            builder = builder.json(body);
        }
        let no_answer = Reply {
            status: STATUS_TRANSPORT_ERROR,
            body: Value::Null,
            retry_after: None,
            instance,
        };
        let Ok(response) = builder.send().await else {
            return no_answer;
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let Ok(bytes) = response.bytes().await else {
            return no_answer;
        };
        Reply {
            status,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            retry_after,
            instance,
        }
    }
}

/// A uniformly random delay in `0..=max_ms` milliseconds. Kept out of async code: the thread-local RNG is not
/// `Send` and must not live across an `.await`.
pub fn jitter(max_ms: u64) -> Duration {
    Duration::from_millis(rand::thread_rng().gen_range(0..=max_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A one-trick HTTP server: answers every request with `status` (and `Retry-After: 0`), counting requests.
    async fn fixed_server(status: u16) -> (String, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&hits);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    // Read the head, then as much body as it announces, then answer and close.
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let head_end = loop {
                        let n = socket.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + length {
                        let n = socket.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\nretry-after: 0\r\ncontent-type: application/json\r\n\
                         content-length: 2\r\nconnection: close\r\n\r\n{{}}"
                    );
                    let _ = socket.write_all(answer.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        (url, hits)
    }

    const ONE_RETRY: RetryPolicy = RetryPolicy {
        retries_max: 1,
        retry_after_cap: Duration::ZERO,
    };

    #[tokio::test]
    async fn idempotent_retries_move_to_the_next_instance() {
        let (busy, busy_hits) = fixed_server(503).await;
        let (ok, ok_hits) = fixed_server(201).await;
        let api = Api::new(&[busy, ok], 4, Duration::from_secs(5)).unwrap();
        assert_eq!(api.instances(), 2);
        assert_eq!(api.next_instance(1, 1), 0);
        assert_eq!(api.next_instance(3, 0), 1);

        let keyed = Request::post("/r", json!({ "quantity": 1 }))
            .idempotency_key("k".to_owned())
            .on(0);
        let reply = api
            .send_retrying(Phase::Spike, "POST /r", &keyed, ONE_RETRY)
            .await;
        assert_eq!((reply.status, reply.instance), (201, 1));
        assert_eq!(busy_hits.load(Ordering::Relaxed), 1);
        assert_eq!(ok_hits.load(Ordering::Relaxed), 1);

        // Without a key a POST is retried where it went.
        let plain = Request::post("/m", json!({})).on(0);
        let reply = api
            .send_retrying(Phase::Setup, "POST /m", &plain, ONE_RETRY)
            .await;
        assert_eq!((reply.status, reply.instance), (503, 0));
        assert_eq!(busy_hits.load(Ordering::Relaxed), 3);
        assert_eq!(ok_hits.load(Ordering::Relaxed), 1);
        assert_eq!(api.sent_per_instance(), [3, 1]);
    }

    #[tokio::test]
    async fn with_one_instance_every_request_goes_there() {
        let (busy, hits) = fixed_server(503).await;
        let api = Api::new(&[busy], 4, Duration::from_secs(5)).unwrap();
        let cancel = Request::delete("/r/1").on(5);
        let reply = api
            .send_retrying(Phase::Settle, "DELETE /r/{id}", &cancel, ONE_RETRY)
            .await;
        assert_eq!((reply.status, reply.instance), (503, 0));
        assert_eq!(hits.load(Ordering::Relaxed), 2);
    }
}
